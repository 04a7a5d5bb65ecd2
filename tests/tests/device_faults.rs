//! The Modbus TCP driver against a device whose answers go wrong in every way a field device, a
//! gateway in front of it or the network makes them go wrong: the fault-injecting proxy of
//! `gateway_tests::faulty` sits between the driver and the simulator.
//!
//! Each fault must turn the tags bad with its reason, drop the connection (it may hold a stray
//! answer that would be taken for the next request's) and open a new one, and give way to good
//! values once the fault stops: never a panic, a stuck driver or a wrong value reported good.
//! Every fault is played against a register read and a coil read at once.
//!
//! The soak plays the fault mix for 12 s (`GATEWAY_LONG_TESTS=1`: 2 minutes) and checks that
//! batches keep coming, good values are right, and the process's resident memory stays flat.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gateway_tests::faulty::{ByteCount, Fault, FaultyProxy};
use gateway_tests::fixtures::tag;
use gateway_tests::{all_good, init_tracing, long_mode, ModbusDriverRun};
use protocols::modbus::{Address, Area, DataType, ModbusSettings, TagSpec, WordOrder};
use protocols::model::{Batch, Quality, Reason, Value};
use protocols::sim::modbus::SimDevice;
use tokio::sync::RwLock;

const SCAN: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(200);
/// How late a late answer is: well after the driver gave up on it.
const LATE: Duration = Duration::from_millis(600);
/// The soak's pace: a short timeout and fast scans, so that it makes many requests and
/// connections in its time.
const SOAK_SCAN: Duration = Duration::from_millis(2);
const SOAK_TIMEOUT: Duration = Duration::from_millis(25);
/// Bad batches each fault test waits for: more than the three failures that demote a unit, so
/// the probing path runs too.
const BAD_BATCHES: usize = 4;

/// The tests of this file hold it shared; the soak holds it alone, so that no other test's
/// allocations move the resident memory it measures.
static ALONE: RwLock<()> = RwLock::const_new(());

/// Which values a rig's device holds and its tags read.
#[derive(Debug, Clone, Copy)]
enum Tags {
    /// hr:0 = 1234 and hr:2 = 4321 (u16), one read of holding registers.
    Registers,
    /// co:0 on, co:2 on, co:1 off between them: one read of coils.
    Coils,
    /// Both of the above: two reads per scan.
    Both,
}

impl Tags {
    fn specs(self, scan: Duration) -> Vec<(TagSpec, Value)> {
        let hr = |offset| Address {
            area: Area::HoldingRegister,
            offset,
        };
        let co = |offset| Address {
            area: Area::Coil,
            offset,
        };
        let registers = [
            (hr(0), DataType::U16, Value::UInt(1234)),
            (hr(2), DataType::U16, Value::UInt(4321)),
        ];
        let coils = [
            (co(0), DataType::Bool, Value::Bool(true)),
            (co(2), DataType::Bool, Value::Bool(true)),
        ];
        let picked: Vec<_> = match self {
            Tags::Registers => registers.to_vec(),
            Tags::Coils => coils.to_vec(),
            Tags::Both => registers.into_iter().chain(coils).collect(),
        };
        picked
            .into_iter()
            .enumerate()
            .map(|(i, (address, data_type, value))| {
                let name = format!("t{i}");
                let spec = tag(&name, address, data_type, WordOrder::ABCD, 0, scan);
                (spec, value)
            })
            .collect()
    }
}

fn device() -> SimDevice {
    let d = SimDevice::new();
    {
        let mut img = d.image();
        img.hr[0] = 1234;
        img.hr[1] = 9;
        img.hr[2] = 4321;
        img.co[..3].copy_from_slice(&[true, false, true]);
    }
    d
}

/// A driver on one Modbus TCP line to a simulated device behind the fault proxy.
struct Rig {
    proxy: FaultyProxy,
    expected: Vec<Value>,
    run: ModbusDriverRun,
    _device: SimDevice,
}

impl Rig {
    /// Starts a driver scanning `tags` every `scan`, with a request `timeout` and a reconnect
    /// backoff of a tenth to half of it.
    async fn start(tags: Tags, scan: Duration, timeout: Duration) -> Rig {
        let dev = device();
        let proxy = FaultyProxy::in_front_of(&dev).await.expect("proxy");
        let (specs, expected): (Vec<_>, Vec<_>) = tags.specs(scan).into_iter().unzip();
        let mut settings = ModbusSettings::tcp(proxy.addr().to_string(), 1, specs);
        settings.timeout = timeout;
        settings.backoff_min = timeout / 10;
        settings.backoff_max = timeout / 2;
        Rig {
            proxy,
            expected,
            run: ModbusDriverRun::start(settings),
            _device: dev,
        }
    }

    /// The next batch, whose good samples must carry their tags' values.
    async fn next(&mut self) -> Batch {
        let batch = self.run.next().await;
        for s in &batch.samples {
            if s.quality == Quality::Good {
                assert_eq!(
                    s.value.as_ref(),
                    self.expected.get(s.tag.0 as usize),
                    "a wrong value reported good under {:?}",
                    self.proxy.fault()
                );
            }
        }
        batch
    }

    /// Waits for a batch with every tag good.
    async fn until_good(&mut self) {
        for _ in 0..200 {
            let b = self.next().await;
            if b.samples.len() == self.expected.len() && all_good(&b) {
                return;
            }
        }
        panic!("no good values after 200 batches");
    }

    /// Stops the driver, which must end cleanly.
    async fn stop(self) {
        self.run.stop().await;
    }
}

/// Plays `fault` against a rig reading `tags`: the tags go bad with one of `reasons` only,
/// every spoilt answer costs its connection, and good values return once the fault stops.
async fn fault_on(tags: Tags, fault: Fault, reasons: &[Reason]) {
    let mut rig = Rig::start(tags, SCAN, TIMEOUT).await;
    rig.until_good().await;
    let connections = rig.proxy.connections();
    let reconnects = rig.run.status.reconnects.load(Ordering::Relaxed);

    rig.proxy.set(fault);
    let since = Instant::now();
    let mut bad = 0;
    while bad < BAD_BATCHES {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{fault:?} on {tags:?}: {bad} bad batches in 10 s, the fault goes unnoticed"
        );
        let b = rig.next().await;
        for s in &b.samples {
            if let Quality::Bad(reason) = s.quality {
                assert!(
                    reasons.contains(&reason),
                    "{fault:?} on {tags:?}: tags went bad with {reason}, expected one of {reasons:?}"
                );
            }
        }
        if !all_good(&b) {
            bad += 1;
        }
    }

    rig.proxy.set(Fault::None);
    rig.until_good().await;
    let applied = rig.proxy.applied(fault);
    assert!(applied >= 1, "{fault:?} was applied");
    let opened = rig.proxy.connections() - connections;
    assert!(
        opened >= applied,
        "{fault:?} on {tags:?}: every spoilt answer ends its connection ({applied} spoilt, {opened} connections opened)"
    );
    assert!(rig.run.status.reconnects.load(Ordering::Relaxed) - reconnects >= applied);
    assert!(rig.run.status.is_connected());
    rig.stop().await;
}

/// Plays `fault` against a register read and a coil read at once.
async fn fault_turns_tags_bad_with(fault: Fault, reasons: &[Reason]) {
    let _shared = ALONE.read().await;
    init_tracing();
    tokio::join!(
        fault_on(Tags::Registers, fault, reasons),
        fault_on(Tags::Coils, fault, reasons)
    );
}

#[tokio::test]
async fn a_swallowed_answer_is_a_timeout_and_the_connection_is_reopened() {
    fault_turns_tags_bad_with(Fault::NoAnswer, &[Reason::Timeout]).await;
}

#[tokio::test]
async fn a_late_answer_is_a_timeout_and_never_meets_the_next_request() {
    // The proxy delivers the late answer if the connection is still open: a driver that reused
    // it would see that answer for its next request (a protocol error), and open no connection.
    fault_turns_tags_bad_with(Fault::Late(LATE), &[Reason::Timeout]).await;
}

#[tokio::test]
async fn a_truncated_answer_is_a_timeout_and_the_connection_is_reopened() {
    fault_turns_tags_bad_with(Fault::Truncated, &[Reason::Timeout]).await;
}

#[tokio::test]
async fn an_answer_with_a_wrong_transaction_id_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::WrongTransactionId, &[Reason::Protocol]).await;
}

#[tokio::test]
async fn an_answer_from_a_wrong_unit_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::WrongUnitId, &[Reason::Protocol]).await;
}

#[tokio::test]
async fn an_answer_with_a_wrong_function_code_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::WrongFunctionCode, &[Reason::Protocol]).await;
}

#[tokio::test]
async fn a_byte_count_short_of_the_data_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::WrongByteCount(ByteCount::Short), &[Reason::Protocol]).await;
}

#[tokio::test]
async fn a_byte_count_beyond_the_data_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::WrongByteCount(ByteCount::Long), &[Reason::Protocol]).await;
}

#[tokio::test]
async fn a_frame_claiming_bytes_that_never_come_is_a_timeout() {
    fault_turns_tags_bad_with(
        Fault::WrongByteCount(ByteCount::LongWithLength),
        &[Reason::Timeout],
    )
    .await;
}

#[tokio::test]
async fn an_answer_with_more_values_than_asked_for_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::ExtraValues, &[Reason::Protocol]).await;
}

#[tokio::test]
async fn an_answer_with_fewer_values_than_asked_for_is_a_protocol_error() {
    fault_turns_tags_bad_with(Fault::FewerValues, &[Reason::Protocol]).await;
}

#[tokio::test]
async fn garbage_instead_of_an_answer_is_a_timeout_or_a_protocol_error() {
    // The client cannot tell where garbage ends: it reads the length in the bytes it got and
    // waits for the rest (a timeout), unless the length happens to fit (a bad protocol id).
    fault_turns_tags_bad_with(Fault::Garbage, &[Reason::Timeout, Reason::Protocol]).await;
}

#[tokio::test]
async fn a_reset_in_the_middle_of_an_answer_is_a_disconnection() {
    fault_turns_tags_bad_with(Fault::ResetMidFrame, &[Reason::Disconnected]).await;
}

#[tokio::test]
async fn a_close_in_the_middle_of_an_answer_is_a_disconnection() {
    fault_turns_tags_bad_with(Fault::CloseMidFrame, &[Reason::Disconnected]).await;
}

/// The process's resident memory in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Seed of the soak's fault mix (the same seed, the same sequence of faults).
const SOAK_SEED: u64 = 0x5EED_FA17;

/// Growth of resident memory the soak tolerates between the end of its warm-up and its end.
/// After warm-up the short soak opens some 400 connections and makes some 800 requests (the long
/// one some 4600 and 9200). Leaking the connections the driver drops (tried: the line driver
/// forgetting them instead of closing them, which also keeps the proxy's and the simulator's
/// ends alive) grew it by 8 MiB in the short soak; a leak of 1.3 KiB per request exceeds the
/// margin in the short soak, of 120 bytes in the long one. Without a leak it grew 0 to 64 KiB.
const RSS_MARGIN_KIB: u64 = 1024;

#[tokio::test]
async fn under_a_fault_mix_the_driver_keeps_reporting_right_values_in_flat_memory() {
    let _alone = ALONE.write().await;
    init_tracing();
    let (warm_up, total) = if long_mode() {
        (Duration::from_secs(15), Duration::from_secs(120))
    } else {
        (Duration::from_secs(3), Duration::from_secs(12))
    };
    let mut rig = Rig::start(Tags::Both, SOAK_SCAN, SOAK_TIMEOUT).await;
    rig.until_good().await;
    rig.proxy.set(Fault::Mix {
        seed: SOAK_SEED,
        late: SOAK_TIMEOUT * 3,
    });

    let started = Instant::now();
    let mut last = started;
    let mut longest_gap = Duration::ZERO;
    let (mut good, mut bad) = (0u64, 0u64);
    let mut reasons: Vec<(Reason, u64)> = Vec::new();
    let mut warm: Option<(u64, u64, u64)> = None;
    while started.elapsed() < total {
        let b = rig.next().await;
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
        if all_good(&b) {
            good += 1;
        } else {
            bad += 1;
        }
        if let Some(Quality::Bad(r)) = b.samples.first().map(|s| s.quality) {
            match reasons.iter_mut().find(|(seen, _)| *seen == r) {
                Some((_, n)) => *n += 1,
                None => reasons.push((r, 1)),
            }
        }
        if warm.is_none() && started.elapsed() >= warm_up {
            warm = Some((rss_kib(), rig.proxy.connections(), rig.proxy.requests()));
        }
    }
    let rss_end = rss_kib();
    let (rss_warm, connections_warm, requests_warm) = warm.expect("warm-up ended");
    let faults = rig.proxy.counts();
    let connections = rig.proxy.connections() - connections_warm;
    let requests = rig.proxy.requests() - requests_warm;

    rig.proxy.set(Fault::None);
    let recovery = Instant::now();
    rig.until_good().await;
    eprintln!(
        "soak {total:?} (warm-up {warm_up:?}): batches {good} good, {bad} bad {reasons:?}; \
         longest gap {longest_gap:?}; after warm-up {connections} connections, {requests} requests; \
         answers {faults:?}; RSS {rss_warm} KiB after warm-up, {rss_end} KiB at the end; \
         good again {:?} after the mix stopped",
        recovery.elapsed()
    );

    assert!(
        longest_gap < Duration::from_secs(2),
        "batches keep coming: the longest gap was {longest_gap:?}"
    );
    assert!(good > 0, "scans succeed between faults");
    assert!(bad > 0, "faults turn tags bad");
    for (name, n) in &faults {
        assert!(*n > 0, "the mix applied {name}");
    }
    assert!(
        rss_end <= rss_warm + RSS_MARGIN_KIB,
        "resident memory grew from {rss_warm} KiB to {rss_end} KiB over {connections} connections \
         and {requests} requests (margin {RSS_MARGIN_KIB} KiB)"
    );
    rig.stop().await;
}
