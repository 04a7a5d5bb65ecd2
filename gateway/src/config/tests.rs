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

use super::values::{fmt_duration, fmt_size, parse_size, MAX_DURATION};
use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/gateway.example.toml");

/// A small valid file that the tests edit.
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
fn disabled_devices_are_left_out() {
    let disabled = "\n[[devices]]\nname = \"spare\"\nprotocol = \"modbus_tcp\"\n\
                    address = \"10.0.0.9:502\"\nenabled = false\n";
    let config = config(&format!("{BASE}{disabled}"));
    let names: Vec<&str> = config.devices.iter().map(|d| &*d.name).collect();
    assert_eq!(names, ["press7"], "a disabled device needs no tags either");
}

#[test]
fn a_problem_without_a_line_renders_after_the_file_name() {
    let no_line = ConfigErrors::whole_file("gateway.toml", None, "gone".to_owned());
    assert_eq!(no_line.to_string(), "gateway.toml: gone");
}

#[test]
fn buffer_sizes_policies_and_replay_rates_parse() {
    let config = config(&with_buffer(
        "max_size = \"100MB\"\nwhen_full = \"drop_newest\"",
    ));
    assert_eq!(config.buffer.max_size, 100_000_000);
    assert_eq!(config.buffer.when_full, WhenFull::DropNewest);
    assert_eq!(config.buffer.replay_rate, None, "unlimited by default");
    let paced = self::config(&with_buffer("replay_rate = 500"));
    assert_eq!(paced.buffer.replay_rate, Some(500));
}

#[test]
fn mqtt_urls_give_host_and_port_and_a_password_in_one_is_never_echoed() {
    for (url, host, port) in [
        ("tcp://broker", "broker", 1883),
        ("mqtt://10.0.0.5:1884/", "10.0.0.5", 1884),
        ("MQTT://[::1]:1885", "::1", 1885),
    ] {
        let mqtt = config(&with_url(url)).mqtt;
        assert_eq!((mqtt.host.as_str(), mqtt.port), (host, port), "{url}");
    }
    let secret = problems(&with_url("mqtt://user:hunter2@broker"));
    assert!(!secret.is_empty());
    assert!(
        !format!("{secret:?}").contains("hunter2"),
        "the password is never echoed"
    );
}

#[test]
fn mqtt_grace_may_be_zero_and_keep_alive_fractional() {
    let mqtt = config(&with_mqtt("shutdown_grace = \"0s\"\nkeep_alive = \"1.5s\"")).mqtt;
    assert_eq!(mqtt.shutdown_grace, Duration::ZERO, "zero grace is allowed");
    assert_eq!(mqtt.keep_alive, Duration::from_millis(1500));
}

#[test]
fn the_modbus_words_of_the_file_read_back_as_they_are_written() {
    let types = [
        DataType::Bool,
        DataType::I16,
        DataType::U16,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
        DataType::F32,
        DataType::F64,
        DataType::String,
    ];
    for data_type in types {
        assert_eq!(data_type.to_string().parse(), Ok(data_type));
        assert_eq!(data_type.to_string().to_uppercase().parse(), Ok(data_type));
    }
    for order in WordOrder::ALL {
        assert_eq!(order.to_string().parse(), Ok(order));
        assert_eq!(order.to_string().to_lowercase().parse(), Ok(order));
    }
    for parity in [Parity::None, Parity::Even, Parity::Odd] {
        assert_eq!(parity.to_string().parse(), Ok(parity));
    }
    for area in [
        Area::Coil,
        Area::DiscreteInput,
        Area::HoldingRegister,
        Area::InputRegister,
    ] {
        assert_eq!(area.to_string().parse(), Ok(area));
    }
    let unknown = "float".parse::<DataType>().map_err(|e| e.to_string());
    assert_eq!(
        unknown,
        Err(
            "unknown type `float`: use bool, i16, u16, i32, u32, i64, u64, f32, f64 or string"
                .to_owned()
        )
    );
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

/// A small valid file with one OPC UA device, for the tests to edit.
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
fn opcua_security_policies_and_modes_pair_as_written() {
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
}

#[test]
fn an_opcua_user_certificate_with_its_key_is_the_devices_identity() {
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
fn an_opcua_tag_may_sample_at_zero_with_any_finite_deadband() {
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

/// A small valid RTU device in the one-unit form, for the tests to edit.
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
fn an_rtu_device_takes_the_common_modbus_settings() {
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
}

#[test]
fn unit_names_and_ids_may_repeat_in_another_device() {
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
