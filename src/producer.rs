//! Kafka output shared by the Kafka sink and the dead-letter actor: an idempotent producer, a
//! batch send that reports one outcome per record after its delivery report, and the
//! classification of librdkafka errors into retryable and permanent. The transactional
//! producer of exactly-once delivery also refuses, at the send, every record of a fenced
//! assignment (see `Reporting::send_in_order`).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;
use rustc_hash::FxHashMap;
use tracing::error;

use crate::client_log::ClientLog;

/// logbridge's producers (Kafka sinks, dead letters): librdkafka's producer with its own
/// polling thread, log lines and errors rate-limited, and delivery reports gathered per batch
/// ([`send_all`]): the sending task wakes once when its batch is reported, not once per record,
/// and no record needs a future or a channel of its own.
///
/// A producer that librdkafka declares failed for good (a fatal error: the idempotent producer
/// lost its sequence, its producer id was fenced, ...) refuses every record from then on. The
/// first send after every batch sent on it was reported replaces it with a new client built
/// from the same configuration (at most once per [`REBUILD_EVERY`]); the callers retry what
/// failed on the old one on the new one (they own their records until a delivery report says
/// delivered), and nothing of the new one can overtake a record still in flight on the old.
#[derive(Clone)]
pub struct Producer(Arc<Rebuildable>);

/// Shortest time between two rebuilds: a cluster that makes every new producer fatal at once
/// (e.g. idempotent writes not allowed) gets a new client a second, not one per record.
const REBUILD_EVERY: Duration = Duration::from_secs(1);

/// How often values read from `${file:...}` references (a rotated password or token) are read
/// again; a client whose authentication fails reads them at its next send (at most once per
/// [`REBUILD_EVERY`]).
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The current client and what is needed to make another.
pub struct Rebuildable {
    client: &'static str,
    current: std::sync::RwLock<Current>,
    /// The instance's transactional producer: replaced only by `crate::transaction`, after a
    /// fatal error other than a fence ([`Producer::replace_transactional`]).
    transactional: bool,
    /// The transactional producer's fences: a record read under an assignment that was
    /// released (rewound after an aborted transaction, or revoked) is never handed to
    /// librdkafka, checked at the send itself (`Reporting::send_in_order`).
    fences: Option<Fences>,
}

/// The client in use, and how it was made.
struct Current {
    producer: ThreadedProducer<Reports>,
    /// When it was made (or a rebuild last failed).
    made: std::time::Instant,
    config: ClientConfig,
    /// Properties whose value came from `${file:...}` references.
    reloading: Vec<(String, crate::config::Reloading)>,
    /// When the files were last read.
    checked: std::time::Instant,
    /// `config` holds a value read again that the client was not made with. The client is
    /// replaced once nothing sent on it waits for a report (two clients at once could reorder
    /// a key: the new one's records could land before the old one's retries), or at once if
    /// the cluster refuses its credentials (then what it holds fails, and is retried in order).
    stale: bool,
}

impl Current {
    /// Whether the client may have to be replaced now (checked under the write lock).
    fn to_look_at(&self, now: std::time::Instant) -> bool {
        let context = self.producer.context();
        if now.saturating_duration_since(self.made) < REBUILD_EVERY {
            return false;
        }
        (context.is_fatal() && context.waiting().is_empty())
            || (!self.reloading.is_empty()
                && (context
                    .auth_failed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    || now.saturating_duration_since(self.checked) >= RELOAD_EVERY))
            || (self.stale && context.waiting().is_empty())
    }
}

impl Rebuildable {
    fn make(config: &ClientConfig, client: &'static str) -> KafkaResult<ThreadedProducer<Reports>> {
        let reports = Reports {
            log: ClientLog::new(client),
            waiting: std::sync::Mutex::new(FxHashMap::default()),
            next_batch: std::sync::atomic::AtomicU64::new(0),
            fatal: std::sync::atomic::AtomicBool::new(false),
            auth_failed: std::sync::atomic::AtomicBool::new(false),
            failed: std::sync::atomic::AtomicBool::new(false),
        };
        config.create_with_context(reports)
    }
}

impl Producer {
    /// The client to send on now: the current one, or a new one if the current one had a fatal
    /// error or a value it was made with was read from a file that has changed since.
    fn client(&self) -> ThreadedProducer<Reports> {
        let cell = &self.0;
        let now = std::time::Instant::now();
        {
            let current = cell.current.read().unwrap_or_else(PoisonError::into_inner);
            if cell.transactional || !current.to_look_at(now) {
                return current.producer.clone();
            }
        }
        let mut current = cell.current.write().unwrap_or_else(PoisonError::into_inner);
        // Another sender may have done it meanwhile.
        if !current.to_look_at(now) {
            return current.producer.clone();
        }
        let context = current.producer.context();
        let is_fatal = context.is_fatal();
        let refused = context
            .auth_failed
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let fatal = current.producer.client().fatal_error();
        if refused || now.saturating_duration_since(current.checked) >= RELOAD_EVERY {
            let Current {
                config,
                reloading,
                stale,
                checked,
                ..
            } = &mut *current;
            for (name, value) in reloading.iter_mut() {
                if let Some(fresh) = value.changed(now, Duration::ZERO) {
                    tracing::info!(client = cell.client, property = %name, "a file a kafka producer property is read from changed");
                    config.set(name.clone(), fresh);
                    *stale = true;
                }
            }
            *checked = now;
        }
        let idle = current.producer.context().waiting().is_empty();
        // Never two clients with records in flight at once: the new one's records could land
        // before the old one's (a fatal client fails new records at once, so it is idle soon).
        if !((is_fatal && idle) || (current.stale && (idle || refused))) {
            return current.producer.clone();
        }
        match Rebuildable::make(&current.config, cell.client) {
            Ok(fresh) => {
                if is_fatal {
                    error!(client = cell.client, error = ?fatal, "kafka producer had a fatal error; replaced it with a new one (records in flight on it are retried)");
                } else {
                    tracing::info!(
                        client = cell.client,
                        "replaced the kafka producer with one made with the values read again"
                    );
                }
                crate::metrics::kafka_producer_rebuilds()
                    .with_label_values(&[cell.client])
                    .inc();
                // The old client lives on in the batches still waiting for its reports.
                current.producer = fresh;
                current.stale = false;
            }
            Err(err) => {
                // Its records keep failing (retryably) until a rebuild works.
                error!(client = cell.client, error = %err, "cannot replace the kafka producer");
            }
        }
        current.made = now;
        current.producer.clone()
    }
}

impl Producer {
    /// The client itself, for the transactional calls (`crate::transaction`).
    pub(crate) fn transactional_client(&self) -> ThreadedProducer<Reports> {
        self.client()
    }

    /// Whether a record failed since [`Producer::clear_failed`]: in a transaction, any failed
    /// record makes it abortable.
    pub(crate) fn failed_since_cleared(&self) -> bool {
        self.client()
            .context()
            .failed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the transactional client after a fatal error (not a fence): what the old one
    /// holds is purged (its transaction is lost, and aborted by the new client's
    /// `init_transactions`), and every sender uses the new one from now on. The new one's
    /// transactions are not initialised yet.
    pub(crate) fn replace_transactional(&self) -> anyhow::Result<()> {
        use rdkafka::producer::{Producer as _, PurgeConfig};
        let cell = &self.0;
        let mut current = cell.current.write().unwrap_or_else(PoisonError::into_inner);
        current
            .producer
            .purge(PurgeConfig::default().queue().inflight());
        let fresh = Rebuildable::make(&current.config, cell.client)
            .context("cannot make a new transactional producer")?;
        crate::metrics::kafka_producer_rebuilds()
            .with_label_values(&[cell.client])
            .inc();
        // The old client lives on in the batches still waiting for its (purged) reports.
        current.producer = fresh;
        current.made = std::time::Instant::now();
        Ok(())
    }

    /// The fatal error of the client in use, if it had one.
    pub(crate) fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        use rdkafka::producer::Producer as _;
        self.client().client().fatal_error()
    }

    /// How many batches were handed to this producer so far: a transaction in which it did not
    /// move sent nothing.
    pub(crate) fn batches_sent(&self) -> u64 {
        self.client()
            .context()
            .next_batch
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Starts counting failed records afresh (at a transaction's begin).
    pub(crate) fn clear_failed(&self) {
        self.client()
            .context()
            .failed
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Bits of a delivery opaque that hold the record's index in its batch; the rest hold the
/// batch's number.
const INDEX_BITS: u32 = 24;
/// Most records one batch sends: [`send_all`] sends longer inputs in parts.
const MAX_REPORTED: usize = 1 << INDEX_BITS;

/// The producer's context: librdkafka's log lines and errors, and the batches waiting for their
/// delivery reports.
pub struct Reports {
    log: ClientLog,
    waiting: std::sync::Mutex<FxHashMap<u64, Arc<BatchReports>>>,
    next_batch: std::sync::atomic::AtomicU64,
    /// Set once librdkafka reports a fatal error: this client is done.
    fatal: std::sync::atomic::AtomicBool,
    /// Set when the cluster refused the credentials: read their files again now.
    auth_failed: std::sync::atomic::AtomicBool,
    /// Set when a record's delivery failed (see [`Producer::failed_since_cleared`]).
    failed: std::sync::atomic::AtomicBool,
}

/// The reports of one batch.
struct BatchReports {
    state: std::sync::Mutex<ReportState>,
    done: tokio::sync::Notify,
}

struct ReportState {
    /// One per record; `Ok` until a failure is reported.
    outcomes: Vec<Result<(), DeliveryError>>,
    /// Records not reported yet.
    remaining: usize,
}

impl BatchReports {
    fn report(&self, index: usize, outcome: Result<(), DeliveryError>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let (Err(err), Some(slot)) = (outcome, state.outcomes.get_mut(index)) {
            *slot = Err(err);
        }
        state.remaining = state.remaining.saturating_sub(1);
        if state.remaining == 0 {
            // A permit is stored if the sender is not waiting yet.
            self.done.notify_one();
        }
    }

    fn remaining(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remaining
    }
}

impl Reports {
    fn is_fatal(&self) -> bool {
        self.fatal.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes `err` if it is librdkafka's fatal error.
    fn note(&self, err: &KafkaError) {
        match err.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fatal) => {
                self.fatal.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            Some(
                RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => self
                .auth_failed
                .store(true, std::sync::atomic::Ordering::Relaxed),
            _ => {}
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, FxHashMap<u64, Arc<BatchReports>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ClientContext for Reports {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.note(&error);
        self.log.error(&error, reason);
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let batch = (opaque as u64) >> INDEX_BITS;
        let index = opaque & (MAX_REPORTED - 1);
        let Some(reports) = self.waiting().get(&batch).cloned() else {
            // Every batch waits for all its reports before it leaves: nothing to tell.
            return;
        };
        if let Err((err, _)) = result {
            self.note(err);
            self.failed
                .store(true, std::sync::atomic::Ordering::Release);
        }
        reports.report(
            index,
            result
                .as_ref()
                .map(|_| ())
                .map_err(|(err, _)| classify(err)),
        );
    }
}

use crate::config::Cluster;
use crate::record::{Fences, Record};

/// How long librdkafka itself keeps trying to deliver a record before it reports a failure, unless
/// the options say otherwise. Short, so that logbridge's own retries (counted, backed off,
/// visible in metrics) take over during an outage.
const DEFAULT_MESSAGE_TIMEOUT_MS: &str = "10000";

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Transient (broker down, timeout, leader moving): retry with backoff.
    Retryable,
    /// This record can never be delivered (e.g. too large): dead-letter it at once.
    Permanent,
}

/// Why a record was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct DeliveryError {
    /// Retry or not.
    pub kind: FailureKind,
    /// Short, low-cardinality reason for metrics and dead-letter headers.
    pub reason: &'static str,
    /// Full message for logs and the `logbridge.error.message` header.
    pub message: String,
    /// The HTTP status the destination answered, for the `logbridge.error.http_status` header.
    pub status: Option<u16>,
    /// How long the destination asked to be left alone (HTTP `Retry-After`): the retry waits at
    /// least this long.
    pub retry_after: Option<std::time::Duration>,
}

impl DeliveryError {
    /// A transient failure.
    pub fn retryable(reason: &'static str, message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Retryable,
            reason,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Permanent,
            reason,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }
}

/// The reason of a record the destination refuses for its size (the only refusal that may
/// drop a dead letter's value).
pub const RECORD_TOO_LARGE: &str = "record_too_large";

/// The reason of a record the destination refuses as invalid (a compacted topic refuses a
/// record without a key so).
pub const RECORD_INVALID: &str = "record_invalid";

/// The reason of a record whose topic does not exist (and the cluster does not create it).
pub const UNKNOWN_TOPIC: &str = "unknown_topic";

/// The reason of a record the transactional producer did not send because it was read under
/// an assignment that was released since (rewound after an aborted transaction, or revoked):
/// its partition is read again, and that copy is the one written. The sender drops it.
pub const FENCED: &str = "fenced";

/// The outcome of a record refused as [`FENCED`]. Retryable, so that no sender counts it as
/// a failure of its destination or dead-letters it; each sender drops it by its reason.
fn fenced() -> DeliveryError {
    DeliveryError::retryable(
        FENCED,
        "read under an assignment that was rewound or revoked since: not sent (its partition is read again)",
    )
}

/// Sorts a librdkafka error into retryable or permanent, where librdkafka tells.
pub fn classify(err: &KafkaError) -> DeliveryError {
    use RDKafkaErrorCode as Code;
    let message = err.to_string();
    match err.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge) => {
            DeliveryError::permanent(RECORD_TOO_LARGE, message)
        }
        Some(Code::InvalidMessage | Code::InvalidMessageSize | Code::InvalidRecord) => {
            DeliveryError::permanent(RECORD_INVALID, message)
        }
        Some(
            Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed | Code::InvalidTopic,
        ) => DeliveryError::permanent("not_allowed", message),
        // Retryable for a configured topic (an operator creates it, and the records wait in
        // Kafka); a topic a template named is refused instead (see `KafkaSink`).
        Some(Code::UnknownTopic | Code::UnknownTopicOrPartition) => {
            DeliveryError::retryable(UNKNOWN_TOPIC, message)
        }
        Some(Code::MessageTimedOut) => DeliveryError::retryable("timed_out", message),
        Some(Code::QueueFull) => DeliveryError::retryable("queue_full", message),
        // The producer is replaced at the next send: the record goes again on the new one.
        Some(Code::Fatal) => DeliveryError::retryable("producer_fatal", message),
        _ => DeliveryError::retryable("delivery_failed", message),
    }
}

/// Creates an idempotent producer for `cluster`: logbridge's defaults, then the cluster's
/// security and options. `client` names it in log lines (`dead-letter producer`, ...).
pub fn create(cluster: Cluster<'_>, client: &'static str) -> anyhow::Result<Producer> {
    make(cluster, client, None)
}

/// Creates the instance's transactional producer (`delivery = "exactly-once"`) with
/// `transactional.id` = `id`: like [`create`], but never replaced. Its transactions are
/// begun and ended by `crate::transaction`. It refuses every record read under an assignment
/// `fences` released (reported [`FENCED`], never sent): an aborted transaction's rewind
/// releases the assignments before the next transaction begins, so nothing of the aborted one
/// can be written in a later one, however late a worker or the dead-letter actor sends it.
pub fn create_transactional(
    cluster: Cluster<'_>,
    id: &str,
    fences: Fences,
) -> anyhow::Result<Producer> {
    make(cluster, "transactional producer", Some((id, fences)))
}

fn make(
    cluster: Cluster<'_>,
    client: &'static str,
    transactional: Option<(&str, Fences)>,
) -> anyhow::Result<Producer> {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", DEFAULT_MESSAGE_TIMEOUT_MS)
        .set("linger.ms", "1");
    cluster.apply(&mut config);
    let fences = transactional.map(|(id, fences)| {
        config.set("transactional.id", id);
        fences
    });
    let first = Rebuildable::make(&config, client)
        .with_context(|| format!("failed to create a Kafka producer for {}", cluster.brokers))?;
    let reloading = config
        .config_map()
        .iter()
        .filter_map(|(name, value)| {
            crate::config::Reloading::of(value).map(|reloading| (name.to_string(), reloading))
        })
        .collect();
    let now = std::time::Instant::now();
    Ok(Producer(Arc::new(Rebuildable {
        client,
        transactional: fences.is_some(),
        fences,
        current: std::sync::RwLock::new(Current {
            producer: first,
            // A first client is never rebuilt within REBUILD_EVERY of its start either.
            made: now,
            config,
            reloading,
            checked: now,
            stale: false,
        }),
    })))
}

/// Header names logbridge adds.
pub mod headers {
    /// Source topic of a forwarded or dead-lettered record.
    pub const SOURCE_TOPIC: &str = "logbridge.source.topic";
    /// Source partition.
    pub const SOURCE_PARTITION: &str = "logbridge.source.partition";
    /// Source offset.
    pub const SOURCE_OFFSET: &str = "logbridge.source.offset";
    /// Route that handled the record.
    pub const ROUTE: &str = "logbridge.route";
    /// Dead letters: where it failed (`decode`, `route`, `sink`).
    pub const ERROR_STAGE: &str = "logbridge.error.stage";
    /// Dead letters: short reason.
    pub const ERROR_REASON: &str = "logbridge.error.reason";
    /// Dead letters: full error message.
    pub const ERROR_MESSAGE: &str = "logbridge.error.message";
    /// Dead letters: the HTTP status an HTTP destination answered.
    pub const HTTP_STATUS: &str = "logbridge.error.http_status";
    /// Dead letters: delivery attempts made.
    pub const ATTEMPTS: &str = "logbridge.attempts";
    /// Dead letters parked without their value (refused by the dead-letter topic): its size.
    pub const VALUE_DROPPED: &str = "logbridge.error.value_dropped";
    /// Dead letters still too large without their value, parked without the record's own
    /// headers too: how many headers were dropped.
    pub const HEADERS_DROPPED: &str = "logbridge.error.headers_dropped";
    /// Dead letters of a keyless record refused as invalid (a compacted dead-letter topic takes
    /// no record without a key): `true` when logbridge gave it the key
    /// `<source topic>/<partition>/<offset>`.
    pub const KEY_ADDED: &str = "logbridge.error.key_added";
}

/// The record's own headers followed by logbridge's: `extra` pairs.
pub fn headers_for(record: &Record, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    add_own_headers(record.headers.clone().unwrap_or_default(), record, extra)
}

/// Only logbridge's headers (`logbridge.source.*`, then `extra`), without the record's own.
pub fn own_headers(record: &Record, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    add_own_headers(
        OwnedHeaders::new_with_capacity(3 + extra.len()),
        record,
        extra,
    )
}

fn add_own_headers(
    mut headers: OwnedHeaders,
    record: &Record,
    extra: &[(&str, &[u8])],
) -> OwnedHeaders {
    // Formatted on the stack: this runs for every record a Kafka sink or the dead-letter
    // topic sends.
    let (mut partition, mut offset) = (itoa::Buffer::new(), itoa::Buffer::new());
    let source: [(&str, &[u8]); 3] = [
        (headers::SOURCE_TOPIC, record.source.topic.as_bytes()),
        (
            headers::SOURCE_PARTITION,
            partition.format(record.source.partition).as_bytes(),
        ),
        (
            headers::SOURCE_OFFSET,
            offset.format(record.offset).as_bytes(),
        ),
    ];
    for (key, value) in source.iter().chain(extra) {
        headers = headers.insert(Header {
            key,
            value: Some(*value),
        });
    }
    headers
}

/// One record for [`send_all`] or [`send_now`].
pub struct Outgoing<'a> {
    /// The source record: its key is sent.
    pub record: &'a Record,
    /// The value sent.
    pub value: Option<&'a [u8]>,
    /// The headers sent.
    pub headers: OwnedHeaders,
    /// The record's timestamp (milliseconds since the epoch); `None`: the producer's time.
    pub timestamp: Option<i64>,
    /// Its own topic (a route's templated topic rendered for it); `None`: the batch's topic.
    pub topic: Option<&'a str>,
}

/// Sends each record's original key with the given value and headers to `topic`, and returns
/// one outcome per record once its delivery report is in. A full local queue is waited out.
pub async fn send_all<'a>(
    producer: &Producer,
    topic: &str,
    records: impl Iterator<Item = Outgoing<'a>>,
) -> Vec<Result<(), DeliveryError>> {
    let mut records: Vec<_> = records.collect();
    let mut outcomes = Vec::with_capacity(records.len());
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(MAX_REPORTED));
        let reporting = Reporting::register(producer, records.len());
        let mut ready = records
            .into_iter()
            .enumerate()
            .map(|(index, outgoing)| reporting.ready(topic, index, outgoing));
        let mut given_back = None;
        // A full local queue empties as the broker takes records: wait briefly, try again.
        // The wait is bounded by `message.timeout.ms` of the records ahead.
        while let Some(back) = reporting.send_in_order(given_back.take(), &mut ready) {
            given_back = Some(back);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes.extend(reporting.outcomes().await);
        records = rest;
    }
    outcomes
}

/// Sends the records to `topic` now, in order, and returns a future of their outcomes (one per
/// record, after its delivery report) that borrows nothing: the caller may send more before it
/// resolves, and the idempotent producer keeps what it sent in order. It never waits: once the
/// local queue is full, that record and the rest fail at once (`queue_full`, retryable).
pub fn send_now<'a>(
    producer: &Producer,
    topic: &str,
    records: impl Iterator<Item = Outgoing<'a>>,
) -> impl std::future::Future<Output = Vec<Result<(), DeliveryError>>> + Send + 'static {
    let mut parts = Vec::new();
    let mut full = false;
    let mut records = records.peekable();
    while records.peek().is_some() {
        let part: Vec<_> = records.by_ref().take(MAX_REPORTED).collect();
        let reporting = Reporting::register(producer, part.len());
        let queue_full = || {
            Err(DeliveryError::retryable(
                "queue_full",
                "the producer's local queue is full",
            ))
        };
        if full {
            for index in 0..part.len() {
                reporting.report(index, queue_full());
            }
        } else {
            let mut ready = part
                .into_iter()
                .enumerate()
                .map(|(index, outgoing)| reporting.ready(topic, index, outgoing));
            if let Some(back) = reporting.send_in_order(None, &mut ready) {
                // Nothing after a refused record is sent: it would land ahead of it.
                full = true;
                reporting.report(back.index, queue_full());
                for rest in ready {
                    reporting.report(rest.index, queue_full());
                }
            }
        }
        parts.push(reporting);
    }
    async move {
        let mut outcomes = Vec::new();
        for reporting in parts {
            outcomes.extend(reporting.outcomes().await);
        }
        outcomes
    }
}

/// A batch of at most [`MAX_REPORTED`] records registered for its delivery reports.
struct Reporting {
    producer: ThreadedProducer<Reports>,
    batch: u64,
    reports: Arc<BatchReports>,
    /// The transactional producer's fences (see [`Rebuildable::fences`]).
    fences: Option<Fences>,
}

/// A record of a batch ready to be handed to librdkafka.
struct Ready<'a> {
    /// Its place in the batch.
    index: usize,
    /// The source record: its assignment is checked against the fences at the send.
    source: &'a Record,
    record: BaseRecord<'a, [u8], [u8], usize>,
}

impl Reporting {
    fn register(producer: &Producer, len: usize) -> Reporting {
        let client = producer.client();
        let context = client.context();
        let batch = context
            .next_batch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            & (u64::MAX >> INDEX_BITS);
        let reports = Arc::new(BatchReports {
            state: std::sync::Mutex::new(ReportState {
                outcomes: vec![Ok(()); len],
                remaining: len,
            }),
            done: tokio::sync::Notify::new(),
        });
        context.waiting().insert(batch, reports.clone());
        Reporting {
            producer: client.clone(),
            batch,
            reports,
            fences: producer.0.fences.clone(),
        }
    }

    /// Record `index` of the batch, ready to send.
    fn ready<'a>(&self, topic: &'a str, index: usize, outgoing: Outgoing<'a>) -> Ready<'a> {
        let source = outgoing.record;
        Ready {
            index,
            source,
            record: self.record(topic, index, outgoing),
        }
    }

    /// Hands `first`, then the records of `rest`, to librdkafka in order, until the local
    /// queue is full: gives back the record it refused (the caller waits, or fails it and the
    /// rest). A record read under a released assignment is reported [`FENCED`] instead of sent.
    ///
    /// The fences are held while the records are checked and sent: a release waits until they
    /// are in librdkafka, and nothing it fences is sent after it. This is what keeps an aborted
    /// transaction's records out of the next one: the rewind releases their assignments
    /// before the next transaction begins, and while the transaction ends librdkafka refuses
    /// sends, so a record is either refused then (and retried, then fenced here) or checked
    /// here after the release. A check before the send, apart from it (the worker's), cannot
    /// promise that: the transaction may end and the next begin between the two.
    fn send_in_order<'a>(
        &self,
        first: Option<Ready<'a>>,
        rest: &mut impl Iterator<Item = Ready<'a>>,
    ) -> Option<Ready<'a>> {
        let released = self.fences.as_ref().map(Fences::hold_released);
        for ready in first.into_iter().chain(rest) {
            if released
                .as_ref()
                .is_some_and(|released| released.covers(ready.source))
            {
                self.report(ready.index, Err(fenced()));
                continue;
            }
            let Ready {
                index,
                source,
                record,
            } = ready;
            if let Some(record) = self.send(index, record) {
                return Some(Ready {
                    index,
                    source,
                    record,
                });
            }
        }
        None
    }

    /// The librdkafka record of `index`, whose report comes back to this batch.
    fn record<'a>(
        &self,
        topic: &'a str,
        index: usize,
        outgoing: Outgoing<'a>,
    ) -> BaseRecord<'a, [u8], [u8], usize> {
        let opaque = ((self.batch << INDEX_BITS) as usize) | index;
        let topic = outgoing.topic.unwrap_or(topic);
        let mut base = BaseRecord::with_opaque_to(topic, opaque).headers(outgoing.headers);
        if let Some(key) = outgoing.record.key() {
            base = base.key(key);
        }
        if let Some(value) = outgoing.value {
            base = base.payload(value);
        }
        if let Some(timestamp) = outgoing.timestamp {
            base = base.timestamp(timestamp);
        }
        base
    }

    /// Hands record `index` to librdkafka; gives it back when the local queue is full, and
    /// reports it failed on any other error.
    fn send<'a>(
        &self,
        index: usize,
        record: BaseRecord<'a, [u8], [u8], usize>,
    ) -> Option<BaseRecord<'a, [u8], [u8], usize>> {
        match self.producer.send(record) {
            Ok(()) => None,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => Some(back),
            Err((err, _)) => {
                self.producer.context().note(&err);
                self.report(index, Err(classify(&err)));
                None
            }
        }
    }

    fn report(&self, index: usize, outcome: Result<(), DeliveryError>) {
        self.reports.report(index, outcome);
    }

    /// Waits for every record's report. Every record sent gets exactly one (librdkafka fails
    /// it after `message.timeout.ms` at the latest); the last one wakes this task.
    async fn outcomes(self) -> Vec<Result<(), DeliveryError>> {
        while self.reports.remaining() > 0 {
            self.reports.done.notified().await;
        }
        let mut state = self
            .reports
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut state.outcomes)
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        // Reported or given up on (a dropped future): either way nobody waits for it now.
        self.producer.context().waiting().remove(&self.batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// The value of property `name` the producer's current client was made with.
    fn configured(producer: &Producer, name: &str) -> Option<String> {
        let current = producer.0.current.read().expect("not poisoned");
        current.config.get(name).map(str::to_string)
    }

    /// librdkafka's handle of the producer's current client.
    fn native(producer: &Producer) -> *mut rdkafka::bindings::rd_kafka_t {
        use rdkafka::producer::Producer as _;
        producer.client().client().native_ptr()
    }

    #[tokio::test]
    async fn a_producer_with_a_fatal_error_is_rebuilt_and_what_failed_on_it_is_delivered() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("out", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let options = std::collections::BTreeMap::new();
        let cluster = Cluster {
            brokers: &brokers,
            security: None,
            options: &options,
        };
        let producer = create(cluster, "fatal test producer").expect("producer");
        let record = crate::record::test_record(0, 1, Some(b"k"), Some(b"{}"));
        let outgoing = |record| Outgoing {
            record,
            value: Some(&b"{}"[..]),
            headers: OwnedHeaders::new(),
            timestamp: None,
            topic: None,
        };
        let first = send_all(&producer, "out", std::iter::once(outgoing(&record))).await;
        assert_eq!(first, vec![Ok(())]);
        // Records in flight when the error strikes: each gets an outcome, none is lost
        // silently (delivered, or failed retryably for the caller to send again).
        let in_flight: Vec<_> = (0..100)
            .map(|offset| crate::record::test_record(0, offset, Some(b"k"), Some(b"{}")))
            .collect();
        let reported = send_now(&producer, "out", in_flight.iter().map(outgoing));
        // What librdkafka raises when the idempotent producer loses its sequence for good.
        let reason = c"injected by the test";
        // SAFETY: the handle is alive (the producer is), and the reason a C string.
        let raised = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                native(&producer),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        assert_eq!(
            raised,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        );
        let reported = tokio::time::timeout(Duration::from_secs(30), reported)
            .await
            .expect("every record in flight is reported");
        assert_eq!(reported.len(), 100);
        assert!(
            reported
                .iter()
                .all(|outcome| outcome.as_ref().is_ok_or_retryable()),
            "{reported:?}"
        );
        // The worker's view: send, and retry what failed retryably, a bounded number of times.
        let mut outcomes = Vec::new();
        for _ in 0..50 {
            outcomes = send_all(&producer, "out", std::iter::once(outgoing(&record))).await;
            if outcomes == vec![Ok(())] {
                break;
            }
            assert!(
                outcomes
                    .iter()
                    .all(|outcome| outcome.as_ref().is_ok_or_retryable()),
                "{outcomes:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            outcomes,
            vec![Ok(())],
            "after a fatal error the producer must be rebuilt, not fail every record for ever"
        );
        let rebuilds = crate::metrics::kafka_producer_rebuilds()
            .with_label_values(&["fatal test producer"])
            .get();
        assert_eq!(rebuilds, 1);
    }

    #[tokio::test]
    async fn credentials_read_from_a_file_are_read_again_when_the_file_changes() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("out", 1, 1).expect("topic");
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("token");
        std::fs::write(&token, "first-token\n").expect("write");
        // Any option works the same; the mock cluster has no SASL, so `client.id` stands in
        // for `sasl.password` or `sasl.oauthbearer.config`.
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n\
             [[routes]]\nname = \"all\"\ndefault = true\nsink = {{ type = \"null\" }}\n\
             [dead_letter]\ntopic = \"out\"\noptions = {{ \"client.id\" = \"${{file:{}}}\" }}\n",
            mock.bootstrap_servers(),
            token.display()
        );
        let mut config = crate::config::load_jailed(&text, &[]).expect("valid");
        config.resolve_outputs();
        let source = config.kafka.brokers.clone();
        let Some(dead_letter) = &config.dead_letter else {
            panic!("a dead-letter section")
        };
        let producer =
            create(dead_letter.cluster(&source), "reload test producer").expect("producer");
        assert_eq!(
            configured(&producer, "client.id").as_deref(),
            Some("first-token")
        );
        // The token is rotated: the file is rewritten in place.
        std::fs::write(&token, "second-token\n").expect("rewrite");
        let until = std::time::Instant::now() + Duration::from_secs(20);
        let mut used = None;
        while std::time::Instant::now() < until {
            let record = crate::record::test_record(0, 1, Some(b"k"), Some(b"{}"));
            let sent = send_all(
                &producer,
                "out",
                std::iter::once(Outgoing {
                    record: &record,
                    value: Some(&b"{}"[..]),
                    headers: OwnedHeaders::new(),
                    timestamp: None,
                    topic: None,
                }),
            )
            .await;
            assert_eq!(sent, vec![Ok(())]);
            used = configured(&producer, "client.id");
            if used.as_deref() == Some("second-token") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            used.as_deref(),
            Some("second-token"),
            "a value read from a file must be read again when the file changes"
        );
        let rebuilds = crate::metrics::kafka_producer_rebuilds()
            .with_label_values(&["reload test producer"])
            .get();
        assert_eq!(rebuilds, 1, "the client was replaced once, when idle");
    }

    #[tokio::test]
    async fn the_transactional_producer_refuses_records_of_released_assignments() {
        use rdkafka::producer::Producer as _;
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("out", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let options = std::collections::BTreeMap::new();
        let cluster = Cluster {
            brokers: &brokers,
            security: None,
            options: &options,
        };
        let fences = Fences::default();
        let producer =
            create_transactional(cluster, "fence-test", fences.clone()).expect("producer");
        let client = producer.transactional_client();
        client
            .init_transactions(Duration::from_secs(30))
            .expect("init_transactions");
        client.begin_transaction().expect("begin");
        // Partition 0's assignment was rewound (an aborted transaction); partition 1's stays.
        let rewound = crate::record::test_record(0, 7, Some(b"k"), Some(b"{}"));
        let kept = crate::record::test_record(1, 8, Some(b"k"), Some(b"{}"));
        fences.revoke(&rewound.source, rewound.generation);
        fences.release(&rewound.source, rewound.generation);
        let outgoing = |record| Outgoing {
            record,
            value: Some(&b"{}"[..]),
            headers: OwnedHeaders::new(),
            timestamp: None,
            topic: None,
        };
        let waited = send_all(
            &producer,
            "out",
            [&rewound, &kept].into_iter().map(outgoing),
        )
        .await;
        let started = send_now(
            &producer,
            "out",
            [&rewound, &kept].into_iter().map(outgoing),
        )
        .await;
        for outcomes in [waited, started] {
            assert_eq!(outcomes.len(), 2);
            assert_eq!(
                outcomes[0].as_ref().map_err(|err| err.reason),
                Err(FENCED),
                "{outcomes:?}"
            );
            assert_eq!(outcomes[1], Ok(()));
        }
        let (_, written) = client
            .client()
            .fetch_watermarks("out", 0, Duration::from_secs(10))
            .expect("watermarks");
        assert_eq!(
            written, 2,
            "only the kept record was written, once per send"
        );
        assert!(
            !producer.failed_since_cleared(),
            "a record not sent does not make the transaction abortable"
        );
        client
            .commit_transaction(Duration::from_secs(10))
            .expect("commit");
    }

    trait OkOrRetryable {
        fn is_ok_or_retryable(&self) -> bool;
    }

    impl OkOrRetryable for Result<&(), &DeliveryError> {
        fn is_ok_or_retryable(&self) -> bool {
            match self {
                Ok(()) => true,
                Err(err) => err.kind == FailureKind::Retryable,
            }
        }
    }

    #[test]
    fn too_large_is_permanent_and_timeouts_are_retryable() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&too_large).kind, FailureKind::Permanent);
        assert_eq!(classify(&too_large).reason, "record_too_large");
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&timed_out).kind, FailureKind::Retryable);
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(classify(&down).kind, FailureKind::Retryable);
    }
}
