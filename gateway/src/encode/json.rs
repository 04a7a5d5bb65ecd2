//! The JSON payload: one document per device scan.
//!
//! `{"gateway":"edge-01","boot":3,"device":"press7","seq":17,"historical":false,"samples":[...]}`.
//! Written by hand into one buffer per record: no intermediate tree, no per-sample allocation.
//! The `historical` literal's offset is kept so a replay can flip it without re-encoding.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use protocols::model::{Batch, Catalog, Sample, Value};

use crate::buffer::{Record, NO_FLAG};

/// Encodes batches of one gateway boot into records.
#[derive(Debug)]
pub struct JsonEncoder {
    gateway: Vec<u8>,
    boot: u64,
    head: Vec<u8>,
    topics: Vec<Arc<str>>,
    devices: Vec<Vec<u8>>,
    tags: Vec<Prefixes>,
    capacity_hint: usize,
}

/// A device's tags as they open a sample (`{"tag":"name"`), escaped once and packed in one
/// buffer: a `Vec` per tag cost about 48 bytes each (0.5 MB with 10k tags), this about 16.
#[derive(Debug, Default)]
struct Prefixes {
    bytes: Vec<u8>,
    /// Where each tag's prefix ends in `bytes`, by tag id.
    ends: Vec<u32>,
}

impl Prefixes {
    fn push(&mut self, tag: &str) {
        self.bytes.extend_from_slice(b"{\"tag\":");
        write_str(&mut self.bytes, tag);
        self.ends
            .push(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX));
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = match i.checked_sub(1) {
            Some(before) => *self.ends.get(before)? as usize,
            None => 0,
        };
        self.bytes.get(start..end)
    }
}

impl JsonEncoder {
    /// An encoder for a gateway id and boot number; `topic` names a device's topic.
    pub fn new(
        gateway: &str,
        boot: u64,
        topic: impl Fn(&str) -> String,
        catalog: &Catalog,
    ) -> Self {
        let mut quoted = Vec::new();
        write_str(&mut quoted, gateway);
        let topics = catalog
            .devices()
            .map(|(_, d)| Arc::from(topic(&d.name)))
            .collect();
        let devices = catalog
            .devices()
            .map(|(_, d)| {
                let mut v = Vec::new();
                write_str(&mut v, &d.name);
                v
            })
            .collect();
        // Tag names are escaped once here, so encoding a sample only copies bytes.
        let tags = catalog
            .devices()
            .map(|(_, d)| {
                let mut prefixes = Prefixes {
                    bytes: Vec::new(),
                    ends: Vec::with_capacity(d.tags.len()),
                };
                d.tags.iter().for_each(|t| prefixes.push(t));
                prefixes.bytes.shrink_to_fit();
                prefixes
            })
            .collect();
        let mut encoder = JsonEncoder {
            gateway: quoted,
            boot,
            head: Vec::new(),
            topics,
            devices,
            tags,
            capacity_hint: 256,
        };
        encoder.write_head();
        encoder
    }

    fn write_head(&mut self) {
        self.head.clear();
        self.head.extend_from_slice(b"{\"gateway\":");
        self.head.extend_from_slice(&self.gateway);
        let _ = write!(self.head, ",\"boot\":{},\"device\":", self.boot);
    }

    /// Encodes later records with boot number `boot` (a volatile boot starts mid-run).
    pub fn set_boot(&mut self, boot: u64) {
        if boot != self.boot {
            self.boot = boot;
            self.write_head();
        }
    }

    /// Encodes one batch as the record with sequence number `seq`.
    pub fn encode(&mut self, seq: u64, batch: &Batch) -> Record {
        let d = batch.device.0 as usize;
        let mut out = Vec::with_capacity(self.capacity_hint);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(self.devices.get(d).map_or(&b"null"[..], |v| v));
        let _ = write!(out, ",\"seq\":{seq},\"historical\":");
        let flag_offset = u32::try_from(out.len()).unwrap_or(NO_FLAG);
        out.extend_from_slice(b"false,\"samples\":[");
        let tags = self.tags.get(d);
        for (i, s) in batch.samples.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match tags.and_then(|t| t.get(s.tag.0 as usize)) {
                Some(prefix) => out.extend_from_slice(prefix),
                None => {
                    let _ = write!(out, "{{\"tag\":\"#{}\"", s.tag.0);
                }
            }
            write_sample(&mut out, s);
        }
        out.extend_from_slice(b"]}");
        self.capacity_hint = self.capacity_hint.max(out.len() + 64);
        let topic = self
            .topics
            .get(d)
            .cloned()
            .unwrap_or_else(|| Arc::from("unknown"));
        Record {
            seq,
            topic,
            payload: Bytes::from(out),
            flag_offset,
        }
    }
}

fn write_sample(out: &mut Vec<u8>, s: &Sample) {
    out.extend_from_slice(b",\"value\":");
    match &s.value {
        None => out.extend_from_slice(b"null"),
        Some(v) => write_value(out, v),
    }
    out.extend_from_slice(b",\"quality\":\"");
    out.extend_from_slice(s.quality.name().as_bytes());
    out.push(b'"');
    if let Some(r) = s.quality.reason() {
        let _ = write!(out, ",\"reason\":\"{r}\"");
    }
    let _ = write!(out, ",\"ts\":{}", s.gateway_time.0);
    if let Some(src) = s.source_time {
        let _ = write!(out, ",\"source_ts\":{}", src.0);
    }
    out.push(b'}');
}

/// Writes a value as the payload does (a float that is not finite as `null`).
pub(crate) fn write_value(out: &mut Vec<u8>, v: &Value) {
    let _ = match v {
        Value::Bool(b) => write!(out, "{b}"),
        Value::Int(i) => write!(out, "{i}"),
        Value::UInt(u) => write!(out, "{u}"),
        // JSON has no NaN or infinity.
        Value::Float(f) if !f.is_finite() => write!(out, "null"),
        Value::Float(f) => write!(out, "{f:?}"),
        Value::Text(t) => {
            write_str(out, t);
            Ok(())
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
            Ok(())
        }
    };
}

/// Writes a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::model::{Reason, TagId, Timestamp};
    use std::time::Instant;

    fn encoder() -> JsonEncoder {
        let mut c = Catalog::default();
        c.add_device(
            "press7".into(),
            vec!["sine".into(), "odd \"name\"".into(), "txt".into()],
        );
        JsonEncoder::new("edge-01", 3, |d| format!("edge/edge-01/{d}"), &c)
    }

    #[test]
    fn encodes_the_payload_contract() {
        let mut e = encoder();
        let batch = Batch {
            device: protocols::model::DeviceId(0),
            samples: vec![
                Sample::good(TagId(0), Value::Float(0.5), Timestamp(1764190000123)),
                Sample::bad(TagId(1), Reason::Exception(2), Timestamp(1764190000124)),
                Sample::good(TagId(2), Value::Text("a\u{1}b".into()), Timestamp(5)),
            ],
            read_at: Instant::now(),
        };
        let r = e.encode(17, &batch);
        assert_eq!(&*r.topic, "edge/edge-01/press7");
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["gateway"], "edge-01");
        assert_eq!(v["boot"], 3);
        assert_eq!(v["device"], "press7");
        assert_eq!(v["seq"], 17);
        assert_eq!(v["historical"], false);
        assert_eq!(v["samples"][0]["tag"], "sine");
        assert_eq!(v["samples"][0]["value"], 0.5);
        assert_eq!(v["samples"][0]["quality"], "good");
        assert_eq!(v["samples"][0]["ts"], 1764190000123u64);
        assert_eq!(v["samples"][1]["tag"], "odd \"name\"");
        assert_eq!(v["samples"][1]["value"], serde_json::Value::Null);
        assert_eq!(v["samples"][1]["quality"], "bad");
        assert_eq!(v["samples"][1]["reason"], "exception:2");
        assert_eq!(v["samples"][2]["value"], "a\u{1}b");
        let h: serde_json::Value = serde_json::from_slice(&r.historical_payload()).unwrap();
        assert_eq!(h["historical"], true);
    }

    #[test]
    fn a_new_boot_number_goes_into_later_records() {
        let mut e = encoder();
        let batch = Batch {
            device: protocols::model::DeviceId(0),
            samples: vec![Sample::good(TagId(0), Value::Float(1.0), Timestamp(1))],
            read_at: Instant::now(),
        };
        e.set_boot(1795763581588);
        let v: serde_json::Value = serde_json::from_slice(&e.encode(9, &batch).payload).unwrap();
        assert_eq!(v["boot"], 1795763581588u64);
        assert_eq!(v["gateway"], "edge-01");
        assert_eq!(v["device"], "press7");
    }

    #[test]
    fn non_finite_floats_become_null() {
        let mut e = encoder();
        let batch = Batch {
            device: protocols::model::DeviceId(0),
            samples: vec![Sample::good(TagId(0), Value::Float(f64::NAN), Timestamp(1))],
            read_at: Instant::now(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.encode(1, &batch).payload).unwrap();
        assert_eq!(v["samples"][0]["value"], serde_json::Value::Null);
    }

    #[test]
    fn whole_floats_keep_a_decimal_point() {
        let mut out = Vec::new();
        write_value(&mut out, &Value::Float(20.0));
        assert_eq!(out, b"20.0");
    }

    #[test]
    fn arrays_become_json_arrays_without_nan() {
        let mut out = Vec::new();
        let items = vec![
            Value::Int(-1),
            Value::Float(f64::NAN),
            Value::Text("a".into()),
        ];
        write_value(&mut out, &Value::Array(items.into()));
        assert_eq!(out, b"[-1,null,\"a\"]");
    }
}
