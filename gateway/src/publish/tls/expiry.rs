//! When to warn that the client certificate expires: pure state, given the certificate's end
//! and the wall clock at each check (the publisher checks before each connection attempt).
//!
//! Invariants:
//! - A certificate is expiring when it ends within [`WARN_BEFORE`] of now, or has ended.
//! - [`ExpiryWarning`] warns about an expiring certificate at most once per [`WARN_EVERY`]:
//!   after a warning at `t`, the next comes at a check at `t + WARN_EVERY` or later. A check
//!   earlier than the last warning (the clock was set back) warns and starts the day again,
//!   so a clock change can never keep the warning quiet for more than a day.
//! - A check that does not warn changes nothing.

use std::fmt;
use std::time::{Duration, SystemTime};

/// How long before its end a client certificate is warned about.
pub(crate) const WARN_BEFORE: Duration = Duration::from_secs(30 * DAY_SECS);
/// How often an expiring client certificate is warned about, at most.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(DAY_SECS);

const DAY_SECS: u64 = 24 * 3600;

/// A certificate that expires within [`WARN_BEFORE`] of `now`, or has expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expiring {
    /// When it ends.
    pub(crate) not_after: SystemTime,
    /// When that was found.
    pub(crate) now: SystemTime,
}

impl Expiring {
    /// The certificate ending at `not_after`, if it is expiring at `now`.
    pub(crate) fn at(not_after: SystemTime, now: SystemTime) -> Option<Expiring> {
        let soon = now
            .checked_add(WARN_BEFORE)
            .is_none_or(|limit| not_after <= limit);
        soon.then_some(Expiring { not_after, now })
    }

    /// Whether it has ended.
    pub(crate) fn expired(&self) -> bool {
        self.not_after <= self.now
    }
}

impl fmt::Display for Expiring {
    /// "expires in 9 days (on 2031-01-10T12:00:00Z)", "expired 3 days ago (on ...)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = date(self.not_after);
        let days = |d: Duration| match d.as_secs() / DAY_SECS {
            0 => "less than a day".to_owned(),
            1 => "1 day".to_owned(),
            n => format!("{n} days"),
        };
        match self.not_after.duration_since(self.now) {
            Ok(left) if !left.is_zero() => write!(f, "expires in {} (on {on})", days(left)),
            _ => {
                let ago = self.now.duration_since(self.not_after).unwrap_or_default();
                write!(f, "expired {} ago (on {on})", days(ago))
            }
        }
    }
}

/// Whether to warn, now, that the client certificate expires; see the module's invariants.
#[derive(Debug, Default)]
pub(crate) struct ExpiryWarning {
    /// When it last warned.
    last: Option<SystemTime>,
}

impl ExpiryWarning {
    /// A state that has never warned.
    pub(crate) fn new() -> Self {
        ExpiryWarning::default()
    }

    /// What to warn about for a certificate ending at `not_after`, checked at `now`: `Some`
    /// when it is expiring and no warning was given in the last [`WARN_EVERY`].
    pub(crate) fn check(&mut self, not_after: SystemTime, now: SystemTime) -> Option<Expiring> {
        let expiring = Expiring::at(not_after, now)?;
        let quiet = self.last.is_some_and(|last| {
            now.duration_since(last)
                .is_ok_and(|since| since < WARN_EVERY)
        });
        if quiet {
            return None;
        }
        self.last = Some(now);
        Some(expiring)
    }
}

/// `time` as `2031-01-10T12:00:00Z` (UTC, to the second).
pub(super) fn date(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let whole = Duration::from_secs(since.as_secs());
    match x509_cert::der::DateTime::from_unix_duration(whole) {
        Ok(date) => date.to_string(),
        Err(_) => format!("{} s after 1970", whole.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(DAY_SECS);

    /// 2030-01-01T00:00:00Z.
    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    #[test]
    fn a_certificate_ending_in_more_than_30_days_is_not_warned_about() {
        let mut warning = ExpiryWarning::new();
        assert_eq!(warning.check(t0() + 31 * DAY, t0()), None);
        assert_eq!(
            warning.check(t0() + 30 * DAY + Duration::from_secs(1), t0()),
            None
        );
    }

    #[test]
    fn a_certificate_ending_within_30_days_is_warned_about_at_the_first_check() {
        let mut warning = ExpiryWarning::new();
        let expiring = warning.check(t0() + 30 * DAY, t0()).unwrap();
        assert!(!expiring.expired());
        assert_eq!(
            expiring.to_string(),
            "expires in 30 days (on 2030-01-31T00:00:00Z)"
        );
    }

    #[test]
    fn the_warning_comes_at_most_once_a_day() {
        let mut warning = ExpiryWarning::new();
        let end = t0() + 10 * DAY;
        assert!(warning.check(end, t0()).is_some());
        assert!(warning.check(end, t0() + Duration::from_secs(60)).is_none());
        assert!(warning
            .check(end, t0() + DAY - Duration::from_secs(1))
            .is_none());
        assert!(warning.check(end, t0() + DAY).is_some());
        assert!(warning
            .check(end, t0() + DAY + Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn a_check_that_does_not_warn_does_not_move_the_day() {
        let mut warning = ExpiryWarning::new();
        let end = t0() + 10 * DAY;
        assert!(warning.check(end, t0()).is_some());
        for hour in 1..24 {
            assert!(warning
                .check(end, t0() + Duration::from_secs(hour * 3600))
                .is_none());
        }
        assert!(warning.check(end, t0() + DAY).is_some());
    }

    #[test]
    fn an_expired_certificate_is_warned_about_too_and_says_how_long_ago() {
        let mut warning = ExpiryWarning::new();
        let expiring = warning.check(t0() - 3 * DAY, t0()).unwrap();
        assert!(expiring.expired());
        assert_eq!(
            expiring.to_string(),
            "expired 3 days ago (on 2029-12-29T00:00:00Z)"
        );
    }

    #[test]
    fn a_clock_set_back_warns_again_instead_of_staying_quiet() {
        let mut warning = ExpiryWarning::new();
        let end = t0() + 10 * DAY;
        assert!(warning.check(end, t0()).is_some());
        assert!(
            warning.check(end, t0() - 300 * DAY).is_none(),
            "not expiring then"
        );
        assert!(warning.check(end, t0() - Duration::from_secs(1)).is_some());
        assert!(warning.check(end, t0()).is_none(), "the day starts again");
    }

    #[test]
    fn less_than_a_day_left_or_past_reads_as_such() {
        let end = t0() + Duration::from_secs(3600);
        let soon = Expiring::at(end, t0()).unwrap();
        assert_eq!(
            soon.to_string(),
            "expires in less than a day (on 2030-01-01T01:00:00Z)"
        );
        let just = Expiring::at(t0(), t0()).unwrap();
        assert!(just.expired());
        assert_eq!(
            just.to_string(),
            "expired less than a day ago (on 2030-01-01T00:00:00Z)"
        );
    }
}
