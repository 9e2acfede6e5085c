//! Pipeline tests against an in-process Kafka-protocol broker (librdkafka's mock cluster over
//! loopback TCP). Each asserts on what a separate Kafka client or the sink output reads back.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use logbridge::metrics::{Metrics, NO_ROUTE};
use logbridge::pipeline::{HttpBind, RunOptions};
use logbridge::sink::{config_sink_factory, SinkFactory};

fn options(metrics: &Arc<Metrics>, sinks: SinkFactory) -> RunOptions {
    RunOptions {
        sink_factory: sinks,
        metrics: metrics.clone(),
        http: HttpBind::Disabled,
    }
}

const LEVELS: [&str; 3] = ["error", "warning", "info"];

/// Runs `config` with its own sinks until the commits reach `end` (within 60 s) and stops;
/// checks that they did, as a separate client reads them too, and returns the metrics.
async fn run_to_the_end(
    kafka: &Kafka,
    group: &str,
    config: logbridge::Config,
    end: &[i64],
) -> Arc<Metrics> {
    let (done, metrics) = kafka
        .run_until_committed(group, config, Duration::from_secs(60))
        .await;
    assert!(done, "commits did not reach the end");
    assert_eq!(kafka.committed(group), end);
    metrics
}

/// a) 20 000 events over 4 partitions, 2 routes, random per-record work time: every valid event
/// in its sink exactly once, per-key order kept, committed offset = end offset everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_its_sink_and_commits_reach_the_end() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..20_000u64)
        .map(|id| {
            (
                Some(format!("key-{}", id % 500)),
                event(id, LEVELS[(id % 3) as usize]),
            )
        })
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    assert_eq!(end.iter().sum::<i64>(), 20_000);

    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("all-events");
    let config = kafka.config(
        &group,
        "router_capacity = 256\nworker_capacity = 64",
        &two_file_routes(dir.path(), ("[\"error\", \"fatal\"]", 4), ("[\"warn\"]", 2)),
    );
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::start(
        config,
        options(&metrics, delayed_sinks(Duration::ZERO, 0..=300)),
    );
    let total: i64 = end.iter().sum();
    let done = wait_committed(&metrics, total, Duration::from_secs(120)).await;
    pipeline.stop().await;
    assert!(
        done,
        "commits did not reach the end: {}",
        committed_total(&metrics)
    );
    assert_eq!(
        kafka.committed(&group),
        end,
        "committed offsets read back by a separate client"
    );

    let errors = read_lines(&[dir.path().join("errors.jsonl")]);
    let warnings = read_lines(&[dir.path().join("warnings.jsonl")]);
    for (lines, level, route) in [
        (&errors, "error", "errors"),
        (&warnings, "warning", "warnings"),
    ] {
        let counts = id_counts(lines);
        let expected: Vec<u64> = (0..20_000u64)
            .filter(|id| LEVELS[(id % 3) as usize] == level)
            .collect();
        assert_eq!(counts.len(), expected.len(), "{route}: distinct events");
        for id in &expected {
            assert_eq!(counts.get(id), Some(&1), "{route}: event {id} exactly once");
        }
        // Same key → same worker → in offset order within the route's file.
        let mut last: HashMap<(String, i64), i64> = HashMap::new();
        for line in lines.iter() {
            assert_eq!(line["route"], route);
            assert_eq!(line["event"]["level"], level);
            let key = line["key"].as_str().expect("key").to_string();
            let partition = line["partition"].as_i64().expect("partition");
            let offset = line["offset"].as_i64().expect("offset");
            if let Some(previous) = last.insert((key.clone(), partition), offset) {
                assert!(
                    previous < offset,
                    "key {key} out of order: {previous} then {offset}"
                );
            }
        }
    }
    let ignored = metrics
        .finished
        .with_label_values(&[NO_ROUTE, "ignored"])
        .get();
    assert_eq!(
        ignored,
        (0..20_000u64).filter(|id| id % 3 == 2).count() as u64
    );
    println!(
        "a) 20000 events: errors {} lines, warnings {} lines, ignored {ignored}, committed {:?}",
        errors.len(),
        warnings.len(),
        end
    );
}

/// c) Shutdown mid-stream, then a restart with the same group: the union of both outputs holds
/// every event, and events written twice are at most the pipeline's in-flight bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stream_then_restart_loses_nothing() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..20_000u64)
        .map(|id| {
            (
                Some(format!("key-{}", id % 300)),
                event(id, if id % 2 == 0 { "error" } else { "warning" }),
            )
        })
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("restart");
    let config = kafka.config(
        &group,
        "router_capacity = 512\nworker_capacity = 64",
        &two_file_routes(dir.path(), ("[\"error\"]", 3), ("[\"warning\"]", 2)),
    );
    // The README's record bound ("Memory"), from this test's literals, not from the code under
    // test: `router_capacity + min(router_capacity, 256) + Σ workers × (worker_capacity + s × b)
    // + max(2, ⌈router_capacity / 64⌉) × b` with `b = min(worker_capacity, 256)` and `s = 1` for
    // file routes: 512 + 256 + 3 × (64 + 64) + 2 × (64 + 64) + max(2, 8) × 64 = 1920.
    let bound = 1_920;

    // First run: slow enough that shutdown lands mid-stream.
    let metrics = Arc::new(Metrics::new());
    let first = Running::start(
        config.clone(),
        options(&metrics, delayed_sinks(Duration::ZERO, 100..=400)),
    );
    let processed = |metrics: &Metrics| {
        metrics
            .finished
            .with_label_values(&["errors", "processed"])
            .get()
            + metrics
                .finished
                .with_label_values(&["warnings", "processed"])
                .get()
    };
    let started = wait_for(Duration::from_secs(60), || {
        let metrics = metrics.clone();
        async move { processed(&metrics) >= 4_000 }
    })
    .await;
    assert!(started, "first run made no progress");
    let stop_asked = Instant::now();
    first.stop().await;
    let stop_took = stop_asked.elapsed();
    let committed_after_first = kafka.committed(&group);
    let first_total: i64 = committed_after_first.iter().map(|o| o.max(&0)).sum();
    // A graceful stop that drained fully (stop() says so) commits exactly what finished: every
    // record read was dispatched and finished, so each partition's finished records form its
    // committed prefix.
    let finished_first = processed(&metrics) as i64;
    assert_eq!(
        first_total, finished_first,
        "the final commit covers exactly what finished in the first run"
    );
    assert!(
        first_total < end.iter().sum::<i64>(),
        "the first run should have stopped mid-stream, committed {committed_after_first:?} of {end:?}"
    );
    assert!(
        stop_took < Duration::from_millis(config.pipeline.drain_timeout_ms + 2_000),
        "shutdown took {stop_took:?}"
    );

    // Second run with the same group finishes the topic.
    let metrics = Arc::new(Metrics::new());
    let second = Running::start(config, options(&metrics, config_sink_factory()));
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    second.stop().await;
    assert!(
        done,
        "second run did not commit to the end: {:?} vs {end:?}",
        kafka.committed(&group)
    );

    let lines = read_lines(&[
        dir.path().join("errors.jsonl"),
        dir.path().join("warnings.jsonl"),
    ]);
    let counts = id_counts(&lines);
    let missing: Vec<u64> = (0..20_000u64)
        .filter(|id| !counts.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost events: {:?}",
        &missing[..missing.len().min(20)]
    );
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "c) 20000 events, stopped after {first_total} committed in {stop_took:?}; duplicates after restart: {duplicates} (bound {bound})"
    );
    assert_eq!(
        duplicates, 0,
        "a graceful stop replays nothing (in-flight bound {bound})"
    );
}

/// d) Malformed records among valid ones: each counted under its reason, logged, acked as
/// failed, and the valid ones all delivered with commits at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_counted_and_do_not_disturb_the_rest() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let malformed: Vec<(&[u8], &str)> = vec![
        (b"{\"level\":\"error\",\"message\":", "not_json"),
        (b"plain text", "not_json"),
        (b"[1,2,3]", "not_object"),
        (b"\"a string\"", "not_object"),
        (b"{\"message\":\"no level\"}", "missing_field"),
        (b"{\"level\":\"error\"}", "missing_field"),
        (
            b"{\"level\":\"error\",\"message\":\"m\",\"code\":4294967296}",
            "wrong_type",
        ),
        (b"{\"level\":7,\"message\":\"m\"}", "wrong_type"),
        (
            b"{\"level\":\"error\",\"level\":\"info\",\"message\":\"m\"}",
            "duplicate_field",
        ),
        (b"\xff\xfe{}", "not_utf8"),
        (b"", "empty"),
    ];
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut expected: HashMap<&str, u64> = HashMap::new();
    let mut id = 0u64;
    for round in 0..30 {
        for (payload, reason) in &malformed {
            records.push((Some(format!("bad-{round}")), payload.to_vec()));
            *expected.entry(reason).or_default() += 1;
            for _ in 0..6 {
                records.push((
                    Some(format!("key-{}", id % 50)),
                    event(id, if id % 2 == 0 { "error" } else { "warning" }),
                ));
                id += 1;
            }
        }
        records.push((None, deep.clone()));
        *expected.entry("too_deep").or_default() += 1;
    }
    let valid = id;
    kafka.produce(&records).await;
    let end = kafka.end_offsets();

    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("malformed");
    let config = kafka.config(
        &group,
        "",
        &two_file_routes(dir.path(), ("[\"error\"]", 2), ("[\"warning\"]", 2)),
    );
    let metrics = run_to_the_end(&kafka, &group, config, &end).await;

    for (reason, count) in &expected {
        assert_eq!(
            metrics.decode_errors.with_label_values(&[reason]).get(),
            *count,
            "decode errors with reason {reason}"
        );
    }
    let bad: u64 = expected.values().sum();
    assert_eq!(
        metrics
            .finished
            .with_label_values(&[NO_ROUTE, "failed"])
            .get(),
        bad
    );
    let lines = read_lines(&[
        dir.path().join("errors.jsonl"),
        dir.path().join("warnings.jsonl"),
    ]);
    let counts = id_counts(&lines);
    assert_eq!(counts.len() as u64, valid, "every valid event delivered");
    assert!(counts.values().all(|n| *n == 1));
    println!("d) {valid} valid and {bad} malformed records: {expected:?}");
}

/// `[input] format = "auto"`: a mix of what common loggers write, each routed by its level
/// (the strict format would refuse all but the first shape), and what has no level anywhere
/// is still refused, counted and finished as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auto_format_routes_what_common_loggers_write() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 2);
    // Each shape with an `id` to find it by, and the route it must reach.
    let shapes: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"level": "error", "message": "logbridge"}),
            "errors",
        ),
        (
            serde_json::json!({"level": 50, "time": 1714557600000u64, "msg": "pino"}),
            "errors",
        ),
        (
            serde_json::json!({"level": 30, "time": 1714557600000u64, "msg": "pino"}),
            "rest",
        ),
        (
            serde_json::json!({"level": "warn", "ts": 1714557600.5, "msg": "zap"}),
            "rest",
        ),
        (
            serde_json::json!({"level": "ERROR", "msg": "slog", "time": "2024-05-01T10:00:00Z"}),
            "errors",
        ),
        (
            serde_json::json!({"log.level": "error", "message": "ecs flat"}),
            "errors",
        ),
        (
            serde_json::json!({"log": {"level": "info"}, "message": "ecs nested"}),
            "rest",
        ),
        (
            serde_json::json!({"severity": "CRITICAL", "message": "gcp"}),
            "errors",
        ),
        (
            serde_json::json!({"severityNumber": 17, "body": "otel"}),
            "errors",
        ),
        (
            serde_json::json!({"levelname": "WARNING", "message": "python"}),
            "rest",
        ),
        (
            serde_json::json!({"event": "structlog", "level": "info"}),
            "rest",
        ),
        (serde_json::json!({"@mt": "serilog {X}", "X": 1}), "rest"),
        (
            serde_json::json!({"@mt": "serilog", "@l": "Fatal"}),
            "errors",
        ),
        (
            serde_json::json!({"level": "INFO", "fields": {"message": "tracing"}}),
            "rest",
        ),
        // Routed by service too, wherever the logger put it.
        (
            serde_json::json!({"level": "error", "service": "checkout", "message": "m"}),
            "checkout",
        ),
        (
            serde_json::json!({"log.level": "error", "service.name": "checkout"}),
            "checkout",
        ),
        (
            serde_json::json!({"level": 50, "service": {"name": "checkout"}, "msg": "m"}),
            "checkout",
        ),
        (
            serde_json::json!({"severity": "ERROR", "serviceContext": {"service": "checkout"}}),
            "checkout",
        ),
        (
            serde_json::json!({"level": "error", "service": "billing", "message": "m"}),
            "errors",
        ),
        (
            serde_json::json!({"level": "info", "service": "checkout", "message": "m"}),
            "rest",
        ),
    ];
    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut expected: HashMap<u64, &str> = HashMap::new();
    for round in 0..20u64 {
        for (n, (shape, route)) in shapes.iter().enumerate() {
            let id = round * 100 + n as u64;
            let mut event = shape.clone();
            event["id"] = id.into();
            records.push((
                Some(format!("key-{}", id % 7)),
                event.to_string().into_bytes(),
            ));
            expected.insert(id, route);
        }
        records.push((
            Some("none".into()),
            br#"{"msg":"no level anywhere"}"#.to_vec(),
        ));
    }
    kafka.produce(&records).await;
    let end = kafka.end_offsets();

    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("auto-format");
    let mut config = kafka.config(
        &group,
        "",
        &format!(
            "{}services = [\"checkout\"]\n{}{}",
            file_route("checkout", "[\"error\"]", 1, dir.path()),
            file_route(
                "errors",
                "[\"error\", \"fatal\", \"critical\"]",
                2,
                dir.path()
            ),
            file_route(
                "rest",
                "[\"info\", \"warning\", \"debug\", \"trace\"]",
                2,
                dir.path()
            )
        ),
    );
    config.input.format = logbridge::event::InputFormat::Auto;
    let metrics = run_to_the_end(&kafka, &group, config, &end).await;

    let mut misrouted = Vec::new();
    let mut seen = 0;
    for route in ["checkout", "errors", "rest"] {
        let lines = read_lines(&[dir.path().join(format!("{route}.jsonl"))]);
        for (id, _) in id_counts(&lines) {
            seen += 1;
            if expected.get(&id) != Some(&route) {
                misrouted.push((id, route));
            }
        }
    }
    println!(
        "auto format: {seen} of {} events routed, {} misrouted, e.g. {:?}",
        expected.len(),
        misrouted.len(),
        &misrouted[..misrouted.len().min(10)]
    );
    assert!(
        misrouted.is_empty(),
        "{} misrouted (id, route), e.g. {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(10)]
    );
    assert_eq!(seen, expected.len(), "every event routed once");
    assert_eq!(
        metrics
            .decode_errors
            .with_label_values(&["missing_field"])
            .get(),
        20,
        "the events without a level are refused and counted"
    );
}
