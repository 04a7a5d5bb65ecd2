//! Crash safety: the gateway runs as a child process and is killed with SIGKILL at moments
//! while devices scan and the broker is up or down. A subscriber audits what arrives: no hole in
//! `seq` within a boot, the only records missing are ones younger than `commit_interval` at a
//! kill, and duplicates are re-sends with identical content.
//!
//! The same under power cuts: the gateway runs under the `powercut` shim, and after each SIGKILL
//! its data directory goes back to what was fsynced (see `gateway_tests::powercut`). Records
//! committed before the cut must all arrive. A kill at a random moment rarely lands inside a
//! commit (the buffer fsyncs what it writes at once), so in the rounds with the broker cut the
//! gateway is cut by the shim itself just before its n-th `sync_file_range`, fsync or write of a
//! file (`POWERCUT_CUT_AT`), which is then mostly a commit's: what the commit wrote before it is
//! not durable and goes back. Every cut
//! reports what it reverted, and a run in which no cut reverted anything fails. Half of the
//! rounds use the shim's strict directory model (an entry is durable only once its directory
//! is fsynced), half the eager one (entries durable at once, and what `sync_file_range` wrote
//! out within a file's durable length too).
//!
//! `GATEWAY_LONG_TESTS=1` runs 50 kills (and 50 cuts) instead of 4 (and 6).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_tests::{
    assert_resends_identical, child_config, contiguous_seqs, init_tracing, long_mode, powercut,
    quarantined, ChildPeers, Collector, Proxy, Received,
};

const COMMIT_INTERVAL_MS: u64 = 100;
const SCAN_MS: u64 = 50;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn config(data_dir: &Path, mqtt_port: u16, device: std::net::SocketAddr) -> String {
    child_config(
        "crash",
        data_dir,
        mqtt_port,
        device,
        COMMIT_INTERVAL_MS,
        SCAN_MS,
    )
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gateway-child"))
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the gateway child")
}

/// The gateway child under the power-cut shim, with warnings and the shim's complaints in `log`.
/// `extra`: the cut (`POWERCUT_CUT_AT`) and the directory model, if not the default ones.
fn spawn_under_shim(
    config: &Path,
    data: &Path,
    shadow: &Path,
    stats: &Path,
    log: &Path,
    extra: &[(&'static str, std::ffi::OsString)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gateway-child"))
        .arg(config)
        .envs(powercut::env(data, shadow))
        .envs([powercut::stats_env(stats)])
        .envs(extra.iter().cloned())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("child log"))
        .spawn()
        .expect("start the gateway child under the power-cut shim")
}

fn kill9(child: &mut Child) -> i64 {
    let at = now_ms();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    at
}

/// The boot counter in the gateway's state file (0 if it has none yet).
fn durable_boot(data: &Path) -> u64 {
    std::fs::read_to_string(data.join("state"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("boot=").and_then(|b| b.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Waits up to `ms` for a child the shim cuts itself (at a persistence point): when it died
/// (found dead within 5 ms of it), or `None` if it still runs.
async fn died_within(child: &mut Child, ms: u64) -> Option<i64> {
    let until = now_ms() + ms as i64;
    while now_ms() < until {
        if child.try_wait().expect("poll the child").is_some() {
            return Some(now_ms());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Round `i` (see [`run_round`]) of a child the shim may cut first: returns how long the round
/// was, when the child died and whether the shim's cut killed it (else a SIGKILL at the end).
async fn cut_round(proxy: &Proxy, i: usize, child: &mut Child) -> (u64, i64, bool) {
    let run_ms = 700 + (i as u64 * 137) % 900;
    let first = if i % 3 == 2 { run_ms / 2 } else { run_ms };
    if let Some(at) = died_within(child, first).await {
        return (run_ms, at, true);
    }
    if i % 3 == 2 {
        proxy.cut();
        if let Some(at) = died_within(child, run_ms - first).await {
            return (run_ms, at, true);
        }
    }
    (run_ms, kill9(child), false)
}

fn newest_ts(msgs: &[Received], boot: u64) -> Option<i64> {
    msgs.iter()
        .filter(|m| m.boot() == boot)
        .filter_map(|m| m.doc["samples"][0]["ts"].as_i64())
        .max()
}

/// Starts the gateway with the broker reachable, waits until boot `last_boot` publishes and has
/// had time to deliver every backlog, stops it with SIGTERM.
async fn final_run(cfg: &Path, sub: &Collector, last_boot: u64) {
    let mut child = spawn(cfg);
    sub.wait_for(Duration::from_secs(30), "the last boot publishing", |m| {
        m.iter().filter(|r| r.boot() == last_boot).count() > 20
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    child.wait().unwrap();
}

/// What arrived over boots `1..last_boot`, each ended by a kill at `kill_times[boot]`, and a
/// clean `last_boot`: duplicates are re-sends of the same content, no hole in `seq` within a
/// boot, and the newest delivered record of each killed boot was read at most the commit
/// interval (plus a scan and slack) before the kill. A boot in `cut_by_shim` may have been cut
/// before it read anything (at start-up): it may have delivered nothing.
fn audit(
    msgs: &[Received],
    kill_times: &HashMap<u64, i64>,
    last_boot: u64,
    cut_by_shim: &HashSet<u64>,
) {
    assert_resends_identical(msgs);
    for boot in 1..last_boot {
        let seqs = contiguous_seqs(msgs, boot);
        if seqs.is_empty() && cut_by_shim.contains(&boot) {
            continue;
        }
        assert!(!seqs.is_empty(), "boot {boot} delivered nothing");
        let newest = newest_ts(msgs, boot).unwrap();
        let killed = kill_times[&boot];
        let lost_window = killed - newest;
        assert!(
            lost_window <= (COMMIT_INTERVAL_MS + SCAN_MS) as i64 + 250,
            "boot {boot}: the newest delivered record was read {lost_window} ms before the kill; \
             only records younger than the commit interval ({COMMIT_INTERVAL_MS} ms) may be lost"
        );
    }
    contiguous_seqs(msgs, last_boot);
}

/// Round `i`'s link before the start; rounds alternate: broker reachable, broker cut (backlog on
/// disk), cut in the middle of the run (see [`run_round`]).
fn link_before(proxy: &Proxy, i: usize) {
    match i % 3 {
        1 => proxy.cut(),
        _ => proxy.restore(),
    }
}

/// Lets round `i`'s gateway run for 0.7 to 1.6 s, cutting the link half way in every third;
/// returns how long, in ms.
async fn run_round(proxy: &Proxy, i: usize) -> u64 {
    let run_ms = 700 + (i as u64 * 137) % 900;
    if i % 3 == 2 {
        tokio::time::sleep(Duration::from_millis(run_ms / 2)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(run_ms / 2)).await;
    } else {
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
    }
    run_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_only_records_younger_than_the_commit_interval() {
    init_tracing();
    let kills: usize = if long_mode() { 50 } else { 4 };
    let peers = ChildPeers::start().await;
    let (broker, proxy, server) = (&peers.broker, &peers.proxy, &peers.device);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        config(&dir.path().join("data"), proxy.addr().port(), server.addr()),
    )
    .unwrap();
    let sub = Collector::start(broker.port(), "edge/crash/#").await;

    let mut kill_times = HashMap::new();
    for i in 0..kills {
        link_before(proxy, i);
        let mut child = spawn(&cfg);
        run_round(proxy, i).await;
        kill_times.insert(i as u64 + 1, kill9(&mut child));
    }

    // A final clean run with the broker up delivers every backlog.
    proxy.restore();
    let last_boot = kills as u64 + 1;
    final_run(&cfg, &sub, last_boot).await;
    audit(&sub.messages(), &kill_times, last_boot, &HashSet::new());
}

/// Lines of a child's log about the buffer's files: the buffer's and sled's warnings, panics,
/// the shim's complaints.
fn disk_complaints(log: &Path) -> Vec<String> {
    const WORDS: [&str; 5] = [
        "powercut:",
        "edge_gateway::buffer",
        "sled",
        "quarantine",
        "panicked",
    ];
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| WORDS.iter().any(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// The SIGKILL audit under power cuts: after each kill, the data directory is what was fsynced,
/// nothing more. Every committed record must still arrive, and no generation may be quarantined
/// (one holding committed records would be loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_no_committed_record() {
    if powercut::shim().is_none() {
        eprintln!("skipped: the power-cut shim is only built on Linux (x86_64, aarch64)");
        return;
    }
    init_tracing();
    let cuts: usize = if long_mode() { 50 } else { 6 };
    let peers = ChildPeers::start().await;
    let (broker, proxy, server) = (&peers.broker, &peers.proxy, &peers.device);
    let dir = tempfile::tempdir().unwrap();
    // Canonical: the shim compares the gateway's paths with its root by prefix.
    let base = dir.path().canonicalize().unwrap();
    let (data, shadow, stats) = (
        base.join("data"),
        base.join("shadow"),
        base.join("shim-stats"),
    );
    let cfg = base.join("gw.toml");
    std::fs::write(&cfg, config(&data, proxy.addr().port(), server.addr())).unwrap();
    let sub = Collector::start(broker.port(), "edge/crash/#").await;

    let mut kill_times = HashMap::new();
    let (mut reverted, mut synced, mut writes, mut syncs) = (0u64, 0u64, 0u64, 0u64);
    // Cuts that took back bytes of a sled data file (the rest is sled's `conf`, temporary files).
    let mut db_cuts = 0;
    // What each cut reverted: (boot, how it was cut, bytes).
    let mut per_cut = Vec::new();
    // Rounds cut before their boot number was durable: the next round takes the same number.
    let mut unborn = 0;
    let mut cut_by_shim = HashSet::new();
    for i in 0..cuts {
        let boot = durable_boot(&data) + 1;
        link_before(proxy, i);
        powercut::prepare(&data, &shadow).unwrap();
        let _ = std::fs::remove_file(&stats);
        let log = base.join(format!("child-{boot}.log"));
        // In the rounds with the broker cut (at the start or half way), the shim cuts the
        // gateway at a persistence point of a commit, most likely: before the n-th
        // sync_file_range (sled's flush), fsync or write of a file, n spread over the few
        // dozen calls of a run.
        let at = (i % 3 != 0).then(|| {
            let j = i as u64 / 3;
            match i % 6 {
                1 => ("sync_file_range", 2 + j % 8),
                2 => ("write", 6 + (j * 7) % 20),
                4 => ("fsync", 8 + (j * 3) % 12),
                _ => ("sync_file_range", 3 + (j * 5) % 9),
            }
        });
        let strict = i % 4 >= 2;
        let mut extra = Vec::new();
        if let Some((kind, n)) = at {
            extra.push(powercut::cut_at_env(kind, n));
        }
        if strict {
            extra.push(powercut::strict_dirs_env());
        } else {
            extra.push(powercut::sfr_data_env());
        }
        let mut child = spawn_under_shim(&cfg, &data, &shadow, &stats, &log, &extra);
        let (run_ms, killed_at, by_shim) = if at.is_some() {
            // The run ends at the cut, or at the round's end if the cut was not reached.
            cut_round(proxy, i, &mut child).await
        } else {
            let run_ms = run_round(proxy, i).await;
            (run_ms, kill9(&mut child), false)
        };
        let cut = powercut::power_cut(&data, &shadow).unwrap();
        // A cut at start-up, before the state file was made durable, leaves the boot unborn:
        // it published nothing (numbers are handed out only once on disk), and its number is
        // the next round's.
        if durable_boot(&data) >= boot {
            kill_times.insert(boot, killed_at);
            if by_shim {
                cut_by_shim.insert(boot);
            }
        } else {
            assert!(
                by_shim,
                "round {i} was killed, not cut, before its boot was on disk"
            );
            unborn += 1;
        }
        let s = powercut::read_stats(&stats);
        let how = match (at, by_shim) {
            (Some((kind, n)), true) => format!("cut by the shim before {kind} {n}"),
            (Some((kind, n)), false) => {
                format!("SIGKILL after {run_ms} ms ({kind} {n} not reached)")
            }
            (None, _) => format!("SIGKILL after {run_ms} ms"),
        };
        let model = if strict { "strict" } else { "eager" };
        eprintln!(
            "cut {} (boot {boot}), {how}, {model} directories: {cut}; the shim saw {} writes ({} bytes), \
             {} syncs making {} bytes durable, {} sync_file_range; persistence points: {}",
            i + 1,
            s.writes,
            s.write_bytes,
            s.syncs,
            s.synced_bytes,
            s.sync_file_ranges,
            s.points
        );
        per_cut.push((i + 1, how, cut.bytes_reverted));
        let complaints = disk_complaints(&log);
        for line in &complaints {
            eprintln!("  boot {boot}: {line}");
        }
        assert!(
            !complaints.iter().any(|l| l.contains("powercut:")),
            "the shim reported an error in boot {boot}"
        );
        assert_eq!(s.errors, 0, "the shim reported an error in boot {boot}");
        assert!(
            !complaints
                .iter()
                .any(|l| l.contains("lost records it had made durable")),
            "boot {boot} found a buffer generation below its watermark after the previous cut"
        );
        let aside = quarantined(&data);
        assert!(
            aside.is_empty(),
            "boot {boot} quarantined a buffer generation after the previous cut: {aside:?}"
        );
        reverted += cut.bytes_reverted;
        if cut.files.iter().any(|f| f.path.ends_with("db")) {
            db_cuts += 1;
        }
        synced += s.synced_bytes;
        writes += s.writes;
        syncs += s.syncs;
    }

    proxy.restore();
    let last_boot = durable_boot(&data) + 1;
    assert_eq!(last_boot, (cuts - unborn) as u64 + 1, "the boots counted");
    final_run(&cfg, &sub, last_boot).await;
    let aside = quarantined(&data);
    assert!(
        aside.is_empty(),
        "the last boot quarantined a buffer generation after the last cut: {aside:?}"
    );
    eprintln!(
        "{cuts} cuts ({unborn} before the boot was on disk): {reverted} bytes reverted \
         ({db_cuts} cuts took back sled data); the shim saw {writes} writes and {syncs} syncs \
         making {synced} bytes durable"
    );
    for (round, how, bytes) in &per_cut {
        eprintln!("  cut {round} ({how}) reverted {bytes} bytes");
    }
    assert!(
        writes > 0 && synced > 0,
        "the shim saw no write or no sync of the buffer: it is not intercepting"
    );
    // A random kill rarely finds unsynced bytes (the buffer fsyncs what it writes at once), but
    // a cut just before an fsync of a running gateway takes back what that fsync was for.
    assert!(
        reverted > 0,
        "no cut reverted anything: the run never cut the gateway between a write and its fsync"
    );
    audit(&sub.messages(), &kill_times, last_boot, &cut_by_shim);
}
