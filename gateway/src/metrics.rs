//! Counters an operator asks for at 3 a.m., shared lock-free between the pipeline's tasks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Pipeline counters (per device counters live in `protocols::driver::DeviceStatus`).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Records created by the writer.
    pub records: AtomicU64,
    /// Samples in those records.
    pub samples: AtomicU64,
    /// Publishes handed to the MQTT client (live and replayed).
    pub published: AtomicU64,
    /// Bytes of the publishes handed to the MQTT client: topic and payload (live, replayed and
    /// status), without the MQTT header or TLS.
    pub published_bytes: AtomicU64,
    /// Publishes acknowledged by the broker.
    pub acked: AtomicU64,
    /// Samples in acknowledged records.
    pub acked_samples: AtomicU64,
    /// Records replayed from disk.
    pub replayed: AtomicU64,
    /// Records committed to disk.
    pub committed: AtomicU64,
    /// Durable commits (each a flush and an fsync).
    pub commits: AtomicU64,
    /// Bytes written to the buffer by commits.
    pub bytes_written: AtomicU64,
    /// Records evicted because the buffer was full.
    pub evicted: AtomicU64,
    /// Samples dropped because one alone does not fit in an MQTT packet.
    pub oversized: AtomicU64,
    /// Buffer I/O errors.
    pub io_errors: AtomicU64,
    /// Health: commits to the disk buffer are failing (disk full, I/O errors) right now.
    pub buffer_failing: AtomicBool,
    /// Bytes of unacknowledged records held in memory only (not yet committed), as of the
    /// committer's last tick.
    pub memory_bytes: AtomicU64,
    /// Records on disk.
    pub buffer_records: AtomicU64,
    /// Bytes on disk (records).
    pub buffer_bytes: AtomicU64,
    /// Duration of the last commit in microseconds.
    pub last_commit_us: AtomicU64,
    /// Durations of commits (the store's flush and the fsyncs).
    pub commit_latency: Histogram,
    /// Age of the oldest record on disk in milliseconds (0 when the disk holds none).
    pub oldest_age_ms: AtomicU64,
    /// Buffer generations moved aside because they could not be opened.
    pub quarantined: AtomicU64,
    /// Losses of committed records found: the buffer holding less at start than its watermark
    /// says was made durable, and each generation moved aside that may hold committed records.
    pub lost_commits: AtomicU64,
    /// MQTT connection up.
    pub mqtt_connected: AtomicBool,
    /// MQTT connections made.
    pub mqtt_connects: AtomicU64,
    /// PUBACKs with a failure reason code (MQTT 5), by the index of the code in
    /// [`PUBACK_REFUSALS`]: the record stays buffered.
    pub puback_refusals: [AtomicU64; PUBACK_REFUSALS.len()],
    /// Records not sent because they exceed the broker's maximum packet size.
    pub too_large_for_broker: AtomicU64,
    /// When the TLS client certificate expires, in seconds since the Unix epoch, as of the
    /// last connection attempt (0: no client certificate).
    pub tls_client_cert_not_after: AtomicU64,
    /// Records the publisher has taken from the writer's channel (live, also while
    /// disconnected): the watchdog's evidence that the publisher moves (`service.rs`).
    pub live_taken: AtomicU64,
    /// The writer holds its records: no sequence number can be handed out (the clock or the
    /// state file). A hold by design, not a stall.
    pub writer_holding: AtomicBool,
    /// Reloads applied (SIGHUP or the API).
    pub reloads: AtomicU64,
    /// Reloads refused (a config that fails `check`, an unreadable password): the running
    /// config stays.
    pub reloads_refused: AtomicU64,
    /// Write commands by outcome: written (the device took it), refused (a check said no,
    /// before any device), failed (the device or the link said no).
    pub commands_written: AtomicU64,
    /// See `commands_written`.
    pub commands_refused: AtomicU64,
    /// See `commands_written`.
    pub commands_failed: AtomicU64,
}

/// The PUBACK failure reason codes of MQTT 5 (section 3.4.2.1) with their names in the
/// specification; refusals are counted per code.
pub const PUBACK_REFUSALS: [(u8, &str); 7] = [
    (0x80, "unspecified error"),
    (0x83, "implementation specific error"),
    (0x87, "not authorized"),
    (0x90, "topic name invalid"),
    (0x91, "packet identifier in use"),
    (0x97, "quota exceeded"),
    (0x99, "payload format invalid"),
];

impl Metrics {
    /// Counts a PUBACK refusal by its reason code (one of [`PUBACK_REFUSALS`]; any other code
    /// is counted as "unspecified error", the specification's catch-all).
    pub fn count_puback_refusal(&self, code: u8) {
        let at = PUBACK_REFUSALS
            .iter()
            .position(|(c, _)| *c == code)
            .unwrap_or(0);
        Self::add(&self.puback_refusals[at], 1);
    }

    /// PUBACK refusals counted with reason `code`.
    pub fn puback_refusals_with(&self, code: u8) -> u64 {
        PUBACK_REFUSALS
            .iter()
            .position(|(c, _)| *c == code)
            .map_or(0, |at| Self::get(&self.puback_refusals[at]))
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts buffer generations moved aside: each in `quarantined`, and each that may hold
    /// committed records in `lost_commits` too (a loss until someone recovers it by hand).
    pub fn count_quarantined(&self, moved: &[crate::buffer::Quarantined]) {
        Self::add(&self.quarantined, moved.len() as u64);
        let lost = moved.iter().filter(|q| q.at_stake != Some(0)).count();
        Self::add(&self.lost_commits, lost as u64);
    }
}

pub use protocols::histogram::{Histogram, LATENCY_BUCKETS_US};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_puts_each_observation_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        for us in [100, 500, 501, 3_000, 2_000_000] {
            h.observe(us);
        }
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[0], 2, "100 and 500 are within 500 us");
        assert_eq!(counts[1], 1, "501 is within 1 ms");
        assert_eq!(counts[3], 1, "3 ms is within 5 ms");
        assert_eq!(
            counts[LATENCY_BUCKETS_US.len()],
            1,
            "2 s is past every bound"
        );
        assert_eq!(h.count.load(Ordering::Relaxed), 5);
        assert_eq!(h.quantile_bound_us(0.5), Some(1_000));
        assert_eq!(h.quantile_bound_us(1.0), None);
        assert_eq!(Histogram::default().quantile_bound_us(0.5), None);
    }
}
