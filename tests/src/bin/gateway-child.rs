//! The gateway as a child process for crash tests: `gateway-child CONFIG`. Runs until SIGTERM.

use std::path::PathBuf;

use anyhow::Context;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: gateway-child CONFIG")?
        .into();
    let cfg = edge_gateway::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = edge_gateway::topology::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    running.shutdown().await;
    Ok(())
}
