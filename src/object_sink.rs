//! The object-store sink (`type = "object_store"`): a route's records archived as compressed
//! NDJSON objects (the original payloads, one compact line each) in S3 or an S3-compatible
//! store, GCS or Azure Blob, named
//! `<prefix>/<path>/<topic>+<partition>+<first offset>+<last offset>.ndjson.gz`.
//!
//! Every record in exactly one object, without transactions:
//! - The records of a partition reach one worker of the route (the router picks it by
//!   partition) and so one writer, in offset order. A record's offset is committed only once
//!   the object holding it is stored, and a partition's objects are uploaded one after the
//!   other.
//! - An object's boundaries depend only on its records: `max_records`, `max_bytes` (before
//!   compression), a change of directory (the `path` rendered from the record's Kafka
//!   timestamp: a new hour by default) and `max_age_ms` measured in record time. A replay after
//!   a crash draws the same boundaries, so it writes the same names with the same contents.
//! - Some cuts cannot depend on the records alone: a partition that went quiet
//!   (`idle_flush_ms` on the clock), a revoke or shutdown (what is held is stored and
//!   committed before the partition is let go), and the pipeline's in-flight bound (when
//!   three quarters of `max_in_flight_bytes` is held the open objects are closed, or the
//!   consumer would pause with every object waiting for records that cannot come). A replay of
//!   such objects would draw other boundaries. So a writer that is given a partition lists the
//!   objects of the partition in the directory of each record it replays, and a record inside
//!   the range of an object already stored is finished at once as stored; writing starts at the
//!   first record no object holds. Since a partition's objects are stored in order, nothing
//!   later than that record is stored either.
//!
//! The one gap, as in Kafka Connect's S3 sink: an instance that lost a partition and whose
//! upload was already under way may still complete it after the new owner listed the
//! directory. A writer uploads nothing of a partition whose revoke is over and gives up retries
//! for it, which keeps that window to the one request in flight.
//!
//! Uploads that fail are retried here (backoff up to 10 s), for as long as the partition is
//! owned: the records wait, their offsets stay uncommitted, and
//! `logbridge_object_store_upload_failures_total` counts the attempts.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{ObjectCompression, ObjectStoreSinkConfig, StoreKind};
use crate::record::{Fences, PartitionKey, Record};
use crate::shape::{Context, Template};
use crate::sink::{DeliveryFuture, Sink, SinkError, Started};

/// Longest wait between two attempts of an upload (or a listing) that fails.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a writer looks for idle objects, revokes and the in-flight bound.
const TICK: Duration = Duration::from_millis(100);

/// How full the pipeline's in-flight bytes are, for the sink to close its objects before the
/// consumer pauses for them.
#[derive(Clone)]
pub struct Pressure {
    /// `logbridge_in_flight_bytes`.
    pub gauge: prometheus::IntGauge,
    /// `pipeline.max_in_flight_bytes`.
    pub limit: usize,
}

impl Pressure {
    /// Whether three quarters of the bound is held.
    fn high(&self) -> bool {
        (self.gauge.get().max(0) as usize).saturating_mul(4) >= self.limit.saturating_mul(3)
    }
}

/// What a route's writers share: the store, where in it, and the object settings.
pub struct ObjectDestination {
    store: Arc<dyn ObjectStore>,
    /// The url's prefix inside the bucket ("" for none).
    prefix: String,
    path: Template,
    settings: ObjectStoreSinkConfig,
    route: Arc<str>,
    fences: Fences,
    pressure: Option<Pressure>,
}

impl ObjectDestination {
    /// The store of `config` (credentials from `options`, else the standard environment).
    pub fn new(
        config: &ObjectStoreSinkConfig,
        route: &str,
        fences: Fences,
        pressure: Option<Pressure>,
    ) -> anyhow::Result<Arc<ObjectDestination>> {
        let (kind, bucket, prefix) = config.location().map_err(anyhow::Error::msg)?;
        let options = config
            .options
            .iter()
            .map(|(name, value)| (name.clone(), value.to_string()));
        // The crate's own retries are few and short: this sink retries for as long as it owns
        // the partition, and counts and logs each failure, which the crate's hidden retries
        // (10, over up to 3 minutes, by default) would keep out of sight.
        let retry = object_store::RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(10),
            ..object_store::RetryConfig::default()
        };
        // Each store's builder: the standard environment, the bucket, the retries, then the
        // options by the store's own names (checked when the configuration was loaded).
        macro_rules! build {
            ($builder:expr, $what:literal) => {{
                let mut builder = $builder.with_retry(retry);
                for (name, value) in options {
                    builder = builder.with_config(name.parse().context($what)?, value);
                }
                Arc::new(builder.build()?) as Arc<dyn ObjectStore>
            }};
        }
        let store = match kind {
            StoreKind::S3 => build!(
                aws_profile(
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket),
                    &|name| std::env::var(name).ok(),
                ),
                "an s3 option"
            ),
            StoreKind::Gcs => build!(
                object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(&bucket),
                "a gcs option"
            ),
            StoreKind::Azure => build!(
                object_store::azure::MicrosoftAzureBuilder::from_env().with_container_name(&bucket),
                "an azure option"
            ),
            StoreKind::Local => {
                std::fs::create_dir_all(&bucket)
                    .with_context(|| format!("cannot create the directory {bucket}"))?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
                    &bucket,
                )?)
            }
        };
        ObjectDestination::with_store(store, prefix, config, route, fences, pressure)
    }

    /// The destination on `store` (the crate's in-memory store in the unit tests).
    fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        config: &ObjectStoreSinkConfig,
        route: &str,
        fences: Fences,
        pressure: Option<Pressure>,
    ) -> anyhow::Result<Arc<ObjectDestination>> {
        Ok(Arc::new(ObjectDestination {
            store,
            prefix,
            path: config
                .path_template("sink")
                .map_err(|err| anyhow::anyhow!("{err}"))?,
            settings: config.clone(),
            route: route.into(),
            fences,
            pressure,
        }))
    }

    /// Lists the top of the prefix (`check-config --connect`): what the store answered, or why
    /// it did not.
    pub async fn probe(&self) -> Result<String, String> {
        let at = (!self.prefix.is_empty()).then(|| StorePath::from(self.prefix.as_str()));
        match self.store.list_with_delimiter(at.as_ref()).await {
            Ok(listing) => Ok(format!(
                "reachable, listed {} objects and {} directories at the top of the prefix",
                listing.objects.len(),
                listing.common_prefixes.len()
            )),
            Err(err) => Err(format!("cannot list the prefix: {err}")),
        }
    }

    /// A writer for one worker of the route (spawned on the current runtime).
    pub fn sink(self: &Arc<Self>) -> ObjectSink {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (uploaded, uploads) = mpsc::unbounded_channel();
        let writer = Writer {
            destination: self.clone(),
            commands: receiver,
            uploaded,
            uploads,
            waiting: HashMap::new(),
            next_batch: 0,
            partitions: HashMap::new(),
        };
        tokio::spawn(writer.run());
        ObjectSink { commands }
    }

    /// The directory of objects holding records of `source` timestamped `timestamp_ms`.
    fn directory(&self, source: &PartitionKey, timestamp_ms: i64) -> Result<String, SinkError> {
        let ctx = Context {
            topic: source.topic.as_str(),
            partition: source.partition,
            offset: 0,
            timestamp_ms: Some(timestamp_ms),
            key: None,
            level: None,
            service: None,
        };
        let dir = self.path.render(None, &ctx).map_err(|err| {
            SinkError::permanent(err.reason(), format!("object directory: {err}"))
        })?;
        let dir = dir.trim_matches('/');
        Ok(match (self.prefix.is_empty(), dir.is_empty()) {
            (true, _) => dir.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{dir}", self.prefix),
        })
    }

    /// The name of the object of `source` holding offsets `first` to `last` in `dir`.
    fn object_path(&self, dir: &str, source: &PartitionKey, first: i64, last: i64) -> StorePath {
        let name = format!(
            "{}{first:020}+{last:020}.{}",
            name_prefix(source),
            self.settings.compression.extension()
        );
        if dir.is_empty() {
            StorePath::from(name)
        } else {
            StorePath::from(format!("{dir}/{name}"))
        }
    }
}

/// The shared AWS profile (`~/.aws/credentials` and `~/.aws/config`, or the files
/// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` name; profile `AWS_PROFILE`, else
/// `default`) where the environment has no keys, as the AWS tools read it: the environment first,
/// then the profile, then the instance's or container's role (the `object_store` crate's own
/// chain, which has no profiles). The configuration's `options` apply after this and win.
fn aws_profile(
    builder: object_store::aws::AmazonS3Builder,
    env: &dyn Fn(&str) -> Option<String>,
) -> object_store::aws::AmazonS3Builder {
    use object_store::aws::AmazonS3ConfigKey as Key;
    let home = env("HOME").unwrap_or_default();
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
    let read = |variable: &str, default: &str| {
        let path = env(variable).unwrap_or_else(|| format!("{home}/.aws/{default}"));
        std::fs::read_to_string(path).unwrap_or_default()
    };
    let mut builder = builder;
    if env("AWS_ACCESS_KEY_ID").is_none() {
        let credentials = ini_section(
            &read("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            &profile,
        );
        for (name, key) in [
            ("aws_access_key_id", Key::AccessKeyId),
            ("aws_secret_access_key", Key::SecretAccessKey),
            ("aws_session_token", Key::Token),
        ] {
            if let Some(value) = credentials.get(name) {
                builder = builder.with_config(key, value);
            }
        }
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        // In the config file a profile other than the default is `[profile name]`.
        let section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        if let Some(region) =
            ini_section(&read("AWS_CONFIG_FILE", "config"), &section).get("region")
        {
            builder = builder.with_config(Key::Region, region);
        }
    }
    builder
}

/// The `name = value` lines of section `[section]` of an INI text (comments `#` and `;`).
fn ini_section(text: &str, section: &str) -> HashMap<String, String> {
    let mut inside = false;
    let mut values = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((name, value)) = line.split_once('=') {
                values.insert(name.trim().to_string(), value.trim().to_string());
            }
        }
    }
    values
}

/// How every object name of `source` begins: `<topic>+<partition>+`. Kafka topic names have
/// no `+`, so the name says which partition it belongs to.
fn name_prefix(source: &PartitionKey) -> String {
    format!("{}+{}+", source.topic.as_str(), source.partition)
}

/// The first and last offset an object name of `source` gives, if it is one.
fn offsets_in_name(name: &str, source: &PartitionKey) -> Option<(i64, i64)> {
    let rest = name.strip_prefix(&name_prefix(source))?;
    let (first, rest) = rest.split_once('+')?;
    let last = rest.split('.').next()?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// One worker's handle on its writer.
pub struct ObjectSink {
    commands: mpsc::UnboundedSender<Command>,
}

enum Command {
    /// A batch's lines; the outcomes (one per line, in order) go back on `done`.
    Batch {
        lines: Vec<Line>,
        done: oneshot::Sender<Vec<Result<(), SinkError>>>,
    },
    /// Close every open object (the worker's input ended, or it waits for all it started).
    Flush,
}

/// What the writer needs of a record: the record itself stays with the worker.
struct Line {
    source: PartitionKey,
    generation: u64,
    offset: i64,
    /// The Kafka timestamp; 0 (the epoch) for a record without one, so that its directory
    /// never depends on when it was written.
    timestamp: i64,
    bytes: Vec<u8>,
    /// The record's bytes counted again against `pipeline.max_in_flight_bytes` while this copy
    /// waits for the writer (given back once it is in an object's compressed body): a writer
    /// slower than its worker makes the consumer pause instead of piling up copies.
    _charge: crate::record::Charge,
    /// What holding the record costs besides its payload and key (the record itself in the
    /// worker, its place in an object's waiters), counted until its object is stored: the
    /// in-flight bound counts payload bytes only, which for records that are held for long, as
    /// here, would let memory reach several times the bound with small events.
    held: crate::record::Charge,
}

/// Bytes of bookkeeping per record held until its object is stored: the record, its
/// allocation and its waiter entry.
const HELD_RECORD_BYTES: usize = std::mem::size_of::<Record>() + 64;

impl Line {
    fn of(record: &Record) -> Line {
        let mut bytes = Vec::with_capacity(record.payload().map_or(4, <[u8]>::len) + 1);
        crate::http_sink::write_payload(&mut bytes, record);
        bytes.push(b'\n');
        Line {
            source: record.source.clone(),
            generation: record.generation,
            offset: record.offset,
            timestamp: record.timestamp.unwrap_or(0),
            bytes,
            _charge: record.charge.again(),
            held: record.charge.resized(HELD_RECORD_BYTES),
        }
    }
}

impl Sink for ObjectSink {
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        let started = self.start(route, batch);
        Box::pin(async move {
            match started {
                Some(outcomes) => outcomes.await,
                None => Vec::new(),
            }
        })
    }

    fn start(&mut self, _route: &str, batch: &[Record]) -> Option<Started> {
        let (done, outcomes) = oneshot::channel();
        let lines = batch.iter().map(Line::of).collect();
        let count = batch.len();
        // The writer only stops when this handle is gone.
        let _ = self.commands.send(Command::Batch { lines, done });
        Some(Box::pin(async move {
            outcomes.await.unwrap_or_else(|_| {
                (0..count)
                    .map(|_| {
                        Err(SinkError::retryable(
                            "writer_gone",
                            "the object writer stopped",
                        ))
                    })
                    .collect()
            })
        }))
    }

    fn flush(&mut self) {
        let _ = self.commands.send(Command::Flush);
    }
}

/// Where a line's outcome goes: batch and position.
type Waiter = (u64, usize);

/// A batch whose outcomes are not all known.
struct Waiting {
    outcomes: Vec<Option<Result<(), SinkError>>>,
    left: usize,
    done: oneshot::Sender<Vec<Result<(), SinkError>>>,
}

/// The object a partition is filling.
struct Open {
    dir: String,
    first: i64,
    last: i64,
    first_timestamp: i64,
    records: usize,
    raw_bytes: usize,
    body: Body,
    waiters: Vec<Waiter>,
    /// The held records' bookkeeping charges, given back when the object's outcome is known.
    held: Vec<crate::record::Charge>,
    touched: Instant,
}

/// An object closed and waiting for (or in) its upload.
struct Closed {
    path: StorePath,
    body: Vec<u8>,
    records: usize,
    waiters: Vec<Waiter>,
    /// Given back when the object is dropped, its outcome known.
    _held: Vec<crate::record::Charge>,
    generation: u64,
}

/// A partition as one writer sees it.
#[derive(Default)]
struct PartitionState {
    generation: u64,
    /// While replaying after an assignment: the stored ranges of each directory listed so far.
    /// `None` once a record was found that no object holds.
    recovery: Option<HashMap<String, Vec<(i64, i64)>>>,
    open: Option<Open>,
    /// Closed objects in offset order; the first is being uploaded when `uploading`.
    queue: VecDeque<Closed>,
    uploading: bool,
}

/// An upload's end, reported to the writer.
struct Uploaded {
    source: PartitionKey,
    result: Result<(), SinkError>,
}

/// The actor behind a worker's object sink: owns the open objects of the partitions it is
/// given and uploads them.
struct Writer {
    destination: Arc<ObjectDestination>,
    commands: mpsc::UnboundedReceiver<Command>,
    uploaded: mpsc::UnboundedSender<Uploaded>,
    uploads: mpsc::UnboundedReceiver<Uploaded>,
    waiting: HashMap<u64, Waiting>,
    next_batch: u64,
    partitions: HashMap<PartitionKey, PartitionState>,
}

impl Writer {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        loop {
            tokio::select! {
                command = self.commands.recv(), if open => match command {
                    Some(Command::Batch { lines, done }) => self.take(lines, done).await,
                    Some(Command::Flush) => self.close_all("flush"),
                    None => {
                        // The worker is gone: what is open is stored all the same (its records
                        // are read again after a restart, and find it there).
                        open = false;
                        self.close_all("flush");
                    }
                },
                Some(uploaded) = self.uploads.recv() => self.finished(uploaded),
                _ = tick.tick() => self.on_tick(),
            }
            if !open && self.partitions.values().all(|p| p.queue.is_empty()) {
                return;
            }
        }
    }

    /// Files a batch's lines into their partitions' objects.
    async fn take(&mut self, lines: Vec<Line>, done: oneshot::Sender<Vec<Result<(), SinkError>>>) {
        let batch = self.next_batch;
        self.next_batch += 1;
        self.waiting.insert(
            batch,
            Waiting {
                outcomes: (0..lines.len()).map(|_| None).collect(),
                left: lines.len(),
                done,
            },
        );
        for (index, line) in lines.into_iter().enumerate() {
            self.file(line, (batch, index)).await;
        }
        self.check_done(batch);
        self.close_under_pressure();
    }

    /// Closes every open object when three quarters of the in-flight bound is held; whether
    /// it did.
    fn close_under_pressure(&mut self) -> bool {
        let high = self
            .destination
            .pressure
            .as_ref()
            .is_some_and(Pressure::high);
        if high {
            self.close_all("pressure");
        }
        high
    }

    /// Files one line: into the open object of its partition, or finished at once when an
    /// object already stored holds it (a replay).
    async fn file(&mut self, line: Line, waiter: Waiter) {
        let state = self.partitions.entry(line.source.clone()).or_default();
        if line.generation != state.generation {
            if line.generation < state.generation {
                // An older assignment's record reaching the writer late: not stored now.
                self.resolve(
                    &[waiter],
                    Err(SinkError::retryable(
                        "partition_revoked",
                        "the partition was assigned again",
                    )),
                );
                return;
            }
            // A new assignment: what the old one had open or queued and not started is
            // dropped (its records are read again by this assignment, which finds stored what
            // was stored).
            let keep = usize::from(state.uploading);
            let mut dropped: Vec<Waiter> = state
                .queue
                .drain(keep..)
                .flat_map(|closed| closed.waiters)
                .collect();
            if let Some(open) = state.open.take() {
                dropped.extend(open.waiters);
            }
            state.generation = line.generation;
            state.recovery = Some(HashMap::new());
            self.resolve(
                &dropped,
                Err(SinkError::retryable(
                    "partition_revoked",
                    "the partition was assigned again",
                )),
            );
        }
        // An older assignment's upload still under way: the listing below must see its
        // object if it is stored, so wait for it (it gives up once that revoke is over).
        while self.partitions.get(&line.source).is_some_and(|state| {
            state.uploading
                && state
                    .queue
                    .front()
                    .is_some_and(|c| c.generation < line.generation)
        }) {
            match self.uploads.recv().await {
                Some(uploaded) => self.finished(uploaded),
                None => break,
            }
        }
        let dir = match self.destination.directory(&line.source, line.timestamp) {
            Ok(dir) => dir,
            Err(err) => {
                self.resolve(&[waiter], Err(err));
                return;
            }
        };
        if self.already_stored(&line, &dir).await {
            crate::metrics::object_store_records()
                .with_label_values(&[&self.destination.route, "already_stored"])
                .inc();
            self.resolve(&[waiter], Ok(()));
            return;
        }
        self.append(line, dir, waiter);
    }

    /// While a partition replays: whether an object already stored holds `line` (listing the
    /// directory the first time it is needed). Ends the replay at the first line none holds.
    async fn already_stored(&mut self, line: &Line, dir: &str) -> bool {
        let Some(listed) = self
            .partitions
            .get(&line.source)
            .and_then(|state| state.recovery.as_ref())
            .map(|recovery| recovery.get(dir).cloned())
        else {
            return false;
        };
        let ranges = match listed {
            Some(ranges) => ranges,
            None => {
                let ranges = self.list(&line.source, line.generation, dir).await;
                if let Some(recovery) = self
                    .partitions
                    .get_mut(&line.source)
                    .and_then(|state| state.recovery.as_mut())
                {
                    recovery.insert(dir.to_string(), ranges.clone());
                }
                ranges
            }
        };
        let stored = ranges
            .iter()
            .any(|(first, last)| *first <= line.offset && line.offset <= *last);
        if !stored {
            if let Some(state) = self.partitions.get_mut(&line.source) {
                state.recovery = None;
            }
        }
        stored
    }

    /// The offset ranges of the objects of `source` stored in `dir`, retried until the store
    /// answers (or the partition is let go: then none, and its lines are dropped by the
    /// worker as revoked).
    async fn list(&self, source: &PartitionKey, generation: u64, dir: &str) -> Vec<(i64, i64)> {
        let destination = &self.destination;
        let at = (!dir.is_empty()).then(|| StorePath::from(dir));
        let mut backoff = Duration::from_millis(100);
        loop {
            match destination.store.list_with_delimiter(at.as_ref()).await {
                Ok(listing) => {
                    let ranges: Vec<(i64, i64)> = listing
                        .objects
                        .iter()
                        .filter_map(|object| {
                            object
                                .location
                                .filename()
                                .and_then(|name| offsets_in_name(name, source))
                        })
                        .collect();
                    if !ranges.is_empty() {
                        info!(
                            route = %destination.route,
                            partition = %source,
                            directory = dir,
                            objects = ranges.len(),
                            "objects of this partition already stored: records they hold are not written again"
                        );
                    }
                    return ranges;
                }
                Err(err) => {
                    crate::metrics::object_store_failures()
                        .with_label_values(&[&destination.route, "list"])
                        .inc();
                    warn!(route = %destination.route, directory = dir, error = %err, "cannot list the object store; retrying");
                    if destination.fences.is_released_at(source, generation) {
                        return Vec::new();
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Adds `line` to its partition's open object, closing that first where a boundary falls
    /// before it, and after it where the object is full.
    fn append(&mut self, line: Line, dir: String, waiter: Waiter) {
        let destination = self.destination.clone();
        let settings = &destination.settings;
        let source = line.source.clone();
        let state = self.partitions.get_mut(&source).expect("filed");
        let cut = state.open.as_ref().and_then(|open| {
            if open.dir != dir {
                Some("directory")
            } else if open.raw_bytes + line.bytes.len() > settings.max_bytes {
                Some("bytes")
            } else if line.timestamp.saturating_sub(open.first_timestamp)
                >= settings.max_age_ms as i64
            {
                Some("age")
            } else {
                None
            }
        });
        if let Some(cut) = cut {
            self.close(&source, cut);
        }
        let compression = settings.compression;
        let (max_records, max_bytes) = (settings.max_records, settings.max_bytes);
        let state = self.partitions.get_mut(&source).expect("filed");
        let open = state.open.get_or_insert_with(|| Open {
            dir,
            first: line.offset,
            last: line.offset,
            first_timestamp: line.timestamp,
            records: 0,
            raw_bytes: 0,
            body: Body::new(compression),
            waiters: Vec::new(),
            held: Vec::new(),
            touched: Instant::now(),
        });
        open.body.write(&line.bytes);
        open.last = line.offset;
        open.records += 1;
        open.raw_bytes += line.bytes.len();
        open.held.push(line.held);
        // The copy is in the compressed body now: its bytes (and charge) go.
        drop(line._charge);
        drop(line.bytes);
        open.waiters.push(waiter);
        open.touched = Instant::now();
        let full = if open.records >= max_records {
            Some("records")
        } else if open.raw_bytes >= max_bytes {
            Some("bytes")
        } else {
            None
        };
        if let Some(cut) = full {
            self.close(&source, cut);
        }
    }

    /// Finishes an open object's body and names it.
    fn seal(&self, source: &PartitionKey, open: Open, generation: u64, cut: &str) -> Closed {
        crate::metrics::object_store_objects()
            .with_label_values(&[&self.destination.route, cut])
            .inc();
        Closed {
            path: self
                .destination
                .object_path(&open.dir, source, open.first, open.last),
            body: open.body.finish(),
            records: open.records,
            waiters: open.waiters,
            _held: open.held,
            generation,
        }
    }

    /// Queues a closed object for upload, starting it if the partition has none under way.
    fn enqueue(&mut self, source: &PartitionKey, closed: Closed) {
        let state = self.partitions.get_mut(source).expect("filed");
        state.queue.push_back(closed);
        self.start_next(source);
    }

    /// Starts the upload of the partition's next object, if none is under way.
    fn start_next(&mut self, source: &PartitionKey) {
        let Some(state) = self.partitions.get_mut(source) else {
            return;
        };
        if state.uploading {
            return;
        }
        let Some(next) = state.queue.front() else {
            return;
        };
        state.uploading = true;
        let destination = self.destination.clone();
        let uploaded = self.uploaded.clone();
        let source = source.clone();
        let (path, body, generation) = (next.path.clone(), next.body.clone(), next.generation);
        tokio::spawn(async move {
            let result = upload(&destination, &source, generation, &path, body).await;
            let _ = uploaded.send(Uploaded { source, result });
        });
    }

    /// An upload ended: its records' outcomes are known; the partition's next object starts.
    fn finished(&mut self, uploaded: Uploaded) {
        let Some(state) = self.partitions.get_mut(&uploaded.source) else {
            return;
        };
        state.uploading = false;
        let Some(closed) = state.queue.pop_front() else {
            return;
        };
        if uploaded.result.is_ok() {
            let route = &self.destination.route;
            crate::metrics::object_store_records()
                .with_label_values(&[route, "stored"])
                .inc_by(closed.records as u64);
            crate::metrics::object_store_bytes()
                .with_label_values(&[route])
                .inc_by(closed.body.len() as u64);
        }
        self.resolve(&closed.waiters, uploaded.result);
        self.start_next(&uploaded.source);
    }

    /// Closes every open object (`cut` says why, for the metrics).
    fn close_all(&mut self, cut: &str) {
        let sources: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(_, state)| state.open.is_some())
            .map(|(source, _)| source.clone())
            .collect();
        for source in sources {
            self.close(&source, cut);
        }
    }

    fn close(&mut self, source: &PartitionKey, cut: &str) {
        let Some(state) = self.partitions.get_mut(source) else {
            return;
        };
        let generation = state.generation;
        if let Some(open) = state.open.take() {
            let closed = self.seal(source, open, generation, cut);
            self.enqueue(source, closed);
        }
    }

    /// Closes objects idle past `idle_flush_ms` and those of partitions being revoked; all of
    /// them at the in-flight bound.
    fn on_tick(&mut self) {
        if self.close_under_pressure() {
            return;
        }
        let idle = Duration::from_millis(self.destination.settings.idle_flush_ms);
        let fences = &self.destination.fences;
        let due: Vec<(PartitionKey, &'static str)> = self
            .partitions
            .iter()
            .filter_map(|(source, state)| {
                let open = state.open.as_ref()?;
                if fences.is_revoking(source, state.generation) {
                    Some((source.clone(), "revoke"))
                } else if open.touched.elapsed() >= idle {
                    Some((source.clone(), "idle"))
                } else {
                    None
                }
            })
            .collect();
        for (source, cut) in due {
            self.close(&source, cut);
        }
    }

    /// Sets the outcome of each of `waiters`.
    fn resolve(&mut self, waiters: &[Waiter], result: Result<(), SinkError>) {
        let mut batches = Vec::new();
        for &(batch, index) in waiters {
            if let Some(waiting) = self.waiting.get_mut(&batch) {
                if waiting.outcomes[index].is_none() {
                    waiting.outcomes[index] = Some(result.clone());
                    waiting.left -= 1;
                }
                if batches.last() != Some(&batch) {
                    batches.push(batch);
                }
            }
        }
        for batch in batches {
            self.check_done(batch);
        }
    }

    /// Sends a batch's outcomes once all are known.
    fn check_done(&mut self, batch: u64) {
        if self.waiting.get(&batch).is_some_and(|w| w.left == 0) {
            let waiting = self.waiting.remove(&batch).expect("present");
            let outcomes = waiting
                .outcomes
                .into_iter()
                .map(|outcome| outcome.expect("every outcome known"))
                .collect();
            let _ = waiting.done.send(outcomes);
        }
    }
}

/// Stores one object, retrying until it is stored or the partition is let go.
async fn upload(
    destination: &ObjectDestination,
    source: &PartitionKey,
    generation: u64,
    path: &StorePath,
    body: Vec<u8>,
) -> Result<(), SinkError> {
    let mut backoff = Duration::from_millis(100);
    let body = bytes::Bytes::from(body);
    loop {
        if destination.fences.is_released_at(source, generation) {
            return Err(SinkError::retryable(
                "partition_revoked",
                "the partition's revoke is over: its next owner writes this object",
            ));
        }
        let attempt = if body.len() <= destination.settings.part_bytes {
            destination
                .store
                .put(path, body.clone().into())
                .await
                .map(|_| ())
        } else {
            put_in_parts(destination, path, &body).await
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(err) => {
                crate::metrics::object_store_failures()
                    .with_label_values(&[&destination.route, "upload"])
                    .inc();
                warn!(route = %destination.route, object = %path, error = %err, "cannot store an object; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A multipart upload in `part_bytes` parts (aborted if a part fails, so no parts are left).
async fn put_in_parts(
    destination: &ObjectDestination,
    path: &StorePath,
    body: &bytes::Bytes,
) -> object_store::Result<()> {
    let upload = destination.store.put_multipart(path).await?;
    let mut writer =
        object_store::WriteMultipart::new_with_chunk_size(upload, destination.settings.part_bytes);
    writer.write(body);
    match writer.finish().await {
        Ok(_) => Ok(()),
        Err(err) => Err(err),
    }
}

/// An object's body as it is written: compressed as it grows.
enum Body {
    Plain(Vec<u8>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Body {
    fn new(compression: ObjectCompression) -> Body {
        match compression {
            ObjectCompression::None => Body::Plain(Vec::new()),
            ObjectCompression::Gzip => Body::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::default(),
            )),
            ObjectCompression::Zstd => match zstd::stream::write::Encoder::new(Vec::new(), 3) {
                Ok(encoder) => Body::Zstd(encoder),
                // Only an allocation failure inside zstd: store it uncompressed rather than not.
                Err(_) => Body::Plain(Vec::new()),
            },
        }
    }

    /// Writing into memory cannot fail.
    fn write(&mut self, bytes: &[u8]) {
        let _ = match self {
            Body::Plain(out) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
            Body::Gzip(encoder) => encoder.write_all(bytes),
            Body::Zstd(encoder) => encoder.write_all(bytes),
        };
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Body::Plain(out) => out,
            Body::Gzip(encoder) => encoder.finish().unwrap_or_default(),
            Body::Zstd(encoder) => encoder.finish().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    /// Every record 10:00 UTC on 2026-12-03 plus `minutes`.
    fn record(generation: u64, offset: i64, minutes: i64) -> Record {
        let payload = format!(r#"{{"level":"error","message":"m","id":{offset}}}"#);
        let mut record = test_record(0, offset, None, Some(payload.as_bytes()));
        record.generation = generation;
        record.timestamp = Some(1_796_292_000_000 + minutes * 60_000);
        record
    }

    fn destination(
        store: &Arc<object_store::memory::InMemory>,
        settings: &str,
        fences: &Fences,
    ) -> Arc<ObjectDestination> {
        let config: ObjectStoreSinkConfig = toml::from_str(&format!(
            "url = \"s3://bucket/archive\"\ncompression = \"none\"\n{settings}"
        ))
        .expect("settings");
        ObjectDestination::with_store(
            store.clone(),
            "archive".into(),
            &config,
            "route",
            fences.clone(),
            None,
        )
        .expect("destination")
    }

    /// The names stored, sorted, and the ids of each object's lines.
    async fn stored(store: &object_store::memory::InMemory) -> Vec<(String, Vec<i64>)> {
        use futures_util_free::collect_list;
        let mut objects = Vec::new();
        for location in collect_list(store).await {
            let body = store
                .get(&location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            let ids = body
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| {
                    let value: serde_json::Value = serde_json::from_slice(line).expect("json");
                    value["id"].as_i64().expect("id")
                })
                .collect();
            objects.push((location.to_string(), ids));
        }
        objects.sort();
        objects
    }

    mod futures_util_free {
        use object_store::path::Path;
        use object_store::ObjectStore;

        /// Every object of the store (recursing through the listing by directory).
        pub async fn collect_list(store: &object_store::memory::InMemory) -> Vec<Path> {
            let mut found = Vec::new();
            let mut dirs = vec![None];
            while let Some(dir) = dirs.pop() {
                let listing: object_store::ListResult =
                    store.list_with_delimiter(dir.as_ref()).await.expect("list");
                found.extend(listing.objects.into_iter().map(|object| object.location));
                dirs.extend(listing.common_prefixes.into_iter().map(Some));
            }
            found
        }
    }

    async fn settled(outcomes: Started) -> Vec<Result<(), SinkError>> {
        tokio::time::timeout(Duration::from_secs(5), outcomes)
            .await
            .expect("outcomes within 5 s")
    }

    fn name(dir_hour: &str, first: i64, last: i64) -> String {
        format!("archive/logs/dt=2026-12-03/hour={dir_hour}/logs+0+{first:020}+{last:020}.ndjson")
    }

    #[tokio::test]
    async fn boundaries_fall_by_record_count_hour_and_record_age_and_acks_wait_for_the_upload() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let fences = Fences::default();
        let destination = destination(
            &store,
            "max_records = 3\nmax_age_ms = 1200000\nidle_flush_ms = 600000",
            &fences,
        );
        let mut sink = destination.sink();
        // 10:00, 10:01: the object is open, nothing is acked.
        let mut first = sink
            .start("route", &[record(1, 0, 0), record(1, 1, 1)])
            .expect("started");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            futures_poll_once(&mut first).await.is_none(),
            "no ack before the object is stored"
        );
        assert!(stored(&store).await.is_empty());
        // 10:02 fills it (3 records); 10:30 is past max_age of 10:03's object; 11:05 is a new
        // hour; 11:06 and 11:07 fill that one.
        let second = sink
            .start(
                "route",
                &[
                    record(1, 2, 2),
                    record(1, 3, 3),
                    record(1, 4, 30),
                    record(1, 5, 65),
                    record(1, 6, 66),
                    record(1, 7, 67),
                ],
            )
            .expect("started");
        assert!(settled(Box::pin(first)).await.iter().all(Result::is_ok));
        // Records 4 (10:30, alone in its object until another comes) and later: 5..7 stored,
        // 4's object closed by the hour change.
        assert!(settled(second).await.iter().all(Result::is_ok));
        assert_eq!(
            stored(&store).await,
            vec![
                (name("10", 0, 2), vec![0, 1, 2]),
                (name("10", 3, 3), vec![3]),
                (name("10", 4, 4), vec![4]),
                (name("11", 5, 7), vec![5, 6, 7]),
            ]
        );
    }

    /// Polls a future once: its output if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(
        future: &mut F,
    ) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(future).poll(&mut cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_replay_after_a_timing_cut_finds_what_was_stored_and_writes_each_record_once() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let fences = Fences::default();
        let settings = "max_records = 4\nidle_flush_ms = 600000";
        // Assignment 1: records 0..=5; 0..=3 fill an object, 4 and 5 are stored by a flush (a
        // cut that depends on timing, as a shutdown, a revoke or the in-flight bound makes).
        let mut sink = destination(&store, settings, &fences).sink();
        let batch: Vec<Record> = (0..6).map(|offset| record(1, offset, 0)).collect();
        let outcomes = sink.start("route", &batch).expect("started");
        sink.flush();
        assert!(settled(outcomes).await.iter().all(Result::is_ok));
        // Its offsets were never committed (a crash): a new writer replays from 0 to 9.
        let mut replay = destination(&store, settings, &fences).sink();
        let batch: Vec<Record> = (0..10).map(|offset| record(2, offset, 0)).collect();
        let outcomes = replay.start("route", &batch).expect("started");
        assert!(settled(outcomes).await.iter().all(Result::is_ok));
        // Boundaries drawn afresh would have been 0..=3 and 4..=7: 4 and 5 twice.
        assert_eq!(
            stored(&store).await,
            vec![
                (name("10", 0, 3), vec![0, 1, 2, 3]),
                (name("10", 4, 5), vec![4, 5]),
                (name("10", 6, 9), vec![6, 7, 8, 9]),
            ]
        );
        assert_eq!(
            crate::metrics::object_store_records()
                .with_label_values(&["route", "already_stored"])
                .get(),
            6
        );
    }

    #[tokio::test]
    async fn nothing_is_uploaded_for_a_partition_whose_revoke_is_over() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let fences = Fences::default();
        let mut sink = destination(&store, "max_records = 100", &fences).sink();
        let outcomes = sink
            .start("route", &[record(1, 0, 0), record(1, 1, 0)])
            .expect("started");
        let source = record(1, 0, 0).source;
        fences.revoke(&source, 1);
        fences.release(&source, 1);
        sink.flush();
        let outcomes = settled(outcomes).await;
        assert!(
            outcomes.iter().all(|outcome| outcome
                .as_ref()
                .is_err_and(|err| err.reason == "partition_revoked")),
            "{outcomes:?}"
        );
        assert!(stored(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_large_object_goes_up_in_parts_and_zstd_objects_read_back() {
        for (compression, extension) in [("none", "ndjson"), ("zstd", "ndjson.zst")] {
            let store = Arc::new(object_store::memory::InMemory::new());
            let fences = Fences::default();
            let config: ObjectStoreSinkConfig = toml::from_str(&format!(
                "url = \"s3://bucket/archive\"\ncompression = \"{compression}\"\n\
                 max_bytes = 16777216\nmax_records = 100000\npart_bytes = 5242880"
            ))
            .expect("settings");
            let destination = ObjectDestination::with_store(
                store.clone(),
                "archive".into(),
                &config,
                "route",
                fences,
                None,
            )
            .expect("destination");
            let mut sink = destination.sink();
            // 6 000 records of about 1 KiB: 6 MiB of NDJSON, more than one 5 MiB part uncompressed.
            let filler = "x".repeat(1000);
            let batch: Vec<Record> = (0..6000)
                .map(|offset| {
                    let payload =
                        format!(r#"{{"level":"error","message":"{filler}","id":{offset}}}"#);
                    let mut record = test_record(0, offset, None, Some(payload.as_bytes()));
                    record.timestamp = Some(1_796_292_000_000);
                    record
                })
                .collect();
            let outcomes = sink.start("route", &batch).expect("started");
            sink.flush();
            assert!(settled(outcomes).await.iter().all(Result::is_ok));
            let path = StorePath::from(format!(
                "archive/logs/dt=2026-12-03/hour=10/logs+0+{:020}+{:020}.{extension}",
                0, 5999
            ));
            let body = store
                .get(&path)
                .await
                .expect("the object")
                .bytes()
                .await
                .expect("bytes");
            if compression == "none" {
                assert!(
                    body.len() > 5 << 20,
                    "a multipart upload: {} bytes",
                    body.len()
                );
            }
            let text = match compression {
                "zstd" => zstd::decode_all(&body[..]).expect("zstd"),
                _ => body.to_vec(),
            };
            let ids: Vec<i64> = text
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| {
                    serde_json::from_slice::<serde_json::Value>(line).expect("json")["id"]
                        .as_i64()
                        .expect("id")
                })
                .collect();
            assert_eq!(ids, (0..6000).collect::<Vec<i64>>(), "{compression}");
        }
    }

    #[test]
    fn the_aws_profile_gives_keys_and_region_where_the_environment_has_none() {
        use object_store::aws::AmazonS3ConfigKey as Key;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("credentials"),
            "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n\
             # a comment\n[archive]\naws_access_key_id = AKIAARCHIVE\n\
             aws_secret_access_key = s3cret\naws_session_token = tok\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("config"),
            "[default]\nregion = us-east-1\n[profile archive]\nregion = eu-west-3\n",
        )
        .expect("write");
        let home = dir.path().to_str().expect("utf-8").to_string();
        let files = std::collections::HashMap::from([
            ("AWS_SHARED_CREDENTIALS_FILE", format!("{home}/credentials")),
            ("AWS_CONFIG_FILE", format!("{home}/config")),
        ]);
        let with = |extra: &[(&'static str, &str)]| {
            let mut env = files.clone();
            for (name, value) in extra {
                env.insert(name, value.to_string());
            }
            aws_profile(object_store::aws::AmazonS3Builder::new(), &move |name| {
                env.get(name).cloned()
            })
        };
        let named = with(&[("AWS_PROFILE", "archive")]);
        assert_eq!(
            named.get_config_value(&Key::AccessKeyId).as_deref(),
            Some("AKIAARCHIVE")
        );
        assert_eq!(named.get_config_value(&Key::Token).as_deref(), Some("tok"));
        assert_eq!(
            named.get_config_value(&Key::Region).as_deref(),
            Some("eu-west-3")
        );
        let default = with(&[]);
        assert_eq!(
            default.get_config_value(&Key::AccessKeyId).as_deref(),
            Some("AKIADEFAULT")
        );
        assert_eq!(
            default.get_config_value(&Key::Region).as_deref(),
            Some("us-east-1")
        );
        // Keys in the environment win over the profile (the builder read them from there).
        let from_env = with(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_REGION", "ap-south-1"),
        ]);
        assert_eq!(from_env.get_config_value(&Key::AccessKeyId), None);
        assert_eq!(from_env.get_config_value(&Key::Region), None);
    }

    #[test]
    fn names_carry_the_partition_and_offsets_and_parse_back() {
        let source = PartitionKey {
            topic: crate::record::Topic::new("app-logs"),
            partition: 7,
        };
        let name = "app-logs+7+00000000000000000100+00000000000000000199.ndjson.gz";
        assert_eq!(offsets_in_name(name, &source), Some((100, 199)));
        let other = PartitionKey {
            topic: crate::record::Topic::new("app-logs"),
            partition: 17,
        };
        assert_eq!(offsets_in_name(name, &other), None);
        assert_eq!(offsets_in_name("app-logs+7+x+1.ndjson", &source), None);
    }
}
