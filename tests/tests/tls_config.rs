//! TLS from the outside: the TLS front gives the embedded broker a TLS listener (with client
//! certificates) that a client gets through only with the right certificates, and `check`
//! reports the TLS files of a config: the key against the certificate, and its expiry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::pki::{CertFiles, Pki};
use gateway_tests::tls_front::{FrontConfig, TlsFront};
use gateway_tests::{eventually, Collector};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// rustls' ring provider (deprecated in rustls 0.23.48 for lacking post-quantum key exchange;
/// the gateway uses it to keep the build free of cmake and a large C build).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `ca`, presenting `client`.
fn client_tls(ca: &Path, client: &CertFiles) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// Connects through `port` with `tls` and publishes `payload` on `topic` at QoS 1: `Ok` once
/// acknowledged, the connection error otherwise.
async fn publish_once(
    port: u16,
    tls: Arc<ClientConfig>,
    topic: &str,
    payload: &str,
) -> Result<(), rumqttc::ConnectionError> {
    let mut options = MqttOptions::new("tls-client", "localhost", port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut events) = AsyncClient::new(options, 10);
    let attempt = async {
        loop {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
                        .await
                        .unwrap();
                }
                Event::Incoming(Packet::PubAck(_)) => return Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .expect("the attempt ends")
}

#[tokio::test]
async fn the_tls_front_gives_the_embedded_broker_a_mutual_tls_listener() {
    let pki = Pki::generate().unwrap();
    let broker = edge_gateway::demo::broker::start(1 << 20).unwrap();
    let collector = Collector::start(broker.port(), "tls/#").await;
    let front = TlsFront::start(
        broker.addr(),
        FrontConfig::new(&pki.server().cert, &pki.server().key).require_client_cert(pki.ca()),
    )
    .await
    .unwrap();

    let good = client_tls(pki.ca(), pki.client());
    publish_once(front.port(), good, "tls/good", r#"{"n":1}"#)
        .await
        .unwrap();
    collector
        .wait_for(Duration::from_secs(10), "the publish through TLS", |m| {
            m.iter().any(|r| r.topic == "tls/good")
        })
        .await;
    assert_eq!(front.handshakes(), 1);
    assert!(front.sessions()[0].client_cert);
    assert_eq!(front.sessions()[0].sni.as_deref(), Some("localhost"));

    let unknown = client_tls(pki.ca(), pki.client_unknown_ca());
    let refused = publish_once(front.port(), unknown, "tls/unknown", r#"{"n":2}"#).await;
    assert!(
        refused.is_err(),
        "a client certificate from an unknown CA got through"
    );
    // The front counts a failure once its side of the handshake has ended, which may be just
    // after the client's.
    eventually(Duration::from_secs(10), "the front's first failure", || {
        front.failed_handshakes() == 1
    })
    .await;
    assert!(
        front.failures()[0].contains("UnknownIssuer"),
        "{:?}",
        front.failures()
    );

    let wrong_ca = client_tls(pki.other_ca(), pki.client());
    let refused = publish_once(front.port(), wrong_ca, "tls/wrong-ca", r#"{"n":3}"#).await;
    assert!(
        refused.is_err(),
        "the client trusted a server it should not"
    );
    eventually(
        Duration::from_secs(10),
        "the front's second failure",
        || front.failed_handshakes() == 2,
    )
    .await;
    assert!(collector.messages().iter().all(|m| m.topic == "tls/good"));
}

#[tokio::test]
async fn the_tls_front_serves_a_new_certificate_to_new_connections_after_reconfigure() {
    let pki = Pki::generate().unwrap();
    let broker = edge_gateway::demo::broker::start(1 << 20).unwrap();
    let expired = pki.server_expired();
    let front = TlsFront::start(broker.addr(), FrontConfig::new(&expired.cert, &expired.key))
        .await
        .unwrap();
    let tls = client_tls(pki.ca(), pki.client());
    let before = publish_once(front.port(), tls.clone(), "tls/a", "{}").await;
    assert!(
        before.is_err(),
        "an expired server certificate was accepted"
    );
    front
        .reconfigure(FrontConfig::new(&pki.server().cert, &pki.server().key))
        .unwrap();
    publish_once(front.port(), tls, "tls/a", "{}")
        .await
        .unwrap();
}

/// `head` (the sections before the devices) and one Modbus device, written as `name` beside
/// the PKI's files; what `check` prints for it, and whether it passes.
fn check_config(pki: &Pki, name: &str, head: &str) -> (String, bool) {
    let config = format!(
        r#"{head}
[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#
    );
    let path = pki.dir().join(name);
    std::fs::write(&path, config).unwrap();
    edge_gateway::cli::check::run(&path)
}

/// A config for a broker at `mqtts://localhost` with the client certificate `client` and key
/// `key`; what `check` prints for it, and whether it passes.
fn check(pki: &Pki, client: &CertFiles, key: &Path) -> (String, bool) {
    let head = format!(
        r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtts://localhost"
ca_file = "{}"
cert_file = "{}"
key_file = "{}"
"#,
        pki.ca().display(),
        client.cert.display(),
        key.display()
    );
    check_config(pki, "gateway.toml", &head)
}

#[test]
fn check_passes_a_config_whose_tls_files_parse_and_belong_together() {
    let pki = Pki::generate().unwrap();
    let (text, ok) = check(&pki, pki.client(), &pki.client().key);
    assert!(ok, "{text}");
    assert!(text.ends_with(": OK (1 devices, 1 tags)"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    let (text, ok) = check(&pki, pki.client(), pki.client_sec1_key());
    assert!(ok, "a SEC1 key: {text}");
}

#[test]
fn check_fails_a_key_that_is_not_the_certificates() {
    let pki = Pki::generate().unwrap();
    let (text, ok) = check(&pki, pki.client(), &pki.server().key);
    assert!(!ok, "{text}");
    assert!(text.contains("gateway.toml: mqtt.key_file: "), "{text}");
    assert!(
        text.contains("is not the private key of the certificate in mqtt.cert_file"),
        "{text}"
    );
}

#[test]
fn check_fails_an_expired_client_certificate() {
    let pki = Pki::generate().unwrap();
    let expired = pki.client_expired();
    let (text, ok) = check(&pki, expired, &expired.key);
    assert!(!ok, "{text}");
    assert!(text.contains("gateway.toml: mqtt.cert_file: "), "{text}");
    assert!(
        text.contains("the client certificate expired ") && text.contains("(on 2021-01-01"),
        "{text}"
    );
}

#[test]
fn check_passes_a_client_certificate_expiring_in_10_days_with_a_warning_line() {
    let pki = Pki::generate().unwrap();
    let expiring = pki.client_expiring();
    let (text, ok) = check(&pki, expiring, &expiring.key);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("gateway.toml: warning: mqtt.cert_file: "),
        "{text}"
    );
    assert!(lines[0].contains("expires in 9 days"), "{text}");
    assert!(lines[1].ends_with(": OK (1 devices, 1 tags)"), "{text}");
}

/// A config with the HTTP API over HTTPS with `cert` and `key` (and a plain broker url);
/// what `check` prints for it, and whether it passes.
fn check_api(pki: &Pki, cert: &Path, key: &Path) -> (String, bool) {
    let head = format!(
        r#"[gateway]
id = "edge-01"
data_dir = "{}"

[mqtt]
url = "mqtt://localhost"

[api]
listen = "127.0.0.1:0"
cert_file = "{}"
key_file = "{}"
"#,
        pki.dir().join("data").display(),
        cert.display(),
        key.display()
    );
    check_config(pki, "api.toml", &head)
}

#[test]
fn check_passes_an_api_certificate_with_its_own_key() {
    let pki = Pki::generate().unwrap();
    let (text, ok) = check_api(&pki, &pki.server().cert, &pki.server().key);
    assert!(ok, "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.ends_with(": OK (1 devices, 1 tags)"), "{text}");
}

#[test]
fn check_fails_an_api_key_that_is_not_its_certificates_naming_api_key_file() {
    let pki = Pki::generate().unwrap();
    let (text, ok) = check_api(&pki, &pki.server().cert, &pki.client().key);
    assert!(!ok, "{text}");
    let expected = format!(
        "api.toml: api.key_file: {} is not the private key of the certificate in api.cert_file ({})",
        pki.client().key.display(),
        pki.server().cert.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(!text.contains("mqtt."), "{text}");
}

#[test]
fn check_fails_an_api_certificate_that_is_not_one_naming_api_cert_file() {
    let pki = Pki::generate().unwrap();
    let key = &pki.server().key;
    // Not PEM at all.
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "this is no certificate\n").unwrap();
    let (text, ok) = check_api(&pki, &garbage, key);
    assert!(!ok, "{text}");
    let expected = format!(
        "api.toml: api.cert_file: {} holds no certificate",
        garbage.display()
    );
    assert!(text.contains(&expected), "{text}");
    // A PEM certificate section whose content is no certificate.
    let damaged = pki.dir().join("damaged.pem");
    std::fs::write(
        &damaged,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (text, ok) = check_api(&pki, &damaged, key);
    assert!(!ok, "{text}");
    let expected = format!(
        "api.toml: api.cert_file: the certificate in {} cannot be used",
        damaged.display()
    );
    assert!(text.contains(&expected), "{text}");
}
