//! The rules of the cloud brokers the gateway is most often pointed at, checked when the url's
//! host names one: a file that passes `check` then connects on the first try instead of being
//! disconnected, refused or throttled in ways that only the cloud's own logs explain.
//!
//! - AWS IoT Core (`*.iot.*.amazonaws.com`): TLS only; a client certificate (or a username for
//!   a custom authorizer); ALPN `x-amzn-mqtt-ca` on port 443; at most 128KiB per message; at
//!   most 7 slashes in a topic (the records', the status's and the meta messages').
//! - Azure IoT Hub (`*.azure-devices.net`): TLS only; MQTT 3.1.1; device-to-cloud messages on
//!   `devices/{client_id}/messages/events/` only (a publish elsewhere closes the connection, so
//!   no status topic); the username `{host}/{client_id}/?api-version=2021-04-12` (given by the
//!   gateway itself with a SAS key); a SAS key or a client certificate; at most 256KiB per message.

use super::Checker;
use crate::config::problem::FieldPath;
use crate::config::values::{fmt_size, KIB};
use crate::config::{DeviceSettings, MqttSettings, ProtocolVersion};

/// The topic AWS IoT Core allows at most this many slashes in.
const AWS_MAX_SLASHES: usize = 7;
const AWS_MAX_MESSAGE: u64 = 128 * KIB;
const AZURE_MAX_MESSAGE: u64 = 256 * KIB;
use crate::config::AZURE_API_VERSION;

/// A cloud broker recognised by its host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cloud {
    AwsIotCore,
    AzureIotHub,
}

fn cloud_of(host: &str) -> Option<Cloud> {
    let host = host.to_ascii_lowercase();
    if host.ends_with(".amazonaws.com") && host.contains(".iot.") {
        Some(Cloud::AwsIotCore)
    } else if host.ends_with(".azure-devices.net") {
        Some(Cloud::AzureIotHub)
    } else {
        None
    }
}

impl Checker<'_> {
    /// Checks `mqtt` against the rules of the cloud broker its host names, if any.
    pub(super) fn cloud_rules(
        &mut self,
        mqtt: &MqttSettings,
        devices: &[DeviceSettings],
        gateway: &str,
    ) {
        let path = FieldPath::top("mqtt");
        match cloud_of(&mqtt.host) {
            None => {}
            Some(Cloud::AwsIotCore) => self.aws(mqtt, devices, gateway, &path),
            Some(Cloud::AzureIotHub) => self.azure(mqtt, &path),
        }
    }

    fn aws(
        &mut self,
        mqtt: &MqttSettings,
        devices: &[DeviceSettings],
        gateway: &str,
        path: &FieldPath,
    ) {
        let Some(tls) = &mqtt.tls else {
            self.report(&path.key("url"), "AWS IoT Core takes TLS only: use `mqtts://` (port 8883, or 443 with `alpn = [\"x-amzn-mqtt-ca\"]`)");
            return;
        };
        if tls.cert_file.is_none() && mqtt.username.is_none() {
            let message = "AWS IoT Core authenticates a device by its client certificate: set `cert_file` and `key_file` (the thing's certificate and private key)";
            self.report(&path.key("cert_file"), message);
        }
        if mqtt.port == 443 && !tls.alpn.iter().any(|p| p == "x-amzn-mqtt-ca") {
            let message = "AWS IoT Core on port 443 needs `alpn = [\"x-amzn-mqtt-ca\"]`";
            self.report(&path.key("alpn"), message);
        }
        self.message_limit(mqtt, path, "AWS IoT Core", AWS_MAX_MESSAGE);
        let mut topics: Vec<String> = devices
            .iter()
            .map(|d| mqtt.topic.render(mqtt, gateway, &d.name))
            .collect();
        if mqtt.status {
            topics.push(mqtt.status_topic());
            // Each device's meta message (`publish/meta.rs`) goes out with the status.
            topics.extend(
                devices
                    .iter()
                    .map(|d| crate::encode::meta::MetaMessage::topic(&mqtt.topic_prefix, &d.name)),
            );
        }
        if let Some(topic) = topics
            .iter()
            .find(|t| t.matches('/').count() > AWS_MAX_SLASHES)
        {
            let key = if mqtt.topic.as_str() == "{topic_prefix}/{device}" {
                "topic_prefix"
            } else {
                "topic"
            };
            let message = format!(
                "AWS IoT Core allows at most {AWS_MAX_SLASHES} `/` in a topic; `{topic}` has {}",
                topic.matches('/').count()
            );
            self.report(&path.key(key), message);
        }
    }

    fn azure(&mut self, mqtt: &MqttSettings, path: &FieldPath) {
        let Some(tls) = &mqtt.tls else {
            self.report(
                &path.key("url"),
                "Azure IoT Hub takes TLS only: use `mqtts://` (port 8883)",
            );
            return;
        };
        if mqtt.protocol_version != ProtocolVersion::V311 {
            let message =
                "Azure IoT Hub speaks MQTT 3.1.1 only: leave `protocol_version` out or set it to 4";
            self.report(&path.key("protocol_version"), message);
        }
        let events = format!("devices/{}/messages/events/", mqtt.client_id);
        let topic = mqtt.topic.render(mqtt, "", "");
        if !topic.starts_with(&events) {
            let message = "Azure IoT Hub takes device-to-cloud messages only on `devices/{client_id}/messages/events/`: set `topic = \"devices/{client_id}/messages/events/\"` (the device is in each record)";
            self.report(&path.key("topic"), message);
        }
        if mqtt.status {
            let message = "Azure IoT Hub closes the connection on a publish to any other topic than the events topic, and keeps no retained message: set `status = false`";
            self.report(&path.key("status"), message);
        }
        let username = format!(
            "{}/{}/?api-version={AZURE_API_VERSION}",
            mqtt.host, mqtt.client_id
        );
        match &mqtt.username {
            Some(u) if u.starts_with(&format!("{}/{}/", mqtt.host, mqtt.client_id)) => {}
            // With a SAS key the gateway gives that username itself.
            None if mqtt.sas.is_some() => {}
            _ => {
                let message = format!("Azure IoT Hub wants `username = \"{username}\"` (the hub's host name, then the device id, which is `client_id`)");
                self.report(&path.key("username"), message);
            }
        }
        if mqtt.sas.is_none() && tls.cert_file.is_none() && mqtt.password_file.is_none() {
            let message = "Azure IoT Hub authenticates a device by a SAS token or an X.509 certificate: set `sas_key_file` (the device's primary key) or `cert_file` and `key_file`";
            self.report(&path.key("sas_key_file"), message);
        }
        self.message_limit(mqtt, path, "Azure IoT Hub", AZURE_MAX_MESSAGE);
    }

    /// `max_packet_size` within what `cloud` takes per message.
    fn message_limit(&mut self, mqtt: &MqttSettings, path: &FieldPath, cloud: &str, max: u64) {
        let size = mqtt.max_packet_size as u64;
        if size > max {
            let message = format!(
                "{cloud} takes at most {max} per message, not {}: set `max_packet_size = \"{max}\"` (larger scans are split into several records)",
                fmt_size(size),
                max = fmt_size(max)
            );
            self.report(&path.key("max_packet_size"), message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_brokers_are_recognised_by_their_host_names_only() {
        let aws = "a1b2c3d4e5f6g7-ats.iot.eu-central-1.amazonaws.com";
        assert_eq!(cloud_of(aws), Some(Cloud::AwsIotCore));
        assert_eq!(
            cloud_of("MyHub.Azure-Devices.net"),
            Some(Cloud::AzureIotHub)
        );
        assert_eq!(cloud_of("s3.amazonaws.com"), None);
        assert_eq!(cloud_of("broker.hivemq.cloud"), None);
        assert_eq!(cloud_of("10.0.0.5"), None);
    }
}
