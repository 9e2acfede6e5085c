//! `logbridge demo`: the whole pipeline against an in-process Kafka (librdkafka's mock cluster),
//! fed a steady mix of sample events, some of them malformed, with metrics served and a one-line
//! summary every few seconds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{self, RunOptions};

/// The demo's configuration, shipped as `config/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// How the demo runs.
pub struct DemoOptions {
    /// Stop after this long (otherwise on Ctrl-C or SIGTERM).
    pub duration: Option<Duration>,
    /// Override of `http.listen`.
    pub listen: Option<String>,
    /// Sample events produced per second.
    pub rate: u32,
    /// Partitions of the demo topic.
    pub partitions: i32,
    /// Seconds between summary lines.
    pub summary_every: Duration,
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

const LEVELS: &[(&str, u32)] = &[
    ("error", 15),
    ("fatal", 1),
    ("warning", 20),
    ("warn", 5),
    ("info", 45),
    ("debug", 14),
];
const SERVICES: &[&str] = &["checkout", "payments", "search", "db", "auth", "frontend"];
const MESSAGES: &[&str] = &[
    "upstream timeout",
    "disk 91% full",
    "connection reset by peer",
    "request served",
    "cache miss",
    "retrying after backoff",
];
const MALFORMED: &[&[u8]] = &[
    b"{\"level\":\"error\",\"message\":",
    b"not json at all",
    b"[1,2,3]",
    b"{\"message\":\"no level\"}",
    b"{\"level\":\"error\",\"message\":\"x\",\"code\":-1}",
    b"\xff\xfe\x00garbage",
    b"",
];

/// One sample event: `(key, payload)`. `bad_ratio` of them are malformed.
pub fn sample_event(rng: &mut impl Rng, id: u64, keys: u64, bad_ratio: f64) -> (String, Vec<u8>) {
    let key = format!("key-{}", rng.random_range(0..keys.max(1)));
    if rng.random_bool(bad_ratio.clamp(0.0, 1.0)) {
        let bad = MALFORMED[rng.random_range(0..MALFORMED.len())];
        return (key, bad.to_vec());
    }
    let total: u32 = LEVELS.iter().map(|(_, weight)| weight).sum();
    let mut pick = rng.random_range(0..total);
    let mut level = LEVELS[0].0;
    for (name, weight) in LEVELS {
        if pick < *weight {
            level = name;
            break;
        }
        pick -= weight;
    }
    let service = SERVICES[rng.random_range(0..SERVICES.len())];
    let message = MESSAGES[rng.random_range(0..MESSAGES.len())];
    let event = if level == "error" || level == "fatal" {
        let code = [500, 502, 503, 504][rng.random_range(0..4)];
        serde_json::json!({
            "id": id, "level": level, "code": code,
            "message": message, "service": service, "ts": "2026-11-27T10:00:00Z",
        })
    } else {
        serde_json::json!({
            "id": id, "level": level, "message": message, "service": service,
            "ts": "2026-11-27T10:00:00Z",
        })
    };
    (key, event.to_string().into_bytes())
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
        let rate = options.rate;
        std::thread::Builder::new()
            .name("demo-producer".into())
            .spawn(move || produce_steadily(&brokers, rate, &produced, &stop))
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
        Ok(Ok(())) => {}
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

fn produce_steadily(
    brokers: &str,
    rate: u32,
    produced: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .context("failed to create the demo producer")?;
    let mut rng = StdRng::from_os_rng();
    let tick = Duration::from_millis(50);
    let per_tick = (u64::from(rate) * tick.as_millis() as u64 / 1000).max(1);
    let mut id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let tick_started = Instant::now();
        for _ in 0..per_tick {
            let (key, payload) = sample_event(&mut rng, id, 1000, 0.03);
            let record = BaseRecord::to("logs").key(&key).payload(&payload);
            match producer.send(record) {
                Ok(()) => {
                    id += 1;
                    produced.fetch_add(1, Ordering::Relaxed);
                }
                // Queue full: let delivery reports drain and try in the next tick.
                Err((err, _)) => {
                    warn!(error = %err, "demo produce failed");
                    break;
                }
            }
        }
        producer.poll(Duration::ZERO);
        if let Some(rest) = tick.checked_sub(tick_started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    Ok(())
}

fn summary_line(elapsed: Duration, produced: u64, metrics: &Metrics) -> String {
    let finished = |status: &str| -> u64 {
        ["errors", "warnings", "info", crate::metrics::NO_ROUTE]
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
        metrics.paused_partitions.get(),
    )
}
