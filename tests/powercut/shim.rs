//! powercut: an `LD_PRELOAD` library that keeps, next to a directory tree, the image a power cut
//! would leave of it. Built by `tests/build.rs` with plain `rustc` (std only, no crates).
//!
//! Model: a file's durable content and length are what they were at its last `fsync` or
//! `fdatasync` (through any fd on the same file); a file never synced since its creation is
//! durable as an empty file. `sync_file_range` and everything else give no durability, so a
//! length a write grew and only `sync_file_range` "synced" goes back at the cut; with
//! `POWERCUT_SFR=data`, `sync_file_range` makes the data of its range durable where it lies
//! within the file's durable length (the pages reached the disk, the length did not). Directory
//! entries (create, rename, unlink, mkdir, rmdir), by default, are durable at once. In strict
//! mode (`POWERCUT_STRICT_DIRS=1`, the model of ALICE and CrashMonkey) they are durable only once
//! their directory is fsynced: a file created and never named by a directory fsync vanishes at
//! the cut (its synced content with it), a rename or an unlink not followed by an fsync of the
//! directory is undone. A directory fsync makes the directory's entries, as they are at that
//! moment, its durable entries. A rename is atomic (as in ALICE's model, and in journaling file
//! systems): a rename to another directory is durable in both once either is synced, if the
//! other has a durable entry itself.
//!
//! Persistence points: every call that may change what a cut leaves is counted, by kind:
//! `write` (write, pwrite, writev, pwritev and their variants, to a tracked file),
//! `sync_file_range`, `fsync` (fsync/fdatasync of a file), `dirsync` (of a directory at or under
//! the root), `rename`, `unlink` (unlink, rmdir), `create` (an open with `O_CREAT` that creates
//! the file, mkdir) and `truncate` (ftruncate, truncate, fallocate). With
//! `POWERCUT_CUT_AT=<kind>:<n>` the process kills itself with SIGKILL at the n-th call of that
//! kind (from 1), before the call is made: the call never happened, and everything before it is
//! as durable as the model says. Calls the shim makes for itself are not counted.
//!
//! Configuration (environment):
//! - `POWERCUT_ROOT`: absolute directory whose regular files are tracked.
//! - `POWERCUT_SHADOW`: absolute directory holding the durable image, same relative layout.
//!   It must start as an exact copy of the root (everything on disk is durable before a start).
//! - `POWERCUT_STATS` (optional): a file rewritten after every tracked sync with counters.
//! - `POWERCUT_DEBUG=1` (optional): one stderr line per tracked open, sync and directory change.
//! - `POWERCUT_CUT_AT=<kind>:<n>` (optional): the cut, above. The stats file (if any) is
//!   written just before it.
//! - `POWERCUT_POINTS` (optional): a file rewritten at every persistence point with the counts
//!   per kind (`point.<kind>=<n>` lines; the stats file carries them too).
//! - `POWERCUT_SFR=data` (optional): `sync_file_range` makes data durable, above.
//! - `POWERCUT_STRICT_DIRS=1` (optional): the strict directory model above. Images of files and
//!   directories that no durable entry names yet are kept in `<POWERCUT_SHADOW>.pending/`.
//! - `POWERCUT_SPACE_FILE` (optional, absolute): the disk-full mode, below.
//!
//! Disk-full mode: the file named by `POWERCUT_SPACE_FILE` (the control file; keep it outside
//! the root) holds whitespace-separated words: a number of bytes, the space the tracked files may
//! take, and/or `eio`. Absent or empty: no limit, no error. It is read again at most every 50 ms
//! (by time), so a test can change it while the process runs; replace it atomically (write a
//! temporary file, rename it), or a read may see it half-written.
//! - A limit caps the sum of the lengths of the regular files under the root (files unlinked but
//!   still open are not counted, directories take nothing). Like a full file system, a write
//!   (`write`, `pwrite`, `writev`, `pwritev` and their variants) that would take the sum past the
//!   limit is cut short: it writes the bytes that still fit and returns that count; with no byte
//!   left it fails with `ENOSPC` (so `write_all` fills up to the limit, then fails). Overwriting
//!   bytes inside a file's length takes no space and always passes. Growing a file with
//!   `ftruncate`, `truncate` or `fallocate` past the limit fails whole with `ENOSPC` (an
//!   `fallocate` that keeps the size, punches a hole or collapses a range grows nothing).
//!   Shrinking, deleting and truncating files gives the space back at once. Opening and creating
//!   files, directory operations and syncs are not limited. The sum is measured by walking the
//!   root when the control file is read again and after a tracked open that creates or
//!   truncates, a close, a rename or an unlink, and kept up to date by the calls above in between;
//!   those calls run one at a time while a limit is in force, so two cannot both take the last
//!   free bytes.
//! - `eio` fails every `fsync` and `fdatasync` of a tracked file or directory under the root with
//!   `EIO`, without calling the real function: the sync makes nothing durable, and the data it
//!   would have made durable stays pending for a later sync that succeeds (unlike some kernels,
//!   which may drop those pages after an error).
//! - Calls refused or cut short are counted in the stats file (`enospc`, `short_writes`, `eio`),
//!   which is also rewritten after each of them. The mode needs `POWERCUT_ROOT` and
//!   `POWERCUT_SHADOW` like the power-cut tracking it runs alongside, which it leaves unchanged.
//!
//! How: writes to tracked files record dirty byte ranges per file (device + inode), whichever fd
//! they go through; a sync copies the file's dirty ranges from the real file into the shadow file
//! and gives the shadow the real file's length. Directory operations are mirrored in the shadow
//! (strict mode: a directory fsync makes the shadow directory's entries match the real one's,
//! taking each entry's image from where it is, by inode). After the process is killed, copying
//! the shadow over the root is the power cut.
//!
//! Rules kept here: the shim's own I/O goes through std, which calls back into these functions;
//! a thread-local flag sends such nested calls straight to the real functions. Nothing panics
//! across the FFI boundary: bookkeeping runs under `catch_unwind`, and on any internal error the
//! call is passed through and one line goes to stderr. Files outside the root cost a path-prefix
//! check; fds not tracked cost one atomic load.
//!
//! `open`, `openat` and `fcntl` are variadic in C. They are defined here with the optional
//! argument as a fixed one: on x86_64 and aarch64 Linux a variadic argument travels in the same
//! register as a fixed one, and the value is only used where the caller passed it (`mode` with
//! `O_CREAT`/`O_TMPFILE`, the `fcntl` argument for commands that take one).

#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CStr, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::raw::{c_char, c_int, c_long, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::FromRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// libc, declared by hand

type SizeT = usize;
type SsizeT = isize;
type OffT = i64;
type ModeT = c_uint;

#[repr(C)]
pub struct IoVec {
    base: *mut c_void,
    len: SizeT,
}

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn __errno_location() -> *mut c_int;
    fn lseek64(fd: c_int, offset: OffT, whence: c_int) -> OffT;
}

fn rtld_next() -> *mut c_void {
    -1isize as *mut c_void
}

const O_ACCMODE: c_int = 0o3;
const O_WRONLY: c_int = 0o1;
const O_CREAT: c_int = 0o100;
const O_TRUNC: c_int = 0o1000;
const O_APPEND: c_int = 0o2000;
const AT_FDCWD: c_int = -100;
const AT_REMOVEDIR: c_int = 0x200;
const RENAME_EXCHANGE: c_uint = 2;
const F_DUPFD: c_int = 0;
const F_SETFL: c_int = 4;
const F_DUPFD_CLOEXEC: c_int = 1030;
const SEEK_CUR: c_int = 1;
const FALLOC_FL_KEEP_SIZE: c_int = 0x01;
const FALLOC_FL_PUNCH_HOLE: c_int = 0x02;
const FALLOC_FL_COLLAPSE_RANGE: c_int = 0x08;
const FALLOC_FL_INSERT_RANGE: c_int = 0x20;
const ENOSYS: c_int = 38;

fn errno() -> c_int {
    // SAFETY: glibc's per-thread errno location is always valid.
    unsafe { *__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as above.
    unsafe { *__errno_location() = e }
}

/// Looks a real libc function up once (`dlsym(RTLD_NEXT)`), as a value of the pointer type `$ty`.
macro_rules! real {
    ($name:expr, $ty:ty) => {{
        static P: AtomicUsize = AtomicUsize::new(0);
        let mut p = P.load(Ordering::Relaxed);
        if p == 0 {
            p = dlsym(rtld_next(), concat!($name, "\0").as_ptr() as *const c_char) as usize;
            P.store(p, Ordering::Relaxed);
        }
        if p == 0 {
            None
        } else {
            Some(std::mem::transmute::<usize, $ty>(p))
        }
    }};
}

/// Exports one wrapper under each of the names: glibc gives the large-file variants (`open64`,
/// `pwrite64`, ...) symbols of their own with the same signature, and each must reach its own
/// real function, which `$real` names in the body.
macro_rules! wrappers {
    (
        [$($name:ident),+]
        fn $args:tt -> $ret:ty;
        real $real:ident: $fty:ty => $body:expr
    ) => {
        $( wrapper!($name $args -> $ret; $real: $fty => $body); )+
    };
}

/// One exported wrapper (see [`wrappers`]).
macro_rules! wrapper {
    (
        $name:ident ($($arg:ident: $t:ty),* $(,)?) -> $ret:ty;
        $real:ident: $fty:ty => $body:expr
    ) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $t),*) -> $ret {
            let Some($real) = real!(stringify!($name), $fty) else {
                return missing();
            };
            $body
        }
    };
}

fn missing<T: From<i8>>() -> T {
    set_errno(ENOSYS);
    T::from(-1)
}

// ---------------------------------------------------------------------------------------------
// Reentrancy guard and configuration

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Held while the shim does bookkeeping on this thread; nested calls pass straight through.
struct Busy;

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

fn enter() -> Option<Busy> {
    match BUSY.try_with(|b| {
        if b.get() {
            false
        } else {
            b.set(true);
            true
        }
    }) {
        Ok(true) => Some(Busy),
        _ => None,
    }
}

struct Config {
    /// As given (made lexically normal): tracked paths are kept under this spelling.
    root: PathBuf,
    /// The root with symbolic links resolved, when that is another spelling of it (relative
    /// paths resolve through `getcwd`, which gives this one).
    real_root: Option<PathBuf>,
    shadow: PathBuf,
    stats: Option<PathBuf>,
    debug: bool,
    /// The disk-full mode's control file.
    space: Option<PathBuf>,
    /// `POWERCUT_CUT_AT`: the persistence point before which the process is killed.
    cut: Option<(Kind, u64)>,
    /// `POWERCUT_POINTS`: the file rewritten at every persistence point with the counts.
    points: Option<PathBuf>,
    /// `POWERCUT_STRICT_DIRS=1`: directory entries are durable only once their directory is
    /// fsynced.
    strict: bool,
    /// Strict mode: where images of files and directories with no durable entry are kept.
    pending: PathBuf,
    /// `POWERCUT_SFR=data`: `sync_file_range` makes data durable (not a length).
    sfr_data: bool,
}

static CONFIG: OnceLock<Option<Config>> = OnceLock::new();

/// The configuration; call only while holding [`Busy`].
fn config() -> Option<&'static Config> {
    CONFIG
        .get_or_init(|| {
            let root = PathBuf::from(std::env::var_os("POWERCUT_ROOT")?);
            let shadow = PathBuf::from(std::env::var_os("POWERCUT_SHADOW")?);
            if !root.is_absolute() || !shadow.is_absolute() {
                log("POWERCUT_ROOT and POWERCUT_SHADOW must be absolute; not tracking anything");
                return None;
            }
            let root = normalize(&root);
            let real_root = fs::canonicalize(&root).ok().filter(|r| *r != root);
            let space = std::env::var_os("POWERCUT_SPACE_FILE").map(PathBuf::from);
            if space.as_ref().is_some_and(|p| !p.is_absolute()) {
                log("POWERCUT_SPACE_FILE must be absolute; no disk-full mode");
            }
            let cut = std::env::var("POWERCUT_CUT_AT").ok().and_then(|v| {
                let parsed = v.split_once(':').and_then(|(k, n)| {
                    Some((Kind::parse(k)?, n.trim().parse::<u64>().ok().filter(|&n| n > 0)?))
                });
                if parsed.is_none() {
                    log(&format!("POWERCUT_CUT_AT={v}: not <kind>:<n> (n from 1); no cut"));
                }
                parsed
            });
            let shadow = normalize(&shadow);
            let mut pending = shadow.clone().into_os_string();
            pending.push(".pending");
            let strict = std::env::var_os("POWERCUT_STRICT_DIRS").is_some_and(|v| v == "1");
            let cfg = Config {
                root,
                real_root,
                shadow,
                stats: std::env::var_os("POWERCUT_STATS").map(PathBuf::from),
                debug: std::env::var_os("POWERCUT_DEBUG").is_some_and(|v| v == "1"),
                space: space.filter(|p| p.is_absolute()),
                cut,
                points: std::env::var_os("POWERCUT_POINTS").map(PathBuf::from),
                strict,
                pending: PathBuf::from(pending),
                sfr_data: std::env::var_os("POWERCUT_SFR").is_some_and(|v| v == "data"),
            };
            if strict {
                // Everything on disk at the start is durable: the shadow is a copy of the root.
                let mut d = durable();
                walk_images(&cfg.root, &cfg.shadow, &mut d.by_key);
            }
            Some(cfg)
        })
        .as_ref()
}

/// One line to stderr; call only while holding [`Busy`] (the write passes through).
fn log(msg: &str) {
    let _ = writeln!(std::io::stderr(), "powercut: {msg}");
}

fn debug(cfg: &Config, msg: impl FnOnce() -> String) {
    if cfg.debug {
        log(&msg());
    }
}

// ---------------------------------------------------------------------------------------------
// State

/// Disjoint, non-adjacent byte ranges `[start, end)`, keyed by start.
#[derive(Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, &re)| re >= start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            self.0.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.0.insert(s, e);
    }
}

type Key = (u64, u64);

struct Tracked {
    /// Where the file is now (absolute, under the root); `None` once unlinked.
    path: Option<PathBuf>,
    dirty: Ranges,
    /// Positioned writes under way (`expect` to `settle`): a sync copies them too and does not
    /// forget them, as one may land on the disk before or after the sync sees it.
    inflight: Vec<(u64, u64)>,
    fds: usize,
}

#[derive(Clone)]
enum Fd {
    File {
        key: Key,
        append: bool,
        readable: bool,
    },
    /// A directory under the root or above it: resolves `*at` calls.
    Dir { path: PathBuf, key: Key },
}

#[derive(Default)]
struct Stats {
    opens: u64,
    writes: u64,
    write_bytes: u64,
    syncs: u64,
    synced_bytes: u64,
    sync_file_ranges: u64,
    dir_ops: u64,
    errors: u64,
}

struct State {
    fds: BTreeMap<c_int, Fd>,
    files: BTreeMap<Key, Tracked>,
    stats: Stats,
}

static STATE: Mutex<State> = Mutex::new(State {
    fds: BTreeMap::new(),
    files: BTreeMap::new(),
    stats: Stats {
        opens: 0,
        writes: 0,
        write_bytes: 0,
        syncs: 0,
        synced_bytes: 0,
        sync_file_ranges: 0,
        dir_ops: 0,
        errors: 0,
    },
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// One flag per small fd: set while the fd may be in [`State::fds`], so untracked fds cost one
/// atomic load. Larger fds always look the table up.
const FLAGS_LEN: usize = 1 << 16;
static FLAGS: [AtomicU8; FLAGS_LEN] = [const { AtomicU8::new(0) }; FLAGS_LEN];

fn maybe_tracked(fd: c_int) -> bool {
    fd >= 0 && (fd as usize >= FLAGS_LEN || FLAGS[fd as usize].load(Ordering::Acquire) != 0)
}

fn set_flag(fd: c_int, on: bool) {
    if fd >= 0 && (fd as usize) < FLAGS_LEN {
        FLAGS[fd as usize].store(on as u8, Ordering::Release);
    }
}

impl State {
    /// Maps `fd` to `entry`; the caller has removed what `fd` mapped to before.
    fn insert_fd(&mut self, fd: c_int, entry: Fd) {
        if let Fd::File { key, .. } = &entry {
            if let Some(t) = self.files.get_mut(key) {
                t.fds += 1;
            }
        }
        self.fds.insert(fd, entry);
        set_flag(fd, true);
    }

    fn remove_fd(&mut self, fd: c_int) {
        if let Some(Fd::File { key, .. }) = self.fds.remove(&fd) {
            if let Some(t) = self.files.get_mut(&key) {
                t.fds = t.fds.saturating_sub(1);
                if t.fds == 0
                    && t.inflight.is_empty()
                    && (t.dirty.0.is_empty() || t.path.is_none())
                {
                    self.files.remove(&key);
                }
            }
        }
        set_flag(fd, false);
    }

    fn file_key(&self, fd: c_int) -> Option<(Key, bool, bool)> {
        match self.fds.get(&fd)? {
            Fd::File {
                key,
                append,
                readable,
            } => Some((*key, *append, *readable)),
            Fd::Dir { .. } => None,
        }
    }

    /// `start..end` of the file behind `fd` is about to be written. Until [`State::settle`],
    /// every sync copies the range (whatever the disk holds there then), so a sync on another
    /// thread that sees the write land before it is counted (`mark`) still makes it durable,
    /// instead of finding a length with no write behind it. A write at an offset known only
    /// afterwards (O_APPEND) is not covered.
    fn expect(&mut self, fd: c_int, start: u64, end: u64) {
        if let Some((key, _, _)) = self.file_key(fd) {
            if let Some(t) = self.files.get_mut(&key) {
                t.inflight.push((start, end));
            }
        }
    }

    /// The write `expect` announced is over (landed, short, or failed).
    fn settle(&mut self, fd: c_int, start: u64, end: u64) {
        if let Some((key, _, _)) = self.file_key(fd) {
            if let Some(t) = self.files.get_mut(&key) {
                if let Some(i) = t.inflight.iter().position(|&r| r == (start, end)) {
                    t.inflight.swap_remove(i);
                }
            }
        }
    }

    fn mark(&mut self, key: Key, start: u64, end: u64, counted: u64) {
        if let Some(t) = self.files.get_mut(&key) {
            t.dirty.add(start, end);
        }
        self.stats.writes += 1;
        self.stats.write_bytes += counted;
    }

    /// Every tracked path at or under `from` now is at or under `to`.
    fn rebase(&mut self, from: &Path, to: &Path) {
        let moved = |p: &Path| -> Option<PathBuf> {
            let rest = p.strip_prefix(from).ok()?;
            Some(if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            })
        };
        for t in self.files.values_mut() {
            if let Some(n) = t.path.as_deref().and_then(moved) {
                t.path = Some(n);
            }
        }
        for f in self.fds.values_mut() {
            if let Fd::Dir { path, .. } = f {
                if let Some(n) = moved(path) {
                    *path = n;
                }
            }
        }
    }

    /// Swaps the tracked paths at or under `a` with those at or under `b`.
    fn exchange(&mut self, a: &Path, b: &Path) {
        let swapped = |p: &Path| -> Option<PathBuf> {
            for (from, to) in [(a, b), (b, a)] {
                if let Ok(rest) = p.strip_prefix(from) {
                    return Some(if rest.as_os_str().is_empty() {
                        to.to_path_buf()
                    } else {
                        to.join(rest)
                    });
                }
            }
            None
        };
        for t in self.files.values_mut() {
            if let Some(n) = t.path.as_deref().and_then(swapped) {
                t.path = Some(n);
            }
        }
        for f in self.fds.values_mut() {
            if let Fd::Dir { path, .. } = f {
                if let Some(n) = swapped(path) {
                    *path = n;
                }
            }
        }
    }

    /// Tracked files at `path` (or under it, with `tree`) are gone from the namespace.
    fn forget_path(&mut self, path: &Path, tree: bool) {
        let gone = |p: &Path| if tree { p.starts_with(path) } else { p == path };
        self.files.retain(|_, t| {
            if t.path.as_deref().is_some_and(gone) {
                t.path = None;
            }
            t.path.is_some() || t.fds > 0
        });
    }

    fn write_stats(&self, cfg: &Config) {
        let Some(path) = &cfg.stats else { return };
        let s = &self.stats;
        let mut text = format!(
            "opens={}\nwrites={}\nwrite_bytes={}\nsyncs={}\nsynced_bytes={}\nsync_file_ranges={}\ndir_ops={}\nerrors={}\n",
            s.opens, s.writes, s.write_bytes, s.syncs, s.synced_bytes, s.sync_file_ranges, s.dir_ops, s.errors
        );
        text.push_str(&points_text());
        if cfg.space.is_some() {
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            text.push_str(&format!(
                "enospc={}\nshort_writes={}\neio={}\n",
                n(&REFUSED.enospc),
                n(&REFUSED.short_writes),
                n(&REFUSED.eio)
            ));
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        if let Err(e) = fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, path)) {
            log(&format!("cannot write stats to {}: {e}", path.display()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Persistence points and the cut

/// The kinds of persistence calls under the root, each counted on its own.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `write`, `pwrite`, `writev`, `pwritev` and their variants, to a tracked file.
    Write,
    /// `sync_file_range` of a tracked file.
    SyncFileRange,
    /// `fsync`/`fdatasync` of a tracked file.
    Fsync,
    /// `fsync`/`fdatasync` of a directory at or under the root.
    Dirsync,
    /// A rename from or to a path under the root.
    Rename,
    /// `unlink`, `unlinkat`, `rmdir` of a path under the root.
    Unlink,
    /// A new directory entry: an open with `O_CREAT` that creates the file, `mkdir`.
    Create,
    /// `ftruncate`, `truncate`, `fallocate` of a tracked file.
    Truncate,
}

const KINDS: [(Kind, &str); 8] = [
    (Kind::Write, "write"),
    (Kind::SyncFileRange, "sync_file_range"),
    (Kind::Fsync, "fsync"),
    (Kind::Dirsync, "dirsync"),
    (Kind::Rename, "rename"),
    (Kind::Unlink, "unlink"),
    (Kind::Create, "create"),
    (Kind::Truncate, "truncate"),
];

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        KINDS.iter().find(|(_, n)| *n == name.trim()).map(|(k, _)| *k)
    }

    fn index(self) -> usize {
        KINDS.iter().position(|(k, _)| *k == self).unwrap_or(0)
    }
}

/// Calls seen so far, per kind (in the order of [`KINDS`]).
static POINTS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

/// The counts as `point.<kind>=<n>` lines.
fn points_text() -> String {
    let mut text = String::new();
    for (i, (_, name)) in KINDS.iter().enumerate() {
        text.push_str(&format!("point.{name}={}\n", POINTS[i].load(Ordering::SeqCst)));
    }
    text
}

fn write_atomically(path: &Path, text: &str) {
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".tmp");
    if let Err(e) = fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, path)) {
        log(&format!("cannot write {}: {e}", path.display()));
    }
}

extern "C" {
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn getpid() -> c_int;
}

const SIGKILL: c_int = 9;

/// A persistence call of `kind` is about to be made: it is counted, and if it is the one
/// `POWERCUT_CUT_AT` names, the process dies before it takes effect. Call while holding [`Busy`].
fn point_in(cfg: &Config, kind: Kind) {
    let n = POINTS[kind.index()].fetch_add(1, Ordering::SeqCst) + 1;
    let cut = cfg.cut == Some((kind, n));
    if let Some(path) = &cfg.points {
        // One writer at a time: they share the temporary file.
        static WRITING: Mutex<()> = Mutex::new(());
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        write_atomically(path, &points_text());
    }
    if cut {
        debug(cfg, || format!("cut before {kind:?} {n}"));
        // The counters as they were at the cut, then the cut itself: no other thread's call
        // runs past this point while the stats are written, since the state lock is held.
        let st = state();
        st.write_stats(cfg);
        // SAFETY: plain syscalls.
        unsafe {
            kill(getpid(), SIGKILL);
        }
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// [`point_in`], for a caller not holding [`Busy`].
fn point(kind: Kind) {
    guarded("point", |cfg| point_in(cfg, kind));
}

/// [`point`] if `fd` is a tracked file.
fn point_if_file(fd: c_int, kind: Kind) {
    guarded("point", |cfg| {
        let tracked = state().file_key(fd).is_some();
        if tracked {
            point_in(cfg, kind);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Strict directory mode

/// Where the durable image of each file and directory is: in the shadow tree (its entry is
/// durable) or in the pending store (`<shadow>.pending/<dev>-<ino>`: synced, but no durable
/// entry names it yet). Lock order: [`STATE`] may be held when this is taken.
struct Durable {
    by_key: BTreeMap<Key, PathBuf>,
    /// Renames not yet durable: the inode and where it went (a real path under the root).
    moved: BTreeMap<Key, PathBuf>,
}

static DURABLE: Mutex<Durable> = Mutex::new(Durable {
    by_key: BTreeMap::new(),
    moved: BTreeMap::new(),
});

fn durable() -> MutexGuard<'static, Durable> {
    DURABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records the image of every entry at or under `real` (the shadow holds a copy at `image`).
fn walk_images(real: &Path, image: &Path, out: &mut BTreeMap<Key, PathBuf>) {
    let Ok(m) = fs::symlink_metadata(real) else {
        return;
    };
    out.insert((m.dev(), m.ino()), image.to_path_buf());
    if m.is_dir() {
        if let Ok(entries) = fs::read_dir(real) {
            for e in entries.flatten() {
                walk_images(&e.path(), &image.join(e.file_name()), out);
            }
        }
    }
}

impl Durable {
    fn pending_of(cfg: &Config, key: Key) -> PathBuf {
        cfg.pending.join(format!("{}-{}", key.0, key.1))
    }

    /// The image of `key`, made (empty, in the pending store) if it has none.
    fn image(&mut self, cfg: &Config, key: Key, dir: bool) -> Result<PathBuf, String> {
        if let Some(p) = self.by_key.get(&key) {
            if fs::symlink_metadata(p).is_ok() {
                return Ok(p.clone());
            }
        }
        let p = Self::pending_of(cfg, key);
        fs::create_dir_all(&cfg.pending).map_err(|e| format!("mkdir pending store: {e}"))?;
        let _ = remove_shadow(&p);
        let made = if dir {
            fs::create_dir(&p)
        } else {
            File::create(&p).map(drop)
        };
        made.map_err(|e| format!("make {}: {e}", p.display()))?;
        self.by_key.insert(key, p.clone());
        Ok(p)
    }

    /// Where the image of `key`, renamed away from its durable entry, goes when the rename
    /// becomes durable: at its new name, in the image of the directory it is in now, if that
    /// directory has one.
    fn destination(&mut self, key: Key) -> Option<PathBuf> {
        let to = self.moved.remove(&key)?;
        let m = fs::symlink_metadata(&to).ok()?;
        if (m.dev(), m.ino()) != key {
            return None;
        }
        let parent = fs::symlink_metadata(to.parent()?).ok()?;
        let image = self.by_key.get(&(parent.dev(), parent.ino()))?;
        fs::symlink_metadata(image).ok()?;
        Some(image.join(to.file_name()?))
    }

    fn key_at(&self, p: &Path) -> Option<Key> {
        self.by_key.iter().find(|(_, v)| v.as_path() == p).map(|(k, _)| *k)
    }

    /// Moves the image at `from` (and all under it) to `to`.
    fn move_image(&mut self, from: &Path, to: &Path) -> Result<(), String> {
        let _ = remove_shadow(to);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        fs::rename(from, to)
            .map_err(|e| format!("move {} to {}: {e}", from.display(), to.display()))?;
        for v in self.by_key.values_mut() {
            if let Ok(rest) = v.strip_prefix(from) {
                *v = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
        Ok(())
    }
}

/// Strict mode: a file or directory was just created (behind `fd`, or at `path`). Its inode
/// number may be one a deleted file had, whose image (still named by a durable entry, until its
/// directory is synced) is not this one's: the image is no longer found by the inode.
fn new_inode(cfg: &Config, fd: c_int, path: Option<&Path>) {
    if !cfg.strict {
        return;
    }
    let m = match path {
        Some(p) => fs::symlink_metadata(p).ok(),
        None => fstat(fd),
    };
    if let Some(m) = m {
        durable().by_key.remove(&(m.dev(), m.ino()));
    }
}

/// An fsync of the directory `real` (its inode `key`): its entries as they are now become its
/// durable entries. An entry gone from it takes its image to the pending store (a rename to
/// another directory brings it back from there when that one is synced); a new entry takes the
/// image its file or directory has (anywhere: an image moves whole), or an empty one.
fn reconcile(cfg: &Config, real: &Path, key: Key) -> Result<(), String> {
    let mut d = durable();
    let img = d.image(cfg, key, true)?;
    let mut want: BTreeMap<std::ffi::OsString, (Key, bool)> = BTreeMap::new();
    let entries = fs::read_dir(real).map_err(|e| format!("list {}: {e}", real.display()))?;
    for e in entries.flatten() {
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() || m.is_file() {
            want.insert(e.file_name(), ((m.dev(), m.ino()), m.is_dir()));
        }
    }
    let had: Vec<std::ffi::OsString> = fs::read_dir(&img)
        .map_err(|e| format!("list {}: {e}", img.display()))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    for name in had {
        let p = img.join(&name);
        let k = d.key_at(&p);
        if k.is_some() && want.get(&name).map(|w| w.0) == k {
            continue;
        }
        match k {
            // Renamed away: a rename is atomic, so it is durable in both directories at once,
            // if the one it went to has a durable image.
            Some(k) => match d.destination(k) {
                Some(to) => d.move_image(&p, &to)?,
                None => d.move_image(&p, &Durable::pending_of(cfg, k))?,
            },
            None => remove_shadow(&p).map_err(|e| format!("remove {}: {e}", p.display()))?,
        }
    }
    for (name, (k, dir)) in want {
        d.moved.remove(&k);
        let target = img.join(&name);
        match d.by_key.get(&k).cloned() {
            Some(at) if at == target => {}
            Some(at) if fs::symlink_metadata(&at).is_ok() => d.move_image(&at, &target)?,
            _ => {
                let made = if dir {
                    fs::create_dir_all(&target)
                } else {
                    File::create(&target).map(drop)
                };
                made.map_err(|e| format!("make {}: {e}", target.display()))?;
                d.by_key.insert(k, target);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Disk-full mode

/// How often the control file is read again, at most.
const SPACE_REREAD: Duration = Duration::from_millis(50);

const ENOSPC: c_int = 28;
const EIO: c_int = 5;

/// Calls the disk-full mode refused or cut short.
struct Refused {
    enospc: AtomicU64,
    short_writes: AtomicU64,
    eio: AtomicU64,
}

static REFUSED: Refused = Refused {
    enospc: AtomicU64::new(0),
    short_writes: AtomicU64::new(0),
    eio: AtomicU64::new(0),
};

/// The disk-full mode's state. Lock order: [`STATE`] may be held when this is taken, never the
/// other way round.
struct Space {
    /// When the control file was last read.
    read_at: Option<Instant>,
    /// What it held then (`None`: absent or unreadable).
    text: Option<String>,
    /// Bytes the tracked files may take, if limited.
    limit: Option<u64>,
    /// Whether syncs fail with `EIO`.
    eio: bool,
    /// Bytes the tracked files take; `None` when it has to be measured again.
    usage: Option<u64>,
}

static SPACE: Mutex<Space> = Mutex::new(Space {
    read_at: None,
    text: None,
    limit: None,
    eio: false,
    usage: None,
});

/// The disk-full mode's state, the control file read again if it is due; `None` when the mode
/// is off. Call while holding [`Busy`], without holding [`SPACE`].
fn space(cfg: &Config) -> Option<MutexGuard<'static, Space>> {
    let file = cfg.space.as_deref()?;
    let mut s = SPACE.lock().unwrap_or_else(|e| e.into_inner());
    if s.read_at.is_none_or(|t| t.elapsed() >= SPACE_REREAD) {
        s.reread(cfg, file);
    }
    Some(s)
}

/// The tracked files' lengths may have changed behind the running sum: it is measured again.
fn space_changed(cfg: &Config) {
    if cfg.space.is_some() {
        SPACE.lock().unwrap_or_else(|e| e.into_inner()).usage = None;
    }
}

impl Space {
    fn reread(&mut self, cfg: &Config, file: &Path) {
        self.read_at = Some(Instant::now());
        // Measured again at every read: whatever changed the files behind the shim's back.
        self.usage = None;
        let text = fs::read_to_string(file).ok();
        if text == self.text {
            return;
        }
        let (mut limit, mut eio) = (None, false);
        for word in text.as_deref().unwrap_or("").split_whitespace() {
            if word.eq_ignore_ascii_case("eio") {
                eio = true;
            } else if let Ok(n) = word.parse::<u64>() {
                limit = Some(n);
            } else {
                log(&format!(
                    "{}: `{word}` is neither a number of bytes nor `eio`; ignored",
                    file.display()
                ));
            }
        }
        debug(cfg, || format!("space: limit {limit:?}, eio {eio}"));
        self.text = text;
        self.limit = limit;
        self.eio = eio;
    }
}

/// Sum of the lengths of the regular files at or under `dir`.
fn tree_len(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut sum = 0;
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => sum += tree_len(&entry.path()),
            Ok(t) if t.is_file() => sum += entry.metadata().map_or(0, |m| m.len()),
            _ => {}
        }
    }
    sum
}

/// A call that may grow a tracked file, let through while a limit is in force. It holds the
/// lock until [`Admitted::now`]: calls that grow files run one at a time.
struct Admitted {
    space: MutexGuard<'static, Space>,
    /// The file's length before the call.
    len: u64,
    /// Bytes the file may grow by.
    room: u64,
}

impl Admitted {
    /// How many of `n` bytes written at `at` fit.
    fn fitting(&self, at: u64, n: usize) -> usize {
        let end = self.len.saturating_add(self.room);
        if at.saturating_add(n as u64) <= end {
            n
        } else {
            end.saturating_sub(at).min(n as u64) as usize
        }
    }

    /// Whether the file may be `new_len` bytes long.
    fn fits(&self, new_len: u64) -> bool {
        new_len <= self.len.saturating_add(self.room)
    }

    /// After the call: the file is `new_len` bytes long.
    fn now(mut self, new_len: u64) {
        let len = self.len;
        if let Some(u) = &mut self.space.usage {
            *u = (*u + new_len).saturating_sub(len);
        }
    }
}

/// Admits a call that may grow a file, when a limit is in force; `len` gives the file's length.
fn admit(cfg: &Config, len: impl FnOnce() -> Option<u64>) -> Option<Admitted> {
    let mut space = space(cfg)?;
    let limit = space.limit?;
    let usage = *space.usage.get_or_insert_with(|| tree_len(&cfg.root));
    Some(Admitted {
        space,
        len: len()?,
        room: limit.saturating_sub(usage),
    })
}

/// Counts a refused or shortened call and rewrites the stats file; `what` says what it was
/// (shown with `POWERCUT_DEBUG=1`).
fn refused(counter: &AtomicU64, what: impl FnOnce() -> String) {
    counter.fetch_add(1, Ordering::Relaxed);
    guarded("stats", |cfg| {
        debug(cfg, what);
        state().write_stats(cfg)
    });
}

/// `fd` and the path it has open, for messages.
fn fd_name(fd: c_int) -> String {
    let path = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
    format!("fd {fd} ({})", path.display())
}

/// Whether a sync of `fd` is to fail with `EIO`: the mode says so, and `fd` is a tracked file or
/// a directory at or under the root.
fn sync_fails(cfg: &Config, fd: c_int) -> bool {
    if !space(cfg).is_some_and(|s| s.eio) {
        return false;
    }
    match state().fds.get(&fd) {
        Some(Fd::File { .. }) => true,
        Some(Fd::Dir { path, .. }) => path.starts_with(&cfg.root),
        None => false,
    }
}

/// Runs a write of `n` bytes at `at` under the space limit: `call(k)` writes the first `k`.
unsafe fn limited_write(
    fd: c_int,
    at: Option<u64>,
    n: usize,
    call: impl FnOnce(usize) -> SsizeT,
) -> SsizeT {
    let Some(gate) = guarded("write", |cfg| admit(cfg, || Some(fstat(fd)?.len()))).flatten() else {
        return call(n);
    };
    let at = at.unwrap_or(gate.len);
    let fit = gate.fitting(at, n);
    if fit == 0 && n > 0 {
        drop(gate);
        refused(&REFUSED.enospc, || {
            format!("write of {n} bytes: ENOSPC, {}", fd_name(fd))
        });
        set_errno(ENOSPC);
        return -1;
    }
    let r = call(fit);
    let saved = errno();
    let len = gate.len;
    gate.now(if r > 0 { len.max(at + r as u64) } else { len });
    if r >= 0 && (r as usize) < n {
        refused(&REFUSED.short_writes, || {
            format!("write of {n} bytes: {r} written, {}", fd_name(fd))
        });
    }
    set_errno(saved);
    r
}

/// Runs a call that makes the file behind `fd` (or at `path`) `new_len(its length)` bytes long
/// under the space limit: it fails whole with `ENOSPC` if that does not fit.
unsafe fn limited_resize(
    what: &str,
    fd: c_int,
    path: Option<&Path>,
    new_len: impl FnOnce(u64) -> u64,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let gate = guarded(what, |cfg| {
        if path.is_none() {
            // A tracked regular file: resizing anything else fails on its own.
            state().file_key(fd)?;
        }
        let a = admit(cfg, || match path {
            Some(p) => Some(fs::metadata(p).ok()?.len()),
            None => Some(fstat(fd)?.len()),
        })?;
        let new = new_len(a.len);
        Some((a, new))
    })
    .flatten();
    let Some((gate, new)) = gate else {
        return call();
    };
    if !gate.fits(new) {
        drop(gate);
        refused(&REFUSED.enospc, || {
            let target = path.map_or_else(|| fd_name(fd), |p| p.display().to_string());
            format!("{what} to {new} bytes: ENOSPC, {target}")
        });
        set_errno(ENOSPC);
        return -1;
    }
    let r = call();
    let saved = errno();
    let len = gate.len;
    gate.now(if r == 0 { new } else { len });
    set_errno(saved);
    r
}

// ---------------------------------------------------------------------------------------------
// Paths

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(x) => out.push(x),
        }
    }
    out
}

enum Place {
    /// At or under the root.
    Under(PathBuf),
    /// A directory above the root (its fd may resolve paths into the root).
    Above(PathBuf),
    Outside,
}

impl Place {
    fn under(&self) -> Option<&Path> {
        match self {
            Place::Under(p) => Some(p),
            _ => None,
        }
    }
}

fn place(cfg: &Config, abs: PathBuf) -> Place {
    let abs = if abs.components().any(|c| c == Component::ParentDir) {
        normalize(&abs)
    } else {
        abs
    };
    if abs.starts_with(&cfg.root) {
        return Place::Under(abs);
    }
    if cfg.root.starts_with(&abs) {
        return Place::Above(abs);
    }
    if let Some(real) = &cfg.real_root {
        if let Ok(rest) = abs.strip_prefix(real) {
            return Place::Under(cfg.root.join(rest));
        }
        if real.starts_with(&abs) {
            return Place::Above(abs);
        }
    }
    Place::Outside
}

/// Whether `p` may be at, under or above the root, spelt either way.
fn near_root(cfg: &Config, p: &Path) -> bool {
    let near = |root: &Path| p.starts_with(root) || root.starts_with(p);
    near(&cfg.root) || cfg.real_root.as_deref().is_some_and(near)
}

/// Where `path` (relative to `dirfd`) is, relative to the root. Call while holding [`Busy`].
unsafe fn locate(cfg: &Config, dirfd: c_int, path: *const c_char) -> Place {
    if path.is_null() {
        return Place::Outside;
    }
    let bytes = CStr::from_ptr(path).to_bytes();
    let p = Path::new(OsStr::from_bytes(bytes));
    if p.is_absolute() {
        // The common case, without allocating: clearly outside the root.
        if !near_root(cfg, p) && !p.components().any(|c| c == Component::ParentDir) {
            return Place::Outside;
        }
        return place(cfg, p.to_path_buf());
    }
    if dirfd == AT_FDCWD {
        return match std::env::current_dir() {
            Ok(cwd) => place(cfg, cwd.join(p)),
            Err(_) => Place::Outside,
        };
    }
    if !maybe_tracked(dirfd) {
        return Place::Outside;
    }
    let base = match state().fds.get(&dirfd) {
        Some(Fd::Dir { path, key }) => (path.clone(), *key),
        _ => return Place::Outside,
    };
    // The directory fd may have been closed behind the shim's back (closedir) and reused.
    match fstat(dirfd) {
        Some(m) if (m.dev(), m.ino()) == base.1 => {}
        _ => {
            state().remove_fd(dirfd);
            return Place::Outside;
        }
    }
    place(cfg, base.0.join(p))
}

fn shadow_of(cfg: &Config, path: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(&cfg.root).ok()?;
    Some(if rest.as_os_str().is_empty() {
        cfg.shadow.clone()
    } else {
        cfg.shadow.join(rest)
    })
}

fn fstat(fd: c_int) -> Option<fs::Metadata> {
    // SAFETY: the File is never dropped, so the fd stays the caller's.
    let f = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f.metadata().ok()
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping, run after the real call succeeded

/// Runs `f` with the configuration, guarded: `None` when the shim is off, nested or failing.
fn guarded<T>(what: &str, f: impl FnOnce(&'static Config) -> T) -> Option<T> {
    let busy = enter()?;
    let cfg = config()?;
    let saved = errno();
    let out = match catch_unwind(AssertUnwindSafe(|| f(cfg))) {
        Ok(v) => Some(v),
        Err(_) => {
            log(&format!("internal error (panic) in {what}; passed through"));
            None
        }
    };
    set_errno(saved);
    drop(busy);
    out
}

fn note_error(what: &str, e: impl std::fmt::Display) {
    log(&format!("{what}: {e}"));
    state().stats.errors += 1;
}

/// After a successful open of `path` as `fd`.
fn opened(cfg: &Config, at: Place, fd: c_int, flags: c_int) {
    let Some(m) = fstat(fd) else {
        return;
    };
    let key = (m.dev(), m.ino());
    match at {
        Place::Under(path) | Place::Above(path) if m.is_dir() => {
            let mut st = state();
            st.remove_fd(fd);
            st.insert_fd(fd, Fd::Dir { path, key });
        }
        Place::Under(path) if m.is_file() => {
            // Strict mode: a new entry is durable only once its directory is synced.
            if flags & O_CREAT != 0 && !cfg.strict {
                if let Some(shadow) = shadow_of(cfg, &path) {
                    if fs::symlink_metadata(&shadow).is_err() {
                        // A new file: durable as an empty file until it is synced.
                        let made = shadow
                            .parent()
                            .map_or(Ok(()), fs::create_dir_all)
                            .and_then(|()| File::create(&shadow).map(drop));
                        if let Err(e) = made {
                            note_error(&format!("cannot create shadow {}", shadow.display()), e);
                        }
                    }
                }
            }
            debug(cfg, || format!("open {} fd {fd}", path.display()));
            let mut st = state();
            // First drop what an unseen close left on this fd: it could be this very file.
            st.remove_fd(fd);
            let t = st.files.entry(key).or_insert_with(|| Tracked {
                path: None,
                dirty: Ranges::default(),
                inflight: Vec::new(),
                fds: 0,
            });
            t.path = Some(path);
            if flags & O_TRUNC != 0 {
                t.dirty.add(0, u64::MAX);
            }
            st.stats.opens += 1;
            st.insert_fd(
                fd,
                Fd::File {
                    key,
                    append: flags & O_APPEND != 0,
                    readable: flags & O_ACCMODE != O_WRONLY,
                },
            );
            drop(st);
            if flags & (O_CREAT | O_TRUNC) != 0 {
                space_changed(cfg);
            }
        }
        _ => forget_stale(fd),
    }
}

/// A new fd the shim does not track: drop what an unseen close left behind.
fn forget_stale(fd: c_int) {
    if maybe_tracked(fd) {
        state().remove_fd(fd);
    }
}

unsafe fn do_open(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let Some(busy) = enter() else {
        return call();
    };
    let Some(cfg) = config() else {
        drop(busy);
        return call();
    };
    let at = locate(cfg, dirfd, path);
    let mut creates = false;
    if flags & O_CREAT != 0 {
        if let Place::Under(p) = &at {
            if fs::symlink_metadata(p).is_err() {
                creates = true;
                point_in(cfg, Kind::Create);
            }
        }
    }
    drop(busy);
    if matches!(at, Place::Outside) {
        let fd = call();
        if fd >= 0 && maybe_tracked(fd) {
            let e = errno();
            guarded("open", |_| forget_stale(fd));
            set_errno(e);
        }
        return fd;
    }
    let fd = call();
    if fd >= 0 {
        guarded("open", |cfg| {
            if creates {
                new_inode(cfg, fd, None);
            }
            opened(cfg, at, fd, flags)
        });
    }
    fd
}

/// After `newfd` became a copy of `oldfd`.
fn duplicated(oldfd: c_int, newfd: c_int) {
    let mut st = state();
    st.remove_fd(newfd);
    if let Some(entry) = st.fds.get(&oldfd).cloned() {
        st.insert_fd(newfd, entry);
    }
}

/// `n` bytes were written to the file behind `fd`, at `start` (`None`: unknown). `positional`:
/// by a pwrite, which on an O_APPEND fd appends whatever the offset says (Linux).
fn written(fd: c_int, start: Option<u64>, n: SsizeT, positional: bool) {
    if n <= 0 {
        return;
    }
    let n = n as u64;
    let mut st = state();
    let Some((key, append, _)) = st.file_key(fd) else {
        return;
    };
    let start = if append && positional {
        drop(st);
        // The data went to the end; a pwrite leaves the file offset alone, so ask the length.
        let end = match fstat(fd) {
            Some(m) => m.len(),
            None => return,
        };
        st = state();
        Some(end.saturating_sub(n))
    } else {
        start
    };
    match start {
        Some(s) => st.mark(key, s, s.saturating_add(n), n),
        None => {
            st.stats.errors += 1;
            drop(st);
            log(&format!(
                "fd {fd}: a write at an unknown offset is not tracked"
            ));
        }
    }
}

/// A write of `n` bytes at the file offset; `call(k)` writes the first `k` of them.
unsafe fn do_write(fd: c_int, n: usize, call: impl FnOnce(usize) -> SsizeT) -> SsizeT {
    if !maybe_tracked(fd) {
        return call(n);
    }
    point_if_file(fd, Kind::Write);
    // Where the write goes: the offset before it; on an O_APPEND fd, the end, which is known
    // atomically only after it (the offset is then just past the data).
    let before = guarded("write", |_| {
        let (_, append, _) = state().file_key(fd)?;
        if append {
            return Some(None);
        }
        let off = lseek64(fd, 0, SEEK_CUR);
        Some((off >= 0).then_some(off as u64))
    })
    .flatten();
    let announced = match before {
        Some(Some(at)) => {
            let range = (at, at.saturating_add(n as u64));
            guarded("write", |_| state().expect(fd, range.0, range.1));
            Some(range)
        }
        _ => None,
    };
    let n = match before {
        Some(at) => limited_write(fd, at, n, call),
        None => call(n),
    };
    if let Some((start, end)) = announced {
        guarded("write", |_| state().settle(fd, start, end));
    }
    if n > 0 {
        if let Some(before) = before {
            guarded("write", |_| {
                let start = before.or_else(|| {
                    let end = lseek64(fd, 0, SEEK_CUR);
                    (end >= n as OffT).then(|| (end - n as OffT) as u64)
                });
                written(fd, start, n, false)
            });
        }
    }
    n
}

/// A write of `n` bytes at `off`; `call(k)` writes the first `k` of them.
unsafe fn do_pwrite(fd: c_int, off: OffT, n: usize, call: impl FnOnce(usize) -> SsizeT) -> SsizeT {
    if !maybe_tracked(fd) {
        return call(n);
    }
    point_if_file(fd, Kind::Write);
    let append = guarded("pwrite", |_| {
        let mut st = state();
        let append = st.file_key(fd)?.1;
        if !append && off >= 0 {
            st.expect(fd, off as u64, (off as u64).saturating_add(n as u64));
        }
        Some(append)
    })
    .flatten();
    let requested = n;
    let n = match append {
        // On an O_APPEND fd the data goes to the end, whatever the offset (Linux).
        Some(append) if off >= 0 => limited_write(fd, (!append).then_some(off as u64), n, call),
        _ => call(n),
    };
    if append == Some(false) && off >= 0 {
        let start = off as u64;
        guarded("pwrite", |_| {
            state().settle(fd, start, start.saturating_add(requested as u64))
        });
    }
    if n > 0 && off >= 0 {
        guarded("pwrite", |_| written(fd, Some(off as u64), n, true));
    }
    n
}

fn resized(fd: c_int, start: u64, end: u64) {
    let mut st = state();
    if let Some((key, _, _)) = st.file_key(fd) {
        if let Some(t) = st.files.get_mut(&key) {
            t.dirty.add(start, end);
        }
    }
}

/// Copies the dirty ranges of the file behind `fd` into its shadow; returns the bytes copied.
fn sync_file(cfg: &Config, st: &mut State, fd: c_int) -> Result<u64, String> {
    let Some((key, _, readable)) = st.file_key(fd) else {
        return Ok(0);
    };
    let m = fstat(fd).ok_or("fstat failed")?;
    if (m.dev(), m.ino()) != key {
        // Closed behind the shim's back and reused for another file.
        st.remove_fd(fd);
        return Ok(0);
    }
    let Some(t) = st.files.get_mut(&key) else {
        return Ok(0);
    };
    let (path, shadow) = if cfg.strict {
        // The image follows the file, whatever its entries (durable or not) say.
        let path = t.path.clone().unwrap_or_else(|| PathBuf::from("(unlinked)"));
        (path, durable().image(cfg, key, false)?)
    } else {
        let Some(path) = t.path.clone() else {
            // Unlinked: durable, but nowhere to be found after the cut.
            t.dirty = Ranges::default();
            return Ok(0);
        };
        let shadow = shadow_of(cfg, &path).ok_or("tracked file outside the root")?;
        (path, shadow)
    };
    let len = m.len();
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", shadow.display());
    let sh = match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&shadow)
    {
        Ok(f) => f,
        Err(_) => {
            if let Some(parent) = shadow.parent() {
                fs::create_dir_all(parent).map_err(|e| err("mkdir for", e))?;
            }
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&shadow)
                .map_err(|e| err("open", e))?
        }
    };
    let sh_len = sh.metadata().map_err(|e| err("stat", e))?.len();
    for &(start, end) in &t.inflight {
        t.dirty.add(start, end);
    }
    if t.dirty.0.is_empty() {
        if sh_len == len {
            return Ok(0);
        }
        log(&format!(
            "{}: length {len} but durable length {sh_len} with no write seen; copying it whole",
            path.display()
        ));
        t.dirty.add(0, u64::MAX);
    }
    let reopened;
    // SAFETY: the File is never dropped, so the fd stays the caller's.
    let borrowed = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let src: &File = if readable {
        &borrowed
    } else {
        reopened =
            File::open(format!("/proc/self/fd/{fd}")).map_err(|e| err("reopen source of", e))?;
        &reopened
    };
    sh.set_len(len).map_err(|e| err("set_len", e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    for (&start, &end) in &t.dirty.0 {
        let end = end.min(len);
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let got = src
                .read_at(&mut buf[..want], at)
                .map_err(|e| format!("read {}: {e}", path.display()))?;
            if got == 0 {
                break; // truncated meanwhile
            }
            sh.write_all_at(&buf[..got], at)
                .map_err(|e| err("write", e))?;
            at += got as u64;
            copied += got as u64;
        }
    }
    t.dirty = Ranges::default();
    Ok(copied)
}

unsafe fn do_sync(fd: c_int, call: impl FnOnce() -> c_int) -> c_int {
    if !maybe_tracked(fd) {
        return call();
    }
    // A file, or a directory at or under the root (strict mode: its entries become durable).
    let dir = guarded("fsync", |cfg| {
        let entry = state().fds.get(&fd).cloned();
        match entry {
            Some(Fd::File { .. }) => {
                point_in(cfg, Kind::Fsync);
                None
            }
            Some(Fd::Dir { path, key }) if path.starts_with(&cfg.root) => {
                point_in(cfg, Kind::Dirsync);
                Some((path, key))
            }
            _ => None,
        }
    })
    .flatten();
    if guarded("fsync", |cfg| sync_fails(cfg, fd)).unwrap_or(false) {
        refused(&REFUSED.eio, || format!("sync: EIO, {}", fd_name(fd)));
        set_errno(EIO);
        return -1;
    }
    let r = call();
    if r == 0 {
        if let Some((path, key)) = dir {
            guarded("fsync", |cfg| {
                if cfg.strict {
                    if let Err(e) = reconcile(cfg, &path, key) {
                        note_error("directory sync not mirrored", e);
                    }
                }
            });
        }
        guarded("fsync", |cfg| {
            // The lock is held through the copy: no second sync returns before this one is done.
            let mut st = state();
            match sync_file(cfg, &mut st, fd) {
                Ok(n) => {
                    st.stats.syncs += 1;
                    st.stats.synced_bytes += n;
                    debug(cfg, || format!("sync fd {fd}: {n} bytes made durable"));
                }
                Err(e) => {
                    st.stats.errors += 1;
                    log(&format!(
                        "sync of fd {fd} not mirrored (stays not durable): {e}"
                    ));
                }
            }
            st.write_stats(cfg);
        });
    }
    r
}

fn remove_shadow(shadow: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(shadow) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(shadow),
        Ok(_) => fs::remove_file(shadow),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let m = fs::symlink_metadata(from)?;
    if m.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if m.is_file() {
        fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}

/// After a successful rename from `old` to `new`.
fn renamed(cfg: &Config, old: Place, new: Place, flags: c_uint) {
    type RenameAt2 =
        unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, c_uint) -> c_int;
    state().stats.dir_ops += 1;
    if cfg.strict {
        // The entries change in the durable image when their directories are synced; what
        // comes in from outside the root is taken as durable content, with no durable entry.
        match (old, new) {
            (Place::Under(old), Place::Under(new)) => {
                if let Ok(m) = fs::symlink_metadata(&new) {
                    durable().moved.insert((m.dev(), m.ino()), new.clone());
                }
                let mut st = state();
                if flags & RENAME_EXCHANGE != 0 {
                    st.exchange(&old, &new);
                } else {
                    st.forget_path(&new, true);
                    st.rebase(&old, &new);
                }
            }
            (Place::Under(old), _) => state().forget_path(&old, true),
            (_, Place::Under(new)) => {
                if let Ok(m) = fs::symlink_metadata(&new) {
                    let key = (m.dev(), m.ino());
                    let p = Durable::pending_of(cfg, key);
                    let _ = remove_shadow(&p);
                    let copied = fs::create_dir_all(&cfg.pending).and_then(|()| copy_tree(&new, &p));
                    match copied {
                        Ok(()) => {
                            durable().by_key.insert(key, p);
                        }
                        Err(e) => note_error(&format!("cannot copy {} in", new.display()), e),
                    }
                }
                state().forget_path(&new, true);
            }
            _ => {}
        }
        space_changed(cfg);
        return;
    }
    match (old, new) {
        (Place::Under(old), Place::Under(new)) => {
            debug(cfg, || {
                format!("rename {} -> {}", old.display(), new.display())
            });
            let (Some(so), Some(sn)) = (shadow_of(cfg, &old), shadow_of(cfg, &new)) else {
                return;
            };
            let mirrored = if flags == 0 {
                fs::rename(&so, &sn)
            } else {
                let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
                match (c(&so), c(&sn)) {
                    // SAFETY: valid C strings; the real renameat2.
                    (Some(a), Some(b)) => match unsafe { real!("renameat2", RenameAt2) } {
                        Some(f)
                            if unsafe { f(AT_FDCWD, a.as_ptr(), AT_FDCWD, b.as_ptr(), flags) }
                                == 0 =>
                        {
                            Ok(())
                        }
                        _ => Err(std::io::Error::last_os_error()),
                    },
                    _ => Err(std::io::Error::other("path with a NUL byte")),
                }
            };
            if let Err(e) = mirrored {
                note_error(
                    &format!(
                        "rename not mirrored in the shadow ({} -> {}); copying the file as it is",
                        so.display(),
                        sn.display()
                    ),
                    e,
                );
                let _ = remove_shadow(&sn);
                if let Err(e) = copy_tree(&new, &sn) {
                    note_error("copy", e);
                }
            }
            let mut st = state();
            if flags & RENAME_EXCHANGE != 0 {
                st.exchange(&old, &new);
            } else {
                st.forget_path(&new, true);
                st.rebase(&old, &new);
            }
        }
        (Place::Under(old), _) => {
            // Moved out of the tracked tree: gone from the durable image.
            if let Some(so) = shadow_of(cfg, &old) {
                if let Err(e) = remove_shadow(&so) {
                    note_error(&format!("cannot remove shadow {}", so.display()), e);
                }
            }
            state().forget_path(&old, true);
        }
        (_, Place::Under(new)) => {
            // Moved in: taken as durable as it is.
            if let Some(sn) = shadow_of(cfg, &new) {
                let _ = remove_shadow(&sn);
                if let Err(e) = copy_tree(&new, &sn) {
                    note_error(&format!("cannot copy {} into the shadow", new.display()), e);
                }
            }
            state().forget_path(&new, true);
        }
        _ => {}
    }
    space_changed(cfg);
}

unsafe fn do_rename(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
    flags: c_uint,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let places = guarded("rename", |cfg| {
        (locate(cfg, olddirfd, old), locate(cfg, newdirfd, new))
    });
    let Some((po, pn)) = places else {
        return call();
    };
    if po.under().is_none() && pn.under().is_none() {
        return call();
    }
    point(Kind::Rename);
    let r = call();
    if r == 0 {
        guarded("rename", |cfg| renamed(cfg, po, pn, flags));
    }
    r
}

unsafe fn do_unlink(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let Some(Place::Under(p)) = guarded("unlink", |cfg| locate(cfg, dirfd, path)) else {
        return call();
    };
    point(Kind::Unlink);
    let r = call();
    if r == 0 {
        guarded("unlink", |cfg| {
            debug(cfg, || format!("unlink {}", p.display()));
            // Strict mode: the entry goes from the durable image when its directory is synced.
            if let Some(s) = shadow_of(cfg, &p).filter(|_| !cfg.strict) {
                let done = if flags & AT_REMOVEDIR != 0 {
                    remove_shadow(&s)
                } else {
                    fs::remove_file(&s)
                };
                match done {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        note_error(&format!("cannot remove shadow {}", s.display()), e)
                    }
                    _ => {}
                }
            }
            let mut st = state();
            st.stats.dir_ops += 1;
            st.forget_path(&p, flags & AT_REMOVEDIR != 0);
            drop(st);
            space_changed(cfg);
        });
    }
    r
}

unsafe fn do_mkdir(dirfd: c_int, path: *const c_char, call: impl FnOnce() -> c_int) -> c_int {
    let Some(Place::Under(p)) = guarded("mkdir", |cfg| locate(cfg, dirfd, path)) else {
        return call();
    };
    point(Kind::Create);
    let r = call();
    if r == 0 {
        guarded("mkdir", |cfg| {
            debug(cfg, || format!("mkdir {}", p.display()));
            new_inode(cfg, -1, Some(&p));
            state().stats.dir_ops += 1;
            if let Some(s) = shadow_of(cfg, &p).filter(|_| !cfg.strict) {
                if let Err(e) = fs::create_dir_all(&s) {
                    note_error(&format!("cannot create shadow {}", s.display()), e);
                }
            }
        });
    }
    r
}

// ---------------------------------------------------------------------------------------------
// The interposed functions

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
type OpenAtFn = unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
type CreatFn = unsafe extern "C" fn(*const c_char, ModeT) -> c_int;

wrappers! {
    [open, open64] fn(path: *const c_char, flags: c_int, mode: ModeT) -> c_int;
    real real: OpenFn => do_open(AT_FDCWD, path, flags, || real(path, flags, mode))
}

wrappers! {
    [openat, openat64] fn(dirfd: c_int, path: *const c_char, flags: c_int, mode: ModeT) -> c_int;
    real real: OpenAtFn => do_open(dirfd, path, flags, || real(dirfd, path, flags, mode))
}

wrappers! {
    [creat, creat64] fn(path: *const c_char, mode: ModeT) -> c_int;
    real real: CreatFn => do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, || real(path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: SizeT) -> SsizeT {
    type F = unsafe extern "C" fn(c_int, *const c_void, SizeT) -> SsizeT;
    let Some(real) = real!("write", F) else {
        return missing();
    };
    do_write(fd, n, |k| real(fd, buf, k))
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const IoVec, cnt: c_int) -> SsizeT {
    type F = unsafe extern "C" fn(c_int, *const IoVec, c_int) -> SsizeT;
    let Some(real) = real!("writev", F) else {
        return missing();
    };
    do_write(fd, iov_len(iov, cnt), |k| {
        with_iov(iov, cnt, k, |v, c| real(fd, v, c))
    })
}

wrappers! {
    [pwrite, pwrite64] fn(fd: c_int, buf: *const c_void, n: SizeT, off: OffT) -> SsizeT;
    real real: unsafe extern "C" fn(c_int, *const c_void, SizeT, OffT) -> SsizeT =>
        do_pwrite(fd, off, n, |k| real(fd, buf, k, off))
}

wrappers! {
    [pwritev, pwritev64] fn(fd: c_int, iov: *const IoVec, cnt: c_int, off: OffT) -> SsizeT;
    real real: unsafe extern "C" fn(c_int, *const IoVec, c_int, OffT) -> SsizeT =>
        do_pwrite(fd, off, iov_len(iov, cnt), |k| {
            with_iov(iov, cnt, k, |v, c| real(fd, v, c, off))
        })
}

wrappers! {
    [pwritev2, pwritev64v2] fn(fd: c_int, iov: *const IoVec, cnt: c_int, off: OffT, flags: c_int) -> SsizeT;
    real real: unsafe extern "C" fn(c_int, *const IoVec, c_int, OffT, c_int) -> SsizeT =>
        // An offset of -1 writes at the file position, as writev does.
        if off == -1 {
            do_write(fd, iov_len(iov, cnt), |k| {
                with_iov(iov, cnt, k, |v, c| real(fd, v, c, off, flags))
            })
        } else {
            do_pwrite(fd, off, iov_len(iov, cnt), |k| {
                with_iov(iov, cnt, k, |v, c| real(fd, v, c, off, flags))
            })
        }
}

/// Bytes in `cnt` buffers at `iov`.
unsafe fn iov_len(iov: *const IoVec, cnt: c_int) -> usize {
    if iov.is_null() || cnt <= 0 {
        return 0;
    }
    (0..cnt as usize).fold(0usize, |sum, i| sum.saturating_add((*iov.add(i)).len))
}

/// Calls `f` with the buffers at `iov`, cut to their first `k` bytes.
unsafe fn with_iov(
    iov: *const IoVec,
    cnt: c_int,
    k: usize,
    f: impl FnOnce(*const IoVec, c_int) -> SsizeT,
) -> SsizeT {
    if k >= iov_len(iov, cnt) {
        return f(iov, cnt);
    }
    let mut cut = Vec::new();
    let mut left = k;
    for i in 0..cnt as usize {
        if left == 0 {
            break;
        }
        let v = &*iov.add(i);
        let take = v.len.min(left);
        cut.push(IoVec {
            base: v.base,
            len: take,
        });
        left -= take;
    }
    f(cut.as_ptr(), cut.len() as c_int)
}

unsafe fn do_ftruncate(fd: c_int, len: OffT, call: impl FnOnce() -> c_int) -> c_int {
    if !maybe_tracked(fd) {
        return call();
    }
    point_if_file(fd, Kind::Truncate);
    let r = if len >= 0 {
        limited_resize("ftruncate", fd, None, |_| len as u64, call)
    } else {
        call()
    };
    if r == 0 && len >= 0 {
        guarded("ftruncate", |_| resized(fd, len as u64, u64::MAX));
    }
    r
}

wrappers! {
    [ftruncate, ftruncate64] fn(fd: c_int, len: OffT) -> c_int;
    real real: unsafe extern "C" fn(c_int, OffT) -> c_int => do_ftruncate(fd, len, || real(fd, len))
}

unsafe fn do_truncate(path: *const c_char, len: OffT, call: impl FnOnce() -> c_int) -> c_int {
    let Some(Place::Under(p)) = guarded("truncate", |cfg| locate(cfg, AT_FDCWD, path)) else {
        return call();
    };
    point(Kind::Truncate);
    let r = if len >= 0 {
        limited_resize("truncate", -1, Some(&p), |_| len as u64, call)
    } else {
        call()
    };
    if r == 0 && len >= 0 {
        guarded("truncate", |_| {
            let Ok(m) = fs::metadata(&p) else { return };
            let mut st = state();
            let t = st
                .files
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| Tracked {
                    path: None,
                    dirty: Ranges::default(),
                inflight: Vec::new(),
                    fds: 0,
                });
            t.path = Some(p);
            t.dirty.add(len as u64, u64::MAX);
        });
    }
    r
}

wrappers! {
    [truncate, truncate64] fn(path: *const c_char, len: OffT) -> c_int;
    real real: unsafe extern "C" fn(*const c_char, OffT) -> c_int =>
        do_truncate(path, len, || real(path, len))
}

unsafe fn do_fallocate(
    fd: c_int,
    mode: c_int,
    off: OffT,
    len: OffT,
    call: impl FnOnce() -> c_int,
) -> c_int {
    if !maybe_tracked(fd) {
        return call();
    }
    point_if_file(fd, Kind::Truncate);
    let r = if off >= 0 && len >= 0 {
        let (off, n) = (off as u64, len as u64);
        let new_len = move |old: u64| {
            if mode & FALLOC_FL_INSERT_RANGE != 0 {
                old.saturating_add(n)
            } else if mode & FALLOC_FL_COLLAPSE_RANGE != 0 {
                old.saturating_sub(n)
            } else if mode & (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
                old
            } else {
                old.max(off.saturating_add(n))
            }
        };
        limited_resize("fallocate", fd, None, new_len, call)
    } else {
        call()
    };
    if r == 0 && off >= 0 && len >= 0 {
        let start = off as u64;
        // Collapse and insert move everything after `off`; the others change at most the range.
        let end = if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0 {
            u64::MAX
        } else {
            start.saturating_add(len as u64)
        };
        guarded("fallocate", |_| resized(fd, start, end));
    }
    r
}

wrappers! {
    [fallocate, fallocate64] fn(fd: c_int, mode: c_int, off: OffT, len: OffT) -> c_int;
    real real: unsafe extern "C" fn(c_int, c_int, OffT, OffT) -> c_int =>
        do_fallocate(fd, mode, off, len, || real(fd, mode, off, len))
}

#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int) -> c_int;
    let Some(real) = real!("fsync", F) else {
        return missing();
    };
    do_sync(fd, || real(fd))
}

#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int) -> c_int;
    let Some(real) = real!("fdatasync", F) else {
        return missing();
    };
    do_sync(fd, || real(fd))
}

#[no_mangle]
pub unsafe extern "C" fn sync_file_range(fd: c_int, off: OffT, n: OffT, flags: c_uint) -> c_int {
    type F = unsafe extern "C" fn(c_int, OffT, OffT, c_uint) -> c_int;
    let Some(real) = real!("sync_file_range", F) else {
        return missing();
    };
    // No durability (or, with `POWERCUT_SFR=data`, the data of the range within the durable
    // length, after the call wrote it out).
    if !maybe_tracked(fd) {
        return real(fd, off, n, flags);
    }
    point_if_file(fd, Kind::SyncFileRange);
    guarded("sync_file_range", |_| state().stats.sync_file_ranges += 1);
    let r = real(fd, off, n, flags);
    if r == 0 && off >= 0 && n >= 0 {
        guarded("sync_file_range", |cfg| {
            if cfg.sfr_data {
                let end = if n == 0 {
                    u64::MAX
                } else {
                    (off as u64).saturating_add(n as u64)
                };
                let mut st = state();
                if let Err(e) = range_data(cfg, &mut st, fd, off as u64, end) {
                    st.stats.errors += 1;
                    log(&format!("sync_file_range of fd {fd} not mirrored: {e}"));
                }
            }
        });
    }
    r
}

/// `POWERCUT_SFR=data`: the dirty bytes of `start..end` of the file behind `fd` that lie within
/// its durable length are copied into its image; the length stays, and so do the dirty ranges
/// (an fsync copies them again, with the length).
fn range_data(cfg: &Config, st: &mut State, fd: c_int, start: u64, end: u64) -> Result<(), String> {
    let Some((key, _, _)) = st.file_key(fd) else {
        return Ok(());
    };
    let Some(t) = st.files.get(&key) else {
        return Ok(());
    };
    let image = if cfg.strict {
        match durable().by_key.get(&key) {
            Some(p) => p.clone(),
            None => return Ok(()),
        }
    } else {
        match t.path.as_deref().and_then(|p| shadow_of(cfg, p)) {
            Some(p) => p,
            None => return Ok(()),
        }
    };
    let Ok(sh) = OpenOptions::new().write(true).open(&image) else {
        // No durable image: nothing of it is durable yet.
        return Ok(());
    };
    let durable_len = sh.metadata().map_err(|e| e.to_string())?.len();
    let src = File::open(format!("/proc/self/fd/{fd}")).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 16];
    for (&s, &e) in &t.dirty.0 {
        let (mut at, stop) = (s.max(start), e.min(end).min(durable_len));
        while at < stop {
            let want = ((stop - at) as usize).min(buf.len());
            let got = src.read_at(&mut buf[..want], at).map_err(|e| e.to_string())?;
            if got == 0 {
                break;
            }
            sh.write_all_at(&buf[..got], at).map_err(|e| e.to_string())?;
            at += got as u64;
        }
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int) -> c_int;
    let Some(real) = real!("close", F) else {
        return missing();
    };
    if maybe_tracked(fd) {
        // Forgotten before the real close: once closed, the number may be handed out again.
        guarded("close", |cfg| {
            let was_file = state().file_key(fd).is_some();
            state().remove_fd(fd);
            if was_file {
                space_changed(cfg);
            }
        });
    }
    real(fd)
}

#[no_mangle]
pub unsafe extern "C" fn dup(oldfd: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int) -> c_int;
    let Some(real) = real!("dup", F) else {
        return missing();
    };
    let fd = real(oldfd);
    if fd >= 0 && (maybe_tracked(oldfd) || maybe_tracked(fd)) {
        guarded("dup", |_| duplicated(oldfd, fd));
    }
    fd
}

unsafe fn do_dup2(oldfd: c_int, newfd: c_int, call: impl FnOnce() -> c_int) -> c_int {
    if !maybe_tracked(oldfd) && !maybe_tracked(newfd) {
        return call();
    }
    let Some(busy) = enter() else {
        return call();
    };
    // The lock is held across the call: `newfd` changes files atomically for the other threads.
    let mut st = state();
    let r = call();
    let saved = errno();
    if r >= 0 && oldfd != newfd {
        st.remove_fd(newfd);
        if let Some(entry) = st.fds.get(&oldfd).cloned() {
            st.insert_fd(newfd, entry);
        }
    }
    drop(st);
    drop(busy);
    set_errno(saved);
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup2(oldfd: c_int, newfd: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int, c_int) -> c_int;
    let Some(real) = real!("dup2", F) else {
        return missing();
    };
    do_dup2(oldfd, newfd, || real(oldfd, newfd))
}

#[no_mangle]
pub unsafe extern "C" fn dup3(oldfd: c_int, newfd: c_int, flags: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    let Some(real) = real!("dup3", F) else {
        return missing();
    };
    do_dup2(oldfd, newfd, || real(oldfd, newfd, flags))
}

unsafe fn do_fcntl(fd: c_int, cmd: c_int, arg: c_long, call: impl FnOnce() -> c_int) -> c_int {
    if !maybe_tracked(fd) || !matches!(cmd, F_DUPFD | F_DUPFD_CLOEXEC | F_SETFL) {
        let r = call();
        if r >= 0 && matches!(cmd, F_DUPFD | F_DUPFD_CLOEXEC) && maybe_tracked(r) {
            guarded("fcntl", |_| forget_stale(r));
        }
        return r;
    }
    let r = call();
    if r >= 0 {
        guarded("fcntl", |_| {
            if cmd == F_SETFL {
                if let Some(Fd::File { append, .. }) = state().fds.get_mut(&fd) {
                    *append = arg as c_int & O_APPEND != 0;
                }
            } else {
                duplicated(fd, r);
            }
        });
    }
    r
}

wrappers! {
    [fcntl, fcntl64] fn(fd: c_int, cmd: c_int, arg: c_long) -> c_int;
    real real: unsafe extern "C" fn(c_int, c_int, ...) -> c_int =>
        do_fcntl(fd, cmd, arg, || real(fd, cmd, arg))
}

#[no_mangle]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    type F = unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
    let Some(real) = real!("rename", F) else {
        return missing();
    };
    do_rename(AT_FDCWD, old, AT_FDCWD, new, 0, || real(old, new))
}

#[no_mangle]
pub unsafe extern "C" fn renameat(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char) -> c_int;
    let Some(real) = real!("renameat", F) else {
        return missing();
    };
    do_rename(olddirfd, old, newdirfd, new, 0, || {
        real(olddirfd, old, newdirfd, new)
    })
}

#[no_mangle]
pub unsafe extern "C" fn renameat2(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
    flags: c_uint,
) -> c_int {
    type F = unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, c_uint) -> c_int;
    let Some(real) = real!("renameat2", F) else {
        return missing();
    };
    do_rename(olddirfd, old, newdirfd, new, flags, || {
        real(olddirfd, old, newdirfd, new, flags)
    })
}

#[no_mangle]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    type F = unsafe extern "C" fn(*const c_char) -> c_int;
    let Some(real) = real!("unlink", F) else {
        return missing();
    };
    do_unlink(AT_FDCWD, path, 0, || real(path))
}

#[no_mangle]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    type F = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    let Some(real) = real!("unlinkat", F) else {
        return missing();
    };
    do_unlink(dirfd, path, flags, || real(dirfd, path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    type F = unsafe extern "C" fn(*const c_char) -> c_int;
    let Some(real) = real!("rmdir", F) else {
        return missing();
    };
    do_unlink(AT_FDCWD, path, AT_REMOVEDIR, || real(path))
}

#[no_mangle]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: ModeT) -> c_int {
    type F = unsafe extern "C" fn(*const c_char, ModeT) -> c_int;
    let Some(real) = real!("mkdir", F) else {
        return missing();
    };
    do_mkdir(AT_FDCWD, path, || real(path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: ModeT) -> c_int {
    type F = unsafe extern "C" fn(c_int, *const c_char, ModeT) -> c_int;
    let Some(real) = real!("mkdirat", F) else {
        return missing();
    };
    do_mkdir(dirfd, path, || real(dirfd, path, mode))
}
