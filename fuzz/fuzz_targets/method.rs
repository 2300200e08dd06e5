//! `protocol::methods` decoders and `protocol::spec` validation on arbitrary
//! payloads.
//!
//! Input: one selector octet, then a frame payload (method id octets
//! included). Every decoder in `methods` runs on the payload; the argument
//! validator runs with the payload's own method's argument list and with
//! the list of the method the selector names; the content-header validator
//! runs on it too. Checked: nothing panics, borrowed fields lie inside the
//! payload, what `spec` accepts the proxy's own decoders can read (the
//! proxy decodes after validating), and decoded methods re-encode to
//! something that decodes the same.
#![no_main]

use amqproxy::protocol::constants::method;
use amqproxy::protocol::frame::{parse_frame, FrameStatus};
use amqproxy::protocol::methods::{
    self, decode_blocked_reason, decode_flow_active, decode_get_no_ack, decode_open_vhost,
    put_close, put_connection_start_ok, put_tune, Close, ConnectionStart, ContentHeader, Publish,
    Qos, StartOk, Tune,
};
use amqproxy::protocol::spec::{client_method, validate_arguments, validate_content_header};
use libfuzzer_sys::fuzz_target;

/// Every method id `spec` knows, plus a few it must not.
#[rustfmt::skip]
const IDS: &[(u16, u16)] = &[
    (10, 11), (10, 21), (10, 31), (10, 40), (10, 50), (10, 51), (10, 70),
    (20, 10), (20, 20), (20, 40), (20, 41), (30, 10), (40, 10), (40, 20),
    (40, 30), (40, 40), (50, 10), (50, 20), (50, 30), (50, 40), (50, 50),
    (60, 10), (60, 20), (60, 30), (60, 40), (60, 70), (60, 80), (60, 90),
    (60, 100), (60, 110), (60, 120), (90, 10), (90, 20), (90, 30), (85, 10),
    // server-only and unknown
    (10, 10), (20, 21), (60, 60), (0, 0), (65535, 65535),
];

fn inside(payload: &[u8], part: &[u8]) {
    let (p, q) = (payload.as_ptr() as usize, part.as_ptr() as usize);
    assert!(
        part.is_empty() || (q >= p && q + part.len() <= p + payload.len()),
        "decoded field is not a view into the payload"
    );
}

/// The only frame in `bytes`, as the proxy would parse it.
fn only_payload(bytes: &[u8]) -> &[u8] {
    match parse_frame(bytes, 0) {
        Ok(FrameStatus::Complete(f, used)) => {
            assert_eq!(used, bytes.len());
            f.payload
        }
        other => panic!("encoder wrote a bad frame: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };

    // ---- the decoders ----------------------------------------------------
    let id = methods::method_id(payload);
    assert_eq!(id.is_ok(), payload.len() >= 4);
    let _ = methods::arguments(payload).remaining();

    if let Ok(s) = ConnectionStart::decode(payload) {
        let _ = s.server_properties.capability("x");
    }
    let start_ok = StartOk::decode(payload);
    if let Ok(s) = &start_ok {
        inside(payload, s.mechanism);
        inside(payload, s.response);
        inside(payload, s.locale);
        // Re-encoded (the locale is always en_US) it reads back the same.
        let mut out = Vec::new();
        put_connection_start_ok(&mut out, &s.client_properties, s.mechanism, s.response);
        let back = StartOk::decode(only_payload(&out)).expect("re-encoded start-ok");
        assert_eq!((back.mechanism, back.response), (s.mechanism, s.response));
        assert_eq!(back.client_properties.0.len(), s.client_properties.0.len());
    }
    let tune = Tune::decode(payload);
    if let Ok(t) = tune {
        for ok in [false, true] {
            let mut out = Vec::new();
            put_tune(&mut out, ok, t);
            assert_eq!(Tune::decode(only_payload(&out)), Ok(t));
        }
    }
    let vhost = decode_open_vhost(payload);
    if let Ok(v) = vhost {
        inside(payload, v);
    }
    let close = Close::decode(payload);
    if let Ok(c) = &close {
        inside(payload, c.reply_text);
        let mut out = Vec::new();
        put_close(
            &mut out,
            sel as u16,
            c.reply_code,
            c.reply_text,
            (c.class_id, c.method_id),
        );
        assert_eq!(Close::decode(only_payload(&out)).as_ref(), Ok(c));
    }
    let publish = Publish::decode(payload);
    if let Ok(p) = publish {
        inside(payload, p.exchange);
        inside(payload, p.routing_key);
    }
    let qos = Qos::decode(payload);
    let flow = decode_flow_active(payload);
    let get = decode_get_no_ack(payload);
    let header = ContentHeader::decode(payload);
    if let Ok(r) = decode_blocked_reason(payload) {
        inside(payload, r);
    }

    // ---- spec validation -------------------------------------------------
    let check = |id: (u16, u16)| {
        let Some((name, args)) = client_method(id) else {
            return;
        };
        assert!(!name.is_empty());
        let valid = validate_arguments(payload, args);
        if valid.is_err() {
            return;
        }
        // What the validator accepts, the proxy's own decoders can read.
        assert!(payload.len() >= 4);
        match id {
            method::CONNECTION_TUNE_OK => assert!(tune.is_ok(), "{name}"),
            method::CONNECTION_OPEN => assert!(vhost.is_ok(), "{name}"),
            method::CONNECTION_CLOSE | method::CHANNEL_CLOSE => {
                assert!(close.is_ok(), "{name}")
            }
            method::BASIC_PUBLISH => assert!(publish.is_ok(), "{name}"),
            method::BASIC_QOS => assert!(qos.is_ok(), "{name}"),
            (20, 20) => assert!(flow.is_ok(), "{name}"),
            method::BASIC_GET => assert!(get.is_ok(), "{name}"),
            method::CONNECTION_START_OK => assert!(start_ok.is_ok(), "{name}: {start_ok:?}"),
            _ => {}
        }
    };
    if let Ok(own) = id {
        check(own);
    }
    check(IDS[sel as usize % IDS.len()]);

    if validate_content_header(payload).is_ok() {
        assert!(header.is_ok(), "valid content header the decoder refuses");
        assert!(payload.len() >= 14);
    }
    for e in [&tune.err(), &header.err()].into_iter().flatten() {
        let _ = e.to_string();
    }
});
