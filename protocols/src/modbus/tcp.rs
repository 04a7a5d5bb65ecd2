//! Modbus TCP transport: connecting and one read through tokio-modbus.
//!
//! A connection that saw a timeout or a transport error is dropped by the line driver, never
//! reused: a late reply on a reused connection would be taken as the answer to the next
//! request (see [`super::link::Conn::drop_after_failed_read`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{tcp, Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use super::link::{BlockData, ReadError};
use super::Area;

/// Connects a TCP stream to `address` (`host:port`, every resolved address in turn).
pub async fn connect_stream(address: &str, timeout: Duration) -> Result<TcpStream, ReadError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| ReadError::Link(format!("cannot resolve {address}: {e}")))?
            .collect();
        let mut last = ReadError::Link(format!("{address} resolves to nothing"));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = ReadError::Link(format!("cannot connect to {addr}: {e}")),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::NoAnswer(timeout)),
    }
}

/// Connects a Modbus TCP client to `address`.
pub async fn connect(address: &str, timeout: Duration) -> Result<Context, ReadError> {
    let stream = connect_stream(address, timeout).await?;
    Ok(tcp::attach_slave(stream, Slave(1)))
}

/// Reads `count` items of `area` from `start` on unit `unit` under `timeout`.
pub async fn read(
    client: &mut Context,
    unit: u8,
    area: Area,
    start: u16,
    count: u16,
    timeout: Duration,
) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
    client.set_slave(Slave(unit));
    let request = async {
        Ok::<_, tokio_modbus::Error>(match area {
            Area::HoldingRegister => client
                .read_holding_registers(start, count)
                .await?
                .map(BlockData::Registers),
            Area::InputRegister => client
                .read_input_registers(start, count)
                .await?
                .map(BlockData::Registers),
            Area::Coil => client.read_coils(start, count).await?.map(BlockData::Bits),
            Area::DiscreteInput => client
                .read_discrete_inputs(start, count)
                .await?
                .map(BlockData::Bits),
        })
    };
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Err(ReadError::NoAnswer(timeout)),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(ReadError::Garbled(e.to_string())),
        Ok(Err(e)) => Err(ReadError::Link(e.to_string())),
        Ok(Ok(answer)) => Ok(answer),
    }
}
