//! logbridge: consumes JSON log events from Kafka, routes them through actor-based workers to
//! their destinations, and commits Kafka offsets only for work that is really finished.
//!
//! ```text
//! Kafka ─▶ consumer ─(bounded)─▶ router ─(bounded, per worker)─▶ workers ─▶ sinks
//!  ▲ commit   │ pause/resume when the router channel is full          │ ack
//!  └───────── consumer ◀── plan (watch) ── committer ◀── acks ────────┘
//! ```
//!
//! - [`consumer`]: polls librdkafka on its own thread, decodes each record once ([`event`]),
//!   pauses partitions instead of buffering, serves rebalances, and performs the commits.
//! - [`router`]: picks the route by level and the worker by key hash (per-key order).
//! - [`worker`]: delivers batches to the route's [`sink`], retries with backoff, and acks each
//!   record; what cannot be decoded or delivered goes to [`dead_letter`].
//! - [`committer`]: tracks dispatched and finished offsets ([`offsets`]) and decides what may
//!   be committed: the contiguous finished prefix of each partition; its [`breaker`] stops
//!   consumption when too many records fail.
//! - [`pipeline`] wires them; [`config`], [`metrics`], [`http`] and [`health`] serve them all.
//! - [`demo`] runs everything against an in-process Kafka with sample traffic;
//!   [`produce`] generates load for a real one.

pub mod bench;
pub mod breaker;
pub mod committer;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod demo;
pub mod event;
pub mod health;
pub mod http;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod produce;
pub mod producer;
pub mod record;
pub mod router;
pub mod sink;
pub mod worker;

pub use config::Config;
pub use pipeline::{run, HttpBind, RunOptions};
