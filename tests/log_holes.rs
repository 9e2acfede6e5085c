//! Source logs whose offsets are not consecutive, on Apache Kafka (this binary's shared broker):
//! only a real broker writes them.
//!
//! - A topic written by a transactional producer, with aborted transactions among committed
//!   ones: the log holds aborted records and a control record (commit or abort marker) after
//!   every transaction. Under logbridge's default isolation level (`read_committed`) nothing
//!   aborted is delivered, every committed record is, and the group's commits reach the end of
//!   the log although its last offset is a marker no consumer ever receives.
//! - A compacted topic after the log cleaner ran: offsets with gaps where older values of a key
//!   were removed. Every record still in the log is delivered once and commits reach the end.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use logbridge::metrics::Metrics;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const TIMEOUT: Duration = Duration::from_secs(10);

type TxnProducer = ThreadedProducer<DefaultProducerContext>;

fn transactional(kafka: &Kafka, id: &str) -> TxnProducer {
    common::transactional_producer(kafka, id)
}

/// A transaction of events `ids` (keyed by id, so spread over the partitions), committed or
/// aborted.
fn transaction(producer: &TxnProducer, topic: &str, ids: std::ops::Range<u64>, commit: bool) {
    producer.begin_transaction().expect("begin");
    for id in ids {
        let payload = event(id, "info");
        let key = format!("key-{id}");
        producer
            .send(BaseRecord::to(topic).key(&key).payload(&payload))
            .expect("queued");
    }
    if commit {
        producer.commit_transaction(TIMEOUT).expect("commit");
    } else {
        producer.flush(TIMEOUT).expect("flush");
        producer.abort_transaction(TIMEOUT).expect("abort");
    }
}

/// Every event id in the file sink's output, with how many times each was written.
fn ids_written(dir: &std::path::Path) -> std::collections::HashMap<u64, usize> {
    id_counts(&read_lines(&[dir.join("all.jsonl")]))
}

/// Runs `config` until `group` committed `end` (60 s at most), then on for longer than its
/// stall timeout (1 s): returns whether the commits got there, the metrics, and how many
/// partitions counted as behind and unread at the end.
async fn run_past_the_stall_timeout(
    kafka: &Kafka,
    group: &str,
    config: logbridge::Config,
    end: &[i64],
) -> (bool, Arc<Metrics>, i64) {
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::without_http(config, &metrics);
    let done = kafka
        .wait_committed_to(group, end, Duration::from_secs(60))
        .await;
    // Time let pass on purpose: past the stall timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let unread = metrics
        .stalled_partitions
        .with_label_values(&["unread"])
        .get();
    pipeline.stop().await;
    (done, metrics, unread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_source_delivers_only_committed_records_and_commits_to_the_end() {
    let _serial = serial().await;
    let kafka = Kafka::shared("txn-source", 3).await;
    let producer = transactional(&kafka, &unique("txn-source"));
    // Committed, aborted, committed, aborted, committed: the log of every partition ends with a
    // commit marker, after aborted records and their abort markers.
    let mut committed = HashSet::new();
    for (round, commit) in [true, false, true, false, true].into_iter().enumerate() {
        let ids = round as u64 * 1_000..round as u64 * 1_000 + 600;
        if commit {
            committed.extend(ids.clone());
        }
        transaction(&producer, &kafka.topic, ids, commit);
    }
    let end = kafka.end_offsets();
    assert_eq!(
        end.iter().sum::<i64>(),
        3_000 + 5 * 3,
        "the log holds the aborted records and a marker per transaction and partition"
    );

    let group = unique("txn-source");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(
        &group,
        "stall_timeout_ms = 1000",
        &file_route("all", "[\"info\"]", 2, dir.path()),
    );
    let (done, metrics, unread) = run_past_the_stall_timeout(&kafka, &group, config, &end).await;
    let written = ids_written(dir.path());
    let aborted: Vec<u64> = written
        .keys()
        .filter(|id| !committed.contains(id))
        .copied()
        .collect();
    let missing = committed
        .iter()
        .filter(|id| !written.contains_key(id))
        .count();
    println!(
        "transactional source: log ends {end:?}, committed {:?}; {} of {} committed events written, \
         {} aborted written, {} consumed, unread stalls {unread}",
        kafka.committed(&group),
        written.len(),
        committed.len(),
        aborted.len(),
        consumed_total(&metrics)
    );
    assert!(aborted.is_empty(), "aborted records delivered: {aborted:?}");
    assert_eq!(unread, 0, "a partition past its last marker is not behind");
    assert_eq!(missing, 0, "committed records missing");
    assert!(written.values().all(|n| *n == 1), "a record written twice");
    assert!(
        done,
        "commits did not reach the end of the log: {:?} vs {end:?}",
        kafka.committed(&group)
    );

    // A group committed right before each partition's final marker (as a run that stopped
    // before it stepped over the marker leaves it): a new run reads no record, steps over the
    // marker, commits the end, and reports no partition as behind and unread.
    let group = unique("txn-source-at-marker");
    {
        use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
        let client: BaseConsumer = kafka
            .client()
            .set("group.id", &group)
            .create()
            .expect("client");
        let mut before_markers = rdkafka::TopicPartitionList::new();
        for (partition, end) in end.iter().enumerate() {
            before_markers
                .add_partition_offset(
                    &kafka.topic,
                    partition as i32,
                    rdkafka::Offset::Offset(end - 1),
                )
                .expect("offset");
        }
        client
            .commit(&before_markers, CommitMode::Sync)
            .expect("commit before the markers");
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(
        &group,
        "stall_timeout_ms = 1000",
        &file_route("all", "[\"info\"]", 1, dir.path()),
    );
    let (done, _, unread) = run_past_the_stall_timeout(&kafka, &group, config, &end).await;
    println!(
        "transactional source from before the markers: committed {:?}, {} events written, unread stalls {unread}",
        kafka.committed(&group),
        ids_written(dir.path()).len()
    );
    assert!(done, "not committed past the markers");
    assert!(ids_written(dir.path()).is_empty(), "nothing to deliver");
    assert_eq!(unread, 0, "a partition past its marker is not behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_source_with_gaps_is_delivered_and_committed_to_the_end() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};

    let _serial = serial().await;
    let broker = common::apache::shared();
    let topic = unique("compacted");
    // Segments roll every 100 ms and the cleaner takes any dirty segment, so the older
    // values of each key are gone within a few seconds.
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        broker.client().create().expect("admin");
    let new_topic = NewTopic::new(&topic, 2, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "100")
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("min.compaction.lag.ms", "0");
    let created = admin
        .create_topics([&new_topic], &AdminOptions::new())
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let kafka = Kafka::external(&broker.brokers(), &topic, 2).await;

    // 40 keys written again in every round, and in each round one key written only then: the
    // cleaner keeps the last value of each, so the once-written records stay between the
    // removed ones. Rounds apart, so that the early ones land in closed segments.
    const KEYS: u64 = 40;
    const VERSIONS: u64 = 50;
    for version in 0..VERSIONS {
        let records: Vec<(Option<String>, Vec<u8>)> = (0..=KEYS)
            .map(|key| {
                let id = version * (KEYS + 1) + key;
                let key = if key == KEYS {
                    format!("once-{version}")
                } else {
                    format!("key-{key}")
                };
                (Some(key), event(id, "info"))
            })
            .collect();
        kafka.produce(&records).await;
        // Pacing: the rounds apart (segments roll every 100 ms).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = (KEYS + 1) * VERSIONS;
    // The cleaner has run once a reader sees fewer records than were written.
    let started = Instant::now();
    let mut remaining = kafka.read_all(&kafka.topic);
    let mut next_id = total;
    while remaining.len() as u64 > total / 2 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A record now and then rolls the active segment, so that it can be cleaned too.
        kafka
            .produce(&[(Some("key-0".into()), event(next_id, "info"))])
            .await;
        next_id += 1;
        remaining = kafka.read_all(&kafka.topic);
    }
    let end = kafka.end_offsets();
    let in_log: HashSet<u64> = remaining
        .iter()
        .filter_map(|record| {
            let value: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref()?).ok()?;
            value["id"].as_u64()
        })
        .collect();
    let offsets: Vec<(i32, i64)> = remaining.iter().map(|r| (r.partition, r.offset)).collect();
    let gaps = offsets
        .windows(2)
        .filter(|pair| pair[0].0 == pair[1].0 && pair[1].1 > pair[0].1 + 1)
        .count();
    println!(
        "compacted source: {} records written, {} left after cleaning over offsets ending {end:?}, {gaps} gaps",
        end.iter().sum::<i64>(),
        remaining.len()
    );
    assert!(gaps > 0, "the cleaner left no gap to read over");

    let group = unique("compacted");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(&group, "", &file_route("all", "[\"info\"]", 2, dir.path()));
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::without_http(config, &metrics);
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    pipeline.stop().await;
    let written = ids_written(dir.path());
    // The cleaner may still have run while logbridge read: what it wrote is a subset of what
    // the log held when the reader read it, and every key's last value is there.
    let unexpected: Vec<&u64> = written.keys().filter(|id| !in_log.contains(id)).collect();
    // The last round's values and every once-written record.
    let last_values: HashSet<u64> = in_log
        .iter()
        .copied()
        .filter(|id| *id >= (VERSIONS - 1) * (KEYS + 1) || id % (KEYS + 1) == KEYS)
        .collect();
    let missing_last = last_values
        .iter()
        .filter(|id| !written.contains_key(id))
        .count();
    println!(
        "compacted source: {} events written, committed {:?}",
        written.len(),
        kafka.committed(&group)
    );
    assert!(
        unexpected.is_empty(),
        "events written that the compacted log no longer held: {unexpected:?}"
    );
    assert_eq!(missing_last, 0, "every key's last value is written");
    assert!(written.values().all(|n| *n == 1), "a record written twice");
    assert!(
        done,
        "commits did not reach the end: {:?} vs {end:?}",
        kafka.committed(&group)
    );
}

/// A topic deleted and created again under a running logbridge: the new topic's log starts at
/// offset 0 again, below everything read of the old one. Its records are new and all delivered
/// (before, every offset at or below the last one read under the assignment was skipped as
/// "returned again", and committed past unread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_and_created_again_is_read_from_its_new_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let _serial = serial().await;
    let kafka = Kafka::shared("recreated", 1).await;
    let old: Vec<(Option<String>, Vec<u8>)> = (0..1_000)
        .map(|id| (Some(format!("key-{id}")), event(id, "info")))
        .collect();
    kafka.produce(&old).await;
    let group = unique("recreated");
    let dir = tempfile::tempdir().expect("dir");
    let config = kafka.config(&group, "", &file_route("all", "[\"info\"]", 2, dir.path()));
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::without_http(config, &metrics);
    assert!(
        kafka
            .wait_committed_to(&group, &[1_000], Duration::from_secs(60))
            .await,
        "the old topic was not read to its end: {:?}",
        kafka.committed(&group)
    );

    let admin: AdminClient<DefaultClientContext> = kafka.client().create().expect("admin");
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    let deleted = admin
        .delete_topics(&[&kafka.topic], &options)
        .await
        .expect("delete request");
    assert!(deleted.iter().all(Result::is_ok), "delete: {deleted:?}");
    // Created again as soon as the broker lets it (it refuses while the deletion is under way).
    let topic = NewTopic::new(&kafka.topic, 1, TopicReplication::Fixed(-1));
    let created = wait_for(Duration::from_secs(30), || async {
        let answer = admin.create_topics([&topic], &options).await;
        matches!(answer.as_deref(), Ok([Ok(_)]))
    })
    .await;
    assert!(created, "topic not created again");
    let new: Vec<(Option<String>, Vec<u8>)> = (10_000..10_300)
        .map(|id| (Some(format!("key-{id}")), event(id, "info")))
        .collect();
    kafka.produce(&new).await;
    let delivered = wait_for(Duration::from_secs(60), || async {
        let written = ids_written(dir.path());
        (10_000..10_300).all(|id| written.contains_key(&id))
    })
    .await;
    // The running commits follow the new log back to its offsets (not only the final one).
    let recommitted = kafka
        .wait_committed_to(&group, &[300], Duration::from_secs(30))
        .await;
    let written = ids_written(dir.path());
    let new_written = (10_000..10_300u64)
        .filter(|id| written.contains_key(id))
        .count();
    println!(
        "recreated topic: {new_written} of 300 new records written, log moved back {} times, \
         records skipped as returned again {}, offset resets {}, assignments {}; committed {:?}",
        metrics.moved_back.get(),
        metrics.read_again.get(),
        metrics.offset_resets.get(),
        metrics.rebalances.with_label_values(&["assign"]).get(),
        kafka.committed(&group)
    );
    pipeline.stop().await;
    assert!(
        delivered,
        "{new_written} of 300 records of the new topic written"
    );
    assert_eq!(
        metrics.moved_back.get(),
        1,
        "the move back was counted once"
    );
    assert!(
        recommitted,
        "commits did not follow the new log: {:?}",
        kafka.committed(&group)
    );
    assert_eq!(kafka.committed(&group), vec![300]);
}
