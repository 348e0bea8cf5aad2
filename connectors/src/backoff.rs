//! Exponential backoff with optional jitter: MQTT reconnects and webhook retries.

use std::time::Duration;

use rand::Rng;

/// Exponential delays: `initial`, doubling up to `max`; [`Backoff::reset`] after a success.
///
/// With jitter ("equal jitter"), each delay is drawn uniformly from its upper half, so clients
/// that failed together (a broker restart, a receiver outage) do not retry in lockstep, and no
/// retry comes sooner than half the nominal delay.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    #[cfg_attr(not(feature = "mqtt"), allow(dead_code))] // read by `reset` only
    initial_ms: u64,
    max_ms: u64,
    next_ms: u64,
    jitter: bool,
}

impl Backoff {
    pub(crate) fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        Backoff { initial_ms, max_ms, next_ms: initial_ms, jitter: false }
    }

    /// The same delays, each drawn from `[delay / 2, delay]`.
    pub(crate) fn with_jitter(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The delay before the next attempt (and doubles the one after).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        if self.jitter && delay > 1 {
            let half = delay / 2;
            return Duration::from_millis(rand::rng().random_range(delay - half..=delay));
        }
        Duration::from_millis(delay)
    }

    /// Back to the initial delay (after a successful connection).
    #[cfg_attr(not(feature = "mqtt"), allow(dead_code))] // only MQTT reconnects reset
    pub(crate) fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut backoff = Backoff::new(100, 350);
        let delays: Vec<u64> = (0..4).map(|_| backoff.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_millis(), 100);
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_varies() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut backoff = Backoff::new(1_000, 8_000).with_jitter();
            for nominal in [1_000u64, 2_000, 4_000, 8_000, 8_000] {
                let delay = backoff.next_delay().as_millis() as u64;
                assert!((nominal / 2..=nominal).contains(&delay), "{delay} for {nominal}");
                seen.insert(delay);
            }
        }
        assert!(seen.len() > 50, "jitter draws barely vary: {seen:?}");
    }
}
