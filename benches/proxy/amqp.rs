//! Just enough AMQP 0-9-1 for the load tool: frame encoders (everything the
//! hot loops send is encoded once, up front), a frame splitter, and a small
//! blocking client. Written here rather than borrowed from the proxy's codec
//! so that a codec bug cannot hide in both ends of a measurement.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

pub type MethodId = (u16, u16);
pub const CONNECTION_START: MethodId = (10, 10);
pub const CONNECTION_START_OK: MethodId = (10, 11);
pub const CONNECTION_TUNE: MethodId = (10, 30);
pub const CONNECTION_TUNE_OK: MethodId = (10, 31);
pub const CONNECTION_OPEN: MethodId = (10, 40);
pub const CONNECTION_OPEN_OK: MethodId = (10, 41);
pub const CONNECTION_CLOSE: MethodId = (10, 50);
pub const CONNECTION_CLOSE_OK: MethodId = (10, 51);
pub const CHANNEL_OPEN: MethodId = (20, 10);
pub const CHANNEL_OPEN_OK: MethodId = (20, 11);
pub const CHANNEL_CLOSE: MethodId = (20, 40);
pub const CHANNEL_CLOSE_OK: MethodId = (20, 41);
pub const QUEUE_DECLARE: MethodId = (50, 10);
pub const QUEUE_DECLARE_OK: MethodId = (50, 11);
pub const QUEUE_PURGE: MethodId = (50, 30);
pub const QUEUE_PURGE_OK: MethodId = (50, 31);
pub const QUEUE_DELETE: MethodId = (50, 40);
pub const QUEUE_DELETE_OK: MethodId = (50, 41);
pub const BASIC_QOS: MethodId = (60, 10);
pub const BASIC_QOS_OK: MethodId = (60, 11);
pub const BASIC_PUBLISH: MethodId = (60, 40);
pub const BASIC_ACK: MethodId = (60, 80);
pub const BASIC_NACK: MethodId = (60, 120);
pub const CONFIRM_SELECT: MethodId = (85, 10);
pub const CONFIRM_SELECT_OK: MethodId = (85, 11);

// ---- encoders ---------------------------------------------------------------

pub fn put_frame(out: &mut Vec<u8>, frame_type: u8, channel: u16, payload: &[u8]) {
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

pub fn put_method(out: &mut Vec<u8>, channel: u16, id: MethodId, args: &[u8]) {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend_from_slice(&id.0.to_be_bytes());
    payload.extend_from_slice(&id.1.to_be_bytes());
    payload.extend_from_slice(args);
    put_frame(out, FRAME_METHOD, channel, &payload);
}

pub fn shortstr(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

pub fn longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A field table of string values (all the bench ever sends).
pub fn string_table(out: &mut Vec<u8>, entries: &[(&str, &str)]) {
    let mut body = Vec::new();
    for (k, v) in entries {
        shortstr(&mut body, k.as_bytes());
        body.push(b'S');
        longstr(&mut body, v.as_bytes());
    }
    longstr(out, &body);
}

fn method(channel: u16, id: MethodId, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_method(&mut out, channel, id, args);
    out
}

pub fn start_ok(user: &str, password: &str, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    string_table(
        &mut a,
        &[("product", "amqproxy-bench"), ("connection_name", name)],
    );
    shortstr(&mut a, b"PLAIN");
    longstr(&mut a, format!("\0{user}\0{password}").as_bytes());
    shortstr(&mut a, b"en_US");
    method(0, CONNECTION_START_OK, &a)
}

pub fn tune_ok(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&channel_max.to_be_bytes());
    a.extend_from_slice(&frame_max.to_be_bytes());
    a.extend_from_slice(&heartbeat.to_be_bytes());
    method(0, CONNECTION_TUNE_OK, &a)
}

pub fn connection_open(vhost: &str) -> Vec<u8> {
    let mut a = Vec::new();
    shortstr(&mut a, vhost.as_bytes());
    shortstr(&mut a, b"");
    a.push(0);
    method(0, CONNECTION_OPEN, &a)
}

pub fn channel_open(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_OPEN, &[0])
}

fn close_args() -> Vec<u8> {
    let mut a = 200u16.to_be_bytes().to_vec();
    shortstr(&mut a, b"bye");
    a.extend_from_slice(&[0, 0, 0, 0]);
    a
}

pub fn channel_close(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_CLOSE, &close_args())
}

pub fn connection_close() -> Vec<u8> {
    method(0, CONNECTION_CLOSE, &close_args())
}

pub fn confirm_select(channel: u16) -> Vec<u8> {
    method(channel, CONFIRM_SELECT, &[0])
}

/// Queue.Declare; `max_length` adds `x-max-length` (a signed 32-bit 'I').
pub fn queue_declare(channel: u16, queue: &str, passive: bool, max_length: Option<i32>) -> Vec<u8> {
    let mut a = vec![0, 0];
    shortstr(&mut a, queue.as_bytes());
    a.push(if passive { 1 } else { 0 });
    let mut table = Vec::new();
    if let Some(n) = max_length {
        shortstr(&mut table, b"x-max-length");
        table.push(b'I');
        table.extend_from_slice(&n.to_be_bytes());
    }
    longstr(&mut a, &table);
    method(channel, QUEUE_DECLARE, &a)
}

pub fn queue_purge(channel: u16, queue: &str) -> Vec<u8> {
    let mut a = vec![0, 0];
    shortstr(&mut a, queue.as_bytes());
    a.push(0);
    method(channel, QUEUE_PURGE, &a)
}

pub fn queue_delete(channel: u16, queue: &str) -> Vec<u8> {
    let mut a = vec![0, 0];
    shortstr(&mut a, queue.as_bytes());
    a.push(0);
    method(channel, QUEUE_DELETE, &a)
}

/// Basic.Publish + content header (no properties) + one body frame.
pub fn publish(channel: u16, exchange: &str, routing_key: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut a = vec![0, 0];
    shortstr(&mut a, exchange.as_bytes());
    shortstr(&mut a, routing_key.as_bytes());
    a.push(0);
    put_method(&mut out, channel, BASIC_PUBLISH, &a);
    let mut h = vec![0, 60, 0, 0];
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    put_frame(&mut out, FRAME_HEADER, channel, &h);
    if !body.is_empty() {
        put_frame(&mut out, FRAME_BODY, channel, body);
    }
    out
}

// ---- server-side encoders (the sink, and the scripted broker of the codec
// micro-benchmark) -------------------------------------------------------------

pub fn connection_start() -> Vec<u8> {
    let mut a = vec![0, 9];
    string_table(&mut a, &[("product", "amqproxy-bench sink")]);
    longstr(&mut a, b"AMQPLAIN PLAIN");
    longstr(&mut a, b"en_US");
    method(0, CONNECTION_START, &a)
}

pub fn tune(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&channel_max.to_be_bytes());
    a.extend_from_slice(&frame_max.to_be_bytes());
    a.extend_from_slice(&heartbeat.to_be_bytes());
    method(0, CONNECTION_TUNE, &a)
}

pub fn open_ok() -> Vec<u8> {
    method(0, CONNECTION_OPEN_OK, &[0])
}

pub fn channel_open_ok(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_OPEN_OK, &[0, 0, 0, 0])
}

pub fn simple(channel: u16, id: MethodId) -> Vec<u8> {
    method(channel, id, &[])
}

// ---- decoding ----------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub frame_type: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

impl FrameRef<'_> {
    pub fn method_id(&self) -> Option<MethodId> {
        let p = self.payload;
        (self.frame_type == FRAME_METHOD && p.len() >= 4).then(|| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        })
    }
}

/// Splits one frame off the front of `buf`: `Ok(None)` if incomplete.
pub fn parse(buf: &[u8]) -> io::Result<Option<(FrameRef<'_>, usize)>> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if buf.len() < size + 8 {
        return Ok(None);
    }
    if buf[size + 7] != FRAME_END {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad frame end"));
    }
    Ok(Some((
        FrameRef {
            frame_type: buf[0],
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            payload: &buf[7..7 + size],
        },
        size + 8,
    )))
}

/// The reply text of a Connection.Close or Channel.Close payload.
pub fn close_text(payload: &[u8]) -> String {
    if payload.len() < 7 {
        return "(truncated close)".into();
    }
    let code = u16::from_be_bytes([payload[4], payload[5]]);
    let n = payload[6] as usize;
    let text = payload.get(7..7 + n).unwrap_or(&[]);
    format!("{code} {}", String::from_utf8_lossy(text))
}

// ---- a blocking client ---------------------------------------------------------

/// Pre-encoded handshake frames for one set of credentials.
pub struct Login {
    pub start_ok: Vec<u8>,
    pub open: Vec<u8>,
}

impl Login {
    pub fn new(user: &str, password: &str, vhost: &str, name: &str) -> Login {
        Login {
            start_ok: start_ok(user, password, name),
            open: connection_open(vhost),
        }
    }
}

pub struct Conn {
    pub stream: TcpStream,
    /// Set for amqps: every byte goes through it (see `tls.rs`).
    tls: Option<Box<rustls::ClientConnection>>,
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    pub channel_max: u16,
    pub frame_max: u32,
    /// Connection.Start's payload, kept for the broker's version.
    pub start: Vec<u8>,
}

impl Conn {
    /// Connects and runs the handshake up to Connection.OpenOk.
    pub fn open(addr: SocketAddr, login: &Login) -> io::Result<Conn> {
        Conn::open_with(addr, login, None)
    }

    /// `open` over TLS (amqps); the TLS handshake runs inside the first
    /// write and read, as a client library's does.
    pub fn open_with(
        addr: SocketAddr,
        login: &Login,
        tls: Option<rustls::ClientConnection>,
    ) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut c = Conn {
            stream,
            tls: tls.map(Box::new),
            buf: vec![0; 64 * 1024],
            head: 0,
            tail: 0,
            channel_max: 0,
            frame_max: 0,
            start: Vec::new(),
        };
        c.write(PROTOCOL_HEADER)?;
        c.start = c.expect(0, CONNECTION_START)?;
        c.write(&login.start_ok)?;
        let t = c.expect(0, CONNECTION_TUNE)?;
        if t.len() < 12 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short tune"));
        }
        c.channel_max = u16::from_be_bytes([t[4], t[5]]);
        c.frame_max = u32::from_be_bytes([t[6], t[7], t[8], t[9]]);
        let mut out = tune_ok(c.channel_max, c.frame_max, 0);
        out.extend_from_slice(&login.open);
        c.write(&out)?;
        c.expect(0, CONNECTION_OPEN_OK)?;
        Ok(c)
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            Some(tls) => {
                let mut s = rustls::Stream::new(tls.as_mut(), &mut self.stream);
                s.write_all(bytes)?;
                s.flush()
            }
            None => self.stream.write_all(bytes),
        }
    }

    /// One blocking read (unless a complete frame is already buffered),
    /// then every complete frame buffered is handed to `f`.
    pub fn read_frames(
        &mut self,
        mut f: impl FnMut(FrameRef<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        if parse(&self.buf[self.head..self.tail])?.is_none() {
            self.fill()?;
        }
        while let Some((frame, used)) = parse(&self.buf[self.head..self.tail])? {
            self.head += used;
            f(frame)?;
        }
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.tail == self.buf.len() {
            let n = self.buf.len();
            self.buf.resize(n * 2, 0);
        }
        let into = &mut self.buf[self.tail..];
        let n = match &mut self.tls {
            Some(tls) => rustls::Stream::new(tls.as_mut(), &mut self.stream).read(into)?,
            None => self.stream.read(into)?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by peer",
            ));
        }
        self.tail += n;
        Ok(())
    }

    /// Waits for method `id` on `channel` and returns its payload; a Close
    /// instead is an error with the peer's reply text. Heartbeats are
    /// skipped; any other frame is an error.
    pub fn expect(&mut self, channel: u16, id: MethodId) -> io::Result<Vec<u8>> {
        loop {
            let Some((frame, used)) = parse(&self.buf[self.head..self.tail])? else {
                self.fill()?;
                continue;
            };
            self.head += used;
            if frame.frame_type == FRAME_HEARTBEAT {
                continue;
            }
            let got = frame.method_id();
            if got == Some(id) && frame.channel == channel {
                return Ok(frame.payload.to_vec());
            }
            let text = match got {
                Some(CONNECTION_CLOSE) | Some(CHANNEL_CLOSE) => close_text(frame.payload),
                _ => String::new(),
            };
            return Err(io::Error::other(format!(
                "expected {id:?} on channel {channel}, got {got:?} on channel {} {text}",
                frame.channel
            )));
        }
    }

    /// The broker's `version` server property, if it sent one as a string.
    pub fn server_version(&self) -> Option<String> {
        amqproxy::protocol::methods::ConnectionStart::decode(&self.start)
            .ok()?
            .server_properties
            .string("version")
    }

    /// Connection.Close and wait for CloseOk.
    pub fn close(mut self) -> io::Result<()> {
        self.write(&connection_close())?;
        self.expect(0, CONNECTION_CLOSE_OK)?;
        Ok(())
    }
}
