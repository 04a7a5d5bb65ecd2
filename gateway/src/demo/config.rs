//! The demo's setup written as a config file, which the demo then loads like any other config:
//! what the demo runs is what the file says, it passes the same checks, and the file
//! (`<data_dir>/demo.toml`) shows a newcomer a working config for each kind of device.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{DEMO_METERS, DEMO_METER_LINE, DEMO_METER_TAGS, DEMO_OPCUA_TAGS, DEMO_TAGS};

/// The demo's gateway id; its records go to `edge/demo-gw/<device>`.
pub const GATEWAY_ID: &str = "demo-gw";

/// What the demo started, for its config file.
#[derive(Debug)]
pub struct DemoSetup<'a> {
    /// Where the buffer, the state and the gateway's PKI live.
    pub data_dir: &'a Path,
    /// The embedded broker's port on 127.0.0.1.
    pub mqtt_port: u16,
    /// Scan interval of the Modbus devices.
    pub scan: Duration,
    /// The simulated presses (Modbus TCP), named `press1`, `press2`, ...
    pub presses: &'a [SocketAddr],
    /// The serial port of the simulated meter line, when there is one.
    pub meter_port: Option<&'a Path>,
    /// The simulated oven's OPC UA endpoint and the namespace of its variables.
    pub oven: (&'a str, u16),
}

/// A duration as the config file writes it.
fn duration(d: Duration) -> String {
    if d.subsec_micros() % 1000 == 0 {
        format!("\"{}ms\"", d.as_millis())
    } else {
        format!("\"{}us\"", d.as_micros())
    }
}

/// A TOML string (quoted and escaped).
fn string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The demo's config file.
pub fn text(setup: &DemoSetup<'_>) -> String {
    let scan = duration(setup.scan);
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        t,
        "# The demo's setup, written by `edge-gateway demo` and loaded like any config file.\n\
         \n\
         [gateway]\n\
         id = \"{GATEWAY_ID}\"\n\
         data_dir = {data_dir}\n\
         \n\
         [buffer]\n\
         max_size = \"1GiB\"\n\
         when_full = \"drop_oldest\"\n\
         commit_interval = \"100ms\"\n\
         \n\
         [mqtt]\n\
         url = \"mqtt://127.0.0.1:{port}\"\n\
         client_id = \"{GATEWAY_ID}\"\n\
         topic_prefix = \"edge/{GATEWAY_ID}\"\n\
         format = \"json\"\n\
         keep_alive = \"30s\"\n\
         max_inflight = 256\n\
         max_packet_size = \"1MiB\"\n\
         shutdown_grace = \"2s\"\n\
         ack_timeout = \"30s\"",
        data_dir = string(&setup.data_dir.display().to_string()),
        port = setup.mqtt_port,
    );
    for (i, addr) in setup.presses.iter().enumerate() {
        let _ = writeln!(
            t,
            "\n[[devices]]\n\
             name = \"press{n}\"\n\
             protocol = \"modbus_tcp\"\n\
             address = \"{addr}\"\n\
             unit_id = 1\n\
             scan_interval = {scan}\n\
             backoff_max = \"5s\"",
            n = i + 1,
        );
        for (name, address, data_type, order, length) in DEMO_TAGS {
            let _ = write!(
                t,
                "\n  [[devices.tags]]\n  name = \"{name}\"\n  address = \"{address}\"\n  \
                 type = \"{data_type}\"\n  order = \"{order}\"\n"
            );
            if length > 0 {
                let _ = writeln!(t, "  length = {length}");
            }
        }
    }
    if let Some(port) = setup.meter_port {
        let _ = writeln!(
            t,
            "\n[[devices]]\n\
             name = \"{DEMO_METER_LINE}\"\n\
             protocol = \"modbus_rtu\"\n\
             port = {port}\n\
             baud_rate = {baud}\n\
             parity = \"even\"\n\
             data_bits = 8\n\
             stop_bits = 1\n\
             timeout = \"300ms\"\n\
             scan_interval = {scan}\n\
             backoff_max = \"5s\"",
            port = string(&port.display().to_string()),
            baud = super::METER_BAUD,
        );
        for (unit, unit_id, ..) in DEMO_METERS {
            let _ = writeln!(
                t,
                "\n  [[devices.units]]\n  name = \"{unit}\"\n  unit_id = {unit_id}"
            );
            for (name, address, data_type, order, scale) in DEMO_METER_TAGS {
                let _ = writeln!(
                    t,
                    "\n    [[devices.units.tags]]\n    name = \"{name}\"\n    \
                     address = \"{address}\"\n    type = \"{data_type}\"\n    \
                     order = \"{order}\"\n    scale = {scale:?}"
                );
            }
        }
    }
    let (endpoint, ns) = setup.oven;
    let _ = writeln!(
        t,
        "\n[[devices]]\n\
         name = \"oven1\"\n\
         protocol = \"opcua\"\n\
         endpoint = {endpoint}\n\
         security_policy = \"Aes256_Sha256_RsaPss\"\n\
         security_mode = \"SignAndEncrypt\"\n\
         pki_dir = {pki}\n\
         publishing_interval = \"250ms\"\n\
         scan_interval = \"1s\"",
        endpoint = string(endpoint),
        pki = string(&setup.data_dir.join("pki").display().to_string()),
    );
    for (name, variable) in DEMO_OPCUA_TAGS {
        let _ = writeln!(
            t,
            "\n  [[devices.tags]]\n  name = \"{name}\"\n  node_id = \"ns={ns};s={variable}\"\n  \
             sampling_interval = \"100ms\"\n  queue_size = 10"
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, DeviceKind};
    use protocols::modbus::{Link, Parity};
    use protocols::opcua::{SecurityMode, SecurityPolicy};

    fn setup<'a>(presses: &'a [SocketAddr], meter_port: Option<&'a Path>) -> DemoSetup<'a> {
        DemoSetup {
            data_dir: Path::new("/var/tmp/demo \"data\""),
            mqtt_port: 18830,
            scan: Duration::from_millis(500),
            presses,
            meter_port,
            oven: ("opc.tcp://127.0.0.1:4855/", 2),
        }
    }

    #[test]
    fn the_demo_config_passes_every_check_with_each_kind_of_device() {
        let presses = [
            SocketAddr::from(([127, 0, 0, 1], 15020)),
            SocketAddr::from(([127, 0, 0, 1], 15021)),
        ];
        let text = text(&setup(&presses, Some(Path::new("/tmp/ttyDEMO0"))));
        let cfg = config::parse(&text, "demo.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(&*cfg.gateway.id, GATEWAY_ID);
        assert_eq!(cfg.gateway.data_dir, Path::new("/var/tmp/demo \"data\""));
        assert_eq!(cfg.mqtt.port, 18830);
        assert_eq!(cfg.mqtt.topic_prefix, "edge/demo-gw");
        assert_eq!(cfg.buffer.commit_interval, Duration::from_millis(100));
        let names: Vec<&str> = cfg.devices.iter().map(|d| &*d.name).collect();
        assert_eq!(names, ["press1", "press2", "meters", "oven1"]);
        let DeviceKind::Modbus(press) = &cfg.devices[1].kind else {
            panic!("press2 is a Modbus device");
        };
        assert_eq!(press.units[0].tags.len(), DEMO_TAGS.len());
        assert_eq!(press.backoff_max, Duration::from_secs(5));
        assert!(press.units[0]
            .tags
            .iter()
            .all(|t| t.scan_interval == Duration::from_millis(500)));
        let DeviceKind::Modbus(meters) = &cfg.devices[2].kind else {
            panic!("the meter line is a Modbus device");
        };
        let Link::Rtu(serial) = &meters.link else {
            panic!("the meter line is a serial line");
        };
        assert_eq!(serial.parity, Parity::Even);
        assert_eq!(meters.units.len(), DEMO_METERS.len());
        assert_eq!(meters.units[0].tags[0].scale, 0.1);
        let DeviceKind::OpcUa(oven) = &cfg.devices[3].kind else {
            panic!("the oven is an OPC UA device");
        };
        assert_eq!(oven.security_policy, SecurityPolicy::Aes256Sha256RsaPss);
        assert_eq!(oven.security_mode, SecurityMode::SignAndEncrypt);
        assert_eq!(oven.tags.len(), DEMO_OPCUA_TAGS.len());
    }

    #[test]
    fn without_a_pseudo_terminal_the_demo_config_has_no_meter_line() {
        let presses = [SocketAddr::from(([127, 0, 0, 1], 15020))];
        let text = text(&setup(&presses, None));
        let cfg = config::parse(&text, "demo.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let names: Vec<&str> = cfg.devices.iter().map(|d| &*d.name).collect();
        assert_eq!(names, ["press1", "oven1"]);
    }

    #[test]
    fn a_scan_interval_with_a_fraction_of_a_millisecond_is_written_in_microseconds() {
        assert_eq!(duration(Duration::from_micros(1500)), "\"1500us\"");
        assert_eq!(duration(Duration::from_millis(250)), "\"250ms\"");
        assert_eq!(duration(Duration::from_secs(2)), "\"2000ms\"");
    }
}
