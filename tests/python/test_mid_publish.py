"""A client that dies in the middle of a publish (method + content header,
then no body or only part of it) must leave nothing on the shared upstream
connection: other clients on it carry on, and no partial message appears."""

import os
import time

import pytest

import rawamqp
from conftest import DIRECT, USER, PASSWORD, unique


def roundtrip(ch, q, body):
    ch.basic_publish("", q, body)
    m, _p, got = ch.basic_get(q, auto_ack=True)
    assert m is not None, "published message not in the queue"
    assert got == body
    return m


@pytest.mark.parametrize("body_sent", [0, 50], ids=["header-no-body", "half-body"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_dies_mid_publish(start_proxy, broker, body_sent, how):
    p = start_proxy("--workers", "1", "-t", "60")
    q = unique()
    survivor = p.connect()
    sch = survivor.channel()
    sch.queue_declare(q, arguments={"x-expires": 60000})
    roundtrip(sch, q, b"before")

    if not DIRECT:
        before = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, desc="1 upstream connection")

    # the raw client shares the upstream connection (same credentials, one worker)
    raw = rawamqp.RawClient(p.host, p.port)
    raw.handshake(USER, PASSWORD)
    raw.channel_open(1)
    raw.send(rawamqp.method_frame(1, rawamqp.BASIC_PUBLISH, b"\x00\x00" + rawamqp.shortstr("")
                                  + rawamqp.shortstr(q) + b"\x00")
             + rawamqp.content_header_frame(1, 100))
    if body_sent:
        raw.send(rawamqp.frame(rawamqp.FRAME_BODY, 1, b"x" * body_sent))
    # make sure the proxy has read all of it before the client goes away: a
    # synchronous request on another channel of the same client is answered
    # only after the proxy handled the frames sent before it
    raw.channel_open(2)
    if how == "reset":
        raw.abort()
    else:
        raw.close()

    # The survivor (and a newcomer) keep working on the same upstream
    # connection. A partial content sequence left upstream would make the
    # broker close that connection (UNEXPECTED_FRAME) as soon as the proxy
    # closes or reuses the dead client's channel, so keep using it for a while.
    newcomer = p.connect()
    nch = newcomer.channel()
    deadline = time.monotonic() + 3
    i = 0
    while time.monotonic() < deadline:
        roundtrip(sch, q, b"after-%d" % i)
        roundtrip(nch, q, os.urandom(200))
        survivor.process_data_events(time_limit=0.05)
        i += 1
    assert survivor.is_open and newcomer.is_open

    # nothing partial (nor anything else) was left in the queue
    sch.basic_publish("", q, b"last")
    m, _p, body = sch.basic_get(q, auto_ack=True)
    assert body == b"last", "unexpected message in the queue: %r" % body[:120]
    assert m.message_count == 0
    assert sch.basic_get(q, auto_ack=True)[0] is None

    if not DIRECT:
        after = broker.named(p.upstream_prefix())  # rabbitmqctl: live, no lag
        assert [c["name"] for c in after] == [c["name"] for c in before], \
            "upstream connection replaced: before %r after %r" % (before, after)
    sch.queue_delete(q)
    newcomer.close()
    survivor.close()
