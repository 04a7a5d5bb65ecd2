//! A consumer's MQTT session, for `audit`: subscribes to topic filters at QoS 1 with the
//! broker, TLS and credentials of an `[mqtt]` section (prepared like the gateway's own
//! connection, [`Connector`]), and hands each message on with its arrival time. MQTT 3.1.1,
//! clean session, reconnecting (and subscribing again) after a lost connection; it publishes
//! nothing and has no last will.
//!
//! Kept here because rumqttc is named only under `publish/`; the caller sees [`Subscription`]
//! and [`Message`].

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::connect::Connector;
use crate::config::MqttSettings;

/// Messages waiting for the caller at most; beyond that the session stops reading and the
/// broker holds the rest.
const QUEUE: usize = 1024;

/// One message received.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Whether the broker sent it as a retained message (one published before the subscription).
    pub retained: bool,
    /// When it arrived.
    pub arrival: SystemTime,
}

/// What the session reports besides messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The broker accepted the subscription (after each connection).
    Subscribed,
    /// The connection failed or was lost; the session retries.
    Lost(String),
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone)]
pub enum Received {
    /// A message.
    Message(Message),
    /// A change of the session.
    Session(SessionEvent),
}

/// A running consumer session; dropped, it stops.
pub struct Subscription {
    rx: mpsc::Receiver<Received>,
    cancel: CancellationToken,
}

impl Subscription {
    /// Connects to the broker of `settings` (its client id should be the consumer's own) and
    /// subscribes to `filters`; retries every second while the broker cannot be reached.
    pub fn start(settings: &MqttSettings, filters: Vec<String>) -> Subscription {
        let mut settings = settings.clone();
        settings.status = false;
        let mut connector = Connector::new(settings.clone(), "", 0);
        let mut o = rumqttc::MqttOptions::new(&settings.client_id, &settings.host, settings.port);
        o.set_keep_alive(settings.keep_alive.max(Duration::from_secs(1)));
        o.set_clean_session(true);
        // A record may be as large as the gateway's largest packet, and more.
        o.set_max_packet_size(256 << 20, 64 << 10);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
        let (tx, rx) = mpsc::channel(QUEUE);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let mut prepared = false;
            loop {
                if !prepared {
                    match connector.prepare() {
                        Ok(p) => {
                            el.mqtt_options.set_transport(p.transport);
                            if let Some((user, password)) = p.credentials {
                                el.mqtt_options.set_credentials(user, password);
                            }
                            prepared = true;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Received::Session(SessionEvent::Lost(e.to_string())))
                                .await;
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                }
                let ev = tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = client.try_disconnect();
                        return;
                    }
                    ev = el.poll() => ev,
                };
                let out = match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in &filters {
                            if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                                tracing::debug!(error = %e, "subscribe not accepted by the client");
                            }
                        }
                        None
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        Some(Received::Session(SessionEvent::Subscribed))
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => Some(Received::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        retained: p.retain,
                        arrival: SystemTime::now(),
                    })),
                    Ok(_) => None,
                    Err(e) => {
                        // TLS files and passwords are read again for the next attempt.
                        prepared = false;
                        let _ = tx
                            .send(Received::Session(SessionEvent::Lost(e.to_string())))
                            .await;
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        None
                    }
                };
                if let Some(out) = out {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        sent = tx.send(out) => if sent.is_err() { return },
                    }
                }
            }
        });
        Subscription { rx, cancel }
    }

    /// The next message or session change; `None` once the session has stopped.
    pub async fn next(&mut self) -> Option<Received> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
