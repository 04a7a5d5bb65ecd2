//! TLS for the bench: a CA and a certificate for 127.0.0.1 made at start, and a TLS terminator
//! (rustls, the same ring provider as the gateway) in front of the embedded broker, so
//! `bench --tls` measures what TLS costs the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the bench's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BenchTlsError {
    /// rcgen could not make a certificate.
    #[error("making a test certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The bench broker's TLS: the acceptor, and the CA file the gateway trusts.
pub struct BenchTls {
    /// Accepts TLS connections with the certificate for 127.0.0.1.
    pub acceptor: TlsAcceptor,
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
}

/// A CA in `dir` and a server certificate for 127.0.0.1 signed by it.
pub fn generate(dir: &Path) -> Result<BenchTls, BenchTlsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_file = dir.join("bench-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).map_err(|source| BenchTlsError::Write {
        path: ca_file.clone(),
        source,
    })?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(crate::publish::tls_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(BenchTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_file,
    })
}
