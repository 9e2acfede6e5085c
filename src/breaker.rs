//! The dead-letter breaker: it watches how records finish and trips when too many fail, so
//! that a bad deployment upstream does not empty a topic into the dead-letter queue (the
//! getsentry/arroyo lesson). Tripped, the consumer pauses every partition until an operator
//! restarts logbridge or calls `POST /resume`.
//!
//! Three parts: [`Breaker`], the sliding window (pure logic); [`BreakerSwitch`], the window with
//! the state it publishes, owned by the committer (which sees every finished record); and
//! [`BreakerHandle`], what the consumer and the HTTP endpoint hold to read the state and ask
//! for a reset.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use crate::config::BreakerConfig;
use crate::metrics::Metrics;

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

/// The breaker with the state it publishes and the resets it receives; owned by the committer.
pub struct BreakerSwitch {
    breaker: Breaker,
    state: watch::Sender<BreakerState>,
    resets: mpsc::Receiver<()>,
    resets_open: bool,
    metrics: Arc<Metrics>,
}

/// Reads the dead-letter breaker's state and asks for a reset (`POST /resume`).
#[derive(Clone)]
pub struct BreakerHandle {
    state: watch::Receiver<BreakerState>,
    reset: mpsc::Sender<()>,
}

impl BreakerSwitch {
    /// A closed breaker and the handle to read and reset it.
    pub fn new(config: BreakerConfig, metrics: Arc<Metrics>) -> (BreakerSwitch, BreakerHandle) {
        let (state_tx, state_rx) = watch::channel(BreakerState::Closed);
        // One pending reset is as good as many (see BreakerHandle::reset).
        let (reset_tx, reset_rx) = mpsc::channel(1);
        (
            BreakerSwitch {
                breaker: Breaker::new(config),
                state: state_tx,
                resets: reset_rx,
                resets_open: true,
                metrics,
            },
            BreakerHandle {
                state: state_rx,
                reset: reset_tx,
            },
        )
    }

    /// Records one finished record; trips (and says so) when a limit is passed.
    pub fn record(&mut self, failed: bool, route: &str, reason: &str) {
        if let Some(trip) = self.breaker.record(failed, route, reason) {
            error!(route = %trip.route, reason = %trip.reason, limit = %trip.limit, "{trip}; all partitions paused until restart or POST /resume");
            self.metrics.breaker_tripped.set(1);
            // Receivers (consumer, HTTP) gone means shutdown: nothing to stop.
            let _ = self.state.send(BreakerState::Tripped(trip));
        }
    }

    /// Waits for an operator's reset and applies it; pending forever once every handle is gone.
    pub async fn serve_reset(&mut self) {
        if !self.resets_open {
            return std::future::pending().await;
        }
        match self.resets.recv().await {
            Some(()) => self.reset(),
            None => self.resets_open = false,
        }
    }

    fn reset(&mut self) {
        if self.breaker.is_tripped() {
            info!("dead-letter breaker reset by operator; resuming consumption");
        }
        self.breaker.reset();
        self.metrics.breaker_tripped.set(0);
        let _ = self.state.send(BreakerState::Closed);
    }
}

impl BreakerHandle {
    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change (for the consumer thread).
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.state.clone()
    }

    /// Asks for the breaker to close; `false` if logbridge is shutting down.
    pub fn reset(&self) -> bool {
        match self.reset.try_send(()) {
            // A reset already queued does the same.
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => true,
            Err(mpsc::error::TrySendError::Closed(())) => false,
        }
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

    #[tokio::test]
    async fn a_trip_is_published_and_a_reset_through_the_handle_closes_it() {
        let metrics = Arc::new(Metrics::new());
        let config = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 10,
            max_consecutive: 1,
        };
        let (mut switch, handle) = BreakerSwitch::new(config, metrics.clone());
        let seen = handle.subscribe();
        switch.record(true, "errors", "not_json");
        assert_eq!(handle.state(), BreakerState::Closed);
        switch.record(true, "errors", "not_json");
        assert!(seen.has_changed().expect("open"));
        match handle.state() {
            BreakerState::Tripped(trip) => assert_eq!(trip.reason, "not_json"),
            BreakerState::Closed => panic!("the second failure in a row trips it"),
        }
        assert_eq!(metrics.breaker_tripped.get(), 1);
        assert!(handle.reset());
        switch.serve_reset().await;
        assert_eq!(handle.state(), BreakerState::Closed);
        assert_eq!(metrics.breaker_tripped.get(), 0);
        drop(switch);
        assert!(!handle.reset(), "no reset once the owner is gone");
    }
}
