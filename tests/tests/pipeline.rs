//! The whole pipeline: simulated Modbus devices → gateway → (proxy) → embedded rumqttd broker →
//! subscriber.

use std::path::Path;
use std::time::Duration;

use edge_gateway::buffer::Buffer;
use edge_gateway::metrics::Metrics;
use gateway_tests::{contiguous_len, contiguous_seqs, drained, eventually, GatewayRig};

fn buffer_len(data_dir: &Path) -> u64 {
    let (b, _) = Buffer::open(&data_dir.join("buffer")).unwrap();
    b.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_each_scan_as_one_json_record_with_the_payload_contract() {
    let rig = GatewayRig::new("gw-test", 1, Duration::from_millis(100), None).await;
    let sub = rig.collector().await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "three records", |m| m.len() >= 3)
        .await;
    gw.shutdown().await;

    let msgs = sub.messages();
    let first = &msgs[0];
    assert_eq!(first.topic, "edge/gw-test/press1");
    let d = &first.doc;
    assert_eq!(d["gateway"], "gw-test");
    assert_eq!(d["boot"], 1);
    assert_eq!(d["device"], "press1");
    assert_eq!(d["historical"], false);
    let samples = d["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 9, "one record carries the whole scan");
    let names: Vec<&str> = samples.iter().map(|s| s["tag"].as_str().unwrap()).collect();
    for t in ["counter", "sine", "ramp", "wave", "status", "running"] {
        assert!(names.contains(&t), "{t} in {names:?}");
    }
    for s in samples {
        assert_eq!(s["quality"], "good");
        assert!(
            s["ts"].as_i64().unwrap() > 1_700_000_000_000,
            "ts is epoch milliseconds"
        );
    }
    let status = samples.iter().find(|s| s["tag"] == "status").unwrap();
    assert!(status["value"].is_string());
    contiguous_seqs(&msgs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_nothing_to_disk_while_the_broker_keeps_up() {
    let mut rig = GatewayRig::new("gw-test", 2, Duration::from_millis(50), None).await;
    // "Keeps up" means acknowledging within the commit interval; a generous one keeps a busy CI
    // machine's scheduling hiccups from counting as a lagging broker.
    rig.config.buffer.commit_interval = Duration::from_millis(500);
    let sub = rig.collector().await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "records", |m| m.len() >= 40)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = gw.metrics.clone();
    let commits = gw.buffer.commits();
    let acked = Metrics::get(&m.acked);
    gw.shutdown().await;
    assert!(acked >= 40, "acked {acked}");
    assert_eq!(commits, 0, "no buffer commit while the broker keeps up");
    assert_eq!(Metrics::get(&m.bytes_written), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_record_after_a_broker_outage_with_no_hole_in_seq() {
    let rig = GatewayRig::new("gw-test", 2, Duration::from_millis(50), None).await;
    let sub = rig.collector().await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "live records", |m| m.len() >= 10)
        .await;

    rig.proxy.cut();
    let m = gw.metrics.clone();
    let at_cut = Metrics::get(&m.records);
    eventually(
        Duration::from_secs(10),
        "records committed during the outage",
        || Metrics::get(&m.records) > at_cut + 40 && gw.buffer.len() > 20,
    )
    .await;
    assert!(!m.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed));
    let scans_during_outage = Metrics::get(&m.records) - at_cut;
    assert!(
        scans_during_outage > 40,
        "the gateway keeps scanning into the buffer"
    );

    rig.proxy.restore();
    let created = drained(&gw, Duration::from_secs(20)).await;
    sub.wait_for(Duration::from_secs(20), "every record", |msgs| {
        contiguous_len(msgs, 1) >= created
    })
    .await;
    gw.shutdown().await;

    let msgs = sub.messages();
    let seqs = contiguous_seqs(&msgs, 1);
    assert_eq!(seqs.first(), Some(&0));
    assert!(
        msgs.iter().any(|r| r.historical()),
        "records sent from disk are flagged historical"
    );
    assert!(msgs.iter().filter(|r| !r.historical()).count() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_what_is_unacknowledged_and_the_next_start_delivers_it() {
    let mut rig = GatewayRig::new("gw-test", 1, Duration::from_millis(50), None).await;
    rig.config.mqtt.shutdown_grace = Duration::from_millis(200);
    let sub = rig.collector().await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "live records", |m| m.len() >= 5)
        .await;
    rig.proxy.cut();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = gw.metrics.clone();
    gw.shutdown().await;
    let created = Metrics::get(&m.records);
    let acked = Metrics::get(&m.acked);
    assert!(created > acked, "records were created during the outage");
    let on_disk = buffer_len(&rig.config.gateway.data_dir);
    let received = contiguous_len(&sub.messages(), 1);
    assert!(
        on_disk + received >= created,
        "everything not received is on disk after shutdown: {on_disk} on disk + {received} received < {created} created"
    );

    rig.proxy.restore();
    let gw = rig.start().await;
    assert_eq!(gw.boot, 2);
    sub.wait_for(
        Duration::from_secs(20),
        "the first boot's backlog",
        |msgs| contiguous_seqs(msgs, 1).len() as u64 >= created,
    )
    .await;
    eventually(Duration::from_secs(10), "an empty buffer", || {
        gw.buffer.is_empty()
    })
    .await;
    let replayed = Metrics::get(&gw.metrics.replayed);
    gw.shutdown().await;
    assert!(
        replayed > 0,
        "the first boot's backlog is replayed from disk"
    );
    let msgs = sub.messages();
    assert!(
        msgs.iter().any(|r| r.boot() == 2),
        "the second boot publishes live"
    );
    contiguous_seqs(&msgs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_at_start_up_is_retried_not_fatal() {
    let rig = GatewayRig::new("gw-test", 1, Duration::from_millis(100), None).await;
    rig.proxy.cut();
    let sub = rig.collector().await;
    let gw = rig.start().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(sub.messages().is_empty());
    rig.proxy.restore();
    sub.wait_for(
        Duration::from_secs(20),
        "records after the broker became reachable",
        |m| m.len() >= 5,
    )
    .await;
    gw.shutdown().await;
    let msgs = sub.messages();
    assert_eq!(
        contiguous_seqs(&msgs, 1).first(),
        Some(&0),
        "nothing from before the connection is lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rate_paces_the_backlog_while_live_records_flow() {
    let mut rig = GatewayRig::new("gw-test", 2, Duration::from_millis(50), None).await;
    let rate = 20;
    rig.config.buffer.replay_rate = Some(rate);
    let sub = rig.collector().await;
    let gw = rig.start().await;
    let m = gw.metrics.clone();
    let connected = || m.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed);
    eventually(Duration::from_secs(10), "connected", connected).await;

    rig.proxy.cut();
    eventually(Duration::from_secs(20), "a backlog on disk", || {
        gw.buffer.len() > 80
    })
    .await;
    let replayed_before = Metrics::get(&m.replayed);
    rig.proxy.restore();
    eventually(Duration::from_secs(20), "reconnected", connected).await;
    let started = std::time::Instant::now();
    let live_before = sub.messages().iter().filter(|r| !r.historical()).count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replayed = Metrics::get(&m.replayed) - replayed_before;
    let elapsed = started.elapsed().as_secs_f64();
    let live = sub.messages().iter().filter(|r| !r.historical()).count() - live_before;
    // A tenth of a second's burst, the rate since, and one chunk read before the count started.
    let allowed = (f64::from(rate) * (elapsed + 0.1)).ceil() as u64 + 2;
    assert!(
        replayed <= allowed,
        "{replayed} records replayed in {elapsed:.1} s at replay_rate {rate}"
    );
    assert!(replayed > 0, "the replay goes on at its pace");
    assert!(live > 10, "live records flow during the replay ({live})");

    // Paced, the backlog still drains completely, with no hole.
    let created = drained(&gw, Duration::from_secs(60)).await;
    sub.wait_for(Duration::from_secs(20), "every record", |msgs| {
        contiguous_len(msgs, 1) >= created
    })
    .await;
    gw.shutdown().await;
    contiguous_seqs(&sub.messages(), 1);
}
