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
    /// Bytes of unacknowledged records held in memory only.
    pub memory_bytes: AtomicU64,
    /// Records on disk.
    pub buffer_records: AtomicU64,
    /// Bytes on disk (records).
    pub buffer_bytes: AtomicU64,
    /// Duration of the last commit in microseconds.
    pub last_commit_us: AtomicU64,
    /// MQTT connection up.
    pub mqtt_connected: AtomicBool,
    /// MQTT connections made.
    pub mqtt_connects: AtomicU64,
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
