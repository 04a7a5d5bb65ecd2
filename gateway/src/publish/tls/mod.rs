//! TLS for the MQTT connection, with rustls and its ring provider.
//!
//! [`client_config`] builds the rustls configuration for one connection attempt from the files
//! the config names, read again at every call: a renewed certificate takes effect at the next
//! connect, without a restart. The provider is rustls' ring provider, passed explicitly
//! (never a process-wide default): ring builds with the C compiler the build already needs,
//! where aws-lc-rs would add cmake and a larger C build.
//!
//! - The broker's certificate is verified against `ca_file` (one or more PEM certificates) or
//!   the system's roots; its name is checked against the url's host, or against `server_name`
//!   when set ([`verify::OtherName`]). `insecure_skip_verify` accepts any certificate but still
//!   checks the handshake's signatures ([`verify::AnyCertificate`]).
//! - A client certificate (`cert_file`, a PEM chain) goes with its key (`key_file`: PKCS#8,
//!   PKCS#1 or SEC1 PEM); a key that does not match the certificate is refused here, not by
//!   the broker.
//! - `alpn` is offered as given.
//!
//! [`describe_failure`] names the cause of a failed connection in one line when it is TLS's;
//! [`client_cert_not_after`] and [`ExpiryWarning`] warn of a client certificate that expires
//! soon; [`inspect`] is what `check` (and a reload) reports of the TLS files.
//!
//! [`server_config`] is the HTTP API's HTTPS configuration (`[api] cert_file`, `key_file`);
//! [`inspect_server`] is what `check` reports of those files, built the same way.
//!
//! A key file's content never reaches an error message, a log line or a debug print: errors
//! about it say what is wrong in words of their own.

mod expiry;
mod failure;
mod files;
mod inspect;
mod verify;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::sign::SingleCertAndKey;
use rustls::ClientConfig;

use crate::config::TlsSettings;
use crate::secret::SecretError;

pub(crate) use expiry::ExpiryWarning;
pub(crate) use failure::{describe_failure, describe_failure_v5};
pub(crate) use files::client_cert_not_after;
pub use inspect::Finding;
pub(crate) use inspect::{inspect, inspect_server, Severity};

/// The config fields errors name.
pub(crate) const CA_FILE: &str = "mqtt.ca_file";
/// See [`CA_FILE`].
pub(crate) const CERT_FILE: &str = "mqtt.cert_file";
/// See [`CA_FILE`].
pub(crate) const KEY_FILE: &str = "mqtt.key_file";
/// See [`CA_FILE`].
pub(crate) const SERVER_NAME: &str = "mqtt.server_name";
/// See [`CA_FILE`].
pub(crate) const URL: &str = "mqtt.url";

/// The config fields that name a certificate and its key, for errors about either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdentityFields {
    /// The certificate's field.
    pub(crate) cert: &'static str,
    /// The key's field.
    pub(crate) key: &'static str,
}

/// The MQTT client's certificate and key.
pub(crate) const MQTT_IDENTITY: IdentityFields = IdentityFields {
    cert: CERT_FILE,
    key: KEY_FILE,
};
/// The HTTP API's certificate and key (`[api] cert_file`, `key_file`).
pub(crate) const API_IDENTITY: IdentityFields = IdentityFields {
    cert: "api.cert_file",
    key: "api.key_file",
};

/// Why a TLS configuration cannot be built. Each names the config field (and file) at fault;
/// none carries a key file's content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file cannot be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    Read {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A certificate file is not valid PEM.
    #[error("{field}: {} is not valid PEM: {source}", path.display())]
    Pem {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{field}: {} holds no certificate (a PEM `-----BEGIN CERTIFICATE-----` section)", path.display())]
    NoCertificate {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A certificate cannot be parsed.
    #[error("{field}: certificate {index} in {} cannot be parsed: {source}", path.display())]
    BadCertificate {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Which certificate in the file, from 1.
        index: usize,
        /// What the X.509 parser found.
        #[source]
        source: x509_cert::der::Error,
    },
    /// `ca_file` holds certificates, none of which can be a trust anchor.
    #[error("{CA_FILE}: none of the {count} certificates in {} can be used as a CA: {source}", path.display())]
    NoTrustAnchor {
        /// The file.
        path: PathBuf,
        /// How many certificates it holds.
        count: usize,
        /// Why the first was refused.
        #[source]
        source: rustls::Error,
    },
    /// No `ca_file`, and no CA certificate found on the system.
    #[error("no CA certificates found on this system (install the ca-certificates package, or set {CA_FILE}){}", first_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NoSystemRoots {
        /// The first error met looking for them, if any.
        #[source]
        first_error: Option<rustls_native_certs::Error>,
    },
    /// `key_file` cannot be read (through [`crate::secret`]: a missing file or credential, or
    /// one that is not text).
    #[error("{field}: {source}")]
    KeySecret {
        /// The config field naming the key (`mqtt.key_file`, `api.key_file`).
        field: &'static str,
        /// Why it cannot be read.
        #[source]
        source: SecretError,
    },
    /// `key_file` holds no usable private key; the reason is in words of our own, never the
    /// file's content.
    #[error("{field}: {key} {problem}")]
    Key {
        /// The config field naming the key.
        field: &'static str,
        /// The file, as the config names it.
        key: String,
        /// What is wrong with it.
        problem: KeyProblem,
    },
    /// rustls cannot sign with the key (an algorithm it does not support).
    #[error("{field}: the key in {key} cannot be used (RSA, ECDSA P-256 or P-384, and Ed25519 keys can): {source}")]
    KeyUnusable {
        /// The config field naming the key.
        field: &'static str,
        /// The file, as the config names it.
        key: String,
        /// rustls' reason (it holds no key material).
        #[source]
        source: rustls::Error,
    },
    /// The key is not the certificate's.
    #[error("{}: {key} is not the private key of the certificate in {} ({})", fields.key, fields.cert, cert.display())]
    KeyMismatch {
        /// The config fields naming the certificate and the key.
        fields: IdentityFields,
        /// The key file, as the config names it.
        key: String,
        /// The certificate file.
        cert: PathBuf,
    },
    /// rustls cannot use the certificate.
    #[error("{field}: the certificate in {} cannot be used: {source}", path.display())]
    CertUnusable {
        /// The config field naming the certificate.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The name to check the broker's certificate against is not one TLS can check.
    #[error(
        "{field}: {name:?} is not a DNS name or IP address a certificate can be checked against"
    )]
    ServerName {
        /// `mqtt.url` (its host) or `mqtt.server_name`.
        field: &'static str,
        /// The name.
        name: String,
    },
    /// rustls refused the configuration.
    #[error("the TLS configuration cannot be built: {0}")]
    Rustls(#[source] rustls::Error),
    /// rustls refused the roots for its verifier.
    #[error("{CA_FILE}: the certificate verifier cannot be built: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// What is wrong with a key file, without its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyProblem {
    /// Not PEM at all.
    #[error("is not a PEM file (expected `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)")]
    NotPem,
    /// PEM, without a private key section.
    #[error("holds no private key (expected `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)")]
    NoKey,
    /// A key section that cannot be decoded.
    #[error("holds a damaged PEM section (its markers or its base64 are not valid)")]
    Damaged,
    /// An encrypted key.
    #[error("holds an encrypted private key: the gateway needs it unencrypted (`openssl pkey -in KEY -out KEY.pem`), readable by the service only")]
    Encrypted,
}

impl TlsError {
    /// The config field at fault.
    pub(crate) fn field(&self) -> &'static str {
        match self {
            TlsError::Read { field, .. }
            | TlsError::Pem { field, .. }
            | TlsError::NoCertificate { field, .. }
            | TlsError::BadCertificate { field, .. }
            | TlsError::ServerName { field, .. }
            | TlsError::CertUnusable { field, .. }
            | TlsError::KeySecret { field, .. }
            | TlsError::Key { field, .. }
            | TlsError::KeyUnusable { field, .. } => field,
            TlsError::KeyMismatch { fields, .. } => fields.key,
            TlsError::NoTrustAnchor { .. }
            | TlsError::NoSystemRoots { .. }
            | TlsError::Verifier { .. }
            | TlsError::Rustls(_) => CA_FILE,
        }
    }
}

/// rustls' ring provider. rustls 0.23.48 deprecates it for lacking post-quantum key exchange;
/// it stays the gateway's choice for a lean build (see the module documentation).
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for a connection to `host` (the url's host, which rumqttc passes
/// to rustls as the server name), built from the files `tls` names, read now.
pub(crate) fn client_config(tls: &TlsSettings, host: &str) -> Result<Arc<ClientConfig>, TlsError> {
    server_name(URL, host)?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = if tls.insecure_skip_verify {
        let verifier = verify::AnyCertificate::new(Arc::clone(&provider));
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
    } else {
        let roots = match &tls.ca_file {
            Some(path) => files::ca_file_roots(path)?.store,
            None => files::system_roots()?,
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        match &tls.server_name {
            Some(name) if name != host => {
                let name = server_name(SERVER_NAME, name)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verify::OtherName::new(
                        webpki, name,
                    )))
            }
            _ => builder.with_webpki_verifier(webpki),
        }
    };
    let mut config = match files::client_identity(tls, &provider)? {
        Some(identity) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(identity)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The rustls configuration of the HTTP API's HTTPS (`[api] cert_file`, `key_file`), read now:
/// HTTP/1.1 only, no client certificates. A key that is not the certificate's is refused
/// here, naming `api.key_file`, as `check` names it ([`inspect_server`]).
pub(crate) fn server_config(
    cert_file: &std::path::Path,
    key_file: &crate::secret::SecretSource,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = files::read_certs(API_IDENTITY.cert, cert_file)?;
    let key = files::read_key(API_IDENTITY.key, key_file)?;
    server_config_of(certs, key, cert_file, key_file)
}

/// The API's rustls configuration from a certificate chain and its key, as read from
/// `cert_file` and `key_file`.
fn server_config_of(
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    cert_file: &std::path::Path,
    key_file: &crate::secret::SecretSource,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let identity = files::identity(API_IDENTITY, certs, key, cert_file, key_file, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(identity)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `name` as a server name rustls checks certificates against.
fn server_name(field: &'static str, name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name)
        .map(|name| name.to_owned())
        .map_err(|_| TlsError::ServerName {
            field,
            name: name.to_owned(),
        })
}
