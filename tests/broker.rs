//! Broker tier: the real `logbridge` binary against a Kafka-compatible broker *process* (tansu
//! with SQLite storage, started per test on a free loopback port and stopped afterwards).
//!
//! - SIGTERM: exit code 0 within `drain_timeout_ms` + 2 s, and a restart replays nothing.
//! - Broker restart mid-run: logbridge recovers on its own, zero loss.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::process::{Instance, Logbridge, Tansu};
use common::*;

fn outputs(out: &std::path::Path) -> Vec<serde_json::Value> {
    read_lines(&[
        out.join("errors.jsonl"),
        out.join("warnings.jsonl"),
        out.join("rest.jsonl"),
    ])
}

async fn finished(child: &Logbridge) -> f64 {
    child
        .metric("logbridge_events_finished_total")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_in_time_and_restart_replays_nothing() {
    let _serial = serial().await;
    let broker = Tansu::start();
    let kafka = Kafka::external(&broker.brokers(), "graceful", 4).await;
    const EVENTS: u64 = 30_000;
    let produced = kafka.produce_samples(EVENTS, 0.01, 7).await;
    let end = kafka.end_offsets();
    assert_eq!(
        end.iter().sum::<i64>(),
        EVENTS as i64,
        "tansu (sqlite) end offsets"
    );

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("graceful");
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut stops = Vec::new();
    for run in 0..4 {
        let instance = Instance::start(
            &kafka.brokers,
            &kafka.topic,
            &group,
            work.path(),
            &format!("run-{run}"),
            "",
        );
        let out = instance.out;
        let mut child = instance.child;
        let last = run == 3;
        let progressed = wait_for(Duration::from_secs(120), || {
            let child = &child;
            let (kafka, group, end) = (&kafka, &group, &end);
            async move {
                if last {
                    kafka.committed(group) == *end
                } else {
                    finished(child).await > 2_000.0
                }
            }
        })
        .await;
        assert!(progressed, "run {run} made no progress");
        let (status, took) = child.terminate(Duration::from_secs(15));
        stops.push(took);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "run {run}: exit code after SIGTERM"
        );
        assert!(
            took <= Duration::from_millis(3_000 + 2_000),
            "run {run}: SIGTERM to exit took {took:?}, over drain_timeout_ms + 2 s"
        );
        for (id, count) in id_counts(&outputs(&out)) {
            *seen.entry(id).or_insert(0) += count;
        }
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let missing = produced
        .valid_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    println!(
        "graceful: {EVENTS} events over 4 runs stopped by SIGTERM in {stops:?}; lost {missing}, duplicates {duplicates}"
    );
    assert_eq!(missing, 0, "events lost");
    assert_eq!(duplicates, 0, "a graceful stop must not replay anything");
    assert_eq!(kafka.committed(&group), end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_recovers_without_restarting_logbridge() {
    let _serial = serial().await;
    let mut broker = Tansu::start();
    let kafka = Kafka::external(&broker.brokers(), "restart", 4).await;
    const EVENTS: u64 = 60_000;
    let produced = kafka.produce_samples(EVENTS, 0.0, 11).await;
    let end = kafka.end_offsets();

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("broker-restart");
    // tansu's SQLite engine reads about 13 000 records/s, so the restart lands mid-run.
    let instance = Instance::start(
        &kafka.brokers,
        &kafka.topic,
        &group,
        work.path(),
        "logbridge",
        "\"reconnect.backoff.max.ms\" = 1000",
    );
    let out = instance.out;
    let mut child = instance.child;
    let started = wait_for(Duration::from_secs(60), || {
        let child = &child;
        async move { finished(child).await > 1_000.0 }
    })
    .await;
    if !started {
        let log = std::fs::read_to_string(work.path().join("logbridge.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "logbridge never started consuming; log tail:\n{}",
            tail.join("\n")
        );
    }

    let before = finished(&child).await;
    let restart_started = Instant::now();
    broker.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();
    println!(
        "broker stopped and restarted in {:?}, {before} records finished before",
        restart_started.elapsed()
    );

    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(180))
        .await;
    assert!(
        child.running(),
        "logbridge must survive the broker restart on its own"
    );
    let (status, _) = child.terminate(Duration::from_secs(15));
    assert!(
        done,
        "commits did not reach the end after the broker restart: {:?} vs {end:?}",
        kafka.committed(&group)
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));

    let seen = id_counts(&outputs(&out));
    let missing = produced
        .valid_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "broker restart: {EVENTS} events, {before} finished before the restart; lost {missing}, duplicates {duplicates}"
    );
    assert_eq!(missing, 0, "events lost across the broker restart");
    assert!(before < EVENTS as f64, "the restart should land mid-run");
}
