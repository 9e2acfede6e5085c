//! A sink that blocks forever on one route: within `stall_timeout_ms` `/readyz` answers 503
//! naming the stalled partition, the oldest-unfinished age grows, the backpressure is attributed
//! to that route; unblocked, readiness comes back and everything is committed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::RunOptions;
use logbridge::record::Record;
use logbridge::sink::{config_sink_factory, DeliveryFuture, Sink};

struct Gate {
    inner: Box<dyn Sink>,
    closed: Arc<AtomicBool>,
}

impl Sink for Gate {
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        Box::pin(async move {
            while self.closed.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.inner.deliver(route, batch).await
        })
    }
}

/// The largest sample of `series` (0 for a defined metric without series; an undefined name
/// panics, see `metric_samples`).
#[track_caller]
fn gauge(body: &str, series: &str) -> f64 {
    metric_samples(body, series).into_iter().fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_sink_makes_readiness_fail_naming_the_partition_until_unblocked() {
    let kafka = Kafka::start("logs", 2);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..600u64)
        .map(|id| (Some(format!("key-{}", id % 20)), event(id, "error")))
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("stall");
    let config = kafka.config(
        &group,
        "router_capacity = 32\nworker_capacity = 8\nstall_timeout_ms = 2000",
        &file_route("blocked", "[\"error\"]", 1, dir.path()),
    );
    let closed = Arc::new(AtomicBool::new(true));
    let gate = closed.clone();
    let files = config_sink_factory();
    let metrics = Arc::new(Metrics::new());
    let (pipeline, address) = Running::start_serving(
        config,
        RunOptions {
            sink_factory: Arc::new(move |route, index, links| {
                Ok(Box::new(Gate {
                    inner: files(route, index, links)?,
                    closed: gate.clone(),
                }) as Box<dyn Sink>)
            }),
            metrics: metrics.clone(),
            ..RunOptions::default()
        },
    )
    .await;

    let stalled = wait_for(Duration::from_secs(30), || async move {
        let (status, text) = http_get(address, "/readyz").await;
        // The stall of records in flight (the blocked sink), not only the partition left
        // unread behind it while paused.
        status == 503 && text.contains("records waiting, commit not moved")
    })
    .await;
    let (_, stalled_body) = http_get(address, "/readyz").await;
    assert!(stalled, "/readyz never reported the stall: {stalled_body}");
    assert!(stalled_body.contains("partition logs/"), "{stalled_body}");
    let (_, first) = http_get(address, "/metrics").await;
    let age_before = gauge(&first, "logbridge_partition_oldest_unfinished_age_seconds");
    // The age grows while the record stays stuck: wait for it (published each commit
    // interval) rather than sleep and hope.
    let grown = wait_for(Duration::from_secs(15), || async move {
        let (_, text) = http_get(address, "/metrics").await;
        let age = gauge(&text, "logbridge_partition_oldest_unfinished_age_seconds");
        age >= age_before + 1.0 && age >= 2.0
    })
    .await;
    assert!(
        grown,
        "the age of the oldest unfinished record did not grow"
    );
    let (_, second) = http_get(address, "/metrics").await;
    let age_after = gauge(&second, "logbridge_partition_oldest_unfinished_age_seconds");
    let backpressure = gauge(
        &second,
        "logbridge_backpressure_seconds_total{route=\"blocked\"}",
    );
    let paused = gauge(&second, "logbridge_paused_partitions");
    let paused_one = gauge(&second, "logbridge_partition_paused{");
    assert_eq!(paused_one, 1.0, "a per-partition paused gauge is 1");
    println!(
        "stall: /readyz said `{}`; oldest unfinished age {age_before:.1} s then {age_after:.1} s; backpressure on route blocked {backpressure:.1} s; paused partitions {paused}",
        stalled_body.trim()
    );
    assert!(age_after > age_before && age_after >= 2.0, "the age grows");
    assert!(
        backpressure > 0.0,
        "the wait is attributed to the blocked route"
    );
    assert_eq!(
        http_get(address, "/healthz").await.0,
        200,
        "liveness is not readiness"
    );

    // The live status page shows the stuck partition, the route's queue and the config.
    let (status, body) = http_get(address, "/status").await;
    assert_eq!(status, 200);
    let page = parse_json("/status", &body);
    // `in_flight` is null for a partition without its series yet.
    let stuck = json_array(&page, "/partitions")
        .iter()
        .find(|p| json_opt_i64(p, "/in_flight").is_some_and(|records| records > 0))
        .cloned()
        .expect("a partition with records in flight");
    assert!(
        json_opt_f64(&stuck, "/oldest_unfinished_age_seconds").is_some_and(|age| age >= 2.0),
        "{stuck}"
    );
    assert_eq!(page["routes"][0]["name"], "blocked");
    assert!(
        page["stalls"].as_array().is_some_and(|s| !s.is_empty()),
        "{page}"
    );
    assert_eq!(page["config"]["kafka"]["topics"][0], "logs");
    // librdkafka's statistics give the lag of the stuck partitions without a second client.
    let lag_seen = wait_for(Duration::from_secs(10), || async move {
        let (_, metrics_text) = http_get(address, "/metrics").await;
        gauge(&metrics_text, "logbridge_partition_lag_records") > 0.0
    })
    .await;
    println!("stall: /status partition {stuck}");
    assert!(lag_seen, "partition lag from librdkafka statistics");

    closed.store(false, Ordering::Relaxed);
    let ready = wait_for(Duration::from_secs(30), || async move {
        http_get(address, "/readyz").await.0 == 200
    })
    .await;
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    let (_, after) = http_get(address, "/metrics").await;
    let latency_samples = gauge(
        &after,
        "logbridge_processing_latency_seconds_count{route=\"blocked\"}",
    );
    pipeline.stop().await;
    assert!(ready, "readiness did not come back after unblocking");
    assert!(
        latency_samples >= 600.0,
        "processing latency observed for every record: {latency_samples}"
    );
    assert!(done, "not everything was committed after unblocking");
}
