//! The dead-letter breaker: it watches how records finish and trips when too many fail, so
//! that a bad deployment upstream does not empty a topic into the dead-letter queue (the
//! getsentry/arroyo lesson). Tripped, the consumer pauses every partition until an operator
//! restarts logbridge or calls `POST /resume`.
//!
//! Three parts: [`Breaker`], the sliding window (pure logic); [`BreakerSwitch`], the window with
//! the state it publishes, owned by the committer (which sees every finished record); and
//! [`BreakerHandle`], what the consumer and the HTTP endpoint hold to read the state and ask
//! for a reset.

use std::collections::{HashMap, VecDeque};
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

/// One sliding window of outcomes and the run of failures at its end.
#[derive(Default)]
struct Window {
    outcomes: VecDeque<bool>,
    failed: usize,
    consecutive: usize,
}

impl Window {
    fn push(&mut self, failed: bool, size: usize) {
        self.outcomes.push_back(failed);
        if failed {
            self.failed += 1;
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        if self.outcomes.len() > size {
            if let Some(true) = self.outcomes.pop_front() {
                self.failed -= 1;
            }
        }
    }

    /// The limit this window passed, in words.
    fn passed(&self, config: &BreakerConfig) -> Option<String> {
        if self.consecutive > config.max_consecutive {
            return Some(format!(
                "{} failed records in a row (max_consecutive = {})",
                self.consecutive, config.max_consecutive
            ));
        }
        if self.outcomes.len() == config.window
            && self.failed as f64 > config.max_invalid_ratio * config.window as f64
        {
            return Some(format!(
                "{} of the last {} records failed (max_invalid_ratio = {})",
                self.failed, config.window, config.max_invalid_ratio
            ));
        }
        None
    }
}

/// Sliding windows of outcomes: one over every record, and one per route over that route's
/// records alone. A route's window is what bounds a failing route whatever the other routes
/// do: successes of other routes neither break its run nor dilute its ratio.
pub struct Breaker {
    config: BreakerConfig,
    all: Window,
    /// Route names come from the configuration (records that reached no route, `none`, count
    /// only in `all`), so the map holds at most one window per configured route.
    routes: HashMap<Box<str>, Window>,
    tripped: bool,
}

/// The route of records that reached no route: counted only over all records.
const NO_ROUTE: &str = "none";

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            all: Window {
                outcomes: VecDeque::with_capacity(config.window.min(1 << 16)),
                ..Window::default()
            },
            config,
            routes: HashMap::new(),
            tripped: false,
        }
    }

    fn route_window(&mut self, route: &str) -> Option<&mut Window> {
        if route == NO_ROUTE {
            return None;
        }
        if !self.routes.contains_key(route) {
            self.routes.insert(route.into(), Window::default());
        }
        self.routes.get_mut(route)
    }

    /// Records one finished record, over all records and over its route's; returns the trip if
    /// this record tripped the breaker. (In the pipeline the two halves are counted apart:
    /// [`Breaker::record_all`] by the committer, [`Breaker::record_route`] by the workers.)
    pub fn record(&mut self, failed: bool, route: &str, reason: &str) -> Option<Trip> {
        self.count(failed, route, true, true);
        self.passed(failed, route, reason)
    }

    /// Records one finished record over all records only (the committer sees them all).
    pub fn record_all(&mut self, failed: bool, route: &str, reason: &str) -> Option<Trip> {
        self.count(failed, route, true, false);
        self.passed(failed, route, reason)
    }

    /// Records a record of `route` that failed, over its route's records only (counted by the
    /// route's worker when it decides, and over all records when it is committed).
    pub fn record_route(&mut self, route: &str, reason: &str) -> Option<Trip> {
        self.count(true, route, false, true);
        self.passed(true, route, reason)
    }

    fn count(&mut self, failed: bool, route: &str, all: bool, by_route: bool) {
        if !self.config.enabled {
            return;
        }
        let size = self.config.window;
        if all {
            self.all.push(failed, size);
        }
        if by_route {
            if let Some(window) = self.route_window(route) {
                window.push(failed, size);
            }
        }
    }

    /// The trip, if this failure passed a limit.
    fn passed(&mut self, failed: bool, route: &str, reason: &str) -> Option<Trip> {
        if !self.config.enabled || self.tripped || !failed {
            return None;
        }
        let by_route = self
            .routes
            .get(route)
            .and_then(|window| window.passed(&self.config))
            .map(|limit| format!("route {route}: {limit}"));
        let limit = by_route.or_else(|| self.all.passed(&self.config))?;
        self.tripped = true;
        Some(Trip {
            route: route.to_string(),
            reason: reason.to_string(),
            limit,
        })
    }

    /// Records `count` records of `route` delivered, in its own window only (the window over
    /// all records counts them when they are committed).
    pub fn route_delivered(&mut self, route: &str, count: usize) {
        if !self.config.enabled {
            return;
        }
        let size = self.config.window;
        if let Some(window) = self.route_window(route) {
            // More than a window's worth changes nothing but the run.
            for _ in 0..count.min(size) {
                window.push(false, size);
            }
        }
    }

    /// Operator reset: start afresh.
    pub fn reset(&mut self) {
        self.all = Window::default();
        self.routes.clear();
        self.tripped = false;
    }

    /// Whether it has tripped (and not been reset).
    pub fn is_tripped(&self) -> bool {
        self.tripped
    }
}

/// The breaker, its published state and the metric, shared by the committer's switch and the
/// workers' route breakers: a worker counts its route's outcomes when it decides them, so the
/// bound on a failing route does not depend on how many of its records are in flight.
struct Shared {
    breaker: std::sync::Mutex<Breaker>,
    state: watch::Sender<BreakerState>,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Trips (and says so) if `count` returns a trip. Returns whether the breaker is tripped
    /// now.
    fn record(&self, count: impl FnOnce(&mut Breaker) -> Option<Trip>) -> bool {
        let mut breaker = self.breaker();
        if let Some(trip) = count(&mut breaker) {
            error!(route = %trip.route, reason = %trip.reason, limit = %trip.limit, "{trip}; all partitions paused and failing records held until restart or POST /resume");
            self.metrics.breaker_tripped.set(1);
            // Receivers (consumer, HTTP) gone means shutdown: nothing to stop.
            let _ = self.state.send(BreakerState::Tripped(trip));
        }
        breaker.is_tripped()
    }
}

/// The breaker with the resets it receives; owned by the committer.
pub struct BreakerSwitch {
    shared: Arc<Shared>,
    resets: mpsc::Receiver<()>,
    resets_open: bool,
}

/// Reads the dead-letter breaker's state and asks for a reset (`POST /resume`).
#[derive(Clone)]
pub struct BreakerHandle {
    state: watch::Receiver<BreakerState>,
    reset: mpsc::Sender<()>,
    shared: Arc<Shared>,
}

/// A route's view of the breaker, held by each of its workers: counts the route's outcomes as
/// they are decided and says when a failing record must be held instead of failed.
#[derive(Clone)]
pub struct RouteBreaker {
    route: Arc<str>,
    shared: Arc<Shared>,
    state: watch::Receiver<BreakerState>,
}

/// What a worker does with a record that failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Fail it (dead-letter or skip): the breaker is closed.
    Fail,
    /// Keep it and deliver it again after the breaker is reset: the breaker is tripped (this
    /// record may be the one that tripped it), and nothing more is failed past.
    Hold,
}

impl BreakerSwitch {
    /// A closed breaker and the handle to read and reset it.
    pub fn new(config: BreakerConfig, metrics: Arc<Metrics>) -> (BreakerSwitch, BreakerHandle) {
        let (state_tx, state_rx) = watch::channel(BreakerState::Closed);
        // One pending reset is as good as many (see BreakerHandle::reset).
        let (reset_tx, reset_rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            breaker: std::sync::Mutex::new(Breaker::new(config)),
            state: state_tx,
            metrics,
        });
        (
            BreakerSwitch {
                shared: shared.clone(),
                resets: reset_rx,
                resets_open: true,
            },
            BreakerHandle {
                state: state_rx,
                reset: reset_tx,
                shared,
            },
        )
    }

    /// Records one finished record over all records (a route's own window is counted by its
    /// workers); trips (and says so) when a limit is passed.
    pub fn record(&mut self, failed: bool, route: &str, reason: &str) {
        self.shared
            .record(|breaker| breaker.record_all(failed, route, reason));
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
        let mut breaker = self.shared.breaker();
        if breaker.is_tripped() {
            info!("dead-letter breaker reset by operator; resuming consumption");
        }
        breaker.reset();
        self.shared.metrics.breaker_tripped.set(0);
        // Under the lock: a worker cannot trip it again between the reset and the state.
        let _ = self.shared.state.send(BreakerState::Closed);
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

    /// The view of route `route` for its workers.
    pub fn route(&self, route: Arc<str>) -> RouteBreaker {
        RouteBreaker {
            route,
            shared: self.shared.clone(),
            state: self.state.clone(),
        }
    }
}

impl RouteBreaker {
    /// A breaker of its own that never trips, for tests of other stages.
    #[cfg(test)]
    pub(crate) fn disarmed(route: &str) -> RouteBreaker {
        let config = BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        };
        let (_, handle) = BreakerSwitch::new(config, Arc::new(Metrics::new()));
        handle.route(Arc::from(route))
    }

    /// Counts `count` records of the route delivered (breaking its run of failures).
    pub fn delivered(&self, count: usize) {
        if count > 0 {
            self.shared.breaker().route_delivered(&self.route, count);
        }
    }

    /// Counts a record of the route that failed for good, and says whether to fail it or to
    /// hold it. While the breaker is tripped (by any limit) failures are held, not counted.
    pub fn failed(&self, reason: &str) -> Verdict {
        if self.is_tripped() {
            return Verdict::Hold;
        }
        match self
            .shared
            .record(|breaker| breaker.record_route(&self.route, reason))
        {
            true => Verdict::Hold,
            false => Verdict::Fail,
        }
    }

    /// Whether the breaker is tripped now.
    pub fn is_tripped(&self) -> bool {
        matches!(*self.state.borrow(), BreakerState::Tripped(_))
    }

    /// Waits while the breaker is tripped (returns at once when it is closed, or when the
    /// breaker is gone at shutdown).
    pub async fn closed(&mut self) {
        // Err: the switch is gone (shutdown); nothing will reset it, and nothing waits on us.
        let _ = self
            .state
            .wait_for(|state| matches!(state, BreakerState::Closed))
            .await;
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
    fn a_failing_route_trips_whatever_the_other_routes_do() {
        // One route in ten fails every record (an endpoint answering 401); the others succeed,
        // interleaved. Its failures must trip the breaker after `max_consecutive` of them.
        let mut b = breaker(0.5, 1000, 200);
        let mut failures = 0;
        let mut trip = None;
        for i in 0..100_000 {
            if i % 10 == 0 {
                failures += 1;
                trip = b.record(true, "minority", "http_401");
                if trip.is_some() {
                    break;
                }
            } else {
                assert_eq!(b.record(false, "majority", ""), None);
            }
        }
        let trip = trip.unwrap_or_else(|| {
            panic!("{failures} failures of route `minority` in a row, interleaved with successes of another route, never tripped the breaker")
        });
        assert_eq!(
            failures, 201,
            "the bound: max_consecutive failures pass, the next trips"
        );
        assert_eq!(trip.route, "minority");
        assert!(trip.limit.contains("route minority"), "{}", trip.limit);
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
