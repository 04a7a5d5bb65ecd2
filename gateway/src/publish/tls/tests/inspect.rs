//! What `check` says of the TLS files.

use std::time::{Duration, SystemTime};

use super::super::inspect::inspect_at;
use super::super::{inspect, Finding, Severity};
use super::*;

fn problems(findings: &[Finding]) -> Vec<&Finding> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Problem)
        .collect()
}

#[test]
fn good_files_with_a_client_certificate_give_no_finding() {
    let pki = pki();
    let tls = with_client(trusting(pki.ca()), pki.client());
    assert_eq!(inspect(&tls, "broker.example.com"), Vec::new());
    let sec1 = TlsSettings {
        key_file: Some(SecretSource::File(pki.client_sec1_key().to_owned())),
        ..tls
    };
    assert_eq!(inspect(&sec1, "broker.example.com"), Vec::new());
}

#[test]
fn an_expired_client_certificate_is_a_problem() {
    let pki = pki();
    let tls = with_client(trusting(pki.ca()), pki.client_expired());
    let findings = inspect(&tls, "broker.example.com");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].severity, Severity::Problem);
    assert_eq!(findings[0].field, "mqtt.cert_file");
    let text = findings[0].to_string();
    assert!(text.starts_with("mqtt.cert_file: "), "{text}");
    assert!(text.contains(": the client certificate expired "), "{text}");
    assert!(text.ends_with(" ago (on 2021-01-01T00:00:00Z)"), "{text}");
}

#[test]
fn a_client_certificate_expiring_within_30_days_is_a_warning_saying_when() {
    let pki = pki();
    let tls = with_client(trusting(pki.ca()), pki.client_expiring());
    let findings = inspect(&tls, "broker.example.com");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].severity, Severity::Warning);
    let text = findings[0].to_string();
    assert!(text.starts_with("mqtt.cert_file: "), "{text}");
    assert!(
        text.contains("the client certificate expires in 9 days (on "),
        "{text}"
    );
    assert!(text.ends_with(": renew it before then"), "{text}");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_a_problem() {
    let pki = pki();
    let tls = TlsSettings {
        key_file: Some(SecretSource::File(pki.client_expired().key.clone())),
        ..with_client(trusting(pki.ca()), pki.client())
    };
    let findings = inspect(&tls, "broker.example.com");
    let problems = problems(&findings);
    assert_eq!(problems.len(), 1, "{findings:?}");
    assert_eq!(problems[0].field, "mqtt.key_file");
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsSettings {
        ca_file: Some(dir.path().join("missing-ca.pem")),
        cert_file: Some(dir.path().join("missing-client.pem")),
        key_file: Some(SecretSource::File(pki.client().cert.clone())),
        ..TlsSettings::default()
    };
    let findings = inspect(&tls, "bad..name");
    let fields: Vec<&str> = problems(&findings).iter().map(|f| f.field).collect();
    assert_eq!(
        fields,
        [
            "mqtt.url",
            "mqtt.ca_file",
            "mqtt.cert_file",
            "mqtt.key_file"
        ]
    );
}

#[test]
fn a_ca_file_whose_every_certificate_has_expired_is_a_problem() {
    let pki = pki();
    let tls = trusting(pki.ca());
    // rcgen's CA is valid until 4096: look from the year 5000.
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(95_617_584_000);
    let findings = inspect_at(&tls, "broker.example.com", far);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].field, "mqtt.ca_file");
    assert_eq!(findings[0].severity, Severity::Problem);
    assert!(inspect(&tls, "broker.example.com").is_empty());
}

#[test]
fn insecure_skip_verify_is_a_warning() {
    let tls = TlsSettings {
        insecure_skip_verify: true,
        ..TlsSettings::default()
    };
    let findings = inspect(&tls, "broker.example.com");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].severity, Severity::Warning);
    assert_eq!(findings[0].field, "mqtt.insecure_skip_verify");
}

#[test]
fn a_key_given_as_a_credential_outside_the_service_is_left_unchecked() {
    let pki = pki();
    let tls = TlsSettings {
        key_file: Some(SecretSource::Credential("mqtt-key".to_owned())),
        ..with_client(trusting(pki.ca()), pki.client())
    };
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
        assert_eq!(inspect(&tls, "broker.example.com"), Vec::new());
    }
}

#[test]
fn a_key_file_others_may_read_is_left_to_the_gateways_own_warning() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let key = copy_to(dir.path(), &pki.client().key, "client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls = TlsSettings {
        key_file: Some(SecretSource::File(key)),
        ..with_client(trusting(pki.ca()), pki.client())
    };
    assert_eq!(inspect(&tls, "broker.example.com"), Vec::new());
}

#[test]
fn a_missing_key_file_is_a_problem() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsSettings {
        key_file: Some(SecretSource::File(dir.path().join("gone.key"))),
        ..with_client(trusting(pki.ca()), pki.client())
    };
    let findings = inspect(&tls, "broker.example.com");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].severity, Severity::Problem);
    assert_eq!(findings[0].field, "mqtt.key_file");
}
