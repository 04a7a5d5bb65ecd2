//! A fault-injecting Modbus TCP proxy: a real [`SimDevice`] server answers behind it, and the
//! proxy spoils the answers on their way back, one fault per answer, as a broken device, a
//! confused gateway or a bad network would.
//!
//! Design:
//! - [`FaultyProxy`] listens on 127.0.0.1 (port 0) and opens one upstream connection per client
//!   connection. Both directions are cut into MBAP frames ([`frame_len`]): requests pass
//!   unchanged and are counted; each answer gets the fault the current mode picks
//!   ([`FaultyProxy::set`]) at the moment it passes, so a mode change applies from the next
//!   answer on.
//! - One task per connection does everything in order: answers leave in the order the device
//!   gave them, a late one holding back those behind it, as on one TCP stream. A late answer is
//!   still delivered if the client kept the connection open, which is exactly what corrupts the
//!   next transaction of a client that reuses a connection after a timeout.
//! - Memory is bounded per connection: bytes that are no MBAP frame close the connection, and
//!   at most [`MAX_PENDING`] answers wait to be sent. A connection's task ends when either side
//!   closes or the proxy is dropped.
//! - Counters say how many answers got which fault ([`FaultyProxy::applied`]).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use protocols::sim::modbus::{SimDevice, SimServer};

/// Bytes of an MBAP header: transaction id, protocol id, length, unit id.
pub const MBAP_LEN: usize = 7;

/// Largest MBAP length field: the unit id and a PDU of at most 253 bytes.
pub const MAX_LENGTH: u16 = 254;

/// Most answers waiting to be sent on one connection (a late one and those queued behind it).
const MAX_PENDING: usize = 16;

/// Length range of a garbage burst.
const GARBAGE_LEN: RangeInclusive<usize> = 8..=40;

/// How long a half frame is left on the wire before a reset or close, so it reaches the client.
const MID_FRAME_PAUSE: Duration = Duration::from_millis(10);

/// Share of answers a [`Fault::Mix`] passes unchanged.
const MIX_NONE_SHARE: f64 = 0.5;

/// The MBAP header of a Modbus TCP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mbap {
    /// Transaction id: the client's tag for the request, echoed in the answer.
    pub transaction: u16,
    /// Protocol id: 0 for Modbus.
    pub protocol: u16,
    /// Bytes that follow the length field: the unit id and the PDU.
    pub length: u16,
    /// Unit id.
    pub unit: u8,
}

impl Mbap {
    /// The header at the start of `buf` (fields unchecked), if `buf` holds seven bytes.
    pub fn parse(buf: &[u8]) -> Option<Mbap> {
        let h = buf.get(..MBAP_LEN)?;
        Some(Mbap {
            transaction: u16::from_be_bytes([h[0], h[1]]),
            protocol: u16::from_be_bytes([h[2], h[3]]),
            length: u16::from_be_bytes([h[4], h[5]]),
            unit: h[6],
        })
    }

    /// Writes the header over the first seven bytes of `buf`, which must hold them.
    pub fn write(&self, buf: &mut [u8]) {
        buf[0..2].copy_from_slice(&self.transaction.to_be_bytes());
        buf[2..4].copy_from_slice(&self.protocol.to_be_bytes());
        buf[4..6].copy_from_slice(&self.length.to_be_bytes());
        buf[6] = self.unit;
    }
}

/// Why bytes cannot start an MBAP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The protocol id is not 0.
    #[error("protocol id {0} is not Modbus")]
    Protocol(u16),
    /// The length field leaves no room for a function code, or exceeds [`MAX_LENGTH`].
    #[error("MBAP length {0} out of range")]
    Length(u16),
}

/// The length of the complete MBAP frame at the start of `buf`, `Ok(None)` while more bytes are
/// needed; an error when the header cannot be one.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = Mbap::parse(buf) else {
        return Ok(None);
    };
    if header.protocol != 0 {
        return Err(FrameError::Protocol(header.protocol));
    }
    if !(2..=MAX_LENGTH).contains(&header.length) {
        return Err(FrameError::Length(header.length));
    }
    let len = MBAP_LEN - 1 + usize::from(header.length);
    Ok((buf.len() >= len).then_some(len))
}

/// How the byte count of a [`Fault::WrongByteCount`] answer disagrees with its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteCount {
    /// One value (2 bytes of registers, 1 byte of bits) less than the data carries; the MBAP
    /// length still counts the bytes sent.
    Short,
    /// One value more than the data carries; the MBAP length still counts the bytes sent.
    Long,
    /// One value more than the data carries and the MBAP length agrees with the byte count: the
    /// frame claims bytes that never come.
    LongWithLength,
}

/// What happens to one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passed on unchanged.
    None,
    /// Swallowed: the request never gets an answer.
    NoAnswer,
    /// Passed on after this delay (set it beyond the client's timeout), holding back the answers
    /// behind it.
    Late(Duration),
    /// The first half of the frame is sent and the rest never; later answers on the connection
    /// are swallowed.
    Truncated,
    /// Carries the transaction id of the request before, as a stale answer does. Like the other
    /// header faults, its read data is another request's: every data byte inverted, so an answer
    /// taken for the request's shows in the values.
    WrongTransactionId,
    /// Carries the next unit id (and inverted data).
    WrongUnitId,
    /// Carries the code of another read function: 1 and 2, 3 and 4 swapped, exceptions alike
    /// (and inverted data).
    WrongFunctionCode,
    /// The PDU's byte count disagrees with the data (applies to answers carrying read data).
    WrongByteCount(ByteCount),
    /// One value more than asked for, byte count and MBAP length agreeing with the data
    /// (applies to answers carrying read data).
    ExtraValues,
    /// One value fewer than asked for (the last one dropped), byte count and MBAP length
    /// agreeing with the data (applies to answers carrying read data).
    FewerValues,
    /// 8 to 40 random bytes instead of the frame; their protocol id is never 0.
    Garbage,
    /// The first half of the frame, then the connection is reset (RST).
    ResetMidFrame,
    /// The first half of the frame, then the connection is closed (FIN).
    CloseMidFrame,
    /// Per answer, one of the faults above picked at random from `seed` (late ones by `late`),
    /// or none half of the time.
    Mix {
        /// Seed of the choice: the same seed gives the same sequence of faults.
        seed: u64,
        /// The delay of a [`Fault::Late`] pick.
        late: Duration,
    },
}

/// Names of the faults as counted, in [`Fault::index`] order.
pub const FAULT_NAMES: [&str; 15] = [
    "none",
    "no_answer",
    "late",
    "truncated",
    "wrong_transaction_id",
    "wrong_unit_id",
    "wrong_function_code",
    "byte_count_short",
    "byte_count_long",
    "byte_count_long_with_length",
    "extra_values",
    "fewer_values",
    "garbage",
    "reset_mid_frame",
    "close_mid_frame",
];

impl Fault {
    /// The faults a [`Fault::Mix`] picks from besides none, late ones delayed by `late`.
    pub fn all(late: Duration) -> [Fault; 14] {
        [
            Fault::NoAnswer,
            Fault::Late(late),
            Fault::Truncated,
            Fault::WrongTransactionId,
            Fault::WrongUnitId,
            Fault::WrongFunctionCode,
            Fault::WrongByteCount(ByteCount::Short),
            Fault::WrongByteCount(ByteCount::Long),
            Fault::WrongByteCount(ByteCount::LongWithLength),
            Fault::ExtraValues,
            Fault::FewerValues,
            Fault::Garbage,
            Fault::ResetMidFrame,
            Fault::CloseMidFrame,
        ]
    }

    /// The fault's counter in [`FAULT_NAMES`]; `None` for a mix, which is counted by its picks.
    pub fn index(self) -> Option<usize> {
        Some(match self {
            Fault::None => 0,
            Fault::NoAnswer => 1,
            Fault::Late(_) => 2,
            Fault::Truncated => 3,
            Fault::WrongTransactionId => 4,
            Fault::WrongUnitId => 5,
            Fault::WrongFunctionCode => 6,
            Fault::WrongByteCount(ByteCount::Short) => 7,
            Fault::WrongByteCount(ByteCount::Long) => 8,
            Fault::WrongByteCount(ByteCount::LongWithLength) => 9,
            Fault::ExtraValues => 10,
            Fault::FewerValues => 11,
            Fault::Garbage => 12,
            Fault::ResetMidFrame => 13,
            Fault::CloseMidFrame => 14,
            Fault::Mix { .. } => return None,
        })
    }

    /// The fault's name for reports ("mix" for a mix).
    pub fn name(self) -> &'static str {
        self.index().map_or("mix", |i| FAULT_NAMES[i])
    }
}

/// What the connection does after sending an answer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Goes on relaying.
    Continue,
    /// Swallows every later answer.
    Mute,
    /// Resets the client connection.
    Reset,
    /// Closes the client connection.
    Close,
}

/// What the proxy does with one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Sends nothing.
    Swallow,
    /// Sends `bytes` after `delay`, then does `then`.
    Send {
        bytes: Vec<u8>,
        delay: Duration,
        then: Then,
    },
}

impl Action {
    fn now(bytes: Vec<u8>, then: Then) -> Action {
        Action::Send {
            bytes,
            delay: Duration::ZERO,
            then,
        }
    }
}

/// The fault to apply to the next answer under `mode`.
fn pick(mode: Fault, rng: &mut impl Rng) -> Fault {
    match mode {
        Fault::Mix { late, .. } => {
            if rng.random_bool(MIX_NONE_SHARE) {
                Fault::None
            } else {
                let all = Fault::all(late);
                all[rng.random_range(0..all.len())]
            }
        }
        fault => fault,
    }
}

/// The action for `fault` on `frame`, one complete MBAP answer; `None` when the fault does not
/// apply to it (a byte-count fault on an exception answer).
fn spoil(fault: Fault, frame: &[u8], rng: &mut impl Rng) -> Option<Action> {
    let mut bytes = frame.to_vec();
    let mut header = Mbap::parse(frame)?;
    let half = frame.len() / 2;
    Some(match fault {
        Fault::None | Fault::Mix { .. } => Action::now(bytes, Then::Continue),
        Fault::NoAnswer => Action::Swallow,
        Fault::Late(delay) => Action::Send {
            bytes,
            delay,
            then: Then::Continue,
        },
        Fault::Truncated => Action::now(bytes[..half].to_vec(), Then::Mute),
        Fault::ResetMidFrame => Action::now(bytes[..half].to_vec(), Then::Reset),
        Fault::CloseMidFrame => Action::now(bytes[..half].to_vec(), Then::Close),
        Fault::WrongTransactionId => {
            header.transaction = header.transaction.wrapping_sub(1);
            header.write(&mut bytes);
            invert_data(&mut bytes);
            Action::now(bytes, Then::Continue)
        }
        Fault::WrongUnitId => {
            header.unit = header.unit.wrapping_add(1);
            header.write(&mut bytes);
            invert_data(&mut bytes);
            Action::now(bytes, Then::Continue)
        }
        Fault::WrongFunctionCode => {
            invert_data(&mut bytes);
            let code = bytes.get_mut(MBAP_LEN)?;
            let other = match *code & 0x7F {
                1 => 2,
                2 => 1,
                3 => 4,
                4 => 3,
                0x7F => 1,
                c => c + 1,
            };
            *code = (*code & 0x80) | other;
            Action::now(bytes, Then::Continue)
        }
        Fault::WrongByteCount(how) => {
            let step = value_bytes(frame)?;
            let count = &mut bytes[MBAP_LEN + 1];
            match how {
                ByteCount::Short => *count = count.checked_sub(step)?,
                ByteCount::Long => *count = count.checked_add(step)?,
                ByteCount::LongWithLength => {
                    *count = count.checked_add(step)?;
                    header.length += u16::from(step);
                    header.write(&mut bytes);
                }
            }
            Action::now(bytes, Then::Continue)
        }
        Fault::ExtraValues => {
            let step = value_bytes(frame)?;
            let count = &mut bytes[MBAP_LEN + 1];
            *count = count.checked_add(step)?;
            header.length += u16::from(step);
            if header.length > MAX_LENGTH {
                return None;
            }
            header.write(&mut bytes);
            bytes.extend(std::iter::repeat_n(0x5A, usize::from(step)));
            Action::now(bytes, Then::Continue)
        }
        Fault::FewerValues => {
            let step = value_bytes(frame)?;
            let count = &mut bytes[MBAP_LEN + 1];
            *count = count.checked_sub(step)?;
            header.length -= u16::from(step);
            header.write(&mut bytes);
            bytes.truncate(bytes.len() - usize::from(step));
            Action::now(bytes, Then::Continue)
        }
        Fault::Garbage => {
            let mut garbage = vec![0u8; rng.random_range(GARBAGE_LEN)];
            rng.fill(&mut garbage[..]);
            if garbage[2] == 0 && garbage[3] == 0 {
                garbage[3] = 1;
            }
            Action::now(garbage, Then::Continue)
        }
    })
}

/// Inverts the data bytes of a read answer (after its byte count); other frames stay as they are.
fn invert_data(frame: &mut [u8]) {
    if value_bytes(frame).is_some() {
        frame[MBAP_LEN + 2..].iter_mut().for_each(|b| *b = !*b);
    }
}

/// The bytes of one value in a read answer (2 for registers, 1 for a byte of bits), if `frame`
/// is a read answer whose byte count matches its data.
fn value_bytes(frame: &[u8]) -> Option<u8> {
    let code = *frame.get(MBAP_LEN)?;
    let count = *frame.get(MBAP_LEN + 1)?;
    let step = match code {
        1 | 2 => 1,
        3 | 4 => 2,
        _ => return None,
    };
    (usize::from(count) + MBAP_LEN + 2 == frame.len()).then_some(step)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The mode and the random source of the fault choice.
struct Choice {
    mode: Fault,
    rng: StdRng,
}

/// What the proxy's tasks share with its handle.
struct Shared {
    choice: Mutex<Choice>,
    applied: [AtomicU64; FAULT_NAMES.len()],
    requests: AtomicU64,
    connections: AtomicU64,
}

impl Shared {
    /// Picks and counts the fault for one answer.
    fn decide(&self, frame: &[u8]) -> Action {
        let mut choice = lock(&self.choice);
        let Choice { mode, rng } = &mut *choice;
        let fault = pick(*mode, rng);
        let (fault, action) = match spoil(fault, frame, rng) {
            Some(action) => (fault, action),
            None => (Fault::None, Action::now(frame.to_vec(), Then::Continue)),
        };
        self.applied[fault.index().unwrap_or(0)].fetch_add(1, Ordering::Relaxed);
        action
    }
}

/// An answer waiting for its time.
struct Outgoing {
    at: Instant,
    bytes: Vec<u8>,
    then: Then,
}

/// A fault-injecting Modbus TCP proxy on 127.0.0.1; dropping it closes every connection.
pub struct FaultyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    _device: Option<SimServer>,
}

impl std::fmt::Debug for FaultyProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyProxy")
            .field("addr", &self.addr)
            .field("mode", &self.fault())
            .finish_non_exhaustive()
    }
}

impl FaultyProxy {
    /// Starts a proxy on 127.0.0.1 (port 0) to the Modbus TCP server at `upstream`, passing
    /// answers unchanged until [`FaultyProxy::set`].
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultyProxy> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            choice: Mutex::new(Choice {
                mode: Fault::None,
                rng: StdRng::seed_from_u64(0),
            }),
            applied: Default::default(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let (tasks, stop) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => {
                            // Out of descriptors or similar: do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                tasks.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, upstream, tasks.clone(), stop.clone()));
            }
        });
        Ok(FaultyProxy {
            addr,
            shared,
            cancel,
            _device: None,
        })
    }

    /// Serves `device` on 127.0.0.1 (port 0) and starts a proxy in front of it; the server lives
    /// as long as the proxy.
    pub async fn in_front_of(device: &SimDevice) -> io::Result<FaultyProxy> {
        let server = device.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let mut proxy = FaultyProxy::start(server.addr()).await?;
        proxy._device = Some(server);
        Ok(proxy)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault mode for the next answers; a [`Fault::Mix`] restarts from its seed.
    pub fn set(&self, fault: Fault) {
        let mut choice = lock(&self.shared.choice);
        if let Fault::Mix { seed, .. } = fault {
            choice.rng = StdRng::seed_from_u64(seed);
        }
        choice.mode = fault;
    }

    /// The current fault mode.
    pub fn fault(&self) -> Fault {
        lock(&self.shared.choice).mode
    }

    /// Answers that got `fault` (its kind, whatever its delay); for a mix, all spoilt answers.
    pub fn applied(&self, fault: Fault) -> u64 {
        match fault.index() {
            Some(i) => self.shared.applied[i].load(Ordering::Relaxed),
            None => self.faults_applied(),
        }
    }

    /// Answers spoilt so far, whatever the fault.
    pub fn faults_applied(&self) -> u64 {
        self.counts().iter().skip(1).map(|(_, n)| n).sum()
    }

    /// Answers per fault name, in [`FAULT_NAMES`] order ("none" first).
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        FAULT_NAMES
            .iter()
            .zip(&self.shared.applied)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Requests passed to the device so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Relays one client connection to a new connection to `upstream`, spoiling its answers, until
/// either side closes, a fault ends it, or `cancel`.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut device = tokio::select! {
        _ = cancel.cancelled() => return,
        connected = TcpStream::connect(upstream) => match connected {
            Ok(device) => device,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = device.set_nodelay(true);
    let mut from_client = [0u8; 512];
    let mut from_device = [0u8; 512];
    let mut requests: Vec<u8> = Vec::with_capacity(2 * from_client.len());
    let mut answers: Vec<u8> = Vec::with_capacity(2 * from_device.len());
    let mut pending: VecDeque<Outgoing> = VecDeque::with_capacity(MAX_PENDING);
    let mut muted = false;
    loop {
        let next = pending.front().map(|o| o.at);
        tokio::select! {
            _ = cancel.cancelled() => return,
            read = client.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { return };
                requests.extend_from_slice(&from_client[..n]);
                loop {
                    match frame_len(&requests) {
                        Ok(Some(len)) => {
                            if device.write_all(&requests[..len]).await.is_err() {
                                return;
                            }
                            shared.requests.fetch_add(1, Ordering::Relaxed);
                            requests.drain(..len);
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
            read = device.read(&mut from_device) => {
                let Ok(n @ 1..) = read else { return };
                answers.extend_from_slice(&from_device[..n]);
                loop {
                    match frame_len(&answers) {
                        Ok(Some(len)) => {
                            if !muted {
                                if let Action::Send { bytes, delay, then } = shared.decide(&answers[..len]) {
                                    pending.push_back(Outgoing { at: Instant::now() + delay, bytes, then });
                                }
                            }
                            answers.drain(..len);
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                if pending.len() > MAX_PENDING {
                    return;
                }
            }
            _ = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Some(out) = pending.pop_front() else { continue };
                if client.write_all(&out.bytes).await.is_err() {
                    return;
                }
                match out.then {
                    Then::Continue => {}
                    Then::Mute => {
                        muted = true;
                        pending.clear();
                    }
                    Then::Reset | Then::Close => {
                        tokio::time::sleep(MID_FRAME_PAUSE).await;
                        if out.then == Then::Reset {
                            let _ = client.set_zero_linger();
                        }
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio_modbus::client::{tcp, Reader};
    use tokio_modbus::Slave;

    /// An answer to a read of two holding registers (10, 11) with transaction id 0x0102, unit 1.
    const REGISTERS: [u8; 13] = [1, 2, 0, 0, 0, 7, 1, 3, 4, 0, 10, 0, 11];
    /// An answer to a read of three coils (on, off, on), transaction id 5, unit 1.
    const COILS: [u8; 10] = [0, 5, 0, 0, 0, 4, 1, 1, 1, 0b101];
    /// Exception 2 to a read of holding registers.
    const EXCEPTION: [u8; 9] = [0, 9, 0, 0, 0, 3, 1, 0x83, 2];

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn sent(fault: Fault, frame: &[u8]) -> (Vec<u8>, Duration, Then) {
        match spoil(fault, frame, &mut rng()) {
            Some(Action::Send { bytes, delay, then }) => (bytes, delay, then),
            other => panic!("{fault:?} should send something: {other:?}"),
        }
    }

    #[test]
    fn a_header_is_read_and_written_field_by_field() {
        let h = Mbap::parse(&REGISTERS).expect("header");
        assert_eq!(
            h,
            Mbap {
                transaction: 0x0102,
                protocol: 0,
                length: 7,
                unit: 1
            }
        );
        let mut out = [0xFFu8; 8];
        h.write(&mut out);
        assert_eq!(out[..MBAP_LEN], REGISTERS[..MBAP_LEN]);
        assert_eq!(out[MBAP_LEN], 0xFF, "nothing beyond the header is touched");
        assert_eq!(Mbap::parse(&REGISTERS[..6]), None);
    }

    #[test]
    fn frame_len_waits_for_the_whole_frame_and_stops_at_its_end() {
        for cut in 0..REGISTERS.len() {
            assert_eq!(frame_len(&REGISTERS[..cut]), Ok(None), "{cut} bytes");
        }
        assert_eq!(frame_len(&REGISTERS), Ok(Some(13)));
        let two: Vec<u8> = REGISTERS.iter().chain(&COILS).copied().collect();
        assert_eq!(frame_len(&two), Ok(Some(13)));
        assert_eq!(frame_len(&two[13..]), Ok(Some(10)));
        assert_eq!(frame_len(&EXCEPTION), Ok(Some(9)));
    }

    #[test]
    fn frame_len_refuses_headers_no_modbus_frame_has() {
        let mut frame = REGISTERS;
        frame[3] = 1;
        assert_eq!(frame_len(&frame), Err(FrameError::Protocol(1)));
        for length in [0u16, 1, MAX_LENGTH + 1, u16::MAX] {
            let mut frame = REGISTERS;
            frame[4..6].copy_from_slice(&length.to_be_bytes());
            assert_eq!(frame_len(&frame), Err(FrameError::Length(length)));
        }
        let mut longest = vec![0u8; 6 + usize::from(MAX_LENGTH)];
        longest[4..6].copy_from_slice(&MAX_LENGTH.to_be_bytes());
        assert_eq!(frame_len(&longest), Ok(Some(longest.len())));
    }

    #[test]
    fn none_and_late_pass_the_frame_unchanged() {
        assert_eq!(
            sent(Fault::None, &REGISTERS),
            (REGISTERS.to_vec(), Duration::ZERO, Then::Continue)
        );
        let late = Duration::from_millis(300);
        assert_eq!(
            sent(Fault::Late(late), &REGISTERS),
            (REGISTERS.to_vec(), late, Then::Continue)
        );
        assert_eq!(
            spoil(Fault::NoAnswer, &REGISTERS, &mut rng()),
            Some(Action::Swallow)
        );
    }

    #[test]
    fn mid_frame_faults_send_the_first_half_then_stall_reset_or_close() {
        for (fault, then) in [
            (Fault::Truncated, Then::Mute),
            (Fault::ResetMidFrame, Then::Reset),
            (Fault::CloseMidFrame, Then::Close),
        ] {
            assert_eq!(
                sent(fault, &REGISTERS),
                (REGISTERS[..6].to_vec(), Duration::ZERO, then)
            );
        }
    }

    #[test]
    fn header_faults_change_their_field_and_invert_the_data() {
        let inverted = [0xFF, 0xF5, 0xFF, 0xF4];
        let (bytes, ..) = sent(Fault::WrongTransactionId, &REGISTERS);
        assert_eq!(bytes[..2], [1, 1]);
        assert_eq!(bytes[2..9], REGISTERS[2..9]);
        assert_eq!(bytes[9..], inverted);
        let (bytes, ..) = sent(Fault::WrongUnitId, &REGISTERS);
        assert_eq!(bytes[6], 2);
        assert_eq!(bytes[..6], REGISTERS[..6]);
        assert_eq!(bytes[7..9], REGISTERS[7..9]);
        assert_eq!(bytes[9..], inverted);
    }

    #[test]
    fn a_wrong_function_code_is_another_read_and_keeps_the_exception_bit() {
        let (bytes, ..) = sent(Fault::WrongFunctionCode, &REGISTERS);
        assert_eq!(bytes[7], 4);
        assert_eq!(bytes[9..], [0xFF, 0xF5, 0xFF, 0xF4]);
        let (bytes, ..) = sent(Fault::WrongFunctionCode, &COILS);
        assert_eq!((bytes[7], bytes[9]), (2, !0b101));
        assert_eq!(
            sent(Fault::WrongFunctionCode, &EXCEPTION).0,
            [0, 9, 0, 0, 0, 3, 1, 0x84, 2]
        );
    }

    #[test]
    fn byte_count_faults_move_the_count_by_one_value_and_the_length_only_when_asked() {
        let (short, ..) = sent(Fault::WrongByteCount(ByteCount::Short), &REGISTERS);
        assert_eq!(short[8], 2);
        assert_eq!(
            frame_len(&short),
            Ok(Some(13)),
            "length counts the bytes sent"
        );
        let (long, ..) = sent(Fault::WrongByteCount(ByteCount::Long), &REGISTERS);
        assert_eq!(long[8], 6);
        assert_eq!(frame_len(&long), Ok(Some(13)));
        let (claims, ..) = sent(Fault::WrongByteCount(ByteCount::LongWithLength), &REGISTERS);
        assert_eq!(claims[8], 6);
        assert_eq!(claims.len(), 13);
        assert_eq!(
            frame_len(&claims),
            Ok(None),
            "it claims two bytes never sent"
        );
        let (bits, ..) = sent(Fault::WrongByteCount(ByteCount::Short), &COILS);
        assert_eq!(bits[8], 0);
        assert_eq!(
            spoil(
                Fault::WrongByteCount(ByteCount::Long),
                &EXCEPTION,
                &mut rng()
            ),
            None,
            "an exception carries no byte count"
        );
    }

    #[test]
    fn extra_values_make_a_consistent_frame_one_value_longer() {
        let (regs, ..) = sent(Fault::ExtraValues, &REGISTERS);
        assert_eq!(frame_len(&regs), Ok(Some(15)));
        assert_eq!(Mbap::parse(&regs).map(|h| h.length), Some(9));
        assert_eq!(regs[8], 6);
        assert_eq!(regs[9..13], REGISTERS[9..], "the data asked for is kept");
        let (bits, ..) = sent(Fault::ExtraValues, &COILS);
        assert_eq!(frame_len(&bits), Ok(Some(11)));
        assert_eq!(bits[8], 2);
        assert_eq!(spoil(Fault::ExtraValues, &EXCEPTION, &mut rng()), None);
    }

    #[test]
    fn fewer_values_make_a_consistent_frame_one_value_shorter() {
        let (regs, ..) = sent(Fault::FewerValues, &REGISTERS);
        assert_eq!(regs, [1, 2, 0, 0, 0, 5, 1, 3, 2, 0, 10]);
        assert_eq!(frame_len(&regs), Ok(Some(11)));
        let (bits, ..) = sent(Fault::FewerValues, &COILS);
        assert_eq!(bits, [0, 5, 0, 0, 0, 3, 1, 1, 0]);
        assert_eq!(spoil(Fault::FewerValues, &EXCEPTION, &mut rng()), None);
    }

    #[test]
    fn garbage_is_never_a_modbus_header() {
        let mut rng = rng();
        for _ in 0..2000 {
            let Some(Action::Send { bytes, .. }) = spoil(Fault::Garbage, &REGISTERS, &mut rng)
            else {
                panic!("garbage is sent");
            };
            assert!(GARBAGE_LEN.contains(&bytes.len()));
            assert!(frame_len(&bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn a_mix_passes_about_half_and_picks_every_fault_reproducibly() {
        let late = Duration::from_millis(500);
        let mode = Fault::Mix { seed: 42, late };
        let draw = || {
            let mut rng = StdRng::seed_from_u64(42);
            (0..4000).map(|_| pick(mode, &mut rng)).collect::<Vec<_>>()
        };
        let picks = draw();
        assert_eq!(picks, draw(), "the same seed gives the same faults");
        let none = picks.iter().filter(|f| **f == Fault::None).count();
        assert!((1800..2200).contains(&none), "{none} of 4000 pass");
        for fault in Fault::all(late) {
            assert!(picks.contains(&fault), "{fault:?} never picked");
        }
        assert!(
            picks.iter().all(|f| f.index().is_some()),
            "a mix picks no mix"
        );
    }

    #[tokio::test]
    async fn the_proxy_relays_answers_and_spoils_them_by_mode() {
        let device = SimDevice::new();
        device.image().hr[..2].copy_from_slice(&[10, 11]);
        let proxy = FaultyProxy::in_front_of(&device).await.expect("proxy");
        let mut client = tcp::connect_slave(proxy.addr(), Slave(1))
            .await
            .expect("connect");
        let regs = client.read_holding_registers(0, 2).await.expect("io");
        assert_eq!(regs, Ok(vec![10, 11]));

        proxy.set(Fault::WrongTransactionId);
        let answer = client.read_holding_registers(0, 2).await;
        assert!(
            matches!(answer, Err(tokio_modbus::Error::Protocol(_))),
            "{answer:?}"
        );
        assert_eq!(proxy.applied(Fault::WrongTransactionId), 1);
        assert_eq!(proxy.applied(Fault::None), 1);
        assert_eq!(proxy.requests(), 2);
        assert_eq!(proxy.connections(), 1);

        proxy.set(Fault::ResetMidFrame);
        let answer = client.read_holding_registers(0, 2).await;
        assert!(
            matches!(answer, Err(tokio_modbus::Error::Transport(_))),
            "{answer:?}"
        );
        assert_eq!(proxy.faults_applied(), 2);
    }
}
