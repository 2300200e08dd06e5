"""Upstream connection sharing: same credentials share, different never do."""

import threading
import time

import pytest

from broker import wait_for
from conftest import DIRECT, USER, unique

N_CLIENTS = 50


class Holder(threading.Thread):
    """A client that connects, opens a channel, publishes one message, and
    holds the connection until released."""

    def __init__(self, proxy, queue, ready, release, errors, **connect_kw):
        super().__init__(daemon=True)
        self.proxy, self.queue = proxy, queue
        self.ready, self.release, self.errors = ready, release, errors
        self.connect_kw = connect_kw

    def run(self):
        conn = None
        try:
            conn = self.proxy.connect(**self.connect_kw)
            ch = conn.channel()
            ch.confirm_delivery()  # in the queue before we report ready
            ch.basic_publish("", self.queue, b"from " + self.name.encode())
            self.ready.append(self)
            while not self.release.is_set():
                conn.process_data_events(time_limit=0.1)
            ch.close()
        except Exception as e:  # reported by the main thread
            self.errors.append((self.name, repr(e)))
        finally:
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except Exception:
                    pass


def hold_clients(proxy, n, queue, **connect_kw):
    ready, errors, release = [], [], threading.Event()
    threads = [Holder(proxy, queue, ready, release, errors, **connect_kw) for _ in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: errors or len(ready) == n, timeout=60, desc="%d clients holding channels" % n)
    assert not errors, errors
    return threads, release, errors


@pytest.mark.timeout_s(180)
def test_50_clients_same_credentials_share_upstream(start_proxy, broker):
    workers = 2
    p = start_proxy("--workers", str(workers))
    q = unique()
    setup = p.connect()
    setup.channel().queue_declare(q, arguments={"x-expires": 120000})
    threads, release, errors = hold_clients(p, N_CLIENTS, q)
    try:
        if not DIRECT:
            # every client got OpenOk and ChannelOpenOk, so every upstream
            # connection and channel the proxy needed exists by now
            ups = broker.wait_named(p.upstream_prefix(),
                                    lambda l: sum(c["channels"] for c in l) >= N_CLIENTS + 1,
                                    desc="%d upstream channels" % (N_CLIENTS + 1))
            assert 1 <= len(ups) <= workers, \
                "expected at most %d upstream connections, got %d: %r" % (workers, len(ups), ups)
            assert all(c["connection_name"] == p.pool_name() for c in ups), ups
            assert all(c["user"] == USER for c in ups), ups
            # each client channel is an upstream channel (+ the setup client's one)
            assert sum(c["channels"] for c in ups) == N_CLIENTS + 1, ups
        ch = setup.channel()
        count = ch.queue_declare(q, passive=True).method.message_count
        assert count == N_CLIENTS
    finally:
        release.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    ch.queue_delete(q)
    setup.close()


def test_different_users_never_share(start_proxy, broker, temp_user):
    p = start_proxy("--workers", "1")
    users = [temp_user(), temp_user()]
    q = unique()
    setup = p.connect()
    setup.channel().queue_declare(q, arguments={"x-expires": 120000})
    conns = []
    try:
        for user, password in users:
            for _ in range(2):
                c = p.connect(user=user, password=password)
                ch = c.channel()
                ch.confirm_delivery()
                ch.basic_publish("", q, user.encode())
                conns.append(c)
        if not DIRECT:
            ups = broker.wait_named(
                p.upstream_prefix(),
                lambda l: all(sum(c["channels"] for c in l if c["user"] == u) >= 2 for u, _ in users),
                desc="2 upstream channels for each user")
            by_user = {}
            for c in ups:
                # the name says which pool; the broker says who authenticated
                assert c["connection_name"] == p.pool_name(c["user"], c["vhost"]), c
                by_user.setdefault(c["user"], []).append(c)
            for user, _ in users:
                assert len(by_user.get(user, [])) == 1, \
                    "user %s: expected exactly 1 upstream connection with --workers 1, got %r" % (user, ups)
                assert by_user[user][0]["channels"] == 2
        ch = setup.channel()
        assert ch.queue_declare(q, passive=True).method.message_count == 4
        bodies = set()
        for _ in range(4):
            m, _props, body = ch.basic_get(q, auto_ack=True)
            assert m is not None
            bodies.add(body)
        assert bodies == {u.encode() for u, _ in users}
    finally:
        for c in conns:
            c.close()
        setup.channel().queue_delete(q)
        setup.close()


def test_different_vhosts_never_share(start_proxy, broker, temp_user):
    p = start_proxy("--workers", "1")
    vhost = unique("amqproxy-vhost")
    broker.add_vhost(vhost)
    conns = []
    try:
        user, password = temp_user("/")
        broker.set_permissions(user, vhost)
        for vh in ("/", vhost):
            c = p.connect(user=user, password=password, vhost=vh)
            ch = c.channel()
            q = unique()
            ch.queue_declare(q, arguments={"x-expires": 60000})
            ch.basic_publish("", q, vh.encode())
            m, _props, body = ch.basic_get(q, auto_ack=True)
            assert body == vh.encode()
            conns.append(c)
        if not DIRECT:
            ups = broker.wait_named(p.upstream_prefix(), lambda l: len(l) >= 2, desc="2 upstream connections")
            vhosts = sorted(c["vhost"] for c in ups)
            assert vhosts == sorted(["/", vhost]), ups
            for c in ups:
                assert c["user"] == user
                assert c["connection_name"] == p.pool_name(user, c["vhost"])
    finally:
        for c in conns:
            c.close()
        broker.delete_vhost(vhost)


@pytest.mark.proxy_only
def test_sequential_clients_reuse_the_pooled_connection(start_proxy, broker):
    """The point of the proxy: short-lived clients (PHP-FPM) one after the
    other use the same upstream connection while it is within its idle timeout."""
    p = start_proxy("--workers", "1", "-t", "60")
    seen = []
    q = unique()
    for i in range(5):
        c = p.connect()
        ch = c.channel()
        ch.confirm_delivery()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        ch.basic_publish("", q, b"%d" % i)
        ups = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, desc="1 upstream connection")
        seen.append(ups[0]["name"])
        c.close()
    assert len(set(seen)) == 1, "upstream connection changed between clients: %r" % seen
    c = p.connect()
    ch = c.channel()
    assert ch.queue_declare(q, passive=True).method.message_count == 5
    ch.queue_delete(q)
    c.close()
