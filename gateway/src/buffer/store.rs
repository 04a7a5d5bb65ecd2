//! The buffer's storage: one sled database per generation directory, and the directories
//! themselves. The only file in the workspace that names sled; the rest of the buffer sees a
//! [`Store`] (one open database), a [`Batch`] and the typed [`Entry`]s a scan yields.
//!
//! Invariants:
//! - A write is durable only after sled's flush *and* an fsync of sled's data file and of the
//!   blob files it wrote since ([`Store::sync`]): sled's flush uses `sync_file_range`, which
//!   does not survive a power cut (a lost length change leaves a database that panics on open or
//!   silently misses records).
//! - sled does not fsync its `conf` file; [`Store::open`] does, and the directory, every time a
//!   database is opened, so a power cut never leaves a database whose configuration is empty or
//!   torn.
//! - A database's keys: a chunk under its first sequence number (eight bytes, big-endian, so
//!   iteration is oldest first), the commit mark under [`MARK_KEY`] and the first commit's time
//!   under [`BORN_KEY`], both longer than eight bytes, so no range of chunk keys reaches them.
//! - A panic inside sled never reaches the gateway: the calls that can raise one run inside
//!   [`contain`] (or are caught where a handle is dropped: see [`close_quietly`]) and come back
//!   as [`BufferError::Panicked`]; [`contain_sled_panic_reports`] keeps their reports to one log
//!   line each.
//! - A generation directory is deleted by renaming it to `gen-<n>.drained` first (one atomic
//!   step, so a crash never leaves a half-deleted database to open), then removing it; the
//!   leftovers of an interrupted deletion are removed when the generations are listed.
//! - A snapshot is only a shortcut for sled's recovery, never trusted over the log: an
//!   unfinished one (`snap.*.generating`) is removed before an open, and a database that fails to
//!   open is opened once more with its snapshots set aside (kept in `set-aside-snapshots/`).
//! - An unusable database is moved aside to `quarantine-gen-<id>-<ms>` beside the buffer
//!   directory (numbered if taken), never deleted; a move that fails keeps it in place.
//!
//! # A power cut at each persistence point
//!
//! What a cut keeps: a file's data and length as of its last fsync (`sync_file_range`, which
//! sled's flush uses, keeps data but not a new length), and a directory's entries as of its last
//! fsync. "Committed" means `Buffer::commit` returned `Ok`; every point below is one of the
//! `open`, `write`, `rename`, `unlink` and `fsync` calls of a path, and says why a cut there
//! loses no committed record. The enumeration tests cut at each of them in turn.
//!
//! - **Commit** (`Store::write`): sled's batch and flush write the log (`db`) and perhaps blob
//!   files; then the fsyncs of `db`, of each new blob file and of `blobs/`; only then is the
//!   commit `Ok`, and only then are its chunks counted. A cut before the last fsync: the commit
//!   had not returned, its records are not committed (they were within `commit_interval`), and
//!   sled's recovery drops the torn tail of its log, whose every earlier message was made
//!   durable by an earlier commit's fsync. A cut after it: the commit is on disk whatever comes
//!   next. Then the watermark (`watermark.tmp` written, fsynced, renamed): a cut anywhere in it
//!   leaves the old watermark or the new one, never a torn one; an old one only weakens the
//!   check on the next open.
//! - **Delete after a PUBACK** (`remove_chunk`): written to the log, not fsynced. A cut loses
//!   the delete at most: the chunk is sent again with the same seqs and content. What sled
//!   writes for a delete is made durable by the next commit's fsync with everything else.
//! - **Rotation** (a fresh generation, `Store::open` of `gen-<n+1>`): `mkdir`, sled creates
//!   `db` and `conf` (and may write a snapshot), then `conf` and the generation's directory are
//!   fsynced, and the buffer directory after it (`Buffer::new_gen`). Nothing is committed into it
//!   before all of that, so a cut inside leaves an empty generation, or none: no record was in
//!   it. The generation it follows keeps everything committed into it.
//! - **Drain** (`delete_generation`): only a generation whose records are all acknowledged is
//!   deleted; it is renamed to `gen-<n>.drained`, the buffer directory fsynced, then removed. A
//!   cut before the rename's fsync leaves the generation, sent again (re-sends); after it, the
//!   leftover `.drained` directory is removed on the next open and never read.
//! - **Quarantine**: a rename out of the buffer directory, both directories fsynced. A cut
//!   leaves the generation where it was (tried again on the next open) or moved; it is never
//!   deleted, and what it may hold is counted as at stake. This rests on the rename being atomic
//!   across the two directories (as journaling file systems make it): never in neither.
//! - **Start-up** (`Buffer::open_with`): the data and buffer directories, when new, are made
//!   with the directories that hold them fsynced (`create_dir_durable`), so neither can vanish
//!   with what is made durable inside; `migrate` moves a pre-generations database into
//!   `gen-0/` one rename at a time and resumes after a cut; `list_generations` removes
//!   `.drained` leftovers (nothing unacknowledged); each generation's open removes an unfinished
//!   snapshot, lets sled write a snapshot of its own (`snap.<lsn>.generating` written, fsynced,
//!   renamed: a cut leaves a finished snapshot, or an unfinished one that the next open
//!   removes), and fsyncs `conf` and the directory; sled writes `conf` only when it has none, so
//!   a torn `conf` belongs to a generation that never took a commit. A scan drops damaged
//!   chunks (deletes not fsynced: a cut brings them back, to be dropped again). Then the fresh
//!   generation for commits, as in a rotation.
//! - **The state file** (`data_dir/state`, `pipeline/seq.rs`): written to a temporary file,
//!   fsynced, renamed, the directory fsynced, before any seq of the range it reserves is used:
//!   a cut leaves the old range or the new one, and a seq is never handed out twice. On a full
//!   disk it is overwritten in place, 128 bytes within one sector, and fsynced.
//!
//! What this rests on in sled: every commit's fsync makes all that sled wrote before it durable,
//! the log's messages carry checksums so recovery stops at a torn tail, and sled's own snapshots
//! are written to a temporary name, fsynced and renamed. A failed fsync freezes its generation
//! (see `generation`), since after one the kernel may have dropped pages and the rule above no
//! longer holds.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use protocols::model::Timestamp;
use tracing::{debug, error, warn};

use super::{io_err, BufferError};

/// The storage engine's name, for messages.
pub(super) const ENGINE: &str = "sled";

/// Key of a generation's commit mark: nine bytes, so it sorts after every chunk key (eight
/// bytes, big-endian) and no range of chunk keys ever reaches it.
pub(super) const MARK_KEY: [u8; 9] = [0xff; 9];

/// Key of a generation's first commit time (unix milliseconds), after the commit mark.
pub(super) const BORN_KEY: [u8; 10] = [0xff; 10];

/// sled's segment size. Measured with a 60 s outage at 10k samples/s (`bench --outage-seconds
/// 60`): 8 MiB segments wrote 542 bytes per sample, 2 MiB 345, 1 MiB 264, 512 KiB 258. sled
/// also pads the rest of its last segment when it opens a database, so a smaller segment writes
/// less at every reopen of a sealed generation. A page larger than a quarter segment goes to a
/// file of its own under `blobs/`, which [`Store::sync`] fsyncs.
const SEGMENT_SIZE: usize = 1 << 20;

/// The segment size of generations written before [`SEGMENT_SIZE`] was lowered: sled refuses
/// to open a database with another segment size than the one it was made with.
const LEGACY_SEGMENT_SIZE: usize = 8 << 20;

/// How often, and how long apart, opening a database sled finds locked is tried.
const LOCK_TRIES: u32 = 50;
const LOCK_WAIT: Duration = Duration::from_millis(20);

/// An error sled reported that is not an I/O error (a damaged file, an unsupported format):
/// the database is unusable, not the disk failing.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(sled::Error);

fn db_err(path: &Path, e: sled::Error) -> BufferError {
    match e {
        sled::Error::Io(source) => BufferError::DbIo {
            path: path.to_path_buf(),
            source,
        },
        other => BufferError::Store {
            path: path.to_path_buf(),
            source: StoreError(other),
        },
    }
}

/// Runs `f`, turning a panic inside it (sled can panic on a damaged file or a failing disk)
/// into [`BufferError::Panicked`] for the database at `path`.
pub(super) fn contain<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, BufferError>,
) -> Result<T, BufferError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(BufferError::Panicked(path.into())))
}

/// Drops a sled handle. sled's last handle fsyncs the file and unwraps the result: on a
/// failing disk that panics. The panic is contained here; what the fsync would have made
/// durable was committed (or not) through [`Store::sync`], which reports its errors.
fn close_quietly(db: sled::Db) {
    if catch_unwind(AssertUnwindSafe(move || drop(db))).is_err() {
        warn!("closing a buffer database failed inside sled (the disk failed)");
    }
}

/// Logs panics raised inside sled as one error line instead of a panic report. The buffer
/// contains every one of them (a failed open, commit, read or close; see `close_quietly`),
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

/// Whether `name` is one of the files a database keeps in its directory.
pub(super) fn is_database_file(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs") || is_snapshot(name)
}

/// The database files `dir` holds itself (a buffer from before generations, or what a cut
/// left of moving one into its first generation).
pub(super) fn database_files(dir: &Path) -> Result<Vec<OsString>, BufferError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let name = entry.map_err(|e| io_err(dir, e))?.file_name();
        if name.to_str().is_some_and(is_database_file) {
            found.push(name);
        }
    }
    Ok(found)
}

/// One entry of a database, as a scan reads it.
#[derive(Debug)]
pub(super) enum Entry<'a> {
    /// A chunk: its key (the first sequence number in it) and its stored value.
    Chunk(u64, &'a [u8]),
    /// The commit mark (`None`: the value is damaged).
    Mark(Option<u64>),
    /// The first commit's time, unix ms (`None`: the value is damaged).
    Born(Option<u64>),
    /// A key of no known form.
    Other,
}

/// Writes that go into a database as one: all of them, or none.
#[derive(Debug, Default)]
pub(super) struct Batch(sled::Batch);

impl Batch {
    /// Puts a chunk under its key.
    pub(super) fn put_chunk(&mut self, key: u64, value: &[u8]) {
        self.0.insert(&key.to_be_bytes(), value);
    }

    /// Puts the commit mark.
    pub(super) fn put_mark(&mut self, mark: u64) {
        self.0.insert(&MARK_KEY, &mark.to_be_bytes());
    }

    /// Puts the first commit's time.
    pub(super) fn put_born(&mut self, unix_ms: u64) {
        self.0.insert(&BORN_KEY, &unix_ms.to_be_bytes());
    }
}

fn fsync_file(path: &Path) -> std::io::Result<()> {
    File::open(path).and_then(|f| f.sync_all())
}

/// Creates the directory `path` and its missing parents, and fsyncs the directory that holds
/// each one it created: a directory whose own entry a cut could take back would take every
/// file made durable in it along (the data directory, the buffer directory).
pub fn create_dir_durable(path: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = path;
    while !at.exists() {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    for created in missing.iter().rev() {
        let holder = match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        fsync_file(holder)?;
    }
    Ok(())
}

/// Fsyncs a directory, so the names created, renamed or removed in it are durable.
pub(super) fn fsync_dir(dir: &Path) -> Result<(), BufferError> {
    fsync_file(dir).map_err(|e| io_err(dir, e))
}

/// One open database: a generation's directory.
#[derive(Debug)]
pub(super) struct Store {
    dir: PathBuf,
    /// Always `Some` until dropped (see the `Drop` impl).
    db: Option<sled::Db>,
    data_file: File,
    /// Blob files already fsynced (sled writes each once and never changes it).
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            close_quietly(db);
        }
    }
}

impl Store {
    /// Opens (creating it if needed) the database in `dir`.
    pub(super) fn open(dir: &Path) -> Result<Store, BufferError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        remove_unfinished_snapshots(dir)?;
        let db = match open_sled(dir) {
            Ok(db) => db,
            Err(e) if e.is_io() => return Err(e),
            // A snapshot is only a shortcut: sled recovers from its log without one. A
            // database that fails to open is tried once more without its snapshots before
            // anything is given up.
            Err(e) => match set_snapshots_aside(dir)? {
                0 => return Err(e),
                moved => match open_sled(dir) {
                    Ok(db) => {
                        warn!(path = %dir.display(), snapshots = moved, error = %e, "a buffer generation did not open with its snapshot; it opened from its log, the snapshot is kept in {SET_ASIDE}/");
                        db
                    }
                    Err(again) => {
                        warn!(path = %dir.display(), error = %e, "a buffer generation opens neither with its snapshot nor from its log");
                        return Err(again);
                    }
                },
            },
        };
        let files = || -> Result<File, BufferError> {
            let data_path = dir.join("db");
            let data_file = File::open(&data_path).map_err(|e| io_err(&data_path, e))?;
            // sled writes its `conf` without an fsync; an empty or torn one after a power cut
            // would make the generation unopenable (and quarantined) with committed records in it.
            let conf = dir.join("conf");
            fsync_file(&conf).map_err(|e| io_err(&conf, e))?;
            fsync_dir(dir)?;
            Ok(data_file)
        };
        match files() {
            Ok(data_file) => Ok(Store {
                dir: dir.to_path_buf(),
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

    fn db(&self) -> Result<&sled::Db, BufferError> {
        self.db
            .as_ref()
            .ok_or_else(|| io_err(&self.dir, std::io::Error::other("closed")))
    }

    /// Reads every entry, oldest chunk first, and removes those `keep` says no to once the
    /// scan is done; sled may panic on a damaged file, so this is contained.
    pub(super) fn scan(
        &self,
        mut keep: impl FnMut(Entry<'_>) -> Result<bool, BufferError>,
    ) -> Result<(), BufferError> {
        contain(&self.dir, || {
            let db = self.db()?;
            let mut dropped = Vec::new();
            for item in db.iter() {
                let (k, v) = item.map_err(|e| db_err(&self.dir, e))?;
                let entry = if k.as_ref() == MARK_KEY {
                    Entry::Mark(be_u64(&v))
                } else if k.as_ref() == BORN_KEY {
                    Entry::Born(be_u64(&v))
                } else if let Some(key) = be_u64(&k) {
                    Entry::Chunk(key, &v)
                } else {
                    Entry::Other
                };
                if !keep(entry)? {
                    dropped.push(k);
                }
            }
            for k in &dropped {
                db.remove(k).map_err(|e| db_err(&self.dir, e))?;
            }
            Ok(())
        })
    }

    /// The stored value of the chunk under `key`, if there is one.
    pub(super) fn get_chunk(&self, key: u64) -> Result<Option<impl AsRef<[u8]>>, BufferError> {
        self.db()?
            .get(key.to_be_bytes())
            .map_err(|e| db_err(&self.dir, e))
    }

    /// Removes the chunk under `key` (not synced).
    pub(super) fn remove_chunk(&self, key: u64) -> Result<(), BufferError> {
        self.db()?
            .remove(key.to_be_bytes())
            .map(drop)
            .map_err(|e| db_err(&self.dir, e))
    }

    /// Writes a batch and makes it durable ([`Store::sync`]).
    pub(super) fn write(&self, batch: Batch) -> Result<(), BufferError> {
        self.db()?
            .apply_batch(batch.0)
            .map_err(|e| db_err(&self.dir, e))?;
        self.sync()
    }

    /// Makes the database's files durable: sled's flush, then fsync of its data file and blobs.
    pub(super) fn sync(&self) -> Result<(), BufferError> {
        if let Some(db) = &self.db {
            db.flush().map_err(|e| db_err(&self.dir, e))?;
        }
        self.data_file
            .sync_all()
            .map_err(|e| io_err(&self.dir.join("db"), e))?;
        // sled does not fsync the blob files it writes for oversized pages either; each is
        // written once, so only the new ones are synced.
        let blobs = self.dir.join("blobs");
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut synced = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
            let mut listed = HashSet::new();
            let mut any = false;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !synced.contains(&name) {
                    let path = entry.path();
                    match fsync_file(&path) {
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

    /// Puts a raw value under a chunk key, outside any commit: a test's damaged or foreign
    /// value.
    #[cfg(test)]
    pub(super) fn put_raw(&self, key: u64, value: &[u8]) {
        self.db().unwrap().insert(key.to_be_bytes(), value).unwrap();
    }
}

fn be_u64(b: &[u8]) -> Option<u64> {
    let b: [u8; 8] = b.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// Writes a database in `dir` as an earlier version did, without any of the buffer's
/// bookkeeping: values under chunk keys, with today's segment size or the legacy one.
#[cfg(test)]
pub(super) fn write_raw(dir: &Path, legacy_segments: bool, values: &[(u64, Vec<u8>)]) {
    let db = if legacy_segments {
        sled::Config::new()
            .path(dir)
            .segment_size(LEGACY_SEGMENT_SIZE)
            .open()
            .unwrap()
    } else {
        open_sled(dir).unwrap()
    };
    for (key, value) in values {
        db.insert(key.to_be_bytes(), value.as_slice()).unwrap();
    }
    db.flush().unwrap();
}

/// The directory of generation `id` under the buffer directory `dir`.
pub(super) fn gen_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("gen-{id}"))
}

/// The generation ids under `dir`, ascending; removes leftovers of interrupted deletions.
pub(super) fn list_generations(dir: &Path) -> Result<Vec<u64>, BufferError> {
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

/// Moves the unusable generation `id` aside, out of the buffer directory `dir`, under a name of
/// its own (`quarantine-gen-<id>-<unix ms>`, with `-2`, `-3`, ... should that be taken); returns
/// where it went.
pub(super) fn quarantine(dir: &Path, id: u64, e: &BufferError) -> Result<PathBuf, BufferError> {
    let path = gen_dir(dir, id);
    let parent = dir.parent().unwrap_or(Path::new("."));
    let aside = fresh_name(
        parent,
        &format!("quarantine-gen-{id}-{}", Timestamp::now().unix_ms()),
    );
    error!(path = %path.display(), quarantine = %aside.display(), error = %e, "buffer generation cannot be opened; moving it aside, never deleting it");
    std::fs::rename(&path, &aside).map_err(|e| io_err(&path, e))?;
    // Moved: a cut before these syncs leaves it in one place or the other, never gone.
    for d in [dir, parent] {
        if let Err(e) = fsync_dir(d) {
            warn!(error = %e, "cannot sync a directory after moving a buffer generation aside");
        }
    }
    Ok(aside)
}

/// `dir/base`, or `dir/base-2`, `dir/base-3`, ... : the first of them nothing has taken.
pub(super) fn fresh_name(dir: &Path, base: &str) -> PathBuf {
    let mut path = dir.join(base);
    let mut n = 1;
    while path.exists() {
        n += 1;
        path = dir.join(format!("{base}-{n}"));
    }
    path
}

/// Where a generation's snapshots go when it opens only without them.
const SET_ASIDE: &str = "set-aside-snapshots";

/// Whether `name` is one of sled's snapshot files (`snap.<lsn>`, or `snap.<lsn>.generating`
/// while it writes one; sled itself skips `.in___motion` ones).
fn is_snapshot(name: &str) -> bool {
    name.starts_with("snap.") && !name.ends_with(".in___motion")
}

/// The names of the snapshot files in `dir`.
fn snapshots(dir: &Path) -> Result<Vec<OsString>, BufferError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let name = entry.map_err(|e| io_err(dir, e))?.file_name();
        if name.to_str().is_some_and(is_snapshot) {
            found.push(name);
        }
    }
    Ok(found)
}

/// Removes the snapshots sled had not finished. It writes `snap.<lsn>.generating`, fsyncs it and
/// only then renames it to `snap.<lsn>`; a cut before the rename can leave the entry with its
/// data missing or torn. But sled 0.34 takes the last `snap.*` name as the snapshot, the
/// unfinished one included, and refuses to open on a torn one: so a cut while sled wrote a
/// snapshot (it writes one at every open) made an intact generation unopenable.
fn remove_unfinished_snapshots(dir: &Path) -> Result<(), BufferError> {
    for name in snapshots(dir)? {
        if !name.to_string_lossy().ends_with(".generating") {
            continue;
        }
        let path = dir.join(&name);
        warn!(path = %path.display(), "removing a snapshot the storage engine had not finished (a cut or a crash while it wrote it); it recovers from its log");
        std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
    }
    Ok(())
}

/// Moves the snapshot files of `dir` into `dir/set-aside-snapshots/`, kept, never deleted;
/// returns how many were moved.
fn set_snapshots_aside(dir: &Path) -> Result<usize, BufferError> {
    let names = snapshots(dir)?;
    if names.is_empty() {
        return Ok(0);
    }
    let aside = dir.join(SET_ASIDE);
    std::fs::create_dir_all(&aside).map_err(|e| io_err(&aside, e))?;
    for name in &names {
        let to = fresh_name(&aside, &name.to_string_lossy());
        let from = dir.join(name);
        std::fs::rename(&from, &to).map_err(|e| io_err(&from, e))?;
    }
    fsync_dir(&aside)?;
    fsync_dir(dir)?;
    Ok(names.len())
}

/// Deletes the directory `path` of generation `id`, whose database is closed: renamed first,
/// so a crash leaves nothing to open.
pub(super) fn delete_generation(dir: &Path, id: u64, path: &Path) -> Result<(), BufferError> {
    let doomed = dir.join(format!("gen-{id}.drained"));
    std::fs::rename(path, &doomed).map_err(|e| io_err(path, e))?;
    fsync_dir(dir)?;
    std::fs::remove_dir_all(&doomed).map_err(|e| io_err(&doomed, e))?;
    debug!(generation = id, "drained buffer generation deleted");
    Ok(())
}

/// Bytes of the files under `path` (what the buffer takes on disk).
pub(super) fn disk_usage(path: &Path) -> u64 {
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
