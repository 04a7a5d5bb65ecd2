//! Decoding Modbus registers and bits into typed [`Value`]s, and the inverse for simulators.
//!
//! Design: every numeric type is handled by one pair of helpers. [`gather`] turns the registers
//! of a tag into the value's big-endian bytes (`A` first) according to the [`WordOrder`], and
//! [`scatter`] does the reverse. A word order is two independent choices: whether registers come
//! least significant first (`CDAB`, `DCBA`) and whether the two bytes inside each register are
//! swapped (`BADC`, `DCBA`). The bytes live in a fixed-size array, so decoding a number never
//! touches the heap; only text allocates (its `Arc<str>`). Decoding never panics: the register
//! count is checked up front and any bit pattern, NaN included, is a valid value.

use std::sync::Arc;

use super::{DataType, WordOrder};
use crate::model::Value;

/// Registers a value of this type occupies (string: (length_bytes+1)/2, at least 1; bool: 1).
pub fn register_count(data_type: DataType, length: u16) -> u16 {
    match data_type {
        DataType::Bool | DataType::I16 | DataType::U16 => 1,
        DataType::I32 | DataType::U32 | DataType::F32 => 2,
        DataType::I64 | DataType::U64 | DataType::F64 => 4,
        // `div_ceil` cannot overflow, unlike `(length + 1) / 2` at 65535.
        DataType::String => length.div_ceil(2).max(1),
    }
}

/// Why registers could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The number of registers does not match the data type.
    #[error("expected {expected} registers, got {got}")]
    Length {
        /// Registers the data type needs.
        expected: usize,
        /// Registers received.
        got: usize,
    },
}

/// Decodes the registers of one tag (regs.len() must equal register_count) into a Value.
pub fn decode_registers(
    data_type: DataType,
    order: WordOrder,
    length: u16,
    regs: &[u16],
) -> Result<Value, DecodeError> {
    let expected = usize::from(register_count(data_type, length));
    if regs.len() != expected {
        return Err(DecodeError::Length {
            expected,
            got: regs.len(),
        });
    }
    let value = match data_type {
        DataType::Bool => Value::Bool(regs.iter().any(|&r| r != 0)),
        DataType::I16 => Value::Int(i16::from_be_bytes(gather(order, regs)).into()),
        DataType::U16 => Value::UInt(u16::from_be_bytes(gather(order, regs)).into()),
        DataType::I32 => Value::Int(i32::from_be_bytes(gather(order, regs)).into()),
        DataType::U32 => Value::UInt(u32::from_be_bytes(gather(order, regs)).into()),
        DataType::I64 => Value::Int(i64::from_be_bytes(gather(order, regs))),
        DataType::U64 => Value::UInt(u64::from_be_bytes(gather(order, regs))),
        DataType::F32 => Value::Float(f32::from_be_bytes(gather(order, regs)).into()),
        DataType::F64 => Value::Float(f64::from_be_bytes(gather(order, regs))),
        DataType::String => Value::Text(decode_text(order, length, regs)),
    };
    Ok(value)
}

/// Decodes a coil or discrete input.
pub fn decode_bit(bit: bool) -> Value {
    Value::Bool(bit)
}

/// Decodes bit `bit` of a register (0 is the least significant) into a bool; a bit past 15
/// reads as false.
pub fn decode_register_bit(reg: u16, bit: u8) -> Value {
    Value::Bool(reg.checked_shr(u32::from(bit)).is_some_and(|r| r & 1 == 1))
}

/// Applies value = raw * scale + offset; returns the value unchanged when scale == 1 and offset == 0,
/// Value::Float otherwise (bool and text are never scaled).
pub fn apply_scaling(value: Value, scale: f64, offset: f64) -> Value {
    if scale == 1.0 && offset == 0.0 {
        return value;
    }
    match value {
        Value::Int(i) => Value::Float(i as f64 * scale + offset),
        Value::UInt(u) => Value::Float(u as f64 * scale + offset),
        Value::Float(f) => Value::Float(f * scale + offset),
        Value::Bool(_) | Value::Text(_) | Value::Array(_) => value,
    }
}

/// Encodes a value into registers (the inverse of decode_registers), for simulators and tests.
///
/// A value of another kind than the data type is converted as with `as` casts (text counts as
/// 0 for numbers; a non-text value written to a string uses its display form). Text longer than
/// `length` is cut, shorter text is padded with NUL bytes.
pub fn encode_registers(
    data_type: DataType,
    order: WordOrder,
    length: u16,
    value: &Value,
) -> Vec<u16> {
    match data_type {
        DataType::Bool => scatter(order, [0, u8::from(as_u64(value) != 0)]),
        DataType::I16 => scatter(order, (as_i64(value) as i16).to_be_bytes()),
        DataType::U16 => scatter(order, (as_u64(value) as u16).to_be_bytes()),
        DataType::I32 => scatter(order, (as_i64(value) as i32).to_be_bytes()),
        DataType::U32 => scatter(order, (as_u64(value) as u32).to_be_bytes()),
        DataType::I64 => scatter(order, as_i64(value).to_be_bytes()),
        DataType::U64 => scatter(order, as_u64(value).to_be_bytes()),
        DataType::F32 => scatter(order, (as_f64(value) as f32).to_be_bytes()),
        DataType::F64 => scatter(order, as_f64(value).to_be_bytes()),
        DataType::String => encode_text(order, length, value),
    }
}

/// Whether the order puts the least significant register first.
fn words_reversed(order: WordOrder) -> bool {
    matches!(order, WordOrder::CDAB | WordOrder::DCBA)
}

/// Whether the order puts the low byte of each register first.
fn bytes_swapped(order: WordOrder) -> bool {
    matches!(order, WordOrder::BADC | WordOrder::DCBA)
}

/// A register's two bytes in value order (the first is the more significant).
fn word_bytes(order: WordOrder, reg: u16) -> [u8; 2] {
    let [hi, lo] = reg.to_be_bytes();
    if bytes_swapped(order) {
        [lo, hi]
    } else {
        [hi, lo]
    }
}

/// The register holding two bytes given in value order; the inverse of [`word_bytes`].
fn word(order: WordOrder, first: u8, second: u8) -> u16 {
    if bytes_swapped(order) {
        u16::from_be_bytes([second, first])
    } else {
        u16::from_be_bytes([first, second])
    }
}

/// The value's big-endian bytes from `N / 2` registers (missing registers read as 0).
fn gather<const N: usize>(order: WordOrder, regs: &[u16]) -> [u8; N] {
    let words = N / 2;
    let mut bytes = [0u8; N];
    for (i, pair) in bytes.chunks_exact_mut(2).enumerate() {
        let pos = if words_reversed(order) {
            words - 1 - i
        } else {
            i
        };
        pair.copy_from_slice(&word_bytes(order, regs.get(pos).copied().unwrap_or(0)));
    }
    bytes
}

/// The registers holding a value given by its big-endian bytes; the inverse of [`gather`].
fn scatter<const N: usize>(order: WordOrder, bytes: [u8; N]) -> Vec<u16> {
    let mut regs: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| word(order, pair[0], pair[1]))
        .collect();
    if words_reversed(order) {
        regs.reverse();
    }
    regs
}

/// The text in the first `length` bytes: cut at NUL, trailing spaces trimmed, lossy UTF-8.
fn decode_text(order: WordOrder, length: u16, regs: &[u16]) -> Arc<str> {
    let bytes: Vec<u8> = regs
        .iter()
        .flat_map(|&r| word_bytes(order, r))
        .take(usize::from(length))
        .take_while(|&b| b != 0)
        .collect();
    Arc::from(String::from_utf8_lossy(&bytes).trim_end_matches(' '))
}

/// The registers of a string tag; the inverse of [`decode_text`].
fn encode_text(order: WordOrder, length: u16, value: &Value) -> Vec<u16> {
    let owned;
    let text: &str = match value {
        Value::Text(s) => s,
        other => {
            owned = other.to_string();
            &owned
        }
    };
    let count = usize::from(register_count(DataType::String, length));
    let mut bytes: Vec<u8> = text.bytes().take(usize::from(length)).collect();
    bytes.resize(count * 2, 0);
    bytes
        .chunks_exact(2)
        .map(|pair| word(order, pair[0], pair[1]))
        .collect()
}

/// The value as a signed integer, for encoding.
fn as_i64(value: &Value) -> i64 {
    match value {
        Value::Bool(b) => i64::from(*b),
        Value::Int(i) => *i,
        Value::UInt(u) => *u as i64,
        Value::Float(f) => *f as i64,
        Value::Text(_) | Value::Array(_) => 0,
    }
}

/// The value as an unsigned integer, for encoding.
fn as_u64(value: &Value) -> u64 {
    match value {
        Value::Bool(b) => u64::from(*b),
        Value::Int(i) => *i as u64,
        Value::UInt(u) => *u,
        Value::Float(f) => *f as u64,
        Value::Text(_) | Value::Array(_) => 0,
    }
}

/// The value as a float, for encoding.
fn as_f64(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::f64::consts::PI;
    use WordOrder::{ABCD, BADC, CDAB, DCBA};

    fn text(s: &str) -> Value {
        Value::Text(Arc::from(s))
    }

    /// One known register image per order, in the order ABCD, CDAB, BADC, DCBA.
    struct Case {
        data_type: DataType,
        length: u16,
        value: Value,
        images: [&'static [u16]; 4],
    }

    fn cases() -> Vec<Case> {
        let case = |data_type, length, value, images| Case {
            data_type,
            length,
            value,
            images,
        };
        vec![
            case(
                DataType::Bool,
                0,
                Value::Bool(true),
                [&[0x0001], &[0x0001], &[0x0100], &[0x0100]],
            ),
            case(
                DataType::Bool,
                0,
                Value::Bool(false),
                [&[0x0000], &[0x0000], &[0x0000], &[0x0000]],
            ),
            case(
                DataType::I16,
                0,
                Value::Int(-2),
                [&[0xFFFE], &[0xFFFE], &[0xFEFF], &[0xFEFF]],
            ),
            case(
                DataType::U16,
                0,
                Value::UInt(0x1234),
                [&[0x1234], &[0x1234], &[0x3412], &[0x3412]],
            ),
            case(
                DataType::I32,
                0,
                Value::Int(-123_456),
                [
                    &[0xFFFE, 0x1DC0],
                    &[0x1DC0, 0xFFFE],
                    &[0xFEFF, 0xC01D],
                    &[0xC01D, 0xFEFF],
                ],
            ),
            case(
                DataType::U32,
                0,
                Value::UInt(0x1234_5678),
                [
                    &[0x1234, 0x5678],
                    &[0x5678, 0x1234],
                    &[0x3412, 0x7856],
                    &[0x7856, 0x3412],
                ],
            ),
            case(
                DataType::I64,
                0,
                Value::Int(0x0102_0304_0506_0708),
                [
                    &[0x0102, 0x0304, 0x0506, 0x0708],
                    &[0x0708, 0x0506, 0x0304, 0x0102],
                    &[0x0201, 0x0403, 0x0605, 0x0807],
                    &[0x0807, 0x0605, 0x0403, 0x0201],
                ],
            ),
            case(
                DataType::I64,
                0,
                Value::Int(-2),
                [
                    &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                    &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
                    &[0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
                    &[0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
                ],
            ),
            case(
                DataType::U64,
                0,
                Value::UInt(0x1122_3344_5566_7788),
                [
                    &[0x1122, 0x3344, 0x5566, 0x7788],
                    &[0x7788, 0x5566, 0x3344, 0x1122],
                    &[0x2211, 0x4433, 0x6655, 0x8877],
                    &[0x8877, 0x6655, 0x4433, 0x2211],
                ],
            ),
            case(
                DataType::F32,
                0,
                Value::Float(1.5),
                [
                    &[0x3FC0, 0x0000],
                    &[0x0000, 0x3FC0],
                    &[0xC03F, 0x0000],
                    &[0x0000, 0xC03F],
                ],
            ),
            case(
                DataType::F32,
                0,
                Value::Float(-2.25),
                [
                    &[0xC010, 0x0000],
                    &[0x0000, 0xC010],
                    &[0x10C0, 0x0000],
                    &[0x0000, 0x10C0],
                ],
            ),
            case(
                DataType::F64,
                0,
                Value::Float(PI),
                [
                    &[0x4009, 0x21FB, 0x5444, 0x2D18],
                    &[0x2D18, 0x5444, 0x21FB, 0x4009],
                    &[0x0940, 0xFB21, 0x4454, 0x182D],
                    &[0x182D, 0x4454, 0xFB21, 0x0940],
                ],
            ),
            // Odd length: the last register's second byte is padding.
            case(
                DataType::String,
                7,
                text("PRESS-7"),
                [
                    &[0x5052, 0x4553, 0x532D, 0x3700],
                    &[0x5052, 0x4553, 0x532D, 0x3700],
                    &[0x5250, 0x5345, 0x2D53, 0x0037],
                    &[0x5250, 0x5345, 0x2D53, 0x0037],
                ],
            ),
            // Even length, text shorter than the field: NUL padded.
            case(
                DataType::String,
                8,
                text("PRESS-7"),
                [
                    &[0x5052, 0x4553, 0x532D, 0x3700],
                    &[0x5052, 0x4553, 0x532D, 0x3700],
                    &[0x5250, 0x5345, 0x2D53, 0x0037],
                    &[0x5250, 0x5345, 0x2D53, 0x0037],
                ],
            ),
            // Even length, text filling the field.
            case(
                DataType::String,
                8,
                text("PRESS-77"),
                [
                    &[0x5052, 0x4553, 0x532D, 0x3737],
                    &[0x5052, 0x4553, 0x532D, 0x3737],
                    &[0x5250, 0x5345, 0x2D53, 0x3737],
                    &[0x5250, 0x5345, 0x2D53, 0x3737],
                ],
            ),
        ]
    }

    #[test]
    fn known_images_decode_and_encode_for_every_type_and_order() {
        let mut checked = 0;
        for c in cases() {
            for (order, image) in WordOrder::ALL.into_iter().zip(c.images) {
                let decoded = decode_registers(c.data_type, order, c.length, image).unwrap();
                assert_eq!(decoded, c.value, "{:?} {order:?} {image:04X?}", c.data_type);
                let encoded = encode_registers(c.data_type, order, c.length, &c.value);
                assert_eq!(encoded, image, "{:?} {order:?} {:?}", c.data_type, c.value);
                checked += 1;
            }
        }
        assert_eq!(checked, cases().len() * 4);
    }

    #[test]
    fn table_covers_every_type_and_order() {
        let types = [
            DataType::Bool,
            DataType::I16,
            DataType::U16,
            DataType::I32,
            DataType::U32,
            DataType::I64,
            DataType::U64,
            DataType::F32,
            DataType::F64,
            DataType::String,
        ];
        let cases = cases();
        for t in types {
            assert!(cases.iter().any(|c| c.data_type == t), "{t:?} untested");
        }
        assert_eq!(WordOrder::ALL, [ABCD, CDAB, BADC, DCBA]);
    }

    #[test]
    fn spec_examples() {
        let u32v = Value::UInt(0x1234_5678);
        assert_eq!(
            encode_registers(DataType::U32, ABCD, 0, &u32v),
            [0x1234, 0x5678]
        );
        assert_eq!(
            encode_registers(DataType::U32, CDAB, 0, &u32v),
            [0x5678, 0x1234]
        );
        assert_eq!(
            encode_registers(DataType::U32, BADC, 0, &u32v),
            [0x3412, 0x7856]
        );
        assert_eq!(
            encode_registers(DataType::U32, DCBA, 0, &u32v),
            [0x7856, 0x3412]
        );
    }

    #[test]
    fn register_counts() {
        assert_eq!(register_count(DataType::Bool, 0), 1);
        assert_eq!(register_count(DataType::I16, 9), 1);
        assert_eq!(register_count(DataType::U16, 0), 1);
        assert_eq!(register_count(DataType::I32, 0), 2);
        assert_eq!(register_count(DataType::U32, 0), 2);
        assert_eq!(register_count(DataType::F32, 0), 2);
        assert_eq!(register_count(DataType::I64, 0), 4);
        assert_eq!(register_count(DataType::U64, 0), 4);
        assert_eq!(register_count(DataType::F64, 0), 4);
        assert_eq!(register_count(DataType::String, 0), 1);
        assert_eq!(register_count(DataType::String, 1), 1);
        assert_eq!(register_count(DataType::String, 2), 1);
        assert_eq!(register_count(DataType::String, 7), 4);
        assert_eq!(register_count(DataType::String, 8), 4);
        assert_eq!(register_count(DataType::String, u16::MAX), 32768);
    }

    #[test]
    fn bool_register_is_true_when_non_zero() {
        for order in WordOrder::ALL {
            for reg in [0x0001, 0x0100, 0x8000, 0xFFFF] {
                assert_eq!(
                    decode_registers(DataType::Bool, order, 0, &[reg]),
                    Ok(Value::Bool(true))
                );
            }
            assert_eq!(
                decode_registers(DataType::Bool, order, 0, &[0]),
                Ok(Value::Bool(false))
            );
        }
        assert_eq!(decode_bit(true), Value::Bool(true));
        assert_eq!(decode_bit(false), Value::Bool(false));
    }

    #[test]
    fn wrong_register_count_is_an_error() {
        assert_eq!(
            decode_registers(DataType::F32, ABCD, 0, &[1]),
            Err(DecodeError::Length {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            decode_registers(DataType::U64, CDAB, 0, &[1, 2, 3, 4, 5]),
            Err(DecodeError::Length {
                expected: 4,
                got: 5
            })
        );
        assert_eq!(
            decode_registers(DataType::I16, BADC, 0, &[]),
            Err(DecodeError::Length {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(
            decode_registers(DataType::String, DCBA, 7, &[0x4142; 3]),
            Err(DecodeError::Length {
                expected: 4,
                got: 3
            })
        );
        let err = decode_registers(DataType::I32, ABCD, 0, &[]).unwrap_err();
        assert_eq!(err.to_string(), "expected 2 registers, got 0");
    }

    #[test]
    fn strings_stop_at_length_and_nul_and_lose_trailing_spaces() {
        // Odd length: the byte after the last character is ignored even when not NUL.
        let regs = [0x5052, 0x4553, 0x532D, 0x3741];
        assert_eq!(
            decode_registers(DataType::String, ABCD, 7, &regs),
            Ok(text("PRESS-7"))
        );
        // Low byte first.
        let regs = [0x5250, 0x5345, 0x2D53, 0x4137];
        assert_eq!(
            decode_registers(DataType::String, DCBA, 7, &regs),
            Ok(text("PRESS-7"))
        );
        // Bytes after the first NUL are dropped.
        let regs = [0x4142, 0x0043, 0x4445];
        assert_eq!(
            decode_registers(DataType::String, CDAB, 6, &regs),
            Ok(text("AB"))
        );
        // Trailing spaces are trimmed, leading ones kept.
        let regs = [0x2041, 0x4220, 0x2020];
        assert_eq!(
            decode_registers(DataType::String, ABCD, 6, &regs),
            Ok(text(" AB"))
        );
        // Invalid UTF-8 is replaced, not refused.
        let regs = [0x41FF, 0x4200];
        assert_eq!(
            decode_registers(DataType::String, ABCD, 4, &regs),
            Ok(text("A\u{FFFD}B"))
        );
        // Zero length decodes to empty text from its one register.
        assert_eq!(
            decode_registers(DataType::String, ABCD, 0, &[0x4142]),
            Ok(text(""))
        );
    }

    #[test]
    fn long_text_is_cut_when_encoded() {
        let regs = encode_registers(DataType::String, ABCD, 3, &text("ABCDEF"));
        assert_eq!(regs, [0x4142, 0x4300]);
        assert_eq!(
            decode_registers(DataType::String, ABCD, 3, &regs),
            Ok(text("ABC"))
        );
    }

    #[test]
    fn nan_decodes_without_panicking() {
        let f32_nans: [u32; 4] = [0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0xFFFF_FFFF];
        let f64_nans: [u64; 3] = [0x7FF8_0000_0000_0000, 0x7FF0_0000_0000_0001, u64::MAX];
        for order in WordOrder::ALL {
            for bits in f32_nans {
                let regs = scatter(order, bits.to_be_bytes());
                let v = decode_registers(DataType::F32, order, 0, &regs).unwrap();
                assert!(matches!(v, Value::Float(f) if f.is_nan()), "{v:?}");
                // Scaling a NaN stays a NaN float.
                let scaled = apply_scaling(v, 2.0, 1.0);
                assert!(matches!(scaled, Value::Float(f) if f.is_nan()));
            }
            for bits in f64_nans {
                let regs = scatter(order, bits.to_be_bytes());
                let v = decode_registers(DataType::F64, order, 0, &regs).unwrap();
                assert!(matches!(v, Value::Float(f) if f.is_nan()), "{v:?}");
            }
        }
    }

    #[test]
    fn scaling() {
        assert_eq!(apply_scaling(Value::Int(5), 1.0, 0.0), Value::Int(5));
        assert_eq!(apply_scaling(Value::UInt(5), 1.0, 0.0), Value::UInt(5));
        assert_eq!(
            apply_scaling(Value::Float(1.5), 1.0, 0.0),
            Value::Float(1.5)
        );
        assert_eq!(apply_scaling(Value::Int(10), 0.5, -3.0), Value::Float(2.0));
        assert_eq!(apply_scaling(Value::Int(-4), 0.25, 0.0), Value::Float(-1.0));
        assert_eq!(apply_scaling(Value::UInt(4), 2.0, 1.0), Value::Float(9.0));
        assert_eq!(apply_scaling(Value::UInt(4), 1.0, 0.5), Value::Float(4.5));
        assert_eq!(
            apply_scaling(Value::Float(1.5), 2.0, 0.0),
            Value::Float(3.0)
        );
        assert_eq!(
            apply_scaling(Value::Bool(true), 2.0, 1.0),
            Value::Bool(true)
        );
        assert_eq!(apply_scaling(text("x"), 2.0, 1.0), text("x"));
    }

    fn any_order() -> impl Strategy<Value = WordOrder> {
        prop::sample::select(WordOrder::ALL.to_vec())
    }

    fn round_trip(data_type: DataType, order: WordOrder, value: &Value) -> Value {
        let regs = encode_registers(data_type, order, 0, value);
        assert_eq!(regs.len(), usize::from(register_count(data_type, 0)));
        decode_registers(data_type, order, 0, &regs).unwrap()
    }

    proptest! {
        #[test]
        fn i16_round_trips(order in any_order(), x in any::<i16>()) {
            let v = Value::Int(x.into());
            prop_assert_eq!(round_trip(DataType::I16, order, &v), v);
        }

        #[test]
        fn u16_round_trips(order in any_order(), x in any::<u16>()) {
            let v = Value::UInt(x.into());
            prop_assert_eq!(round_trip(DataType::U16, order, &v), v);
        }

        #[test]
        fn i32_round_trips(order in any_order(), x in any::<i32>()) {
            let v = Value::Int(x.into());
            prop_assert_eq!(round_trip(DataType::I32, order, &v), v);
        }

        #[test]
        fn u32_round_trips(order in any_order(), x in any::<u32>()) {
            let v = Value::UInt(x.into());
            prop_assert_eq!(round_trip(DataType::U32, order, &v), v);
        }

        #[test]
        fn i64_round_trips(order in any_order(), x in any::<i64>()) {
            let v = Value::Int(x);
            prop_assert_eq!(round_trip(DataType::I64, order, &v), v);
        }

        #[test]
        fn u64_round_trips(order in any_order(), x in any::<u64>()) {
            let v = Value::UInt(x);
            prop_assert_eq!(round_trip(DataType::U64, order, &v), v);
        }

        #[test]
        fn bool_round_trips(order in any_order(), x in any::<bool>()) {
            let v = Value::Bool(x);
            prop_assert_eq!(round_trip(DataType::Bool, order, &v), v);
        }

        #[test]
        fn f32_round_trips(order in any_order(), x in proptest::num::f32::ANY) {
            let back = round_trip(DataType::F32, order, &Value::Float(x.into()));
            match back {
                Value::Float(f) if x.is_nan() => prop_assert!(f.is_nan()),
                Value::Float(f) => prop_assert_eq!(f.to_bits(), f64::from(x).to_bits()),
                other => prop_assert!(false, "not a float: {:?}", other),
            }
        }

        #[test]
        fn f64_round_trips(order in any_order(), x in proptest::num::f64::ANY) {
            let back = round_trip(DataType::F64, order, &Value::Float(x));
            match back {
                Value::Float(f) if x.is_nan() => prop_assert!(f.is_nan()),
                Value::Float(f) => prop_assert_eq!(f.to_bits(), x.to_bits()),
                other => prop_assert!(false, "not a float: {:?}", other),
            }
        }

        #[test]
        fn integer_images_round_trip(order in any_order(), regs in prop::array::uniform4(any::<u16>())) {
            for (t, n) in [
                (DataType::I16, 1),
                (DataType::U16, 1),
                (DataType::I32, 2),
                (DataType::U32, 2),
                (DataType::I64, 4),
                (DataType::U64, 4),
                (DataType::F64, 4),
            ] {
                let image = &regs[..n];
                let v = decode_registers(t, order, 0, image).unwrap();
                if matches!(v, Value::Float(f) if f.is_nan()) {
                    continue;
                }
                prop_assert_eq!(encode_registers(t, order, 0, &v), image);
            }
        }

        #[test]
        fn ascii_text_round_trips(
            order in any_order(),
            s in "[A-Za-z0-9_-]{0,20}",
            extra in 0u16..4,
        ) {
            let length = s.len() as u16 + extra;
            let regs = encode_registers(DataType::String, order, length, &text(&s));
            prop_assert_eq!(regs.len(), usize::from(register_count(DataType::String, length)));
            prop_assert_eq!(decode_registers(DataType::String, order, length, &regs), Ok(text(&s)));
        }

        #[test]
        fn any_image_decodes_without_panicking(
            order in any_order(),
            regs in prop::collection::vec(any::<u16>(), 0..40),
            length in 0u16..80,
        ) {
            for t in [DataType::Bool, DataType::I16, DataType::U16, DataType::I32, DataType::U32,
                DataType::I64, DataType::U64, DataType::F32, DataType::F64, DataType::String] {
                let n = usize::from(register_count(t, length)).min(regs.len());
                let result = decode_registers(t, order, length, &regs[..n]);
                prop_assert_eq!(result.is_ok(), n == usize::from(register_count(t, length)));
            }
        }
    }

    #[test]
    fn a_register_bit_is_counted_from_the_least_significant_bit() {
        assert_eq!(decode_register_bit(0b1000, 3), Value::Bool(true));
        assert_eq!(decode_register_bit(0b1000, 2), Value::Bool(false));
        assert_eq!(decode_register_bit(0x8000, 15), Value::Bool(true));
        assert_eq!(decode_register_bit(0x0001, 0), Value::Bool(true));
        assert_eq!(decode_register_bit(0xFFFF, 16), Value::Bool(false));
    }
}
