//! Store-and-forward buffer over sled, in generations. The only file in the gateway that knows
//! about sled.
//!
//! Invariants:
//! - What the generations hold is what was committed and not yet acknowledged, in chunks
//!   ([`chunk`]): key = the chunk's first sequence number (big-endian u64, so iteration
//!   is oldest first), value = the chunk's records, each with its checksum. A chunk is deleted
//!   once all its records are acknowledged; which of them are is kept in memory (a restart sends
//!   a partly acknowledged chunk again, as re-sends with the same `seq`). Sequence numbers only
//!   grow, so every generation holds a range above the ones of older generations, and reading
//!   them in order is reading oldest first.
//! - A commit is durable only after sled's flush *and* an fsync of sled's data file: sled's flush
//!   uses `sync_file_range`, which does not survive a power cut (a lost length change leaves a
//!   database that panics on open or silently misses records).
//! - A commit writes and fsyncs without holding the generations' lock (commits are serialized
//!   by a lock of their own), so a replay read or an acknowledgement never waits for a slow
//!   fsync; its chunks are tracked, and so readable, only once durable, and the generation it
//!   writes is neither sealed nor deleted meanwhile.
//! - Deletes after a PUBACK are not fsynced: losing one only means the record is sent again after
//!   a crash, with the same `seq`, which the cloud de-duplicates.
//! - A generation whose fsync failed is frozen: nothing more is written to it, not even a
//!   delete (Linux may drop the pages that failed, and sled's recovery stops at such a hole, so
//!   a later write that moved committed pages past it could lose them). Its acknowledgements
//!   stay in memory; it is deleted whole once drained. The failed batch is committed again into
//!   a fresh generation; should it have reached the disk after all, a restart finds it twice,
//!   and an acknowledgement takes it out of both.
//! - sled does not fsync its `conf` file; the buffer does once per new generation, so a power
//!   cut never leaves a database whose configuration is empty or torn.
//! - sled never gives space back, so the buffer does: new commits go to the newest generation
//!   (`gen-<n>/`, one sled database each); once it has taken [`ROTATE_AFTER`] bytes, or once it
//!   is drained after taking at least [`ROTATE_DRAINED`], a fresh generation is started. An older
//!   generation whose database is empty is deleted: renamed to `gen-<n>.drained` first (one
//!   atomic step, so a crash never leaves a half-deleted database to open), then removed.
//! - Opening never takes the gateway down: a panic inside sled is caught, the generation is moved
//!   aside to `quarantine-<time>` (never deleted) and the others are kept.
//! - Only the newest generation, the oldest one holding records, the one a replay is reading
//!   and frozen ones (until drained) stay open; the others are sealed (synced, closed), because sled keeps in memory what an
//!   open database holds. Per-generation counts and sequence ranges route reads and deletes
//!   without opening the sealed ones.
//! - Every commit also writes the generation's commit mark (the highest `seq` committed into it,
//!   key [`MARK_KEY`], never deleted) in the same sled batch, and then, once durable, the
//!   `watermark` file (written, fsynced, renamed): the generation, its commit mark and the
//!   oldest record not yet acknowledged. On open, a generation whose commit mark is below the
//!   watermark's lost a commit sled had made durable: that is reported (error log, metric), not
//!   trusted. The watermark's rename is not fsynced per commit, so after a crash it may be one
//!   commit old: the check only gets weaker, never wrong.
//! - A buffer written before generations (sled's files directly in the buffer directory) is
//!   moved into `gen-0/` on open, so an upgrade keeps its backlog.

mod chunk;
mod record;

#[cfg(test)]
pub(crate) use self::record::incompressible;
pub use self::record::{Record, RecordError, NO_FLAG};

use std::collections::BTreeMap;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocols::model::Timestamp;
use tracing::{debug, error, info, warn};

use self::chunk::Live;

/// A generation takes this many committed bytes before commits move to a fresh one.
pub const ROTATE_AFTER: u64 = 32 << 20;

/// The rotation size for a buffer bounded to `max_size` on disk: small enough that dropping
/// the oldest generation frees a small share of it, large enough that a long outage does not
/// open hundreds of databases.
pub fn rotate_after_for(max_size: u64) -> u64 {
    (max_size / 16).clamp(256 << 10, ROTATE_AFTER)
}

/// Key of a generation's commit mark: nine bytes, so it sorts after every record key (eight
/// bytes, big-endian) and no range of record keys ever reaches it.
const MARK_KEY: [u8; 9] = [0xff; 9];

/// Key of a generation's first commit time (unix milliseconds), after the commit mark.
const BORN_KEY: [u8; 10] = [0xff; 10];

/// Commit times kept per generation for the oldest record's age; past this, one a second.
const MAX_COMMIT_TIMES: usize = 1024;

/// The watermark file's name, in the buffer directory.
const WATERMARK: &str = "watermark";

/// A drained newest generation is replaced once it has taken this many bytes.
pub const ROTATE_DRAINED: u64 = 1 << 20;

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
    /// sled reported a failed read or write of its files (a full disk, an I/O error).
    #[error("buffer database at {path}: {source}")]
    DbIo {
        /// The database directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// sled panicked.
    #[error("buffer database at {0} panicked inside sled")]
    Panicked(PathBuf),
}

impl BufferError {
    /// Whether the disk failed (full, I/O error), rather than the database being unusable:
    /// such a generation is kept and tried again, never set aside.
    pub fn is_io(&self) -> bool {
        matches!(self, BufferError::Io { .. } | BufferError::DbIo { .. })
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
    /// Where an unusable generation was moved, if one was.
    pub quarantined: Option<PathBuf>,
    /// The highest sequence number known to be used: on disk, or committed as the watermark says.
    pub last_seq: Option<u64>,
    /// Generations found with records in them.
    pub generations: usize,
    /// Set when a generation holds less than the watermark says was made durable: sled lost
    /// committed records (see the module comment).
    pub lost_commits: Option<LostCommits>,
}

/// A generation that lost commits sled had reported durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostCommits {
    /// The generation.
    pub generation: u64,
    /// The highest sequence number the watermark says was committed into it.
    pub committed_through: u64,
    /// The highest sequence number its commit mark still shows, if any.
    pub found_through: Option<u64>,
}

/// What the watermark file says: the newest durable commit, and the oldest record that may be
/// unacknowledged (everything below it was acknowledged or evicted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watermark {
    generation: u64,
    committed_through: u64,
    acked_below: u64,
}

impl Watermark {
    fn to_text(self) -> String {
        format!(
            "# edge-gateway buffer watermark: the newest durable commit, and the oldest record\n\
             # that may be unacknowledged. Rewritten after commits; do not edit.\n\
             generation={}\ncommitted_through={}\nacked_below={}\n",
            self.generation, self.committed_through, self.acked_below
        )
    }

    fn parse(text: &str) -> Option<Watermark> {
        let (mut generation, mut committed_through, mut acked_below) = (None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("generation", v)) => generation = v.trim().parse().ok(),
                Some(("committed_through", v)) => committed_through = v.trim().parse().ok(),
                Some(("acked_below", v)) => acked_below = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(Watermark {
            generation: generation?,
            committed_through: committed_through?,
            acked_below: acked_below?,
        })
    }

    /// Reads the watermark in `dir`; a missing file is `None`, an unreadable one is logged.
    fn read(dir: &Path) -> Option<Watermark> {
        let path = dir.join(WATERMARK);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let w = Watermark::parse(&text);
                if w.is_none() {
                    warn!(path = %path.display(), "buffer watermark file is damaged; not checking the buffer against it");
                }
                w
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the buffer watermark file; not checking the buffer against it");
                None
            }
        }
    }

    /// Writes the watermark in `dir`: temporary file, fsync, rename (the rename's own fsync of
    /// the directory is left to the next directory sync: an older watermark is still true).
    fn write(self, dir: &Path) -> Result<(), BufferError> {
        let tmp = dir.join("watermark.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, self.to_text().as_bytes())?;
            f.sync_data()
        };
        write().map_err(|e| io_err(&tmp, e))?;
        let path = dir.join(WATERMARK);
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    }
}

/// The result of one commit.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Records written.
    pub records: u64,
    /// Bytes written (values and keys).
    pub bytes: u64,
}

/// An open sled database.
#[derive(Debug)]
struct OpenDb {
    /// Always `Some` until dropped (see the `Drop` impl).
    db: Option<sled::Db>,
    data_file: File,
    /// Blob files already fsynced (sled writes each once and never changes it).
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl Drop for OpenDb {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            close_quietly(db);
        }
    }
}

/// Drops a sled handle. sled's last handle fsyncs the file and unwraps the result: on a
/// failing disk that panics. The panic is contained here; what the fsync would have made
/// durable was committed (or not) through `sync_gen`, which reports its errors.
fn close_quietly(db: sled::Db) {
    if catch_unwind(AssertUnwindSafe(move || drop(db))).is_err() {
        warn!("closing a buffer database failed inside sled (the disk failed)");
    }
}

/// Logs panics raised inside sled as one error line instead of a panic report. The buffer
/// contains every one of them (a failed open, commit, read or close; see [`close_quietly`]),
/// but the default hook would still print `panicked at` and a backtrace for each, which on a
/// failing disk is one report per generation closed or retried: noise that reads as a crash.
/// Panics anywhere else go to the hook that was installed before.
pub fn contain_sled_panic_reports() {
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_sled = info.location().is_some_and(|l| {
            let file = l.file();
            file.contains("/sled-") || file.contains("\\sled-")
        });
        if !in_sled {
            return before(info);
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        error!(
            at = at.unwrap_or_default(),
            message, "sled failed inside (the disk failed); the buffer contains it and goes on"
        );
    }));
}

/// One sled database of the buffer. Only the newest generation, the oldest one holding records
/// (the next to replay), the one a replay reads and frozen ones are kept open; the others are
/// sealed: synced and closed, so sled's memory for them is given back (sled keeps what it wrote
/// in memory while open), and opened again only when a replay or an acknowledgement reaches
/// them.
#[derive(Debug)]
struct Generation {
    id: u64,
    dir: PathBuf,
    /// Shared with a commit in progress, which writes and syncs without the buffer's lock.
    open: Option<Arc<OpenDb>>,
    /// Lowest and highest sequence number ever put into it: routes deletes and reads.
    seqs: Option<(u64, u64)>,
    /// Records and stored bytes in it now.
    records: u64,
    bytes: u64,
    /// Bytes committed into it since it was created or opened.
    written: u64,
    /// Its commit mark: the highest sequence number committed into it, if any.
    mark: Option<u64>,
    /// (highest sequence number, unix ms) of its commits, oldest first: the oldest record's
    /// age. A generation found on open has one entry, its first commit's time.
    times: VecDeque<(u64, u64)>,
    /// Its chunks by key (first sequence number): the records not yet acknowledged in each, and
    /// the bytes the chunk takes (key and value). Only chunks with such records are here.
    chunks: BTreeMap<u64, Stored>,
    /// No more commits go into it: found at start (commits go to a fresh generation after a
    /// start), or a write or an fsync of it failed.
    closed: bool,
    /// An fsync of it failed: nothing at all is written to it any more, deletes included.
    /// Linux may drop the pages whose writeback failed, leaving a hole in sled's log; sled's
    /// recovery stops at a hole, so anything written after it (a delete that makes sled move
    /// committed pages while it cleans a segment) could take committed records with it. Its
    /// acknowledgements are kept in memory only, and it is deleted whole once drained (a
    /// restart before that sends what it holds again, as re-sends).
    frozen: bool,
    /// A commit is writing into it without the buffer's lock: it is neither sealed nor deleted
    /// until the commit is done.
    committing: bool,
}

/// A chunk on disk.
#[derive(Debug)]
struct Stored {
    live: Live,
    bytes: u64,
}

impl Generation {
    /// A handle on the database (sled's handles are shared), opening it if it is sealed.
    fn db(&mut self) -> Result<sled::Db, BufferError> {
        if self.open.is_none() && self.frozen {
            // Opening writes (sled pads its file, fsyncs): never again into a frozen one.
            return Err(io_err(
                &self.dir,
                std::io::Error::other("frozen and closed"),
            ));
        }
        if self.open.is_none() {
            self.open = Some(Arc::new(open_db(&self.dir)?));
        }
        match &self.open {
            Some(o) => {
                o.db.clone()
                    .ok_or_else(|| io_err(&self.dir, std::io::Error::other("closed")))
            }
            None => Err(io_err(&self.dir, std::io::Error::other("not open"))),
        }
    }

    /// Drops the handle after a failed write: sled keeps a failed write (a full disk, an I/O
    /// error) as an error of the whole database until it is opened again, so the next use
    /// reopens it, and commits resume once the disk takes writes again.
    fn failed(&mut self) {
        // A frozen one keeps its handle: it may not be opened again (see `frozen`).
        if !self.frozen && self.open.take().is_some() {
            debug!(
                generation = self.id,
                "buffer generation closed after a failed write; the next use reopens it"
            );
        }
    }

    /// Syncs and closes the database (never a frozen one: see `tidy_keeping`).
    fn seal(&mut self) -> Result<(), BufferError> {
        if let Some(o) = &self.open {
            sync_gen(o, &self.dir)?;
        }
        self.open = None;
        Ok(())
    }

    /// The key of the chunk that may hold `seq`.
    fn chunk_of(&self, seq: u64) -> Option<u64> {
        self.chunks.range(..=seq).next_back().map(|(&k, _)| k)
    }

    /// The lowest sequence number not yet acknowledged in it.
    fn first_live(&self) -> Option<u64> {
        self.chunks.values().find_map(|c| c.live.first())
    }

    fn may_hold(&self, seq: u64) -> bool {
        self.seqs.is_some_and(|(lo, hi)| lo <= seq && seq <= hi)
    }

    fn overlaps(&self, from: u64, below: u64) -> bool {
        self.seqs.is_some_and(|(lo, hi)| lo < below && from <= hi)
    }
}

/// The disk buffer.
#[derive(Debug)]
pub struct Buffer {
    dir: PathBuf,
    rotate_after: u64,
    rotate_drained: u64,
    /// Oldest first; never empty.
    gens: Mutex<Vec<Generation>>,
    records: AtomicU64,
    bytes: AtomicU64,
    commits: AtomicU64,
    /// Commits fail as if the disk were full while set (fault injection for tests).
    fail_commits: AtomicBool,
    /// The fsync after a commit's flush fails while set (fault injection for unit tests).
    #[cfg(test)]
    fail_syncs: AtomicBool,
    /// A commit panics inside its write while set (as sled can on a damaged file).
    #[cfg(test)]
    panic_commits: AtomicBool,
    /// A commit says it is writing (first channel) and waits for a go (second) while set.
    #[cfg(test)]
    commit_gate: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    /// Generations that could not be read at open because the disk failed: kept on disk and
    /// tried again after each commit that works.
    deferred: Mutex<Vec<u64>>,
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
    committing: Mutex<()>,
}

/// How often generations the disk failed to give are tried again.
const RETRY_DEFERRED: Duration = Duration::from_secs(5);

fn db_err(path: &Path, e: sled::Error) -> BufferError {
    match e {
        sled::Error::Io(source) => BufferError::DbIo {
            path: path.to_path_buf(),
            source,
        },
        other => BufferError::Db {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

fn io_err(path: &Path, source: std::io::Error) -> BufferError {
    BufferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// sled's segment size. Measured with a 60 s outage at 10k samples/s (`bench --outage-seconds
/// 60`): 8 MiB segments wrote 542 bytes per sample, 2 MiB 345, 1 MiB 264, 512 KiB 258. sled
/// also pads the rest of its last segment when it opens a database, so a smaller segment writes
/// less at every reopen of a sealed generation. A page larger than a quarter segment goes to a
/// file of its own under `blobs/`, which `sync_gen` fsyncs.
const SEGMENT_SIZE: usize = 1 << 20;

/// The segment size of generations written before [`SEGMENT_SIZE`] was lowered: sled refuses
/// to open a database with another segment size than the one it was made with.
const LEGACY_SEGMENT_SIZE: usize = 8 << 20;

/// How often, and how long apart, opening a database sled finds locked is tried.
const LOCK_TRIES: u32 = 50;
const LOCK_WAIT: Duration = Duration::from_millis(20);

/// Whether sled could not open a database because its file is locked.
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn open_sled(dir: &Path) -> Result<sled::Db, BufferError> {
    let open = |segment_size: usize| {
        let cfg = sled::Config::new()
            .path(dir)
            .segment_size(segment_size)
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(Some(1000));
        catch_unwind(AssertUnwindSafe(|| cfg.open()))
    };
    let open_any = || {
        let opened = open(SEGMENT_SIZE);
        if matches!(opened, Ok(Err(sled::Error::Unsupported(_)))) {
            // Made by an earlier version with the older segment size.
            return open(LEGACY_SEGMENT_SIZE);
        }
        opened
    };
    let mut opened = open_any();
    // sled writes its log buffers on a thread pool of its own, and a write still queued there
    // when a database is closed keeps the file (and sled's lock on it) open a moment longer:
    // a generation reopened at once (sealed, then read by a replay) can find it locked.
    let mut tries = 0;
    while tries < LOCK_TRIES && matches!(&opened, Ok(Err(e)) if is_lock_held(e)) {
        std::thread::sleep(LOCK_WAIT);
        tries += 1;
        opened = open_any();
    }
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(db_err(dir, e)),
        Err(_) => Err(BufferError::Panicked(dir.to_path_buf())),
    }
}

/// What scanning one generation found.
#[derive(Debug, Default)]
struct Scanned {
    records: u64,
    bytes: u64,
    damaged: u64,
    last_seq: Option<u64>,
    mark: Option<u64>,
    born_ms: Option<u64>,
    chunks: BTreeMap<u64, Stored>,
}

/// Scans a tree, dropping damaged records (a chunk left with none is deleted); sled may panic
/// on a damaged file, so this is guarded.
fn scan(db: &sled::Db, dir: &Path) -> Result<Scanned, BufferError> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut report = Scanned::default();
        let mut empty = Vec::new();
        for item in db.iter() {
            let (k, v) = item.map_err(|e| db_err(dir, e))?;
            if k.as_ref() == MARK_KEY {
                report.mark = v.as_ref().try_into().ok().map(u64::from_be_bytes);
                continue;
            }
            if k.as_ref() == BORN_KEY {
                report.born_ms = v.as_ref().try_into().ok().map(u64::from_be_bytes);
                continue;
            }
            let Some(key) = key_seq(&k) else {
                empty.push(k);
                continue;
            };
            if chunk::from_a_newer_version(&v) {
                // After a downgrade: set the generation aside whole rather than drop it.
                return Err(BufferError::Db {
                    path: dir.to_path_buf(),
                    message: "written by a newer version of the gateway".into(),
                });
            }
            let (records, damaged) = chunk::decode(&v);
            report.damaged += damaged;
            let mut live = Live::new(key);
            for r in &records {
                // A record outside its chunk's span is not where it belongs: damaged.
                if live.insert(r.seq) {
                    report.last_seq = report.last_seq.max(Some(r.seq));
                } else {
                    report.damaged += 1;
                }
            }
            if live.is_empty() {
                empty.push(k);
                continue;
            }
            report.records += live.len();
            let bytes = (k.len() + v.len()) as u64;
            report.bytes += bytes;
            report.chunks.insert(key, Stored { live, bytes });
        }
        for k in &empty {
            db.remove(k).map_err(|e| db_err(dir, e))?;
        }
        Ok(report)
    }));
    result.unwrap_or_else(|_| Err(BufferError::Panicked(dir.to_path_buf())))
}

fn fsync_dir(dir: &Path) -> Result<(), BufferError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Makes a generation's files durable: sled's flush, then fsync of its data file and blobs.
fn sync_gen(o: &OpenDb, dir: &Path) -> Result<(), BufferError> {
    if let Some(db) = &o.db {
        db.flush().map_err(|e| db_err(dir, e))?;
    }
    o.data_file
        .sync_all()
        .map_err(|e| io_err(&dir.join("db"), e))?;
    // sled does not fsync the blob files it writes for oversized pages either; each is written
    // once, so only the new ones are synced.
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        let mut synced = o.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut listed = HashSet::new();
        let mut any = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !synced.contains(&name) {
                let path = entry.path();
                match File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => any = true,
                    // sled deleted the blob between the listing and the sync: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&path, e)),
                }
            }
            listed.insert(name);
        }
        if any {
            fsync_dir(&blobs)?;
        }
        *synced = listed;
    }
    Ok(())
}

fn gen_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("gen-{id}"))
}

/// Opens (creating it if needed) the sled database in `path`.
fn open_db(path: &Path) -> Result<OpenDb, BufferError> {
    std::fs::create_dir_all(path).map_err(|e| io_err(path, e))?;
    let db = open_sled(path)?;
    let files = || -> Result<File, BufferError> {
        let data_path = path.join("db");
        let data_file = File::open(&data_path).map_err(|e| io_err(&data_path, e))?;
        // sled writes its `conf` without an fsync; an empty or torn one after a power cut
        // would make the generation unopenable (and quarantined) with committed records in it.
        let conf = path.join("conf");
        File::open(&conf)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&conf, e))?;
        fsync_dir(path)?;
        Ok(data_file)
    };
    match files() {
        Ok(data_file) => Ok(OpenDb {
            db: Some(db),
            data_file,
            synced_blobs: Mutex::new(HashSet::new()),
        }),
        Err(e) => {
            close_quietly(db);
            Err(e)
        }
    }
}

/// Opens (creating it if needed) generation `id` under `dir`, with nothing counted yet.
fn open_gen(dir: &Path, id: u64) -> Result<Generation, BufferError> {
    let path = gen_dir(dir, id);
    let open = open_db(&path)?;
    Ok(Generation {
        id,
        dir: path,
        open: Some(Arc::new(open)),
        seqs: None,
        records: 0,
        bytes: 0,
        written: 0,
        mark: None,
        times: VecDeque::new(),
        chunks: BTreeMap::new(),
        closed: false,
        frozen: false,
        committing: false,
    })
}

/// Opens generation `id` and reads what it holds, then seals it.
fn load_gen(dir: &Path, id: u64) -> Result<(Generation, Scanned), BufferError> {
    let mut g = open_gen(dir, id)?;
    let mut found = scan(&g.db()?, &g.dir)?;
    g.chunks = std::mem::take(&mut found.chunks);
    g.seqs = g.first_live().zip(found.last_seq);
    g.records = found.records;
    g.bytes = found.bytes;
    g.mark = found.mark;
    if let Some(t) = found.born_ms.zip(found.last_seq) {
        g.times.push_back((t.1, t.0));
    }
    g.seal()?;
    g.closed = true;
    Ok((g, found))
}

/// Moves a buffer from before generations (sled's files in `dir` itself) into `gen-0/`.
fn migrate_flat_layout(dir: &Path) -> Result<(), BufferError> {
    if !dir.join("db").exists() {
        return Ok(());
    }
    let target = gen_dir(dir, 0);
    std::fs::create_dir_all(&target).map_err(|e| io_err(&target, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("gen-") {
            continue;
        }
        let to = target.join(&name);
        std::fs::rename(entry.path(), &to).map_err(|e| io_err(&to, e))?;
    }
    fsync_dir(&target)?;
    fsync_dir(dir)?;
    info!(path = %dir.display(), "moved the buffer into its first generation");
    Ok(())
}

/// The generation ids under `dir`, ascending; removes leftovers of interrupted deletions.
fn list_generations(dir: &Path) -> Result<Vec<u64>, BufferError> {
    let mut ids = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix("gen-") else {
            continue;
        };
        if rest.ends_with(".drained") {
            // Renamed for deletion, then interrupted: nothing in it was unacknowledged.
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        if let Ok(id) = rest.parse::<u64>() {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Moves an unusable generation aside; returns where it went.
fn quarantine(dir: &Path, path: &Path, e: &BufferError) -> Result<PathBuf, BufferError> {
    let stamp = Timestamp::now().unix_ms();
    let parent = dir.parent().unwrap_or(Path::new("."));
    let aside = parent.join(format!("quarantine-{stamp}"));
    error!(path = %path.display(), quarantine = %aside.display(), error = %e, "buffer generation cannot be opened; moving it aside, never deleting it");
    std::fs::rename(path, &aside).map_err(|e| io_err(path, e))?;
    fsync_dir(dir)?;
    Ok(aside)
}

/// Deletes a drained generation's directory: renamed first, so a crash leaves nothing to open.
fn delete_gen(dir: &Path, generation: Generation) -> Result<(), BufferError> {
    let Generation {
        id,
        dir: path,
        open,
        ..
    } = generation;
    // sled's background threads hold the files until the last handle is gone.
    drop(open);
    let doomed = dir.join(format!("gen-{id}.drained"));
    std::fs::rename(&path, &doomed).map_err(|e| io_err(&path, e))?;
    fsync_dir(dir)?;
    std::fs::remove_dir_all(&doomed).map_err(|e| io_err(&doomed, e))?;
    debug!(generation = id, "drained buffer generation deleted");
    Ok(())
}

/// Compares the watermark with the generations found: the generation it names must show a
/// commit mark at least as high. A generation that is gone was deleted once drained (or was
/// quarantined, which is reported on its own), so it says nothing.
fn check_watermark(w: Watermark, gens: &[Generation]) -> Option<LostCommits> {
    let g = gens.iter().find(|g| g.id == w.generation)?;
    if w.committed_through < w.acked_below || g.mark >= Some(w.committed_through) {
        return None;
    }
    Some(LostCommits {
        generation: g.id,
        committed_through: w.committed_through,
        found_through: g.mark,
    })
}

/// Bytes of the files under `path` (what the buffer takes on disk).
fn disk_usage(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn key_seq(k: &[u8]) -> Option<u64> {
    let b: [u8; 8] = k.try_into().ok()?;
    Some(u64::from_be_bytes(b))
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
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        migrate_flat_layout(dir)?;
        let mut report = OpenReport::default();
        let mut gens = Vec::new();
        let ids = list_generations(dir)?;
        let mut deferred = Vec::new();
        for &id in &ids {
            let path = gen_dir(dir, id);
            match load_gen(dir, id) {
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
                Err(e) => report.quarantined = Some(quarantine(dir, &path, &e)?),
            }
        }
        if report.damaged > 0 {
            warn!(path = %dir.display(), damaged = report.damaged, "dropped damaged records from the buffer");
        }
        let watermark = Watermark::read(dir);
        report.lost_commits = watermark.and_then(|w| check_watermark(w, &gens));
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
        match open_gen(dir, next) {
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
            fail_commits: AtomicBool::new(false),
            #[cfg(test)]
            fail_syncs: AtomicBool::new(false),
            #[cfg(test)]
            panic_commits: AtomicBool::new(false),
            #[cfg(test)]
            commit_gate: Mutex::new(None),
            deferred: Mutex::new(deferred),
            next_gen: AtomicU64::new(next + 1),
            next_retry: Mutex::new(Instant::now() + RETRY_DEFERRED),
            next_attempt: Mutex::new(Instant::now()),
            reading: AtomicU64::new(u64::MAX),
            committing: Mutex::new(()),
        };
        {
            let mut gens = buffer.lock();
            if let Err(e) = fsync_dir(dir) {
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
        let made = open_gen(&self.dir, id).and_then(|g| {
            fsync_dir(&self.dir)?;
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

    /// Tries again, at most every [`RETRY_DEFERRED`], the generations the disk failed to give
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
        deferred.retain(|&id| match load_gen(&self.dir, id) {
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
            Err(e) if e.is_io() => {
                debug!(generation = id, error = %e, "buffer generation still unreadable");
                true
            }
            Err(e) => {
                if let Err(moved) = quarantine(&self.dir, &gen_dir(&self.dir, id), &e) {
                    warn!(generation = id, error = %moved, "cannot move an unusable buffer generation aside");
                    return true;
                }
                false
            }
        });
        recovered
    }

    /// Takes `seq` out of generation `g` (acknowledged, or unreadable) and deletes its chunk
    /// once no record in it is left; returns whether `seq` was there.
    fn drop_seq(&self, g: &mut Generation, seq: u64) -> Result<bool, BufferError> {
        let Some(key) = g.chunk_of(seq) else {
            return Ok(false);
        };
        let Some(stored) = g.chunks.get_mut(&key) else {
            return Ok(false);
        };
        if !stored.live.remove(seq) {
            return Ok(false);
        }
        g.records = g.records.saturating_sub(1);
        self.records.fetch_sub(1.min(self.len()), Ordering::Relaxed);
        if stored.live.is_empty() {
            let bytes = stored.bytes;
            g.chunks.remove(&key);
            g.bytes = g.bytes.saturating_sub(bytes);
            self.bytes
                .fetch_sub(bytes.min(self.bytes()), Ordering::Relaxed);
            if g.frozen {
                return Ok(true);
            }
            let dir = g.dir.clone();
            if let Err(e) = g.db()?.remove(key.to_be_bytes()) {
                g.failed();
                return Err(db_err(&dir, e));
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
            if gens[i].records == 0 && !gens[i].committing {
                let g = gens.remove(i);
                if let Err(e) = delete_gen(&self.dir, g) {
                    warn!(error = %e, "cannot delete a drained buffer generation; it stays on disk");
                }
            } else {
                i += 1;
            }
        }
        let last = gens.len().saturating_sub(1);
        let oldest_held = gens.iter().position(|g| g.records > 0);
        for (i, g) in gens.iter_mut().enumerate() {
            // A frozen one stays open until drained: reopening it would write to it.
            let in_use = i == last || Some(i) == oldest_held || Some(g.id) == keep || g.frozen;
            if !in_use && !g.committing && g.open.is_some() {
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
        // sled can panic on a damaged file: that is a failed commit (the records stay in memory
        // and are retried), not a lost committer.
        catch_unwind(AssertUnwindSafe(|| self.commit_guarded(records)))
            .unwrap_or_else(|_| Err(BufferError::Panicked(self.dir.clone())))
    }

    fn commit_guarded(&self, records: &[Arc<Record>]) -> Result<CommitStats, BufferError> {
        if records.is_empty() {
            return Ok(CommitStats::default());
        }
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(io_err(
                &self.dir,
                std::io::Error::other("no space left on device (injected)"),
            ));
        }
        let mut sorted = records.to_vec();
        sorted.sort_by_key(|r| r.seq);
        let (lo, hi) = (sorted[0].seq, sorted[sorted.len() - 1].seq);
        let mut batch = sled::Batch::default();
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
            batch.insert(&key.to_be_bytes(), value);
            made.push((key, Stored { live, bytes }));
        }
        let _one_at_a_time = self.committing.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: pick the generation and take its handles.
        let (id, dir, db, open, mark, acked_below, now) = {
            let mut gens = self.lock();
            let acked_below = gens
                .iter()
                .filter(|g| g.records > 0)
                .find_map(|g| g.seqs.map(|(lo, _)| lo))
                .unwrap_or(lo)
                .min(lo);
            if gens.last().is_none_or(|g| g.closed) {
                gens.push(self.new_gen()?);
            }
            let Some(newest) = gens.last_mut() else {
                return Err(io_err(&self.dir, std::io::Error::other("no generation")));
            };
            let mark = newest.mark.map_or(hi, |m| m.max(hi));
            batch.insert(&MARK_KEY, &mark.to_be_bytes());
            let now = Timestamp::now().unix_ms();
            if newest.mark.is_none() {
                batch.insert(&BORN_KEY, &now.to_be_bytes());
            }
            let db = newest.db()?;
            let Some(open) = newest.open.clone() else {
                return Err(io_err(&newest.dir, std::io::Error::other("not open")));
            };
            newest.committing = true;
            let dir = newest.dir.clone();
            (newest.id, dir, db, open, mark, acked_below, now)
        };
        // Without it: the write and the fsync can take long on an SD card, and replays and
        // acknowledgements go on meanwhile. The new chunks are not tracked yet, so nothing
        // reads or counts them before they are durable.
        #[cfg(test)]
        if let Some((entered, go)) = &*self.commit_gate.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = entered.send(());
            let _ = go.recv();
        }
        // A panic inside sled here must still reach the bookkeeping below, which clears
        // `committing` (a generation left flagged would never be deleted nor evicted).
        let written = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(test)]
            if self.panic_commits.load(Ordering::Relaxed) {
                panic!("injected panic inside a commit");
            }
            match db.apply_batch(batch) {
                Ok(()) => sync_gen(&open, &dir),
                Err(e) => Err(db_err(&dir, e)),
            }
        }))
        .unwrap_or_else(|_| Err(BufferError::Panicked(dir.clone())));
        #[cfg(test)]
        let written = written.and_then(|()| {
            if self.fail_syncs.load(Ordering::Relaxed) {
                Err(io_err(
                    &dir,
                    std::io::Error::other("fsync failed (injected)"),
                ))
            } else {
                Ok(())
            }
        });
        drop((db, open));
        let mut gens = self.lock();
        // `committing` kept it from being deleted meanwhile.
        let Some(g) = gens.iter_mut().find(|g| g.id == id) else {
            return Err(io_err(&dir, std::io::Error::other("generation gone")));
        };
        g.committing = false;
        g.seqs = Some(g.seqs.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        if let Err(e) = written {
            // The batch may be in the tree but is not durable; the records are committed again,
            // into a fresh generation. Its chunks are not tracked here, so they are never read
            // or counted; should they have reached the disk after all, a restart finds them
            // here as well as in the generation they go to, and sends them again (re-sends).
            g.closed = true;
            if matches!(
                e,
                BufferError::Db { .. } | BufferError::DbIo { .. } | BufferError::Panicked(_)
            ) {
                // sled failed: it holds the error until the database is opened again.
                g.failed();
            } else {
                // Our own fsync failed: nothing more goes into this database (see `frozen`).
                g.frozen = true;
                warn!(generation = g.id, "an fsync of a buffer generation failed; it takes no more writes, and what it holds drains from memory");
            }
            return Err(e);
        }
        g.mark = Some(mark);
        g.written += stats.bytes;
        // A record is in one successful commit only (the chunks of a failed one are never
        // tracked), so no key is taken twice.
        g.chunks.extend(made);
        let spaced = g.times.back().is_none_or(|&(_, t)| now >= t + 1000);
        if g.times.len() < MAX_COMMIT_TIMES || spaced {
            g.times.push_back((mark, now));
        } else if let Some(last) = g.times.back_mut() {
            // Too many commits to keep each: the newest entry covers this one too.
            last.0 = mark;
        }
        g.records += stats.records;
        g.bytes += stats.bytes;
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
        // sled can panic on a damaged file: a failed read, not a lost publisher.
        catch_unwind(AssertUnwindSafe(|| {
            self.read_range_guarded(from, below, limit, skip)
        }))
        .unwrap_or_else(|_| Err(BufferError::Panicked(self.dir.clone())))
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
            let dir = g.dir.clone();
            let db = g.db()?;
            let start = g.chunk_of(from).unwrap_or(from);
            let mut unreadable = Vec::new();
            let mut failure = None;
            'chunks: for (&key, stored) in g.chunks.range(start..below) {
                let live = &stored.live;
                let mut wanted = live.next_from(from).filter(|&s| s < below);
                if wanted.is_none() {
                    continue;
                }
                let value = match db.get(key.to_be_bytes()) {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(db_err(&dir, e));
                        break 'chunks;
                    }
                };
                let records = value.map_or_else(Vec::new, |v| chunk::decode(&v).0);
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
            if let Some(e) = failure {
                g.failed();
                return Err(e);
            }
            if !unreadable.is_empty() {
                warn!(path = %dir.display(), records = unreadable.len(), "dropping damaged records from the buffer");
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
    /// (evicting single records from sled does not). With one generation, a fresh one is
    /// started first, so the one holding the records can go. Returns the records dropped.
    pub fn evict_oldest_generation(&self) -> Result<u64, BufferError> {
        let mut gens = self.lock();
        if gens.len() == 1 {
            gens.push(self.new_gen()?);
        }
        if gens.len() < 2 {
            return Ok(0);
        }
        if gens[0].committing {
            return Err(io_err(
                &self.dir,
                std::io::Error::other("the oldest generation is being committed into"),
            ));
        }
        let oldest = gens.remove(0);
        let (records, bytes) = (oldest.records, oldest.bytes);
        delete_gen(&self.dir, oldest)?;
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
        let g = gens.iter_mut().find(|g| g.records > 0)?;
        let first = g.first_live()?;
        while g.times.len() > 1 && g.times.front().is_some_and(|&(hi, _)| hi < first) {
            g.times.pop_front();
        }
        let &(_, at) = g.times.front()?;
        Some(Duration::from_millis(
            Timestamp::now().unix_ms().saturating_sub(at),
        ))
    }

    /// Makes every commit fail as a full disk would, until called with `false` (for tests of
    /// what the gateway does when its disk fails).
    pub fn inject_commit_failures(&self, on: bool) {
        self.fail_commits.store(on, Ordering::Relaxed);
    }

    /// Makes the fsync after each commit's flush fail, as a failing disk's would.
    #[cfg(test)]
    fn inject_sync_failures(&self, on: bool) {
        self.fail_syncs.store(on, Ordering::Relaxed);
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
        disk_usage(&self.dir)
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
        for g in gens.iter().filter(|g| !g.frozen) {
            if let Some(o) = &g.open {
                if let Err(e) = sync_gen(o, &g.dir) {
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
