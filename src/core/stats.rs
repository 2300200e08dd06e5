//! Counters a shard keeps about itself. The shard is single-threaded, so
//! these are plain integers bumped on the hot path; the worker publishes
//! them to shared atomics for the metrics endpoint (see `crate::metrics`).

use std::time::Duration;

/// Upper bounds (seconds) of the upstream connect latency histogram.
pub const CONNECT_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A cumulative-bucket histogram (Prometheus style, +Inf is `count`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; CONNECT_LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bucket, bound) in self.buckets.iter_mut().zip(CONNECT_LATENCY_BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_micros += d.as_micros() as u64;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_from_clients: u64,
    pub frames_from_upstream: u64,
    pub messages_published: u64,
    /// Clients that got Connection.OpenOk.
    pub handshakes_ok: u64,
    /// The broker refused the credentials or vhost (403, 530).
    pub handshakes_refused: u64,
    /// Protocol errors, unreachable broker and other failures before OpenOk.
    pub handshakes_failed: u64,
    pub handshakes_timed_out: u64,
    /// Upstream connections that completed their handshake.
    pub upstream_connects: u64,
    pub upstream_connect_failures: u64,
    pub upstream_connect_latency: Histogram,
    /// Times a client was paused because an upstream buffer was full.
    pub backpressure_pauses: u64,
    pub slow_consumer_disconnects: u64,
    /// Clients closed because their unfinished publishes were the largest
    /// buffer when all together passed the budget.
    pub budget_publisher_disconnects: u64,
    pub reuse_hits: u64,
    pub reuse_misses: u64,
    pub reuse_discarded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(800));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(10));
        assert_eq!(h.buckets[0], 1); // <= 1 ms
        assert_eq!(h.buckets[4], 1); // <= 25 ms
        assert_eq!(h.buckets[5], 2); // <= 50 ms
        assert_eq!(h.buckets[11], 2); // <= 5 s
        assert_eq!(h.count, 3);
        assert_eq!(h.sum_micros, 800 + 30_000 + 10_000_000);
    }
}
