"""A fault-injecting TCP relay to put between the proxy and the broker.

    relay = FaultRelay()                 # listens on 127.0.0.1:<relay.port>
    proxy = start_proxy(..., upstream=relay.url)

Every accepted connection is a *link*: the accepted socket (the proxy's side,
"down") and a socket to the broker ("up"). The relay parses the AMQP frames
going through (it forwards whole frames, so it can rewrite or truncate them)
and records per link: the user the proxy authenticated as (from the PLAIN
response in Connection.StartOk), the broker's Connection.Tune, frame and byte
counts, and how and when the link ended.

Faults, switched at run time from the test's thread (each call returns the
time.monotonic() at which the fault took effect in the relay's thread):

  cut(mode, user=None)           end links now: "rst" (SO_LINGER 0: RST to
                                 both peers, unsent data discarded) or "fin"
                                 (shutdown(SHUT_WR) to both peers)
  arm_mid_publish_cut(n, ...)    end the link that carries the next
                                 Basic.Publish (optionally: to a routing key)
                                 once n body bytes of it have passed to the
                                 broker: the broker gets a truncated body frame
                                 and then the RST/FIN. Returns a Trigger.
  blackhole(user=None)           stop forwarding both ways but keep every
                                 socket open; data read is dropped. A peer's
                                 FIN/RST is not passed on either (a black hole
                                 tells nobody anything): the relay closes only
                                 its socket to that peer.
  stall(user=None)               stop reading both ways (data waits in the
                                 kernel buffers and flows again on restore())
  refuse(how)                    new connections: "closed" closes the
                                 listener (ECONNREFUSED), "reset" accepts and
                                 resets at once, "close" accepts and closes
  hold_connects()                new connections are accepted but never
                                 connected to the broker nor answered
  delay_connects(seconds)        new connections are accepted, and connected
                                 to the broker only after `seconds`
  restore()                      back to forwarding everything (reopens the
                                 listener on the same port if it was closed)
  rewrite_heartbeat(seconds)     rewrite the heartbeat field of the broker's
                                 Connection.Tune on new links (None: off), so
                                 the proxy, which takes the broker's value,
                                 runs a short upstream heartbeat without the
                                 shared broker being reconfigured

Queries: live() (links with a socket still open), links() (snapshots as
dicts), wait_live(pred_or_count), counters accepted / refused / held.

All sockets are owned by one thread running a selector loop; the methods
above hand work to it and wait for it to be done. Standard library only.
"""

import collections
import errno
import fcntl
import heapq
import itertools
import selectors
import socket
import struct
import termios
import threading
import time

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
_FRAME_TYPES = (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT)
_MAX_FRAME = 64 * 1024 * 1024
_HIGH_WATER = 1 << 20          # stop reading a side while the other side has this much queued
_START_OK = struct.pack(">HH", 10, 11)
_TUNE = struct.pack(">HH", 10, 30)
_PUBLISH = struct.pack(">HH", 60, 40)

BROKER = ("127.0.0.1", 5672)


def _shortstr(buf, pos):
    n = buf[pos]
    return bytes(buf[pos + 1:pos + 1 + n]).decode("utf-8", "replace"), pos + 1 + n


class Trigger:
    """An armed mid-publish cut. fired is set once the link has been cut;
    then at (monotonic time of the cut), link (its index), routing_key and
    body_bytes (body bytes of the publish that reached the broker) are set."""

    def __init__(self, after_body_bytes, routing_key, mode):
        self.after = after_body_bytes
        self.routing_key = routing_key
        self.mode = mode
        self.fired = threading.Event()
        self.matched_at = None
        self.at = None
        self.link = None
        self.body_bytes = None

    def wait(self, timeout):
        if not self.fired.wait(timeout):
            raise AssertionError("the relay's mid-publish cut did not happen within %.0f s" % timeout)
        return self.at


class _Stream:
    """One direction of a link: bytes not yet parsed into whole frames."""

    def __init__(self, skip):
        self.buf = bytearray()
        self.skip = skip      # bytes to pass unparsed (the protocol header)
        self.raw = False      # not AMQP frames after all: pass bytes through


class _Link:
    def __init__(self, idx, down, flow):
        self.idx = idx
        self.down = down               # accepted socket: the proxy's side
        self.up = None                 # socket to the broker
        self.state = "accepted"        # delaying, connecting, open, held, blackhole-only, closed
        self.flow = flow               # pass, blackhole, stall
        self.t_accept = time.monotonic()
        self.t_open = None
        self.t_closed = None
        self.how_closed = None
        self.user = None
        self.tune = None
        # bytes waiting to be written: "up" to the broker, "down" to the proxy
        self.out = {"up": bytearray(), "down": bytearray()}
        self.streams = {"up": _Stream(skip=8), "down": _Stream(skip=0)}
        self.eof = set()               # sides ("down"/"up" socket) that sent EOF
        self.closing = None            # reason: close once pending output is written
        self.cutting = None            # (mode, deadline, trigger): after a mid-publish cut
        self.publishing = {}           # channel -> {"rk":, "body":} for publishes in flight
        self.frames = {"up": 0, "down": 0}
        self.bytes = {"up": 0, "down": 0}     # read from the source side
        self.sent = {"up": 0, "down": 0}      # written to the destination side
        self.dropped = {"up": 0, "down": 0}

    def socks(self):
        return [s for s in (self.down, self.up) if s is not None]

    def snapshot(self):
        return {"idx": self.idx, "state": self.state, "flow": self.flow, "user": self.user,
                "tune": dict(self.tune) if self.tune else None,
                "t_accept": self.t_accept, "t_open": self.t_open, "t_closed": self.t_closed,
                "how_closed": self.how_closed, "frames": dict(self.frames),
                "bytes": dict(self.bytes), "sent": dict(self.sent), "dropped": dict(self.dropped),
                "down_port": self._port(self.down, peer=True), "up_port": self._port(self.up, peer=False)}

    @staticmethod
    def _port(s, peer):
        try:
            return (s.getpeername() if peer else s.getsockname())[1] if s is not None else None
        except OSError:
            return None


class FaultRelay:
    def __init__(self, target=BROKER, host="127.0.0.1"):
        self.target = tuple(target)
        self.host = host
        self.sel = selectors.DefaultSelector()
        self._masks = {}
        self._timers = []
        self._seq = itertools.count()
        self._commands = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._links = []
        self.accept_mode = "forward"   # forward, hold, reset, close
        self.listening = False
        self.connect_delay = 0.0
        self.flow_default = "pass"
        self.heartbeat = None
        self.trigger = None
        self.accepted = 0
        self.refused = 0
        self.held = 0
        self.errors = []
        self.log = []                  # (monotonic time, text)
        self.lsock = None
        self.port = 0
        self._listen()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="faultrelay:%d" % self.port)
        self._thread.start()

    @property
    def url(self):
        return "amqp://%s:%d" % (self.host, self.port)

    # ================================================================ public API
    def live(self):
        """Links that still have a socket open (held connections included)."""
        return self._call(lambda: len([l for l in self._links if l.state != "closed"]))

    def links(self, live_only=False):
        return self._call(lambda: [l.snapshot() for l in self._links
                                   if not live_only or l.state != "closed"])

    def wait_live(self, want, timeout=10, desc=None):
        """Poll until live() == want (an int) or want(live()) holds."""
        pred = want if callable(want) else (lambda n: n == want)
        deadline = time.monotonic() + timeout
        while True:
            n = self.live()
            if pred(n):
                return n
            if time.monotonic() >= deadline:
                raise AssertionError("relay: timed out after %.0f s waiting for %s; live links: %r"
                                     % (timeout, desc or ("live == %r" % (want,)), self.links(live_only=True)))
            time.sleep(0.05)

    def rewrite_heartbeat(self, seconds):
        def do():
            self.heartbeat = seconds
        self._call(do)

    def cut(self, mode="rst", user=None):
        """End every live link (of `user`, if given) now. Returns (time, count)."""
        assert mode in ("rst", "fin"), mode

        def do():
            t = time.monotonic()
            n = 0
            for l in list(self._links):
                if l.state != "closed" and (user is None or l.user == user):
                    self._close_link(l, mode, "cut (%s)" % mode)
                    n += 1
            return t, n
        return self._call(do)

    def arm_mid_publish_cut(self, after_body_bytes, routing_key=None, mode="rst"):
        assert mode in ("rst", "fin"), mode
        t = Trigger(after_body_bytes, routing_key, mode)

        def do():
            self.trigger = t
        self._call(do)
        return t

    def blackhole(self, user=None):
        return self._set_flow("blackhole", user)

    def stall(self, user=None):
        return self._set_flow("stall", user)

    def refuse(self, how="closed"):
        """New connections are refused: "closed" (no listener: ECONNREFUSED),
        "reset" (accepted, then RST at once) or "close" (accepted, then closed)."""
        assert how in ("closed", "reset", "close"), how

        def do():
            t = time.monotonic()
            if how == "closed":
                self._unlisten()
            else:
                self.accept_mode = how
            self._note("refusing new connections (%s)" % how)
            return t
        return self._call(do)

    def hold_connects(self):
        """Accept new connections but never connect them to the broker."""
        def do():
            self.accept_mode = "hold"
            return time.monotonic()
        return self._call(do)

    def delay_connects(self, seconds):
        def do():
            self.connect_delay = float(seconds)
            return time.monotonic()
        return self._call(do)

    def restore(self):
        """Undo every fault: forward everything again, for existing links
        (blackholed or stalled ones) and new ones. Links already cut stay cut."""
        def do():
            self.accept_mode = "forward"
            self.connect_delay = 0.0
            self.flow_default = "pass"
            self.trigger = None
            if not self.listening:
                self._listen()
            for l in self._links:
                if l.state != "closed" and l.flow != "pass":
                    l.flow = "pass"
                    self._refresh(l)
            self._note("restored")
            return time.monotonic()
        return self._call(do)

    def close(self):
        if self._stopping:
            return

        def do():
            self._stopping = True
            for l in list(self._links):
                self._close_link(l, "rst" if l.state == "finning" else "close", "relay closed")
            self._unlisten()
        try:
            self._call(do)
        except Exception:
            self._stopping = True
        self._thread.join(timeout=5)
        for s in (self._wake_r, self._wake_w):
            s.close()
        self.sel.close()

    # ================================================================ plumbing
    def _call(self, fn, timeout=10):
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box = {}
        self._commands.append((fn, box, done))
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass
        if not done.wait(timeout):
            raise AssertionError("the relay's thread did not answer within %.0f s" % timeout)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _on_wake(self, mask):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _note(self, text):
        self.log.append((time.monotonic(), text))

    def _run(self):
        while not self._stopping:
            timeout = 0.05
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            try:
                events = self.sel.select(timeout)
            except OSError as e:  # a socket closed under us: should not happen
                self.errors.append("select: %r" % e)
                events = []
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception as e:  # keep the relay alive; the test reads errors
                    self.errors.append("%r in %r" % (e, key.data))
            while self._commands:
                fn, box, done = self._commands.popleft()
                try:
                    box["value"] = fn()
                except Exception as e:
                    box["error"] = e
                done.set()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                try:
                    fn()
                except Exception as e:
                    self.errors.append("timer: %r" % e)
            for l in self._links:
                if l.cutting is not None:
                    self._maybe_finish_cut(l)
        # drain commands issued while stopping
        while self._commands:
            fn, box, done = self._commands.popleft()
            box["error"] = RuntimeError("relay stopped")
            done.set()

    def _at(self, delay, fn):
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _want(self, sock, mask, cb):
        old = self._masks.get(sock)
        if mask == old:
            return
        if not mask:
            if old:
                self.sel.unregister(sock)
            self._masks[sock] = 0
            return
        if old:
            self.sel.modify(sock, mask, cb)
        else:
            self.sel.register(sock, mask, cb)
        self._masks[sock] = mask

    def _forget(self, sock):
        if sock is None:
            return
        if self._masks.pop(sock, 0):
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    # ================================================================ listener
    def _listen(self):
        last = None
        for _ in range(40):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:  # the port, released by refuse("closed"), taken meanwhile
                s.close()
                last = e
                time.sleep(0.05)
                continue
            s.listen(64)
            s.setblocking(False)
            self.lsock = s
            self.port = s.getsockname()[1]
            self.listening = True
            self._want(s, selectors.EVENT_READ, self._on_accept)
            return
        raise RuntimeError("relay: cannot listen on %s:%d again: %r" % (self.host, self.port, last))

    def _unlisten(self):
        if self.lsock is not None:
            self._forget(self.lsock)
            self.lsock.close()
            self.lsock = None
        self.listening = False

    def _on_accept(self, mask):
        while self.lsock is not None:
            try:
                down, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.errors.append("accept: %r" % e)
                return
            down.setblocking(False)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.accept_mode in ("reset", "close"):
                self.refused += 1
                if self.accept_mode == "reset":
                    down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                down.close()
                continue
            self.accepted += 1
            l = _Link(len(self._links), down, self.flow_default)
            self._links.append(l)
            if self.accept_mode == "hold":
                self.held += 1
                l.state = "held"
                self._refresh(l)
            elif self.connect_delay > 0:
                l.state = "delaying"
                self._at(self.connect_delay, lambda l=l: self._connect_up(l))
                self._refresh(l)
            else:
                self._connect_up(l)

    def _connect_up(self, l):
        if l.state == "closed":
            return
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        l.up = up
        l.state = "connecting"
        err = up.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS):
            self._close_link(l, "rst", "connect to the broker failed: %s" % errno.errorcode.get(err, err))
            return
        self._refresh(l)

    # ================================================================ links
    def _set_flow(self, flow, user):
        def do():
            t = time.monotonic()
            if user is None:
                self.flow_default = flow
            for l in self._links:
                if l.state != "closed" and (user is None or l.user == user):
                    l.flow = flow
                    self._refresh(l)
            self._note("%s (user=%r)" % (flow, user))
            return t
        return self._call(do)

    def _refresh(self, l):
        """Register each socket of the link for what it should wait for now."""
        if l.state == "closed":
            return
        for sock, side in ((l.down, "down"), (l.up, "up")):
            if sock is None or sock.fileno() < 0:
                continue
            feeds = "up" if side == "down" else "down"   # direction of the bytes read from it
            drains = side                                 # out[...] written to it
            mask = 0
            if l.state == "connecting" and side == "up":
                mask = selectors.EVENT_WRITE
            elif l.state == "finning":
                mask = selectors.EVENT_READ if side not in l.eof else 0
            else:
                reading = (side not in l.eof and l.closing is None and l.cutting is None
                           and l.flow != "stall")
                if reading and l.state == "open" and l.flow == "pass" and len(l.out[feeds]) >= _HIGH_WATER:
                    reading = False
                if reading:
                    mask |= selectors.EVENT_READ
                if l.out[drains] and (l.state == "open" or side == "down"):
                    mask |= selectors.EVENT_WRITE
            self._want(sock, mask, lambda m, l=l, side=side: self._on_event(l, side, m))

    def _on_event(self, l, side, mask):
        if l.state == "closed":
            return
        sock = l.down if side == "down" else l.up
        if sock is None:
            return
        if l.state == "connecting" and side == "up":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close_link(l, "rst", "connect to the broker failed: %s" % errno.errorcode.get(err, err))
                return
            l.state = "open"
            l.t_open = time.monotonic()
            self._flush(l, "up")
            self._refresh(l)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(l, side)
            if l.state == "closed":
                return
        if mask & selectors.EVENT_READ:
            self._read(l, side)
        if l.state != "closed":
            self._refresh(l)

    def _read(self, l, side):
        sock = l.down if side == "down" else l.up
        direction = "up" if side == "down" else "down"
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._side_gone(l, side, "%s: %s" % (side, e.__class__.__name__), reset=True)
            return
        if not data:
            self._side_gone(l, side, "EOF from the %s side" % ("proxy" if side == "down" else "broker"),
                            reset=False)
            return
        l.bytes[direction] += len(data)
        if l.state in ("held", "finning") or l.flow == "blackhole" or l.cutting is not None:
            l.dropped[direction] += len(data)
            return
        self._ingest(l, direction, data)

    def _side_gone(self, l, side, reason, reset):
        """A peer closed (or reset) its connection to the relay."""
        l.eof.add(side)
        sock = l.down if side == "down" else l.up
        if l.state == "finning" or l.flow == "blackhole" or l.state == "held":
            # nothing is passed on: close our socket to that peer only
            self._forget(sock)
            sock.close()
            if side == "down":
                l.down = None
            else:
                l.up = None
            if not l.socks():
                self._closed(l, l.how_closed or reason)
            return
        if reset:
            self._close_link(l, "rst", reason)
            return
        # pass the close on once what that peer sent is written to the other one
        l.closing = reason
        self._maybe_close(l)

    def _maybe_close(self, l):
        if l.closing is None or l.state == "closed":
            return
        other = "up" if "down" in l.eof else "down"   # the side still to be written to
        if not l.out[other] or (other == "up" and l.state != "open"):
            self._close_link(l, "close", l.closing)

    def _ingest(self, l, direction, data):
        st = l.streams[direction]
        st.buf += data
        out = l.out[direction]
        if st.skip:
            n = min(st.skip, len(st.buf))
            out += st.buf[:n]
            del st.buf[:n]
            st.skip -= n
        cut = None
        while not st.raw and len(st.buf) >= 7:
            ftype, ch, size = struct.unpack_from(">BHI", st.buf, 0)
            if ftype not in _FRAME_TYPES or size > _MAX_FRAME:
                st.raw = True
                break
            if len(st.buf) < size + 8:
                break
            fr = bytes(st.buf[:size + 8])
            del st.buf[:size + 8]
            l.frames[direction] += 1
            fr, cut = self._on_frame(l, direction, ftype, ch, fr)
            out += fr
            if cut is not None:
                break
        if st.raw and cut is None and st.buf:
            out += st.buf
            st.buf.clear()
        if cut is not None:
            st.buf.clear()
            l.cutting = (cut.mode, time.monotonic() + 3.0, cut)
            self._note("link %d: mid-publish cut armed at %d body bytes" % (l.idx, cut.after))
        self._flush(l, direction)
        if cut is not None and l.state != "closed":
            self._maybe_finish_cut(l)

    def _on_frame(self, l, direction, ftype, ch, fr):
        """Inspect (and maybe rewrite or truncate) one whole frame.
        Returns (bytes to forward, Trigger if the link is to be cut after them)."""
        if ftype == FRAME_METHOD and len(fr) >= 12:
            cm = fr[7:11]
            if direction == "down" and ch == 0 and cm == _TUNE and len(fr) >= 20:
                channel_max, frame_max, hb = struct.unpack_from(">HIH", fr, 11)
                sent = hb
                if self.heartbeat is not None:
                    sent = self.heartbeat
                    fr = fr[:17] + struct.pack(">H", sent) + fr[19:]
                l.tune = {"channel_max": channel_max, "frame_max": frame_max,
                          "heartbeat": hb, "heartbeat_forwarded": sent}
            elif direction == "up" and ch == 0 and cm == _START_OK:
                try:
                    pos = 11
                    (tlen,) = struct.unpack_from(">I", fr, pos)
                    pos += 4 + tlen
                    _mech, pos = _shortstr(fr, pos)
                    (rlen,) = struct.unpack_from(">I", fr, pos)
                    resp = fr[pos + 4:pos + 4 + rlen]
                    parts = resp.split(b"\x00")
                    if len(parts) == 3:
                        l.user = parts[1].decode("utf-8", "replace")
                except (struct.error, IndexError):
                    pass
            elif direction == "up" and cm == _PUBLISH:
                try:
                    pos = 13  # class, method, reserved-1
                    _exchange, pos = _shortstr(fr, pos)
                    rk, pos = _shortstr(fr, pos)
                except IndexError:
                    rk = None
                l.publishing[ch] = {"rk": rk, "body": 0}
        elif ftype == FRAME_BODY and direction == "up" and ch in l.publishing:
            p = l.publishing[ch]
            t = self.trigger
            size = len(fr) - 8
            if (t is not None and not t.fired.is_set() and t.link is None
                    and (t.routing_key is None or t.routing_key == p["rk"])):
                if t.matched_at is None:
                    t.matched_at = time.monotonic()
                if p["body"] + size > t.after:
                    k = t.after - p["body"]
                    t.link = l.idx
                    t.body_bytes = t.after
                    self.trigger = None
                    return fr[:7 + k], t
            p["body"] += size
        return fr, None

    def _flush(self, l, direction):
        """Write what is queued for the `direction` side's socket."""
        sock = l.up if direction == "up" else l.down
        buf = l.out[direction]
        if not buf or sock is None or l.state == "closed":
            return
        if direction == "up" and l.state != "open":
            return
        try:
            n = sock.send(buf)
            del buf[:n]
            l.sent[direction] += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._close_link(l, "rst", "write to the %s side: %s" % (
                "broker" if direction == "up" else "proxy", e.__class__.__name__))
            return
        if l.closing is not None:
            self._maybe_close(l)

    @staticmethod
    def _unacked(sock):
        """Bytes in the socket's send queue not yet acknowledged by the peer."""
        try:
            buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\x00\x00\x00\x00")
            return struct.unpack("i", buf)[0]
        except OSError:
            return 0

    def _maybe_finish_cut(self, l):
        mode, deadline, trig = l.cutting
        if l.state == "closed":
            l.cutting = None
            return
        # the truncated publish must reach the broker before the RST, which
        # would discard whatever is still queued
        if (l.out["up"] or (l.up is not None and self._unacked(l.up))) and time.monotonic() < deadline:
            self._refresh(l)
            return
        l.cutting = None
        trig.at = time.monotonic()
        self._close_link(l, mode, "mid-publish cut (%s) after %d body bytes" % (mode, trig.after))
        trig.fired.set()

    def _close_link(self, l, mode, reason):
        """mode: rst (SO_LINGER 0), fin (shutdown both ways for writing, wait
        for the peers' EOF), close (plain close)."""
        if l.state in ("closed", "finning"):
            if mode == "rst" and l.state == "finning":
                pass  # escalate below
            else:
                return
        l.how_closed = reason
        self._note("link %d: %s" % (l.idx, reason))
        if mode == "fin" and l.state != "finning":
            l.state = "finning"
            l.closing = None
            for s in l.socks():
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self._refresh(l)
            self._at(5.0, lambda l=l: self._close_link(l, "rst", l.how_closed + "; no EOF within 5 s"))
            return
        for s in l.socks():
            self._forget(s)
            if mode == "rst":
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            try:
                s.close()
            except OSError:
                pass
        l.down = l.up = None
        self._closed(l, reason)

    def _closed(self, l, reason):
        l.state = "closed"
        l.t_closed = time.monotonic()
        l.how_closed = reason
        l.out["up"].clear()
        l.out["down"].clear()
