"""No confirmed message is lost under chaos (at-least-once through the proxy).

20 publishers send 5,000 messages each (100,000 in all; the id is the start
of the body) through the proxy to one queue, with publisher confirms and up
to WINDOW unconfirmed messages in flight per connection. Meanwhile chaos:
  * a killer thread aborts random publishers' connections: either a
    shutdown of the socket from the killer's thread at whatever moment the
    publisher is at, or (done by the publisher itself on request) part of a
    message written and then an RST;
  * a closer thread closes the proxy's upstream connections through the
    broker's admin interface (Broker.close_connection), so every client
    with a channel on one gets Connection.Close 320.
A publisher whose connection fails reconnects and republishes everything
not yet confirmed (duplicates allowed, loss not). Only a Basic.Ack from the
broker counts as a confirm; a Nack sends the message back for
republishing. Each publisher checks every confirm against its own book of
delivery tags (an ack for a tag never published or already settled is an
error, so a confirm meant for someone else cannot count). Publishers hold
back their last messages until the chaos has done a minimum of both kinds,
so the test cannot pass without chaos during publishing.

Afterwards the queue is drained directly from the broker and every
confirmed id must be in it.

The publishers speak AMQP over raw sockets (rawamqp.py): pipelined
confirms, exact control over the moment of a kill, and every Ack/Nack frame
(with its multiple flag) seen as the broker sent it.
"""

import random
import socket
import struct
import threading
import time

import pika
import pytest

import rawamqp as amqp
from conftest import BROKER_HOST, BROKER_PORT, PASSWORD, USER, unique

CLIENTS = 20
PER_CLIENT = 5000
WINDOW = 300                   # unconfirmed messages in flight per connection, at most
PUBLISH_SECONDS = 40           # publishing is paced over this long, so the chaos hits all of it
STEP = 1.0                     # s: each publisher sends its share in bursts this far apart
GATE = PER_CLIENT * 9 // 10    # held back until the chaos minimum is reached
MIN_KILLS = 20
MIN_UPSTREAM_CLOSES = 8
KILL_EVERY = 0.3               # s between client kills
CLOSE_EVERY = 0.5              # s between upstream closes (plus the time a close takes)
CLOSE_REASON = "amqproxy no-loss chaos"
STALL = 15.0                   # s without any frame while confirms are owed: an error
BIG_EVERY = 500                # every 500th message has a 150 kB body (two body frames)

BASIC_RETURN = (60, 50)


def body_of(mid):
    n = int(mid[4:])
    pad = 150 * 1024 if n % BIG_EVERY == BIG_EVERY - 1 else 80
    return mid + b"|" + b"x" * pad


def publish_frames(c, queue, mid):
    """Basic.Publish (mandatory) of a persistent message: the id is its
    message_id and the start of its body."""
    return c.publish_frames(1, "", queue, body_of(mid), c.frame_max, mandatory=True,
                            properties=amqp.encode_properties(delivery_mode=2, message_id=mid.decode()))


class Publisher(threading.Thread):
    def __init__(self, idx, proxy, queue, gate):
        super().__init__(daemon=True, name="publisher-%02d" % idx)
        self.idx, self.proxy, self.queue, self.gate = idx, proxy, queue, gate
        self.name_tag = "nl-client-%02d" % idx
        self.fresh = 0             # next never-published index
        self.retry = []            # ids to publish again (unconfirmed when a connection died, or nacked)
        self.confirmed = set()     # ids the broker acked
        self.unconfirmed = {}      # on the live connection: delivery tag -> id, in tag order
        self.errors = []
        self.lock = threading.Lock()
        self.client = None         # the live RawClient, while publishing on it
        self.kill_partial = False  # the killer asks for a mid-message abort
        self.counts = {"connections": 0, "connect_failures": 0, "acks": 0, "multiple_acks": 0,
                       "nacks": 0, "republished": 0, "closed_320": 0, "killed_shutdown": 0,
                       "killed_partial": 0, "in_flight_at_kill": 0, "in_flight_at_320": 0,
                       "lost_connection": 0}
        self.done = threading.Event()
        self.t_start = None
        self.phase = random.random() * STEP  # bursts of the publishers spread over a step

    def mid(self, n):
        return b"c%02d-%05d" % (self.idx, n)

    def allowed(self):
        """How many fresh messages the pace allows by now."""
        steps = int((time.monotonic() - self.t_start + self.phase) / STEP)
        n = min(PER_CLIENT, -(-PER_CLIENT * steps * STEP // PUBLISH_SECONDS))
        return n if self.gate.is_set() else min(n, GATE)

    # ------------------------------------------------------------ thread
    def run(self):
        self.t_start = time.monotonic()
        try:
            while not self.session():
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001
            self.errors.append("%s: unexpected %r" % (self.name, e))
        finally:
            self.done.set()

    def connect(self):
        deadline = time.monotonic() + 30
        while True:
            c = None
            try:
                c = amqp.RawClient(self.proxy.host, self.proxy.port, timeout=10)
                c.handshake(USER, PASSWORD, client_properties={"connection_name": self.name_tag})
                c.channel_open(1)
                c.confirm_select(1)
                return c
            except (OSError, amqp.SocketClosed, amqp.ConnectionClosed, amqp.ChannelClosed) as e:
                self.counts["connect_failures"] += 1
                if c is not None:
                    c.abort()
                if time.monotonic() > deadline:
                    raise AssertionError("%s could not connect for 30 s: %r" % (self.name, e))
                time.sleep(0.1)

    def frames(self, c, timeout):
        """The next frame (waiting up to timeout) and every further frame
        already received; [] on timeout."""
        try:
            out = [c.read_frame(timeout=timeout)]
        except socket.timeout:
            return []
        while frame_buffered(c):
            out.append(c.read_frame(timeout=1))
        return out

    def session(self):
        """One connection: publish until everything is confirmed or the
        connection dies. Returns True when done."""
        c = self.connect()
        self.counts["connections"] += 1
        unconfirmed = self.unconfirmed = {}
        tag = 0
        with self.lock:
            self.client, self.kill_partial = c, False
        try:
            last_frame = time.monotonic()
            while True:
                # ---- publish: what has to go again, and fresh messages as the pace allows
                out = []
                allowed = self.allowed()
                while len(unconfirmed) < WINDOW:
                    if self.retry:
                        m = self.retry.pop()
                        self.counts["republished"] += 1
                    elif self.fresh < allowed:
                        m = self.mid(self.fresh)
                        self.fresh += 1
                    else:
                        break
                    tag += 1
                    unconfirmed[tag] = m
                    out.append(publish_frames(c, self.queue, m))
                if self.kill_partial:
                    # the killer's request: what is queued, part of one more
                    # message (not taken: it stays next), then RST
                    nxt = self.retry[-1] if self.retry else self.mid(min(self.fresh, PER_CLIENT - 1))
                    msg = publish_frames(c, self.queue, nxt)
                    with self.lock:
                        self.client = None
                        self.counts["in_flight_at_kill"] += len(unconfirmed)
                    try:
                        c.send(b"".join(out) + msg[:random.randint(1, len(msg) - 1)])
                    except OSError:
                        pass
                    c.abort()
                    self.counts["killed_partial"] += 1
                    return False  # `finally` queues every unconfirmed message again
                if out:
                    c.send(b"".join(out))
                if not unconfirmed and len(self.confirmed) >= PER_CLIENT:
                    with self.lock:
                        self.client = None
                    try:
                        c.connection_close(timeout=10)
                    except (OSError, amqp.SocketClosed, amqp.ConnectionClosed):
                        c.abort()
                    return True
                # ---- read: confirms owed, or (waiting for the pace) a Connection.Close
                frames = self.frames(c, 0.5 if unconfirmed else 0.05)
                if frames:
                    last_frame = time.monotonic()
                elif not unconfirmed:
                    last_frame = time.monotonic()
                elif time.monotonic() - last_frame > STALL:
                    self.errors.append("%s: no confirm for %.0f s with %d unconfirmed (first tag %d)"
                                       % (self.name, STALL, len(unconfirmed), next(iter(unconfirmed))))
                    c.abort()
                    return False
                for f in frames:
                    self.handle(c, f, unconfirmed, tag)
        except amqp.ConnectionClosed as e:
            # the proxy relays the broker closing the upstream connection
            if e.reply_code == 320 and CLOSE_REASON in e.reply_text:
                self.counts["closed_320"] += 1
                self.counts["in_flight_at_320"] += len(unconfirmed)
            else:
                self.errors.append("%s: unexpected Connection.Close %d %r" % (self.name, e.reply_code, e.reply_text))
            c.abort()
        except (OSError, amqp.SocketClosed):
            # killed (shutdown from the killer thread) or the proxy dropped us
            self.counts["lost_connection"] += 1
            c.abort()
        except amqp.ChannelClosed as e:
            self.errors.append("%s: unexpected Channel.Close %d %r" % (self.name, e.reply_code, e.reply_text))
            c.abort()
        finally:
            with self.lock:
                self.client = None
            # republish everything this connection did not get confirmed
            self.retry.extend(reversed(list(unconfirmed.values())))
            unconfirmed.clear()
        return False

    def handle(self, c, f, unconfirmed, last_tag):
        if f.type == amqp.FRAME_HEARTBEAT:
            return
        if f.type != amqp.FRAME_METHOD:
            self.errors.append("%s: unexpected frame %r" % (self.name, f))
            return
        m = f.method
        if m in (amqp.BASIC_ACK, amqp.BASIC_NACK):
            dtag, bits = f.args().unpack(">QB")  # Nack: bit 0 multiple, bit 1 requeue
            multiple = bool(bits & 1)
            kind = "ack" if m == amqp.BASIC_ACK else "nack"
            if f.channel != 1:
                self.errors.append("%s: %s on channel %d" % (self.name, kind, f.channel))
                return
            if dtag > last_tag or (dtag == 0 and not multiple):
                self.errors.append("%s: %s for tag %d, only %d published on this connection"
                                   % (self.name, kind, dtag, last_tag))
                return
            if multiple:
                tags = [t for t in unconfirmed if t <= dtag]  # dict order is tag order
                if not tags:
                    self.errors.append("%s: multiple %s up to %d settles nothing" % (self.name, kind, dtag))
            elif dtag in unconfirmed:
                tags = [dtag]
            else:
                self.errors.append("%s: %s for tag %d, already settled" % (self.name, kind, dtag))
                return
            if m == amqp.BASIC_ACK:
                self.counts["acks"] += 1
                self.counts["multiple_acks"] += multiple
                for t in tags:
                    self.confirmed.add(unconfirmed.pop(t))
            else:
                self.counts["nacks"] += 1
                for t in tags:
                    self.retry.append(unconfirmed.pop(t))
            return
        if m == BASIC_RETURN:
            self.errors.append("%s: Basic.Return (unroutable) %r" % (self.name, f))
            return
        if m == amqp.CONNECTION_CLOSE:
            code, text, cid, mid = amqp.close_args(f)
            try:
                c.send(amqp.method_frame(0, amqp.CONNECTION_CLOSE_OK))
            except OSError:
                pass
            raise amqp.ConnectionClosed(code, text, cid, mid)
        if m == amqp.CHANNEL_CLOSE:
            code, text, _cid, _mid = amqp.close_args(f)
            raise amqp.ChannelClosed(f.channel, code, text)
        self.errors.append("%s: unexpected method %r" % (self.name, f))

    # ------------------------------------------------------------ killer's side
    def kill(self, partial):
        """Called from the killer thread. Returns True if a live connection
        was (or will at once be) killed."""
        with self.lock:
            c = self.client
            if c is None or self.kill_partial:
                return False
            if partial:
                self.kill_partial = True
                return True  # done and counted by the publisher's thread
            self.client = None
            self.counts["in_flight_at_kill"] += len(self.unconfirmed)
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
            self.counts["killed_shutdown"] += 1
            return True


def frame_buffered(c):
    """A whole frame is already in the client's buffer."""
    if c.pending:
        return True
    if len(c.buf) < 7:
        return False
    size = struct.unpack_from(">I", c.buf, 3)[0]
    return len(c.buf) >= 8 + size


class Chaos:
    def __init__(self, broker, proxy, publishers, gate):
        self.broker, self.proxy, self.publishers, self.gate = broker, proxy, publishers, gate
        self.stop = threading.Event()
        self.kills_requested = 0
        self.upstream_closes = 0
        self.close_failures = []
        self.errors = []
        # direct mode (the tests' self-check): the broker closes client connections instead
        self.prefix = "nl-client-" if proxy.direct else proxy.upstream_prefix()
        self.threads = [threading.Thread(target=self._guard, args=(self.killer,), daemon=True, name="killer"),
                        threading.Thread(target=self._guard, args=(self.closer,), daemon=True, name="closer")]

    def _guard(self, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.errors.append("%s: %r" % (threading.current_thread().name, e))

    def check_gate(self):
        if self.kills() >= MIN_KILLS and self.upstream_closes >= MIN_UPSTREAM_CLOSES:
            self.gate.set()

    def kills(self):
        return sum(p.counts["killed_shutdown"] + p.counts["killed_partial"] for p in self.publishers)

    def killer(self):
        rnd = random.Random(1)
        i = 0
        while not self.stop.wait(KILL_EVERY):
            live = [p for p in self.publishers if not p.done.is_set()]
            if not live:
                return
            busy = [p for p in live if p.unconfirmed]
            if rnd.choice(busy or live).kill(partial=(i % 2 == 1)):
                self.kills_requested += 1
                i += 1
            self.check_gate()

    def closer(self):
        rnd = random.Random(2)
        while not self.stop.wait(CLOSE_EVERY):
            try:
                if not self.close_one(rnd):
                    continue  # none there right now (all being re-established)
                self.upstream_closes += 1
            except (RuntimeError, AssertionError) as e:
                # gone by itself between listing and closing
                self.close_failures.append(repr(e))
            self.check_gate()

    def close_one(self, rnd):
        """Close one of the proxy's upstream connections through the broker.
        With rabbitmqctl: two calls (list with pids, close) instead of the
        three of named() + close_connection(), which are slow under load."""
        if self.broker.backend != "ctl":
            conns = self.broker.named(self.prefix)
            if conns:
                self.broker.close_connection(rnd.choice(conns), CLOSE_REASON)
            return bool(conns)
        marker = '{"connection_name","%s' % self.prefix
        pids = [line.split("\t", 1)[0] for line in
                self.broker.ctl("list_connections", "-q", "--no-table-headers", "pid",
                                "client_properties").splitlines() if marker in line]
        if pids:
            self.broker.ctl("close_connection", rnd.choice(pids), CLOSE_REASON)
        return bool(pids)

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def drain(queue, expected_at_least):
    """Every message in the queue, straight from the broker.
    Returns ({id: copies}, messages read, corrupt messages, messages left)."""
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=BROKER_HOST, port=BROKER_PORT, credentials=pika.PlainCredentials(USER, PASSWORD)))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=2000)
    copies, corrupt = {}, []
    n = quiet = 0
    for method, props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=2):
        if method is None:  # 2 s without a message
            quiet += 1
            if n >= expected_at_least or quiet >= 5:
                break
            continue
        mid = props.message_id.encode() if props.message_id else None
        if mid is None or body != body_of(mid) or props.delivery_mode != 2:
            corrupt.append((props.message_id, props.delivery_mode, body[:40], len(body)))
        else:
            copies[mid] = copies.get(mid, 0) + 1
        n += 1
    ch.cancel()
    left = ch.queue_declare(queue, durable=True, passive=True).method.message_count
    ch.queue_delete(queue)
    conn.close()
    return copies, n, corrupt, left


@pytest.mark.timeout_s(360)
def test_no_confirmed_message_lost_under_chaos(start_proxy, broker):
    p = start_proxy()
    queue = unique("no-loss")
    setup = pika.BlockingConnection(pika.ConnectionParameters(
        host=BROKER_HOST, port=BROKER_PORT, credentials=pika.PlainCredentials(USER, PASSWORD)))
    setup.channel().queue_declare(queue, durable=True, arguments={"x-expires": 600000})
    setup.close()

    gate = threading.Event()
    chaos = None
    pubs = []
    t0 = time.monotonic()
    try:
        pubs = [Publisher(i, p, queue, gate) for i in range(CLIENTS)]
        chaos = Chaos(broker, p, pubs, gate)
        for pub in pubs:
            pub.start()
        chaos.start()
        for pub in pubs:
            pub.done.wait(timeout=max(1, 300 - (time.monotonic() - t0)))
        t_published = time.monotonic() - t0
    finally:
        if chaos is not None:
            chaos.finish()
    stuck = [pub.name for pub in pubs if not pub.done.is_set()]
    errors = [e for pub in pubs for e in pub.errors] + chaos.errors
    totals = {k: sum(pub.counts[k] for pub in pubs) for k in pubs[0].counts}
    confirmed = set()
    for pub in pubs:
        confirmed |= pub.confirmed

    copies, n_queued, corrupt, left = drain(queue, len(confirmed))
    runtime = time.monotonic() - t0
    missing = sorted(confirmed - set(copies))
    foreign = sorted(set(copies) - {pub.mid(n) for pub in pubs for n in range(PER_CLIENT)})
    dups = n_queued - len(copies)
    kills = totals["killed_shutdown"] + totals["killed_partial"]
    print("\nno-loss: confirmed %d, in queue %d (%d distinct, %d duplicates), left %d; "
          "client kills %d (%d shutdown, %d mid-message), upstream closes %d (%d failed); "
          "publishing %.1f s, total %.1f s"
          % (len(confirmed), n_queued, len(copies), dups, left, kills, totals["killed_shutdown"],
             totals["killed_partial"], chaos.upstream_closes, len(chaos.close_failures), t_published, runtime))
    print("publisher totals: %r" % totals)

    assert not stuck, "publishers did not finish: %r (errors %r)" % (stuck, errors[:10])
    assert not errors, "errors: %r" % errors[:20]
    assert kills >= MIN_KILLS, "only %d client kills" % kills
    assert chaos.upstream_closes >= MIN_UPSTREAM_CLOSES, "only %d upstream closes" % chaos.upstream_closes
    assert totals["closed_320"] >= 1, "no client saw an upstream close"
    assert len(confirmed) == CLIENTS * PER_CLIENT
    assert not missing, "%d confirmed messages are not in the queue, e.g. %r" % (len(missing), missing[:10])
    assert not foreign, "messages nobody published: %r" % foreign[:10]
    assert not corrupt, "%d messages in the queue are not as published, e.g. %r" % (len(corrupt), corrupt[:5])
    assert left == 0
    # the proxy is still fine: a plain client round trip
    c = p.connect()
    ch = c.channel()
    q2 = unique("no-loss-after")
    ch.queue_declare(q2, arguments={"x-expires": 60000})
    ch.confirm_delivery()
    ch.basic_publish("", q2, b"after the chaos")
    assert ch.basic_get(q2, auto_ack=True)[2] == b"after the chaos"
    ch.queue_delete(q2)
    c.close()
