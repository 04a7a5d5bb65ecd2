//! The RTU master side of a line: one transaction at a time over a serial port or a TCP
//! connection to a serial converter.
//!
//! Invariants:
//! - Before every request the line has been silent for the gap (t3.5 on a serial line, or the
//!   configured `inter_request_delay` if longer). Bytes arriving meanwhile are strays (a late
//!   answer, noise) and are discarded; each one restarts the silence. So a late frame never
//!   reaches the next transaction.
//! - Bytes already waiting when a request is due are strays too: they are drained first.
//! - After a transaction that got no valid answer the line must be silent for a whole timeout
//!   before the next request, so the answer of a unit that is merely late lands in the guard
//!   and is thrown away instead of colliding with the next unit's answer. (The line driver
//!   also holds the failed unit back for [`HOLD_OFF_TIMEOUTS`] timeouts; see `driver.rs`.)
//! - An answer is accepted only from the addressed unit, with the requested function, the
//!   exact byte count and a valid CRC ([`frame::find_response`]); the answer to a write only as
//!   the exact echo the request calls for, or an exception ([`frame::find_write_response`]).
//!   Bytes before it are counted as discarded.
//! - A write is one transaction like a read: the same silences before it, the same guard after
//!   a failed one.
//! - A line that never goes quiet, an I/O error or end of file is a link failure: the driver
//!   closes the port or connection and opens it again.

use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_modbus::ExceptionCode;

use super::frame::{self, Answer, Expect, Found, LineTiming};
use super::{BlockData, LinkError, ReadError};
use crate::modbus::write::WritePlan;
use crate::modbus::{Area, Parity, SerialSettings};

/// Received bytes kept while looking for an answer; the longest frame is 256 bytes.
const MAX_BUFFERED: usize = 4 * frame::MAX_FRAME;

/// After a unit failed to answer, it is not addressed again for this many timeouts: any frame
/// it sends meanwhile reaches another unit's transaction (and is skipped for its unit id) or a
/// silence wait (and is discarded). Together with the guard, an answer up to
/// `HOLD_OFF_TIMEOUTS + 1` timeouts late can never be taken for a later request's answer.
pub(crate) const HOLD_OFF_TIMEOUTS: u32 = 4;

/// Timer granularity: a sleep may end this much after its deadline.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// The master end of an RTU line over any byte stream.
#[derive(Debug)]
pub(crate) struct RtuLink<T> {
    io: T,
    /// Time to send one character, zero when the stream is not a serial port.
    char_time: Duration,
    /// Silence required before each request.
    gap: Duration,
    /// Silence required after a transaction that failed: a whole timeout.
    quiet_after_failure: Duration,
    /// When the last byte was sent or received.
    last_activity: Instant,
    /// Whether the last transaction got no valid answer.
    failed: bool,
    request: Vec<u8>,
    buf: Vec<u8>,
    discarded: u64,
}

impl<T: AsyncRead + AsyncWrite + Unpin> RtuLink<T> {
    /// A link over `io`. `timing` is the serial line's timing (`None` over TCP, where the
    /// converter does the serial timing); `inter_request_delay` and `timeout` come from the
    /// line's settings.
    pub(crate) fn new(
        io: T,
        timing: Option<LineTiming>,
        inter_request_delay: Duration,
        timeout: Duration,
    ) -> Self {
        let t35 = timing.map_or(Duration::ZERO, |t| t.t35);
        let gap = t35.max(inter_request_delay);
        RtuLink {
            io,
            char_time: timing.map_or(Duration::ZERO, |t| t.char_time),
            gap,
            quiet_after_failure: gap.max(timeout),
            last_activity: Instant::now(),
            failed: false,
            request: Vec::with_capacity(frame::REQUEST_LEN),
            buf: Vec::with_capacity(MAX_BUFFERED),
            discarded: 0,
        }
    }

    /// Bytes thrown away so far: strays between transactions and garbage before answers.
    #[cfg(test)]
    fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Reads `count` items of `area` from `start` on unit `unit`.
    pub(crate) async fn read(
        &mut self,
        unit: u8,
        area: Area,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
        frame::encode_read(unit, area, start, count, &mut self.request);
        let expect = Expect { unit, area, count };
        let answer = self.transact(Awaited::Read(expect), timeout).await?;
        Ok(match answer {
            Err(code) => Err(ExceptionCode::new(code)),
            Ok((start, len)) => {
                let data = self.buf.get(start..start + len).unwrap_or_default();
                Ok(BlockData::decode(area, data, count))
            }
        })
    }

    /// Performs the write `plan` at `start` on unit `unit`: the request, then its echo (or an
    /// exception), with the same silences, resynchronisation and failure handling as a read.
    pub(crate) async fn write(
        &mut self,
        unit: u8,
        start: u16,
        plan: &WritePlan,
        timeout: Duration,
    ) -> Result<Result<(), ExceptionCode>, ReadError> {
        frame::encode_write(unit, start, plan, &mut self.request);
        let echo = frame::write_echo(&self.request);
        let mut expected = [0u8; 8];
        expected[..echo.len()].copy_from_slice(echo);
        let awaited = Awaited::Write {
            echo: expected,
            len: echo.len(),
        };
        let answer = self.transact(awaited, timeout).await?;
        Ok(answer.map(|_| ()).map_err(ExceptionCode::new))
    }

    /// Sends the request in `self.request` after the silence the line needs and waits for
    /// `awaited`: the data bytes' place in `self.buf`, or an exception code.
    async fn transact(
        &mut self,
        awaited: Awaited,
        timeout: Duration,
    ) -> Result<Result<(usize, usize), u8>, ReadError> {
        let quiet = if self.failed {
            self.quiet_after_failure
        } else {
            self.gap
        };
        self.wait_for_silence(quiet, timeout).await?;

        self.io
            .write_all(&self.request)
            .await
            .map_err(LinkError::Send)?;
        self.io.flush().await.map_err(LinkError::Send)?;
        // On a real UART the request is still on the wire when write returns.
        let sent = Instant::now() + self.char_time * self.request.len() as u32;
        self.last_activity = sent;
        let deadline = sent + timeout;
        let unit = awaited.unit();
        let function = awaited.function();
        let normal_len = awaited.normal_len();

        self.buf.clear();
        let result = loop {
            let mut chunk = [0u8; 512];
            // Read first: bytes that are there at the deadline still count.
            let read = tokio::select! {
                biased;
                r = self.io.read(&mut chunk) => Some(r),
                _ = tokio::time::sleep_until(deadline.into()) => None,
            };
            let n = match read {
                None if self.buf.is_empty() => break Err(ReadError::NoAnswer(timeout)),
                None => {
                    break Err(ReadError::Garbled(format!(
                        "{} bytes arrived but hold no valid answer from unit {unit}",
                        self.buf.len()
                    )))
                }
                Some(Ok(0)) => return Err(LinkError::Closed.into()),
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(LinkError::Receive(e).into()),
            };
            self.last_activity = Instant::now();
            if self.buf.len() + n > MAX_BUFFERED {
                // No valid frame is longer than MAX_FRAME: what lies further back is noise.
                let drop = self.buf.len() + n - MAX_BUFFERED / 2;
                let drop = drop.min(self.buf.len());
                self.buf.drain(..drop);
                self.discarded += drop as u64;
            }
            self.buf.extend_from_slice(&chunk[..n]);
            match awaited.find(&self.buf) {
                Found::Incomplete => {
                    // On a serial line the rest of the answer cannot arrive faster than the
                    // character rate: sleep until shortly before it can be complete instead of
                    // waking for every few bytes (the port buffers them meanwhile). The last
                    // stretch is left to the read itself, so timer rounding adds no latency.
                    let missing = self
                        .expected_len(function, normal_len)
                        .saturating_sub(self.buf.len());
                    let wait = self.char_time * u32::try_from(missing).unwrap_or(u32::MAX);
                    if wait > TIMER_SLACK * 2 {
                        let until = (Instant::now() + wait - TIMER_SLACK).min(deadline);
                        tokio::time::sleep_until(until.into()).await;
                    }
                    continue;
                }
                Found::Answer {
                    answer,
                    skipped,
                    end,
                } => {
                    self.discarded += (skipped + self.buf.len() - end) as u64;
                    break Ok(match answer {
                        Answer::Exception(code) => Err(code),
                        Answer::Data { start, len } => Ok((start, len)),
                    });
                }
            }
        };
        self.failed = result.is_err();
        if self.failed {
            // The guard before the next request runs from now, so an answer that is merely
            // late arrives inside it and is discarded.
            self.last_activity = Instant::now();
        }
        result
    }

    /// The length of the answer being received, judged from its first bytes: an exception
    /// when the function code has its error bit set, else the normal answer.
    fn expected_len(&self, function: u8, normal_len: usize) -> usize {
        match self.buf.get(1) {
            Some(&f) if f == function | 0x80 => frame::EXCEPTION_LEN,
            Some(_) => normal_len,
            // Until the function byte is in, it may still be a 5-byte exception.
            None => frame::EXCEPTION_LEN,
        }
    }

    /// Waits until nothing has arrived for `quiet`, discarding what does arrive. A line that
    /// is still talking after `limit` has failed.
    async fn wait_for_silence(
        &mut self,
        quiet: Duration,
        limit: Duration,
    ) -> Result<(), ReadError> {
        // What is waited for at most, and so what a failure reports.
        let waited = limit.max(quiet * 4);
        let give_up = Instant::now() + waited;
        let mut chunk = [0u8; 256];
        let mut strays = 0usize;
        // Whatever is already waiting arrived after the last transaction ended: a stray.
        while let Some(r) = self.io.read(&mut chunk).now_or_never() {
            match r {
                Ok(0) => return Err(LinkError::Closed.into()),
                Ok(n) => {
                    strays += n;
                    self.last_activity = Instant::now();
                }
                Err(e) => return Err(LinkError::Receive(e).into()),
            }
        }
        loop {
            let until = self.last_activity + quiet;
            let now = Instant::now();
            if now >= until {
                self.discarded += strays as u64;
                return Ok(());
            }
            if now >= give_up {
                return Err(LinkError::NotQuiet {
                    strays,
                    limit: waited,
                }
                .into());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until.min(give_up).into()) => {}
                r = self.io.read(&mut chunk) => match r {
                    Ok(0) => return Err(LinkError::Closed.into()),
                    Ok(n) => {
                        strays += n;
                        self.last_activity = Instant::now();
                    }
                    Err(e) => return Err(LinkError::Receive(e).into()),
                },
            }
        }
    }
}

/// What a transaction waits for.
#[derive(Debug, Clone, Copy)]
enum Awaited {
    /// The answer to a read.
    Read(Expect),
    /// The echo of a write ([`frame::write_echo`]: at most 8 bytes, `len` of them used).
    Write { echo: [u8; 8], len: usize },
}

impl Awaited {
    fn unit(&self) -> u8 {
        match self {
            Awaited::Read(e) => e.unit,
            Awaited::Write { echo, .. } => echo[0],
        }
    }

    fn function(&self) -> u8 {
        match self {
            Awaited::Read(e) => frame::function_code(e.area),
            Awaited::Write { echo, .. } => echo[1],
        }
    }

    /// The length of the normal answer, CRC included.
    fn normal_len(&self) -> usize {
        match self {
            Awaited::Read(e) => frame::response_len(e.area, e.count),
            Awaited::Write { len, .. } => len + 2,
        }
    }

    fn find(&self, buf: &[u8]) -> Found {
        match self {
            Awaited::Read(e) => frame::find_response(buf, *e),
            Awaited::Write { echo, len } => frame::find_write_response(buf, &echo[..*len]),
        }
    }
}

/// Opens a serial port for RTU: raw, no flow control, the configured framing, input flushed.
pub(crate) fn open_serial(
    settings: &SerialSettings,
) -> Result<tokio_serial::SerialStream, ReadError> {
    use tokio_serial::SerialPort;
    let builder = tokio_serial::new(settings.port.as_str(), settings.baud_rate)
        .data_bits(match settings.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .parity(match settings.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(if settings.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .flow_control(tokio_serial::FlowControl::None);
    let port = tokio_serial::SerialStream::open(&builder).map_err(|source| LinkError::Open {
        port: settings.port.clone(),
        hint: open_hint(&source),
        source,
    })?;
    // Whatever a device sent before we opened the port belongs to no request of ours.
    let _ = port.clear(tokio_serial::ClearBuffer::All);
    Ok(port)
}

/// What an operator can do about a port that does not open.
fn open_hint(e: &tokio_serial::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        tokio_serial::ErrorKind::NoDevice
        | tokio_serial::ErrorKind::Io(ErrorKind::NotFound) => {
            " (is the adapter plugged in, and is the path right? /dev/serial/by-id/ names survive re-plugging)"
        }
        tokio_serial::ErrorKind::Io(ErrorKind::PermissionDenied) => {
            " (the gateway's user needs the dialout group; the systemd unit grants it and allows serial devices)"
        }
        _ if e.to_string().to_lowercase().contains("lock")
            || e.to_string().to_lowercase().contains("busy") =>
        {
            " (another program holds the port: another edge-gateway or `edge-gateway read`, ModemManager, a terminal?)"
        }
        _ => "",
    }
}

/// The timing of a serial line's settings.
pub(crate) fn timing(settings: &SerialSettings) -> LineTiming {
    LineTiming::new(settings.baud_rate, settings.bits_per_char())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn link(io: tokio::io::DuplexStream) -> RtuLink<tokio::io::DuplexStream> {
        RtuLink::new(
            io,
            Some(LineTiming::new(115_200, 11)),
            Duration::ZERO,
            Duration::from_millis(200),
        )
    }

    async fn answer_next(peer: &mut tokio::io::DuplexStream, prefix: &[u8], regs: &[u16]) {
        let mut req = [0u8; frame::REQUEST_LEN];
        peer.read_exact(&mut req).await.expect("request");
        let parsed = frame::parse_request(&req).expect("crc").expect("complete");
        let mut out = prefix.to_vec();
        let mut answer = Vec::new();
        frame::encode_registers(parsed.unit, parsed.function, regs, &mut answer);
        out.extend_from_slice(&answer);
        peer.write_all(&out).await.expect("answer");
    }

    #[tokio::test]
    async fn a_line_that_never_goes_quiet_reports_how_long_it_was_waited_for() {
        let (a, mut b) = duplex(1024);
        let mut l = link(a);
        let talker = tokio::spawn(async move {
            while b.write_all(&[0x55]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let quiet = Duration::from_millis(25);
        let limit = Duration::from_millis(10);
        let started = Instant::now();
        let got = l.wait_for_silence(quiet, limit).await;
        let elapsed = started.elapsed();
        drop(l);
        drop(talker.await);
        match got {
            Err(ReadError::Link(LinkError::NotQuiet {
                strays,
                limit: said,
            })) => {
                assert!(strays > 0);
                assert_eq!(
                    said,
                    quiet * 4,
                    "the message names the wait, not the timeout"
                );
                assert!(elapsed >= said, "waited {elapsed:?}, said {said:?}");
            }
            other => panic!("expected NotQuiet, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_registers_and_skips_garbage_before_the_answer() {
        let (a, mut b) = duplex(1024);
        let mut l = link(a);
        let peer = tokio::spawn(async move {
            answer_next(&mut b, &[0xFF, 0x00, 0x07], &[10, 20]).await;
            b
        });
        let got = l
            .read(7, Area::HoldingRegister, 0, 2, Duration::from_millis(500))
            .await
            .expect("link")
            .expect("no exception");
        assert!(matches!(got, BlockData::Registers(r) if r == [10, 20]));
        assert_eq!(l.discarded(), 3);
        drop(peer.await);
    }

    #[tokio::test]
    async fn a_write_takes_its_echo_behind_noise_and_an_exception_as_the_unit_s_no() {
        let (a, mut b) = duplex(1024);
        let mut l = link(a);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; 8];
            b.read_exact(&mut req).await.expect("request");
            assert_eq!(req[..6], [7, 6, 0, 10, 0, 215]);
            // Noise, then the echo.
            b.write_all(&[0x07, 0x06, 0x55]).await.expect("noise");
            b.write_all(&req).await.expect("echo");
            b.read_exact(&mut req).await.expect("request");
            let mut exception = Vec::new();
            frame::encode_exception(7, 6, 2, &mut exception);
            b.write_all(&exception).await.expect("exception");
            b
        });
        let timeout = Duration::from_millis(500);
        let plan = WritePlan::Register(215);
        assert!(matches!(l.write(7, 10, &plan, timeout).await, Ok(Ok(()))));
        assert_eq!(l.discarded(), 3);
        assert!(matches!(
            l.write(7, 10, &plan, timeout).await,
            Ok(Err(ExceptionCode::IllegalDataAddress))
        ));
        drop(peer.await);
    }

    #[tokio::test]
    async fn a_late_answer_is_discarded_before_the_next_request() {
        let (a, mut b) = duplex(1024);
        let mut l = link(a);
        let first = l
            .read(1, Area::HoldingRegister, 0, 1, Duration::from_millis(30))
            .await;
        assert!(matches!(first, Err(ReadError::NoAnswer(_))));
        // The unit answers the first request late, just before the master's next request.
        let mut req = [0u8; frame::REQUEST_LEN];
        b.read_exact(&mut req).await.expect("first request");
        let mut late = Vec::new();
        frame::encode_registers(1, 3, &[666], &mut late);
        b.write_all(&late).await.expect("late answer");
        let peer = tokio::spawn(async move {
            answer_next(&mut b, &[], &[42]).await;
            b
        });
        let second = l
            .read(1, Area::HoldingRegister, 0, 1, Duration::from_millis(500))
            .await
            .expect("link")
            .expect("no exception");
        assert!(
            matches!(second, BlockData::Registers(ref r) if r == &[42]),
            "the late 666 must not be taken for the answer: {second:?}"
        );
        assert_eq!(l.discarded(), late.len() as u64);
        drop(peer.await);
    }

    #[tokio::test]
    async fn a_garbled_answer_is_reported_and_an_exception_passed_on() {
        let (a, mut b) = duplex(1024);
        let mut l = link(a);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; frame::REQUEST_LEN];
            b.read_exact(&mut req).await.expect("request");
            let mut answer = Vec::new();
            frame::encode_registers(2, 3, &[1], &mut answer);
            answer[3] ^= 0x40;
            b.write_all(&answer).await.expect("answer");
            b.read_exact(&mut req).await.expect("request");
            frame::encode_exception(2, 3, 2, &mut answer);
            b.write_all(&answer).await.expect("answer");
            b
        });
        let garbled = l
            .read(2, Area::HoldingRegister, 0, 1, Duration::from_millis(50))
            .await;
        assert!(matches!(garbled, Err(ReadError::Garbled(_))), "{garbled:?}");
        let refused = l
            .read(2, Area::HoldingRegister, 0, 1, Duration::from_millis(500))
            .await
            .expect("link");
        assert_eq!(refused.err(), Some(ExceptionCode::IllegalDataAddress));
        drop(peer.await);
    }

    #[tokio::test]
    async fn a_closed_stream_is_a_link_failure() {
        let (a, b) = duplex(64);
        let mut l = link(a);
        drop(b);
        let r = l
            .read(1, Area::Coil, 0, 8, Duration::from_millis(100))
            .await;
        assert!(matches!(r, Err(ReadError::Link(_))), "{r:?}");
    }
}
