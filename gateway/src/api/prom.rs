//! `/metrics`: the gateway's counters in the Prometheus (OpenMetrics) text format, through
//! `prometheus-client`'s [`Collector`]: the atomics the pipeline and the drivers keep anyway
//! are read at scrape time, so the hot path gains no lock, no allocation and no extra atomic.
//!
//! Names follow Prometheus conventions: `edge_gateway_` first, the unit (`_seconds`,
//! `_bytes`) at the end, counters ending in `_total` (added by the encoder). Per device
//! metrics carry a `device` label.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{Histogram, Metrics, LATENCY_BUCKETS_US, PUBACK_REFUSALS};
use crate::pipeline::DeviceHandle;
use protocols::driver::ErrorKind;

/// Reads the pipeline's and the devices' counters at each scrape.
#[derive(Debug)]
pub(super) struct GatewayCollector {
    pub(super) metrics: Arc<Metrics>,
    pub(super) view: super::SharedView,
}

/// A registry holding the gateway's collector under the `edge_gateway` prefix.
pub(super) fn registry(collector: GatewayCollector) -> Registry {
    let mut registry = Registry::with_prefix("edge_gateway");
    registry.register_collector(Box::new(collector));
    registry
}

/// Encodes the registry as the text `/metrics` serves.
pub(super) fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The reconnects among `connections`: every connection after the first. Derived at scrape
/// time from the one counter the publisher keeps, so it stays monotonic with it.
fn reconnects(connections: u64) -> u64 {
    connections.saturating_sub(1)
}

fn counter(enc: &mut MetricEncoder<'_>, v: u64) -> Result<(), std::fmt::Error> {
    enc.encode_counter::<(), u64, u64>(&v, None::<&Exemplar<(), u64>>)
}

fn histogram(enc: &mut MetricEncoder<'_>, h: &Histogram) -> Result<(), std::fmt::Error> {
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_US.len() + 1);
    for (i, b) in h.buckets.iter().enumerate() {
        let bound = LATENCY_BUCKETS_US
            .get(i)
            .map_or(f64::MAX, |us| *us as f64 / 1e6);
        buckets.push((bound, b.load(Ordering::Relaxed)));
    }
    // The count is the buckets' sum, so that a scrape never sees them disagree.
    let count = buckets.iter().map(|(_, n)| n).sum();
    let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
    enc.encode_histogram::<()>(sum, count, &buckets, None)
}

/// One metric family: its descriptor, then `each` writes its samples.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    each: impl FnOnce(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut enc = encoder.encode_descriptor(name, help, unit, kind)?;
    each(&mut enc)
}

/// A metric with one sample.
struct One<F>(F, MetricType);

impl<F: Fn(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>> EncodeMetric for One<F> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        (self.0)(&mut encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.1
    }
}

impl GatewayCollector {
    /// A per device family: one sample per device, labelled `device`.
    fn per_device(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        kind: MetricType,
        sample: impl Fn(&DeviceHandle, &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
        family(encoder, name, help, unit, kind, |enc| {
            for d in &super::current(&self.view).devices {
                let labels = [("device", d.name.as_ref())];
                let one = One(|e: &mut MetricEncoder<'_>| sample(d, e), kind);
                one.encode(enc.encode_family(&labels)?)?;
            }
            Ok(())
        })
    }

    fn devices(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let now_ms = protocols::model::Timestamp::now().unix_ms();
        self.per_device(
            encoder,
            "device_connected",
            "Whether a connection to the device is up (1) or not (0).",
            None,
            Gauge,
            |d, e| e.encode_gauge(&i64::from(d.status.is_connected())),
        )?;
        self.per_device(
            encoder,
            "device_scans",
            "Scans completed.",
            None,
            Counter,
            |d, e| counter(e, d.status.scans.load(Ordering::Relaxed)),
        )?;
        self.per_device(
            encoder,
            "device_requests",
            "Requests sent to the device.",
            None,
            Counter,
            |d, e| counter(e, d.status.requests.load(Ordering::Relaxed)),
        )?;
        family(
            encoder,
            "device_errors",
            "Failed requests by reason: timeout, exception (or a bad status), link, protocol; other: a failure the driver did not classify.",
            None,
            Counter,
            |enc| {
                for d in &super::current(&self.view).devices {
                    let s = &d.status;
                    let mut classified = 0;
                    for kind in ErrorKind::ALL {
                        let n = s.errors_by_kind[kind as usize].load(Ordering::Relaxed);
                        classified += n;
                        let labels = [("device", d.name.as_ref()), ("reason", kind.name())];
                        counter(&mut enc.encode_family(&labels)?, n)?;
                    }
                    let other = s.errors.load(Ordering::Relaxed).saturating_sub(classified);
                    let labels = [("device", d.name.as_ref()), ("reason", "other")];
                    counter(&mut enc.encode_family(&labels)?, other)?;
                }
                Ok(())
            },
        )?;
        self.per_device(
            encoder,
            "device_reconnects",
            "Connection attempts after the first.",
            None,
            Counter,
            |d, e| counter(e, d.status.reconnects.load(Ordering::Relaxed)),
        )?;
        self.per_device(
            encoder,
            "device_overruns",
            "Times the driver waited because the pipeline was full.",
            None,
            Counter,
            |d, e| counter(e, d.status.overruns.load(Ordering::Relaxed)),
        )?;
        self.per_device(
            encoder,
            "device_samples",
            "Samples read from the device.",
            None,
            Counter,
            |d, e| counter(e, d.status.samples.load(Ordering::Relaxed)),
        )?;
        self.per_device(
            encoder,
            "device_scan_duration",
            "Durations of the scans the device answered.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |d, e| histogram(e, &d.status.scan_duration),
        )?;
        self.per_device(
            encoder,
            "device_last_answer_age",
            "Time since the device last answered a scan (NaN: never).",
            Some(&Unit::Seconds),
            Gauge,
            |d, e| {
                let at = d.status.last_answer_ms.load(Ordering::Relaxed);
                let age = if at == 0 {
                    f64::NAN
                } else {
                    now_ms.saturating_sub(at) as f64 / 1e3
                };
                e.encode_gauge(&age)
            },
        )
    }

    fn buffer(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let m = &self.metrics;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        family(
            encoder,
            "buffer_records",
            "Records held in the disk buffer.",
            None,
            Gauge,
            |e| e.encode_gauge(&gauge_i64(get(&m.buffer_records))),
        )?;
        family(
            encoder,
            "buffer_size",
            "Bytes of records held in the disk buffer.",
            Some(&Unit::Bytes),
            Gauge,
            |e| e.encode_gauge(&gauge_i64(get(&m.buffer_bytes))),
        )?;
        family(
            encoder,
            "buffer_memory",
            "Bytes of unacknowledged records held in memory only.",
            Some(&Unit::Bytes),
            Gauge,
            |e| e.encode_gauge(&gauge_i64(get(&m.memory_bytes))),
        )?;
        family(
            encoder,
            "buffer_oldest_record_age",
            "Age of the oldest record in the disk buffer (0 when empty).",
            Some(&Unit::Seconds),
            Gauge,
            |e| e.encode_gauge(&(get(&m.oldest_age_ms) as f64 / 1e3)),
        )?;
        family(
            encoder,
            "buffer_failing",
            "Whether commits to the disk buffer are failing right now (1) or not (0).",
            None,
            Gauge,
            |e| e.encode_gauge(&i64::from(m.buffer_failing.load(Ordering::Relaxed))),
        )?;
        family(
            encoder,
            "records",
            "Records made by the writer.",
            None,
            Counter,
            |e| counter(e, get(&m.records)),
        )?;
        family(
            encoder,
            "samples",
            "Samples in those records.",
            None,
            Counter,
            |e| counter(e, get(&m.samples)),
        )?;
        family(
            encoder,
            "buffer_committed_records",
            "Records committed to the disk buffer.",
            None,
            Counter,
            |e| counter(e, get(&m.committed)),
        )?;
        family(
            encoder,
            "buffer_commits",
            "Durable commits (each a flush and an fsync).",
            None,
            Counter,
            |e| counter(e, get(&m.commits)),
        )?;
        family(
            encoder,
            "buffer_written",
            "Bytes written to the disk buffer by commits.",
            Some(&Unit::Bytes),
            Counter,
            |e| counter(e, get(&m.bytes_written)),
        )?;
        family(
            encoder,
            "buffer_replayed_records",
            "Records replayed from the disk buffer.",
            None,
            Counter,
            |e| counter(e, get(&m.replayed)),
        )?;
        family(
            encoder,
            "buffer_evicted_records",
            "Records evicted because the buffer was full.",
            None,
            Counter,
            |e| counter(e, get(&m.evicted)),
        )?;
        family(
            encoder,
            "buffer_io_errors",
            "Disk buffer I/O errors.",
            None,
            Counter,
            |e| counter(e, get(&m.io_errors)),
        )?;
        family(
            encoder,
            "buffer_quarantined_generations",
            "Buffer generations moved aside because they could not be opened.",
            None,
            Counter,
            |e| counter(e, get(&m.quarantined)),
        )?;
        family(
            encoder,
            "lost_commits",
            "Losses of committed records found (each needs a look by hand).",
            None,
            Counter,
            |e| counter(e, get(&m.lost_commits)),
        )?;
        family(
            encoder,
            "oversized_samples",
            "Samples dropped because one alone does not fit in an MQTT packet.",
            None,
            Counter,
            |e| counter(e, get(&m.oversized)),
        )?;
        family(
            encoder,
            "buffer_commit_duration",
            "Durations of the disk buffer's commits.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            |e| histogram(e, &m.commit_latency),
        )
    }

    fn mqtt(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let m = &self.metrics;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        family(
            encoder,
            "mqtt_connected",
            "Whether the MQTT connection is up (1) or not (0).",
            None,
            Gauge,
            |e| e.encode_gauge(&i64::from(m.mqtt_connected.load(Ordering::Relaxed))),
        )?;
        family(
            encoder,
            "mqtt_connections",
            "MQTT connections made.",
            None,
            Counter,
            |e| counter(e, get(&m.mqtt_connects)),
        )?;
        family(
            encoder,
            "mqtt_reconnects",
            "MQTT connections made after the first (after a lost connection or a reload of [mqtt]).",
            None,
            Counter,
            |e| counter(e, reconnects(get(&m.mqtt_connects))),
        )?;
        family(
            encoder,
            "mqtt_published_records",
            "Publishes handed to the MQTT client, live and replayed.",
            None,
            Counter,
            |e| counter(e, get(&m.published)),
        )?;
        family(
            encoder,
            "mqtt_acknowledged_records",
            "Publishes the broker acknowledged.",
            None,
            Counter,
            |e| counter(e, get(&m.acked)),
        )?;
        family(
            encoder,
            "mqtt_acknowledged_samples",
            "Samples in acknowledged records.",
            None,
            Counter,
            |e| counter(e, get(&m.acked_samples)),
        )?;
        family(
            encoder,
            "mqtt_in_flight_records",
            "Publishes sent and not yet acknowledged (published minus acknowledged).",
            None,
            Gauge,
            |e| e.encode_gauge(&gauge_i64(get(&m.published).saturating_sub(get(&m.acked)))),
        )?;
        family(
            encoder,
            "mqtt_published",
            "Bytes of the publishes handed to the MQTT client (topic and payload; records and status).",
            Some(&Unit::Bytes),
            Counter,
            |e| counter(e, get(&m.published_bytes)),
        )?;
        family(
            encoder,
            "mqtt_puback_refusals",
            "PUBACKs with a failure reason code (MQTT 5), by reason; the record stays buffered.",
            None,
            Counter,
            |e| {
                for ((code, name), n) in PUBACK_REFUSALS.iter().zip(&m.puback_refusals) {
                    let code = format!("0x{code:02x}");
                    let labels = [("code", code.as_str()), ("reason", *name)];
                    counter(&mut e.encode_family(&labels)?, get(n))?;
                }
                Ok(())
            },
        )?;
        family(
            encoder,
            "mqtt_too_large_records",
            "Records not sent because they exceed the broker's maximum packet size.",
            None,
            Counter,
            |e| counter(e, get(&m.too_large_for_broker)),
        )?;
        family(
            encoder,
            "mqtt_tls_client_cert_expiry_timestamp_seconds",
            "When the TLS client certificate expires (Unix time; 0: none), as of the last connection.",
            None,
            Gauge,
            |e| e.encode_gauge(&gauge_i64(get(&m.tls_client_cert_not_after))),
        )?;
        family(
            encoder,
            "config_reloads",
            "Configuration reloads applied (SIGHUP or POST /api/reload).",
            None,
            Counter,
            |e| counter(e, get(&m.reloads)),
        )?;
        family(
            encoder,
            "config_reloads_refused",
            "Configuration reloads refused (the file fails check); the running configuration stays.",
            None,
            Counter,
            |e| counter(e, get(&m.reloads_refused)),
        )?;
        family(
            encoder,
            "commands",
            "Write commands from the cloud by outcome: written, refused (by a check, before any device), failed (the device or the link said no).",
            None,
            Counter,
            |enc| {
                for (outcome, n) in [
                    ("written", &m.commands_written),
                    ("refused", &m.commands_refused),
                    ("failed", &m.commands_failed),
                ] {
                    counter(&mut enc.encode_family(&[("outcome", outcome)])?, get(n))?;
                }
                Ok(())
            },
        )
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.devices(&mut encoder)?;
        self.buffer(&mut encoder)?;
        self.mqtt(&mut encoder)
    }
}
