//! The `edge-gateway` command: run, check, test, schema, browse, read, demo and bench.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "demo")]
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_gateway::{config, pipeline, service};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: the start-up's garbage (a parsed 10k-tag config is
/// about 13 MB) is returned to the system instead of staying resident between long-lived
/// allocations; its options are compiled in (`.cargo/config.toml`).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "edge-gateway",
    version,
    about = "Industrial edge gateway: Modbus and OPC UA devices to MQTT, losing nothing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines for a person (colour only on a terminal, never with NO_COLOR set) or JSON
    /// lines for a journal or a log shipper.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// The least severe level logged (error, warn, info, debug, trace) or a filter such as
    /// `info,protocols=debug`; without it RUST_LOG, then the command's own default.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// How the log is written, from the command line.
struct LogOptions {
    format: LogFormat,
    level: Option<String>,
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
    /// Poll every enabled device of a config once and print the records `run` would publish
    /// and each tag's quality, without a broker, a buffer or the data directory; exit 0 when
    /// every tag was good, 1 when not, 2 when the config is not valid.
    Test(edge_gateway::cli::dry_run::TestArgs),
    /// Print a JSON Schema of the config file, for editors (Taplo / Even Better TOML): save it
    /// beside the config and start the config with `#:schema ./gateway.schema.json`. With
    /// `--payload`, the JSON Schema of what a consumer receives instead (records, meta and
    /// status messages, under `$defs`).
    Schema {
        /// Print the schema of the MQTT payloads (JSON mode), not of the config file.
        #[arg(long)]
        payload: bool,
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
    /// Subscribe like a cloud consumer and report per gateway and boot what arrived: records,
    /// samples, seq holes (losses), duplicates, the historical share and read-to-arrival
    /// latency; exit 1 when a seq is missing, 2 when the settings are not valid.
    Audit(edge_gateway::cli::audit::AuditArgs),
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

/// Colour only for a person at a terminal, and never when `NO_COLOR` is set to anything
/// (<https://no-color.org>).
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The filter: `--log-level`, else RUST_LOG, else `default`; the noisy libraries stay quiet
/// unless the filter names them.
fn log_filter(default: &str, level: Option<&str>) -> anyhow::Result<EnvFilter> {
    if let Some(level) = level {
        return EnvFilter::try_new(format!("{QUIET_LIBRARIES},{level}"))
            .with_context(|| format!("--log-level {level:?} is not a level or filter"));
    }
    Ok(EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},{QUIET_LIBRARIES}"))))
}

fn init_tracing(default: &str, opts: &LogOptions) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let filter = log_filter(default, opts.level.as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match opts.format {
        LogFormat::Human => builder
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        // One JSON object a line, the event's fields at the top level next to `level`,
        // `target` and `timestamp`: what journald, Loki or Vector take as it is.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    edge_gateway::buffer::contain_sled_panic_reports();
    Ok(())
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
    // Under systemd (Type=notify): READY now that the pipeline runs, then STATUS= and, while
    // the pipeline moves, WATCHDOG=1 at each look. Nothing at all without NOTIFY_SOCKET.
    let mut notifier = service::Notifier::from_env();
    // A reload of [mqtt] leaves the new publisher waiting for the old one to drain (at most
    // shutdown_grace): that is no stall.
    let patience = |running: &pipeline::Running, notifier: &service::Notifier| {
        notifier
            .watchdog()
            .unwrap_or(std::time::Duration::from_secs(30))
            + running.config().mqtt.shutdown_grace
    };
    let mut progress = service::Progress::new(patience(&running, &notifier));
    let mut look = tokio::time::interval(notifier.look_interval());
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_look = tokio::time::Instant::now();
    notifier.ready(&running.status());
    // SIGHUP reloads the file (`systemctl reload`); a file that fails check is refused and the
    // running config stays (reload_file logs and counts it).
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    // `POST /api/reload` asks this loop, which owns the running gateway, and waits for the
    // outcome.
    type Reply = tokio::sync::oneshot::Sender<Result<String, String>>;
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<Reply>(4);
    running.set_reload_hook(std::sync::Arc::new(move || {
        let tx = reload_tx.clone();
        Box::pin(async move {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            tx.send(reply)
                .await
                .map_err(|_| "the gateway is shutting down".to_owned())?;
            outcome
                .await
                .unwrap_or_else(|_| Err("the gateway is shutting down".to_owned()))
        })
    }));
    let mut stalled = false;
    loop {
        #[cfg(unix)]
        let reload = hangup.recv();
        #[cfg(not(unix))]
        let reload = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = look.tick(), if notifier.enabled() => {
                let now = tokio::time::Instant::now();
                let verdict = progress.observe(running.progress(), now - last_look);
                last_look = now;
                if let Err(stall) = verdict {
                    if !stalled {
                        warn!(%stall, "the pipeline makes no progress: the watchdog is not pinged (systemd restarts the gateway unless it moves again)");
                    }
                } else if stalled {
                    info!("the pipeline moves again");
                }
                stalled = verdict.is_err();
                notifier.look(&running.status(), verdict);
            }
            _ = reload => {
                notifier.reloading();
                let _ = reload_pinging(&mut running, &path, &mut notifier, &mut look).await;
                progress = service::Progress::new(patience(&running, &notifier));
                notifier.ready(&running.status());
            }
            Some(reply) = reload_rx.recv() => {
                notifier.reloading();
                let reloaded = reload_pinging(&mut running, &path, &mut notifier, &mut look).await;
                progress = service::Progress::new(patience(&running, &notifier));
                notifier.ready(&running.status());
                let outcome = match reloaded {
                    Ok(plan) => Ok(format!(
                        "reloaded: {} unchanged, {} changed, {} added, {} removed, mqtt {}",
                        plan.unchanged.len(),
                        plan.changed.len(),
                        plan.added.len(),
                        plan.removed.len(),
                        if plan.mqtt_changed { "reconnected" } else { "unchanged" }
                    )),
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(outcome);
            }
        }
    }
    notifier.stopping();
    running.shutdown().await;
    Ok(())
}

/// Reloads the file while the watchdog keeps being pinged at each look (see
/// [`service::Notifier::reload_ping`]).
async fn reload_pinging(
    running: &mut edge_gateway::pipeline::Running,
    path: &std::path::Path,
    notifier: &mut service::Notifier,
    look: &mut tokio::time::Interval,
) -> Result<edge_gateway::pipeline::reload::Plan, edge_gateway::pipeline::ReloadError> {
    let reload = running.reload_file(path);
    tokio::pin!(reload);
    loop {
        tokio::select! {
            outcome = &mut reload => return outcome,
            _ = look.tick(), if notifier.enabled() => notifier.reload_ping(),
        }
    }
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
    if let Command::Schema { payload } = &cli.command {
        // A closed pipe (`| head`) is no error worth a panic.
        let _ = if *payload {
            write!(
                std::io::stdout(),
                "{}",
                edge_gateway::encode::schema::payload_schema_text()
            )
        } else {
            writeln!(std::io::stdout(), "{}", config::schema_json())
        };
        return ExitCode::SUCCESS;
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
    let log = LogOptions {
        format: cli.log_format,
        level: cli.log_level,
    };
    let result = runtime.block_on(async move {
        let done: anyhow::Result<()> = match cli.command {
            Command::Run { config } => {
                init_tracing("info", &log)?;
                run_gateway(config).await
            }
            #[cfg(feature = "demo")]
            Command::BenchChild { config } => {
                init_tracing("warn", &log)?;
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
                init_tracing("warn", &log)?;
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
                init_tracing("warn", &log)?;
                edge_gateway::demo::bench::run(opts)
                    .await
                    .map_err(Into::into)
            }
            Command::Browse(args) => {
                init_tracing("error", &log)?;
                let text = edge_gateway::cli::browse::run(&args).await?;
                print!("{text}");
                Ok(())
            }
            Command::Test(args) => {
                init_tracing("warn", &log)?;
                return Ok(match edge_gateway::cli::dry_run::run(&args).await {
                    Ok(found) => {
                        print!("{}", found.text);
                        if found.all_good {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::FAILURE
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::from(2)
                    }
                });
            }
            Command::Audit(args) => {
                init_tracing("warn", &log)?;
                return Ok(
                    match edge_gateway::cli::audit::run(&args, shutdown_signal()).await {
                        Ok(found) => {
                            print!("{}", found.text);
                            if found.holes {
                                ExitCode::FAILURE
                            } else {
                                ExitCode::SUCCESS
                            }
                        }
                        Err(e) => {
                            eprintln!("{e}");
                            ExitCode::from(2)
                        }
                    },
                );
            }
            Command::Read(args) => {
                init_tracing("error", &log)?;
                let text = edge_gateway::cli::read::run(&args).await?;
                print!("{text}");
                Ok(())
            }
            Command::Check { .. } | Command::Schema { .. } => Ok(()),
        };
        done.map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color_set() {
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some("1".into())));
        assert!(
            colour(true, Some("".into())),
            "an empty NO_COLOR is unset by the convention"
        );
    }

    #[test]
    fn a_log_level_that_is_no_filter_is_refused() {
        assert!(log_filter("info", Some("debug")).is_ok());
        assert!(log_filter("info", Some("info,protocols=trace")).is_ok());
        assert!(log_filter("info", Some("info,protocols=loudest")).is_err());
    }
}
