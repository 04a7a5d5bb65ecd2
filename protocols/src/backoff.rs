//! Capped exponential backoff with jitter, shared by device drivers and the MQTT publisher.
//! Jitter keeps a plant's worth of gateways from reconnecting in lockstep after a network blip.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` up to `max`, each drawn from 50% to 100% of the nominal value.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `min`, never above `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay to wait; the nominal delay doubles for the following call.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let factor = rand::rng().random_range(0.5..=1.0);
        nominal.mul_f64(factor)
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let nominal = [100u64, 200, 400, 800, 800, 800];
        for n in nominal {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(n), "{d:?} above {n}ms");
            assert!(
                d >= Duration::from_millis(n / 2),
                "{d:?} below half of {n}ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
