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
use crate::secret::SecretSource;

mod opcua;
mod rtu;

const EXAMPLE: &str = include_str!("../../../../deploy/gateway.example.toml");

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
            tls: None,
            protocol_version: ProtocolVersion::V311,
            client_id: "edge-01".to_owned(),
            topic_prefix: "edge/edge-01".to_owned(),
            topic: TopicTemplate::default(),
            status: true,
            format: Format::Json,
            sparkplug: None,
            username: Some("gw".to_owned()),
            password_file: Some(SecretSource::File(PathBuf::from("/path"))),
            sas: None,
            keep_alive: Duration::from_secs(30),
            max_inflight: 256,
            max_packet_size: 1 << 20,
            shutdown_grace: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
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
                        // The unit is carried (it was dropped before the meta message).
                        meta: protocols::model::TagMeta {
                            unit: Some("m/s".into()),
                            ..Default::default()
                        }
                        .shared(),
                        name: "sine".into(),
                        address: Address {
                            area: Area::HoldingRegister,
                            offset: 1,
                        },
                        bit: None,
                        data_type: DataType::F32,
                        order: WordOrder::ABCD,
                        length: 0,
                        scale: 1.0,
                        offset: 0.0,
                        deadband: 0.0,
                        scan_interval: Duration::from_millis(250),
                        write: None,
                    }]
                    .into(),
                }],
            }),
        }],
        api: None,
        commands: Default::default(),
        disabled_devices: 0,
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
    assert_eq!(config.disabled_devices, 1);
}

#[test]
fn each_unit_of_a_disabled_line_counts_as_a_disabled_device() {
    let line = "\n[[devices]]\nname = \"line\"\nprotocol = \"modbus_tcp\"\n\
                address = \"10.0.0.9:502\"\nenabled = false\n\
                [[devices.units]]\nname = \"u1\"\nunit_id = 1\n\
                [[devices.units.tags]]\nname = \"a\"\naddress = \"hr:0\"\ntype = \"u16\"\n\
                [[devices.units]]\nname = \"u2\"\nunit_id = 2\n\
                [[devices.units.tags]]\nname = \"a\"\naddress = \"hr:0\"\ntype = \"u16\"\n";
    let config = config(&format!("{BASE}{line}"));
    assert_eq!(config.devices.len(), 1);
    assert_eq!(config.disabled_devices, 2);
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
    assert_eq!(config.mqtt.password_file, Some(SecretSource::File(secret)));
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

#[test]
fn a_syntax_error_in_a_tag_of_a_device_without_a_protocol_is_reported_as_such() {
    let src = "[gateway]\nid = \"g\"\n[mqtt]\nurl = \"mqtt://127.0.0.1\"\n\
               [[devices]]\nname = \"d\"\n[[devices.tags]]\nname = \"a\"\nname = \"b\"\n";
    let errors = crate::config::parse(src, "test.toml").unwrap_err().render();
    assert!(errors.contains("duplicate key"), "{errors}");
    assert!(
        !errors.contains("protocol"),
        "only the syntax error: {errors}"
    );
}
