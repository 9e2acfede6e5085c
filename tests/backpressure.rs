//! b) A deliberately slow sink: partitions get paused (seen in /metrics and in the logs), the
//! records the pipeline holds never exceed its configured capacities, and it resumes and
//! finishes with every record delivered and committed.
//!
//! Alone in its test binary because it installs a global log subscriber to read the logs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::RunOptions;

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_pauses_partitions_within_capacity_then_finishes() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "logbridge=debug".into()))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..4_000u64)
        .map(|id| (Some(format!("key-{}", id % 100)), event(id, "error")))
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("slow");
    // `pause_after_ms = 0`: this sink frees a slot every few milliseconds, which the default
    // wait would absorb without pausing; the test is about the pause itself.
    let config = kafka.config(
        &group,
        "router_capacity = 32\nworker_capacity = 8\npause_after_ms = 0",
        &file_route("slow", "[\"error\"]", 2, dir.path()),
    );
    // The README's record bound ("Memory"), from this test's literals, not from the code under
    // test: `router_capacity + min(router_capacity, 256) + Σ workers × (worker_capacity + s × b)
    // + max(2, ⌈router_capacity / 64⌉) × b` with `b = min(worker_capacity, 256)` and `s = 1` for a
    // file route: 32 + 32 + 2 × (8 + 1 × 8) + max(2, 1) × 8 = 112.
    let bound: i64 = 112;

    let metrics = Arc::new(Metrics::new());
    let options = RunOptions {
        sink_factory: delayed_sinks(Duration::ZERO, 800..=800),
        metrics: metrics.clone(),
        ..RunOptions::default()
    };
    let (pipeline, address) = Running::start_serving(config, options).await;

    let total: i64 = end.iter().sum();
    let mut max_in_flight = 0;
    let mut max_held_too = 0;
    let mut max_router_depth = 0;
    let mut max_worker_depth = 0;
    let mut paused_in_scrape = false;
    let mut scrapes = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while committed_total(&metrics) < total && std::time::Instant::now() < deadline {
        max_in_flight = max_in_flight.max(metrics.in_flight.get());
        max_router_depth = max_router_depth.max(
            metrics
                .channel_depth
                .with_label_values(&["router", "none"])
                .get(),
        );
        max_worker_depth = max_worker_depth.max(
            metrics
                .channel_depth
                .with_label_values(&["worker", "slow"])
                .get(),
        );
        // What the pipeline holds, read together from /status: records in flight between the
        // consumer and the committer, and records held for paused partitions.
        let (_, status) = http_get(address, "/status").await;
        let status = parse_json("/status", &status);
        let held: i64 = json_array(&status, "/partitions")
            .iter()
            .map(|partition| json_i64(partition, "/held"))
            .sum();
        max_held_too = max_held_too.max(json_i64(&status, "/in_flight") + held);
        if !paused_in_scrape && scrapes < 5_000 {
            scrapes += 1;
            let (status, body) = http_get(address, "/metrics").await;
            assert_eq!(status, 200);
            paused_in_scrape = body
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("logbridge_paused_partitions{reason=\"backpressure\"} ")
                })
                .any(|value| value.trim() != "0");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reached = committed_total(&metrics);
    pipeline.stop().await;

    assert_eq!(reached, total, "finished after the pauses");
    assert_eq!(kafka.committed(&group), end);
    let counts = id_counts(&read_lines(&[dir.path().join("slow.jsonl")]));
    assert_eq!(counts.len(), 4_000, "every record delivered");
    assert!(
        counts.values().all(|n| *n == 1),
        "no record delivered twice"
    );

    let pauses = metrics.pauses_total();
    let resumes = metrics.resumes.get();
    let log_text = String::from_utf8_lossy(&logs.0.lock().expect("logs")).to_string();
    if let Some(path) = std::env::var_os("DUMP_LOGS") {
        std::fs::write(path, &log_text).expect("dump logs");
    }
    if std::env::var_os("SHOW_LOGS").is_some() {
        for line in log_text
            .lines()
            .filter(|l| l.contains("paused") || l.contains("resumed"))
            .take(40)
        {
            println!("{line}");
        }
    }
    let paused_logs = log_text
        .matches("router channel full, partition paused")
        .count();
    println!(
        "b) 4000 records through a slow sink: pauses {pauses}, resumes {resumes}, paused in /metrics: {paused_in_scrape}, \
         'partition paused' log lines {paused_logs}; max in flight {max_in_flight} (bound {bound}), \
         max router depth {max_router_depth} (cap 32), max worker depth {max_worker_depth} (cap 2x8), \
         max held by the pipeline {max_held_too} (in flight + held for paused partitions)"
    );
    assert!(
        pauses > 0 && resumes > 0,
        "pauses {pauses}, resumes {resumes}"
    );
    assert!(
        paused_in_scrape,
        "a scrape of /metrics showed paused partitions"
    );
    assert!(paused_logs > 0, "the pause was logged");
    // The depth gauges show the backpressure: the router channel and the worker channels were
    // seen holding records, never more than their capacities (`router_capacity = 32`; two
    // workers of `worker_capacity = 8` on route `slow`, summed by the gauge).
    assert!(
        max_router_depth > 0 && max_worker_depth > 0,
        "the depth gauges never showed a queued record: router {max_router_depth}, worker {max_worker_depth}"
    );
    assert!(
        max_router_depth <= 32 && max_worker_depth <= 2 * 8,
        "channel depths beyond their capacities: router {max_router_depth} (cap 32), worker {max_worker_depth} (cap 16)"
    );
    assert!(
        max_in_flight <= bound,
        "in flight {max_in_flight} > bound {bound}"
    );
    // The README's bound: the in-flight bound, plus at most one consumer batch held back for
    // paused partitions (a batch the router had no room for; every partition pauses then):
    // "at most `min(router_capacity / 2, 256)` records", min(32 / 2, 256) = 16.
    let batch: i64 = 16;
    assert!(
        max_held_too <= bound + batch,
        "the pipeline held {max_held_too} records > bound {bound} + {batch} held"
    );
}
