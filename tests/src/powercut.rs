//! Power cuts for child processes. A child runs with the `powercut` shim preloaded
//! (`tests/powercut/shim.rs`, built by `tests/build.rs`): it keeps, in a shadow directory, the
//! image of the child's data directory that a power cut would leave (a file's content and length
//! as of its last `fsync`/`fdatasync`; directory operations durable at once, or with
//! [`strict_dirs_env`] only once their directory is fsynced). After the child was
//! killed with SIGKILL, [`power_cut`] puts that image in place of the data directory.
//!
//! The cycle: [`prepare`] (everything on disk is durable before a start), start the child with
//! [`env`], SIGKILL it, [`power_cut`], and again.
//!
//! The shim also fills the disk on request: with [`space_env`], the control file it names limits
//! the bytes the files under the root may take ([`limit_space`]: writes past it are cut short,
//! then fail with `ENOSPC`) or fails their syncs with `EIO` ([`fail_syncs`]), until
//! [`lift_space_limits`]; the child picks a change up within about 50 ms. See the shim's header.
//!
//! And it cuts at a chosen persistence point: it counts the calls that may change what a cut
//! leaves, per kind ([`KINDS`]; [`points_env`], [`read_points`]), and [`cut_at_env`] makes the
//! child kill itself just before the n-th call of a kind (then [`power_cut`] as after a
//! SIGKILL). [`strict_dirs_env`] makes directory entries durable only once their directory is
//! fsynced (the model of ALICE and CrashMonkey; renames stay atomic).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The shim library, on platforms that build it (Linux).
pub fn shim() -> Option<&'static str> {
    option_env!("POWERCUT_SHIM").filter(|s| !s.is_empty())
}

/// Environment for a child whose files under `root` get power cuts, their durable image kept in
/// `shadow`. Both paths must be absolute. Panics where there is no shim (see [`shim`]).
pub fn env(root: &Path, shadow: &Path) -> [(&'static str, OsString); 3] {
    let shim = shim().expect("the power-cut shim is only built on Linux");
    assert!(
        root.is_absolute() && shadow.is_absolute(),
        "power-cut paths must be absolute"
    );
    [
        ("LD_PRELOAD", shim.into()),
        ("POWERCUT_ROOT", root.as_os_str().to_owned()),
        ("POWERCUT_SHADOW", shadow.as_os_str().to_owned()),
    ]
}

/// The kinds of persistence points the shim counts (see its header): `write`, `sync_file_range`,
/// `fsync` (of a file), `dirsync` (fsync of a directory), `rename`, `unlink`, `create`,
/// `truncate`.
pub const KINDS: [&str; 8] = [
    "write",
    "sync_file_range",
    "fsync",
    "dirsync",
    "rename",
    "unlink",
    "create",
    "truncate",
];

/// Environment making the child kill itself (SIGKILL) just before its `n`-th (from 1) call of
/// `kind` (one of [`KINDS`]) under the root: the call never happens.
pub fn cut_at_env(kind: &str, n: u64) -> (&'static str, OsString) {
    assert!(
        KINDS.contains(&kind),
        "not a persistence point kind: {kind}"
    );
    assert!(n > 0, "persistence points count from 1");
    ("POWERCUT_CUT_AT", format!("{kind}:{n}").into())
}

/// Environment asking the shim to rewrite `path` at every persistence point with the counts
/// per kind (read them with [`read_points`]).
pub fn points_env(path: &Path) -> (&'static str, OsString) {
    ("POWERCUT_POINTS", path.as_os_str().to_owned())
}

/// Environment for the strict directory model: an entry created, renamed or removed is durable
/// only once its directory is fsynced.
pub fn strict_dirs_env() -> (&'static str, OsString) {
    ("POWERCUT_STRICT_DIRS", "1".into())
}

/// Environment making `sync_file_range` durable for data (not for a length): the bytes of its
/// range that lie within the file's durable length survive the cut, as pages written out do.
pub fn sfr_data_env() -> (&'static str, OsString) {
    ("POWERCUT_SFR", "data".into())
}

/// Persistence points seen, per kind (in the order of [`KINDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Points(pub [u64; KINDS.len()]);

impl Points {
    /// The count of `kind`.
    pub fn get(&self, kind: &str) -> u64 {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.0[i])
    }

    /// All points, of every kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Parses `point.<kind>=<n>` lines (as in the points and the stats files); others are
    /// ignored.
    pub fn parse(text: &str) -> Points {
        let mut p = Points::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            let Some(kind) = k.strip_prefix("point.") else {
                continue;
            };
            if let Some(i) = KINDS.iter().position(|x| *x == kind) {
                p.0[i] = v.trim().parse().unwrap_or(0);
            }
        }
        p
    }
}

impl fmt::Display for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, n) in KINDS.iter().zip(self.0) {
            if n > 0 {
                write!(f, "{}{k} {n}", if first { "" } else { ", " })?;
                first = false;
            }
        }
        if first {
            write!(f, "none")?;
        }
        Ok(())
    }
}

/// Reads the counts the shim keeps in the file given with [`points_env`] (or in the stats file);
/// all zero if it is missing (no point yet).
pub fn read_points(path: &Path) -> Points {
    std::fs::read_to_string(path).map_or_else(|_| Points::default(), |t| Points::parse(&t))
}

/// Environment asking the shim to keep its counters (see [`ShimStats`]) in `path`.
pub fn stats_env(path: &Path) -> (&'static str, OsString) {
    ("POWERCUT_STATS", path.as_os_str().to_owned())
}

/// Environment turning the shim's disk-full mode on, ruled by the control file `control`
/// (absolute, outside the root; absent means no limit).
pub fn space_env(control: &Path) -> (&'static str, OsString) {
    assert!(
        control.is_absolute(),
        "the space control file must be absolute"
    );
    ("POWERCUT_SPACE_FILE", control.as_os_str().to_owned())
}

/// Writes the control file atomically (the shim never reads it half-written).
fn write_control(control: &Path, text: &str) -> io::Result<()> {
    let mut tmp = control.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, control)
}

/// Lets the files under the root take `bytes` in all ([`tracked_len`] counts them).
pub fn limit_space(control: &Path, bytes: u64) -> io::Result<()> {
    write_control(control, &format!("{bytes}\n"))
}

/// Makes every `fsync`/`fdatasync` under the root fail with `EIO` (no limit on space).
pub fn fail_syncs(control: &Path) -> io::Result<()> {
    write_control(control, "eio\n")
}

/// Lifts the limit and the sync failures.
pub fn lift_space_limits(control: &Path) -> io::Result<()> {
    match std::fs::remove_file(control) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The bytes the shim counts against a limit: the lengths of the regular files under `root`.
pub fn tracked_len(root: &Path) -> io::Result<u64> {
    let mut files = Vec::new();
    list_files(root, Path::new(""), &mut files)?;
    let mut sum = 0;
    for rel in files {
        match std::fs::symlink_metadata(root.join(rel)) {
            Ok(m) => sum += m.len(),
            // Deleted since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sum)
}

/// Makes `shadow` an exact copy of `root` (created if missing): what is on disk before a start is
/// durable.
pub fn prepare(root: &Path, shadow: &Path) -> io::Result<()> {
    std::fs::create_dir_all(root)?;
    remove(shadow)?;
    remove(&pending(shadow))?;
    copy_tree(root, shadow)
}

/// Where the shim keeps, in strict mode, the images no durable entry names yet.
fn pending(shadow: &Path) -> PathBuf {
    let mut p = shadow.as_os_str().to_owned();
    p.push(".pending");
    PathBuf::from(p)
}

/// One file the power cut changed.
#[derive(Debug, Clone)]
pub struct Reverted {
    /// Relative to the root.
    pub path: PathBuf,
    /// Length before the cut (`None`: the file did not survive).
    pub before: Option<u64>,
    /// Length after the cut (`None`: the file was not there before).
    pub after: Option<u64>,
    /// Bytes that differ, counting a length difference as that many bytes.
    pub bytes: u64,
}

/// What a power cut reverted.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    /// Files whose content or length went back.
    pub files_reverted: usize,
    /// Bytes that went back, over all files.
    pub bytes_reverted: u64,
    /// Every changed file.
    pub files: Vec<Reverted>,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes reverted in {} files",
            self.bytes_reverted, self.files_reverted
        )?;
        for r in &self.files {
            let len = |l: Option<u64>| l.map_or_else(|| "absent".to_string(), |l| l.to_string());
            write!(
                f,
                "; {} {}->{} ({} bytes)",
                r.path.display(),
                len(r.before),
                len(r.after),
                r.bytes
            )?;
        }
        Ok(())
    }
}

/// The power cut, once the child is dead: `root` becomes the durable image kept in `shadow`.
pub fn power_cut(root: &Path, shadow: &Path) -> io::Result<Cut> {
    let mut cut = Cut::default();
    let mut real = Vec::new();
    let mut durable = Vec::new();
    list_files(root, Path::new(""), &mut real)?;
    list_files(shadow, Path::new(""), &mut durable)?;
    real.sort();
    durable.sort();
    let mut paths: Vec<&PathBuf> = real.iter().chain(durable.iter()).collect();
    paths.sort();
    paths.dedup();
    for rel in paths {
        let before = read_if_file(&root.join(rel))?;
        let after = read_if_file(&shadow.join(rel))?;
        let bytes = match (&before, &after) {
            (Some(a), Some(b)) => diff(a, b),
            (Some(a), None) => a.len() as u64,
            (None, Some(b)) => b.len() as u64,
            (None, None) => 0,
        };
        if bytes > 0 || before.is_none() != after.is_none() {
            cut.files_reverted += 1;
            cut.bytes_reverted += bytes;
            cut.files.push(Reverted {
                path: rel.clone(),
                before: before.map(|b| b.len() as u64),
                after: after.map(|b| b.len() as u64),
                bytes,
            });
        }
    }
    remove(root)?;
    copy_tree(shadow, root)?;
    Ok(cut)
}

/// The shim's counters, kept in the file given with [`stats_env`] (rewritten at every sync of a
/// tracked file, and at every call the disk-full mode refuses or cuts short).
#[derive(Debug, Clone, Copy, Default)]
pub struct ShimStats {
    /// Tracked files opened.
    pub opens: u64,
    /// Writes to tracked files.
    pub writes: u64,
    /// Bytes written to tracked files.
    pub write_bytes: u64,
    /// `fsync`/`fdatasync` calls on tracked files.
    pub syncs: u64,
    /// Bytes those syncs made durable.
    pub synced_bytes: u64,
    /// `sync_file_range` calls on tracked files (no durability).
    pub sync_file_ranges: u64,
    /// Renames, unlinks and mkdirs mirrored.
    pub dir_ops: u64,
    /// Internal errors of the shim.
    pub errors: u64,
    /// Disk-full mode: calls failed with `ENOSPC`.
    pub enospc: u64,
    /// Disk-full mode: writes cut short at the limit.
    pub short_writes: u64,
    /// Disk-full mode: syncs failed with `EIO`.
    pub eio: u64,
    /// Persistence points, per kind.
    pub points: Points,
}

/// Reads the shim's counters; all zero if the file is missing (no sync happened).
pub fn read_stats(path: &Path) -> ShimStats {
    let mut s = ShimStats::default();
    let Ok(text) = std::fs::read_to_string(path) else {
        return s;
    };
    s.points = Points::parse(&text);
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v: u64 = v.trim().parse().unwrap_or(0);
        match k {
            "opens" => s.opens = v,
            "writes" => s.writes = v,
            "write_bytes" => s.write_bytes = v,
            "syncs" => s.syncs = v,
            "synced_bytes" => s.synced_bytes = v,
            "sync_file_ranges" => s.sync_file_ranges = v,
            "dir_ops" => s.dir_ops = v,
            "errors" => s.errors = v,
            "enospc" => s.enospc = v,
            "short_writes" => s.short_writes = v,
            "eio" => s.eio = v,
            _ => {}
        }
    }
    s
}

fn diff(a: &[u8], b: &[u8]) -> u64 {
    let common = a.len().min(b.len());
    let differing = a[..common]
        .iter()
        .zip(&b[..common])
        .filter(|(x, y)| x != y)
        .count();
    (differing + a.len().max(b.len()) - common) as u64
}

fn read_if_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => std::fs::read(path).map(Some),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn list_files(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = match std::fs::read_dir(base.join(rel)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(base, &child, out)?;
        } else if kind.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}
