//! `edge-gateway run` as systemd runs it with `Type=notify`: a unix datagram socket stands in
//! for systemd's notify socket (`NOTIFY_SOCKET`), and the test reads what the gateway tells it
//! while it polls a simulated Modbus device and publishes to the embedded broker.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocols::sim::modbus::SimDevice;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The notify socket: every datagram the gateway sent, in order.
struct NotifySocket {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `want` (returned), failing after WAIT.
    fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if want(&msg) {
                    return msg;
                }
            }
        }
        panic!(
            "no notification {what} within {WAIT:?}; seen: {:#?}",
            self.seen
        );
    }
}

fn lines(msg: &str) -> Vec<&str> {
    msg.lines().collect()
}

fn config(dir: &Path, mqtt_port: u16, device: std::net::SocketAddr) -> String {
    format!(
        r#"[gateway]
id = "notify-gw"
data_dir = "{data}"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
shutdown_grace = "200ms"

[[devices]]
name = "press"
protocol = "modbus_tcp"
address = "{device}"
scan_interval = "50ms"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#,
        data = dir.join("data").display()
    )
}

/// `edge-gateway run` with NOTIFY_SOCKET and a watchdog of `watchdog_usec`; WATCHDOG_PID must
/// be the gateway's own pid, so a shell sets it to its `$$` and execs the gateway.
fn spawn(config: &Path, socket: &Path, watchdog_usec: u64, log: &Path) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_edge-gateway"))
        .arg(config)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start edge-gateway run")
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_gateway_says_ready_pings_the_watchdog_reports_status_reload_and_stopping(
) {
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let cancel = CancellationToken::new();
    let device = SimDevice::demo();
    device.animate(Duration::from_millis(20), cancel.clone());
    let server = device.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, config(dir.path(), broker.port(), server.addr())).unwrap();
    let socket_path = dir.path().join("notify");
    let log = dir.path().join("log");

    let (child, messages) = tokio::task::spawn_blocking(move || {
        let mut socket = NotifySocket::bind(&socket_path);
        // A watchdog of 2 s: the gateway looks (and pings) every 500 ms.
        let mut child = spawn(&file, &socket_path, 2_000_000, &log);
        let ready = socket.wait_for("READY=1", |m| lines(m).contains(&"READY=1"));
        assert!(
            ready.contains("STATUS=") && ready.contains("devices connected"),
            "{ready}"
        );
        socket.wait_for("a STATUS with the device and the broker connected", |m| {
            m.contains("STATUS=1/1 devices connected, broker connected, buffer ")
        });
        for _ in 0..3 {
            socket.wait_for("WATCHDOG=1", |m| lines(m).contains(&"WATCHDOG=1"));
        }
        signal(&child, "HUP");
        let reloading = socket.wait_for("RELOADING=1", |m| lines(m).contains(&"RELOADING=1"));
        assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
        socket.wait_for("READY=1 after the reload", |m| {
            lines(m).contains(&"READY=1")
        });
        socket.wait_for("WATCHDOG=1 after the reload", |m| {
            lines(m).contains(&"WATCHDOG=1")
        });
        signal(&child, "TERM");
        socket.wait_for("STOPPING=1", |m| lines(m).contains(&"STOPPING=1"));
        let status = child.wait().unwrap();
        (status, std::mem::take(&mut socket.seen))
    })
    .await
    .unwrap();
    cancel.cancel();
    assert!(
        child.success(),
        "{child}: {}",
        std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
    );
    let stopping = messages
        .iter()
        .position(|m| lines(m).contains(&"STOPPING=1"))
        .unwrap();
    assert_eq!(stopping, messages.len() - 1, "nothing after STOPPING=1");
}
