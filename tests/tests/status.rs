//! The gateway's status for the cloud, and how it reconnects: `{topic_prefix}/status` says
//! `online` after every CONNACK and `offline` at a clean shutdown, and the broker says `offline`
//! for it (the last will) when it vanishes; the first attempt after a lost connection is
//! immediate; records go where the `topic` template says.
//!
//! The gateway reaches the embedded rumqttd broker through a fault-injecting [`Proxy`]; the
//! subscriber connects to the broker directly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::{child_config, ChildPeers, Collector, GatewayRig, Received};

const SCAN: Duration = Duration::from_millis(50);

fn states(statuses: &[Received]) -> Vec<String> {
    statuses
        .iter()
        .map(|s| s.doc["state"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_online_after_every_connack_and_offline_at_a_clean_shutdown() {
    let rig = GatewayRig::new("gw-status", 1, SCAN, None).await;
    let (sub, gw) = rig.start_live().await;
    sub.wait_for_status(Duration::from_secs(10), "online", |s| {
        states(s) == ["online"]
    })
    .await;
    let online = &sub.statuses()[0];
    assert_eq!(online.topic, "edge/gw-status/status");
    assert_eq!(online.doc["gateway"], "gw-status");
    assert_eq!(online.doc["boot"], gw.boot);
    assert!(online.doc["ts"].as_u64().is_some(), "{}", online.doc);

    // A lost connection: the broker says offline for the gateway (its will: the socket
    // closed without a DISCONNECT), and the gateway says online after the next CONNACK.
    rig.proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.proxy.restore();
    sub.wait_for_status(Duration::from_secs(20), "offline, then online again", |s| {
        states(s) == ["online", "offline", "online"]
    })
    .await;

    gw.shutdown().await;
    sub.wait_for_status(Duration::from_secs(10), "offline", |s| {
        states(s) == ["online", "offline", "online", "offline"]
    })
    .await;
    let offline = sub.statuses()[3].clone();
    assert_eq!(offline.doc["gateway"], "gw-status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_gateway_goes_offline_by_its_last_will_within_one_and_a_half_keep_alives() {
    let mut rig = GatewayRig::new("gw-will", 1, SCAN, None).await;
    rig.config.mqtt.keep_alive = Duration::from_secs(2);
    let (sub, gw) = rig.start_live().await;
    sub.wait_for_status(Duration::from_secs(10), "online", |s| {
        states(s) == ["online"]
    })
    .await;
    // Not a byte passes either way and no socket closes: only the keep-alive can tell.
    let unplugged = Instant::now();
    rig.proxy.freeze();
    sub.wait_for_status(Duration::from_secs(20), "the last will", |s| {
        states(s).last().map(String::as_str) == Some("offline")
    })
    .await;
    let took = unplugged.elapsed();
    // The broker waits 1.5 keep-alives (3 s); the margin is for a loaded machine.
    assert!(
        took >= Duration::from_secs(2),
        "offline after {took:?}: before the keep-alive could have run out"
    );
    let will = sub.statuses().last().cloned().unwrap();
    assert_eq!(will.doc["gateway"], "gw-will");
    assert_eq!(will.doc["boot"], gw.boot);
    rig.proxy.restore();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_goes_offline_by_its_last_will() {
    let peers = ChildPeers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = child_config(
        "gw-killed",
        &dir.path().join("data"),
        peers.proxy.addr().port(),
        peers.device.addr(),
        100,
        50,
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let sub = Collector::start(peers.broker.port(), "edge/gw-killed/#").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway-child"))
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sub.wait_for_status(Duration::from_secs(20), "online", |s| {
        states(s) == ["online"]
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    sub.wait_for_status(Duration::from_secs(20), "the last will", |s| {
        states(s) == ["online", "offline"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_attempt_after_a_lost_connection_is_immediate() {
    let mut rig = GatewayRig::new("gw-retry", 1, SCAN, None).await;
    // Any attempt after the first would wait at least 30 s.
    rig.config.mqtt.backoff_min = Duration::from_secs(60);
    rig.config.mqtt.backoff_max = Duration::from_secs(60);
    let (sub, gw) = rig.start_live().await;
    sub.wait_for_status(Duration::from_secs(10), "online", |s| {
        states(s) == ["online"]
    })
    .await;
    // Connected for more than a second: a healthy connection. Timed from the last connection
    // the proxy accepted: on a loaded machine the first one can be dropped by the broker and
    // replaced, and a connection cut younger than a second is rightly followed by a backoff.
    let mut attempts = rig.proxy.accepted();
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = rig.proxy.accepted();
        if now == attempts {
            break;
        }
        attempts = now;
    }
    rig.proxy.cut();
    rig.proxy.restore();
    // The attempt itself is what is timed: whether the broker then keeps the new connection is
    // its own affair (rumqttd can drop a same-client-id reconnection that overtakes the old
    // connection's close, and the gateway then rightly backs off).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rig.proxy.accepted() == attempts {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new connection attempt within 20 s of the cut (a backoff would wait at least 30 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_where_the_topic_template_says() {
    let mut rig = GatewayRig::new("gw-topic", 2, SCAN, None).await;
    rig.config.mqtt.topic = "plant/{gateway}/{client_id}/{device}/data".parse().unwrap();
    rig.config.mqtt.client_id = "cell-4".to_owned();
    let sub = Collector::start(rig.broker.port(), "plant/#").await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "records of both devices", |m| {
        m.iter().any(|r| r.doc["device"] == "press1")
            && m.iter().any(|r| r.doc["device"] == "press2")
    })
    .await;
    for r in sub.messages() {
        let device = r.doc["device"].as_str().unwrap();
        assert_eq!(r.topic, format!("plant/gw-topic/cell-4/{device}/data"));
    }
    gw.shutdown().await;
}
