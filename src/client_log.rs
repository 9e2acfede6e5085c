//! librdkafka's errors and log lines, logged without flooding: a cluster that refuses every
//! connection (wrong CA, wrong password, all brokers down) makes each client report the same
//! error many times a second (seen: "all brokers down" every 50 ms). Each kind is logged the
//! first time, then at most once per [`REPEAT_EVERY`] with the count of those not logged.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use tracing::{debug, error, info, warn};

/// How often one kind of message is logged again while it repeats.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// librdkafka error codes (as counted) that an unreachable or misconfigured cluster brings.
const COMMON_CODES: [&str; 5] = [
    "AllBrokersDown",
    "BrokerTransportFailure",
    "Resolve",
    "Authentication",
    "SSL",
];

/// Most kinds the limiter remembers: partitions are many (and topics come and go), so kinds per
/// partition beyond this share their facility's limit until older ones fall quiet.
const MAX_KINDS: usize = 1024;

/// The first `<topic> [<partition>]` in a librdkafka line (its format for a partition).
fn partition_in(message: &str) -> Option<(&str, i32)> {
    let mut rest = message;
    while let Some(at) = rest.find(" [") {
        let after = &rest[at + 2..];
        let number = after.split(']').next().filter(|_| after.contains(']'));
        if let Some(partition) = number.and_then(|digits| digits.parse::<i32>().ok()) {
            let topic = rest[..at].rsplit(char::is_whitespace).next().unwrap_or("");
            let topic = topic.trim_start_matches('"').trim_end_matches('"');
            if !topic.is_empty() && !topic.ends_with(':') {
                return Some((topic, partition));
            }
        }
        rest = after;
    }
    None
}

/// Rate limit per kind of message; `client` names the client in every line.
pub struct ClientLog {
    client: &'static str,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ClientLog {
    /// A limiter for the client called `client` (`consumer`, `sink producer`, ...).
    pub fn new(client: &'static str) -> ClientLog {
        // The codes a cluster outage or bad credentials bring, at 0 from the start: a series
        // born at its first error would hide that error from `increase()` in the alert.
        for code in COMMON_CODES {
            crate::metrics::kafka_client_errors().with_label_values(&[client, code]);
        }
        ClientLog {
            client,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed since the last line)` when a line of `kind` is due now, else `None`
    /// (and counts it).
    fn due(&self, kind: &str, now: Instant) -> Option<u64> {
        self.due_within_bound(kind, None, now)
    }

    /// [`ClientLog::due`], where a `kind` that would take the map past [`MAX_KINDS`] (after
    /// kinds quiet for [`REPEAT_EVERY`] are forgotten) is counted as `fallback` instead.
    fn due_within_bound(&self, kind: &str, fallback: Option<&str>, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut kind = kind;
        if let Some(fallback) = fallback {
            if !seen.contains_key(kind) && seen.len() >= MAX_KINDS {
                // A quiet kind's next line would be due anyway: forgetting it changes nothing.
                seen.retain(|_, (last, _)| now.duration_since(*last) < REPEAT_EVERY);
                if seen.len() >= MAX_KINDS {
                    kind = fallback;
                }
            }
        }
        match seen.get_mut(kind) {
            Some((last, suppressed)) if now.duration_since(*last) < REPEAT_EVERY => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                // Bounded: error codes and librdkafka facilities are a few dozen at most, and
                // kinds per partition only enter below MAX_KINDS (else they use a fallback).
                seen.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// `Some(suppressed)` when a warning or error line of `facility` saying `message` is due.
    /// Lines naming a partition (`<topic> [<partition>]`, librdkafka's way) are limited per
    /// facility and partition, so that one partition's warnings do not hide another's.
    fn log_due(&self, facility: &str, message: &str, now: Instant) -> Option<u64> {
        let per_facility = format!("log {facility}");
        match partition_in(message) {
            Some((topic, partition)) => self.due_within_bound(
                &format!("log {facility} {topic} [{partition}]"),
                Some(&per_facility),
                now,
            ),
            None => self.due(&per_facility, now),
        }
    }

    /// A client-wide error from librdkafka's error callback: counted
    /// (`logbridge_kafka_client_errors_total`), and logged within the rate limit.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        self.count(error);
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| error.to_string(), |code| format!("{code:?}"));
        if let Some(suppressed) = self.due(&kind, Instant::now()) {
            warn!(client = self.client, error = %error, reason, suppressed, "kafka client error");
        }
    }

    /// Counts `error` by client and librdkafka error code (`unknown` without one: the codes
    /// are a fixed set, so the label stays small).
    fn count(&self, error: &KafkaError) {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "unknown".to_string(), |code| format!("{code:?}"));
        crate::metrics::kafka_client_errors()
            .with_label_values(&[self.client, &code])
            .inc();
    }

    /// An error returned by a consumer poll: counted, and logged within the rate limit.
    pub fn consume_error(&self, error: &KafkaError) {
        self.count(error);
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| error.to_string(), |code| format!("poll {code:?}"));
        if let Some(suppressed) = self.due(&kind, Instant::now()) {
            warn!(client = self.client, error = %error, suppressed, "kafka consume error");
        }
    }

    /// A librdkafka log line (debug lines, asked for with the `debug` option, pass unlimited).
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let client = self.client;
        match level {
            RDKafkaLogLevel::Debug => {
                debug!(target: "librdkafka", client, facility, "{message}");
                return;
            }
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Notice => {
                info!(target: "librdkafka", client, facility, "{message}");
                return;
            }
            _ => {}
        }
        let Some(suppressed) = self.log_due(facility, message, Instant::now()) else {
            return;
        };
        if matches!(level, RDKafkaLogLevel::Warning) {
            warn!(target: "librdkafka", client, facility, suppressed, "{message}");
        } else {
            error!(target: "librdkafka", client, facility, suppressed, "{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_counted_by_client_and_code_even_when_not_logged() {
        use rdkafka::types::RDKafkaErrorCode;
        let log = ClientLog::new("counting test");
        let count = |code: &str| {
            crate::metrics::kafka_client_errors()
                .with_label_values(&["counting test", code])
                .get()
        };
        assert_eq!(count("AllBrokersDown"), 0, "present from the start");
        for _ in 0..3 {
            log.error(
                &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
                "all brokers down",
            );
        }
        log.consume_error(&KafkaError::Global(RDKafkaErrorCode::SSL));
        log.error(&KafkaError::Canceled, "no code");
        assert_eq!(
            count("AllBrokersDown"),
            3,
            "the repeats the log held back too"
        );
        assert_eq!(count("SSL"), 1);
        assert_eq!(count("unknown"), 1);
        let exported = crate::metrics::Metrics::new().render();
        assert!(exported.contains(
            "logbridge_kafka_client_errors_total{client=\"counting test\",code=\"AllBrokersDown\"} 3"
        ));
    }

    #[test]
    fn warnings_of_one_facility_are_limited_per_partition() {
        let log = ClientLog::new("test");
        let start = Instant::now();
        let line = |partition: i32| {
            format!("[thrd:main]: Topic logs [{partition}]: offset 17 out of range, resetting")
        };
        assert_eq!(log.log_due("OFFSET", &line(0), start), Some(0));
        for partition in 1..4 {
            assert_eq!(
                log.log_due("OFFSET", &line(partition), start),
                Some(0),
                "partition {partition}'s first warning must not be hidden behind partition 0's"
            );
        }
        assert_eq!(log.log_due("OFFSET", &line(2), start), None, "a repeat is");
        // A line naming no partition is limited per facility, as before.
        assert_eq!(log.log_due("OFFSET", "no partition here", start), Some(0));
        assert_eq!(log.log_due("OFFSET", "nor here", start), None);
    }

    #[test]
    fn partitions_are_found_in_librdkafka_lines() {
        let cases = [
            ("Topic logs [3]: offset reset", Some(("logs", 3))),
            (
                "[thrd:b:9092/1]: b:9092/1: logs.dlq [12]: MessageSet size 0",
                Some(("logs.dlq", 12)),
            ),
            ("[thrd:main]: all brokers down", None),
            ("logs [x]: not a number", None),
            ("ends in [", None),
        ];
        for (message, expected) in cases {
            assert_eq!(partition_in(message), expected, "{message}");
        }
    }

    #[test]
    fn the_kinds_per_partition_are_bounded() {
        let log = ClientLog::new("test");
        let start = Instant::now();
        for partition in 0..(MAX_KINDS as i32 * 4) {
            log.log_due("FETCH", &format!("Topic t [{partition}]: error"), start);
        }
        let remembered = log.seen.lock().map(|seen| seen.len()).unwrap_or(0);
        assert!(remembered <= MAX_KINDS + 1, "{remembered}");
        // Past the bound they share the facility's limit: a few lines, not thousands.
        let extra = (0..100)
            .filter(|n| {
                log.log_due("FETCH", &format!("Topic u [{n}]: error"), start)
                    .is_some()
            })
            .count();
        assert!(extra <= 1, "{extra}");
        // Once the old kinds are quiet for REPEAT_EVERY, new partitions get their own again.
        let later = start + REPEAT_EVERY;
        assert_eq!(log.log_due("FETCH", "Topic v [0]: error", later), Some(0));
    }

    #[test]
    fn a_repeated_kind_is_logged_once_per_interval_with_the_count_it_skipped() {
        let log = ClientLog::new("test");
        let start = Instant::now();
        assert_eq!(log.due("AllBrokersDown", start), Some(0));
        for n in 1..=40 {
            let at = start + Duration::from_millis(50 * n);
            assert_eq!(log.due("AllBrokersDown", at), None, "repeat {n}");
        }
        // Another kind is not held back by the first.
        assert_eq!(log.due("SSL", start + Duration::from_secs(1)), Some(0));
        assert_eq!(log.due("AllBrokersDown", start + REPEAT_EVERY), Some(40));
        assert_eq!(log.due("AllBrokersDown", start + REPEAT_EVERY), None);
        assert_eq!(log.due("AllBrokersDown", start + REPEAT_EVERY * 2), Some(1));
    }
}
