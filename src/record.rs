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
    /// payload itself is what sinks forward), or why it could not be decoded.
    pub decoded: Result<Level, DecodeError>,
    /// When the consumer took it from librdkafka (for the processing latency).
    pub read_at: std::time::Instant,
}

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

/// Assignment generations that were revoked, shared by the consumer (which fences at revoke)
/// and the router (which stops dispatching fenced records: their partition has a new owner).
#[derive(Clone, Default)]
pub struct Fences {
    revoked: Arc<std::sync::RwLock<rustc_hash::FxHashMap<PartitionKey, u64>>>,
}

impl Fences {
    /// Every generation of `source` up to `generation` is revoked.
    pub fn revoke(&self, source: &PartitionKey, generation: u64) {
        let mut revoked = self
            .revoked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fence = revoked.entry(source.clone()).or_insert(generation);
        *fence = (*fence).max(generation);
    }

    /// Whether `record` was read under a revoked assignment.
    pub fn is_revoked(&self, record: &Record) -> bool {
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        revoked
            .get(&record.source)
            .is_some_and(|fence| record.generation <= *fence)
    }
}

/// What became of a record offered to the next stage without waiting.
#[derive(Debug)]
pub enum Offer {
    /// In the stage's channel.
    Taken,
    /// The channel is full: the record is given back.
    Full(Record),
    /// The stage has stopped: the record is given back.
    Stopped(Record),
}

impl Offer {
    /// The outcome of a `try_send` of a record.
    pub(crate) fn of(result: Result<(), tokio::sync::mpsc::error::TrySendError<Record>>) -> Offer {
        use tokio::sync::mpsc::error::TrySendError;
        match result {
            Ok(()) => Offer::Taken,
            Err(TrySendError::Full(record)) => Offer::Full(record),
            Err(TrySendError::Closed(record)) => Offer::Stopped(record),
        }
    }
}

/// The next stage of the pipeline has stopped (it only does at shutdown, or when it failed):
/// the sender cannot hand anything on and stops too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {0} has stopped")]
pub struct StageGone(pub &'static str);
