//! The disk buffer alone, driven by a script, for the crash-point tests:
//! `buffer-script DIR OP ARGS... [OP ARGS...]`.
//!
//! Operations:
//! - `open ROTATE_AFTER ROTATE_DRAINED`: `Buffer::open_with(DIR, ...)`; prints
//!   `opened records=N quarantined=GENERATIONS lost=0|1`. A failed open prints `open failed: ERROR`
//!   and exits with status 2.
//! - `commit A B`: commits the records `A..=B` in one batch (their content is [`payload`] of
//!   their seq).
//! - `ack A B`: deletes the records `A..=B` (as after their PUBACKs).
//! - `close`: flushes and syncs.
//! - `audit`: reads every record and prints `record SEQ same` or `record SEQ different`.
//!
//! After each operation returns it prints `done OP A B` (flushed), and, when the power-cut shim
//! counts persistence points into the file `POWERCUT_POINTS` names, `points` and the counts
//! as they are then, on one line. A failed commit, ack or close prints `failed OP: ERROR`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use edge_gateway::buffer::{Buffer, Record, NO_FLAG};

/// The content of record `seq`, the same in every run.
fn payload(seq: u64) -> Vec<u8> {
    let filler = "x".repeat(150 + (seq % 97) as usize);
    format!(
        "{{\"seq\":{seq},\"value\":{},\"data\":\"{filler}\"}}",
        seq * 7
    )
    .into_bytes()
}

fn record(seq: u64) -> Arc<Record> {
    Arc::new(Record {
        seq,
        topic: format!("plant/line-{}/m", seq % 3).into(),
        payload: payload(seq).into(),
        flag_offset: NO_FLAG,
    })
}

fn same(r: &Record) -> bool {
    *r == *record(r.seq)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `points` and the shim's counts, on one line.
fn points() {
    let Some(path) = std::env::var_os("POWERCUT_POINTS") else {
        return;
    };
    let text = std::fs::read_to_string(PathBuf::from(path)).unwrap_or_default();
    say(&format!(
        "points {}",
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    ));
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: buffer-script DIR OP ARGS..."));
    let args: Vec<String> = args.collect();
    let num = |s: Option<&String>| -> u64 {
        s.and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a number expected, got {s:?}"))
    };
    let mut buffer: Option<Buffer> = None;
    let mut i = 0;
    points();
    while i < args.len() {
        let op = args[i].as_str();
        match op {
            "open" => {
                let (ra, rd) = (num(args.get(i + 1)), num(args.get(i + 2)));
                i += 3;
                match Buffer::open_with(&dir, ra, rd) {
                    Ok((b, report)) => {
                        say(&format!(
                            "opened records={} quarantined={} lost={}",
                            report.records,
                            report.quarantined.len(),
                            u8::from(report.lost_commits.is_some())
                        ));
                        buffer = Some(b);
                    }
                    Err(e) => {
                        say(&format!("open failed: {e}"));
                        return ExitCode::from(2);
                    }
                }
                say("done open");
            }
            "commit" | "ack" => {
                let (a, b) = (num(args.get(i + 1)), num(args.get(i + 2)));
                i += 3;
                let buf = buffer.as_ref().expect("open first");
                let result = if op == "commit" {
                    let records: Vec<Arc<Record>> = (a..=b).map(record).collect();
                    buf.commit(&records).map(drop)
                } else {
                    buf.remove(&(a..=b).collect::<Vec<u64>>())
                };
                match result {
                    Ok(()) => say(&format!("done {op} {a} {b}")),
                    Err(e) => say(&format!("failed {op}: {e}")),
                }
            }
            "close" => {
                i += 1;
                let buf = buffer.as_ref().expect("open first");
                match buf.close() {
                    Ok(()) => say("done close"),
                    Err(e) => say(&format!("failed close: {e}")),
                }
            }
            "audit" => {
                i += 1;
                let buf = buffer.as_ref().expect("open first");
                match buf.read_range(0, u64::MAX, usize::MAX, |_| false) {
                    Ok(records) => {
                        for r in records {
                            let verdict = if same(&r) { "same" } else { "different" };
                            say(&format!("record {} {verdict}", r.seq));
                        }
                        say("done audit");
                    }
                    Err(e) => say(&format!("failed audit: {e}")),
                }
            }
            other => panic!("unknown operation `{other}`"),
        }
        points();
    }
    ExitCode::SUCCESS
}
