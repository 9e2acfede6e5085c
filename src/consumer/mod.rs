//! Consumer actor: the only owner of the librdkafka client. It polls Kafka on a dedicated
//! thread, copies each record out of librdkafka's buffer, and sends what one poll burst read to
//! the router as one batch (at most half the router channel, at most 256 records), waiting at
//! most `pause_after_ms` for room. It does not decode: the router does, so that the JSON work
//! runs beside the polling instead of after it.
//!
//! - `mod.rs` (here): the poll loop, backpressure (pause, hold, resume) and shutdown.
//! - [`client`]: the librdkafka configuration and logbridge's defaults.
//! - [`assignment`]: the owned partitions and their flow, and the view `/status` reads.
//! - [`rebalance`]: librdkafka's callbacks (assign, revoke, lost, statistics).
//! - [`commits`]: commit I/O (interval, revoke, final); the committer decides what.
//!
//! Why a thread and not a task: librdkafka runs rebalance callbacks inside `poll`, and a revoke
//! must drain and commit *before* the callback returns. That wait would block a runtime worker;
//! on its own thread it blocks nothing but Kafka polling, which is exactly what should wait.
//!
//! Backpressure: when the router channel is full the consumer first waits, up to
//! `pause_after_ms`, for half of it to be free (a busy pipeline makes room quickly, and a pause
//! would throw away librdkafka's prefetch for the partition). If it stays full, the batch in
//! hand is kept, by partition, every partition is paused, and polling goes on (the group and
//! rebalance callbacks stay served: rust-rdkafka #738); so what is held back never exceeds one
//! batch. Paused partitions resume, oldest held record first, round robin, once the channel
//! has drained to half its capacity. librdkafka restarts a resumed
//! partition's fetch at the position after the last record it returned, which is right after
//! what we hold, so nothing is skipped.
//!
//! The same pause, with its own reason (shown by `/status`), holds a partition when the
//! pipeline holds `max_in_flight_bytes` (resumed when half is free), while the committer holds
//! it for `max_uncommitted_records`, and while the dead-letter breaker is tripped.

mod assignment;
mod client;
mod commits;
mod rebalance;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use assignment::{PartitionFlow, PartitionView};
pub use client::client_config;
pub(crate) use commits::commit_list;

use crate::breaker::BreakerState;
use crate::channel::Offer;
use crate::committer::{CommitterControl, FinalPositions, Holds};
use crate::config::Config;
use crate::event::DecodeError;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::record::{ByteBudget, Fences, KeyValue, PartitionKey, Record};
use crate::router::RouterHandle;
use assignment::{Assignment, Flow, PauseWhy, ReadMark, ReadOrder, Skipped};
use commits::{CommitWhy, Commits};
use rebalance::Callbacks;

/// How long one poll waits when nothing is held back.
const POLL_IDLE: Duration = Duration::from_millis(100);
/// How long one poll waits while records are held for a full router: short, so the held
/// records move as soon as there is room.
const POLL_HELD: Duration = Duration::from_millis(5);
/// Longest wait for the final commit at shutdown: a synchronous commit waits for a rebalance in
/// flight, which can take a session timeout when a member died, and shutdown must stay within
/// `drain_timeout_ms` + a few seconds.
const FINAL_COMMIT_WAIT: Duration = Duration::from_millis(1_000);
/// Most one log line per this interval for records returned again (see `accept`).
const READ_AGAIN_LOG_EVERY: Duration = Duration::from_secs(30);
/// How often the consumer looks for partitions that are behind and not read.
const UNREAD_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long the consumer waits for the commit thread to end before it leaves the group.
const COMMIT_THREAD_WAIT: Duration = Duration::from_millis(500);
/// Extra wait for the committer's final answer beyond the drain timeout.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// What the consumer talks to.
pub struct ConsumerLinks {
    /// Where records go.
    pub router: RouterHandle,
    /// Revoke and shutdown requests to the committer, and its commit plans.
    pub committer: CommitterControl,
    /// The dead-letter breaker's state.
    pub breaker: watch::Receiver<BreakerState>,
    /// Revoked generations, shared with the router.
    pub fences: Fences,
    /// `delivery = "exactly-once"`: the transactional producer and the router's gate.
    pub transactions: Option<(crate::producer::Producer, crate::transaction::DispatchGate)>,
}

/// The consumer as the rest of the pipeline sees it: its partitions, and its outcome.
pub struct ConsumerHandle {
    partitions: PartitionView,
    outcome: oneshot::Receiver<anyhow::Result<()>>,
}

impl ConsumerHandle {
    /// Creates the Kafka client, subscribes to the configured topics (so configuration errors
    /// surface here) and starts the consumer on its own thread. The thread ends after the final
    /// commit and leaving the group; see [`ConsumerHandle::outcome`].
    pub fn spawn(
        config: &Config,
        links: ConsumerLinks,
        metrics: Arc<Metrics>,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(ConsumerHandle, std::thread::JoinHandle<()>)> {
        let actor = ConsumerActor::new(config, links, metrics, liveness, shutdown)?;
        let partitions = actor.consumer.context().assignment.view();
        let (outcome_tx, outcome) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("logbridge-consumer".to_string())
            .spawn(move || actor.run(outcome_tx))
            .context("failed to start the consumer thread")?;
        Ok((
            ConsumerHandle {
                partitions,
                outcome,
            },
            thread,
        ))
    }

    /// A view of the owned partitions for the HTTP endpoint.
    pub fn partitions(&self) -> PartitionView {
        self.partitions.clone()
    }

    /// Waits until shutdown has drained and made its final commit (or the consumer failed).
    /// Leaving the group comes after; the caller need not wait for that.
    pub async fn outcome(self) -> anyhow::Result<()> {
        self.outcome.await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "consumer thread stopped without an outcome"
            ))
        })
    }
}

/// What a shutdown had to leave undone: the process then exits non-zero, and the records after
/// the last commit are read again after a restart.
#[derive(Debug, thiserror::Error)]
pub enum Abandoned {
    /// The drain timeout passed with records still in flight.
    #[error("shutdown abandoned {0} unfinished records (drain_timeout_ms passed); they are read again after a restart")]
    Unfinished(usize),
    /// Exactly-once: the last transaction could not be committed.
    #[error("the last transaction was aborted at shutdown ({0}); records since the last committed transaction are read again after a restart")]
    Aborted(&'static str),
    /// The committer did not answer.
    #[error("no final positions from the committer; records since the last commit are read again after a restart")]
    NoFinalPositions,
}

/// Lifecycle of the consumer thread.
enum Phase {
    /// Reading and dispatching.
    Consuming,
    /// Shutdown asked: nothing new is dispatched; waiting for the committer's final positions.
    Draining {
        answer: oneshot::Receiver<FinalPositions>,
        give_up_at: std::time::Instant,
    },
}

struct ConsumerActor {
    /// Shared only with the commit thread (see `commits`).
    consumer: Arc<BaseConsumer<Callbacks>>,
    /// The commit thread, for the final commit.
    commits: Commits,
    commit_thread: Option<std::thread::JoinHandle<()>>,
    breaker: watch::Receiver<BreakerState>,
    /// Partitions the committer holds for their uncommitted records.
    holds: watch::Receiver<Holds>,
    /// Bytes in flight against `max_in_flight_bytes`.
    budget: Arc<ByteBudget>,
    /// For the commit thread and the wait for router room, which wait on tokio primitives.
    runtime: tokio::runtime::Handle,
    /// `None` once shutdown has released it.
    router: Option<RouterHandle>,
    committer: CommitterControl,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    max_payload_bytes: usize,
    pause_after: Duration,
    drain_timeout: Duration,
    /// Records read in this poll burst, for the router in one batch.
    batch: Vec<Record>,
    /// The paused partition whose held records were sent last (round robin of `flush_held`).
    served_last: Option<PartitionKey>,
    /// How long a partition may be behind and unread before it counts as stalled.
    stall_timeout: Duration,
    /// When `observe_unread` looks next.
    next_unread_check: std::time::Instant,
    /// When a record returned again may be logged next.
    next_read_again_log: std::time::Instant,
    /// `delivery = "exactly-once"`: what starts the transactions, on the consumer thread
    /// before the first poll (taken then).
    transactions: Option<crate::transaction::TransactionSettings>,
}

impl ConsumerActor {
    fn new(
        config: &Config,
        links: ConsumerLinks,
        metrics: Arc<Metrics>,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ConsumerActor> {
        let ConsumerLinks {
            router,
            committer,
            breaker,
            fences,
            transactions,
        } = links;
        let (commits, commit_requests) = commits::channel();
        let budget = ByteBudget::new(
            config.pipeline.max_in_flight_bytes,
            metrics.in_flight_bytes.clone(),
        );
        let callbacks = Callbacks::new(
            committer.clone(),
            commits.clone(),
            fences,
            budget.clone(),
            metrics.clone(),
        );
        let consumer: BaseConsumer<Callbacks> = client_config(config)
            .create_with_context(callbacks)
            .context("failed to create the Kafka consumer")?;
        let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .context("failed to subscribe to the configured topics")?;
        liveness.expect("consumer", 1);
        let consumer = Arc::new(consumer);
        let runtime = tokio::runtime::Handle::try_current()
            .context("the consumer must be created inside the tokio runtime")?;
        let commit_thread = commits::start(
            consumer.clone(),
            consumer.context().assignment.clone(),
            metrics.clone(),
            commit_requests,
            transactions.is_none().then(|| committer.plans()),
            Duration::from_millis(config.pipeline.commit_interval_ms),
            runtime.clone(),
        )
        .context("failed to start the commit thread")?;
        let transactions =
            transactions.map(|(producer, gate)| crate::transaction::TransactionSettings {
                producer,
                gate,
                committer: committer.clone(),
                metrics: metrics.clone(),
                runtime: runtime.clone(),
                drain_timeout: Duration::from_millis(config.pipeline.drain_timeout_ms),
                interval: Duration::from_millis(config.pipeline.commit_interval_ms),
            });
        Ok(ConsumerActor {
            holds: committer.holds(),
            budget,
            consumer,
            commits,
            commit_thread: Some(commit_thread),
            breaker,
            runtime,
            router: Some(router),
            committer,
            shutdown,
            metrics,
            liveness,
            max_payload_bytes: config.pipeline.max_payload_bytes,
            pause_after: Duration::from_millis(config.pipeline.pause_after_ms),
            drain_timeout: Duration::from_millis(config.pipeline.drain_timeout_ms),
            batch: Vec::new(),
            served_last: None,
            stall_timeout: Duration::from_millis(config.pipeline.stall_timeout_ms),
            next_unread_check: std::time::Instant::now(),
            next_read_again_log: std::time::Instant::now(),
            transactions,
        })
    }

    /// Runs until shutdown has drained and committed, reports the outcome, then leaves the
    /// group. Leaving can take long while the group is rebalancing (a JoinGroup in flight waits
    /// for every member, even a dead one, up to its session timeout), so the caller need not
    /// wait for it once the outcome is in.
    fn run(mut self, outcome: oneshot::Sender<anyhow::Result<()>>) {
        let _alive = self.liveness.enter("consumer");
        let result = self.consume();
        self.callbacks().closing.store(true, Ordering::Release);
        // Nobody listening means the pipeline is gone already; leave the group regardless.
        let _ = outcome.send(result);
        // The commit thread ends after what it was asked; a commit stuck on a rebalance is not
        // waited for (that thread then closes the client when it is done).
        self.commits.stop();
        if let Some(thread) = self.commit_thread.take() {
            let deadline = std::time::Instant::now() + COMMIT_THREAD_WAIT;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        info!("leaving the consumer group");
        // Dropping the consumer closes it: it leaves the group so partitions move at once.
        drop(self.consumer);
        info!("left the consumer group");
    }

    fn callbacks(&self) -> &Callbacks {
        self.consumer.context()
    }

    /// The poll loop: consume until shutdown, then drain and make the final commit.
    fn consume(&mut self) -> anyhow::Result<()> {
        let mut phase = Phase::Consuming;
        // Polled through its own handle: a message borrows the client while `accept` changes
        // the actor.
        let consumer = self.consumer.clone();
        if let Some(settings) = self.transactions.take() {
            let transactions = crate::transaction::Transactions::start(settings)?;
            // Set once, here: nothing else sets it.
            let _ = self
                .callbacks()
                .transactions
                .set(std::sync::Mutex::new(transactions));
        }
        loop {
            if let Some(fatal) = self.callbacks().take_fatal() {
                return Err(fatal.into());
            }
            match &mut phase {
                Phase::Consuming
                    if self.shutdown.is_cancelled() && self.callbacks().transactional() =>
                {
                    return self.finish_transactions(&consumer);
                }
                Phase::Consuming if self.shutdown.is_cancelled() => {
                    match self.begin_drain() {
                        Some(next) => phase = next,
                        None => return Ok(()),
                    }
                    continue;
                }
                Phase::Consuming => {}
                Phase::Draining { answer, give_up_at } => match answer.try_recv() {
                    Ok(FinalPositions {
                        entries,
                        unfinished,
                    }) => {
                        // A final commit the broker did not take (a rebalance in flight, say)
                        // is logged by the commit thread: every record finished, so the next
                        // owner replays some of them; nothing was abandoned.
                        self.commits
                            .commit(entries, CommitWhy::Shutdown, FINAL_COMMIT_WAIT);
                        if unfinished > 0 {
                            break Err(Abandoned::Unfinished(unfinished).into());
                        }
                        break Ok(());
                    }
                    Err(oneshot::error::TryRecvError::Empty)
                        if std::time::Instant::now() < *give_up_at => {}
                    Err(_) => {
                        warn!(
                            "no final positions from the committer; nothing committed at shutdown"
                        );
                        break Err(Abandoned::NoFinalPositions.into());
                    }
                },
            }
            let held = match phase {
                Phase::Consuming => {
                    self.end_transaction_if_due(&consumer);
                    self.follow_breaker()?;
                    self.follow_holds()?;
                    self.observe_unread();
                    self.flush_held()?
                }
                Phase::Draining { .. } => 0,
            };
            let timeout = if held > 0 { POLL_HELD } else { POLL_IDLE };
            self.poll_burst(&consumer, timeout, matches!(phase, Phase::Consuming))?;
        }
    }

    /// Once a second: what librdkafka stepped over past the last record of each partition (see
    /// [`Skipped`]), and which partitions are behind and not read for `stall_timeout_ms`.
    fn observe_unread(&mut self) {
        let now = std::time::Instant::now();
        if now < self.next_unread_check {
            return;
        }
        self.next_unread_check = now + UNREAD_CHECK_EVERY;
        let callbacks = self.consumer.context();
        let halted = callbacks.halted.load(Ordering::Acquire);
        // librdkafka's positions, read between polls: consistent with `last_polled`, which
        // only this thread changes.
        let positions = self.consumer.position().ok();
        let mut assignment = callbacks.assignment.lock();
        if let Some(positions) = positions {
            for element in positions.elements() {
                let Offset::Offset(position) = element.offset() else {
                    continue;
                };
                let key = assignment.key(element.topic(), element.partition());
                if let Some(state) = assignment.partitions.get_mut(&key) {
                    state.skipped = Skipped::past(state.last_polled, position);
                }
            }
        }
        assignment.observe_unread(self.stall_timeout, halted, &self.metrics);
    }

    /// Pauses every partition in librdkafka (held records stay held) for `why`; returns how
    /// many partitions are owned. A partition held for its uncommitted records keeps that
    /// reason (it must not resume before the committer releases it).
    fn pause_all(&self, why: PauseWhy) -> anyhow::Result<usize> {
        let mut assignment = self.callbacks().assignment.lock();
        for state in assignment.partitions.values_mut() {
            if let Flow::Paused { why: current, .. } = &mut state.flow {
                if *current != PauseWhy::Uncommitted {
                    *current = why;
                }
            }
        }
        self.pause_flowing(&mut assignment, why)?;
        assignment.publish(&self.metrics);
        Ok(assignment.partitions.len())
    }

    /// Holds `records` back (read, in offset order per partition, not sent) for `why`, pausing
    /// each partition that was flowing. Held records of a partition that was paused already
    /// are older than what it holds, so they go in front. Records of a partition revoked
    /// meanwhile are dropped: the next owner reads them.
    fn hold_back(
        &self,
        assignment: &mut Assignment,
        why: PauseWhy,
        records: Vec<Record>,
    ) -> anyhow::Result<()> {
        // By partition, in order: a batch holds few partitions, so a list beats a map.
        let mut by_partition: Vec<Vec<Record>> = Vec::new();
        for record in records {
            match by_partition
                .iter_mut()
                .find(|held| held[0].source == record.source)
            {
                Some(held) => held.push(record),
                None => by_partition.push(vec![record]),
            }
        }
        let mut pause = TopicPartitionList::new();
        for records in by_partition {
            let first = &records[0];
            let Some(state) = assignment.partitions.get_mut(&first.source) else {
                continue;
            };
            if state.generation != first.generation {
                // Revoked and assigned again: read again from the committed position.
                continue;
            }
            match &mut state.flow {
                Flow::Paused { held, .. } => {
                    for record in records.into_iter().rev() {
                        held.push_front(record);
                    }
                }
                Flow::Flowing => {
                    pause.add_partition(&first.source.topic, first.source.partition);
                    info!(
                        topic = %first.source.topic,
                        partition = first.source.partition,
                        offset = first.offset,
                        "{}, partition paused",
                        why.as_str()
                    );
                    state.flow = Flow::holding(why, records);
                }
            }
        }
        if pause.count() > 0 {
            self.consumer
                .pause(&pause)
                .context("failed to pause a partition")?;
            self.metrics
                .pauses
                .with_label_values(&[why.label()])
                .inc_by(pause.count() as u64);
        }
        assignment.publish(&self.metrics);
        Ok(())
    }

    /// Exactly-once: ends the open transaction once it has been open for a commit interval.
    fn end_transaction_if_due(&self, consumer: &BaseConsumer<Callbacks>) {
        let callbacks = self.callbacks();
        let due = callbacks.transactions.get().is_some_and(|transactions| {
            transactions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .due()
        });
        if due {
            callbacks.end_transaction(consumer, crate::transaction::Why::Interval);
        }
    }

    /// Exactly-once shutdown: nothing more is fetched; the last transaction is ended (committed
    /// if everything dispatched finishes within the drain timeout; what is still in the
    /// router's channel is not dispatched, and the next owner reads it).
    fn finish_transactions(&mut self, consumer: &BaseConsumer<Callbacks>) -> anyhow::Result<()> {
        info!("shutdown: stop fetching and end the last transaction");
        let callbacks = self.consumer.context();
        callbacks.shutting_down.store(true, Ordering::Release);
        if let Err(err) = self.pause_all(PauseWhy::Shutdown) {
            warn!(error = %format!("{err:#}"), "cannot pause partitions for shutdown");
        }
        let ended = callbacks.end_transaction(consumer, crate::transaction::Why::Shutdown);
        // Closing the router's input lets router, workers and committer finish (the committer
        // once its input ends, now that shutdown's positions were asked for).
        self.router = None;
        if let Err(err) = self.committer.finish(tokio::time::Instant::now()) {
            debug!(error = %err, "committer gone before shutdown");
        }
        match (ended, callbacks.take_fatal()) {
            (_, Some(fatal)) => Err(fatal.into()),
            (Some(crate::transaction::Ended::Committed(_)), None) => Ok(()),
            (Some(crate::transaction::Ended::Aborted(reason)), None) => {
                Err(Abandoned::Aborted(reason).into())
            }
            (None, None) => Err(Abandoned::NoFinalPositions.into()),
        }
    }

    /// Stops fetching, releases the router (so the pipeline drains) and asks the committer for
    /// the final positions. `None` when there is nothing to wait for.
    fn begin_drain(&mut self) -> Option<Phase> {
        info!("shutdown: stop fetching and drain in-flight records");
        self.callbacks()
            .shutting_down
            .store(true, Ordering::Release);
        if let Err(err) = self.pause_all(PauseWhy::Shutdown) {
            warn!(error = %format!("{err:#}"), "cannot pause partitions for shutdown");
        }
        // Closing the router's input lets router, workers and committer finish in order.
        self.router = None;
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        match self.committer.finish(deadline) {
            Ok(answer) => Some(Phase::Draining {
                answer,
                give_up_at: std::time::Instant::now() + self.drain_timeout + FINISH_GRACE,
            }),
            Err(err) => {
                warn!(error = %err, "committer gone before shutdown");
                None
            }
        }
    }

    /// Pauses every partition when the dead-letter breaker trips; lets them resume (through
    /// `flush_held`) when it is reset.
    fn follow_breaker(&mut self) -> anyhow::Result<()> {
        if !self.breaker.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let tripped = matches!(*self.breaker.borrow_and_update(), BreakerState::Tripped(_));
        self.callbacks().halted.store(tripped, Ordering::Release);
        if !tripped {
            info!("breaker reset: partitions resume");
            return Ok(());
        }
        let partitions = self.pause_all(PauseWhy::Breaker)?;
        warn!(partitions, "breaker tripped: every partition paused");
        Ok(())
    }

    /// Pauses the partitions the committer holds for their uncommitted records, and lets the
    /// released ones resume (through `flush_held`).
    fn follow_holds(&mut self) -> anyhow::Result<()> {
        if !self.holds.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let holds = self.holds.borrow_and_update().clone();
        let callbacks = self.consumer.context();
        let mut assignment = callbacks.assignment.lock();
        let mut pause = TopicPartitionList::new();
        for (key, state) in assignment.partitions.iter_mut() {
            let held = holds
                .iter()
                .any(|(source, generation)| source == key && *generation == state.generation);
            match &mut state.flow {
                Flow::Flowing if held => {
                    state.flow = Flow::paused(PauseWhy::Uncommitted);
                    pause.add_partition(&key.topic, key.partition);
                    warn!(topic = %key.topic, partition = key.partition, "partition paused: {}", PauseWhy::Uncommitted.as_str());
                }
                Flow::Paused { why, .. } if held => *why = PauseWhy::Uncommitted,
                // Released: resumable like any paused partition.
                Flow::Paused { why, .. } if *why == PauseWhy::Uncommitted => {
                    *why = PauseWhy::RouterFull;
                    info!(topic = %key.topic, partition = key.partition, "uncommitted records committed: partition may resume");
                }
                _ => {}
            }
        }
        if pause.count() > 0 {
            self.consumer
                .pause(&pause)
                .context("failed to pause partitions held for their uncommitted records")?;
            self.metrics
                .pauses
                .with_label_values(&[PauseWhy::Uncommitted.label()])
                .inc_by(pause.count() as u64);
        }
        assignment.publish(&self.metrics);
        Ok(())
    }

    /// Polls until librdkafka has nothing more at hand or a batch for the router is full (the
    /// first poll waits up to `timeout`), then sends the batch. Records are taken only while
    /// `consuming`: while draining a record may still arrive from before the pause; it was
    /// never dispatched, so the final commit stays below it and it is read again.
    fn poll_burst(
        &mut self,
        consumer: &BaseConsumer<Callbacks>,
        timeout: Duration,
        consuming: bool,
    ) -> anyhow::Result<()> {
        let mut next = consumer.poll(timeout);
        // One clock read for the burst: the records of a burst are read within microseconds.
        let read_at = std::time::Instant::now();
        let limit = self.router.as_ref().map_or(1, RouterHandle::max_batch);
        while let Some(polled) = next {
            match polled {
                Err(err) => {
                    if matches!(err, KafkaError::MessageConsumptionFatal(_)) {
                        return Err(anyhow::Error::new(err).context("fatal Kafka consumer error"));
                    }
                    consumer.context().log.consume_error(&err);
                }
                Ok(message) if consuming => self.accept(&message, read_at)?,
                Ok(_) => {}
            }
            if self.batch.len() >= limit {
                break;
            }
            next = consumer.poll(Duration::ZERO);
        }
        self.send_batch()
    }

    /// Copies a record out of librdkafka's buffer and adds it to the batch for the router
    /// (the router decodes it); with `max_in_flight_bytes` held, keeps it and pauses its
    /// partition. A record returned again under the same assignment is skipped.
    fn accept(
        &mut self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        read_at: std::time::Instant,
    ) -> anyhow::Result<()> {
        let payload = message.payload();
        let callbacks = self.consumer.context();
        let mut assignment = callbacks.assignment.lock();
        let key = assignment.key(message.topic(), message.partition());
        let read = payload.map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        assignment.count_consumed(key.topic, read, &self.metrics);
        let Some(state) = assignment.partitions.get_mut(&key) else {
            // Not ours any more (revoked between fetch and poll): the next owner reads it.
            debug!(topic = %key.topic, partition = key.partition, offset = message.offset(), "record of an unassigned partition skipped");
            return Ok(());
        };
        let mark = ReadMark {
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            size: read,
        };
        match state.order_of(mark) {
            ReadOrder::Next => {}
            ReadOrder::ReturnedAgain => {
                // Taken already under this assignment (a broker whose high watermark lags its
                // log, seen on tansu, makes librdkafka reset to it). Taking it again would
                // dispatch an offset twice; the committer tracks each once.
                self.metrics.read_again.inc();
                if read_at >= self.next_read_again_log {
                    self.next_read_again_log = read_at + READ_AGAIN_LOG_EVERY;
                    warn!(topic = %key.topic, partition = key.partition, offset = message.offset(), last = state.last_polled, skipped_so_far = self.metrics.read_again.get(), "records returned again by the client are skipped (logged at most every 30 s)");
                }
                return Ok(());
            }
            ReadOrder::MovedBack => {
                // The log moved back under the fetch position (a topic recreated, a log
                // truncated): its records here are new. The partition's bookkeeping starts
                // afresh under a new generation, so the acks of what was read of the old log
                // never move its commit, and the commit may go back to the new log's offsets.
                let last = state.last_polled;
                let generation = callbacks.next_generation();
                let dropped = state.restart(generation);
                self.metrics.moved_back.inc();
                warn!(topic = %key.topic, partition = key.partition, offset = message.offset(), last, generation, held_dropped = dropped, "the partition's log moved back (topic recreated or log truncated): its records are read as new from this offset");
            }
        }
        state.taken(mark, read_at);
        if self.router.is_none() {
            return Ok(());
        }
        // A payload over `max_payload_bytes` fails decoding (too_large) and is never delivered:
        // it is not copied, so an oversized record costs no memory here (the dead letter says
        // how large the value was).
        let decoded = payload
            .filter(|payload| payload.len() > self.max_payload_bytes)
            .map(|payload| {
                Err(DecodeError::TooLarge {
                    size: payload.len(),
                    limit: self.max_payload_bytes,
                })
            });
        let payload = payload.filter(|payload| payload.len() <= self.max_payload_bytes);
        let key_bytes = message.key();
        let bytes = payload.map_or(0, <[u8]>::len) + key_bytes.map_or(0, <[u8]>::len);
        let fits = self.budget.has_room(bytes);
        let record = Record {
            read_at,
            source: key,
            offset: message.offset(),
            generation: state.generation,
            data: KeyValue::new(key_bytes, payload),
            headers: message.headers().map(|headers| headers.detach()),
            timestamp: message.timestamp().to_millis(),
            decoded,
            service: None,
            form: crate::event::Form::default(),
            charge: self.budget.charge(bytes),
            destination: None,
            fan_out: None,
            part: None,
        };
        match &mut state.flow {
            // Fetched before the pause took effect: keep order behind what is already held.
            Flow::Paused { held, .. } => held.push_back(record),
            Flow::Flowing if !fits => {
                return self.hold_back(&mut assignment, PauseWhy::Bytes, vec![record]);
            }
            Flow::Flowing => self.batch.push(record),
        }
        Ok(())
    }

    /// Sends the batch to the router. When the channel is full it waits up to `pause_after`
    /// for half of it: a busy pipeline makes room quickly, and waiting keeps librdkafka's
    /// prefetch, which a pause would throw away. Then it holds the batch back and pauses its
    /// partitions.
    fn send_batch(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let capacity = self.batch.len();
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(capacity));
        let Some(router) = &self.router else {
            // Draining: never dispatched, so never committed; read again after a restart.
            return Ok(());
        };
        let in_flight = &self.metrics.in_flight;
        let batch = match counted_offer(in_flight, batch, |batch| router.offer(batch)) {
            Offer::Taken => return Ok(()),
            Offer::Full(batch) => batch,
            Offer::Stopped(_) => {
                anyhow::bail!("router stopped while the consumer was running");
            }
        };
        // The assignment's lock is not held meanwhile (interval commits and /status take it);
        // rebalances run on this thread, so the partitions stay ours.
        let batch = match counted_offer(in_flight, batch, |batch| {
            router.wait_for_room(batch, self.pause_after, &self.runtime)
        }) {
            Offer::Taken => return Ok(()),
            // Gone: hold it; shutdown follows.
            Offer::Full(batch) | Offer::Stopped(batch) => batch,
        };
        let mut assignment = self.consumer.context().assignment.lock();
        self.hold_back(&mut assignment, PauseWhy::RouterFull, batch)?;
        // The router stayed full: every partition waits for room now, so no later batch is
        // held back too, and what the consumer holds stays within one batch.
        let paused = self.pause_flowing(&mut assignment, PauseWhy::RouterFull)?;
        if paused > 0 {
            self.metrics
                .pauses
                .with_label_values(&[PauseWhy::RouterFull.label()])
                .inc_by(paused as u64);
            info!(
                partitions = paused,
                "{}, partitions paused",
                PauseWhy::RouterFull.as_str()
            );
            assignment.publish(&self.metrics);
        }
        Ok(())
    }

    /// Pauses every partition that still flows, for `why` (held records and other reasons
    /// stay as they are); returns how many it paused.
    fn pause_flowing(&self, assignment: &mut Assignment, why: PauseWhy) -> anyhow::Result<usize> {
        let mut tpl = TopicPartitionList::new();
        for (key, state) in assignment.partitions.iter_mut() {
            if matches!(state.flow, Flow::Flowing) {
                state.flow = Flow::paused(why);
                tpl.add_partition(&key.topic, key.partition);
            }
        }
        if tpl.count() > 0 {
            self.consumer
                .pause(&tpl)
                .with_context(|| format!("failed to pause partitions ({})", why.as_str()))?;
        }
        Ok(tpl.count())
    }

    /// Moves held records to the router once it has drained to half its capacity and at most
    /// half of `max_in_flight_bytes` is in flight, resuming each partition whose held records
    /// are all sent. Partitions held for their uncommitted records wait for the committer.
    /// Returns how many records are still held.
    fn flush_held(&mut self) -> anyhow::Result<usize> {
        // Fields, not methods: `served_last` is written while these are borrowed.
        let Some(router) = &self.router else {
            return Ok(0);
        };
        let callbacks = self.consumer.context();
        let mut assignment = callbacks.assignment.lock();
        let held_total = assignment.held_count();
        if callbacks.halted.load(Ordering::Acquire) {
            // The breaker holds everything; nothing moves until it is reset.
            return Ok(0);
        }
        if assignment.paused_count() == 0 {
            return Ok(0);
        }
        // Low-water marks: resume only with room for at least half the channel and half the
        // bytes (held records are in flight already and do not count), so a partition is not
        // paused and resumed for every single free slot.
        if !router.half_empty() || !self.budget.half_free(assignment.held_bytes()) {
            return Ok(held_total);
        }
        let mut resume = TopicPartitionList::new();
        let mut restart_at = Vec::new();
        let mut router_full = false;
        // Held records are charged already; moving one on must keep what flows (all but the
        // held) within `max_in_flight_bytes`.
        let mut held_bytes = assignment.held_bytes();
        // Round robin from after the partition served last, so that no paused partition waits
        // behind the same others every time the channel has room.
        let mut order: Vec<PartitionKey> = assignment
            .partitions
            .iter()
            .filter(|(_, state)| {
                state
                    .flow
                    .why()
                    .is_some_and(|why| why != PauseWhy::Uncommitted)
            })
            .map(|(key, _)| key.clone())
            .collect();
        order.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        if let Some(last) = &self.served_last {
            let next = order.partition_point(|key| {
                (&key.topic, key.partition) <= (&last.topic, last.partition)
            });
            order.rotate_left(next);
        }
        let limit = router.max_batch();
        for key in order {
            let Some(state) = assignment.partitions.get_mut(&key) else {
                continue;
            };
            let Flow::Paused { held, .. } = &mut state.flow else {
                continue;
            };
            while !held.is_empty() && !router_full {
                // As many as the channel and the byte bound take now, in one batch.
                let room = router.room().min(limit);
                let mut batch = Vec::with_capacity(room.min(held.len()));
                while batch.len() < room {
                    let Some(record) = held.front() else {
                        break;
                    };
                    let bytes = record.charge.bytes();
                    let flowing = self.budget.used().saturating_sub(held_bytes);
                    if flowing > 0 && flowing + bytes > self.budget.limit() {
                        router_full = true;
                        break;
                    }
                    held_bytes -= bytes;
                    batch.extend(held.pop_front());
                }
                if batch.is_empty() {
                    router_full = true;
                    break;
                }
                match counted_offer(&self.metrics.in_flight, batch, |batch| router.offer(batch)) {
                    Offer::Taken => {}
                    Offer::Full(batch) => {
                        // Only the router takes from the channel, so the room seen is there;
                        // handled all the same.
                        for record in batch.into_iter().rev() {
                            held_bytes += record.charge.bytes();
                            held.push_front(record);
                        }
                        router_full = true;
                    }
                    Offer::Stopped(_) => {
                        anyhow::bail!("router stopped while the consumer was running");
                    }
                }
            }
            if held.is_empty() {
                state.flow = Flow::Flowing;
                resume.add_partition(&key.topic, key.partition);
                if let Some(last) = state.last_polled {
                    restart_at.push((key.clone(), last + 1));
                }
            }
            self.served_last = Some(key);
            if router_full {
                break;
            }
        }
        if resume.count() > 0 {
            self.consumer
                .resume(&resume)
                .context("failed to resume partitions")?;
            // librdkafka does not wake its fetcher on resume: the partition would wait for the
            // broker thread's next timer (up to a second, confluent-kafka-go #630), starving a
            // pipeline that drains faster than that. A seek to the position librdkafka resumes
            // from anyway (right after the last record it returned) starts the fetch at once.
            for (key, offset) in restart_at {
                if let Err(err) = self.consumer.seek(
                    &key.topic,
                    key.partition,
                    Offset::Offset(offset),
                    Duration::ZERO,
                ) {
                    debug!(topic = %key.topic, partition = key.partition, offset, error = %err, "seek after resume failed; fetch restarts on librdkafka's timer");
                }
            }
            let resumed = resume.count() as u64;
            assignment.publish(&self.metrics);
            self.metrics.resumes.inc_by(resumed);
            debug!(partitions = resumed, "partitions resumed");
        }
        Ok(assignment.held_count())
    }
}

/// Offers `batch` to the router through `offer`, counting it in flight first: once taken, the
/// router may dispatch it and its acks reach the committer (which counts them out) before this
/// thread would have counted it in (the gauge was seen at -19 in a soak). Counted out again if
/// not taken.
fn counted_offer(
    in_flight: &prometheus::IntGauge,
    batch: Vec<Record>,
    offer: impl FnOnce(Vec<Record>) -> Offer<Record>,
) -> Offer<Record> {
    let count = batch.len() as i64;
    in_flight.add(count);
    let offered = offer(batch);
    if !matches!(offered, Offer::Taken) {
        in_flight.sub(count);
    }
    offered
}
