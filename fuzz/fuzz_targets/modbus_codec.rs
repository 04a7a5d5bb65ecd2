//! Register decoding for every data type, word order and length on arbitrary register images,
//! and encode -> decode round trips, asserting only what `protocols::modbus::codec` promises:
//! decoding never panics, succeeds exactly when given `register_count` registers, and
//! `encode_registers` is its inverse (numbers of the tag's type, text that fits the field).
//!
//! Input layout: `[length: 2 bytes][scale: 8 bytes][registers, big-endian pairs...]`
//! (short inputs are padded with zeros).

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use protocols::modbus::codec::{
    apply_scaling, decode_registers, encode_registers, register_count, DecodeError,
};
use protocols::modbus::{DataType, WordOrder};
use protocols::model::Value;

const TYPES: [DataType; 10] = [
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

const HEADER: usize = 10;

/// Equal values, NaN equal to NaN and floats compared by bits.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        }
        _ => a == b,
    }
}

/// Decodes an image of exactly the right size and checks what re-encoding it must give.
fn check_image(data_type: DataType, order: WordOrder, length: u16, image: &[u16]) {
    let value = match decode_registers(data_type, order, length, image) {
        Ok(value) => value,
        Err(e) => panic!("{data_type:?} {order:?} {length} {image:04X?}: {e}"),
    };
    let again = encode_registers(data_type, order, length, &value);
    assert_eq!(again.len(), image.len(), "{data_type:?} {order:?} {length}");
    match (data_type, &value) {
        // Any non-zero register is true; it comes back as the canonical 1.
        (DataType::Bool, _) => {
            assert_eq!(
                decode_registers(data_type, order, length, &again),
                Ok(value)
            );
        }
        // A NaN keeps no particular payload.
        (_, Value::Float(f)) if f.is_nan() => {}
        // Text comes back when it fits the field: cut at NUL, trailing spaces trimmed and
        // invalid UTF-8 replaced (which can lengthen it) on the way in.
        (DataType::String, Value::Text(text)) => {
            if text.len() <= usize::from(length) {
                let back = decode_registers(data_type, order, length, &again);
                assert_eq!(back, Ok(value), "{order:?} {length} {image:04X?}");
            }
        }
        (DataType::String, other) => panic!("string decoded as {other:?}"),
        // Every number image is the image of exactly one value.
        _ => assert_eq!(again, image, "{data_type:?} {order:?} {value:?}"),
    }
}

/// Encodes a value of the tag's type and checks it decodes back unchanged.
fn check_value(data_type: DataType, order: WordOrder, length: u16, value: &Value) {
    let regs = encode_registers(data_type, order, length, value);
    assert_eq!(
        regs.len(),
        usize::from(register_count(data_type, length)),
        "{data_type:?} {length}"
    );
    let back = match decode_registers(data_type, order, length, &regs) {
        Ok(back) => back,
        Err(e) => panic!("{data_type:?} {order:?} {length} {value:?}: {e}"),
    };
    assert!(
        same(&back, value),
        "{data_type:?} {order:?} {length}: {value:?} came back as {back:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let n = data.len().min(HEADER);
    header[..n].copy_from_slice(&data[..n]);
    let body = &data[n..];
    // String lengths up to 1023, or within 255 of the largest when the second byte is 0xFF
    // (the full range would spend most runs filling 64 KiB strings).
    let length = if header[1] == 0xFF {
        u16::MAX - u16::from(header[0])
    } else {
        u16::from_le_bytes([header[0], header[1] % 4])
    };
    let factor = f64::from_le_bytes([
        header[2], header[3], header[4], header[5], header[6], header[7], header[8], header[9],
    ]);
    let regs: Vec<u16> = body
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();

    // Decoding any image: Ok exactly at the type's register count, else a Length error.
    for data_type in TYPES {
        for length in [0, 1, length] {
            if data_type != DataType::String && length != 0 {
                continue;
            }
            let width = usize::from(register_count(data_type, length));
            for order in WordOrder::ALL {
                if let Some(image) = regs.get(..width) {
                    check_image(data_type, order, length, image);
                }
                for wrong in [width - 1, width + 1, regs.len()] {
                    let Some(image) = regs.get(..wrong) else {
                        continue;
                    };
                    if wrong == width {
                        continue;
                    }
                    assert_eq!(
                        decode_registers(data_type, order, length, image),
                        Err(DecodeError::Length {
                            expected: width,
                            got: wrong
                        })
                    );
                }
            }
        }
    }

    // Values of each type round trip through their registers.
    let mut word = [0u8; 8];
    let m = body.len().min(8);
    word[..m].copy_from_slice(&body[..m]);
    let i = i64::from_le_bytes(word);
    let u = u64::from_le_bytes(word);
    let f = f64::from_le_bytes(word);
    let text: Arc<str> = Arc::from(String::from_utf8_lossy(body.get(8..).unwrap_or_default()));
    for order in WordOrder::ALL {
        check_value(DataType::Bool, order, 0, &Value::Bool(i & 1 == 1));
        check_value(DataType::I16, order, 0, &Value::Int((i as i16).into()));
        check_value(DataType::U16, order, 0, &Value::UInt((u as u16).into()));
        check_value(DataType::I32, order, 0, &Value::Int((i as i32).into()));
        check_value(DataType::U32, order, 0, &Value::UInt((u as u32).into()));
        check_value(DataType::I64, order, 0, &Value::Int(i));
        check_value(DataType::U64, order, 0, &Value::UInt(u));
        check_value(DataType::F64, order, 0, &Value::Float(f));
        // An f64 written to an f32 tag is rounded as by `as f32`; an f32 comes back exactly.
        check_value(DataType::F32, order, 0, &Value::Float((f as f32).into()));
        let narrowed = encode_registers(DataType::F32, order, 0, &Value::Float(f));
        let back = decode_registers(DataType::F32, order, 0, &narrowed);
        assert!(
            matches!(back, Ok(ref v) if same(v, &Value::Float((f as f32).into()))),
            "{f:?} as f32 came back as {back:?}"
        );
        // Text that fits, holds no NUL and does not end in a space comes back unchanged.
        if text.len() <= usize::from(length) && !text.contains('\0') && !text.ends_with(' ') {
            check_value(DataType::String, order, length, &Value::Text(text.clone()));
        }
        // Other kinds are converted; only the register count is promised.
        for value in [Value::Text(text.clone()), Value::Float(f), Value::Int(i)] {
            for data_type in TYPES {
                let regs = encode_registers(data_type, order, length, &value);
                assert_eq!(regs.len(), usize::from(register_count(data_type, length)));
            }
        }
    }

    // Scaling: the identity leaves a value alone, any other makes numbers floats.
    for value in [Value::Int(i), Value::UInt(u), Value::Float(f)] {
        let kept = apply_scaling(value.clone(), 1.0, 0.0);
        assert!(same(&kept, &value), "{value:?} became {kept:?}");
        for (scale, offset) in [(factor, 0.0), (1.0, factor), (factor, factor)] {
            let scaled = apply_scaling(value.clone(), scale, offset);
            if scale == 1.0 && offset == 0.0 {
                assert!(same(&scaled, &value));
            } else {
                assert!(matches!(scaled, Value::Float(_)), "{value:?} -> {scaled:?}");
            }
        }
    }
    for value in [Value::Bool(i & 1 == 1), Value::Text(text)] {
        assert_eq!(apply_scaling(value.clone(), factor, factor), value);
    }
});
