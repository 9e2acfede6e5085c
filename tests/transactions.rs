//! What the brokers these tests can start do with Kafka transactions (KIP-98, KIP-447).
//!
//! Exactly-once Kafka → Kafka (issue 14) rests on three promises of the broker: records of an
//! aborted or still open transaction are hidden from `read_committed` readers, offsets sent in a
//! transaction are stored when it commits, and a producer fenced by a newer epoch cannot commit.
//! An audit of an exactly-once mode proves nothing on a broker that keeps none of them: it would
//! count aborted output as duplicates and never see a committed offset. These tests pin down
//! what each broker here does, so that the day one of them keeps the promises, a failure here
//! says the audit can be built on it.
//!
//! - librdkafka's mock cluster answers every transaction request with success and keeps no
//!   promise (its handlers for TxnOffsetCommit and EndTxn only check the producer id).
//! - tansu 0.6.0 serves InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn and
//!   TxnOffsetCommit, but not EndTxn: no transaction can commit or abort, and a `read_committed`
//!   reader sees the records of the transaction left open (SQLite storage, as the tests use).

mod common;

use std::time::{Duration, Instant};

use common::process::Tansu;
use common::Kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

type TxnProducer = ThreadedProducer<DefaultProducerContext>;

fn transactional(kafka: &Kafka, id: &str) -> TxnProducer {
    let producer: TxnProducer = kafka
        .client()
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "10000")
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(TIMEOUT)
        .expect("init_transactions");
    producer
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

#[test]
fn the_mock_cluster_accepts_transactions_but_keeps_none_of_their_promises() {
    let kafka = Kafka::start("txn-in", 1);
    let cluster = kafka.cluster.as_ref().expect("mock");
    cluster.create_topic("txn-out", 1, 1).expect("output topic");
    let group = common::unique("txn-group");
    let consumer = member(&kafka, &group);

    let producer = transactional(&kafka, "txn-probe");
    producer.begin_transaction().expect("begin");
    send(&producer, "txn-out", "committed");
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
    send(&producer, "txn-out", "aborted");
    producer.flush(TIMEOUT).expect("flush");
    producer.abort_transaction(TIMEOUT).expect("abort accepted");
    // A transaction left open, as by a process killed in the middle of one.
    producer.begin_transaction().expect("begin");
    send(&producer, "txn-out", "open");
    producer.flush(TIMEOUT).expect("flush");

    // A producer fenced by a newer epoch of its transactional id still commits.
    let fenced = transactional(&kafka, "txn-fenced");
    let _newer = transactional(&kafka, "txn-fenced");
    fenced.begin_transaction().expect("begin");
    send(&fenced, "txn-out", "fenced");
    let fenced_commit = fenced.commit_transaction(TIMEOUT);

    let values = read_committed(&kafka, "txn-out", 4);
    let committed = kafka.committed(&group);
    println!(
        "mock cluster: read_committed reader saw {values:?}; offset committed in the \
         transaction reads back as {committed:?}; fenced producer's commit: {fenced_commit:?}"
    );
    assert_eq!(
        values,
        ["committed", "aborted", "open", "fenced"],
        "the reader sees aborted, open and fenced output"
    );
    assert_eq!(committed, [-1], "the transaction's offset is not stored");
    assert!(fenced_commit.is_ok(), "the fenced producer is not refused");
}

#[test]
fn tansu_cannot_end_a_transaction_and_shows_its_records() {
    let tansu = Tansu::start();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let kafka = runtime.block_on(Kafka::external(&tansu.brokers(), "txn-in", 1));
    runtime.block_on(Kafka::external(&tansu.brokers(), "txn-out", 1));

    let producer = transactional(&kafka, "txn-probe");
    producer.begin_transaction().expect("begin");
    send(&producer, "txn-out", "in a transaction");
    let commit = producer.commit_transaction(TIMEOUT);
    println!("tansu: commit_transaction answered {commit:?}");
    let err = commit.expect_err("tansu 0.6.0 has no EndTxn service");
    assert!(
        err.to_string()
            .contains("EndTxnRequest (KIP-98) not supported by broker"),
        "the commit fails for want of EndTxn: {err}"
    );
    let values = read_committed(&kafka, "txn-out", 1);
    println!("tansu: read_committed reader saw {values:?}");
    assert_eq!(
        values,
        ["in a transaction"],
        "a read_committed reader sees the record of a transaction that never ended"
    );
}
