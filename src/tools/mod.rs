//! The commands around the pipeline, for users and tests: none of them is on the path of a
//! record. They use only the library's public face (`pipeline::run`, `config`, `metrics`,
//! `sink`, `consumer::client_config`).
//!
//! - [`demo`]: the whole pipeline against an in-process Kafka with sample traffic.
//! - [`produce`]: a load generator for a real Kafka.
//! - [`bench`]: throughput, CPU, memory and commits against raw librdkafka.
//! - [`check_config`]: validates a configuration file and prints it with defaults filled in.

pub mod bench;
pub mod demo;
pub mod produce;

use std::path::Path;

use crate::config::Config;

/// The `check-config` command: prints the configuration with defaults filled in and secrets
/// redacted on stdout, and `FILE: ok` or `FILE: error` on stderr. Returns whether it is valid.
pub fn check_config(file: &Path) -> bool {
    match Config::load(file) {
        Ok(config) => {
            println!("{}", config.to_toml());
            eprintln!("{}: ok", file.display());
            true
        }
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            false
        }
    }
}
