//! `logbridge bench`: how fast logbridge moves a backlog compared with librdkafka alone, what
//! that costs in CPU and memory, and how often it commits.
//!
//! The benchmark
//! 1. uses the brokers given, or starts librdkafka's mock cluster in a helper process (so the
//!    broker's copy of the backlog is not counted in logbridge's memory);
//! 2. preloads a topic with sample events;
//! 3. in every round, measures each mode in a fresh child process with a fresh consumer group:
//!    * `raw`: a bare librdkafka consumer with logbridge's client settings, no decoding: the
//!      limit of the client library;
//!    * `null`: the whole pipeline (decode, routing, key-ordered workers, ordered commits) to
//!      null sinks, until the committed offsets reach the end of the topic;
//!    * `kafka`: the same with every route producing to a Kafka topic;
//! 4. checks the memory ceiling: the pipeline against backlogs of different sizes with a sink
//!    paced to 10 % of the raw consumption rate, reporting the peak RSS of each.
//!
//! A child measures from the first record it reads to the end, so process start and group join
//! do not count; CPU is its user + system time over that window, and peak RSS its high-water
//! mark (`VmHWM`) over its whole life.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RouteConfig};
use crate::metrics::Metrics;
use crate::pipeline::{self, HttpBind, RunOptions};
use crate::produce::{ensure_topic, produce_blocking, ProduceOptions};
use crate::record::Record;
use crate::sink::{config_sink_factory, DeliveryFuture, NullSink, Sink, SinkFactory};

/// Marks the child's result line on its standard output.
const RESULT_PREFIX: &str = "BENCH-RESULT ";
/// Marks the helper broker's address line on its standard output.
const BROKER_PREFIX: &str = "BENCH-BROKER ";
/// Longest a child may take to read its topic (every loop here is bounded).
const CHILD_LIMIT: Duration = Duration::from_secs(600);
/// How often a pipeline child looks at its progress.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// Compression of the preloaded records.
const PRELOAD_COMPRESSION: &str = "lz4";
/// How often a pipeline child logs its progress at debug level.
const TRACE_EVERY: Duration = Duration::from_millis(250);
/// Pace of the slowed sink in the memory ceiling runs, as a share of the raw consumption rate.
const PACED_SHARE: f64 = 0.10;

/// What `logbridge bench` measures (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Brokers to measure against (default: librdkafka's mock cluster in a helper process).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Events preloaded and read by every measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Rounds of raw, null-sink and kafka-sink measurements (medians are printed).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Size of the key space.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Size of each event in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Backlogs of the memory ceiling runs, comma separated (`none`: skip them).
    #[arg(long, default_value = "1000000,5000000")]
    pub memory_backlogs: Counts,
    /// Partitions of the memory ceiling topics (more than `partitions`: the mock cluster keeps
    /// only 5 MiB per partition, and a deep backlog needs room).
    #[arg(long, default_value_t = 64)]
    pub memory_partitions: i32,
    /// Longest window of a memory ceiling run, in seconds.
    #[arg(long, default_value_t = 20)]
    pub memory_seconds: u64,
    /// `pipeline.commit_interval_ms` of the measured pipeline.
    #[arg(long, default_value_t = 1_000)]
    pub commit_interval_ms: u64,
    /// Pipeline modes to measure besides raw librdkafka (the reference): null, kafka.
    #[arg(long, value_delimiter = ',', default_value = "null,kafka")]
    pub modes: Vec<Mode>,
    /// librdkafka consumer property for every mode, `key=value` (repeatable).
    #[arg(long = "consumer-option")]
    pub consumer_options: Vec<String>,
}

/// A comma-separated list of counts; empty or `none` for none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts(pub Vec<u64>);

impl std::str::FromStr for Counts {
    type Err = String;

    fn from_str(text: &str) -> Result<Counts, String> {
        let text = text.trim();
        if text.is_empty() || text == "none" {
            return Ok(Counts(Vec::new()));
        }
        text.split(',')
            .map(|part| {
                part.trim()
                    .replace('_', "")
                    .parse::<u64>()
                    .map_err(|_| format!("`{part}` is not a count"))
            })
            .collect::<Result<_, _>>()
            .map(Counts)
    }
}

/// What a child measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// librdkafka alone, no decoding, no commits.
    Raw,
    /// The pipeline to null sinks.
    Null,
    /// The pipeline to Kafka sinks.
    Kafka,
    /// The pipeline to null sinks paced to a fixed rate (memory ceiling).
    Paced,
}

impl Mode {
    /// Name on the command line and in the output.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Null => "null",
            Mode::Kafka => "kafka",
            Mode::Paced => "paced",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        [Mode::Raw, Mode::Null, Mode::Kafka, Mode::Paced]
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| format!("unknown mode `{text}`: raw, null, kafka or paced"))
    }
}

/// One measurement, done in a child process (the arguments of the hidden `bench-child`).
#[derive(Debug, Clone, clap::Args)]
pub struct ChildOptions {
    /// What to measure.
    #[arg(long)]
    pub mode: Mode,
    /// Bootstrap brokers.
    #[arg(long)]
    pub brokers: String,
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// Consumer group (fresh for every measurement).
    #[arg(long)]
    pub group: String,
    /// Destination topic of the `kafka` mode.
    #[arg(long)]
    pub out_topic: String,
    /// Events per second the `paced` sink lets through.
    #[arg(long, default_value_t = 0)]
    pub sink_rate: u64,
    /// How long a `paced` measurement lasts.
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
    /// `pipeline.commit_interval_ms`.
    #[arg(long, default_value_t = 1_000)]
    pub commit_interval_ms: u64,
    /// librdkafka consumer properties, `key=value`.
    #[arg(long = "consumer-option")]
    pub consumer_options: Vec<String>,
}

impl ChildOptions {
    fn args(&self) -> Vec<String> {
        vec![
            "bench-child".into(),
            format!("--mode={}", self.mode.as_str()),
            format!("--brokers={}", self.brokers),
            format!("--topic={}", self.topic),
            format!("--group={}", self.group),
            format!("--out-topic={}", self.out_topic),
            format!("--sink-rate={}", self.sink_rate),
            format!("--seconds={}", self.seconds),
            format!("--commit-interval-ms={}", self.commit_interval_ms),
        ]
        .into_iter()
        .chain(
            self.consumer_options
                .iter()
                .map(|option| format!("--consumer-option={option}")),
        )
        .collect()
    }
}

/// What a child reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Records read (and, for the pipeline, committed).
    pub events: u64,
    /// Wall time from the first record to the end.
    pub seconds: f64,
    /// User + system CPU time over the same window.
    pub cpu_seconds: f64,
    /// Peak resident set size of the child.
    pub peak_rss_bytes: u64,
    /// Commit requests sent within the window.
    pub commits: u64,
    /// Pipeline only: wall time from the first record until every record was finished (the
    /// rest of `seconds` is the wait for the next commit interval).
    #[serde(default)]
    pub finished_seconds: Option<f64>,
}

impl Measurement {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    /// CPU seconds per million events.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_seconds * 1e6 / (self.events.max(1) as f64)
    }

    /// Commit requests per second.
    pub fn commits_per_second(&self) -> f64 {
        self.commits as f64 / self.seconds.max(1e-9)
    }

    /// Events per second until the last record finished (pipeline only), before the wait for
    /// the commit interval.
    pub fn finished_rate(&self) -> Option<f64> {
        self.finished_seconds
            .map(|seconds| self.events as f64 / seconds.max(1e-9))
    }

    /// Peak RSS in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// The configuration every pipeline measurement runs: three routes by level that together take
/// every level the sample traffic has, to null sinks or to `out_topic`.
pub fn bench_config(options: &ChildOptions) -> anyhow::Result<Config> {
    let sink = match options.mode {
        Mode::Kafka => format!("{{ type = \"kafka\", topic = \"{}\" }}", options.out_topic),
        _ => "{ type = \"null\" }".to_string(),
    };
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]

[kafka.options]
"auto.offset.reset" = "earliest"

[pipeline]
commit_interval_ms = {interval}

[http]
listen = "127.0.0.1:0"

[[routes]]
name = "errors"
levels = ["error", "fatal"]
workers = 2
sink = {sink}

[[routes]]
name = "warnings"
levels = ["warning"]
workers = 1
sink = {sink}

[[routes]]
name = "info"
levels = ["info", "debug"]
workers = 2
sink = {sink}
"#,
        brokers = options.brokers,
        group = options.group,
        topic = options.topic,
        interval = options.commit_interval_ms,
    );
    let mut config = Config::from_toml_str(&text).context("benchmark configuration is invalid")?;
    for option in &options.consumer_options {
        let (key, value) = option
            .split_once('=')
            .with_context(|| format!("consumer option `{option}` is not key=value"))?;
        config.kafka.options.insert(
            key.trim().to_string(),
            crate::config::OptionValue::Text(value.trim().to_string()),
        );
    }
    config
        .validate()
        .context("benchmark configuration is invalid")?;
    Ok(config)
}

/// Runs one measurement (the hidden `bench-child` command) and prints its result line.
pub async fn run_child(options: ChildOptions) -> anyhow::Result<()> {
    let measurement = match options.mode {
        Mode::Raw => tokio::task::spawn_blocking(move || measure_raw(&options))
            .await
            .context("raw consumer thread failed")??,
        _ => measure_pipeline(&options).await?,
    };
    println!(
        "{RESULT_PREFIX}{}",
        serde_json::to_string(&measurement).context("cannot encode the result")?
    );
    Ok(())
}

/// Start of a measurement window.
struct Window {
    started: Instant,
    cpu: f64,
}

impl Window {
    fn start() -> Window {
        Window {
            started: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    fn finish(&self, events: u64, commits: u64) -> Measurement {
        Measurement {
            events,
            seconds: self.started.elapsed().as_secs_f64(),
            cpu_seconds: cpu_seconds() - self.cpu,
            peak_rss_bytes: peak_rss_bytes(),
            commits,
            finished_seconds: None,
        }
    }
}

/// Each partition of `topic` with its end offset (high watermark) and how many records it holds.
fn topic_ends(brokers: &str, topic: &str) -> anyhow::Result<Vec<(i32, i64, u64)>> {
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

/// Reads the whole topic with a bare consumer (logbridge's client settings, no decoding).
fn measure_raw(options: &ChildOptions) -> anyhow::Result<Measurement> {
    let expected: u64 = topic_ends(&options.brokers, &options.topic)?
        .iter()
        .map(|(_, _, count)| count)
        .sum();
    let config = bench_config(options)?;
    let consumer: BaseConsumer = crate::consumer::client_config(&config)
        .create()
        .context("failed to create the consumer")?;
    consumer
        .subscribe(&[&options.topic])
        .context("failed to subscribe")?;
    let deadline = Instant::now() + CHILD_LIMIT;
    let mut window = None;
    let (mut count, mut bytes) = (0u64, 0u64);
    while count < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "read {count} of {expected} records in {CHILD_LIMIT:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                window.get_or_insert_with(Window::start);
                count += 1;
                bytes += message.payload_len() as u64;
            }
            Some(Err(err)) => tracing::warn!(error = %err, "consume error"),
            None => {}
        }
    }
    let window = window.unwrap_or_else(Window::start);
    let measurement = window.finish(count, 0);
    tracing::debug!(bytes, "raw consumer done");
    Ok(measurement)
}

/// Runs the pipeline until the committed offsets reach the end of the topic (or, paced, for a
/// fixed time).
async fn measure_pipeline(options: &ChildOptions) -> anyhow::Result<Measurement> {
    let ends = {
        let (brokers, topic) = (options.brokers.clone(), options.topic.clone());
        tokio::task::spawn_blocking(move || topic_ends(&brokers, &topic))
            .await
            .context("metadata thread failed")??
    };
    let expected: u64 = ends.iter().map(|(_, _, count)| count).sum();
    let config = bench_config(options)?;
    let metrics = Arc::new(Metrics::new());
    let sink_factory = match options.mode {
        Mode::Paced => paced_sink_factory(options.sink_rate),
        _ => config_sink_factory(),
    };
    let run_options = RunOptions {
        sink_factory,
        metrics: metrics.clone(),
        http: HttpBind::Disabled,
    };
    let shutdown = CancellationToken::new();
    let mut pipeline = tokio::spawn(pipeline::run(config, run_options, shutdown.clone()));
    let topic = options.topic.as_str();
    let consumed = || metrics.consumed.with_label_values(&[topic]).get();
    let committed_to_end = || {
        ends.iter().all(|(partition, end, _)| {
            let partition = partition.to_string();
            metrics
                .committed_offset
                .with_label_values(&[topic, &partition])
                .get()
                >= *end
        })
    };
    let commits = || {
        ["ok", "error", "stale"]
            .iter()
            .map(|result| metrics.commits.with_label_values(&[result]).get())
            .sum::<u64>()
    };
    let deadline = Instant::now() + CHILD_LIMIT;
    let mut window: Option<Window> = None;
    let mut finished_at: Option<f64> = None;
    let mut traced = Instant::now();
    let measurement = loop {
        if tracing::enabled!(tracing::Level::DEBUG) && traced.elapsed() >= TRACE_EVERY {
            traced = Instant::now();
            let depth = |stage: &str| metrics.channel_depth.with_label_values(&[stage]).get();
            tracing::debug!(
                consumed = consumed(),
                in_flight = metrics.in_flight.get(),
                pauses = metrics.pauses.get(),
                router = depth("router"),
                committer = depth("committer"),
                errors = depth("errors"),
                warnings = depth("warnings"),
                info = depth("info"),
                "progress"
            );
        }
        tokio::select! {
            result = &mut pipeline => {
                result.context("pipeline task failed")??;
                anyhow::bail!("the pipeline stopped before the measurement ended");
            }
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "consumed {} of {expected} records in {CHILD_LIMIT:?}",
            consumed()
        );
        match &window {
            None if consumed() > 0 => window = Some(Window::start()),
            None => {}
            Some(open) => {
                if finished_at.is_none() && consumed() >= expected && metrics.in_flight.get() == 0 {
                    finished_at = Some(open.started.elapsed().as_secs_f64());
                }
                match options.mode {
                    Mode::Paced if open.started.elapsed().as_secs_f64() >= options.seconds => {
                        break open.finish(consumed(), commits());
                    }
                    Mode::Paced => {}
                    _ if committed_to_end() => {
                        let mut measurement = open.finish(expected, commits());
                        measurement.finished_seconds = finished_at;
                        break measurement;
                    }
                    _ => {}
                }
            }
        }
    };
    shutdown.cancel();
    pipeline.await.context("pipeline task failed")??;
    Ok(measurement)
}

/// Sinks that discard records but let only `rate` of them through per second, all workers
/// together.
fn paced_sink_factory(rate: u64) -> SinkFactory {
    let pace = Arc::new(Pace {
        per_record: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
        next: Mutex::new(Instant::now()),
    });
    Arc::new(move |_route: &RouteConfig, _index: usize| {
        let sink: Box<dyn Sink> = Box::new(PacedSink { pace: pace.clone() });
        Ok(sink)
    })
}

/// A shared schedule: each batch takes its share of time after the previous one.
struct Pace {
    per_record: Duration,
    next: Mutex<Instant>,
}

impl Pace {
    /// Books `records` and returns when they are due.
    fn book(&self, records: usize) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let start = (*next).max(Instant::now());
        *next = start + self.per_record * records as u32;
        *next
    }
}

struct PacedSink {
    pace: Arc<Pace>,
}

impl Sink for PacedSink {
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        let due = self.pace.book(batch.len());
        Box::pin(async move {
            tokio::time::sleep_until(due.into()).await;
            NullSink.deliver(route, batch).await
        })
    }
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Peak resident set size of this process (`VmHWM`), 0 where /proc does not tell.
fn peak_rss_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmHWM:").map_or(0, |kib| kib * 1024)
}

/// A `Name:   1234 kB` field of a /proc file, in KiB.
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = text.lines().find_map(|line| line.strip_prefix(field))?;
    rest.trim().trim_end_matches("kB").trim().parse().ok()
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
enum Broker {
    /// Brokers given on the command line.
    External(String),
    /// The mock cluster in a helper process; dropping it ends the process.
    Helper(Box<HelperBroker>),
}

/// The helper process hosting the mock cluster, and its command pipes.
struct HelperBroker {
    child: Child,
    stdin: tokio::process::ChildStdin,
    replies: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    brokers: String,
}

impl Broker {
    async fn start_helper(exe: &Path) -> anyhow::Result<Broker> {
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

    fn brokers(&self) -> &str {
        match self {
            Broker::External(brokers) => brokers,
            Broker::Helper(helper) => &helper.brokers,
        }
    }

    async fn create_topic(&mut self, topic: &str, partitions: i32) -> anyhow::Result<()> {
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

    async fn stop(self) {
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

/// Runs one measurement in a child process.
///
/// `LOGBRIDGE_BENCH_WRAP_<MODE>` (e.g. `LOGBRIDGE_BENCH_WRAP_NULL="perf record -g --"`) runs
/// that mode's child under a profiler: the variable's words go in front of the command.
async fn measure(exe: &Path, options: &ChildOptions) -> anyhow::Result<Measurement> {
    let wrap_var = format!(
        "LOGBRIDGE_BENCH_WRAP_{}",
        options.mode.as_str().to_ascii_uppercase()
    );
    let wrapper = std::env::var(&wrap_var).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    };
    let child = command
        .args(options.args())
        .env(
            "LOGBRIDGE_LOG",
            std::env::var("LOGBRIDGE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start a benchmark child")?;
    let output = tokio::time::timeout(
        CHILD_LIMIT + Duration::from_secs(60),
        child.wait_with_output(),
    )
    .await
    .with_context(|| format!("{} measurement did not finish", options.mode.as_str()))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix(RESULT_PREFIX))
        .with_context(|| {
            format!(
                "{} measurement failed ({})",
                options.mode.as_str(),
                output.status
            )
        })?;
    serde_json::from_str(line).context("unreadable measurement")
}

/// Preloads `count` sample events into a new topic.
async fn preload(
    broker: &mut Broker,
    topic: &str,
    count: u64,
    partitions: i32,
    options: &BenchOptions,
) -> anyhow::Result<()> {
    broker.create_topic(topic, partitions).await?;
    let produce = ProduceOptions {
        brokers: broker.brokers().to_string(),
        topic: topic.to_string(),
        count: Some(count),
        keys: options.keys,
        payload_bytes: options.payload_bytes,
        seed: Some(count),
        // The mock cluster keeps only the newest 5 MiB of each partition; compressed, a million
        // sample events fit in 8 partitions. Kafka producers commonly compress, and the
        // consumer pays for decompression in every mode alike.
        options: vec![("compression.type".into(), PRELOAD_COMPRESSION.into())],
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
        "the broker kept {kept} of the {count} records produced to {topic} (the mock cluster \
         keeps the newest 5 MiB of each partition): use more partitions or --brokers"
    );
    println!("preloaded {topic} ({partitions} partitions, lz4): {summary}");
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median of one figure over a mode's measurements.
fn median_of(runs: &[Measurement], figure: impl Fn(&Measurement) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib =
        proc_kib("/proc/meminfo", "MemTotal:").map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {memory_gib:.1} GiB, {model}")
}

fn row(label: &str, measurement: &Measurement) -> String {
    let finished = match measurement.finished_rate() {
        Some(rate) => format!("{rate:.0}"),
        None => "-".to_string(),
    };
    format!(
        "{label:<10} {:>10} {:>12.0} {:>12} {:>8.2} {:>10.2} {:>10.1} {:>9.2}",
        measurement.events,
        measurement.rate(),
        finished,
        measurement.seconds,
        measurement.cpu_per_million(),
        measurement.peak_rss_mib(),
        measurement.commits_per_second(),
    )
}

const HEADER: &str =
    "run        events     events/s   finished/s  seconds cpu s/M ev  RSS MiB  commits/s";

/// The `bench` command.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.events > 0, "--events must be positive");
    anyhow::ensure!(options.runs > 0, "--runs must be positive");
    let exe: PathBuf = std::env::current_exe().context("cannot find the logbridge binary")?;
    let mut broker = match &options.brokers {
        Some(brokers) => Broker::External(brokers.clone()),
        None => Broker::start_helper(&exe).await?,
    };
    let result = bench(&exe, &mut broker, &options).await;
    broker.stop().await;
    result
}

async fn bench(exe: &Path, broker: &mut Broker, options: &BenchOptions) -> anyhow::Result<()> {
    let brokers = broker.brokers().to_string();
    let embedded = matches!(broker, Broker::Helper(_));
    println!("logbridge bench");
    println!("machine: {}", machine());
    println!(
        "broker: {}",
        if embedded {
            format!("librdkafka mock cluster in a helper process ({brokers})")
        } else {
            brokers.to_string()
        }
    );
    println!(
        "workload: {} events of {} bytes, {} partitions, {} keys; commit_interval_ms {}; {} runs",
        options.events,
        options.payload_bytes,
        options.partitions,
        options.keys,
        options.commit_interval_ms,
        options.runs
    );
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let topic = format!("logbridge-bench-{stamp}-{}", std::process::id());
    let out_topic = format!("{topic}-out");
    preload(broker, &topic, options.events, options.partitions, options).await?;
    broker.create_topic(&out_topic, options.partitions).await?;
    let child = |mode: Mode, topic: &str, group: String| ChildOptions {
        mode,
        brokers: brokers.clone(),
        topic: topic.to_string(),
        group,
        out_topic: out_topic.clone(),
        sink_rate: 0,
        seconds: 0.0,
        commit_interval_ms: options.commit_interval_ms,
        consumer_options: options.consumer_options.clone(),
    };

    println!();
    println!("{HEADER}");
    let mut results: BTreeMap<Mode, Vec<Measurement>> = BTreeMap::new();
    for round in 1..=options.runs {
        for mode in [Mode::Raw, Mode::Null, Mode::Kafka] {
            if mode != Mode::Raw && !options.modes.contains(&mode) {
                continue;
            }
            let group = format!("{topic}-{}-{round}", mode.as_str());
            let measurement = measure(exe, &child(mode, &topic, group)).await?;
            println!(
                "{}",
                row(&format!("{round} {}", mode.as_str()), &measurement)
            );
            results.entry(mode).or_default().push(measurement);
        }
    }

    let figures = |mode: Mode| results.get(&mode).map(Vec::as_slice).unwrap_or_default();
    let rate = |mode: Mode| median_of(figures(mode), Measurement::rate);
    let raw = rate(Mode::Raw);
    println!();
    println!("medians of {} runs:", options.runs);
    for (label, mode) in [
        ("(a) raw librdkafka", Mode::Raw),
        ("(b) pipeline, null sinks", Mode::Null),
        ("(c) pipeline, kafka sinks", Mode::Kafka),
    ] {
        let runs = figures(mode);
        if runs.is_empty() {
            continue;
        }
        let finished = median_of(runs, |m| m.finished_rate().unwrap_or(f64::NAN));
        let finished = if finished.is_nan() {
            String::new()
        } else {
            format!(" ({finished:.0} until finished)")
        };
        println!(
            "{label:<27} {:>10.0} events/s{finished}  {:>6.2} cpu s/M ev  {:>6.1} MiB peak RSS  {:>5.2} commits/s",
            median_of(runs, Measurement::rate),
            median_of(runs, Measurement::cpu_per_million),
            median_of(runs, Measurement::peak_rss_mib),
            median_of(runs, Measurement::commits_per_second),
        );
    }
    println!(
        "b/a = {:.2} (target >= 0.90)   c/a = {:.2} (target >= 0.45)",
        rate(Mode::Null) / raw,
        rate(Mode::Kafka) / raw
    );
    let finished =
        |mode: Mode| median_of(figures(mode), |m| m.finished_rate().unwrap_or(f64::NAN)) / raw;
    println!(
        "until the last record finished (before the wait for the next commit interval): b/a = {:.2}   c/a = {:.2}",
        finished(Mode::Null),
        finished(Mode::Kafka)
    );
    let interval = options.commit_interval_ms as f64 / 1000.0;
    let per_interval = [Mode::Null, Mode::Kafka]
        .iter()
        .flat_map(|mode| figures(*mode))
        .map(|m| m.commits as f64 / (m.seconds / interval).ceil().max(1.0))
        .fold(0.0, f64::max);
    println!(
        "commit requests per {} ms interval: at most {per_interval:.2} in any run (target <= 1)",
        options.commit_interval_ms
    );

    if options.memory_backlogs.0.is_empty() {
        return Ok(());
    }
    // The input rate the sink is slowed against: what the pipeline moves to null sinks (raw
    // librdkafka's rate if that mode was not measured).
    let input = match rate(Mode::Null) {
        rate if rate.is_finite() && rate > 0.0 => rate,
        _ => raw,
    };
    let sink_rate = ((input * PACED_SHARE) as u64).max(1);
    let smallest = options.memory_backlogs.0.iter().copied().min().unwrap_or(0);
    // The window must end well before the smallest backlog drains, or it is no backlog.
    let seconds = (options.memory_seconds as f64).min(smallest as f64 / sink_rate as f64 / 2.0);
    println!();
    println!(
        "memory ceiling: {} partitions, sink paced to {sink_rate} events/s ({:.0} % of the pipeline's rate), {seconds:.1} s per backlog",
        options.memory_partitions,
        PACED_SHARE * 100.0
    );
    let mut ceiling: Vec<(u64, Measurement)> = Vec::new();
    for &backlog in &options.memory_backlogs.0 {
        let backlog_topic = format!("{topic}-backlog-{backlog}");
        let partitions = options.memory_partitions;
        preload(broker, &backlog_topic, backlog, partitions, options).await?;
        let group = format!("{topic}-paced-{backlog}");
        let mut paced = child(Mode::Paced, &backlog_topic, group);
        paced.sink_rate = sink_rate;
        paced.seconds = seconds;
        let measurement = measure(exe, &paced).await?;
        println!(
            "backlog {backlog:>9}: peak RSS {:>6.1} MiB, {} events through in {:.1} s ({:.0} events/s), {:.2} commits/s",
            measurement.peak_rss_mib(),
            measurement.events,
            measurement.seconds,
            measurement.rate(),
            measurement.commits_per_second()
        );
        ceiling.push((backlog, measurement));
    }
    if let (Some((first, base)), Some((last, top))) = (ceiling.first(), ceiling.last()) {
        if first != last {
            println!(
                "peak RSS at {last} vs {first}: {:+.1} % (target within ±10 %; <= 96 MiB at 1M)",
                (top.peak_rss_mib() / base.peak_rss_mib() - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_lists_and_none() {
        assert_eq!(
            "1000000,5_000_000".parse(),
            Ok(Counts(vec![1_000_000, 5_000_000]))
        );
        assert_eq!("none".parse(), Ok(Counts(Vec::new())));
        assert_eq!("".parse(), Ok(Counts(Vec::new())));
        assert!("1M".parse::<Counts>().is_err());
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn modes_round_trip_through_their_names() {
        for mode in [Mode::Raw, Mode::Null, Mode::Kafka, Mode::Paced] {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        assert!("fast".parse::<Mode>().is_err());
    }

    #[test]
    fn the_benchmark_configuration_routes_every_sample_level() {
        let options = ChildOptions {
            mode: Mode::Kafka,
            brokers: "localhost:9092".into(),
            topic: "in".into(),
            group: "g".into(),
            out_topic: "out".into(),
            sink_rate: 0,
            seconds: 0.0,
            commit_interval_ms: 1000,
            consumer_options: vec!["fetch.max.bytes=4194304".into()],
        };
        let config = bench_config(&options).expect("valid");
        assert_eq!(
            config.kafka.options["fetch.max.bytes"].to_string(),
            "4194304"
        );
        for level in ["error", "fatal", "warning", "info", "debug"] {
            assert!(
                config
                    .routes
                    .iter()
                    .any(|route| route.levels.iter().any(|l| l == level)),
                "{level} is routed"
            );
        }
    }

    #[test]
    fn the_paced_sink_lets_through_its_rate() {
        let pace = Pace {
            per_record: Duration::from_millis(1),
            next: Mutex::new(Instant::now()),
        };
        let first = pace.book(100);
        let second = pace.book(100);
        assert!(second.duration_since(first) >= Duration::from_millis(100));
    }

    #[test]
    fn cpu_time_and_peak_rss_are_read() {
        let busy = Instant::now();
        let mut spin = 0u64;
        while busy.elapsed() < Duration::from_millis(30) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        assert!(spin > 0);
        assert!(cpu_seconds() > 0.0);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes() > 1024 * 1024);
        }
    }
}
