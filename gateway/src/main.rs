//! The `edge-gateway` command: run, check, browse, read, demo and bench.

use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "demo")]
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_gateway::{config, pipeline};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "edge-gateway",
    version,
    about = "Industrial edge gateway: Modbus and OPC UA devices to MQTT, losing nothing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway on real devices and a real broker.
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file without touching the network; exit 0 when valid, 2 when not.
    Check {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    #[cfg(feature = "demo")]
    /// Run simulated Modbus devices and an OPC UA server, an embedded MQTT broker on 127.0.0.1 and the real pipeline
    /// between them, with a live view of the values as a subscriber receives them.
    Demo {
        /// Number of simulated devices.
        #[arg(long, default_value_t = 2)]
        devices: usize,
        /// Scan interval of every tag (e.g. 250ms, 1s; at least 1ms).
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        scan_interval: Duration,
        /// Where the disk buffer lives (default: a folder in the system's temp directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
        /// Print one status line every two seconds instead of a refreshing screen.
        #[arg(long)]
        plain: bool,
    },
    /// Browse an OPC UA server's address space: a tree of objects and variables (node id, data
    /// type, access), or with `--format toml` ready-to-paste `[[devices.tags]]` entries.
    Browse(edge_gateway::cli::browse::BrowseArgs),
    /// One Modbus read, printed raw and decoded as every type and word order: `--device NAME
    /// --config FILE`, or a line given by `--tcp`, `--rtu-over-tcp` or `--serial` flags.
    Read(edge_gateway::cli::read::ReadArgs),
    #[cfg(feature = "demo")]
    /// Measure the whole pipeline: simulated devices → gateway (a child process) → broker →
    /// subscriber; prints samples/s, CPU per 100k samples, peak RSS, latency and disk writes.
    Bench(edge_gateway::demo::bench::BenchOptions),
    #[cfg(feature = "demo")]
    /// The gateway process that `bench` starts (not for direct use).
    #[command(hide = true)]
    BenchChild {
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[cfg(feature = "demo")]
fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

/// async-opcua logs every failed reconnect attempt at warn or error; the driver reports each
/// outage once with what to do, so the library stays quiet unless RUST_LOG asks for it.
const QUIET_LIBRARIES: &str =
    "rumqttd=off,opcua_client=off,opcua_core=off,opcua_crypto=off,opcua_server=off,opcua_nodes=off,opcua_types=off";

fn init_tracing(default: &str) {
    let default = format!("{default},{QUIET_LIBRARIES}");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    edge_gateway::buffer::contain_sled_panic_reports();
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

async fn run_gateway(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut running = pipeline::start(cfg)
        .await
        .with_context(|| format!("starting the gateway from {}", path.display()))?;
    let stop = shutdown_signal();
    // SIGHUP reloads the file (`systemctl reload`); a file that fails check is refused and the
    // running config stays (reload_file logs and counts it).
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    loop {
        #[cfg(unix)]
        let reload = hangup.recv();
        #[cfg(not(unix))]
        let reload = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = reload => {
                let _ = running.reload_file(&path).await;
            }
        }
    }
    running.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { config: path } = &cli.command {
        let (text, ok) = edge_gateway::cli::check::run(path);
        return if ok {
            println!("{text}");
            ExitCode::SUCCESS
        } else {
            eprintln!("{text}");
            ExitCode::from(2)
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                init_tracing("info");
                run_gateway(config).await
            }
            #[cfg(feature = "demo")]
            Command::BenchChild { config } => {
                init_tracing("warn");
                run_gateway(config).await
            }
            #[cfg(feature = "demo")]
            Command::Demo {
                devices,
                scan_interval,
                data_dir,
                seconds,
                plain,
            } => {
                init_tracing("warn");
                let data_dir =
                    data_dir.unwrap_or_else(|| std::env::temp_dir().join("edge-gateway-demo"));
                let opts = edge_gateway::demo::DemoOptions {
                    devices: devices.max(1),
                    scan_interval,
                    data_dir,
                    duration: seconds.map(Duration::from_secs),
                    plain,
                };
                edge_gateway::demo::run(opts, shutdown_signal())
                    .await
                    .map_err(Into::into)
            }
            #[cfg(feature = "demo")]
            Command::Bench(opts) => {
                init_tracing("warn");
                edge_gateway::demo::bench::run(opts)
                    .await
                    .map_err(Into::into)
            }
            Command::Browse(args) => {
                init_tracing("error");
                let text = edge_gateway::cli::browse::run(&args).await?;
                print!("{text}");
                Ok(())
            }
            Command::Read(args) => {
                init_tracing("error");
                let text = edge_gateway::cli::read::run(&args).await?;
                print!("{text}");
                Ok(())
            }
            Command::Check { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
