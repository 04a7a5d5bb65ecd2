//! The gateway as a systemd service (`Type=notify`): what it tells the service manager through
//! sd_notify, and the progress check that decides whether the watchdog is pinged.
//!
//! # Invariants
//! - Nothing is sent, and nothing runs, when `NOTIFY_SOCKET` is unset: outside systemd every
//!   call here is a no-op.
//! - `READY=1` only after the pipeline has started; `RELOADING=1` before a reload and `READY=1`
//!   after it; `STOPPING=1` before the ordered shutdown; `STATUS=` says how many devices are
//!   connected, whether the broker is, and the buffer's depth.
//! - `WATCHDOG=1` is sent only while [`Progress`] finds the pipeline moving: a stage that had
//!   work waiting (batches for the writer, records for the publisher) and took none of it for a
//!   whole `patience` is stalled, and no ping is sent until it moves again, so systemd kills and
//!   restarts a gateway whose writer or publisher is wedged. An idle pipeline (nothing
//!   waiting) is not stalled, nor is a writer that holds its records by design (no usable
//!   sequence numbers: the clock or the state file). A broker outage is not a stall either:
//!   the publisher keeps taking records into its live queue while disconnected.
//! - The check reads counters only (`Metrics`, channel lengths): it costs the hot path one
//!   relaxed atomic add per record.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// What the pipeline's stages have done, as of one look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Batches waiting in the drivers' channel for the writer.
    pub batches_waiting: usize,
    /// What the writer has done with batches: records made plus samples dropped as too large.
    pub written: u64,
    /// The writer holds its records by design (no usable sequence numbers).
    pub writer_holding: bool,
    /// Records waiting in the writer-to-publisher channel.
    pub live_waiting: usize,
    /// Records the publisher has taken from that channel.
    pub live_taken: u64,
}

/// A stage that had work waiting and took none of it for a whole `patience`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Batches waited and the writer made no record.
    Writer,
    /// Records waited and the publisher took none.
    Publisher,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stall::Writer => "the writer takes no batch from the drivers",
            Stall::Publisher => "the publisher takes no record from the writer",
        })
    }
}

/// The progress check: fed a [`Snapshot`] at each look with the time since the previous one.
#[derive(Debug)]
pub struct Progress {
    patience: Duration,
    last: Option<Snapshot>,
    /// How long the writer has had batches waiting without making a record.
    writer_stuck: Duration,
    /// How long the publisher has had records waiting without taking one.
    publisher_stuck: Duration,
}

impl Progress {
    /// A check that calls a stage stalled after `patience` without progress.
    pub fn new(patience: Duration) -> Self {
        Progress {
            patience,
            last: None,
            writer_stuck: Duration::ZERO,
            publisher_stuck: Duration::ZERO,
        }
    }

    /// Takes a look: `Ok` while every stage moves (or has nothing to do), the stalled stage
    /// otherwise.
    pub fn observe(&mut self, now: Snapshot, elapsed: Duration) -> Result<(), Stall> {
        let Some(last) = self.last.replace(now) else {
            return Ok(());
        };
        let writer_waited = last.batches_waiting > 0 && !last.writer_holding && !now.writer_holding;
        self.writer_stuck = if writer_waited && now.written == last.written {
            self.writer_stuck + elapsed
        } else {
            Duration::ZERO
        };
        self.publisher_stuck = if last.live_waiting > 0 && now.live_taken == last.live_taken {
            self.publisher_stuck + elapsed
        } else {
            Duration::ZERO
        };
        if self.writer_stuck >= self.patience {
            Err(Stall::Writer)
        } else if self.publisher_stuck >= self.patience {
            Err(Stall::Publisher)
        } else {
            Ok(())
        }
    }

    /// Starts afresh (after a reload, which replaces the publisher's channel).
    pub fn forget(&mut self) {
        self.last = None;
        self.writer_stuck = Duration::ZERO;
        self.publisher_stuck = Duration::ZERO;
    }
}

/// What `STATUS=` shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// Devices (a Modbus line's units each count) connected.
    pub devices_connected: usize,
    /// Devices configured and enabled.
    pub devices: usize,
    /// The MQTT connection is up.
    pub mqtt_connected: bool,
    /// Records on disk, not yet acknowledged.
    pub buffered_on_disk: u64,
    /// Records in memory, neither acknowledged nor committed.
    pub in_memory: usize,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} devices connected, broker {}, buffer {} records on disk, {} in memory",
            self.devices_connected,
            self.devices,
            if self.mqtt_connected {
                "connected"
            } else {
                "disconnected"
            },
            self.buffered_on_disk,
            self.in_memory
        )
    }
}

/// The service manager's side: sends nothing when `NOTIFY_SOCKET` is unset.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    /// systemd's `WATCHDOG_USEC`, when it asks for pings.
    watchdog: Option<Duration>,
    /// Whether the last failed send was logged (once per episode).
    send_failed: bool,
}

impl Notifier {
    /// Reads the environment systemd set (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0;
        let watchdog = (enabled && sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
            .then(|| Duration::from_micros(usec));
        Notifier {
            enabled,
            watchdog,
            send_failed: false,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The watchdog's timeout, when systemd asks for pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How often to look at the pipeline (and ping, and update `STATUS=`): a quarter of the
    /// watchdog's timeout, at most every 5 s.
    pub fn look_interval(&self) -> Duration {
        self.watchdog
            .map_or(Duration::from_secs(5), |w| {
                (w / 4).min(Duration::from_secs(5))
            })
            .max(Duration::from_millis(10))
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        match sd_notify::notify(false, states) {
            Ok(()) => self.send_failed = false,
            Err(error) => {
                if !std::mem::replace(&mut self.send_failed, true) {
                    warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET); retried at each notification, logged again after one succeeds");
                }
            }
        }
    }

    /// `READY=1` with the first `STATUS=`.
    pub fn ready(&mut self, status: &Status) {
        let text = status.to_string();
        self.send(&[NotifyState::Ready, NotifyState::Status(&text)]);
    }

    /// `RELOADING=1` (with the monotonic time systemd wants alongside it).
    pub fn reloading(&mut self) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        states.push(NotifyState::Status("reloading the configuration"));
        self.send(&states);
    }

    /// `WATCHDOG=1` while a reload runs: the run loop that looks at the pipeline waits for the
    /// reload (drivers stopped one by one, each within its timeouts), and a healthy gateway
    /// must not be killed for a reload that takes longer than `WatchdogSec`.
    pub fn reload_ping(&mut self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&mut self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: committing what is not acknowledged"),
        ]);
    }

    /// One look: `STATUS=`, and `WATCHDOG=1` when the watchdog is on and the pipeline moves.
    pub fn look(&mut self, status: &Status, progress: Result<(), Stall>) {
        let text = status.to_string();
        match progress {
            Ok(()) if self.watchdog.is_some() => {
                self.send(&[NotifyState::Watchdog, NotifyState::Status(&text)]);
            }
            Ok(()) => self.send(&[NotifyState::Status(&text)]),
            Err(stall) => {
                let text = format!("stalled: {stall}; {text}");
                debug!(%stall, "no watchdog ping");
                self.send(&[NotifyState::Status(&text)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(30);
    const LOOK: Duration = Duration::from_secs(10);

    fn snapshot(
        batches_waiting: usize,
        written: u64,
        live_waiting: usize,
        live_taken: u64,
    ) -> Snapshot {
        Snapshot {
            batches_waiting,
            written,
            writer_holding: false,
            live_waiting,
            live_taken,
        }
    }

    /// Feeds the looks one `LOOK` apart and returns the last verdict.
    fn looks(progress: &mut Progress, snapshots: &[Snapshot]) -> Result<(), Stall> {
        let mut verdict = Ok(());
        for s in snapshots {
            verdict = progress.observe(*s, LOOK);
        }
        verdict
    }

    #[test]
    fn an_idle_pipeline_is_not_stalled() {
        let mut p = Progress::new(PATIENCE);
        let idle = snapshot(0, 100, 0, 100);
        assert_eq!(looks(&mut p, &[idle; 10]), Ok(()));
    }

    #[test]
    fn a_writer_with_batches_waiting_and_no_record_made_for_the_whole_patience_is_stalled() {
        let mut p = Progress::new(PATIENCE);
        let stuck = snapshot(5, 100, 0, 100);
        assert_eq!(
            looks(&mut p, &[stuck; 3]),
            Ok(()),
            "20 s is within patience"
        );
        assert_eq!(p.observe(stuck, LOOK), Err(Stall::Writer), "30 s is not");
    }

    #[test]
    fn a_writer_that_makes_records_is_not_stalled_however_full_its_channel() {
        let mut p = Progress::new(PATIENCE);
        let busy: Vec<Snapshot> = (0..10)
            .map(|i| snapshot(1024, 100 + i, 0, 100 + i))
            .collect();
        assert_eq!(looks(&mut p, &busy), Ok(()));
    }

    #[test]
    fn a_writer_that_moves_again_starts_its_patience_afresh() {
        let mut p = Progress::new(PATIENCE);
        let stuck = snapshot(5, 100, 0, 100);
        let moved = snapshot(5, 101, 0, 101);
        assert_eq!(
            looks(&mut p, &[stuck, stuck, stuck, moved, moved, moved]),
            Ok(())
        );
        assert_eq!(p.observe(moved, LOOK), Err(Stall::Writer));
    }

    #[test]
    fn a_writer_holding_its_records_for_sequence_numbers_is_not_stalled() {
        let mut p = Progress::new(PATIENCE);
        let holding = Snapshot {
            writer_holding: true,
            ..snapshot(5, 100, 0, 100)
        };
        assert_eq!(looks(&mut p, &[holding; 10]), Ok(()));
    }

    #[test]
    fn a_publisher_that_takes_no_waiting_record_for_the_whole_patience_is_stalled() {
        let mut p = Progress::new(PATIENCE);
        // The writer still makes records (its channel has room), the publisher takes none.
        let stalled: Vec<Snapshot> = (0..4)
            .map(|i| snapshot(0, 100 + i, 3 + i as usize, 97))
            .collect();
        assert_eq!(looks(&mut p, &stalled), Err(Stall::Publisher));
    }

    #[test]
    fn a_publisher_that_takes_records_while_the_broker_is_away_is_not_stalled() {
        let mut p = Progress::new(PATIENCE);
        let taking: Vec<Snapshot> = (0..10).map(|i| snapshot(0, 100 + i, 1, 99 + i)).collect();
        assert_eq!(looks(&mut p, &taking), Ok(()));
    }

    #[test]
    fn a_reload_forgets_what_was_seen_before_it() {
        let mut p = Progress::new(PATIENCE);
        let stuck = snapshot(0, 100, 5, 100);
        assert_eq!(looks(&mut p, &[stuck; 3]), Ok(()));
        p.forget();
        assert_eq!(
            looks(&mut p, &[stuck; 3]),
            Ok(()),
            "the patience starts again"
        );
        assert_eq!(p.observe(stuck, LOOK), Err(Stall::Publisher));
    }

    #[test]
    fn the_status_line_names_devices_broker_and_buffer_depth() {
        let status = Status {
            devices_connected: 2,
            devices: 3,
            mqtt_connected: false,
            buffered_on_disk: 1200,
            in_memory: 7,
        };
        assert_eq!(
            status.to_string(),
            "2/3 devices connected, broker disconnected, buffer 1200 records on disk, 7 in memory"
        );
    }

    #[test]
    fn without_notify_socket_nothing_is_enabled_and_the_look_interval_is_5s() {
        let n = Notifier {
            enabled: false,
            watchdog: None,
            send_failed: false,
        };
        assert!(!n.enabled());
        assert_eq!(n.look_interval(), Duration::from_secs(5));
        let with_watchdog = Notifier {
            enabled: true,
            watchdog: Some(Duration::from_secs(8)),
            send_failed: false,
        };
        assert_eq!(with_watchdog.look_interval(), Duration::from_secs(2));
    }
}
