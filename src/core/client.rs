//! A client session: what the proxy knows about one client connection, and
//! the handshake pieces that need no other state (server properties, SASL
//! response parsing, TuneOk validation).
//!
//! The frame-by-frame behaviour lives in `shard::client_side`, because most
//! client frames also touch an upstream connection.

use super::errors::ConnectionError;
use super::pool::PoolId;
use super::UpstreamId;
use crate::protocol::constants::{method, reply, FRAME_MIN_SIZE};
use crate::protocol::methods::Tune;
use crate::protocol::table::{string, FieldTable, FieldValue};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// States are named for what the session waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    ExpectProtocolHeader,
    ExpectStartOk,
    ExpectTuneOk,
    ExpectOpen,
    /// Connection.Open received; waiting for an upstream connection of the
    /// pool to authenticate before answering OpenOk.
    ExpectUpstream,
    Open,
    /// We sent Connection.Close; only CloseOk (or Close) matters now.
    ExpectCloseOk,
    /// The client sent Connection.Close; its CloseOk waits until the
    /// broker has deleted its exclusive queues (as RabbitMQ deletes them
    /// before its CloseOk). Input is ignored.
    Closing,
    /// We sent CloseOk; the client closes the socket (as with RabbitMQ),
    /// or we do at the close deadline. Input is ignored.
    CloseOkSent,
    /// The socket is being flushed and closed; nothing more is processed.
    Closed,
}

/// What the client told us it understands (from its client properties).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCapabilities {
    pub connection_blocked: bool,
    pub consumer_cancel_notify: bool,
    pub authentication_failure_close: bool,
}

/// The client-visible state of one of its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Channel.Open sent (or queued) upstream; OpenOk not yet relayed.
    Opening,
    Open,
    /// The client sent Channel.Close; waiting for the upstream CloseOk.
    ClosingByClient,
    /// A Channel.Close was sent to the client (by the broker or the proxy);
    /// its frames on this channel are dropped until it answers CloseOk.
    ClosingByServer,
}

/// Where a content-bearing publish stands on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publishing {
    Idle,
    ExpectHeader,
    ExpectBody { remaining: u64 },
}

/// One client channel and the upstream channel it is mapped onto.
#[derive(Debug)]
pub struct ChannelLink {
    pub upstream: UpstreamId,
    pub upstream_channel: u16,
    pub state: ChannelState,
    pub publishing: Publishing,
    /// Frames of a publish not yet complete, already rewritten to the
    /// upstream channel number; sent upstream only once the body is whole.
    pub pending: Vec<u8>,
    /// Queue.Declares awaiting DeclareOk, oldest first: whether each was an
    /// exclusive declare (its DeclareOk names the queue to record).
    pub declares: std::collections::VecDeque<bool>,
    /// Consumer tags active on this channel.
    pub consumer_tags: std::collections::HashSet<Vec<u8>>,
    /// Since Channel.Open the client only did what leaves no state on the
    /// channel (see `reuse::leaves_no_state`), so it may be reused.
    pub safe: bool,
    /// Handed out from the idle list: the broker still remembers the
    /// previous client's last declared queue on it.
    pub reused: bool,
    /// This client declared a queue on the channel (so an empty queue name
    /// means its own queue).
    pub declared: bool,
    /// A Tx.Commit is outstanding: RabbitMQ answers anything but
    /// Channel.Close with a connection error until CommitOk.
    pub committing: bool,
    /// Basic.Consumes awaiting ConsumeOk: whether each one's tag is tracked
    /// (direct reply-to consumers are not, as on the broker).
    pub consumes: std::collections::VecDeque<bool>,
}

/// A client's channels by its channel number. Looked up for every frame,
/// so the hash is a multiply rather than SipHash (which took a fifth of the
/// proxy's CPU in the sink benchmark). A client can pick its channel
/// numbers to collide, but it has at most channel_max of them (65,535) and
/// only hurts its own worker's turn doing so.
pub type Channels = HashMap<u16, ChannelLink, BuildHasherDefault<ChannelHasher>>;

/// Fibonacci hashing of a u16, folded so the low bits (the table index)
/// depend on every bit of the channel number.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChannelHasher(u64);

impl Hasher for ChannelHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u16(u16::from(b) ^ (self.0 as u16).rotate_left(8));
        }
    }

    fn write_u16(&mut self, n: u16) {
        let h = (u64::from(n) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

#[derive(Debug)]
pub struct Client {
    pub peer: String,
    pub name: Option<String>,
    pub state: ClientState,
    pub capabilities: ClientCapabilities,
    pub pool: Option<PoolId>,
    /// Negotiated in TuneOk; our offer until then.
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub channels: Channels,
    /// Bytes of an incomplete frame carried over between reads.
    pub partial: Vec<u8>,
    pub out: super::outbuf::OutBuf,
    /// Capacity of the channels' unfinished publishes and of `partial`,
    /// as of the last read: counted in the buffer budget with `out`.
    pub inbound: usize,
    /// Bytes of `out` and `inbound` counted in the shared buffer budget.
    pub budgeted: usize,
    pub last_received: Instant,
    pub last_sent: Instant,
    /// Handshake or close deadline, whichever applies to the state.
    pub deadline: Option<Instant>,
    /// Reading stopped because an upstream it feeds is over its high water.
    pub paused: bool,
    /// Waiting for TuneOk/Open: credentials from StartOk.
    pub credentials: Option<super::pool::Credentials>,
    /// Exclusive queues this client declared, to delete when it leaves.
    pub exclusive_queues: std::collections::HashSet<(UpstreamId, Vec<u8>)>,
    /// Upstream channels deleting this client's exclusive queues, whose
    /// CloseOk a closing client's own CloseOk waits for.
    pub releasing: Vec<(UpstreamId, u16)>,
}

impl Client {
    pub fn new(peer: String, now: Instant, settings: &super::Settings) -> Self {
        Client {
            peer,
            name: None,
            state: ClientState::ExpectProtocolHeader,
            capabilities: ClientCapabilities::default(),
            pool: None,
            frame_max: settings.frame_max,
            channel_max: settings.channel_max,
            heartbeat: 0,
            channels: Channels::default(),
            partial: Vec::new(),
            out: super::outbuf::OutBuf::new(),
            inbound: 0,
            budgeted: 0,
            last_received: now,
            last_sent: now,
            deadline: Some(now + settings.handshake_timeout),
            paused: false,
            credentials: None,
            exclusive_queues: Default::default(),
            releasing: Vec::new(),
        }
    }

    /// "peer" or "peer (connection name)" for log lines.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("{} ({name})", self.peer),
            None => self.peer.clone(),
        }
    }
}

/// The server properties we announce in Connection.Start: RabbitMQ's
/// capability set, so client libraries enable the same features they would
/// with the broker directly.
pub fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap, FieldValue::Bool(true));
    }
    let mut props = FieldTable::default();
    props.insert("capabilities", FieldValue::Table(caps));
    props.insert("product", string("AMQProxy"));
    props.insert("version", string(env!("CARGO_PKG_VERSION")));
    props.insert("platform", string("Rust"));
    props.insert(
        "information",
        string("AMQP 0-9-1 connection and channel pooling proxy"),
    );
    props
}

pub fn capabilities_of(client_properties: &FieldTable) -> ClientCapabilities {
    ClientCapabilities {
        connection_blocked: client_properties.capability("connection.blocked"),
        consumer_cancel_notify: client_properties.capability("consumer_cancel_notify"),
        authentication_failure_close: client_properties.capability("authentication_failure_close"),
    }
}

/// User and password from a PLAIN or AMQPLAIN response.
pub fn parse_credentials(
    mechanism: &[u8],
    response: &[u8],
) -> Result<(String, Vec<u8>), ConnectionError> {
    let refused = |what: &str| {
        ConnectionError::new(
            reply::ACCESS_REFUSED,
            format!(
                "ACCESS_REFUSED - Login was refused using authentication mechanism {}: {what}",
                String::from_utf8_lossy(mechanism)
            ),
            method::CONNECTION_START_OK,
        )
    };
    let (user, password) = match mechanism {
        b"PLAIN" => {
            // [authzid] NUL authcid NUL passwd
            let mut parts = response.splitn(3, |b| *b == 0);
            let _authzid = parts.next();
            let user = parts
                .next()
                .ok_or_else(|| refused("malformed PLAIN response"))?;
            let password = parts
                .next()
                .ok_or_else(|| refused("malformed PLAIN response"))?;
            (user.to_vec(), password.to_vec())
        }
        b"AMQPLAIN" => {
            // A field table without its length prefix.
            let table = FieldTable::decode_body(response)
                .map_err(|_| refused("malformed AMQPLAIN table"))?;
            let field = |key: &str| match table.get(key) {
                Some(FieldValue::LongStr(v)) => Ok(v.clone()),
                _ => Err(refused("AMQPLAIN needs LOGIN and PASSWORD long strings")),
            };
            (field("LOGIN")?, field("PASSWORD")?)
        }
        _ => {
            return Err(ConnectionError::command_invalid(
                format!(
                    "unknown authentication mechanism '{}'",
                    String::from_utf8_lossy(mechanism)
                ),
                method::CONNECTION_START_OK,
            ))
        }
    };
    let user = String::from_utf8(user).map_err(|_| refused("user name is not UTF-8"))?;
    Ok((user, password))
}

/// Applies the client's TuneOk to our offer, with RabbitMQ's rules: 0 means
/// "whatever the server offered", frame_max below the minimum or above our
/// offer and channel_max above our offer are NOT_ALLOWED.
pub fn negotiate(offer: Tune, answer: Tune) -> Result<Tune, ConnectionError> {
    let frame_max = if answer.frame_max == 0 {
        offer.frame_max
    } else {
        answer.frame_max
    };
    if frame_max < FRAME_MIN_SIZE {
        return Err(ConnectionError::not_allowed(
            format!("frame_max={frame_max} < {FRAME_MIN_SIZE} min size"),
            method::CONNECTION_TUNE_OK,
        ));
    }
    if frame_max > offer.frame_max {
        return Err(ConnectionError::not_allowed(
            format!("frame_max={frame_max} > {} max size", offer.frame_max),
            method::CONNECTION_TUNE_OK,
        ));
    }
    let channel_max = if answer.channel_max == 0 {
        offer.channel_max
    } else {
        answer.channel_max
    };
    if channel_max > offer.channel_max {
        return Err(ConnectionError::not_allowed(
            format!("channel_max={channel_max} > {} max size", offer.channel_max),
            method::CONNECTION_TUNE_OK,
        ));
    }
    Ok(Tune {
        channel_max,
        frame_max,
        heartbeat: answer.heartbeat,
    })
}

/// The vhost of a Connection.Open, as text.
pub fn vhost_of(raw: &[u8]) -> Result<String, ConnectionError> {
    String::from_utf8(raw.to_vec()).map_err(|_| {
        ConnectionError::new(
            reply::INVALID_PATH,
            "INVALID_PATH - vhost is not UTF-8",
            method::CONNECTION_OPEN,
        )
    })
}

/// Reads `connection_name` from client properties, for logs only.
pub fn connection_name(props: &FieldTable) -> Option<String> {
    props.string("connection_name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_and_without_authzid() {
        assert_eq!(
            parse_credentials(b"PLAIN", b"\0guest\0secret").unwrap(),
            ("guest".into(), b"secret".to_vec())
        );
        assert_eq!(
            parse_credentials(b"PLAIN", b"admin\0guest\0a\0b").unwrap(),
            ("guest".into(), b"a\0b".to_vec())
        );
        assert_eq!(parse_credentials(b"PLAIN", b"guest").unwrap_err().code, 403);
    }

    #[test]
    fn amqplain_as_php_amqplib_sends_it() {
        let mut t = FieldTable::default();
        t.insert("LOGIN", string("guest"));
        t.insert("PASSWORD", string("pw"));
        let mut body = Vec::new();
        t.write_body(&mut body);
        assert_eq!(
            parse_credentials(b"AMQPLAIN", &body).unwrap(),
            ("guest".into(), b"pw".to_vec())
        );
    }

    #[test]
    fn amqplain_with_bad_types_is_refused() {
        // LOGIN as a 32-bit integer instead of a long string.
        let body = [5, b'L', b'O', b'G', b'I', b'N', b'I', 0, 0, 0, 1];
        assert_eq!(parse_credentials(b"AMQPLAIN", &body).unwrap_err().code, 403);
        assert_eq!(
            parse_credentials(b"AMQPLAIN", &[5, b'L']).unwrap_err().code,
            403
        );
    }

    #[test]
    fn unknown_mechanism_is_command_invalid() {
        assert_eq!(parse_credentials(b"EXTERNAL", b"").unwrap_err().code, 503);
    }

    #[test]
    fn tune_ok_negotiation() {
        let offer = Tune {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 60,
        };
        let t = negotiate(
            offer,
            Tune {
                channel_max: 0,
                frame_max: 0,
                heartbeat: 0,
            },
        )
        .unwrap();
        assert_eq!(
            t,
            Tune {
                channel_max: 2047,
                frame_max: 131072,
                heartbeat: 0
            }
        );
        let t = negotiate(
            offer,
            Tune {
                channel_max: 10,
                frame_max: 4096,
                heartbeat: 2,
            },
        )
        .unwrap();
        assert_eq!(
            t,
            Tune {
                channel_max: 10,
                frame_max: 4096,
                heartbeat: 2
            }
        );
        assert_eq!(
            negotiate(
                offer,
                Tune {
                    channel_max: 0,
                    frame_max: 100,
                    heartbeat: 0
                }
            )
            .unwrap_err()
            .code,
            530
        );
        assert_eq!(
            negotiate(
                offer,
                Tune {
                    channel_max: 0,
                    frame_max: 1 << 20,
                    heartbeat: 0
                }
            )
            .unwrap_err()
            .code,
            530
        );
        assert_eq!(
            negotiate(
                offer,
                Tune {
                    channel_max: 4000,
                    frame_max: 0,
                    heartbeat: 0
                }
            )
            .unwrap_err()
            .code,
            530
        );
    }

    #[test]
    fn capabilities_are_read_from_client_properties() {
        let mut caps = FieldTable::default();
        caps.insert("connection.blocked", FieldValue::Bool(true));
        let mut props = FieldTable::default();
        props.insert("capabilities", FieldValue::Table(caps));
        let c = capabilities_of(&props);
        assert!(c.connection_blocked && !c.consumer_cancel_notify);
    }

    #[test]
    fn channel_hash_spreads_every_number_over_the_table_index_bits() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<ChannelHasher>::default();
        // 65,535 channel numbers into 4,096 buckets by the low bits, as the
        // table indexes them: about 16 each, none crowded.
        let mut buckets = vec![0u32; 4096];
        for n in 1..=u16::MAX {
            buckets[(build.hash_one(n) & 4095) as usize] += 1;
        }
        let max = *buckets.iter().max().unwrap();
        assert!(max <= 40, "a bucket got {max}");
        // Numbers that differ only in high bits do not share low bits.
        let lows: std::collections::HashSet<_> =
            (0..64u16).map(|i| build.hash_one(i << 10) & 63).collect();
        assert!(lows.len() > 32, "{}", lows.len());
    }
}
