//! One measurement, in a child process of its own (the hidden `bench-child` command): a bare
//! librdkafka consumer (`raw`), or the whole pipeline to null, Kafka or paced sinks, timed from
//! the first record read until the committed offsets reach the end of the topic.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use super::broker::topic_ends;
use super::measurement::{Measurement, Window};
use super::options::{ChildOptions, Mode};
use super::{CHILD_LIMIT, RESULT_PREFIX};
use crate::config::{Config, OptionValue, RouteConfig};
use crate::consumer::client_config;
use crate::metrics::Metrics;
use crate::pipeline::{self, HttpBind, RunOptions};
use crate::record::Record;
use crate::sink::{config_sink_factory, DeliveryFuture, NullSink, Sink, SinkFactory, SinkLinks};

/// How often a pipeline child looks at its progress.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// How often a pipeline child logs its progress at debug level.
const TRACE_EVERY: Duration = Duration::from_millis(250);

/// The transforms of the `transforms` mode: what a typical route does (about the chain the
/// README's cookbook shows).
const TYPICAL_TRANSFORMS: &str = r#"transforms = [
  { set = "cluster", value = "eu-1" },
  { rename = "msg", to = "message" },
  { remove = "password" },
  { redact = "message", pattern = '[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}', replacement = "[email]" },
  { add_metadata = "kafka" },
]"#;

/// The routes of a measurement: three by level (together every level the sample traffic
/// has); for `fan-out` each event goes to all three, for `transforms` each route has a field
/// condition (one that every sample event meets) and the typical transform chain.
fn bench_routes(mode: Mode, sink: &str) -> String {
    let routes = [
        ("errors", "[\"error\", \"fatal\"]", 2),
        ("warnings", "[\"warning\"]", 1),
        ("info", "[\"info\", \"debug\"]", 2),
    ];
    let all = "[\"error\", \"fatal\", \"warning\", \"info\", \"debug\"]";
    let mut text = String::new();
    for (index, (name, levels, workers)) in routes.iter().enumerate() {
        let (levels, extra) = match mode {
            Mode::FanOut if index < 2 => (all, "continue = true\n".to_string()),
            Mode::FanOut => (all, String::new()),
            Mode::Transforms => (
                *levels,
                format!("when = {{ field = \"message\", exists = true }}\n{TYPICAL_TRANSFORMS}\n"),
            ),
            _ => (*levels, String::new()),
        };
        text.push_str(&format!(
            "\n[[routes]]\nname = \"{name}\"\nlevels = {levels}\nworkers = {workers}\n{extra}sink = {}\n",
            sink.replace(ROUTE, name)
        ));
    }
    text
}

/// Stands for the route's name in a sink (each object-store route its own directory).
const ROUTE: &str = "@ROUTE@";

/// The configuration every pipeline measurement runs: three routes by level that together take
/// every level the sample traffic has, to null sinks or to `out_topic`.
pub fn bench_config(options: &ChildOptions) -> anyhow::Result<Config> {
    let sink = match options.mode {
        Mode::Kafka | Mode::KafkaEos => {
            format!("{{ type = \"kafka\", topic = \"{}\" }}", options.out_topic)
        }
        Mode::Http => format!("{{ type = \"http\", url = \"{}\" }}", options.http_url),
        Mode::Otlp => format!("{{ type = \"otlp\", url = \"{}\" }}", options.http_url),
        // The endpoint answers any path; the labels are the default ones, level and service.
        Mode::Loki => format!("{{ type = \"loki\", url = \"{}\" }}", options.http_url),
        // A directory of the run's own (the parent reads the objects' sizes there); the tail of
        // each partition is closed after 1 s without records rather than the default 30 s.
        Mode::ObjectStore => format!(
            "{{ type = \"object_store\", url = \"file://{}/{ROUTE}\", idle_flush_ms = 1000 }}",
            super::object_dir(&options.group).display()
        ),
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
{delivery}

[http]
listen = "127.0.0.1:0"

{routes}"#,
        routes = bench_routes(options.mode, &sink),
        brokers = options.brokers,
        group = options.group,
        topic = options.topic,
        interval = options.commit_interval_ms,
        delivery = match options.mode {
            // Its own id per measurement (the group is fresh for every one).
            Mode::KafkaEos => format!(
                "delivery = \"exactly-once\"\ntransactional_id = \"{}\"",
                options.group
            ),
            _ => String::new(),
        },
    );
    let mut config = Config::from_toml_str(&text).context("benchmark configuration is invalid")?;
    for option in &options.consumer_options {
        let (key, value) = option
            .split_once('=')
            .with_context(|| format!("consumer option `{option}` is not key=value"))?;
        config.kafka.options.insert(
            key.trim().to_string(),
            OptionValue::Text(value.trim().to_string()),
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

/// The topic's end per partition and its record count: from the parent's delivery reports when
/// it passed them, else the high watermarks.
fn ends(options: &ChildOptions) -> anyhow::Result<Vec<(i32, i64, u64)>> {
    if options.ends.is_empty() {
        return topic_ends(&options.brokers, &options.topic);
    }
    Ok(options
        .ends
        .iter()
        .map(|(partition, end)| (*partition, *end, (*end).max(0) as u64))
        .collect())
}

/// Reads the whole topic with a bare group consumer (logbridge's client settings, no
/// decoding) that commits its position every `commit_interval_ms`, as logbridge commits: timed
/// until its committed offsets reach the end, and until it read the last record.
fn measure_raw(options: &ChildOptions) -> anyhow::Result<Measurement> {
    let expected: u64 = ends(options)?.iter().map(|(_, _, count)| count).sum();
    let config = bench_config(options)?;
    let consumer: BaseConsumer = client_config(&config)
        .create()
        .context("failed to create the consumer")?;
    consumer
        .subscribe(&[&options.topic])
        .context("failed to subscribe")?;
    let interval = Duration::from_millis(options.commit_interval_ms.max(1));
    // Ticks from the start, as logbridge's commit interval runs from the pipeline's start.
    let mut next_commit = Instant::now() + interval;
    let deadline = Instant::now() + CHILD_LIMIT;
    let mut window = None;
    let mut read_all_at = None;
    let (mut count, mut bytes, mut commits) = (0u64, 0u64, 0u64);
    loop {
        // One clock read per record, as before the bare client committed: more would slow
        // the reference down.
        let now = Instant::now();
        anyhow::ensure!(
            now < deadline,
            "read {count} of {expected} records in {CHILD_LIMIT:?}"
        );
        // Nothing read yet: nothing to commit.
        if now >= next_commit {
            next_commit += interval;
            if window.is_some() {
                let read_all = count >= expected;
                let positions = consumer.position().context("no consumer positions")?;
                commits += 1;
                match consumer.commit(&positions, rdkafka::consumer::CommitMode::Sync) {
                    // The positions after the last record are committed: the end is reached.
                    Ok(()) if read_all => break,
                    Ok(()) => {}
                    Err(err) => tracing::warn!(error = %err, "commit failed"),
                }
            }
        }
        if count >= expected {
            std::thread::sleep(next_commit.saturating_duration_since(now));
            continue;
        }
        let wait = next_commit
            .saturating_duration_since(now)
            .min(Duration::from_millis(100));
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let opened = window.get_or_insert_with(Window::start);
                count += 1;
                bytes += message.payload_len() as u64;
                if count >= expected {
                    read_all_at = Some(opened.started.elapsed().as_secs_f64());
                }
            }
            Some(Err(err)) => tracing::warn!(error = %err, "consume error"),
            None => {}
        }
    }
    let window = window.unwrap_or_else(Window::start);
    let mut measurement = window.finish(count, commits);
    measurement.finished_seconds = read_all_at;
    tracing::debug!(bytes, "raw consumer done");
    Ok(measurement)
}

/// Runs the pipeline until the committed offsets reach the end of the topic (or, paced, for a
/// fixed time).
async fn measure_pipeline(options: &ChildOptions) -> anyhow::Result<Measurement> {
    let ends = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || ends(&options))
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
            let depth = |stage: &str, route: &str| {
                metrics
                    .channel_depth
                    .with_label_values(&[stage, route])
                    .get()
            };
            tracing::debug!(
                consumed = consumed(),
                in_flight = metrics.in_flight.get(),
                pauses = metrics.pauses.with_label_values(&["backpressure"]).get(),
                router = depth("router", crate::metrics::NO_ROUTE),
                committer = depth("committer", crate::metrics::NO_ROUTE),
                errors = depth("worker", "errors"),
                warnings = depth("worker", "warnings"),
                info = depth("worker", "info"),
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
    match pipeline.await.context("pipeline task failed")? {
        Ok(()) => {}
        // A paced sink may hold more than the drain timeout lets through (large events at 20 a
        // second); what a paced run measures is over by then, and the rest is read again.
        Err(err)
            if options.mode == Mode::Paced
                && err.downcast_ref::<crate::consumer::Abandoned>().is_some() =>
        {
            tracing::debug!(error = %format!("{err:#}"), "paced run abandoned records at shutdown");
        }
        Err(err) => return Err(err),
    }
    Ok(measurement)
}

/// Sinks that discard records but let only `rate` of them through per second, all workers
/// together.
fn paced_sink_factory(rate: u64) -> SinkFactory {
    let pace = Arc::new(Pace {
        per_record: Duration::from_secs_f64(1.0 / rate.max(1) as f64),
        next: Mutex::new(Instant::now()),
    });
    Arc::new(
        move |_route: &RouteConfig, _index: usize, _links: &SinkLinks| {
            let sink: Box<dyn Sink> = Box::new(PacedSink { pace: pace.clone() });
            Ok(sink)
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's options for `mode` on `brokers`, the rest at their defaults.
    fn child_options(mode: Mode, brokers: &str) -> ChildOptions {
        ChildOptions {
            mode,
            brokers: brokers.into(),
            topic: "in".into(),
            group: "g".into(),
            out_topic: "out".into(),
            http_url: String::new(),
            sink_rate: 0,
            seconds: 0.0,
            commit_interval_ms: 1000,
            consumer_options: Vec::new(),
            ends: Vec::new(),
        }
    }

    #[test]
    fn ends_from_the_parent_reach_the_child_and_replace_the_watermarks() {
        #[derive(clap::Parser)]
        struct Child {
            #[command(flatten)]
            options: ChildOptions,
        }
        let sent = ChildOptions {
            ends: vec![(0, 12_500), (1, 0), (2, 7)],
            ..child_options(Mode::Null, "127.0.0.1:9")
        };
        let received = <Child as clap::Parser>::try_parse_from(sent.args())
            .expect("the child parses its arguments")
            .options;
        assert_eq!(received.ends, sent.ends);
        // Nothing listens on port 9: these come from the arguments, not from a broker.
        assert_eq!(
            ends(&received).expect("ends"),
            vec![(0, 12_500, 12_500), (1, 0, 0), (2, 7, 7)]
        );
    }

    #[test]
    fn the_benchmark_configuration_routes_every_sample_level() {
        let options = ChildOptions {
            consumer_options: vec!["fetch.max.bytes=4194304".into()],
            ..child_options(Mode::Kafka, "localhost:9092")
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
}
