//! The messages that travel the pipeline: a [`Record`] flows forward from the consumer through
//! the router to a worker, and a [`ProcessAck`] travels from whoever finished it to the committer.

use std::fmt;
use std::sync::Arc;

use crate::event::{DecodeError, Level};

/// A topic name, interned for the life of the process: copying one touches no shared
/// reference count (a record's topic travels through every stage, on several threads), and
/// equal names are one pointer, so comparing and hashing cost nothing. A process sees few
/// names (its subscribed topics, and those its patterns matched while it ran), so what is
/// interned stays small.
#[derive(Clone, Copy)]
pub struct Topic(&'static str);

impl Topic {
    /// The interned name `name`.
    pub fn new(name: &str) -> Topic {
        static NAMES: std::sync::LazyLock<std::sync::Mutex<rustc_hash::FxHashSet<&'static str>>> =
            std::sync::LazyLock::new(Default::default);
        let mut names = NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match names.get(name) {
            Some(interned) => Topic(interned),
            None => {
                let interned: &'static str = Box::leak(Box::from(name));
                names.insert(interned);
                Topic(interned)
            }
        }
    }

    /// The name.
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for Topic {
    type Target = str;

    fn deref(&self) -> &str {
        self.0
    }
}

impl PartialEq for Topic {
    fn eq(&self, other: &Topic) -> bool {
        // Interned: one name, one pointer.
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Topic {}

impl std::hash::Hash for Topic {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_ptr().hash(state);
    }
}

impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Topic) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Topic {
    fn cmp(&self, other: &Topic) -> std::cmp::Ordering {
        self.0.cmp(other.0)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// Which partition a record came from, and under which assignment.
///
/// `generation` is bumped by the consumer every time it is assigned a partition; acks carrying
/// an older generation belong to an assignment that was revoked and are never committed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    /// Source topic (interned, not copied per record).
    pub topic: Topic,
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
    /// The key (it picks the worker, so equal keys stay in order) and the original payload
    /// (forwarded unchanged), in one allocation: see [`Record::key`] and [`Record::payload`].
    pub data: KeyValue,
    /// The original headers, forwarded with the record.
    pub headers: Option<rdkafka::message::OwnedHeaders>,
    /// The source record's timestamp (create or log-append time, milliseconds since the
    /// epoch), if it has one: Kafka sinks keep it.
    pub timestamp: Option<i64>,
    /// The decoded event's level (what routing needs; the whole event was validated and the
    /// payload itself is what sinks forward), or why it could not be decoded. `None` until the
    /// router decodes it ([`Record::decode`]): the consumer only marks a value over
    /// `max_payload_bytes`, which it does not copy, so that decoding is off its thread.
    pub decoded: Option<Result<Level, DecodeError>>,
    /// The event's service, where routes match on it (filled by [`Record::decode`] when asked).
    pub service: Option<Box<str>>,
    /// How the payload reads as a JSON event (filled by [`Record::decode`]): what conditions,
    /// transforms and templates read, and what the sinks that write JSON write
    /// ([`Record::event`], [`Record::event_json`]).
    pub form: crate::event::Form,
    /// When the consumer took it from librdkafka (for the processing latency).
    pub read_at: std::time::Instant,
    /// Its bytes, counted against `pipeline.max_in_flight_bytes` until it is dropped.
    pub charge: Charge,
    /// Where the route's sink puts this record, when its destination is a template (a Kafka
    /// topic, a file path, an Elasticsearch index) rendered for this record by its worker;
    /// `None`: the sink's configured destination.
    pub destination: Option<Box<str>>,
    /// Set when the record goes to more than one route: each route gets its own copy, all
    /// copies share this, and the record is finished when the last copy is
    /// ([`FanOut::finish`]).
    pub fan_out: Option<Arc<FanOut>>,
    /// Which log record of its Kafka record's batch this is (`otlp_proto`, `otlp_json`: the
    /// records of one batch share its offset); `None` for a record that is not a batch's part.
    /// Destinations that name what they store by offset (Elasticsearch's document ids) add it.
    pub part: Option<u32>,
}

/// The copies of one record sent to several routes (fan-out). Each copy is acked on its own;
/// the committer counts the acks down and finishes the record with the last one, so its offset
/// is committed only when every destination has finished with it.
#[derive(Debug)]
pub struct FanOut {
    /// Copies not finished yet.
    remaining: std::sync::atomic::AtomicUsize,
    /// The worst outcome so far (and where and why it failed): what the record finishes with.
    worst: std::sync::Mutex<Option<(AckStatus, Option<Cause>)>>,
}

impl FanOut {
    /// Shared by `copies` copies of a record.
    pub fn new(copies: usize) -> Arc<FanOut> {
        Arc::new(FanOut {
            remaining: std::sync::atomic::AtomicUsize::new(copies),
            worst: std::sync::Mutex::new(None),
        })
    }

    /// One copy finished with `status`: `None` while others remain, else the outcome of the
    /// whole record (the worst of its copies': a failure at one destination is a failure of
    /// the record, for the breaker, even if the others delivered it).
    pub fn finish(
        &self,
        status: AckStatus,
        cause: Option<Cause>,
    ) -> Option<(AckStatus, Option<Cause>)> {
        let mut worst = self
            .worst
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if worst
            .as_ref()
            .is_none_or(|(seen, _)| status.severity() > seen.severity())
        {
            *worst = Some((status, cause));
        }
        let before = self
            .remaining
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // More acks than copies cannot happen (each copy is acked once); if it did, the extra
        // ack finishes nothing rather than finishing the record twice.
        (before == 1).then(|| worst.take()).flatten()
    }

    /// `more` copies join (a log record of a batch, already one of the copies, goes to several
    /// routes). Only a holder of an unfinished copy calls this, so the count cannot have
    /// reached zero: the record cannot finish before the new copies do.
    pub fn grow(&self, more: usize) {
        self.remaining
            .fetch_add(more, std::sync::atomic::Ordering::AcqRel);
    }
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
    /// A charge of the same bytes against the same budget (for a copy of the record).
    pub fn again(&self) -> Charge {
        self.resized(self.bytes)
    }

    /// A charge of `bytes` against the same budget, in place of this one (for a record whose
    /// value was rewritten).
    pub fn resized(&self, bytes: usize) -> Charge {
        match &self.budget {
            Some(budget) => budget.charge(bytes),
            None => Charge::default(),
        }
    }

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

/// The failure reason of an event no route takes, sent to the dead-letter topic (`input.unrouted
/// = "dead-letter"`); parked on purpose, so it does not count against the breaker either.
pub const UNROUTED: &str = "unrouted";

/// Whether a failure `reason` parks a record on purpose (by configuration), not for bad input.
pub fn parked_on_purpose(reason: &str) -> bool {
    reason == TOMBSTONE || reason == UNROUTED
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

    /// Rank among outcomes of copies of one record: the worst decides the record's.
    fn severity(self) -> u8 {
        match self {
            AckStatus::Ignored => 0,
            AckStatus::Processed => 1,
            AckStatus::DeadLettered => 2,
            AckStatus::Failed => 3,
        }
    }

    /// Whether the record failed (counts against the dead-letter breaker).
    pub fn is_failure(self) -> bool {
        matches!(self, AckStatus::Failed | AckStatus::DeadLettered)
    }
}

/// Where and why a record failed, for the breaker's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The record's copies, when it went to several routes: the committer finishes the record
    /// with the last copy's ack.
    pub fan_out: Option<Arc<FanOut>>,
}

/// A record's key and value, copied out of librdkafka's buffer into one allocation.
#[derive(Debug, Default, Clone)]
pub struct KeyValue {
    /// The key's bytes, then the value's.
    bytes: Box<[u8]>,
    /// Length of the key; `None` without a key.
    key_len: Option<usize>,
    /// Whether there is a value (a tombstone has none).
    has_value: bool,
}

impl KeyValue {
    /// Copies `key` and `value`.
    pub fn new(key: Option<&[u8]>, value: Option<&[u8]>) -> KeyValue {
        let (key_bytes, value_bytes) = (key.unwrap_or_default(), value.unwrap_or_default());
        let mut bytes = Vec::with_capacity(key_bytes.len() + value_bytes.len());
        bytes.extend_from_slice(key_bytes);
        bytes.extend_from_slice(value_bytes);
        KeyValue {
            bytes: bytes.into_boxed_slice(),
            key_len: key.map(<[u8]>::len),
            has_value: value.is_some(),
        }
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.map(|len| &self.bytes[..len])
    }

    /// The value (`None` for a tombstone).
    pub fn value(&self) -> Option<&[u8]> {
        self.has_value
            .then(|| &self.bytes[self.key_len.unwrap_or(0)..])
    }
}

impl Record {
    /// The record key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.data.key()
    }

    /// The original payload (`None` for a tombstone).
    pub fn payload(&self) -> Option<&[u8]> {
        self.data.value()
    }

    /// Decodes the payload's level with `decoder` (and, `with_service`, its service), once: what
    /// the consumer copied is within `max_payload_bytes` already (a larger value is marked too
    /// large and not copied).
    pub fn decode(
        &mut self,
        decoder: &crate::event::Decoder,
        with_service: bool,
    ) -> &Result<Level, DecodeError> {
        let decoded = match self.decoded.take() {
            Some(decoded) => decoded,
            None => decoder
                .decode(self.data.value(), usize::MAX, with_service)
                .map(|decoded| {
                    self.service = decoded.service;
                    self.form = decoded.form;
                    decoded.level
                }),
        };
        self.decoded.insert(decoded)
    }

    /// The event as a JSON value ([`crate::event::Form::event`]); `Err` says why there is none
    /// (no payload, not JSON, or JSON nested past serde_json's limit). A record not decoded
    /// (which no route takes) is read as the JSON it may be.
    pub fn event(&self) -> Result<serde_json::Value, String> {
        let payload = self
            .payload()
            .ok_or_else(|| "the record has no payload".to_string())?;
        match &self.decoded {
            Some(Ok(level)) => self.form.event(payload, level),
            _ => crate::event::Form::Object.event(payload, &Level::new("")),
        }
    }

    /// The JSON text the sinks that write JSON write for this record
    /// ([`crate::event::Form::json`]): the original JSON, or the event a line of text makes;
    /// `None` if the record did not decode.
    pub fn event_json(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        match (&self.decoded, self.payload()) {
            (Some(Ok(level)), Some(payload)) => Some(self.form.json(payload, level)),
            _ => None,
        }
    }

    /// The ack that says this record is finished with `status`.
    pub fn ack(&self, status: AckStatus) -> ProcessAck {
        ProcessAck {
            source: self.source.clone(),
            offset: self.offset,
            generation: self.generation,
            status,
            cause: None,
            fan_out: self.fan_out.clone(),
        }
    }

    /// A copy of this record for one more route, sharing `fan_out` (which this record must
    /// carry too). Its bytes are its own, and counted against the in-flight bound on their own:
    /// a record waiting on three destinations holds three copies.
    pub fn copy_for_route(&self, fan_out: &Arc<FanOut>) -> Record {
        Record {
            source: self.source.clone(),
            offset: self.offset,
            generation: self.generation,
            data: self.data.clone(),
            headers: self.headers.clone(),
            timestamp: self.timestamp,
            decoded: self.decoded.clone(),
            service: self.service.clone(),
            form: self.form.clone(),
            read_at: self.read_at,
            charge: self.charge.again(),
            destination: None,
            fan_out: Some(fan_out.clone()),
            part: self.part,
        }
    }

    /// One log record of this record's batch (`input.format = "otlp_proto"`, `"otlp_json"`),
    /// as a record of its own: the same source, offset, key, headers and timestamp, `payload`
    /// as its value (the event's JSON, or for a bad log record the request holding it alone),
    /// already decoded. Its bytes are charged on their own; `fan_out` (if the batch has more
    /// than one log record) is shared by all of the batch's records.
    pub fn part(
        &self,
        index: u32,
        payload: &[u8],
        decoded: Result<(Level, Option<Box<str>>), DecodeError>,
        fan_out: Option<&Arc<FanOut>>,
    ) -> Record {
        let data = KeyValue::new(self.key(), Some(payload));
        let charge = self.charge.resized(data.bytes.len());
        let (decoded, service) = match decoded {
            Ok((level, service)) => (Ok(level), service),
            Err(err) => (Err(err), None),
        };
        Record {
            source: self.source.clone(),
            offset: self.offset,
            generation: self.generation,
            data,
            headers: self.headers.clone(),
            timestamp: self.timestamp,
            decoded: Some(decoded),
            service,
            form: crate::event::Form::Object,
            read_at: self.read_at,
            charge,
            destination: None,
            fan_out: fan_out.cloned(),
            part: Some(index),
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

/// Whether `record` was read under a generation `fenced` covers (its partition's fence or
/// earlier).
fn covered(fenced: &rustc_hash::FxHashMap<PartitionKey, u64>, record: &Record) -> bool {
    fenced
        .get(&record.source)
        .is_some_and(|fence| record.generation <= *fence)
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

    /// Whether `generation` of `source` is fenced.
    fn covers_generation(&self, source: &PartitionKey, generation: u64) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(source)
            .is_some_and(|fence| generation <= *fence)
    }

    /// Whether `record` was read under a fenced generation.
    fn covers(&self, record: &Record) -> bool {
        covered(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            record,
        )
    }

    /// Removes the covered records from `records`, keeping the order of the rest; returns how
    /// many were removed. One lock for the batch (the router and every worker check each
    /// batch: a lock per record would make them contend on it).
    fn remove_covered(&self, records: &mut Vec<Record>) -> usize {
        let fenced = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fenced.is_empty() {
            return 0;
        }
        let before = records.len();
        records.retain(|record| !covered(&fenced, record));
        before - records.len()
    }
}

impl Fences {
    /// Every generation of `source` up to `generation` is being revoked.
    pub fn revoke(&self, source: &PartitionKey, generation: u64) {
        self.revoked.raise(source, generation);
    }

    /// Removes the records read under a revoked assignment; returns how many.
    pub fn remove_revoked(&self, records: &mut Vec<Record>) -> usize {
        self.revoked.remove_covered(records)
    }

    /// The revoke of every generation of `source` up to `generation` is over.
    pub fn release(&self, source: &PartitionKey, generation: u64) {
        self.released.raise(source, generation);
    }

    /// Removes the records of assignments whose revoke is over (they must not be delivered
    /// any more); returns how many.
    pub fn remove_released(&self, records: &mut Vec<Record>) -> usize {
        self.released.remove_covered(records)
    }

    /// Whether the assignment `generation` of `source` is being (or was) revoked.
    pub fn is_revoking(&self, source: &PartitionKey, generation: u64) -> bool {
        self.revoked.covers_generation(source, generation)
    }

    /// Whether the revoke of assignment `generation` of `source` is over.
    pub fn is_released_at(&self, source: &PartitionKey, generation: u64) -> bool {
        self.released.covers_generation(source, generation)
    }

    /// Whether `record` was read under an assignment whose revoke is over.
    pub fn is_released(&self, record: &Record) -> bool {
        self.released.covers(record)
    }

    /// The released assignments as they are now, held so until the view is dropped: a
    /// [`Fences::release`] waits meanwhile. A sender that finds a record not released and hands
    /// it on while it holds the view has handed it on before any release that would have
    /// fenced it (the transactional producer's sends, `crate::producer`). Held only for
    /// synchronous work (it is a plain lock): never across an `await`.
    pub fn hold_released(&self) -> Released<'_> {
        Released(
            self.released
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The released assignments, held unchanged ([`Fences::hold_released`]).
pub struct Released<'a>(std::sync::RwLockReadGuard<'a, rustc_hash::FxHashMap<PartitionKey, u64>>);

impl Released<'_> {
    /// Whether `record` was read under an assignment whose revoke is over.
    pub fn covers(&self, record: &Record) -> bool {
        covered(&self.0, record)
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
    let decoded = crate::event::Decoder::default().decode(
        payload,
        crate::event::DEFAULT_MAX_PAYLOAD_BYTES,
        false,
    );
    let form = decoded
        .as_ref()
        .map(|decoded| decoded.form.clone())
        .unwrap_or_default();
    Record {
        source: PartitionKey {
            topic: Topic::new("logs"),
            partition,
        },
        offset,
        generation: 1,
        data: KeyValue::new(key, payload),
        headers: None,
        timestamp: None,
        decoded: Some(decoded.map(|decoded| decoded.level)),
        service: None,
        form,
        read_at: std::time::Instant::now(),
        charge: Charge::default(),
        destination: None,
        fan_out: None,
        part: None,
    }
}

/// [`test_record`] read with `decoder` (with its service) instead of the strict format.
#[cfg(test)]
pub(crate) fn test_record_read(
    decoder: &crate::event::Decoder,
    offset: i64,
    payload: &[u8],
) -> Record {
    let mut record = test_record(0, offset, None, Some(payload));
    record.decoded = None;
    record.decode(decoder, true);
    record
}

/// A decoder of text lines: the level in brackets (`[ERROR] ...`), a `service` group before
/// it, logfmt pairs.
#[cfg(test)]
pub(crate) fn test_text_decoder() -> crate::event::Decoder {
    let format = crate::event::TextFormat::new(&crate::event::TextSettings {
        level_pattern: Some(r"^(?P<service>[a-z]+) \[(?P<level>[A-Z]+)\] "),
        logfmt: true,
        ..Default::default()
    })
    .expect("valid settings");
    crate::event::Decoder::text(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a text line is to each stage: its level and service for routing, its event (the
    /// line as the message, the groups and pairs as fields), the JSON the sinks write; the
    /// payload itself stays the line.
    #[test]
    fn a_text_record_offers_its_event_and_keeps_its_bytes() {
        let line = b"checkout [ERROR] payment failed status=503 user=\"Ada L\"\n";
        let record = test_record_read(&test_text_decoder(), 3, line);
        assert_eq!(record.decoded, Some(Ok(Level::new("error"))));
        assert_eq!(record.service.as_deref(), Some("checkout"));
        assert!(matches!(record.form, crate::event::Form::Text(_)));
        let event = record.event().expect("an event");
        assert_eq!(
            event,
            serde_json::json!({
                "level": "error",
                "message": "checkout [ERROR] payment failed status=503 user=\"Ada L\"",
                "service": "checkout",
                "status": "503",
                "user": "Ada L",
            })
        );
        let json = record.event_json().expect("decoded");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&json).expect("JSON"),
            event
        );
        assert_eq!(record.payload(), Some(&line[..]), "the original bytes stay");
        // A copy for another route reads the same.
        let copy = record.copy_for_route(&FanOut::new(2));
        assert_eq!(copy.event(), Ok(event));
        // A record that did not decode has no event.
        let bad = test_record_read(&test_text_decoder(), 4, b"\xff\xfe");
        assert_eq!(
            bad.decoded
                .as_ref()
                .map(|decoded| decoded.as_ref().map_err(DecodeError::reason)),
            Some(Err("not_utf8"))
        );
        assert!(bad.event().is_err(), "not JSON either");
        assert!(bad.event_json().is_none());
    }

    #[test]
    fn a_fanned_out_record_finishes_with_its_last_copy_and_its_worst_outcome() {
        let fan_out = FanOut::new(3);
        assert_eq!(fan_out.finish(AckStatus::Processed, None), None);
        let cause = Cause {
            route: Arc::from("archive"),
            reason: "http_status",
        };
        assert_eq!(fan_out.finish(AckStatus::DeadLettered, Some(cause)), None);
        let (status, cause) = fan_out
            .finish(AckStatus::Ignored, None)
            .expect("the third of three copies finishes the record");
        assert_eq!(status, AckStatus::DeadLettered);
        assert_eq!(
            cause.map(|cause| cause.route.to_string()).as_deref(),
            Some("archive")
        );
        assert_eq!(
            fan_out.finish(AckStatus::Processed, None),
            None,
            "an ack too many finishes nothing"
        );
    }

    #[test]
    fn a_copy_for_another_route_is_charged_on_its_own() {
        let gauge = prometheus::IntGauge::new("bytes", "bytes").expect("gauge");
        let budget = ByteBudget::new(1_000, gauge);
        let mut record = test_record(0, 7, Some(b"k"), Some(br#"{"level":"info"}"#));
        record.charge = budget.charge(100);
        let fan_out = FanOut::new(2);
        record.fan_out = Some(fan_out.clone());
        let copy = record.copy_for_route(&fan_out);
        assert_eq!(budget.used(), 200);
        assert_eq!(
            (copy.offset, copy.key(), copy.payload()),
            (7, record.key(), record.payload())
        );
        drop(record);
        assert_eq!(budget.used(), 100);
        drop(copy);
        assert_eq!(budget.used(), 0);
    }

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
