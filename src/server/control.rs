//! Control from the event loop to the workers: shutdown phases, reloaded
//! settings and upstream TLS configuration. Shared state, not queue messages, so a full data queue can
//! never delay or drop a control request; workers check it every turn
//! (an atomic load) and at least every tick.

use super::worker::UpstreamTls;
use crate::core::Settings;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Shutdown phases, in order.
pub const RUNNING: u8 = 0;
/// Stop taking clients; close upstream connections once no client is left.
pub const DRAINING: u8 = 1;
/// Send Connection.Close (320) to the clients still connected.
pub const CLOSING_CLIENTS: u8 = 2;

#[derive(Default)]
pub struct Control {
    phase: AtomicU8,
    settings_pending: AtomicBool,
    settings: Mutex<Option<Settings>>,
    upstream_tls_pending: AtomicBool,
    upstream_tls: Mutex<Option<UpstreamTls>>,
    /// Set by the worker when it has nothing left and has stopped.
    done: AtomicBool,
}

impl Control {
    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    pub fn set_phase(&self, phase: u8) {
        self.phase.fetch_max(phase, Ordering::AcqRel);
    }

    pub fn reload(&self, settings: Settings) {
        *self.settings.lock() = Some(settings);
        self.settings_pending.store(true, Ordering::Release);
    }

    /// New settings, if a reload happened since the last call.
    pub fn take_settings(&self) -> Option<Settings> {
        if !self.settings_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.settings.lock().take()
    }

    /// A new upstream TLS configuration (re-read certificates) for the
    /// connections the worker opens from now on.
    pub fn reload_upstream_tls(&self, tls: UpstreamTls) {
        *self.upstream_tls.lock() = Some(tls);
        self.upstream_tls_pending.store(true, Ordering::Release);
    }

    pub fn take_upstream_tls(&self) -> Option<UpstreamTls> {
        if !self.upstream_tls_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.upstream_tls.lock().take()
    }

    pub fn set_done(&self) {
        self.done.store(true, Ordering::Release);
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward_and_settings_are_taken_once() {
        let c = Control::default();
        c.set_phase(CLOSING_CLIENTS);
        c.set_phase(DRAINING);
        assert_eq!(c.phase(), CLOSING_CLIENTS);
        assert!(c.take_settings().is_none());
        c.reload(Settings::default());
        assert!(c.take_settings().is_some());
        assert!(c.take_settings().is_none());
    }
}
