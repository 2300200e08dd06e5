//! The client-session fuzz driver.
//!
//! One `Shard` under a virtual clock, a scripted broker on the upstream
//! side, and clients that complete a valid handshake (protocol header,
//! StartOk PLAIN guest/guest, TuneOk, Connection.Open) before the fuzz
//! input takes over. The input is a small program:
//!
//! ```text
//! input  = config0 config1 op*
//! op     = one octet: kind = op & 15, arg = op >> 4, then its operands
//!   0..=5  client bytes      len (0xFF: u16 length follows), bytes
//!                            -> client_data on client `arg`
//!   6      pump              the broker reads everything the proxy sent
//!                            upstream and answers (arg bit 0: one round)
//!   7      tick              n: advance the clock n x 200 ms (arg bit 2:
//!                            n x 5 s); arg bit 0: broker heartbeats
//!                            first, bit 1: client heartbeats first
//!   8      client reads      n: client `arg` reads n x 32 bytes (0: all)
//!   9      broker event      upstream, channel, param: event `arg`
//!                            (deliver, channel.close, cancel, blocked...)
//!   10     raw broker bytes  len, bytes -> upstream_data on upstream `arg`
//!   11     new client        handshake; arg bit 0 wrong password, bit 1
//!                            AMQPLAIN, bit 2 another vhost, bit 3 none:
//!                            the input's client bytes do the handshake
//!   12     client gone       client `arg`'s socket closes
//!   13     connect fails     the oldest pending upstream connect fails
//!   14     shutdown          arg bit 0 close_all_clients, bit 1 upstreams
//!   15     settings          b: reload settings (reuse, limits)
//! ```
//!
//! Missing operands read as 0, so every byte string is a valid program.
//!
//! Checked, besides "never panics": every byte the proxy sends either way
//! parses as frames within the negotiated frame_max; every method it sends
//! upstream is one a client may send, with valid arguments, and none of
//! the ones RabbitMQ answers with a connection error; content goes
//! upstream whole (method, header, bodies back to back); channel numbers
//! follow the broker's channel life cycle (no frame on a channel the
//! broker has not opened, no second Channel.Open, also in what the proxy
//! flushes before it closes an upstream socket);
//! output buffers stay bounded; and when the broker was never sent raw
//! bytes, once every client has gone and the clock has moved on, nothing
//! is left (no client, channel, upstream connection or pool).

use amqproxy::core::errors::{check_channel_method, check_client_method};
use amqproxy::core::{Action, ClientId, ConnRef, Settings, Shard, UpstreamId, UPSTREAM_HIGH_WATER};
use amqproxy::protocol::codec::{put_shortstr, put_u16, put_u32, put_u64, Reader};
use amqproxy::protocol::constants::{
    method, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
};
use amqproxy::protocol::frame::{
    parse_frame, put_body_frames, put_frame, put_heartbeat, FrameStatus,
};
use amqproxy::protocol::methods::{
    self as m, put_close, put_close_ok, put_method, ContentHeader, Publish, StartOk, Tune,
};
use amqproxy::protocol::spec::{self, Arg};
use amqproxy::protocol::table::{FieldTable, FieldValue};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Op kinds (the low nibble of an op octet).
pub mod op {
    pub const CLIENT: u8 = 0; // 0..=5
    pub const PUMP: u8 = 6;
    pub const TICK: u8 = 7;
    pub const READ: u8 = 8;
    pub const EVENT: u8 = 9;
    pub const RAW_BROKER: u8 = 10;
    pub const NEW_CLIENT: u8 = 11;
    pub const CLIENT_GONE: u8 = 12;
    pub const CONNECT_FAILS: u8 = 13;
    pub const SHUTDOWN: u8 = 14;
    pub const SETTINGS: u8 = 15;
}

/// Broker events (the `arg` of an EVENT op).
pub mod event {
    pub const DELIVER: u8 = 0;
    pub const CHANNEL_CLOSE: u8 = 1;
    pub const CANCEL: u8 = 2;
    pub const BLOCKED: u8 = 3;
    pub const UNBLOCKED: u8 = 4;
    pub const CONNECTION_CLOSE: u8 = 5;
    pub const SOCKET_GONE: u8 = 6;
    pub const RETURN: u8 = 7;
    pub const CONFIRM: u8 = 8;
    pub const HEARTBEAT: u8 = 9;
    pub const BIG_HEADER: u8 = 10;
    pub const SPLIT_DELIVER: u8 = 11;
}

const MAX_CLIENTS: usize = 4;

/// `AMQPROXY_FUZZ_TRACE=1` prints every op and frame (for triage, with the
/// target binary run on one input).
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("AMQPROXY_FUZZ_TRACE").is_some())
}

fn describe(t: u8, ch: u16, payload: &[u8]) -> String {
    match (t, m::method_id(payload)) {
        (FRAME_METHOD, Ok(id)) => format!("ch {ch} method {id:?}"),
        _ => format!("ch {ch} type {t} {} bytes", payload.len()),
    }
}
/// What the proxy may add to a buffer past its limit in one go: one frame
/// of the broker's largest frame_max, re-split, plus a Close.
const SLACK: usize = 512 * 1024;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input { data, pos: 0 };
    let cfg = [input.byte(), input.byte()];
    let mut h = Harness::new(cfg, data.len());
    h.first_client();
    while !input.done() {
        let op = input.byte();
        if trace() {
            eprintln!("op {} arg {} at {}", op & 15, op >> 4, input.pos - 1);
        }
        h.step(op & 15, op >> 4, &mut input);
        h.settle();
    }
    h.finish();
}

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }
}

// ---- the scripted client -----------------------------------------------

struct ClientModel {
    id: ClientId,
    /// Bytes read from the proxy not yet forming a whole frame.
    rx: Vec<u8>,
    frame_max: u32,
    gone: bool,
    open_ok: bool,
    /// A client whose handshake comes from the fuzz input: the proxy may
    /// answer its first bytes with the protocol header instead of frames.
    raw: bool,
}

impl ClientModel {
    /// The client reads `bytes` from its socket: frames, nothing else.
    fn read(&mut self, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        let mut pos = 0;
        if self.raw {
            if self.rx.len() < 8 {
                return;
            }
            self.raw = false;
            if self.rx[..8] == PROTOCOL_HEADER {
                pos = 8; // the header we speak, after a bad one
            }
        }
        loop {
            match parse_frame(&self.rx[pos..], 0) {
                Ok(FrameStatus::Complete(f, used)) => {
                    if trace() {
                        eprintln!(
                            "  client {:?} <- {}",
                            self.id.0.index,
                            describe(f.frame_type, f.channel, f.payload)
                        );
                    }
                    if f.frame_type == FRAME_BODY {
                        assert!(
                            f.wire_len() <= self.frame_max as usize,
                            "body frame of {} bytes to a client with frame_max {}",
                            f.wire_len(),
                            self.frame_max
                        );
                    }
                    if f.method_id() == Some(method::CONNECTION_OPEN_OK) {
                        self.open_ok = true;
                    }
                    pos += used;
                }
                Ok(FrameStatus::Partial) => break,
                Err(e) => panic!("the proxy sent a client a malformed frame: {e}"),
            }
        }
        self.rx.drain(..pos);
    }
}

// ---- the scripted broker -----------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BState {
    Connecting,
    ExpectHeader,
    ExpectStartOk,
    ExpectTuneOk,
    ExpectOpen,
    Open,
    /// The broker sent Connection.Close and waits for CloseOk.
    Closing,
    Closed,
}

#[derive(Default)]
struct Chan {
    /// The broker sent Channel.Close and waits for CloseOk.
    closing: bool,
    confirm: bool,
    consumers: Vec<Vec<u8>>,
    published: u64,
}

struct Content {
    channel: u16,
    publish: Vec<u8>,
    id: method::Id,
    header: Option<Vec<u8>>,
    body: Vec<u8>,
    remaining: u64,
}

struct Broker {
    id: UpstreamId,
    rx: Vec<u8>,
    state: BState,
    frame_max: u32,
    heartbeat: u16,
    channels: BTreeMap<u16, Chan>,
    content: Option<Content>,
    /// Socket closed: nothing more is read or sent.
    dead: bool,
    /// Raw bytes were injected: the proxy's view of the channels may differ
    /// from this model's, so the channel life-cycle checks are off.
    desync: bool,
    serial: u64,
}

impl Broker {
    fn new(id: UpstreamId, frame_max: u32, heartbeat: u16) -> Self {
        Broker {
            id,
            rx: Vec::new(),
            state: BState::Connecting,
            frame_max,
            heartbeat,
            channels: BTreeMap::new(),
            content: None,
            dead: false,
            desync: false,
            serial: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Reads what the proxy sent; returns the broker's answers.
    fn feed(&mut self, bytes: &[u8], settings: &Settings) -> Vec<u8> {
        let mut out = Vec::new();
        self.rx.extend_from_slice(bytes);
        let rx = std::mem::take(&mut self.rx);
        let mut pos = 0;
        if self.state == BState::ExpectHeader {
            if rx.len() < 8 {
                self.rx = rx;
                return out;
            }
            assert_eq!(
                rx[..8],
                PROTOCOL_HEADER,
                "upstream did not start with the header"
            );
            pos = 8;
            m::put_connection_start(
                &mut out,
                &FieldTable::default(),
                b"AMQPLAIN PLAIN",
                b"en_US",
            );
            self.state = BState::ExpectStartOk;
        }
        // Before TuneOk the proxy's frames are small; after it they must
        // fit the frame_max it accepted.
        loop {
            match parse_frame(&rx[pos..], self.frame_max) {
                Ok(FrameStatus::Complete(f, used)) => {
                    pos += used;
                    self.frame(f.frame_type, f.channel, f.payload, settings, &mut out);
                }
                Ok(FrameStatus::Partial) => break,
                Err(e) => panic!("the proxy sent the broker a malformed frame: {e}"),
            }
        }
        self.rx = rx[pos..].to_vec();
        out
    }

    fn frame(&mut self, t: u8, ch: u16, payload: &[u8], settings: &Settings, out: &mut Vec<u8>) {
        if trace() {
            eprintln!(
                "  broker {:?} <- {}",
                self.id.0.index,
                describe(t, ch, payload)
            );
        }
        if t == FRAME_HEARTBEAT {
            assert_eq!(ch, 0, "heartbeat on channel {ch}");
            return;
        }
        if self.content.is_some() {
            return self.content_frame(t, ch, payload, out);
        }
        assert_eq!(
            t, FRAME_METHOD,
            "content frame (type {t}) without a content method"
        );
        let id = m::method_id(payload).expect("method frame shorter than its id");
        // What goes upstream is always something RabbitMQ takes from a
        // client without a connection error.
        let Some((name, args)) = spec::client_method(id) else {
            panic!("the proxy sent {id:?} upstream, which clients may not send");
        };
        if let Err(e) = spec::validate_arguments(payload, args) {
            panic!("the proxy sent a malformed {name} upstream: {e}");
        }
        if let Err(e) = check_client_method(id, payload, &settings.exchange_types) {
            panic!(
                "the proxy sent {name} upstream, which RabbitMQ refuses: {}",
                e.text
            );
        }
        if ch == 0 {
            return self.connection_method(id, payload, out);
        }
        assert!(id.0 != 10, "connection method {name} on channel {ch}");
        if let Some(r) = check_channel_method(id, payload) {
            panic!(
                "the proxy sent {name} upstream, which crashes RabbitMQ's channel: {}",
                r.text
            );
        }
        if method::has_content(id) {
            self.content = Some(Content {
                channel: ch,
                publish: payload.to_vec(),
                id,
                header: None,
                body: Vec::new(),
                remaining: 0,
            });
        }
        if self.state != BState::Open {
            // Closing or closed: RabbitMQ ignores everything but CloseOk.
            return;
        }
        self.channel_method(ch, id, name, args, payload, out);
    }

    fn connection_method(&mut self, id: method::Id, payload: &[u8], out: &mut Vec<u8>) {
        let closing = matches!(self.state, BState::Closing | BState::Closed);
        if closing && !matches!(id, method::CONNECTION_CLOSE | method::CONNECTION_CLOSE_OK) {
            // After its Connection.Close the broker reads only Close/CloseOk
            // (the proxy may have sent more before it saw the Close).
            return;
        }
        let expect = |s: &Broker, want: BState| {
            assert!(
                s.desync || s.state == want,
                "{id:?} from the proxy in broker state {:?}",
                s.state
            );
        };
        match id {
            method::CONNECTION_START_OK => {
                expect(self, BState::ExpectStartOk);
                let s = StartOk::decode(payload).expect("start-ok");
                assert_eq!(s.mechanism, b"PLAIN");
                if s.response == b"\0guest\0guest" {
                    m::put_tune(
                        out,
                        false,
                        Tune {
                            channel_max: 2047,
                            frame_max: self.frame_max,
                            heartbeat: self.heartbeat,
                        },
                    );
                    self.state = BState::ExpectTuneOk;
                } else {
                    put_close(
                        out,
                        0,
                        403,
                        b"ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
                        method::CONNECTION_START_OK,
                    );
                    self.state = BState::Closing;
                }
            }
            method::CONNECTION_TUNE_OK => {
                expect(self, BState::ExpectTuneOk);
                let t = Tune::decode(payload).expect("tune-ok");
                assert!(self.desync || t.frame_max == self.frame_max, "{t:?}");
                assert!(self.desync || (1..=2047).contains(&t.channel_max), "{t:?}");
                self.state = BState::ExpectOpen;
            }
            method::CONNECTION_OPEN => {
                expect(self, BState::ExpectOpen);
                m::put_connection_open_ok(out);
                self.state = BState::Open;
            }
            method::CONNECTION_CLOSE => {
                // Crossing closes: both sides answer CloseOk; the broker's
                // own still waits for the proxy's.
                put_close_ok(out, 0);
                if self.state != BState::Closing {
                    self.state = BState::Closed;
                }
            }
            method::CONNECTION_CLOSE_OK => {
                expect(self, BState::Closing);
                self.state = BState::Closed;
            }
            _ => panic!("the proxy sent {id:?} on channel 0"),
        }
    }

    fn channel_method(
        &mut self,
        ch: u16,
        id: method::Id,
        name: &str,
        args: &[Arg],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) {
        let strict = !self.desync;
        let Some(chan) = self.channels.get_mut(&ch) else {
            if id == method::CHANNEL_OPEN {
                self.channels.insert(ch, Chan::default());
                m::put_channel_open_ok(out, ch);
            } else {
                // RabbitMQ: 504 CHANNEL_ERROR "expected 'channel.open'",
                // a connection error for every client on the connection.
                assert!(
                    !strict,
                    "the proxy sent {name} on channel {ch}, which is not open"
                );
            }
            return;
        };
        if chan.closing {
            match id {
                method::CHANNEL_CLOSE => put_close_ok(out, ch),
                method::CHANNEL_CLOSE_OK => {
                    self.channels.remove(&ch);
                }
                _ => {} // dropped until CloseOk, as RabbitMQ does
            }
            return;
        }
        let nowait = last_bit(payload, args);
        let reply = |out: &mut Vec<u8>, id: method::Id, args: &dyn Fn(&mut Vec<u8>)| {
            put_method(out, ch, id, args)
        };
        match id {
            method::CHANNEL_OPEN => {
                assert!(!strict, "second channel.open on channel {ch}");
            }
            method::CHANNEL_CLOSE => {
                self.channels.remove(&ch);
                put_close_ok(out, ch);
            }
            method::CHANNEL_CLOSE_OK => {
                assert!(!strict, "unsolicited channel.close-ok on channel {ch}");
            }
            (20, 20) => reply(out, (20, 21), &|b| b.push(1)),
            (30, 10) => reply(out, (30, 11), &|b| put_u16(b, 1)),
            (40, 10) | (40, 20) | (40, 30) | (40, 40) if !nowait => {
                let ok = if id.1 == 40 { 51 } else { id.1 + 1 };
                reply(out, (40, ok), &|_| {})
            }
            method::QUEUE_DECLARE if !nowait => {
                let mut r = m::arguments(payload);
                let _ = r.u16();
                let given = r.shortstr().unwrap_or_default().to_vec();
                let queue = if given.is_empty() {
                    format!("amq.gen-{}", self.next()).into_bytes()
                } else {
                    given
                };
                reply(out, (50, 11), &|b| {
                    put_shortstr(b, &queue);
                    put_u32(b, 0);
                    put_u32(b, 0);
                })
            }
            (50, 20) if !nowait => reply(out, (50, 21), &|_| {}),
            (50, 30) | (50, 40) if !nowait => reply(out, (id.0, id.1 + 1), &|b| put_u32(b, 0)),
            (50, 50) => reply(out, (50, 51), &|_| {}),
            method::BASIC_QOS => reply(out, (60, 11), &|_| {}),
            method::BASIC_CONSUME => {
                let mut r = m::arguments(payload);
                let _ = r.u16();
                let _queue = r.shortstr();
                let given = r.shortstr().unwrap_or_default().to_vec();
                let tag = if given.is_empty() {
                    format!("amq.ctag-{}", self.next()).into_bytes()
                } else {
                    given
                };
                if let Some(chan) = self.channels.get_mut(&ch) {
                    chan.consumers.push(tag.clone());
                }
                if !nowait {
                    reply(out, (60, 21), &|b| put_shortstr(b, &tag));
                }
            }
            method::BASIC_CANCEL => {
                let tag = m::arguments(payload)
                    .shortstr()
                    .unwrap_or_default()
                    .to_vec();
                chan.consumers.retain(|t| *t != tag);
                if !nowait {
                    reply(out, (60, 31), &|b| put_shortstr(b, &tag));
                }
            }
            method::BASIC_GET => {
                let n = self.next();
                if n & 1 == 0 {
                    reply(out, (60, 72), &|b| put_shortstr(b, b""));
                } else {
                    reply(out, method::BASIC_GET_OK, &|b| {
                        put_u64(b, n);
                        b.push(0);
                        put_shortstr(b, b"");
                        put_shortstr(b, b"q");
                        put_u32(b, 0);
                    });
                    content(out, ch, b"got", self.frame_max);
                }
            }
            method::BASIC_RECOVER => reply(out, (60, 111), &|_| {}),
            method::CONFIRM_SELECT => {
                chan.confirm = true;
                if !nowait {
                    reply(out, (85, 11), &|_| {});
                }
            }
            (90, 10) | (90, 20) | (90, 30) => reply(out, (90, id.1 + 1), &|_| {}),
            _ => {}
        }
    }

    fn content_frame(&mut self, t: u8, ch: u16, payload: &[u8], out: &mut Vec<u8>) {
        let c = self.content.as_mut().expect("content");
        assert_eq!(
            ch, c.channel,
            "frame on channel {ch} in the middle of a message on channel {}",
            c.channel
        );
        match (t, c.header.is_some()) {
            (FRAME_HEADER, false) => {
                if let Err(e) = spec::validate_content_header(payload) {
                    panic!("the proxy sent a malformed content header upstream: {e}");
                }
                let h = ContentHeader::decode(payload).expect("content header");
                assert_eq!((h.class_id, h.weight), (60, 0));
                assert!(h.body_size <= amqproxy::core::MAX_MESSAGE_SIZE);
                c.header = Some(payload.to_vec());
                c.remaining = h.body_size;
            }
            (FRAME_BODY, true) => {
                let len = payload.len() as u64;
                assert!(len <= c.remaining, "more body than the header announced");
                assert!(!payload.is_empty() || c.remaining == 0);
                c.remaining -= len;
                c.body.extend_from_slice(payload);
            }
            _ => panic!("frame type {t} in the middle of a message on channel {ch}"),
        }
        if c.header.is_some() && c.remaining == 0 {
            let c = self.content.take().expect("content");
            self.message(c, out);
        }
    }

    /// A whole message from the proxy: confirm it, return it, deliver it.
    fn message(&mut self, c: Content, out: &mut Vec<u8>) {
        if c.id != method::BASIC_PUBLISH || self.state != BState::Open {
            return;
        }
        let ch = c.channel;
        let frame_max = self.frame_max;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        if chan.closing {
            return;
        }
        let p = Publish::decode(&c.publish).expect("publish");
        let header = c.header.unwrap_or_default();
        if p.mandatory && p.routing_key.is_empty() {
            put_method(out, ch, method::BASIC_RETURN, |b| {
                put_u16(b, 312);
                put_shortstr(b, b"NO_ROUTE");
                put_shortstr(b, p.exchange);
                put_shortstr(b, p.routing_key);
            });
            put_frame(out, FRAME_HEADER, ch, &header);
            put_body_frames(out, ch, &c.body, frame_max);
        }
        if chan.confirm {
            chan.published += 1;
            let tag = chan.published;
            put_method(out, ch, method::BASIC_ACK, |b| {
                put_u64(b, tag);
                b.push(0);
            });
        }
        if let Some(tag) = chan.consumers.first().cloned() {
            self.serial += 1;
            let n = self.serial;
            put_method(out, ch, method::BASIC_DELIVER, |b| {
                put_shortstr(b, &tag);
                put_u64(b, n);
                b.push(0);
                put_shortstr(b, p.exchange);
                put_shortstr(b, p.routing_key);
            });
            put_frame(out, FRAME_HEADER, ch, &header);
            put_body_frames(out, ch, &c.body, frame_max);
        }
    }
}

/// Appends a basic content header (no properties) and its body.
fn content(out: &mut Vec<u8>, ch: u16, body: &[u8], frame_max: u32) {
    let mut h = vec![0, 60, 0, 0];
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    put_frame(out, FRAME_HEADER, ch, &h);
    put_body_frames(out, ch, body, frame_max);
}

/// The value of the last bit argument (`nowait` wherever a method has it).
fn last_bit(payload: &[u8], args: &[Arg]) -> bool {
    let mut r = Reader::new(payload);
    let _ = r.take(4);
    let (mut octet, mut used, mut last) = (0u8, 8u8, false);
    for arg in args {
        let skipped = match arg {
            Arg::Bit => {
                if used == 8 {
                    octet = r.u8().unwrap_or(0);
                    used = 0;
                }
                last = octet >> used & 1 != 0;
                used += 1;
                continue;
            }
            Arg::Octet => r.u8().map(drop),
            Arg::Short => r.u16().map(drop),
            Arg::Long => r.u32().map(drop),
            Arg::LongLong | Arg::Timestamp => r.u64().map(drop),
            Arg::ShortStr => r.shortstr().map(drop),
            Arg::LongStr | Arg::Table => r.longstr().map(drop),
        };
        let _ = skipped;
        used = 8;
    }
    last
}

// ---- the driver ------------------------------------------------------------

struct Harness {
    shard: Shard,
    settings: Settings,
    now: Instant,
    cfg: [u8; 2],
    clients: Vec<ClientModel>,
    brokers: Vec<Broker>,
    pending_connects: Vec<UpstreamId>,
    input_len: usize,
    /// Raw bytes reached some upstream: the end-of-run leak check is off.
    desync: bool,
    dirty: Vec<ConnRef>,
    /// The largest client_buffer_limit ever in force.
    client_limit: usize,
}

impl Harness {
    fn new(cfg: [u8; 2], input_len: usize) -> Self {
        let settings = Settings {
            channel_reuse: cfg[0] & 1 != 0,
            max_upstream_channels: if cfg[0] & 0x20 != 0 { 3 } else { u16::MAX },
            client_buffer_limit: if cfg[0] & 0x40 != 0 {
                64 * 1024
            } else {
                1024 * 1024
            },
            min_idle_connections: (cfg[1] >> 3 & 1) as u32,
            exchange_types: if cfg[1] & 0x10 != 0 {
                vec!["x-delayed-message".into()]
            } else {
                Vec::new()
            },
            ..Settings::default()
        };
        let now = Instant::now();
        let settings_limit = settings.client_buffer_limit;
        Harness {
            shard: Shard::new(settings.clone(), now),
            settings,
            now,
            cfg,
            clients: Vec::new(),
            brokers: Vec::new(),
            pending_connects: Vec::new(),
            input_len,
            desync: false,
            dirty: Vec::new(),
            client_limit: settings_limit,
        }
    }

    fn broker_frame_max(&self) -> u32 {
        [131072, 4096, 8192, 131072][(self.cfg[1] & 3) as usize]
    }

    /// Connects a client and sends a valid handshake (pipelined).
    fn connect_client(&mut self, flags: u8) -> Option<usize> {
        if self.clients.iter().filter(|c| !c.gone).count() >= MAX_CLIENTS {
            return None;
        }
        let cfg = self.cfg[0];
        let frame_max = [0, 4096, 131072, 65536][(cfg >> 2 & 3) as usize];
        let tune = Tune {
            channel_max: if cfg & 0x80 != 0 { 4 } else { 0 },
            frame_max,
            heartbeat: if cfg & 0x10 != 0 { 10 } else { 0 },
        };
        let mut props = FieldTable::default();
        if cfg & 2 != 0 {
            let mut caps = FieldTable::default();
            for cap in [
                "connection.blocked",
                "consumer_cancel_notify",
                "authentication_failure_close",
                "publisher_confirms",
            ] {
                caps.insert(cap, FieldValue::Bool(true));
            }
            props.insert("capabilities", FieldValue::Table(caps));
        }
        props.insert("connection_name", amqproxy::protocol::table::string("fuzz"));
        let password = if flags & 1 != 0 { "wrong" } else { "guest" };
        let mut bytes = PROTOCOL_HEADER.to_vec();
        if flags & 2 != 0 {
            let mut t = FieldTable::default();
            t.insert("LOGIN", amqproxy::protocol::table::string("guest"));
            t.insert("PASSWORD", amqproxy::protocol::table::string(password));
            let mut response = Vec::new();
            t.write_body(&mut response);
            m::put_connection_start_ok(&mut bytes, &props, b"AMQPLAIN", &response);
        } else {
            let response = format!("\0guest\0{password}");
            m::put_connection_start_ok(&mut bytes, &props, b"PLAIN", response.as_bytes());
        }
        m::put_tune(&mut bytes, true, tune);
        m::put_connection_open(&mut bytes, if flags & 4 != 0 { b"other" } else { b"/" });
        let id = self
            .shard
            .client_connected(format!("fuzz:{}", self.clients.len()), self.now);
        self.clients.push(ClientModel {
            id,
            rx: Vec::new(),
            // A raw client negotiates what its bytes say: not checked.
            frame_max: if flags & 8 != 0 {
                u32::MAX
            } else if frame_max == 0 {
                self.settings.frame_max
            } else {
                frame_max
            },
            gone: false,
            open_ok: false,
            raw: flags & 8 != 0,
        });
        if flags & 8 == 0 {
            self.shard.client_data(id, &bytes, self.now);
        }
        Some(self.clients.len() - 1)
    }

    fn first_client(&mut self) {
        let c = self.connect_client(0).expect("first client");
        self.settle();
        self.pump(false);
        self.settle();
        self.read_client(c, usize::MAX);
        assert!(
            self.clients[c].open_ok,
            "the scripted handshake did not reach Connection.OpenOk"
        );
    }

    fn live_client(&self, arg: u8) -> Option<usize> {
        let live: Vec<usize> = (0..self.clients.len())
            .filter(|i| !self.clients[*i].gone)
            .collect();
        (!live.is_empty()).then(|| live[arg as usize % live.len()])
    }

    fn live_broker(&self, sel: u8) -> Option<usize> {
        let live: Vec<usize> = (0..self.brokers.len())
            .filter(|i| !self.brokers[*i].dead && self.brokers[*i].state != BState::Connecting)
            .collect();
        (!live.is_empty()).then(|| live[sel as usize % live.len()])
    }

    fn broker_of(&self, id: UpstreamId) -> Option<usize> {
        self.brokers.iter().position(|b| b.id == id && !b.dead)
    }

    fn read_client(&mut self, i: usize, max: usize) {
        let conn = ConnRef::Client(self.clients[i].id);
        let n = self.shard.output(conn).len().min(max);
        let bytes = self.shard.output(conn)[..n].to_vec();
        self.shard.output_written(conn, n);
        self.clients[i].read(&bytes);
    }

    /// Hands what the proxy sent upstream `b` to the broker; returns the
    /// answer (already delivered unless the socket is closing).
    fn broker_reads(&mut self, b: usize, answer: bool) -> bool {
        let conn = ConnRef::Upstream(self.brokers[b].id);
        let bytes = self.shard.output(conn).to_vec();
        if bytes.is_empty() {
            return false;
        }
        self.shard.output_written(conn, bytes.len());
        let reply = self.brokers[b].feed(&bytes, &self.settings);
        if answer && !reply.is_empty() {
            self.shard
                .upstream_data(self.brokers[b].id, &reply, self.now);
        }
        true
    }

    /// The broker answers until nothing more happens.
    fn pump(&mut self, one_round: bool) {
        for _ in 0..64 {
            self.actions();
            let mut progress = false;
            for id in std::mem::take(&mut self.pending_connects) {
                if let Some(b) = self.broker_of(id) {
                    self.brokers[b].state = BState::ExpectHeader;
                    self.shard.upstream_connected(id, self.now);
                    progress = true;
                }
            }
            for b in 0..self.brokers.len() {
                if !self.brokers[b].dead && self.brokers[b].state != BState::Connecting {
                    progress |= self.broker_reads(b, true);
                }
            }
            if !progress || one_round {
                break;
            }
        }
        self.actions();
    }

    /// Does what the shell does with the shard's actions.
    fn actions(&mut self) {
        for _ in 0..16 {
            let actions: Vec<Action> = self.shard.take_actions().collect();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Connect(id) => {
                        let (fm, hb) = (
                            self.broker_frame_max(),
                            if self.cfg[1] & 4 != 0 { 0 } else { 60 },
                        );
                        self.brokers.push(Broker::new(id, fm, hb));
                        self.pending_connects.push(id);
                    }
                    Action::CloseAfterFlush(conn) => {
                        if !self.shard.contains(conn) {
                            continue;
                        }
                        match conn {
                            ConnRef::Client(id) => {
                                if let Some(i) =
                                    self.clients.iter().position(|c| c.id == id && !c.gone)
                                {
                                    self.read_client(i, usize::MAX);
                                    self.clients[i].gone = true;
                                }
                            }
                            ConnRef::Upstream(id) => {
                                if let Some(b) = self.broker_of(id) {
                                    if self.brokers[b].state != BState::Connecting {
                                        self.broker_reads(b, false);
                                    }
                                    self.brokers[b].dead = true;
                                }
                                self.pending_connects.retain(|p| *p != id);
                            }
                        }
                        self.shard.release(conn);
                    }
                    Action::Resume(_) => {}
                }
            }
        }
    }

    /// After every op: actions, the dirty list, and the buffer bounds.
    fn settle(&mut self) {
        self.actions();
        self.dirty.clear();
        self.shard.take_dirty(&mut self.dirty);
        let client_limit = self.client_limit;
        for c in &self.clients {
            let n = self.shard.output(ConnRef::Client(c.id)).len();
            assert!(
                n <= client_limit + SLACK,
                "client output of {n} bytes (limit {client_limit})"
            );
        }
        for b in &self.brokers {
            let n = self.shard.output(ConnRef::Upstream(b.id)).len();
            assert!(
                n <= UPSTREAM_HIGH_WATER + 2 * self.input_len + SLACK,
                "upstream output of {n} bytes from a {}-byte input",
                self.input_len
            );
        }
    }

    fn step(&mut self, kind: u8, arg: u8, input: &mut Input<'_>) {
        match kind {
            0..=5 => {
                let mut len = input.byte() as usize;
                if len == 0xFF {
                    len = u16::from_be_bytes([input.byte(), input.byte()]) as usize;
                }
                let bytes = input.take(len);
                let Some(i) = self.live_client(arg) else {
                    return;
                };
                let id = self.clients[i].id;
                // The shell does not read a client paused for backpressure.
                if self.shard.contains(ConnRef::Client(id)) && self.shard.client_may_read(id) {
                    self.shard.client_data(id, bytes, self.now);
                }
            }
            op::PUMP => self.pump(arg & 1 != 0),
            op::TICK => {
                let n = input.byte() as u64;
                let unit = if arg & 4 != 0 { 5000 } else { 200 };
                self.now += Duration::from_millis(n * unit);
                if arg & 1 != 0 {
                    self.broker_heartbeats();
                }
                if arg & 2 != 0 {
                    let mut hb = Vec::new();
                    put_heartbeat(&mut hb);
                    for c in self.clients.iter().filter(|c| !c.gone) {
                        self.shard.client_data(c.id, &hb, self.now);
                    }
                }
                self.shard.tick(self.now);
            }
            op::READ => {
                let n = input.byte() as usize;
                if let Some(i) = self.live_client(arg) {
                    self.read_client(i, if n == 0 { usize::MAX } else { n * 32 });
                }
            }
            op::EVENT => {
                let (ub, cb, pb) = (input.byte(), input.byte(), input.byte());
                self.broker_event(arg, ub, cb, pb);
            }
            op::RAW_BROKER => {
                let len = input.byte() as usize;
                let bytes = input.take(len);
                if let Some(b) = self.live_broker(arg) {
                    self.brokers[b].desync = true;
                    self.desync = true;
                    self.shard
                        .upstream_data(self.brokers[b].id, bytes, self.now);
                }
            }
            op::NEW_CLIENT => {
                self.connect_client(arg);
            }
            op::CLIENT_GONE => {
                if let Some(i) = self.live_client(arg) {
                    self.clients[i].gone = true;
                    self.shard.client_gone(self.clients[i].id, self.now);
                }
            }
            op::CONNECT_FAILS => {
                if !self.pending_connects.is_empty() {
                    let id = self.pending_connects.remove(0);
                    if let Some(b) = self.broker_of(id) {
                        self.brokers[b].dead = true;
                    }
                    self.shard
                        .upstream_gone(id, "Connection refused (os error 111)", self.now);
                }
            }
            op::SHUTDOWN => {
                if arg & 1 != 0 {
                    self.shard
                        .close_all_clients(320, "CONNECTION_FORCED - shutdown", self.now);
                }
                if arg & 2 != 0 {
                    self.shard.close_all_upstreams(self.now);
                }
            }
            op::SETTINGS => {
                let b = input.byte();
                let mut s = self.settings.clone();
                s.channel_reuse = b & 1 != 0;
                s.max_idle_channels = (b >> 1 & 3) as u32;
                s.client_buffer_limit = if b & 8 != 0 { 64 * 1024 } else { 1024 * 1024 };
                s.idle_channel_timeout = Duration::from_secs(if b & 16 != 0 { 1 } else { 30 });
                s.min_idle_connections = (b >> 5 & 1) as u32;
                self.client_limit = self.client_limit.max(s.client_buffer_limit);
                self.settings = s.clone();
                self.shard.set_settings(s);
            }
            _ => unreachable!(),
        }
    }

    fn broker_heartbeats(&mut self) {
        let mut hb = Vec::new();
        put_heartbeat(&mut hb);
        for b in 0..self.brokers.len() {
            let br = &self.brokers[b];
            if !br.dead && br.state == BState::Open {
                self.shard.upstream_data(br.id, &hb, self.now);
            }
        }
    }

    fn broker_event(&mut self, kind: u8, ub: u8, cb: u8, pb: u8) {
        let Some(b) = self.live_broker(ub) else {
            return;
        };
        let uid = self.brokers[b].id;
        let frame_max = self.brokers[b].frame_max;
        let open = self.brokers[b].state == BState::Open;
        let chans: Vec<u16> = self.brokers[b]
            .channels
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(n, _)| *n)
            .collect();
        let ch = (!chans.is_empty()).then(|| chans[cb as usize % chans.len()]);
        let mut out = Vec::new();
        let mut split = None;
        match (kind, ch) {
            (event::DELIVER | event::BIG_HEADER | event::SPLIT_DELIVER, Some(ch)) if open => {
                let br = &mut self.brokers[b];
                let tag = br.channels[&ch]
                    .consumers
                    .first()
                    .cloned()
                    .unwrap_or_else(|| b"amq.ctag-none".to_vec());
                let n = br.next();
                put_method(&mut out, ch, method::BASIC_DELIVER, |b| {
                    put_shortstr(b, &tag);
                    put_u64(b, n);
                    b.push(pb & 1);
                    put_shortstr(b, b"");
                    put_shortstr(b, b"q");
                });
                let body = vec![b'x'; pb as usize * 97];
                if kind == event::BIG_HEADER {
                    // A headers table that does not fit a small client
                    // frame_max (header frames cannot be split).
                    let mut headers = FieldTable::default();
                    headers.insert("h", FieldValue::LongStr(vec![b'h'; pb as usize * 128]));
                    let mut h = vec![0, 60, 0, 0];
                    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
                    h.extend_from_slice(&[0b0010_0000, 0]);
                    headers.write(&mut h);
                    if h.len() + 8 <= frame_max as usize {
                        put_frame(&mut out, FRAME_HEADER, ch, &h);
                        put_body_frames(&mut out, ch, &body, frame_max);
                    } else {
                        content(&mut out, ch, &body, frame_max);
                    }
                } else {
                    content(&mut out, ch, &body, frame_max);
                }
                if kind == event::SPLIT_DELIVER {
                    split = Some(cb as usize * 7 % out.len().max(1));
                }
            }
            (event::CHANNEL_CLOSE, Some(ch)) if open => {
                put_close(
                    &mut out,
                    ch,
                    406,
                    b"PRECONDITION_FAILED - fuzz",
                    method::QUEUE_DECLARE,
                );
                if let Some(c) = self.brokers[b].channels.get_mut(&ch) {
                    c.closing = true;
                }
            }
            (event::CANCEL, Some(ch)) if open => {
                let c = self.brokers[b].channels.get_mut(&ch).expect("channel");
                let tag = if c.consumers.is_empty() {
                    b"amq.ctag-none".to_vec()
                } else {
                    c.consumers.remove(0)
                };
                put_method(&mut out, ch, method::BASIC_CANCEL, |b| {
                    put_shortstr(b, &tag);
                    b.push(0);
                });
            }
            (event::BLOCKED, _) if open => {
                put_method(&mut out, 0, method::CONNECTION_BLOCKED, |b| {
                    put_shortstr(b, b"low on memory")
                });
            }
            (event::UNBLOCKED, _) if open => {
                put_method(&mut out, 0, method::CONNECTION_UNBLOCKED, |_| {})
            }
            (event::CONNECTION_CLOSE, _)
                if matches!(
                    self.brokers[b].state,
                    BState::Open
                        | BState::ExpectOpen
                        | BState::ExpectTuneOk
                        | BState::ExpectStartOk
                ) =>
            {
                put_close(
                    &mut out,
                    0,
                    320,
                    b"CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                    (0, 0),
                );
                self.brokers[b].state = BState::Closing;
            }
            (event::SOCKET_GONE, _) => {
                self.brokers[b].dead = true;
                self.shard
                    .upstream_gone(uid, "Connection reset by peer (os error 104)", self.now);
                return;
            }
            (event::RETURN, Some(ch)) if open => {
                put_method(&mut out, ch, method::BASIC_RETURN, |b| {
                    put_u16(b, 312);
                    put_shortstr(b, b"NO_ROUTE");
                    put_shortstr(b, b"");
                    put_shortstr(b, b"nowhere");
                });
                content(&mut out, ch, &vec![b'r'; pb as usize], frame_max);
            }
            (event::CONFIRM, Some(ch)) if open => {
                let c = &self.brokers[b].channels[&ch];
                let tag = c.published.max(1);
                let id = if pb & 1 != 0 {
                    (60, 120)
                } else {
                    method::BASIC_ACK
                };
                put_method(&mut out, ch, id, |b| {
                    put_u64(b, tag);
                    b.push(pb >> 1 & 3);
                });
            }
            (event::HEARTBEAT, _) => put_heartbeat(&mut out),
            _ => return,
        }
        match split {
            Some(at) => {
                self.shard.upstream_data(uid, &out[..at], self.now);
                self.settle();
                self.shard.upstream_data(uid, &out[at..], self.now);
            }
            None => self.shard.upstream_data(uid, &out, self.now),
        }
    }

    /// Every client leaves, the broker answers everything, the clock moves
    /// past every idle timeout: nothing may be left.
    fn finish(&mut self) {
        self.pump(false);
        self.settle();
        for i in 0..self.clients.len() {
            if !self.clients[i].gone {
                self.read_client(i, usize::MAX);
                self.clients[i].gone = true;
                self.shard.client_gone(self.clients[i].id, self.now);
            }
        }
        self.settle();
        let mut s = self.settings.clone();
        s.min_idle_connections = 0;
        self.settings = s.clone();
        self.shard.set_settings(s);
        for _ in 0..6 {
            self.pump(false);
            self.settle();
            self.now += Duration::from_secs(31);
            self.broker_heartbeats();
            self.shard.tick(self.now);
            self.settle();
        }
        self.pump(false);
        self.settle();
        let counts = self.shard.counts();
        assert_eq!(
            (counts.clients, counts.client_channels),
            (0, 0),
            "client state left after every client went: {counts:?}"
        );
        if !self.desync {
            assert_eq!(
                counts,
                Default::default(),
                "state left after every client went and every timeout passed"
            );
        }
    }
}

// ---- the input builder (seeds) -----------------------------------------

/// Writes programs in the driver's input format.
pub struct Script(pub Vec<u8>);

impl Script {
    /// `config0`: bit 0 channel_reuse, 1 client capabilities, 2-3 client
    /// frame_max (server's, 4096, 131072, 65536), 4 heartbeat 10 s, 5 three
    /// channels per upstream, 6 64 KiB client buffer limit, 7 channel_max 4.
    /// `config1`: bits 0-1 broker frame_max (131072, 4096, 8192), 2 no
    /// broker heartbeat, 3 min_idle_connections 1, 4 x-delayed-message.
    pub fn new(config0: u8, config1: u8) -> Self {
        Script(vec![config0, config1])
    }

    fn op(&mut self, kind: u8, arg: u8) -> &mut Self {
        self.0.push(kind | arg << 4);
        self
    }

    /// Client `client` sends `bytes` (in chunks of at most 65535).
    pub fn client(&mut self, client: u8, bytes: &[u8]) -> &mut Self {
        for chunk in bytes.chunks(65535) {
            self.op(op::CLIENT, client);
            if chunk.len() < 0xFF {
                self.0.push(chunk.len() as u8);
            } else {
                self.0.push(0xFF);
                self.0
                    .extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            }
            self.0.extend_from_slice(chunk);
        }
        self
    }

    /// Client `client` sends `bytes` in chunks of `n`.
    pub fn client_chunked(&mut self, client: u8, bytes: &[u8], n: usize) -> &mut Self {
        for chunk in bytes.chunks(n.max(1)) {
            self.client(client, chunk);
        }
        self
    }

    pub fn pump(&mut self) -> &mut Self {
        self.op(op::PUMP, 0)
    }

    /// Advances the clock `n` x 200 ms (`coarse`: x 5 s), with heartbeats
    /// from the broker and the clients first when `heartbeats`.
    pub fn tick(&mut self, n: u8, coarse: bool, heartbeats: bool) -> &mut Self {
        self.op(
            op::TICK,
            (coarse as u8) << 2 | if heartbeats { 3 } else { 0 },
        );
        self.0.push(n);
        self
    }

    /// Client `client` reads `n` x 32 bytes (0: everything).
    pub fn read(&mut self, client: u8, n: u8) -> &mut Self {
        self.op(op::READ, client);
        self.0.push(n);
        self
    }

    pub fn event(&mut self, kind: u8, upstream: u8, channel: u8, param: u8) -> &mut Self {
        self.op(op::EVENT, kind);
        self.0.extend_from_slice(&[upstream, channel, param]);
        self
    }

    pub fn raw_broker(&mut self, upstream: u8, bytes: &[u8]) -> &mut Self {
        self.op(op::RAW_BROKER, upstream);
        self.0.push(bytes.len().min(255) as u8);
        self.0.extend_from_slice(&bytes[..bytes.len().min(255)]);
        self
    }

    pub fn new_client(&mut self, flags: u8) -> &mut Self {
        self.op(op::NEW_CLIENT, flags)
    }

    pub fn client_gone(&mut self, client: u8) -> &mut Self {
        self.op(op::CLIENT_GONE, client)
    }

    pub fn connect_fails(&mut self) -> &mut Self {
        self.op(op::CONNECT_FAILS, 0)
    }

    pub fn shutdown(&mut self, flags: u8) -> &mut Self {
        self.op(op::SHUTDOWN, flags)
    }

    pub fn settings(&mut self, b: u8) -> &mut Self {
        self.op(op::SETTINGS, 0);
        self.0.push(b);
        self
    }
}
