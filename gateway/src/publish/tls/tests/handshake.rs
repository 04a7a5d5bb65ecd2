//! Real handshakes: what connects, and the one-line cause of each failure.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::pki::WRONG_NAME;
use super::*;

#[tokio::test]
async fn a_broker_with_a_certificate_from_the_ca_file_is_reached_by_ip_address_and_by_name() {
    let pki = pki();
    let front = presenting(pki.server()).await;
    let tls = trusting(pki.ca());
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();
    connect(&tls, "localhost", front.port()).await.unwrap();
    assert_eq!(front.handshakes(), 2);
    assert_eq!(front.failed_handshakes(), 0);
}

#[tokio::test]
async fn a_ca_file_with_several_certificates_trusts_each_of_them() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let both = [pki.other_ca(), pki.ca()]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    std::fs::write(&bundle, both).unwrap();
    let tls = trusting(&bundle);
    let known = presenting(pki.server()).await;
    connect(&tls, "127.0.0.1", known.port()).await.unwrap();
    let other = presenting(pki.server_unknown_ca()).await;
    connect(&tls, "127.0.0.1", other.port()).await.unwrap();
}

#[tokio::test]
async fn a_broker_certificate_from_an_unknown_ca_is_named_as_such() {
    let pki = pki();
    let front = presenting(pki.server_unknown_ca()).await;
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        "the broker's certificate is not signed by a trusted CA (unknown CA)"
    );
    assert_eq!(front.handshakes(), 0);
}

#[tokio::test]
async fn a_broker_certificate_for_another_name_is_a_name_mismatch_naming_both() {
    let pki = pki();
    let front = presenting(pki.server_wrong_name()).await;
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        format!("name mismatch: the certificate is for {WRONG_NAME}, not 127.0.0.1")
    );
}

#[tokio::test]
async fn server_name_checks_the_certificate_against_that_name_instead_of_the_host() {
    let pki = pki();
    let front = presenting(pki.server_wrong_name()).await;
    let tls = TlsSettings {
        server_name: Some(WRONG_NAME.to_owned()),
        ..trusting(pki.ca())
    };
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();

    let good = presenting(pki.server()).await;
    let elsewhere = TlsSettings {
        server_name: Some("broker.example.com".to_owned()),
        ..trusting(pki.ca())
    };
    let cause = failure(&elsewhere, "127.0.0.1", good.port()).await;
    assert_eq!(
        cause,
        "name mismatch: the certificate is for localhost, 127.0.0.1, ::1, not broker.example.com"
    );
}

#[tokio::test]
async fn an_expired_broker_certificate_is_named_with_the_day_it_expired() {
    let pki = pki();
    let front = presenting(pki.server_expired()).await;
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        "the broker's certificate expired (on 2021-01-01T00:00:00Z)"
    );
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_unknown_ca_an_expired_certificate_and_another_name() {
    let pki = pki();
    let tls = TlsSettings {
        insecure_skip_verify: true,
        ..TlsSettings::default()
    };
    for files in [
        pki.server_unknown_ca(),
        pki.server_expired(),
        pki.server_wrong_name(),
    ] {
        let front = presenting(files).await;
        connect(&tls, "127.0.0.1", front.port()).await.unwrap();
    }
}

/// Presents the good server certificate, but signs the handshake with another key.
#[derive(Debug)]
struct NotItsKey(Arc<CertifiedKey>);

impl ResolvesServerCert for NotItsKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[tokio::test]
async fn insecure_skip_verify_still_refuses_a_broker_that_does_not_hold_its_certificates_key() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = pki();
    let cert = CertificateDer::from_pem_file(&pki.server().cert).unwrap();
    let other_key = PrivateKeyDer::from_pem_file(&pki.client().key).unwrap();
    let key = provider().key_provider.load_private_key(other_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NotItsKey(Arc::new(CertifiedKey::new(
            vec![cert],
            key,
        )))));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = acceptor.accept(stream).await;
        }
    });
    let tls = TlsSettings {
        insecure_skip_verify: true,
        ..TlsSettings::default()
    };
    let cause = failure(&tls, "127.0.0.1", port).await;
    assert!(cause.starts_with("bad signature"), "{cause}");
}

#[tokio::test]
async fn a_client_certificate_signed_by_the_brokers_ca_is_accepted_with_a_pkcs8_or_a_sec1_key() {
    let pki = pki();
    let front = tls_broker(
        FrontConfig::new(&pki.server().cert, &pki.server().key).require_client_cert(pki.ca()),
    )
    .await;
    let tls = with_client(trusting(pki.ca()), pki.client());
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();
    let sec1 = TlsSettings {
        key_file: Some(SecretSource::File(pki.client_sec1_key().to_owned())),
        ..tls
    };
    connect(&sec1, "127.0.0.1", front.port()).await.unwrap();
    assert_eq!(front.handshakes(), 2);
    assert!(front.sessions().iter().all(|s| s.client_cert));
}

/// A front requiring a client certificate from the CA, over TLS 1.3 (the broker's refusal
/// comes after the client's side of the handshake) or TLS 1.2 (it comes within it).
async fn mutual(pki: &Pki, tls12: bool) -> TlsFront {
    let config =
        FrontConfig::new(&pki.server().cert, &pki.server().key).require_client_cert(pki.ca());
    tls_broker(if tls12 { config.tls12_only() } else { config }).await
}

#[tokio::test]
async fn a_broker_that_requires_a_client_certificate_says_so_to_a_gateway_without_one() {
    let pki = pki();
    let front = mutual(&pki, false).await;
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        "the broker rejected the connection without a client certificate (alert: certificate required): set mqtt.cert_file and mqtt.key_file"
    );
    failed_handshakes_reach(&front, 1).await;
}

#[tokio::test]
async fn a_client_certificate_from_an_unknown_ca_is_rejected_by_the_broker_over_tls_1_3_and_1_2() {
    let pki = pki();
    for tls12 in [false, true] {
        let front = mutual(&pki, tls12).await;
        let tls = with_client(trusting(pki.ca()), pki.client_unknown_ca());
        let cause = failure(&tls, "127.0.0.1", front.port()).await;
        assert_eq!(
            cause, "the broker rejected the client certificate (alert: unknown CA)",
            "TLS 1.2 only: {tls12}"
        );
        failed_handshakes_reach(&front, 1).await;
    }
}

#[tokio::test]
async fn an_expired_client_certificate_is_rejected_by_the_broker() {
    let pki = pki();
    let front = mutual(&pki, false).await;
    let tls = with_client(trusting(pki.ca()), pki.client_expired());
    let cause = failure(&tls, "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        "the broker rejected the client certificate (alert: certificate expired)"
    );
    // One that expires in some days (EXPIRING_IN_DAYS) is still good.
    let soon = with_client(trusting(pki.ca()), pki.client_expiring());
    connect(&soon, "127.0.0.1", front.port()).await.unwrap();
}

#[tokio::test]
async fn the_alpn_protocol_is_offered_and_a_broker_that_wants_another_refuses_the_handshake() {
    let pki = pki();
    let front =
        tls_broker(FrontConfig::new(&pki.server().cert, &pki.server().key).alpn("x-amzn-mqtt-ca"))
            .await;
    let aws = TlsSettings {
        alpn: vec!["x-amzn-mqtt-ca".to_owned()],
        ..trusting(pki.ca())
    };
    connect(&aws, "127.0.0.1", front.port()).await.unwrap();
    assert_eq!(
        front.sessions()[0].alpn.as_deref(),
        Some(&b"x-amzn-mqtt-ca"[..])
    );
    let other = TlsSettings {
        alpn: vec!["mqtt".to_owned()],
        ..trusting(pki.ca())
    };
    let cause = failure(&other, "127.0.0.1", front.port()).await;
    assert_eq!(
        cause,
        "the broker refused the handshake (alert: no application protocol)"
    );
}

#[tokio::test]
async fn a_plain_mqtt_listener_that_hangs_up_on_the_client_hello_does_not_speak_tls() {
    let pki = pki();
    // A plain broker takes the ClientHello for a malformed packet and closes the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut first = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut first).await;
        }
    });
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", port).await;
    assert_eq!(
        cause,
        "the broker does not speak TLS on this port (it closed the connection during the handshake)"
    );
}

#[tokio::test]
async fn a_listener_that_answers_in_clear_does_not_speak_tls() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
            let _ = stream.write_all(answer).await;
            let mut sink = [0u8; 1024];
            while matches!(tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await, Ok(n) if n > 0)
            {
            }
        }
    });
    let cause = failure(&trusting(pki.ca()), "127.0.0.1", port).await;
    assert!(
        cause.starts_with(
            "the broker does not speak TLS on this port (it answered with something that is not TLS"
        ),
        "{cause}"
    );
}

#[tokio::test]
async fn a_refused_tcp_connection_has_no_tls_cause() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = connect(&trusting(pki.ca()), "127.0.0.1", port)
        .await
        .unwrap_err();
    assert_eq!(super::super::describe_failure(&err), None, "{err:?}");
}

#[tokio::test]
async fn an_mqtt_5_connection_names_its_tls_failures_the_same_way() {
    use rumqttc::v5;
    let pki = pki();
    let good = presenting(pki.server()).await;
    let unknown = presenting(pki.server_unknown_ca()).await;
    let tls = trusting(pki.ca());
    let attempt = |port: u16| {
        let config = client_config(&tls, "127.0.0.1").unwrap();
        async move {
            let mut options = v5::MqttOptions::new("gw", "127.0.0.1", port);
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
            let (_client, mut events) = v5::AsyncClient::new(options, 10);
            let attempt = async {
                loop {
                    match events.poll().await {
                        Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(_))) => {
                            return Ok(())
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
            };
            tokio::time::timeout(ATTEMPT, attempt)
                .await
                .expect("the attempt ends")
        }
    };
    attempt(good.port()).await.unwrap();
    let err = attempt(unknown.port()).await.unwrap_err();
    assert_eq!(
        super::super::describe_failure_v5(&err).as_deref(),
        Some("the broker's certificate is not signed by a trusted CA (unknown CA)")
    );
}

#[tokio::test]
async fn a_client_certificate_with_an_rsa_key_in_pkcs1_is_accepted() {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let pki = pki();
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let files = pki.client_with_key("rsa", &pkcs8).unwrap();
    let pkcs1 = pki.dir().join("client-rsa.pkcs1.key");
    std::fs::write(&pkcs1, key.to_pkcs1_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    std::fs::set_permissions(&pkcs1, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(std::fs::read_to_string(&pkcs1)
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));

    let front = mutual(&pki, false).await;
    let tls = TlsSettings {
        key_file: Some(SecretSource::File(pkcs1)),
        ..with_client(trusting(pki.ca()), &files)
    };
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();
    assert!(front.sessions()[0].client_cert);
    assert_eq!(super::super::inspect(&tls, "127.0.0.1"), Vec::new());
    // And with the certificate of another key, it is refused as not its key.
    let other = TlsSettings {
        cert_file: Some(pki.client().cert.clone()),
        ..tls
    };
    assert!(matches!(
        client_config(&other, "127.0.0.1"),
        Err(super::super::TlsError::KeyMismatch { .. })
    ));
}
