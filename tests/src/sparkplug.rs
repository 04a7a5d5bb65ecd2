//! A Sparkplug B host's view of the gateway: a subscriber that decodes every message of the
//! namespace, and a checker of the Sparkplug 3.0 rules over what it received, message by
//! message. Tests publish commands (NCMD, a primary host's STATE) through it too.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_gateway::encode::sparkplug::proto::{Metric, MetricValue, Payload};
use edge_gateway::encode::sparkplug::{BD_SEQ, REBIRTH};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One message of the namespace, decoded.
#[derive(Debug, Clone)]
pub struct SpMessage {
    pub topic: String,
    /// NBIRTH, NDEATH, DBIRTH, DDATA, DDEATH, NCMD, DCMD.
    pub kind: String,
    /// The device id, for device messages.
    pub device: Option<String>,
    pub payload: Payload,
}

impl SpMessage {
    /// The value of the metric named `name` as an integer.
    pub fn metric_u64(&self, name: &str) -> Option<u64> {
        self.payload
            .metrics
            .iter()
            .find(|m| m.name.as_deref() == Some(name))
            .and_then(|m| match m.value {
                Some(MetricValue::LongValue(v)) => Some(v),
                Some(MetricValue::IntValue(v)) => Some(u64::from(v)),
                _ => None,
            })
    }

    /// The gateway's (boot, seq) of a DDATA record, from the payload's `uuid`.
    pub fn record_id(&self) -> Option<(u64, u64)> {
        let (boot, seq) = self.payload.uuid.as_deref()?.split_once(':')?;
        Some((boot.parse().ok()?, seq.parse().ok()?))
    }

    /// Whether every metric is historical.
    pub fn historical(&self) -> bool {
        !self.payload.metrics.is_empty()
            && self
                .payload
                .metrics
                .iter()
                .all(|m| m.is_historical == Some(true))
    }
}

/// Subscribes to `spBv1.0/#` and keeps every Sparkplug message (STATE messages apart).
pub struct SpCollector {
    messages: Arc<Mutex<Vec<SpMessage>>>,
    client: AsyncClient,
    cancel: CancellationToken,
}

impl SpCollector {
    pub async fn start(port: u16) -> SpCollector {
        let id = format!("sp-host-{}", rand::random::<u32>());
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(16 << 20, 64 << 10);
        let (client, mut el) = AsyncClient::new(o, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let (m, c, cl) = (messages.clone(), cancel.clone(), client.clone());
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = c.cancelled() => return,
                    ev = el.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = cl.subscribe("spBv1.0/#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic.starts_with("spBv1.0/STATE/") {
                            continue;
                        }
                        let levels: Vec<&str> = p.topic.split('/').collect();
                        let command = matches!(levels.get(2), Some(&("NCMD" | "DCMD")));
                        let payload = match Payload::decode(&p.payload[..]) {
                            Ok(payload) => payload,
                            // A host's command may be anything a test sends the gateway.
                            Err(_) if command => continue,
                            // What the gateway publishes must decode.
                            Err(e) => panic!("{} does not decode: {e}", p.topic),
                        };
                        m.lock().unwrap().push(SpMessage {
                            topic: p.topic.clone(),
                            kind: levels.get(2).unwrap_or(&"").to_string(),
                            device: levels.get(4).map(|d| d.to_string()),
                            payload,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s)).await;
        SpCollector {
            messages,
            client,
            cancel,
        }
    }

    pub fn messages(&self) -> Vec<SpMessage> {
        self.messages.lock().unwrap().clone()
    }

    /// Messages of `kind`.
    pub fn of(&self, kind: &str) -> Vec<SpMessage> {
        self.messages()
            .into_iter()
            .filter(|m| m.kind == kind)
            .collect()
    }

    /// Waits until `pred` holds for the messages so far, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[SpMessage]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.messages.lock().unwrap()) {
                return;
            }
            if Instant::now() > deadline {
                let kinds: Vec<String> = self
                    .messages()
                    .iter()
                    .map(|m| {
                        format!(
                            "{}{}",
                            m.kind,
                            m.device
                                .as_deref()
                                .map(|d| format!("/{d}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}; received {kinds:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes `payload` to `topic` at QoS 1.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }

    /// Asks `node` of `group` for a rebirth (NCMD `Node Control/Rebirth` = true).
    pub async fn request_rebirth(&self, group: &str, node: &str) {
        let payload = Payload {
            timestamp: Some(0),
            metrics: vec![Metric {
                name: Some(REBIRTH.into()),
                datatype: Some(11),
                value: Some(MetricValue::BooleanValue(true)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        let topic = format!("spBv1.0/{group}/NCMD/{node}");
        self.publish(&topic, payload.encode_to_vec(), false).await;
    }

    /// Publishes a primary host's STATE (Sparkplug 3.0 JSON), retained, stamped now.
    pub async fn host_state(&self, host: &str, online: bool) {
        self.host_state_at(host, online, now_ms()).await;
    }

    /// Publishes a primary host's STATE for its session that began at `timestamp` (Unix ms).
    pub async fn host_state_at(&self, host: &str, online: bool, timestamp: u64) {
        let body = format!("{{\"online\":{online},\"timestamp\":{timestamp}}}");
        self.publish(&format!("spBv1.0/STATE/{host}"), body.into_bytes(), true)
            .await;
    }
}

impl Drop for SpCollector {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the checker saw.
#[derive(Debug, Default)]
pub struct SessionReport {
    /// NBIRTHs, with their bdSeq, in order.
    pub nbirths: Vec<u64>,
    /// NDEATHs that ended the session they name (bdSeq), in order.
    pub ndeaths: Vec<u64>,
    pub dbirths: usize,
    pub ddeaths: usize,
    pub ddata: usize,
    /// DDATA whose metrics are all historical.
    pub historical: usize,
    /// The gateway's (boot, seq) of every DDATA, as received (duplicates kept).
    pub records: Vec<(u64, u64)>,
}

impl SessionReport {
    /// The distinct gateway seqs of `boot`; panics at a hole (a lost record).
    pub fn contiguous(&self, boot: u64) -> Vec<u64> {
        let seqs: BTreeSet<u64> = self
            .records
            .iter()
            .filter(|(b, _)| *b == boot)
            .map(|(_, s)| *s)
            .collect();
        let seqs: Vec<u64> = seqs.into_iter().collect();
        for w in seqs.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "gateway seq {} of boot {boot} never arrived",
                w[0] + 1
            );
        }
        seqs
    }
}

/// Checks the Sparkplug 3.0 rules over one edge node's messages, in arrival order:
/// - every session starts with an NBIRTH with `seq` 0 and metrics `bdSeq` and
///   `Node Control/Rebirth`; NBIRTH, DBIRTH, DDATA and DDEATH carry `seq`, each one more
///   than the message before it in its session (mod 256); NDEATH carries none;
/// - an NDEATH names a bdSeq of an NBIRTH seen; when it names the current session's, the
///   session ends (and nothing but a new NBIRTH may follow);
/// - a DBIRTH lists metrics with name, alias, datatype, a value or `is_null`, and a
///   `Quality` property; aliases are unique across the node;
/// - a DDATA names metrics by alias only, all born in its device's DBIRTH, and comes after
///   that DBIRTH and before the device's DDEATH; DDEATH only for a born device.
pub fn check_session(msgs: &[SpMessage]) -> Result<SessionReport, String> {
    let mut r = SessionReport::default();
    let mut bd_seqs: Vec<u64> = Vec::new();
    // The current session: its bdSeq, the last seq, born devices and their aliases.
    let mut session: Option<(u64, u8)> = None;
    let mut born: HashMap<String, HashSet<u64>> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("message {i} ({} {})", m.kind, m.topic);
        let seq = m.payload.seq;
        match m.kind.as_str() {
            "NBIRTH" => {
                if seq != Some(0) {
                    return Err(format!("{at}: NBIRTH seq {seq:?}, not 0"));
                }
                let bd = m
                    .metric_u64(BD_SEQ)
                    .ok_or_else(|| format!("{at}: NBIRTH without bdSeq"))?;
                if !m
                    .payload
                    .metrics
                    .iter()
                    .any(|x| x.name.as_deref() == Some(REBIRTH))
                {
                    return Err(format!("{at}: NBIRTH without {REBIRTH}"));
                }
                bd_seqs.push(bd);
                r.nbirths.push(bd);
                session = Some((bd, 0));
                born.clear();
                continue;
            }
            "NDEATH" => {
                if seq.is_some() {
                    return Err(format!("{at}: NDEATH with a seq"));
                }
                let bd = m
                    .metric_u64(BD_SEQ)
                    .ok_or_else(|| format!("{at}: NDEATH without bdSeq"))?;
                if !bd_seqs.contains(&bd) {
                    return Err(format!(
                        "{at}: NDEATH bdSeq {bd} of no NBIRTH seen ({bd_seqs:?})"
                    ));
                }
                if session.is_some_and(|(b, _)| b == bd) {
                    r.ndeaths.push(bd);
                    session = None;
                    born.clear();
                }
                continue;
            }
            "NCMD" | "DCMD" => continue,
            _ => {}
        }
        let Some((bd, last)) = session else {
            return Err(format!(
                "{at}: outside a session (no NBIRTH since the last NDEATH)"
            ));
        };
        let expected = last.wrapping_add(1);
        if seq != Some(u64::from(expected)) {
            return Err(format!("{at}: seq {seq:?}, expected {expected}"));
        }
        session = Some((bd, expected));
        let device = m
            .device
            .clone()
            .ok_or_else(|| format!("{at}: device message without a device"))?;
        match m.kind.as_str() {
            "DBIRTH" => {
                if born.contains_key(&device) {
                    return Err(format!("{at}: DBIRTH of a device born already"));
                }
                let mut aliases = HashSet::new();
                for x in &m.payload.metrics {
                    let complete = x.name.is_some()
                        && x.alias.is_some()
                        && x.datatype.is_some()
                        && (x.value.is_some() || x.is_null == Some(true))
                        && x.properties
                            .as_ref()
                            .is_some_and(|p| p.keys.iter().any(|k| k == "Quality"));
                    if !complete {
                        return Err(format!("{at}: incomplete birth metric {x:?}"));
                    }
                    let alias = x.alias.unwrap_or_default();
                    if born.values().any(|a| a.contains(&alias)) || !aliases.insert(alias) {
                        return Err(format!("{at}: alias {alias} not unique"));
                    }
                }
                born.insert(device, aliases);
                r.dbirths += 1;
            }
            "DDATA" => {
                let Some(aliases) = born.get(&device) else {
                    return Err(format!("{at}: DDATA of a device not born"));
                };
                for x in &m.payload.metrics {
                    if x.name.is_some() {
                        return Err(format!("{at}: DDATA metric by name, not alias"));
                    }
                    if !x.alias.is_some_and(|a| aliases.contains(&a)) {
                        return Err(format!("{at}: DDATA alias {:?} not in the DBIRTH", x.alias));
                    }
                }
                r.ddata += 1;
                if m.historical() {
                    r.historical += 1;
                }
                r.records.push(
                    m.record_id()
                        .ok_or_else(|| format!("{at}: DDATA without boot:seq uuid"))?,
                );
            }
            "DDEATH" => {
                if born.remove(&device).is_none() {
                    return Err(format!("{at}: DDEATH of a device not born"));
                }
                r.ddeaths += 1;
            }
            other => return Err(format!("{at}: unknown message type {other}")),
        }
    }
    Ok(r)
}
