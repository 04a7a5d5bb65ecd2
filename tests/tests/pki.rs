//! The test PKI: each certificate is what its name says, as rustls' own verifiers see it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway_tests::pki::{CertFiles, Pki, EXPIRING_IN_DAYS, WRONG_NAME};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, Error, RootCertStore};

/// rustls' ring provider (deprecated in rustls 0.23.48 for lacking post-quantum key exchange;
/// the gateway uses it to keep the build free of cmake and a C toolchain).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn leaf(files: &CertFiles) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(&files.cert).unwrap()
}

/// What rustls says of `files` as the certificate of server `name`, at `at`.
fn verify_server(pki: &Pki, files: &CertFiles, name: &str, at: SystemTime) -> Result<(), Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(pki.ca()), provider())
        .build()
        .unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(
            &leaf(files),
            &[],
            &name,
            &[],
            UnixTime::since_unix_epoch(since(at)),
        )
        .map(|_| ())
}

/// What rustls says of `files` as a client certificate, at `at`.
fn verify_client(pki: &Pki, files: &CertFiles, at: SystemTime) -> Result<(), Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(pki.ca()), provider())
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&leaf(files), &[], UnixTime::since_unix_epoch(since(at)))
        .map(|_| ())
}

fn since(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::UNIX_EPOCH).unwrap()
}

fn keys_match(cert: &CertFiles, key: &Path) -> Result<(), Error> {
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    CertifiedKey::from_der(vec![leaf(cert)], key, &provider()).map(|_| ())
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[test]
fn the_server_certificate_is_valid_for_localhost_and_the_loopback_addresses() {
    let pki = Pki::generate().unwrap();
    let now = SystemTime::now();
    for name in ["localhost", "127.0.0.1", "::1"] {
        verify_server(&pki, pki.server(), name, now).unwrap();
    }
    keys_match(pki.server(), &pki.server().key).unwrap();
}

#[test]
fn each_bad_server_certificate_fails_for_its_own_reason() {
    let pki = Pki::generate().unwrap();
    let now = SystemTime::now();
    let expired = verify_server(&pki, pki.server_expired(), "localhost", now);
    assert!(
        matches!(
            expired,
            Err(Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ),
        "{expired:?}"
    );
    let wrong = verify_server(&pki, pki.server_wrong_name(), "localhost", now);
    assert!(
        matches!(
            wrong,
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{wrong:?}"
    );
    verify_server(&pki, pki.server_wrong_name(), WRONG_NAME, now).unwrap();
    let unknown = verify_server(&pki, pki.server_unknown_ca(), "localhost", now);
    assert_eq!(
        unknown,
        Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
    );
}

#[test]
fn the_client_certificates_are_good_expired_expiring_and_from_an_unknown_ca() {
    let pki = Pki::generate().unwrap();
    let now = SystemTime::now();
    verify_client(&pki, pki.client(), now).unwrap();
    verify_client(&pki, &pki.client_for("line-2").unwrap(), now).unwrap();
    assert!(verify_client(&pki, pki.client_expired(), now).is_err());
    let days = EXPIRING_IN_DAYS;
    verify_client(&pki, pki.client_expiring(), now + DAY * (days - 1)).unwrap();
    assert!(verify_client(&pki, pki.client_expiring(), now + DAY * (days + 1)).is_err());
    assert_eq!(
        verify_client(&pki, pki.client_unknown_ca(), now),
        Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
    );
}

#[test]
fn the_client_key_as_pkcs8_and_as_sec1_matches_the_client_certificate_and_no_other() {
    let pki = Pki::generate().unwrap();
    let sec1 = std::fs::read_to_string(pki.client_sec1_key()).unwrap();
    assert!(
        sec1.starts_with("-----BEGIN EC PRIVATE KEY-----\n"),
        "{sec1}"
    );
    let pkcs8 = std::fs::read_to_string(&pki.client().key).unwrap();
    assert!(
        pkcs8.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "{pkcs8}"
    );
    keys_match(pki.client(), &pki.client().key).unwrap();
    keys_match(pki.client(), pki.client_sec1_key()).unwrap();
    assert!(keys_match(pki.client_expired(), pki.client_sec1_key()).is_err());
}

#[test]
fn key_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::generate().unwrap();
    for key in [&pki.client().key, pki.client_sec1_key(), &pki.server().key] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", key.display());
    }
}
