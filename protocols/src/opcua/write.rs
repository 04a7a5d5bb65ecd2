//! Writes to OPC UA nodes: a tag value becomes the variant of the node's data type, written
//! with the Write service and read back.
//!
//! Invariants:
//! - The conversion of reads ([`super::convert::variant_to_value`]) inverted: a bool is written
//!   as Boolean, a number as the node's numeric type, text as String, as an RFC 3339 DateTime
//!   or as a base64 ByteString; what a write stores reads back as the value written (up to a
//!   Float's precision).
//! - The node decides the type: its DataType attribute when that is a built-in type, else the
//!   built-in type of its current value (abstract types such as Number, enumerations and
//!   subtypes such as Duration are encoded as their base type). A value is never sent as
//!   another type than that, so the server never has to coerce it.
//! - Nothing is wrapped or cut: a number outside the type's range, a fraction for an integer
//!   type, a non-finite number or a value of another kind is refused before anything is sent.
//!   Array nodes and types without a mapping are refused too.
//! - A request is performed only between two reads of the driver (it runs in the driver's
//!   control loop), and a bad status of the Write service's result is reported by its name.

use std::sync::atomic::Ordering;

use base64::Engine as _;
use opcua::client::Session;
use opcua::types::{
    AttributeId, ByteString, DataValue, DateTime, NodeId, ReadValueId, StatusCode,
    TimestampsToReturn, UAString, Variant, VariantScalarTypeId, WriteValue,
};

use super::convert::variant_to_value;
use crate::driver::{DeviceStatus, ErrorKind, WriteDone, WriteError, WriteRequest};
use crate::model::{Reason, Value};

/// Why a value cannot be written to a node.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum WriteRefusal {
    /// The value's kind does not fit the node's type.
    #[error("a {got} value cannot be written to a node of type {data_type}")]
    Kind {
        /// What was given: `bool`, `number`, `text` or `array`.
        got: &'static str,
        /// The node's type.
        data_type: VariantScalarTypeId,
    },
    /// Infinity or NaN.
    #[error("{0} is not a finite number")]
    NotFinite(f64),
    /// The number does not fit the node's type.
    #[error("{value} is outside the range of type {data_type}")]
    OutOfRange {
        /// The number given.
        value: String,
        /// The node's type.
        data_type: VariantScalarTypeId,
    },
    /// A fraction for an integer type.
    #[error("{value} is not a whole number, as type {data_type} needs")]
    Fraction {
        /// The number given.
        value: f64,
        /// The node's type.
        data_type: VariantScalarTypeId,
    },
    /// Text that is no DateTime or ByteString in the form reads give.
    #[error("{0}")]
    Text(String),
}

/// Why a node cannot be written by a command at all, whatever the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum NodeUnsupported {
    /// The node holds an array (or its ValueRank says it does).
    #[error("the node holds an array; commands write scalar values only")]
    Array,
    /// A data type without a mapping from tag values.
    #[error("the node's data type {0} has no mapping from a command's value")]
    Type(String),
}

/// A service call that failed as a whole.
#[derive(Debug, thiserror::Error)]
#[error("the {service} call failed ({status})")]
pub(crate) struct CallFailed {
    service: &'static str,
    status: String,
}

/// The built-in types a command can write.
fn writable_type(t: VariantScalarTypeId) -> bool {
    use VariantScalarTypeId as T;
    matches!(
        t,
        T::Boolean
            | T::SByte
            | T::Byte
            | T::Int16
            | T::UInt16
            | T::Int32
            | T::UInt32
            | T::Int64
            | T::UInt64
            | T::Float
            | T::Double
            | T::String
            | T::DateTime
            | T::ByteString
    )
}

/// The type a write to a node must carry: its DataType when that is a built-in type, else the
/// type of its current value.
pub(crate) fn target_type(
    data_type: Option<&NodeId>,
    value_rank: Option<i32>,
    current: Option<&Variant>,
) -> Result<VariantScalarTypeId, NodeUnsupported> {
    let current = match current {
        Some(Variant::Variant(inner)) => Some(&**inner),
        other => other,
    };
    if matches!(current, Some(Variant::Array(_))) || value_rank.is_some_and(|r| r >= 0) {
        return Err(NodeUnsupported::Array);
    }
    let builtin = data_type
        .filter(|id| id.namespace == 0)
        .and_then(NodeId::as_u32)
        .and_then(|n| VariantScalarTypeId::try_from(n).ok())
        .filter(|t| writable_type(*t));
    if let Some(t) = builtin {
        return Ok(t);
    }
    match current.map(Variant::type_id) {
        Some(opcua::types::VariantTypeId::Scalar(t)) if writable_type(t) => Ok(t),
        _ => Err(NodeUnsupported::Type(
            data_type.map_or_else(|| "unknown".to_owned(), ToString::to_string),
        )),
    }
}

/// The kind of a value, for refusals.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => "number",
        Value::Text(_) => "text",
        Value::Array(_) => "array",
    }
}

/// The whole number a value stands for, for an integer type.
fn whole(value: &Value, data_type: VariantScalarTypeId) -> Result<i128, WriteRefusal> {
    match *value {
        Value::Int(i) => Ok(i128::from(i)),
        Value::UInt(u) => Ok(i128::from(u)),
        Value::Float(f) if !f.is_finite() => Err(WriteRefusal::NotFinite(f)),
        Value::Float(f) if f.fract() != 0.0 => Err(WriteRefusal::Fraction {
            value: f,
            data_type,
        }),
        // Every integer type's range lies well inside ±1e30, and so does `as`'s exact range.
        Value::Float(f) if f.abs() < 1e30 => Ok(f as i128),
        Value::Float(f) => Err(WriteRefusal::OutOfRange {
            value: f.to_string(),
            data_type,
        }),
        _ => Err(WriteRefusal::Kind {
            got: kind(value),
            data_type,
        }),
    }
}

/// The number a value stands for, for a float type.
fn number(value: &Value, data_type: VariantScalarTypeId) -> Result<f64, WriteRefusal> {
    let x = match *value {
        Value::Int(i) => i as f64,
        Value::UInt(u) => u as f64,
        Value::Float(f) => f,
        _ => {
            return Err(WriteRefusal::Kind {
                got: kind(value),
                data_type,
            })
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(WriteRefusal::NotFinite(x))
    }
}

/// The variant that stores `value` in a node of type `data_type`.
pub(crate) fn to_variant(
    value: &Value,
    data_type: VariantScalarTypeId,
) -> Result<Variant, WriteRefusal> {
    use VariantScalarTypeId as T;
    let refuse_kind = || WriteRefusal::Kind {
        got: kind(value),
        data_type,
    };
    let int = |value: &Value, min: i128, max: i128| -> Result<i128, WriteRefusal> {
        let n = whole(value, data_type)?;
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(WriteRefusal::OutOfRange {
                value: n.to_string(),
                data_type,
            })
        }
    };
    // The range checks make every narrowing below exact.
    Ok(match data_type {
        T::Boolean => match value {
            Value::Bool(b) => Variant::Boolean(*b),
            _ => return Err(refuse_kind()),
        },
        T::SByte => Variant::SByte(int(value, i8::MIN.into(), i8::MAX.into())? as i8),
        T::Byte => Variant::Byte(int(value, 0, u8::MAX.into())? as u8),
        T::Int16 => Variant::Int16(int(value, i16::MIN.into(), i16::MAX.into())? as i16),
        T::UInt16 => Variant::UInt16(int(value, 0, u16::MAX.into())? as u16),
        T::Int32 => Variant::Int32(int(value, i32::MIN.into(), i32::MAX.into())? as i32),
        T::UInt32 => Variant::UInt32(int(value, 0, u32::MAX.into())? as u32),
        T::Int64 => Variant::Int64(int(value, i64::MIN.into(), i64::MAX.into())? as i64),
        T::UInt64 => Variant::UInt64(int(value, 0, u64::MAX.into())? as u64),
        T::Float => {
            let x = number(value, data_type)?;
            if x.abs() > f64::from(f32::MAX) {
                return Err(WriteRefusal::OutOfRange {
                    value: x.to_string(),
                    data_type,
                });
            }
            Variant::Float(x as f32)
        }
        T::Double => Variant::Double(number(value, data_type)?),
        T::String => match value {
            Value::Text(t) => Variant::String(UAString::from(&**t)),
            _ => return Err(refuse_kind()),
        },
        T::DateTime => match value {
            Value::Text(t) => match DateTime::parse_from_rfc3339(t) {
                Ok(dt) => Variant::DateTime(Box::new(dt)),
                Err(e) => {
                    return Err(WriteRefusal::Text(format!(
                        "{t:?} is no RFC 3339 date and time ({e}), as type DateTime needs"
                    )))
                }
            },
            _ => return Err(refuse_kind()),
        },
        T::ByteString => match value {
            Value::Text(t) => match base64::engine::general_purpose::STANDARD.decode(&**t) {
                Ok(bytes) => Variant::ByteString(ByteString::from(bytes)),
                Err(e) => {
                    return Err(WriteRefusal::Text(format!(
                        "the text is no base64 ({e}), as type ByteString needs"
                    )))
                }
            },
            _ => return Err(refuse_kind()),
        },
        _ => return Err(refuse_kind()),
    })
}

/// The attributes read before a write: what the node holds now and what type it takes.
const BEFORE: [AttributeId; 3] = [
    AttributeId::Value,
    AttributeId::DataType,
    AttributeId::ValueRank,
];

/// A status code by its name, as replies and samples show it.
fn status_name(status: StatusCode) -> String {
    Reason::Status(status.bits()).to_string()
}

/// What a failed service call counts as.
fn error_kind(status: StatusCode, status_of: &DeviceStatus) -> ErrorKind {
    if !status_of.is_connected() {
        ErrorKind::Link
    } else if matches!(
        status,
        StatusCode::BadTimeout | StatusCode::BadRequestTimeout
    ) {
        ErrorKind::Timeout
    } else {
        ErrorKind::Exception
    }
}

/// The value of a data value the way a read would give it; None when bad or unmappable.
fn value_of(dv: &DataValue) -> Option<Value> {
    if dv.status.is_some_and(|s| s.is_bad()) {
        return None;
    }
    dv.value.as_ref().and_then(variant_to_value)
}

/// Reads `node`'s attributes `attributes`, counting the call.
async fn read_attributes(
    session: &Session,
    node: &NodeId,
    attributes: &[AttributeId],
    status: &DeviceStatus,
) -> Result<Vec<DataValue>, StatusCode> {
    let reads: Vec<ReadValueId> = attributes
        .iter()
        .map(|&a| ReadValueId {
            node_id: node.clone(),
            attribute_id: a as u32,
            ..Default::default()
        })
        .collect();
    status.requests.fetch_add(1, Ordering::Relaxed);
    // Max age 0: the server reads the device now, not a cached value.
    match session.read(&reads, TimestampsToReturn::Neither, 0.0).await {
        Ok(values) if values.len() == reads.len() => Ok(values),
        Ok(_) => {
            status.count_error(ErrorKind::Protocol);
            Err(StatusCode::BadUnexpectedError)
        }
        Err(e) => {
            status.count_error(error_kind(e.status(), status));
            Err(e.status())
        }
    }
}

/// Writes `value` to `node` and reads it back: the node's type decides the variant.
pub(crate) async fn write_node(
    session: &Session,
    node: &NodeId,
    value: &Value,
    status: &DeviceStatus,
) -> Result<WriteDone, WriteError> {
    let failed = |service, code: StatusCode| {
        WriteError::Failed(Box::new(CallFailed {
            service,
            status: status_name(code),
        }))
    };
    let before = read_attributes(session, node, &BEFORE, status)
        .await
        .map_err(|code| failed("Read", code))?;
    let [current, data_type, rank] = [&before[0], &before[1], &before[2]];
    // A node the server does not know, or cannot read, says so in every attribute.
    if let Some(bad) = data_type.status.filter(|s| s.is_bad()) {
        return Err(WriteError::Status(status_name(bad)));
    }
    let data_type_id = match data_type.value.as_ref() {
        Some(Variant::NodeId(id)) => Some(&**id),
        _ => None,
    };
    let value_rank = match rank.value.as_ref() {
        Some(Variant::Int32(r)) => Some(*r),
        _ => None,
    };
    let current_value = current
        .value
        .as_ref()
        .filter(|_| !current.status.is_some_and(|s| s.is_bad()));
    let target = target_type(data_type_id, value_rank, current_value)
        .map_err(|e| WriteError::Unsupported(e.to_string()))?;
    let variant = to_variant(value, target).map_err(|e| WriteError::Refused(e.to_string()))?;
    let previous = value_of(current);

    let write = WriteValue {
        node_id: node.clone(),
        attribute_id: AttributeId::Value as u32,
        index_range: Default::default(),
        // The value alone: many servers refuse a write that sets timestamps or a status.
        value: DataValue {
            value: Some(variant),
            ..Default::default()
        },
    };
    status.requests.fetch_add(1, Ordering::Relaxed);
    let results = match session.write(&[write]).await {
        Ok(results) => results,
        Err(e) => {
            status.count_error(error_kind(e.status(), status));
            return Err(failed("Write", e.status()));
        }
    };
    match results.first() {
        Some(code) if code.is_bad() => {
            status.count_error(ErrorKind::Exception);
            return Err(WriteError::Status(status_name(*code)));
        }
        Some(_) => {}
        None => {
            status.count_error(ErrorKind::Protocol);
            return Err(failed("Write", StatusCode::BadUnexpectedError));
        }
    }
    // The write is done whatever the read back gives.
    let read_back = read_attributes(session, node, &[AttributeId::Value], status)
        .await
        .ok()
        .and_then(|values| values.first().and_then(value_of));
    Ok(WriteDone {
        previous,
        read_back,
    })
}

/// Performs one write request of the driver's inbox on a session and answers it. `nodes`
/// holds each tag's node as resolved for this session.
pub(crate) async fn answer(
    session: &Session,
    nodes: &[Result<NodeId, StatusCode>],
    status: &DeviceStatus,
    request: WriteRequest,
) {
    if request.abandoned() {
        return;
    }
    let WriteRequest {
        device,
        tag,
        value,
        reply,
    } = request;
    let outcome = match nodes.get(tag.0 as usize) {
        None => Err(WriteError::UnknownTag),
        Some(Err(code)) => Err(WriteError::Refused(format!(
            "the tag's node is not known in this session ({})",
            status_name(*code)
        ))),
        Some(Ok(_)) if !status.is_connected() => Err(WriteError::NotConnected),
        Some(Ok(node)) => write_node(session, node, &value, status).await,
    };
    if let Err(outcome) = reply.send(outcome) {
        // The commands task gave up waiting: the real outcome is audited here.
        tracing::warn!(target: "audit", device = device.0, tag = tag.0, outcome = ?outcome, "a write finished after its command was answered as failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::{DataTypeId, VariantScalarTypeId as T};
    use proptest::prelude::*;

    fn double() -> NodeId {
        DataTypeId::Double.into()
    }

    #[test]
    fn the_node_s_builtin_data_type_decides_the_variant() {
        let t = target_type(Some(&DataTypeId::Int16.into()), Some(-1), None).unwrap();
        assert_eq!(t, T::Int16);
        assert_eq!(to_variant(&Value::UInt(21), t), Ok(Variant::Int16(21)));
        assert_eq!(to_variant(&Value::Float(-3.0), t), Ok(Variant::Int16(-3)));
        let t = target_type(Some(&double()), None, Some(&Variant::Double(1.0))).unwrap();
        assert_eq!(to_variant(&Value::Int(-2), t), Ok(Variant::Double(-2.0)));
        assert_eq!(
            to_variant(&Value::Bool(true), T::Boolean),
            Ok(Variant::Boolean(true))
        );
        assert_eq!(
            to_variant(&Value::Text("on".into()), T::String),
            Ok(Variant::from("on"))
        );
    }

    #[test]
    fn an_abstract_or_derived_data_type_takes_the_current_value_s_type() {
        // Number (i=26) holding an Int32; Duration (i=290) holding a Double; an enumeration
        // of another namespace holding its Int32.
        let number: NodeId = DataTypeId::Number.into();
        assert_eq!(
            target_type(Some(&number), Some(-1), Some(&Variant::Int32(4))),
            Ok(T::Int32)
        );
        let duration: NodeId = DataTypeId::Duration.into();
        assert_eq!(
            target_type(Some(&duration), None, Some(&Variant::Double(250.0))),
            Ok(T::Double)
        );
        let custom = NodeId::new(3, 3007u32);
        assert_eq!(
            target_type(Some(&custom), None, Some(&Variant::Int32(1))),
            Ok(T::Int32)
        );
        assert!(matches!(
            target_type(Some(&custom), None, None),
            Err(NodeUnsupported::Type(_))
        ));
    }

    #[test]
    fn arrays_and_unmapped_types_are_not_written() {
        let array = Variant::from(vec![1.0f64, 2.0]);
        assert_eq!(
            target_type(Some(&double()), Some(1), None),
            Err(NodeUnsupported::Array)
        );
        assert_eq!(
            target_type(Some(&double()), None, Some(&array)),
            Err(NodeUnsupported::Array)
        );
        let guid: NodeId = DataTypeId::Guid.into();
        assert!(target_type(Some(&guid), None, None).is_err());
    }

    #[test]
    fn nothing_is_wrapped_cut_or_coerced() {
        assert!(matches!(
            to_variant(&Value::UInt(256), T::Byte),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        assert!(matches!(
            to_variant(&Value::Int(-1), T::UInt32),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        assert!(matches!(
            to_variant(&Value::Float(21.5), T::Int32),
            Err(WriteRefusal::Fraction { .. })
        ));
        assert!(matches!(
            to_variant(&Value::Float(f64::NAN), T::Double),
            Err(WriteRefusal::NotFinite(_))
        ));
        assert!(matches!(
            to_variant(&Value::Float(1e39), T::Float),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        assert!(matches!(
            to_variant(&Value::Bool(true), T::Double),
            Err(WriteRefusal::Kind { got: "bool", .. })
        ));
        assert!(matches!(
            to_variant(&Value::UInt(1), T::Boolean),
            Err(WriteRefusal::Kind { got: "number", .. })
        ));
        assert!(matches!(
            to_variant(&Value::Text("x".into()), T::DateTime),
            Err(WriteRefusal::Text(_))
        ));
        assert_eq!(
            to_variant(&Value::Float(1e30), T::Int64)
                .unwrap_err()
                .to_string(),
            "1000000000000000000000000000000 is outside the range of type Int64"
        );
    }

    #[test]
    fn text_in_the_form_reads_give_is_written_back_as_date_times_and_byte_strings() {
        let dt = DateTime::ymd_hms(2026, 11, 26, 12, 30, 5);
        let text = variant_to_value(&Variant::from(dt)).unwrap();
        assert_eq!(
            to_variant(&text, T::DateTime),
            Ok(Variant::DateTime(Box::new(dt)))
        );
        let bytes = Variant::ByteString(ByteString::from(vec![0u8, 1, 255]));
        let text = variant_to_value(&bytes).unwrap();
        assert_eq!(to_variant(&text, T::ByteString), Ok(bytes));
    }

    fn integer_type() -> impl Strategy<Value = VariantScalarTypeId> {
        prop_oneof![
            Just(T::SByte),
            Just(T::Byte),
            Just(T::Int16),
            Just(T::UInt16),
            Just(T::Int32),
            Just(T::UInt32),
            Just(T::Int64),
            Just(T::UInt64),
        ]
    }

    proptest! {
        #[test]
        fn a_number_written_reads_back_as_itself_or_is_refused(
            t in integer_type(),
            n in any::<i64>(),
            u in any::<u64>(),
            pick in any::<bool>(),
        ) {
            let value = if pick { Value::Int(n) } else { Value::UInt(u) };
            match to_variant(&value, t) {
                Ok(variant) => {
                    let back = variant_to_value(&variant).and_then(|v| v.as_f64());
                    prop_assert_eq!(back, value.as_f64());
                    let exact = match (variant_to_value(&variant), &value) {
                        (Some(Value::Int(a)), Value::Int(b)) => a == *b,
                        (Some(Value::UInt(a)), Value::UInt(b)) => a == *b,
                        (Some(Value::Int(a)), Value::UInt(b)) => i128::from(a) == i128::from(*b),
                        (Some(Value::UInt(a)), Value::Int(b)) => i128::from(a) == i128::from(*b),
                        _ => false,
                    };
                    prop_assert!(exact, "{:?} -> {:?}", value, variant);
                }
                Err(e) => prop_assert!(matches!(e, WriteRefusal::OutOfRange { .. }), "{e}"),
            }
        }

        #[test]
        fn any_float_converts_without_panicking(f in any::<f64>(), t in integer_type()) {
            let _ = to_variant(&Value::Float(f), t);
            let _ = to_variant(&Value::Float(f), T::Float);
        }
    }
}
