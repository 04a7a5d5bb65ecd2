//! What `client_config` reads, when, and how it names what is wrong.

use std::time::{Duration, SystemTime};

use super::super::{client_cert_not_after, KeyProblem, TlsError};
use super::pki::EXPIRING_IN_DAYS;
use super::*;

fn config_error(tls: &TlsSettings) -> TlsError {
    match client_config(tls, "127.0.0.1") {
        Ok(_) => panic!("built a configuration"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn the_ca_file_is_read_again_at_each_call_so_a_replaced_file_takes_effect_without_a_restart()
{
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = copy_to(dir.path(), pki.other_ca(), "ca.pem");
    let front = presenting(pki.server()).await;
    let tls = trusting(&ca);
    let cause = failure(&tls, "127.0.0.1", front.port()).await;
    assert!(cause.contains("unknown CA"), "{cause}");
    std::fs::copy(pki.ca(), &ca).unwrap();
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();
}

#[tokio::test]
async fn a_renewed_client_certificate_takes_effect_at_the_next_call() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = copy_to(dir.path(), &pki.client_expired().cert, "client.pem");
    let key = copy_to(dir.path(), &pki.client_expired().key, "client.key");
    let front = tls_broker(
        FrontConfig::new(&pki.server().cert, &pki.server().key).require_client_cert(pki.ca()),
    )
    .await;
    let tls = TlsSettings {
        cert_file: Some(cert.clone()),
        key_file: Some(SecretSource::File(key.clone())),
        ..trusting(pki.ca())
    };
    let cause = failure(&tls, "127.0.0.1", front.port()).await;
    assert!(cause.contains("certificate expired"), "{cause}");
    std::fs::copy(&pki.client().cert, &cert).unwrap();
    std::fs::copy(&pki.client().key, &key).unwrap();
    connect(&tls, "127.0.0.1", front.port()).await.unwrap();
}

#[test]
fn a_missing_ca_file_is_named_with_its_field_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let err = config_error(&trusting(&missing));
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert_eq!(err.field(), "mqtt.ca_file");
    let text = err.to_string();
    assert!(text.starts_with("mqtt.ca_file: cannot read "), "{text}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "keeps the io error"
    );
}

#[test]
fn a_ca_file_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("ca.pem");
    std::fs::write(&empty, "no certificate here\n").unwrap();
    let err = config_error(&trusting(&empty));
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    assert_eq!(err.field(), "mqtt.ca_file");
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_before_any_connection() {
    let pki = pki();
    let tls = TlsSettings {
        key_file: Some(SecretSource::File(pki.server().key.clone())),
        ..with_client(trusting(pki.ca()), pki.client())
    };
    let err = config_error(&tls);
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with("mqtt.key_file: "), "{text}");
    assert!(text.contains("is not the private key of the certificate in mqtt.cert_file"));
}

/// A key file whose content must never be shown.
const SECRET: &str = "c2VjcmV0IGtleSBtYXRlcmlhbA";

#[test]
fn a_damaged_key_file_is_described_without_its_content() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (format!("{SECRET}\n"), KeyProblem::NotPem),
        (
            format!("-----BEGIN PRIVATE KEY-----\n{SECRET}!!\n-----END PRIVATE KEY-----\n"),
            KeyProblem::Damaged,
        ),
        (
            format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n"),
            KeyProblem::Damaged,
        ),
        (
            format!("-----BEGIN ENCRYPTED PRIVATE KEY-----\n{SECRET}\n-----END ENCRYPTED PRIVATE KEY-----\n"),
            KeyProblem::Encrypted,
        ),
        (
            std::fs::read_to_string(&pki.client().cert).unwrap(),
            KeyProblem::NoKey,
        ),
    ];
    for (i, (content, expected)) in cases.into_iter().enumerate() {
        let key = dir.path().join(format!("key{i}.pem"));
        std::fs::write(&key, &content).unwrap();
        let tls = TlsSettings {
            key_file: Some(SecretSource::File(key)),
            ..with_client(trusting(pki.ca()), pki.client())
        };
        let err = config_error(&tls);
        match &err {
            TlsError::Key { problem, .. } => assert_eq!(*problem, expected, "case {i}"),
            other => panic!("case {i}: {other:?}"),
        }
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(SECRET), "case {i} shows the key: {shown}");
        }
    }
}

#[test]
fn a_host_that_is_no_server_name_is_refused_naming_the_url() {
    let pki = pki();
    let err = match client_config(&trusting(pki.ca()), "bad..name") {
        Ok(_) => panic!("built a configuration"),
        Err(e) => e,
    };
    assert_eq!(err.field(), "mqtt.url");
}

#[test]
fn the_client_certificate_ends_when_its_file_says() {
    let pki = pki();
    let tls = with_client(trusting(pki.ca()), pki.client_expiring());
    let end = client_cert_not_after(&tls).unwrap().unwrap();
    let days = Duration::from_secs(24 * 3600) * EXPIRING_IN_DAYS;
    let expected = SystemTime::now() + days;
    let off = end
        .duration_since(expected)
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_secs(3600),
        "{end:?} is not {expected:?}"
    );
    assert_eq!(client_cert_not_after(&trusting(pki.ca())).unwrap(), None);
}

#[test]
fn the_expired_client_certificates_end_is_read_from_it() {
    let pki = pki();
    let tls = with_client(trusting(pki.ca()), pki.client_expired());
    let end = client_cert_not_after(&tls).unwrap().unwrap();
    // rcgen's 2021-01-01.
    assert_eq!(
        end,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_609_459_200)
    );
}

#[test]
fn the_apis_server_config_refuses_a_key_that_is_not_its_certificates_naming_the_api_fields() {
    let pki = pki();
    let key = SecretSource::File(pki.client().key.clone());
    let err = match super::super::server_config(&pki.server().cert, &key) {
        Ok(_) => panic!("built a server configuration"),
        Err(e) => e,
    };
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(err.field(), "api.key_file");
    let text = err.to_string();
    assert!(
        text.starts_with("api.key_file: ")
            && text.contains("is not the private key of the certificate in api.cert_file"),
        "{text}"
    );
    let own = SecretSource::File(pki.server().key.clone());
    super::super::server_config(&pki.server().cert, &own).unwrap();
}
