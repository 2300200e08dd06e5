"""Fixtures that run the real amqproxy binary in front of the real broker.

Environment:
  AMQP_URL              broker (default amqp://127.0.0.1:5672)
  AMQPROXY_BIN          proxy binary (default <repo>/target/debug/amqproxy)
  AMQPROXY_TEST_DIRECT  =1: do not start the proxy; clients talk to the broker
                        directly. Validates the tests themselves; tests marked
                        proxy_only are skipped.
  AMQPROXY_TEST_DEBUG   =1: start the proxy with --debug
  AMQPROXY_TEST_TIMEOUT default per-test time limit in seconds (120)
  BROKER_ADMIN, RABBITMQ_API_URL: see broker.py
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pika
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from broker import Broker, parse_amqp_url, wait_for  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
AMQP_URL = os.environ.get("AMQP_URL", "amqp://127.0.0.1:5672")
_U = parse_amqp_url(AMQP_URL)
BROKER_HOST, BROKER_PORT = _U["host"], _U["port"]
USER, PASSWORD = _U["user"], _U["password"]
DIRECT = os.environ.get("AMQPROXY_TEST_DIRECT") == "1"
PROXY_BIN = os.environ.get("AMQPROXY_BIN", os.path.join(REPO, "target", "debug", "amqproxy"))
DEFAULT_TIMEOUT = int(os.environ.get("AMQPROXY_TEST_TIMEOUT", "120"))

# settings the proxy might read from the environment; the tests configure it
# on the command line only
_PROXY_ENV_VARS = ("AMQP_URL", "LISTEN_ADDRESS", "LISTEN_PORT", "HTTP_PORT", "LOG_LEVEL",
                   "IDLE_CONNECTION_TIMEOUT", "MAX_UPSTREAM_CHANNELS", "TERM_TIMEOUT",
                   "TERM_CLIENT_CLOSE_TIMEOUT")


def pytest_configure(config):
    config.addinivalue_line("markers", "proxy_only: needs the real proxy; skipped with AMQPROXY_TEST_DIRECT=1")
    config.addinivalue_line("markers", "timeout_s(seconds): per-test time limit (default %d)" % DEFAULT_TIMEOUT)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port():
    """A port on 127.0.0.1 where nothing listens (connect -> ECONNREFUSED)."""
    for _ in range(20):
        p = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p)) != 0:
                return p
    raise RuntimeError("could not find a closed port")


def unique(prefix="amqproxy-test"):
    return "%s-%s" % (prefix, uuid.uuid4().hex)


# ---------------------------------------------------------------- the proxy process, /metrics

def proxy_vm_status(p):
    """{field: kB} of /proc/<proxy pid>/status (VmRSS, VmHWM, ...)."""
    out = {}
    with open("/proc/%d/status" % p.proc.pid) as f:
        for line in f:
            m = re.match(r"(Vm\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def proxy_metrics(p):
    """{sample name: value} of the unlabelled samples of /metrics."""
    with socket.create_connection(("127.0.0.1", p.http_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$", body, re.M)}


def log_text(proxy):
    """The proxy's whole log so far."""
    with open(proxy.log_path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def wait_log(proxy, pattern, after=0, timeout=10):
    """Waits for a match of the regex `pattern` (multi-line mode) in the
    proxy's log at or after character offset `after`; returns (match, its
    end offset)."""
    rx = re.compile(pattern, re.M)
    m = wait_for(lambda: rx.search(log_text(proxy), after), timeout=timeout, interval=0.05,
                 desc="log line /%s/" % pattern)
    return m, m.end()


class Proxy:
    """One amqproxy process (or, in direct mode, the broker itself)."""

    def __init__(self, flags=(), upstream=None, direct=False, tmpdir=None):
        self.flags = list(flags)
        self.upstream = upstream or "amqp://%s:%d" % (BROKER_HOST if ":" not in BROKER_HOST else "[%s]" % BROKER_HOST, BROKER_PORT)
        self.direct = direct
        self.proc = None
        self.log_path = None
        self.tmpdir = tmpdir or tempfile.gettempdir()
        if direct:
            self.host, self.port, self.http_port = BROKER_HOST, BROKER_PORT, None
        else:
            self.host = "127.0.0.1"
            self._start()

    # ---------------------------------------------------------------- process
    def _start(self):
        if not os.path.exists(PROXY_BIN):
            pytest.fail("proxy binary %s does not exist (run cargo build, or set AMQPROXY_BIN)" % PROXY_BIN)
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_ENV_VARS}
        env.setdefault("RUST_BACKTRACE", "1")
        extra = ["--debug"] if os.environ.get("AMQPROXY_TEST_DEBUG") == "1" else []
        last_err = None
        for attempt in range(3):  # a free port can be taken by someone else before we bind it
            self.port, self.http_port = free_port(), free_port()
            self.cmd = [PROXY_BIN, "--listen", "127.0.0.1", "--port", str(self.port),
                        "--http-port", str(self.http_port), *extra, *self.flags, self.upstream]
            fd, self.log_path = tempfile.mkstemp(prefix="amqproxy-%d-" % self.port, suffix=".log", dir=self.tmpdir)
            with os.fdopen(fd, "wb") as log:
                self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with socket.socket() as s:
                    s.settimeout(0.5)
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
                time.sleep(0.05)
            rc = self.proc.poll()
            if rc is None:
                self.stop()
                pytest.fail("proxy did not accept TCP on port %d within 20 s\ncmd: %s\n%s"
                            % (self.port, " ".join(self.cmd), self.log_tail()))
            last_err = "proxy exited with code %s\ncmd: %s\n%s" % (rc, " ".join(self.cmd), self.log_tail())
            if "in use" not in self.log_tail().lower():
                break
        pytest.fail(last_err)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines=60):
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no proxy log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])

    # ---------------------------------------------------------------- clients
    def params(self, user=None, password=None, vhost="/", **kw):
        kw.setdefault("connection_attempts", 1)
        kw.setdefault("socket_timeout", 10)
        kw.setdefault("stack_timeout", 20)
        kw.setdefault("blocked_connection_timeout", 60)
        return pika.ConnectionParameters(
            host=self.host, port=self.port, virtual_host=vhost,
            credentials=pika.PlainCredentials(user or USER, password if password is not None else PASSWORD),
            **kw)

    def connect(self, **kw):
        return pika.BlockingConnection(self.params(**kw))

    @property
    def url(self):
        return "amqp://%s:%s@%s:%d/%%2F" % (USER, PASSWORD, self.host, self.port)

    def pool_name(self, user=None, vhost="/"):
        """connection_name the proxy gives its upstream connections for a pool."""
        return "amqproxy %s:%d pool %s@%s" % (self.host, self.port, user or USER, vhost)

    def upstream_prefix(self):
        return "amqproxy %s:%d pool " % (self.host, self.port)


class ProxyFactory:
    def __init__(self, tmpdir):
        self.instances = []
        self.tmpdir = tmpdir

    def __call__(self, *flags, upstream=None, direct=None):
        """Start a proxy with extra command-line flags. In direct mode returns a
        stand-in pointing at the broker (only when no upstream is forced)."""
        if direct is None:
            direct = DIRECT
        if direct and upstream is not None:
            pytest.skip("needs the proxy (custom upstream)")
        p = Proxy(flags, upstream=upstream, direct=direct, tmpdir=self.tmpdir)
        self.instances.append(p)
        return p

    def stop_all(self):
        for p in self.instances:
            p.stop()


@pytest.fixture(scope="session")
def broker():
    return Broker(AMQP_URL)


@pytest.fixture(scope="session")
def proxy(tmp_path_factory):
    """A proxy with default settings, shared by the tests of one xdist worker."""
    p = Proxy(direct=DIRECT, tmpdir=str(tmp_path_factory.mktemp("proxylogs")))
    yield p
    p.stop()


@pytest.fixture
def start_proxy(tmp_path):
    """Factory: start_proxy('--workers', '1', '-t', '1', upstream=...) -> Proxy."""
    f = ProxyFactory(str(tmp_path))
    yield f
    f.stop_all()


@pytest.fixture
def conn(proxy):
    c = proxy.connect()
    yield c
    if c.is_open:
        try:
            c.close()
        except Exception:
            pass


@pytest.fixture
def queue(conn):
    """A fresh queue on the shared proxy (expires by itself if a test dies)."""
    name = unique()
    ch = conn.channel()
    ch.queue_declare(name, arguments={"x-expires": 120000})
    yield name
    try:
        if conn.is_open:
            c2 = conn.channel()
            c2.queue_delete(name)
            c2.close()
    except Exception:
        pass


@pytest.fixture
def temp_user(broker):
    """Factory for throwaway broker users with full permissions on a vhost."""
    made = []

    def make(vhost="/"):
        user, password = unique("amqproxy-user"), uuid.uuid4().hex
        broker.add_user(user, password)
        made.append(user)
        broker.set_permissions(user, vhost)
        return user, password

    yield make
    for u in made:
        broker.delete_user(u)


@pytest.fixture(autouse=True)
def _skip_proxy_only_in_direct_mode(request):
    if DIRECT and request.node.get_closest_marker("proxy_only"):
        pytest.skip("proxy-specific (AMQPROXY_TEST_DIRECT=1)")


@pytest.fixture(autouse=True)
def _time_limit(request):
    """No test may hang the suite: SIGALRM raises in the test's thread."""
    m = request.node.get_closest_marker("timeout_s")
    limit = int(m.args[0]) if m else DEFAULT_TIMEOUT

    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded its %d s time limit" % limit)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of every involved proxy's log to the report."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    proxies = []
    for v in getattr(item, "funcargs", {}).values():
        if isinstance(v, Proxy):
            proxies.append(v)
        elif isinstance(v, ProxyFactory):
            proxies.extend(v.instances)
    for p in proxies:
        if p.direct:
            continue
        rep.sections.append(("amqproxy :%d log (tail)" % p.port,
                             "cmd: %s\n%s" % (" ".join(p.cmd), p.log_tail())))


# ---------------------------------------------------------------- canary
# (appended) A well-behaved client that shares the upstream connection with
# the misbehaving clients of a test and must not notice anything.

import threading  # noqa: E402


class Canary(threading.Thread):
    """A pika client on its own connection (owned by this thread: pika's
    BlockingConnection is not thread-safe) doing a publish + basic_get round
    trip on its own queue every `interval` seconds, recording when each round
    trip completed and any error.

    Start it through the `canary` fixture, after the proxy and before the
    hostile part; call finish() at the end of the test."""

    def __init__(self, proxy, broker, interval=0.05):
        super().__init__(daemon=True, name="canary")
        self.proxy, self.broker, self.interval = proxy, broker, interval
        self.marker = unique("canary")
        self.queue = unique("canary-q")
        self.trips = []        # time.monotonic() of every completed round trip
        self.errors = []       # (time.monotonic(), repr(exception or problem))
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.upstream = None   # the broker's record of the shared connection
        self.finished = False

    # ------------------------------------------------------------ thread
    def run(self):
        conn = None
        try:
            conn = self.proxy.connect(client_properties={"connection_name": self.marker})
            ch = conn.channel()
            ch.queue_declare(self.queue, arguments={"x-expires": 120000})
            i = 0
            while not self.stopping.is_set():
                body = b"canary %d" % i
                ch.basic_publish("", self.queue, body)
                m, _p, got = ch.basic_get(self.queue, auto_ack=True)
                if got != body:
                    self.errors.append((time.monotonic(), "round trip %d: published %r, got %r" % (i, body, got)))
                    return
                self.trips.append(time.monotonic())
                self.ready.set()
                i += 1
                conn.sleep(self.interval)  # also runs pika's I/O (heartbeats)
            ch.queue_delete(self.queue)
        except Exception as e:
            self.errors.append((time.monotonic(), repr(e)))
        finally:
            self.ready.set()
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except Exception as e:
                    if not self.stopping.is_set():
                        self.errors.append((time.monotonic(), "close: %r" % (e,)))

    # ------------------------------------------------------------ checks
    def _find_upstream(self):
        if self.proxy.direct:
            # nothing shared: the canary's own connection stands in for it
            conns = wait_for(lambda: [c for c in self.broker.connections()
                                      if c["connection_name"] == self.marker],
                             timeout=15, desc="the canary's connection on the broker")
        else:
            conns = self.broker.wait_named(self.proxy.upstream_prefix(), lambda l: len(l) == 1,
                                           desc="exactly 1 upstream connection of the proxy")
        assert len(conns) == 1, conns
        return conns[0]

    def upstream_now(self):
        """The broker's current record of the shared upstream connection
        (fresh channel count), asserting it is still the same connection."""
        self.assert_same_upstream()
        return self.broker.connection_by_name(self.upstream["name"])

    def assert_same_upstream(self):
        if self.proxy.direct:
            now = [c for c in self.broker.connections() if c["connection_name"] == self.marker]
        else:
            now = self.broker.named(self.proxy.upstream_prefix())
        key = lambda c: (c["name"], c["peer_port"])  # noqa: E731
        assert [key(c) for c in now] == [key(self.upstream)], \
            "the shared upstream connection changed: before %r, now %r" % (self.upstream, now)

    def assert_ok(self):
        assert not self.errors, "the canary saw errors: %r" % (self.errors,)
        assert self.is_alive(), "the canary stopped"

    def assert_progress(self, since, until=None, min_trips=3, max_gap=2.0):
        """At least min_trips round trips in [since, until] and no gap longer
        than max_gap seconds between them (edges of the window included)."""
        until = until if until is not None else time.monotonic()
        self.assert_ok()
        inside = [t for t in list(self.trips) if since <= t <= until]
        assert len(inside) >= min_trips, \
            "the canary made %d round trips in %.1fs (wanted >= %d)" % (len(inside), until - since, min_trips)
        points = [since] + inside + [until]
        gap = max(b - a for a, b in zip(points, points[1:]))
        assert gap <= max_gap, "the canary stalled for %.2fs (allowed %.2fs)" % (gap, max_gap)

    def wait_trips(self, n, timeout=10):
        """Wait until n more round trips complete (e.g. after a stall)."""
        start = len(self.trips)
        wait_for(lambda: self.errors or len(self.trips) >= start + n, timeout=timeout,
                 interval=0.02, desc="%d more canary round trips" % n)
        self.assert_ok()

    def stop(self):
        self.stopping.set()
        self.join(timeout=15)

    def finish(self, since, min_trips=3, max_gap=2.0, tolerate_stall=False):
        """End-of-test checks: progress since `since` (unless tolerate_stall:
        then only a few round trips after now), the same upstream connection,
        then stop, and no error at any time."""
        if tolerate_stall:
            self.wait_trips(3)
        else:
            # a short hostile part: let the window run until min_trips fit in it
            wait_for(lambda: self.errors or not self.is_alive()
                     or len([t for t in list(self.trips) if t >= since]) >= min_trips,
                     timeout=max_gap * min_trips + 5, interval=0.02,
                     desc="%d canary round trips" % min_trips)
            self.assert_progress(since, min_trips=min_trips, max_gap=max_gap)
        self.assert_same_upstream()
        self.finished = True
        self.stop()
        assert not self.is_alive(), "the canary did not stop"
        assert not self.errors, "the canary saw errors: %r" % (self.errors,)


@pytest.fixture
def canary(broker):
    """Factory: canary(proxy, interval=0.05) -> a running Canary whose first
    round trip is done and whose upstream connection is recorded. Start the
    proxy with --workers 1 so every client with the same credentials shares
    the canary's upstream connection. `cls` may be a Canary subclass."""
    made = []

    def start(proxy, interval=0.05, cls=Canary):
        c = cls(proxy, broker, interval)
        made.append(c)
        c.start()
        if not c.ready.wait(20):
            pytest.fail("the canary did not complete a round trip within 20 s")
        c.assert_ok()
        c.upstream = c._find_upstream()
        return c

    yield start
    for c in made:
        c.stop()


class Watcher(threading.Thread):
    """Runs a client's I/O loop (pika is single-threaded: the watcher owns
    the connection from now on) and records when and how it was closed."""

    def __init__(self, conn):
        super().__init__(daemon=True)
        self.conn = conn
        self.stop = threading.Event()
        self.closed_at = None
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                self.conn.process_data_events(time_limit=0.01)
        except Exception as e:
            self.closed_at = time.monotonic()
            self.error = e
