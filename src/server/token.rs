//! mio tokens: which worker owns a socket, whether it is a client or an
//! upstream connection, and its slab key (index and generation), packed so
//! the event loop routes an event without any lookup.

use crate::core::slab::{Key, GENERATION_MASK as GENERATION_MASK_U32};
use crate::core::{ClientId, ConnRef, UpstreamId};
use mio::Token;

pub const MAX_WORKERS: usize = 254;
const WORKER_SHIFT: u32 = 56;
const UPSTREAM_BIT: usize = 1 << 55;
const GENERATION_MASK: usize = GENERATION_MASK_U32 as usize;
const GENERATION_SHIFT: u32 = 24;
const INDEX_MASK: usize = (1 << 24) - 1;

/// Tokens of the event loop's own sources use worker byte 0xFF.
pub const WAKER: Token = Token(usize::MAX);
pub const SIGNALS: Token = Token(usize::MAX - 1);
pub fn listener(i: usize) -> Token {
    Token((0xFF << WORKER_SHIFT) | i)
}
pub fn listener_index(t: Token) -> Option<usize> {
    // Listeners: worker byte 0xFF and nothing between it and a small index.
    if t.0 >> WORKER_SHIFT == 0xFF && t.0 & 0x00FF_FFFF_0000_0000 == 0 {
        Some(t.0 & 0xFFFF_FFFF)
    } else {
        None
    }
}

pub fn encode(worker: usize, conn: ConnRef) -> Token {
    let (kind, key) = match conn {
        ConnRef::Client(ClientId(k)) => (0, k),
        ConnRef::Upstream(UpstreamId(k)) => (UPSTREAM_BIT, k),
    };
    Token(
        (worker << WORKER_SHIFT)
            | kind
            | ((key.generation as usize & GENERATION_MASK) << GENERATION_SHIFT)
            | (key.index as usize & INDEX_MASK),
    )
}

pub fn worker_of(t: Token) -> usize {
    t.0 >> WORKER_SHIFT
}

/// The connection a token names. Slab generations wrap within 31 bits and
/// indexes stay below 2^24 per worker, so the key round-trips exactly.
pub fn decode(t: Token) -> ConnRef {
    let key = Key {
        index: (t.0 & INDEX_MASK) as u32,
        generation: ((t.0 >> GENERATION_SHIFT) & GENERATION_MASK) as u32,
    };
    if t.0 & UPSTREAM_BIT != 0 {
        ConnRef::Upstream(UpstreamId(key))
    } else {
        ConnRef::Client(ClientId(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = Key {
            index: 77,
            generation: GENERATION_MASK_U32,
        };
        for conn in [
            ConnRef::Client(ClientId(key)),
            ConnRef::Upstream(UpstreamId(key)),
        ] {
            let t = encode(3, conn);
            assert_eq!(worker_of(t), 3);
            assert_eq!(decode(t), conn);
            assert_eq!(listener_index(t), None);
        }
        assert_eq!(listener_index(listener(2)), Some(2));
        assert_eq!(listener_index(WAKER), None);
        assert_eq!(listener_index(SIGNALS), None);
    }
}
