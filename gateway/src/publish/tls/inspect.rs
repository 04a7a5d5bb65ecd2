//! What `check` (and a reload) reports of the TLS files of an `mqtts://` url: each read and
//! parsed as a connection would, every problem found rather than the first, and warnings for
//! what works but should not last (a client certificate expiring within 30 days,
//! `insecure_skip_verify`). The system's CA certificates are not looked at: `check` may run on
//! another machine than the gateway. The HTTP API's certificate and key ([`inspect_server`])
//! are read and built into its server configuration as `run` builds it.

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use rustls::pki_types::PrivateKeyDer;

use super::expiry::Expiring;
use super::files::{ca_file_roots, identity, not_after, parse_key, read_certs};
use super::{server_name, TlsError, API_IDENTITY, CA_FILE, CERT_FILE, MQTT_IDENTITY, URL};
use crate::config::TlsSettings;
use crate::secret::{SecretError, SecretSource};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The gateway cannot connect like this: `check` fails.
    Problem,
    /// It can, but should not stay like this: `check` still passes.
    Warning,
}

/// One thing `check` says about the TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad it is.
    pub(crate) severity: Severity,
    /// The config field it is about (`mqtt.cert_file`, ...).
    pub(crate) field: &'static str,
    /// What was found, starting with the field.
    pub(crate) message: String,
}

impl Finding {
    fn problem(err: &TlsError) -> Finding {
        Finding {
            severity: Severity::Problem,
            field: err.field(),
            message: err.to_string(),
        }
    }

    fn warning(field: &'static str, message: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            field,
            message: format!("{field}: {message}"),
        }
    }
}

impl Finding {
    /// The config field it is about (`mqtt.cert_file`, `api.key_file`, ...).
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Everything wrong with the TLS settings of a connection to `host`, checked now.
pub(crate) fn inspect(tls: &TlsSettings, host: &str) -> Vec<Finding> {
    inspect_at(tls, host, SystemTime::now())
}

/// [`inspect`], as if checked at `now`.
pub(crate) fn inspect_at(tls: &TlsSettings, host: &str, now: SystemTime) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Err(e) = server_name(URL, host) {
        findings.push(Finding::problem(&e));
    }
    if tls.insecure_skip_verify {
        let message = "accepts any server certificate, so anyone between the gateway and the broker can read and change the data: for commissioning only".to_owned();
        findings.push(Finding::warning("mqtt.insecure_skip_verify", message));
    } else if let Some(path) = &tls.ca_file {
        match ca_file_roots(path) {
            Err(e) => findings.push(Finding::problem(&e)),
            Ok(ca) => {
                if ca.ignored > 0 {
                    let message = format!(
                        "{}: {} of its {} certificates cannot be used as a CA and are ignored",
                        path.display(),
                        ca.ignored,
                        ca.certs.len()
                    );
                    findings.push(Finding::warning(CA_FILE, message));
                }
                let ends: Result<Vec<SystemTime>, TlsError> = (0..ca.certs.len())
                    .map(|i| not_after(CA_FILE, path, &ca.certs, i))
                    .collect();
                match ends {
                    Err(e) => findings.push(Finding::problem(&e)),
                    Ok(ends) => {
                        if let Some(last) = ends.iter().max().filter(|last| **last <= now) {
                            let message = format!(
                                "{}: every certificate in it has expired, the last on {}",
                                path.display(),
                                super::expiry::date(*last)
                            );
                            findings.push(Finding {
                                severity: Severity::Problem,
                                field: CA_FILE,
                                message: format!("{CA_FILE}: {message}"),
                            });
                        }
                    }
                }
            }
        }
    }
    findings.extend(client_findings(tls, now));
    findings
}

/// The client certificate and key: each read, the certificate's end, and whether they match.
fn client_findings(tls: &TlsSettings, now: SystemTime) -> Vec<Finding> {
    let mut findings = Vec::new();
    let (Some(cert_path), Some(key_source)) = (&tls.cert_file, &tls.key_file) else {
        return findings;
    };
    let chain = match read_certs(CERT_FILE, cert_path) {
        Ok(chain) => match not_after(CERT_FILE, cert_path, &chain, 0) {
            Ok(end) => {
                if let Some(expiring) = Expiring::at(end, now) {
                    let what =
                        format!("{}: the client certificate {expiring}", cert_path.display());
                    if expiring.expired() {
                        findings.push(Finding {
                            severity: Severity::Problem,
                            field: CERT_FILE,
                            message: format!("{CERT_FILE}: {what}"),
                        });
                    } else {
                        let message = format!("{what}: renew it before then");
                        findings.push(Finding::warning(CERT_FILE, message));
                    }
                }
                Some(chain)
            }
            Err(e) => {
                findings.push(Finding::problem(&e));
                None
            }
        },
        Err(e) => {
            findings.push(Finding::problem(&e));
            None
        }
    };
    let key = key_of(MQTT_IDENTITY.key, key_source, &mut findings);
    if let (Some(chain), Some(key)) = (chain, key) {
        let provider = super::provider();
        if let Err(e) = identity(MQTT_IDENTITY, chain, key, cert_path, key_source, &provider) {
            findings.push(Finding::problem(&e));
        }
    }
    findings
}

/// The key in `source` (named by the config `field`), read and parsed as a connection would;
/// a problem found is added to `findings`.
fn key_of(
    field: &'static str,
    source: &SecretSource,
    findings: &mut Vec<Finding>,
) -> Option<PrivateKeyDer<'static>> {
    // Whether others may read the key is left to the gateway's own warning when it runs: the
    // mode of a file depends on where it was copied with which umask, and `check` says the
    // same for the same file anywhere (as for `password_file`).
    let read = match source {
        SecretSource::File(_) => source.read_in(None).map(|(secret, _)| secret),
        SecretSource::Credential(_) => source.read(),
    };
    match read {
        Ok(secret) => match parse_key(field, source, &secret) {
            Ok(key) => Some(key),
            Err(e) => {
                findings.push(Finding::problem(&e));
                None
            }
        },
        // `credential:NAME` outside the service: `check` cannot see it, as the config check
        // cannot.
        Err(SecretError::NoCredentialsDirectory(_)) => None,
        Err(source) => {
            findings.push(Finding::problem(&TlsError::KeySecret { field, source }));
            None
        }
    }
}

/// Everything wrong with the HTTP API's certificate and key (`[api] cert_file`, `key_file`):
/// each read and parsed, then the server configuration built from them as `run` builds it
/// ([`super::server_config`]), so a file `run` would stop on is a problem here.
pub(crate) fn inspect_server(cert_file: &Path, key_file: &SecretSource) -> Vec<Finding> {
    let mut findings = Vec::new();
    let certs = match read_certs(API_IDENTITY.cert, cert_file) {
        Ok(certs) => Some(certs),
        Err(e) => {
            findings.push(Finding::problem(&e));
            None
        }
    };
    let key = key_of(API_IDENTITY.key, key_file, &mut findings);
    if let (Some(certs), Some(key)) = (certs, key) {
        if let Err(e) = super::server_config_of(certs, key, cert_file, key_file) {
            findings.push(Finding::problem(&e));
        }
    }
    findings
}
