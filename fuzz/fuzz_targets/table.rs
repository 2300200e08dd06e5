//! `protocol::table`: field-table decoding and the non-allocating
//! validator on arbitrary bytes.
//!
//! Input: a table body (without its length prefix), as in an AMQPLAIN
//! response or inside a method. Checked: nothing panics or recurses past
//! the depth limit; `validate_table` and `FieldTable::decode_body` agree
//! (same verdict, same error; keys that are not UTF-8 are decoded
//! lossily, as the broker takes any bytes); a decoded table re-encodes to
//! the same number of bytes, decodes again to the same table and
//! re-encodes to the same bytes.
#![no_main]

use amqproxy::protocol::codec::Reader;
use amqproxy::protocol::table::{validate_table, FieldTable, FieldValue};
use libfuzzer_sys::fuzz_target;

fn body(t: &FieldTable) -> Vec<u8> {
    let mut out = Vec::new();
    t.write_body(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let decoded = FieldTable::decode_body(data);
    let validated = validate_table(data);
    // The proxy validates tables it forwards and decodes some of them to
    // check arguments: a table only one of the two accepts would slip past.
    assert_eq!(
        validated,
        decoded.as_ref().map(drop).map_err(|e| *e),
        "validate and decode disagree"
    );

    // The length-prefixed reader sees the same table.
    let mut prefixed = (data.len() as u32).to_be_bytes().to_vec();
    prefixed.extend_from_slice(data);
    let mut r = Reader::new(&prefixed);
    assert_eq!(FieldTable::read(&mut r).is_ok(), decoded.is_ok());

    let Ok(table) = decoded else {
        return;
    };
    // Same size on the wire ('L' comes back as 'l', NaNs keep their bits;
    // only a key that is not UTF-8 changes, to U+FFFD).
    let once = body(&table);
    let lossy = nested_lossy(&table);
    if !lossy {
        assert_eq!(once.len(), data.len(), "re-encoding changed the size");
    }
    let again = FieldTable::decode_body(&once).expect("re-encoded table decodes");
    assert_eq!(body(&again), once, "encode/decode is not a fixed point");
    if !has_nan(&table) && !lossy {
        assert_eq!(again, table);
    }
    assert_eq!(validate_table(&once), Ok(()));

    let mut out = Vec::new();
    table.write(&mut out);
    let back = FieldTable::read(&mut Reader::new(&out)).expect("prefixed round trip");
    assert_eq!(body(&back), once);

    // The accessors the handshake uses.
    let _ = table.capability("connection.blocked");
    let _ = table.string("connection_name");
    let mut t = table.clone();
    if let Some((k, v)) = table.0.first() {
        t.insert(k, v.clone());
        assert!(t.get(k).is_some());
        assert_eq!(t.0.iter().filter(|(key, _)| key == k).count(), 1);
    }
});

/// Whether some key, at any depth, holds U+FFFD (lossy or sent as such).
fn nested_lossy(t: &FieldTable) -> bool {
    t.0.iter()
        .any(|(k, v)| k.contains('\u{FFFD}') || value_lossy(v))
}

fn value_lossy(v: &FieldValue) -> bool {
    match v {
        FieldValue::Array(a) => a.iter().any(value_lossy),
        FieldValue::Table(t) => nested_lossy(t),
        _ => false,
    }
}

fn has_nan(t: &FieldTable) -> bool {
    t.0.iter().any(|(_, v)| value_has_nan(v))
}

fn value_has_nan(v: &FieldValue) -> bool {
    match v {
        FieldValue::F32(f) => f.is_nan(),
        FieldValue::F64(f) => f.is_nan(),
        FieldValue::Array(a) => a.iter().any(value_has_nan),
        FieldValue::Table(t) => has_nan(t),
        _ => false,
    }
}
