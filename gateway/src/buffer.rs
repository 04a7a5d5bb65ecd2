//! Store-and-forward buffer over sled. The only file in the gateway that knows about sled.
//!
//! Invariants:
//! - What is in the tree is exactly what was committed and not yet acknowledged: key = the
//!   record's sequence number (big-endian u64, so iteration is oldest first), value = the record
//!   with its checksum ([`Record::to_bytes`]).
//! - A commit is durable only after sled's flush *and* an fsync of sled's data file: sled's flush
//!   uses `sync_file_range`, which does not survive a power cut (a lost length change leaves a
//!   database that panics on open or silently misses records).
//! - Deletes after a PUBACK are not fsynced: losing one only means the record is sent again after
//!   a crash, with the same `seq`, which the cloud de-duplicates.
//! - Opening never takes the gateway down: a panic inside sled is caught, the database is moved
//!   aside to `quarantine-<time>` (never deleted) and a fresh one is started.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, warn};

use crate::record::Record;

/// Errors of the disk buffer.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// sled reported an error.
    #[error("buffer database at {path}: {message}")]
    Db {
        /// The database directory.
        path: PathBuf,
        /// sled's message.
        message: String,
    },
    /// A file system operation failed.
    #[error("buffer file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// sled panicked.
    #[error("buffer database at {0} panicked inside sled")]
    Panicked(PathBuf),
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
    /// Where an unusable database was moved, if one was.
    pub quarantined: Option<PathBuf>,
    /// The highest sequence number on disk.
    pub last_seq: Option<u64>,
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
    db: sled::Db,
    dir: PathBuf,
    data_file: File,
    records: AtomicU64,
    bytes: AtomicU64,
    commits: AtomicU64,
}

fn db_err(path: &Path, e: sled::Error) -> BufferError {
    BufferError::Db {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> BufferError {
    BufferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_sled(dir: &Path) -> Result<sled::Db, BufferError> {
    // sled writes a page larger than a quarter segment to its own file under `blobs/`; larger
    // segments keep pages of big records in the `db` file, and `sync` fsyncs blobs anyway.
    let cfg = sled::Config::new()
        .path(dir)
        .segment_size(8 * 1024 * 1024)
        .cache_capacity(16 * 1024 * 1024)
        .flush_every_ms(Some(1000));
    match catch_unwind(AssertUnwindSafe(|| cfg.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(db_err(dir, e)),
        Err(_) => Err(BufferError::Panicked(dir.to_path_buf())),
    }
}

/// Scans the tree, dropping damaged values; sled may panic on a damaged file, so this is guarded.
fn scan(db: &sled::Db, dir: &Path) -> Result<OpenReport, BufferError> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut report = OpenReport::default();
        let mut damaged = Vec::new();
        for item in db.iter() {
            let (k, v) = item.map_err(|e| db_err(dir, e))?;
            match Record::from_bytes(&v) {
                Ok(r) if k.as_ref() == r.seq.to_be_bytes() => {
                    report.records += 1;
                    report.bytes += (k.len() + v.len()) as u64;
                    report.last_seq = Some(r.seq);
                }
                _ => damaged.push(k),
            }
        }
        for k in &damaged {
            db.remove(k).map_err(|e| db_err(dir, e))?;
        }
        report.damaged = damaged.len() as u64;
        Ok(report)
    }));
    result.unwrap_or_else(|_| Err(BufferError::Panicked(dir.to_path_buf())))
}

fn fsync_dir(dir: &Path) -> Result<(), BufferError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(dir, e))
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`; an unusable database is quarantined, not lost.
    pub fn open(dir: &Path) -> Result<(Buffer, OpenReport), BufferError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let first = open_sled(dir).and_then(|db| scan(&db, dir).map(|r| (db, r)));
        let (db, mut report, quarantined) = match first {
            Ok((db, report)) => (db, report, None),
            Err(e) => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let parent = dir.parent().unwrap_or(Path::new("."));
                let aside = parent.join(format!("quarantine-{stamp}"));
                error!(path = %dir.display(), quarantine = %aside.display(), error = %e, "buffer database cannot be opened; moving it aside and starting a fresh one");
                std::fs::rename(dir, &aside).map_err(|e| io_err(dir, e))?;
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                let db = open_sled(dir)?;
                (db, OpenReport::default(), Some(aside))
            }
        };
        report.quarantined = quarantined;
        if report.damaged > 0 {
            warn!(path = %dir.display(), damaged = report.damaged, "dropped damaged records from the buffer");
        }
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|e| io_err(&data_path, e))?;
        let buffer = Buffer {
            db,
            dir: dir.to_path_buf(),
            data_file,
            records: AtomicU64::new(report.records),
            bytes: AtomicU64::new(report.bytes),
            commits: AtomicU64::new(0),
        };
        // Make the database's files themselves durable before anything counts on them.
        buffer.sync()?;
        fsync_dir(dir)?;
        Ok((buffer, report))
    }

    fn sync(&self) -> Result<(), BufferError> {
        self.db.flush().map_err(|e| db_err(&self.dir, e))?;
        self.data_file
            .sync_all()
            .map_err(|e| io_err(&self.dir.join("db"), e))?;
        // sled does not fsync the blob files it writes for oversized pages either.
        let blobs = self.dir.join("blobs");
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut any = false;
            for entry in entries.flatten() {
                let path = entry.path();
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => any = true,
                    // sled deleted the blob between the listing and the sync: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path, e)),
                }
            }
            if any {
                fsync_dir(&blobs)?;
            }
        }
        Ok(())
    }

    /// Counts records and bytes from the tree itself, after a failure left the counters unsure.
    fn recount(&self) {
        let (mut records, mut bytes) = (0u64, 0u64);
        for (k, v) in self.db.iter().flatten() {
            records += 1;
            bytes += (k.len() + v.len()) as u64;
        }
        self.records.store(records, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Writes records in one batch and makes them durable (flush + fsync) before returning.
    pub fn commit(&self, records: &[Arc<Record>]) -> Result<CommitStats, BufferError> {
        if records.is_empty() {
            return Ok(CommitStats::default());
        }
        let mut batch = sled::Batch::default();
        let mut stats = CommitStats::default();
        for r in records {
            let value = r.to_bytes();
            stats.records += 1;
            stats.bytes += 8 + value.len() as u64;
            batch.insert(&r.seq.to_be_bytes(), value);
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| db_err(&self.dir, e))?;
        if let Err(e) = self.sync() {
            // The batch may be in the tree but not durable; it will be committed again, so the
            // counters are taken from the tree rather than added to twice.
            self.recount();
            return Err(e);
        }
        self.records.fetch_add(stats.records, Ordering::Relaxed);
        self.bytes.fetch_add(stats.bytes, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(stats)
    }

    /// Deletes acknowledged records (not synced: a lost delete is a harmless re-send).
    pub fn remove(&self, seqs: &[u64]) -> Result<(), BufferError> {
        for seq in seqs {
            if let Some(old) = self
                .db
                .remove(seq.to_be_bytes())
                .map_err(|e| db_err(&self.dir, e))?
            {
                self.records.fetch_sub(1, Ordering::Relaxed);
                self.bytes
                    .fetch_sub(8 + old.len() as u64, Ordering::Relaxed);
            }
        }
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
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        if from >= below {
            return Ok(out);
        }
        for item in self.db.range(from.to_be_bytes()..below.to_be_bytes()) {
            let (k, v) = item.map_err(|e| db_err(&self.dir, e))?;
            match Record::from_bytes(&v) {
                Ok(r) if k.as_ref() == r.seq.to_be_bytes() => {
                    if !skip(r.seq) {
                        out.push(r);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
                _ => damaged.push(k),
            }
        }
        for k in damaged {
            warn!(path = %self.dir.display(), "dropping a damaged record from the buffer");
            if let Some(old) = self.db.remove(&k).map_err(|e| db_err(&self.dir, e))? {
                self.records.fetch_sub(1, Ordering::Relaxed);
                self.bytes
                    .fetch_sub((k.len() + old.len()) as u64, Ordering::Relaxed);
            }
        }
        Ok(out)
    }

    /// Removes the oldest records until at most `target_bytes` remain; returns how many went.
    pub fn evict_oldest(&self, target_bytes: u64) -> Result<u64, BufferError> {
        let mut evicted = 0;
        while self.bytes.load(Ordering::Relaxed) > target_bytes {
            match self.db.pop_min().map_err(|e| db_err(&self.dir, e))? {
                Some((k, v)) => {
                    self.records.fetch_sub(1, Ordering::Relaxed);
                    self.bytes
                        .fetch_sub((k.len() + v.len()) as u64, Ordering::Relaxed);
                    evicted += 1;
                }
                None => {
                    self.bytes.store(0, Ordering::Relaxed);
                    break;
                }
            }
        }
        Ok(evicted)
    }

    /// The oldest sequence number on disk.
    pub fn first_seq(&self) -> Option<u64> {
        let (k, _) = self.db.first().ok()??;
        let b: [u8; 8] = k.as_ref().try_into().ok()?;
        Some(u64::from_be_bytes(b))
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

    /// Commits (durable batch writes) since open.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Flushes and fsyncs whatever is pending (shutdown).
    pub fn close(&self) -> Result<(), BufferError> {
        let started = Instant::now();
        let r = self.sync();
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "buffer closed"
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(seq: u64) -> Arc<Record> {
        Arc::new(Record {
            seq,
            topic: "t/d".into(),
            payload: Bytes::from(format!("{{\"seq\":{seq},\"historical\":false}}")),
            flag_offset: crate::record::NO_FLAG,
        })
    }

    #[test]
    fn committed_records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer");
        {
            let (b, _) = Buffer::open(&path).unwrap();
            b.commit(&[rec(3), rec(1), rec(2)]).unwrap();
            b.remove(&[2]).unwrap();
        }
        let (b, report) = Buffer::open(&path).unwrap();
        assert_eq!(report.records, 2);
        assert_eq!(report.last_seq, Some(3));
        let all = b.read_range(0, u64::MAX, 10, |_| false).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(b.first_seq(), Some(1));
    }

    #[test]
    fn read_range_skips_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = Buffer::open(dir.path()).unwrap();
        b.commit(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
        let got = b.read_range(2, 9, 3, |s| s == 3).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 4, 5]);
        assert!(b.read_range(5, 5, 3, |_| false).unwrap().is_empty());
    }

    #[test]
    fn eviction_drops_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = Buffer::open(dir.path()).unwrap();
        b.commit(&(0..10).map(rec).collect::<Vec<_>>()).unwrap();
        let per = b.bytes() / 10;
        let evicted = b.evict_oldest(per * 6).unwrap();
        assert_eq!(evicted, 4);
        assert_eq!(b.first_seq(), Some(4));
        assert_eq!(b.len(), 6);
    }

    #[test]
    fn a_garbage_database_is_quarantined_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(path.join("db"), vec![0xAB; 4096]).unwrap();
        let (b, report) = Buffer::open(&path).unwrap();
        let aside = report.quarantined.expect("quarantined");
        assert!(aside.join("db").exists(), "the damaged file is kept");
        b.commit(&[rec(1)]).unwrap();
        assert_eq!(b.len(), 1);
    }
}
