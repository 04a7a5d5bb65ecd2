//! The mosquitto harness itself: a real mosquitto child does what its builder says (users, ACL,
//! size limits, TLS and client certificates), and the test's collector sees what it forwards.
//! Later tests lean on these rules; here each is shown to hold with plain rumqttc clients.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::mosquitto::{Mosquitto, Tls, COLLECTOR_USER};
use gateway_tests::pki::{CertFiles, Pki, CLIENT_NAME};
use gateway_tests::Collector;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet as V5Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(10);

/// A broker with user `gw` (password `gw-pass`) who may publish under `plant/gw/` only.
async fn broker_with_acl() -> Mosquitto {
    Mosquitto::builder()
        .user("gw", "gw-pass")
        .allow_write("gw", "plant/gw/#")
        .start()
        .await
}

/// An MQTT 3.1.1 client of the main listener, not yet polled.
fn v4_client(broker: &Mosquitto, login: Option<(&str, &str)>) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(
        format!("v4-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    AsyncClient::new(o, 16)
}

/// An MQTT 5 client of the main listener, connected (its CONNACK returned).
async fn v5_client(
    broker: &Mosquitto,
    login: (&str, &str),
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop, ConnAck) {
    let mut o = rumqttc::v5::MqttOptions::new(
        format!("v5-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_credentials(login.0, login.1);
    v5_connect(o).await
}

/// Connects an MQTT 5 client with `o` and polls it until its CONNACK.
async fn v5_connect(
    o: rumqttc::v5::MqttOptions,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop, ConnAck) {
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 16);
    let connack = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(V5Packet::ConnAck(c))) => return c,
                Ok(_) => {}
                Err(e) => panic!("the v5 client cannot connect: {e}"),
            }
        }
    })
    .await
    .expect("a CONNACK");
    (client, el, connack)
}

/// Polls a v5 client until its next PUBACK, and returns its reason code.
async fn next_v5_puback(el: &mut rumqttc::v5::EventLoop) -> PubAckReason {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(V5Packet::PubAck(ack))) => return ack.reason,
                Ok(_) => {}
                Err(e) => panic!("the v5 client lost its connection before a PUBACK: {e}"),
            }
        }
    })
    .await
    .expect("a PUBACK")
}

/// Polls a v4 client until its CONNACK.
async fn v4_connack(el: &mut rumqttc::EventLoop) -> Result<(), rumqttc::ConnectionError> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
                return Ok(());
            }
        }
    })
    .await
    .expect("a CONNACK or an error")
}

/// Polls a v4 client until its next PUBACK, or the error that ends the connection.
async fn next_v4_puback(el: &mut rumqttc::EventLoop) -> Result<(), rumqttc::ConnectionError> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await? {
                return Ok(());
            }
        }
    })
    .await
    .expect("a PUBACK or an error")
}

/// Waits until the collector has a message on `topic`.
async fn wait_for_topic(collector: &Collector, topic: &str) {
    collector
        .wait_for(WAIT, &format!("a message on {topic}"), |m| {
            m.iter().any(|r| r.topic == topic)
        })
        .await;
}

/// The topics the collector has received, in order.
fn topics(collector: &Collector) -> Vec<String> {
    collector.messages().into_iter().map(|m| m.topic).collect()
}

#[tokio::test]
async fn a_v4_publish_reaches_the_collector() {
    let broker = broker_with_acl().await;
    let collector = broker.collector("#").await;
    let (client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in");
    client
        .publish("plant/gw/v4", QoS::AtLeastOnce, false, r#"{"n":4}"#)
        .await
        .unwrap();
    next_v4_puback(&mut el).await.expect("acknowledged");
    wait_for_topic(&collector, "plant/gw/v4").await;
    assert_eq!(collector.messages()[0].doc["n"], 4);
}

#[tokio::test]
async fn a_v5_publish_reaches_the_collector() {
    let broker = broker_with_acl().await;
    let collector = broker.collector("#").await;
    let (client, mut el, connack) = v5_client(&broker, ("gw", "gw-pass")).await;
    assert!(!connack.session_present);
    client
        .publish("plant/gw/v5", V5QoS::AtLeastOnce, false, r#"{"n":5}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::Success);
    wait_for_topic(&collector, "plant/gw/v5").await;
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let broker = broker_with_acl().await;
    let (_client, mut el) = v4_client(&broker, Some(("gw", "not-the-password")));
    let refused = v4_connack(&mut el).await.expect_err("refused");
    assert!(
        matches!(
            refused,
            rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
                    | rumqttc::ConnectReturnCode::BadUserNamePassword
            )
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn anonymous_clients_are_refused_unless_allowed() {
    let broker = broker_with_acl().await;
    let (_client, mut el) = v4_client(&broker, None);
    assert!(v4_connack(&mut el).await.is_err(), "anonymous refused");

    let open = Mosquitto::builder().allow_anonymous(true).start().await;
    let (_client, mut el) = v4_client(&open, None);
    v4_connack(&mut el).await.expect("anonymous allowed");
}

#[tokio::test]
async fn the_acl_refuses_a_topic_with_not_authorized_to_a_v5_client() {
    let broker = broker_with_acl().await;
    let collector = broker.collector("#").await;
    let (client, mut el, _) = v5_client(&broker, ("gw", "gw-pass")).await;
    client
        .publish("plant/other/x", V5QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::NotAuthorized);
    // The refused one was sent first: once the allowed one is in, the refused one never comes.
    client
        .publish("plant/gw/ok", V5QoS::AtLeastOnce, false, r#"{"n":2}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::Success);
    wait_for_topic(&collector, "plant/gw/ok").await;
    assert_eq!(topics(&collector), ["plant/gw/ok"]);
}

/// A broker whose `message_size_limit` is 1 KiB, with user `gw`.
async fn broker_with_size_limit() -> Mosquitto {
    Mosquitto::builder()
        .user("gw", "gw-pass")
        .message_size_limit(1024)
        .start()
        .await
}

/// A JSON payload of about 2 KiB.
fn large_payload() -> String {
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000))
}

// mosquitto 2.0.11 answers an oversized QoS 1 publish from an MQTT 5 client with a PUBACK of
// reason 0x95 ("packet too large"), a code MQTT 5 does not allow in a PUBACK (its manual says
// 0x83); rumqttc 0.25 cannot parse it and ends the connection with a deserialization error.
// A gateway behind such a broker sees a dropped connection, not a refusal.
#[tokio::test]
async fn the_message_size_limit_answers_a_large_v5_publish_with_reason_0x95_which_ends_a_rumqttc_connection(
) {
    let broker = broker_with_size_limit().await;
    let collector = broker.collector("#").await;
    let (client, mut el, _) = v5_client(&broker, ("gw", "gw-pass")).await;
    client
        .publish("plant/large", V5QoS::AtLeastOnce, false, large_payload())
        .await
        .unwrap();
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(V5Packet::PubAck(ack))) => return Ok(ack.reason),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("a PUBACK or an error");
    assert!(ended.is_err(), "rumqttc parsed the PUBACK: {ended:?}");
    assert!(
        broker.log().contains("(m1, rc149)"),
        "the broker sent PUBACK reason 0x95"
    );
    drop(el);

    let (client, mut el, _) = v5_client(&broker, ("gw", "gw-pass")).await;
    client
        .publish("plant/small", V5QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::Success);
    wait_for_topic(&collector, "plant/small").await;
    assert_eq!(
        topics(&collector),
        ["plant/small"],
        "the large one was dropped"
    );
}

// To an MQTT 3.1.1 client the broker acknowledges the oversized publish and drops it: a
// PUBACK is no proof of delivery there, so the gateway must keep its packets under the limit.
#[tokio::test]
async fn the_message_size_limit_acknowledges_a_large_v4_publish_and_drops_it() {
    let broker = broker_with_size_limit().await;
    let collector = broker.collector("#").await;
    let (client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in");
    client
        .publish("plant/large", QoS::AtLeastOnce, false, large_payload())
        .await
        .unwrap();
    next_v4_puback(&mut el)
        .await
        .expect("acknowledged all the same");
    client
        .publish("plant/small", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    next_v4_puback(&mut el).await.expect("acknowledged");
    wait_for_topic(&collector, "plant/small").await;
    assert_eq!(
        topics(&collector),
        ["plant/small"],
        "the large one was dropped"
    );
}

#[tokio::test]
async fn the_max_packet_size_is_announced_to_v5_clients_and_drops_a_client_that_exceeds_it() {
    let broker = Mosquitto::builder()
        .user("gw", "gw-pass")
        .max_packet_size(1024)
        .start()
        .await;
    let collector = broker.collector("#").await;
    let (_v5, _v5_el, connack) = v5_client(&broker, ("gw", "gw-pass")).await;
    let announced = connack.properties.and_then(|p| p.max_packet_size);
    assert_eq!(announced, Some(1024), "the CONNACK tells the limit");

    let (client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in");
    client
        .publish("plant/large", QoS::AtLeastOnce, false, large_payload())
        .await
        .unwrap();
    assert!(
        next_v4_puback(&mut el).await.is_err(),
        "the broker drops the client instead of acknowledging"
    );
    drop(el); // no reconnect, no re-send

    let (client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in again");
    client
        .publish("plant/small", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    next_v4_puback(&mut el).await.expect("acknowledged");
    wait_for_topic(&collector, "plant/small").await;
    assert_eq!(topics(&collector), ["plant/small"]);
}

#[tokio::test]
async fn the_collector_logs_in_on_its_own_listener_and_reads_everything() {
    let broker = broker_with_acl().await;
    let (user, password) = broker.collector_login();
    assert_eq!(user, COLLECTOR_USER);
    assert_ne!(broker.collector_port(), broker.port());
    // Its credentials are no good on the main listener, whose users are the test's.
    let (_client, mut el) = v4_client(&broker, Some((user, password)));
    assert!(v4_connack(&mut el).await.is_err());
    // And without them the collector's listener refuses.
    let mut o = MqttOptions::new("intruder", "127.0.0.1", broker.collector_port());
    o.set_credentials("gw", "gw-pass");
    let (_client, mut el) = AsyncClient::new(o, 4);
    assert!(v4_connack(&mut el).await.is_err());
}

#[tokio::test]
async fn a_restart_keeps_the_ports_and_clients_get_back_in() {
    let mut broker = broker_with_acl().await;
    let (port, collector_port) = (broker.port(), broker.collector_port());
    broker.restart().await;
    assert!(broker.is_running());
    assert_eq!(
        (broker.port(), broker.collector_port()),
        (port, collector_port)
    );
    let collector = broker.collector("#").await;
    let (client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el)
        .await
        .expect("gw logs in after the restart");
    client
        .publish("plant/gw/after", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    next_v4_puback(&mut el).await.expect("acknowledged");
    wait_for_topic(&collector, "plant/gw/after").await;
    assert!(
        broker.log().matches(" running").count() >= 2,
        "two starts logged"
    );
}

#[tokio::test]
async fn a_stopped_broker_refuses_connections() {
    let mut broker = broker_with_acl().await;
    broker.stop().await;
    assert!(!broker.is_running());
    assert!(std::net::TcpStream::connect(broker.addr()).is_err());
}

#[tokio::test]
async fn a_restart_waits_until_its_port_is_free_again() {
    let mut broker = broker_with_acl().await;
    broker.stop().await;
    let squatter = std::net::TcpListener::bind(broker.addr()).expect("the port is free");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(squatter);
    });
    broker.restart().await;
    release.await.unwrap();
    assert!(broker.is_running());
    assert!(
        broker.log().contains("Address already in use"),
        "the first attempt found the port taken"
    );
    let (_client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in");
}

// TLS. The broker's certificate is for 127.0.0.1 (among other names), signed by the test CA;
// clients trust that CA only, with rustls and its ring provider, as the gateway does.

/// rustls' ring provider, the gateway's (deprecated in rustls 0.23.48 for lacking post-quantum
/// key exchange; it keeps the build free of cmake and a C toolchain).
#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config that trusts `ca` and presents `client`, if any.
fn rustls_config(ca: &Path, client: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("the CA file opens") {
        roots
            .add(cert.expect("the CA parses"))
            .expect("the CA is a trust anchor");
    }
    let builder = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let chain = CertificateDer::pem_file_iter(&files.cert)
                .expect("the certificate file opens")
                .collect::<Result<Vec<_>, _>>()
                .expect("the certificate parses");
            let key = PrivateKeyDer::from_pem_file(&files.key).expect("the key parses");
            builder
                .with_client_auth_cert(chain, key)
                .expect("the key matches the certificate")
        }
    };
    Arc::new(config)
}

/// An MQTT 3.1.1 client of the TLS listener, not yet polled.
fn v4_tls_client(
    broker: &Mosquitto,
    tls: Arc<rustls::ClientConfig>,
    login: Option<(&str, &str)>,
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(
        format!("v4-tls-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    AsyncClient::new(o, 16)
}

/// A broker whose TLS listener asks for a client certificate signed by the test CA and takes
/// its name as the user name; the client named [`CLIENT_NAME`] may publish under
/// `plant/gateway/`. Anonymous clients are allowed: only the certificate can keep one out.
async fn mtls_broker(pki: &Pki) -> Mosquitto {
    let server = pki.server();
    Mosquitto::builder()
        .tls(Tls::new(pki.ca(), &server.cert, &server.key).identity_as_username())
        .allow_write(CLIENT_NAME, "plant/gateway/#")
        .allow_anonymous(true)
        .start()
        .await
}

/// Asserts that `attempt` failed below MQTT: the TLS handshake, not a refused CONNACK.
fn assert_refused_by_tls(attempt: Result<(), rumqttc::ConnectionError>) {
    match attempt {
        Ok(()) => panic!("the client got a CONNACK"),
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            panic!("refused by MQTT ({code:?}), not by TLS")
        }
        Err(_) => {}
    }
}

#[tokio::test]
async fn a_client_with_the_right_certificate_connects_over_mutual_tls_as_its_name() {
    let pki = Pki::generate().unwrap();
    let broker = mtls_broker(&pki).await;
    let collector = broker.collector("#").await;
    let mut o = rumqttc::v5::MqttOptions::new("mtls-v5", "127.0.0.1", broker.port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        rustls_config(pki.ca(), Some(pki.client())),
    )));
    let (client, mut el, _) = v5_connect(o).await;
    client
        .publish("plant/gateway/tls", V5QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::Success);
    // The ACL names the certificate's name: another user's topic is refused.
    client
        .publish("plant/other/tls", V5QoS::AtLeastOnce, false, r#"{"n":2}"#)
        .await
        .unwrap();
    assert_eq!(next_v5_puback(&mut el).await, PubAckReason::NotAuthorized);
    wait_for_topic(&collector, "plant/gateway/tls").await;
    assert_eq!(topics(&collector), ["plant/gateway/tls"]);
    assert!(
        broker.log().contains(&format!("u'{CLIENT_NAME}'")),
        "the broker took the certificate's name as the user name"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_by_require_certificate() {
    let pki = Pki::generate().unwrap();
    let broker = mtls_broker(&pki).await;
    let (_client, mut el) = v4_tls_client(&broker, rustls_config(pki.ca(), None), None);
    assert_refused_by_tls(v4_connack(&mut el).await);
}

#[tokio::test]
async fn a_client_with_a_certificate_from_an_unknown_ca_is_refused() {
    let pki = Pki::generate().unwrap();
    let broker = mtls_broker(&pki).await;
    let tls = rustls_config(pki.ca(), Some(pki.client_unknown_ca()));
    let (_client, mut el) = v4_tls_client(&broker, tls, None);
    assert_refused_by_tls(v4_connack(&mut el).await);
}

#[tokio::test]
async fn a_plain_client_gets_nothing_from_a_tls_listener() {
    let pki = Pki::generate().unwrap();
    let broker = mtls_broker(&pki).await;
    let (_client, mut el) = v4_client(&broker, Some(("gw", "gw-pass")));
    assert!(v4_connack(&mut el).await.is_err(), "no MQTT in clear");
}

#[tokio::test]
async fn a_tls_listener_without_client_certificates_logs_users_in_with_their_password() {
    let pki = Pki::generate().unwrap();
    let server = pki.server();
    let broker = Mosquitto::builder()
        .tls(Tls::new(pki.ca(), &server.cert, &server.key))
        .user("gw", "gw-pass")
        .start()
        .await;
    let collector = broker.collector("#").await;
    let tls = rustls_config(pki.ca(), None);
    let (_client, mut el) = v4_tls_client(&broker, tls.clone(), Some(("gw", "wrong")));
    assert!(
        v4_connack(&mut el).await.is_err(),
        "a wrong password is refused"
    );
    let (client, mut el) = v4_tls_client(&broker, tls, Some(("gw", "gw-pass")));
    v4_connack(&mut el).await.expect("gw logs in over TLS");
    client
        .publish("plant/gw/tls", QoS::AtLeastOnce, false, r#"{"n":1}"#)
        .await
        .unwrap();
    next_v4_puback(&mut el).await.expect("acknowledged");
    wait_for_topic(&collector, "plant/gw/tls").await;
}
