//! The power-cut shim itself: a probe process does scripted file operations under the shim and
//! is killed with SIGKILL; after the power cut, what was synced is there and nothing else is.
//! And its disk-full mode: writes past a space limit are cut short, then fail with `ENOSPC`;
//! `eio` fails syncs.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gateway_tests::powercut::{self, Cut, Points, ShimStats};

struct Rig {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    /// The root as the shim is told it (`root` unless a test spells it otherwise).
    shim_root: PathBuf,
    shadow: PathBuf,
    stats: PathBuf,
    /// The disk-full mode's control file, when the mode is on.
    space: Option<PathBuf>,
}

impl Rig {
    /// `None` where the shim is not built (not Linux).
    fn new() -> Option<Rig> {
        if powercut::shim().is_none() {
            eprintln!("skipped: no power-cut shim on this platform");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let rig = Rig {
            root: base.join("root"),
            shim_root: base.join("root"),
            shadow: base.join("shadow"),
            stats: base.join("stats"),
            space: None,
            base,
            _dir: dir,
        };
        std::fs::create_dir_all(&rig.root).unwrap();
        Some(rig)
    }

    /// A rig whose probe runs with the disk-full mode on (`%` in a script stands for its control
    /// file, absent at first).
    fn with_space() -> Option<Rig> {
        let mut rig = Rig::new()?;
        rig.space = Some(rig.base.join("space"));
        Some(rig)
    }

    fn control(&self) -> &Path {
        self.space
            .as_deref()
            .expect("a rig with the disk-full mode")
    }

    /// Puts a file in place before the probe starts (durable: `prepare` copies it).
    fn put(&self, rel: &str, content: &[u8]) {
        let path = self.root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    /// Runs the probe with the operations in `script` (words; `@` stands for the root) under
    /// the shim, kills it once it is done, cuts the power.
    fn run(&self, script: &str) -> Cut {
        self.run_in(&self.base, script).0
    }

    /// [`Rig::run`], returning the result lines of the tried operations.
    fn try_run(&self, script: &str) -> Vec<String> {
        self.run_in(&self.base, script).1
    }

    fn run_in(&self, cwd: &Path, script: &str) -> (Cut, Vec<String>) {
        let (cut, lines, ready) = self.run_env(cwd, script, &[]);
        assert!(ready, "the probe failed before it was done");
        (cut, lines)
    }

    /// Runs the probe with extra environment (a cut, the strict mode); returns what the cut
    /// reverted, the probe's lines and whether it got to the end of its script (it did not if
    /// it was cut).
    fn run_env(
        &self,
        cwd: &Path,
        script: &str,
        envs: &[(&'static str, OsString)],
    ) -> (Cut, Vec<String>, bool) {
        powercut::prepare(&self.root, &self.shadow).unwrap();
        let root = self.root.display().to_string();
        let control = self
            .space
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_powercut-probe"));
        cmd.args(
            script
                .split_whitespace()
                .map(|w| w.replace('@', &root).replace('%', &control)),
        )
        .envs(powercut::env(&self.shim_root, &self.shadow))
        .envs([powercut::stats_env(&self.stats)])
        .envs(envs.iter().cloned())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(space) = &self.space {
            cmd.envs([powercut::space_env(space)]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = Vec::new();
        let mut ready = false;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if line.trim() == "ready" {
                ready = true;
                break;
            }
            lines.push(line);
        }
        // A probe that was cut is dead already.
        let _ = child.kill();
        child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        eprint!("{stderr}");
        // The shim complains when it had to guess (a length changed with no write seen) or failed.
        assert!(!stderr.contains("powercut:"), "the shim complained");
        let cut = powercut::power_cut(&self.root, &self.shadow).unwrap();
        eprintln!("power cut: {cut}");
        (cut, lines, ready)
    }

    fn read(&self, rel: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join(rel)).ok()
    }

    fn stats(&self) -> ShimStats {
        powercut::read_stats(&self.stats)
    }
}

#[test]
fn synced_writes_survive_and_unsynced_writes_are_reverted() {
    let Some(rig) = Rig::new() else { return };
    rig.put("old", b"0123456789");
    let cut = rig.run(
        "open a @/new   write a 0 durable   fsync a   write a 0 X   write a 7 -and-lost
         open b @/old   write b 2 zz",
    );
    assert_eq!(rig.read("new").unwrap(), b"durable");
    assert_eq!(rig.read("old").unwrap(), b"0123456789");
    // "X" over "d", "-and-lost" past the end, "zz" over "23".
    assert_eq!(cut.bytes_reverted, 1 + 9 + 2, "{cut}");
    assert_eq!(cut.files_reverted, 2, "{cut}");
    // The counters as of the last sync.
    let s = rig.stats();
    assert_eq!((s.opens, s.writes, s.syncs), (1, 1, 1), "{s:?}");
    assert_eq!(s.synced_bytes, 7, "{s:?}");
}

#[test]
fn a_new_file_never_synced_is_empty_after_the_cut() {
    let Some(rig) = Rig::new() else { return };
    let cut = rig.run(
        "open a @/fresh   write a 0 never-synced
         mkdir @/sub   create b @/sub/made   seq b neither   close b
         open c @/sub/synced   write c 0 synced   fdatasync c",
    );
    assert_eq!(rig.read("fresh").unwrap(), b"", "exists, but empty");
    assert_eq!(rig.read("sub/made").unwrap(), b"", "exists, but empty");
    assert_eq!(rig.read("sub/synced").unwrap(), b"synced");
    assert_eq!(cut.files_reverted, 2, "{cut}");
}

#[test]
fn length_changes_without_a_sync_are_reverted() {
    let Some(rig) = Rig::new() else { return };
    rig.put("shrunk", &[b'a'; 100]);
    rig.put("grown", &[b'b'; 10]);
    rig.put("synced", &[b'c'; 100]);
    rig.put("zeroed", &[b'd'; 100]);
    rig.put("truncated", b"old contents");
    rig.put("trunc-lost", b"old contents");
    // "zeroed" is shrunk to nothing and grown back, "truncated" is opened with O_TRUNC and
    // written past a hole: their durable images hold zeros, not the old bytes.
    rig.run(
        "open a @/shrunk   setlen a 10
         open b @/grown    setlen b 5000
         open c @/synced   setlen c 10   fsync c   setlen c 50
         open d @/zeroed   setlen d 0    setlen d 100   fsync d
         create e @/truncated   write e 5 x   fsync e
         create f @/trunc-lost   write f 0 new",
    );
    assert_eq!(rig.read("shrunk").unwrap(), [b'a'; 100]);
    assert_eq!(rig.read("grown").unwrap(), [b'b'; 10]);
    assert_eq!(rig.read("synced").unwrap(), [b'c'; 10]);
    assert_eq!(rig.read("zeroed").unwrap(), [0u8; 100]);
    assert_eq!(rig.read("truncated").unwrap(), b"\0\0\0\0\0x");
    assert_eq!(rig.read("trunc-lost").unwrap(), b"old contents");
}

#[test]
fn a_sync_through_a_second_fd_on_the_same_path_makes_the_file_durable() {
    let Some(rig) = Rig::new() else { return };
    rig.put("db", b"old contents");
    rig.put("db2", b"old contents");
    // The gateway's pattern: sled writes through its fd, the gateway fsyncs another one.
    rig.run(
        "open w @/db    write w 0 new    read r @/db    fsync r   write w 3 !!!
         open v @/db2   write v 0 NEW    read q @/db2   fdatasync q",
    );
    assert_eq!(rig.read("db").unwrap(), b"new contents");
    assert_eq!(rig.read("db2").unwrap(), b"NEW contents");
}

#[test]
fn a_sync_through_a_dup_makes_the_file_durable() {
    let Some(rig) = Rig::new() else { return };
    for name in ["dup", "dup2", "clone"] {
        rig.put(name, b"old data");
    }
    rig.run(
        "open a @/dup     write a 0 new   dup a2 a     fsync a2   close a   write a2 3 !!!!!
         open b @/dup2    write b 0 new   dup2 b2 b    fsync b2
         open c @/clone   write c 0 new   clone c2 c   fsync c2   write c2 0 NEW",
    );
    assert_eq!(rig.read("dup").unwrap(), b"new data");
    assert_eq!(rig.read("dup2").unwrap(), b"new data");
    assert_eq!(rig.read("clone").unwrap(), b"new data");
}

#[test]
fn writes_before_a_close_are_made_durable_by_a_later_sync() {
    let Some(rig) = Rig::new() else { return };
    rig.put("f", b"old contents");
    rig.run("open a @/f   write a 0 new   close a   read b @/f   fsync b");
    assert_eq!(rig.read("f").unwrap(), b"new contents");
}

#[test]
fn sequential_and_append_writes_are_tracked() {
    let Some(rig) = Rig::new() else { return };
    rig.put("log", b"old|");
    rig.put("seq", b"_________");
    // pwrite on an O_APPEND fd appends on Linux, whatever the offset.
    rig.run(
        "append a @/log   seq a one|   fsync a   seq a two|
         open b @/seq     seq b abc   seq b def   fsync b   seq b ghi
         append c @/log2  write c 0 first   write c 0 second   fsync c",
    );
    assert_eq!(rig.read("log").unwrap(), b"old|one|");
    assert_eq!(rig.read("seq").unwrap(), b"abcdef___");
    assert_eq!(rig.read("log2").unwrap(), b"firstsecond");
}

#[test]
fn renames_unlinks_and_directories_are_kept() {
    let Some(rig) = Rig::new() else { return };
    rig.put("state", b"v1");
    rig.put("state2", b"old");
    rig.put("doomed", b"x");
    rig.put("tree/a/b", b"y");
    rig.run(
        // A temporary file written, synced and renamed over the old one.
        "create t @/state.tmp   seq t v2   fsync t   close t   rename @/state.tmp @/state
         create u @/state2.tmp  seq u unsynced   close u     rename @/state2.tmp @/state2
         mkdir @/d   open f @/d/x   write f 0 moved   rename @/d @/e   fsync f
         unlink @/doomed   rmtree @/tree   mkdir @/empty   mkdir @/gone   rmdir @/gone",
    );
    assert_eq!(rig.read("state").unwrap(), b"v2");
    // The rename holds, the content never synced does not.
    assert_eq!(rig.read("state2").unwrap(), b"");
    assert!(!rig.root.join("state.tmp").exists());
    assert!(!rig.root.join("state2.tmp").exists());
    // A directory renamed under an open file: the sync after it lands at the new name.
    assert_eq!(rig.read("e/x").unwrap(), b"moved");
    assert!(!rig.root.join("d").exists());
    assert!(!rig.root.join("doomed").exists());
    assert!(!rig.root.join("tree").exists());
    assert!(rig.root.join("empty").is_dir());
    assert!(!rig.root.join("gone").exists());
}

#[test]
fn relative_paths_are_tracked() {
    let Some(rig) = Rig::new() else { return };
    rig.run_in(
        &rig.root,
        "open a rel   write a 0 synced   fsync a   write a 6 +not
         open b ../root/./dotted   write b 0 lost",
    );
    assert_eq!(rig.read("rel").unwrap(), b"synced");
    assert_eq!(rig.read("dotted").unwrap(), b"");
}

#[test]
fn files_outside_the_root_are_not_tracked() {
    let Some(rig) = Rig::new() else { return };
    rig.run(
        "open o @/../outside   write o 0 not-tracked   fsync o
         open a @/inside       write a 0 tracked       fsync a",
    );
    assert_eq!(
        std::fs::read(rig.base.join("outside")).unwrap(),
        b"not-tracked"
    );
    assert!(!rig.shadow.join("outside").exists());
    let s = rig.stats();
    assert_eq!((s.opens, s.writes, s.syncs), (1, 1, 1), "{s:?}");
}

#[test]
fn a_sync_copies_only_the_dirty_ranges_of_a_large_file() {
    let Some(rig) = Rig::new() else { return };
    rig.put("big", &vec![7u8; 4 << 20]);
    rig.run("open a @/big   write a 2097152 0123456789   fsync a   write a 3145728 lost");
    let big = rig.read("big").unwrap();
    assert_eq!(big.len(), 4 << 20);
    assert_eq!(&big[(2 << 20)..(2 << 20) + 10], b"0123456789");
    assert_eq!(&big[(3 << 20)..(3 << 20) + 4], [7u8; 4]);
    assert_eq!(rig.stats().synced_bytes, 10);
}

#[test]
fn a_root_given_through_a_symlink_is_tracked_under_either_spelling() {
    let Some(mut rig) = Rig::new() else { return };
    let link = rig.base.join("link");
    std::os::unix::fs::symlink(&rig.root, &link).unwrap();
    rig.shim_root = link.clone();
    rig.run(&format!(
        "open a {l}/by-link   write a 0 synced   fsync a   write a 6 +lost
         open b {r}/by-real   write b 0 synced   fsync b   write b 6 +lost
         open c {l}/unsynced  write c 0 lost",
        l = link.display(),
        r = rig.root.display()
    ));
    assert_eq!(rig.read("by-link").unwrap(), b"synced");
    assert_eq!(rig.read("by-real").unwrap(), b"synced");
    assert_eq!(rig.read("unsynced").unwrap(), b"");
}

// ---------------------------------------------------------------------------------------------
// Disk-full mode

/// `n` bytes of `c`, as one script word.
fn word(c: char, n: usize) -> String {
    std::iter::repeat_n(c, n).collect()
}

#[test]
fn a_write_past_the_space_limit_is_cut_short_then_fails_with_enospc() {
    let Some(rig) = Rig::with_space() else { return };
    rig.put("old", &[b'o'; 100]);
    powercut::limit_space(rig.control(), 150).unwrap();
    let out = rig.try_run(&format!(
        // 40 bytes fit, then 10 of 20, then none; overwriting inside the file takes no space.
        "open a @/f   twrite a 0 {a40}   twrite a 40 {b20}   twrite a 50 x   twrite a 0 OVER
         tseq a abc   tfill a 48 4 33   fsync a",
        a40 = word('a', 40),
        b20 = word('b', 20),
    ));
    assert_eq!(
        out,
        [
            "twrite 40",
            "twrite 10",
            "twrite errno 28",
            "twrite 4",
            "tseq 3",
            "tfill 2 errno 28"
        ]
    );
    let f = rig.read("f").unwrap();
    assert_eq!(f.len(), 50, "the file stops at the limit");
    assert_eq!(&f[..4], b"abcR");
    assert_eq!(&f[40..], b"bbbbbbbb!!");
    assert_eq!(rig.read("old").unwrap(), [b'o'; 100]);
    let s = rig.stats();
    assert_eq!((s.enospc, s.short_writes), (2, 2), "{s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
}

#[test]
fn vectored_and_appending_writes_stop_at_the_limit_too() {
    let Some(rig) = Rig::with_space() else { return };
    powercut::limit_space(rig.control(), 10).unwrap();
    let out = rig.try_run(
        "append a @/log   tappendv a 123456 789ABC   tappendv a x y   fsync a
         open b @/v   twritev b 0 ab cd   twritev b 0 {} {}",
    );
    assert_eq!(
        out,
        [
            "tappendv 10",
            "tappendv errno 28",
            "twritev errno 28",
            "twritev errno 28"
        ]
    );
    assert_eq!(rig.read("log").unwrap(), b"123456789A");
    assert_eq!(rig.read("v").unwrap(), b"");
}

#[test]
fn growing_a_file_by_setlen_or_fallocate_fails_whole_at_the_limit() {
    let Some(rig) = Rig::with_space() else { return };
    powercut::limit_space(rig.control(), 100).unwrap();
    let out = rig.try_run(
        "open a @/f   tsetlen a 101   tsetlen a 100   tsetlen a 40   tfallocate a 0 120
         tfallocate a 0 100   twrite a 100 x   twrite a 99 yz   fsync a",
    );
    assert_eq!(
        out,
        [
            "tsetlen errno 28",
            "tsetlen ok",
            "tsetlen ok",
            "tfallocate errno 28",
            "tfallocate ok",
            "twrite errno 28",
            "twrite 1"
        ]
    );
    let f = rig.read("f").unwrap();
    assert_eq!(f.len(), 100);
    assert_eq!(f[99], b'y');
}

#[test]
fn deleting_or_truncating_files_gives_their_space_back() {
    let Some(rig) = Rig::with_space() else { return };
    rig.put("big", &[1; 60]);
    rig.put("other", &[2; 40]);
    powercut::limit_space(rig.control(), 100).unwrap();
    let out = rig.try_run(&format!(
        // Full: nothing fits. The unlink frees 60 bytes, of which 5 and then 55 of 60 are
        // taken; opening `other` with O_TRUNC frees its 40.
        "open a @/new   twrite a 0 x   unlink @/big   twrite a 0 hello   twrite a 5 {c60}
         create c @/other   twrite a 60 {d40}   twrite a 100 e   fsync a",
        c60 = word('c', 60),
        d40 = word('d', 40),
    ));
    assert_eq!(
        out,
        [
            "twrite errno 28",
            "twrite 5",
            "twrite 55",
            "twrite 40",
            "twrite errno 28"
        ]
    );
    assert_eq!(rig.read("new").unwrap().len(), 100);
}

#[test]
fn the_control_file_is_read_again_while_the_process_runs() {
    let Some(rig) = Rig::with_space() else { return };
    // No control file: no limit. Each change is seen by the first call at least 50 ms after
    // the previous read.
    let out = rig.try_run(
        "open a @/f   twrite a 0 hello
         put % 5   sleep 60   twrite a 5 more
         put % 1000   sleep 60   twrite a 5 more
         unlink %   sleep 60   tfill a 9 3000 7   fsync a",
    );
    assert_eq!(
        out,
        ["twrite 5", "twrite errno 28", "twrite 4", "tfill 3000"]
    );
    assert_eq!(rig.read("f").unwrap().len(), 3009);
}

#[test]
fn eio_fails_fsync_and_fdatasync_and_makes_nothing_durable_until_a_sync_succeeds() {
    let Some(rig) = Rig::with_space() else { return };
    rig.put("kept", b"old");
    powercut::fail_syncs(rig.control()).unwrap();
    // Writes still work; the syncs fail and make nothing durable. Once the errors stop, a sync
    // makes what was written before them durable.
    let out = rig.try_run(
        "open a @/late    twrite a 0 data   tfsync a   tfdatasync a
         open b @/never   twrite b 0 lost   tfsync b
         open c @/kept    twrite c 0 new    tfdatasync c
         unlink %   sleep 60   tfsync a",
    );
    assert_eq!(
        out,
        [
            "twrite 4",
            "tfsync errno 5",
            "tfdatasync errno 5",
            "twrite 4",
            "tfsync errno 5",
            "twrite 3",
            "tfdatasync errno 5",
            "tfsync ok"
        ]
    );
    assert_eq!(rig.read("late").unwrap(), b"data");
    assert_eq!(rig.read("never").unwrap(), b"");
    assert_eq!(rig.read("kept").unwrap(), b"old");
    let s = rig.stats();
    assert_eq!(s.eio, 4, "{s:?}");
    assert_eq!(s.syncs, 1, "only the last sync happened: {s:?}");
}

#[test]
fn a_space_file_that_is_absent_limits_nothing() {
    let Some(rig) = Rig::with_space() else { return };
    let out = rig.try_run("open a @/f   tfill a 0 1048576 9   tsetlen a 2097152   tfsync a");
    assert_eq!(out, ["tfill 1048576", "tsetlen ok", "tfsync ok"]);
    assert_eq!(rig.read("f").unwrap().len(), 2 << 20);
    let s = rig.stats();
    assert_eq!((s.enospc, s.short_writes, s.eio), (0, 0, 0), "{s:?}");
}

/// One call of each kind, each followed by a mark: `(kind, n)` of the call before each mark.
const EVERY_KIND: &[(&str, &str, u64)] = &[
    ("open a @/f", "create", 1),
    ("write a 0 one", "write", 1),
    ("fsync a", "fsync", 1),
    ("seq a two", "write", 2),
    ("sfr a", "sync_file_range", 1),
    ("setlen a 2", "truncate", 1),
    ("mkdir @/d", "create", 2),
    ("dirsync @/d", "dirsync", 1),
    ("rename @/f @/g", "rename", 1),
    ("unlink @/g", "unlink", 1),
    ("fdatasync a", "fsync", 2),
];

fn every_kind_script() -> String {
    EVERY_KIND
        .iter()
        .enumerate()
        .map(|(i, (op, _, _))| format!("{op} mark {i} "))
        .collect()
}

#[test]
fn every_persistence_call_is_counted_by_kind() {
    let Some(rig) = Rig::new() else { return };
    let points = rig.base.join("points");
    let (_, _, ready) = rig.run_env(
        &rig.base,
        &every_kind_script(),
        &[powercut::points_env(&points)],
    );
    assert!(ready);
    let mut want = Points::default();
    for (_, kind, _) in EVERY_KIND {
        let i = powercut::KINDS.iter().position(|k| k == kind).unwrap();
        want.0[i] += 1;
    }
    assert_eq!(powercut::read_points(&points), want);
    // The stats file carries them too (rewritten at the last sync).
    assert_eq!(rig.stats().points, want);
    assert_eq!(want.total(), EVERY_KIND.len() as u64);
}

#[test]
fn a_cut_at_the_nth_call_of_a_kind_comes_before_that_call() {
    let Some(rig) = Rig::new() else { return };
    for (at, (_, kind, n)) in EVERY_KIND.iter().enumerate() {
        std::fs::remove_dir_all(&rig.root).unwrap();
        std::fs::create_dir_all(&rig.root).unwrap();
        let (_, lines, ready) = rig.run_env(
            &rig.base,
            &every_kind_script(),
            &[powercut::cut_at_env(kind, *n)],
        );
        assert!(!ready, "cut at {kind}:{n}: the probe got to its end");
        // Every call before it returned, this one never did.
        let marks: Vec<String> = (0..at).map(|i| format!("mark {i}")).collect();
        assert_eq!(lines, marks, "cut at {kind}:{n}");
        // What the call would have done is not there.
        match at {
            0 => assert!(rig.read("f").is_none()),
            2 => assert_eq!(rig.read("f").unwrap(), b"", "not synced"),
            3..=5 => assert_eq!(rig.read("f").unwrap(), b"one"),
            6 => assert!(!rig.root.join("d").exists()),
            8 => assert!(rig.read("f").is_some() && rig.read("g").is_none()),
            9 => assert!(rig.read("g").is_some()),
            // The file was unlinked: its last sync lands nowhere.
            10 => assert!(rig.read("f").is_none() && rig.read("g").is_none()),
            _ => {}
        }
    }
}

#[test]
fn a_length_grown_and_synced_only_by_sync_file_range_is_reverted() {
    let Some(rig) = Rig::new() else { return };
    rig.put("f", b"abc");
    rig.put("g", b"abc");
    let cut = rig.run("open a @/f   write a 3 defgh   sfr a   open b @/g   write b 0 X   sfr b");
    assert_eq!(rig.read("f").unwrap(), b"abc");
    assert_eq!(rig.read("g").unwrap(), b"abc");
    assert_eq!(cut.bytes_reverted, 5 + 1, "{cut}");
}

/// Strict mode: an entry is durable only once its directory is fsynced.
fn strict(rig: &Rig, script: &str) -> Cut {
    let (cut, _, ready) = rig.run_env(&rig.base, script, &[powercut::strict_dirs_env()]);
    assert!(ready, "the probe failed before it was done");
    cut
}

#[test]
fn strict_an_entry_without_a_directory_fsync_vanishes() {
    let Some(rig) = Rig::new() else { return };
    let made = "mkdir @/d   open a @/d/f   write a 0 x   fsync a
                open b @/top   write b 0 y   fsync b";
    // No directory synced: nothing new survives, synced content included.
    strict(&rig, made);
    assert!(!rig.root.join("d").exists());
    assert!(rig.read("top").is_none());
    // The root synced: its new entries are there, the one in `d` is not.
    std::fs::remove_dir_all(&rig.root).unwrap();
    std::fs::create_dir_all(&rig.root).unwrap();
    strict(&rig, &format!("{made}   dirsync @"));
    assert!(rig.root.join("d").is_dir());
    assert_eq!(rig.read("top").unwrap(), b"y");
    assert!(rig.read("d/f").is_none());
    // `d` synced before its own entry was durable: both come back.
    std::fs::remove_dir_all(&rig.root).unwrap();
    std::fs::create_dir_all(&rig.root).unwrap();
    strict(&rig, &format!("{made}   dirsync @/d   dirsync @"));
    assert_eq!(rig.read("d/f").unwrap(), b"x");
    // A file made durable by its directory but never synced is there, empty.
    std::fs::remove_dir_all(&rig.root).unwrap();
    std::fs::create_dir_all(&rig.root).unwrap();
    strict(&rig, "open a @/e   write a 0 lost   dirsync @");
    assert_eq!(rig.read("e").unwrap(), b"");
}

#[test]
fn strict_a_rename_or_unlink_without_a_directory_fsync_is_undone() {
    let Some(rig) = Rig::new() else { return };
    rig.put("state", b"v1");
    rig.put("doomed", b"x");
    rig.put("sub/moved", b"m");
    let script = "create t @/state.tmp   seq t v2   fsync t   close t
                  rename @/state.tmp @/state   unlink @/doomed   mkdir @/other
                  rename @/sub/moved @/other/moved";
    strict(&rig, script);
    assert_eq!(rig.read("state").unwrap(), b"v1");
    assert!(rig.read("state.tmp").is_none());
    assert_eq!(rig.read("doomed").unwrap(), b"x");
    assert_eq!(rig.read("sub/moved").unwrap(), b"m");
    assert!(!rig.root.join("other").exists());
    // With the directories synced, all of it holds.
    rig.put("state", b"v1");
    rig.put("doomed", b"x");
    rig.put("sub/moved", b"m");
    std::fs::remove_dir_all(rig.root.join("other")).ok();
    strict(
        &rig,
        &format!("{script}   dirsync @/other   dirsync @/sub   dirsync @"),
    );
    assert_eq!(rig.read("state").unwrap(), b"v2");
    assert!(rig.read("state.tmp").is_none());
    assert!(rig.read("doomed").is_none());
    assert!(rig.read("sub/moved").is_none());
    assert_eq!(rig.read("other/moved").unwrap(), b"m");
}

#[test]
fn strict_a_renamed_directory_keeps_its_durable_entries() {
    let Some(rig) = Rig::new() else { return };
    rig.put("gen-1/db", b"records");
    rig.put("gen-1/conf", b"c");
    // Without the parent's sync the rename is undone; with it, the directory moves whole.
    strict(&rig, "rename @/gen-1 @/quarantine-1");
    assert_eq!(rig.read("gen-1/db").unwrap(), b"records");
    assert!(!rig.root.join("quarantine-1").exists());
    strict(&rig, "rename @/gen-1 @/quarantine-1   dirsync @");
    assert_eq!(rig.read("quarantine-1/db").unwrap(), b"records");
    assert_eq!(rig.read("quarantine-1/conf").unwrap(), b"c");
    assert!(!rig.root.join("gen-1").exists());
}

#[test]
fn strict_a_rename_to_another_directory_is_durable_in_both_once_either_is_synced() {
    let Some(rig) = Rig::new() else { return };
    for synced in ["@/from", "@/to"] {
        rig.put("from/f", b"data");
        rig.put("to/keep", b"k");
        let _ = std::fs::remove_file(rig.root.join("to/f"));
        strict(&rig, &format!("rename @/from/f @/to/f   dirsync {synced}"));
        assert_eq!(rig.read("to/f").unwrap(), b"data", "synced {synced}");
        assert!(rig.read("from/f").is_none(), "synced {synced}");
    }
    // Neither synced: undone.
    rig.put("from/f", b"data");
    let _ = std::fs::remove_file(rig.root.join("to/f"));
    strict(&rig, "rename @/from/f @/to/f");
    assert_eq!(rig.read("from/f").unwrap(), b"data");
    assert!(rig.read("to/f").is_none());
}

#[test]
fn with_sfr_data_sync_file_range_makes_data_durable_but_not_a_length() {
    let Some(rig) = Rig::new() else { return };
    rig.put("f", b"abcdef");
    let (cut, _, ready) = rig.run_env(
        &rig.base,
        "open a @/f   write a 1 XY   write a 5 Zgrown   sfr a   write a 0 q",
        &[powercut::sfr_data_env()],
    );
    assert!(ready);
    // Within the old length: durable; past it (the length) and after the call: not.
    assert_eq!(rig.read("f").unwrap(), b"aXYdeZ");
    assert_eq!(cut.bytes_reverted, 5 + 1, "{cut}");
}
