//! Where the benchmark's topics live: the brokers given with `--brokers`, or librdkafka's mock
//! cluster hosted by a helper process (the hidden `bench-broker` command), so that the broker's
//! copy of the backlog is not counted in logbridge's memory. Also the preload of sample events.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::options::BenchOptions;
use crate::tools::produce::{ensure_topic, produce_blocking, ProduceOptions};

/// Marks the helper broker's address line on its standard output.
const BROKER_PREFIX: &str = "BENCH-BROKER ";
/// Compression of the preloaded records.
const PRELOAD_COMPRESSION: &str = "lz4";

/// Each partition of `topic` with its end offset (high watermark) and how many records it holds.
pub(super) fn topic_ends(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64, u64)>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("failed to create the metadata client")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .context("failed to read the topic's metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|found| found.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    partitions
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .with_context(|| format!("failed to read the end of {topic}/{partition}"))?;
            Ok((partition, high, (high - low).max(0) as u64))
        })
        .collect()
}

/// Hosts librdkafka's mock cluster (the hidden `bench-broker` command): prints its address,
/// then serves `create <topic> <partitions>` lines from standard input (the mock cluster does
/// not take the admin API's CreateTopics) until standard input closes.
pub fn serve_broker() -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let cluster =
        rdkafka::mocking::MockCluster::new(1).context("failed to start the mock cluster")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{BROKER_PREFIX}{}", cluster.bootstrap_servers())?;
    stdout.flush()?;
    // Ends at end of input: the parent closed our stdin or died.
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["create", topic, partitions] => match partitions.parse::<i32>() {
                Ok(partitions) => match cluster.create_topic(topic, partitions, 1) {
                    Ok(()) => "ok".to_string(),
                    Err(err) => format!("cannot create {topic}: {err}"),
                },
                Err(_) => format!("bad partition count `{partitions}`"),
            },
            _ => format!("unknown command `{line}`"),
        };
        writeln!(stdout, "{BROKER_PREFIX}{reply}")?;
        stdout.flush()?;
    }
    drop(cluster);
    Ok(())
}

/// Where the benchmark's topics live.
pub(super) enum Broker {
    /// Brokers given on the command line.
    External(String),
    /// The mock cluster in a helper process; dropping it ends the process.
    Helper(Box<HelperBroker>),
}

/// The helper process hosting the mock cluster, and its command pipes.
pub(super) struct HelperBroker {
    child: Child,
    stdin: tokio::process::ChildStdin,
    replies: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    brokers: String,
}

impl Broker {
    pub(super) async fn start_helper(exe: &Path) -> anyhow::Result<Broker> {
        let mut child = Command::new(exe)
            .arg("bench-broker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start the helper broker")?;
        let stdout = child.stdout.take().context("helper broker has no stdout")?;
        let stdin = child.stdin.take().context("helper broker has no stdin")?;
        let mut replies = BufReader::new(stdout).lines();
        let brokers = Self::reply(&mut replies).await?;
        Ok(Broker::Helper(Box::new(HelperBroker {
            child,
            stdin,
            replies,
            brokers,
        })))
    }

    async fn reply(
        replies: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) -> anyhow::Result<String> {
        let line = tokio::time::timeout(Duration::from_secs(30), replies.next_line())
            .await
            .context("the helper broker did not answer within 30 s")??
            .context("the helper broker exited")?;
        line.strip_prefix(BROKER_PREFIX)
            .map(str::to_string)
            .with_context(|| format!("unexpected line from the helper broker: {line}"))
    }

    /// Whether this is the helper process's mock cluster.
    pub(super) fn is_embedded(&self) -> bool {
        matches!(self, Broker::Helper(_))
    }

    pub(super) fn brokers(&self) -> &str {
        match self {
            Broker::External(brokers) => brokers,
            Broker::Helper(helper) => &helper.brokers,
        }
    }

    pub(super) async fn create_topic(
        &mut self,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<()> {
        match self {
            Broker::External(brokers) => ensure_topic(brokers, topic, partitions).await,
            Broker::Helper(helper) => {
                use tokio::io::AsyncWriteExt as _;
                helper
                    .stdin
                    .write_all(format!("create {topic} {partitions}\n").as_bytes())
                    .await
                    .context("the helper broker is gone")?;
                match Self::reply(&mut helper.replies).await? {
                    reply if reply == "ok" => Ok(()),
                    reply => anyhow::bail!("helper broker: {reply}"),
                }
            }
        }
    }

    pub(super) async fn stop(self) {
        if let Broker::Helper(helper) = self {
            let HelperBroker {
                mut child, stdin, ..
            } = *helper;
            drop(stdin);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Preloads `count` sample events into a new topic; returns each partition's end as the
/// delivery reports tell it.
pub(super) async fn preload(
    broker: &mut Broker,
    topic: &str,
    count: u64,
    partitions: i32,
    payload_bytes: usize,
    options: &BenchOptions,
) -> anyhow::Result<Vec<(i32, i64)>> {
    broker.create_topic(topic, partitions).await?;
    let produce = ProduceOptions {
        brokers: broker.brokers().to_string(),
        topic: topic.to_string(),
        count: Some(count),
        keys: options.keys,
        payload_bytes,
        seed: Some(count),
        // The mock cluster keeps only the newest 5 MiB of each partition; compressed, a million
        // sample events fit in 8 partitions. Kafka producers commonly compress, and the
        // consumer pays for decompression in every mode alike.
        options: vec![
            ("compression.type".into(), PRELOAD_COMPRESSION.into()),
            // Room for the large-event runs' records (librdkafka's default is 1 000 000).
            (
                "message.max.bytes".into(),
                (payload_bytes + (64 << 10)).max(1_000_000).to_string(),
            ),
        ],
        ..ProduceOptions::default()
    };
    let summary = tokio::task::spawn_blocking(move || {
        produce_blocking(
            &produce,
            &std::sync::atomic::AtomicBool::new(false),
            |_, _| {},
        )
    })
    .await
    .context("producer thread failed")??;
    anyhow::ensure!(
        summary.delivered == count && summary.errors == 0,
        "preload delivered {} of {count} records ({} errors)",
        summary.delivered,
        summary.errors
    );
    // A fresh topic: the ends add up to the records delivered.
    let ends: Vec<(i32, i64)> = summary.ends.iter().map(|(p, end)| (*p, *end)).collect();
    let delivered: i64 = ends.iter().map(|(_, end)| end).sum();
    anyhow::ensure!(
        delivered == count as i64,
        "the delivery reports end at {delivered} records in {topic}, not {count}"
    );
    if let Broker::Helper(_) = broker {
        // The mock cluster keeps only the newest 5 MiB of each partition: check that it kept
        // everything. (Not on other brokers: tansu's memory engine reports a wrong high
        // watermark, and a real broker keeps what it acknowledged.)
        let brokers = broker.brokers().to_string();
        let name = topic.to_string();
        let kept: u64 = tokio::task::spawn_blocking(move || topic_ends(&brokers, &name))
            .await
            .context("metadata thread failed")??
            .iter()
            .map(|(_, _, count)| count)
            .sum();
        anyhow::ensure!(
            kept == count,
            "the broker kept {kept} of the {count} records produced to {topic} (the mock \
             cluster keeps the newest 5 MiB of each partition): use more partitions or --brokers"
        );
    }
    println!("preloaded {topic} ({partitions} partitions, lz4): {summary}");
    Ok(ends)
}
