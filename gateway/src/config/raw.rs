//! The file's units as serde sees them: plain structs, unknown keys refused, each value of the
//! type its key asks for and nothing checked beyond that (`check` does the rest).

use std::fmt;
use std::time::Duration;

use protocols::modbus::Report;
use schemars::JsonSchema;
use serde::de;
use serde::Deserialize;

use super::values::{parse_duration, parse_size};
use super::{Format, WhenFull};

/// The sections of the file, in the order they are documented.
pub(super) const SECTIONS: &[&str] = &[
    "gateway",
    "buffer",
    "mqtt",
    "sparkplug",
    "api",
    "commands",
    "devices",
];
/// The keys of a Modbus device that hold arrays of tables, checked apart from the device.
pub(super) const MODBUS_ARRAYS: &[&str] = &["units", "tags"];
/// The keys of an OPC UA device that hold arrays of tables.
pub(super) const OPCUA_ARRAYS: &[&str] = &["tags"];
/// The keys of a [`RawModbusDevice`] that only a `modbus_rtu` device has.
pub(super) const SERIAL_KEYS: &[&str] = &["port", "baud_rate", "parity", "data_bits", "stop_bits"];

/// A duration written as a string with a unit, e.g. `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl de::Visitor<'_> for DurVisitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Dur, E> {
                parse_duration(text).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Dur, E> {
                Err(E::custom(BARE_DURATION))
            }
        }
        deserializer.deserialize_any(DurVisitor)
    }
}

pub(super) const BARE_DURATION: &str = "durations are strings with a unit, e.g. \"250ms\"";

/// A size in bytes, written `"512MiB"`, `"100MB"`, `"1000"` or as a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl de::Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size string such as \"512MiB\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                parse_size(text).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom("a size must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Size, E> {
                Err(E::custom(
                    "sizes are whole numbers with a unit, e.g. \"512MiB\"",
                ))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) id: String,
    pub(super) data_dir: Option<String>,
}

/// `[commands]`: writes from the cloud.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCommands {
    /// Whether the gateway takes write commands on `{topic_prefix}/+/cmd` (default false).
    pub(super) enabled: Option<bool>,
    /// The shortest time between two writes of one tag (default "1s").
    pub(super) write_interval: Option<Dur>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuffer {
    pub(super) max_size: Option<Size>,
    pub(super) when_full: Option<WhenFull>,
    pub(super) commit_interval: Option<Dur>,
    pub(super) replay_rate: Option<i64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    pub(super) url: String,
    pub(super) client_id: Option<String>,
    pub(super) topic_prefix: Option<String>,
    pub(super) format: Option<Format>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) keep_alive: Option<Dur>,
    pub(super) max_inflight: Option<i64>,
    pub(super) max_packet_size: Option<Size>,
    pub(super) shutdown_grace: Option<Dur>,
    pub(super) ack_timeout: Option<Dur>,
    pub(super) protocol_version: Option<i64>,
    pub(super) topic: Option<String>,
    pub(super) status: Option<bool>,
    pub(super) backoff_min: Option<Dur>,
    pub(super) backoff_max: Option<Dur>,
    pub(super) ca_file: Option<String>,
    pub(super) server_name: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) alpn: Option<Vec<String>>,
    pub(super) insecure_skip_verify: Option<bool>,
    pub(super) sas_key_file: Option<String>,
    pub(super) sas_ttl: Option<Dur>,
}

/// `[sparkplug]`: the Sparkplug B edge node (with `[mqtt] format = "sparkplug_b"`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSparkplug {
    /// The Sparkplug group id (no `/`, `+` or `#`).
    pub(super) group_id: String,
    /// The edge node id (default: the gateway id; no `/`, `+` or `#`).
    pub(super) edge_node_id: Option<String>,
    /// The primary host application: data goes out only while its STATE is online.
    pub(super) primary_host_id: Option<String>,
}

/// `[api]`: the HTTP API and status page.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) listen: String,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

/// A `protocol = "modbus_tcp"`, `"modbus_rtu"` or `"modbus_rtu_over_tcp"` `[[devices]]`
/// entry without its `units` and `tags`, which are checked one by one. The protocol allows
/// either `address` or `port` and the serial keys (`Protocol::device_keys` in
/// `check/devices.rs`), and requires `address` or `port` (`Checker::modbus_settings` in
/// `check/modbus.rs`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModbusDevice {
    pub(super) name: String,
    /// Read and checked before the unit is deserialized; listed so that it is a known key.
    #[allow(dead_code)]
    #[schemars(schema_with = "super::schema::modbus_protocol")]
    pub(super) protocol: de::IgnoredAny,
    pub(super) address: Option<String>,
    pub(super) port: Option<String>,
    pub(super) baud_rate: Option<i64>,
    pub(super) parity: Option<String>,
    pub(super) data_bits: Option<i64>,
    pub(super) stop_bits: Option<i64>,
    pub(super) unit_id: Option<i64>,
    pub(super) inter_request_delay: Option<Dur>,
    pub(super) scan_interval: Option<Dur>,
    pub(super) timeout: Option<Dur>,
    pub(super) max_registers_per_read: Option<i64>,
    pub(super) max_gap: Option<i64>,
    #[serde(default)]
    #[schemars(schema_with = "super::schema::report")]
    pub(super) report: Option<Report>,
    pub(super) max_silence: Option<Dur>,
    pub(super) backoff_min: Option<Dur>,
    pub(super) backoff_max: Option<Dur>,
    pub(super) enabled: Option<bool>,
}

/// A `[[devices.units]]` entry of a Modbus device, without its `tags`. Its keys are required,
/// but optional here so that a unit missing both is reported once for each.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnit {
    pub(super) name: Option<String>,
    pub(super) unit_id: Option<i64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTag {
    pub(super) name: String,
    pub(super) address: String,
    #[serde(rename = "type")]
    pub(super) data_type: Option<String>,
    pub(super) length: Option<i64>,
    pub(super) order: Option<String>,
    pub(super) scale: Option<f64>,
    pub(super) offset: Option<f64>,
    pub(super) deadband: Option<f64>,
    /// Engineering unit, e.g. `degC`.
    pub(super) unit: Option<String>,
    /// What the tag measures, for a person.
    pub(super) description: Option<String>,
    /// Low end of the engineering range.
    pub(super) min: Option<f64>,
    /// High end of the engineering range.
    pub(super) max: Option<f64>,
    pub(super) scan_interval: Option<Dur>,
    /// Whether commands may write the tag (default false; needs `[commands] enabled`).
    pub(super) writable: Option<bool>,
    /// The smallest value a command may write (engineering units).
    pub(super) write_min: Option<f64>,
    /// The largest value a command may write (engineering units).
    pub(super) write_max: Option<f64>,
}

/// A `protocol = "opcua"` `[[devices]]` entry without its `tags`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpcUaDevice {
    pub(super) name: String,
    /// Read and checked before the unit is deserialized; listed so that it is a known key.
    #[allow(dead_code)]
    #[schemars(schema_with = "super::schema::opcua_protocol")]
    pub(super) protocol: de::IgnoredAny,
    pub(super) endpoint: String,
    pub(super) security_policy: Option<String>,
    pub(super) security_mode: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) user_cert_file: Option<String>,
    pub(super) user_key_file: Option<String>,
    pub(super) pki_dir: Option<String>,
    pub(super) trust_server_cert: Option<bool>,
    pub(super) publishing_interval: Option<Dur>,
    pub(super) mode: Option<RawMode>,
    pub(super) scan_interval: Option<Dur>,
    pub(super) timeout: Option<Dur>,
    pub(super) backoff_min: Option<Dur>,
    pub(super) backoff_max: Option<Dur>,
    pub(super) enabled: Option<bool>,
}

/// `mode` of an OPC UA device.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawMode {
    Subscribe,
    Poll,
}

/// A `[[devices.tags]]` entry of an OPC UA device.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpcUaTag {
    pub(super) name: String,
    pub(super) node_id: Option<String>,
    pub(super) browse_path: Option<String>,
    pub(super) sampling_interval: Option<Dur>,
    pub(super) deadband: Option<f64>,
    pub(super) queue_size: Option<i64>,
    /// Engineering unit, e.g. `degC`.
    pub(super) unit: Option<String>,
    /// What the tag measures, for a person.
    pub(super) description: Option<String>,
    /// Low end of the engineering range.
    pub(super) min: Option<f64>,
    /// High end of the engineering range.
    pub(super) max: Option<f64>,
    /// Whether commands may write the tag (default false; needs `[commands] enabled`).
    pub(super) writable: Option<bool>,
    /// The smallest number a command may write.
    pub(super) write_min: Option<f64>,
    /// The largest number a command may write.
    pub(super) write_max: Option<f64>,
}
