//! `edge-gateway audit` as a cloud consumer runs it: against a running gateway through an
//! outage (no hole, the replay counted as historical and out of order), and against crafted
//! records with a seq deliberately left out (a hole, so exit 1), duplicates and a new boot, and
//! logging in to a broker that wants a password (mosquitto).

use std::time::Duration;

use edge_gateway::cli::audit::{self, AuditArgs, AuditFormat};
use edge_gateway::metrics::Metrics;
use gateway_tests::{contiguous_len, drained, eventually, GatewayRig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

fn args(port: u16, filter: &str) -> AuditArgs {
    AuditArgs {
        url: Some(format!("mqtt://127.0.0.1:{port}")),
        config: None,
        topic: vec![filter.to_owned()],
        seconds: Some(60),
        idle: Some(1),
        username: None,
        password_file: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        format: AuditFormat::Json,
        json: true,
    }
}

/// Cuts the gateway's link until more than 20 records were made and more than 10 wait on
/// disk, then restores it.
async fn outage(rig: &GatewayRig, gw: &edge_gateway::pipeline::Running) {
    rig.proxy.cut();
    let at_cut = Metrics::get(&gw.metrics.records);
    eventually(
        Duration::from_secs(10),
        "records buffered during the outage",
        || Metrics::get(&gw.metrics.records) > at_cut + 20 && gw.buffer.len() > 10,
    )
    .await;
    rig.proxy.restore();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_running_gateway_through_an_outage_finds_no_hole_and_counts_the_replay() {
    let rig = GatewayRig::new("gw-audit", 2, Duration::from_millis(50), None).await;
    let sub = rig.collector().await;
    let mut a = args(rig.broker.port(), &rig.filter());
    // Quiet for longer than the outage: the audit ends after the gateway's shutdown.
    a.idle = Some(5);
    let auditor = tokio::spawn(async move { audit::run(&a, CancellationToken::new()).await });
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(10), "live records", |m| m.len() >= 10)
        .await;

    outage(&rig, &gw).await;
    let created = drained(&gw, Duration::from_secs(20)).await;
    sub.wait_for(Duration::from_secs(20), "every record", |m| {
        contiguous_len(m, 1) >= created
    })
    .await;
    gw.shutdown().await;

    let found = auditor.await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_str(&found.text).unwrap();
    assert!(!found.holes, "{}", found.text);
    let streams = report["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{}", found.text);
    let s = &streams[0];
    assert_eq!(
        (s["gateway"].as_str(), s["boot"].as_u64()),
        (Some("gw-audit"), Some(1))
    );
    assert_eq!(s["missing"], 0);
    assert!(s["records"].as_u64().unwrap() >= 30, "{}", found.text);
    assert!(
        s["historical_share"].as_f64().unwrap() > 0.0,
        "{}",
        found.text
    );
    assert!(s["latency_ms"]["samples"].as_u64().unwrap() > 0);
    assert!(
        report["other_messages"].as_u64().unwrap() >= 1,
        "status and meta"
    );
    assert_eq!(report["garbled_messages"], 0);
}

/// Publishes each `(topic, payload)` retained, so a subscriber that comes later still gets them.
async fn publish_retained(port: u16, messages: Vec<(String, String)>) {
    publish_retained_as(port, None, messages).await;
}

/// [`publish_retained`], logging in with `login` when given.
async fn publish_retained_as(
    port: u16,
    login: Option<(&str, &str)>,
    messages: Vec<(String, String)>,
) {
    let mut o = MqttOptions::new("crafter", "127.0.0.1", port);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    let (client, mut el) = AsyncClient::new(o, 64);
    let total = messages.len();
    tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, true, payload)
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < total {
        if let Ok(Event::Incoming(Packet::PubAck(_))) =
            tokio::time::timeout(Duration::from_secs(10), el.poll())
                .await
                .expect("the broker answers")
        {
            acked += 1;
        }
    }
}

fn record(boot: u64, seq: u64, historical: bool) -> String {
    format!(
        r#"{{"gateway":"edge-x","boot":{boot},"device":"d","seq":{seq},"historical":{historical},"samples":[{{"tag":"t","value":1,"quality":"good","ts":1}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_deliberately_removed_seq_as_a_hole_and_fails() {
    gateway_tests::init_tracing();
    let broker = edge_gateway::demo::broker::start(1 << 20).unwrap();
    // Boot 7: seq 0..=9 without 4, seq 2 twice (on two topics), seq 8 replayed. Boot 8 starts
    // again at 100: no hole between boots.
    let mut crafted = Vec::new();
    for seq in (0..10).filter(|s| *s != 4) {
        crafted.push((format!("crafted/edge-x/r{seq}"), record(7, seq, seq == 8)));
    }
    crafted.push(("crafted/edge-x/again2".to_owned(), record(7, 2, true)));
    for seq in 100..103 {
        crafted.push((format!("crafted/edge-x/b8r{seq}"), record(8, seq, false)));
    }
    crafted.push((
        "crafted/edge-x/status".to_owned(),
        r#"{"gateway":"edge-x","boot":8,"state":"online","ts":1}"#.to_owned(),
    ));
    publish_retained(broker.port(), crafted).await;

    let mut a = args(broker.port(), "crafted/#");
    a.json = false;
    let found = audit::run(&a, CancellationToken::new()).await.unwrap();
    assert!(found.holes, "{}", found.text);
    assert!(
        found.text.contains("gateway edge-x boot 7:"),
        "{}",
        found.text
    );
    assert!(found.text.contains("  holes: 4\n"), "{}", found.text);
    assert!(
        found.text.contains("missing 1, duplicates 1"),
        "{}",
        found.text
    );
    assert!(
        found.text.contains("gateway edge-x boot 8:"),
        "{}",
        found.text
    );
    assert!(
        found.text.contains("missing 0, duplicates 0"),
        "{}",
        found.text
    );
    assert!(found.text.contains("LOSS"), "{}", found.text);

    // The same records with seq 4 in place: no hole.
    publish_retained(
        broker.port(),
        vec![("crafted/edge-x/r4".to_owned(), record(7, 4, false))],
    )
    .await;
    let found = audit::run(&a, CancellationToken::new()).await.unwrap();
    assert!(!found.holes, "{}", found.text);
    assert!(found.text.ends_with("no hole\n"), "{}", found.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_logs_in_with_the_credentials_it_is_given_as_a_consumer_would() {
    let broker = gateway_tests::mosquitto::Mosquitto::builder()
        .user("crafter", "crafter-password")
        .user("cloud", "cloud-password")
        .allow_write("crafter", "crafted/#")
        .allow_read("cloud", "crafted/#")
        .start()
        .await;
    let crafted = (0..5)
        .map(|seq| (format!("crafted/edge-x/r{seq}"), record(7, seq, false)))
        .collect();
    publish_retained_as(
        broker.port(),
        Some(("crafter", "crafter-password")),
        crafted,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "cloud-password").unwrap();

    let mut a = args(broker.port(), "crafted/#");
    a.username = Some("cloud".into());
    a.password_file = Some(password.display().to_string());
    let found = audit::run(&a, CancellationToken::new()).await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&found.text).unwrap();
    assert_eq!(report["streams"][0]["records"], 5, "{}", found.text);
    assert!(!found.holes);

    // A wrong password gets nothing (the broker refuses the connection).
    std::fs::write(&password, "wrong").unwrap();
    a.seconds = Some(2);
    let found = audit::run(&a, CancellationToken::new()).await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&found.text).unwrap();
    assert_eq!(
        report["streams"].as_array().map(Vec::len),
        Some(0),
        "{}",
        found.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_of_a_sparkplug_gateway_reads_its_ddata_uuids_and_finds_no_hole_through_an_outage() {
    use edge_gateway::config::{Format, SparkplugSettings};
    let mut rig = GatewayRig::new("sp-audit", 2, Duration::from_millis(50), None).await;
    rig.config.mqtt.format = Format::SparkplugB;
    rig.config.mqtt.sparkplug = Some(SparkplugSettings {
        group_id: "plant".into(),
        edge_node_id: "sp-audit".into(),
        primary_host_id: None,
    });
    let mut a = args(rig.broker.port(), "spBv1.0/plant/#");
    a.format = AuditFormat::SparkplugB;
    a.idle = Some(5);
    let auditor = tokio::spawn(async move { audit::run(&a, CancellationToken::new()).await });
    let gw = rig.start().await;
    eventually(Duration::from_secs(10), "live records", || {
        Metrics::get(&gw.metrics.acked) >= 10
    })
    .await;
    outage(&rig, &gw).await;
    drained(&gw, Duration::from_secs(20)).await;
    gw.shutdown().await;

    let found = auditor.await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_str(&found.text).unwrap();
    assert!(!found.holes, "{}", found.text);
    let streams = report["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{}", found.text);
    let s = &streams[0];
    assert_eq!(s["gateway"], "sp-audit", "{}", found.text);
    assert_eq!(s["missing"], 0);
    assert!(s["records"].as_u64().unwrap() >= 30, "{}", found.text);
    assert!(
        s["historical_share"].as_f64().unwrap() > 0.0,
        "{}",
        found.text
    );
    assert!(
        report["other_messages"].as_u64().unwrap() >= 2,
        "births and deaths are passed over: {}",
        found.text
    );
}
