//! The configuration's runtime values: what a valid file yields (defaults, every key set,
//! paths resolved by `load`), the parsers of values, and that no text makes the loader panic.
//! Which problems a file yields is shown by the golden cases in `gateway/tests/config_cases/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use protocols::modbus::{
    Address, Area, DataType, Link, ModbusSettings, Parity, Report, SerialSettings, TagSpec,
    UnitSettings, WordOrder,
};
use protocols::opcua::{
    parse_node_id, Identity, Mode, NodeRef, OpcUaSettings, OpcUaTag, SecurityMode, SecurityPolicy,
};

use super::raw::BARE_DURATION;
use super::values::{fmt_duration, fmt_size, parse_size, MAX_DURATION};
use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/gateway.example.toml");

/// A small valid file that the rule tests edit.
const BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"
"#;

/// The contract's example, every key set. (The contract's tag block also shows
/// `length = 16` on the f32 tag, which its own rules forbid; it is left out here.)
const FULL: &str = r#"[gateway]
id = "edge-01"
data_dir = "./data"

[buffer]
max_size = "1GiB"
when_full = "drop_oldest"
commit_interval = "100ms"

[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "edge-01"
topic_prefix = "edge/edge-01"
format = "json"
username = "gw"
password_file = "/path"
keep_alive = "30s"
max_inflight = 256
max_packet_size = "1MiB"
shutdown_grace = "5s"
ack_timeout = "30s"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
unit_id = 1
scan_interval = "1s"
timeout = "1s"
max_registers_per_read = 125
max_gap = 16
report = "every_scan"
max_silence = "60s"
backoff_min = "100ms"
backoff_max = "30s"
enabled = true

  [[devices.tags]]
  name = "sine"
  address = "hr:1"
  type = "f32"
  order = "ABCD"
  scale = 1.0
  offset = 0.0
  deadband = 0.0
  unit = "m/s"
  scan_interval = "250ms"
"#;

fn config(src: &str) -> Config {
    match parse(src, "test.toml") {
        Ok(config) => config,
        Err(errors) => panic!("unexpected problems:\n{errors}"),
    }
}

fn problems(src: &str) -> Vec<Problem> {
    match parse(src, "test.toml") {
        Ok(_) => Vec::new(),
        Err(errors) => errors.problems,
    }
}

fn modbus(device: &DeviceSettings) -> &ModbusSettings {
    match &device.kind {
        DeviceKind::Modbus(settings) => settings,
        other => panic!("expected a Modbus device, got {other:?}"),
    }
}

/// The one unnamed unit of a Modbus device in the one-unit form.
fn only_unit(device: &DeviceSettings) -> &UnitSettings {
    match &modbus(device).units[..] {
        [unit] if unit.name.is_none() => unit,
        other => panic!("expected one unnamed unit, got {other:?}"),
    }
}

fn opcua(device: &DeviceSettings) -> &OpcUaSettings {
    match &device.kind {
        DeviceKind::OpcUa(settings) => settings,
        other => panic!("expected an opcua device, got {other:?}"),
    }
}

/// The 1-based line of the first line of `src` containing `needle`.
fn line_containing(src: &str, needle: &str) -> usize {
    match src.lines().position(|line| line.contains(needle)) {
        Some(index) => index + 1,
        None => panic!("`{needle}` is not in the test source"),
    }
}

fn listing(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}\n"))
        .collect::<String>()
}

/// Asserts a problem on `field`, on the line holding `needle`, whose message holds
/// `fragment`.
fn assert_problem(src: &str, field: &str, needle: &str, fragment: &str) {
    let found = problems(src);
    let line = line_containing(src, needle);
    assert!(
        found
            .iter()
            .any(|p| p.field == field && p.line == Some(line) && p.message.contains(fragment)),
        "expected `{field}` on line {line} saying `{fragment}` in:\n{src}\ngot:\n{}",
        listing(&found)
    );
}

fn with_gateway(lines: &str) -> String {
    BASE.replace(
        "id = \"edge-01\"\n",
        &format!("id = \"edge-01\"\n{lines}\n"),
    )
}

fn with_mqtt(lines: &str) -> String {
    let url = "url = \"mqtt://127.0.0.1:1883\"\n";
    BASE.replace(url, &format!("{url}{lines}\n"))
}

fn with_url(url: &str) -> String {
    BASE.replace("mqtt://127.0.0.1:1883", url)
}

fn with_buffer(lines: &str) -> String {
    format!("{BASE}\n[buffer]\n{lines}\n")
}

fn with_device(lines: &str) -> String {
    let address = "address = \"127.0.0.1:5020\"\n";
    BASE.replace(address, &format!("{address}{lines}\n"))
}

fn with_tag(lines: &str) -> String {
    format!("{BASE}\n  [[devices.tags]]\n{lines}\n")
}

#[test]
fn example_file_parses_without_problems() {
    let config = config(EXAMPLE);
    assert_eq!(&*config.gateway.id, "edge-01");
    assert_eq!(
        config.devices.len(),
        1,
        "the disabled Modbus and OPC UA devices are left out"
    );
    let press = &config.devices[0];
    let tags = &only_unit(press).tags;
    let summary: Vec<(&str, String, DataType, u16)> = tags
        .iter()
        .map(|t| (&*t.name, t.address.to_string(), t.data_type, t.width()))
        .collect();
    assert_eq!(
        summary,
        [
            ("counter", "hr:0".to_owned(), DataType::U16, 1),
            ("sine", "hr:1".to_owned(), DataType::F32, 2),
            ("position", "hr:3".to_owned(), DataType::I32, 2),
            ("energy", "hr:5".to_owned(), DataType::F64, 4),
            ("recipe", "hr:10".to_owned(), DataType::String, 8),
            ("running", "co:0".to_owned(), DataType::Bool, 1),
        ]
    );
    assert_eq!(tags[2].order, WordOrder::CDAB);
    assert_eq!(tags[4].length, 16);
}

#[test]
fn full_contract_example_parses_to_the_expected_runtime_values() {
    let expected = Config {
        gateway: GatewaySettings {
            id: "edge-01".into(),
            data_dir: PathBuf::from("./data"),
        },
        buffer: BufferSettings {
            max_size: 1 << 30,
            when_full: WhenFull::DropOldest,
            commit_interval: Duration::from_millis(100),
            replay_rate: None,
        },
        mqtt: MqttSettings {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            client_id: "edge-01".to_owned(),
            topic_prefix: "edge/edge-01".to_owned(),
            format: Format::Json,
            username: Some("gw".to_owned()),
            password_file: Some(PathBuf::from("/path")),
            keep_alive: Duration::from_secs(30),
            max_inflight: 256,
            max_packet_size: 1 << 20,
            shutdown_grace: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
        },
        devices: vec![DeviceSettings {
            name: "press7".into(),
            scan_interval: Duration::from_secs(1),
            kind: DeviceKind::Modbus(ModbusSettings {
                link: Link::Tcp {
                    address: "127.0.0.1:5020".to_owned(),
                },
                timeout: Duration::from_secs(1),
                inter_request_delay: Duration::ZERO,
                max_registers_per_read: 125,
                max_gap: 16,
                report: Report::EveryScan,
                max_silence: Duration::from_secs(60),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(30),
                units: vec![UnitSettings {
                    name: None,
                    unit_id: 1,
                    tags: vec![TagSpec {
                        name: "sine".into(),
                        address: Address {
                            area: Area::HoldingRegister,
                            offset: 1,
                        },
                        data_type: DataType::F32,
                        order: WordOrder::ABCD,
                        length: 0,
                        scale: 1.0,
                        offset: 0.0,
                        deadband: 0.0,
                        scan_interval: Duration::from_millis(250),
                    }],
                }],
            }),
        }],
    };
    assert_eq!(config(FULL), expected);
}

#[test]
fn defaults_fill_in_every_optional_key() {
    let config = config(&with_tag("  name = \"running\"\n  address = \"co:3\""));
    assert_eq!(config.gateway.data_dir, PathBuf::from("./data"));
    assert_eq!(config.buffer.max_size, 1 << 30);
    assert_eq!(config.buffer.when_full, WhenFull::DropOldest);
    assert_eq!(config.buffer.commit_interval, Duration::from_millis(100));
    let mqtt = &config.mqtt;
    assert_eq!((mqtt.host.as_str(), mqtt.port), ("127.0.0.1", 1883));
    assert_eq!(mqtt.client_id, "edge-01");
    assert_eq!(mqtt.topic_prefix, "edge/edge-01");
    assert_eq!(mqtt.format, Format::Json);
    assert_eq!((&mqtt.username, &mqtt.password_file), (&None, &None));
    assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
    assert_eq!(mqtt.max_inflight, 256);
    assert_eq!(mqtt.max_packet_size, 1 << 20);
    assert_eq!(mqtt.shutdown_grace, Duration::from_secs(5));
    assert_eq!(mqtt.ack_timeout, Duration::from_secs(30));
    let device = &config.devices[0];
    assert_eq!(device.scan_interval, Duration::from_secs(1));
    let settings = modbus(device);
    assert_eq!(
        settings.link,
        Link::Tcp {
            address: "127.0.0.1:5020".to_owned()
        }
    );
    assert_eq!(only_unit(device).unit_id, 1);
    assert_eq!(settings.timeout, Duration::from_secs(1));
    assert_eq!(settings.inter_request_delay, Duration::ZERO);
    assert_eq!(settings.max_registers_per_read, 125);
    assert_eq!(settings.max_gap, 16);
    assert_eq!(settings.report, Report::EveryScan);
    assert_eq!(settings.max_silence, Duration::from_secs(60));
    assert_eq!(settings.backoff_min, Duration::from_millis(100));
    assert_eq!(settings.backoff_max, Duration::from_secs(30));
    let tags = &only_unit(device).tags;
    let [register, coil] = &tags[..] else {
        panic!("expected two tags, got {tags:?}");
    };
    assert_eq!(register.data_type, DataType::U16, "u16 on registers");
    assert_eq!(coil.data_type, DataType::Bool, "bool on coils");
    for tag in [register, coil] {
        assert_eq!(tag.order, WordOrder::ABCD);
        assert_eq!((tag.scale, tag.offset, tag.deadband), (1.0, 0.0, 0.0));
        assert_eq!(tag.scan_interval, Duration::from_secs(1));
    }
}

#[test]
fn a_tag_scans_at_its_own_interval_or_else_at_its_devices() {
    let src = with_device("scan_interval = \"2s\"");
    let src = format!(
        "{src}\n  [[devices.tags]]\n  name = \"fast\"\n  address = \"hr:9\"\n  \
             scan_interval = \"250ms\"\n"
    );
    let config = config(&src);
    let device = &config.devices[0];
    assert_eq!(device.scan_interval, Duration::from_secs(2));
    let intervals: Vec<Duration> = only_unit(device)
        .tags
        .iter()
        .map(|t| t.scan_interval)
        .collect();
    assert_eq!(
        intervals,
        [Duration::from_secs(2), Duration::from_millis(250)]
    );
}

#[test]
fn disabled_devices_are_validated_but_left_out() {
    let disabled = "\n[[devices]]\nname = \"spare\"\nprotocol = \"modbus_tcp\"\n\
                        address = \"10.0.0.9:502\"\nenabled = false\n";
    let config = config(&format!("{BASE}{disabled}"));
    let names: Vec<&str> = config.devices.iter().map(|d| &*d.name).collect();
    assert_eq!(names, ["press7"], "a disabled device needs no tags either");

    let broken = format!("{BASE}{}", disabled.replace("10.0.0.9:502", "10.0.0.9"));
    assert_problem(&broken, "devices[1].address", "10.0.0.9", "has no port");
}

#[test]
fn reports_every_problem_with_its_line() {
    let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"
keepalive = "30s"

[[devices]]
name = "press7"
protocol = "modbus_tcp"
address = "127.0.0.1:5020"
scan_interval = "fast"

  [[devices.tags]]
  name = "counter"
  address = "hr:0"

  [[devices.tags]]
  name = "sine"
  address = "xr:1"

  [[devices.tags]]
  name = "level"
  address = "hr:4"
  colour = "red"

  [[devices.tags]]
  name = "counter"
  address = "hr:8"
"#;
    let found = problems(src);
    let summary: Vec<(Option<usize>, &str)> =
        found.iter().map(|p| (p.line, p.field.as_str())).collect();
    assert_eq!(
        summary,
        [
            (Some(6), "mqtt.keepalive"),
            (Some(12), "devices[0].scan_interval"),
            (Some(20), "devices[0].tags[1].address"),
            (Some(25), "devices[0].tags[2].colour"),
            (Some(28), "devices[0].tags[3].name"),
        ],
        "got:\n{}",
        listing(&found)
    );
    assert!(found[0].message.contains("did you mean `keep_alive`?"));
    assert!(found[1].message.contains("`fast` is not a duration"));
    assert!(found[2]
        .message
        .contains("unknown area `xr`: use hr (holding)"));
    assert!(found[3].message.contains("unknown key `colour`"));
    assert!(found[4]
        .message
        .contains("the tag on line 15 has it already"));
}

#[test]
fn problems_render_one_per_line_with_file_line_field_and_message() {
    let src = with_mqtt("keepalive = \"30s\"\nmax_inflight = 0");
    let errors = match parse(&src, "gateway.toml") {
        Ok(_) => panic!("expected problems"),
        Err(errors) => errors,
    };
    assert_eq!(
        errors.to_string(),
        "gateway.toml:6: mqtt.keepalive: unknown key `keepalive`; did you mean \
             `keep_alive`?\ngateway.toml:7: mqtt.max_inflight: must be between 1 and 1024, \
             not 0"
    );
    let no_line = ConfigErrors::whole_file("gateway.toml", None, "gone".to_owned());
    assert_eq!(no_line.to_string(), "gateway.toml: gone");
}

#[test]
fn a_syntax_error_is_one_problem_with_its_line() {
    let found = problems("[gateway]\nid = \"edge-01\"\n\n[mqtt\nurl = 1\n");
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_eq!(found[0].line, Some(4));
    assert!(found[0].message.starts_with("TOML syntax error"));

    let found = problems("[gateway]\nid = \"a\"\nid = \"b\"\n");
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_eq!(found[0].line, Some(3));
    assert!(found[0].message.contains("duplicate key"));
}

#[test]
fn lines_are_found_in_inline_tables_and_dotted_keys_too() {
    let src = r#"gateway = { id = "edge 01" }
mqtt.url = "mqtts://broker"
devices = [
  { name = "press7", protocol = "modbus_tcp", address = "127.0.0.1:5020", tags = [
    { name = "a", address = "xr:1" },
  ] },
]
"#;
    assert_problem(src, "gateway.id", "edge 01", "not allowed");
    assert_problem(src, "mqtt.url", "mqtts", "TLS is not supported yet");
    assert_problem(
        src,
        "devices[0].tags[0].address",
        "xr:1",
        "unknown area `xr`",
    );
}

#[test]
fn section_rules() {
    let missing_mqtt = "[gateway]\nid = \"g\"\n\n[[devices]]\nname = \"d\"\n\
                            protocol = \"modbus_tcp\"\naddress = \"h:502\"\n\
                            [[devices.tags]]\nname = \"t\"\naddress = \"hr:0\"\n";
    let found = problems(missing_mqtt);
    assert_eq!(
        found,
        [Problem {
            line: None,
            field: "mqtt".to_owned(),
            message: "missing section [mqtt]".to_owned(),
        }]
    );
    assert_problem(
        &format!("{BASE}\n[[device]]\nname = \"x\"\n"),
        "device",
        "[[device]]",
        "did you mean `devices`?",
    );
    assert_problem(
        &BASE
            .replace("[[devices]]", "[devices]")
            .replace("[[devices.tags]]", "[devices.tags]"),
        "devices",
        "[devices]",
        "double brackets",
    );
    let found = problems("[gateway]\nid = \"g\"\n[mqtt]\nurl = \"mqtt://h\"\n");
    assert_eq!(
        found,
        [Problem {
            line: None,
            field: "devices".to_owned(),
            message: "no [[devices]]: configure at least one device".to_owned(),
        }]
    );
}

#[test]
fn gateway_rules() {
    assert_problem(
        &BASE.replace("edge-01", "edge/01"),
        "gateway.id",
        "edge/01",
        "'/' is not allowed",
    );
    assert_problem(
        &BASE.replace("id = \"edge-01\"\n", ""),
        "gateway.id",
        "[gateway]",
        "missing required key `id`",
    );
    assert_problem(
        &with_gateway("data_dir = \"\""),
        "gateway.data_dir",
        "data_dir",
        "must not be empty",
    );
    assert_problem(
        &with_gateway("colour = 1"),
        "gateway.colour",
        "colour",
        "unknown key `colour`",
    );
}

#[test]
fn buffer_rules() {
    let cases = [
        (
            "max_size = \"512KiB\"",
            "buffer.max_size",
            "at least 1MiB, not 512KiB",
        ),
        ("max_size = \"1TB\"", "buffer.max_size", "unknown unit `TB`"),
        ("max_size = \"big\"", "buffer.max_size", "is not a size"),
        (
            "when_full = \"drop_all\"",
            "buffer.when_full",
            "unknown value `drop_all`",
        ),
        (
            "commit_interval = \"2m\"",
            "buffer.commit_interval",
            "between 1ms and 1m",
        ),
        (
            "commit_interval = \"500us\"",
            "buffer.commit_interval",
            "between 1ms and 1m",
        ),
        (
            "commit_interval = 100",
            "buffer.commit_interval",
            BARE_DURATION,
        ),
        (
            "replay_rate = 0",
            "buffer.replay_rate",
            "between 1 and 1000000, not 0",
        ),
    ];
    for (line, field, fragment) in cases {
        assert_problem(&with_buffer(line), field, line, fragment);
    }
    let config = config(&with_buffer(
        "max_size = \"100MB\"\nwhen_full = \"drop_newest\"",
    ));
    assert_eq!(config.buffer.max_size, 100_000_000);
    assert_eq!(config.buffer.when_full, WhenFull::DropNewest);
    assert_eq!(config.buffer.replay_rate, None, "unlimited by default");
    let paced = self::tests::config(&with_buffer("replay_rate = 500"));
    assert_eq!(paced.buffer.replay_rate, Some(500));
}

#[test]
fn mqtt_url_rules() {
    let cases = [
        ("mqtts://broker:8883", "TLS is not supported yet"),
        ("ssl://broker", "TLS is not supported yet"),
        ("http://broker", "unsupported scheme `http://`"),
        ("broker:1883", "expected `mqtt://HOST[:PORT]`"),
        (
            "mqtt://user:secret@broker",
            "credentials do not belong in the url",
        ),
        ("mqtt://broker/topic", "without a path"),
        ("mqtt://:1883", "no host"),
        ("mqtt://broker:0", "`0` is not a port"),
        ("mqtt://broker:65536", "`65536` is not a port"),
        ("mqtt://bro ker", "not a valid host"),
    ];
    for (url, fragment) in cases {
        assert_problem(&with_url(url), "mqtt.url", url, fragment);
    }
    for (url, host, port) in [
        ("tcp://broker", "broker", 1883),
        ("mqtt://10.0.0.5:1884/", "10.0.0.5", 1884),
        ("MQTT://[::1]:1885", "::1", 1885),
    ] {
        let mqtt = config(&with_url(url)).mqtt;
        assert_eq!((mqtt.host.as_str(), mqtt.port), (host, port), "{url}");
    }
    let secret = problems(&with_url("mqtt://user:hunter2@broker"));
    assert!(
        !format!("{secret:?}").contains("hunter2"),
        "the password is never echoed"
    );
    assert_problem(
        &BASE.replace("url = \"mqtt://127.0.0.1:1883\"\n", ""),
        "mqtt.url",
        "[mqtt]",
        "missing required key `url`",
    );
}

#[test]
fn mqtt_rules() {
    let cases = [
        (
            "topic_prefix = \"edge/#\"",
            "mqtt.topic_prefix",
            "wildcards",
        ),
        (
            "topic_prefix = \"edge/+/x\"",
            "mqtt.topic_prefix",
            "wildcards",
        ),
        (
            "topic_prefix = \"/edge\"",
            "mqtt.topic_prefix",
            "start or end with `/`",
        ),
        (
            "topic_prefix = \"edge/\"",
            "mqtt.topic_prefix",
            "start or end with `/`",
        ),
        ("client_id = \"\"", "mqtt.client_id", "must not be empty"),
        ("format = \"xml\"", "mqtt.format", "unknown value `xml`"),
        (
            "max_inflight = 0",
            "mqtt.max_inflight",
            "between 1 and 1024, not 0",
        ),
        (
            "max_inflight = 1025",
            "mqtt.max_inflight",
            "between 1 and 1024, not 1025",
        ),
        (
            "max_inflight = \"many\"",
            "mqtt.max_inflight",
            "expected an integer",
        ),
        (
            "max_packet_size = \"8KiB\"",
            "mqtt.max_packet_size",
            "between 16KiB and 256MiB",
        ),
        (
            "max_packet_size = \"512MiB\"",
            "mqtt.max_packet_size",
            "between 16KiB and 256MiB",
        ),
        (
            "keep_alive = \"500ms\"",
            "mqtt.keep_alive",
            "between 1s and 65535s",
        ),
        ("keep_alive = 30", "mqtt.keep_alive", BARE_DURATION),
        (
            "ack_timeout = \"0s\"",
            "mqtt.ack_timeout",
            "must not be zero",
        ),
        ("username = \"\"", "mqtt.username", "must not be empty"),
        (
            "password = \"x\"",
            "mqtt.password",
            "did you mean `password_file`?",
        ),
    ];
    for (line, field, fragment) in cases {
        assert_problem(&with_mqtt(line), field, line, fragment);
    }
    let mqtt = config(&with_mqtt("shutdown_grace = \"0s\"\nkeep_alive = \"1.5s\"")).mqtt;
    assert_eq!(mqtt.shutdown_grace, Duration::ZERO, "zero grace is allowed");
    assert_eq!(mqtt.keep_alive, Duration::from_millis(1500));
}

#[test]
fn device_rules() {
    let cases = [
        (
            "unit_id = 256",
            "devices[0].unit_id",
            "between 0 and 255, not 256",
        ),
        ("unit_id = -1", "devices[0].unit_id", "between 0 and 255"),
        (
            "unit_id = \"1\"",
            "devices[0].unit_id",
            "invalid type: string \"1\", expected an integer",
        ),
        (
            "max_registers_per_read = 0",
            "devices[0].max_registers_per_read",
            "between 1 and 125",
        ),
        (
            "max_registers_per_read = 126",
            "devices[0].max_registers_per_read",
            "between 1 and 125",
        ),
        ("max_gap = 126", "devices[0].max_gap", "between 0 and 125"),
        (
            "scan_interval = \"0ms\"",
            "devices[0].scan_interval",
            "must not be zero (at least 1ms)",
        ),
        (
            "scan_interval = \"500us\"",
            "devices[0].scan_interval",
            "at least 1ms, not 500us",
        ),
        (
            "scan_interval = 5",
            "devices[0].scan_interval",
            BARE_DURATION,
        ),
        ("timeout = \"0s\"", "devices[0].timeout", "must not be zero"),
        (
            "max_silence = \"8d\"",
            "devices[0].max_silence",
            "unknown unit `d`",
        ),
        (
            "report = \"sometimes\"",
            "devices[0].report",
            "unknown value `sometimes`",
        ),
        (
            "enabled = \"yes\"",
            "devices[0].enabled",
            "expected a boolean",
        ),
        (
            "adress = \"x\"",
            "devices[0].adress",
            "did you mean `address`?",
        ),
        ("tag = []", "devices[0].tag", "did you mean `tags`?"),
    ];
    for (line, field, fragment) in cases {
        assert_problem(&with_device(line), field, line, fragment);
    }
    assert_problem(
        &with_device("backoff_min = \"10s\"\nbackoff_max = \"1s\""),
        "devices[0].backoff_max",
        "backoff_max",
        "at least backoff_min (10s), not 1s",
    );
    let name_cases = [
        ("press 7", "' ' is not allowed"),
        ("press/7", "'/' is not allowed"),
        ("", "1 to 64 characters long, not 0"),
    ];
    for (name, fragment) in name_cases {
        let src = BASE.replace("name = \"press7\"", &format!("name = \"{name}\""));
        assert_problem(&src, "devices[0].name", "name = \"", fragment);
    }
    let long = "p".repeat(65);
    assert_problem(
        &BASE.replace("press7", &long),
        "devices[0].name",
        &long,
        "not 65",
    );
    config(&BASE.replace("press7", &"p".repeat(64)));
    config(&BASE.replace("press7", "Press_7.a-b"));
    config(&with_device("unit_id = 0\nmax_gap = 0"));
    let address_cases = [
        ("127.0.0.1", "has no port"),
        ("127.0.0.1:0", "`0` is not a port"),
        ("tcp://127.0.0.1:502", "without a scheme"),
        (":502", "no host"),
        ("[::1", "not a valid host"),
    ];
    for (address, fragment) in address_cases {
        let src = BASE.replace("127.0.0.1:5020", address);
        assert_problem(&src, "devices[0].address", "address = \"", fragment);
    }
    config(&BASE.replace("127.0.0.1:5020", "[fe80::1]:502"));
    config(&BASE.replace("127.0.0.1:5020", "plc-7.plant.local:502"));
}

#[test]
fn protocol_rules() {
    assert_problem(
        &BASE.replace("\"modbus_tcp\"", "\"modbus\""),
        "devices[0].protocol",
        "protocol =",
        "unknown protocol `modbus`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp or opcua",
    );
    // Without a known protocol the device's other keys mean nothing: only the protocol
    // is reported.
    for (protocol, message) in [
        (
            "\"opc-ua\"",
            "unknown protocol `opc-ua`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp or \
                 opcua",
        ),
        ("5", "invalid type: integer `5`, expected a string"),
    ] {
        let src = OPCUA_BASE.replace("\"opcua\"", protocol);
        let found = problems(&src);
        assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
        assert_problem(&src, "devices[0].protocol", "protocol =", message);
    }
    let src = BASE.replace("protocol = \"modbus_tcp\"\n", "");
    let found = problems(&src);
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_problem(
        &src,
        "devices[0].protocol",
        "[[devices]]",
        "missing required key `protocol`: use modbus_tcp, modbus_rtu, modbus_rtu_over_tcp \
             or opcua",
    );
}

#[test]
fn duplicate_device_names_name_the_first() {
    let second = "\n[[devices]]\nname = \"press7\" # again\nprotocol = \"modbus_tcp\"\n\
                      address = \"10.0.0.9:502\"\n  [[devices.tags]]\n  name = \"t\"\n  \
                      address = \"hr:0\"\n";
    let src = format!("{BASE}{second}");
    assert_problem(
        &src,
        "devices[1].name",
        "# again",
        "duplicate device name `press7`: devices[0] on line 8 has it already",
    );
}

#[test]
fn an_enabled_device_needs_tags() {
    let src = BASE.replace(
        "\n  [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n",
        "\n",
    );
    assert_problem(
        &src,
        "devices[0].tags",
        "[[devices]]",
        "at least one [[devices.tags]]",
    );
    config(&src.replace(
        "address = \"127.0.0.1:5020\"",
        "address = \"127.0.0.1:5020\"\nenabled = false",
    ));
}

#[test]
fn tag_rules() {
    let cases = [
        (
            "name = \"t\"\n  address = \"xr:1\"",
            "address",
            "unknown area `xr`: use hr (holding)",
        ),
        (
            "name = \"t\"\n  address = \"hr\"",
            "address",
            "expected `AREA:NUMBER`",
        ),
        (
            "name = \"t\"\n  address = \"hr:70000\"",
            "address",
            "`70000` is not a register number",
        ),
        (
            "name = \"t\"\n  address = \"co:1\"\n  type = \"f32\"",
            "type",
            "a coil (co:) holds a single bit",
        ),
        (
            "name = \"t\"\n  address = \"di:1\"\n  type = \"u16\"",
            "type",
            "a discrete input (di:) holds a single bit",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  type = \"float\"",
            "type",
            "unknown type `float`",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  type = \"u16\"\n  length = 2",
            "length",
            "only for type \"string\"",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  type = \"string\"\n  length = 251",
            "length",
            "between 1 and 250, not 251",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  type = \"string\"\n  length = 0",
            "length",
            "between 1 and 250, not 0",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  order = \"ABDC\"",
            "order",
            "unknown order `ABDC`",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  scale = 0.0",
            "scale",
            "must not be zero",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  scale = nan",
            "scale",
            "finite",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  scale = \"2\"",
            "scale",
            "expected a number",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  offset = inf",
            "offset",
            "finite",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  deadband = -0.5",
            "deadband",
            "must not be negative",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  scan_interval = \"0s\"",
            "scan_interval",
            "must not be zero",
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  scan_interval = 250",
            "scan_interval",
            BARE_DURATION,
        ),
        (
            "name = \"t\"\n  address = \"hr:1\"\n  units = \"m\"",
            "units",
            "did you mean `unit`?",
        ),
        (
            "name = \"a/b\"\n  address = \"hr:1\"",
            "name",
            "'/' is not allowed",
        ),
        (
            "name = \"a#\"\n  address = \"hr:1\"",
            "name",
            "'#' is not allowed",
        ),
        (
            "name = \"a+b\"\n  address = \"hr:1\"",
            "name",
            "'+' is not allowed",
        ),
        (
            "name = \"a\\u0000\"\n  address = \"hr:1\"",
            "name",
            "'\\0' is not allowed",
        ),
        (
            "name = \" lead\"\n  address = \"hr:1\"",
            "name",
            "start or end with a space",
        ),
        (
            "name = \"\"\n  address = \"hr:1\"",
            "name",
            "1 to 128 characters long, not 0",
        ),
    ];
    for (lines, key, fragment) in cases {
        let src = with_tag(&format!("  {lines}"));
        let needle = lines
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or(lines);
        assert_problem(
            &src,
            &format!("devices[0].tags[1].{key}"),
            needle.trim(),
            fragment,
        );
    }
    let long = "t".repeat(129);
    let src = with_tag(&format!("  name = \"{long}\"\n  address = \"hr:1\""));
    assert_problem(&src, "devices[0].tags[1].name", &long, "not 129");
    config(&with_tag(&format!(
        "  name = \"{}\"\n  address = \"hr:1\"",
        "t".repeat(128)
    )));
    config(&with_tag(
        "  name = \"Motor 1 speed (rpm) °\"\n  address = \"hr:1\"\n  type = \"bool\"",
    ));
}

#[test]
fn a_string_tag_needs_a_length() {
    let src = with_tag("  name = \"recipe\"\n  address = \"hr:10\"\n  type = \"string\"");
    let header = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("[[devices.tags]]"))
        .last()
        .map(|(i, _)| i + 1);
    let found = problems(&src);
    assert_eq!(
        found,
        [Problem {
            line: header,
            field: "devices[0].tags[1].length".to_owned(),
            message: "type \"string\" needs `length`, its size in bytes (1 to 250)".to_owned(),
        }]
    );
}

#[test]
fn a_tag_must_end_by_register_65535() {
    let src = with_tag("  name = \"t\"\n  address = \"hr:65535\"\n  type = \"f32\"");
    assert_problem(
        &src,
        "devices[0].tags[1].address",
        "hr:65535",
        "`hr:65535` with type \"f32\" needs 2 registers and extends past register 65535",
    );
    config(&with_tag(
        "  name = \"t\"\n  address = \"hr:65534\"\n  type = \"f32\"",
    ));
    config(&with_tag("  name = \"t\"\n  address = \"co:65535\""));
}

#[test]
fn a_tag_must_fit_in_one_read() {
    let src = with_device("max_registers_per_read = 2");
    let wide = format!(
        "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"f64\"\n"
    );
    assert_problem(
        &wide,
        "devices[0].tags[1].type",
        "f64",
        "type \"f64\" needs 4 registers, more than the device's max_registers_per_read (2)",
    );
    let text = format!(
            "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"string\"\n  length = 5\n"
        );
    assert_problem(
        &text,
        "devices[0].tags[1].length",
        "length = 5",
        "needs 3 registers",
    );
    config(&format!(
        "{src}\n  [[devices.tags]]\n  name = \"t\"\n  address = \"hr:4\"\n  type = \"i32\"\n"
    ));
}

#[test]
fn overlapping_tags_name_the_first() {
    let src = r#"[gateway]
id = "g"
[mqtt]
url = "mqtt://h"
[[devices]]
name = "d"
protocol = "modbus_tcp"
address = "h:502"
  [[devices.tags]]
  name = "a"
  address = "hr:1"
  type = "f32"
  [[devices.tags]]
  name = "other_area"
  address = "ir:1"
  [[devices.tags]]
  name = "b"
  address = "hr:2"
  [[devices.tags]]
  name = "c"
  address = "hr:0"
  type = "u64"
  [[devices.tags]]
  name = "s"
  address = "hr:20"
  type = "string"
  length = 20
  [[devices.tags]]
  name = "inside_s"
  address = "hr:29"
"#;
    let found = problems(src);
    let summary: Vec<(Option<usize>, &str, &str)> = found
        .iter()
        .map(|p| (p.line, p.field.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Some(18),
                "devices[0].tags[2].address",
                "overlaps tag `a` (hr:1..hr:2)"
            ),
            (
                Some(21),
                "devices[0].tags[3].address",
                "overlaps tag `a` (hr:1..hr:2)"
            ),
            (
                Some(30),
                "devices[0].tags[5].address",
                "overlaps tag `s` (hr:20..hr:29)"
            ),
        ]
    );
    let adjacent = src
        .replace("hr:2\"", "hr:3\"")
        .replace("hr:0\"\n  type = \"u64\"", "hr:40\"\n  type = \"u64\"")
        .replace("hr:29", "hr:30");
    config(&adjacent);
}

#[test]
fn duplicate_tag_names_name_the_first() {
    let src = with_tag("  name = \"counter\" # again\n  address = \"hr:5\"");
    assert_problem(
        &src,
        "devices[0].tags[1].name",
        "# again",
        "duplicate tag name `counter`: the tag on line 13 has it already",
    );
    // Names are unique per device, not across devices.
    let second =
        "\n[[devices]]\nname = \"other\"\nprotocol = \"modbus_tcp\"\naddress = \"h:502\"\n  \
                      [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n";
    config(&format!("{BASE}{second}"));
}

#[test]
fn every_bad_value_in_one_unit_is_reported() {
    let src = with_mqtt("keepalive = \"1s\"\nmax_inflight = \"x\"\nack_timeout = 5\nqos = 1");
    let fields: Vec<String> = problems(&src).into_iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "mqtt.keepalive",
            "mqtt.max_inflight",
            "mqtt.ack_timeout",
            "mqtt.qos"
        ]
    );
    // A required key of the wrong type is reported once, not also as missing.
    let found = problems(&BASE.replace("id = \"edge-01\"", "id = 7"));
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert!(found[0]
        .message
        .contains("invalid type: integer `7`, expected a string"));
}

#[test]
fn sizes_parse() {
    let table = [
        ("1000", 1000),
        ("0", 0),
        ("10B", 10),
        ("64KiB", 64 * 1024),
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("100MB", 100_000_000),
        ("5KB", 5_000),
        ("2GB", 2_000_000_000),
        (" 1 GiB ", 1 << 30),
        ("1mib", 1 << 20),
    ];
    for (text, bytes) in table {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for text in [
        "",
        "MiB",
        "1.5GiB",
        "-1",
        "1TiB",
        "1 2",
        "99999999999999999999",
        "20000000000GiB",
    ] {
        assert!(parse_size(text).is_err(), "{text} must be refused");
    }
    assert_eq!(fmt_size(1 << 30), "1GiB");
    assert_eq!(fmt_size(100_000_000), "100MB");
    assert_eq!(fmt_size(1001), "1001B");
}

#[test]
fn durations_parse() {
    let table = [
        ("250ms", Duration::from_millis(250)),
        ("1s", Duration::from_secs(1)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
        ("500us", Duration::from_micros(500)),
        ("1.5s", Duration::from_millis(1500)),
        ("0.25ms", Duration::from_micros(250)),
        ("0s", Duration::ZERO),
        (" 30 s ", Duration::from_secs(30)),
        ("168h", MAX_DURATION),
    ];
    for (text, duration) in table {
        assert_eq!(parse_duration(text), Ok(duration), "{text}");
    }
    let refused = [
        ("", "is not a duration"),
        ("s", "is not a duration"),
        ("1.s", "is not a duration"),
        (".5s", "is not a duration"),
        ("1.2.3s", "is not a duration"),
        ("-1s", "is not a duration"),
        ("5", "has no unit"),
        ("5d", "unknown unit `d`"),
        ("5 sec", "unknown unit `sec`"),
        ("169h", "too long"),
        ("99999999999999999999999999999999999h", "too long"),
    ];
    for (text, fragment) in refused {
        match parse_duration(text) {
            Ok(d) => panic!("{text} parsed as {d:?}"),
            Err(e) => assert!(e.to_string().contains(fragment), "{text}: {e}"),
        }
    }
    assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(fmt_duration(Duration::from_secs(120)), "2m");
    assert_eq!(fmt_duration(Duration::from_nanos(5)), "5ns");
}

#[test]
fn load_resolves_relative_paths_against_the_config_directory() {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    };
    let secret = dir.path().join("mqtt.password");
    let file = dir.path().join("gateway.toml");
    let src = with_mqtt("username = \"gw\"\npassword_file = \"mqtt.password\"");
    let writes = [
        std::fs::write(&secret, "hunter2"),
        std::fs::write(&file, src),
    ];
    assert!(writes.iter().all(Result::is_ok), "{writes:?}");
    let config = match load(&file) {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    };
    assert_eq!(config.gateway.data_dir, dir.path().join("data"));
    assert_eq!(config.mqtt.password_file, Some(secret));
    assert!(
        !format!("{config:?}").contains("hunter2"),
        "the secret is not stored"
    );
}

#[test]
fn load_reports_an_unreadable_password_file_with_its_line() {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    };
    let file = dir.path().join("gateway.toml");
    let src = with_mqtt("password_file = \"missing.password\"");
    assert!(std::fs::write(&file, &src).is_ok());
    let errors = match load(&file) {
        Ok(_) => panic!("a missing password file is a problem"),
        Err(errors) => errors,
    };
    assert_eq!(errors.problems.len(), 1, "{errors}");
    let problem = &errors.problems[0];
    assert_eq!(problem.field, "mqtt.password_file");
    assert_eq!(problem.line, Some(line_containing(&src, "password_file")));
    assert!(problem.message.contains("cannot read"), "{problem}");
    // `parse` touches no file, so the same text passes there.
    config(&src);
}

#[test]
fn load_reports_a_missing_file_as_one_problem() {
    let errors = match load(Path::new("/nonexistent/gateway.toml")) {
        Ok(_) => panic!("no such file"),
        Err(errors) => errors,
    };
    assert_eq!(errors.file, "/nonexistent/gateway.toml");
    assert_eq!(errors.problems.len(), 1);
    assert!(errors.problems[0]
        .message
        .starts_with("cannot read the file"));
}

// ---- OPC UA devices ------------------------------------------------------------------

/// A small valid file with one OPC UA device that the OPC UA rule tests edit.
const OPCUA_BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
"#;

/// The issue's OPC UA example, every key set.
const OPCUA_FULL: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
username = "operator"
password_file = "/path"
pki_dir = "./pki"
trust_server_cert = true
publishing_interval = "250ms"
mode = "poll"
scan_interval = "2s"
timeout = "3s"
backoff_min = "100ms"
backoff_max = "10s"
enabled = true

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;s=Oven.Temp"
  sampling_interval = "100ms"
  deadband = 0.1
  queue_size = 20

  [[devices.tags]]
  name = "door"
  browse_path = "Objects/Oven/2:Door"
"#;

fn with_opcua_device(lines: &str) -> String {
    let endpoint = "endpoint = \"opc.tcp://127.0.0.1:4840\"\n";
    OPCUA_BASE.replace(endpoint, &format!("{endpoint}{lines}\n"))
}

fn with_opcua_tag(lines: &str) -> String {
    format!("{OPCUA_BASE}\n  [[devices.tags]]\n{lines}\n")
}

fn node_id(text: &str) -> NodeRef {
    match parse_node_id(text) {
        Ok(id) => NodeRef::Id(id),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn an_opcua_device_with_every_key_parses_into_its_settings() {
    let config = config(OPCUA_FULL);
    let [device] = &config.devices[..] else {
        panic!("expected one device, got {:?}", config.devices);
    };
    assert_eq!(&*device.name, "oven2");
    assert_eq!(device.scan_interval, Duration::from_secs(2));
    assert_eq!(device.tag_count(), 2);
    let expected = OpcUaSettings {
        endpoint: "opc.tcp://127.0.0.1:4840".to_owned(),
        security_policy: SecurityPolicy::Basic256Sha256,
        security_mode: SecurityMode::SignAndEncrypt,
        identity: Identity::UserName {
            user: "operator".to_owned(),
            password_file: PathBuf::from("/path"),
        },
        pki_dir: PathBuf::from("./pki"),
        trust_server_cert: true,
        publishing_interval: Duration::from_millis(250),
        mode: Mode::Poll,
        scan_interval: Duration::from_secs(2),
        timeout: Duration::from_secs(3),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
        tags: vec![
            OpcUaTag {
                name: "temperature".into(),
                node: node_id("ns=2;s=Oven.Temp"),
                sampling_interval: Duration::from_millis(100),
                deadband: Some(0.1),
                queue_size: 20,
            },
            OpcUaTag {
                name: "door".into(),
                node: NodeRef::BrowsePath(vec!["Oven".to_owned(), "2:Door".to_owned()]),
                sampling_interval: Duration::from_millis(250),
                deadband: None,
                queue_size: 10,
            },
        ],
    };
    assert_eq!(opcua(device), &expected);
}

#[test]
fn an_opcua_device_takes_the_runtime_defaults_and_keeps_its_pki_in_the_data_dir() {
    let config = config(OPCUA_BASE);
    let device = &config.devices[0];
    assert_eq!(device.scan_interval, Duration::from_secs(1));
    let mut expected = OpcUaSettings::new(
        "opc.tcp://127.0.0.1:4840",
        vec![OpcUaTag {
            name: "temperature".into(),
            node: node_id("ns=2;s=Oven.Temp"),
            sampling_interval: Duration::from_millis(500),
            deadband: None,
            queue_size: 10,
        }],
    );
    expected.pki_dir = PathBuf::from("./data/pki");
    assert_eq!(opcua(device), &expected);
    let settings = opcua(device);
    assert_eq!(
        (settings.security_policy, settings.security_mode),
        (SecurityPolicy::None, SecurityMode::None)
    );
    assert_eq!(settings.identity, Identity::Anonymous);
    assert!(!settings.trust_server_cert);
    assert_eq!(settings.mode, Mode::Subscribe);
    assert_eq!(settings.timeout, Duration::from_secs(5));

    let src = with_opcua_device("publishing_interval = \"2s\"").replace(
        "id = \"edge-01\"\n",
        "id = \"edge-01\"\ndata_dir = \"/var/lib/gw\"\n",
    );
    let config = self::config(&src);
    let settings = opcua(&config.devices[0]);
    assert_eq!(settings.pki_dir, PathBuf::from("/var/lib/gw/pki"));
    assert_eq!(
        settings.tags[0].sampling_interval,
        Duration::from_secs(2),
        "a tag samples at the publishing interval unless it sets its own"
    );
}

#[test]
fn every_bad_opcua_field_is_reported_at_its_line_at_once() {
    let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "oven2"
protocol = "opcua"
endpoint = "http://127.0.0.1:4840"
security_mode = "Sign"
username = "operator"
publishing_intervall = "1s"
address = "127.0.0.1:4840"

  [[devices.tags]]
  name = "temperature"
  node_id = "ns=2;x=Oven.Temp"

  [[devices.tags]]
  name = "pressure"
  node_id = "ns=2;s=Oven.Pressure"
  browse_path = "Objects/Oven/Pressure"

  [[devices.tags]]
  name = "level"
  type = "f32"

  [[devices.tags]]
  name = "speed"
  node_id = "ns=2;s=Oven.Speed"
  queue_size = 0
  deadband = -1.0

  [[devices.tags]]
  name = "speed_again"
  node_id = "ns=2;s=Oven.Speed"
"#;
    let found = problems(src);
    let summary: Vec<(Option<usize>, &str)> =
        found.iter().map(|p| (p.line, p.field.as_str())).collect();
    assert_eq!(
        summary,
        [
            (Some(10), "devices[0].endpoint"),
            (Some(11), "devices[0].security_mode"),
            (Some(12), "devices[0].username"),
            (Some(13), "devices[0].publishing_intervall"),
            (Some(14), "devices[0].address"),
            (Some(18), "devices[0].tags[0].node_id"),
            (Some(23), "devices[0].tags[1].browse_path"),
            (Some(25), "devices[0].tags[2].node_id"),
            (Some(27), "devices[0].tags[2].type"),
            (Some(32), "devices[0].tags[3].queue_size"),
            (Some(33), "devices[0].tags[3].deadband"),
            (Some(37), "devices[0].tags[4].node_id"),
        ],
        "got:\n{}",
        listing(&found)
    );
    let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "endpoint \"http://127.0.0.1:4840\" must start with \"opc.tcp://\"",
            "security_mode \"Sign\" needs a security_policy other than \"None\"",
            "`username` needs `password_file`, the file holding the password",
            "unknown key `publishing_intervall`; did you mean `publishing_interval`?",
            "unknown key `address` for protocol `opcua` (it belongs to protocols `modbus_tcp` \
                 and `modbus_rtu_over_tcp`); expected one of: name, protocol, endpoint, \
                 security_policy, security_mode, username, password_file, user_cert_file, \
                 user_key_file, pki_dir, trust_server_cert, publishing_interval, mode, \
                 scan_interval, timeout, backoff_min, backoff_max, enabled, tags",
            "invalid node id \"ns=2;x=Oven.Temp\"; expected ns=<index>;<i|s|g|b>=<value>, \
                 e.g. \"ns=2;s=Oven.Temp\" or \"i=2258\"",
            "set either `node_id` or `browse_path`, not both",
            "a tag needs `node_id` (e.g. \"ns=2;s=Oven.Temp\") or `browse_path` \
                 (e.g. \"Objects/Oven/Temp\")",
            "unknown key `type` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
                 `modbus_rtu` and `modbus_rtu_over_tcp`); expected one of: name, node_id, \
                 browse_path, sampling_interval, deadband, queue_size",
            "must be between 1 and 10000, not 0",
            "must not be negative",
            "duplicate node `ns=2;s=Oven.Speed`: tag `speed` on line 31 reads it already",
        ]
    );
    let rendered = match parse(src, "gateway.toml") {
        Ok(_) => panic!("expected problems"),
        Err(errors) => errors.to_string(),
    };
    assert!(rendered.starts_with(
        "gateway.toml:10: devices[0].endpoint: endpoint \"http://127.0.0.1:4840\" must \
             start with \"opc.tcp://\"\ngateway.toml:11: devices[0].security_mode: "
    ));
}

#[test]
fn opcua_device_rules() {
    for (endpoint, fragment) in [
        ("opc.tcp://:4840", "has no host"),
        ("opc.tcp://plc:0", "has an invalid port \"0\""),
        ("opc.tcp://plc:port", "has an invalid port \"port\""),
        ("127.0.0.1:4840", "must start with \"opc.tcp://\""),
    ] {
        let src = OPCUA_BASE.replace("opc.tcp://127.0.0.1:4840", endpoint);
        assert_problem(&src, "devices[0].endpoint", "endpoint =", fragment);
    }
    let cases = [
        (
            "security_policy = \"Basic128Rsa15\"",
            "security_policy",
            "unknown security policy \"Basic128Rsa15\"; expected one of \"None\", \
                 \"Basic256Sha256\", \"Aes128_Sha256_RsaOaep\", \"Aes256_Sha256_RsaPss\"",
        ),
        (
            "security_mode = \"Encrypt\"",
            "security_mode",
            "unknown security mode \"Encrypt\"; expected one of \"None\", \"Sign\", \
                 \"SignAndEncrypt\"",
        ),
        (
            "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"None\"",
            "security_mode",
            "security_policy \"Basic256Sha256\" needs security_mode \"Sign\" or \
                 \"SignAndEncrypt\"",
        ),
        (
            "mode = \"push\"",
            "mode",
            "unknown value `push`, expected `subscribe` or `poll`",
        ),
        (
            "publishing_interval = \"0ms\"",
            "publishing_interval",
            "must not be zero",
        ),
        (
            "publishing_interval = 500",
            "publishing_interval",
            BARE_DURATION,
        ),
        (
            "scan_interval = \"0s\"",
            "scan_interval",
            "must not be zero (at least 1ms)",
        ),
        ("timeout = \"0s\"", "timeout", "must not be zero"),
        (
            "backoff_min = \"10s\"\nbackoff_max = \"1s\"",
            "backoff_max",
            "at least backoff_min (10s), not 1s",
        ),
        (
            "trust_server_cert = \"yes\"",
            "trust_server_cert",
            "expected a boolean",
        ),
        ("pki_dir = \"\"", "pki_dir", "must not be empty"),
        (
            "endpiont = \"x\"",
            "endpiont",
            "unknown key `endpiont`; did you mean `endpoint`?",
        ),
    ];
    for (lines, key, fragment) in cases {
        let src = with_opcua_device(lines);
        let needle = lines.lines().find(|l| l.starts_with(key)).unwrap_or(lines);
        assert_problem(&src, &format!("devices[0].{key}"), needle, fragment);
    }
    assert_problem(
        &OPCUA_BASE.replace("endpoint = \"opc.tcp://127.0.0.1:4840\"\n", ""),
        "devices[0].endpoint",
        "[[devices]]",
        "missing required key `endpoint`",
    );
    // The policy's own problem is reported, not also a pairing with the default mode.
    let found = problems(&with_opcua_device("security_policy = \"Basic128\""));
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    for (policy, mode) in [
        ("None", "None"),
        ("Basic256Sha256", "Sign"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        ("Aes256_Sha256_RsaPss", "Sign"),
    ] {
        let config = config(&with_opcua_device(&format!(
            "security_policy = \"{policy}\"\nsecurity_mode = \"{mode}\""
        )));
        let settings = opcua(&config.devices[0]);
        assert_eq!(
            (
                settings.security_policy.name(),
                settings.security_mode.name()
            ),
            (policy, mode)
        );
    }
    config(&OPCUA_BASE.replace("127.0.0.1:4840", "plc-7.plant.local:4840/UA/Server"));
}

#[test]
fn an_opcua_user_identity_is_a_name_with_a_password_file_or_a_certificate_with_a_key() {
    let cases = [
        (
            "username = \"operator\"",
            "username",
            "`username` needs `password_file`",
        ),
        (
            "password_file = \"/run/pw\"",
            "password_file",
            "`password_file` needs `username`",
        ),
        (
            "user_cert_file = \"/etc/gw/user.der\"",
            "user_cert_file",
            "`user_cert_file` needs `user_key_file`",
        ),
        (
            "user_key_file = \"/etc/gw/user.pem\"",
            "user_key_file",
            "`user_key_file` needs `user_cert_file`",
        ),
        (
            "username = \"\"\npassword_file = \"/run/pw\"",
            "username",
            "must not be empty",
        ),
        (
            "password = \"secret\"",
            "password",
            "did you mean `password_file`?",
        ),
    ];
    for (lines, key, fragment) in cases {
        let src = with_opcua_device(lines);
        let needle = lines.lines().find(|l| l.starts_with(key)).unwrap_or(lines);
        assert_problem(&src, &format!("devices[0].{key}"), needle, fragment);
    }
    let both = with_opcua_device(
        "username = \"operator\"\npassword_file = \"/run/pw\"\n\
             user_cert_file = \"/etc/gw/user.der\"\nuser_key_file = \"/etc/gw/user.pem\"",
    );
    let found = problems(&both);
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_problem(
        &both,
        "devices[0].user_cert_file",
        "user_cert_file",
        "a device has one user identity: `username` with `password_file`, or \
             `user_cert_file` with `user_key_file`, not both",
    );
    // A partner with a bad value is reported for its value, not as missing.
    let found = problems(&with_opcua_device(
        "username = \"operator\"\npassword_file = 7",
    ));
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_eq!(found[0].field, "devices[0].password_file");

    let config = config(&with_opcua_device(
        "user_cert_file = \"/etc/gw/user.der\"\nuser_key_file = \"/etc/gw/user.pem\"",
    ));
    assert_eq!(
        opcua(&config.devices[0]).identity,
        Identity::X509 {
            cert_file: PathBuf::from("/etc/gw/user.der"),
            key_file: PathBuf::from("/etc/gw/user.pem"),
        }
    );
}

#[test]
fn opcua_tag_rules() {
    let cases = [
        (
            "name = \"t\"\n  node_id = \"i=abc\"",
            "node_id",
            "invalid node id \"i=abc\"",
        ),
        (
            "name = \"t\"\n  node_id = \"\"",
            "node_id",
            "invalid node id \"\"",
        ),
        (
            "name = \"t\"\n  browse_path = \"Objects//Temp\"",
            "browse_path",
            "invalid browse path \"Objects//Temp\"",
        ),
        (
            "name = \"t\"\n  browse_path = \"Objects\"",
            "browse_path",
            "invalid browse path",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  queue_size = 10001",
            "queue_size",
            "between 1 and 10000, not 10001",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  deadband = nan",
            "deadband",
            "must be a finite number",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  deadband = inf",
            "deadband",
            "must be a finite number",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  sampling_interval = \"fast\"",
            "sampling_interval",
            "`fast` is not a duration",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  address = \"hr:1\"",
            "address",
            "unknown key `address` for protocol `opcua` (it belongs to protocols \
                 `modbus_tcp`, `modbus_rtu` and `modbus_rtu_over_tcp`)",
        ),
        (
            "name = \"t\"\n  node_id = \"i=1\"\n  nodeid = \"i=2\"",
            "nodeid",
            "did you mean `node_id`?",
        ),
        (
            "name = \"a/b\"\n  node_id = \"i=1\"",
            "name",
            "'/' is not allowed",
        ),
        (
            "name = \"temperature\" # again\n  node_id = \"i=1\"",
            "name",
            "duplicate tag name `temperature`: the tag on line 13 has it already",
        ),
    ];
    for (lines, key, fragment) in cases {
        let src = with_opcua_tag(&format!("  {lines}"));
        let needle = lines
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(key))
            .unwrap_or(lines);
        assert_problem(&src, &format!("devices[0].tags[1].{key}"), needle, fragment);
    }
    assert_problem(
        &OPCUA_BASE.replace("  node_id = \"ns=2;s=Oven.Temp\"\n", ""),
        "devices[0].tags[0].node_id",
        "[[devices.tags]]",
        "a tag needs `node_id`",
    );
    let src = OPCUA_BASE.replace(
        "\n  [[devices.tags]]\n  name = \"temperature\"\n  node_id = \"ns=2;s=Oven.Temp\"\n",
        "\n",
    );
    assert_problem(
        &src,
        "devices[0].tags",
        "[[devices]]",
        "at least one [[devices.tags]]",
    );
    config(&src.replace(
        "protocol = \"opcua\"",
        "protocol = \"opcua\"\nenabled = false",
    ));

    // Zero sampling asks for the server's fastest rate; any finite deadband >= 0 is fine.
    let config = config(&with_opcua_tag(
        "  name = \"t\"\n  node_id = \"i=2258\"\n  sampling_interval = \"0ms\"\n  \
             deadband = 0.0\n  queue_size = 10000",
    ));
    let tag = &opcua(&config.devices[0]).tags[1];
    assert_eq!(tag.sampling_interval, Duration::ZERO);
    assert_eq!((tag.deadband, tag.queue_size), (Some(0.0), 10_000));
}

#[test]
fn the_same_opcua_node_twice_in_a_device_is_refused_whatever_its_spelling() {
    for (first, second) in [
        ("node_id = \"i=2258\"", "node_id = \"ns=0;i=2258\""),
        (
            "browse_path = \"Objects/Oven/Temp\"",
            "browse_path = \"Oven/Temp\"",
        ),
    ] {
        let src = with_opcua_tag(&format!("  name = \"a\"\n  {first}"));
        let src = format!("{src}\n  [[devices.tags]]\n  name = \"b\"\n  {second}\n");
        let key = second.split(' ').next().unwrap_or(second);
        assert_problem(
            &src,
            &format!("devices[0].tags[2].{key}"),
            second,
            "reads it already",
        );
    }
    // A node id and a browse path are different references, even to the same node; and
    // different devices may read the same node.
    config(&with_opcua_tag(
        "  name = \"a\"\n  browse_path = \"Objects/Oven/Temp\"",
    ));
    let second = OPCUA_BASE
        .split_once("[[devices]]")
        .map(|(_, device)| device.replace("oven2", "oven3"))
        .unwrap_or_default();
    config(&format!("{OPCUA_BASE}\n[[devices]]{second}"));
}

#[test]
fn a_poll_mode_device_accepts_the_subscription_keys_of_its_tags() {
    let src = with_opcua_device("mode = \"poll\"\nscan_interval = \"250ms\"");
    let src = format!(
        "{src}\n  [[devices.tags]]\n  name = \"p\"\n  node_id = \"i=1\"\n  \
             sampling_interval = \"1s\"\n  deadband = 0.5\n  queue_size = 1\n"
    );
    let config = config(&src);
    let settings = opcua(&config.devices[0]);
    assert_eq!(settings.mode, Mode::Poll);
    assert_eq!(settings.scan_interval, Duration::from_millis(250));
}

#[test]
fn each_protocols_keys_are_unknown_to_the_other() {
    assert_problem(
        &with_device("endpoint = \"opc.tcp://h:4840\""),
        "devices[0].endpoint",
        "endpoint",
        "unknown key `endpoint` for protocol `modbus_tcp` (it belongs to protocol `opcua`)",
    );
    assert_problem(
        &with_tag("  name = \"t\"\n  address = \"hr:1\"\n  node_id = \"i=1\""),
        "devices[0].tags[1].node_id",
        "node_id",
        "unknown key `node_id` for protocol `modbus_tcp` (it belongs to protocol `opcua`)",
    );
    assert_problem(
        &with_opcua_device("unit_id = 1"),
        "devices[0].unit_id",
        "unit_id",
        "unknown key `unit_id` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
             `modbus_rtu` and `modbus_rtu_over_tcp`)",
    );
    // Keys both have are known to both.
    config(&with_opcua_device(
        "scan_interval = \"1s\"\ntimeout = \"1s\"\nenabled = true",
    ));
}

#[test]
fn modbus_and_opcua_devices_live_side_by_side() {
    let opcua_device = OPCUA_BASE
        .split_once("[[devices]]")
        .map(|(_, device)| device.to_owned())
        .unwrap_or_default();
    let config = config(&format!("{BASE}\n[[devices]]{opcua_device}"));
    let kinds: Vec<(&str, usize)> = config
        .devices
        .iter()
        .map(|d| (&*d.name, d.tag_count()))
        .collect();
    assert_eq!(kinds, [("press7", 1), ("oven2", 1)]);
    assert!(matches!(config.devices[1].kind, DeviceKind::OpcUa(_)));
}

#[test]
fn load_resolves_opcua_paths_against_the_config_directory_and_checks_the_files() {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => panic!("tempdir: {e}"),
    };
    let file = dir.path().join("gateway.toml");
    let cert = dir.path().join("user.der");
    let key = dir.path().join("user.pem");
    let src = with_opcua_device(
        "pki_dir = \"certs\"\nuser_cert_file = \"user.der\"\nuser_key_file = \"user.pem\"",
    );
    let writes = [
        std::fs::write(&cert, "cert"),
        std::fs::write(&key, "key"),
        std::fs::write(&file, &src),
    ];
    assert!(writes.iter().all(Result::is_ok), "{writes:?}");
    let loaded = match load(&file) {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    };
    let settings = opcua(&loaded.devices[0]);
    assert_eq!(settings.pki_dir, dir.path().join("certs"));
    assert_eq!(
        settings.identity,
        Identity::X509 {
            cert_file: cert,
            key_file: key.clone(),
        }
    );

    // Without pki_dir, the PKI lives in the resolved data directory.
    let plain = dir.path().join("plain.toml");
    assert!(std::fs::write(&plain, OPCUA_BASE).is_ok());
    match load(&plain) {
        Ok(config) => assert_eq!(
            opcua(&config.devices[0]).pki_dir,
            dir.path().join("data").join("pki")
        ),
        Err(errors) => panic!("{errors}"),
    }

    assert!(std::fs::remove_file(&key).is_ok());
    let errors = match load(&file) {
        Ok(_) => panic!("a missing key file is a problem"),
        Err(errors) => errors,
    };
    assert_eq!(errors.problems.len(), 1, "{errors}");
    let problem = &errors.problems[0];
    assert_eq!(problem.field, "devices[0].user_key_file");
    assert_eq!(problem.line, Some(line_containing(&src, "user_key_file")));
    assert!(problem.message.contains("cannot read"), "{problem}");
    // `parse` touches no file.
    config(&src);

    let secret = dir.path().join("oven.password");
    let with_user = with_opcua_device("username = \"op\"\npassword_file = \"oven.password\"");
    assert!(std::fs::write(&file, &with_user).is_ok());
    assert!(load(&file).is_err(), "the password file does not exist yet");
    assert!(std::fs::write(&secret, "hunter2").is_ok());
    match load(&file) {
        Ok(config) => assert_eq!(
            opcua(&config.devices[0]).identity,
            Identity::UserName {
                user: "op".to_owned(),
                password_file: secret,
            }
        ),
        Err(errors) => panic!("{errors}"),
    }
}

// ---- Modbus RTU and multi-unit lines ---------------------------------------------------

/// The issue's RTU line, with a second unit.
const RTU: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"             # or "modbus_rtu_over_tcp" with address = "host:port"
port = "/dev/ttyUSB0"
baud_rate = 19200
parity = "even"                     # none, even, odd
data_bits = 8
stop_bits = 1
timeout = "300ms"
inter_request_delay = "0ms"         # some devices need a pause between transactions
scan_interval = "1s"

  [[devices.units]]                 # several unit ids share the line
  unit_id = 3
  name = "meter3"
    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"

  [[devices.units]]
  unit_id = 4
  name = "meter4"
    [[devices.units.tags]]
    name = "active_power"
    address = "ir:12"
    type = "f32"
    order = "CDAB"
    [[devices.units.tags]]
    name = "energy"
    address = "ir:20"
    type = "u32"
    scan_interval = "10s"
"#;

/// A small valid RTU device in the one-unit form, for the rule tests to edit.
const RTU_BASE: &str = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"

  [[devices.tags]]
  name = "active_power"
  address = "ir:12"
"#;

fn with_rtu_device(lines: &str) -> String {
    let port = "port = \"/dev/ttyUSB0\"\n";
    RTU_BASE.replace(port, &format!("{port}{lines}\n"))
}

/// A Modbus tag with the defaults but for its address, type, order and scan interval.
fn tag_spec(
    name: &str,
    address: &str,
    data_type: DataType,
    order: WordOrder,
    scan_interval: Duration,
) -> TagSpec {
    TagSpec {
        name: name.into(),
        address: match address.parse() {
            Ok(address) => address,
            Err(e) => panic!("{address}: {e}"),
        },
        data_type,
        order,
        length: 0,
        scale: 1.0,
        offset: 0.0,
        deadband: 0.0,
        scan_interval,
    }
}

fn unit_summary(settings: &ModbusSettings) -> Vec<(Option<&str>, u8, Vec<&str>)> {
    settings
        .units
        .iter()
        .map(|u| {
            let tags = u.tags.iter().map(|t| &*t.name).collect();
            (u.name.as_deref(), u.unit_id, tags)
        })
        .collect()
}

#[test]
fn an_rtu_line_in_the_issues_shape_loads_into_its_settings() {
    let config = config(RTU);
    let [device] = &config.devices[..] else {
        panic!("expected one device, got {:?}", config.devices);
    };
    assert_eq!(&*device.name, "meters");
    assert_eq!(device.scan_interval, Duration::from_secs(1));
    assert_eq!(device.tag_count(), 3);
    let second = Duration::from_secs(1);
    let power = tag_spec(
        "active_power",
        "ir:12",
        DataType::F32,
        WordOrder::CDAB,
        second,
    );
    let expected = ModbusSettings {
        link: Link::Rtu(SerialSettings {
            port: "/dev/ttyUSB0".to_owned(),
            baud_rate: 19_200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        }),
        timeout: Duration::from_millis(300),
        inter_request_delay: Duration::ZERO,
        max_registers_per_read: 125,
        max_gap: 16,
        report: Report::EveryScan,
        max_silence: Duration::from_secs(60),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
        units: vec![
            UnitSettings {
                name: Some("meter3".into()),
                unit_id: 3,
                tags: vec![power.clone()],
            },
            UnitSettings {
                name: Some("meter4".into()),
                unit_id: 4,
                tags: vec![
                    power,
                    tag_spec(
                        "energy",
                        "ir:20",
                        DataType::U32,
                        WordOrder::ABCD,
                        Duration::from_secs(10),
                    ),
                ],
            },
        ],
    };
    assert_eq!(modbus(device), &expected);
    assert!(modbus(device).link.is_rtu());
}

#[test]
fn an_rtu_device_takes_the_serial_defaults_and_other_serial_settings() {
    let settings = modbus(&config(RTU_BASE).devices[0]).clone();
    assert_eq!(
        settings.link,
        Link::Rtu(SerialSettings {
            port: "/dev/ttyUSB0".to_owned(),
            baud_rate: 19_200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        })
    );
    assert_eq!(settings.inter_request_delay, Duration::ZERO);
    assert_eq!(settings.timeout, Duration::from_secs(1));
    assert_eq!(unit_summary(&settings), [(None, 1, vec!["active_power"])]);

    for (lines, baud_rate, parity, stop_bits) in [
        (
            "baud_rate = 9600\nparity = \"none\"\nstop_bits = 2",
            9600,
            Parity::None,
            2,
        ),
        ("baud_rate = 50\nparity = \"odd\"", 50, Parity::Odd, 1),
        ("baud_rate = 4000000", 4_000_000, Parity::Even, 1),
        ("parity = \"ODD\"", 19_200, Parity::Odd, 1),
    ] {
        let config = config(&with_rtu_device(lines));
        let Link::Rtu(serial) = &modbus(&config.devices[0]).link else {
            panic!("expected a serial link");
        };
        assert_eq!(
            (serial.baud_rate, serial.parity, serial.stop_bits),
            (baud_rate, parity, stop_bits),
            "{lines}"
        );
    }
    let config = config(&RTU_BASE.replace(
        "/dev/ttyUSB0",
        "/dev/serial/by-id/usb-FTDI_RS485-if00-port0",
    ));
    assert_eq!(
        modbus(&config.devices[0]).link.target(),
        "/dev/serial/by-id/usb-FTDI_RS485-if00-port0"
    );
    let config = self::config(&with_rtu_device("inter_request_delay = \"10s\""));
    assert_eq!(
        modbus(&config.devices[0]).inter_request_delay,
        Duration::from_secs(10)
    );
}

#[test]
fn an_rtu_over_tcp_converter_with_units_loads() {
    let serial = ["port", "baud_rate", "parity", "data_bits", "stop_bits"];
    let src: String = RTU
        .lines()
        .filter(|line| !serial.iter().any(|key| line.starts_with(key)))
        .map(|line| {
            if line.starts_with("protocol =") {
                "protocol = \"modbus_rtu_over_tcp\"\naddress = \"10.0.0.7:4001\"\n".to_owned()
            } else {
                format!("{}\n", line.replace("\"0ms\"", "\"20ms\""))
            }
        })
        .collect();
    let config = config(&src);
    let settings = modbus(&config.devices[0]);
    assert_eq!(
        settings.link,
        Link::RtuOverTcp {
            address: "10.0.0.7:4001".to_owned()
        }
    );
    assert!(settings.link.is_rtu());
    assert_eq!(settings.inter_request_delay, Duration::from_millis(20));
    assert_eq!(settings.timeout, Duration::from_millis(300));
    assert_eq!(
        unit_summary(settings),
        [
            (Some("meter3"), 3, vec!["active_power"]),
            (Some("meter4"), 4, vec!["active_power", "energy"]),
        ]
    );
}

#[test]
fn a_modbus_tcp_gateway_with_units_loads() {
    let units = "\n  [[devices.units]]\n  name = \"drive-1\"\n  unit_id = 0\n    \
                     [[devices.units.tags]]\n    name = \"speed\"\n    address = \"hr:0\"\n\
                     \n  [[devices.units]]\n  name = \"drive-2\"\n  unit_id = 255\n    \
                     [[devices.units.tags]]\n    name = \"speed\"\n    address = \"hr:0\"\n    \
                     [[devices.units.tags]]\n    name = \"torque\"\n    address = \"hr:1\"\n    \
                     type = \"i16\"\n";
    let src = BASE.replace(
        "\n  [[devices.tags]]\n  name = \"counter\"\n  address = \"hr:0\"\n",
        units,
    );
    let config = config(&src);
    let device = &config.devices[0];
    let settings = modbus(device);
    assert_eq!(
        settings.link,
        Link::Tcp {
            address: "127.0.0.1:5020".to_owned()
        }
    );
    assert!(!settings.link.is_rtu());
    assert_eq!(
        unit_summary(settings),
        [
            (Some("drive-1"), 0, vec!["speed"]),
            (Some("drive-2"), 255, vec!["speed", "torque"]),
        ],
        "a TCP device takes unit ids 0 to 255"
    );
    assert_eq!(device.tag_count(), 3);
    let torque = &settings.units[1].tags[1];
    assert_eq!(torque.data_type, DataType::I16);
    assert_eq!(torque.scan_interval, Duration::from_secs(1));
}

#[test]
fn the_one_unit_form_works_for_every_modbus_protocol() {
    let link_keys = [
        ("modbus_tcp", "address = \"10.0.0.7:502\""),
        ("modbus_rtu_over_tcp", "address = \"10.0.0.7:4001\""),
        ("modbus_rtu", "port = \"/dev/ttyS1\""),
    ];
    for (protocol, link) in link_keys {
        let src = BASE
            .replace("\"modbus_tcp\"", &format!("\"{protocol}\""))
            .replace("address = \"127.0.0.1:5020\"", link);
        let config = config(&src);
        let unit = only_unit(&config.devices[0]);
        assert_eq!(unit.unit_id, 1, "{protocol}: unit_id defaults to 1");
        assert_eq!(unit.tags.len(), 1);
        assert_eq!(&*unit.tags[0].name, "counter");
        let src = src.replace(link, &format!("{link}\nunit_id = 17"));
        let config = self::config(&src);
        assert_eq!(only_unit(&config.devices[0]).unit_id, 17, "{protocol}");
        let link = &modbus(&config.devices[0]).link;
        let expected = match protocol {
            "modbus_tcp" => matches!(link, Link::Tcp { .. }),
            "modbus_rtu_over_tcp" => matches!(link, Link::RtuOverTcp { .. }),
            _ => matches!(link, Link::Rtu(_)),
        };
        assert!(expected, "{protocol}: {link:?}");
    }
}

#[test]
fn every_unit_and_serial_problem_is_reported_at_its_line_at_once() {
    let src = r#"[gateway]
id = "edge-01"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"
baud_rate = 10
parity = "mark"
data_bits = 7
stop_bits = 3
inter_request_delay = "11s"
address = "10.0.0.7:502"

  [[devices.units]]
  unit_id = 3
  name = "meter3"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"
    type = "f32"
    [[devices.units.tags]]
    name = "b"
    address = "hr:1"

  [[devices.units]]
  unit_id = 3
  name = "meter3"
  colour = "red"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"
    [[devices.units.tags]]
    name = "a"
    address = "hr:1"
    [[devices.units.tags]]
    name = "c"
    address = "xr:2"

  [[devices.units]]
  unit_id = 0
  name = "meter 5"

  [[devices.units]]
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"

  [[devices.units]]
  unit_id = 248
  name = "meter248"
    [[devices.units.tags]]
    name = "a"
    address = "hr:0"

[[devices]]
name = "drives"
protocol = "modbus_tcp"
address = "10.0.0.8:502"
unit_id = 1

  [[devices.units]]
  unit_id = 300
  name = "drive"
    [[devices.units.tags]]
    name = "speed"
    address = "hr:0"

[[devices]]
name = "converter"
protocol = "modbus_rtu_over_tcp"
address = "10.0.0.9:4001"
port = "/dev/ttyS0"
units = []
"#;
    let found = problems(src);
    let summary: Vec<(Option<usize>, &str)> =
        found.iter().map(|p| (p.line, p.field.as_str())).collect();
    assert_eq!(
        summary,
        [
            (Some(11), "devices[0].baud_rate"),
            (Some(12), "devices[0].parity"),
            (Some(13), "devices[0].data_bits"),
            (Some(14), "devices[0].stop_bits"),
            (Some(15), "devices[0].inter_request_delay"),
            (Some(16), "devices[0].address"),
            (Some(27), "devices[0].units[0].tags[1].address"),
            (Some(30), "devices[0].units[1].unit_id"),
            (Some(31), "devices[0].units[1].name"),
            (Some(32), "devices[0].units[1].colour"),
            (Some(37), "devices[0].units[1].tags[1].name"),
            (Some(41), "devices[0].units[1].tags[2].address"),
            (Some(43), "devices[0].units[2].tags"),
            (Some(44), "devices[0].units[2].unit_id"),
            (Some(45), "devices[0].units[2].name"),
            (Some(47), "devices[0].units[3].name"),
            (Some(47), "devices[0].units[3].unit_id"),
            (Some(53), "devices[0].units[4].unit_id"),
            (Some(65), "devices[1].units"),
            (Some(66), "devices[1].units[0].unit_id"),
            (Some(76), "devices[2].port"),
            (Some(77), "devices[2].units"),
        ],
        "got:\n{}",
        listing(&found)
    );
    let message = |field: &str| {
        found
            .iter()
            .filter(|p| p.field == field)
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let expected = [
        (
            "devices[0].baud_rate",
            "must be between 50 and 4000000, not 10",
        ),
        (
            "devices[0].parity",
            "unknown parity `mark`: use none, even or odd",
        ),
        (
            "devices[0].data_bits",
            "must be 8, not 7: Modbus RTU frames carry 8-bit bytes",
        ),
        ("devices[0].stop_bits", "must be 1 or 2, not 3"),
        (
            "devices[0].inter_request_delay",
            "must be between 0s and 10s, not 11s",
        ),
        (
            "devices[0].address",
            "unknown key `address` for protocol `modbus_rtu` (it belongs to protocols \
                 `modbus_tcp` and `modbus_rtu_over_tcp`); expected one of: name, protocol, \
                 port, baud_rate, parity, data_bits, stop_bits, unit_id, inter_request_delay, \
                 scan_interval, timeout, max_registers_per_read, max_gap, report, \
                 max_silence, backoff_min, backoff_max, enabled, units, tags",
        ),
        (
            "devices[0].units[0].tags[1].address",
            "overlaps tag `a` (hr:0..hr:1)",
        ),
        (
            "devices[0].units[1].unit_id",
            "duplicate unit_id 3: the unit on line 19 has it already",
        ),
        (
            "devices[0].units[1].name",
            "duplicate unit name `meter3`: the unit on line 20 has it already",
        ),
        (
            "devices[0].units[1].colour",
            "unknown key `colour`; expected one of: name, unit_id, tags",
        ),
        (
            "devices[0].units[1].tags[1].name",
            "duplicate tag name `a`: the tag on line 34 has it already",
        ),
        (
            "devices[0].units[1].tags[2].address",
            "unknown area `xr`: use hr (holding)",
        ),
        (
            "devices[0].units[2].tags",
            "a unit needs at least one [[devices.units.tags]] entry",
        ),
        (
            "devices[0].units[2].unit_id",
            "must be between 1 and 247, not 0: 0 is the broadcast address, which no unit \
                 answers",
        ),
        ("devices[0].units[2].name", "' ' is not allowed"),
        ("devices[0].units[3].name", "missing required key `name`"),
        (
            "devices[0].units[3].unit_id",
            "missing required key `unit_id`",
        ),
        (
            "devices[0].units[4].unit_id",
            "must be between 1 and 247, not 248: 248 to 255 are reserved on a serial line",
        ),
        (
            "devices[1].units",
            "give either `units` (a [[devices.units]] entry per unit) or `unit_id` and \
                 [[devices.tags]] (one unit), not both: this device also has `unit_id`",
        ),
        (
            "devices[1].units[0].unit_id",
            "must be between 0 and 255, not 300",
        ),
        (
            "devices[2].port",
            "unknown key `port` for protocol `modbus_rtu_over_tcp` (it belongs to \
                 protocol `modbus_rtu`); expected one of:",
        ),
        (
            "devices[2].units",
            "must not be empty: give each unit on the line a [[devices.units]] entry",
        ),
    ];
    for (field, fragment) in expected {
        assert!(
            message(field).contains(fragment),
            "{field}: expected `{fragment}`, got `{}`",
            message(field)
        );
    }
    let rendered = match parse(src, "gateway.toml") {
        Ok(_) => panic!("expected problems"),
        Err(errors) => errors.to_string(),
    };
    assert!(
        rendered
            .contains("\ngateway.toml:41: devices[0].units[1].tags[2].address: unknown area `xr`"),
        "{rendered}"
    );
    assert!(
        rendered.contains("\ngateway.toml:30: devices[0].units[1].unit_id: duplicate"),
        "{rendered}"
    );
}

#[test]
fn two_devices_on_one_serial_port_or_converter_are_refused() {
    let src = format!(
        "{RTU_BASE}\n[[devices]]\nname = \"drives\"\nprotocol = \"modbus_rtu\"\n\
             port = \"/dev/ttyUSB0\" # the same adapter\n\n  [[devices.tags]]\n  \
             name = \"speed\"\n  address = \"hr:1\"\n"
    );
    assert_problem(
        &src,
        "devices[1].port",
        "the same adapter",
        "serial port `/dev/ttyUSB0` is already the line of device `meters` (devices[0])",
    );
    let other_port = src.replace(
        "port = \"/dev/ttyUSB0\" # the same adapter",
        "port = \"/dev/ttyUSB1\"",
    );
    assert!(
        problems(&other_port).is_empty(),
        "{}",
        listing(&problems(&other_port))
    );

    let converter = "[[devices]]\nname = \"NAME\"\nprotocol = \"modbus_rtu_over_tcp\"\n\
                         address = \"10.0.0.9:4001\" # ADDR\n\n  [[devices.tags]]\n  \
                         name = \"x\"\n  address = \"hr:1\"\n";
    let two = format!(
        "{BASE}\n{}\n{}",
        converter.replace("NAME", "a").replace("ADDR", "first"),
        converter.replace("NAME", "b").replace("ADDR", "second")
    );
    assert_problem(
        &two,
        "devices[2].address",
        "# second",
        "RTU-over-TCP converter `10.0.0.9:4001` is already the line of device `a` (devices[1])",
    );
}

#[test]
fn serial_rules() {
    let cases = [
        (
            "baud_rate = 4000001",
            "baud_rate",
            "between 50 and 4000000, not 4000001",
        ),
        (
            "baud_rate = 49",
            "baud_rate",
            "between 50 and 4000000, not 49",
        ),
        ("baud_rate = \"fast\"", "baud_rate", "expected an integer"),
        (
            "parity = \"space\"",
            "parity",
            "unknown parity `space`: use none, even or odd",
        ),
        (
            "parity = 1",
            "parity",
            "invalid type: integer `1`, expected a string",
        ),
        (
            "data_bits = 9",
            "data_bits",
            "must be 8, not 9: Modbus RTU frames carry 8-bit bytes",
        ),
        ("stop_bits = 0", "stop_bits", "must be 1 or 2, not 0"),
        (
            "inter_request_delay = \"1m\"",
            "inter_request_delay",
            "between 0s and 10s, not 1m",
        ),
        (
            "inter_request_delay = 5",
            "inter_request_delay",
            BARE_DURATION,
        ),
        (
            "unit_id = 0",
            "unit_id",
            "must be between 1 and 247, not 0: 0 is the broadcast address",
        ),
        (
            "unit_id = 255",
            "unit_id",
            "must be between 1 and 247, not 255",
        ),
        ("baudrate = 9600", "baudrate", "did you mean `baud_rate`?"),
    ];
    for (line, key, fragment) in cases {
        assert_problem(
            &with_rtu_device(line),
            &format!("devices[0].{key}"),
            line,
            fragment,
        );
    }
    assert_problem(
        &RTU_BASE.replace("port = \"/dev/ttyUSB0\"", "port = \"\""),
        "devices[0].port",
        "port = ",
        "must not be empty",
    );
    assert_problem(
        &RTU_BASE.replace("port = \"/dev/ttyUSB0\"\n", ""),
        "devices[0].port",
        "[[devices]]",
        "missing required key `port`",
    );
    // The common Modbus keys keep their rules on a serial line.
    assert_problem(
        &with_rtu_device("max_registers_per_read = 126"),
        "devices[0].max_registers_per_read",
        "max_registers_per_read",
        "between 1 and 125",
    );
    assert_problem(
        &with_rtu_device("backoff_min = \"10s\"\nbackoff_max = \"1s\""),
        "devices[0].backoff_max",
        "backoff_max",
        "at least backoff_min (10s), not 1s",
    );
    let settings = modbus(
        &config(&with_rtu_device(
            "report = \"on_change\"\nmax_silence = \"5m\"\nmax_gap = 0\n\
                 max_registers_per_read = 64\nbackoff_min = \"1s\"\nbackoff_max = \"5s\"",
        ))
        .devices[0],
    )
    .clone();
    assert_eq!(settings.report, Report::OnChange);
    assert_eq!(settings.max_silence, Duration::from_secs(300));
    assert_eq!((settings.max_gap, settings.max_registers_per_read), (0, 64));
    assert_eq!(
        (settings.backoff_min, settings.backoff_max),
        (Duration::from_secs(1), Duration::from_secs(5))
    );
    // Neither form: the device has no tags.
    let src = RTU_BASE.replace(
        "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
        "\n",
    );
    assert_problem(
        &src,
        "devices[0].tags",
        "[[devices]]",
        "an enabled device needs at least one [[devices.tags]] entry, or [[devices.units]]",
    );
    config(&src.replace(
        "port = \"/dev/ttyUSB0\"",
        "port = \"/dev/ttyUSB0\"\nenabled = false",
    ));
}

#[test]
fn unit_rules() {
    let one_unit = |lines: &str| {
        format!(
            "{}\n  [[devices.units]]\n{lines}\n",
            RTU_BASE.replace(
                "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
                "\n",
            )
        )
    };
    let tag = "\n    [[devices.units.tags]]\n    name = \"t\"\n    address = \"hr:0\"";
    let cases = [
        (
            format!("  name = \"m\"\n  unit_id = 248{tag}"),
            "unit_id",
            "unit_id = 248",
            "between 1 and 247, not 248",
        ),
        (
            format!("  name = \"m\"\n  unit_id = \"1\"{tag}"),
            "unit_id",
            "unit_id = \"1\"",
            "invalid type: string \"1\", expected an integer",
        ),
        (
            format!("  name = \"m/1\"\n  unit_id = 1{tag}"),
            "name",
            "name = \"m/1\"",
            "'/' is not allowed",
        ),
        (
            format!("  name = \"{}\"\n  unit_id = 1{tag}", "m".repeat(65)),
            "name",
            "mmmm",
            "1 to 64 characters long, not 65",
        ),
        (
            format!("  unit_id = 1{tag}"),
            "name",
            "[[devices.units]]",
            "missing required key `name`",
        ),
        (
            format!("  name = \"m\"{tag}"),
            "unit_id",
            "[[devices.units]]",
            "missing required key `unit_id`",
        ),
        (
            "  name = \"m\"\n  unit_id = 1".to_owned(),
            "tags",
            "[[devices.units]]",
            "a unit needs at least one [[devices.units.tags]] entry",
        ),
        (
            "  name = \"m\"\n  unit_id = 1\n  tags = []".to_owned(),
            "tags",
            "tags = []",
            "a unit needs at least one [[devices.units.tags]] entry",
        ),
        (
            "  name = \"m\"\n  unit_id = 1\n    [devices.units.tags]\n    name = \"t\"\n    \
                 address = \"hr:0\""
                .to_owned(),
            "tags",
            "[devices.units.tags]",
            "write [[devices.units.tags]] with double brackets",
        ),
        (
            format!("  name = \"m\"\n  unit_id = 1\n  port = \"/dev/ttyS0\"{tag}"),
            "port",
            "port = \"/dev/ttyS0\"",
            "unknown key `port`; expected one of: name, unit_id, tags",
        ),
        (
            format!("  name = \"m\"\n  unit_id = 1{tag}\n    colour = 1"),
            "tags[0].colour",
            "colour",
            "unknown key `colour`",
        ),
        (
            format!("  name = \"m\"\n  unit_id = 1{tag}\n    node_id = \"i=1\""),
            "tags[0].node_id",
            "node_id",
            "unknown key `node_id` for protocol `modbus_rtu` (it belongs to protocol \
                 `opcua`)",
        ),
    ];
    for (lines, key, needle, fragment) in cases {
        assert_problem(
            &one_unit(&lines),
            &format!("devices[0].units[0].{key}"),
            needle,
            fragment,
        );
    }
    let base = RTU_BASE.replace(
        "\n  [[devices.tags]]\n  name = \"active_power\"\n  address = \"ir:12\"\n",
        "\n",
    );
    assert_problem(
        &format!("{base}\n  [devices.units]\n  name = \"m\"\n  unit_id = 1\n"),
        "devices[0].units",
        "[devices.units]",
        "write [[devices.units]] with double brackets",
    );
    assert_problem(
        &with_rtu_device("units = \"meter3\""),
        "devices[0].units",
        "units = ",
        "expected [[devices.units]] entries, found string",
    );
    // Both forms at once: the fields are named, and both forms are still checked.
    let both = format!(
        "{}\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 2{tag}\n",
        with_rtu_device("unit_id = 1")
    );
    let found = problems(&both);
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_problem(
        &both,
        "devices[0].units",
        "[[devices.units]]",
        "not both: this device also has `unit_id` and `tags`",
    );
    let both_bad = both
        .replace("address = \"ir:12\"", "address = \"xr:12\"")
        .replace("address = \"hr:0\"", "address = \"hr:x\"");
    let fields: Vec<String> = problems(&both_bad).into_iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "devices[0].tags[0].address",
            "devices[0].units",
            "devices[0].units[0].tags[0].address",
        ]
    );
    // A disabled device's units are still checked.
    assert_problem(
        &one_unit("  name = \"m\"\n  unit_id = 0").replace(
            "port = \"/dev/ttyUSB0\"",
            "port = \"/dev/ttyUSB0\"\nenabled = false",
        ),
        "devices[0].units[0].unit_id",
        "unit_id = 0",
        "not 0: 0 is the broadcast address",
    );
    // Unit names and ids are unique within a device, tag names within a unit; another
    // device may reuse them.
    let second = format!(
        "\n[[devices]]\nname = \"meters-2\"\nprotocol = \"modbus_rtu\"\n\
             port = \"/dev/ttyUSB1\"\n\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 1{tag}\n"
    );
    let src = format!(
        "{}{second}",
        one_unit(&format!("  name = \"m\"\n  unit_id = 1{tag}"))
    );
    let config = config(&src);
    assert_eq!(config.devices.len(), 2);
}

#[test]
fn each_modbus_protocol_has_its_own_link_keys() {
    for (key, line) in [
        ("port", "port = \"/dev/ttyUSB0\""),
        ("baud_rate", "baud_rate = 19200"),
        ("parity", "parity = \"even\""),
        ("data_bits", "data_bits = 8"),
        ("stop_bits", "stop_bits = 1"),
    ] {
        for protocol in ["modbus_tcp", "modbus_rtu_over_tcp"] {
            let src = with_device(line).replace("\"modbus_tcp\"", &format!("\"{protocol}\""));
            assert_problem(
                &src,
                &format!("devices[0].{key}"),
                line,
                &format!(
                    "unknown key `{key}` for protocol `{protocol}` (it belongs to protocol \
                         `modbus_rtu`); expected one of: name, protocol, address, unit_id, \
                         inter_request_delay, scan_interval"
                ),
            );
        }
    }
    assert_problem(
        &with_rtu_device("address = \"10.0.0.7:502\""),
        "devices[0].address",
        "address = \"10.0.0.7:502\"",
        "unknown key `address` for protocol `modbus_rtu` (it belongs to protocols \
             `modbus_tcp` and `modbus_rtu_over_tcp`)",
    );
    assert_problem(
        &with_rtu_device("endpoint = \"opc.tcp://h:4840\""),
        "devices[0].endpoint",
        "endpoint",
        "unknown key `endpoint` for protocol `modbus_rtu` (it belongs to protocol `opcua`)",
    );
    // An address is checked the same way on a converter as on a TCP device.
    let converter = BASE.replace("\"modbus_tcp\"", "\"modbus_rtu_over_tcp\"");
    for (address, fragment) in [("10.0.0.7", "has no port"), (":4001", "no host")] {
        assert_problem(
            &converter.replace("127.0.0.1:5020", address),
            "devices[0].address",
            "address = ",
            fragment,
        );
    }
    assert_problem(
        &converter.replace("address = \"127.0.0.1:5020\"\n", ""),
        "devices[0].address",
        "[[devices]]",
        "missing required key `address`",
    );
    // inter_request_delay is a key of every Modbus protocol, and an OPC UA device's
    // `units` is reported as a Modbus key.
    config(&with_device("inter_request_delay = \"5ms\""));
    assert_problem(
        &format!("{OPCUA_BASE}\n  [[devices.units]]\n  name = \"m\"\n  unit_id = 1\n"),
        "devices[0].units",
        "[[devices.units]]",
        "unknown key `units` for protocol `opcua` (it belongs to protocols `modbus_tcp`, \
             `modbus_rtu` and `modbus_rtu_over_tcp`)",
    );
}

#[test]
fn lines_are_found_under_units_in_every_toml_form() {
    // Array-of-tables headers.
    let found = problems(&RTU.replace("\"ir:20\"", "\"ir:x\""));
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_eq!(found[0].field, "devices[0].units[1].tags[1].address");
    assert_eq!(found[0].line, Some(line_containing(RTU, "\"ir:20\"")));
    // A missing key: the line of its table's header.
    let src = RTU.replace("  unit_id = 4\n", "");
    let found = problems(&src);
    assert_eq!(found.len(), 1, "got:\n{}", listing(&found));
    assert_eq!(found[0].field, "devices[0].units[1].unit_id");
    let second_unit = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[devices.units]]"))
        .nth(1)
        .map(|(i, _)| i + 1);
    assert_eq!(found[0].line, second_unit);
    // Inline tables and arrays.
    let src = r#"[gateway]
id = "edge-01"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[[devices]]
name = "meters"
protocol = "modbus_rtu"
port = "/dev/ttyUSB0"
units = [
  { name = "meter3", unit_id = 3, tags = [{ name = "p", address = "ir:12" }] },
  { name = "meter4", unit_id = 4, tags = [
    { name = "p", address = "ir:12" },
    { name = "q", address = "xr:13" },
  ] },
]
"#;
    assert_problem(
        src,
        "devices[0].units[1].tags[1].address",
        "xr:13",
        "unknown area `xr`",
    );
    // Dotted keys inside a unit's table.
    let dotted = RTU.replace(
        "  unit_id = 4\n  name = \"meter4\"\n",
        "  unit_id = 4\n  name = \"meter4\"\n  extra.colour = \"red\"\n",
    );
    assert_problem(
        &dotted,
        "devices[0].units[1].extra",
        "extra.colour",
        "unknown key `extra`",
    );
}

#[test]
fn the_commented_modbus_rtu_examples_of_the_example_file_are_valid() {
    // Each commented-out device is a paragraph whose first line is `# [[devices]]`.
    let blocks: Vec<String> = EXAMPLE
        .split("\n\n")
        .filter(|paragraph| paragraph.starts_with("# [[devices]]"))
        .map(|paragraph| {
            paragraph
                .lines()
                .map(|line| {
                    line.strip_prefix("# ")
                        .unwrap_or(line.trim_start_matches('#'))
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    assert_eq!(blocks.len(), 2, "an RTU line and an RTU-over-TCP converter");
    let src = format!("{EXAMPLE}\n{}\n", blocks.join("\n\n"));
    let config = config(&src);
    let lines: Vec<(&str, &Link, usize)> = config
        .devices
        .iter()
        .skip(1)
        .map(|d| (&*d.name, &modbus(d).link, modbus(d).units.len()))
        .collect();
    let [(_, Link::Rtu(serial), 2), (_, Link::RtuOverTcp { .. }, units)] = &lines[..] else {
        panic!("expected an RTU line with two units and a converter, got {lines:?}");
    };
    assert!(*units >= 1);
    assert_eq!(serial.data_bits, 8);
}

/// A small edit of the example file.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteChar(prop::sample::Index),
    InsertChar(prop::sample::Index, char),
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    ReplaceValue(prop::sample::Index, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let toml_char = prop_oneof![
        prop::sample::select(vec![
            '[', ']', '{', '}', '=', '"', '\'', ',', '.', '#', '\n', ':', '-', '0'
        ]),
        any::<char>(),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[a-z0-9:.\\[\\] ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        prop::sample::select(vec![
            "nan",
            "-inf",
            "true",
            "[]",
            "{}",
            "\"\"",
            "[1, 2]",
            "{ a = 1 }"
        ])
        .prop_map(str::to_owned),
    ];
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::DeleteChar),
        (any::<prop::sample::Index>(), toml_char).prop_map(|(i, c)| Mutation::InsertChar(i, c)),
        any::<prop::sample::Index>().prop_map(Mutation::DeleteLine),
        any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
        (any::<prop::sample::Index>(), value).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
    ]
}

fn apply(src: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    let mut lines: Vec<String> = src.lines().map(str::to_owned).collect();
    match mutation {
        Mutation::DeleteChar(i) if !chars.is_empty() => {
            chars.remove(i.index(chars.len()));
        }
        Mutation::InsertChar(i, c) => {
            let at = i.index(chars.len() + 1);
            chars.insert(at, *c);
        }
        Mutation::DeleteLine(i) if !lines.is_empty() => {
            lines.remove(i.index(lines.len()));
            return lines.join("\n");
        }
        Mutation::DuplicateLine(i) if !lines.is_empty() => {
            let at = i.index(lines.len());
            let line = lines[at].clone();
            lines.insert(at, line);
            return lines.join("\n");
        }
        Mutation::ReplaceValue(i, value) => {
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&n| lines[n].contains(" = ") && !lines[n].trim_start().starts_with('#'))
                .collect();
            if !assignments.is_empty() {
                let n = assignments[i.index(assignments.len())];
                if let Some((key, _)) = lines[n].split_once(" = ") {
                    lines[n] = format!("{key} = {value}");
                }
            }
            return lines.join("\n");
        }
        _ => {}
    }
    chars.into_iter().collect()
}

fn assert_well_formed(src: &str) {
    if let Err(errors) = parse(src, "fuzz.toml") {
        assert!(!errors.problems.is_empty());
        let last_line = src.split('\n').count();
        for problem in &errors.problems {
            if let Some(line) = problem.line {
                assert!(
                    (1..=last_line).contains(&line),
                    "{problem} (file has {last_line} lines)"
                );
            }
        }
        let _ = errors.to_string();
    }
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_text(src in "(?s).{0,300}") {
        assert_well_formed(&src);
    }

    #[test]
    fn never_panics_on_toml_shaped_text(src in "([\\[\\]a-z_.]{0,12}( = )?[\"0-9a-z:.\\[\\]{},]{0,12}\n){0,20}") {
        assert_well_formed(&src);
    }

    #[test]
    fn never_panics_on_small_mutations_of_the_example(
        mutations in prop::collection::vec(mutation(), 1..6)
    ) {
        let src = mutations.iter().fold(EXAMPLE.to_owned(), |src, m| apply(&src, m));
        assert_well_formed(&src);
    }
}
