//! The clock: handshake and close deadlines, heartbeats on both sides,
//! upstream connect timeouts and idle upstream expiry. The shell calls
//! `tick` a few times a second; heartbeat precision is that period.

use super::Shard;
use crate::core::client::ClientState;
use crate::core::upstream::UpstreamState;
use crate::core::{Action, ClientId, ConnRef, UpstreamId, CLOSE_TIMEOUT};
use crate::protocol::constants::reply;
use crate::protocol::frame::put_heartbeat;
use crate::protocol::methods::put_close;
use std::time::{Duration, Instant};

/// How often the shell should call [`Shard::tick`].
pub const TICK: Duration = Duration::from_millis(100);

impl Shard {
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        let clients: Vec<ClientId> = self.clients.keys().map(ClientId).collect();
        for id in clients {
            self.tick_client(id, now);
        }
        self.expire_idle_channels(now);
        let upstreams: Vec<UpstreamId> = self.upstreams.keys().map(UpstreamId).collect();
        for id in upstreams {
            self.tick_upstream(id, now);
        }
    }

    fn tick_client(&mut self, id: ClientId, now: Instant) {
        let Some(c) = self.clients.get(id.0) else {
            return;
        };
        if c.state == ClientState::Closed {
            return;
        }
        if c.deadline.is_some_and(|d| now >= d) {
            if c.state == ClientState::Closing {
                log::warn!(
                    "client {}: the broker did not confirm the deletion of its exclusive queues in time",
                    c.label()
                );
                self.send_close_ok(id);
                return;
            }
            if !matches!(
                c.state,
                ClientState::ExpectCloseOk | ClientState::CloseOkSent
            ) {
                log::info!(
                    "client {}: handshake timeout in state {:?}",
                    c.label(),
                    c.state
                );
                self.stats.handshakes_timed_out += 1;
            }
            self.close_client_now(id);
            return;
        }
        let negotiated = matches!(
            c.state,
            ClientState::ExpectOpen | ClientState::ExpectUpstream | ClientState::Open
        );
        if !negotiated || c.heartbeat == 0 {
            return;
        }
        let interval = Duration::from_secs(c.heartbeat as u64);
        if now.duration_since(c.last_received) > interval * 2 {
            log::warn!("client {}: missed heartbeats, closing", c.label());
            self.close_client_now(id);
            return;
        }
        if now.duration_since(c.last_sent) >= interval / 2 {
            self.client_send(id, put_heartbeat);
        }
    }

    fn tick_upstream(&mut self, id: UpstreamId, now: Instant) {
        let Some(u) = self.upstreams.get(id.0) else {
            return;
        };
        let name = self.settings.upstream_name.clone();
        if u.deadline.is_some_and(|d| now >= d) {
            if u.state == UpstreamState::ExpectCloseOk {
                self.actions
                    .push(Action::CloseAfterFlush(ConnRef::Upstream(id)));
                if let Some(u) = self.upstreams.get_mut(id.0) {
                    u.deadline = None;
                }
                return;
            }
            let text = format!(
                "INTERNAL_ERROR - upstream broker {name} did not complete the connection within {} s",
                self.settings.upstream_connect_timeout.as_secs()
            );
            log::warn!("upstream {name}: connect timeout");
            self.fail_upstream(id, reply::INTERNAL_ERROR, &text);
            self.abandon_upstream(id);
            return;
        }
        if u.state == UpstreamState::Open && u.tune.heartbeat > 0 {
            let interval = Duration::from_secs(u.tune.heartbeat as u64);
            if now.duration_since(u.last_received) > interval * 2 {
                let text = format!("CONNECTION_FORCED - upstream broker {name} missed heartbeats");
                log::warn!("upstream {name}: missed heartbeats");
                self.fail_upstream(id, reply::CONNECTION_FORCED, &text);
                self.abandon_upstream(id);
                return;
            }
            if now.duration_since(u.last_sent) >= interval / 2 {
                self.upstream_send(id, put_heartbeat);
            }
        }
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        // Idle channels kept for reuse do not keep a connection busy.
        let busy = u.busy();
        if u.state == UpstreamState::Open {
            if busy > 0 {
                u.idle_since = None;
            } else if u.idle_since.is_none() {
                u.idle_since = Some(now);
            }
        }
        let idle_expired = u.state == UpstreamState::Open
            && busy == 0
            && u.idle_since
                .is_some_and(|t| now.duration_since(t) >= self.settings.idle_connection_timeout);
        let pool = u.pool;
        if idle_expired
            && self.idle_open_upstreams(pool) > self.settings.min_idle_connections as usize
        {
            log::info!("upstream {name}: closing idle connection");
            if let Some(p) = self.pools.get_mut(pool) {
                p.upstreams.retain(|x| *x != id);
                p.idle.retain(|i| i.upstream != id);
            }
            self.upstream_send(id, |out| put_close(out, 0, reply::SUCCESS, b"idle", (0, 0)));
            if let Some(u) = self.upstreams.get_mut(id.0) {
                u.state = UpstreamState::ExpectCloseOk;
                u.deadline = Some(now + CLOSE_TIMEOUT);
            }
            self.maybe_drop_pool(pool);
        }
    }

    /// Drops an upstream whose clients have been told: close its socket.
    fn abandon_upstream(&mut self, id: UpstreamId) {
        if let Some(u) = self.upstreams.get_mut(id.0) {
            u.state = UpstreamState::ExpectCloseOk;
            u.deadline = None;
            self.actions
                .push(Action::CloseAfterFlush(ConnRef::Upstream(id)));
        }
    }

    fn idle_open_upstreams(&self, pool: crate::core::pool::PoolId) -> usize {
        self.pools.get(pool).map_or(0, |p| {
            p.upstreams
                .iter()
                .filter(|u| {
                    self.upstreams
                        .get(u.0)
                        .is_some_and(|u| u.state == UpstreamState::Open && u.busy() == 0)
                })
                .count()
        })
    }
}
