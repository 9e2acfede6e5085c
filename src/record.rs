//! The messages that travel the pipeline: a [`Record`] flows forward from the consumer through
//! the router to a worker, and a [`ProcessAck`] travels from whoever finished it to the committer.

use std::fmt;
use std::sync::Arc;

use crate::event::{DecodeError, Level};

/// Which partition a record came from, and under which assignment.
///
/// `generation` is bumped by the consumer every time it is assigned a partition; acks carrying
/// an older generation belong to an assignment that was revoked and are never committed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    /// Source topic (shared, not copied per record).
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One Kafka record inside logbridge, decoded once by the consumer.
#[derive(Debug)]
pub struct Record {
    /// Source topic and partition.
    pub source: PartitionKey,
    /// Source offset.
    pub offset: i64,
    /// Assignment generation the record was read under.
    pub generation: u64,
    /// Record key, if any: it picks the worker, so equal keys stay in order.
    pub key: Option<Box<[u8]>>,
    /// The original payload, forwarded unchanged (`None` for a tombstone).
    pub payload: Option<Box<[u8]>>,
    /// The original headers, forwarded with the record.
    pub headers: Option<rdkafka::message::OwnedHeaders>,
    /// The decoded event's level (what routing needs; the whole event was validated and the
    /// payload itself is what sinks forward), or why it could not be decoded. `None` until the
    /// router decodes it ([`Record::decode`]): the consumer only marks a value over
    /// `max_payload_bytes`, which it does not copy, so that decoding is off its thread.
    pub decoded: Option<Result<Level, DecodeError>>,
    /// When the consumer took it from librdkafka (for the processing latency).
    pub read_at: std::time::Instant,
    /// Its bytes, counted against `pipeline.max_in_flight_bytes` until it is dropped.
    pub charge: Charge,
}

/// Bytes held by records between the consumer and the committer, against
/// `pipeline.max_in_flight_bytes`. Every record carries a [`Charge`] that gives its bytes back
/// when the record is dropped, wherever that happens (delivered, parked, fenced, revoked), so
/// the count cannot drift from what is really held.
pub struct ByteBudget {
    used: std::sync::atomic::AtomicUsize,
    limit: usize,
    gauge: prometheus::IntGauge,
}

impl ByteBudget {
    /// A budget of `limit` bytes, shown on `gauge`.
    pub fn new(limit: usize, gauge: prometheus::IntGauge) -> Arc<ByteBudget> {
        gauge.set(0);
        Arc::new(ByteBudget {
            used: std::sync::atomic::AtomicUsize::new(0),
            limit,
            gauge,
        })
    }

    /// Counts `bytes` until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.used
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.gauge.add(bytes as i64);
        Charge {
            budget: Some(self.clone()),
            bytes,
        }
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `bytes` more fit. A record larger than the whole bound still fits when nothing
    /// is held, or it could never move.
    pub fn has_room(&self, bytes: usize) -> bool {
        let used = self.used();
        used == 0 || used.saturating_add(bytes) <= self.limit
    }

    /// Whether at most half the bound is held, not counting `held` bytes (records held back
    /// for paused partitions, which only resuming can move): the low-water mark for resuming.
    pub fn half_free(&self, held: usize) -> bool {
        self.used().saturating_sub(held) * 2 <= self.limit
    }
}

/// The bytes one record holds against the [`ByteBudget`]; given back on drop.
#[derive(Default)]
pub struct Charge {
    budget: Option<Arc<ByteBudget>>,
    bytes: usize,
}

impl Charge {
    /// The bytes charged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Charge({} bytes)", self.bytes)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget
                .used
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
            budget.gauge.sub(self.bytes as i64);
        }
    }
}

/// The failure reason of a tombstone sent to the dead-letter topic (`input.tombstones =
/// "dead-letter"`); such failures do not count against the breaker.
pub const TOMBSTONE: &str = "tombstone";

/// How a record finished. Every record that enters the pipeline ends in exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckStatus {
    /// Delivered to its route's sink.
    Processed,
    /// No route takes its level.
    Ignored,
    /// Could not be decoded or delivered, and there is no dead-letter topic: logged, counted,
    /// skipped.
    Failed,
    /// Could not be decoded or delivered; parked in the dead-letter topic (acked only after the
    /// dead-letter producer's delivery report).
    DeadLettered,
}

impl AckStatus {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Processed => "processed",
            AckStatus::Ignored => "ignored",
            AckStatus::Failed => "failed",
            AckStatus::DeadLettered => "dead_lettered",
        }
    }

    /// Whether the record failed (counts against the dead-letter breaker).
    pub fn is_failure(self) -> bool {
        matches!(self, AckStatus::Failed | AckStatus::DeadLettered)
    }
}

/// Where and why a record failed, for the breaker's log line.
#[derive(Debug, Clone)]
pub struct Cause {
    /// Route that handled it (`none` before routing).
    pub route: Arc<str>,
    /// Short reason.
    pub reason: &'static str,
}

/// A record is finished: the committer may count its offset as done.
#[derive(Debug, Clone)]
pub struct ProcessAck {
    /// Source topic and partition.
    pub source: PartitionKey,
    /// Source offset.
    pub offset: i64,
    /// Assignment generation the record was read under.
    pub generation: u64,
    /// Outcome.
    pub status: AckStatus,
    /// For failures: where and why.
    pub cause: Option<Cause>,
}

impl Record {
    /// Decodes the payload, once: what the consumer copied is within `max_payload_bytes`
    /// already (a larger value is marked too large and not copied).
    pub fn decode(&mut self) -> &Result<Level, DecodeError> {
        self.decoded
            .get_or_insert_with(|| crate::event::decode_level(self.payload.as_deref(), usize::MAX))
    }

    /// The ack that says this record is finished with `status`.
    pub fn ack(&self, status: AckStatus) -> ProcessAck {
        ProcessAck {
            source: self.source.clone(),
            offset: self.offset,
            generation: self.generation,
            status,
            cause: None,
        }
    }

    /// The ack of a failed record.
    pub fn failed(&self, status: AckStatus, route: Arc<str>, reason: &'static str) -> ProcessAck {
        ProcessAck {
            cause: Some(Cause { route, reason }),
            ..self.ack(status)
        }
    }
}

/// Assignment generations that were revoked, shared by the consumer (which fences at revoke),
/// the router (which stops dispatching records of a revoked assignment: its partition goes to a
/// new owner) and the workers (which stop delivering them once the revoke is over).
#[derive(Clone, Default)]
pub struct Fences {
    /// Revokes that began: records still being delivered may finish and be committed.
    revoked: Fence,
    /// Revokes that are over (answered, or past their deadline): the next owner may be reading
    /// the partition, so a copy delivered from here now could land after its copies of later
    /// records of the same key.
    released: Fence,
}

/// The highest fenced generation of each partition.
#[derive(Clone, Default)]
struct Fence(Arc<std::sync::RwLock<rustc_hash::FxHashMap<PartitionKey, u64>>>);

impl Fence {
    fn raise(&self, source: &PartitionKey, generation: u64) {
        let mut fenced = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fence = fenced.entry(source.clone()).or_insert(generation);
        *fence = (*fence).max(generation);
    }

    fn covers(&self, record: &Record) -> bool {
        let fenced = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fenced
            .get(&record.source)
            .is_some_and(|fence| record.generation <= *fence)
    }
}

impl Fences {
    /// Every generation of `source` up to `generation` is being revoked.
    pub fn revoke(&self, source: &PartitionKey, generation: u64) {
        self.revoked.raise(source, generation);
    }

    /// Whether `record` was read under a revoked assignment.
    pub fn is_revoked(&self, record: &Record) -> bool {
        self.revoked.covers(record)
    }

    /// The revoke of every generation of `source` up to `generation` is over.
    pub fn release(&self, source: &PartitionKey, generation: u64) {
        self.released.raise(source, generation);
    }

    /// Whether `record` belongs to an assignment whose revoke is over: it must not be
    /// delivered any more.
    pub fn is_released(&self, record: &Record) -> bool {
        self.released.covers(record)
    }
}

/// The next stage of the pipeline has stopped (it only does at shutdown, or when it failed):
/// the sender cannot hand anything on and stops too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {0} has stopped")]
pub struct StageGone(pub &'static str);

/// A record as the consumer would make it, for unit tests (no byte charge).
#[cfg(test)]
pub(crate) fn test_record(
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Record {
    Record {
        source: PartitionKey {
            topic: Arc::from("logs"),
            partition,
        },
        offset,
        generation: 1,
        key: key.map(Box::from),
        payload: payload.map(Box::from),
        headers: None,
        decoded: Some(crate::event::decode_level(
            payload,
            crate::event::DEFAULT_MAX_PAYLOAD_BYTES,
        )),
        read_at: std::time::Instant::now(),
        charge: Charge::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_given_back_when_records_are_dropped() {
        let gauge = prometheus::IntGauge::new("bytes", "bytes").expect("gauge");
        let budget = ByteBudget::new(1_000, gauge.clone());
        assert!(
            budget.has_room(5_000),
            "an oversized record fits an empty budget"
        );
        let first = budget.charge(600);
        assert!(budget.has_room(400));
        assert!(!budget.has_room(401));
        assert!(!budget.half_free(0));
        assert!(
            budget.half_free(100),
            "held bytes do not hold resuming back"
        );
        let second = budget.charge(400);
        assert_eq!((budget.used(), gauge.get()), (1_000, 1_000));
        drop(first);
        assert_eq!((budget.used(), gauge.get()), (400, 400));
        assert!(budget.half_free(0));
        drop(second);
        assert_eq!((budget.used(), gauge.get()), (0, 0));
        drop(Charge::default());
        assert_eq!(budget.used(), 0);
    }
}
