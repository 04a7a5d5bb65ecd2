use super::*;
use proptest::prelude::*;

const AREAS: [Area; 4] = [
    Area::Coil,
    Area::DiscreteInput,
    Area::HoldingRegister,
    Area::InputRegister,
];

/// An ADU with transaction id `transaction`, unit `unit` and `pdu`, as a device sends it.
fn adu(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = transaction.to_be_bytes().to_vec();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

/// The PDU of a register read's normal answer.
fn registers_pdu(function: u8, regs: &[u16]) -> Vec<u8> {
    let mut pdu = vec![function, (regs.len() * 2) as u8];
    regs.iter()
        .for_each(|r| pdu.extend_from_slice(&r.to_be_bytes()));
    pdu
}

/// The PDU of a bit read's normal answer.
fn bits_pdu(function: u8, bits: &[bool]) -> Vec<u8> {
    let mut packed = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        packed[i / 8] |= 1 << (i % 8);
    }
    let mut pdu = vec![function, packed.len() as u8];
    pdu.extend_from_slice(&packed);
    pdu
}

/// The device's normal answer to the write request `request` (an ADU): its echo.
fn echo_of(request: &[u8]) -> Vec<u8> {
    let pdu = &request[HEADER_LEN..];
    let len = frame::echo_pdu_len(pdu.first().copied());
    adu(
        u16::from_be_bytes([request[0], request[1]]),
        request[6],
        &pdu[..len],
    )
}

fn read_expect(transaction: u16, unit: u8, area: Area, count: u16) -> Expected {
    encode_read(transaction, unit, area, 0, count, &mut Vec::new())
}

fn plans() -> Vec<WritePlan> {
    vec![
        WritePlan::Coil(true),
        WritePlan::Coil(false),
        WritePlan::Register(0xBEEF),
        WritePlan::Registers(vec![1, 2, 3]),
        WritePlan::Mask {
            and_mask: 0xFFF7,
            or_mask: 8,
        },
    ]
}

#[test]
fn a_read_request_carries_its_transaction_protocol_0_its_length_and_the_rtu_pdu() {
    let mut out = Vec::new();
    encode_read(0x1234, 0x11, Area::HoldingRegister, 0x006B, 3, &mut out);
    assert_eq!(
        out,
        [0x12, 0x34, 0, 0, 0, 6, 0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]
    );
    let mut rtu = Vec::new();
    frame::encode_read(0x11, Area::HoldingRegister, 0x006B, 3, &mut rtu);
    assert_eq!(out[HEADER_LEN..], rtu[1..rtu.len() - 2]);
}

#[test]
fn a_write_request_carries_the_pdu_of_the_rtu_frame() {
    for plan in plans() {
        let mut out = Vec::new();
        let expected = encode_write(7, 3, 0x0010, &plan, &mut out);
        let mut rtu = Vec::new();
        frame::encode_write(3, 0x0010, &plan, &mut rtu);
        assert_eq!(out[HEADER_LEN..], rtu[1..rtu.len() - 2], "{plan:?}");
        assert_eq!(
            usize::from(u16::from_be_bytes([out[4], out[5]])),
            out.len() - 6
        );
        assert_eq!((expected.transaction, expected.unit), (7, 3));
        assert_eq!(expected.function, plan.function());
    }
}

#[test]
fn the_longest_write_fits_the_largest_adu() {
    let plan = WritePlan::Registers(vec![0xAAAA; 200]);
    let mut out = Vec::new();
    encode_write(1, 1, 0, &plan, &mut out);
    assert_eq!(out.len(), HEADER_LEN + frame::MAX_WRITE_PDU);
    assert!(out.len() <= MAX_ADU);
    assert_eq!(out[HEADER_LEN + 5], (2 * frame::MAX_WRITE_REGISTERS) as u8);
}

#[test]
fn the_answer_to_a_read_is_accepted_with_its_data() {
    let expected = read_expect(9, 4, Area::InputRegister, 2);
    let answer = adu(9, 4, &registers_pdu(4, &[0x1234, 0x5678]));
    let Ok(Answer::Data { start, len }) = check_answer(&answer, &expected) else {
        panic!("{:?}", check_answer(&answer, &expected));
    };
    assert_eq!(
        frame::registers(&answer[start..start + len], 2),
        [0x1234, 0x5678]
    );

    let pattern = [
        true, false, true, true, false, false, false, true, false, true,
    ];
    let expected = read_expect(10, 4, Area::Coil, 10);
    let answer = adu(10, 4, &bits_pdu(1, &pattern));
    let Ok(Answer::Data { start, len }) = check_answer(&answer, &expected) else {
        panic!("{:?}", check_answer(&answer, &expected));
    };
    assert_eq!(frame::bits(&answer[start..start + len], 10), pattern);
}

#[test]
fn an_exception_is_an_answer_with_its_code() {
    let expected = read_expect(1, 2, Area::HoldingRegister, 5);
    assert_eq!(
        check_answer(&adu(1, 2, &[0x83, 0x02]), &expected),
        Ok(Answer::Exception(2))
    );
    // An exception of another function, or one with more than its code, is not.
    assert!(check_answer(&adu(1, 2, &[0x84, 0x02]), &expected).is_err());
    assert!(check_answer(&adu(1, 2, &[0x83, 0x02, 0x00]), &expected).is_err());
    assert!(check_answer(&adu(1, 2, &[0x83]), &expected).is_err());
}

#[test]
fn a_stale_answer_is_refused_however_valid_it_is_otherwise() {
    let expected = read_expect(100, 1, Area::HoldingRegister, 1);
    let stale = adu(99, 1, &registers_pdu(3, &[42]));
    assert_eq!(
        check_answer(&stale, &expected),
        Err(Mismatch::Transaction { sent: 100, got: 99 })
    );
    // Already from its header alone, before the rest is read.
    assert!(check_header(&stale[..HEADER_LEN], &expected).is_err());
}

#[test]
fn an_answer_of_another_unit_function_or_byte_count_is_refused() {
    let expected = read_expect(5, 1, Area::HoldingRegister, 2);
    let cases = [
        (
            adu(5, 2, &registers_pdu(3, &[1, 2])),
            Mismatch::Unit { sent: 1, got: 2 },
        ),
        (
            adu(5, 1, &registers_pdu(4, &[1, 2])),
            Mismatch::Function { sent: 3, got: 4 },
        ),
        (
            adu(5, 1, &registers_pdu(3, &[1])),
            Mismatch::ByteCount {
                expected: 4,
                got: 2,
            },
        ),
        (
            adu(5, 1, &registers_pdu(3, &[1, 2, 3])),
            Mismatch::ByteCount {
                expected: 4,
                got: 6,
            },
        ),
        (
            adu(5, 1, &[3, 4, 0, 1, 0]),
            Mismatch::PduLength {
                function: 3,
                len: 5,
            },
        ),
    ];
    for (answer, mismatch) in cases {
        assert_eq!(check_answer(&answer, &expected), Err(mismatch));
    }
}

#[test]
fn a_header_that_is_no_answer_is_refused_before_the_rest_is_read() {
    let expected = read_expect(5, 1, Area::HoldingRegister, 2);
    let header = |protocol: u16, length: u16| {
        let mut h = vec![0, 5];
        h.extend_from_slice(&protocol.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        h.push(1);
        h
    };
    assert_eq!(check_header(&header(0, 7), &expected), Ok(6));
    assert_eq!(
        check_header(&header(1, 7), &expected),
        Err(Mismatch::Protocol(1))
    );
    assert_eq!(
        check_header(&header(0, 1), &expected),
        Err(Mismatch::Length(1))
    );
    assert_eq!(
        check_header(&header(0, 255), &expected),
        Err(Mismatch::Length(255))
    );
    assert_eq!(
        check_header(&header(0, 7)[..6], &expected),
        Err(Mismatch::TooShort(6))
    );
    // A whole ADU whose length field disagrees with its size.
    let mut answer = adu(5, 1, &registers_pdu(3, &[1, 2]));
    answer.push(0);
    assert!(matches!(
        check_answer(&answer, &expected),
        Err(Mismatch::Size { .. })
    ));
}

#[test]
fn the_answer_to_a_write_is_its_echo_and_nothing_else() {
    for plan in plans() {
        let mut request = Vec::new();
        let expected = encode_write(3, 9, 0x0100, &plan, &mut request);
        let echo = echo_of(&request);
        assert!(
            matches!(check_answer(&echo, &expected), Ok(Answer::Data { .. })),
            "{plan:?}"
        );
        // The echo of another value, or of another address, is not its answer.
        let mut other = echo.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(
            check_answer(&other, &expected),
            Err(Mismatch::Echo(plan.function()))
        );
        let exception = adu(3, 9, &[plan.function() | 0x80, 4]);
        assert_eq!(
            check_answer(&exception, &expected),
            Ok(Answer::Exception(4))
        );
    }
    // A register write answered with the whole request (as a write of several registers is
    // not echoed) is no echo.
    let mut request = Vec::new();
    let expected = encode_write(3, 9, 0, &WritePlan::Registers(vec![1, 2]), &mut request);
    assert!(check_answer(&request, &expected).is_err());
}

proptest! {
    #[test]
    fn every_read_answer_a_device_encodes_is_accepted_with_its_values(
        transaction in any::<u16>(),
        unit in any::<u8>(),
        start in any::<u16>(),
        a in 0usize..4,
        values in proptest::collection::vec(any::<u16>(), 1..=125),
        bits in proptest::collection::vec(any::<bool>(), 1..=2000),
    ) {
        let area = AREAS[a];
        let mut request = Vec::new();
        let count = if area.is_bit() { bits.len() } else { values.len() } as u16;
        let expected = encode_read(transaction, unit, area, start, count, &mut request);
        prop_assert!(request.len() <= MAX_ADU);
        prop_assert_eq!(check_header(&request, &expected), Ok(request.len() - HEADER_LEN));
        let function = frame::function_code(area);
        let pdu = if area.is_bit() { bits_pdu(function, &bits) } else { registers_pdu(function, &values) };
        let answer = adu(transaction, unit, &pdu);
        let Ok(Answer::Data { start, len }) = check_answer(&answer, &expected) else {
            return Err(TestCaseError::fail(format!("{:?}", check_answer(&answer, &expected))));
        };
        let data = &answer[start..start + len];
        if area.is_bit() {
            prop_assert_eq!(frame::bits(data, count), bits);
        } else {
            prop_assert_eq!(frame::registers(data, count), values);
        }
    }

    #[test]
    fn every_write_is_answered_by_its_echo(
        transaction in any::<u16>(),
        unit in any::<u8>(),
        start in any::<u16>(),
        words in proptest::collection::vec(any::<u16>(), 1..=123),
        p in 0usize..4,
    ) {
        let plan = match p {
            0 => WritePlan::Coil(words[0] & 1 == 1),
            1 => WritePlan::Register(words[0]),
            2 => WritePlan::Registers(words),
            _ => WritePlan::Mask { and_mask: words[0], or_mask: !words[0] },
        };
        let mut request = Vec::new();
        let expected = encode_write(transaction, unit, start, &plan, &mut request);
        prop_assert!(request.len() <= MAX_ADU);
        let echo = echo_of(&request);
        let checked = check_answer(&echo, &expected);
        prop_assert!(matches!(checked, Ok(Answer::Data { .. })), "{:?}", checked);
    }

    #[test]
    fn any_bytes_never_panic_and_are_accepted_only_as_the_answer_asked_for(
        buf in proptest::collection::vec(any::<u8>(), 0..300),
        transaction in any::<u16>(),
        unit in any::<u8>(),
        count in 1u16..=2000,
        a in 0usize..5,
    ) {
        let expected = if a == 4 {
            encode_write(transaction, unit, 0, &WritePlan::Register(count), &mut Vec::new())
        } else {
            read_expect(transaction, unit, AREAS[a], count)
        };
        if let Ok(rest) = check_header(&buf, &expected) {
            prop_assert!((1..=253).contains(&rest));
        }
        if let Ok(answer) = check_answer(&buf, &expected) {
            prop_assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), transaction);
            prop_assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 0);
            prop_assert_eq!(usize::from(u16::from_be_bytes([buf[4], buf[5]])), buf.len() - 6);
            prop_assert_eq!(buf[6], unit);
            match answer {
                Answer::Exception(_) => prop_assert_eq!(buf[7], expected.function | 0x80),
                Answer::Data { start, len } => {
                    prop_assert_eq!(buf[7], expected.function);
                    prop_assert_eq!(start + len, buf.len());
                    if a < 4 {
                        prop_assert_eq!(usize::from(buf[8]), frame::data_len(AREAS[a], count));
                    }
                }
            }
        }
    }

    #[test]
    fn an_answer_with_any_one_header_field_changed_is_refused(
        transaction in any::<u16>(),
        unit in any::<u8>(),
        regs in proptest::collection::vec(any::<u16>(), 1..=125),
        field in 0usize..6,
        delta in 1u8..=255,
    ) {
        let expected = read_expect(transaction, unit, Area::HoldingRegister, regs.len() as u16);
        let mut answer = adu(transaction, unit, &registers_pdu(3, &regs));
        // Transaction id, protocol id, length, unit, function, byte count.
        let at = [1, 3, 5, 6, 7, 8][field];
        answer[at] = answer[at].wrapping_add(delta);
        prop_assert!(check_answer(&answer, &expected).is_err());
    }
}
