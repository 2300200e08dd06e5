//! Consumer tags per channel. RabbitMQ answers a Basic.Consume that reuses
//! a tag still active on its channel with a *connection* error (530
//! NOT_ALLOWED, "attempt to reuse consumer tag"), which would close the
//! shared upstream connection; the proxy tracks the tags of each client
//! channel and answers that error itself. A hash set: a client may hold
//! any number of consumers, and a list made each Consume cost O(consumers)
//! on the worker every client of it shares.

use super::exclusive::queue_of;
use super::Shard;
use crate::core::errors::ConnectionError;
use crate::core::ClientId;
use crate::protocol::constants::method;
use crate::protocol::methods;

/// Basic.Consume's consumer tag (ticket and queue come first).
fn consume_tag(payload: &[u8]) -> Option<&[u8]> {
    let mut r = methods::arguments(payload);
    r.u16().ok()?;
    r.shortstr().ok()?;
    r.shortstr().ok()
}

const DIRECT_REPLY_TO: &[u8] = b"amq.rabbitmq.reply-to";

/// Basic.Consume's nowait bit (after queue, tag; bits: no-local, no-ack,
/// exclusive, nowait).
fn nowait(payload: &[u8]) -> bool {
    let mut r = methods::arguments(payload);
    let bits = r
        .u16()
        .and_then(|_| r.shortstr())
        .and_then(|_| r.shortstr())
        .and_then(|_| r.u8());
    bits.is_ok_and(|b| b & 8 != 0)
}

/// The consumer tag that opens Basic.Cancel, CancelOk and ConsumeOk.
fn leading_tag(payload: &[u8]) -> Option<&[u8]> {
    methods::arguments(payload).shortstr().ok()
}

impl Shard {
    /// Tracks a client's Basic.Consume and Basic.Cancel; refuses a tag that
    /// is already active on the channel.
    pub(super) fn check_consumer_tags(
        &mut self,
        id: ClientId,
        ch: u16,
        mid: method::Id,
        payload: &[u8],
    ) -> Result<(), ConnectionError> {
        let Some(link) = self.link_mut(id, ch) else {
            return Ok(());
        };
        match mid {
            method::BASIC_CONSUME => {
                // RabbitMQ does not register direct reply-to consumers in
                // the channel's consumer map, so their tags are not "in use".
                let tracked = queue_of(payload) != Some(DIRECT_REPLY_TO);
                if !nowait(payload) {
                    link.consumes.push_back(tracked);
                }
                let Some(tag) = consume_tag(payload).filter(|t| tracked && !t.is_empty()) else {
                    return Ok(()); // the broker names it; ConsumeOk tells us
                };
                if link.consumer_tags.contains(tag) {
                    return Err(ConnectionError::not_allowed(
                        format!(
                            "attempt to reuse consumer tag '{}'",
                            String::from_utf8_lossy(tag)
                        ),
                        mid,
                    ));
                }
                link.consumer_tags.insert(tag.to_vec());
            }
            method::BASIC_CANCEL => {
                if let Some(tag) = leading_tag(payload) {
                    link.consumer_tags.remove(tag);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Basic.ConsumeOk from the broker: a server-named tag is now active.
    pub(super) fn consumer_started(&mut self, client: ClientId, ch: u16, payload: &[u8]) {
        let Some(link) = self.link_mut(client, ch) else {
            return;
        };
        if link.consumes.pop_front() == Some(false) {
            return;
        }
        if let Some(tag) = leading_tag(payload) {
            if !link.consumer_tags.contains(tag) {
                link.consumer_tags.insert(tag.to_vec());
            }
        }
    }

    /// Basic.Cancel (broker-initiated) or CancelOk: the tag is free again.
    pub(super) fn consumer_ended(&mut self, client: ClientId, ch: u16, payload: &[u8]) {
        let Some(link) = self.link_mut(client, ch) else {
            return;
        };
        if let Some(tag) = leading_tag(payload) {
            link.consumer_tags.remove(tag);
        }
    }
}
