//! Kafka output shared by the Kafka sink and the dead-letter actor: an idempotent producer, a
//! batch send that reports one outcome per record after its delivery report, and the
//! classification of librdkafka errors into retryable and permanent.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use crate::client_log::{ClientLog, ProducerLog};

/// logbridge's producers (Kafka sinks, dead letters): librdkafka's future producer with log
/// lines and errors rate-limited.
pub type FutureProducer = rdkafka::producer::FutureProducer<ProducerLog>;

use crate::config::Cluster;
use crate::record::Record;

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
}

impl DeliveryError {
    /// A transient failure.
    pub fn retryable(reason: &'static str, message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Retryable,
            reason,
            message: message.into(),
        }
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            kind: FailureKind::Permanent,
            reason,
            message: message.into(),
        }
    }
}

/// The reason of a record the destination refuses for its size (the only refusal that may
/// drop a dead letter's value).
pub const RECORD_TOO_LARGE: &str = "record_too_large";

/// Sorts a librdkafka error into retryable or permanent, where librdkafka tells.
pub fn classify(err: &KafkaError) -> DeliveryError {
    use RDKafkaErrorCode as Code;
    let message = err.to_string();
    match err.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge) => {
            DeliveryError::permanent(RECORD_TOO_LARGE, message)
        }
        Some(Code::InvalidMessage | Code::InvalidMessageSize | Code::InvalidRecord) => {
            DeliveryError::permanent("record_invalid", message)
        }
        Some(
            Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed | Code::InvalidTopic,
        ) => DeliveryError::permanent("not_allowed", message),
        Some(Code::MessageTimedOut) => DeliveryError::retryable("timed_out", message),
        Some(Code::QueueFull) => DeliveryError::retryable("queue_full", message),
        _ => DeliveryError::retryable("delivery_failed", message),
    }
}

/// Creates an idempotent producer for `cluster`: logbridge's defaults, then the cluster's
/// security and options. `client` names it in log lines (`dead-letter producer`, ...).
pub fn create(cluster: Cluster<'_>, client: &'static str) -> anyhow::Result<FutureProducer> {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", DEFAULT_MESSAGE_TIMEOUT_MS)
        .set("linger.ms", "1");
    cluster.apply(&mut config);
    config
        .create_with_context(ProducerLog(ClientLog::new(client)))
        .with_context(|| format!("failed to create a Kafka producer for {}", cluster.brokers))
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
    /// Dead letters: delivery attempts made.
    pub const ATTEMPTS: &str = "logbridge.attempts";
    /// Dead letters parked without their value (refused by the dead-letter topic): its size.
    pub const VALUE_DROPPED: &str = "logbridge.error.value_dropped";
}

/// The record's own headers followed by logbridge's: `extra` pairs.
pub fn headers_for(record: &Record, extra: &[(&str, &[u8])]) -> OwnedHeaders {
    let mut headers = record.headers.clone().unwrap_or_default();
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

/// Sends each record's original key with the given value and headers to `topic`, and returns
/// one outcome per record once its delivery report is in.
pub async fn send_all<'a>(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (&'a Record, Option<&'a [u8]>, OwnedHeaders)>,
) -> Vec<Result<(), DeliveryError>> {
    let mut pending: Vec<Result<DeliveryFuture, DeliveryError>> = Vec::new();
    for (record, value, headers) in records {
        let mut future_record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(key) = record.key.as_deref() {
            future_record = future_record.key(key);
        }
        if let Some(value) = value {
            future_record = future_record.payload(value);
        }
        // Enqueue without waiting; a full local queue is waited out here (bounded by the
        // queue's own delivery timeout), which is backpressure, not failure.
        let mut attempt = future_record;
        let queued = loop {
            match producer.send_result(attempt) {
                Ok(delivery) => break Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    attempt = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => break Err(classify(&err)),
            }
        };
        pending.push(queued);
    }
    let mut outcomes = Vec::with_capacity(pending.len());
    for queued in pending {
        let outcome = match queued {
            Err(err) => Err(err),
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((err, _))) => Err(classify(&err)),
                Err(_) => Err(DeliveryError::retryable(
                    "producer_gone",
                    "producer dropped the delivery report",
                )),
            },
        };
        outcomes.push(outcome);
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

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
