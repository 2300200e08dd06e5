//! Signals, handled in the event loop: SIGTERM/SIGINT start a graceful
//! shutdown (a second one exits at once), SIGHUP reloads the configuration
//! file without dropping a connection.
//!
//! Shutdown: stop accepting (and /healthz turns 503) at once; let clients
//! leave for `term_client_close_timeout`; then the workers send
//! Connection.Close 320 to the rest; a worker with no clients left closes
//! its upstream connections with Connection.Close after every complete
//! publish; once all workers are done, or `term_timeout` after the signal,
//! the loop returns and the process exits 0.

use super::control::{CLOSING_CLIENTS, DRAINING};
use super::worker::WorkerHandle;
use super::{settings_from, Shared};
use crate::config::Config;
use std::sync::atomic::Ordering;
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
}

impl Lifecycle {
    pub fn new(config: Config, reload: Reload) -> Self {
        Lifecycle {
            config,
            reload,
            shutdown_started: None,
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
        let old = &self.config;
        let restart_only = [
            ("listen_address", old.listen_address != new.listen_address),
            ("listen_port", old.listen_port != new.listen_port),
            ("listen_backlog", old.listen_backlog != new.listen_backlog),
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
        }
        log::info!(
            "SIGHUP: configuration reloaded (log level {})",
            new.log_level
        );
        self.config = new;
    }
}
