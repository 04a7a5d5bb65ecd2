//! Modbus TCP transport: connecting and one read through tokio-modbus.
//!
//! A connection that saw a timeout or a transport error is dropped by the line driver, never
//! reused: a late reply on a reused connection would be taken as the answer to the next
//! request (see [`super::Conn::drop_after_failed_read`]).
//!
//! An answer that is no valid answer to the request (wrong header, function code, byte count or
//! number of values, undecodable PDU) is garbled, never a link failure and never passed on.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{tcp, Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use super::{BlockData, LinkError, ReadError};
use crate::modbus::write::WritePlan;
use crate::modbus::Area;

/// Connects a TCP stream to `address` (`host:port`, every resolved address in turn).
pub(crate) async fn connect_stream(
    address: &str,
    timeout: Duration,
) -> Result<TcpStream, ReadError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|source| LinkError::Resolve {
                address: address.to_owned(),
                source,
            })?
            .collect();
        let mut last = LinkError::NoAddress {
            address: address.to_owned(),
        };
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(source) => last = LinkError::Connect { addr, source },
            }
        }
        Err(ReadError::Link(last))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::NoAnswer(timeout)),
    }
}

/// Connects a Modbus TCP client to `address`.
pub(crate) async fn connect(address: &str, timeout: Duration) -> Result<Context, ReadError> {
    let stream = connect_stream(address, timeout).await?;
    Ok(tcp::attach_slave(stream, Slave(1)))
}

/// Reads `count` items of `area` from `start` on unit `unit` under `timeout`.
pub(crate) async fn read(
    client: &mut Context,
    unit: u8,
    area: Area,
    start: u16,
    count: u16,
    timeout: Duration,
) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
    client.set_slave(Slave(unit));
    let request = match area {
        Area::HoldingRegister => Request::ReadHoldingRegisters(start, count),
        Area::InputRegister => Request::ReadInputRegisters(start, count),
        Area::Coil => Request::ReadCoils(start, count),
        Area::DiscreteInput => Request::ReadDiscreteInputs(start, count),
    };
    // `call`, not tokio-modbus's `Reader` methods: those `debug_assert` that the answer holds as
    // many values as asked for (a device answering fewer or more panicked the line's task in
    // debug builds) and pass on surplus values unchecked; `answer_data` checks the count.
    match tokio::time::timeout(timeout, client.call(request)).await {
        Err(_) => Err(ReadError::NoAnswer(timeout)),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(ReadError::Garbled(e.to_string())),
        Ok(Err(tokio_modbus::Error::Transport(e))) if undecodable(&e) => {
            Err(ReadError::Undecodable(e))
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => Err(LinkError::Transport(e).into()),
        Ok(Ok(Err(code))) => Ok(Err(code)),
        Ok(Ok(Ok(response))) => answer_data(response, count).map(Ok),
    }
}

/// Performs one write (`plan`, at `start`) on unit `unit` under `timeout`; `Ok(Ok(()))` when
/// the device echoed it.
pub(crate) async fn write(
    client: &mut Context,
    unit: u8,
    start: u16,
    plan: &WritePlan,
    timeout: Duration,
) -> Result<Result<(), ExceptionCode>, ReadError> {
    client.set_slave(Slave(unit));
    let request = match plan {
        WritePlan::Coil(on) => Request::WriteSingleCoil(start, *on),
        WritePlan::Register(r) => Request::WriteSingleRegister(start, *r),
        WritePlan::Registers(regs) => {
            Request::WriteMultipleRegisters(start, std::borrow::Cow::Borrowed(regs))
        }
        WritePlan::Mask { and_mask, or_mask } => {
            Request::MaskWriteRegister(start, *and_mask, *or_mask)
        }
    };
    match tokio::time::timeout(timeout, client.call(request)).await {
        Err(_) => Err(ReadError::NoAnswer(timeout)),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(ReadError::Garbled(e.to_string())),
        Ok(Err(tokio_modbus::Error::Transport(e))) if undecodable(&e) => {
            Err(ReadError::Undecodable(e))
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => Err(LinkError::Transport(e).into()),
        Ok(Ok(Err(code))) => Ok(Err(code)),
        Ok(Ok(Ok(response))) if response.function_code().value() == plan.function() => Ok(Ok(())),
        Ok(Ok(Ok(other))) => Err(ReadError::Garbled(format!(
            "answer of function {} to a write of function {}",
            other.function_code(),
            plan.function()
        ))),
    }
}

/// Whether a transport error is tokio-modbus's decoder refusing a frame that came (a byte count
/// that disagrees with the data, a PDU too short or too long): the device answered, wrongly,
/// which is a protocol error of that unit, not a failed link that takes every unit of the line
/// down (the connection is dropped all the same). Socket errors carry an OS error code; the
/// decoder's never do.
fn undecodable(e: &io::Error) -> bool {
    e.raw_os_error().is_none()
        && matches!(
            e.kind(),
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
        )
}

/// The values of a read answer, if it holds exactly the `count` values asked for.
fn answer_data(response: Response, count: u16) -> Result<BlockData, ReadError> {
    let count = usize::from(count);
    match response {
        Response::ReadHoldingRegisters(regs) | Response::ReadInputRegisters(regs) => {
            if regs.len() == count {
                Ok(BlockData::Registers(regs))
            } else {
                Err(ReadError::Garbled(format!(
                    "answer holds {} registers, {count} were asked for",
                    regs.len()
                )))
            }
        }
        Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits) => {
            // tokio-modbus unpacks every byte of the byte count: 8 bits each.
            let bytes = count.div_ceil(8);
            if bits.len() == bytes * 8 {
                bits.truncate(count);
                Ok(BlockData::Bits(bits))
            } else {
                Err(ReadError::Garbled(format!(
                    "answer holds {} bytes of bits, {bytes} were asked for",
                    bits.len() / 8
                )))
            }
        }
        other => Err(ReadError::Garbled(format!(
            "answer of function {} to a read",
            other.function_code()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_must_hold_exactly_the_values_asked_for() {
        let regs = |n| Response::ReadHoldingRegisters(vec![7; n]);
        assert_eq!(
            answer_data(regs(3), 3).expect("a complete answer"),
            BlockData::Registers(vec![7; 3])
        );
        assert!(matches!(
            answer_data(regs(2), 3),
            Err(ReadError::Garbled(_))
        ));
        assert!(matches!(
            answer_data(regs(4), 3),
            Err(ReadError::Garbled(_))
        ));
        // Bits come unpacked from whole bytes: 3 coils are one byte, 8 bits.
        let bits = |n| Response::ReadCoils(vec![true; n]);
        assert_eq!(
            answer_data(bits(8), 3).expect("a complete answer"),
            BlockData::Bits(vec![true; 3])
        );
        assert!(matches!(
            answer_data(bits(0), 3),
            Err(ReadError::Garbled(_))
        ));
        assert!(matches!(
            answer_data(bits(16), 3),
            Err(ReadError::Garbled(_))
        ));
        assert!(matches!(
            answer_data(Response::ReadInputRegisters(vec![1]), 2),
            Err(ReadError::Garbled(_))
        ));
    }

    #[test]
    fn decoder_errors_are_garbled_answers_and_socket_errors_are_not() {
        assert!(undecodable(&io::Error::new(
            io::ErrorKind::InvalidData,
            "undecoded response data"
        )));
        assert!(undecodable(&io::Error::from(io::ErrorKind::UnexpectedEof)));
        // EINVAL from a socket is of kind InvalidInput too, but no answer came.
        let einval = io::Error::from_raw_os_error(22);
        assert_eq!(einval.kind(), io::ErrorKind::InvalidInput);
        assert!(!undecodable(&einval));
        assert!(!undecodable(&io::Error::from(
            io::ErrorKind::ConnectionReset
        )));
        assert!(!undecodable(&io::Error::other("bytes remaining on stream")));
    }
}
