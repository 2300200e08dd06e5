//! The proxy's sans-IO core: client sessions, upstream connections, pools
//! and the channel mapping between them, for one shard (one worker thread).
//!
//! Nothing here touches a socket, a thread or the clock: the shell feeds
//! bytes and `now`, then drains output buffers and [`Action`]s. That makes
//! every state machine testable with byte fixtures under a virtual clock.

pub mod client;
pub mod errors;
pub mod outbuf;
pub mod pool;
pub mod shard;
pub mod slab;
pub mod stats;
pub mod upstream;

use std::time::Duration;

pub use shard::Shard;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub slab::Key);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub slab::Key);

/// Either side's connection, as the shell names its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnRef {
    Client(ClientId),
    Upstream(UpstreamId),
}

/// What the shell must do besides writing output buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the broker for this upstream.
    Connect(UpstreamId),
    /// Write what is buffered for this connection, then close its socket and
    /// call [`Shard::release`]. The core has already forgotten its state
    /// except the output buffer.
    CloseAfterFlush(ConnRef),
    /// Reading this client had been paused for backpressure; its socket may
    /// hold unread bytes, so read it now (edge-triggered readiness will not
    /// fire again by itself).
    Resume(ClientId),
}

/// Output above this many bytes on an upstream connection pauses reading
/// from the clients that feed it.
pub const UPSTREAM_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Paused clients resume once the upstream's output is below this.
pub const UPSTREAM_LOW_WATER: usize = 1024 * 1024;
/// How long a peer may take to answer our Connection.Close with CloseOk.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest message a client may publish (RabbitMQ 3.10's default
/// `max_message_size`). Larger announced bodies are refused before any of
/// them is buffered.
pub const MAX_MESSAGE_SIZE: u64 = 128 * 1024 * 1024;

/// The part of the configuration the core needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Offered to clients in Connection.Tune.
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub handshake_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub idle_connection_timeout: Duration,
    pub min_idle_connections: u32,
    pub max_upstream_channels: u16,
    pub client_buffer_limit: usize,
    /// Bytes of client output buffers all workers may hold together; past
    /// it the client with the largest buffer is disconnected.
    pub client_buffer_budget: usize,
    /// Keep safe channels open upstream for the next client of the pool.
    pub channel_reuse: bool,
    pub max_idle_channels: u32,
    pub idle_channel_timeout: Duration,
    /// Exchange types of broker plugins clients may declare.
    pub exchange_types: Vec<String>,
    /// `host:port` the proxy listens on, for upstream connection names.
    pub listen_name: String,
    /// `host:port` of the broker, for log lines and error texts.
    pub upstream_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
            handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            idle_connection_timeout: Duration::from_secs(5),
            min_idle_connections: 0,
            max_upstream_channels: u16::MAX,
            client_buffer_limit: 16 * 1024 * 1024,
            client_buffer_budget: 256 * 1024 * 1024,
            channel_reuse: true,
            max_idle_channels: 64,
            idle_channel_timeout: Duration::from_secs(30),
            exchange_types: Vec::new(),
            listen_name: "localhost:5673".into(),
            upstream_name: "localhost:5672".into(),
        }
    }
}
