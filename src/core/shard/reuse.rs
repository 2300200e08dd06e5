//! Channel reuse: a channel on which the client left no state is kept open
//! upstream when the client closes it (or disconnects), and handed to the
//! next Channel.Open of the same pool without an upstream round trip.
//!
//! Safety has two halves. The client side tracks what the client did since
//! Channel.Open (`leaves_no_state`); only publishes, Basic.Get with no_ack
//! and exchange/queue methods qualify. The upstream side fences: before a
//! channel joins the idle list the proxy sends Basic.Qos(0,0,false) and
//! waits for QosOk. The broker processes a channel's methods in order, so by
//! then every earlier frame has been handled and any late Channel.Close,
//! Basic.Return or GetOk for it has arrived; those are consumed here, never
//! delivered to a later client, and a Channel.Close discards the channel.

use super::Shard;
use crate::core::client::{ChannelLink, ChannelState, Publishing};
use crate::core::pool::{IdleChannel, PoolId};
use crate::core::upstream::{SlotState, UpstreamState};
use crate::core::{ClientId, UpstreamId};
use crate::protocol::constants::{class, method, reply};
use crate::protocol::methods::{
    decode_get_no_ack, put_basic_qos, put_channel_open_ok, put_close, Qos,
};
use std::time::Instant;

/// Whether a client method leaves the channel as clean as it was: only
/// Basic.Publish, Basic.Get with no_ack, exchange and queue methods, and
/// the Channel.Close itself. Everything else (confirm.select, tx.select,
/// basic.consume, basic.qos, channel.flow, a Basic.Get needing an ack,
/// acks, recover...) makes the channel unsafe for good.
pub fn leaves_no_state(id: method::Id, payload: &[u8]) -> bool {
    match id {
        method::BASIC_PUBLISH | method::CHANNEL_CLOSE => true,
        method::BASIC_GET => decode_get_no_ack(payload).unwrap_or(false),
        (class::EXCHANGE, _) | (class::QUEUE, _) => true,
        _ => false,
    }
}

/// A channel the client may hand back for reuse right now.
pub(super) fn reusable(link: &ChannelLink) -> bool {
    link.safe && link.state == ChannelState::Open && link.publishing == Publishing::Idle
}

impl Shard {
    /// Serves a Channel.Open from the pool's idle list: OpenOk at once, no
    /// upstream round trip. Returns false when there is none.
    pub(super) fn open_from_idle(
        &mut self,
        id: ClientId,
        ch: u16,
        pool: PoolId,
    ) -> Option<(UpstreamId, u16)> {
        if !self.settings.channel_reuse {
            return None;
        }
        loop {
            let Some(idle) = self.pools.get_mut(pool).and_then(|p| p.idle.pop()) else {
                self.stats.reuse_misses += 1;
                return None;
            };
            let (uid, n) = (idle.upstream, idle.channel);
            let usable = self.upstreams.get(uid.0).is_some_and(|u| {
                u.state == UpstreamState::Open
                    && u.slot(n).is_some_and(|s| s.state == SlotState::Idle)
            });
            if !usable {
                continue; // stale entry: its upstream or slot moved on
            }
            self.set_slot(uid, n, SlotState::Open, Some((id, ch)));
            if let Some(u) = self.upstreams.get_mut(uid.0) {
                u.idle_since = None;
            }
            self.stats.reuse_hits += 1;
            self.client_send(id, |out| put_channel_open_ok(out, ch));
            self.tell_if_blocked(uid, id);
            return Some((uid, n));
        }
    }

    /// Starts the fence on a safe channel whose client closed it or left.
    /// The slot becomes the proxy's until QosOk (or the broker's Close).
    pub(super) fn fence(&mut self, uid: UpstreamId, n: u16) {
        self.set_slot(uid, n, SlotState::Fencing, None);
        self.upstream_send(uid, |out| {
            put_basic_qos(
                out,
                n,
                Qos {
                    prefetch_size: 0,
                    prefetch_count: 0,
                    global: false,
                },
            )
        });
    }

    /// QosOk on a fencing channel: it is clean; keep it if the pool has room.
    pub(super) fn fence_passed(&mut self, uid: UpstreamId, n: u16) {
        let now = self.now;
        let Some(u) = self.upstreams.get(uid.0) else {
            return;
        };
        let pool = u.pool;
        let room = self
            .pools
            .get(pool)
            .is_some_and(|p| p.idle.len() < self.settings.max_idle_channels as usize);
        if !room || u.state != UpstreamState::Open {
            self.close_upstream_channel(uid, n);
            return;
        }
        self.set_slot(uid, n, SlotState::Idle, None);
        if let Some(p) = self.pools.get_mut(pool) {
            p.idle.push(IdleChannel {
                upstream: uid,
                channel: n,
                since: now,
            });
        }
        if let Some(u) = self.upstreams.get_mut(uid.0) {
            if u.busy() == 0 {
                u.idle_since = Some(now);
            }
        }
    }

    /// The broker closed a fencing or idle channel: it is discarded.
    pub(super) fn discard_reusable(&mut self, uid: UpstreamId, n: u16) {
        self.stats.reuse_discarded += 1;
        self.forget_idle(uid, |u, c| u == uid && c == n);
    }

    /// Removes idle-list entries matching `which(upstream, channel)`.
    pub(super) fn forget_idle(&mut self, uid: UpstreamId, which: impl Fn(UpstreamId, u16) -> bool) {
        let Some(pool) = self.upstreams.get(uid.0).map(|u| u.pool) else {
            return;
        };
        if let Some(p) = self.pools.get_mut(pool) {
            p.idle.retain(|i| !which(i.upstream, i.channel));
        }
    }

    /// Closes idle channels older than idle_channel_timeout.
    pub(super) fn expire_idle_channels(&mut self, now: Instant) {
        let timeout = self.settings.idle_channel_timeout;
        let mut expired = Vec::new();
        for (_, p) in self.pools.iter() {
            expired.extend(
                p.idle
                    .iter()
                    .filter(|i| now.duration_since(i.since) >= timeout)
                    .copied(),
            );
        }
        for idle in expired {
            self.forget_idle(idle.upstream, |u, c| {
                u == idle.upstream && c == idle.channel
            });
            if self
                .upstreams
                .get(idle.upstream.0)
                .and_then(|u| u.slot(idle.channel))
                .is_some_and(|s| s.state == SlotState::Idle)
            {
                self.close_upstream_channel(idle.upstream, idle.channel);
            }
        }
    }

    /// Closes an upstream channel the proxy owns; the number is busy until
    /// the broker's CloseOk.
    pub(super) fn close_upstream_channel(&mut self, uid: UpstreamId, n: u16) {
        self.upstream_send(uid, |out| {
            put_close(
                out,
                n,
                reply::SUCCESS,
                b"idle channel closed by the proxy",
                (0, 0),
            )
        });
        self.set_slot(uid, n, SlotState::Closing, None);
    }

    /// On a reused channel, an empty queue name before this client declared
    /// a queue would reach the previous client's last declared queue (the
    /// broker remembers it per channel). Answer as the broker does on a
    /// fresh channel: 404 "no previously declared queue". Returns true when
    /// refused.
    pub(super) fn previous_clients_queue(
        &mut self,
        id: ClientId,
        ch: u16,
        mid: method::Id,
        payload: &[u8],
    ) -> bool {
        // The methods that name a queue, except Queue.Declare itself.
        let uses_queue_name = super::exclusive::touches_queue(mid) && mid != method::QUEUE_DECLARE;
        if !uses_queue_name {
            return false;
        }
        let Some(link) = self.link(id, ch) else {
            return false;
        };
        if !link.reused || link.declared {
            return false;
        }
        let empty = super::exclusive::queue_of(payload).is_some_and(|q| q.is_empty());
        if empty {
            self.channel_error(
                id,
                ch,
                reply::NOT_FOUND,
                "NOT_FOUND - no previously declared queue",
                mid,
            );
        }
        empty
    }
}
