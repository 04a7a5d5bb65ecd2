//! The Modbus TCP master's answer path on arbitrary received bytes: encode a request, check the
//! bytes as its answer (the header alone, then the whole ADU), slice the data as the TCP
//! transport does and turn it into registers or bits. Asserts what
//! `protocols::modbus::mbap` promises: never a panic, and an accepted answer carries the
//! request's transaction id, protocol id 0, its own length, the request's unit and function (or
//! its exception) and exactly the data asked for.
//!
//! Input layout: `[transaction: 2][unit][kind][count: 2][value: 2][received...]` (short inputs
//! are padded with zeros). `kind % 8` picks the request: 0-3 a read of coils, discrete inputs,
//! holding or input registers (`count` items), 4-7 a write of a coil, a register, `count`
//! registers of `value`, a mask. The received bytes are checked as they are, and once more
//! behind a valid header of the request (so that the PDU checks are reached often).

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::modbus::frame::{self, Answer};
use protocols::modbus::mbap::{self, Expected, HEADER_LEN, MAX_ADU};
use protocols::modbus::write::WritePlan;
use protocols::modbus::Area;

const AREAS: [Area; 4] = [
    Area::Coil,
    Area::DiscreteInput,
    Area::HoldingRegister,
    Area::InputRegister,
];

const HEADER: usize = 8;

/// Checks `adu` as the answer to `expected` and asserts what an accepted one must be.
fn check(adu: &[u8], expected: &Expected, read: Option<(Area, u16)>) {
    let rest = mbap::check_header(adu, expected);
    if let Ok(rest) = rest {
        assert!((1..=253).contains(&rest), "{rest}");
    }
    let Ok(answer) = mbap::check_answer(adu, expected) else {
        return;
    };
    assert_eq!(rest.map(|r| r + HEADER_LEN), Ok(adu.len()));
    assert!(adu.len() <= MAX_ADU);
    assert_eq!(u16::from_be_bytes([adu[0], adu[1]]), expected.transaction);
    assert_eq!(u16::from_be_bytes([adu[2], adu[3]]), 0);
    assert_eq!(usize::from(u16::from_be_bytes([adu[4], adu[5]])), adu.len() - 6);
    assert_eq!(adu[6], expected.unit);
    let (start, len) = match answer {
        Answer::Exception(_) => {
            assert_eq!(adu[HEADER_LEN], expected.function | 0x80);
            assert_eq!(adu.len(), HEADER_LEN + 2);
            return;
        }
        Answer::Data { start, len } => (start, len),
    };
    assert_eq!(adu[HEADER_LEN], expected.function);
    assert_eq!(start + len, adu.len());
    let Some((area, count)) = read else {
        return;
    };
    assert_eq!(len, frame::data_len(area, count));
    assert_eq!(usize::from(adu[HEADER_LEN + 1]), len);
    // As the TCP transport (`protocols::modbus::transport::tcp`) does with the answer.
    let data = &adu[start..start + len];
    if area.is_bit() {
        assert_eq!(frame::bits(data, count).len(), usize::from(count));
    } else {
        assert_eq!(frame::registers(data, count).len(), usize::from(count));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let n = data.len().min(HEADER);
    header[..n].copy_from_slice(&data[..n]);
    let received = &data[n..];

    let transaction = u16::from_le_bytes([header[0], header[1]]);
    let unit = header[2];
    let kind = usize::from(header[3] % 8);
    let count = u16::from_le_bytes([header[4], header[5]]);
    let value = u16::from_le_bytes([header[6], header[7]]);

    let mut request = Vec::new();
    let (expected, read) = match kind {
        0..=3 => {
            let area = AREAS[kind];
            let e = mbap::encode_read(transaction, unit, area, value, count, &mut request);
            (e, Some((area, count)))
        }
        _ => {
            let plan = match kind {
                4 => WritePlan::Coil(value & 1 == 1),
                5 => WritePlan::Register(value),
                6 => WritePlan::Registers(vec![value; usize::from(count % 200)]),
                _ => WritePlan::Mask {
                    and_mask: value,
                    or_mask: count,
                },
            };
            let e = mbap::encode_write(transaction, unit, count, &plan, &mut request);
            (e, None)
        }
    };
    assert!(request.len() <= MAX_ADU);
    assert_eq!(
        usize::from(u16::from_be_bytes([request[4], request[5]])),
        request.len() - 6
    );

    check(received, &expected, read);

    // The same bytes as the PDU behind a header that fits the request.
    let pdu = &received[..received.len().min(253)];
    let mut adu = Vec::with_capacity(HEADER_LEN + pdu.len());
    adu.extend_from_slice(&transaction.to_be_bytes());
    adu.extend_from_slice(&[0, 0]);
    adu.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    adu.push(unit);
    adu.extend_from_slice(pdu);
    check(&adu, &expected, read);
});
