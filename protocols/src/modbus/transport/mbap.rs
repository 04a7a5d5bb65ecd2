//! Modbus TCP framing (MBAP), free of I/O: encoding a request ADU and checking its answer.
//!
//! Why the project frames MBAP itself: tokio-modbus's TCP client kept a tokio-util `Framed`
//! with an 8 KiB read and an 8 KiB write buffer per connection, 1.64 MB for 100 devices, a tenth
//! of the 16 MB budget for 10k Modbus tags, while a Modbus TCP ADU is at most [`MAX_ADU`]
//! (260) bytes. The connection (`tcp.rs`) owns one buffer of that size, for its request and its
//! answer in turn.
//!
//! An ADU is `[transaction id: 2][protocol id: 2, 0][length: 2][unit][PDU]`, big-endian; the
//! length counts the unit and the PDU (at most 253 bytes), so it lies in 2..=[`MAX_LENGTH`]. The
//! PDU is the one an RTU frame carries between its unit and its CRC: it is encoded by `frame.rs`
//! for both transports.
//!
//! Invariants:
//! - A request carries the transaction id it is given, protocol id 0 and the length of what
//!   follows the length field; its encoder returns the [`Expected`] answer.
//! - [`check_header`] judges an answer's first [`HEADER_LEN`] bytes alone and says how many
//!   bytes follow, so the connection reads exactly one ADU, never a byte of the next one.
//! - [`check_answer`] accepts only an ADU that answers the request: the same transaction id
//!   (a different one is a stale answer, or another client's), protocol id 0, a length that is
//!   the ADU's own and at most [`MAX_LENGTH`], the same unit, and either the function asked for
//!   with exactly the data it calls for (a read: the byte count of the items asked for and
//!   that many bytes; a write: the echo its function calls for, see `frame::write_echo`) or
//!   that function with bit 7 set and one exception code. Anything else is a [`Mismatch`],
//!   never data.
//! - Nothing here panics, whatever the bytes (property tests below, fuzz target
//!   `modbus_tcp_answer`).

use super::frame::{self, Answer};
use crate::modbus::write::WritePlan;
use crate::modbus::Area;

/// Bytes of the MBAP header, unit id included.
pub const HEADER_LEN: usize = 7;

/// Largest length field: the unit id and a PDU of at most 253 bytes.
pub const MAX_LENGTH: u16 = 254;

/// Largest ADU: the header up to the length field, then [`MAX_LENGTH`] bytes.
pub const MAX_ADU: usize = HEADER_LEN - 1 + MAX_LENGTH as usize;

// The longest request (a write of the most registers) fits the largest ADU.
const _: () = assert!(HEADER_LEN + frame::MAX_WRITE_PDU <= MAX_ADU);

/// What the answer to one request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Transaction id of the request.
    pub transaction: u16,
    /// Unit id the request went to.
    pub unit: u8,
    /// Function code of the request.
    pub function: u8,
    body: Body,
}

/// The PDU of a normal answer after its function code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// A read's answer: a byte count of this many data bytes, then the data.
    Data(usize),
    /// A write's answer: these bytes of the request's PDU after its function code, echoed.
    Echo { bytes: [u8; 6], len: usize },
}

/// Why an ADU is no answer to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// Fewer bytes than an MBAP header.
    #[error("{0} bytes are no MBAP header")]
    TooShort(usize),
    /// The protocol id is not 0.
    #[error("protocol id {0} is not Modbus")]
    Protocol(u16),
    /// Another transaction id than the request's: a stale answer (or another client's).
    #[error("transaction id {got} where {sent} was sent: a stale answer")]
    Transaction {
        /// The request's.
        sent: u16,
        /// The answer's.
        got: u16,
    },
    /// The length field leaves no room for a function code, or exceeds [`MAX_LENGTH`].
    #[error("MBAP length {0} out of range")]
    Length(u16),
    /// The length field is not the length of the ADU.
    #[error("MBAP length {length} in an ADU of {bytes} bytes")]
    Size {
        /// The length field.
        length: u16,
        /// Bytes of the whole ADU.
        bytes: usize,
    },
    /// Another unit than the one asked.
    #[error("answer from unit {got} to a request to unit {sent}")]
    Unit {
        /// The request's.
        sent: u8,
        /// The answer's.
        got: u8,
    },
    /// Another function than the one asked for (or its exception).
    #[error("answer of function {got} to a request of function {sent}")]
    Function {
        /// The request's.
        sent: u8,
        /// The answer's.
        got: u8,
    },
    /// The byte count of a read's answer is not that of the items asked for.
    #[error("byte count {got} where {expected} bytes were asked for")]
    ByteCount {
        /// Data bytes the request calls for.
        expected: usize,
        /// The answer's byte count.
        got: u8,
    },
    /// The PDU's length is not what its function and byte count call for.
    #[error("a PDU of {len} bytes is no answer of function {function}")]
    PduLength {
        /// The answer's function code.
        function: u8,
        /// Bytes of the PDU.
        len: usize,
    },
    /// The answer to a write is not the echo the write calls for.
    #[error("the answer to a write of function {0} is not its echo")]
    Echo(u8),
}

/// Writes the ADU of a read of `count` items of `area` from `start` on unit `unit` into `out`,
/// with transaction id `transaction`; returns what its answer must be.
pub fn encode_read(
    transaction: u16,
    unit: u8,
    area: Area,
    start: u16,
    count: u16,
    out: &mut Vec<u8>,
) -> Expected {
    begin(transaction, unit, out);
    frame::push_read_pdu(area, start, count, out);
    finish(out);
    Expected {
        transaction,
        unit,
        function: frame::function_code(area),
        body: Body::Data(frame::data_len(area, count)),
    }
}

/// Writes the ADU of the write `plan` at `start` on unit `unit` into `out`, with transaction
/// id `transaction`; returns what its answer must be. Registers beyond
/// [`frame::MAX_WRITE_REGISTERS`] are cut, as in an RTU frame (the planner refuses them before).
pub fn encode_write(
    transaction: u16,
    unit: u8,
    start: u16,
    plan: &WritePlan,
    out: &mut Vec<u8>,
) -> Expected {
    begin(transaction, unit, out);
    frame::push_write_pdu(start, plan, out);
    finish(out);
    let pdu = &out[HEADER_LEN..];
    let echo = frame::echo_pdu_len(pdu.first().copied()).min(pdu.len());
    let mut bytes = [0u8; 6];
    // The echo is the PDU's first 5 or 7 bytes: the function code and at most 6 more.
    let len = echo.saturating_sub(1).min(bytes.len());
    bytes[..len].copy_from_slice(&pdu[1..=len]);
    Expected {
        transaction,
        unit,
        function: plan.function(),
        body: Body::Echo { bytes, len },
    }
}

/// Starts an ADU in `out`: the header with a length to be set by [`finish`].
fn begin(transaction: u16, unit: u8, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&transaction.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.push(unit);
}

/// Sets the length field of the ADU in `out` to the bytes after it.
fn finish(out: &mut [u8]) {
    // At most 1 + 252 bytes follow the length field (the longest write PDU).
    let length = u16::try_from(out.len() - (HEADER_LEN - 1)).unwrap_or(u16::MAX);
    out[4..6].copy_from_slice(&length.to_be_bytes());
}

/// Checks the MBAP header at the start of `adu` (the first [`HEADER_LEN`] bytes, the rest is
/// not looked at) against `expected`; returns the number of bytes of the ADU after the header.
pub fn check_header(adu: &[u8], expected: &Expected) -> Result<usize, Mismatch> {
    let Some(h) = adu.get(..HEADER_LEN) else {
        return Err(Mismatch::TooShort(adu.len()));
    };
    let transaction = u16::from_be_bytes([h[0], h[1]]);
    let protocol = u16::from_be_bytes([h[2], h[3]]);
    let length = u16::from_be_bytes([h[4], h[5]]);
    let unit = h[6];
    if protocol != 0 {
        return Err(Mismatch::Protocol(protocol));
    }
    if transaction != expected.transaction {
        return Err(Mismatch::Transaction {
            sent: expected.transaction,
            got: transaction,
        });
    }
    if !(2..=MAX_LENGTH).contains(&length) {
        return Err(Mismatch::Length(length));
    }
    if unit != expected.unit {
        return Err(Mismatch::Unit {
            sent: expected.unit,
            got: unit,
        });
    }
    Ok(usize::from(length) - 1)
}

/// Checks that `adu`, one whole ADU, is the answer `expected` describes; returns where its
/// data lies in `adu` (a read's data bytes, a write's echo after the function code) or the
/// exception code the unit answered.
pub fn check_answer(adu: &[u8], expected: &Expected) -> Result<Answer, Mismatch> {
    let rest = check_header(adu, expected)?;
    let pdu = &adu[HEADER_LEN..];
    if pdu.len() != rest {
        return Err(Mismatch::Size {
            length: u16::try_from(rest + 1).unwrap_or(u16::MAX),
            bytes: adu.len(),
        });
    }
    // The length is at least 2: the PDU holds a function code.
    let function = pdu[0];
    let wrong_length = Mismatch::PduLength {
        function,
        len: pdu.len(),
    };
    if function == expected.function | 0x80 {
        return match pdu {
            [_, code] => Ok(Answer::Exception(*code)),
            _ => Err(wrong_length),
        };
    }
    if function != expected.function {
        return Err(Mismatch::Function {
            sent: expected.function,
            got: function,
        });
    }
    match expected.body {
        Body::Data(len) => {
            let Some(&count) = pdu.get(1) else {
                return Err(wrong_length);
            };
            if usize::from(count) != len {
                return Err(Mismatch::ByteCount {
                    expected: len,
                    got: count,
                });
            }
            if pdu.len() != 2 + len {
                return Err(wrong_length);
            }
            Ok(Answer::Data {
                start: HEADER_LEN + 2,
                len,
            })
        }
        Body::Echo { bytes, len } => {
            if pdu.len() != 1 + len {
                return Err(wrong_length);
            }
            if pdu[1..] != bytes[..len] {
                return Err(Mismatch::Echo(function));
            }
            Ok(Answer::Data {
                start: HEADER_LEN + 1,
                len,
            })
        }
    }
}

#[cfg(test)]
#[path = "mbap_tests.rs"]
mod tests;
