//! Field tables (the `F` type) as RabbitMQ encodes them.
//!
//! Only handshake tables (client/server properties, AMQPLAIN responses) are
//! decoded; tables inside forwarded methods pass through as raw bytes. The
//! decoder validates every type tag and length, bounds nesting depth so a
//! hostile table cannot exhaust the stack, and never allocates more than the
//! bytes actually present.

use super::codec::{
    put_longstr, put_shortstr, put_u32, put_u64, DecodeError, DecodeResult, Reader,
};

/// Nested tables/arrays deeper than this are rejected.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    LongStr(Vec<u8>),
    Array(Vec<FieldValue>),
    Timestamp(u64),
    Table(FieldTable),
    Void,
    Bytes(Vec<u8>),
}

/// An ordered list of entries; order is kept so re-encoding is faithful.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldTable(pub Vec<(String, FieldValue)>);

impl FieldTable {
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn insert(&mut self, key: &str, value: FieldValue) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), value));
    }

    /// A boolean entry of the nested `capabilities` table; absent = false.
    pub fn capability(&self, name: &str) -> bool {
        match self.get("capabilities") {
            Some(FieldValue::Table(caps)) => matches!(caps.get(name), Some(FieldValue::Bool(true))),
            _ => false,
        }
    }

    /// A string entry (long string), lossily decoded.
    pub fn string(&self, key: &str) -> Option<String> {
        match self.get(key) {
            Some(FieldValue::LongStr(s)) => Some(String::from_utf8_lossy(s).into_owned()),
            _ => None,
        }
    }

    /// Decodes a table's entries from `bytes` (the table body, without its
    /// four-octet length prefix).
    pub fn decode_body(bytes: &[u8]) -> DecodeResult<FieldTable> {
        decode_entries(&mut Reader::new(bytes), 0)
    }

    /// Reads a length-prefixed table.
    pub fn read(r: &mut Reader<'_>) -> DecodeResult<FieldTable> {
        Self::decode_body(r.table_bytes()?)
    }

    /// Appends the table with its length prefix.
    pub fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        put_u32(out, 0);
        self.write_body(out);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends the entries without a length prefix (AMQPLAIN responses).
    pub fn write_body(&self, out: &mut Vec<u8>) {
        for (key, value) in &self.0 {
            put_shortstr(out, key.as_bytes());
            write_value(out, value);
        }
    }
}

/// Checks a table body (without its length prefix) as [`FieldTable::decode_body`]
/// would, without allocating: for tables that are forwarded, not read.
pub fn validate_table(bytes: &[u8]) -> DecodeResult<()> {
    validate_entries(&mut Reader::new(bytes), 0)
}

fn validate_entries(r: &mut Reader<'_>, depth: usize) -> DecodeResult<()> {
    while r.remaining() > 0 {
        r.shortstr()?;
        skip_value(r, depth)?;
    }
    Ok(())
}

fn skip_value(r: &mut Reader<'_>, depth: usize) -> DecodeResult<()> {
    if depth >= MAX_DEPTH {
        return Err(DecodeError::Invalid("field table nesting depth"));
    }
    let size = match r.u8()? {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => {
            r.longstr()?;
            0
        }
        b'F' => {
            validate_entries(&mut Reader::new(r.table_bytes()?), depth + 1)?;
            0
        }
        b'A' => {
            let mut inner = Reader::new(r.longstr()?);
            while inner.remaining() > 0 {
                skip_value(&mut inner, depth + 1)?;
            }
            0
        }
        _ => return Err(DecodeError::Invalid("field value type")),
    };
    r.take(size).map(drop)
}

fn decode_entries(r: &mut Reader<'_>, depth: usize) -> DecodeResult<FieldTable> {
    let mut entries = Vec::new();
    while r.remaining() > 0 {
        // Keys are bytes on the wire and RabbitMQ takes any; one that is not
        // UTF-8 is kept lossily, so decoding accepts exactly what
        // `validate_table` does. (Refusing it let a table that only failed
        // to decode slip past the argument checks that decode it, while the
        // broker read it.)
        let key = String::from_utf8_lossy(r.shortstr()?).into_owned();
        let value = read_value(r, depth)?;
        entries.push((key, value));
    }
    Ok(FieldTable(entries))
}

fn read_value(r: &mut Reader<'_>, depth: usize) -> DecodeResult<FieldValue> {
    if depth >= MAX_DEPTH {
        return Err(DecodeError::Invalid("field table nesting depth"));
    }
    let tag = r.u8()?;
    Ok(match tag {
        b't' => FieldValue::Bool(r.u8()? != 0),
        b'b' => FieldValue::I8(r.u8()? as i8),
        b'B' => FieldValue::U8(r.u8()?),
        b's' => FieldValue::I16(r.u16()? as i16),
        b'u' => FieldValue::U16(r.u16()?),
        b'I' => FieldValue::I32(r.u32()? as i32),
        b'i' => FieldValue::U32(r.u32()?),
        // RabbitMQ also reads 'L' as a signed 64-bit integer.
        b'l' | b'L' => FieldValue::I64(r.u64()? as i64),
        b'f' => FieldValue::F32(f32::from_bits(r.u32()?)),
        b'd' => FieldValue::F64(f64::from_bits(r.u64()?)),
        b'D' => FieldValue::Decimal(r.u8()?, r.u32()?),
        b'S' => FieldValue::LongStr(r.longstr()?.to_vec()),
        b'x' => FieldValue::Bytes(r.longstr()?.to_vec()),
        b'T' => FieldValue::Timestamp(r.u64()?),
        b'V' => FieldValue::Void,
        b'F' => FieldValue::Table(decode_entries(
            &mut Reader::new(r.table_bytes()?),
            depth + 1,
        )?),
        b'A' => {
            let mut inner = Reader::new(r.longstr()?);
            let mut values = Vec::new();
            while inner.remaining() > 0 {
                values.push(read_value(&mut inner, depth + 1)?);
            }
            FieldValue::Array(values)
        }
        _ => return Err(DecodeError::Invalid("field value type")),
    })
}

fn write_value(out: &mut Vec<u8>, value: &FieldValue) {
    match value {
        FieldValue::Bool(v) => out.extend_from_slice(&[b't', *v as u8]),
        FieldValue::I8(v) => out.extend_from_slice(&[b'b', *v as u8]),
        FieldValue::U8(v) => out.extend_from_slice(&[b'B', *v]),
        FieldValue::I16(v) => {
            out.push(b's');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::U16(v) => {
            out.push(b'u');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::I32(v) => {
            out.push(b'I');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::U32(v) => {
            out.push(b'i');
            put_u32(out, *v);
        }
        FieldValue::I64(v) => {
            out.push(b'l');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::F32(v) => {
            out.push(b'f');
            put_u32(out, v.to_bits());
        }
        FieldValue::F64(v) => {
            out.push(b'd');
            put_u64(out, v.to_bits());
        }
        FieldValue::Decimal(scale, v) => {
            out.extend_from_slice(&[b'D', *scale]);
            put_u32(out, *v);
        }
        FieldValue::LongStr(s) => {
            out.push(b'S');
            put_longstr(out, s);
        }
        FieldValue::Bytes(s) => {
            out.push(b'x');
            put_longstr(out, s);
        }
        FieldValue::Timestamp(v) => {
            out.push(b'T');
            put_u64(out, *v);
        }
        FieldValue::Void => out.push(b'V'),
        FieldValue::Table(t) => {
            out.push(b'F');
            t.write(out);
        }
        FieldValue::Array(values) => {
            out.push(b'A');
            let start = out.len();
            put_u32(out, 0);
            for v in values {
                write_value(out, v);
            }
            let len = (out.len() - start - 4) as u32;
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
}

/// Shorthand for a long-string value.
pub fn string(s: &str) -> FieldValue {
    FieldValue::LongStr(s.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FieldTable {
        let mut caps = FieldTable::default();
        caps.insert("publisher_confirms", FieldValue::Bool(true));
        caps.insert("connection.blocked", FieldValue::Bool(false));
        let mut t = FieldTable::default();
        t.insert("product", string("pika"));
        t.insert("capabilities", FieldValue::Table(caps));
        t.insert(
            "n",
            FieldValue::Array(vec![FieldValue::I64(-5), FieldValue::Void]),
        );
        t.insert("ts", FieldValue::Timestamp(7));
        t.insert("d", FieldValue::Decimal(2, 314));
        t
    }

    #[test]
    fn round_trip_keeps_order_and_values() {
        let t = sample();
        let mut out = Vec::new();
        t.write(&mut out);
        let back = FieldTable::read(&mut Reader::new(&out)).unwrap();
        assert_eq!(back, t);
        assert!(back.capability("publisher_confirms"));
        assert!(!back.capability("connection.blocked"));
        assert!(!back.capability("absent"));
    }

    #[test]
    fn validate_agrees_with_decode() {
        let mut out = Vec::new();
        sample().write_body(&mut out);
        assert_eq!(validate_table(&out), Ok(()));
        for cut in 0..out.len() {
            assert_eq!(
                validate_table(&out[..cut]).is_ok(),
                FieldTable::decode_body(&out[..cut]).is_ok(),
                "cut at {cut}"
            );
        }
    }

    /// Found writing the `table` fuzz target (validate and decode agree):
    /// a key that is not UTF-8 passed `validate_table` but failed decoding,
    /// so the argument checks that decode tables (x-max-age, x-queue-type,
    /// x-stream-offset) skipped a table the broker would read.
    #[test]
    fn key_that_is_not_utf8_decodes_as_validate_accepts_it() {
        let mut body = vec![1, 0xFF, b'V', 9];
        body.extend_from_slice(b"x-max-age");
        body.extend_from_slice(&[b'S', 0, 0, 0, 3]);
        body.extend_from_slice(b"abc");
        assert_eq!(validate_table(&body), Ok(()));
        let t = FieldTable::decode_body(&body).unwrap();
        assert_eq!(t.0.len(), 2);
        assert_eq!(t.0[0], ("\u{FFFD}".to_string(), FieldValue::Void));
        assert_eq!(t.string("x-max-age").as_deref(), Some("abc"));
    }

    #[test]
    fn unknown_type_tag_is_rejected() {
        // key "k", tag 'Z'
        assert_eq!(
            FieldTable::decode_body(&[1, b'k', b'Z', 0]),
            Err(DecodeError::Invalid("field value type"))
        );
    }

    #[test]
    fn long_string_longer_than_table_is_truncated() {
        assert_eq!(
            FieldTable::decode_body(&[1, b'k', b'S', 0, 0, 0, 9, b'a']),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn deep_nesting_is_rejected_without_recursing_forever() {
        // 10,000 nested arrays: each 'A' + length.
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..10_000 {
            let mut next = vec![b'A'];
            next.extend_from_slice(&(inner.len() as u32).to_be_bytes());
            next.extend_from_slice(&inner);
            inner = next;
        }
        let mut body = vec![1, b'k'];
        body.extend_from_slice(&inner);
        assert_eq!(
            FieldTable::decode_body(&body),
            Err(DecodeError::Invalid("field table nesting depth"))
        );
    }
}
