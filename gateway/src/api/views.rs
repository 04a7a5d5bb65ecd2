//! The large JSON answers (`/api/tags`, `/api/history`) as borrowed views serialized straight
//! into the body: no intermediate `serde_json::Value` tree, so 10k tags cost one output buffer
//! (taken from the heap and given back whole) rather than ten thousand small maps.

use protocols::model::{Sample, Value};
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

/// A tag value as JSON of its type.
pub(super) struct ValueView<'a>(pub(super) &'a Value);

impl Serialize for ValueView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Text(t) => s.serialize_str(t),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items.iter() {
                    seq.serialize_element(&ValueView(item))?;
                }
                seq.end()
            }
        }
    }
}

/// One row of `/api/tags`.
#[derive(Serialize)]
pub(super) struct TagView<'a> {
    pub(super) device: &'a str,
    pub(super) tag: &'a str,
    pub(super) value: Option<ValueView<'a>>,
    pub(super) quality: Option<&'static str>,
    pub(super) reason: Option<String>,
    pub(super) timestamp: Option<u64>,
    pub(super) age_s: Option<f64>,
}

impl<'a> TagView<'a> {
    /// The row of a tag, with its latest sample if one came; `now` in Unix milliseconds.
    pub(super) fn new(device: &'a str, tag: &'a str, sample: Option<&'a Sample>, now: u64) -> Self {
        match sample {
            None => TagView {
                device,
                tag,
                value: None,
                quality: None,
                reason: None,
                timestamp: None,
                age_s: None,
            },
            Some(s) => TagView {
                device,
                tag,
                value: s.value.as_ref().map(ValueView),
                quality: Some(s.quality.name()),
                reason: s.quality.reason().map(|r| r.to_string()),
                timestamp: Some(s.source_time.unwrap_or(s.gateway_time).unix_ms()),
                age_s: Some(now.saturating_sub(s.gateway_time.unix_ms()) as f64 / 1e3),
            },
        }
    }
}

/// `/api/tags`.
#[derive(Serialize)]
pub(super) struct TagsView<'a> {
    pub(super) tags: Vec<TagView<'a>>,
}

/// One tag of `/api/history`.
#[derive(Serialize)]
pub(super) struct HistoryView<'a> {
    pub(super) device: &'a str,
    pub(super) tag: &'a str,
    pub(super) points: &'a [Option<f32>],
}

/// `/api/history`.
#[derive(Serialize)]
pub(super) struct HistoriesView<'a> {
    pub(super) step_s: u64,
    pub(super) points: usize,
    pub(super) tags: Vec<HistoryView<'a>>,
}

#[cfg(test)]
mod tests {
    use protocols::model::{Reason, TagId, Timestamp};
    use serde_json::json;

    use super::*;

    fn json_of(v: &impl Serialize) -> serde_json::Value {
        serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap()
    }

    #[test]
    fn values_become_json_of_their_type() {
        assert_eq!(json_of(&ValueView(&Value::Int(-3))), json!(-3));
        assert_eq!(json_of(&ValueView(&Value::Text("on".into()))), json!("on"));
        let array = Value::Array(vec![Value::Bool(true), Value::Float(1.5)].into());
        assert_eq!(json_of(&ValueView(&array)), json!([true, 1.5]));
        assert_eq!(json_of(&ValueView(&Value::Float(f64::NAN))), json!(null));
    }

    #[test]
    fn a_tag_without_a_sample_has_every_field_null_and_a_bad_one_its_reason() {
        let none = json_of(&TagView::new("press", "t", None, 5_000));
        assert_eq!(
            none,
            json!({"device": "press", "tag": "t", "value": null, "quality": null,
                   "reason": null, "timestamp": null, "age_s": null})
        );
        let bad = Sample::bad(TagId(0), Reason::Timeout, Timestamp(3_000));
        let row = json_of(&TagView::new("press", "t", Some(&bad), 5_000));
        assert_eq!(
            row,
            json!({"device": "press", "tag": "t", "value": null, "quality": "bad",
                   "reason": "timeout", "timestamp": 3000, "age_s": 2.0})
        );
    }
}
