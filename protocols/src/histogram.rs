//! A lock-free latency histogram with fixed buckets, shared by the drivers (scan durations) and
//! the gateway (commit latency), read by the HTTP API's `/metrics` at scrape time.
//!
//! Invariant: `count` is the sum of `buckets` and `sum_us` the sum of the observations, each
//! up to the relaxed ordering of concurrent observations (a scrape may see one observation in
//! `count` and not yet in its bucket).

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the [`Histogram`] buckets, in microseconds; one more bucket takes the rest.
pub const LATENCY_BUCKETS_US: [u64; 11] = [
    500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS_US`]), lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last is above every bound.
    pub buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of the observations in microseconds.
    pub sum_us: AtomicU64,
    /// Number of observations.
    pub count: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `us` microseconds.
    pub fn observe(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The smallest bucket bound at or below which `q` (0..=1) of the observations fall;
    /// `None` without observations or when the quantile is past the last bound.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return LATENCY_BUCKETS_US.get(i).copied();
            }
        }
        None
    }
}
