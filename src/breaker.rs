//! The dead-letter breaker (pure logic, owned by the committer): it watches how records finish
//! and trips when too many fail, so that a bad deployment upstream does not empty a topic into
//! the dead-letter queue (the getsentry/arroyo lesson). Tripped, the consumer pauses every
//! partition until an operator restarts logbridge or calls `POST /resume`.

use std::collections::VecDeque;

use crate::config::BreakerConfig;

/// Why the breaker tripped.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    /// Route of the failure that tripped it (`none` before routing).
    pub route: String,
    /// Reason of that failure.
    pub reason: String,
    /// Which limit was passed, in words.
    pub limit: String,
}

impl std::fmt::Display for Trip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dead-letter breaker tripped: {} (last failure: route {}, reason {})",
            self.limit, self.route, self.reason
        )
    }
}

/// The breaker's state, published to the consumer and the HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum BreakerState {
    /// Records flow.
    #[default]
    Closed,
    /// Stopped taking records.
    Tripped(Trip),
}

/// Sliding window of outcomes.
pub struct Breaker {
    config: BreakerConfig,
    window: VecDeque<bool>,
    failed_in_window: usize,
    consecutive: usize,
    tripped: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            window: VecDeque::with_capacity(config.window.min(1 << 16)),
            config,
            failed_in_window: 0,
            consecutive: 0,
            tripped: false,
        }
    }

    /// Records one finished record; returns the trip if this record tripped the breaker.
    pub fn record(&mut self, failed: bool, route: &str, reason: &str) -> Option<Trip> {
        if !self.config.enabled {
            return None;
        }
        self.window.push_back(failed);
        if failed {
            self.failed_in_window += 1;
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        if self.window.len() > self.config.window {
            if let Some(true) = self.window.pop_front() {
                self.failed_in_window -= 1;
            }
        }
        if self.tripped || !failed {
            return None;
        }
        let limit = if self.consecutive > self.config.max_consecutive {
            format!(
                "{} failed records in a row (max_consecutive = {})",
                self.consecutive, self.config.max_consecutive
            )
        } else if self.window.len() == self.config.window
            && self.failed_in_window as f64
                > self.config.max_invalid_ratio * self.config.window as f64
        {
            format!(
                "{} of the last {} records failed (max_invalid_ratio = {})",
                self.failed_in_window, self.config.window, self.config.max_invalid_ratio
            )
        } else {
            return None;
        };
        self.tripped = true;
        Some(Trip {
            route: route.to_string(),
            reason: reason.to_string(),
            limit,
        })
    }

    /// Operator reset: start afresh.
    pub fn reset(&mut self) {
        self.window.clear();
        self.failed_in_window = 0;
        self.consecutive = 0;
        self.tripped = false;
    }

    /// Whether it has tripped (and not been reset).
    pub fn is_tripped(&self) -> bool {
        self.tripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(ratio: f64, window: usize, consecutive: usize) -> Breaker {
        Breaker::new(BreakerConfig {
            enabled: true,
            max_invalid_ratio: ratio,
            window,
            max_consecutive: consecutive,
        })
    }

    #[test]
    fn trips_on_the_first_failure_past_max_consecutive() {
        let mut b = breaker(1.0, 100, 3);
        for _ in 0..3 {
            assert_eq!(b.record(true, "errors", "not_json"), None);
        }
        let trip = b
            .record(true, "errors", "not_json")
            .expect("fourth in a row trips");
        assert!(
            trip.limit.contains("4 failed records in a row"),
            "{}",
            trip.limit
        );
        assert_eq!(trip.route, "errors");
        assert!(b.is_tripped());
        // Stays tripped, reports once.
        assert_eq!(b.record(true, "errors", "not_json"), None);
        b.reset();
        assert!(!b.is_tripped());
    }

    #[test]
    fn a_success_breaks_the_run() {
        let mut b = breaker(1.0, 100, 3);
        for _ in 0..10 {
            for _ in 0..3 {
                assert_eq!(b.record(true, "r", "x"), None);
            }
            assert_eq!(b.record(false, "r", ""), None);
        }
    }

    #[test]
    fn trips_when_the_window_ratio_is_passed() {
        let mut b = breaker(0.5, 10, 100);
        // Alternating: exactly half fail, never more.
        for i in 0..100 {
            assert_eq!(b.record(i % 2 == 0, "r", "x"), None, "record {i}");
        }
        // One more failure in place of a success: 6 of the last 10.
        assert_eq!(b.record(true, "r", "x"), None);
        let trip = b.record(true, "r", "x");
        assert!(trip.is_some_and(|t| t.limit.contains("of the last 10")));
    }

    #[test]
    fn disabled_never_trips() {
        let mut b = Breaker::new(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        });
        for _ in 0..10_000 {
            assert_eq!(b.record(true, "r", "x"), None);
        }
    }
}
