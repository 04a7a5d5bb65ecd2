//! Every crash point of the disk buffer, enumerated the way ALICE and CrashMonkey enumerate crash
//! states: for each path (start-up, a commit, a delete after PUBACK, a generation rotation, a
//! drain), the path is run once under the power-cut shim to count its persistence points per
//! kind (only those inside the path's window), then once per point with the process cut just
//! before that point, the power cut applied, the buffer opened again and audited: it opens,
//! every record whose commit had returned before the cut is there with identical content, and
//! no `seq` comes back with other content.
//!
//! Each point is cut twice, once under each of two models of the shim, the two ends of what a
//! real file system may leave: the strict one (an entry created, renamed or removed is durable
//! only once its directory is fsynced: a new file without one vanishes; `sync_file_range` makes
//! nothing durable) and the eager one (entries durable at once, as a journal commit forced by
//! any other fsync makes them: a new file whose data was not synced is there, empty; and
//! `sync_file_range` makes the data it wrote out durable, within the durable length).
//!
//! Three more: a first start (no buffer directory yet) with its first commit and close; a
//! start-up that quarantines a generation it cannot open (its data must stay on disk through
//! every cut); and a start-up cut, then the start-up after it cut again (every point of the
//! first under both models in the long mode, `GATEWAY_LONG_TESTS=1`; a sample otherwise). All
//! but the last enumerate every point in both modes.
//!
//! The buffer is driven directly by a small child (`buffer-script`), without the gateway and a
//! broker, so that a cut costs a process start and two opens of the buffer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use gateway_tests::long_mode;
use gateway_tests::powercut::{self, Points, KINDS};

/// Rotation sizes: never, and at every commit.
const NEVER: &str = "1000000000";
const ALWAYS: &str = "1";

/// Damage to the setup's buffer directory, and the records it puts out of reach.
type Damage = (fn(&Path), (u64, u64));

/// One path through the buffer.
struct Scenario {
    name: &'static str,
    /// Run without the shim to make the directory the path starts from.
    setup: &'static [&'static str],
    /// Run under the shim, with the cut.
    run: &'static [&'static str],
    /// Index of the first operation of `run` whose persistence points are enumerated.
    window: usize,
    /// How many operations, from `window` on, are enumerated.
    span: usize,
    /// Records present after the setup (committed, not acknowledged).
    held: (u64, u64),
    /// Records the run acknowledges (they may or may not survive).
    acked: Option<(u64, u64)>,
    /// Damage done to the setup's directory (relative to the buffer) after the setup, and the
    /// records it puts out of reach (not counted as lost).
    damage: Option<Damage>,
    /// A file of the setup (relative to the buffer) that must still be somewhere under the
    /// directory after every cut, byte for byte (a quarantine never deletes).
    kept: Option<&'static str>,
}

fn script(words: &[&str]) -> Vec<String> {
    words
        .iter()
        .flat_map(|w| w.split_whitespace())
        .map(str::to_string)
        .collect()
}

/// Output lines of a `buffer-script` run, and whether it ended by itself with success.
struct Ran {
    lines: Vec<String>,
    exited_ok: bool,
    stderr: String,
}

fn buffer_script(dir: &Path, ops: &[String], envs: &[(&'static str, std::ffi::OsString)]) -> Ran {
    let mut child = Command::new(env!("CARGO_BIN_EXE_buffer-script"))
        .arg(dir)
        .args(ops)
        .envs(envs.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let out = child.wait_with_output().unwrap();
    Ran {
        lines,
        exited_ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The counts on the `points` lines: before the first operation, then after each.
fn points_lines(lines: &[String]) -> Vec<Points> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("points"))
        .map(|rest| Points::parse(&rest.split_whitespace().collect::<Vec<_>>().join("\n")))
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Every file under `dir` with its length, for a report.
fn listing(dir: &Path, rel: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir.join(rel)) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let child = rel.join(e.file_name());
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            out.push(format!("{}/", child.display()));
            listing(dir, &child, out);
        } else {
            out.push(format!("{} {}", child.display(), m.len()));
        }
    }
}

/// Whether a file under `dir` holds exactly `content`.
fn holds_file(dir: &Path, content: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => holds_file(&p, content),
            Ok(t) if t.is_file() => {
                std::fs::metadata(&p).is_ok_and(|m| m.len() == content.len() as u64)
                    && std::fs::read(&p).is_ok_and(|c| c == content)
            }
            _ => false,
        }
    })
}

/// What one cut found.
struct Outcome {
    point: (&'static str, u64),
    reverted_bytes: u64,
    problem: Option<String>,
    quarantined: bool,
}

struct Rig {
    _tmp: tempfile::TempDir,
    setup: PathBuf,
    root: PathBuf,
    shadow: PathBuf,
    points: PathBuf,
}

impl Rig {
    fn new(path: &Scenario) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let setup = base.join("setup");
        std::fs::create_dir_all(&setup).unwrap();
        let ran = buffer_script(&setup.join("buffer"), &script(path.setup), &[]);
        assert!(
            ran.exited_ok,
            "setup of {}: {:?} {}",
            path.name, ran.lines, ran.stderr
        );
        if let Some((damage, _)) = path.damage {
            damage(&setup.join("buffer"));
        }
        Rig {
            _tmp: tmp,
            setup,
            root: base.join("root"),
            shadow: base.join("shadow"),
            points: base.join("points"),
        }
    }

    /// A rig whose setup is a copy of `dir` (what an earlier cut left).
    fn from_dir(dir: &Path) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let setup = base.join("setup");
        copy_tree(dir, &setup);
        Rig {
            _tmp: tmp,
            setup,
            root: base.join("root"),
            shadow: base.join("shadow"),
            points: base.join("points"),
        }
    }

    /// Runs the path under the shim (cut at `cut`, if given) from the setup's directory.
    fn run(&self, path: &Scenario, cut: Option<(&'static str, u64)>, strict: bool) -> Ran {
        let _ = std::fs::remove_dir_all(&self.root);
        copy_tree(&self.setup, &self.root);
        powercut::prepare(&self.root, &self.shadow).unwrap();
        let _ = std::fs::remove_file(&self.points);
        let mut envs: Vec<(&'static str, std::ffi::OsString)> =
            powercut::env(&self.root, &self.shadow)
                .into_iter()
                .collect();
        if strict {
            envs.push(powercut::strict_dirs_env());
        } else {
            envs.push(powercut::sfr_data_env());
        }
        envs.push(powercut::points_env(&self.points));
        if let Some((kind, n)) = cut {
            envs.push(powercut::cut_at_env(kind, n));
        }
        buffer_script(&self.root.join("buffer"), &script(path.run), &envs)
    }

    /// The persistence points inside the window, by kind: `(kind, first..=last)`.
    fn window(&self, path: &Scenario) -> Vec<(&'static str, u64, u64)> {
        let ran = self.run(path, None, true);
        assert!(
            ran.exited_ok,
            "{}: {:?} {}",
            path.name, ran.lines, ran.stderr
        );
        let p = points_lines(&ran.lines);
        assert_eq!(p.len(), path.run_ops() + 1, "{:?}", ran.lines);
        let (before, after) = (p[path.window], p[path.window + path.span]);
        KINDS
            .iter()
            .filter(|k| after.get(k) > before.get(k))
            .map(|k| (*k, before.get(k) + 1, after.get(k)))
            .collect()
    }

    fn cut_at(&self, path: &Scenario, kind: &'static str, n: u64, strict: bool) -> Outcome {
        let ran = self.run(path, Some((kind, n)), strict);
        let cut = powercut::power_cut(&self.root, &self.shadow).unwrap();
        let mut files = Vec::new();
        listing(&self.root, Path::new(""), &mut files);
        // Records whose commit returned before the cut.
        let (lo, hi) = path.held;
        let mut must: Vec<u64> = (lo..=hi).collect();
        if let Some((a, b)) = path.acked {
            must.retain(|s| !(a..=b).contains(s));
        }
        if let Some((_, (a, b))) = path.damage {
            must.retain(|s| !(a..=b).contains(s));
        }
        for l in &ran.lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            if let ["done", "commit", a, b] = w[..] {
                must.extend(a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap());
            }
        }
        let audit = buffer_script(
            &self.root.join("buffer"),
            &script(&["open", NEVER, NEVER, "audit"]),
            &[],
        );
        let quarantined = audit
            .lines
            .iter()
            .any(|l| l.starts_with("opened") && !l.contains("quarantined=0"));
        let mut problem = None;
        let mut found: BTreeMap<u64, usize> = BTreeMap::new();
        for l in &audit.lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            if let ["record", seq, verdict] = w[..] {
                let seq: u64 = seq.parse().unwrap();
                *found.entry(seq).or_default() += 1;
                if verdict != "same" {
                    problem = Some(format!("record {seq} came back with other content"));
                }
            }
        }
        if !audit.exited_ok || !audit.lines.iter().any(|l| l == "done audit") {
            problem = Some("the buffer did not open (or could not be read)".to_string());
        }
        if let Some(rel) = path.kept {
            let want = std::fs::read(self.setup.join("buffer").join(rel)).unwrap();
            if !holds_file(&self.root, &want) {
                problem = Some(format!(
                    "{rel} of the setup is gone (deleted, not set aside)"
                ));
            }
        }
        let lost: Vec<u64> = must
            .iter()
            .copied()
            .filter(|s| !found.contains_key(s))
            .collect();
        if !lost.is_empty() && problem.is_none() {
            problem = Some(format!(
                "lost {} committed records ({}..={})",
                lost.len(),
                lost[0],
                lost[lost.len() - 1]
            ));
        }
        let problem = problem.map(|p| {
            format!(
                "cut at {kind}:{n} on {} ({} directories): {p}\n  the run said: {:?}\n  the cut: {cut}\n  \
                 the directory after the cut: {files:?}\n  the audit said: {:?}\n  its log: {}",
                path.name,
                if strict { "strict" } else { "eager" },
                ran.lines
                    .iter()
                    .filter(|l| !l.starts_with("points"))
                    .collect::<Vec<_>>(),
                audit
                    .lines
                    .iter()
                    .filter(|l| !l.starts_with("record"))
                    .collect::<Vec<_>>(),
                audit.stderr.trim()
            )
        });
        Outcome {
            point: (kind, n),
            reverted_bytes: cut.bytes_reverted,
            problem,
            quarantined,
        }
    }
}

impl Scenario {
    fn run_ops(&self) -> usize {
        let words = script(self.run);
        words
            .iter()
            .filter(|w| matches!(w.as_str(), "open" | "commit" | "ack" | "close" | "audit"))
            .count()
    }
}

/// Every point of a window, one by one.
fn points_of(window: &[(&'static str, u64, u64)]) -> Vec<(&'static str, u64)> {
    window
        .iter()
        .flat_map(|&(kind, first, last)| (first..=last).map(move |n| (kind, n)))
        .collect()
}

/// Enumerates every crash point of `path`, prints what each found, fails on any problem.
fn enumerate(path: &Scenario) {
    if powercut::shim().is_none() {
        eprintln!("skipped: no power-cut shim on this platform");
        return;
    }
    let started = Instant::now();
    let rig = Rig::new(path);
    let window = rig.window(path);
    let total: u64 = window.iter().map(|(_, a, b)| b - a + 1).sum();
    assert!(
        total > 0,
        "{}: no persistence point in the window",
        path.name
    );
    let mut outcomes = Vec::new();
    for &(kind, first, last) in &window {
        for n in first..=last {
            for strict in [true, false] {
                outcomes.push(rig.cut_at(path, kind, n, strict));
            }
        }
    }
    let per_kind: Vec<String> = window
        .iter()
        .map(|(k, a, b)| format!("{k} {}", b - a + 1))
        .collect();
    let reverting = outcomes.iter().filter(|o| o.reverted_bytes > 0).count();
    let quarantines: Vec<String> = outcomes
        .iter()
        .filter(|o| o.quarantined)
        .map(|o| format!("{}:{}", o.point.0, o.point.1))
        .collect();
    let problems: Vec<&String> = outcomes.iter().filter_map(|o| o.problem.as_ref()).collect();
    println!(
        "crash points of {}: {total} ({}), each cut under both directory models: {reverting} of {} \
         cuts reverted something, {} bytes in all; {} cuts left a generation quarantined; {} \
         problems; {:.1} s",
        path.name,
        per_kind.join(", "),
        outcomes.len(),
        outcomes.iter().map(|o| o.reverted_bytes).sum::<u64>(),
        quarantines.len(),
        problems.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "{} of {total} crash points of {} lose or damage committed records:\n{}",
        problems.len(),
        path.name,
        problems
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn every_crash_point_of_a_start_up() {
    enumerate(&Scenario {
        name: "start-up (two generations with records)",
        setup: &["open", ALWAYS, NEVER, "commit 1 40 commit 41 80 close"],
        run: &["open", NEVER, NEVER, "close"],
        window: 0,
        span: 1,
        held: (1, 80),
        acked: None,
        damage: None,
        kept: None,
    });
}

#[test]
fn every_crash_point_of_a_commit() {
    enumerate(&Scenario {
        name: "commit",
        setup: &["open", NEVER, NEVER, "commit 1 40 close"],
        run: &["open", NEVER, NEVER, "commit 41 100 close"],
        window: 1,
        span: 1,
        held: (1, 40),
        acked: None,
        damage: None,
        kept: None,
    });
}

#[test]
fn every_crash_point_of_a_delete_after_puback() {
    enumerate(&Scenario {
        name: "delete after PUBACK",
        setup: &[
            "open",
            NEVER,
            NEVER,
            "commit 1 20 commit 21 40 commit 41 60 close",
        ],
        run: &["open", NEVER, NEVER, "ack 1 40 close"],
        window: 1,
        span: 1,
        held: (1, 60),
        acked: Some((1, 40)),
        damage: None,
        kept: None,
    });
}

#[test]
fn every_crash_point_of_a_rotation() {
    enumerate(&Scenario {
        name: "generation rotation",
        setup: &["open", NEVER, NEVER, "commit 1 20 close"],
        run: &["open", ALWAYS, NEVER, "commit 21 40 close"],
        window: 1,
        span: 1,
        held: (1, 20),
        acked: None,
        damage: None,
        kept: None,
    });
}

#[test]
fn every_crash_point_of_a_drain() {
    enumerate(&Scenario {
        name: "drain (last records of a generation acknowledged, the generation deleted)",
        setup: &["open", ALWAYS, NEVER, "commit 1 40 commit 41 80 close"],
        run: &["open", ALWAYS, NEVER, "ack 1 40 close"],
        window: 1,
        span: 1,
        held: (1, 80),
        acked: Some((1, 40)),
        damage: None,
        kept: None,
    });
}

/// Makes the oldest generation unopenable: its configuration file is garbage.
fn garble_gen_1(buffer: &Path) {
    std::fs::write(buffer.join("gen-1").join("conf"), "garbage, not a config").unwrap();
}

#[test]
fn every_crash_point_of_a_start_up_that_quarantines() {
    enumerate(&Scenario {
        name: "start-up quarantining an unopenable generation",
        setup: &["open", ALWAYS, NEVER, "commit 1 40 commit 41 80 close"],
        run: &["open", NEVER, NEVER, "close"],
        window: 0,
        span: 1,
        held: (1, 80),
        acked: None,
        damage: Some((garble_gen_1, (1, 40))),
        kept: Some("gen-1/db"),
    });
}

/// A start-up cut, and the start-up after it cut again: the recovery of a cut recovery. Every
/// point of the first start-up under both models (in the default mode every third, models
/// alternating), and for each, points of the second spread over its window (one in eight, in
/// turn; in the default mode one).
#[test]
fn crash_points_of_a_start_up_after_a_cut_start_up() {
    if powercut::shim().is_none() {
        eprintln!("skipped: no power-cut shim on this platform");
        return;
    }
    let started = Instant::now();
    let path = Scenario {
        name: "start-up after a cut start-up",
        setup: &["open", ALWAYS, NEVER, "commit 1 40 commit 41 80 close"],
        run: &["open", NEVER, NEVER, "close"],
        window: 0,
        span: 1,
        held: (1, 80),
        acked: None,
        damage: None,
        kept: None,
    };
    let first = Rig::new(&path);
    let firsts = points_of(&first.window(&path));
    let long = long_mode();
    let mut runs = 0;
    let mut problems = Vec::new();
    for (i, &(kind, n)) in firsts.iter().enumerate() {
        let models: &[bool] = if long {
            &[true, false]
        } else if i % 3 == 0 {
            if i % 2 == 0 {
                &[true]
            } else {
                &[false]
            }
        } else {
            &[]
        };
        for &strict in models {
            let a = first.cut_at(&path, kind, n, strict);
            runs += 1;
            if let Some(p) = a.problem {
                problems.push(p);
                continue;
            }
            // What the first cut left (the audit's open changed it: take the cut again).
            let again = first.run(&path, Some((kind, n)), strict);
            drop(again);
            powercut::power_cut(&first.root, &first.shadow).unwrap();
            let second = Rig::from_dir(&first.root);
            let seconds = points_of(&second.window(&path));
            let stride = if long { 8 } else { seconds.len().max(1) };
            for (j, &(kind2, n2)) in seconds.iter().enumerate() {
                if j % stride != i % stride {
                    continue;
                }
                let b = second.cut_at(&path, kind2, n2, strict);
                runs += 1;
                if let Some(p) = b.problem {
                    problems.push(format!("after a first cut at {kind}:{n}: {p}"));
                }
            }
        }
    }
    println!(
        "crash points of a start-up after a cut start-up: {} points in the first, {runs} cuts \
         in all; {} problems; {:.1} s",
        firsts.len(),
        problems.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "{} cuts lose or damage committed records:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_crash_point_of_a_first_start_and_its_first_commit() {
    enumerate(&Scenario {
        name: "first start (no buffer directory yet), its first commit and close",
        setup: &[],
        run: &["open", NEVER, NEVER, "commit 1 40 close"],
        window: 0,
        span: 3,
        held: (1, 0),
        acked: None,
        damage: None,
        kept: None,
    });
}
