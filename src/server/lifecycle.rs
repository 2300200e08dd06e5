//! Signals, handled in the event loop: SIGTERM/SIGINT start a graceful
//! shutdown (a second one exits at once), SIGHUP reloads the configuration
//! file without dropping a connection, and re-reads the TLS certificates,
//! keys and CA files (for the connections made after it).
//!
//! Shutdown: stop accepting (and /healthz turns 503) at once; let clients
//! leave for `term_client_close_timeout`; then the workers send
//! Connection.Close 320 to the rest; a worker with no clients left closes
//! its upstream connections with Connection.Close after every complete
//! publish; once all workers are done, or `term_timeout` after the signal,
//! the loop returns and the process exits 0.

use super::control::{CLOSING_CLIENTS, DRAINING};
use super::worker::UpstreamTls;
use super::worker::WorkerHandle;
use super::{listener_tls_settings, settings_from, tls, upstream_tls, Shared};
use crate::config::Config;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Re-reads the configuration with the original arguments and environment.
pub type Reload = Box<dyn FnMut() -> Result<Config, String> + Send>;

/// What the event loop should do after a signal or a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Stop accepting: the loop drops its listeners.
    StopAccepting,
    /// Shutdown is complete (or timed out): return from the loop, exit 0.
    Exit,
}

pub struct Lifecycle {
    config: Config,
    reload: Reload,
    shutdown_started: Option<Instant>,
    /// A TLS listener configuration re-read by SIGHUP, for the event loop.
    new_listener_tls: Option<Arc<rustls::ServerConfig>>,
}

impl Lifecycle {
    pub fn new(config: Config, reload: Reload) -> Self {
        Lifecycle {
            config,
            reload,
            shutdown_started: None,
            new_listener_tls: None,
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown_started.is_some()
    }

    pub fn on_signal(&mut self, signal: i32, workers: &[WorkerHandle], shared: &Shared) -> Next {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        match signal {
            SIGTERM | SIGINT if self.shutdown_started.is_some() => {
                log::warn!("second signal: exiting at once");
                std::process::exit(1);
            }
            SIGTERM | SIGINT => {
                log::info!(
                    "shutting down: no new clients; clients get Connection.Close in {} s, everything is closed by {} s",
                    self.config.term_client_close_timeout.as_secs(),
                    self.config.term_timeout.as_secs()
                );
                self.shutdown_started = Some(Instant::now());
                shared.metrics.shutting_down.store(true, Ordering::Relaxed);
                for w in workers {
                    w.control.set_phase(DRAINING);
                }
                Next::StopAccepting
            }
            SIGHUP => {
                self.reload(workers, shared);
                Next::Continue
            }
            _ => Next::Continue,
        }
    }

    /// The TLS listener configuration a reload built, once.
    pub fn take_listener_tls(&mut self) -> Option<Arc<rustls::ServerConfig>> {
        self.new_listener_tls.take()
    }

    /// Moves a shutdown along; called every loop turn while shutting down.
    pub fn check(&mut self, workers: &[WorkerHandle]) -> Next {
        let Some(started) = self.shutdown_started else {
            return Next::Continue;
        };
        let elapsed = started.elapsed();
        if elapsed >= self.config.term_client_close_timeout {
            for w in workers {
                w.control.set_phase(CLOSING_CLIENTS);
            }
        }
        if workers.iter().all(|w| w.control.is_done()) {
            log::info!("shutdown complete");
            return Next::Exit;
        }
        if elapsed >= self.config.term_timeout {
            log::warn!("term_timeout reached: closing what is left");
            return Next::Exit;
        }
        Next::Continue
    }

    fn reload(&mut self, workers: &[WorkerHandle], shared: &Shared) {
        let new = match (self.reload)() {
            Ok(new) => new,
            Err(e) => {
                log::error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
                return;
            }
        };
        // Certificates are re-read even when their paths did not change
        // (a renewal replaces the files); a file that does not load
        // rejects the whole reload, like a bad configuration file.
        let (listener_tls, upstream_tls) = match self.tls_of(&new) {
            Ok(tls) => tls,
            Err(e) => {
                log::error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
                return;
            }
        };
        let old = &self.config;
        let restart_only = [
            ("listen_address", old.listen_address != new.listen_address),
            ("listen_port", old.listen_port != new.listen_port),
            ("listen_backlog", old.listen_backlog != new.listen_backlog),
            (
                "tls_listen_port",
                old.tls_listen_port != new.tls_listen_port,
            ),
            ("http_address", old.http_address != new.http_address),
            ("http_port", old.http_port != new.http_port),
            ("upstream", old.upstream != new.upstream),
            ("workers", old.workers != new.workers),
        ];
        for (key, changed) in restart_only {
            if changed {
                log::warn!("SIGHUP: {key} changed; it takes effect at the next restart");
            }
        }
        log::set_max_level(new.log_level);
        shared
            .max_client_connections
            .store(new.max_client_connections as usize, Ordering::Relaxed);
        let settings = settings_from(&new);
        for w in workers {
            w.control.reload(settings.clone());
            if let Some(tls) = &upstream_tls {
                w.control.reload_upstream_tls(tls.clone());
            }
        }
        if listener_tls.is_some() {
            log::info!("SIGHUP: TLS listener certificate re-read");
        }
        if upstream_tls.is_some() {
            log::info!("SIGHUP: upstream TLS files re-read");
        }
        self.new_listener_tls = listener_tls;
        log::info!(
            "SIGHUP: configuration reloaded (log level {})",
            new.log_level
        );
        self.config = new;
    }

    /// The TLS configurations of a reloaded config: the listener's, when
    /// the running proxy has a TLS listener (its port cannot change
    /// without a restart), and the upstream's, when the running upstream
    /// is amqps (likewise).
    #[allow(clippy::type_complexity)]
    fn tls_of(
        &self,
        new: &Config,
    ) -> Result<(Option<Arc<rustls::ServerConfig>>, Option<UpstreamTls>), String> {
        let listener = match listener_tls_settings(new)? {
            Some((_, settings)) if self.config.tls_listen_port != 0 => {
                Some(tls::listener_config(&settings)?)
            }
            _ => None,
        };
        let upstream = if self.config.upstream.tls {
            Some(upstream_tls(new, &self.config.upstream)?)
        } else {
            None
        };
        Ok((listener, upstream))
    }
}
