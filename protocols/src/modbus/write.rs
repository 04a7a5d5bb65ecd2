//! Write planning: a typed value for a tag becomes the one Modbus request that stores it.
//!
//! Invariants:
//! - The codec of reads, inverted: raw = (value - offset) / scale, then the tag's type and word
//!   order ([`codec::encode_registers`]), so a value written is the value read back (up to the
//!   type's precision).
//! - Nothing is wrapped or cut: a value outside the type's range after the inverse scaling, a
//!   fraction for an integer type (beyond float noise), a non-finite number, text too long for
//!   the tag or a value of another kind than the tag's is refused, never stored changed.
//! - Only coils and holding registers are written; a bit of a holding register is written by a
//!   mask write (function 22), which leaves the register's other bits as they are.
//! - A coil is function 5, a one-register value function 6, a wider value function 16 (at
//!   most 123 registers, what one request carries; a wider tag is refused).

use super::frame::MAX_WRITE_REGISTERS;
use super::{codec, Area, DataType, TagSpec};
use crate::model::Value;

/// The request that stores a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritePlan {
    /// Function 5, write single coil, at the tag's address.
    Coil(bool),
    /// Function 6, write single register.
    Register(u16),
    /// Function 16, write multiple registers, from the tag's address.
    Registers(Vec<u16>),
    /// Function 22, mask write register: the register becomes
    /// `(current & and_mask) | (or_mask & !and_mask)`.
    Mask {
        /// Bits kept.
        and_mask: u16,
        /// Bits set among those not kept.
        or_mask: u16,
    },
}

impl WritePlan {
    /// The Modbus function code of the request.
    pub fn function(&self) -> u8 {
        match self {
            WritePlan::Coil(_) => 5,
            WritePlan::Register(_) => 6,
            WritePlan::Registers(_) => 16,
            WritePlan::Mask { .. } => 22,
        }
    }
}

/// Why a value cannot be written to a tag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteRefusal {
    /// Input registers and discrete inputs cannot be written.
    #[error("{0}: is read-only in Modbus (only co and hr can be written)")]
    ReadOnly(Area),
    /// The value's kind does not fit the tag's type.
    #[error("a {got} value cannot be written to a tag of type {data_type}")]
    Kind {
        /// What was given: `bool`, `number`, `text` or `array`.
        got: &'static str,
        /// The tag's type.
        data_type: DataType,
    },
    /// Infinity or NaN.
    #[error("{0} is not a finite number")]
    NotFinite(f64),
    /// The raw value (after the inverse scaling) does not fit the type.
    #[error("{raw} is outside the range of type {data_type}")]
    OutOfRange {
        /// The raw value that would be stored.
        raw: f64,
        /// The tag's type.
        data_type: DataType,
    },
    /// A fraction for an integer register (after the inverse scaling).
    #[error("{raw} is not a whole number, as type {data_type} needs")]
    Fraction {
        /// The raw value that would be stored.
        raw: f64,
        /// The tag's type.
        data_type: DataType,
    },
    /// More registers than one write request carries (a string tag of 247 to 250 bytes).
    #[error("the tag spans {0} registers; one write carries at most {MAX_WRITE_REGISTERS}")]
    TooWide(usize),
    /// Text longer than the tag.
    #[error("the text has {len} bytes, the tag holds {max}")]
    TooLong {
        /// Bytes given.
        len: usize,
        /// The tag's length.
        max: u16,
    },
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

/// Tolerance on a whole number after the inverse scaling (`21.7 / 0.1` is `216.99999999999997`).
const WHOLE_EPSILON: f64 = 1e-6;

/// The request that stores `value` in `spec`'s tag.
pub fn plan(spec: &TagSpec, value: &Value) -> Result<WritePlan, WriteRefusal> {
    let area = spec.address.area;
    if matches!(area, Area::InputRegister | Area::DiscreteInput) {
        return Err(WriteRefusal::ReadOnly(area));
    }
    let refuse_kind = || WriteRefusal::Kind {
        got: kind(value),
        data_type: spec.data_type,
    };
    if spec.data_type == DataType::Bool {
        let Value::Bool(on) = *value else {
            return Err(refuse_kind());
        };
        return Ok(match (area, spec.bit) {
            (Area::Coil, _) => WritePlan::Coil(on),
            (_, Some(bit)) => {
                let mask = 1u16 << (bit & 15);
                WritePlan::Mask {
                    and_mask: !mask,
                    or_mask: if on { mask } else { 0 },
                }
            }
            (_, None) => WritePlan::Register(u16::from(on)),
        });
    }
    let raw = match (spec.data_type, value) {
        (DataType::String, Value::Text(text)) => {
            if text.len() > usize::from(spec.length) {
                return Err(WriteRefusal::TooLong {
                    len: text.len(),
                    max: spec.length,
                });
            }
            value.clone()
        }
        (DataType::String, _) => return Err(refuse_kind()),
        (_, Value::Int(_) | Value::UInt(_) | Value::Float(_)) => raw_number(spec, value)?,
        _ => return Err(refuse_kind()),
    };
    let regs = codec::encode_registers(spec.data_type, spec.order, spec.length, &raw);
    if regs.len() > MAX_WRITE_REGISTERS {
        return Err(WriteRefusal::TooWide(regs.len()));
    }
    Ok(match regs.as_slice() {
        [one] => WritePlan::Register(*one),
        _ => WritePlan::Registers(regs),
    })
}

/// The raw number to store: `(value - offset) / scale`, checked against the type.
fn raw_number(spec: &TagSpec, value: &Value) -> Result<Value, WriteRefusal> {
    let t = spec.data_type;
    let unscaled = spec.scale == 1.0 && spec.offset == 0.0;
    // Integers pass exactly when there is no scaling (a u64 does not fit an f64).
    if unscaled {
        match *value {
            Value::Int(i) => return int_in_range(t, i128::from(i), i as f64),
            Value::UInt(u) => return int_in_range(t, i128::from(u), u as f64),
            _ => {}
        }
    }
    let v = value.as_f64().unwrap_or(f64::NAN);
    if !v.is_finite() {
        return Err(WriteRefusal::NotFinite(v));
    }
    let raw = if unscaled {
        v
    } else {
        (v - spec.offset) / spec.scale
    };
    if !raw.is_finite() {
        return Err(WriteRefusal::OutOfRange { raw, data_type: t });
    }
    match t {
        DataType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(WriteRefusal::OutOfRange { raw, data_type: t });
            }
            Ok(Value::Float(raw))
        }
        DataType::F64 => Ok(Value::Float(raw)),
        _ => {
            let whole = raw.round();
            // Absolute, so a large raw value cannot hide a fraction; the relative term only
            // covers the rounding of the division itself.
            let tolerance = WHOLE_EPSILON.max(raw.abs() * 4.0 * f64::EPSILON);
            if (raw - whole).abs() > tolerance {
                return Err(WriteRefusal::Fraction { raw, data_type: t });
            }
            // Beyond ±2^127 the cast saturates, which the range check then refuses.
            int_in_range(t, whole as i128, raw)
        }
    }
}

/// `int` as a value of type `t`, if it fits.
fn int_in_range(t: DataType, int: i128, raw: f64) -> Result<Value, WriteRefusal> {
    let (min, max): (i128, i128) = match t {
        DataType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DataType::U16 => (0, u16::MAX.into()),
        DataType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DataType::U32 => (0, u32::MAX.into()),
        DataType::I64 => (i64::MIN.into(), i64::MAX.into()),
        DataType::U64 => (0, u64::MAX.into()),
        // Floats take any integer (rounded to their precision).
        DataType::F32 | DataType::F64 => return Ok(Value::Float(raw)),
        DataType::Bool | DataType::String => (0, 0),
    };
    if int < min || int > max {
        return Err(WriteRefusal::OutOfRange { raw, data_type: t });
    }
    Ok(if int < 0 {
        Value::Int(i64::try_from(int).unwrap_or(i64::MIN))
    } else {
        Value::UInt(u64::try_from(int).unwrap_or(u64::MAX))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::modbus::WordOrder;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn a_fraction_of_a_large_raw_value_is_refused_not_rounded() {
        let mut spec = tag("hr:0", DataType::U32);
        spec.scale = 0.001;
        assert!(matches!(
            raw_number(&spec, &Value::Float(1500.0007)),
            Err(WriteRefusal::Fraction { .. })
        ));
        assert_eq!(
            raw_number(&spec, &Value::Float(1500.001)),
            Ok(Value::UInt(1_500_001))
        );
    }

    fn tag(address: &str, data_type: DataType) -> TagSpec {
        let a: crate::modbus::TagAddress = address.parse().unwrap();
        TagSpec {
            meta: Default::default(),
            name: "t".into(),
            address: a.address,
            bit: a.bit,
            data_type,
            order: WordOrder::ABCD,
            length: 0,
            scale: 1.0,
            offset: 0.0,
            deadband: 0.0,
            scan_interval: Duration::from_secs(1),
            write: None,
        }
    }

    /// What a read of `regs` gives for the tag (the read path of the driver).
    fn read_back(spec: &TagSpec, regs: &[u16]) -> Value {
        let v = codec::decode_registers(spec.data_type, spec.order, spec.length, regs).unwrap();
        codec::apply_scaling(v, spec.scale, spec.offset)
    }

    #[test]
    fn a_coil_is_function_5_and_a_u16_function_6() {
        assert_eq!(
            plan(&tag("co:3", DataType::Bool), &Value::Bool(true)),
            Ok(WritePlan::Coil(true))
        );
        let p = plan(&tag("hr:3", DataType::U16), &Value::UInt(513)).unwrap();
        assert_eq!((p.function(), p), (6, WritePlan::Register(513)));
    }

    #[test]
    fn a_two_register_value_is_function_16_in_the_tag_s_word_order() {
        let mut t = tag("hr:0", DataType::F32);
        t.order = WordOrder::CDAB;
        let p = plan(&t, &Value::Float(1.5)).unwrap();
        // 1.5f32 = 0x3FC0_0000, low word first.
        assert_eq!(p, WritePlan::Registers(vec![0x0000, 0x3FC0]));
        assert_eq!(p.function(), 16);
    }

    #[test]
    fn a_bit_of_a_register_is_a_mask_write_of_that_bit_alone() {
        let t = tag("hr:5.3", DataType::Bool);
        assert_eq!(
            plan(&t, &Value::Bool(true)),
            Ok(WritePlan::Mask {
                and_mask: !0b1000,
                or_mask: 0b1000
            })
        );
        assert_eq!(
            plan(&t, &Value::Bool(false)),
            Ok(WritePlan::Mask {
                and_mask: !0b1000,
                or_mask: 0
            })
        );
    }

    #[test]
    fn scale_and_offset_are_inverted() {
        let mut t = tag("hr:0", DataType::I16);
        t.scale = 0.1;
        t.offset = -40.0;
        // 21.7 = raw * 0.1 - 40  =>  raw = 617.
        let p = plan(&t, &Value::Float(21.7)).unwrap();
        assert_eq!(p, WritePlan::Register(617));
        assert_eq!(read_back(&t, &[617]), Value::Float(617.0 * 0.1 - 40.0));
    }

    #[test]
    fn values_that_do_not_fit_are_refused_not_wrapped() {
        let t = tag("hr:0", DataType::U16);
        assert!(matches!(
            plan(&t, &Value::Int(-1)),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        assert!(matches!(
            plan(&t, &Value::UInt(65536)),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        assert!(matches!(
            plan(&t, &Value::Float(1.5)),
            Err(WriteRefusal::Fraction { .. })
        ));
        assert!(matches!(
            plan(&t, &Value::Float(f64::NAN)),
            Err(WriteRefusal::NotFinite(_))
        ));
        assert!(matches!(
            plan(&t, &Value::Bool(true)),
            Err(WriteRefusal::Kind { .. })
        ));
        let f = tag("hr:0", DataType::F32);
        assert!(matches!(
            plan(&f, &Value::Float(1e39)),
            Err(WriteRefusal::OutOfRange { .. })
        ));
        let mut s = tag("hr:0", DataType::String);
        s.length = 4;
        assert_eq!(
            plan(&s, &Value::Text("hello".into())),
            Err(WriteRefusal::TooLong { len: 5, max: 4 })
        );
        assert_eq!(
            plan(&s, &Value::Text("ok".into())),
            Ok(WritePlan::Registers(vec![0x6F6B, 0]))
        );
        // 246 bytes is what one request carries; 250 is not.
        s.length = 246;
        assert!(plan(&s, &Value::Text("x".into())).is_ok());
        s.length = 250;
        assert_eq!(
            plan(&s, &Value::Text("x".into())),
            Err(WriteRefusal::TooWide(125))
        );
    }

    #[test]
    fn input_registers_and_discrete_inputs_are_read_only() {
        assert_eq!(
            plan(&tag("ir:0", DataType::U16), &Value::UInt(1)),
            Err(WriteRefusal::ReadOnly(Area::InputRegister))
        );
        assert_eq!(
            plan(&tag("ir:0.1", DataType::Bool), &Value::Bool(true)),
            Err(WriteRefusal::ReadOnly(Area::InputRegister))
        );
        assert_eq!(
            plan(&tag("di:0", DataType::Bool), &Value::Bool(true)),
            Err(WriteRefusal::ReadOnly(Area::DiscreteInput))
        );
    }

    #[test]
    fn a_u64_is_written_exactly_without_scaling() {
        let t = tag("hr:0", DataType::U64);
        let p = plan(&t, &Value::UInt(u64::MAX - 1)).unwrap();
        assert_eq!(
            p,
            WritePlan::Registers(vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE])
        );
    }

    const INT_TYPES: [DataType; 6] = [
        DataType::I16,
        DataType::U16,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
    ];

    proptest! {
        #[test]
        fn an_integer_written_reads_back_as_itself_or_is_refused(
            t in 0usize..6, o in 0usize..4, v in any::<i64>()
        ) {
            let mut spec = tag("hr:0", INT_TYPES[t]);
            spec.order = WordOrder::ALL[o];
            match plan(&spec, &Value::Int(v)) {
                Ok(WritePlan::Register(r)) => {
                    prop_assert_eq!(read_back(&spec, &[r]).as_f64(), Some(v as f64));
                }
                Ok(WritePlan::Registers(regs)) => {
                    let back = read_back(&spec, &regs);
                    let same = match back {
                        Value::Int(b) => b == v,
                        Value::UInt(b) => i128::from(b) == i128::from(v),
                        _ => false,
                    };
                    prop_assert!(same, "{:?} read back as {:?}", v, back);
                }
                Ok(other) => prop_assert!(false, "unexpected {:?}", other),
                Err(WriteRefusal::OutOfRange { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected refusal {}", e),
            }
        }

        #[test]
        fn a_scaled_value_written_reads_back_within_one_step(
            raw in -30000i32..30000, scale in prop_oneof![Just(0.1), Just(0.01), Just(2.5)],
            offset in -100i32..100
        ) {
            let mut spec = tag("hr:0", DataType::I16);
            spec.scale = scale;
            spec.offset = f64::from(offset);
            let value = f64::from(raw) * scale + spec.offset;
            let p = plan(&spec, &Value::Float(value));
            prop_assert!(p.is_ok(), "{:?}", p);
            if let Ok(WritePlan::Register(r)) = p {
                prop_assert_eq!(r as i16, raw as i16);
            }
        }

        #[test]
        fn any_value_is_planned_or_refused_without_panicking(
            t in 0usize..10, f in any::<f64>(), i in any::<i64>(), bit in 0u8..16
        ) {
            let types = [DataType::Bool, DataType::I16, DataType::U16, DataType::I32,
                DataType::U32, DataType::I64, DataType::U64, DataType::F32, DataType::F64,
                DataType::String];
            let mut spec = tag("hr:0", types[t]);
            spec.length = 8;
            if types[t] == DataType::Bool { spec.bit = Some(bit); }
            for v in [Value::Float(f), Value::Int(i), Value::Bool(i % 2 == 0),
                Value::Text("abc".into())] {
                let _ = plan(&spec, &v);
            }
        }
    }
}
