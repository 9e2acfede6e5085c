//! Delivery under trouble, against in-process Kafka clusters:
//! - the output cluster refuses everything for a while: retries and pauses show in /metrics,
//!   nothing is committed past the first failing record, and after recovery every record
//!   arrives;
//! - a burst of invalid records trips the dead-letter breaker: consumption stops, /readyz says
//!   why, no more than the breaker's bound went to the dead-letter topic, POST /resume resumes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::RunOptions;

#[track_caller]
fn scrape_value(body: &str, name: &str) -> f64 {
    metric_sum(body, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_retries_pauses_commits_nothing_then_delivers_everything() {
    let _serial = serial().await;
    let source = Kafka::start("logs", 4);
    let output = Kafka::start("out", 2);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..3_000u64)
        .map(|id| (Some(format!("key-{}", id % 97)), event(id, "error")))
        .collect();
    source.produce(&records).await;
    let end = source.end_offsets();

    // The output cluster's only broker goes down before logbridge starts.
    output
        .cluster
        .as_ref()
        .expect("mock")
        .broker_down(1)
        .expect("broker down");

    let group = unique("outage");
    let routes = format!(
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nworkers = 2\nmax_retries = 1000\nretry_backoff_ms = 100\nretry_backoff_max_ms = 400\n\
         sink = {{ type = \"kafka\", topic = \"out\", brokers = \"{}\", options = {{ \"message.timeout.ms\" = 500 }} }}\n",
        output.brokers
    );
    let config = source.config(
        &group,
        "router_capacity = 64\nworker_capacity = 16",
        &routes,
    );
    let metrics = Arc::new(Metrics::new());
    let (pipeline, address) = Running::start_serving(
        config,
        RunOptions {
            metrics: metrics.clone(),
            ..RunOptions::default()
        },
    )
    .await;

    // During the outage: retries climb, partitions pause, and no offset is committed (the very
    // first records fail, so the commit may not pass them).
    let outage_started = Instant::now();
    let mut saw_paused = false;
    let mut retries = 0.0;
    let mut max_committed = -1;
    while outage_started.elapsed() < Duration::from_secs(12) {
        let (_, body) = http_get(address, "/metrics").await;
        retries = scrape_value(&body, "logbridge_delivery_retries_total");
        saw_paused |= scrape_value(&body, "logbridge_paused_partitions") > 0.0;
        max_committed = max_committed.max(*source.committed(&group).iter().max().unwrap_or(&-1));
        if saw_paused && retries >= 20.0 && outage_started.elapsed() > Duration::from_secs(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let consumed_during = metrics.consumed.with_label_values(&["logs"]).get();
    println!(
        "outage: {:?} with retries {retries}, paused seen {saw_paused}, highest committed offset {max_committed}, consumed {consumed_during} of 3000",
        outage_started.elapsed()
    );
    assert!(retries > 0.0, "retries visible in /metrics");
    assert!(saw_paused, "paused partitions visible in /metrics");
    assert!(
        max_committed <= 0,
        "nothing committed past the first failing record: {max_committed}"
    );
    // Nothing finishes while the output broker is down, so what was read is what the pipeline
    // holds: at most the README's record bound ("Memory") plus the one consumer batch held back
    // for paused partitions, from this test's literals: `router_capacity + min(router_capacity,
    // 256) + Σ workers × (worker_capacity + s × b) + max(2, ⌈router_capacity / 64⌉) × b` with
    // `b = min(worker_capacity, 256)` and `s = sink_batches_in_flight` (default 4) for a Kafka
    // route: 64 + 64 + 2 × (16 + 4 × 16) + max(2, 1) × 16 = 320, and one batch of
    // `min(router_capacity / 2, 256)` = 32 (README, "Memory", "On top").
    assert!(
        consumed_during <= 320 + 32,
        "backpressure kept the consumer within the bound: read {consumed_during} > 320 + 32"
    );

    output
        .cluster
        .as_ref()
        .expect("mock")
        .broker_up(1)
        .expect("broker up");
    let recovered = source
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    pipeline.stop().await;
    assert!(
        recovered,
        "commits did not reach the end after recovery: {:?}",
        source.committed(&group)
    );
    let delivered = output.read_all("out");
    let mut ids: Vec<u64> = delivered
        .iter()
        .map(|record| {
            let value: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().expect("payload")).expect("json");
            value["id"].as_u64().expect("id")
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    println!(
        "after recovery: {} records in the output topic, {} distinct ids, sink latency observations {}",
        delivered.len(),
        ids.len(),
        metrics.sink_latency.with_label_values(&["errors"]).get_sample_count()
    );
    assert_eq!(ids.len(), 3_000, "every record arrived after the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_burst_trips_the_breaker_which_stops_and_says_why() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 2);
    kafka.create_topic("logs.dlq", 1);
    let mut records: Vec<(Option<String>, Vec<u8>)> = (0..500u64)
        .map(|id| (Some(format!("key-{id}")), event(id, "info")))
        .collect();
    records.extend((0..3_000u64).map(|n| (Some(format!("bad-{n}")), b"{not json".to_vec())));
    kafka.produce(&records).await;

    let group = unique("breaker");
    let config = kafka.config(
        &group,
        "router_capacity = 64\nworker_capacity = 16",
        "[[routes]]\nname = \"info\"\nlevels = [\"info\"]\nsink = { type = \"null\" }\n\
         [dead_letter]\ntopic = \"logs.dlq\"\n\
         [breaker]\nmax_consecutive = 50\nwindow = 1000\nmax_invalid_ratio = 0.5\n\
         [http]\nadmin_token = \"${env:LB_DELIVERY_TEST_TOKEN:-the-admin-token-0123456789}\"\n",
    );
    // `max_consecutive` failed and the one that trips, plus the README's record bound
    // ("Memory") from this test's literals, not from the code under test:
    // `router_capacity + min(router_capacity, 256) + Σ workers × (worker_capacity + s × b)
    // + max(2, ⌈router_capacity / 64⌉) × b` with `b = min(worker_capacity, 256)`, one worker
    // (the default) and `s = 1` for a null route: 64 + 64 + 1 × (16 + 16) + max(2, 1) × 16 = 192.
    let bound = 50 + 1 + 192;
    let metrics = Arc::new(Metrics::new());
    let (pipeline, address) = Running::start_serving(
        config,
        RunOptions {
            metrics: metrics.clone(),
            ..RunOptions::default()
        },
    )
    .await;
    let tripped = wait_for(Duration::from_secs(60), || {
        let metrics = metrics.clone();
        async move { metrics.breaker_tripped.get() == 1 }
    })
    .await;
    assert!(tripped, "the breaker did not trip");

    // Stopped: every partition paused, then consumption does not move for 2 s (time let pass
    // on purpose).
    let stopped = wait_for(Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            metrics.assigned_partitions.get() > 0
                && metrics.paused_total() == metrics.assigned_partitions.get()
        }
    })
    .await;
    assert!(stopped, "the tripped breaker did not pause every partition");
    let consumed = metrics.consumed.with_label_values(&["logs"]).get();
    let finished: u64 = prometheus::core::Collector::collect(&metrics.finished)
        .iter()
        .flat_map(|family| family.get_metric().iter())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metrics.consumed.with_label_values(&["logs"]).get(),
        consumed,
        "consumption stopped"
    );
    assert_eq!(metrics.paused_total(), metrics.assigned_partitions.get());
    // Read and not finished when the breaker stopped consumption: at most the README's record
    // bound ("Memory", 192, see `bound`) plus the one consumer batch held back for paused partitions,
    // `min(router_capacity / 2, 256)` = 32 (README, "Memory", "On top").
    assert!(
        consumed <= finished + 192 + 32,
        "the breaker stopped the consumer within the bound: read {consumed}, finished {finished}, \
         {} > 192 + 32 read and not finished",
        consumed.saturating_sub(finished)
    );
    // And where it stopped: after the 500 valid events, the 50 failed in a row and the one that
    // tripped (as the bound on dead letters, below), what was in flight then and one batch.
    assert!(
        consumed <= 500 + 50 + 1 + 192 + 32,
        "the breaker stopped the consumer within the bound: read {consumed} > 500 + 50 + 1 + 192 + 32"
    );
    let (ready_status, ready_body) = http_get(address, "/readyz").await;
    let (health_status, _) = http_get(address, "/healthz").await;
    let dead_lettered = kafka.read_all("logs.dlq").len();
    println!(
        "breaker: tripped after {consumed} consumed ({finished} finished); /readyz {ready_status}: {}; /healthz {health_status}; {dead_lettered} dead letters (bound {bound})",
        ready_body.trim()
    );
    assert_eq!(ready_status, 503);
    assert!(
        ready_body.contains("breaker")
            && ready_body.contains("not_json")
            && ready_body.contains("none"),
        "{ready_body}"
    );
    assert_eq!(health_status, 200, "liveness is not readiness");
    assert!(
        dead_lettered <= bound,
        "{dead_lettered} dead letters exceed the bound {bound}"
    );

    // Without the admin token nobody resumes, not even from loopback (issue 33, item 5: behind
    // a sidecar proxy every request comes from loopback).
    let (refused, _) = http_request(
        address,
        "POST /resume HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(refused, 401);
    // An operator resumes with `logbridge resume`, which reads the address and the token from
    // the instance's configuration: consumption moves again.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("instance.toml");
    std::fs::write(
        &file,
        format!(
            "{}\n[[routes]]\nname = \"info\"\nlevels = [\"info\"]\nsink = {{ type = \"null\" }}\n\
             [http]\nlisten = \"{address}\"\nadmin_token = \"the-admin-token-0123456789\"\n",
            kafka_section(&kafka.brokers, &group, &kafka.topic, "")
        ),
    )
    .expect("write");
    let resumed = tokio::process::Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .args(["resume", "--config"])
        .arg(&file)
        .output()
        .await
        .expect("run logbridge resume");
    let said = String::from_utf8_lossy(&resumed.stdout);
    assert!(
        resumed.status.success() && said.contains("POST /resume: breaker reset"),
        "{said}{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let moved = wait_for(Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move { metrics.consumed.with_label_values(&["logs"]).get() > consumed }
    })
    .await;
    assert!(moved, "consumption did not resume after POST /resume");
    pipeline.stop().await;
}

/// The original headers travel with the record: the Kafka sink forwards them unchanged (and
/// adds its own), and so does a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_headers_are_kept_by_the_kafka_sink_and_in_dead_letters() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 1);
    kafka.create_topic("out", 1);
    kafka.create_topic("logs.dlq", 1);
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .expect("producer");
    for (n, payload) in [event(1, "error").as_slice(), b"not json".as_slice()]
        .into_iter()
        .enumerate()
    {
        let trace = format!("00-trace-{n}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some(&trace),
            })
            .insert(Header {
                key: "binary",
                value: Some(&[0u8, 255, 7][..]),
            });
        let key = format!("k{n}");
        producer
            .send(
                FutureRecord::to("logs")
                    .key(&key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .expect("produced");
    }
    let group = unique("headers");
    let config = kafka.config(
        &group,
        "",
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nsink = { type = \"kafka\", topic = \"out\" }\n\
         [dead_letter]\ntopic = \"logs.dlq\"\n",
    );
    let (done, _) = kafka
        .run_until_committed(&group, config, Duration::from_secs(60))
        .await;
    assert!(done, "not committed to the end");
    for (topic, n) in [("out", 0), ("logs.dlq", 1)] {
        let records = kafka.read_all(topic);
        assert_eq!(records.len(), 1, "{topic}");
        let record = &records[0];
        assert_eq!(
            record.header("traceparent").as_deref(),
            Some(format!("00-trace-{n}").as_str()),
            "{topic}: the original header"
        );
        assert_eq!(
            record.headers.get("binary").map(Vec::as_slice),
            Some(&[0u8, 255, 7][..]),
            "{topic}: a binary header, byte for byte"
        );
        assert_eq!(record.key.as_deref(), Some(format!("k{n}").as_bytes()));
        assert_eq!(
            record.header("logbridge.source.topic").as_deref(),
            Some("logs"),
            "{topic}: logbridge's own headers beside them"
        );
    }
}

/// Kafka sink fidelity: with the defaults a produced record carries the source record's
/// timestamp and headers; with `keep_timestamp = false` and `keep_headers = false` it carries
/// the time it was produced and only logbridge's `logbridge.*` headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_keeps_timestamps_and_headers_unless_told_not_to() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    const EVENTS: u64 = 200;
    // Hours in the past: a producer's clock could not give these by chance.
    const SOURCE_TIME: i64 = 1_700_000_000_000;
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 2);
    kafka.create_topic("kept", 2);
    kafka.create_topic("bare", 2);
    let producer: FutureProducer = kafka.client().create().expect("producer");
    for id in 0..EVENTS {
        let level = if id % 2 == 0 { "error" } else { "warning" };
        let payload = event(id, level);
        let trace = format!("trace-{id}");
        let key = format!("k{id}");
        producer
            .send(
                FutureRecord::to("logs")
                    .key(&key)
                    .payload(&payload)
                    .timestamp(SOURCE_TIME + id as i64)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some(&trace),
                    })),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .expect("produced");
    }
    let group = unique("fidelity");
    let config = kafka.config(
        &group,
        "",
        "[[routes]]\nname = \"kept\"\nlevels = [\"error\"]\nworkers = 2\nsink = { type = \"kafka\", topic = \"kept\" }\n\
         [[routes]]\nname = \"bare\"\nlevels = [\"warning\"]\nworkers = 2\n\
         sink = { type = \"kafka\", topic = \"bare\", keep_timestamp = false, keep_headers = false }\n",
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let (done, _) = kafka
        .run_until_committed(&group, config, Duration::from_secs(60))
        .await;
    assert!(done, "not committed to the end");

    let id_of = |record: &ReadRecord| -> u64 {
        let value: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().expect("payload")).expect("json");
        value["id"].as_u64().expect("id")
    };
    let kept = kafka.read_all("kept");
    assert_eq!(kept.len() as u64, EVENTS / 2, "kept: every error event");
    for record in &kept {
        let id = id_of(record);
        assert_eq!(
            record.timestamp,
            Some(SOURCE_TIME + id as i64),
            "kept: event {id} has its source timestamp"
        );
        assert_eq!(
            record.header("traceparent"),
            Some(format!("trace-{id}")),
            "kept: event {id} has its source header"
        );
        assert_eq!(record.header("logbridge.route").as_deref(), Some("kept"));
    }
    let bare = kafka.read_all("bare");
    assert_eq!(bare.len() as u64, EVENTS / 2, "bare: every warning event");
    for record in &bare {
        let id = id_of(record);
        let timestamp = record.timestamp.expect("a produced record has a timestamp");
        assert!(
            timestamp >= started - 1_000,
            "bare: event {id} has the time it was produced, not its source's ({timestamp})"
        );
        let mut names: Vec<&str> = record.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "logbridge.route",
                "logbridge.source.offset",
                "logbridge.source.partition",
                "logbridge.source.topic"
            ],
            "bare: event {id} has only logbridge's headers"
        );
    }
}
