//! What a host asks in a DCMD: the metrics to write, each named by name or by alias, with its
//! value read by its datatype. Pure; the publisher resolves aliases to tag names and hands the
//! writes to the commands task, which checks and performs each like a JSON command.
//!
//! Invariants:
//! - [`device_writes`] never panics: any bytes give the writes or a [`CommandError`].
//! - A metric's value is read by its `datatype`, or, since Sparkplug 3.0 lets a host leave it
//!   out of a DCMD, by the datatype the metric's DBIRTH gave it. Integers may come in either
//!   integer field (encoders differ: Tahu puts a UInt32 in the 64-bit one); a signed type is
//!   read as two's complement of its width, and a value outside the type's range is refused,
//!   never truncated. Floats widen to f64. A value whose field does not fit its datatype, one
//!   without any datatype to read it by, a null or bytes are refused for that metric alone,
//!   with a reason; the others of the same DCMD go on.
//! - A metric with neither a name nor an alias is refused the same way.

use prost::Message;
use protocols::model::Value;

use super::proto::{MetricValue, Payload};

/// The most metrics one DCMD may ask to write; more are refused as a whole (each write is a
/// device round trip, and a command is not a bulk transfer).
pub const MAX_WRITES: usize = 16;

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

/// The writes a DCMD payload asks for, in its order. `birth_datatype` says the datatype a
/// metric was born with, for a metric that carries none.
pub fn device_writes(
    payload: &[u8],
    birth_datatype: impl Fn(&MetricRef) -> Option<u32>,
) -> Result<Vec<MetricWrite>, CommandError> {
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
            let datatype = m
                .datatype
                .or_else(|| metric.as_ref().and_then(&birth_datatype));
            let value = if m.is_null == Some(true) {
                Err("a null value cannot be written".to_owned())
            } else {
                value_of(datatype, m.value)
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
    let Some(dt) = datatype else {
        return Err("the metric has no datatype, and its birth gave none".to_owned());
    };
    let out_of_range = || format!("the value is out of the range of the metric's datatype {dt}");
    // An integer field: its bits, and the same read as signed (a 32-bit field holds a narrower
    // signed value sign extended to 32 bits).
    let int = match &value {
        V::IntValue(v) => Some((u64::from(*v), i64::from(*v as i32))),
        V::LongValue(v) => Some((*v, *v as i64)),
        _ => None,
    };
    let signed = |bits: u32| -> Result<Value, String> {
        let (raw, signed) = int.ok_or_else(|| mismatch(dt))?;
        if bits == 64 {
            return Ok(Value::Int(signed));
        }
        let half = 1i64 << (bits - 1);
        if (-half..half).contains(&signed) {
            Ok(Value::Int(signed))
        } else if raw < (1u64 << bits) {
            // The bare two's complement of the width, not sign extended.
            let shift = 64 - bits;
            Ok(Value::Int(((raw << shift) as i64) >> shift))
        } else {
            Err(out_of_range())
        }
    };
    let unsigned = |bits: u32| -> Result<Value, String> {
        let (raw, _) = int.ok_or_else(|| mismatch(dt))?;
        if bits == 64 || raw < (1u64 << bits) {
            Ok(Value::UInt(raw))
        } else {
            Err(out_of_range())
        }
    };
    match (dt, value) {
        (code::INT8, _) => signed(8),
        (code::INT16, _) => signed(16),
        (code::INT32, _) => signed(32),
        (code::INT64, _) => signed(64),
        (code::UINT8, _) => unsigned(8),
        (code::UINT16, _) => unsigned(16),
        (code::UINT32, _) => unsigned(32),
        (code::UINT64, _) => unsigned(64),
        (code::FLOAT, V::FloatValue(v)) => Ok(Value::Float(f64::from(v))),
        (code::DOUBLE, V::DoubleValue(v)) => Ok(Value::Float(v)),
        // A double for a float metric, or the other way round: the number is the same.
        (code::FLOAT, V::DoubleValue(v)) => Ok(Value::Float(v)),
        (code::DOUBLE, V::FloatValue(v)) => Ok(Value::Float(f64::from(v))),
        (code::BOOLEAN, V::BooleanValue(v)) => Ok(Value::Bool(v)),
        (code::STRING | code::TEXT, V::StringValue(v)) => Ok(Value::Text(v.into())),
        _ => Err(mismatch(dt)),
    }
}

fn mismatch(dt: u32) -> String {
    format!("the value does not fit the metric's datatype {dt}")
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

    /// Births that gave no datatype to anything.
    fn unborn(_: &MetricRef) -> Option<u32> {
        None
    }

    fn read(dt: u32, v: MetricValue) -> Result<Value, String> {
        value_of(Some(dt), Some(v))
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
        let w = device_writes(&p, unborn).unwrap();
        assert_eq!(w[0].metric, Some(MetricRef::Name("setpoint".into())));
        assert_eq!(w[0].value, Ok(Value::Float(21.5)));
        assert_eq!(w[1].metric, Some(MetricRef::Alias(7)));
        assert_eq!(w[1].value, Ok(Value::Bool(true)));
    }

    #[test]
    fn a_metric_without_a_datatype_is_read_by_the_datatype_of_its_birth() {
        // Sparkplug 3.0: a host should leave the datatype out of a DCMD.
        let p = dcmd(vec![
            metric(None, Some(7), None, MetricValue::LongValue((-3i64) as u64)),
            metric(None, Some(8), None, MetricValue::LongValue(3)),
            metric(Some("x"), None, None, MetricValue::IntValue(1)),
        ]);
        let birth = |m: &MetricRef| match m {
            MetricRef::Alias(7) => Some(code::INT64),
            MetricRef::Alias(8) => Some(code::UINT64),
            _ => None,
        };
        let w = device_writes(&p, birth).unwrap();
        assert_eq!(w[0].value, Ok(Value::Int(-3)));
        assert_eq!(w[1].value, Ok(Value::UInt(3)));
        assert!(w[2].value.as_ref().unwrap_err().contains("no datatype"));
    }

    #[test]
    fn signed_integer_types_are_read_as_twos_complement_of_their_width() {
        let minus_two = (-2i32) as u32;
        assert_eq!(
            read(code::INT8, MetricValue::IntValue(minus_two)),
            Ok(Value::Int(-2))
        );
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
            read(code::INT32, MetricValue::LongValue(u64::from(minus_two))),
            Ok(Value::Int(-2)),
            "a 32-bit value in the 64-bit field"
        );
        assert_eq!(
            read(code::INT64, MetricValue::LongValue((-2i64) as u64)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::INT64, MetricValue::IntValue(minus_two)),
            Ok(Value::Int(-2))
        );
        assert_eq!(
            read(code::INT8, MetricValue::IntValue(127)),
            Ok(Value::Int(127))
        );
    }

    #[test]
    fn unsigned_integer_types_take_either_field_within_their_range() {
        let minus_two = (-2i32) as u32;
        assert_eq!(
            read(code::UINT32, MetricValue::IntValue(minus_two)),
            Ok(Value::UInt(u64::from(u32::MAX - 1)))
        );
        assert_eq!(
            read(code::UINT32, MetricValue::LongValue(7)),
            Ok(Value::UInt(7)),
            "Tahu puts a UInt32 in the 64-bit field"
        );
        assert_eq!(
            read(code::UINT64, MetricValue::LongValue(9)),
            Ok(Value::UInt(9))
        );
        assert_eq!(
            read(code::UINT8, MetricValue::IntValue(255)),
            Ok(Value::UInt(255))
        );
    }

    #[test]
    fn an_integer_out_of_its_datatypes_range_is_refused_never_truncated() {
        for (dt, v) in [
            (code::INT8, MetricValue::IntValue(0x1fe)),
            (code::INT16, MetricValue::IntValue(0x1_0000)),
            (code::INT32, MetricValue::LongValue(1 << 40)),
            (code::UINT8, MetricValue::IntValue(300)),
            (code::UINT16, MetricValue::IntValue(70_000)),
            (code::UINT32, MetricValue::LongValue(1 << 32)),
        ] {
            let got = read(dt, v.clone());
            assert!(
                got.as_ref().is_err_and(|e| e.contains("out of the range")),
                "{dt} {v:?}: {got:?}"
            );
        }
    }

    #[test]
    fn floats_texts_and_bools_are_read_by_their_datatype() {
        assert_eq!(
            read(code::FLOAT, MetricValue::FloatValue(1.5)),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            read(code::DOUBLE, MetricValue::FloatValue(1.5)),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            read(code::STRING, MetricValue::StringValue("auto".into())),
            Ok(Value::Text("auto".into()))
        );
        assert_eq!(
            read(code::BOOLEAN, MetricValue::BooleanValue(true)),
            Ok(Value::Bool(true))
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
            metric(
                Some("b"),
                None,
                Some(code::BOOLEAN),
                MetricValue::IntValue(1),
            ),
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
        let w = device_writes(&p, unborn).unwrap();
        assert!(w[0].value.as_ref().unwrap_err().contains("datatype 3"));
        assert!(w[1].value.as_ref().unwrap_err().contains("datatype 11"));
        assert_eq!(w[2].value, Ok(Value::UInt(5)));
        assert!(w[3].value.as_ref().unwrap_err().contains("null"));
        assert_eq!(w[4].metric, None, "neither a name nor an alias");
    }

    #[test]
    fn garbage_or_too_many_metrics_give_no_writes() {
        assert!(matches!(
            device_writes(b"\xff\xff\xff", unborn),
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
            device_writes(&dcmd(many), unborn),
            Err(CommandError::TooMany(n)) if n == MAX_WRITES + 1
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_give_writes_or_an_error_and_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            if let Ok(writes) = device_writes(&bytes, |_| Some(code::INT8)) {
                prop_assert!(writes.len() <= MAX_WRITES);
            }
        }

        #[test]
        fn any_integer_datatype_and_field_reads_without_a_panic_and_within_its_range(
            dt in 1u32..=8, v in any::<u64>(), long in any::<bool>()
        ) {
            let field = if long {
                MetricValue::LongValue(v)
            } else {
                MetricValue::IntValue(v as u32)
            };
            if let Ok(value) = read(dt, field) {
                let bits = [8u32, 16, 32, 64][((dt - 1) % 4) as usize];
                match value {
                    Value::Int(i) if bits < 64 => {
                        prop_assert!((-(1i64 << (bits - 1))..(1i64 << (bits - 1))).contains(&i));
                    }
                    Value::UInt(u) if bits < 64 => prop_assert!(u < (1u64 << bits)),
                    _ => {}
                }
            }
        }

        #[test]
        fn any_int32_round_trips_through_its_twos_complement_field(v in any::<i32>()) {
            prop_assert_eq!(
                read(code::INT32, MetricValue::IntValue(v as u32)),
                Ok(Value::Int(i64::from(v)))
            );
        }
    }
}
