//! JSON Schemas (draft 2020-12) of what a cloud consumer reads in JSON mode: the record
//! ([`json`](super::json)), the meta message ([`meta`](super::meta)) and the gateway's status
//! (`publish/status.rs`). One document, each message under `$defs` (`record`, `meta`,
//! `status`), the document itself accepting any of the three. `edge-gateway schema --payload`
//! prints it; `docs/payload.schema.json` is a copy, kept equal by a test.
//!
//! Written by hand: the encoders write their bytes by hand too, and the tests validate real
//! messages of a running gateway against this document (`tests/tests/payload_schema.rs`).

use serde_json::{json, Value};

/// The payload schema document.
pub fn payload_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/edge-gateway/edge-gateway/docs/payload.schema.json",
        "title": "edge-gateway MQTT payloads (JSON mode)",
        "description": "A record ({topic_prefix}/{device}, QoS 1), a meta message ({topic_prefix}/{device}/meta, retained, QoS 1) or the gateway's status ({topic_prefix}/status, retained, QoS 1).",
        "oneOf": [
            {"$ref": "#/$defs/record"},
            {"$ref": "#/$defs/meta"},
            {"$ref": "#/$defs/status"}
        ],
        "$defs": {
            "record": {
                "title": "record",
                "description": "One device scan. (gateway, boot, seq) names the record: seq is contiguous within a boot over all devices of the gateway, so a consumer that sees every device's topic can count what it did not receive; a record sent again (after a reconnect or a restart) has the same (gateway, boot, seq) and the same samples.",
                "type": "object",
                "required": ["gateway", "boot", "device", "seq", "historical", "samples"],
                "additionalProperties": false,
                "properties": {
                    "gateway": {"type": "string", "description": "[gateway] id"},
                    "boot": {"type": "integer", "minimum": 0, "description": "Grows with every start of the gateway (a volatile boot is a time in milliseconds)."},
                    "device": {"type": "string", "description": "The device name (line/unit for a unit of a Modbus line)."},
                    "seq": {"type": "integer", "minimum": 0, "description": "Contiguous within a boot, over all devices."},
                    "historical": {"type": "boolean", "description": "true when the record was replayed from the disk buffer."},
                    "samples": {"type": "array", "items": {"$ref": "#/$defs/sample"}}
                }
            },
            "sample": {
                "title": "sample",
                "type": "object",
                "required": ["tag", "value", "quality", "ts"],
                "additionalProperties": false,
                "properties": {
                    "tag": {"type": "string"},
                    "value": {"$ref": "#/$defs/value"},
                    "quality": {"enum": ["good", "uncertain", "bad"]},
                    "reason": {"type": "string", "description": "Why the quality is not good: timeout, exception:<code>, disconnected, decode, protocol, or an OPC UA status code name."},
                    "ts": {"type": "integer", "description": "When the gateway read the value, milliseconds since the Unix epoch."},
                    "source_ts": {"type": "integer", "description": "The device's own time stamp, when it has one (OPC UA), milliseconds since the Unix epoch."}
                },
                "if": {"properties": {"quality": {"const": "good"}}},
                "then": {"not": {"required": ["reason"]}},
                "else": {"required": ["reason"]}
            },
            "value": {
                "description": "The typed value; null when it could not be read (or is a float that is not finite).",
                "type": ["boolean", "number", "string", "null", "array"],
                "items": {"$ref": "#/$defs/value"}
            },
            "meta": {
                "title": "meta",
                "description": "What each tag of a device is, as configured. Retained: a consumer that subscribes late gets it at once. Sent after each connection and whenever a reload changes it; an empty retained message clears it when the device is removed.",
                "type": "object",
                "required": ["gateway", "device", "tags"],
                "additionalProperties": false,
                "properties": {
                    "gateway": {"type": "string"},
                    "device": {"type": "string"},
                    "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}
                }
            },
            "tag": {
                "title": "tag",
                "type": "object",
                "required": ["tag", "source", "scan_interval_ms"],
                "additionalProperties": false,
                "properties": {
                    "tag": {"type": "string"},
                    "type": {"enum": ["bool", "i16", "u16", "i32", "u32", "i64", "u64", "f32", "f64", "string"], "description": "The configured Modbus type (values with scale or offset are floats); absent when the device decides (OPC UA)."},
                    "unit": {"type": "string", "description": "Engineering unit."},
                    "description": {"type": "string"},
                    "min": {"type": "number", "description": "Low end of the engineering range."},
                    "max": {"type": "number", "description": "High end of the engineering range."},
                    "source": {"type": "string", "description": "A Modbus address (hr:100, ir:3, co:7, di:0) or an OPC UA node id or browse path (Objects/...)."},
                    "scan_interval_ms": {"type": "integer", "minimum": 0, "description": "How often the tag is read; for an OPC UA subscription the sampling interval asked of the server (0: its fastest)."}
                }
            },
            "status": {
                "title": "status",
                "description": "The gateway's own state: online after each connection, offline at a clean shutdown and as the last will.",
                "type": "object",
                "required": ["gateway", "boot", "state", "ts"],
                "additionalProperties": false,
                "properties": {
                    "gateway": {"type": "string"},
                    "boot": {"type": "integer", "minimum": 0},
                    "state": {"enum": ["online", "offline"]},
                    "ts": {"type": "integer", "description": "When the document was made, milliseconds since the Unix epoch."}
                }
            }
        }
    })
}

/// The payload schema as `schema --payload` prints it (pretty, with a final newline).
pub fn payload_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&payload_schema()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS_COPY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/payload.schema.json");

    #[test]
    fn the_copy_in_docs_is_the_schema_the_binary_prints() {
        if std::env::var_os("UPDATE_PAYLOAD_SCHEMA").is_some() {
            std::fs::write(DOCS_COPY, payload_schema_text()).unwrap();
        }
        let copy = std::fs::read_to_string(DOCS_COPY).unwrap_or_default();
        assert!(
            copy == payload_schema_text(),
            "docs/payload.schema.json is stale: run the test again with UPDATE_PAYLOAD_SCHEMA=1"
        );
    }

    fn valid(def: &str, doc: &Value) -> bool {
        let mut schema = payload_schema();
        schema["$ref"] = json!(format!("#/$defs/{def}"));
        if let Some(o) = schema.as_object_mut() {
            o.remove("oneOf");
        }
        jsonschema::validator_for(&schema).unwrap().is_valid(doc)
    }

    #[test]
    fn a_bad_sample_must_say_why_and_a_good_one_must_not() {
        let good = json!({"tag": "t", "value": 1.5, "quality": "good", "ts": 1});
        let bad =
            json!({"tag": "t", "value": null, "quality": "bad", "reason": "timeout", "ts": 1});
        assert!(valid("sample", &good));
        assert!(valid("sample", &bad));
        let bad_without_reason = json!({"tag": "t", "value": null, "quality": "bad", "ts": 1});
        assert!(!valid("sample", &bad_without_reason));
        let good_with_reason =
            json!({"tag": "t", "value": 1, "quality": "good", "reason": "x", "ts": 1});
        assert!(!valid("sample", &good_with_reason));
    }

    #[test]
    fn a_record_without_its_seq_or_with_an_unknown_key_is_refused() {
        let record = json!({"gateway": "g", "boot": 1, "device": "d", "seq": 3,
                            "historical": false, "samples": []});
        assert!(valid("record", &record));
        let mut no_seq = record.clone();
        no_seq.as_object_mut().unwrap().remove("seq");
        assert!(!valid("record", &no_seq));
        let mut extra = record.clone();
        extra["extra"] = json!(1);
        assert!(!valid("record", &extra));
    }
}
