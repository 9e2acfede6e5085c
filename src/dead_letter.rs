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
use tracing::{error, warn};

use crate::committer::CommitterHandle;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::producer::{self, headers, headers_for, Producer};
use crate::record::{AckStatus, Record, StageGone};

/// Most dead letters produced in one go.
const BATCH: usize = 64;
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
    /// The route's sink could not deliver it.
    Sink,
}

impl Stage {
    /// Header and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Route => "route",
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
        )
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
}

struct DeadLetterActor {
    receiver: mpsc::Receiver<DeadLetter>,
    producer: Producer,
    topic: String,
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
    async fn park(&mut self, mut pending: Vec<DeadLetter>) -> Result<(), StageGone> {
        let mut backoff = RETRY_FIRST;
        loop {
            let with_headers = pending.iter().map(|dead| {
                let value = match dead.dropped_value {
                    Some(_) => None,
                    None => dead.record.payload(),
                };
                // Produced at the time it failed: the dead-letter topic's retention counts
                // from then.
                producer::Outgoing {
                    record: &dead.record,
                    value,
                    headers: dead_letter_headers(dead),
                    timestamp: None,
                }
            });
            let outcomes = producer::send_all(&self.producer, &self.topic, with_headers).await;
            let mut failed = Vec::new();
            let mut last_error = None;
            for (dead, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => {
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
                    }
                    Err(err)
                        if err.reason == producer::RECORD_TOO_LARGE
                            && dead.dropped_value.is_none() =>
                    {
                        // The dead-letter topic will never take a value this large: park the
                        // record's key, headers and coordinates without it rather than block
                        // every partition behind it forever. Only a size refusal drops a value;
                        // any other error keeps the record whole and retries.
                        warn!(
                            topic = %dead.record.source.topic,
                            partition = dead.record.source.partition,
                            offset = dead.record.offset,
                            error = %err,
                            "dead-letter topic refused the value; parking the record without it"
                        );
                        let size = dead.record.payload().map_or(0, <[u8]>::len);
                        failed.push(DeadLetter {
                            dropped_value: Some(size),
                            ..dead
                        });
                    }
                    Err(err) => {
                        last_error = Some(err);
                        failed.push(dead);
                    }
                }
            }
            if failed.is_empty() {
                self.set_trouble(None);
                return Ok(());
            }
            let Some(error) = last_error else {
                // Only values to drop: try again at once (without them; a second refusal of
                // the same letter is an ordinary error, retried with backoff).
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
            }));
            let last_error = Some(error);
            error!(
                records = failed.len(),
                error = ?last_error.map(|e| e.to_string()),
                retry_in_ms = backoff.as_millis() as u64,
                "cannot produce to the dead-letter topic; their offsets stay uncommitted"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            pending = failed;
        }
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

fn dead_letter_headers(dead: &DeadLetter) -> rdkafka::message::OwnedHeaders {
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
    headers_for(&dead.record, &extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_budget_allows_a_bounded_number_per_second() {
        let budget = LogBudget::new();
        let allowed = (0..1_000).filter(|_| budget.allow()).count();
        assert_eq!(allowed, LOG_PER_SECOND as usize);
        let held_back = budget.window.lock().map(|w| w.2).unwrap_or(0);
        assert_eq!(held_back, 1_000 - u64::from(LOG_PER_SECOND));
    }
}
