//! Modbus RTU lines through the whole gateway: a simulated RS-485 line with several units (on a
//! pseudo-terminal, or behind a serial-to-Ethernet converter) → gateway → embedded rumqttd
//! broker → subscriber. Each unit of a line is its own device on its own topic.

use std::sync::atomic::Ordering;
use std::time::Duration;

use edge_gateway::config::{self, DeviceKind, DeviceSettings};
use edge_gateway::demo::broker;
use edge_gateway::pipeline;
use gateway_tests::fixtures::{local_config, tag};
use gateway_tests::{contiguous_seqs, eventually, init_tracing, Collector, Received};
use protocols::modbus::{
    Address, Area, DataType, Link, ModbusSettings, TagSpec, UnitSettings, WordOrder,
};
use protocols::model::Value;
use protocols::sim::modbus::SimDevice;
use protocols::sim::rtu::RtuSim;

const WAIT: Duration = Duration::from_secs(20);

/// A meter holding `power` (kW, f32 in CDAB order) at ir:12, `energy` (0.1 kWh, u32) at ir:20
/// and `volts` (0.1 V, u16) at ir:0.
fn meter(power: f64, energy: u64, volts: u64) -> SimDevice {
    let d = SimDevice::new();
    {
        let mut img = d.image();
        let ir = Area::InputRegister;
        img.set(
            ir,
            12,
            DataType::F32,
            WordOrder::CDAB,
            0,
            &Value::Float(power),
        );
        img.set(
            ir,
            20,
            DataType::U32,
            WordOrder::ABCD,
            0,
            &Value::UInt(energy),
        );
        img.set(
            ir,
            0,
            DataType::U16,
            WordOrder::ABCD,
            0,
            &Value::UInt(volts),
        );
    }
    d
}

/// The sample of `tag` in a record.
fn sample<'a>(record: &'a Received, tag: &str) -> &'a serde_json::Value {
    record.doc["samples"]
        .as_array()
        .and_then(|samples| samples.iter().find(|s| s["tag"] == tag))
        .unwrap_or_else(|| panic!("no sample of `{tag}` in {}", record.doc))
}

fn number(record: &Received, tag: &str) -> f64 {
    let s = sample(record, tag);
    assert_eq!(s["quality"], "good", "{}", record.doc);
    s["value"].as_f64().unwrap()
}

/// The tag names of a record's samples, sorted (samples come in read order, not file order).
fn tag_names(record: &Received) -> Vec<&str> {
    let mut names: Vec<&str> = record.doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    names
}

fn all_good(record: &Received) -> bool {
    record.doc["samples"]
        .as_array()
        .is_some_and(|samples| samples.iter().all(|s| s["quality"] == "good"))
}

fn all_bad_timeout(record: &Received) -> bool {
    record.doc["samples"].as_array().is_some_and(|samples| {
        samples
            .iter()
            .all(|s| s["quality"] == "bad" && s["reason"] == "timeout" && s["value"].is_null())
    })
}

/// A config file with one `modbus_rtu` line on `port` and two units, as an integrator writes it.
fn rtu_config(data_dir: &std::path::Path, mqtt_port: u16, port: &std::path::Path) -> String {
    format!(
        r#"[gateway]
id = "gw-rtu"
data_dir = "{data_dir}"

[buffer]
commit_interval = "500ms"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "gw-rtu-{pid}"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "{port}"
baud_rate = 19200
parity = "even"
stop_bits = 1
timeout = "300ms"
inter_request_delay = "2ms"
scan_interval = "100ms"

  [[devices.units]]
  name = "meter3"
  unit_id = 3

    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"

    [[devices.units.tags]]
    name = "energy"
    address = "ir:20"
    type = "u32"
    scale = 0.1

    [[devices.units.tags]]
    name = "voltage"
    address = "ir:0"
    type = "u16"
    scale = 0.1

  [[devices.units]]
  name = "meter7"
  unit_id = 7

    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"

    [[devices.units.tags]]
    name = "energy"
    address = "ir:20"
    type = "u32"
    scale = 0.1
"#,
        data_dir = data_dir.display(),
        port = port.display(),
        pid = std::process::id(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_unit_of_a_serial_line_is_published_on_its_own_topic_with_its_own_values() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sim = RtuSim::new()
        .with_unit(3, meter(12.5, 482_137, 2_301))
        .with_unit(7, meter(-3.25, 98_765, 2_288))
        .emulate_line(19_200, 11);
    let pty = sim.serve_pty(&dir.path().join("ttyUSB0")).unwrap();
    let broker = broker::start(16 << 20).unwrap();
    let text = rtu_config(&dir.path().join("data"), broker.port(), pty.path());
    let config = config::parse(&text, "test.toml").unwrap();
    let sub = Collector::start(broker.port(), "edge/gw-rtu/#").await;
    let gw = pipeline::start(config).await.unwrap();
    let names: Vec<&str> = gw.devices.iter().map(|d| &*d.name).collect();
    assert_eq!(names, ["meters/meter3", "meters/meter7"]);

    sub.wait_for(WAIT, "good records of both units", |m| {
        ["meters/meter3", "meters/meter7"]
            .iter()
            .all(|unit| m.iter().any(|r| r.doc["device"] == *unit && all_good(r)))
    })
    .await;
    gw.shutdown().await;

    let msgs = sub.messages();
    assert!(
        msgs.iter()
            .all(|r| r.topic == format!("edge/gw-rtu/{}", r.doc["device"].as_str().unwrap())),
        "every record is on its unit's topic"
    );
    let good = |unit: &str| {
        msgs.iter()
            .find(|r| r.topic == format!("edge/gw-rtu/meters/{unit}") && all_good(r))
            .unwrap_or_else(|| panic!("a good record of {unit}"))
    };

    let meter3 = good("meter3");
    assert_eq!(meter3.doc["device"], "meters/meter3");
    assert_eq!(tag_names(meter3), ["active_power", "energy", "voltage"]);
    assert_eq!(number(meter3, "active_power"), 12.5, "f32 in CDAB order");
    assert!((number(meter3, "energy") - 48_213.7).abs() < 1e-6);
    assert!((number(meter3, "voltage") - 230.1).abs() < 1e-9);

    let meter7 = good("meter7");
    assert_eq!(meter7.doc["device"], "meters/meter7");
    assert_eq!(tag_names(meter7), ["active_power", "energy"]);
    assert_eq!(number(meter7, "active_power"), -3.25);
    assert!((number(meter7, "energy") - 9_876.5).abs() < 1e-6);

    assert!(
        msgs.iter()
            .filter(|r| r.doc["device"] == "meters/meter3")
            .all(|r| { sample(r, "active_power")["value"] != -3.25 }),
        "no record of meter3 carries meter7's value"
    );
    contiguous_seqs(&msgs, 1);
}

/// One unit of a line behind a serial-to-Ethernet converter at `address`, with the same tag
/// names as every other unit.
fn converter_unit(name: &str, unit_id: u8, scan: Duration) -> UnitSettings {
    let ir = |offset| Address {
        area: Area::InputRegister,
        offset,
    };
    UnitSettings {
        name: Some(name.into()),
        unit_id,
        tags: vec![
            tag(
                "active_power",
                ir(12),
                DataType::F32,
                WordOrder::CDAB,
                0,
                scan,
            ),
            TagSpec {
                scale: 0.1,
                ..tag("energy", ir(20), DataType::U32, WordOrder::ABCD, 0, scan)
            },
        ]
        .into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_stops_answering_is_demoted_with_its_tags_bad_timeout_and_promoted_when_it_answers_again(
) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let meter7 = meter(-3.25, 98_765, 2_288);
    let sim = RtuSim::new()
        .with_unit(3, meter(12.5, 482_137, 2_301))
        .with_unit(7, meter7.clone());
    let converter = sim.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let broker = broker::start(16 << 20).unwrap();
    let scan = Duration::from_millis(100);
    let line = DeviceSettings {
        name: "meters".into(),
        scan_interval: scan,
        kind: DeviceKind::Modbus(ModbusSettings {
            link: Link::RtuOverTcp {
                address: converter.addr().to_string(),
            },
            // Long enough that a loaded test machine does not time out the healthy unit.
            timeout: Duration::from_millis(300),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            units: vec![
                converter_unit("meter3", 3, scan),
                converter_unit("meter7", 7, scan),
            ],
            ..ModbusSettings::tcp(String::new(), 1, Vec::new())
        }),
    };
    let mut config = local_config("gw-rtu", dir.path().join("data"), broker.port(), vec![line]);
    config.mqtt.client_id = format!("gw-rtu-tcp-{}", std::process::id());
    let sub = Collector::start(broker.port(), "edge/gw-rtu/#").await;
    let gw = pipeline::start(config).await.unwrap();
    let is = |r: &Received, unit: &str| r.topic == format!("edge/gw-rtu/meters/{unit}");

    sub.wait_for(WAIT, "good records of both units", |m| {
        ["meter3", "meter7"]
            .iter()
            .all(|unit| m.iter().any(|r| is(r, unit) && all_good(r)))
    })
    .await;

    meter7.faults().silent.store(true, Ordering::Relaxed);
    sub.wait_for(WAIT, "meter7 bad with reason timeout", |m| {
        m.iter().any(|r| is(r, "meter7") && all_bad_timeout(r))
    })
    .await;
    let silent_from = sub
        .messages()
        .iter()
        .position(|r| is(r, "meter7") && all_bad_timeout(r))
        .unwrap();
    sub.wait_for(WAIT, "meter3 still good after meter7 went silent", |m| {
        m.iter()
            .skip(silent_from + 1)
            .filter(|r| is(r, "meter3") && all_good(r))
            .count()
            >= 5
    })
    .await;
    let meter7_status = gw
        .devices
        .iter()
        .find(|d| &*d.name == "meters/meter7")
        .unwrap()
        .status
        .clone();
    eventually(WAIT, "meter7 demoted", || !meter7_status.is_connected()).await;

    // Back on the line: the next probe answers and the unit is scanned again.
    meter7.faults().silent.store(false, Ordering::Relaxed);
    sub.wait_for(WAIT, "meter7 good again", |m| {
        m.iter()
            .skip(silent_from + 1)
            .any(|r| is(r, "meter7") && all_good(r))
    })
    .await;
    eventually(WAIT, "meter7 promoted", || meter7_status.is_connected()).await;
    gw.shutdown().await;

    let msgs = sub.messages();
    for r in msgs.iter().filter(|r| is(r, "meter3")) {
        assert!(all_good(r), "meter3 is never affected: {}", r.doc);
        assert_eq!(number(r, "active_power"), 12.5);
    }
    let back = msgs
        .iter()
        .skip(silent_from + 1)
        .find(|r| is(r, "meter7") && all_good(r))
        .unwrap();
    assert_eq!(tag_names(back), ["active_power", "energy"]);
    assert_eq!(number(back, "active_power"), -3.25);
    contiguous_seqs(&msgs, 1);
}
