//! What a host asks in a DCMD: the metrics to write, each named by name or by alias, with its
//! value read by its datatype. Pure; the publisher resolves aliases to tag names and hands the
//! writes to the commands task, which checks and performs each like a JSON command.
//!
//! Invariants:
//! - [`device_writes`] never panics: any bytes give the writes or a [`CommandError`].
//! - A metric's value is read only by its own `datatype`: signed integer types are sign
//!   extended from the 32- or 64-bit field, unsigned ones are not, floats widen to f64. A value
//!   whose field does not fit its datatype, an integer without a datatype (its sign would be a
//!   guess), a null or an array is refused for that metric alone, with a reason; the others
//!   of the same DCMD go on.
//! - A metric with neither a name nor an alias is refused the same way.

use prost::Message;
use protocols::model::Value;

use super::proto::{MetricValue, Payload};

/// The most metrics one DCMD may ask to write; more are refused as a whole (each write is a
/// device round trip, and a command is not a bulk transfer).
pub const MAX_WRITES: usize = 64;

/// How a DCMD names a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricRef {
    /// By its name (the tag's name).
    Name(String),
    /// By the alias its DBIRTH gave it.
    Alias(u64),
}

/// One metric of a DCMD.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricWrite {
    /// Which metric; `None` when the metric named none.
    pub metric: Option<MetricRef>,
    /// The value to write, or why it cannot be read.
    pub value: Result<Value, String>,
}

/// Why a DCMD payload gives no writes.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not a Sparkplug payload.
    #[error("not a Sparkplug B payload: {0}")]
    Decode(#[source] prost::DecodeError),
    /// More metrics than [`MAX_WRITES`].
    #[error("{0} metrics in one DCMD; at most {MAX_WRITES} are written at once")]
    TooMany(usize),
}

/// Sparkplug `DataType` codes a command's value may carry.
mod code {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const TEXT: u32 = 14;
}

/// The writes a DCMD payload asks for, in its order.
pub fn device_writes(payload: &[u8]) -> Result<Vec<MetricWrite>, CommandError> {
    let p = Payload::decode(payload).map_err(CommandError::Decode)?;
    if p.metrics.len() > MAX_WRITES {
        return Err(CommandError::TooMany(p.metrics.len()));
    }
    Ok(p.metrics
        .into_iter()
        .map(|m| {
            let metric = match (m.name, m.alias) {
                (Some(name), _) if !name.is_empty() => Some(MetricRef::Name(name)),
                (_, Some(alias)) => Some(MetricRef::Alias(alias)),
                _ => None,
            };
            let value = if m.is_null == Some(true) {
                Err("a null value cannot be written".to_owned())
            } else {
                value_of(m.datatype, m.value)
            };
            MetricWrite { metric, value }
        })
        .collect())
}

/// A metric's value by its datatype.
fn value_of(datatype: Option<u32>, value: Option<MetricValue>) -> Result<Value, String> {
    use MetricValue as V;
    let Some(value) = value else {
        return Err("the metric carries no value".to_owned());
    };
    let mismatch = |dt: u32| format!("the value does not fit the metric's datatype {dt}");
    match (datatype, value) {
        (Some(code::INT8), V::IntValue(v)) => Ok(Value::Int(i64::from(v as i32 as i8))),
        (Some(code::INT16), V::IntValue(v)) => Ok(Value::Int(i64::from(v as i32 as i16))),
        (Some(code::INT32), V::IntValue(v)) => Ok(Value::Int(i64::from(v as i32))),
        (Some(code::INT64), V::LongValue(v)) => Ok(Value::Int(v as i64)),
        (Some(code::UINT8 | code::UINT16 | code::UINT32), V::IntValue(v)) => {
            Ok(Value::UInt(u64::from(v)))
        }
        (Some(code::UINT64), V::LongValue(v)) => Ok(Value::UInt(v)),
        (Some(code::FLOAT) | None, V::FloatValue(v)) => Ok(Value::Float(f64::from(v))),
        (Some(code::DOUBLE) | None, V::DoubleValue(v)) => Ok(Value::Float(v)),
        (Some(code::BOOLEAN) | None, V::BooleanValue(v)) => Ok(Value::Bool(v)),
        (Some(code::STRING | code::TEXT) | None, V::StringValue(v)) => Ok(Value::Text(v.into())),
        (None, V::IntValue(_) | V::LongValue(_)) => {
            Err("an integer value without a datatype (signed or not?)".to_owned())
        }
        (None, V::BytesValue(_)) => Err("bytes cannot be written".to_owned()),
        (Some(dt), _) => Err(mismatch(dt)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::Metric;
    use super::*;
    use proptest::prelude::*;

    fn metric(name: Option<&str>, alias: Option<u64>, dt: Option<u32>, v: MetricValue) -> Metric {
        Metric {
            name: name.map(Into::into),
            alias,
            datatype: dt,
            value: Some(v),
            ..Default::default()
        }
    }

    fn dcmd(metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(1),
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_dcmd_names_metrics_by_name_or_by_alias_and_keeps_their_order() {
        let p = dcmd(vec![
            metric(
                Some("setpoint"),
                None,
                Some(code::DOUBLE),
                MetricValue::DoubleValue(21.5),
            ),
            metric(
                None,
                Some(7),
                Some(code::BOOLEAN),
                MetricValue::BooleanValue(true),
            ),
        ]);
        let w = device_writes(&p).unwrap();
        assert_eq!(w[0].metric, Some(MetricRef::Name("setpoint".into())));
        assert_eq!(w[0].value, Ok(Value::Float(21.5)));
        assert_eq!(w[1].metric, Some(MetricRef::Alias(7)));
        assert_eq!(w[1].value, Ok(Value::Bool(true)));
    }

    #[test]
    fn signed_integer_types_are_sign_extended_and_unsigned_ones_are_not() {
        let read = |dt, v| value_of(Some(dt), Some(v));
        let minus_two = (-2i32) as u32;
        assert_eq!(
            read(code::INT8, MetricValue::IntValue(0xfe)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::INT16, MetricValue::IntValue(0xfffe)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::INT32, MetricValue::IntValue(minus_two)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::INT64, MetricValue::LongValue((-2i64) as u64)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::UINT32, MetricValue::IntValue(minus_two)),
            Ok(Value::UInt(u64::from(u32::MAX - 1)))
        );
        assert_eq!(
            read(code::UINT64, MetricValue::LongValue(9)),
            Ok(Value::UInt(9))
        );
        assert_eq!(
            read(code::FLOAT, MetricValue::FloatValue(1.5)),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            read(code::STRING, MetricValue::StringValue("auto".into())),
            Ok(Value::Text("auto".into()))
        );
    }

    #[test]
    fn a_value_that_does_not_fit_its_datatype_is_refused_for_that_metric_alone() {
        let p = dcmd(vec![
            metric(
                Some("a"),
                None,
                Some(code::INT32),
                MetricValue::DoubleValue(1.0),
            ),
            metric(Some("b"), None, None, MetricValue::IntValue(5)),
            metric(
                Some("c"),
                None,
                Some(code::UINT16),
                MetricValue::IntValue(5),
            ),
            Metric {
                name: Some("d".into()),
                is_null: Some(true),
                datatype: Some(code::INT32),
                ..Default::default()
            },
            metric(
                None,
                None,
                Some(code::BOOLEAN),
                MetricValue::BooleanValue(false),
            ),
        ]);
        let w = device_writes(&p).unwrap();
        assert!(w[0].value.as_ref().unwrap_err().contains("datatype 3"));
        assert!(w[1]
            .value
            .as_ref()
            .unwrap_err()
            .contains("without a datatype"));
        assert_eq!(w[2].value, Ok(Value::UInt(5)));
        assert!(w[3].value.as_ref().unwrap_err().contains("null"));
        assert_eq!(w[4].metric, None, "neither a name nor an alias");
    }

    #[test]
    fn garbage_or_too_many_metrics_give_no_writes() {
        assert!(matches!(
            device_writes(b"\xff\xff\xff"),
            Err(CommandError::Decode(_))
        ));
        let many = (0..=MAX_WRITES)
            .map(|i| {
                metric(
                    None,
                    Some(i as u64),
                    Some(code::BOOLEAN),
                    MetricValue::BooleanValue(true),
                )
            })
            .collect();
        assert!(matches!(
            device_writes(&dcmd(many)),
            Err(CommandError::TooMany(n)) if n == MAX_WRITES + 1
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_give_writes_or_an_error_and_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            if let Ok(writes) = device_writes(&bytes) {
                prop_assert!(writes.len() <= MAX_WRITES);
            }
        }

        #[test]
        fn any_int32_round_trips_through_its_twos_complement_field(v in any::<i32>()) {
            prop_assert_eq!(
                value_of(Some(code::INT32), Some(MetricValue::IntValue(v as u32))),
                Ok(Value::Int(i64::from(v)))
            );
        }
    }
}
