//! Primitive AMQP types: a bounds-checked `Reader` over borrowed bytes and
//! `put_*` writers onto a `Vec<u8>`.
//!
//! The reader never panics and never allocates: every length prefix is
//! checked against the bytes actually present before it is used.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended before the field did.
    Truncated,
    /// A field held a value the grammar does not allow.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated method arguments"),
            DecodeError::Invalid(what) => write!(f, "invalid {what}"),
        }
    }
}

pub type DecodeResult<T> = Result<T, DecodeError>;

/// A cursor over a method or header payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> DecodeResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> DecodeResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> DecodeResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A short string: one length octet, then up to 255 bytes.
    pub fn shortstr(&mut self) -> DecodeResult<&'a [u8]> {
        let len = self.u8()? as usize;
        self.take(len)
    }

    /// A long string: four length octets, then that many bytes (checked
    /// against what is present before use).
    pub fn longstr(&mut self) -> DecodeResult<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// A field table's raw bytes (without its length prefix), unvalidated.
    pub fn table_bytes(&mut self) -> DecodeResult<&'a [u8]> {
        self.longstr()
    }
}

pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Writes a short string, truncating at 255 bytes (on a UTF-8 boundary when
/// the input is text) — reply texts are the only strings we generate that
/// could be that long.
pub fn put_shortstr(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len().min(255);
    if let Ok(text) = std::str::from_utf8(s) {
        while !text.is_char_boundary(len) {
            len -= 1;
        }
    }
    out.push(len as u8);
    out.extend_from_slice(&s[..len]);
}

pub fn put_longstr(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longstr_length_beyond_payload_is_truncated_not_allocated() {
        let mut r = Reader::new(&[0xFF, 0xFF, 0xFF, 0xFF, b'a']);
        assert_eq!(r.longstr(), Err(DecodeError::Truncated));
    }

    #[test]
    fn shortstr_round_trip() {
        let mut out = Vec::new();
        put_shortstr(&mut out, b"amq.direct");
        let mut r = Reader::new(&out);
        assert_eq!(r.shortstr().unwrap(), b"amq.direct");
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn long_reply_text_is_cut_on_a_char_boundary() {
        let text = "é".repeat(200); // 400 bytes
        let mut out = Vec::new();
        put_shortstr(&mut out, text.as_bytes());
        assert_eq!(out[0], 254);
        assert!(std::str::from_utf8(&out[1..]).is_ok());
    }
}
