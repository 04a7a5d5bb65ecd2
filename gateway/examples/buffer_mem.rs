//! Memory, disk and speed of the disk buffer during a long broker outage: commits 470 KB records
//! (a 10k-tag OPC UA scan) that are never acknowledged and prints the process's resident memory,
//! the buffer directory's size and the generations every 100 records.
//!
//! `cargo run --release --example buffer_mem -- [ROTATE_AFTER_BYTES] [RECORDS]`

use std::sync::Arc;
use std::time::Instant;

use edge_gateway::buffer::{Buffer, ROTATE_AFTER, ROTATE_DRAINED};
use edge_gateway::buffer::{Record, NO_FLAG};

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rotate: u64 = args.next().map_or(Ok(ROTATE_AFTER), |a| a.parse())?;
    let records: u64 = args.next().map_or(Ok(600), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let (buffer, _) = Buffer::open_with(&dir.path().join("buffer"), rotate, ROTATE_DRAINED)?;
    let payload = bytes::Bytes::from(vec![b'x'; 470_000]);
    let started = Instant::now();
    for seq in 0..records {
        let record = Record {
            seq,
            topic: "edge/gw/opcua".into(),
            payload: payload.clone(),
            flag_offset: NO_FLAG,
        };
        buffer.commit(&[Arc::new(record)])?;
        if seq % 100 == 99 {
            println!(
                "{} MB committed in {:.1} s: RSS {:.0} MB, buffer on disk {:.0} MB, {} generations ({} open)",
                (seq + 1) * 470 / 1000,
                started.elapsed().as_secs_f64(),
                rss_mb(),
                buffer.disk_usage() as f64 / 1e6,
                buffer.generations(),
                buffer.open_generations(),
            );
        }
    }
    Ok(())
}
