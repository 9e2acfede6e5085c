//! `logbridge demo`: the whole pipeline against an in-process Kafka (librdkafka's mock cluster),
//! fed a steady mix of sample events, some of them malformed, with metrics served and a one-line
//! summary every few seconds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::produce::{produce_blocking, ProduceOptions};
use crate::config::Config;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::pipeline::{self, RunOptions};

/// The demo's configuration, shipped as `config/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// How the demo runs (also the `demo` command's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Stop after this long, e.g. `30s`, `5m` (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Address for /metrics and /healthz (default: from config/demo.toml).
    #[arg(long)]
    pub listen: Option<String>,
    /// Sample events per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Partitions of the demo topic.
    #[arg(skip = 4)]
    pub partitions: i32,
    /// Time between summary lines.
    #[arg(skip = Duration::from_secs(5))]
    pub summary_every: Duration,
}

/// A duration like `30s`, `500ms`, `5m`, `1h 30m` (humantime's syntax); a bare number is
/// seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|err| format!("`{text}` is not a duration like 30s, 500ms or 5m: {err}"))
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: None,
            listen: None,
            rate: 500,
            partitions: 4,
            summary_every: Duration::from_secs(5),
        }
    }
}

/// Runs the demo until `shutdown` is cancelled or the duration passes.
pub async fn run(options: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("failed to start the in-process Kafka")?;
    cluster
        .create_topic("logs", options.partitions, 1)
        .context("failed to create the demo topic")?;
    let brokers = cluster.bootstrap_servers();
    let mut config = Config::from_toml_str(DEMO_CONFIG).context("demo configuration is invalid")?;
    config.kafka.brokers = brokers.clone();
    if let Some(listen) = &options.listen {
        config.http.listen = listen.clone();
    }
    config.validate().context("demo configuration is invalid")?;
    info!(%brokers, listen = %config.http.listen, "in-process Kafka started; metrics at http://{}/metrics", config.http.listen);

    let produced = Arc::new(AtomicU64::new(0));
    let stop_producer = Arc::new(AtomicBool::new(false));
    let producer = {
        let produced = produced.clone();
        let stop = stop_producer.clone();
        let traffic = ProduceOptions {
            brokers: brokers.clone(),
            topic: "logs".to_string(),
            count: None,
            rate: u64::from(options.rate),
            keys: 1_000,
            bad_ratio: 0.03,
            loggers: true,
            ..ProduceOptions::default()
        };
        std::thread::Builder::new()
            .name("demo-producer".into())
            .spawn(move || {
                produce_blocking(&traffic, &stop, |done, _| {
                    produced.store(done, Ordering::Relaxed)
                })
            })
            .context("failed to start the demo producer")?
    };

    if let Some(duration) = options.duration {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            shutdown.cancel();
        });
    }
    let metrics = Arc::new(Metrics::new());
    let summary = {
        let metrics = metrics.clone();
        let produced = produced.clone();
        let shutdown = shutdown.clone();
        let every = options.summary_every;
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {
                        println!("{}", summary_line(started.elapsed(), produced.load(Ordering::Relaxed), &metrics));
                    }
                }
            }
        })
    };

    let options = RunOptions {
        metrics: metrics.clone(),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let result = pipeline::run(config, options, shutdown).await;
    stop_producer.store(true, Ordering::Relaxed);
    summary.abort();
    match producer.join() {
        Ok(Ok(summary)) => produced.store(summary.delivered, Ordering::Relaxed),
        Ok(Err(err)) => warn!(error = %err, "demo producer failed"),
        Err(_) => warn!("demo producer panicked"),
    }
    println!(
        "{} (final)",
        summary_line(
            started.elapsed(),
            produced.load(Ordering::Relaxed),
            &metrics
        )
    );
    drop(cluster);
    result
}

fn summary_line(elapsed: Duration, produced: u64, metrics: &Metrics) -> String {
    let finished = |status: &str| -> u64 {
        ["errors", "warnings", "info", NO_ROUTE]
            .iter()
            .map(|route| metrics.finished.with_label_values(&[route, status]).get())
            .sum()
    };
    let committed: i64 = metrics
        .commits
        .with_label_values(&["ok"])
        .get()
        .try_into()
        .unwrap_or(i64::MAX);
    format!(
        "demo {:>5.0}s: produced {produced}, consumed {}, processed {}, ignored {}, failed {}, in flight {}, paused partitions {}, commits {committed}",
        elapsed.as_secs_f64(),
        metrics.consumed.with_label_values(&["logs"]).get(),
        finished("processed"),
        finished("ignored"),
        finished("failed"),
        metrics.in_flight.get(),
        metrics.paused_total(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5 fortnights").is_err_and(|err| err.contains("not a duration")));
        assert!(parse_duration("soon").is_err_and(|err| err.contains("not a duration")));
    }
}
