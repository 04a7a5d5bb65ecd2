//! What each connection attempt is made with, built again before every attempt: the TLS
//! configuration from its files (a renewed certificate takes effect at the next connect), the
//! password from its file or an Azure SAS token (signed afresh when the one in use is due for
//! renewal), and the last will.
//!
//! A failure here stops the attempt: with TLS configured, the gateway never falls back to
//! plain TCP, and it never connects with credentials it could not read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::Transport;

use super::link::Prepared;
use super::sas::{device_resource_uri, SasError, SasRenewal};
use super::status;
use super::tls::{client_cert_not_after, client_config, ExpiryWarning, TlsError};
use crate::config::MqttSettings;
use crate::secret::SecretError;

/// Why a connection attempt could not be prepared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrepareError {
    /// The password file cannot be read.
    #[error("mqtt.password_file: {0}")]
    Password(#[source] SecretError),
    /// The SAS key file cannot be read.
    #[error("mqtt.sas_key_file: {0}")]
    SasKey(#[source] SecretError),
    /// No SAS token can be signed with the key.
    #[error("mqtt.sas_key_file: {0}")]
    Sas(#[from] SasError),
    /// The TLS configuration cannot be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Builds what connection attempts are made with.
pub(crate) struct Connector {
    settings: MqttSettings,
    gateway: String,
    boot: u64,
    /// Whether the last will may be retained (MQTT 5 brokers can refuse retain).
    pub(crate) will_retained: bool,
    /// The SAS token in use, with `sas_key_file`.
    sas: Option<SasRenewal>,
    /// Warns of a client certificate that expires soon, once a day.
    expiry: ExpiryWarning,
    /// When the client certificate of the last attempt expires.
    pub(crate) client_cert_not_after: Option<SystemTime>,
    /// Sparkplug B: the will is NDEATH, with a `bdSeq` stepped for every attempt.
    pub(crate) sparkplug: Option<super::sparkplug::NodeWill>,
}

impl Connector {
    /// A connector for `settings`, for the gateway `gateway` in its boot `boot`.
    pub(crate) fn new(settings: MqttSettings, gateway: &str, boot: u64) -> Self {
        Connector {
            gateway: gateway.to_owned(),
            boot,
            will_retained: true,
            expiry: ExpiryWarning::new(),
            client_cert_not_after: None,
            sparkplug: None,
            sas: settings.sas.as_ref().map(|s| {
                SasRenewal::new(
                    device_resource_uri(&settings.host, &settings.client_id),
                    s.ttl,
                )
            }),
            settings,
        }
    }

    /// How long the connection made with the current SAS token may stay up: it is dropped then
    /// and made again with a fresh token, before the hub drops it at the token's expiry.
    pub(crate) fn renew_in(&self) -> Option<Duration> {
        self.sas.as_ref().map(|s| s.renew_in(unix_now()))
    }

    /// What the next attempt is made with.
    pub(crate) fn prepare(&mut self) -> Result<Prepared, PrepareError> {
        let transport = match &self.settings.tls {
            None => Transport::Tcp,
            Some(tls) => {
                if tls.insecure_skip_verify {
                    tracing::warn!(host = %self.settings.host, "insecure_skip_verify: the broker's certificate is not checked; anyone between the gateway and the broker can read and change what it sends (for commissioning only)");
                }
                self.client_cert_not_after = client_cert_not_after(tls).ok().flatten();
                if let Some(not_after) = self.client_cert_not_after {
                    if let Some(expiring) = self.expiry.check(not_after, SystemTime::now()) {
                        tracing::warn!(file = ?tls.cert_file, "the client certificate {expiring}: renew it (the new file is read at the next connect)");
                    }
                }
                let config = client_config(tls, &self.settings.host)?;
                Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
            }
        };
        let username = match (&self.settings.username, &self.settings.sas) {
            (Some(user), _) => Some(user.clone()),
            // A SAS token goes with the hub's username for the device.
            (None, Some(_)) => Some(format!(
                "{}/{}/?api-version={}",
                self.settings.host,
                self.settings.client_id,
                crate::config::AZURE_API_VERSION
            )),
            (None, None) => None,
        };
        let credentials = match username {
            None => None,
            Some(user) => Some((user, self.password()?)),
        };
        if let Some(node) = &mut self.sparkplug {
            // Sparkplug: NDEATH, never retained.
            return Ok(Prepared {
                transport,
                credentials,
                will: Some(node.next()),
                will_retained: false,
            });
        }
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

    fn password(&mut self) -> Result<String, PrepareError> {
        if let (Some(renewal), Some(sas)) = (&mut self.sas, &self.settings.sas) {
            let key = sas.key_file.read().map_err(PrepareError::SasKey)?;
            let token = renewal.token(&key, unix_now())?;
            tracing::debug!(
                expires = token.expiry,
                renew_at = token.renew_at,
                "SAS token for the connection (seconds since the Unix epoch)"
            );
            return Ok(token.token.expose().to_owned());
        }
        let Some(source) = &self.settings.password_file else {
            return Ok(String::new());
        };
        let password = source.read().map_err(PrepareError::Password)?;
        Ok(password.expose().to_owned())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
