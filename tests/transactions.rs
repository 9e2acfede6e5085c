//! What the brokers these tests can start do with Kafka transactions (KIP-98, KIP-447).
//!
//! Exactly-once Kafka → Kafka (issue 14) rests on three promises of the broker: records of an
//! aborted or still open transaction are hidden from `read_committed` readers, offsets sent in a
//! transaction are stored when it commits, and a producer fenced by a newer epoch cannot commit.
//! An audit of an exactly-once mode proves nothing on a broker that keeps none of them: it would
//! count aborted output as duplicates and never see a committed offset. These tests pin down
//! what each broker here does.
//!
//! - librdkafka's mock cluster answers every transaction request with success and keeps no
//!   promise (its handlers for TxnOffsetCommit and EndTxn only check the producer id).
//! - Apache Kafka (this binary's shared broker) keeps all three: the same four transactions
//!   show only the committed one to a `read_committed` reader, store the offset sent in it,
//!   and refuse the zombie's commit as fenced. This is the broker an exactly-once mode is
//!   tested on.

mod common;

use std::time::{Duration, Instant};

use common::Kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

type TxnProducer = ThreadedProducer<DefaultProducerContext>;

fn transactional(kafka: &Kafka, id: &str) -> TxnProducer {
    common::transactional_producer(kafka, id)
}

fn send(producer: &TxnProducer, topic: &str, value: &str) {
    producer
        .send(
            BaseRecord::<str, str>::to(topic)
                .payload(value)
                .partition(0),
        )
        .expect("queued");
}

/// Every value in partition 0 of `topic`, read from the beginning by a `read_committed`
/// reader until `expected` values arrived or 10 s passed.
fn read_committed(kafka: &Kafka, topic: &str, expected: usize) -> Vec<String> {
    let reader: BaseConsumer = kafka
        .client()
        .set("group.id", common::unique("txn-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    reader.assign(&partitions).expect("assign");
    let mut values = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while values.len() < expected && Instant::now() < deadline {
        if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
            values
                .push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
        }
    }
    values
}

/// A group member of `kafka`'s topic holding its partitions, for the group metadata a
/// transaction sends with its offsets.
fn member(kafka: &Kafka, group: &str) -> BaseConsumer {
    let consumer: BaseConsumer = kafka
        .client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&kafka.topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.assignment().expect("assignment").count() == 0 && Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    assert!(
        consumer.assignment().expect("assignment").count() > 0,
        "the member was assigned its partitions"
    );
    consumer
}

/// What one broker did with a committed, an aborted, an open and a fenced producer's
/// transaction.
struct Seen {
    /// Values a `read_committed` reader of the output topic saw.
    values: Vec<String>,
    /// The group's committed offset after the transaction that sent offset 3 committed.
    committed: Vec<i64>,
    /// What the fenced producer's commit answered.
    fenced_commit: Result<(), String>,
}

/// The same four transactions on any broker: `kafka`'s topic is the input (its group sends
/// offsets in the first transaction), `output` the topic the transactions write.
fn four_transactions(kafka: &Kafka, output: &str) -> Seen {
    let group = common::unique("txn-group");
    let consumer = member(kafka, &group);
    let id = common::unique("txn-probe");

    let producer = transactional(kafka, &id);
    producer.begin_transaction().expect("begin");
    send(&producer, output, "committed");
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(&kafka.topic, 0, Offset::Offset(3))
        .expect("offset");
    let metadata = consumer.group_metadata().expect("group metadata");
    producer
        .send_offsets_to_transaction(&offsets, &metadata, TIMEOUT)
        .expect("offsets accepted");
    producer
        .commit_transaction(TIMEOUT)
        .expect("commit accepted");
    producer.begin_transaction().expect("begin");
    send(&producer, output, "aborted");
    producer.flush(TIMEOUT).expect("flush");
    producer.abort_transaction(TIMEOUT).expect("abort accepted");
    // A transaction left open, as by a process killed in the middle of one.
    producer.begin_transaction().expect("begin");
    send(&producer, output, "open");
    producer.flush(TIMEOUT).expect("flush");

    // A producer whose transactional id a newer producer took over (a zombie).
    let fenced_id = common::unique("txn-fenced");
    let fenced = transactional(kafka, &fenced_id);
    let _newer = transactional(kafka, &fenced_id);
    let fenced_commit = fenced
        .begin_transaction()
        .and_then(|()| {
            send(&fenced, output, "fenced");
            fenced.commit_transaction(TIMEOUT)
        })
        .map_err(|err| err.to_string());

    Seen {
        values: read_committed(kafka, output, 4),
        committed: kafka.committed(&group),
        fenced_commit,
    }
}

#[test]
fn the_mock_cluster_accepts_transactions_but_keeps_none_of_their_promises() {
    let kafka = Kafka::start("txn-in", 1);
    let cluster = kafka.cluster.as_ref().expect("mock");
    cluster.create_topic("txn-out", 1, 1).expect("output topic");
    let seen = four_transactions(&kafka, "txn-out");
    println!(
        "mock cluster: read_committed reader saw {:?}; offset committed in the transaction reads \
         back as {:?}; fenced producer's commit: {:?}",
        seen.values, seen.committed, seen.fenced_commit
    );
    assert_eq!(
        seen.values,
        ["committed", "aborted", "open", "fenced"],
        "the reader sees aborted, open and fenced output"
    );
    assert_eq!(
        seen.committed,
        [-1],
        "the transaction's offset is not stored"
    );
    assert!(
        seen.fenced_commit.is_ok(),
        "the fenced producer is not refused"
    );
}

#[test]
fn apache_kafka_keeps_every_promise_of_a_transaction() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let kafka = runtime.block_on(Kafka::shared("txn-in", 1));
    let output = format!("{}-out", kafka.topic);
    runtime.block_on(kafka.create_external_topic(&output, 1));
    let seen = four_transactions(&kafka, &output);
    println!(
        "Apache Kafka: read_committed reader saw {:?}; offset committed in the transaction reads \
         back as {:?}; fenced producer's commit: {:?}",
        seen.values, seen.committed, seen.fenced_commit
    );
    assert_eq!(
        seen.values,
        ["committed"],
        "aborted, open and fenced output hidden from read_committed readers"
    );
    assert_eq!(seen.committed, [3], "the transaction's offset is stored");
    let refused = seen.fenced_commit.expect_err("the zombie is fenced");
    assert!(
        refused.to_lowercase().contains("fenced"),
        "the refusal says fenced: {refused}"
    );
}
