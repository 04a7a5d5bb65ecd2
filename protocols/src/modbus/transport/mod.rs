//! One open Modbus line, whatever carries it: Modbus TCP, RTU over TCP or a serial port.

pub mod frame;
pub mod mbap;
pub(crate) mod rtu;
mod tcp;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_modbus::ExceptionCode;

use self::rtu::RtuLink;
use self::tcp::TcpConn;
use super::{Area, Link, ModbusSettings};

/// The data of one block read.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockData {
    /// Registers of a holding or input register read.
    Registers(Vec<u16>),
    /// Bits of a coil or discrete input read.
    Bits(Vec<bool>),
}

impl BlockData {
    /// The `count` values of an `area` read from an answer's data bytes (RTU and TCP alike).
    pub(crate) fn decode(area: Area, data: &[u8], count: u16) -> Self {
        if area.is_bit() {
            BlockData::Bits(frame::bits(data, count))
        } else {
            BlockData::Registers(frame::registers(data, count))
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            BlockData::Registers(r) => r.len(),
            BlockData::Bits(b) => b.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a read got no usable answer. "The device said no" is not here: an exception is an
/// answer (`Ok(Err(code))`).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The unit did not answer in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// Something arrived but it was no valid answer to the request.
    #[error("garbled answer: {0}")]
    Garbled(String),
    /// A Modbus TCP answer that is no answer to the request (a stale transaction id, another
    /// unit or function, a byte count or length that disagrees): garbled too, said precisely.
    #[error("garbled answer: {0}")]
    Mismatch(#[from] mbap::Mismatch),
    /// The port or connection failed; it has to be opened again.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// How a line failed: the port or connection is unusable and has to be opened again.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The host name of a TCP address did not resolve.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The configured `host:port`.
        address: String,
        /// What the resolver said.
        #[source]
        source: io::Error,
    },
    /// The host name resolved to no address at all.
    #[error("{address} resolves to nothing")]
    NoAddress {
        /// The configured `host:port`.
        address: String,
    },
    /// No TCP connection to any resolved address (the last attempt's error).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },
    /// The serial port did not open; `hint` says what an operator can do about it.
    #[error("cannot open {port}: {source}{hint}")]
    Open {
        /// The configured port path.
        port: String,
        /// What the serial port library said.
        #[source]
        source: tokio_serial::Error,
        /// Advice for the operator, empty when there is none.
        hint: &'static str,
    },
    /// A request could not be written.
    #[error("cannot send: {0}")]
    Send(#[source] io::Error),
    /// Reading from the line failed.
    #[error("cannot receive: {0}")]
    Receive(#[source] io::Error),
    /// The other end closed the line.
    #[error("the line was closed")]
    Closed,
    /// Bytes kept arriving, so no request could be sent.
    #[error("the line did not go quiet: {strays} stray bytes in {limit:?}")]
    NotQuiet {
        /// Bytes that arrived while waiting for silence.
        strays: usize,
        /// How long silence was waited for.
        limit: Duration,
    },
}

/// An open line.
#[derive(Debug)]
pub(crate) enum Conn {
    /// Modbus TCP, framed by the project ([`mbap`]).
    Tcp(TcpConn),
    /// RTU frames over a TCP connection to a converter.
    RtuOverTcp(RtuLink<tokio::net::TcpStream>),
    /// RTU frames on a serial port.
    Serial(RtuLink<tokio_serial::SerialStream>),
}

impl Conn {
    /// Opens the line described by `settings`.
    pub(crate) async fn open(settings: &ModbusSettings) -> Result<Conn, ReadError> {
        match &settings.link {
            Link::Tcp { address } => Ok(Conn::Tcp(
                TcpConn::connect(address, settings.timeout, settings.inter_request_delay).await?,
            )),
            Link::RtuOverTcp { address } => {
                let stream = tcp::connect_stream(address, settings.timeout).await?;
                Ok(Conn::RtuOverTcp(RtuLink::new(
                    stream,
                    None,
                    settings.inter_request_delay,
                    settings.timeout,
                )))
            }
            Link::Rtu(serial) => {
                let port = rtu::open_serial(serial)?;
                Ok(Conn::Serial(RtuLink::new(
                    port,
                    Some(rtu::timing(serial)),
                    settings.inter_request_delay,
                    settings.timeout,
                )))
            }
        }
    }

    /// Reads `count` items of `area` from `start` on unit `unit`. Answers shorter than asked
    /// for are garbled, never passed on.
    pub(crate) async fn read(
        &mut self,
        unit: u8,
        area: Area,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
        let answer = match self {
            Conn::Tcp(c) => c.read(unit, area, start, count, timeout).await?,
            Conn::RtuOverTcp(l) => l.read(unit, area, start, count, timeout).await?,
            Conn::Serial(l) => l.read(unit, area, start, count, timeout).await?,
        };
        if let Ok(data) = &answer {
            if data.len() < usize::from(count) {
                return Err(ReadError::Garbled(format!(
                    "answer holds {} values, {count} were asked for",
                    data.len()
                )));
            }
        }
        Ok(answer)
    }

    /// Performs one write on unit `unit`, on any kind of line.
    pub(crate) async fn write(
        &mut self,
        unit: u8,
        start: u16,
        plan: &super::write::WritePlan,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, ReadError> {
        match self {
            Conn::Tcp(c) => c.write(unit, start, plan, timeout).await,
            Conn::RtuOverTcp(l) => l.write(unit, start, plan, timeout).await,
            Conn::Serial(l) => l.write(unit, start, plan, timeout).await,
        }
    }

    /// Whether a read that got no valid answer leaves the line unusable. Modbus TCP connections
    /// are dropped after a timeout or a garbled answer: a late reply would meet the next
    /// request (its transaction id would expose it, but the connection is not worth keeping).
    /// RTU lines resynchronise by silence instead.
    pub(crate) fn drop_after_failed_read(&self) -> bool {
        matches!(self, Conn::Tcp(_))
    }

    /// Closes the line, politely where the protocol has a way to.
    pub(crate) async fn close(self) {
        if let Conn::Tcp(c) = self {
            c.close().await;
        }
    }
}
