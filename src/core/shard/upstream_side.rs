//! Frames from the broker: the client side of the upstream handshake, and
//! relaying channel traffic back to the client that owns each channel,
//! filtered by what that client said it understands.

use super::Shard;
use crate::core::client::{ChannelState, ClientState};
use crate::core::upstream::{answer_tune, client_properties, SlotState, UpstreamState};
use crate::core::{Action, ClientId, ConnRef, UpstreamId, CLOSE_TIMEOUT};
use crate::protocol::constants::{method, reply, FRAME_BODY, FRAME_HEARTBEAT, FRAME_METHOD};
use crate::protocol::frame::{parse_frame, put_body_frames, put_frame, FrameStatus};
use crate::protocol::methods::{
    self, put_channel_open, put_channel_open_ok, put_close, put_close_ok, put_connection_open,
    put_connection_start_ok, put_tune, Close, ConnectionStart, Tune,
};
use crate::protocol::Frame;

/// Frames from the broker are parsed with at least this limit even before
/// Tune (Connection.Start with its properties is well under it).
const UPSTREAM_MIN_FRAME_LIMIT: u32 = 131072;

impl Shard {
    pub(super) fn upstream_bytes(&mut self, id: UpstreamId, buf: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(u) = self.upstreams.get(id.0) else {
                return buf.len();
            };
            let limit = u.tune.frame_max.max(UPSTREAM_MIN_FRAME_LIMIT);
            match parse_frame(&buf[pos..], limit) {
                Ok(FrameStatus::Partial) => return pos,
                Ok(FrameStatus::Complete(frame, used)) => {
                    pos += used;
                    self.stats.frames_from_upstream += 1;
                    self.upstream_frame(id, frame);
                }
                Err(e) => {
                    let text = format!("INTERNAL_ERROR - upstream protocol error: {e}");
                    log::warn!("upstream {}: {text}", self.settings.upstream_name);
                    self.close_upstream_with_error(id, reply::INTERNAL_ERROR, &text);
                    return buf.len();
                }
            }
        }
    }

    /// Fails every client on the upstream and drops its socket.
    fn close_upstream_with_error(&mut self, id: UpstreamId, code: u16, text: &str) {
        self.fail_upstream(id, code, text);
        if let Some(u) = self.upstreams.get_mut(id.0) {
            u.state = UpstreamState::ExpectCloseOk;
            u.deadline = None;
            self.actions
                .push(Action::CloseAfterFlush(ConnRef::Upstream(id)));
        }
    }

    fn upstream_frame(&mut self, id: UpstreamId, frame: Frame<'_>) {
        let Some(u) = self.upstreams.get(id.0) else {
            return;
        };
        let state = u.state;
        if frame.frame_type == FRAME_HEARTBEAT {
            return;
        }
        if frame.channel == 0 {
            let mid = frame.method_id();
            if mid == Some(method::CONNECTION_CLOSE) {
                let close = Close::decode(frame.payload);
                let (code, text) = match close {
                    Ok(c) => (
                        c.reply_code,
                        String::from_utf8_lossy(c.reply_text).into_owned(),
                    ),
                    Err(_) => (
                        reply::CONNECTION_FORCED,
                        "CONNECTION_FORCED - broker closed the connection".into(),
                    ),
                };
                log::warn!(
                    "upstream {}: broker closed the connection: {code} {text}",
                    self.settings.upstream_name
                );
                self.upstream_send(id, |out| put_close_ok(out, 0));
                self.close_upstream_with_error(id, code, &text);
                return;
            }
            if mid == Some(method::CONNECTION_CLOSE_OK) && state == UpstreamState::ExpectCloseOk {
                self.actions
                    .push(Action::CloseAfterFlush(ConnRef::Upstream(id)));
                return;
            }
        }
        match state {
            UpstreamState::ExpectStart
            | UpstreamState::ExpectTune
            | UpstreamState::ExpectOpenOk => {
                if let Err(text) = self.upstream_handshake_frame(id, state, frame) {
                    log::warn!("upstream {}: {text}", self.settings.upstream_name);
                    self.close_upstream_with_error(id, reply::INTERNAL_ERROR, &text);
                }
            }
            UpstreamState::Open => {
                if frame.channel == 0 {
                    self.upstream_channel_zero(id, frame);
                } else {
                    self.upstream_channel_frame(id, frame);
                }
            }
            UpstreamState::Connecting | UpstreamState::ExpectCloseOk => {}
        }
    }

    fn upstream_handshake_frame(
        &mut self,
        id: UpstreamId,
        state: UpstreamState,
        frame: Frame<'_>,
    ) -> Result<(), String> {
        let mid = frame.method_id();
        let bad = |e: crate::protocol::codec::DecodeError| {
            format!("INTERNAL_ERROR - bad handshake frame from the broker: {e}")
        };
        match (state, mid) {
            (UpstreamState::ExpectStart, Some(method::CONNECTION_START)) => {
                let start = ConnectionStart::decode(frame.payload).map_err(bad)?;
                if !start
                    .mechanisms
                    .split(|b| *b == b' ')
                    .any(|m| m == b"PLAIN")
                {
                    return Err(
                        "INTERNAL_ERROR - the broker does not offer the PLAIN mechanism".into(),
                    );
                }
                let Some(creds) = self.upstream_credentials(id).cloned() else {
                    return Ok(());
                };
                let name = format!(
                    "amqproxy {} pool {}@{}",
                    self.settings.listen_name, creds.user, creds.vhost
                );
                let mut response = Vec::with_capacity(2 + creds.user.len() + creds.password.len());
                response.push(0);
                response.extend_from_slice(creds.user.as_bytes());
                response.push(0);
                response.extend_from_slice(&creds.password);
                self.upstream_send(id, |out| {
                    put_connection_start_ok(out, &client_properties(&name), b"PLAIN", &response)
                });
                self.set_upstream_state(id, UpstreamState::ExpectTune);
            }
            (UpstreamState::ExpectTune, Some(method::CONNECTION_TUNE)) => {
                let tune = Tune::decode(frame.payload).map_err(bad)?;
                // The spec's frame-min-size: below it, every body would be
                // cut into tiny frames (9x the memory at 1 octet each).
                if tune.frame_max != 0 && tune.frame_max < 4096 {
                    return Err(format!(
                        "INTERNAL_ERROR - the broker's frame_max {} is below the minimum 4096",
                        tune.frame_max
                    ));
                }
                let answer = answer_tune(tune, self.settings.max_upstream_channels);
                let vhost = self
                    .upstream_credentials(id)
                    .map(|c| c.vhost.clone())
                    .unwrap_or_default();
                if let Some(u) = self.upstreams.get_mut(id.0) {
                    u.tune = answer;
                    u.channel_limit = answer.channel_max;
                    u.state = UpstreamState::ExpectOpenOk;
                }
                self.upstream_send(id, |out| {
                    put_tune(out, true, answer);
                    put_connection_open(out, vhost.as_bytes());
                });
            }
            (UpstreamState::ExpectOpenOk, Some(method::CONNECTION_OPEN_OK)) => {
                self.upstream_opened(id)
            }
            _ => {
                return Err(format!(
                "INTERNAL_ERROR - unexpected frame from the broker during the handshake: {mid:?}"
            ))
            }
        }
        Ok(())
    }

    fn set_upstream_state(&mut self, id: UpstreamId, state: UpstreamState) {
        if let Some(u) = self.upstreams.get_mut(id.0) {
            u.state = state;
        }
    }

    /// The broker accepted our credentials: clients waiting on the pool get
    /// OpenOk, channels reserved meanwhile are opened.
    fn upstream_opened(&mut self, id: UpstreamId) {
        let now = self.now;
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        u.state = UpstreamState::Open;
        u.deadline = None;
        self.stats.upstream_connects += 1;
        self.stats
            .upstream_connect_latency
            .observe(now.saturating_duration_since(u.started));
        if u.used == 0 {
            u.idle_since = Some(now);
        }
        let pool = u.pool;
        let limit = u.channel_limit as usize;
        let pending: Vec<(u16, Option<crate::core::upstream::Owner>)> = u
            .slots
            .iter()
            .enumerate()
            .filter_map(|(n, s)| {
                s.filter(|s| s.state == SlotState::Pending)
                    .map(|s| (n as u16, s.owner))
            })
            .collect();
        if let Some(creds) = self.upstream_credentials(id) {
            log::info!(
                "upstream {} opened for {creds:?}",
                self.settings.upstream_name
            );
        }
        let waiting = self
            .pools
            .get_mut(pool)
            .map(|p| std::mem::take(&mut p.waiting))
            .unwrap_or_default();
        for client in waiting {
            self.client_opened(client);
        }
        for (n, owner) in pending {
            match owner {
                Some((client, ch)) if (n as usize) <= limit => {
                    self.upstream_send(id, |out| put_channel_open(out, n));
                    self.set_slot(id, n, SlotState::Opening, Some((client, ch)));
                }
                Some((client, ch)) => {
                    self.free_slot(id, n);
                    self.channel_error(
                        client,
                        ch,
                        reply::RESOURCE_ERROR,
                        "RESOURCE_ERROR - upstream channel limit reached",
                        method::CHANNEL_OPEN,
                    );
                }
                None => self.free_slot(id, n),
            }
        }
    }

    /// A client that just got a channel on a blocked upstream connection
    /// learns it is blocked, as it would from the broker directly.
    pub(super) fn tell_if_blocked(&mut self, id: UpstreamId, client: ClientId) {
        let Some(payload) = self.upstreams.get(id.0).and_then(|u| u.blocked.clone()) else {
            return;
        };
        if self
            .clients
            .get(client.0)
            .is_some_and(|c| c.capabilities.connection_blocked)
        {
            self.client_send(client, |out| put_frame(out, FRAME_METHOD, 0, &payload));
        }
    }

    fn upstream_channel_zero(&mut self, id: UpstreamId, frame: Frame<'_>) {
        let mid = frame.method_id();
        let blocked = match mid {
            Some(method::CONNECTION_BLOCKED) => true,
            Some(method::CONNECTION_UNBLOCKED) => false,
            _ => return,
        };
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        u.blocked = blocked.then(|| frame.payload.to_vec());
        log::info!(
            "upstream {}: connection {}",
            self.settings.upstream_name,
            if blocked { "blocked" } else { "unblocked" }
        );
        for client in u.owners() {
            if self
                .clients
                .get(client.0)
                .is_some_and(|c| c.capabilities.connection_blocked && c.state == ClientState::Open)
            {
                self.client_send(client, |out| put_frame(out, FRAME_METHOD, 0, frame.payload));
            }
        }
    }

    fn upstream_channel_frame(&mut self, id: UpstreamId, frame: Frame<'_>) {
        let n = frame.channel;
        let Some(slot) = self.upstreams.get(id.0).and_then(|u| u.slot(n)) else {
            return;
        };
        let mid = if frame.frame_type == FRAME_METHOD {
            methods::method_id(frame.payload).ok()
        } else {
            None
        };
        match mid {
            Some(method::CHANNEL_OPEN_OK) => {
                match (slot.state, slot.owner) {
                    (SlotState::Opening, Some((client, ch))) => {
                        self.set_slot(id, n, SlotState::Open, slot.owner);
                        if let Some(link) = self.link_mut(client, ch) {
                            link.state = ChannelState::Open;
                        }
                        self.client_send(client, |out| put_channel_open_ok(out, ch));
                        self.tell_if_blocked(id, client);
                    }
                    (SlotState::Opening, None) => {
                        self.upstream_send(id, |out| {
                            put_close(out, n, reply::SUCCESS, b"client went away", (0, 0))
                        });
                        self.set_slot(id, n, SlotState::Closing, None);
                    }
                    _ => {}
                }
                return;
            }
            Some(method::CHANNEL_CLOSE) => {
                match (slot.state, slot.owner) {
                    (SlotState::Open | SlotState::Opening, Some((client, ch))) => {
                        self.set_slot(id, n, SlotState::BrokerClosing, slot.owner);
                        if let Some(link) = self.link_mut(client, ch) {
                            link.state = ChannelState::ClosingByServer;
                            link.pending.clear();
                            link.publishing = crate::core::client::Publishing::Idle;
                        }
                        self.client_send(client, |out| {
                            put_frame(out, FRAME_METHOD, ch, frame.payload)
                        });
                    }
                    // Our own Close crossed the broker's: both sides answer
                    // CloseOk; the number is free when the broker's arrives.
                    (SlotState::Closing, _) => self.upstream_send(id, |out| put_close_ok(out, n)),
                    // A poisoned reusable channel: consumed here, discarded.
                    (SlotState::Fencing | SlotState::Idle, _) => {
                        log::debug!("reusable channel {n} closed by the broker: discarded");
                        self.discard_reusable(id, n);
                        self.upstream_send(id, |out| put_close_ok(out, n));
                        self.free_slot(id, n);
                    }
                    _ => {
                        self.upstream_send(id, |out| put_close_ok(out, n));
                        self.free_slot(id, n);
                    }
                }
                return;
            }
            Some(method::BASIC_QOS_OK) if slot.state == SlotState::Fencing => {
                self.fence_passed(id, n);
                return;
            }
            Some(method::CHANNEL_CLOSE_OK) => {
                if slot.state == SlotState::Closing {
                    self.free_slot(id, n);
                    if let Some((client, 0)) = slot.owner {
                        self.exclusive_released(client, |r| *r == (id, n));
                    } else if let Some((client, ch)) = slot.owner {
                        let ours = self.link(client, ch).is_some_and(|l| {
                            l.upstream == id
                                && l.upstream_channel == n
                                && l.state == ChannelState::ClosingByClient
                        });
                        if ours {
                            if let Some(c) = self.clients.get_mut(client.0) {
                                c.channels.remove(&ch);
                            }
                            self.client_send(client, |out| put_close_ok(out, ch));
                        }
                    }
                }
                return;
            }
            _ => {}
        }
        // Ordinary traffic goes only to the owner of an open channel.
        let (SlotState::Open, Some((client, ch))) = (slot.state, slot.owner) else {
            return;
        };
        if mid == Some(method::BASIC_CANCEL) {
            self.consumer_ended(client, ch, frame.payload);
        }
        if mid == Some(method::BASIC_CANCEL)
            && !self
                .clients
                .get(client.0)
                .is_some_and(|c| c.capabilities.consumer_cancel_notify)
        {
            return;
        }
        match mid {
            Some(method::QUEUE_DECLARE_OK) => {
                self.exclusive_declare_ok(id, client, ch, frame.payload)
            }
            Some(method::BASIC_CONSUME_OK) => self.consumer_started(client, ch, frame.payload),
            Some(method::TX_COMMIT_OK) => {
                if let Some(link) = self.link_mut(client, ch) {
                    link.committing = false;
                }
            }
            Some(method::BASIC_CANCEL_OK) => self.consumer_ended(client, ch, frame.payload),
            _ => {}
        }
        self.forward_client(client, ch, frame);
    }

    /// Appends a broker frame to a client's output with the client's channel
    /// number, splitting bodies to the client's frame_max. A client whose
    /// buffer is past its limit, or the largest buffer when all clients
    /// together are past the budget, is disconnected as a slow consumer
    /// rather than ever making the proxy stop reading the shared connection.
    fn forward_client(&mut self, client: ClientId, ch: u16, frame: Frame<'_>) {
        let limit = self.settings.client_buffer_limit;
        let Some(c) = self.clients.get(client.0) else {
            return;
        };
        if c.state != ClientState::Open {
            return;
        }
        if c.out.len() > limit {
            self.slow_consumer(client, "client_buffer_limit");
            return;
        }
        // What the buffer would grow by: a Vec doubles when it is full.
        let (len, cap) = (c.out.len(), c.out.capacity());
        let wire = frame.payload.len() + 8;
        let growth = if len + wire > cap {
            (2 * cap).max(len + wire) - cap
        } else {
            0
        };
        if !self.make_room(growth, client) {
            return;
        }
        let Some(c) = self.clients.get(client.0) else {
            return;
        };
        let frame_max = c.frame_max as usize;
        self.client_send(client, |out| {
            if frame.frame_type == FRAME_BODY && frame.payload.len() + 8 > frame_max {
                put_body_frames(out, ch, frame.payload, frame_max as u32);
            } else {
                put_frame(out, frame.frame_type, ch, frame.payload);
            }
        });
    }
}

/// Buffers smaller than this are never chosen for the budget: they belong
/// to clients that are reading.
const BUDGET_MIN_VICTIM: usize = 64 * 1024;

impl Shard {
    /// Closes as many of the largest buffers as it takes for `growth` more
    /// bytes to fit the budget (each frees at least BUDGET_MIN_VICTIM).
    /// False when `client` itself was closed.
    pub(super) fn make_room(&mut self, growth: usize, client: ClientId) -> bool {
        while self.buffer_bytes() + growth > self.settings.client_buffer_budget
            && self.budget_rescan_at.is_none_or(|at| self.now >= at)
        {
            match self.largest_buffer() {
                Some(victim) => {
                    self.budget_victim(victim);
                    if victim == client {
                        return false;
                    }
                }
                None => self.budget_rescan_at = Some(self.now + super::TICK),
            }
        }
        true
    }

    /// Closes the client holding the largest buffer: a slow consumer, or a
    /// publisher whose unfinished messages are bigger than its output.
    fn budget_victim(&mut self, client: ClientId) {
        let Some(c) = self.clients.get_mut(client.0) else {
            return;
        };
        if c.inbound <= c.out.len() {
            self.slow_consumer(client, "client_buffer_budget");
            return;
        }
        log::warn!(
            "client {}: {} bytes of unfinished publishes, the largest buffer past client_buffer_budget",
            c.label(),
            c.inbound
        );
        self.stats.budget_publisher_disconnects += 1;
        self.fail_client(
            client,
            crate::core::errors::ConnectionError::new(
                reply::RESOURCE_ERROR,
                "RESOURCE_ERROR - proxy buffer budget exceeded by unfinished publishes",
                (0, 0),
            ),
        );
    }

    /// Disconnects a client that does not read what the broker sends it:
    /// drops its unsent deliveries (they are unacked, so they go back to
    /// their queues when the broker closes its channels) and its replies
    /// past the first KEEP_REPLIES bytes (see `OutBuf::drop_unsent`), sends
    /// Connection.Close 506 and waits briefly for CloseOk.
    pub(super) fn slow_consumer(&mut self, client: ClientId, limit: &str) {
        let Some(c) = self.clients.get_mut(client.0) else {
            return;
        };
        let unsent = c.out.len();
        let dropped = c.out.drop_unsent();
        self.stats.slow_consumer_disconnects += 1;
        log::warn!(
            "client {}: slow consumer, {unsent} bytes unsent ({limit}); {dropped} bytes of unsent frames dropped",
            c.label()
        );
        self.account(client);
        self.fail_client(
            client,
            crate::core::errors::ConnectionError::new(
                reply::RESOURCE_ERROR,
                "RESOURCE_ERROR - slow consumer",
                (0, 0),
            ),
        );
        if let Some(c) = self.clients.get_mut(client.0) {
            // It is not reading: do not wait long for its CloseOk.
            c.deadline = Some(self.now + CLOSE_TIMEOUT.min(std::time::Duration::from_millis(500)));
        }
    }

    /// The open client of this shard with the most output waiting plus
    /// input held, if any has at least [`BUDGET_MIN_VICTIM`].
    fn largest_buffer(&self) -> Option<ClientId> {
        let held = |c: &crate::core::client::Client| c.out.len() + c.inbound;
        self.clients
            .iter()
            .filter(|(_, c)| c.state == ClientState::Open && held(c) >= BUDGET_MIN_VICTIM)
            .max_by_key(|(_, c)| held(c))
            .map(|(k, _)| ClientId(k))
    }
}
