//! `POST /api/reload` against `edge-gateway run` itself: the API asks the loop that owns the
//! running gateway to read its file again, and answers with what was done (200) or why the
//! file was refused (422, the running config kept).

// Test code, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::signal;

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocols::sim::modbus::{SimDevice, SimServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A device entry scanning the simulator at `addr` every 50 ms.
fn device(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"
[[devices]]
name = "{name}"
protocol = "modbus_tcp"
address = "{addr}"
scan_interval = "50ms"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#
    )
}

/// The file's head: the gateway, its broker and the API on an OS-chosen loopback port.
fn head(dir: &Path, mqtt_port: u16) -> String {
    format!(
        r#"[gateway]
id = "api-reload"
data_dir = "{}"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
shutdown_grace = "200ms"

[api]
listen = "127.0.0.1:0"
"#,
        dir.join("data").display()
    )
}

/// `edge-gateway run` with JSON log lines on stderr, and the address its API listens on (from
/// its "HTTP API listening" line).
fn spawn(config: &Path) -> (Running, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args([
            "run",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--config",
        ])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edge-gateway run");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if sent {
                continue; // keep draining, so the gateway never blocks on its log
            }
            let Ok(parsed) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if parsed["message"] == "HTTP API listening" {
                if let Some(addr) = parsed["addr"].as_str().and_then(|a| a.parse().ok()) {
                    sent = tx.send(addr).is_ok();
                }
            }
        }
    });
    // A safety net against a gateway that never starts, not a timing goal.
    let addr = rx
        .recv_timeout(WAIT)
        .expect("the gateway says where its API listens");
    (Running(Some(child)), addr)
}

/// The gateway child, killed if the test fails before it is stopped (a `Child` is not).
struct Running(Option<Child>);

impl Running {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child runs until taken")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`): the status and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// The value of `series` in `/metrics`, if it is there.
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `series` is at least `at_least`; panics after [`WAIT`].
async fn until_metric(addr: SocketAddr, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(addr, series).await;
        if value.is_some_and(|v| v >= at_least) {
            return value.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{series} not at {at_least} within {WAIT:?}: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn scans(device: &str) -> String {
    format!("edge_gateway_device_scans_total{{device=\"{device}\"}}")
}

async fn device_names(addr: SocketAddr) -> Vec<String> {
    let (status, body) = http(addr, "GET", "/api/devices").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = doc.as_array().or_else(|| doc["devices"].as_array());
    list.unwrap_or_else(|| panic!("a device list: {body}"))
        .iter()
        .filter_map(|d| d["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_api_reload_applies_a_changed_file_and_refuses_a_bad_one_keeping_the_running_config() {
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let cancel = CancellationToken::new();
    let sims: Vec<SimDevice> = (0..2).map(|_| SimDevice::demo()).collect();
    let mut servers: Vec<SimServer> = Vec::new();
    for sim in &sims {
        sim.animate(Duration::from_millis(20), cancel.clone());
        servers.push(sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap());
    }
    let connections = |i: usize| {
        sims[i]
            .faults()
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let one = format!(
        "{}{}",
        head(dir.path(), broker.port()),
        device("press", servers[0].addr())
    );
    std::fs::write(&file, &one).unwrap();
    let (mut child, addr) = spawn(&file);
    until_metric(addr, &scans("press"), 5.0).await;
    assert_eq!(device_names(addr).await, ["press"]);

    // A second device in the file: the reload adds it and leaves the first alone.
    let two = format!("{one}{}", device("press2", servers[1].addr()));
    std::fs::write(&file, &two).unwrap();
    let (status, body) = http(addr, "POST", "/api/reload").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["reloaded"], true, "{body}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("1 unchanged") && message.contains("1 added"),
        "{body}"
    );
    assert_eq!(device_names(addr).await, ["press", "press2"]);
    until_metric(addr, &scans("press2"), 5.0).await;
    assert_eq!(
        metric(addr, "edge_gateway_config_reloads_total").await,
        Some(1.0)
    );

    // A file that fails check (press2 gone, an unknown key): refused, both devices go on.
    let bad = format!(
        "{}bogus = 1\n{}",
        head(dir.path(), broker.port()),
        device("press", servers[0].addr())
    );
    std::fs::write(&file, bad).unwrap();
    let (status, body) = http(addr, "POST", "/api/reload").await;
    assert_eq!(status, 422, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["reloaded"], false, "{body}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the running one stays") && error.contains("bogus"),
        "{body}"
    );
    assert_eq!(
        metric(addr, "edge_gateway_config_reloads_refused_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(addr, "edge_gateway_config_reloads_total").await,
        Some(1.0)
    );
    assert_eq!(device_names(addr).await, ["press", "press2"]);
    let press2 = metric(addr, &scans("press2")).await.unwrap_or_default();
    until_metric(addr, &scans("press2"), press2 + 5.0).await;
    assert_eq!(
        (connections(0), connections(1)),
        (1, 1),
        "no device was reconnected"
    );
    assert!(
        child.child().try_wait().unwrap().is_none(),
        "the gateway still runs"
    );

    signal(child.child(), "TERM");
    let mut child = child.0.take().expect("still running");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    cancel.cancel();
    assert!(status.success(), "{status}");
}
