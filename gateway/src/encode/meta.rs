//! The meta message: what each tag of a device is, for a consumer that subscribes late.
//!
//! `{topic_prefix}/{device}/meta`, retained, QoS 1, in JSON mode:
//! `{"gateway":"edge-01","device":"press7","tags":[{"tag":"oil_temperature","type":"i16",
//! "unit":"degC","description":"...","min":-20.0,"max":120.0,"source":"hr:0",
//! "scan_interval_ms":100}]}`.
//!
//! Invariants:
//! - One document per current device (a reload's new catalog ids; ids a reload retired are
//!   never described), its tags in catalog order, every tag of the device listed.
//! - A key the config leaves out (`unit`, `description`, `min`, `max`, and `type` for a device
//!   that decides its own types, OPC UA) is left out of the document, never `null`.
//! - The document depends on the config alone (no time stamp): the same config gives the same
//!   bytes, so a re-publication after a reconnect changes nothing for a consumer.

use std::sync::Arc;

use bytes::Bytes;
use protocols::model::{Catalog, DeviceId, TagInfo};
use serde::Serialize;

/// One device's meta document, ready to publish; the publisher makes its topic.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaMessage {
    /// The device, as in its records' `device`.
    pub device: Arc<str>,
    /// The JSON document.
    pub payload: Bytes,
}

impl MetaMessage {
    /// The topic of the meta message of `device`.
    pub fn topic(topic_prefix: &str, device: &str) -> String {
        format!("{topic_prefix}/{device}/meta")
    }
}

#[derive(Serialize)]
struct Document<'a> {
    gateway: &'a str,
    device: &'a str,
    tags: Vec<Tag<'a>>,
}

#[derive(Serialize)]
struct Tag<'a> {
    tag: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    data_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    source: &'a str,
    scan_interval_ms: u64,
}

impl<'a> Tag<'a> {
    fn of(t: &'a TagInfo) -> Self {
        Tag {
            tag: &t.name,
            data_type: t.data_type,
            unit: t.meta.unit.as_deref(),
            description: t.meta.description.as_deref(),
            min: t.meta.min,
            max: t.meta.max,
            source: &t.source,
            scan_interval_ms: u64::try_from(t.scan_interval.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The meta documents of the devices `ids` of `catalog`, in that order (ids the catalog does
/// not know are skipped).
pub fn messages(gateway: &str, catalog: &Catalog, ids: &[DeviceId]) -> Vec<MetaMessage> {
    ids.iter()
        .filter_map(|id| catalog.device(*id))
        .map(|entry| {
            let doc = Document {
                gateway,
                device: &entry.name,
                tags: entry.info.iter().map(Tag::of).collect(),
            };
            // Serializing plain strings and finite numbers into a Vec cannot fail.
            let payload = serde_json::to_vec(&doc).unwrap_or_default();
            MetaMessage {
                device: entry.name.clone(),
                payload: Bytes::from(payload),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::model::TagMeta;
    use std::time::Duration;

    fn catalog() -> (Catalog, Vec<DeviceId>) {
        let mut c = Catalog::default();
        let old = c.add_described("press7".into(), vec![TagInfo::named("old".into())]);
        let temp = TagInfo {
            name: "oil_temperature".into(),
            data_type: Some("i16"),
            source: "hr:0".into(),
            scan_interval: Duration::from_millis(250),
            meta: TagMeta {
                unit: Some("degC".into()),
                description: Some("Oil \"temp\"".into()),
                min: Some(-20.0),
                max: Some(120.0),
            }
            .shared(),
        };
        let bare = TagInfo {
            name: "door".into(),
            data_type: None,
            source: "ns=2;s=Door".into(),
            scan_interval: Duration::ZERO,
            meta: TagMeta::default().shared(),
        };
        let new = c.add_described("press7".into(), vec![temp, bare]);
        let _ = old;
        (c, vec![new])
    }

    #[test]
    fn the_meta_document_lists_every_tag_with_type_unit_description_range_source_and_interval() {
        let (c, ids) = catalog();
        let m = messages("edge-01", &c, &ids);
        assert_eq!(m.len(), 1);
        assert_eq!(&*m[0].device, "press7");
        let v: serde_json::Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "gateway": "edge-01",
                "device": "press7",
                "tags": [
                    {"tag": "oil_temperature", "type": "i16", "unit": "degC",
                     "description": "Oil \"temp\"", "min": -20.0, "max": 120.0,
                     "source": "hr:0", "scan_interval_ms": 250},
                    {"tag": "door", "source": "ns=2;s=Door", "scan_interval_ms": 0}
                ]
            })
        );
    }

    #[test]
    fn only_the_current_devices_are_described_not_the_ids_a_reload_retired() {
        let (c, ids) = catalog();
        let m = messages("edge-01", &c, &ids);
        let v: serde_json::Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert!(v["tags"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["tag"] != "old"));
        assert!(messages("edge-01", &c, &[DeviceId(9)]).is_empty());
    }

    #[test]
    fn the_same_catalog_gives_the_same_bytes() {
        let (c, ids) = catalog();
        assert_eq!(messages("g", &c, &ids), messages("g", &c, &ids));
    }

    #[test]
    fn the_topic_is_the_devices_topic_under_the_prefix_with_meta_appended() {
        assert_eq!(
            MetaMessage::topic("plant/edge-01", "line1/meter3"),
            "plant/edge-01/line1/meter3/meta"
        );
    }
}
