"""Hostile clients: slowloris handshakes, thousands of half-open connections,
and more clients than --max-client-connections allows.

  * A client that dribbles its handshake (one byte a second) is closed at the
    handshake timeout, measured from its connect: never before, at most 2 s
    after.
  * 5,000 connections that send nothing or a partial header/frame are all
    closed at the handshake timeout; meanwhile a normal client works and the
    canary keeps its pace; afterwards amqproxy_client_connections is back to
    0 and the proxy's resident memory is back within 8 MiB of its baseline.
  * --max-client-connections N: the N+1th client is dropped at once (EOF, not
    a byte of AMQP), counted in amqproxy_client_connections_refused_total;
    a slot frees when a client leaves, and half-open connections give their
    slots back at the handshake timeout.

All proxy-specific: RabbitMQ has its own (10 s) handshake timeout and limits.
"""

import resource
import selectors
import socket
import struct
import time

import pika
import pytest

import rawamqp
from rawamqp import CONNECTION_START_OK, PROTOCOL_HEADER, longstr, method_frame, shortstr, table
from broker import wait_for
from conftest import PASSWORD, USER, unique
from conftest import proxy_metrics as metrics, proxy_vm_status as vm_status

pytestmark = pytest.mark.proxy_only


# ================================================================ helpers

def nofile_limit(pid):
    """Soft RLIMIT_NOFILE of a process."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                v = line.split()[3]
                return float("inf") if v == "unlimited" else int(v)
    raise AssertionError("no 'Max open files' in /proc/%d/limits" % pid)


CLIENTS = "amqproxy_client_connections"
REFUSED = "amqproxy_client_connections_refused_total"


def wait_metric(p, name, pred, timeout=10, desc=None):
    last = []

    def check():
        v = metrics(p).get(name)
        last[:] = [v]
        return v is not None and pred(v)

    try:
        wait_for(check, timeout=timeout, interval=0.05, desc=desc or name)
    except AssertionError as e:
        raise AssertionError("%s; last value of %s: %r" % (e, name, last)) from None
    return last[0]


def roundtrip(p, what):
    """A normal pika client: connect, declare, publish, get, close. Returns
    how long it took."""
    t = time.monotonic()
    n = p.connect()
    try:
        ch = n.channel()
        q = unique()
        ch.queue_declare(q, arguments={"x-expires": 60000})
        body = what.encode()
        ch.basic_publish("", q, body)
        m, _p, got = ch.basic_get(q, auto_ack=True)
        assert got == body, "%s: got %r" % (what, got)
        ch.queue_delete(q)
    finally:
        n.close()
    return time.monotonic() - t


def start_ok_bytes():
    props = table({"product": "amqproxy-tests hostile"})
    return method_frame(0, CONNECTION_START_OK, props + shortstr("PLAIN")
                        + longstr(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()) + shortstr("en_US"))


def read_until_eof(sock, timeout):
    """Discards what arrives until EOF/reset; returns (bytes, eof)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


class Watched:
    """Non-blocking sockets whose EOF time is recorded (what they receive
    before it, e.g. Connection.Start, is read and dropped)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.open = {}    # socket -> connect time
        self.closed = []  # (seconds from connect to EOF, socket)
        self.received = {}

    def add(self, sock, t_connect):
        sock.setblocking(False)
        self.open[sock] = t_connect
        self.sel.register(sock, selectors.EVENT_READ)

    def poll(self, timeout):
        for key, _ in self.sel.select(timeout):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if chunk:
                self.received[s] = self.received.get(s, 0) + len(chunk)
                continue
            t = time.monotonic()
            self.sel.unregister(s)
            self.closed.append((t - self.open.pop(s), s))

    def close_all(self):
        for s in list(self.open):
            self.sel.unregister(s)
            s.close()
        for _, s in self.closed:
            s.close()
        self.sel.close()


# ================================================================ slowloris

SLOW_TIMEOUT = 3


@pytest.mark.parametrize("stage", ["protocol-header", "start-ok"])
def test_slowloris_closed_at_handshake_timeout(start_proxy, canary, stage):
    """20 clients send their handshake one byte a second (the protocol
    header; or the header at once, then StartOk): every one is closed
    between SLOW_TIMEOUT and SLOW_TIMEOUT + 2 s after its connect, whatever
    it keeps sending, and the canary is not slowed down meanwhile."""
    p = start_proxy("--workers", "1", "--handshake-timeout", str(SLOW_TIMEOUT))
    can = canary(p)
    t0 = time.monotonic()
    w = Watched()
    pending = {}  # socket -> bytes still to dribble
    try:
        for _ in range(20):
            t = time.monotonic()
            s = socket.create_connection((p.host, p.port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if stage == "start-ok":
                s.sendall(PROTOCOL_HEADER)
                pending[s] = start_ok_bytes()
            else:
                pending[s] = PROTOCOL_HEADER
            w.add(s, t)
        next_byte = time.monotonic()
        deadline = time.monotonic() + SLOW_TIMEOUT + 6
        while w.open and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_byte:
                for s in list(w.open):
                    data = pending[s]
                    if data:
                        try:
                            s.send(data[:1])
                            pending[s] = data[1:]
                        except (BlockingIOError, OSError):
                            pass
                next_byte += 1.0
            w.poll(max(0.0, min(next_byte, deadline) - time.monotonic()))
        assert not w.open, "%d slowloris clients still open %.0f s after connecting" \
            % (len(w.open), SLOW_TIMEOUT + 6)
        times = sorted(t for t, _ in w.closed)
        print("slowloris %s: closed %.2f..%.2f s after connect (timeout %d s)"
              % (stage, times[0], times[-1], SLOW_TIMEOUT))
        assert times[0] >= SLOW_TIMEOUT, "closed %.2f s after connect, before the %d s timeout" \
            % (times[0], SLOW_TIMEOUT)
        assert times[-1] <= SLOW_TIMEOUT + 2, "closed %.2f s after connect, timeout %d s" \
            % (times[-1], SLOW_TIMEOUT)
        if stage == "start-ok":  # they did get Connection.Start, and nothing else matters
            assert all(w.received.get(s, 0) > 0 for _, s in w.closed)
        can.assert_progress(t0, max_gap=1.0)
    finally:
        w.close_all()
    wait_metric(p, CLIENTS, lambda v: v == 1, desc="only the canary connected")
    roundtrip(p, "after slowloris")
    can.finish(t0)


# ================================================================ 5,000 half-open connections

HALF_OPEN = 5000
HALF_OPEN_TIMEOUT = 5  # long enough that all 5,000 are open at the same time
RSS_SLACK_KIB = 8 * 1024


def half_open_round(p, can):
    """Opens HALF_OPEN connections that send nothing, a partial protocol
    header, or a header and a partial StartOk; checks a normal client works
    while they are held; waits until the proxy closed them all. Returns the
    numbers measured."""
    w = Watched()
    partial_frame = PROTOCOL_HEADER + start_ok_bytes()[:30]
    t0 = time.monotonic()
    out = {"peak_rss": 0}
    try:
        for i in range(HALF_OPEN):
            t = time.monotonic()
            s = socket.create_connection((p.host, p.port), timeout=10)
            kind = i % 3
            if kind == 1:
                s.sendall(b"AMQP\x00")        # a partial protocol header
            elif kind == 2:
                s.sendall(partial_frame)      # header, then a partial StartOk
            w.add(s, t)
            if i % 500 == 499:
                w.poll(0)  # keep up with the Connection.Start frames
        out["opened_in"] = time.monotonic() - t0
        out["peak_clients"] = wait_metric(p, CLIENTS, lambda v: v == HALF_OPEN + 1, timeout=HALF_OPEN_TIMEOUT,
                                          desc="all %d half-open connections accepted" % HALF_OPEN)
        # a normal client works while they are all held open
        out["roundtrip_during"] = roundtrip(p, "during the half-open connections")
        assert out["roundtrip_during"] < 5, "a normal client took %.2f s with %d half-open connections" \
            % (out["roundtrip_during"], HALF_OPEN)
        deadline = time.monotonic() + HALF_OPEN_TIMEOUT + 10
        while w.open and time.monotonic() < deadline:
            w.poll(0.2)
            out["peak_rss"] = max(out["peak_rss"], vm_status(p)["VmRSS"])
        assert not w.open, "%d of %d half-open connections still open %.0f s after the last connect" \
            % (len(w.open), HALF_OPEN, HALF_OPEN_TIMEOUT + 10)
        times = sorted(t for t, _ in w.closed)
        out["closed"] = (times[0], times[-1])
        can.assert_progress(t0, max_gap=2.0)
    finally:
        w.close_all()
    wait_metric(p, CLIENTS, lambda v: v == 1, desc="amqproxy_client_connections back to the canary's 1")
    assert times[0] >= HALF_OPEN_TIMEOUT, "closed %.2f s after connect, before the %d s timeout" \
        % (times[0], HALF_OPEN_TIMEOUT)
    assert times[-1] <= HALF_OPEN_TIMEOUT + 2, "closed %.2f s after connect, timeout %d s" \
        % (times[-1], HALF_OPEN_TIMEOUT)
    return out


@pytest.mark.timeout_s(180)
def test_5000_half_open_connections(start_proxy, canary):
    """Two rounds of 5,000 half-open connections: each round is closed at
    the handshake timeout, the gauge returns to 0, VmRSS ends within 8 MiB of
    its baseline, and the second round leaves no more memory behind than the
    first (what the allocator keeps is reused, nothing accumulates)."""
    needed = HALF_OPEN + 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip("RLIMIT_NOFILE hard limit %d < %d needed for %d connections"
                        % (hard, needed, HALF_OPEN))
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    # the proxy inherits the raised limit from this process
    p = start_proxy("--workers", "1", "-t", "60", "--handshake-timeout", str(HALF_OPEN_TIMEOUT))
    proxy_limit = nofile_limit(p.proc.pid)
    if proxy_limit < needed:
        pytest.skip("the proxy's RLIMIT_NOFILE is %s < %d needed" % (proxy_limit, needed))
    can = canary(p)
    roundtrip(p, "warm-up")
    wait_metric(p, CLIENTS, lambda v: v == 1, desc="only the canary connected")
    base = vm_status(p)["VmRSS"]
    t0 = time.monotonic()
    rounds = []
    for r in range(2):
        out = half_open_round(p, can)
        roundtrip(p, "after round %d" % (r + 1))
        out["rss_after"] = vm_status(p)["VmRSS"]
        rounds.append(out)
        print("5000 half-open, round %d: opened in %.2f s, %d client connections at the peak, closed "
              "%.2f..%.2f s after connect (timeout %d s), normal client round trip during: %.3f s; "
              "VmRSS baseline %d kB, peak %d kB, after %d kB"
              % (r + 1, out["opened_in"], out["peak_clients"], out["closed"][0], out["closed"][1],
                 HALF_OPEN_TIMEOUT, out["roundtrip_during"], base, out["peak_rss"], out["rss_after"]))
    can.finish(t0)
    wait_metric(p, CLIENTS, lambda v: v == 0, desc="amqproxy_client_connections back to 0")
    last = []

    def rss_back():
        last[:] = [vm_status(p)["VmRSS"]]
        return last[0] <= base + RSS_SLACK_KIB and last[0] <= rounds[0]["rss_after"] + 2048

    try:
        wait_for(rss_back, timeout=15, interval=0.25,
                 desc="VmRSS within 8 MiB of its baseline %d kB and within 2 MiB of the first round's %d kB"
                 % (base, rounds[0]["rss_after"]))
    except AssertionError as e:
        raise AssertionError("%s; VmRSS now %r kB" % (e, last)) from None
    assert p.proc.poll() is None


# ================================================================ --max-client-connections

def assert_refused_at_once(p):
    """A TCP connection over the limit: the proxy accepts and drops it - EOF
    (or a reset), never a byte of AMQP - even after a protocol header."""
    t = time.monotonic()
    s = socket.create_connection((p.host, p.port), timeout=5)
    try:
        try:
            s.sendall(PROTOCOL_HEADER)
        except OSError:
            pass  # already dropped
        data, eof = read_until_eof(s, 3)
    finally:
        s.close()
    assert eof and data == b"", "the client over the limit got %r (eof=%r)" % (data[:64], eof)
    assert time.monotonic() - t < 2, "refusing took %.2f s" % (time.monotonic() - t)


def test_max_client_connections_refuses_the_next_client(start_proxy):
    n = 3
    p = start_proxy("--workers", "1", "--max-client-connections", str(n),
                    "--handshake-timeout", str(SLOW_TIMEOUT))
    refused0 = metrics(p)[REFUSED]
    conns = [p.connect() for _ in range(n)]
    try:
        wait_metric(p, CLIENTS, lambda v: v == n)
        assert_refused_at_once(p)
        wait_metric(p, REFUSED, lambda v: v == refused0 + 1, desc="1 refused")
        # pika fails at once, and the ones inside are unaffected
        t = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            p.connect()
        assert time.monotonic() - t < 5
        wait_metric(p, REFUSED, lambda v: v == refused0 + 2, desc="2 refused")
        assert metrics(p)[CLIENTS] == n
        for i, c in enumerate(conns):
            ch = c.channel()
            q = unique()
            ch.queue_declare(q, arguments={"x-expires": 60000})
            ch.basic_publish("", q, b"inside %d" % i)
            assert ch.basic_get(q, auto_ack=True)[2] == b"inside %d" % i
            ch.queue_delete(q)
        # one leaves: the next one gets in
        conns.pop().close()
        wait_metric(p, CLIENTS, lambda v: v == n - 1)
        roundtrip(p, "in the freed slot")
        wait_metric(p, CLIENTS, lambda v: v == n - 1)
    finally:
        for c in conns:
            c.close()
    wait_metric(p, CLIENTS, lambda v: v == 0)

    # half-open connections hold slots only until the handshake timeout
    idle = []
    try:
        t_idle = time.monotonic()
        for _ in range(n):
            idle.append(socket.create_connection((p.host, p.port), timeout=5))
        wait_metric(p, CLIENTS, lambda v: v == n)
        assert_refused_at_once(p)
        wait_metric(p, REFUSED, lambda v: v == refused0 + 3, desc="3 refused")
        for s in idle:
            data, eof = read_until_eof(s, SLOW_TIMEOUT + 3)
            assert eof and data == b"", (data, eof)
        waited = time.monotonic() - t_idle
        assert SLOW_TIMEOUT <= waited <= SLOW_TIMEOUT + 2, "half-open slots freed after %.2f s" % waited
    finally:
        for s in idle:
            s.close()
    wait_metric(p, CLIENTS, lambda v: v == 0)
    roundtrip(p, "after the half-open connections timed out")
    assert metrics(p)[REFUSED] == refused0 + 3


# ================================================================ unfinished publishes

BUDGET_PUBLISHERS = "amqproxy_budget_publisher_disconnects_total"
BUFFER_BYTES = "amqproxy_client_buffer_bytes"


@pytest.mark.timeout_s(120)
def test_unfinished_large_publishes_are_held_to_the_buffer_budget(start_proxy, canary):
    """A client announces 100 MB messages on 40 channels and sends 2 MB of
    each (80 MB the proxy would have to hold until the messages are
    complete): with a 32 MiB budget it is closed with 506 before the
    proxy's memory passes the budget plus a small constant; a normal
    publisher's large message in progress at the same time, and the canary
    on the same upstream connection, carry on."""
    budget = 32 * 1024 * 1024
    slack = 16 * 1024 * 1024
    p = start_proxy("--workers", "1", "--client-buffer-budget", str(budget))
    can = canary(p)
    since = time.monotonic()
    rss0 = vm_status(p)["VmRSS"] * 1024

    # A well-behaved client with a 3 MB message half sent.
    good = rawamqp.RawClient(p.host, p.port)
    good.handshake()
    good.channel_open(1)
    q = unique("amqproxy-test-budget")
    good.queue_declare(1, q, arguments={"x-expires": 60000})
    good.confirm_select(1)
    body = bytes(range(256)) * (3 * 1024 * 1024 // 256)
    frames = good.publish_frames(1, "", q, body, good.frame_max)
    good.send(frames[:len(frames) // 2])

    hog = rawamqp.RawClient(p.host, p.port)
    hog.handshake()
    chunk = rawamqp.body_frames(0, b"\x00" * (hog.frame_max - 8), hog.frame_max)
    peak = 0
    closed_with = None
    try:
        for ch in range(1, 41):
            hog.channel_open(ch)
            hog.send(rawamqp.method_frame(ch, rawamqp.BASIC_PUBLISH, struct.pack(">H", 0)
                                          + rawamqp.shortstr("") + rawamqp.shortstr(q) + b"\x00")
                     + rawamqp.content_header_frame(ch, 100_000_000))
            one = chunk[:1] + struct.pack(">H", ch) + chunk[3:]  # the same body frame on channel ch
            hog.send(one * (2 * 1024 * 1024 // (hog.frame_max - 8)))
            peak = max(peak, vm_status(p)["VmRSS"] * 1024)
    except rawamqp.ConnectionClosed as e:
        closed_with = e.reply_code
    except OSError:
        pass  # closed while we were still sending: read what it said below
    if closed_with is None:
        try:
            while True:
                f = hog.read_frame(timeout=10)
                if f.type == rawamqp.FRAME_METHOD and f.method == rawamqp.CONNECTION_CLOSE:
                    closed_with = f.args().unpack(">H")
                    break
        except (OSError, EOFError, rawamqp.ConnectionClosed) as e:
            closed_with = getattr(e, "reply_code", closed_with)
    hog.abort()
    peak = max(peak, vm_status(p)["VmRSS"] * 1024)
    # (the workers publish their counters every tick)
    wait_metric(p, BUDGET_PUBLISHERS, lambda v: v >= 1, desc="the disconnect counted")
    m = metrics(p)
    report = "RSS before %.1f MiB, peak %.1f MiB (budget %d MiB + slack %d MiB); closed with %r; %s" % (
        rss0 / 2**20, peak / 2**20, budget >> 20, slack >> 20, closed_with,
        {k: m.get(k) for k in (BUDGET_PUBLISHERS, BUFFER_BYTES)})
    print(report)
    assert closed_with == 506, report
    assert m.get(BUDGET_PUBLISHERS) == 1, report
    assert peak - rss0 <= budget + slack, report

    # The good client finishes its message; it arrives whole and confirmed.
    good.send(frames[len(frames) // 2:])
    good.expect(rawamqp.BASIC_ACK, channel=1)
    got = good.basic_get(1, q)
    assert got is not None and got["body"] == body
    good.connection_close()
    wait_metric(p, BUFFER_BYTES, lambda v: v < 1024 * 1024, desc="buffers given back")
    can.finish(since)
