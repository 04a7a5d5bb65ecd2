//! The gateway over TLS, against real TLS peers on loopback: mosquitto with client certificates
//! and an ACL, and a TLS front (rustls) before the embedded rumqttd broker whose certificate a
//! test changes at will. Certificates are made at test time (`gateway_tests::pki`).
//!
//! Each failure (unknown CA, wrong name, expired, client certificate missing or rejected, a
//! port that does not speak TLS) is named in the gateway's log, nothing goes out in clear, and
//! every record arrives once the fault is corrected: no hole in `seq`.

use std::process::Command;
use std::time::Duration;

use edge_gateway::config::{TlsSettings, TopicTemplate};
use edge_gateway::metrics::Metrics;
use edge_gateway::secret::SecretSource;
use gateway_tests::mosquitto::{Mosquitto, Tls};
use gateway_tests::pki::{Pki, CLIENT_NAME};
use gateway_tests::tls_front::{FrontConfig, TlsFront};
use gateway_tests::{
    child_config, contiguous_seqs, drained, eventually, spawn_child_logging, with_mqtt_keys,
    ChildPeers, Collector, GatewayRig,
};

const SCAN: Duration = Duration::from_millis(50);

/// TLS settings that trust the test CA, with the good client certificate when `client`.
fn tls(pki: &Pki, client: bool) -> TlsSettings {
    TlsSettings {
        ca_file: Some(pki.ca().to_owned()),
        cert_file: client.then(|| pki.client().cert.clone()),
        key_file: client.then(|| SecretSource::File(pki.client().key.clone())),
        ..TlsSettings::default()
    }
}

fn assert_all_arrived(sub: &Collector, created: u64) {
    let seqs = contiguous_seqs(&sub.messages(), 1);
    assert_eq!(seqs.first(), Some(&0), "boot 1 starts at seq 0");
    assert!(
        seqs.len() as u64 >= created,
        "{} contiguous of {created} made",
        seqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_with_an_acl_everything_arrives_across_a_broker_restart() {
    let pki = Pki::generate().unwrap();
    let server = pki.server();
    let mut broker = Mosquitto::builder()
        .tls(Tls::new(pki.ca(), &server.cert, &server.key).identity_as_username())
        // The ACL confines the gateway (its certificate's name) to its own topics.
        .allow_write(CLIENT_NAME, &format!("plant/{CLIENT_NAME}/#"))
        .allow_write(CLIENT_NAME, "edge/gw-mtls/status")
        .start()
        .await;
    let mut rig = GatewayRig::new("gw-mtls", 1, SCAN, Some(broker.addr())).await;
    rig.config.mqtt.tls = Some(tls(&pki, true));
    rig.config.mqtt.client_id = CLIENT_NAME.to_owned();
    rig.config.mqtt.topic = "plant/{client_id}/{device}"
        .parse::<TopicTemplate>()
        .unwrap();
    rig.config.mqtt.backoff_max = Duration::from_secs(1);
    let sub = broker.collector("plant/#").await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(20), "records over mTLS", |m| {
        m.len() >= 20
    })
    .await;
    assert!(sub
        .messages()
        .iter()
        .all(|r| r.topic == format!("plant/{CLIENT_NAME}/press1")));
    // The client certificate's expiry is reported (the test PKI's runs to the year 4096).
    let not_after = Metrics::get(&gw.metrics.tls_client_cert_not_after);
    assert!(not_after > 4_000_000_000, "{not_after}");

    // The broker restarts (without persistence: it forgets every session); the gateway is
    // kept away until a new subscriber listens, so the audit sees all the broker forwards.
    rig.proxy.cut();
    broker.restart().await;
    let after = broker.collector("plant/#").await;
    rig.proxy.restore();
    eventually(Duration::from_secs(20), "a new connection", || {
        Metrics::get(&gw.metrics.mqtt_connects) >= 2
    })
    .await;
    let created = drained(&gw, Duration::from_secs(30)).await;
    gw.shutdown().await;
    let mut all = sub.messages();
    all.extend(after.messages());
    let seqs = contiguous_seqs(&all, 1);
    assert_eq!(seqs.first(), Some(&0));
    assert!(seqs.len() as u64 >= created, "{} of {created}", seqs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_configured_nothing_goes_out_in_clear_to_a_plain_port() {
    let pki = Pki::generate().unwrap();
    let mut rig = GatewayRig::new("gw-clear", 1, SCAN, None).await;
    rig.config.mqtt.tls = Some(tls(&pki, false));
    rig.config.mqtt.backoff_max = Duration::from_millis(500);
    let sub = rig.collector().await;
    let gw = rig.start().await;
    // The proxy leads to the plain rumqttd: every handshake fails there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(Metrics::get(&gw.metrics.records) > 10);
    assert_eq!(Metrics::get(&gw.metrics.mqtt_connects), 0);
    assert!(
        sub.messages().is_empty(),
        "a record reached the plain broker"
    );
    assert!(
        sub.statuses().is_empty(),
        "the status reached the plain broker"
    );

    // A TLS front before the same broker: everything arrives.
    let server = pki.server();
    let front = TlsFront::start(
        rig.broker.addr(),
        FrontConfig::new(&server.cert, &server.key),
    )
    .await
    .unwrap();
    rig.proxy.repoint(front.addr());
    let created = drained(&gw, Duration::from_secs(30)).await;
    gw.shutdown().await;
    assert_all_arrived(&sub, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_that_fails_verification_holds_records_until_it_is_corrected() {
    let pki = Pki::generate().unwrap();
    let mut rig = GatewayRig::new("gw-verify", 1, SCAN, None).await;
    let good = FrontConfig::new(&pki.server().cert, &pki.server().key);
    let front = TlsFront::start(rig.broker.addr(), good.clone())
        .await
        .unwrap();
    rig.proxy.repoint(front.addr());
    rig.config.mqtt.tls = Some(tls(&pki, false));
    rig.config.mqtt.backoff_max = Duration::from_millis(500);
    let (sub, gw) = rig.start_live().await;
    let bad = [
        pki.server_unknown_ca(),
        pki.server_wrong_name(),
        pki.server_expired(),
    ];
    for files in bad {
        front
            .reconfigure(FrontConfig::new(&files.cert, &files.key))
            .unwrap();
        let failed = front.failed_handshakes();
        front.cut();
        eventually(Duration::from_secs(20), "refused handshakes", || {
            front.failed_handshakes() >= failed + 2
        })
        .await;
        let delivered = sub.messages().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sub.messages().len(),
            delivered,
            "records passed a certificate that fails verification ({})",
            files.cert.display()
        );
        front.reconfigure(good.clone()).unwrap();
        let connects = Metrics::get(&gw.metrics.mqtt_connects);
        eventually(Duration::from_secs(20), "a connection again", || {
            Metrics::get(&gw.metrics.mqtt_connects) > connects
        })
        .await;
    }
    let created = drained(&gw, Duration::from_secs(30)).await;
    gw.shutdown().await;
    assert_all_arrived(&sub, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_client_certificate_is_replaced_on_disk_and_used_at_the_next_connect() {
    let pki = Pki::generate().unwrap();
    let server = pki.server();
    let broker = Mosquitto::builder()
        .tls(Tls::new(pki.ca(), &server.cert, &server.key).require_certificate())
        .allow_anonymous(true)
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    // A certificate from a CA the broker does not trust.
    std::fs::copy(&pki.client_unknown_ca().cert, &cert).unwrap();
    std::fs::copy(&pki.client_unknown_ca().key, &key).unwrap();
    let mut rig = GatewayRig::new("gw-renew", 1, SCAN, Some(broker.addr())).await;
    rig.config.mqtt.tls = Some(TlsSettings {
        cert_file: Some(cert.clone()),
        key_file: Some(SecretSource::File(key.clone())),
        ..tls(&pki, false)
    });
    rig.config.mqtt.backoff_max = Duration::from_millis(500);
    let sub = broker.collector("edge/gw-renew/#").await;
    let gw = rig.start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(Metrics::get(&gw.metrics.records) > 10);
    assert!(
        sub.messages().is_empty(),
        "the broker took a rejected client"
    );
    // The renewed certificate and key, written over the old files: no restart.
    std::fs::copy(&pki.client().cert, &cert).unwrap();
    std::fs::copy(&pki.client().key, &key).unwrap();
    let created = drained(&gw, Duration::from_secs(30)).await;
    gw.shutdown().await;
    assert_all_arrived(&sub, created);
}

/// The gateway child's log (stderr) while `check` holds.
fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tls_failure_is_named_in_the_log() {
    let pki = Pki::generate().unwrap();
    let peers = ChildPeers::start().await;
    let good = FrontConfig::new(&pki.server().cert, &pki.server().key);
    let unknown = pki.server_unknown_ca();
    let front = TlsFront::start(
        peers.broker.addr(),
        FrontConfig::new(&unknown.cert, &unknown.key),
    )
    .await
    .unwrap();
    peers.proxy.repoint(front.addr());
    let dir = tempfile::tempdir().unwrap();
    let text = child_config(
        "gw-tlslog",
        &dir.path().join("data"),
        peers.proxy.addr().port(),
        peers.device.addr(),
        100,
        50,
    );
    let keys = format!(
        "backoff_max = \"300ms\"\nca_file = \"{}\"",
        pki.ca().display()
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, with_mqtt_keys(&text, &keys, true)).unwrap();
    let log = dir.path().join("gateway.log");
    let mut child = spawn_child_logging(
        env!("CARGO_BIN_EXE_gateway-child"),
        &config,
        &log,
        "edge_gateway::publish=debug",
        &[],
    );
    let expect = |what: &'static str| {
        let log = log.clone();
        async move {
            eventually(Duration::from_secs(20), what, || {
                log_of(&log).contains(what)
            })
            .await;
        }
    };
    expect("not signed by a trusted CA (unknown CA)").await;
    let wrong = pki.server_wrong_name();
    front
        .reconfigure(FrontConfig::new(&wrong.cert, &wrong.key))
        .unwrap();
    expect("name mismatch").await;
    let expired = pki.server_expired();
    front
        .reconfigure(FrontConfig::new(&expired.cert, &expired.key))
        .unwrap();
    expect("the broker's certificate expired").await;
    front
        .reconfigure(good.clone().require_client_cert(pki.ca()))
        .unwrap();
    expect("without a client certificate").await;
    // The plain broker itself: not TLS.
    peers.proxy.repoint(peers.broker.addr());
    expect("does not speak TLS").await;
    let sub = Collector::start(peers.broker.port(), "edge/gw-tlslog/#").await;
    front.reconfigure(good).unwrap();
    peers.proxy.repoint(front.addr());
    sub.wait_for(Duration::from_secs(20), "records once TLS is right", |m| {
        !m.is_empty()
    })
    .await;
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    let text = log_of(&log);
    let tls_lines = text.lines().filter(|l| l.contains("TLS: ")).count();
    assert!(tls_lines >= 5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_username_and_password_broker_over_tls_takes_everything_with_mqtt5() {
    // The cloud brokers' usual recipe (HiveMQ Cloud, EMQX Cloud): TLS, a user and a password,
    // the user confined to its topics.
    let pki = Pki::generate().unwrap();
    let server = pki.server();
    let broker = Mosquitto::builder()
        .tls(Tls::new(pki.ca(), &server.cert, &server.key))
        .user("edge-01", "cloud-password")
        .allow_write("edge-01", "edge/gw-cloud/#")
        .start()
        .await;
    let mut rig = GatewayRig::new("gw-cloud", 1, SCAN, Some(broker.addr())).await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "cloud-password\n").unwrap();
    let m = &mut rig.config.mqtt;
    m.tls = Some(tls(&pki, false));
    m.username = Some("edge-01".to_owned());
    m.password_file = Some(SecretSource::File(password));
    m.protocol_version = edge_gateway::config::ProtocolVersion::V5;
    let sub = broker.collector("edge/gw-cloud/#").await;
    let gw = rig.start().await;
    sub.wait_for(Duration::from_secs(20), "records", |m| m.len() >= 20)
        .await;
    sub.wait_for_status(Duration::from_secs(10), "online", |s| !s.is_empty())
        .await;
    let created = drained(&gw, Duration::from_secs(20)).await;
    gw.shutdown().await;
    assert_all_arrived(&sub, created);
}
