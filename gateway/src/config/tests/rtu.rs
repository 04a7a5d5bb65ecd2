//! The runtime values of Modbus RTU lines and multi-unit devices.

use super::*;

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
        meta: Default::default(),
        name: name.into(),
        address: match address.parse() {
            Ok(address) => address,
            Err(e) => panic!("{address}: {e}"),
        },
        bit: None,
        data_type,
        order,
        length: 0,
        scale: 1.0,
        offset: 0.0,
        deadband: 0.0,
        scan_interval,
        write: None,
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
                tags: vec![power.clone()].into(),
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
                ]
                .into(),
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
