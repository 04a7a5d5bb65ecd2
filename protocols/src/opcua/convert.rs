//! From OPC UA's data model to the tag model: variants become [`Value`]s, status codes become
//! [`Quality`], data values become [`Sample`]s. Pure functions, no I/O.
//!
//! Built-in scalar types map onto the closest tag value (signed integers to `Int`, unsigned to
//! `UInt`, floats to `Float`), DateTime to an RFC 3339 text, ByteString to base64 text, and
//! one-dimensional arrays to `Array`. Structured types the gateway does not understand
//! (ExtensionObject, DiagnosticInfo, multi-dimensional arrays) give a bad sample with reason
//! `decode` rather than a guess.

use std::sync::Arc;

use base64::Engine as _;
use opcua::types::{DataValue, DateTime, StatusCode, Variant};

use crate::model::{Quality, Reason, Sample, TagId, Timestamp, Value};

/// Converts a variant to a tag value; `None` for empty values and types without a mapping.
pub(crate) fn variant_to_value(variant: &Variant) -> Option<Value> {
    Some(match variant {
        Variant::Empty => return None,
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(v) => Value::Int(i64::from(*v)),
        Variant::Byte(v) => Value::UInt(u64::from(*v)),
        Variant::Int16(v) => Value::Int(i64::from(*v)),
        Variant::UInt16(v) => Value::UInt(u64::from(*v)),
        Variant::Int32(v) => Value::Int(i64::from(*v)),
        Variant::UInt32(v) => Value::UInt(u64::from(*v)),
        Variant::Int64(v) => Value::Int(*v),
        Variant::UInt64(v) => Value::UInt(*v),
        Variant::Float(v) => Value::Float(f64::from(*v)),
        Variant::Double(v) => Value::Float(*v),
        Variant::String(s) => Value::Text(Arc::from(s.as_ref())),
        Variant::DateTime(dt) => Value::Text(Arc::from(dt.to_rfc3339().as_str())),
        Variant::ByteString(b) => match b.value.as_deref() {
            Some(bytes) => Value::Text(Arc::from(
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )),
            None => return None,
        },
        Variant::Guid(g) => Value::Text(Arc::from(g.to_string().as_str())),
        Variant::StatusCode(s) => Value::UInt(u64::from(s.bits())),
        Variant::LocalizedText(t) => Value::Text(Arc::from(t.text.as_ref())),
        Variant::QualifiedName(q) => Value::Text(Arc::from(q.name.as_ref())),
        Variant::NodeId(n) => Value::Text(Arc::from(n.to_string().as_str())),
        Variant::Variant(inner) => return variant_to_value(inner),
        Variant::Array(array) => {
            let one_dimensional = array.dimensions.as_ref().is_none_or(|dims| dims.len() <= 1);
            if !one_dimensional {
                return None;
            }
            let mut items = Vec::with_capacity(array.values.len());
            for v in &array.values {
                items.push(variant_to_value(v)?);
            }
            Value::Array(items.into())
        }
        _ => return None,
    })
}

/// Maps a status code onto quality; the reason carries the full code (rendered by name).
pub(crate) fn quality_of(status: StatusCode) -> Quality {
    if status.is_good() {
        Quality::Good
    } else if status.is_uncertain() {
        Quality::Uncertain(Reason::Status(status.bits()))
    } else {
        Quality::Bad(Reason::Status(status.bits()))
    }
}

/// Milliseconds since the Unix epoch; `None` for OPC UA's null time.
pub(crate) fn timestamp_of(time: &DateTime) -> Option<Timestamp> {
    if time.is_null() {
        return None;
    }
    Some(Timestamp(time.as_chrono().timestamp_millis()))
}

/// Converts one data value into a sample for `tag`, read at `now`.
///
/// A good or uncertain status with a value the gateway cannot represent becomes bad `decode`;
/// a bad status keeps no value (servers send stale or empty ones).
pub(crate) fn sample_of(tag: TagId, dv: &DataValue, now: Timestamp) -> Sample {
    let status = dv.status.unwrap_or(StatusCode::Good);
    let mut quality = quality_of(status);
    let value = match quality {
        Quality::Bad(_) => None,
        _ => match dv.value.as_ref().and_then(variant_to_value) {
            Some(v) => Some(v),
            None => {
                quality = Quality::Bad(Reason::Decode);
                None
            }
        },
    };
    Sample {
        tag,
        value,
        quality,
        source_time: dv.source_timestamp.as_ref().and_then(timestamp_of),
        gateway_time: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::{Array, ByteString, VariantScalarTypeId};
    use proptest::prelude::*;

    #[test]
    fn every_builtin_scalar_maps_to_the_closest_value() {
        let cases: Vec<(Variant, Value)> = vec![
            (Variant::Boolean(true), Value::Bool(true)),
            (Variant::SByte(-3), Value::Int(-3)),
            (Variant::Byte(200), Value::UInt(200)),
            (Variant::Int16(-300), Value::Int(-300)),
            (Variant::UInt16(60000), Value::UInt(60000)),
            (Variant::Int32(-70000), Value::Int(-70000)),
            (Variant::UInt32(4_000_000_000), Value::UInt(4_000_000_000)),
            (Variant::Int64(i64::MIN), Value::Int(i64::MIN)),
            (Variant::UInt64(u64::MAX), Value::UInt(u64::MAX)),
            (Variant::Float(1.5), Value::Float(1.5)),
            (Variant::Double(-2.25), Value::Float(-2.25)),
            (Variant::from("oven"), Value::Text("oven".into())),
            (
                Variant::ByteString(ByteString::from(vec![0u8, 1, 2, 255])),
                Value::Text("AAEC/w==".into()),
            ),
        ];
        for (variant, expected) in cases {
            assert_eq!(variant_to_value(&variant), Some(expected), "{variant:?}");
        }
    }

    #[test]
    fn date_times_become_rfc3339_text() {
        let dt = DateTime::ymd_hms(2026, 11, 26, 12, 30, 5);
        let Some(Value::Text(t)) = variant_to_value(&Variant::from(dt)) else {
            panic!("not text");
        };
        assert!(t.starts_with("2026-11-26T12:30:05"), "{t}");
        assert_eq!(
            timestamp_of(&dt),
            Some(Timestamp(1_795_696_205_000)),
            "unix milliseconds"
        );
        assert_eq!(timestamp_of(&DateTime::null()), None);
    }

    #[test]
    fn one_dimensional_arrays_become_arrays() {
        let array = Array::new(
            VariantScalarTypeId::Double,
            vec![Variant::Double(1.0), Variant::Double(2.0)],
        )
        .unwrap();
        assert_eq!(
            variant_to_value(&Variant::from(array)),
            Some(Value::Array(
                vec![Value::Float(1.0), Value::Float(2.0)].into()
            ))
        );
        let matrix = Array::new_multi(
            VariantScalarTypeId::Int32,
            vec![Variant::Int32(1); 4],
            vec![2, 2],
        )
        .unwrap();
        assert_eq!(variant_to_value(&Variant::from(matrix)), None);
    }

    #[test]
    fn status_codes_map_onto_quality_with_their_name() {
        assert_eq!(quality_of(StatusCode::Good), Quality::Good);
        let q = quality_of(StatusCode::UncertainLastUsableValue);
        assert_eq!(q.name(), "uncertain");
        assert_eq!(
            q.reason().map(|r| r.to_string()).as_deref(),
            Some("UncertainLastUsableValue")
        );
        let q = quality_of(StatusCode::BadSensorFailure);
        assert_eq!(q.name(), "bad");
        assert_eq!(
            q.reason().map(|r| r.to_string()).as_deref(),
            Some("BadSensorFailure")
        );
    }

    #[test]
    fn bad_status_drops_the_value_and_keeps_the_source_time() {
        let dv = DataValue {
            value: Some(Variant::Double(1.0)),
            status: Some(StatusCode::BadCommunicationError),
            source_timestamp: Some(DateTime::ymd(2026, 1, 1)),
            ..Default::default()
        };
        let s = sample_of(TagId(3), &dv, Timestamp(7));
        assert_eq!(s.value, None);
        assert_eq!(s.quality.name(), "bad");
        assert!(s.source_time.is_some());
        assert_eq!(s.gateway_time, Timestamp(7));
    }

    #[test]
    fn good_status_without_a_usable_value_is_a_decode_error() {
        let dv = DataValue {
            value: Some(Variant::Empty),
            status: None,
            ..Default::default()
        };
        assert_eq!(
            sample_of(TagId(0), &dv, Timestamp(0)).quality,
            Quality::Bad(Reason::Decode)
        );
    }

    fn any_scalar() -> impl Strategy<Value = Variant> {
        prop_oneof![
            any::<bool>().prop_map(Variant::Boolean),
            any::<i8>().prop_map(Variant::SByte),
            any::<u8>().prop_map(Variant::Byte),
            any::<i16>().prop_map(Variant::Int16),
            any::<u16>().prop_map(Variant::UInt16),
            any::<i32>().prop_map(Variant::Int32),
            any::<u32>().prop_map(Variant::UInt32),
            any::<i64>().prop_map(Variant::Int64),
            any::<u64>().prop_map(Variant::UInt64),
            any::<f32>().prop_map(Variant::Float),
            any::<f64>().prop_map(Variant::Double),
            ".*".prop_map(|s: String| Variant::from(s)),
            any::<i64>().prop_map(|t| Variant::from(DateTime::from(t))),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| Variant::ByteString(ByteString::from(b))),
        ]
    }

    proptest! {
        #[test]
        fn any_data_value_converts_without_panicking(
            v in any_scalar(),
            status in any::<u32>(),
            n in 0usize..5,
        ) {
            let value = if n == 0 { v } else {
                match Array::new(VariantScalarTypeId::Int32, vec![Variant::Int32(1); n]) {
                    Ok(a) => Variant::from(a),
                    Err(_) => v,
                }
            };
            let dv = DataValue {
                value: Some(value),
                status: Some(StatusCode::from(status)),
                ..Default::default()
            };
            let s = sample_of(TagId(0), &dv, Timestamp(0));
            prop_assert_eq!(s.value.is_some(), matches!(s.quality, Quality::Good | Quality::Uncertain(_)));
        }
    }
}
