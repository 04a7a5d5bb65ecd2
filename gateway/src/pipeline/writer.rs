//! The writer: the only task that assigns sequence numbers. It takes each batch from the
//! drivers' channel, encodes it once into a record, enters it in the [`Ledger`](super::ledger::Ledger) and hands it to
//! the publisher at once. A reload hands it a [`WriterUpdate`] (a new encoder for new devices,
//! tags or topics, a new packet limit, a new publisher's channel) between two batches.

use std::sync::Arc;
use std::time::Duration;

use protocols::model::Batch;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::encode::Encoder;
use crate::metrics::Metrics;
use crate::pipeline::seq::{SeqState, StateError};
use crate::pipeline::Shared;
use crate::publish::Live;

/// MQTT fixed header, topic length and packet id, and MQTT 5's properties (content type,
/// payload format, topic alias), beyond topic and payload.
pub(crate) const PACKET_OVERHEAD: usize = 64;

/// How long the first record waits for the broker's packet size limit (the publisher's first
/// connection attempt); a broker that is away at start-up costs the first records this delay.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

fn lock(seqs: &std::sync::Mutex<SeqState>) -> std::sync::MutexGuard<'_, SeqState> {
    // Poisoned only by a panic while held; the state is still what it was.
    seqs.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next sequence number; the state file's writes and retries run where blocking is fine,
/// not on the runtime's few threads (a failing SD card can hang a write for long).
async fn peek_seq(seqs: &Arc<std::sync::Mutex<SeqState>>) -> Result<u64, StateError> {
    {
        let mut s = lock(seqs);
        if !s.wants_disk() {
            return s.peek_seq();
        }
    }
    let s = seqs.clone();
    match tokio::task::spawn_blocking(move || lock(&s).peek_seq()).await {
        Ok(r) => r,
        // Not possible short of a panic in `peek_seq`: the state is as it was, try again.
        Err(_) => lock(seqs).peek_seq(),
    }
}

/// What a reload changes in the writer. Updates are taken before the next batch, so a batch
/// from a driver started after its update was sent is encoded with it.
#[derive(Debug)]
pub struct WriterUpdate {
    /// Encodes every later record: it knows every device id handed out so far (the catalog
    /// only grows) and the topics of the new `[mqtt]` settings.
    pub encoder: Encoder,
    /// The configured `max_packet_size`.
    pub max_packet: usize,
    /// A new publisher's live channel; dropping the old sender lets the old publisher drain
    /// and disconnect.
    pub live: Option<mpsc::Sender<Live>>,
}

/// Runs the writer until every driver has dropped its emitter. A batch whose record would not
/// fit in `max_packet` bytes is split in halves (each its own record); a single sample that does
/// not fit is dropped and counted, since the broker could never take it.
pub async fn run_writer(
    mut batches: mpsc::Receiver<Batch>,
    mut updates: mpsc::Receiver<WriterUpdate>,
    mut encoder: Encoder,
    seqs: SeqState,
    shared: Arc<Shared>,
    mut live: mpsc::Sender<Live>,
    mut max_packet: usize,
) {
    let seqs = Arc::new(std::sync::Mutex::new(seqs));
    let mut todo: Vec<Batch> = Vec::new();
    let mut holding = false;
    let mut first = true;
    // A sample too large was logged (once per run of them).
    let mut oversized_logged = false;
    let mut updates_open = true;
    loop {
        let batch = tokio::select! {
            // Updates first: one sent before a new driver started is applied before its batch.
            biased;
            update = updates.recv(), if updates_open => {
                match update {
                    Some(u) => {
                        encoder = u.encoder;
                        max_packet = u.max_packet;
                        if let Some(l) = u.live {
                            live = l;
                        }
                    }
                    None => updates_open = false,
                }
                continue;
            }
            batch = batches.recv() => match batch {
                Some(b) => b,
                None => break,
            },
        };
        if std::mem::take(&mut first) {
            shared
                .wait_for_broker_packet_limit(FIRST_CONNECT_WAIT)
                .await;
        }
        // In Sparkplug a device's liveness decides: a DBIRTH before its first answer, a DDEATH
        // after the scan it stops answering with, no record while it stays silent.
        let verdict = encoder.verdict(&batch);
        if shared
            .latest_wanted
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Before a birth is announced: the session reads its values from here.
            shared.latest.record(&batch);
        }
        let device = batch.device;
        if verdict.born {
            let _ = live.send(Live::Device(device, true)).await;
        }
        if verdict.record {
            todo.push(batch);
        }
        while let Some(batch) = todo.pop() {
            let seq = loop {
                match peek_seq(&seqs).await {
                    Ok(s) => break s,
                    Err(e) => {
                        // An unreserved number could repeat after a crash: wait instead.
                        if !holding {
                            shared
                                .metrics
                                .writer_holding
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            error!(error = %e, "cannot hand out sequence numbers; holding the pipeline");
                            holding = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            if std::mem::take(&mut holding) {
                shared
                    .metrics
                    .writer_holding
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                info!("sequence numbers are handed out again");
            }
            // A volatile boot (the state file cannot be written) has a boot number of its own.
            encoder.set_boot(lock(&seqs).boot());
            let record = encoder.encode(seq, &batch);
            // An MQTT 5 broker may take less than the configured size (its CONNACK says so).
            let max_packet = max_packet.min(shared.broker_packet_limit());
            if record.topic.len() + record.payload.len() + PACKET_OVERHEAD > max_packet {
                // No seq is used up for a record that is not made: seqs stay contiguous.
                if batch.samples.len() > 1 {
                    let (first, second) = split(batch);
                    todo.push(second);
                    todo.push(first);
                } else {
                    Metrics::add(&shared.metrics.oversized, 1);
                    if !std::mem::replace(&mut oversized_logged, true) {
                        warn!(
                            bytes = record.payload.len(),
                            max_packet,
                            "a single sample does not fit in an MQTT packet; dropped (counted; logged again after a sample fits)"
                        );
                    }
                }
                continue;
            }
            oversized_logged = false;
            if lock(&seqs).next_seq().is_err() {
                continue; // unreachable: peek_seq found this number usable
            }
            let record = Arc::new(record);
            let m = &shared.metrics;
            Metrics::add(&m.records, 1);
            Metrics::add(&m.samples, batch.samples.len() as u64);
            shared.ledger().insert(record.clone(), batch.read_at);
            // A closed publisher (shutdown) is fine: the ledger commits what is not acknowledged.
            let _ = live.send(Live::Record(record)).await;
        }
        if verdict.died {
            let _ = live.send(Live::Device(device, false)).await;
        }
    }
    debug!("writer drained");
}

fn split(mut batch: Batch) -> (Batch, Batch) {
    let second = batch.samples.split_off(batch.samples.len() / 2);
    let other = Batch {
        device: batch.device,
        samples: second,
        read_at: batch.read_at,
    };
    (batch, other)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::buffer::Buffer;
    use crate::encode::json::JsonEncoder;
    use crate::metrics::Metrics;
    use protocols::model::{Catalog, DeviceId, Sample, TagId, Timestamp, Value};

    #[tokio::test]
    async fn a_record_too_large_for_one_packet_is_split_with_contiguous_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = Buffer::open(&dir.path().join("buffer")).unwrap();
        let shared = Arc::new(Shared::new(Arc::new(buffer), Arc::new(Metrics::default())));
        let mut catalog = Catalog::default();
        let tags = (0..100).map(|i| Arc::from(format!("tag{i}"))).collect();
        catalog.add_device("dev".into(), tags);
        let encoder = Encoder::Json(JsonEncoder::new(
            "gw",
            1,
            |d| format!("edge/gw/{d}"),
            &catalog,
        ));
        let seqs = SeqState::open(dir.path(), 0, true);
        let (batch_tx, batch_rx) = mpsc::channel(4);
        let (live_tx, mut live_rx) = mpsc::channel(64);
        let (_updates_tx, updates_rx) = mpsc::channel(1);
        let writer = tokio::spawn(run_writer(
            batch_rx,
            updates_rx,
            encoder,
            seqs,
            shared.clone(),
            live_tx,
            2000,
        ));
        let text: Arc<str> = "x".repeat(50).into();
        let samples = (0..100)
            .map(|i| Sample::good(TagId(i), Value::Text(text.clone()), Timestamp(1)))
            .collect();
        batch_tx
            .send(Batch {
                device: DeviceId(0),
                samples,
                read_at: Instant::now(),
            })
            .await
            .unwrap();
        drop(batch_tx);
        writer.await.unwrap();
        let mut seqs = Vec::new();
        let mut tags = Vec::new();
        while let Some(Live::Record(r)) = live_rx.recv().await {
            assert!(r.topic.len() + r.payload.len() + PACKET_OVERHEAD <= 2000);
            let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            for s in doc["samples"].as_array().unwrap() {
                tags.push(s["tag"].as_str().unwrap().to_string());
            }
            seqs.push(r.seq);
        }
        assert!(seqs.len() > 1, "split into several records");
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "no seq is skipped"
        );
        let expected: Vec<String> = (0..100).map(|i| format!("tag{i}")).collect();
        assert_eq!(tags, expected, "every sample once, in order");
    }

    #[tokio::test]
    async fn an_update_names_a_new_device_and_moves_later_records_to_a_new_publisher() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _) = Buffer::open(&dir.path().join("buffer")).unwrap();
        let shared = Arc::new(Shared::new(Arc::new(buffer), Arc::new(Metrics::default())));
        shared.set_broker_packet_limit(None);
        let mut catalog = Catalog::default();
        catalog.add_device("old".into(), vec!["a".into()]);
        let encoder = Encoder::Json(JsonEncoder::new("gw", 1, |d| format!("one/{d}"), &catalog));
        let seqs = SeqState::open(dir.path(), 0, true);
        let (batch_tx, batch_rx) = mpsc::channel(4);
        let (updates_tx, updates_rx) = mpsc::channel(1);
        let (live_tx, mut first_rx) = mpsc::channel(64);
        let writer = tokio::spawn(run_writer(
            batch_rx,
            updates_rx,
            encoder,
            seqs,
            shared.clone(),
            live_tx,
            1 << 20,
        ));
        let batch = |device| Batch {
            device: DeviceId(device),
            samples: vec![Sample::good(TagId(0), Value::Int(1), Timestamp(1))],
            read_at: Instant::now(),
        };
        batch_tx.send(batch(0)).await.unwrap();
        let Some(Live::Record(first)) = first_rx.recv().await else {
            panic!("a record first")
        };
        assert_eq!((first.seq, &*first.topic), (0, "one/old"));

        let id = catalog.add_device("new".into(), vec!["b".into()]);
        let (live_tx, mut second_rx) = mpsc::channel(64);
        updates_tx
            .send(WriterUpdate {
                encoder: Encoder::Json(JsonEncoder::new("gw", 1, |d| format!("two/{d}"), &catalog)),
                max_packet: 1 << 20,
                live: Some(live_tx),
            })
            .await
            .unwrap();
        batch_tx.send(batch(id.0)).await.unwrap();
        batch_tx.send(batch(0)).await.unwrap();
        drop(batch_tx);
        writer.await.unwrap();
        assert!(
            first_rx.recv().await.is_none(),
            "the old publisher's channel is closed"
        );
        let mut later = Vec::new();
        while let Some(Live::Record(r)) = second_rx.recv().await {
            let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            later.push((r.seq, r.topic.to_string(), doc["samples"][0]["tag"].clone()));
        }
        assert_eq!(
            later,
            [
                (1, "two/new".to_string(), serde_json::json!("b")),
                (2, "two/old".to_string(), serde_json::json!("a")),
            ]
        );
    }
}
