//! The `[mqtt]` section: the broker's url and TLS, the session, topics and credentials.

use std::time::Duration;

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::raw::RawMqtt;
use crate::config::values::{
    check_client_id, check_readable, check_topic_prefix, check_topic_template, fmt_duration,
    fmt_size, parse_mqtt_url, BrokerUrl, DEFAULT_MQTT_PORT, KIB, MAX_DURATION, MIB, MS, NONZERO,
};
use crate::config::{
    DeviceSettings, MqttSettings, ProtocolVersion, SasSettings, TlsSettings, TopicTemplate,
};
use crate::secret::{SecretSource, CREDENTIAL_PREFIX};

impl Checker<'_> {
    pub(super) fn mqtt(
        &mut self,
        value: Option<toml::Value>,
        gateway_id: Option<&str>,
    ) -> Option<MqttSettings> {
        let path = FieldPath::top("mqtt");
        let table = self.section(value, &path, true)?;
        let (raw, _) = self.unit::<RawMqtt>(table, &path, &[], None)?;
        let url = parse_mqtt_url(&raw.url).unwrap_or_else(|e| {
            self.report(&path.key("url"), e.to_string());
            BrokerUrl {
                host: String::new(),
                port: DEFAULT_MQTT_PORT,
                tls: false,
            }
        });
        let id = gateway_id.unwrap_or("gateway");
        let client_id = raw.client_id.clone().unwrap_or_else(|| id.to_owned());
        if let Err(message) = check_client_id(&client_id) {
            self.report(&path.key("client_id"), message);
        }
        let topic_prefix = raw
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("edge/{id}"));
        if let Err(message) = check_topic_prefix(&topic_prefix) {
            self.report(&path.key("topic_prefix"), message);
        }
        let topic = match &raw.topic {
            None => TopicTemplate::default(),
            Some(text) => {
                if let Err(message) = check_topic_template(text) {
                    self.report(&path.key("topic"), message);
                }
                TopicTemplate(text.clone())
            }
        };
        if let Some(username) = &raw.username {
            if username.is_empty() {
                let message = "must not be empty: leave `username` out if the broker wants none";
                self.report(&path.key("username"), message);
            } else if username.contains('\0') {
                self.report(&path.key("username"), "must not contain NUL");
            }
        }
        let password_file = raw
            .password_file
            .as_deref()
            .map(|file| self.secret_file(&path.key("password_file"), file));
        let sas = raw.sas_key_file.as_deref().map(|file| SasSettings {
            key_file: self.secret_file(&path.key("sas_key_file"), file),
            ttl: Duration::ZERO,
        });
        let sas_ttl = self.duration(
            &path.key("sas_ttl"),
            raw.sas_ttl,
            Duration::from_secs(3600),
            Duration::from_secs(60),
            Duration::from_secs(365 * 24 * 3600),
        );
        let sas = sas.map(|sas| SasSettings {
            ttl: sas_ttl,
            ..sas
        });
        if sas.is_some() && password_file.is_some() {
            let message = "`sas_key_file` computes the password: leave `password_file` out";
            self.report(&path.key("password_file"), message);
        }
        if raw.sas_ttl.is_some() && sas.is_none() {
            self.report(&path.key("sas_ttl"), "only applies with `sas_key_file`");
        }
        let keep_alive = self.duration(
            &path.key("keep_alive"),
            raw.keep_alive,
            Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::from_secs(u64::from(u16::MAX)),
        );
        let max_inflight = self.integer(&path.key("max_inflight"), raw.max_inflight, 256, 1, 1024);
        let max_packet_size = raw.max_packet_size.map_or(MIB, |size| size.0);
        if !(16 * KIB..=256 * MIB).contains(&max_packet_size) {
            let message = format!(
                "must be between 16KiB and 256MiB, not {}",
                fmt_size(max_packet_size)
            );
            self.report(&path.key("max_packet_size"), message);
        }
        let shutdown_grace = self.duration(
            &path.key("shutdown_grace"),
            raw.shutdown_grace,
            Duration::from_secs(5),
            Duration::ZERO,
            MAX_DURATION,
        );
        let ack_timeout = self.duration(
            &path.key("ack_timeout"),
            raw.ack_timeout,
            Duration::from_secs(30),
            NONZERO,
            MAX_DURATION,
        );
        let protocol_version = match raw.protocol_version {
            None | Some(4) => ProtocolVersion::V311,
            Some(5) => ProtocolVersion::V5,
            Some(3) => {
                let message = "MQTT 3.1 (protocol level 3) is not supported: use 4 (MQTT 3.1.1) or 5 (MQTT 5)";
                self.report(&path.key("protocol_version"), message);
                ProtocolVersion::V311
            }
            Some(other) => {
                let message =
                    format!("must be 4 (MQTT 3.1.1, the default) or 5 (MQTT 5), not {other}");
                self.report(&path.key("protocol_version"), message);
                ProtocolVersion::V311
            }
        };
        let backoff_min = self.duration(
            &path.key("backoff_min"),
            raw.backoff_min,
            Duration::from_millis(100),
            MS,
            Duration::from_secs(3600),
        );
        let backoff_max = self.duration(
            &path.key("backoff_max"),
            raw.backoff_max,
            Duration::from_secs(15),
            MS,
            Duration::from_secs(3600),
        );
        if backoff_max < backoff_min {
            let message = format!(
                "must not be shorter than backoff_min ({}), not {}",
                fmt_duration(backoff_min),
                fmt_duration(backoff_max)
            );
            self.report(&path.key("backoff_max"), message);
        }
        let tls = self.tls(&raw, &path, url.tls);
        Some(MqttSettings {
            host: url.host,
            port: url.port,
            tls,
            protocol_version,
            client_id,
            topic_prefix,
            topic,
            status: raw.status.unwrap_or(true),
            format: raw.format.unwrap_or_default(),
            sparkplug: None,
            username: raw.username,
            password_file,
            sas,
            keep_alive,
            max_inflight,
            max_packet_size: usize::try_from(max_packet_size).unwrap_or(usize::MAX),
            shutdown_grace,
            ack_timeout,
            backoff_min,
            backoff_max,
        })
    }

    /// A device whose records would go to the gateway's status topic (a device named
    /// `status` with the default topic): the cloud could not tell the two apart.
    pub(super) fn status_topic_clash(
        &mut self,
        mqtt: &MqttSettings,
        devices: &[DeviceSettings],
        gateway: &str,
    ) {
        if !mqtt.status {
            return;
        }
        let status = mqtt.status_topic();
        for (i, device) in devices.iter().enumerate() {
            if mqtt.topic.render(mqtt, gateway, &device.name) == status {
                let message = format!("its records would go to `{status}`, the gateway's status topic: rename the device, or set `mqtt.status = false`");
                self.report(&FieldPath::top("devices").index(i).key("name"), message);
            }
        }
    }

    /// The TLS keys; each is refused with a plain `mqtt://` url, which would send in clear what
    /// the file suggests must not be.
    fn tls(&mut self, raw: &RawMqtt, path: &FieldPath, tls: bool) -> Option<TlsSettings> {
        let keys = [
            ("ca_file", raw.ca_file.is_some()),
            ("server_name", raw.server_name.is_some()),
            ("cert_file", raw.cert_file.is_some()),
            ("key_file", raw.key_file.is_some()),
            ("alpn", raw.alpn.is_some()),
            ("insecure_skip_verify", raw.insecure_skip_verify.is_some()),
        ];
        if !tls {
            for (key, _) in keys.iter().filter(|(_, set)| *set) {
                let message = "is a TLS setting, but the url is plain `mqtt://`: use `mqtts://` (TLS, port 8883 by default)";
                self.report(&path.key(key), message);
            }
            return None;
        }
        let ca_file = raw
            .ca_file
            .as_deref()
            .map(|file| self.credential_file(&path.key("ca_file"), file));
        let cert_file = raw
            .cert_file
            .as_deref()
            .map(|file| self.credential_file(&path.key("cert_file"), file));
        let key_file = raw
            .key_file
            .as_deref()
            .map(|file| self.secret_file(&path.key("key_file"), file));
        match (&cert_file, &key_file) {
            (Some(_), None) => {
                self.report(
                    &path.key("key_file"),
                    "is missing: `cert_file` needs its private key",
                );
            }
            (None, Some(_)) => {
                self.report(
                    &path.key("cert_file"),
                    "is missing: `key_file` needs its certificate",
                );
            }
            _ => {}
        }
        if let Some(name) = &raw.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                let message = format!("{name:?} is not a valid DNS name or IP address");
                self.report(&path.key("server_name"), message);
            }
        }
        let alpn = raw.alpn.clone().unwrap_or_default();
        for (i, protocol) in alpn.iter().enumerate() {
            if protocol.is_empty() || protocol.len() > 255 {
                let message = "each ALPN protocol must be 1 to 255 bytes long";
                self.report(&path.key("alpn").index(i), message);
            }
        }
        let insecure_skip_verify = raw.insecure_skip_verify.unwrap_or(false);
        if insecure_skip_verify && (ca_file.is_some() || raw.server_name.is_some()) {
            let message = "accepts any server certificate: `ca_file` and `server_name` would be ignored; leave one or the other out";
            self.report(&path.key("insecure_skip_verify"), message);
        }
        Some(TlsSettings {
            ca_file,
            server_name: raw.server_name.clone(),
            cert_file,
            key_file,
            alpn,
            insecure_skip_verify,
        })
    }

    /// A file holding a secret: a path (resolved and checked like any credential file) or
    /// `credential:NAME`, checked only where `$CREDENTIALS_DIRECTORY` is set.
    pub(super) fn secret_file(&mut self, field: &FieldPath, text: &str) -> SecretSource {
        let Some(name) = text.strip_prefix(CREDENTIAL_PREFIX) else {
            return SecretSource::File(self.credential_file(field, text));
        };
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            let message = format!(
                "`{CREDENTIAL_PREFIX}NAME` names a systemd credential: NAME must be a plain file name, not {name:?}"
            );
            self.report(field, message);
        }
        let source = SecretSource::Credential(name.to_owned());
        if self.dir.is_some() {
            if let Ok(resolved) = source.path() {
                if let Err(e) = check_readable(&resolved) {
                    self.report(field, e.to_string());
                }
            }
        }
        source
    }
}
