//! After a rebalance moves partitions away, their series disappear from the old owner's
//! /metrics (dashboards never show a stale owner), and `/status` lists each owner's partitions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::RunOptions;

fn owned(status: &str) -> Vec<i64> {
    let page = parse_json("/status", status);
    json_array(&page, "/partitions")
        .iter()
        .map(|p| json_i64(p, "/partition"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_partitions_leave_no_series_behind() {
    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..4_000u64)
        .map(|id| (Some(format!("key-{id}")), event(id, "error")))
        .collect();
    kafka.produce(&records).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("series");
    let config = kafka.config(
        &group,
        "",
        &file_route("errors", "[\"error\"]", 2, dir.path()),
    );

    let metrics_a = Arc::new(Metrics::new());
    let (a, address_a) = Running::start_serving(
        config.clone(),
        RunOptions {
            sink_factory: delayed_sinks(Duration::from_millis(20), 0..=0),
            metrics: metrics_a.clone(),
            ..RunOptions::default()
        },
    )
    .await;
    let all_four = wait_for(Duration::from_secs(30), || async move {
        let (_, text) = http_get(address_a, "/metrics").await;
        (0..4).all(|p| {
            text.contains(&format!(
                "logbridge_partition_in_flight_records{{partition=\"{p}\""
            ))
        })
    })
    .await;
    assert!(all_four, "A did not get series for all four partitions");

    let metrics_b = Arc::new(Metrics::new());
    let (b, address_b) = Running::start_serving(
        config,
        RunOptions {
            metrics: metrics_b.clone(),
            ..RunOptions::default()
        },
    )
    .await;
    let split = wait_for(Duration::from_secs(60), || {
        let (a, b) = (metrics_a.clone(), metrics_b.clone());
        async move { a.assigned_partitions.get() == 2 && b.assigned_partitions.get() == 2 }
    })
    .await;
    assert!(split, "the group did not split the partitions");
    // A's series of the partitions B owns are gone (waited for with a deadline, across
    // several of A's commit intervals, in which it publishes its gauges again).
    let stale_of_a = || async {
        let (_, status_a) = http_get(address_a, "/status").await;
        let (_, status_b) = http_get(address_b, "/status").await;
        let (_, metrics_text_a) = http_get(address_a, "/metrics").await;
        let (owned_a, owned_b) = (owned(&status_a), owned(&status_b));
        let stale: Vec<String> = metrics_text_a
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                owned_b
                    .iter()
                    .any(|p| line.contains(&format!("partition=\"{p}\"")))
            })
            .map(String::from)
            .collect();
        (owned_a, owned_b, stale)
    };
    let settled = wait_for(Duration::from_secs(10), || async {
        let (owned_a, owned_b, stale) = stale_of_a().await;
        owned_a.len() == 2 && owned_b.len() == 2 && stale.is_empty()
    })
    .await;
    // Still none a while later: removed, not merely not yet republished.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (owned_a, owned_b, stale) = stale_of_a().await;
    assert!(settled, "A kept series of B's partitions: {stale:?}");
    println!(
        "series: A owns {owned_a:?}, B owns {owned_b:?}; A's series of B's partitions: {stale:?}"
    );
    b.stop().await;
    a.stop().await;
    assert_eq!(owned_a.len(), 2);
    assert_eq!(owned_b.len(), 2);
    assert!(
        stale.is_empty(),
        "A still exports series of partitions B owns: {stale:?}"
    );
}
