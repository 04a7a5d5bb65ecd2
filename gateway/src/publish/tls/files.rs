//! Reading the TLS files: CA certificates, the client's chain and its key.

use std::path::Path;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{Error as RustlsError, InconsistentKeys, RootCertStore};
use x509_cert::der::Decode;

use super::{IdentityFields, KeyProblem, TlsError, CA_FILE, CERT_FILE, MQTT_IDENTITY};
use crate::config::TlsSettings;
use crate::secret::{Secret, SecretSource};

/// The trust anchors of a `ca_file`.
pub(super) struct CaFile {
    /// The anchors.
    pub(super) store: RootCertStore,
    /// The certificates in the file that are not in `store` (rustls cannot use them as CAs).
    pub(super) ignored: usize,
    /// The certificates, parsed and not.
    pub(super) certs: Vec<CertificateDer<'static>>,
}

/// The CA certificates of `path`: at least one must be usable.
pub(super) fn ca_file_roots(path: &Path) -> Result<CaFile, TlsError> {
    let certs = read_certs(CA_FILE, path)?;
    let mut store = RootCertStore::empty();
    let mut first_error = None;
    for cert in &certs {
        if let Err(e) = store.add(cert.clone()) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(source) if store.is_empty() => Err(TlsError::NoTrustAnchor {
            path: path.to_owned(),
            count: certs.len(),
            source,
        }),
        _ => Ok(CaFile {
            ignored: certs.len() - store.len(),
            store,
            certs,
        }),
    }
}

/// The system's CA certificates; none is an error.
pub(super) fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err(TlsError::NoSystemRoots {
            first_error: found.errors.into_iter().next(),
        });
    }
    Ok(store)
}

/// Every certificate in the PEM file `path`, in order; none is an error.
pub(super) fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            field,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            field,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// When certificate `index` (from 0) of `certs`, read from `path`, expires.
pub(super) fn not_after(
    field: &'static str,
    path: &Path,
    certs: &[CertificateDer<'_>],
    index: usize,
) -> Result<SystemTime, TlsError> {
    let bad = |source| TlsError::BadCertificate {
        field,
        path: path.to_owned(),
        index: index + 1,
        source,
    };
    let der = certs.get(index).map_or(&[][..], |c| c.as_ref());
    let cert = x509_cert::Certificate::from_der(der).map_err(bad)?;
    Ok(cert.tbs_certificate.validity.not_after.to_system_time())
}

/// The private key in `source`'s file (named by the config `field`), read through
/// [`SecretSource::read`] (which warns once about a file others may read, and zeroes its
/// copy). Errors say what is wrong without quoting the file.
pub(super) fn read_key(
    field: &'static str,
    source: &SecretSource,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let secret = source
        .read()
        .map_err(|source| TlsError::KeySecret { field, source })?;
    parse_key(field, source, &secret)
}

/// The private key in `secret`, the content of `source`'s file (named by the config `field`).
pub(super) fn parse_key(
    field: &'static str,
    source: &SecretSource,
    secret: &Secret,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = secret.expose().as_bytes();
    let problem = |problem| TlsError::Key {
        field,
        key: source.to_string(),
        problem,
    };
    let encrypted = [
        &b"ENCRYPTED PRIVATE KEY-----"[..],
        b"Proc-Type: 4,ENCRYPTED",
    ]
    .iter()
    .any(|marker| contains(bytes, marker));
    if encrypted {
        return Err(problem(KeyProblem::Encrypted));
    }
    match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) if contains(bytes, b"-----BEGIN ") => {
            Err(problem(KeyProblem::NoKey))
        }
        Err(pem::Error::NoItemsFound) => Err(problem(KeyProblem::NotPem)),
        // The parser's own errors may quote a line of the file: never shown.
        Err(_) => Err(problem(KeyProblem::Damaged)),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The client's certificate chain and key, checked to belong together; `None` without
/// `cert_file` and `key_file`.
pub(super) fn client_identity(
    tls: &TlsSettings,
    provider: &CryptoProvider,
) -> Result<Option<CertifiedKey>, TlsError> {
    let (Some(cert_path), Some(key_source)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let chain = read_certs(CERT_FILE, cert_path)?;
    not_after(CERT_FILE, cert_path, &chain, 0)?;
    let key = read_key(MQTT_IDENTITY.key, key_source)?;
    identity(MQTT_IDENTITY, chain, key, cert_path, key_source, provider).map(Some)
}

/// `chain` and `key` as one identity, refused when the key is not the certificate's; errors
/// name the config `fields`.
pub(super) fn identity(
    fields: IdentityFields,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_source: &SecretSource,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::KeyUnusable {
            field: fields.key,
            key: key_source.to_string(),
            source,
        })?;
    let identity = CertifiedKey::new(chain, signing_key);
    match identity.keys_match() {
        // A key whose public half rustls cannot derive is left to the handshake.
        Ok(()) | Err(RustlsError::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(identity),
        Err(RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                fields,
                key: key_source.to_string(),
                cert: cert_path.to_owned(),
            })
        }
        Err(source) => Err(TlsError::CertUnusable {
            field: fields.cert,
            path: cert_path.to_owned(),
            source,
        }),
    }
}

/// When the client certificate (the first in `cert_file`) expires, read from the file now;
/// `None` without a `cert_file`.
pub(crate) fn client_cert_not_after(tls: &TlsSettings) -> Result<Option<SystemTime>, TlsError> {
    let Some(path) = &tls.cert_file else {
        return Ok(None);
    };
    let certs = read_certs(CERT_FILE, path)?;
    not_after(CERT_FILE, path, &certs, 0).map(Some)
}
