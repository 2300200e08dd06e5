//! Writes the committed seed corpora, `fuzz/seeds/<target>/`:
//!
//! ```sh
//! cd fuzz && cargo +nightly run --example make_seeds
//! ```
//!
//! The seeds are a handful of valid inputs per target (frames, method
//! payloads, field tables, session programs); libFuzzer grows its own
//! corpus from them in the ignored `fuzz/corpus/`.

use amqproxy::protocol::codec::{put_longstr, put_shortstr, put_u16, put_u32, put_u64};
use amqproxy::protocol::constants::{method, FRAME_BODY, FRAME_HEADER, FRAME_METHOD};
use amqproxy::protocol::frame::{put_frame, put_heartbeat};
use amqproxy::protocol::methods::{self as m, put_method};
use amqproxy::protocol::table::{string, FieldTable, FieldValue};
use amqproxy_fuzz::session::{event, Script};
use std::path::Path;

fn method_frame(ch: u16, id: method::Id, args: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    put_method(&mut out, ch, id, args);
    out
}

fn payload(id: method::Id, args: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    put_u16(&mut out, id.0);
    put_u16(&mut out, id.1);
    args(&mut out);
    out
}

fn table_arg(b: &mut Vec<u8>, t: &FieldTable) {
    t.write(b);
}

fn channel_open(ch: u16) -> Vec<u8> {
    let mut out = Vec::new();
    m::put_channel_open(&mut out, ch);
    out
}

fn channel_close(ch: u16) -> Vec<u8> {
    let mut out = Vec::new();
    m::put_close(&mut out, ch, 200, b"bye", (0, 0));
    out
}

fn channel_close_ok(ch: u16) -> Vec<u8> {
    method_frame(ch, method::CHANNEL_CLOSE_OK, |_| {})
}

fn header_payload(body_len: usize, props: bool) -> Vec<u8> {
    let mut h = vec![0, 60, 0, 0];
    h.extend_from_slice(&(body_len as u64).to_be_bytes());
    if props {
        // content-type, headers, delivery-mode
        h.extend_from_slice(&[0b1011_0000, 0]);
        put_shortstr(&mut h, b"text/plain");
        let mut t = FieldTable::default();
        t.insert("x-retry", FieldValue::I32(3));
        t.write(&mut h);
        h.push(2);
    } else {
        h.extend_from_slice(&[0, 0]);
    }
    h
}

fn publish(ch: u16, key: &[u8], body: &[u8], mandatory: bool, props: bool) -> Vec<u8> {
    let mut out = method_frame(ch, method::BASIC_PUBLISH, |b| {
        put_u16(b, 0);
        put_shortstr(b, b"");
        put_shortstr(b, key);
        b.push(mandatory as u8);
    });
    put_frame(
        &mut out,
        FRAME_HEADER,
        ch,
        &header_payload(body.len(), props),
    );
    if !body.is_empty() {
        put_frame(&mut out, FRAME_BODY, ch, body);
    }
    out
}

fn queue_declare(ch: u16, name: &[u8], args: &FieldTable) -> Vec<u8> {
    method_frame(ch, method::QUEUE_DECLARE, |b| {
        put_u16(b, 0);
        put_shortstr(b, name);
        b.push(0b0000_1000); // auto-delete
        table_arg(b, args);
    })
}

fn consume(ch: u16, queue: &[u8], tag: &[u8]) -> Vec<u8> {
    method_frame(ch, method::BASIC_CONSUME, |b| {
        put_u16(b, 0);
        put_shortstr(b, queue);
        put_shortstr(b, tag);
        b.push(0);
        table_arg(b, &FieldTable::default());
    })
}

fn ack(ch: u16, tag: u64) -> Vec<u8> {
    method_frame(ch, method::BASIC_ACK, |b| {
        put_u64(b, tag);
        b.push(0);
    })
}

fn sample_table() -> FieldTable {
    let mut caps = FieldTable::default();
    caps.insert("publisher_confirms", FieldValue::Bool(true));
    caps.insert("consumer_cancel_notify", FieldValue::Bool(true));
    let mut t = FieldTable::default();
    t.insert("product", string("pika"));
    t.insert("capabilities", FieldValue::Table(caps));
    t.insert(
        "a",
        FieldValue::Array(vec![
            FieldValue::I64(-5),
            FieldValue::Void,
            FieldValue::F64(1.5),
            FieldValue::U8(7),
        ]),
    );
    t.insert("ts", FieldValue::Timestamp(1_700_000_000));
    t.insert("d", FieldValue::Decimal(2, 314));
    t.insert("i", FieldValue::I32(-1));
    t.insert("u", FieldValue::U32(1));
    t.insert("s", FieldValue::I16(-2));
    t.insert("f", FieldValue::F32(0.25));
    t.insert("x", FieldValue::Bytes(vec![0, 1, 2]));
    t.insert("b", FieldValue::I8(-3));
    t
}

fn body(t: &FieldTable) -> Vec<u8> {
    let mut out = Vec::new();
    t.write_body(&mut out);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for t in ["frame", "method", "table", "session"] {
        let dir = root.join(t);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
    }

    // ---- frame: selector octet, then a frame stream ---------------------
    let dir = root.join("frame");
    let mut hb = vec![0];
    put_heartbeat(&mut hb);
    write(&dir, "heartbeat", &hb);
    let mut start = vec![2];
    m::put_connection_start(
        &mut start,
        &FieldTable::default(),
        b"PLAIN AMQPLAIN",
        b"en_US",
    );
    put_heartbeat(&mut start);
    write(&dir, "start-then-heartbeat", &start);
    let mut p = vec![1];
    p.extend_from_slice(&channel_open(1));
    p.extend_from_slice(&publish(1, b"q", b"hello", false, true));
    write(&dir, "publish-4096", &p);
    let mut exact = vec![4];
    exact.extend_from_slice(&512u32.to_be_bytes());
    put_frame(&mut exact, FRAME_BODY, 1, &[7u8; 512 - 8]);
    write(&dir, "body-exactly-frame-max", &exact);
    let mut bad = vec![0];
    put_frame(&mut bad, FRAME_METHOD, 0, &[0, 10, 0, 51]);
    *bad.last_mut().unwrap() = 0xCD;
    write(&dir, "bad-frame-end", &bad);

    // ---- method: selector octet, then a method payload ------------------
    let dir = root.join("method");
    let props = sample_table();
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "start-ok",
            0,
            payload(method::CONNECTION_START_OK, |b| {
                table_arg(b, &props);
                put_shortstr(b, b"PLAIN");
                put_longstr(b, b"\0guest\0guest");
                put_shortstr(b, b"en_US");
            }),
        ),
        (
            "start",
            35,
            payload(method::CONNECTION_START, |b| {
                b.extend_from_slice(&[0, 9]);
                table_arg(b, &FieldTable::default());
                put_longstr(b, b"PLAIN AMQPLAIN");
                put_longstr(b, b"en_US");
            }),
        ),
        (
            "tune-ok",
            2,
            payload(method::CONNECTION_TUNE_OK, |b| {
                put_u16(b, 2047);
                put_u32(b, 131072);
                put_u16(b, 60);
            }),
        ),
        (
            "open",
            3,
            payload(method::CONNECTION_OPEN, |b| {
                put_shortstr(b, b"/");
                put_shortstr(b, b"");
                b.push(0);
            }),
        ),
        (
            "close",
            4,
            payload(method::CONNECTION_CLOSE, |b| {
                put_u16(b, 320);
                put_shortstr(b, b"CONNECTION_FORCED");
                put_u16(b, 0);
                put_u16(b, 0);
            }),
        ),
        (
            "publish",
            24,
            payload(method::BASIC_PUBLISH, |b| {
                put_u16(b, 0);
                put_shortstr(b, b"amq.direct");
                put_shortstr(b, b"key");
                b.push(1);
            }),
        ),
        (
            "qos",
            21,
            payload(method::BASIC_QOS, |b| {
                put_u32(b, 0);
                put_u16(b, 10);
                b.push(0);
            }),
        ),
        (
            "queue-declare-args",
            16,
            payload(method::QUEUE_DECLARE, |b| {
                put_u16(b, 0);
                put_shortstr(b, b"");
                b.push(0b0000_1010);
                let mut t = FieldTable::default();
                t.insert("x-queue-type", string("quorum"));
                t.insert("x-max-age", string("1D"));
                t.write(b);
            }),
        ),
        (
            "exchange-declare",
            12,
            payload(method::EXCHANGE_DECLARE, |b| {
                put_u16(b, 0);
                put_shortstr(b, b"x");
                put_shortstr(b, b"x-delayed-message");
                b.push(0);
                let mut t = FieldTable::default();
                t.insert("x-delayed-type", string("direct"));
                t.write(b);
            }),
        ),
        (
            "get",
            25,
            payload(method::BASIC_GET, |b| {
                put_u16(b, 0);
                put_shortstr(b, b"q");
                b.push(1);
            }),
        ),
        ("content-header", 0, header_payload(5, true)),
        (
            "blocked",
            37,
            payload(method::CONNECTION_BLOCKED, |b| {
                put_shortstr(b, b"low on memory")
            }),
        ),
        ("flow", 8, payload(method::CHANNEL_FLOW, |b| b.push(1))),
    ];
    for (name, sel, p) in seeds {
        let mut bytes = vec![sel];
        bytes.extend_from_slice(&p);
        write(&dir, name, &bytes);
    }

    // ---- table: a table body ---------------------------------------------
    let dir = root.join("table");
    write(&dir, "all-types", &body(&sample_table()));
    let mut amqplain = FieldTable::default();
    amqplain.insert("LOGIN", string("guest"));
    amqplain.insert("PASSWORD", string("guest"));
    write(&dir, "amqplain", &body(&amqplain));
    let mut nested = FieldTable::default();
    for _ in 0..4 {
        let mut outer = FieldTable::default();
        outer.insert("n", FieldValue::Table(nested));
        outer.insert("L", FieldValue::Array(vec![FieldValue::Bool(false)]));
        nested = outer;
    }
    write(&dir, "nested", &body(&nested));
    write(&dir, "empty", &[]);

    // ---- session: driver programs ----------------------------------------
    let dir = root.join("session");

    // Open a channel, publish, close it.
    let mut s = Script::new(0b0000_0011, 0);
    s.client(0, &channel_open(1))
        .pump()
        .read(0, 0)
        .client(0, &publish(1, b"q", b"hello", false, false))
        .pump()
        .client(0, &channel_close(1))
        .pump()
        .read(0, 0);
    write(&dir, "publish", &s.0);

    // Consumer with confirms: declare, consume, publish (delivered back),
    // ack, cancel.
    let mut s = Script::new(0b0000_0010, 0);
    let mut bytes = channel_open(1);
    bytes.extend_from_slice(&method_frame(1, method::CONFIRM_SELECT, |b| b.push(0)));
    bytes.extend_from_slice(&queue_declare(1, b"", &FieldTable::default()));
    bytes.extend_from_slice(&consume(1, b"", b""));
    s.client(0, &bytes).pump().read(0, 0);
    s.client(0, &publish(1, b"", b"hi", true, true))
        .pump()
        .read(0, 0);
    s.client(0, &ack(1, 1))
        .client(
            0,
            &method_frame(1, method::BASIC_CANCEL, |b| {
                put_shortstr(b, b"amq.ctag-2");
                b.push(0);
            }),
        )
        .pump()
        .read(0, 0)
        .event(event::DELIVER, 0, 0, 3)
        .read(0, 0);
    write(&dir, "consume-confirm", &s.0);

    // Channel reuse: a clean channel is closed, fenced, reused.
    let mut s = Script::new(0b0000_0001, 0);
    let mut bytes = channel_open(1);
    bytes.extend_from_slice(&queue_declare(1, b"jobs", &FieldTable::default()));
    s.client(0, &bytes).pump().read(0, 0);
    s.client(0, &channel_close(1)).pump().read(0, 0);
    s.client(0, &channel_open(2)).pump().read(0, 0);
    s.client(0, &publish(2, b"jobs", b"again", false, false))
        .pump()
        .client_gone(0)
        .pump()
        .new_client(0)
        .pump()
        .client(0, &channel_open(1))
        .pump()
        .read(0, 0)
        .tick(40, true, true)
        .pump();
    write(&dir, "reuse", &s.0);

    // Broker-side events: delivery, channel close, blocked, cancel,
    // connection close.
    let mut s = Script::new(0b0000_0010, 0);
    let mut bytes = channel_open(1);
    bytes.extend_from_slice(&channel_open(2));
    bytes.extend_from_slice(&consume(2, b"q", b"c1"));
    s.client(0, &bytes)
        .pump()
        .read(0, 0)
        .event(event::DELIVER, 0, 1, 50)
        .event(event::BIG_HEADER, 0, 1, 40)
        .event(event::SPLIT_DELIVER, 0, 1, 9)
        .event(event::BLOCKED, 0, 0, 0)
        .read(0, 0)
        .event(event::CHANNEL_CLOSE, 0, 0, 0)
        .read(0, 0)
        .client(0, &channel_close_ok(1))
        .pump()
        .event(event::CANCEL, 0, 0, 0)
        .event(event::UNBLOCKED, 0, 0, 0)
        .event(event::RETURN, 0, 0, 3)
        .read(0, 0)
        .event(event::CONNECTION_CLOSE, 0, 0, 0)
        .read(0, 0)
        .pump();
    write(&dir, "broker-events", &s.0);

    // A broker with frame_max 4096 under a client with 131072: bodies are
    // re-split upstream; a message fed one byte at a time.
    let mut s = Script::new(0b0000_1000, 0b01);
    s.client(0, &channel_open(1)).pump().read(0, 0);
    let big = vec![b'b'; 4500];
    s.client_chunked(0, &publish(1, b"q", &big, false, false), 2000)
        .client_chunked(0, &publish(1, b"q", b"tiny", false, true), 1)
        .pump()
        .read(0, 0);
    write(&dir, "frame-max", &s.0);

    // More clients: a wrong password, AMQPLAIN, another vhost, a failed
    // connect, timeouts, shutdown.
    let mut s = Script::new(0b0001_0010, 0);
    s.new_client(4)
        .connect_fails()
        .new_client(1)
        .new_client(2)
        .new_client(4)
        .pump()
        .read(1, 0)
        .read(2, 0)
        .client(2, &channel_open(1))
        .pump()
        .tick(30, false, false)
        .read(0, 0)
        .tick(60, true, false)
        .pump()
        .shutdown(3)
        .pump();
    write(&dir, "clients-and-timeouts", &s.0);

    // Transactions, QoS, flow, recover, get, and a few refusals.
    let mut s = Script::new(0b1010_0000, 0b100);
    let mut bytes = channel_open(1);
    bytes.extend_from_slice(&method_frame(1, method::TX_SELECT, |_| {}));
    bytes.extend_from_slice(&method_frame(1, method::BASIC_QOS, |b| {
        put_u32(b, 0);
        put_u16(b, 5);
        b.push(0);
    }));
    bytes.extend_from_slice(&method_frame(1, method::CHANNEL_FLOW, |b| b.push(1)));
    bytes.extend_from_slice(&method_frame(1, method::BASIC_GET, |b| {
        put_u16(b, 0);
        put_shortstr(b, b"q");
        b.push(0);
    }));
    s.client(0, &bytes).pump().read(0, 0);
    let mut bytes = publish(1, b"q", b"in tx", false, false);
    bytes.extend_from_slice(&method_frame(1, method::TX_COMMIT, |_| {}));
    s.client(0, &bytes).pump().read(0, 0);
    for ch in 2..=4 {
        s.client(0, &channel_open(ch));
    }
    s.pump().read(0, 0);
    s.client(0, &method_frame(2, method::BASIC_RECOVER, |b| b.push(0)))
        .read(0, 0)
        .client(0, &channel_open(5))
        .read(0, 0);
    write(&dir, "tx-qos-refusals", &s.0);

    // A second client whose handshake is in the input (frame_max 4096,
    // heartbeat 5 s), and a third with a bad protocol header.
    let mut s = Script::new(0b0000_0010, 0);
    let mut hs = b"AMQP\x00\x00\x09\x01".to_vec();
    let mut props = FieldTable::default();
    props.insert("product", string("raw"));
    m::put_connection_start_ok(&mut hs, &props, b"PLAIN", b"\0guest\0guest");
    m::put_tune(
        &mut hs,
        true,
        m::Tune {
            channel_max: 16,
            frame_max: 4096,
            heartbeat: 5,
        },
    );
    m::put_connection_open(&mut hs, b"/");
    s.new_client(8)
        .client_chunked(1, &hs, 40)
        .pump()
        .read(1, 0)
        .client(1, &channel_open(7))
        .pump()
        .read(1, 0)
        .new_client(8)
        .client(2, b"AMQP\x01\x01\x00\x0a")
        .read(2, 0)
        .tick(60, false, false);
    write(&dir, "raw-handshake", &s.0);

    // The proxy's Connection.Close (shutdown) crosses the broker's.
    let mut s = Script::new(0b0000_0000, 0);
    s.client(0, &channel_open(1))
        .pump()
        .shutdown(2)
        .event(event::CONNECTION_CLOSE, 0, 0, 0)
        .read(0, 0)
        .pump();
    write(&dir, "crossing-close", &s.0);

    // A client that goes away mid-publish, with a raw broker heartbeat.
    let mut s = Script::new(0b0000_0000, 0);
    let p = publish(1, b"q", &[9u8; 300], false, false);
    let mut hb = Vec::new();
    put_heartbeat(&mut hb);
    s.client(0, &channel_open(1))
        .pump()
        .client(0, &p[..p.len() - 100])
        .raw_broker(0, &hb)
        .settings(0b0001_0001)
        .client_gone(0)
        .pump()
        .tick(200, true, true)
        .pump();
    write(&dir, "gone-mid-publish", &s.0);
}
