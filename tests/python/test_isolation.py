"""Blast radius (issue 3, items 1, 2, 5, 7, 8, 9, 10): whatever one client does
on the shared upstream connection - channel errors, malformed frames,
well-formed frames RabbitMQ treats as connection errors, touching another
client's exclusive queue, talking on a channel the broker closed, channel
numbers above channel_max, unsolicited or repeated channel closes - only that
client sees the consequence, with the code a direct connection would give.

Every test runs a canary (conftest.Canary): a second pika client with the same
credentials on the same proxy (--workers 1, so on the same upstream
connection) doing a publish + get round trip every 50 ms throughout. At the
end it must have seen no error, kept making progress during the hostile part,
and the broker must still list the very same upstream connection.

With AMQPROXY_TEST_DIRECT=1 the clients talk to RabbitMQ itself: nothing is
shared, so the canary cannot fail there, but the codes the tests expect are
checked against the broker's own (the few places where the proxy is asked for
the spec's code rather than RabbitMQ's are noted in DIRECT_CODES).
"""

import os
import struct
import time

import pika
import pytest

import rawamqp
from rawamqp import (CHANNEL_CLOSE, CHANNEL_CLOSE_OK, CHANNEL_FLOW, CHANNEL_OPEN, FRAME_BODY,
                     QUEUE_DECLARE, RawClient, basic_ack_frame, basic_publish_frame,
                     content_header_frame, frame, method_frame, read_until_close, shortstr, table)
from broker import wait_for
from conftest import DIRECT, PASSWORD, USER, unique

PROXY_FLAGS = ("--workers", "1", "-t", "60")


def start(start_proxy, canary, *flags):
    p = start_proxy(*PROXY_FLAGS, *flags)
    return p, canary(p)


def raw_client(p, frame_max=4096, **kw):
    c = RawClient(p.host, p.port)
    c.handshake(USER, PASSWORD, frame_max=frame_max, **kw)
    return c


def roundtrip(ch, q, body):
    ch.basic_publish("", q, body)
    m, _p, got = ch.basic_get(q, auto_ack=True)
    assert m is not None and got == body, "round trip on %s: got %r" % (q, got)


def upstream_channels(can):
    c = can.upstream_now()
    assert c is not None, "the upstream connection is gone"
    return c["channels"]


def wait_upstream_channels(can, n, timeout=6, desc=""):
    """Poll until the broker lists n channels on the shared upstream connection."""
    return wait_for(lambda: upstream_channels(can) == n, timeout=timeout, interval=0.25,
                    desc="%d channels on the upstream connection %s" % (n, desc))


# ------------------------------------------------------------------ item 1

def test_passive_declare_404_closes_only_that_channel(start_proxy, canary):
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    c = p.connect()
    q = unique()
    for i in range(5):
        ch = c.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.queue_declare(unique("missing"), passive=True)
        assert ei.value.reply_code == 404, repr(ei.value)
        assert ch.is_closed and c.is_open
        # a new channel on the same connection carries on publishing
        ch2 = c.channel()
        ch2.queue_declare(q, arguments={"x-expires": 60000})
        roundtrip(ch2, q, b"after 404 #%d" % i)
        ch2.close()
    ch = c.channel()
    ch.queue_delete(q)
    c.close()
    can.finish(t0)


# ------------------------------------------------------------------ item 2
# Each case: (send(raw), proxy's code, RabbitMQ's own code when it differs).
# None as a code: the socket may just be closed (garbage).

def _bad_frame_end(c):
    c.send(method_frame(1, CHANNEL_OPEN, shortstr(""))[:-1] + b"\x00")


def _frame_too_large(c):
    # declared payload size one above the negotiated frame_max (4096): the
    # size alone is the error, the receiver need not wait for the payload
    c.send(struct.pack(">BHI", rawamqp.FRAME_METHOD, 0, c.frame_max + 1) + b"\x00" * 100)


def _body_without_header(c):
    c.channel_open(1)
    c.send(frame(FRAME_BODY, 1, b"hello"))


def _header_without_publish(c):
    c.channel_open(1)
    c.send(content_header_frame(1, 5))


def _unopened_channel(c):
    c.send(method_frame(5, QUEUE_DECLARE, struct.pack(">H", 0) + shortstr(unique()) + b"\x00" + table({})))


def _channel_opened_twice(c):
    c.channel_open(1)
    c.send(method_frame(1, CHANNEL_OPEN, shortstr("")))


def _publish_on_channel_0(c):
    c.send(basic_publish_frame(0, "", "nowhere") + content_header_frame(0, 1) + frame(FRAME_BODY, 0, b"x"))


def _declare_on_channel_0(c):
    c.send(method_frame(0, QUEUE_DECLARE, struct.pack(">H", 0) + shortstr(unique()) + b"\x00" + table({})))


def _truncated_arguments(c):
    c.channel_open(1)
    c.send(method_frame(1, rawamqp.BASIC_ACK, b"\x00\x00\x00"))  # Basic.Ack needs 9 bytes


def _unknown_method(c):
    c.channel_open(1)
    c.send(method_frame(1, (99, 1), b""))


def _garbage(c):
    c.send(os.urandom(256))


MALFORMED = {
    "bad-frame-end": (_bad_frame_end, 501),
    "frame-over-frame-max": (_frame_too_large, 501),
    "body-without-header": (_body_without_header, 505),
    "header-without-publish": (_header_without_publish, 505),
    "unopened-channel": (_unopened_channel, 504),
    "channel-opened-twice": (_channel_opened_twice, 504),
    "publish-on-channel-0": (_publish_on_channel_0, 504),  # as RabbitMQ answers it
    "declare-on-channel-0": (_declare_on_channel_0, 504),
    "truncated-arguments": (_truncated_arguments, 502),
    "unknown-method": (_unknown_method, 503),
    "garbage": (_garbage, None),
}

# What RabbitMQ 3.10 itself answers where the proxy is asked for the spec's
# code instead (only used with AMQPROXY_TEST_DIRECT=1). "eof": it just closes.
DIRECT_CODES = {
    "publish-on-channel-0": 504,   # "unexpected method in connection state running"
    "declare-on-channel-0": 504,
    "truncated-arguments": 501,    # "FRAME_ERROR - cannot decode"
    "unknown-method": "eof",
}


def assert_closed_with(res, code, what):
    assert res.eof, "%s: the socket was not closed within the deadline; got %r" % (what, res)
    if code is None:  # a Connection.Close with an error code, or just EOF
        assert res.code is None or res.code >= 500, "%s: %r" % (what, res)
    elif code == "eof":
        assert res.code is None, "%s: %r" % (what, res)
    else:
        assert res.code == code, "%s: expected Connection.Close %d, got %r" % (what, code, res)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_closes_only_that_client(start_proxy, canary, case):
    send, code = MALFORMED[case]
    if DIRECT:
        code = DIRECT_CODES.get(case, code)
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    c = raw_client(p)
    send(c)
    res = read_until_close(c, timeout=6)
    c.close()
    assert_closed_with(res, code, case)
    # a well-behaved newcomer on the same pool is fine too
    n = p.connect()
    q = unique()
    ch = n.channel()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    roundtrip(ch, q, b"after " + case.encode())
    ch.queue_delete(q)
    n.close()
    can.finish(t0)


# ------------------------------------------------------------------ item 5

def test_exclusive_queue_locked_to_its_owner(start_proxy, canary, broker):
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    a = p.connect()
    ach = a.channel()
    named = unique("excl")
    ach.queue_declare(named, exclusive=True)
    server_named = ach.queue_declare("", exclusive=True).method.queue
    assert server_named.startswith("amq.gen-"), server_named
    for q in (named, server_named):
        # a binding to remove: RabbitMQ answers an unbind of a binding that does
        # not exist with UnbindOk before looking at the queue's owner
        ach.queue_bind(q, "amq.direct", routing_key=q)

    b = p.connect()
    operations = {
        "declare": lambda ch, q: ch.queue_declare(q),
        "declare-exclusive": lambda ch, q: ch.queue_declare(q, exclusive=True),
        "declare-passive": lambda ch, q: ch.queue_declare(q, passive=True),
        "bind": lambda ch, q: ch.queue_bind(q, "amq.direct", routing_key=q),
        "unbind": lambda ch, q: ch.queue_unbind(q, "amq.direct", routing_key=q),
        "purge": lambda ch, q: ch.queue_purge(q),
        "delete": lambda ch, q: ch.queue_delete(q),
        "consume": lambda ch, q: ch.basic_consume(q, lambda *a: None),
        "get": lambda ch, q: ch.basic_get(q),
    }
    failures = []
    for q in (named, server_named):
        for what, op in operations.items():
            # RabbitMQ refuses a non-passive declare of an amq.* name with 403
            # ACCESS_REFUSED before it looks at the owner: either refusal will do
            codes = (403, 405) if q.startswith("amq.") and what.startswith("declare") \
                and what != "declare-passive" else (405,)
            ch = b.channel()  # a fresh channel of B for each
            try:
                op(ch, q)
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code not in codes:
                    failures.append("%s %s: closed with %d %s" % (what, q, e.reply_code, e.reply_text))
                continue
            failures.append("%s %s: allowed (expected 405 RESOURCE_LOCKED)" % (what, q))
            if ch.is_open:
                ch.close()
    assert b.is_open, "B's connection was closed"
    assert not failures, "\n".join(failures)

    # publishing to it is allowed, as on the broker; the owner gets the message
    bch = b.channel()
    bch.confirm_delivery()
    for q in (named, server_named):
        bch.basic_publish("", q, b"from B to " + q.encode(), mandatory=True)
        m, _p, body = ach.basic_get(q, auto_ack=True)
        assert body == b"from B to " + q.encode(), (q, body)
    # ... and the owner still has full use of them
    for q in (named, server_named):
        ach.queue_unbind(q, "amq.direct", routing_key=q)
        ach.queue_purge(q)

    a.close()
    # gone once its owner is gone, though the upstream connection lives on
    wait_for(lambda: not ({named, server_named} & set(broker.queues())), timeout=10,
             interval=0.3, desc="the exclusive queues deleted after their owner disconnected")
    b.close()
    can.finish(t0)


# ------------------------------------------------------------------ item 7

def test_frames_after_broker_channel_close_are_dropped(start_proxy, canary, broker):
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    setup = p.connect()
    sch = setup.channel()
    target = unique()
    sch.queue_declare(target, arguments={"x-expires": 60000})

    # pika: a bad ack closes only that channel (406); a new channel carries on
    x = p.connect()
    xch = x.channel()
    xch.basic_ack(delivery_tag=999)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        xch.queue_declare(target, passive=True)
    assert ei.value.reply_code == 406, repr(ei.value)
    roundtrip(x.channel(), target, b"pika after 406")

    # raw: the same, but keep talking on the channel before the CloseOk
    r = raw_client(p)
    r.channel_open(1)
    r.send(basic_ack_frame(1, 999))
    f = r.read_frame()
    while f.type == rawamqp.FRAME_HEARTBEAT:
        f = r.read_frame()
    assert rawamqp.is_method(f, CHANNEL_CLOSE, 1), "expected Channel.Close on channel 1, got %r" % f
    assert rawamqp.close_args(f)[0] == 406, rawamqp.close_args(f)
    junk = b"".join(r.publish_frames(1, "", target, b"must not arrive %d" % i, r.frame_max)
                    for i in range(20))
    junk += basic_ack_frame(1, 1) + basic_ack_frame(1, 999, multiple=True)
    junk += method_frame(1, rawamqp.BASIC_GET, struct.pack(">H", 0) + shortstr(target) + b"\x01")
    junk += method_frame(1, QUEUE_DECLARE, struct.pack(">H", 0) + shortstr(target) + b"\x01" + table({}))
    r.send(junk)
    # a synchronous request on another channel: answered only after the proxy
    # handled everything sent before it (and nothing may come back on ch 1)
    r.channel_open(2)
    assert broker.queues().get(target) == 0, "frames sent on a closed channel reached the broker: %r" \
        % broker.queues().get(target)
    m, _p, _b = sch.basic_get(target, auto_ack=True)
    assert m is None, "a message published on a closed channel was delivered"
    # now the CloseOk, and the channel can be opened again
    r.send(method_frame(1, CHANNEL_CLOSE_OK))
    r.channel_open(1)
    r.publish(1, "", target, b"raw after reopen")
    got = r.basic_get(1, target)
    assert got is not None and got["body"] == b"raw after reopen" and got["message_count"] == 0, got
    r.connection_close()

    sch.queue_delete(target)
    setup.close()
    x.close()
    can.finish(t0)


# ------------------------------------------------------------------ item 8

@pytest.mark.proxy_only  # RabbitMQ 3.10 itself does not enforce the client's smaller channel_max
@pytest.mark.parametrize("how", ["client-chose-10", "proxy-offered-20"])
def test_channel_above_channel_max_gets_530(start_proxy, canary, how):
    if how == "client-chose-10":
        p, can = start(start_proxy, canary, "--no-channel-reuse")
        limit, handshake_kw = 10, {"channel_max": 10}
    else:
        p, can = start(start_proxy, canary, "--no-channel-reuse", "--channel-max", "20")
        limit, handshake_kw = 20, {}
    t0 = time.monotonic()
    base = upstream_channels(can)
    c = raw_client(p, **handshake_kw)
    if how == "proxy-offered-20":
        assert c.tune[0] == 20, "proxy offered channel_max %r" % (c.tune,)
    c.channel_open(limit)  # the highest allowed number works
    wait_upstream_channels(can, base + 1, desc="with the raw client's channel %d" % limit)
    c.send(method_frame(limit + 1, CHANNEL_OPEN, shortstr("")))
    res = read_until_close(c, timeout=5)
    c.close()
    assert res.code == 530, "channel %d above channel_max %d: %r" % (limit + 1, limit, res)
    assert res.eof, res
    assert not any(rawamqp.is_method(f, rawamqp.CHANNEL_OPEN_OK) for f in res.frames), res
    # the broker never saw it: the client's channels are all gone, nothing extra
    wait_upstream_channels(can, base, desc="after the client was closed")
    can.finish(t0)


# ------------------------------------------------------------------ item 9

def _pika_exchange_type(p):
    c = p.connect()
    ch = c.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
        ch.exchange_declare(unique("x"), exchange_type="no-such-type")
    assert not c.is_open
    return ei.value.reply_code


def _pika_qos_prefetch_size(p):
    c = p.connect()
    ch = c.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
        ch.basic_qos(prefetch_size=1)
    assert not c.is_open
    return ei.value.reply_code


def _raw_then_close(send):
    def run(p):
        c = raw_client(p)
        c.channel_open(1)
        send(c)
        res = read_until_close(c, timeout=6)
        c.close()
        assert res.eof, res
        return res.code
    return run


def _immediate(c):
    c.send(basic_publish_frame(1, "", unique("nowhere"), immediate=True)
           + content_header_frame(1, 1) + frame(FRAME_BODY, 1, b"x"))


def _flow_false(c):
    c.send(method_frame(1, CHANNEL_FLOW, b"\x00"))


def _oversized_body(c):
    n = c.frame_max + 100  # one body frame of 4196 bytes with frame_max 4096
    c.send(basic_publish_frame(1, "", unique("nowhere")) + content_header_frame(1, n)
           + frame(FRAME_BODY, 1, b"x" * n))


HARD_ERRORS = {
    "unknown-exchange-type": (_pika_exchange_type, 503),
    "qos-prefetch-size": (_pika_qos_prefetch_size, 540),
    "publish-immediate": (_raw_then_close(_immediate), 540),
    "flow-active-false": (_raw_then_close(_flow_false), 540),
    "oversized-body-frame": (_raw_then_close(_oversized_body), 501),
}


@pytest.mark.parametrize("case", list(HARD_ERRORS))
def test_connection_errors_stop_at_the_proxy(start_proxy, canary, case):
    run, code = HARD_ERRORS[case]
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    got = run(p)
    assert got == code, "%s: expected Connection.Close %d, got %r" % (case, code, got)
    can.finish(t0)


# ------------------------------------------------------------------ item 10

REUSE = {"no-reuse": ("--no-channel-reuse",), "reuse": ("--idle-channel-timeout", "1")}


@pytest.mark.proxy_only  # RabbitMQ answers an unsolicited CloseOk with 503 (closes the connection)
@pytest.mark.parametrize("reuse", list(REUSE))
def test_unsolicited_close_ok_leaks_nothing(start_proxy, canary, reuse):
    p, can = start(start_proxy, canary, *REUSE[reuse])
    t0 = time.monotonic()
    base = upstream_channels(can)
    q = unique()
    c = raw_client(p)
    c.channel_open(1)
    c.queue_declare(1, q, arguments={"x-expires": 60000})
    c.send(method_frame(1, CHANNEL_CLOSE_OK))  # nobody asked
    # the channel is still open and works
    for i in range(3):
        c.publish(1, "", q, b"after CloseOk %d" % i)
        got = c.basic_get(1, q)
        assert got is not None and got["body"] == b"after CloseOk %d" % i, got
    c.channel_open(2)
    assert c.basic_get(2, q) is None
    wait_upstream_channels(can, base + 2, desc="(the canary's and the raw client's 2)")
    c.send(method_frame(2, CHANNEL_CLOSE_OK))  # and once more on another channel
    c.channel_open(3)
    c.send(rawamqp.channel_close_frame(3))
    c.expect(CHANNEL_CLOSE_OK, channel=3)
    # (a CloseOk on a channel that is not open is a 504 connection error on
    # RabbitMQ too, so not tried here)
    assert c.basic_get(2, q) is None  # still alive, channel 2 too
    wait_upstream_channels(can, base + 2, desc="(channel 3 closed)")
    c.connection_close()
    wait_upstream_channels(can, base, desc="after the raw client left")
    can.finish(t0)


@pytest.mark.proxy_only  # counts channels on the shared upstream connection
@pytest.mark.parametrize("reuse", list(REUSE))
def test_channel_closed_twice_leaks_nothing(start_proxy, canary, reuse):
    """Channel.Close sent twice before the CloseOk (pipelined). Whatever the
    client is answered (see test_channel_closed_twice_answered_like_rabbitmq),
    no upstream channel may leak and nobody else may notice."""
    p, can = start(start_proxy, canary, *REUSE[reuse])
    t0 = time.monotonic()
    base = upstream_channels(can)
    q = unique()
    c = raw_client(p)
    c.channel_open(1)
    c.queue_declare(1, q, arguments={"x-expires": 60000})
    for i in range(3):
        c.channel_open(2)
        c.publish(2, "", q, b"x")
        c.send(rawamqp.channel_close_frame(2) + rawamqp.channel_close_frame(2))
        frames, eof = rawamqp.drain(c, 0.5)
        if eof or any(rawamqp.is_method(f, rawamqp.CONNECTION_CLOSE) for f in frames):
            c.close()
            break
    else:
        assert c.basic_get(1, q) is not None
        wait_upstream_channels(can, base + 1, desc="(the canary's and the raw client's channel 1)")
        c.connection_close()
    wait_upstream_channels(can, base, desc="after the raw client left")
    can.finish(t0)


def test_channel_closed_twice_answered_like_rabbitmq(start_proxy, canary):
    """RabbitMQ answers a pipelined second Channel.Close with a second CloseOk
    and keeps the connection; a client cannot tell the proxy from it."""
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    c = raw_client(p)
    c.channel_open(2)
    c.send(rawamqp.channel_close_frame(2) + rawamqp.channel_close_frame(2))
    frames, eof = rawamqp.drain(c, 1.0)
    assert not eof, "socket closed after a double Channel.Close: %r" % frames
    closes = [rawamqp.close_args(f) for f in frames if rawamqp.is_method(f, rawamqp.CONNECTION_CLOSE)]
    assert not closes, "Connection.Close after a double Channel.Close: %r" % closes
    close_oks = [f for f in frames if rawamqp.is_method(f, CHANNEL_CLOSE_OK, 2)]
    assert len(close_oks) == 2, "expected 2 Channel.CloseOk, got %r" % frames
    c.channel_open(2)
    c.connection_close()
    can.finish(t0)


# ------------------------------------------------------------------ the canary itself

@pytest.mark.proxy_only
def test_canary_notices_a_lost_upstream(start_proxy, canary, broker):
    """The canary can fail: when the shared upstream connection is closed,
    finish() reports it (errors and/or a changed upstream connection)."""
    p, can = start(start_proxy, canary)
    t0 = time.monotonic()
    broker.close_connection(can.upstream, "amqproxy test: canary self-check")
    wait_for(lambda: can.errors, timeout=10, desc="the canary to see the upstream close")
    with pytest.raises(AssertionError):
        can.finish(t0)
