//! The event-loop thread: owns the `Poll`, the listeners and the `Waker`.
//! It accepts clients (round-robin over workers, refusing past
//! `max_client_connections`) and routes readiness events to the worker that
//! owns the socket. It never reads or writes a connection itself.
//!
//! Queues to workers are bounded; when one is full the event is kept in a
//! per-worker backlog (merged per token, so its size is bounded by that
//! worker's socket count) and the worker is flagged; once it has drained its
//! queue it wakes the loop through the `Waker`, which retries the backlog.
//! The loop never blocks on a worker and never busy-polls.

use super::lifecycle::{Lifecycle, Next};
use super::token;
use super::worker::{Ready, WorkerHandle, WorkerMsg};
use super::Shared;
use crossbeam_channel::TrySendError;
use mio::event::Event;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Accept errors such as EMFILE (and a full worker queue) are retried after
/// this pause, not in a busy loop.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// How often a shutdown in progress is checked.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(50);

pub struct EventLoop {
    poll: Poll,
    listeners: Vec<mio::net::TcpListener>,
    /// Per listener: its TLS configuration when it is a TLS listener.
    listener_tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    workers: Vec<WorkerHandle>,
    /// Per worker: events that did not fit its queue, merged by token.
    backlog: Vec<HashMap<Token, Ready>>,
    shared: Arc<Shared>,
    next_worker: usize,
    /// Listeners with connections left to accept (after an error or a full
    /// queue); edge-triggered readiness will not report them again.
    accept_pending: Vec<bool>,
    waker: Arc<Waker>,
    signals: Signals,
    lifecycle: Lifecycle,
}

impl EventLoop {
    pub fn new(
        listeners: Vec<(mio::net::TcpListener, Option<Arc<rustls::ServerConfig>>)>,
        shared: Arc<Shared>,
        lifecycle: Lifecycle,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, token::SIGNALS, Interest::READABLE)?;
        let (mut listeners, listener_tls): (Vec<_>, Vec<_>) = listeners.into_iter().unzip();
        for (i, l) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(l, token::listener(i), Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), token::WAKER)?);
        let n = listeners.len();
        Ok(EventLoop {
            poll,
            listeners,
            listener_tls,
            workers: Vec::new(),
            backlog: Vec::new(),
            shared,
            next_worker: 0,
            accept_pending: vec![false; n],
            waker,
            signals,
            lifecycle,
        })
    }

    /// Workers use it to tell the loop they have room again after the loop
    /// found their queue full.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    pub fn registry(&self) -> io::Result<Registry> {
        self.poll.registry().try_clone()
    }

    pub fn add_worker(&mut self, handle: WorkerHandle) {
        self.workers.push(handle);
        self.backlog.push(HashMap::new());
    }

    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            // A backlog is retried when its worker wakes us; pending accepts
            // (after EMFILE or a full queue) and a shutdown in progress
            // need a timed look.
            let timeout = if self.lifecycle.shutting_down() {
                Some(SHUTDOWN_CHECK)
            } else if self.accept_pending.iter().any(|p| *p) {
                Some(ACCEPT_RETRY)
            } else {
                None
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.retry_backlog();
            for event in events.iter() {
                let t = event.token();
                if t == token::WAKER {
                    continue;
                }
                if t == token::SIGNALS {
                    let signals: Vec<i32> = self.signals.pending().collect();
                    for signal in signals {
                        if self
                            .lifecycle
                            .on_signal(signal, &self.workers, &self.shared)
                            == Next::StopAccepting
                        {
                            self.stop_accepting();
                        }
                        if let Some(tls) = self.lifecycle.take_listener_tls() {
                            for slot in self.listener_tls.iter_mut().flatten() {
                                *slot = tls.clone();
                            }
                        }
                    }
                    continue;
                }
                if let Some(i) = token::listener_index(t) {
                    // After a shutdown signal in the same batch the
                    // listeners are gone: ignore their late events.
                    if let Some(pending) = self.accept_pending.get_mut(i) {
                        *pending = true;
                    }
                    continue;
                }
                self.route(t, ready_of(event));
            }
            for i in 0..self.listeners.len() {
                if self.accept_pending[i] {
                    self.accept(i);
                }
            }
            if self.lifecycle.check(&self.workers) == Next::Exit {
                return Ok(());
            }
        }
    }

    fn stop_accepting(&mut self) {
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l);
        }
        self.listeners.clear();
        self.listener_tls.clear();
        self.accept_pending.clear();
    }

    fn route(&mut self, t: Token, ready: Ready) {
        let w = token::worker_of(t);
        let Some(worker) = self.workers.get(w) else {
            return;
        };
        if !self.backlog[w].is_empty() {
            merge(&mut self.backlog[w], t, ready);
            return;
        }
        if let Err(TrySendError::Full(_)) = worker.send(WorkerMsg::Ready(t, ready)) {
            merge(&mut self.backlog[w], t, ready);
            worker.set_backlogged();
        }
    }

    fn retry_backlog(&mut self) {
        for (w, backlog) in self.backlog.iter_mut().enumerate() {
            let keys: Vec<Token> = backlog.keys().copied().collect();
            for t in keys {
                let Some(ready) = backlog.get(&t).copied() else {
                    continue;
                };
                match self.workers[w].send(WorkerMsg::Ready(t, ready)) {
                    Ok(()) => {
                        backlog.remove(&t);
                    }
                    Err(_) => {
                        self.workers[w].set_backlogged();
                        break;
                    }
                }
            }
        }
    }

    /// Accepts until the listener is drained. Returns false if it had to
    /// stop early (error or full queue) and should be retried.
    fn accept(&mut self, i: usize) -> bool {
        loop {
            match self.listeners[i].accept() {
                Ok((stream, peer)) => {
                    let max = self.shared.max_client_connections.load(Ordering::Relaxed);
                    let open = self.shared.client_connections.load(Ordering::Relaxed);
                    if max > 0 && open >= max {
                        log::warn!(
                            "refusing client {peer}: max_client_connections ({max}) reached"
                        );
                        self.shared
                            .metrics
                            .clients_refused
                            .fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    }
                    self.shared
                        .client_connections
                        .fetch_add(1, Ordering::Relaxed);
                    let w = self.next_worker % self.workers.len().max(1);
                    self.next_worker = self.next_worker.wrapping_add(1);
                    match self.workers[w].send(WorkerMsg::Accept(
                        stream,
                        peer,
                        self.listener_tls[i].clone(),
                    )) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                            // Dropping the stream closes it; the client may retry.
                            log::warn!("refusing client {peer}: worker {w} queue is full");
                            self.shared
                                .client_connections
                                .fetch_sub(1, Ordering::Relaxed);
                            return false;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending[i] = false;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return false;
                }
            }
        }
    }
}

fn ready_of(event: &Event) -> Ready {
    Ready {
        readable: event.is_readable() || event.is_read_closed(),
        writable: event.is_writable(),
        error: event.is_error() || event.is_write_closed(),
    }
}

fn merge(backlog: &mut HashMap<Token, Ready>, t: Token, ready: Ready) {
    let entry = backlog.entry(t).or_default();
    entry.readable |= ready.readable;
    entry.writable |= ready.writable;
    entry.error |= ready.error;
}
