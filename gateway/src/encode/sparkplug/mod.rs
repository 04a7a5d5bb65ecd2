//! The Sparkplug B payloads (Sparkplug 3.0, Eclipse Tahu protobuf): the writer encodes each
//! device scan once as a DDATA record; births and deaths are made by the publisher's session
//! ([`session`]) at send time from the latest values.
//!
//! What is fixed here, for every message:
//! - Topics are `spBv1.0/{group}/{type}/{edge node}[/{device}]`; a device's Sparkplug id is its
//!   gateway name with `/` (a unit of a Modbus line, `line/unit`) written `:`, which no config
//!   name can hold, so two devices never share an id.
//! - A metric's alias is `(device id + 1) << 32 | tag id`, the node's own metrics take 1..=3:
//!   unique across the edge node, and the same for a tag in every session.
//! - DDATA names metrics by alias only; births carry name, alias, datatype, value and the
//!   `Quality` property (Int32: 0 bad, 192 good, 500 stale).
//! - A bad sample is `is_null` with `Quality` 0 and a `reason` property; an uncertain one keeps
//!   its value with `Quality` 500 (the spec's only "usable, not good" code) and its `reason`.
//! - The record's payload has no `seq` (field 3): the session appends it at send time
//!   ([`with_seq`]); protobuf takes fields in any order. Its `uuid` is `"{boot}:{seq}"`, the
//!   gateway's own sequence, so a consumer can count losses across sessions and restarts.
//! - A replayed record is re-encoded with `is_historical` on every metric ([`historical`]);
//!   replay is rare, and the live path stays one encode.

pub mod command;
pub mod proto;
pub mod session;

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use protocols::model::{Batch, Catalog, Quality, Sample, TagMeta, Value};

use crate::buffer::Record;
use proto::{
    datatype, Metric, MetricValue, Payload, PropertySet, PropertyValue, PropertyValueValue,
};

/// `Record::flag_offset` of a Sparkplug record: its historical form is made by [`historical`].
pub const SPARKPLUG_FLAG: u32 = u32::MAX - 1;

/// The namespace of Sparkplug B topics.
pub const NAMESPACE: &str = "spBv1.0";

/// Node metric names.
pub const BD_SEQ: &str = "bdSeq";
pub const REBIRTH: &str = "Node Control/Rebirth";
pub const BOOT: &str = "Gateway/boot";

/// The `Quality` property values (Sparkplug 3.0).
pub const QUALITY_BAD: u32 = 0;
pub const QUALITY_GOOD: u32 = 192;
pub const QUALITY_STALE: u32 = 500;

/// A device's Sparkplug id from its gateway name.
pub fn device_id(name: &str) -> String {
    name.replace('/', ":")
}

/// A metric's alias.
pub fn alias(device: u32, tag: u32) -> u64 {
    ((u64::from(device) + 1) << 32) | u64::from(tag)
}

/// The topics of one edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    group: String,
    node: String,
}

impl Topics {
    pub fn new(group: &str, node: &str) -> Self {
        Topics {
            group: group.to_owned(),
            node: node.to_owned(),
        }
    }
    fn node_topic(&self, kind: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.node)
    }
    pub fn nbirth(&self) -> String {
        self.node_topic("NBIRTH")
    }
    pub fn ndeath(&self) -> String {
        self.node_topic("NDEATH")
    }
    pub fn ncmd(&self) -> String {
        self.node_topic("NCMD")
    }
    /// Every device's DCMD.
    pub fn dcmd_filter(&self) -> String {
        format!("{}/+", self.node_topic("DCMD"))
    }
    /// `kind` (DBIRTH, DDATA, DDEATH) of the device named `name` in the gateway.
    pub fn device(&self, kind: &str, name: &str) -> String {
        format!("{}/{}", self.node_topic(kind), device_id(name))
    }
    /// A primary host's STATE topic (Sparkplug 3.0).
    pub fn state(host: &str) -> String {
        format!("{NAMESPACE}/STATE/{host}")
    }
}

/// The payload with the session's `seq` appended (field 3, varint): no re-encoding.
pub fn with_seq(payload: &[u8], seq: u8) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 3);
    out.put_slice(payload);
    out.put_u8(0x18);
    let seq = u64::from(seq);
    prost::encoding::encode_varint(seq, &mut out);
    out.freeze()
}

/// A stored DDATA payload as it goes out when replayed: every metric `is_historical`. A payload
/// that does not decode (not possible for a record this encoder made) goes out unchanged.
pub fn historical(payload: &[u8]) -> Bytes {
    match Payload::decode(payload) {
        Ok(mut p) => {
            for m in &mut p.metrics {
                m.is_historical = Some(true);
            }
            Bytes::from(p.encode_to_vec())
        }
        Err(_) => Bytes::copy_from_slice(payload),
    }
}

/// The datatype a value is carried as.
pub fn value_datatype(v: &Value) -> u32 {
    match v {
        Value::Bool(_) => datatype::BOOLEAN,
        Value::Int(_) => datatype::INT64,
        Value::UInt(_) => datatype::UINT64,
        Value::Float(_) => datatype::DOUBLE,
        Value::Text(_) | Value::Array(_) => datatype::STRING,
    }
}

/// A value as a metric value (Int64 as its two's complement, arrays as JSON text).
pub fn metric_value(v: &Value) -> MetricValue {
    match v {
        Value::Bool(b) => MetricValue::BooleanValue(*b),
        Value::Int(i) => MetricValue::LongValue(*i as u64),
        Value::UInt(u) => MetricValue::LongValue(*u),
        Value::Float(f) => MetricValue::DoubleValue(*f),
        Value::Text(t) => MetricValue::StringValue(t.to_string()),
        Value::Array(_) => {
            let mut out = Vec::new();
            super::json::write_value(&mut out, v);
            MetricValue::StringValue(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

fn quality_properties(q: &Quality) -> Option<PropertySet> {
    let (code, reason) = match q {
        Quality::Good => return None,
        Quality::Bad(r) => (QUALITY_BAD, r),
        Quality::Uncertain(r) => (QUALITY_STALE, r),
    };
    Some(PropertySet {
        keys: vec!["Quality".into(), "reason".into()],
        values: vec![
            PropertyValue {
                r#type: Some(datatype::INT32),
                is_null: None,
                value: Some(PropertyValueValue::IntValue(code)),
            },
            PropertyValue {
                r#type: Some(datatype::STRING),
                is_null: None,
                value: Some(PropertyValueValue::StringValue(reason.to_string())),
            },
        ],
    })
}

/// One sample as a metric (without name or datatype: DDATA names by alias).
fn sample_metric(device: u32, s: &Sample) -> Metric {
    let bad = matches!(s.quality, Quality::Bad(_)) || s.value.is_none();
    Metric {
        name: None,
        alias: Some(alias(device, s.tag.0)),
        timestamp: Some(s.gateway_time.unix_ms()),
        datatype: None,
        is_historical: None,
        is_transient: None,
        is_null: bad.then_some(true),
        properties: quality_properties(&s.quality),
        value: if bad {
            None
        } else {
            s.value.as_ref().map(metric_value)
        },
    }
}

/// Whether a scan says its device answers: any sample not bad.
pub fn answers(batch: &Batch) -> bool {
    batch
        .samples
        .iter()
        .any(|s| !matches!(s.quality, Quality::Bad(_)))
}

/// What the writer does with a scan, from the device's liveness before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The device comes (back) online: the session's DBIRTH goes before the record.
    pub born: bool,
    /// The scan becomes a DDATA record.
    pub record: bool,
    /// The device went offline with this scan: DDEATH after its record.
    pub died: bool,
}

/// Encodes the scans of one gateway boot as DDATA records, and keeps each device's liveness.
#[derive(Debug)]
pub struct SparkplugEncoder {
    boot: u64,
    topics: Vec<Arc<str>>,
    /// Per device: online (answered at its last scan), offline, or not seen yet.
    online: Vec<Option<bool>>,
    metrics: Vec<Metric>,
    capacity_hint: usize,
}

impl SparkplugEncoder {
    pub fn new(topics: &Topics, boot: u64, catalog: &Catalog) -> Self {
        SparkplugEncoder {
            boot,
            topics: catalog
                .devices()
                .map(|(_, d)| Arc::from(topics.device("DDATA", &d.name)))
                .collect(),
            online: Vec::new(),
            metrics: Vec::new(),
            capacity_hint: 256,
        }
    }

    pub fn set_boot(&mut self, boot: u64) {
        self.boot = boot;
    }

    /// Takes in a scan's liveness: a device that answers after not answering (or at its first
    /// scan) is born; one that stops answering makes a last record, then dies; a device that
    /// does not answer and is already offline makes no record (its DDEATH stands for it).
    pub fn verdict(&mut self, batch: &Batch) -> Verdict {
        let d = batch.device.0 as usize;
        if self.online.len() <= d {
            self.online.resize(d + 1, None);
        }
        let now = answers(batch);
        let before = self.online[d];
        self.online[d] = Some(now);
        match (before, now) {
            (Some(true), true) => Verdict {
                born: false,
                record: true,
                died: false,
            },
            (_, true) => Verdict {
                born: true,
                record: true,
                died: false,
            },
            (Some(true), false) => Verdict {
                born: false,
                record: true,
                died: true,
            },
            (_, false) => Verdict {
                born: false,
                record: false,
                died: false,
            },
        }
    }

    /// Encodes one scan as the DDATA record with the gateway's sequence number `seq`.
    pub fn encode(&mut self, seq: u64, batch: &Batch) -> Record {
        let device = batch.device.0;
        let mut metrics = std::mem::take(&mut self.metrics);
        metrics.extend(batch.samples.iter().map(|s| sample_metric(device, s)));
        let timestamp = batch
            .samples
            .iter()
            .map(|s| s.gateway_time.unix_ms())
            .max()
            .unwrap_or(0);
        let payload = Payload {
            timestamp: Some(timestamp),
            metrics,
            seq: None,
            uuid: Some(format!("{}:{seq}", self.boot)),
            body: None,
        };
        let mut out = Vec::with_capacity(self.capacity_hint);
        // Encoding into a Vec cannot fail (it grows).
        let _ = payload.encode(&mut out);
        self.capacity_hint = self.capacity_hint.max(out.len() + 16);
        self.metrics = payload.metrics;
        self.metrics.clear();
        let topic = self
            .topics
            .get(device as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from("unknown"));
        Record {
            seq,
            topic,
            payload: Bytes::from(out),
            flag_offset: SPARKPLUG_FLAG,
        }
    }
}

/// A node or device metric with its name, for births.
fn named(
    name: &str,
    alias: u64,
    datatype: u32,
    value: Option<MetricValue>,
    timestamp: u64,
) -> Metric {
    Metric {
        name: Some(name.to_owned()),
        alias: Some(alias),
        timestamp: Some(timestamp),
        datatype: Some(datatype),
        is_historical: None,
        is_transient: None,
        is_null: value.is_none().then_some(true),
        properties: None,
        value,
    }
}

/// NBIRTH: `bdSeq`, `Node Control/Rebirth` and the gateway's boot number.
pub fn nbirth(bd_seq: u64, boot: u64, timestamp: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(timestamp),
        metrics: vec![
            named(
                BD_SEQ,
                1,
                datatype::INT64,
                Some(MetricValue::LongValue(bd_seq)),
                timestamp,
            ),
            named(
                REBIRTH,
                REBIRTH_ALIAS,
                datatype::BOOLEAN,
                Some(MetricValue::BooleanValue(false)),
                timestamp,
            ),
            named(
                BOOT,
                3,
                datatype::UINT64,
                Some(MetricValue::LongValue(boot)),
                timestamp,
            ),
        ],
        seq: None,
        uuid: None,
        body: None,
    }
    .encode_to_vec()
}

/// NDEATH, the will: `bdSeq` only, no `seq`.
pub fn ndeath(bd_seq: u64, timestamp: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(timestamp),
        metrics: vec![named(
            BD_SEQ,
            1,
            datatype::INT64,
            Some(MetricValue::LongValue(bd_seq)),
            timestamp,
        )],
        seq: None,
        uuid: None,
        body: None,
    }
    .encode_to_vec()
}

/// DDEATH: a timestamp only.
pub fn ddeath(timestamp: u64) -> Vec<u8> {
    Payload {
        timestamp: Some(timestamp),
        ..Payload::default()
    }
    .encode_to_vec()
}

/// What a birth declares for a tag that has no value yet: the datatype its values will have.
pub type Declared = Option<u32>;

/// The configured unit, range and description of a tag as the metric properties Sparkplug
/// names for them (`engUnit`, `engLow`, `engHigh`) and `description`.
fn eng_properties(props: &mut PropertySet, meta: &TagMeta) {
    let mut put = |key: &str, r#type: u32, value: PropertyValueValue| {
        props.keys.push(key.into());
        props.values.push(PropertyValue {
            r#type: Some(r#type),
            is_null: None,
            value: Some(value),
        });
    };
    if let Some(unit) = &meta.unit {
        put(
            "engUnit",
            datatype::STRING,
            PropertyValueValue::StringValue(unit.to_string()),
        );
    }
    if let Some(low) = meta.min {
        put(
            "engLow",
            datatype::DOUBLE,
            PropertyValueValue::DoubleValue(low),
        );
    }
    if let Some(high) = meta.max {
        put(
            "engHigh",
            datatype::DOUBLE,
            PropertyValueValue::DoubleValue(high),
        );
    }
    if let Some(text) = &meta.description {
        put(
            "description",
            datatype::STRING,
            PropertyValueValue::StringValue(text.to_string()),
        );
    }
}

/// The datatype a tag is born with: its latest value's, else the one the config declares,
/// else String.
pub fn birth_datatype(latest: Option<&Sample>, declared: Declared) -> u32 {
    latest
        .and_then(|s| s.value.as_ref())
        .map(value_datatype)
        .or(declared)
        .unwrap_or(datatype::STRING)
}

/// DBIRTH of device `device`: every tag with name, alias, datatype, its latest value (null
/// when it has none), `Quality`, and the unit, range and description the config gives it.
pub fn dbirth(
    device: u32,
    tags: &[Arc<str>],
    declared: &[Declared],
    meta: &[Arc<TagMeta>],
    latest: &[Option<Sample>],
    timestamp: u64,
) -> Vec<u8> {
    let metrics = tags
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sample = latest.get(i).and_then(Option::as_ref);
            let datatype = birth_datatype(sample, declared.get(i).copied().flatten());
            let mut m = match sample {
                Some(s) => {
                    let mut m = sample_metric(device, s);
                    m.name = Some(name.to_string());
                    m
                }
                None => named(name, alias(device, i as u32), datatype, None, timestamp),
            };
            m.datatype = Some(datatype);
            let props = m.properties.get_or_insert_with(PropertySet::default);
            if props.keys.is_empty() {
                let code = if sample.is_some() {
                    QUALITY_GOOD
                } else {
                    QUALITY_BAD
                };
                props.keys.push("Quality".into());
                props.values.push(PropertyValue {
                    r#type: Some(datatype::INT32),
                    is_null: None,
                    value: Some(PropertyValueValue::IntValue(code)),
                });
            }
            if let Some(meta) = meta.get(i) {
                eng_properties(props, meta);
            }
            m
        })
        .collect();
    Payload {
        timestamp: Some(timestamp),
        metrics,
        seq: None,
        uuid: None,
        body: None,
    }
    .encode_to_vec()
}

/// The alias `Node Control/Rebirth` has in the NBIRTH.
pub const REBIRTH_ALIAS: u64 = 2;

/// What an NCMD asks of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeCommand {
    /// `Node Control/Rebirth` = true (by name or by its alias).
    pub rebirth: bool,
    /// Any other metric it would write, by name or `alias N`: the node has no writable
    /// metric, so each is refused.
    pub others: Vec<String>,
}

/// What an NCMD payload asks; a payload that does not decode asks for nothing.
pub fn node_command(payload: &[u8]) -> NodeCommand {
    let Ok(p) = Payload::decode(payload) else {
        return NodeCommand::default();
    };
    let mut command = NodeCommand::default();
    for m in p.metrics {
        let is_rebirth = match (&m.name, m.alias) {
            (Some(name), _) if !name.is_empty() => name == REBIRTH,
            (_, alias) => alias == Some(REBIRTH_ALIAS),
        };
        if is_rebirth {
            command.rebirth |= matches!(m.value, Some(MetricValue::BooleanValue(true)));
        } else {
            command.others.push(match (m.name, m.alias) {
                (Some(name), _) if !name.is_empty() => name,
                (_, Some(alias)) => format!("alias {alias}"),
                _ => "a metric without name or alias".to_owned(),
            });
        }
    }
    command
}

/// A primary host's STATE as it said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostState {
    /// Whether the host is online.
    pub online: bool,
    /// When the host's session that this STATE is about began (Unix ms); None in the older
    /// text form, which has none.
    pub timestamp: Option<u64>,
}

/// A primary host's STATE payload (Sparkplug 3.0: `{"online":true,"timestamp":...}`; the
/// older `ONLINE`/`OFFLINE` text too); `None` when unreadable.
pub fn host_state(payload: &[u8]) -> Option<HostState> {
    let text = |online| {
        Some(HostState {
            online,
            timestamp: None,
        })
    };
    match payload {
        b"ONLINE" => return text(true),
        b"OFFLINE" => return text(false),
        _ => {}
    }
    #[derive(serde::Deserialize)]
    struct Json {
        online: bool,
        timestamp: Option<u64>,
    }
    let j: Json = serde_json::from_slice(payload).ok()?;
    Some(HostState {
        online: j.online,
        timestamp: j.timestamp,
    })
}

/// A payload as readable JSON, for `edge-gateway test`: each metric with its name (from
/// `name_of` for an alias), value or null, timestamp and properties.
pub fn describe(payload: &[u8], name_of: impl Fn(u64) -> Option<String>) -> String {
    let Ok(p) = Payload::decode(payload) else {
        return "(not a Sparkplug payload)".into();
    };
    let metrics: Vec<serde_json::Value> = p
        .metrics
        .iter()
        .map(|m| {
            let name = m.name.clone().or_else(|| m.alias.and_then(&name_of));
            let value = match &m.value {
                Some(MetricValue::IntValue(v)) => serde_json::json!(v),
                Some(MetricValue::LongValue(v)) => serde_json::json!(v),
                Some(MetricValue::FloatValue(v)) => serde_json::json!(v),
                Some(MetricValue::DoubleValue(v)) => serde_json::json!(v),
                Some(MetricValue::BooleanValue(v)) => serde_json::json!(v),
                Some(MetricValue::StringValue(v)) => serde_json::json!(v),
                Some(MetricValue::BytesValue(v)) => serde_json::json!(v),
                None => serde_json::Value::Null,
            };
            let mut o = serde_json::json!({
                "name": name, "alias": m.alias, "timestamp": m.timestamp, "value": value,
            });
            if let Some(props) = &m.properties {
                for (k, v) in props.keys.iter().zip(&props.values) {
                    let v = match &v.value {
                        Some(PropertyValueValue::IntValue(i)) => serde_json::json!(i),
                        Some(PropertyValueValue::StringValue(t)) => serde_json::json!(t),
                        _ => serde_json::Value::Null,
                    };
                    o[k.as_str()] = v;
                }
            }
            o
        })
        .collect();
    serde_json::json!({ "timestamp": p.timestamp, "seq": p.seq, "uuid": p.uuid, "metrics": metrics })
        .to_string()
}

#[cfg(test)]
mod tests;

/// What a consumer needs of a DDATA to account for it: the gateway's (boot, seq) from the
/// `uuid`, whether it was replayed (`is_historical` on its metrics) and each metric's read
/// time. `None` for a payload that does not decode or carries no `"{boot}:{seq}"` uuid.
pub fn ddata_identity(payload: &[u8]) -> Option<DdataIdentity> {
    let p = Payload::decode(payload).ok()?;
    let (boot, seq) = p.uuid.as_deref()?.split_once(':')?;
    Some(DdataIdentity {
        boot: boot.parse().ok()?,
        seq: seq.parse().ok()?,
        historical: p.metrics.iter().any(|m| m.is_historical == Some(true)),
        sample_ts: p
            .metrics
            .iter()
            .filter_map(|m| m.timestamp.and_then(|t| i64::try_from(t).ok()))
            .collect(),
    })
}

/// See [`ddata_identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdataIdentity {
    /// The gateway's boot.
    pub boot: u64,
    /// The gateway's record seq.
    pub seq: u64,
    /// Replayed from the gateway's disk.
    pub historical: bool,
    /// Each metric's read time (milliseconds since the Unix epoch).
    pub sample_ts: Vec<i64>,
}
