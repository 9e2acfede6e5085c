//! Worker actors: each owns its sink and its own counters, takes records from its channel in
//! batches, delivers them, and acks every record to the committer with how it fared.
//!
//! A Kafka route's worker keeps up to `pipeline.sink_batches_in_flight` batches in its sink at
//! once ([`Sink::start`]; the idempotent producer keeps them in order), so a route is not held
//! to one round trip per batch; they settle in the order they started. Other sinks take one
//! batch at a time.
//!
//! A delivery that fails with a retryable error is retried with capped exponential backoff and
//! jitter (`retry_backoff_ms`, `retry_backoff_max_ms`), for as long as it takes unless the route
//! sets `max_retries`: Kafka is the buffer. While a worker retries it takes nothing new: its
//! channel fills, the router waits, the consumer pauses, and no commit passes the failing
//! record; [`Retrying`] tells `/readyz` which route retries and since when. A record that fails
//! permanently, or still fails after `max_retries`, goes to the dead-letter topic (or, without
//! one, is logged, counted and skipped). A worker ends at the end of its input, or when told to
//! stop (after the final commit of a shutdown): then what it was delivering or retrying is left
//! unfinished, uncommitted, and read again after a restart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use rustc_hash::FxHashSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::breaker::{RouteBreaker, Verdict};
use crate::channel::{self, BatchReceiver, BatchSender, Offer};
use crate::committer::CommitterHandle;
use crate::dead_letter::{DeadLetter, DeadLetterHandle, Stage};
use crate::health::Liveness;
use crate::metrics::{DepthProbe, Metrics};
use crate::producer::{DeliveryError, FailureKind, FENCED};
use crate::record::{AckStatus, Fences, Record, StageGone};
use crate::router::order_key;
use crate::shape::route::{RouteShape, Shaped, Shaper};
use crate::sink::{Sink, Started};

/// Longest wait a destination's `Retry-After` can impose on one retry: a bigger value (or a
/// date far ahead) is taken as this, so a misconfigured server cannot park a route for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Most records a worker takes from its channel for one sink call.
pub const MAX_BATCH: usize = 256;

/// How a route retries failed deliveries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt; `None`: no limit (a retryable failure is retried
    /// until it goes through, or until shutdown).
    pub max_retries: Option<u32>,
    /// First delay.
    pub backoff: Duration,
    /// Largest delay.
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Whether a record that failed retryably in attempt number `attempts` is tried again.
    pub fn retries_after(&self, attempts: u32) -> bool {
        self.max_retries.is_none_or(|max| attempts <= max)
    }

    /// Delay before retry number `retry` (1-based): exponential, capped, with "equal jitter":
    /// a random delay between half and all of it, so that workers do not retry in lockstep and
    /// none retries at once (full jitter, between zero and all of it, could).
    pub fn delay(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let full = self
            .backoff
            .saturating_mul(1u32 << exponent)
            .min(self.backoff_max);
        let half = full / 2;
        half + full
            .saturating_sub(half)
            .mul_f64(rand::rng().random::<f64>())
    }
}

/// The workers that are retrying now, each with its route, since when and why: `/readyz` and
/// `/status` show them. Written by a worker when its retries start, change and end (not per
/// record), read by the HTTP endpoint.
#[derive(Clone, Default)]
pub struct Retrying {
    workers: Arc<Mutex<BTreeMap<u64, SinkRetry>>>,
    next_worker: Arc<AtomicU64>,
}

/// What one worker is retrying.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRetry {
    /// The worker's route.
    pub route: Arc<str>,
    /// When the first failed attempt of what it retries was answered.
    pub since: Instant,
    /// Attempts made so far.
    pub attempts: u32,
    /// Records waiting to be delivered again.
    pub records: usize,
    /// The last error.
    pub error: String,
}

impl std::fmt::Display for SinkRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "route `{}` retrying since {:.0} s ago ({} records, {} attempts): {}; their offsets stay uncommitted",
            self.route,
            self.since.elapsed().as_secs_f64(),
            self.records,
            self.attempts,
            self.error
        )
    }
}

impl Retrying {
    /// What every retrying worker is retrying, oldest first.
    pub fn snapshot(&self) -> Vec<SinkRetry> {
        let mut retries: Vec<SinkRetry> = self.lock().values().cloned().collect();
        retries.sort_by_key(|retry| retry.since);
        retries
    }

    fn register(&self) -> u64 {
        self.next_worker.fetch_add(1, Ordering::Relaxed)
    }

    fn set(&self, worker: u64, retry: SinkRetry) {
        self.lock().insert(worker, retry);
    }

    fn clear(&self, worker: u64) {
        self.lock().remove(&worker);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SinkRetry>> {
        // Plain values replaced whole: a panic elsewhere cannot leave one half-written.
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends records to one worker.
#[derive(Clone)]
pub struct WorkerHandle {
    sender: BatchSender<Record>,
}

/// Everything a worker needs besides its sink.
pub struct WorkerSettings {
    /// Route name.
    pub route: Arc<str>,
    /// Channel capacity.
    pub capacity: usize,
    /// Retry policy of the route.
    pub retry: RetryPolicy,
    /// Revoked assignments: records of one whose revoke is over are not delivered any more.
    pub fences: Fences,
    /// Batches the worker may have in its sink at once, for sinks that keep several in order
    /// ([`Sink::start`]); 1: one at a time.
    pub batches_in_flight: usize,
    /// How long a worker that took fewer records than its sink takes at once waits for more
    /// before delivering (an HTTP sink's `linger_ms`); `None`: it delivers what it took.
    pub linger: Option<Linger>,
    /// Where the worker says what it is retrying.
    pub retrying: Retrying,
    /// Cancelled after the final commit of a shutdown: the worker stops delivering and
    /// retrying at once, leaving what it holds unfinished (read again after a restart).
    pub stop: CancellationToken,
    /// The route's view of the dead-letter breaker: counts its outcomes, and holds its failing
    /// records while the breaker is tripped.
    pub breaker: RouteBreaker,
    /// The route's transforms and destination template; `None`: records go as they came.
    pub shape: Option<Arc<RouteShape>>,
}

/// A worker's wait for a fuller batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linger {
    /// Longest wait, from the first record of the batch.
    pub wait: Duration,
    /// Records that make a batch full (no wait then).
    pub fill: usize,
}

impl WorkerHandle {
    /// Starts a worker of `route` that delivers to `sink`.
    pub fn spawn(
        settings: WorkerSettings,
        sink: Box<dyn Sink>,
        committer: CommitterHandle,
        dead_letters: DeadLetterHandle,
        metrics: Arc<Metrics>,
        liveness: Liveness,
    ) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
        // Full: the router waits (and counts the wait as backpressure of this route), its own
        // channel fills, and the consumer pauses partitions.
        let (sender, receiver) = channel::channel(settings.capacity);
        let processed = metrics
            .finished
            .with_label_values(&[&*settings.route, AckStatus::Processed.as_str()]);
        let latency = metrics
            .processing_latency
            .with_label_values(&[&*settings.route])
            .local();
        let delivered_bytes = metrics
            .delivered_bytes
            .with_label_values(&[&*settings.route]);
        let retry_slot = settings.retrying.register();
        let shaper = settings.shape.as_ref().map(RouteShape::shaper);
        let actor = WorkerActor {
            shaper,
            retrying: settings.retrying,
            retry_slot,
            retrying_since: None,
            stop: settings.stop,
            processed,
            delivered_bytes,
            latency,
            route: settings.route,
            retry: settings.retry,
            fences: settings.fences,
            batches_in_flight: settings.batches_in_flight.max(1),
            linger: settings.linger,
            breaker: settings.breaker,
            receiver,
            sink,
            committer,
            dead_letters,
            metrics,
            liveness,
            delivered: 0,
            failed: 0,
        };
        (WorkerHandle { sender }, tokio::spawn(actor.run()))
    }

    /// Hands records to the worker, waiting while its channel is full (a batch larger than the
    /// channel goes in parts). Gives back what was not sent if the worker has stopped.
    pub async fn send(&self, batch: Vec<Record>) -> Result<(), Vec<Record>> {
        self.sender.send(batch).await
    }

    /// Hands a batch over if the channel has room for all of it, else gives it back.
    pub fn offer(&self, batch: Vec<Record>) -> Offer<Record> {
        self.sender.offer(batch)
    }

    pub(crate) fn depth_probe(&self) -> DepthProbe {
        DepthProbe::from_fn(self.sender.depth_reader())
    }

    /// A handle whose records land in the returned receiver, for unit tests of the router.
    #[cfg(test)]
    pub(crate) fn for_test(capacity: usize) -> (WorkerHandle, BatchReceiver<Record>) {
        let (sender, receiver) = channel::channel(capacity);
        (WorkerHandle { sender }, receiver)
    }
}

struct WorkerActor {
    /// Applies the route's transforms and destination template (with this worker's own
    /// throttle state); `None`: the route has neither.
    shaper: Option<Shaper>,
    /// Where this worker says what it retries, under `retry_slot`.
    retrying: Retrying,
    retry_slot: u64,
    /// When the retries under way started (`None`: not retrying).
    retrying_since: Option<Instant>,
    /// Cancelled after the final commit of a shutdown.
    stop: CancellationToken,
    route: Arc<str>,
    retry: RetryPolicy,
    fences: Fences,
    batches_in_flight: usize,
    linger: Option<Linger>,
    breaker: RouteBreaker,
    receiver: BatchReceiver<Record>,
    sink: Box<dyn Sink>,
    committer: CommitterHandle,
    dead_letters: DeadLetterHandle,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    /// This route's `finished{status="processed"}` counter (looked up once, not per record).
    processed: prometheus::IntCounter,
    /// This route's `delivered_bytes_total` counter.
    delivered_bytes: prometheus::IntCounter,
    /// This route's processing latency histogram, observed locally and flushed once per batch
    /// (the route's workers share the histogram: one atomic update per batch, not per record).
    latency: prometheus::local::LocalHistogram,
    /// Records this worker delivered (its own state; shown in logs at exit).
    delivered: u64,
    /// Records this worker could not deliver.
    failed: u64,
}

/// A batch a worker sent and is waiting to hear about.
struct InFlight {
    records: Vec<Record>,
    outcomes: Started,
    started: Instant,
}

/// What a worker with batches in flight does next.
enum Step {
    /// The oldest batch in flight was reported.
    Reported(Vec<Result<(), DeliveryError>>),
    /// Records came from the channel (0: the channel is closed and empty).
    Received(usize),
}

impl WorkerActor {
    #[tracing::instrument(name = "worker", skip_all, fields(route = %self.route))]
    async fn run(mut self) {
        let _alive = self.liveness.enter("worker");
        let outcome = if self.batches_in_flight > 1 {
            self.run_overlapped().await
        } else {
            self.run_one_at_a_time().await
        };
        if let Err(gone) = outcome {
            warn!(error = %gone, "worker stops");
            return;
        }
        tracing::debug!(
            delivered = self.delivered,
            failed = self.failed,
            "worker finished"
        );
    }

    async fn run_one_at_a_time(&mut self) -> Result<(), StageGone> {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = tokio::select! {
                biased;
                _ = self.stop.cancelled() => 0,
                // Cancel-safe: a receive that loses the race took nothing.
                received = self.receiver.recv_many(&mut batch, MAX_BATCH) => received,
            };
            if received == 0 {
                return Ok(());
            }
            if let Some(linger) = self.linger {
                self.fill_up(&mut batch, linger).await;
            }
            let mut records = std::mem::take(&mut batch);
            self.shape(&mut records).await?;
            if records.is_empty() {
                continue;
            }
            self.process(records).await?;
        }
    }

    /// Waits up to `linger.wait` for `batch` to reach `linger.fill` records (or the channel to
    /// close), so that a quiet route sends fewer, fuller requests.
    async fn fill_up(&mut self, batch: &mut Vec<Record>, linger: Linger) {
        let fill = linger.fill.min(MAX_BATCH);
        let deadline = tokio::time::Instant::now() + linger.wait;
        while batch.len() < fill {
            let room = fill - batch.len();
            // Cancel-safe: a receive cut short by the deadline took nothing.
            match tokio::time::timeout_at(deadline, self.receiver.recv_many(batch, room)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Keeps up to `batches_in_flight` batches in the sink at once, started in channel order
    /// and settled in the same order. When a batch has records to retry, nothing new starts:
    /// the batches after it are waited for and settled with its failed keys held back (a
    /// later record of such a key is delivered again after the earlier one), then the retries
    /// run one batch at a time as in [`WorkerActor::process`].
    async fn run_overlapped(&mut self) -> Result<(), StageGone> {
        // The object-store sink has no bound of its own (usize::MAX): what the pipeline lets in.
        let mut window: VecDeque<InFlight> =
            VecDeque::with_capacity(self.batches_in_flight.min(64));
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut open = true;
        loop {
            if self.stop.is_cancelled() {
                // After the final commit: what is in flight is read again after a restart.
                return Ok(());
            }
            let room = open && window.len() < self.batches_in_flight;
            let step = match window.front_mut() {
                None if !open => return Ok(()),
                None => Step::Received(self.receiver.recv_many(&mut batch, MAX_BATCH).await),
                Some(oldest) if room => tokio::select! {
                    // Reports first: they free the committer's view and the window.
                    biased;
                    outcomes = &mut oldest.outcomes => Step::Reported(outcomes),
                    // Cancel-safe: a receive that loses the race took nothing.
                    received = self.receiver.recv_many(&mut batch, MAX_BATCH) => {
                        Step::Received(received)
                    }
                },
                Some(oldest) => Step::Reported((&mut oldest.outcomes).await),
            };
            match step {
                Step::Reported(outcomes) => {
                    let oldest = window.pop_front().expect("the oldest batch was reported");
                    self.settle_window(oldest.records, oldest.started, outcomes, &mut window)
                        .await?;
                }
                Step::Received(0) => {
                    open = false;
                    // Nothing more comes: a sink holding records for more finishes them.
                    self.sink.flush();
                }
                Step::Received(_) => {
                    let mut records = std::mem::take(&mut batch);
                    self.drop_released(&mut records);
                    self.shape(&mut records).await?;
                    if records.is_empty() {
                        continue;
                    }
                    match self.sink.start(&self.route, &records) {
                        Some(outcomes) => window.push_back(InFlight {
                            records,
                            outcomes,
                            started: Instant::now(),
                        }),
                        None => {
                            // A sink that takes one batch at a time: what is in flight first.
                            while let Some(oldest) = window.pop_front() {
                                let outcomes = oldest.outcomes.await;
                                self.settle_window(
                                    oldest.records,
                                    oldest.started,
                                    outcomes,
                                    &mut window,
                                )
                                .await?;
                            }
                            self.process(records).await?;
                        }
                    }
                }
            }
        }
    }

    /// Settles the oldest batch in flight (its `records`, sent at `started`) by its
    /// `outcomes`. If some of it is to be retried, the batches started after it are waited for
    /// and settled with its failed keys held back, and everything to retry is retried, in
    /// order, before anything new starts.
    async fn settle_window(
        &mut self,
        records: Vec<Record>,
        started: Instant,
        outcomes: Vec<Result<(), DeliveryError>>,
        window: &mut VecDeque<InFlight>,
    ) -> Result<(), StageGone> {
        let mut behind = FxHashSet::default();
        self.observe_sink(started);
        let mut retry = self.settle(records, outcomes, 1, &mut behind).await?;
        if retry.is_empty() {
            return Ok(());
        }
        // Everything started is waited for now, and nothing new comes meanwhile.
        self.sink.flush();
        while let Some(next) = window.pop_front() {
            retry.extend(self.settle_in_flight(next, &mut behind).await?);
        }
        let Some(pending) = self.back_off(retry, 1).await else {
            return Ok(());
        };
        self.deliver_until_settled(pending, 1).await
    }

    async fn settle_in_flight(
        &mut self,
        batch: InFlight,
        behind: &mut FxHashSet<u64>,
    ) -> Result<Vec<(Record, DeliveryError)>, StageGone> {
        let outcomes = batch.outcomes.await;
        self.observe_sink(batch.started);
        self.settle(batch.records, outcomes, 1, behind).await
    }

    /// Applies the route's shaping to the records just taken: what it leaves out is finished
    /// as ignored (one ack message), what it cannot handle is dead-lettered, the rest stays in
    /// `records`, in order.
    async fn shape(&mut self, records: &mut Vec<Record>) -> Result<(), StageGone> {
        let Some(shaper) = &mut self.shaper else {
            return Ok(());
        };
        let now = Instant::now();
        let mut left_out = Vec::new();
        let mut failed = Vec::new();
        let mut kept = Vec::with_capacity(records.len());
        for mut record in records.drain(..) {
            match shaper.shape(&mut record, now) {
                Shaped::Deliver => kept.push(record),
                Shaped::Drop => left_out.push(record.ack(AckStatus::Ignored)),
                Shaped::Fail { reason, message } => failed.push((record, reason, message)),
            }
        }
        *records = kept;
        for (record, reason, message) in failed {
            self.failed += 1;
            self.dead_letters
                .fail(DeadLetter {
                    record,
                    stage: Stage::Transform,
                    reason,
                    message,
                    route: self.route.clone(),
                    attempts: 0,
                    dropped_value: None,
                    http_status: None,
                })
                .await?;
        }
        if !left_out.is_empty() {
            self.metrics
                .finished
                .with_label_values(&[&self.route, AckStatus::Ignored.as_str()])
                .inc_by(left_out.len() as u64);
            self.committer.acks(left_out).await?;
        }
        Ok(())
    }

    /// Delivers a batch, retrying what failed transiently, and finishes every record.
    async fn process(&mut self, pending: Vec<Record>) -> Result<(), StageGone> {
        self.deliver_until_settled(pending, 0).await
    }

    /// Delivers `pending` one batch at a time until every record is finished; `attempts`
    /// were made before.
    async fn deliver_until_settled(
        &mut self,
        mut pending: Vec<Record>,
        mut attempts: u32,
    ) -> Result<(), StageGone> {
        loop {
            self.drop_released(&mut pending);
            if pending.is_empty() {
                self.end_retrying();
                return Ok(());
            }
            attempts = attempts.saturating_add(1);
            let started = Instant::now();
            let outcomes = tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    self.abandon(pending.len());
                    return Ok(());
                }
                outcomes = self.sink.deliver(&self.route, &pending) => outcomes,
            };
            self.observe_sink(started);
            let retry = self
                .settle(pending, outcomes, attempts, &mut FxHashSet::default())
                .await?;
            if retry.is_empty() {
                self.end_retrying();
                return Ok(());
            }
            match self.back_off(retry, attempts).await {
                Some(again) => pending = again,
                None => return Ok(()),
            }
        }
    }

    /// The worker no longer retries anything.
    fn end_retrying(&mut self) {
        if self.retrying_since.take().is_some() {
            self.retrying.clear(self.retry_slot);
        }
    }

    /// Leaves `records` unfinished at shutdown (after the final commit): they are read again
    /// after a restart, and nothing of them is acked or dead-lettered.
    fn abandon(&mut self, records: usize) {
        self.end_retrying();
        info!(
            route = %self.route,
            records,
            "shutdown: delivery left unfinished; the records are read again after a restart"
        );
    }

    fn observe_sink(&self, started: Instant) {
        self.metrics
            .sink_latency
            .with_label_values(&[&self.route])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Finishes what a delivery (attempt number `attempts`) settled, acking what went through
    /// and dead-lettering what cannot, and returns what is to be retried. `behind` holds the
    /// keys (by hash) with an earlier record being retried: a later record of such a key does
    /// not count as delivered before it (per-key order), and is retried after it.
    async fn settle(
        &mut self,
        pending: Vec<Record>,
        outcomes: Vec<Result<(), DeliveryError>>,
        attempts: u32,
        behind: &mut FxHashSet<u64>,
    ) -> Result<Vec<(Record, DeliveryError)>, StageGone> {
        let mut retry = Vec::new();
        let mut delivered = Vec::with_capacity(pending.len());
        let mut fenced = 0;
        // Deliveries already counted by the route's breaker (it sees outcomes in order).
        let mut counted = 0;
        let mut delivered_bytes = 0u64;
        let finished_at = std::time::Instant::now();
        let mut outcomes = outcomes.into_iter();
        for record in pending {
            let mut outcome = outcomes.next().unwrap_or_else(|| {
                Err(DeliveryError::retryable(
                    "no_outcome",
                    "sink returned no outcome for the record",
                ))
            });
            // Hashed only once a record is being retried.
            if outcome.is_ok() && !behind.is_empty() && behind.contains(&order_key(&record)) {
                // The sink delivered it while an earlier record of its key failed (the
                // idempotent Kafka producer fails them together; other sinks may not). It is
                // delivered again after that one, so the last copy of each key is in order,
                // and acked only then.
                outcome = Err(DeliveryError::retryable(
                    "key_order",
                    "an earlier record of the same key is being retried",
                ));
            }
            match outcome {
                // The transactional producer did not send it: its assignment was released
                // after `drop_released` let it through (an aborted transaction's rewind, a
                // revoke). Dropped as that would have: its partition is read again.
                Err(err) if err.reason == FENCED => fenced += 1,
                Ok(()) => {
                    self.delivered += 1;
                    delivered_bytes += record.payload().map_or(0, <[u8]>::len) as u64;
                    let latency = finished_at.saturating_duration_since(record.read_at);
                    self.latency.observe(latency.as_secs_f64());
                    delivered.push(record.ack(AckStatus::Processed));
                }
                Err(err)
                    if err.kind == FailureKind::Retryable && self.retry.retries_after(attempts) =>
                {
                    behind.insert(order_key(&record));
                    retry.push((record, err));
                }
                Err(err) => {
                    let reason = if err.kind == FailureKind::Retryable {
                        "retries_exhausted"
                    } else {
                        err.reason
                    };
                    // The route's run of failures is broken by the deliveries before this one.
                    self.breaker.delivered(delivered.len() - counted);
                    counted = delivered.len();
                    if self.breaker.failed(reason) == Verdict::Hold {
                        // The breaker is tripped: nothing more of this route is failed past.
                        // The record waits here, unacked (its offset uncommitted), and is
                        // delivered again once the breaker is reset; at shutdown it is
                        // replayed by the next run.
                        behind.insert(order_key(&record));
                        retry.push((record, err));
                        continue;
                    }
                    self.give_up(record, reason, err, attempts).await?;
                }
            }
        }
        self.latency.flush();
        self.dropped_released(fenced);
        self.breaker.delivered(delivered.len() - counted);
        if !delivered.is_empty() {
            // One message for the batch's acks: one wakeup of the committer, not one each.
            self.processed.inc_by(delivered.len() as u64);
            self.delivered_bytes.inc_by(delivered_bytes);
            self.committer.acks(delivered).await?;
        }
        Ok(retry)
    }

    /// Counts and logs the retries of attempt `attempts`, says so on [`Retrying`], waits the
    /// backoff, and returns the records to deliver again; `None` if the worker was told to stop
    /// meanwhile (the records are left unfinished).
    async fn back_off(
        &mut self,
        retry: Vec<(Record, DeliveryError)>,
        attempts: u32,
    ) -> Option<Vec<Record>> {
        // A destination that said when to come back (HTTP `Retry-After`) is not asked sooner.
        let asked = retry
            .iter()
            .filter_map(|(_, err)| err.retry_after)
            .max()
            .map_or(Duration::ZERO, |asked| asked.min(MAX_RETRY_AFTER));
        let delay = self.retry.delay(attempts).max(asked);
        if self.breaker.is_tripped() {
            let (first, err) = &retry[0];
            warn!(
                route = %self.route,
                topic = %first.source.topic,
                partition = first.source.partition,
                offset = first.offset,
                records = retry.len(),
                error = %err,
                "breaker tripped: records held until it is reset"
            );
            self.breaker.closed().await;
        }
        self.metrics
            .retries
            .with_label_values(&[&self.route])
            .inc_by(retry.len() as u64);
        let (first, err) = &retry[0];
        warn!(
            route = %self.route,
            topic = %first.source.topic,
            partition = first.source.partition,
            offset = first.offset,
            records = retry.len(),
            attempt = attempts,
            retry_in_ms = delay.as_millis() as u64,
            error = %err,
            "delivery failed, retrying"
        );
        let since = *self.retrying_since.get_or_insert_with(Instant::now);
        self.retrying.set(
            self.retry_slot,
            SinkRetry {
                route: self.route.clone(),
                since,
                attempts,
                records: retry.len(),
                error: err.to_string(),
            },
        );
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => {
                self.abandon(retry.len());
                return None;
            }
            _ = tokio::time::sleep(delay) => {}
        }
        Some(retry.into_iter().map(|(record, _)| record).collect())
    }

    /// Drops the records of assignments whose revoke is over (retried, or queued while the
    /// worker retried): their partition has a new owner that reads them again, and a copy
    /// delivered from here could land after its copies of later records of the same key. The
    /// committer counted them as abandoned at the revoke; they never finish here.
    fn drop_released(&self, pending: &mut Vec<Record>) {
        let dropped = self.fences.remove_released(pending);
        self.dropped_released(dropped);
    }

    /// Counts out `dropped` records of released assignments (never finished here).
    fn dropped_released(&self, dropped: usize) {
        if dropped > 0 {
            self.metrics.in_flight.sub(dropped as i64);
            tracing::debug!(
                route = %self.route,
                records = dropped,
                "records of a revoked or rewound assignment not delivered: their partition is read again"
            );
        }
    }

    async fn give_up(
        &mut self,
        record: Record,
        reason: &'static str,
        err: DeliveryError,
        attempts: u32,
    ) -> Result<(), StageGone> {
        self.failed += 1;
        self.metrics
            .sink_errors
            .with_label_values(&[&self.route])
            .inc();
        self.dead_letters
            .fail(DeadLetter {
                record,
                stage: Stage::Sink,
                reason,
                message: err.message,
                route: self.route.clone(),
                attempts,
                dropped_value: None,
                http_status: err.status,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::committer::CommitterMsg;
    use crate::record::test_record;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_retries: Some(10),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1_000),
        };
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            firsts.insert(first);
            let third = policy.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.delay(30);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1_000));
        }
        // Jitter: the delays spread over their range rather than all being equal.
        assert!(
            firsts.len() > 100,
            "{} distinct delays of 200",
            firsts.len()
        );
        let spread = *firsts.last().expect("some") - *firsts.first().expect("some");
        assert!(spread > Duration::from_millis(30), "spread {spread:?}");
    }

    /// What one delivery was given: each record's key and offset.
    type Delivery = Vec<(Option<String>, i64)>;

    fn delivery(batch: &[Record]) -> Delivery {
        batch
            .iter()
            .map(|record| {
                let key = record
                    .key()
                    .map(|key| String::from_utf8_lossy(key).into_owned());
                (key, record.offset)
            })
            .collect()
    }

    /// A sink that answers each delivery from a script and remembers what it was given.
    struct Scripted {
        answers: VecDeque<Vec<Result<(), DeliveryError>>>,
        seen: Arc<Mutex<Vec<Delivery>>>,
        /// After the first delivery, the revoke of partition 0's first assignment is over.
        release_after_first: Option<Fences>,
    }

    impl Sink for Scripted {
        fn deliver<'a>(
            &'a mut self,
            _route: &'a str,
            batch: &'a [Record],
        ) -> crate::sink::DeliveryFuture<'a> {
            self.seen.lock().expect("seen").push(delivery(batch));
            if let Some(fences) = self.release_after_first.take() {
                let source = batch[0].source.clone();
                fences.revoke(&source, 1);
                fences.release(&source, 1);
            }
            let answers = self
                .answers
                .pop_front()
                .unwrap_or_else(|| vec![Ok(()); batch.len()]);
            Box::pin(std::future::ready(answers))
        }
    }

    struct Run {
        /// Offsets acked, in ack order, with their status.
        acks: Vec<(i64, AckStatus, Option<&'static str>)>,
        /// What each delivery was given.
        seen: Vec<Delivery>,
        metrics: Arc<Metrics>,
    }

    /// Runs one worker over `records` with a scripted sink and no dead-letter topic.
    async fn run(
        records: Vec<Record>,
        answers: Vec<Vec<Result<(), DeliveryError>>>,
        max_retries: u32,
    ) -> Run {
        run_releasing(records, answers, max_retries, false).await
    }

    /// `run`; with `release`, partition 0's first assignment is revoked for good right after
    /// the first delivery (a rebalance while the worker retries).
    async fn run_releasing(
        records: Vec<Record>,
        answers: Vec<Vec<Result<(), DeliveryError>>>,
        max_retries: u32,
        release: bool,
    ) -> Run {
        let fences = Fences::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Scripted {
            answers: answers.into(),
            seen: seen.clone(),
            release_after_first: release.then(|| fences.clone()),
        };
        let mut worker = spawn(Box::new(sink), fences, max_retries, 1);
        // One batch: every record is in the channel before the worker takes any.
        assert!(matches!(worker.handle.offer(records), Offer::Taken));
        let acks = worker.finish().await;
        let seen = seen.lock().expect("seen").clone();
        Run {
            acks,
            seen,
            metrics: worker.metrics,
        }
    }

    /// A worker under test, and what it tells the committer.
    struct Spawned {
        handle: WorkerHandle,
        task: tokio::task::JoinHandle<()>,
        messages: tokio::sync::mpsc::Receiver<CommitterMsg>,
        metrics: Arc<Metrics>,
    }

    type Ack = (i64, AckStatus, Option<&'static str>);

    impl Spawned {
        /// The acks sent so far, in order.
        fn acks(&mut self) -> Vec<Ack> {
            let mut acks = Vec::new();
            while let Ok(message) = self.messages.try_recv() {
                let list = match message {
                    CommitterMsg::Ack(ack) => vec![ack],
                    CommitterMsg::Acks(acks) => acks,
                    CommitterMsg::Dispatched(_) => continue,
                };
                acks.extend(
                    list.into_iter()
                        .map(|ack| (ack.offset, ack.status, ack.cause.map(|cause| cause.reason))),
                );
            }
            acks
        }

        /// Closes the worker's input, waits for it to finish everything and returns the acks
        /// not taken yet.
        async fn finish(&mut self) -> Vec<Ack> {
            let (closed, _) = WorkerHandle::for_test(1);
            drop(std::mem::replace(&mut self.handle, closed));
            (&mut self.task).await.expect("worker ran");
            self.acks()
        }
    }

    fn spawn(sink: Box<dyn Sink>, fences: Fences, max_retries: u32, batches: usize) -> Spawned {
        spawn_lingering(sink, fences, max_retries, batches, None)
    }

    fn spawn_lingering(
        sink: Box<dyn Sink>,
        fences: Fences,
        max_retries: u32,
        batches: usize,
        linger: Option<Linger>,
    ) -> Spawned {
        spawn_guarded(
            sink,
            fences,
            max_retries,
            batches,
            linger,
            RouteBreaker::disarmed("r"),
        )
    }

    fn spawn_guarded(
        sink: Box<dyn Sink>,
        fences: Fences,
        max_retries: u32,
        batches: usize,
        linger: Option<Linger>,
        breaker: RouteBreaker,
    ) -> Spawned {
        spawn_full(
            sink,
            fences,
            Some(max_retries),
            batches,
            linger,
            (Retrying::default(), CancellationToken::new()),
            breaker,
        )
    }

    /// A worker of route `r` under `breaker`, whose sink answers `answers` (one list per
    /// delivery) and records what it was given.
    fn spawn_scripted_route(
        answers: Vec<Vec<Result<(), DeliveryError>>>,
        breaker: &crate::breaker::BreakerHandle,
    ) -> (Spawned, Arc<Mutex<Vec<Delivery>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Scripted {
            answers: answers.into(),
            seen: seen.clone(),
            release_after_first: None,
        };
        let worker = spawn_guarded(
            Box::new(sink),
            Fences::default(),
            5,
            1,
            None,
            breaker.route(Arc::from("r")),
        );
        (worker, seen)
    }

    fn spawn_with(
        sink: Box<dyn Sink>,
        fences: Fences,
        max_retries: Option<u32>,
        batches: usize,
        linger: Option<Linger>,
        retrying: Retrying,
        stop: CancellationToken,
    ) -> Spawned {
        spawn_full(
            sink,
            fences,
            max_retries,
            batches,
            linger,
            (retrying, stop),
            RouteBreaker::disarmed("r"),
        )
    }

    fn spawn_full(
        sink: Box<dyn Sink>,
        fences: Fences,
        max_retries: Option<u32>,
        batches: usize,
        linger: Option<Linger>,
        (retrying, stop): (Retrying, CancellationToken),
        breaker: RouteBreaker,
    ) -> Spawned {
        let metrics = Arc::new(Metrics::new());
        let (committer, messages, dead_letters) = DeadLetterHandle::for_test(&metrics);
        let settings = WorkerSettings {
            route: Arc::from("r"),
            capacity: 16,
            retry: RetryPolicy {
                max_retries,
                backoff: Duration::from_millis(10),
                backoff_max: Duration::from_millis(100),
            },
            fences,
            batches_in_flight: batches,
            linger,
            retrying,
            stop,
            breaker,
            shape: None,
        };
        let (handle, task) = WorkerHandle::spawn(
            settings,
            sink,
            committer,
            dead_letters,
            metrics.clone(),
            Liveness::default(),
        );
        Spawned {
            handle,
            task,
            messages,
            metrics,
        }
    }

    /// Whether `condition` holds within `deadline` (checked every 5 ms).
    async fn eventually(deadline: Duration, condition: impl Fn() -> bool) -> bool {
        let until = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < until {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        condition()
    }

    #[tokio::test]
    async fn a_lingering_worker_waits_for_a_fuller_batch_but_not_past_its_wait() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Scripted {
            answers: VecDeque::new(),
            seen: seen.clone(),
            release_after_first: None,
        };
        let linger = Linger {
            wait: Duration::from_millis(300),
            fill: 5,
        };
        let mut worker = spawn_lingering(Box::new(sink), Fences::default(), 0, 1, Some(linger));
        let started = std::time::Instant::now();
        // Three records, then two more within the wait: one delivery of five, at once.
        assert!(matches!(
            worker.handle.offer((0..3).map(|o| keyed("k", o)).collect()),
            Offer::Taken
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(seen.lock().expect("seen").is_empty(), "waiting for more");
        assert!(matches!(
            worker.handle.offer((3..5).map(|o| keyed("k", o)).collect()),
            Offer::Taken
        ));
        let full = eventually(Duration::from_secs(2), || {
            seen.lock().expect("seen").len() == 1
        })
        .await;
        assert!(full, "a full batch is delivered");
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "without waiting out the linger"
        );
        // One record alone: delivered when the wait is over.
        let alone = std::time::Instant::now();
        assert!(matches!(
            worker.handle.offer(vec![keyed("k", 5)]),
            Offer::Taken
        ));
        let delivered = eventually(Duration::from_secs(2), || {
            seen.lock().expect("seen").len() == 2
        })
        .await;
        assert!(delivered, "a lone record is delivered after the wait");
        let waited = alone.elapsed();
        assert!(waited >= Duration::from_millis(280), "waited {waited:?}");
        let acks = worker.finish().await;
        let seen = seen.lock().expect("seen").clone();
        assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), [5, 1]);
        assert_eq!(acks.len(), 6);
        let payload = br#"{"level":"info","message":"m"}"#.len() as u64;
        assert_eq!(
            worker
                .metrics
                .delivered_bytes
                .with_label_values(&["r"])
                .get(),
            6 * payload,
            "delivered bytes counted"
        );
    }

    fn keyed(key: &str, offset: i64) -> Record {
        test_record(
            0,
            offset,
            Some(key.as_bytes()),
            Some(br#"{"level":"info","message":"m"}"#),
        )
    }

    fn retryable() -> Result<(), DeliveryError> {
        Err(DeliveryError::retryable("timed_out", "no answer"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_record_of_a_failed_key_is_delivered_again_after_it_and_acked_only_then() {
        let run = run(
            vec![keyed("a", 1), keyed("b", 2), keyed("a", 3)],
            // a@1 fails, yet the sink says a@3 went through.
            vec![vec![retryable(), Ok(()), Ok(())]],
            3,
        )
        .await;
        let key = |k: &str, offset| (Some(k.to_string()), offset);
        assert_eq!(
            run.seen,
            vec![
                vec![key("a", 1), key("b", 2), key("a", 3)],
                vec![key("a", 1), key("a", 3)],
            ],
            "a@3 is delivered again after a@1"
        );
        let acked: Vec<i64> = run.acks.iter().map(|(offset, _, _)| *offset).collect();
        assert_eq!(acked, vec![2, 1, 3], "nothing of key a acked before a@1");
        assert!(run
            .acks
            .iter()
            .all(|(_, status, _)| *status == AckStatus::Processed));
        assert_eq!(run.metrics.retries.with_label_values(&["r"]).get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_in_retries_exhausted_after_max_retries() {
        let run = run(
            vec![keyed("a", 7)],
            vec![vec![retryable()], vec![retryable()], vec![retryable()]],
            2,
        )
        .await;
        assert_eq!(run.seen.len(), 3, "the first attempt and 2 retries");
        assert_eq!(
            run.acks,
            vec![(7, AckStatus::Failed, Some("retries_exhausted"))]
        );
        assert_eq!(run.metrics.sink_errors.with_label_values(&["r"]).get(), 1);
    }

    /// A sink that fails every delivery retryably, forever.
    struct Down {
        attempts: Arc<std::sync::atomic::AtomicU32>,
    }

    impl Sink for Down {
        fn deliver<'a>(
            &'a mut self,
            _route: &'a str,
            batch: &'a [Record],
        ) -> crate::sink::DeliveryFuture<'a> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(std::future::ready(vec![retryable(); batch.len()]))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_max_retries_a_worker_retries_until_delivered_and_says_so() {
        // 40 failed attempts (far past any old default), then through.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Scripted {
            answers: (0..40).map(|_| vec![retryable()]).collect(),
            seen: seen.clone(),
            release_after_first: None,
        };
        let retrying = Retrying::default();
        let mut worker = spawn_with(
            Box::new(sink),
            Fences::default(),
            None,
            1,
            None,
            retrying.clone(),
            CancellationToken::new(),
        );
        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 9)]),
            Offer::Taken
        ));
        let said = eventually(Duration::from_secs(5), || {
            retrying
                .snapshot()
                .first()
                .is_some_and(|retry| retry.attempts >= 3)
        })
        .await;
        assert!(said, "the retrying worker is shown");
        let shown = retrying.snapshot()[0].to_string();
        assert!(
            shown.starts_with("route `r` retrying since") && shown.contains("no answer"),
            "{shown}"
        );
        let acks = worker.finish().await;
        assert_eq!(seen.lock().expect("seen").len(), 41);
        assert_eq!(acks, vec![(9, AckStatus::Processed, None)]);
        assert!(retrying.snapshot().is_empty(), "no longer retrying");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_told_to_stop_leaves_its_retries_unfinished() {
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let sink = Down {
            attempts: attempts.clone(),
        };
        let retrying = Retrying::default();
        let stop = CancellationToken::new();
        let mut worker = spawn_with(
            Box::new(sink),
            Fences::default(),
            None,
            1,
            None,
            retrying.clone(),
            stop.clone(),
        );
        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 1), keyed("b", 2)]),
            Offer::Taken
        ));
        let retried = eventually(Duration::from_secs(60), || {
            attempts.load(std::sync::atomic::Ordering::SeqCst) >= 10
        })
        .await;
        assert!(retried);
        stop.cancel();
        // The input stays open: only the stop ends the worker.
        let ended = tokio::time::timeout(Duration::from_secs(5), &mut worker.task).await;
        assert!(ended.is_ok(), "the worker ended when told to stop");
        assert_eq!(worker.acks(), vec![], "nothing acked, nothing given up on");
        assert_eq!(
            worker.metrics.sink_errors.with_label_values(&["r"]).get(),
            0
        );
        assert!(retrying.snapshot().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_route_fails_at_most_max_consecutive_records_then_holds_the_rest() {
        use crate::breaker::{BreakerState, BreakerSwitch};
        use crate::config::BreakerConfig;
        let config = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 1000,
            max_consecutive: 3,
        };
        let (mut switch, handle) = BreakerSwitch::new(config, Arc::new(Metrics::new()));
        let expired = || Err(DeliveryError::permanent("http_401", "401 Unauthorized"));
        // The first delivery is refused whole (an expired token); the next succeed.
        let (mut worker, seen) =
            spawn_scripted_route(vec![(0..10).map(|_| expired()).collect()], &handle);
        let records: Vec<Record> = (0..10).map(|offset| keyed("k", offset)).collect();
        assert!(matches!(worker.handle.offer(records), Offer::Taken));
        let mut acks = Vec::new();
        for _ in 0..100 {
            if matches!(handle.state(), BreakerState::Tripped(_)) && acks.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            acks.extend(worker.acks());
        }
        // Time passes (paused clock): nothing more is failed past while it is tripped.
        tokio::time::sleep(Duration::from_secs(60)).await;
        acks.extend(worker.acks());
        let failed = |offset| (offset, AckStatus::Failed, Some("http_401"));
        assert_eq!(
            acks,
            vec![failed(0), failed(1), failed(2)],
            "the bound: max_consecutive"
        );
        match handle.state() {
            BreakerState::Tripped(trip) => {
                assert!(
                    trip.limit.contains("route r: 4 failed records in a row"),
                    "{}",
                    trip.limit
                )
            }
            BreakerState::Closed => panic!("the fourth failure in a row trips it"),
        }
        assert_eq!(
            seen.lock().expect("seen").len(),
            1,
            "held, not delivered again"
        );
        // The operator fixes the token and resumes: the held records are delivered.
        assert!(handle.reset());
        switch.serve_reset().await;
        let mut rest = Vec::new();
        for _ in 0..100 {
            if rest.len() >= 7 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            rest.extend(worker.acks());
        }
        let processed: Vec<Ack> = (3..10)
            .map(|offset| (offset, AckStatus::Processed, None))
            .collect();
        assert_eq!(rest, processed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_between_failures_of_a_batch_breaks_the_routes_run() {
        use crate::breaker::{BreakerState, BreakerSwitch};
        use crate::config::BreakerConfig;
        let config = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 1000,
            max_consecutive: 3,
        };
        let (_switch, handle) = BreakerSwitch::new(config, Arc::new(Metrics::new()));
        let refused = || Err(DeliveryError::permanent("http_400", "400 Bad Request"));
        // Three failures, a delivery, three failures: never more than 3 in a row.
        let answers = vec![
            refused(),
            refused(),
            refused(),
            Ok(()),
            refused(),
            refused(),
            refused(),
        ];
        let (mut worker, _) = spawn_scripted_route(vec![answers], &handle);
        let records: Vec<Record> = (0..7).map(|offset| keyed("k", offset)).collect();
        assert!(matches!(worker.handle.offer(records), Offer::Taken));
        let acks = worker.finish().await;
        assert_eq!(acks.len(), 7, "{acks:?}");
        assert_eq!(handle.state(), BreakerState::Closed, "{acks:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_not_retried() {
        let run = run(
            vec![keyed("a", 4), keyed("b", 5)],
            vec![vec![
                Err(DeliveryError::permanent("record_too_large", "too big")),
                Ok(()),
            ]],
            5,
        )
        .await;
        assert_eq!(run.seen.len(), 1, "one attempt only");
        assert_eq!(
            run.acks,
            vec![
                (4, AckStatus::Failed, Some("record_too_large")),
                (5, AckStatus::Processed, None)
            ]
        );
        assert_eq!(run.metrics.retries.with_label_values(&["r"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_an_assignment_whose_revoke_is_over_are_not_delivered_again() {
        // a@1 fails; while it waits to be retried, its partition's revoke ends (the next
        // owner reads it again): it is not delivered again from here, nor acked.
        let mut other = keyed("b", 2);
        other.source.partition = 1;
        let run = run_releasing(
            vec![keyed("a", 1), other],
            vec![vec![retryable(), retryable()]],
            5,
            true,
        )
        .await;
        assert_eq!(
            run.seen,
            vec![
                vec![(Some("a".to_string()), 1), (Some("b".to_string()), 2)],
                vec![(Some("b".to_string()), 2)]
            ],
            "only partition 1's record is retried"
        );
        assert_eq!(run.acks, vec![(2, AckStatus::Processed, None)]);
        assert_eq!(
            run.metrics.in_flight.get(),
            -1,
            "the dropped record left the in-flight count (the consumer counted it in)"
        );
    }

    /// A sink that keeps several batches in flight: each `start` is answered when the test
    /// sends the answer; retries (`deliver`) go through at once.
    struct Overlapping {
        seen: Arc<Mutex<Vec<Delivery>>>,
        answers: VecDeque<tokio::sync::oneshot::Receiver<Vec<Result<(), DeliveryError>>>>,
    }

    impl Sink for Overlapping {
        fn deliver<'a>(
            &'a mut self,
            _route: &'a str,
            batch: &'a [Record],
        ) -> crate::sink::DeliveryFuture<'a> {
            self.seen.lock().expect("seen").push(delivery(batch));
            Box::pin(std::future::ready(vec![Ok(()); batch.len()]))
        }

        fn start(&mut self, _route: &str, batch: &[Record]) -> Option<Started> {
            self.seen.lock().expect("seen").push(delivery(batch));
            let answer = self.answers.pop_front().expect("an answer for each batch");
            Some(Box::pin(async move { answer.await.expect("answered") }))
        }
    }

    async fn wait_for_deliveries(seen: &Mutex<Vec<Delivery>>, count: usize) {
        for _ in 0..1_000 {
            if seen.lock().expect("seen").len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{count} deliveries never started");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_in_flight_settle_in_order_and_a_retry_holds_later_records_of_its_key() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (answer, answers): (Vec<_>, VecDeque<_>) =
            (0..3).map(|_| tokio::sync::oneshot::channel()).unzip();
        let sink = Overlapping {
            seen: seen.clone(),
            answers,
        };
        let mut worker = spawn(Box::new(sink), Fences::default(), 3, 2);
        let mut answer = answer.into_iter();
        let (first, second, third) = (
            answer.next().expect("3"),
            answer.next().expect("3"),
            answer.next().expect("3"),
        );

        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 1), keyed("b", 2)]),
            Offer::Taken
        ));
        wait_for_deliveries(&seen, 1).await;
        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 3), keyed("c", 4)]),
            Offer::Taken
        ));
        wait_for_deliveries(&seen, 2).await;
        assert!(matches!(
            worker.handle.offer(vec![keyed("d", 5)]),
            Offer::Taken
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            seen.lock().expect("seen").len(),
            2,
            "a third batch waits while two are in flight"
        );

        // The second batch is reported first: nothing of it is acked before the first settles.
        second.send(vec![Ok(()), Ok(())]).expect("worker waits");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            worker.acks(),
            vec![],
            "acks follow the order batches started in"
        );

        // a@1 fails: a@3, reported through in the batch after it, is delivered again after it.
        first.send(vec![retryable(), Ok(())]).expect("worker waits");
        wait_for_deliveries(&seen, 4).await;
        third.send(vec![Ok(())]).expect("worker waits");
        let acks = worker.finish().await;

        let key = |k: &str, offset| (Some(k.to_string()), offset);
        assert_eq!(
            *seen.lock().expect("seen"),
            vec![
                vec![key("a", 1), key("b", 2)],
                vec![key("a", 3), key("c", 4)],
                vec![key("a", 1), key("a", 3)],
                vec![key("d", 5)],
            ],
            "a@3 again after a@1, and the third batch only after the retry"
        );
        let acked: Vec<i64> = acks.iter().map(|(offset, _, _)| *offset).collect();
        assert_eq!(
            acked,
            vec![2, 4, 1, 3, 5],
            "nothing of key a acked before a@1"
        );
        assert!(acks
            .iter()
            .all(|(_, status, _)| *status == AckStatus::Processed));
        assert_eq!(
            worker.metrics.retries.with_label_values(&["r"]).get(),
            2,
            "a@1 failed, a@3 held back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_finishes_its_batches_in_flight_when_its_input_ends() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (first, answer) = tokio::sync::oneshot::channel();
        let sink = Overlapping {
            seen: seen.clone(),
            answers: VecDeque::from([answer]),
        };
        let mut worker = spawn(Box::new(sink), Fences::default(), 3, 4);
        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 1), keyed("b", 2)]),
            Offer::Taken
        ));
        wait_for_deliveries(&seen, 1).await;
        let (closed, _) = WorkerHandle::for_test(1);
        drop(std::mem::replace(&mut worker.handle, closed));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !worker.task.is_finished(),
            "the batch in flight is waited for"
        );
        first
            .send(vec![
                Ok(()),
                Err(DeliveryError::permanent("record_too_large", "big")),
            ])
            .expect("worker waits");
        let mut acks = worker.finish().await;
        acks.sort_by_key(|(offset, _, _)| *offset);
        assert_eq!(
            acks,
            vec![
                (1, AckStatus::Processed, None),
                (2, AckStatus::Failed, Some("record_too_large"))
            ]
        );
    }

    /// The end of an aborted transaction as the consumer thread runs it
    /// (`Transactions::end`): abort, rewind (the rewound assignment's generation is revoked and
    /// released), begin the next transaction.
    fn abort_and_rewind(producer: &crate::producer::Producer, fences: &Fences, record: &Record) {
        use rdkafka::producer::Producer as _;
        let client = producer.transactional_client();
        client
            .abort_transaction(Duration::from_secs(10))
            .expect("abort");
        fences.revoke(&record.source, record.generation);
        fences.release(&record.source, record.generation);
        client
            .begin_transaction()
            .expect("begin the next transaction");
    }

    /// A Kafka route's sink on the transactional producer whose first delivery is failed by
    /// an abort's purge, and whose retry meets the end of that transaction: the worker has
    /// checked the retry against the fences already when the consumer thread aborts, rewinds
    /// and begins the next transaction, before the retry's records reach librdkafka (a worker
    /// thread preempted between the two, or a batch long enough to be sent while the consumer
    /// thread ends the transaction).
    struct RetryMeetsAbort {
        producer: crate::producer::Producer,
        fences: Fences,
        deliveries: usize,
    }

    impl Sink for RetryMeetsAbort {
        fn deliver<'a>(
            &'a mut self,
            route: &'a str,
            batch: &'a [Record],
        ) -> crate::sink::DeliveryFuture<'a> {
            self.deliveries += 1;
            if self.deliveries == 1 {
                let purged = DeliveryError::retryable(
                    "delivery_failed",
                    "Local: Purged in queue (the transaction is being aborted)",
                );
                return Box::pin(std::future::ready(vec![Err(purged); batch.len()]));
            }
            if self.deliveries == 2 {
                abort_and_rewind(&self.producer, &self.fences, &batch[0]);
            }
            let outgoing = batch.iter().map(move |record| crate::producer::Outgoing {
                record,
                value: record.payload(),
                headers: crate::producer::own_headers(
                    record,
                    &[("logbridge.route", route.as_bytes())],
                ),
                timestamp: None,
                topic: None,
            });
            Box::pin(crate::producer::send_all(&self.producer, "out", outgoing))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_of_an_aborted_transactions_record_is_not_written_in_the_next_transaction() {
        use rdkafka::producer::Producer as _;
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        mock.create_topic("out", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let options = std::collections::BTreeMap::new();
        let cluster = crate::config::Cluster {
            brokers: &brokers,
            security: None,
            options: &options,
        };
        let fences = Fences::default();
        let producer =
            crate::producer::create_transactional(cluster, "worker-retry-test", fences.clone())
                .expect("producer");
        let client = producer.transactional_client();
        client
            .init_transactions(Duration::from_secs(30))
            .expect("init_transactions");
        client.begin_transaction().expect("begin");
        let sink = RetryMeetsAbort {
            producer: producer.clone(),
            fences: fences.clone(),
            deliveries: 0,
        };
        let mut worker = spawn_with(
            Box::new(sink),
            fences,
            None,
            4,
            None,
            Retrying::default(),
            CancellationToken::new(),
        );
        assert!(matches!(
            worker.handle.offer(vec![keyed("a", 1), keyed("b", 2)]),
            Offer::Taken
        ));
        let acks = worker.finish().await;
        // The partition is read again from the last commit under a new generation, and those
        // copies are written in the transaction that commits them: a copy written from here
        // would be committed beside them.
        let (_, written) = client
            .client()
            .fetch_watermarks("out", 0, Duration::from_secs(10))
            .expect("watermarks");
        client
            .commit_transaction(Duration::from_secs(10))
            .expect("commit");
        assert_eq!(
            written, 0,
            "a record of the aborted transaction was written in the next one"
        );
        assert!(
            acks.is_empty(),
            "nothing of the rewound assignment is finished here: {acks:?}"
        );
        assert_eq!(
            worker.metrics.in_flight.get(),
            -2,
            "the dropped records left the in-flight count (the consumer counted them in)"
        );
    }
}
