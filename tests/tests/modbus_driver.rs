//! The Modbus line driver on Modbus TCP against the in-process simulator (a real tokio-modbus server).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edge_gateway::config::DeviceKind;
use gateway_tests::fixtures::{modbus_device, tag};
use gateway_tests::{all_good, eventually, init_tracing, ModbusDriverRun};
use protocols::modbus::{Address, Area, DataType, ModbusSettings, TagSpec, WordOrder};
use protocols::model::{Batch, Quality, Reason, Value};
use protocols::sim::modbus::SimDevice;

const SCAN: Duration = Duration::from_millis(50);

fn hr(offset: u16) -> Address {
    Address {
        area: Area::HoldingRegister,
        offset,
    }
}

fn settings(addr: SocketAddr, tags: Vec<TagSpec>) -> ModbusSettings {
    let DeviceKind::Modbus(mut s) = modbus_device("dev", addr, SCAN, tags).kind else {
        unreachable!("modbus_device builds a Modbus TCP device")
    };
    s.timeout = Duration::from_millis(200);
    s.backoff_min = Duration::from_millis(20);
    s.backoff_max = Duration::from_millis(100);
    s
}

/// Skips batches until one satisfies `pred`.
async fn until(run: &mut ModbusDriverRun, what: &str, pred: impl Fn(&Batch) -> bool) -> Batch {
    for _ in 0..200 {
        let b = run.next().await;
        if pred(&b) {
            return b;
        }
    }
    panic!("no batch with {what}");
}

#[tokio::test]
async fn plans_tags_into_as_few_block_reads_as_the_limits_allow() {
    init_tracing();
    let dev = SimDevice::new();
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // Ten u16 tags spread over hr:0..=90 with gaps of 9: one read with max_gap 16.
    // Two coils far apart (co:0, co:100): one read of bits.
    let mut tags: Vec<TagSpec> = (0..10)
        .map(|i| {
            tag(
                &format!("r{i}"),
                hr(i * 10),
                DataType::U16,
                WordOrder::ABCD,
                0,
                SCAN,
            )
        })
        .collect();
    for (i, o) in [0u16, 100].iter().enumerate() {
        tags.push(tag(
            &format!("c{i}"),
            Address {
                area: Area::Coil,
                offset: *o,
            },
            DataType::Bool,
            WordOrder::ABCD,
            0,
            SCAN,
        ));
    }
    let mut s = settings(server.addr(), tags);
    s.max_gap = 16;
    let mut run = ModbusDriverRun::start(s);
    run.next().await;
    let before = dev.requests();
    for _ in 0..5 {
        let b = run.next().await;
        assert_eq!(b.samples.len(), 12);
        assert!(all_good(&b));
    }
    assert_eq!(
        dev.requests() - before,
        10,
        "two reads per scan: one for registers, one for coils"
    );

    // With max_registers_per_read = 40 the same registers need three reads.
    let dev2 = SimDevice::new();
    let server2 = dev2.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags: Vec<TagSpec> = (0..10)
        .map(|i| {
            tag(
                &format!("r{i}"),
                hr(i * 10),
                DataType::U16,
                WordOrder::ABCD,
                0,
                SCAN,
            )
        })
        .collect();
    let mut s = settings(server2.addr(), tags);
    s.max_registers_per_read = 40;
    let mut run2 = ModbusDriverRun::start(s);
    run2.next().await;
    let before = dev2.requests();
    for _ in 0..4 {
        run2.next().await;
    }
    assert_eq!(
        dev2.requests() - before,
        12,
        "hr:0..=90 in reads of at most 40 registers: 3 per scan"
    );
    drop(server);
    drop(server2);
}

#[tokio::test]
async fn splits_a_merged_read_refused_for_a_register_hole_and_remembers_the_split() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().holes.push((Area::HoldingRegister, 5..8));
    dev.image().hr[0] = 11;
    dev.image().hr[10] = 22;
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        tag("a", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
        tag("b", hr(10), DataType::U16, WordOrder::ABCD, 0, SCAN),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    let first = run.next().await;
    assert!(
        all_good(&first),
        "the split happens within the first scan: {first:?}"
    );
    assert_eq!(first.samples[0].value, Some(Value::UInt(11)));
    assert_eq!(first.samples[1].value, Some(Value::UInt(22)));
    assert_eq!(
        dev.requests(),
        3,
        "one refused merged read, then two split reads"
    );
    for _ in 0..3 {
        assert!(all_good(&run.next().await));
    }
    assert_eq!(
        dev.requests(),
        3 + 3 * 2,
        "the split is remembered: two reads per scan"
    );
    drop(server);
}

#[tokio::test]
async fn an_exception_marks_only_the_affected_tags_bad() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().failing.push((Area::InputRegister, 0..10, 4));
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        tag("good", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
        tag(
            "broken",
            Address {
                area: Area::InputRegister,
                offset: 2,
            },
            DataType::U16,
            WordOrder::ABCD,
            0,
            SCAN,
        ),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    for _ in 0..3 {
        let b = run.next().await;
        let good = b.samples.iter().find(|s| s.tag.0 == 0).unwrap();
        let bad = b.samples.iter().find(|s| s.tag.0 == 1).unwrap();
        assert_eq!(good.quality, Quality::Good);
        assert_eq!(bad.quality, Quality::Bad(Reason::Exception(4)));
        assert_eq!(bad.value, None);
    }
    assert!(
        run.status.is_connected(),
        "an exception does not drop the connection"
    );
    assert_eq!(dev.faults().connections.load(Ordering::Relaxed), 1);
    drop(server);
}

#[tokio::test]
async fn a_timeout_drops_the_connection_and_tags_recover_on_a_new_one() {
    init_tracing();
    let dev = SimDevice::new();
    dev.image().hr[0] = 7;
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![tag("x", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN)];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    assert!(all_good(&run.next().await));
    assert_eq!(dev.faults().connections.load(Ordering::Relaxed), 1);

    dev.faults().silent.store(true, Ordering::Relaxed);
    let bad = until(&mut run, "a timeout", |b| !all_good(b)).await;
    assert_eq!(bad.samples[0].quality, Quality::Bad(Reason::Timeout));
    dev.faults().silent.store(false, Ordering::Relaxed);

    let good = until(&mut run, "good values again", all_good).await;
    assert_eq!(good.samples[0].value, Some(Value::UInt(7)));
    assert!(
        dev.faults().connections.load(Ordering::Relaxed) >= 2,
        "the connection that timed out is never reused"
    );
    assert!(run.status.reconnects.load(Ordering::Relaxed) >= 1);
    drop(server);
}

#[tokio::test]
async fn tags_go_bad_while_the_device_is_down_and_good_again_after() {
    init_tracing();
    let dev = SimDevice::new();
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    let tags = vec![tag("x", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN)];
    let mut run = ModbusDriverRun::start(settings(addr, tags));
    assert!(all_good(&run.next().await));

    server.stop().await;
    let bad = until(&mut run, "bad quality", |b| !all_good(b)).await;
    assert!(matches!(
        bad.samples[0].quality,
        Quality::Bad(Reason::Disconnected | Reason::Timeout)
    ));
    eventually(Duration::from_secs(5), "disconnected status", || {
        !run.status.is_connected()
    })
    .await;

    let server = dev.serve(addr).await.unwrap();
    until(&mut run, "good values after the device returns", all_good).await;
    assert!(run.status.is_connected());
    drop(server);
}

#[tokio::test]
async fn decodes_the_demo_register_map_with_its_word_orders() {
    init_tracing();
    let dev = SimDevice::new();
    {
        let mut img = dev.image();
        img.set(
            Area::HoldingRegister,
            3,
            DataType::I32,
            WordOrder::CDAB,
            0,
            &Value::Int(-123_456),
        );
        img.set(
            Area::HoldingRegister,
            5,
            DataType::F64,
            WordOrder::DCBA,
            0,
            &Value::Float(3.25),
        );
        img.set(
            Area::HoldingRegister,
            10,
            DataType::String,
            WordOrder::ABCD,
            16,
            &Value::Text("PRESS-7".into()),
        );
        img.set(
            Area::HoldingRegister,
            20,
            DataType::F32,
            WordOrder::BADC,
            0,
            &Value::Float(-2.5),
        );
    }
    let server = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tags = vec![
        tag("i32", hr(3), DataType::I32, WordOrder::CDAB, 0, SCAN),
        tag("f64", hr(5), DataType::F64, WordOrder::DCBA, 0, SCAN),
        tag("text", hr(10), DataType::String, WordOrder::ABCD, 16, SCAN),
        tag("f32", hr(20), DataType::F32, WordOrder::BADC, 0, SCAN),
    ];
    let mut run = ModbusDriverRun::start(settings(server.addr(), tags));
    let b = run.next().await;
    let values: Vec<_> = b.samples.iter().map(|s| s.value.clone()).collect();
    assert_eq!(
        values,
        vec![
            Some(Value::Int(-123_456)),
            Some(Value::Float(3.25)),
            Some(Value::Text("PRESS-7".into())),
            Some(Value::Float(-2.5)),
        ]
    );
    assert_eq!(dev.requests(), 1, "hr:3..=20 is one block read");
    drop(server);
}
