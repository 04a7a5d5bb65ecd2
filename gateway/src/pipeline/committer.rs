//! The committer upholds the durability contract: it wakes every quarter `commit_interval`,
//! takes the records that have waited at least three quarters of an interval without a PUBACK,
//! and commits them in one batch (sled flush + fsync). So a record is acknowledged or durable
//! within one `commit_interval` of being read (plus the commit's own duration), and while the
//! broker acks within three quarters of an interval the committer has nothing to write.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::Record;
use crate::config::{BufferSettings, WhenFull};
use crate::metrics::Metrics;
use crate::pipeline::Shared;

/// Runs the committer until `stop` is cancelled, then commits everything unacknowledged.
pub async fn run_committer(shared: Arc<Shared>, settings: BufferSettings, stop: CancellationToken) {
    let period = (settings.commit_interval / 4).max(Duration::from_millis(1));
    let min_age = settings.commit_interval.saturating_sub(period);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evicting = EvictionLog::default();
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let s = shared.clone();
        let settings = settings.clone();
        let mut log = std::mem::take(&mut evicting);
        let done = tokio::task::spawn_blocking(move || {
            commit_once(&s, &settings, min_age, last, &mut log);
            log
        })
        .await;
        match done {
            Ok(log) => evicting = log,
            Err(e) => error!(error = %e, "commit task failed"),
        }
        if last {
            if let Err(e) = shared.buffer.close() {
                error!(error = %e, "final buffer flush failed");
            }
            debug!("committer finished");
            return;
        }
    }
}

/// Logs evictions once per episode rather than per record.
#[derive(Debug, Default)]
struct EvictionLog {
    active: bool,
    count: u64,
}

impl EvictionLog {
    /// Counts `n` evicted records in the metrics and in this episode.
    fn add(&mut self, metrics: &Metrics, n: u64) {
        Metrics::add(&metrics.evicted, n);
        self.count += n;
    }
}

/// Drops a batch that may not be committed, counting it as evicted.
fn refuse(shared: &Shared, due: Vec<Arc<Record>>, evictions: &mut EvictionLog) -> Vec<Arc<Record>> {
    evictions.add(&shared.metrics, due.len() as u64);
    shared.ledger().discard(due.iter().map(|r| r.seq));
    Vec::new()
}

fn commit_once(
    shared: &Shared,
    settings: &BufferSettings,
    min_age: Duration,
    all: bool,
    evictions: &mut EvictionLog,
) {
    let now = Instant::now();
    let (due, deletes) = {
        let mut l = shared.ledger();
        let connected = shared.metrics.mqtt_connected.load(Ordering::Relaxed);
        let due = if all {
            l.take_all()
        } else {
            let mut due = l.take_due(now, min_age);
            if !due.is_empty() && !connected {
                // The broker is away, so nothing pending will be acknowledged in time: one
                // commit takes it all instead of one every quarter interval (a quarter of the
                // fsyncs and larger chunks: less disk written per record).
                due.extend(l.take_all());
            }
            due
        };
        (due, l.take_deletes())
    };
    let m = &shared.metrics;
    if let Some(seq) = shared.buffer.retry_deferred() {
        shared.hint_replay(seq);
    }
    m.count_quarantined(&shared.buffer.take_quarantined());
    if !deletes.is_empty() {
        if let Err(e) = shared.buffer.remove(&deletes) {
            Metrics::add(&m.io_errors, 1);
            warn!(error = %e, "cannot delete acknowledged records from the buffer");
        }
    }
    if due.is_empty() {
        shared.refresh_gauges();
        if evictions.active
            && shared.buffer.bytes() < settings.max_size / 2
            && shared.buffer.disk_usage() < settings.max_size / 2
        {
            info!(evicted = evictions.count, "buffer has room again");
            *evictions = EvictionLog::default();
        }
        return;
    }
    let incoming: u64 = due.iter().map(|r| 8 + r.stored_len() as u64).sum();
    let due = make_room_on_disk(shared, settings, due, incoming, evictions);
    if due.is_empty() {
        shared.refresh_gauges();
        return;
    }
    let started = Instant::now();
    match shared.buffer.commit(&due) {
        Ok(stats) => {
            let took = started.elapsed().as_micros() as u64;
            m.last_commit_us.store(took, Ordering::Relaxed);
            m.commit_latency.observe(took);
            Metrics::add(&m.commits, 1);
            Metrics::add(&m.committed, stats.records);
            Metrics::add(&m.bytes_written, stats.bytes);
            let acked_meanwhile = shared.ledger().committed(due.iter().map(|r| r.seq));
            if !acked_meanwhile.is_empty() {
                if let Err(e) = shared.buffer.remove(&acked_meanwhile) {
                    Metrics::add(&m.io_errors, 1);
                    warn!(error = %e, "cannot delete acknowledged records from the buffer");
                }
            }
            if let Some(min) = due.iter().map(|r| r.seq).min() {
                shared.hint_replay(min);
            }
            debug!(
                records = stats.records,
                bytes = stats.bytes,
                "committed to disk"
            );
        }
        Err(e) => {
            Metrics::add(&m.io_errors, 1);
            if !m.buffer_failing.swap(true, Ordering::Relaxed) {
                error!(error = %e, records = due.len(), keep_in_memory = FAILING_MEMORY, "commits to the disk buffer fail; retrying, and keeping the newest records in memory meanwhile");
            } else {
                debug!(error = %e, "commit to the disk buffer failed again");
            }
            let mut ledger = shared.ledger();
            ledger.commit_failed(due, now);
            // The disk takes nothing: memory is bounded, and the oldest records go first.
            let dropped = ledger.trim_pending(FAILING_MEMORY);
            drop(ledger);
            if dropped > 0 {
                evictions.add(m, dropped);
                if !evictions.active {
                    warn!(
                        dropped,
                        "disk buffer failing and memory bound reached: dropping the oldest records"
                    );
                    evictions.active = true;
                }
            }
            shared.refresh_gauges();
            return;
        }
    }
    if m.buffer_failing.swap(false, Ordering::Relaxed) {
        info!("commits to the disk buffer work again");
    }
    shared.refresh_gauges();
}

/// While the disk buffer fails, unacknowledged records are kept in memory up to this many bytes.
pub const FAILING_MEMORY: u64 = 16 << 20;

/// How much the buffer directory may grow per byte committed, at most: sled keeps pages,
/// their rewrites and its log side by side (about 2.5x measured) until a generation is deleted.
const DISK_GROWTH: u64 = 3;

/// Keeps the buffer's real size on disk within `max_size`: when committing `due` could take it
/// over, `drop_oldest` drops whole generations, oldest first (dropping single records frees no
/// disk space in sled), and `drop_newest` refuses the records. `incoming` is their stored size.
/// A generation the disk failed to give at start counts in the usage but is never evicted: what
/// it holds cannot be counted, and it may read again; with only such left, records are refused.
fn make_room_on_disk(
    shared: &Shared,
    settings: &BufferSettings,
    due: Vec<Arc<Record>>,
    incoming: u64,
    evictions: &mut EvictionLog,
) -> Vec<Arc<Record>> {
    let fits = |usage: u64| {
        usage.saturating_add(incoming.saturating_mul(DISK_GROWTH)) <= settings.max_size
    };
    let mut usage = shared.buffer.disk_usage();
    if fits(usage) {
        return due;
    }
    let m = &shared.metrics;
    if !evictions.active {
        warn!(max_size = settings.max_size, disk_usage = usage, policy = ?settings.when_full, "buffer is full on disk; evicting records");
        evictions.active = true;
    }
    match settings.when_full {
        WhenFull::DropOldest => {
            while !fits(usage) && !shared.buffer.is_empty() {
                match shared.buffer.evict_oldest_generation() {
                    Ok(n) => evictions.add(m, n),
                    Err(e) => {
                        Metrics::add(&m.io_errors, 1);
                        warn!(error = %e, "eviction failed");
                        break;
                    }
                }
                let before = usage;
                usage = shared.buffer.disk_usage();
                if usage >= before {
                    // Nothing was freed: another round would not free anything either.
                    break;
                }
            }
            if fits(usage) {
                due
            } else {
                // Even an empty buffer cannot take this batch: it is dropped, counted.
                refuse(shared, due, evictions)
            }
        }
        WhenFull::DropNewest => refuse(shared, due, evictions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    #[test]
    fn a_long_outage_keeps_the_buffer_within_max_size_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let max_size: u64 = 4 << 20;
        let (buffer, _) = Buffer::open_with(
            &dir.path().join("buffer"),
            crate::buffer::rotate_after_for(max_size),
            crate::buffer::ROTATE_DRAINED,
        )
        .unwrap();
        let shared = Shared::new(Arc::new(buffer), Arc::new(Metrics::default()));
        let settings = BufferSettings {
            max_size,
            when_full: WhenFull::DropOldest,
            commit_interval: Duration::from_millis(100),
            replay_rate: None,
        };
        let mut log = EvictionLog::default();
        let mut peak = 0;
        let mut seq = 0u64;
        // No PUBACK ever comes: 12 MB of records for a 4 MiB buffer.
        for _ in 0..600 {
            {
                let mut ledger = shared.ledger();
                for _ in 0..20 {
                    // Chunks are deflated: these must take their size on disk.
                    let record = crate::buffer::incompressible(seq, 1000);
                    ledger.insert(record, Instant::now());
                    seq += 1;
                }
            }
            commit_once(&shared, &settings, Duration::ZERO, false, &mut log);
            peak = peak.max(shared.buffer.disk_usage());
        }
        assert!(
            peak as f64 <= max_size as f64 * 1.05,
            "peak {peak} bytes on disk for max_size {max_size}"
        );
        let evicted = shared.metrics.evicted.load(Ordering::Relaxed);
        assert!(evicted > 0, "records were evicted");
        assert_eq!(
            evicted + shared.buffer.len(),
            seq,
            "every record is on disk or counted as evicted"
        );
        let newest = shared
            .buffer
            .read_range(seq - 1, seq, 1, |_| false)
            .unwrap();
        assert_eq!(newest.len(), 1, "drop_oldest keeps the newest");
    }

    #[test]
    fn a_failing_disk_keeps_the_newest_records_in_bounded_memory_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = Buffer::open(&dir.path().join("buffer")).unwrap();
        let shared = Shared::new(Arc::new(buffer), Arc::new(Metrics::default()));
        let settings = BufferSettings {
            max_size: 1 << 30,
            when_full: WhenFull::DropOldest,
            commit_interval: Duration::from_millis(100),
            replay_rate: None,
        };
        let mut log = EvictionLog::default();
        let record = |seq: u64| Record {
            seq,
            topic: "edge/gw/dev".into(),
            payload: bytes::Bytes::from(vec![b'x'; 100_000]),
            flag_offset: crate::buffer::NO_FLAG,
        };
        shared.buffer.inject_commit_failures(true);
        // 40 MB arrive while the disk takes nothing and no PUBACK comes.
        for seq in 0..400u64 {
            shared
                .ledger()
                .insert(Arc::new(record(seq)), Instant::now());
            commit_once(&shared, &settings, Duration::ZERO, false, &mut log);
            assert!(shared.ledger().pending_bytes() <= FAILING_MEMORY);
        }
        let m = &shared.metrics;
        assert!(
            m.buffer_failing.load(Ordering::Relaxed),
            "health says failing"
        );
        assert!(Metrics::get(&m.io_errors) >= 400);
        let evicted = Metrics::get(&m.evicted);
        assert!(evicted > 200, "the oldest records were dropped: {evicted}");
        assert!(shared.buffer.is_empty());
        let held = Metrics::get(&m.memory_bytes);
        assert!(
            held > FAILING_MEMORY / 2 && held <= FAILING_MEMORY,
            "memory held: {held}"
        );

        // Space is back: what memory kept is committed, the newest included.
        shared.buffer.inject_commit_failures(false);
        commit_once(&shared, &settings, Duration::ZERO, false, &mut log);
        assert!(!m.buffer_failing.load(Ordering::Relaxed));
        assert_eq!(shared.ledger().pending_len(), 0);
        assert_eq!(
            Metrics::get(&m.memory_bytes),
            0,
            "nothing held in memory only"
        );
        assert_eq!(
            shared.buffer.len() + evicted,
            400,
            "every record committed or counted"
        );
        assert_eq!(
            shared.buffer.first_seq(),
            Some(evicted),
            "the oldest went first"
        );
        let newest = shared.buffer.read_range(399, 400, 1, |_| false).unwrap();
        assert_eq!(newest.len(), 1);
    }
}
