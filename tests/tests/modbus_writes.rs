//! Bits in registers and writes through the Modbus line driver, against the in-process Modbus TCP
//! simulator (a real tokio-modbus server that takes writes and the mask write).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edge_gateway::config::DeviceKind;
use gateway_tests::fixtures::{modbus_device, tag};
use gateway_tests::{all_good, init_tracing, ModbusDriverRun};
use protocols::driver::WriteError;
use protocols::modbus::{Address, Area, DataType, ModbusSettings, TagSpec, WordOrder};
use protocols::model::{TagId, Value};
use protocols::sim::modbus::SimDevice;

const SCAN: Duration = Duration::from_millis(50);

fn at(area: Area, offset: u16) -> Address {
    Address { area, offset }
}

fn bit(name: &str, area: Area, offset: u16, bit: u8) -> TagSpec {
    TagSpec {
        bit: Some(bit),
        ..tag(
            name,
            at(area, offset),
            DataType::Bool,
            WordOrder::ABCD,
            0,
            SCAN,
        )
    }
}

fn settings(addr: SocketAddr, tags: Vec<TagSpec>) -> ModbusSettings {
    let DeviceKind::Modbus(mut s) = modbus_device("dev", addr, SCAN, tags).kind else {
        unreachable!("modbus_device builds a Modbus TCP device")
    };
    s.timeout = Duration::from_millis(500);
    s.backoff_min = Duration::from_millis(20);
    s.backoff_max = Duration::from_millis(100);
    s
}

fn value_of(batch: &protocols::model::Batch, tag: u32) -> Option<Value> {
    batch
        .samples
        .iter()
        .find(|s| s.tag == TagId(tag))
        .and_then(|s| s.value.clone())
}

#[tokio::test]
async fn two_bit_tags_of_one_register_are_read_in_one_request_with_the_register_s_other_tags() {
    init_tracing();
    let dev = SimDevice::new();
    {
        let mut image = dev.image();
        image.hr[4] = 1234;
        image.hr[5] = 0b1000_0001; // bits 0 and 7
    }
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        tag(
            "speed",
            at(Area::HoldingRegister, 4),
            DataType::U16,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
        bit("running", Area::HoldingRegister, 5, 0),
        bit("fault", Area::HoldingRegister, 5, 3),
        bit("alarm", Area::HoldingRegister, 5, 7),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    let first = run.next().await;
    assert!(all_good(&first));
    assert_eq!(value_of(&first, 0), Some(Value::UInt(1234)));
    assert_eq!(value_of(&first, 1), Some(Value::Bool(true)));
    assert_eq!(value_of(&first, 2), Some(Value::Bool(false)));
    assert_eq!(value_of(&first, 3), Some(Value::Bool(true)));

    let before = dev.requests();
    for _ in 0..3 {
        run.next().await;
    }
    assert_eq!(
        dev.requests() - before,
        3,
        "one read per scan for all four tags"
    );

    dev.image().hr[5] = 0b1000;
    let mut changed = false;
    for _ in 0..20 {
        let b = run.next().await;
        if value_of(&b, 2) == Some(Value::Bool(true)) {
            assert_eq!(value_of(&b, 1), Some(Value::Bool(false)));
            assert_eq!(value_of(&b, 3), Some(Value::Bool(false)));
            changed = true;
            break;
        }
    }
    assert!(changed, "the new bits are read");
    run.stop().await;
}

#[tokio::test]
async fn a_bit_write_sets_only_that_bit_and_reads_it_back() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().hr[5] = 0b1000_0001;
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        bit("running", Area::HoldingRegister, 5, 0),
        bit("fault", Area::HoldingRegister, 5, 3),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    run.next().await;

    let done = run.write(1, Value::Bool(true)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Bool(true)));
    assert_eq!(dev.image().hr[5], 0b1000_1001, "bits 0 and 7 untouched");

    let done = run.write(0, Value::Bool(false)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Bool(false)));
    assert_eq!(dev.image().hr[5], 0b1000_1000);
    assert_eq!(dev.writes(), 2);
    run.stop().await;
}

#[tokio::test]
async fn a_device_without_the_mask_write_refuses_a_bit_write_clearly_and_keeps_its_register() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().hr[5] = 0b0001;
    dev.faults().no_mask_write.store(true, Ordering::Relaxed);
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![bit("fault", Area::HoldingRegister, 5, 3)];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    run.next().await;

    let refused = run.write(0, Value::Bool(true)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Unsupported(_)), "{refused}");
    let message = refused.to_string();
    assert!(message.contains("function 22"), "{message}");
    assert!(message.contains("exception 01"), "{message}");
    assert_eq!(dev.image().hr[5], 0b0001);
    // The line stays usable.
    assert!(all_good(&run.next().await));
    run.stop().await;
}

#[tokio::test]
async fn coils_and_registers_are_written_with_the_read_codec_inverted_and_read_back() {
    init_tracing();
    let dev = SimDevice::new();
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut temperature = tag(
        "temperature",
        at(Area::HoldingRegister, 10),
        DataType::F32,
        WordOrder::CDAB,
        0,
        SCAN,
    );
    temperature.scale = 0.5;
    temperature.offset = 10.0;
    let mut setpoint = tag(
        "setpoint",
        at(Area::HoldingRegister, 20),
        DataType::I16,
        WordOrder::ABCD,
        0,
        SCAN,
    );
    setpoint.scale = 0.1;
    let tags = vec![
        tag(
            "pump",
            at(Area::Coil, 3),
            DataType::Bool,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
        temperature,
        setpoint,
        tag(
            "level",
            at(Area::InputRegister, 0),
            DataType::U16,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    run.next().await;

    let done = run.write(0, Value::Bool(true)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Bool(true)));
    assert!(dev.image().co[3]);

    // 25.0 = raw * 0.5 + 10  =>  raw 30.0 as f32, low word first.
    let done = run.write(1, Value::Float(25.0)).await.unwrap();
    assert_eq!(done.read_back, Some(Value::Float(25.0)));
    let bits = 30.0f32.to_bits();
    assert_eq!(
        dev.image().hr[10..12],
        [(bits & 0xFFFF) as u16, (bits >> 16) as u16]
    );

    // -12.3 = raw * 0.1  =>  raw -123.
    let done = run.write(2, Value::Float(-12.3)).await.unwrap();
    assert_eq!(dev.image().hr[20] as i16, -123);
    let Some(Value::Float(back)) = done.read_back else {
        panic!("a float read back: {done:?}");
    };
    assert!((back + 12.3).abs() < 1e-9, "{back}");
    assert_eq!(dev.writes(), 3);

    // Refusals never reach the device.
    let refused = run.write(2, Value::Float(5000.0)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Refused(_)), "{refused}");
    let refused = run.write(3, Value::UInt(1)).await.unwrap_err();
    assert!(refused.to_string().contains("read-only"), "{refused}");
    let refused = run.write(0, Value::UInt(1)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Refused(_)), "{refused}");
    assert_eq!(dev.writes(), 3);
    run.stop().await;
}

#[tokio::test]
async fn a_write_the_device_answers_with_an_exception_reports_its_code() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().failing.push((Area::HoldingRegister, 30..31, 4));
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        tag(
            "ok",
            at(Area::HoldingRegister, 0),
            DataType::U16,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
        tag(
            "broken",
            at(Area::HoldingRegister, 30),
            DataType::U16,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    run.next().await;
    let refused = run.write(1, Value::UInt(7)).await.unwrap_err();
    assert!(matches!(refused, WriteError::Exception(4)), "{refused}");
    run.stop().await;
}
