"""A minimal AMQP 0-9-1 client over a raw socket, for tests that need to
misbehave (stop mid-publish, stop mid-handshake), to look at frames exactly as
they arrive (frame sizes, channel numbers, property bytes) or to pipeline
requests in ways client libraries do not.

Only what the tests need is implemented. Standard library only.
"""

import socket
import struct
import time

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
PROTOCOL_HEADER_0_9 = b"AMQP\x01\x01\x00\x09"
FRAME_END = 0xCE

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8

# (class_id, method_id) of the methods the tests use
CONNECTION_START = (10, 10)
CONNECTION_START_OK = (10, 11)
CONNECTION_TUNE = (10, 30)
CONNECTION_TUNE_OK = (10, 31)
CONNECTION_OPEN = (10, 40)
CONNECTION_OPEN_OK = (10, 41)
CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CHANNEL_OPEN = (20, 10)
CHANNEL_OPEN_OK = (20, 11)
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
QUEUE_DECLARE = (50, 10)
QUEUE_DECLARE_OK = (50, 11)
BASIC_PUBLISH = (60, 40)
BASIC_GET = (60, 70)
BASIC_GET_OK = (60, 71)
BASIC_GET_EMPTY = (60, 72)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
CONFIRM_SELECT = (85, 10)
CONFIRM_SELECT_OK = (85, 11)


class ConnectionClosed(Exception):
    """The peer sent Connection.Close."""

    def __init__(self, reply_code, reply_text, class_id=0, method_id=0):
        super().__init__(reply_code, reply_text)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.class_id = class_id
        self.method_id = method_id

    def __str__(self):
        return "Connection.Close(%d, %r)" % (self.reply_code, self.reply_text)


class ChannelClosed(Exception):
    def __init__(self, channel, reply_code, reply_text):
        super().__init__(channel, reply_code, reply_text)
        self.channel = channel
        self.reply_code = reply_code
        self.reply_text = reply_text


class SocketClosed(Exception):
    """The peer closed the TCP connection (EOF or reset)."""


# ---------------------------------------------------------------- encoding

def shortstr(s):
    if isinstance(s, str):
        s = s.encode()
    assert len(s) < 256
    return struct.pack(">B", len(s)) + s


def longstr(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack(">I", len(s)) + s


def field_value(v):
    if isinstance(v, bool):
        return b"t" + struct.pack(">B", 1 if v else 0)
    if isinstance(v, int):
        return b"l" + struct.pack(">q", v)
    if isinstance(v, (str, bytes)):
        return b"S" + longstr(v)
    if isinstance(v, dict):
        return b"F" + table(v)
    if v is None:
        return b"V"
    raise TypeError("cannot encode %r" % (v,))


def table_body(d):
    return b"".join(shortstr(k) + field_value(v) for k, v in d.items())


def table(d):
    body = table_body(d)
    return struct.pack(">I", len(body)) + body


def frame(ftype, channel, payload):
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([FRAME_END])


def method_frame(channel, class_method, args=b""):
    return frame(FRAME_METHOD, channel, struct.pack(">HH", *class_method) + args)


def content_header_frame(channel, body_size, properties=None, class_id=60):
    """properties: (flags, encoded property bytes); default: no properties."""
    flags, props = properties or (0, b"")
    return frame(FRAME_HEADER, channel,
                 struct.pack(">HHQH", class_id, 0, body_size, flags) + props)


def body_frames(channel, body, frame_max):
    chunk = frame_max - 8
    return b"".join(frame(FRAME_BODY, channel, body[i:i + chunk])
                    for i in range(0, len(body), chunk))


# ---------------------------------------------------------------- decoding

class Reader:
    def __init__(self, data, pos=0):
        self.data = data
        self.pos = pos

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt):
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def shortstr(self):
        n = self.unpack(">B")
        return self.take(n).decode("utf-8", "replace")

    def longstr(self):
        n = self.unpack(">I")
        return self.take(n)

    def table(self):
        n = self.unpack(">I")
        end = self.pos + n
        out = {}
        while self.pos < end:
            k = self.shortstr()
            out[k] = self.value()
        return out

    def value(self):
        t = self.take(1)
        simple = {b"t": ">B", b"b": ">b", b"B": ">B", b"s": ">h", b"u": ">H",
                  b"I": ">i", b"i": ">I", b"l": ">q", b"L": ">Q", b"f": ">f",
                  b"d": ">d", b"T": ">Q"}
        if t in simple:
            v = self.unpack(simple[t])
            return bool(v) if t == b"t" else v
        if t == b"D":
            return self.unpack(">BI")
        if t == b"S":
            return self.longstr()
        if t == b"x":
            return self.longstr()
        if t == b"F":
            return self.table()
        if t == b"A":
            n = self.unpack(">I")
            end = self.pos + n
            items = []
            while self.pos < end:
                items.append(self.value())
            return items
        if t == b"V":
            return None
        raise ValueError("unknown field type %r" % t)


class Frame:
    __slots__ = ("type", "channel", "payload")

    def __init__(self, ftype, channel, payload):
        self.type = ftype
        self.channel = channel
        self.payload = payload

    @property
    def size(self):
        """Size of the whole frame on the wire (header + payload + end)."""
        return 8 + len(self.payload)

    @property
    def method(self):
        assert self.type == FRAME_METHOD
        return struct.unpack_from(">HH", self.payload, 0)

    def args(self):
        return Reader(self.payload, 4)

    def __repr__(self):
        if self.type == FRAME_METHOD:
            return "<Frame ch=%d method=%s len=%d>" % (self.channel, self.method, len(self.payload))
        return "<Frame type=%d ch=%d len=%d>" % (self.type, self.channel, len(self.payload))


# ---------------------------------------------------------------- client

class RawClient:
    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = bytearray()
        self.frame_max = 131072
        self.server_properties = None
        self.mechanisms = None
        self.tune = None
        self.pending = []  # frames read but not yet consumed by an expect()

    # --- raw I/O
    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Close abruptly: RST instead of FIN, unread data discarded."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no data before deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError as e:
            raise SocketClosed("connection reset") from e
        if not data:
            raise SocketClosed("EOF")
        self.buf += data

    def read_exact(self, n, timeout=None):
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_frame(self, timeout=None):
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while len(self.buf) < 7:
            self._fill(deadline)
        ftype, channel, size = struct.unpack_from(">BHI", self.buf, 0)
        if ftype == ord("A"):
            raise ValueError("got a protocol header instead of a frame: %r" % bytes(self.buf[:8]))
        if size > 64 * 1024 * 1024:
            raise ValueError("absurd frame size %d" % size)
        while len(self.buf) < 8 + size:
            self._fill(deadline)
        payload = bytes(self.buf[7:7 + size])
        end = self.buf[7 + size]
        del self.buf[:8 + size]
        if end != FRAME_END:
            raise ValueError("bad frame end 0x%02x" % end)
        return Frame(ftype, channel, payload)

    def wait_eof(self, timeout):
        """Read (and discard) until the peer closes. Returns the frames seen."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            try:
                frames.append(self.read_frame(timeout=max(0.0, deadline - time.monotonic())))
            except SocketClosed:
                return frames

    def expect(self, class_method, channel=None, timeout=None):
        """Read frames until the given method arrives (heartbeats skipped).
        Connection.Close / Channel.Close arriving instead raise."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            f = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            if f.type == FRAME_HEARTBEAT:
                continue
            if f.type == FRAME_METHOD:
                m = f.method
                if m == class_method and (channel is None or f.channel == channel):
                    return f
                if m == CONNECTION_CLOSE:
                    r = f.args()
                    code = r.unpack(">H")
                    text = r.shortstr()
                    cid, mid = r.unpack(">HH")
                    try:
                        self.send(method_frame(0, CONNECTION_CLOSE_OK))
                    except OSError:
                        pass
                    raise ConnectionClosed(code, text, cid, mid)
                if m == CHANNEL_CLOSE:
                    r = f.args()
                    code = r.unpack(">H")
                    text = r.shortstr()
                    self.send(method_frame(f.channel, CHANNEL_CLOSE_OK))
                    raise ChannelClosed(f.channel, code, text)
            raise AssertionError("expected %s, got %r" % (class_method, f))

    # --- connection
    def start(self, header=PROTOCOL_HEADER):
        """Send the protocol header and read Connection.Start."""
        self.send(header)
        f = self.expect(CONNECTION_START, channel=0)
        r = f.args()
        self.version = r.unpack(">BB")
        self.server_properties = r.table()
        self.mechanisms = r.longstr().decode().split()
        self.locales = r.longstr().decode().split()
        return f

    def handshake(self, user="guest", password="guest", vhost="/",
                  mechanism="PLAIN", frame_max=None, channel_max=None,
                  heartbeat=0, client_properties=None, header=PROTOCOL_HEADER):
        """Full handshake up to Connection.OpenOk. Raises ConnectionClosed if
        the server answers with Connection.Close at any stage."""
        self.start(header)
        props = {
            "product": "amqproxy-tests rawamqp",
            "capabilities": {"authentication_failure_close": True,
                             "publisher_confirms": True, "basic.nack": True},
        }
        props.update(client_properties or {})
        if mechanism == "PLAIN":
            response = b"\x00" + user.encode() + b"\x00" + password.encode()
        elif mechanism == "AMQPLAIN":
            # AMQPLAIN: a field table without its leading length
            response = table_body({"LOGIN": user, "PASSWORD": password})
        else:
            raise ValueError(mechanism)
        self.send(method_frame(0, CONNECTION_START_OK,
                               table(props) + shortstr(mechanism) + longstr(response) + shortstr("en_US")))
        f = self.expect(CONNECTION_TUNE, channel=0)
        s_channel_max, s_frame_max, s_heartbeat = f.args().unpack(">HIH")
        self.tune = (s_channel_max, s_frame_max, s_heartbeat)
        fm = frame_max if frame_max is not None else s_frame_max
        if s_frame_max:
            fm = min(fm, s_frame_max)
        cm = channel_max if channel_max is not None else s_channel_max
        self.frame_max = fm
        self.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(">HIH", cm, fm, heartbeat)))
        self.send(method_frame(0, CONNECTION_OPEN, shortstr(vhost) + shortstr("") + b"\x00"))
        self.expect(CONNECTION_OPEN_OK, channel=0)

    def connection_close(self, timeout=None):
        self.send(method_frame(0, CONNECTION_CLOSE, struct.pack(">H", 200) + shortstr("bye") + struct.pack(">HH", 0, 0)))
        self.expect(CONNECTION_CLOSE_OK, channel=0, timeout=timeout)
        self.close()

    # --- channel level
    def channel_open(self, ch):
        self.send(method_frame(ch, CHANNEL_OPEN, shortstr("")))
        self.expect(CHANNEL_OPEN_OK, channel=ch)

    def queue_declare(self, ch, queue, durable=False, arguments=None, passive=False):
        bits = (0x02 if durable else 0) | (0x01 if passive else 0)
        self.send(method_frame(ch, QUEUE_DECLARE, struct.pack(">H", 0) + shortstr(queue)
                               + bytes([bits]) + table(arguments or {})))
        f = self.expect(QUEUE_DECLARE_OK, channel=ch)
        r = f.args()
        name = r.shortstr()
        msgs, consumers = r.unpack(">II")
        return name, msgs, consumers

    def confirm_select(self, ch):
        self.send(method_frame(ch, CONFIRM_SELECT, b"\x00"))
        self.expect(CONFIRM_SELECT_OK, channel=ch)

    @staticmethod
    def publish_frames(ch, exchange, routing_key, body, frame_max, properties=None,
                       mandatory=False):
        return (method_frame(ch, BASIC_PUBLISH, struct.pack(">H", 0) + shortstr(exchange)
                             + shortstr(routing_key) + bytes([1 if mandatory else 0]))
                + content_header_frame(ch, len(body), properties)
                + body_frames(ch, body, frame_max))

    def publish(self, ch, exchange, routing_key, body, properties=None, mandatory=False):
        self.send(self.publish_frames(ch, exchange, routing_key, body, self.frame_max,
                                      properties, mandatory))

    def basic_get(self, ch, queue, no_ack=True, timeout=None):
        """Returns None for Get-Empty, else a dict with the delivery, the raw
        content header payload, the body, and every frame received."""
        self.send(method_frame(ch, BASIC_GET, struct.pack(">H", 0) + shortstr(queue)
                               + bytes([1 if no_ack else 0])))
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            f = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            if f.type == FRAME_HEARTBEAT:
                continue
            break
        frames = [f]
        if f.type == FRAME_METHOD and f.method == BASIC_GET_EMPTY:
            return None
        if not (f.type == FRAME_METHOD and f.method == BASIC_GET_OK):
            self.pending.insert(0, f)
            self.expect(BASIC_GET_OK, channel=ch)  # raises with the close, if any
        r = f.args()
        delivery_tag = r.unpack(">Q")
        redelivered = bool(r.unpack(">B") & 1)
        exchange = r.shortstr()
        routing_key = r.shortstr()
        message_count = r.unpack(">I")
        h = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
        frames.append(h)
        assert h.type == FRAME_HEADER and h.channel == ch, h
        class_id, _weight, body_size, _flags = struct.unpack_from(">HHQH", h.payload, 0)
        body = bytearray()
        while len(body) < body_size:
            b = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            frames.append(b)
            assert b.type == FRAME_BODY and b.channel == ch, b
            body += b.payload
        return {
            "delivery_tag": delivery_tag, "redelivered": redelivered,
            "exchange": exchange, "routing_key": routing_key,
            "message_count": message_count, "body_size": body_size,
            "header_payload": h.payload, "properties_bytes": h.payload[12:],  # flags + properties
            "body": bytes(body), "frames": frames,
        }


def encode_properties(content_type=None, headers=None, delivery_mode=None,
                      correlation_id=None, message_id=None, timestamp=None,
                      app_id=None):
    """Encode a subset of basic properties -> (flags, bytes)."""
    flags = 0
    out = b""
    if content_type is not None:
        flags |= 1 << 15
        out += shortstr(content_type)
    if headers is not None:
        flags |= 1 << 13
        out += table(headers)
    if delivery_mode is not None:
        flags |= 1 << 12
        out += struct.pack(">B", delivery_mode)
    if correlation_id is not None:
        flags |= 1 << 10
        out += shortstr(correlation_id)
    if message_id is not None:
        flags |= 1 << 7
        out += shortstr(message_id)
    if timestamp is not None:
        flags |= 1 << 6
        out += struct.pack(">Q", timestamp)
    if app_id is not None:
        flags |= 1 << 3
        out += shortstr(app_id)
    return flags, out


# ---------------------------------------------------------------- more methods
# (appended for the isolation / heartbeat / capability tests)

CONNECTION_BLOCKED = (10, 60)
CONNECTION_UNBLOCKED = (10, 61)
CHANNEL_FLOW = (20, 20)
CHANNEL_FLOW_OK = (20, 21)
QUEUE_BIND = (50, 20)
QUEUE_PURGE = (50, 30)
QUEUE_DELETE = (50, 40)
BASIC_QOS = (60, 10)
BASIC_QOS_OK = (60, 11)
BASIC_CONSUME = (60, 20)
BASIC_CONSUME_OK = (60, 21)
BASIC_CANCEL = (60, 30)
BASIC_CANCEL_OK = (60, 31)
BASIC_DELIVER = (60, 60)


def basic_publish_frame(ch, exchange, routing_key, mandatory=False, immediate=False):
    """Only the Basic.Publish method frame (content header and body follow)."""
    bits = (1 if mandatory else 0) | (2 if immediate else 0)
    return method_frame(ch, BASIC_PUBLISH, struct.pack(">H", 0) + shortstr(exchange)
                        + shortstr(routing_key) + bytes([bits]))


def basic_ack_frame(ch, delivery_tag, multiple=False):
    return method_frame(ch, BASIC_ACK, struct.pack(">QB", delivery_tag, 1 if multiple else 0))


def basic_consume_frame(ch, queue, consumer_tag="", no_ack=True):
    # reserved, queue, consumer-tag, bits (no-local, no-ack, exclusive, no-wait), arguments
    return method_frame(ch, BASIC_CONSUME, struct.pack(">H", 0) + shortstr(queue) + shortstr(consumer_tag)
                        + bytes([2 if no_ack else 0]) + table({}))


def channel_close_frame(ch, code=200, text="bye"):
    return method_frame(ch, CHANNEL_CLOSE, struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", 0, 0))


def close_args(f):
    """(reply_code, reply_text, class_id, method_id) of a Connection/Channel.Close frame."""
    r = f.args()
    code = r.unpack(">H")
    text = r.shortstr()
    cid, mid = r.unpack(">HH")
    return code, text, cid, mid


def is_method(f, class_method, channel=None):
    return (f.type == FRAME_METHOD and len(f.payload) >= 4 and f.method == class_method
            and (channel is None or f.channel == channel))


class CloseResult:
    """What a client saw when it expected to be closed: the Connection.Close
    (code None if none arrived), every frame read, and whether EOF followed."""

    def __init__(self):
        self.code = None
        self.text = None
        self.class_method = None
        self.frames = []
        self.eof = False

    def __repr__(self):
        return "<CloseResult code=%r text=%r eof=%r frames=%r>" % (self.code, self.text, self.eof, self.frames)


def read_until_close(client, timeout=5.0, send_close_ok=True):
    """Read frames until Connection.Close arrives, answer CloseOk, then read
    until EOF; everything within `timeout` seconds. Never raises for the
    peer closing; a timeout leaves eof False (and code None if no Close)."""
    res = CloseResult()
    deadline = time.monotonic() + timeout
    try:
        while res.code is None:
            f = client.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            res.frames.append(f)
            if is_method(f, CONNECTION_CLOSE, 0):
                res.code, res.text, cid, mid = close_args(f)
                res.class_method = (cid, mid)
                if send_close_ok:
                    try:
                        client.send(method_frame(0, CONNECTION_CLOSE_OK))
                    except OSError:
                        pass
        while True:
            res.frames.append(client.read_frame(timeout=max(0.0, deadline - time.monotonic())))
    except SocketClosed:
        res.eof = True
    except (socket.timeout, OSError, ValueError):
        pass
    return res


def drain(client, duration):
    """Read every frame arriving within `duration` seconds.
    Returns (frames, eof): eof True if the peer closed the socket."""
    deadline = time.monotonic() + duration
    frames = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return frames, False
        try:
            frames.append(client.read_frame(timeout=remaining))
        except SocketClosed:
            return frames, True
        except socket.timeout:
            return frames, False
