//! The RTU master's answer path on arbitrary received bytes: find the expected answer, slice its
//! data as the line driver does, turn it into registers or bits, and decode every window of the
//! registers as every data type and word order (with scaling). Must never panic.
//!
//! Input layout: `[unit][area][count lo][count hi][string length][scale: 8 bytes][received...]`
//! (short inputs are padded with zeros); the received bytes also go to `parse_request`,
//! `parse_slave_request` and, with the header's first six bytes as the echo, to
//! `find_write_response`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::modbus::codec::{apply_scaling, decode_bit, decode_registers, register_count};
use protocols::modbus::frame::{
    self, crc_ok, data_len, find_response, find_write_response, parse_request,
    parse_slave_request, Answer, Expect, Found,
};
use protocols::modbus::{Area, DataType, WordOrder};

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

const AREAS: [Area; 4] = [
    Area::Coil,
    Area::DiscreteInput,
    Area::HoldingRegister,
    Area::InputRegister,
];

const HEADER: usize = 13;

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let n = data.len().min(HEADER);
    header[..n].copy_from_slice(&data[..n]);
    let buf = &data[n..];

    let expect = Expect {
        unit: header[0],
        area: AREAS[usize::from(header[1] % 4)],
        count: u16::from_le_bytes([header[2], header[3]]),
    };
    let string_length = u16::from(header[4]);
    let scale = f64::from_le_bytes([
        header[5], header[6], header[7], header[8], header[9], header[10], header[11], header[12],
    ]);

    let _ = parse_request(buf);
    let _ = parse_request(data);

    // The write path on the same bytes: the echo finder, with the header's first six bytes as
    // the expected echo (unit, function, address, value), and the simulators' request parser.
    if let Found::Answer { skipped, end, .. } = find_write_response(buf, &header[..6]) {
        assert!(skipped < end && end <= buf.len(), "{skipped}..{end}");
        assert!(crc_ok(&buf[skipped..end]));
    }
    for bytes in [buf, data] {
        if let Ok(Some((_, _, len))) = parse_slave_request(bytes) {
            assert!(len <= bytes.len());
        }
    }

    let Found::Answer {
        answer,
        skipped,
        end,
    } = find_response(buf, expect)
    else {
        return;
    };
    // What `find_response` documents and the driver relies on to slice its buffer.
    assert!(
        skipped < end && end <= buf.len(),
        "{skipped}..{end} of {}",
        buf.len()
    );
    assert!(crc_ok(&buf[skipped..end]));
    let Answer::Data { start, len } = answer else {
        return;
    };
    assert_eq!(len, data_len(expect.area, expect.count));
    assert_eq!(start + len + 2, end);

    // As the RTU transport (`protocols::modbus::transport::rtu`) does with the answer.
    let data = &buf[start..start + len];
    if expect.area.is_bit() {
        let bits = frame::bits(data, expect.count);
        assert_eq!(bits.len(), usize::from(expect.count));
        for bit in bits {
            let _ = decode_bit(bit);
        }
        return;
    }
    let regs = frame::registers(data, expect.count);
    assert_eq!(regs.len(), usize::from(expect.count));

    // As `protocols::modbus::driver::decode_block` does with each tag's slot of the block.
    for data_type in TYPES {
        for length in [0, 1, string_length] {
            if data_type != DataType::String && length != 0 {
                continue;
            }
            let width = usize::from(register_count(data_type, length));
            for window in regs.windows(width) {
                for order in WordOrder::ALL {
                    let value = decode_registers(data_type, order, length, window);
                    let value = match value {
                        Ok(value) => value,
                        Err(e) => panic!("{data_type:?} {order:?} {length} {window:04X?}: {e}"),
                    };
                    let _ = apply_scaling(value.clone(), 1.0, 0.0);
                    let _ = apply_scaling(value.clone(), scale, -scale);
                    let _ = apply_scaling(value, 0.1, 273.15);
                }
            }
        }
    }
});
