//! Commit I/O: the committer decides *what* may be committed (see [`crate::committer`]); this
//! module sends it to Kafka, on one thread, under one rule.
//!
//! Every commit goes through the commit thread ([`Commits`]): interval plans from the
//! committer, the revoke commit of a rebalance callback, and the final commit at shutdown.
//! One thread means one order: a commit is sent only after the previous one was answered, and
//! the [`CommitLedger`] admits an entry only if it moves its partition forward within the
//! entry's assignment generation. So no commit moves backwards, whatever the timing of an
//! interval plan against a revoke.
//!
//! Commits are synchronous, so each one's result is known (and counted) before the next is
//! sent. The cost is one broker round trip per interval on the commit thread; the poll loop
//! keeps polling meanwhile (a synchronous commit can wait for a rebalance in flight: seen, 5 s
//! while a dead member's session expired).

use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::assignment::{Assignment, SharedAssignment, Skipped};
use crate::committer::{CommitEntry, CommitPlan};
use crate::metrics::Metrics;
use crate::record::PartitionKey;

/// Why a commit is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitWhy {
    /// A plan of the committer: only partitions still held under the plan's generation.
    Interval,
    /// Positions of partitions being revoked, inside the rebalance callback.
    Revoke,
    /// The final positions at shutdown.
    Shutdown,
    /// An idle partition's position past offsets librdkafka stepped over (transaction markers
    /// at the end of its log).
    Skipped,
}

impl CommitWhy {
    fn as_str(self) -> &'static str {
        match self {
            CommitWhy::Interval => "interval",
            CommitWhy::Revoke => "revoke",
            CommitWhy::Shutdown => "shutdown",
            CommitWhy::Skipped => "skipped",
        }
    }
}

/// The highest position committed for each partition, with its generation: the one rule every
/// commit passes.
#[derive(Default)]
pub(crate) struct CommitLedger {
    committed: FxHashMap<PartitionKey, (u64, i64)>,
}

impl CommitLedger {
    /// The entries that may be committed now: each must move its partition forward (a later
    /// generation starts afresh; an earlier one is never committed again), and an interval
    /// plan's entry only while its partition is held under the entry's generation (a plan
    /// made before a revoke must not be committed for a partition that moved on).
    fn admit(
        &self,
        entries: &[CommitEntry],
        why: CommitWhy,
        assignment: &Assignment,
    ) -> Vec<CommitEntry> {
        entries
            .iter()
            .filter(|entry| match self.committed.get(&entry.source) {
                Some(&(generation, offset)) => {
                    entry.generation > generation
                        || (entry.generation == generation && entry.offset > offset)
                }
                None => true,
            })
            .filter(|entry| {
                !matches!(why, CommitWhy::Interval | CommitWhy::Skipped)
                    || assignment
                        .partitions
                        .get(&entry.source)
                        .is_some_and(|state| state.generation == entry.generation)
            })
            .cloned()
            .collect()
    }

    /// The commits idle partitions may have past what librdkafka stepped over (see
    /// [`super::assignment::Skipped`]): those whose last record returned is committed, or which
    /// returned none.
    fn skipped(&self, assignment: &Assignment) -> Vec<CommitEntry> {
        assignment
            .partitions
            .iter()
            .filter_map(|(source, state)| {
                let skipped = state.skipped?;
                let committed = self
                    .committed
                    .get(source)
                    .filter(|(generation, _)| *generation == state.generation)
                    .map(|(_, offset)| *offset);
                Some(CommitEntry {
                    source: source.clone(),
                    generation: state.generation,
                    offset: skipped.idle_commit(committed)?,
                })
            })
            .collect()
    }

    /// Notes what the broker accepted.
    fn record(&mut self, entries: &[CommitEntry]) {
        for entry in entries {
            self.committed
                .insert(entry.source.clone(), (entry.generation, entry.offset));
        }
    }
}

/// `Local: Erroneous state` (and the broker's generation errors) after a revoke are expected:
/// the partition has a new owner (confluent-kafka-dotnet #1861).
fn is_stale_commit(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::State
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                // KIP-848's `consumer` protocol: the member epoch moved on (a rebalance), and
                // librdkafka does not retry a manual commit refused so.
                | RDKafkaErrorCode::StaleMemberEpoch
                | RDKafkaErrorCode::FencedMemberEpoch
        )
    )
}

pub(crate) fn commit_list(entries: &[CommitEntry]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(entries.len());
    for entry in entries {
        // Offsets come from Kafka and are never negative; a failure only drops this entry.
        if let Err(err) = tpl.add_partition_offset(
            &entry.source.topic,
            entry.source.partition,
            Offset::Offset(entry.offset),
        ) {
            warn!(error = %err, partition = %entry.source, "cannot add commit entry");
        }
    }
    tpl
}

/// Commits `entries` and waits for the broker's answer; counts the outcome, and shows the
/// committed offsets of the partitions still owned. Returns whether the broker accepted them.
fn commit_sync<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    assignment: &SharedAssignment,
    metrics: &Metrics,
    entries: &[CommitEntry],
    why: CommitWhy,
) -> bool {
    let why = why.as_str();
    match consumer.commit(&commit_list(entries), CommitMode::Sync) {
        Ok(()) => {
            metrics.commits.with_label_values(&["ok"]).inc();
            let assignment = assignment.lock();
            for entry in entries {
                debug!(topic = %entry.source.topic, partition = entry.source.partition, offset = entry.offset, why, "committed");
                // A revoked partition's series is gone and must stay gone.
                if assignment.partitions.contains_key(&entry.source) {
                    metrics.set_committed(&entry.source, entry.offset);
                }
            }
            true
        }
        Err(err) if is_stale_commit(&err) => {
            metrics.commits.with_label_values(&["stale"]).inc();
            info!(error = %err, why, "commit refused: partitions already moved on");
            false
        }
        Err(err) => {
            metrics.commits.with_label_values(&["error"]).inc();
            error!(error = %err, why, "synchronous commit failed");
            false
        }
    }
}

/// `entries` with each position that is right after the last record its partition returned
/// moved past what librdkafka stepped over since (see [`super::assignment::Skipped`]), as
/// `skipped_of` says for the entry's partition and generation.
pub(crate) fn extend_over_skipped(
    entries: &[CommitEntry],
    skipped_of: impl Fn(&CommitEntry) -> Option<Skipped>,
) -> Vec<CommitEntry> {
    entries
        .iter()
        .map(|entry| match skipped_of(entry) {
            Some(skipped) => CommitEntry {
                offset: skipped.extend(entry.offset),
                ..entry.clone()
            },
            None => entry.clone(),
        })
        .collect()
}

/// What librdkafka stepped over on `entry`'s partition, while it is held under the entry's
/// generation.
fn held_skipped(assignment: &Assignment, entry: &CommitEntry) -> Option<Skipped> {
    assignment
        .partitions
        .get(&entry.source)
        .filter(|state| state.generation == entry.generation)
        .and_then(|state| state.skipped)
}

/// A commit asked of the commit thread by the consumer thread.
struct CommitRequest {
    entries: Vec<CommitEntry>,
    why: CommitWhy,
    /// Told whether the broker took the commit (or there was nothing left to commit); the asker
    /// may have stopped waiting.
    done: std::sync::mpsc::Sender<bool>,
}

/// What the consumer thread asks of the commit thread.
enum Request {
    Commit(CommitRequest),
    /// The consumer is done: end the thread. (Its `Commits` cannot simply be dropped: one
    /// lives in the Kafka client's context, which the thread itself keeps alive.)
    Stop,
}

/// The consumer thread's way to the commit thread (revoke and final commits).
#[derive(Clone)]
pub(crate) struct Commits {
    requests: mpsc::UnboundedSender<Request>,
}

/// The commit thread's end of [`Commits`], until the thread starts.
pub(crate) struct CommitRequests(mpsc::UnboundedReceiver<Request>);

/// A way to the commit thread and its receiving end (the thread starts once the Kafka client
/// exists: see [`start`]).
pub(crate) fn channel() -> (Commits, CommitRequests) {
    // Unbounded: requests come one at a time from the consumer thread, which waits for each.
    let (sender, receiver) = mpsc::unbounded_channel();
    (Commits { requests: sender }, CommitRequests(receiver))
}

impl Commits {
    /// Commits `entries` on the commit thread, waiting at most `wait` for the answer. Past the
    /// wait the caller goes on (the commit may still land; if not, the records after the
    /// previous commit are read again). Returns whether the broker took it in time.
    pub(crate) fn commit(&self, entries: Vec<CommitEntry>, why: CommitWhy, wait: Duration) -> bool {
        if entries.is_empty() {
            return true;
        }
        let (done, answered) = std::sync::mpsc::channel();
        let request = CommitRequest { entries, why, done };
        if self.requests.send(Request::Commit(request)).is_err() {
            warn!(why = why.as_str(), "commit thread gone; nothing committed");
            return false;
        }
        match answered.recv_timeout(wait) {
            Ok(taken) => taken,
            Err(_) => {
                warn!(
                    why = why.as_str(),
                    waited_ms = wait.as_millis() as u64,
                    "commit is taking long (a rebalance is in flight); not waiting for it"
                );
                false
            }
        }
    }

    /// Ends the commit thread once what was asked before is done.
    pub(crate) fn stop(&self) {
        // Gone already: nothing to stop.
        let _ = self.requests.send(Request::Stop);
    }
}

/// Starts the commit thread. It commits each plan of the committer (newest only), and every
/// request of the consumer thread (first, when both wait), all under the [`CommitLedger`]. A
/// plan the broker did not take is tried again after `retry_every` (the committer publishes a
/// plan only when a position advanced, so a last plan that failed would otherwise wait for
/// shutdown). It ends on [`Commits::stop`].
pub(crate) fn start<C: ConsumerContext + 'static>(
    consumer: Arc<BaseConsumer<C>>,
    assignment: SharedAssignment,
    metrics: Arc<Metrics>,
    CommitRequests(mut requests): CommitRequests,
    plans: Option<watch::Receiver<CommitPlan>>,
    retry_every: Duration,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // No plans: exactly-once, where offsets go only in transactions (`crate::transaction`); a
    // plain commit could pass records whose outputs a transaction then aborts.
    let transactional = plans.is_none();
    let mut plans = plans.unwrap_or_else(|| watch::channel(CommitPlan::default()).1);
    std::thread::Builder::new()
        .name("logbridge-commits".to_string())
        .spawn(move || {
            let mut ledger = CommitLedger::default();
            let mut plans_open = !transactional;
            // Idle partitions past skipped offsets are looked at on the commit interval.
            let mut tick = runtime.block_on(async {
                let mut tick = tokio::time::interval(retry_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            });
            // The last plan, while the broker has not taken it.
            let mut untaken: Option<CommitPlan> = None;
            loop {
                let retrying = untaken.is_some();
                let next = runtime.block_on(async {
                    tokio::select! {
                        biased;
                        request = requests.recv() => match request {
                            Some(Request::Commit(request)) => Next::Request(request),
                            Some(Request::Stop) | None => Next::Stop,
                        },
                        changed = plans.changed(), if plans_open => match changed {
                            Ok(()) => Next::Plan(plans.borrow_and_update().clone()),
                            Err(_) => Next::PlansClosed,
                        },
                        _ = tokio::time::sleep(retry_every), if retrying => Next::Retry,
                        _ = tick.tick() => Next::Tick,
                    }
                });
                // On the interval: the idle partitions past skipped offsets.
                let idle = match next {
                    Next::Tick if !transactional => ledger.skipped(&assignment.lock()),
                    _ => Vec::new(),
                };
                // Whether everything admitted was taken by the broker.
                let mut commit = |entries: &[CommitEntry], why: CommitWhy| {
                    let admitted = {
                        let assignment = assignment.lock();
                        let entries =
                            extend_over_skipped(entries, |entry| held_skipped(&assignment, entry));
                        ledger.admit(&entries, why, &assignment)
                    };
                    if admitted.is_empty() {
                        return true;
                    }
                    let taken = commit_sync(&consumer, &assignment, &metrics, &admitted, why);
                    if taken {
                        ledger.record(&admitted);
                    }
                    taken
                };
                match next {
                    Next::Stop => break,
                    // The committer is gone; the consumer's requests may still come.
                    Next::PlansClosed => plans_open = false,
                    Next::Plan(plan) => {
                        let taken = commit(&plan, CommitWhy::Interval);
                        untaken = (!taken).then_some(plan);
                    }
                    Next::Retry => {
                        if let Some(plan) = untaken.take() {
                            let taken = commit(&plan, CommitWhy::Interval);
                            untaken = (!taken).then_some(plan);
                        }
                    }
                    Next::Request(request) => {
                        let taken = commit(&request.entries, request.why);
                        // The asker may have stopped waiting; nothing to tell then.
                        let _ = request.done.send(taken);
                    }
                    Next::Tick => {
                        if !idle.is_empty() {
                            commit(&idle, CommitWhy::Skipped);
                        }
                    }
                }
            }
        })
}

/// What the commit thread does next.
enum Next {
    Request(CommitRequest),
    Plan(CommitPlan),
    /// Time to try the untaken plan again.
    Retry,
    /// The commit interval: idle partitions past skipped offsets.
    Tick,
    PlansClosed,
    Stop,
}

#[cfg(test)]
mod tests {
    use super::super::assignment::{Flow, PartitionState};
    use super::*;

    fn entry(
        assignment: &mut Assignment,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> CommitEntry {
        CommitEntry {
            source: assignment.key("logs", partition),
            generation,
            offset,
        }
    }

    fn held(assignment: &mut Assignment, partition: i32, generation: u64) {
        let key = assignment.key("logs", partition);
        assignment
            .partitions
            .insert(key, PartitionState::new(generation, Flow::Flowing));
    }

    #[test]
    fn plans_are_committed_only_for_partitions_held_under_their_generation() {
        let mut assignment = Assignment::default();
        held(&mut assignment, 0, 1);
        held(&mut assignment, 1, 4);
        let plan = vec![
            entry(&mut assignment, 0, 1, 10),
            // Partition 1 was revoked and assigned again since: generation 3 is over.
            entry(&mut assignment, 1, 3, 20),
            // Partition 2 is not ours at all.
            entry(&mut assignment, 2, 1, 30),
        ];
        let ledger = CommitLedger::default();
        let kept = ledger.admit(&plan, CommitWhy::Interval, &assignment);
        assert_eq!(kept, vec![plan[0].clone()]);
        // A revoke's entries are of partitions already let go: the ledger alone decides.
        let kept = ledger.admit(&plan, CommitWhy::Revoke, &assignment);
        assert_eq!(kept, plan);
    }

    #[test]
    fn no_commit_moves_a_partition_backwards() {
        let mut assignment = Assignment::default();
        held(&mut assignment, 0, 2);
        let mut ledger = CommitLedger::default();
        // The revoke committed 150; an interval plan made before it (100) comes after.
        let revoke = [entry(&mut assignment, 0, 2, 150)];
        assert_eq!(
            ledger.admit(&revoke, CommitWhy::Revoke, &assignment),
            revoke
        );
        ledger.record(&revoke);
        let late_plan = [entry(&mut assignment, 0, 2, 100)];
        assert!(ledger
            .admit(&late_plan, CommitWhy::Interval, &assignment)
            .is_empty());
        let same = [entry(&mut assignment, 0, 2, 150)];
        assert!(ledger
            .admit(&same, CommitWhy::Shutdown, &assignment)
            .is_empty());
        let forward = [entry(&mut assignment, 0, 2, 151)];
        assert_eq!(
            ledger.admit(&forward, CommitWhy::Shutdown, &assignment),
            forward
        );
        // A later assignment of the partition starts afresh (it reads from the group's
        // committed offset, so its positions are at or beyond it); an earlier one never
        // commits again.
        held(&mut assignment, 0, 3);
        let next_generation = [entry(&mut assignment, 0, 3, 160)];
        assert_eq!(
            ledger.admit(&next_generation, CommitWhy::Interval, &assignment),
            next_generation
        );
        ledger.record(&next_generation);
        let old_generation = [entry(&mut assignment, 0, 2, 500)];
        assert!(ledger
            .admit(&old_generation, CommitWhy::Revoke, &assignment)
            .is_empty());
    }

    #[test]
    fn positions_move_past_what_librdkafka_stepped_over_once_everything_read_finished() {
        let mut assignment = Assignment::default();
        held(&mut assignment, 0, 1);
        held(&mut assignment, 1, 1);
        held(&mut assignment, 2, 1);
        // Partition 0 returned up to 99, then a marker: librdkafka is at 101.
        let p0 = assignment.key("logs", 0);
        if let Some(state) = assignment.partitions.get_mut(&p0) {
            state.skipped = Skipped::past(Some(99), 101);
        }
        // Partition 2 returned nothing under this assignment, stepped over to 57.
        let p2 = assignment.key("logs", 2);
        if let Some(state) = assignment.partitions.get_mut(&p2) {
            state.skipped = Skipped::past(None, 57);
        }
        let plan = vec![
            entry(&mut assignment, 0, 1, 100),
            entry(&mut assignment, 1, 1, 100),
            // An older generation's entry is not extended.
            entry(&mut assignment, 0, 0, 100),
        ];
        let extended = extend_over_skipped(&plan, |entry| held_skipped(&assignment, entry));
        assert_eq!(extended[0].offset, 101, "past the marker");
        assert_eq!(extended[1].offset, 100, "nothing stepped over");
        assert_eq!(extended[2].offset, 100, "not this assignment");
        let unfinished = [entry(&mut assignment, 0, 1, 90)];
        assert_eq!(
            extend_over_skipped(&unfinished, |entry| held_skipped(&assignment, entry))[0].offset,
            90
        );

        // Idle: partition 2 at once; partition 0 once 100 is committed.
        let mut ledger = CommitLedger::default();
        let idle = ledger.skipped(&assignment);
        assert_eq!(idle, vec![entry(&mut assignment, 2, 1, 57)]);
        ledger.record(&idle);
        ledger.record(&[entry(&mut assignment, 0, 1, 100)]);
        let mut idle = ledger.skipped(&assignment);
        idle.sort_by_key(|entry| entry.source.partition);
        assert_eq!(
            idle,
            vec![
                entry(&mut assignment, 0, 1, 101),
                entry(&mut assignment, 2, 1, 57)
            ]
        );
        // What the ledger has taken is not admitted again.
        ledger.record(&idle);
        assert!(ledger
            .admit(
                &ledger.skipped(&assignment),
                CommitWhy::Skipped,
                &assignment
            )
            .is_empty());
    }

    #[test]
    fn commit_lists_carry_the_next_offset_to_read() {
        let mut assignment = Assignment::default();
        let entries = [
            entry(&mut assignment, 0, 1, 10),
            entry(&mut assignment, 5, 1, 0),
        ];
        let tpl = commit_list(&entries);
        assert_eq!(tpl.count(), 2);
        let offset = |partition| {
            tpl.find_partition("logs", partition)
                .map(|element| element.offset())
        };
        assert_eq!(offset(0), Some(Offset::Offset(10)));
        assert_eq!(offset(5), Some(Offset::Offset(0)));
    }

    #[test]
    fn commits_refused_after_a_revoke_are_stale_not_errors() {
        let with = |code| KafkaError::ConsumerCommit(code);
        for code in [
            RDKafkaErrorCode::State,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::StaleMemberEpoch,
            RDKafkaErrorCode::FencedMemberEpoch,
        ] {
            assert!(is_stale_commit(&with(code)), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(!is_stale_commit(&with(code)), "{code:?}");
        }
    }

    /// The commit thread against librdkafka's mock cluster: plans and requests are committed,
    /// a backwards request is not, a plan the broker refused is tried again, a partition not
    /// held skips its interval entry, and `stop` ends the thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_commit_thread_commits_under_the_ledger_and_retries_what_was_refused() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("logs", 2, 1).expect("topic");
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "commit-thread")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let consumer = Arc::new(consumer);
        let committed = |consumer: &BaseConsumer| -> Vec<Option<i64>> {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition("logs", 0);
            tpl.add_partition("logs", 1);
            let tpl = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            (0..2)
                .map(
                    |p| match tpl.find_partition("logs", p).map(|e| e.offset()) {
                        Some(Offset::Offset(offset)) => Some(offset),
                        _ => None,
                    },
                )
                .collect()
        };
        let gauge = prometheus::IntGauge::new("b", "b").expect("gauge");
        let assignment = SharedAssignment::new(crate::record::ByteBudget::new(1 << 20, gauge));
        {
            let mut held = assignment.lock();
            let key = held.key("logs", 0);
            held.partitions
                .insert(key, PartitionState::new(1, Flow::Flowing));
        }
        let metrics = Arc::new(Metrics::new());
        let (plans_tx, plans) = watch::channel(CommitPlan::default());
        let (commits, requests) = channel();
        let thread = start(
            consumer.clone(),
            assignment.clone(),
            metrics.clone(),
            requests,
            Some(plans),
            Duration::from_millis(200),
            tokio::runtime::Handle::current(),
        )
        .expect("commit thread");
        let entry = |partition: i32, offset: i64| CommitEntry {
            source: crate::record::PartitionKey {
                topic: crate::record::Topic::new("logs"),
                partition,
            },
            generation: 1,
            offset,
        };
        let ask = |entries: Vec<CommitEntry>, why| {
            let commits = commits.clone();
            tokio::task::spawn_blocking(move || {
                commits.commit(entries, why, Duration::from_secs(10))
            })
        };
        // A revoke request: committed (partition 1 need not be held for a request).
        assert!(ask(vec![entry(0, 5), entry(1, 7)], CommitWhy::Revoke)
            .await
            .expect("joined"));
        assert_eq!(committed(&consumer), vec![Some(5), Some(7)]);
        // Backwards: nothing to commit, which counts as done; the broker keeps 5.
        assert!(ask(vec![entry(0, 3)], CommitWhy::Shutdown)
            .await
            .expect("joined"));
        assert_eq!(committed(&consumer)[0], Some(5));
        // An interval plan while the broker refuses commits: tried again until taken. Its
        // entry for partition 1 (not held) is left out.
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10],
        );
        plans_tx
            .send(Arc::new(vec![entry(0, 9), entry(1, 11)]))
            .expect("sent");
        let retried = {
            let started = std::time::Instant::now();
            loop {
                if committed(&consumer)[0] == Some(9) {
                    break true;
                }
                if started.elapsed() > Duration::from_secs(20) {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert!(
            retried,
            "the refused plan was tried again: {:?}",
            committed(&consumer)
        );
        assert_eq!(committed(&consumer)[1], Some(7), "not held: not committed");
        assert!(metrics.commits.with_label_values(&["error"]).get() >= 1);
        assert!(metrics.commits.with_label_values(&["ok"]).get() >= 2);
        commits.stop();
        let ended = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joined");
        assert!(ended.is_ok(), "the thread ended on stop");
    }
}
