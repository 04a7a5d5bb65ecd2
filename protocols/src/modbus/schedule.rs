//! The scheduler of a shared Modbus line, free of I/O.
//!
//! A line (a serial port, an RTU-over-TCP converter, or a Modbus TCP gateway) carries one
//! transaction at a time for all of its units. The line driver asks [`Schedule::pick`] for one
//! job (one scan of one unit's scan class), runs it, and reports the outcome with
//! [`Schedule::finish`].
//!
//! Invariants:
//! - Fair: the job due earliest goes first, so when the line cannot keep up every unit slips
//!   by the same amount instead of one unit starving the others; equal due times are served
//!   round-robin across units.
//! - A unit that leaves [`DEMOTE_AFTER`] jobs in a row unanswered is demoted: its scans stop
//!   and one probe scan is made per probe period instead. A silent probe costs the line one
//!   request timeout plus the resynchronisation guard after it (another timeout, see
//!   `transport/rtu.rs`). On a line with several units the period starts at [`BUDGET_FACTOR`] such
//!   costs (at least one second) and doubles up to the line's `backoff_max`, so a dead unit
//!   takes at most 1/[`BUDGET_FACTOR`] of the line's time: that is the demotion budget the
//!   healthy units pay. A line with one unit has nobody to protect: its unit is probed from
//!   the line's `backoff_min` on, like a reconnect.
//! - A unit that failed a job is held back for the line's hold-off (on RTU lines several
//!   timeouts, see `transport/rtu.rs`) before it is addressed again: scan, probe, or first scan after
//!   the line reopened alike. A late answer from it must not meet a request of the same shape.
//! - A unit that flaps (answers a probe, then fails again) starts its next demotion where the
//!   last one left off instead of at the first period, so flapping stays within the budget;
//!   [`FORGIVE_AFTER`] answers in a row clear that.
//! - A probe that gets an answer (data or an exception: the unit is alive) promotes the unit;
//!   all of its classes are due at once.

use std::time::{Duration, Instant};

use super::scan::ScanClass;

/// Unanswered jobs in a row after which a unit is demoted.
pub(crate) const DEMOTE_AFTER: u32 = 3;

/// A demoted unit is probed at most once per this many probe costs (timeout and guard).
pub const BUDGET_FACTOR: u32 = 10;

/// Answers in a row after which a unit that was demoted before starts from the first probe
/// period again if it is demoted anew.
const FORGIVE_AFTER: u32 = 100;

/// Shortest probe period of a demoted unit.
const MIN_PROBE_PERIOD: Duration = Duration::from_secs(1);

/// The first probe period that keeps a dead unit within the demotion budget on a line whose
/// requests time out after `timeout`: [`BUDGET_FACTOR`] times a silent probe's cost.
pub(crate) fn budgeted_probe_period(timeout: Duration) -> Duration {
    let probe_cost = timeout * 2;
    (probe_cost * BUDGET_FACTOR).max(MIN_PROBE_PERIOD)
}

/// One scan of one unit's scan class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Job {
    /// Index of the unit on the line.
    pub unit: usize,
    /// Index of the scan class within the unit.
    pub class: usize,
    /// Whether the unit is demoted and this scan probes whether it is back.
    pub probe: bool,
}

/// A change of a unit's standing, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The unit was demoted; it is probed every `period` (growing while it stays silent).
    Demoted {
        /// The first probe period.
        period: Duration,
    },
    /// The unit answered a probe and is scanned at its rates again.
    Promoted,
}

#[derive(Debug, Clone, Copy)]
struct Demotion {
    period: Duration,
    next_probe: Instant,
}

#[derive(Debug, Clone)]
struct Unit {
    classes: Vec<ScanClass>,
    failures: u32,
    /// Answers in a row since the unit last failed.
    answers: u32,
    demoted: Option<Demotion>,
    /// The first probe period of the unit's next demotion: it keeps growing for a unit that
    /// flaps between answering and not, so flapping cannot take more than the budget.
    next_period: Duration,
    /// Not addressed before this (the hold-off after a failure), whatever is due.
    held_until: Option<Instant>,
}

impl Unit {
    /// The unit's earliest due class and when it is due.
    fn due(&self) -> Option<(Instant, usize)> {
        let (class, earliest) = self
            .classes
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.next_due)?;
        let due = match self.demoted {
            Some(d) => d.next_probe,
            None => earliest.next_due,
        };
        Some((self.held_until.map_or(due, |h| due.max(h)), class))
    }
}

/// The jobs of one line and the standing of its units.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    hold_off: Duration,
    units: Vec<Unit>,
    first_period: Duration,
    max_period: Duration,
    next_turn: usize,
}

impl Schedule {
    /// A schedule for units given by their scan classes; `first_period` is the first probe
    /// period of a demoted unit (see [`budgeted_probe_period`]), `max_period` the longest, and
    /// `hold_off` how long a unit that failed a job waits before its next one.
    pub(crate) fn new(
        units: Vec<Vec<ScanClass>>,
        first_period: Duration,
        max_period: Duration,
        hold_off: Duration,
    ) -> Self {
        let first_period = first_period.max(Duration::from_millis(1));
        Schedule {
            hold_off,
            units: units
                .into_iter()
                .map(|classes| Unit {
                    classes,
                    failures: 0,
                    answers: 0,
                    demoted: None,
                    next_period: first_period,
                    held_until: None,
                })
                .collect(),
            first_period,
            max_period: max_period.max(first_period),
            next_turn: 0,
        }
    }

    /// When the next job is due, if the line has any.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.units
            .iter()
            .filter_map(|u| u.due())
            .map(|(t, _)| t)
            .min()
    }

    /// The job to run now: the one due earliest, ties served round-robin across units.
    pub(crate) fn pick(&mut self, now: Instant) -> Option<Job> {
        let n = self.units.len();
        let mut best: Option<(Instant, usize, usize)> = None;
        for k in 0..n {
            let unit = (self.next_turn + k) % n;
            let Some((due, class)) = self.units[unit].due() else {
                continue;
            };
            if due > now {
                continue;
            }
            if best.is_none_or(|(t, _, _)| due < t) {
                best = Some((due, unit, class));
            }
        }
        let (_, unit, class) = best?;
        self.next_turn = (unit + 1) % n;
        Some(Job {
            unit,
            class,
            probe: self.units[unit].demoted.is_some(),
        })
    }

    /// The scan class of a job, to read its blocks (and keep the splits learned on the way).
    pub(crate) fn class_mut(&mut self, job: Job) -> Option<&mut ScanClass> {
        self.units.get_mut(job.unit)?.classes.get_mut(job.class)
    }

    /// Whether `unit` is held back after a request it did not answer: a late answer may still
    /// come, and must not be taken for the next request's.
    pub(crate) fn is_held(&self, unit: usize, now: Instant) -> bool {
        self.units
            .get(unit)
            .and_then(|u| u.held_until)
            .is_some_and(|until| now < until)
    }

    /// Holds `unit` back as a failed job does (a write that got no valid answer), without
    /// counting a failure against its standing.
    pub(crate) fn hold(&mut self, unit: usize, now: Instant) {
        let hold_off = self.hold_off;
        if let Some(u) = self.units.get_mut(unit) {
            u.held_until = Some(now + hold_off);
        }
    }

    /// Records the outcome of a job: `answered` when the unit answered at all (data or an
    /// exception), false when it stayed silent or its answer was garbled.
    pub(crate) fn finish(&mut self, job: Job, answered: bool, now: Instant) -> Option<Transition> {
        let (first_period, max_period) = (self.first_period, self.max_period);
        let hold_off = self.hold_off;
        let unit = self.units.get_mut(job.unit)?;
        if let Some(class) = unit.classes.get_mut(job.class) {
            class.advance(now);
        }
        if answered {
            unit.failures = 0;
            unit.answers = unit.answers.saturating_add(1);
            if unit.answers >= FORGIVE_AFTER {
                unit.next_period = first_period;
            }
            if unit.demoted.take().is_some() {
                unit.classes
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| *i != job.class)
                    .for_each(|(_, c)| c.next_due = now);
                return Some(Transition::Promoted);
            }
            return None;
        }
        unit.failures = unit.failures.saturating_add(1);
        unit.answers = 0;
        unit.held_until = Some(now + hold_off);
        match &mut unit.demoted {
            Some(d) => {
                d.period = (d.period * 2).min(max_period);
                d.next_probe = now + d.period;
                None
            }
            None if unit.failures >= DEMOTE_AFTER => {
                let period = unit.next_period;
                unit.next_period = (period * 2).min(max_period);
                unit.demoted = Some(Demotion {
                    period,
                    next_probe: now + period,
                });
                Some(Transition::Demoted { period })
            }
            None => None,
        }
    }

    /// Whether a unit is demoted.
    pub(crate) fn is_demoted(&self, unit: usize) -> bool {
        self.units.get(unit).is_some_and(|u| u.demoted.is_some())
    }

    /// Makes every healthy unit's classes due at `now` (after the link came back); a unit in
    /// its hold-off still waits for it to end.
    pub(crate) fn all_due(&mut self, now: Instant) {
        for unit in self.units.iter_mut().filter(|u| u.demoted.is_none()) {
            unit.classes.iter_mut().for_each(|c| c.next_due = now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(interval_ms: u64, due: Instant) -> ScanClass {
        ScanClass {
            interval: Duration::from_millis(interval_ms),
            blocks: Vec::new(),
            next_due: due,
        }
    }

    fn line(units: usize, t0: Instant) -> Schedule {
        Schedule::new(
            (0..units).map(|_| vec![class(100, t0)]).collect(),
            budgeted_probe_period(Duration::from_millis(200)),
            Duration::from_secs(30),
            Duration::ZERO,
        )
    }

    #[test]
    fn equal_due_times_are_served_round_robin() {
        let t0 = Instant::now();
        let mut s = line(3, t0);
        let order: Vec<usize> = (0..3)
            .map(|_| {
                let job = s.pick(t0).expect("a job is due");
                s.finish(job, true, t0);
                job.unit
            })
            .collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(s.pick(t0), None, "nothing is due until the next interval");
        assert_eq!(s.next_due(), Some(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn the_earliest_due_job_goes_first() {
        let t0 = Instant::now();
        let mut s = Schedule::new(
            vec![
                vec![class(100, t0 + Duration::from_millis(5))],
                vec![class(100, t0)],
            ],
            budgeted_probe_period(Duration::from_millis(200)),
            Duration::from_secs(30),
            Duration::ZERO,
        );
        let now = t0 + Duration::from_millis(10);
        assert_eq!(s.pick(now).map(|j| j.unit), Some(1));
    }

    #[test]
    fn a_silent_unit_is_demoted_then_probed_with_growing_periods_and_promoted_when_it_answers() {
        let t0 = Instant::now();
        let mut s = line(2, t0);
        let mut now = t0;
        let mut transitions = Vec::new();
        for _ in 0..DEMOTE_AFTER {
            let job = Job {
                unit: 1,
                class: 0,
                probe: false,
            };
            transitions.push(s.finish(job, false, now));
            now += Duration::from_millis(100);
        }
        assert_eq!(
            transitions.last(),
            Some(&Some(Transition::Demoted {
                period: Duration::from_secs(4)
            })),
            "demoted after {DEMOTE_AFTER} silent jobs, first period 10 x (200 + 200) ms"
        );
        assert!(s.is_demoted(1));
        // Only unit 0 is scanned until the probe is due.
        for _ in 0..15 {
            let job = s.pick(now).expect("unit 0 is due");
            assert_eq!(job.unit, 0);
            s.finish(job, true, now);
            now += Duration::from_millis(100);
        }
        // The probe comes 4 s after the demotion; it fails and the period doubles.
        now = t0 + Duration::from_millis(4200);
        let probe = loop {
            let job = s.pick(now).expect("something is due");
            if job.unit == 1 {
                break job;
            }
            s.finish(job, true, now);
        };
        assert!(probe.probe);
        assert_eq!(s.finish(probe, false, now), None);
        assert!(s.next_due().is_some());
        let later = now + Duration::from_millis(7999);
        assert!(
            s.pick(later).is_none_or(|j| j.unit == 0),
            "the second probe waits 8 s"
        );
        let probe_at = now + Duration::from_secs(8);
        let probe = loop {
            let job = s.pick(probe_at).expect("something is due");
            if job.unit == 1 {
                break job;
            }
            s.finish(job, true, probe_at);
        };
        assert_eq!(s.finish(probe, true, probe_at), Some(Transition::Promoted));
        assert!(!s.is_demoted(1));
    }

    #[test]
    fn a_unit_that_failed_is_held_back_for_the_hold_off() {
        let t0 = Instant::now();
        let mut s = Schedule::new(
            vec![vec![class(100, t0)], vec![class(100, t0)]],
            budgeted_probe_period(Duration::from_millis(200)),
            Duration::from_secs(30),
            Duration::from_millis(800),
        );
        let job = s.pick(t0).expect("due");
        assert_eq!(job.unit, 0);
        s.finish(job, false, t0);
        let mut now = t0;
        while now < t0 + Duration::from_millis(800) {
            if let Some(job) = s.pick(now) {
                assert_eq!(job.unit, 1, "unit 0 is held back at {:?}", now - t0);
                s.finish(job, true, now);
            }
            now += Duration::from_millis(50);
        }
        assert_eq!(s.pick(now).map(|j| j.unit), Some(0));
    }

    #[test]
    fn a_flapping_unit_starts_its_next_demotion_where_the_last_one_left_off() {
        let t0 = Instant::now();
        let mut s = line(1, t0);
        let job = Job {
            unit: 0,
            class: 0,
            probe: false,
        };
        let demote = |s: &mut Schedule| {
            (0..DEMOTE_AFTER)
                .filter_map(|_| s.finish(job, false, t0))
                .next_back()
        };
        assert_eq!(
            demote(&mut s),
            Some(Transition::Demoted {
                period: Duration::from_secs(4)
            })
        );
        assert_eq!(s.finish(job, true, t0), Some(Transition::Promoted));
        assert_eq!(
            demote(&mut s),
            Some(Transition::Demoted {
                period: Duration::from_secs(8)
            })
        );
        s.finish(job, true, t0);
        for _ in 0..FORGIVE_AFTER {
            s.finish(job, true, t0);
        }
        assert_eq!(
            demote(&mut s),
            Some(Transition::Demoted {
                period: Duration::from_secs(4)
            }),
            "a long run of answers forgives"
        );
    }

    #[test]
    fn a_demoted_units_probe_waits_for_the_hold_off() {
        let t0 = Instant::now();
        let mut s = Schedule::new(
            vec![vec![class(100, t0)]],
            Duration::from_millis(100),
            Duration::from_secs(30),
            Duration::from_secs(1),
        );
        let job = Job {
            unit: 0,
            class: 0,
            probe: false,
        };
        for _ in 0..DEMOTE_AFTER {
            s.finish(job, false, t0);
        }
        assert!(s.is_demoted(0));
        assert_eq!(
            s.next_due(),
            Some(t0 + Duration::from_secs(1)),
            "the 100 ms probe period does not beat the 1 s hold-off"
        );
        s.all_due(t0);
        assert!(s.pick(t0 + Duration::from_millis(999)).is_none());
    }

    #[test]
    fn an_answer_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut s = line(1, t0);
        let job = Job {
            unit: 0,
            class: 0,
            probe: false,
        };
        for _ in 0..DEMOTE_AFTER - 1 {
            s.finish(job, false, t0);
        }
        s.finish(job, true, t0);
        for _ in 0..DEMOTE_AFTER - 1 {
            assert_eq!(s.finish(job, false, t0), None);
        }
        assert!(!s.is_demoted(0));
    }

    #[test]
    fn the_probe_period_is_capped() {
        let t0 = Instant::now();
        let mut s = Schedule::new(
            vec![vec![class(100, t0)]],
            budgeted_probe_period(Duration::from_millis(200)),
            Duration::from_secs(6),
            Duration::ZERO,
        );
        let job = Job {
            unit: 0,
            class: 0,
            probe: false,
        };
        for _ in 0..20 {
            s.finish(job, false, t0);
        }
        assert_eq!(s.next_due(), Some(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn a_unit_held_after_a_silent_write_is_held_for_the_hold_off_without_a_failure_counted() {
        let t = Instant::now();
        let mut s = Schedule::new(
            vec![vec![class(100, t)]],
            Duration::from_secs(1),
            Duration::from_secs(8),
            Duration::from_millis(400),
        );
        assert!(!s.is_held(0, t));
        assert_eq!(s.pick(t).map(|j| j.unit), Some(0));
        s.hold(0, t);
        assert!(s.is_held(0, t + Duration::from_millis(399)));
        assert!(!s.is_held(0, t + Duration::from_millis(400)));
        assert!(!s.is_held(7, t), "no such unit");
        assert!(
            s.next_due()
                .is_some_and(|due| due >= t + Duration::from_millis(400)),
            "its scans wait too"
        );
    }
}
