//! Pacing of the replay: a token bucket that lets at most `rate` replayed records a second go
//! out, in bursts of at most a tenth of a second's worth (one record at least). Pure: the caller
//! passes the time, so it is tested without sleeping. Live records are never paced.

use std::time::{Duration, Instant};

/// A token bucket for replayed records.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Records per second; `None` means unlimited.
    rate: Option<u32>,
    tokens: f64,
    burst: f64,
    at: Option<Instant>,
}

impl Pace {
    /// A bucket for `rate` records per second (`None`: unlimited), full at the start.
    pub fn new(rate: Option<u32>) -> Self {
        let burst = rate.map_or(f64::INFINITY, |r| (f64::from(r) / 10.0).max(1.0));
        Pace {
            rate,
            tokens: burst,
            burst,
            at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let Some(rate) = self.rate else {
            return;
        };
        if let Some(at) = self.at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * f64::from(rate);
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.at = Some(now);
    }

    /// Whether a rate is set.
    pub fn is_limited(&self) -> bool {
        self.rate.is_some()
    }

    /// How many records may be replayed now, at most `want`.
    pub fn allowance(&mut self, now: Instant, want: usize) -> usize {
        if self.rate.is_none() {
            return want;
        }
        self.refill(now);
        (self.tokens.floor() as usize).min(want)
    }

    /// Counts `n` records replayed.
    pub fn spend(&mut self, n: usize) {
        if self.rate.is_some() {
            self.tokens -= n as f64;
        }
    }

    /// When the next record may go, if the bucket is empty now; `None` when one may go now.
    pub fn next_at(&mut self, now: Instant) -> Option<Instant> {
        let rate = self.rate?;
        self.refill(now);
        if self.tokens >= 1.0 {
            return None;
        }
        let wait = (1.0 - self.tokens) / f64::from(rate);
        Some(now + Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_allows_everything_and_never_waits() {
        let mut p = Pace::new(None);
        let now = Instant::now();
        assert_eq!(p.allowance(now, 10_000), 10_000);
        p.spend(10_000);
        assert_eq!(p.next_at(now), None);
    }

    #[test]
    fn a_rate_allows_a_burst_then_that_many_records_a_second() {
        let mut p = Pace::new(Some(100));
        let t0 = Instant::now();
        assert_eq!(
            p.allowance(t0, 1000),
            10,
            "a tenth of a second's worth at once"
        );
        p.spend(10);
        assert_eq!(p.allowance(t0, 1000), 0);
        let next = p.next_at(t0).expect("empty bucket");
        assert_eq!(next - t0, Duration::from_millis(10));
        let mut sent = 10;
        let mut t = t0;
        for _ in 0..1000 {
            t += Duration::from_millis(1);
            let n = p.allowance(t, 1000);
            p.spend(n);
            sent += n;
        }
        // One second later: the burst plus one second at 100 a second.
        assert!((109..=111).contains(&sent), "sent {sent}");
    }

    #[test]
    fn an_idle_bucket_keeps_no_more_than_its_burst() {
        let mut p = Pace::new(Some(50));
        let t0 = Instant::now();
        p.allowance(t0, 0);
        assert_eq!(p.allowance(t0 + Duration::from_secs(60), 1000), 5);
    }

    #[test]
    fn a_slow_rate_still_lets_one_record_go() {
        let mut p = Pace::new(Some(1));
        let t0 = Instant::now();
        assert_eq!(p.allowance(t0, 10), 1);
        p.spend(1);
        assert_eq!(p.next_at(t0), Some(t0 + Duration::from_secs(1)));
    }
}
