"""Operations (issue 6): the HTTP endpoints (/healthz, /readyz, /metrics),
the Prometheus metrics moving with real traffic, graceful shutdown on
SIGTERM/SIGINT (and the second signal), and SIGHUP reloading the config file.

Every test starts its own proxy (start_proxy) and talks HTTP to it with real
clients: urllib (no proxy from the environment) and the curl binary, as the
users' cron checks do. Metrics are published by the workers every ~100 ms, so
every check of a number polls with a deadline.
"""

import errno
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pika
import pytest

from broker import wait_for
from conftest import (BROKER_HOST, BROKER_PORT, PROXY_BIN, Proxy, Watcher, closed_port, log_text, unique,
                      wait_log)

pytestmark = pytest.mark.proxy_only

# ---------------------------------------------------------------- HTTP clients

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy


def http(proxy, path, method="GET", timeout=10):
    """(status, body text, headers) of one request to the proxy's HTTP port."""
    url = "http://127.0.0.1:%d%s" % (proxy.http_port, path)
    req = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


CURL = shutil.which("curl")  # tests/run installs it; without it only urllib runs


def curl(proxy, path, *args):
    """Runs `curl -sS <args> URL` like a cron health check; returns
    (exit code, stdout, stderr)."""
    assert CURL, "callers check CURL first"
    url = "http://127.0.0.1:%d%s" % (proxy.http_port, path)
    r = subprocess.run([CURL, "-sS", "--noproxy", "*", "--max-time", "10", *args, url],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout, r.stderr


# ---------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def key(name, **labels):
    return (name, tuple(sorted(labels.items())))


def fmt_key(k):
    name, labels = k
    return name + ("{%s}" % ",".join('%s="%s"' % kv for kv in labels) if labels else "")


def parse_metrics(text):
    """{key(name, **labels): float} and {family: type} of a text exposition."""
    samples, types = {}, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        labels = dict(_LABEL.findall(m.group(2) or ""))
        k = (m.group(1), tuple(sorted(labels.items())))
        assert k not in samples, "sample %r appears twice" % (k,)
        samples[k] = float(m.group(3))
    return samples, types


def metrics(proxy):
    status, body, headers = http(proxy, "/metrics")
    assert status == 200, (status, body)
    return parse_metrics(body)[0]


def wait_metric(proxy, k, pred, timeout=10, desc=None):
    """Polls /metrics until pred(value of k) holds; returns the value."""
    last = []

    def check():
        v = metrics(proxy).get(k)
        last[:] = [v]
        return v is not None and pred(v)

    try:
        wait_for(check, timeout=timeout, interval=0.05, desc=desc or fmt_key(k))
    except AssertionError as e:
        raise AssertionError("%s; last value of %s: %r"
                             % (e, fmt_key(k), last[0] if last else None)) from None
    return last[0]


C = key  # short alias for the assertions below
CLIENT_CONNECTIONS = C("amqproxy_client_connections")
UPSTREAM_CONNECTIONS = C("amqproxy_upstream_connections")
CLIENT_CHANNELS = C("amqproxy_client_channels")
UPSTREAM_CHANNELS = C("amqproxy_upstream_channels")
IDLE_CHANNELS = C("amqproxy_idle_channels")
PUBLISHED = C("amqproxy_messages_published_total")
REFUSED_CLIENTS = C("amqproxy_client_connections_refused_total")
UPSTREAM_CONNECTS = C("amqproxy_upstream_connects_total")


def handshakes(outcome):
    return C("amqproxy_client_handshakes_total", outcome=outcome)


FAMILIES = {
    "amqproxy_build_info": "gauge",
    "amqproxy_client_connections": "gauge",
    "amqproxy_upstream_connections": "gauge",
    "amqproxy_client_channels": "gauge",
    "amqproxy_upstream_channels": "gauge",
    "amqproxy_idle_channels": "gauge",
    "amqproxy_frames_received_total": "counter",
    "amqproxy_bytes_received_total": "counter",
    "amqproxy_bytes_sent_total": "counter",
    "amqproxy_messages_published_total": "counter",
    "amqproxy_client_handshakes_total": "counter",
    "amqproxy_client_connections_refused_total": "counter",
    "amqproxy_upstream_connects_total": "counter",
    "amqproxy_upstream_connect_failures_total": "counter",
    "amqproxy_channel_reuse_total": "counter",
    "amqproxy_backpressure_pauses_total": "counter",
    "amqproxy_slow_consumer_disconnects_total": "counter",
    "amqproxy_upstream_connect_duration_seconds": "histogram",
}
LABELLED = {
    "amqproxy_frames_received_total": [{"from": "client"}, {"from": "upstream"}],
    "amqproxy_bytes_received_total": [{"from": "client"}, {"from": "upstream"}],
    "amqproxy_bytes_sent_total": [{"to": "client"}, {"to": "upstream"}],
    "amqproxy_client_handshakes_total": [{"outcome": o} for o in ("ok", "refused", "failed", "timeout")],
    "amqproxy_channel_reuse_total": [{"result": r} for r in ("hit", "miss", "discarded")],
}


# ---------------------------------------------------------------- helpers

def broker_direct():
    """A stand-in Proxy that connects straight to the broker (setup, counting)."""
    return Proxy(direct=True)


def launch(start_proxy, *flags, upstream=None):
    """start_proxy(...), then wait for the HTTP port too: the fixture waits
    for the AMQP port only, and the proxy binds its HTTP listener just after
    the AMQP one (a connect in between is refused)."""
    p = start_proxy(*flags, upstream=upstream)
    wait_for(lambda: connect_refused(p.http_port) == 0, timeout=10, interval=0.01,
             desc="the proxy's HTTP port %d accepting" % p.http_port)
    return p


def connect_refused(port):
    """errno of a TCP connect to 127.0.0.1:port (0: accepted)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port))


def round_trip(ch, q, body):
    ch.basic_publish("", q, body)
    got = ch.basic_get(q, auto_ack=True)[2]
    assert got == body, (got, body)


def assert_closed_320(err, who="client"):
    assert isinstance(err, pika.exceptions.ConnectionClosedByBroker), \
        "%s: expected Connection.Close 320 from the proxy, got %r" % (who, err)
    assert err.reply_code == 320, "%s: %r" % (who, err)
    assert err.reply_text == "CONNECTION_FORCED - proxy shutting down", "%s: %r" % (who, err)


def wait_exit(proxy, timeout):
    try:
        return proxy.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("the proxy did not exit within %.1fs\n%s" % (timeout, proxy.log_tail())) from None


class TcpRelay:
    """A plain TCP relay 127.0.0.1:port -> the broker. stop_listening()
    closes the listening socket (new connects are refused) and leaves the
    relayed connections up. Every link records the bytes each way
    (links: list of {"up": bytearray, "down": bytearray})."""

    def __init__(self, target=(BROKER_HOST, BROKER_PORT)):
        self.target = target
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.listening = threading.Event()
        self.listening.set()
        self.socks = []
        self.links = []
        self.thread = threading.Thread(target=self._accept, daemon=True, name="tcp-relay")
        self.thread.start()

    def _accept(self):
        while self.listening.is_set():
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.settimeout(None)
            self.socks += [c, u]
            link = {"up": bytearray(), "down": bytearray(), "pumps": []}
            self.links.append(link)
            for a, b, buf in ((c, u, link["up"]), (u, c, link["down"])):
                t = threading.Thread(target=self._pump, args=(a, b, buf), daemon=True)
                link["pumps"].append(t)
                t.start()
        self.lsock.close()

    @staticmethod
    def _pump(a, b, buf):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                buf += data
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop_listening(self):
        self.listening.clear()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()

    def wait_links_closed(self, timeout=10):
        """Waits until every relayed connection ended (both directions)."""
        for link in self.links:
            for t in link["pumps"]:
                t.join(timeout=timeout)
                assert not t.is_alive(), "a relayed connection is still open"

    def close(self):
        self.stop_listening()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def relay():
    r = TcpRelay()
    yield r
    r.close()


def method_frames(data, protocol_header=False):
    """[(channel, (class, method), arguments)] of the method frames in one
    direction of an AMQP 0-9-1 connection."""
    pos = 8 if protocol_header else 0
    if protocol_header:
        assert bytes(data[:8]) == b"AMQP\x00\x00\x09\x01", bytes(data[:8])
    out = []
    while pos + 7 <= len(data):
        ftype, channel, size = struct.unpack(">BHI", data[pos:pos + 7])
        payload = bytes(data[pos + 7:pos + 7 + size])
        assert data[pos + 7 + size] == 0xCE, "bad frame end at %d" % pos
        if ftype == 1:
            out.append((channel, struct.unpack(">HH", payload[:4]), payload[4:]))
        pos += 8 + size
    assert pos == len(data), "a partial frame at the end (%d of %d bytes)" % (pos, len(data))
    return out


CONNECTION_CLOSE, CONNECTION_CLOSE_OK = (10, 50), (10, 51)


# ================================================================ 1. endpoints

def test_curl_is_installed():
    """The endpoint tests also run the real curl binary (users health-check
    with `curl -f` from cron); without curl they check with urllib only, and
    this test says so."""
    if not CURL:
        pytest.skip("curl is not installed: the endpoint tests ran without their curl checks "
                    "(tests/run installs curl)")
    out = subprocess.run([CURL, "--version"], capture_output=True, text=True).stdout
    assert out.startswith("curl "), out


@pytest.mark.timeout_s(120)
def test_endpoints_and_metrics_move_with_clients(start_proxy, broker):
    # two workers: every gauge is the sum over the workers' slots
    p = launch(start_proxy, "--workers", "2", "-t", "60")

    # ---- routing, before any client
    status, body, headers = http(p, "/healthz")
    assert (status, body) == (200, "OK\n")
    status, body, _ = http(p, "/readyz")
    assert status == 200, body
    if CURL:
        assert curl(p, "/healthz", "-f")[0:2] == (0, "OK\n")
        assert curl(p, "/readyz", "-f")[0:2] == (0, body)
    status, body, headers = http(p, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers["Content-Type"]
    for path in ("/metrics", "/healthz", "/readyz"):
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            status, body, headers = http(p, path, method=method)
            assert status == 405, (method, path, status, body)
            assert headers.get("Allow") == "GET", (method, path, dict(headers))
    for path in ("/", "/nope", "/metrics/x", "/healthzz", "/HEALTHZ"):
        assert http(p, path)[0] == 404, path
        assert http(p, path, method="POST")[0] == 404, path
    if CURL:
        rc, out, err = curl(p, "/metrics", "-f", "-X", "POST")
        assert rc == 22 and "405" in err, (rc, out, err)
        rc, out, err = curl(p, "/nope", "-f")
        assert rc == 22 and "404" in err, (rc, out, err)
    # a query string does not change the route
    assert http(p, "/healthz?verbose=1")[0:2] == (200, "OK\n")

    # ---- every family is there, with its type and labels
    samples, types = parse_metrics(http(p, "/metrics")[1])
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, "family %s: TYPE %r, wanted %r" % (name, types.get(name), kind)
    for name, label_sets in LABELLED.items():
        for labels in label_sets:
            assert key(name, **labels) in samples, "missing %s%s" % (name, labels)
    version = subprocess.run([PROXY_BIN, "--version"], capture_output=True, text=True).stdout.split()[1]
    info = [(k, v) for k, v in samples.items() if k[0] == "amqproxy_build_info"]
    assert len(info) == 1, info
    (k, v), = info
    labels = dict(k[1])
    assert v == 1 and labels.get("version") == version and labels.get("commit"), info
    base = samples

    # ---- 10 clients
    clients = []
    try:
        for i in range(10):
            clients.append(p.connect(client_properties={"connection_name": unique("ops-client")}))
        wait_metric(p, CLIENT_CONNECTIONS, lambda v: v == 10, desc="client_connections == 10")
        wait_metric(p, handshakes("ok"), lambda v: v == base[handshakes("ok")] + 10, desc="handshakes ok +10")
        # curl sees the same number while the clients are connected
        if CURL:
            rc, out, _ = curl(p, "/metrics", "-f")
            assert rc == 0 and "\namqproxy_client_connections 10\n" in out, out[:2000]

        channels = [c.channel() for c in clients]
        wait_metric(p, CLIENT_CHANNELS, lambda v: v == 10, desc="client_channels == 10")
        wait_metric(p, UPSTREAM_CHANNELS, lambda v: v == 10, desc="upstream_channels == 10")
        m = metrics(p)
        assert m[UPSTREAM_CONNECTIONS] >= 1
        assert m[IDLE_CHANNELS] == 0
        assert m[UPSTREAM_CONNECTS] >= 1
        assert m[C("amqproxy_channel_reuse_total", result="miss")] - base[C("amqproxy_channel_reuse_total", result="miss")] == 10
        # the latency histogram: cumulative buckets, +Inf == count == connects
        buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in m.items()
                          if k[0] == "amqproxy_upstream_connect_duration_seconds_bucket"))
        assert buckets[-1][0] == float("inf")
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), buckets
        count = m[C("amqproxy_upstream_connect_duration_seconds_count")]
        assert buckets[-1][1] == count == m[UPSTREAM_CONNECTS] >= 1, (buckets, count)
        assert m[C("amqproxy_upstream_connect_duration_seconds_sum")] > 0

        # ---- 25 messages, spread over the clients
        q = unique()
        channels[0].queue_declare(q, arguments={"x-expires": 120000})
        before = metrics(p)
        body = b"x" * 1000
        for i in range(25):
            channels[i % 10].basic_publish("", q, body)
        for ch in channels:  # a round trip on each channel: its publishes went out
            ch.queue_declare(q, passive=True)
        after = wait_metric(p, PUBLISHED, lambda v: v >= before[PUBLISHED] + 25,
                            desc="messages_published_total +25")
        assert after == before[PUBLISHED] + 25
        wait_for(lambda: broker.queues().get(q) == 25, timeout=10, desc="25 messages in %s" % q)
        m = metrics(p)
        assert m[PUBLISHED] == before[PUBLISHED] + 25, "published counter moved on by itself"
        frames = C("amqproxy_frames_received_total", **{"from": "client"})
        assert m[frames] - before[frames] >= 75  # method + header + body each
        for k in (C("amqproxy_bytes_received_total", **{"from": "client"}),
                  C("amqproxy_bytes_sent_total", to="upstream")):
            assert m[k] - before[k] >= 25 * len(body), k
        for k in (C("amqproxy_frames_received_total", **{"from": "upstream"}),
                  C("amqproxy_bytes_received_total", **{"from": "upstream"}),
                  C("amqproxy_bytes_sent_total", to="client")):
            assert m[k] > before[k], k

        # ---- a wrong password: refused, and counted as such
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            p.connect(password="wrong-" + unique())
        wait_metric(p, handshakes("refused"), lambda v: v >= base[handshakes("refused")] + 1,
                    desc="handshakes refused +1")
        wait_metric(p, CLIENT_CONNECTIONS, lambda v: v == 10, desc="client_connections == 10 (refused one gone)")
        m = metrics(p)
        assert m[handshakes("refused")] == base[handshakes("refused")] + 1
        assert m[handshakes("ok")] == base[handshakes("ok")] + 10
        assert m[handshakes("failed")] == base[handshakes("failed")]

        # ---- channel reuse: a closed channel becomes idle, the next Channel.Open takes it
        hits = C("amqproxy_channel_reuse_total", result="hit")
        hits0 = metrics(p)[hits]
        channels[0].close()
        wait_metric(p, CLIENT_CHANNELS, lambda v: v == 9, desc="client_channels == 9")
        wait_metric(p, IDLE_CHANNELS, lambda v: v == 1, desc="idle_channels == 1")
        assert metrics(p)[UPSTREAM_CHANNELS] == 9
        channels[0] = clients[0].channel()
        wait_metric(p, hits, lambda v: v == hits0 + 1, desc="channel reuse hit +1")
        wait_metric(p, IDLE_CHANNELS, lambda v: v == 0, desc="idle_channels == 0")
        wait_metric(p, CLIENT_CHANNELS, lambda v: v == 10, desc="client_channels == 10 again")
        channels[0].queue_delete(q)

        # ---- the numbers go down again
        for c in clients[:4]:
            c.close()
        wait_metric(p, CLIENT_CONNECTIONS, lambda v: v == 6, desc="client_connections == 6")
        wait_metric(p, CLIENT_CHANNELS, lambda v: v == 6, desc="client_channels == 6")
    finally:
        for c in clients:
            if c.is_open:
                c.close()
    wait_metric(p, CLIENT_CONNECTIONS, lambda v: v == 0, desc="client_connections == 0")
    wait_metric(p, CLIENT_CHANNELS, lambda v: v == 0, desc="client_channels == 0")
    assert http(p, "/healthz")[0:2] == (200, "OK\n")


@pytest.mark.timeout_s(60)
def test_metrics_pass_promtool(start_proxy):
    """`promtool check metrics` accepts the exposition, with traffic in it."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus; tests/run installs it)")
    p = launch(start_proxy, "--workers", "2")
    c = p.connect()
    try:
        ch = c.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        ch.basic_publish("", q, b"promtool")
        ch.basic_get(q, auto_ack=True)
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            p.connect(password="wrong")
        wait_metric(p, PUBLISHED, lambda v: v >= 1)
        wait_metric(p, handshakes("refused"), lambda v: v >= 1)
        ch.queue_delete(q)
        text = http(p, "/metrics")[1]
        r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, "promtool check metrics failed (%d):\n%s%s\n--- input:\n%s" \
            % (r.returncode, r.stdout, r.stderr, text)
        # the check can fail: a broken exposition is refused
        r = subprocess.run([promtool, "check", "metrics"], input="amqproxy_x 1\namqproxy_x 2\n",
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
    finally:
        c.close()


# ================================================================ 2. readiness

@pytest.mark.timeout_s(60)
def test_readyz_fails_when_upstream_is_unreachable(start_proxy):
    port = closed_port()
    p = launch(start_proxy, "--workers", "1", upstream="amqp://127.0.0.1:%d" % port)
    status, body, _ = http(p, "/readyz")
    assert status == 503, (status, body)
    prefix = "upstream 127.0.0.1:%d unreachable: " % port
    assert body.startswith(prefix) and len(body) > len(prefix) + 1, body
    assert body.endswith("\n") and body.count("\n") == 1, "not one line: %r" % body
    # the proxy itself is alive
    assert http(p, "/healthz")[0:2] == (200, "OK\n")
    if CURL:
        # the cron check: curl -f fails with exit code 22
        rc, out, err = curl(p, "/readyz", "-f")
        assert rc == 22 and "503" in err, (rc, out, err)
        rc, out, err = curl(p, "/readyz")  # without -f: the reason comes through
        assert (rc, out) == (0, body), (rc, out, err)
        assert curl(p, "/healthz", "-f")[0:2] == (0, "OK\n")
    # and a normal proxy is ready, before any client connected (TCP probe)
    ok = launch(start_proxy, "--workers", "1")
    assert metrics(ok)[UPSTREAM_CONNECTIONS] == 0
    status, body, _ = http(ok, "/readyz")
    assert status == 200, body
    if CURL:
        assert curl(ok, "/readyz", "-f")[0:2] == (0, body)


@pytest.mark.timeout_s(60)
def test_readyz_pooled_connection_then_probe(start_proxy, relay):
    """/readyz is 200 through the TCP probe before any client, stays 200 while
    a pooled connection is up even though the broker's port stopped
    accepting, and turns 503 once that connection is gone."""
    p = launch(start_proxy, "--workers", "1", "-t", "1", upstream="amqp://127.0.0.1:%d" % relay.port)
    assert metrics(p)[UPSTREAM_CONNECTIONS] == 0
    status, body, _ = http(p, "/readyz")
    assert status == 200, body
    if CURL:
        assert curl(p, "/readyz", "-f")[0] == 0

    c = p.connect()
    ch = c.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    wait_metric(p, UPSTREAM_CONNECTIONS, lambda v: v == 1)
    relay.stop_listening()
    assert connect_refused(relay.port) == errno.ECONNREFUSED  # a probe would fail now
    status, body, _ = http(p, "/readyz")
    assert status == 200, body
    if CURL:
        assert curl(p, "/readyz", "-f")[0] == 0
    round_trip(ch, q, b"still through the pooled connection")
    ch.queue_delete(q)
    c.close()

    # the idle upstream connection closes after 1 s: nothing pooled, probe fails
    wait_metric(p, UPSTREAM_CONNECTIONS, lambda v: v == 0, desc="the idle upstream connection closed")
    status, body, _ = http(p, "/readyz")
    assert status == 503, body
    assert body.startswith("upstream 127.0.0.1:%d unreachable: " % relay.port) and body.count("\n") == 1, body
    if CURL:
        rc, out, err = curl(p, "/readyz", "-f")
        assert rc == 22, (rc, out, err)


@pytest.mark.timeout_s(60)
def test_readyz_gives_up_after_1s_on_a_silent_broker(start_proxy):
    """A broker host that does not answer SYNs (here: a listener whose accept
    queue is full): the probe gives up after 1 s and /readyz says 503."""
    lsock = socket.socket()
    held = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        # fill the accept queue: further SYNs are dropped, connects hang
        for _ in range(8):
            s = socket.socket()
            s.settimeout(0.3)
            held.append(s)
            try:
                s.connect(("127.0.0.1", port))
            except (socket.timeout, TimeoutError):
                break
        else:
            pytest.skip("could not make a port that leaves connects hanging")
        p = launch(start_proxy, "--workers", "1", upstream="amqp://127.0.0.1:%d" % port)
        t = time.monotonic()
        status, body, _ = http(p, "/readyz")
        took = time.monotonic() - t
        assert status == 503, (status, body)
        assert body.startswith("upstream 127.0.0.1:%d unreachable: " % port) and body.count("\n") == 1, body
        assert 0.9 <= took <= 2.5, "/readyz took %.2fs (the probe's limit is 1 s)" % took
        if CURL:
            rc, out, err = curl(p, "/readyz", "-f")
            assert rc == 22, (rc, out, err)
    finally:
        for s in held:
            s.close()
        lsock.close()


# ================================================================ 3. shutdown

class Publisher(threading.Thread):
    """Publishes with confirms in a loop on its own connection; records the
    bodies the broker confirmed and how the connection ended."""

    def __init__(self, proxy, queue, name):
        super().__init__(daemon=True, name=name)
        self.proxy, self.queue = proxy, queue
        self.confirmed = []   # (monotonic time, body)
        self.error = None
        self.closed_at = None
        self.ready = threading.Event()

    def run(self):
        conn = None
        try:
            conn = self.proxy.connect(client_properties={"connection_name": self.name})
            ch = conn.channel()
            ch.confirm_delivery()
            i = 0
            while True:
                body = ("%s %d" % (self.name, i)).encode()
                ch.basic_publish("", self.queue, body)  # returns once the broker acked it
                self.confirmed.append((time.monotonic(), body))
                if i == 10:
                    self.ready.set()
                i += 1
        except Exception as e:
            self.closed_at = time.monotonic()
            self.error = e
        finally:
            self.ready.set()


@pytest.mark.timeout_s(90)
def test_sigterm_drains_publishers_and_exits_0(start_proxy, broker):
    CLOSE_AFTER, TERM = 3, 20
    p = launch(start_proxy, "--term-client-close-timeout", str(CLOSE_AFTER), "--term-timeout", str(TERM), "-t", "60")
    admin = broker_direct().connect()
    try:
        q = unique("ops-shutdown")
        admin_ch = admin.channel()
        admin_ch.queue_declare(q, arguments={"x-expires": 120000})
        pubs = [Publisher(p, q, unique("ops-pub")) for _ in range(5)]
        for t in pubs:
            t.start()
        for t in pubs:
            assert t.ready.wait(20), "publisher %s did not get 10 confirms" % t.name
            assert t.error is None, repr(t.error)
        assert http(p, "/healthz")[0] == 200
        ups = broker.wait_named(p.upstream_prefix(), lambda l: len(l) >= 1, desc="the proxy's upstream connections")

        t_sig = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        # stop accepting at once
        wait_for(lambda: connect_refused(p.port) == errno.ECONNREFUSED, timeout=1, interval=0.01,
                 desc="new connects refused after SIGTERM")
        wait_for(lambda: http(p, "/healthz")[0:2] == (503, "shutting down\n"), timeout=1, interval=0.01,
                 desc="/healthz 503 after SIGTERM")
        if CURL:
            rc, out, err = curl(p, "/healthz", "-f")
            assert rc == 22, (rc, out, err)
        # /healthz stays 503 for the whole drain; the publishers keep working meanwhile
        samples = []
        while p.proc.poll() is None and time.monotonic() < t_sig + TERM + 5:
            try:
                samples.append(http(p, "/healthz", timeout=2)[0:2])
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                break  # the process is going away
            time.sleep(0.05)
        rc = wait_exit(p, TERM + 5)
        t_exit = time.monotonic()
        for t in pubs:
            t.join(timeout=10)
            assert not t.is_alive(), "publisher %s still running after the proxy exited" % t.name

        assert rc == 0, "exit status %r\n%s" % (rc, p.log_tail())
        assert samples and set(samples) == {(503, "shutting down\n")}, samples
        assert t_exit - t_sig <= CLOSE_AFTER + 3, "exited %.2fs after SIGTERM" % (t_exit - t_sig)
        assert t_exit - t_sig >= CLOSE_AFTER, \
            "exited %.2fs after SIGTERM, before term_client_close_timeout" % (t_exit - t_sig)
        for t in pubs:
            assert_closed_320(t.error, t.name)
            assert CLOSE_AFTER <= t.closed_at - t_sig <= CLOSE_AFTER + 2, \
                "%s was closed %.2fs after SIGTERM" % (t.name, t.closed_at - t_sig)
            late = [ts for ts, _ in t.confirmed if ts > t_sig + 0.5]
            assert late, "%s got no confirm during the drain (served until the close)" % t.name
        # the broker: no connection of the proxy left
        broker.wait_named(p.upstream_prefix(), lambda l: not l, desc="the proxy's upstream connections closed")
        assert ups

        # every confirmed message is in the queue, none twice
        confirmed = [b for t in pubs for _, b in t.confirmed]
        counted = wait_for(lambda: broker.queues().get(q), timeout=10, desc="messages in %s" % q)
        assert counted >= len(confirmed), "%d confirmed, %d in the queue" % (len(confirmed), counted)
        assert counted <= len(confirmed) + len(pubs), \
            "%d confirmed, %d in the queue (at most one unconfirmed per publisher)" % (len(confirmed), counted)
        got = []
        admin_ch.basic_qos(prefetch_count=1000)
        for method, _props, body in admin_ch.consume(q, auto_ack=True, inactivity_timeout=2):
            if method is None:
                break
            got.append(body)
        admin_ch.cancel()
        assert len(got) == counted
        assert len(set(got)) == len(got), "duplicate messages in the queue"
        missing = set(confirmed) - set(got)
        assert not missing, "%d confirmed messages are not in the queue, e.g. %r" % (len(missing), sorted(missing)[:5])
        admin_ch.queue_delete(q)
        print("drain: exit %.2fs after SIGTERM; clients closed after %s s; %d confirmed (%d during the drain), "
              "%d in the queue; %d /healthz samples"
              % (t_exit - t_sig, ["%.2f" % (t.closed_at - t_sig) for t in pubs], len(confirmed),
                 sum(1 for t in pubs for ts, _ in t.confirmed if ts > t_sig), counted, len(samples)))
    finally:
        admin.close()


@pytest.mark.timeout_s(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_clients_shutdown_is_prompt(start_proxy, broker, relay, sig):
    # the relay records what the proxy and the broker say to each other
    p = launch(start_proxy, "--term-client-close-timeout", "0", "--term-timeout", "3", "-t", "60",
               upstream="amqp://127.0.0.1:%d" % relay.port)
    conns = [p.connect() for _ in range(3)]
    q = unique()
    ch = conns[0].channel()  # one client with a channel on the pooled connection
    ch.queue_declare(q, arguments={"x-expires": 60000})
    ch.basic_publish("", q, b"before the signal")
    broker.wait_named(p.upstream_prefix(), lambda l: len(l) >= 1, desc="the upstream connection")
    watchers = [Watcher(c) for c in conns]
    for w in watchers:
        w.start()
    t_sig = time.monotonic()
    p.proc.send_signal(sig)
    rc = wait_exit(p, 3 + 2)
    elapsed = time.monotonic() - t_sig
    assert rc == 0, "exit status %r\n%s" % (rc, p.log_tail())
    # every client answers the Close at once: all is closed long before term_timeout
    assert elapsed <= 1.5, "exited %.2fs after the signal (term_timeout 3)" % elapsed
    for w in watchers:
        w.join(timeout=5)
        assert_closed_320(w.error)
        assert w.closed_at - t_sig <= 1.5, "client closed %.2fs after the signal" % (w.closed_at - t_sig)
    broker.wait_named(p.upstream_prefix(), lambda l: not l, desc="the proxy's upstream connections closed")
    # each upstream connection ended with Connection.Close (200) from the
    # proxy, answered by the broker's CloseOk: a clean AMQP close, not a TCP drop
    relay.wait_links_closed()
    links = [l for l in relay.links if l["up"]]
    assert links, "no upstream connection went through the relay"
    for link in links:
        up = method_frames(link["up"], protocol_header=True)
        down = method_frames(link["down"])
        assert up and up[-1][0:2] == (0, CONNECTION_CLOSE), \
            "the proxy's last method upstream: %r" % (up[-1:],)
        assert struct.unpack(">H", up[-1][2][:2])[0] == 200, up[-1]
        assert down and down[-1][0:2] == (0, CONNECTION_CLOSE_OK), \
            "the broker's last method: %r" % (down[-1:],)
    # the publish made before the signal reached the queue
    admin = broker_direct().connect()
    try:
        a = admin.channel()
        assert a.basic_get(q, auto_ack=True)[2] == b"before the signal"
        a.queue_delete(q)
    finally:
        admin.close()


@pytest.mark.timeout_s(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_exits_at_once(start_proxy, sig):
    p = launch(start_proxy, "--term-client-close-timeout", "30", "--term-timeout", "60")
    c = p.connect()
    c.channel()
    w = Watcher(c)
    w.start()
    p.proc.send_signal(sig)
    # the first signal was handled (the drain has begun), then comes the second
    wait_for(lambda: http(p, "/healthz")[0] == 503, timeout=2, interval=0.01, desc="/healthz 503")
    assert p.proc.poll() is None and w.error is None, "the client must still be connected"
    t = time.monotonic()
    p.proc.send_signal(sig)
    rc = wait_exit(p, 3)
    assert time.monotonic() - t <= 1.5
    assert rc != 0, "a second signal must exit with a non-zero status\n%s" % p.log_tail()
    w.join(timeout=5)
    assert w.error is not None, "the client did not notice the proxy exiting"


# ================================================================ 4. reload

def write_config(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.mark.timeout_s(90)
def test_sighup_reloads_config_file(start_proxy, broker, tmp_path):
    cfg = str(tmp_path / "amqproxy.toml")
    write_config(cfg, 'log_level = "info"\nidle_connection_timeout = 60\n')
    # -t 1 on the command line: the file wins over it, before and after the reload
    p = launch(start_proxy, "-c", cfg, "-t", "1", "--workers", "1")
    a = p.connect()
    ch = a.channel()
    q = unique()
    ch.queue_declare(q, arguments={"x-expires": 60000})
    round_trip(ch, q, b"before the reload")
    ups = broker.wait_named(p.upstream_prefix(), lambda l: len(l) == 1, desc="1 upstream connection")
    wait_log(p, r"\[INFO\] ")  # info lines are logged ...
    assert "[DEBUG]" not in log_text(p), "debug lines at log_level info"  # ... debug lines not

    # ---- reload: debug, idle timeout 1 s, at most 2 clients
    write_config(cfg, 'log_level = "debug"\nidle_connection_timeout = 1\nmax_client_connections = 2\n')
    p.proc.send_signal(signal.SIGHUP)
    _, pos = wait_log(p, r"SIGHUP: configuration reloaded.*$")
    # the client's connection and the upstream connection stayed up
    round_trip(ch, q, b"after the reload")
    assert a.is_open
    now = broker.named(p.upstream_prefix())
    assert [c["name"] for c in now] == [ups[0]["name"]], (ups, now)
    # the log level took effect: a client connect is logged at debug now
    b = p.connect()
    wait_log(p, r"\[DEBUG\] client \S+ connected", after=pos)
    # the limit took effect: a third client is refused
    refused0 = metrics(p)[REFUSED_CLIENTS]
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        p.connect()
    wait_metric(p, REFUSED_CLIENTS, lambda v: v == refused0 + 1, desc="client refused by max_client_connections")
    b.close()

    # the idle timeout took effect: the upstream connection closes ~1 s after
    # the last client left, not after 60 s
    ch.close()
    a.close()
    t = time.monotonic()
    broker.wait_named(p.upstream_prefix(), lambda l: not l, timeout=8,
                      desc="the idle upstream connection closed within a few seconds")
    assert time.monotonic() - t < 8

    # ---- a broken file: logged, ignored, the running config stays
    write_config(cfg, 'log_level = "debug"\nidle_connection_timeout = 1\nno_such_key = 1\n')
    p.proc.send_signal(signal.SIGHUP)
    m, pos = wait_log(p, r"SIGHUP: configuration not reloaded.*$", after=pos)
    assert "no_such_key" in m.group(0), m.group(0)
    assert p.proc.poll() is None, "the proxy exited on a bad config file"
    assert http(p, "/healthz")[0:2] == (200, "OK\n")
    c = p.connect()
    c_ch = c.channel()
    round_trip(c_ch, q, b"after the bad reload")
    wait_log(p, r"\[DEBUG\] client \S+ connected", after=pos)  # still at debug
    c_ch.queue_delete(q)
    c.close()
    assert "SIGHUP: configuration reloaded" not in log_text(p)[pos:]
