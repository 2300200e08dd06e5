//! Every error a client can cause, with the reply code the spec (and
//! RabbitMQ's behaviour) gives it. One place, so the mapping is reviewed
//! and tested as a whole.

use crate::protocol::codec::DecodeError;
use crate::protocol::constants::{method, reply};
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

/// Well-formed methods that RabbitMQ answers with a *connection* error.
/// Forwarding them would close the shared upstream connection for every
/// client on it, so the proxy answers them itself, to that client alone.
pub fn hard_error_for(id: method::Id, payload: &[u8]) -> Option<ConnectionError> {
    use crate::protocol::methods::{decode_flow_active, Publish, Qos};
    match id {
        method::BASIC_PUBLISH => match Publish::decode(payload) {
            Ok(p) if p.immediate => Some(ConnectionError::not_implemented("immediate=true", id)),
            Ok(_) => None,
            Err(e) => Some(ConnectionError::syntax(e, id)),
        },
        method::BASIC_QOS => match Qos::decode(payload) {
            Ok(q) if q.prefetch_size != 0 => {
                Some(ConnectionError::not_implemented("prefetch_size!=0", id))
            }
            Ok(_) => None,
            Err(e) => Some(ConnectionError::syntax(e, id)),
        },
        method::CHANNEL_FLOW => match decode_flow_active(payload) {
            Ok(false) => Some(ConnectionError::not_implemented("active=false", id)),
            Ok(true) => None,
            Err(e) => Some(ConnectionError::syntax(e, id)),
        },
        method::CONNECTION_UPDATE_SECRET => Some(ConnectionError::not_implemented(
            "connection.update-secret is not supported by the proxy",
            id,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::methods::{put_basic_qos, Qos};

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
