//! The I/O shell around the sans-IO core.
//!
//! Threads: one mio event-loop thread (`event_loop`) owns the `Poll`, the
//! listeners and the `Waker`; it accepts clients and routes readiness events
//! by token to a fixed pool of worker threads (`worker`) over bounded
//! crossbeam queues. Each worker owns one [`crate::core::Shard`] and the
//! sockets of its connections; it reads, runs the core, and writes. See
//! docs/ARCHITECTURE.md.

pub mod control;
pub mod event_loop;
pub mod lifecycle;
pub mod net;
pub mod tls;
pub mod token;
pub mod worker;

use crate::config::Config;
use crate::core::Settings;
use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// State shared by all threads; cold except for the atomics.
pub struct Shared {
    /// Client sockets currently open, for `max_client_connections`.
    pub client_connections: AtomicUsize,
    /// Reloadable, so atomic.
    pub max_client_connections: AtomicUsize,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Memory of every client output buffer, for `client_buffer_budget`
    /// (each worker's shard updates it) and `/metrics`.
    pub client_buffer_bytes: Arc<AtomicUsize>,
}

/// The core's view of the configuration.
pub fn settings_from(config: &Config) -> Settings {
    Settings {
        channel_max: config.channel_max,
        frame_max: config.frame_max,
        heartbeat: config.heartbeat,
        handshake_timeout: config.handshake_timeout,
        upstream_connect_timeout: config.upstream_connect_timeout,
        idle_connection_timeout: config.idle_connection_timeout,
        min_idle_connections: config.min_idle_connections,
        max_upstream_channels: config.max_upstream_channels,
        client_buffer_limit: config.client_buffer_limit,
        client_buffer_budget: config.client_buffer_budget,
        channel_reuse: config.channel_reuse,
        max_idle_channels: config.max_idle_channels,
        idle_channel_timeout: config.idle_channel_timeout,
        exchange_types: config.exchange_types.clone(),
        listen_name: format!("{}:{}", config.listen_address, config.listen_port),
        upstream_name: config.upstream.addr_string(),
    }
}

/// The upstream TLS options from the configuration.
pub fn upstream_tls_settings(config: &Config) -> tls::UpstreamTls {
    tls::UpstreamTls {
        ca_file: config.upstream_ca_file.clone(),
        cert_file: config.upstream_tls_cert.clone(),
        key_file: config.upstream_tls_key.clone(),
        server_name: config.upstream_tls_server_name.clone(),
        insecure: config.upstream_tls_insecure,
    }
}

/// The TLS client configuration for `upstream` (None unless amqps), from
/// the files and options of `config` (which SIGHUP may have re-read).
pub fn upstream_tls(
    config: &Config,
    upstream: &crate::config::UpstreamUrl,
) -> Result<worker::UpstreamTls, String> {
    if !upstream.tls {
        return Ok(None);
    }
    let settings = upstream_tls_settings(config);
    let client = tls::upstream_config(&settings)?;
    let name = tls::server_name(&settings, &upstream.host)?;
    Ok(Some((client, name)))
}

/// The TLS listener's port and files, when one is configured.
pub fn listener_tls_settings(config: &Config) -> Result<Option<(u16, tls::ListenerTls)>, String> {
    if config.tls_listen_port == 0 {
        return Ok(None);
    }
    let (Some(cert_file), Some(key_file)) = (&config.tls_cert_file, &config.tls_key_file) else {
        return Err("tls_listen_port needs tls_cert_file and tls_key_file".into());
    };
    Ok(Some((
        config.tls_listen_port,
        tls::ListenerTls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            client_ca_file: config.tls_client_ca_file.clone(),
        },
    )))
}

/// Binds the listeners, starts the workers and runs the event loop on the
/// calling thread until it fails.
pub fn run(config: Config, reload: lifecycle::Reload) -> io::Result<()> {
    let mut listeners: Vec<_> = net::bind_listeners(
        &config.listen_address,
        config.listen_port,
        config.listen_backlog,
    )?
    .into_iter()
    .map(|l| (l, None))
    .collect();
    for (l, _) in &listeners {
        log::info!("listening on {}", l.local_addr()?);
    }
    if let Some((port, tls)) = listener_tls_settings(&config).map_err(io::Error::other)? {
        let server = tls::listener_config(&tls).map_err(io::Error::other)?;
        for l in net::bind_listeners(&config.listen_address, port, config.listen_backlog)? {
            log::info!("listening for TLS on {}", l.local_addr()?);
            listeners.push((l, Some(server.clone())));
        }
    }
    log::info!("upstream {}", config.upstream);
    let workers = config.workers.clamp(1, token::MAX_WORKERS);
    let metrics = Arc::new(crate::metrics::Metrics::new(workers));
    crate::http::spawn(
        &config.http_address,
        config.http_port,
        metrics.clone(),
        config.upstream.addr_string(),
    )?;
    let shared = Arc::new(Shared {
        client_connections: AtomicUsize::new(0),
        max_client_connections: AtomicUsize::new(config.max_client_connections as usize),
        client_buffer_bytes: metrics.client_buffer_bytes.clone(),
        metrics,
    });
    let lifecycle = lifecycle::Lifecycle::new(config.clone(), reload);
    let mut event_loop = event_loop::EventLoop::new(listeners, shared.clone(), lifecycle)?;
    let settings = settings_from(&config);
    let upstream_tls = upstream_tls(&config, &config.upstream).map_err(io::Error::other)?;
    for index in 0..workers {
        let handle = worker::spawn(worker::Setup {
            index,
            settings: settings.clone(),
            upstream: config.upstream.addr_string(),
            upstream_tls: upstream_tls.clone(),
            registry: event_loop.registry()?,
            waker: event_loop.waker(),
            shared: shared.clone(),
        })?;
        event_loop.add_worker(handle);
    }
    log::info!("{workers} worker threads");
    event_loop.run()
}
