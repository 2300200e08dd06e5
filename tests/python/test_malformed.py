"""Malformed-input corpus: one table of hand-made bad inputs, each answered
the way the AMQP 0-9-1 specification and RabbitMQ answer it, by the proxy,
to the misbehaving client alone.

Every case runs against a fresh proxy (--workers 1, so every client with the
same credentials shares one upstream connection) while a Canary
(conftest.Canary) does publish + get round trips on that upstream connection.
After the case:

  * the misbehaving client got exactly what the table says: the protocol
    header the proxy speaks (bad header), a Connection.Close with the reply
    code, a silent close (EOF), or a close at the handshake timeout (measured);
    never a hang;
  * the proxy is still running, has forgotten the client (its
    amqproxy_client_connections / amqproxy_client_channels gauges are back to
    the canary's 1 / 1), and serves a fresh pika client;
  * the canary saw no error, kept making progress, and the broker still lists
    the very same upstream connection.

Phases (what happens before the case's bytes are sent):
  header  nothing: the bytes are the first the proxy sees
  start   the protocol header was sent and Connection.Start read
  tune    Connection.StartOk sent and Connection.Tune read
  open    the whole handshake is done (frame_max 4096 unless the case says)

With AMQPROXY_TEST_DIRECT=1 the clients talk to RabbitMQ itself (3.10): the
cases check the table against the broker. Before the connection is open
RabbitMQ closes the socket without a word (after a 3 s delay) where the proxy
sends a Connection.Close with the code, so a code there means "EOF" direct;
DIRECT lists the other places where RabbitMQ answers differently or not at
all (and why the proxy must not copy it).
"""

import re
import socket
import struct
import threading
import time

import pytest

import rawamqp
from rawamqp import (BASIC_ACK, CHANNEL_CLOSE_OK, CHANNEL_OPEN, CHANNEL_OPEN_OK,
                     CONNECTION_OPEN, CONNECTION_START, CONNECTION_START_OK,
                     CONNECTION_TUNE, CONNECTION_TUNE_OK, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT,
                     FRAME_METHOD, PROTOCOL_HEADER, QUEUE_DECLARE, QUEUE_DECLARE_OK, RawClient,
                     basic_publish_frame, content_header_frame, frame, is_method, longstr,
                     method_frame, read_until_close, shortstr, table)
from broker import wait_for
from conftest import DIRECT, PASSWORD, USER, proxy_metrics, proxy_vm_status as vm_status, unique

HANDSHAKE_TIMEOUT = 3  # seconds; the proxy's --handshake-timeout in these tests
PROXY_FLAGS = ("--workers", "1", "-t", "60", "--handshake-timeout", str(HANDSHAKE_TIMEOUT))
# How long a client waits for the proxy's answer and close. RabbitMQ delays
# its close of a connection that never opened by 3 s, hence the margin.
ANSWER_TIMEOUT = 8


# ================================================================ encoding helpers

def raw_table(body):
    """A field table from raw entry bytes (length prefix added)."""
    return struct.pack(">I", len(body)) + body


def nested_tables(depth):
    """{"k": {"k": ... {} ...}} nested `depth` deep, as a length-prefixed table."""
    inner = b""
    for _ in range(depth):
        inner = shortstr("k") + b"F" + raw_table(inner)
    return raw_table(inner)


def nested_arrays(depth):
    """A table {"k": [[[...[void]...]]]} with `depth` nested arrays."""
    value = b"V"
    for _ in range(depth):
        value = b"A" + longstr(value)
    return raw_table(shortstr("k") + value)


def start_ok(response=b"\0" + USER.encode() + b"\0" + PASSWORD.encode(), mechanism="PLAIN",
             properties=None, failure_close=True):
    """Connection.StartOk. failure_close: announce the
    authentication_failure_close capability (a refused login is then told
    with Connection.Close 403 instead of a silent close)."""
    if properties is None:
        properties = table({"product": "amqproxy-tests malformed",
                            "capabilities": {"authentication_failure_close": failure_close}})
    return method_frame(0, CONNECTION_START_OK,
                        properties + shortstr(mechanism) + longstr(response) + shortstr("en_US"))


def amqplain(*entries):
    """An AMQPLAIN response: table entries without the table's length."""
    return b"".join(shortstr(k) + v for k, v in entries)


def queue_declare(ch, queue, arguments_raw):
    return method_frame(ch, QUEUE_DECLARE, struct.pack(">H", 0) + shortstr(queue) + b"\x00"
                        + arguments_raw)


def publish_to(ch, queue):
    return basic_publish_frame(ch, "", queue)


def frame_header(ftype, channel, size):
    """Just the 7-octet frame header, declaring `size` payload octets."""
    return struct.pack(">BHI", ftype, channel, size)


def send_ignoring_close(c, data):
    """Send everything the proxy is willing to read: it may close the
    connection before the last byte (that is the point of some cases)."""
    try:
        c.send(data)
    except OSError:
        pass


def half_close(c):
    """The client says EOF (FIN) and keeps reading."""
    c.sock.shutdown(socket.SHUT_WR)


def with_channel(send):
    """The case needs channel 1 open first."""
    def run(c):
        c.channel_open(1)
        return send(c)
    return run


# ================================================================ expectations

class Expect:
    """What the misbehaving client must see."""
    HEADER = "the proxy's protocol header, then EOF"
    EOF = "EOF without a Connection.Close"
    PROMPT_EOF = "EOF at once (the client half-closed), nothing else"
    TIMEOUT = "nothing, then EOF at the handshake timeout"


def expect_text(e):
    if isinstance(e, int):
        return "Connection.Close %d, then EOF" % e
    if isinstance(e, tuple):
        return "EOF %.1f..%.1f s after the bad input" % e
    return e


# ================================================================ the table

class Case:
    def __init__(self, name, phase, send, expect, handshake=None, direct=None, why=""):
        self.name, self.phase, self.send, self.expect = name, phase, send, expect
        self.handshake = handshake or {}
        self.direct = direct  # RabbitMQ's own answer where it differs; "skip: <reason>"
        self.why = why


T = HANDSHAKE_TIMEOUT
CASES = []


def case(*a, **kw):
    CASES.append(Case(*a, **kw))


# ---------------------------------------------------------------- protocol header
# The spec (4.2.2): a server that does not accept the protocol header answers
# with the header it does speak and closes the connection.
for name, data in [
        ("header-http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("header-amqp-0-10", b"AMQP\x01\x01\x00\x0a"),
        ("header-amqp-1-0", b"AMQP\x00\x01\x00\x00"),
        ("header-amqp-1-0-tls", b"AMQP\x02\x01\x00\x00"),
        ("header-amqp-1-0-sasl", b"AMQP\x03\x01\x00\x00"),
        ("header-0-9-1-wrong-revision", b"AMQP\x00\x00\x09\x02"),
        ("header-0-9-0", b"AMQP\x00\x00\x09\x00"),
        ("header-lowercase", b"amqp\x00\x00\x09\x01"),
        ("header-zeros", b"\x00" * 8),
        ("header-tls-client-hello", bytes.fromhex("16030100a5010000a10303") + b"\x11" * 32),
        ("header-binary-garbage", bytes(range(255, -1, -1))),
]:
    case(name, "header", (lambda d: lambda c: c.send(d))(data), Expect.HEADER)
case("header-amqp-0-8", "header", lambda c: c.send(b"AMQP\x01\x01\x08\x00"), Expect.HEADER,
     direct="skip: RabbitMQ speaks 0-8 too and answers with a 0-8 Connection.Start")
case("header-then-garbage", "header", lambda c: c.send(PROTOCOL_HEADER + b"\xff" * 16), 501,
     why="Connection.Start, then an unknown frame type 0xff: 501", direct=Expect.EOF)
case("header-truncated-then-eof", "header", lambda c: (c.send(b"AMQ"), half_close(c)), Expect.PROMPT_EOF)
case("header-truncated-then-silence", "header", lambda c: c.send(b"AMQP\x00\x00"), Expect.TIMEOUT,
     direct="skip: RabbitMQ's handshake timeout is 10 s")

# ---------------------------------------------------------------- frames before Tune
# Until Tune the proxy reads frames up to the frame_max it offers (131072);
# the spec only requires frame-min-size (4096). RabbitMQ enforces 4096.
case("startok-1MiB-response", "start",
     lambda c: send_ignoring_close(c, start_ok(b"\0" + USER.encode() + b"\0" + b"x" * (1 << 20))), 501,
     why="a 1 MiB frame is over any frame_max before Tune: FRAME_ERROR, decided on the size alone")
case("handshake-frame-size-4GiB", "start",
     lambda c: c.send(frame_header(FRAME_METHOD, 0, 0xFFFFFFFF) + b"\x00" * 16), 501)
case("handshake-bad-frame-end", "start", lambda c: c.send(start_ok()[:-1] + b"\x00"), 501)
case("handshake-unknown-frame-type", "start", lambda c: c.send(frame(9, 0, b"abcd")), 501)
case("handshake-heartbeat-on-channel-1", "start", lambda c: c.send(frame(FRAME_HEARTBEAT, 1, b"")), 505)
case("handshake-truncated-startok-then-eof", "start",
     lambda c: (c.send(start_ok()[:20]), half_close(c)), Expect.PROMPT_EOF)
case("handshake-truncated-startok-then-silence", "start", lambda c: c.send(start_ok()[:20]),
     Expect.TIMEOUT, direct="skip: RabbitMQ's handshake timeout is 10 s")
case("handshake-wrong-method", "start",
     lambda c: c.send(method_frame(0, CONNECTION_OPEN, shortstr("/") + shortstr("") + b"\x00")), 503)
case("handshake-method-on-channel-1", "start", lambda c: c.send(start_ok()[:1] + b"\x00\x01" + start_ok()[3:]), 503)
case("handshake-content-header", "start", lambda c: c.send(content_header_frame(0, 1)), 503)
case("startok-empty-arguments", "start", lambda c: c.send(method_frame(0, CONNECTION_START_OK)), 502)
case("startok-client-properties-truncated", "start",
     lambda c: c.send(method_frame(0, CONNECTION_START_OK, struct.pack(">I", 3) + b"abc" + shortstr("PLAIN")
                                   + longstr(b"\0guest\0guest") + shortstr("en_US"))), 502)
case("startok-client-properties-nested-5000", "start",
     lambda c: c.send(method_frame(0, CONNECTION_START_OK, nested_tables(5000) + shortstr("PLAIN")
                                   + longstr(b"\0guest\0guest") + shortstr("en_US"))), 502,
     why="the proxy bounds table nesting (16) so a hostile table cannot exhaust its stack")

# ---------------------------------------------------------------- authentication
# RabbitMQ refuses a malformed login with 403 ACCESS_REFUSED: as Connection.Close
# to a client with the authentication_failure_close capability, silently else.
case("plain-response-without-nul", "start", lambda c: c.send(start_ok(b"guestguest")), 403)
case("plain-response-one-nul", "start", lambda c: c.send(start_ok(b"guest\0guest")), 403)
case("amqplain-login-is-an-int", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"I" + struct.pack(">i", 5)),
                                        ("PASSWORD", b"S" + longstr(PASSWORD))), "AMQPLAIN")), 403)
case("amqplain-login-is-a-table", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"F" + table({"a": 1})),
                                        ("PASSWORD", b"S" + longstr(PASSWORD))), "AMQPLAIN")), 403)
case("amqplain-password-is-void", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"S" + longstr(USER)), ("PASSWORD", b"V")), "AMQPLAIN")), 403,
     direct=403)
case("amqplain-unknown-type-tag", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"Z" + longstr(USER)),
                                        ("PASSWORD", b"S" + longstr(PASSWORD))), "AMQPLAIN")), 403)
case("amqplain-string-past-the-end", "start",
     lambda c: c.send(start_ok(shortstr("LOGIN") + b"S" + struct.pack(">I", 100) + USER.encode(), "AMQPLAIN")), 403)
case("amqplain-nested-5000", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"F" + nested_tables(5000))), "AMQPLAIN")), 403)
case("amqplain-bad-types-without-capability", "start",
     lambda c: c.send(start_ok(amqplain(("LOGIN", b"I" + struct.pack(">i", 5)),
                                        ("PASSWORD", b"S" + longstr(PASSWORD))), "AMQPLAIN",
                               failure_close=False)), Expect.EOF)
case("unknown-mechanism", "start", lambda c: c.send(start_ok(mechanism="EXTERNAL-ISH")), 503)
case("plain-60KB-password", "tune-upstream",
     lambda c: c.send(method_frame(0, CONNECTION_OPEN, shortstr("/") + shortstr("") + b"\x00")), 541,
     why="the proxy takes a 60 KB StartOk (under its 131072 offer) but the broker refuses it before "
         "Tune (4096) by closing the socket: the client gets the 541 the proxy gives for a broker "
         "that dropped the connection, never a hang",
     direct="skip: the broker closes the socket itself (a 60 KB StartOk is over its 4096 limit)")

# ---------------------------------------------------------------- tuning and open
case("tuneok-frame-max-above-offer", "tune",
     lambda c: c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 0, 0xFFFFFFFF, 0))), 530)
case("tuneok-frame-max-below-minimum", "tune",
     lambda c: c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 0, 100, 0))), 530)
case("tuneok-channel-max-above-offer", "tune",
     lambda c: c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 65535, 131072, 0))), 530)
case("tuneok-truncated", "tune", lambda c: c.send(method_frame(0, CONNECTION_TUNE_OK, b"\x00\x00")), 502)
case("open-vhost-not-utf8", "tune",
     lambda c: (c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 0, 4096, 0))),
                c.send(method_frame(0, CONNECTION_OPEN, shortstr(b"\xff\xfe") + shortstr("") + b"\x00"))), 402)

# ---------------------------------------------------------------- framing, open connection
case("frame-end-not-0xce", "open", lambda c: c.send(method_frame(1, CHANNEL_OPEN, shortstr(""))[:-1] + b"\x00"), 501)
case("frame-end-0xcd", "open", lambda c: c.send(method_frame(0, rawamqp.CONNECTION_CLOSE_OK)[:-1] + b"\xcd"), 501)
case("frame-size-4GiB", "open", lambda c: c.send(frame_header(FRAME_METHOD, 1, 0xFFFFFFFF) + b"\x00" * 16), 501,
     why="decided on the declared size alone: nothing waits for (or allocates) 4 GiB")
case("frame-size-2GiB-on-channel-0", "open",
     lambda c: c.send(frame_header(FRAME_BODY, 0, 0x7FFFFFFF) + b"\x00" * 16), 501)
case("frame-over-frame-max", "open",
     lambda c: c.send(frame_header(FRAME_METHOD, 0, 4096 - 8 + 1) + b"\x00" * 100), 501,
     why="one octet over the negotiated 4096 (frame_max counts the 8 framing octets)",
     direct="skip: RabbitMQ 3.10 refuses only a payload over frame_max itself (4097 here)")
case("body-frame-over-frame-max", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 5000)
                                   + frame(FRAME_BODY, 1, b"x" * 5000))), 501)
case("unknown-frame-type-9", "open", lambda c: c.send(frame(9, 0, b"")), 501)
case("unknown-frame-type-0", "open", lambda c: c.send(frame(0, 1, b"")), 501)
case("protocol-header-again", "open", lambda c: c.send(PROTOCOL_HEADER), 501,
     why="'A' is not a frame type")
case("garbage", "open", lambda c: c.send(b"\xde\xad\xbe\xef" * 64), 501)
case("heartbeat-on-channel-1", "open", lambda c: c.send(frame(FRAME_HEARTBEAT, 1, b"")), 505)
case("heartbeat-on-channel-65535", "open", lambda c: c.send(frame(FRAME_HEARTBEAT, 65535, b"")), 505)

# ---------------------------------------------------------------- truncated frames
case("truncated-method-then-eof", "open",
     with_channel(lambda c: (c.send(publish_to(1, "nowhere")[:10]), half_close(c))), Expect.PROMPT_EOF)
case("truncated-frame-header-then-eof", "open",
     with_channel(lambda c: (c.send(b"\x01\x00"), half_close(c))), Expect.PROMPT_EOF)
case("truncated-body-then-eof", "open",
     with_channel(lambda c: (c.send(publish_to(1, "nowhere") + content_header_frame(1, 100)
                                    + frame(FRAME_BODY, 1, b"x" * 100)[:50]), half_close(c))),
     Expect.PROMPT_EOF)
# After the handshake only heartbeats bound a silent client (as on RabbitMQ):
# heartbeat 1 s, silent for more than two intervals -> closed, no Close frame.
case("truncated-frame-then-silence-heartbeat-1s", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere")[:10])), (2.0, 4.5), handshake={"heartbeat": 1})

# ---------------------------------------------------------------- content frames
case("content-header-before-method", "open", with_channel(lambda c: c.send(content_header_frame(1, 5))), 505)
case("body-before-method", "open", with_channel(lambda c: c.send(frame(FRAME_BODY, 1, b"hello"))), 505)
case("body-after-zero-size-header", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 0)
                                   + frame(FRAME_BODY, 1, b"x"))), 505)
case("method-instead-of-content-header", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + publish_to(1, "nowhere"))), 505)
case("method-between-body-frames", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 10)
                                   + frame(FRAME_BODY, 1, b"12345") + publish_to(1, "nowhere"))), 505)
case("content-header-twice", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 5)
                                   + content_header_frame(1, 5))), 505)
case("content-header-other-class", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 1, class_id=50)
                                   + frame(FRAME_BODY, 1, b"x"))), 505)
case("content-header-nonzero-weight", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + frame(FRAME_HEADER, 1, struct.pack(">HHQH", 60, 1, 1, 0))
                                   + frame(FRAME_BODY, 1, b"x"))), 505)
case("body-overflow-one-frame", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 5)
                                   + frame(FRAME_BODY, 1, b"123456"))), 505,
     direct="skip: RabbitMQ 3.10 never answers (its assembler waits for the size to reach 0)")
case("body-overflow-second-frame", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 5)
                                   + frame(FRAME_BODY, 1, b"123") + frame(FRAME_BODY, 1, b"456"))), 505,
     direct="skip: RabbitMQ 3.10 never answers (its assembler waits for the size to reach 0)")
case("content-header-on-channel-0", "open", lambda c: c.send(content_header_frame(0, 5)), 505)
case("body-on-channel-0", "open", lambda c: c.send(frame(FRAME_BODY, 0, b"abc")), 505)
case("publish-on-channel-0", "open",
     lambda c: c.send(publish_to(0, "nowhere") + content_header_frame(0, 1) + frame(FRAME_BODY, 0, b"x")), 504)
case("content-header-too-short", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + frame(FRAME_HEADER, 1, struct.pack(">HH", 60, 0)))), 502,
     direct=501)
case("content-properties-continuation-flag", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 1, (0x0001, b""))
                                   + frame(FRAME_BODY, 1, b"x"))), 502,
     direct="skip: RabbitMQ decodes properties lazily and takes the publish")
case("content-properties-missing", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 1, (0x8004, b""))
                                   + frame(FRAME_BODY, 1, b"x"))), 502,
     direct=541, why="RabbitMQ's channel crashes (541, a connection error): the proxy must not forward it")
case("content-headers-nested-500", "open",
     with_channel(lambda c: c.send(publish_to(1, "nowhere") + content_header_frame(1, 1, (0x2000, nested_tables(500)))
                                   + frame(FRAME_BODY, 1, b"x"))), 502,
     direct="skip: RabbitMQ takes the publish (no nesting bound)")

# ---------------------------------------------------------------- channels
case("method-on-unopened-channel", "open",
     lambda c: c.send(queue_declare(5, unique(), table({}))), 504)
case("close-ok-on-unopened-channel", "open", lambda c: c.send(method_frame(7, CHANNEL_CLOSE_OK)), 504)
case("channel-opened-twice", "open", with_channel(lambda c: c.send(method_frame(1, CHANNEL_OPEN, shortstr("")))), 504)
case("channel-open-on-channel-0", "open", lambda c: c.send(method_frame(0, CHANNEL_OPEN, shortstr(""))), 504)
case("declare-on-channel-0", "open", lambda c: c.send(queue_declare(0, unique(), table({}))), 504)
case("channel-open-65535", "open", lambda c: c.send(method_frame(65535, CHANNEL_OPEN, shortstr(""))), 530,
     direct="skip: RabbitMQ 3.10 does not check channel numbers against channel_max")
case("channel-open-above-channel-max", "open", lambda c: c.send(method_frame(11, CHANNEL_OPEN, shortstr(""))), 530,
     handshake={"channel_max": 10},
     direct="skip: RabbitMQ 3.10 does not check channel numbers against channel_max")

# ---------------------------------------------------------------- methods and arguments
# The proxy answers undecodable arguments with the spec's 502 SYNTAX_ERROR;
# RabbitMQ says 501 "cannot decode" (or drops the connection).
case("unknown-class", "open", with_channel(lambda c: c.send(method_frame(1, (99, 1)))), 503, direct=Expect.EOF)
case("unknown-method", "open", with_channel(lambda c: c.send(method_frame(1, (50, 99)))), 503, direct=Expect.EOF)
case("unknown-connection-method", "open", lambda c: c.send(method_frame(0, (10, 99))), 503, direct=Expect.EOF)
case("server-method-from-client", "open",
     with_channel(lambda c: c.send(method_frame(1, QUEUE_DECLARE_OK, shortstr("x") + struct.pack(">II", 0, 0)))), 503)
case("arguments-truncated", "open", with_channel(lambda c: c.send(method_frame(1, BASIC_ACK, b"\x00\x00\x00"))), 502,
     direct=501)
case("arguments-trailing-bytes", "open",
     with_channel(lambda c: c.send(method_frame(1, BASIC_ACK, struct.pack(">QB", 0, 0) + b"junk"))), 502, direct=501)
case("shortstr-past-the-payload", "open",
     with_channel(lambda c: c.send(method_frame(1, QUEUE_DECLARE, struct.pack(">H", 0) + b"\xff" + b"abc"))), 502,
     direct=501)
case("table-length-past-the-payload", "open",
     with_channel(lambda c: c.send(queue_declare(1, unique(), struct.pack(">I", 1000) + b"ab"))), 502, direct=501)
case("table-longstr-past-the-table", "open",
     with_channel(lambda c: c.send(queue_declare(1, unique(), raw_table(shortstr("k") + b"S" + struct.pack(">I", 50) + b"ab")))),
     502, direct=Expect.EOF)
case("table-unknown-type-tag", "open",
     with_channel(lambda c: c.send(queue_declare(1, unique(), raw_table(shortstr("k") + b"Z" + b"ab")))), 502,
     direct=Expect.EOF)
case("table-nested-5000", "open",
     with_channel(lambda c: c.send(queue_declare(1, unique(), nested_tables(5000)))), 502,
     handshake={"frame_max": 131072},
     why="the proxy bounds table nesting (16) so a hostile table cannot exhaust its stack",
     direct="skip: RabbitMQ accepts any nesting")
case("array-nested-5000", "open",
     with_channel(lambda c: c.send(queue_declare(1, unique(), nested_arrays(5000)))), 502,
     handshake={"frame_max": 131072}, direct="skip: RabbitMQ accepts any nesting")

# ---------------------------------------------------------------- frames RabbitMQ calls unknown_frame
# A heartbeat frame has an empty payload, and a method frame holds at least
# its class and method ids: RabbitMQ answers both with 501 FRAME_ERROR.
case("heartbeat-with-payload", "open", lambda c: c.send(frame(FRAME_HEARTBEAT, 0, b"xx")), 501)
case("handshake-heartbeat-with-payload", "start", lambda c: c.send(frame(FRAME_HEARTBEAT, 0, b"xx")), 501)
case("method-frame-empty-channel-0", "open", lambda c: c.send(frame(FRAME_METHOD, 0, b"")), 501)
case("method-frame-empty-channel-1", "open", with_channel(lambda c: c.send(frame(FRAME_METHOD, 1, b""))), 501)
case("method-frame-2-octets", "open", with_channel(lambda c: c.send(frame(FRAME_METHOD, 1, b"\x00\x32"))), 501)
case("handshake-method-frame-empty", "start", lambda c: c.send(frame(FRAME_METHOD, 0, b"")), 501)
# Connection methods on an open connection: RabbitMQ's 504 CHANNEL_ERROR
# "unexpected method in connection state running".
case("connection-open-again", "open",
     lambda c: c.send(method_frame(0, CONNECTION_OPEN, shortstr("/") + shortstr("") + b"\x00")), 504)
case("connection-start-ok-again", "open", lambda c: c.send(start_ok()), 504)
case("connection-tune-ok-again", "open",
     lambda c: c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 0, 4096, 0))), 504)
case("connection-start-from-client", "open",
     lambda c: c.send(method_frame(0, CONNECTION_START, b"\x00\x09" + table({}) + longstr("PLAIN") + longstr("en_US"))),
     504)

CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES), "duplicate case names"


# ================================================================ running a case

def metric(p, name):
    """One unlabelled sample of the proxy's /metrics."""
    v = proxy_metrics(p).get(name)
    assert v is not None, "no %s in /metrics" % name
    return v


def wait_gauges(p, clients, channels, timeout=10):
    """Poll /metrics until the client connection and channel gauges read
    (clients, channels)."""
    last = []

    def check():
        v = (metric(p, "amqproxy_client_connections"), metric(p, "amqproxy_client_channels"))
        last[:] = [v]
        return v == (clients, channels)

    try:
        wait_for(check, timeout=timeout, interval=0.05,
                 desc="amqproxy_client_connections, amqproxy_client_channels == %d, %d" % (clients, channels))
    except AssertionError as e:
        raise AssertionError("%s; last seen: %r" % (e, last)) from None


def read_raw_until_eof(c, timeout):
    """Every byte until EOF (or reset) -> (bytes, eof, seconds waited)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    data = bytes(c.buf)
    c.buf.clear()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False, time.monotonic() - t0
        c.sock.settimeout(remaining)
        try:
            chunk = c.sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data, True, time.monotonic() - t0
        if not chunk:
            return data, True, time.monotonic() - t0
        data += chunk


def client_in_phase(p, phase, handshake):
    """A RawClient that went through `phase`; its connect time in .t_connect."""
    t = time.monotonic()
    c = RawClient(p.host, p.port, timeout=ANSWER_TIMEOUT)
    c.t_connect = t
    if phase == "header":
        return c
    if phase in ("start", "tune", "tune-upstream"):
        c.start()
        if phase == "start":
            return c
        password = PASSWORD if phase == "tune" else "x" * 60000
        c.send(start_ok(b"\0" + USER.encode() + b"\0" + password.encode()))
        c.expect(CONNECTION_TUNE, channel=0)
        if phase == "tune-upstream":
            c.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", 0, 4096, 0)))
        return c
    assert phase == "open", phase
    kw = {"frame_max": 4096}
    kw.update(handshake)
    c.handshake(USER, PASSWORD, **kw)
    return c


def expected_for(case):
    if not DIRECT:
        return case.expect
    if isinstance(case.direct, str) and case.direct.startswith("skip:"):
        pytest.skip(case.direct[5:].strip())
    if case.direct is not None:
        return case.direct
    if case.phase != "open" and isinstance(case.expect, int):
        return Expect.EOF  # RabbitMQ closes a connection that never opened without a word
    return case.expect


def check_answer(c, case, expect, t_sent):
    """Read what the proxy answers and compare with `expect`."""
    what = "%s (%s)" % (case.name, expect_text(expect))
    if expect == Expect.HEADER:
        data, eof, _ = read_raw_until_eof(c, ANSWER_TIMEOUT)
        assert data == PROTOCOL_HEADER and eof, "%s: got %r, eof=%r" % (what, data, eof)
        return
    if expect in (Expect.PROMPT_EOF, Expect.TIMEOUT) or isinstance(expect, tuple):
        limit = {Expect.PROMPT_EOF: 2.0, Expect.TIMEOUT: HANDSHAKE_TIMEOUT + 4.0}.get(expect)
        if isinstance(expect, tuple):
            limit = expect[1] + 2
        data, eof, _ = read_raw_until_eof(c, limit)
        t_eof = time.monotonic()
        assert eof, "%s: no EOF within %.1f s; got %r" % (what, limit, data[:200])
        if expect == Expect.TIMEOUT:
            assert data == b"", "%s: got %r" % (what, data[:200])
            elapsed = t_eof - c.t_connect
            assert T <= elapsed <= T + 2, "%s: closed %.2f s after connect, expected %d..%d s" \
                % (what, elapsed, T, T + 2)
        elif expect == Expect.PROMPT_EOF:
            assert data == b"", "%s: got %r" % (what, data[:200])
            assert t_eof - t_sent < 1.5, "%s: took %.2f s" % (what, t_eof - t_sent)
        else:
            # only heartbeats may arrive, and no Connection.Close
            r = RawClient.__new__(RawClient)
            r.buf, r.pending = bytearray(data), []
            while r.buf:
                f = r.read_frame(timeout=0.01)
                assert f.type == FRAME_HEARTBEAT, "%s: got %r" % (what, f)
            lo, hi = expect
            assert lo <= t_eof - t_sent <= hi, "%s: closed %.2f s after the bad input" % (what, t_eof - t_sent)
        return
    res = read_until_close(c, timeout=ANSWER_TIMEOUT)
    if expect == Expect.EOF:
        assert res.code is None and res.eof, "%s: got %r" % (what, res)
        assert all(f.type == FRAME_HEARTBEAT or is_method(f, CONNECTION_START, 0) for f in res.frames), \
            "%s: got %r" % (what, res)
        return
    assert res.code == expect, "%s: got %r" % (what, res)
    assert res.eof, "%s: the socket was not closed after CloseOk: %r" % (what, res)
    assert not any(is_method(f, CHANNEL_OPEN_OK, 11) or is_method(f, CHANNEL_OPEN_OK, 65535)
                   for f in res.frames), res


def roundtrip_fresh_client(p, what):
    n = p.connect()
    try:
        ch = n.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        body = b"after " + what.encode()
        ch.basic_publish("", q, body)
        m, _p, got = ch.basic_get(q, auto_ack=True)
        assert got == body, "a fresh client after %s: got %r" % (what, got)
        ch.queue_delete(q)
    finally:
        n.close()


@pytest.mark.parametrize("name", list(CASE_BY_NAME))
def test_malformed_input(start_proxy, canary, name):
    case = CASE_BY_NAME[name]
    expect = expected_for(case)
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    if not p.direct:
        metric(p, "amqproxy_client_connections")  # the HTTP thread is warm: VmPeak baseline
        mem0 = vm_status(p)
    c = client_in_phase(p, case.phase, case.handshake)
    try:
        t_sent = time.monotonic()
        case.send(c)
        check_answer(c, case, expect, t_sent)
    finally:
        c.close()
    if not p.direct:
        assert p.proc.poll() is None, "the proxy exited (%s)\n%s" % (p.proc.returncode, p.log_tail())
        mem1 = vm_status(p)
        # nothing allocates what a frame header declares (4 GiB, 2 GiB)
        assert mem1["VmPeak"] - mem0["VmPeak"] < 256 * 1024, (mem0, mem1)
        assert mem1["VmHWM"] - mem0["VmHWM"] < 32 * 1024, (mem0, mem1)
        wait_gauges(p, clients=1, channels=1)  # only the canary is left
    roundtrip_fresh_client(p, name)
    can.finish(t0)


# ================================================================ 65,535 channel opens

@pytest.mark.proxy_only  # RabbitMQ 3.10 does not enforce channel numbers above channel_max
@pytest.mark.timeout_s(120)
@pytest.mark.parametrize("channel_max", [100, 0], ids=["client-chose-100", "proxy-offer-2047"])
def test_65535_pipelined_channel_opens(start_proxy, canary, broker, channel_max):
    """Channel.Open for channels 1..N (N = negotiated channel_max) pipelined
    all open; then Channel.Open for N+1..65535 pipelined in one go: the first
    is 530 NOT_ALLOWED (as RabbitMQ answers a channel over channel_max), the
    rest are ignored, no other OpenOk arrives, every channel of the client is
    released, and the canary's upstream connection is untouched."""
    # -t 1: with 2047 client channels the pool needs a second upstream
    # connection (the broker's channel_max is 2047 and the canary holds one);
    # it closes once idle, and only the canary's connection is left
    p = start_proxy("--workers", "1", "-t", "1", "--handshake-timeout", str(HANDSHAKE_TIMEOUT))
    can = canary(p)
    t0 = time.monotonic()
    c = RawClient(p.host, p.port, timeout=60)
    c.handshake(USER, PASSWORD, frame_max=131072, channel_max=channel_max)
    n = channel_max or c.tune[0]
    assert n == (channel_max or 2047), c.tune
    c.send(b"".join(method_frame(ch, CHANNEL_OPEN, shortstr("")) for ch in range(1, n + 1)))
    opened = set()
    deadline = time.monotonic() + 60
    while len(opened) < n:
        f = c.read_frame(timeout=max(0.0, deadline - time.monotonic()))
        if f.type == FRAME_HEARTBEAT:
            continue
        assert is_method(f, CHANNEL_OPEN_OK), "while opening %d channels: %r" % (n, f)
        assert f.channel not in opened, f
        opened.add(f.channel)
    assert opened == set(range(1, n + 1))
    wait_gauges(p, clients=2, channels=n + 1)

    rest = b"".join(method_frame(ch, CHANNEL_OPEN, shortstr("")) for ch in range(n + 1, 65536))
    sender = threading.Thread(target=send_ignoring_close, args=(c, rest), daemon=True)
    sender.start()
    res = read_until_close(c, timeout=30)
    sender.join(30)
    c.close()
    assert res.code == 530, "channel %d over channel_max %d: %r" % (n + 1, n, res)
    assert "channel %d" % (n + 1) in res.text, res.text
    assert res.eof, res
    late = [f for f in res.frames if is_method(f, CHANNEL_OPEN_OK)]
    assert not late, "OpenOk after channel_max: %r" % late[:5]
    wait_gauges(p, clients=1, channels=1, timeout=20)
    # the broker lists the canary's connection alone again (a second one, if
    # opened for the client's channels, closed when idle)
    broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, timeout=30,
                      desc="only the canary's upstream connection")
    roundtrip_fresh_client(p, "65535 channel opens")
    can.finish(t0)


# ================================================================ no partial message upstream

@pytest.mark.parametrize("cut", ["in-method", "in-header", "in-body", "between-bodies"])
def test_truncated_publish_then_eof_delivers_nothing(start_proxy, canary, cut):
    """A client that dies mid-publish (truncated frame, then EOF) leaves
    nothing on the shared connection: the queue stays empty, and the next
    publish on the same upstream connection arrives whole."""
    p = start_proxy(*PROXY_FLAGS)
    can = canary(p)
    t0 = time.monotonic()
    q = unique()
    setup = p.connect()
    sch = setup.channel()
    sch.queue_declare(q, arguments={"x-expires": 60000})
    c = RawClient(p.host, p.port)
    c.handshake(USER, PASSWORD, frame_max=4096)
    c.channel_open(1)
    body = bytes(range(256)) * 40  # 10240 octets: 3 body frames at frame_max 4096
    data = c.publish_frames(1, "", q, body, c.frame_max)
    method_len = len(publish_to(1, q))
    header_len = len(content_header_frame(1, len(body)))
    cut_at = {"in-method": method_len - 3,
              "in-header": method_len + 10,
              "in-body": method_len + header_len + 100,
              "between-bodies": method_len + header_len + 4096}[cut]
    c.send(data[:cut_at])
    half_close(c)
    got, eof, waited = read_raw_until_eof(c, 5)
    c.close()
    assert eof and got == b"", (got[:100], eof)
    if not p.direct:
        wait_gauges(p, clients=2, channels=2)  # the canary and the setup client
    # the setup client publishes on the same upstream connection: whole, alone
    sch.confirm_delivery()
    sch.basic_publish("", q, b"whole", mandatory=True)
    m, _props, got = sch.basic_get(q, auto_ack=True)
    assert got == b"whole", "expected only the setup client's message, got %r" % (got[:100],)
    assert m.message_count == 0, "a message from the dead client reached the queue"
    sch.queue_delete(q)
    setup.close()
    can.finish(t0)

