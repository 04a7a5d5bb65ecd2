//! Where the gateway's secrets come from: a file named in the config, or a systemd credential.
//!
//! A secret key in the config (`password_file`, `key_file`, `sas_key_file`) names either a path
//! or `credential:NAME`, which is `$CREDENTIALS_DIRECTORY/NAME` (systemd's `LoadCredential=`),
//! so a secret need not be readable on disk by the service's dynamic user. The config checker
//! resolves relative paths; this module resolves credentials when the file is needed, since
//! `$CREDENTIALS_DIRECTORY` exists only in the service's environment.

use std::path::{Path, PathBuf};

/// The prefix that names a systemd credential instead of a path.
pub const CREDENTIAL_PREFIX: &str = "credential:";

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (resolved against the config file's directory when loaded from disk).
    File(PathBuf),
    /// `credential:NAME`: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

/// Why a secret's file cannot be named.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// `credential:NAME` outside a service that loads credentials.
    #[error("`credential:{0}` needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=), which is not set")]
    NoCredentialsDirectory(String),
}

impl SecretSource {
    /// The file that holds the secret.
    pub fn path(&self) -> Result<PathBuf, SecretError> {
        match self {
            SecretSource::File(path) => Ok(path.clone()),
            SecretSource::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|dir| Path::new(&dir).join(name))
                .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone())),
        }
    }
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "{}", path.display()),
            SecretSource::Credential(name) => write!(f, "{CREDENTIAL_PREFIX}{name}"),
        }
    }
}
