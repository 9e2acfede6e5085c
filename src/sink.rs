//! Sinks: where a route's workers deliver records. A worker hands its sink a batch and acks each
//! record only after the sink has said how that record fared.
//!
//! Output lines (file and stdout) are JSON, one per record:
//! `{"topic":"logs","partition":0,"offset":42,"key":"k1","route":"errors","event":{...}}`
//! where `event` is the original payload, byte for byte except that a leading BOM and any
//! whitespace outside strings (which would break JSON lines) are left out.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tracing::warn;

use crate::config::{Cluster, RouteConfig, SinkConfig, DEFAULT_FILE_MAX_FILES};
use crate::producer::{headers, headers_for, own_headers, Outgoing, Producer};
use crate::record::Record;

/// Why a sink could not deliver a record: retryable or permanent, with a short reason.
pub type SinkError = crate::producer::DeliveryError;

/// A future returned by a sink: one outcome per record of the batch, in batch order.
pub type DeliveryFuture<'a> = Pin<Box<dyn Future<Output = Vec<Result<(), SinkError>>> + Send + 'a>>;

/// The outcomes of a batch already sent ([`Sink::start`]): borrows neither the sink nor the batch.
pub type Started = Pin<Box<dyn Future<Output = Vec<Result<(), SinkError>>> + Send + 'static>>;

/// A destination for records. Each worker owns one sink value.
pub trait Sink: Send {
    /// Delivers a batch; the result has exactly one outcome per record.
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a>;

    /// For sinks that can have several batches in flight: sends `batch` now, after every batch
    /// started before it, and returns its outcomes (one per record, in batch order) as a future
    /// that borrows nothing, so the worker can start the next batch before this one is
    /// reported (the Kafka sink: the idempotent producer keeps what it sent in order). `None`,
    /// the default: the sink takes one batch at a time, through [`Sink::deliver`].
    fn start(&mut self, _route: &str, _batch: &[Record]) -> Option<Started> {
        None
    }

    /// The worker takes no more records for now (its input ended) or waits for everything it
    /// started: a sink that holds records until more come (the object store's open objects)
    /// finishes what it holds. Others have nothing to do.
    fn flush(&mut self) {}

    /// The file this sink appends to, if it writes one: the pipeline reopens it on SIGHUP
    /// ([`SharedFile::reopen`]).
    fn file(&self) -> Option<Arc<SharedFile>> {
        None
    }

    /// The files this sink appends to when its path is a template: the pipeline reopens
    /// those open at SIGHUP.
    fn file_set(&self) -> Option<Arc<FileSet>> {
        None
    }
}

/// What the pipeline hands a sink factory besides the route.
#[derive(Clone, Default)]
pub struct SinkLinks {
    /// The instance's transactional producer (`delivery = "exactly-once"`): every Kafka sink
    /// sends on it, so that its records are in the transaction that commits their offsets.
    pub transactional: Option<Producer>,
    /// The pipeline's fences: the object-store sink closes the objects of a partition being
    /// revoked and uploads nothing of one whose revoke is over.
    pub fences: crate::record::Fences,
    /// How full `pipeline.max_in_flight_bytes` is (the object-store sink closes its objects
    /// before it is reached).
    pub pressure: Option<crate::object_sink::Pressure>,
}

/// Builds the sink of worker `index` of a route. Tests and embedders can supply their own.
pub type SinkFactory =
    Arc<dyn Fn(&RouteConfig, usize, &SinkLinks) -> anyhow::Result<Box<dyn Sink>> + Send + Sync>;

/// The factory for the sinks named in the configuration. Workers of one route that write to the
/// same file share one append-mode handle.
pub fn config_sink_factory() -> SinkFactory {
    let files: Shared<PathBuf, Arc<SharedFile>> = Shared::default();
    // One set of files per route with a templated path.
    let file_sets: Shared<String, Arc<FileSet>> = Shared::default();
    // One producer per route, shared by its workers (a producer is thread-safe and batches
    // better when shared).
    let producers: Shared<String, Producer> = Shared::default();
    // One HTTP client (connection pool) per route, shared by its workers.
    let endpoints: Shared<String, crate::http_sink::HttpEndpoint> = Shared::default();
    // One object-store client per route, shared by its workers.
    let stores: Shared<String, Arc<crate::object_sink::ObjectDestination>> = Shared::default();
    Arc::new(
        move |route: &RouteConfig, _index: usize, links: &SinkLinks| {
            let sink: Box<dyn Sink> = match &route.sink {
                SinkConfig::Null => Box::new(NullSink),
                SinkConfig::Kafka {
                    topic,
                    brokers,
                    security,
                    options,
                    keep_timestamp,
                    keep_headers,
                } => {
                    let brokers = brokers.as_deref().ok_or_else(|| {
                        anyhow::anyhow!("route `{}`: kafka sink brokers not resolved", route.name)
                    })?;
                    let producer = match &links.transactional {
                        Some(producer) => producer.clone(),
                        None => producers.get_or_make(&route.name, || {
                            crate::producer::create(
                                Cluster {
                                    brokers,
                                    security: security.as_ref(),
                                    options,
                                },
                                "sink producer",
                            )
                        })?,
                    };
                    Box::new(KafkaSink {
                        producer,
                        topic: topic.clone(),
                        keep_timestamp: *keep_timestamp,
                        keep_headers: *keep_headers,
                    })
                }
                SinkConfig::Http(_)
                | SinkConfig::Elasticsearch(_)
                | SinkConfig::Loki(_)
                | SinkConfig::Otlp(_) => {
                    let endpoint = endpoints.get_or_make(&route.name, || {
                        let (http, destination) = route.sink.http().context("an http sink")?;
                        crate::http_sink::HttpEndpoint::new(http, destination)
                            .with_context(|| format!("route `{}`", route.name))
                    })?;
                    Box::new(endpoint.sink())
                }
                SinkConfig::ObjectStore(store) => {
                    // The route's writers share the store's client.
                    let destination = stores.get_or_make(&route.name, || {
                        crate::object_sink::ObjectDestination::new(
                            store,
                            &route.name,
                            links.fences.clone(),
                            links.pressure.clone(),
                        )
                        .with_context(|| format!("route `{}`", route.name))
                    })?;
                    Box::new(destination.sink())
                }
                SinkConfig::Stdout => Box::new(LineSink::new(LineTarget::stdout())),
                SinkConfig::File {
                    path,
                    fsync,
                    max_bytes,
                    max_files,
                } => {
                    let rotation = max_bytes.map(|max_bytes| Rotation {
                        max_bytes,
                        max_files: max_files.unwrap_or(DEFAULT_FILE_MAX_FILES),
                    });
                    if route.sink.destination_template().is_some() {
                        // Each record's path is rendered by its worker; the route's workers
                        // share the files.
                        let set = file_sets.get_or_make(&route.name, || {
                            Ok(Arc::new(FileSet::new(*fsync, rotation)))
                        })?;
                        Box::new(LineSink::new(LineTarget::Files(set)))
                    } else {
                        let file = files.get_or_make(path, || {
                            SharedFile::open(path, *fsync, rotation).map(Arc::new)
                        })?;
                        Box::new(LineSink::new(LineTarget::File(file)))
                    }
                }
            };
            Ok(sink)
        },
    )
}

/// What the sinks of a factory share by key (a route's producer or HTTP client, a file by
/// path): made by the first sink that needs it, cloned for the others.
struct Shared<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for Shared<K, V> {
    fn default() -> Self {
        Shared(Mutex::new(HashMap::new()))
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Shared<K, V> {
    fn get_or_make(&self, key: &K, make: impl FnOnce() -> anyhow::Result<V>) -> anyhow::Result<V> {
        let mut shared = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("sink factory lock poisoned"))?;
        if let Some(value) = shared.get(key) {
            return Ok(value.clone());
        }
        let value = make()?;
        shared.insert(key.clone(), value.clone());
        Ok(value)
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create directory {}", parent.display()))?;
    }
    open_file(path).with_context(|| format!("failed to open sink file {}", path.display()))
}

/// Opens `path` for appending, creating it (its directory exists: it was there at start-up).
fn open_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Produces each record to a Kafka topic: original key and payload, the original headers
/// (unless `keep_headers = false`) plus `logbridge.source.*` and `logbridge.route`, and the
/// original timestamp (unless `keep_timestamp = false`). A record's outcome is its delivery
/// report from the (idempotent) producer.
pub struct KafkaSink {
    producer: Producer,
    topic: String,
    keep_timestamp: bool,
    keep_headers: bool,
}

impl KafkaSink {
    /// What is sent for each record: the original payload, byte for byte, with the headers and
    /// timestamp the sink keeps.
    fn outgoing<'a>(
        route: &'a str,
        batch: &'a [Record],
        keep_timestamp: bool,
        keep_headers: bool,
    ) -> impl Iterator<Item = Outgoing<'a>> {
        batch.iter().map(move |record| {
            let ours: [(&str, &[u8]); 1] = [(headers::ROUTE, route.as_bytes())];
            let headers = if keep_headers {
                headers_for(record, &ours)
            } else {
                own_headers(record, &ours)
            };
            Outgoing {
                record,
                value: record.payload(),
                headers,
                timestamp: if keep_timestamp {
                    record.timestamp
                } else {
                    None
                },
                topic: record.destination.as_deref(),
            }
        })
    }
}

impl Sink for KafkaSink {
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        let templated = templated(batch);
        Box::pin(async move {
            let outcomes = crate::producer::send_all(
                &self.producer,
                &self.topic,
                Self::outgoing(route, batch, self.keep_timestamp, self.keep_headers),
            )
            .await;
            refuse_unknown_topics(outcomes, &templated)
        })
    }

    fn start(&mut self, route: &str, batch: &[Record]) -> Option<Started> {
        let templated = templated(batch);
        let outcomes = crate::producer::send_now(
            &self.producer,
            &self.topic,
            Self::outgoing(route, batch, self.keep_timestamp, self.keep_headers),
        );
        Some(Box::pin(async move {
            refuse_unknown_topics(outcomes.await, &templated)
        }))
    }
}

/// Which records of `batch` go to a topic a template named.
fn templated(batch: &[Record]) -> Vec<bool> {
    batch
        .iter()
        .map(|record| record.destination.is_some())
        .collect()
}

/// A topic a template named from the record (`logs-{service}`) that does not exist will not
/// come to exist by retrying, and retrying would hold the partition behind one odd value: such
/// a record is refused (dead-lettered, reason `unknown_topic`). A configured topic that does
/// not exist stays retryable: an operator creates it, and the records wait in Kafka.
fn refuse_unknown_topics(
    outcomes: Vec<Result<(), SinkError>>,
    templated: &[bool],
) -> Vec<Result<(), SinkError>> {
    outcomes
        .into_iter()
        .zip(templated.iter().chain(std::iter::repeat(&false)))
        .map(|(outcome, &templated)| match outcome {
            Err(err) if templated && err.reason == crate::producer::UNKNOWN_TOPIC => Err(
                SinkError::permanent(crate::producer::UNKNOWN_TOPIC, err.message),
            ),
            other => other,
        })
        .collect()
}

/// Discards records (for benchmarks).
pub struct NullSink;

impl Sink for NullSink {
    fn deliver<'a>(&'a mut self, _route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        Box::pin(std::future::ready(vec![Ok(()); batch.len()]))
    }
}

/// The files of a route whose `path` is a template: one per path rendered from its records
/// (by the route's workers, into [`Record::destination`]), each opened on first use and kept
/// open. How many there can be is bounded where the paths are rendered (the route's
/// `max_destinations`).
pub struct FileSet {
    fsync: bool,
    rotation: Option<Rotation>,
    open: Mutex<rustc_hash::FxHashMap<PathBuf, Arc<SharedFile>>>,
}

impl FileSet {
    /// A set whose files sync each batch (`fsync`) and rotate as `rotation` says.
    pub fn new(fsync: bool, rotation: Option<Rotation>) -> FileSet {
        FileSet {
            fsync,
            rotation,
            open: Mutex::default(),
        }
    }

    /// The file at `path`, opened (with its directories) if it is not open yet.
    fn file(&self, path: &Path) -> std::io::Result<Arc<SharedFile>> {
        let mut open = lock(&self.open);
        if let Some(file) = open.get(path) {
            return Ok(file.clone());
        }
        let file = SharedFile::open(path, self.fsync, self.rotation)
            .map(Arc::new)
            .map_err(|err| std::io::Error::other(format!("{err:#}")))?;
        open.insert(path.to_path_buf(), file.clone());
        Ok(file)
    }

    /// The files open now.
    pub fn files(&self) -> Vec<Arc<SharedFile>> {
        lock(&self.open).values().cloned().collect()
    }

    /// Appends each record's line to the file its destination names; one outcome per record.
    fn append(&self, route: &str, batch: &[Record]) -> Vec<Result<(), SinkError>> {
        let mut by_path: Vec<(&str, Vec<u8>, Vec<usize>)> = Vec::new();
        let mut outcomes = vec![Ok(()); batch.len()];
        for (index, record) in batch.iter().enumerate() {
            let Some(path) = record.destination.as_deref() else {
                outcomes[index] = Err(SinkError::permanent(
                    "no_destination",
                    "the record's file path was not rendered",
                ));
                continue;
            };
            let at = match by_path.iter().position(|(known, _, _)| *known == path) {
                Some(at) => at,
                None => {
                    by_path.push((path, Vec::new(), Vec::new()));
                    by_path.len() - 1
                }
            };
            let (_, lines, indexes) = &mut by_path[at];
            write_line(lines, route, record);
            indexes.push(index);
        }
        for (path, lines, indexes) in by_path {
            let written = self
                .file(Path::new(path))
                .and_then(|file| file.append(&lines))
                .map_err(|err| SinkError::retryable("io_error", err.to_string()));
            for index in indexes {
                outcomes[index] = written.clone();
            }
        }
        outcomes
    }
}

/// Where a [`LineSink`] writes.
#[derive(Clone)]
pub enum LineTarget {
    /// An append-mode file shared by a route's workers.
    File(Arc<SharedFile>),
    /// The files a route's templated path names, shared by its workers.
    Files(Arc<FileSet>),
    /// Standard output.
    Stdout(Arc<Mutex<WholeLines<std::io::Stdout>>>),
}

impl LineTarget {
    /// Standard output, shared by every stdout sink of the process.
    pub fn stdout() -> LineTarget {
        static STDOUT: std::sync::OnceLock<Arc<Mutex<WholeLines<std::io::Stdout>>>> =
            std::sync::OnceLock::new();
        LineTarget::Stdout(
            STDOUT
                .get_or_init(|| Arc::new(Mutex::new(WholeLines::new(std::io::stdout()))))
                .clone(),
        )
    }

    fn write_lines(&self, lines: &[u8]) -> std::io::Result<()> {
        match self {
            LineTarget::File(file) => file.append(lines),
            LineTarget::Stdout(out) => lock(out).write_lines(lines),
            // Written per record, by `FileSet::append`.
            LineTarget::Files(_) => Err(std::io::Error::other("a file set is written per record")),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The writers keep their state consistent between calls (a failed write is accounted for
    // before it returns); a panic elsewhere cannot break it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Something lines are written to: standard output, or a file that can also be cut back and
/// synced.
pub trait LineOutput: Write {
    /// Length of what was written so far, where it can be cut back to it.
    fn position(&mut self) -> Option<u64> {
        None
    }
    /// Cuts what was written back to `position`.
    fn cut_back(&mut self, _position: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("cannot cut back"))
    }
}

impl LineOutput for std::io::Stdout {}

impl LineOutput for File {
    fn position(&mut self) -> Option<u64> {
        self.metadata().ok().map(|metadata| metadata.len())
    }

    fn cut_back(&mut self, position: u64) -> std::io::Result<()> {
        self.set_len(position)
    }
}

/// Writes batches of whole lines so that a failed or partial write never leaves a fragment
/// that the next write glues onto: a file is cut back to where the batch began; where that is
/// not possible (standard output, or the cut failed), the rest of the broken line is written
/// first next time, so it ends where it should. Either way the batch is reported failed and
/// its records are not acked (they are delivered again: at least once).
pub struct WholeLines<W> {
    out: W,
    /// The rest of a line a failed write left unfinished.
    unfinished: Vec<u8>,
}

impl<W: LineOutput> WholeLines<W> {
    /// Lines written to `out`.
    pub fn new(out: W) -> WholeLines<W> {
        WholeLines {
            out,
            unfinished: Vec::new(),
        }
    }

    /// Writes `lines` (each ending in a newline) whole, or reports why not.
    pub fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<()> {
        self.end_broken_line()?;
        let start = self.out.position();
        let (written, result) = write_counting(&mut self.out, lines);
        let Err(err) = result.and_then(|()| self.out.flush()) else {
            return Ok(());
        };
        if written > 0 && written < lines.len() {
            let cut = start.map(|start| self.out.cut_back(start));
            // A write that stopped right after a newline broke no line: nothing to finish
            // ("the rest" would be the next whole line, one never begun, written twice).
            let broken = lines[written - 1] != b'\n';
            if broken && !matches!(cut, Some(Ok(()))) {
                // End the broken line with the rest of it, next time.
                let end = lines[written..]
                    .iter()
                    .position(|byte| *byte == b'\n')
                    .map_or(lines.len(), |newline| written + newline + 1);
                self.unfinished = lines[written..end].to_vec();
            }
        }
        Err(err)
    }

    /// Writes the rest of a line a failed write left broken, if any: before anything else is
    /// written, and before the output is closed for another.
    pub fn end_broken_line(&mut self) -> std::io::Result<()> {
        if self.unfinished.is_empty() {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.unfinished);
        let (written, result) = write_counting(&mut self.out, &rest);
        if result.is_err() {
            self.unfinished = rest[written..].to_vec();
        }
        result
    }

    /// The output itself.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Writes `buf`, returning how much was written before any error.
fn write_counting(out: &mut impl Write, buf: &[u8]) -> (usize, std::io::Result<()>) {
    let mut written = 0;
    while written < buf.len() {
        match out.write(&buf[written..]) {
            Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return (written, Err(err)),
        }
    }
    (written, Ok(()))
}

/// When a file sink rotates: `sink.max_bytes` and `sink.max_files`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// A batch that would take the file past this size goes to a fresh file (unless the file
    /// is empty: a batch is never split).
    pub max_bytes: u64,
    /// Rotated files kept: `path.1` (the newest) to `path.<max_files>`.
    pub max_files: u32,
}

/// A file shared by the workers of a route (of every route naming its path): one batch at a
/// time, appended whole. Rotation and reopening happen under the same lock as writing, so a
/// batch goes whole to one file and no line is torn or lost.
pub struct SharedFile {
    path: PathBuf,
    /// `None` after a failed reopen or rotation: `path` is opened again before the next write.
    lines: Mutex<Option<WholeLines<File>>>,
    /// Sync each batch to disk before it counts as written.
    fsync: bool,
    rotation: Option<Rotation>,
}

impl SharedFile {
    /// Opens `path` for appending (creating it and its directories).
    pub fn open(
        path: &Path,
        fsync: bool,
        rotation: Option<Rotation>,
    ) -> anyhow::Result<SharedFile> {
        let mut file = open_append(path)?;
        let cut = cut_unfinished_tail(path, &mut file)
            .with_context(|| format!("failed to check the end of {}", path.display()))?;
        if cut > 0 {
            warn!(
                path = %path.display(),
                bytes = cut,
                "cut an unfinished last line (a process writing this file died mid-write; that \
                 batch was not acked and is written again)"
            );
        }
        Ok(SharedFile {
            path: path.to_path_buf(),
            lines: Mutex::new(Some(WholeLines::new(file))),
            fsync,
            rotation,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `lines` (whole lines) to the file, first rotating it if they would take it past
    /// `max_bytes`.
    pub fn append(&self, lines: &[u8]) -> std::io::Result<()> {
        let mut state = lock(&self.lines);
        if let Some(rotation) = self.rotation {
            let size = self.opened(&mut state)?.get_mut().metadata()?.len();
            if size > 0 && size.saturating_add(lines.len() as u64) > rotation.max_bytes {
                self.rotate(&mut state, rotation)?;
            }
        }
        let file = self.opened(&mut state)?;
        file.write_lines(lines)?;
        if self.fsync {
            // The lines are whole in the file; if they cannot be synced the batch is not
            // acked and is written again (whole lines, at least once).
            file.get_mut().sync_data()?;
        }
        Ok(())
    }

    /// Closes the file and opens `path` again, creating it: after logrotate renamed it, the
    /// next batch goes to a new file. A write in progress holds the lock, so it finishes on the
    /// old file first. If `path` cannot be opened, the next write tries again (and fails its
    /// batch, to be retried, while it cannot): nothing more goes to the renamed file, which
    /// logrotate may compress or delete.
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut state = lock(&self.lines);
        self.close(&mut state);
        self.opened(&mut state).map(|_| ())
    }

    /// The open file, opening `path` if it is closed.
    fn opened<'a>(
        &self,
        state: &'a mut Option<WholeLines<File>>,
    ) -> std::io::Result<&'a mut WholeLines<File>> {
        let file = match state.take() {
            Some(file) => file,
            None => WholeLines::new(open_file(&self.path).map_err(|err| {
                std::io::Error::new(
                    err.kind(),
                    format!("cannot open {}: {err}", self.path.display()),
                )
            })?),
        };
        Ok(state.insert(file))
    }

    fn close(&self, state: &mut Option<WholeLines<File>>) {
        if let Some(mut old) = state.take() {
            // A line a failed write left broken (only where cutting the file back failed) is
            // ended where it began, if the file still takes it; its batch is written again.
            let _ = old.end_broken_line();
        }
    }

    /// `path` → `path.1` → `path.2` ..., `path.<max_files>` deleted; the next write opens a
    /// fresh `path`.
    fn rotate(
        &self,
        state: &mut Option<WholeLines<File>>,
        rotation: Rotation,
    ) -> std::io::Result<()> {
        if let Some(file) = state.as_mut() {
            // The old file must end in a whole line before it is set aside.
            file.end_broken_line()?;
        }
        let rotated = |index: u32| {
            let mut name = self.path.as_os_str().to_owned();
            name.push(format!(".{index}"));
            PathBuf::from(name)
        };
        ignore_missing(std::fs::remove_file(rotated(rotation.max_files)))?;
        for index in (1..rotation.max_files).rev() {
            ignore_missing(std::fs::rename(rotated(index), rotated(index + 1)))?;
        }
        // Missing if someone else moved it away (without SIGHUP): then the handle names that
        // file, and closing it is all that is left to do.
        ignore_missing(std::fs::rename(&self.path, rotated(1)))?;
        self.close(state);
        if self.fsync {
            // The renames are part of what was synced: a crash must not bring back the old
            // names with a file that the next batches would be appended to twice.
            if let Some(parent) = self.path.parent() {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }
}

/// Cuts `file` back to the end of its last whole line, if it ends inside a line: what a
/// process killed in the middle of a write (SIGKILL, a power loss) leaves. That write's batch
/// was never acked, so its records are delivered again; without the cut, the first line written
/// next would be glued onto the fragment. Returns how many bytes were cut.
fn cut_unfinished_tail(path: &Path, file: &mut File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(0);
    }
    // `file` is open for appending only: read through a handle of its own.
    let mut reader = File::open(path)?;
    let mut end = size;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        reader.seek(SeekFrom::Start(start))?;
        reader.read_exact(piece)?;
        if let Some(newline) = piece.iter().rposition(|byte| *byte == b'\n') {
            end = start + newline as u64 + 1;
            break;
        }
        end = start;
    }
    if end < size {
        file.set_len(end)?;
    }
    // Opened for appending: the next write goes to the (new) end whatever the position.
    file.seek(SeekFrom::End(0))?;
    Ok(size - end)
}

fn ignore_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Writes one JSON line per record (see the module docs) to a file or standard output.
pub struct LineSink {
    target: LineTarget,
    buffer: Vec<u8>,
}

impl LineSink {
    /// A sink writing to `target`.
    pub fn new(target: LineTarget) -> LineSink {
        LineSink {
            target,
            buffer: Vec::new(),
        }
    }
}

impl Sink for LineSink {
    fn file(&self) -> Option<Arc<SharedFile>> {
        match &self.target {
            LineTarget::File(file) => Some(file.clone()),
            LineTarget::Stdout(_) | LineTarget::Files(_) => None,
        }
    }

    fn file_set(&self) -> Option<Arc<FileSet>> {
        match &self.target {
            LineTarget::Files(set) => Some(set.clone()),
            LineTarget::File(_) | LineTarget::Stdout(_) => None,
        }
    }

    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        if let LineTarget::Files(set) = &self.target {
            let set = set.clone();
            return Box::pin(async move {
                // Opening and writing may block: off the async workers. The batch is borrowed,
                // so the blocking section runs in place (`block_in_place` needs the
                // multi-threaded runtime the pipeline runs on).
                match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => set.append(route, batch),
                    _ => tokio::task::block_in_place(|| set.append(route, batch)),
                }
            });
        }
        Box::pin(async move {
            let mut lines = std::mem::take(&mut self.buffer);
            lines.clear();
            for record in batch {
                write_line(&mut lines, route, record);
            }
            let target = self.target.clone();
            // The write may block (slow disk, full pipe): keep it off the async workers.
            let written = tokio::task::spawn_blocking(move || {
                let result = target.write_lines(&lines);
                (result, lines)
            })
            .await;
            let outcome = match written {
                Ok((result, lines)) => {
                    // Keep the allocation for the next batch.
                    self.buffer = lines;
                    result.map_err(|err| SinkError::retryable("io_error", err.to_string()))
                }
                Err(join) => Err(SinkError::retryable(
                    "io_error",
                    format!("writer task failed: {join}"),
                )),
            };
            vec![outcome; batch.len()]
        })
    }
}

/// Appends one output line for `record` to `out`.
pub fn write_line(out: &mut Vec<u8>, route: &str, record: &Record) {
    out.extend_from_slice(b"{\"topic\":");
    write_json_string(out, &record.source.topic);
    out.extend_from_slice(b",\"partition\":");
    out.extend_from_slice(record.source.partition.to_string().as_bytes());
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(record.offset.to_string().as_bytes());
    match record.key() {
        None => out.extend_from_slice(b",\"key\":null"),
        Some(key) => match std::str::from_utf8(key) {
            Ok(text) => {
                out.extend_from_slice(b",\"key\":");
                write_json_string(out, text);
            }
            // A binary key cannot be a JSON string without loss: give it as hex instead.
            Err(_) => {
                out.extend_from_slice(b",\"key\":null,\"key_hex\":\"");
                for byte in key {
                    out.extend_from_slice(format!("{byte:02x}").as_bytes());
                }
                out.push(b'"');
            }
        },
    }
    out.extend_from_slice(b",\"route\":");
    write_json_string(out, route);
    out.extend_from_slice(b",\"event\":");
    match record.event_json() {
        // Only decoded payloads reach a sink, so this is valid JSON.
        Some(json) => write_compact_json(out, &json),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}\n");
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Copies valid JSON, leaving out whitespace between tokens (a newline there would split the
/// output line); string contents are copied untouched.
pub(crate) fn write_compact_json(out: &mut Vec<u8>, json: &[u8]) {
    if !json.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        out.extend_from_slice(json.trim_ascii());
        return;
    }
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if byte == b'"' {
            in_string = true;
            out.push(byte);
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8], key: Option<&[u8]>) -> Record {
        crate::record::test_record(2, 7, key, Some(payload))
    }

    #[test]
    fn line_carries_source_key_route_and_original_event() {
        let payload = br#"{"level":"error","message":"boom","extra":{"a":[1,2]}}"#;
        let mut out = Vec::new();
        write_line(&mut out, "errors", &record(payload, Some(b"k\"1")));
        let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON line");
        assert_eq!(line["topic"], "logs");
        assert_eq!(line["partition"], 2);
        assert_eq!(line["offset"], 7);
        assert_eq!(line["key"], "k\"1");
        assert_eq!(line["route"], "errors");
        assert_eq!(line["event"]["extra"]["a"][1], 2);
        assert!(out.ends_with(b"}\n"));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
    }

    /// A line of text is no JSON: its line carries the event made of it (the line is the
    /// message), so the output stays one JSON line per record.
    #[test]
    fn a_text_line_goes_out_as_its_event() {
        let record = crate::record::test_record_read(
            &crate::record::test_text_decoder(),
            9,
            b"db [WARN] slow query ms=812\n",
        );
        let mut out = Vec::new();
        write_line(&mut out, "slow", &record);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON line");
        assert_eq!(line["offset"], 9);
        assert_eq!(
            line["event"],
            serde_json::json!({"level": "warning", "message": "db [WARN] slow query ms=812", "service": "db", "ms": "812"})
        );
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
    }

    /// JSON behind a Schema Registry prefix goes out as the JSON, without the prefix's bytes
    /// (a zero byte and the schema id would make the line no JSON).
    #[test]
    fn json_behind_a_schema_registry_prefix_goes_out_without_it() {
        let mut payload = vec![0, 0, 0, 0, 7];
        payload.extend_from_slice(br#"{"severity":"ERROR","message":"m"}"#);
        let record = crate::record::test_record_read(
            &crate::event::Decoder::from(crate::event::InputFormat::Auto),
            1,
            &payload,
        );
        let mut out = Vec::new();
        write_line(&mut out, "all", &record);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON line");
        assert_eq!(line["event"]["severity"], "ERROR");
    }

    #[test]
    fn multi_line_payload_stays_on_one_line_with_strings_intact() {
        let payload = b"{\n  \"level\": \"warn\",\n  \"message\": \"a \\\" b\\n c  d\"\n}\n";
        let mut out = Vec::new();
        write_line(&mut out, "w", &record(payload, None));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON line");
        assert_eq!(line["event"]["message"], "a \" b\n c  d");
        assert_eq!(line["key"], serde_json::Value::Null);
    }

    #[test]
    fn binary_key_is_given_as_hex() {
        let mut out = Vec::new();
        write_line(
            &mut out,
            "w",
            &record(br#"{"level":"info","message":"m"}"#, Some(&[0xff, 0x00])),
        );
        let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON line");
        assert_eq!(line["key_hex"], "ff00");
    }

    /// Accepts `room` bytes, then fails every write; can be cut back when `cuttable`.
    struct Flaky {
        data: Vec<u8>,
        room: usize,
        cuttable: bool,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::other("disk full"));
            }
            let n = buf.len().min(self.room).min(7);
            self.data.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LineOutput for Flaky {
        fn position(&mut self) -> Option<u64> {
            self.cuttable.then_some(self.data.len() as u64)
        }

        fn cut_back(&mut self, position: u64) -> std::io::Result<()> {
            self.data.truncate(position as usize);
            Ok(())
        }
    }

    fn lines_of(data: &[u8]) -> Vec<&str> {
        std::str::from_utf8(data)
            .expect("utf-8")
            .split_inclusive('\n')
            .collect()
    }

    #[test]
    fn a_partial_write_is_cut_back_where_the_output_allows() {
        let mut out = WholeLines::new(Flaky {
            data: b"old line\n".to_vec(),
            room: 20,
            cuttable: true,
        });
        let err = out.write_lines(b"first record line\nsecond record line\n");
        assert!(err.is_err(), "the batch failed");
        assert_eq!(
            out.get_mut().data,
            b"old line\n",
            "cut back to before the batch"
        );
        out.get_mut().room = 1_000;
        out.write_lines(b"first record line\nsecond record line\n")
            .expect("written");
        assert_eq!(
            lines_of(&out.get_mut().data),
            ["old line\n", "first record line\n", "second record line\n"]
        );
    }

    #[test]
    fn a_partial_write_that_cannot_be_cut_back_is_finished_first_next_time() {
        let mut out = WholeLines::new(Flaky {
            data: Vec::new(),
            room: 24,
            cuttable: false,
        });
        assert!(out
            .write_lines(b"first record line\nsecond record line\n")
            .is_err());
        // 24 bytes: the first line and 6 of the second.
        assert_eq!(out.get_mut().data, b"first record line\nsecond");
        // Still failing: nothing more, and nothing forgotten.
        assert!(out.write_lines(b"other\n").is_err());
        out.get_mut().room = 1_000;
        out.write_lines(b"first record line\nsecond record line\n")
            .expect("written");
        // The broken line was ended before the batch was written again: every line whole
        // (the first one twice: at least once).
        assert_eq!(
            lines_of(&out.get_mut().data),
            [
                "first record line\n",
                "second record line\n",
                "first record line\n",
                "second record line\n"
            ]
        );
    }

    /// Issue 34, item 11c: a partial write that ends exactly at a newline broke no line:
    /// nothing is left to finish, and the next line must not be written as if it were.
    #[test]
    fn a_partial_write_ending_at_a_newline_leaves_no_line_to_finish() {
        let mut out = WholeLines::new(Flaky {
            data: Vec::new(),
            // Exactly the first line (18 bytes).
            room: 18,
            cuttable: false,
        });
        assert!(out
            .write_lines(b"first record line\nsecond record line\n")
            .is_err());
        assert_eq!(out.get_mut().data, b"first record line\n");
        out.get_mut().room = 1_000;
        out.write_lines(b"first record line\nsecond record line\n")
            .expect("written");
        assert_eq!(
            lines_of(&out.get_mut().data),
            [
                "first record line\n",
                "first record line\n",
                "second record line\n"
            ],
            "the second line once: it was never begun"
        );
    }

    #[test]
    fn a_file_sink_with_fsync_appends_whole_lines() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("out/route.jsonl");
        let file = SharedFile::open(&path, true, None).expect("opened");
        file.append(b"a\n").expect("a");
        file.append(b"b\n").expect("b");
        assert_eq!(std::fs::read(&path).expect("read"), b"a\nb\n");
    }

    fn rotated(path: &Path, index: u32) -> PathBuf {
        PathBuf::from(format!("{}.{index}", path.display()))
    }

    /// A batch of `count` lines of 100 bytes each, numbered from `first`.
    fn batch(first: usize, count: usize) -> Vec<u8> {
        (first..first + count)
            .flat_map(|n| format!("{n:099}\n").into_bytes())
            .collect()
    }

    #[test]
    fn rotation_keeps_batches_whole_and_deletes_the_oldest_beyond_max_files() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("route.jsonl");
        let rotation = Rotation {
            max_bytes: 1_024,
            max_files: 2,
        };
        let file = SharedFile::open(&path, false, Some(rotation)).expect("opened");
        // 6 lines (600 bytes) per batch: one batch per file, never two (1 200 > 1 024).
        for round in 0..4 {
            file.append(&batch(round * 6, 6)).expect("appended");
        }
        assert_eq!(std::fs::read(&path).expect("current"), batch(18, 6));
        assert_eq!(std::fs::read(rotated(&path, 1)).expect(".1"), batch(12, 6));
        assert_eq!(std::fs::read(rotated(&path, 2)).expect(".2"), batch(6, 6));
        assert!(
            !rotated(&path, 3).exists(),
            "the oldest batch was deleted: max_files = 2"
        );
        // A batch larger than max_bytes goes whole into a fresh file; a small one fills up the
        // current file before the next rotation.
        file.append(&batch(24, 12)).expect("large batch");
        assert_eq!(std::fs::read(&path).expect("current"), batch(24, 12));
        file.append(&batch(36, 1)).expect("rotated again");
        file.append(&batch(37, 1)).expect("same file");
        assert_eq!(std::fs::read(&path).expect("current"), batch(36, 2));
        assert_eq!(std::fs::read(rotated(&path, 1)).expect(".1"), batch(24, 12));
        assert_eq!(std::fs::read(rotated(&path, 2)).expect(".2"), batch(18, 6));
    }

    #[test]
    fn without_max_bytes_a_file_never_rotates() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("route.jsonl");
        let file = SharedFile::open(&path, true, None).expect("opened");
        for round in 0..30 {
            file.append(&batch(round, 1)).expect("appended");
        }
        assert_eq!(std::fs::read(&path).expect("read"), batch(0, 30));
        assert!(!rotated(&path, 1).exists());
    }

    #[test]
    fn a_line_left_unfinished_by_a_dead_process_is_cut_at_open() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("route.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").expect("torn file");
        let file = SharedFile::open(&path, false, None).expect("opened");
        file.append(b"{\"d\":4}\n").expect("d");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"{\"a\":1}\n{\"b\":2}\n{\"d\":4}\n"
        );
        // A fragment with no newline at all before it, longer than one read.
        std::fs::write(&path, vec![b'x'; 100_000]).expect("one torn line");
        SharedFile::open(&path, false, None).expect("opened");
        assert_eq!(std::fs::metadata(&path).expect("size").len(), 0);
        // Whole lines are left alone.
        std::fs::write(&path, b"whole\n").expect("whole");
        SharedFile::open(&path, false, None).expect("opened");
        assert_eq!(std::fs::read(&path).expect("read"), b"whole\n");
    }

    #[test]
    fn reopen_after_a_rename_goes_on_in_a_new_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("route.jsonl");
        let file = SharedFile::open(&path, false, None).expect("opened");
        file.append(b"before\n").expect("before");
        let renamed = dir.path().join("route.jsonl.old");
        std::fs::rename(&path, &renamed).expect("renamed");
        // Until the reopen, lines follow the renamed file (as logrotate expects).
        file.append(b"between\n").expect("between");
        file.reopen().expect("reopened");
        file.append(b"after\n").expect("after");
        assert_eq!(
            std::fs::read(&renamed).expect("renamed"),
            b"before\nbetween\n"
        );
        assert_eq!(std::fs::read(&path).expect("new"), b"after\n");
    }

    #[test]
    fn a_file_that_cannot_be_reopened_fails_batches_until_it_can() {
        let dir = tempfile::tempdir().expect("dir");
        let sub = dir.path().join("out");
        let path = sub.join("route.jsonl");
        let file = SharedFile::open(&path, false, None).expect("opened");
        file.append(b"a\n").expect("a");
        let moved = dir.path().join("moved");
        std::fs::rename(&sub, &moved).expect("directory moved away");
        assert!(file.reopen().is_err(), "its directory is gone");
        assert!(file.append(b"b\n").is_err(), "nothing goes to the old file");
        std::fs::create_dir(&sub).expect("directory back");
        file.append(b"c\n").expect("opened again");
        assert_eq!(
            std::fs::read(moved.join("route.jsonl")).expect("old"),
            b"a\n"
        );
        assert_eq!(std::fs::read(&path).expect("new"), b"c\n");
    }
}
