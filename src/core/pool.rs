//! Pools: one per (user, password, vhost) within a shard. A pool owns the
//! list of its upstream connections and the clients waiting for one of them
//! to authenticate.

use super::slab::Key;
use super::{ClientId, UpstreamId};

/// What a client authenticated with. The password is kept only to open
/// upstream connections and to compare, in constant time, with later clients.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Vec<u8>,
    pub vhost: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "{}@{}", self.user, self.vhost)
    }
}

impl Credentials {
    /// Same user and vhost, and the same password compared without an early
    /// exit, so timing does not tell how much of a guess was right.
    pub fn matches(&self, other: &Credentials) -> bool {
        self.user == other.user
            && self.vhost == other.vhost
            && constant_time_eq(&self.password, &other.password)
    }
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

pub type PoolId = Key;

#[derive(Debug)]
pub struct Pool {
    pub credentials: Credentials,
    pub upstreams: Vec<UpstreamId>,
    /// Clients that sent Connection.Open and wait for an upstream of this
    /// pool to authenticate before they get OpenOk.
    pub waiting: Vec<ClientId>,
    /// Clients (any state) that belong to this pool; the pool is dropped
    /// when this and `upstreams` are both empty.
    pub clients: usize,
    /// Upstream channels fenced clean and ready for the next Channel.Open,
    /// most recently idled last.
    pub idle: Vec<IdleChannel>,
}

/// A reusable upstream channel: open, with no client state on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleChannel {
    pub upstream: UpstreamId,
    pub channel: u16,
    pub since: std::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_compare_all_three_parts() {
        let a = Credentials {
            user: "u".into(),
            password: b"p".to_vec(),
            vhost: "/".into(),
        };
        let mut b = a.clone();
        assert!(a.matches(&b));
        b.password = b"q".to_vec();
        assert!(!a.matches(&b));
        b.password = b"pp".to_vec();
        assert!(!a.matches(&b));
        let mut c = a.clone();
        c.vhost = "other".into();
        assert!(!a.matches(&c));
        assert_eq!(format!("{a:?}"), "u@/");
    }
}
