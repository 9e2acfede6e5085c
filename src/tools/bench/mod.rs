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
//!    * `http`: the same with every route posting NDJSON to a local endpoint that answers at
//!      once ([`endpoint`]); `loki`: the same with Loki sinks (JSON streams) to it;
//! 4. checks the memory ceiling: the pipeline against backlogs of different sizes with a sink
//!    paced to 10 % of the raw consumption rate, reporting the peak RSS of each.
//!
//! With `--soak DURATION` it runs [`soak`] instead: a long mixed stream, printing what grows.
//!
//! A child measures from the first record it reads to the end, so process start and group join
//! do not count; CPU is its user + system time over that window, and peak RSS its high-water
//! mark (`VmHWM`) over its whole life.

//!
//! Files: [`options`] (command lines), [`broker`] (the helper broker and the preload),
//! [`child`] (one measurement in a child process), [`measurement`] (what is measured and how),
//! [`report`] (what is printed); here, the orchestration.

mod broker;
mod child;
mod decoding;
mod endpoint;
mod measurement;
mod options;
mod report;
mod soak;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::Command;

pub use broker::serve_broker;
pub use child::run_child;
pub use options::{BenchOptions, ChildOptions, Counts, Mode};

use broker::{preload, Broker};
use endpoint::Body;
use measurement::{median_of, Measurement};
use report::{machine, row, HEADER};

/// Where the object-store mode's run for consumer group `group` writes its objects.
fn object_dir(group: &str) -> PathBuf {
    std::env::temp_dir()
        .join("logbridge-bench-objects")
        .join(group)
}

/// Marks the child's result line on its standard output.
const RESULT_PREFIX: &str = "BENCH-RESULT ";
/// Longest a child may take to read its topic (every loop here is bounded).
const CHILD_LIMIT: Duration = Duration::from_secs(600);
/// Pace of the slowed sink in the memory ceiling runs, as a share of the raw consumption rate.
const PACED_SHARE: f64 = 0.10;

/// A command running `exe` under `wrapper` (a profiler's command line, whose words go in front;
/// empty: `exe` alone).
fn wrapped(exe: &Path, wrapper: &str) -> Command {
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
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
    let child = wrapped(exe, &wrapper)
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

/// The `bench` command.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.events > 0, "--events must be positive");
    anyhow::ensure!(options.runs > 0, "--runs must be positive");
    let exe: PathBuf = std::env::current_exe().context("cannot find the logbridge binary")?;
    let mut broker = match &options.brokers {
        Some(brokers) => Broker::External(brokers.clone()),
        None => Broker::start_helper(&exe).await?,
    };
    let result = match options.soak {
        Some(duration) => soak::soak(&exe, &mut broker, &options, duration).await,
        None => bench(&exe, &mut broker, &options).await,
    };
    broker.stop().await;
    result
}

async fn bench(exe: &Path, broker: &mut Broker, options: &BenchOptions) -> anyhow::Result<()> {
    let brokers = broker.brokers().to_string();
    let embedded = broker.is_embedded();
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
    let topic_ends = preload(
        broker,
        &topic,
        options.events,
        options.partitions,
        options.payload_bytes,
        options,
    )
    .await?;
    broker.create_topic(&out_topic, options.partitions).await?;
    // Started whether or not the http mode runs: it costs a listening socket.
    let endpoint = endpoint::Endpoint::start().await?;
    let http_url = endpoint.url.clone();
    let child = |mode: Mode, topic: &str, group: String, ends: &[(i32, i64)]| ChildOptions {
        mode,
        brokers: brokers.clone(),
        topic: topic.to_string(),
        group,
        out_topic: out_topic.clone(),
        http_url: http_url.clone(),
        sink_rate: 0,
        seconds: 0.0,
        commit_interval_ms: options.commit_interval_ms,
        consumer_options: options.consumer_options.clone(),
        ends: ends.to_vec(),
    };

    println!();
    println!("{HEADER}");
    let mut results: BTreeMap<Mode, Vec<Measurement>> = BTreeMap::new();
    for round in 1..=options.runs {
        for mode in [
            Mode::Raw,
            Mode::Null,
            Mode::Kafka,
            Mode::KafkaEos,
            Mode::Http,
            Mode::Otlp,
            Mode::Loki,
            Mode::ObjectStore,
            Mode::FanOut,
            Mode::Transforms,
        ] {
            if mode != Mode::Raw && !options.modes.contains(&mode) {
                continue;
            }
            let group = format!("{topic}-{}-{round}", mode.as_str());
            let measurement = measure(exe, &child(mode, &topic, group, &topic_ends)).await?;
            println!(
                "{}",
                row(&format!("{round} {}", mode.as_str()), &measurement)
            );
            results.entry(mode).or_default().push(measurement);
        }
    }

    let raw = report::medians(&results, options);
    // What the endpoint counted, not what was sent: the events it received are checked against
    // the events the runs of each mode read.
    for (mode, body, requests, events, per, format) in [
        (
            Mode::Otlp,
            Body::Otlp,
            "requests",
            "log records",
            "records per request",
            "gzip protobuf",
        ),
        (
            Mode::Http,
            Body::Ndjson,
            "requests",
            "events",
            "events per request",
            "NDJSON",
        ),
        (
            Mode::Loki,
            Body::Loki,
            "pushes",
            "entries",
            "entries per push",
            "JSON",
        ),
    ] {
        let runs = results.get(&mode).map_or(0, Vec::len) as u64;
        let received = endpoint.received(body);
        if runs > 0 && received.requests > 0 {
            let name = mode.as_str();
            println!(
                "{name} endpoint: {} {requests}, {} {events} ({} read by {runs} {name} runs), {:.1} MiB of {format}, {:.0} {per}",
                received.requests,
                received.events,
                options.events * runs,
                received.bytes as f64 / (1 << 20) as f64,
                received.events as f64 / received.requests as f64
            );
        }
    }
    report::objects(&topic, options.runs, options.events);
    let rate = |mode: Mode| {
        median_of(
            results.get(&mode).map(Vec::as_slice).unwrap_or_default(),
            Measurement::rate,
        )
    };

    let decoding = options.clone();
    tokio::task::spawn_blocking(move || decoding::decoder_cost(&decoding))
        .await
        .context("decoder cost thread failed")??;
    large_events(exe, broker, &child, &topic, options).await?;
    if options.memory_backlogs.0.is_empty() {
        return Ok(());
    }
    // The input rate the sink is slowed against: what the pipeline moves to null sinks (raw
    // librdkafka's rate if that mode was not measured).
    let input = match rate(Mode::Null) {
        rate if rate.is_finite() && rate > 0.0 => rate,
        _ => raw,
    };
    let sink_rate = match options.memory_sink_rate {
        0 => ((input * PACED_SHARE) as u64).max(1),
        fixed => fixed,
    };
    let smallest = options.memory_backlogs.0.iter().copied().min().unwrap_or(0);
    // The window must end well before the smallest backlog drains, or it is no backlog.
    let seconds = (options.memory_seconds as f64).min(smallest as f64 / sink_rate as f64 / 2.0);
    println!();
    println!(
        "memory ceiling: {} partitions, sink paced to {sink_rate} events/s ({:.0} % of the pipeline's rate), {seconds:.1} s per backlog",
        options.memory_partitions,
        sink_rate as f64 / input * 100.0
    );
    let mut ceiling: Vec<(u64, Measurement)> = Vec::new();
    for &backlog in &options.memory_backlogs.0 {
        let backlog_topic = format!("{topic}-backlog-{backlog}");
        let partitions = options.memory_partitions;
        let ends = preload(
            broker,
            &backlog_topic,
            backlog,
            partitions,
            options.payload_bytes,
            options,
        )
        .await?;
        let group = format!("{topic}-paced-{backlog}");
        let mut paced = child(Mode::Paced, &backlog_topic, group, &ends);
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
    report::ceiling_change(&ceiling);
    Ok(())
}

/// Large events through a slow sink: peak RSS for each size, where `max_in_flight_bytes` (not
/// the record capacities) bounds what the pipeline holds.
async fn large_events(
    exe: &Path,
    broker: &mut Broker,
    child: &impl Fn(Mode, &str, String, &[(i32, i64)]) -> ChildOptions,
    topic: &str,
    options: &BenchOptions,
) -> anyhow::Result<()> {
    if options.large_events.0.is_empty() {
        return Ok(());
    }
    let rate = options.large_rate.max(1);
    // The window ends well before the backlog drains.
    let seconds =
        (options.memory_seconds as f64).min(options.large_count as f64 / rate as f64 / 2.0);
    println!();
    println!(
        "large events: {} events of each size, {} partitions, sink paced to {rate} events/s, {seconds:.1} s each",
        options.large_count, options.partitions
    );
    for &size in &options.large_events.0 {
        let large_topic = format!("{topic}-large-{size}");
        let ends = preload(
            broker,
            &large_topic,
            options.large_count,
            options.partitions,
            size as usize,
            options,
        )
        .await?;
        let mut paced = child(
            Mode::Paced,
            &large_topic,
            format!("{large_topic}-paced"),
            &ends,
        );
        paced.sink_rate = rate;
        paced.seconds = seconds;
        let measurement = measure(exe, &paced).await?;
        println!(
            "events of {size:>8} bytes: peak RSS {:>6.1} MiB, {} events through in {:.1} s ({:.1} MiB/s), goal for 400 KiB events <= 256 MiB",
            measurement.peak_rss_mib(),
            measurement.events,
            measurement.seconds,
            measurement.events as f64 * size as f64 / measurement.seconds.max(1e-9) / (1024.0 * 1024.0),
        );
    }
    Ok(())
}
