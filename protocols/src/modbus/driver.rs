//! The Modbus line driver: one task per line (a Modbus TCP connection, an RTU-over-TCP
//! converter or a serial port), shared by the line's units.
//!
//! Invariants:
//! - One transaction at a time on the line; the `Schedule` decides which unit goes next
//!   (earliest due first, round-robin on ties) and demotes units that stop answering, so a
//!   dead unit costs the healthy ones a bounded share of the line (see `schedule.rs`).
//! - "The device said no" (an exception) marks only the tags of that read bad and the scan goes
//!   on. "The unit did not answer" (timeout, garbled answer) ends that unit's scan and marks its
//!   tags bad; on Modbus TCP it also drops the connection (a late reply on a reused connection
//!   would be taken as the next answer), on RTU the line resynchronises by silence.
//!   "The link failed" (port gone, connection refused or reset) marks every unit's tags bad
//!   once per outage and reopens the line with capped, jittered backoff.
//! - Exception 02 (illegal data address) on a block that merged several tags splits the block
//!   at a tag boundary and retries at once; the split is kept, so a `max_gap` that bridges a
//!   hole in the device's register map never turns good tags bad.
//! - Each scan of a unit's scan class is one batch of that unit's device.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_modbus::ExceptionCode;
use tracing::{debug, info, warn};

use super::planner::{Block, Limits};
use super::scan::{self, ChangeFilter, ScanClass};
use super::schedule::{budgeted_probe_period, Schedule, Transition};
use super::transport::rtu::HOLD_OFF_TIMEOUTS;
use super::transport::{BlockData, Conn, ReadError};
use super::{codec, write};
use super::{ModbusSettings, TagSpec, UnitSettings};
use crate::backoff::Backoff;
use crate::driver::{
    next_write, refusing_writes, DriverContext, DriverError, ErrorKind, WriteDone, WriteError,
    WriteRequest,
};
use crate::model::{Batch, Reason, Sample, TagId, Timestamp};

/// Largest number of coils or discrete inputs in one request (Modbus limit).
const MAX_BITS: u16 = 2000;

/// Gateway exceptions: the gateway answered, but the unit behind it did not.
const GATEWAY_PATH_UNAVAILABLE: u8 = 0x0A;
const GATEWAY_TARGET_FAILED: u8 = 0x0B;

/// The limits the planner works with for these settings.
pub(crate) fn limits(settings: &ModbusSettings) -> Limits {
    Limits {
        max_registers: settings.max_registers_per_read.clamp(1, 125),
        max_bits: MAX_BITS,
        max_gap_registers: settings.max_gap,
        max_gap_bits: settings.max_gap.saturating_mul(16),
    }
}

/// One unit's runtime state.
struct Unit {
    ctx: DriverContext,
    settings: UnitSettings,
    filter: ChangeFilter,
    /// Whether its last job went unanswered (its failures are logged once per episode).
    failing: bool,
}

/// How one scan of a unit's class ended.
enum ScanEnd {
    /// Every block got an answer (data or an exception).
    Answered(Vec<Sample>),
    /// The unit did not answer or garbled its answer (or a gateway in front said so); the
    /// flag says whether the link may hold a late answer (not when a gateway answered).
    Silent(ReadError, Reason, bool),
    /// The line failed.
    LinkDown(ReadError),
}

/// Runs the driver of one line until the context is cancelled. `units` holds one context per
/// unit of `settings.units`, in the same order.
pub async fn run(settings: ModbusSettings, units: Vec<DriverContext>) -> Result<(), DriverError> {
    let Some(first) = units.first() else {
        return Err(DriverError::Config(
            "a Modbus line needs at least one unit".into(),
        ));
    };
    let cancel = first.cancel.clone();
    if units.len() != settings.units.len() {
        return Err(DriverError::Config(format!(
            "line {}: {} unit contexts for {} units",
            first.name,
            units.len(),
            settings.units.len()
        )));
    }
    if let Some(u) = settings
        .units
        .iter()
        .zip(&units)
        .find(|(u, _)| u.tags.is_empty())
    {
        return Err(DriverError::Config(format!(
            "device {} has no tags",
            u.1.name
        )));
    }
    let line_name = line_name(&units, &settings);
    let start = Instant::now();
    let limits = limits(&settings);
    let schedule_units = settings
        .units
        .iter()
        .map(|u| scan::classes(&u.tags, limits, start))
        .collect();
    let first_probe = if settings.units.len() > 1 {
        budgeted_probe_period(settings.timeout)
    } else {
        settings.backoff_min
    };
    // Modbus TCP drops the connection after a failed read, so no late answer can come back;
    // an RTU line holds the unit back instead (see `transport/rtu.rs`).
    let hold_off = if settings.link.is_rtu() {
        settings.timeout * HOLD_OFF_TIMEOUTS
    } else {
        Duration::ZERO
    };
    let mut schedule = Schedule::new(schedule_units, first_probe, settings.backoff_max, hold_off);
    let mut units: Vec<Unit> = settings
        .units
        .iter()
        .cloned()
        .zip(units)
        .map(|(s, ctx)| Unit {
            filter: ChangeFilter::new(settings.report, settings.max_silence, &s.tags),
            settings: s,
            ctx,
            failing: false,
        })
        .collect();
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut conn: Option<Conn> = None;
    // Whether the tags already went bad for the current outage (reported once per episode).
    let mut line_down = false;
    // Whether a failed (re)open was logged in this outage: the first one says why.
    let mut open_failure_logged = false;
    // Whether any unit answered since the line was opened: when none ever does, the line's
    // settings or wiring are the likelier cause than every unit being dead.
    let mut answered_since_open = false;
    let mut silent_line_logged = false;
    let mut attempts: u64 = 0;

    // Every unit's context holds the same inbox (one per line).
    let inbox = units.iter().find_map(|u| u.ctx.writes.clone());

    loop {
        let next = schedule.next_due();
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = sleep_until(next) => {}
            request = next_write(inbox.as_ref()) => {
                let dropped =
                    write_request(&mut conn, &settings, &units, &mut schedule, request).await;
                if dropped {
                    units.iter().for_each(|u| {
                        u.ctx.status.connected.store(false, Ordering::Relaxed);
                    });
                }
                continue;
            }
        }
        let Some(job) = schedule.pick(Instant::now()) else {
            continue;
        };

        if conn.is_none() {
            if attempts > 0 {
                units.iter().for_each(|u| {
                    u.ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
                });
            }
            attempts += 1;
            let opened = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                c = Conn::open(&settings) => c,
            };
            match opened {
                Ok(c) => {
                    if attempts == 1 || line_down {
                        info!(line = %line_name, target = settings.link.target(), "line open");
                    }
                    conn = Some(c);
                    open_failure_logged = false;
                    answered_since_open = false;
                    // `silent_line_logged` stays set until a unit answers: a device that answers
                    // garbage and is reopened each time gets its hint once per episode.
                    // The backoff is reset by the first answer, not here: a port that opens
                    // and fails at once must not be reopened in a tight loop.
                    if line_down {
                        line_down = false;
                        units.iter_mut().for_each(|u| u.filter.reset());
                        schedule.all_due(Instant::now());
                    }
                    for (i, u) in units.iter().enumerate() {
                        u.ctx
                            .status
                            .connected
                            .store(!schedule.is_demoted(i), Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    units.iter().for_each(|u| {
                        u.ctx.status.connected.store(false, Ordering::Relaxed);
                    });
                    if !open_failure_logged {
                        warn!(line = %line_name, target = settings.link.target(), error = %e, "cannot open the line; retrying with backoff");
                        open_failure_logged = true;
                    } else {
                        debug!(line = %line_name, error = %e, "reopening the line failed");
                    }
                    if !line_down {
                        line_down = true;
                        for u in &mut units {
                            emit_unit_bad(u, reason_of(&e)).await?;
                        }
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = refusing_writes(inbox.as_ref(), tokio::time::sleep(delay)) => {}
                    }
                    continue;
                }
            }
        }
        let Some(link) = conn.as_mut() else {
            continue;
        };
        let Some(unit) = units.get_mut(job.unit) else {
            continue;
        };
        let Some(class) = schedule.class_mut(job) else {
            continue;
        };

        let started = Instant::now();
        let end = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            end = scan_class(link, class, &settings, unit) => end,
        };
        match end {
            ScanEnd::Answered(samples) => {
                let us = started.elapsed().as_micros() as u64;
                unit.ctx.status.answered(us);
                emit(unit, samples).await?;
                backoff.reset();
                answered_since_open = true;
                silent_line_logged = false;
                if unit.failing && !job.probe {
                    info!(line = %line_name, unit = %unit.ctx.name, "unit answers again");
                }
                unit.failing = false;
                let transition = schedule.finish(job, true, Instant::now());
                report_transition(&line_name, unit, &settings, transition);
            }
            ScanEnd::Silent(e, reason, link_suspect) => {
                unit.ctx.status.count_error(ErrorKind::of(reason));
                if unit.failing {
                    debug!(line = %line_name, unit = %unit.ctx.name, error = %e, "unit still not answering");
                } else {
                    warn!(line = %line_name, unit = %unit.ctx.name, unit_id = unit.settings.unit_id, error = %e, "unit did not answer");
                }
                unit.failing = true;
                emit_unit_bad(unit, reason).await?;
                let transition = schedule.finish(job, false, Instant::now());
                report_transition(&line_name, unit, &settings, transition);
                let all_demoted = (0..units.len()).all(|i| schedule.is_demoted(i));
                if all_demoted && !answered_since_open && !silent_line_logged {
                    silent_line_logged = true;
                    warn!(line = %line_name, target = settings.link.target(), settings = %line_settings(&settings), hint = silent_line_hint(&settings.link), "no unit on the line has answered since it was opened");
                }
                if link_suspect && link.drop_after_failed_read() {
                    units.iter().for_each(|u| {
                        u.ctx.status.connected.store(false, Ordering::Relaxed);
                    });
                    if let Some(c) = conn.take() {
                        c.close().await;
                    }
                }
            }
            ScanEnd::LinkDown(e) => {
                unit.ctx.status.count_error(ErrorKind::Link);
                warn!(line = %line_name, target = settings.link.target(), error = %e, "line failed; reopening it");
                open_failure_logged = false;
                if let Some(c) = conn.take() {
                    c.close().await;
                }
                line_down = true;
                for u in &mut units {
                    u.ctx.status.connected.store(false, Ordering::Relaxed);
                    emit_unit_bad(u, Reason::Disconnected).await?;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = refusing_writes(inbox.as_ref(), tokio::time::sleep(delay)) => {}
                }
            }
        }
    }
}

/// Sleeps until `next`, or for ever when nothing is scheduled.
async fn sleep_until(next: Option<Instant>) {
    match next {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Performs one write request between two scans and answers it. Returns whether the
/// connection was dropped (a write that got no valid answer leaves a Modbus TCP connection
/// unusable, as a read does; an RTU line only when the link itself failed). A unit held back
/// after a request it did not answer takes no write until the hold-off is over (its late
/// answer must not be taken for the write's), and a write it does not answer holds it back
/// the same way, scans included.
async fn write_request(
    conn: &mut Option<Conn>,
    settings: &ModbusSettings,
    units: &[Unit],
    schedule: &mut Schedule,
    request: WriteRequest,
) -> bool {
    if request.abandoned() {
        return false;
    }
    let WriteRequest {
        device,
        tag,
        value,
        reply,
    } = request;
    let open = conn.is_some();
    let outcome = match units.iter().position(|u| u.ctx.device == device) {
        None => Err(WriteError::UnknownTag),
        Some(i) if schedule.is_held(i, Instant::now()) => Err(WriteError::Refused(
            "the unit did not answer its last request and is held back for a moment (a late \
             answer may still come); nothing was written, try again"
                .into(),
        )),
        Some(i) => match units[i].settings.tags.get(tag.0 as usize) {
            None => Err(WriteError::UnknownTag),
            Some(spec) => {
                let mut unanswered = false;
                let outcome = write_tag(
                    conn,
                    settings,
                    &units[i],
                    spec,
                    tag,
                    &value,
                    &mut unanswered,
                )
                .await;
                if unanswered {
                    schedule.hold(i, Instant::now());
                }
                outcome
            }
        },
    };
    if let Err(outcome) = reply.send(outcome) {
        // The commands task gave up waiting: the real outcome is audited here.
        tracing::warn!(target: "audit", device = device.0, tag = tag.0, outcome = ?outcome, "a write finished after its command was answered as failed");
    }
    open && conn.is_none()
}

/// Closes the line after a transaction that failed with `e` when it cannot be used any more:
/// a failed link always, a missing or garbled answer on Modbus TCP (a late reply would be
/// taken for the next request's). An RTU line resynchronises by silence instead.
async fn drop_if_unusable(conn: &mut Option<Conn>, e: &ReadError) {
    let unusable =
        matches!(e, ReadError::Link(_)) || conn.as_ref().is_some_and(Conn::drop_after_failed_read);
    if unusable {
        if let Some(c) = conn.take() {
            c.close().await;
        }
    }
}

/// Writes `value` to one tag of a unit and reads the tag back; sets `unanswered` when one of
/// its transactions got no valid answer.
async fn write_tag(
    conn: &mut Option<Conn>,
    settings: &ModbusSettings,
    unit: &Unit,
    spec: &TagSpec,
    tag: TagId,
    value: &crate::model::Value,
    unanswered: &mut bool,
) -> Result<WriteDone, WriteError> {
    let plan = write::plan(spec, value).map_err(|e| WriteError::Refused(e.to_string()))?;
    let Some(link) = conn.as_mut() else {
        return Err(WriteError::NotConnected);
    };
    let status = &unit.ctx.status;
    // A read that timed out or failed on the link: the write fails before it is sent.
    let previous = match read_tag(link, settings, unit, spec, tag).await {
        Ok(previous) => previous,
        Err(e) => {
            *unanswered = true;
            status.count_error(ErrorKind::of(reason_of(&e)));
            drop_if_unusable(conn, &e).await;
            return Err(WriteError::Failed(Box::new(e)));
        }
    };
    status.requests.fetch_add(1, Ordering::Relaxed);
    let unit_id = unit.settings.unit_id;
    let start = spec.address.offset;
    match link.write(unit_id, start, &plan, settings.timeout).await {
        Ok(Ok(())) => {}
        Ok(Err(ExceptionCode::IllegalFunction))
            if matches!(plan, write::WritePlan::Mask { .. }) =>
        {
            status.count_error(ErrorKind::Exception);
            return Err(WriteError::Unsupported(format!(
                "the device does not take the mask write (function 22, exception 01), so bit {} \
                 of {} cannot be written alone; writing the whole register could overwrite \
                 other bits the device changed meanwhile, so nothing was written",
                spec.bit.unwrap_or(0),
                spec.address
            )));
        }
        Ok(Err(code)) => {
            status.count_error(ErrorKind::Exception);
            return Err(WriteError::Exception(u8::from(code)));
        }
        Err(e) => {
            *unanswered = true;
            status.count_error(ErrorKind::of(reason_of(&e)));
            drop_if_unusable(conn, &e).await;
            return Err(WriteError::Failed(Box::new(e)));
        }
    }
    // The write is done whatever the read back gives; a failure there still drops an
    // unusable connection, as a scan would.
    let read_back = match read_tag(link, settings, unit, spec, tag).await {
        Ok(value) => value,
        Err(e) => {
            *unanswered = true;
            status.count_error(ErrorKind::of(reason_of(&e)));
            drop_if_unusable(conn, &e).await;
            None
        }
    };
    Ok(WriteDone {
        previous,
        read_back,
    })
}

/// Reads one tag alone, as a scan would: None when the device answers with an exception or
/// something undecodable, an error when the link failed or timed out.
async fn read_tag(
    link: &mut Conn,
    settings: &ModbusSettings,
    unit: &Unit,
    spec: &TagSpec,
    tag: TagId,
) -> Result<Option<crate::model::Value>, ReadError> {
    unit.ctx.status.requests.fetch_add(1, Ordering::Relaxed);
    let block = Block {
        area: spec.address.area,
        start: spec.address.offset,
        count: spec.width(),
        slots: vec![super::planner::Slot {
            tag,
            offset: 0,
            width: spec.width(),
        }],
    };
    let answer = link
        .read(
            unit.settings.unit_id,
            block.area,
            block.start,
            block.count,
            settings.timeout,
        )
        .await;
    match answer {
        Ok(Ok(data)) => {
            let mut samples = Vec::with_capacity(1);
            decode_block(
                &block,
                &data,
                &unit.settings.tags,
                Timestamp::now(),
                &mut samples,
            );
            Ok(samples.pop().and_then(|s| s.value))
        }
        Ok(Err(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The serial settings of a line for logs (`19200 8E1`), or its kind.
fn line_settings(settings: &ModbusSettings) -> String {
    match &settings.link {
        super::Link::Rtu(serial) => {
            let parity = match serial.parity {
                super::Parity::None => 'N',
                super::Parity::Even => 'E',
                super::Parity::Odd => 'O',
            };
            format!(
                "{} {}{parity}{}",
                serial.baud_rate, serial.data_bits, serial.stop_bits
            )
        }
        super::Link::RtuOverTcp { .. } => "RTU over TCP (serial settings on the converter)".into(),
        super::Link::Tcp { .. } => "Modbus TCP".into(),
    }
}

/// What to check when no unit on a line has ever answered, for the line's transport: the wiring
/// and serial settings only where there is a serial line.
fn silent_line_hint(link: &super::Link) -> &'static str {
    match link {
        super::Link::Rtu(_) => {
            "check the baud rate, parity and stop bits against the devices, the A/B wiring and termination, and the unit ids"
        }
        super::Link::RtuOverTcp { .. } => {
            "check that the converter is in RTU-over-TCP (transparent) mode, its baud rate, parity and stop bits against the devices, its A/B wiring and termination, and the unit ids"
        }
        super::Link::Tcp { .. } => {
            "check that the address is a Modbus TCP server (not a converter expecting RTU frames, nor another service on that port) and the unit ids"
        }
    }
}

/// The line's name for logs: the device name, without a unit suffix.
fn line_name(units: &[DriverContext], settings: &ModbusSettings) -> String {
    let first = units.first().map_or("", |u| &*u.name);
    match settings.units.first().and_then(|u| u.name.as_deref()) {
        Some(unit) => first
            .strip_suffix(unit)
            .and_then(|s| s.strip_suffix('/'))
            .unwrap_or(first)
            .to_string(),
        None => first.to_string(),
    }
}

fn report_transition(
    line: &str,
    unit: &Unit,
    settings: &ModbusSettings,
    transition: Option<Transition>,
) {
    match transition {
        Some(Transition::Demoted { period }) => {
            unit.ctx.status.connected.store(false, Ordering::Relaxed);
            if settings.units.len() > 1 {
                warn!(line = %line, unit = %unit.ctx.name, unit_id = unit.settings.unit_id, probe_every = ?period, "unit demoted: it is probed with backoff while the other units keep their scan rates");
            } else {
                warn!(line = %line, unit_id = unit.settings.unit_id, probe_every = ?period, "device keeps not answering: probing it with backoff");
            }
        }
        Some(Transition::Promoted) => {
            unit.ctx.status.connected.store(true, Ordering::Relaxed);
            info!(line = %line, unit = %unit.ctx.name, unit_id = unit.settings.unit_id, "unit answers again: scanned at its rates");
        }
        None => {}
    }
}

fn reason_of(e: &ReadError) -> Reason {
    match e {
        ReadError::NoAnswer(_) => Reason::Timeout,
        ReadError::Garbled(_) | ReadError::Mismatch(_) => Reason::Protocol,
        ReadError::Link(_) => Reason::Disconnected,
    }
}

async fn emit(unit: &mut Unit, samples: Vec<Sample>) -> Result<(), DriverError> {
    let read_at = Instant::now();
    let samples: Vec<Sample> = samples
        .into_iter()
        .filter(|s| unit.filter.admit(s, read_at))
        .collect();
    if samples.is_empty() {
        return Ok(());
    }
    let batch = Batch {
        device: unit.ctx.device,
        samples,
        read_at,
    };
    unit.ctx.emitter.emit(batch, &unit.ctx.status).await
}

async fn emit_unit_bad(unit: &mut Unit, reason: Reason) -> Result<(), DriverError> {
    let now = Timestamp::now();
    let samples = (0..unit.settings.tags.len())
        .map(|i| Sample::bad(TagId(i as u32), reason, now))
        .collect();
    emit(unit, samples).await
}

/// Reads every block of a class of one unit.
async fn scan_class(
    link: &mut Conn,
    class: &mut ScanClass,
    settings: &ModbusSettings,
    unit: &Unit,
) -> ScanEnd {
    let ctx = &unit.ctx;
    let tags = &unit.settings.tags;
    let mut samples = Vec::with_capacity(class.blocks.iter().map(|b| b.slots.len()).sum());
    let mut i = 0;
    while i < class.blocks.len() {
        let block = &class.blocks[i];
        ctx.status.requests.fetch_add(1, Ordering::Relaxed);
        let answer = match link
            .read(
                unit.settings.unit_id,
                block.area,
                block.start,
                block.count,
                settings.timeout,
            )
            .await
        {
            Ok(answer) => answer,
            Err(e @ ReadError::Link(_)) => return ScanEnd::LinkDown(e),
            Err(e) => {
                let reason = reason_of(&e);
                return ScanEnd::Silent(e, reason, true);
            }
        };
        let now = Timestamp::now();
        match answer {
            Ok(data) => {
                decode_block(block, &data, tags, now, &mut samples);
                i += 1;
            }
            Err(ExceptionCode::IllegalDataAddress) if block.slots.len() > 1 => {
                if let Some((a, b)) = block.split() {
                    info!(
                        device = %ctx.name,
                        area = block.area.prefix(),
                        start = block.start,
                        count = block.count,
                        "device refused a merged read (illegal data address); splitting it for good"
                    );
                    class.blocks.splice(i..=i, [a, b]);
                    continue;
                }
                ctx.status.count_error(ErrorKind::Exception);
                mark_bad(block, 2, now, &mut samples);
                i += 1;
            }
            Err(code) => {
                let code = u8::from(code);
                if code == GATEWAY_PATH_UNAVAILABLE || code == GATEWAY_TARGET_FAILED {
                    // The gateway in front answered for a unit that did not.
                    return ScanEnd::Silent(
                        ReadError::Garbled(format!(
                            "the gateway reports the unit unreachable (exception {code})"
                        )),
                        Reason::Exception(code),
                        false,
                    );
                }
                ctx.status.count_error(ErrorKind::Exception);
                debug!(device = %ctx.name, area = block.area.prefix(), start = block.start, code, "device answered with an exception");
                mark_bad(block, code, now, &mut samples);
                i += 1;
            }
        }
    }
    ScanEnd::Answered(samples)
}

fn mark_bad(block: &Block, code: u8, now: Timestamp, out: &mut Vec<Sample>) {
    out.extend(
        block
            .slots
            .iter()
            .map(|s| Sample::bad(s.tag, Reason::Exception(code), now)),
    );
}

fn decode_block(
    block: &Block,
    data: &BlockData,
    tags: &[TagSpec],
    now: Timestamp,
    out: &mut Vec<Sample>,
) {
    for slot in &block.slots {
        let Some(spec) = tags.get(slot.tag.0 as usize) else {
            continue;
        };
        let start = usize::from(slot.offset);
        let end = start + usize::from(slot.width);
        let value = match data {
            BlockData::Registers(regs) if spec.bit.is_some() => regs
                .get(start)
                .zip(spec.bit)
                .map(|(&reg, bit)| codec::decode_register_bit(reg, bit)),
            BlockData::Registers(regs) => regs.get(start..end).and_then(|r| {
                codec::decode_registers(spec.data_type, spec.order, spec.length, r)
                    .ok()
                    .map(|v| codec::apply_scaling(v, spec.scale, spec.offset))
            }),
            BlockData::Bits(bits) => bits.get(start).map(|b| codec::decode_bit(*b)),
        };
        out.push(match value {
            Some(v) => Sample::good(slot.tag, v, now),
            None => Sample::bad(slot.tag, Reason::Decode, now),
        });
    }
}

/// Performs one read on a line opened for it, for the `read` command: the raw answer.
pub async fn read_once(
    settings: &ModbusSettings,
    unit_id: u8,
    area: super::Area,
    start: u16,
    count: u16,
) -> Result<Result<BlockData, ExceptionCode>, ReadError> {
    let mut conn = Conn::open(settings).await?;
    let answer = conn
        .read(unit_id, area, start, count, settings.timeout)
        .await;
    conn.close().await;
    answer
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn a_silent_modbus_tcp_device_gets_no_serial_wiring_hint() {
        let hint = silent_line_hint(&super::super::Link::Tcp {
            address: "127.0.0.1:502".into(),
        });
        assert!(!hint.contains("baud"), "{hint}");
        assert!(!hint.contains("A/B"), "{hint}");
        assert!(hint.contains("Modbus TCP server"), "{hint}");
    }

    #[test]
    fn a_silent_converter_gets_its_serial_settings_and_mode_hint() {
        let hint = silent_line_hint(&super::super::Link::RtuOverTcp {
            address: "127.0.0.1:4001".into(),
        });
        assert!(hint.contains("RTU-over-TCP"), "{hint}");
        assert!(hint.contains("A/B wiring"), "{hint}");
    }
}
