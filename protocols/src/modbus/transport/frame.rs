//! Modbus RTU framing, free of I/O: CRC-16, read requests, and a response finder that
//! resynchronises on a noisy line.
//!
//! An RTU frame is `[unit][function][data...][crc lo][crc hi]`; frames are separated by at least
//! 3.5 character times of silence. The master knows the exact length of the answer it expects,
//! so it does not need the silence to find a frame's end: [`find_response`] looks for a frame
//! from the expected unit with the expected function, byte count and a valid CRC anywhere in the
//! received bytes, and skips whatever precedes it (the tail of a late answer, line noise). A
//! frame that never becomes valid is reported when the deadline passes, and the line driver
//! waits for silence before the next request, so no stray byte reaches the next transaction.

use std::time::Duration;

use crate::modbus::Area;

/// Largest RTU frame: unit, function, 252 data bytes, CRC.
pub(crate) const MAX_FRAME: usize = 256;

/// Length of a read request frame.
pub(crate) const REQUEST_LEN: usize = 8;

/// Length of an exception response frame.
pub(crate) const EXCEPTION_LEN: usize = 5;

/// CRC-16/MODBUS (reflected polynomial 0xA001, initial value 0xFFFF); sent low byte first.
pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Whether `frame` ends with the CRC of the bytes before it.
pub fn crc_ok(frame: &[u8]) -> bool {
    let Some(split) = frame.len().checked_sub(2) else {
        return false;
    };
    if split == 0 {
        return false;
    }
    let (body, crc) = frame.split_at(split);
    crc16(body) == u16::from_le_bytes([crc[0], crc[1]])
}

/// Appends the CRC of everything in `frame` to it.
pub(crate) fn push_crc(frame: &mut Vec<u8>) {
    let crc = crc16(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

/// The read function code of an area.
pub(crate) fn function_code(area: Area) -> u8 {
    match area {
        Area::Coil => 0x01,
        Area::DiscreteInput => 0x02,
        Area::HoldingRegister => 0x03,
        Area::InputRegister => 0x04,
    }
}

/// The area a read function code reads, if it is one of the four read functions.
#[cfg(feature = "sim")]
pub(crate) fn area_of(function: u8) -> Option<Area> {
    match function {
        0x01 => Some(Area::Coil),
        0x02 => Some(Area::DiscreteInput),
        0x03 => Some(Area::HoldingRegister),
        0x04 => Some(Area::InputRegister),
        _ => None,
    }
}

/// Number of data bytes in the answer to a read of `count` items of `area`.
pub fn data_len(area: Area, count: u16) -> usize {
    if area.is_bit() {
        usize::from(count).div_ceil(8)
    } else {
        usize::from(count) * 2
    }
}

/// Length of the normal answer to a read of `count` items of `area`.
pub(crate) fn response_len(area: Area, count: u16) -> usize {
    3 + data_len(area, count) + 2
}

/// Writes the read request frame for `count` items of `area` from `start` into `out`.
pub(crate) fn encode_read(unit: u8, area: Area, start: u16, count: u16, out: &mut Vec<u8>) {
    out.clear();
    out.push(unit);
    out.push(function_code(area));
    out.extend_from_slice(&start.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    push_crc(out);
}

/// What the master expects back for one read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// Unit id the request went to.
    pub unit: u8,
    /// The area read.
    pub area: Area,
    /// Number of items asked for.
    pub count: u16,
}

/// A valid answer found in the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The data bytes of a normal answer (registers big-endian, bits least significant first).
    Data {
        /// Offset of the data bytes in the buffer.
        start: usize,
        /// Number of data bytes.
        len: usize,
    },
    /// An exception answer with its code.
    Exception(u8),
}

/// The result of looking for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No complete valid answer yet; more bytes may complete one.
    Incomplete,
    /// A valid answer; `end` is the offset just past its CRC, `skipped` the bytes before it
    /// that were not part of it.
    Answer {
        /// What the unit said.
        answer: Answer,
        /// Number of bytes not belonging to the answer at the start of the buffer.
        skipped: usize,
        /// Offset just past the answer.
        end: usize,
    },
}

/// Looks for the answer to `expect` in `buf`, skipping bytes that cannot start it.
///
/// A candidate start is a byte equal to the unit id followed by the function code (or the
/// function code with bit 7 set, an exception) and, for a normal answer, the exact byte count;
/// it is accepted only with a valid CRC. A candidate still too short keeps the search at
/// [`Found::Incomplete`], so later bytes can complete it; a candidate that proves invalid is
/// skipped and the search goes on after its first byte.
pub fn find_response(buf: &[u8], expect: Expect) -> Found {
    let function = function_code(expect.area);
    let data = data_len(expect.area, expect.count);
    let normal_len = 3 + data + 2;
    for i in 0..buf.len() {
        let rest = &buf[i..];
        if rest[0] != expect.unit {
            continue;
        }
        let Some(&f) = rest.get(1) else {
            break;
        };
        if f == function {
            let Some(&byte_count) = rest.get(2) else {
                break;
            };
            if usize::from(byte_count) != data {
                continue;
            }
            match rest.get(..normal_len) {
                Some(frame) if crc_ok(frame) => {
                    return Found::Answer {
                        answer: Answer::Data {
                            start: i + 3,
                            len: data,
                        },
                        skipped: i,
                        end: i + normal_len,
                    };
                }
                _ => {}
            }
        } else if f == function | 0x80 {
            match rest.get(..EXCEPTION_LEN) {
                Some(frame) if crc_ok(frame) => {
                    return Found::Answer {
                        answer: Answer::Exception(frame[2]),
                        skipped: i,
                        end: i + EXCEPTION_LEN,
                    };
                }
                _ => {}
            }
        }
        // An incomplete candidate may still turn out valid, but a later start can too: keep
        // looking, so a complete valid frame behind a false start is not missed.
    }
    Found::Incomplete
}

/// Registers of a normal answer's data bytes (big-endian pairs).
pub fn registers(data: &[u8], count: u16) -> Vec<u16> {
    data.chunks_exact(2)
        .take(usize::from(count))
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect()
}

/// Bits of a normal answer's data bytes (least significant bit of the first byte first).
pub fn bits(data: &[u8], count: u16) -> Vec<bool> {
    (0..usize::from(count))
        .filter_map(|i| data.get(i / 8).map(|b| b >> (i % 8) & 1 == 1))
        .collect()
}

/// A read request as a slave sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Addressed unit id.
    pub unit: u8,
    /// Function code.
    pub function: u8,
    /// First address.
    pub start: u16,
    /// Number of items.
    pub count: u16,
}

/// Parses a read request (functions 1-4) at the start of `buf`, for simulators.
/// Returns the request and its length, `Ok(None)` when more bytes are needed, `Err(())` when
/// the bytes cannot be a read request with a valid CRC.
#[allow(clippy::result_unit_err)]
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, ()> {
    let Some(frame) = buf.get(..REQUEST_LEN) else {
        return Ok(None);
    };
    if !crc_ok(frame) {
        return Err(());
    }
    Ok(Some(Request {
        unit: frame[0],
        function: frame[1],
        start: u16::from_be_bytes([frame[2], frame[3]]),
        count: u16::from_be_bytes([frame[4], frame[5]]),
    }))
}

/// Writes a normal register answer frame, for simulators.
#[cfg(any(test, feature = "sim"))]
pub(crate) fn encode_registers(unit: u8, function: u8, regs: &[u16], out: &mut Vec<u8>) {
    out.clear();
    out.push(unit);
    out.push(function);
    out.push(u8::try_from(regs.len() * 2).unwrap_or(u8::MAX));
    for r in regs {
        out.extend_from_slice(&r.to_be_bytes());
    }
    push_crc(out);
}

/// Writes a normal bit answer frame, for simulators.
#[cfg(any(test, feature = "sim"))]
pub(crate) fn encode_bits(unit: u8, function: u8, bits: &[bool], out: &mut Vec<u8>) {
    out.clear();
    out.push(unit);
    out.push(function);
    let len = bits.len().div_ceil(8);
    out.push(u8::try_from(len).unwrap_or(u8::MAX));
    let mut packed = vec![0u8; len];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            packed[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&packed);
    push_crc(out);
}

/// Writes an exception answer frame, for simulators.
#[cfg(any(test, feature = "sim"))]
pub(crate) fn encode_exception(unit: u8, function: u8, code: u8, out: &mut Vec<u8>) {
    out.clear();
    out.push(unit);
    out.push(function | 0x80);
    out.push(code);
    push_crc(out);
}

/// Character and gap times of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    /// Time to send one character.
    pub char_time: Duration,
    /// Longest gap allowed inside a frame (1.5 characters; 750 us above 19200 baud).
    pub t15: Duration,
    /// Silence that ends a frame (3.5 characters; 1750 us above 19200 baud).
    pub t35: Duration,
}

impl LineTiming {
    /// The timing of a line at `baud` with `bits_per_char` bits per character, per the Modbus
    /// serial line specification (fixed gaps above 19200 baud).
    pub fn new(baud: u32, bits_per_char: u32) -> Self {
        let baud = baud.max(1);
        let char_time =
            Duration::from_nanos(u64::from(bits_per_char) * 1_000_000_000 / u64::from(baud));
        let (t15, t35) = if baud > 19_200 {
            (Duration::from_micros(750), Duration::from_micros(1750))
        } else {
            (char_time.mul_f64(1.5), char_time.mul_f64(3.5))
        };
        LineTiming {
            char_time,
            t15,
            t35,
        }
    }

    /// Time to send `chars` characters.
    pub fn chars(&self, chars: usize) -> Duration {
        self.char_time * u32::try_from(chars).unwrap_or(u32::MAX)
    }

    /// The most registers per second a master can read with `count`-register requests: each
    /// transaction is an 8-byte request, a t3.5 gap, the answer and another t3.5 gap.
    pub fn max_registers_per_second(&self, count: u16) -> f64 {
        let per_transaction =
            self.chars(REQUEST_LEN + response_len(Area::HoldingRegister, count)) + self.t35 * 2;
        f64::from(count) / per_transaction.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc_matches_the_specification_example() {
        // Read holding registers 0x006B x3 from unit 0x11: CRC 0x8776, sent as 76 87.
        let mut frame = Vec::new();
        encode_read(0x11, Area::HoldingRegister, 0x006B, 3, &mut frame);
        assert_eq!(frame, [0x11, 0x03, 0x00, 0x6B, 0x00, 0x03, 0x76, 0x87]);
        assert!(crc_ok(&frame));
    }

    #[test]
    fn finds_an_answer_behind_garbage_and_a_late_frame_of_another_unit() {
        let expect = Expect {
            unit: 3,
            area: Area::HoldingRegister,
            count: 2,
        };
        let mut late = Vec::new();
        encode_registers(7, 3, &[1, 2], &mut late);
        let mut answer = Vec::new();
        encode_registers(3, 3, &[0x1234, 0x5678], &mut answer);
        let mut buf = vec![0x03, 0xFF, 0x00];
        buf.extend_from_slice(&late);
        buf.extend_from_slice(&answer);
        match find_response(&buf, expect) {
            Found::Answer {
                answer: Answer::Data { start, len },
                skipped,
                end,
            } => {
                assert_eq!(skipped, 3 + late.len());
                assert_eq!(end, buf.len());
                assert_eq!(registers(&buf[start..start + len], 2), [0x1234, 0x5678]);
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn a_late_answer_of_the_same_unit_with_another_length_is_skipped() {
        let expect = Expect {
            unit: 3,
            area: Area::HoldingRegister,
            count: 1,
        };
        let mut late = Vec::new();
        encode_registers(3, 3, &[9, 9, 9], &mut late);
        let mut answer = Vec::new();
        encode_registers(3, 3, &[42], &mut answer);
        let buf = [late.clone(), answer].concat();
        let Found::Answer {
            answer: Answer::Data { start, .. },
            skipped,
            ..
        } = find_response(&buf, expect)
        else {
            panic!("no answer found");
        };
        assert_eq!(skipped, late.len());
        assert_eq!(registers(&buf[start..start + 2], 1), [42]);
    }

    #[test]
    fn a_frame_with_a_bad_crc_is_not_an_answer() {
        let expect = Expect {
            unit: 1,
            area: Area::InputRegister,
            count: 1,
        };
        let mut answer = Vec::new();
        encode_registers(1, 4, &[7], &mut answer);
        answer[3] ^= 0x01;
        assert_eq!(find_response(&answer, expect), Found::Incomplete);
    }

    #[test]
    fn exceptions_and_bits_are_decoded() {
        let mut buf = Vec::new();
        encode_exception(5, 2, 2, &mut buf);
        let expect = Expect {
            unit: 5,
            area: Area::DiscreteInput,
            count: 10,
        };
        assert!(matches!(
            find_response(&buf, expect),
            Found::Answer {
                answer: Answer::Exception(2),
                ..
            }
        ));
        let pattern = [
            true, false, true, true, false, false, false, true, false, true,
        ];
        encode_bits(5, 2, &pattern, &mut buf);
        let Found::Answer {
            answer: Answer::Data { start, len },
            ..
        } = find_response(&buf, expect)
        else {
            panic!("no answer");
        };
        assert_eq!(len, 2);
        assert_eq!(bits(&buf[start..start + len], 10), pattern);
    }

    #[test]
    fn the_issue_figures_for_line_capacity_hold() {
        // 8E1 (11 bits per character), 125-register reads.
        let slow = LineTiming::new(19_200, 11).max_registers_per_second(125);
        let fast = LineTiming::new(115_200, 11).max_registers_per_second(125);
        assert!((slow - 808.0).abs() < 1.0, "{slow}");
        assert!((fast - 4369.0).abs() < 2.0, "{fast}");
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic_and_an_answer_lies_inside_the_buffer(
            buf in proptest::collection::vec(any::<u8>(), 0..300),
            unit in any::<u8>(),
            count in 1u16..=125,
            bit in any::<bool>(),
        ) {
            let area = if bit { Area::Coil } else { Area::HoldingRegister };
            let expect = Expect { unit, area, count };
            if let Found::Answer { answer, skipped, end } = find_response(&buf, expect) {
                prop_assert!(skipped < end && end <= buf.len());
                prop_assert!(crc_ok(&buf[skipped..end]));
                if let Answer::Data { start, len } = answer {
                    prop_assert_eq!(len, data_len(area, count));
                    prop_assert!(start + len + 2 == end);
                }
            }
            let _ = parse_request(&buf);
        }

        #[test]
        fn an_encoded_answer_is_found_after_any_prefix(
            prefix in proptest::collection::vec(any::<u8>(), 0..40),
            regs in proptest::collection::vec(any::<u16>(), 1..=125),
            unit in 1u8..=247,
        ) {
            let mut frame = Vec::new();
            encode_registers(unit, 3, &regs, &mut frame);
            let buf = [prefix.clone(), frame].concat();
            let expect = Expect { unit, area: Area::HoldingRegister, count: regs.len() as u16 };
            match find_response(&buf, expect) {
                Found::Answer { answer: Answer::Data { start, len }, .. } => {
                    // A false start inside random prefix bytes with a valid CRC is possible in
                    // principle (1 in 65536 per candidate); the found data must then still
                    // have the right length. With the real frame last, the usual case is it.
                    prop_assert_eq!(len, regs.len() * 2);
                    if start == prefix.len() + 3 {
                        prop_assert_eq!(registers(&buf[start..start + len], regs.len() as u16), regs);
                    }
                }
                other => prop_assert!(false, "no answer: {:?}", other),
            }
        }

        #[test]
        fn requests_round_trip(unit in any::<u8>(), start in any::<u16>(), count in any::<u16>(), a in 0usize..4) {
            let area = [Area::Coil, Area::DiscreteInput, Area::HoldingRegister, Area::InputRegister][a];
            let mut frame = Vec::new();
            encode_read(unit, area, start, count, &mut frame);
            let req = parse_request(&frame).ok().flatten();
            prop_assert_eq!(req, Some(Request { unit, function: function_code(area), start, count }));
        }
    }
}
