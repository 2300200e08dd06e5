//! Pair tests: a scripted client and a scripted broker drive one shard
//! under a virtual clock, byte for byte.

use super::*;
use crate::core::{Action, CLOSE_TIMEOUT};
use crate::protocol::constants::{method, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD};
use crate::protocol::frame::{parse_frame, put_frame, FrameStatus};
use crate::protocol::methods::{self as m, Close, StartOk, Tune};
use crate::protocol::table::{FieldTable, FieldValue};
use std::time::Duration;

type Wire = Vec<(u8, u16, Vec<u8>)>;

#[allow(non_snake_case)]
fn NO_REUSE() -> Settings {
    Settings {
        channel_reuse: false,
        ..Settings::default()
    }
}

struct Pair {
    shard: Shard,
    now: Instant,
}

fn frames(mut bytes: &[u8]) -> Wire {
    let mut v = Vec::new();
    while let Ok(FrameStatus::Complete(f, used)) = parse_frame(bytes, 0) {
        v.push((f.frame_type, f.channel, f.payload.to_vec()));
        bytes = &bytes[used..];
    }
    assert!(bytes.is_empty(), "trailing bytes: {bytes:?}");
    v
}

fn mid(f: &(u8, u16, Vec<u8>)) -> Option<method::Id> {
    (f.0 == FRAME_METHOD).then(|| m::method_id(&f.2).unwrap())
}

fn method_frame(channel: u16, id: method::Id, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    m::put_method(&mut out, channel, id, |b| b.extend_from_slice(args));
    out
}

/// A basic-class content header payload for `size` octets, no properties.
fn basic_header(size: u64) -> Vec<u8> {
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&size.to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    header
}

fn publish(channel: u16, routing_key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut args = vec![0, 0, 0, routing_key.len() as u8];
    args.extend_from_slice(routing_key);
    args.push(0);
    let mut out = method_frame(channel, method::BASIC_PUBLISH, &args);
    let header = basic_header(body.len() as u64);
    put_frame(&mut out, FRAME_HEADER, channel, &header);
    if !body.is_empty() {
        put_frame(&mut out, FRAME_BODY, channel, body);
    }
    out
}

fn client_props(caps: &[&str]) -> FieldTable {
    let mut c = FieldTable::default();
    for cap in caps {
        c.insert(cap, FieldValue::Bool(true));
    }
    let mut t = FieldTable::default();
    t.insert("capabilities", FieldValue::Table(c));
    t
}

impl Pair {
    fn new(settings: Settings) -> Self {
        let now = Instant::now();
        Pair {
            shard: Shard::new(settings, now),
            now,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.shard.tick(self.now);
    }

    fn out(&mut self, conn: ConnRef) -> Vec<u8> {
        let bytes = self.shard.output(conn).to_vec();
        self.shard.output_written(conn, bytes.len());
        bytes
    }

    fn client_out(&mut self, id: ClientId) -> Wire {
        frames(&self.out(ConnRef::Client(id)))
    }

    fn upstream_out(&mut self, id: UpstreamId) -> Wire {
        frames(&self.out(ConnRef::Upstream(id)))
    }

    fn send_client(&mut self, id: ClientId, bytes: &[u8]) {
        self.shard.client_data(id, bytes, self.now);
    }

    fn send_upstream(&mut self, id: UpstreamId, bytes: &[u8]) {
        self.shard.upstream_data(id, bytes, self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        self.shard.take_actions().collect()
    }

    fn connects(&mut self) -> Vec<UpstreamId> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Connect(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Client handshake up to Connection.Open (inclusive).
    fn client(&mut self, user: &str, password: &str, caps: &[&str], frame_max: u32) -> ClientId {
        let id = self.shard.client_connected("127.0.0.1:1".into(), self.now);
        self.send_client(id, b"AMQP\x00\x00\x09\x01");
        let start = self.client_out(id);
        assert_eq!(mid(&start[0]), Some(method::CONNECTION_START));
        let mut bytes = Vec::new();
        m::put_connection_start_ok(
            &mut bytes,
            &client_props(caps),
            b"PLAIN",
            format!("\0{user}\0{password}").as_bytes(),
        );
        self.send_client(id, &bytes);
        let tune = self.client_out(id);
        assert_eq!(mid(&tune[0]), Some(method::CONNECTION_TUNE));
        let mut bytes = Vec::new();
        m::put_tune(
            &mut bytes,
            true,
            Tune {
                channel_max: 0,
                frame_max,
                heartbeat: 0,
            },
        );
        m::put_connection_open(&mut bytes, b"/");
        self.send_client(id, &bytes);
        id
    }

    /// A client handshake with a chosen mechanism and TuneOk, up to
    /// Connection.Open (inclusive); the broker side is the caller's.
    fn raw_client(&mut self, mechanism: &[u8], response: &[u8], tune: Tune) -> ClientId {
        let id = self.shard.client_connected("127.0.0.1:9".into(), self.now);
        self.send_client(id, b"AMQP\x00\x00\x09\x01");
        let mut bytes = Vec::new();
        m::put_connection_start_ok(&mut bytes, &FieldTable::default(), mechanism, response);
        m::put_tune(&mut bytes, true, tune);
        m::put_connection_open(&mut bytes, b"/");
        self.send_client(id, &bytes);
        id
    }

    /// The broker's side of an upstream handshake, checking what the proxy sends.
    fn broker_accepts(&mut self, up: UpstreamId, expect_user: &str, expect_password: &str) {
        self.shard.upstream_connected(up, self.now);
        assert_eq!(self.out(ConnRef::Upstream(up)), b"AMQP\x00\x00\x09\x01");
        let mut start = Vec::new();
        m::put_connection_start(
            &mut start,
            &FieldTable::default(),
            b"AMQPLAIN PLAIN",
            b"en_US",
        );
        self.send_upstream(up, &start);
        let ok = self.upstream_out(up);
        assert_eq!(mid(&ok[0]), Some(method::CONNECTION_START_OK));
        let s = StartOk::decode(&ok[0].2).unwrap();
        assert_eq!(s.mechanism, b"PLAIN");
        assert_eq!(
            s.response,
            format!("\0{expect_user}\0{expect_password}").as_bytes()
        );
        assert!(s
            .client_properties
            .string("connection_name")
            .unwrap()
            .contains("pool"));
        let mut tune = Vec::new();
        m::put_tune(
            &mut tune,
            false,
            Tune {
                channel_max: 2047,
                frame_max: 131072,
                heartbeat: 60,
            },
        );
        self.send_upstream(up, &tune);
        let sent = self.upstream_out(up);
        assert_eq!(mid(&sent[0]), Some(method::CONNECTION_TUNE_OK));
        assert_eq!(mid(&sent[1]), Some(method::CONNECTION_OPEN));
        let mut open_ok = Vec::new();
        m::put_connection_open_ok(&mut open_ok);
        self.send_upstream(up, &open_ok);
    }

    /// A connected client with one open channel `ch`; returns the upstream
    /// channel number.
    fn open_channel(&mut self, client: ClientId, up: UpstreamId, ch: u16) -> u16 {
        let mut open = Vec::new();
        m::put_channel_open(&mut open, ch);
        self.send_client(client, &open);
        let sent = self.upstream_out(up);
        assert_eq!(sent.len(), 1);
        assert_eq!(mid(&sent[0]), Some(method::CHANNEL_OPEN));
        let n = sent[0].1;
        let mut ok = Vec::new();
        m::put_channel_open_ok(&mut ok, n);
        self.send_upstream(up, &ok);
        let got = self.client_out(client);
        assert_eq!(
            (mid(&got[0]), got[0].1),
            (Some(method::CHANNEL_OPEN_OK), ch)
        );
        n
    }

    fn connected_client(&mut self) -> (ClientId, UpstreamId) {
        let c = self.client(
            "guest",
            "guest",
            &["connection.blocked", "authentication_failure_close"],
            131072,
        );
        let ups = self.connects();
        assert_eq!(ups.len(), 1);
        self.broker_accepts(ups[0], "guest", "guest");
        let got = self.client_out(c);
        assert_eq!(mid(&got[0]), Some(method::CONNECTION_OPEN_OK));
        (c, ups[0])
    }
}

fn close_of(f: &(u8, u16, Vec<u8>)) -> (u16, String) {
    let c = Close::decode(&f.2).unwrap();
    (
        c.reply_code,
        String::from_utf8_lossy(c.reply_text).into_owned(),
    )
}

#[test]
fn open_ok_only_after_upstream_authenticated() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "guest", &[], 131072);
    assert!(
        p.client_out(c).is_empty(),
        "no OpenOk before the broker accepted the credentials"
    );
    let ups = p.connects();
    p.broker_accepts(ups[0], "guest", "guest");
    assert_eq!(mid(&p.client_out(c)[0]), Some(method::CONNECTION_OPEN_OK));
}

#[test]
fn wrong_password_gets_the_brokers_403() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "wrong", &["authentication_failure_close"], 131072);
    let up = p.connects()[0];
    p.shard.upstream_connected(up, p.now);
    p.out(ConnRef::Upstream(up));
    let mut start = Vec::new();
    m::put_connection_start(&mut start, &FieldTable::default(), b"PLAIN", b"en_US");
    p.send_upstream(up, &start);
    p.out(ConnRef::Upstream(up));
    let mut close = Vec::new();
    m::put_close(
        &mut close,
        0,
        403,
        b"ACCESS_REFUSED - Login was refused",
        (10, 11),
    );
    p.send_upstream(up, &close);
    let got = p.client_out(c);
    assert_eq!(
        close_of(&got[0]),
        (403, "ACCESS_REFUSED - Login was refused".into())
    );
    // The broker got its CloseOk.
    assert_eq!(
        mid(&p.upstream_out(up)[0]),
        Some(method::CONNECTION_CLOSE_OK)
    );
}

#[test]
fn unreachable_broker_is_a_clear_close() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "guest", &[], 131072);
    let up = p.connects()[0];
    p.shard
        .upstream_gone(up, "Connection refused (os error 111)", p.now);
    let got = p.client_out(c);
    let (code, text) = close_of(&got[0]);
    assert_eq!(code, 541);
    assert!(
        text.contains("unreachable") && text.contains("refused"),
        "{text}"
    );
}

#[test]
fn a_broker_frame_max_below_4096_is_refused() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "guest", &[], 131072);
    let up = p.connects()[0];
    p.shard.upstream_connected(up, p.now);
    assert_eq!(p.out(ConnRef::Upstream(up)), b"AMQP\x00\x00\x09\x01");
    let mut start = Vec::new();
    m::put_connection_start(&mut start, &FieldTable::default(), b"PLAIN", b"en_US");
    p.send_upstream(up, &start);
    p.upstream_out(up);
    let mut tune = Vec::new();
    m::put_tune(
        &mut tune,
        false,
        Tune {
            channel_max: 2047,
            frame_max: 1000,
            heartbeat: 60,
        },
    );
    p.send_upstream(up, &tune);
    let (code, text) = close_of(&p.client_out(c)[0]);
    assert_eq!(code, 541);
    assert!(text.contains("frame_max 1000"), "{text}");
}

#[test]
fn same_credentials_share_an_upstream_different_ones_do_not() {
    let mut p = Pair::new(Settings::default());
    let (_a, up) = p.connected_client();
    let b = p.client("guest", "guest", &[], 131072);
    assert!(p.connects().is_empty());
    assert_eq!(mid(&p.client_out(b)[0]), Some(method::CONNECTION_OPEN_OK));
    let _c = p.client("guest", "other-password", &[], 131072);
    let other = p.connects();
    assert_eq!(other.len(), 1);
    assert_ne!(other[0], up);
}

#[test]
fn publish_is_forwarded_whole_with_rewritten_channel() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 5);
    let bytes = publish(5, b"q", b"hello");
    // Feed one byte at a time: nothing goes upstream until the body is whole.
    for (i, b) in bytes.iter().enumerate() {
        p.send_client(c, std::slice::from_ref(b));
        if i + 1 < bytes.len() {
            assert!(
                p.shard.output(ConnRef::Upstream(up)).is_empty(),
                "partial publish forwarded at byte {i}"
            );
        }
    }
    let sent = p.upstream_out(up);
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|f| f.1 == n));
    assert_eq!(sent[2].2, b"hello");
    let stats = p.shard.stats();
    assert_eq!(
        (
            stats.messages_published,
            stats.handshakes_ok,
            stats.upstream_connects
        ),
        (1, 1, 1)
    );
    assert_eq!(stats.upstream_connect_latency.count, 1);
    let stats = p.shard.stats();
    assert_eq!(
        (
            stats.messages_published,
            stats.handshakes_ok,
            stats.upstream_connects
        ),
        (1, 1, 1)
    );
    assert_eq!(stats.upstream_connect_latency.count, 1);
}

#[test]
fn client_dying_mid_publish_leaves_nothing_upstream() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    let bytes = publish(1, b"q", &[7u8; 100]);
    // Method + header, no body.
    let cut = bytes.len() - (100 + 8);
    p.send_client(c, &bytes[..cut]);
    p.shard.client_gone(c, p.now);
    let sent = p.upstream_out(up);
    assert_eq!(
        sent.len(),
        1,
        "only the channel close goes upstream: {sent:?}"
    );
    assert_eq!((mid(&sent[0]), sent[0].1), (Some(method::CHANNEL_CLOSE), n));
}

#[test]
fn bodies_are_split_to_each_sides_frame_max() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "guest", &[], 4096);
    let up = p.connects()[0];
    p.broker_accepts(up, "guest", "guest");
    p.client_out(c);
    let n = p.open_channel(c, up, 1);
    // A delivery with a 10,000-byte body in one upstream frame.
    let mut deliver = method_frame(
        n,
        method::BASIC_DELIVER,
        &[3, b'c', b't', b'g', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, b'q'],
    );
    let header = basic_header(10_000u64);
    put_frame(&mut deliver, FRAME_HEADER, n, &header);
    put_frame(&mut deliver, FRAME_BODY, n, &[9u8; 10_000]);
    p.send_upstream(up, &deliver);
    let got = p.client_out(c);
    let bodies: Vec<usize> = got
        .iter()
        .filter(|f| f.0 == FRAME_BODY)
        .map(|f| f.2.len())
        .collect();
    assert_eq!(bodies, vec![4088, 4088, 1824]);
    assert!(got.iter().all(|f| f.1 == 1));
}

#[test]
fn broker_connection_close_reaches_only_clients_with_channels_there() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let mut close = Vec::new();
    m::put_close(&mut close, 0, 320, b"CONNECTION_FORCED - test", (0, 0));
    p.send_upstream(up, &close);
    let got = p.client_out(a);
    assert_eq!(close_of(&got[0]), (320, "CONNECTION_FORCED - test".into()));
    assert!(
        p.client_out(b).is_empty(),
        "client without a channel there is untouched"
    );
    // The next channel of b gets a new upstream connection.
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 1);
    p.send_client(b, &open);
    assert_eq!(p.connects().len(), 1);
}

#[test]
fn idle_upstream_closes_after_the_timeout() {
    let settings = Settings {
        idle_connection_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let (c, up) = p.connected_client();
    p.shard.client_gone(c, p.now);
    p.advance(Duration::from_millis(500));
    assert!(p
        .upstream_out(up)
        .iter()
        .all(|f| mid(f) != Some(method::CONNECTION_CLOSE)));
    p.advance(Duration::from_millis(600));
    let sent = p.upstream_out(up);
    assert!(
        sent.iter()
            .any(|f| mid(f) == Some(method::CONNECTION_CLOSE)),
        "{sent:?}"
    );
}

#[test]
fn max_upstream_channels_opens_a_second_connection() {
    let settings = Settings {
        max_upstream_channels: 3,
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let (c, up) = p.connected_client();
    for ch in 1..=3 {
        p.open_channel(c, up, ch);
    }
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 4);
    m::put_channel_open(&mut open, 5);
    p.send_client(c, &open);
    let ups = p.connects();
    assert_eq!(ups.len(), 1, "channels 4 and 5 share one new connection");
    p.broker_accepts(ups[0], "guest", "guest");
    let sent = p.upstream_out(ups[0]);
    assert_eq!(
        sent.iter()
            .filter(|f| mid(f) == Some(method::CHANNEL_OPEN))
            .count(),
        2
    );
}

#[test]
fn handshake_timeout_closes_a_silent_client() {
    let mut p = Pair::new(Settings::default());
    let c = p.shard.client_connected("127.0.0.1:2".into(), p.now);
    p.advance(Duration::from_secs(9));
    assert!(p.actions().is_empty());
    p.advance(Duration::from_secs(2));
    assert_eq!(
        p.actions(),
        vec![Action::CloseAfterFlush(ConnRef::Client(c))]
    );
}

#[test]
fn bad_frame_end_closes_that_client_alone_with_501() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let mut bad = publish(1, b"q", b"x");
    let last = bad.len() - 1;
    bad[last] = 0;
    p.send_client(a, &bad);
    let got = p.client_out(a);
    assert_eq!(close_of(&got[0]).0, 501);
    let sent = p.upstream_out(up);
    // Only the channel close for a's channel; no publish bytes.
    assert!(
        sent.iter().all(|f| mid(f) == Some(method::CHANNEL_CLOSE)),
        "{sent:?}"
    );
    assert!(p.client_out(b).is_empty());
}

#[test]
fn broker_channel_close_drops_client_frames_until_close_ok() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    let mut close = Vec::new();
    m::put_close(
        &mut close,
        n,
        406,
        b"PRECONDITION_FAILED - unknown delivery tag 1",
        (60, 80),
    );
    p.send_upstream(up, &close);
    assert_eq!(close_of(&p.client_out(c)[0]).0, 406);
    // A late ack from the client is dropped, not forwarded.
    p.send_client(c, &method_frame(1, (60, 80), &[0, 0, 0, 0, 0, 0, 0, 2, 0]));
    assert!(p.upstream_out(up).is_empty());
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, 1);
    p.send_client(c, &ok);
    let sent = p.upstream_out(up);
    assert_eq!(
        (mid(&sent[0]), sent[0].1),
        (Some(method::CHANNEL_CLOSE_OK), n)
    );
    // The number is free again.
    assert_eq!(p.open_channel(c, up, 1), n);
}

#[test]
fn unsolicited_close_ok_keeps_the_mapping() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, 1);
    p.send_client(c, &ok);
    assert!(p.upstream_out(up).is_empty());
    p.send_client(c, &publish(1, b"q", b"still open"));
    let sent = p.upstream_out(up);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].1, n);
}

#[test]
fn client_channel_close_round_trip() {
    let mut p = Pair::new(NO_REUSE());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 3);
    let mut close = Vec::new();
    m::put_close(&mut close, 3, 200, b"bye", (0, 0));
    p.send_client(c, &close);
    let sent = p.upstream_out(up);
    assert_eq!((mid(&sent[0]), sent[0].1), (Some(method::CHANNEL_CLOSE), n));
    assert!(p.client_out(c).is_empty(), "CloseOk comes from the broker");
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, n);
    p.send_upstream(up, &ok);
    let got = p.client_out(c);
    assert_eq!(
        (mid(&got[0]), got[0].1),
        (Some(method::CHANNEL_CLOSE_OK), 3)
    );
    assert_eq!(p.shard.counts().upstream_channels, 0);
}

#[test]
fn blocked_goes_only_to_clients_that_asked() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client(); // advertises connection.blocked
    p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    p.open_channel(b, up, 1);
    let blocked = method_frame(0, method::CONNECTION_BLOCKED, &[3, b'm', b'e', b'm']);
    p.send_upstream(up, &blocked);
    assert_eq!(mid(&p.client_out(a)[0]), Some(method::CONNECTION_BLOCKED));
    assert!(p.client_out(b).is_empty());
}

#[test]
fn heartbeats_are_sent_to_a_client_that_only_publishes() {
    let mut p = Pair::new(Settings::default());
    let id = p.raw_client(
        b"PLAIN",
        b"\0guest\0guest",
        Tune {
            channel_max: 0,
            frame_max: 0,
            heartbeat: 2,
        },
    );
    let up = p.connects()[0];
    p.broker_accepts(up, "guest", "guest");
    p.client_out(id);
    let mut beats = 0;
    for _ in 0..30 {
        // The client keeps sending (a publish-only client) but reads nothing.
        p.send_client(id, &[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0xCE]);
        p.advance(Duration::from_millis(250));
        beats += p
            .client_out(id)
            .iter()
            .filter(|f| f.0 == FRAME_HEARTBEAT)
            .count();
    }
    // 7.5 s at one heartbeat per second (half the 2 s interval).
    assert!((6..=8).contains(&beats), "{beats} heartbeats");
}

#[test]
fn amqplain_login_works() {
    let mut p = Pair::new(Settings::default());
    let mut login = FieldTable::default();
    login.insert("LOGIN", crate::protocol::table::string("guest"));
    login.insert("PASSWORD", crate::protocol::table::string("s3cret"));
    let mut response = Vec::new();
    login.write_body(&mut response);
    let id = p.raw_client(
        b"AMQPLAIN",
        &response,
        Tune {
            channel_max: 0,
            frame_max: 0,
            heartbeat: 0,
        },
    );
    let up = p.connects()[0];
    p.broker_accepts(up, "guest", "s3cret");
    let got = p.client_out(id);
    assert_eq!(mid(got.last().unwrap()), Some(method::CONNECTION_OPEN_OK));
}

#[test]
fn frames_on_unopened_channel_and_double_open_are_504() {
    for bytes in [method_frame(9, (60, 80), &[0; 9]), {
        let mut v = Vec::new();
        m::put_channel_open(&mut v, 1);
        m::put_channel_open(&mut v, 1);
        v
    }] {
        let mut p = Pair::new(Settings::default());
        let (c, _up) = p.connected_client();
        p.send_client(c, &bytes);
        let got = p.client_out(c);
        let close = got
            .iter()
            .find(|f| mid(f) == Some(method::CONNECTION_CLOSE))
            .unwrap();
        assert_eq!(close_of(close).0, 504);
    }
}

#[test]
fn close_ok_after_a_connection_error_closes_at_once() {
    let mut p = Pair::new(Settings::default());
    let (c, _up) = p.connected_client();
    p.send_client(c, &method_frame(0, (60, 40), &[0, 0, 0, 0, 0]));
    assert_eq!(close_of(&p.client_out(c)[0]).0, 504);
    p.actions();
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, 0);
    p.send_client(c, &ok);
    assert_eq!(
        p.actions(),
        vec![Action::CloseAfterFlush(ConnRef::Client(c))]
    );
}

#[test]
fn full_upstream_pauses_only_the_clients_feeding_it_until_it_drains() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let body = vec![1u8; 64 * 1024];
    let mut sent = 0;
    // The broker's socket accepts nothing: output piles up.
    while p.shard.client_may_read(a) {
        p.send_client(a, &publish(1, b"q", &body));
        sent += 1;
        assert!(sent < 1000, "never paused");
    }
    let queued = p.shard.output(ConnRef::Upstream(up)).len();
    assert!(queued >= crate::core::UPSTREAM_HIGH_WATER, "{queued}");
    assert!(
        queued < crate::core::UPSTREAM_HIGH_WATER + 2 * body.len(),
        "{queued}"
    );
    assert!(
        p.shard.client_may_read(b),
        "a client with no channel there is not paused"
    );
    p.actions();
    // Drain to just above the low-water mark: still paused.
    let keep = crate::core::UPSTREAM_LOW_WATER + 1;
    p.shard.output_written(ConnRef::Upstream(up), queued - keep);
    assert!(!p.shard.client_may_read(a));
    p.shard.output_written(ConnRef::Upstream(up), 2);
    assert!(p.shard.client_may_read(a));
    assert_eq!(p.actions(), vec![Action::Resume(a)]);
}

/// Two clients, each with channel 1 open on the same upstream connection.
fn two_publishers(p: &mut Pair) -> (ClientId, ClientId, UpstreamId) {
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    p.open_channel(b, up, 1);
    (a, b, up)
}

/// `a` publishes until the upstream output, which the broker never reads,
/// pauses it; returns the bytes queued upstream.
fn fill_upstream(p: &mut Pair, a: ClientId, up: UpstreamId) -> usize {
    let body = vec![1u8; 64 * 1024];
    while p.shard.client_may_read(a) {
        p.send_client(a, &publish(1, b"q", &body));
    }
    p.shard.output(ConnRef::Upstream(up)).len()
}

/// Octets in the body frames of `frames`.
fn body_octets(frames: &Wire) -> usize {
    frames
        .iter()
        .filter(|f| f.0 == FRAME_BODY)
        .map(|f| f.2.len())
        .sum()
}

#[test]
fn a_publish_for_a_full_upstream_waits_unread_until_it_drains() {
    // A broker that stops reading (memory alarm, stall): each client that
    // starts a publish towards it is paused before the message, so the
    // proxy does not take one more message per client while it waits.
    let mut p = Pair::new(Settings::default());
    let (a, b, up) = two_publishers(&mut p);
    let queued = fill_upstream(&mut p, a, up);
    assert!(queued >= crate::core::UPSTREAM_HIGH_WATER);
    // B's publish (and a heartbeat after it) is not taken.
    let big = vec![2u8; 100 * 1024];
    let mut bytes = publish(1, b"q", &big);
    bytes.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
    p.send_client(b, &bytes);
    assert!(!p.shard.client_may_read(b), "B is paused");
    assert_eq!(
        p.shard.output(ConnRef::Upstream(up)).len(),
        queued,
        "nothing of B's message was queued upstream"
    );
    p.actions();
    // The broker reads everything: B's message goes up whole.
    p.shard.output_written(ConnRef::Upstream(up), queued);
    assert!(p.shard.client_may_read(b));
    let sent = p.upstream_out(up);
    let bodies = body_octets(&sent);
    assert_eq!(bodies, big.len());
    assert!(p.actions().contains(&Action::Resume(b)));
}

#[test]
fn a_message_begun_before_the_upstream_filled_is_not_finished_into_it() {
    // The message being assembled counts in the buffer budget; the
    // upstream output does not: its last body waits until the broker reads.
    let mut p = Pair::new(Settings::default());
    let (a, b, up) = two_publishers(&mut p);
    // B: method, header and the first of two 100 KB body frames.
    let whole = publish(1, b"q", &[]);
    let method_len = 8 + u32::from_be_bytes(whole[3..7].try_into().unwrap()) as usize;
    let mut start = whole[..method_len].to_vec();
    let header = basic_header(200_000u64);
    put_frame(&mut start, FRAME_HEADER, 1, &header);
    put_frame(&mut start, FRAME_BODY, 1, &vec![3u8; 100_000]);
    p.send_client(b, &start);
    // A fills the upstream: the broker reads nothing.
    let queued = fill_upstream(&mut p, a, up);
    let mut last = Vec::new();
    put_frame(&mut last, FRAME_BODY, 1, &vec![4u8; 100_000]);
    p.send_client(b, &last);
    assert!(!p.shard.client_may_read(b), "B is paused");
    assert_eq!(p.shard.output(ConnRef::Upstream(up)).len(), queued);
    p.shard.output_written(ConnRef::Upstream(up), queued);
    let sent = p.upstream_out(up);
    let bodies = body_octets(&sent);
    assert_eq!(
        bodies, 200_000,
        "B's message went up whole once the broker read"
    );
}

#[test]
fn slow_consumer_is_closed_with_506_and_the_upstream_keeps_flowing() {
    let settings = Settings {
        client_buffer_limit: 64 * 1024,
        ..NO_REUSE()
    };
    let mut p = Pair::new(settings);
    let (slow, up) = p.connected_client();
    let n_slow = p.open_channel(slow, up, 1);
    let fast = p.client("guest", "guest", &[], 131072);
    p.client_out(fast);
    let n_fast = p.open_channel(fast, up, 1);
    let deliver = |n: u16| {
        let mut d = method_frame(
            n,
            method::BASIC_DELIVER,
            &[1, b'c', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, b'q'],
        );
        let header = basic_header(8000u64);
        put_frame(&mut d, FRAME_HEADER, n, &header);
        put_frame(&mut d, FRAME_BODY, n, &[5u8; 8000]);
        d
    };
    for _ in 0..20 {
        // The slow client never reads; the fast one does.
        p.send_upstream(up, &deliver(n_slow));
        p.send_upstream(up, &deliver(n_fast));
        assert!(p.client_out(fast).iter().any(|f| f.0 == FRAME_BODY));
    }
    let unread = p.out(ConnRef::Client(slow));
    assert!(
        unread.len() <= 64 * 1024 + 9000,
        "buffer bounded: {}",
        unread.len()
    );
    let got = frames(&unread);
    let close = got
        .iter()
        .find(|f| mid(f) == Some(method::CONNECTION_CLOSE))
        .expect("506 close");
    assert_eq!(
        close_of(close),
        (506, "RESOURCE_ERROR - slow consumer".into())
    );
    // Its channel is closed upstream so unacked deliveries are requeued.
    let sent = p.upstream_out(up);
    assert!(
        sent.iter()
            .any(|f| mid(f) == Some(method::CHANNEL_CLOSE) && f.1 == n_slow),
        "{sent:?}"
    );
}

fn deliver(n: u16, body: usize) -> Vec<u8> {
    let mut d = method_frame(
        n,
        method::BASIC_DELIVER,
        &[1, b'c', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, b'q'],
    );
    let header = basic_header(body as u64);
    put_frame(&mut d, FRAME_HEADER, n, &header);
    put_frame(&mut d, FRAME_BODY, n, &vec![5u8; body]);
    d
}

#[test]
fn past_the_budget_the_largest_buffer_is_disconnected_and_its_memory_freed() {
    let budget = 256 * 1024;
    let settings = Settings {
        client_buffer_budget: budget,
        ..NO_REUSE()
    };
    let mut p = Pair::new(settings);
    let (big, up) = p.connected_client();
    let n_big = p.open_channel(big, up, 1);
    let open = |p: &mut Pair| {
        let c = p.client("guest", "guest", &[], 131072);
        p.client_out(c);
        let n = p.open_channel(c, up, 1);
        (c, n)
    };
    let (medium, n_medium) = open(&mut p);
    let (fast, n_fast) = open(&mut p);
    // Neither big nor medium reads; big gets twice as much.
    let mut rounds = 0;
    while p.shard.counts().clients == 3 && !closing(&p, big) {
        p.send_upstream(up, &deliver(n_big, 8000));
        p.send_upstream(up, &deliver(n_big, 8000));
        p.send_upstream(up, &deliver(n_medium, 8000));
        p.send_upstream(up, &deliver(n_fast, 8000));
        assert!(p.client_out(fast).iter().any(|f| f.0 == FRAME_BODY));
        rounds += 1;
        assert!(rounds < 1000, "never disconnected anyone");
    }
    assert!(closing(&p, big), "the largest buffer goes first");
    assert!(!closing(&p, medium), "one victim is enough");
    assert!(rounds > 5, "not before the budget: {rounds} rounds");
    // Its unsent deliveries are dropped at once: only the Close is left.
    let left = frames(p.shard.output(ConnRef::Client(big)));
    assert_eq!(left.len(), 1);
    assert_eq!(
        close_of(&left[0]),
        (506, "RESOURCE_ERROR - slow consumer".into())
    );
    assert!(
        p.shard.buffer_bytes() < budget,
        "{} bytes still counted",
        p.shard.buffer_bytes()
    );
    // Its channel is closed upstream so the broker requeues its deliveries.
    assert!(p
        .upstream_out(up)
        .iter()
        .any(|f| mid(f) == Some(method::CHANNEL_CLOSE) && f.1 == n_big));
    // Everything buffered is given back when the clients go.
    for c in [big, medium, fast] {
        p.shard.client_gone(c, p.now);
    }
    assert_eq!(p.shard.buffer_bytes(), 0);
}

#[test]
fn under_the_budget_small_buffers_are_left_alone() {
    // Over budget, but no buffer is big enough to be a slow consumer's.
    let settings = Settings {
        client_buffer_budget: 4096,
        ..NO_REUSE()
    };
    let mut p = Pair::new(settings);
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    for _ in 0..4 {
        p.send_upstream(up, &deliver(n, 4000));
    }
    assert!(p.shard.buffer_bytes() > 4096);
    assert!(!closing(&p, a));
    assert_eq!(p.client_out(a).len(), 4 * 3);
}

/// A Basic.Publish method and content header announcing `size` octets.
fn publish_start(channel: u16, size: u64) -> Vec<u8> {
    let mut d = method_frame(channel, method::BASIC_PUBLISH, &[0, 0, 0, 1, b'q', 0]);
    let header = basic_header(size);
    put_frame(&mut d, FRAME_HEADER, channel, &header);
    d
}

#[test]
fn unfinished_publishes_count_in_the_budget_and_the_largest_holder_is_closed() {
    let budget = 1024 * 1024;
    let settings = Settings {
        client_buffer_budget: budget,
        ..NO_REUSE()
    };
    let mut p = Pair::new(settings);
    let (hog, up) = p.connected_client();
    let small = p.client("guest", "guest", &[], 131072);
    p.client_out(small);
    p.open_channel(small, up, 1);
    // Small: one 200 KB message in progress, then done.
    p.send_client(small, &publish_start(1, 200_000));
    let mut body = Vec::new();
    put_frame(&mut body, FRAME_BODY, 1, &vec![1u8; 100_000]);
    p.send_client(small, &body);
    // Hog: 20 channels, each a 100 MB message with 100 KB of it sent.
    for ch in 1..=20u16 {
        p.open_channel(hog, up, ch);
        p.send_client(hog, &publish_start(ch, 100_000_000));
        let mut body = Vec::new();
        put_frame(&mut body, FRAME_BODY, ch, &vec![7u8; 100_000]);
        p.send_client(hog, &body);
        if closing(&p, hog) {
            break;
        }
    }
    assert!(
        closing(&p, hog),
        "the hog passed the budget and was not closed"
    );
    let got = p.client_out(hog);
    assert_eq!(
        close_of(got.last().unwrap()),
        (
            506,
            "RESOURCE_ERROR - proxy buffer budget exceeded by unfinished publishes".into()
        )
    );
    assert_eq!(p.shard.stats().budget_publisher_disconnects, 1);
    assert!(
        p.shard.buffer_bytes() < 512 * 1024,
        "the hog's buffers are still counted: {}",
        p.shard.buffer_bytes()
    );
    // The other publisher is untouched and its message goes up whole.
    assert!(!closing(&p, small));
    p.upstream_out(up);
    p.send_client(small, &body);
    let sent = p.upstream_out(up);
    let bodies = body_octets(&sent);
    assert_eq!(bodies, 200_000);
    // (Only the small message: none of the hog's went upstream.)
    for c in [hog, small] {
        p.shard.client_gone(c, p.now);
    }
    assert_eq!(p.shard.buffer_bytes(), 0);
}

fn closing(p: &Pair, c: ClientId) -> bool {
    frames(p.shard.output(ConnRef::Client(c)))
        .iter()
        .any(|f| mid(f) == Some(method::CONNECTION_CLOSE))
}

#[test]
fn a_client_closed_while_waiting_for_the_upstream_gets_no_open_ok() {
    let mut p = Pair::new(Settings::default());
    let c = p.client("guest", "guest", &["authentication_failure_close"], 131072);
    let up = p.connects()[0];
    // It misbehaves while waiting: closed with an error.
    p.send_client(c, &method_frame(1, method::CHANNEL_OPEN, &[0]));
    assert_eq!(mid(&p.client_out(c)[0]), Some(method::CONNECTION_CLOSE));
    p.broker_accepts(up, "guest", "guest");
    assert!(p.client_out(c).is_empty(), "no OpenOk after the Close");
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A frame that is well-formed often enough to get past the reader:
/// plausible types, channels and method ids, random arguments.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let channel = [0u16, 1, 2, 3, 2047, 2048, 65535][rng.below(7) as usize];
    let frame_type = [1u8, 1, 1, 2, 3, 8, 4][rng.below(7) as usize];
    let mut payload = Vec::new();
    if frame_type == 1 {
        let ids: [method::Id; 14] = [
            (10, 50),
            (10, 51),
            (10, 70),
            (20, 10),
            (20, 20),
            (20, 40),
            (20, 41),
            (60, 10),
            (60, 40),
            (60, 70),
            (60, 80),
            (85, 10),
            (90, 10),
            (50, 10),
        ];
        let id = ids[rng.below(ids.len() as u64) as usize];
        payload.extend_from_slice(&id.0.to_be_bytes());
        payload.extend_from_slice(&id.1.to_be_bytes());
    } else if frame_type == 2 {
        payload.extend_from_slice(&[0, 60, 0, 0]);
        payload.extend_from_slice(&rng.below(3000).to_be_bytes());
    }
    for _ in 0..rng.below(40) {
        payload.push(rng.next() as u8);
    }
    put_frame(&mut out, frame_type, channel, &payload);
    if rng.below(50) == 0 {
        let last = out.len() - 1;
        out[last] = rng.next() as u8;
    }
    out
}

#[test]
fn random_input_from_clients_and_the_broker_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..300 {
        let mut p = Pair::new(Settings::default());
        let (c, up) = p.connected_client();
        let other = p.client("guest", "guest", &[], 131072);
        p.client_out(other);
        p.open_channel(other, up, 1);
        for step in 0..60 {
            let mut bytes = random_frame(&mut rng);
            if rng.below(10) == 0 {
                // Raw garbage now and then.
                bytes = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            }
            let cut = rng.below(bytes.len() as u64 + 1) as usize;
            if round % 2 == 0 {
                p.send_client(c, &bytes[..cut]);
                p.send_client(c, &bytes[cut..]);
            } else if step % 3 == 0 {
                p.send_upstream(up, &bytes);
            } else {
                p.send_client(c, &bytes);
            }
            p.advance(Duration::from_millis(rng.below(500)));
            p.out(ConnRef::Client(c));
            p.out(ConnRef::Client(other));
            p.out(ConnRef::Upstream(up));
            for a in p.actions() {
                if let Action::CloseAfterFlush(conn) = a {
                    p.shard.release(conn);
                }
            }
        }
        if round % 2 == 0 {
            // Whatever the hostile client did, the other client's channel
            // still works on the shared upstream connection.
            p.send_client(other, &publish(1, b"q", b"canary"));
            let sent = p.upstream_out(up);
            assert!(
                sent.iter().any(|f| f.2 == b"canary"),
                "round {round}: {sent:?}"
            );
        }
    }
}

#[test]
fn channel_open_above_the_negotiated_channel_max_is_530_and_never_forwarded() {
    let mut p = Pair::new(Settings::default());
    let id = p.raw_client(
        b"PLAIN",
        b"\0guest\0guest",
        Tune {
            channel_max: 10,
            frame_max: 0,
            heartbeat: 0,
        },
    );
    let up = p.connects()[0];
    p.broker_accepts(up, "guest", "guest");
    p.client_out(id);
    p.open_channel(id, up, 10);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 11);
    p.send_client(id, &open);
    let got = p.client_out(id);
    assert_eq!(close_of(&got[0]).0, 530);
    let sent = p.upstream_out(up);
    assert!(
        sent.iter()
            .all(|f| f.1 != 11 && mid(f) != Some(method::CHANNEL_OPEN)),
        "{sent:?}"
    );
}

fn queue_method(channel: u16, id: method::Id, queue: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut args = vec![0, 0, queue.len() as u8];
    args.extend_from_slice(queue);
    args.extend_from_slice(tail);
    method_frame(channel, id, &args)
}

fn declare_ok(channel: u16, queue: &[u8]) -> Vec<u8> {
    let mut args = vec![queue.len() as u8];
    args.extend_from_slice(queue);
    args.extend_from_slice(&[0; 8]);
    method_frame(channel, method::QUEUE_DECLARE_OK, &args)
}

/// Queue.Declare tail: flags octet then an empty arguments table.
const EXCLUSIVE: &[u8] = &[0b0000_0100, 0, 0, 0, 0];
const PASSIVE: &[u8] = &[0b0000_0001, 0, 0, 0, 0];

#[test]
fn exclusive_queues_are_locked_to_their_owner_and_deleted_when_it_leaves() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    let na = p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    p.open_channel(b, up, 1);
    // A declares a named and a server-named exclusive queue.
    p.send_client(a, &queue_method(1, method::QUEUE_DECLARE, b"qx", EXCLUSIVE));
    p.send_upstream(up, &declare_ok(na, b"qx"));
    p.send_client(a, &queue_method(1, method::QUEUE_DECLARE, b"", EXCLUSIVE));
    p.send_upstream(up, &declare_ok(na, b"amq.gen-1"));
    p.upstream_out(up);
    p.client_out(a);
    // B may publish to it...
    p.send_client(b, &publish(1, b"qx", b"allowed"));
    assert_eq!(p.upstream_out(up).len(), 3);
    // ...but not declare it passively, nor get from the server-named one.
    for (queue, id, tail) in [
        (&b"qx"[..], method::QUEUE_DECLARE, PASSIVE),
        (b"amq.gen-1", method::BASIC_GET, &[0][..]),
        (b"qx", method::QUEUE_PURGE, &[0][..]),
    ] {
        p.send_client(b, &queue_method(1, id, queue, tail));
        let got = p.client_out(b);
        let (code, text) = close_of(&got[0]);
        assert_eq!((code, got[0].1), (405, 1), "{text}");
        assert!(text.starts_with("RESOURCE_LOCKED"), "{text}");
        let sent = p.upstream_out(up);
        assert!(
            sent.iter().all(|f| mid(f) == Some(method::CHANNEL_CLOSE)),
            "only B's channel close goes upstream: {sent:?}"
        );
        let mut ok = Vec::new();
        m::put_close_ok(&mut ok, 1);
        p.send_client(b, &ok);
        let mut ok = Vec::new();
        m::put_close_ok(&mut ok, sent[0].1);
        p.send_upstream(up, &ok);
        p.open_channel(b, up, 1);
    }
    // A leaves: both queues are deleted upstream on a proxy channel.
    p.shard.client_gone(a, p.now);
    let sent = p.upstream_out(up);
    let deletes: Vec<Vec<u8>> = sent
        .iter()
        .filter(|f| mid(f) == Some(method::QUEUE_DELETE))
        .map(|f| f.2[7..7 + f.2[6] as usize].to_vec())
        .collect();
    assert_eq!(deletes, vec![b"amq.gen-1".to_vec(), b"qx".to_vec()]);
    // And B may now use the name.
    p.send_client(b, &queue_method(1, method::QUEUE_DECLARE, b"qx", EXCLUSIVE));
    assert!(p.client_out(b).is_empty());
    assert_eq!(mid(&p.upstream_out(up)[0]), Some(method::QUEUE_DECLARE));
}

/// A connected client that declared the exclusive queues `queues` on its
/// channel 1; both sides' output drained.
fn exclusive_owner(p: &mut Pair, queues: &[&[u8]]) -> (ClientId, UpstreamId) {
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    for q in queues {
        p.send_client(a, &queue_method(1, method::QUEUE_DECLARE, q, EXCLUSIVE));
        p.send_upstream(up, &declare_ok(n, q));
    }
    p.upstream_out(up);
    p.client_out(a);
    (a, up)
}

#[test]
fn a_failed_upstream_writes_no_exclusive_queue_deletes() {
    // Found by the session fuzzer: the clients of a failing upstream were
    // closed after its channel table was cleared but while it still looked
    // Open, so the exclusive-queue release opened a channel number the
    // broker still held. The broker drops the queues with the connection.
    let mut p = Pair::new(Settings::default());
    let (a, up) = exclusive_owner(&mut p, &[b"qx"]);
    let mut close = Vec::new();
    m::put_close(&mut close, 0, 320, b"CONNECTION_FORCED - test", (0, 0));
    p.send_upstream(up, &close);
    assert_eq!(close_of(&p.client_out(a)[0]).0, 320);
    let sent = p.upstream_out(up);
    assert!(
        sent.iter().all(|f| f.1 == 0),
        "only connection-level frames go to a closing broker: {sent:?}"
    );
}

fn close_connection(p: &mut Pair, c: ClientId) {
    let mut close = Vec::new();
    m::put_close(&mut close, 0, 200, b"bye", (0, 0));
    p.send_client(c, &close);
}

fn closes_socket(actions: &[Action], c: ClientId) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::CloseAfterFlush(ConnRef::Client(x)) if *x == c))
}

#[test]
fn after_close_ok_the_client_closes_the_socket_or_the_deadline_does() {
    // As RabbitMQ: the peer that sent Close closes the socket once it has
    // CloseOk. Closing it first made amqp091-go report EOF after a clean
    // Close().
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    p.actions();
    close_connection(&mut p, a);
    let got = p.client_out(a);
    assert_eq!(mid(&got[0]), Some(method::CONNECTION_CLOSE_OK));
    assert!(
        !closes_socket(&p.actions(), a),
        "the socket stays open for the client to close"
    );
    // Anything more it sends is ignored.
    p.send_client(a, &publish(1, b"q", b"late"));
    assert!(p.client_out(a).is_empty());
    // The client closes: gone.
    p.shard.client_gone(a, p.now);
    assert_eq!(p.shard.counts().clients, 0);

    // One that never closes is closed at the deadline.
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    close_connection(&mut p, b);
    assert_eq!(mid(&p.client_out(b)[0]), Some(method::CONNECTION_CLOSE_OK));
    p.advance(CLOSE_TIMEOUT / 2);
    assert!(!closes_socket(&p.actions(), b));
    p.advance(CLOSE_TIMEOUT);
    assert!(closes_socket(&p.actions(), b));
}

/// A new client that declares the exclusive queue `queue` on `up` and
/// sends Connection.Close; asserts it has no CloseOk yet.
fn closing_owner_of(p: &mut Pair, up: UpstreamId, queue: &[u8]) -> ClientId {
    let c = p.client("guest", "guest", &[], 131072);
    p.client_out(c);
    p.upstream_out(up);
    let n = p.open_channel(c, up, 1);
    p.send_client(c, &queue_method(1, method::QUEUE_DECLARE, queue, EXCLUSIVE));
    p.send_upstream(up, &declare_ok(n, queue));
    p.client_out(c);
    close_connection(p, c);
    assert!(p.client_out(c).is_empty(), "no CloseOk before the delete");
    c
}

#[test]
fn close_ok_waits_until_the_broker_deleted_the_exclusive_queues() {
    // RabbitMQ deletes a connection's exclusive queues before its CloseOk,
    // so once Close() returns another client finds them gone (404).
    let mut p = Pair::new(Settings::default());
    let (a, up) = exclusive_owner(&mut p, &[b"qx", b"qy"]);
    close_connection(&mut p, a);
    assert!(
        p.client_out(a).is_empty(),
        "no CloseOk before the deletes are done"
    );
    let sent = p.upstream_out(up);
    let deleters: Vec<u16> = sent
        .iter()
        .filter(|f| mid(f) == Some(method::QUEUE_DELETE))
        .map(|f| f.1)
        .collect();
    assert_eq!(deleters.len(), 2);
    assert_eq!(deleters[0], deleters[1], "one channel deletes them all");
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, deleters[0]);
    p.send_upstream(up, &ok);
    assert_eq!(mid(&p.client_out(a)[0]), Some(method::CONNECTION_CLOSE_OK));

    // The broker never answers: CloseOk at the deadline all the same.
    let b = closing_owner_of(&mut p, up, b"qz");
    p.advance(CLOSE_TIMEOUT * 2);
    assert_eq!(mid(&p.client_out(b)[0]), Some(method::CONNECTION_CLOSE_OK));

    // The upstream connection fails meanwhile: the broker dropped the
    // queues with it, CloseOk at once.
    let c = closing_owner_of(&mut p, up, b"qw");
    let mut close = Vec::new();
    m::put_close(&mut close, 0, 320, b"CONNECTION_FORCED - test", (0, 0));
    p.send_upstream(up, &close);
    assert_eq!(mid(&p.client_out(c)[0]), Some(method::CONNECTION_CLOSE_OK));
}

#[test]
fn more_exclusive_queues_than_channel_numbers_are_all_deleted() {
    // One channel per upstream connection carries all the deletes; one
    // channel per queue ran out of numbers (the audit left 954 of 3,000
    // queues on the broker, usable by the pool's other clients).
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    const NOWAIT_EXCLUSIVE: &[u8] = &[0b0001_0100, 0, 0, 0, 0];
    for i in 0..3000 {
        let name = format!("x-{i}");
        p.send_client(
            a,
            &queue_method(1, method::QUEUE_DECLARE, name.as_bytes(), NOWAIT_EXCLUSIVE),
        );
    }
    p.upstream_out(up);
    p.shard.client_gone(a, p.now);
    let sent = p.upstream_out(up);
    let deletes: Vec<u16> = sent
        .iter()
        .filter(|f| mid(f) == Some(method::QUEUE_DELETE))
        .map(|f| f.1)
        .collect();
    assert_eq!(deletes.len(), 3000);
    assert!(deletes.iter().all(|n| *n == deletes[0]));
}

#[test]
fn an_owner_deleting_its_exclusive_queue_frees_the_name() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    let na = p.open_channel(a, up, 1);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    p.open_channel(b, up, 1);
    p.send_client(a, &queue_method(1, method::QUEUE_DECLARE, b"qy", EXCLUSIVE));
    p.send_upstream(up, &declare_ok(na, b"qy"));
    p.send_client(a, &queue_method(1, method::QUEUE_DELETE, b"qy", &[0]));
    p.upstream_out(up);
    p.send_client(b, &queue_method(1, method::QUEUE_DECLARE, b"qy", PASSIVE));
    assert!(p.client_out(b).is_empty());
    p.shard.client_gone(a, p.now);
    let sent = p.upstream_out(up);
    assert!(
        sent.iter().all(|f| mid(f) != Some(method::QUEUE_DELETE)),
        "{sent:?}"
    );
}

fn consume(channel: u16, queue: &[u8], tag: &[u8]) -> Vec<u8> {
    let mut tail = vec![tag.len() as u8];
    tail.extend_from_slice(tag);
    tail.extend_from_slice(&[0, 0, 0, 0, 0]);
    queue_method(channel, method::BASIC_CONSUME, queue, &tail)
}

fn tagged(channel: u16, id: method::Id, tag: &[u8]) -> Vec<u8> {
    let mut args = vec![tag.len() as u8];
    args.extend_from_slice(tag);
    if id == method::BASIC_CANCEL {
        args.push(0);
    }
    method_frame(channel, id, &args)
}

#[test]
fn reusing_an_active_consumer_tag_is_530_from_the_proxy() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    p.send_client(c, &consume(1, b"q", b"t1"));
    p.send_client(c, &consume(1, b"q", b""));
    p.send_upstream(up, &tagged(n, method::BASIC_CONSUME_OK, b"t1"));
    p.send_upstream(up, &tagged(n, method::BASIC_CONSUME_OK, b"amq.ctag-1"));
    assert_eq!(p.upstream_out(up).len(), 2);
    p.client_out(c);
    // Cancelled tags may be reused; the broker's cancel frees one too.
    p.send_client(c, &tagged(1, method::BASIC_CANCEL, b"t1"));
    p.send_upstream(up, &tagged(n, method::BASIC_CANCEL, b"amq.ctag-1"));
    p.send_client(c, &consume(1, b"q", b"t1"));
    p.send_client(c, &consume(1, b"q", b"amq.ctag-1"));
    assert!(p
        .client_out(c)
        .iter()
        .all(|f| mid(f) != Some(method::CONNECTION_CLOSE)));
    assert_eq!(p.upstream_out(up).len(), 3);
    // A tag still active is refused by the proxy, not forwarded.
    p.send_client(c, &consume(1, b"q", b"t1"));
    let got = p.client_out(c);
    let close = got
        .iter()
        .find(|f| mid(f) == Some(method::CONNECTION_CLOSE))
        .unwrap();
    assert_eq!(close_of(close).0, 530);
    assert!(p
        .upstream_out(up)
        .iter()
        .all(|f| mid(f) != Some(method::BASIC_CONSUME)));
}

#[test]
fn a_client_opening_a_channel_on_a_blocked_upstream_is_told() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    p.send_upstream(
        up,
        &method_frame(0, method::CONNECTION_BLOCKED, &[3, b'm', b'e', b'm']),
    );
    p.client_out(a);
    let b = p.client("guest", "guest", &["connection.blocked"], 131072);
    p.client_out(b);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 1);
    p.send_client(b, &open);
    let n = p.upstream_out(up)[0].1;
    let mut ok = Vec::new();
    m::put_channel_open_ok(&mut ok, n);
    p.send_upstream(up, &ok);
    let got = p.client_out(b);
    assert_eq!(mid(&got[1]), Some(method::CONNECTION_BLOCKED));
    p.send_upstream(up, &method_frame(0, method::CONNECTION_UNBLOCKED, &[]));
    assert_eq!(mid(&p.client_out(b)[0]), Some(method::CONNECTION_UNBLOCKED));
}

fn close_channel(p: &mut Pair, c: ClientId, ch: u16) {
    let mut close = Vec::new();
    m::put_close(&mut close, ch, 200, b"bye", (0, 0));
    p.send_client(c, &close);
}

fn qos_ok(n: u16) -> Vec<u8> {
    method_frame(n, method::BASIC_QOS_OK, &[])
}

#[test]
fn a_safe_channel_is_fenced_then_reused_without_a_round_trip() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    p.send_client(a, &publish(1, b"q", b"one"));
    p.upstream_out(up);
    close_channel(&mut p, a, 1);
    let got = p.client_out(a);
    assert_eq!(
        (mid(&got[0]), got[0].1),
        (Some(method::CHANNEL_CLOSE_OK), 1),
        "CloseOk at once"
    );
    let sent = p.upstream_out(up);
    assert_eq!(
        (mid(&sent[0]), sent[0].1),
        (Some(method::BASIC_QOS), n),
        "fence, not close"
    );
    assert_eq!(sent.len(), 1);
    // Before the fence completes the channel is not handed out.
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 2);
    p.send_client(a, &open);
    let fresh = p.upstream_out(up);
    assert_eq!(mid(&fresh[0]), Some(method::CHANNEL_OPEN));
    assert_ne!(fresh[0].1, n);
    p.send_upstream(up, &qos_ok(n));
    // Now a new client's Channel.Open is answered locally with channel n.
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 7);
    p.send_client(b, &open);
    let got = p.client_out(b);
    assert_eq!((mid(&got[0]), got[0].1), (Some(method::CHANNEL_OPEN_OK), 7));
    assert!(p.upstream_out(up).is_empty(), "no upstream round trip");
    p.send_client(b, &publish(7, b"q", b"two"));
    let sent = p.upstream_out(up);
    assert!(sent.iter().all(|f| f.1 == n));
    assert_eq!(p.shard.stats().reuse_hits, 1);
}

#[test]
fn unsafe_channels_are_closed_not_reused() {
    let unsafe_methods: Vec<(&str, Vec<u8>)> = vec![
        (
            "confirm.select",
            method_frame(1, method::CONFIRM_SELECT, &[0]),
        ),
        ("tx.select", method_frame(1, method::TX_SELECT, &[])),
        ("basic.consume", consume(1, b"q", b"t")),
        (
            "basic.qos",
            method_frame(1, method::BASIC_QOS, &[0, 0, 0, 0, 0, 1, 0]),
        ),
        (
            "basic.get with ack",
            queue_method(1, method::BASIC_GET, b"q", &[0]),
        ),
        ("channel.flow", method_frame(1, method::CHANNEL_FLOW, &[1])),
        (
            "basic.recover",
            method_frame(1, method::BASIC_RECOVER, &[1]),
        ),
    ];
    for (what, bytes) in unsafe_methods {
        let mut p = Pair::new(Settings::default());
        let (a, up) = p.connected_client();
        let n = p.open_channel(a, up, 1);
        p.send_client(a, &bytes);
        p.upstream_out(up);
        close_channel(&mut p, a, 1);
        let sent = p.upstream_out(up);
        assert_eq!(
            (mid(&sent[0]), sent[0].1),
            (Some(method::CHANNEL_CLOSE), n),
            "{what}"
        );
        assert!(
            p.client_out(a).is_empty(),
            "{what}: CloseOk comes from the broker"
        );
    }
    // Basic.Get with no_ack is safe.
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    p.open_channel(a, up, 1);
    p.send_client(a, &queue_method(1, method::BASIC_GET, b"q", &[1]));
    p.upstream_out(up);
    close_channel(&mut p, a, 1);
    assert_eq!(mid(&p.upstream_out(up)[0]), Some(method::BASIC_QOS));
}

#[test]
fn poison_arriving_before_the_fence_is_consumed_and_a_close_discards_the_channel() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    close_channel(&mut p, a, 1);
    p.upstream_out(up);
    p.client_out(a);
    // A late Basic.Return and GetOk (with content) arrive before QosOk.
    let mut late = method_frame(n, method::BASIC_RETURN, &[1, 56, 0, 0, 1, b'q']);
    late.extend(method_frame(
        n,
        method::BASIC_GET_OK,
        &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, b'q', 0, 0, 0, 0],
    ));
    let header = basic_header(4u64);
    put_frame(&mut late, FRAME_HEADER, n, &header);
    put_frame(&mut late, FRAME_BODY, n, b"late");
    p.send_upstream(up, &late);
    assert!(p.client_out(a).is_empty(), "late frames reach nobody");
    p.send_upstream(up, &qos_ok(n));
    // The next client gets the clean channel and sees none of it.
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 1);
    p.send_client(b, &open);
    assert_eq!(p.client_out(b).len(), 1);
    close_channel(&mut p, b, 1);
    p.upstream_out(up);
    // This time the broker closes the channel during the fence (404 from
    // an asynchronous publish error): it is discarded, not reused.
    let mut close = Vec::new();
    m::put_close(
        &mut close,
        n,
        404,
        b"NOT_FOUND - no exchange 'nope'",
        (60, 40),
    );
    p.send_upstream(up, &close);
    let sent = p.upstream_out(up);
    assert_eq!(
        (mid(&sent[0]), sent[0].1),
        (Some(method::CHANNEL_CLOSE_OK), n)
    );
    assert!(p
        .client_out(b)
        .iter()
        .all(|f| mid(f) != Some(method::CHANNEL_CLOSE)));
    assert_eq!(p.shard.stats().reuse_discarded, 1);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 2);
    p.send_client(b, &open);
    let sent = p.upstream_out(up);
    assert_eq!(
        mid(&sent[0]),
        Some(method::CHANNEL_OPEN),
        "a fresh channel, not the poisoned one"
    );
}

#[test]
fn a_disconnecting_client_returns_safe_channels_and_idle_ones_expire() {
    let settings = Settings {
        idle_channel_timeout: Duration::from_secs(2),
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let (a, up) = p.connected_client();
    let n1 = p.open_channel(a, up, 1);
    let n2 = p.open_channel(a, up, 2);
    p.send_client(a, &method_frame(2, method::CONFIRM_SELECT, &[0]));
    p.upstream_out(up);
    p.shard.client_gone(a, p.now);
    let sent = p.upstream_out(up);
    assert!(sent
        .iter()
        .any(|f| mid(f) == Some(method::BASIC_QOS) && f.1 == n1));
    assert!(sent
        .iter()
        .any(|f| mid(f) == Some(method::CHANNEL_CLOSE) && f.1 == n2));
    p.send_upstream(up, &qos_ok(n1));
    p.advance(Duration::from_millis(1900));
    assert!(p
        .upstream_out(up)
        .iter()
        .all(|f| mid(f) != Some(method::CHANNEL_CLOSE)));
    p.advance(Duration::from_millis(200));
    let sent = p.upstream_out(up);
    assert!(
        sent.iter()
            .any(|f| mid(f) == Some(method::CHANNEL_CLOSE) && f.1 == n1),
        "expired: {sent:?}"
    );
}

#[test]
fn idle_channels_do_not_keep_an_upstream_connection_open() {
    let settings = Settings {
        idle_connection_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    p.shard.client_gone(a, p.now);
    p.upstream_out(up);
    p.send_upstream(up, &qos_ok(n));
    p.advance(Duration::from_millis(1100));
    let sent = p.upstream_out(up);
    assert!(
        sent.iter()
            .any(|f| mid(f) == Some(method::CONNECTION_CLOSE)),
        "{sent:?}"
    );
}

#[test]
fn max_idle_channels_bounds_the_idle_list() {
    let settings = Settings {
        max_idle_channels: 1,
        ..Settings::default()
    };
    let mut p = Pair::new(settings);
    let (a, up) = p.connected_client();
    let n1 = p.open_channel(a, up, 1);
    let n2 = p.open_channel(a, up, 2);
    p.shard.client_gone(a, p.now);
    p.upstream_out(up);
    p.send_upstream(up, &qos_ok(n1));
    p.send_upstream(up, &qos_ok(n2));
    let sent = p.upstream_out(up);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (mid(&sent[0]), sent[0].1),
        (Some(method::CHANNEL_CLOSE), n2)
    );
}

#[test]
fn with_reuse_off_channels_are_closed_upstream() {
    let mut p = Pair::new(NO_REUSE());
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    close_channel(&mut p, a, 1);
    let sent = p.upstream_out(up);
    assert_eq!((mid(&sent[0]), sent[0].1), (Some(method::CHANNEL_CLOSE), n));
    assert_eq!(
        (p.shard.stats().reuse_hits, p.shard.stats().reuse_misses),
        (0, 0)
    );
}

#[test]
fn commands_during_an_outstanding_tx_commit_are_504_from_the_proxy() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    p.send_client(c, &method_frame(1, method::TX_SELECT, &[]));
    p.send_upstream(up, &method_frame(n, (90, 11), &[]));
    p.send_client(c, &method_frame(1, method::TX_COMMIT, &[]));
    p.send_upstream(up, &method_frame(n, method::TX_COMMIT_OK, &[]));
    p.client_out(c);
    p.upstream_out(up);
    // After CommitOk all is well...
    p.send_client(c, &publish(1, b"q", b"in the next transaction"));
    assert!(p.client_out(c).is_empty());
    assert_eq!(p.upstream_out(up).len(), 3);
    // ...but during the next commit, a publish is not.
    p.send_client(c, &method_frame(1, method::TX_COMMIT, &[]));
    p.send_client(c, &publish(1, b"q", b"too early"));
    let got = p.client_out(c);
    assert_eq!(close_of(&got[0]).0, 504);
    let sent = p.upstream_out(up);
    assert!(
        sent.iter().all(|f| mid(f) != Some(method::BASIC_PUBLISH)),
        "{sent:?}"
    );
}

#[test]
fn an_empty_queue_name_on_a_reused_channel_never_reaches_the_previous_clients_queue() {
    let mut p = Pair::new(Settings::default());
    let (a, up) = p.connected_client();
    let n = p.open_channel(a, up, 1);
    p.send_client(
        a,
        &queue_method(1, method::QUEUE_DECLARE, b"", &[0, 0, 0, 0, 0]),
    );
    p.send_upstream(up, &declare_ok(n, b"amq.gen-a"));
    close_channel(&mut p, a, 1);
    p.send_upstream(up, &qos_ok(n));
    p.upstream_out(up);
    let b = p.client("guest", "guest", &[], 131072);
    p.client_out(b);
    let mut open = Vec::new();
    m::put_channel_open(&mut open, 1);
    p.send_client(b, &open);
    p.client_out(b);
    p.send_client(b, &queue_method(1, method::BASIC_GET, b"", &[1]));
    let got = p.client_out(b);
    let (code, text) = close_of(&got[0]);
    assert_eq!((code, got[0].1), (404, 1), "{text}");
    assert!(p
        .upstream_out(up)
        .iter()
        .all(|f| mid(f) != Some(method::BASIC_GET)));
}

#[test]
fn direct_reply_to_consumer_tags_are_not_tracked() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    let n = p.open_channel(c, up, 1);
    p.send_client(c, &consume(1, b"amq.rabbitmq.reply-to", b"t"));
    p.send_upstream(up, &tagged(n, method::BASIC_CONSUME_OK, b"t"));
    p.send_client(c, &consume(1, b"q", b"t"));
    assert!(p
        .client_out(c)
        .iter()
        .all(|f| mid(f) != Some(method::CONNECTION_CLOSE)));
    assert_eq!(p.upstream_out(up).len(), 2);
}

#[test]
fn content_header_with_weight_is_505() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    p.open_channel(c, up, 1);
    let mut bytes = publish(1, b"q", b"x");
    // The method frame is 7 + 10 + 1 bytes; the header payload starts 7
    // bytes after it: class (2), then weight (2).
    let header_payload = 18 + 7;
    assert_eq!(&bytes[header_payload..header_payload + 4], &[0, 60, 0, 0]);
    bytes[header_payload + 3] = 1; // weight = 1
    p.send_client(c, &bytes);
    assert_eq!(close_of(&p.client_out(c)[0]).0, 505);
    assert!(p
        .upstream_out(up)
        .iter()
        .all(|f| mid(f) != Some(method::BASIC_PUBLISH)));
}

#[test]
fn a_pipelined_second_channel_close_gets_its_own_close_ok() {
    for settings in [Settings::default(), NO_REUSE()] {
        let reuse = settings.channel_reuse;
        let mut p = Pair::new(settings);
        let (c, up) = p.connected_client();
        let n = p.open_channel(c, up, 2);
        let mut twice = Vec::new();
        m::put_close(&mut twice, 2, 200, b"", (0, 0));
        m::put_close(&mut twice, 2, 200, b"", (0, 0));
        p.send_client(c, &twice);
        if !reuse {
            let mut ok = Vec::new();
            m::put_close_ok(&mut ok, n);
            p.send_upstream(up, &ok);
        }
        let got = p.client_out(c);
        let oks = got
            .iter()
            .filter(|f| mid(f) == Some(method::CHANNEL_CLOSE_OK) && f.1 == 2)
            .count();
        assert_eq!(oks, 2, "reuse={reuse}: {got:?}");
        assert!(got.iter().all(|f| mid(f) != Some(method::CONNECTION_CLOSE)));
    }
}

#[test]
fn shutdown_closes_clients_with_320_then_upstreams_after_their_publishes() {
    let mut p = Pair::new(Settings::default());
    let (c, up) = p.connected_client();
    p.open_channel(c, up, 1);
    p.send_client(c, &publish(1, b"q", b"accepted before shutdown"));
    p.shard
        .close_all_clients(320, "CONNECTION_FORCED - shutdown", p.now);
    let got = p.client_out(c);
    assert_eq!(
        close_of(&got[0]),
        (320, "CONNECTION_FORCED - shutdown".into())
    );
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, 0);
    p.send_client(c, &ok);
    for a in p.actions() {
        if let Action::CloseAfterFlush(conn) = a {
            p.shard.release(conn);
        }
    }
    assert_eq!(p.shard.counts().clients, 0);
    p.shard.close_all_upstreams(p.now);
    let sent = p.upstream_out(up);
    let publish_at = sent
        .iter()
        .position(|f| f.2 == b"accepted before shutdown")
        .expect("publish flushed");
    let close_at = sent
        .iter()
        .position(|f| mid(f) == Some(method::CONNECTION_CLOSE))
        .expect("upstream closed");
    assert!(publish_at < close_at);
    let mut ok = Vec::new();
    m::put_close_ok(&mut ok, 0);
    p.send_upstream(up, &ok);
    assert_eq!(
        p.actions(),
        vec![Action::CloseAfterFlush(ConnRef::Upstream(up))]
    );
}
