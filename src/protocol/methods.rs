//! The methods the proxy decodes or generates.
//!
//! Decoding is limited to what the proxy acts on: the connection class (both
//! roles), channel open/close/flow, and the basic/confirm/tx arguments that
//! decide routing, safety and errors. Decoded views borrow from the frame.

use super::codec::{put_longstr, put_shortstr, put_u16, put_u32, DecodeResult, Reader};
use super::constants::{method, FRAME_METHOD};
use super::frame::put_frame_with;
use super::table::FieldTable;

/// Reads the arguments of a method payload (after the 4 id octets).
pub fn arguments(payload: &[u8]) -> Reader<'_> {
    let mut r = Reader::new(payload);
    let _ = r.take(4.min(payload.len()));
    r
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionStart {
    pub version_major: u8,
    pub version_minor: u8,
    pub server_properties: FieldTable,
    pub mechanisms: Vec<u8>,
}

impl ConnectionStart {
    pub fn decode(payload: &[u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        Ok(ConnectionStart {
            version_major: r.u8()?,
            version_minor: r.u8()?,
            server_properties: FieldTable::read(&mut r)?,
            mechanisms: r.longstr()?.to_vec(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StartOk<'a> {
    pub client_properties: FieldTable,
    pub mechanism: &'a [u8],
    pub response: &'a [u8],
    pub locale: &'a [u8],
}

impl<'a> StartOk<'a> {
    pub fn decode(payload: &'a [u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        Ok(StartOk {
            client_properties: FieldTable::read(&mut r)?,
            mechanism: r.shortstr()?,
            response: r.longstr()?,
            locale: r.shortstr()?,
        })
    }
}

/// Connection.Tune and Connection.TuneOk share one layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

impl Tune {
    pub fn decode(payload: &[u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        Ok(Tune {
            channel_max: r.u16()?,
            frame_max: r.u32()?,
            heartbeat: r.u16()?,
        })
    }
}

/// Connection.Open: only the virtual host matters.
pub fn decode_open_vhost(payload: &[u8]) -> DecodeResult<&[u8]> {
    arguments(payload).shortstr()
}

/// Connection.Close and Channel.Close share one layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close<'a> {
    pub reply_code: u16,
    pub reply_text: &'a [u8],
    pub class_id: u16,
    pub method_id: u16,
}

impl<'a> Close<'a> {
    pub fn decode(payload: &'a [u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        Ok(Close {
            reply_code: r.u16()?,
            reply_text: r.shortstr()?,
            class_id: r.u16()?,
            method_id: r.u16()?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub exchange: &'a [u8],
    pub routing_key: &'a [u8],
    pub mandatory: bool,
    pub immediate: bool,
}

impl<'a> Publish<'a> {
    pub fn decode(payload: &'a [u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        let _ticket = r.u16()?;
        let exchange = r.shortstr()?;
        let routing_key = r.shortstr()?;
        let bits = r.u8()?;
        Ok(Publish {
            exchange,
            routing_key,
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos {
    pub prefetch_size: u32,
    pub prefetch_count: u16,
    pub global: bool,
}

impl Qos {
    pub fn decode(payload: &[u8]) -> DecodeResult<Self> {
        let mut r = arguments(payload);
        Ok(Qos {
            prefetch_size: r.u32()?,
            prefetch_count: r.u16()?,
            global: r.u8()? & 1 != 0,
        })
    }
}

/// Channel.Flow's `active` bit.
pub fn decode_flow_active(payload: &[u8]) -> DecodeResult<bool> {
    Ok(arguments(payload).u8()? & 1 != 0)
}

/// Basic.Get's `no_ack` bit.
pub fn decode_get_no_ack(payload: &[u8]) -> DecodeResult<bool> {
    let mut r = arguments(payload);
    let _ticket = r.u16()?;
    let _queue = r.shortstr()?;
    Ok(r.u8()? & 1 != 0)
}

/// The fixed part of a content header frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub weight: u16,
    pub body_size: u64,
}

impl ContentHeader {
    pub fn decode(payload: &[u8]) -> DecodeResult<Self> {
        let mut r = Reader::new(payload);
        let class_id = r.u16()?;
        let weight = r.u16()?;
        let body_size = r.u64()?;
        let _flags = r.u16()?;
        Ok(ContentHeader {
            class_id,
            weight,
            body_size,
        })
    }
}

/// Connection.Blocked's reason (kept raw; it is forwarded, not interpreted).
pub fn decode_blocked_reason(payload: &[u8]) -> DecodeResult<&[u8]> {
    arguments(payload).shortstr()
}

/// Reads the id octets of a method payload.
pub fn method_id(payload: &[u8]) -> DecodeResult<method::Id> {
    let mut r = Reader::new(payload);
    Ok((r.u16()?, r.u16()?))
}

// ---- encoders -------------------------------------------------------------

/// Appends one method frame whose arguments `args` writes.
pub fn put_method(
    out: &mut Vec<u8>,
    channel: u16,
    id: method::Id,
    args: impl FnOnce(&mut Vec<u8>),
) {
    put_frame_with(out, FRAME_METHOD, channel, |b| {
        put_u16(b, id.0);
        put_u16(b, id.1);
        args(b);
    });
}

pub fn put_connection_start(
    out: &mut Vec<u8>,
    server_properties: &FieldTable,
    mechanisms: &[u8],
    locales: &[u8],
) {
    put_method(out, 0, method::CONNECTION_START, |b| {
        b.extend_from_slice(&[0, 9]);
        server_properties.write(b);
        put_longstr(b, mechanisms);
        put_longstr(b, locales);
    });
}

pub fn put_connection_start_ok(
    out: &mut Vec<u8>,
    client_properties: &FieldTable,
    mechanism: &[u8],
    response: &[u8],
) {
    put_method(out, 0, method::CONNECTION_START_OK, |b| {
        client_properties.write(b);
        put_shortstr(b, mechanism);
        put_longstr(b, response);
        put_shortstr(b, b"en_US");
    });
}

/// Connection.Tune (`ok = false`) or Connection.TuneOk (`ok = true`).
pub fn put_tune(out: &mut Vec<u8>, ok: bool, tune: Tune) {
    let id = if ok {
        method::CONNECTION_TUNE_OK
    } else {
        method::CONNECTION_TUNE
    };
    put_method(out, 0, id, |b| {
        put_u16(b, tune.channel_max);
        put_u32(b, tune.frame_max);
        put_u16(b, tune.heartbeat);
    });
}

pub fn put_connection_open(out: &mut Vec<u8>, vhost: &[u8]) {
    put_method(out, 0, method::CONNECTION_OPEN, |b| {
        put_shortstr(b, vhost);
        put_shortstr(b, b"");
        b.push(0);
    });
}

pub fn put_connection_open_ok(out: &mut Vec<u8>) {
    put_method(out, 0, method::CONNECTION_OPEN_OK, |b| put_shortstr(b, b""));
}

/// Connection.Close (channel 0) or Channel.Close (any other channel).
pub fn put_close(
    out: &mut Vec<u8>,
    channel: u16,
    reply_code: u16,
    reply_text: &[u8],
    failing: method::Id,
) {
    let id = if channel == 0 {
        method::CONNECTION_CLOSE
    } else {
        method::CHANNEL_CLOSE
    };
    put_method(out, channel, id, |b| {
        put_u16(b, reply_code);
        put_shortstr(b, reply_text);
        put_u16(b, failing.0);
        put_u16(b, failing.1);
    });
}

/// Connection.CloseOk (channel 0) or Channel.CloseOk.
pub fn put_close_ok(out: &mut Vec<u8>, channel: u16) {
    let id = if channel == 0 {
        method::CONNECTION_CLOSE_OK
    } else {
        method::CHANNEL_CLOSE_OK
    };
    put_method(out, channel, id, |_| {});
}

pub fn put_channel_open(out: &mut Vec<u8>, channel: u16) {
    put_method(out, channel, method::CHANNEL_OPEN, |b| put_shortstr(b, b""));
}

pub fn put_channel_open_ok(out: &mut Vec<u8>, channel: u16) {
    put_method(out, channel, method::CHANNEL_OPEN_OK, |b| {
        put_longstr(b, b"")
    });
}

pub fn put_basic_qos(out: &mut Vec<u8>, channel: u16, qos: Qos) {
    put_method(out, channel, method::BASIC_QOS, |b| {
        put_u32(b, qos.prefetch_size);
        put_u16(b, qos.prefetch_count);
        b.push(qos.global as u8);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::DecodeError;
    use crate::protocol::frame::{parse_frame, FrameStatus};

    fn only_frame(bytes: &[u8]) -> crate::protocol::Frame<'_> {
        match parse_frame(bytes, 0).unwrap() {
            FrameStatus::Complete(f, used) => {
                assert_eq!(used, bytes.len());
                f
            }
            FrameStatus::Partial => panic!("partial"),
        }
    }

    #[test]
    fn close_round_trip() {
        let mut out = Vec::new();
        put_close(&mut out, 0, 403, b"ACCESS_REFUSED - nope", (10, 40));
        let f = only_frame(&out);
        assert_eq!(f.method_id(), Some(method::CONNECTION_CLOSE));
        let c = Close::decode(f.payload).unwrap();
        assert_eq!(
            (c.reply_code, c.reply_text, c.class_id, c.method_id),
            (403, &b"ACCESS_REFUSED - nope"[..], 10, 40)
        );
    }

    #[test]
    fn tune_round_trip() {
        let t = Tune {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
        };
        let mut out = Vec::new();
        put_tune(&mut out, true, t);
        let f = only_frame(&out);
        assert_eq!(f.method_id(), Some(method::CONNECTION_TUNE_OK));
        assert_eq!(Tune::decode(f.payload).unwrap(), t);
    }

    /// Basic.Publish as pika encodes it: exchange "", key "q1", mandatory.
    const PIKA_PUBLISH: &[u8] = &[0, 60, 0, 40, 0, 0, 0, 2, b'q', b'1', 1];

    #[test]
    fn publish_flags() {
        let p = Publish::decode(PIKA_PUBLISH).unwrap();
        assert_eq!(p.exchange, b"");
        assert_eq!(p.routing_key, b"q1");
        assert!(p.mandatory && !p.immediate);
    }

    #[test]
    fn truncated_publish_is_an_error_not_a_panic() {
        for cut in 0..PIKA_PUBLISH.len() {
            assert!(Publish::decode(&PIKA_PUBLISH[..cut]).is_err());
        }
    }

    #[test]
    fn content_header_body_size() {
        let payload = [0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x80, 0];
        let h = ContentHeader::decode(&payload).unwrap();
        assert_eq!((h.class_id, h.body_size), (60, 256));
    }

    #[test]
    fn start_ok_decodes_plain_response() {
        let mut props = FieldTable::default();
        props.insert("product", crate::protocol::table::string("test"));
        let mut out = Vec::new();
        put_connection_start_ok(&mut out, &props, b"PLAIN", b"\0guest\0guest");
        let f = only_frame(&out);
        let s = StartOk::decode(f.payload).unwrap();
        assert_eq!(s.mechanism, b"PLAIN");
        assert_eq!(s.response, b"\0guest\0guest");
        assert_eq!(s.client_properties, props);
    }

    #[test]
    fn decode_errors_name_no_panic_on_empty() {
        assert_eq!(Tune::decode(&[]), Err(DecodeError::Truncated));
        assert!(ConnectionStart::decode(&[0, 10, 0, 10]).is_err());
    }
}
