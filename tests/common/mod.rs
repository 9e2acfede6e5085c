//! Shared helpers of the pipeline tests: an in-process Kafka (librdkafka's mock cluster, a real
//! Kafka-protocol broker on loopback TCP), a producer, and a *separate* client that reads back
//! what the pipeline committed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use logbridge::Config;

pub mod apache;
pub mod collector;
pub mod process;
pub mod stream;
pub mod tls;

/// A Kafka cluster with one topic: librdkafka's mock cluster in this process, or an external
/// broker (Apache Kafka, see [`apache`]).
pub struct Kafka {
    /// One client per group that reads its committed offsets, made on first use and kept
    /// (declared first: dropped before the mock cluster it talks to).
    pub offset_readers: OffsetReaders,
    pub cluster: Option<MockCluster<'static, DefaultProducerContext>>,
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
    /// Client properties every helper client sets (security for a secured cluster).
    pub properties: Vec<(String, String)>,
}

/// The clients [`Kafka::committed`] reads with: one per group, reused by every poll (a client
/// per poll would open connections and threads twenty times a second in a wait).
#[derive(Default)]
pub struct OffsetReaders(std::sync::Mutex<HashMap<String, std::sync::Arc<BaseConsumer>>>);

impl Kafka {
    pub fn start(topic: &str, partitions: i32) -> Kafka {
        Kafka::start_brokers(topic, partitions, 1)
    }

    /// A mock cluster of `brokers` brokers (ids 1..=brokers) with one topic.
    pub fn start_brokers(topic: &str, partitions: i32, brokers: i32) -> Kafka {
        let cluster = MockCluster::new(brokers).expect("mock cluster starts");
        cluster
            .create_topic(topic, partitions, 1)
            .expect("topic created");
        let brokers = cluster.bootstrap_servers();
        Kafka {
            cluster: Some(cluster),
            brokers,
            topic: topic.to_string(),
            partitions,
            properties: Vec::new(),
            offset_readers: OffsetReaders::default(),
        }
    }

    /// A topic named `<prefix>-<unique>` with `partitions` on an Apache Kafka cluster (replicated
    /// as the cluster's `default.replication.factor` says).
    pub async fn apache(broker: &apache::ApacheKafka, prefix: &str, partitions: i32) -> Kafka {
        Kafka::external(&broker.brokers(), &unique(prefix), partitions).await
    }

    /// [`Kafka::apache`] on this test binary's shared single-node broker.
    pub async fn shared(prefix: &str, partitions: i32) -> Kafka {
        Kafka::apache(apache::shared(), prefix, partitions).await
    }

    /// Another topic on this external cluster, created if missing.
    pub async fn create_external_topic(&self, name: &str, partitions: i32) {
        logbridge::tools::produce::ensure_topic_with(
            &self.brokers,
            &self.properties,
            name,
            partitions,
        )
        .await
        .expect("topic created on the broker");
    }

    /// A topic on an external broker, created if missing.
    pub async fn external(brokers: &str, topic: &str, partitions: i32) -> Kafka {
        Kafka::external_with(brokers, &[], topic, partitions).await
    }

    /// A topic on an external broker reached with extra client `properties` (TLS, SASL).
    pub async fn external_with(
        brokers: &str,
        properties: &[(&str, &str)],
        topic: &str,
        partitions: i32,
    ) -> Kafka {
        let properties: Vec<(String, String)> = properties
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        logbridge::tools::produce::ensure_topic_with(brokers, &properties, topic, partitions)
            .await
            .expect("topic created on the broker");
        Kafka {
            cluster: None,
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            partitions,
            properties,
            offset_readers: OffsetReaders::default(),
        }
    }

    /// Produces `count` sample events (about `bad_ratio` malformed) with ids from 0, and says
    /// which ids are valid and where each malformed record landed.
    pub async fn produce_samples(&self, count: u64, bad_ratio: f64, seed: u64) -> Produced {
        self.produce_samples_from(0, count, bad_ratio, seed).await
    }

    /// Like `produce_samples`, with ids from `first`.
    pub async fn produce_samples_from(
        &self,
        first: u64,
        count: u64,
        bad_ratio: f64,
        seed: u64,
    ) -> Produced {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut records = Vec::with_capacity(count as usize);
        let mut malformed_flags = Vec::with_capacity(count as usize);
        for id in first..first + count {
            let (key, payload, bad) =
                logbridge::tools::produce::sample_event(&mut rng, id, 10_000, bad_ratio);
            records.push((Some(key), payload));
            malformed_flags.push(bad);
        }
        let placed = self.produce(&records).await;
        let mut produced = Produced::default();
        for (id, (bad, place)) in malformed_flags.iter().zip(placed).enumerate() {
            if *bad {
                produced.malformed.insert(place);
            } else {
                produced.valid_ids.insert(first + id as u64);
            }
        }
        produced
    }

    /// Produces every `(key, payload)`, waits for all delivery reports, and returns where each
    /// record landed as `(partition, offset)`.
    pub async fn produce(&self, records: &[(Option<String>, Vec<u8>)]) -> Vec<(i32, i64)> {
        self.produce_with(records, "1000000").await
    }

    /// Like `produce`, for records of up to 4 MB.
    pub async fn produce_large(&self, records: &[(Option<String>, Vec<u8>)]) -> Vec<(i32, i64)> {
        self.produce_with(records, "4000000").await
    }

    /// Produces a tombstone (null value) with `key`; returns where it landed.
    pub async fn produce_tombstone(&self, key: &str) -> (i32, i64) {
        let producer: FutureProducer = self.client().create().expect("producer");
        let record = FutureRecord::<str, [u8]>::to(&self.topic).key(key);
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(err, _)| err)
            .expect("tombstone delivered");
        (delivery.partition, delivery.offset)
    }

    async fn produce_with(
        &self,
        records: &[(Option<String>, Vec<u8>)],
        max_bytes: &str,
    ) -> Vec<(i32, i64)> {
        produce_records(&self.client(), &self.topic, records, max_bytes).await
    }
}

/// Produces every `(key, payload)` to `topic`, waits for all delivery reports, and returns
/// where each record landed as `(partition, offset)`.
pub async fn produce_records(
    client: &ClientConfig,
    topic: &str,
    records: &[(Option<String>, Vec<u8>)],
    max_bytes: &str,
) -> Vec<(i32, i64)> {
    let producer: FutureProducer = client
        .clone()
        .set("linger.ms", "5")
        .set("message.max.bytes", max_bytes)
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(1024);
    let mut placed = Vec::with_capacity(records.len());
    for (key, payload) in records {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload.as_slice());
        if let Some(key) = key {
            record = record.key(key.as_str());
        }
        pending.push(
            producer
                .send_result(record)
                .map_err(|(err, _)| err)
                .expect("enqueued"),
        );
        if pending.len() >= 1024 {
            for delivery in pending.drain(..) {
                let delivery = delivery.await.expect("delivered").expect("acked");
                placed.push((delivery.partition, delivery.offset));
            }
        }
    }
    for delivery in pending {
        let delivery = delivery.await.expect("delivered").expect("acked");
        placed.push((delivery.partition, delivery.offset));
    }
    producer.flush(Duration::from_secs(10)).expect("flushed");
    placed
}

impl Kafka {
    /// A client configuration for this cluster: its brokers and `properties`.
    pub fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (name, value) in &self.properties {
            client.set(name, value);
        }
        client
    }

    /// End offset (high watermark) of every partition, read by a separate client.
    pub fn end_offsets(&self) -> Vec<i64> {
        let client: BaseConsumer = self.client().create().expect("client");
        (0..self.partitions)
            .map(|p| {
                retrying("watermarks", || {
                    client.fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                })
                .1
            })
            .collect()
    }

    /// Offsets committed by `group`, read by a separate client (-1 where nothing is committed).
    pub fn committed(&self, group: &str) -> Vec<i64> {
        let client = {
            let mut readers = self
                .offset_readers
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            readers
                .entry(group.to_string())
                .or_insert_with(|| {
                    std::sync::Arc::new(
                        self.client()
                            .set("group.id", group)
                            .create()
                            .expect("client"),
                    )
                })
                .clone()
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = retrying("committed offsets", || {
            client.committed_offsets(tpl.clone(), Duration::from_secs(10))
        });
        (0..self.partitions)
            .map(
                |p| match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) => offset,
                    _ => -1,
                },
            )
            .collect()
    }

    /// Records committed by `group` over all partitions (a partition without a commit counts 0).
    pub fn committed_records(&self, group: &str) -> i64 {
        self.committed(group)
            .iter()
            .map(|offset| offset.max(&0))
            .sum()
    }

    /// A configuration for this cluster; `routes` is the TOML of the [[routes]] entries.
    pub fn config(&self, group: &str, pipeline: &str, routes: &str) -> Config {
        let text = format!(
            r#"
{kafka}
[pipeline]
{defaults}{pipeline}
{routes}
"#,
            kafka = kafka_section(
                &self.brokers,
                group,
                &self.topic,
                "\"statistics.interval.ms\" = 1000"
            ),
            defaults = [("commit_interval_ms", "200"), ("drain_timeout_ms", "3000")]
                .iter()
                .filter(|(key, _)| !pipeline.contains(key))
                .map(|(key, value)| format!("{key} = {value}\n"))
                .collect::<String>(),
        );
        Config::from_toml_str(&text).unwrap_or_else(|err| panic!("test config: {err}\n{text}"))
    }
}

/// The `[kafka]` section of a test configuration: the cluster, group and topic, reading from
/// the earliest offset with a short session timeout, plus `extra_options` lines (which replace
/// these defaults where they name the same option).
pub fn kafka_section(brokers: &str, group: &str, topic: &str, extra_options: &str) -> String {
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
[kafka.options]
{defaults}{extra_options}"#,
        defaults = client_defaults(
            &[
                ("auto.offset.reset", "\"earliest\""),
                ("session.timeout.ms", "6000")
            ],
            extra_options
        )
    )
}

/// `defaults` as `[kafka.options]` lines, leaving out those `extra_options` sets, and under the
/// KIP-848 `consumer` group protocol those librdkafka refuses with it (the session and
/// heartbeat are the broker's there, and so is the assignor).
pub fn client_defaults(defaults: &[(&str, &str)], extra_options: &str) -> String {
    let consumer_protocol = extra_options.contains("\"group.protocol\" = \"consumer\"");
    defaults
        .iter()
        .filter(|(key, _)| !extra_options.contains(&format!("\"{key}\"")))
        .filter(|(key, _)| {
            !(consumer_protocol
                && matches!(
                    *key,
                    "session.timeout.ms"
                        | "heartbeat.interval.ms"
                        | "partition.assignment.strategy"
                ))
        })
        .map(|(key, value)| format!("\"{key}\" = {value}\n"))
        .collect()
}

/// `request`'s answer, asked again for up to 60 s while it fails: a real cluster answers some
/// requests with a retriable error for a while (the group coordinator loading after a start,
/// a partition whose leader just died).
pub fn retrying<T>(what: &str, mut request: impl FnMut() -> rdkafka::error::KafkaResult<T>) -> T {
    let started = Instant::now();
    loop {
        match request() {
            Ok(answer) => return answer,
            Err(err) if started.elapsed() < Duration::from_secs(60) => {
                let _ = err;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(err) => panic!("{what}: {err}"),
        }
    }
}

/// The distinct values of `copies` (the records of one key, in the order they were written,
/// repeats included) ordered by where each was written last: in offset order when the last
/// copy of every record came after the last copy of each earlier one.
pub fn by_last_copy<T: Copy + Eq + std::hash::Hash>(copies: &[T]) -> Vec<T> {
    let mut last: HashMap<T, usize> = HashMap::new();
    for (position, copy) in copies.iter().enumerate() {
        last.insert(*copy, position);
    }
    let mut in_order: Vec<T> = last.keys().copied().collect();
    in_order.sort_by_key(|copy| last[copy]);
    in_order
}

/// `[kafka.options]` of a group protocol: a classic assignor (`range`, `cooperative-sticky`), or
/// `consumer` for KIP-848's (the broker assigns; its `uniform` assignor by default).
pub fn protocol_options(protocol: &str) -> String {
    match protocol {
        "consumer" => "\"group.protocol\" = \"consumer\"\n".to_string(),
        strategy => format!("\"partition.assignment.strategy\" = \"{strategy}\"\n"),
    }
}

/// What `produce_samples` produced.
#[derive(Default)]
pub struct Produced {
    pub valid_ids: std::collections::HashSet<u64>,
    pub malformed: std::collections::HashSet<(i32, i64)>,
}

impl Produced {
    /// Against `seen` (how many times each event id was written): how many valid events are
    /// missing, and how many writes were repeats.
    pub fn lost_and_duplicates(&self, seen: &HashMap<u64, usize>) -> (usize, usize) {
        let lost = self
            .valid_ids
            .iter()
            .filter(|id| !seen.contains_key(id))
            .count();
        let duplicates = seen.values().map(|n| n.saturating_sub(1)).sum();
        (lost, duplicates)
    }

    /// Against `letters` (dead letters by source place): how many malformed records have none,
    /// and how many letters are repeats.
    pub fn unlettered_and_twice(&self, letters: &HashMap<(i32, i64), usize>) -> (usize, usize) {
        let unlettered = self
            .malformed
            .iter()
            .filter(|place| !letters.contains_key(place))
            .count();
        let twice = letters.values().map(|n| n.saturating_sub(1)).sum();
        (unlettered, twice)
    }
}

/// A transactional producer of `kafka`'s cluster with `transactional.id` = `id`, initialised
/// (a producer of an older epoch of the same id is fenced from here on).
pub fn transactional_producer(
    kafka: &Kafka,
    id: &str,
) -> rdkafka::producer::ThreadedProducer<DefaultProducerContext> {
    let producer: rdkafka::producer::ThreadedProducer<DefaultProducerContext> = kafka
        .client()
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "10000")
        .set("linger.ms", "5")
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(Duration::from_secs(10))
        .expect("init_transactions");
    producer
}

/// Runs the heavy tests of one test binary one at a time: they run processes and brokers and
/// watch timings, and two of them side by side on two shared cores only measure each other.
/// Hold the guard for the whole test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    // Not poisoned by a test that fails while holding it.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Like `serial`, but two tests at a time: for a binary whose tests mostly wait (on group
/// joins, session timeouts, a failing destination's backoff) and use little of the two cores,
/// so a pair side by side does not skew what either measures. Hold the guard for the whole test.
pub async fn two_at_a_time() -> tokio::sync::SemaphorePermit<'static> {
    PAIR.acquire().await.expect("never closed")
}

/// For a test of a binary that runs its tests [`two_at_a_time`] which is heavy itself (a
/// three-node cluster): it runs alone. Hold the guard for the whole test.
pub async fn alone_of_a_pair() -> tokio::sync::SemaphorePermit<'static> {
    PAIR.acquire_many(2).await.expect("never closed")
}

static PAIR: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// `serial` for tests that are not async (a binary uses one or the other).
pub fn serial_blocking() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it poisoned nothing the others need.
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits for `condition` with a deadline; returns whether it became true.
pub async fn wait_for<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The JSON lines of output files, and the last line of any file that has no newline yet.
#[derive(Debug, Default)]
pub struct OutputLines {
    /// Every whole line, parsed.
    pub lines: Vec<serde_json::Value>,
    /// `(file, text)` of each unterminated last line, left out of `lines`: a write cut short (a
    /// process killed in the middle of a line) or still going on (a file read while written).
    pub torn: Vec<(PathBuf, String)>,
}

/// Every JSON line of the given files (missing files count as empty). A file's last line
/// without its newline is torn ([`OutputLines::torn`]); a line that is not JSON anywhere else
/// panics, naming the file and the line.
pub fn read_output(paths: &[PathBuf]) -> OutputLines {
    let mut output = OutputLines::default();
    for path in paths {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("reading {}: {err}", path.display()),
        };
        // Bytes, not a string: a line cut in the middle of a character is still a torn line.
        let mut lines: Vec<&[u8]> = bytes.split(|byte| *byte == b'\n').collect();
        // After the last newline: empty, or the unterminated last line.
        let last = lines.pop().unwrap_or_default();
        if !last.is_empty() {
            output
                .torn
                .push((path.clone(), String::from_utf8_lossy(last).into_owned()));
        }
        for (number, line) in lines.iter().enumerate() {
            let parsed = serde_json::from_slice(line).unwrap_or_else(|err| {
                panic!(
                    "{} line {}: not a JSON line ({err}): {:?}",
                    path.display(),
                    number + 1,
                    String::from_utf8_lossy(line)
                )
            });
            output.lines.push(parsed);
        }
    }
    output
}

/// The whole JSON lines of the given files ([`read_output`]). A torn last line is printed as a
/// finding (after a SIGKILL: the line the process was writing) and left out.
pub fn read_lines(paths: &[PathBuf]) -> Vec<serde_json::Value> {
    let output = read_output(paths);
    for (path, text) in &output.torn {
        println!(
            "torn last line of {} ({} bytes, left out): {text:?}",
            path.display(),
            text.len()
        );
    }
    output.lines
}

/// Counts each event `id` found in output lines.
pub fn id_counts(lines: &[serde_json::Value]) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for line in lines {
        let id = line["event"]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("line without event id: {line}"));
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// A valid event with a unique id.
pub fn event(id: u64, level: &str) -> Vec<u8> {
    serde_json::json!({
        "id": id,
        "level": level,
        "message": format!("event {id}"),
        "service": "test",
        "code": 500,
    })
    .to_string()
    .into_bytes()
}

/// File sink TOML for a route.
pub fn file_route(name: &str, levels: &str, workers: usize, dir: &Path) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nlevels = {levels}\nworkers = {workers}\nsink = {{ type = \"file\", path = \"{}\" }}\n",
        dir.join(format!("{name}.jsonl")).display()
    )
}

/// Records the pipeline consumed so far, over every topic.
pub fn consumed_total(metrics: &logbridge::metrics::Metrics) -> u64 {
    prometheus::core::Collector::collect(&metrics.consumed)
        .iter()
        .flat_map(|family| family.get_metric().iter())
        .map(|metric| metric.get_counter().get_value() as u64)
        .sum()
}

/// Sum of the committed offset gauges of the pipeline (cheap progress check).
pub fn committed_total(metrics: &logbridge::metrics::Metrics) -> i64 {
    prometheus::core::Collector::collect(&metrics.committed_offset)
        .iter()
        .flat_map(|family| {
            family
                .get_metric()
                .iter()
                .map(|m| m.get_gauge().get_value() as i64)
        })
        .sum()
}

/// A JSON document the program served (`/status`), parsed; panics with the body if it is not
/// JSON (read as `null`, every key of it would be missing). These helpers panic where they are
/// called from (`track_caller`).
#[track_caller]
pub fn parse_json(what: &str, body: &str) -> serde_json::Value {
    match serde_json::from_str(body) {
        Ok(document) => document,
        Err(err) => panic!("{what} is not JSON ({err}): {body}"),
    }
}

/// The value at `pointer` (a JSON pointer: `/in_flight`, `/partitions/0/held`) of a document
/// the program served. A missing key panics, naming it and showing the document: a renamed key
/// must fail the test, never read as zero.
#[track_caller]
pub fn json_at<'a>(document: &'a serde_json::Value, pointer: &str) -> &'a serde_json::Value {
    let Some(value) = document.pointer(pointer) else {
        panic!("no `{pointer}` in the document: {document}");
    };
    value
}

/// [`json_at`], an integer (a `null` or another type panics too).
#[track_caller]
pub fn json_i64(document: &serde_json::Value, pointer: &str) -> i64 {
    let Some(value) = json_opt_i64(document, pointer) else {
        panic!("`{pointer}` is null in the document: {document}");
    };
    value
}

/// [`json_at`], an integer or `null` (`None`): for the figures the program serves as `null`
/// where it has none (a partition's series that does not exist yet). The key must be there.
#[track_caller]
pub fn json_opt_i64(document: &serde_json::Value, pointer: &str) -> Option<i64> {
    json_opt(document, pointer, serde_json::Value::as_i64, "an integer")
}

/// [`json_opt_i64`] for a number.
#[track_caller]
pub fn json_opt_f64(document: &serde_json::Value, pointer: &str) -> Option<f64> {
    json_opt(document, pointer, serde_json::Value::as_f64, "a number")
}

/// [`json_at`], read by `read` (which says `kind` is what it takes), or `null` (`None`).
#[track_caller]
fn json_opt<T>(
    document: &serde_json::Value,
    pointer: &str,
    read: fn(&serde_json::Value) -> Option<T>,
    kind: &str,
) -> Option<T> {
    let value = json_at(document, pointer);
    if value.is_null() {
        return None;
    }
    let Some(read) = read(value) else {
        panic!("`{pointer}` = {value} is not {kind} in: {document}");
    };
    Some(read)
}

/// [`json_at`], an array.
#[track_caller]
pub fn json_array<'a>(document: &'a serde_json::Value, pointer: &str) -> &'a [serde_json::Value] {
    let Some(array) = json_at(document, pointer).as_array() else {
        panic!("`{pointer}` is not an array in: {document}");
    };
    array
}

/// The samples of `series` on a Prometheus text page: a metric name, or a name and the start of
/// its label set (`name{route="blocked"`, `name{`). A metric logbridge defines may have no
/// series yet (a labelled metric shows none before its first label values): no samples. A name
/// that `src/metrics.rs` does not define panics, naming it and listing the page's metrics: a
/// renamed metric must fail the test, never read as zero.
#[track_caller]
pub fn metric_samples(page: &str, series: &str) -> Vec<f64> {
    let mut samples = Vec::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(series) else {
            continue;
        };
        if !(series.contains('{') || rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        match line.rsplit(' ').next().map(str::parse::<f64>) {
            Some(Ok(value)) => samples.push(value),
            _ => panic!("a sample without a number: {line}"),
        }
    }
    let name = series.split('{').next().unwrap_or(series);
    if samples.is_empty() && !defined_metric(name) {
        let metrics: Vec<&str> = page
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        panic!("no metric `{name}`: src/metrics.rs does not define it; the page has {metrics:?}");
    }
    samples
}

/// The sum of [`metric_samples`] (0 for a defined metric without series).
#[track_caller]
pub fn metric_sum(page: &str, series: &str) -> f64 {
    metric_samples(page, series).iter().sum()
}

/// Whether `src/metrics.rs` defines the metric `name` (its name is a string literal there; a
/// histogram's `_bucket`, `_sum` and `_count` count as its own).
pub fn defined_metric(name: &str) -> bool {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs"))
            .expect("src/metrics.rs")
    });
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    [name, base]
        .iter()
        .any(|candidate| source.contains(&format!("\"{candidate}\"")))
}

/// A unique name per test run so nothing is shared between tests.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// GET a path from the HTTP endpoint; returns (status, body).
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(
        address,
        &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n"),
    )
    .await
}

/// Sends a raw request and returns (status, body).
pub async fn http_request(address: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to http endpoint");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A pipeline running in this process. Dropped without `stop` (a test that failed), it is
/// told to shut down, so that its consumer leaves the group and its threads end instead of
/// keeping the failed test from ending.
pub struct Running {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _stop_when_dropped: tokio_util::sync::DropGuard,
}

impl Running {
    pub fn start(config: Config, options: logbridge::RunOptions) -> Running {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(logbridge::run(config, options, shutdown.clone()));
        Running {
            _stop_when_dropped: shutdown.clone().drop_guard(),
            shutdown,
            task,
        }
    }

    /// Starts with the configuration's sinks, `metrics`, and no HTTP endpoint.
    pub fn without_http(
        config: Config,
        metrics: &std::sync::Arc<logbridge::metrics::Metrics>,
    ) -> Running {
        Running::start(
            config,
            logbridge::RunOptions {
                metrics: metrics.clone(),
                http: logbridge::HttpBind::Disabled,
                ..logbridge::RunOptions::default()
            },
        )
    }

    /// Starts with the HTTP endpoint on a free loopback port; returns its address too.
    pub async fn start_serving(
        config: Config,
        options: logbridge::RunOptions,
    ) -> (Running, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("listener address");
        let options = logbridge::RunOptions {
            http: logbridge::HttpBind::Listener(listener),
            ..options
        };
        (Running::start(config, options), address)
    }

    /// The equivalent of SIGTERM: stop, drain, final commit. Panics if the pipeline failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("pipeline task joined")
            .expect("pipeline ran without error");
    }

    /// The equivalent of SIGTERM, returning how the run ended, or `None` if it did not end
    /// within `deadline`.
    pub async fn stop_within(self, deadline: Duration) -> Option<anyhow::Result<()>> {
        self.shutdown.cancel();
        tokio::time::timeout(deadline, self.task)
            .await
            .ok()
            .map(|joined| joined.expect("pipeline task joined"))
    }

    /// Like `stop`, for a pipeline whose drain may be cut short (a sink slower than the drain
    /// timeout): the run may end in the error that says how many records were abandoned, and
    /// in no other. Returns that count.
    pub async fn stop_abandoning(self) -> usize {
        self.shutdown.cancel();
        match self.task.await.expect("pipeline task joined") {
            Ok(()) => 0,
            Err(err) => match err.downcast_ref::<logbridge::consumer::Abandoned>() {
                Some(logbridge::consumer::Abandoned::Unfinished(records)) => *records,
                _ => panic!("pipeline failed: {err:#}"),
            },
        }
    }
}

/// Waits until the committed offset gauges of `metrics` add up to `total`.
pub async fn wait_committed(
    metrics: &std::sync::Arc<logbridge::metrics::Metrics>,
    total: i64,
    deadline: Duration,
) -> bool {
    wait_for(deadline, || {
        let metrics = metrics.clone();
        async move { committed_total(&metrics) == total }
    })
    .await
}

/// Routes `errors` (levels `errors`) and `warnings` (levels `warnings`) writing files in `dir`.
pub fn two_file_routes(dir: &Path, errors: (&str, usize), warnings: (&str, usize)) -> String {
    format!(
        "{}{}",
        file_route("errors", errors.0, errors.1, dir),
        file_route("warnings", warnings.0, warnings.1, dir)
    )
}

/// A record read back by a separate client.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Vec<u8>>,
    /// Milliseconds since the epoch, where the record has a timestamp.
    pub timestamp: Option<i64>,
}

impl ReadRecord {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value).into_owned())
    }

    /// The source partition and offset a dead letter or forwarded record carries in its
    /// `logbridge.source.*` headers; panics without them.
    pub fn source(&self) -> (i32, i64) {
        let header = |name: &str| {
            self.header(name)
                .unwrap_or_else(|| panic!("a record without {name}: {self:?}"))
        };
        (
            header("logbridge.source.partition")
                .parse()
                .expect("a partition"),
            header("logbridge.source.offset")
                .parse()
                .expect("an offset"),
        )
    }
}

impl Kafka {
    /// Creates another topic on the mock cluster.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.cluster
            .as_ref()
            .expect("create_topic needs the mock cluster")
            .create_topic(name, partitions, 1)
            .expect("topic created");
    }

    /// Every record of `topic` from the beginning up to its current end, read by a separate
    /// client without a group, as a `read_committed` reader sees them (librdkafka's default):
    /// no record of an aborted or open transaction.
    pub fn read_all(&self, topic: &str) -> Vec<ReadRecord> {
        self.read_all_as(topic, "read_committed")
    }

    /// [`Kafka::read_all`] as a `read_uncommitted` reader: aborted transactions' records too.
    pub fn read_all_uncommitted(&self, topic: &str) -> Vec<ReadRecord> {
        self.read_all_as(topic, "read_uncommitted")
    }

    /// How many copies of each event (by its JSON `id`) `topic` holds for a `read_committed`
    /// reader.
    pub fn copies_by_id(&self, topic: &str) -> HashMap<u64, usize> {
        let mut copies: HashMap<u64, usize> = HashMap::new();
        for record in self.read_all(topic) {
            let value: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("JSON");
            *copies
                .entry(value["id"].as_u64().expect("an id"))
                .or_default() += 1;
        }
        copies
    }

    /// Where each dead letter of `topic` came from (source partition and offset), with how
    /// many letters each place has.
    pub fn letter_places(&self, topic: &str) -> HashMap<(i32, i64), usize> {
        let mut places = HashMap::new();
        for record in self.read_all(topic) {
            *places.entry(record.source()).or_insert(0) += 1;
        }
        places
    }

    fn read_all_as(&self, topic: &str, isolation: &str) -> Vec<ReadRecord> {
        use rdkafka::message::{Headers, Message};
        let client: BaseConsumer = self
            .client()
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .set("fetch.message.max.bytes", "8000000")
            .create()
            .expect("reader");
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        // Where each partition's log ends: read until the reader's position is there. (Not a
        // count of high - low: a compacted log or a transactional one has offsets without a
        // record to read.)
        let mut ends = HashMap::new();
        for p in 0..partitions {
            let (low, high) = retrying("watermarks", || {
                client.fetch_watermarks(topic, p, Duration::from_secs(10))
            });
            if high > low {
                ends.insert(p, high);
            }
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        client.assign(&tpl).expect("assign");
        let at_end = |client: &BaseConsumer| {
            let Ok(positions) = client.position() else {
                return false;
            };
            ends.iter().all(|(p, end)| {
                matches!(
                    positions.find_partition(topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(position)) if position >= *end
                )
            })
        };
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !at_end(&client) && Instant::now() < deadline {
            match client.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let mut headers = HashMap::new();
                    if let Some(list) = message.headers() {
                        for header in list.iter() {
                            headers.insert(
                                header.key.to_string(),
                                header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            );
                        }
                    }
                    records.push(ReadRecord {
                        partition: message.partition(),
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp: message.timestamp().to_millis(),
                    });
                }
                Some(Err(err)) => panic!("reading {topic}: {err}"),
                None => {}
            }
        }
        assert!(at_end(&client), "read all of {topic} up to {ends:?}");
        records
    }
}

/// Wraps the sinks of the configuration with work time: per batch, plus a random amount per
/// record drawn from `per_record_micros`.
pub fn delayed_sinks(
    per_batch: Duration,
    per_record_micros: std::ops::RangeInclusive<u64>,
) -> logbridge::sink::SinkFactory {
    held_sinks(per_batch, per_record_micros, std::sync::Arc::default())
}

/// [`delayed_sinks`] that also hold every batch (no failure, no retry: the delivery just does
/// not end) while `hold` is true, so a test can keep the pipeline from finishing while it
/// stages something.
pub fn held_sinks(
    per_batch: Duration,
    per_record_micros: std::ops::RangeInclusive<u64>,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> logbridge::sink::SinkFactory {
    use logbridge::sink::Sink;
    let files = logbridge::sink::config_sink_factory();
    std::sync::Arc::new(move |route, index, links| {
        Ok(Box::new(DelayedSink {
            inner: files(route, index, links)?,
            per_batch,
            per_record_micros: per_record_micros.clone(),
            hold: hold.clone(),
        }) as Box<dyn Sink>)
    })
}

struct DelayedSink {
    inner: Box<dyn logbridge::sink::Sink>,
    per_batch: Duration,
    per_record_micros: std::ops::RangeInclusive<u64>,
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl logbridge::sink::Sink for DelayedSink {
    fn deliver<'a>(
        &'a mut self,
        route: &'a str,
        batch: &'a [logbridge::record::Record],
    ) -> logbridge::sink::DeliveryFuture<'a> {
        Box::pin(async move {
            let micros: u64 = {
                use rand::Rng;
                let mut rng = rand::rng();
                batch
                    .iter()
                    .map(|_| rng.random_range(self.per_record_micros.clone()))
                    .sum()
            };
            tokio::time::sleep(self.per_batch + Duration::from_micros(micros)).await;
            while self.hold.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.inner.deliver(route, batch).await
        })
    }
}

impl Kafka {
    /// Waits until `group`'s committed offsets, read by a separate client, equal `end`.
    pub async fn wait_committed_to(&self, group: &str, end: &[i64], deadline: Duration) -> bool {
        wait_for(deadline, || async move { self.committed(group) == end }).await
    }

    /// Runs `config` (of group `group`) with its own sinks until the group's commits, read by a
    /// separate client, reach the topic's end as it is now (within `deadline`), then stops it.
    /// Returns whether they did, and the pipeline's metrics.
    pub async fn run_until_committed(
        &self,
        group: &str,
        config: Config,
        deadline: Duration,
    ) -> (bool, std::sync::Arc<logbridge::metrics::Metrics>) {
        let end = self.end_offsets();
        let metrics = std::sync::Arc::new(logbridge::metrics::Metrics::new());
        let pipeline = Running::without_http(config, &metrics);
        let committed = self.wait_committed_to(group, &end, deadline).await;
        pipeline.stop().await;
        (committed, metrics)
    }
}

/// A test tool the test command installs into the cache: the path in `variable` (set by
/// scripts/test.sh), else what `scripts/<script>` installs and prints.
pub fn installed_tool(variable: &str, script: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let output = std::process::Command::new("bash")
        .arg(&path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|err| panic!("run scripts/{script}: {err}"));
    assert!(output.status.success(), "scripts/{script} failed");
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}
