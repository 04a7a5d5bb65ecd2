//! `test`: poll every enabled device of a config once and print what `run` would publish,
//! without a broker, a buffer or the data directory (Telegraf's `--test`, for commissioning).
//!
//! The real drivers run, each with its own cancellation, into a channel that only this command
//! reads. A tag is done at its first sample (good or bad: a driver reports a device it cannot
//! reach as bad samples of every tag), so each scan class of a Modbus device is read once. A
//! device whose tags have not all reported by the deadline is stopped, and its silent tags are
//! listed as bad with the reason `no sample`. The records are the JSON of the `json` encoder
//! with boot 0 and seqs from 0: the only parts of the payload that `run` sets differently. With
//! `format = "sparkplug_b"` they are the DDATA payloads, decoded to JSON with metric names (no
//! `seq`: the session sets it at send time; no births: they need a broker session).
//!
//! Invariant: `Tally::seen[d][t]` is set exactly once, by the first sample of tag `t` of
//! device `d`, and a record is printed only when it set at least one of them.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocols::driver::{DeviceStatus, DriverContext, Emitter};
use protocols::model::{Batch, Catalog, DeviceId, Quality, Sample, Value};
use protocols::{modbus, opcua};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, DeviceKind, DeviceSettings};
use crate::encode::json::JsonEncoder;

/// Added to each device's own longest wait (scan interval and timeout) before its silent tags
/// count as bad: connecting, a name lookup, an OPC UA session.
const SLACK: Duration = Duration::from_secs(10);

/// Options of `edge-gateway test`.
#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// The TOML config file.
    #[arg(short, long)]
    pub config: PathBuf,
}

/// Why `test` could not poll at all.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// The config file is not valid (the same problems `check` lists).
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
}

/// What a dry run found: the text to print and whether every tag was good.
#[derive(Debug)]
pub struct DryRun {
    /// The records, then one line per tag, then a summary line.
    pub text: String,
    /// Whether every tag of every enabled device had a good first sample.
    pub all_good: bool,
}

/// The first sample of each tag, and whether each has arrived.
struct Tally {
    seen: Vec<Vec<Option<Sample>>>,
    missing: usize,
}

impl Tally {
    fn new(catalog: &Catalog) -> Self {
        let seen: Vec<Vec<Option<Sample>>> = catalog
            .devices()
            .map(|(_, d)| vec![None; d.tags.len()])
            .collect();
        let missing = seen.iter().map(Vec::len).sum();
        Tally { seen, missing }
    }

    /// Takes the batch's first samples of tags not seen yet; true when there was one.
    fn take(&mut self, batch: &Batch) -> bool {
        let Some(tags) = self.seen.get_mut(batch.device.0 as usize) else {
            return false;
        };
        let mut new = false;
        for s in &batch.samples {
            if let Some(slot @ None) = tags.get_mut(s.tag.0 as usize) {
                *slot = Some(s.clone());
                self.missing -= 1;
                new = true;
            }
        }
        new
    }

    fn device_done(&self, device: DeviceId) -> bool {
        self.seen
            .get(device.0 as usize)
            .is_none_or(|tags| tags.iter().all(Option::is_some))
    }
}

/// How long a device may take to report every tag once.
fn device_deadline(d: &DeviceSettings) -> Duration {
    let own = match &d.kind {
        DeviceKind::Modbus(m) => {
            let longest = m
                .units
                .iter()
                .flat_map(|u| u.tags.iter().map(|t| t.scan_interval))
                .max()
                .unwrap_or(d.scan_interval);
            // A unit that does not answer costs a timeout per scan class before it goes bad.
            let classes = m.units.iter().map(|u| u.tags.len()).sum::<usize>().min(8) as u32;
            longest + m.timeout * (classes + 1)
        }
        DeviceKind::OpcUa(o) => o.scan_interval.max(o.publishing_interval) + o.timeout * 2,
    };
    own + SLACK
}

/// The catalog of published devices (a Modbus line's units each as `line/unit`), with the
/// ids of each config device's published devices, as `run` names them.
fn catalog_of(config: &Config) -> (Catalog, Vec<Vec<DeviceId>>) {
    let mut catalog = Catalog::default();
    let ids = config
        .devices
        .iter()
        .map(|d| crate::pipeline::add_to_catalog(&mut catalog, d))
        .collect();
    (catalog, ids)
}

/// Loads the config at `path`, polls its devices once and says what `run` would publish.
pub async fn run(args: &TestArgs) -> Result<DryRun, DryRunError> {
    let config = config::load(&args.config)?;
    Ok(poll(&config).await)
}

/// Polls every device of `config` once (see the module doc).
pub async fn poll(config: &Config) -> DryRun {
    let (catalog, ids) = catalog_of(config);
    let (tx, mut rx) = mpsc::channel::<Batch>(64);
    let mut stops = Vec::new();
    let mut drivers = Vec::new();
    let start = tokio::time::Instant::now();
    for (d, ids) in config.devices.iter().zip(&ids) {
        let cancel = CancellationToken::new();
        let contexts: Vec<DriverContext> = ids
            .iter()
            .map(|&id| DriverContext {
                device: id,
                name: catalog
                    .device(id)
                    .map_or_else(|| d.name.clone(), |e| e.name.clone()),
                emitter: Emitter::new(tx.clone()),
                cancel: cancel.clone(),
                status: Arc::new(DeviceStatus::default()),
                writes: None,
            })
            .collect();
        let kind = d.kind.clone();
        drivers.push(tokio::spawn(async move {
            let mut contexts = contexts;
            let result = match kind {
                DeviceKind::Modbus(m) => modbus::driver::run(m, contexts).await,
                DeviceKind::OpcUa(o) => match contexts.pop() {
                    Some(ctx) => opcua::driver::run(o, ctx).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "driver stopped");
            }
        }));
        stops.push((ids.clone(), cancel, start + device_deadline(d)));
    }
    drop(tx);

    let mqtt = &config.mqtt;
    let topic = |device: &str| mqtt.topic.render(mqtt, &config.gateway.id, device);
    let sparkplug = mqtt.sparkplug.as_ref().map(|sp| {
        let topics = crate::encode::sparkplug::Topics::new(&sp.group_id, &sp.edge_node_id);
        crate::encode::sparkplug::SparkplugEncoder::new(&topics, 0, &catalog)
    });
    let mut encoder = match sparkplug {
        Some(e) => crate::encode::Encoder::Sparkplug(e),
        None => {
            crate::encode::Encoder::Json(JsonEncoder::new(&config.gateway.id, 0, topic, &catalog))
        }
    };
    // A Sparkplug payload is printed decoded, metrics named (DDATA has aliases only).
    let name_of = |alias: u64| {
        let device = protocols::model::DeviceId(((alias >> 32) as u32).checked_sub(1)?);
        let tag = protocols::model::TagId(alias as u32);
        catalog.tag_name(device, tag).map(|n| n.to_string())
    };
    let mut tally = Tally::new(&catalog);
    let mut text = String::new();
    let mut seq = 0u64;
    while tally.missing > 0 {
        let Some(deadline) = stops
            .iter()
            .filter(|(_, c, _)| !c.is_cancelled())
            .map(|(_, _, at)| *at)
            .min()
        else {
            break;
        };
        // `None`: a device's deadline passed; it is stopped below.
        let batch = tokio::select! {
            b = rx.recv() => match b {
                Some(b) => Some(b),
                None => break,
            },
            () = tokio::time::sleep_until(deadline) => None,
        };
        if let Some(batch) = batch.filter(|b| tally.take(b)) {
            let record = encoder.encode(seq, &batch);
            seq += 1;
            let payload = match &encoder {
                crate::encode::Encoder::Sparkplug(_) => {
                    crate::encode::sparkplug::describe(&record.payload, name_of)
                }
                crate::encode::Encoder::Json(_) => {
                    String::from_utf8_lossy(&record.payload).into_owned()
                }
            };
            let _ = writeln!(text, "{} {payload}", record.topic);
        }
        let now = tokio::time::Instant::now();
        for (ids, cancel, at) in &stops {
            if !cancel.is_cancelled() && (ids.iter().all(|&i| tally.device_done(i)) || *at <= now) {
                cancel.cancel();
            }
        }
    }
    for (_, cancel, _) in &stops {
        cancel.cancel();
    }
    for d in drivers {
        let _ = d.await;
    }
    let (lines, all_good) = tag_lines(&catalog, &tally);
    text.push_str(&lines);
    DryRun { text, all_good }
}

/// One line per tag (`device  tag  quality  value or reason`) and a summary line.
fn tag_lines(catalog: &Catalog, tally: &Tally) -> (String, bool) {
    let mut out = String::new();
    let (mut good, mut total) = (0usize, 0usize);
    for ((_, device), samples) in catalog.devices().zip(&tally.seen) {
        for (tag, sample) in device.tags.iter().zip(samples) {
            total += 1;
            let what = match sample {
                Some(s) if s.quality == Quality::Good => {
                    good += 1;
                    format!("good  {}", value_text(s.value.as_ref()))
                }
                Some(s) => match s.quality.reason() {
                    Some(r) => format!("{}  {r}", s.quality.name()),
                    None => s.quality.name().to_string(),
                },
                None => "bad  no sample".to_string(),
            };
            let _ = writeln!(out, "{}  {tag}  {what}", device.name);
        }
    }
    let _ = writeln!(out, "{good} of {total} tags good");
    (out, good == total)
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        None => "null".into(),
        Some(v) => {
            let mut out = Vec::new();
            crate::encode::json::write_value(&mut out, v);
            String::from_utf8_lossy(&out).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::model::{Reason, TagId, Timestamp};

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.add_device("press".into(), vec!["speed".into(), "temp".into()]);
        c
    }

    fn batch(samples: Vec<Sample>) -> Batch {
        Batch {
            device: DeviceId(0),
            samples,
            read_at: std::time::Instant::now(),
        }
    }

    #[test]
    fn a_tag_counts_its_first_sample_only_and_a_repeat_prints_no_record() {
        let c = catalog();
        let mut t = Tally::new(&c);
        let first = batch(vec![Sample::good(TagId(0), Value::UInt(7), Timestamp(1))]);
        assert!(t.take(&first));
        assert!(!t.take(&first), "the same tag again adds nothing");
        assert_eq!(t.missing, 1);
        assert!(!t.device_done(DeviceId(0)));
        let bad = batch(vec![Sample::bad(TagId(1), Reason::Timeout, Timestamp(2))]);
        assert!(t.take(&bad));
        assert!(t.device_done(DeviceId(0)));
        let (lines, all_good) = tag_lines(&c, &t);
        assert!(!all_good);
        assert!(lines.contains("press  speed  good  7"), "{lines}");
        assert!(lines.contains("press  temp  bad  timeout"), "{lines}");
        assert!(lines.ends_with("1 of 2 tags good\n"), "{lines}");
    }

    #[test]
    fn a_tag_without_any_sample_is_bad_with_no_sample() {
        let c = catalog();
        let mut t = Tally::new(&c);
        t.take(&batch(vec![Sample::good(
            TagId(0),
            Value::Bool(true),
            Timestamp(1),
        )]));
        let (lines, all_good) = tag_lines(&c, &t);
        assert!(!all_good);
        assert!(lines.contains("press  temp  bad  no sample"), "{lines}");
    }
}
