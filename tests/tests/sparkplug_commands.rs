//! Writes from a Sparkplug host: DCMD metrics, by alias as host applications send them or by
//! name, go through the same checks as JSON commands and land in a Modbus TCP simulator; the
//! host sees the new value in the device's DDATA. Refusals never reach the device.

use std::time::Duration;

use edge_gateway::config::{Config, Format, SparkplugSettings};
use edge_gateway::encode::sparkplug::proto::{Metric, MetricValue, Payload};
use edge_gateway::metrics::Metrics;
use gateway_tests::fixtures::{local_config, modbus_device, tag};
use gateway_tests::init_tracing;
use gateway_tests::sparkplug::SpCollector;
use prost::Message;
use protocols::modbus::{Address, Area, DataType, TagSpec, WordOrder};
use protocols::model::WriteAccess;
use protocols::sim::modbus::SimDevice;

const SCAN: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(10);
const GROUP: &str = "plant";
const NODE: &str = "gw-dcmd";

fn hr(offset: u16) -> Address {
    Address {
        area: Area::HoldingRegister,
        offset,
    }
}

/// A writable scaled setpoint (-20..=80) on hr:10, a writable bit 3 of hr:5, a writable
/// mode on hr:11, a read-only counter on hr:0.
fn tags() -> Vec<TagSpec> {
    let mut setpoint = tag("setpoint", hr(10), DataType::I16, WordOrder::ABCD, 0, SCAN);
    setpoint.scale = 0.1;
    setpoint.write = Some(WriteAccess {
        min: Some(-20.0),
        max: Some(80.0),
    });
    let mut reset = tag("reset", hr(5), DataType::Bool, WordOrder::ABCD, 0, SCAN);
    reset.bit = Some(3);
    reset.write = Some(WriteAccess::default());
    let mut mode = tag("mode", hr(11), DataType::U16, WordOrder::ABCD, 0, SCAN);
    mode.write = Some(WriteAccess::default());
    vec![
        setpoint,
        reset,
        mode,
        tag("counter", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
    ]
}

/// A DCMD metric: by name or by alias, with its datatype (0: none, as Sparkplug 3.0 says a
/// host should send it) and value.
fn metric(name: Option<&str>, alias: Option<u64>, datatype: u32, value: MetricValue) -> Metric {
    Metric {
        name: name.map(Into::into),
        alias,
        datatype: (datatype != 0).then_some(datatype),
        value: Some(value),
        ..Metric::default()
    }
}

async fn dcmd(host: &SpCollector, metrics: Vec<Metric>, retain: bool) {
    let payload = Payload {
        timestamp: Some(1),
        metrics,
        ..Payload::default()
    };
    let topic = format!("spBv1.0/{GROUP}/DCMD/{NODE}/press1");
    host.publish(&topic, payload.encode_to_vec(), retain).await;
}

/// The edge node's config: press1 on the simulator at `sim`, the broker at `port`.
fn node_config(dir: &std::path::Path, port: u16, sim: std::net::SocketAddr) -> Config {
    let mut config = local_config(
        NODE,
        dir.join("data"),
        port,
        vec![modbus_device("press1", sim, SCAN, tags())],
    );
    config.mqtt.format = Format::SparkplugB;
    config.mqtt.sparkplug = Some(SparkplugSettings {
        group_id: GROUP.into(),
        edge_node_id: NODE.into(),
        primary_host_id: None,
    });
    config
}

/// Waits until `counter` of the gateway's metrics reaches `n`.
async fn counted(counter: &std::sync::atomic::AtomicU64, n: u64, what: &str) {
    gateway_tests::eventually(WAIT, what, || Metrics::get(counter) >= n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dcmd_by_alias_or_by_name_lands_in_the_device_and_every_refusal_stays_away_from_it() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let dev = SimDevice::new();
    dev.image().hr[5] = 0b1000_0001;
    let sim = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(dir.path(), broker.port(), sim.addr());
    config.commands.enabled = true;
    config.commands.write_interval = Duration::from_secs(600);
    config.mqtt.shutdown_grace = Duration::from_millis(500);
    let host = SpCollector::start(broker.port()).await;
    // A retained DCMD waiting on the broker: handed to the gateway with its subscription (and
    // again at every reconnect), and never executed.
    dcmd(
        &host,
        vec![metric(Some("mode"), None, 7, MetricValue::IntValue(3))],
        true,
    )
    .await;
    let gw = edge_gateway::pipeline::start(config).await.unwrap();
    counted(&gw.metrics.commands_refused, 1, "the retained DCMD refused").await;
    host.wait_for(WAIT, "the DBIRTH of press1", |m| {
        m.iter().any(|x| x.kind == "DBIRTH")
    })
    .await;
    let birth = host.of("DBIRTH").remove(0);
    let alias_of = |name: &str| {
        birth
            .payload
            .metrics
            .iter()
            .find(|m| m.name.as_deref() == Some(name))
            .and_then(|m| m.alias)
            .unwrap()
    };
    let m = &gw.metrics;

    // By alias and without a datatype, as Sparkplug 3.0 hosts send it (read as the Double its
    // birth declared): 21.5 lands as 215 (scale inverted).
    dcmd(
        &host,
        vec![metric(
            None,
            Some(alias_of("setpoint")),
            0,
            MetricValue::DoubleValue(21.5),
        )],
        false,
    )
    .await;
    counted(&m.commands_written, 1, "the setpoint written").await;
    assert_eq!(dev.image().hr[10], 215);
    // By name: one bit of hr:5, the others left as they were.
    dcmd(
        &host,
        vec![metric(
            Some("reset"),
            None,
            11,
            MetricValue::BooleanValue(true),
        )],
        false,
    )
    .await;
    counted(&m.commands_written, 2, "the bit written").await;
    assert_eq!(dev.image().hr[5], 0b1000_1001);
    // The host sees the written value in a DDATA, by alias.
    let setpoint = alias_of("setpoint");
    host.wait_for(WAIT, "the new setpoint in a DDATA", |msgs| {
        msgs.iter().any(|x| {
            x.kind == "DDATA"
                && x.payload.metrics.iter().any(|mm| {
                    mm.alias == Some(setpoint)
                        && matches!(mm.value, Some(MetricValue::DoubleValue(v)) if (v - 21.5).abs() < 1e-9)
                })
        })
    })
    .await;

    // Refused, each for its own reason, in one DCMD: out of range, read-only, an alias of
    // no tag, a wrongly typed value, and the setpoint again within its write_interval.
    let counter_alias = alias_of("counter");
    dcmd(
        &host,
        vec![
            metric(Some("setpoint"), None, 10, MetricValue::DoubleValue(95.0)),
            metric(None, Some(counter_alias), 7, MetricValue::IntValue(5)),
            metric(
                None,
                Some(setpoint + 100),
                10,
                MetricValue::DoubleValue(1.0),
            ),
            metric(
                Some("reset"),
                None,
                12,
                MetricValue::StringValue("on".into()),
            ),
            metric(None, Some(setpoint), 10, MetricValue::DoubleValue(30.0)),
        ],
        false,
    )
    .await;
    counted(&m.commands_refused, 6, "five refusals more").await;
    // Garbage is refused, never a panic.
    let topic = format!("spBv1.0/{GROUP}/DCMD/{NODE}/press1");
    host.publish(&topic, b"\xff\xfe not protobuf".to_vec(), false)
        .await;
    counted(&m.commands_refused, 7, "the garbage refused").await;
    // The node itself has nothing to write but its rebirth.
    let ncmd = Payload {
        timestamp: Some(1),
        metrics: vec![metric(
            Some("Node Control/Reboot"),
            None,
            11,
            MetricValue::BooleanValue(true),
        )],
        ..Payload::default()
    };
    host.publish(
        &format!("spBv1.0/{GROUP}/NCMD/{NODE}"),
        ncmd.encode_to_vec(),
        false,
    )
    .await;
    counted(&m.commands_refused, 8, "the NCMD write refused").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(Metrics::get(&m.commands_written), 2);
    assert_eq!(Metrics::get(&m.commands_refused), 8, "each refused once");
    assert_eq!(dev.image().hr[11], 0, "the retained DCMD wrote nothing");
    assert_eq!(
        dev.image().hr[10],
        215,
        "no refused write reached the device"
    );
    assert_eq!(dev.image().hr[5], 0b1000_1001);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dcmd_while_commands_are_off_writes_nothing() {
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let dev = SimDevice::new();
    let sim = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), broker.port(), sim.addr());
    let host = SpCollector::start(broker.port()).await;
    let gw = edge_gateway::pipeline::start(config).await.unwrap();
    host.wait_for(WAIT, "the DBIRTH", |m| m.iter().any(|x| x.kind == "DBIRTH"))
        .await;
    dcmd(
        &host,
        vec![metric(
            Some("setpoint"),
            None,
            10,
            MetricValue::DoubleValue(21.5),
        )],
        false,
    )
    .await;
    let data = host.of("DDATA").len();
    host.wait_for(WAIT, "more data after the DCMD", |m| {
        m.iter().filter(|x| x.kind == "DDATA").count() > data + 5
    })
    .await;
    assert_eq!(dev.image().hr[10], 0, "nothing written");
    assert_eq!(Metrics::get(&gw.metrics.commands_written), 0);
    assert_eq!(
        Metrics::get(&gw.metrics.commands_refused),
        1,
        "refused (and counted) at the publisher"
    );
    gw.shutdown().await;
}
