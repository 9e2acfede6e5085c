//! The HTTP destinations' section of a route: `sink = { type = "http", ... }` and
//! `sink = { type = "elasticsearch", ... }` share it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_range, invalid, ConfigError, REDACTED};

/// Where and how a route's records are sent over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Endpoint (`http://` or `https://`). For `elasticsearch`, the cluster's base URL: batches
    /// go to `<url>/_bulk`.
    pub url: String,
    /// `http` only: `POST` (default) or `PUT`.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra request headers (values may be `${env:NAME}` or `${file:/path}` references).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `http` only: `ndjson` (one original payload per line, the default) or `json_array`.
    #[serde(default)]
    pub format: HttpFormat,
    /// Request body compression: `none` (default) or `gzip`.
    #[serde(default)]
    pub compression: Compression,
    /// Basic or bearer authentication.
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// PEM file of CA certificates trusted for `https://` besides the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time allowed for one request, connecting included; past it the batch is retried.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most records in one request (a worker's batch is split into requests by this and
    /// `max_bytes`).
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// How long a worker with fewer than `max_records` records (and fewer than 256, a worker's
    /// largest batch) waits for more before sending; 0 (default): it sends what it has. Keep it
    /// well below `pipeline.drain_timeout_ms`: records waiting here are in flight.
    #[serde(default)]
    pub linger_ms: u64,
    /// Most payload bytes in one request (before compression); a single larger record is sent
    /// alone.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// `elasticsearch` only: the index each event is written to. `{level}`, `{service}` (the
    /// event's, `unknown` when it has none) and `{date}` (the record's timestamp as
    /// `YYYY.MM.DD`, UTC) are replaced.
    #[serde(default)]
    pub index: Option<String>,
}

/// HTTP method of the generic sink.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `POST`.
    #[default]
    Post,
    /// `PUT`.
    Put,
}

/// Request body layout of the generic sink.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HttpFormat {
    /// One original payload per line (`application/x-ndjson`).
    #[default]
    Ndjson,
    /// One JSON array of the original payloads (`application/json`).
    JsonArray,
}

/// Request body compression.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Sent as is.
    #[default]
    None,
    /// `Content-Encoding: gzip`.
    Gzip,
}

/// Credentials sent with every request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum HttpAuth {
    /// `Authorization: Basic ...`.
    Basic {
        /// User name.
        username: String,
        /// Password (use a `${env:NAME}` or `${file:/path}` reference).
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// Token (use a reference).
        token: String,
    },
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_records() -> usize {
    500
}

fn default_max_bytes() -> usize {
    5 << 20
}

/// Header names whose values are secrets whatever the configuration says.
fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "authorization" || super::is_secret(&name) || name.contains("auth")
}

impl HttpSinkConfig {
    /// Checks the section of route sink `key` (`routes[0].sink`); `elasticsearch` says which
    /// type it is.
    pub fn validate(&self, key: &str, elasticsearch: bool) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{key}.{name}");
        let url = self.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 9 {
            return Err(invalid(
                field("url"),
                format!("`{}` is not an http:// or https:// URL", self.url),
            ));
        }
        // The parser the sink itself uses, so a URL that passes here also works there.
        if reqwest::Url::parse(url).is_err() {
            return Err(invalid(
                field("url"),
                format!("`{}` is not a valid URL", self.url),
            ));
        }
        check_range(&field("timeout_ms"), self.timeout_ms, 1, 600_000)?;
        check_range(&field("max_records"), self.max_records, 1, 100_000)?;
        check_range(&field("max_bytes"), self.max_bytes, 1, 1 << 30)?;
        check_range(&field("linger_ms"), self.linger_ms, 0, 60_000)?;
        for name in self.headers.keys() {
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(
                    field(&format!("headers.{name}")),
                    "not a valid HTTP header name",
                ));
            }
        }
        for (name, value) in &self.headers {
            if hyper::header::HeaderValue::from_str(value).is_err() {
                return Err(invalid(
                    field(&format!("headers.{name}")),
                    "not a valid HTTP header value (control characters or non-ASCII)",
                ));
            }
        }
        if let Some(path) = &self.ca_file {
            if let Err(err) = std::fs::read(path) {
                return Err(invalid(
                    field("ca_file"),
                    format!("cannot read {}: {err}", path.display()),
                ));
            }
        }
        match (elasticsearch, &self.index) {
            (true, None) => Err(invalid(
                field("index"),
                "an elasticsearch sink needs an index (e.g. \"logs-{level}-{date}\")",
            )),
            (true, Some(index)) if index.trim().is_empty() => {
                Err(invalid(field("index"), "empty index name"))
            }
            (true, Some(_)) if self.format != HttpFormat::Ndjson => Err(invalid(
                field("format"),
                "an elasticsearch sink always sends _bulk NDJSON: remove it",
            )),
            (true, Some(_)) if self.method != HttpMethod::Post => Err(invalid(
                field("method"),
                "an elasticsearch sink always POSTs to _bulk: remove it",
            )),
            (false, Some(_)) => Err(invalid(
                field("index"),
                "only an elasticsearch sink has an index",
            )),
            _ => Ok(()),
        }
    }

    /// The secret values of this section (auth, authorization-like headers).
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        let auth = match &self.auth {
            Some(HttpAuth::Basic { password, .. }) => Some(password.as_str()),
            Some(HttpAuth::Bearer { token }) => Some(token.as_str()),
            None => None,
        };
        auth.into_iter().chain(
            self.headers
                .iter()
                .filter(|(name, _)| is_secret_header(name))
                .map(|(_, value)| value.as_str()),
        )
    }

    /// A copy with the secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> HttpSinkConfig {
        let mut copy = self.clone();
        match &mut copy.auth {
            Some(HttpAuth::Basic { password, .. }) => *password = REDACTED.to_string(),
            Some(HttpAuth::Bearer { token }) => *token = REDACTED.to_string(),
            None => {}
        }
        for (name, value) in copy.headers.iter_mut() {
            if is_secret_header(name) {
                *value = REDACTED.to_string();
            }
        }
        copy
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, HttpAuth, SinkConfig, REDACTED};

    fn config(sink: &str) -> String {
        format!(
            r#"
            [kafka]
            brokers = "localhost:9092"
            group_id = "g"
            topics = ["logs"]
            [[routes]]
            name = "out"
            levels = ["error"]
            sink = {sink}
            "#
        )
    }

    fn load(sink: &str) -> Result<Config, String> {
        crate::config::load_jailed(&config(sink), &[("LB_TEST_TOKEN", "t0ken-from-env")])
    }

    #[test]
    fn http_sinks_load_with_their_defaults() {
        let config = load(r#"{ type = "http", url = "http://127.0.0.1:8080/in" }"#).unwrap();
        let SinkConfig::Http(http) = &config.routes[0].sink else {
            panic!("an http sink");
        };
        assert_eq!(
            (http.timeout_ms, http.max_records, http.max_bytes),
            (10_000, 500, 5 << 20)
        );
        let config = load(
            r#"{ type = "elasticsearch", url = "https://es:9200", index = "logs-{level}", auth = { type = "bearer", token = "${env:LB_TEST_TOKEN}" } }"#,
        )
        .unwrap();
        let SinkConfig::Elasticsearch(es) = &config.routes[0].sink else {
            panic!("an elasticsearch sink");
        };
        assert_eq!(
            es.auth,
            Some(HttpAuth::Bearer {
                token: "t0ken-from-env".to_string()
            })
        );
    }

    #[test]
    fn bad_http_sinks_name_their_key() {
        let cases = [
            (
                r#"{ type = "http", url = "ftp://host/x" }"#,
                "routes[0].sink.url",
            ),
            (
                r#"{ type = "http", url = "http://" }"#,
                "routes[0].sink.url",
            ),
            (
                r#"{ type = "http", url = "http://h/x", timeout_ms = 0 }"#,
                "routes[0].sink.timeout_ms",
            ),
            (
                r#"{ type = "http", url = "http://h/x", max_records = 0 }"#,
                "routes[0].sink.max_records",
            ),
            (
                r#"{ type = "http", url = "http://h/x", headers = { "bad name" = "v" } }"#,
                "routes[0].sink.headers.bad name",
            ),
            (
                r#"{ type = "http", url = "http://h/x", headers = { "X-A" = "line\nbreak" } }"#,
                "routes[0].sink.headers.X-A",
            ),
            (
                r#"{ type = "http", url = "http://h/x", ca_file = "/nonexistent/ca.pem" }"#,
                "routes[0].sink.ca_file",
            ),
            (
                r#"{ type = "http", url = "http://h/x", index = "logs" }"#,
                "routes[0].sink.index",
            ),
            (
                r#"{ type = "elasticsearch", url = "http://h:9200" }"#,
                "routes[0].sink.index",
            ),
            (
                r#"{ type = "elasticsearch", url = "http://h:9200", index = "l", format = "json_array" }"#,
                "routes[0].sink.format",
            ),
            (
                r#"{ type = "elasticsearch", url = "http://h:9200", index = "l", method = "PUT" }"#,
                "routes[0].sink.method",
            ),
        ];
        for (sink, key) in cases {
            let err = load(sink).expect_err(sink);
            assert!(err.contains(key), "{sink}: {err}");
        }
        let err = load(r#"{ type = "http", url = "http://h/x", compression = "brotli" }"#)
            .expect_err("unknown compression");
        assert!(err.contains("brotli") && err.contains("gzip"), "{err}");
        let err =
            load(r#"{ type = "http", url = "http://h/x", retries = 3 }"#).expect_err("unknown key");
        assert!(err.contains("retries"), "{err}");
    }

    #[test]
    fn credentials_and_auth_headers_are_redacted() {
        let config = load(
            r#"{ type = "http", url = "http://h/x", auth = { type = "basic", username = "u", password = "pa55word" }, headers = { "X-Api-Key" = "k3y-value", "Authorization-Extra" = "s3cret-extra", "X-Plain" = "visible" } }"#,
        )
        .unwrap();
        let shown = config.to_toml();
        for secret in ["pa55word", "k3y-value", "s3cret-extra"] {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
            assert!(
                config.secrets().iter().any(|s| s == secret),
                "{secret} scrubbed"
            );
        }
        assert!(shown.contains("visible"), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");
        assert_eq!(
            config.scrub("request failed: pa55word"),
            format!("request failed: {REDACTED}")
        );
    }
}
