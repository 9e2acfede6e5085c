//! Every Prometheus metric logbridge exports, registered in one place with its help text.
//!
//! Names follow `logbridge_<noun>_<unit>[_total]`; topic, partition, route, stage and status
//! are labels drawn from small known sets (never offsets, keys or messages). Each pipeline owns
//! its own registry, so tests can run several pipelines in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::record::PartitionKey;

/// Label value used for records that never reached a route (undecodable or unrouted).
pub const NO_ROUTE: &str = "none";

/// How many messages wait in one channel, read through a weak sender (which never keeps the
/// channel open) for the `logbridge_channel_depth_records` gauge.
pub(crate) struct DepthProbe(Box<dyn Fn() -> i64 + Send + Sync>);

impl DepthProbe {
    /// The probe of `sender`'s channel.
    pub(crate) fn of<T: Send + 'static>(sender: &tokio::sync::mpsc::Sender<T>) -> DepthProbe {
        let weak = sender.downgrade();
        DepthProbe(Box::new(move || {
            weak.upgrade()
                .map_or(0, |open| (open.max_capacity() - open.capacity()) as i64)
        }))
    }

    /// A probe that reads the depth with `read`.
    pub(crate) fn from_fn(read: impl Fn() -> i64 + Send + Sync + 'static) -> DepthProbe {
        DepthProbe(Box::new(read))
    }

    /// Messages in the channel now (0 once it is closed).
    pub(crate) fn depth(&self) -> i64 {
        (self.0)()
    }
}

/// The metrics of one pipeline.
pub struct Metrics {
    registry: Registry,
    /// Records read from Kafka, by topic.
    pub consumed: IntCounterVec,
    /// Records finished, by route and status.
    pub finished: IntCounterVec,
    /// What each route did with the events it took, by route and outcome ([`ROUTE_OUTCOMES`]).
    pub route_events: IntCounterVec,
    /// Records that failed to decode, by reason.
    pub decode_errors: IntCounterVec,
    /// Records a sink failed to deliver, by route.
    pub sink_errors: IntCounterVec,
    /// Commit requests, by result (`ok`, `error`, `stale`).
    pub commits: IntCounterVec,
    /// Partitions currently paused, by reason ([`PAUSE_REASONS`]).
    pub paused_partitions: IntGaugeVec,
    /// Pause actions taken on partitions, by reason.
    pub pauses: IntCounterVec,
    /// Resume actions taken on partitions.
    pub resumes: IntCounter,
    /// Records queued in a stage's input channel, by stage (`router`, `committer`, `worker`)
    /// and route (a worker's route; `none` for the other stages).
    pub channel_depth: IntGaugeVec,
    /// Records handed to the router and not yet finished.
    pub in_flight: IntGauge,
    /// Partitions this instance owns.
    pub assigned_partitions: IntGauge,
    /// Rebalance events, by kind (`assign`, `revoke`, `error`).
    pub rebalances: IntCounterVec,
    /// Acks dropped because their partition was revoked since (fenced by generation).
    pub stale_acks: IntCounter,
    /// Last committed offset (next offset to read), by topic and partition.
    pub committed_offset: IntGaugeVec,
    /// Records dispatched and not finished, by topic and partition.
    pub partition_in_flight: IntGaugeVec,
    /// Finished records waiting behind an unfinished one (not committable yet).
    pub partition_uncommitted_gap: IntGaugeVec,
    /// Highest finished offset, by topic and partition.
    pub partition_finished_offset: IntGaugeVec,
    /// Age of the oldest unfinished record, by topic and partition.
    pub partition_oldest_unfinished: prometheus::GaugeVec,
    /// 1 while a partition is paused, by topic and partition.
    pub partition_paused: IntGaugeVec,
    /// Stalled partitions, by reason (`unfinished`: records waiting and the commit not moving;
    /// `unread`: records waiting to be read and nothing read).
    pub stalled_partitions: IntGaugeVec,
    /// Payload and key bytes held between the consumer and the committer.
    pub in_flight_bytes: IntGauge,
    /// Records with a null value, by what was done with them.
    pub tombstones: IntCounterVec,
    /// 1 while the dead-letter topic refuses writes.
    pub dead_letter_failing: IntGauge,
    /// Time from reading a record to its delivery by the route's sink.
    pub processing_latency: prometheus::HistogramVec,
    /// Records between the committed offset and the high watermark (librdkafka statistics).
    pub partition_lag: IntGaugeVec,
    /// Broker round-trip time (librdkafka statistics, average of the last window).
    pub broker_rtt: prometheus::GaugeVec,
    /// Seconds the router spent waiting on a full worker channel, by route.
    pub backpressure_seconds: prometheus::CounterVec,
    /// Time from a worker taking a batch to its sink confirming it.
    pub sink_latency: prometheus::HistogramVec,
    /// Duration of the final drain at shutdown.
    pub drain_seconds: Histogram,
    /// Records parked in the dead-letter topic, by stage and reason.
    pub dead_letters: IntCounterVec,
    /// Failed attempts to produce to the dead-letter topic (they are retried).
    pub dead_letter_errors: IntCounter,
    /// Refusals of a dead letter that trying again cannot fix (after logbridge shrank it or
    /// gave it a key where that helps), by reason: the dead letter waits for an operator.
    pub dead_letter_refused: IntCounterVec,
    /// Delivery retries, by route.
    pub retries: IntCounterVec,
    /// 1 while the dead-letter breaker has stopped consumption.
    pub breaker_tripped: IntGauge,
    /// Records of revoked partitions left unfinished (or undispatched) for the next owner.
    pub abandoned: IntCounter,
    /// Time a revoke waited for the revoked partitions' in-flight records.
    pub revoke_drain_seconds: Histogram,
    /// Records returned again under the same assignment (the fetch position moved back): skipped.
    pub read_again: IntCounter,
    /// Times a partition's log moved back under its fetch position.
    pub moved_back: IntCounter,
    /// The runtime's live tasks, read when the metrics are rendered.
    runtime_tasks: IntGauge,
    /// Times the client moved a partition's fetch position after a fetch error (offset out of
    /// range, say): records between the old and the new position are skipped or read again.
    pub offset_resets: IntCounter,
    /// File sinks closed and opened again on SIGHUP, by route.
    pub file_reopens: IntCounterVec,
    /// Payload and key bytes read from Kafka, by topic.
    pub consumed_bytes: IntCounterVec,
    /// Payload bytes of the records a route's sink delivered, by route.
    pub delivered_bytes: IntCounterVec,
    /// Transactions ended (`delivery = "exactly-once"`), by outcome (`committed`, `aborted`)
    /// and reason (`interval`, `revoke`, `shutdown` when committed; why, when aborted).
    pub transactions: IntCounterVec,
    /// Time from a transaction's begin to the end of its commit or abort.
    pub transaction_seconds: Histogram,
    /// Times the transactional producer was fenced (or failed fatally): the instance stops.
    pub transactions_fenced: IntCounter,
}

/// Why partitions are paused, as the `reason` label of the pause metrics: `backpressure` (the
/// router channel stayed full), `bytes` (`max_in_flight_bytes`), `uncommitted`
/// (`max_uncommitted_records`), `breaker` (the dead-letter breaker), `shutdown`.
pub const PAUSE_REASONS: [&str; 5] = [
    "backpressure",
    "bytes",
    "uncommitted",
    "breaker",
    "shutdown",
];

/// What a route did with an event, as the `outcome` label of `logbridge_route_events_total`.
pub const ROUTE_OUTCOMES: [&str; 5] = [
    "matched",
    "transformed",
    "sampled_out",
    "throttled",
    "transform_failed",
];

/// Errors the Kafka clients report (librdkafka's error callback), by client (`consumer`,
/// `sink producer`, `dead-letter producer`) and librdkafka error code. One family for the
/// process: the clients are made where no pipeline's metrics reach (the sink factory), and
/// every pipeline's registry shows it.
pub fn kafka_client_errors() -> &'static IntCounterVec {
    static ERRORS: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    ERRORS.get_or_init(|| {
        IntCounterVec::new(
            Opts::new(
                "logbridge_kafka_client_errors_total",
                "Errors the Kafka clients reported, by client and librdkafka error code.",
            ),
            &["client", "code"],
        )
        .expect(METRIC_OK)
    })
}

/// Log records an OTLP endpoint rejected for good in a partial-success answer, by route.
/// Process-wide for the same reason as [`kafka_client_errors`] (made in the sink).
pub fn otlp_rejected_records() -> &'static IntCounterVec {
    static REJECTED: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    REJECTED.get_or_init(|| {
        IntCounterVec::new(
            Opts::new(
                "logbridge_otlp_rejected_records_total",
                "Log records an OTLP endpoint answered as rejected (partial success), by route: OTLP says not to send them again and does not say which records they were, so their request counts as delivered and its offsets are committed.",
            ),
            &["route"],
        )
        .expect(METRIC_OK)
    })
}

/// A process-wide counter family (of the object-store sink, the schema registry's client),
/// made where it is counted, like [`otlp_rejected_records`].
fn process_counter(
    cell: &'static std::sync::OnceLock<IntCounterVec>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> &'static IntCounterVec {
    cell.get_or_init(|| IntCounterVec::new(Opts::new(name, help), labels).expect(METRIC_OK))
}

/// Objects the object-store sink closed, by route and by what closed them.
pub fn object_store_objects() -> &'static IntCounterVec {
    static CELL: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    process_counter(
        &CELL,
        "logbridge_object_store_objects_total",
        "Objects the object-store sink closed, by route and cut: records, bytes, directory or age (boundaries that depend only on the records), idle, revoke, flush or pressure (the clock, a rebalance, a shutdown, the in-flight bound).",
        &["route", "cut"],
    )
}

/// Records the object-store sink stored, or found stored already when replaying.
pub fn object_store_records() -> &'static IntCounterVec {
    static CELL: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    process_counter(
        &CELL,
        "logbridge_object_store_records_total",
        "Records of the object-store sink by route and outcome: stored (in an object uploaded now) or already_stored (a replayed record an object stored before holds, not written again).",
        &["route", "outcome"],
    )
}

/// Compressed bytes of the objects uploaded.
pub fn object_store_bytes() -> &'static IntCounterVec {
    static CELL: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    process_counter(
        &CELL,
        "logbridge_object_store_bytes_total",
        "Bytes (compressed) of the objects the object-store sink uploaded, by route.",
        &["route"],
    )
}

/// Failed requests to the object store, retried.
pub fn object_store_failures() -> &'static IntCounterVec {
    static CELL: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    process_counter(
        &CELL,
        "logbridge_object_store_failures_total",
        "Requests to the object store that failed and are retried (their records wait, uncommitted), by route and operation (upload, list).",
        &["route", "operation"],
    )
}

/// Requests for schemas to the Schema Registry, by outcome.
pub fn schema_registry_requests() -> &'static IntCounterVec {
    static CELL: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    process_counter(
        &CELL,
        "logbridge_schema_registry_requests_total",
        "Schema fetches from the Schema Registry (input.schema_registry) by outcome: answered (a schema, or the registry's \"no such schema\") or failed (unreachable, an error status: the records wait and the fetch is retried).",
        &["outcome"],
    )
}

/// Kafka producers replaced after a fatal librdkafka error (the idempotent producer's
/// `rd_kafka_fatal_error`) or a change of a file a property is read from, by client (`sink producer`, `dead-letter producer`). Process-wide
/// for the same reason as [`kafka_client_errors`].
pub fn kafka_producer_rebuilds() -> &'static IntCounterVec {
    static REBUILDS: std::sync::OnceLock<IntCounterVec> = std::sync::OnceLock::new();
    REBUILDS.get_or_init(|| {
        IntCounterVec::new(
            Opts::new(
                "logbridge_kafka_producer_rebuilds_total",
                "Kafka producers replaced by a new one, by client: after a fatal librdkafka error, or when a file one of its properties is read from (${file:...}) changed; records in flight on the old one are retried on the new one.",
            ),
            &["client"],
        )
        .expect(METRIC_OK)
    })
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let metrics = Metrics {
            consumed: IntCounterVec::new(
                Opts::new(
                    "logbridge_events_consumed_total",
                    "Records read from Kafka, by topic.",
                ),
                &["topic"],
            )
            .expect(METRIC_OK),
            finished: IntCounterVec::new(
                Opts::new(
                    "logbridge_events_finished_total",
                    "Records finished, by route and status (processed, ignored, failed, dead_lettered).",
                ),
                &["route", "status"],
            )
            .expect(METRIC_OK),
            route_events: IntCounterVec::new(
                Opts::new(
                    "logbridge_route_events_total",
                    "Events each route took, by route and outcome: matched (the route took it; with fan-out, each route that took it counts it), transformed (its transforms changed it), sampled_out, throttled, transform_failed.",
                ),
                &["route", "outcome"],
            )
            .expect(METRIC_OK),
            decode_errors: IntCounterVec::new(
                Opts::new(
                    "logbridge_decode_errors_total",
                    "Records that could not be decoded as a log event, by reason.",
                ),
                &["reason"],
            )
            .expect(METRIC_OK),
            sink_errors: IntCounterVec::new(
                Opts::new(
                    "logbridge_sink_errors_total",
                    "Records a sink failed to deliver, by route.",
                ),
                &["route"],
            )
            .expect(METRIC_OK),
            commits: IntCounterVec::new(
                Opts::new(
                    "logbridge_commits_total",
                    "Offset commit requests, by result (ok, error, stale).",
                ),
                &["result"],
            )
            .expect(METRIC_OK),
            paused_partitions: IntGaugeVec::new(
                Opts::new(
                    "logbridge_paused_partitions",
                    "Partitions paused now, by reason (backpressure: the router channel stayed full; bytes: max_in_flight_bytes; uncommitted: max_uncommitted_records; breaker: the dead-letter breaker; shutdown).",
                ),
                &["reason"],
            )
            .expect(METRIC_OK),
            pauses: IntCounterVec::new(
                Opts::new(
                    "logbridge_partition_pauses_total",
                    "Times a partition was paused, by reason (as logbridge_paused_partitions).",
                ),
                &["reason"],
            )
            .expect(METRIC_OK),
            resumes: IntCounter::new(
                "logbridge_partition_resumes_total",
                "Times a paused partition was resumed.",
            )
            .expect(METRIC_OK),
            channel_depth: IntGaugeVec::new(
                Opts::new(
                    "logbridge_channel_depth_records",
                    "Records waiting in a stage's input channel, by stage (router, committer, worker) and route (none but for workers).",
                ),
                &["stage", "route"],
            )
            .expect(METRIC_OK),
            in_flight: IntGauge::new(
                "logbridge_in_flight_records",
                "Records handed to the router and not yet finished.",
            )
            .expect(METRIC_OK),
            assigned_partitions: IntGauge::new(
                "logbridge_assigned_partitions",
                "Partitions assigned to this instance.",
            )
            .expect(METRIC_OK),
            rebalances: IntCounterVec::new(
                Opts::new(
                    "logbridge_rebalances_total",
                    "Rebalance events, by kind (assign, revoke, lost, error).",
                ),
                &["kind"],
            )
            .expect(METRIC_OK),
            stale_acks: IntCounter::new(
                "logbridge_stale_acks_total",
                "Acks discarded because their partition was revoked after the record was read.",
            )
            .expect(METRIC_OK),
            committed_offset: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_committed_offset",
                    "Last committed offset (the next offset to read), by topic and partition.",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            partition_in_flight: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_in_flight_records",
                    "Records dispatched and not finished, by topic and partition.",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            partition_uncommitted_gap: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_finished_uncommitted_records",
                    "Finished records that wait behind an unfinished one before they can be committed.",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            partition_finished_offset: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_finished_offset",
                    "Highest finished offset, by topic and partition.",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            partition_oldest_unfinished: prometheus::GaugeVec::new(
                Opts::new(
                    "logbridge_partition_oldest_unfinished_age_seconds",
                    "Age of the oldest dispatched record that has not finished, by topic and partition (0 when none).",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            partition_paused: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_paused",
                    "1 while the partition is paused (router full, breaker or shutdown), else 0.",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            stalled_partitions: IntGaugeVec::new(
                Opts::new(
                    "logbridge_stalled_partitions",
                    "Partitions stalled for stall_timeout_ms, by reason: unfinished (records in flight, commit not moving) or unread (records waiting to be read, nothing read).",
                ),
                &["reason"],
            )
            .expect(METRIC_OK),
            in_flight_bytes: IntGauge::new(
                "logbridge_in_flight_bytes",
                "Payload and key bytes of the records held between the consumer and the committer (bounded by pipeline.max_in_flight_bytes).",
            )
            .expect(METRIC_OK),
            tombstones: IntCounterVec::new(
                Opts::new(
                    "logbridge_tombstones_total",
                    "Records with a null value (tombstones), by action: skipped or dead_lettered.",
                ),
                &["action"],
            )
            .expect(METRIC_OK),
            dead_letter_failing: IntGauge::new(
                "logbridge_dead_letter_failing",
                "1 while the dead-letter topic refuses writes (the records wait and their offsets stay uncommitted), else 0.",
            )
            .expect(METRIC_OK),
            processing_latency: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "logbridge_processing_latency_seconds",
                    "Time from reading a record from Kafka to its delivery by the route's sink, by route.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
                ]),
                &["route"],
            )
            .expect(METRIC_OK),
            partition_lag: IntGaugeVec::new(
                Opts::new(
                    "logbridge_partition_lag_records",
                    "Records between the committed offset and the high watermark, by topic and partition (from librdkafka statistics).",
                ),
                &["topic", "partition"],
            )
            .expect(METRIC_OK),
            broker_rtt: prometheus::GaugeVec::new(
                Opts::new(
                    "logbridge_broker_rtt_seconds",
                    "Average broker round-trip time over librdkafka's last statistics window, by broker.",
                ),
                &["broker"],
            )
            .expect(METRIC_OK),
            backpressure_seconds: prometheus::CounterVec::new(
                Opts::new(
                    "logbridge_backpressure_seconds_total",
                    "Seconds the router waited on a full worker channel, by the route that caused it.",
                ),
                &["route"],
            )
            .expect(METRIC_OK),
            sink_latency: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "logbridge_sink_latency_seconds",
                    "Time for a sink to confirm a batch, by route.",
                )
                // Up to the timeouts a confirmation may take: an HTTP sink's 10 s by default,
                // a Kafka sink's delivery timeout (librdkafka's message.timeout.ms, 300 s).
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0,
                ]),
                &["route"],
            )
            .expect(METRIC_OK),
            drain_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "logbridge_drain_duration_seconds",
                    "Time the final drain at shutdown took.",
                )
                .buckets(vec![0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect(METRIC_OK),
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "logbridge_dead_letters_total",
                    "Records parked in the dead-letter topic, by stage (decode, route, sink) and reason.",
                ),
                &["stage", "reason"],
            )
            .expect(METRIC_OK),
            dead_letter_errors: IntCounter::new(
                "logbridge_dead_letter_errors_total",
                "Failed attempts to produce a dead letter (retried until they succeed).",
            )
            .expect(METRIC_OK),
            dead_letter_refused: IntCounterVec::new(
                Opts::new(
                    "logbridge_dead_letter_refused_total",
                    "Refusals of a dead letter that retrying cannot fix (record_too_large without value and headers, record_invalid, not_allowed), by reason; the letter is kept and retried, and the partitions wait, until an operator fixes the topic or its ACLs.",
                ),
                &["reason"],
            )
            .expect(METRIC_OK),
            retries: IntCounterVec::new(
                Opts::new(
                    "logbridge_delivery_retries_total",
                    "Records whose delivery was retried, by route.",
                ),
                &["route"],
            )
            .expect(METRIC_OK),
            breaker_tripped: IntGauge::new(
                "logbridge_breaker_tripped",
                "1 while the dead-letter breaker has stopped consumption, else 0.",
            )
            .expect(METRIC_OK),
            read_again: IntCounter::new(
                "logbridge_records_read_again_total",
                "Records the client returned again after a later offset of the same partition and assignment, identical to what was read there (same timestamp and size); skipped, they were taken already.",
            )
            .expect(METRIC_OK),
            runtime_tasks: IntGauge::new(
                "logbridge_runtime_tasks",
                "Tasks alive in the async runtime that serves the metrics (a number that only grows is a leak).",
            )
            .expect(METRIC_OK),
            moved_back: IntCounter::new(
                "logbridge_log_moved_back_total",
                "Times a partition returned a record at or below an offset read already that is not the record read there (topic recreated, log truncated): its records are read as new from there, and its commit may move back.",
            )
            .expect(METRIC_OK),
            offset_resets: IntCounter::new(
                "logbridge_offset_resets_total",
                "Times the Kafka client reset a partition's fetch position after a fetch error (offset out of range, say): the records between the old and the new position are skipped if it moved forward, read again if it moved back.",
            )
            .expect(METRIC_OK),
            file_reopens: IntCounterVec::new(
                Opts::new(
                    "logbridge_file_reopens_total",
                    "Times a route's output file was closed and opened again on SIGHUP (after logrotate renamed it), by route.",
                ),
                &["route"],
            )
            .expect(METRIC_OK),
            abandoned: IntCounter::new(
                "logbridge_revoke_abandoned_records_total",
                "Records of revoked partitions not finished by the revoke; the next owner reads them again.",
            )
            .expect(METRIC_OK),
            revoke_drain_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "logbridge_revoke_drain_duration_seconds",
                    "Time a revoke waited for the revoked partitions' in-flight records.",
                )
                .buckets(vec![0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect(METRIC_OK),
            consumed_bytes: IntCounterVec::new(
                Opts::new(
                    "logbridge_consumed_bytes_total",
                    "Payload and key bytes read from Kafka, by topic.",
                ),
                &["topic"],
            )
            .expect(METRIC_OK),
            delivered_bytes: IntCounterVec::new(
                Opts::new(
                    "logbridge_delivered_bytes_total",
                    "Payload bytes of the records a route's sink delivered, by route.",
                ),
                &["route"],
            )
            .expect(METRIC_OK),
            transactions: IntCounterVec::new(
                Opts::new(
                    "logbridge_transactions_total",
                    "Transactions ended (delivery = exactly-once), by outcome (committed, aborted) and reason.",
                ),
                &["outcome", "reason"],
            )
            .expect(METRIC_OK),
            transaction_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "logbridge_transaction_duration_seconds",
                    "Time from a transaction's begin to the end of its commit or abort.",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .expect(METRIC_OK),
            transactions_fenced: IntCounter::new(
                "logbridge_transactions_fenced_total",
                "Times the transactional producer was fenced or failed fatally; the instance stops (exit status 1).",
            )
            .expect(METRIC_OK),
            registry,
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.consumed.clone()),
            Box::new(self.finished.clone()),
            Box::new(self.decode_errors.clone()),
            Box::new(self.sink_errors.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.paused_partitions.clone()),
            Box::new(self.pauses.clone()),
            Box::new(self.resumes.clone()),
            Box::new(self.channel_depth.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.assigned_partitions.clone()),
            Box::new(self.rebalances.clone()),
            Box::new(self.stale_acks.clone()),
            Box::new(self.committed_offset.clone()),
            Box::new(self.partition_in_flight.clone()),
            Box::new(self.partition_uncommitted_gap.clone()),
            Box::new(self.partition_finished_offset.clone()),
            Box::new(self.partition_oldest_unfinished.clone()),
            Box::new(self.partition_lag.clone()),
            Box::new(self.partition_paused.clone()),
            Box::new(self.stalled_partitions.clone()),
            Box::new(self.in_flight_bytes.clone()),
            Box::new(self.tombstones.clone()),
            Box::new(self.dead_letter_failing.clone()),
            Box::new(self.processing_latency.clone()),
            Box::new(self.broker_rtt.clone()),
            Box::new(self.backpressure_seconds.clone()),
            Box::new(self.route_events.clone()),
            Box::new(self.sink_latency.clone()),
            Box::new(self.drain_seconds.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.dead_letter_errors.clone()),
            Box::new(self.dead_letter_refused.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.breaker_tripped.clone()),
            Box::new(self.abandoned.clone()),
            Box::new(self.revoke_drain_seconds.clone()),
            Box::new(self.read_again.clone()),
            Box::new(self.moved_back.clone()),
            Box::new(self.runtime_tasks.clone()),
            Box::new(self.offset_resets.clone()),
            Box::new(self.file_reopens.clone()),
            Box::new(self.consumed_bytes.clone()),
            Box::new(self.delivered_bytes.clone()),
            Box::new(self.transactions.clone()),
            Box::new(self.transaction_seconds.clone()),
            Box::new(self.transactions_fenced.clone()),
            Box::new(kafka_client_errors().clone()),
            Box::new(kafka_producer_rebuilds().clone()),
            Box::new(otlp_rejected_records().clone()),
            Box::new(object_store_objects().clone()),
            Box::new(object_store_records().clone()),
            Box::new(object_store_bytes().clone()),
            Box::new(object_store_failures().clone()),
            Box::new(schema_registry_requests().clone()),
        ];
        for collector in collectors {
            // Names are unique literals above; a clash is a programming error caught by the
            // unit test below, never by input.
            self.registry.register(collector).expect(METRIC_OK);
        }
        // Series that alerts look for exist from the start, at 0.
        for reason in ["unfinished", "unread"] {
            self.stalled_partitions.with_label_values(&[reason]).set(0);
        }
        for action in ["skipped", "dead_lettered"] {
            self.tombstones.with_label_values(&[action]);
        }
        for reason in ["record_too_large", "record_invalid", "not_allowed"] {
            self.dead_letter_refused.with_label_values(&[reason]);
        }
        for reason in PAUSE_REASONS {
            self.paused_partitions.with_label_values(&[reason]).set(0);
            self.pauses.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new(
                "logbridge_build_info",
                "Always 1; labels carry the version of this build.",
            ),
            &["version"],
        )
        .expect(METRIC_OK);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self.registry
            .register(Box::new(build_info))
            .expect(METRIC_OK);
        #[cfg(target_os = "linux")]
        {
            // The standard names (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
            // `process_open_fds`, ...), which generic dashboards and alerts look for.
            let process = prometheus::process_collector::ProcessCollector::for_self();
            self.registry.register(Box::new(process)).expect(METRIC_OK);
        }
    }

    /// Makes the series of `route` exist from the start, at 0 (so a rate over them is 0, not
    /// absent, until something happens).
    pub fn route_known(&self, route: &str) {
        for outcome in ROUTE_OUTCOMES {
            self.route_events.with_label_values(&[route, outcome]);
        }
    }

    /// Partitions paused now, whatever the reason.
    pub fn paused_total(&self) -> i64 {
        PAUSE_REASONS
            .iter()
            .map(|reason| self.paused_partitions.with_label_values(&[reason]).get())
            .sum()
    }

    /// Pauses so far, whatever the reason.
    pub fn pauses_total(&self) -> u64 {
        PAUSE_REASONS
            .iter()
            .map(|reason| self.pauses.with_label_values(&[reason]).get())
            .sum()
    }

    /// Sets a partition's committed offset gauge.
    pub fn set_committed(&self, source: &PartitionKey, offset: i64) {
        let partition = source.partition.to_string();
        self.committed_offset
            .with_label_values(&[&*source.topic, &partition])
            .set(offset);
    }

    /// Sets a partition's progress gauges.
    pub fn set_partition(
        &self,
        source: &PartitionKey,
        in_flight: usize,
        uncommitted_gap: usize,
        finished: Option<i64>,
        oldest_unfinished_age: Option<std::time::Duration>,
    ) {
        let partition = source.partition.to_string();
        let labels = [&*source.topic, partition.as_str()];
        self.partition_in_flight
            .with_label_values(&labels)
            .set(in_flight as i64);
        self.partition_uncommitted_gap
            .with_label_values(&labels)
            .set(uncommitted_gap as i64);
        if let Some(offset) = finished {
            self.partition_finished_offset
                .with_label_values(&labels)
                .set(offset);
        }
        self.partition_oldest_unfinished
            .with_label_values(&labels)
            .set(oldest_unfinished_age.map_or(0.0, |age| age.as_secs_f64()));
    }

    /// Removes every series of a partition this instance no longer owns, so dashboards never
    /// show a stale owner.
    pub fn forget_partition(&self, source: &PartitionKey) {
        let partition = source.partition.to_string();
        let labels = [&*source.topic, partition.as_str()];
        // An error only means the series was never created.
        let _ = self.committed_offset.remove_label_values(&labels);
        let _ = self.partition_in_flight.remove_label_values(&labels);
        let _ = self.partition_uncommitted_gap.remove_label_values(&labels);
        let _ = self.partition_finished_offset.remove_label_values(&labels);
        let _ = self
            .partition_oldest_unfinished
            .remove_label_values(&labels);
        let _ = self.partition_lag.remove_label_values(&labels);
        let _ = self.partition_paused.remove_label_values(&labels);
    }

    /// The current value of one of a partition's gauges, if that series exists. (Looking it
    /// up by label values would create it.)
    pub fn partition_value(
        &self,
        gauge: &dyn prometheus::core::Collector,
        source: &PartitionKey,
    ) -> Option<f64> {
        let partition = source.partition.to_string();
        gauge
            .collect()
            .iter()
            .flat_map(|family| family.get_metric().iter())
            .find(|metric| {
                let labels = metric.get_label();
                labels
                    .iter()
                    .any(|l| l.name() == "topic" && l.value() == &*source.topic)
                    && labels
                        .iter()
                        .any(|l| l.name() == "partition" && l.value() == partition)
            })
            .map(|metric| metric.get_gauge().get_value())
    }

    /// Every series of one of the partition gauges, by topic and partition: one collection for
    /// all partitions (where [`Metrics::partition_value`] collects every series to find one),
    /// so a page of every partition's gauges is linear in partitions.
    pub fn partition_values(
        &self,
        gauge: &dyn prometheus::core::Collector,
    ) -> std::collections::HashMap<(String, i32), f64> {
        let mut values = std::collections::HashMap::new();
        for family in gauge.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|label| label.name() == name)
                        .map(|label| label.value().to_string())
                };
                let partition = label("partition").and_then(|p| p.parse::<i32>().ok());
                if let (Some(topic), Some(partition)) = (label("topic"), partition) {
                    values.insert((topic, partition), metric.get_gauge().get_value());
                }
            }
        }
        values
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(runtime.metrics().num_alive_tasks() as i64);
        }
        let mut buffer = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which registration rules out.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

const METRIC_OK: &str = "metric definitions are static and valid";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help() {
        let metrics = Metrics::new();
        metrics.consumed.with_label_values(&["logs"]).inc();
        let source = PartitionKey {
            topic: crate::record::Topic::new("logs"),
            partition: 3,
        };
        metrics.set_committed(&source, 42);
        let text = metrics.render();
        assert!(text.contains("logbridge_events_consumed_total{topic=\"logs\"} 1"));
        assert!(text
            .contains("logbridge_partition_committed_offset{partition=\"3\",topic=\"logs\"} 42"));
        assert!(text.contains("# HELP logbridge_build_info"));
        metrics.forget_partition(&source);
        assert!(!metrics
            .render()
            .contains("logbridge_partition_committed_offset{"));
    }
}
