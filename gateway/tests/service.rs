//! `edge-gateway run` as systemd runs it: with `Type=notify` (a unix datagram socket stands in
//! for systemd's notify socket, `NOTIFY_SOCKET`, and the tests read what the gateway tells it),
//! and under the unit's system call filter without capabilities, where no systemd runs.

// Test code, helpers included: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::signal;

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

/// Records received by a subscriber on the broker, as JSON.
type Received = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

fn subscribe(port: u16, topic: &str) -> Received {
    let got: Received = Received::default();
    let mut options = rumqttc::MqttOptions::new("filter-test-sub", "127.0.0.1", port);
    options.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    let topic = topic.to_owned();
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    client
                        .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
                        .await
                        .unwrap();
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if let Ok(doc) = serde_json::from_slice(&p.payload) {
                        sink.lock().unwrap().push(doc);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    got
}

async fn wait_until(what: &str, got: &Received, want: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if want(&got.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {WAIT:?}");
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
}

/// The unit's hardening, applied where no systemd runs (this CI runs in a container): the
/// system call filter of systemd/edge-gateway.service loaded by deploy/run-filtered.py
/// (libseccomp, with the same @groups, the address families and MemoryDenyWriteExecute; a
/// denied call kills the gateway instead of failing with EPERM, so none goes unseen), no
/// capabilities, no_new_privs, and, as root, the user `nobody` with the `dialout` group, as
/// DynamicUser= and SupplementaryGroups= give it. Under that: a serial RTU line on a
/// pseudo-terminal, an OPC UA server over Aes256_Sha256_RsaPss with its PKI directory, a
/// Modbus TCP device, the disk buffer (the broker is away at first), sd_notify, a reload that
/// brings the broker, the replay from disk, and an ordered shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_works_under_the_units_system_call_filter_without_capabilities() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = root.join("systemd/edge-gateway.service");
    let launcher = root.join("deploy/run-filtered.py");
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let cancel = CancellationToken::new();
    let presses = edge_gateway::demo::start_demo_devices(1, &cancel)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (_line, pty) =
        edge_gateway::demo::start_demo_meters(&dir.path().join("ttyUSB0"), &cancel).unwrap();
    let oven = edge_gateway::demo::start_demo_opcua(&data).await.unwrap();
    let endpoint = oven.endpoint();
    let addrs = [presses[0].addr()];
    let text = |mqtt_port| {
        edge_gateway::demo::config::text(&edge_gateway::demo::config::DemoSetup {
            data_dir: &data,
            mqtt_port,
            scan: Duration::from_millis(100),
            presses: &addrs,
            meter_port: Some(pty.path()),
            oven: (&endpoint, oven.namespace()),
        })
    };
    // A broker that accepts the connection and never answers it: records go to the disk.
    let away = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, text(away.local_addr().unwrap().port())).unwrap();
    let socket_path = dir.path().join("notify");
    let mut socket = NotifySocket::bind(&socket_path);

    let gateway = env!("CARGO_BIN_EXE_edge-gateway");
    let mut cmd = if libc_geteuid_is_root() {
        // As the unit's dynamic user would: its own state directory, the serial port through
        // the dialout group (a tty device is root:dialout 0660 on a real box).
        run(Command::new("chmod").arg("0755").arg(dir.path()));
        run(Command::new("chmod").arg("0777").arg(&socket_path));
        run(Command::new("chown").args(["-R", "65534:65534"]).arg(&data));
        let tty = pty.tty().expect("the pty is plugged in");
        run(Command::new("chown").arg("root:dialout").arg(tty));
        run(Command::new("chmod").arg("0660").arg(tty));
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--groups=20",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ]);
        c.arg(&launcher);
        c
    } else {
        eprintln!(
            "NOT ROOT: the gateway runs as this user, with the system call filter but without \
             dropping to another user or capabilities"
        );
        Command::new(&launcher)
    };
    cmd.arg("--kill")
        .arg(&unit)
        .arg("--")
        .arg(gateway)
        .args(["run", "--config"])
        .arg(&file)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
    let child = cmd.spawn().expect("start the filtered gateway");
    let log = dir.path().join("log");
    let show_log = move || std::fs::read_to_string(&log).unwrap_or_default();

    let (mut socket, child) = tokio::task::spawn_blocking(move || {
        socket.wait_for("READY=1", |m| lines(m).contains(&"READY=1"));
        // Every device answers, and the broker's absence fills the disk buffer.
        socket.wait_for("all 4 devices connected and records on disk", |m| {
            m.contains("STATUS=4/4 devices connected, broker disconnected, buffer ")
                && !m.contains("buffer 0 records on disk")
        });
        (socket, child)
    })
    .await
    .unwrap();
    let got = subscribe(broker.port(), "edge/demo-gw/#");
    std::fs::write(&file, text(broker.port())).unwrap();
    signal(&child, "HUP");
    let mut socket = tokio::task::spawn_blocking(move || {
        socket.wait_for("READY=1 after the reload", |m| {
            lines(m).contains(&"READY=1")
        });
        socket
    })
    .await
    .unwrap();
    wait_until(
        "the backlog from disk and live records of every device",
        &got,
        |m| {
            let from = |d: &str| {
                m.iter()
                    .any(|r| r["device"] == d && r["historical"] == false)
            };
            m.iter().any(|r| r["historical"] == true)
                && from("press1")
                && from("meters/meter1")
                && from("meters/meter2")
                && from("oven1")
        },
    )
    .await;
    assert!(
        m_good(&got, "oven1"),
        "the OPC UA tags are good over the secure channel"
    );
    assert!(
        m_good(&got, "meters/meter1"),
        "the serial line's tags are good"
    );
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || {
        socket.wait_for("STOPPING=1", |m| lines(m).contains(&"STOPPING=1"));
        let mut child = child;
        child.wait().unwrap()
    })
    .await
    .unwrap();
    cancel.cancel();
    drop(away);
    assert!(status.success(), "{status}: {}", show_log());
}

/// Some live record of `device` has every sample good.
fn m_good(got: &Received, device: &str) -> bool {
    got.lock().unwrap().iter().any(|r| {
        r["device"] == device
            && r["samples"]
                .as_array()
                .is_some_and(|s| s.iter().all(|x| x["quality"] == "good"))
    })
}

fn libc_geteuid_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
