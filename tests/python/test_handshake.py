"""Handshake: PLAIN, AMQPLAIN, credentials checked upstream before OpenOk,
broker unreachable, handshake timeout, protocol headers."""

import re
import socket
import time

import pika
import pytest

import rawamqp
from conftest import USER, PASSWORD, closed_port, unique

CAPABILITIES = ["publisher_confirms", "consumer_cancel_notify", "basic.nack",
                "connection.blocked", "authentication_failure_close", "per_consumer_qos",
                "exchange_exchange_bindings", "direct_reply_to", "consumer_priorities"]


def reply_code_of(exc):
    """The AMQP reply code carried by a pika exception (pika wraps the
    broker's Connection.Close in various exception types, depending on the
    handshake stage at which it arrived)."""
    code = getattr(exc, "reply_code", None)
    if code:
        return code
    m = re.search(r"\((\d{3})\)", str(exc))
    return int(m.group(1)) if m else None


def test_plain_publish_get_roundtrip(proxy):
    conn = proxy.connect()
    try:
        ch = conn.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        ch.basic_publish("", q, b"hello through the proxy")
        method, props, body = ch.basic_get(q, auto_ack=True)
        assert method is not None, "message not found"
        assert body == b"hello through the proxy"
        assert method.routing_key == q
        ch.queue_delete(q)
    finally:
        conn.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "AMQPLAIN"])
def test_raw_handshake_mechanisms(proxy, mechanism):
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        c.handshake(USER, PASSWORD, "/", mechanism=mechanism)
        assert "PLAIN" in c.mechanisms and "AMQPLAIN" in c.mechanisms, c.mechanisms
        c.channel_open(1)
        q = unique()
        c.queue_declare(1, q, arguments={"x-expires": 60000})
        c.publish(1, "", q, b"raw " + mechanism.encode())
        got = c.basic_get(1, q)
        assert got is not None and got["body"] == b"raw " + mechanism.encode()
        c.connection_close()
    finally:
        c.close()


def test_start_advertises_broker_capabilities(proxy):
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        c.start()
        assert c.version == (0, 9)
        caps = c.server_properties.get("capabilities") or {}
        missing = [k for k in CAPABILITIES if caps.get(k) is not True]
        assert not missing, "capabilities not advertised: %s (got %r)" % (missing, caps)
        assert "en_US" in c.locales
    finally:
        c.close()


def test_wrong_password_gets_403(proxy):
    t0 = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        proxy.connect(password=PASSWORD + "-wrong")
    assert reply_code_of(ei.value) == 403, repr(ei.value)
    assert "ACCESS_REFUSED" in str(ei.value)
    assert time.monotonic() - t0 < 10


def test_wrong_password_raw_close_before_openok(proxy):
    """The client must see Connection.Close(403) and never an OpenOk."""
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        with pytest.raises(rawamqp.ConnectionClosed) as ei:
            c.handshake(USER, PASSWORD + "-wrong", "/")
        assert ei.value.reply_code == 403
        assert ei.value.reply_text.startswith("ACCESS_REFUSED"), ei.value.reply_text
    finally:
        c.close()


def test_wrong_password_of_a_real_user_not_let_in_by_pooled_connection(proxy, temp_user):
    """An upstream connection for (user, right password) already exists; a
    client with the same user but a wrong password must still be refused."""
    user, password = temp_user()
    good = proxy.connect(user=user, password=password)
    try:
        good.channel()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
            proxy.connect(user=user, password=password + "x")
        assert reply_code_of(ei.value) == 403, repr(ei.value)
        # and a correct login still works
        again = proxy.connect(user=user, password=password)
        ch = again.channel()
        assert ch.is_open
        again.close()
    finally:
        good.close()


def test_wrong_vhost_gets_530(proxy):
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        proxy.connect(vhost="no-such-vhost-" + unique())
    assert reply_code_of(ei.value) == 530, repr(ei.value)
    assert "NOT_ALLOWED" in str(ei.value)


def test_wrong_vhost_raw_close_before_openok(proxy):
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        with pytest.raises(rawamqp.ConnectionClosed) as ei:
            c.handshake(USER, PASSWORD, "no-such-vhost-" + unique())
        assert ei.value.reply_code == 530
    finally:
        c.close()


@pytest.mark.proxy_only
def test_broker_unreachable_gets_connection_close(start_proxy):
    p = start_proxy(upstream="amqp://127.0.0.1:%d" % closed_port())
    # raw: a real Connection.Close frame with a reply text, not a bare reset
    c = rawamqp.RawClient(p.host, p.port)
    t0 = time.monotonic()
    try:
        with pytest.raises(rawamqp.ConnectionClosed) as ei:
            c.handshake(USER, PASSWORD, "/")
        elapsed = time.monotonic() - t0
        assert ei.value.reply_code >= 300, ei.value
        assert ei.value.reply_text.strip(), "Connection.Close without a reply text"
        assert elapsed < 5, "took %.1fs to report an unreachable broker" % elapsed
    finally:
        c.close()
    # pika: fails promptly with the broker-style close, no hang
    t0 = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        p.connect()
    assert time.monotonic() - t0 < 5
    assert reply_code_of(ei.value) is not None, "pika saw no Connection.Close: %r" % ei.value
    # the proxy itself is still alive and accepting
    assert p.proc.poll() is None


def _connect_and_wait_closed(p, send=b""):
    s = socket.create_connection((p.host, p.port), timeout=10)
    t0 = time.monotonic()
    frames = []
    try:
        if send:
            s.sendall(send)
        s.settimeout(10)
        buf = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError("proxy did not close an idle handshake within 10 s")
            if not data:
                break
            buf += data
        return time.monotonic() - t0, buf
    finally:
        s.close()


@pytest.mark.proxy_only
@pytest.mark.parametrize("send", [b"", rawamqp.PROTOCOL_HEADER], ids=["nothing", "header-only"])
def test_handshake_timeout(start_proxy, send):
    p = start_proxy("--handshake-timeout", "2")
    elapsed, received = _connect_and_wait_closed(p, send)
    assert 1.5 <= elapsed <= 5, "closed after %.2fs, expected ~2s" % elapsed
    if send:
        # it did answer the header with Connection.Start before giving up
        assert received[:1] == b"\x01" and received[7:11] == b"\x00\x0a\x00\x0a", received[:16]
    # the proxy is fine afterwards
    c = p.connect()
    c.channel()
    c.close()


@pytest.mark.proxy_only
def test_handshake_timeout_after_start_ok(start_proxy):
    """A client that stops after StartOk (never sends TuneOk/Open) is closed too."""
    p = start_proxy("--handshake-timeout", "2")
    c = rawamqp.RawClient(p.host, p.port)
    try:
        c.start()
        c.send(rawamqp.method_frame(0, rawamqp.CONNECTION_START_OK,
                                    rawamqp.table({}) + rawamqp.shortstr("PLAIN")
                                    + rawamqp.longstr(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
                                    + rawamqp.shortstr("en_US")))
        t0 = time.monotonic()
        try:
            c.wait_eof(timeout=10)
        except socket.timeout:
            pytest.fail("the proxy kept a client that stopped after StartOk for 10 s")
        elapsed = time.monotonic() - t0
        assert elapsed <= 5, "closed after %.2fs, expected within ~2s" % elapsed
    finally:
        c.close()


def test_garbage_protocol_header_answered_with_0_9_1_header(proxy):
    s = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while True:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                break
            if not data:
                break
            buf += data
        assert buf == rawamqp.PROTOCOL_HEADER, buf
    finally:
        s.close()


def test_protocol_0_9_header_accepted(proxy):
    c = rawamqp.RawClient(proxy.host, proxy.port)
    try:
        c.start(header=rawamqp.PROTOCOL_HEADER_0_9)
        assert "PLAIN" in c.mechanisms
    finally:
        c.close()
