//! Configuration: the validated [`Config`] the proxy runs with, and how it is
//! loaded from its three sources.
//!
//! Loading has two stages. First every source (environment variables, the
//! command line from `cli`, the TOML file) becomes a table of settings keyed
//! by config-file key, and each table is checked on its own, so a bad value
//! is reported with the source it came from even when another source
//! overrides it. Then the tables are merged by the product's documented
//! precedence, **config file over command line over environment over
//! defaults**, key by key, into the serde struct [`FileConfig`] (all
//! `Option`s) and resolved into [`Config`] (no `Option`s but provenance).
//!
//! [`KEYS`] is the one table of settings: it drives validation, `--help`,
//! and the docs-drift test that keeps `config/amqproxy.toml` and
//! `man/amqproxy.1` complete. Adding a setting means a row in [`KEYS`], a
//! field in [`FileConfig`] and [`Config`], a default constant, and a flag in
//! `cli.rs` if it has one.

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use log::LevelFilter;
use serde::Deserialize;

use crate::cli;

pub const DEFAULT_LISTEN_ADDRESS: &str = "localhost";
pub const DEFAULT_LISTEN_PORT: u16 = 5673;
/// Deep enough that a reconnect storm after a broker restart is not dropped at SYN.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
pub const DEFAULT_HTTP_PORT: u16 = 15673;
pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Info;
pub const DEFAULT_IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MIN_IDLE_CONNECTIONS: u32 = 0;
/// The AMQP maximum; the effective limit is min(broker's channel_max, this).
pub const DEFAULT_MAX_UPSTREAM_CHANNELS: u16 = 65535;
pub const DEFAULT_TERM_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_TERM_CLIENT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// 0 means unlimited.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: u32 = 0;
/// Seconds, offered to clients in Connection.Tune, as RabbitMQ does.
pub const DEFAULT_HEARTBEAT: u16 = 60;
/// RabbitMQ's default channel_max.
pub const DEFAULT_CHANNEL_MAX: u16 = 2047;
/// RabbitMQ's default frame_max.
pub const DEFAULT_FRAME_MAX: u32 = 131_072;
/// The AMQP 0-9-1 minimum frame size (spec: frame-min-size).
pub const MIN_FRAME_MAX: u32 = 4096;
/// RabbitMQ refuses larger frames, so offering more would only fail later.
pub const MAX_FRAME_MAX: u32 = 1_048_576;
pub const DEFAULT_CHANNEL_REUSE: bool = true;
pub const DEFAULT_MAX_IDLE_CHANNELS: u32 = 64;
pub const DEFAULT_IDLE_CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CLIENT_BUFFER_LIMIT: usize = 16 * 1024 * 1024;
/// All clients' output buffers together (memory held, across workers).
pub const DEFAULT_CLIENT_BUFFER_BUDGET: usize = 256 * 1024 * 1024;
/// Exchange types clients may declare besides the built-in direct, fanout,
/// topic and headers (which are always allowed and not listed here).
pub const DEFAULT_EXCHANGE_TYPES: &[&str] = &[];
/// Longest name in a [`Kind::Names`] list: an AMQP short string.
pub const MAX_NAME_LEN: usize = 255;
/// 0 means one worker thread per CPU.
pub const DEFAULT_WORKERS: usize = 0;
/// The event loop's mio tokens have room for this many workers
/// (`server::token::MAX_WORKERS`; a test keeps the two equal).
pub const MAX_WORKERS: u64 = 254;
/// One year. Keeps `Instant + timeout` far from overflow and catches
/// milliseconds typed where seconds are meant.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 60 * 60;
/// socket2's `listen` takes a C int.
pub const MAX_LISTEN_BACKLOG: u64 = i32::MAX as u64;
/// Largest buffer limit representable both as a TOML integer and a usize.
pub const MAX_CLIENT_BUFFER_LIMIT: u64 = if (usize::MAX as u64) < i64::MAX as u64 {
    usize::MAX as u64
} else {
    i64::MAX as u64
};
pub const AMQP_PORT: u16 = 5672;
pub const AMQPS_PORT: u16 = 5671;
/// Environment variable naming the config file when `-c` is not given.
pub const CONFIG_ENV: &str = "AMQPROXY_CONFIG";

/// The settings the proxy runs with, every one resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen_address: String,
    pub listen_port: u16,
    pub listen_backlog: u32,
    pub http_address: String,
    pub http_port: u16,
    pub upstream: UpstreamUrl,
    pub log_level: LevelFilter,
    pub idle_connection_timeout: Duration,
    pub min_idle_connections: u32,
    pub max_upstream_channels: u16,
    pub term_timeout: Duration,
    pub term_client_close_timeout: Duration,
    pub handshake_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub max_client_connections: u32,
    pub heartbeat: u16,
    pub channel_max: u16,
    pub frame_max: u32,
    pub channel_reuse: bool,
    pub max_idle_channels: u32,
    pub idle_channel_timeout: Duration,
    pub client_buffer_limit: usize,
    pub client_buffer_budget: usize,
    /// Exchange types of broker plugins that clients may declare, without
    /// the built-ins; trimmed, without duplicates, in the order given.
    pub exchange_types: Vec<String>,
    /// TLS towards the broker (used with an amqps:// upstream).
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_tls_cert: Option<PathBuf>,
    pub upstream_tls_key: Option<PathBuf>,
    pub upstream_tls_server_name: Option<String>,
    pub upstream_tls_insecure: bool,
    /// TLS listener for clients; 0 = none.
    pub tls_listen_port: u16,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_client_ca_file: Option<PathBuf>,
    /// Already resolved: never 0.
    pub workers: usize,
    /// Where the file settings came from; kept so SIGHUP can re-read it.
    pub config_file: Option<PathBuf>,
    /// `--health-check`: probe the running proxy's `/healthz` on
    /// `http_address:http_port` instead of starting one. `upstream` is then
    /// not required and, when no source gives one, a placeholder.
    pub health_check: bool,
}

impl Config {
    /// Every setting at its default; for tests and embedding.
    pub fn with_defaults(upstream: UpstreamUrl) -> Config {
        Config {
            listen_address: DEFAULT_LISTEN_ADDRESS.to_string(),
            listen_port: DEFAULT_LISTEN_PORT,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            http_address: DEFAULT_LISTEN_ADDRESS.to_string(),
            http_port: DEFAULT_HTTP_PORT,
            upstream,
            log_level: DEFAULT_LOG_LEVEL,
            idle_connection_timeout: DEFAULT_IDLE_CONNECTION_TIMEOUT,
            min_idle_connections: DEFAULT_MIN_IDLE_CONNECTIONS,
            max_upstream_channels: DEFAULT_MAX_UPSTREAM_CHANNELS,
            term_timeout: DEFAULT_TERM_TIMEOUT,
            term_client_close_timeout: DEFAULT_TERM_CLIENT_CLOSE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            heartbeat: DEFAULT_HEARTBEAT,
            channel_max: DEFAULT_CHANNEL_MAX,
            frame_max: DEFAULT_FRAME_MAX,
            channel_reuse: DEFAULT_CHANNEL_REUSE,
            max_idle_channels: DEFAULT_MAX_IDLE_CHANNELS,
            idle_channel_timeout: DEFAULT_IDLE_CHANNEL_TIMEOUT,
            client_buffer_limit: DEFAULT_CLIENT_BUFFER_LIMIT,
            client_buffer_budget: DEFAULT_CLIENT_BUFFER_BUDGET,
            exchange_types: DEFAULT_EXCHANGE_TYPES
                .iter()
                .map(|name| name.to_string())
                .collect(),
            upstream_ca_file: None,
            upstream_tls_cert: None,
            upstream_tls_key: None,
            upstream_tls_server_name: None,
            upstream_tls_insecure: false,
            tls_listen_port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            workers: resolve_workers(DEFAULT_WORKERS),
            config_file: None,
            health_check: false,
        }
    }
}

/// 0 means "one per CPU", capped at [`MAX_WORKERS`] on very large hosts; if
/// the CPU count is unknown, one worker still works.
pub fn resolve_workers(workers: usize) -> usize {
    if workers > 0 {
        return workers;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(MAX_WORKERS as usize)
}

/// The settings of one source, as written in the TOML file. Every field is
/// optional: absent means "this source does not set it".
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen_address: Option<String>,
    pub listen_port: Option<u16>,
    pub listen_backlog: Option<u32>,
    pub http_address: Option<String>,
    pub http_port: Option<u16>,
    pub upstream: Option<String>,
    pub log_level: Option<String>,
    pub idle_connection_timeout: Option<u64>,
    pub min_idle_connections: Option<u32>,
    pub max_upstream_channels: Option<u16>,
    pub term_timeout: Option<u64>,
    pub term_client_close_timeout: Option<u64>,
    pub handshake_timeout: Option<u64>,
    pub upstream_connect_timeout: Option<u64>,
    pub max_client_connections: Option<u32>,
    pub heartbeat: Option<u16>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub channel_reuse: Option<bool>,
    pub max_idle_channels: Option<u32>,
    pub idle_channel_timeout: Option<u64>,
    pub client_buffer_limit: Option<usize>,
    pub client_buffer_budget: Option<usize>,
    pub exchange_types: Option<Vec<String>>,
    pub upstream_ca_file: Option<String>,
    pub upstream_tls_cert: Option<String>,
    pub upstream_tls_key: Option<String>,
    pub upstream_tls_server_name: Option<String>,
    pub upstream_tls_insecure: Option<bool>,
    pub tls_listen_port: Option<u16>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_client_ca_file: Option<String>,
    pub workers: Option<usize>,
}

/// What values a setting takes; drives validation and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A file path (non-empty).
    Path,
    /// A host name or IP address to listen on.
    Host,
    /// An `amqp://` or `amqps://` URL.
    Url,
    LogLevel,
    Bool,
    Int {
        min: u64,
        max: u64,
        unit: Unit,
    },
    /// A list of names (a TOML array of strings; comma-separated as text),
    /// each 1 to [`MAX_NAME_LEN`] printable ASCII characters other than
    /// space and comma. Duplicates are dropped when resolved.
    Names,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Port,
    Seconds,
    Bytes,
}

impl Unit {
    /// The unit as written after a number in the docs ("" for plain counts).
    pub fn suffix(self) -> &'static str {
        match self {
            Unit::Count | Unit::Port => "",
            Unit::Seconds => " s",
            Unit::Bytes => " bytes",
        }
    }
}

impl Kind {
    /// What a value of this kind looks like, for "wrong type" errors.
    fn expected(self) -> String {
        match self {
            Kind::Host => "a host name or IP address".to_string(),
            Kind::Path => "a file path".to_string(),
            Kind::Url => "an amqp:// or amqps:// URL".to_string(),
            Kind::LogLevel => "one of off, error, warn, info, debug, trace".to_string(),
            Kind::Bool => "true or false".to_string(),
            Kind::Names => format!(
                "a list of names, each 1 to {MAX_NAME_LEN} printable ASCII characters without spaces or commas"
            ),
            Kind::Int { unit, .. } => match unit {
                Unit::Count => "a whole number".to_string(),
                Unit::Port => self.range(),
                Unit::Seconds => "a whole number of seconds".to_string(),
                Unit::Bytes => "a whole number of bytes".to_string(),
            },
        }
    }

    /// The accepted range, for "out of range" errors.
    fn range(self) -> String {
        match self {
            Kind::Int { min, max, unit } => {
                let what = match unit {
                    Unit::Count => "a whole number",
                    Unit::Port => "a port number",
                    Unit::Seconds => "a whole number of seconds",
                    Unit::Bytes => "a whole number of bytes",
                };
                format!("{what} from {min} to {max}")
            }
            other => other.expected(),
        }
    }
}

/// One setting: its config-file key and its other names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// Config-file key; also the setting's name in error messages.
    pub key: &'static str,
    /// Long command-line flag without the dashes; `None` for the positional upstream URL.
    pub long: Option<&'static str>,
    pub env: Option<&'static str>,
    pub kind: Kind,
    /// The default as a TOML literal; `None` when there is none
    /// (`upstream`, required) or it follows another key (`http_address`).
    pub default: Option<&'static str>,
    /// One line for `--help`.
    pub help: &'static str,
}

const fn count(min: u64, max: u64) -> Kind {
    Kind::Int {
        min,
        max,
        unit: Unit::Count,
    }
}
const fn seconds(min: u64, max: u64) -> Kind {
    Kind::Int {
        min,
        max,
        unit: Unit::Seconds,
    }
}
const PORT: Kind = Kind::Int {
    min: 0,
    max: 65535,
    unit: Unit::Port,
};

/// Every setting. The order is the order of the docs.
#[rustfmt::skip]
pub const KEYS: &[KeyDoc] = &[
    KeyDoc { key: "listen_address", long: Some("listen"), env: Some("LISTEN_ADDRESS"), kind: Kind::Host, default: Some("\"localhost\""), help: "Address to accept AMQP clients on" },
    KeyDoc { key: "listen_port", long: Some("port"), env: Some("LISTEN_PORT"), kind: PORT, default: Some("5673"), help: "TCP port for AMQP clients (0: the OS picks one)" },
    KeyDoc { key: "listen_backlog", long: Some("listen-backlog"), env: Some("LISTEN_BACKLOG"), kind: count(1, MAX_LISTEN_BACKLOG), default: Some("1024"), help: "Connections the kernel queues before they are accepted" },
    KeyDoc { key: "http_address", long: Some("http-address"), env: Some("HTTP_ADDRESS"), kind: Kind::Host, default: None, help: "Address for /healthz, /readyz and /metrics (default: the listen address)" },
    KeyDoc { key: "http_port", long: Some("http-port"), env: Some("HTTP_PORT"), kind: PORT, default: Some("15673"), help: "TCP port for /healthz, /readyz and /metrics" },
    KeyDoc { key: "upstream", long: None, env: Some("AMQP_URL"), kind: Kind::Url, default: None, help: "Broker URL, amqp://host[:port] or amqps://host[:port] (required)" },
    KeyDoc { key: "log_level", long: Some("log-level"), env: Some("LOG_LEVEL"), kind: Kind::LogLevel, default: Some("\"info\""), help: "Log level: off, error, warn, info, debug or trace" },
    KeyDoc { key: "idle_connection_timeout", long: Some("idle-connection-timeout"), env: Some("IDLE_CONNECTION_TIMEOUT"), kind: seconds(0, MAX_DURATION_SECS), default: Some("5"), help: "Seconds an upstream connection with no channels stays open" },
    KeyDoc { key: "min_idle_connections", long: Some("min-idle-connections"), env: Some("MIN_IDLE_CONNECTIONS"), kind: count(0, u32::MAX as u64), default: Some("0"), help: "Idle upstream connections kept open per pool despite the idle timeout" },
    KeyDoc { key: "max_upstream_channels", long: Some("max-upstream-channels"), env: Some("MAX_UPSTREAM_CHANNELS"), kind: count(1, 65535), default: Some("65535"), help: "Channels per upstream connection (the broker's channel_max caps it too)" },
    KeyDoc { key: "term_timeout", long: Some("term-timeout"), env: Some("TERM_TIMEOUT"), kind: seconds(0, MAX_DURATION_SECS), default: Some("30"), help: "Seconds after SIGTERM/SIGINT before remaining connections are force-closed" },
    KeyDoc { key: "term_client_close_timeout", long: Some("term-client-close-timeout"), env: Some("TERM_CLIENT_CLOSE_TIMEOUT"), kind: seconds(0, MAX_DURATION_SECS), default: Some("5"), help: "Seconds after SIGTERM/SIGINT before clients are sent Connection.Close 320" },
    KeyDoc { key: "handshake_timeout", long: Some("handshake-timeout"), env: Some("HANDSHAKE_TIMEOUT"), kind: seconds(1, MAX_DURATION_SECS), default: Some("10"), help: "Seconds a client has to complete the AMQP handshake" },
    KeyDoc { key: "upstream_connect_timeout", long: Some("upstream-connect-timeout"), env: Some("UPSTREAM_CONNECT_TIMEOUT"), kind: seconds(1, MAX_DURATION_SECS), default: Some("5"), help: "Seconds to wait for the broker to accept and handshake a connection" },
    KeyDoc { key: "max_client_connections", long: Some("max-client-connections"), env: Some("MAX_CLIENT_CONNECTIONS"), kind: count(0, u32::MAX as u64), default: Some("0"), help: "Client connections accepted at once (0: unlimited)" },
    KeyDoc { key: "heartbeat", long: Some("heartbeat"), env: Some("HEARTBEAT"), kind: seconds(0, 65535), default: Some("60"), help: "Heartbeat interval in seconds offered to clients (0: off)" },
    KeyDoc { key: "channel_max", long: Some("channel-max"), env: Some("CHANNEL_MAX"), kind: count(1, 65535), default: Some("2047"), help: "Highest channel number offered to clients" },
    KeyDoc { key: "frame_max", long: Some("frame-max"), env: Some("FRAME_MAX"), kind: Kind::Int { min: MIN_FRAME_MAX as u64, max: MAX_FRAME_MAX as u64, unit: Unit::Bytes }, default: Some("131072"), help: "Largest frame in bytes offered to clients" },
    KeyDoc { key: "channel_reuse", long: Some("no-channel-reuse"), env: Some("CHANNEL_REUSE"), kind: Kind::Bool, default: Some("true"), help: "Keep channels that clients closed cleanly open upstream and reuse them" },
    KeyDoc { key: "max_idle_channels", long: Some("max-idle-channels"), env: Some("MAX_IDLE_CHANNELS"), kind: count(0, u32::MAX as u64), default: Some("64"), help: "Reusable idle channels kept per pool" },
    KeyDoc { key: "idle_channel_timeout", long: Some("idle-channel-timeout"), env: Some("IDLE_CHANNEL_TIMEOUT"), kind: seconds(0, MAX_DURATION_SECS), default: Some("30"), help: "Seconds a reusable idle channel stays open" },
    KeyDoc { key: "client_buffer_limit", long: Some("client-buffer-limit"), env: Some("CLIENT_BUFFER_LIMIT"), kind: Kind::Int { min: MIN_FRAME_MAX as u64, max: MAX_CLIENT_BUFFER_LIMIT, unit: Unit::Bytes }, default: Some("16777216"), help: "Bytes buffered for one slow client before it is disconnected" },
    KeyDoc { key: "client_buffer_budget", long: Some("client-buffer-budget"), env: Some("CLIENT_BUFFER_BUDGET"), kind: Kind::Int { min: MIN_FRAME_MAX as u64, max: MAX_CLIENT_BUFFER_LIMIT, unit: Unit::Bytes }, default: Some("268435456"), help: "Bytes of output buffers all clients together may hold; past it the client with the most unsent data is disconnected as a slow consumer" },
    KeyDoc { key: "upstream_ca_file", long: Some("upstream-ca-file"), env: Some("UPSTREAM_CA_FILE"), kind: Kind::Path, default: None, help: "CA certificates (PEM) to verify an amqps:// broker with, instead of the system trust store" },
    KeyDoc { key: "upstream_tls_cert", long: Some("upstream-tls-cert"), env: Some("UPSTREAM_TLS_CERT"), kind: Kind::Path, default: None, help: "Client certificate chain (PEM) for mutual TLS with the broker; needs upstream_tls_key" },
    KeyDoc { key: "upstream_tls_key", long: Some("upstream-tls-key"), env: Some("UPSTREAM_TLS_KEY"), kind: Kind::Path, default: None, help: "Private key (PEM) of upstream_tls_cert" },
    KeyDoc { key: "upstream_tls_server_name", long: Some("upstream-tls-server-name"), env: Some("UPSTREAM_TLS_SERVER_NAME"), kind: Kind::Host, default: None, help: "Name to send in SNI and verify in the broker's certificate, instead of the URL's host" },
    KeyDoc { key: "upstream_tls_insecure", long: Some("upstream-tls-insecure"), env: Some("UPSTREAM_TLS_INSECURE"), kind: Kind::Bool, default: Some("false"), help: "Do not verify the broker's certificate or host name (logs a warning)" },
    KeyDoc { key: "tls_listen_port", long: Some("tls-port"), env: Some("TLS_LISTEN_PORT"), kind: Kind::Int { min: 0, max: 65535, unit: Unit::Port }, default: Some("0"), help: "Port of the TLS (amqps) listener for clients, on listen_address; 0 = none" },
    KeyDoc { key: "tls_cert_file", long: Some("tls-cert"), env: Some("TLS_CERT_FILE"), kind: Kind::Path, default: None, help: "Certificate chain (PEM) of the TLS listener" },
    KeyDoc { key: "tls_key_file", long: Some("tls-key"), env: Some("TLS_KEY_FILE"), kind: Kind::Path, default: None, help: "Private key (PEM) of the TLS listener" },
    KeyDoc { key: "tls_client_ca_file", long: Some("tls-client-ca"), env: Some("TLS_CLIENT_CA_FILE"), kind: Kind::Path, default: None, help: "CA certificates (PEM): when set, TLS clients must present a certificate they signed" },
    KeyDoc { key: "exchange_types", long: Some("exchange-types"), env: Some("EXCHANGE_TYPES"), kind: Kind::Names, default: Some("[]"), help: "Exchange types of broker plugins clients may declare, comma-separated (built-ins always allowed)" },
    KeyDoc { key: "workers", long: Some("workers"), env: Some("WORKERS"), kind: count(0, MAX_WORKERS), default: Some("0"), help: "Worker threads (0: one per CPU)" },
];

/// The row of [`KEYS`] for a config-file key.
pub fn key_doc(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|doc| doc.key == key)
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Env(&'static str),
    /// A long flag, without the dashes.
    Flag(&'static str),
    /// A positional argument, by its value name.
    Argument(&'static str),
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::Env(name) => write!(f, "environment variable {name}"),
            Source::Flag(long) => write!(f, "command line option --{long}"),
            Source::Argument(name) => write!(f, "command line argument {name}"),
            Source::File(path) => write!(f, "config file {}", path.display()),
        }
    }
}

/// Why configuration failed. Each renders as one line; `main` prints it
/// after "amqproxy: " and exits 2.
#[derive(Debug)]
pub enum ConfigError {
    /// The command line itself is wrong (unknown flag, missing value...).
    Usage(String),
    InvalidValue {
        key: &'static str,
        source: Source,
        value: String,
        expected: String,
    },
    UnknownKey {
        key: String,
        path: PathBuf,
    },
    MissingUpstream,
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A client buffer that cannot hold one whole frame would disconnect
    /// every client at its first large delivery.
    BufferBelowFrameMax {
        buffer: u64,
        buffer_source: Source,
        frame_max: u64,
        frame_max_source: Source,
    },
    /// [`KEYS`] and [`FileConfig`] disagree; a bug caught by the tests.
    Internal {
        source: String,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Usage(message) => write!(f, "{message}"),
            ConfigError::InvalidValue { key, source, value, expected } => {
                write!(f, "invalid value {value} for {key} ({source}): expected {expected}")
            }
            ConfigError::UnknownKey { key, path } => {
                write!(f, "unknown key {key:?} in config file {}", path.display())
            }
            ConfigError::MissingUpstream => write!(
                f,
                "missing upstream URL: give it as the first argument, AMQP_URL, or `upstream` in the config file"
            ),
            ConfigError::ReadFile { path, error } => {
                write!(f, "cannot read config file {}: {error}", path.display())
            }
            ConfigError::Syntax { path, line, column, message } => write!(
                f,
                "syntax error in config file {} at line {line}, column {column}: {message}",
                path.display()
            ),
            ConfigError::BufferBelowFrameMax { buffer, buffer_source, frame_max, frame_max_source } => write!(
                f,
                "client_buffer_limit {buffer} ({buffer_source}) is smaller than frame_max {frame_max} ({frame_max_source}): a client's buffer must hold one whole frame"
            ),
            ConfigError::Internal { source, message } => {
                write!(f, "internal error reading settings from {source}: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::ReadFile { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// What `load` decided.
// Built once at startup and matched at once, so boxing the Config would
// only add an indirection to the contract.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Loaded {
    Run(Config),
    /// `--help` or `--version`: print this text to stdout as is (it ends
    /// in a newline) and exit 0.
    Exit(String),
}

/// Which source a table of settings came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    Env,
    Cli,
    File(PathBuf),
}

impl Origin {
    /// The precise source of one key from this origin.
    pub(crate) fn source(&self, doc: &KeyDoc) -> Source {
        match self {
            Origin::Env => Source::Env(doc.env.unwrap_or(doc.key)),
            Origin::Cli => match doc.long {
                Some(long) => Source::Flag(long),
                None => Source::Argument(cli::UPSTREAM_VALUE_NAME),
            },
            Origin::File(path) => Source::File(path.clone()),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env => write!(f, "the environment"),
            Origin::Cli => write!(f, "the command line"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
        }
    }
}

/// One source's settings, keyed by config-file key.
struct Layer {
    origin: Origin,
    table: toml::Table,
}

/// Reads every source and resolves the configuration.
///
/// `args` is the whole command line including the program name, as from
/// `std::env::args_os()`; `env` looks up an environment variable (injected
/// so tests need not touch the process environment).
pub fn load(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let cli = match cli::parse(args)? {
        cli::Parsed::Exit(text) => return Ok(Loaded::Exit(text)),
        cli::Parsed::Run(cli) => cli,
    };
    let env_layer = Layer {
        origin: Origin::Env,
        table: env_table(env)?,
    };
    let cli_layer = Layer {
        origin: Origin::Cli,
        table: cli.settings,
    };
    let config_file = cli
        .config_file
        .or_else(|| set_env(env, CONFIG_ENV).map(PathBuf::from));
    // Lowest precedence first.
    let mut layers = vec![env_layer, cli_layer];
    if let Some(path) = &config_file {
        layers.push(Layer {
            origin: Origin::File(path.clone()),
            table: read_table(path)?,
        });
    }
    for layer in &layers {
        check_table(&layer.table, &layer.origin)?;
    }
    if cli.health_check
        && !layers
            .iter()
            .any(|layer| layer.table.contains_key("upstream"))
    {
        // The check only talks HTTP to the running proxy; a config that
        // leaves the broker to the service's command line still works.
        layers[0].table.insert(
            "upstream".to_string(),
            toml::Value::String(HEALTH_CHECK_UPSTREAM.to_string()),
        );
    }
    let mut config = resolve(&layers, config_file)?;
    config.health_check = cli.health_check;
    Ok(Loaded::Run(config))
}

/// `upstream` of a `--health-check` configuration that names no broker.
const HEALTH_CHECK_UPSTREAM: &str = "amqp://localhost";

/// Reads and checks a config file on its own (for SIGHUP). To rebuild the
/// whole [`Config`] with the file's precedence over flags and environment,
/// call [`load`] again with the original arguments.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let origin = Origin::File(path.to_path_buf());
    let table = read_table(path)?;
    check_table(&table, &origin)?;
    to_file_config(table, &origin)
}

/// An environment variable's value; set-but-empty counts as unset, as
/// container tools often define variables they have no value for.
fn set_env(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|value| !value.trim().is_empty())
}

fn env_table(env: &dyn Fn(&str) -> Option<String>) -> Result<toml::Table, ConfigError> {
    let mut table = toml::Table::new();
    for doc in KEYS {
        let Some(name) = doc.env else { continue };
        if let Some(text) = set_env(env, name) {
            table.insert(
                doc.key.to_string(),
                text_to_value(doc, &text, Origin::Env.source(doc))?,
            );
        }
    }
    Ok(table)
}

/// Turns a setting typed as text (flag or environment variable) into the
/// TOML value the file would hold, so all sources share one validation.
pub(crate) fn text_to_value(
    doc: &KeyDoc,
    text: &str,
    source: Source,
) -> Result<toml::Value, ConfigError> {
    let text = text.trim();
    let invalid = |expected: String| ConfigError::InvalidValue {
        key: doc.key,
        source: source.clone(),
        value: format!("{text:?}"),
        expected,
    };
    match doc.kind {
        Kind::Int { .. } => text
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| invalid(doc.kind.expected())),
        Kind::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "no" | "off" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(invalid("true, false, yes, no, on, off, 1 or 0".to_string())),
        },
        Kind::Host | Kind::Url | Kind::LogLevel | Kind::Path => {
            Ok(toml::Value::String(text.to_string()))
        }
        // "" is the empty list; "a,,b" has an empty name, refused below.
        Kind::Names if text.is_empty() => Ok(toml::Value::Array(Vec::new())),
        Kind::Names => {
            let names: Vec<&str> = text.split(',').map(str::trim).collect();
            if let Some(problem) = names.iter().find_map(|name| name_problem(name)) {
                return Err(invalid(format!("{} (not {problem})", doc.kind.expected())));
            }
            Ok(toml::Value::Array(
                names
                    .into_iter()
                    .map(|name| toml::Value::String(name.to_string()))
                    .collect(),
            ))
        }
    }
}

/// What is wrong with one name of a [`Kind::Names`] list, trimmed, if
/// anything: said as what the name is not allowed to be.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("an empty name".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("a name of {} bytes", name.len()))
    } else if !name.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        Some(format!("{name:?}"))
    } else {
        None
    }
}

/// The names of a checked [`Kind::Names`] list, trimmed, first occurrence
/// of each kept in order.
fn unique_names(names: Vec<String>) -> Vec<String> {
    let mut unique: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let name = name.trim();
        if !unique.iter().any(|seen| seen == name) {
            unique.push(name.to_string());
        }
    }
    unique
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
        path: path.to_path_buf(),
        error,
    })?;
    text.parse::<toml::Table>().map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        let before = text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: one_line(error.message()),
        }
    })
}

/// Collapses a multi-line message so every error stays on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Checks every value of one source against [`KEYS`].
fn check_table(table: &toml::Table, origin: &Origin) -> Result<(), ConfigError> {
    for (key, value) in table {
        let Some(doc) = key_doc(key) else {
            return Err(match origin {
                Origin::File(path) => ConfigError::UnknownKey {
                    key: key.clone(),
                    path: path.clone(),
                },
                other => ConfigError::Internal {
                    source: other.to_string(),
                    message: format!("unknown key {key:?}"),
                },
            });
        };
        check_value(doc, value, origin.source(doc))?;
    }
    Ok(())
}

fn check_value(doc: &KeyDoc, value: &toml::Value, source: Source) -> Result<(), ConfigError> {
    let invalid = |expected: String| ConfigError::InvalidValue {
        key: doc.key,
        source: source.clone(),
        value: show_value(doc, value),
        expected,
    };
    match (doc.kind, value) {
        (Kind::Int { min, max, .. }, toml::Value::Integer(n)) => match u64::try_from(*n) {
            Ok(n) if (min..=max).contains(&n) => Ok(()),
            _ => Err(invalid(doc.kind.range())),
        },
        (Kind::Bool, toml::Value::Boolean(_)) => Ok(()),
        (Kind::Path, toml::Value::String(s)) if !s.trim().is_empty() => Ok(()),
        (Kind::Host, toml::Value::String(s)) => parse_listen_host(s)
            .map(drop)
            .ok_or_else(|| invalid(doc.kind.expected())),
        (Kind::Url, toml::Value::String(s)) => UpstreamUrl::parse(s)
            .map(drop)
            .map_err(|error| invalid(format!("{} ({error})", doc.kind.expected()))),
        (Kind::LogLevel, toml::Value::String(s)) => parse_log_level(s)
            .map(drop)
            .ok_or_else(|| invalid(doc.kind.expected())),
        (Kind::Names, toml::Value::Array(items)) => {
            for item in items {
                let toml::Value::String(name) = item else {
                    return Err(invalid(doc.kind.expected()));
                };
                if let Some(problem) = name_problem(name.trim()) {
                    return Err(invalid(format!("{} (not {problem})", doc.kind.expected())));
                }
            }
            Ok(())
        }
        _ => Err(invalid(doc.kind.expected())),
    }
}

/// A value as shown in an error: strings quoted and escaped so the message
/// stays on one line, URLs without their credentials.
fn show_value(doc: &KeyDoc, value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if doc.kind == Kind::Url => format!("{:?}", redact_url(s)),
        toml::Value::String(s) => format!("{s:?}"),
        other => one_line(&other.to_string()),
    }
}

/// Hides `user:password@` so a password never reaches a log or terminal.
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://***{}", &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The typed view of a checked table; `from` names it should [`KEYS`] and
/// [`FileConfig`] ever disagree.
fn to_file_config(table: toml::Table, from: &dyn fmt::Display) -> Result<FileConfig, ConfigError> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|error: toml::de::Error| ConfigError::Internal {
            source: from.to_string(),
            message: one_line(error.message()),
        })
}

/// Merges checked layers by precedence and applies defaults.
fn resolve(layers: &[Layer], config_file: Option<PathBuf>) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    for layer in layers {
        merged.extend(layer.table.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let source_of = |key: &str| -> Source {
        let winner = layers
            .iter()
            .rev()
            .find(|layer| layer.table.contains_key(key));
        match (winner, key_doc(key)) {
            (Some(layer), Some(doc)) => layer.origin.source(doc),
            _ => Source::Default,
        }
    };
    let file = to_file_config(merged, &"the merged settings")?;

    let upstream_text = file.upstream.ok_or(ConfigError::MissingUpstream)?;
    // Already checked per layer; failing here would be a bug, reported not panicked.
    let upstream =
        UpstreamUrl::parse(&upstream_text).map_err(|error| ConfigError::InvalidValue {
            key: "upstream",
            source: source_of("upstream"),
            value: format!("{:?}", redact_url(&upstream_text)),
            expected: error.to_string(),
        })?;
    let host = |key: &'static str, text: Option<String>| -> Result<Option<String>, ConfigError> {
        match text {
            None => Ok(None),
            Some(text) => {
                parse_listen_host(&text)
                    .map(Some)
                    .ok_or_else(|| ConfigError::InvalidValue {
                        key,
                        source: source_of(key),
                        value: format!("{text:?}"),
                        expected: Kind::Host.expected(),
                    })
            }
        }
    };
    let listen_address = host("listen_address", file.listen_address)?
        .unwrap_or_else(|| DEFAULT_LISTEN_ADDRESS.to_string());
    let http_address =
        host("http_address", file.http_address)?.unwrap_or_else(|| listen_address.clone());
    let log_level = match file.log_level {
        None => DEFAULT_LOG_LEVEL,
        Some(text) => parse_log_level(&text).ok_or_else(|| ConfigError::InvalidValue {
            key: "log_level",
            source: source_of("log_level"),
            value: format!("{text:?}"),
            expected: Kind::LogLevel.expected(),
        })?,
    };
    let secs = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_secs);

    let config = Config {
        listen_address,
        listen_port: file.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        listen_backlog: file.listen_backlog.unwrap_or(DEFAULT_LISTEN_BACKLOG),
        http_address,
        http_port: file.http_port.unwrap_or(DEFAULT_HTTP_PORT),
        upstream,
        log_level,
        idle_connection_timeout: secs(
            file.idle_connection_timeout,
            DEFAULT_IDLE_CONNECTION_TIMEOUT,
        ),
        min_idle_connections: file
            .min_idle_connections
            .unwrap_or(DEFAULT_MIN_IDLE_CONNECTIONS),
        max_upstream_channels: file
            .max_upstream_channels
            .unwrap_or(DEFAULT_MAX_UPSTREAM_CHANNELS),
        term_timeout: secs(file.term_timeout, DEFAULT_TERM_TIMEOUT),
        term_client_close_timeout: secs(
            file.term_client_close_timeout,
            DEFAULT_TERM_CLIENT_CLOSE_TIMEOUT,
        ),
        handshake_timeout: secs(file.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT),
        upstream_connect_timeout: secs(
            file.upstream_connect_timeout,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        ),
        max_client_connections: file
            .max_client_connections
            .unwrap_or(DEFAULT_MAX_CLIENT_CONNECTIONS),
        heartbeat: file.heartbeat.unwrap_or(DEFAULT_HEARTBEAT),
        channel_max: file.channel_max.unwrap_or(DEFAULT_CHANNEL_MAX),
        frame_max: file.frame_max.unwrap_or(DEFAULT_FRAME_MAX),
        channel_reuse: file.channel_reuse.unwrap_or(DEFAULT_CHANNEL_REUSE),
        max_idle_channels: file.max_idle_channels.unwrap_or(DEFAULT_MAX_IDLE_CHANNELS),
        idle_channel_timeout: secs(file.idle_channel_timeout, DEFAULT_IDLE_CHANNEL_TIMEOUT),
        client_buffer_limit: file
            .client_buffer_limit
            .unwrap_or(DEFAULT_CLIENT_BUFFER_LIMIT),
        client_buffer_budget: file
            .client_buffer_budget
            .unwrap_or(DEFAULT_CLIENT_BUFFER_BUDGET),
        exchange_types: unique_names(file.exchange_types.unwrap_or_else(|| {
            DEFAULT_EXCHANGE_TYPES
                .iter()
                .map(|name| name.to_string())
                .collect()
        })),
        upstream_ca_file: file.upstream_ca_file.map(PathBuf::from),
        upstream_tls_cert: file.upstream_tls_cert.map(PathBuf::from),
        upstream_tls_key: file.upstream_tls_key.map(PathBuf::from),
        upstream_tls_server_name: file.upstream_tls_server_name,
        upstream_tls_insecure: file.upstream_tls_insecure.unwrap_or(false),
        tls_listen_port: file.tls_listen_port.unwrap_or(0),
        tls_cert_file: file.tls_cert_file.map(PathBuf::from),
        tls_key_file: file.tls_key_file.map(PathBuf::from),
        tls_client_ca_file: file.tls_client_ca_file.map(PathBuf::from),
        workers: resolve_workers(file.workers.unwrap_or(DEFAULT_WORKERS)),
        config_file,
        health_check: false,
    };
    if (config.client_buffer_limit as u64) < u64::from(config.frame_max) {
        return Err(ConfigError::BufferBelowFrameMax {
            buffer: config.client_buffer_limit as u64,
            buffer_source: source_of("client_buffer_limit"),
            frame_max: u64::from(config.frame_max),
            frame_max_source: source_of("frame_max"),
        });
    }
    Ok(config)
}

/// Accepts the `log` crate's names plus amqproxy's (Crystal `Log::Severity`)
/// spellings, so an existing LOG_LEVEL keeps working.
pub fn parse_log_level(text: &str) -> Option<LevelFilter> {
    match text.trim().to_ascii_lowercase().as_str() {
        "off" | "none" => Some(LevelFilter::Off),
        "error" | "fatal" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" | "notice" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// A listen address: a host name, an IPv4 address or an IPv6 address with
/// or without brackets. Brackets are removed so the result works in
/// `(address, port).to_socket_addrs()`.
pub fn parse_listen_host(text: &str) -> Option<String> {
    let text = text.trim();
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return Ipv6Addr::from_str(inner).ok().map(|_| inner.to_string());
    }
    if text.contains(':') {
        return Ipv6Addr::from_str(text).ok().map(|_| text.to_string());
    }
    is_host_name(text).then(|| text.to_string())
}

/// Letters, digits, '-', '.' and '_': host names and IPv4 literals.
fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The broker to connect to. Credentials and vhost in the URL are ignored:
/// every client's own credentials and vhost are used upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

/// Why an upstream URL was refused. Deliberately carries no part of the URL
/// after the scheme, which may hold a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    MissingScheme,
    UnsupportedScheme(String),
    MissingHost,
    InvalidHost,
    InvalidPort,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::MissingScheme => write!(f, "missing amqp:// or amqps://"),
            UrlError::UnsupportedScheme(scheme) => write!(f, "unsupported scheme {scheme:?}"),
            UrlError::MissingHost => write!(f, "missing host"),
            UrlError::InvalidHost => write!(f, "invalid host"),
            UrlError::InvalidPort => write!(f, "the port must be a number from 1 to 65535"),
        }
    }
}

impl std::error::Error for UrlError {}

impl UpstreamUrl {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?query]`.
    pub fn parse(text: &str) -> Result<UpstreamUrl, UrlError> {
        let (scheme, rest) = text
            .trim()
            .split_once("://")
            .ok_or(UrlError::MissingScheme)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "amqp" => false,
            "amqps" => true,
            _ => return Err(UrlError::UnsupportedScheme(scheme.to_string())),
        };
        // RFC 3986: the authority ends at the first '/', '?' or '#'.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority
            .rfind('@')
            .map_or(authority, |at| &authority[at + 1..]);
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (inner, after) = bracketed.split_once(']').ok_or(UrlError::InvalidHost)?;
            let address = Ipv6Addr::from_str(inner).map_err(|_| UrlError::InvalidHost)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(UrlError::InvalidHost)?),
            };
            (address.to_string(), port)
        } else {
            if host_port.matches(':').count() > 1 {
                // An IPv6 address without the brackets the URL syntax requires.
                return Err(UrlError::InvalidHost);
            }
            let (host, port) = match host_port.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            };
            if host.is_empty() {
                return Err(UrlError::MissingHost);
            }
            if !is_host_name(host) {
                return Err(UrlError::InvalidHost);
            }
            (host.to_string(), port)
        };
        let default_port = if tls { AMQPS_PORT } else { AMQP_PORT };
        let port = match port {
            // "host:" with no digits means the default port (RFC 3986).
            None | Some("") => default_port,
            Some(digits) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                match digits.parse::<u16>() {
                    Ok(port) if port > 0 => port,
                    _ => return Err(UrlError::InvalidPort),
                }
            }
            Some(_) => return Err(UrlError::InvalidPort),
        };
        Ok(UpstreamUrl { tls, host, port })
    }

    /// "host:port" for `ToSocketAddrs`, with brackets around IPv6.
    pub fn addr_string(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "amqps"
        } else {
            "amqp"
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = UrlError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        UpstreamUrl::parse(text)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.addr_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("amqproxy")
            .chain(list.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    /// A file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "amqproxy-config-test-{}-{}.toml",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).expect("write temp file");
            TempFile(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().expect("temp path is UTF-8")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run(list: &[&str], env: &[(&str, &str)]) -> Config {
        match load(args(list), &env_of(env)) {
            Ok(Loaded::Run(config)) => config,
            Ok(Loaded::Exit(text)) => panic!("unexpected exit: {text}"),
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    fn fail(list: &[&str], env: &[(&str, &str)]) -> String {
        match load(args(list), &env_of(env)) {
            Err(error) => {
                let message = error.to_string();
                assert!(
                    !message.contains('\n'),
                    "error is not one line: {message:?}"
                );
                message
            }
            Ok(other) => panic!("expected an error, got {other:?}"),
        }
    }

    fn broker() -> UpstreamUrl {
        UpstreamUrl {
            tls: false,
            host: "broker".to_string(),
            port: 5672,
        }
    }

    #[test]
    fn upstream_alone_gives_all_defaults() {
        assert_eq!(
            run(&["amqp://broker"], &[]),
            Config::with_defaults(broker())
        );
    }

    #[test]
    fn missing_upstream_is_reported_with_all_three_ways_to_give_it() {
        assert_eq!(
            fail(&[], &[]),
            "missing upstream URL: give it as the first argument, AMQP_URL, or `upstream` in the config file"
        );
    }

    #[test]
    fn environment_overrides_default() {
        let config = run(
            &[],
            &[("AMQP_URL", "amqp://broker"), ("LISTEN_PORT", "1111")],
        );
        assert_eq!(config.upstream, broker());
        assert_eq!(config.listen_port, 1111);
    }

    #[test]
    fn command_line_overrides_environment() {
        let config = run(
            &["-p", "2222", "amqp://broker"],
            &[("LISTEN_PORT", "1111"), ("AMQP_URL", "amqp://other")],
        );
        assert_eq!(config.listen_port, 2222);
        assert_eq!(config.upstream, broker());
    }

    #[test]
    fn file_overrides_command_line() {
        let file = TempFile::new("listen_port = 3333\nupstream = \"amqp://broker\"\n");
        let config = run(&["-c", file.path(), "-p", "2222", "amqp://other"], &[]);
        assert_eq!(config.listen_port, 3333);
        assert_eq!(config.upstream, broker());
        assert_eq!(config.config_file, Some(file.0.clone()));
    }

    #[test]
    fn file_overrides_environment() {
        let file = TempFile::new("term_timeout = 7\n");
        let config = run(
            &["-c", file.path(), "amqp://broker"],
            &[("TERM_TIMEOUT", "9")],
        );
        assert_eq!(config.term_timeout, Duration::from_secs(7));
    }

    #[test]
    fn precedence_is_decided_per_key() {
        let file = TempFile::new("heartbeat = 10\n");
        let config = run(
            &["-c", file.path(), "-l", "0.0.0.0", "amqp://broker"],
            &[
                ("HEARTBEAT", "20"),
                ("LISTEN_ADDRESS", "127.0.0.1"),
                ("CHANNEL_MAX", "100"),
            ],
        );
        assert_eq!(config.heartbeat, 10);
        assert_eq!(config.listen_address, "0.0.0.0");
        assert_eq!(config.channel_max, 100);
        assert_eq!(config.frame_max, DEFAULT_FRAME_MAX);
    }

    #[test]
    fn config_file_can_be_named_by_environment_and_flag_wins() {
        let from_env = TempFile::new("listen_port = 1\n");
        let from_flag = TempFile::new("listen_port = 2\n");
        let env = [("AMQPROXY_CONFIG", from_env.path())];
        assert_eq!(run(&["amqp://broker"], &env).listen_port, 1);
        assert_eq!(
            run(&["-c", from_flag.path(), "amqp://broker"], &env).listen_port,
            2
        );
    }

    #[test]
    fn empty_environment_variables_count_as_unset() {
        let config = run(
            &["amqp://broker"],
            &[("LISTEN_PORT", ""), ("AMQPROXY_CONFIG", " ")],
        );
        assert_eq!(config.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(config.config_file, None);
    }

    #[test]
    fn http_address_follows_listen_address_unless_set() {
        assert_eq!(
            run(&["-l", "0.0.0.0", "amqp://broker"], &[]).http_address,
            "0.0.0.0"
        );
        let file = TempFile::new("listen_address = \"::\"\n");
        assert_eq!(
            run(&["-c", file.path(), "amqp://broker"], &[]).http_address,
            "::"
        );
        let config = run(
            &[
                "-l",
                "0.0.0.0",
                "--http-address",
                "127.0.0.1",
                "amqp://broker",
            ],
            &[],
        );
        assert_eq!(config.http_address, "127.0.0.1");
    }

    #[test]
    fn listen_address_accepts_names_ipv4_and_ipv6() {
        assert_eq!(parse_listen_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(parse_listen_host("::").as_deref(), Some("::"));
        assert_eq!(parse_listen_host("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(
            parse_listen_host("proxy.internal").as_deref(),
            Some("proxy.internal")
        );
        assert_eq!(parse_listen_host(""), None);
        assert_eq!(parse_listen_host("a b"), None);
        assert_eq!(parse_listen_host("::g"), None);
        assert_eq!(
            fail(&["-l", "bad host!", "amqp://broker"], &[]),
            "invalid value \"bad host!\" for listen_address (command line option --listen): expected a host name or IP address"
        );
    }

    #[test]
    fn bad_environment_value_names_the_variable() {
        assert_eq!(
            fail(&["amqp://broker"], &[("IDLE_CONNECTION_TIMEOUT", "abc")]),
            "invalid value \"abc\" for idle_connection_timeout (environment variable IDLE_CONNECTION_TIMEOUT): expected a whole number of seconds"
        );
    }

    #[test]
    fn bad_flag_value_names_the_flag() {
        assert_eq!(
            fail(&["--frame-max", "100", "amqp://broker"], &[]),
            "invalid value 100 for frame_max (command line option --frame-max): expected a whole number of bytes from 4096 to 1048576"
        );
        assert_eq!(
            fail(&["-p", "70000", "amqp://broker"], &[]),
            "invalid value 70000 for listen_port (command line option --port): expected a port number from 0 to 65535"
        );
    }

    #[test]
    fn negative_numbers_are_range_errors_not_unknown_flags() {
        assert_eq!(
            fail(&["--heartbeat", "-1", "amqp://broker"], &[]),
            "invalid value -1 for heartbeat (command line option --heartbeat): expected a whole number of seconds from 0 to 65535"
        );
    }

    #[test]
    fn bad_file_value_names_key_and_file() {
        let file = TempFile::new("listen_port = \"abc\"\n");
        assert_eq!(
            fail(&["-c", file.path(), "amqp://broker"], &[]),
            format!("invalid value \"abc\" for listen_port (config file {}): expected a port number from 0 to 65535", file.path())
        );
        let file = TempFile::new("frame_max = 100\n");
        assert_eq!(
            fail(&["-c", file.path(), "amqp://broker"], &[]),
            format!(
                "invalid value 100 for frame_max (config file {}): expected a whole number of bytes from 4096 to 1048576",
                file.path()
            )
        );
        let file = TempFile::new("channel_reuse = \"yes\"\n");
        assert!(fail(&["-c", file.path(), "amqp://broker"], &[])
            .contains("for channel_reuse (config file"));
        let file = TempFile::new("idle_connection_timeout = 1.5\n");
        assert!(fail(&["-c", file.path(), "amqp://broker"], &[])
            .ends_with("expected a whole number of seconds"));
    }

    #[test]
    fn bad_value_is_an_error_even_when_another_source_overrides_it() {
        assert_eq!(
            fail(&["-p", "1234", "amqp://broker"], &[("LISTEN_PORT", "abc")]),
            "invalid value \"abc\" for listen_port (environment variable LISTEN_PORT): expected a port number from 0 to 65535"
        );
    }

    #[test]
    fn zero_is_refused_where_it_cannot_work() {
        for (flag, key) in [
            ("--handshake-timeout", "handshake_timeout"),
            ("--upstream-connect-timeout", "upstream_connect_timeout"),
            ("--max-upstream-channels", "max_upstream_channels"),
            ("--channel-max", "channel_max"),
            ("--listen-backlog", "listen_backlog"),
        ] {
            let message = fail(&[flag, "0", "amqp://broker"], &[]);
            assert!(
                message.starts_with(&format!(
                    "invalid value 0 for {key} (command line option {flag})"
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn durations_are_seconds_with_an_upper_bound() {
        let config = run(
            &[
                "-t",
                "12",
                "--term-client-close-timeout",
                "0",
                "amqp://broker",
            ],
            &[],
        );
        assert_eq!(config.idle_connection_timeout, Duration::from_secs(12));
        assert_eq!(config.term_client_close_timeout, Duration::ZERO);
        let too_long = (MAX_DURATION_SECS + 1).to_string();
        assert!(fail(&["--term-timeout", &too_long, "amqp://broker"], &[])
            .contains("from 0 to 31536000"));
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let file = TempFile::new("foo = 1\n");
        assert_eq!(
            fail(&["-c", file.path(), "amqp://broker"], &[]),
            format!("unknown key \"foo\" in config file {}", file.path())
        );
        let file = TempFile::new("[server]\nlisten_port = 1\n");
        assert!(
            fail(&["-c", file.path(), "amqp://broker"], &[]).starts_with("unknown key \"server\"")
        );
    }

    #[test]
    fn syntax_error_gives_the_line() {
        let file = TempFile::new("listen_port = 1\nheartbeat = = 2\n");
        let message = fail(&["-c", file.path(), "amqp://broker"], &[]);
        assert!(
            message.starts_with(&format!(
                "syntax error in config file {} at line 2, column",
                file.path()
            )),
            "{message}"
        );
    }

    #[test]
    fn unreadable_file_is_reported() {
        let message = fail(&["-c", "/nonexistent/amqproxy.toml", "amqp://broker"], &[]);
        assert!(
            message.starts_with("cannot read config file /nonexistent/amqproxy.toml: "),
            "{message}"
        );
    }

    #[test]
    fn log_level_from_each_source() {
        assert_eq!(
            run(&["-d", "amqp://broker"], &[]).log_level,
            LevelFilter::Debug
        );
        assert_eq!(
            run(&["--log-level", "TRACE", "amqp://broker"], &[]).log_level,
            LevelFilter::Trace
        );
        assert_eq!(
            run(&["amqp://broker"], &[("LOG_LEVEL", "warning")]).log_level,
            LevelFilter::Warn
        );
        let file = TempFile::new("log_level = \"error\"\n");
        assert_eq!(
            run(&["-c", file.path(), "-d", "amqp://broker"], &[]).log_level,
            LevelFilter::Error
        );
        assert_eq!(
            fail(&["amqp://broker"], &[("LOG_LEVEL", "verbose")]),
            "invalid value \"verbose\" for log_level (environment variable LOG_LEVEL): expected one of off, error, warn, info, debug, trace"
        );
        assert!(fail(&["-d", "--log-level", "info", "amqp://broker"], &[])
            .contains("cannot be used with"));
    }

    #[test]
    fn channel_reuse_from_each_source() {
        assert!(!run(&["--no-channel-reuse", "amqp://broker"], &[]).channel_reuse);
        for (text, expected) in [
            ("no", false),
            ("0", false),
            ("FALSE", false),
            ("yes", true),
            ("1", true),
            ("true", true),
        ] {
            assert_eq!(
                run(&["amqp://broker"], &[("CHANNEL_REUSE", text)]).channel_reuse,
                expected,
                "{text}"
            );
        }
        let file = TempFile::new("channel_reuse = true\n");
        assert!(
            run(
                &["-c", file.path(), "--no-channel-reuse", "amqp://broker"],
                &[]
            )
            .channel_reuse
        );
        assert_eq!(
            fail(&["amqp://broker"], &[("CHANNEL_REUSE", "maybe")]),
            "invalid value \"maybe\" for channel_reuse (environment variable CHANNEL_REUSE): expected true, false, yes, no, on, off, 1 or 0"
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn exchange_types_default_to_none() {
        assert!(DEFAULT_EXCHANGE_TYPES.is_empty());
        assert!(run(&["amqp://broker"], &[]).exchange_types.is_empty());
    }

    #[test]
    fn exchange_types_text_becomes_an_array() {
        let doc = key_doc("exchange_types").expect("a key");
        assert_eq!(doc.kind, Kind::Names);
        let array = |list: &[&str]| {
            toml::Value::Array(
                list.iter()
                    .map(|name| toml::Value::String(name.to_string()))
                    .collect(),
            )
        };
        for (text, expected) in [
            ("a,b", array(&["a", "b"])),
            (
                " x-delayed-message , x-random ",
                array(&["x-delayed-message", "x-random"]),
            ),
            ("x-random", array(&["x-random"])),
            ("", array(&[])),
            ("  ", array(&[])),
        ] {
            assert_eq!(
                text_to_value(doc, text, Source::Env("EXCHANGE_TYPES")).ok(),
                Some(expected),
                "{text:?}"
            );
        }
    }

    #[test]
    fn exchange_types_from_each_source() {
        assert_eq!(
            run(
                &[
                    "--exchange-types",
                    "x-delayed-message,x-consistent-hash",
                    "amqp://broker"
                ],
                &[]
            )
            .exchange_types,
            names(&["x-delayed-message", "x-consistent-hash"])
        );
        assert_eq!(
            run(&["amqp://broker"], &[("EXCHANGE_TYPES", "x-random")]).exchange_types,
            names(&["x-random"])
        );
        let file = TempFile::new("exchange_types = [\"x-modulus-hash\", \"x-jms-topic\"]\n");
        assert_eq!(
            run(&["-c", file.path(), "amqp://broker"], &[]).exchange_types,
            names(&["x-modulus-hash", "x-jms-topic"])
        );
        let file = TempFile::new("exchange_types = []\n");
        assert!(run(&["-c", file.path(), "amqp://broker"], &[])
            .exchange_types
            .is_empty());
    }

    #[test]
    fn exchange_types_precedence_is_file_then_command_line_then_environment() {
        let env = [("EXCHANGE_TYPES", "from-env")];
        let file = TempFile::new("exchange_types = [\"from-file\"]\n");
        assert_eq!(
            run(
                &[
                    "-c",
                    file.path(),
                    "--exchange-types",
                    "from-cli",
                    "amqp://broker"
                ],
                &env
            )
            .exchange_types,
            names(&["from-file"])
        );
        assert_eq!(
            run(&["--exchange-types", "from-cli", "amqp://broker"], &env).exchange_types,
            names(&["from-cli"])
        );
        assert_eq!(
            run(&["amqp://broker"], &env).exchange_types,
            names(&["from-env"])
        );
        // An empty list given on the command line still wins over the environment.
        assert!(run(&["--exchange-types", "", "amqp://broker"], &env)
            .exchange_types
            .is_empty());
        // A set-but-empty variable counts as unset, which is the empty list too.
        assert!(run(&["amqp://broker"], &[("EXCHANGE_TYPES", "")])
            .exchange_types
            .is_empty());
    }

    #[test]
    fn exchange_types_duplicates_are_removed_in_order() {
        assert_eq!(
            run(&["--exchange-types", "b,a, b,a,c", "amqp://broker"], &[]).exchange_types,
            names(&["b", "a", "c"])
        );
        let file = TempFile::new("exchange_types = [\"x-random\", \" x-random \", \"X-random\"]\n");
        assert_eq!(
            run(&["-c", file.path(), "amqp://broker"], &[]).exchange_types,
            names(&["x-random", "X-random"])
        );
    }

    #[test]
    fn exchange_types_bad_element_names_key_and_source() {
        let expected =
            "a list of names, each 1 to 255 printable ASCII characters without spaces or commas";
        assert_eq!(
            fail(&["--exchange-types", "x-random,x random", "amqp://broker"], &[]),
            format!("invalid value \"x-random,x random\" for exchange_types (command line option --exchange-types): expected {expected} (not \"x random\")")
        );
        assert_eq!(
            fail(&["amqp://broker"], &[("EXCHANGE_TYPES", "a,,b")]),
            format!("invalid value \"a,,b\" for exchange_types (environment variable EXCHANGE_TYPES): expected {expected} (not an empty name)")
        );
        assert_eq!(
            fail(&["amqp://broker"], &[("EXCHANGE_TYPES", "a,")]),
            format!("invalid value \"a,\" for exchange_types (environment variable EXCHANGE_TYPES): expected {expected} (not an empty name)")
        );
        let long = "x".repeat(256);
        assert!(fail(&["--exchange-types", &long, "amqp://broker"], &[])
            .ends_with("(not a name of 256 bytes)"));
        assert_eq!(
            run(
                &["--exchange-types", &"x".repeat(255), "amqp://broker"],
                &[]
            )
            .exchange_types,
            names(&[&"x".repeat(255)])
        );
        assert!(
            fail(&["--exchange-types", "caf\u{e9}", "amqp://broker"], &[])
                .ends_with("(not \"caf\u{e9}\")")
        );
        assert!(
            fail(&["--exchange-types", "tab\there", "amqp://broker"], &[])
                .ends_with("(not \"tab\\there\")")
        );

        let file = TempFile::new("exchange_types = [\"x-random\", \"a,b\"]\n");
        assert_eq!(
            fail(&["-c", file.path(), "amqp://broker"], &[]),
            format!("invalid value [\"x-random\", \"a,b\"] for exchange_types (config file {}): expected {expected} (not \"a,b\")", file.path())
        );
        let file = TempFile::new("exchange_types = [\"\"]\n");
        assert!(fail(&["-c", file.path(), "amqp://broker"], &[]).ends_with("(not an empty name)"));
        for text in [
            "exchange_types = \"x-random\"\n",
            "exchange_types = [\"x-random\", 1]\n",
            "exchange_types = [[\"x-random\"]]\n",
        ] {
            let file = TempFile::new(text);
            let message = fail(&["-c", file.path(), "amqp://broker"], &[]);
            assert!(
                message.contains(&format!("for exchange_types (config file {})", file.path()))
                    && message.ends_with(&format!("expected {expected}")),
                "{message}"
            );
        }
        // Refused even where the file overrides the bad value.
        let file = TempFile::new("exchange_types = []\n");
        assert!(fail(
            &["-c", file.path(), "amqp://broker"],
            &[("EXCHANGE_TYPES", "bad type")]
        )
        .contains("(environment variable EXCHANGE_TYPES)"));
    }

    #[test]
    fn workers_zero_means_one_per_cpu() {
        assert_eq!(
            run(&["--workers", "0", "amqp://broker"], &[]).workers,
            resolve_workers(0)
        );
        assert!(resolve_workers(0) >= 1);
        assert_eq!(run(&["--workers", "3", "amqp://broker"], &[]).workers, 3);
        assert!(fail(&["--workers", "5000", "amqp://broker"], &[]).contains("from 0 to 254"));
    }

    #[test]
    fn worker_limit_is_the_event_loops() {
        assert_eq!(MAX_WORKERS as usize, crate::server::token::MAX_WORKERS);
    }

    #[test]
    fn client_buffer_must_hold_a_frame() {
        let file = TempFile::new("client_buffer_limit = 8192\n");
        assert_eq!(
            fail(&["-c", file.path(), "--frame-max", "65536", "amqp://broker"], &[]),
            format!(
                "client_buffer_limit 8192 (config file {}) is smaller than frame_max 65536 (command line option --frame-max): a client's buffer must hold one whole frame",
                file.path()
            )
        );
        assert_eq!(
            run(
                &[
                    "--client-buffer-limit",
                    "4096",
                    "--frame-max",
                    "4096",
                    "amqp://broker"
                ],
                &[]
            )
            .client_buffer_limit,
            4096
        );
    }

    #[test]
    fn upstream_from_file_and_argument() {
        let file = TempFile::new("upstream = \"amqps://broker\"\n");
        let config = run(&["-c", file.path()], &[]);
        assert_eq!(
            config.upstream,
            UpstreamUrl {
                tls: true,
                host: "broker".to_string(),
                port: 5671
            }
        );
    }

    #[test]
    fn bad_upstream_names_the_positional_argument() {
        assert_eq!(
            fail(&["http://broker"], &[]),
            "invalid value \"http://broker\" for upstream (command line argument UPSTREAM_URL): expected an amqp:// or amqps:// URL (unsupported scheme \"http\")"
        );
    }

    #[test]
    fn bad_upstream_never_shows_the_password() {
        let message = fail(
            &[],
            &[("AMQP_URL", "amqp://guest:s3cret@broker:notaport/vhost")],
        );
        assert!(!message.contains("s3cret"), "{message}");
        assert!(
            message.contains("(environment variable AMQP_URL)"),
            "{message}"
        );
        let message = fail(&["amqp://guest:pa/ss3cret@broker"], &[]);
        assert!(!message.contains("ss3cret"), "{message}");
    }

    #[test]
    fn usage_errors_are_one_line() {
        let message = fail(&["--no-such-flag", "amqp://broker"], &[]);
        assert!(message.contains("--no-such-flag"), "{message}");
        assert!(matches!(
            load(args(&["--port"]), &env_of(&[])),
            Err(ConfigError::Usage(_))
        ));
    }

    #[test]
    fn help_and_version_exit() {
        let Ok(Loaded::Exit(help)) = load(args(&["--help"]), &env_of(&[])) else {
            panic!("--help must exit")
        };
        assert!(help.to_lowercase().contains("precedence"), "{help}");
        let Ok(Loaded::Exit(version)) = load(args(&["-v"]), &env_of(&[])) else {
            panic!("-v must exit")
        };
        assert!(
            version.starts_with(&format!("amqproxy {}", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
        assert!(version.ends_with('\n'));
    }

    #[test]
    fn health_check_needs_no_upstream_and_uses_every_source() {
        let file = TempFile::new("http_port = 8080\n");
        let config = run(
            &["--health-check", "-c", file.path()],
            &[("HTTP_ADDRESS", "127.0.0.2"), ("LISTEN_ADDRESS", "0.0.0.0")],
        );
        assert!(config.health_check);
        assert_eq!(
            (config.http_address.as_str(), config.http_port),
            ("127.0.0.2", 8080)
        );
        // A broker that is given is still checked, as a start would.
        assert!(fail(&["--health-check", "http://broker"], &[]).contains("for upstream"));
        assert!(!run(&["amqp://broker"], &[]).health_check);
        assert!(matches!(
            load(args(&[]), &env_of(&[])),
            Err(ConfigError::MissingUpstream)
        ));
    }

    #[test]
    fn load_file_returns_the_file_settings_only() {
        let file = TempFile::new("listen_port = 5\nchannel_reuse = false\n");
        let settings = load_file(&file.0).expect("valid file");
        assert_eq!(
            settings,
            FileConfig {
                listen_port: Some(5),
                channel_reuse: Some(false),
                ..FileConfig::default()
            }
        );
        let file = TempFile::new("listen_port = 0.5\n");
        assert!(matches!(
            load_file(&file.0),
            Err(ConfigError::InvalidValue {
                key: "listen_port",
                ..
            })
        ));
    }

    #[test]
    fn key_defaults_match_the_default_constants() {
        let mut text = String::from("upstream = \"amqp://broker\"\nhttp_address = \"localhost\"\n");
        for doc in KEYS {
            if let Some(default) = doc.default {
                text.push_str(&format!("{} = {}\n", doc.key, default));
            }
        }
        let file = TempFile::new(&text);
        let mut config = run(&["-c", file.path()], &[]);
        config.config_file = None;
        assert_eq!(config, Config::with_defaults(broker()));
    }

    #[test]
    fn keys_are_unique_and_every_key_is_a_file_field() {
        let mut keys: Vec<_> = KEYS.iter().map(|doc| doc.key).collect();
        let mut envs: Vec<_> = KEYS.iter().filter_map(|doc| doc.env).collect();
        let mut longs: Vec<_> = KEYS.iter().filter_map(|doc| doc.long).collect();
        for list in [&mut keys, &mut envs, &mut longs] {
            let before = list.len();
            list.sort_unstable();
            list.dedup();
            assert_eq!(list.len(), before);
        }
        for doc in KEYS {
            let value = match doc.kind {
                Kind::Int { min, .. } => toml::Value::Integer(min as i64),
                Kind::Bool => toml::Value::Boolean(true),
                Kind::Url => toml::Value::String("amqp://broker".to_string()),
                Kind::LogLevel => toml::Value::String("info".to_string()),
                Kind::Host => toml::Value::String("localhost".to_string()),
                Kind::Path => toml::Value::String("/etc/amqproxy/cert.pem".to_string()),
                Kind::Names => toml::Value::Array(Vec::new()),
            };
            let mut table = toml::Table::new();
            table.insert(doc.key.to_string(), value);
            assert_ne!(
                to_file_config(table, &Origin::Env).ok(),
                Some(FileConfig::default()),
                "{}",
                doc.key
            );
        }
    }

    #[test]
    fn url_default_ports() {
        assert_eq!(UpstreamUrl::parse("amqp://broker"), Ok(broker()));
        assert_eq!(
            UpstreamUrl::parse("amqps://broker"),
            Ok(UpstreamUrl {
                tls: true,
                host: "broker".to_string(),
                port: 5671
            })
        );
        assert_eq!(UpstreamUrl::parse("AMQP://broker:"), Ok(broker()));
    }

    #[test]
    fn url_explicit_port_and_ignored_parts() {
        let expected = UpstreamUrl {
            tls: false,
            host: "broker".to_string(),
            port: 5000,
        };
        for text in [
            "amqp://broker:5000",
            "amqp://broker:5000/",
            "amqp://broker:5000/%2F",
            "amqp://guest:guest@broker:5000/vhost?heartbeat=10",
            "amqp://user@broker:5000#x",
            " amqp://broker:5000 ",
        ] {
            assert_eq!(UpstreamUrl::parse(text), Ok(expected.clone()), "{text}");
        }
    }

    #[test]
    fn url_ipv6_in_brackets() {
        let url = UpstreamUrl::parse("amqp://[::1]:5673").expect("valid");
        assert_eq!(
            url,
            UpstreamUrl {
                tls: false,
                host: "::1".to_string(),
                port: 5673
            }
        );
        assert_eq!(url.addr_string(), "[::1]:5673");
        assert_eq!(url.to_string(), "amqp://[::1]:5673");
        assert_eq!(
            UpstreamUrl::parse("amqps://u:p@[fe80::1]/v").map(|u| u.port),
            Ok(5671)
        );
        assert_eq!(
            UpstreamUrl::parse("amqp://::1:5672"),
            Err(UrlError::InvalidHost)
        );
        assert_eq!(
            UpstreamUrl::parse("amqp://[::1"),
            Err(UrlError::InvalidHost)
        );
        assert_eq!(
            UpstreamUrl::parse("amqp://[nothex]:5672"),
            Err(UrlError::InvalidHost)
        );
        assert_eq!(
            UpstreamUrl::parse("amqp://[::1]5672"),
            Err(UrlError::InvalidHost)
        );
    }

    #[test]
    fn url_display_and_addr_string() {
        let url = UpstreamUrl::parse("amqps://user:pw@broker.example/vh").expect("valid");
        assert_eq!(url.to_string(), "amqps://broker.example:5671");
        assert_eq!(url.addr_string(), "broker.example:5671");
        assert_eq!(
            "amqp://10.1.2.3"
                .parse::<UpstreamUrl>()
                .map(|u| u.addr_string()),
            Ok("10.1.2.3:5672".to_string())
        );
    }

    #[test]
    fn url_rejections() {
        assert_eq!(
            UpstreamUrl::parse("http://broker"),
            Err(UrlError::UnsupportedScheme("http".to_string()))
        );
        assert_eq!(
            UpstreamUrl::parse("broker:5672"),
            Err(UrlError::MissingScheme)
        );
        assert_eq!(UpstreamUrl::parse(""), Err(UrlError::MissingScheme));
        for text in [
            "amqp://",
            "amqp:///vhost",
            "amqp://:5672",
            "amqp://user:pw@/vhost",
        ] {
            assert_eq!(
                UpstreamUrl::parse(text),
                Err(UrlError::MissingHost),
                "{text}"
            );
        }
        for text in [
            "amqp://broker:0",
            "amqp://broker:65536",
            "amqp://broker:abc",
            "amqp://broker:+5",
        ] {
            assert_eq!(
                UpstreamUrl::parse(text),
                Err(UrlError::InvalidPort),
                "{text}"
            );
        }
        assert_eq!(
            UpstreamUrl::parse("amqp://bro ker"),
            Err(UrlError::InvalidHost)
        );
    }
}
