//! One shard of the proxy: the clients a worker thread owns, the upstream
//! connections their channels are multiplexed onto, and the pools. A client
//! and every upstream connection it uses live in the same shard, so channel
//! mapping needs no lock.
//!
//! The shell calls the `pub fn`s with bytes and `now`; the shard appends to
//! per-connection output buffers (listed in `dirty` when they become
//! non-empty) and queues [`Action`]s. `client_side` handles frames from
//! clients, `upstream_side` frames from the broker, `timers` the clock.

mod client_side;
mod consumers;
mod exclusive;
mod reuse;
mod timers;

pub use reuse::leaves_no_state;
pub use timers::TICK;
mod upstream_side;

use super::client::{Client, ClientState};
use super::errors::ConnectionError;
use super::outbuf::shrink_if_large;
use super::pool::{Credentials, Pool, PoolId};
use super::slab::Slab;
use super::upstream::{SlotState, Upstream, UpstreamState};
use super::{Action, ClientId, ConnRef, Settings, UpstreamId, UPSTREAM_LOW_WATER};
use crate::protocol::constants::reply;

use crate::protocol::methods::{put_close, put_close_ok};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct Shard {
    settings: Settings,
    clients: Slab<Client>,
    upstreams: Slab<Upstream>,
    pools: Slab<Pool>,
    actions: Vec<Action>,
    dirty: Vec<ConnRef>,
    now: Instant,
    stats: super::stats::Stats,
    /// Client output buffer memory of every shard sharing the budget.
    buffer_bytes: Arc<AtomicUsize>,
    /// Over budget with no client worth disconnecting: look again after.
    budget_rescan_at: Option<Instant>,
}

/// Counts for tests, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardCounts {
    pub clients: usize,
    pub upstreams: usize,
    /// Upstream connections past their handshake.
    pub open_upstreams: usize,
    pub pools: usize,
    /// Channels clients have open (their links).
    pub client_channels: usize,
    /// Upstream channel numbers in use, idle ones included.
    pub upstream_channels: usize,
    /// Reusable channels on the pools' idle lists.
    pub idle_channels: usize,
}

impl Shard {
    pub fn new(settings: Settings, now: Instant) -> Self {
        Shard {
            settings,
            clients: Slab::default(),
            upstreams: Slab::default(),
            pools: Slab::default(),
            actions: Vec::new(),
            dirty: Vec::new(),
            now,
            stats: super::stats::Stats::default(),
            buffer_bytes: Arc::default(),
            budget_rescan_at: None,
        }
    }

    /// Counts this shard's client buffers in `bytes`, shared with the
    /// other workers' shards, for `client_buffer_budget`. Call before any
    /// client connects.
    pub fn share_buffer_budget(&mut self, bytes: Arc<AtomicUsize>) {
        debug_assert!(self.clients.is_empty());
        self.buffer_bytes = bytes;
    }

    /// Client output buffer memory of every shard sharing the budget.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Applies reloadable settings (timeouts, limits) to later decisions.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Counters since the shard started.
    pub fn stats(&self) -> &super::stats::Stats {
        &self.stats
    }

    pub fn counts(&self) -> ShardCounts {
        ShardCounts {
            clients: self.clients.len(),
            upstreams: self.upstreams.len(),
            open_upstreams: self
                .upstreams
                .iter()
                .filter(|(_, u)| u.state == UpstreamState::Open)
                .count(),
            pools: self.pools.len(),
            client_channels: self.clients.iter().map(|(_, c)| c.channels.len()).sum(),
            upstream_channels: self.upstreams.iter().map(|(_, u)| u.used).sum(),
            idle_channels: self.pools.iter().map(|(_, p)| p.idle.len()).sum(),
        }
    }

    /// Whether the connection still has state here (tokens of freed slots
    /// are ignored).
    pub fn contains(&self, conn: ConnRef) -> bool {
        match conn {
            ConnRef::Client(id) => self.clients.get(id.0).is_some(),
            ConnRef::Upstream(id) => self.upstreams.get(id.0).is_some(),
        }
    }

    // ---- entry points for the shell ---------------------------------------

    pub fn client_connected(&mut self, peer: String, now: Instant) -> ClientId {
        self.now = now;
        log::debug!("client {peer} connected");
        ClientId(self.clients.insert(Client::new(peer, now, &self.settings)))
    }

    /// Bytes read from a client's socket.
    pub fn client_data(&mut self, id: ClientId, data: &[u8], now: Instant) {
        self.now = now;
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        c.last_received = now;
        if c.partial.is_empty() {
            let used = self.client_bytes(id, data);
            if let Some(c) = self.clients.get_mut(id.0) {
                if used < data.len() && !ignores_input(c.state) {
                    c.partial.extend_from_slice(&data[used..]);
                }
            }
        } else {
            let mut buf = std::mem::take(&mut c.partial);
            buf.extend_from_slice(data);
            let used = self.client_bytes(id, &buf);
            if let Some(c) = self.clients.get_mut(id.0) {
                buf.drain(..used.min(buf.len()));
                if !ignores_input(c.state) {
                    shrink_if_large(&mut buf);
                    c.partial = buf;
                }
            }
        }
        self.count_inbound(id);
    }

    /// Counts what a client's input holds (unfinished publishes, an
    /// incomplete frame) in the shared budget, and when all buffers
    /// together are past it, closes the largest ones. A client can make
    /// the proxy hold up to MAX_MESSAGE_SIZE per channel: without this,
    /// a few clients sending large publishes slowly on many channels
    /// would take all memory.
    fn count_inbound(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        if c.state != ClientState::Open {
            return;
        }
        c.inbound = c.partial.capacity()
            + c.channels
                .values()
                .map(|l| l.pending.capacity())
                .sum::<usize>();
        self.account(id);
        self.make_room(0, id);
    }

    /// Ends a backpressure pause: the frames left unparsed when it began
    /// are handled now (the socket may have nothing more to say), then the
    /// shell reads the socket again.
    fn resume_client(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        if !c.paused {
            return;
        }
        c.paused = false;
        self.actions.push(Action::Resume(id));
        if !c.partial.is_empty() {
            let now = self.now;
            self.client_data(id, &[], now);
        }
    }

    /// Whether the shell may read this client now (false while it is paused
    /// for upstream backpressure, or gone).
    pub fn client_may_read(&self, id: ClientId) -> bool {
        self.clients.get(id.0).is_some_and(|c| !c.paused)
    }

    /// The client's socket closed or failed: its channels are closed or
    /// returned upstream and its state is dropped.
    pub fn client_gone(&mut self, id: ClientId, now: Instant) {
        self.now = now;
        if let Some(c) = self.clients.get(id.0) {
            if is_live(c.state) {
                log::info!("client {} disconnected", c.label());
            }
        }
        self.release_client_channels(id);
        self.drop_client(id);
    }

    pub fn upstream_connected(&mut self, id: UpstreamId, now: Instant) {
        self.now = now;
        if let Some(u) = self.upstreams.get_mut(id.0) {
            if u.state == UpstreamState::Connecting {
                u.state = UpstreamState::ExpectStart;
                u.last_received = now;
                self.upstream_send(id, |out| {
                    out.extend_from_slice(&crate::protocol::constants::PROTOCOL_HEADER)
                });
            }
        }
    }

    /// The TCP connect failed, or the socket closed or failed later.
    pub fn upstream_gone(&mut self, id: UpstreamId, reason: &str, now: Instant) {
        self.now = now;
        let Some(u) = self.upstreams.get(id.0) else {
            return;
        };
        let name = &self.settings.upstream_name;
        let (code, text) = match u.state {
            UpstreamState::Connecting => (
                reply::INTERNAL_ERROR,
                format!("INTERNAL_ERROR - upstream broker {name} unreachable: {reason}"),
            ),
            // TCP is up but the connection never opened: TLS verification,
            // a broker that drops the handshake...
            UpstreamState::ExpectStart
            | UpstreamState::ExpectTune
            | UpstreamState::ExpectOpenOk => (
                reply::INTERNAL_ERROR,
                format!("INTERNAL_ERROR - connection to upstream broker {name} failed: {reason}"),
            ),
            UpstreamState::Open | UpstreamState::ExpectCloseOk => (
                reply::CONNECTION_FORCED,
                format!("CONNECTION_FORCED - upstream connection to {name} lost: {reason}"),
            ),
        };
        if u.state != UpstreamState::ExpectCloseOk {
            log::warn!("upstream {}: {text}", self.settings.upstream_name);
        }
        self.fail_upstream(id, code, &text);
        self.upstreams.remove(id.0);
    }

    pub fn upstream_data(&mut self, id: UpstreamId, data: &[u8], now: Instant) {
        self.now = now;
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        u.last_received = now;
        if u.partial.is_empty() {
            let used = self.upstream_bytes(id, data);
            if let Some(u) = self.upstreams.get_mut(id.0) {
                if used < data.len() {
                    u.partial.extend_from_slice(&data[used..]);
                }
            }
        } else {
            let mut buf = std::mem::take(&mut u.partial);
            buf.extend_from_slice(data);
            let used = self.upstream_bytes(id, &buf);
            if let Some(u) = self.upstreams.get_mut(id.0) {
                buf.drain(..used.min(buf.len()));
                shrink_if_large(&mut buf);
                u.partial = buf;
            }
        }
    }

    /// Output waiting for a connection's socket.
    pub fn output(&self, conn: ConnRef) -> &[u8] {
        match conn {
            ConnRef::Client(id) => self.clients.get(id.0).map_or(&[][..], |c| c.out.bytes()),
            ConnRef::Upstream(id) => self.upstreams.get(id.0).map_or(&[][..], |u| u.out.bytes()),
        }
    }

    /// The shell wrote `n` bytes of [`Shard::output`].
    pub fn output_written(&mut self, conn: ConnRef, n: usize) {
        match conn {
            ConnRef::Client(id) => {
                if let Some(c) = self.clients.get_mut(id.0) {
                    c.out.consume(n);
                    self.account(id);
                }
            }
            ConnRef::Upstream(id) => {
                let Some(u) = self.upstreams.get_mut(id.0) else {
                    return;
                };
                u.out.consume(n);
                if u.out.len() < UPSTREAM_LOW_WATER && !u.paused_clients.is_empty() {
                    for c in std::mem::take(&mut u.paused_clients) {
                        self.resume_client(c);
                    }
                }
            }
        }
    }

    /// The shell closed a socket after [`Action::CloseAfterFlush`].
    pub fn release(&mut self, conn: ConnRef) {
        match conn {
            ConnRef::Client(id) => self.drop_client(id),
            ConnRef::Upstream(id) => {
                self.fail_upstream(
                    id,
                    reply::CONNECTION_FORCED,
                    "CONNECTION_FORCED - upstream connection closed",
                );
                self.upstreams.remove(id.0);
            }
        }
    }

    pub fn take_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Connections whose output went from empty to non-empty since the last
    /// call. Output can also remain from an earlier partial write; the shell
    /// flushes those when the socket reports writable.
    pub fn take_dirty(&mut self, into: &mut Vec<ConnRef>) {
        into.append(&mut self.dirty);
    }

    pub fn upstream_credentials(&self, id: UpstreamId) -> Option<&Credentials> {
        let u = self.upstreams.get(id.0)?;
        self.pools.get(u.pool).map(|p| &p.credentials)
    }

    /// Shutdown: every client still connected gets Connection.Close with
    /// `code` and `text` (its channels are closed or returned upstream
    /// behind it, after every complete publish it sent).
    pub fn close_all_clients(&mut self, code: u16, text: &str, now: Instant) {
        self.now = now;
        let ids: Vec<ClientId> = self.clients.keys().map(ClientId).collect();
        for id in ids {
            self.fail_client(id, ConnectionError::new(code, text, (0, 0)));
        }
    }

    /// Shutdown: closes every upstream connection with Connection.Close;
    /// each is gone once the broker's CloseOk (or the close deadline) comes.
    pub fn close_all_upstreams(&mut self, now: Instant) {
        self.now = now;
        let ids: Vec<UpstreamId> = self.upstreams.keys().map(UpstreamId).collect();
        for id in ids {
            let Some(u) = self.upstreams.get(id.0) else {
                continue;
            };
            match u.state {
                UpstreamState::ExpectCloseOk => {}
                UpstreamState::Open => {
                    let pool = u.pool;
                    if let Some(p) = self.pools.get_mut(pool) {
                        p.upstreams.retain(|x| *x != id);
                        p.idle.retain(|i| i.upstream != id);
                    }
                    self.upstream_send(id, |out| {
                        put_close(out, 0, reply::SUCCESS, b"proxy shutting down", (0, 0))
                    });
                    if let Some(u) = self.upstreams.get_mut(id.0) {
                        u.state = UpstreamState::ExpectCloseOk;
                        u.deadline = Some(now + super::CLOSE_TIMEOUT);
                    }
                }
                _ => {
                    self.fail_upstream(
                        id,
                        reply::CONNECTION_FORCED,
                        "CONNECTION_FORCED - proxy shutting down",
                    );
                    if let Some(u) = self.upstreams.get_mut(id.0) {
                        u.state = UpstreamState::ExpectCloseOk;
                        u.deadline = None;
                    }
                    self.actions
                        .push(Action::CloseAfterFlush(ConnRef::Upstream(id)));
                }
            }
        }
    }

    // ---- shared helpers ---------------------------------------------------

    fn link(&self, id: ClientId, ch: u16) -> Option<&super::client::ChannelLink> {
        self.clients.get(id.0).and_then(|c| c.channels.get(&ch))
    }

    fn link_mut(&mut self, id: ClientId, ch: u16) -> Option<&mut super::client::ChannelLink> {
        self.clients
            .get_mut(id.0)
            .and_then(|c| c.channels.get_mut(&ch))
    }

    fn client_send(&mut self, id: ClientId, write: impl FnOnce(&mut Vec<u8>)) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        let was_empty = c.out.is_empty();
        write(c.out.tail());
        c.last_sent = self.now;
        if was_empty && !c.out.is_empty() {
            self.dirty.push(ConnRef::Client(id));
        }
        self.account(id);
    }

    /// Brings the shared budget up to date with a client's buffer memory
    /// (an atomic operation only when its capacity changed).
    fn account(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        let now = c.out.capacity() + c.inbound;
        if now > c.budgeted {
            self.buffer_bytes
                .fetch_add(now - c.budgeted, Ordering::Relaxed);
        } else if now < c.budgeted {
            self.buffer_bytes
                .fetch_sub(c.budgeted - now, Ordering::Relaxed);
        }
        c.budgeted = now;
    }

    fn upstream_send(&mut self, id: UpstreamId, write: impl FnOnce(&mut Vec<u8>)) {
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        let was_empty = u.out.is_empty();
        write(u.out.tail());
        u.last_sent = self.now;
        if was_empty && !u.out.is_empty() {
            self.dirty.push(ConnRef::Upstream(id));
        }
    }

    /// Closes the client's connection with an error, to that client alone.
    fn fail_client(&mut self, id: ClientId, err: ConnectionError) {
        let Some(c) = self.clients.get(id.0) else {
            return;
        };
        if !is_live(c.state) {
            return;
        }
        log::warn!(
            "client {}: closing connection: {} {}",
            c.label(),
            err.code,
            err.text
        );
        // RabbitMQ closes the socket without a word for a peer that never
        // sent a valid header, and for an authentication failure when the
        // client did not ask for authentication_failure_close.
        if !matches!(
            c.state,
            ClientState::Open | ClientState::ExpectCloseOk | ClientState::Closed
        ) {
            if matches!(err.code, reply::ACCESS_REFUSED | reply::NOT_ALLOWED) {
                self.stats.handshakes_refused += 1;
            } else {
                self.stats.handshakes_failed += 1;
            }
        }
        let silent = c.state == ClientState::ExpectProtocolHeader
            || (err.code == reply::ACCESS_REFUSED && !c.capabilities.authentication_failure_close);
        if silent {
            self.close_client_now(id);
            return;
        }
        self.release_client_channels(id);
        self.client_send(id, |out| {
            put_close(out, 0, err.code, err.text.as_bytes(), err.method)
        });
        if let Some(c) = self.clients.get_mut(id.0) {
            c.state = ClientState::ExpectCloseOk;
            c.deadline = Some(self.now + super::CLOSE_TIMEOUT);
            c.partial = Vec::new();
        }
    }

    /// Flushes what is buffered and closes the socket; the state is dropped
    /// when the shell calls `release`.
    fn close_client_now(&mut self, id: ClientId) {
        self.release_client_channels(id);
        if let Some(c) = self.clients.get_mut(id.0) {
            c.deadline = None;
            c.state = ClientState::Closed;
            c.partial = Vec::new();
            self.actions
                .push(Action::CloseAfterFlush(ConnRef::Client(id)));
        }
    }

    fn drop_client(&mut self, id: ClientId) {
        let Some(c) = self.clients.remove(id.0) else {
            return;
        };
        self.buffer_bytes.fetch_sub(c.budgeted, Ordering::Relaxed);
        if let Some(pool) = c.pool {
            if let Some(p) = self.pools.get_mut(pool) {
                p.clients -= 1;
                p.waiting.retain(|w| *w != id);
            }
            self.maybe_drop_pool(pool);
        }
    }

    /// Gives back every channel of a client: open ones are closed upstream
    /// (the number stays busy until CloseOk), broker-closed ones get the
    /// CloseOk the client never sent.
    fn release_client_channels(&mut self, id: ClientId) {
        self.release_exclusive_queues(id);
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        let links: Vec<_> = c.channels.drain().collect();
        c.inbound = 0;
        self.account(id);
        for (ch, link) in links {
            let (uid, n) = (link.upstream, link.upstream_channel);
            let fence = self.settings.channel_reuse && reuse::reusable(&link);
            self.disown_slot((id, ch), uid, n, fence, b"client closed the channel");
        }
    }

    /// The client side of an upstream channel is finished with it: the
    /// number goes back (a pending one at once, a broker-closed one with
    /// the CloseOk it is owed), an open one is closed upstream — or fenced
    /// for reuse when `fence` — and stays busy until its close handshake
    /// ends. Nothing happens unless `owner` still owns the slot.
    fn disown_slot(
        &mut self,
        owner: super::upstream::Owner,
        uid: UpstreamId,
        n: u16,
        fence: bool,
        reason: &[u8],
    ) {
        let Some(slot) = self.upstreams.get(uid.0).and_then(|u| u.slot(n)) else {
            return;
        };
        if slot.owner != Some(owner) {
            return;
        }
        match slot.state {
            SlotState::Pending => self.free_slot(uid, n),
            SlotState::Open if fence => self.fence(uid, n),
            SlotState::Opening | SlotState::Open => {
                self.upstream_send(uid, |out| put_close(out, n, reply::SUCCESS, reason, (0, 0)));
                self.set_slot(uid, n, SlotState::Closing, None);
            }
            SlotState::Closing => self.set_slot(uid, n, SlotState::Closing, None),
            // Owned by the proxy, never by a client link.
            SlotState::Fencing | SlotState::Idle => {}
            SlotState::BrokerClosing => {
                self.upstream_send(uid, |out| put_close_ok(out, n));
                self.free_slot(uid, n);
            }
        }
    }

    fn set_slot(
        &mut self,
        uid: UpstreamId,
        n: u16,
        state: SlotState,
        owner: Option<super::upstream::Owner>,
    ) {
        if let Some(s) = self.upstreams.get_mut(uid.0).and_then(|u| u.slot_mut(n)) {
            s.state = state;
            s.owner = owner;
        }
    }

    fn free_slot(&mut self, uid: UpstreamId, n: u16) {
        let now = self.now;
        if let Some(u) = self.upstreams.get_mut(uid.0) {
            u.free(n, now);
        }
    }

    /// The upstream connection is unusable: every client with a channel on
    /// it gets Connection.Close with the broker's code and text; clients that
    /// were waiting for it to authenticate get the same answer.
    fn fail_upstream(&mut self, id: UpstreamId, code: u16, text: &str) {
        let Some(u) = self.upstreams.get_mut(id.0) else {
            return;
        };
        let pool = u.pool;
        let was_open = u.state == UpstreamState::Open;
        if !was_open && u.state != UpstreamState::ExpectCloseOk {
            self.stats.upstream_connect_failures += 1;
        }
        let owners = u.owners();
        // The broker drops exclusive queues with the connection; closing
        // the owners below must not try to delete them on a channel
        // number the broker may still hold.
        u.forget_channels();
        // Clients paused on this connection must be read again, if only to
        // see their CloseOk.
        // (Not resume_client: what they left unparsed is for this
        // connection, and they are about to be closed.)
        for c in std::mem::take(&mut u.paused_clients) {
            if let Some(client) = self.clients.get_mut(c.0) {
                client.paused = false;
                self.actions.push(Action::Resume(c));
            }
        }
        if let Some(p) = self.pools.get_mut(pool) {
            p.upstreams.retain(|x| *x != id);
            p.idle.retain(|i| i.upstream != id);
        }
        for client in owners {
            // Their links to this upstream are dead; forget them first so
            // the close does not try to close channels on it.
            if let Some(c) = self.clients.get_mut(client.0) {
                c.channels.retain(|_, l| l.upstream != id);
            }
            // The broker drops exclusive queues with the connection.
            self.exclusive_released(client, |(u, _)| *u == id);
            self.fail_client(client, ConnectionError::new(code, text, (0, 0)));
        }
        if !was_open {
            let still_usable = self
                .pools
                .get(pool)
                .is_some_and(|p| !p.upstreams.is_empty());
            if !still_usable {
                let waiting = self
                    .pools
                    .get_mut(pool)
                    .map(|p| std::mem::take(&mut p.waiting))
                    .unwrap_or_default();
                for client in waiting {
                    self.fail_client(
                        client,
                        ConnectionError::new(
                            code,
                            text,
                            crate::protocol::constants::method::CONNECTION_OPEN,
                        ),
                    );
                }
            }
        }
        self.maybe_drop_pool(pool);
    }

    fn maybe_drop_pool(&mut self, pool: PoolId) {
        if self
            .pools
            .get(pool)
            .is_some_and(|p| p.clients == 0 && p.upstreams.is_empty())
        {
            self.pools.remove(pool);
        }
    }

    /// Finds or creates the pool for these credentials.
    fn pool_for(&mut self, credentials: Credentials) -> PoolId {
        if let Some((id, _)) = self
            .pools
            .iter()
            .find(|(_, p)| p.credentials.matches(&credentials))
        {
            return id;
        }
        self.pools.insert(Pool {
            credentials,
            upstreams: Vec::new(),
            waiting: Vec::new(),
            clients: 0,
            idle: Vec::new(),
        })
    }

    /// Starts a new upstream connection for a pool.
    fn open_upstream(&mut self, pool: PoolId) -> UpstreamId {
        let limit = self.settings.max_upstream_channels;
        let id = UpstreamId(self.upstreams.insert(Upstream::new(
            pool,
            self.now,
            limit,
            self.settings.upstream_connect_timeout,
        )));
        if let Some(p) = self.pools.get_mut(pool) {
            p.upstreams.push(id);
        }
        self.actions.push(Action::Connect(id));
        id
    }

    fn pool_has_open_upstream(&self, pool: PoolId) -> bool {
        self.pools.get(pool).is_some_and(|p| {
            p.upstreams.iter().any(|u| {
                self.upstreams
                    .get(u.0)
                    .is_some_and(|u| u.state == UpstreamState::Open)
            })
        })
    }
}

/// States in which the client still takes part in the protocol.
fn is_live(state: ClientState) -> bool {
    !matches!(
        state,
        ClientState::ExpectCloseOk
            | ClientState::Closing
            | ClientState::CloseOkSent
            | ClientState::Closed
    )
}

/// States in which nothing the client sends is read any more.
fn ignores_input(state: ClientState) -> bool {
    matches!(
        state,
        ClientState::Closing | ClientState::CloseOkSent | ClientState::Closed
    )
}

#[cfg(test)]
mod tests;
