//! Wiring: builds the actors back to front (committer, workers, router, consumer), serves HTTP,
//! and runs until shutdown has drained and made its final commit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::breaker::{BreakerHandle, BreakerSwitch};
use crate::cluster::Probe;
use crate::committer::{CommitterHandle, CommitterSettings};
use crate::config::Config;
use crate::config::Delivery;
use crate::consumer::{ConsumerHandle, ConsumerLinks};
use crate::dead_letter::{DeadLetterHandle, DeadLetterTopic};
use crate::health::Liveness;
use crate::http::{self, HttpState, StatusSource};
use crate::metrics::{DepthProbe, Metrics, NO_ROUTE};
use crate::record::Fences;
use crate::router::{RouteLane, RouteTable, RouterHandle, RouterLinks, Rules, DISPATCH_BATCH};
use crate::shape::route::RouteShape;
use crate::sink::{config_sink_factory, SharedFile, SinkFactory, SinkLinks};
use crate::transaction::DispatchGate;
use crate::worker::{RetryPolicy, Retrying, WorkerHandle, WorkerSettings, MAX_BATCH};

/// How often channel depth gauges are sampled.
const DEPTH_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// After the final commit, how long leaving the consumer group may take before shutdown goes on
/// without waiting for it.
const LEAVE_GROUP_WAIT: Duration = Duration::from_millis(800);
/// After the final commit, how long tasks get to wind down before they are aborted.
const WIND_DOWN: Duration = Duration::from_secs(2);

/// Where the HTTP endpoint listens.
pub enum HttpBind {
    /// `http.listen` from the configuration.
    FromConfig,
    /// An already bound listener (tests bind port 0 and read the address).
    Listener(TcpListener),
    /// No endpoint.
    Disabled,
}

/// Everything about a run that is not configuration.
pub struct RunOptions {
    /// Builds each worker's sink; defaults to the sinks named in the configuration.
    pub sink_factory: SinkFactory,
    /// Metrics to record into; tests keep a clone to read them.
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` and `/healthz` are served.
    pub http: HttpBind,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            sink_factory: config_sink_factory(),
            metrics: Arc::new(Metrics::new()),
            http: HttpBind::FromConfig,
        }
    }
}

/// The most records the pipeline holds between Kafka and the committer, from its capacities:
/// the router channel, the batch in the router's hands (at most what its channel held), each
/// worker's channel and the batches in its sink (each at most what its channel held; several
/// for a Kafka route, [`crate::config::RouteConfig::batches_in_flight`]), and the acks
/// waiting in the committer channel (messages of at most one worker batch each; dispatch
/// messages there hold no record), and with a dead-letter topic the dead-letter actor's
/// channel (`worker_capacity` letters) and the batch in its hands (at most what its channel
/// held, and at most its batch of 64). The batch the consumer fills or holds for paused partitions
/// ([`crate::router::consumer_batch`]) and librdkafka's prefetch (`queued.max.messages.kbytes`)
/// come on top.
pub fn in_flight_bound(config: &Config) -> usize {
    let pipeline = &config.pipeline;
    let batch = pipeline.worker_capacity.min(MAX_BATCH);
    let workers: usize = config
        .routes
        .iter()
        .map(|route| {
            route.workers * (pipeline.worker_capacity + route.batches_in_flight(pipeline) * batch)
        })
        .sum();
    let dead_letters = match config.dead_letter {
        Some(_) => {
            pipeline.worker_capacity + pipeline.worker_capacity.min(crate::dead_letter::BATCH)
        }
        None => 0,
    };
    pipeline.router_capacity
        + pipeline.router_capacity.min(DISPATCH_BATCH)
        + workers
        + committer_capacity(config) * batch
        + dead_letters
}

/// Messages the committer channel holds: one per 64 records of the router channel. Dispatches
/// (up to `DISPATCH_BATCH` records a message) and each worker's acks share it; with room for
/// several of each, neither the router nor a worker waits on the committer in steady flow (with
/// room for only 4 the benchmark saw it full in most progress samples).
fn committer_capacity(config: &Config) -> usize {
    config.pipeline.router_capacity.div_ceil(64).max(2)
}

/// Runs the pipeline until `shutdown` is cancelled, then drains (within `drain_timeout_ms`),
/// commits synchronously and returns. An error means the pipeline could not start or the Kafka
/// client failed fatally.
pub async fn run(
    mut config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Output brokers and security default to the source cluster's.
    config.resolve_outputs();
    let metrics = options.metrics;
    let liveness = Liveness::default();
    let mut tasks = JoinSet::new();

    // Back to front, so each stage can be handed the next one.
    let (breaker_switch, breaker) = BreakerSwitch::new(config.breaker.clone(), metrics.clone());
    let (committer, control, committer_task) = CommitterHandle::spawn(
        CommitterSettings {
            capacity: committer_capacity(&config),
            interval: Duration::from_millis(config.pipeline.commit_interval_ms),
            drain_timeout: Duration::from_millis(config.pipeline.drain_timeout_ms),
            stall_timeout: Duration::from_millis(config.pipeline.stall_timeout_ms),
            max_uncommitted: config.pipeline.max_uncommitted_records,
        },
        breaker_switch,
        metrics.clone(),
    );
    liveness.expect("committer", 1);
    let committer_alive = liveness.enter("committer");
    tasks.spawn(async move {
        // The committer's liveness is its task's: held here until the task ends.
        let _alive = committer_alive;
        watch_actor(committer_task, "committer").await
    });

    // Revoked and rewound assignments, shared by the consumer (which fences), the router, the
    // workers, the dead-letter actor and, exactly-once, the transactional producer.
    let fences = Fences::default();
    // Exactly-once: one transactional producer for every Kafka output (validation made them
    // all Kafka topics on the source cluster with one set of properties), and the gate that
    // holds dispatch while a transaction ends.
    let transactional = match config.pipeline.delivery {
        Delivery::AtLeastOnce => None,
        Delivery::ExactlyOnce => {
            let id = config.transactional_id();
            let outputs = config.outputs();
            let (_, _, cluster) = outputs
                .first()
                .context("exactly-once delivery needs a Kafka output")?;
            let producer = crate::producer::create_transactional(*cluster, &id, fences.clone())
                .context("failed to create the transactional producer")?;
            info!(transactional_id = %id, "delivery is exactly-once");
            Some((producer, DispatchGate::default()))
        }
    };
    let dead_letter_topic = match &config.dead_letter {
        None => None,
        Some(dead_letter) => Some(DeadLetterTopic {
            producer: match &transactional {
                Some((producer, _)) => producer.clone(),
                None => crate::producer::create(
                    dead_letter.cluster(&config.kafka.brokers),
                    "dead-letter producer",
                )
                .context("failed to create the dead-letter producer")?,
            },
            topic: dead_letter.topic.clone(),
            capacity: config.pipeline.worker_capacity,
            fences: transactional.as_ref().map(|_| fences.clone()),
        }),
    };
    let (dead_letters, dead_letter_task) = DeadLetterHandle::spawn(
        dead_letter_topic,
        committer.clone(),
        metrics.clone(),
        liveness.clone(),
    );
    let dead_letter_trouble = dead_letters.trouble();
    if let Some(task) = dead_letter_task {
        tasks.spawn(watch_actor(task, "dead_letter"));
    }

    let retrying = Retrying::default();
    // Cancelled after the final commit: workers still delivering or retrying (an endpoint that
    // is down, with no retry limit) stop at once, and what they hold is read again after a
    // restart.
    let workers_stop = CancellationToken::new();
    let sink_links = SinkLinks {
        transactional: transactional.as_ref().map(|(producer, _)| producer.clone()),
        fences: fences.clone(),
        pressure: Some(crate::object_sink::Pressure {
            gauge: metrics.in_flight_bytes.clone(),
            limit: config.pipeline.max_in_flight_bytes,
        }),
    };
    let (table, worker_tasks, files) = spawn_workers(
        &config,
        &options.sink_factory,
        &sink_links,
        WorkerLinks {
            committer: &committer,
            dead_letters: &dead_letters,
            fences: &fences,
            breaker: &breaker,
            metrics: &metrics,
            liveness: &liveness,
            retrying: &retrying,
            stop: &workers_stop,
        },
    )?;
    for task in worker_tasks {
        tasks.spawn(watch_actor(task, "worker"));
    }
    let mut depths = DepthSampler {
        probes: table
            .lanes
            .iter()
            .map(|lane| {
                (
                    ("worker", lane.name.to_string()),
                    lane.workers.iter().map(WorkerHandle::depth_probe).collect(),
                )
            })
            .collect(),
    };
    depths.probes.push((
        ("committer", NO_ROUTE.to_string()),
        vec![committer.depth_probe()],
    ));

    let registry = config
        .input
        .schema_registry
        .as_ref()
        .map(crate::schema_registry::SchemaRegistry::new)
        .transpose()
        .context("invalid input.schema_registry")?
        .map(Arc::new);
    let registry_trouble = match &registry {
        Some(registry) => registry.trouble(),
        None => tokio::sync::watch::channel(None).1,
    };
    liveness.expect("router", 1);
    let (router, router_task) = RouterHandle::spawn(
        config.pipeline.router_capacity,
        table,
        RouterLinks {
            committer,
            dead_letters,
            fences: fences.clone(),
            metrics: metrics.clone(),
            liveness: liveness.clone(),
            tombstones: config.input.tombstones,
            decoder: config
                .input
                .decoder()
                .context("invalid input configuration")?,
            unrouted: config.input.unrouted,
            gate: transactional.as_ref().map(|(_, gate)| gate.clone()),
            registry,
            stop: workers_stop.clone(),
        },
    );
    tasks.spawn(watch_actor(router_task, "router"));
    depths
        .probes
        .push((("router", NO_ROUTE.to_string()), vec![router.depth_probe()]));

    let stalls = control.stalls();
    let (consumer, consumer_thread) = ConsumerHandle::spawn(
        &config,
        ConsumerLinks {
            router,
            committer: control,
            breaker: breaker.subscribe(),
            fences,
            transactions: transactional,
        },
        metrics.clone(),
        liveness.clone(),
        shutdown.clone(),
    )?;

    let http_stop = CancellationToken::new();
    let probe = Probe::new(config.source(), config.secrets())
        .context("cannot create the cluster check's client")?;
    let (cluster, cluster_task) = crate::cluster::watch(
        probe,
        config.kafka.topics.clone(),
        config.kafka.topic_matching(),
        Duration::from_millis(config.kafka.check_interval_ms),
        http_stop.clone(),
    );
    let http_task = start_http(
        options.http,
        &config,
        HttpState {
            metrics: metrics.clone(),
            liveness: liveness.clone(),
            breaker,
            stalls,
            dead_letters: dead_letter_trouble,
            retrying,
            schema_registry: registry_trouble,
            cluster: cluster.problem,
            subscription: cluster.subscription,
            status: Arc::new(StatusSource {
                partitions: consumer.partitions(),
                config: config.redacted_json(),
                routes: config
                    .routes
                    .iter()
                    .map(|route| (route.name.clone(), route.workers))
                    .collect(),
                delivery: match config.pipeline.delivery {
                    Delivery::AtLeastOnce => serde_json::json!({"mode": "at-least-once"}),
                    Delivery::ExactlyOnce => serde_json::json!({
                        "mode": "exactly-once",
                        "transactional_id": config.transactional_id(),
                    }),
                },
            }),
            // Empty (as an unset environment override gives it): no token.
            admin_token: config
                .http
                .admin_token
                .as_deref()
                .filter(|token| !token.is_empty())
                .map(Arc::from),
            trust_loopback: config.http.trust_loopback,
        },
        &http_stop,
    )
    .await?;
    tokio::spawn(reopen_files_on_hangup(
        files,
        metrics.clone(),
        http_stop.clone(),
    ));
    let sampler_stop = http_stop.clone();
    let sampler_metrics = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DEPTH_SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = sampler_stop.cancelled() => return,
                _ = tick.tick() => depths.sample(&sampler_metrics),
            }
        }
    });

    info!(
        brokers = %config.kafka.brokers,
        group = %config.kafka.group_id,
        topics = ?config.kafka.topics,
        routes = config.routes.len(),
        "logbridge started"
    );
    // The consumer's outcome arrives after the final commit. Meanwhile the actors are watched:
    // one that ends before shutdown was asked (a panic, or a stage it needs is gone) stops the
    // pipeline the way SIGTERM does (stop fetching, drain, commit what finished), and the run
    // ends in an error so that the process exits non-zero and the orchestrator restarts it.
    let mut failures: Vec<String> = Vec::new();
    let mut drain_started = None;
    let outcome = consumer.outcome();
    tokio::pin!(outcome);
    let consumer_result = loop {
        tokio::select! {
            result = &mut outcome => break result,
            _ = shutdown.cancelled(), if drain_started.is_none() => {
                drain_started = Some(std::time::Instant::now());
            }
            Some(joined) = tasks.join_next(), if !shutdown.is_cancelled() => {
                let exit = joined.unwrap_or_else(|err| ActorExit {
                    kind: "actor",
                    panic: Some(err.to_string()),
                });
                error!(actor = exit.kind, panic = exit.panic.as_deref(), "an actor stopped while the pipeline was running; stopping (the orchestrator should restart logbridge)");
                failures.push(exit.to_string());
                shutdown.cancel();
            }
        }
    };
    let drain_started = drain_started.unwrap_or_else(std::time::Instant::now);
    // Then it leaves the group: usually at once, but a rebalance in flight can hold it up to
    // a session timeout. Give it a moment; past that the process exits without waiting and the
    // group notices through the session timeout instead.
    let left = tokio::time::timeout(
        LEAVE_GROUP_WAIT,
        tokio::task::spawn_blocking(move || consumer_thread.join()),
    )
    .await;
    if left.is_err() {
        warn!(
            waited_ms = LEAVE_GROUP_WAIT.as_millis() as u64,
            "leaving the group is taking long (a rebalance is in flight); not waiting for it"
        );
    }
    if consumer_result.is_err() {
        // The consumer stopped on its own (fatal error): stop everything else too.
        shutdown.cancel();
    }
    // The final commit is made: nothing a worker finishes from here is committed.
    workers_stop.cancel();

    // Router, workers and committer end on their own once their input closes; give stragglers
    // (a sink stuck past the drain timeout) a moment, then abort them: their records were not
    // committed and will be read again.
    let wind_down = tokio::time::timeout(WIND_DOWN, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(ActorExit {
                kind,
                panic: Some(panic),
            }) = joined
            {
                failures.push(format!("{kind} panicked: {panic}"));
            }
        }
    })
    .await;
    if wind_down.is_err() {
        let busy = tasks.len();
        warn!(
            tasks = busy,
            "tasks still busy after the final commit; aborting them"
        );
        failures.push(format!(
            "{busy} actors were still busy after the final commit and were aborted"
        ));
        tasks.shutdown().await;
    }
    metrics
        .drain_seconds
        .observe(drain_started.elapsed().as_secs_f64());
    http_stop.cancel();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    // It returns as soon as it sees the cancellation (a check in flight is left to finish).
    let _ = cluster_task.await;
    info!("logbridge stopped");
    match (consumer_result, failures.is_empty()) {
        (result, true) => result,
        (Ok(()), false) => Err(anyhow::anyhow!("{}", failures.join("; "))),
        (Err(err), false) => Err(err.context(failures.join("; "))),
    }
}

/// How an actor task ended.
struct ActorExit {
    kind: &'static str,
    /// The panic message, if it panicked.
    panic: Option<String>,
}

impl std::fmt::Display for ActorExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(panic) => write!(f, "{} panicked: {panic}", self.kind),
            None => write!(f, "{} stopped", self.kind),
        }
    }
}

/// Waits for an actor task and says how it ended.
async fn watch_actor(task: tokio::task::JoinHandle<()>, kind: &'static str) -> ActorExit {
    let panic = match task.await {
        Ok(()) => None,
        Err(err) => {
            let message = match err.try_into_panic() {
                Ok(payload) => payload
                    .downcast_ref::<&str>()
                    .map(|text| text.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string()),
                Err(err) => err.to_string(),
            };
            warn!(error = %message, kind, "actor task failed");
            Some(message)
        }
    };
    ActorExit { kind, panic }
}

/// What every worker is handed besides its sink and settings.
struct WorkerLinks<'a> {
    committer: &'a CommitterHandle,
    dead_letters: &'a DeadLetterHandle,
    fences: &'a Fences,
    breaker: &'a BreakerHandle,
    metrics: &'a Arc<Metrics>,
    liveness: &'a Liveness,
    retrying: &'a Retrying,
    stop: &'a CancellationToken,
}

fn spawn_workers(
    config: &Config,
    factory: &SinkFactory,
    sink_links: &SinkLinks,
    links: WorkerLinks<'_>,
) -> anyhow::Result<(RouteTable, Vec<tokio::task::JoinHandle<()>>, OpenFiles)> {
    let WorkerLinks {
        committer,
        dead_letters,
        fences,
        breaker,
        metrics,
        liveness,
        retrying,
        stop,
    } = links;
    let mut lanes = Vec::with_capacity(config.routes.len());
    let mut tasks = Vec::new();
    let mut files = OpenFiles::default();
    for (index, route) in config.routes.iter().enumerate() {
        let name: Arc<str> = Arc::from(route.name.as_str());
        metrics.route_known(&name);
        // Checked at load already: an error here names the key all the same.
        let shape = RouteShape::for_route(route, index, metrics)?;
        liveness.expect("worker", route.workers);
        let mut workers = Vec::with_capacity(route.workers);
        for worker in 0..route.workers {
            let sink = factory(route, worker, sink_links)
                .with_context(|| format!("failed to create the sink of route `{}`", route.name))?;
            if let Some(file) = sink.file() {
                files.add(file, &name);
            }
            if let Some(set) = sink.file_set() {
                files.add_set(set, &name);
            }
            let settings = WorkerSettings {
                route: name.clone(),
                capacity: config.pipeline.worker_capacity,
                retry: RetryPolicy {
                    max_retries: route.max_retries,
                    backoff: Duration::from_millis(route.retry_backoff_ms),
                    backoff_max: Duration::from_millis(route.retry_backoff_max_ms),
                },
                fences: fences.clone(),
                batches_in_flight: route.batches_in_flight(&config.pipeline),
                linger: route.linger(),
                retrying: retrying.clone(),
                stop: stop.clone(),
                breaker: breaker.route(name.clone()),
                shape: shape.clone(),
            };
            let (handle, task) = WorkerHandle::spawn(
                settings,
                sink,
                committer.clone(),
                dead_letters.clone(),
                metrics.clone(),
                liveness.clone(),
            );
            workers.push(handle);
            tasks.push(task);
        }
        lanes.push(RouteLane {
            name,
            workers,
            by_partition: matches!(route.sink, crate::config::SinkConfig::ObjectStore(_)),
        });
    }
    Ok((
        RouteTable {
            lanes,
            rules: Rules::from_routes(&config.routes),
        },
        tasks,
        files,
    ))
}

/// The files the sinks of this pipeline write, each with the routes that write it.
#[derive(Default)]
struct OpenFiles {
    files: Vec<(Arc<SharedFile>, Vec<Arc<str>>)>,
    /// The file sets of routes with a templated path (their files are those open now).
    sets: Vec<(Arc<crate::sink::FileSet>, Arc<str>)>,
}

impl OpenFiles {
    fn add_set(&mut self, set: Arc<crate::sink::FileSet>, route: &Arc<str>) {
        if !self.sets.iter().any(|(known, _)| Arc::ptr_eq(known, &set)) {
            self.sets.push((set, route.clone()));
        }
    }

    /// Every file open now, with the routes writing it.
    fn now_open(&self) -> Vec<(Arc<SharedFile>, Vec<Arc<str>>)> {
        let mut open = self.files.clone();
        for (set, route) in &self.sets {
            open.extend(
                set.files()
                    .into_iter()
                    .map(|file| (file, vec![route.clone()])),
            );
        }
        open
    }

    fn add(&mut self, file: Arc<SharedFile>, route: &Arc<str>) {
        match self
            .files
            .iter_mut()
            .find(|(known, _)| Arc::ptr_eq(known, &file))
        {
            Some((_, routes)) if routes.contains(route) => {}
            Some((_, routes)) => routes.push(route.clone()),
            None => self.files.push((file, vec![route.clone()])),
        }
    }
}

/// Closes and reopens every file sink on SIGHUP, until `stop`: logrotate's default mode
/// renames the file and then signals, and the next batch goes to a new file at the configured
/// path. SIGHUP no longer ends the process (it would end it without a drain or final commit).
async fn reopen_files_on_hangup(files: OpenFiles, metrics: Arc<Metrics>, stop: CancellationToken) {
    // Series that dashboards look for exist from the start, at 0.
    for (_, routes) in &files.files {
        for route in routes {
            metrics.file_reopens.with_label_values(&[route]);
        }
    }
    for (_, route) in &files.sets {
        metrics.file_reopens.with_label_values(&[route]);
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(stream) => stream,
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGHUP; file sinks will not be reopened");
                return;
            }
        };
        let files = Arc::new(files);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = hangup.recv() => if received.is_none() { return },
            }
            let reopening = files.now_open();
            info!(
                files = reopening.len(),
                "SIGHUP received: reopening file sinks"
            );
            let metrics = metrics.clone();
            // A reopen waits for the write in progress on its file, which may block.
            let _ = tokio::task::spawn_blocking(move || {
                for (file, routes) in &reopening {
                    let routes: Vec<&str> = routes.iter().map(|route| &**route).collect();
                    match file.reopen() {
                        Ok(()) => {
                            for route in &routes {
                                metrics.file_reopens.with_label_values(&[route]).inc();
                            }
                            info!(path = %file.path().display(), ?routes, "file sink reopened");
                        }
                        // The next batch tries again, and is retried while the file cannot be
                        // opened.
                        Err(err) => warn!(
                            path = %file.path().display(),
                            ?routes,
                            error = %err,
                            "cannot reopen file sink"
                        ),
                    }
                }
            })
            .await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (files, stop);
    }
}

async fn start_http(
    bind: HttpBind,
    config: &Config,
    state: HttpState,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let listener = match bind {
        HttpBind::Disabled => return Ok(None),
        HttpBind::Listener(listener) => listener,
        HttpBind::FromConfig => TcpListener::bind(&config.http.listen)
            .await
            .with_context(|| format!("failed to listen on http.listen = {}", config.http.listen))?,
    };
    if let Ok(address) = listener.local_addr() {
        info!(%address, "serving /metrics, /healthz, /readyz and POST /resume");
    }
    Ok(Some(tokio::spawn(http::serve(
        listener,
        state,
        config.http.max_connections,
        stop.clone(),
    ))))
}

/// Samples the channel depth gauges: per stage (and route, for workers), the messages waiting
/// in its channels.
struct DepthSampler {
    probes: Vec<((&'static str, String), Vec<DepthProbe>)>,
}

impl DepthSampler {
    fn sample(&self, metrics: &Metrics) {
        for ((stage, route), probes) in &self.probes {
            let total: i64 = probes.iter().map(DepthProbe::depth).sum();
            metrics
                .channel_depth
                .with_label_values(&[stage, route.as_str()])
                .set(total);
        }
    }
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(stream) => stream,
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
            _ = terminate.recv() => info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five_workers(sink: &str) -> Config {
        Config::from_toml_str(&format!(
            "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n\
             [[routes]]\nname = \"r\"\nlevels = [\"error\"]\nworkers = 5\nsink = {sink}\n"
        ))
        .expect("config")
    }

    /// The README's record bound ("Memory"), written out for its two examples with the
    /// defaults (router 1024, worker 256, b = 256, sink_batches_in_flight 4): "about 8 000
    /// with five workers writing to files, 12 000 with five writing to Kafka" (now written exactly).
    #[test]
    fn the_record_bound_is_the_readme_formula() {
        let files = five_workers("{ type = \"file\", path = \"/tmp/x.jsonl\" }");
        assert_eq!(
            in_flight_bound(&files),
            1024 + 256 + 5 * (256 + 256) + 16 * 256
        );
        let kafka = five_workers("{ type = \"kafka\", topic = \"out\" }");
        assert_eq!(
            in_flight_bound(&kafka),
            1024 + 256 + 5 * (256 + 4 * 256) + 16 * 256
        );
        assert_eq!(
            (in_flight_bound(&files), in_flight_bound(&kafka)),
            (7936, 11776)
        );
        // A dead-letter topic adds its actor's channel and the batch in its hands.
        let mut parked = five_workers("{ type = \"file\", path = \"/tmp/x.jsonl\" }");
        parked.dead_letter = Config::from_toml_str(
            "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n\
             [[routes]]\nname = \"r\"\nlevels = [\"error\"]\nsink = { type = \"null\" }\n\
             [dead_letter]\ntopic = \"dlq\"\n",
        )
        .expect("config")
        .dead_letter;
        assert_eq!(in_flight_bound(&parked), 7936 + 256 + 64);
    }
}
