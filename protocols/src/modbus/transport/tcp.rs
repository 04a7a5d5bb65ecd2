//! Modbus TCP transport: connecting, and one transaction at a time on a connection, framed
//! by [`super::mbap`] (the module says why the project frames MBAP itself).
//!
//! Invariants:
//! - One transaction at a time: the request ADU is written whole, then exactly one answer ADU is
//!   read: its 7-byte header, then exactly the `length - 1` bytes it announces, into the
//!   connection's one buffer of at most [`mbap::MAX_ADU`] bytes (it never grows beyond that:
//!   the header is checked before the rest is read). All of it runs under the request's
//!   timeout.
//! - Each request carries the connection's next transaction id; an answer with another one is
//!   a stale answer, garbled like every answer that is not a valid answer to the request
//!   (wrong header, unit, function, byte count, echo), never passed on.
//! - A connection that saw a timeout, a garbled answer or a transport error is dropped by the
//!   line driver, never reused: a late reply on a reused connection would meet the next request
//!   (see [`super::Conn::drop_after_failed_read`]). The transaction id check catches it all the
//!   same.
//! - An exception answer is an answer: `Ok(Err(code))`.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_modbus::ExceptionCode;

use super::frame::Answer;
use super::{mbap, BlockData, LinkError, ReadError};
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

/// A Modbus TCP connection, its transaction counter and the pacing of its requests.
pub(crate) struct TcpConn {
    stream: TcpStream,
    /// Transaction id of the last request.
    transaction: u16,
    /// The request, then its answer: at most [`mbap::MAX_ADU`] bytes, allocated once.
    buf: Vec<u8>,
    inter_request_delay: Duration,
    last_answer: Instant,
}

impl std::fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConn")
            .field("transaction", &self.transaction)
            .field("inter_request_delay", &self.inter_request_delay)
            .finish_non_exhaustive()
    }
}

impl TcpConn {
    /// Connects to `address` (`host:port`) under `timeout`; requests are paced
    /// `inter_request_delay` after the last answer.
    pub(crate) async fn connect(
        address: &str,
        timeout: Duration,
        inter_request_delay: Duration,
    ) -> Result<TcpConn, ReadError> {
        let stream = connect_stream(address, timeout).await?;
        Ok(TcpConn {
            stream,
            transaction: 0,
            buf: Vec::with_capacity(mbap::MAX_ADU),
            inter_request_delay,
            last_answer: Instant::now(),
        })
    }

    /// Reads `count` items of `area` from `start` on unit `unit` under `timeout`.
    pub(crate) async fn read(
        &mut self,
        unit: u8,
        area: Area,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
        self.pace().await;
        let transaction = self.next_transaction();
        let expected = mbap::encode_read(transaction, unit, area, start, count, &mut self.buf);
        Ok(match self.transact(&expected, timeout).await? {
            Answer::Exception(code) => Err(ExceptionCode::new(code)),
            Answer::Data { start, len } => {
                let data = self.buf.get(start..start + len).unwrap_or_default();
                Ok(BlockData::decode(area, data, count))
            }
        })
    }

    /// Performs one write (`plan`, at `start`) on unit `unit` under `timeout`; `Ok(Ok(()))`
    /// when the device echoed it.
    pub(crate) async fn write(
        &mut self,
        unit: u8,
        start: u16,
        plan: &WritePlan,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, ReadError> {
        self.pace().await;
        let transaction = self.next_transaction();
        let expected = mbap::encode_write(transaction, unit, start, plan, &mut self.buf);
        Ok(match self.transact(&expected, timeout).await? {
            Answer::Exception(code) => Err(ExceptionCode::new(code)),
            Answer::Data { .. } => Ok(()),
        })
    }

    /// Closes the connection (FIN), waiting briefly for it.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.stream.shutdown()).await;
    }

    /// Waits until `inter_request_delay` has passed since the last answer.
    async fn pace(&self) {
        if !self.inter_request_delay.is_zero() {
            tokio::time::sleep_until((self.last_answer + self.inter_request_delay).into()).await;
        }
    }

    fn next_transaction(&mut self) -> u16 {
        self.transaction = self.transaction.wrapping_add(1);
        self.transaction
    }

    /// Sends the request ADU in `self.buf` and reads one answer ADU into it under `timeout`;
    /// returns what [`mbap::check_answer`] found in it.
    async fn transact(
        &mut self,
        expected: &mbap::Expected,
        timeout: Duration,
    ) -> Result<Answer, ReadError> {
        let exchange = async {
            self.stream
                .write_all(&self.buf)
                .await
                .map_err(LinkError::Send)?;
            self.buf.clear();
            self.buf.resize(mbap::HEADER_LEN, 0);
            self.stream
                .read_exact(&mut self.buf)
                .await
                .map_err(receive_error)?;
            let rest = mbap::check_header(&self.buf, expected)?;
            self.buf.resize(mbap::HEADER_LEN + rest, 0);
            self.stream
                .read_exact(&mut self.buf[mbap::HEADER_LEN..])
                .await
                .map_err(receive_error)?;
            Ok(mbap::check_answer(&self.buf, expected)?)
        };
        let answer = tokio::time::timeout(timeout, exchange).await;
        self.last_answer = Instant::now();
        answer.unwrap_or(Err(ReadError::NoAnswer(timeout)))
    }
}

/// How long closing a connection may take.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// The link error of a failed read: the other end closing is [`LinkError::Closed`].
fn receive_error(e: io::Error) -> LinkError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        LinkError::Closed
    } else {
        LinkError::Receive(e)
    }
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
