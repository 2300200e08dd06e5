//! Every error a client can cause, with the reply code the spec (and
//! RabbitMQ's behaviour) gives it. One place, so the mapping is reviewed
//! and tested as a whole.

use crate::protocol::codec::DecodeError;
use crate::protocol::constants::{method, reply};
use crate::protocol::table::{FieldTable, FieldValue};
use crate::protocol::FrameError;

/// An error that closes the client's connection (never the shared upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionError {
    pub code: u16,
    pub text: String,
    /// The method that caused it, `(0, 0)` when not a method.
    pub method: method::Id,
}

impl ConnectionError {
    pub fn new(code: u16, text: impl Into<String>, method: method::Id) -> Self {
        ConnectionError {
            code,
            text: text.into(),
            method,
        }
    }

    pub fn frame(e: FrameError) -> Self {
        Self::new(reply::FRAME_ERROR, e.to_string(), (0, 0))
    }

    pub fn syntax(e: DecodeError, method: method::Id) -> Self {
        Self::new(reply::SYNTAX_ERROR, format!("SYNTAX_ERROR - {e}"), method)
    }

    pub fn unexpected_frame(text: &str, method: method::Id) -> Self {
        Self::new(
            reply::UNEXPECTED_FRAME,
            format!("UNEXPECTED_FRAME - {text}"),
            method,
        )
    }

    pub fn channel(text: String, method: method::Id) -> Self {
        Self::new(
            reply::CHANNEL_ERROR,
            format!("CHANNEL_ERROR - {text}"),
            method,
        )
    }

    pub fn command_invalid(text: String, method: method::Id) -> Self {
        Self::new(
            reply::COMMAND_INVALID,
            format!("COMMAND_INVALID - {text}"),
            method,
        )
    }

    pub fn not_allowed(text: String, method: method::Id) -> Self {
        Self::new(reply::NOT_ALLOWED, format!("NOT_ALLOWED - {text}"), method)
    }

    pub fn not_implemented(text: &str, method: method::Id) -> Self {
        Self::new(
            reply::NOT_IMPLEMENTED,
            format!("NOT_IMPLEMENTED - {text}"),
            method,
        )
    }
}

/// Exchange types every RabbitMQ has. Plugin types (x-delayed-message,
/// x-consistent-hash, ...) exist only where the plugin is enabled, so they
/// are allowed only when configured (`exchange_types`): any type the broker
/// lacks makes RabbitMQ close the whole connection (503), so the proxy
/// refuses it itself. Passive declares do not check the type, as on the
/// broker.
pub const BUILTIN_EXCHANGE_TYPES: &[&[u8]] = &[b"direct", b"fanout", b"topic", b"headers"];

fn exchange_type_known(kind: &[u8], plugin_types: &[String]) -> bool {
    BUILTIN_EXCHANGE_TYPES.contains(&kind) || plugin_types.iter().any(|t| t.as_bytes() == kind)
}

/// Checks a method from a client before anything is forwarded: it must be
/// a method clients may send (503 otherwise), its arguments must parse
/// exactly (502), and it must not be one of the well-formed methods that
/// RabbitMQ answers with a *connection* error — forwarding those would
/// close the shared upstream connection for every client on it, so the
/// proxy answers them itself, to that client alone. This is the one list
/// of such errors.
pub fn check_client_method(
    id: method::Id,
    payload: &[u8],
    plugin_exchange_types: &[String],
) -> Result<(), ConnectionError> {
    use crate::protocol::methods::{decode_flow_active, Publish, Qos};
    use crate::protocol::spec;
    let Some((name, args)) = spec::client_method(id) else {
        return Err(ConnectionError::command_invalid(
            format!(
                "unknown method or one a client may not send: class {} method {}",
                id.0, id.1
            ),
            id,
        ));
    };
    spec::validate_arguments(payload, args).map_err(|e| {
        ConnectionError::new(
            reply::SYNTAX_ERROR,
            format!("SYNTAX_ERROR - {name}: {e}"),
            id,
        )
    })?;
    let syntax = |e| ConnectionError::syntax(e, id);
    match id {
        method::BASIC_PUBLISH if Publish::decode(payload).map_err(syntax)?.immediate => {
            Err(ConnectionError::not_implemented("immediate=true", id))
        }
        method::BASIC_QOS if Qos::decode(payload).map_err(syntax)?.prefetch_size != 0 => {
            Err(ConnectionError::not_implemented("prefetch_size!=0", id))
        }
        method::CHANNEL_FLOW if !decode_flow_active(payload).map_err(syntax)? => {
            Err(ConnectionError::not_implemented("active=false", id))
        }
        method::BASIC_RECOVER | method::BASIC_RECOVER_ASYNC
            if payload.get(4).is_some_and(|bits| bits & 1 == 0) =>
        {
            Err(ConnectionError::not_implemented("requeue=false", id))
        }
        method::EXCHANGE_DECLARE => {
            let mut r = crate::protocol::methods::arguments(payload);
            let _ticket = r.u16().map_err(syntax)?;
            let _exchange = r.shortstr().map_err(syntax)?;
            let kind = r.shortstr().map_err(syntax)?;
            let passive = r.u8().map_err(syntax)? & 1 != 0;
            if passive {
                return Ok(());
            }
            let unknown = |kind: &[u8]| {
                ConnectionError::command_invalid(
                    format!(
                    "unknown exchange type '{}' (the proxy allows direct, fanout, topic, headers and \
                     the plugin types in its exchange_types setting)",
                    String::from_utf8_lossy(kind)
                ),
                    id,
                )
            };
            if !exchange_type_known(kind, plugin_exchange_types) {
                return Err(unknown(kind));
            }
            // The delayed-message plugin checks its x-delayed-type argument
            // the same way, with the same connection error.
            if kind == b"x-delayed-message" {
                let table = FieldTable::read(&mut r).map_err(syntax)?;
                if let Some(FieldValue::LongStr(inner)) = table.get("x-delayed-type") {
                    if !exchange_type_known(inner, plugin_exchange_types)
                        || inner.as_slice() == b"x-delayed-message"
                    {
                        return Err(unknown(inner));
                    }
                }
            }
            Ok(())
        }
        method::CONNECTION_UPDATE_SECRET => Err(ConnectionError::not_implemented(
            "connection.update-secret is not supported by the proxy",
            id,
        )),
        _ => Ok(()),
    }
}

/// A channel-level refusal: the proxy closes only that client channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRefusal {
    pub code: u16,
    pub text: String,
}

/// Well-formed methods whose arguments crash RabbitMQ's channel process
/// (which it reports as a *connection* error, 541) instead of the 406 it
/// gives for the same mistake elsewhere. The proxy answers them with that
/// 406 on the client's channel.
pub fn check_channel_method(id: method::Id, payload: &[u8]) -> Option<ChannelRefusal> {
    let refuse = |text: String| {
        Some(ChannelRefusal {
            code: reply::PRECONDITION_FAILED,
            text,
        })
    };
    match id {
        method::QUEUE_DECLARE => {
            let mut r = crate::protocol::methods::arguments(payload);
            r.u16().ok()?;
            let name = r.shortstr().ok()?;
            let passive = r.u8().ok()? & 1 != 0;
            if passive {
                return None;
            }
            let args = FieldTable::read(&mut r).ok()?;
            // A server-named queue with an unknown x-queue-type.
            let server_named = name.iter().all(|b| *b == b'\r' || *b == b'\n');
            if server_named {
                match args.get("x-queue-type") {
                    None => {}
                    Some(FieldValue::LongStr(t)) if [&b"classic"[..], b"quorum", b"stream"].contains(&t.as_slice()) => {}
                    Some(other) => {
                        return refuse(format!(
                            "PRECONDITION_FAILED - invalid arg 'x-queue-type' for a server-named queue: {other:?}"
                        ))
                    }
                }
            }
            match args.get("x-max-age") {
                Some(FieldValue::LongStr(v)) if !starts_with_digit(v) => refuse(format!(
                    "PRECONDITION_FAILED - invalid arg 'x-max-age': {:?}",
                    String::from_utf8_lossy(v)
                )),
                _ => None,
            }
        }
        method::BASIC_CONSUME => {
            let mut r = crate::protocol::methods::arguments(payload);
            r.u16().ok()?;
            r.shortstr().ok()?;
            r.shortstr().ok()?;
            r.u8().ok()?;
            let args = FieldTable::read(&mut r).ok()?;
            match args.get("x-stream-offset") {
                Some(FieldValue::LongStr(v))
                    if !starts_with_digit(v)
                        && ![&b"first"[..], b"last", b"next"].contains(&v.as_slice()) =>
                {
                    refuse(format!(
                        "PRECONDITION_FAILED - invalid arg 'x-stream-offset': {:?}",
                        String::from_utf8_lossy(v)
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn starts_with_digit(v: &[u8]) -> bool {
    v.first().is_some_and(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::methods::{put_basic_qos, Qos};

    fn hard_error_for(id: method::Id, payload: &[u8]) -> Option<ConnectionError> {
        check_client_method(id, payload, &["x-delayed-message".to_string()]).err()
    }

    fn exchange_declare(kind: &[u8], passive: bool) -> Vec<u8> {
        let mut p = vec![0, 40, 0, 10, 0, 0, 1, b'x', kind.len() as u8];
        p.extend_from_slice(kind);
        p.extend_from_slice(&[passive as u8, 0, 0, 0, 0]);
        p
    }

    #[test]
    fn unknown_exchange_type_is_503_unless_passive() {
        assert_eq!(
            hard_error_for(method::EXCHANGE_DECLARE, &exchange_declare(b"nope", false))
                .unwrap()
                .code,
            503
        );
        assert!(
            hard_error_for(method::EXCHANGE_DECLARE, &exchange_declare(b"nope", true)).is_none()
        );
        assert!(
            hard_error_for(method::EXCHANGE_DECLARE, &exchange_declare(b"topic", false)).is_none()
        );
    }

    #[test]
    fn unknown_and_server_only_methods_are_503_truncated_is_502() {
        assert_eq!(hard_error_for((99, 1), &[0, 99, 0, 1]).unwrap().code, 503);
        assert_eq!(
            hard_error_for(method::BASIC_DELIVER, &[0, 60, 0, 60])
                .unwrap()
                .code,
            503
        );
        assert_eq!(
            hard_error_for(method::BASIC_ACK, &[0, 60, 0, 80, 0, 0, 0])
                .unwrap()
                .code,
            502
        );
    }

    fn table(entries: &[(&str, FieldValue)]) -> Vec<u8> {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k, v.clone());
        }
        let mut out = Vec::new();
        t.write(&mut out);
        out
    }

    #[test]
    fn arguments_that_crash_rabbitmq_channels_are_refused_with_406() {
        let declare = |name: &[u8], args: &[u8]| {
            let mut p = vec![0, 50, 0, 10, 0, 0, name.len() as u8];
            p.extend_from_slice(name);
            p.push(0);
            p.extend_from_slice(args);
            p
        };
        let bad_type = table(&[("x-queue-type", crate::protocol::table::string("foo"))]);
        assert_eq!(
            check_channel_method(method::QUEUE_DECLARE, &declare(b"", &bad_type))
                .unwrap()
                .code,
            406
        );
        assert!(
            check_channel_method(method::QUEUE_DECLARE, &declare(b"named", &bad_type)).is_none()
        );
        let quorum = table(&[("x-queue-type", crate::protocol::table::string("quorum"))]);
        assert!(check_channel_method(method::QUEUE_DECLARE, &declare(b"", &quorum)).is_none());
        let age = table(&[("x-max-age", crate::protocol::table::string("abc"))]);
        assert_eq!(
            check_channel_method(method::QUEUE_DECLARE, &declare(b"q", &age))
                .unwrap()
                .code,
            406
        );
        let age = table(&[("x-max-age", crate::protocol::table::string("7D"))]);
        assert!(check_channel_method(method::QUEUE_DECLARE, &declare(b"q", &age)).is_none());
        let consume = |args: &[u8]| {
            let mut p = vec![0, 60, 0, 20, 0, 0, 1, b'q', 0, 0];
            p.extend_from_slice(args);
            p
        };
        let offset = table(&[("x-stream-offset", crate::protocol::table::string("D"))]);
        assert_eq!(
            check_channel_method(method::BASIC_CONSUME, &consume(&offset))
                .unwrap()
                .code,
            406
        );
        let offset = table(&[("x-stream-offset", crate::protocol::table::string("first"))]);
        assert!(check_channel_method(method::BASIC_CONSUME, &consume(&offset)).is_none());
    }

    #[test]
    fn delayed_message_exchange_checks_its_inner_type() {
        let declare = |inner: &str| {
            let mut p = exchange_declare(b"x-delayed-message", false);
            p.truncate(p.len() - 4);
            p.extend_from_slice(&table(&[(
                "x-delayed-type",
                crate::protocol::table::string(inner),
            )]));
            p
        };
        assert!(hard_error_for(method::EXCHANGE_DECLARE, &declare("direct")).is_none());
        assert_eq!(
            hard_error_for(method::EXCHANGE_DECLARE, &declare("bogus"))
                .unwrap()
                .code,
            503
        );
    }

    #[test]
    fn recover_without_requeue_is_540() {
        assert_eq!(
            hard_error_for(method::BASIC_RECOVER_ASYNC, &[0, 60, 0, 100, 0])
                .unwrap()
                .code,
            540
        );
        assert_eq!(
            hard_error_for(method::BASIC_RECOVER, &[0, 60, 0, 110, 0])
                .unwrap()
                .code,
            540
        );
        assert!(hard_error_for(method::BASIC_RECOVER, &[0, 60, 0, 110, 1]).is_none());
    }

    #[test]
    fn publish_immediate_is_540() {
        let payload = [0, 60, 0, 40, 0, 0, 0, 1, b'q', 2];
        let e = hard_error_for(method::BASIC_PUBLISH, &payload).unwrap();
        assert_eq!(e.code, reply::NOT_IMPLEMENTED);
        assert!(
            hard_error_for(method::BASIC_PUBLISH, &[0, 60, 0, 40, 0, 0, 0, 1, b'q', 1]).is_none()
        );
    }

    #[test]
    fn qos_prefetch_size_is_540() {
        let mut out = Vec::new();
        put_basic_qos(
            &mut out,
            1,
            Qos {
                prefetch_size: 10,
                prefetch_count: 0,
                global: false,
            },
        );
        let payload = &out[7..out.len() - 1];
        assert_eq!(
            hard_error_for(method::BASIC_QOS, payload).unwrap().code,
            540
        );
    }

    #[test]
    fn flow_off_is_540_flow_on_is_fine() {
        assert_eq!(
            hard_error_for(method::CHANNEL_FLOW, &[0, 20, 0, 20, 0])
                .unwrap()
                .code,
            540
        );
        assert!(hard_error_for(method::CHANNEL_FLOW, &[0, 20, 0, 20, 1]).is_none());
    }
}
