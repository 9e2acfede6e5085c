//! logbridge: consumes JSON log events from Kafka, routes them through actor-based workers to
//! their destinations, and commits Kafka offsets only for work that is really finished.
//!
//! ```text
//!            ┌──────────── commit (interval plan, revoke, final) ◀──────────────┐
//!            ▼                                                                   │
//! Kafka ─▶ consumer ─(router_capacity)─▶ router ─(worker_capacity)─▶ workers ─▶ sinks
//!  ▲  pause/resume │ revoke, finish        │ dispatched        acks │  │ failed
//!  │               ▼ (blocking request)    ▼                        ▼  ▼
//!  │           committer ◀───────────────────────────────────────── dead_letter ─▶ DLQ topic
//!  │               │ plan, holds, stalls, breaker state (all `watch`)
//!  └── consumer ◀──┘                                     http: /metrics /healthz /readyz /status
//! ```
//!
//! Records flow forward in batches through channels bounded in records ([`channel`]: consumer →
//! router → workers), then as acks to the committer (failed records through the dead-letter actor;
//! the committer's channel is bounded in messages); the way back to the consumer
//! is only `watch` channels (commit plans, partitions held for their uncommitted records,
//! breaker state) and the blocking revoke and finish requests the consumer thread makes itself.
//! Each record carries a charge against `max_in_flight_bytes` that it gives back when dropped.
//! Every actor has a handle that owns its input ([`router::RouterHandle`],
//! [`worker::WorkerHandle`], [`committer::CommitterHandle`], [`dead_letter::DeadLetterHandle`],
//! [`consumer::ConsumerHandle`]); a stage whose next stage is gone gets [`record::StageGone`]
//! and stops.
//!
//! Stages:
//! - [`consumer`]: polls librdkafka on its own thread, decodes each record once ([`event`]),
//!   pauses partitions instead of buffering, serves rebalances, and performs the commits.
//! - [`router`]: registers each record with the committer as dispatched, splits a record
//!   holding a batch (an OTLP logs request) into one record per log record sharing its offset
//!   and countdown, picks the routes
//!   (every route whose level and other conditions match, up to the first that does not
//!   `continue`, else the default route; a copy for each) and the worker by key hash (per-key
//!   order).
//! - [`worker`]: shapes each record on the way ([`shape`]: transforms, a templated
//!   destination), delivers batches to the route's [`sink`] (the Kafka sink through
//!   [`producer`], the HTTP, Elasticsearch and OTLP sinks in [`http_sink`], the OTLP log
//!   data model in [`otlp_sink`]), retries with backoff
//!   (never sooner than an HTTP `Retry-After`), and acks each record.
//! - [`dead_letter`]: parks what cannot be decoded or delivered in the dead-letter topic.
//! - [`committer`]: tracks dispatched and finished offsets ([`offsets`]) and decides what may be
//!   committed: the contiguous finished prefix of each partition; it owns the [`breaker`]'s
//!   switch, which stops consumption when too many records fail.
//!
//! Around them: [`record`] (the messages between stages), [`pipeline`] (wiring, start and
//! shutdown), [`config`] (with the security of each cluster and `${env:}`/`${file:}`
//! references), [`subscription`] (what `kafka.topics` names: topics and `^` patterns),
//! [`cluster`] (the probe behind `/readyz` and `check-config --connect`: reachable,
//! authenticated, topics present), [`client_log`] (librdkafka's errors, rate-limited),
//! [`metrics`], [`http`] and [`health`]. The commands beside the pipeline (demo, load generator,
//! benchmark, config check) are in [`tools`].

pub mod breaker;
pub mod channel;
pub mod client_log;
pub mod cluster;
pub mod committer;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod event;
pub mod health;
pub mod http;
pub mod http_sink;
pub mod metrics;
pub mod object_sink;
pub mod offsets;
pub mod otlp_sink;
pub mod pipeline;
pub mod producer;
pub mod record;
pub mod router;
pub mod schema_registry;
pub mod shape;
pub mod sink;
pub mod subscription;
pub mod tools;
pub mod transaction;
pub mod worker;

pub use config::Config;
pub use pipeline::{run, HttpBind, RunOptions};
