//! `edge-gateway audit`: subscribes like a cloud consumer and reports, per gateway and boot,
//! what arrived and what did not ([`tally`]): records and samples, seq holes (losses),
//! duplicates, out-of-order arrivals, the share replayed from disk, read-to-arrival latency.
//! Exit 1 when it saw a hole.
//!
//! The broker, TLS and credentials come from `--config FILE` (its `[mqtt]` section) or from
//! `--url` and the key flags, checked by the same rules as the config file. Payloads are read
//! by a [`Decoder`]: JSON records today; a Sparkplug decoder goes beside [`JsonDecoder`] and
//! yields the same [`Seen`] (the gateway's own boot and seq), chosen by `--format`.

pub mod tally;

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigErrors, MqttSettings};
use crate::publish::subscribe::{Received, SessionEvent, Subscription};
pub use tally::{Seen, StreamReport, Tally};

/// Options of `edge-gateway audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// The broker, as `[mqtt] url` (mqtt://host:port, mqtts://host:port).
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub url: Option<String>,
    /// Take the broker, TLS and credentials from this config file's `[mqtt]` section.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// A topic filter to subscribe to (repeat for more). It must cover every device of the
    /// gateways audited: their seq counts over all devices, so a device left out looks like
    /// losses. `{topic_prefix}/#` does.
    #[arg(long, required = true)]
    pub topic: Vec<String>,
    /// Stop after this many seconds (default: at Ctrl-C or SIGTERM).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Stop once no record has arrived for this many seconds (after the first record): the end
    /// of a test run, a gateway stopped.
    #[arg(long)]
    pub idle: Option<u64>,
    /// User name, as `[mqtt] username` (with `--url`).
    #[arg(long, requires = "url")]
    pub username: Option<String>,
    /// Password file or `credential:NAME`, as `[mqtt] password_file` (with `--url`).
    #[arg(long, requires = "url")]
    pub password_file: Option<String>,
    /// CA certificates (PEM) for an mqtts:// url, as `[mqtt] ca_file`.
    #[arg(long, requires = "url")]
    pub ca_file: Option<String>,
    /// Client certificate (PEM) for mutual TLS, as `[mqtt] cert_file`.
    #[arg(long, requires = "url")]
    pub cert_file: Option<String>,
    /// Client key (PEM), as `[mqtt] key_file`.
    #[arg(long, requires = "url")]
    pub key_file: Option<String>,
    /// The payload format: the gateway's JSON records, or Sparkplug B DDATA (the gateway's
    /// (boot, seq) is each DDATA's `uuid`; the gateway is the edge node id).
    #[arg(long, value_enum, default_value_t = AuditFormat::Json)]
    pub format: AuditFormat,
    /// Print the report as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The payload formats `audit` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    /// The gateway's JSON records.
    Json,
    /// Sparkplug B (`spBv1.0/...`): DDATA are records, everything else is passed over.
    SparkplugB,
}

/// Why `audit` could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The `[mqtt]` settings (from the file or the flags) fail check.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The flags could not be made into settings.
    #[error("audit: {0}")]
    Flags(#[from] toml::ser::Error),
}

/// What a payload was.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A record.
    Record(Seen),
    /// A message that is not a record (status, meta, a cleared retained message).
    Other,
    /// Nothing this decoder reads.
    Garbled,
}

/// Reads payloads of one format.
pub trait Decoder {
    /// What the message on `topic` with `payload` is.
    fn decode(&self, topic: &str, payload: &[u8]) -> Decoded;
}

/// The gateway's JSON payloads (`docs/payload.schema.json`).
#[derive(Debug, Default)]
pub struct JsonDecoder;

impl Decoder for JsonDecoder {
    fn decode(&self, _topic: &str, payload: &[u8]) -> Decoded {
        if payload.is_empty() {
            return Decoded::Other;
        }
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Decoded::Garbled;
        };
        let record = (
            doc["gateway"].as_str(),
            doc["boot"].as_u64(),
            doc["seq"].as_u64(),
            doc["samples"].as_array(),
        );
        match record {
            (Some(gateway), Some(boot), Some(seq), Some(samples)) => Decoded::Record(Seen {
                gateway: gateway.to_owned(),
                boot,
                seq,
                historical: doc["historical"].as_bool().unwrap_or(false),
                sample_ts: samples.iter().filter_map(|s| s["ts"].as_i64()).collect(),
            }),
            _ if doc.get("tags").is_some() || doc.get("state").is_some() => Decoded::Other,
            _ => Decoded::Garbled,
        }
    }
}

/// Sparkplug B: a DDATA on `spBv1.0/{group}/DDATA/{edge node}/{device}` is a record of the
/// gateway named by its edge node id; births, deaths, commands and STATE are passed over.
#[derive(Debug, Default)]
pub struct SparkplugDecoder;

impl Decoder for SparkplugDecoder {
    fn decode(&self, topic: &str, payload: &[u8]) -> Decoded {
        let mut parts = topic.split('/');
        let (Some("spBv1.0"), Some(_group), Some(kind), Some(node)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Decoded::Other;
        };
        if kind != "DDATA" {
            return Decoded::Other;
        }
        match crate::encode::sparkplug::ddata_identity(payload) {
            Some(id) => Decoded::Record(Seen {
                gateway: node.to_owned(),
                boot: id.boot,
                seq: id.seq,
                historical: id.historical,
                sample_ts: id.sample_ts,
            }),
            None => Decoded::Garbled,
        }
    }
}

/// What an audit found.
#[derive(Debug)]
pub struct AuditOutcome {
    /// The report to print.
    pub text: String,
    /// Whether any stream had a hole (exit 1).
    pub holes: bool,
}

/// The `[mqtt]` settings the audit connects with, under a client id of its own (the gateway's
/// would take its session away).
pub fn settings(args: &AuditArgs) -> Result<MqttSettings, AuditError> {
    let mut mqtt = match (&args.config, &args.url) {
        (Some(path), _) => config::load(path)?.mqtt,
        (None, url) => {
            // The flags become a minimal file, checked by the same rules as any config: the
            // url, TLS files and credentials. Its one device is disabled, never polled.
            let mut m = toml::Table::new();
            m.insert("url".into(), url.clone().unwrap_or_default().into());
            let keys = [
                ("username", &args.username),
                ("password_file", &args.password_file),
                ("ca_file", &args.ca_file),
                ("cert_file", &args.cert_file),
                ("key_file", &args.key_file),
            ];
            for (key, value) in keys {
                if let Some(v) = value {
                    m.insert(key.into(), v.clone().into());
                }
            }
            let mut gateway = toml::Table::new();
            gateway.insert("id".into(), "audit".into());
            let mut device = toml::Table::new();
            device.insert("name".into(), "none".into());
            device.insert("protocol".into(), "modbus_tcp".into());
            device.insert("address".into(), "127.0.0.1:502".into());
            device.insert("enabled".into(), false.into());
            let mut root = toml::Table::new();
            root.insert("gateway".into(), gateway.into());
            root.insert("mqtt".into(), m.into());
            root.insert("devices".into(), toml::Value::Array(vec![device.into()]));
            let text = toml::to_string(&root)?;
            config::parse(&text, "command line")?.mqtt
        }
    };
    mqtt.client_id = format!("edge-gateway-audit-{}", std::process::id());
    mqtt.status = false;
    Ok(mqtt)
}

/// Runs the audit until `--seconds` have passed or `stop` is cancelled.
pub async fn run(args: &AuditArgs, stop: CancellationToken) -> Result<AuditOutcome, AuditError> {
    let mqtt = settings(args)?;
    let decoder: Box<dyn Decoder + Send> = match args.format {
        AuditFormat::Json => Box::new(JsonDecoder),
        AuditFormat::SparkplugB => Box::new(SparkplugDecoder),
    };
    let mut sub = Subscription::start(&mqtt, args.topic.clone());
    let mut tally = Tally::default();
    let deadline = args
        .seconds
        .and_then(|s| tokio::time::Instant::now().checked_add(Duration::from_secs(s)));
    let mut lost_logged = false;
    let idle = args.idle.map(Duration::from_secs);
    let mut quiet_from: Option<tokio::time::Instant> = None;
    loop {
        let idle_until = idle
            .zip(quiet_from)
            .and_then(|(i, from)| from.checked_add(i));
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(deadline) => break,
            _ = sleep_until(idle_until) => break,
            n = sub.next() => n,
        };
        match next {
            None => break,
            Some(Received::Session(SessionEvent::Subscribed)) => {
                tracing::info!(host = %mqtt.host, port = mqtt.port, filters = ?args.topic, "subscribed");
                lost_logged = false;
            }
            Some(Received::Session(SessionEvent::Lost(error))) => {
                if !lost_logged {
                    tracing::warn!(host = %mqtt.host, port = mqtt.port, error, "no connection to the broker; retrying");
                    lost_logged = true;
                }
            }
            Some(Received::Message(m)) => match decoder.decode(&m.topic, &m.payload) {
                Decoded::Record(seen) => {
                    let arrival = m
                        .arrival
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    tally.record(&seen, arrival);
                    quiet_from = Some(tokio::time::Instant::now());
                }
                Decoded::Other => tally.other += 1,
                Decoded::Garbled => tally.garbled += 1,
            },
        }
    }
    let reports = tally.report();
    let text = if args.json {
        let doc = serde_json::json!({
            "streams": reports,
            "other_messages": tally.other,
            "garbled_messages": tally.garbled,
            "holes": tally.has_holes(),
        });
        format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        )
    } else {
        render(&tally, &reports)
    };
    Ok(AuditOutcome {
        text,
        holes: tally.has_holes(),
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The report as text: one paragraph per gateway boot, then a verdict.
pub fn render(tally: &Tally, reports: &[StreamReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(out, "gateway {} boot {}:", r.gateway, r.boot);
        let _ = writeln!(
            out,
            "  {} records, {} samples, seq {}..{}, {:.1}% historical",
            r.records,
            r.samples,
            r.first_seq,
            r.last_seq,
            r.historical_share * 100.0
        );
        let _ = writeln!(
            out,
            "  missing {}, duplicates {}, out of order {}",
            r.missing, r.duplicates, r.out_of_order
        );
        if !r.holes.is_empty() {
            let holes: Vec<String> = r
                .holes
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{a}")
                    } else {
                        format!("{a}..{b}")
                    }
                })
                .collect();
            let _ = writeln!(out, "  holes: {}", holes.join(", "));
        }
        match &r.latency_ms {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "  read-to-arrival (live samples): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
                    p.p50, p.p90, p.p99, p.max
                );
            }
            None => {
                let _ = writeln!(out, "  read-to-arrival: no live samples");
            }
        }
    }
    let verdict = if tally.has_holes() {
        "LOSS: seqs are missing (see holes)"
    } else if tally.records() == 0 {
        "no records received"
    } else {
        "no hole"
    };
    let _ = writeln!(
        out,
        "{} gateway boots, {} records; {} other messages, {} unreadable; {verdict}",
        reports.len(),
        tally.records(),
        tally.other,
        tally.garbled
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkplug_ddata_are_records_of_their_edge_node_and_a_replay_is_historical() {
        use crate::encode::sparkplug::{historical, with_seq, SparkplugEncoder, Topics};
        use protocols::model::{Batch, Catalog, DeviceId, Sample, TagId, Timestamp, Value};
        let mut catalog = Catalog::default();
        catalog.add_device("press7".into(), vec!["sine".into()]);
        let mut encoder = SparkplugEncoder::new(&Topics::new("plant", "edge-01"), 4, &catalog);
        let batch = Batch {
            device: DeviceId(0),
            samples: vec![Sample::good(TagId(0), Value::Float(0.5), Timestamp(1_000))],
            read_at: std::time::Instant::now(),
        };
        let record = encoder.encode(42, &batch);
        let live = with_seq(&record.payload, 9);
        let d = SparkplugDecoder;
        let seen = |historical| {
            Decoded::Record(Seen {
                gateway: "edge-01".into(),
                boot: 4,
                seq: 42,
                historical,
                sample_ts: vec![1_000],
            })
        };
        assert_eq!(d.decode(&record.topic, &live), seen(false));
        assert_eq!(d.decode(&record.topic, &historical(&live)), seen(true));
        assert_eq!(
            d.decode("spBv1.0/plant/NBIRTH/edge-01", &live),
            Decoded::Other
        );
        assert_eq!(d.decode("spBv1.0/STATE/scada", b"{}"), Decoded::Other);
        assert_eq!(d.decode(&record.topic, b"\xff\xff"), Decoded::Garbled);
    }

    #[test]
    fn json_records_statuses_metas_and_garbage_are_told_apart() {
        let d = JsonDecoder;
        let record = br#"{"gateway":"g","boot":2,"device":"d","seq":7,"historical":true,"samples":[{"tag":"t","value":1,"quality":"good","ts":5}]}"#;
        assert_eq!(
            d.decode("p/d", record),
            Decoded::Record(Seen {
                gateway: "g".into(),
                boot: 2,
                seq: 7,
                historical: true,
                sample_ts: vec![5],
            })
        );
        let status = br#"{"gateway":"g","boot":2,"state":"online","ts":1}"#;
        assert_eq!(d.decode("p/status", status), Decoded::Other);
        assert_eq!(
            d.decode("p/d/meta", br#"{"gateway":"g","device":"d","tags":[]}"#),
            Decoded::Other
        );
        assert_eq!(d.decode("p/d/meta", b""), Decoded::Other);
        assert_eq!(d.decode("p/d", b"not json"), Decoded::Garbled);
        let without_seq =
            br#"{"gateway":"g","boot":2,"device":"d","historical":false,"samples":[]}"#;
        assert_eq!(d.decode("p/d", without_seq), Decoded::Garbled);
    }

    #[test]
    fn the_flags_make_checked_mqtt_settings_under_a_client_id_of_the_audits_own() {
        let args = AuditArgs {
            url: Some("mqtt://127.0.0.1:1884".into()),
            config: None,
            topic: vec!["x/#".into()],
            seconds: None,
            idle: None,
            username: Some("cloud".into()),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            format: AuditFormat::Json,
            json: false,
        };
        let s = settings(&args).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 1884));
        assert_eq!(s.username.as_deref(), Some("cloud"));
        assert!(s.client_id.starts_with("edge-gateway-audit-"));
        assert!(!s.status);
        let bad = AuditArgs {
            url: Some("http://x".into()),
            ..args
        };
        assert!(settings(&bad).is_err());
    }
}
