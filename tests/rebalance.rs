//! A revoke that cannot drain in time: instance A's sink is slow, instance B joins the group and
//! takes half of the partitions. A's acks for the revoked partitions arrive after the revoke:
//! they are dropped as stale, never committed, and the committed offsets (sampled by a separate
//! client all along) never move backwards while B moves them forward.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::{HttpBind, RunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_acks_of_revoked_partitions_are_never_committed() {
    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..4_000u64)
        .map(|id| (Some(format!("key-{}", id % 200)), event(id, "error")))
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("late-acks");
    let config = kafka.config(
        &group,
        "router_capacity = 64\nworker_capacity = 16\ndrain_timeout_ms = 500",
        &file_route("errors", "[\"error\"]", 2, dir.path()),
    );

    // A: a sink that takes 1.5 s per batch.
    let metrics_a = Arc::new(Metrics::new());
    let a = Running::start(
        config.clone(),
        RunOptions {
            sink_factory: delayed_sinks(Duration::from_millis(1_500), 0..=0),
            metrics: metrics_a.clone(),
            http: HttpBind::Disabled,
        },
    );
    let busy = wait_for(Duration::from_secs(30), || {
        let metrics = metrics_a.clone();
        async move { metrics.assigned_partitions.get() == 4 && metrics.in_flight.get() > 0 }
    })
    .await;
    assert!(busy, "A never got busy");

    // Sample committed offsets with a separate client from here on.
    let sampler_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        let (brokers, topic, partitions, group) = (
            kafka.brokers.clone(),
            kafka.topic.clone(),
            kafka.partitions,
            group.clone(),
        );
        std::thread::spawn(move || {
            let reader = Kafka {
                cluster: None,
                brokers,
                topic,
                partitions,
                properties: Vec::new(),
                offset_readers: Default::default(),
            };
            let mut samples: Vec<Vec<i64>> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push(reader.committed(&group));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    // B joins with a fast sink: a rebalance moves two partitions from A to B.
    let metrics_b = Arc::new(Metrics::new());
    let b = Running::without_http(config, &metrics_b);
    let moved = wait_for(Duration::from_secs(60), || {
        let metrics = metrics_b.clone();
        async move { metrics.assigned_partitions.get() > 0 }
    })
    .await;
    assert!(moved, "B never got partitions");
    let b_partitions = metrics_b.assigned_partitions.get();
    // A's slow sink acks what it still held of the revoked partitions after the revoke.
    let stale = wait_for(Duration::from_secs(20), || {
        let metrics = metrics_a.clone();
        async move { metrics.stale_acks.get() > 0 }
    })
    .await;
    // Then A leaves (its slow sink may not finish within the drain timeout: what it abandons,
    // B reads again); B takes everything and finishes.
    let abandoned = a.stop_abandoning().await;
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    b.stop().await;

    let mut backwards = Vec::new();
    let mut highest: HashMap<usize, i64> = HashMap::new();
    for sample in &samples {
        for (partition, offset) in sample.iter().enumerate() {
            let top = highest.entry(partition).or_insert(-1);
            if *offset < *top {
                backwards.push((partition, *top, *offset));
            }
            *top = (*top).max(*offset);
        }
    }
    println!(
        "late acks: A stale acks {}, A abandoned {} (at its shutdown {abandoned}), B took {b_partitions} partitions, {} commit samples, backwards moves {backwards:?}",
        metrics_a.stale_acks.get(),
        metrics_a.abandoned.get(),
        samples.len()
    );
    assert!(
        done,
        "commits did not reach the end: {:?}",
        kafka.committed(&group)
    );
    assert!(stale, "A's late acks were not seen as stale");
    assert!(
        backwards.is_empty(),
        "a commit moved backwards: {backwards:?}"
    );
    assert_eq!(kafka.committed(&group), end);
}
