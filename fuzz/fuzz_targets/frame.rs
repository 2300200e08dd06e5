//! `protocol::frame`: the incremental frame reader over arbitrary bytes.
//!
//! Input: one selector octet choosing frame_max (0 = unlimited, the
//! protocol minimum, RabbitMQ's default, a tiny value below the framing
//! overhead, or four octets of the input), then a byte stream that is
//! walked frame by frame as the proxy does. Every outcome is checked
//! against the wire format, and every complete frame is re-encoded with
//! the writers and must come out byte for byte.
#![no_main]

use amqproxy::protocol::constants::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_OVERHEAD,
};
use amqproxy::protocol::frame::{
    parse_frame, put_body_frames, put_frame, put_frame_with, set_channel, FrameError, FrameStatus,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (frame_max, mut stream) = match sel % 6 {
        0 => (0, rest),
        1 => (4096, rest),
        2 => (131072, rest),
        3 => ((sel >> 3) as u32 % 16, rest), // below the 8 octets of framing
        4 if rest.len() >= 4 => (
            u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            &rest[4..],
        ),
        _ => (8 + (sel as u32 >> 3), rest),
    };
    let limit = if frame_max == 0 {
        u32::MAX as usize
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD)
    };
    let mut frames = 0usize;
    loop {
        match parse_frame(stream, frame_max) {
            Ok(FrameStatus::Complete(f, used)) => {
                frames += 1;
                assert!(used <= stream.len(), "consumed more than the buffer");
                assert_eq!(used, f.payload.len() + FRAME_OVERHEAD);
                assert_eq!(used, f.wire_len());
                assert!(f.payload.len() <= limit, "payload beyond frame_max");
                assert!(matches!(
                    f.frame_type,
                    FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
                ));
                assert_eq!(stream[0], f.frame_type);
                assert_eq!(u16::from_be_bytes([stream[1], stream[2]]), f.channel);
                assert_eq!(&stream[7..used - 1], f.payload);
                assert_eq!(stream[used - 1], FRAME_END);
                match f.method_id() {
                    Some((c, m)) => {
                        assert!(f.frame_type == FRAME_METHOD && f.payload.len() >= 4);
                        assert_eq!(c.to_be_bytes(), [f.payload[0], f.payload[1]]);
                        assert_eq!(m.to_be_bytes(), [f.payload[2], f.payload[3]]);
                    }
                    None => assert!(f.frame_type != FRAME_METHOD || f.payload.len() < 4),
                }
                // Every strict prefix of a complete frame is Partial (a
                // few of them: the header, one short, half way).
                for cut in [0, 7.min(used - 1), used - 1, used / 2] {
                    assert_eq!(
                        parse_frame(&stream[..cut], frame_max),
                        Ok(FrameStatus::Partial),
                        "prefix of {cut} of a {used}-byte frame"
                    );
                }
                // The writers reproduce it exactly.
                let mut out = Vec::new();
                put_frame(&mut out, f.frame_type, f.channel, f.payload);
                assert_eq!(out, &stream[..used]);
                let mut with = Vec::new();
                put_frame_with(&mut with, f.frame_type, f.channel, |b| {
                    b.extend_from_slice(f.payload)
                });
                assert_eq!(with, out);
                set_channel(&mut out, f.channel ^ 0xA5A5);
                match parse_frame(&out, frame_max) {
                    Ok(FrameStatus::Complete(g, n)) => {
                        assert_eq!(n, used);
                        assert_eq!(g.channel, f.channel ^ 0xA5A5);
                        assert_eq!((g.frame_type, g.payload), (f.frame_type, f.payload));
                    }
                    other => panic!("re-channelled frame: {other:?}"),
                }
                // Bodies re-split to a frame_max come back whole, every
                // piece within it.
                if f.frame_type == FRAME_BODY && frame_max >= 9 {
                    let mut split = Vec::new();
                    put_body_frames(&mut split, f.channel, f.payload, frame_max);
                    let mut joined = Vec::new();
                    let mut rest = &split[..];
                    while !rest.is_empty() {
                        match parse_frame(rest, frame_max) {
                            Ok(FrameStatus::Complete(g, n)) => {
                                assert_eq!(g.frame_type, FRAME_BODY);
                                assert!(g.wire_len() <= frame_max as usize);
                                joined.extend_from_slice(g.payload);
                                rest = &rest[n..];
                            }
                            other => panic!("re-split body: {other:?}"),
                        }
                    }
                    assert_eq!(joined, f.payload);
                }
                stream = &stream[used..];
            }
            Ok(FrameStatus::Partial) => {
                if stream.len() >= 7 {
                    let size = u32::from_be_bytes([stream[3], stream[4], stream[5], stream[6]]);
                    assert!(
                        stream.len() <= 7 + size as usize,
                        "partial with the end in view"
                    );
                    assert!(size as usize <= limit, "partial for an oversized frame");
                }
                break;
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(stream.len() >= 7, "error before a whole header: {e:?}");
                let size = u32::from_be_bytes([stream[3], stream[4], stream[5], stream[6]]);
                match e {
                    FrameError::UnknownType { frame_type } => {
                        assert_eq!(frame_type, stream[0]);
                        assert!(!matches!(frame_type, 1 | 2 | 3 | 8));
                    }
                    FrameError::TooLarge {
                        size: s,
                        frame_max: m,
                    } => {
                        assert_eq!((s, m), (size, frame_max));
                        assert!(size as usize > limit);
                    }
                    FrameError::BadFrameEnd { found } => {
                        let end = 7 + size as usize;
                        assert!(end < stream.len());
                        assert_eq!(found, stream[end]);
                        assert_ne!(found, FRAME_END);
                    }
                }
                break;
            }
        }
    }
    let _ = frames;
});
