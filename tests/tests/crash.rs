//! Crash safety: the gateway runs as a child process and is killed with SIGKILL at moments
//! while devices scan and the broker is up or down. A subscriber audits what arrives: no hole in
//! `seq` within a boot, the only records missing are ones younger than `commit_interval` at a
//! kill, and duplicates are re-sends with identical content.
//!
//! `GATEWAY_LONG_TESTS=1` runs 50 kills instead of 4.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_gateway::broker;
use gateway_tests::{contiguous_seqs, init_tracing, Collector, Proxy, Received};
use protocols::sim::modbus::SimDevice;
use tokio_util::sync::CancellationToken;

const COMMIT_INTERVAL_MS: u64 = 100;
const SCAN_MS: u64 = 50;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn config(data_dir: &std::path::Path, mqtt_port: u16, device: std::net::SocketAddr) -> String {
    format!(
        r#"
[gateway]
id = "crash"
data_dir = "{data}"

[buffer]
commit_interval = "{COMMIT_INTERVAL_MS}ms"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
shutdown_grace = "200ms"

[[devices]]
name = "press"
protocol = "modbus_tcp"
address = "{device}"
scan_interval = "{SCAN_MS}ms"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"

  [[devices.tags]]
  name = "sine"
  address = "hr:1"
  type = "f32"
"#,
        data = data_dir.display()
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

fn kill9(child: &mut Child) -> i64 {
    let at = now_ms();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    at
}

fn newest_ts(msgs: &[Received], boot: u64) -> Option<i64> {
    msgs.iter()
        .filter(|m| m.boot() == boot)
        .filter_map(|m| m.doc["samples"][0]["ts"].as_i64())
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_only_records_younger_than_the_commit_interval() {
    init_tracing();
    let kills: usize = if std::env::var_os("GATEWAY_LONG_TESTS").is_some() {
        50
    } else {
        4
    };
    let broker = broker::start(16 << 20).unwrap();
    let proxy = Proxy::start(broker.addr()).await.unwrap();
    let cancel = CancellationToken::new();
    let dev = SimDevice::demo();
    dev.animate(Duration::from_millis(20), cancel.clone());
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
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
        // Alternate: broker reachable, broker cut (backlog on disk), cut in the middle of a run.
        match i % 3 {
            0 => proxy.restore(),
            1 => proxy.cut(),
            _ => proxy.restore(),
        }
        let mut child = spawn(&cfg);
        let run_ms = 700 + (i as u64 * 137) % 900;
        if i % 3 == 2 {
            tokio::time::sleep(Duration::from_millis(run_ms / 2)).await;
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(run_ms / 2)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(run_ms)).await;
        }
        kill_times.insert(i as u64 + 1, kill9(&mut child));
    }

    // A final clean run with the broker up delivers every backlog.
    proxy.restore();
    let mut child = spawn(&cfg);
    let last_boot = kills as u64 + 1;
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
    cancel.cancel();

    let msgs = sub.messages();
    // Duplicates are re-sends of the same content.
    let mut by_key: HashMap<(u64, u64), serde_json::Value> = HashMap::new();
    for m in &msgs {
        let mut doc = m.doc.clone();
        doc["historical"] = serde_json::Value::Bool(false);
        if let Some(prev) = by_key.insert((m.boot(), m.seq()), doc.clone()) {
            assert_eq!(
                prev,
                doc,
                "a duplicate (boot {}, seq {}) differs in content",
                m.boot(),
                m.seq()
            );
        }
    }
    for boot in 1..=kills as u64 {
        let seqs = contiguous_seqs(&msgs, boot);
        assert!(!seqs.is_empty(), "boot {boot} delivered nothing");
        let newest = newest_ts(&msgs, boot).unwrap();
        let killed = kill_times[&boot];
        let lost_window = killed - newest;
        assert!(
            lost_window <= (COMMIT_INTERVAL_MS + SCAN_MS) as i64 + 250,
            "boot {boot}: the newest delivered record was read {lost_window} ms before the kill; \
             only records younger than the commit interval ({COMMIT_INTERVAL_MS} ms) may be lost"
        );
    }
    contiguous_seqs(&msgs, last_boot);
    drop(server);
}
