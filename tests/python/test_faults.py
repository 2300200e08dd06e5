"""Faults upstream (issue item 4): the connection between the proxy and the
broker breaks in the ways networks and brokers break it, with the fault put
in by faultrelay.FaultRelay between the proxy and the real broker (or, for
the broker closing a connection, by the broker itself).

Every scenario checks four things:
  * the clients with a channel on the broken upstream connection get a
    Connection.Close with the right code, naming the cause, within a bound
    measured from the moment the fault took effect;
  * the clients of another pool of the same proxy, whose upstream connection
    runs through the same relay, notice nothing (a Canary doing round trips
    all along, on the same upstream connection before and after);
  * the proxy recovers: after the fault is cleared the next client of the
    faulted pool publishes and gets its message;
  * nothing leaks: the /metrics gauges (client connections and channels,
    upstream connections and busy/idle channels), the proxy's open file
    descriptors and the relay's live links all return to what they were
    before the faulted pool's first client (the proxy runs with -t 2, so
    the faulted pool's idle upstream connection goes away by itself), and
    the resident memory does not grow by more than a generous margin.

The faulted pool uses a throwaway user; the canary uses the default one.
"""

import os
import threading
import time
import urllib.request

import pika
import pytest

import rawamqp
from broker import wait_for
from conftest import BROKER_HOST, BROKER_PORT, PASSWORD, USER, Canary, Watcher, unique
from faultrelay import FaultRelay

pytestmark = pytest.mark.proxy_only

IDLE = 2                            # -t: the faulted pool's idle upstream closes after this
FLAGS = ("--workers", "1", "-t", str(IDLE))
HEARTBEAT = 1                       # upstream heartbeat the relay makes the proxy use in (b)
CONNECT_TIMEOUT = 2                 # --upstream-connect-timeout in (d)
CLOSE_BOUND = 2.0                   # a Close for an observable fault arrives within this
RSS_SLACK = 64 << 20                # resident memory growth allowed over a test
GAUGES = ("amqproxy_client_connections", "amqproxy_client_channels",
          "amqproxy_upstream_connections", "amqproxy_upstream_channels",
          "amqproxy_idle_channels")


def report(what, **values):
    """Measured numbers, for `pytest -s` (and the record)."""
    print("\nMEASURED %s: %s" % (what, ", ".join("%s=%s" % kv for kv in values.items())))


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def relay():
    """Factory: relay() -> FaultRelay to the broker. Request it before
    start_proxy so the proxies stop before their relays do."""
    made = []

    def make():
        r = FaultRelay((BROKER_HOST, BROKER_PORT))
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def admin():
    """A channel straight to the broker, for queues and for looking in them."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        BROKER_HOST, BROKER_PORT, credentials=pika.PlainCredentials(USER, PASSWORD),
        connection_attempts=3, socket_timeout=10))
    ch = conn.channel()
    made = []

    def declare():
        q = unique("faults-q")
        ch.queue_declare(q, arguments={"x-expires": 120000})
        made.append(q)
        return q

    def drain(q):
        bodies = []
        while True:
            m, _p, body = ch.basic_get(q, auto_ack=True)
            if m is None:
                return bodies
            bodies.append(body)

    ch.declare = declare
    ch.drain = drain
    yield ch
    try:
        for q in made:
            ch.queue_delete(q)
        conn.close()
    except Exception:
        pass


class PoolCanary(Canary):
    """The conftest Canary, watching only its own pool's upstream connection
    (the proxy has another pool, the faulted one, beside it)."""

    def _find_upstream(self):
        conns = self.broker.wait_named(self.proxy.pool_name(), lambda l: len(l) == 1,
                                       desc="exactly 1 upstream connection of the canary's pool")
        return conns[0]

    def assert_same_upstream(self):
        now = self.broker.named(self.proxy.pool_name())
        key = lambda c: (c["name"], c["peer_port"])  # noqa: E731
        assert [key(c) for c in now] == [key(self.upstream)], \
            "the canary's upstream connection changed: before %r, now %r" % (self.upstream, now)


@pytest.fixture
def pool_canary(canary):
    def start(proxy, interval=0.1):
        return canary(proxy, interval, cls=PoolCanary)

    return start


# ---------------------------------------------------------------- proxy state

def metrics(p):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % p.http_port, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def proxy_fds(p):
    return len(os.listdir("/proc/%d/fd" % p.proc.pid))


def proxy_rss(p):
    with open("/proc/%d/status" % p.proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def connect_failures(p):
    return metrics(p)["amqproxy_upstream_connect_failures_total"]


def snapshot(p, r=None):
    fds = proxy_fds(p)  # before the /metrics request, whose socket is not to be counted
    m = metrics(p)
    s = {k: m[k] for k in GAUGES}
    s["fds"] = fds
    if r is not None:
        s["relay_live"] = r.live()
    return s


class Baseline:
    """The proxy's state with only the canary connected."""

    def __init__(self, p, r=None):
        self.p, self.r = p, r
        prev = [None]

        def stable():  # the same twice in a row, 0.3 s apart
            cur = snapshot(p, r)
            same = cur == prev[0]
            prev[0] = cur
            return cur if same else None

        self.state = wait_for(stable, timeout=15, interval=0.3, desc="the proxy's gauges and fds to settle")
        self.rss = proxy_rss(p)

    def wait_back(self, timeout=20):
        """Every gauge, the fd count and the relay's live links back to the
        baseline (no fixed sleep: polled), and memory within RSS_SLACK."""
        last = [None]

        def back():
            last[0] = snapshot(self.p, self.r)
            return last[0] == self.state

        try:
            wait_for(back, timeout=timeout, interval=0.2, desc="the proxy back to its baseline")
        except AssertionError:
            raise AssertionError("not back to the baseline within %.0f s:\n  baseline %r\n  now      %r\n"
                                 "  relay links %r\n  proxy fds %r"
                                 % (timeout, self.state, last[0],
                                    self.r.links(live_only=True) if self.r else None,
                                    sorted(os.readlink("/proc/%d/fd/%s" % (self.p.proc.pid, f))
                                           for f in os.listdir("/proc/%d/fd" % self.p.proc.pid))))
        rss = proxy_rss(self.p)
        report("baseline", **self.state, rss_before_kib=self.rss >> 10, rss_after_kib=rss >> 10)
        assert rss - self.rss <= RSS_SLACK, \
            "resident memory grew by %d KiB over the test" % ((rss - self.rss) >> 10)
        assert self.p.proc.poll() is None, "the proxy exited"


# ---------------------------------------------------------------- clients

def roundtrip(conn, q, body=None):
    """Publish (with a confirm) and get back one message on a new channel."""
    body = body if body is not None else os.urandom(64)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", q, body)
    m, _p, got = ch.basic_get(q, auto_ack=True)
    assert m is not None, "the published message is not in the queue"
    assert got == body
    ch.close()
    return m


def assert_closed(watcher, code, since, bound, *texts):
    """The watched pika client got Connection.Close `code` naming the cause
    (every string of texts in reply_text) at most `bound` s after `since`.
    Returns the delay."""
    assert watcher.closed_at is not None, "the client was not closed"
    err = watcher.error
    assert isinstance(err, pika.exceptions.ConnectionClosedByBroker), \
        "the client saw %r instead of a Connection.Close" % (err,)
    assert err.reply_code == code, repr(err)
    for t in texts:
        assert t in err.reply_text, "%r not in reply_text %r" % (t, err.reply_text)
    lag = watcher.closed_at - since
    assert lag <= bound, "the Close came %.2f s after the fault (bound %.1f s)" % (lag, bound)
    return lag


def faulted_link(r, user):
    links = [l for l in r.links(live_only=True) if l["user"] == user]
    assert len(links) == 1, "expected one relay link for %s, have %r" % (user, r.links(live_only=True))
    return links[0]


def recover(p, user, password, q):
    """A new client of the faulted pool works end to end."""
    c = p.connect(user=user, password=password)
    roundtrip(c, q)
    c.close()


# ---------------------------------------------------------------- (a) mid-publish

@pytest.mark.timeout_s(120)
@pytest.mark.parametrize("mode", ["rst", "fin"])
def test_upstream_cut_mid_publish(relay, start_proxy, broker, temp_user, pool_canary, admin, mode):
    """The relay cuts the upstream connection while the body frames of a
    4 MiB publish are on their way to the broker (after 1 MiB of body): the
    publisher (waiting for its confirm) and the other client on that
    connection get 320; the broker keeps no part of the message; the same
    message published again afterwards arrives whole."""
    r = relay()
    p = start_proxy(*FLAGS, upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()

    pub = p.connect(user=user, password=password)
    pch = pub.channel()
    pch.confirm_delivery()
    pch.basic_publish("", q, b"before")          # confirmed: the link is up
    other = p.connect(user=user, password=password)
    other.channel()                              # a channel on the same upstream connection
    link = faulted_link(r, user)

    trig = r.arm_mid_publish_cut(1 << 20, routing_key=q, mode=mode)
    watcher = Watcher(other)
    watcher.start()
    body = os.urandom(4 << 20)
    res = {}

    def publish():
        try:
            pch.basic_publish("", q, body)
            res["confirmed"] = time.monotonic()
        except Exception as e:
            res["error"], res["at"] = e, time.monotonic()

    t0 = time.monotonic()
    th = threading.Thread(target=publish, daemon=True)
    th.start()
    t_cut = trig.wait(20)
    assert trig.link == link["idx"]
    cut_link = r.links()[trig.link]
    assert "mid-publish" in cut_link["how_closed"], cut_link
    # 1 MiB of the body (and the frames before it) was written to the broker,
    # and acknowledged by its TCP stack, before the cut
    assert cut_link["sent"]["up"] >= (1 << 20), cut_link
    th.join(15)
    watcher.join(15)
    watcher.stop.set()
    assert "confirmed" not in res, "the publish was confirmed although the relay cut it short"
    assert "error" in res, "the publisher heard nothing within 15 s of the cut"
    err = res["error"]
    assert isinstance(err, pika.exceptions.ConnectionClosedByBroker), repr(err)
    assert err.reply_code == 320, repr(err)
    assert "upstream connection to 127.0.0.1:%d lost" % r.port in err.reply_text, err.reply_text
    pub_lag = res["at"] - t_cut
    assert pub_lag <= CLOSE_BOUND, "the publisher got the Close %.2f s after the cut" % pub_lag
    other_lag = assert_closed(watcher, 320, t_cut, CLOSE_BOUND, "lost")
    report("mid-publish cut (%s)" % mode, publisher_close_s="%.3f" % pub_lag,
           other_close_s="%.3f" % other_lag, reply_text=repr(err.reply_text))

    # the broker dropped that connection and kept nothing of the message
    broker.wait_named(p.pool_name(user), lambda l: not l, timeout=10,
                      desc="the cut connection gone from the broker")
    assert admin.drain(q) == [b"before"], "the broker holds more than the confirmed message"

    # the same big message through a new upstream connection arrives whole
    c = p.connect(user=user, password=password)
    m = roundtrip(c, q, body)
    assert m.message_count == 0
    c.close()
    assert r.accepted == 3  # the canary's link, the cut one, the new one

    base.wait_back()
    can.finish(t0)


# ---------------------------------------------------------------- cut while idle

@pytest.mark.timeout_s(90)
@pytest.mark.parametrize("mode", ["rst", "fin"])
def test_upstream_cut(relay, start_proxy, temp_user, pool_canary, admin, mode):
    """The upstream connection is reset (or closed with a FIN) under an idle
    client with an open channel: 320 at once; a client of the same pool
    without a channel stays connected and works afterwards."""
    r = relay()
    p = start_proxy(*FLAGS, upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()
    a = p.connect(user=user, password=password)
    roundtrip(a, q)
    a.channel()
    b = p.connect(user=user, password=password)   # no channel: nothing to lose
    faulted_link(r, user)

    watcher = Watcher(a)
    watcher.start()
    t_cut, n = r.cut(mode, user=user)
    assert n == 1
    watcher.join(10)
    watcher.stop.set()
    lag = assert_closed(watcher, 320, t_cut, CLOSE_BOUND, "upstream connection to 127.0.0.1:%d lost" % r.port)
    report("idle cut (%s)" % mode, close_s="%.3f" % lag, reply_text=repr(watcher.error.reply_text))

    b.process_data_events(time_limit=0.2)
    assert b.is_open, "a client with no channel on the cut connection was closed"
    roundtrip(b, q)
    b.close()
    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_cut)


# ---------------------------------------------------------------- (b) black hole

@pytest.mark.timeout_s(120)
def test_blackhole_detected_by_upstream_heartbeat(relay, start_proxy, temp_user, pool_canary, admin):
    """The network path to the broker swallows everything, and nobody sends a
    FIN or RST. With the broker's Tune rewritten to heartbeat 1 s the proxy
    must notice within about two intervals ('missed heartbeats', 320)."""
    r = relay()
    r.rewrite_heartbeat(HEARTBEAT)
    p = start_proxy(*FLAGS, upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()
    a = p.connect(user=user, password=password)
    roundtrip(a, q)
    a.channel()
    b = p.connect(user=user, password=password)   # no channel
    link = faulted_link(r, user)
    assert link["tune"]["heartbeat_forwarded"] == HEARTBEAT, link

    watcher = Watcher(a)
    watcher.start()
    t_fault = r.blackhole(user=user)
    # a client arriving now gets OpenOk (its pool's connection looks fine),
    # and its Channel.Open disappears into the hole
    late = p.connect(user=user, password=password)
    late_res = {}

    def open_channel():
        try:
            late.channel()
            late_res["opened"] = time.monotonic()
        except Exception as e:
            late_res["error"], late_res["at"] = e, time.monotonic()

    th = threading.Thread(target=open_channel, daemon=True)
    th.start()
    watcher.join(15)
    watcher.stop.set()
    th.join(10)
    detect = assert_closed(watcher, 320, t_fault, 3 * HEARTBEAT + 1.5, "missed heartbeats")
    assert "opened" not in late_res, "a channel opened on a black-holed connection"
    assert isinstance(late_res.get("error"), pika.exceptions.ConnectionClosedByBroker), repr(late_res)
    assert late_res["error"].reply_code == 320, repr(late_res["error"])
    assert abs(late_res["at"] - watcher.closed_at) <= 1.0, \
        "the client waiting for a channel was closed %.2f s apart from the other" % (late_res["at"] - watcher.closed_at)
    # the last frame from the broker came at most one interval before the
    # fault, and the proxy waits two intervals of silence
    assert detect >= HEARTBEAT - 0.2, \
        "closed %.2f s after the black hole: too early for heartbeat detection" % detect
    report("black hole", heartbeat_s=HEARTBEAT, detection_s="%.3f" % detect,
           broker_heartbeat_was=link["tune"]["heartbeat"], reply_text=repr(watcher.error.reply_text))

    # the proxy let go of its socket; the broker (which also heard nothing
    # for two intervals) of its own
    r.wait_live(1, timeout=10, desc="the black-holed link closed on both sides")
    r.restore()
    b.process_data_events(time_limit=0.2)
    assert b.is_open, "a client with no channel on the dead connection was closed"
    roundtrip(b, q)
    b.close()
    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_fault)


# ---------------------------------------------------------------- (c) refused

@pytest.mark.timeout_s(90)
@pytest.mark.parametrize("how", ["closed", "reset"])
def test_broker_refuses_connections(relay, start_proxy, temp_user, pool_canary, admin, how):
    """New upstream connections fail (nothing listens: ECONNREFUSED; or the
    connection is reset as soon as it is accepted): clients get a
    Connection.Close 541 naming the broker and the OS error, each failed
    attempt is counted, clients with an upstream connection already open
    are untouched, and once the broker accepts again the next client works."""
    r = relay()
    p = start_proxy(*FLAGS, upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()
    failures0 = connect_failures(p)

    t_fault = r.refuse(how)
    name = "upstream broker 127.0.0.1:%d" % r.port
    # a reset right after the accept may reach the proxy before it has seen
    # its connect complete: "unreachable" or "failed", but the OS error named
    expect = ["unreachable", "connection refused"] if how == "closed" else ["connection reset"]
    lags = []
    for _ in range(2):
        raw = rawamqp.RawClient(p.host, p.port)
        t0 = time.monotonic()
        with pytest.raises(rawamqp.ConnectionClosed) as ei:
            raw.handshake(user, password)
        lags.append(time.monotonic() - t0)
        e = ei.value
        assert e.reply_code == 541, str(e)
        assert e.reply_text.startswith("INTERNAL_ERROR - ") and name in e.reply_text, e.reply_text
        for word in expect:
            assert word in e.reply_text.lower(), e.reply_text
        assert (e.class_id, e.method_id) == rawamqp.CONNECTION_OPEN, str(e)
        raw.wait_eof(5)
        raw.close()
    assert max(lags) <= CLOSE_BOUND, "handshakes took %r s to be refused" % lags
    # pika sees the same Close (it calls it a probable access denial)
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        p.connect(user=user, password=password)
    assert "(541)" in str(ei.value) and name in str(ei.value), str(ei.value)
    n = wait_for(lambda: connect_failures(p) >= failures0 + 3 and connect_failures(p), timeout=5,
                 desc="3 more upstream connect failures counted")
    assert n == failures0 + 3, "counted %d failures for 3 refused connects" % (n - failures0)
    if how == "reset":
        assert r.refused == 3
    report("refused (%s)" % how, close_s=["%.3f" % x for x in lags], reply_text=repr(e.reply_text),
           failures_counted=int(n - failures0))

    r.restore()
    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_fault)


# ---------------------------------------------------------------- broker restart

@pytest.mark.timeout_s(90)
def test_broker_restart(relay, start_proxy, temp_user, pool_canary, admin):
    """The broker goes away (its connections reset, and nothing listens) and
    comes back: the client with a channel gets 320; a connected client with
    no channel then asks for one and gets 541 (no broker to open it on);
    after the broker is back the next client works."""
    r = relay()
    p = start_proxy(*FLAGS, upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()
    a = p.connect(user=user, password=password)
    roundtrip(a, q)
    a.channel()
    b = p.connect(user=user, password=password)   # no channel
    faulted_link(r, user)
    failures0 = connect_failures(p)

    watcher = Watcher(a)
    watcher.start()
    t_fault, n = r.cut("rst", user=user)
    r.refuse("closed")
    watcher.join(10)
    watcher.stop.set()
    lag = assert_closed(watcher, 320, t_fault, CLOSE_BOUND, "lost")

    b.process_data_events(time_limit=0.2)
    assert b.is_open, "a client with no channel on the cut connection was closed"
    t0 = time.monotonic()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
        b.channel()
    b_lag = time.monotonic() - t0
    assert ei.value.reply_code == 541, repr(ei.value)
    assert "unreachable" in ei.value.reply_text and "refused" in ei.value.reply_text, ei.value.reply_text
    assert b_lag <= CLOSE_BOUND, "Channel.Open was refused after %.2f s" % b_lag
    wait_for(lambda: connect_failures(p) == failures0 + 1, timeout=5, desc="one connect failure counted")
    report("broker restart", channel_close_s="%.3f" % lag, channel_open_refused_s="%.3f" % b_lag,
           reply_text=repr(ei.value.reply_text))

    r.restore()
    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_fault)


# ---------------------------------------------------------------- (d) slow connect

@pytest.mark.timeout_s(90)
def test_upstream_connect_timeout(relay, start_proxy, temp_user, pool_canary, admin):
    """The broker's address accepts TCP but nothing ever answers: the clients
    waiting for the pool's connection (two, sharing one connect attempt) get
    541 once --upstream-connect-timeout has passed, the held socket is
    closed, one failure is counted; a broker that is slow (0.5 s) but within
    the timeout is waited for."""
    r = relay()
    p = start_proxy(*FLAGS, "--upstream-connect-timeout", str(CONNECT_TIMEOUT), upstream=r.url)
    can = pool_canary(p)
    base = Baseline(p, r)
    user, password = temp_user()
    q = admin.declare()
    failures0 = connect_failures(p)

    t_fault = r.hold_connects()
    results = []

    def client():
        raw = rawamqp.RawClient(p.host, p.port)
        t0 = time.monotonic()
        try:
            raw.handshake(user, password)
            results.append(("open", time.monotonic() - t0, None))
        except rawamqp.ConnectionClosed as e:
            results.append(("closed", time.monotonic() - t0, e))
        except Exception as e:  # timeout, EOF: recorded as the failure it is
            results.append(("error", time.monotonic() - t0, e))
        finally:
            raw.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CONNECT_TIMEOUT + 15)
    assert len(results) == 2, "clients still waiting %.0f s after the connect timeout: %r" % (15, results)
    for what, took, e in results:
        assert what == "closed", "a client got %s (%r) after %.2f s" % (what, e, took)
        assert e.reply_code == 541, str(e)
        assert "did not complete the connection within %d s" % CONNECT_TIMEOUT in e.reply_text, e.reply_text
        assert "upstream broker 127.0.0.1:%d" % r.port in e.reply_text, e.reply_text
        # the connect starts during the handshake; the proxy checks timers every 100 ms
        assert CONNECT_TIMEOUT - 0.2 <= took <= CONNECT_TIMEOUT + 2.0, \
            "the connect timeout fired after %.2f s (configured %d s)" % (took, CONNECT_TIMEOUT)
    assert r.held == 1, "%d connect attempts for one pool (expected the clients to share one)" % r.held
    r.wait_live(1, timeout=5, desc="the proxy closed the socket it gave up on")
    n = wait_for(lambda: connect_failures(p) > failures0 and connect_failures(p), timeout=5,
                 desc="the connect failure counted")
    assert n == failures0 + 1
    report("connect timeout", configured_s=CONNECT_TIMEOUT,
           close_s=sorted("%.3f" % took for _, took, _ in results), reply_text=repr(results[0][2].reply_text))

    # a broker slow to accept but within the timeout is waited for
    r.restore()
    r.delay_connects(0.5)
    c = p.connect(user=user, password=password)
    roundtrip(c, q)
    c.close()
    r.restore()
    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_fault)


# ---------------------------------------------------------------- (e) broker closes

@pytest.mark.timeout_s(90)
def test_broker_closes_upstream_no_leak(start_proxy, broker, temp_user, pool_canary, admin):
    """rabbitmqctl close_connection on the faulted pool's upstream connection
    (test_upstream_death covers the Close itself): the canary's pool is
    untouched, and the proxy's gauges and fds return to their baseline."""
    p = start_proxy(*FLAGS)
    can = pool_canary(p)
    base = Baseline(p)
    user, password = temp_user()
    q = admin.declare()
    a = p.connect(user=user, password=password)
    roundtrip(a, q)
    a.channel()
    a.channel()
    ups = broker.wait_named(p.pool_name(user), lambda l: len(l) == 1, desc="the faulted pool's upstream")

    watcher = Watcher(a)
    watcher.start()
    t_cmd = time.monotonic()
    broker.close_connection(ups[0], "amqproxy test: faults")
    t_done = time.monotonic()  # the broker closed it somewhere in [t_cmd, t_done]
    watcher.join(10)
    watcher.stop.set()
    lag = assert_closed(watcher, 320, t_done, CLOSE_BOUND, "amqproxy test: faults")
    assert watcher.closed_at >= t_cmd
    report("broker close_connection", close_after_command_returned_s="%.3f" % lag,
           command_took_s="%.3f" % (t_done - t_cmd))

    recover(p, user, password, q)
    base.wait_back()
    can.finish(t_cmd)
