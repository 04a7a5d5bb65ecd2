//! Writes on Modbus RTU lines: the line driver with two units on one line, on a pseudo-terminal
//! (as a USB adapter's path, with the line's timing emulated) and behind a serial-to-Ethernet
//! converter (RTU over TCP), against the in-process RTU simulator. Each unit is its own device;
//! a write names its unit and lands there alone.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway_tests::fixtures::tag;
use gateway_tests::{all_good, init_tracing, ModbusDriverRun};
use protocols::driver::WriteError;
use protocols::modbus::{
    Address, Area, DataType, Link, ModbusSettings, Parity, SerialSettings, TagSpec, UnitSettings,
    WordOrder,
};
use protocols::model::{Batch, DeviceId, Value};
use protocols::sim::modbus::SimDevice;
use protocols::sim::rtu::RtuSim;

const SCAN: Duration = Duration::from_millis(200);

fn at(area: Area, offset: u16) -> Address {
    Address { area, offset }
}

/// Each unit's tags: a scaled set-point (function 6), a bit of a status word (function 22), a
/// coil (function 5) and a 32-bit total (function 16).
fn unit_tags() -> Vec<TagSpec> {
    let mut setpoint = tag(
        "setpoint",
        at(Area::HoldingRegister, 10),
        DataType::I16,
        WordOrder::ABCD,
        0,
        SCAN,
    );
    setpoint.scale = 0.1;
    let mut reset = tag(
        "reset",
        at(Area::HoldingRegister, 5),
        DataType::Bool,
        WordOrder::ABCD,
        0,
        SCAN,
    );
    reset.bit = Some(3);
    vec![
        setpoint,
        reset,
        tag(
            "pump",
            at(Area::Coil, 2),
            DataType::Bool,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
        tag(
            "total",
            at(Area::HoldingRegister, 20),
            DataType::U32,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
    ]
}

/// A unit with set-point 10.0, status word bits 0 and 7 set, pump off, total 0.
fn unit_device() -> SimDevice {
    let d = SimDevice::new();
    {
        let mut image = d.image();
        image.hr[10] = 100;
        image.hr[5] = 0b1000_0001;
    }
    d
}

/// Units 3 (device 0) and 7 (device 1) on a line reached by `link`.
fn line(link: Link) -> ModbusSettings {
    let unit = |name: &str, unit_id| UnitSettings {
        name: Some(name.into()),
        unit_id,
        tags: unit_tags().into(),
    };
    ModbusSettings {
        link,
        // Long enough that a loaded test machine does not time out a healthy unit.
        timeout: Duration::from_millis(300),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        units: vec![unit("a", 3), unit("b", 7)],
        ..ModbusSettings::tcp(String::new(), 1, Vec::new())
    }
}

fn serial(port: &Path) -> Link {
    Link::Rtu(SerialSettings {
        port: port.display().to_string(),
        baud_rate: 19_200,
        parity: Parity::Even,
        data_bits: 8,
        stop_bits: 1,
    })
}

/// Takes every batch waiting, so the driver never waits on a full channel.
fn drain(run: &mut ModbusDriverRun) -> Vec<Batch> {
    let mut batches = Vec::new();
    while let Ok(b) = run.rx.try_recv() {
        batches.push(b);
    }
    batches
}

/// Waits for a batch of `device` that satisfies `pred`.
async fn until(run: &mut ModbusDriverRun, device: u32, what: &str, pred: impl Fn(&Batch) -> bool) {
    for _ in 0..200 {
        let b = run.next().await;
        if b.device == DeviceId(device) && pred(&b) {
            return;
        }
    }
    panic!("no batch of device {device}: {what}");
}

fn float(value: Option<Value>) -> f64 {
    match value {
        Some(Value::Float(f)) => f,
        other => panic!("not a float: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_one_unit_of_a_serial_line_lands_in_that_unit_alone_and_is_read_back() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (three, seven) = (unit_device(), unit_device());
    let sim = RtuSim::new()
        .with_unit(3, three.clone())
        .with_unit(7, seven.clone())
        .emulate_line(19_200, 11);
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let mut run = ModbusDriverRun::start(line(serial(pty.path())));
    until(&mut run, 0, "good", all_good).await;
    until(&mut run, 1, "good", all_good).await;

    // Function 6, the scale inverted: 21.5 is stored as 215.
    drain(&mut run);
    let done = run.write_to(1, 0, Value::Float(21.5)).await.unwrap();
    assert!((float(done.previous) - 10.0).abs() < 1e-9);
    assert!((float(done.read_back) - 21.5).abs() < 1e-9);
    // Function 22: bit 3 only.
    drain(&mut run);
    let done = run.write_to(1, 1, Value::Bool(true)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Bool(true)));
    // Function 5.
    drain(&mut run);
    let done = run.write_to(1, 2, Value::Bool(true)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Bool(true)));
    // Function 16: 70000 is 0x0001_1170.
    drain(&mut run);
    let done = run.write_to(1, 3, Value::UInt(70_000)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::UInt(70_000)));

    {
        let image = seven.image();
        assert_eq!(image.hr[10], 215);
        assert_eq!(image.hr[5], 0b1000_1001, "only bit 3 changed");
        assert!(image.co[2]);
        assert_eq!(image.hr[20..22], [0x0001, 0x1170]);
    }
    assert_eq!(seven.writes(), 4);
    // The other unit on the same line is left alone.
    assert_eq!(three.writes(), 0);
    {
        let image = three.image();
        assert_eq!(image.hr[10], 100);
        assert_eq!(image.hr[5], 0b1000_0001);
        assert!(!image.co[2]);
        assert_eq!(image.hr[20..22], [0, 0]);
    }
    // A write that does not fit the tag never reaches the line.
    let refused = run.write_to(0, 0, Value::Float(4000.0)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Refused(_)), "{refused}");
    assert_eq!(three.writes(), 0);

    // Both units are scanned on as before.
    drain(&mut run);
    until(&mut run, 0, "good after the writes", all_good).await;
    until(&mut run, 1, "good after the writes", all_good).await;
    drain(&mut run);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_silent_unit_behind_a_converter_fails_and_the_line_stays_open_for_the_other() {
    init_tracing();
    let (three, seven) = (unit_device(), unit_device());
    let sim = RtuSim::new()
        .with_unit(3, three.clone())
        .with_unit(7, seven.clone());
    let converter = sim.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let link = Link::RtuOverTcp {
        address: converter.addr().to_string(),
    };
    let mut run = ModbusDriverRun::start(line(link));
    until(&mut run, 0, "good", all_good).await;
    until(&mut run, 1, "good", all_good).await;

    // A unit that answers: written over the converter.
    drain(&mut run);
    let done = run.write_to(0, 0, Value::Int(-5)).await.unwrap();
    assert!((float(done.read_back) + 5.0).abs() < 1e-9);
    assert_eq!(three.image().hr[10], (-50i16) as u16);

    seven.faults().silent.store(true, Ordering::Relaxed);
    drain(&mut run);
    let failed = run.write_to(1, 0, Value::Float(30.0)).await.unwrap_err();
    assert!(matches!(failed, WriteError::Failed(_)), "{failed}");
    assert_eq!(seven.image().hr[10], 100, "a silent unit changes nothing");
    // Right after, the unit is held back (its late answer could still come): refused, not
    // sent.
    seven.faults().silent.store(false, Ordering::Relaxed);
    let held = run.write_to(1, 0, Value::Float(30.0)).await.unwrap_err();
    assert!(
        matches!(&held, WriteError::Refused(r) if r.contains("held back")),
        "{held}"
    );
    assert_eq!(seven.image().hr[10], 100, "a held unit changes nothing");

    // The line was not dropped for the silent unit: one connection, the other unit good.
    drain(&mut run);
    until(&mut run, 0, "good after the failed write", all_good).await;
    assert_eq!(three.faults().connections.load(Ordering::Relaxed), 1);
    drain(&mut run);
    run.stop().await;
}
