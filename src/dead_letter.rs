//! Dead-letter actor: parks records that could not be decoded or delivered in the dead-letter
//! topic, with the original key, value and headers plus context headers (stage, reason, message,
//! source topic/partition/offset, route, attempts), and acks them only after the dead-letter
//! producer's delivery report. Without a dead-letter topic, failures are logged, counted and
//! acked `failed` (skipped).
//!
//! A dead letter that cannot be produced is retried with backoff for as long as it takes: its
//! offset must not be committed before it is parked, and the actor's full channel pushes back on
//! the workers and the router until the dead-letter topic is reachable again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use crate::committer::CommitterHandle;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::producer::{self, headers, headers_for, Producer};
use crate::record::{AckStatus, Record, StageGone};

/// Most dead letters produced in one go.
pub(crate) const BATCH: usize = 64;
/// Backoff between attempts to park a dead letter, doubled up to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Where in the pipeline a record failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The payload is not a log event.
    Decode,
    /// No route could take it.
    Route,
    /// One of the route's transforms failed on it, or its throttle dead-letters the excess,
    /// or its destination template names a field it lacks.
    Transform,
    /// The route's sink could not deliver it.
    Sink,
}

impl Stage {
    /// Header and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Route => "route",
            Stage::Transform => "transform",
            Stage::Sink => "sink",
        }
    }
}

/// A record that failed, with why.
#[derive(Debug)]
pub struct DeadLetter {
    /// The record, with its original key, value and headers.
    pub record: Record,
    /// Where it failed.
    pub stage: Stage,
    /// Short, low-cardinality reason (`not_json`, `record_too_large`, `retries_exhausted`...).
    pub reason: &'static str,
    /// The full error message.
    pub message: String,
    /// Route that handled it (`none` before routing).
    pub route: Arc<str>,
    /// Delivery attempts made (0 for decode failures).
    pub attempts: u32,
    /// Set (to the value's size) when the record is parked without its value: the value was
    /// over `max_payload_bytes` and never copied, or the dead-letter topic refused it as too
    /// large. `logbridge.error.value_dropped` then gives the size. Nothing else drops a value.
    pub dropped_value: Option<usize>,
    /// The HTTP status an HTTP destination refused the record with.
    pub http_status: Option<u16>,
}

/// Why the dead-letter topic holds the pipeline back (shown by `/readyz` and `/status`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterTrouble {
    /// The dead-letter topic.
    pub topic: String,
    /// The last error.
    pub error: String,
    /// Since when writes fail.
    pub since: std::time::Instant,
    /// Dead letters waiting (their offsets stay uncommitted).
    pub waiting: usize,
    /// Set (to the reason) when the topic refuses a letter in a way retrying cannot fix, and
    /// nothing logbridge may change about the letter helps: an operator must act.
    pub for_good: Option<&'static str>,
}

impl std::fmt::Display for DeadLetterTrouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dead-letter topic {} refuses writes for {:.0} s ({}): {} records wait, their offsets stay uncommitted",
            self.topic,
            self.since.elapsed().as_secs_f64(),
            self.error,
            self.waiting
        )?;
        if let Some(reason) = self.for_good {
            let fix = match reason {
                "not_allowed" => "grant logbridge's principal Write on the topic",
                producer::RECORD_TOO_LARGE => "raise the topic's max.message.bytes",
                producer::RECORD_INVALID => {
                    "check the topic's settings (cleanup.policy, message format)"
                }
                _ => "fix the topic",
            };
            write!(
                f,
                "; the topic refuses this dead letter for good ({reason}): nothing is skipped, {fix}"
            )?;
        }
        Ok(())
    }
}

/// Where failed records go (held by the router and every worker): the dead-letter actor, or,
/// without a dead-letter topic, straight to the committer as `failed`.
#[derive(Clone)]
pub struct DeadLetterHandle {
    dead_letters: Option<mpsc::Sender<DeadLetter>>,
    trouble: watch::Receiver<Option<DeadLetterTrouble>>,
    committer: CommitterHandle,
    metrics: Arc<Metrics>,
    log_budget: Arc<LogBudget>,
}

/// At most `LOG_PER_SECOND` log lines a second, shared by every holder; says how many it held
/// back when the next second opens.
struct LogBudget {
    window: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

const LOG_PER_SECOND: u32 = 20;

impl LogBudget {
    fn new() -> LogBudget {
        LogBudget {
            window: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    fn allow(&self) -> bool {
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (started, used, held_back) = &mut *window;
        if started.elapsed() >= Duration::from_secs(1) {
            if *held_back > 0 {
                warn!(
                    held_back = *held_back,
                    "failed-record log lines held back in the last second (all are in the dead-letter topic and logbridge_dead_letters_total)"
                );
            }
            *started = std::time::Instant::now();
            *used = 0;
            *held_back = 0;
        }
        if *used < LOG_PER_SECOND {
            *used += 1;
            true
        } else {
            *held_back += 1;
            false
        }
    }
}

impl DeadLetterHandle {
    /// Starts the dead-letter actor if a topic is configured (else there is no task: failures
    /// are finished by the handle itself).
    pub fn spawn(
        topic: Option<DeadLetterTopic>,
        committer: CommitterHandle,
        metrics: Arc<Metrics>,
        liveness: Liveness,
    ) -> (DeadLetterHandle, Option<tokio::task::JoinHandle<()>>) {
        let (trouble_tx, trouble) = watch::channel(None);
        let handle = |dead_letters| DeadLetterHandle {
            dead_letters,
            trouble: trouble.clone(),
            committer: committer.clone(),
            metrics: metrics.clone(),
            log_budget: Arc::new(LogBudget::new()),
        };
        let Some(topic) = topic else {
            return (handle(None), None);
        };
        // Full: workers and the router wait, their channels fill, the consumer pauses.
        let (sender, receiver) = mpsc::channel(topic.capacity);
        liveness.expect("dead_letter", 1);
        let actor = DeadLetterActor {
            receiver,
            producer: topic.producer,
            topic: topic.topic,
            fences: topic.fences,
            committer: committer.clone(),
            metrics: metrics.clone(),
            liveness,
            trouble: trouble_tx,
        };
        let task = tokio::spawn(actor.run());
        (handle(Some(sender)), Some(task))
    }

    /// For unit tests of the stages that fail records: no dead-letter topic, and a committer
    /// whose messages land in the returned receiver.
    #[cfg(test)]
    pub(crate) fn for_test(
        metrics: &Arc<Metrics>,
    ) -> (
        CommitterHandle,
        mpsc::Receiver<crate::committer::CommitterMsg>,
        DeadLetterHandle,
    ) {
        let (committer, messages) = CommitterHandle::for_test();
        let (dead_letters, _) = DeadLetterHandle::spawn(
            None,
            committer.clone(),
            metrics.clone(),
            Liveness::default(),
        );
        (committer, messages, dead_letters)
    }

    /// For unit tests: a handle whose dead letters land in the returned receiver.
    #[cfg(test)]
    pub(crate) fn capturing_for_test(
        metrics: &Arc<Metrics>,
    ) -> (DeadLetterHandle, mpsc::Receiver<DeadLetter>) {
        let (committer, _) = CommitterHandle::for_test();
        let (sender, receiver) = mpsc::channel(64);
        let (_, trouble) = watch::channel(None);
        let handle = DeadLetterHandle {
            dead_letters: Some(sender),
            trouble,
            committer,
            metrics: metrics.clone(),
            log_budget: Arc::new(LogBudget::new()),
        };
        (handle, receiver)
    }

    /// Whether the dead-letter topic refuses writes, and why.
    pub fn trouble(&self) -> watch::Receiver<Option<DeadLetterTrouble>> {
        self.trouble.clone()
    }

    /// Hands over a failed record. With a dead-letter topic this waits while the dead-letter
    /// channel is full (backpressure); without one the record is logged, counted and skipped.
    pub async fn fail(&self, dead: DeadLetter) -> Result<(), StageGone> {
        // A record that is skipped is logged every time: the log line is all that is left of
        // it. A dead-lettered one keeps its full context in the dead-letter topic, so a burst
        // of them is logged at a bounded rate (a log flood can block a process on a slow
        // stderr); the counters count every one.
        let log_it = self.dead_letters.is_none() || self.log_budget.allow();
        if log_it {
            warn!(
                topic = %dead.record.source.topic,
                partition = dead.record.source.partition,
                offset = dead.record.offset,
                route = %dead.route,
                stage = dead.stage.as_str(),
                reason = dead.reason,
                error = %dead.message,
                "record failed"
            );
        }
        match &self.dead_letters {
            Some(sender) => sender
                .send(dead)
                .await
                .map_err(|_| StageGone("dead-letter actor")),
            None => {
                self.metrics
                    .finished
                    .with_label_values(&[&dead.route, AckStatus::Failed.as_str()])
                    .inc();
                let ack = dead
                    .record
                    .failed(AckStatus::Failed, dead.route.clone(), dead.reason);
                self.committer.ack(ack).await
            }
        }
    }
}

/// Settings of the dead-letter topic.
pub struct DeadLetterTopic {
    /// Producer for the dead-letter cluster.
    pub producer: Producer,
    /// Topic name.
    pub topic: String,
    /// Channel capacity.
    pub capacity: usize,
    /// Exactly-once: letters of records whose assignment was rewound or revoked are dropped
    /// rather than retried (see `DeadLetterActor::drop_released`).
    pub fences: Option<crate::record::Fences>,
}

struct DeadLetterActor {
    receiver: mpsc::Receiver<DeadLetter>,
    producer: Producer,
    topic: String,
    fences: Option<crate::record::Fences>,
    committer: CommitterHandle,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    trouble: watch::Sender<Option<DeadLetterTrouble>>,
}

impl DeadLetterActor {
    #[tracing::instrument(name = "dead_letter", skip_all, fields(topic = %self.topic))]
    async fn run(mut self) {
        let _alive = self.liveness.enter("dead_letter");
        let mut batch = Vec::with_capacity(BATCH);
        while self.receiver.recv_many(&mut batch, BATCH).await > 0 {
            if let Err(gone) = self.park(std::mem::take(&mut batch)).await {
                warn!(error = %gone, "dead-letter actor stops");
                return;
            }
        }
    }

    /// Produces the batch until every dead letter is acknowledged by the broker, then acks them.
    ///
    /// A refusal that a smaller or keyed letter would not get is answered at once by such a
    /// letter ([`Letter::remedy`]). What remains is retried with backoff, and none is ever
    /// dropped: a refusal retrying cannot fix (`not_allowed`, a letter still too large when
    /// bare, ...) is counted in `logbridge_dead_letter_refused_total` and named "for good" by
    /// `/readyz`, and the actor waits for an operator (an ACL granted, the topic's settings
    /// changed) rather than lose the record. Later letters wait behind it: their partitions
    /// could not commit past anyway, and a stop that says why is what the operator needs.
    async fn park(&mut self, batch: Vec<DeadLetter>) -> Result<(), StageGone> {
        let mut pending: Vec<Letter> = batch.into_iter().map(Letter::new).collect();
        let mut backoff = RETRY_FIRST;
        loop {
            self.drop_released(&mut pending);
            if pending.is_empty() {
                return Ok(());
            }
            let with_headers = pending.iter().map(|letter| {
                let dead = &letter.dead;
                let value = match dead.dropped_value {
                    Some(_) => None,
                    None => dead.record.payload(),
                };
                // Produced at the time it failed: the dead-letter topic's retention counts
                // from then.
                producer::Outgoing {
                    record: &dead.record,
                    value,
                    headers: letter.headers(),
                    timestamp: None,
                    topic: None,
                }
            });
            let outcomes = producer::send_all(&self.producer, &self.topic, with_headers).await;
            let mut failed = Vec::new();
            let mut last_error = None;
            let mut for_good = None;
            let mut fenced = 0;
            for (letter, outcome) in pending.into_iter().zip(outcomes) {
                let err = match outcome {
                    // The transactional producer did not send it: its record's assignment was
                    // released after `drop_released` let it through. Dropped as that would
                    // have: the record is read again.
                    Err(err) if err.reason == producer::FENCED => {
                        fenced += 1;
                        continue;
                    }
                    Ok(()) => {
                        let dead = letter.dead;
                        self.metrics
                            .dead_letters
                            .with_label_values(&[dead.stage.as_str(), dead.reason])
                            .inc();
                        self.metrics
                            .finished
                            .with_label_values(&[&dead.route, AckStatus::DeadLettered.as_str()])
                            .inc();
                        let ack = dead.record.failed(
                            AckStatus::DeadLettered,
                            dead.route.clone(),
                            dead.reason,
                        );
                        self.committer.ack(ack).await?;
                        continue;
                    }
                    Err(err) => err,
                };
                let mut letter = letter;
                if letter.remedy(&err) {
                    // Sent again at once, changed so that this refusal cannot recur.
                    failed.push(letter);
                    continue;
                }
                if err.kind == producer::FailureKind::Permanent {
                    self.metrics
                        .dead_letter_refused
                        .with_label_values(&[err.reason])
                        .inc();
                    let source = &letter.dead.record;
                    error!(
                        topic = %source.source.topic,
                        partition = source.source.partition,
                        offset = source.offset,
                        error = %err,
                        "the dead-letter topic refuses this dead letter for good; it is kept and retried, and its partition waits, until the topic or its ACLs are fixed"
                    );
                    for_good = Some(err.reason);
                }
                last_error = Some(err);
                failed.push(letter);
            }
            self.dropped_released(fenced);
            if failed.is_empty() {
                self.set_trouble(None);
                return Ok(());
            }
            let Some(error) = last_error else {
                // Only remedies: try again at once (a second refusal of the same remedy is
                // not remedied again, so this happens at most thrice per letter).
                pending = failed;
                continue;
            };
            self.metrics.dead_letter_errors.inc_by(failed.len() as u64);
            let since = self
                .trouble
                .borrow()
                .as_ref()
                .map_or_else(std::time::Instant::now, |trouble| trouble.since);
            self.set_trouble(Some(DeadLetterTrouble {
                topic: self.topic.clone(),
                error: error.to_string(),
                since,
                waiting: failed.len() + self.receiver.len(),
                for_good,
            }));
            error!(
                records = failed.len(),
                error = %error,
                for_good,
                retry_in_ms = backoff.as_millis() as u64,
                "cannot produce to the dead-letter topic; their offsets stay uncommitted"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            pending = failed;
        }
    }

    /// Exactly-once: drops the letters of records read under an assignment that was rewound
    /// (an aborted transaction) or revoked since; their records are read again, and
    /// dead-lettered again in the transaction that commits them.
    fn drop_released(&self, pending: &mut Vec<Letter>) {
        let Some(fences) = &self.fences else {
            return;
        };
        let before = pending.len();
        pending.retain(|letter| !fences.is_released(&letter.dead.record));
        self.dropped_released(before - pending.len());
    }

    /// Counts out `dropped` letters of released assignments (never acked).
    fn dropped_released(&self, dropped: usize) {
        if dropped > 0 {
            self.metrics.in_flight.sub(dropped as i64);
            debug!(
                letters = dropped,
                "dead letters of a rewound or revoked assignment not written: their records are read again"
            );
        }
    }
}

/// A dead letter on its way to the topic, with what was changed so that the topic takes it.
struct Letter {
    dead: DeadLetter,
    /// Own headers of the record dropped (after the value), as the letter was still too large.
    headers_dropped: Option<usize>,
    /// The key `<topic>/<partition>/<offset>` given to a keyless letter refused as invalid.
    key_added: bool,
}

impl Letter {
    fn new(dead: DeadLetter) -> Letter {
        Letter {
            dead,
            headers_dropped: None,
            key_added: false,
        }
    }

    fn headers(&self) -> rdkafka::message::OwnedHeaders {
        let mut extra = Vec::new();
        let dropped = self.headers_dropped.map(|count| count.to_string());
        if let Some(dropped) = &dropped {
            extra.push((headers::HEADERS_DROPPED, dropped.as_bytes()));
        }
        if self.key_added {
            extra.push((headers::KEY_ADDED, &b"true"[..]));
        }
        dead_letter_headers(&self.dead, &extra)
    }

    /// Changes the letter so that the topic cannot refuse it again for `err`, where such a
    /// change exists and was not made yet; `false`: nothing to change. Each change is made at
    /// most once, and only a size refusal drops anything:
    /// - too large: first the value goes (`logbridge.error.value_dropped`), then the record's
    ///   own headers (`logbridge.error.headers_dropped`); the key, logbridge's context headers
    ///   and the coordinates always stay;
    /// - invalid without a key (a compacted topic takes no keyless record): the key
    ///   `<source topic>/<partition>/<offset>`, unique, so compaction never merges two letters
    ///   (`logbridge.error.key_added`).
    fn remedy(&mut self, err: &producer::DeliveryError) -> bool {
        let record = &self.dead.record;
        let source = (&record.source.topic, record.source.partition, record.offset);
        if err.reason == producer::RECORD_TOO_LARGE {
            if self.dead.dropped_value.is_none() {
                let size = record.payload().map_or(0, <[u8]>::len);
                warn!(topic = %source.0, partition = source.1, offset = source.2, error = %err, "dead-letter topic refused the value; parking the record without it");
                self.dead.dropped_value = Some(size);
                return true;
            }
            if self.headers_dropped.is_none() {
                let count = record.headers.as_ref().map_or(0, |own| {
                    use rdkafka::message::Headers as _;
                    own.count()
                });
                warn!(topic = %source.0, partition = source.1, offset = source.2, headers = count, error = %err, "dead-letter topic refused the record without its value; parking it without its own headers too");
                self.dead.record.headers = None;
                self.headers_dropped = Some(count);
                return true;
            }
            return false;
        }
        if err.reason == producer::RECORD_INVALID && record.key().is_none() && !self.key_added {
            let key = format!("{}/{}/{}", source.0, source.1, source.2);
            warn!(topic = %source.0, partition = source.1, offset = source.2, key, error = %err, "dead-letter topic refused a letter without a key; parking it with its coordinates as key");
            let value = self.dead.record.payload().map(<[u8]>::to_vec);
            self.dead.record.data =
                crate::record::KeyValue::new(Some(key.as_bytes()), value.as_deref());
            self.key_added = true;
            return true;
        }
        false
    }
}

impl DeadLetterActor {
    fn set_trouble(&self, trouble: Option<DeadLetterTrouble>) {
        self.metrics
            .dead_letter_failing
            .set(i64::from(trouble.is_some()));
        self.trouble.send_if_modified(|current| {
            let changed = *current != trouble;
            *current = trouble;
            changed
        });
    }
}

fn dead_letter_headers(
    dead: &DeadLetter,
    shrunk: &[(&str, &[u8])],
) -> rdkafka::message::OwnedHeaders {
    let attempts = dead.attempts.to_string();
    // Kafka header values are bytes; keep the message to a sane size.
    let message: String = dead.message.chars().take(1024).collect();
    let dropped = dead.dropped_value.unwrap_or(0).to_string();
    let mut extra: Vec<(&str, &[u8])> = vec![
        (headers::ERROR_STAGE, dead.stage.as_str().as_bytes()),
        (headers::ERROR_REASON, dead.reason.as_bytes()),
        (headers::ERROR_MESSAGE, message.as_bytes()),
        (headers::ROUTE, dead.route.as_bytes()),
        (headers::ATTEMPTS, attempts.as_bytes()),
    ];
    if dead.dropped_value.is_some() {
        extra.push((headers::VALUE_DROPPED, dropped.as_bytes()));
    }
    let status = dead.http_status.map(|status| status.to_string());
    if let Some(status) = &status {
        extra.push((headers::HTTP_STATUS, status.as_bytes()));
    }
    extra.extend_from_slice(shrunk);
    headers_for(&dead.record, &extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::committer::CommitterMsg;
    use crate::record::test_record;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// A dead-letter actor producing to topic `dlq` of a fresh mock cluster.
    struct Parking {
        mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        handle: DeadLetterHandle,
        acks: mpsc::Receiver<CommitterMsg>,
        metrics: Arc<Metrics>,
        _task: Option<tokio::task::JoinHandle<()>>,
    }

    fn parking() -> Parking {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("dlq", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let options = std::collections::BTreeMap::new();
        let cluster = crate::config::Cluster {
            brokers: &brokers,
            security: None,
            options: &options,
        };
        let producer = producer::create(cluster, "dead-letter producer").expect("producer");
        let metrics = Arc::new(Metrics::new());
        let (committer, acks) = CommitterHandle::for_test();
        let topic = DeadLetterTopic {
            producer,
            topic: "dlq".to_string(),
            capacity: 16,
            fences: None,
        };
        let (handle, task) =
            DeadLetterHandle::spawn(Some(topic), committer, metrics.clone(), Liveness::default());
        Parking {
            mock,
            handle,
            acks,
            metrics,
            _task: task,
        }
    }

    /// A record read back: key, value and headers.
    type ReadBack = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>);

    fn letter(record: Record) -> DeadLetter {
        DeadLetter {
            record,
            stage: Stage::Sink,
            reason: "http_401",
            message: "401 Unauthorized".to_string(),
            route: Arc::from("r"),
            attempts: 1,
            dropped_value: None,
            http_status: Some(401),
        }
    }

    impl Parking {
        /// The next ack, within 30 s.
        async fn ack(&mut self) -> Option<crate::record::ProcessAck> {
            let wait = tokio::time::timeout(Duration::from_secs(30), self.acks.recv());
            match wait.await.ok()?? {
                CommitterMsg::Ack(ack) => Some(ack),
                CommitterMsg::Acks(mut acks) => acks.pop(),
                CommitterMsg::Dispatched(_) => None,
            }
        }

        /// Every record of `dlq`: key, value and headers.
        fn read_back(&self) -> Vec<ReadBack> {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", self.mock.bootstrap_servers())
                .set("group.id", "read-back")
                .set("auto.offset.reset", "earliest")
                .create()
                .expect("consumer");
            let mut assignment = rdkafka::TopicPartitionList::new();
            assignment
                .add_partition_offset("dlq", 0, rdkafka::Offset::Beginning)
                .expect("partition");
            consumer.assign(&assignment).expect("assign");
            let mut records = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while records.is_empty() && std::time::Instant::now() < until {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| {
                                let value =
                                    h.value.map(String::from_utf8_lossy).unwrap_or_default();
                                (h.key.to_string(), value.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            records
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[tokio::test]
    async fn a_keyless_letter_refused_as_invalid_is_parked_with_its_coordinates_as_key() {
        let mut parking = parking();
        // A compacted dead-letter topic refuses a record without a key as invalid.
        parking.mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
        );
        let record = test_record(0, 5, None, Some(b"{\"level\":\"error\"}"));
        parking.handle.fail(letter(record)).await.expect("alive");
        let ack = parking.ack().await.expect("parked");
        assert_eq!(ack.status, AckStatus::DeadLettered);
        let parked = parking.read_back();
        assert_eq!(parked.len(), 1, "{parked:?}");
        let (key, value, headers) = &parked[0];
        assert_eq!(
            key.as_deref(),
            Some(&b"logs/0/5"[..]),
            "the letter was refused as keyless and must be parked with a key: {parked:?}"
        );
        assert_eq!(value.as_deref(), Some(&b"{\"level\":\"error\"}"[..]));
        assert_eq!(header(headers, headers::KEY_ADDED), Some("true"));
    }

    #[tokio::test]
    async fn a_letter_still_too_large_without_its_value_is_parked_without_its_headers() {
        let mut parking = parking();
        let too_large = RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE;
        parking
            .mock
            .request_errors(RDKafkaApiKey::Produce, &[too_large, too_large]);
        let mut record = test_record(0, 7, Some(b"k"), Some(b"{}"));
        record.headers = Some(rdkafka::message::OwnedHeaders::new().insert(
            rdkafka::message::Header {
                key: "huge",
                value: Some("x"),
            },
        ));
        parking.handle.fail(letter(record)).await.expect("alive");
        let ack = parking.ack().await.expect("parked");
        assert_eq!(ack.status, AckStatus::DeadLettered);
        let parked = parking.read_back();
        assert_eq!(parked.len(), 1, "{parked:?}");
        let (key, value, headers) = &parked[0];
        assert_eq!(key.as_deref(), Some(&b"k"[..]));
        assert_eq!(value, &None);
        assert_eq!(header(headers, headers::VALUE_DROPPED), Some("2"));
        assert_eq!(
            header(headers, "huge"),
            None,
            "refused twice as too large, the letter must lose the record's own headers: {headers:?}"
        );
        assert_eq!(header(headers, headers::HEADERS_DROPPED), Some("1"));
        assert_eq!(header(headers, headers::SOURCE_OFFSET), Some("7"));
    }

    #[tokio::test]
    async fn a_letter_refused_for_good_waits_and_says_so() {
        let mut parking = parking();
        let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4];
        parking
            .mock
            .request_errors(RDKafkaApiKey::Produce, &refused);
        let trouble = parking.handle.trouble();
        let record = test_record(0, 9, Some(b"k"), Some(b"{}"));
        parking.handle.fail(letter(record)).await.expect("alive");
        let mut seen = None;
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while seen.is_none() && std::time::Instant::now() < until {
            seen = trouble.borrow().as_ref().map(ToString::to_string);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.expect("the refusal is shown by /readyz");
        assert!(
            seen.contains("refuses this dead letter for good (not_allowed)"),
            "readiness must say the refusal is permanent and what to fix: {seen}"
        );
        let exported = parking.metrics.render();
        assert!(
            exported.contains("logbridge_dead_letter_refused_total{reason=\"not_allowed\"} 1"),
            "a permanent refusal is counted"
        );
        // Not lost: parked once the refusals end (an operator granted the ACL).
        let ack = parking.ack().await.expect("parked after the refusals");
        assert_eq!(ack.status, AckStatus::DeadLettered);
        assert_eq!(ack.offset, 9);
    }

    #[test]
    fn log_budget_allows_a_bounded_number_per_second() {
        let budget = LogBudget::new();
        let allowed = (0..1_000).filter(|_| budget.allow()).count();
        assert_eq!(allowed, LOG_PER_SECOND as usize);
        let held_back = budget.window.lock().map(|w| w.2).unwrap_or(0);
        assert_eq!(held_back, 1_000 - u64::from(LOG_PER_SECOND));
    }
}
