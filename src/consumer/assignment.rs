//! The partitions this instance owns, as the consumer thread sees them: each one's assignment
//! generation and whether its records flow or are held back. Rebalance callbacks change it, the
//! poll loop reads and writes it, the interval commits filter plans through it, and `/status`
//! shows it through a [`PartitionView`].

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::Metrics;
use crate::record::{ByteBudget, PartitionKey, Record, Topic};

/// Why a partition is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PauseWhy {
    /// The router channel stayed full for `pause_after_ms`.
    RouterFull,
    /// The pipeline holds `max_in_flight_bytes`.
    Bytes,
    /// The partition's finished-but-uncommitted records reached `max_uncommitted_records`:
    /// it stays paused until the committer releases it.
    Uncommitted,
    /// The dead-letter breaker tripped.
    Breaker,
    /// Shutdown is draining.
    Shutdown,
}

impl PauseWhy {
    /// The `reason` label of the pause metrics (one of [`crate::metrics::PAUSE_REASONS`]).
    pub(crate) fn label(self) -> &'static str {
        match self {
            PauseWhy::RouterFull => "backpressure",
            PauseWhy::Bytes => "bytes",
            PauseWhy::Uncommitted => "uncommitted",
            PauseWhy::Breaker => "breaker",
            PauseWhy::Shutdown => "shutdown",
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PauseWhy::RouterFull => "router channel full",
            PauseWhy::Bytes => "in-flight bytes at pipeline.max_in_flight_bytes",
            PauseWhy::Uncommitted => {
                "finished records waiting behind an unfinished one at pipeline.max_uncommitted_records"
            }
            PauseWhy::Breaker => "dead-letter breaker tripped",
            PauseWhy::Shutdown => "shutting down",
        }
    }
}

/// Whether a partition's records flow or are held back.
pub(crate) enum Flow {
    /// Records go straight to the router.
    Flowing,
    /// Paused in librdkafka; these records were read and wait, oldest first, for room.
    Paused {
        why: PauseWhy,
        held: VecDeque<Record>,
    },
}

impl Flow {
    /// Paused with nothing held yet.
    pub(crate) fn paused(why: PauseWhy) -> Flow {
        Flow::Paused {
            why,
            held: VecDeque::new(),
        }
    }

    /// Paused, holding the records that did not fit (in offset order).
    pub(crate) fn holding(why: PauseWhy, records: Vec<Record>) -> Flow {
        Flow::Paused {
            why,
            held: VecDeque::from(records),
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        matches!(self, Flow::Paused { .. })
    }

    /// Why it is paused, if it is.
    pub(crate) fn why(&self) -> Option<PauseWhy> {
        match self {
            Flow::Flowing => None,
            Flow::Paused { why, .. } => Some(*why),
        }
    }

    /// Records read and held back.
    pub(crate) fn held(&self) -> usize {
        match self {
            Flow::Flowing => 0,
            Flow::Paused { held, .. } => held.len(),
        }
    }

    /// Bytes of the records held back.
    pub(crate) fn held_bytes(&self) -> usize {
        match self {
            Flow::Flowing => 0,
            Flow::Paused { held, .. } => held.iter().map(|record| record.charge.bytes()).sum(),
        }
    }
}

/// Offsets librdkafka stepped over without returning a record: the markers that end Kafka
/// transactions (commit or abort control records) and the records of aborted transactions,
/// which a `read_committed` consumer never sees. Its position (`rd_kafka_position`, the offset
/// after the last message *or control record* it served) is then past the last record it
/// returned, and nothing in between is to be read: so once everything up to that record has
/// finished, the partition may be committed up to the position. Without this the commit of a
/// partition whose log ends in a marker (every transactional topic) stays one below the end of
/// the log forever, and its lag never reaches 0 (librdkafka stores such offsets itself only
/// with `enable.auto.offset.store`, which logbridge turns off; librdkafka #3917).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// The last record returned under this assignment (`None`: none yet).
    pub(crate) after: Option<i64>,
    /// librdkafka's position: the next offset to read.
    pub(crate) to: i64,
}

impl Skipped {
    /// What librdkafka's `position` says was stepped over after `last_polled`, if anything. A
    /// position is only valid once librdkafka served something of this assignment: it resets
    /// it when fetching stops (unassign) and on seek (`rdkafka_partition.c`).
    pub(crate) fn past(last_polled: Option<i64>, position: i64) -> Option<Skipped> {
        let stepped_over = match last_polled {
            Some(last) => position > last.saturating_add(1),
            None => position >= 0,
        };
        stepped_over.then_some(Skipped {
            after: last_polled,
            to: position,
        })
    }

    /// `offset` (a commit position of this assignment) moved over the skipped offsets when it
    /// is right after the last record returned: everything read has finished.
    pub(crate) fn extend(&self, offset: i64) -> i64 {
        match self.after {
            Some(last) if offset == last.saturating_add(1) => self.to.max(offset),
            _ => offset,
        }
    }

    /// The commit position this assignment may have with nothing of it in flight, given what
    /// was committed under it (`None`: nothing): the position, once the last record returned
    /// is committed, or at once where no record was returned.
    pub(crate) fn idle_commit(&self, committed: Option<i64>) -> Option<i64> {
        match (self.after, committed) {
            (None, _) => Some(self.to),
            (Some(last), Some(committed)) if committed == last.saturating_add(1) => Some(self.to),
            _ => None,
        }
    }
}

/// What a record returned by librdkafka is, against what was read of its partition before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOrder {
    /// Past everything read so far: the next record.
    Next,
    /// A record read already (same offset, timestamp and size as then): librdkafka returned it
    /// again. It was taken already; taking it again would dispatch an offset twice.
    ReturnedAgain,
    /// At or below an offset read already, but not the record read there (or older than what
    /// is remembered): the log itself moved back (a topic deleted and created again, a log
    /// truncated by a leader change, a reset to the log start). Its records are new.
    MovedBack,
}

/// Identity of a record read: offset, timestamp and key + value size. Two records at one offset
/// of one partition with the same timestamp and size are taken as the same record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadMark {
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) size: usize,
}

/// How many of a partition's last records are remembered to tell a record returned again from
/// a log that moved back (a record older than these counts as moved back: read again, never
/// skipped).
const REMEMBERED_READS: usize = 64;

/// One owned partition.
pub(crate) struct PartitionState {
    pub(crate) generation: u64,
    pub(crate) flow: Flow,
    /// Offset of the last record librdkafka returned for this partition: its fetch position is
    /// right after it (librdkafka sets it so on pause, and we re-state it on resume).
    pub(crate) last_polled: Option<i64>,
    /// When a record of it was last read from librdkafka (or when it was assigned).
    pub(crate) last_read: Instant,
    /// The end of its log (high watermark, or last stable offset), from librdkafka's
    /// statistics.
    pub(crate) log_end: Option<i64>,
    /// Where reading stands before the first record is read, from librdkafka's statistics
    /// (the application or committed offset).
    pub(crate) start: Option<i64>,
    /// Offsets librdkafka stepped over after `last_polled` (see [`Skipped`]); cleared by every
    /// record returned.
    pub(crate) skipped: Option<Skipped>,
    /// The last records read, oldest first (at most [`REMEMBERED_READS`]).
    recent: VecDeque<ReadMark>,
    /// The first record taken under this generation (`delivery = "exactly-once"`: an aborted
    /// transaction rewinds to it when no transaction committed a position of it).
    pub(crate) first_taken: Option<i64>,
    /// The position the last committed transaction gave it (`delivery = "exactly-once"`): an
    /// aborted transaction rewinds to it. Kept across rewinds; a new assignment starts without.
    pub(crate) committed: Option<i64>,
}

impl PartitionState {
    /// A partition just assigned under `generation`.
    pub(crate) fn new(generation: u64, flow: Flow) -> PartitionState {
        PartitionState {
            generation,
            flow,
            last_polled: None,
            last_read: Instant::now(),
            log_end: None,
            start: None,
            skipped: None,
            recent: VecDeque::new(),
            first_taken: None,
            committed: None,
        }
    }

    /// Where an aborted transaction rewinds it to: the position the last committed transaction
    /// gave it, else the first record taken under this generation; `None` if nothing was taken
    /// since (nothing to read again).
    pub(crate) fn rewind_target(&self) -> Option<i64> {
        match (self.committed, self.first_taken) {
            (Some(committed), _) => Some(committed),
            (None, first) => first,
        }
    }

    /// Where `mark` stands against what was read of this partition under this assignment.
    pub(crate) fn order_of(&self, mark: ReadMark) -> ReadOrder {
        match self.last_polled {
            Some(last) if mark.offset <= last => {
                let remembered = self
                    .recent
                    .binary_search_by_key(&mark.offset, |read| read.offset)
                    .ok()
                    .and_then(|index| self.recent.get(index));
                if remembered == Some(&mark) {
                    ReadOrder::ReturnedAgain
                } else {
                    ReadOrder::MovedBack
                }
            }
            _ => ReadOrder::Next,
        }
    }

    /// Notes the record just taken (a [`ReadOrder::Next`] one, or the first of a log that moved
    /// back, after [`PartitionState::restart`]).
    pub(crate) fn taken(&mut self, mark: ReadMark, read_at: Instant) {
        if self.recent.len() == REMEMBERED_READS {
            self.recent.pop_front();
        }
        self.recent.push_back(mark);
        self.first_taken.get_or_insert(mark.offset);
        self.last_polled = Some(mark.offset);
        self.skipped = None;
        self.last_read = read_at;
    }

    /// Starts the partition's reading afresh under `generation` after its log moved back: what
    /// was read of it before (and is held back) belongs to the old log. Gives back the held
    /// records dropped.
    pub(crate) fn restart(&mut self, generation: u64) -> usize {
        self.generation = generation;
        self.first_taken = None;
        self.last_polled = None;
        self.skipped = None;
        self.recent.clear();
        match &mut self.flow {
            Flow::Paused { held, .. } => {
                let dropped = held.len();
                held.clear();
                dropped
            }
            Flow::Flowing => 0,
        }
    }

    /// Records known to wait for reading: held back, or in the log past the next offset to
    /// read. 0 where the position or the log end is unknown.
    pub(crate) fn behind(&self) -> i64 {
        // Offsets stepped over (a transaction's marker at the end of the log) are not behind.
        let next = self
            .skipped
            .map(|skipped| skipped.to)
            .or(self.last_polled.map(|offset| offset + 1))
            .or(self.start);
        let in_log = match (self.log_end, next) {
            (Some(end), Some(next)) => (end - next).max(0),
            _ => 0,
        };
        self.flow.held() as i64 + in_log
    }
}

/// A partition that has records waiting to be read but has not been read for a while: paused
/// and never resumed, or not fetched at all. Nothing may be in flight for it, so only the
/// consumer can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadStall {
    /// The partition.
    pub source: PartitionKey,
    /// Records known to wait (held, or in the log past the next offset to read).
    pub behind: i64,
    /// Since when nothing of it was read.
    pub unread_for: Duration,
    /// Paused in librdkafka.
    pub paused: bool,
}

impl std::fmt::Display for UnreadStall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {} stalled: not read for {:.0} s with {} records behind ({})",
            self.source,
            self.unread_for.as_secs_f64(),
            self.behind,
            if self.paused {
                "paused"
            } else {
                "not paused, yet not fetched"
            }
        )
    }
}

/// What the consumer thread and its rebalance callbacks share (same thread, but librdkafka's
/// callback API only gives `&self`); the commit thread and `/status` read it.
#[derive(Default)]
pub(crate) struct Assignment {
    pub(crate) partitions: FxHashMap<PartitionKey, PartitionState>,
    /// The interned topic names, by name (interning takes a process-wide lock; this does not).
    topics: FxHashMap<String, Topic>,
    /// The topic `key` returned last.
    last_topic: Option<Topic>,
    /// `events_consumed_total` and `consumed_bytes_total` of each topic, looked up once rather
    /// than per record.
    consumed: FxHashMap<Topic, (prometheus::IntCounter, prometheus::IntCounter)>,
    /// Partitions behind and not read for `stall_timeout_ms`, as last observed.
    unread: Vec<UnreadStall>,
}

impl Assignment {
    pub(crate) fn key(&mut self, topic: &str, partition: i32) -> PartitionKey {
        // Consecutive records mostly share their topic: a comparison, not a hash lookup.
        if let Some(last) = self.last_topic.filter(|last| last.as_str() == topic) {
            return PartitionKey {
                topic: last,
                partition,
            };
        }
        let topic = match self.topics.get(topic) {
            Some(name) => *name,
            None => {
                let name = Topic::new(topic);
                self.topics.insert(topic.to_string(), name);
                name
            }
        };
        self.last_topic = Some(topic);
        PartitionKey { topic, partition }
    }

    /// Counts a record read from `topic`.
    /// Counts a record of `bytes` (key and payload) read from `topic`.
    pub(crate) fn count_consumed(&mut self, topic: Topic, bytes: usize, metrics: &Metrics) {
        let (records, counted) = self.consumed.entry(topic).or_insert_with(|| {
            (
                metrics.consumed.with_label_values(&[topic.as_str()]),
                metrics.consumed_bytes.with_label_values(&[topic.as_str()]),
            )
        });
        records.inc();
        counted.inc_by(bytes as u64);
    }

    pub(crate) fn paused_count(&self) -> usize {
        self.partitions
            .values()
            .filter(|state| state.flow.is_paused())
            .count()
    }

    pub(crate) fn held_count(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.flow.held())
            .sum()
    }

    pub(crate) fn held_bytes(&self) -> usize {
        self.partitions
            .values()
            .map(|state| state.flow.held_bytes())
            .sum()
    }

    /// Sets the assigned and paused gauges: the totals, and 0/1 per owned partition.
    pub(crate) fn publish(&self, metrics: &Metrics) {
        metrics
            .assigned_partitions
            .set(self.partitions.len() as i64);
        for reason in crate::metrics::PAUSE_REASONS {
            let paused = self
                .partitions
                .values()
                .filter(|state| state.flow.why().is_some_and(|why| why.label() == reason))
                .count();
            metrics
                .paused_partitions
                .with_label_values(&[reason])
                .set(paused as i64);
        }
        for (key, state) in &self.partitions {
            let partition = key.partition.to_string();
            metrics
                .partition_paused
                .with_label_values(&[&*key.topic, &partition])
                .set(i64::from(state.flow.is_paused()));
        }
    }

    /// Finds the partitions behind and not read for `timeout` (none while the breaker holds
    /// consumption on purpose), keeps them for the view, sets the gauge, and logs each new one.
    pub(crate) fn observe_unread(&mut self, timeout: Duration, halted: bool, metrics: &Metrics) {
        let now = Instant::now();
        let mut unread: Vec<UnreadStall> = if halted {
            Vec::new()
        } else {
            self.partitions
                .iter()
                .filter_map(|(source, state)| {
                    let unread_for = now.saturating_duration_since(state.last_read);
                    let behind = state.behind();
                    (behind > 0 && unread_for >= timeout).then(|| UnreadStall {
                        source: source.clone(),
                        behind,
                        unread_for,
                        paused: state.flow.is_paused(),
                    })
                })
                .collect()
        };
        unread.sort_by(|a, b| {
            (&a.source.topic, a.source.partition).cmp(&(&b.source.topic, b.source.partition))
        });
        for stall in &unread {
            if !self.unread.iter().any(|known| known.source == stall.source) {
                warn!(topic = %stall.source.topic, partition = stall.source.partition, behind = stall.behind, "{stall}");
            }
        }
        metrics
            .stalled_partitions
            .with_label_values(&["unread"])
            .set(unread.len() as i64);
        self.unread = unread;
    }

    /// Every owned partition, sorted.
    fn snapshot(&self) -> Vec<PartitionFlow> {
        let mut flows: Vec<PartitionFlow> = self
            .partitions
            .iter()
            .map(|(key, state)| PartitionFlow {
                topic: key.topic.to_string(),
                partition: key.partition,
                generation: state.generation,
                paused: state.flow.is_paused(),
                paused_why: state.flow.why().map(PauseWhy::as_str),
                held: state.flow.held(),
            })
            .collect();
        flows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        flows
    }
}

/// The assignment, shared between the consumer thread (which writes it), the commit thread and
/// the HTTP endpoint (which read it).
#[derive(Clone)]
pub(crate) struct SharedAssignment {
    inner: Arc<Mutex<Assignment>>,
    /// Set by the first assignment, cleared when partitions are lost (session expired).
    in_group: Arc<AtomicBool>,
    /// Bytes in flight: records are charged under the lock, so a view taken under it sees
    /// held and flowing bytes consistently.
    pub(crate) budget: Arc<ByteBudget>,
}

impl SharedAssignment {
    pub(crate) fn new(budget: Arc<ByteBudget>) -> SharedAssignment {
        SharedAssignment {
            inner: Arc::default(),
            in_group: Arc::default(),
            budget,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Assignment> {
        // Nothing panics while holding it (plain map updates); recover regardless.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_in_group(&self, in_group: bool) {
        self.in_group.store(in_group, Ordering::Release);
    }

    pub(crate) fn view(&self) -> PartitionView {
        PartitionView {
            shared: self.clone(),
        }
    }
}

/// The consumer's view of its partitions, for `/readyz` and `/status`.
#[derive(Clone)]
pub struct PartitionView {
    shared: SharedAssignment,
}

/// One owned partition as the consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionFlow {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Assignment generation.
    pub generation: u64,
    /// Paused in librdkafka.
    pub paused: bool,
    /// Why it is paused.
    pub paused_why: Option<&'static str>,
    /// Records read and held back while paused.
    pub held: usize,
}

impl PartitionView {
    /// Whether the consumer has received an assignment (possibly empty) and not lost it since.
    pub fn in_group(&self) -> bool {
        self.shared.in_group.load(Ordering::Acquire)
    }

    /// Every owned partition, sorted.
    pub fn snapshot(&self) -> Vec<PartitionFlow> {
        self.shared.lock().snapshot()
    }

    /// Whether this instance owns no partition (an empty assignment, or none yet).
    pub fn owns_none(&self) -> bool {
        self.shared.lock().partitions.is_empty()
    }

    /// Partitions behind and not read for `stall_timeout_ms`, as last observed.
    pub fn unread(&self) -> Vec<UnreadStall> {
        self.shared.lock().unread.clone()
    }

    /// Every owned partition, sorted, with the bytes in flight and how many of them are held for
    /// paused partitions, all read under one lock: the held bytes are those of the partitions
    /// the table shows paused (`/status` shows them together, and a reader may compare them).
    pub fn snapshot_with_bytes(&self) -> (Vec<PartitionFlow>, usize, usize) {
        let assignment = self.shared.lock();
        (
            assignment.snapshot(),
            self.shared.budget.used(),
            assignment.held_bytes(),
        )
    }

    /// Bytes in flight, and how many of them are held for paused partitions, read together.
    pub fn bytes(&self) -> (usize, usize) {
        let assignment = self.shared.lock();
        (self.shared.budget.used(), assignment.held_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(offset: i64, timestamp: i64) -> ReadMark {
        ReadMark {
            offset,
            timestamp: Some(timestamp),
            size: 100,
        }
    }

    #[test]
    fn a_record_read_again_is_told_from_a_log_that_moved_back() {
        let mut state = PartitionState::new(1, Flow::Flowing);
        let now = Instant::now();
        assert_eq!(state.order_of(mark(0, 5)), ReadOrder::Next);
        for offset in 0..200 {
            state.taken(mark(offset, offset * 10), now);
        }
        assert_eq!(state.order_of(mark(200, 0)), ReadOrder::Next);
        // The last records read, returned again as they were: skipped.
        assert_eq!(state.order_of(mark(199, 1990)), ReadOrder::ReturnedAgain);
        assert_eq!(state.order_of(mark(150, 1500)), ReadOrder::ReturnedAgain);
        // Another record at an offset read (a recreated topic, a truncated log): new.
        assert_eq!(state.order_of(mark(199, 7)), ReadOrder::MovedBack);
        assert_eq!(
            state.order_of(ReadMark {
                size: 101,
                ..mark(150, 1500)
            }),
            ReadOrder::MovedBack
        );
        // Older than what is remembered: read again rather than risk skipping new records.
        assert_eq!(state.order_of(mark(0, 0)), ReadOrder::MovedBack);
        assert_eq!(state.recent.len(), REMEMBERED_READS);
    }

    #[test]
    fn a_restart_forgets_the_old_log_and_its_held_records() {
        let mut state = PartitionState::new(1, Flow::paused(PauseWhy::RouterFull));
        let now = Instant::now();
        state.taken(mark(41, 1), now);
        if let Flow::Paused { held, .. } = &mut state.flow {
            held.push_back(crate::record::test_record(0, 42, None, None));
            held.push_back(crate::record::test_record(0, 43, None, None));
        }
        assert_eq!(state.restart(7), 2);
        assert_eq!(state.generation, 7);
        assert_eq!(state.flow.held(), 0);
        assert_eq!(state.order_of(mark(0, 9)), ReadOrder::Next);
    }

    fn state(generation: u64, flow: Flow) -> PartitionState {
        PartitionState::new(generation, flow)
    }

    fn held_record(source: &PartitionKey, offset: i64) -> Record {
        crate::record::test_record(source.partition, offset, None, None)
    }

    #[test]
    fn what_librdkafka_stepped_over_is_known_only_past_the_last_record() {
        // The position right after the last record: nothing stepped over.
        assert_eq!(Skipped::past(Some(99), 100), None);
        // A marker (or aborted records and their marker) after it.
        let marker = Skipped::past(Some(99), 101).expect("stepped over");
        assert_eq!(
            marker,
            Skipped {
                after: Some(99),
                to: 101
            }
        );
        // Nothing returned yet under this assignment, a marker served: librdkafka resets its
        // position on assign and seek, so any valid one was reached in this assignment.
        assert_eq!(
            Skipped::past(None, 57),
            Some(Skipped {
                after: None,
                to: 57
            })
        );
        // A position below the last record (a reset, say) steps over nothing.
        assert_eq!(Skipped::past(Some(99), 40), None);
    }

    #[test]
    fn a_commit_moves_past_skipped_offsets_only_once_everything_read_finished() {
        let marker = Skipped {
            after: Some(99),
            to: 102,
        };
        assert_eq!(marker.extend(100), 102, "right after the last record");
        assert_eq!(marker.extend(80), 80, "records up to 99 still unfinished");
        assert_eq!(marker.extend(102), 102);
        let nothing_read = Skipped {
            after: None,
            to: 57,
        };
        assert_eq!(
            nothing_read.extend(57),
            57,
            "no record returned: no entry to extend"
        );
        // Idle: once the last record is committed, or at once with none returned.
        assert_eq!(
            marker.idle_commit(None),
            None,
            "nothing of it committed yet"
        );
        assert_eq!(
            marker.idle_commit(Some(90)),
            None,
            "records 90..99 uncommitted"
        );
        assert_eq!(marker.idle_commit(Some(100)), Some(102));
        assert_eq!(nothing_read.idle_commit(None), Some(57));
    }

    #[test]
    fn a_marker_at_the_end_of_the_log_is_not_behind() {
        let mut state = state(1, Flow::Flowing);
        state.log_end = Some(101);
        state.last_polled = Some(99);
        assert_eq!(state.behind(), 1, "offset 100 not read yet");
        state.skipped = Skipped::past(Some(99), 101);
        assert_eq!(state.behind(), 0, "offset 100 was a marker, stepped over");
    }

    #[test]
    fn topic_names_are_interned() {
        let mut assignment = Assignment::default();
        let first = assignment.key("logs", 0);
        let second = assignment.key("logs", 3);
        assert!(std::ptr::eq(first.topic.as_str(), second.topic.as_str()));
        assert_eq!(first.topic, second.topic);
        assert_eq!(second.partition, 3);
        let other = assignment.key("other", 0).topic;
        assert_ne!(first.topic, other);
        assert_eq!(other, Topic::new("other"), "one name, one interned topic");
    }

    #[test]
    fn counts_paused_partitions_and_held_records_and_shows_them_sorted() {
        let gauge = prometheus::IntGauge::new("b", "b").expect("gauge");
        let shared = SharedAssignment::new(ByteBudget::new(1 << 20, gauge));
        {
            let mut assignment = shared.lock();
            let b1 = assignment.key("b", 1);
            let a2 = assignment.key("a", 2);
            let a0 = assignment.key("a", 0);
            let mut held = VecDeque::new();
            for offset in [7, 8] {
                let mut record = held_record(&a2, offset);
                record.charge = shared.budget.charge(100);
                held.push_back(record);
            }
            assignment.partitions.insert(b1, state(3, Flow::Flowing));
            assignment.partitions.insert(
                a2,
                state(
                    2,
                    Flow::Paused {
                        why: PauseWhy::Bytes,
                        held,
                    },
                ),
            );
            assignment
                .partitions
                .insert(a0, state(1, Flow::paused(PauseWhy::RouterFull)));
            assert_eq!(assignment.paused_count(), 2);
            assert_eq!(assignment.held_count(), 2);
            assert_eq!(assignment.held_bytes(), 200);
        }
        let view = shared.view();
        assert_eq!(view.bytes(), (200, 200), "in flight, of which held");
        let (flows, in_flight_bytes, held_bytes) = view.snapshot_with_bytes();
        assert_eq!((in_flight_bytes, held_bytes), (200, 200));
        assert_eq!(flows, view.snapshot(), "the same table");
        assert!(!view.in_group());
        shared.set_in_group(true);
        assert!(view.in_group());
        let shown: Vec<(String, i32, Option<&str>, usize)> = view
            .snapshot()
            .into_iter()
            .map(|flow| (flow.topic, flow.partition, flow.paused_why, flow.held))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("a".to_string(), 0, Some("router channel full"), 0),
                (
                    "a".to_string(),
                    2,
                    Some("in-flight bytes at pipeline.max_in_flight_bytes"),
                    2
                ),
                ("b".to_string(), 1, None, 0),
            ]
        );
    }

    #[test]
    fn publishes_assigned_and_paused_gauges() {
        let metrics = Metrics::new();
        let mut assignment = Assignment::default();
        let k0 = assignment.key("logs", 0);
        let k1 = assignment.key("logs", 1);
        assignment
            .partitions
            .insert(k0, state(1, Flow::paused(PauseWhy::RouterFull)));
        assignment.partitions.insert(k1, state(1, Flow::Flowing));
        assignment.publish(&metrics);
        let topic = assignment.key("logs", 0).topic;
        assignment.count_consumed(topic, 100, &metrics);
        assignment.count_consumed(topic, 20, &metrics);
        assert_eq!(metrics.consumed.with_label_values(&["logs"]).get(), 2);
        assert_eq!(
            metrics.consumed_bytes.with_label_values(&["logs"]).get(),
            120
        );
        assert_eq!(metrics.assigned_partitions.get(), 2);
        assert_eq!(metrics.paused_total(), 1);
        let paused = |p: &str| {
            metrics
                .partition_paused
                .with_label_values(&["logs", p])
                .get()
        };
        assert_eq!((paused("0"), paused("1")), (1, 0));
    }

    #[test]
    fn a_partition_behind_and_not_read_is_a_stall_unless_the_breaker_holds_it() {
        let metrics = Metrics::new();
        let mut assignment = Assignment::default();
        let long_ago = Instant::now() - Duration::from_secs(120);
        let mut add =
            |partition: i32, last_polled: Option<i64>, start: Option<i64>, log_end: Option<i64>| {
                let key = assignment.key("logs", partition);
                let mut state = PartitionState::new(1, Flow::paused(PauseWhy::RouterFull));
                state.last_polled = last_polled;
                state.start = start;
                state.log_end = log_end;
                state.last_read = long_ago;
                assignment.partitions.insert(key, state);
            };
        // Read up to 99, the log ends at 150: 50 behind.
        add(0, Some(99), None, Some(150));
        // Caught up: nothing behind, however long it was not read.
        add(1, Some(149), None, Some(150));
        // Never read since assigned: the statistics' position tells (the bug this catches: a
        // partition given back still paused by librdkafka).
        add(2, None, Some(10), Some(40));
        // Position unknown: not judged.
        add(3, None, None, Some(40));
        assignment.observe_unread(Duration::from_secs(60), false, &metrics);
        let found: Vec<(i32, i64)> = assignment
            .unread
            .iter()
            .map(|stall| (stall.source.partition, stall.behind))
            .collect();
        assert_eq!(found, vec![(0, 50), (2, 30)]);
        assert_eq!(
            metrics
                .stalled_partitions
                .with_label_values(&["unread"])
                .get(),
            2
        );
        assert!(assignment.unread[0].to_string().contains(
            "partition logs/0 stalled: not read for 120 s with 50 records behind (paused)"
        ));
        // Not yet for as long as the timeout.
        assignment.observe_unread(Duration::from_secs(600), false, &metrics);
        assert!(assignment.unread.is_empty());
        // The breaker pauses everything on purpose (and says so itself).
        assignment.observe_unread(Duration::from_secs(60), true, &metrics);
        assert!(assignment.unread.is_empty());
        assert_eq!(
            metrics
                .stalled_partitions
                .with_label_values(&["unread"])
                .get(),
            0
        );
    }

    #[test]
    fn the_view_shows_the_unread_partitions_last_observed() {
        let metrics = Metrics::new();
        let gauge = prometheus::IntGauge::new("b", "b").expect("gauge");
        let shared = SharedAssignment::new(ByteBudget::new(1 << 20, gauge));
        {
            let mut assignment = shared.lock();
            let key = assignment.key("logs", 4);
            let mut state = PartitionState::new(1, Flow::Flowing);
            state.last_polled = Some(9);
            state.log_end = Some(20);
            state.last_read = Instant::now() - Duration::from_secs(90);
            assignment.partitions.insert(key, state);
            assignment.observe_unread(Duration::from_secs(60), false, &metrics);
        }
        let unread = shared.view().unread();
        assert_eq!(unread.len(), 1);
        assert_eq!((unread[0].source.partition, unread[0].behind), (4, 10));
        assert!(unread[0]
            .to_string()
            .ends_with("(not paused, yet not fetched)"));
    }
}
