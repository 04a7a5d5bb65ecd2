//! Store-and-forward buffer, in generations: what was committed and not yet acknowledged, kept
//! on disk so that a crash or a power cut loses none of it.
//!
//! Who owns what: `store` is the storage engine's shell (the only file that names it: open,
//! sync, scan, quarantine, deletion of a generation's directory, panic containment);
//! `generation` one generation's bookkeeping and its life (`generation::State`);
//! `watermark` the file that checks the store against what it made durable; `migrate` the
//! layout from before generations; `chunk` and `record` the format of what is stored. This
//! file holds the [`Buffer`] and the invariants between the generations.
//!
//! Invariants:
//! - What the generations hold is what was committed and not yet acknowledged, in chunks
//!   (`chunk`): key = the chunk's first sequence number (big-endian u64, so iteration
//!   is oldest first), value = the chunk's records, each with its checksum. A chunk is deleted
//!   once all its records are acknowledged; which of them are is kept in memory (a restart sends
//!   a partly acknowledged chunk again, as re-sends with the same `seq`). Sequence numbers only
//!   grow, so every generation holds a range above the ones of older generations, and reading
//!   them in order is reading oldest first.
//! - A commit is durable only after the store's flush *and* an fsync of its files (see
//!   `store`: the engine's own flush does not survive a power cut).
//! - A commit writes and fsyncs without holding the generations' lock (commits are serialized
//!   by a lock of their own), so a replay read or an acknowledgement never waits for a slow
//!   fsync; its chunks are tracked, and so readable, only once durable, and the generation it
//!   writes is neither sealed nor deleted meanwhile (it is `Committing`).
//! - Deletes after a PUBACK are not fsynced: losing one only means the record is sent again after
//!   a crash, with the same `seq`, which the cloud de-duplicates.
//! - A generation whose fsync failed is frozen: nothing more is written to it, not even a
//!   delete (Linux may drop the pages that failed, and the store's recovery stops at such a
//!   hole, so a later write that moved committed pages past it could lose them). Its
//!   acknowledgements stay in memory; it is deleted whole once drained. The failed batch is
//!   committed again into a fresh generation; should it have reached the disk after all, a
//!   restart finds it twice, and an acknowledgement takes it out of both. A generation whose
//!   write the store failed (a full disk) takes no more commits either, and drains as usual.
//! - Every time a generation's database is opened, its configuration file and directory are
//!   fsynced (the store does not), so a power cut never leaves a database whose configuration
//!   is empty or torn.
//! - The store never gives space back, so the buffer does: new commits go to the newest
//!   generation (`gen-<n>/`, one database each); once it has taken [`ROTATE_AFTER`] bytes, or
//!   once it is drained after taking at least [`ROTATE_DRAINED`], a fresh generation is
//!   started. An older generation whose database is empty is deleted: renamed to
//!   `gen-<n>.drained` first (one atomic step, so a crash never leaves a half-deleted database
//!   to open), then removed.
//! - Opening never takes the gateway down: a panic inside the store is caught, an unusable
//!   generation (one that opens neither with its snapshots nor from its log alone) is moved
//!   aside to `quarantine-gen-<id>-<ms>` (never deleted; it stays in place if it cannot be
//!   moved), what it may hold is reported, and the others are kept;
//!   one the disk fails to give (full, I/O error) stays where it is and is tried again once
//!   commits work.
//! - Only the newest generation, the oldest one holding records, the one a replay is reading
//!   and frozen ones (until drained) stay open; the others are sealed (synced, closed), because
//!   the store keeps in memory what an open database holds. Per-generation counts and sequence
//!   ranges route reads and deletes without opening the sealed ones.
//! - Every commit also writes the generation's commit mark (the highest `seq` committed into it,
//!   key `MARK_KEY` (see `store.rs`), never deleted) in the same batch, and then, once durable, the
//!   `watermark` file (written, fsynced, renamed): the generation, its commit mark and the
//!   oldest record not yet acknowledged. On open, a generation whose commit mark is below the
//!   watermark's lost a commit the store had made durable: that is reported (error log,
//!   metric), not trusted. The watermark's rename is not followed by a directory fsync, so after
//!   a cut it may be as old as the buffer directory's last fsync (a start, a rotation): the
//!   check only gets weaker, never wrong.
//! - A buffer written before generations (the store's files directly in the buffer directory)
//!   is moved into `gen-0/` on open, so an upgrade keeps its backlog.
//! - Fault injection for tests (`Faults`) exists only under `cfg(test)`.

mod chunk;
#[cfg(test)]
mod faults;
mod generation;
mod migrate;
mod record;
mod store;
mod watermark;

#[cfg(test)]
pub(crate) use self::record::incompressible;
pub use self::record::{Record, RecordError, NO_FLAG};
pub use self::store::{contain_sled_panic_reports, create_dir_durable, StoreError};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocols::model::Timestamp;
use tracing::{debug, error, info, warn};

use self::chunk::Live;
#[cfg(test)]
use self::faults::Faults;
use self::generation::{CommitEnd, Committed, Generation, Stored, Taken};
use self::store::{gen_dir, Batch};
use self::watermark::Watermark;

/// A generation takes this many committed bytes before commits move to a fresh one.
pub const ROTATE_AFTER: u64 = 32 << 20;

/// The rotation size for a buffer bounded to `max_size` on disk: small enough that dropping
/// the oldest generation frees a small share of it, large enough that a long outage does not
/// open hundreds of databases.
pub fn rotate_after_for(max_size: u64) -> u64 {
    (max_size / 16).clamp(256 << 10, ROTATE_AFTER)
}

/// A drained newest generation is replaced once it has taken this many bytes.
pub const ROTATE_DRAINED: u64 = 1 << 20;

/// How often generations the disk failed to give are tried again.
const RETRY_DEFERRED: Duration = Duration::from_secs(5);

/// Errors of the disk buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The store reported an error other than a failed read or write (a damaged database, a
    /// format it does not support).
    #[error("buffer database at {path}: {source}")]
    Store {
        /// The database directory.
        path: PathBuf,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The database holds values written by a newer version of the gateway.
    #[error("buffer database at {0}: written by a newer version of the gateway")]
    NewerVersion(PathBuf),
    /// A file system operation failed.
    #[error("buffer file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store reported a failed read or write of its files (a full disk, an I/O error).
    #[error("buffer database at {path}: {source}")]
    DbIo {
        /// The database directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store panicked.
    #[error("buffer database at {0} panicked inside {engine}", engine = store::ENGINE)]
    Panicked(PathBuf),
}

impl BufferError {
    /// Whether the disk failed (full, I/O error), rather than the database being unusable:
    /// such a generation is kept and tried again, never set aside.
    pub fn is_io(&self) -> bool {
        matches!(self, BufferError::Io { .. } | BufferError::DbIo { .. })
    }
}

fn io_err(path: &Path, source: std::io::Error) -> BufferError {
    BufferError::Io {
        path: path.to_path_buf(),
        source,
    }
}
/// What opening the buffer found.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Records found on disk.
    pub records: u64,
    /// Stored bytes of those records.
    pub bytes: u64,
    /// Values that failed their checksum and were dropped.
    pub damaged: u64,
    /// The generations that could not be opened and were moved aside.
    pub quarantined: Vec<Quarantined>,
    /// The highest sequence number known to be used: on disk, or committed as the watermark says.
    pub last_seq: Option<u64>,
    /// Generations found with records in them.
    pub generations: usize,
    /// Set when a generation holds less than the watermark says was made durable: the store lost
    /// committed records (see the module comment).
    pub lost_commits: Option<LostCommits>,
}

/// A generation that could not be opened, moved aside (never deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The generation.
    pub generation: u64,
    /// Where it was moved.
    pub path: PathBuf,
    /// At most how many committed, unacknowledged records it can hold (`None`: no bound is
    /// known, no watermark and no newer generation to go by).
    pub at_stake: Option<u64>,
}

/// At most how many committed, unacknowledged records the unopenable generation `id` can hold.
/// Sequence numbers only grow from one generation to the next, so its records lie above the
/// commit marks of the older generations that opened and below the first record of the newer
/// ones, and above the oldest record the watermark says may be unacknowledged; below its newest
/// commit too, when the watermark names a newer generation.
fn at_stake(id: u64, gens: &[Generation], watermark: Option<Watermark>) -> Option<u64> {
    let above_older = gens
        .iter()
        .filter(|g| g.id < id)
        .filter_map(|g| g.mark.max(g.seqs.map(|(_, hi)| hi)))
        .max()
        .map_or(0, |s| s.saturating_add(1));
    let below_newer = gens
        .iter()
        .filter(|g| g.id > id)
        .filter_map(|g| g.seqs.map(|(lo, _)| lo.checked_sub(1)))
        .min()
        .flatten();
    // The watermark may be old (see the module comment): what it says bounds only the
    // generations older than the one it names, whose commits all came before it.
    let from = watermark.map_or(above_older, |w| above_older.max(w.acked_below));
    let through = match watermark {
        Some(w) if w.generation > id => {
            Some(below_newer.map_or(w.committed_through, |b| b.min(w.committed_through)))
        }
        _ => below_newer,
    };
    through.map(|t| if t < from { 0 } else { t - from + 1 })
}

/// A generation that lost commits the store had reported durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostCommits {
    /// The generation.
    pub generation: u64,
    /// The highest sequence number the watermark says was committed into it.
    pub committed_through: u64,
    /// The highest sequence number its commit mark still shows, if any.
    pub found_through: Option<u64>,
}

/// The result of one commit.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Records written.
    pub records: u64,
    /// Bytes written (values and keys).
    pub bytes: u64,
}

/// The disk buffer.
#[derive(Debug)]
pub struct Buffer {
    dir: PathBuf,
    rotate_after: u64,
    rotate_drained: u64,
    /// Oldest first; empty only while no generation could be made yet (a start on a full or
    /// failing disk: commits make one once the disk allows).
    gens: Mutex<Vec<Generation>>,
    records: AtomicU64,
    bytes: AtomicU64,
    commits: AtomicU64,
    /// Generations that could not be read at open because the disk failed: kept on disk and
    /// tried again after each commit that works.
    deferred: Mutex<Vec<u64>>,
    /// Generations moved aside after the start, until [`Buffer::take_quarantined`].
    quarantined_later: Mutex<Vec<Quarantined>>,
    /// The id the next new generation takes.
    next_gen: AtomicU64,
    /// When the deferred generations are tried next.
    next_retry: Mutex<Instant>,
    /// When a new generation may be tried next (after one could not be made).
    next_attempt: Mutex<Instant>,
    /// The generation a replay read last (`u64::MAX`: none): it stays open.
    reading: AtomicU64,
    /// Held through a whole commit, so commits (and their commit marks) never interleave; the
    /// generations' lock is not held while a commit writes and syncs.
    commit_lock: Mutex<()>,
    /// The tests' switches for failing commits and syncs, panics and pauses inside commits.
    #[cfg(test)]
    faults: Faults,
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`; an unusable generation is quarantined, not lost.
    pub fn open(dir: &Path) -> Result<(Buffer, OpenReport), BufferError> {
        Self::open_with(dir, ROTATE_AFTER, ROTATE_DRAINED)
    }

    /// [`Buffer::open`] with other rotation sizes (for tests and measurements).
    pub fn open_with(
        dir: &Path,
        rotate_after: u64,
        rotate_drained: u64,
    ) -> Result<(Buffer, OpenReport), BufferError> {
        store::create_dir_durable(dir).map_err(|e| io_err(dir, e))?;
        migrate::migrate_flat_layout(dir)?;
        let mut report = OpenReport::default();
        let mut gens = Vec::new();
        let ids = store::list_generations(dir)?;
        let mut deferred = Vec::new();
        let mut unopenable = Vec::new();
        for &id in &ids {
            let path = gen_dir(dir, id);
            match Generation::load(dir, id) {
                Ok((generation, found)) => {
                    report.records += found.records;
                    report.bytes += found.bytes;
                    report.damaged += found.damaged;
                    report.last_seq = report.last_seq.max(found.last_seq);
                    if found.records > 0 {
                        report.generations += 1;
                    }
                    gens.push(generation);
                }
                Err(e) if e.is_io() => {
                    error!(path = %path.display(), error = %e, "buffer generation cannot be read now (the disk failed); it is kept, and tried again once commits work");
                    deferred.push(id);
                }
                Err(e) => unopenable.push((id, e)),
            }
        }
        let watermark = Watermark::read(dir);
        for (id, e) in unopenable {
            let at_stake = at_stake(id, &gens, watermark);
            error!(path = %gen_dir(dir, id).display(), generation = id, committed_records_at_stake = ?at_stake, error = %e, "a buffer generation cannot be opened, even without its snapshots: the committed records it holds are not delivered (the directory is kept for recovery)");
            match store::quarantine(dir, id, &e) {
                Ok(path) => report.quarantined.push(Quarantined {
                    generation: id,
                    path,
                    at_stake,
                }),
                Err(moved) => {
                    // Not moved aside: kept where it is and tried again later. A gateway that
                    // cannot start delivers nothing at all.
                    error!(generation = id, error = %moved, "cannot move the unopenable buffer generation aside; it is kept in place and tried again");
                    deferred.push(id);
                }
            }
        }
        if report.damaged > 0 {
            warn!(path = %dir.display(), damaged = report.damaged, "dropped damaged records from the buffer");
        }
        report.lost_commits = watermark.and_then(|w| w.check(&gens));
        // A generation that cannot be read now (deferred) may hold the highest seqs: the
        // watermark knows how far commits went, and the seqs of the next boot start above it.
        if let Some(w) = watermark {
            report.last_seq = report.last_seq.max(Some(w.committed_through));
        }
        if let Some(lost) = &report.lost_commits {
            error!(
                path = %dir.display(),
                generation = lost.generation,
                committed_through = lost.committed_through,
                found_through = ?lost.found_through,
                "the buffer lost records it had made durable (its storage or the disk lost fsynced writes); what is left is replayed, the loss is counted"
            );
        }
        // Commits always go to a fresh generation after a start: the old ones only drain. On a
        // full or failing disk there may be none yet: commits fail (and records wait in memory)
        // until one can be made.
        let next = ids.last().map_or(1, |id| id + 1);
        match Generation::open(dir, next) {
            Ok(g) => gens.push(g),
            Err(e) if e.is_io() => {
                error!(path = %dir.display(), error = %e, "cannot start a buffer generation now (the disk failed); commits are retried")
            }
            Err(e) => return Err(e),
        }
        let buffer = Buffer {
            dir: dir.to_path_buf(),
            rotate_after,
            rotate_drained,
            gens: Mutex::new(gens),
            records: AtomicU64::new(report.records),
            bytes: AtomicU64::new(report.bytes),
            commits: AtomicU64::new(0),
            deferred: Mutex::new(deferred),
            quarantined_later: Mutex::new(Vec::new()),
            next_gen: AtomicU64::new(next + 1),
            next_retry: Mutex::new(Instant::now() + RETRY_DEFERRED),
            next_attempt: Mutex::new(Instant::now()),
            reading: AtomicU64::new(u64::MAX),
            commit_lock: Mutex::new(()),
            #[cfg(test)]
            faults: Faults::default(),
        };
        {
            let mut gens = buffer.lock();
            if let Err(e) = store::fsync_dir(dir) {
                warn!(error = %e, "cannot sync the buffer directory");
            }
            buffer.tidy(&mut gens);
        }
        Ok((buffer, report))
    }

    /// A fresh generation for commits, with an id no generation ever had (ids of generations
    /// the disk failed to give at start included).
    fn new_gen(&self) -> Result<Generation, BufferError> {
        {
            let mut next = self.next_attempt.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() < *next {
                return Err(io_err(
                    &self.dir,
                    std::io::Error::other("making a generation failed a moment ago"),
                ));
            }
            *next = Instant::now();
        }
        let id = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let made = Generation::open(&self.dir, id).and_then(|g| {
            store::fsync_dir(&self.dir)?;
            Ok(g)
        });
        if made.is_err() {
            // Nothing was committed into it: leave no half-made directory behind, and wait a
            // moment before the next try (commits retry every quarter interval).
            let _ = std::fs::remove_dir_all(gen_dir(&self.dir, id));
            *self.next_attempt.lock().unwrap_or_else(|e| e.into_inner()) =
                Instant::now() + Duration::from_secs(1);
        }
        made
    }

    /// Tries again, at most every `RETRY_DEFERRED`, the generations the disk failed to give
    /// at start; returns the lowest sequence number of records that became readable, where the
    /// replay must go back to. One that fails otherwise than by the disk is quarantined.
    pub fn retry_deferred(&self) -> Option<u64> {
        let mut deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if deferred.is_empty() {
            return None;
        }
        {
            let mut next = self.next_retry.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() < *next {
                return None;
            }
            *next = Instant::now() + RETRY_DEFERRED;
        }
        let mut gens = self.lock();
        let mut recovered: Option<u64> = None;
        deferred.retain(|&id| match Generation::load(&self.dir, id) {
            Ok((g, found)) => {
                info!(generation = id, records = found.records, "buffer generation readable again; its records are replayed");
                self.records.fetch_add(found.records, Ordering::Relaxed);
                self.bytes.fetch_add(found.bytes, Ordering::Relaxed);
                if let Some(first) = g.first_live() {
                    recovered = Some(recovered.map_or(first, |r| r.min(first)));
                }
                let at = gens.partition_point(|o| o.id < id);
                gens.insert(at, g);
                false
            }
            Err(_) if !gen_dir(&self.dir, id).is_dir() => {
                warn!(generation = id, "a buffer generation kept for a retry is gone from the disk");
                false
            }
            Err(e) if e.is_io() => {
                debug!(generation = id, error = %e, "buffer generation still unreadable");
                true
            }
            Err(e) => {
                let at_stake = at_stake(id, &gens, Watermark::read(&self.dir));
                error!(path = %gen_dir(&self.dir, id).display(), generation = id, committed_records_at_stake = ?at_stake, error = %e, "a buffer generation cannot be opened, even without its snapshots: the committed records it holds are not delivered (the directory is kept for recovery)");
                match store::quarantine(&self.dir, id, &e) {
                    Ok(path) => {
                        self.quarantined_later
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Quarantined {
                                generation: id,
                                path,
                                at_stake,
                            });
                        false
                    }
                    Err(moved) => {
                        warn!(generation = id, error = %moved, "cannot move an unusable buffer generation aside");
                        true
                    }
                }
            }
        });
        recovered
    }

    /// The generations moved aside since the last call, after the start (a generation the disk
    /// failed to give at start, found unusable once it could be read).
    pub fn take_quarantined(&self) -> Vec<Quarantined> {
        std::mem::take(
            &mut *self
                .quarantined_later
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Takes `seq` out of generation `g` (acknowledged, or unreadable) and deletes its chunk
    /// once no record in it is left (unless `g` is frozen); returns whether `seq` was there.
    fn drop_seq(&self, g: &mut Generation, seq: u64) -> Result<bool, BufferError> {
        let taken = g.take(seq);
        if taken == Taken::Absent {
            return Ok(false);
        }
        self.records.fetch_sub(1.min(self.len()), Ordering::Relaxed);
        if let Taken::LastOfChunk { key, bytes } = taken {
            self.bytes
                .fetch_sub(bytes.min(self.bytes()), Ordering::Relaxed);
            if !g.state.takes_deletes() {
                return Ok(true);
            }
            if let Err(e) = g.store()?.remove_chunk(key) {
                g.failed();
                return Err(e);
            }
        }
        Ok(true)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Generation>> {
        // A poisoned lock means a panic while holding it; the list itself is still consistent
        // (every change to it is a single push or remove).
        self.gens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes every generation but the newest that holds no record, and seals every one but
    /// the newest, the oldest holding records and `keep`.
    fn tidy_keeping(&self, gens: &mut Vec<Generation>, keep: Option<u64>) {
        let mut i = 0;
        while i + 1 < gens.len() {
            if gens[i].records == 0 && gens[i].state.may_delete() {
                let g = gens.remove(i);
                if let Err(e) = g.delete(&self.dir) {
                    warn!(error = %e, "cannot delete a drained buffer generation; it stays on disk");
                }
            } else {
                i += 1;
            }
        }
        let last = gens.len().saturating_sub(1);
        let oldest_held = gens.iter().position(|g| g.records > 0);
        for (i, g) in gens.iter_mut().enumerate() {
            let in_use = i == last || Some(i) == oldest_held || Some(g.id) == keep;
            // A frozen one stays open until drained (reopening it would write to it), and a
            // committing one until its commit ends.
            if !in_use && g.state.may_seal() && g.open.is_some() {
                if let Err(e) = g.seal() {
                    warn!(error = %e, generation = g.id, "cannot seal a buffer generation; it stays open");
                }
            }
        }
    }

    fn tidy(&self, gens: &mut Vec<Generation>) {
        let reading = self.reading.load(Ordering::Relaxed);
        self.tidy_keeping(gens, (reading != u64::MAX).then_some(reading));
    }

    /// Starts a fresh generation when the newest has taken enough, or is drained after taking
    /// some; then deletes drained ones and seals the ones not in use.
    fn maybe_rotate(&self, gens: &mut Vec<Generation>) {
        let Some(newest) = gens.last() else {
            return;
        };
        let full = newest.written >= self.rotate_after;
        let drained = newest.written >= self.rotate_drained && newest.records == 0;
        if full || drained {
            match self.new_gen() {
                Ok(g) => {
                    debug!(generation = g.id, "new buffer generation");
                    gens.push(g);
                }
                Err(e) => {
                    warn!(error = %e, "cannot start a new buffer generation; the current one goes on")
                }
            }
        }
        self.tidy(gens);
    }

    /// Writes records in one batch and makes them durable (flush + fsync) before returning.
    pub fn commit(&self, records: &[Arc<Record>]) -> Result<CommitStats, BufferError> {
        // The store can panic on a damaged file: that is a failed commit (the records stay in
        // memory and are retried), not a lost committer.
        store::contain(&self.dir, || self.commit_guarded(records))
    }

    fn commit_guarded(&self, records: &[Arc<Record>]) -> Result<CommitStats, BufferError> {
        if records.is_empty() {
            return Ok(CommitStats::default());
        }
        #[cfg(test)]
        self.faults.commit(&self.dir)?;
        let mut sorted = records.to_vec();
        sorted.sort_by_key(|r| r.seq);
        let (lo, hi) = (sorted[0].seq, sorted[sorted.len() - 1].seq);
        let mut batch = Batch::default();
        let mut stats = CommitStats::default();
        let mut made = Vec::new();
        for group in chunk::split(&sorted) {
            let key = group[0].seq;
            let value = chunk::encode(group);
            let mut live = Live::new(key);
            for r in group {
                live.insert(r.seq);
            }
            let bytes = 8 + value.len() as u64;
            stats.records += live.len();
            stats.bytes += bytes;
            batch.put_chunk(key, &value);
            made.push((key, Stored { live, bytes }));
        }
        let _one_at_a_time = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: pick the generation and take its handle.
        let (id, dir, open, mark, acked_below, now) = {
            let mut gens = self.lock();
            let acked_below = gens
                .iter()
                .filter(|g| g.records > 0)
                .find_map(|g| g.seqs.map(|(lo, _)| lo))
                .unwrap_or(lo)
                .min(lo);
            if gens.last().is_none_or(|g| !g.state.takes_commits()) {
                gens.push(self.new_gen()?);
            }
            let Some(newest) = gens.last_mut() else {
                return Err(io_err(&self.dir, std::io::Error::other("no generation")));
            };
            let mark = newest.mark.map_or(hi, |m| m.max(hi));
            batch.put_mark(mark);
            let now = Timestamp::now().unix_ms();
            if newest.mark.is_none() {
                batch.put_born(now);
            }
            let open = newest.store()?;
            if !newest.begin_commit() {
                return Err(io_err(
                    &newest.dir,
                    std::io::Error::other("takes no commits"),
                ));
            }
            (newest.id, newest.dir.clone(), open, mark, acked_below, now)
        };
        // Without it: the write and the fsync can take long on an SD card, and replays and
        // acknowledgements go on meanwhile. The new chunks are not tracked yet, so nothing
        // reads or counts them before they are durable.
        #[cfg(test)]
        self.faults.writing();
        // A panic inside the store here must still reach the bookkeeping below, which ends the
        // commit (a generation left `Committing` would never be deleted nor evicted).
        let written = store::contain(&dir, || {
            #[cfg(test)]
            self.faults.inside_write();
            open.write(batch)
        });
        #[cfg(test)]
        let written = written.and_then(|()| self.faults.synced(&dir));
        drop(open);
        let mut gens = self.lock();
        // `Committing` kept it from being deleted meanwhile.
        let Some(g) = gens.iter_mut().find(|g| g.id == id) else {
            return Err(io_err(&dir, std::io::Error::other("generation gone")));
        };
        if let Err(e) = written {
            // The batch may be in the tree but is not durable; the records are committed again,
            // into a fresh generation. Its chunks are not tracked here, so they are never read
            // or counted; should they have reached the disk after all, a restart finds them
            // here as well as in the generation they go to, and sends them again (re-sends).
            if g.commit_failed((lo, hi), &e) == CommitEnd::SyncFailed {
                warn!(generation = g.id, "an fsync of a buffer generation failed; it takes no more writes, and what it holds drains from memory");
            }
            return Err(e);
        }
        g.commit_durable(
            (lo, hi),
            Committed {
                mark,
                now,
                records: stats.records,
                bytes: stats.bytes,
                chunks: made,
            },
        );
        self.records.fetch_add(stats.records, Ordering::Relaxed);
        self.bytes.fetch_add(stats.bytes, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.maybe_rotate(&mut gens);
        drop(gens);
        let watermark = Watermark {
            generation: id,
            committed_through: mark,
            acked_below,
        };
        // The commit is durable already; a watermark that cannot be written only weakens the
        // check on the next open.
        if let Err(e) = watermark.write(&self.dir) {
            warn!(error = %e, "cannot write the buffer watermark");
        }
        Ok(stats)
    }

    /// Deletes acknowledged records (not synced: a lost delete is a harmless re-send).
    pub fn remove(&self, seqs: &[u64]) -> Result<(), BufferError> {
        let mut gens = self.lock();
        for &seq in seqs {
            // Acknowledgements are mostly for recent records: newest generation first. A record
            // can be in two generations (a commit whose fsync failed, found on disk after all
            // by a restart): both copies go.
            for g in gens.iter_mut().rev() {
                if g.records > 0 && g.may_hold(seq) {
                    self.drop_seq(g, seq)?;
                }
            }
        }
        self.maybe_rotate(&mut gens);
        Ok(())
    }

    /// Up to `limit` records with `seq >= from` and `seq < below`, oldest first, skipping `skip`.
    pub fn read_range(
        &self,
        from: u64,
        below: u64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<Record>, BufferError> {
        // The store can panic on a damaged file: a failed read, not a lost publisher.
        store::contain(&self.dir, || {
            self.read_range_guarded(from, below, limit, skip)
        })
    }

    fn read_range_guarded(
        &self,
        from: u64,
        below: u64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<Record>, BufferError> {
        let mut out = Vec::new();
        if from >= below || limit == 0 {
            return Ok(out);
        }
        let mut gens = self.lock();
        let mut last_read = None;
        for g in gens.iter_mut() {
            if g.records == 0 || !g.overlaps(from, below) {
                continue;
            }
            last_read = Some(g.id);
            let db = g.store()?;
            let start = g.chunk_of(from).unwrap_or(from);
            let mut unreadable = Vec::new();
            let mut failure = None;
            'chunks: for (&key, stored) in g.chunks.range(start..below) {
                let live = &stored.live;
                let mut wanted = live.next_from(from).filter(|&s| s < below);
                if wanted.is_none() {
                    continue;
                }
                let value = match db.get_chunk(key) {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(e);
                        break 'chunks;
                    }
                };
                let records = value.map_or_else(Vec::new, |v| chunk::decode(v.as_ref()).0);
                // Records the chunk should hold and does not give back are dropped below.
                while let Some(s) = wanted {
                    if !records.iter().any(|r| r.seq == s) {
                        unreadable.push(s);
                    }
                    wanted = live.next_from(s + 1).filter(|&s| s < below);
                }
                for r in records {
                    if r.seq < from || r.seq >= below || !live.contains(r.seq) || skip(r.seq) {
                        continue;
                    }
                    out.push(r);
                    if out.len() >= limit {
                        break 'chunks;
                    }
                }
            }
            drop(db);
            if let Some(e) = failure {
                g.failed();
                return Err(e);
            }
            if !unreadable.is_empty() {
                warn!(path = %g.dir.display(), records = unreadable.len(), "dropping damaged records from the buffer");
            }
            for seq in unreadable {
                self.drop_seq(g, seq)?;
            }
            if out.len() >= limit {
                break;
            }
        }
        // The generation the replay is in stays open for the next read and its acknowledgements.
        if let Some(id) = last_read {
            self.reading.store(id, Ordering::Relaxed);
        }
        self.tidy_keeping(&mut gens, last_read);
        Ok(out)
    }

    /// Drops the oldest generation with everything in it, which gives its disk space back
    /// (evicting single records from the store does not). With one generation, a fresh one is
    /// started first, so the one holding the records can go. Returns the records dropped.
    pub fn evict_oldest_generation(&self) -> Result<u64, BufferError> {
        let mut gens = self.lock();
        if gens.len() == 1 {
            gens.push(self.new_gen()?);
        }
        if gens.len() < 2 {
            return Ok(0);
        }
        if !gens[0].state.may_delete() {
            return Err(io_err(
                &self.dir,
                std::io::Error::other("the oldest generation is being committed into"),
            ));
        }
        let oldest = gens.remove(0);
        let (records, bytes) = (oldest.records, oldest.bytes);
        oldest.delete(&self.dir)?;
        self.records
            .fetch_sub(records.min(self.len()), Ordering::Relaxed);
        self.bytes
            .fetch_sub(bytes.min(self.bytes()), Ordering::Relaxed);
        self.tidy(&mut gens);
        Ok(records)
    }

    /// The oldest sequence number on disk.
    pub fn first_seq(&self) -> Option<u64> {
        self.lock().iter().find(|g| g.records > 0)?.first_live()
    }

    /// How long ago the oldest record on disk was committed (about when it was read: a commit
    /// takes what is older than the commit interval). After a restart, a generation from before
    /// counts from its first commit, so the age errs on the old side.
    pub fn oldest_age(&self) -> Option<Duration> {
        let mut gens = self.lock();
        let at = gens
            .iter_mut()
            .find(|g| g.records > 0)?
            .oldest_commit_ms()?;
        Some(Duration::from_millis(
            Timestamp::now().unix_ms().saturating_sub(at),
        ))
    }

    /// Makes every commit fail as a full disk would, until called with `false` (for tests of
    /// what the gateway does when its disk fails).
    #[cfg(test)]
    pub(crate) fn inject_commit_failures(&self, on: bool) {
        self.faults.fail_commits(on);
    }

    /// Records on disk.
    pub fn len(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Whether nothing is on disk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stored bytes of the records on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// What the buffer directory takes on disk: every file of every generation.
    pub fn disk_usage(&self) -> u64 {
        store::disk_usage(&self.dir)
    }

    /// Generations on disk (the newest, which takes commits, included).
    pub fn generations(&self) -> usize {
        self.lock().len()
    }

    /// Generations open now (the others are sealed and take no memory).
    pub fn open_generations(&self) -> usize {
        self.lock().iter().filter(|g| g.open.is_some()).count()
    }

    /// Commits (durable batch writes) since open.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Flushes and fsyncs whatever is pending (shutdown).
    pub fn close(&self) -> Result<(), BufferError> {
        let started = Instant::now();
        let gens = self.lock();
        let mut result = Ok(());
        for g in gens.iter().filter(|g| g.state.syncs_on_close()) {
            if let Some(o) = &g.open {
                if let Err(e) = o.sync() {
                    result = Err(e);
                }
            }
        }
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "buffer closed"
        );
        result
    }
}

#[cfg(test)]
mod tests;
