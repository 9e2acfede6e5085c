//! librdkafka's callbacks into the consumer: rebalances (assign, revoke, lost), client errors
//! and statistics. They run inside `poll`, on the consumer thread, so a revoke can drain and
//! commit before the partitions are let go.
//!
//! - **Assign**: each partition gets a new generation and starts flowing, unless the breaker
//!   holds consumption (then it is paused at once).
//! - **Revoke**: the router is fenced off the revoked generations, the committer waits (up to
//!   `drain_timeout_ms`) for their in-flight records and answers with their positions, which
//!   are committed before the callback returns. In the cooperative protocol only the revoked
//!   partitions are touched.
//! - **Lost** (session expired): nothing is committed; their state is dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::assignment::{Flow, PartitionState, PauseWhy, SharedAssignment};
use super::commits::{extend_over_skipped, CommitWhy, Commits};
use crate::client_log::ClientLog;
use crate::committer::{CommitEntry, CommitterControl};
use crate::metrics::Metrics;
use crate::record::{ByteBudget, Fences, PartitionKey};
use crate::transaction::{Ended, Fatal, Transactions, Why};

/// Longest wait for the revoke commit before the callback lets the partitions go (a commit
/// that has not landed by then may still land; else the next owner replays from the previous
/// commit).
const REVOKE_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Longest wait for the seek of a partition rewound after an aborted transaction.
const REWIND_SEEK_WAIT: Duration = Duration::from_secs(5);

/// The consumer's librdkafka context: what its callbacks need.
pub(crate) struct Callbacks {
    pub(crate) assignment: SharedAssignment,
    pub(crate) metrics: Arc<Metrics>,
    committer: CommitterControl,
    /// The commit thread (revoke commits go through it like every other).
    commits: Commits,
    generations: AtomicU64,
    /// Set once the final commit is done: a revoke during close has nothing left to commit.
    pub(crate) closing: AtomicBool,
    /// Set while the dead-letter breaker is tripped: every partition stays paused, including
    /// ones assigned meanwhile.
    pub(crate) halted: AtomicBool,
    /// Revoked generations, shared with the router.
    fences: Fences,
    /// Set when shutdown starts draining.
    pub(crate) shutting_down: AtomicBool,
    /// librdkafka's errors and log lines, rate-limited.
    pub(crate) log: ClientLog,
    /// `delivery = "exactly-once"`: the instance's transactions (set once the client exists;
    /// ended on the interval by the poll loop, and here on revoke and loss).
    pub(crate) transactions: OnceLock<Mutex<Transactions>>,
    /// The transactional producer's fatal error, met in a callback: the poll loop ends on it.
    pub(crate) fatal: Mutex<Option<Fatal>>,
}

impl Callbacks {
    pub(crate) fn new(
        committer: CommitterControl,
        commits: Commits,
        fences: Fences,
        budget: Arc<ByteBudget>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Callbacks {
            assignment: SharedAssignment::new(budget),
            metrics,
            committer,
            commits,
            generations: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            fences,
            shutting_down: AtomicBool::new(false),
            log: ClientLog::new("consumer"),
            transactions: OnceLock::new(),
            fatal: Mutex::new(None),
        }
    }

    /// The transactional producer's fatal error, if one was met since the last call.
    pub(crate) fn take_fatal(&self) -> Option<Fatal> {
        self.fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Whether delivery is exactly-once (the offsets go in transactions, never in a plain
    /// commit).
    pub(crate) fn transactional(&self) -> bool {
        self.transactions.get().is_some()
    }

    /// Ends the open transaction for `why` (see [`Transactions::end`]): the positions it
    /// committed become the partitions' rewind targets; an abort rewinds every partition. A
    /// fatal error is kept for the poll loop. `None` in at-least-once mode, or after a fatal
    /// error.
    pub(crate) fn end_transaction(
        &self,
        consumer: &BaseConsumer<Callbacks>,
        why: Why,
    ) -> Option<Ended> {
        let transactions = self.transactions.get()?;
        let mut transactions = transactions.lock().unwrap_or_else(PoisonError::into_inner);
        let owned = |entry: &CommitEntry| {
            self.assignment
                .lock()
                .partitions
                .get(&entry.source)
                .is_some_and(|state| state.generation == entry.generation)
        };
        let mut rewind = || self.rewind(consumer);
        match transactions.end(consumer, &owned, why, &mut rewind) {
            Ok(ended) => {
                if let Ended::Committed(entries) = &ended {
                    let mut assignment = self.assignment.lock();
                    for entry in entries {
                        if let Some(state) = assignment
                            .partitions
                            .get_mut(&entry.source)
                            .filter(|state| state.generation == entry.generation)
                        {
                            state.committed = Some(entry.offset);
                        }
                    }
                }
                Some(ended)
            }
            Err(fatal) => {
                *self.fatal.lock().unwrap_or_else(PoisonError::into_inner) = Some(fatal);
                None
            }
        }
    }

    /// After an aborted transaction: every owned partition reads again from where the last
    /// committed transaction left it (or where this generation began), under a new generation.
    /// What was read of it under the old one is dropped everywhere (router, workers, the
    /// dead-letter actor, the committer's bookkeeping) and refused by the transactional
    /// producer, which checks each record as it sends it; its outputs were aborted with the
    /// transaction. Runs before the next transaction begins.
    fn rewind(&self, consumer: &BaseConsumer<Callbacks>) {
        let mut old = Vec::new();
        let mut seeks = Vec::new();
        {
            let mut assignment = self.assignment.lock();
            for (key, state) in assignment.partitions.iter_mut() {
                let Some(target) = state.rewind_target() else {
                    continue;
                };
                let generation = state.generation;
                self.fences.revoke(key, generation);
                self.fences.release(key, generation);
                let next = self.next_generation();
                let held = state.restart(next);
                debug!(topic = %key.topic, partition = key.partition, target, generation = next, held_dropped = held, "partition rewound");
                old.push((key.clone(), generation));
                seeks.push((key.clone(), target));
            }
            assignment.publish(&self.metrics);
        }
        if old.is_empty() {
            return;
        }
        // Forgets the old generations' bookkeeping (their acks no longer count).
        if let Err(err) = self.committer.revoke_blocking(old, false) {
            warn!(error = %err, "cannot drop the committer's state of the rewound partitions");
        }
        for (key, target) in seeks {
            if let Err(err) = consumer.seek(
                &key.topic,
                key.partition,
                Offset::Offset(target),
                REWIND_SEEK_WAIT,
            ) {
                // The position stays where reading got to: what was aborted there would be
                // skipped, so this cannot go on.
                let message =
                    format!("cannot rewind {key} to offset {target} after an abort: {err}");
                error!(%message);
                *self.fatal.lock().unwrap_or_else(PoisonError::into_inner) = Some(Fatal(message));
            }
        }
        info!(
            partitions = self.assignment.lock().partitions.len(),
            "partitions rewound to their last committed positions"
        );
    }

    /// A generation no assignment had: every assignment of a partition, and every restart of
    /// one whose log moved back, gets its own.
    pub(crate) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn on_assign(&self, consumer: &BaseConsumer<Callbacks>, tpl: &TopicPartitionList) {
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.assignment.set_in_group(true);
        let halted = self.halted.load(Ordering::Acquire);
        let mut assignment = self.assignment.lock();
        for element in tpl.elements() {
            let key = assignment.key(element.topic(), element.partition());
            let generation = self.next_generation();
            info!(topic = %key.topic, partition = key.partition, generation, "partition assigned");
            // A new assignment flows unless the breaker holds everything; a full router pauses
            // it again on the first send that does not fit.
            let flow = if halted {
                Flow::paused(PauseWhy::Breaker)
            } else {
                Flow::Flowing
            };
            assignment
                .partitions
                .insert(key, PartitionState::new(generation, flow));
        }
        // librdkafka keeps an application pause across revoke and re-assignment (librdkafka
        // #1849, confluent-kafka-go #193: unassign clears only the library's own pause flag),
        // so a partition given back could arrive paused and never be fetched. Its pause state
        // is set here on purpose, whatever it was: paused while the breaker holds, else
        // resumed.
        if tpl.count() > 0 {
            let (set, what) = if halted {
                (consumer.pause(tpl), "pause")
            } else {
                (consumer.resume(tpl), "resume")
            };
            if let Err(err) = set {
                warn!(error = %err, what, "cannot set the pause state of newly assigned partitions");
            }
        }
        assignment.publish(&self.metrics);
    }

    /// Forgets every owned partition without committing (after a rebalance error).
    fn drop_assignment(&self) {
        self.assignment.set_in_group(false);
        let dropped: Vec<(PartitionKey, u64)> = {
            let mut assignment = self.assignment.lock();
            let dropped = assignment
                .partitions
                .drain()
                .map(|(key, state)| (key, state.generation))
                .collect();
            assignment.publish(&self.metrics);
            dropped
        };
        for (key, generation) in &dropped {
            // Dropped at once, without a drain: from now on nothing of them is delivered.
            self.fences.revoke(key, *generation);
            self.fences.release(key, *generation);
            self.metrics.forget_partition(key);
        }
        if !dropped.is_empty() {
            // Only to make the committer forget them: nothing is committed.
            if let Err(err) = self.committer.revoke_blocking(dropped, false) {
                warn!(error = %err, "cannot drop the committer's state of the partitions");
            }
        }
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Callbacks>, tpl: &TopicPartitionList) {
        // Lost (session expired, another member may own them already): nothing may be
        // committed for them.
        let lost = consumer.assignment_lost();
        // Exactly-once: the open transaction spans every partition, so it ends for all of
        // them before the revoked ones go (committed; aborted if lost or if it cannot be).
        // Their positions are in it, so no plain commit follows.
        let transactional = self.transactional();
        if transactional && tpl.count() > 0 && !self.closing.load(Ordering::Acquire) {
            // The router stops dispatching records of the revoked partitions first: once the
            // transaction ends, dispatch goes on into the next one, which must hold nothing of
            // a partition whose position was just committed for the next owner.
            {
                let mut assignment = self.assignment.lock();
                for element in tpl.elements() {
                    let key = assignment.key(element.topic(), element.partition());
                    if let Some(state) = assignment.partitions.get(&key) {
                        self.fences.revoke(&key, state.generation);
                    }
                }
            }
            self.end_transaction(consumer, if lost { Why::Lost } else { Why::Revoke });
        }
        let kind = if lost { "lost" } else { "revoke" };
        if lost {
            self.assignment.set_in_group(false);
        }
        self.metrics.rebalances.with_label_values(&[kind]).inc();
        let mut revoked = Vec::new();
        // What librdkafka stepped over at the end of each revoked partition (see `Skipped`):
        // the revoke commit goes past it once everything read has finished.
        let mut skips = Vec::new();
        {
            let mut assignment = self.assignment.lock();
            for element in tpl.elements() {
                let key = assignment.key(element.topic(), element.partition());
                if let Some(state) = assignment.partitions.remove(&key) {
                    // From now on the router drops what it still has of this assignment.
                    self.fences.revoke(&key, state.generation);
                    if let Some(skipped) = state.skipped {
                        skips.push((key.clone(), state.generation, skipped));
                    }
                    if let Flow::Paused { held, .. } = state.flow {
                        // Held records were never dispatched: the committed position is at or
                        // below them, so the next owner reads them again.
                        debug!(topic = %key.topic, partition = key.partition, held = held.len(), "dropping held records of revoked partition");
                    }
                    revoked.push((key, state.generation));
                }
            }
            assignment.publish(&self.metrics);
        }
        if revoked.is_empty() {
            // librdkafka may call with an empty list (rust-rdkafka #681).
            return;
        }
        // What we paused is resumed before librdkafka takes it away, so that nothing of ours
        // is left on a partition that may come back (see on_assign, which also resumes).
        if let Err(err) = consumer.resume(tpl) {
            warn!(error = %err, "cannot resume revoked partitions");
        }
        for (key, _) in &revoked {
            self.metrics.forget_partition(key);
        }
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if lost {
            warn!(
                partitions = revoked.len(),
                "partitions lost (session expired): their state is dropped, nothing committed"
            );
        } else {
            info!(partitions = revoked.len(), "partitions revoked, draining");
        }
        // During shutdown the drain has its own deadline: commit what finished, do not wait.
        // Exactly-once: the transaction's end drained everything already.
        let wait = !lost && !self.shutting_down.load(Ordering::Acquire) && !transactional;
        let started = std::time::Instant::now();
        let answer = self.committer.revoke_blocking(revoked.clone(), wait);
        // The revoke is over: the next owner may start reading these partitions, so whatever
        // of them a worker still has (retrying, or queued behind a retry) is no longer
        // delivered. A late copy would land after that owner's copies of later records.
        for (key, generation) in &revoked {
            self.fences.release(key, *generation);
        }
        self.metrics
            .revoke_drain_seconds
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(_) if lost || transactional => {}
            Ok(entries) => {
                let entries = extend_over_skipped(&entries, |entry| {
                    skips
                        .iter()
                        .find(|(key, generation, _)| {
                            *key == entry.source && *generation == entry.generation
                        })
                        .map(|(_, _, skipped)| *skipped)
                });
                self.commits
                    .commit(entries, CommitWhy::Revoke, REVOKE_COMMIT_WAIT);
            }
            Err(err) => warn!(error = %err, "cannot commit revoked partitions"),
        }
    }
}

/// Whether a librdkafka log line says it reset a partition's fetch position after an error.
/// librdkafka logs such resets as warnings (facility `OFFSET`, "<topic> [<partition>]: offset
/// reset (at offset .., broker ..) to offset ..: <reason>: <error>"); resets without an error
/// (a group's first start with nothing committed) are debug lines and do not count.
fn is_offset_reset(level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) -> bool {
    use rdkafka::config::RDKafkaLogLevel as Level;
    facility == "OFFSET"
        && matches!(
            level,
            Level::Warning | Level::Error | Level::Critical | Level::Alert | Level::Emerg
        )
        && message.contains("]: offset reset (")
}

impl ClientContext for Callbacks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        if is_offset_reset(level, facility, message) {
            self.metrics.offset_resets.inc();
        }
        self.log.log(level, facility, message);
    }

    /// librdkafka's statistics (every `statistics.interval.ms`) give the lag and broker round
    /// trips without a second client.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut assignment = self.assignment.lock();
        for topic in statistics.topics.values() {
            for stats in topic.partitions.values() {
                if stats.partition < 0 {
                    continue;
                }
                let key = assignment.key(&topic.topic, stats.partition);
                // Only owned partitions: a revoked one's series must stay gone.
                let Some(state) = assignment.partitions.get_mut(&key) else {
                    continue;
                };
                // What the unread-partition check needs: the end of the log, and where
                // reading stands before the first record of this assignment is read.
                let end = if stats.ls_offset >= 0 {
                    stats.ls_offset
                } else {
                    stats.hi_offset
                };
                // Unknown (-1) while the partition has no leader, say: keep what was known.
                if end >= 0 {
                    state.log_end = Some(end);
                }
                if let Some(start) = [stats.app_offset, stats.committed_offset]
                    .into_iter()
                    .find(|offset| *offset >= 0)
                {
                    state.start = Some(start);
                }
                // librdkafka's lag is against the committed offset; before the first commit
                // of the group it is unknown (-1), and everything in the log is behind.
                let lag = if stats.consumer_lag >= 0 {
                    stats.consumer_lag
                } else if stats.hi_offset >= 0 && stats.lo_offset >= 0 {
                    stats.hi_offset - stats.lo_offset
                } else {
                    continue;
                };
                let partition = key.partition.to_string();
                self.metrics
                    .partition_lag
                    .with_label_values(&[&*key.topic, &partition])
                    .set(lag);
            }
        }
        for broker in statistics.brokers.values() {
            if let Some(rtt) = &broker.rtt {
                if rtt.cnt > 0 {
                    self.metrics
                        .broker_rtt
                        .with_label_values(&[&broker.nodename])
                        .set(rtt.avg as f64 / 1_000_000.0);
                }
            }
        }
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => {
                // rust-rdkafka unassigns everything after a rebalance error: our partitions
                // are gone as if lost (nothing may be committed for them).
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                warn!(error = %err, "rebalance error; the assignment is dropped");
                self.end_transaction(consumer, Why::Lost);
                self.drop_assignment();
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.on_assign(consumer, tpl);
        }
    }
}
