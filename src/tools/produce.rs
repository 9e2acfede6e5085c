//! `logbridge produce`: a load generator for users and tests. Realistic events (levels,
//! services, error codes, keys from a configurable key space), each with a unique `id`, a
//! fraction of them malformed on request, produced at a fixed rate or as fast as possible.
//! A progress bar on a terminal, one plain summary line otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message as _};
use tracing::info;

/// What to produce (also the `produce` command's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceOptions {
    /// Bootstrap brokers.
    #[arg(long, default_value = "localhost:9092")]
    pub brokers: String,
    /// Take brokers, `[kafka.security]` and `[kafka.options]` from this logbridge
    /// configuration (to reach the cluster logbridge reads, secured or not).
    #[arg(long, conflicts_with = "brokers")]
    pub config: Option<std::path::PathBuf>,
    /// Target topic.
    #[arg(long, default_value = "logs")]
    pub topic: String,
    /// Events to produce; `None` runs until `stop` is set.
    #[arg(long, default_value = "100000", help = "Events to produce")]
    pub count: Option<u64>,
    /// Events per second; 0 means as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Create the topic with this many partitions if it does not exist.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Size of the key space (`key-0` .. `key-{keys-1}`).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Fraction of malformed records, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = ratio)]
    pub bad_ratio: f64,
    /// First event id (ids are consecutive).
    #[arg(long, default_value_t = 0)]
    pub first_id: u64,
    /// Seed for repeatable traffic; random if `None`.
    #[arg(long, help = "Seed for repeatable traffic (default: random)")]
    pub seed: Option<u64>,
    /// Write about half of the well-formed events as common loggers do (pino, zap, Elastic
    /// Common Schema, Google Cloud, OpenTelemetry, Serilog), for `input.format = "auto"`.
    #[arg(long)]
    pub loggers: bool,
    /// Pad well-formed events with a `detail` field up to this many bytes (0: no padding).
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Extra librdkafka producer property, `name=value` (repeatable; wins over `--config`).
    #[arg(long = "option", value_name = "NAME=VALUE", value_parser = name_value)]
    pub options: Vec<(String, String)>,
}

impl Default for ProduceOptions {
    fn default() -> Self {
        ProduceOptions {
            brokers: "localhost:9092".to_string(),
            topic: "logs".to_string(),
            count: Some(100_000),
            rate: 0,
            partitions: None,
            keys: 10_000,
            bad_ratio: 0.0,
            first_id: 0,
            seed: None,
            loggers: false,
            payload_bytes: 0,
            config: None,
            options: Vec::new(),
        }
    }
}

/// What was produced.
#[derive(Debug, Clone, Default)]
pub struct ProduceSummary {
    /// Records the broker acknowledged.
    pub delivered: u64,
    /// Of those, malformed on purpose.
    pub malformed: u64,
    /// Records the broker did not acknowledge.
    pub errors: u64,
    /// Payload bytes acknowledged.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per partition, the offset after the last acknowledged record: the end of the topic as
    /// the delivery reports tell it (a broker's high watermark may not: tansu's memory engine
    /// reports the last batch's base offset).
    pub ends: std::collections::BTreeMap<i32, i64>,
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "produced {} events ({} malformed) in {:.1} s: {:.0} events/s, {} bytes, {} errors",
            self.delivered,
            self.malformed,
            seconds,
            self.delivered as f64 / seconds,
            self.bytes,
            self.errors
        )
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
/// Malformed payloads, one per decoding failure a real topic sees.
const MALFORMED: &[&[u8]] = &[
    b"{\"level\":\"error\",\"message\":",
    b"not json at all",
    b"[1,2,3]",
    b"{\"message\":\"no level\"}",
    b"{\"level\":\"error\",\"message\":\"x\",\"code\":-1}",
    b"\xff\xfe\x00garbage",
    b"",
];

/// One sample event: `(key, payload, malformed)`. About `bad_ratio` of them are malformed.
pub fn sample_event(
    rng: &mut impl Rng,
    id: u64,
    keys: u64,
    bad_ratio: f64,
) -> (String, Vec<u8>, bool) {
    let key = format!("key-{}", rng.random_range(0..keys.max(1)));
    if bad_ratio > 0.0 && rng.random_bool(bad_ratio.clamp(0.0, 1.0)) {
        let bad = MALFORMED[rng.random_range(0..MALFORMED.len())];
        return (key, bad.to_vec(), true);
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
            "id": id, "level": level, "code": code, "message": message,
            "service": service, "ts": "2026-11-27T10:00:00Z",
        })
    } else {
        serde_json::json!({
            "id": id, "level": level, "message": message, "service": service,
            "ts": "2026-11-27T10:00:00Z",
        })
    };
    (key, event.to_string().into_bytes(), false)
}

/// A well-formed sample event as one of the common loggers would write it: the same id, level,
/// message and service, in that logger's fields (see `input.format = "auto"`).
pub fn as_logger_writes(rng: &mut impl Rng, payload: &[u8]) -> Vec<u8> {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return payload.to_vec();
    };
    let (id, message, service) = (&event["id"], &event["message"], &event["service"]);
    let level = crate::event::Level::new(event["level"].as_str().unwrap_or("info"));
    let level = level.as_str();
    let rank = ["trace", "debug", "info", "warning", "error", "fatal"]
        .iter()
        .position(|known| *known == level)
        .unwrap_or(2) as u64;
    let shaped = match rng.random_range(0..6) {
        // pino: numeric levels 10..60, `msg`, epoch milliseconds.
        0 => serde_json::json!({
            "level": 10 * (rank + 1), "time": 1_796_000_000_000u64, "pid": 4242,
            "hostname": "web-1", "id": id, "msg": message, "service": service,
        }),
        // zap: `warn`, numeric `ts`, `caller`.
        1 => serde_json::json!({
            "level": if level == "warning" { "warn" } else { level }, "ts": 1_796_000_000.5,
            "caller": "server/main.go:42", "msg": message, "id": id, "service": service,
        }),
        // Elastic Common Schema, flat keys.
        2 => serde_json::json!({
            "@timestamp": "2026-11-27T10:00:00.000Z", "log.level": level, "message": message,
            "service.name": service, "ecs.version": "1.6.0", "id": id,
        }),
        // Google Cloud structured logging.
        3 => serde_json::json!({
            "severity": level.to_uppercase(), "message": message, "id": id,
            "serviceContext": {"service": service},
        }),
        // OpenTelemetry log record.
        4 => serde_json::json!({
            "timeUnixNano": "1796000000000000000", "severityNumber": 4 * rank + 1,
            "body": message, "id": id, "service": {"name": service},
        }),
        // Serilog compact JSON (no `@l` means information).
        _ => {
            let serilog = [
                "Verbose",
                "Debug",
                "Information",
                "Warning",
                "Error",
                "Fatal",
            ];
            let mut line = serde_json::json!({
                "@t": "2026-11-27T10:00:00.0000000Z", "@mt": "{Message}", "Message": message,
                "id": id, "service": service,
            });
            if rank != 2 {
                line["@l"] = serilog[rank as usize].into();
            }
            line
        }
    };
    shaped.to_string().into_bytes()
}

/// Pads a JSON object payload with a `detail` string field so that it is `target` bytes long
/// (payloads already that long, and anything not ending in `}`, are left alone).
pub fn pad_event(payload: &mut Vec<u8>, target: usize) {
    const FIELD: &[u8] = b",\"detail\":\"\"";
    if payload.last() != Some(&b'}') || payload.len() + FIELD.len() > target {
        return;
    }
    let fill = target - payload.len() - FIELD.len();
    payload.pop();
    payload.extend_from_slice(&FIELD[..FIELD.len() - 1]);
    payload.extend(std::iter::repeat_n(b'x', fill));
    payload.extend_from_slice(b"\"}");
}

/// Counts delivery reports (librdkafka calls it from `poll`).
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    ends: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        match result {
            Ok(message) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                let size = message.payload_len() as u64;
                self.bytes.fetch_add(size, Ordering::Relaxed);
                // Delivery reports come from one librdkafka thread: the lock is uncontended.
                let mut ends = self
                    .ends
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let end = ends.entry(message.partition()).or_insert(0);
                *end = (*end).max(message.offset() + 1);
            }
            Err((err, _)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "record not delivered");
            }
        }
    }
}

/// Creates `topic` with `partitions` unless it exists.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    ensure_topic_with(brokers, &[], topic, partitions).await
}

/// [`ensure_topic`] with extra client properties (security, say).
pub async fn ensure_topic_with(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .context("failed to create the admin client")?;
    // -1: the broker's `default.replication.factor` (Kafka 2.4+, KIP-464), so a topic made on a
    // cluster of three has the cluster's replication rather than a single copy.
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .context("failed to create the topic")?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, partitions, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                info!(topic = %name, "topic exists")
            }
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Produces as `options` say until the count is reached or `stop` is set. Blocking: run it on
/// its own thread. `progress` is called about ten times a second with (acknowledged, target).
pub fn produce_blocking(
    options: &ProduceOptions,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64, Option<u64>),
) -> anyhow::Result<ProduceSummary> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("linger.ms", "10")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "200000");
    for (key, value) in &options.options {
        config.set(key, value);
    }
    let producer: BaseProducer<Deliveries> = config
        .create_with_context(Deliveries::default())
        .context("failed to create the producer")?;
    let mut rng = match options.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut malformed = 0u64;
    let mut sent = 0u64;
    let target = options.count;
    while target.is_none_or(|count| sent < count) && !stop.load(Ordering::Relaxed) {
        if options.rate > 0 {
            // Stay on schedule: event n is due at n / rate seconds.
            let due = Duration::from_secs_f64(sent as f64 / options.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                producer.poll(wait.min(Duration::from_millis(50)));
                continue;
            }
        }
        let (key, mut payload, bad) = sample_event(
            &mut rng,
            options.first_id + sent,
            options.keys,
            options.bad_ratio,
        );
        if !bad {
            if options.loggers && rng.random_bool(0.5) {
                payload = as_logger_writes(&mut rng, &payload);
            }
            pad_event(&mut payload, options.payload_bytes);
        }
        let record = BaseRecord::to(&options.topic).key(&key).payload(&payload);
        match producer.send(record) {
            Ok(()) => {
                sent += 1;
                malformed += u64::from(bad);
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // librdkafka's queue is full: serve delivery reports, then retry this event.
                producer.poll(Duration::from_millis(10));
            }
            Err((err, _)) => return Err(anyhow::Error::new(err).context("produce failed")),
        }
        producer.poll(Duration::ZERO);
        if last_progress.elapsed() >= Duration::from_millis(100) {
            progress(producer.context().delivered.load(Ordering::Relaxed), target);
            last_progress = Instant::now();
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("not every record was acknowledged within 60 s")?;
    let context = producer.context();
    let summary = ProduceSummary {
        delivered: context.delivered.load(Ordering::Relaxed),
        malformed,
        errors: context.errors.load(Ordering::Relaxed),
        bytes: context.bytes.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        ends: context
            .ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    };
    progress(summary.delivered, target);
    Ok(summary)
}

/// A fraction between 0.0 and 1.0 (`--bad-ratio`).
fn name_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("`{text}` is not name=value")),
    }
}

/// With `--config`: the configuration's brokers, and its security and options ahead of the
/// `--option` pairs (so those win).
fn with_config(mut options: ProduceOptions) -> anyhow::Result<ProduceOptions> {
    let Some(path) = options.config.take() else {
        return Ok(options);
    };
    let config = crate::config::Config::load(&path)?;
    // (ClientConfig::config_map would hide the secrets from its copy.)
    let mut properties: Vec<(String, String)> = config
        .source()
        .properties()
        .into_iter()
        .filter(|(name, _)| name != "bootstrap.servers")
        .collect();
    properties.append(&mut options.options);
    options.options = properties;
    options.brokers = config.kafka.brokers;
    Ok(options)
}

fn ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("`{text}` is not a fraction between 0.0 and 1.0")),
    }
}

/// The `produce` command: optional topic creation, then production with a progress bar on a
/// terminal (stderr) or a plain summary line (stdout), until the count is reached or `shutdown`
/// is cancelled. Fails if any record was not delivered.
pub async fn run(
    options: ProduceOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<ProduceSummary> {
    // The producer runs on a blocking thread, which looks at a flag between records.
    let stop = Arc::new(AtomicBool::new(false));
    let on_shutdown = stop.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        on_shutdown.store(true, Ordering::Relaxed);
    });
    let options = with_config(options)?;
    if let Some(partitions) = options.partitions {
        ensure_topic_with(
            &options.brokers,
            &options.options,
            &options.topic,
            partitions,
        )
        .await?;
    }
    let interactive = std::io::stderr().is_terminal();
    let summary = tokio::task::spawn_blocking(move || {
        let bar = interactive.then(|| {
            let bar = match options.count {
                Some(count) => indicatif::ProgressBar::new(count),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let result = produce_blocking(&options, &stop, |done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done);
            }
        });
        if let Some(bar) = bar {
            bar.finish();
        }
        result
    })
    .await
    .context("producer thread failed")??;
    println!("{summary}");
    if summary.errors > 0 {
        anyhow::bail!("{} records were not delivered", summary.errors);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    #[test]
    fn sample_events_decode_unless_malformed_and_ids_are_unique() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut bad = 0;
        for id in 0..5_000 {
            let (key, payload, malformed) = sample_event(&mut rng, id, 100, 0.1);
            assert!(key.starts_with("key-"));
            let decoded = decode(Some(&payload), 1 << 20);
            assert_eq!(
                decoded.is_err(),
                malformed,
                "{}",
                String::from_utf8_lossy(&payload)
            );
            if malformed {
                bad += 1;
            } else {
                let value: serde_json::Value = serde_json::from_slice(&payload).expect("json");
                assert_eq!(value["id"], id);
            }
        }
        assert!((300..700).contains(&bad), "about 10% malformed, got {bad}");
    }

    #[test]
    fn events_as_loggers_write_them_keep_their_id_level_and_service_under_auto() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut refused_by_strict = 0;
        for id in 0..600 {
            let (_, payload, _) = sample_event(&mut rng, id, 100, 0.0);
            let shaped = as_logger_writes(&mut rng, &payload);
            let original = crate::event::InputFormat::Auto
                .decode_routing(Some(&payload), 1 << 20)
                .expect("a sample event");
            let routed = crate::event::InputFormat::Auto
                .decode_routing(Some(&shaped), 1 << 20)
                .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&shaped)));
            assert_eq!(routed, original, "{}", String::from_utf8_lossy(&shaped));
            let value: serde_json::Value = serde_json::from_slice(&shaped).expect("json");
            assert_eq!(value["id"], id);
            refused_by_strict += usize::from(decode(Some(&shaped), 1 << 20).is_err());
        }
        assert!(
            refused_by_strict > 500,
            "the strict format refuses {refused_by_strict} of 600"
        );
    }

    #[test]
    fn padded_events_have_the_asked_size_and_still_decode() {
        let mut rng = StdRng::seed_from_u64(3);
        for id in 0..200 {
            let (_, mut payload, _) = sample_event(&mut rng, id, 100, 0.0);
            pad_event(&mut payload, 200);
            assert_eq!(payload.len(), 200, "{}", String::from_utf8_lossy(&payload));
            decode(Some(&payload), 1 << 20).expect("padded event decodes");
            let value: serde_json::Value = serde_json::from_slice(&payload).expect("json");
            assert_eq!(value["id"], id);
        }
        let mut short = b"not json".to_vec();
        pad_event(&mut short, 200);
        assert_eq!(short, b"not json");
        let mut long = br#"{"level":"info","message":"long enough"}"#.to_vec();
        pad_event(&mut long, 10);
        assert_eq!(long, br#"{"level":"info","message":"long enough"}"#);
    }
}
