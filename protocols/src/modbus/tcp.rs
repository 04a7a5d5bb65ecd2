//! The Modbus TCP driver: one task per device connection.
//!
//! Invariants:
//! - A connection that saw a timeout or a transport error is dropped, never reused: a late reply
//!   on a reused connection would be taken as the answer to the next request.
//! - "The device said no" (an exception) marks only the tags of that read bad and the scan goes
//!   on; "the link failed" marks every tag bad (`disconnected`) once and reconnects with capped,
//!   jittered backoff.
//! - Exception 02 (illegal data address) on a block that merged several tags splits the block at
//!   a tag boundary and retries at once; the split is kept, so a `max_gap` that bridges a hole in
//!   the device's register map never turns good tags bad.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_modbus::client::{tcp, Client, Context, Reader};
use tokio_modbus::{ExceptionCode, Slave};
use tracing::{debug, info, warn};

use super::codec;
use super::planner::{Block, Limits};
use super::scan::{self, ChangeFilter, ScanClass};
use super::{Area, ModbusTcpSettings, TagSpec};
use crate::backoff::Backoff;
use crate::driver::{DriverContext, DriverError};
use crate::model::{Batch, Reason, Sample, TagId, Timestamp};

/// Largest number of coils or discrete inputs in one request (Modbus limit).
const MAX_BITS: u16 = 2000;

/// Why a read failed in a way that ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed or the answer did not match the request.
    #[error("{0}")]
    Transport(String),
}

impl LinkError {
    fn reason(&self) -> Reason {
        match self {
            LinkError::Timeout(_) => Reason::Timeout,
            LinkError::Transport(_) => Reason::Disconnected,
        }
    }
}

/// The data of one block read.
enum BlockData {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

/// The limits the planner works with for these settings.
pub fn limits(settings: &ModbusTcpSettings) -> Limits {
    Limits {
        max_registers: settings.max_registers_per_read.clamp(1, 125),
        max_bits: MAX_BITS,
        max_gap_registers: settings.max_gap,
        max_gap_bits: settings.max_gap.saturating_mul(16),
    }
}

/// Runs the driver until the context is cancelled.
pub async fn run(settings: ModbusTcpSettings, ctx: DriverContext) -> Result<(), DriverError> {
    if settings.tags.is_empty() {
        return Err(DriverError::Config(format!(
            "device {} has no tags",
            ctx.name
        )));
    }
    let mut classes = scan::classes(&settings.tags, limits(&settings), Instant::now());
    let mut filter = ChangeFilter::new(settings.report, settings.max_silence, &settings.tags);
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut conn: Option<Context> = None;
    // Whether the tags already went bad for the current outage (reported once per episode).
    let mut reported_down = false;
    let mut attempts: u64 = 0;

    loop {
        if conn.is_none() {
            if attempts > 0 {
                ctx.status.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            let connected = tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                c = connect(&settings) => c,
            };
            match connected {
                Ok(c) => {
                    info!(device = %ctx.name, address = %settings.address, "connected to device");
                    ctx.status.connected.store(true, Ordering::Relaxed);
                    conn = Some(c);
                    backoff.reset();
                    reported_down = false;
                    filter.reset();
                    let now = Instant::now();
                    classes.iter_mut().for_each(|c| c.next_due = now);
                }
                Err(e) => {
                    if !reported_down {
                        warn!(device = %ctx.name, address = %settings.address, error = %e, "cannot connect to device; retrying with backoff");
                        emit_all_bad(&ctx, &settings.tags, e.reason(), &mut filter).await?;
                        reported_down = true;
                    } else {
                        debug!(device = %ctx.name, error = %e, "reconnect failed");
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
        }

        let next = classes
            .iter()
            .map(|c| c.next_due)
            .min()
            .unwrap_or_else(Instant::now);
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(next.into()) => {}
        }

        let Some(client) = conn.as_mut() else {
            continue;
        };
        let now = Instant::now();
        let mut failure = None;
        for class in classes.iter_mut().filter(|c| c.next_due <= now) {
            let started = Instant::now();
            match scan_class(client, class, &settings, &ctx).await {
                Ok(samples) => {
                    ctx.status.scans.fetch_add(1, Ordering::Relaxed);
                    ctx.status
                        .last_scan_us
                        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let read_at = Instant::now();
                    let samples: Vec<Sample> = samples
                        .into_iter()
                        .filter(|s| filter.admit(s, read_at))
                        .collect();
                    if !samples.is_empty() {
                        let batch = Batch {
                            device: ctx.device,
                            samples,
                            read_at,
                        };
                        ctx.emitter.emit(batch, &ctx.status).await?;
                    }
                    class.advance(Instant::now());
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            ctx.status.errors.fetch_add(1, Ordering::Relaxed);
            ctx.status.connected.store(false, Ordering::Relaxed);
            warn!(device = %ctx.name, error = %e, "device link failed; dropping the connection");
            // Dropping the context closes the socket; a late answer can never reach a new request.
            if let Some(mut c) = conn.take() {
                let _ = tokio::time::timeout(Duration::from_millis(100), c.disconnect()).await;
            }
            emit_all_bad(&ctx, &settings.tags, e.reason(), &mut filter).await?;
            reported_down = true;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

async fn emit_all_bad(
    ctx: &DriverContext,
    tags: &[TagSpec],
    reason: Reason,
    filter: &mut ChangeFilter,
) -> Result<(), DriverError> {
    let now = Timestamp::now();
    let read_at = Instant::now();
    let samples: Vec<Sample> = (0..tags.len())
        .map(|i| Sample::bad(TagId(i as u32), reason, now))
        .filter(|s| filter.admit(s, read_at))
        .collect();
    if samples.is_empty() {
        return Ok(());
    }
    ctx.emitter
        .emit(
            Batch {
                device: ctx.device,
                samples,
                read_at,
            },
            &ctx.status,
        )
        .await
}

async fn connect(settings: &ModbusTcpSettings) -> Result<Context, LinkError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(settings.address.as_str())
            .await
            .map_err(|e| LinkError::Transport(format!("cannot resolve: {e}")))?
            .collect();
        let mut last = LinkError::Transport("address resolves to nothing".into());
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(tcp::attach_slave(stream, Slave(settings.unit_id)));
                }
                Err(e) => last = LinkError::Transport(e.to_string()),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(LinkError::Timeout(settings.timeout)),
    }
}

/// Reads every block of a class; exceptions become bad samples, link failures end the scan.
async fn scan_class(
    client: &mut Context,
    class: &mut ScanClass,
    settings: &ModbusTcpSettings,
    ctx: &DriverContext,
) -> Result<Vec<Sample>, LinkError> {
    let mut samples = Vec::with_capacity(class.blocks.iter().map(|b| b.slots.len()).sum());
    let mut i = 0;
    while i < class.blocks.len() {
        let block = &class.blocks[i];
        ctx.status.requests.fetch_add(1, Ordering::Relaxed);
        let answer = read_block(client, block, settings.timeout).await?;
        let now = Timestamp::now();
        match answer {
            Ok(data) => {
                decode_block(block, &data, &settings.tags, now, &mut samples);
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
                ctx.status.errors.fetch_add(1, Ordering::Relaxed);
                mark_bad(block, 2, now, &mut samples);
                i += 1;
            }
            Err(code) => {
                ctx.status.errors.fetch_add(1, Ordering::Relaxed);
                debug!(device = %ctx.name, area = block.area.prefix(), start = block.start, code = u8::from(code), "device answered with an exception");
                mark_bad(block, u8::from(code), now, &mut samples);
                i += 1;
            }
        }
    }
    Ok(samples)
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

async fn read_block(
    client: &mut Context,
    block: &Block,
    timeout: Duration,
) -> Result<Result<BlockData, ExceptionCode>, LinkError> {
    let (start, count) = (block.start, block.count);
    let request = async {
        Ok::<_, tokio_modbus::Error>(match block.area {
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
        Err(_) => Err(LinkError::Timeout(timeout)),
        Ok(Err(e)) => Err(LinkError::Transport(e.to_string())),
        Ok(Ok(answer)) => {
            // A short answer is a device fault, not a reason to index out of bounds later.
            if let Ok(data) = &answer {
                let got = match data {
                    BlockData::Registers(r) => r.len(),
                    BlockData::Bits(b) => b.len(),
                };
                if got < usize::from(count) {
                    return Err(LinkError::Transport(format!(
                        "answer holds {got} values, {count} were asked for"
                    )));
                }
            }
            Ok(answer)
        }
    }
}
