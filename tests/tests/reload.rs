//! Reload without a restart: only the devices that changed are stopped and started again, an
//! unchanged one keeps its TCP connection (the simulator counts the connections it accepted),
//! a config that fails check is refused with the old one still running, an MQTT change
//! reconnects the publisher, and no seq is lost or repeated with another content across any of
//! it. The last test sends SIGHUP to a gateway child process, as `systemctl reload` does.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edge_gateway::config::Config;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::{ReloadError, Running};
use gateway_tests::fixtures::{demo_devices, local_config};
use gateway_tests::{
    assert_resends_identical, child_config, contiguous_seqs, drained, eventually, init_tracing,
    Collector, Proxy, Received,
};
use protocols::sim::modbus::{SimDevice, SimServer};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const SCAN: Duration = Duration::from_millis(50);

/// Animated demo devices on loopback, stopped when dropped.
struct Sims {
    devices: Vec<SimDevice>,
    servers: Vec<SimServer>,
    cancel: CancellationToken,
}

impl Sims {
    async fn start(n: usize) -> Sims {
        let cancel = CancellationToken::new();
        let mut devices = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..n {
            let d = SimDevice::demo();
            d.animate(Duration::from_millis(20), cancel.clone());
            servers.push(d.serve("127.0.0.1:0".parse().unwrap()).await.unwrap());
            devices.push(d);
        }
        Sims {
            devices,
            servers,
            cancel,
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(SimServer::addr).collect()
    }

    fn connections(&self, i: usize) -> u64 {
        self.devices[i].faults().connections.load(Ordering::SeqCst)
    }
}

impl Drop for Sims {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A gateway config for `devices` demo presses (`press1`, ...) at `addrs`, publishing to the
/// broker at `port`, its data in `dir`.
fn config(id: &str, dir: &std::path::Path, port: u16, addrs: &[SocketAddr]) -> Config {
    let mut c = local_config(id, dir.join("data"), port, demo_devices(addrs, SCAN));
    c.mqtt.client_id = format!("gw-{id}-{}", std::process::id());
    c.mqtt.shutdown_grace = Duration::from_millis(500);
    c
}

fn from(messages: &[Received], device: &str) -> usize {
    messages
        .iter()
        .filter(|m| m.doc["device"] == device)
        .count()
}

/// Everything the gateway made arrived, without a hole in seq, and re-sends are identical.
async fn nothing_lost(gw: &Running, sub: &Collector) {
    let made = drained(gw, WAIT).await;
    sub.wait_for(WAIT, "every record made so far", |m| {
        let mut seqs: Vec<u64> = m
            .iter()
            .filter(|r| r.boot() == gw.boot)
            .map(Received::seq)
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.len() as u64 >= made
    })
    .await;
    let messages = sub.messages();
    let seqs = contiguous_seqs(&messages, gw.boot);
    assert_eq!(seqs.first(), Some(&0), "from seq 0 on");
    assert!(seqs.len() as u64 >= made);
    assert_resends_identical(&messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_only_the_changed_device_and_the_unchanged_one_keeps_its_connection() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let sims = Sims::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let old = config("reload-one", dir.path(), broker.port(), &sims.addrs());
    let sub = Collector::start(broker.port(), "edge/reload-one/#").await;
    let mut gw = edge_gateway::pipeline::start(old.clone()).await.unwrap();
    sub.wait_for(WAIT, "records from both presses", |m| {
        from(m, "press1") >= 5 && from(m, "press2") >= 5
    })
    .await;
    assert_eq!((sims.connections(0), sims.connections(1)), (1, 1));

    // press2 loses its last tag.
    let mut new = old.clone();
    let edge_gateway::config::DeviceKind::Modbus(m) = &mut new.devices[1].kind else {
        unreachable!("the demo presses are Modbus devices")
    };
    let mut kept = m.units[0].tags.to_vec();
    let last = kept.pop().unwrap().name;
    m.units[0].tags = kept.into();
    let tags = m.units[0].tags.len();
    let plan = gw.reload(new.clone()).await.unwrap();
    assert_eq!(
        plan.unchanged,
        ["press1".into()] as [std::sync::Arc<str>; 1]
    );
    assert_eq!(plan.changed, ["press2".into()] as [std::sync::Arc<str>; 1]);
    assert_eq!(gw.config(), &new);

    let reshaped = |m: &Received| {
        m.doc["device"] == "press2"
            && m.doc["samples"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["tag"] != *last))
    };
    sub.wait_for(WAIT, "press2's records without its removed tag", |m| {
        m.iter().filter(|r| reshaped(r)).count() >= 5
    })
    .await;
    let before = from(&sub.messages(), "press1");
    sub.wait_for(WAIT, "press1 still publishing", |m| {
        from(m, "press1") >= before + 5
    })
    .await;
    assert_eq!(
        sims.connections(1),
        2,
        "press2 reconnected with its new settings"
    );
    assert_eq!(sims.connections(0), 1, "press1 kept its connection");
    assert!(tags > 0);
    assert_eq!(Metrics::get(&gw.metrics.reloads), 1);
    nothing_lost(&gw, &sub).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_device_and_removes_another_without_reusing_its_id() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let sims = Sims::start(3).await;
    let addrs = sims.addrs();
    let dir = tempfile::tempdir().unwrap();
    let old = config("reload-add", dir.path(), broker.port(), &addrs[..2]);
    let sub = Collector::start(broker.port(), "edge/reload-add/#").await;
    let mut gw = edge_gateway::pipeline::start(old.clone()).await.unwrap();
    sub.wait_for(WAIT, "records from both presses", |m| {
        from(m, "press1") >= 5 && from(m, "press2") >= 5
    })
    .await;

    // press2 goes, press3 comes (on the third simulator).
    let mut new = old.clone();
    let mut press3 = demo_devices(&addrs, SCAN).remove(2);
    press3.name = "press3".into();
    new.devices[1] = press3;
    let plan = gw.reload(new).await.unwrap();
    assert_eq!(plan.removed, ["press2".into()] as [std::sync::Arc<str>; 1]);
    assert_eq!(plan.added, ["press3".into()] as [std::sync::Arc<str>; 1]);
    let names: Vec<&str> = gw.devices.iter().map(|d| &*d.name).collect();
    assert_eq!(names, ["press1", "press3"]);
    assert_eq!(
        gw.catalog.devices().count(),
        3,
        "press2's id stays taken while its records may be in flight"
    );

    // The removed driver has ended: its simulator gets no more requests.
    let press2_requests = sims.devices[1].requests();
    sub.wait_for(WAIT, "records from press3", |m| from(m, "press3") >= 10)
        .await;
    assert_eq!(sims.devices[1].requests(), press2_requests);
    assert_eq!(sims.connections(0), 1, "press1 kept its connection");
    nothing_lost(&gw, &sub).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_fails_check_is_refused_and_the_running_one_stays() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let sims = Sims::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let old = config("reload-bad", dir.path(), broker.port(), &sims.addrs());
    let sub = Collector::start(broker.port(), "edge/reload-bad/#").await;
    let mut gw = edge_gateway::pipeline::start(old.clone()).await.unwrap();
    sub.wait_for(WAIT, "records", |m| m.len() >= 10).await;

    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[gateway]\nid = \"reload-bad\"\n\n[[devices]]\nname = \"press1\"\nprotocol = \"modbus_tcp\"\n",
    )
    .unwrap();
    let refused = gw.reload_file(&file).await;
    assert!(
        matches!(refused, Err(ReloadError::Config(_))),
        "{refused:?}"
    );
    let missing = gw.reload_file(&dir.path().join("no-such.toml")).await;
    assert!(
        matches!(missing, Err(ReloadError::Config(_))),
        "{missing:?}"
    );
    assert_eq!(Metrics::get(&gw.metrics.reloads_refused), 2);
    assert_eq!(Metrics::get(&gw.metrics.reloads), 0);
    assert_eq!(gw.config(), &old);

    let before = sub.messages().len();
    sub.wait_for(WAIT, "records after the refusal", |m| {
        m.len() >= before + 10
    })
    .await;
    assert_eq!((sims.connections(0), sims.connections(1)), (1, 1));
    nothing_lost(&gw, &sub).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_mqtt_key_is_not_its_certificates_is_refused_like_check_refuses_it() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let sims = Sims::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let old = config("reload-tls", dir.path(), broker.port(), &sims.addrs());
    let sub = Collector::start(broker.port(), "edge/reload-tls/#").await;
    let mut gw = edge_gateway::pipeline::start(old.clone()).await.unwrap();
    sub.wait_for(WAIT, "records", |m| m.len() >= 10).await;

    // A file the config's own checks accept (every file exists and is readable), but whose
    // client key belongs to another certificate: `check` fails it, so the reload must too.
    let pki = gateway_tests::pki::Pki::generate().unwrap();
    let file = dir.path().join("gateway.toml");
    let text = format!(
        r#"[gateway]
id = "reload-tls"
data_dir = "{data}"

[mqtt]
url = "mqtts://localhost:{port}"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

[[devices]]
name = "press1"
protocol = "modbus_tcp"
address = "{addr}"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#,
        data = dir.path().join("data").display(),
        port = broker.port(),
        ca = pki.ca().display(),
        cert = pki.client().cert.display(),
        key = pki.server().key.display(),
        addr = sims.addrs()[0],
    );
    std::fs::write(&file, text).unwrap();
    assert!(
        edge_gateway::config::load(&file).is_ok(),
        "the file passes the config's own checks"
    );
    let (said, ok) = edge_gateway::cli::check::run(&file);
    assert!(!ok, "check fails it: {said}");

    let refused = gw.reload_file(&file).await;
    match &refused {
        Err(ReloadError::Files { findings, .. }) => assert!(
            findings.iter().any(|f| f.field() == "mqtt.key_file"
                && f.to_string()
                    .contains("is not the private key of the certificate in mqtt.cert_file")),
            "{findings:?}"
        ),
        other => panic!("refused for its key, not {other:?}"),
    }
    assert_eq!(Metrics::get(&gw.metrics.reloads_refused), 1);
    assert_eq!(Metrics::get(&gw.metrics.reloads), 0);
    assert_eq!(gw.config(), &old);
    assert_eq!(
        Metrics::get(&gw.metrics.mqtt_connects),
        1,
        "the publisher stayed"
    );

    let before = sub.messages().len();
    sub.wait_for(WAIT, "records after the refusal", |m| {
        m.len() >= before + 10
    })
    .await;
    assert_eq!(sims.connections(0), 1, "the device kept its connection");
    nothing_lost(&gw, &sub).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_change_reconnects_the_publisher_to_the_new_broker_port_with_no_seq_lost() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let first = Proxy::start(broker.addr()).await.unwrap();
    let second = Proxy::start(broker.addr()).await.unwrap();
    let sims = Sims::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let old = config(
        "reload-mqtt",
        dir.path(),
        first.addr().port(),
        &sims.addrs(),
    );
    let sub = Collector::start(broker.port(), "#").await;
    let mut gw = edge_gateway::pipeline::start(old.clone()).await.unwrap();
    sub.wait_for(WAIT, "records", |m| m.len() >= 20).await;

    // The old link stops passing anything: what the old publisher has in flight when the
    // reload replaces it is never acknowledged, and must come back through the disk.
    first.freeze();
    let made = Metrics::get(&gw.metrics.records);
    eventually(WAIT, "records made after the freeze", || {
        Metrics::get(&gw.metrics.records) >= made + 4
    })
    .await;
    let mut new = old.clone();
    new.mqtt.port = second.addr().port();
    new.mqtt.topic_prefix = "plant/reload-mqtt".into();
    let plan = gw.reload(new).await.unwrap();
    assert!(plan.mqtt_changed);
    assert!(plan.changed.is_empty() && plan.added.is_empty());

    sub.wait_for(WAIT, "records on the new topic prefix", |m| {
        m.iter()
            .filter(|r| r.topic.starts_with("plant/reload-mqtt/"))
            .count()
            >= 10
    })
    .await;
    // The old way to the broker is no longer used: cutting it changes nothing.
    first.cut();
    let before = sub.messages().len();
    sub.wait_for(WAIT, "records after the old link was cut", |m| {
        m.len() >= before + 10
    })
    .await;
    assert_eq!(Metrics::get(&gw.metrics.mqtt_connects), 2);
    assert_eq!((sims.connections(0), sims.connections(1)), (1, 1));
    nothing_lost(&gw, &sub).await;
    assert!(
        Metrics::get(&gw.metrics.replayed) > 0,
        "what the old publisher had in flight came back from disk"
    );
    gw.shutdown().await;
}

fn child_metric(file: &std::path::Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_of_a_running_gateway_and_refuses_a_bad_one() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let sims = Sims::start(2).await;
    let addrs = sims.addrs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("gateway.toml");
    let metrics = dir.path().join("metrics");
    let one = child_config("reload-hup", &data, broker.port(), addrs[0], 100, 50);
    std::fs::write(&file, &one).unwrap();
    let sub = Collector::start(broker.port(), "edge/reload-hup/#").await;
    let mut child = gateway_tests::spawn_child_logging(
        env!("CARGO_BIN_EXE_gateway-child"),
        &file,
        &dir.path().join("log"),
        "info",
        &[("GATEWAY_CHILD_METRICS", &metrics)],
    );
    sub.wait_for(WAIT, "records from press", |m| from(m, "press") >= 5)
        .await;

    // A second device in the file, then SIGHUP.
    let two = format!(
        "{one}\n[[devices]]\nname = \"press2\"\nprotocol = \"modbus_tcp\"\naddress = \"{}\"\nscan_interval = \"50ms\"\n\n  [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n",
        addrs[1]
    );
    std::fs::write(&file, &two).unwrap();
    signal(&child, "HUP");
    sub.wait_for(WAIT, "records from the added press2", |m| {
        from(m, "press2") >= 5
    })
    .await;
    eventually(WAIT, "the child counted the reload", || {
        child_metric(&metrics, "reloads") == Some(1)
    })
    .await;
    assert_eq!(sims.connections(0), 1, "press kept its connection");

    // A file that fails check: refused, and the gateway goes on with both devices.
    std::fs::write(&file, "[gateway]\nid = \"reload-hup\"\nbogus = 1\n").unwrap();
    signal(&child, "HUP");
    eventually(WAIT, "the child counted the refusal", || {
        child_metric(&metrics, "reloads_refused") == Some(1)
    })
    .await;
    let before = sub.messages();
    sub.wait_for(WAIT, "both presses still publishing", |m| {
        from(m, "press") >= from(&before, "press") + 5
            && from(m, "press2") >= from(&before, "press2") + 5
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the child still runs");

    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let messages = sub.messages();
    let boot = messages[0].boot();
    contiguous_seqs(&messages, boot);
    assert_eq!(sims.connections(0), 1);
    assert_eq!(sims.connections(1), 1);
}
