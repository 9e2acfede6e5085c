//! `[input.schema_registry]`: where payloads in Confluent's wire format (a zero byte, a 4-byte
//! schema id, for Protobuf the message indexes, then Avro or Protobuf binary or JSON text) find
//! their schemas. See `schema_registry` for how records wait while the registry is down.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::http::{check_ca_file, check_http_url, redact_url, HttpAuth};
use super::{check_range, ConfigError};

/// A Schema Registry speaking Confluent's REST API (Confluent's own, Karapace, Apicurio's
/// `ccompat` API, Redpanda's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// The API's base URL: `http://registry:8081` for Confluent's and Karapace,
    /// `http://registry:8080/apis/ccompat/v7` for Apicurio. Schemas are read from
    /// `<url>/schemas/ids/<id>`.
    pub url: String,
    /// Basic or bearer authentication (`{ type = "basic", username = "...", password =
    /// "${env:SR_PASSWORD}" }`).
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// PEM file of CA certificates trusted for `https://` besides the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time allowed for one request, connecting included; past it the request is retried.
    #[serde(default = "super::http::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most schemas kept in memory (each fetched once per id); past it the oldest is dropped
    /// and fetched again when a record needs it.
    #[serde(default = "default_max_schemas")]
    pub max_schemas: usize,
}

fn default_max_schemas() -> usize {
    1_000
}

impl SchemaRegistryConfig {
    /// Checks the url, the CA file and the ranges (keys named under `input.schema_registry`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let key = |name: &str| format!("input.schema_registry.{name}");
        check_http_url(&key("url"), &self.url)?;
        if let Some(path) = &self.ca_file {
            check_ca_file(&key("ca_file"), path)?;
        }
        check_range(&key("timeout_ms"), self.timeout_ms, 100, 600_000)?;
        check_range(&key("max_schemas"), self.max_schemas, 1, 1_000_000)?;
        Ok(())
    }

    /// A copy with the secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> SchemaRegistryConfig {
        let mut copy = self.clone();
        copy.url = redact_url(&self.url);
        super::http::redact_auth(&mut copy.auth);
        copy
    }
}
