//! Exclusive queues on a shared upstream connection.
//!
//! To the broker every client on an upstream connection is the same
//! connection, so it would let any of them use another's exclusive queue,
//! and would keep the queue until the *upstream* connection closes. The
//! proxy restores what a direct connection guarantees: it records the
//! exclusive queues each client declares (server-named ones from
//! DeclareOk), refuses other clients of the same upstream connection with
//! the broker's own answer (Channel.Close 405 RESOURCE_LOCKED), and deletes
//! the queues upstream when their owner goes away. Publishing to them stays
//! allowed, as on the broker.

use super::Shard;
use crate::core::client::ClientState;
use crate::core::upstream::{Slot, SlotState, UpstreamState};
use crate::core::{ClientId, UpstreamId};
use crate::protocol::codec::{put_shortstr, put_u16};
use crate::protocol::constants::{method, reply};
use crate::protocol::methods::{self, put_channel_open, put_close, put_method};

/// Methods whose first field after the ticket is a queue name that an
/// exclusive queue's owner alone may use.
pub(super) fn touches_queue(id: method::Id) -> bool {
    matches!(
        id,
        method::QUEUE_DECLARE
            | method::QUEUE_BIND
            | method::QUEUE_UNBIND
            | method::QUEUE_PURGE
            | method::QUEUE_DELETE
            | method::BASIC_CONSUME
            | method::BASIC_GET
    )
}

/// The queue name of such a method (already validated against the spec).
pub(super) fn queue_of(payload: &[u8]) -> Option<&[u8]> {
    let mut r = methods::arguments(payload);
    r.u16().ok()?;
    r.shortstr().ok()
}

/// Queue.Declare's flags: (passive, exclusive, nowait).
fn declare_flags(payload: &[u8]) -> Option<(bool, bool, bool)> {
    let mut r = methods::arguments(payload);
    r.u16().ok()?;
    r.shortstr().ok()?;
    let bits = r.u8().ok()?;
    Some((bits & 1 != 0, bits & 4 != 0, bits & 16 != 0))
}

impl Shard {
    /// Checks a client's queue method against the exclusive queues of its
    /// upstream connection. Returns true when the proxy refused it (the
    /// channel is being closed with 405); records declares and deletes by
    /// the owner.
    pub(super) fn exclusive_refused(
        &mut self,
        id: ClientId,
        ch: u16,
        mid: method::Id,
        payload: &[u8],
    ) -> bool {
        if !touches_queue(mid) {
            return false;
        }
        let Some(link) = self.link(id, ch) else {
            return false;
        };
        let uid = link.upstream;
        let Some(queue) = queue_of(payload) else {
            return false;
        };
        let owner = self
            .upstreams
            .get(uid.0)
            .and_then(|u| u.exclusive.get(queue).copied());
        if owner.is_some_and(|o| o != id) {
            let vhost = self
                .upstream_credentials(uid)
                .map(|c| c.vhost.clone())
                .unwrap_or_default();
            let text = format!(
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{}' in vhost '{vhost}'. \
                 It could be originally declared on another connection or the exclusive property value \
                 does not match that of the original declaration.",
                String::from_utf8_lossy(queue)
            );
            self.channel_error(id, ch, reply::RESOURCE_LOCKED, &text, mid);
            return true;
        }
        match mid {
            method::QUEUE_DECLARE => {
                let Some((passive, exclusive, nowait)) = declare_flags(payload) else {
                    return false;
                };
                let exclusive = exclusive && !passive;
                if nowait {
                    if exclusive && !queue.is_empty() {
                        self.record_exclusive(id, uid, queue.to_vec());
                    }
                } else if let Some(link) = self.link_mut(id, ch) {
                    // DeclareOk comes back in order; it names server-named queues.
                    link.declares.push_back(exclusive);
                }
            }
            method::QUEUE_DELETE if owner == Some(id) => {
                let queue = queue.to_vec();
                if let Some(u) = self.upstreams.get_mut(uid.0) {
                    u.exclusive.remove(&queue);
                }
                if let Some(c) = self.clients.get_mut(id.0) {
                    c.exclusive_queues.remove(&(uid, queue));
                }
            }
            _ => {}
        }
        false
    }

    /// A Queue.DeclareOk from the broker for a client's channel.
    pub(super) fn exclusive_declare_ok(
        &mut self,
        uid: UpstreamId,
        client: ClientId,
        ch: u16,
        payload: &[u8],
    ) {
        let Some(link) = self.link_mut(client, ch) else {
            return;
        };
        if link.declares.pop_front() != Some(true) {
            return;
        }
        let mut r = methods::arguments(payload);
        if let Ok(queue) = r.shortstr() {
            self.record_exclusive(client, uid, queue.to_vec());
        }
    }

    fn record_exclusive(&mut self, client: ClientId, uid: UpstreamId, queue: Vec<u8>) {
        if let Some(u) = self.upstreams.get_mut(uid.0) {
            u.exclusive.insert(queue.clone(), client);
        }
        if let Some(c) = self.clients.get_mut(client.0) {
            c.exclusive_queues.insert((uid, queue));
        }
    }

    /// The owner is gone: delete its exclusive queues upstream, each on a
    /// channel of the proxy's own (Open, Queue.Delete nowait, Close,
    /// pipelined; the slot is busy until the broker's CloseOk).
    pub(super) fn release_exclusive_queues(&mut self, client: ClientId) {
        let Some(c) = self.clients.get_mut(client.0) else {
            return;
        };
        // In a fixed order (the set's is random): deterministic output.
        let mut queues: Vec<_> = std::mem::take(&mut c.exclusive_queues)
            .into_iter()
            .collect();
        queues.sort();
        // One channel per upstream connection, all its deletes pipelined on
        // it: a client may hold more exclusive queues than there are
        // channel numbers.
        let mut i = 0;
        while i < queues.len() {
            let uid = queues[i].0;
            let end = i + queues[i..].iter().take_while(|(u, _)| *u == uid).count();
            let group = &queues[i..end];
            i = end;
            let Some(u) = self.upstreams.get_mut(uid.0) else {
                continue;
            };
            let mine: Vec<&Vec<u8>> = group
                .iter()
                .map(|(_, q)| q)
                .filter(|q| u.exclusive.get(*q) == Some(&client))
                .collect();
            for q in &mine {
                u.exclusive.remove(*q);
            }
            if mine.is_empty() || u.state != UpstreamState::Open {
                continue; // the broker deletes them with the connection
            }
            // Owner (client, 0): no client channel; the broker's CloseOk
            // tells the client's close that the queues are gone.
            let Some(n) = u.allocate(Slot {
                state: SlotState::Closing,
                owner: Some((client, 0)),
            }) else {
                log::warn!(
                    "cannot delete {} exclusive queues: no free upstream channel",
                    mine.len()
                );
                continue;
            };
            self.upstream_send(uid, |out| {
                put_channel_open(out, n);
                for q in &mine {
                    put_method(out, n, method::QUEUE_DELETE, |b| {
                        put_u16(b, 0);
                        put_shortstr(b, q);
                        b.push(0b100); // nowait
                    });
                }
                put_close(
                    out,
                    n,
                    reply::SUCCESS,
                    b"exclusive queue owner left",
                    (0, 0),
                );
            });
            if let Some(c) = self.clients.get_mut(client.0) {
                c.releasing.push((uid, n));
            }
        }
    }

    /// Deletions of a client's exclusive queues that are over (the
    /// broker's CloseOk for the channel that deleted one, or the upstream
    /// connection gone): a closing client gets its CloseOk after the last.
    pub(super) fn exclusive_released(
        &mut self,
        client: ClientId,
        done: impl Fn(&(UpstreamId, u16)) -> bool,
    ) {
        let Some(c) = self.clients.get_mut(client.0) else {
            return;
        };
        let before = c.releasing.len();
        c.releasing.retain(|r| !done(r));
        if c.releasing.len() < before && c.releasing.is_empty() && c.state == ClientState::Closing {
            self.send_close_ok(client);
        }
    }
}
