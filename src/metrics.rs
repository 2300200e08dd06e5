//! Metrics: names in one table, per-worker slots of atomics, and a pure
//! renderer of the Prometheus text format.
//!
//! Each shard keeps plain counters (`core::stats::Stats`); its worker
//! copies them, with its gauges and byte counts, into its own slot after
//! every tick — relaxed atomic stores, no lock, nothing on the per-frame
//! path. `/metrics` sums the slots and renders.

use crate::core::shard::ShardCounts;
use crate::core::stats::{Stats, CONNECT_LATENCY_BUCKETS};
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Bytes a worker moved through its sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub bytes_from_upstream: u64,
    pub bytes_to_upstream: u64,
}

/// Every value a worker publishes, by index into its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Value {
    ClientConnections,
    UpstreamConnections,
    ClientChannels,
    UpstreamChannels,
    IdleChannels,
    FramesFromClients,
    FramesFromUpstream,
    BytesFromClients,
    BytesToClients,
    BytesFromUpstream,
    BytesToUpstream,
    MessagesPublished,
    HandshakesOk,
    HandshakesRefused,
    HandshakesFailed,
    HandshakesTimedOut,
    UpstreamConnects,
    UpstreamConnectFailures,
    ReuseHits,
    ReuseMisses,
    ReuseDiscarded,
    BackpressurePauses,
    SlowConsumers,
    BudgetPublishers,
    LatencyCount,
    LatencySumMicros,
    /// First of the latency histogram's cumulative buckets.
    LatencyBucket0,
}

const SLOTS: usize = Value::LatencyBucket0 as usize + CONNECT_LATENCY_BUCKETS.len();

/// One worker's published values; written by that worker only.
pub struct WorkerSlot {
    values: [AtomicU64; SLOTS],
}

impl Default for WorkerSlot {
    fn default() -> Self {
        WorkerSlot {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl WorkerSlot {
    pub fn publish(&self, stats: &Stats, counts: &ShardCounts, io: &IoCounts) {
        use Value::*;
        let set = |v: Value, x: u64| self.values[v as usize].store(x, Relaxed);
        set(ClientConnections, counts.clients as u64);
        set(UpstreamConnections, counts.open_upstreams as u64);
        set(ClientChannels, counts.client_channels as u64);
        set(
            UpstreamChannels,
            (counts.upstream_channels - counts.idle_channels.min(counts.upstream_channels)) as u64,
        );
        set(IdleChannels, counts.idle_channels as u64);
        set(FramesFromClients, stats.frames_from_clients);
        set(FramesFromUpstream, stats.frames_from_upstream);
        set(BytesFromClients, io.bytes_from_clients);
        set(BytesToClients, io.bytes_to_clients);
        set(BytesFromUpstream, io.bytes_from_upstream);
        set(BytesToUpstream, io.bytes_to_upstream);
        set(MessagesPublished, stats.messages_published);
        set(HandshakesOk, stats.handshakes_ok);
        set(HandshakesRefused, stats.handshakes_refused);
        set(HandshakesFailed, stats.handshakes_failed);
        set(HandshakesTimedOut, stats.handshakes_timed_out);
        set(UpstreamConnects, stats.upstream_connects);
        set(UpstreamConnectFailures, stats.upstream_connect_failures);
        set(ReuseHits, stats.reuse_hits);
        set(ReuseMisses, stats.reuse_misses);
        set(ReuseDiscarded, stats.reuse_discarded);
        set(BackpressurePauses, stats.backpressure_pauses);
        set(SlowConsumers, stats.slow_consumer_disconnects);
        set(BudgetPublishers, stats.budget_publisher_disconnects);
        let h = &stats.upstream_connect_latency;
        set(LatencyCount, h.count);
        set(LatencySumMicros, h.sum_micros);
        for (i, b) in h.buckets.iter().enumerate() {
            self.values[LatencyBucket0 as usize + i].store(*b, Relaxed);
        }
    }
}

/// Shared by all threads.
pub struct Metrics {
    pub workers: Vec<WorkerSlot>,
    /// Clients refused at accept because of max_client_connections.
    pub clients_refused: AtomicU64,
    /// Set once shutdown starts: /healthz answers 503.
    pub shutting_down: AtomicBool,
    /// Memory of all client output buffers (the shards keep it current).
    pub client_buffer_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Metrics {
    pub fn new(workers: usize) -> Self {
        Metrics {
            workers: (0..workers).map(|_| WorkerSlot::default()).collect(),
            clients_refused: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            client_buffer_bytes: Default::default(),
        }
    }

    /// The sum over workers, as plain numbers.
    pub fn snapshot(&self) -> Snapshot {
        let mut values = [0u64; SLOTS];
        for w in &self.workers {
            for (sum, v) in values.iter_mut().zip(&w.values) {
                *sum += v.load(Relaxed);
            }
        }
        Snapshot {
            values,
            clients_refused: self.clients_refused.load(Relaxed),
            client_buffer_bytes: self.client_buffer_bytes.load(Relaxed) as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    values: [u64; SLOTS],
    pub clients_refused: u64,
    pub client_buffer_bytes: u64,
}

impl Snapshot {
    pub fn get(&self, v: Value) -> u64 {
        self.values[v as usize]
    }

    #[cfg(test)]
    fn with(mut self, v: Value, x: u64) -> Self {
        self.values[v as usize] = x;
        self
    }
}

/// Metric names, all in one place.
pub mod names {
    pub const BUILD_INFO: &str = "amqproxy_build_info";
    pub const CLIENT_CONNECTIONS: &str = "amqproxy_client_connections";
    pub const UPSTREAM_CONNECTIONS: &str = "amqproxy_upstream_connections";
    pub const CLIENT_CHANNELS: &str = "amqproxy_client_channels";
    pub const UPSTREAM_CHANNELS: &str = "amqproxy_upstream_channels";
    pub const IDLE_CHANNELS: &str = "amqproxy_idle_channels";
    pub const FRAMES_RECEIVED: &str = "amqproxy_frames_received_total";
    pub const BYTES_RECEIVED: &str = "amqproxy_bytes_received_total";
    pub const BYTES_SENT: &str = "amqproxy_bytes_sent_total";
    pub const MESSAGES_PUBLISHED: &str = "amqproxy_messages_published_total";
    pub const HANDSHAKES: &str = "amqproxy_client_handshakes_total";
    pub const CLIENTS_REFUSED: &str = "amqproxy_client_connections_refused_total";
    pub const UPSTREAM_CONNECTS: &str = "amqproxy_upstream_connects_total";
    pub const UPSTREAM_CONNECT_FAILURES: &str = "amqproxy_upstream_connect_failures_total";
    pub const UPSTREAM_CONNECT_DURATION: &str = "amqproxy_upstream_connect_duration_seconds";
    pub const CHANNEL_REUSE: &str = "amqproxy_channel_reuse_total";
    pub const BACKPRESSURE_PAUSES: &str = "amqproxy_backpressure_pauses_total";
    pub const SLOW_CONSUMERS: &str = "amqproxy_slow_consumer_disconnects_total";
    pub const BUDGET_PUBLISHERS: &str = "amqproxy_budget_publisher_disconnects_total";
    pub const CLIENT_BUFFER_BYTES: &str = "amqproxy_client_buffer_bytes";
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The Prometheus text exposition (format 0.0.4) of a snapshot.
pub fn render(s: &Snapshot, version: &str, commit: &str) -> String {
    use names::*;
    use Value::*;
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        BUILD_INFO,
        "gauge",
        "Build information; always 1.",
    );
    sample(
        &mut out,
        BUILD_INFO,
        &format!("version=\"{version}\",commit=\"{commit}\""),
        1,
    );
    for (name, help, v) in [
        (
            CLIENT_CONNECTIONS,
            "Client connections open now.",
            ClientConnections,
        ),
        (
            UPSTREAM_CONNECTIONS,
            "Upstream connections to the broker past their handshake.",
            UpstreamConnections,
        ),
        (
            CLIENT_CHANNELS,
            "Channels clients have open.",
            ClientChannels,
        ),
        (
            UPSTREAM_CHANNELS,
            "Upstream channels in use by clients or closing (idle reusable ones excluded).",
            UpstreamChannels,
        ),
        (
            IDLE_CHANNELS,
            "Idle upstream channels kept for reuse.",
            IdleChannels,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        sample(&mut out, name, "", s.get(v));
    }
    family(
        &mut out,
        CLIENT_BUFFER_BYTES,
        "gauge",
        "Memory held by client output buffers, all workers (see client_buffer_budget).",
    );
    sample(&mut out, CLIENT_BUFFER_BYTES, "", s.client_buffer_bytes);
    family(
        &mut out,
        FRAMES_RECEIVED,
        "counter",
        "AMQP frames received, by peer.",
    );
    sample(
        &mut out,
        FRAMES_RECEIVED,
        "from=\"client\"",
        s.get(FramesFromClients),
    );
    sample(
        &mut out,
        FRAMES_RECEIVED,
        "from=\"upstream\"",
        s.get(FramesFromUpstream),
    );
    family(
        &mut out,
        BYTES_RECEIVED,
        "counter",
        "Bytes read from sockets, by peer.",
    );
    sample(
        &mut out,
        BYTES_RECEIVED,
        "from=\"client\"",
        s.get(BytesFromClients),
    );
    sample(
        &mut out,
        BYTES_RECEIVED,
        "from=\"upstream\"",
        s.get(BytesFromUpstream),
    );
    family(
        &mut out,
        BYTES_SENT,
        "counter",
        "Bytes written to sockets, by peer.",
    );
    sample(&mut out, BYTES_SENT, "to=\"client\"", s.get(BytesToClients));
    sample(
        &mut out,
        BYTES_SENT,
        "to=\"upstream\"",
        s.get(BytesToUpstream),
    );
    family(
        &mut out,
        MESSAGES_PUBLISHED,
        "counter",
        "Complete messages forwarded upstream.",
    );
    sample(&mut out, MESSAGES_PUBLISHED, "", s.get(MessagesPublished));
    family(
        &mut out,
        HANDSHAKES,
        "counter",
        "Client handshakes, by outcome.",
    );
    for (outcome, v) in [
        ("ok", HandshakesOk),
        ("refused", HandshakesRefused),
        ("failed", HandshakesFailed),
        ("timeout", HandshakesTimedOut),
    ] {
        sample(
            &mut out,
            HANDSHAKES,
            &format!("outcome=\"{outcome}\""),
            s.get(v),
        );
    }
    family(
        &mut out,
        CLIENTS_REFUSED,
        "counter",
        "Clients refused because max_client_connections was reached.",
    );
    sample(&mut out, CLIENTS_REFUSED, "", s.clients_refused);
    family(
        &mut out,
        UPSTREAM_CONNECTS,
        "counter",
        "Upstream connections opened (handshake complete).",
    );
    sample(&mut out, UPSTREAM_CONNECTS, "", s.get(UpstreamConnects));
    family(
        &mut out,
        UPSTREAM_CONNECT_FAILURES,
        "counter",
        "Upstream connections that failed before their handshake completed.",
    );
    sample(
        &mut out,
        UPSTREAM_CONNECT_FAILURES,
        "",
        s.get(UpstreamConnectFailures),
    );
    family(
        &mut out,
        UPSTREAM_CONNECT_DURATION,
        "histogram",
        "Time from TCP connect to Connection.OpenOk for upstream connections.",
    );
    let bucket = format!("{UPSTREAM_CONNECT_DURATION}_bucket");
    for (i, bound) in CONNECT_LATENCY_BUCKETS.iter().enumerate() {
        sample(
            &mut out,
            &bucket,
            &format!("le=\"{bound}\""),
            s.values[LatencyBucket0 as usize + i],
        );
    }
    sample(&mut out, &bucket, "le=\"+Inf\"", s.get(LatencyCount));
    let _ = writeln!(
        out,
        "{UPSTREAM_CONNECT_DURATION}_sum {}",
        s.get(LatencySumMicros) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "{UPSTREAM_CONNECT_DURATION}_count {}",
        s.get(LatencyCount)
    );
    family(&mut out, CHANNEL_REUSE, "counter", "Channel.Open served from idle channels (hit) or opened upstream (miss); fenced channels the broker closed (discarded).");
    for (result, v) in [
        ("hit", ReuseHits),
        ("miss", ReuseMisses),
        ("discarded", ReuseDiscarded),
    ] {
        sample(
            &mut out,
            CHANNEL_REUSE,
            &format!("result=\"{result}\""),
            s.get(v),
        );
    }
    family(
        &mut out,
        BACKPRESSURE_PAUSES,
        "counter",
        "Times reading a client was paused because an upstream buffer was full.",
    );
    sample(&mut out, BACKPRESSURE_PAUSES, "", s.get(BackpressurePauses));
    family(
        &mut out,
        SLOW_CONSUMERS,
        "counter",
        "Clients closed with 506 as slow consumers: their output buffer passed client_buffer_limit, or was the largest when all passed client_buffer_budget.",
    );
    sample(&mut out, SLOW_CONSUMERS, "", s.get(SlowConsumers));
    family(
        &mut out,
        BUDGET_PUBLISHERS,
        "counter",
        "Clients closed with 506 because their unfinished publishes were the largest buffer when all buffers together passed client_buffer_budget.",
    );
    sample(&mut out, BUDGET_PUBLISHERS, "", s.get(BudgetPublishers));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_family_once_with_help_and_type() {
        let m = Metrics::new(2);
        let stats = Stats {
            messages_published: 5,
            handshakes_ok: 2,
            ..Stats::default()
        };
        let counts = ShardCounts {
            clients: 3,
            ..ShardCounts::default()
        };
        m.workers[0].publish(&stats, &counts, &IoCounts::default());
        m.workers[1].publish(
            &stats,
            &counts,
            &IoCounts {
                bytes_to_clients: 7,
                ..IoCounts::default()
            },
        );
        let text = render(&m.snapshot(), "1.2.3", "abc");
        assert!(text.contains("amqproxy_client_connections 6\n"));
        assert!(text.contains("amqproxy_messages_published_total 10\n"));
        assert!(text.contains("amqproxy_client_handshakes_total{outcome=\"ok\"} 4\n"));
        assert!(text.contains("amqproxy_bytes_sent_total{to=\"client\"} 7\n"));
        assert!(text.contains("amqproxy_build_info{version=\"1.2.3\",commit=\"abc\"} 1\n"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn histogram_is_cumulative_and_ends_with_inf() {
        let s = Metrics::new(1)
            .snapshot()
            .with(Value::LatencyCount, 3)
            .with(Value::LatencySumMicros, 1_500_000);
        let text = render(&s, "v", "c");
        assert!(text.contains("amqproxy_upstream_connect_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("amqproxy_upstream_connect_duration_seconds_sum 1.5\n"));
        assert!(text.contains("amqproxy_upstream_connect_duration_seconds_count 3\n"));
    }
}
