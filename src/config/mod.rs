//! Configuration: a TOML file layered with `LOGBRIDGE_` environment overrides, validated once at
//! start-up so that every later stage can trust it.
//!
//! Env overrides use `__` between levels: `LOGBRIDGE_KAFKA__BROKERS=host:9092`,
//! `LOGBRIDGE_PIPELINE__ROUTER_CAPACITY=4096`; below `options`, `_` stands for the dots of
//! librdkafka's names (`LOGBRIDGE_KAFKA__OPTIONS__SASL_PASSWORD`). String values may hold
//! `${env:NAME}` and `${file:/path}` references (see [`references`]). Every error names the key
//! it is about, and secrets are redacted wherever the configuration is shown.

mod http;
mod load_error;
mod object_store;
mod overrides;
mod references;
mod schema_registry;
mod security;
pub mod shape;

pub use http::{
    redact_url, redact_url_in, Compression, HttpAuth, HttpDestination, HttpFormat, HttpMethod,
    HttpSinkConfig, LokiLabel,
};
pub use object_store::{ObjectCompression, ObjectStoreSinkConfig, StoreKind};
pub use references::Reloading;
pub use schema_registry::SchemaRegistryConfig;
pub use security::{SaslMechanism, SecurityConfig, SecurityProtocol};
pub use shape::{ConditionConfig, TransformConfig};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use rdkafka::config::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::event::{Level, DEFAULT_MAX_PAYLOAD_BYTES};

/// Default of `pipeline.max_in_flight_bytes`: 64 MiB. With the default capacities a pipeline
/// of five workers holds 8 000 to 12 000 records, so events under about 5 KiB never reach it
/// (the record bound
/// applies first, and throughput is unchanged); for large events it is what bounds memory: 64
/// records of 1 MiB, 160 of 400 KiB. The Kafka sink's producer copies what it sends, and
/// librdkafka prefetches on top (`queued.max.messages.kbytes`, `fetch.max.bytes`), so the
/// process needs about twice this plus the prefetch.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Where the shipped configuration lives, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/logbridge.toml";

/// What a secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// librdkafka properties that logbridge owns: setting them in `[kafka.options]` would break the
/// commit rule or duplicate a first-class key.
const OWNED_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `kafka.brokers` instead"),
    ("group.id", "set `kafka.group_id` instead"),
    (
        "enable.auto.commit",
        "logbridge commits only finished records; remove it",
    ),
    (
        "enable.auto.offset.store",
        "logbridge commits only finished records; remove it",
    ),
];

/// Options of the classic group protocol that librdkafka refuses under KIP-848's `consumer`
/// protocol (`group.protocol = "consumer"`): the client would not even start. The broker owns
/// the session, the heartbeat and the assignment there.
const CLASSIC_ONLY_OPTIONS: &[(&str, &str)] = &[
    (
        "session.timeout.ms",
        "the broker's group.consumer.session.timeout.ms sets the session under the consumer protocol",
    ),
    (
        "heartbeat.interval.ms",
        "the broker's group.consumer.heartbeat.interval.ms sets it under the consumer protocol",
    ),
    (
        "partition.assignment.strategy",
        "the broker assigns under the consumer protocol: choose its assignor with \
         \"group.remote.assignor\" (uniform or range)",
    ),
    (
        "group.protocol.type",
        "a classic protocol option; the consumer protocol has none",
    ),
];

/// A configuration that could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not TOML, or a key is unknown, missing or of the wrong type: the message
    /// names the key as written, its line or environment variable, and a likely spelling.
    #[error("cannot load configuration: {0}")]
    Load(String),
    /// The values parsed but do not make sense together.
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// This host's name (`localhost` if it has none that can be read).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The whole configuration of one logbridge process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The source cluster, group and topics.
    pub kafka: KafkaConfig,
    /// Channel capacities, commit cadence and shutdown budget.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The HTTP endpoint for metrics and health.
    #[serde(default)]
    pub http: HttpConfig,
    /// Where events go, matched by level in the order given. Events no route matches are
    /// acked `ignored` and counted.
    pub routes: Vec<RouteConfig>,
    /// Where undecodable and undeliverable records are parked. Without it they are logged,
    /// counted and skipped.
    #[serde(default)]
    pub dead_letter: Option<DeadLetterConfig>,
    /// Stops taking records when too many fail (a bad deployment upstream).
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// How input records that are not log events are treated.
    #[serde(default)]
    pub input: InputConfig,
}

/// How input records that are not log events are treated.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Records with a null value (Kafka tombstones, which compacted topics use to delete a
    /// key): `skip` (finished as ignored and counted in `logbridge_tombstones_total`) or
    /// `dead-letter` (parked with reason `tombstone`). Neither counts against the breaker.
    pub tombstones: TombstonePolicy,
    /// How payloads are read: `logbridge` (the strict event format, the default), `auto` (the
    /// level wherever common loggers put it) or `text` (each record one line of plain text;
    /// see the README's event format section).
    pub format: crate::event::InputFormat,
    /// Events no route takes: `ignore` (finished as ignored and counted, the default) or
    /// `dead-letter` (parked with reason `unrouted`). Neither counts against the breaker.
    pub unrouted: UnroutedPolicy,
    /// `auto`: read the level from this field alone, a dotted path (`"attributes.severity"`)
    /// or a list of keys (`["log.level"]`, for a key with a dot). `text` with `logfmt`: the
    /// logfmt key that holds the level (one key: `"level"`, or `["log.level"]`).
    pub level_field: Option<FieldPath>,
    /// `auto` and `text`: what your loggers call their levels, names or numbers, and the level
    /// each means (`{ "W" = "warning", "5" = "error" }`), before the built-in names.
    pub level_map: std::collections::BTreeMap<String, String>,
    /// `text` only: a regular expression with a group named `level` that finds each line's
    /// level (`'^\S+ (?P<level>[A-Z]+) '`); a group `service` gives the service, other named
    /// groups become fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level_pattern: Option<String>,
    /// `text` only: the level of every line (`"info"`), instead of a pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// `text` only: read the line's `key=value` pairs (logfmt) as fields; a `service` key gives
    /// the service.
    pub logfmt: bool,
    /// `auto` and `logbridge`: payloads in Confluent's wire format (Avro, Protobuf or JSON
    /// behind a zero byte and a schema id) are decoded with their schemas from this registry,
    /// and read as the JSON they stand for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<SchemaRegistryConfig>,
}

/// A field of a JSON object, possibly nested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldPath {
    /// Keys separated by dots.
    Dotted(String),
    /// Keys, outermost first (for keys that contain a dot).
    Keys(Vec<String>),
}

impl FieldPath {
    /// The keys, outermost first.
    pub fn keys(&self) -> Vec<String> {
        match self {
            FieldPath::Dotted(path) => path.split('.').map(str::to_string).collect(),
            FieldPath::Keys(keys) => keys.clone(),
        }
    }
}

impl InputConfig {
    /// Each key is read by the formats it is for, and must name something; the text format's
    /// settings must say how to find the level ([`crate::event::TextFormat::new`]).
    fn validate(&self) -> Result<(), ConfigError> {
        use crate::event::InputFormat;
        let auto = self.format == InputFormat::Auto;
        let text = self.format == InputFormat::Text;
        let text_only = [
            ("input.level_pattern", self.level_pattern.is_some()),
            ("input.level", self.level.is_some()),
            ("input.logfmt", self.logfmt),
        ];
        for (key, given) in text_only {
            if given && !text {
                return Err(invalid(key, "is read with input.format = \"text\" only"));
            }
        }
        if let Some(field) = &self.level_field {
            if !auto && !text {
                return Err(invalid(
                    "input.level_field",
                    "is read with input.format = \"auto\" or \"text\" only",
                ));
            }
            let keys = field.keys();
            if keys.is_empty() || keys.iter().any(String::is_empty) {
                return Err(invalid(
                    "input.level_field",
                    "an empty key: write keys separated by single dots, or a list of keys",
                ));
            }
        }
        if let Some(registry) = &self.schema_registry {
            if !matches!(self.format, InputFormat::Auto | InputFormat::Logbridge) {
                return Err(invalid(
                    "input.schema_registry",
                    "is read with input.format = \"auto\" or \"logbridge\" only (the \
                     decoded record is read as JSON)",
                ));
            }
            registry.validate()?;
        }
        if !self.level_map.is_empty() && !auto && !text {
            return Err(invalid(
                "input.level_map",
                "is read with input.format = \"auto\" or \"text\" only",
            ));
        }
        for (name, level) in &self.level_map {
            if name.is_empty() || level.trim().is_empty() {
                return Err(invalid(
                    format!("input.level_map.{name}"),
                    "names and levels must not be empty",
                ));
            }
        }
        self.decoder().map(|_| ())
    }

    /// How the pipeline reads payloads; for `text`, whether the settings say how (the error
    /// names the key).
    pub fn decoder(&self) -> Result<crate::event::Decoder, ConfigError> {
        let names = || {
            self.level_map
                .iter()
                .map(|(name, level)| (name.as_str(), level.as_str()))
        };
        if self.format == crate::event::InputFormat::Text {
            let settings = crate::event::TextSettings {
                level_pattern: self.level_pattern.as_deref(),
                level: self.level.as_deref(),
                level_field: self.level_field.as_ref().map(|field| match field {
                    // A logfmt key is flat: `log.level` is one key, however it is written.
                    FieldPath::Dotted(key) => vec![key.clone()],
                    FieldPath::Keys(keys) => keys.clone(),
                }),
                logfmt: self.logfmt,
                level_map: names().collect(),
            };
            return crate::event::TextFormat::new(&settings)
                .map(crate::event::Decoder::text)
                .map_err(|err| invalid(format!("input.{}", err.key), err.message));
        }
        let mapping = (self.level_field.is_some() || !self.level_map.is_empty()).then(|| {
            crate::event::Mapping::new(self.level_field.as_ref().map(FieldPath::keys), names())
        });
        Ok(crate::event::Decoder::new(self.format, mapping))
    }
}

/// What becomes of an event no route takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnroutedPolicy {
    /// Finished as ignored and counted.
    #[default]
    Ignore,
    /// Parked in the dead-letter topic (or, without one, logged and counted as failed).
    DeadLetter,
}

/// What becomes of a tombstone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TombstonePolicy {
    /// Finished as ignored and counted.
    #[default]
    Skip,
    /// Parked in the dead-letter topic (or, without one, logged and counted as failed).
    DeadLetter,
}

/// The dead-letter topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Topic for dead letters.
    pub topic: String,
    /// Brokers of the dead-letter topic; the source cluster if absent.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Security of the dead-letter cluster; the source cluster's when on its brokers.
    #[serde(default)]
    pub security: Option<SecurityConfig>,
    /// librdkafka producer properties for the dead-letter producer.
    #[serde(default, deserialize_with = "references::flat_options")]
    pub options: BTreeMap<String, OptionValue>,
}

impl DeadLetterConfig {
    /// The dead-letter topic's cluster; `source` is the source's brokers.
    pub fn cluster<'a>(&'a self, source: &'a str) -> Cluster<'a> {
        Cluster::output(source, &self.brokers, &self.security, &self.options)
    }
}

/// The dead-letter breaker: trips when more than `max_invalid_ratio` of the last `window`
/// finished records, or more than `max_consecutive` in a row, failed (dead-lettered, or skipped
/// without a dead-letter topic). Tripped, logbridge pauses every partition until restarted or
/// `POST /resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether the breaker is armed.
    pub enabled: bool,
    /// Largest tolerated fraction of failed records in the window (0 < ratio <= 1).
    pub max_invalid_ratio: f64,
    /// Records the ratio is measured over.
    pub window: usize,
    /// Longest tolerated run of failed records.
    pub max_consecutive: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            max_invalid_ratio: 0.5,
            window: 1000,
            max_consecutive: 200,
        }
    }
}

/// The source cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of bootstrap brokers.
    pub brokers: String,
    /// Consumer group; instances with the same group share the partitions.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// TLS and SASL of the source cluster (plaintext if absent).
    #[serde(default)]
    pub security: Option<SecurityConfig>,
    /// How often the cluster is checked for `/readyz`: brokers reachable, credentials
    /// accepted, every topic in `topics` present.
    #[serde(default = "default_check_interval_ms")]
    pub check_interval_ms: u64,
    /// Any librdkafka consumer property, passed through as is
    /// (<https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>); set after
    /// `security`, so an option wins over the property the section maps to.
    #[serde(default, deserialize_with = "references::flat_options")]
    pub options: BTreeMap<String, OptionValue>,
}

impl KafkaConfig {
    /// How the group's topic patterns are matched: by librdkafka under the classic protocol,
    /// by the broker under `"group.protocol" = "consumer"` (see [`crate::subscription`]).
    pub fn topic_matching(&self) -> crate::subscription::Matching {
        let protocol = self.options.get("group.protocol").map(ToString::to_string);
        crate::subscription::Matching::of_protocol(protocol.as_deref())
    }
}

/// One cluster as a client sees it: where, how secured, and the user's librdkafka options.
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    /// Bootstrap brokers.
    pub brokers: &'a str,
    /// TLS and SASL, if any.
    pub security: Option<&'a SecurityConfig>,
    /// The user's librdkafka properties.
    pub options: &'a BTreeMap<String, OptionValue>,
}

impl<'a> Cluster<'a> {
    /// An output's cluster: its own brokers, or `source`'s when it names none (its security is
    /// what [`Config::resolve_outputs`] left in it).
    pub fn output(
        source: &'a str,
        brokers: &'a Option<String>,
        security: &'a Option<SecurityConfig>,
        options: &'a BTreeMap<String, OptionValue>,
    ) -> Cluster<'a> {
        Cluster {
            brokers: brokers.as_deref().unwrap_or(source),
            security: security.as_ref(),
            options,
        }
    }

    /// Brokers, the security section's properties, then the user's options (which win), as
    /// librdkafka properties in the order they are to be set.
    pub fn properties(&self) -> Vec<(String, String)> {
        let security = self.security.map(SecurityConfig::properties);
        std::iter::once(("bootstrap.servers".to_string(), self.brokers.to_string()))
            .chain(
                security
                    .into_iter()
                    .flatten()
                    .map(|(name, value)| (name.to_string(), value)),
            )
            .chain(
                self.options
                    .iter()
                    .map(|(name, value)| (name.clone(), value.to_string())),
            )
            .collect()
    }

    /// Sets [`Cluster::properties`] on `client`, over whatever defaults it already holds.
    pub fn apply(&self, client: &mut ClientConfig) {
        for (name, value) in self.properties() {
            client.set(name, value);
        }
    }
}

/// Whether librdkafka property `name` is about how a client reaches and authenticates to its
/// cluster (what outputs on the source's cluster inherit from `kafka.options`).
pub fn is_security_option(name: &str) -> bool {
    name == "security.protocol"
        || name.starts_with("sasl.")
        || name.starts_with("ssl.")
        || name.starts_with("https.ca.")
        || matches!(
            name,
            "enable.ssl.certificate.verification" | "enable.sasl.oauthbearer.unsecure.jwt"
        )
}

/// Whether two bootstrap lists name the same brokers (order, spaces and case aside).
pub fn same_brokers(one: &str, other: &str) -> bool {
    let set = |list: &str| {
        let mut brokers: Vec<String> = list
            .split(',')
            .map(|broker| broker.trim().to_ascii_lowercase())
            .filter(|broker| !broker.is_empty())
            .collect();
        brokers.sort();
        brokers.dedup();
        brokers
    };
    set(one) == set(other)
}

/// A librdkafka property value: TOML strings, integers and booleans are all accepted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OptionValue {
    /// `"earliest"`
    Text(String),
    /// `6000`
    Integer(i64),
    /// `true`
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(text) => f.write_str(text),
            OptionValue::Integer(number) => write!(f, "{number}"),
            OptionValue::Bool(flag) => write!(f, "{flag}"),
        }
    }
}

/// Capacities and timings of the pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Records the consumer → router channel holds; when it is full the consumer pauses the
    /// partitions it cannot deliver and resumes them once the channel is half empty.
    pub router_capacity: usize,
    /// Records each worker's channel holds; when it is full the router waits.
    pub worker_capacity: usize,
    /// How often finished offsets are committed (only when something advanced).
    pub commit_interval_ms: u64,
    /// How long shutdown waits for in-flight records before the final commit.
    pub drain_timeout_ms: u64,
    /// Payloads larger than this are not decoded and fail with reason `too_large`.
    pub max_payload_bytes: usize,
    /// How long the consumer waits for room in a full router channel before it pauses the
    /// partition (0: pause at once). A pause makes librdkafka drop what it prefetched for the
    /// partition and fetch it again on resume, so a short wait is cheaper for a pipeline that is
    /// merely busy; a stuck one is paused after this long and polling goes on.
    pub pause_after_ms: u64,
    /// A partition with records in flight whose commit has not moved for this long, or with
    /// records waiting to be read and nothing read for this long, is stalled: `/readyz` fails
    /// naming it.
    pub stall_timeout_ms: u64,
    /// Payload and key bytes the pipeline may hold between the consumer and the committer;
    /// at the bound the consumer pauses partitions until half of it is free. A single record
    /// larger than the bound is still taken when nothing else is held.
    pub max_in_flight_bytes: usize,
    /// Finished records a partition may have waiting behind an unfinished one (a record stuck
    /// in retries holds the commit back); at the bound the partition is paused until half of
    /// it is committed. It bounds the offset tracker and what a crash replays.
    pub max_uncommitted_records: usize,
    /// Batches each worker of a Kafka route may have sent and not yet reported at once (the
    /// idempotent producer keeps them in order). A worker waits for one round trip per batch
    /// otherwise, which caps a route at `workers × batch / round trip`. File and stdout sinks
    /// write one batch at a time.
    pub sink_batches_in_flight: usize,
    /// What a crash, a rebalance or a failover may repeat: `at-least-once` (what finished since
    /// the last commit is delivered again) or `exactly-once` (Kafka outputs only: the outputs
    /// and the consumer offsets are committed in one Kafka transaction).
    pub delivery: Delivery,
    /// `transactional.id` of the instance's producer with `delivery = "exactly-once"`: unique
    /// among running instances, the same across restarts of one (a restart then aborts what
    /// the previous run left open at once). Default `logbridge-<group_id>-<hostname>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
}

/// What a crash, a rebalance or a failover may repeat (`[pipeline] delivery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Offsets are committed only for finished records; a crash delivers again what finished
    /// since the last commit.
    #[default]
    AtLeastOnce,
    /// Kafka outputs and offsets are committed in one transaction per commit interval; readers
    /// with `isolation.level = read_committed` see each record's outputs once.
    ExactlyOnce,
}

impl Delivery {
    /// The name used in the configuration and on `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

/// librdkafka's default `transaction.timeout.ms`, which logbridge keeps unless the Kafka
/// outputs' options set it.
pub const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            router_capacity: 1024,
            worker_capacity: 256,
            commit_interval_ms: 1000,
            drain_timeout_ms: 5000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            stall_timeout_ms: 60_000,
            pause_after_ms: 100,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            max_uncommitted_records: 10_000,
            sink_batches_in_flight: 4,
            delivery: Delivery::AtLeastOnce,
            transactional_id: None,
        }
    }
}

/// The HTTP endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address for `/metrics` and `/healthz`; port 0 picks a free port.
    pub listen: String,
    /// Connections served at once; more wait in the kernel's accept backlog until one ends.
    /// Idle or slow ones hold a slot for at most the 5 s header timeout.
    pub max_connections: usize,
    /// The admin endpoint (`POST /resume`) takes requests with `Authorization: Bearer
    /// <token>`. Use a reference (`${env:NAME}`, `${file:/path}`); it is redacted wherever the
    /// configuration is shown. `logbridge resume` sends it.
    pub admin_token: Option<String>,
    /// Also take `POST /resume` without the token from a loopback address. Off by default: a
    /// sidecar proxy (a service mesh's) hands every request over from loopback, so loopback
    /// says nothing about who asks. Turn on where no proxy shares the host or pod.
    pub trust_loopback: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            // Reachable from outside a container (probes, scrapes) without a change.
            listen: "0.0.0.0:9898".to_string(),
            max_connections: 4096,
            admin_token: None,
            trust_loopback: false,
        }
    }
}

/// One route: which levels it takes, how many workers, and where records go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and output lines: lowercase letters, digits, `_` and `-`.
    pub name: String,
    /// Levels this route takes (normalised like event levels: `warn` means `warning`).
    /// Required unless the route is the `default` one.
    #[serde(default)]
    pub levels: Vec<String>,
    /// Also required of an event: its source topic is one of these (empty: any topic).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Also required of an event: its service is one of these (empty: any; an event without
    /// a service then does not match). Strict format: `service`; auto: `service`,
    /// `service.name`, `service` → `name`, `serviceContext` → `service`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Also required of an event: a record header with this name and value.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    /// Takes every event that no other route took (whatever its level); the last route, at
    /// most one, with no levels or other conditions.
    #[serde(default)]
    pub default: bool,
    /// After this route takes an event, the routes after it may take it too (fan-out): each
    /// gets its own copy, and the record's offset is committed only once every route that
    /// took it has finished with it. False (default): the first matching route takes it alone.
    #[serde(default, rename = "continue")]
    pub continue_: bool,
    /// Also required of an event: a condition on its fields (`{ field = "http.status", gte =
    /// 500 }`, with `equals`, `one_of`, `prefix`, `regex`, `exists`, `gt`, `gte`, `lt`, `lte`,
    /// and `not`, `all`, `any` around others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<ConditionConfig>,
    /// What is done to each event before the sink, in order: `set`, `rename`, `remove`,
    /// `redact`, `parse_json`, `add_metadata`, `sample`, `throttle`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<TransformConfig>,
    /// With a templated destination (a `{field}` or `%Y` in the topic, path or index): the most
    /// distinct destinations the route writes to; a record that would make one more is
    /// dead-lettered (`too_many_destinations`). Each is a file kept open or a topic the
    /// producer keeps, for the life of the process.
    #[serde(default = "default_max_destinations")]
    pub max_destinations: usize,
    /// Worker actors; records with the same key always go to the same worker.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Destination of the route's records.
    pub sink: SinkConfig,
    /// Retries of a retryable delivery failure (connection refused, timeout, 408, 429, 5xx)
    /// before the record is dead-lettered with reason `retries_exhausted`. Unset (default): no
    /// limit; the record is retried until it goes through, holding its partition's commit
    /// back, and the backlog waits in Kafka.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// First retry delay; doubles with each attempt, and each delay is drawn between half and
    /// all of that (equal jitter).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Largest retry delay.
    #[serde(default = "default_retry_backoff_max_ms")]
    pub retry_backoff_max_ms: u64,
}

/// A header a route requires: `name` present with exactly `value` (compared as UTF-8 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

impl SinkConfig {
    /// The HTTP section of an `http`, `elasticsearch`, `loki` or `otlp` sink, and which it is.
    pub fn http(&self) -> Option<(&HttpSinkConfig, HttpDestination)> {
        match self {
            SinkConfig::Http(http) => Some((http, HttpDestination::Http)),
            SinkConfig::Elasticsearch(http) => Some((http, HttpDestination::Elasticsearch)),
            SinkConfig::Loki(http) => Some((http, HttpDestination::Loki)),
            SinkConfig::Otlp(http) => Some((http, HttpDestination::Otlp)),
            _ => None,
        }
    }

    /// The sink's destination when it is a template rendered per record (a `{field}`, a
    /// `{level}`-style name or a `%Y`-style date in a Kafka `topic`, a file `path` or an
    /// Elasticsearch `index`), with how its values are made safe for the destination.
    pub fn destination_template(&self) -> Option<(&str, crate::shape::Sanitize)> {
        let templated = |text: &str| text.contains('{') || text.contains('%');
        match self {
            SinkConfig::Kafka { topic, .. } if templated(topic) => {
                Some((topic, crate::shape::Sanitize::KafkaTopic))
            }
            SinkConfig::File { path, .. } => path
                .to_str()
                .filter(|path| templated(path))
                .map(|path| (path, crate::shape::Sanitize::PathSegment)),
            SinkConfig::Elasticsearch(http) => http
                .index
                .as_deref()
                .filter(|index| templated(index))
                .map(|index| (index, crate::shape::Sanitize::IndexName)),
            _ => None,
        }
    }

    /// Whether the sink reads the event's service (a destination template naming it, or an
    /// OTLP resource's `service.name`).
    pub fn uses_service(&self) -> bool {
        let loki_label = match self {
            SinkConfig::Loki(http) => http.loki_labels().values().any(
                |label| matches!(label, LokiLabel::Template(text) if text.contains("{service")),
            ),
            _ => false,
        };
        loki_label
            || matches!(self, SinkConfig::Otlp(_))
            || self
                .destination_template()
                .is_some_and(|(text, _)| text.contains("{service"))
    }
}

impl RouteConfig {
    /// Compiles the route's field condition, transforms and destination template once, so
    /// that a mistake in any of them is an error naming its key at start (and in
    /// `check-config`), never a failure per event.
    fn check_shape(&self, index: usize) -> Result<(), ConfigError> {
        let shape_error = |err: crate::shape::ShapeError| invalid(err.key, err.message);
        if let Some(when) = &self.when {
            crate::shape::Condition::compile(when, &format!("routes[{index}].when"))
                .map_err(shape_error)?;
        }
        crate::shape::Transforms::compile(&self.transforms, &format!("routes[{index}].transforms"))
            .map_err(shape_error)?;
        if let Some((text, sanitize)) = self.sink.destination_template() {
            let key = match &self.sink {
                SinkConfig::Kafka { .. } => "sink.topic",
                SinkConfig::File { .. } => "sink.path",
                _ => "sink.index",
            };
            crate::shape::Template::parse(text, sanitize, &format!("routes[{index}].{key}"))
                .map_err(shape_error)?;
        }
        if self.max_destinations == 0 {
            return Err(invalid(
                format!("routes[{index}].max_destinations"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// What the route does, as understood: its conditions, transforms and destination, one
    /// line each (for `check-config`).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut takes = if self.default {
            "whatever no other route took".to_string()
        } else {
            format!("levels {}", self.levels.join(", "))
        };
        if !self.topics.is_empty() {
            takes.push_str(&format!(" from topics {}", self.topics.join(", ")));
        }
        if !self.services.is_empty() {
            takes.push_str(&format!(" of services {}", self.services.join(", ")));
        }
        if let Some(header) = &self.header {
            takes.push_str(&format!(
                " with header {} = {:?}",
                header.name, header.value
            ));
        }
        if let Some(when) = &self.when {
            if let Ok(condition) = crate::shape::Condition::compile(when, "when") {
                takes.push_str(&format!(" when {}", condition.describe()));
            }
        }
        lines.push(format!("takes {takes}"));
        lines.push(if self.continue_ {
            "then hands the event on to later routes too (continue)".to_string()
        } else {
            "later routes do not see what it takes".to_string()
        });
        if let Ok(transforms) = crate::shape::Transforms::compile(&self.transforms, "transforms") {
            for (step, line) in transforms.describe().into_iter().enumerate() {
                lines.push(format!("transform {}: {line}", step + 1));
            }
        }
        match self.sink.destination_template() {
            Some((text, sanitize)) => match crate::shape::Template::parse(text, sanitize, "sink") {
                Ok(template) => lines.push(format!(
                    "writes to {} {} (at most {} distinct)",
                    self.sink.kind(),
                    template.describe(),
                    self.max_destinations
                )),
                Err(_) => lines.push(format!("writes to {} {text}", self.sink.kind())),
            },
            None => lines.push(format!("writes to {}", self.sink.kind())),
        }
        lines
    }

    /// Whether the route reads the event's service (its destination template or a `set`
    /// template names `{service}`): only then does the router decode it.
    pub fn uses_service(&self) -> bool {
        self.sink.uses_service()
            || self.transforms.iter().any(|transform| {
                transform
                    .value
                    .as_ref()
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|text| text.contains("{service"))
            })
    }

    /// Whether the route asks more of an event than its level (a topic, service, header or
    /// field condition).
    pub fn has_conditions(&self) -> bool {
        !self.topics.is_empty()
            || !self.services.is_empty()
            || self.header.is_some()
            || self.when.is_some()
    }

    /// How long a worker waits for a fuller batch: an HTTP sink's `linger_ms`, up to its
    /// `max_records`.
    pub fn linger(&self) -> Option<crate::worker::Linger> {
        match &self.sink {
            SinkConfig::Http(http)
            | SinkConfig::Elasticsearch(http)
            | SinkConfig::Loki(http)
            | SinkConfig::Otlp(http)
                if http.linger_ms > 0 =>
            {
                Some(crate::worker::Linger {
                    wait: std::time::Duration::from_millis(http.linger_ms),
                    fill: http.max_records,
                })
            }
            _ => None,
        }
    }

    /// Batches each worker of this route may have in its sink at once:
    /// `pipeline.sink_batches_in_flight` where the sink keeps several in order (Kafka), else 1.
    pub fn batches_in_flight(&self, pipeline: &PipelineConfig) -> usize {
        match self.sink {
            SinkConfig::Kafka { .. } => pipeline.sink_batches_in_flight,
            // The sink holds a batch's records until the objects holding them are stored, so
            // the worker must go on handing it batches meanwhile: the pipeline's own bounds
            // (in-flight bytes, uncommitted records) limit what is held, and the sink closes
            // its objects when they are reached.
            SinkConfig::ObjectStore(_) => usize::MAX,
            _ => 1,
        }
    }
}

fn default_check_interval_ms() -> u64 {
    15_000
}

fn default_retry_backoff_ms() -> u64 {
    100
}

fn default_retry_backoff_max_ms() -> u64 {
    10_000
}

fn default_workers() -> usize {
    1
}

/// Distinct destinations a templated route may write to, unless it says otherwise.
pub const DEFAULT_MAX_DESTINATIONS: usize = 100;

fn default_max_destinations() -> usize {
    DEFAULT_MAX_DESTINATIONS
}

/// Destination of a route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines appended to a file, written to the OS before the record is acked.
    /// SIGHUP closes the file and opens `path` again (for logrotate's default mode).
    File {
        /// Output file; parent directories are created.
        path: PathBuf,
        /// Ack a batch only once its lines are on disk (`fdatasync`), not merely with the OS.
        #[serde(default)]
        fsync: bool,
        /// Rotate when a batch would take the file past this size: `path` becomes `path.1`
        /// (`path.1` becomes `path.2`, ...) and a fresh `path` is opened. A batch is never
        /// split, so a file holding a single batch may be larger. Absent: no rotation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
        /// Rotated files kept (`path.1` to `path.<max_files>`, 5 if absent); at each rotation
        /// `path.<max_files>` is deleted. Only with `max_bytes`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_files: Option<u32>,
    },
    /// JSON lines on standard output.
    Stdout,
    /// Discard (for benchmarks).
    Null,
    /// Send batches to an HTTP endpoint: the original payloads as NDJSON or a JSON array.
    Http(HttpSinkConfig),
    /// Index into Elasticsearch or OpenSearch with `_bulk`.
    Elasticsearch(HttpSinkConfig),
    /// Push to Grafana Loki (`/loki/api/v1/push`, JSON): streams by `labels`, the original
    /// payload as the line.
    Loki(HttpSinkConfig),
    /// Export to an OpenTelemetry collector (or any OTLP/HTTP logs endpoint): each event as an
    /// OTLP LogRecord in a protobuf `ExportLogsServiceRequest`, gzipped unless
    /// `compression = "none"` (see `otlp_sink`).
    Otlp(HttpSinkConfig),
    /// Archive to object storage (S3 and S3-compatible stores, GCS, Azure Blob): compressed
    /// NDJSON objects whose boundaries depend only on their records (see `object_sink`).
    #[serde(rename = "object_store", alias = "s3")]
    ObjectStore(ObjectStoreSinkConfig),
    /// Produce to a Kafka topic: original payload, key and headers, plus
    /// `logbridge.source.topic`, `.partition`, `.offset` and `logbridge.route` headers.
    Kafka {
        /// Destination topic.
        topic: String,
        /// Destination brokers; the source cluster if absent.
        #[serde(default)]
        brokers: Option<String>,
        /// Security of the destination cluster; the source cluster's when on its brokers.
        #[serde(default)]
        security: Option<SecurityConfig>,
        /// librdkafka producer properties.
        #[serde(default, deserialize_with = "references::flat_options")]
        options: BTreeMap<String, OptionValue>,
        /// Give each produced record the source record's timestamp (where it has one); false:
        /// the producer's time of sending.
        #[serde(default = "default_true")]
        keep_timestamp: bool,
        /// Forward the source record's headers; false: only logbridge's `logbridge.*` headers.
        #[serde(default = "default_true")]
        keep_headers: bool,
    },
}

impl SinkConfig {
    /// Its `type` as written in the configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File { .. } => "file",
            SinkConfig::Stdout => "stdout",
            SinkConfig::Null => "null",
            SinkConfig::Http(_) => "http",
            SinkConfig::Elasticsearch(_) => "elasticsearch",
            SinkConfig::Loki(_) => "loki",
            SinkConfig::Otlp(_) => "otlp",
            SinkConfig::ObjectStore(_) => "object_store",
            SinkConfig::Kafka { .. } => "kafka",
        }
    }
}

/// Rotated files a file sink keeps when `max_files` is absent.
pub const DEFAULT_FILE_MAX_FILES: u32 = 5;

fn default_true() -> bool {
    true
}

/// Smallest `max_bytes` of a file sink: below it, every batch or two would rotate.
pub const MIN_FILE_MAX_BYTES: u64 = 1024;
/// Most rotated files a file sink keeps (each rotation renames all of them).
pub const MAX_FILE_MAX_FILES: u32 = 1000;

impl Config {
    /// Loads `path`, applies `LOGBRIDGE_*` environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(invalid(
                "config",
                format!("file {} does not exist", path.display()),
            ));
        }
        Self::from_figment(Figment::new().merge(Toml::file_exact(path)), || {
            std::fs::read_to_string(path).ok()
        })
    }

    /// Parses TOML text (with environment overrides) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)), || {
            Some(text.to_string())
        })
    }

    /// `file` with the environment's overrides on top, resolved and validated.
    /// `text` gives the file's TOML again, to name lines in an error.
    fn from_figment(
        file: Figment,
        text: impl FnOnce() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let config: Config = overrides::extract(file)
            .map_err(|err| ConfigError::Load(load_error::describe(&err, text().as_deref())))?;
        let config = config.with_references_resolved()?;
        config.validate()?;
        Ok(config)
    }

    /// Replaces `${env:NAME}` and `${file:/path}` in every string value.
    fn with_references_resolved(self) -> Result<Config, ConfigError> {
        let mut value = serde_json::to_value(&self)
            .map_err(|err| invalid("config", format!("cannot be resolved: {err}")))?;
        references::resolve(&mut value, "")?;
        serde_json::from_value(value)
            .map_err(|err| invalid("config", format!("cannot be resolved: {err}")))
    }

    /// The source cluster.
    pub fn source(&self) -> Cluster<'_> {
        Cluster {
            brokers: &self.kafka.brokers,
            security: self.kafka.security.as_ref(),
            options: &self.kafka.options,
        }
    }

    /// Fills in what outputs leave to the source cluster: Kafka sinks and the dead-letter topic
    /// without `brokers` use the source's, and those on the source's cluster without their own
    /// `security` use the source's: its `security` section and the security properties of its
    /// `options` ([`is_security_option`]: `security.protocol`, `sasl.*`, `ssl.*`, ...; an
    /// output's own option of the same name wins). Credentials never go to another cluster by
    /// default. "The source's cluster" means the same set of bootstrap brokers
    /// ([`same_brokers`]: order, spaces and case aside); two lists naming different brokers of
    /// one cluster are taken as different clusters, the safe side for credentials.
    pub fn resolve_outputs(&mut self) {
        let source = self.kafka.brokers.clone();
        let security = self.kafka.security.clone();
        let security_options: Vec<(String, OptionValue)> = self
            .kafka
            .options
            .iter()
            .filter(|(name, _)| is_security_option(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let inherit = |brokers: &mut Option<String>,
                       own: &mut Option<SecurityConfig>,
                       options: &mut BTreeMap<String, OptionValue>| {
            let brokers = brokers.get_or_insert_with(|| source.clone());
            if own.is_none() && same_brokers(brokers, &source) {
                own.clone_from(&security);
                for (name, value) in &security_options {
                    options.entry(name.clone()).or_insert_with(|| value.clone());
                }
            }
        };
        for route in &mut self.routes {
            if let SinkConfig::Kafka {
                brokers,
                security,
                options,
                ..
            } = &mut route.sink
            {
                inherit(brokers, security, options);
            }
        }
        if let Some(dead_letter) = &mut self.dead_letter {
            inherit(
                &mut dead_letter.brokers,
                &mut dead_letter.security,
                &mut dead_letter.options,
            );
        }
    }

    /// `delivery = "exactly-once"`: the `transactional.id` of this instance's producer, as
    /// configured, else `logbridge-<group_id>-<hostname>` (stable across restarts of one host
    /// or pod, and unique among hosts).
    pub fn transactional_id(&self) -> String {
        match &self.pipeline.transactional_id {
            Some(id) => id.clone(),
            None => format!("logbridge-{}-{}", self.kafka.group_id, hostname()),
        }
    }

    /// Every Kafka output (sink routes, then the dead-letter topic): the key that names it, its
    /// topic and its cluster. Call after [`Config::resolve_outputs`].
    pub fn outputs(&self) -> Vec<(String, &str, Cluster<'_>)> {
        let source = self.kafka.brokers.as_str();
        let mut outputs = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            if let SinkConfig::Kafka {
                topic,
                brokers,
                security,
                options,
                ..
            } = &route.sink
            {
                outputs.push((
                    format!("routes[{index}].sink.topic"),
                    topic.as_str(),
                    Cluster::output(source, brokers, security, options),
                ));
            }
        }
        if let Some(dead_letter) = &self.dead_letter {
            outputs.push((
                "dead_letter.topic".to_string(),
                dead_letter.topic.as_str(),
                dead_letter.cluster(source),
            ));
        }
        outputs
    }

    /// Every secret value in the configuration (security passwords, secret-named options),
    /// longest first, for [`Config::scrub`].
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = Vec::new();
        let mut take = |security: &Option<SecurityConfig>,
                        options: &BTreeMap<String, OptionValue>| {
            if let Some(security) = security {
                secrets.extend(security.secrets().map(str::to_string));
            }
            secrets.extend(
                options
                    .iter()
                    .filter(|(name, _)| is_secret(name))
                    .map(|(_, value)| value.to_string()),
            );
        };
        take(&self.kafka.security, &self.kafka.options);
        for route in &self.routes {
            if let SinkConfig::Kafka {
                security, options, ..
            } = &route.sink
            {
                take(security, options);
            }
        }
        if let Some(dead_letter) = &self.dead_letter {
            take(&dead_letter.security, &dead_letter.options);
        }
        for route in &self.routes {
            if let Some((http, _)) = route.sink.http() {
                secrets.extend(http.secrets().map(str::to_string));
            }
        }
        secrets.extend(self.http.admin_token.clone());
        // Short values (`true`, a port) would blank out harmless words of a message.
        secrets.retain(|secret| secret.len() >= 4);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        secrets
    }

    /// `text` with every secret of the configuration replaced by `<redacted>`: librdkafka
    /// quotes property values in its errors.
    pub fn scrub(&self, text: &str) -> String {
        scrub_secrets(&self.secrets(), text)
    }

    /// Checks what serde cannot: non-empty lists, sane numbers, route names and levels,
    /// properties that logbridge owns, and the drain budget against the session timeout.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let kafka = &self.kafka;
        if kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if kafka.topics.is_empty() {
            return Err(invalid("kafka.topics", "must list at least one topic"));
        }
        for (index, topic) in kafka.topics.iter().enumerate() {
            if topic.trim().is_empty() {
                return Err(invalid(
                    format!("kafka.topics[{index}]"),
                    "empty topic name",
                ));
            }
            if crate::subscription::is_pattern(topic) {
                crate::subscription::TopicPattern::new(topic)
                    .map_err(|why| invalid(format!("kafka.topics[{index}]"), why))?;
            }
        }
        for (name, why) in OWNED_OPTIONS {
            if kafka.options.contains_key(*name) {
                return Err(invalid(format!("kafka.options.\"{name}\""), *why));
            }
        }
        check_client_options("kafka.options", &kafka.options)?;
        let consumer_protocol = kafka
            .options
            .get("group.protocol")
            .is_some_and(|value| value.to_string() == "consumer");
        if consumer_protocol {
            for (name, why) in CLASSIC_ONLY_OPTIONS {
                if kafka.options.contains_key(*name) {
                    return Err(invalid(
                        format!("kafka.options.\"{name}\""),
                        format!("not allowed with \"group.protocol\" = \"consumer\": {why}"),
                    ));
                }
            }
        }
        if let Some(security) = &kafka.security {
            security.validate("kafka.security")?;
        }
        check_range(
            "kafka.check_interval_ms",
            kafka.check_interval_ms,
            100,
            3_600_000,
        )?;

        let pipeline = &self.pipeline;
        check_range(
            "pipeline.router_capacity",
            pipeline.router_capacity,
            1,
            1 << 20,
        )?;
        check_range(
            "pipeline.worker_capacity",
            pipeline.worker_capacity,
            1,
            1 << 20,
        )?;
        check_range(
            "pipeline.commit_interval_ms",
            pipeline.commit_interval_ms,
            10,
            600_000,
        )?;
        check_range(
            "pipeline.max_payload_bytes",
            pipeline.max_payload_bytes,
            16,
            64 << 20,
        )?;
        check_range("pipeline.pause_after_ms", pipeline.pause_after_ms, 0, 5_000)?;
        check_range(
            "pipeline.max_in_flight_bytes",
            pipeline.max_in_flight_bytes,
            64 << 10,
            16 << 30,
        )?;
        check_range(
            "pipeline.max_uncommitted_records",
            pipeline.max_uncommitted_records,
            16,
            10_000_000,
        )?;
        check_range(
            "pipeline.sink_batches_in_flight",
            pipeline.sink_batches_in_flight,
            1,
            64,
        )?;
        self.input.validate()?;
        if pipeline.drain_timeout_ms == 0 {
            return Err(invalid(
                "pipeline.drain_timeout_ms",
                "0 would abandon every in-flight record at shutdown and revoke: give it at \
                 least 1 (a few seconds is usual)",
            ));
        }
        check_range(
            "pipeline.stall_timeout_ms",
            pipeline.stall_timeout_ms,
            pipeline.commit_interval_ms,
            86_400_000,
        )?;
        let session_timeout_ms = match kafka.options.get("session.timeout.ms") {
            None => 45_000,
            Some(value) => value.to_string().parse::<u64>().map_err(|_| {
                invalid(
                    "kafka.options.\"session.timeout.ms\"",
                    format!("`{value}` is not a number of milliseconds"),
                )
            })?,
        };
        if pipeline.drain_timeout_ms >= session_timeout_ms {
            return Err(invalid(
                "pipeline.drain_timeout_ms",
                format!(
                    "{} must be below session.timeout.ms ({session_timeout_ms}), or the group \
                     expels this member while it drains",
                    pipeline.drain_timeout_ms
                ),
            ));
        }

        check_range("http.max_connections", self.http.max_connections, 1, 65_536)?;
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                format!("`{}` is not an ip:port address", self.http.listen),
            ));
        }

        if self.routes.is_empty() {
            return Err(invalid("routes", "define at least one [[routes]] entry"));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        // Levels taken by a route with no other condition: no later route can see them.
        let mut levels: HashMap<String, &str> = HashMap::new();
        // File sinks by path: the first route writing there and its sink.
        let mut files: HashMap<&Path, (usize, &SinkConfig)> = HashMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            let mut unconditional = Vec::new();
            let key = |field: &str| format!("routes[{index}].{field}");
            let valid_name = !route.name.is_empty()
                && route.name.len() <= 64
                && route.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid_name {
                return Err(invalid(
                    key("name"),
                    format!(
                        "`{}`: use 1-64 lowercase letters, digits, `_` or `-`",
                        route.name
                    ),
                ));
            }
            if let Some(first) = names.insert(&route.name, index) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is also the name of routes[{first}]", route.name),
                ));
            }
            check_range(&key("workers"), route.workers, 1, 256)?;
            if route.default {
                if !route.levels.is_empty() || route.has_conditions() {
                    return Err(invalid(
                        key("default"),
                        "the default route takes whatever no earlier route took: give it no \
                         levels, topics, services or header",
                    ));
                }
                if route.continue_ {
                    return Err(invalid(
                        key("continue"),
                        "the default route is the last and takes only what no other route \
                         took: there is nothing to continue to",
                    ));
                }
                if index + 1 != self.routes.len() {
                    return Err(invalid(
                        key("default"),
                        "the default route must be the last: the routes after it would never \
                         see an event",
                    ));
                }
            } else if route.levels.is_empty() {
                return Err(invalid(key("levels"), "must list at least one level"));
            }
            if route.topics.iter().any(|topic| topic.is_empty()) {
                return Err(invalid(key("topics"), "empty topic name"));
            }
            if let Some(pattern) = route
                .topics
                .iter()
                .find(|topic| crate::subscription::is_pattern(topic))
            {
                return Err(invalid(
                    key("topics"),
                    format!(
                        "`{pattern}` is a pattern: a route's topics are names (of topics that \
                         kafka.topics, names or patterns, brings in); for several, list them or \
                         match on a header"
                    ),
                ));
            }
            if route.services.iter().any(|service| service.is_empty()) {
                return Err(invalid(key("services"), "empty service name"));
            }
            if let Some(header) = &route.header {
                if header.name.is_empty() {
                    return Err(invalid(key("header.name"), "empty header name"));
                }
            }
            route.check_shape(index)?;
            for raw in &route.levels {
                if raw.trim().is_empty() {
                    return Err(invalid(key("levels"), "empty level"));
                }
                if raw.trim() != raw {
                    return Err(invalid(
                        key("levels"),
                        format!(
                            "`{raw}` has spaces around it and would match no event: write `{}`",
                            raw.trim()
                        ),
                    ));
                }
                if matches!(
                    self.input.format,
                    crate::event::InputFormat::Auto
                        | crate::event::InputFormat::Text
                        | crate::event::InputFormat::OtlpProto
                        | crate::event::InputFormat::OtlpJson
                ) {
                    let mapped = self
                        .input
                        .level_map
                        .values()
                        .any(|level| Level::new(level) == Level::new(raw));
                    if let Some(read_as) = crate::event::folded_alias(raw).filter(|_| !mapped) {
                        return Err(invalid(
                            key("levels"),
                            format!(
                                "`{raw}` would match no event: the auto decoder reads it as \
                                 `{read_as}` (write `{read_as}`, or map your loggers' names to \
                                 `{raw}` in input.level_map)"
                            ),
                        ));
                    }
                }
                let level = Level::new(raw).as_str().to_string();
                // First match wins: after a route that takes a level with no other condition,
                // no later route can see that level.
                if let Some(other) = levels.get(&level) {
                    return Err(invalid(
                        key("levels"),
                        format!(
                            "level `{level}` is already taken by route `{other}`, which asks \
                             nothing else of an event and does not `continue` (the first \
                             matching route wins; give `{other}` `continue = true` to send \
                             its events on to later routes too)"
                        ),
                    ));
                }
                if !route.has_conditions() && !route.continue_ {
                    unconditional.push((level, route.name.as_str()));
                }
            }
            levels.extend(unconditional);
            match &route.sink {
                SinkConfig::File {
                    path,
                    max_bytes,
                    max_files,
                    ..
                } => {
                    if path.as_os_str().is_empty() {
                        return Err(invalid(key("sink.path"), "empty path"));
                    }
                    if let Some(max_bytes) = max_bytes {
                        check_range(
                            &key("sink.max_bytes"),
                            *max_bytes,
                            MIN_FILE_MAX_BYTES,
                            u64::MAX,
                        )?;
                    }
                    if let Some(max_files) = max_files {
                        if max_bytes.is_none() {
                            return Err(invalid(
                                key("sink.max_files"),
                                "files rotate only by size: set `max_bytes` too, or remove \
                                 `max_files`",
                            ));
                        }
                        check_range(&key("sink.max_files"), *max_files, 1, MAX_FILE_MAX_FILES)?;
                    }
                    // The workers of every route writing to one path share one file: it can
                    // have only one set of settings.
                    match files.get(path.as_path()) {
                        Some((other, first)) if *first != &route.sink => {
                            return Err(invalid(
                                key("sink"),
                                format!(
                                    "`{}` is also the file of routes[{other}], with other \
                                     settings: give both the same `fsync`, `max_bytes` and \
                                     `max_files`",
                                    path.display()
                                ),
                            ));
                        }
                        Some(_) => {}
                        None => {
                            files.insert(path.as_path(), (index, &route.sink));
                        }
                    }
                }
                SinkConfig::Http(http)
                | SinkConfig::Elasticsearch(http)
                | SinkConfig::Loki(http)
                | SinkConfig::Otlp(http) => {
                    if let Some((_, destination)) = route.sink.http() {
                        http.validate(&key("sink"), destination)?;
                    }
                }
                SinkConfig::ObjectStore(store) => {
                    store.validate(&key("sink"))?;
                    // An OTLP request becomes several records with one offset; an object's
                    // name gives offsets, so a cut between two of them (a timing cut can fall
                    // anywhere) would make a replay skip the half it did not store.
                    if matches!(
                        self.input.format,
                        crate::event::InputFormat::OtlpProto | crate::event::InputFormat::OtlpJson
                    ) {
                        return Err(invalid(
                            key("sink.type"),
                            "an object store cannot archive `input.format = \"otlp_proto\"` or \
                             `\"otlp_json\"` yet (the log records of one Kafka record share its \
                             offset, which object names are built from, and a cut between them would \
                             make a replay skip what was not stored): use another sink for it",
                        ));
                    }
                    // Two routes writing the same names would overwrite each other's objects.
                    if let Some(other) = self.routes[..index].iter().position(|other| {
                        matches!(&other.sink, SinkConfig::ObjectStore(o)
                            if o.url.trim_end_matches('/') == store.url.trim_end_matches('/')
                                && o.path == store.path)
                    }) {
                        return Err(invalid(
                            key("sink.path"),
                            format!(
                                "routes[{other}] archives to the same url and path: their \
                                 objects would have the same names; give one another `path`"
                            ),
                        ));
                    }
                }
                SinkConfig::Kafka {
                    topic,
                    brokers,
                    security,
                    options,
                    ..
                } => {
                    self.check_output_topic(&key("sink.topic"), topic, brokers.as_deref())?;
                    if let Some(security) = security {
                        security.validate(&key("sink.security"))?;
                    }
                    check_client_options(&key("sink.options"), options)?;
                    self.check_sink_order(&key("sink.options"), options)?;
                }
                _ => {}
            }
            check_range(
                &key("retry_backoff_ms"),
                route.retry_backoff_ms,
                1,
                3_600_000,
            )?;
            check_range(
                &key("retry_backoff_max_ms"),
                route.retry_backoff_max_ms,
                route.retry_backoff_ms,
                3_600_000,
            )?;
        }
        if let Some(dead_letter) = &self.dead_letter {
            self.check_output_topic(
                "dead_letter.topic",
                &dead_letter.topic,
                dead_letter.brokers.as_deref(),
            )?;
            if let Some(security) = &dead_letter.security {
                security.validate("dead_letter.security")?;
            }
            check_client_options("dead_letter.options", &dead_letter.options)?;
        }
        if let Some(token) = self.http.admin_token.as_deref().filter(|t| !t.is_empty()) {
            if token.trim().len() < 16 {
                return Err(invalid(
                    "http.admin_token",
                    "use at least 16 characters (a reference such as ${env:LOGBRIDGE_ADMIN_TOKEN} keeps it out of the file)",
                ));
            }
        }
        let breaker = &self.breaker;
        if !(breaker.max_invalid_ratio > 0.0 && breaker.max_invalid_ratio <= 1.0) {
            return Err(invalid(
                "breaker.max_invalid_ratio",
                format!(
                    "{} is out of range: use more than 0 up to 1",
                    breaker.max_invalid_ratio
                ),
            ));
        }
        check_range("breaker.window", breaker.window, 1, 1_000_000)?;
        check_range(
            "breaker.max_consecutive",
            breaker.max_consecutive,
            1,
            1_000_000,
        )?;
        if self.pipeline.delivery == Delivery::ExactlyOnce {
            self.check_exactly_once()?;
        }
        Ok(())
    }

    /// `delivery = "exactly-once"`: every output is a Kafka topic on the source cluster, and
    /// they can share one transactional producer (one security, one set of properties); a
    /// transaction (a commit interval and a drain) fits well within `transaction.timeout.ms`.
    fn check_exactly_once(&self) -> Result<(), ConfigError> {
        const WHY: &str = "with pipeline.delivery = \"exactly-once\" every output must be a \
                           Kafka topic on the source cluster (its offsets and the outputs are \
                           committed in one transaction)";
        let source = &self.kafka;
        // The first Kafka output's properties: every other one must have the same, since
        // they all go through the instance's one transactional producer.
        let mut first: Option<(String, &BTreeMap<String, OptionValue>)> = None;
        let mut outputs: Vec<(String, &Option<String>, &Option<SecurityConfig>, _)> = Vec::new();
        for (index, route) in self.routes.iter().enumerate() {
            match &route.sink {
                SinkConfig::Kafka {
                    brokers,
                    security,
                    options,
                    ..
                } => outputs.push((format!("routes[{index}].sink"), brokers, security, options)),
                other => {
                    return Err(invalid(
                        format!("routes[{index}].sink"),
                        format!(
                            "route `{}` writes to a {} sink: {WHY}",
                            route.name,
                            other.kind()
                        ),
                    ))
                }
            }
        }
        if let Some(dead_letter) = &self.dead_letter {
            outputs.push((
                "dead_letter".to_string(),
                &dead_letter.brokers,
                &dead_letter.security,
                &dead_letter.options,
            ));
        }
        for (key, brokers, security, options) in outputs {
            if let Some(brokers) = brokers {
                if !same_brokers(brokers, &source.brokers) {
                    return Err(invalid(
                        format!("{key}.brokers"),
                        format!(
                            "`{brokers}` is not the source cluster ({}): {WHY}",
                            source.brokers
                        ),
                    ));
                }
            }
            if security
                .as_ref()
                .is_some_and(|own| Some(own) != source.security.as_ref())
            {
                return Err(invalid(
                    format!("{key}.security"),
                    "with pipeline.delivery = \"exactly-once\" the outputs use the source \
                     cluster's security (one transactional producer); leave this out",
                ));
            }
            match &first {
                None => first = Some((key, options)),
                Some((first_key, first_options)) if *first_options != options => {
                    return Err(invalid(
                        format!("{key}.options"),
                        format!(
                            "with pipeline.delivery = \"exactly-once\" every Kafka output \
                             shares one transactional producer: give it the same options as \
                             {first_key}.options"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        // Routes are never empty and all Kafka here, so there is a first output.
        let (first_key, options) = match &first {
            Some((key, options)) => (key.as_str(), Some(*options)),
            None => ("routes[0].sink", None),
        };
        for name in ["transactional.id", "enable.idempotence"] {
            if options.is_some_and(|options| options.contains_key(name)) {
                return Err(invalid(
                    format!("{first_key}.options.\"{name}\""),
                    "logbridge sets it with pipeline.delivery = \"exactly-once\" (use \
                     pipeline.transactional_id for the id)",
                ));
            }
        }
        let timeout_ms = match options.and_then(|options| options.get("transaction.timeout.ms")) {
            None => DEFAULT_TRANSACTION_TIMEOUT_MS,
            Some(value) => value.to_string().parse::<u64>().map_err(|_| {
                invalid(
                    format!("{first_key}.options.\"transaction.timeout.ms\""),
                    format!("`{value}` is not a number of milliseconds"),
                )
            })?,
        };
        let pipeline = &self.pipeline;
        // A transaction stays open for a commit interval, then a drain; the commit itself and
        // a rebalance's revoke need the rest. Past the timeout the coordinator aborts it and
        // fences the producer.
        if (pipeline.commit_interval_ms + pipeline.drain_timeout_ms) * 2 > timeout_ms {
            return Err(invalid(
                "pipeline.commit_interval_ms",
                format!(
                    "commit_interval_ms ({}) + drain_timeout_ms ({}) must be at most half of \
                     transaction.timeout.ms ({timeout_ms}), or a slow transaction is aborted \
                     by the broker and the producer fenced",
                    pipeline.commit_interval_ms, pipeline.drain_timeout_ms
                ),
            ));
        }
        if let Some(id) = &pipeline.transactional_id {
            if id.trim().is_empty() || id.len() > 200 {
                return Err(invalid(
                    "pipeline.transactional_id",
                    "must be 1 to 200 characters, unique among running instances and the same \
                     across restarts of one",
                ));
            }
        }
        Ok(())
    }

    /// An output topic must exist by name and must not feed logbridge its own output.
    /// A Kafka sink keeps several batches in flight and retries on its own. The idempotent
    /// producer keeps what librdkafka retries in order; without it a retried request can land
    /// after a later one, unless librdkafka has only one request in flight per connection.
    /// (A batch that fails while a later one succeeds is handled by the worker either way: the
    /// later records of its keys are delivered again after it.)
    fn check_sink_order(
        &self,
        key: &str,
        options: &BTreeMap<String, OptionValue>,
    ) -> Result<(), ConfigError> {
        let off = |name: &str| {
            options
                .get(name)
                .is_some_and(|value| value.to_string().trim().eq_ignore_ascii_case("false"))
        };
        if !off("enable.idempotence") {
            return Ok(());
        }
        let one_request = options
            .get("max.in.flight.requests.per.connection")
            .is_some_and(|value| value.to_string().trim() == "1");
        if !one_request {
            return Err(invalid(
                format!("{key}.\"enable.idempotence\""),
                "without idempotence librdkafka's retries can reorder the records of a key: remove \
                 it (logbridge's producers are idempotent), or, for a cluster that forbids \
                 idempotent writes, also set \"max.in.flight.requests.per.connection\" = 1",
            ));
        }
        Ok(())
    }

    fn check_output_topic(
        &self,
        key: &str,
        topic: &str,
        brokers: Option<&str>,
    ) -> Result<(), ConfigError> {
        if topic.trim().is_empty() {
            return Err(invalid(key, "empty topic name"));
        }
        let same_cluster = brokers.is_none_or(|b| same_brokers(b, &self.kafka.brokers));
        if !same_cluster {
            return Ok(());
        }
        if self.kafka.topics.iter().any(|source| source == topic) {
            return Err(invalid(
                key,
                format!("`{topic}` is also a source topic: logbridge would consume its own output"),
            ));
        }
        // A topic a source pattern matches is consumed too, once it exists. (A templated topic
        // is checked as written: what it renders to is known only per record.)
        let matched = self.kafka.topics.iter().find(|source| {
            crate::subscription::is_pattern(source)
                && crate::subscription::TopicPattern::new(source)
                    .is_ok_and(|pattern| pattern.matches_either(topic))
        });
        if let Some(pattern) = matched {
            return Err(invalid(
                key,
                format!(
                    "`{topic}` matches the source pattern `{pattern}`: logbridge would consume \
                     its own output (narrow the pattern, or name another topic)"
                ),
            ));
        }
        Ok(())
    }

    /// A copy with every secret replaced by `"<redacted>"`: the security sections' passwords,
    /// and any librdkafka option whose name says it may hold one ([`is_secret`]). Used wherever
    /// the configuration is shown (`/status`, `check-config`).
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        let hide = |security: &mut Option<SecurityConfig>,
                    options: &mut BTreeMap<String, OptionValue>| {
            if let Some(section) = security {
                *section = section.redacted();
            }
            for (name, value) in options.iter_mut() {
                if is_secret(name) {
                    *value = OptionValue::Text(REDACTED.to_string());
                }
            }
        };
        hide(&mut config.kafka.security, &mut config.kafka.options);
        if let Some(registry) = &mut config.input.schema_registry {
            *registry = registry.redacted();
        }
        if config.http.admin_token.is_some() {
            config.http.admin_token = Some(REDACTED.to_string());
        }
        if let Some(dead_letter) = &mut config.dead_letter {
            hide(&mut dead_letter.security, &mut dead_letter.options);
        }
        for route in &mut config.routes {
            match &mut route.sink {
                SinkConfig::Kafka {
                    security, options, ..
                } => hide(security, options),
                SinkConfig::Http(http)
                | SinkConfig::Elasticsearch(http)
                | SinkConfig::Loki(http)
                | SinkConfig::Otlp(http) => {
                    *http = http.redacted();
                }
                SinkConfig::ObjectStore(store) => *store = store.redacted(),
                _ => {}
            }
        }
        config
    }

    /// The configuration as JSON for `/status`, secrets redacted.
    pub fn redacted_json(&self) -> serde_json::Value {
        serde_json::to_value(self.redacted()).unwrap_or(serde_json::Value::Null)
    }

    /// The configuration as TOML, secrets redacted, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml_string(&self.redacted())
    }
}

/// `text` with each of `secrets` replaced by `<redacted>` (longest first, as
/// [`Config::secrets`] orders them).
pub fn scrub_secrets(secrets: &[String], text: &str) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| {
        text.replace(secret, REDACTED)
    })
}

/// Each librdkafka property of `options` (found at `key`) as librdkafka itself takes it when a
/// client's configuration is made, without connecting: a misspelt name or a value it refuses is
/// an error naming the key (the value left out of the message where it may be a secret), where
/// it would otherwise stop logbridge at start.
fn check_client_options(
    key: &str,
    options: &BTreeMap<String, OptionValue>,
) -> Result<(), ConfigError> {
    for (name, value) in options {
        let value = value.to_string();
        let refused = rdkafka::config::ClientConfig::new()
            .set(name, &value)
            .create_native_config()
            .err();
        if let Some(err) = refused {
            let why = match &err {
                rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => {
                    description.clone()
                }
                other => other.to_string(),
            };
            // librdkafka quotes a value it refuses, if it names it at all; a value too short
            // to be told from the words around it is only replaced where quoted.
            let why = if is_secret(name) {
                let why = why.replace(&format!("\"{value}\""), &format!("\"{REDACTED}\""));
                if value.len() >= 4 {
                    why.replace(&value, REDACTED)
                } else {
                    why
                }
            } else {
                why
            };
            return Err(invalid(
                format!("{key}.\"{name}\""),
                format!("librdkafka refuses it: {why}"),
            ));
        }
    }
    Ok(())
}

/// Whether a librdkafka property may hold a secret: its name contains `password`, `secret`,
/// `token` or `key` (`sasl.oauthbearer.config` holds client secrets too). Redacting a harmless
/// one (`ssl.key.location`) costs nothing; showing a secret does.
pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|word| name.contains(word))
        || name == "sasl.oauthbearer.config"
}

fn toml_string(config: &Config) -> String {
    // Config holds only strings, numbers, booleans, lists and tables, which TOML can all
    // express; should that ever change, show the Debug form rather than fail.
    toml::to_string_pretty(config).unwrap_or_else(|err| format!("# not TOML: {err}\n{config:?}"))
}

fn check_range<T>(key: &str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range: use {min} to {max}"),
        ));
    }
    Ok(())
}

/// Loads `text` with no LOGBRIDGE_ variables in the environment but `env`, under figment's
/// jail lock so that a test that sets some cannot leak them into another.
#[cfg(test)]
// figment's Jail closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
pub(crate) fn load_jailed(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let mut result = None;
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        for (name, value) in env {
            jail.set_env(name, value);
        }
        result = Some(Config::from_toml_str(text).map_err(|err| err.to_string()));
        Ok(())
    });
    result.unwrap_or_else(|| Err("jail did not run".to_string()))
}

#[cfg(test)]
// figment's Jail closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        brokers = "localhost:9092"
        group_id = "g"
        topics = ["logs"]
        [[routes]]
        name = "errors"
        levels = ["error"]
        sink = { type = "null" }
    "#;

    fn load(text: &str) -> Result<Config, String> {
        load_jailed(text, &[])
    }

    #[test]
    fn an_object_store_does_not_archive_otlp_input_and_says_so() {
        let routes = "[[routes]]\nname = \"archive\"\ndefault = true\n\
                      sink = { type = \"s3\", url = \"s3://b/p\" }\n";
        let base = "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n";
        for format in ["otlp_proto", "otlp_json"] {
            let err =
                load(&format!("{base}[input]\nformat = \"{format}\"\n{routes}")).expect_err(format);
            assert!(err.contains("routes[0].sink.type"), "{err}");
        }
        load(&format!("{base}[input]\nformat = \"auto\"\n{routes}")).expect("auto archives");
    }

    #[test]
    fn a_schema_registry_is_checked_key_by_key_and_its_secrets_are_redacted() {
        let section = |lines: &str| {
            format!("{MINIMAL}\n[input]\nformat = \"auto\"\n[input.schema_registry]\n{lines}")
        };
        let config = load(&section(
            "url = \"https://sr:pw@registry:8081\"\n\
             auth = { type = \"basic\", username = \"u\", password = \"s3cret\" }\n",
        ))
        .expect("valid");
        let registry = config.input.schema_registry.as_ref().expect("a registry");
        assert_eq!(registry.max_schemas, 1_000);
        assert_eq!(registry.timeout_ms, 10_000);
        let shown = config.redacted_json().to_string();
        assert!(
            !shown.contains("s3cret") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(shown.contains("registry:8081"), "{shown}");
        for (lines, key) in [
            ("url = \"registry:8081\"\n", "input.schema_registry.url"),
            ("url = \"ftp://registry\"\n", "input.schema_registry.url"),
            (
                "url = \"http://registry\"\nmax_schemas = 0\n",
                "input.schema_registry.max_schemas",
            ),
            (
                "url = \"http://registry\"\nca_file = \"/nonexistent/ca.pem\"\n",
                "input.schema_registry.ca_file",
            ),
            ("url = \"http://registry\"\ncache = 5\n", "cache"),
        ] {
            let err = error_of(&section(lines));
            assert!(err.contains(key), "{lines}: {err}");
        }
        let err = error_of(&format!(
            "{MINIMAL}\n[input]\nformat = \"otlp_proto\"\n[input.schema_registry]\nurl = \"http://r\"\n"
        ));
        assert!(err.contains("input.schema_registry"), "{err}");
    }

    /// The source options as `name=value` lines, in order.
    fn option_lines(config: &Config) -> Vec<String> {
        config
            .kafka
            .options
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect()
    }

    fn error_of(text: &str) -> String {
        match load(text) {
            Ok(_) => panic!("config unexpectedly valid:\n{text}"),
            Err(err) => err,
        }
    }

    #[test]
    fn shipped_configs_load_and_validate() {
        for path in [
            "config/logbridge.toml",
            "config/demo.toml",
            "config/docker.toml",
        ] {
            // Absolute: figment's jail (used by the other tests) changes the working directory.
            let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            let text = std::fs::read_to_string(full).unwrap_or_else(|e| panic!("{path}: {e}"));
            let config = load(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
            // Round trip: what we would print can be read back to the same thing.
            let again: Config = Figment::new()
                .merge(figment::providers::Serialized::defaults(&config))
                .extract()
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(format!("{config:?}"), format!("{again:?}"));
        }
    }

    #[test]
    fn defaults_fill_the_pipeline_and_http_sections() {
        let config = load(MINIMAL).expect("minimal config is valid");
        assert_eq!(config.pipeline.router_capacity, 1024);
        assert_eq!(config.pipeline.worker_capacity, 256);
        assert_eq!(config.http.listen, "0.0.0.0:9898");
        assert!(!config.http.trust_loopback);
        assert_eq!(config.routes[0].workers, 1);
    }

    #[test]
    fn the_admin_token_is_long_and_never_shown() {
        let err = error_of(&format!("{MINIMAL}\n[http]\nadmin_token = \"short\"\n"));
        assert!(err.contains("http.admin_token"), "{err}");
        let config = load(&format!(
            "{MINIMAL}\n[http]\nadmin_token = \"a-token-of-32-characters-or-so-xx\"\n"
        ))
        .expect("valid");
        assert!(
            !config.to_toml().contains("a-token-of-32"),
            "{}",
            config.to_toml()
        );
        assert!(config
            .secrets()
            .iter()
            .any(|s| s.starts_with("a-token-of-32")));
        // Empty, as an unset environment override gives it: no token.
        assert!(load(&format!("{MINIMAL}\n[http]\nadmin_token = \"\"\n")).is_ok());
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}\n[pipeline]\nrouter_capacity = \"big\"\n");
        let err = error_of(&text);
        assert!(err.contains("router_capacity"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = MINIMAL.replace("group_id = \"g\"", "group_id = \"g\"\ngroup = \"x\"");
        let err = error_of(&text);
        // Issue 33, item 4: the key as written, its line and a likely spelling (it read
        // "unknown field: found `group`, expected `one of ...` for key \"default.kafka.group\"").
        assert!(
            err.contains("`kafka.group` (line 5): unknown key: did you mean `group_id`?"),
            "{err}"
        );
        assert!(!err.contains("default."), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (MINIMAL.replace("topics = [\"logs\"]", "topics = []"), "kafka.topics"),
            (MINIMAL.replace("name = \"errors\"", "name = \"Errors!\""), "routes[0].name"),
            (MINIMAL.replace("levels = [\"error\"]", "levels = []"), "routes[0].levels"),
            (
                format!("{MINIMAL}\n[pipeline]\nrouter_capacity = 0\n"),
                "pipeline.router_capacity",
            ),
            (
                format!("{MINIMAL}\n[pipeline]\ndrain_timeout_ms = 60000\n"),
                "pipeline.drain_timeout_ms",
            ),
            (format!("{MINIMAL}\n[http]\nlisten = \"nowhere\"\n"), "http.listen"),
            (
                MINIMAL.replace(
                    "topics = [\"logs\"]",
                    "topics = [\"logs\"]\n[kafka.options]\n\"enable.auto.commit\" = true",
                ),
                "kafka.options.\"enable.auto.commit\"",
            ),
            (
                MINIMAL.replace(
                    "topics = [\"logs\"]",
                    "topics = [\"logs\"]\n[kafka.options]\n\"group.protocol\" = \"consumer\"\n\"session.timeout.ms\" = 6000",
                ),
                "kafka.options.\"session.timeout.ms\"`: not allowed with \"group.protocol\" = \"consumer\"",
            ),
            (
                MINIMAL.replace(
                    "topics = [\"logs\"]",
                    "topics = [\"logs\"]\n[kafka.options]\n\"group.protocol\" = \"consumer\"\n\"partition.assignment.strategy\" = \"range\"",
                ),
                "group.remote.assignor",
            ),
            (
                format!(
                    "{MINIMAL}\n[[routes]]\nname = \"errors\"\nlevels = [\"info\"]\nsink = {{ type = \"null\" }}\n"
                ),
                "routes[1].name",
            ),
            (
                format!(
                    "{MINIMAL}\n[[routes]]\nname = \"other\"\nlevels = [\"ERROR\"]\nsink = {{ type = \"null\" }}\n"
                ),
                "routes[1].levels",
            ),
        ];
        for (text, key) in cases {
            let err = error_of(&text);
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
    }

    /// Patterns in `kafka.topics` are checked where they are written, and an output a pattern
    /// would read back is refused.
    #[test]
    fn topic_patterns_are_checked_and_no_output_may_feed_one() {
        let with_topics = |topics: &str, rest: &str| {
            format!(
                "{}{rest}",
                MINIMAL.replace("topics = [\"logs\"]", &format!("topics = {topics}"))
            )
        };
        for (text, expected) in [
            (
                with_topics(r#"["logs", "^app-\\d+"]"#, ""),
                "`kafka.topics[1]`: `^app-\\d+`: `\\d` is read differently",
            ),
            (
                with_topics(r#"["^(app"]"#, ""),
                "`kafka.topics[0]`: `^(app` is not a valid regular expression",
            ),
            (
                with_topics(r#"["^.*"]"#, ""),
                "`kafka.topics[0]`: `^.*` also matches Kafka's internal topic `__consumer_offsets`",
            ),
            (
                with_topics(r#"["^logs.*"]"#, "\n[dead_letter]\ntopic = \"logs.dlq\"\n"),
                "`dead_letter.topic`: `logs.dlq` matches the source pattern `^logs.*`",
            ),
            (
                with_topics(
                    r#"["^app-.*"]"#,
                    "\n[[routes]]\nname = \"copy\"\nlevels = [\"info\"]\nsink = { type = \"kafka\", topic = \"app-{service}\" }\n",
                ),
                "`routes[1].sink.topic`: `app-{service}` matches the source pattern `^app-.*`",
            ),
        ] {
            let err = error_of(&text);
            assert!(err.contains(expected), "expected `{expected}` in: {err}\n{text}");
        }
        // On another cluster, or not matched: fine; names and patterns mix.
        let fine = load(&with_topics(
            r#"["audit", "^app-.*"]"#,
            "\n[dead_letter]\ntopic = \"app-dlq\"\nbrokers = \"other:9092\"\n\
             [[routes]]\nname = \"copy\"\nlevels = [\"info\"]\nsink = { type = \"kafka\", topic = \"copies\" }\n",
        ))
        .expect("valid");
        assert_eq!(fine.kafka.topics, ["audit", "^app-.*"]);
        assert_eq!(
            fine.kafka.topic_matching(),
            crate::subscription::Matching::Search
        );
    }

    #[test]
    fn environment_overrides_nested_keys_and_ignores_other_variables() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("LOGBRIDGE_KAFKA__BROKERS", "kafka-1:9092,kafka-2:9092");
            jail.set_env("LOGBRIDGE_PIPELINE__ROUTER_CAPACITY", "4096");
            jail.set_env("LOGBRIDGE_LOG", "debug");
            jail.set_env("LOGBRIDGE_SOMETHING_ELSE", "x");
            let config = Config::from_toml_str(MINIMAL).map_err(|e| e.to_string())?;
            assert_eq!(config.kafka.brokers, "kafka-1:9092,kafka-2:9092");
            assert_eq!(config.pipeline.router_capacity, 4096);
            jail.set_env("LOGBRIDGE_PIPELINE__WORKER_CAPACITY", "lots");
            let err = Config::from_toml_str(MINIMAL).expect_err("not a number");
            assert!(
                err.to_string().to_lowercase().contains("worker_capacity"),
                "{err}"
            );
            Ok(())
        });
    }

    /// Issue: `LOGBRIDGE_KAFKA__SECURITY__PASSWORD=12345678` failed ("found unsigned int,
    /// expected a string"), as did `true` and numeric group ids, and any route override stopped
    /// the config from loading.
    #[test]
    fn overrides_take_the_type_of_their_field_and_reach_routes_by_index() {
        let text = MINIMAL.replace(
            "topics = [\"logs\"]",
            "topics = [\"logs\"]\n[kafka.security]\nprotocol = \"sasl_plaintext\"\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"",
        ) + "[[routes]]\nname = \"all\"\nlevels = [\"info\"]\nsink = { type = \"file\", path = \"/tmp/all.log\" }\n";
        let config = load_jailed(
            &text,
            &[
                ("LOGBRIDGE_KAFKA__SECURITY__PASSWORD", "12345678"),
                ("LOGBRIDGE_KAFKA__SECURITY__USERNAME", "true"),
                ("LOGBRIDGE_KAFKA__GROUP_ID", "4711"),
                ("LOGBRIDGE_KAFKA__TOPICS", "logs,audit"),
                ("LOGBRIDGE_KAFKA__OPTIONS__SASL_KERBEROS_PRINCIPAL", "0123"),
                (
                    "LOGBRIDGE_ROUTES__1__SINK__PATH",
                    "/var/log/all-${env:LB_TEST_SUFFIX:-x}.log",
                ),
                ("LOGBRIDGE_ROUTES__0__LEVELS", "[error, fatal]"),
                ("LOGBRIDGE_PIPELINE__ROUTER_CAPACITY", "4096"),
            ],
        )
        .expect("loads");
        let security = config.kafka.security.as_ref().expect("security");
        assert_eq!(security.password.as_deref(), Some("12345678"));
        assert_eq!(security.username.as_deref(), Some("true"));
        assert_eq!(config.kafka.group_id, "4711");
        assert_eq!(config.kafka.topics, ["logs", "audit"]);
        assert_eq!(
            option_lines(&config),
            ["sasl.kerberos.principal=0123"],
            "text that a number would change stays text"
        );
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.routes[0].name, "errors");
        assert_eq!(config.routes[0].levels, ["error", "fatal"]);
        assert_eq!(config.routes[1].name, "all");
        assert!(
            matches!(&config.routes[1].sink, SinkConfig::File { path, .. } if path == Path::new("/var/log/all-x.log")),
            "{:?}",
            config.routes[1].sink
        );
        assert_eq!(config.pipeline.router_capacity, 4096);

        let err = load_jailed(&text, &[("LOGBRIDGE_ROUTES__2__SINK__PATH", "/x")])
            .expect_err("no third route");
        assert!(
            err.contains("LOGBRIDGE_ROUTES__2__SINK__PATH") && err.contains("2 item(s)"),
            "{err}"
        );
        let err = load_jailed(&text, &[("LOGBRIDGE_PIPELINE__ROUTER_CAPACITY", "0x10")])
            .expect_err("not a number");
        assert!(
            err.contains("`pipeline.router_capacity` (set by LOGBRIDGE_PIPELINE__ROUTER_CAPACITY): expected a whole number (0 or more), found string \"0x10\""),
            "{err}"
        );
        let err = load_jailed(
            &text.replace("name = \"all\"", "name = \"all\"\nworkerz = 2"),
            &[],
        )
        .expect_err("misspelt");
        assert!(
            err.contains("`routes[1].workerz` (line 17): unknown key: did you mean `workers`?"),
            "{err}"
        );
    }

    #[test]
    fn exactly_once_takes_only_kafka_outputs_on_the_source_cluster_sharing_one_producer() {
        let eos = |routes: &str, rest: &str| {
            format!(
                "[kafka]\nbrokers = \"a:9092,b:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n\
                 [pipeline]\ndelivery = \"exactly-once\"\n{rest}\n{routes}"
            )
        };
        let kafka_route = |name: &str, extra: &str| {
            let level = if name == "one" { "info" } else { "error" };
            format!(
                "[[routes]]\nname = \"{name}\"\nlevels = [\"{level}\"]\n\
                 sink = {{ type = \"kafka\", topic = \"out-{name}\"{extra} }}\n"
            )
        };
        let two = format!("{}{}", kafka_route("one", ""), kafka_route("two", ""));
        let config = load(&format!(
            "{}\n[dead_letter]\ntopic = \"logs.dlq\"\n",
            eos(&two, "transactional_id = \"bridge-0\"")
        ))
        .expect("valid");
        assert_eq!(config.pipeline.delivery, Delivery::ExactlyOnce);
        assert_eq!(
            config.pipeline.transactional_id.as_deref(),
            Some("bridge-0")
        );
        // Brokers written in another order are the same cluster.
        load(&eos(
            &kafka_route("one", ", brokers = \"b:9092, a:9092\""),
            "",
        ))
        .expect("valid");
        assert_eq!(
            load(MINIMAL).expect("valid").pipeline.delivery,
            Delivery::AtLeastOnce
        );
        let http = "[[routes]]\nname = \"web\"\nlevels = [\"warning\"]\n\
                    sink = { type = \"http\", url = \"http://h:8080/in\" }\n";
        let cases = [
            // Another kind of sink, named with its route.
            (
                eos(&format!("{two}{http}"), ""),
                "routes[2].sink",
                "route `web` writes to a http sink",
            ),
            (
                eos(&kafka_route("one", ", brokers = \"c:9092\""), ""),
                "routes[0].sink.brokers",
                "not the source cluster",
            ),
            (
                format!(
                    "{}\n[dead_letter]\ntopic = \"dlq\"\nbrokers = \"c:9092\"\n",
                    eos(&two, "")
                ),
                "dead_letter.brokers",
                "not the source cluster",
            ),
            (
                eos(
                    &format!(
                        "{}{}",
                        kafka_route("one", ""),
                        kafka_route("two", ", options = { \"linger.ms\" = 50 }")
                    ),
                    "",
                ),
                "routes[1].sink.options",
                "the same options as routes[0].sink.options",
            ),
            (
                eos(
                    &kafka_route("one", ", options = { \"transactional.id\" = \"x\" }"),
                    "",
                ),
                "routes[0].sink.options.\"transactional.id\"",
                "pipeline.transactional_id",
            ),
            (
                eos(
                    &kafka_route("one", ", options = { \"transaction.timeout.ms\" = 10000 }"),
                    "drain_timeout_ms = 5000",
                ),
                "pipeline.commit_interval_ms",
                "at most half of transaction.timeout.ms (10000)",
            ),
            (
                eos(&two, "transactional_id = \" \""),
                "pipeline.transactional_id",
                "1 to 200 characters",
            ),
            (
                eos(&two, "").replace("exactly-once", "twice"),
                "delivery",
                "twice",
            ),
        ];
        for (text, key, message) in cases {
            let err = error_of(&text);
            assert!(
                err.contains(key) && err.contains(message),
                "expected `{key}` and `{message}` in: {err}\n{text}"
            );
        }
    }

    #[test]
    fn kafka_sink_dead_letter_and_breaker_are_validated() {
        let with_kafka_sink = MINIMAL.replace(
            "sink = { type = \"null\" }",
            "sink = { type = \"kafka\", topic = \"logs.errors\" }\nmax_retries = 3",
        );
        let config = load(&format!(
            "{with_kafka_sink}\n[dead_letter]\ntopic = \"logs.dlq\"\n"
        ))
        .expect("valid");
        assert_eq!(config.routes[0].max_retries, Some(3));
        assert_eq!(config.routes[0].retry_backoff_ms, 100);
        assert!(config.breaker.enabled);
        let cases = [
            (
                MINIMAL.replace(
                    "sink = { type = \"null\" }",
                    "sink = { type = \"kafka\", topic = \"logs\" }",
                ),
                "routes[0].sink.topic",
            ),
            (format!("{MINIMAL}\n[dead_letter]\ntopic = \"logs\"\n"), "dead_letter.topic"),
            (format!("{MINIMAL}\n[breaker]\nmax_invalid_ratio = 0\n"), "breaker.max_invalid_ratio"),
            (format!("{MINIMAL}\n[breaker]\nwindow = 0\n"), "breaker.window"),
            (
                MINIMAL.replace("sink = { type = \"null\" }", "sink = { type = \"null\" }\nretry_backoff_ms = 500\nretry_backoff_max_ms = 100"),
                "routes[0].retry_backoff_max_ms",
            ),
        ];
        for (text, key) in cases {
            let err = error_of(&text);
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
        // A source-named sink topic is fine on another cluster.
        let other_cluster = MINIMAL.replace(
            "sink = { type = \"null\" }",
            "sink = { type = \"kafka\", topic = \"logs\", brokers = \"other:9092\" }",
        );
        assert!(load(&other_cluster).is_ok());
    }

    #[test]
    fn file_rotation_and_kafka_fidelity_keys_are_validated() {
        let with_sink = |sink: &str| {
            MINIMAL.replace(
                "sink = { type = \"null\" }",
                &format!("sink = {{ {sink} }}"),
            )
        };
        let config = load(&with_sink(
            "type = \"file\", path = \"out/e.jsonl\", max_bytes = 1048576, max_files = 3",
        ))
        .expect("valid");
        assert_eq!(
            config.routes[0].sink,
            SinkConfig::File {
                path: PathBuf::from("out/e.jsonl"),
                fsync: false,
                max_bytes: Some(1_048_576),
                max_files: Some(3),
            }
        );
        // Printed and read back the same (`check-config` prints what it would run).
        let again = load(&config.to_toml()).expect("round trip");
        assert_eq!(again.routes[0].sink, config.routes[0].sink);
        let kafka = load(&with_sink("type = \"kafka\", topic = \"out\"")).expect("valid");
        assert!(matches!(
            kafka.routes[0].sink,
            SinkConfig::Kafka {
                keep_timestamp: true,
                keep_headers: true,
                ..
            }
        ));
        let kafka = load(&with_sink(
            "type = \"kafka\", topic = \"out\", keep_timestamp = false, keep_headers = false",
        ))
        .expect("valid");
        assert!(matches!(
            kafka.routes[0].sink,
            SinkConfig::Kafka {
                keep_timestamp: false,
                keep_headers: false,
                ..
            }
        ));
        let cases = [
            (
                with_sink("type = \"file\", path = \"e\", max_bytes = 100"),
                "`routes[0].sink.max_bytes`: 100 is out of range",
            ),
            (
                with_sink("type = \"file\", path = \"e\", max_bytes = 4096, max_files = 0"),
                "`routes[0].sink.max_files`: 0 is out of range: use 1 to 1000",
            ),
            (
                with_sink("type = \"file\", path = \"e\", max_bytes = 4096, max_files = 1001"),
                "`routes[0].sink.max_files`: 1001 is out of range",
            ),
            (
                with_sink("type = \"file\", path = \"e\", max_files = 3"),
                "`routes[0].sink.max_files`: files rotate only by size",
            ),
            (
                format!(
                    "{}[[routes]]\nname = \"other\"\nlevels = [\"warn\"]\nsink = {{ type = \"file\", path = \"e\", max_bytes = 4096 }}\n",
                    with_sink("type = \"file\", path = \"e\"")
                ),
                "`routes[1].sink`: `e` is also the file of routes[0], with other settings",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&text);
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        // Two routes may share a file with the same settings.
        let shared = format!(
            "{}[[routes]]\nname = \"other\"\nlevels = [\"warn\"]\nsink = {{ type = \"file\", path = \"e\" }}\n",
            with_sink("type = \"file\", path = \"e\"")
        );
        assert!(load(&shared).is_ok());
    }

    /// Issue 33, item 4: a route level the auto decoder never produces (it folds the name
    /// into another level) is refused, unless level_map produces it.
    #[test]
    fn a_level_the_auto_decoder_folds_away_is_refused_unless_mapped() {
        let auto = |levels: &str, map: &str| {
            format!(
                "{}\n[input]\nformat = \"auto\"\n{map}\n",
                MINIMAL.replace("levels = [\"error\"]", levels)
            )
        };
        let err = error_of(&auto("levels = [\"error\", \"notice\"]", ""));
        assert!(
            err.contains("routes[0].levels") && err.contains("reads it as `info`"),
            "{err}"
        );
        assert!(load(&auto(
            "levels = [\"notice\"]",
            "[input.level_map]\nNOTICE = \"notice\""
        ))
        .is_ok());
        // The strict format keeps the level as written.
        assert!(load(&MINIMAL.replace("levels = [\"error\"]", "levels = [\"notice\"]")).is_ok());
    }

    /// Issue 33, item 4: a misspelt librdkafka property passed the check and stopped logbridge
    /// at start; librdkafka now judges every option as a client's configuration is made.
    #[test]
    fn librdkafka_refuses_misspelt_properties_and_bad_values_naming_the_key() {
        let with = |section: &str, options: &str| {
            MINIMAL.replace(
                "topics = [\"logs\"]",
                &format!("topics = [\"logs\"]\n[{section}]\n{options}"),
            )
        };
        let cases = [
            (
                with("kafka.options", "\"sesion.timeout.ms\" = 6000"),
                "`kafka.options.\"sesion.timeout.ms\"`: librdkafka refuses it: No such configuration property: \"sesion.timeout.ms\"",
            ),
            (
                with("kafka.options", "\"session.timeout.ms\" = \"six seconds\""),
                "`kafka.options.\"session.timeout.ms\"`: librdkafka refuses it: Invalid value for configuration property \"session.timeout.ms\"",
            ),
            (
                format!(
                    "{}[dead_letter]\ntopic = \"dlq\"\n[dead_letter.options]\n\"compresion.type\" = \"zstd\"\n",
                    MINIMAL
                ),
                "`dead_letter.options.\"compresion.type\"`",
            ),
            (
                MINIMAL.replace(
                    "sink = { type = \"null\" }",
                    "sink = { type = \"kafka\", topic = \"out\", options = { \"linger.ms\" = -5 } }",
                ),
                "`routes[0].sink.options.\"linger.ms\"`: librdkafka refuses it",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&text);
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        // A refused secret is not quoted back.
        let err = error_of(&with(
            "kafka.options",
            "\"ssl.key.password\" = \"\"\n\"sasl.oauthbearer.client.secret\" = \"hunter2\"",
        ));
        assert!(
            err.contains("sasl.oauthbearer.client.secret") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(load(&with(
            "kafka.options",
            "\"fetch.wait.max.ms\" = 50\n\"check.crcs\" = true"
        ))
        .is_ok());
    }

    #[test]
    fn status_json_redacts_secrets_only() {
        let text = MINIMAL.replace(
            "topics = [\"logs\"]",
            "topics = [\"logs\"]\n[kafka.options]\n\"sasl.password\" = \"hunter2\"\n\"ssl.key.password\" = \"k\"\n\"ssl.keystore.password\" = \"s\"\n\"ssl.key.pem\" = \"PEM\"\n\"sasl.username\" = \"alice\"\n\"auto.offset.reset\" = \"earliest\"\n\"sasl.oauthbearer.config\" = \"clientSecret=oc\"\n\"sasl.kerberos.keytab\" = \"/etc/kt\"",
        );
        let config = load(&text).expect("valid");
        let json = config.redacted_json().to_string();
        let toml = config.to_toml();
        assert!(
            !toml.contains("hunter2") && toml.contains("<redacted>"),
            "{toml}"
        );
        for secret in [
            "hunter2",
            "\"k\"",
            "\"s\"",
            "PEM",
            "clientSecret=oc",
            "/etc/kt",
        ] {
            assert!(!json.contains(secret), "{secret} leaked: {json}");
        }
        assert!(
            json.contains("alice") && json.contains("earliest"),
            "{json}"
        );
        assert_eq!(json.matches("<redacted>").count(), 6, "{json}");
    }

    #[test]
    fn security_options_of_the_source_reach_outputs_on_the_same_cluster_only() {
        // Kerberos and raw TLS set as librdkafka options, not in `[kafka.security]`.
        let text = r#"
            [kafka]
            brokers = "kdc-a:9093, kdc-b:9093"
            group_id = "g"
            topics = ["logs"]
            [kafka.options]
            "security.protocol" = "sasl_ssl"
            "sasl.mechanisms" = "GSSAPI"
            "sasl.kerberos.keytab" = "/etc/logbridge.keytab"
            "sasl.kerberos.principal" = "logbridge@EXAMPLE"
            "ssl.ca.location" = "/etc/ca.pem"
            "fetch.max.bytes" = 1048576
            [[routes]]
            name = "same"
            levels = ["error"]
            sink = { type = "kafka", topic = "out" }
            [[routes]]
            name = "reordered"
            levels = ["warn"]
            sink = { type = "kafka", topic = "out", brokers = "KDC-B:9093,kdc-a:9093", options = { "sasl.kerberos.principal" = "sink@EXAMPLE" } }
            [[routes]]
            name = "other"
            levels = ["info"]
            sink = { type = "kafka", topic = "out", brokers = "elsewhere:9092" }
            [dead_letter]
            topic = "dlq"
        "#;
        let mut config = load(text).expect("valid");
        config.resolve_outputs();
        let property = |index: usize, name: &str| {
            let mut client = ClientConfig::new();
            config.outputs()[index].2.apply(&mut client);
            client.get(name).map(str::to_string)
        };
        let keytab = Some("/etc/logbridge.keytab".to_string());
        assert_eq!(
            property(0, "sasl.kerberos.keytab"),
            keytab,
            "a sink on the source's brokers must inherit the source's security options"
        );
        assert_eq!(
            property(0, "security.protocol").as_deref(),
            Some("sasl_ssl")
        );
        assert_eq!(
            property(0, "ssl.ca.location").as_deref(),
            Some("/etc/ca.pem")
        );
        assert_eq!(
            property(0, "fetch.max.bytes"),
            None,
            "only security options"
        );
        assert_eq!(
            property(1, "sasl.kerberos.keytab"),
            keytab,
            "same brokers, other order"
        );
        assert_eq!(
            property(1, "sasl.kerberos.principal").as_deref(),
            Some("sink@EXAMPLE"),
            "the output's own option wins"
        );
        assert_eq!(property(2, "sasl.kerberos.keytab"), None, "another cluster");
        assert_eq!(property(2, "security.protocol"), None);
        assert_eq!(
            property(3, "sasl.kerberos.keytab"),
            keytab,
            "the dead-letter producer"
        );
    }

    #[test]
    fn a_kafka_sink_without_idempotence_is_refused_naming_the_key() {
        let sink = |options: &str, pipeline: &str| {
            format!(
                "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n{pipeline}\n\
                 [[routes]]\nname = \"out\"\nlevels = [\"error\"]\n\
                 sink = {{ type = \"kafka\", topic = \"out\", options = {{ {options} }} }}\n"
            )
        };
        let err = error_of(&sink("\"enable.idempotence\" = false", ""));
        assert!(
            err.contains("`routes[0].sink.options.\"enable.idempotence\"`"),
            "a Kafka sink without idempotence must be refused naming the key: {err}"
        );
        assert!(
            err.contains("max.in.flight.requests.per.connection"),
            "{err}"
        );
        // Allowed where no request can overtake another: one in flight per connection.
        let one_at_a_time = sink(
            "\"enable.idempotence\" = \"false\", \"max.in.flight.requests.per.connection\" = 1",
            "",
        );
        load(&one_at_a_time).expect("one request at a time keeps the order");
        let err = error_of(&sink(
            "\"enable.idempotence\" = false, \"max.in.flight.requests.per.connection\" = 5",
            "",
        ));
        assert!(err.contains("\"enable.idempotence\""), "{err}");
        load(&sink("\"enable.idempotence\" = true", "")).expect("idempotent is the default");
    }

    #[test]
    fn outputs_inherit_the_source_security_only_on_its_brokers() {
        let text = r#"
            [kafka]
            brokers = "secure:9093"
            group_id = "g"
            topics = ["logs"]
            [kafka.security]
            protocol = "sasl_ssl"
            mechanism = "SCRAM-SHA-256"
            username = "alice"
            password = "source-secret"
            [[routes]]
            name = "same"
            levels = ["error"]
            sink = { type = "kafka", topic = "out" }
            [[routes]]
            name = "other"
            levels = ["info"]
            sink = { type = "kafka", topic = "out", brokers = "elsewhere:9092" }
            [[routes]]
            name = "own"
            levels = ["debug"]
            sink = { type = "kafka", topic = "out2", security = { protocol = "ssl" } }
            [dead_letter]
            topic = "dlq"
        "#;
        let mut config = load(text).expect("valid");
        config.resolve_outputs();
        let outputs = config.outputs();
        let shown: Vec<(String, &str, &str, Option<SecurityProtocol>)> = outputs
            .iter()
            .map(|(key, topic, cluster)| {
                (
                    key.clone(),
                    *topic,
                    cluster.brokers,
                    cluster.security.map(|s| s.protocol),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "routes[0].sink.topic".to_string(),
                    "out",
                    "secure:9093",
                    Some(SecurityProtocol::SaslSsl)
                ),
                (
                    "routes[1].sink.topic".to_string(),
                    "out",
                    "elsewhere:9092",
                    None
                ),
                (
                    "routes[2].sink.topic".to_string(),
                    "out2",
                    "secure:9093",
                    Some(SecurityProtocol::Ssl)
                ),
                (
                    "dead_letter.topic".to_string(),
                    "dlq",
                    "secure:9093",
                    Some(SecurityProtocol::SaslSsl)
                ),
            ]
        );
        // Inherited credentials reach the producer's properties.
        let mut client = ClientConfig::new();
        outputs[3].2.apply(&mut client);
        assert_eq!(client.get("sasl.password"), Some("source-secret"));
        // Shown redacted everywhere, also where inherited; scrubbed from messages.
        let json = config.redacted_json().to_string();
        assert!(!json.contains("source-secret"), "{json}");
        assert_eq!(json.matches(REDACTED).count(), 3, "{json}");
        assert_eq!(
            config.scrub("Invalid value \"source-secret\" for sasl.password"),
            "Invalid value \"<redacted>\" for sasl.password"
        );
    }

    #[test]
    fn security_options_and_references_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("password", "from-a-file\n")?;
            let password_file = jail.directory().join("password");
            jail.set_env("KAFKA_USER", "bob");
            jail.set_env("LOGBRIDGE_KAFKA__OPTIONS__SOCKET_KEEPALIVE_ENABLE", "true");
            jail.set_env(
                "LOGBRIDGE_KAFKA__OPTIONS__SASL_PASSWORD",
                "${env:KAFKA_USER}-pw",
            );
            let text = MINIMAL.replace(
                "topics = [\"logs\"]",
                &format!(
                    "topics = [\"logs\"]\n[kafka.security]\nprotocol = \"sasl_plaintext\"\nmechanism = \"PLAIN\"\nusername = \"${{env:KAFKA_USER}}\"\npassword = \"${{file:{}}}\"",
                    password_file.display()
                ),
            );
            let config = Config::from_toml_str(&text).map_err(|e| e.to_string())?;
            let security = config.kafka.security.clone().expect("security");
            assert_eq!(security.username.as_deref(), Some("bob"));
            assert_eq!(security.password.as_deref(), Some("from-a-file"));
            let options = option_lines(&config);
            assert_eq!(
                options,
                ["sasl.password=bob-pw", "socket.keepalive.enable=true"]
            );
            let shown = config.to_toml();
            assert!(
                !shown.contains("from-a-file") && !shown.contains("bob-pw"),
                "{shown}"
            );
            jail.set_env("KAFKA_USER", "");
            jail.clear_env();
            let err = Config::from_toml_str(&text)
                .expect_err("variable unset")
                .to_string();
            assert!(
                err.contains(
                    "`kafka.security.username`: environment variable `KAFKA_USER` is not set"
                ),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_sink_type_is_rejected() {
        let err = error_of(&MINIMAL.replace("type = \"null\"", "type = \"carrier-pigeon\""));
        assert!(
            err.contains("carrier-pigeon") || err.contains("variant"),
            "{err}"
        );
    }

    #[test]
    fn librdkafka_options_accept_strings_numbers_and_booleans() {
        let text = MINIMAL.replace(
            "topics = [\"logs\"]",
            "topics = [\"logs\"]\n[kafka.options]\n\"auto.offset.reset\" = \"earliest\"\n\"session.timeout.ms\" = 6000\n\"check.crcs\" = true",
        );
        let config = load(&text).expect("valid");
        let options = option_lines(&config);
        assert_eq!(
            options,
            [
                "auto.offset.reset=earliest",
                "check.crcs=true",
                "session.timeout.ms=6000"
            ]
        );
    }

    /// Conditions, transforms and templates are compiled when the configuration loads: a
    /// mistake is an error naming its key, never a failure per event.
    #[test]
    fn shaping_mistakes_name_their_key() {
        let route = |extra: &str, sink: &str| {
            format!(
                "{}\n[[routes]]\nname = \"shaped\"\nlevels = [\"info\"]\n{extra}\nsink = {sink}\n",
                MINIMAL
            )
        };
        let null = "{ type = \"null\" }";
        let valid = route(
            "continue = true\nwhen = { any = [ { field = \"http.status\", gte = 500 }, { field = \"tags[0]\", equals = \"x\" } ] }\n\
             transforms = [ { set = \"cluster\", value = \"eu-1\" }, { sample = 4 } ]",
            "{ type = \"kafka\", topic = \"logs-{service|none}-%Y.%m\" }",
        );
        let config = load(&valid).expect("valid");
        assert!(config.routes[1].continue_ && config.routes[1].has_conditions());
        assert!(config.routes[1].uses_service());
        let cases = [
            (route("when = { field = \"m\", regex = \"(\" }", null), "`routes[1].when.regex`"),
            (
                route("when = { field = \"m\", contains = \"x\" }", null),
                "`routes[1].when.contains` (line 14): unknown key",
            ),
            (
                route("when = { all = [ { field = \"a\", exists = true, prefix = \"x\" } ] }", null),
                "`routes[1].when.all[0]`",
            ),
            (
                route("transforms = [ { redact = \"m\", pattern = \"[\" } ]", null),
                "`routes[1].transforms[0].pattern`",
            ),
            (
                route("transforms = [ { sample = 0 } ]", null),
                "`routes[1].transforms[0].sample`",
            ),
            (
                route("transforms = [ { sample = 2, to = \"x\" } ]", null),
                "`routes[1].transforms[0].to`",
            ),
            (
                route("", "{ type = \"kafka\", topic = \"logs-%Q\" }"),
                "`routes[1].sink.topic`",
            ),
            (
                route("", "{ type = \"file\", path = \"/tmp/{service\" }"),
                "`routes[1].sink.path`",
            ),
            (route("max_destinations = 0", null), "`routes[1].max_destinations`"),
            (
                format!("{MINIMAL}\n[[routes]]\nname = \"rest\"\ndefault = true\ncontinue = true\nsink = {null}\n"),
                "`routes[1].continue`",
            ),
        ];
        for (text, expected) in cases {
            let err = load(&text).expect_err(expected);
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn routes_match_in_order_with_conditions_and_a_default_route_comes_last() {
        let route = |name: &str, extra: &str| {
            format!("[[routes]]\nname = \"{name}\"\n{extra}\nsink = {{ type = \"null\" }}\n")
        };
        let base = MINIMAL.replace(
            "[[routes]]\n        name = \"errors\"\n        levels = [\"error\"]\n        sink = { type = \"null\" }\n",
            "",
        );
        let valid = format!(
            "{base}{}{}{}{}",
            route(
                "tenant-a",
                "levels = [\"error\"]\nheader = { name = \"tenant\", value = \"a\" }"
            ),
            route(
                "audit",
                "levels = [\"info\", \"error\"]\ntopics = [\"audit\"]"
            ),
            route("errors", "levels = [\"error\"]"),
            route("rest", "default = true"),
        );
        let config = load(&valid).expect("valid");
        assert!(config.routes[3].default);
        assert!(config.routes[0].has_conditions() && !config.routes[2].has_conditions());
        let cases = [
            (
                format!("{base}{}{}", route("rest", "default = true"), route("errors", "levels = [\"error\"]")),
                "`routes[0].default`: the default route must be the last",
            ),
            (
                format!("{base}{}", route("rest", "default = true\nlevels = [\"info\"]")),
                "`routes[0].default`: the default route takes whatever no earlier route took",
            ),
            (
                format!("{base}{}{}", route("errors", "levels = [\"error\"]"), route("later", "levels = [\"error\"]\ntopics = [\"audit\"]")),
                "`routes[1].levels`: level `error` is already taken by route `errors`, which asks nothing else",
            ),
            (
                format!("{base}{}", route("t", "levels = [\"error\"]\ntopics = [\"\"]")),
                "`routes[0].topics`: empty topic name",
            ),
            (
                format!("{base}{}", route("t", "levels = [\"error\"]\ntopics = [\"^logs-.*\"]")),
                "`routes[0].topics`: `^logs-.*` is a pattern: a route's topics are names",
            ),
            (
                format!("{base}{}", route("h", "levels = [\"error\"]\nheader = { name = \"\", value = \"a\" }")),
                "`routes[0].header.name`: empty header name",
            ),
            (
                format!("{base}{}", route("none", "")),
                "`routes[0].levels`: must list at least one level",
            ),
            (
                format!("{MINIMAL}\n[input]\nunrouted = \"drop\"\n"),
                "`input.unrouted` (line 12): unknown value `drop` (one of `ignore`, `dead-letter`)",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&text);
            assert!(
                err.contains(expected),
                "expected `{expected}` in: {err}\n{text}"
            );
        }
        let parked =
            load(&format!("{MINIMAL}\n[input]\nunrouted = \"dead-letter\"\n")).expect("valid");
        assert_eq!(parked.input.unrouted, UnroutedPolicy::DeadLetter);
        for (input, expected) in [
            (
                "format = \"logbridge\"\nlevel_field = \"sev\"",
                "`input.level_field`: is read with input.format = \"auto\" or \"text\" only",
            ),
            (
                "format = \"auto\"\nlevel_field = \"a..b\"",
                "`input.level_field`: an empty key",
            ),
            (
                "format = \"auto\"\nlevel_field = []",
                "`input.level_field`: an empty key",
            ),
            (
                "level_map = { W = \"warning\" }",
                "`input.level_map`: is read with input.format = \"auto\" or \"text\" only",
            ),
            // The text format: each key for its format, one way to the level, a pattern with
            // a group `level`.
            (
                "format = \"auto\"\nlevel_pattern = '(?P<level>x)'",
                "`input.level_pattern`: is read with input.format = \"text\" only",
            ),
            (
                "level = \"info\"",
                "`input.level`: is read with input.format = \"text\" only",
            ),
            (
                "format = \"auto\"\nlogfmt = true",
                "`input.logfmt`: is read with input.format = \"text\" only",
            ),
            (
                "format = \"text\"",
                "`input.format`: the text format needs to know each line's level",
            ),
            (
                "format = \"text\"\nlevel_pattern = '^\\S+ ([A-Z]+) '",
                "`input.level_pattern`: `^\\S+ ([A-Z]+) ` has no group named `level`",
            ),
            (
                "format = \"text\"\nlevel_pattern = '^(?P<level>[A-Z]+'",
                "`input.level_pattern`: not a valid regular expression",
            ),
            (
                "format = \"text\"\nlevel_pattern = '(?P<level>\\w+)'\nlevel = \"info\"",
                "`input.level`: give one of `level_pattern`, `level` and `level_field`, not both `level_pattern` and `level`",
            ),
            (
                "format = \"text\"\nlevel = \"\"",
                "`input.level`: must not be empty",
            ),
            (
                "format = \"text\"\nlevel_field = \"level\"",
                "`input.level_field`: with format = \"text\" the level field is a logfmt key",
            ),
            (
                "format = \"text\"\nlogfmt = true\nlevel_field = [\"log\", \"level\"]",
                "`input.level_field`: a logfmt key is one key",
            ),
            (
                "format = \"auto\"\nlevel_map = { W = \"\" }",
                "`input.level_map.W`: names and levels must not be empty",
            ),
            // OTLP requests carry their severity: nothing to map or find.
            (
                "format = \"otlp_proto\"\nlevel_map = { W = \"warning\" }",
                "`input.level_map`: is read with input.format = \"auto\" or \"text\" only",
            ),
            (
                "format = \"otlp_json\"\nlevel_field = \"severity\"",
                "`input.level_field`: is read with input.format = \"auto\" or \"text\" only",
            ),
            (
                "format = \"otlp_proto\"\nlogfmt = true",
                "`input.logfmt`: is read with input.format = \"text\" only",
            ),
            ("format = \"otlp\"", "input.format"),
        ] {
            let err = error_of(&format!("{MINIMAL}\n[input]\n{input}\n"));
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        for (name, format) in [
            ("otlp_proto", crate::event::InputFormat::OtlpProto),
            ("otlp_json", crate::event::InputFormat::OtlpJson),
        ] {
            let otlp = load(&format!("{MINIMAL}\n[input]\nformat = \"{name}\"\n")).expect("valid");
            assert_eq!(otlp.input.format, format);
            assert!(otlp.input.decoder().expect("a decoder").splits());
        }
        let mapped = load(&format!(
            "{MINIMAL}\n[input]\nformat = \"auto\"\nlevel_field = [\"log.level\"]\nlevel_map = {{ W = \"warning\" }}\n"
        ))
        .expect("valid");
        assert_eq!(
            mapped.input.level_field,
            Some(FieldPath::Keys(vec!["log.level".into()]))
        );
        assert_eq!(
            mapped
                .input
                .decoder()
                .expect("a decoder")
                .decode_level(Some(br#"{"log.level":"W"}"#), usize::MAX),
            Ok(Level::new("warning"))
        );
        // The text format as configured: a pattern, a fixed level, a logfmt key (dotted: one
        // key), each through the level names.
        for (input, line, level) in [
            (
                "level_pattern = '^\\S+ (?P<level>[A-Z0-9]+) '\nlevel_map = { SEV1 = \"fatal\" }",
                "10:00:00 SEV1 down",
                "fatal",
            ),
            ("level = \"warn\"", "anything", "warning"),
            (
                "logfmt = true\nlevel_field = \"log.level\"",
                "log.level=ERR msg=x",
                "error",
            ),
        ] {
            let text = load(&format!("{MINIMAL}\n[input]\nformat = \"text\"\n{input}\n"))
                .unwrap_or_else(|err| panic!("{input}: {err}"));
            assert_eq!(
                text.input
                    .decoder()
                    .expect("a decoder")
                    .decode_level(Some(line.as_bytes()), usize::MAX),
                Ok(Level::new(level)),
                "{input}"
            );
        }
        assert_eq!(
            load(MINIMAL).expect("valid").input.unrouted,
            UnroutedPolicy::Ignore
        );
    }

    #[test]
    fn pipeline_limits_levels_and_input_are_checked_naming_the_key() {
        let with_pipeline = |lines: &str| {
            MINIMAL.replace("[[routes]]", &format!("[pipeline]\n{lines}\n[[routes]]"))
        };
        let cases = [
            (
                with_pipeline("drain_timeout_ms = 0"),
                "`pipeline.drain_timeout_ms`: 0 would abandon every in-flight record",
            ),
            (
                with_pipeline("max_in_flight_bytes = 1000"),
                "`pipeline.max_in_flight_bytes`",
            ),
            (
                with_pipeline("max_uncommitted_records = 1"),
                "`pipeline.max_uncommitted_records`",
            ),
            (
                with_pipeline("sink_batches_in_flight = 0"),
                "`pipeline.sink_batches_in_flight`",
            ),
            (
                MINIMAL.replace("levels = [\"error\"]", "levels = [\" error\"]"),
                "`routes[0].levels`: ` error` has spaces around it and would match no event: write `error`",
            ),
            (
                format!("{MINIMAL}\n[input]\ntombstones = \"drop\"\n"),
                "`input.tombstones` (line 12): unknown value `drop` (one of `skip`, `dead-letter`)",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&text);
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        let config = load(&format!(
            "{MINIMAL}\n[input]\ntombstones = \"dead-letter\"\n"
        ))
        .expect("valid");
        assert_eq!(config.input.tombstones, TombstonePolicy::DeadLetter);
        let defaults = load(MINIMAL).expect("valid");
        assert_eq!(defaults.input.tombstones, TombstonePolicy::Skip);
        assert_eq!(defaults.pipeline.max_in_flight_bytes, 64 << 20);
        assert_eq!(defaults.pipeline.max_uncommitted_records, 10_000);
        assert_eq!(defaults.pipeline.sink_batches_in_flight, 4);
        // Levels are matched without regard to case.
        let upper =
            load(&MINIMAL.replace("levels = [\"error\"]", "levels = [\"ERROR\"]")).expect("valid");
        assert_eq!(
            crate::event::Level::new(&upper.routes[0].levels[0]).as_str(),
            "error"
        );
    }
}
