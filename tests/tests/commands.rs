//! Writes from the cloud end to end: a client publishes commands on the embedded broker
//! (rumqttd), the gateway checks them, writes to a Modbus TCP simulator and replies on
//! `{topic_prefix}/{device}/cmd/reply`.

use std::time::Duration;

use edge_gateway::metrics::Metrics;
use gateway_tests::fixtures::{local_config, modbus_device, tag};
use gateway_tests::{init_tracing, Collector, Received};
use protocols::modbus::{Address, Area, DataType, TagSpec, WordOrder};
use protocols::model::WriteAccess;
use protocols::sim::modbus::SimDevice;
use rumqttc::{AsyncClient, MqttOptions, QoS};

const SCAN: Duration = Duration::from_millis(100);
const PREFIX: &str = "edge/gw-cmd";

fn hr(offset: u16) -> Address {
    Address {
        area: Area::HoldingRegister,
        offset,
    }
}

fn writable(mut t: TagSpec, min: Option<f64>, max: Option<f64>) -> TagSpec {
    t.write = Some(WriteAccess { min, max });
    t
}

/// The device's tags: a writable scaled setpoint (-20..=80), a writable bit of hr:5, a
/// read-only counter.
fn tags() -> Vec<TagSpec> {
    let mut setpoint = tag("setpoint", hr(10), DataType::I16, WordOrder::ABCD, 0, SCAN);
    setpoint.scale = 0.1;
    let mut reset = tag("reset", hr(5), DataType::Bool, WordOrder::ABCD, 0, SCAN);
    reset.bit = Some(3);
    vec![
        writable(setpoint, Some(-20.0), Some(80.0)),
        writable(reset, None, None),
        tag("counter", hr(0), DataType::U16, WordOrder::ABCD, 0, SCAN),
    ]
}

/// A client that publishes commands.
async fn commander(port: u16) -> AsyncClient {
    let o = MqttOptions::new("commander", "127.0.0.1", port);
    let (client, mut el) = AsyncClient::new(o, 16);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
}

/// Publishes `payload` on `device`'s command topic and waits for the reply with `id`.
async fn ask(
    client: &AsyncClient,
    sub: &Collector,
    device: &str,
    id: &str,
    payload: &str,
) -> Received {
    client
        .publish(
            format!("{PREFIX}/{device}/cmd"),
            QoS::AtLeastOnce,
            false,
            payload.to_owned(),
        )
        .await
        .unwrap();
    let reply_topic = format!("{PREFIX}/{device}/cmd/reply");
    let is_reply = |m: &Received| m.topic == reply_topic && m.doc["id"] == id;
    sub.wait_for(Duration::from_secs(10), "the reply", |msgs| {
        msgs.iter().any(is_reply)
    })
    .await;
    sub.messages().into_iter().find(is_reply).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_write_lands_in_the_device_and_every_refusal_stays_away_from_it() {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let dev = SimDevice::new();
    dev.image().hr[5] = 0b1000_0001;
    let sim = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = local_config(
        "gw-cmd",
        dir.path().join("data"),
        broker.port(),
        vec![modbus_device("press1", sim.addr(), SCAN, tags())],
    );
    config.commands.enabled = true;
    config.commands.write_interval = Duration::from_secs(600);
    config.mqtt.shutdown_grace = Duration::from_millis(500);
    let sub = Collector::start(broker.port(), &format!("{PREFIX}/#")).await;
    let gw = edge_gateway::pipeline::start(config).await.unwrap();
    // A record published after the gateway's subscription: commands are heard from here on.
    sub.wait_for(Duration::from_secs(10), "a record", |m| {
        m.iter().any(|r| r.topic == format!("{PREFIX}/press1"))
    })
    .await;
    let client = commander(broker.port()).await;

    // Accepted: 21.5 = raw * 0.1 lands as 215 and is read back.
    let reply = ask(
        &client,
        &sub,
        "press1",
        "a1",
        r#"{"id":"a1","tag":"setpoint","value":21.5}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(dev.image().hr[10], 215);
    let back = reply.doc["value"].as_f64().unwrap();
    assert!((back - 21.5).abs() < 1e-9, "{back}");

    // A bit: only bit 3 of hr:5 changes.
    let reply = ask(
        &client,
        &sub,
        "press1",
        "a2",
        r#"{"id":"a2","tag":"reset","value":true}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(reply.doc["value"], true);
    assert_eq!(dev.image().hr[5], 0b1000_1001);
    let writes = dev.writes();
    assert_eq!(writes, 2);

    // Every refusal, with its reason; none reaches the device.
    let refusals = [
        (
            "press1",
            "r1",
            r#"{"id":"r1","tag":"nope","value":1}"#,
            "unknown tag",
        ),
        (
            "press1",
            "r2",
            r#"{"id":"r2","tag":"counter","value":1}"#,
            "not writable",
        ),
        (
            "press1",
            "r3",
            r#"{"id":"r3","tag":"reset","value":1}"#,
            "takes a bool",
        ),
        (
            "press1",
            "r4",
            r#"{"id":"r4","tag":"setpoint","value":80.5}"#,
            "above write_max",
        ),
        (
            "press1",
            "r5",
            r#"{"id":"r5","tag":"setpoint","value":20}"#,
            "less than",
        ),
        (
            "press1",
            "r6",
            r#"{"id":"r6","tag":"setpoint"}"#,
            "not a command",
        ),
        (
            "press9",
            "r7",
            r#"{"id":"r7","tag":"setpoint","value":1}"#,
            "unknown device",
        ),
    ];
    for (device, id, payload, reason) in refusals {
        let reply = ask(&client, &sub, device, id, payload).await;
        assert_eq!(reply.doc["outcome"], "refused", "{}", reply.doc);
        let text = reply.doc["reason"].as_str().unwrap();
        assert!(text.contains(reason), "{id}: {text}");
    }
    assert_eq!(
        dev.writes(),
        writes,
        "no refused command reached the device"
    );
    assert_eq!(dev.image().hr[10], 215);
    assert_eq!(Metrics::get(&gw.metrics.commands_written), 2);
    assert_eq!(Metrics::get(&gw.metrics.commands_refused), 7);

    // Commands never enter the buffer: the records' seq stays contiguous and no record is
    // about a command.
    gw.shutdown().await;
    assert!(sub
        .messages()
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/press1"))
        .all(|m| m.doc["samples"].is_array()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_is_never_executed_and_a_reload_turns_commands_off_and_on_again_with_new_checks(
) {
    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let dev = SimDevice::new();
    let sim = dev.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = local_config(
        "gw-cmd",
        dir.path().join("data"),
        broker.port(),
        vec![modbus_device("press1", sim.addr(), SCAN, tags())],
    );
    config.commands.enabled = true;
    config.commands.write_interval = Duration::from_millis(1);
    config.mqtt.shutdown_grace = Duration::from_millis(500);
    let client = commander(broker.port()).await;
    // Left on the broker before the gateway subscribes: handed over at every subscription.
    client
        .publish(
            format!("{PREFIX}/press1/cmd"),
            QoS::AtLeastOnce,
            true,
            r#"{"id":"old","tag":"setpoint","value":30}"#,
        )
        .await
        .unwrap();
    let sub = Collector::start(broker.port(), &format!("{PREFIX}/#")).await;
    sub.wait_for(Duration::from_secs(10), "the retained command", |m| {
        m.iter().any(|r| r.topic == format!("{PREFIX}/press1/cmd"))
    })
    .await;
    let mut gw = edge_gateway::pipeline::start(config.clone()).await.unwrap();
    sub.wait_for(Duration::from_secs(10), "a record", |m| {
        m.iter().any(|r| r.topic == format!("{PREFIX}/press1"))
    })
    .await;
    // Commands are taken in order: once this one is answered, the retained one was handled.
    let reply = ask(
        &client,
        &sub,
        "press1",
        "new",
        r#"{"id":"new","tag":"setpoint","value":25}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(dev.writes(), 1, "the retained command was executed");
    assert_eq!(dev.image().hr[10], 250);
    assert!(
        !sub.messages()
            .iter()
            .any(|m| m.doc["id"] == "old" && m.topic.ends_with("/reply")),
        "the retained command got a reply as if run"
    );

    // A reload that turns commands off: the next command is refused and never written.
    let mut off = config.clone();
    off.commands.enabled = false;
    gw.reload(off).await.unwrap();
    let reply = ask(
        &client,
        &sub,
        "press1",
        "late",
        r#"{"id":"late","tag":"setpoint","value":22}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "refused", "{}", reply.doc);
    assert!(
        reply.doc["reason"].as_str().unwrap().contains("disabled"),
        "{}",
        reply.doc
    );
    assert_eq!(dev.writes(), 1);
    assert_eq!(dev.image().hr[10], 250);

    // A reload that turns them on again and changes the device (a wider bound, a new writable
    // tag): its restarted driver takes writes at once, under the new checks.
    let mut changed = config.clone();
    let mut tags = tags();
    tags[0].write = Some(WriteAccess {
        min: Some(-20.0),
        max: Some(90.0),
    });
    let mut mode = tag("mode", hr(11), DataType::U16, WordOrder::ABCD, 0, SCAN);
    mode.write = Some(WriteAccess::default());
    tags.push(mode);
    changed.devices = vec![modbus_device("press1", sim.addr(), SCAN, tags)];
    gw.reload(changed).await.unwrap();
    // A write before the restarted driver's line is open is refused ("not connected").
    let restarted = gw.devices[0].status.clone();
    gateway_tests::eventually(Duration::from_secs(20), "press1 connected again", || {
        restarted.is_connected()
    })
    .await;
    let reply = ask(
        &client,
        &sub,
        "press1",
        "wider",
        r#"{"id":"wider","tag":"setpoint","value":85}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(dev.image().hr[10], 850);
    let reply = ask(
        &client,
        &sub,
        "press1",
        "mode",
        r#"{"id":"mode","tag":"mode","value":3}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(dev.image().hr[11], 3);
    gw.shutdown().await;
}

// ---- OPC UA: the Write service ------------------------------------------------------------

/// An OPC UA tag of the simulator's node `id`, writable within `bounds` when given.
fn ua_tag(
    sim: &protocols::sim::opcua::SimOpcUa,
    name: &str,
    id: &str,
    write: Option<WriteAccess>,
) -> protocols::opcua::OpcUaTag {
    let node = protocols::opcua::parse_node_id(&format!("ns={};s={id}", sim.namespace())).unwrap();
    protocols::opcua::OpcUaTag {
        meta: Default::default(),
        name: name.into(),
        node: protocols::opcua::NodeRef::Id(node),
        sampling_interval: SCAN,
        deadband: None,
        queue_size: 10,
        write,
    }
}

fn any_value() -> Option<WriteAccess> {
    Some(WriteAccess::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opcua_write_lands_in_the_node_s_own_type_and_a_refusing_server_s_status_is_the_reason()
{
    use ::opcua::types::Variant;
    use edge_gateway::config::{DeviceKind, DeviceSettings};
    use protocols::sim::opcua::{SimOpcUa, SimOptions};

    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimOpcUa::start(SimOptions {
        pki_dir: dir.path().join("sim-pki"),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let tags = vec![
        // A Double the server takes, bounded by the gateway.
        ua_tag(
            &sim,
            "setpoint",
            "Sim.Setpoint",
            Some(WriteAccess {
                min: Some(0.0),
                max: Some(100.0),
            }),
        ),
        // An Int16 the server takes.
        ua_tag(&sim, "limit", "Sim.Limit", any_value()),
        // Writable for the gateway, read-only on the server.
        ua_tag(&sim, "wave", "Sim.Double", any_value()),
        ua_tag(&sim, "counter", "Sim.Counter", None),
    ];
    let mut settings = protocols::opcua::OpcUaSettings::new(sim.endpoint(), tags);
    settings.pki_dir = dir.path().join("gw-pki");
    settings.trust_server_cert = true;
    settings.publishing_interval = SCAN;
    settings.timeout = Duration::from_secs(2);
    let device = DeviceSettings {
        name: "oven".into(),
        scan_interval: SCAN,
        kind: DeviceKind::OpcUa(settings),
    };
    let mut config = local_config(
        "gw-cmd",
        dir.path().join("data"),
        broker.port(),
        vec![device],
    );
    config.commands.enabled = true;
    config.commands.write_interval = Duration::from_millis(1);
    config.mqtt.shutdown_grace = Duration::from_millis(500);
    let sub = Collector::start(broker.port(), &format!("{PREFIX}/#")).await;
    let gw = edge_gateway::pipeline::start(config).await.unwrap();
    // A good value comes once the session is subscribed: writes are taken from then on.
    sub.wait_for(Duration::from_secs(20), "a good record", |m| {
        m.iter().any(|r| {
            r.topic == format!("{PREFIX}/oven")
                && r.doc["samples"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["quality"] == "good"))
        })
    })
    .await;
    let client = commander(broker.port()).await;

    // Accepted, and read back.
    let reply = ask(
        &client,
        &sub,
        "oven",
        "w1",
        r#"{"id":"w1","tag":"setpoint","value":42.5}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(reply.doc["value"], 42.5);
    assert_eq!(sim.value("Sim.Setpoint").unwrap(), Variant::Double(42.5));

    // The node's data type decides: 21 arrives as an Int16, not as the command's integer.
    let reply = ask(
        &client,
        &sub,
        "oven",
        "w2",
        r#"{"id":"w2","tag":"limit","value":21}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(reply.doc["value"], 21);
    assert_eq!(sim.value("Sim.Limit").unwrap(), Variant::Int16(21));

    // The server refuses: its status code is the reason.
    let reply = ask(
        &client,
        &sub,
        "oven",
        "f1",
        r#"{"id":"f1","tag":"wave","value":1.5}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "failed", "{}", reply.doc);
    let reason = reply.doc["reason"].as_str().unwrap();
    assert!(reason.contains("BadUserAccessDenied"), "{reason}");

    // Values that do not fit the node, or the gateway's bounds, never reach the server.
    let refusals = [
        (
            "r1",
            r#"{"id":"r1","tag":"limit","value":21.5}"#,
            "not a whole number",
        ),
        (
            "r2",
            r#"{"id":"r2","tag":"limit","value":40000}"#,
            "outside the range of type Int16",
        ),
        (
            "r3",
            r#"{"id":"r3","tag":"setpoint","value":true}"#,
            "a bool value cannot be written to a node of type Double",
        ),
        (
            "r4",
            r#"{"id":"r4","tag":"setpoint","value":150}"#,
            "above write_max",
        ),
        (
            "r5",
            r#"{"id":"r5","tag":"counter","value":1}"#,
            "not writable",
        ),
    ];
    for (id, payload, reason) in refusals {
        let reply = ask(&client, &sub, "oven", id, payload).await;
        assert_eq!(reply.doc["outcome"], "refused", "{}", reply.doc);
        let text = reply.doc["reason"].as_str().unwrap();
        assert!(text.contains(reason), "{id}: {text}");
    }
    assert_eq!(sim.value("Sim.Limit").unwrap(), Variant::Int16(21));
    assert_eq!(sim.value("Sim.Setpoint").unwrap(), Variant::Double(42.5));
    assert_eq!(Metrics::get(&gw.metrics.commands_written), 2);
    assert_eq!(Metrics::get(&gw.metrics.commands_failed), 1);
    assert_eq!(Metrics::get(&gw.metrics.commands_refused), 5);
    gw.shutdown().await;
    sim.stop().await;
}

// ---- Modbus RTU: a unit of a line is a device of its own ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_a_unit_s_topic_writes_that_unit_of_an_rtu_line_and_no_other() {
    use edge_gateway::config::{DeviceKind, DeviceSettings};
    use protocols::modbus::{Link, ModbusSettings, UnitSettings};
    use protocols::sim::rtu::RtuSim;

    init_tracing();
    let broker = edge_gateway::demo::broker::start(16 << 20).unwrap();
    let (three, seven) = (SimDevice::new(), SimDevice::new());
    let sim = RtuSim::new()
        .with_unit(3, three.clone())
        .with_unit(7, seven.clone());
    let converter = sim.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let unit = |name: &str, unit_id| UnitSettings {
        name: Some(name.into()),
        unit_id,
        tags: tags().into(),
    };
    let line = DeviceSettings {
        name: "meters".into(),
        scan_interval: SCAN,
        kind: DeviceKind::Modbus(ModbusSettings {
            link: Link::RtuOverTcp {
                address: converter.addr().to_string(),
            },
            timeout: Duration::from_millis(300),
            units: vec![unit("m3", 3), unit("m7", 7)],
            ..ModbusSettings::tcp(String::new(), 1, Vec::new())
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = local_config("gw-cmd", dir.path().join("data"), broker.port(), vec![line]);
    config.commands.enabled = true;
    config.mqtt.shutdown_grace = Duration::from_millis(500);
    let sub = Collector::start(broker.port(), &format!("{PREFIX}/#")).await;
    let gw = edge_gateway::pipeline::start(config).await.unwrap();
    sub.wait_for(Duration::from_secs(10), "a record of each unit", |m| {
        ["m3", "m7"]
            .iter()
            .all(|u| m.iter().any(|r| r.topic == format!("{PREFIX}/meters/{u}")))
    })
    .await;
    let client = commander(broker.port()).await;

    let reply = ask(
        &client,
        &sub,
        "meters/m7",
        "u1",
        r#"{"id":"u1","tag":"setpoint","value":-12.5}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "written", "{}", reply.doc);
    assert_eq!(reply.doc["value"], -12.5);
    assert_eq!(seven.image().hr[10], (-125i16) as u16);
    assert_eq!(seven.writes(), 1);
    assert_eq!(
        three.writes(),
        0,
        "the other unit of the line is left alone"
    );
    assert_eq!(three.image().hr[10], 0);

    // The line's name alone is no device.
    let reply = ask(
        &client,
        &sub,
        "meters",
        "u2",
        r#"{"id":"u2","tag":"setpoint","value":1}"#,
    )
    .await;
    assert_eq!(reply.doc["outcome"], "refused", "{}", reply.doc);
    assert!(reply.doc["reason"]
        .as_str()
        .unwrap()
        .contains("unknown device"));
    assert_eq!(three.writes() + seven.writes(), 1);
    gw.shutdown().await;
}
