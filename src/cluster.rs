//! What the cluster itself says: a metadata probe that connects with the configured security
//! and tells apart "cannot reach", "authentication failed" and "topic missing". It serves
//! `check-config --connect` once, and readiness every `kafka.check_interval_ms` (a mistyped
//! topic or a rotated password must not read as ready).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Cluster;
use crate::subscription::{Matching, Resolved};

/// librdkafka's version and the features it was built with, e.g.
/// `librdkafka 2.12.1 (gzip,snappy,ssl,sasl,...,zstd)`.
pub fn librdkafka_description() -> String {
    let (_, version) = rdkafka::util::get_rdkafka_version();
    let features = ClientConfig::new()
        .create_native_config()
        .and_then(|native| native.get("builtin.features"))
        .unwrap_or_else(|err| format!("features unknown: {err}"));
    format!("librdkafka {version} ({features})")
}

/// Why a cluster cannot serve us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterProblem {
    /// No broker answered (down, wrong address, TLS handshake refused...).
    #[error("cannot reach the Kafka cluster at {brokers}: {reason}")]
    Unreachable {
        /// The bootstrap list tried.
        brokers: String,
        /// librdkafka's last word on it.
        reason: String,
    },
    /// A broker answered and refused the credentials.
    #[error("Kafka authentication failed at {brokers}: {reason}")]
    Authentication {
        /// The bootstrap list tried.
        brokers: String,
        /// librdkafka's last word on it.
        reason: String,
    },
    /// The cluster answered and does not have these topics.
    #[error("{}", missing_text(.0))]
    MissingTopics(Vec<String>),
}

fn missing_text(topics: &[String]) -> String {
    let (patterns, names): (Vec<&String>, Vec<&String>) = topics
        .iter()
        .partition(|topic| crate::subscription::is_pattern(topic));
    let quoted = |list: &[&String]| {
        list.iter()
            .map(|topic| format!("`{topic}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let names = match names.as_slice() {
        [] => None,
        // A cluster with ACLs leaves out of its answers what the principal may not describe:
        // "missing" may mean "hidden".
        [_] => Some(format!(
            "topic {} does not exist (or these credentials may not describe it)",
            quoted(&names)
        )),
        _ => Some(format!(
            "topics {} do not exist (or these credentials may not describe them)",
            quoted(&names)
        )),
    };
    let patterns = (!patterns.is_empty()).then(|| {
        format!(
            "no topic matches {} yet (or these credentials may not describe the topics that do)",
            quoted(&patterns)
        )
    });
    names
        .into_iter()
        .chain(patterns)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The errors librdkafka reported on the probe's handle since the check began: a metadata
/// request only says "transport failure", the error callback says why.
#[derive(Default)]
struct ProbeContext {
    errors: Mutex<Vec<(Option<RDKafkaErrorCode>, String)>>,
}

impl ProbeContext {
    fn take_errors(&self) -> Vec<(Option<RDKafkaErrorCode>, String)> {
        std::mem::take(&mut *self.errors.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, _level: RDKafkaLogLevel, _facility: &str, _message: &str) {
        // The error callback carries what matters; the probe's own log lines would repeat the
        // consumer's.
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() < 32 {
            errors.push((error.rdkafka_error_code(), reason.to_string()));
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _report: &rdkafka::message::DeliveryResult<'_>, _opaque: ()) {
        // The probe never produces.
    }
}

/// A client that asks the cluster for its topics. A producer handle, because its poll serves
/// the error callbacks (a consumer outside a group does not); it never produces.
pub struct Probe {
    client: BaseProducer<ProbeContext>,
    brokers: String,
    /// Secrets to scrub from librdkafka's messages.
    secrets: Vec<String>,
    /// The cause found by the last failed check that had one: while librdkafka backs off
    /// between reconnects, a check fails with only "all brokers down", and the refused
    /// credentials or certificate are still the reason.
    cause: Mutex<Option<ClusterProblem>>,
}

impl Probe {
    /// A probe of `cluster` (its security and options apply; no group is joined).
    pub fn new(cluster: Cluster<'_>, secrets: Vec<String>) -> anyhow::Result<Probe> {
        let mut config = ClientConfig::new();
        cluster.apply(&mut config);
        // Options meant for the consumer or producer of this cluster (group, fetch, linger)
        // only make this client log that it ignores them.
        config.set_log_level(RDKafkaLogLevel::Error);
        // Statistics asked for in `[kafka.options]` are the consumer's: the probe polls only
        // when it checks, one event at a time, so its statistics would pile up in its queue for
        // as long as logbridge runs (about 2.6 KiB a second, found by the soak).
        config.set("statistics.interval.ms", "0");
        let client = config
            .create_with_context(ProbeContext::default())
            .with_context(|| format!("cannot create a Kafka client for {}", cluster.brokers))?;
        Ok(Probe {
            client,
            brokers: cluster.brokers.to_string(),
            secrets,
            cause: Mutex::new(None),
        })
    }

    /// Every topic of the cluster the credentials may describe, with its partition count, or
    /// why the cluster could not be asked. Blocks for up to `timeout`. Asks for all topics'
    /// metadata, so that the question never makes a broker with `auto.create.topics.enable`
    /// create one.
    pub fn topics(&self, timeout: Duration) -> Result<BTreeMap<String, usize>, ClusterProblem> {
        // What earlier checks left behind is not about this one.
        self.client.poll(Duration::ZERO);
        self.client.context().take_errors();
        let metadata = match self.client.client().fetch_metadata(None, timeout) {
            Ok(metadata) => {
                *self.cause.lock().unwrap_or_else(PoisonError::into_inner) = None;
                metadata
            }
            Err(err) => return Err(self.problem(&err)),
        };
        Ok(metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none())
            .map(|topic| (topic.name().to_string(), topic.partitions().len()))
            .collect())
    }

    /// Partition counts of `topics` (absent: the topic does not exist), or why the cluster
    /// could not be asked. Blocks for up to `timeout`.
    pub fn partitions(
        &self,
        topics: &[&str],
        timeout: Duration,
    ) -> Result<BTreeMap<String, Option<usize>>, ClusterProblem> {
        let cluster = self.topics(timeout)?;
        Ok(topics
            .iter()
            .map(|topic| (topic.to_string(), cluster.get(*topic).copied()))
            .collect())
    }

    /// What each entry of `kafka.topics` (names and patterns, matched as `matching` says)
    /// stands for in the cluster, or why it could not be asked. Blocks for up to `timeout`.
    pub fn subscription(
        &self,
        entries: &[String],
        matching: Matching,
        timeout: Duration,
    ) -> Result<Vec<Resolved>, ClusterProblem> {
        let cluster = self.topics(timeout)?;
        Ok(crate::subscription::resolve(entries, &cluster, matching))
    }

    /// Checks `topics`: `Err` names the first thing wrong (cannot connect or authenticate,
    /// or the topics that do not exist).
    pub fn check(&self, topics: &[&str], timeout: Duration) -> Result<(), ClusterProblem> {
        let found = self.partitions(topics, timeout)?;
        let missing: Vec<String> = found
            .into_iter()
            .filter(|(_, count)| count.is_none())
            .map(|(topic, _)| topic)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ClusterProblem::MissingTopics(missing))
        }
    }

    fn problem(&self, err: &KafkaError) -> ClusterProblem {
        // Error callbacks are served by polling the handle (nothing else polls this one), and
        // the failure's own event may land just after the request gave up.
        let context = self.client.context();
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while context.errors.lock().is_ok_and(|errors| errors.is_empty())
            && std::time::Instant::now() < deadline
        {
            self.client.poll(Duration::from_millis(50));
        }
        self.client.poll(Duration::ZERO);
        let errors = context.take_errors();
        // The telling one: refused credentials or TLS first, "all brokers down" (which follows
        // every such failure) last.
        let refused = |code: &Option<RDKafkaErrorCode>, reason: &str| {
            code.is_some_and(is_authentication) || refused_certificate(reason)
        };
        let rank = |(code, reason): &(Option<RDKafkaErrorCode>, String)| match code {
            _ if refused(code, reason) => 0,
            Some(RDKafkaErrorCode::AllBrokersDown) => 2,
            _ => 1,
        };
        let last = errors.into_iter().min_by_key(rank);
        let mut cause = self.cause.lock().unwrap_or_else(PoisonError::into_inner);
        let telling = last.as_ref().is_some_and(|error| rank(error) < 2);
        if let (false, Some(known)) = (telling, cause.as_ref()) {
            return known.clone();
        }
        let brokers = self.brokers.clone();
        let scrub = |text: String| crate::config::scrub_secrets(&self.secrets, &text);
        let problem = match last {
            Some((code, reason)) if refused(&code, &reason) => ClusterProblem::Authentication {
                brokers,
                reason: scrub(reason),
            },
            Some((_, reason)) => ClusterProblem::Unreachable {
                brokers,
                reason: scrub(reason),
            },
            None => ClusterProblem::Unreachable {
                brokers,
                reason: scrub(err.to_string()),
            },
        };
        if telling {
            *cause = Some(problem.clone());
        }
        problem
    }
}

/// Whether librdkafka's `reason` is the broker ending the TLS handshake over this client's
/// certificate (mutual TLS: none given, or one the broker does not trust). Such an alert comes
/// as a transport or SSL error, yet it is a refusal of the credentials, like a wrong password.
fn refused_certificate(reason: &str) -> bool {
    const ALERTS: &[&str] = &[
        "alert bad certificate",
        "alert certificate required",
        "alert unknown ca",
        "alert certificate unknown",
        "alert access denied",
    ];
    let reason = reason.to_ascii_lowercase();
    ALERTS.iter().any(|alert| reason.contains(alert))
}

fn is_authentication(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

/// What the cluster check publishes: what is wrong (for `/readyz`), and what each entry of
/// `kafka.topics` stands for (for `/status`).
pub struct ClusterWatch {
    /// The problem the last check found, if any.
    pub problem: watch::Receiver<Option<ClusterProblem>>,
    /// The topics each entry stood for at the last check that reached the cluster.
    pub subscription: watch::Receiver<Vec<Resolved>>,
}

/// Checks the source cluster and `entries` (topics and patterns, matched as `matching` says)
/// every `interval` until `shutdown`, publishing the problem (or `None`; an entry that stands
/// for no topic is one) and what each entry stands for. Each change of the problem is logged
/// once, and each change of the topics a pattern matches.
pub fn watch(
    probe: Probe,
    entries: Vec<String>,
    matching: Matching,
    interval: Duration,
    shutdown: CancellationToken,
) -> (ClusterWatch, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let (subscription_tx, subscription_rx) = watch::channel(Vec::new());
    let probe = Arc::new(probe);
    // A check must end before the next is due, and within the time a broker takes to answer.
    let timeout = interval.min(Duration::from_secs(10));
    let task = tokio::spawn(async move {
        loop {
            let probe = probe.clone();
            let asked = entries.clone();
            let checked =
                tokio::task::spawn_blocking(move || probe.subscription(&asked, matching, timeout));
            let outcome = tokio::select! {
                outcome = checked => outcome,
                () = shutdown.cancelled() => return,
            };
            let problem = match outcome {
                Ok(Ok(resolved)) => {
                    let missing: Vec<String> = resolved
                        .iter()
                        .filter(|entry| entry.topics.is_empty())
                        .map(|entry| entry.entry.clone())
                        .collect();
                    subscription_tx.send_if_modified(|current| {
                        if *current == resolved {
                            return false;
                        }
                        for entry in resolved.iter().filter(|entry| entry.pattern) {
                            let topics: Vec<&String> = entry.topics.keys().collect();
                            info!(pattern = %entry.entry, ?topics, "topics matching the pattern");
                        }
                        *current = resolved;
                        true
                    });
                    (!missing.is_empty()).then_some(ClusterProblem::MissingTopics(missing))
                }
                Ok(Err(problem)) => Some(problem),
                // The check panicked: say so rather than keep an old answer.
                Err(err) => Some(ClusterProblem::Unreachable {
                    brokers: String::new(),
                    reason: format!("the cluster check failed: {err}"),
                }),
            };
            tx.send_if_modified(|current| {
                if *current == problem {
                    return false;
                }
                match &problem {
                    Some(problem) => warn!(%problem, "cluster check failed"),
                    None => info!("cluster check passed"),
                }
                *current = problem;
                true
            });
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    });
    (
        ClusterWatch {
            problem: rx,
            subscription: subscription_rx,
        },
        task,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use std::collections::BTreeMap as Map;

    fn cluster(brokers: &str) -> Cluster<'_> {
        static NO_OPTIONS: Map<String, crate::config::OptionValue> = Map::new();
        Cluster {
            brokers,
            security: None,
            options: &NO_OPTIONS,
        }
    }

    /// Events the probe's client holds for a poll that has not come (librdkafka's main queue).
    fn queued_events(probe: &Probe) -> usize {
        let native = probe.client.client().native_ptr();
        // SAFETY: the client outlives these calls; the queue reference taken is given back.
        unsafe {
            let queue = rdkafka::bindings::rd_kafka_queue_get_main(native);
            let length = rdkafka::bindings::rd_kafka_queue_length(queue);
            rdkafka::bindings::rd_kafka_queue_destroy(queue);
            length
        }
    }

    /// Issue 34, item 1 (found by the soak): the probe polls only when it checks (every
    /// `check_interval_ms`), one event per poll, so librdkafka's statistics, asked for the
    /// consumer in `[kafka.options]` and applied to the probe with the rest, piled up in its
    /// queue: about 2.6 KiB a second, for as long as logbridge ran.
    #[test]
    fn the_probe_collects_no_statistics_nobody_reads() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("logs", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let options: Map<String, crate::config::OptionValue> = [(
            "statistics.interval.ms".to_string(),
            crate::config::OptionValue::Text("100".to_string()),
        )]
        .into_iter()
        .collect();
        let probe = Probe::new(
            Cluster {
                brokers: &brokers,
                security: None,
                options: &options,
            },
            Vec::new(),
        )
        .expect("probe");
        probe
            .check(&["logs"], Duration::from_secs(10))
            .expect("the topic is there");
        std::thread::sleep(Duration::from_millis(1_500));
        probe
            .check(&["logs"], Duration::from_secs(10))
            .expect("the topic is there");
        let queued = queued_events(&probe);
        assert!(queued <= 1, "{queued} events wait in the probe's queue");
    }

    #[test]
    fn topics_are_counted_and_missing_ones_named() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("logs", 3, 1).expect("topic");
        mock.create_topic("other", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let probe = Probe::new(cluster(&brokers), Vec::new()).expect("probe");
        let found = probe
            .partitions(&["logs", "typo"], Duration::from_secs(10))
            .expect("metadata");
        assert_eq!(found.get("logs"), Some(&Some(3)));
        assert_eq!(found.get("typo"), Some(&None));
        assert_eq!(
            probe.check(&["logs", "typo", "gone"], Duration::from_secs(10)),
            Err(ClusterProblem::MissingTopics(vec![
                "gone".to_string(),
                "typo".to_string()
            ]))
        );
        assert_eq!(
            ClusterProblem::MissingTopics(vec!["typo".to_string()]).to_string(),
            "topic `typo` does not exist (or these credentials may not describe it)"
        );
        assert_eq!(
            probe.check(&["logs", "other"], Duration::from_secs(10)),
            Ok(())
        );
    }

    #[test]
    fn a_client_certificate_the_broker_refuses_is_an_authentication_failure() {
        // What librdkafka reported against Apache Kafka requiring a client certificate
        // (tests/secured.rs): without one, and with one another CA signed.
        let seen = "ssl://127.0.0.1:40123/bootstrap: SSL handshake failed: ssl/tls alert bad \
                    certificate: SSL alert number 42 (after 3ms in state SSL_HANDSHAKE)";
        assert!(refused_certificate(seen));
        assert!(refused_certificate("tlsv13 alert certificate required"));
        // The client not trusting the broker is not the broker refusing the client.
        assert!(!refused_certificate(
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"
        ));
        assert!(!refused_certificate("Connection refused"));
    }

    #[test]
    fn a_cluster_nobody_answers_for_is_unreachable() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let brokers = format!("127.0.0.1:{port}");
        let probe = Probe::new(cluster(&brokers), Vec::new()).expect("probe");
        match probe.check(&["logs"], Duration::from_secs(2)) {
            Err(ClusterProblem::Unreachable { brokers: at, .. }) => assert_eq!(at, brokers),
            other => panic!("expected unreachable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_watch_reports_a_topic_once_it_is_missing_and_clears_when_created() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("logs", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let probe = Probe::new(cluster(&brokers), Vec::new()).expect("probe");
        let shutdown = CancellationToken::new();
        let (mut watched, task) = watch(
            probe,
            vec!["logs".to_string(), "later".to_string()],
            Matching::Search,
            Duration::from_millis(200),
            shutdown.clone(),
        );
        let missing = Some(ClusterProblem::MissingTopics(vec!["later".to_string()]));
        let rx = &mut watched.problem;
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| *p == missing))
            .await
            .expect("reported in time")
            .expect("watch alive");
        mock.create_topic("later", 1, 1).expect("topic");
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_none))
            .await
            .expect("cleared in time")
            .expect("watch alive");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
    }

    /// A pattern that matches nothing yet is a problem until a topic it matches is created;
    /// the topics it matches are published for `/status`.
    #[tokio::test]
    async fn the_watch_lists_what_a_pattern_matches_and_waits_for_a_first_match() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("logs", 2, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let probe = Probe::new(cluster(&brokers), Vec::new()).expect("probe");
        let shutdown = CancellationToken::new();
        let (mut watched, task) = watch(
            probe,
            vec!["logs".to_string(), "^app-.*".to_string()],
            Matching::Search,
            Duration::from_millis(200),
            shutdown.clone(),
        );
        let missing = Some(ClusterProblem::MissingTopics(vec!["^app-.*".to_string()]));
        tokio::time::timeout(
            Duration::from_secs(20),
            watched.problem.wait_for(|p| *p == missing),
        )
        .await
        .expect("reported in time")
        .expect("watch alive");
        assert_eq!(
            missing.map(|problem| problem.to_string()).as_deref(),
            Some(
                "no topic matches `^app-.*` yet (or these credentials may not describe the \
                 topics that do)"
            )
        );
        mock.create_topic("app-a", 3, 1).expect("topic");
        mock.create_topic("app-b", 1, 1).expect("topic");
        let listed = tokio::time::timeout(
            Duration::from_secs(20),
            watched
                .subscription
                .wait_for(|resolved| resolved.get(1).is_some_and(|entry| entry.topics.len() == 2)),
        )
        .await
        .expect("listed in time")
        .expect("watch alive")
        .clone();
        assert_eq!(listed[0].topics.get("logs"), Some(&2));
        assert!(listed[1].pattern);
        assert_eq!(listed[1].topics.get("app-a"), Some(&3));
        assert_eq!(listed[1].topics.get("app-b"), Some(&1));
        tokio::time::timeout(
            Duration::from_secs(20),
            watched.problem.wait_for(Option::is_none),
        )
        .await
        .expect("cleared in time")
        .expect("watch alive");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
    }

    #[test]
    fn missing_names_and_unmatched_patterns_are_told_apart() {
        let problem = ClusterProblem::MissingTopics(vec![
            "typo".to_string(),
            "^a-.*".to_string(),
            "gone".to_string(),
        ]);
        assert_eq!(
            problem.to_string(),
            "topics `typo`, `gone` do not exist (or these credentials may not describe them); \
             no topic matches `^a-.*` yet (or these credentials may not describe the topics \
             that do)"
        );
    }
}
