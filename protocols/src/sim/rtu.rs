//! An in-process Modbus RTU slave simulator: several units on one simulated RS-485 line.
//!
//! Design:
//! - [`RtuSim`] is the line: a set of units, each a [`SimDevice`] (its register image answers
//!   the reads, its [`Faults`](super::modbus::Faults) make it silent or late and count its
//!   requests), plus [`LineFaults`] for what goes wrong on the wire itself. It is a cheap,
//!   cloneable handle: a test keeps one while the line serves.
//! - One serving loop, `RtuSim::serve_stream`, runs over any byte stream. It behaves like the
//!   slaves on a bus: bytes are accumulated, a request frame with a valid CRC at the start of
//!   the buffer is a transaction, and anything else is dropped one byte at a time until a
//!   request lines up again (a slave resynchronises on noise). Writes (functions 5, 6, 15, 16
//!   and 22) change the unit's image and are answered with their echo, as the TCP simulator
//!   takes them (counted in `faults.writes`; `faults.no_mask_write` refuses function 22). Requests are handled one at a
//!   time in order; a unit nobody simulates, unit 0 (broadcast) and a silent unit do not answer;
//!   a late unit answers after its delay even when the master has long given up, which is what
//!   makes late answers collide with the next transaction on a real line.
//! - The line is reachable three ways: over a pseudo-terminal behind a symlink, exactly as the
//!   gateway opens a USB adapter under `/dev/serial/by-id/` ([`RtuSim::serve_pty`]), over TCP as
//!   behind a serial-to-Ethernet converter ([`RtuSim::serve_tcp`]), or over any in-process
//!   stream. Several TCP connections share the line: their transactions are serialised.
//! - A pty or socket delivers bytes instantly. With [`RtuSim::emulate_line`] each transaction
//!   takes what it takes on the wire: the request's reception plus the t3.5 end-of-frame silence
//!   before the unit starts answering, then the answer paced at the character rate in chunks of
//!   about a millisecond, each sent at an absolute deadline computed from the start of the
//!   answer, so timer rounding does not add up.
//! - The pty's slave side is opened by the simulator too and kept open for the pty's lifetime,
//!   in raw mode: the gateway can close and reopen the port without the master seeing a hangup,
//!   and nothing is echoed or translated before the gateway configures the port.
//!   [`PtyLine::unplug`] closes both sides and removes the symlink: the gateway's open port
//!   fails as when a USB adapter is pulled; [`PtyLine::replug`] brings a new pty behind the
//!   same link.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use rand::Rng;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::modbus::{Image, SimDevice, SimServer};
use crate::modbus::frame::{self, LineTiming, MAX_FRAME};
use crate::modbus::Area;

/// Bytes buffered by the serving loop; a request is 8 bytes, so this only bounds one read.
const RX_CAPACITY: usize = 512;

/// Most garbage bytes written before an answer by [`LineFaults::noise_before`].
const MAX_NOISE: usize = 7;

/// Wire faults and counters of a simulated line, shared with its serving loops.
///
/// Each fault switch is a count of answers still to be affected: setting `corrupt_crc` to 2
/// spoils the next two answers. Only answers actually sent count (not silent or unknown units).
#[derive(Debug, Default)]
pub struct LineFaults {
    /// Next answers preceded by 3 to 7 random bytes of line noise.
    pub noise_before: AtomicU32,
    /// Next answers sent with one bit of their CRC flipped.
    pub corrupt_crc: AtomicU32,
    /// Next answers cut after the first half of the frame.
    pub truncate: AtomicU32,
    /// Answers sent (normal and exception frames, spoilt or not).
    pub answers: AtomicU64,
    /// Bytes dropped to resynchronise: noise, frames with a bad CRC, frames that are no request.
    pub bad_requests: AtomicU64,
}

impl LineFaults {
    /// Answers sent so far.
    #[cfg(test)]
    fn answers(&self) -> u64 {
        self.answers.load(Ordering::Relaxed)
    }

    /// Bytes dropped for resynchronisation so far.
    #[cfg(test)]
    fn bad_requests(&self) -> u64 {
        self.bad_requests.load(Ordering::Relaxed)
    }
}

/// Takes one from a fault count; whether the fault applies to this answer.
fn take(count: &AtomicU32) -> bool {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Simulated Modbus RTU slaves sharing one line; clones share the units, faults and line.
///
/// Build it with [`RtuSim::with_unit`] and [`RtuSim::emulate_line`] before serving: a clone
/// changed by a builder method afterwards gets its own unit set (faults stay shared).
#[derive(Debug, Clone, Default)]
pub struct RtuSim {
    units: Arc<HashMap<u8, SimDevice>>,
    timing: Option<LineTiming>,
    faults: Arc<LineFaults>,
    /// The line itself: one transaction at a time, whichever connection it came from.
    bus: Arc<tokio::sync::Mutex<()>>,
}

impl RtuSim {
    /// A line with no units, delivering bytes as fast as the transport does.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the unit `unit_id`, served by `device`; unit 0 (broadcast) never answers.
    pub fn with_unit(mut self, unit_id: u8, device: SimDevice) -> Self {
        Arc::make_mut(&mut self.units).insert(unit_id, device);
        self
    }

    /// Makes each transaction take the time it takes on a line at `baud` with `bits_per_char`
    /// bits per character (11 for 8E1 or 8N2, 10 for 8N1).
    pub fn emulate_line(mut self, baud: u32, bits_per_char: u32) -> Self {
        self.timing = Some(LineTiming::new(baud, bits_per_char));
        self
    }

    /// The emulated line timing, if any.
    pub fn timing(&self) -> Option<LineTiming> {
        self.timing
    }

    /// The wire fault switches and counters.
    pub fn faults(&self) -> &LineFaults {
        &self.faults
    }

    /// The device serving `unit_id`, sharing its image and faults with the line.
    pub fn device(&self, unit_id: u8) -> Option<SimDevice> {
        self.units.get(&unit_id).cloned()
    }

    /// Serves the line over `stream` until end of file or an I/O error (returned).
    pub(crate) async fn serve_stream<S>(&self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut rx = [0u8; RX_CAPACITY];
        let (mut start, mut end) = (0, 0);
        let mut frame = Vec::with_capacity(MAX_FRAME);
        let mut tx = Vec::with_capacity(MAX_NOISE + MAX_FRAME);
        loop {
            loop {
                match frame::parse_slave_request(&rx[start..end]) {
                    Ok(None) => break,
                    Err(()) => {
                        start += 1;
                        self.faults.bad_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some((unit, request, len))) => {
                        start += len;
                        self.transact(unit, &request, len, &mut stream, &mut frame, &mut tx)
                            .await?;
                    }
                }
            }
            // Fewer than a request's bytes are left: move them to the front and read more.
            rx.copy_within(start..end, 0);
            end -= start;
            start = 0;
            let n = stream.read(&mut rx[end..]).await?;
            if n == 0 {
                return Ok(());
            }
            end += n;
        }
    }

    /// Handles one request (a frame of `len` bytes): counts it, and answers if the unit exists
    /// and is not silent.
    async fn transact<S>(
        &self,
        unit: u8,
        request: &Request<'_>,
        len: usize,
        stream: &mut S,
        frame: &mut Vec<u8>,
        tx: &mut Vec<u8>,
    ) -> io::Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let arrived = Instant::now();
        let _line = self.bus.lock().await;
        if unit == 0 {
            return Ok(());
        }
        let Some(device) = self.units.get(&unit) else {
            return Ok(());
        };
        let faults = device.faults();
        faults.requests.fetch_add(1, Ordering::Relaxed);
        let write = is_write(request);
        if write {
            faults.writes.fetch_add(1, Ordering::Relaxed);
        }
        // A silent unit changes nothing.
        if faults.silent.load(Ordering::Relaxed) {
            return Ok(());
        }
        let delay = Duration::from_millis(faults.delay_ms.load(Ordering::Relaxed));
        let mask_refused = matches!(request, Request::MaskWriteRegister(..))
            && faults.no_mask_write.load(Ordering::Relaxed);
        if mask_refused {
            let code = ExceptionCode::IllegalFunction.into();
            frame::encode_exception(unit, 22, code, frame);
        } else if write {
            encode_write_answer(&mut device.image(), unit, request, frame);
        } else {
            encode_answer(&mut device.image(), unit, request, frame);
        }
        self.spoil(frame, tx);

        let mut at = arrived;
        if let Some(timing) = self.timing {
            // The request's characters and the end-of-frame silence before the unit may answer.
            at += timing.chars(len) + timing.t35;
            sleep_until(at).await;
        }
        if !delay.is_zero() {
            at += delay;
            sleep_until(at).await;
        }
        match self.timing {
            Some(timing) => write_paced(stream, tx, timing, at).await?,
            None => stream.write_all(tx).await?,
        }
        stream.flush().await?;
        self.faults.answers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `frame` into `tx` with the wire faults due for this answer applied.
    fn spoil(&self, frame: &mut [u8], tx: &mut Vec<u8>) {
        tx.clear();
        if take(&self.faults.noise_before) {
            let mut rng = rand::rng();
            let n = rng.random_range(3..=MAX_NOISE);
            tx.extend((0..n).map(|_| rng.random::<u8>()));
        }
        if take(&self.faults.corrupt_crc) {
            if let Some(crc_low) = frame.len().checked_sub(2).and_then(|i| frame.get_mut(i)) {
                *crc_low ^= 0x01;
            }
        }
        let len = if take(&self.faults.truncate) {
            frame.len() / 2
        } else {
            frame.len()
        };
        tx.extend_from_slice(&frame[..len]);
    }

    /// Serves the line over TCP on `addr` (use `127.0.0.1:0`), as a serial-to-Ethernet converter
    /// in transparent mode does: RTU frames, CRC included, over the connection. Every accepted
    /// connection is served and counted on every unit's `faults.connections`.
    pub async fn serve_tcp(&self, addr: SocketAddr) -> io::Result<SimServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let sim = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!("RTU simulator cannot accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                for device in sim.units.values() {
                    device.faults().connections.fetch_add(1, Ordering::Relaxed);
                }
                let sim = sim.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Some(Err(e)) = stop.run_until_cancelled(sim.serve_stream(stream)).await {
                        debug!("RTU simulator connection from {peer} ended: {e}");
                    }
                });
            }
        });
        Ok(SimServer::from_parts(addr, cancel, task))
    }

    /// Serves the line on a new pseudo-terminal reachable through a symlink at `link` (replaced
    /// if it exists), as a USB adapter under `/dev/serial/by-id/`. Must be called within a tokio
    /// runtime; the returned handle stops the line when dropped.
    pub fn serve_pty(&self, link: &Path) -> io::Result<PtyLine> {
        let handle = Handle::try_current().map_err(io::Error::other)?;
        let mut line = PtyLine {
            sim: self.clone(),
            link: link.to_path_buf(),
            handle,
            pty: None,
        };
        line.plug()?;
        Ok(line)
    }
}

/// Whether a request writes.
fn is_write(request: &Request<'_>) -> bool {
    matches!(
        request,
        Request::WriteSingleCoil(..)
            | Request::WriteMultipleCoils(..)
            | Request::WriteSingleRegister(..)
            | Request::WriteMultipleRegisters(..)
            | Request::MaskWriteRegister(..)
    )
}

/// Performs the write `request` on `image` and writes its answer into `frame`: the echo, or
/// an exception frame.
fn encode_write_answer(image: &mut Image, unit: u8, request: &Request<'_>, frame: &mut Vec<u8>) {
    let function = request.function_code().value();
    match image.answer(request) {
        Ok(response) => {
            if frame::encode_write_answer(unit, &response, frame).is_none() {
                let code = ExceptionCode::ServerDeviceFailure.into();
                frame::encode_exception(unit, function, code, frame);
            }
        }
        Err(code) => frame::encode_exception(unit, function, code.into(), frame),
    }
}

/// Writes the answer for the read `request` from `image` into `frame`: data, or an exception
/// frame (exception 01 for a function that is no read).
fn encode_answer(image: &mut Image, unit: u8, request: &Request<'_>, frame: &mut Vec<u8>) {
    let function = request.function_code().value();
    let (area, count) = match *request {
        Request::ReadCoils(_, n) => (Area::Coil, n),
        Request::ReadDiscreteInputs(_, n) => (Area::DiscreteInput, n),
        Request::ReadHoldingRegisters(_, n) => (Area::HoldingRegister, n),
        Request::ReadInputRegisters(_, n) => (Area::InputRegister, n),
        _ => {
            let code = ExceptionCode::IllegalFunction.into();
            frame::encode_exception(unit, function, code, frame);
            return;
        }
    };
    // The protocol limits of one read; a larger count cannot even be framed.
    let limit = if area.is_bit() { 2000 } else { 125 };
    if count == 0 || count > limit {
        frame::encode_exception(
            unit,
            function,
            ExceptionCode::IllegalDataValue.into(),
            frame,
        );
        return;
    }
    match image.answer(request) {
        Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)) => {
            frame::encode_bits(unit, function, &bits, frame);
        }
        Ok(Response::ReadHoldingRegisters(regs) | Response::ReadInputRegisters(regs)) => {
            frame::encode_registers(unit, function, &regs, frame);
        }
        Ok(_) => {
            frame::encode_exception(
                unit,
                function,
                ExceptionCode::ServerDeviceFailure.into(),
                frame,
            );
        }
        Err(code) => frame::encode_exception(unit, function, code.into(), frame),
    }
}

/// Writes `bytes` at the character rate of `timing`, starting at `start`: each chunk of about a
/// millisecond is sent when its last character would have been received on the wire.
async fn write_paced<S>(
    stream: &mut S,
    bytes: &[u8],
    timing: LineTiming,
    start: Instant,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let char_nanos = timing.char_time.as_nanos();
    if char_nanos == 0 {
        return stream.write_all(bytes).await;
    }
    let per_ms = (1_000_000 + char_nanos / 2) / char_nanos;
    let chunk = usize::try_from(per_ms).unwrap_or(usize::MAX).max(1);
    let mut sent = 0;
    while sent < bytes.len() {
        let next = bytes.len().min(sent.saturating_add(chunk));
        sleep_until(start + timing.chars(next)).await;
        stream.write_all(&bytes[sent..next]).await?;
        sent = next;
    }
    Ok(())
}

/// The pty master shared by a serving loop and its [`PtyLine`], which closes it by taking it.
type MasterSlot = Arc<Mutex<Option<AsyncFd<PtyMaster>>>>;

fn lock(slot: &MasterSlot) -> MutexGuard<'_, Option<AsyncFd<PtyMaster>>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The master side of a pty as a tokio stream; end of file once the master is closed.
struct PtyIo {
    master: MasterSlot,
}

impl AsyncRead for PtyIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let slot = lock(&self.master);
        let Some(master) = slot.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let mut guard = ready!(master.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let slot = lock(&self.master);
        let Some(master) = slot.as_ref() else {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        };
        loop {
            let mut guard = ready!(master.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One plugged-in pty and the task serving it.
#[derive(Debug)]
struct Pty {
    master: MasterSlot,
    /// Our own open slave fd: keeps the line up while the gateway closes and reopens the port.
    slave: File,
    /// The slave's device path, `/dev/pts/N`.
    tty: PathBuf,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A simulated RTU line on a pseudo-terminal behind a symlink; dropping it unplugs the line.
#[derive(Debug)]
pub struct PtyLine {
    sim: RtuSim,
    link: PathBuf,
    handle: Handle,
    pty: Option<Pty>,
}

impl PtyLine {
    /// The symlink the gateway opens as its serial port.
    pub fn path(&self) -> &Path {
        &self.link
    }

    /// The pty slave the link points to (`/dev/pts/N`), while plugged in.
    pub fn tty(&self) -> Option<&Path> {
        self.pty.as_ref().map(|pty| pty.tty.as_path())
    }

    /// Pulls the adapter: stops serving, removes the symlink and closes both sides of the pty,
    /// so a port the gateway has open fails. Does nothing when already unplugged.
    pub fn unplug(&mut self) {
        let Some(pty) = self.pty.take() else {
            return;
        };
        pty.cancel.cancel();
        pty.task.abort();
        if fs::read_link(&self.link).is_ok_and(|target| target == pty.tty) {
            let _ = fs::remove_file(&self.link);
        }
        drop(lock(&pty.master).take());
        drop(pty.slave);
    }

    /// Plugs a new adapter in: a new pty (its number may differ) behind the same symlink.
    /// Unplugs the current one first if still plugged.
    pub fn replug(&mut self) -> io::Result<()> {
        self.unplug();
        self.plug()
    }

    /// Stops serving and unplugs the line.
    pub fn stop(mut self) {
        self.unplug();
    }

    fn plug(&mut self) -> io::Result<()> {
        let (master, slave, tty) = open_pty()?;
        let master = {
            let _runtime = self.handle.enter();
            // `AsyncFd::new` is deprecated because an arbitrary `T` could close its fd while
            // registered. `PtyMaster` owns its fd and closes it only when dropped, which
            // `AsyncFd` does after deregistering it, so this use is sound; the replacement,
            // `AsyncFd::register`, is `unsafe` and the crate forbids unsafe code.
            #[allow(deprecated)]
            AsyncFd::new(master)?
        };
        let master: MasterSlot = Arc::new(Mutex::new(Some(master)));
        point_link(&self.link, &tty)?;
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let sim = self.sim.clone();
        let io = PtyIo {
            master: Arc::clone(&master),
        };
        let tty_name = tty.display().to_string();
        let task = self.handle.spawn(async move {
            match stop.run_until_cancelled(sim.serve_stream(io)).await {
                Some(Err(e)) => debug!("RTU simulator on {tty_name} stopped: {e}"),
                Some(Ok(())) => debug!("RTU simulator on {tty_name} closed"),
                None => {}
            }
        });
        self.pty = Some(Pty {
            master,
            slave,
            tty,
            cancel,
            task,
        });
        Ok(())
    }
}

impl Drop for PtyLine {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// Opens a pty pair: the master (non-blocking), the slave opened by us in raw mode, its path.
fn open_pty() -> io::Result<(PtyMaster, File, PathBuf)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let tty = PathBuf::from(ptsname_r(&master)?);
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(OFlag::O_NOCTTY.bits())
        .open(&tty)?;
    let mut termios = tcgetattr(&slave)?;
    cfmakeraw(&mut termios);
    tcsetattr(&slave, SetArg::TCSANOW, &termios)?;
    let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
    fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok((master, slave, tty))
}

/// Points the symlink `link` at `target`, atomically replacing an existing symlink.
fn point_link(link: &Path, target: &Path) -> io::Result<()> {
    if let Ok(meta) = fs::symlink_metadata(link) {
        if !meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", link.display()),
            ));
        }
    }
    let Some(name) = link.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is no file path", link.display()),
        ));
    };
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = link.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests;
