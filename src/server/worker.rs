//! A worker thread: owns one shard of the core and the sockets of its
//! connections. It reads sockets the event loop reports ready, feeds the
//! bytes to the shard, carries out the shard's actions (connect, close,
//! resume a paused client) and writes the shard's output.
//!
//! Reads go through one scratch buffer per worker; only a frame split
//! across reads is copied into the connection's own buffer, so idle
//! connections hold no buffers.

use super::control::{self, Control};
use super::net;
use super::token;
use super::Shared;
use crate::core::{Action, ConnRef, Settings, Shard, UpstreamId};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token, Waker};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Capacity of each worker's queue from the event loop.
const QUEUE_CAPACITY: usize = 16 * 1024;
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads per socket per turn before other sockets get theirs.
const READS_PER_TURN: usize = 8;
/// Upstream addresses are resolved again after this long.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    pub error: bool,
}

pub enum WorkerMsg {
    /// An accepted client, with the TLS configuration of its listener.
    Accept(TcpStream, SocketAddr, Option<Arc<rustls::ServerConfig>>),
    Ready(Token, Ready),
}

pub struct WorkerHandle {
    sender: Sender<WorkerMsg>,
    pub control: Arc<Control>,
    /// Set by the loop when this worker's queue was full; the worker clears
    /// it and wakes the loop once it has taken messages off the queue.
    backlogged: Arc<AtomicBool>,
    _thread: std::thread::JoinHandle<()>,
}

impl WorkerHandle {
    pub fn send(&self, msg: WorkerMsg) -> Result<(), TrySendError<WorkerMsg>> {
        self.sender.try_send(msg)
    }

    pub fn set_backlogged(&self) {
        self.backlogged.store(true, Ordering::Release);
    }
}

/// The TLS client configuration and server name for `amqps://` upstreams.
pub type UpstreamTls = Option<(
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
)>;

/// Everything a worker starts with.
pub struct Setup {
    pub index: usize,
    pub settings: Settings,
    /// `host:port` of the broker.
    pub upstream: String,
    pub upstream_tls: UpstreamTls,
    pub registry: Registry,
    pub waker: Arc<Waker>,
    pub shared: Arc<Shared>,
}

pub fn spawn(setup: Setup) -> io::Result<WorkerHandle> {
    let (sender, receiver) = crossbeam_channel::bounded(QUEUE_CAPACITY);
    let backlogged = Arc::new(AtomicBool::new(false));
    let flag = backlogged.clone();
    let control = Arc::new(Control::default());
    let worker_control = control.clone();
    let thread = std::thread::Builder::new()
        .name(format!("worker-{}", setup.index))
        .spawn(move || {
            let waker = setup.waker.clone();
            let mut worker = Worker::new(setup, worker_control);
            worker.run(receiver, &flag, &waker);
        })?;
    Ok(WorkerHandle {
        sender,
        control,
        backlogged,
        _thread: thread,
    })
}

struct Socket {
    /// The connection this socket belongs to, generation included: a slot
    /// index is reused, so every lookup checks the whole key.
    conn: ConnRef,
    stream: TcpStream,
    /// Upstream TCP connect still in progress.
    connecting: bool,
    /// TLS session over `stream`, for amqps on either side.
    tls: Option<Box<rustls::Connection>>,
    /// While connecting upstream: the addresses still to try.
    other_addrs: Vec<SocketAddr>,
}

impl Socket {
    fn plain(conn: ConnRef, stream: TcpStream, connecting: bool) -> Self {
        Socket {
            conn,
            stream,
            connecting,
            tls: None,
            other_addrs: Vec::new(),
        }
    }

    /// Reads plaintext: straight from the socket, or through TLS (reading
    /// records until some plaintext is available). Ok(0) is end of stream;
    /// WouldBlock means nothing more for now.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: the peer sent close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Send the alert that explains it, then fail.
                let _ = tls.write_tls(&mut self.stream);
                return Err(io::Error::other(super::tls::describe(&e)));
            }
            // Handshake messages, alerts, key updates.
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Writes pending TLS records to the socket until it would block.
    fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes plaintext: to the socket, or into TLS (which takes what fits
    /// its buffer) followed by as many records as the socket accepts.
    fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.stream.write(data);
        }
        self.flush_tls()?;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        if tls.wants_write() {
            // The socket is full; the writable event brings us back.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = tls.writer().write(data)?;
        self.flush_tls()?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

struct Worker {
    index: usize,
    shard: Shard,
    upstream: String,
    upstream_tls: UpstreamTls,
    resolved: Option<(Instant, Vec<SocketAddr>)>,
    registry: Registry,
    shared: Arc<Shared>,
    clients: Vec<Option<Socket>>,
    upstreams: Vec<Option<Socket>>,
    scratch: Vec<u8>,
    /// Sockets with bytes left to read (budget spent, or resumed).
    pending_reads: VecDeque<ConnRef>,
    io: crate::metrics::IoCounts,
    control: Arc<Control>,
    /// Shutdown steps already taken.
    clients_closed: bool,
    upstreams_closed: bool,
    /// Reused between turns so the steady state allocates nothing.
    dirty: Vec<ConnRef>,
    actions: Vec<Action>,
}

impl Worker {
    fn new(setup: Setup, control: Arc<Control>) -> Self {
        Worker {
            index: setup.index,
            shard: {
                let mut shard = Shard::new(setup.settings, Instant::now());
                shard.share_buffer_budget(setup.shared.client_buffer_bytes.clone());
                shard
            },
            upstream: setup.upstream,
            upstream_tls: setup.upstream_tls,
            resolved: None,
            registry: setup.registry,
            shared: setup.shared,
            clients: Vec::new(),
            upstreams: Vec::new(),
            scratch: vec![0; SCRATCH_SIZE],
            pending_reads: VecDeque::new(),
            io: Default::default(),
            control,
            clients_closed: false,
            upstreams_closed: false,
            dirty: Vec::new(),
            actions: Vec::new(),
        }
    }

    fn run(&mut self, receiver: Receiver<WorkerMsg>, backlogged: &AtomicBool, waker: &Waker) {
        let mut next_tick = Instant::now() + crate::core::shard::TICK;
        loop {
            let now = Instant::now();
            let timeout = if self.pending_reads.is_empty() {
                next_tick.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            match receiver.recv_timeout(timeout) {
                Ok(msg) => {
                    self.handle(msg);
                    // Take what else is queued, bounded so timers still run.
                    for _ in 0..1024 {
                        match receiver.try_recv() {
                            Ok(msg) => self.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if backlogged.swap(false, Ordering::AcqRel) {
                // The loop holds events for us that did not fit; there is
                // room now.
                if let Err(e) = waker.wake() {
                    log::error!("cannot wake the event loop: {e}");
                }
            }
            for _ in 0..self.pending_reads.len() {
                if let Some(conn) = self.pending_reads.pop_front() {
                    self.read(conn);
                }
            }
            if let Some(settings) = self.control.take_settings() {
                self.shard.set_settings(settings);
            }
            if let Some(tls) = self.control.take_upstream_tls() {
                self.upstream_tls = tls;
            }
            let now = Instant::now();
            if self.control.phase() != control::RUNNING && self.shut_down_step(now) {
                self.publish_metrics();
                self.control.set_done();
                return;
            }
            if now >= next_tick {
                self.shard.tick(now);
                self.shared.metrics.workers[self.index].publish(
                    self.shard.stats(),
                    &self.shard.counts(),
                    &self.io,
                );
                next_tick = now + crate::core::shard::TICK;
            }
            self.settle();
        }
    }

    fn publish_metrics(&self) {
        self.shared.metrics.workers[self.index].publish(
            self.shard.stats(),
            &self.shard.counts(),
            &self.io,
        );
    }

    /// One step of a graceful shutdown; true once nothing is left.
    fn shut_down_step(&mut self, now: Instant) -> bool {
        if self.control.phase() >= control::CLOSING_CLIENTS && !self.clients_closed {
            self.clients_closed = true;
            self.shard.close_all_clients(
                crate::protocol::constants::reply::CONNECTION_FORCED,
                "CONNECTION_FORCED - proxy shutting down",
                now,
            );
        }
        let counts = self.shard.counts();
        if counts.clients == 0 && !self.upstreams_closed {
            // Every complete publish is already queued upstream ahead of
            // the Connection.Close; the broker's CloseOk confirms it read them.
            self.upstreams_closed = true;
            self.shard.close_all_upstreams(now);
        }
        self.settle();
        let counts = self.shard.counts();
        counts.clients == 0 && counts.upstreams == 0
    }

    /// Carries out actions and writes output until nothing is left to do.
    fn settle(&mut self) {
        loop {
            let mut actions = std::mem::take(&mut self.actions);
            actions.extend(self.shard.take_actions());
            let mut dirty = std::mem::take(&mut self.dirty);
            self.shard.take_dirty(&mut dirty);
            if actions.is_empty() && dirty.is_empty() {
                self.dirty = dirty;
                self.actions = actions;
                return;
            }
            for conn in dirty.drain(..) {
                self.flush(conn);
            }
            self.dirty = dirty;
            for action in actions.drain(..) {
                match action {
                    Action::Connect(id) => self.connect(id),
                    Action::CloseAfterFlush(conn) => {
                        self.flush(conn);
                        self.close_socket(conn);
                        self.shard.release(conn);
                    }
                    Action::Resume(id) => self.pending_reads.push_back(ConnRef::Client(id)),
                }
            }
            self.actions = actions;
        }
    }

    fn handle(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Accept(stream, peer, tls) => self.accept(stream, peer, tls),
            WorkerMsg::Ready(t, ready) => {
                let conn = token::decode(t);
                let Some(sock) = self.socket(conn) else {
                    return;
                };
                if sock.connecting {
                    if let ConnRef::Upstream(id) = conn {
                        self.check_connect(id);
                    }
                    return;
                }
                if ready.writable {
                    self.flush(conn);
                }
                if ready.readable || ready.error {
                    self.read(conn);
                }
            }
        }
    }

    fn accept(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        let id = self
            .shard
            .client_connected(peer.to_string(), Instant::now());
        let t = token::encode(self.index, ConnRef::Client(id));
        net::tune_stream(&stream, false);
        if let Err(e) =
            self.registry
                .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("client {peer}: cannot register socket: {e}");
            self.shard.client_gone(id, Instant::now());
            self.shared
                .client_connections
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut sock = Socket::plain(ConnRef::Client(id), stream, false);
        if let Some(config) = tls {
            match rustls::ServerConnection::new(config) {
                Ok(session) => sock.tls = Some(Box::new(session.into())),
                Err(e) => {
                    log::warn!("client {peer}: cannot start TLS: {e}");
                    let _ = self.registry.deregister(&mut sock.stream);
                    self.shard.client_gone(id, Instant::now());
                    self.shared
                        .client_connections
                        .fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        put(&mut self.clients, id.0.index, sock);
        // Bytes may already be waiting; the edge may have fired before the
        // registration, so read now.
        self.read(ConnRef::Client(id));
    }

    fn slot(&mut self, conn: ConnRef) -> Option<&mut Option<Socket>> {
        slot_in(&mut self.clients, &mut self.upstreams, conn)
    }

    fn socket(&mut self, conn: ConnRef) -> Option<&mut Socket> {
        self.shard_has(conn)?;
        self.slot(conn)?.as_mut()
    }

    /// The token names the shard's current occupant of that slot.
    fn shard_has(&self, conn: ConnRef) -> Option<()> {
        self.shard.contains(conn).then_some(())
    }

    fn read(&mut self, conn: ConnRef) {
        if self.socket(conn).is_none() {
            return;
        }
        for _ in 0..READS_PER_TURN {
            if let ConnRef::Client(id) = conn {
                if !self.shard.client_may_read(id) {
                    return;
                }
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            let result = match self.socket(conn) {
                Some(sock) => sock.read_plain(&mut scratch),
                None => {
                    self.scratch = scratch;
                    return;
                }
            };
            let now = Instant::now();
            match result {
                Ok(0) => {
                    self.scratch = scratch;
                    self.gone(conn, "connection closed by peer");
                    return;
                }
                Ok(n) => {
                    match conn {
                        ConnRef::Client(id) => {
                            self.io.bytes_from_clients += n as u64;
                            self.shard.client_data(id, &scratch[..n], now)
                        }
                        ConnRef::Upstream(id) => {
                            self.io.bytes_from_upstream += n as u64;
                            self.shard.upstream_data(id, &scratch[..n], now)
                        }
                    }
                    self.scratch = scratch;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.scratch = scratch;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.scratch = scratch;
                }
                Err(e) => {
                    self.scratch = scratch;
                    self.gone(conn, &e.to_string());
                    return;
                }
            }
        }
        self.pending_reads.push_back(conn);
    }

    fn flush(&mut self, conn: ConnRef) {
        loop {
            let out = self.shard.output(conn);
            if out.is_empty() {
                return;
            }
            let Some(Some(sock)) = slot_in(&mut self.clients, &mut self.upstreams, conn) else {
                return;
            };
            if sock.connecting {
                return;
            }
            match sock.write_plain(out) {
                Ok(0) => return,
                Ok(n) => {
                    match conn {
                        ConnRef::Client(_) => self.io.bytes_to_clients += n as u64,
                        ConnRef::Upstream(_) => self.io.bytes_to_upstream += n as u64,
                    }
                    self.shard.output_written(conn, n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.gone(conn, &e.to_string());
                    return;
                }
            }
        }
    }

    /// The peer closed or the socket failed.
    fn gone(&mut self, conn: ConnRef, reason: &str) {
        self.close_socket(conn);
        let now = Instant::now();
        match conn {
            ConnRef::Client(id) => self.shard.client_gone(id, now),
            ConnRef::Upstream(id) => self.shard.upstream_gone(id, reason, now),
        }
    }

    fn close_socket(&mut self, conn: ConnRef) {
        if let Some(mut sock) = self.slot(conn).and_then(|s| s.take()) {
            let _ = self.registry.deregister(&mut sock.stream);
            if matches!(conn, ConnRef::Client(_)) {
                self.shared
                    .client_connections
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn addresses(&mut self) -> io::Result<Vec<SocketAddr>> {
        let now = Instant::now();
        if let Some((at, addrs)) = &self.resolved {
            if now.duration_since(*at) < RESOLVE_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs: Vec<SocketAddr> = self.upstream.to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::other(format!(
                "{} resolves to no address",
                self.upstream
            )));
        }
        self.resolved = Some((now, addrs.clone()));
        Ok(addrs)
    }

    fn connect(&mut self, id: UpstreamId) {
        let addrs = match self.addresses() {
            Ok(addrs) => addrs,
            Err(e) => {
                self.resolved = None;
                self.shard.upstream_gone(id, &e.to_string(), Instant::now());
                return;
            }
        };
        let tls = match &self.upstream_tls {
            Some((config, name)) => {
                match rustls::ClientConnection::new(config.clone(), name.clone()) {
                    Ok(session) => Some(Box::new(session.into())),
                    Err(e) => {
                        self.shard.upstream_gone(
                            id,
                            &format!("cannot start TLS: {e}"),
                            Instant::now(),
                        );
                        return;
                    }
                }
            }
            None => None,
        };
        self.connect_next(id, addrs, tls, None);
    }

    /// Starts a non-blocking connect to the first of `addrs`; the rest are
    /// tried in turn if it fails (e.g. `localhost` resolving to ::1 for a
    /// broker that listens on 127.0.0.1 only).
    fn connect_next(
        &mut self,
        id: UpstreamId,
        mut addrs: Vec<SocketAddr>,
        tls: Option<Box<rustls::Connection>>,
        last_error: Option<io::Error>,
    ) {
        let mut last_error = last_error;
        while !addrs.is_empty() {
            let addr = addrs.remove(0);
            let mut stream = match TcpStream::connect(addr) {
                Ok(stream) => stream,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let t = token::encode(self.index, ConnRef::Upstream(id));
            if let Err(e) =
                self.registry
                    .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
            {
                last_error = Some(e);
                continue;
            }
            let mut sock = Socket::plain(ConnRef::Upstream(id), stream, true);
            sock.tls = tls;
            sock.other_addrs = addrs;
            put(&mut self.upstreams, id.0.index, sock);
            return;
        }
        self.resolved = None;
        let reason = last_error.map_or_else(|| "no address".to_string(), |e| e.to_string());
        self.shard.upstream_gone(id, &reason, Instant::now());
    }

    fn check_connect(&mut self, id: UpstreamId) {
        let Some(Some(sock)) = self.slot(ConnRef::Upstream(id)) else {
            return;
        };
        let status = match sock.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match sock.stream.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match status {
            Ok(false) => {}
            Ok(true) => {
                sock.connecting = false;
                net::tune_stream(&sock.stream, true);
                self.shard.upstream_connected(id, Instant::now());
                self.flush(ConnRef::Upstream(id));
                self.read(ConnRef::Upstream(id));
            }
            Err(e) => {
                // Try the next address before giving up.
                let Some(Some(mut sock)) = self.slot(ConnRef::Upstream(id)).map(|s| s.take())
                else {
                    return;
                };
                let _ = self.registry.deregister(&mut sock.stream);
                let others = std::mem::take(&mut sock.other_addrs);
                self.connect_next(id, others, sock.tls.take(), Some(e));
            }
        }
    }
}

/// The socket of exactly this connection (not a later occupant of its slot
/// index), if it is still open.
fn slot_in<'a>(
    clients: &'a mut [Option<Socket>],
    upstreams: &'a mut [Option<Socket>],
    conn: ConnRef,
) -> Option<&'a mut Option<Socket>> {
    let slot = match conn {
        ConnRef::Client(id) => clients.get_mut(id.0.index as usize)?,
        ConnRef::Upstream(id) => upstreams.get_mut(id.0.index as usize)?,
    };
    slot.as_ref()
        .is_some_and(|s| s.conn == conn)
        .then_some(slot)
}

fn put(v: &mut Vec<Option<Socket>>, index: u32, sock: Socket) {
    let i = index as usize;
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    v[i] = Some(sock);
}
