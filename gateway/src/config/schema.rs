//! `edge-gateway schema`: a JSON Schema of the config file for editors (Taplo / Even Better TOML
//! validate and complete a TOML file against it).
//!
//! Generated with `schemars` from the same raw serde structs that read the file (`raw.rs`), so a
//! key added there is in the schema by construction. Only the assembly of the units the checker
//! reads one by one (a device with its `units` and `tags`) is written here, as schema-only types.
//! The schema knows the keys and their types; what depends on other keys (which keys a protocol
//! takes, ranges, tag addresses) is `check`'s, which says file, line and field.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use super::check::Protocol;
use super::raw::{
    Dur, RawApi, RawBuffer, RawCommands, RawGateway, RawModbusDevice, RawMqtt, RawOpcUaDevice,
    RawOpcUaTag, RawSparkplug, RawTag, RawUnit, Size,
};

/// The whole file.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "edge-gateway configuration")]
#[allow(dead_code)]
struct ConfigFile {
    gateway: RawGateway,
    buffer: Option<RawBuffer>,
    mqtt: RawMqtt,
    sparkplug: Option<RawSparkplug>,
    api: Option<RawApi>,
    commands: Option<RawCommands>,
    devices: Vec<Device>,
}

/// A `[[devices]]` entry; its `protocol` says which.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum Device {
    Modbus(ModbusDevice),
    OpcUa(OpcUaDevice),
}

/// A Modbus device (TCP, RTU, RTU over TCP) with its tags, or a line with its units.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ModbusDevice {
    #[serde(flatten)]
    device: RawModbusDevice,
    units: Option<Vec<Unit>>,
    tags: Option<Vec<RawTag>>,
}

/// A `[[devices.units]]` entry with its tags.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Unit {
    #[serde(flatten)]
    unit: RawUnit,
    tags: Vec<RawTag>,
}

/// An OPC UA device with its tags.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct OpcUaDevice {
    #[serde(flatten)]
    device: RawOpcUaDevice,
    tags: Option<Vec<RawOpcUaTag>>,
}

/// The schema, pretty-printed JSON.
pub fn schema_json() -> String {
    let schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<ConfigFile>();
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

/// `protocol` of a Modbus device.
pub(super) fn modbus_protocol(_: &mut SchemaGenerator) -> Schema {
    let names: Vec<&str> = Protocol::ALL
        .iter()
        .filter(|p| **p != Protocol::OpcUa)
        .map(|p| p.name())
        .collect();
    json_schema!({ "type": "string", "enum": names })
}

/// `protocol` of an OPC UA device.
pub(super) fn opcua_protocol(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "enum": [Protocol::OpcUa.name()] })
}

/// `report` of a Modbus device: the names serde gives `Report`'s variants.
pub(super) fn report(_: &mut SchemaGenerator) -> Schema {
    use protocols::modbus::Report;
    // A new variant fails to compile here until it is listed below.
    let all = |r: Report| match r {
        Report::EveryScan | Report::OnChange => r,
    };
    let names: Vec<serde_json::Value> = [Report::EveryScan, Report::OnChange]
        .into_iter()
        .map(all)
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    json_schema!({ "type": "string", "enum": names })
}

impl JsonSchema for Dur {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration with a unit: \"500us\", \"250ms\", \"1.5s\", \"2m\", \"1h\".",
            "examples": ["250ms", "1s"]
        })
    }
}

impl JsonSchema for Size {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["string", "integer"],
            "minimum": 0,
            "description": "A size: \"64KiB\", \"512MiB\", \"1GiB\" (1024-based), \"100MB\" (1000-based) or a number of bytes.",
            "examples": ["512MiB"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_names_every_section_and_refuses_unknown_keys() {
        let schema: serde_json::Value = serde_json::from_str(&schema_json()).unwrap();
        let props = &schema["properties"];
        for section in super::super::raw::SECTIONS {
            assert!(props.get(section).is_some(), "no {section} in {schema:#}");
        }
        assert_eq!(schema["additionalProperties"], false);
    }
}
