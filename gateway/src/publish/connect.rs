//! What each connection attempt is made with, built again before every attempt: the TLS
//! configuration from its files (a renewed certificate takes effect at the next connect), the
//! password from its file, and the last will.
//!
//! A failure here stops the attempt: with TLS configured, the gateway never falls back to
//! plain TCP, and it never connects with credentials it could not read.

use std::path::PathBuf;
use std::time::SystemTime;

use rumqttc::Transport;

use super::link::Prepared;
use super::status;
use crate::config::MqttSettings;
use crate::secret::SecretError;

/// Why a connection attempt could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The password file cannot be read.
    #[error("mqtt.password_file {}: {source}", path.display())]
    Password {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A credential cannot be found.
    #[error("mqtt.password_file: {0}")]
    Secret(#[from] SecretError),
    /// The TLS configuration cannot be built.
    #[error("{0}")]
    Tls(String),
}

/// Builds what connection attempts are made with.
pub struct Connector {
    settings: MqttSettings,
    gateway: String,
    boot: u64,
    /// Whether the last will may be retained (MQTT 5 brokers can refuse retain).
    pub(crate) will_retained: bool,
}

impl Connector {
    /// A connector for `settings`, for the gateway `gateway` in its boot `boot`.
    pub fn new(settings: MqttSettings, gateway: &str, boot: u64) -> Self {
        Connector {
            settings,
            gateway: gateway.to_owned(),
            boot,
            will_retained: true,
        }
    }

    /// What the next attempt is made with.
    pub(crate) fn prepare(&self) -> Result<Prepared, PrepareError> {
        let transport = match &self.settings.tls {
            None => Transport::Tcp,
            Some(_) => return Err(PrepareError::Tls("TLS is not wired yet".to_owned())),
        };
        let credentials = match &self.settings.username {
            None => None,
            Some(user) => Some((user.clone(), self.password()?)),
        };
        let will = self.settings.status.then(|| {
            let doc = status::document(&self.gateway, self.boot, false, SystemTime::now());
            (self.settings.status_topic(), doc)
        });
        Ok(Prepared {
            transport,
            credentials,
            will,
            will_retained: self.will_retained,
        })
    }

    fn password(&self) -> Result<String, PrepareError> {
        let Some(source) = &self.settings.password_file else {
            return Ok(String::new());
        };
        let path = source.path()?;
        let text = std::fs::read_to_string(&path)
            .map_err(|source| PrepareError::Password { path, source })?;
        Ok(text.trim_end_matches(['\r', '\n']).to_owned())
    }
}
