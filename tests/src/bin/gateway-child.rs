//! The gateway as a child process for crash tests: `gateway-child CONFIG`. Runs until SIGTERM;
//! SIGHUP reloads CONFIG like `edge-gateway run` does.
//!
//! With `GATEWAY_CHILD_METRICS=PATH`, it keeps the gateway's counters in `PATH` (`key=value`
//! lines, replaced atomically every 100 ms and once more after shutdown), so a test can read
//! them from outside the process.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use edge_gateway::metrics::Metrics;
use edge_gateway::pipeline::DeviceHandle;

/// The counters as `key=value` lines.
fn metrics_text(m: &Metrics, devices: &[DeviceHandle], boot: u64) -> String {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let scans: u64 = devices.iter().map(|d| n(&d.status.scans)).sum();
    format!(
        "boot={}\nrecords={}\ncommitted={}\ncommits={}\nevicted={}\nio_errors={}\n\
         buffer_failing={}\nmemory_bytes={}\nbuffer_records={}\npublished={}\nacked={}\n\
         replayed={}\nquarantined={}\nlost_commits={}\nscans={}\nreloads={}\n\
         reloads_refused={}\n",
        boot,
        n(&m.records),
        n(&m.committed),
        n(&m.commits),
        n(&m.evicted),
        n(&m.io_errors),
        u8::from(m.buffer_failing.load(Ordering::Relaxed)),
        n(&m.memory_bytes),
        n(&m.buffer_records),
        n(&m.published),
        n(&m.acked),
        n(&m.replayed),
        n(&m.quarantined),
        n(&m.lost_commits),
        scans,
        n(&m.reloads),
        n(&m.reloads_refused),
    )
}

fn write_metrics(path: &Path, text: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    if std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        eprintln!("gateway-child: cannot write metrics to {}", path.display());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    edge_gateway::buffer::contain_sled_panic_reports();
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: gateway-child CONFIG")?
        .into();
    let cfg = edge_gateway::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut running = edge_gateway::pipeline::start(cfg).await?;
    let metrics_file = std::env::var_os("GATEWAY_CHILD_METRICS").map(PathBuf::from);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = hangup.recv() => {
                let _ = running.reload_file(&path).await;
            }
            _ = tick.tick() => {
                if let Some(file) = &metrics_file {
                    let text = metrics_text(&running.metrics, &running.devices, running.boot);
                    write_metrics(file, &text);
                }
            }
        }
    }
    // The counters live on after shutdown: the last file shows what the final commit did.
    let (metrics, devices, boot) = (
        running.metrics.clone(),
        running.devices.clone(),
        running.boot,
    );
    running.shutdown().await;
    if let Some(file) = &metrics_file {
        write_metrics(file, &metrics_text(&metrics, &devices, boot));
    }
    Ok(())
}
