//! Modbus RTU lines: the line driver on a pseudo-terminal pair and on RTU over TCP, against the
//! in-process RTU simulator with several units, a dead one and a late one; and a Modbus TCP
//! gateway with units behind it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::fixtures::tag;
use gateway_tests::init_tracing;
use protocols::driver::{DeviceStatus, DriverContext, Emitter};
use protocols::modbus::{
    self, Address, Area, DataType, Link, ModbusSettings, Parity, SerialSettings, UnitSettings,
    WordOrder, BUDGET_FACTOR,
};
use protocols::model::{Batch, DeviceId, Quality, Reason, Value};
use protocols::sim::modbus::SimDevice;
use protocols::sim::rtu::RtuSim;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SCAN: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(150);

fn hr(offset: u16) -> Address {
    Address {
        area: Area::HoldingRegister,
        offset,
    }
}

/// A device whose hr:0 holds `marker` and hr:1..3 an f32 in CDAB order, so a frame taken from
/// the wrong unit shows.
fn device(marker: u16) -> SimDevice {
    let d = SimDevice::new();
    {
        let mut img = d.image();
        img.hr[0] = marker;
        img.set(
            Area::HoldingRegister,
            1,
            DataType::F32,
            WordOrder::CDAB,
            0,
            &Value::Float(f64::from(marker) / 4.0),
        );
    }
    d
}

fn unit(name: &str, unit_id: u8) -> UnitSettings {
    UnitSettings {
        name: Some(name.into()),
        unit_id,
        tags: vec![
            tag("marker", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
            tag("power", hr(1), DataType::F32, WordOrder::CDAB, 0, SCAN),
        ]
        .into(),
    }
}

fn serial(port: &Path, units: Vec<UnitSettings>) -> ModbusSettings {
    ModbusSettings {
        link: Link::Rtu(SerialSettings {
            port: port.display().to_string(),
            baud_rate: 19_200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        }),
        timeout: TIMEOUT,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        units,
        ..ModbusSettings::tcp(String::new(), 1, Vec::new())
    }
}

/// Batches of every unit of a line, by unit index (the `DeviceId`).
struct Line {
    rx: mpsc::Receiver<Batch>,
    statuses: Vec<Arc<DeviceStatus>>,
    cancel: CancellationToken,
}

fn start(settings: ModbusSettings) -> Line {
    let (tx, rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    let mut statuses = Vec::new();
    let contexts = settings
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let status = Arc::new(DeviceStatus::default());
            statuses.push(status.clone());
            DriverContext {
                device: DeviceId(i as u32),
                name: format!("line/{}", u.name.as_deref().unwrap_or("unit")).into(),
                emitter: Emitter::new(tx.clone()),
                cancel: cancel.clone(),
                status,
                writes: None,
            }
        })
        .collect();
    tokio::spawn(modbus::driver::run(settings, contexts));
    Line {
        rx,
        statuses,
        cancel,
    }
}

impl Line {
    async fn next(&mut self) -> Batch {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a batch within 10 s")
            .expect("driver alive")
    }

    /// Skips batches until one satisfies `pred`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Batch) -> bool) -> Batch {
        for _ in 0..2000 {
            let b = self.next().await;
            if pred(&b) {
                return b;
            }
        }
        panic!("no batch with {what}");
    }

    /// Throws away what arrived so far.
    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Every batch for `period`.
    async fn collect(&mut self, period: Duration) -> Vec<Batch> {
        let end = Instant::now() + period;
        let mut out = Vec::new();
        while let Ok(Some(b)) = tokio::time::timeout_at(end.into(), self.rx.recv()).await {
            out.push(b);
        }
        out
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn all_good(b: &Batch) -> bool {
    b.samples.iter().all(|s| s.quality == Quality::Good)
}

fn unit_is(i: u32) -> impl Fn(&Batch) -> bool {
    move |b| b.device == DeviceId(i)
}

/// Every good sample of unit `i` must carry that unit's marker: anything else is a frame of
/// another unit (or a stale one) taken for the answer. Units without a marker are not checked.
fn assert_no_foreign_values(batches: &[Batch], markers: &[u16]) {
    for b in batches {
        let Some(&marker) = markers.get(b.device.0 as usize) else {
            continue;
        };
        for s in b.samples.iter().filter(|s| s.quality == Quality::Good) {
            match (s.tag.0, &s.value) {
                (0, Some(Value::UInt(v))) => assert_eq!(
                    *v,
                    u64::from(marker),
                    "unit {} got a foreign marker",
                    b.device.0
                ),
                (1, Some(Value::Float(v))) => assert_eq!(
                    *v,
                    f64::from(marker) / 4.0,
                    "unit {} got a foreign value",
                    b.device.0
                ),
                other => panic!("unexpected sample {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_several_units_on_a_serial_line_over_a_pty() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sim = RtuSim::new()
        .with_unit(3, device(300))
        .with_unit(7, device(700));
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut line = start(serial(
        pty.path(),
        vec![unit("meter3", 3), unit("meter7", 7)],
    ));

    let a = line
        .until("meter3 good", |b| unit_is(0)(b) && all_good(b))
        .await;
    let b = line
        .until("meter7 good", |b| unit_is(1)(b) && all_good(b))
        .await;
    assert_no_foreign_values(&[a.clone(), b.clone()], &[300, 700]);
    assert_eq!(
        a.samples[1].value,
        Some(Value::Float(75.0)),
        "f32 in CDAB order"
    );
    assert!(sim.device(3).unwrap().requests() >= 1);
    assert!(sim.device(7).unwrap().requests() >= 1);
    assert!(line.statuses.iter().all(|s| s.is_connected()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_is_demoted_and_costs_the_healthy_units_at_most_the_demotion_budget() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let dead = device(900);
    dead.faults().silent.store(true, Ordering::Relaxed);
    let sim = RtuSim::new()
        .with_unit(1, device(100))
        .with_unit(2, device(200))
        .with_unit(9, dead.clone());
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut line = start(serial(
        pty.path(),
        vec![unit("a", 1), unit("b", 2), unit("dead", 9)],
    ));
    // The same healthy units on a line of their own, run at the same time: what they get
    // without the dead unit on this machine, under whatever load it has.
    let control_sim = RtuSim::new()
        .with_unit(1, device(100))
        .with_unit(2, device(200));
    let control_pty = control_sim.serve_pty(&dir.path().join("ttyUSB1")).unwrap();
    let mut control = start(serial(control_pty.path(), vec![unit("a", 1), unit("b", 2)]));

    // Until the demotion the dead unit costs a timeout per scan; wait for it.
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        line.next().await;
        if !line.statuses[2].is_connected() && dead.requests() >= 3 {
            break;
        }
        assert!(Instant::now() < give_up, "the dead unit is never demoted");
    }
    control.drain();
    let window = Duration::from_secs(8);
    let (batches, control_batches) = tokio::join!(line.collect(window), control.collect(window));
    assert_no_foreign_values(&batches, &[100, 200]);
    // Every scan of a healthy unit is one batch. The dead unit may take 1/BUDGET_FACTOR of
    // the line's time.
    let budget = 1.0 - 1.0 / f64::from(BUDGET_FACTOR);
    let good_scans = |batches: &[Batch], unit: u32| {
        batches
            .iter()
            .filter(|b| b.device.0 == unit && all_good(b))
            .count() as f64
    };
    for healthy in 0..2u32 {
        let with_dead = good_scans(&batches, healthy);
        let without = good_scans(&control_batches, healthy);
        assert!(
            with_dead >= without * budget,
            "unit {healthy}: {with_dead} scans next to a dead unit, {without} without it in {window:?}"
        );
    }
    let probes = batches.iter().filter(|b| b.device.0 == 2).count();
    assert!(
        (1..=3).contains(&probes),
        "a demoted unit is probed with backoff: {probes} probes in {window:?}"
    );
    assert!(batches
        .iter()
        .filter(|b| b.device.0 == 2)
        .all(|b| b.samples[0].quality == Quality::Bad(Reason::Timeout)));

    // The unit comes back: the next probe promotes it and it is scanned at its rate again.
    dead.faults().silent.store(false, Ordering::Relaxed);
    line.until("the dead unit good again", |b| unit_is(2)(b) && all_good(b))
        .await;
    let after = line.collect(Duration::from_secs(1)).await;
    assert!(
        after.iter().filter(|b| b.device.0 == 2).count() >= 5,
        "a promoted unit is scanned at its own rate"
    );
    assert!(line.statuses[2].is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_unit_never_corrupts_the_next_transaction() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let late = device(500);
    // It answers well after the master gave up (a margin for a slow test machine): after the
    // guard, during the next transaction, for another unit.
    late.faults()
        .delay_ms
        .store(TIMEOUT.as_millis() as u64 + 250, Ordering::Relaxed);
    let sim = RtuSim::new()
        .with_unit(1, device(100))
        .with_unit(5, late.clone());
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut line = start(serial(pty.path(), vec![unit("a", 1), unit("late", 5)]));

    let batches = line.collect(Duration::from_secs(3)).await;
    assert_no_foreign_values(&batches, &[100, 500]);
    assert!(
        batches.iter().any(|b| b.device.0 == 0 && all_good(b)),
        "the healthy unit is read"
    );
    let late_batches: Vec<_> = batches.iter().filter(|b| b.device.0 == 1).collect();
    assert!(!late_batches.is_empty());
    assert!(late_batches
        .iter()
        .all(|b| b.samples[0].quality == Quality::Bad(Reason::Timeout)));
    assert!(late.requests() >= 1);

    // Once it answers in time it is read correctly: the line is in step.
    late.faults().delay_ms.store(0, Ordering::Relaxed);
    let good = line
        .until("the late unit good", |b| unit_is(1)(b) && all_good(b))
        .await;
    assert_no_foreign_values(&[good], &[100, 500]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_unit_never_gets_the_answer_of_one_block_on_another_block_of_the_same_shape() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Two one-register blocks far apart: the same unit, function and byte count. Each is its
    // own scan class, so either may be the next request after the other failed.
    let slow = SimDevice::new();
    slow.image().hr[0] = 111;
    slow.image().hr[100] = 999;
    let sim = RtuSim::new().with_unit(4, slow.clone());
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let blocks = UnitSettings {
        name: Some("slow".into()),
        unit_id: 4,
        tags: vec![
            tag("a", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
            tag(
                "b",
                hr(100),
                DataType::U16,
                WordOrder::ABCD,
                0,
                SCAN + Duration::from_millis(30),
            ),
        ]
        .into(),
    };
    let mut line = start(serial(pty.path(), vec![blocks]));
    line.until("good values", all_good).await;

    // From now on every answer comes after the timeout, some a little, some several timeouts.
    for late_by in [TIMEOUT / 2, TIMEOUT * 2, TIMEOUT * 3] {
        slow.faults()
            .delay_ms
            .store((TIMEOUT + late_by).as_millis() as u64, Ordering::Relaxed);
        let batches = line.collect(Duration::from_secs(3)).await;
        for b in &batches {
            for s in b.samples.iter().filter(|s| s.quality == Quality::Good) {
                let expected = if s.tag.0 == 0 { 111 } else { 999 };
                assert_eq!(
                    s.value,
                    Some(Value::UInt(expected)),
                    "answers {late_by:?} late: tag {} got another block's value",
                    s.tag.0
                );
            }
        }
    }
    assert!(
        !line.statuses[0].is_connected(),
        "a unit that always answers late is demoted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_frames_are_discarded_and_the_line_resynchronises() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sim = RtuSim::new()
        .with_unit(1, device(100))
        .with_unit(2, device(200));
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut line = start(serial(pty.path(), vec![unit("a", 1), unit("b", 2)]));
    line.until("both units good", |b| unit_is(1)(b) && all_good(b))
        .await;

    sim.faults().corrupt_crc.store(2, Ordering::Relaxed);
    sim.faults().truncate.store(2, Ordering::Relaxed);
    sim.faults().noise_before.store(4, Ordering::Relaxed);
    let garbled = line
        .until("a garbled answer", |b| {
            b.samples[0].quality == Quality::Bad(Reason::Protocol)
        })
        .await;
    assert_eq!(garbled.samples.len(), 2);
    let batches = line.collect(Duration::from_secs(2)).await;
    assert_no_foreign_values(&batches, &[100, 200]);
    for u in 0..2 {
        assert!(
            batches
                .iter()
                .rev()
                .take(4)
                .any(|b| b.device.0 == u && all_good(b)),
            "unit {u} is read again after the faults"
        );
    }
    assert_eq!(sim.faults().corrupt_crc.load(Ordering::Relaxed), 0);
    assert_eq!(sim.faults().truncate.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_the_serial_adapter_being_unplugged_and_plugged_back() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sim = RtuSim::new().with_unit(1, device(100));
    let mut pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut line = start(serial(pty.path(), vec![unit("a", 1)]));
    line.until("good values", all_good).await;

    pty.unplug();
    let bad = line.until("bad quality", |b| !all_good(b)).await;
    assert_eq!(bad.samples[0].quality, Quality::Bad(Reason::Disconnected));
    assert!(!line.statuses[0].is_connected());
    // Reopening fails while the adapter is gone; the driver keeps trying with backoff.
    tokio::time::sleep(Duration::from_millis(500)).await;

    pty.replug().unwrap();
    let good = line.until("good values after replug", all_good).await;
    assert_no_foreign_values(&[good], &[100]);
    assert!(line.statuses[0].is_connected());
    assert!(line.statuses[0].reconnects.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_reads_several_units_and_demotes_a_dead_one() {
    init_tracing();
    let dead = device(900);
    dead.faults().silent.store(true, Ordering::Relaxed);
    let sim = RtuSim::new()
        .with_unit(1, device(100))
        .with_unit(2, device(200))
        .with_unit(3, dead.clone());
    let server = sim.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let settings = ModbusSettings {
        link: Link::RtuOverTcp {
            address: server.addr().to_string(),
        },
        ..serial(
            Path::new(""),
            vec![unit("a", 1), unit("b", 2), unit("dead", 3)],
        )
    };
    let mut line = start(settings);
    let batches = line.collect(Duration::from_secs(3)).await;
    assert_no_foreign_values(&batches, &[100, 200]);
    for u in 0..2 {
        assert!(batches.iter().any(|b| b.device.0 == u && all_good(b)));
    }
    assert!(!line.statuses[2].is_connected(), "the dead unit is demoted");
    assert!(
        dead.requests() <= 6,
        "a demoted unit is only probed: {} requests",
        dead.requests()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_tcp_gateway_serves_several_units_on_one_connection() {
    init_tracing();
    let server = protocols::sim::modbus::serve_units(
        vec![(1, device(100)), (2, device(200))],
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let settings = ModbusSettings {
        link: Link::Tcp {
            address: server.addr().to_string(),
        },
        ..serial(
            Path::new(""),
            vec![unit("a", 1), unit("b", 2), unit("gone", 4)],
        )
    };
    let mut line = start(settings);
    let batches = line.collect(Duration::from_secs(2)).await;
    assert_no_foreign_values(&batches, &[100, 200]);
    let mut good: HashMap<u32, usize> = HashMap::new();
    for b in batches.iter().filter(|b| all_good(b)) {
        *good.entry(b.device.0).or_default() += 1;
    }
    assert!(good.get(&0).copied().unwrap_or(0) >= 5 && good.get(&1).copied().unwrap_or(0) >= 5);
    let gone = batches
        .iter()
        .find(|b| b.device.0 == 2)
        .expect("the unit behind the gateway is reported");
    assert_eq!(
        gone.samples[0].quality,
        Quality::Bad(Reason::Exception(11)),
        "the gateway's 'target failed to respond' is the reason"
    );
    drop(server);
}
