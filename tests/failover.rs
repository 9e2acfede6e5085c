//! Leader failover on a three-node Apache Kafka cluster (replication factor 3,
//! `min.insync.replicas = 2`): mid-stream, the node leading a partition of the source topic is
//! killed (SIGKILL) and started again, then the node leading a partition of the Kafka sink's
//! topic. Nothing is lost, each key's records stay in order in the output, the group's commits
//! reach the end of the source, and the time each failover took is printed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::apache::ApacheKafka;
use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::{HttpBind, RunOptions};

const EVENTS: u64 = 100_000;
const PARTITIONS: i32 = 6;

/// The committed offset gauge of one source partition.
fn committed_gauge(metrics: &Metrics, topic: &str, partition: i32) -> i64 {
    metrics
        .committed_offset
        .with_label_values(&[topic, &partition.to_string()])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_of_the_source_and_the_sink_topic_fail_over_without_loss_or_reordering() {
    let _serial = serial().await;
    let mut cluster = ApacheKafka::cluster();
    println!(
        "three-node cluster answering after {:?}",
        cluster.started_in
    );
    let kafka = Kafka::apache(&cluster, "failover", PARTITIONS).await;
    let output = format!("{}-out", kafka.topic);
    kafka.create_external_topic(&output, PARTITIONS).await;
    // Three fifths now; the rest once the source's failover is over, so the sink's failover
    // lands mid-stream however long the first one took (a restarted node can take a minute
    // to be answering and in sync again on a loaded machine).
    let first_part = EVENTS * 3 / 5;
    let mut produced = kafka.produce_samples(first_part, 0.0, 31).await;

    let group = unique("failover");
    let routes = format!(
        "[[routes]]\nname = \"all\"\nlevels = [\"debug\", \"info\", \"warning\", \"error\", \"fatal\"]\n\
         workers = 2\nsink = {{ type = \"kafka\", topic = \"{output}\" }}\n"
    );
    let config = kafka.config(&group, "", &routes);
    let metrics = Arc::new(Metrics::new());
    // About 300 µs of work per record: the run lasts long enough for both failovers to land
    // mid-stream. The sinks are held while the rest of the events is produced, so the sink's
    // failover finds them all still to be written however slowly the producer went.
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pipeline = Running::start(
        config,
        RunOptions {
            sink_factory: held_sinks(Duration::ZERO, 300..=300, hold.clone()),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
    );
    let consuming = wait_for(Duration::from_secs(60), || {
        let metrics = metrics.clone();
        async move { committed_total(&metrics) > (EVENTS / 10) as i64 }
    })
    .await;
    assert!(consuming, "the pipeline never got going");

    // The source: the leader of partition 0 dies; reading resumes from the new leader.
    let source_topic = kafka.topic.clone();
    let committed_at_first = kafka.committed_records(&group);
    let (source_node, source_led, source_resumed) = cluster
        .kill_leader(&kafka.topic, 0, || {
            committed_gauge(&metrics, &source_topic, 0)
        })
        .await;
    let source_resumed = source_resumed.unwrap_or_else(|stalled| panic!("{stalled}"));
    cluster.start_node(source_node);
    // Answering again (launched again if a port of its was taken while it was down).
    cluster.wait_ready(Duration::from_secs(90));
    assert!(
        cluster
            .wait_in_sync(&[&kafka.topic, &output], source_node)
            .await,
        "node {source_node} did not catch up"
    );

    // The sink: the leader of an output partition dies; producing resumes to the new leader.
    hold.store(true, std::sync::atomic::Ordering::Relaxed);
    let rest = kafka
        .produce_samples_from(first_part, EVENTS - first_part, 0.0, 32)
        .await;
    produced.valid_ids.extend(rest.valid_ids);
    let end = kafka.end_offsets();
    let committed_at_second = kafka.committed_records(&group);
    hold.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(
        committed_at_second < end.iter().sum::<i64>() * 9 / 10,
        "the run is nearly over before the sink's failover: {committed_at_second} committed"
    );
    // One client while it answers, a new one after a failure: one that knew the dead leader
    // asks it until its metadata is refreshed. While the partition has no leader: no progress
    // either.
    let watermarks: std::cell::RefCell<Option<rdkafka::consumer::BaseConsumer>> =
        std::cell::RefCell::default();
    let (sink_node, sink_led, sink_resumed) = cluster
        .kill_leader(&output, 0, || {
            use rdkafka::consumer::Consumer;
            let mut client = watermarks.borrow_mut();
            if client.is_none() {
                *client = kafka.client().create().ok();
            }
            let high = client.as_ref().and_then(|client| {
                client
                    .fetch_watermarks(&output, 0, Duration::from_secs(1))
                    .ok()
            });
            if high.is_none() {
                *client = None;
            }
            high.map_or(i64::MIN, |(_, high)| high)
        })
        .await;
    let sink_resumed = sink_resumed.unwrap_or_else(|stalled| panic!("{stalled}"));
    cluster.start_node(sink_node);
    cluster.wait_ready(Duration::from_secs(90));

    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(180))
        .await;
    pipeline.stop().await;
    assert!(
        done,
        "commits did not reach the end: {:?} vs {end:?}",
        kafka.committed(&group)
    );

    // Every event in the output; per key, the last copy of each record after the last copy
    // of every earlier one (what a retry or a replay may repeat, it repeats in order).
    let records = kafka.read_all(&output);
    let mut by_key: HashMap<Vec<u8>, Vec<(i32, i64)>> = HashMap::new();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for record in &records {
        let value: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap_or_default())
                .expect("output is JSON");
        let id = value["event"]["id"]
            .as_u64()
            .or_else(|| value["id"].as_u64())
            .unwrap_or_else(|| panic!("output without an id: {value}"));
        *seen.entry(id).or_insert(0) += 1;
        let (partition, offset) = record.source();
        by_key
            .entry(record.key.clone().unwrap_or_default())
            .or_default()
            .push((partition, offset));
    }
    let mut out_of_order = 0;
    for copies in by_key.values() {
        if by_last_copy(copies)
            .windows(2)
            .any(|pair| pair[0].0 == pair[1].0 && pair[0].1 > pair[1].1)
        {
            out_of_order += 1;
        }
    }
    let (missing, duplicates) = produced.lost_and_duplicates(&seen);
    let rebalances = |kind: &str| metrics.rebalances.with_label_values(&[kind]).get();
    println!(
        "failover: {EVENTS} events over {PARTITIONS} partitions. Source leader (node {source_node}) killed \
         at {committed_at_first} committed: partition led again after {source_led:.1?}, its commits moved \
         after {source_resumed:.1?}. Sink leader (node {sink_node}) killed at {committed_at_second} committed: \
         partition led again after {sink_led:.1?}, written to again after {sink_resumed:.1?}. \
         Lost {missing}, duplicates {duplicates}, keys out of order {out_of_order}; rebalances: assign {}, \
         revoke {}, lost {}",
        rebalances("assign"),
        rebalances("revoke"),
        rebalances("lost")
    );
    assert_eq!(missing, 0, "events lost across the failovers");
    assert_eq!(out_of_order, 0, "keys out of order in the output");
}
