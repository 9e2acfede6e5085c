//! The commands around the pipeline, for users and tests: none of them is on the path of a
//! record. They use only the library's public face (`pipeline::run`, `config`, `metrics`,
//! `sink`, `consumer::client_config`).
//!
//! - [`demo`]: the whole pipeline against an in-process Kafka with sample traffic.
//! - [`produce`]: a load generator for a real Kafka.
//! - [`bench`]: throughput, CPU, memory and commits against raw librdkafka.
//! - [`check_config`]: validates a configuration file and prints it with defaults filled in;
//!   with `--connect`, checks clusters, credentials and topics.
//! - [`health`]: asks a running instance's `/healthz` or `/readyz` (container healthchecks).

pub mod bench;
mod check_config;
pub mod demo;
pub mod health;
pub mod produce;

pub use check_config::{check_config, CheckOutcome};
