//! Consumer actor: the only owner of the librdkafka client. It polls Kafka on a dedicated
//! thread, decodes each record once, and offers it to the router, waiting at most
//! `pause_after_ms` for room.
//!
//! Why a thread and not a task: librdkafka runs rebalance callbacks inside `poll`, and a revoke
//! must drain and commit *before* the callback returns. That wait would block a runtime worker;
//! on its own thread it blocks nothing but Kafka polling, which is exactly what should wait.
//!
//! Backpressure: when the router channel is full the consumer first waits, up to
//! `pause_after_ms`, for half of it to be free (a busy pipeline makes room quickly, and a pause
//! would throw away librdkafka's prefetch for the partition). If it stays full, the record in
//! hand is kept, its partition is paused, and polling goes on (the group and rebalance
//! callbacks stay served: rust-rdkafka #738). Paused partitions resume, oldest held record
//! first, once the channel has drained to half its capacity. librdkafka restarts a resumed
//! partition's fetch at the position after the last record it returned, which is right after
//! what we hold, so nothing is skipped.
//!
//! Commits: the committer publishes a [`CommitPlan`] per interval (only when something
//! advanced); a commit thread commits it, and this thread commits the final positions on revoke
//! and at shutdown.
//! Every commit is synchronous: librdkafka reports the result of a manual *asynchronous*
//! commit only to an `offset_commit_cb`, which rust-rdkafka does not install (its event API
//! covers automatic commits only), so an async commit's failure would go unseen. The cost is
//! one broker round trip per interval on this thread; librdkafka keeps fetching meanwhile.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::breaker::BreakerState;
use crate::committer::{CommitEntry, CommitPlan, CommitterControl};
use crate::config::Config;
use crate::event::decode_level;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::record::{Fences, PartitionKey, Record};
use crate::router::RouterSender;

/// librdkafka prefetch bound unless the config sets it: with the pipeline's own channels this
/// caps memory whatever the backlog (the librdkafka default is 64 MiB and grows with lag
/// otherwise: vector #20939). 8 MiB fed the benchmark's pipeline as fast as 16 MiB did, with
/// about 20 MiB less peak RSS.
const DEFAULT_QUEUED_MAX_KBYTES: &str = "8192";

/// Largest fetch response unless the config sets it. librdkafka may overshoot the prefetch
/// bound by a whole response, and its default (50 MiB, i.e. 1 MiB for each of up to 50
/// partitions) made peak RSS depend on how many partitions had data: 4 MiB took the benchmark's
/// 64-partition backlog from 112 to 88 MiB at the same throughput.
const DEFAULT_FETCH_MAX_BYTES: &str = "4194304";

/// librdkafka keeps one fetch per broker in flight; a long poll for caught-up partitions (the
/// default waits 500 ms) delays the restart of every partition resumed meanwhile. 100 ms keeps
/// resumed partitions flowing at the cost of more idle fetches.
const DEFAULT_FETCH_WAIT_MAX_MS: &str = "100";

/// How long librdkafka postpones a partition's next fetch once its prefetch queue is full. Its
/// default (1 s) idles a pipeline that drains the queue faster than that: the measured pipeline
/// sat empty for most of every second. 20 ms keeps it fed; the cost is a few more wakeups of the
/// fetcher while the queue stays full.
const DEFAULT_FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// How often librdkafka reports statistics (lag, round trips) unless the config says otherwise.
const DEFAULT_STATISTICS_INTERVAL_MS: &str = "5000";

/// How long one poll waits when nothing is held back.
const POLL_IDLE: Duration = Duration::from_millis(100);
/// How long one poll waits while records are held for a full router: short, so the held
/// records move as soon as there is room.
const POLL_HELD: Duration = Duration::from_millis(5);
/// Longest wait for the final commit at shutdown.
const FINAL_COMMIT_WAIT: Duration = Duration::from_millis(1_000);
/// Extra wait for the committer's final answer beyond the drain timeout.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// Builds the librdkafka consumer configuration: logbridge's fixed properties, its defaults,
/// then the user's `[kafka.options]` (which win over defaults but cannot set fixed ones:
/// config validation refuses them).
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("queued.max.messages.kbytes", DEFAULT_QUEUED_MAX_KBYTES)
        .set("fetch.max.bytes", DEFAULT_FETCH_MAX_BYTES)
        .set("fetch.wait.max.ms", DEFAULT_FETCH_WAIT_MAX_MS)
        .set("fetch.queue.backoff.ms", DEFAULT_FETCH_QUEUE_BACKOFF_MS)
        .set("statistics.interval.ms", DEFAULT_STATISTICS_INTERVAL_MS)
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &config.kafka.options {
        client.set(key, value.to_string());
    }
    if config.kafka.options.contains_key("debug") {
        // librdkafka's debug contexts log at debug level; let them through.
        client.set_log_level(RDKafkaLogLevel::Debug);
    }
    client
}

/// Whether a partition's records flow or are held back for a full router.
enum Flow {
    /// Records go straight to the router.
    Flowing,
    /// Paused in librdkafka; these records were read and wait, oldest first, for room.
    Paused { held: VecDeque<Record> },
}

struct PartitionState {
    generation: u64,
    flow: Flow,
    /// Offset of the last record librdkafka returned for this partition: its fetch position is
    /// right after it (librdkafka sets it so on pause, and we re-state it on resume).
    last_polled: Option<i64>,
}

/// What the consumer thread and its rebalance callbacks share (same thread, but librdkafka's
/// callback API only gives `&self`).
#[derive(Default)]
struct Assignment {
    partitions: FxHashMap<PartitionKey, PartitionState>,
    topics: FxHashMap<String, Arc<str>>,
    /// `events_consumed_total` of each topic, looked up once rather than per record.
    consumed: FxHashMap<Arc<str>, prometheus::IntCounter>,
}

impl Assignment {
    fn key(&mut self, topic: &str, partition: i32) -> PartitionKey {
        let topic = match self.topics.get(topic) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(topic);
                self.topics.insert(topic.to_string(), name.clone());
                name
            }
        };
        PartitionKey { topic, partition }
    }

    /// Counts a record read from `topic`.
    fn count_consumed(&mut self, topic: &Arc<str>, metrics: &Metrics) {
        match self.consumed.get(topic) {
            Some(counter) => counter.inc(),
            None => {
                let counter = metrics.consumed.with_label_values(&[&**topic]);
                counter.inc();
                self.consumed.insert(topic.clone(), counter);
            }
        }
    }

    fn paused_count(&self) -> i64 {
        self.partitions
            .values()
            .filter(|state| matches!(state.flow, Flow::Paused { .. }))
            .count() as i64
    }

    /// Sets the paused gauges: the total, and 0/1 per owned partition.
    fn publish_paused(&self, metrics: &Metrics) {
        metrics.paused_partitions.set(self.paused_count());
        for (key, state) in &self.partitions {
            let partition = key.partition.to_string();
            metrics
                .partition_paused
                .with_label_values(&[&*key.topic, &partition])
                .set(i64::from(matches!(state.flow, Flow::Paused { .. })));
        }
    }

    fn held_count(&self) -> usize {
        self.partitions
            .values()
            .map(|state| match &state.flow {
                Flow::Flowing => 0,
                Flow::Paused { held } => held.len(),
            })
            .sum()
    }
}

/// The consumer's view of its partitions, for `/status`.
#[derive(Clone)]
pub struct PartitionView {
    assignment: Arc<Mutex<Assignment>>,
    in_group: Arc<AtomicBool>,
}

/// One owned partition as the consumer sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionFlow {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Assignment generation.
    pub generation: u64,
    /// Paused in librdkafka (router full, breaker, or shutdown).
    pub paused: bool,
    /// Records read and held back while paused.
    pub held: usize,
}

impl PartitionView {
    /// Whether the consumer has received an assignment (possibly empty) and not lost it since.
    pub fn in_group(&self) -> bool {
        self.in_group.load(Ordering::Acquire)
    }

    /// Every owned partition, sorted.
    pub fn snapshot(&self) -> Vec<PartitionFlow> {
        let assignment = self
            .assignment
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut flows: Vec<PartitionFlow> = assignment
            .partitions
            .iter()
            .map(|(key, state)| PartitionFlow {
                topic: key.topic.to_string(),
                partition: key.partition,
                generation: state.generation,
                paused: matches!(state.flow, Flow::Paused { .. }),
                held: match &state.flow {
                    Flow::Flowing => 0,
                    Flow::Paused { held } => held.len(),
                },
            })
            .collect();
        flows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        flows
    }
}

/// librdkafka callbacks: rebalances and commit results.
pub struct Callbacks {
    assignment: Arc<Mutex<Assignment>>,
    /// Set by the first assignment, cleared when partitions are lost (session expired).
    in_group: Arc<AtomicBool>,
    committer: CommitterControl,
    metrics: Arc<Metrics>,
    generations: AtomicU64,
    /// Set once the final commit is done: a revoke during close has nothing left to commit.
    closing: AtomicBool,
    /// Set while the dead-letter breaker is tripped: every partition stays paused, including
    /// ones assigned meanwhile.
    halted: AtomicBool,
    /// Revoked generations, shared with the router.
    fences: Fences,
    /// Set when shutdown starts draining.
    shutting_down: AtomicBool,
}

impl Callbacks {
    fn lock(&self) -> MutexGuard<'_, Assignment> {
        // Only this thread locks it and nothing panics while holding it; recover regardless.
        self.assignment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn on_assign(&self, consumer: &BaseConsumer<Callbacks>, tpl: &TopicPartitionList) {
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.in_group.store(true, Ordering::Release);
        let halted = self.halted.load(Ordering::Acquire);
        let mut assignment = self.lock();
        for element in tpl.elements() {
            let key = assignment.key(element.topic(), element.partition());
            let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
            info!(topic = %key.topic, partition = key.partition, generation, "partition assigned");
            // librdkafka does not keep pause state across assignments (librdkafka #1802): a new
            // assignment flows unless the breaker holds everything; a full router pauses it
            // again on the first send that does not fit.
            let flow = if halted {
                Flow::Paused {
                    held: VecDeque::new(),
                }
            } else {
                Flow::Flowing
            };
            assignment.partitions.insert(
                key,
                PartitionState {
                    generation,
                    flow,
                    last_polled: None,
                },
            );
        }
        if halted && tpl.count() > 0 {
            if let Err(err) = consumer.pause(tpl) {
                warn!(error = %err, "cannot pause newly assigned partitions while the breaker is tripped");
            }
        }
        self.metrics
            .assigned_partitions
            .set(assignment.partitions.len() as i64);
        assignment.publish_paused(&self.metrics);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Callbacks>, tpl: &TopicPartitionList) {
        // Lost (session expired, another member may own them already): nothing may be
        // committed for them.
        let lost = consumer.assignment_lost();
        let kind = if lost { "lost" } else { "revoke" };
        if lost {
            self.in_group.store(false, Ordering::Release);
        }
        self.metrics.rebalances.with_label_values(&[kind]).inc();
        let mut revoked = Vec::new();
        {
            let mut assignment = self.lock();
            for element in tpl.elements() {
                let key = assignment.key(element.topic(), element.partition());
                if let Some(state) = assignment.partitions.remove(&key) {
                    // From now on the router drops what it still has of this assignment.
                    self.fences.revoke(&key, state.generation);
                    if let Flow::Paused { held } = state.flow {
                        // Held records were never dispatched: the committed position is at or
                        // below them, so the next owner reads them again.
                        debug!(topic = %key.topic, partition = key.partition, held = held.len(), "dropping held records of revoked partition");
                    }
                    revoked.push((key, state.generation));
                }
            }
            self.metrics
                .assigned_partitions
                .set(assignment.partitions.len() as i64);
            assignment.publish_paused(&self.metrics);
        }
        if revoked.is_empty() {
            // librdkafka may call with an empty list (rust-rdkafka #681).
            return;
        }
        for (key, _) in &revoked {
            self.metrics.forget_partition(key);
        }
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if lost {
            warn!(
                partitions = revoked.len(),
                "partitions lost (session expired): their state is dropped, nothing committed"
            );
        } else {
            info!(partitions = revoked.len(), "partitions revoked, draining");
        }
        // During shutdown the drain has its own deadline: commit what finished, do not wait.
        let wait = !lost && !self.shutting_down.load(Ordering::Acquire);
        let started = std::time::Instant::now();
        let answer = self.committer.revoke_blocking(revoked, wait);
        self.metrics
            .revoke_drain_seconds
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(_) if lost => {}
            Ok(entries) => commit_sync(consumer, &self.metrics, &entries, "revoke"),
            Err(err) => warn!(error = %err, "cannot commit revoked partitions"),
        }
    }
}

impl ClientContext for Callbacks {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    /// librdkafka's statistics (every `statistics.interval.ms`) give the lag and broker round
    /// trips without a second client.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut assignment = self.lock();
        for topic in statistics.topics.values() {
            for stats in topic.partitions.values() {
                if stats.partition < 0 {
                    continue;
                }
                let key = assignment.key(&topic.topic, stats.partition);
                // Only owned partitions: a revoked one's series must stay gone.
                if !assignment.partitions.contains_key(&key) {
                    continue;
                }
                // librdkafka's lag is against the committed offset; before the first commit
                // of the group it is unknown (-1), and everything in the log is behind.
                let lag = if stats.consumer_lag >= 0 {
                    stats.consumer_lag
                } else if stats.hi_offset >= 0 && stats.lo_offset >= 0 {
                    stats.hi_offset - stats.lo_offset
                } else {
                    continue;
                };
                let partition = key.partition.to_string();
                self.metrics
                    .partition_lag
                    .with_label_values(&[&*key.topic, &partition])
                    .set(lag);
            }
        }
        for broker in statistics.brokers.values() {
            if let Some(rtt) = &broker.rtt {
                if rtt.cnt > 0 {
                    self.metrics
                        .broker_rtt
                        .with_label_values(&[&broker.nodename])
                        .set(rtt.avg as f64 / 1_000_000.0);
                }
            }
        }
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                warn!(error = %err, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.on_assign(consumer, tpl);
        }
    }
}

/// `Local: Erroneous state` (and the broker's generation errors) after a revoke are expected:
/// the partition has a new owner (confluent-kafka-dotnet #1861).
fn is_stale_commit(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::State
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
        )
    )
}

fn commit_list(entries: &[CommitEntry]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(entries.len());
    for entry in entries {
        // Offsets come from Kafka and are never negative; a failure only drops this entry.
        if let Err(err) = tpl.add_partition_offset(
            &entry.source.topic,
            entry.source.partition,
            Offset::Offset(entry.offset),
        ) {
            warn!(error = %err, partition = %entry.source, "cannot add commit entry");
        }
    }
    tpl
}

fn commit_sync(
    consumer: &BaseConsumer<Callbacks>,
    metrics: &Metrics,
    entries: &[CommitEntry],
    why: &'static str,
) {
    if entries.is_empty() {
        return;
    }
    match consumer.commit(&commit_list(entries), CommitMode::Sync) {
        Ok(()) => {
            metrics.commits.with_label_values(&["ok"]).inc();
            let assignment = consumer.context().lock();
            for entry in entries {
                debug!(topic = %entry.source.topic, partition = entry.source.partition, offset = entry.offset, why, "committed");
                // A revoked partition's series is gone and must stay gone.
                if assignment.partitions.contains_key(&entry.source) {
                    metrics.set_committed(&entry.source, entry.offset);
                }
            }
        }
        Err(err) if is_stale_commit(&err) => {
            metrics.commits.with_label_values(&["stale"]).inc();
            info!(error = %err, why, "commit refused: partitions already moved on");
        }
        Err(err) => {
            metrics.commits.with_label_values(&["error"]).inc();
            error!(error = %err, why, "synchronous commit failed");
        }
    }
}

/// Lifecycle of the consumer thread.
enum Phase {
    /// Reading and dispatching.
    Consuming,
    /// Shutdown asked: nothing new is dispatched; waiting for the committer's final positions.
    Draining {
        answer: oneshot::Receiver<Vec<CommitEntry>>,
        give_up_at: std::time::Instant,
    },
}

/// What the consumer talks to.
pub struct ConsumerLinks {
    /// Where records go.
    pub router: RouterSender,
    /// Revoke and shutdown requests to the committer.
    pub committer: CommitterControl,
    /// Commit plans from the committer.
    pub plans: watch::Receiver<CommitPlan>,
    /// The dead-letter breaker's state.
    pub breaker: watch::Receiver<BreakerState>,
    /// Revoked generations, shared with the router.
    pub fences: Fences,
}

/// The consumer actor. Built on the async side (so config errors surface before anything
/// starts), then moved to its own thread with [`ConsumerActor::run`].
pub struct ConsumerActor {
    /// Shared only with the thread of the final commit (see `final_commit`).
    consumer: Arc<BaseConsumer<Callbacks>>,
    breaker: watch::Receiver<BreakerState>,
    /// For the commit thread, which waits on the committer's `watch`.
    runtime: tokio::runtime::Handle,
    router: Option<RouterSender>,
    plans: watch::Receiver<CommitPlan>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    max_payload_bytes: usize,
    pause_after: Duration,
    drain_timeout: Duration,
}

impl ConsumerActor {
    /// Creates the Kafka client and subscribes to the configured topics.
    pub fn new(
        config: &Config,
        links: ConsumerLinks,
        metrics: Arc<Metrics>,
        liveness: Liveness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ConsumerActor> {
        let ConsumerLinks {
            router,
            committer,
            plans,
            breaker,
            ..
        } = links;
        let callbacks = Callbacks {
            assignment: Arc::new(Mutex::new(Assignment::default())),
            in_group: Arc::new(AtomicBool::new(false)),
            committer,
            metrics: metrics.clone(),
            generations: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            fences: links.fences,
            shutting_down: AtomicBool::new(false),
        };
        let consumer: BaseConsumer<Callbacks> = client_config(config)
            .create_with_context(callbacks)
            .context("failed to create the Kafka consumer")?;
        let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .context("failed to subscribe to the configured topics")?;
        liveness.expect("consumer", 1);
        Ok(ConsumerActor {
            consumer: Arc::new(consumer),
            breaker,
            runtime: tokio::runtime::Handle::try_current()
                .context("the consumer must be created inside the tokio runtime")?,
            router: Some(router),
            plans,
            shutdown,
            metrics,
            liveness,
            max_payload_bytes: config.pipeline.max_payload_bytes,
            pause_after: Duration::from_millis(config.pipeline.pause_after_ms),
            drain_timeout: Duration::from_millis(config.pipeline.drain_timeout_ms),
        })
    }

    /// Runs until shutdown has drained and committed, reports the outcome on `committed`, then
    /// leaves the group. Blocks: call it on its own thread. Leaving can take long while the group
    /// is rebalancing (a JoinGroup in flight waits for every member, even a dead one, up to its
    /// session timeout), so the caller need not wait for it once the outcome is in.
    pub fn run(mut self, committed: std::sync::mpsc::Sender<anyhow::Result<()>>) {
        let _alive = self.liveness.enter("consumer");
        self.start_interval_commits();
        let result = self.consume();
        self.callbacks().closing.store(true, Ordering::Release);
        // Nobody listening means the pipeline is gone already; leave the group regardless.
        let _ = committed.send(result);
        info!("leaving the consumer group");
        // Dropping the consumer closes it: it leaves the group so partitions move at once.
        // (If the final commit's thread still holds it, that thread closes it when done.)
        drop(self.consumer);
        info!("left the consumer group");
    }

    /// The poll loop: consume until shutdown, then drain and make the final commit.
    fn consume(&mut self) -> anyhow::Result<()> {
        let mut phase = Phase::Consuming;
        loop {
            match &mut phase {
                Phase::Consuming if self.shutdown.is_cancelled() => {
                    match self.begin_drain() {
                        Some(next) => phase = next,
                        None => return Ok(()),
                    }
                    continue;
                }
                Phase::Consuming => {}
                Phase::Draining { answer, give_up_at } => {
                    match answer.try_recv() {
                        Ok(entries) => {
                            self.final_commit(entries);
                            break Ok(());
                        }
                        Err(oneshot::error::TryRecvError::Empty)
                            if std::time::Instant::now() < *give_up_at => {}
                        Err(_) => {
                            warn!("no final positions from the committer; nothing committed at shutdown");
                            break Ok(());
                        }
                    }
                }
            }
            if matches!(phase, Phase::Consuming) {
                self.follow_breaker()?;
            }
            let held = match phase {
                Phase::Consuming => self.flush_held()?,
                Phase::Draining { .. } => 0,
            };
            let timeout = if held > 0 { POLL_HELD } else { POLL_IDLE };
            match self.consumer.poll(timeout) {
                None => {}
                Some(Err(err)) => {
                    if matches!(err, KafkaError::MessageConsumptionFatal(_)) {
                        return Err(anyhow::Error::new(err).context("fatal Kafka consumer error"));
                    }
                    warn!(error = %err, "kafka consume error");
                }
                Some(Ok(message)) => {
                    if matches!(phase, Phase::Consuming) {
                        self.accept(&message)?;
                    }
                    // While draining a record may still arrive from before the pause: it was
                    // never dispatched, so the final commit stays below it and it is read again.
                }
            }
        }
    }

    /// Interval commits run on their own thread: a synchronous commit waits for a rebalance in
    /// flight (seen: 5 s while a dead member's session expired), and the poll loop must not
    /// wait with it (shutdown, held records and rebalance callbacks are served there).
    ///
    /// Each plan is filtered, at commit time, to the partitions still held under the plan's
    /// generation. A plan filtered just before a revoke may land just after the revoke's final
    /// commit: it carries an older position of the same generation (plans only grow), so the
    /// next owner at worst reads a few records again; it cannot land after the next owner's
    /// commits, which belong to a later group generation the broker holds us to.
    fn start_interval_commits(&mut self) {
        let consumer = self.consumer.clone();
        let metrics = self.metrics.clone();
        let mut plans = self.plans.clone();
        let runtime = self.runtime.clone();
        let spawned = std::thread::Builder::new()
            .name("logbridge-commits".to_string())
            .spawn(move || {
                // Ends when the committer (the plans' sender) is gone.
                while runtime.block_on(plans.changed()).is_ok() {
                    let plan = plans.borrow_and_update().clone();
                    let entries: Vec<CommitEntry> = {
                        let assignment = consumer.context().lock();
                        plan.iter()
                            .filter(|entry| {
                                assignment
                                    .partitions
                                    .get(&entry.source)
                                    .is_some_and(|state| state.generation == entry.generation)
                            })
                            .cloned()
                            .collect()
                    };
                    commit_sync(&consumer, &metrics, &entries, "interval");
                }
            });
        if let Err(err) = spawned {
            error!(error = %err, "cannot start the commit thread; only revoke and shutdown commit");
        }
    }

    /// Commits the final positions, waiting at most `FINAL_COMMIT_WAIT`. A synchronous commit
    /// waits for a rebalance in flight, which can take a session timeout when a member died;
    /// shutdown must stay within `drain_timeout_ms` + 2 s, so past the wait it goes on (the
    /// commit may still land; if not, the records after the previous commit are read again).
    fn final_commit(&self, entries: Vec<CommitEntry>) {
        let consumer = self.consumer.clone();
        let metrics = self.metrics.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("logbridge-final-commit".to_string())
            .spawn(move || {
                commit_sync(&consumer, &metrics, &entries, "shutdown");
                let _ = done_tx.send(());
            });
        if let Err(err) = spawned {
            warn!(error = %err, "cannot start the final commit");
            return;
        }
        if done_rx.recv_timeout(FINAL_COMMIT_WAIT).is_err() {
            warn!(
                waited_ms = FINAL_COMMIT_WAIT.as_millis() as u64,
                "final commit is taking long (a rebalance is in flight); not waiting for it"
            );
        }
    }

    /// A view of the owned partitions for the HTTP endpoint.
    pub fn partition_view(&self) -> PartitionView {
        PartitionView {
            assignment: self.callbacks().assignment.clone(),
            in_group: self.callbacks().in_group.clone(),
        }
    }

    fn callbacks(&self) -> &Callbacks {
        self.consumer.context()
    }

    /// Stops fetching, releases the router (so the pipeline drains) and asks the committer for
    /// the final positions. `None` when there is nothing to wait for.
    fn begin_drain(&mut self) -> Option<Phase> {
        info!("shutdown: stop fetching and drain in-flight records");
        self.callbacks()
            .shutting_down
            .store(true, Ordering::Release);
        {
            let mut assignment = self.callbacks().lock();
            let mut tpl = TopicPartitionList::new();
            for (key, state) in assignment.partitions.iter_mut() {
                state.flow = Flow::Paused {
                    held: VecDeque::new(),
                };
                tpl.add_partition(&key.topic, key.partition);
            }
            if tpl.count() > 0 {
                if let Err(err) = self.consumer.pause(&tpl) {
                    warn!(error = %err, "cannot pause partitions for shutdown");
                }
            }
        }
        // Closing the router's input lets router, workers and committer finish in order.
        self.router = None;
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        match self.callbacks().committer.finish(deadline) {
            Ok(answer) => Some(Phase::Draining {
                answer,
                give_up_at: std::time::Instant::now() + self.drain_timeout + FINISH_GRACE,
            }),
            Err(err) => {
                warn!(error = %err, "committer gone before shutdown");
                None
            }
        }
    }

    /// Pauses every partition when the dead-letter breaker trips; lets them resume (through
    /// `flush_held`) when it is reset.
    fn follow_breaker(&mut self) -> anyhow::Result<()> {
        if !self.breaker.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let tripped = matches!(*self.breaker.borrow_and_update(), BreakerState::Tripped(_));
        let callbacks = self.consumer.context();
        callbacks.halted.store(tripped, Ordering::Release);
        if !tripped {
            info!("breaker reset: partitions resume");
            return Ok(());
        }
        let mut assignment = callbacks.lock();
        let mut tpl = TopicPartitionList::new();
        for (key, state) in assignment.partitions.iter_mut() {
            if let Flow::Flowing = state.flow {
                state.flow = Flow::Paused {
                    held: VecDeque::new(),
                };
                tpl.add_partition(&key.topic, key.partition);
            }
        }
        if tpl.count() > 0 {
            self.consumer
                .pause(&tpl)
                .context("failed to pause partitions for the breaker")?;
        }
        assignment.publish_paused(&self.metrics);
        warn!(
            partitions = assignment.partitions.len(),
            "breaker tripped: every partition paused"
        );
        Ok(())
    }

    /// Decodes a record and offers it to the router; on a channel that stays full for
    /// `pause_after` keeps it and pauses its partition.
    fn accept(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()> {
        let payload = message.payload();
        let decoded = decode_level(payload, self.max_payload_bytes);
        let callbacks = self.consumer.context();
        let mut assignment = callbacks.lock();
        let key = assignment.key(message.topic(), message.partition());
        assignment.count_consumed(&key.topic, &self.metrics);
        let Some(state) = assignment.partitions.get_mut(&key) else {
            // Not ours any more (revoked between fetch and poll): the next owner reads it.
            debug!(topic = %key.topic, partition = key.partition, offset = message.offset(), "record of an unassigned partition skipped");
            return Ok(());
        };
        state.last_polled = Some(message.offset());
        let record = Record {
            read_at: std::time::Instant::now(),
            source: key,
            offset: message.offset(),
            generation: state.generation,
            key: message.key().map(Box::from),
            payload: payload.map(Box::from),
            headers: message.headers().map(|headers| headers.detach()),
            decoded,
        };
        let record = match &mut state.flow {
            // Fetched before the pause took effect: keep order behind what is already held.
            Flow::Paused { held } => {
                held.push_back(record);
                return Ok(());
            }
            Flow::Flowing => {
                let Some(router) = &self.router else {
                    return Ok(());
                };
                match router.try_send(record) {
                    Ok(()) => {
                        self.metrics.in_flight.inc();
                        return Ok(());
                    }
                    Err(mpsc::error::TrySendError::Full(record)) => record,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        anyhow::bail!("router stopped while the consumer was running");
                    }
                }
            }
        };
        // The router is full. A busy pipeline makes room within `pause_after`: waiting for it
        // keeps librdkafka's prefetch, which a pause would throw away. The lock is not held
        // meanwhile (interval commits and /status take it); rebalances run on this thread, so
        // the partition stays ours.
        drop(assignment);
        let record = match self.wait_for_room(record) {
            None => return Ok(()),
            Some(record) => record,
        };
        let mut assignment = callbacks.lock();
        let Some(state) = assignment.partitions.get_mut(&record.source) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&record.source.topic, record.source.partition);
        self.consumer
            .pause(&tpl)
            .context("failed to pause a partition")?;
        self.metrics.pauses.inc();
        info!(
            topic = %record.source.topic,
            partition = record.source.partition,
            offset = record.offset,
            waited_ms = self.pause_after.as_millis() as u64,
            "router channel full, partition paused"
        );
        let mut held = VecDeque::with_capacity(1);
        held.push_back(record);
        state.flow = Flow::Paused { held };
        assignment.publish_paused(&self.metrics);
        Ok(())
    }

    /// Waits up to `pause_after` for room in the router channel; returns the record if there
    /// was none (or the router is gone: the caller then holds it and shutdown follows).
    ///
    /// It waits for half the channel to be free, not one slot: waking for every slot freed
    /// would trade one record per wakeup between this thread and the router (the benchmark saw
    /// the CPU per record double in that mode).
    fn wait_for_room(&self, record: Record) -> Option<Record> {
        let Some(router) = self.router.as_ref() else {
            return Some(record);
        };
        if self.pause_after.is_zero() {
            return Some(record);
        }
        let room = (router.max_capacity() / 2).max(1);
        let waited = self.runtime.block_on(async {
            tokio::time::timeout(self.pause_after, router.reserve_many(room)).await
        });
        match waited {
            Ok(Ok(mut permits)) => match permits.next() {
                Some(permit) => {
                    // The other permits go back to the channel when `permits` is dropped; the
                    // records polled next take them.
                    permit.send(record);
                    self.metrics.in_flight.inc();
                    None
                }
                None => Some(record),
            },
            Ok(Err(_)) | Err(_) => Some(record),
        }
    }

    /// Moves held records to the router once it has drained to half its capacity, resuming each
    /// partition whose held records are all sent. Returns how many records are still held.
    fn flush_held(&self) -> anyhow::Result<usize> {
        let Some(router) = &self.router else {
            return Ok(0);
        };
        let callbacks = self.consumer.context();
        let mut assignment = callbacks.lock();
        let held_total = assignment.held_count();
        if callbacks.halted.load(Ordering::Acquire) {
            // The breaker holds everything; nothing moves until it is reset.
            return Ok(0);
        }
        let paused_any = assignment
            .partitions
            .values()
            .any(|state| matches!(state.flow, Flow::Paused { .. }));
        if !paused_any {
            return Ok(0);
        }
        // Low-water mark: resume only with room for at least half the channel, so a partition
        // is not paused and resumed for every single free slot.
        if router.capacity() * 2 < router.max_capacity() {
            return Ok(held_total);
        }
        let mut resume = TopicPartitionList::new();
        let mut restart_at = Vec::new();
        let mut router_full = false;
        for (key, state) in assignment.partitions.iter_mut() {
            let Flow::Paused { held } = &mut state.flow else {
                continue;
            };
            while let Some(record) = held.pop_front() {
                match router.try_send(record) {
                    Ok(()) => self.metrics.in_flight.inc(),
                    Err(mpsc::error::TrySendError::Full(record)) => {
                        held.push_front(record);
                        router_full = true;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        anyhow::bail!("router stopped while the consumer was running");
                    }
                }
            }
            if held.is_empty() {
                state.flow = Flow::Flowing;
                resume.add_partition(&key.topic, key.partition);
                if let Some(last) = state.last_polled {
                    restart_at.push((key.clone(), last + 1));
                }
            }
            if router_full {
                break;
            }
        }
        if resume.count() > 0 {
            self.consumer
                .resume(&resume)
                .context("failed to resume partitions")?;
            // librdkafka does not wake its fetcher on resume: the partition would wait for the
            // broker thread's next timer (up to a second, confluent-kafka-go #630), starving a
            // pipeline that drains faster than that. A seek to the position librdkafka resumes
            // from anyway (right after the last record it returned) starts the fetch at once.
            for (key, offset) in restart_at {
                if let Err(err) = self.consumer.seek(
                    &key.topic,
                    key.partition,
                    Offset::Offset(offset),
                    Duration::ZERO,
                ) {
                    debug!(topic = %key.topic, partition = key.partition, offset, error = %err, "seek after resume failed; fetch restarts on librdkafka's timer");
                }
            }
            let resumed = resume.count() as i64;
            assignment.publish_paused(&self.metrics);
            self.metrics.resumes.inc_by(resumed as u64);
            debug!(partitions = resumed, "partitions resumed");
        }
        Ok(assignment.held_count())
    }
}
