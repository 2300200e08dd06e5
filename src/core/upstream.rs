//! An upstream connection: the proxy acting as an AMQP client towards the
//! broker, and the table of upstream channel numbers it hands out.
//!
//! Invariant: a channel number stays in `slots` from the moment it is handed
//! out until its close handshake with the broker has finished, so it is
//! never reused early and a Close is never sent for a closed channel.

use super::pool::PoolId;
use super::ClientId;
use crate::protocol::methods::Tune;
use crate::protocol::table::{string, FieldTable, FieldValue};
use std::time::Instant;

/// RabbitMQ's default channel_max, assumed for a connection whose Tune has
/// not arrived yet.
pub const ASSUMED_BROKER_CHANNEL_MAX: u16 = 2047;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// TCP connect in progress.
    Connecting,
    ExpectStart,
    ExpectTune,
    ExpectOpenOk,
    Open,
    /// We sent Connection.Close; waiting for CloseOk.
    ExpectCloseOk,
}

/// Who an upstream channel belongs to: a client and its channel number.
pub type Owner = (ClientId, u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Reserved while the connection is not open yet; Channel.Open is sent
    /// when it opens.
    Pending,
    /// Channel.Open sent, OpenOk not yet received.
    Opening,
    Open,
    /// We sent Channel.Close; the number is busy until CloseOk.
    Closing,
    /// The broker sent Channel.Close; we owe it CloseOk once the client
    /// has answered.
    BrokerClosing,
    /// A safe channel its client closed: the proxy sent Basic.Qos(0,0,false)
    /// and waits for QosOk, consuming anything that arrives before it.
    Fencing,
    /// Fenced clean; on the pool's idle list for the next client.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub state: SlotState,
    /// `None` once the client is gone: the proxy finishes the close itself.
    pub owner: Option<Owner>,
}

#[derive(Debug)]
pub struct Upstream {
    pub pool: PoolId,
    pub state: UpstreamState,
    /// Negotiated with the broker; until Tune, the limits we will ask for.
    pub tune: Tune,
    /// Effective channel limit: min(broker channel_max, max_upstream_channels).
    pub channel_limit: u16,
    /// Indexed by upstream channel number; index 0 is never used.
    pub slots: Vec<Option<Slot>>,
    /// Every slot in 1..free_hint is taken: the search for the lowest
    /// free number starts here (a scan from 1 cost O(channels) per open).
    free_hint: usize,
    pub used: usize,
    pub partial: Vec<u8>,
    pub out: super::outbuf::OutBuf,
    pub last_received: Instant,
    pub last_sent: Instant,
    /// Connect/handshake or close deadline.
    pub deadline: Option<Instant>,
    /// When it last became channel-less; idle connections close after
    /// idle_connection_timeout.
    pub idle_since: Option<Instant>,
    /// Clients whose reading is paused until `out` drains.
    pub paused_clients: Vec<ClientId>,
    /// The broker's Connection.Blocked payload while it is in force, so a
    /// client that gets a channel here later is told too.
    pub blocked: Option<Vec<u8>>,
    /// When the connection was started (for the connect latency metric).
    pub started: Instant,
    /// Exclusive queues declared through this connection, by owner.
    pub exclusive: std::collections::HashMap<Vec<u8>, ClientId>,
}

impl Upstream {
    pub fn new(
        pool: PoolId,
        now: Instant,
        channel_limit: u16,
        connect_timeout: std::time::Duration,
    ) -> Self {
        Upstream {
            pool,
            state: UpstreamState::Connecting,
            tune: Tune {
                channel_max: channel_limit,
                frame_max: 131072,
                heartbeat: 0,
            },
            channel_limit,
            slots: Vec::new(),
            free_hint: 1,
            used: 0,
            partial: Vec::new(),
            out: super::outbuf::OutBuf::new(),
            last_received: now,
            last_sent: now,
            deadline: Some(now + connect_timeout),
            idle_since: None,
            paused_clients: Vec::new(),
            blocked: None,
            started: now,
            exclusive: std::collections::HashMap::new(),
        }
    }

    pub fn has_room(&self) -> bool {
        // Until the broker's Tune tells its channel_max, assume RabbitMQ's
        // default: channels queued beyond it would have to be refused when
        // the connection opens; instead a further connection takes them.
        let limit = if self.state == UpstreamState::Open {
            self.channel_limit
        } else {
            self.channel_limit.min(ASSUMED_BROKER_CHANNEL_MAX)
        };
        self.state != UpstreamState::ExpectCloseOk && self.used < limit as usize
    }

    /// Hands out the lowest free channel number.
    pub fn allocate(&mut self, slot: Slot) -> Option<u16> {
        if !self.has_room() {
            return None;
        }
        let from = self.free_hint.max(1);
        let free = (from..self.slots.len()).find(|&n| self.slots[n].is_none());
        let n = match free {
            Some(n) => n,
            None => {
                if self.slots.is_empty() {
                    self.slots.push(None);
                }
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if n > self.channel_limit as usize {
            return None;
        }
        self.slots[n] = Some(slot);
        self.free_hint = n + 1;
        self.used += 1;
        self.idle_since = None;
        Some(n as u16)
    }

    pub fn slot(&self, n: u16) -> Option<Slot> {
        self.slots.get(n as usize).copied().flatten()
    }

    pub fn slot_mut(&mut self, n: u16) -> Option<&mut Slot> {
        self.slots.get_mut(n as usize).and_then(|s| s.as_mut())
    }

    /// The connection is unusable: no channel, and no exclusive queue, of
    /// it is ours any more.
    pub fn forget_channels(&mut self) {
        self.slots.clear();
        self.free_hint = 1;
        self.used = 0;
        self.exclusive.clear();
    }

    /// Frees a channel number once its close handshake is complete.
    pub fn free(&mut self, n: u16, now: Instant) {
        if let Some(s) = self.slots.get_mut(n as usize) {
            if s.take().is_some() {
                self.free_hint = self.free_hint.min(n as usize);
                self.used -= 1;
                if self.used == 0 {
                    self.idle_since = Some(now);
                }
            }
        }
    }

    /// Channels in use by clients (or closing), as opposed to idle ones
    /// kept for reuse: an upstream with no busy channel is idle.
    pub fn busy(&self) -> usize {
        self.used
            - self
                .slots
                .iter()
                .flatten()
                .filter(|s| s.state == SlotState::Idle)
                .count()
    }

    /// Distinct clients with a channel here.
    pub fn owners(&self) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = self
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.owner.map(|o| o.0))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The client properties the proxy sends upstream: every capability, on
/// behalf of all clients (the proxy filters per client what they did not
/// ask for), and a connection name that says which proxy pool this is.
pub fn client_properties(connection_name: &str) -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        caps.insert(cap, FieldValue::Bool(true));
    }
    let mut props = FieldTable::default();
    props.insert("product", string("AMQProxy"));
    props.insert("version", string(env!("CARGO_PKG_VERSION")));
    props.insert("platform", string("Rust"));
    props.insert("capabilities", FieldValue::Table(caps));
    props.insert("connection_name", string(connection_name));
    props
}

/// Our TuneOk to the broker's Tune: accept its frame_max and heartbeat,
/// and its channel_max capped by our own limit (0 means "no limit").
pub fn answer_tune(broker: Tune, max_upstream_channels: u16) -> Tune {
    let broker_channels = if broker.channel_max == 0 {
        u16::MAX
    } else {
        broker.channel_max
    };
    let frame_max = if broker.frame_max == 0 {
        131072
    } else {
        broker.frame_max
    };
    Tune {
        channel_max: broker_channels.min(max_upstream_channels),
        frame_max,
        heartbeat: broker.heartbeat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::slab::Key;

    fn upstream(limit: u16) -> Upstream {
        Upstream::new(
            Key {
                index: 0,
                generation: 0,
            },
            Instant::now(),
            limit,
            std::time::Duration::from_secs(1),
        )
    }

    #[test]
    fn allocation_is_lowest_free_and_bounded() {
        let mut u = upstream(3);
        let slot = Slot {
            state: SlotState::Open,
            owner: None,
        };
        assert_eq!(u.allocate(slot), Some(1));
        assert_eq!(u.allocate(slot), Some(2));
        assert_eq!(u.allocate(slot), Some(3));
        assert_eq!(u.allocate(slot), None);
        u.free(2, Instant::now());
        assert_eq!(u.allocate(slot), Some(2));
    }

    #[test]
    fn allocation_matches_a_lowest_free_model_under_random_churn() {
        let mut u = upstream(300);
        u.state = UpstreamState::Open;
        let slot = Slot {
            state: SlotState::Open,
            owner: None,
        };
        let mut model = [false; 301]; // model[n]: n taken
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 == 0 {
                let n = 1 + (x >> 8) as usize % 300;
                u.free(n as u16, Instant::now());
                model[n] = false;
            } else {
                let want = (1..=300).find(|&n| !model[n]);
                assert_eq!(u.allocate(slot).map(usize::from), want);
                if let Some(n) = want {
                    model[n] = true;
                }
            }
        }
    }

    #[test]
    fn a_connecting_upstream_takes_no_more_than_the_assumed_channel_max() {
        let mut u = upstream(u16::MAX);
        let slot = Slot {
            state: SlotState::Pending,
            owner: None,
        };
        for _ in 0..ASSUMED_BROKER_CHANNEL_MAX {
            assert!(u.allocate(slot).is_some());
        }
        assert_eq!(u.allocate(slot), None);
        u.state = UpstreamState::Open;
        assert!(u.allocate(slot).is_some());
    }

    #[test]
    fn freeing_the_last_channel_starts_the_idle_clock() {
        let mut u = upstream(3);
        let n = u
            .allocate(Slot {
                state: SlotState::Open,
                owner: None,
            })
            .unwrap();
        assert!(u.idle_since.is_none());
        u.free(n, Instant::now());
        assert!(u.idle_since.is_some());
        u.free(n, Instant::now());
        assert_eq!(u.used, 0);
    }

    #[test]
    fn tune_answer_caps_channels() {
        let t = answer_tune(
            Tune {
                channel_max: 2047,
                frame_max: 131072,
                heartbeat: 60,
            },
            3,
        );
        assert_eq!(
            t,
            Tune {
                channel_max: 3,
                frame_max: 131072,
                heartbeat: 60
            }
        );
        let t = answer_tune(
            Tune {
                channel_max: 0,
                frame_max: 0,
                heartbeat: 0,
            },
            u16::MAX,
        );
        assert_eq!(t.channel_max, u16::MAX);
    }
}
