//! The HTTP destinations' section of a route: `sink = { type = "http", ... }`,
//! `sink = { type = "elasticsearch", ... }`, `sink = { type = "loki", ... }` and
//! `sink = { type = "otlp", ... }` share it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_range, invalid, ConfigError, REDACTED};

/// Where and how a route's records are sent over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Endpoint (`http://` or `https://`). For `elasticsearch`, the cluster's base URL: batches
    /// go to `<url>/_bulk`. For `otlp`, the collector's logs URL: a URL whose path does not
    /// end in `/v1/logs` gets it appended (`http://collector:4318` posts to
    /// `http://collector:4318/v1/logs`).
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
    /// Request body compression: `none` or `gzip`; default `none`, and `gzip` for `otlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
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
    /// `elasticsearch` only: written before every document id, which is
    /// `<id_prefix><topic>-<partition>-<offset>-<timestamp>` (the record's Kafka timestamp in
    /// milliseconds: a topic made again after a deletion starts at offset 0 again, and its
    /// records must not take the old documents' ids). Default: none. Set one per source
    /// cluster when clusters with the same topic names write to the same index (for example
    /// `"eu-1:"`), and never change it afterwards: a record replayed under another prefix is
    /// indexed again.
    #[serde(default)]
    pub id_prefix: Option<String>,
    /// `loki` only: the stream labels, each from a value with few possible values (Loki keeps
    /// an index per stream): `"{level}"`, `"{service}"`, `"{@topic}"`, `"{@partition}"` or
    /// literal text in a template, or `{ field = "env", values = ["prod", "dev"] }` (a value
    /// outside the list is labelled `other`). Default: `level` and `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, LokiLabel>>,
    /// `loki` only: fields of the event sent as structured metadata (queryable, not indexed):
    /// where values with many possible values belong (`trace_id`, `user.id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<String>,
    /// `loki` only: the tenant (`X-Scope-OrgID`) of a multi-tenant Loki.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Where a Loki stream label takes its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LokiLabel {
    /// A template of bounded parts: `{level}`, `{service}`, `{@topic}`, `{@partition}`,
    /// literal text.
    Template(String),
    /// A field of the event, limited to the values listed; any other value (or none) is
    /// labelled `other`.
    Field {
        /// The field ([`crate::shape::FieldPath`] syntax).
        field: String,
        /// The values kept as they are.
        values: Vec<String>,
    },
}

/// Most labels of a stream (Loki's `max_label_names_per_series` default).
pub const LOKI_MAX_LABELS: usize = 15;
/// Most listed values of a field label: past that a label is an index of its own, what Loki's
/// labels are not for.
pub const LOKI_MAX_LABEL_VALUES: usize = 100;

impl LokiLabel {
    /// Why this label's values are not bounded, if they are not.
    pub fn check(&self) -> Result<(), String> {
        match self {
            LokiLabel::Template(text) => {
                let template =
                    crate::shape::Template::parse(text, crate::shape::Sanitize::None, "label")
                        .map_err(|err| err.message)?;
                match template.unbounded_part() {
                    Some(part) => Err(format!(
                        "`{part}` has as many values as the events carry, and each value is a \
                         stream Loki indexes: use {{ field = \"...\", values = [...] }} to keep \
                         a few values, or `metadata` for the field"
                    )),
                    None => Ok(()),
                }
            }
            LokiLabel::Field { field, values } => {
                crate::shape::FieldPath::parse(field)?;
                if values.is_empty() || values.len() > LOKI_MAX_LABEL_VALUES {
                    return Err(format!(
                        "{} values: list 1 to {LOKI_MAX_LABEL_VALUES} (the others are labelled \
                         `other`); a field with more values belongs in `metadata`",
                        values.len()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Which of the sinks that share [`HttpSinkConfig`] a section is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpDestination {
    /// `type = "http"`.
    Http,
    /// `type = "elasticsearch"`.
    Elasticsearch,
    /// `type = "otlp"`.
    Otlp,
    /// `type = "loki"`.
    Loki,
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

/// Checks that `url` (the value of `key`) is an http:// or https:// URL the HTTP client
/// parses, so a URL that passes here also works there.
pub(super) fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let trimmed = url.trim();
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) || trimmed.len() < 9 {
        return Err(invalid(
            key,
            format!("`{}` is not an http:// or https:// URL", redact_url(url)),
        ));
    }
    if reqwest::Url::parse(trimmed).is_err() {
        return Err(invalid(
            key,
            format!("`{}` is not a valid URL", redact_url(url)),
        ));
    }
    Ok(())
}

/// Checks that the CA file `path` (the value of `key`) can be read.
pub(super) fn check_ca_file(key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    std::fs::read(path)
        .map(|_| ())
        .map_err(|err| invalid(key, format!("cannot read {}: {err}", path.display())))
}

/// Replaces the password or token of `auth` by `<redacted>`.
pub(super) fn redact_auth(auth: &mut Option<HttpAuth>) {
    match auth {
        Some(HttpAuth::Basic { password, .. }) => *password = REDACTED.to_string(),
        Some(HttpAuth::Bearer { token }) => *token = REDACTED.to_string(),
        None => {}
    }
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

/// A request's default time allowance, connecting included.
pub(super) fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_records() -> usize {
    500
}

fn default_max_bytes() -> usize {
    5 << 20
}

/// Longest `id_prefix` in bytes: with a topic name (249 at most), a partition, an offset and a
/// timestamp the id stays within Elasticsearch's 512 bytes.
const MAX_ID_PREFIX: usize = 200;

/// Header names whose values are secrets whatever the configuration says.
fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "authorization" || super::is_secret(&name) || name.contains("auth")
}

/// Words that make a query parameter's value a secret (compared with the lowercased name):
/// `api_key`, `apikey`, `access_token`, `password`, `client_secret`, `sig` (Azure SAS),
/// `X-Amz-Signature`, `X-Amz-Credential`, `auth`... A harmless parameter redacted costs
/// nothing; a key shown in a log or a dead-letter header does.
const SECRET_QUERY_WORDS: &[&str] = &[
    "key",
    "token",
    "secret",
    "pass",
    "pwd",
    "sig",
    "auth",
    "credential",
    "session",
];

/// Whether the value of query parameter `name` is a secret.
fn is_secret_query_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_QUERY_WORDS.iter().any(|word| name.contains(word))
}

/// Byte ranges of `url` that are secrets: the user info before `@` (user and password: a token
/// is often given as the user alone), and the value of each query parameter whose name looks
/// like a credential ([`SECRET_QUERY_WORDS`]). Works on the text as written, parsed or not, so
/// that a URL too broken to parse is still shown without its secrets.
fn url_secret_spans(url: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let rest = &url[after_scheme..];
    let authority_end = rest
        .find(['/', '?', '#'])
        .map_or(url.len(), |at| after_scheme + at);
    if let Some(at) = url[after_scheme..authority_end].rfind('@') {
        if at > 0 {
            spans.push(after_scheme..after_scheme + at);
        }
    }
    let Some(question) = url[authority_end..]
        .find('?')
        .map(|at| authority_end + at + 1)
    else {
        return spans;
    };
    let query_end = url[question..]
        .find('#')
        .map_or(url.len(), |at| question + at);
    let mut start = question;
    for pair in url[question..query_end].split('&') {
        if let Some(equals) = pair.find('=') {
            let value = start + equals + 1..start + pair.len();
            if !value.is_empty() && is_secret_query_name(&pair[..equals]) {
                spans.push(value);
            }
        }
        start += pair.len() + 1;
    }
    spans
}

/// `url` with its secrets (user info, credential-like query values) replaced by
/// `<redacted>`: how a URL is shown by `check-config`, `/status`, logs and dead-letter
/// headers. `https://u:p@h/in?api_key=k&n=1` is shown as `https://<redacted>@h/in?api_key=<redacted>&n=1`.
pub fn redact_url(url: &str) -> String {
    let mut shown = String::with_capacity(url.len());
    let mut from = 0;
    for span in url_secret_spans(url) {
        shown.push_str(&url[from..span.start]);
        shown.push_str(REDACTED);
        from = span.end;
    }
    shown.push_str(&url[from..]);
    shown
}

/// `text` with every occurrence of `url` written as [`redact_url`] shows it.
pub fn redact_url_in(text: &str, url: &str) -> String {
    if url_secret_spans(url).is_empty() {
        return text.to_string();
    }
    text.replace(url, &redact_url(url))
}

impl HttpSinkConfig {
    /// Whether bodies are gzipped: as configured, else only for `otlp` (collectors all take
    /// gzip; an arbitrary HTTP endpoint may not).
    pub fn gzip(&self, destination: HttpDestination) -> bool {
        match self.compression {
            Some(compression) => compression == Compression::Gzip,
            None => destination == HttpDestination::Otlp,
        }
    }

    /// Checks the section of route sink `key` (`routes[0].sink`) of a `destination` sink.
    pub fn validate(&self, key: &str, destination: HttpDestination) -> Result<(), ConfigError> {
        let elasticsearch = destination == HttpDestination::Elasticsearch;
        let field = |name: &str| format!("{key}.{name}");
        if destination == HttpDestination::Otlp {
            if self.format != HttpFormat::Ndjson {
                return Err(invalid(
                    field("format"),
                    "an otlp sink always sends protobuf ExportLogsServiceRequest: remove it",
                ));
            }
            if self.method != HttpMethod::Post {
                return Err(invalid(
                    field("method"),
                    "an otlp sink always POSTs (OTLP/HTTP): remove it",
                ));
            }
        }
        check_http_url(&field("url"), &self.url)?;
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
            check_ca_file(&field("ca_file"), path)?;
        }
        if let Some(prefix) = &self.id_prefix {
            if !elasticsearch {
                return Err(invalid(
                    field("id_prefix"),
                    "only an elasticsearch sink has document ids",
                ));
            }
            // Elasticsearch takes ids of up to 512 bytes; topic names take up to 249.
            check_range(&field("id_prefix"), prefix.len(), 0, MAX_ID_PREFIX)?;
        }
        self.validate_loki(key, destination)?;
        let index_problem = self.index.as_deref().and_then(index_name_problem);
        match (elasticsearch, &self.index) {
            (true, None) => Err(invalid(
                field("index"),
                "an elasticsearch sink needs an index (e.g. \"logs-{level}-{date}\")",
            )),
            (true, Some(index)) if index.trim().is_empty() => {
                Err(invalid(field("index"), "empty index name"))
            }
            (true, Some(_)) if index_problem.is_some() => {
                Err(invalid(field("index"), index_problem.unwrap_or_default()))
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

    /// The labels of a `loki` sink: those configured, else `level` and `service`.
    pub fn loki_labels(&self) -> std::collections::BTreeMap<String, LokiLabel> {
        self.labels.clone().unwrap_or_else(|| {
            [("level", "{level}"), ("service", "{service}")]
                .into_iter()
                .map(|(name, template)| (name.to_string(), LokiLabel::Template(template.into())))
                .collect()
        })
    }

    /// The Loki settings: only on a `loki` sink, labels of bounded values only.
    fn validate_loki(&self, key: &str, destination: HttpDestination) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{key}.{name}");
        if destination != HttpDestination::Loki {
            let set = [
                ("labels", self.labels.is_some()),
                ("metadata", !self.metadata.is_empty()),
                ("tenant", self.tenant.is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(field(name), "only a loki sink has it"));
            }
            return Ok(());
        }
        if self.format != HttpFormat::Ndjson || self.method != HttpMethod::Post {
            let name = if self.format != HttpFormat::Ndjson {
                "format"
            } else {
                "method"
            };
            return Err(invalid(
                field(name),
                "a loki sink always POSTs JSON streams to /loki/api/v1/push: remove it",
            ));
        }
        let labels = self.labels.as_ref();
        if let Some(labels) = labels {
            if labels.is_empty() || labels.len() > LOKI_MAX_LABELS {
                return Err(invalid(
                    field("labels"),
                    format!(
                        "give 1 to {LOKI_MAX_LABELS} labels (a stream is one set of label values)"
                    ),
                ));
            }
            for (name, label) in labels {
                let at = field(&format!("labels.{name}"));
                let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid_name || name.starts_with("__") {
                    return Err(invalid(
                        at,
                        "a label name is [a-zA-Z_][a-zA-Z0-9_]* and does not start with `__`",
                    ));
                }
                label.check().map_err(|message| invalid(at, message))?;
            }
        }
        for (position, path) in self.metadata.iter().enumerate() {
            crate::shape::FieldPath::parse(path)
                .map_err(|message| invalid(field(&format!("metadata[{position}]")), message))?;
        }
        if let Some(tenant) = &self.tenant {
            if tenant.is_empty() || hyper::header::HeaderValue::from_str(tenant).is_err() {
                return Err(invalid(
                    field("tenant"),
                    "not a valid X-Scope-OrgID header value",
                ));
            }
        }
        Ok(())
    }

    /// The secret values of this section (auth, authorization-like headers, the URL's
    /// [`redact_url`] parts).
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        let auth = match &self.auth {
            Some(HttpAuth::Basic { password, .. }) => Some(password.as_str()),
            Some(HttpAuth::Bearer { token }) => Some(token.as_str()),
            None => None,
        };
        // The user info whole, and its password alone (an error may quote either).
        let url = url_secret_spans(&self.url)
            .into_iter()
            .map(|span| &self.url[span])
            .flat_map(|secret| {
                let password = secret.split_once(':').map(|(_, password)| password);
                std::iter::once(secret).chain(password)
            });
        auth.into_iter()
            .chain(
                self.headers
                    .iter()
                    .filter(|(name, _)| is_secret_header(name))
                    .map(|(_, value)| value.as_str()),
            )
            .chain(url)
    }

    /// A copy with the secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> HttpSinkConfig {
        let mut copy = self.clone();
        copy.url = redact_url(&self.url);
        redact_auth(&mut copy.auth);
        for (name, value) in copy.headers.iter_mut() {
            if is_secret_header(name) {
                *value = REDACTED.to_string();
            }
        }
        copy
    }
}

/// Why Elasticsearch would refuse `index`, a fixed index name, as an index name (each request
/// would fail with 400). A templated name (`{field}`, `%Y`) is made valid as it is rendered, and
/// its literal text is checked when the template is compiled (`shape::Sanitize::IndexName`).
fn index_name_problem(index: &str) -> Option<String> {
    if index.contains(['{', '%']) {
        return None;
    }
    if let Some(bad) = index.chars().find(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Some(format!(
            "`{bad}` is not allowed in an Elasticsearch index name (nor are \\ / * ? \" < > | , # : and spaces)"
        ));
    }
    if index.chars().any(char::is_uppercase) {
        return Some(format!(
            "Elasticsearch index names are lower case: write \"{}\"",
            index.to_lowercase()
        ));
    }
    if index.starts_with(['-', '_', '+']) {
        return Some("an Elasticsearch index name cannot start with -, _ or +".to_string());
    }
    if index == "." || index == ".." {
        return Some("`.` and `..` are not index names".to_string());
    }
    if index.len() > 255 {
        return Some("longer than Elasticsearch's 255 bytes".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, HttpAuth, HttpDestination, HttpSinkConfig, SinkConfig, REDACTED};

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

    /// Issue 33, item 4: an index name Elasticsearch refuses passed the check (every request
    /// then failed with 400).
    #[test]
    fn index_names_elasticsearch_refuses_are_config_errors() {
        for (index, expected) in [
            ("Logs", "lower case: write \"logs\""),
            ("Logs-{service}", ""),
            ("logs#1", "`#` is not allowed"),
            ("logs 1", "` ` is not allowed"),
            ("logs,all", "`,` is not allowed"),
            ("remote:logs", "`:` is not allowed"),
            ("_logs", "cannot start with -, _ or +"),
            ("..", "not index names"),
        ] {
            let sink = format!(
                r#"{{ type = "elasticsearch", url = "http://h:9200", index = "{index}" }}"#
            );
            match load(&sink) {
                Ok(_) => assert!(expected.is_empty(), "{index} accepted"),
                Err(err) => {
                    assert!(!expected.is_empty(), "{index}: {err}");
                    assert!(
                        err.contains("routes[0].sink.index") && err.contains(expected),
                        "{index}: expected `{expected}` in {err}"
                    );
                }
            }
        }
        for index in [
            "logs",
            "logs-{level}-%Y.%m.%d",
            "{service}-logs",
            ".ds-logs",
            "logs_2026",
        ] {
            let sink = format!(
                r#"{{ type = "elasticsearch", url = "http://h:9200", index = "{index}" }}"#
            );
            load(&sink).unwrap_or_else(|err| panic!("{index}: {err}"));
        }
    }

    /// Issue 31: a Loki label must have few values: a template reading a field, the key or a
    /// date is refused naming the label, as is a field label listing too many values; the
    /// Loki settings belong to a loki sink only.
    #[test]
    fn loki_labels_with_unbounded_values_are_refused_naming_the_label() {
        let loki = |rest: &str| {
            load(&format!(
                r#"{{ type = "loki", url = "http://loki:3100"{rest} }}"#
            ))
        };
        loki("").expect("default labels: level and service");
        loki(r#", labels = { service = "{service}", topic = "{@topic}", p = "{@partition}", env = { field = "env", values = ["prod", "dev"] }, job = "logbridge" }, metadata = ["trace_id", "user.id"], tenant = "7""#)
            .expect("bounded labels");
        let many: Vec<String> = (0..101).map(|n| format!("\"v{n}\"")).collect();
        let too_many = format!(
            r#", labels = {{ user = {{ field = "user", values = [{}] }} }}"#,
            many.join(",")
        );
        for (rest, key, expected) in [
            (
                r#", labels = { user = "{user_id}" }"#,
                "labels.user",
                "`{user_id}` has as many values",
            ),
            (r#", labels = { k = "{@key}" }"#, "labels.k", "`{@key}`"),
            (
                r#", labels = { day = "%Y-%m-%d" }"#,
                "labels.day",
                "the record's date",
            ),
            (too_many.as_str(), "labels.user", "101 values"),
            (
                r#", labels = { "bad-name" = "{level}" }"#,
                "labels.bad-name",
                "label name",
            ),
            (r#", labels = {}"#, "labels", "give 1 to 15 labels"),
            (r#", format = "json_array""#, "format", "always POSTs"),
            (r#", metadata = ["a..b"]"#, "metadata[0]", ""),
        ] {
            let err = loki(rest).expect_err(rest);
            assert!(
                err.contains(&format!("routes[0].sink.{key}")) && err.contains(expected),
                "{rest}: expected `{key}` and `{expected}` in {err}"
            );
        }
        let err = load(r#"{ type = "http", url = "http://h/in", tenant = "7" }"#)
            .expect_err("tenant on http");
        assert!(
            err.contains("routes[0].sink.tenant") && err.contains("only a loki sink"),
            "{err}"
        );
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
        assert_eq!(
            config.routes[0].max_retries, None,
            "no retry limit by default"
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
            (
                r#"{ type = "http", url = "http://h/x", id_prefix = "a:" }"#,
                "routes[0].sink.id_prefix",
            ),
            (
                r#"{ type = "otlp", url = "http://c:4318", format = "json_array" }"#,
                "routes[0].sink.format",
            ),
            (
                r#"{ type = "otlp", url = "http://c:4318", method = "PUT" }"#,
                "routes[0].sink.method",
            ),
            (
                r#"{ type = "otlp", url = "http://c:4318", index = "l" }"#,
                "routes[0].sink.index",
            ),
            (r#"{ type = "otlp", url = "c:4318" }"#, "routes[0].sink.url"),
            (
                r#"{ type = "otlp", url = "http://c:4318", max_records = 0 }"#,
                "routes[0].sink.max_records",
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
        let err = load(r#"{ type = "otlp", url = "http://c:4318", insecure = true }"#)
            .expect_err("unknown key");
        assert!(err.contains("insecure"), "{err}");
    }

    /// An otlp sink gzips unless told not to; the others send plain bodies unless told to.
    #[test]
    fn otlp_bodies_are_gzipped_by_default() {
        let section = |text: &str| -> HttpSinkConfig { toml::from_str(text).expect("a section") };
        let plain = section("url = \"http://c:4318\"");
        assert!(plain.gzip(HttpDestination::Otlp));
        assert!(!plain.gzip(HttpDestination::Http));
        assert!(!plain.gzip(HttpDestination::Elasticsearch));
        let off = section("url = \"http://c:4318\"\ncompression = \"none\"");
        assert!(!off.gzip(HttpDestination::Otlp));
        let on = section("url = \"http://h\"\ncompression = \"gzip\"");
        assert!(on.gzip(HttpDestination::Http));
    }

    #[test]
    fn url_secrets_are_user_info_and_credential_like_query_values() {
        use super::redact_url;
        let cases = [
            ("http://h:9200", "http://h:9200"),
            ("https://u:p@h/x", "https://<redacted>@h/x"),
            ("https://t0ken@h", "https://<redacted>@h"),
            (
                "http://h/x?api_key=a&n=1&access_token=b#frag",
                "http://h/x?api_key=<redacted>&n=1&access_token=<redacted>#frag",
            ),
            (
                "http://h/x?sv=2024&sig=c%2Bd&X-Amz-Signature=e&X-Amz-Credential=f&password=&q",
                "http://h/x?sv=2024&sig=<redacted>&X-Amz-Signature=<redacted>&X-Amz-Credential=<redacted>&password=&q",
            ),
            // An @ in the path or query is not user info.
            ("http://h/a@b?mail=x@y", "http://h/a@b?mail=x@y"),
            ("not a url ?token=z", "not a url ?token=<redacted>"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// Issue 34, item 7: a URL's user info and credential-like query values are secrets too.
    #[test]
    fn secrets_in_urls_are_redacted_where_the_config_is_shown() {
        let config = load(
            r#"{ type = "http", url = "https://ingest:pa55w0rd@h.example/in?api_key=k3y-value&Token=t0ken-value&sig=s1g-value&pipeline=visible-one" }"#,
        )
        .unwrap();
        // check-config prints to_toml(); /status shows redacted_json().
        let shown = config.to_toml();
        let json = config.redacted_json().to_string();
        for secret in ["pa55w0rd", "k3y-value", "t0ken-value", "s1g-value"] {
            assert!(
                !shown.contains(secret),
                "{secret} shown by check-config:\n{shown}"
            );
            assert!(!json.contains(secret), "{secret} shown by /status:\n{json}");
            assert!(
                !config.scrub(&format!("failed: {secret}")).contains(secret),
                "{secret} not scrubbed"
            );
        }
        assert!(shown.contains("h.example/in"), "{shown}");
        assert!(shown.contains("pipeline=visible-one"), "{shown}");
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
