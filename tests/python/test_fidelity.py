"""Protocol fidelity through the proxy: every message byte-exact, every
reply where the client expects it."""

import datetime
import decimal
import hashlib
import os
import random
import struct
import time

import pika
import pytest

import rawamqp
from broker import wait_for
from conftest import USER, PASSWORD, unique

PROP_FIELDS = ["content_type", "content_encoding", "headers", "delivery_mode", "priority",
               "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
               "type", "user_id", "app_id", "cluster_id"]


def rich_properties(**override):
    headers = {
        "str": "text ü ✓", "int": 42, "neg": -7, "big": 2 ** 40, "true": True, "false": False,
        "none": None, "list": [1, "a", {"x": 1}], "nested": {"deep": {"deeper": "v"}},
        "bytes": b"\x00\xff\x01", "decimal": decimal.Decimal("3.14"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
    }
    kw = dict(content_type="application/octet-stream", content_encoding="identity",
              headers=headers, delivery_mode=2, priority=5, correlation_id="corr-1",
              reply_to="reply-q", expiration="600000", message_id="msg-1",
              timestamp=1700000000, type="test.type", user_id=USER, app_id="amqproxy-tests")
    kw.update(override)
    return pika.BasicProperties(**kw)


def assert_props_equal(got, want):
    for f in PROP_FIELDS:
        assert getattr(got, f) == getattr(want, f), "property %s: got %r want %r" % (
            f, getattr(got, f), getattr(want, f))


def assert_body_equal(got, want):
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise AssertionError("body differs: got %d bytes (sha256 %s), want %d bytes (sha256 %s); first difference at offset %d"
                         % (len(got), hashlib.sha256(got).hexdigest()[:16], len(want),
                            hashlib.sha256(want).hexdigest()[:16], first))


def drain_until(conn, pred, timeout, desc):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, desc))
        conn.process_data_events(time_limit=0.05)


def declare(ch, name=None):
    name = name or unique()
    ch.queue_declare(name, arguments={"x-expires": 120000})
    return name


# ------------------------------------------------------------------ publish / get

def test_publish_get_with_properties(conn, queue):
    ch = conn.channel()
    props = rich_properties()
    body = os.urandom(1000)
    ch.basic_publish("", queue, body, props)
    method, got_props, got = ch.basic_get(queue, auto_ack=False)
    assert method is not None
    assert method.routing_key == queue and method.exchange == "" and not method.redelivered
    assert method.message_count == 0
    assert_body_equal(got, body)
    assert_props_equal(got_props, props)
    ch.basic_ack(method.delivery_tag)
    assert ch.basic_get(queue)[0] is None


def test_basic_get_empty(conn, queue):
    ch = conn.channel()
    assert ch.basic_get(queue, auto_ack=True) == (None, None, None)


def test_get_message_count_and_order(conn, queue):
    ch = conn.channel()
    for i in range(20):
        ch.basic_publish("", queue, b"m%02d" % i)
    for i in range(20):
        m, _p, body = ch.basic_get(queue, auto_ack=True)
        assert body == b"m%02d" % i
        assert m.message_count == 19 - i


def test_raw_properties_bytes_and_channel_numbers_preserved(proxy):
    """The content header's property bytes come back exactly as sent, and
    replies arrive on the client's own (non-1) channel number."""
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        c.handshake(USER, PASSWORD)
        chan = 7
        c.channel_open(chan)
        q = unique()
        c.queue_declare(chan, q, arguments={"x-expires": 60000})
        flags, props = rawamqp.encode_properties(
            content_type="text/plain", headers={"a": "b", "n": 5, "t": True, "tbl": {"x": "y"}},
            delivery_mode=1, correlation_id="c", message_id="m", timestamp=123456789, app_id="raw")
        body = os.urandom(5000)
        c.publish(chan, "", q, body, properties=(flags, props))
        got = c.basic_get(chan, q)
        assert got is not None
        assert all(f.channel == chan for f in got["frames"]), got["frames"]
        assert got["properties_bytes"] == struct.pack(">H", flags) + props
        assert_body_equal(got["body"], body)
        c.connection_close()
    finally:
        c.close()


# ------------------------------------------------------------------ consume

def test_consume_prefetch_ack_nack_reject(conn, queue):
    ch = conn.channel()
    n = 30
    for i in range(n):
        ch.basic_publish("", queue, b"msg-%02d" % i)
    ch.basic_qos(prefetch_count=10)
    deliveries = []
    ctag = ch.basic_consume(queue, lambda _c, m, p, b: deliveries.append((m, b)))

    drain_until(conn, lambda: len(deliveries) >= 10, 10, "10 deliveries")
    # the prefetch bounds what is outstanding: nothing more may come unacked
    conn.process_data_events(time_limit=0.5)
    assert len(deliveries) == 10, "prefetch 10 exceeded: %d unacked deliveries" % len(deliveries)
    tags = [m.delivery_tag for m, _ in deliveries]
    assert tags == list(range(1, 11)), tags
    assert [b for _, b in deliveries] == [b"msg-%02d" % i for i in range(10)]

    # ack the first 5 with multiple=True -> exactly 5 more arrive
    ch.basic_ack(deliveries[4][0].delivery_tag, multiple=True)
    drain_until(conn, lambda: len(deliveries) >= 15, 10, "15 deliveries")
    conn.process_data_events(time_limit=0.3)
    assert len(deliveries) == 15

    # nack(requeue) msg-05 -> redelivered later; reject(no requeue) msg-06 -> gone
    nacked = deliveries[5]
    rejected = deliveries[6]
    assert nacked[1] == b"msg-05" and rejected[1] == b"msg-06"
    ch.basic_nack(nacked[0].delivery_tag, requeue=True)
    ch.basic_reject(rejected[0].delivery_tag, requeue=False)
    acked = {b for _, b in deliveries[:5]}
    for m, b in deliveries[7:]:
        ch.basic_ack(m.delivery_tag)
        acked.add(b)
    handled = len(deliveries)

    def ack_new():
        nonlocal handled
        while handled < len(deliveries):
            m, b = deliveries[handled]
            handled += 1
            ch.basic_ack(m.delivery_tag)
            acked.add(b)
        return len(acked) == n - 1

    drain_until(conn, ack_new, 20, "all messages except the rejected one acked")
    redelivered = [(m, b) for m, b in deliveries if m.redelivered]
    assert [b for _, b in redelivered] == [b"msg-05"], redelivered
    assert b"msg-06" not in acked
    assert acked == {b"msg-%02d" % i for i in range(n)} - {b"msg-06"}
    tags = [m.delivery_tag for m, _ in deliveries]
    assert tags == list(range(1, len(deliveries) + 1)), "delivery tags not 1..n per channel: %r" % tags
    ch.basic_cancel(ctag)
    assert ch.queue_declare(queue, passive=True).method.message_count == 0


def test_consume_multiple_consumers_on_channels(conn):
    """Two channels consuming from two queues; deliveries go to the right one."""
    ch1, ch2 = conn.channel(), conn.channel()
    q1, q2 = declare(ch1), declare(ch2)
    got = {q1: [], q2: []}
    ch1.basic_consume(q1, lambda c, m, p, b: (got[q1].append((c.channel_number, b)), c.basic_ack(m.delivery_tag)))
    ch2.basic_consume(q2, lambda c, m, p, b: (got[q2].append((c.channel_number, b)), c.basic_ack(m.delivery_tag)))
    pub = conn.channel()
    for i in range(10):
        pub.basic_publish("", q1, b"one-%d" % i)
        pub.basic_publish("", q2, b"two-%d" % i)
    drain_until(conn, lambda: len(got[q1]) == 10 and len(got[q2]) == 10, 10, "20 deliveries")
    assert got[q1] == [(ch1.channel_number, b"one-%d" % i) for i in range(10)]
    assert got[q2] == [(ch2.channel_number, b"two-%d" % i) for i in range(10)]
    for q in (q1, q2):
        pub.queue_delete(q)


# ------------------------------------------------------------------ confirms, tx

@pytest.mark.timeout_s(180)
def test_publisher_confirms_many(conn, queue):
    ch = conn.channel()
    ch.confirm_delivery()
    n = 1000
    for i in range(n):
        # raises NackError / UnroutableError if not positively confirmed
        ch.basic_publish("", queue, b"confirmed-%d" % i, mandatory=True)
    assert ch.queue_declare(queue, passive=True).method.message_count == n


def test_publisher_confirms_pipelined_raw(proxy):
    """500 publishes in one write; the acks cover delivery tags 1..500 exactly."""
    c = rawamqp.RawClient(proxy.host, proxy.port, timeout=30)
    try:
        c.handshake(USER, PASSWORD)
        c.channel_open(3)
        q = unique()
        c.queue_declare(3, q, arguments={"x-expires": 60000})
        c.confirm_select(3)
        n = 500
        c.send(b"".join(c.publish_frames(3, "", q, b"p%d" % i, c.frame_max) for i in range(n)))
        confirmed = 0
        deadline = time.monotonic() + 30
        while confirmed < n:
            f = c.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            if f.type == rawamqp.FRAME_HEARTBEAT:
                continue
            assert f.type == rawamqp.FRAME_METHOD and f.channel == 3, f
            assert f.method == rawamqp.BASIC_ACK, "expected Basic.Ack, got %r" % (f,)
            r = f.args()
            tag = r.unpack(">Q")
            multiple = r.unpack(">B") & 1
            assert tag > confirmed, "ack for tag %d after %d confirmed" % (tag, confirmed)
            assert tag <= n
            if not multiple:
                assert tag == confirmed + 1, "single ack %d skips %d" % (tag, confirmed + 1)
            confirmed = tag
        assert c.queue_declare(3, q, passive=True)[1] == n
        c.connection_close()
    finally:
        c.close()


def test_transactions_commit_and_rollback(conn, queue):
    ch = conn.channel()
    ch.tx_select()
    for i in range(3):
        ch.basic_publish("", queue, b"committed-%d" % i)
    ch.tx_commit()
    for i in range(2):
        ch.basic_publish("", queue, b"rolled-back-%d" % i)
    ch.tx_rollback()
    ch.basic_publish("", queue, b"committed-3")
    ch.tx_commit()
    reader = conn.channel()
    bodies = []
    while True:
        m, _p, b = reader.basic_get(queue, auto_ack=True)
        if m is None:
            break
        bodies.append(b)
    assert bodies == [b"committed-%d" % i for i in range(4)]


def test_transaction_ack_rollback(conn, queue):
    """An ack inside a rolled-back transaction is undone."""
    pub = conn.channel()
    pub.basic_publish("", queue, b"tx-ack")
    ch = conn.channel()
    ch.tx_select()
    m, _p, b = ch.basic_get(queue, auto_ack=False)
    assert b == b"tx-ack"
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    ch.close()  # unacked -> requeued
    m, _p, b = pub.basic_get(queue, auto_ack=True)
    assert b == b"tx-ack" and m.redelivered


# ------------------------------------------------------------------ mandatory / return

def test_mandatory_unroutable_with_confirms_raises(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as ei:
        ch.basic_publish("", unique("no-such-queue"), b"nowhere", mandatory=True)
    returned = ei.value.messages
    assert len(returned) == 1 and returned[0].body == b"nowhere"
    assert returned[0].method.reply_code == 312  # NO_ROUTE
    # the channel is still usable afterwards
    q = declare(ch)
    ch.basic_publish("", q, b"routable", mandatory=True)
    ch.queue_delete(q)


def test_mandatory_unroutable_basic_return(conn):
    ch = conn.channel()
    returns = []
    ch.add_on_return_callback(lambda c, m, p, b: returns.append((m, p, b)))
    key = unique("no-such-queue")
    props = rich_properties()
    body = os.urandom(3000)
    ch.basic_publish("", key, body, props, mandatory=True)
    drain_until(conn, lambda: returns, 10, "Basic.Return")
    m, p, b = returns[0]
    assert m.reply_code == 312 and m.reply_text == "NO_ROUTE"
    assert m.exchange == "" and m.routing_key == key
    assert_body_equal(b, body)
    assert_props_equal(p, props)
    # non-mandatory unroutable is silently dropped: no return
    ch.basic_publish("", key, b"dropped", mandatory=False)
    conn.process_data_events(time_limit=0.3)
    assert len(returns) == 1


# ------------------------------------------------------------------ topology

def test_exchange_queue_topology(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ex = unique("ex")
    q = declare(ch)
    ch.exchange_declare(ex, exchange_type="topic", auto_delete=False)
    ch.queue_bind(q, ex, routing_key="a.*")
    ch.basic_publish(ex, "a.b", b"routed", mandatory=True)
    m, _p, b = ch.basic_get(q, auto_ack=True)
    assert b == b"routed" and m.exchange == ex and m.routing_key == "a.b"
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(ex, "x.y", b"not routed", mandatory=True)

    # exchange-to-exchange binding
    ex2 = unique("ex2")
    ch.exchange_declare(ex2, exchange_type="fanout")
    ch.exchange_bind(destination=ex, source=ex2)
    ch.basic_publish(ex2, "a.z", b"via e2e", mandatory=True)
    assert ch.basic_get(q, auto_ack=True)[2] == b"via e2e"
    ch.exchange_unbind(destination=ex, source=ex2)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(ex2, "a.z", b"unbound e2e", mandatory=True)

    # unbind the queue: no longer routed
    ch.queue_unbind(q, ex, routing_key="a.*")
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(ex, "a.b", b"after unbind", mandatory=True)

    # headers exchange
    exh = unique("exh")
    ch.exchange_declare(exh, exchange_type="headers")
    ch.queue_bind(q, exh, arguments={"x-match": "all", "k": "v"})
    ch.basic_publish(exh, "", b"hdr", pika.BasicProperties(headers={"k": "v"}), mandatory=True)
    assert ch.basic_get(q, auto_ack=True)[2] == b"hdr"

    # purge and delete report counts
    for i in range(3):
        ch.basic_publish("", q, b"p%d" % i)
    assert ch.queue_purge(q).method.message_count == 3
    ch.basic_publish("", q, b"left")
    assert ch.queue_delete(q).method.message_count == 1
    for e in (ex, ex2, exh):
        ch.exchange_delete(e)
    # the deleted exchange is really gone: a passive declare closes the channel with 404
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.exchange_declare(ex, passive=True)
    assert ei.value.reply_code == 404
    # the connection survives a channel error; a new channel works
    ch2 = conn.channel()
    q2 = declare(ch2)
    ch2.basic_publish("", q2, b"still fine")
    assert ch2.basic_get(q2, auto_ack=True)[2] == b"still fine"
    ch2.queue_delete(q2)


def test_channel_error_then_reopen_same_number(conn):
    """A channel closed by the broker (404) can be reopened with the same
    number and works normally."""
    ch = conn.channel()
    number = ch.channel_number
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.queue_declare(unique("missing"), passive=True)
    assert ei.value.reply_code == 404
    ch = conn.channel(channel_number=number)
    q = declare(ch)
    ch.basic_publish("", q, b"reopened")
    assert ch.basic_get(q, auto_ack=True)[2] == b"reopened"
    ch.queue_delete(q)


def test_50_channels_on_one_connection(conn):
    chans = [conn.channel() for _ in range(50)]
    assert len({c.channel_number for c in chans}) == 50
    queues = [declare(c) for c in chans]
    bodies = [os.urandom(random.randint(0, 2000)) + b"#%d" % i for i in range(50)]
    for c, q, b in zip(chans, queues, bodies):
        c.basic_publish("", q, b)
    for c, q, b in reversed(list(zip(chans, queues, bodies))):
        m, _p, got = c.basic_get(q, auto_ack=True)
        assert m is not None, "channel %d: no message" % c.channel_number
        assert_body_equal(got, b)
    for c, q in zip(chans, queues):
        c.queue_delete(q)
        c.close()


# ------------------------------------------------------------------ sizes

@pytest.mark.parametrize("size", [0, 1, 131072 - 8, 131072 - 7, 131072 * 3 + 5, 8 * 1024 * 1024],
                         ids=["0B", "1B", "frame-payload", "frame-payload+1", "3frames+5", "8MiB"])
def test_body_sizes_get_byte_exact(conn, queue, size):
    ch = conn.channel()
    body = os.urandom(size)
    props = rich_properties(headers={"size": size, "sha": hashlib.sha256(body).hexdigest()})
    ch.basic_publish("", queue, body, props)
    m, p, got = ch.basic_get(queue, auto_ack=True)
    assert m is not None
    assert_body_equal(got, body)
    assert_props_equal(p, props)


@pytest.mark.parametrize("size", [0, 8 * 1024 * 1024], ids=["0B", "8MiB"])
def test_body_sizes_consume_byte_exact(conn, queue, size):
    ch = conn.channel()
    body = os.urandom(size)
    props = rich_properties(headers={"size": size})
    ch.basic_publish("", queue, body, props)
    got = []
    ch.basic_consume(queue, lambda c, m, p, b: (got.append((p, b)), c.basic_ack(m.delivery_tag)))
    drain_until(conn, lambda: got, 30, "delivery")
    assert_body_equal(got[0][1], body)
    assert_props_equal(got[0][0], props)
