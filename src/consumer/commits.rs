//! Commit I/O: the committer decides *what* may be committed (see [`crate::committer`]); this
//! module sends it to Kafka. Three callers, one function ([`commit_sync`]):
//! - interval commits, on a thread of their own that waits for the committer's plans;
//! - revoke commits, inside the rebalance callback (before the partitions are let go);
//! - the final commit at shutdown, on a thread the poll loop waits for a bounded time.
//!
//! Every commit is synchronous: librdkafka reports the result of a manual *asynchronous*
//! commit only to an `offset_commit_cb`, which rust-rdkafka does not install (its event API
//! covers automatic commits only), so an async commit's failure would go unseen. The cost is
//! one broker round trip per interval on the commit thread; librdkafka keeps fetching meanwhile.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::assignment::{Assignment, SharedAssignment};
use crate::committer::{CommitEntry, CommitPlan};
use crate::metrics::Metrics;

/// Longest wait for the final commit at shutdown.
const FINAL_COMMIT_WAIT: Duration = Duration::from_millis(1_000);

/// Why a commit is made (log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitWhy {
    Interval,
    Revoke,
    Shutdown,
}

impl CommitWhy {
    fn as_str(self) -> &'static str {
        match self {
            CommitWhy::Interval => "interval",
            CommitWhy::Revoke => "revoke",
            CommitWhy::Shutdown => "shutdown",
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
        )
    )
}

fn commit_list(entries: &[CommitEntry]) -> TopicPartitionList {
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

/// The entries of `plan` whose partition is still held under the plan's generation: a plan
/// made before a revoke must not be committed for a partition that moved on.
fn still_held(plan: &[CommitEntry], assignment: &Assignment) -> Vec<CommitEntry> {
    plan.iter()
        .filter(|entry| {
            assignment
                .partitions
                .get(&entry.source)
                .is_some_and(|state| state.generation == entry.generation)
        })
        .cloned()
        .collect()
}

/// Commits `entries` and waits for the broker's answer; counts the outcome, and shows the
/// committed offsets of the partitions still owned.
pub(crate) fn commit_sync<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    assignment: &SharedAssignment,
    metrics: &Metrics,
    entries: &[CommitEntry],
    why: CommitWhy,
) {
    if entries.is_empty() {
        return;
    }
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
        }
        Err(err) if is_stale_commit(&err) => {
            metrics.commits.with_label_values(&["stale"]).inc();
            info!(error = %err, why, "commit refused: partitions already moved on");
        }
        Err(err) => {
            metrics.commits.with_label_values(&["error"]).inc();
            error!(error = %err, why, "synchronous commit failed");
        }
    }
}

/// Starts the interval commits on their own thread: a synchronous commit waits for a rebalance
/// in flight (seen: 5 s while a dead member's session expired), and the poll loop must not wait
/// with it (shutdown, held records and rebalance callbacks are served there). The thread ends
/// when the committer (the plans' sender) is gone.
///
/// Each plan is filtered, at commit time, to the partitions still held under the plan's
/// generation. A plan filtered just before a revoke may land just after the revoke's final
/// commit: it carries an older position of the same generation (plans only grow), so the next
/// owner at worst reads a few records again; it cannot land after the next owner's commits,
/// which belong to a later group generation the broker holds us to.
pub(crate) fn start_interval_commits<C: ConsumerContext + 'static>(
    consumer: Arc<BaseConsumer<C>>,
    assignment: SharedAssignment,
    metrics: Arc<Metrics>,
    mut plans: watch::Receiver<CommitPlan>,
    runtime: tokio::runtime::Handle,
) {
    let spawned = std::thread::Builder::new()
        .name("logbridge-commits".to_string())
        .spawn(move || {
            while runtime.block_on(plans.changed()).is_ok() {
                let plan = plans.borrow_and_update().clone();
                let entries = still_held(&plan, &assignment.lock());
                commit_sync(
                    &consumer,
                    &assignment,
                    &metrics,
                    &entries,
                    CommitWhy::Interval,
                );
            }
        });
    if let Err(err) = spawned {
        error!(error = %err, "cannot start the commit thread; only revoke and shutdown commit");
    }
}

/// Commits the final positions, waiting at most `FINAL_COMMIT_WAIT`. A synchronous commit
/// waits for a rebalance in flight, which can take a session timeout when a member died;
/// shutdown must stay within `drain_timeout_ms` + 2 s, so past the wait it goes on (the commit
/// may still land; if not, the records after the previous commit are read again).
pub(crate) fn final_commit<C: ConsumerContext + 'static>(
    consumer: &Arc<BaseConsumer<C>>,
    assignment: &SharedAssignment,
    metrics: &Arc<Metrics>,
    entries: Vec<CommitEntry>,
) {
    let (consumer, assignment, metrics) = (consumer.clone(), assignment.clone(), metrics.clone());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("logbridge-final-commit".to_string())
        .spawn(move || {
            commit_sync(
                &consumer,
                &assignment,
                &metrics,
                &entries,
                CommitWhy::Shutdown,
            );
            // The poll loop may have stopped waiting; nothing to tell then.
            let _ = done_tx.send(());
        });
    if let Err(err) = spawned {
        warn!(error = %err, "cannot start the final commit");
        return;
    }
    if done_rx.recv_timeout(FINAL_COMMIT_WAIT).is_err() {
        warn!(
            waited_ms = FINAL_COMMIT_WAIT.as_millis() as u64,
            "final commit is taking long (a rebalance is in flight); not waiting for it"
        );
    }
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

    #[test]
    fn plans_are_committed_only_for_partitions_held_under_their_generation() {
        let mut assignment = Assignment::default();
        for (partition, generation) in [(0, 1), (1, 4)] {
            let key = assignment.key("logs", partition);
            assignment.partitions.insert(
                key,
                PartitionState {
                    generation,
                    flow: Flow::Flowing,
                    last_polled: None,
                },
            );
        }
        let plan = vec![
            entry(&mut assignment, 0, 1, 10),
            // Partition 1 was revoked and assigned again since: generation 3 is over.
            entry(&mut assignment, 1, 3, 20),
            // Partition 2 is not ours at all.
            entry(&mut assignment, 2, 1, 30),
        ];
        let kept = still_held(&plan, &assignment);
        assert_eq!(kept, vec![plan[0].clone()]);
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
}
