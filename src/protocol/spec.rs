//! What a client may send, from the AMQP 0-9-1 specification (RabbitMQ's
//! `amqp-rabbitmq-0.9.1.json`, argument domains resolved to their primitive
//! types), and a validator that walks method arguments and content-header
//! properties without allocating.
//!
//! The proxy forwards methods without re-encoding them; a malformed one
//! would make the broker close the *shared* upstream connection with 502.
//! Validating first keeps that error with the client that caused it.

use super::codec::{DecodeError, DecodeResult, Reader};
use super::constants::method;
use super::table::validate_table;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    Octet,
    Short,
    Long,
    LongLong,
    ShortStr,
    LongStr,
    Table,
    Bit,
    Timestamp,
}

use Arg::*;

/// Every method a client may send, with its argument types. channel.flow-ok
/// is left out on purpose: RabbitMQ never sends Channel.Flow to clients and
/// answers a FlowOk with a connection error (503 "unimplemented method").
#[rustfmt::skip]
const CLIENT_METHODS: &[(method::Id, &str, &[Arg])] = &[
    ((10, 11), "connection.start-ok", &[Table, ShortStr, LongStr, ShortStr]),
    ((10, 21), "connection.secure-ok", &[LongStr]),
    ((10, 31), "connection.tune-ok", &[Short, Long, Short]),
    ((10, 40), "connection.open", &[ShortStr, ShortStr, Bit]),
    ((10, 50), "connection.close", &[Short, ShortStr, Short, Short]),
    ((10, 51), "connection.close-ok", &[]),
    ((10, 70), "connection.update-secret", &[LongStr, ShortStr]),
    ((20, 10), "channel.open", &[ShortStr]),
    ((20, 20), "channel.flow", &[Bit]),
    ((20, 40), "channel.close", &[Short, ShortStr, Short, Short]),
    ((20, 41), "channel.close-ok", &[]),
    ((30, 10), "access.request", &[ShortStr, Bit, Bit, Bit, Bit, Bit]),
    ((40, 10), "exchange.declare", &[Short, ShortStr, ShortStr, Bit, Bit, Bit, Bit, Bit, Table]),
    ((40, 20), "exchange.delete", &[Short, ShortStr, Bit, Bit]),
    ((40, 30), "exchange.bind", &[Short, ShortStr, ShortStr, ShortStr, Bit, Table]),
    ((40, 40), "exchange.unbind", &[Short, ShortStr, ShortStr, ShortStr, Bit, Table]),
    ((50, 10), "queue.declare", &[Short, ShortStr, Bit, Bit, Bit, Bit, Bit, Table]),
    ((50, 20), "queue.bind", &[Short, ShortStr, ShortStr, ShortStr, Bit, Table]),
    ((50, 30), "queue.purge", &[Short, ShortStr, Bit]),
    ((50, 40), "queue.delete", &[Short, ShortStr, Bit, Bit, Bit]),
    ((50, 50), "queue.unbind", &[Short, ShortStr, ShortStr, ShortStr, Table]),
    ((60, 10), "basic.qos", &[Long, Short, Bit]),
    ((60, 20), "basic.consume", &[Short, ShortStr, ShortStr, Bit, Bit, Bit, Bit, Table]),
    ((60, 30), "basic.cancel", &[ShortStr, Bit]),
    ((60, 40), "basic.publish", &[Short, ShortStr, ShortStr, Bit, Bit]),
    ((60, 70), "basic.get", &[Short, ShortStr, Bit]),
    ((60, 80), "basic.ack", &[LongLong, Bit]),
    ((60, 90), "basic.reject", &[LongLong, Bit]),
    ((60, 100), "basic.recover-async", &[Bit]),
    ((60, 110), "basic.recover", &[Bit]),
    ((60, 120), "basic.nack", &[LongLong, Bit, Bit]),
    ((90, 10), "tx.select", &[]),
    ((90, 20), "tx.commit", &[]),
    ((90, 30), "tx.rollback", &[]),
    ((85, 10), "confirm.select", &[Bit]),
];

/// The argument types of a method a client may send; `None` for unknown
/// methods and for methods only a server sends.
pub fn client_method(id: method::Id) -> Option<(&'static str, &'static [Arg])> {
    CLIENT_METHODS
        .iter()
        .find(|(m, _, _)| *m == id)
        .map(|(_, name, args)| (*name, *args))
}

/// Checks that `payload` (id octets included) holds exactly the arguments
/// `args` describes.
pub fn validate_arguments(payload: &[u8], args: &[Arg]) -> DecodeResult<()> {
    let mut r = Reader::new(payload);
    r.take(4)?;
    let mut bits = 0u8; // bits left in the current packed octet
    for arg in args {
        if *arg == Bit {
            if bits == 0 {
                r.u8()?;
                bits = 8;
            }
            bits -= 1;
            continue;
        }
        bits = 0;
        validate_one(&mut r, *arg)?;
    }
    if r.remaining() != 0 {
        return Err(DecodeError::Invalid(
            "trailing bytes after method arguments",
        ));
    }
    Ok(())
}

fn validate_one(r: &mut Reader<'_>, arg: Arg) -> DecodeResult<()> {
    match arg {
        Octet => r.u8().map(drop),
        Short => r.u16().map(drop),
        Long => r.u32().map(drop),
        LongLong | Timestamp => r.u64().map(drop),
        ShortStr => r.shortstr().map(drop),
        LongStr => r.longstr().map(drop),
        Table => validate_table(r.table_bytes()?),
        Bit => r.u8().map(drop),
    }
}

/// Basic class content properties, in flag order (bit 15 first).
const BASIC_PROPERTIES: [Arg; 14] = [
    ShortStr, ShortStr, Table, Octet, Octet, ShortStr, ShortStr, ShortStr, ShortStr, Timestamp,
    ShortStr, ShortStr, ShortStr, ShortStr,
];

/// Checks a basic-class content header payload: fixed fields, property
/// flags (no continuation; the basic class has 14 properties) and each
/// property present.
pub fn validate_content_header(payload: &[u8]) -> DecodeResult<()> {
    let mut r = Reader::new(payload);
    r.take(12)?; // class, weight, body size
    let flags = r.u16()?;
    if flags & 0x3 != 0 {
        return Err(DecodeError::Invalid("content header property flags"));
    }
    for (i, arg) in BASIC_PROPERTIES.iter().enumerate() {
        if flags & (1 << (15 - i)) != 0 {
            validate_one(&mut r, *arg)?;
        }
    }
    if r.remaining() != 0 {
        return Err(DecodeError::Invalid(
            "trailing bytes after content properties",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_arguments() {
        let (name, args) = client_method(method::BASIC_PUBLISH).unwrap();
        assert_eq!(name, "basic.publish");
        let ok = [0, 60, 0, 40, 0, 0, 3, b'a', b'm', b'q', 1, b'k', 3];
        assert_eq!(validate_arguments(&ok, args), Ok(()));
        assert!(validate_arguments(&ok[..ok.len() - 1], args).is_err());
        let mut trailing = ok.to_vec();
        trailing.push(0);
        assert!(validate_arguments(&trailing, args).is_err());
    }

    #[test]
    fn five_bits_pack_into_one_octet() {
        // queue.declare: short, shortstr, 5 bits, table
        let (_, args) = client_method(method::QUEUE_DECLARE).unwrap();
        let ok = [0, 50, 0, 10, 0, 0, 1, b'q', 0b0000_1000, 0, 0, 0, 0];
        assert_eq!(validate_arguments(&ok, args), Ok(()));
    }

    #[test]
    fn server_methods_and_unknown_ids_are_not_client_methods() {
        assert!(client_method(method::BASIC_DELIVER).is_none());
        assert!(client_method(method::CHANNEL_OPEN_OK).is_none());
        assert!(client_method((99, 1)).is_none());
        assert!(client_method(method::BASIC_ACK).is_some());
    }

    #[test]
    fn truncated_ack_is_invalid() {
        let (_, args) = client_method(method::BASIC_ACK).unwrap();
        assert!(validate_arguments(&[0, 60, 0, 80, 0, 0, 0], args).is_err());
        assert!(validate_arguments(&[0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 1, 0], args).is_ok());
    }

    #[test]
    fn content_header_properties() {
        // content-type "t" and delivery-mode 2
        let mut h = vec![
            0,
            60,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            5,
            0b1001_0000,
            0,
            1,
            b't',
            2,
        ];
        assert_eq!(validate_content_header(&h), Ok(()));
        h.pop();
        assert!(validate_content_header(&h).is_err());
        // headers table with a bad type tag
        let bad = [
            0,
            60,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            5,
            0b0010_0000,
            0,
            0,
            0,
            0,
            4,
            1,
            b'k',
            b'?',
            0,
        ];
        assert!(validate_content_header(&bad).is_err());
        // continuation flag set
        assert!(validate_content_header(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1]).is_err());
    }
}
