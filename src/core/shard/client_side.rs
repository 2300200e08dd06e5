//! Frames from clients: the server side of the handshake, channel open and
//! close, validation, publish assembly and forwarding upstream.

use super::reuse::{leaves_no_state, reusable};
use super::Shard;
use crate::core::client::{
    self, capabilities_of, connection_name, negotiate, ChannelLink, ChannelState, ClientState,
    Publishing,
};
use crate::core::errors::{check_channel_method, check_client_method, ConnectionError};
use crate::core::pool::Credentials;
use crate::core::upstream::{Slot, SlotState, UpstreamState};
use crate::core::{ClientId, UpstreamId, MAX_MESSAGE_SIZE, UPSTREAM_HIGH_WATER};
use crate::protocol::constants::{
    class, method, reply, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
    PROTOCOL_HEADER_0_9,
};
use crate::protocol::frame::{parse_frame, put_body_frames, put_frame, FrameStatus};
use crate::protocol::methods::{
    self, put_channel_open, put_close, put_close_ok, put_connection_open_ok, put_connection_start,
    put_tune, ContentHeader, StartOk, Tune,
};
use crate::protocol::Frame;

impl Shard {
    /// Processes every complete frame at the front of `buf`; returns how many
    /// bytes were used. Stops early once the client is closing.
    pub(super) fn client_bytes(&mut self, id: ClientId, buf: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(c) = self.clients.get(id.0) else {
                return buf.len();
            };
            let state = c.state;
            let frame_max = c.frame_max;
            // After Connection.Close was sent, frames are still read so
            // the client's CloseOk is seen; once closed, nothing is.
            if super::ignores_input(state) {
                return buf.len();
            }
            if state == ClientState::ExpectProtocolHeader {
                if buf.len() - pos < 8 {
                    return pos;
                }
                self.client_protocol_header(id, &buf[pos..pos + 8]);
                pos += 8;
                continue;
            }
            // Paused for a full upstream: the rest waits, unparsed, until
            // it drains (one read at most).
            if c.paused {
                return pos;
            }
            match parse_frame(&buf[pos..], frame_max) {
                Ok(FrameStatus::Partial) => return pos,
                Ok(FrameStatus::Complete(frame, used)) => {
                    if self.publish_must_wait(id, &frame) {
                        return pos;
                    }
                    pos += used;
                    self.stats.frames_from_clients += 1;
                    if let Err(e) = self.client_frame(id, frame) {
                        self.fail_client(id, e);
                        return buf.len();
                    }
                }
                Err(e) => {
                    self.fail_client(id, ConnectionError::frame(e));
                    return buf.len();
                }
            }
        }
    }

    /// A Basic.Publish, or the content of one, for an upstream connection
    /// already past its high-water mark: the client is paused before the
    /// frame, so while the broker is not reading (a memory alarm, a stall)
    /// the proxy takes no more messages, and a message being assembled
    /// (counted in the buffer budget) is not completed into the upstream
    /// output (which is not).
    fn publish_must_wait(&mut self, id: ClientId, frame: &Frame<'_>) -> bool {
        if frame.channel == 0 {
            return false;
        }
        let publishing = match frame.frame_type {
            FRAME_METHOD => methods::method_id(frame.payload).ok() == Some(method::BASIC_PUBLISH),
            FRAME_HEADER | FRAME_BODY => true,
            _ => false,
        };
        if !publishing {
            return false;
        }
        let Some(link) = self.link(id, frame.channel) else {
            return false;
        };
        if link.state != ChannelState::Open {
            return false;
        }
        let uid = link.upstream;
        let Some(u) = self.upstreams.get_mut(uid.0) else {
            return false;
        };
        if u.out.len() < UPSTREAM_HIGH_WATER {
            return false;
        }
        let Some(c) = self.clients.get_mut(id.0) else {
            return false;
        };
        if c.state != ClientState::Open {
            return false;
        }
        c.paused = true;
        self.stats.backpressure_pauses += 1;
        u.paused_clients.push(id);
        true
    }

    fn client_protocol_header(&mut self, id: ClientId, header: &[u8]) {
        if header == PROTOCOL_HEADER || header == PROTOCOL_HEADER_0_9 {
            self.client_send(id, |out| {
                put_connection_start(
                    out,
                    &client::server_properties(),
                    b"PLAIN AMQPLAIN",
                    b"en_US",
                )
            });
            if let Some(c) = self.clients.get_mut(id.0) {
                c.state = ClientState::ExpectStartOk;
            }
        } else {
            // The spec: answer with the header we do speak, then close.
            self.client_send(id, |out| out.extend_from_slice(&PROTOCOL_HEADER));
            if let Some(c) = self.clients.get(id.0) {
                log::info!(
                    "client {}: bad protocol header {:?}",
                    c.label(),
                    String::from_utf8_lossy(header)
                );
            }
            self.close_client_now(id);
        }
    }

    fn client_frame(&mut self, id: ClientId, frame: Frame<'_>) -> Result<(), ConnectionError> {
        let Some(c) = self.clients.get(id.0) else {
            return Ok(());
        };
        let state = c.state;
        // RabbitMQ's `unknown_frame`: a heartbeat carries nothing, and a
        // method frame holds at least its class and method ids.
        if (frame.frame_type == FRAME_HEARTBEAT && !frame.payload.is_empty())
            || (frame.frame_type == FRAME_METHOD && frame.payload.len() < 4)
        {
            return Err(ConnectionError::new(
                reply::FRAME_ERROR,
                format!(
                    "FRAME_ERROR - type {}, {} payload octets: malformed frame",
                    frame.frame_type,
                    frame.payload.len()
                ),
                (0, 0),
            ));
        }
        if frame.frame_type == FRAME_HEARTBEAT {
            if frame.channel != 0 {
                return Err(ConnectionError::new(
                    reply::UNEXPECTED_FRAME,
                    format!(
                        "UNEXPECTED_FRAME - heartbeat frame on channel {}",
                        frame.channel
                    ),
                    (0, 0),
                ));
            }
            return Ok(());
        }
        match state {
            ClientState::Open => self.client_open_frame(id, frame),
            ClientState::ExpectStartOk | ClientState::ExpectTuneOk | ClientState::ExpectOpen => {
                self.client_handshake_frame(id, state, frame)
            }
            ClientState::ExpectUpstream => match frame.method_id() {
                Some(method::CONNECTION_CLOSE) if frame.channel == 0 => {
                    self.client_connection_close(id);
                    Ok(())
                }
                _ => Err(ConnectionError::unexpected_frame(
                    "frame received before connection.open-ok",
                    frame.method_id().unwrap_or((0, 0)),
                )),
            },
            ClientState::ExpectCloseOk => {
                if frame.channel == 0
                    && matches!(
                        frame.method_id(),
                        Some(method::CONNECTION_CLOSE_OK | method::CONNECTION_CLOSE)
                    )
                {
                    if frame.method_id() == Some(method::CONNECTION_CLOSE) {
                        self.client_send(id, |out| put_close_ok(out, 0));
                    }
                    self.close_client_now(id);
                }
                Ok(())
            }
            ClientState::ExpectProtocolHeader
            | ClientState::Closing
            | ClientState::CloseOkSent
            | ClientState::Closed => Ok(()),
        }
    }

    fn client_handshake_frame(
        &mut self,
        id: ClientId,
        state: ClientState,
        frame: Frame<'_>,
    ) -> Result<(), ConnectionError> {
        let expected = match state {
            ClientState::ExpectStartOk => method::CONNECTION_START_OK,
            ClientState::ExpectTuneOk => method::CONNECTION_TUNE_OK,
            _ => method::CONNECTION_OPEN,
        };
        let got = frame.method_id();
        if got == Some(method::CONNECTION_CLOSE) && frame.channel == 0 {
            self.client_connection_close(id);
            return Ok(());
        }
        if frame.channel != 0 || got != Some(expected) {
            return Err(ConnectionError::command_invalid(
                format!("expected method {expected:?} on channel 0 during the handshake"),
                got.unwrap_or((0, 0)),
            ));
        }
        let settings = &self.settings;
        let offer = Tune {
            channel_max: settings.channel_max,
            frame_max: settings.frame_max,
            heartbeat: settings.heartbeat,
        };
        match state {
            ClientState::ExpectStartOk => {
                let start_ok = StartOk::decode(frame.payload)
                    .map_err(|e| ConnectionError::syntax(e, expected))?;
                let caps = capabilities_of(&start_ok.client_properties);
                let name = connection_name(&start_ok.client_properties);
                let credentials = client::parse_credentials(start_ok.mechanism, start_ok.response);
                if let Some(c) = self.clients.get_mut(id.0) {
                    c.capabilities = caps;
                    c.name = name;
                }
                let (user, password) = credentials?;
                if let Some(c) = self.clients.get_mut(id.0) {
                    c.credentials = Some(Credentials {
                        user,
                        password,
                        vhost: String::new(),
                    });
                    c.state = ClientState::ExpectTuneOk;
                }
                self.client_send(id, |out| put_tune(out, false, offer));
            }
            ClientState::ExpectTuneOk => {
                let answer = Tune::decode(frame.payload)
                    .map_err(|e| ConnectionError::syntax(e, expected))?;
                let tune = negotiate(offer, answer)?;
                if let Some(c) = self.clients.get_mut(id.0) {
                    c.frame_max = tune.frame_max;
                    c.channel_max = tune.channel_max;
                    c.heartbeat = tune.heartbeat;
                    c.state = ClientState::ExpectOpen;
                }
            }
            _ => {
                let vhost = methods::decode_open_vhost(frame.payload)
                    .map_err(|e| ConnectionError::syntax(e, expected))?;
                let vhost = client::vhost_of(vhost)?;
                self.client_connection_open(id, vhost);
            }
        }
        Ok(())
    }

    /// Connection.Open: OpenOk only once an upstream connection with the
    /// same credentials is authenticated.
    fn client_connection_open(&mut self, id: ClientId, vhost: String) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        let Some(mut credentials) = c.credentials.take() else {
            return;
        };
        credentials.vhost = vhost;
        let pool = self.pool_for(credentials);
        if let Some(p) = self.pools.get_mut(pool) {
            p.clients += 1;
        }
        if let Some(c) = self.clients.get_mut(id.0) {
            c.pool = Some(pool);
        }
        if self.pool_has_open_upstream(pool) {
            self.client_opened(id);
            return;
        }
        if let Some(c) = self.clients.get_mut(id.0) {
            c.state = ClientState::ExpectUpstream;
        }
        let connecting = self
            .pools
            .get(pool)
            .is_some_and(|p| !p.upstreams.is_empty());
        if let Some(p) = self.pools.get_mut(pool) {
            p.waiting.push(id);
        }
        if !connecting {
            self.open_upstream(pool);
        }
    }

    /// Sends OpenOk: the session is now open.
    pub(super) fn client_opened(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        // A client closed meanwhile (timeout, error) must not be reopened.
        if !matches!(
            c.state,
            ClientState::ExpectOpen | ClientState::ExpectUpstream
        ) {
            return;
        }
        c.state = ClientState::Open;
        c.deadline = None;
        self.stats.handshakes_ok += 1;
        log::info!("client {} connected", c.label());
        self.client_send(id, put_connection_open_ok);
    }

    /// Connection.Close from the client: its channels are closed upstream;
    /// it gets CloseOk at once, or once the broker has deleted its
    /// exclusive queues.
    fn client_connection_close(&mut self, id: ClientId) {
        self.release_client_channels(id);
        let now = self.now;
        let Some(c) = self.clients.get_mut(id.0) else {
            return;
        };
        log::info!("client {} closed the connection", c.label());
        c.partial = Vec::new();
        if c.releasing.is_empty() {
            self.send_close_ok(id);
        } else {
            // CloseOk once the broker has deleted its exclusive queues.
            c.state = ClientState::Closing;
            c.deadline = Some(now + crate::core::CLOSE_TIMEOUT);
        }
    }

    /// Answers a client's Connection.Close and waits for it to close the
    /// socket (the peer that sent Close does, once it has CloseOk; closing
    /// first makes some clients report an error after a clean close).
    pub(super) fn send_close_ok(&mut self, id: ClientId) {
        self.client_send(id, |out| put_close_ok(out, 0));
        let now = self.now;
        if let Some(c) = self.clients.get_mut(id.0) {
            c.state = ClientState::CloseOkSent;
            c.deadline = Some(now + crate::core::CLOSE_TIMEOUT);
            c.releasing.clear();
        }
    }

    fn client_open_frame(&mut self, id: ClientId, frame: Frame<'_>) -> Result<(), ConnectionError> {
        let ch = frame.channel;
        if ch == 0 {
            return self.client_channel_zero(id, frame);
        }
        let method_id = if frame.frame_type == FRAME_METHOD {
            Some(
                methods::method_id(frame.payload)
                    .map_err(|e| ConnectionError::syntax(e, (0, 0)))?,
            )
        } else {
            None
        };
        let Some(c) = self.clients.get(id.0) else {
            return Ok(());
        };
        let link_state = c.channels.get(&ch).map(|l| l.state);
        if method_id == Some(method::CHANNEL_OPEN) {
            if link_state.is_some() {
                return Err(ConnectionError::channel(
                    format!("second 'channel.open' seen on channel {ch}"),
                    method::CHANNEL_OPEN,
                ));
            }
            // As RabbitMQ: a channel beyond the negotiated channel_max is
            // NOT_ALLOWED, and never reaches the broker.
            if ch > c.channel_max || c.channels.len() >= c.channel_max as usize {
                return Err(ConnectionError::not_allowed(
                    format!(
                        "channel {ch}: number of channels opened ({}) has reached the negotiated channel_max ({})",
                        c.channels.len(),
                        c.channel_max
                    ),
                    method::CHANNEL_OPEN,
                ));
            }
            check_client_method(method::CHANNEL_OPEN, frame.payload, &[])?;
            return self.client_channel_open(id, ch);
        }
        let Some(link_state) = link_state else {
            // A Close for a channel that is already closed (e.g. a client
            // that pipelined two) is answered as RabbitMQ does, with CloseOk.
            if method_id == Some(method::CHANNEL_CLOSE) {
                self.client_send(id, |out| put_close_ok(out, ch));
                return Ok(());
            }
            return Err(ConnectionError::channel(
                format!("expected 'channel.open' on channel {ch}"),
                method_id.unwrap_or((0, 0)),
            ));
        };
        match link_state {
            ChannelState::ClosingByServer => {
                match method_id {
                    Some(method::CHANNEL_CLOSE_OK) => self.client_channel_close_ok(id, ch),
                    // Both sides closed at once: answer as the broker would.
                    Some(method::CHANNEL_CLOSE) => {
                        self.client_send(id, |out| put_close_ok(out, ch))
                    }
                    // Everything else is dropped until the client's CloseOk.
                    _ => {}
                }
                Ok(())
            }
            // The client already sent Close; it must wait for CloseOk.
            ChannelState::ClosingByClient => {
                if method_id == Some(method::CHANNEL_CLOSE) {
                    // A second Close: RabbitMQ answers each one.
                    self.client_send(id, |out| put_close_ok(out, ch));
                }
                Ok(())
            }
            ChannelState::Opening | ChannelState::Open => {
                self.client_channel_frame(id, frame, method_id)
            }
        }
    }

    fn client_channel_zero(
        &mut self,
        id: ClientId,
        frame: Frame<'_>,
    ) -> Result<(), ConnectionError> {
        if frame.frame_type != FRAME_METHOD {
            return Err(ConnectionError::unexpected_frame(
                "content frame on channel 0",
                (0, 0),
            ));
        }
        let id_ =
            methods::method_id(frame.payload).map_err(|e| ConnectionError::syntax(e, (0, 0)))?;
        match id_ {
            // A handshake method again, or one only servers send: RabbitMQ's
            // "unexpected method in connection state running".
            method::CONNECTION_START
            | method::CONNECTION_START_OK
            | method::CONNECTION_SECURE
            | method::CONNECTION_SECURE_OK
            | method::CONNECTION_TUNE
            | method::CONNECTION_TUNE_OK
            | method::CONNECTION_OPEN
            | method::CONNECTION_OPEN_OK
            | method::CONNECTION_BLOCKED
            | method::CONNECTION_UNBLOCKED => {
                return Err(ConnectionError::channel(
                    format!("unexpected method {id_:?} in connection state running"),
                    id_,
                ))
            }
            method::CONNECTION_UPDATE_SECRET => {
                return Err(ConnectionError::new(
                    reply::NOT_IMPLEMENTED,
                    "NOT_IMPLEMENTED - connection.update-secret: the upstream connection is shared, its credentials are the pool's",
                    id_,
                ))
            }
            _ => {}
        }
        check_client_method(id_, frame.payload, &self.settings.exchange_types)?;
        match id_ {
            method::CONNECTION_CLOSE => {
                self.client_connection_close(id);
                Ok(())
            }
            // Unsolicited CloseOk: nothing to close.
            method::CONNECTION_CLOSE_OK => Ok(()),
            (class::CONNECTION, _) => Err(ConnectionError::command_invalid(
                format!("unexpected connection method {id_:?} on an open connection"),
                id_,
            )),
            _ => Err(ConnectionError::channel(
                format!("method {id_:?} on channel 0, which is reserved for connection methods"),
                id_,
            )),
        }
    }

    fn client_channel_open(&mut self, id: ClientId, ch: u16) -> Result<(), ConnectionError> {
        let Some(pool) = self.clients.get(id.0).and_then(|c| c.pool) else {
            return Ok(());
        };
        if let Some((uid, n)) = self.open_from_idle(id, ch, pool) {
            self.insert_link(id, ch, uid, n, ChannelState::Open);
            return Ok(());
        }
        let owner = Some((id, ch));
        let upstreams = self
            .pools
            .get(pool)
            .map(|p| p.upstreams.clone())
            .unwrap_or_default();
        // Prefer an open connection with room; then one still connecting;
        // else open a new one. Channels are packed onto few connections.
        let mut choice: Option<(UpstreamId, u16, SlotState)> = None;
        for want_open in [true, false] {
            for &uid in &upstreams {
                let Some(u) = self.upstreams.get_mut(uid.0) else {
                    continue;
                };
                let open = u.state == UpstreamState::Open;
                if open != want_open || (!open && u.state == UpstreamState::ExpectCloseOk) {
                    continue;
                }
                let state = if open {
                    SlotState::Opening
                } else {
                    SlotState::Pending
                };
                if let Some(n) = u.allocate(Slot { state, owner }) {
                    choice = Some((uid, n, state));
                    break;
                }
            }
            if choice.is_some() {
                break;
            }
        }
        let (uid, n, state) = match choice {
            Some(c) => c,
            None => {
                let uid = self.open_upstream(pool);
                let n = self
                    .upstreams
                    .get_mut(uid.0)
                    .and_then(|u| {
                        u.allocate(Slot {
                            state: SlotState::Pending,
                            owner,
                        })
                    })
                    .ok_or_else(|| {
                        ConnectionError::new(
                            reply::RESOURCE_ERROR,
                            "RESOURCE_ERROR - no upstream channel available",
                            method::CHANNEL_OPEN,
                        )
                    })?;
                (uid, n, SlotState::Pending)
            }
        };
        if state == SlotState::Opening {
            self.upstream_send(uid, |out| put_channel_open(out, n));
        }
        self.insert_link(id, ch, uid, n, ChannelState::Opening);
        Ok(())
    }

    fn insert_link(&mut self, id: ClientId, ch: u16, uid: UpstreamId, n: u16, state: ChannelState) {
        if let Some(c) = self.clients.get_mut(id.0) {
            c.channels.insert(
                ch,
                ChannelLink {
                    upstream: uid,
                    upstream_channel: n,
                    state,
                    publishing: Publishing::Idle,
                    pending: Vec::new(),
                    declares: Default::default(),
                    consumer_tags: Default::default(),
                    safe: true,
                    reused: state == ChannelState::Open,
                    declared: false,
                    committing: false,
                    consumes: Default::default(),
                },
            );
        }
    }

    fn client_channel_close_ok(&mut self, id: ClientId, ch: u16) {
        let Some(link) = self
            .clients
            .get_mut(id.0)
            .and_then(|c| c.channels.remove(&ch))
        else {
            return;
        };
        let (uid, n) = (link.upstream, link.upstream_channel);
        let Some(slot) = self.upstreams.get(uid.0).and_then(|u| u.slot(n)) else {
            return;
        };
        if slot.owner != Some((id, ch)) {
            return;
        }
        match slot.state {
            SlotState::BrokerClosing => {
                self.upstream_send(uid, |out| put_close_ok(out, n));
                self.free_slot(uid, n);
            }
            // A close the proxy started: the upstream side finishes alone.
            _ => self.set_slot(uid, n, slot.state, None),
        }
    }

    /// A frame on an open channel: validate, then forward (publishes whole).
    fn client_channel_frame(
        &mut self,
        id: ClientId,
        frame: Frame<'_>,
        method_id: Option<method::Id>,
    ) -> Result<(), ConnectionError> {
        let ch = frame.channel;
        let Some(c) = self.clients.get_mut(id.0) else {
            return Ok(());
        };
        let Some(link) = c.channels.get_mut(&ch) else {
            return Ok(());
        };
        let (uid, n) = (link.upstream, link.upstream_channel);
        let Some(u) = self.upstreams.get(uid.0) else {
            return Ok(());
        };
        if u.state != UpstreamState::Open {
            return Err(ConnectionError::unexpected_frame(
                "frame on a channel whose upstream connection is still opening",
                method_id.unwrap_or((0, 0)),
            ));
        }
        let upstream_frame_max = u.tune.frame_max;
        if frame.frame_type != FRAME_BODY && frame.payload.len() + 8 > upstream_frame_max as usize {
            // Bodies are re-split; methods and headers cannot be.
            return Err(ConnectionError::new(
                reply::FRAME_ERROR,
                format!(
                    "FRAME_ERROR - frame of {} bytes exceeds the broker's frame_max {upstream_frame_max}",
                    frame.payload.len() + 8
                ),
                method_id.unwrap_or((0, 0)),
            ));
        }
        if link.committing && method_id != Some(method::CHANNEL_CLOSE) {
            return Err(ConnectionError::channel(
                "unexpected command while processing 'tx.commit'".into(),
                method_id.unwrap_or((0, 0)),
            ));
        }
        match frame.frame_type {
            FRAME_METHOD => {
                let mid = method_id.unwrap_or((0, 0));
                if link.publishing != Publishing::Idle {
                    return Err(ConnectionError::unexpected_frame(
                        &format!("expected content header for class 60, got method {mid:?}"),
                        mid,
                    ));
                }
                check_client_method(mid, frame.payload, &self.settings.exchange_types)?;
                if let Some(refusal) = check_channel_method(mid, frame.payload) {
                    self.channel_error(id, ch, refusal.code, &refusal.text, mid);
                    return Ok(());
                }
                if self.previous_clients_queue(id, ch, mid, frame.payload) {
                    return Ok(());
                }
                if self.exclusive_refused(id, ch, mid, frame.payload) {
                    return Ok(());
                }
                self.check_consumer_tags(id, ch, mid, frame.payload)?;
                let Some(link) = self
                    .clients
                    .get_mut(id.0)
                    .and_then(|c| c.channels.get_mut(&ch))
                else {
                    return Ok(());
                };
                if !leaves_no_state(mid, frame.payload) {
                    link.safe = false;
                }
                match mid {
                    method::TX_COMMIT => link.committing = true,
                    method::QUEUE_DECLARE => link.declared = true,
                    _ => {}
                }
                match mid {
                    (class::CONNECTION, _) => {
                        return Err(ConnectionError::command_invalid(
                            format!("connection method {mid:?} on channel {ch}"),
                            mid,
                        ))
                    }
                    method::CHANNEL_CLOSE_OK => return Ok(()), // unsolicited: keep the mapping
                    method::BASIC_PUBLISH => {
                        link.publishing = Publishing::ExpectHeader;
                        put_frame(&mut link.pending, FRAME_METHOD, n, frame.payload);
                        return Ok(());
                    }
                    method::CHANNEL_CLOSE => {
                        let reuse = self.settings.channel_reuse
                            && reusable(link)
                            && self
                                .upstreams
                                .get(uid.0)
                                .and_then(|u| u.slot(n))
                                .is_some_and(|s| s.state == SlotState::Open);
                        if reuse {
                            // CloseOk at once; the upstream channel is fenced
                            // and kept for the next client.
                            if let Some(c) = self.clients.get_mut(id.0) {
                                c.channels.remove(&ch);
                            }
                            self.client_send(id, |out| put_close_ok(out, ch));
                            self.fence(uid, n);
                            return Ok(());
                        }
                        link.state = ChannelState::ClosingByClient;
                        self.set_slot(uid, n, SlotState::Closing, Some((id, ch)));
                    }
                    _ => {}
                }
                self.forward_upstream(id, uid, |out| {
                    put_frame(out, FRAME_METHOD, n, frame.payload)
                });
            }
            FRAME_HEADER => {
                if link.publishing != Publishing::ExpectHeader {
                    return Err(ConnectionError::unexpected_frame(
                        "content header without a content method",
                        (0, 0),
                    ));
                }
                let header = ContentHeader::decode(frame.payload)
                    .map_err(|e| ConnectionError::syntax(e, method::BASIC_PUBLISH))?;
                if header.weight != 0 {
                    return Err(ConnectionError::unexpected_frame(
                        "content header with a non-zero weight",
                        method::BASIC_PUBLISH,
                    ));
                }
                if header.class_id == class::BASIC {
                    crate::protocol::spec::validate_content_header(frame.payload)
                        .map_err(|e| ConnectionError::syntax(e, method::BASIC_PUBLISH))?;
                }
                if header.class_id != class::BASIC {
                    return Err(ConnectionError::unexpected_frame(
                        "content header for a class other than basic",
                        method::BASIC_PUBLISH,
                    ));
                }
                if header.body_size > MAX_MESSAGE_SIZE {
                    link.pending.clear();
                    link.publishing = Publishing::Idle;
                    self.channel_error(
                        id,
                        ch,
                        reply::PRECONDITION_FAILED,
                        &format!(
                            "PRECONDITION_FAILED - message size {} is larger than configured max size {MAX_MESSAGE_SIZE}",
                            header.body_size
                        ),
                        method::BASIC_PUBLISH,
                    );
                    return Ok(());
                }
                put_frame(&mut link.pending, FRAME_HEADER, n, frame.payload);
                link.publishing = Publishing::ExpectBody {
                    remaining: header.body_size,
                };
                if header.body_size == 0 {
                    self.publish_complete(id, ch);
                }
            }
            FRAME_BODY => {
                let Publishing::ExpectBody { remaining } = link.publishing else {
                    return Err(ConnectionError::unexpected_frame(
                        "content body without a content header",
                        (0, 0),
                    ));
                };
                let len = frame.payload.len() as u64;
                if len > remaining {
                    return Err(ConnectionError::unexpected_frame(
                        "content body larger than the size in its header",
                        method::BASIC_PUBLISH,
                    ));
                }
                if frame.payload.len() + 8 > upstream_frame_max as usize {
                    put_body_frames(&mut link.pending, n, frame.payload, upstream_frame_max);
                } else {
                    put_frame(&mut link.pending, FRAME_BODY, n, frame.payload);
                }
                link.publishing = Publishing::ExpectBody {
                    remaining: remaining - len,
                };
                if remaining == len {
                    self.publish_complete(id, ch);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The whole message is here: send method, header and body upstream
    /// together, so the shared connection never carries a partial message.
    fn publish_complete(&mut self, id: ClientId, ch: u16) {
        self.stats.messages_published += 1;
        let Some(link) = self.link_mut(id, ch) else {
            return;
        };
        link.publishing = Publishing::Idle;
        let mut pending = std::mem::take(&mut link.pending);
        let uid = link.upstream;
        // When nothing else is queued upstream (the common case: output is
        // flushed after every batch), hand the assembled buffer over instead
        // of copying it; the channel keeps the old, empty one.
        self.forward_upstream(id, uid, |out| {
            if out.is_empty() {
                std::mem::swap(out, &mut pending);
            } else {
                out.extend_from_slice(&pending);
            }
        });
        pending.clear();
        // Kept for the next publish unless large: it counts in the budget.
        if pending.capacity() > 64 * 1024 {
            pending = Vec::new();
        }
        if let Some(link) = self.link_mut(id, ch) {
            link.pending = pending;
        }
    }

    /// Appends to an upstream's output on behalf of a client, pausing that
    /// client when the upstream is over its high-water mark.
    fn forward_upstream(
        &mut self,
        client: ClientId,
        uid: UpstreamId,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        self.upstream_send(uid, write);
        let Some(u) = self.upstreams.get_mut(uid.0) else {
            return;
        };
        if u.out.len() >= UPSTREAM_HIGH_WATER {
            if let Some(c) = self.clients.get_mut(client.0) {
                if !c.paused {
                    c.paused = true;
                    self.stats.backpressure_pauses += 1;
                    u.paused_clients.push(client);
                }
            }
        }
    }

    /// Closes one client channel with a channel-level error the proxy
    /// detected itself; the upstream channel is closed behind it.
    pub(super) fn channel_error(
        &mut self,
        id: ClientId,
        ch: u16,
        code: u16,
        text: &str,
        failing: method::Id,
    ) {
        let Some(link) = self.link_mut(id, ch) else {
            return;
        };
        link.state = ChannelState::ClosingByServer;
        link.pending.clear();
        link.publishing = Publishing::Idle;
        let (uid, n) = (link.upstream, link.upstream_channel);
        self.client_send(id, |out| put_close(out, ch, code, text.as_bytes(), failing));
        self.disown_slot((id, ch), uid, n, false, b"closed by the proxy");
    }
}
