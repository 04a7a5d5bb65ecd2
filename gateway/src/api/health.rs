//! `/health`: is the gateway doing its job right now? Pure: the caller reads the counters and
//! the clock, [`evaluate`] decides.
//!
//! Healthy means: the broker is connected, the disk buffer's commits are not failing, and every
//! device answered within [`INTERVALS`] of its scan interval (its fastest tag's; never less than
//! [`MIN_WINDOW`], so that one late scan on a fast device does not flap the check). A device
//! that reports only on change (OPC UA subscriptions) has no scan to answer: it is healthy
//! while connected.

use std::time::Duration;

use serde::Serialize;

/// How many scan intervals a device may go without answering.
pub const INTERVALS: u32 = 3;
/// The shortest window a device has to answer in.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);

/// What is known of one device.
#[derive(Debug, Clone)]
pub struct DeviceProbe<'a> {
    /// The device's name.
    pub name: &'a str,
    /// Whether a connection to it is up.
    pub connected: bool,
    /// When it last answered a scan (Unix ms; 0: never).
    pub last_answer_ms: u64,
    /// How often it is scanned; `None` when it reports on change only.
    pub scan_interval: Option<Duration>,
}

/// The verdict and its reasons, as `/health` serves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// `"ok"` or `"failing"`.
    pub status: &'static str,
    /// Whether the MQTT broker is connected.
    pub broker_connected: bool,
    /// Whether the disk buffer's commits are failing.
    pub buffer_failing: bool,
    /// The devices that did not answer in time.
    pub devices_failing: Vec<String>,
    /// Every reason the gateway is not healthy, one sentence each.
    pub reasons: Vec<String>,
}

impl Health {
    /// Whether every check passed.
    pub fn is_ok(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// Decides whether the gateway is healthy at `now_ms` (Unix ms).
pub fn evaluate(
    broker_connected: bool,
    buffer_failing: bool,
    devices: &[DeviceProbe<'_>],
    now_ms: u64,
) -> Health {
    let mut reasons = Vec::new();
    if !broker_connected {
        reasons.push("the MQTT broker is not connected".to_owned());
    }
    if buffer_failing {
        reasons.push("commits to the disk buffer are failing".to_owned());
    }
    let mut devices_failing = Vec::new();
    for d in devices {
        let reason = match d.scan_interval {
            None if d.connected => None,
            None => Some(format!("device {} is not connected", d.name)),
            Some(interval) => {
                let window = (interval * INTERVALS).max(MIN_WINDOW);
                let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
                if d.last_answer_ms == 0 {
                    Some(format!("device {} has not answered yet", d.name))
                } else if now_ms.saturating_sub(d.last_answer_ms) > window_ms {
                    let ago = now_ms.saturating_sub(d.last_answer_ms) as f64 / 1000.0;
                    Some(format!(
                        "device {} last answered {ago:.1}s ago (more than {INTERVALS} scan intervals)",
                        d.name
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(reason) = reason {
            devices_failing.push(d.name.to_owned());
            reasons.push(reason);
        }
    }
    Health {
        status: if reasons.is_empty() { "ok" } else { "failing" },
        broker_connected,
        buffer_failing,
        devices_failing,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polled(name: &str, last_answer_ms: u64) -> DeviceProbe<'_> {
        DeviceProbe {
            name,
            connected: true,
            last_answer_ms,
            scan_interval: Some(Duration::from_secs(1)),
        }
    }

    #[test]
    fn a_connected_broker_and_devices_that_answered_within_three_intervals_are_healthy() {
        let h = evaluate(
            true,
            false,
            &[polled("a", 10_000), polled("b", 12_000)],
            13_000,
        );
        assert!(h.is_ok(), "{h:?}");
        assert_eq!(h.status, "ok");
    }

    #[test]
    fn a_device_silent_for_more_than_three_intervals_is_named() {
        let h = evaluate(
            true,
            false,
            &[polled("a", 10_000), polled("b", 12_000)],
            13_500,
        );
        assert_eq!(h.devices_failing, vec!["a".to_owned()]);
        assert_eq!(h.status, "failing");
    }

    #[test]
    fn a_lost_broker_a_failing_buffer_and_a_device_that_never_answered_are_each_a_reason() {
        let h = evaluate(false, true, &[polled("a", 0)], 13_000);
        assert_eq!(h.reasons.len(), 3, "{h:?}");
        assert!(!h.broker_connected && h.buffer_failing);
    }

    #[test]
    fn a_subscribed_device_is_healthy_while_connected() {
        let mut d = polled("ua", 0);
        d.scan_interval = None;
        assert!(evaluate(true, false, &[d.clone()], 99_000).is_ok());
        d.connected = false;
        assert!(!evaluate(true, false, &[d], 99_000).is_ok());
    }
}
