//! The benchmark's command lines: `logbridge bench` ([`BenchOptions`]) and the hidden
//! `bench-child` that runs one measurement ([`ChildOptions`]).

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
    /// Event sizes of the large-event runs, in bytes, comma separated (`none`: skip them).
    #[arg(long, default_value = "409600,1048576")]
    pub large_events: Counts,
    /// Events preloaded for each large-event run.
    #[arg(long, default_value_t = 1_000)]
    pub large_count: u64,
    /// Events per second the sink of the large-event runs lets through (a slow sink).
    #[arg(long, default_value_t = 20)]
    pub large_rate: u64,
    /// Events per second the sink of the memory ceiling runs lets through (0: a share of the
    /// pipeline's measured rate to null sinks).
    #[arg(long, default_value_t = 0)]
    pub memory_sink_rate: u64,
    /// Longest window of a memory ceiling run, in seconds.
    #[arg(long, default_value_t = 20)]
    pub memory_seconds: u64,
    /// `pipeline.commit_interval_ms` of the measured pipeline.
    #[arg(long, default_value_t = 1_000)]
    pub commit_interval_ms: u64,
    /// Pipeline modes to measure besides raw librdkafka (the reference): null, kafka,
    /// kafka-eos (exactly-once: transactions), http, otlp (OTLP/HTTP protobuf), loki (Loki's
    /// push API, labels level and service), fan-out (every event to three null routes), transforms (a field condition and
    /// a typical transform chain).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "null,kafka,kafka-eos,http,otlp,loki,object-store,fan-out,transforms"
    )]
    pub modes: Vec<Mode>,
    /// librdkafka consumer property for every mode, `key=value` (repeatable).
    #[arg(long = "consumer-option")]
    pub consumer_options: Vec<String>,
    /// Instead of the benchmark, a soak of this long (`90s`, `30m`, `2h`): a mixed stream through
    /// a `logbridge run` process, printing memory, descriptors, tasks and channel depths over
    /// time and their growth per hour.
    #[arg(long, value_parser = duration)]
    pub soak: Option<std::time::Duration>,
    /// Events per second of the soak's stream.
    #[arg(long, default_value_t = 2_000)]
    pub soak_rate: u64,
    /// Share of malformed records in the soak's stream (dead-lettered), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.02)]
    pub soak_bad_ratio: f64,
    /// The soak's second instance joins every this many seconds and stays half of it (0: never,
    /// one instance throughout).
    #[arg(long, default_value_t = 120)]
    pub soak_rebalance_secs: u64,
}

/// A duration as `90s`, `30m` or `2h` (a bare number is seconds).
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        _ => return Err(format!("`{text}` is not a duration like 90s, 30m or 2h")),
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|count| *count > 0)
        .map(|count| std::time::Duration::from_secs(count * seconds))
        .ok_or_else(|| format!("`{text}` is not a duration like 90s, 30m or 2h"))
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
    /// The pipeline to Kafka sinks with `delivery = "exactly-once"` (transactions).
    KafkaEos,
    /// The pipeline to HTTP sinks posting to a local endpoint that answers at once.
    Http,
    /// The pipeline to OTLP sinks (protobuf, gzip) posting to the same endpoint.
    Otlp,
    /// The pipeline to Loki sinks pushing JSON streams to the same endpoint.
    Loki,
    /// The pipeline to object-store sinks (gzip NDJSON objects) in a local directory.
    ObjectStore,
    /// The pipeline to null sinks paced to a fixed rate (memory ceiling).
    Paced,
    /// Every event to three routes (`continue = true`), all to null sinks.
    FanOut,
    /// The three routes of `null` with a field condition and a typical transform chain
    /// (set, rename, remove, redact, add_metadata) before their null sinks.
    Transforms,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 11] = [
        Mode::Raw,
        Mode::Null,
        Mode::Kafka,
        Mode::KafkaEos,
        Mode::Paced,
        Mode::Http,
        Mode::Otlp,
        Mode::Loki,
        Mode::ObjectStore,
        Mode::FanOut,
        Mode::Transforms,
    ];

    /// Name on the command line and in the output.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Null => "null",
            Mode::Kafka => "kafka",
            Mode::KafkaEos => "kafka-eos",
            Mode::Paced => "paced",
            Mode::Http => "http",
            Mode::Otlp => "otlp",
            Mode::Loki => "loki",
            Mode::ObjectStore => "object-store",
            Mode::FanOut => "fan-out",
            Mode::Transforms => "transforms",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown mode `{text}`: raw, null, kafka, kafka-eos, http, otlp, loki, \
                     object-store, fan-out, transforms or paced"
                )
            })
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
    /// Endpoint of the `http` mode.
    #[arg(long, default_value = "")]
    pub http_url: String,
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
    /// The topic's end per partition, `partition=offset,...`, from the preload's delivery
    /// reports; without it the child reads the high watermarks.
    #[arg(long, value_delimiter = ',', value_parser = partition_end)]
    pub ends: Vec<(i32, i64)>,
}

fn partition_end(text: &str) -> Result<(i32, i64), String> {
    let parsed = text
        .split_once('=')
        .and_then(|(partition, end)| Some((partition.parse().ok()?, end.parse().ok()?)));
    parsed.ok_or_else(|| format!("`{text}` is not partition=offset"))
}

impl ChildOptions {
    pub(super) fn args(&self) -> Vec<String> {
        vec![
            "bench-child".into(),
            format!("--mode={}", self.mode.as_str()),
            format!("--brokers={}", self.brokers),
            format!("--topic={}", self.topic),
            format!("--group={}", self.group),
            format!("--out-topic={}", self.out_topic),
            format!("--http-url={}", self.http_url),
            format!("--sink-rate={}", self.sink_rate),
            format!("--seconds={}", self.seconds),
            format!("--commit-interval-ms={}", self.commit_interval_ms),
        ]
        .into_iter()
        .chain((!self.ends.is_empty()).then(|| {
            let ends: Vec<String> = self
                .ends
                .iter()
                .map(|(partition, end)| format!("{partition}={end}"))
                .collect();
            format!("--ends={}", ends.join(","))
        }))
        .chain(
            self.consumer_options
                .iter()
                .map(|option| format!("--consumer-option={option}")),
        )
        .collect()
    }
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
    fn soak_durations_take_seconds_minutes_and_hours() {
        use std::time::Duration;
        assert_eq!(duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0m", "3d", "m", "1.5h"] {
            assert!(duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn modes_round_trip_through_their_names() {
        for mode in Mode::ALL {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        assert!("fast".parse::<Mode>().is_err());
    }
}
