//! Config values the tests build gateways and drivers from: a tag, a Modbus TCP device, a whole
//! config for a broker on loopback, the settings of the demo's simulated presses. The tests set
//! the runtime types directly, so that each can adjust a field the config file would not let it
//! (a 20 ms backoff, a 500 ms shutdown grace) without going through a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edge_gateway::config::{
    BufferSettings, Config, DeviceKind, DeviceSettings, Format, GatewaySettings, MqttSettings,
    ProtocolVersion, TopicTemplate, WhenFull,
};
use edge_gateway::demo::DEMO_TAGS;
use protocols::modbus::{Address, DataType, ModbusSettings, TagSpec, WordOrder};

/// A tag spec with the usual defaults (no scaling, no deadband).
pub fn tag(
    name: &str,
    address: Address,
    data_type: DataType,
    order: WordOrder,
    length: u16,
    scan: Duration,
) -> TagSpec {
    TagSpec {
        meta: Default::default(),
        name: name.into(),
        address,
        bit: None,
        data_type,
        order,
        length,
        scale: 1.0,
        offset: 0.0,
        deadband: 0.0,
        scan_interval: scan,
        write: None,
    }
}

/// Modbus TCP settings with the usual defaults for a device at `addr`.
pub fn modbus_device(
    name: &str,
    addr: SocketAddr,
    scan: Duration,
    tags: Vec<TagSpec>,
) -> DeviceSettings {
    DeviceSettings {
        name: name.into(),
        scan_interval: scan,
        kind: DeviceKind::Modbus(ModbusSettings {
            backoff_max: Duration::from_secs(5),
            ..ModbusSettings::tcp(addr.to_string(), 1, tags)
        }),
    }
}

/// A complete config for a gateway publishing to a broker on 127.0.0.1:`mqtt_port`.
pub fn local_config(
    id: &str,
    data_dir: PathBuf,
    mqtt_port: u16,
    devices: Vec<DeviceSettings>,
) -> Config {
    Config {
        gateway: GatewaySettings {
            id: id.into(),
            data_dir,
        },
        buffer: BufferSettings {
            max_size: 1 << 30,
            when_full: WhenFull::DropOldest,
            commit_interval: Duration::from_millis(100),
            replay_rate: None,
        },
        mqtt: MqttSettings {
            host: "127.0.0.1".into(),
            port: mqtt_port,
            tls: None,
            protocol_version: ProtocolVersion::V311,
            client_id: id.into(),
            topic_prefix: format!("edge/{id}"),
            topic: TopicTemplate::default(),
            status: true,
            format: Format::Json,
            sparkplug: None,
            username: None,
            password_file: None,
            sas: None,
            keep_alive: Duration::from_secs(30),
            max_inflight: 256,
            max_packet_size: 1 << 20,
            shutdown_grace: Duration::from_secs(2),
            ack_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
        },
        devices,
        api: None,
        commands: Default::default(),
        disabled_devices: 0,
    }
}

/// The settings of the demo's presses (`press1`, `press2`, ...) served at `addrs`.
pub fn demo_devices(addrs: &[SocketAddr], scan: Duration) -> Vec<DeviceSettings> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let tags = DEMO_TAGS
                .iter()
                .map(|(name, a, t, o, len)| {
                    let address = a.parse().expect("the demo's addresses are valid");
                    tag(name, address, *t, *o, *len, scan)
                })
                .collect();
            modbus_device(&format!("press{}", i + 1), *addr, scan, tags)
        })
        .collect()
}
