//! Router actor: takes decoded records from the consumer, registers each with the committer as
//! dispatched, and hands it to a worker of the route its level matches.
//!
//! Within a route the worker is picked by a hash of the record key (no key: the partition), so
//! records with the same key are processed in order while different keys run in parallel.
//! Records that failed to decode, and records no route takes, are finished right here.
//!
//! A record whose payload holds a batch of events (`input.format = "otlp_proto"` or
//! `"otlp_json"`) is split here, after its dispatch, into one record per log record: they share
//! its offset, key and partition (so one worker of a route takes them in order) and one
//! [`FanOut`] countdown, so the offset is committed only when the last of them is finished.
//!
//! Its input is bounded (`pipeline.router_capacity`). The consumer never waits on it for long:
//! it offers a record ([`RouterHandle::offer`]), and when the channel is full it waits at most
//! `pause_after_ms` for half of it to be free ([`RouterHandle::wait_for_room`]), then pauses
//! the record's partition and keeps polling Kafka.

use rdkafka::message::Headers as _;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::channel::{self, BatchReceiver, BatchSender, Offer};
use crate::committer::{CommitterHandle, Dispatch};
use crate::config::{RouteConfig, TombstonePolicy, UnroutedPolicy};
use crate::dead_letter::{DeadLetter, DeadLetterHandle, Stage};
use crate::event::{DecodeError, Decoder, Level};
use crate::health::Liveness;
use crate::metrics::{DepthProbe, Metrics, NO_ROUTE};
use crate::record::{
    AckStatus, FanOut, Fences, ProcessAck, Record, StageGone, Topic, TOMBSTONE, UNROUTED,
};
use crate::worker::WorkerHandle;

/// Records the router takes from its channel at once (one dispatch message to the committer
/// for all of them, one batch to each worker).
pub const DISPATCH_BATCH: usize = 256;

/// Most records the consumer sends to the router in one batch (see
/// [`RouterHandle::max_batch`]).
pub const CONSUMER_BATCH: usize = 256;

/// How often an ongoing wait on a full worker channel is added to the backpressure counter.
const BACKPRESSURE_SLICE: std::time::Duration = std::time::Duration::from_millis(250);

/// The workers of one route.
pub struct RouteLane {
    /// Route name (metric label, output field).
    pub name: Arc<str>,
    /// Its workers; never empty (config validation guarantees `workers >= 1`).
    pub workers: Vec<WorkerHandle>,
    /// Whether a partition's records all go to one worker, whatever their keys (the object
    /// store: a partition's objects are written by one writer in offset order).
    pub by_partition: bool,
}

impl RouteLane {
    /// Which of the lane's workers takes `record`.
    fn worker_for(&self, record: &Record) -> usize {
        let workers = self.workers.len();
        if self.by_partition && workers > 1 {
            record.source.partition as u32 as usize % workers
        } else {
            worker_index(record, workers)
        }
    }
}

/// The routes: their lanes and which lane takes each normalised level.
pub struct RouteTable {
    /// One lane per route, in configuration order.
    pub lanes: Vec<RouteLane>,
    /// Which lane takes an event.
    pub rules: Rules,
}

/// Which routes take an event: in configuration order, every route that takes its level and
/// whose other conditions (topics, services, header) hold, up to and including the first one
/// that does not `continue`; if none, the default route, if any.
#[derive(Default)]
pub struct Rules {
    /// Normalised level → the lanes whose routes take it, in configuration order.
    by_level: FxHashMap<String, Vec<usize>>,
    /// Each lane's conditions beyond the level.
    conditions: Vec<Conditions>,
    /// Whether each lane lets later routes take the events it took too (`continue`).
    continues: Vec<bool>,
    /// The route that takes what no other took.
    default: Option<usize>,
    /// Whether a route matches on the service (only then is it copied out of each event).
    need_service: bool,
}

/// One route's conditions beyond the level; each empty one holds for any record.
#[derive(Default)]
struct Conditions {
    /// Source topics (interned).
    topics: Vec<Topic>,
    /// Services (an event without a service matches only when there are none).
    services: Vec<Box<str>>,
    /// A header name and value the record must carry.
    header: Option<(String, Vec<u8>)>,
    /// A condition on the event's fields (compiled when the configuration was checked).
    when: Option<crate::shape::Condition>,
}

impl Rules {
    /// The rules of `routes` (lane `i` is `routes[i]`).
    pub fn from_routes(routes: &[RouteConfig]) -> Rules {
        let mut rules = Rules::default();
        for (lane, route) in routes.iter().enumerate() {
            rules.conditions.push(Conditions {
                topics: route.topics.iter().map(|topic| Topic::new(topic)).collect(),
                services: route
                    .services
                    .iter()
                    .map(|service| Box::from(service.as_str()))
                    .collect(),
                header: route
                    .header
                    .as_ref()
                    .map(|header| (header.name.clone(), header.value.clone().into_bytes())),
                // Validation compiled it once already; a condition that does not compile here
                // cannot happen, and would match nothing rather than everything.
                when: route.when.as_ref().map(|when| {
                    crate::shape::Condition::compile(when, &format!("routes[{lane}].when"))
                        .unwrap_or_else(|_| crate::shape::Condition::never())
                }),
            });
            rules.need_service |= route.uses_service();
            rules.continues.push(route.continue_);
            if route.default {
                rules.default = Some(lane);
                continue;
            }
            rules.need_service |= !route.services.is_empty();
            for level in &route.levels {
                rules.take(Level::new(level).as_str(), lane);
            }
        }
        rules
    }

    /// Rules that send each listed level to its lane, with no other condition.
    #[cfg(test)]
    pub(crate) fn for_levels(levels: &[(&str, usize)]) -> Rules {
        let mut rules = Rules::default();
        for &(level, lane) in levels {
            if rules.conditions.len() <= lane {
                rules.conditions.resize_with(lane + 1, Conditions::default);
                rules.continues.resize(lane + 1, false);
            }
            rules.take(level, lane);
        }
        rules
    }

    /// `lane` takes `level` (after the lanes that took it before).
    fn take(&mut self, level: &str, lane: usize) {
        self.by_level
            .entry(level.to_string())
            .or_default()
            .push(lane);
    }

    /// The first lane that takes `record` at `level`, if any.
    #[cfg(test)]
    fn lane(&self, level: &Level, record: &Record) -> Option<usize> {
        let mut lanes = Vec::new();
        self.lanes(level, record, &mut lanes);
        lanes.first().copied()
    }

    /// The lanes that take `record` at `level`, into `lanes` (cleared first): see [`Rules`].
    fn lanes(&self, level: &Level, record: &Record, lanes: &mut Vec<usize>) {
        lanes.clear();
        // Parsed once, by the first route that reads a field (most events never are).
        let mut event = Event::Unread;
        if let Some(candidates) = self.by_level.get(level.as_str()) {
            for &lane in candidates {
                let holds = self
                    .conditions
                    .get(lane)
                    .is_some_and(|conditions| conditions.hold(record, &mut event));
                if holds {
                    lanes.push(lane);
                    if !self.continues.get(lane).copied().unwrap_or(false) {
                        break;
                    }
                }
            }
        }
        if lanes.is_empty() {
            lanes.extend(self.default);
        }
    }
}

/// A record's event as JSON ([`Record::event`]: the payload's object, the serde form's inner
/// one, or what a line of text makes), read only once a route's `when` asks for it.
enum Event {
    Unread,
    Parsed(serde_json::Value),
    /// Not readable as a JSON value (nested past serde_json's limit): no `when` holds.
    Unreadable,
}

impl Event {
    fn get(&mut self, record: &Record) -> Option<&serde_json::Value> {
        if let Event::Unread = self {
            *self = match record.event() {
                Ok(value) => Event::Parsed(value),
                Err(_) => Event::Unreadable,
            };
        }
        match self {
            Event::Parsed(value) => Some(value),
            Event::Unread | Event::Unreadable => None,
        }
    }
}

impl Conditions {
    fn hold(&self, record: &Record, event: &mut Event) -> bool {
        let others = self.hold_besides_fields(record);
        others
            && self
                .when
                .as_ref()
                .is_none_or(|when| event.get(record).is_some_and(|event| when.holds(event)))
    }

    fn hold_besides_fields(&self, record: &Record) -> bool {
        (self.topics.is_empty() || self.topics.contains(&record.source.topic))
            && (self.services.is_empty()
                || record
                    .service
                    .as_ref()
                    .is_some_and(|service| self.services.contains(service)))
            && self.header.as_ref().is_none_or(|(name, value)| {
                record.headers.as_ref().is_some_and(|headers| {
                    headers.iter().any(|header| {
                        header.key == name.as_str() && header.value == Some(value.as_slice())
                    })
                })
            })
    }
}

/// The first wait before asking the schema registry again.
const REGISTRY_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest wait between requests to a failing schema registry.
const REGISTRY_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// What the router links to.
pub struct RouterLinks {
    /// Dispatches and the acks of records finished here.
    pub committer: CommitterHandle,
    /// Records that cannot be decoded.
    pub dead_letters: DeadLetterHandle,
    /// Revoked generations (records read under them are dropped, not dispatched).
    pub fences: Fences,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness table.
    pub liveness: Liveness,
    /// What becomes of tombstones.
    pub tombstones: TombstonePolicy,
    /// How payloads are read.
    pub decoder: Decoder,
    /// What becomes of events no route takes.
    pub unrouted: UnroutedPolicy,
    /// Held shut while a transaction ends (`delivery = "exactly-once"`): nothing is dispatched
    /// meanwhile. `None`: never held.
    pub gate: Option<crate::transaction::DispatchGate>,
    /// `input.schema_registry`: where records in Confluent's wire format find their schemas.
    pub registry: Option<Arc<crate::schema_registry::SchemaRegistry>>,
    /// Cancelled after the final commit at shutdown: a batch still waiting for the schema
    /// registry is given up (read again after a restart).
    pub stop: tokio_util::sync::CancellationToken,
}

/// Sends records to the router (held by the consumer).
#[derive(Clone)]
pub struct RouterHandle {
    sender: BatchSender<Record>,
}

impl RouterHandle {
    /// Starts the router with an input channel of `capacity` records.
    pub fn spawn(
        capacity: usize,
        table: RouteTable,
        links: RouterLinks,
    ) -> (RouterHandle, tokio::task::JoinHandle<()>) {
        // Full: the consumer waits up to `pause_after_ms`, then pauses the records' partitions.
        let (sender, receiver) = channel::channel(capacity);
        let RouteTable { lanes, rules } = table;
        let actor = RouterActor {
            receiver,
            lanes,
            rules,
            links,
            no_route: Arc::from(NO_ROUTE),
        };
        (RouterHandle { sender }, tokio::spawn(actor.run()))
    }

    /// Most records the consumer sends in one batch ([`consumer_batch`]).
    pub fn max_batch(&self) -> usize {
        consumer_batch(self.sender.max_capacity())
    }

    /// Hands a batch over if the channel has room for all of it; never waits.
    pub fn offer(&self, batch: Vec<Record>) -> Offer<Record> {
        self.sender.offer(batch)
    }

    /// Waits up to `wait` for half the channel to be free, then hands the batch over; gives
    /// it back if there was no room by then or the router is gone. Blocks the calling thread
    /// (the consumer's), using `runtime` for the wait.
    ///
    /// It waits for half the channel, not for room for this batch only: waking for every few
    /// slots freed would trade small batches between the consumer and the router, one wakeup
    /// each (the benchmark saw the CPU per record double in that mode).
    pub fn wait_for_room(
        &self,
        batch: Vec<Record>,
        wait: Duration,
        runtime: &tokio::runtime::Handle,
    ) -> Offer<Record> {
        if wait.is_zero() {
            return Offer::Full(batch);
        }
        let room = self.sender.max_capacity() / 2;
        runtime.block_on(self.sender.send_when_room(batch, room, wait))
    }

    /// Records the channel takes now.
    pub fn room(&self) -> usize {
        self.sender.capacity()
    }

    /// Whether at least half the channel is free: the low-water mark for resuming paused
    /// partitions, so a partition is not paused and resumed for every single free slot.
    pub fn half_empty(&self) -> bool {
        self.sender.half_empty()
    }

    pub(crate) fn depth_probe(&self) -> DepthProbe {
        DepthProbe::from_fn(self.sender.depth_reader())
    }
}

struct RouterActor {
    receiver: BatchReceiver<Record>,
    lanes: Vec<RouteLane>,
    rules: Rules,
    links: RouterLinks,
    no_route: Arc<str>,
}

/// What the router decided for a record.
enum Decision {
    /// To the lanes the router's list of targets names (one or more).
    Lanes,
    /// Finished as ignored: no route takes its level, or it is a tombstone to skip.
    Ignore {
        tombstone: bool,
    },
    Fail(DeadLetterCause),
}

struct DeadLetterCause {
    reason: &'static str,
    message: String,
    dropped_value: Option<usize>,
}

impl RouterActor {
    #[tracing::instrument(name = "router", skip_all)]
    async fn run(mut self) {
        let _alive = self.links.liveness.enter("router");
        let mut batch = Vec::with_capacity(DISPATCH_BATCH);
        // Each worker's share of the batch, by lane and worker, in the batch's order.
        let mut shares: Vec<Vec<Vec<Record>>> = self
            .lanes
            .iter()
            .map(|lane| lane.workers.iter().map(|_| Vec::new()).collect())
            .collect();
        let gate = self.links.gate.clone();
        while self.receiver.recv_many(&mut batch, DISPATCH_BATCH).await > 0 {
            // Records in a Schema Registry's format wait here for their schemas, before they
            // are dispatched: nothing is committed past them meanwhile.
            if let Some(registry) = self.links.registry.clone() {
                self.read_schemas(&registry, &mut batch).await;
            }
            // While a transaction ends, nothing is dispatched; the batch waits here (its
            // partitions may be revoked or rewound meanwhile, so the fences are read after).
            let _pass = match &gate {
                Some(gate) => match gate.pass().await {
                    Some(pass) => Some(pass),
                    None => {
                        // The last transaction ended (shutdown): read again after a restart.
                        self.abandon(batch.len());
                        batch.clear();
                        continue;
                    }
                },
                None => None,
            };
            self.drop_revoked(&mut batch);
            if batch.is_empty() {
                continue;
            }
            // The dispatches go first on the committer's channel, one message for the batch, so
            // they are there before any ack of these records can be.
            let dispatches = batch.iter().map(Dispatch::of).collect();
            if let Err(gone) = self.links.committer.dispatched(dispatches).await {
                warn!(error = %gone, "router stops");
                return;
            }
            if let Err(gone) = self.route(&mut batch, &mut shares).await {
                // Nothing can finish without the next stage; stop taking records so the
                // consumer sees the channel close and shuts down.
                warn!(error = %gone, "router stops");
                return;
            }
        }
    }

    /// Drops the records of revoked assignments: their partitions went to other owners, which
    /// read them again; dispatching them would only make duplicates.
    fn drop_revoked(&self, batch: &mut Vec<Record>) {
        let revoked = self.links.fences.remove_revoked(batch);
        self.abandon(revoked);
    }

    /// Counts `count` records given up (read again by whoever owns their partitions next).
    fn abandon(&self, count: usize) {
        if count > 0 {
            self.links.metrics.in_flight.sub(count as i64);
            self.links.metrics.abandoned.inc_by(count as u64);
        }
    }

    /// Reads the batch's records in a Schema Registry's wire format with their schemas
    /// ([`crate::schema_registry`]), fetching those not known yet. While the registry fails,
    /// the batch waits here and the fetch is retried (backoff from 100 ms to 5 s); `/readyz`
    /// says why. Records whose partitions are revoked meanwhile are dropped; at shutdown the
    /// batch is given up.
    async fn read_schemas(
        &self,
        registry: &crate::schema_registry::SchemaRegistry,
        batch: &mut Vec<Record>,
    ) {
        let mut lookup = registry.lookup(batch);
        let mut failing_since: Option<std::time::Instant> = None;
        let mut backoff = REGISTRY_BACKOFF_FIRST;
        let mut waited = false;
        while let Some(&id) = lookup.wanted.first() {
            let outcome = registry.fetch(id).await;
            crate::metrics::schema_registry_requests()
                .with_label_values(&[if outcome.is_ok() {
                    "answered"
                } else {
                    "failed"
                }])
                .inc();
            match outcome {
                Ok(schema) => {
                    lookup.insert(id, schema);
                    if failing_since.take().is_some() {
                        tracing::info!(schema = id, "the schema registry answers again");
                    }
                    backoff = REGISTRY_BACKOFF_FIRST;
                }
                Err(why) => {
                    waited = true;
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    warn!(schema = id, error = %why, "cannot fetch a schema; the records wait and are retried");
                    registry.set_trouble(Some(format!(
                        "the schema registry fails since {:.0} s ago ({} records wait for schema {id}, their offsets stay uncommitted): {why}",
                        since.elapsed().as_secs_f64(),
                        batch.len()
                    )));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.links.stop.cancelled() => {
                            self.abandon(batch.len());
                            batch.clear();
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(REGISTRY_BACKOFF_MAX);
                    self.drop_revoked(batch);
                    let left = registry.lookup(batch).wanted;
                    lookup.wanted.retain(|id| left.contains(id));
                }
            }
        }
        if waited {
            // Nothing waits any more: its schemas came, or its partitions were revoked.
            registry.set_trouble(None);
        }
        crate::schema_registry::SchemaRegistry::decode(&lookup, batch, &self.links.decoder);
    }

    /// Routes a batch: finishes what no route takes (one ack message for those), parks what
    /// cannot be decoded, and hands each worker its share in one batch.
    async fn route(
        &mut self,
        batch: &mut Vec<Record>,
        shares: &mut [Vec<Vec<Record>>],
    ) -> Result<(), StageGone> {
        let mut ignored: Vec<ProcessAck> = Vec::new();
        let mut targets = Vec::with_capacity(self.lanes.len());
        // Events each lane took from this batch (counted once per batch, not per event).
        let mut matched = vec![0u64; self.lanes.len()];
        if self.links.decoder.splits() {
            self.split_batches(batch);
        }
        for mut record in batch.drain(..) {
            let no_value = record.payload().is_none();
            match self.decide(&mut record, no_value, &mut targets) {
                Decision::Lanes => {
                    for &lane in &targets {
                        matched[lane] += 1;
                    }
                    self.share_out(record, &targets, shares)
                }
                Decision::Ignore { tombstone } => {
                    if tombstone {
                        self.links
                            .metrics
                            .tombstones
                            .with_label_values(&["skipped"])
                            .inc();
                    }
                    ignored.push(record.ack(AckStatus::Ignored));
                }
                Decision::Fail(cause) => {
                    // The acks of the records before it go first, so the committer hears of
                    // them in the batch's order.
                    self.finish_ignored(&mut ignored).await?;
                    if cause.reason == TOMBSTONE {
                        self.links
                            .metrics
                            .tombstones
                            .with_label_values(&["dead_lettered"])
                            .inc();
                    }
                    self.links
                        .dead_letters
                        .fail(DeadLetter {
                            record,
                            stage: Stage::Decode,
                            reason: cause.reason,
                            message: cause.message,
                            route: self.no_route.clone(),
                            attempts: 0,
                            dropped_value: cause.dropped_value,
                            http_status: None,
                        })
                        .await?;
                }
            }
        }
        self.finish_ignored(&mut ignored).await?;
        for (lane, &count) in self.lanes.iter().zip(&matched) {
            if count > 0 {
                self.links
                    .metrics
                    .route_events
                    .with_label_values(&[&lane.name, "matched"])
                    .inc_by(count);
            }
        }
        for (lane, workers) in self.lanes.iter().zip(shares.iter_mut()) {
            for (worker, share) in lane.workers.iter().zip(workers.iter_mut()) {
                if !share.is_empty() {
                    let share = std::mem::replace(share, Vec::with_capacity(share.capacity()));
                    self.hand_over(lane, worker, share).await?;
                }
            }
        }
        Ok(())
    }

    /// Replaces each record whose payload holds a batch of events (OTLP) by one record per
    /// event, in place and in order. The records of one batch keep its key and partition, so
    /// they go to the same worker of a route, in the batch's order, and share one countdown:
    /// the Kafka record is finished (and its offset committed) with the last of them, with the
    /// worst of their outcomes. A payload that is not a batch at all stays one record, marked
    /// with why, and is dead-lettered whole.
    fn split_batches(&self, batch: &mut Vec<Record>) {
        let records = std::mem::take(batch);
        batch.reserve(records.len());
        for mut record in records {
            // Already decoded: too large to be copied by the consumer.
            if record.decoded.is_some() {
                batch.push(record);
                continue;
            }
            match self.links.decoder.split(record.payload(), usize::MAX) {
                None => batch.push(record),
                Some(Err(err)) => {
                    record.decoded = Some(Err(err));
                    batch.push(record);
                }
                Some(Ok(parts)) => {
                    let fan_out = (parts.len() > 1).then(|| FanOut::new(parts.len()));
                    // Each event is finished (or abandoned) on its own, and counted out on its
                    // own; `split` never gives an empty list.
                    self.links
                        .metrics
                        .in_flight
                        .add(parts.len().saturating_sub(1) as i64);
                    for (index, part) in parts.into_iter().enumerate() {
                        batch.push(record.part(
                            index as u32,
                            &part.payload,
                            part.decoded,
                            fan_out.as_ref(),
                        ));
                    }
                }
            }
        }
    }

    /// Puts `record` in the share of its worker in each of `targets` (in configuration order;
    /// never empty). To several routes, each gets a copy, and the copies share one countdown:
    /// the record is finished when the last of them is (one event of a batch already shares
    /// its batch's countdown, which counts the copies too).
    fn share_out(&self, mut record: Record, targets: &[usize], shares: &mut [Vec<Vec<Record>>]) {
        let Some((&first, rest)) = targets.split_first() else {
            return;
        };
        if !rest.is_empty() {
            let fan_out = match &record.fan_out {
                Some(fan_out) => {
                    fan_out.grow(rest.len());
                    fan_out.clone()
                }
                None => {
                    let fan_out = FanOut::new(targets.len());
                    record.fan_out = Some(fan_out.clone());
                    fan_out
                }
            };
            // Each copy is finished (or abandoned) on its own, and counted out on its own.
            self.links.metrics.in_flight.add(rest.len() as i64);
            for &lane in rest {
                let copy = record.copy_for_route(&fan_out);
                let worker = self.lanes[lane].worker_for(&copy);
                shares[lane][worker].push(copy);
            }
        }
        let worker = self.lanes[first].worker_for(&record);
        shares[first][worker].push(record);
    }

    /// Sends the acks of the records no route took, as one message.
    async fn finish_ignored(&self, ignored: &mut Vec<ProcessAck>) -> Result<(), StageGone> {
        if ignored.is_empty() {
            return Ok(());
        }
        self.links
            .metrics
            .finished
            .with_label_values(&[NO_ROUTE, AckStatus::Ignored.as_str()])
            .inc_by(ignored.len() as u64);
        self.links.committer.acks(std::mem::take(ignored)).await
    }

    /// What becomes of a record (`no_value`: its value is null); the lanes it goes to, if any,
    /// in `targets`.
    fn decide(&self, record: &mut Record, no_value: bool, targets: &mut Vec<usize>) -> Decision {
        let level = match record.decode(&self.links.decoder, self.rules.need_service) {
            // A null value: a tombstone (compacted topics delete keys with them), not a
            // malformed event.
            Err(DecodeError::Empty) if no_value => {
                return match self.links.tombstones {
                    TombstonePolicy::Skip => Decision::Ignore { tombstone: true },
                    TombstonePolicy::DeadLetter => Decision::Fail(DeadLetterCause {
                        reason: TOMBSTONE,
                        message: "the record has no value (a tombstone)".to_string(),
                        dropped_value: None,
                    }),
                };
            }
            Err(err) => {
                self.links
                    .metrics
                    .decode_errors
                    .with_label_values(&[err.reason()])
                    .inc();
                // Logged once, with its outcome, by `Failures::fail`.
                return Decision::Fail(DeadLetterCause {
                    reason: err.reason(),
                    message: err.to_string(),
                    // Its value was never copied (see the consumer).
                    dropped_value: match err {
                        DecodeError::TooLarge { size, .. } => Some(*size),
                        _ => None,
                    },
                });
            }
            // The rules read the record too: the level is let go of it (a static name, or a
            // short string for a level outside the known ones).
            Ok(level) => level.clone(),
        };
        self.rules.lanes(&level, record, targets);
        match targets.is_empty() {
            false => Decision::Lanes,
            true => match self.links.unrouted {
                UnroutedPolicy::Ignore => Decision::Ignore { tombstone: false },
                UnroutedPolicy::DeadLetter => Decision::Fail(DeadLetterCause {
                    reason: UNROUTED,
                    message: format!("no route takes level `{level}`"),
                    dropped_value: None,
                }),
            },
        }
    }

    /// Hands a worker its share of a batch, waiting while its channel is full.
    async fn hand_over(
        &self,
        lane: &RouteLane,
        worker: &WorkerHandle,
        share: Vec<Record>,
    ) -> Result<(), StageGone> {
        // The wait on a full worker channel is backpressure caused by this route. It is
        // counted while it lasts (in slices), so that a route stuck for good shows up in the
        // metric too, not only once it moves again.
        let share = match worker.offer(share) {
            // Room in the channel: no wait, no timer (the common case).
            Offer::Taken => return Ok(()),
            Offer::Full(share) | Offer::Stopped(share) => share,
        };
        let backpressure = self
            .links
            .metrics
            .backpressure_seconds
            .with_label_values(&[&lane.name]);
        let send = worker.send(share);
        tokio::pin!(send);
        let mut counted_until = Instant::now();
        let result = loop {
            tokio::select! {
                result = &mut send => break result,
                _ = tokio::time::sleep(BACKPRESSURE_SLICE) => {
                    backpressure.inc_by(counted_until.elapsed().as_secs_f64());
                    counted_until = Instant::now();
                }
            }
        };
        let waited = counted_until.elapsed().as_secs_f64();
        if waited > 0.000_1 {
            backpressure.inc_by(waited);
        }
        if let Err(unsent) = result {
            // A worker only stops at shutdown or when it failed: these records are not
            // finished, so nothing is committed past them, and the router stops.
            let first = &unsent[0];
            warn!(
                route = %lane.name,
                topic = %first.source.topic,
                partition = first.source.partition,
                offset = first.offset,
                records = unsent.len(),
                "worker gone, records not delivered"
            );
            return Err(StageGone("worker"));
        }
        Ok(())
    }
}

/// Most records the consumer sends to a router channel of `router_capacity` in one batch: half
/// the channel (what it waits for when the channel is full), at most [`CONSUMER_BATCH`].
pub fn consumer_batch(router_capacity: usize) -> usize {
    (router_capacity / 2).clamp(1, CONSUMER_BATCH)
}

/// Which of `workers` takes a record: a stable hash of its key, or its partition if it has none.
pub fn worker_index(record: &Record, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    (order_key(record) % workers as u64) as usize
}

/// What a record keeps its order with: its key (hashed), or its partition if it has none.
/// Records with equal order keys are delivered in offset order.
pub fn order_key(record: &Record) -> u64 {
    match record.key() {
        Some(key) => fnv1a(key),
        None => record.source.partition as u32 as u64,
    }
}

/// FNV-1a: stable across builds and platforms, so a key keeps its worker after a restart.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&str>, partition: i32) -> Record {
        let payload = br#"{"level":"info","message":"m"}"#;
        crate::record::test_record(partition, 0, key.map(str::as_bytes), Some(payload))
    }

    #[test]
    fn same_key_same_worker_whatever_the_partition() {
        for key in ["a", "user-17", "checkout", ""] {
            let first = worker_index(&record(Some(key), 0), 4);
            for partition in 1..8 {
                assert_eq!(worker_index(&record(Some(key), partition), 4), first);
            }
        }
    }

    #[test]
    fn keyless_records_follow_their_partition_and_keys_spread() {
        assert_eq!(worker_index(&record(None, 5), 4), 1);
        assert_eq!(worker_index(&record(None, 5), 1), 0);
        let used: std::collections::HashSet<usize> = (0..64)
            .map(|i| worker_index(&record(Some(&format!("key-{i}")), 0), 4))
            .collect();
        assert_eq!(used.len(), 4, "64 keys should reach all 4 workers");
    }

    use crate::committer::CommitterMsg;
    use crate::record::test_record;
    use std::time::Duration;

    /// A test router's links: these handles and metrics, `decoder`, nothing fenced, tombstones
    /// skipped, unrouted events ignored, no transaction gate, no schema registry.
    fn test_links(
        committer: CommitterHandle,
        dead_letters: DeadLetterHandle,
        metrics: &Arc<Metrics>,
        decoder: Decoder,
    ) -> RouterLinks {
        RouterLinks {
            committer,
            dead_letters,
            fences: Fences::default(),
            metrics: metrics.clone(),
            liveness: Liveness::default(),
            tombstones: TombstonePolicy::Skip,
            decoder,
            unrouted: UnroutedPolicy::Ignore,
            gate: None,
            registry: None,
            stop: Default::default(),
        }
    }

    /// One lane of one worker per name, and each worker's inbox.
    fn one_worker_lanes(names: &[&str]) -> (Vec<RouteLane>, Vec<BatchReceiver<Record>>) {
        names
            .iter()
            .map(|name| {
                let (worker, inbox) = WorkerHandle::for_test(64);
                let lane = RouteLane {
                    name: Arc::from(*name),
                    workers: vec![worker],
                    by_partition: false,
                };
                (lane, inbox)
            })
            .unzip()
    }

    struct Routed {
        /// What each worker of the one route received, by worker.
        workers: Vec<Vec<i64>>,
        /// What the committer received, in order: dispatched offsets and acks.
        committer: Vec<String>,
        metrics: Arc<Metrics>,
    }

    /// Routes `records` through a router with one route (`errors`: level error, two workers)
    /// and no dead-letter topic; `fenced` partitions are revoked before the router runs.
    async fn route(records: Vec<Record>, fenced: &[i32], tombstones: TombstonePolicy) -> Routed {
        let metrics = Arc::new(Metrics::new());
        let (committer, mut messages, dead_letters) = DeadLetterHandle::for_test(&metrics);
        let (worker_a, mut inbox_a) = WorkerHandle::for_test(64);
        let (worker_b, mut inbox_b) = WorkerHandle::for_test(64);
        let table = RouteTable {
            lanes: vec![RouteLane {
                name: Arc::from("errors"),
                workers: vec![worker_a, worker_b],
                by_partition: false,
            }],
            rules: Rules::for_levels(&[("error", 0)]),
        };
        let fences = Fences::default();
        for partition in fenced {
            fences.revoke(
                &crate::record::PartitionKey {
                    topic: crate::record::Topic::new("logs"),
                    partition: *partition,
                },
                1,
            );
        }
        let (router, task) = RouterHandle::spawn(
            64,
            table,
            RouterLinks {
                fences,
                tombstones,
                ..test_links(committer, dead_letters, &metrics, Decoder::default())
            },
        );
        assert!(matches!(router.offer(records), Offer::Taken));
        drop(router);
        task.await.expect("router ran");
        let mut workers = Vec::new();
        for inbox in [&mut inbox_a, &mut inbox_b] {
            let mut records = Vec::new();
            // The router has stopped, so its handles to the workers are gone: the inbox ends.
            while inbox.recv_many(&mut records, usize::MAX).await > 0 {}
            workers.push(
                records
                    .iter()
                    .map(|record| record.offset)
                    .collect::<Vec<_>>(),
            );
        }
        let describe = |ack: crate::record::ProcessAck| {
            format!(
                "ack {} {}{}",
                ack.offset,
                ack.status.as_str(),
                ack.cause
                    .map(|c| format!(" {}", c.reason))
                    .unwrap_or_default()
            )
        };
        let mut committer = Vec::new();
        while let Ok(message) = messages.try_recv() {
            match message {
                CommitterMsg::Dispatched(dispatches) => committer.push(format!(
                    "dispatched {:?}",
                    dispatches.iter().map(|d| d.offset).collect::<Vec<_>>()
                )),
                CommitterMsg::Ack(ack) => committer.push(describe(ack)),
                CommitterMsg::Acks(acks) => committer.extend(acks.into_iter().map(describe)),
            }
        }
        Routed {
            workers,
            committer,
            metrics,
        }
    }

    fn with_level(offset: i64, key: &str, level: &str) -> Record {
        let payload = format!(r#"{{"level":"{level}","message":"m"}}"#);
        test_record(0, offset, Some(key.as_bytes()), Some(payload.as_bytes()))
    }

    #[tokio::test]
    async fn the_router_dispatches_first_then_routes_ignores_and_fails() {
        let records = vec![
            with_level(0, "a", "error"),
            with_level(1, "b", "info"),
            test_record(0, 2, Some(b"c"), Some(b"not json")),
            with_level(3, "a", "ERROR"),
            test_record(0, 4, Some(b"gone"), None),
        ];
        let routed = route(records, &[], TombstonePolicy::Skip).await;
        // The dispatch of the batch precedes every ack.
        assert_eq!(routed.committer[0], "dispatched [0, 1, 2, 3, 4]");
        assert_eq!(
            routed.committer[1..],
            [
                "ack 1 ignored".to_string(),
                "ack 2 failed not_json".to_string(),
                "ack 4 ignored".to_string(),
            ]
        );
        // Both error records of key `a` went to the same worker, in order; nothing else did.
        let mut delivered: Vec<&Vec<i64>> =
            routed.workers.iter().filter(|w| !w.is_empty()).collect();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered.pop(), Some(&vec![0, 3]));
        let metrics = &routed.metrics;
        assert_eq!(
            metrics.decode_errors.with_label_values(&["not_json"]).get(),
            1
        );
        assert_eq!(metrics.tombstones.with_label_values(&["skipped"]).get(), 1);
        assert_eq!(
            metrics
                .finished
                .with_label_values(&[NO_ROUTE, "ignored"])
                .get(),
            2
        );
    }

    #[tokio::test]
    async fn records_of_a_revoked_generation_are_dropped_not_dispatched() {
        let records = vec![
            with_level(0, "a", "error"),
            test_record(
                1,
                0,
                Some(b"b"),
                Some(br#"{"level":"error","message":"m"}"#),
            ),
        ];
        let routed = route(records, &[0], TombstonePolicy::Skip).await;
        assert_eq!(routed.committer, ["dispatched [0]".to_string()]);
        let delivered: Vec<i64> = routed.workers.concat();
        assert_eq!(delivered, vec![0], "only partition 1's record");
        assert_eq!(routed.metrics.abandoned.get(), 1);
    }

    /// A batch waiting for a schema registry that does not answer: `/readyz`'s reason is set,
    /// nothing is dispatched; once its partition is revoked the record is dropped (counted as
    /// abandoned) and the reason is cleared, though the registry still does not answer.
    #[tokio::test]
    async fn a_batch_waiting_for_the_registry_drops_revoked_records_and_stops_saying_it_waits() {
        // A port bound, then closed: connections to it are refused.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free port");
        let registry = Arc::new(
            crate::schema_registry::SchemaRegistry::new(&crate::config::SchemaRegistryConfig {
                url: format!("http://{address}"),
                auth: None,
                ca_file: None,
                timeout_ms: 500,
                max_schemas: 10,
            })
            .expect("a client"),
        );
        let mut trouble = registry.trouble();
        let metrics = Arc::new(Metrics::new());
        let (committer, mut messages, dead_letters) = DeadLetterHandle::for_test(&metrics);
        let (lanes, _inboxes) = one_worker_lanes(&["errors"]);
        let fences = Fences::default();
        let (router, task) = RouterHandle::spawn(
            64,
            RouteTable {
                lanes,
                rules: Rules::for_levels(&[("error", 0)]),
            },
            RouterLinks {
                fences: fences.clone(),
                registry: Some(registry.clone()),
                ..test_links(committer, dead_letters, &metrics, Decoder::default())
            },
        );
        metrics.in_flight.add(1);
        let wire = [0, 0, 0, 0, 7, 2, 4];
        let mut record = test_record(0, 3, Some(b"k"), Some(&wire));
        // Not decoded yet, as the consumer hands it over.
        record.decoded = None;
        assert!(matches!(router.offer(vec![record]), Offer::Taken));
        tokio::time::timeout(Duration::from_secs(10), trouble.wait_for(Option::is_some))
            .await
            .expect("the reason is set")
            .expect("the registry's watch");
        assert!(
            messages.try_recv().is_err(),
            "nothing dispatched while it waits"
        );
        fences.revoke(
            &crate::record::PartitionKey {
                topic: crate::record::Topic::new("logs"),
                partition: 0,
            },
            1,
        );
        tokio::time::timeout(Duration::from_secs(10), trouble.wait_for(Option::is_none))
            .await
            .expect("the reason is cleared")
            .expect("the registry's watch");
        drop(router);
        task.await.expect("router ran");
        assert!(
            messages.try_recv().is_err(),
            "the revoked record was not dispatched"
        );
        assert_eq!(metrics.abandoned.get(), 1);
        assert_eq!(metrics.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn tombstones_can_be_dead_lettered() {
        let routed = route(
            vec![test_record(0, 9, Some(b"k"), None)],
            &[],
            TombstonePolicy::DeadLetter,
        )
        .await;
        assert_eq!(
            routed.committer,
            [
                "dispatched [9]".to_string(),
                "ack 9 failed tombstone".to_string()
            ]
        );
        assert_eq!(
            routed
                .metrics
                .tombstones
                .with_label_values(&["dead_lettered"])
                .get(),
            1
        );
    }

    #[test]
    fn fnv1a_is_the_published_hash() {
        // FNV-1a 64 test vectors: a key must keep its worker across builds and restarts.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    // Real time: the waiter blocks a thread of its own, which a paused clock would not wait for.
    #[tokio::test]
    async fn the_handle_offers_waits_for_half_the_channel_and_knows_when_it_is_half_empty() {
        let (sender, mut receiver) = channel::channel(8);
        let router = RouterHandle { sender };
        let runtime = tokio::runtime::Handle::current();
        let records = |offsets: std::ops::Range<i64>| -> Vec<Record> {
            offsets
                .map(|offset| with_level(offset, "k", "error"))
                .collect()
        };
        assert_eq!(router.max_batch(), 4, "half the channel");
        assert!(router.half_empty());
        assert!(matches!(router.offer(records(0..4)), Offer::Taken));
        assert!(router.half_empty(), "4 of 8 free");
        assert!(matches!(router.offer(records(4..5)), Offer::Taken));
        assert!(!router.half_empty(), "3 of 8 free");
        assert!(
            matches!(router.offer(records(5..9)), Offer::Full(back) if back.len() == 4),
            "a batch goes whole or not at all"
        );
        assert!(matches!(router.offer(records(5..8)), Offer::Taken));
        assert!(matches!(router.offer(records(8..9)), Offer::Full(_)));
        // No wait at all: given back at once.
        assert!(matches!(
            router.wait_for_room(records(8..9), Duration::ZERO, &runtime),
            Offer::Full(_)
        ));
        // Half the channel frees up while the consumer waits: taken. (wait_for_room blocks its
        // thread, as on the consumer's; it runs on a thread of its own here.)
        let waiting = router.clone();
        let waiter = std::thread::spawn(move || {
            waiting.wait_for_room(records(8..9), Duration::from_secs(5), &runtime)
        });
        let mut taken = Vec::new();
        receiver.recv_many(&mut taken, 1).await;
        assert_eq!(
            taken.len(),
            4,
            "the first batch: 4 slots free of the 4 it waits for"
        );
        let offer = tokio::task::spawn_blocking(move || waiter.join().expect("joined"))
            .await
            .expect("joined");
        assert!(matches!(offer, Offer::Taken), "taken once half was free");
        // The spare permits went back: 1 + 3 + the waiter's 1 are in the channel, 3 free.
        assert_eq!(router.room(), 3);
        let waiting = router.clone();
        let runtime = tokio::runtime::Handle::current();
        let waiter = std::thread::spawn(move || {
            waiting.wait_for_room(records(9..10), Duration::from_secs(5), &runtime)
        });
        // Time enough for a waiter that wanted less than half to have taken its slot.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "3 free of the 4 it waits for");
        taken.clear();
        receiver.recv_many(&mut taken, 1).await;
        assert_eq!(taken.len(), 1, "the second batch frees one");
        let offer = tokio::task::spawn_blocking(move || waiter.join().expect("joined"))
            .await
            .expect("joined");
        assert!(matches!(offer, Offer::Taken), "taken once half was free");
        drop(receiver);
        assert!(matches!(router.offer(records(10..11)), Offer::Stopped(_)));
    }

    #[tokio::test]
    async fn an_empty_value_is_a_decode_failure_and_an_oversized_one_is_parked_without_it() {
        let metrics = Arc::new(Metrics::new());
        let (committer, _messages) = CommitterHandle::for_test();
        let (dead_letters, mut parked) = DeadLetterHandle::capturing_for_test(&metrics);
        let (router, task) = RouterHandle::spawn(
            8,
            RouteTable {
                lanes: Vec::new(),
                rules: Rules::default(),
            },
            test_links(committer, dead_letters, &metrics, Decoder::default()),
        );
        // Zero bytes (not a null value): malformed, not a tombstone.
        let empty = test_record(0, 0, Some(b"k"), Some(b""));
        // Over max_payload_bytes: the consumer did not copy the value.
        let mut oversized = test_record(0, 1, Some(b"k"), None);
        oversized.decoded = Some(Err(DecodeError::TooLarge {
            size: 5_000_000,
            limit: 1_048_576,
        }));
        assert!(matches!(router.offer(vec![empty, oversized]), Offer::Taken));
        drop(router);
        task.await.expect("router ran");
        let first = parked.recv().await.expect("the empty record");
        assert_eq!((first.reason, first.dropped_value), ("empty", None));
        let second = parked.recv().await.expect("the oversized record");
        assert_eq!(
            (second.reason, second.dropped_value),
            ("too_large", Some(5_000_000)),
            "parked without its value, its size said"
        );
        assert_eq!(metrics.tombstones.with_label_values(&["skipped"]).get(), 0);
    }

    #[test]
    fn the_first_route_whose_conditions_hold_takes_an_event_else_the_default() {
        let text = r#"
            [kafka]
            brokers = "b:9092"
            group_id = "g"
            topics = ["logs", "audit"]
            [[routes]]
            name = "tenant-a"
            levels = ["error"]
            header = { name = "tenant", value = "a" }
            sink = { type = "null" }
            [[routes]]
            name = "audit"
            levels = ["info", "error"]
            topics = ["audit"]
            sink = { type = "null" }
            [[routes]]
            name = "checkout"
            levels = ["error"]
            services = ["checkout", "cart"]
            sink = { type = "null" }
            [[routes]]
            name = "errors"
            levels = ["error"]
            sink = { type = "null" }
            [[routes]]
            name = "rest"
            default = true
            sink = { type = "null" }
        "#;
        let config = crate::Config::from_toml_str(text).expect("valid");
        let rules = Rules::from_routes(&config.routes);
        assert!(rules.need_service);
        let event = |topic: &str, tenant: Option<&str>| {
            let mut record = crate::record::test_record(0, 1, None, Some(b"{}"));
            record.source.topic = Topic::new(topic);
            record.headers = tenant.map(|tenant| {
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "tenant",
                    value: Some(tenant),
                })
            });
            record
        };
        let level = |name: &str| Level::new(name);
        let cases = [
            ("error", "logs", Some("a"), Some(0)),
            ("error", "audit", Some("a"), Some(0)),
            ("error", "audit", Some("b"), Some(1)),
            ("error", "logs", Some("b"), Some(3)),
            ("error", "logs", None, Some(3)),
            ("info", "audit", None, Some(1)),
            ("info", "logs", None, Some(4)),
            ("debug", "audit", Some("a"), Some(4)),
            ("whatever", "logs", None, Some(4)),
        ];
        for (name, topic, tenant, lane) in cases {
            assert_eq!(
                rules.lane(&level(name), &event(topic, tenant)),
                lane,
                "{name} on {topic}, tenant {tenant:?}"
            );
        }
        let with_service = |service: &str| {
            let mut record = event("logs", None);
            record.service = Some(Box::from(service));
            record
        };
        assert_eq!(rules.lane(&level("error"), &with_service("cart")), Some(2));
        assert_eq!(
            rules.lane(&level("error"), &with_service("billing")),
            Some(3)
        );
        assert_eq!(rules.lane(&level("info"), &with_service("cart")), Some(4));
        // Without a default route, what no route takes has no lane.
        let no_default = Rules::from_routes(&config.routes[..4]);
        assert_eq!(no_default.lane(&level("info"), &event("logs", None)), None);
    }

    /// `continue` lets the routes after a matching one take the event too, up to the first
    /// matching route that does not continue; the default route takes only what none took.
    #[test]
    fn continuing_routes_fan_out_up_to_the_first_that_does_not_continue() {
        let text = r#"
            [kafka]
            brokers = "localhost:9092"
            group_id = "g"
            topics = ["logs"]
            [[routes]]
            name = "archive"
            levels = ["error", "warning", "info"]
            continue = true
            sink = { type = "null" }
            [[routes]]
            name = "errors"
            levels = ["error"]
            sink = { type = "null" }
            [[routes]]
            name = "audit"
            levels = ["warning"]
            continue = true
            sink = { type = "null" }
            [[routes]]
            name = "warnings"
            levels = ["warning"]
            sink = { type = "null" }
            [[routes]]
            name = "rest"
            default = true
            sink = { type = "null" }
        "#;
        let config = crate::Config::from_toml_str(text).expect("valid");
        let rules = Rules::from_routes(&config.routes);
        let record = crate::record::test_record(0, 1, None, Some(b"{}"));
        let lanes = |level: &str| {
            let mut lanes = Vec::new();
            rules.lanes(&Level::new(level), &record, &mut lanes);
            lanes
        };
        assert_eq!(lanes("error"), [0, 1]);
        assert_eq!(lanes("warning"), [0, 2, 3]);
        assert_eq!(
            lanes("info"),
            [0],
            "archive took it: not the default route's"
        );
        assert_eq!(lanes("debug"), [4]);
    }

    /// A record for three lanes reaches a worker of each, as copies that share one countdown;
    /// the in-flight gauge counts each copy.
    #[tokio::test]
    async fn a_record_for_three_lanes_reaches_each_as_a_copy() {
        let metrics = Arc::new(Metrics::new());
        let (committer, mut messages, dead_letters) = DeadLetterHandle::for_test(&metrics);
        let (lanes, mut inboxes) = one_worker_lanes(&["a", "b", "c"]);
        let mut rules = Rules::for_levels(&[("error", 0), ("error", 1), ("error", 2)]);
        rules.continues = vec![true, true, false];
        let (router, task) = RouterHandle::spawn(
            64,
            RouteTable { lanes, rules },
            test_links(committer, dead_letters, &metrics, Decoder::default()),
        );
        let records = vec![with_level(0, "k", "error"), with_level(1, "k", "info")];
        metrics.in_flight.add(2);
        assert!(matches!(router.offer(records), Offer::Taken));
        drop(router);
        task.await.expect("router ran");
        let mut copies = Vec::new();
        for inbox in &mut inboxes {
            let mut records = Vec::new();
            while inbox.recv_many(&mut records, usize::MAX).await > 0 {}
            assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [0]);
            copies.extend(records);
        }
        let shared = copies[0].fan_out.clone().expect("a countdown");
        assert!(copies.iter().all(|copy| copy
            .fan_out
            .as_ref()
            .is_some_and(|f| Arc::ptr_eq(f, &shared))));
        assert_eq!(copies[1].payload(), copies[0].payload());
        // Two records read; record 0 is three copies now, record 1 was finished (ignored).
        let mut ignored = 0;
        while let Ok(message) = messages.try_recv() {
            if let CommitterMsg::Acks(acks) = message {
                ignored += acks.len();
            }
        }
        assert_eq!(ignored, 1);
        assert_eq!(
            metrics.in_flight.get(),
            4,
            "3 copies + 1 record not yet counted out"
        );
    }

    /// An OTLP request is split into one record per log record, all at the Kafka record's
    /// offset and sharing one countdown, which the copies of a log record sent to two routes
    /// join; a bad log record fails alone, a payload that is no request fails whole; the Kafka
    /// record finishes with the last of its records, with the worst outcome.
    #[tokio::test]
    async fn an_otlp_request_becomes_a_record_per_log_record_with_one_countdown() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
        use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
        use prost::Message as _;

        let metrics = Arc::new(Metrics::new());
        let (committer, mut messages, dead_letters) = DeadLetterHandle::for_test(&metrics);
        let (lanes, mut inboxes) = one_worker_lanes(&["errors", "all"]);
        let mut rules = Rules::for_levels(&[("error", 0), ("error", 1), ("info", 1)]);
        rules.continues = vec![true, false];
        let (router, task) = RouterHandle::spawn(
            64,
            RouteTable { lanes, rules },
            test_links(
                committer,
                dead_letters,
                &metrics,
                Decoder::from(crate::event::InputFormat::OtlpProto),
            ),
        );
        let log = |severity_number: i32| LogRecord {
            severity_number,
            ..Default::default()
        };
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    // error (to both routes), info (to `all`), no severity at all.
                    log_records: vec![log(17), log(9), log(0)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let mut batch = test_record(0, 0, Some(b"k"), Some(&request));
        batch.decoded = None;
        let mut cut = test_record(0, 1, Some(b"k"), Some(&request[..request.len() - 1]));
        cut.decoded = None;
        metrics.in_flight.add(2);
        assert!(matches!(router.offer(vec![batch, cut]), Offer::Taken));
        drop(router);
        task.await.expect("router ran");

        let mut delivered = Vec::new();
        for inbox in &mut inboxes {
            let mut records = Vec::new();
            while inbox.recv_many(&mut records, usize::MAX).await > 0 {}
            delivered.push(records);
        }
        let levels = |records: &[Record]| -> Vec<(i64, String)> {
            records
                .iter()
                .map(|r| {
                    let level = r.decoded.clone().and_then(Result::ok).expect("decoded");
                    (r.offset, level.to_string())
                })
                .collect()
        };
        assert_eq!(levels(&delivered[0]), [(0, "error".to_string())]);
        assert_eq!(
            levels(&delivered[1]),
            [(0, "error".to_string()), (0, "info".to_string())]
        );
        let event: serde_json::Value =
            serde_json::from_slice(delivered[1][1].payload().expect("a value")).expect("JSON");
        assert_eq!(event["level"], "info");
        assert_eq!(delivered[1][1].key(), Some(&b"k"[..]), "the batch's key");

        let mut failed = Vec::new();
        while let Ok(message) = messages.try_recv() {
            match message {
                CommitterMsg::Dispatched(dispatches) => assert_eq!(
                    dispatches.iter().map(|d| d.offset).collect::<Vec<_>>(),
                    [0, 1],
                    "one dispatch per Kafka record"
                ),
                CommitterMsg::Ack(ack) => failed.push(ack),
                CommitterMsg::Acks(acks) => failed.extend(acks),
            }
        }
        let reasons: Vec<(i64, &str)> = failed
            .iter()
            .map(|ack| (ack.offset, ack.cause.as_ref().map_or("", |c| c.reason)))
            .collect();
        assert_eq!(reasons, [(0, "missing_field"), (1, "not_protobuf")]);
        assert!(
            failed[1].fan_out.is_none(),
            "a payload that is no request is one record"
        );
        assert_eq!(
            metrics.in_flight.get(),
            2 + 2 + 1,
            "two records read, two more log records, one more copy"
        );
        // The countdown: three log records and one copy; the last one finishes the record,
        // with the worst outcome (the failed log record).
        let countdown = failed[0].fan_out.clone().expect("a countdown");
        for record in delivered.iter().flatten() {
            let shared = record.fan_out.as_ref().expect("shared");
            assert!(Arc::ptr_eq(shared, &countdown));
        }
        assert_eq!(
            countdown.finish(failed[0].status, failed[0].cause.clone()),
            None
        );
        assert_eq!(countdown.finish(AckStatus::Processed, None), None);
        assert_eq!(countdown.finish(AckStatus::Processed, None), None);
        let (status, cause) = countdown
            .finish(AckStatus::Processed, None)
            .expect("the fourth of four finishes the record");
        assert_eq!(status, AckStatus::Failed);
        assert_eq!(cause.map(|c| c.reason), Some("missing_field"));
        assert_eq!(
            metrics
                .decode_errors
                .with_label_values(&["missing_field"])
                .get(),
            1
        );
    }
}
