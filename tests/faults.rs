//! The fault matrix: conditions a deployment meets together, each combination asserted on what a
//! separate client reads back (committed offsets) and on what the sinks wrote (every event id).
//!
//! Rebalances while partitions are paused, for every group protocol (classic eager, classic
//! cooperative, KIP-848 `consumer`): partitions paused by backpressure (a slow sink) or by the
//! dead-letter breaker are revoked, moved to another instance, and given back to the same
//! instance. librdkafka keeps an application pause across revoke and re-assignment (librdkafka
//! #1849), so a partition given back must be made fetchable again; every partition must be read
//! again and committed to the end, and nothing lost.
//!
//! Brokers. The rebalance tests, the large-event tests and the offset reset run on Apache
//! Kafka (this binary's shared broker, a topic and group of their own each). These stay on
//! librdkafka's mock cluster because they need fault injection only the mock offers: a broker
//! taken down on demand (the unread partition, the coordinator lost), produce and commit
//! requests answered with chosen errors (the dead-letter topic refusing writes, produce and
//! commit errors, the failing destination during rebalances). The rest (a panicking worker,
//! stdout blocked at SIGTERM, the uncommitted bound, tombstones and unrouted events) test the
//! pipeline, not the broker, and use the mock for speed.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::{HttpBind, RunOptions};

const PARTITIONS: i32 = 6;

#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// Classic, eager (`range`).
    Eager,
    /// Classic, incremental (`cooperative-sticky`).
    Cooperative,
    /// KIP-848's `consumer` protocol (incremental; the broker assigns). Apache Kafka only.
    Consumer,
}

impl Protocol {
    /// Its `[kafka.options]` lines.
    fn option(self) -> String {
        protocol_options(match self {
            Protocol::Eager => "range",
            Protocol::Cooperative => "cooperative-sticky",
            Protocol::Consumer => "consumer",
        })
    }
}

/// Why instance A's partitions are paused when the rebalances come.
#[derive(Clone, Copy, Debug)]
enum PausedBy {
    /// A slow sink: the router channel is full.
    Backpressure,
    /// The dead-letter breaker tripped on a run of malformed records.
    Breaker,
}

fn config(
    kafka: &Kafka,
    group: &str,
    protocol: Protocol,
    paused_by: PausedBy,
    out: &Path,
) -> logbridge::Config {
    let breaker = match paused_by {
        PausedBy::Backpressure => "[breaker]\nenabled = false\n",
        PausedBy::Breaker => {
            "[breaker]\nmax_consecutive = 20\nwindow = 100000\nmax_invalid_ratio = 1.0\n\
             [http]\nadmin_token = \"faults-admin-token-0123456789\"\n"
        }
    };
    let text = format!(
        r#"{kafka}
[pipeline]
router_capacity = 16
worker_capacity = 8
pause_after_ms = 0
commit_interval_ms = 200
drain_timeout_ms = 2000

{breaker}
{routes}"#,
        kafka = kafka_section(
            &kafka.brokers,
            group,
            &kafka.topic,
            &format!("{}\"statistics.interval.ms\" = 1000", protocol.option())
        ),
        routes = file_route("all", "[\"info\", \"error\"]", 2, out),
    );
    logbridge::Config::from_toml_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"))
}

/// Produces `count` valid events (ids 0..count) spread over every partition by key.
async fn produce_valid(kafka: &Kafka, count: u64) {
    let records: Vec<(Option<String>, Vec<u8>)> = (0..count)
        .map(|id| (Some(format!("key-{}", id % 97)), event(id, "info")))
        .collect();
    kafka.produce(&records).await;
}

/// The breaker's `max_consecutive` in these tests.
const BREAKER_RUN: usize = 20;

/// Malformed records before any valid one: enough to trip the breaker, too few to trip it again
/// once it is reset.
async fn produce_malformed(kafka: &Kafka) {
    let records: Vec<(Option<String>, Vec<u8>)> = (0..BREAKER_RUN + 5)
        .map(|n| (Some(format!("bad-{n}")), b"not json".to_vec()))
        .collect();
    kafka.produce(&records).await;
}

/// `count` events (ids from 0, level info), each with a key of its own.
fn keyed_events(count: u64) -> Vec<(Option<String>, Vec<u8>)> {
    (0..count)
        .map(|id| (Some(format!("key-{id}")), event(id, "info")))
        .collect()
}

/// Starts `config` with its file sinks slowed by `delay` per batch and HTTP on a free port,
/// and waits until it has read more than 100 records.
async fn start_reading(
    config: logbridge::Config,
    delay: Duration,
    metrics: &Arc<Metrics>,
) -> (Running, std::net::SocketAddr) {
    let started = Running::start_serving(
        config,
        RunOptions {
            sink_factory: delayed_sinks(delay, 0..=0),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
    )
    .await;
    let reading = wait_for(Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move { consumed_total(&metrics) > 100 }
    })
    .await;
    assert!(reading, "the pipeline never read");
    started
}

/// Every event id the sink files under `dirs` hold.
fn ids_written(dirs: &[&Path]) -> HashSet<u64> {
    let files: Vec<_> = dirs.iter().map(|dir| dir.join("all.jsonl")).collect();
    id_counts(&read_lines(&files)).into_keys().collect()
}

async fn paused_partitions_survive_rebalances(protocol: Protocol, paused_by: PausedBy) {
    let kafka = Kafka::shared("logs", PARTITIONS).await;
    let count = 3_000u64;
    match paused_by {
        PausedBy::Backpressure => produce_valid(&kafka, count).await,
        // The valid events come once the breaker has tripped (below).
        PausedBy::Breaker => produce_malformed(&kafka).await,
    }
    let group = unique("paused-rebalance");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );

    // A: a slow sink (backpressure pauses partitions at once), or the breaker tripping.
    let metrics_a = Arc::new(Metrics::new());
    let sink_delay = match paused_by {
        PausedBy::Backpressure => Duration::from_millis(100),
        PausedBy::Breaker => Duration::ZERO,
    };
    let (a, address_a) = Running::start_serving(
        config(&kafka, &group, protocol, paused_by, dir_a.path()),
        RunOptions {
            sink_factory: delayed_sinks(sink_delay, 0..=0),
            metrics: metrics_a.clone(),
            http: HttpBind::Disabled,
        },
    )
    .await;
    let paused = wait_for(Duration::from_secs(30), || {
        let metrics = metrics_a.clone();
        async move {
            metrics.assigned_partitions.get() == i64::from(PARTITIONS) && metrics.paused_total() > 0
        }
    })
    .await;
    assert!(paused, "A never paused a partition ({paused_by:?})");
    if let PausedBy::Breaker = paused_by {
        assert_eq!(metrics_a.breaker_tripped.get(), 1, "the breaker tripped");
        produce_valid(&kafka, count).await;
    }
    let end = kafka.end_offsets();

    // B joins (partitions move to another process), then leaves (they come back to A).
    let metrics_b = Arc::new(Metrics::new());
    let b = Running::without_http(
        config(
            &kafka,
            &group,
            protocol,
            PausedBy::Backpressure,
            dir_b.path(),
        ),
        &metrics_b,
    );
    let moved = wait_for(Duration::from_secs(60), || {
        let metrics = metrics_b.clone();
        async move { metrics.assigned_partitions.get() > 0 }
    })
    .await;
    assert!(moved, "B never got partitions ({protocol:?})");
    // B's partitions came from A (one group): A revoked before B was given them.
    assert!(
        metrics_a.rebalances.with_label_values(&["revoke"]).get() > 0,
        "A gave no partition up, so B is not in A's group ({protocol:?})"
    );
    // B reads some of what it got before it leaves.
    let b_read = wait_for(Duration::from_secs(30), || {
        let metrics = metrics_b.clone();
        async move { consumed_total(&metrics) > 0 }
    })
    .await;
    b.stop().await;
    assert!(
        b_read,
        "B never read ({protocol:?}, paused by {paused_by:?})"
    );
    let back = wait_for(Duration::from_secs(60), || {
        let metrics = metrics_a.clone();
        async move { metrics.assigned_partitions.get() == i64::from(PARTITIONS) }
    })
    .await;
    assert!(back, "A never got every partition back ({protocol:?})");

    if let PausedBy::Breaker = paused_by {
        // The breaker holds every partition, including the ones given back, until reset.
        let held = wait_for(Duration::from_secs(10), || {
            let metrics = metrics_a.clone();
            async move { metrics.paused_total() == i64::from(PARTITIONS) }
        })
        .await;
        assert!(
            held,
            "the breaker holds every partition across the rebalances: {} paused",
            metrics_a.paused_total()
        );
        let (status, _) = http_request(
            address_a,
            "POST /resume HTTP/1.0\r\nHost: t\r\nAuthorization: Bearer faults-admin-token-0123456789\r\n\r\n",
        )
        .await;
        assert_eq!(status, 202, "resume accepted");
    }

    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(90))
        .await;
    let committed = kafka.committed(&group);
    let (paused_a, tripped_a) = (metrics_a.paused_total(), metrics_a.breaker_tripped.get());
    a.stop().await;
    assert!(
        done,
        "{protocol:?}, paused by {paused_by:?}: partitions not read to the end after the \
         rebalances: committed {committed:?}, end {end:?}, A paused {paused_a}, breaker \
         tripped {tripped_a}"
    );
    let written = ids_written(&[dir_a.path(), dir_b.path()]);
    let lost: Vec<u64> = (0..count).filter(|id| !written.contains(id)).collect();
    println!(
        "{protocol:?}/{paused_by:?}: {} of {count} ids written, A pauses {}, resumes {}, rebalances assign {}",
        written.len(),
        metrics_a.pauses_total(),
        metrics_a.resumes.get(),
        metrics_a.rebalances.with_label_values(&["assign"]).get()
    );
    assert!(
        lost.is_empty(),
        "lost {} ids, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_rebalance_while_paused_by_backpressure() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Eager, PausedBy::Backpressure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_rebalance_while_paused_by_backpressure() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Cooperative, PausedBy::Backpressure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_rebalance_while_paused_by_the_breaker() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Eager, PausedBy::Breaker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_rebalance_while_paused_by_the_breaker() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Cooperative, PausedBy::Breaker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_protocol_rebalance_while_paused_by_backpressure() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Consumer, PausedBy::Backpressure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_protocol_rebalance_while_paused_by_the_breaker() {
    let _pair = two_at_a_time().await;
    paused_partitions_survive_rebalances(Protocol::Consumer, PausedBy::Breaker).await;
}

/// A partition whose leader is down cannot be fetched: nothing of it is in flight, so no commit
/// is waiting, yet it is behind. Readiness must say so (naming the partition) until it is read
/// again, and then everything is committed to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_partition_without_records_in_flight_fails_readiness() {
    let _pair = two_at_a_time().await;
    // Partition 1 is led by broker 2, the group coordinated by broker 1.
    let kafka = Kafka::start_brokers("logs", 2, 2);
    let cluster = kafka.cluster.as_ref().expect("mock cluster");
    cluster
        .partition_leader("logs", 0, Some(1))
        .expect("leader of 0");
    cluster
        .partition_leader("logs", 1, Some(2))
        .expect("leader of 1");
    kafka.produce(&keyed_events(2_000)).await;
    let end = kafka.end_offsets();
    let group = unique("unread");
    cluster
        .coordinator(rdkafka::mocking::MockCoordinator::Group(group.clone()), 1)
        .expect("coordinator");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(
        &group,
        "router_capacity = 4\nworker_capacity = 4\npause_after_ms = 0\nstall_timeout_ms = 2000",
        &file_route("all", "[\"info\"]", 1, dir.path()),
    );
    let metrics = Arc::new(Metrics::new());
    let (running, address) = start_reading(config, Duration::from_millis(20), &metrics).await;
    // Partition 1 must have been read once: a partition whose leader went down before its first
    // fetch has no known position or end, so nothing says it is behind. (The consumer takes a
    // poll burst at once, so "100 records read" may all be partition 0's.)
    let out = dir.path().join("all.jsonl");
    let read_one = wait_for(Duration::from_secs(30), || {
        let out = out.clone();
        async move {
            read_lines(&[out])
                .iter()
                .any(|line| line["partition"].as_i64() == Some(1))
        }
    })
    .await;
    assert!(read_one, "partition 1 was never read");
    cluster
        .broker_down(2)
        .expect("partition 1's leader goes down");

    let stalled = wait_for(Duration::from_secs(30), || async move {
        let (status, body) = http_get(address, "/readyz").await;
        status == 503 && body.contains("partition logs/1 stalled: not read for")
    })
    .await;
    let (_, body) = http_get(address, "/readyz").await;
    let (_, status_page) = http_get(address, "/status").await;
    assert!(
        stalled,
        "readiness never named the unread partition: {body}"
    );
    assert!(
        !body.contains("records waiting"),
        "nothing of the partition is in flight, yet: {body}"
    );
    assert!(
        status_page.contains("not read for"),
        "/status: {status_page}"
    );
    assert_eq!(
        metrics
            .stalled_partitions
            .with_label_values(&["unread"])
            .get(),
        1
    );
    assert!(
        kafka.committed(&group)[1] < end[1],
        "partition 1 is really behind"
    );

    cluster
        .broker_up(2)
        .expect("partition 1's leader comes back");
    recovers(&kafka, &group, &end, address, running).await;
}

/// After a fault cleared: every partition is committed to `end` and readiness is back; then the
/// pipeline stops cleanly.
async fn recovers(
    kafka: &Kafka,
    group: &str,
    end: &[i64],
    address: std::net::SocketAddr,
    running: Running,
) {
    let done = kafka
        .wait_committed_to(group, end, Duration::from_secs(60))
        .await;
    let ready = wait_for(Duration::from_secs(10), || async move {
        http_get(address, "/readyz").await.0 == 200
    })
    .await;
    running.stop().await;
    assert!(
        done,
        "not committed to the end: {:?}",
        kafka.committed(group)
    );
    assert!(ready, "readiness did not recover");
}

/// A sink that panics on the record whose payload contains `boom`, and delivers the rest to
/// the configured sink.
fn panicking_sinks() -> logbridge::sink::SinkFactory {
    let inner = logbridge::sink::config_sink_factory();
    Arc::new(move |route, index, links| {
        Ok(Box::new(Panicking {
            inner: inner(route, index, links)?,
        }) as Box<dyn logbridge::sink::Sink>)
    })
}

struct Panicking {
    inner: Box<dyn logbridge::sink::Sink>,
}

impl logbridge::sink::Sink for Panicking {
    fn deliver<'a>(
        &'a mut self,
        route: &'a str,
        batch: &'a [logbridge::record::Record],
    ) -> logbridge::sink::DeliveryFuture<'a> {
        let poisoned = batch.iter().any(|record| {
            record
                .payload()
                .is_some_and(|payload| String::from_utf8_lossy(payload).contains("boom"))
        });
        if poisoned {
            panic!("the sink hit a poisoned record");
        }
        self.inner.deliver(route, batch)
    }
}

/// A worker that panics stops the pipeline: it stops fetching, commits exactly what finished
/// (nothing past the record the dead worker held), and `run` ends in an error naming the panic,
/// so that the process exits non-zero and is restarted. It never keeps consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_stops_the_pipeline_and_commits_what_finished() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::start("logs", 1);
    // One partition, one worker: records 0..300 fine, 300 poisoned, then 300 more.
    let records: Vec<(Option<String>, Vec<u8>)> = (0..601u64)
        .map(|id| {
            let mut payload = event(id, "info");
            if id == 300 {
                payload = serde_json::json!({"id": id, "level": "info", "message": "boom"})
                    .to_string()
                    .into_bytes();
            }
            (Some("same-key".to_string()), payload)
        })
        .collect();
    kafka.produce(&records).await;
    let group = unique("panic");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(
        &group,
        "router_capacity = 8\nworker_capacity = 4\ndrain_timeout_ms = 1000",
        &file_route("all", "[\"info\"]", 1, dir.path()),
    );
    let metrics = Arc::new(Metrics::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(logbridge::run(
        config,
        RunOptions {
            sink_factory: panicking_sinks(),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
        shutdown.clone(),
    ));
    // Nobody cancels `shutdown`: the pipeline must stop by itself.
    let outcome = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the pipeline stopped by itself")
        .expect("joined");
    let err = outcome.expect_err("a panicked worker ends the run in an error");
    let text = format!("{err:#}");
    assert!(
        text.contains("worker panicked: the sink hit a poisoned record"),
        "{text}"
    );
    // Every record before the poisoned one was delivered (the worker takes batches of up to
    // 4 records, so the poisoned batch may have begun a little before it) and committed;
    // nothing at or past it.
    let committed = kafka.committed(&group)[0];
    let written = ids_written(&[dir.path()]);
    println!(
        "panicking worker: committed {committed}, {} ids written, consumed {}",
        written.len(),
        metrics.consumed.with_label_values(&["logs"]).get()
    );
    assert!(
        committed <= 300,
        "committed past the poisoned record: {committed}"
    );
    assert!(
        committed >= 296,
        "what finished before the poisoned batch is committed: {committed}"
    );
    assert!((0..committed as u64).all(|id| written.contains(&id)));
    assert!(
        written.iter().all(|id| *id < 300),
        "nothing after the poisoned record delivered"
    );
}

/// A stdout sink blocked on a full pipe (nobody reads it) must not hang shutdown: on SIGTERM
/// the process exits within the drain timeout plus a few seconds, non-zero because it had to
/// abandon work, and says so in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_stdout_blocked_on_a_full_pipe_exits_non_zero_in_time() {
    let _pair = two_at_a_time().await;
    use common::process::{Logbridge, HTTP_LISTEN};
    let kafka = Kafka::start("logs", 2);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..5_000u64)
        .map(|id| {
            let mut payload =
                serde_json::json!({"id": id, "level": "info", "message": "x".repeat(900)});
            payload["service"] = "stdout".into();
            (Some(format!("key-{id}")), payload.to_string().into_bytes())
        })
        .collect();
    kafka.produce(&records).await;
    let work = tempfile::tempdir().expect("dir");
    let config = work.path().join("stdout.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[pipeline]\ndrain_timeout_ms = 2000\ncommit_interval_ms = 200\n[http]\nlisten = \"{HTTP_LISTEN}\"\n[[routes]]\nname = \"all\"\nlevels = [\"info\"]\nsink = {{ type = \"stdout\" }}\n",
            kafka_section(&kafka.brokers, &unique("stdout"), &kafka.topic, "")
        ),
    )
    .expect("config");
    let log = work.path().join("stdout.log");
    // A pipe whose reading end is kept open and never read: the first 64 KiB fit, then every
    // write blocks.
    let mut child =
        Logbridge::start_with_stdout(&config, log.clone(), std::process::Stdio::piped());
    let blocked = wait_for(Duration::from_secs(60), || {
        let child = &child;
        async move {
            child
                .metric("logbridge_events_consumed_total")
                .await
                .is_some_and(|consumed| consumed > 500.0)
        }
    })
    .await;
    assert!(blocked, "logbridge never consumed");
    // The writers blocked: the pipe full (within a write of atomic size of its capacity).
    let full = wait_for(Duration::from_secs(30), || {
        std::future::ready(
            child
                .stdout_pipe()
                .is_some_and(|(waiting, capacity)| waiting + libc::PIPE_BUF > capacity),
        )
    })
    .await;
    assert!(full, "stdout never filled: {:?}", child.stdout_pipe());
    let (status, took) = child.terminate(Duration::from_secs(30));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    println!("stdout blocked: SIGTERM to exit {took:?}, status {status:?}");
    let status = status
        .unwrap_or_else(|| panic!("logbridge did not exit within 30 s of SIGTERM:\n{log_text}"));
    assert!(
        !status.success(),
        "abandoned work must exit non-zero: {status}"
    );
    assert!(
        log_text.contains("abandoned") || log_text.contains("aborted"),
        "the log says what was abandoned:\n{log_text}"
    );
}

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// The dead-letter topic refuses writes (authorization error injected on its cluster): the
/// failed records are kept and retried with backoff, nothing is committed past them, readiness
/// names the topic and the reason, memory stays within the pipeline's bound; when the fault
/// clears every dead letter arrives whole (value kept) and every valid event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_refusing_writes_holds_commits_says_why_and_recovers() {
    let _pair = two_at_a_time().await;
    let source = Kafka::start("logs", 2);
    let dlq = Kafka::start("logs.dlq", 1);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..1_000u64)
        .map(|id| {
            let payload = if id % 20 == 7 {
                format!("not json {id}").into_bytes()
            } else {
                event(id, "info")
            };
            (Some(format!("key-{id}")), payload)
        })
        .collect();
    source.produce(&records).await;
    let end = source.end_offsets();
    let dlq_cluster = dlq.cluster.as_ref().expect("mock");
    dlq_cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 100_000],
    );
    let group = unique("dlq-refuses");
    let dir = tempfile::tempdir().expect("dir");
    let routes = format!(
        "{}\n[dead_letter]\ntopic = \"logs.dlq\"\nbrokers = \"{}\"\n[breaker]\nenabled = false\n",
        file_route("all", "[\"info\"]", 2, dir.path()),
        dlq.brokers
    );
    let config = source.config(&group, "router_capacity = 32\nworker_capacity = 8", &routes);
    // The README's record bound ("Memory"), from this test's literals, not from the code under
    // test: `router_capacity + min(router_capacity, 256) + Σ workers × (worker_capacity + s × b)
    // + max(2, ⌈router_capacity / 64⌉) × b` with `b = min(worker_capacity, 256)` and `s = 1` for
    // a file route, plus with a dead-letter topic `worker_capacity + min(worker_capacity, 64)`:
    // 32 + 32 + 2 × (8 + 8) + max(2, 1) × 8 + (8 + 8) = 128. (With 112, without the dead-letter
    // term, a CI run saw 118: the letters waiting for the refusing topic were not counted.)
    let bound: i64 = 128;
    let metrics = Arc::new(Metrics::new());
    let (running, address) = Running::start_serving(
        config,
        RunOptions {
            metrics: metrics.clone(),
            ..RunOptions::default()
        },
    )
    .await;
    let says_why = wait_for(Duration::from_secs(30), || async move {
        let (status, body) = http_get(address, "/readyz").await;
        status == 503 && body.contains("dead-letter topic logs.dlq refuses writes")
    })
    .await;
    let (_, readyz) = http_get(address, "/readyz").await;
    assert!(
        says_why,
        "readiness does not name the dead-letter topic: {readyz}"
    );
    assert!(
        readyz.contains("uthorization"),
        "the reason is given: {readyz}"
    );
    assert_eq!(metrics.dead_letter_failing.get(), 1);
    // Held back: the first malformed record of each partition blocks its commit, and the
    // pipeline holds no more than its bound however long the fault lasts.
    let mut max_in_flight = 0;
    for _ in 0..20 {
        max_in_flight = max_in_flight.max(metrics.in_flight.get());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed = source.committed(&group);
    assert!(
        committed.iter().zip(&end).all(|(done, end)| done < end),
        "nothing is committed past a dead letter that is not parked: {committed:?} of {end:?}"
    );
    assert!(
        max_in_flight <= bound,
        "in flight {max_in_flight} > bound {bound}"
    );
    assert!(metrics.dead_letter_errors.get() > 0);

    dlq_cluster.clear_request_errors(RDKafkaApiKey::Produce);
    recovers(&source, &group, &end, address, running).await;
    assert_eq!(metrics.dead_letter_failing.get(), 0);
    let parked = dlq.read_all("logs.dlq");
    let parked_keys: HashSet<String> = parked
        .iter()
        .map(|record| {
            let payload = record.payload.as_deref().expect("the value is kept");
            assert!(payload.starts_with(b"not json"), "the original value");
            assert_eq!(record.header("logbridge.error.value_dropped"), None);
            String::from_utf8(record.key.clone().expect("key")).expect("utf-8")
        })
        .collect();
    let expected: HashSet<String> = (0..1_000u64)
        .filter(|id| id % 20 == 7)
        .map(|id| format!("key-{id}"))
        .collect();
    assert!(expected.is_subset(&parked_keys), "every dead letter parked");
    let written = ids_written(&[dir.path()]);
    let missing = (0..1_000u64)
        .filter(|id| id % 20 != 7 && !written.contains(id))
        .count();
    assert_eq!(missing, 0, "every valid event delivered");
}

/// Produce errors on the output cluster and commit errors on the source cluster at once, with
/// a Kafka sink: nothing is lost, the records of each key reach the output topic in order (the
/// first copy of each record comes after the first copy of every earlier record of its key),
/// and once the faults clear everything is committed.
///
/// The sink's producer is not idempotent here, with one request in flight: librdkafka's mock
/// cluster does not check an idempotent producer's sequence numbers unless it is
/// transactional, while librdkafka infers from a later batch's success that an earlier batch
/// whose fate was uncertain (timed out in flight) was persisted ("implicit ack"). A real broker
/// refuses the later batch out of sequence, which makes that inference hold; the mock appends
/// it, so with idempotence on, the mock can lose records that librdkafka reports delivered.
/// (Seen here: 2 or 3 of 4 000 under load.) Without idempotence librdkafka never infers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_commit_errors_lose_nothing_and_keep_per_key_order() {
    let _pair = two_at_a_time().await;
    failing_destination(None).await;
}

/// The same failing destination and failing commits, together with backpressure (small
/// channels, no wait before pausing) and rebalances: a second instance joins while the first
/// is retrying, takes partitions, reads, and leaves again (its drain may be cut short by the
/// retries). Nothing is lost and the last copies of each key stay in order across the two
/// instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_under_backpressure_during_eager_rebalances() {
    let _pair = two_at_a_time().await;
    failing_destination(Some(Protocol::Eager)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_under_backpressure_during_cooperative_rebalances() {
    let _pair = two_at_a_time().await;
    failing_destination(Some(Protocol::Cooperative)).await;
}

/// See `produce_and_commit_errors_lose_nothing_and_keep_per_key_order`; with `rebalance`, a
/// second instance comes and goes under that protocol while the errors last.
async fn failing_destination(rebalance: Option<Protocol>) {
    if let Ok(filter) = std::env::var("FAULTS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .try_init();
    }
    let source = Kafka::start("logs", 4);
    let output = Kafka::start("out", 4);
    let count = 4_000u64;
    let records: Vec<(Option<String>, Vec<u8>)> = (0..count)
        .map(|id| (Some(format!("key-{}", id % 50)), event(id, "info")))
        .collect();
    let placed = source.produce(&records).await;
    let end = source.end_offsets();
    let output_cluster = output.cluster.as_ref().expect("mock");
    let source_cluster = source.cluster.as_ref().expect("mock");
    // Retriable produce errors: librdkafka retries them itself, and those outlasting the sink's
    // 300 ms message timeout come back to logbridge as retryable failures.
    // With a second instance coming and going, errors long enough to outlast its visit.
    let produce_errors = if rebalance.is_some() { 400 } else { 60 };
    output_cluster.request_errors(
        RDKafkaApiKey::Produce,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; produce_errors],
    );
    source_cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10],
    );
    let group = unique("produce-commit-errors");
    let routes = format!(
        "[[routes]]\nname = \"all\"\nlevels = [\"info\"]\nworkers = 3\nmax_retries = 1000\nretry_backoff_ms = 20\nretry_backoff_max_ms = 200\n\
         sink = {{ type = \"kafka\", topic = \"out\", brokers = \"{}\", options = {{ \"message.timeout.ms\" = 300, \"enable.idempotence\" = false, \"max.in.flight.requests.per.connection\" = 1 }} }}\n",
        output.brokers
    );
    let config = match rebalance {
        None => source.config(
            &group,
            "router_capacity = 64\nworker_capacity = 16",
            &routes,
        ),
        Some(protocol) => {
            let text = format!(
                "{}\n[pipeline]\nrouter_capacity = 16\nworker_capacity = 8\npause_after_ms = 0\ncommit_interval_ms = 200\n\n{routes}",
                kafka_section(&source.brokers, &group, &source.topic, &protocol.option())
            );
            logbridge::Config::from_toml_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"))
        }
    };
    let metrics = Arc::new(Metrics::new());
    let running = Running::without_http(config.clone(), &metrics);
    if rebalance.is_some() {
        let reading = wait_for(Duration::from_secs(30), || {
            let metrics = metrics.clone();
            async move { metrics.consumed.with_label_values(&["logs"]).get() > 0 }
        })
        .await;
        assert!(reading, "A never read");
        let metrics_b = Arc::new(Metrics::new());
        let b = Running::without_http(config, &metrics_b);
        let b_read = wait_for(Duration::from_secs(60), || {
            let metrics = metrics_b.clone();
            async move { metrics.consumed.with_label_values(&["logs"]).get() > 0 }
        })
        .await;
        let retrying = metrics.retries.with_label_values(&["all"]).get()
            + metrics_b.retries.with_label_values(&["all"]).get();
        b.stop_abandoning().await;
        assert!(b_read, "B never read a partition");
        // B's partitions came from A (one group): A revoked before B was given them.
        assert!(
            metrics.rebalances.with_label_values(&["revoke"]).get() > 0,
            "A gave no partition up, so B is not in A's group"
        );
        assert!(
            retrying > 0,
            "the destination was failing while B was in the group"
        );
    }
    let done = source
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    running.stop().await;
    assert!(
        done,
        "not committed to the end: {:?}",
        source.committed(&group)
    );
    let retries = metrics.retries.with_label_values(&["all"]).get();
    let commit_errors = metrics.commits.with_label_values(&["error"]).get();
    // Source offset of every event id, to order the output by.
    let offset_of: std::collections::HashMap<(i32, i64), u64> = placed
        .iter()
        .enumerate()
        .map(|(id, place)| (*place, id as u64))
        .collect();
    let delivered = output.read_all("out");
    // Every copy of each key's records, in output order (a key has one output partition).
    let mut copies: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let mut seen_ids = HashSet::new();
    for record in &delivered {
        let (partition, offset) = record.source();
        seen_ids.insert(offset_of[&(partition, offset)]);
        let key = String::from_utf8(record.key.clone().expect("key")).expect("utf-8");
        copies.entry(key).or_default().push(offset);
    }
    println!(
        "produce and commit errors: {} records out ({} distinct), {retries} delivery retries, {commit_errors} failed commits",
        delivered.len(),
        seen_ids.len()
    );
    let missing: Vec<(u64, (i32, i64))> = (0..count)
        .filter(|id| !seen_ids.contains(id))
        .map(|id| (id, placed[id as usize]))
        .collect();
    let failed = metrics.finished.with_label_values(&["all", "failed"]).get();
    assert!(
        missing.is_empty(),
        "lost {missing:?}; finished as failed: {failed}, sink errors {}",
        metrics.sink_errors.with_label_values(&["all"]).get()
    );
    assert!(
        retries > 0,
        "the produce errors reached logbridge's own retries"
    );
    assert!(commit_errors > 0, "the commit errors were met");
    if rebalance.is_some() {
        // Under backpressure: A's router channel stayed full and its partitions paused.
        let pauses = metrics.pauses.with_label_values(&["backpressure"]).get();
        assert!(pauses > 0, "A never paused for backpressure");
    }
    // The last copy of every record of a key comes after the last copy of each earlier one
    // (a retried record's later records are delivered again after it). How often a first copy
    // came early is shown, not asserted: without idempotence a broker may take a later batch
    // while an earlier one is lost in flight.
    let mut early_first_copies = 0;
    let mut keys_out_of_order = Vec::new();
    for (key, offsets) in &copies {
        let mut first: std::collections::HashMap<i64, usize> = Default::default();
        for (position, offset) in offsets.iter().enumerate() {
            first.entry(*offset).or_insert(position);
        }
        let by_last = by_last_copy(offsets);
        if rebalance.is_none() {
            assert!(
                by_last.windows(2).all(|pair| pair[0] < pair[1]),
                "key {key}: last copies out of order: {by_last:?} (all copies {offsets:?})"
            );
        } else if by_last.windows(2).any(|pair| pair[0] > pair[1]) {
            // Across a rebalance, a delivery attempt still in progress when the revoke ended
            // (its drain deadline passed while the destination failed) can land after the
            // next owner's copies of later records. Measured, not asserted: see the README
            // ("Delivery guarantee").
            keys_out_of_order.push(key.clone());
        }
        let mut by_first: Vec<i64> = first.keys().copied().collect();
        by_first.sort_by_key(|offset| first[offset]);
        early_first_copies += by_first.windows(2).filter(|pair| pair[0] > pair[1]).count();
    }
    println!(
        "first copies ahead of an earlier record of their key: {early_first_copies}; keys whose last copies are out of order across the rebalances: {} of {}",
        keys_out_of_order.len(),
        copies.len()
    );
}

/// One record stuck in retries holds its partition's commit back while later records finish:
/// at `max_uncommitted_records` the partition is paused (the reason shown in /status), so the
/// finished-but-uncommitted gap stays bounded; once the record is delivered, everything is
/// committed and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_record_pauses_its_partition_at_the_uncommitted_bound() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::start("logs", 1);
    // The stuck record is the partition's first, on a route of its own, so that the records
    // behind it flow through the other route and finish.
    let mut records: Vec<(Option<String>, Vec<u8>)> =
        vec![(Some("stuck".into()), event(0, "error"))];
    records.extend((1..3_000u64).map(|id| (Some(format!("key-{id}")), event(id, "info"))));
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    let group = unique("uncommitted");
    let dir = tempfile::tempdir().expect("dir");
    let retrying = "\nmax_retries = 100000\nretry_backoff_ms = 20\nretry_backoff_max_ms = 50\n";
    let routes = format!(
        "{}{retrying}{}",
        file_route("stuck", "[\"error\"]", 1, dir.path()),
        file_route("all", "[\"info\"]", 2, dir.path())
    );
    let config = kafka.config(
        &group,
        "router_capacity = 32\nworker_capacity = 8\nmax_uncommitted_records = 200",
        &routes,
    );
    // `max_uncommitted_records` plus the README's record bound ("Memory"), from this test's
    // literals, not from the code under test: `router_capacity + min(router_capacity, 256)
    // + Σ workers × (worker_capacity + s × b) + max(2, ⌈router_capacity / 64⌉) × b` with
    // `b = min(worker_capacity, 256)` and `s = 1` for file routes (one worker on `stuck`, two on
    // `all`): 32 + 32 + 1 × (8 + 8) + 2 × (8 + 8) + max(2, 1) × 8 = 128.
    let bound: i64 = 128 + 200;
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let metrics = Arc::new(Metrics::new());
    let (running, address) = Running::start_serving(
        config,
        RunOptions {
            sink_factory: gated_sinks(gate.clone()),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
    )
    .await;
    let held = wait_for(Duration::from_secs(30), || async move {
        http_get(address, "/status")
            .await
            .1
            .contains("at pipeline.max_uncommitted_records")
    })
    .await;
    let gap = || {
        metrics
            .partition_uncommitted_gap
            .with_label_values(&["logs", "0"])
            .get()
    };
    let mut max_gap = gap();
    for _ in 0..20 {
        max_gap = max_gap.max(gap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumed_while_held = metrics.consumed.with_label_values(&["logs"]).get();
    assert!(
        held,
        "the partition was never held for its uncommitted records"
    );
    assert!(max_gap >= 200, "the gap reached the bound: {max_gap}");
    assert!(
        max_gap <= bound,
        "gap {max_gap} beyond the bound plus what was in flight ({bound})"
    );
    // Held partitions are not read on: until the consumer pauses the partition (at the first
    // poll after the committer holds it at 200 finished records), it reads at most what the
    // pipeline holds (the README's record bound, 128 above) and one consumer batch of
    // `min(router_capacity / 2, 256)` = 16 (README, "Memory", "On top") beyond those 200.
    assert!(
        consumed_while_held <= 200 + 128 + 16,
        "held partitions are not read on: read {consumed_while_held} > 200 + 128 + 16"
    );
    assert!(
        kafka.committed(&group)[0] <= 0,
        "nothing committed past the stuck record"
    );

    gate.store(false, std::sync::atomic::Ordering::Relaxed);
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    running.stop().await;
    assert!(
        done,
        "not committed to the end: {:?}",
        kafka.committed(&group)
    );
    let lines = read_lines(&[dir.path().join("stuck.jsonl"), dir.path().join("all.jsonl")]);
    let written = id_counts(&lines);
    let missing: Vec<u64> = (0..3_000u64)
        .filter(|id| !written.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "lost {missing:?}");
    println!(
        "uncommitted bound 200: gap peaked at {max_gap}, consumed {consumed_while_held} while held"
    );
}

/// Sinks that fail the record keyed `stuck` (retryably) while `gate` is set.
fn gated_sinks(gate: Arc<std::sync::atomic::AtomicBool>) -> logbridge::sink::SinkFactory {
    let inner = logbridge::sink::config_sink_factory();
    Arc::new(move |route, index, links| {
        Ok(Box::new(Gated {
            inner: inner(route, index, links)?,
            gate: gate.clone(),
        }) as Box<dyn logbridge::sink::Sink>)
    })
}

struct Gated {
    inner: Box<dyn logbridge::sink::Sink>,
    gate: Arc<std::sync::atomic::AtomicBool>,
}

impl logbridge::sink::Sink for Gated {
    fn deliver<'a>(
        &'a mut self,
        route: &'a str,
        batch: &'a [logbridge::record::Record],
    ) -> logbridge::sink::DeliveryFuture<'a> {
        let stuck = self.gate.load(std::sync::atomic::Ordering::Relaxed)
            && batch
                .iter()
                .any(|record| record.key() == Some(b"stuck".as_slice()));
        if stuck {
            let failures = batch
                .iter()
                .map(|_| {
                    Err(logbridge::sink::SinkError::retryable(
                        "gated",
                        "the gate is closed",
                    ))
                })
                .collect();
            return Box::pin(std::future::ready(failures));
        }
        self.inner.deliver(route, batch)
    }
}

/// Large events through a slow sink: the bytes held between the consumer and the committer stay
/// within `max_in_flight_bytes` plus the records held for paused partitions (at most one event
/// per paused partition), where the record bound alone would let over a hundred times as much
/// in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_stay_within_the_in_flight_byte_bound() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::shared("logs", 8).await;
    let (_, largest) = produce_large_events(&kafka).await;
    let end = kafka.end_offsets();
    let group = unique("bytes");
    let dir = tempfile::tempdir().expect("dir");
    let limit: i64 = 1 << 20;
    let config = kafka.config(
        &group,
        &format!("router_capacity = 1024\nworker_capacity = 256\nmax_in_flight_bytes = {limit}"),
        &file_route("all", "[\"info\"]", 2, dir.path()),
    );
    // The README's record bound ("Memory"), from this test's literals, not from the code under
    // test: `router_capacity + min(router_capacity, 256) + Σ workers × (worker_capacity + s × b)
    // + max(2, ⌈router_capacity / 64⌉) × b` with `b = min(worker_capacity, 256)` and `s = 1` for
    // a file route: 1024 + 256 + 2 × (256 + 256) + max(2, 16) × 256 = 6 400 records.
    let record_bound: i64 = 6_400 * LARGE_EVENT_BYTES as i64;
    let metrics = Arc::new(Metrics::new());
    let (running, address) = Running::start_serving(
        config,
        RunOptions {
            sink_factory: delayed_sinks(Duration::from_millis(50), 0..=0),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
    )
    .await;
    let mut peaks = BytePeaks::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while kafka.committed(&group) != end && std::time::Instant::now() < deadline {
        peaks.add(byte_sample(address).await, limit, largest);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = kafka.committed(&group) == end;
    let paused_for_bytes = metrics.pauses.with_label_values(&["bytes"]).get();
    running.stop().await;
    println!(
        "large events: peak in-flight bytes {} (bound {limit}, record bound alone {record_bound}), peak held {} (beyond one event of {largest} bytes per paused partition: {:?}), pauses {paused_for_bytes}",
        peaks.in_flight, peaks.held, peaks.held_over
    );
    assert!(done, "not committed to the end");
    assert!(paused_for_bytes > 0, "never paused at the byte bound");
    peaks.assert_within("one instance", largest);
    assert!(record_bound > 100 * limit);
    assert_eq!(metrics.in_flight_bytes.get(), 0, "every charge given back");
    let written = ids_written(&[dir.path()]);
    assert_eq!(written.len(), 300);
}

/// With `input.tombstones = "dead-letter"`, tombstones go to the dead-letter topic with reason
/// `tombstone`, keyed as they were, and a run of them does not trip the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_can_be_dead_lettered_without_tripping_the_breaker() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::start("logs", 1);
    for n in 0..30 {
        kafka.produce_tombstone(&format!("deleted-{n}")).await;
    }
    kafka.produce(&[(Some("k".into()), event(1, "info"))]).await;
    let (metrics, parked) = park_on_purpose(&kafka, "tombstones = \"dead-letter\"").await;
    assert_eq!(
        metrics
            .tombstones
            .with_label_values(&["dead_lettered"])
            .get(),
        30
    );
    assert!(parked.iter().all(|record| record.payload.is_none()
        && record.header("logbridge.error.reason").as_deref() == Some("tombstone")));
}

/// With `input.unrouted = "dead-letter"`, events whose level no route takes go to the
/// dead-letter topic with reason `unrouted`, whole, and a run of them does not trip the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_events_can_be_dead_lettered_without_tripping_the_breaker() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::start("logs", 1);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..31u64)
        .map(|id| {
            (
                Some(format!("k{id}")),
                event(id, if id == 30 { "info" } else { "debug" }),
            )
        })
        .collect();
    kafka.produce(&records).await;
    let (_, parked) = park_on_purpose(&kafka, "unrouted = \"dead-letter\"").await;
    assert!(parked.iter().all(|record| record.payload.is_some()
        && record.header("logbridge.error.reason").as_deref() == Some("unrouted")));
}

/// Runs what `kafka` holds (30 records to park and one info event) through a route taking
/// `info`, a dead-letter topic and a breaker that trips after 5 failures in a row, with the
/// `[input]` line `input`; checks that everything was committed, the breaker never tripped,
/// 30 records were parked and the info event routed, and returns the metrics and what the
/// dead-letter topic holds.
async fn park_on_purpose(kafka: &Kafka, input: &str) -> (Arc<Metrics>, Vec<ReadRecord>) {
    kafka.create_topic("logs.dlq", 1);
    let end = kafka.end_offsets();
    let group = unique("parked");
    let dir = tempfile::tempdir().expect("dir");
    let routes = format!(
        "{}\n[dead_letter]\ntopic = \"logs.dlq\"\n[breaker]\nmax_consecutive = 5\n[input]\n{input}\n",
        file_route("all", "[\"info\"]", 1, dir.path())
    );
    let config = kafka.config(&group, "", &routes);
    let metrics = Arc::new(Metrics::new());
    let running = Running::without_http(config, &metrics);
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    running.stop().await;
    assert!(done, "{input}: not committed to the end");
    assert_eq!(
        metrics.breaker_tripped.get(),
        0,
        "{input}: what is parked on purpose does not trip the breaker"
    );
    let parked = kafka.read_all("logs.dlq");
    assert_eq!(parked.len(), 30, "{input}: every record to park parked");
    assert_eq!(
        ids_written(&[dir.path()]).len(),
        1,
        "{input}: the info event routed"
    );
    (metrics, parked)
}

/// The only broker (the group coordinator too) is unreachable for longer than the session
/// timeout: the consumer counts its partitions lost (nothing may be committed for them),
/// `/readyz` says it is not in a group, and when the broker is back it rejoins and finishes
/// without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_lost_with_the_coordinator_are_counted_and_read_again() {
    let _pair = two_at_a_time().await;
    let kafka = Kafka::start("logs", 2);
    kafka.produce(&keyed_events(2_000)).await;
    let end = kafka.end_offsets();
    let group = unique("lost");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(
        &group,
        "router_capacity = 16\nworker_capacity = 8",
        &file_route("all", "[\"info\"]", 1, dir.path()),
    );
    let metrics = Arc::new(Metrics::new());
    let (running, address) = start_reading(config, Duration::from_millis(20), &metrics).await;
    let cluster = kafka.cluster.as_ref().expect("mock");
    cluster.broker_down(1).expect("broker down");
    let lost = wait_for(Duration::from_secs(40), || {
        let metrics = metrics.clone();
        async move { metrics.rebalances.with_label_values(&["lost"]).get() > 0 }
    })
    .await;
    let (status, body) = http_get(address, "/readyz").await;
    cluster.broker_up(1).expect("broker up");
    assert!(lost, "the partitions were never counted lost");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not in a consumer group"), "{body}");
    recovers(&kafka, &group, &end, address, running).await;
    let written = ids_written(&[dir.path()]);
    let missing = (0..2_000u64).filter(|id| !written.contains(id)).count();
    assert_eq!(missing, 0, "nothing lost");
}

/// A cooperative rebalance takes some partitions away and leaves the rest: the partitions
/// that stay keep their assignment (same generation) and their in-flight work, so the
/// instance that keeps them never writes one of their records twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_rebalance_keeps_the_work_of_the_partitions_that_stay() {
    let _pair = two_at_a_time().await;
    incremental_rebalance_keeps_the_partitions_that_stay(Protocol::Cooperative).await;
}

/// The same with KIP-848's `consumer` protocol, where the broker assigns and every rebalance
/// is incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_protocol_rebalance_keeps_the_work_of_the_partitions_that_stay() {
    let _pair = two_at_a_time().await;
    incremental_rebalance_keeps_the_partitions_that_stay(Protocol::Consumer).await;
}

async fn incremental_rebalance_keeps_the_partitions_that_stay(protocol: Protocol) {
    let kafka = Kafka::shared("logs", 4).await;
    let mut placed = kafka.produce(&keyed_events(3_000)).await;
    let group = unique("cooperative-keeps");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let metrics_a = Arc::new(Metrics::new());
    let (a, address_a) = Running::start_serving(
        config(
            &kafka,
            &group,
            protocol,
            PausedBy::Backpressure,
            dir_a.path(),
        ),
        RunOptions {
            sink_factory: delayed_sinks(Duration::from_millis(30), 0..=0),
            metrics: metrics_a.clone(),
            http: HttpBind::Disabled,
        },
    )
    .await;
    let busy = wait_for(Duration::from_secs(30), || {
        let metrics = metrics_a.clone();
        async move { metrics.assigned_partitions.get() == 4 && metrics.in_flight.get() > 0 }
    })
    .await;
    assert!(busy, "A never got busy");
    let generations = |status: &str| -> std::collections::HashMap<i64, i64> {
        let status = parse_json("/status", status);
        json_array(&status, "/partitions")
            .iter()
            .map(|p| (json_i64(p, "/partition"), json_i64(p, "/generation")))
            .collect()
    };
    let before = generations(&http_get(address_a, "/status").await.1);
    let metrics_b = Arc::new(Metrics::new());
    let b = Running::without_http(
        config(
            &kafka,
            &group,
            protocol,
            PausedBy::Backpressure,
            dir_b.path(),
        ),
        &metrics_b,
    );
    let split = wait_for(Duration::from_secs(60), || {
        let (a, b) = (metrics_a.clone(), metrics_b.clone());
        async move { a.assigned_partitions.get() == 2 && b.assigned_partitions.get() == 2 }
    })
    .await;
    assert!(split, "the group did not split the partitions");
    let after = generations(&http_get(address_a, "/status").await.1);
    // More events on every partition once the split is done, so B has something to read
    // however far A got before it gave B its two partitions.
    let more: Vec<_> = (3_000..3_400u64)
        .map(|id| (Some(format!("key-{id}")), event(id, "info")))
        .collect();
    placed.extend(kafka.produce(&more).await);
    let end = kafka.end_offsets();
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    let read_b = consumed_total(&metrics_b);
    b.stop().await;
    a.stop().await;
    assert!(read_b > 0, "B never read the partitions it took");
    assert!(
        done,
        "not committed to the end: {:?}",
        kafka.committed(&group)
    );
    assert_eq!(after.len(), 2, "A kept two partitions: {after:?}");
    for (partition, generation) in &after {
        assert_eq!(
            before.get(partition),
            Some(generation),
            "partition {partition} stayed with A under the same assignment"
        );
    }
    // A's output: no record of a partition it kept appears twice.
    let lines = read_lines(&[dir_a.path().join("all.jsonl")]);
    let mut copies: std::collections::HashMap<u64, usize> = Default::default();
    for line in &lines {
        *copies
            .entry(line["event"]["id"].as_u64().expect("id"))
            .or_insert(0) += 1;
    }
    let kept: HashSet<i32> = after.keys().map(|p| *p as i32).collect();
    let twice: Vec<u64> = copies
        .iter()
        .filter(|(id, count)| **count > 1 && kept.contains(&placed[**id as usize].0))
        .map(|(id, _)| *id)
        .collect();
    assert!(
        twice.is_empty(),
        "records of kept partitions written twice by A: {twice:?}"
    );
    let written = ids_written(&[dir_a.path(), dir_b.path()]);
    assert_eq!(written.len(), 3_400, "nothing lost");
}

/// The group's committed position lies past the end of the log (the topic was recreated, or
/// retention removed what it pointed at): the first fetch fails with "offset out of range",
/// librdkafka resets the position (`auto.offset.reset = earliest`: to the beginning) and logs
/// it; logbridge counts the reset in `logbridge_offset_resets_total`, reads every record from
/// the beginning and commits the new end, below the old position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_reset_after_a_fetch_error_is_counted_and_nothing_is_skipped() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let _pair = two_at_a_time().await;
    let kafka = Kafka::shared("logs", 1).await;
    kafka.produce(&keyed_events(300)).await;
    let end = kafka.end_offsets();
    assert_eq!(end, vec![300]);
    let group = unique("offset-reset");
    {
        let client: BaseConsumer = kafka
            .client()
            .set("group.id", &group)
            .create()
            .expect("client");
        let mut past_the_end = TopicPartitionList::new();
        past_the_end
            .add_partition_offset(&kafka.topic, 0, Offset::Offset(10_000))
            .expect("offset");
        client
            .commit(&past_the_end, CommitMode::Sync)
            .expect("commit past the end");
    }
    assert_eq!(kafka.committed(&group), vec![10_000]);

    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(&group, "", &file_route("all", "[\"info\"]", 1, dir.path()));
    let metrics = Arc::new(Metrics::new());
    assert_eq!(metrics.offset_resets.get(), 0);
    let running = Running::without_http(config, &metrics);
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    running.stop().await;
    let resets = metrics.offset_resets.get();
    let written = ids_written(&[dir.path()]);
    println!(
        "offset resets counted {resets}; committed {:?}; {} of 300 ids written",
        kafka.committed(&group),
        written.len()
    );
    assert!(
        done,
        "not committed to the new end: {:?}",
        kafka.committed(&group)
    );
    assert_eq!(resets, 1, "the reset is counted once");
    assert_eq!(written.len(), 300, "every record read from the beginning");
}

/// Bytes of each large event's message.
const LARGE_EVENT_BYTES: usize = 100 * 1024;

/// Produces 300 info events of about [`LARGE_EVENT_BYTES`] each (ids 0..300, a key each) to
/// `kafka`, which should have 8 partitions: the mock cluster keeps only the newest 5 MiB of
/// each. Returns how many, and the largest one's payload and key bytes (what the byte bound
/// charges for a record).
async fn produce_large_events(kafka: &Kafka) -> (u64, i64) {
    let count = 300u64;
    let records: Vec<(Option<String>, Vec<u8>)> = (0..count)
        .map(|id| {
            let payload = serde_json::json!({
                "id": id, "level": "info", "message": "x".repeat(LARGE_EVENT_BYTES),
            });
            (Some(format!("key-{id}")), payload.to_string().into_bytes())
        })
        .collect();
    let largest = records
        .iter()
        .map(|(key, payload)| key.as_ref().map_or(0, String::len) + payload.len())
        .max()
        .unwrap_or(0) as i64;
    kafka.produce_large(&records).await;
    (count, largest)
}

/// One `/status` reading of the byte bound, read together under the consumer's lock.
struct ByteSample {
    /// Bytes in flight between the consumer and the committer.
    in_flight: i64,
    /// Bytes of the records held for paused partitions.
    held: i64,
    /// Partitions paused, whatever the reason.
    paused: i64,
}

async fn byte_sample(address: std::net::SocketAddr) -> ByteSample {
    let (_, status) = http_get(address, "/status").await;
    let status = parse_json("/status", &status);
    let paused = json_array(&status, "/partitions")
        .iter()
        .filter(|p| json_at(p, "/paused").as_bool() == Some(true))
        .count();
    ByteSample {
        in_flight: json_i64(&status, "/in_flight_bytes"),
        held: json_i64(&status, "/held_bytes"),
        paused: paused as i64,
    }
}

/// The most a run of byte samples went over `limit`, beyond what was held for paused
/// partitions; the most the held bytes went over one `largest` event per paused partition
/// (the README: "one held record per partition paused at the byte bound"); and the peaks in
/// flight and held.
#[derive(Default)]
struct BytePeaks {
    in_flight: i64,
    held: i64,
    over: Option<i64>,
    held_over: Option<i64>,
}

impl BytePeaks {
    /// What the README promises of these samples ("Memory"): nothing over the bound but the
    /// records held for paused partitions, and those at most one `largest` event per paused
    /// partition. `who` names the instance in the failure.
    fn assert_within(&self, who: &str, largest: i64) {
        assert!(self.in_flight > 0, "{who}: nothing was ever in flight");
        assert!(
            self.over.is_some_and(|over| over <= 0),
            "{who}: bytes beyond the bound and the held records: {:?}",
            self.over
        );
        assert!(
            self.held_over.is_some_and(|over| over <= 0),
            "{who}: held bytes beyond one event of {largest} bytes per paused partition: {:?}",
            self.held_over
        );
    }

    fn add(&mut self, sample: ByteSample, limit: i64, largest: i64) {
        let ByteSample {
            in_flight,
            held,
            paused,
        } = sample;
        self.in_flight = self.in_flight.max(in_flight);
        self.held = self.held.max(held);
        let over = in_flight - held - limit;
        self.over = Some(self.over.map_or(over, |peak| peak.max(over)));
        let held_over = held - paused * largest;
        self.held_over = Some(self.held_over.map_or(held_over, |peak| peak.max(held_over)));
    }
}

/// Large events through a slow sink while a second instance joins and leaves, so partitions
/// move away and come back mid-run: on each instance the bytes in flight stay within
/// `max_in_flight_bytes` plus the records held for paused partitions (at most one event per
/// paused partition), every charge is given
/// back (revoked, abandoned and dropped records included: a leak would shrink the budget until
/// the pipeline stalls), and every event is written and committed.
async fn large_events_through_rebalances(protocol: Protocol) {
    if let Ok(filter) = std::env::var("FAULTS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .try_init();
    }
    let kafka = Kafka::shared("logs", 8).await;
    let (count, largest) = produce_large_events(&kafka).await;
    let end = kafka.end_offsets();
    let group = unique("bytes-rebalance");
    let limit: i64 = 1 << 20;
    let config = |out: &Path| {
        let text = format!(
            "{}\n[pipeline]\nrouter_capacity = 1024\nworker_capacity = 256\n\
             max_in_flight_bytes = {limit}\ncommit_interval_ms = 200\ndrain_timeout_ms = 2000\n\n{}",
            kafka_section(&kafka.brokers, &group, &kafka.topic, &protocol.option()),
            file_route("all", "[\"info\"]", 2, out),
        );
        logbridge::Config::from_toml_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"))
    };
    // Slow enough that A cannot finish before a cooperative rebalance, two rounds on the mock
    // cluster (about 10 s), has moved partitions to B.
    let serve = |config, metrics: &Arc<Metrics>| {
        Running::start_serving(
            config,
            RunOptions {
                sink_factory: delayed_sinks(Duration::from_millis(150), 0..=0),
                metrics: metrics.clone(),
                http: HttpBind::Disabled,
            },
        )
    };
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (metrics_a, metrics_b) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let (a, address_a) = serve(config(dir_a.path()), &metrics_a).await;
    let (mut peaks_a, mut peaks_b) = (BytePeaks::default(), BytePeaks::default());
    let mut b: Option<(Running, std::net::SocketAddr)> = None;
    let mut b_assigned_at: Option<std::time::Instant> = None;
    let mut b_was_there = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while kafka.committed(&group) != end && std::time::Instant::now() < deadline {
        peaks_a.add(byte_sample(address_a).await, limit, largest);
        if let Some((_, address_b)) = &b {
            peaks_b.add(byte_sample(*address_b).await, limit, largest);
        }
        let read_a = consumed_total(&metrics_a);
        if b.is_none() && !b_was_there && read_a > 20 {
            // B joins while A is held at the byte bound.
            b = Some(serve(config(dir_b.path()), &metrics_b).await);
            b_was_there = true;
        }
        if b.is_some() && b_assigned_at.is_none() && metrics_b.assigned_partitions.get() > 0 {
            b_assigned_at = Some(std::time::Instant::now());
        }
        if b_assigned_at.is_some_and(|at| at.elapsed() > Duration::from_millis(1_500))
            && consumed_total(&metrics_b) > 0
        {
            // B leaves with what it holds, once it has read: its partitions go back to A.
            if let Some((running, _)) = b.take() {
                running.stop_abandoning().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some((running, _)) = b.take() {
        running.stop_abandoning().await;
    }
    let done = kafka.committed(&group) == end;
    let (pauses_a, read_b) = (
        metrics_a.pauses.with_label_values(&["bytes"]).get(),
        consumed_total(&metrics_b),
    );
    let revokes_a = metrics_a.rebalances.with_label_values(&["revoke"]).get();
    a.stop().await;
    let written = ids_written(&[dir_a.path(), dir_b.path()]);
    println!(
        "{protocol:?}: large events through rebalances: A peak in flight {} bytes, over the bound beyond held {:?}, held beyond one event per paused partition {:?}; B peak {} bytes, over {:?}, held beyond {:?}, read {read_b}; A pauses at the byte bound {pauses_a}; {} of {count} ids written; bytes still charged A {} B {}",
        peaks_a.in_flight,
        peaks_a.over,
        peaks_a.held_over,
        peaks_b.in_flight,
        peaks_b.over,
        peaks_b.held_over,
        written.len(),
        metrics_a.in_flight_bytes.get(),
        metrics_b.in_flight_bytes.get(),
    );
    assert!(
        done,
        "{protocol:?}: not committed to the end: {:?}",
        kafka.committed(&group)
    );
    assert!(
        b_assigned_at.is_some(),
        "{protocol:?}: B never got a partition"
    );
    assert!(read_b > 0, "{protocol:?}: B never read");
    // B's partitions came from A (one group): A revoked before B was given them.
    assert!(
        revokes_a > 0,
        "{protocol:?}: A gave no partition up, so B is not in A's group"
    );
    assert!(
        pauses_a > 0,
        "{protocol:?}: A never paused at the byte bound"
    );
    peaks_a.assert_within(&format!("{protocol:?}: A"), largest);
    peaks_b.assert_within(&format!("{protocol:?}: B"), largest);
    assert_eq!(
        metrics_a.in_flight_bytes.get(),
        0,
        "A gave every charge back"
    );
    assert_eq!(
        metrics_b.in_flight_bytes.get(),
        0,
        "B gave every charge back"
    );
    assert_eq!(
        written.len() as u64,
        count,
        "{protocol:?}: every event written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_through_eager_rebalances_stay_within_the_byte_bound() {
    let _pair = two_at_a_time().await;
    large_events_through_rebalances(Protocol::Eager).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_through_cooperative_rebalances_stay_within_the_byte_bound() {
    let _pair = two_at_a_time().await;
    large_events_through_rebalances(Protocol::Cooperative).await;
}
