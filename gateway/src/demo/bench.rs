//! The end-to-end benchmark: simulated devices and an embedded broker in this process, the
//! gateway as a child process (so its CPU, memory and disk writes are measured alone), and a
//! subscriber that counts what arrives and how late.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocols::sim::modbus::SimDevice;
use tokio_util::sync::CancellationToken;

/// Options of the bench command.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Simulated Modbus TCP devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// u16 tags per device (contiguous holding registers).
    #[arg(long, default_value_t = 100)]
    pub tags: usize,
    /// Scan interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub scan_ms: u64,
    /// Seconds to measure, after a warm-up.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Instead of Modbus devices: one OPC UA session with this many monitored items (sampled
    /// every --scan-ms, each changing every --scan-ms on the simulator).
    #[arg(long, default_value_t = 0)]
    pub opcua_items: usize,
    /// OPC UA publishing interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub publishing_ms: u64,
    /// OPC UA security: "None" or a policy name, used with SignAndEncrypt.
    #[arg(long, default_value = "None")]
    pub opcua_security: String,
    /// Instead of Modbus TCP devices: one serial RTU line at this baud rate on a pseudo-terminal,
    /// its timing emulated by the simulator, with --units units of --rtu-registers u16 tags
    /// each (one read per unit scan). Use a small --scan-ms to keep the line saturated.
    #[arg(long, default_value_t = 0)]
    pub rtu_baud: u32,
    /// Bits per character on the RTU line: 11 (8E1, the Modbus default) or 10 (8N1).
    #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u32).range(10..=11))]
    pub rtu_bits: u32,
    /// Units on the RTU line.
    #[arg(long, default_value_t = 4)]
    pub units: usize,
    /// Registers (u16 tags) per RTU unit, read in one request when at most 125.
    #[arg(long, default_value_t = 125)]
    pub rtu_registers: usize,
    /// Outage and replay: after the warm-up the gateway's link to the broker is cut for this
    /// many seconds (records go to the disk buffer), then restored; prints how long the backlog
    /// took to drain and at what rate, beside the live data.
    #[arg(long, default_value_t = 0)]
    pub outage_seconds: u64,
    /// The gateway reaches the broker over TLS (a CA and a certificate made for the run, a TLS
    /// terminator before the broker), to measure what TLS costs.
    #[arg(long)]
    pub tls: bool,
    /// The gateway serves its HTTP API (`[api]` on loopback), and the bench reads it as an open
    /// status page and a Prometheus server do: devices and tags every 2 s, the history every
    /// 10 s, the metrics every 15 s; to measure what the API costs.
    #[arg(long)]
    pub api: bool,
    /// With --api: serve the API but never read it, to measure what feeding it costs the
    /// pipeline alone.
    #[arg(long, requires = "api")]
    pub api_idle: bool,
    /// Payload format: "json" or "sparkplug_b" (the gateway as a Sparkplug B edge node; the
    /// subscriber decodes DDATA).
    #[arg(long, default_value = "json", value_parser = ["json", "sparkplug_b"])]
    pub format: String,
    /// Profiling hook: do not start the gateway child; print the config path and keep the
    /// simulator, broker and subscriber running for warm-up + --seconds, so the child can be
    /// started by hand (under a profiler) with `bench-child --config PATH`.
    #[arg(long, hide = true)]
    pub hold: bool,
}

/// Why the bench failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up failed.
    #[error("bench setup: {0}")]
    Setup(String),
    /// The gateway child could not be started.
    #[error("gateway child: {0}")]
    Spawn(#[source] std::io::Error),
    /// The gateway child failed.
    #[error("gateway child: {0}")]
    Child(String),
}

fn setup<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// The gateway, buffer and MQTT sections every bench config starts with.
fn config_header(dir: &Path, mqtt_port: u16) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n",
        dir.join("data").display()
    );
    let _ = writeln!(s, "[buffer]\ncommit_interval = \"100ms\"\n");
    let _ = writeln!(
        s,
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nmax_inflight = 256\n"
    );
    s
}

/// Writes a config for the bench's devices.
pub fn bench_config(
    dir: &Path,
    mqtt_port: u16,
    addrs: &[SocketAddr],
    tags: usize,
    scan_ms: u64,
) -> String {
    let mut s = config_header(dir, mqtt_port);
    for (i, a) in addrs.iter().enumerate() {
        let _ = writeln!(
            s,
            "[[devices]]\nname = \"dev{i}\"\nprotocol = \"modbus_tcp\"\naddress = \"{a}\"\nscan_interval = \"{scan_ms}ms\"\n"
        );
        for t in 0..tags {
            let _ = writeln!(
                s,
                "  [[devices.tags]]\n  name = \"t{t}\"\n  address = \"hr:{t}\"\n  type = \"u16\"\n"
            );
        }
    }
    s
}

/// Writes a config for one OPC UA session monitoring `items` bench variables.
pub fn bench_opcua_config(
    dir: &Path,
    mqtt_port: u16,
    endpoint: &str,
    ns: u16,
    items: usize,
    opts: &BenchOptions,
) -> String {
    let mut s = config_header(dir, mqtt_port);
    let mode = if opts.opcua_security == "None" {
        "None"
    } else {
        "SignAndEncrypt"
    };
    let _ = writeln!(
        s,
        "[[devices]]\nname = \"opcua\"\nprotocol = \"opcua\"\nendpoint = \"{endpoint}\"\n\
         security_policy = \"{}\"\nsecurity_mode = \"{mode}\"\npki_dir = \"{}\"\n\
         trust_server_cert = true\npublishing_interval = \"{}ms\"\n",
        opts.opcua_security,
        dir.join("pki").display(),
        opts.publishing_ms
    );
    for t in 0..items {
        let _ = writeln!(
            s,
            "  [[devices.tags]]\n  name = \"t{t}\"\n  node_id = \"ns={ns};s=Bench.{t}\"\n  sampling_interval = \"{}ms\"\n",
            opts.scan_ms
        );
    }
    s
}

/// Moves every value of `dev` a small random step each `period`, as plant values do, so the
/// payloads (and how well the disk buffer compresses them) are those of a live plant, not of
/// registers that never change.
fn wander(dev: &SimDevice, tags: usize, period: Duration, seed: u64) {
    let dev = dev.clone();
    tokio::spawn(async move {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let mut img = dev.image();
            for r in img.hr.iter_mut().take(tags) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *r = r.wrapping_add((x >> 60) as u16).wrapping_sub(8);
            }
        }
    });
}

/// Writes a config for one RTU line on `port` with `units` units of `registers` u16 tags.
pub fn bench_rtu_config(dir: &Path, mqtt_port: u16, port: &Path, opts: &BenchOptions) -> String {
    let mut s = config_header(dir, mqtt_port);
    let parity = if opts.rtu_bits == 11 { "even" } else { "none" };
    let _ = writeln!(
        s,
        "[[devices]]\nname = \"line\"\nprotocol = \"modbus_rtu\"\nport = \"{}\"\n\
         baud_rate = {}\nparity = \"{parity}\"\nscan_interval = \"{}ms\"\n",
        port.display(),
        opts.rtu_baud,
        opts.scan_ms
    );
    for u in 0..opts.units {
        let _ = writeln!(
            s,
            "  [[devices.units]]\n  name = \"u{}\"\n  unit_id = {}\n",
            u + 1,
            u + 1
        );
        for t in 0..opts.rtu_registers {
            let _ = writeln!(
                s,
                "    [[devices.units.tags]]\n    name = \"t{t}\"\n    address = \"hr:{t}\"\n    type = \"u16\"\n"
            );
        }
    }
    s
}

#[derive(Debug, Default)]
struct Received {
    samples: AtomicU64,
    records: AtomicU64,
    latencies_ms: Mutex<Vec<f64>>,
    /// Samples of replayed (`historical`) records.
    historical: AtomicU64,
    /// When the last replayed record arrived, in ms since the UNIX epoch.
    last_historical_ms: AtomicU64,
    /// When the first replayed record arrived since this was last reset to 0.
    first_historical_ms: AtomicU64,
}

impl Received {
    /// The read-to-subscriber latencies so far, in milliseconds, ascending.
    fn sorted_latencies(&self) -> Vec<f64> {
        let mut lat = self
            .latencies_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        lat
    }
}

/// A TCP proxy on 127.0.0.1 in front of the broker that can cut every connection and refuse new
/// ones, to play a broker outage.
struct Cutter {
    addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Cutter {
    /// With `tls`, the cutter terminates TLS: it accepts TLS and speaks plain TCP upstream.
    async fn start(
        upstream: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        cancel: CancellationToken,
    ) -> std::io::Result<Cutter> {
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // refused while cut
                }
                let _ = client.set_nodelay(true);
                let mut cut = g.subscribe();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    match tls {
                        None => {
                            let mut client = client;
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                _ = cut.changed() => {}
                            }
                        }
                        Some(acceptor) => {
                            let Ok(mut client) = acceptor.accept(client).await else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                _ = cut.changed() => {}
                            }
                        }
                    }
                });
            }
        });
        Ok(Cutter {
            addr,
            up,
            generation,
        })
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn spawn_counter(port: u16, got: Arc<Received>, cancel: CancellationToken, sparkplug: bool) {
    let on_message = move |doc: serde_json::Value| {
        let Some(samples) = doc["samples"].as_array() else {
            return;
        };
        got.samples
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        got.records.fetch_add(1, Ordering::Relaxed);
        if doc["historical"] == serde_json::Value::Bool(true) {
            got.historical
                .fetch_add(samples.len() as u64, Ordering::Relaxed);
            let now = now_ms() as u64;
            got.last_historical_ms.store(now, Ordering::Relaxed);
            let _ = got.first_historical_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if let Some(ts) = samples.first().and_then(|s| s["ts"].as_f64()) {
            if doc["historical"] == serde_json::Value::Bool(false) {
                got.latencies_ms
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(now_ms() - ts);
            }
        }
    };
    crate::demo::broker::subscribe_json(
        port,
        "bench-subscriber",
        if sparkplug {
            "spBv1.0/bench/DDATA/#"
        } else {
            "edge/bench/#"
        }
        .into(),
        cancel,
        on_message,
    );
}

/// CPU seconds, peak RSS in KiB and bytes written to storage of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStats {
    cpu_s: f64,
    peak_rss_kib: u64,
    write_bytes: Option<u64>,
}

fn proc_stats(pid: u32) -> ProcStats {
    let mut st = ProcStats::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the command name, which is in parentheses and may contain spaces.
        if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of the stat line (11 and 12 after the name).
            st.cpu_s = (ticks(11) + ticks(12)) / 100.0;
        }
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmHWM:") {
                st.peak_rss_kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        }
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            if let Some(v) = line.strip_prefix("write_bytes:") {
                st.write_bytes = v.trim().parse().ok();
            }
        }
    }
    st
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints its figures.
pub async fn run(opts: BenchOptions) -> Result<(), BenchError> {
    let dir = tempdir()?;
    // The subscriber parses every message and lags behind a fast replay: the broker keeps up
    // to 1 GiB for it, so what the bench counts is what the gateway delivered.
    let broker = crate::demo::broker::start_keeping(16 << 20, 64).map_err(setup)?;
    let cancel = CancellationToken::new();
    // The gateway reaches the broker through a proxy that can play an outage; the subscriber
    // connects directly.
    let tls = if opts.tls {
        Some(crate::demo::tls::generate(&dir).map_err(setup)?)
    } else {
        None
    };
    let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
    let cutter = Cutter::start(broker.addr(), acceptor, cancel.clone())
        .await
        .map_err(setup)?;
    let gw_port = cutter.addr.port();
    let mut servers = Vec::new();
    let mut opcua_sim = None;
    let mut rtu_line = None;
    let mut rtu_max = 0.0;
    let devices = if opts.opcua_items > 0 || opts.rtu_baud > 0 {
        0
    } else {
        opts.devices
    };
    for d in 0..devices {
        let dev = SimDevice::new();
        {
            let mut img = dev.image();
            for (i, r) in img.hr.iter_mut().take(opts.tags).enumerate() {
                *r = i as u16;
            }
        }
        wander(
            &dev,
            opts.tags,
            Duration::from_millis(opts.scan_ms),
            d as u64,
        );
        servers.push(
            dev.serve(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(setup)?,
        );
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let cfg_path = dir.join("bench.toml");
    let (config, offered, what) = if opts.opcua_items > 0 {
        let sim = protocols::sim::opcua::SimOpcUa::start(protocols::sim::opcua::SimOptions {
            pki_dir: dir.join("sim-pki"),
            bench_variables: opts.opcua_items,
            tick: Duration::from_millis(opts.scan_ms),
            ..Default::default()
        })
        .await
        .map_err(setup)?;
        let config = bench_opcua_config(
            &dir,
            gw_port,
            &sim.endpoint(),
            sim.namespace(),
            opts.opcua_items,
            &opts,
        );
        opcua_sim = Some(sim);
        let offered = opts.opcua_items as f64 * 1000.0 / opts.scan_ms as f64;
        let what = format!(
            "1 OPC UA session ({}) x {} monitored items sampled every {} ms, publishing every {} ms",
            opts.opcua_security, opts.opcua_items, opts.scan_ms, opts.publishing_ms
        );
        (config, offered, what)
    } else if opts.rtu_baud > 0 {
        let mut sim = protocols::sim::rtu::RtuSim::new().emulate_line(opts.rtu_baud, opts.rtu_bits);
        for u in 0..opts.units {
            let dev = SimDevice::new();
            {
                let mut img = dev.image();
                for (i, r) in img.hr.iter_mut().take(opts.rtu_registers).enumerate() {
                    *r = i as u16;
                }
            }
            sim = sim.with_unit(u8::try_from(u + 1).map_err(setup)?, dev);
        }
        let port = dir.join("ttyBENCH");
        rtu_line = Some(sim.serve_pty(&port).map_err(setup)?);
        let config = bench_rtu_config(&dir, gw_port, &port, &opts);
        let timing = protocols::modbus::frame::LineTiming::new(opts.rtu_baud, opts.rtu_bits);
        let per_read = u16::try_from(opts.rtu_registers.min(125)).unwrap_or(125);
        rtu_max = timing.max_registers_per_second(per_read);
        let offered = opts.units as f64 * opts.rtu_registers as f64 * 1000.0 / opts.scan_ms as f64;
        let what = format!(
            "1 RTU line on a pty, {} baud, {} bits per character (timing emulated), {} units x {} registers every {} ms",
            opts.rtu_baud, opts.rtu_bits, opts.units, opts.rtu_registers, opts.scan_ms
        );
        (config, offered, what)
    } else {
        let config = bench_config(&dir, gw_port, &addrs, opts.tags, opts.scan_ms);
        let offered = opts.devices as f64 * opts.tags as f64 * 1000.0 / opts.scan_ms as f64;
        let what = format!(
            "{} devices x {} tags every {} ms",
            opts.devices, opts.tags, opts.scan_ms
        );
        (config, offered, what)
    };
    let what = if opts.tls {
        format!("{what}, MQTT over TLS")
    } else {
        what
    };
    let config = match &tls {
        None => config,
        Some(tls) => config
            .replacen("url = \"mqtt://", "url = \"mqtts://", 1)
            .replacen(
                "max_inflight = 256\n",
                &format!(
                    "max_inflight = 256\nca_file = \"{}\"\n",
                    tls.ca_file.display()
                ),
                1,
            ),
    };
    let (config, what, api_port) = if opts.api {
        // A port free now, for the child to bind: the bench must know where to read.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(setup)?
            .port();
        let config = format!("{config}\n[api]\nlisten = \"127.0.0.1:{port}\"\n");
        let how = if opts.api_idle {
            "API served, not read"
        } else {
            "API read as by a page"
        };
        (config, format!("{what}, {how}"), Some(port))
    } else {
        (config, what, None)
    };
    let sparkplug = opts.format == "sparkplug_b";
    let (config, what) = if sparkplug {
        let config = config.replacen(
            "max_inflight = 256\n",
            "max_inflight = 256\nformat = \"sparkplug_b\"\n",
            1,
        );
        let config = format!("{config}\n[sparkplug]\ngroup_id = \"bench\"\n");
        (config, format!("{what}, Sparkplug B"))
    } else {
        (config, what)
    };
    std::fs::write(&cfg_path, config).map_err(setup)?;
    let api_reads = Arc::new(AtomicU64::new(0));
    if let Some(port) = api_port.filter(|_| !opts.api_idle) {
        tokio::spawn(read_api(port, api_reads.clone(), cancel.clone()));
    }
    let got = Arc::new(Received::default());
    spawn_counter(broker.port(), got.clone(), cancel.clone(), sparkplug);
    tokio::time::sleep(Duration::from_millis(300)).await;

    if opts.hold {
        return hold(&opts, &dir, &cfg_path, &got, cancel, servers, opcua_sim).await;
    }

    let exe = std::env::current_exe().map_err(setup)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("bench-child")
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(BenchError::Spawn)?;
    let pid = child
        .id()
        .ok_or_else(|| BenchError::Child("no pid".into()))?;

    println!(
        "bench: {what} = {offered:.0} samples/s offered; warm-up {} s, measuring {} s",
        opts.warmup, opts.seconds
    );
    tokio::time::sleep(Duration::from_secs(opts.warmup)).await;
    if opts.outage_seconds > 0 {
        outage(&opts, pid, &cutter, &got, offered).await;
    }
    got.latencies_ms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let s0 = proc_stats(pid);
    let n0 = got.samples.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    let s1 = proc_stats(pid);
    let n1 = got.samples.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();

    // SIGTERM, as systemd would, then wait for the clean shutdown.
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    cancel.cancel();

    let samples = (n1 - n0) as f64;
    let lat = got.sorted_latencies();
    let cpu = s1.cpu_s - s0.cpu_s;
    println!(
        "samples/s end to end (received by the subscriber): {:.0}",
        samples / elapsed
    );
    if rtu_max > 0.0 {
        let rate = samples / elapsed;
        println!(
            "RTU registers/s: {rate:.0} of {rtu_max:.0} computed for the line ({:.1}%)",
            rate / rtu_max * 100.0
        );
    }
    println!(
        "gateway CPU: {:.2} s over {:.1} s = {:.0}% of one core",
        cpu,
        elapsed,
        cpu / elapsed * 100.0
    );
    if samples > 0.0 {
        println!(
            "gateway CPU seconds per 100k samples: {:.3}",
            cpu / samples * 100_000.0
        );
    }
    println!(
        "gateway peak RSS: {:.1} MB",
        s1.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "read-to-subscriber latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} records)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len()
    );
    match (s0.write_bytes, s1.write_bytes) {
        (Some(a), Some(b)) => println!(
            "gateway disk writes: {} bytes ({:.3} bytes per sample)",
            b - a,
            (b - a) as f64 / samples.max(1.0)
        ),
        _ => println!("gateway disk writes: not available (/proc/PID/io unreadable)"),
    }
    if api_port.is_some() {
        println!("API reads answered: {}", api_reads.load(Ordering::Relaxed));
    }
    match status {
        Ok(Ok(s)) => println!("gateway exit after SIGTERM: {s}"),
        _ => println!("gateway did not exit within 15 s of SIGTERM"),
    }
    drop(servers);
    drop(rtu_line);
    if let Some(sim) = opcua_sim {
        sim.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Cuts the gateway off the broker for `--outage-seconds`, restores the link, and reports how
/// the backlog drained.
async fn outage(opts: &BenchOptions, pid: u32, cutter: &Cutter, got: &Received, offered: f64) {
    let s0 = proc_stats(pid);
    let h0 = got.historical.load(Ordering::Relaxed);
    println!(
        "outage: broker unreachable for {} s ({:.0} samples offered meanwhile)",
        opts.outage_seconds,
        offered * opts.outage_seconds as f64
    );
    cutter.set(false);
    tokio::time::sleep(Duration::from_secs(opts.outage_seconds)).await;
    let s_cut = proc_stats(pid);
    let h_cut = got.historical.load(Ordering::Relaxed);
    got.first_historical_ms.store(0, Ordering::Relaxed);
    cutter.set(true);
    let restored = Instant::now();
    let restored_ms = now_ms() as u64;
    got.latencies_ms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    // Drained when replayed records have stopped arriving for 3 s.
    let give_up = restored + Duration::from_secs(opts.outage_seconds * 10 + 60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = got.last_historical_ms.load(Ordering::Relaxed);
        let quiet = (now_ms() as u64).saturating_sub(last);
        if (last > restored_ms && quiet > 3000) || Instant::now() > give_up {
            break;
        }
    }
    let s1 = proc_stats(pid);
    let replayed = got.historical.load(Ordering::Relaxed) - h0;
    let last = got.last_historical_ms.load(Ordering::Relaxed);
    let first = got.first_historical_ms.load(Ordering::Relaxed);
    let drain_s = last.saturating_sub(restored_ms) as f64 / 1000.0;
    let reconnect_s = first.saturating_sub(restored_ms) as f64 / 1000.0;
    let replay_s = last.saturating_sub(first) as f64 / 1000.0;
    println!(
        "outage: {replayed} samples replayed with historical=true ({} before the link was back), \
         drained {drain_s:.1} s after the link came back ({reconnect_s:.1} s of it reconnecting)",
        h_cut - h0
    );
    if replay_s > 0.0 {
        let rate = (replayed - (h_cut - h0)) as f64 / replay_s;
        println!(
            "outage: replay rate {rate:.0} samples/s ({:.1}x the live load) while live data kept flowing; \
             a 10-minute outage of this load drains in {:.0} s",
            rate / offered.max(1.0),
            offered * 600.0 / rate
        );
    }
    let lat = got.sorted_latencies();
    println!(
        "outage: live latency during the drain: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    if let (Some(a), Some(b)) = (s0.write_bytes, s_cut.write_bytes) {
        println!(
            "outage: gateway disk writes while cut off: {:.1} MB ({:.1} bytes per sample offered)",
            (b - a) as f64 / 1e6,
            (b - a) as f64 / (offered * opts.outage_seconds as f64).max(1.0)
        );
    }
    println!(
        "outage: gateway peak RSS so far {:.1} MB, CPU {:.2} s over the outage and drain",
        s1.peak_rss_kib as f64 / 1024.0,
        s1.cpu_s - s0.cpu_s
    );
}

/// Reads the gateway's API on `port` as a status page and a Prometheus server would, counting
/// the answers with status 200, until cancelled.
async fn read_api(port: u16, answered: Arc<AtomicU64>, cancel: CancellationToken) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    for round in 0u64.. {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut paths = vec!["/api/devices", "/api/tags"];
        if round % 5 == 0 {
            paths.push("/api/history");
        }
        if round % 8 == 0 {
            paths.push("/metrics");
        }
        for path in paths {
            let Ok(Ok(mut stream)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            else {
                continue;
            };
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let mut body = Vec::new();
            let read = async {
                stream.write_all(request.as_bytes()).await?;
                stream.read_to_end(&mut body).await
            };
            if matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(Ok(_))
            ) && body.starts_with(b"HTTP/1.1 200")
            {
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The `--hold` profiling hook: serves the simulator and broker for an externally started
/// gateway child and prints what the subscriber receives every five seconds.
async fn hold(
    opts: &BenchOptions,
    dir: &Path,
    cfg_path: &Path,
    got: &Received,
    cancel: CancellationToken,
    servers: Vec<protocols::sim::modbus::SimServer>,
    opcua_sim: Option<protocols::sim::opcua::SimOpcUa>,
) -> Result<(), BenchError> {
    println!("bench --hold: config {}", cfg_path.display());
    println!(
        "bench --hold: start `edge-gateway bench-child --config {}`",
        cfg_path.display()
    );
    let end = Instant::now() + Duration::from_secs(opts.warmup + opts.seconds);
    let mut last = (Instant::now(), got.samples.load(Ordering::Relaxed));
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = (Instant::now(), got.samples.load(Ordering::Relaxed));
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        println!("bench --hold: {rate:.0} samples/s received");
        last = now;
    }
    cancel.cancel();
    drop(servers);
    if let Some(sim) = opcua_sim {
        sim.stop().await;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn tempdir() -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("edge-gateway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(setup)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: BenchOptions,
    }

    #[test]
    fn bench_configs_are_valid_configs() {
        let dir = Path::new("/tmp/bench");
        let addrs = [SocketAddr::from(([127, 0, 0, 1], 5020))];
        let modbus = bench_config(dir, 1883, &addrs, 3, 100);
        let cfg = crate::config::parse(&modbus, "bench.toml").unwrap();
        assert_eq!(cfg.devices[0].tag_count(), 3);

        let opts = Cli::parse_from(["bench", "--opcua-security", "Aes256_Sha256_RsaPss"]).opts;
        let opcua = bench_opcua_config(dir, 1883, "opc.tcp://127.0.0.1:4840/", 2, 5, &opts);
        let cfg = crate::config::parse(&opcua, "bench.toml").unwrap();
        assert_eq!(cfg.devices[0].tag_count(), 5);

        let opts = Cli::parse_from(["bench", "--rtu-baud", "19200", "--units", "2"]).opts;
        let rtu = bench_rtu_config(dir, 1883, Path::new("/tmp/bench/tty"), &opts);
        let cfg = crate::config::parse(&rtu, "bench.toml").unwrap();
        assert_eq!(cfg.devices[0].tag_count(), 250);
    }
}
