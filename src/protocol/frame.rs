//! The incremental frame reader: borrowed views over a byte buffer.
//!
//! `parse_frame` never copies and never allocates: it returns `Partial` when
//! the buffer does not yet hold a whole frame, and checks the declared size
//! against the negotiated frame_max *before* anyone waits for (or allocates
//! room for) that many bytes.

use super::constants::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEADER_SIZE, FRAME_HEARTBEAT, FRAME_METHOD,
    FRAME_OVERHEAD,
};
use std::fmt;

/// One complete frame, borrowed from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub frame_type: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        self.payload.len() + FRAME_OVERHEAD
    }

    /// `(class, method)` of a method frame; `None` if the payload is shorter
    /// than the four id octets.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        if self.frame_type != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameStatus<'a> {
    /// A whole frame; the `usize` is how many bytes of the buffer it used.
    Complete(Frame<'a>, usize),
    /// Not enough bytes yet; nothing is consumed.
    Partial,
}

/// A violation of the framing rules. All of them are connection errors with
/// reply code 501 FRAME_ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The octet after the payload was not 0xCE.
    BadFrameEnd { found: u8 },
    /// The declared payload does not fit the negotiated frame_max.
    TooLarge { size: u32, frame_max: u32 },
    /// A frame type outside method/header/body/heartbeat.
    UnknownType { frame_type: u8 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadFrameEnd { found } => {
                write!(
                    f,
                    "FRAME_ERROR - frame end octet was {found:#04x}, expected 0xce"
                )
            }
            FrameError::TooLarge { size, frame_max } => write!(
                f,
                "FRAME_ERROR - frame payload of {size} bytes exceeds frame_max {frame_max}"
            ),
            FrameError::UnknownType { frame_type } => {
                write!(f, "FRAME_ERROR - unknown frame type {frame_type}")
            }
        }
    }
}

/// Reads one frame from the front of `buf`.
///
/// `frame_max` is the negotiated maximum frame size including the 8 octets of
/// framing; 0 means "no limit negotiated" and is treated as `u32::MAX`.
pub fn parse_frame(buf: &[u8], frame_max: u32) -> Result<FrameStatus<'_>, FrameError> {
    if buf.len() < FRAME_HEADER_SIZE {
        return Ok(FrameStatus::Partial);
    }
    let frame_type = buf[0];
    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(FrameError::UnknownType { frame_type });
    }
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    let limit = if frame_max == 0 {
        u32::MAX
    } else {
        frame_max.saturating_sub(FRAME_OVERHEAD as u32)
    };
    if size > limit {
        return Err(FrameError::TooLarge { size, frame_max });
    }
    // size <= u32::MAX fits usize on every platform we build for (64-bit).
    let end = FRAME_HEADER_SIZE + size as usize;
    if buf.len() <= end {
        return Ok(FrameStatus::Partial);
    }
    if buf[end] != FRAME_END {
        return Err(FrameError::BadFrameEnd { found: buf[end] });
    }
    Ok(FrameStatus::Complete(
        Frame {
            frame_type,
            channel,
            payload: &buf[FRAME_HEADER_SIZE..end],
        },
        end + 1,
    ))
}

/// Rewrites the channel number of an encoded frame in place.
pub fn set_channel(frame: &mut [u8], channel: u16) {
    frame[1..3].copy_from_slice(&channel.to_be_bytes());
}

/// Appends a frame header; the caller appends `size` payload bytes and then
/// [`FRAME_END`].
pub fn put_frame_header(out: &mut Vec<u8>, frame_type: u8, channel: u16, size: u32) {
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
}

/// Appends a whole frame.
pub fn put_frame(out: &mut Vec<u8>, frame_type: u8, channel: u16, payload: &[u8]) {
    put_frame_header(out, frame_type, channel, payload.len() as u32);
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// Appends a frame whose payload is written by `body`; the size is patched
/// afterwards so callers need not know it in advance.
pub fn put_frame_with(
    out: &mut Vec<u8>,
    frame_type: u8,
    channel: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    put_frame_header(out, frame_type, channel, 0);
    body(out);
    let size = (out.len() - start - FRAME_HEADER_SIZE) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Appends a heartbeat frame (always on channel 0).
pub fn put_heartbeat(out: &mut Vec<u8>) {
    put_frame(out, FRAME_HEARTBEAT, 0, &[]);
}

/// Appends `payload` as body frames of at most `frame_max` bytes each
/// (framing included), splitting as needed.
pub fn put_body_frames(out: &mut Vec<u8>, channel: u16, payload: &[u8], frame_max: u32) {
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for piece in payload.chunks(chunk) {
        put_frame(out, FRAME_BODY, channel, piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

    #[test]
    fn heartbeat_frame_is_complete() {
        let status = parse_frame(&HEARTBEAT, 4096).unwrap();
        let FrameStatus::Complete(frame, used) = status else {
            panic!("expected a complete frame")
        };
        assert_eq!(used, 8);
        assert_eq!(frame.frame_type, FRAME_HEARTBEAT);
        assert!(frame.payload.is_empty());
    }

    #[test]
    fn every_prefix_of_a_frame_is_partial() {
        let mut frame = Vec::new();
        put_frame(&mut frame, FRAME_BODY, 7, b"hello");
        for cut in 0..frame.len() {
            assert_eq!(parse_frame(&frame[..cut], 4096), Ok(FrameStatus::Partial));
        }
        let FrameStatus::Complete(f, used) = parse_frame(&frame, 4096).unwrap() else {
            panic!()
        };
        assert_eq!((f.channel, f.payload, used), (7, &b"hello"[..], 13));
    }

    #[test]
    fn bad_frame_end_octet_is_frame_error() {
        let mut frame = HEARTBEAT;
        frame[7] = 0xCD;
        assert_eq!(
            parse_frame(&frame, 4096),
            Err(FrameError::BadFrameEnd { found: 0xCD })
        );
    }

    #[test]
    fn size_0xffffffff_is_rejected_before_any_payload_arrives() {
        let header = [3, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(
            parse_frame(&header, 131072),
            Err(FrameError::TooLarge {
                size: u32::MAX,
                frame_max: 131072
            })
        );
    }

    #[test]
    fn frame_of_exactly_frame_max_is_accepted_one_more_is_not() {
        let mut ok = Vec::new();
        put_frame(&mut ok, FRAME_BODY, 1, &[0u8; 4096 - 8]);
        assert!(matches!(
            parse_frame(&ok, 4096),
            Ok(FrameStatus::Complete(_, 4096))
        ));
        let mut big = Vec::new();
        put_frame(&mut big, FRAME_BODY, 1, &[0u8; 4096 - 7]);
        assert!(matches!(
            parse_frame(&big, 4096),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_frame_type_is_rejected() {
        let frame = [9, 0, 0, 0, 0, 0, 0, 0xCE];
        assert_eq!(
            parse_frame(&frame, 4096),
            Err(FrameError::UnknownType { frame_type: 9 })
        );
    }

    #[test]
    fn body_is_split_at_frame_max() {
        let mut out = Vec::new();
        put_body_frames(&mut out, 3, &[7u8; 10_000], 4096);
        let mut rest = &out[..];
        let mut sizes = Vec::new();
        while let Ok(FrameStatus::Complete(f, used)) = parse_frame(rest, 4096) {
            sizes.push(f.payload.len());
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(sizes, vec![4088, 4088, 1824]);
    }

    #[test]
    fn set_channel_rewrites_only_the_channel() {
        let mut out = Vec::new();
        put_frame(&mut out, FRAME_METHOD, 1, &[0, 60, 0, 40]);
        set_channel(&mut out, 0x1234);
        assert_eq!(&out[..3], &[1, 0x12, 0x34]);
        assert_eq!(&out[3..], &[0, 0, 0, 4, 0, 60, 0, 40, 0xCE]);
    }
}
