//! The demo: simulated Modbus TCP devices, an RS-485 line of energy meters (Modbus RTU on a
//! pseudo-terminal) and an OPC UA server, an embedded MQTT broker and the real pipeline between
//! them, with a live view fed by an MQTT subscriber, so what it shows has made the whole trip.
//!
//! Everything here is dev-only and compiled with the `demo` feature (on by default): the demo,
//! the bench and the embedded broker. The production build (`--no-default-features`) has none of
//! it: no broker, no simulators.

pub mod bench;
pub mod broker;
pub mod config;
pub mod tls;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocols::modbus::{Address, Area, DataType, WordOrder};
use protocols::model::Value;
use protocols::sim::modbus::{SimDevice, SimServer};
use protocols::sim::opcua::{SimOpcUa, SimOptions};
use protocols::sim::rtu::{PtyLine, RtuSim};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;
use crate::pipeline::Running;

/// The demo's register map: (name, address, type, order, string length).
pub const DEMO_TAGS: [(&str, &str, DataType, WordOrder, u16); 9] = [
    ("counter", "hr:0", DataType::U16, WordOrder::ABCD, 0),
    ("sine", "hr:1", DataType::F32, WordOrder::ABCD, 0),
    ("ramp", "hr:3", DataType::I32, WordOrder::CDAB, 0),
    ("wave", "hr:5", DataType::F64, WordOrder::ABCD, 0),
    ("status", "hr:10", DataType::String, WordOrder::ABCD, 16),
    ("running", "co:0", DataType::Bool, WordOrder::ABCD, 0),
    ("alarm", "co:1", DataType::Bool, WordOrder::ABCD, 0),
    ("door_open", "co:2", DataType::Bool, WordOrder::ABCD, 0),
    ("pump", "co:3", DataType::Bool, WordOrder::ABCD, 0),
];

/// Starts `n` animated demo devices; returns their servers (dropping one stops it).
pub async fn start_demo_devices(
    n: usize,
    cancel: &CancellationToken,
) -> std::io::Result<Vec<SimServer>> {
    let mut servers = Vec::new();
    for _ in 0..n {
        let dev = SimDevice::demo();
        dev.animate(Duration::from_millis(100), cancel.clone());
        servers.push(dev.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
    }
    Ok(servers)
}

/// The demo's OPC UA tags: (tag name, simulator variable).
pub const DEMO_OPCUA_TAGS: [(&str, &str); 6] = [
    ("temperature", "Sim.Double"),
    ("cycles", "Sim.Counter"),
    ("heater_on", "Sim.Bool"),
    ("recipe", "Sim.String"),
    ("zone_temps", "Sim.DoubleArray"),
    ("setpoint", "Sim.Setpoint"),
];

/// Starts the demo's OPC UA server and trusts its certificate in the gateway's PKI (what an
/// operator does by moving the file from `rejected/` into `trusted/`).
pub async fn start_demo_opcua(data_dir: &std::path::Path) -> Result<SimOpcUa, DemoError> {
    let sim = SimOpcUa::start(SimOptions {
        pki_dir: data_dir.join("opcua-sim-pki"),
        tick: Duration::from_millis(250),
        ..SimOptions::default()
    })
    .await?;
    protocols::opcua::trust_server_certificate(&data_dir.join("pki"), &sim.server_cert_path())?;
    Ok(sim)
}

/// Name of the demo's RS-485 line of energy meters; each unit is published as its own device,
/// `meters/meter1` and `meters/meter2`.
pub const DEMO_METER_LINE: &str = "meters";

/// The demo meters' register map: (tag name, address, type, order, scale).
pub const DEMO_METER_TAGS: [(&str, Address, DataType, WordOrder, f64); 3] = [
    (
        "voltage",
        input_register(0),
        DataType::U16,
        WordOrder::ABCD,
        0.1,
    ),
    (
        "active_power",
        METER_POWER_AT,
        DataType::F32,
        WordOrder::CDAB,
        1.0,
    ),
    (
        "energy",
        input_register(20),
        DataType::U32,
        WordOrder::ABCD,
        0.1,
    ),
];

/// The meters on the demo line: (unit name, unit id, mean active power in kW, energy at start
/// in kWh).
pub const DEMO_METERS: [(&str, u8, f64, f64); 2] =
    [("meter1", 1, 12.0, 48_213.7), ("meter2", 2, 4.5, 9_876.5)];

/// The demo line runs at 19200 baud, 8E1 (11 bits per character).
const METER_BAUD: u32 = 19_200;
const METER_BITS_PER_CHAR: u32 = 11;

/// Where a demo meter holds its active power (f32, CDAB).
const METER_POWER_AT: Address = input_register(12);

/// Demo time passes this much faster for the meters' energy counters, so they visibly count.
const METER_TIME_LAPSE: f64 = 600.0;

const fn input_register(offset: u16) -> Address {
    Address {
        area: Area::InputRegister,
        offset,
    }
}

/// The values of [`DEMO_METER_TAGS`], raw as the meter holds them, `t` seconds into the demo.
fn meter_values(t: f64, phase: f64, mean_kw: f64, energy_kwh: f64) -> [Value; 3] {
    let volts = 230.0 + 3.0 * (t * 0.23 + phase).sin();
    let kw = meter_power(t, phase, mean_kw);
    [
        Value::UInt((volts * 10.0).round() as u64),
        Value::Float(kw),
        Value::UInt((energy_kwh * 10.0) as u64 % (1 << 32)),
    ]
}

/// Active power in kW, `t` seconds into the demo: a load that swings around its mean.
fn meter_power(t: f64, phase: f64, mean_kw: f64) -> f64 {
    mean_kw * (1.0 + 0.25 * (t * 0.7 + phase).sin() + 0.03 * (t * 5.3).sin())
}

/// Keeps one simulated meter's values moving until cancelled: voltage and power swing, the
/// energy counter integrates the power (time-lapsed).
fn animate_meter(
    device: SimDevice,
    phase: f64,
    mean_kw: f64,
    start_kwh: f64,
    period: Duration,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let write = move |device: &SimDevice, t: f64, energy: f64| {
        let mut image = device.image();
        let values = meter_values(t, phase, mean_kw, energy);
        for ((_, address, data_type, order, _), value) in DEMO_METER_TAGS.iter().zip(&values) {
            image.set(address.area, address.offset, *data_type, *order, 0, value);
        }
    };
    write(&device, 0.0, start_kwh);
    tokio::spawn(async move {
        let started = Instant::now();
        let mut energy = start_kwh;
        let mut interval = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = interval.tick() => {}
            }
            let t = started.elapsed().as_secs_f64();
            energy +=
                meter_power(t, phase, mean_kw) * period.as_secs_f64() * METER_TIME_LAPSE / 3600.0;
            write(&device, t, energy);
        }
    })
}

/// Starts the demo's animated meters ([`DEMO_METERS`]) on a simulated RS-485 line at 19200
/// baud 8E1, served on a pseudo-terminal behind the symlink `link`, which the gateway opens as
/// its serial port. Fails where no pseudo-terminal can be had (no `/dev/ptmx`).
pub fn start_demo_meters(
    link: &Path,
    cancel: &CancellationToken,
) -> std::io::Result<(RtuSim, PtyLine)> {
    let devices: Vec<SimDevice> = DEMO_METERS.iter().map(|_| SimDevice::new()).collect();
    let sim = DEMO_METERS
        .iter()
        .zip(&devices)
        .fold(RtuSim::new(), |sim, ((_, unit_id, ..), device)| {
            sim.with_unit(*unit_id, device.clone())
        })
        .emulate_line(METER_BAUD, METER_BITS_PER_CHAR);
    let pty = sim.serve_pty(link)?;
    for (i, ((_, _, mean_kw, start_kwh), device)) in DEMO_METERS.iter().zip(devices).enumerate() {
        animate_meter(
            device,
            i as f64 * 2.0,
            *mean_kw,
            *start_kwh,
            Duration::from_millis(100),
            cancel.clone(),
        );
    }
    Ok((sim, pty))
}

#[derive(Debug, Clone)]
struct Seen {
    value: String,
    quality: String,
    ts: i64,
}

/// What the subscriber saw, for the view.
#[derive(Debug, Default)]
struct View {
    tags: BTreeMap<(String, String), Seen>,
    received_samples: u64,
    historical: u64,
}

/// Subscribes to `topic_filter` on the broker and keeps the latest value of every tag.
fn spawn_subscriber(
    port: u16,
    topic_filter: String,
    view: Arc<Mutex<View>>,
    cancel: CancellationToken,
) {
    let on_message = move |doc: serde_json::Value| {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        if doc["historical"] == serde_json::Value::Bool(true) {
            v.historical += 1;
        }
        let device = doc["device"].as_str().unwrap_or("?").to_string();
        let Some(samples) = doc["samples"].as_array() else {
            return;
        };
        v.received_samples += samples.len() as u64;
        for s in samples {
            let key = (device.clone(), s["tag"].as_str().unwrap_or("?").to_string());
            let value = match &s["value"] {
                serde_json::Value::Null => "—".to_string(),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.3}"),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            let mut quality = s["quality"].as_str().unwrap_or("?").to_string();
            if let Some(r) = s["reason"].as_str() {
                quality = format!("{quality} ({r})");
            }
            let ts = s["ts"].as_i64().unwrap_or(0);
            v.tags.insert(key, Seen { value, quality, ts });
        }
    };
    crate::demo::broker::subscribe_json(port, "demo-viewer", topic_filter, cancel, on_message);
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded broker did not start.
    #[error(transparent)]
    Broker(#[from] crate::demo::broker::BrokerError),
    /// A simulator could not listen.
    #[error("device simulator: {0}")]
    Simulator(#[from] std::io::Error),
    /// The OPC UA simulator did not start.
    #[error("OPC UA simulator: {0}")]
    OpcUaSim(#[from] protocols::sim::opcua::SimError),
    /// The gateway's PKI could not be set up to trust the simulator.
    #[error("OPC UA simulator: {0}")]
    OpcUaTrust(#[from] protocols::opcua::OpcUaError),
    /// The demo's own config file did not pass the checks (a flag out of range).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// The gateway did not start.
    #[error(transparent)]
    Start(#[from] crate::pipeline::StartError),
}

/// Options of the demo command.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated devices.
    pub devices: usize,
    /// Scan interval of every tag.
    pub scan_interval: Duration,
    /// Where the buffer lives.
    pub data_dir: PathBuf,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Print plain lines instead of a refreshing screen.
    pub plain: bool,
}

/// Runs the demo until Ctrl-C (or the duration), then shuts down cleanly.
pub async fn run(mut opts: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    // The config file lies in the data directory and names it: absolute, so that it is not
    // taken relative to the file's own directory.
    opts.data_dir = std::path::absolute(&opts.data_dir)?;
    let broker = crate::demo::broker::start(16 << 20)?;
    let sims_cancel = CancellationToken::new();
    let servers = start_demo_devices(opts.devices, &sims_cancel).await?;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    std::fs::create_dir_all(&opts.data_dir)?;
    let mut notes = Vec::new();
    // The meter line needs a pseudo-terminal; without one the demo runs without the meters.
    let meters = match start_demo_meters(&opts.data_dir.join("ttyDEMO0"), &sims_cancel) {
        Ok((sim, pty)) => {
            // The same line behind a simulated serial-to-Ethernet converter, so `read` can be
            // tried on the meters while the gateway polls them.
            let converter = match sim.serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0))).await {
                Ok(server) => Some(server),
                Err(e) => {
                    warn!(error = %e, "the meter line's RTU-over-TCP port did not start");
                    None
                }
            };
            notes.push(meter_note(&pty, converter.as_ref()));
            Some((pty, converter))
        }
        Err(e) => {
            warn!(error = %e, "cannot serve the simulated RS-485 meter line on a pseudo-terminal; the demo runs without it");
            notes.push(format!("RS-485 meter line not simulated: {e}"));
            None
        }
    };
    let opcua_sim = start_demo_opcua(&opts.data_dir).await?;
    let endpoint = opcua_sim.endpoint();
    let text = config::text(&config::DemoSetup {
        data_dir: &opts.data_dir,
        mqtt_port: broker.port(),
        scan: opts.scan_interval,
        presses: &addrs,
        meter_port: meters.as_ref().map(|(pty, _)| pty.path()),
        oven: (&endpoint, opcua_sim.namespace()),
    });
    let config_path = opts.data_dir.join("demo.toml");
    std::fs::write(&config_path, text)?;
    let config = crate::config::load(&config_path)?;
    notes.push(format!(
        "config: {} (the demo's setup as a config file)",
        config_path.display()
    ));
    let prefix = config.mqtt.topic_prefix.clone();
    let view = Arc::new(Mutex::new(View::default()));
    let viewer_cancel = CancellationToken::new();
    spawn_subscriber(
        broker.port(),
        format!("{prefix}/#"),
        view.clone(),
        viewer_cancel.clone(),
    );
    let running = crate::pipeline::start(config).await?;

    let tty = std::io::stdout().is_terminal() && !opts.plain;
    if !tty {
        for note in &notes {
            println!("{note}");
        }
    }
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(if tty {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    });
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if opts.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let received = view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .received_samples;
        let rate = (received - last.1) as f64 / last.0.elapsed().as_secs_f64().max(0.001);
        last = (Instant::now(), received);
        let text = render(&running, &view, broker.port(), &prefix, &notes, rate, tty);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
    println!("\nstopping: draining the pipeline…");
    running.shutdown().await;
    viewer_cancel.cancel();
    sims_cancel.cancel();
    drop(servers);
    drop(meters);
    opcua_sim.stop().await;
    println!("stopped cleanly.");
    Ok(())
}

/// The view's line about the meter line: where its port is, and how to read a meter by hand.
fn meter_note(pty: &PtyLine, converter: Option<&SimServer>) -> String {
    let mut note = format!(
        "RS-485 meter line (simulated, {METER_BAUD} baud 8E1) on {}",
        pty.path().display()
    );
    if let Some(tty) = pty.tty() {
        note.push_str(&format!(" -> {}", tty.display()));
    }
    if let Some(server) = converter {
        note.push_str(&format!(
            "\nread a meter yourself: edge-gateway read --rtu-over-tcp {} --unit-id 1 --address {METER_POWER_AT} --count 2",
            server.addr()
        ));
    }
    note
}

fn render(
    running: &Running,
    view: &Mutex<View>,
    port: u16,
    prefix: &str,
    notes: &[String],
    rate: f64,
    tty: bool,
) -> String {
    use std::fmt::Write as _;
    let m = &running.metrics;
    let mut s = String::new();
    let mqtt = if m.mqtt_connected.load(Ordering::Relaxed) {
        "connected"
    } else {
        "DISCONNECTED"
    };
    let v = view.lock().unwrap_or_else(|e| e.into_inner());
    let device_width = running
        .devices
        .iter()
        .map(|d| d.name.chars().count())
        .chain(v.tags.keys().map(|(dev, _)| dev.chars().count()))
        .max()
        .unwrap_or(0)
        .max(10);
    if !tty {
        let _ = writeln!(
            s,
            "mqtt={mqtt} samples/s={rate:.0} records={} acked={} buffer={} received_samples={}",
            Metrics::get(&m.records),
            Metrics::get(&m.acked),
            Metrics::get(&m.buffer_records),
            v.received_samples
        );
        plain_devices(&mut s, &v, device_width);
        return s;
    }
    s.push_str("\x1b[2J\x1b[H");
    let _ = writeln!(
        s,
        "edge-gateway demo · gateway demo-gw · boot {} · Ctrl-C to stop",
        running.boot
    );
    let _ = writeln!(s, "embedded MQTT broker on 127.0.0.1:{port} · watch: mosquitto_sub -h 127.0.0.1 -p {port} -t '{prefix}/#' -v");
    for note in notes {
        let _ = writeln!(s, "{note}");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "MQTT {mqtt} · {rate:.0} samples/s received · records {} · acked {} · buffer {} records ({} B) · committed {} · replayed {} · historical received {}",
        Metrics::get(&m.records),
        Metrics::get(&m.acked),
        Metrics::get(&m.buffer_records),
        Metrics::get(&m.buffer_bytes),
        Metrics::get(&m.committed),
        Metrics::get(&m.replayed),
        v.historical,
    );
    for d in &running.devices {
        let st = &d.status;
        let _ = writeln!(
            s,
            "device {:<device_width$} {:<12} scans {:>7} · requests {:>7} · errors {} · reconnects {} · last scan {} µs",
            d.name,
            if st.is_connected() { "connected" } else { "DISCONNECTED" },
            st.scans.load(Ordering::Relaxed),
            st.requests.load(Ordering::Relaxed),
            st.errors.load(Ordering::Relaxed),
            st.reconnects.load(Ordering::Relaxed),
            st.last_scan_us.load(Ordering::Relaxed),
        );
    }
    let tag_width = v
        .tags
        .keys()
        .map(|(_, tag)| tag.chars().count())
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<device_width$} {:<tag_width$} {:>18}  {:<22} {:>8}",
        "DEVICE", "TAG", "VALUE", "QUALITY", "AGE"
    );
    let now = protocols::model::Timestamp::now().0;
    for ((dev, tag), seen) in &v.tags {
        let age = (now - seen.ts).max(0) as f64 / 1000.0;
        let _ = writeln!(
            s,
            "{:<device_width$} {:<tag_width$} {:>18}  {:<22} {:>7.1}s",
            dev, tag, seen.value, seen.quality, age
        );
    }
    s
}

/// For `--plain`: one line per device as the subscriber last saw it, e.g.
/// `  meters/meter1  3/3 good  active_power=12.345 energy=48213.700 voltage=230.100`; a tag that
/// is not good carries its quality in brackets.
fn plain_devices(s: &mut String, v: &View, device_width: usize) {
    use std::fmt::Write as _;
    let mut devices: BTreeMap<&str, Vec<(&str, &Seen)>> = BTreeMap::new();
    for ((dev, tag), seen) in &v.tags {
        devices.entry(dev).or_default().push((tag, seen));
    }
    for (dev, tags) in devices {
        let good = tags
            .iter()
            .filter(|(_, seen)| seen.quality == "good")
            .count();
        let _ = write!(s, "  {dev:<device_width$} {good}/{} good ", tags.len());
        for (tag, seen) in tags {
            let _ = write!(s, " {tag}={}", seen.value);
            if seen.quality != "good" {
                let _ = write!(s, " [{}]", seen.quality);
            }
        }
        let _ = writeln!(s);
    }
}
