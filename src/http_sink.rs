//! HTTP destinations: `type = "http"` posts a worker's batch as NDJSON or a JSON array of the
//! original payloads; `type = "elasticsearch"` indexes it with `_bulk` (Elasticsearch and
//! OpenSearch answer alike); `type = "loki"` pushes it to Loki as JSON streams, one per set
//! of label values; `type = "otlp"` exports it as OTLP/HTTP logs (protobuf, the mapping in
//! [`crate::otlp_sink`]).
//!
//! A request's answer decides the outcome of every record in it: 2xx delivered; 408, 429 and
//! 5xx, timeouts and connection errors retried (after at least `Retry-After`, when given); any
//! other status fails the records for good with reason `http_<status>` (dead-lettered with the
//! status in a header). `_bulk` answers per item, so there each record has its own outcome.
//! When a request of a batch fails in a way worth retrying, the rest of the batch is not sent
//! and fails with it: a later record of a key never lands before an earlier one is retried.
//! A request refused with 413 is sent again in halves, down to a record alone; one refused
//! with 400 or 422 likewise, so that only the records the endpoint refuses fail (within a
//! budget of one extra request per record of the batch). An OTLP answer is for the whole
//! request; its partial success (records the collector rejected for good, without saying
//! which) is counted in `logbridge_otlp_rejected_records_total` and logged, and the request is
//! not sent again: OTLP forbids retrying them. Redirects are not followed (a redirected POST would arrive as a GET without its body).

use std::collections::VecDeque;
use std::io::Write as _;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{
    HttpAuth, HttpDestination, HttpFormat, HttpMethod, HttpSinkConfig, LokiLabel, Reloading,
};
use crate::producer::FailureKind;
use crate::record::Record;
use crate::sink::{write_compact_json, DeliveryFuture, Sink, SinkError};

/// Most bytes of an error answer kept for the log and the dead letter's message.
const ERROR_BODY_KEPT: usize = 512;
/// Most bytes of an answer read when only its start matters (an error's message; a 2xx of the
/// `http` sink, read so that the connection can serve the next request). Past it the rest is
/// not read and the connection is closed.
const ANSWER_READ_MAX: usize = 64 << 10;
/// A `_bulk` answer is needed whole (an item per record): it may take this much per record,
/// and at least [`BULK_ANSWER_MIN`] (about 200 bytes an item, a few KiB with an error reason;
/// 64 KiB a record is far beyond any real answer). Past it the request is retried with reason
/// `bulk_answer_too_large` and the connection closed.
const BULK_ANSWER_PER_RECORD: usize = 64 << 10;
const BULK_ANSWER_MIN: usize = 1 << 20;
/// Bodies up to this size are compressed where they are built; larger ones on a blocking
/// thread, so that compressing (milliseconds for megabytes) does not hold up the runtime's
/// other tasks.
const GZIP_INLINE_MAX: usize = 64 << 10;
/// How often a credential read through `${file:...}` is read again (a rotated token).
pub(crate) const CREDENTIALS_CHECK_EVERY: Duration = Duration::from_secs(5);
/// After a 401 or 403: read again if this has passed since the last read.
const CREDENTIALS_CHECK_REFUSED: Duration = Duration::from_secs(1);

/// How a batch becomes a request body.
#[derive(Debug, Clone)]
enum Layout {
    /// One payload per line.
    Ndjson,
    /// `[payload,payload]`.
    JsonArray,
    /// `_bulk`: a `create` action naming the index and the record's id, then the payload.
    Bulk {
        /// The index, unless the record carries its own (a templated index, rendered by the
        /// route's worker into [`Record::destination`]).
        index: String,
        /// Written before each document id (`id_prefix`).
        id_prefix: String,
    },
    /// Loki's push API: `{"streams":[{"stream":{labels},"values":[[ns, line, {metadata}]]}]}`.
    Loki(Arc<LokiStreams>),
    /// OTLP/HTTP logs: one protobuf `ExportLogsServiceRequest` of the records' events.
    Otlp,
}

/// How a record's stream and structured metadata are found.
#[derive(Debug)]
struct LokiStreams {
    /// Label name and where its value comes from, in name order.
    labels: Vec<(String, LabelSource)>,
    /// Fields sent as structured metadata.
    metadata: Vec<crate::shape::FieldPath>,
    /// Whether a label or the metadata reads the event's fields (then each record is parsed).
    reads_event: bool,
}

#[derive(Debug)]
enum LabelSource {
    Template(crate::shape::Template),
    Field {
        path: crate::shape::FieldPath,
        values: std::collections::HashSet<String>,
    },
}

/// The label value of a field label for a value outside its list (or none).
const LOKI_OTHER: &str = "other";

impl LokiStreams {
    fn new(config: &HttpSinkConfig) -> anyhow::Result<LokiStreams> {
        let labels = config.loki_labels();
        let mut reads_event = !config.metadata.is_empty();
        let mut compiled = Vec::with_capacity(labels.len());
        for (name, label) in labels {
            let source = match label {
                LokiLabel::Template(text) => LabelSource::Template(
                    crate::shape::Template::parse(&text, crate::shape::Sanitize::None, &name)
                        .map_err(|err| anyhow::anyhow!("label `{name}`: {}", err.message))?,
                ),
                LokiLabel::Field { field, values } => {
                    reads_event = true;
                    LabelSource::Field {
                        path: crate::shape::FieldPath::parse(&field)
                            .map_err(|message| anyhow::anyhow!("label `{name}`: {message}"))?,
                        values: values.into_iter().collect(),
                    }
                }
            };
            compiled.push((name, source));
        }
        let metadata = config
            .metadata
            .iter()
            .map(|path| crate::shape::FieldPath::parse(path).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?;
        Ok(LokiStreams {
            labels: compiled,
            metadata,
            reads_event,
        })
    }

    /// The label values of `record` (in [`LokiStreams::labels`] order).
    fn stream_of(&self, record: &Record, event: Option<&serde_json::Value>) -> Vec<String> {
        let ctx = crate::shape::route::context(record);
        self.labels
            .iter()
            .map(|(_, source)| match source {
                // Bounded templates read no field, so they cannot miss one (config check).
                LabelSource::Template(template) => template
                    .render(None, &ctx)
                    .unwrap_or_else(|_| LOKI_OTHER.to_string()),
                LabelSource::Field { path, values } => event
                    .and_then(|event| path.get(event))
                    .and_then(crate::shape::scalar_text)
                    .filter(|text| values.contains(text))
                    .unwrap_or_else(|| LOKI_OTHER.to_string()),
            })
            .collect()
    }
}

/// What one route's sinks share: the client (its connection pool), the request's shape and
/// its credentials.
#[derive(Clone)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    target: Arc<Target>,
    credentials: Option<Arc<Credentials>>,
}

/// The `Authorization` header of a route, rebuilt when the token or password it was made from
/// came from a `${file:...}` reference and the file was rewritten (a rotated token): the file
/// is read again every [`CREDENTIALS_CHECK_EVERY`], and after a 401 or 403.
pub(crate) struct Credentials {
    auth: HttpAuth,
    state: std::sync::Mutex<CredentialState>,
}

struct CredentialState {
    /// The secret (token or password) as read from its file; `None`: not from a file.
    secret: Option<Reloading>,
    header: HeaderValue,
}

impl Credentials {
    pub(crate) fn new(auth: &HttpAuth) -> anyhow::Result<Credentials> {
        let secret = match auth {
            HttpAuth::Basic { password, .. } => password,
            HttpAuth::Bearer { token } => token,
        };
        Ok(Credentials {
            auth: auth.clone(),
            state: std::sync::Mutex::new(CredentialState {
                secret: Reloading::of(secret),
                header: authorization(auth, secret)?,
            }),
        })
    }

    /// The header to send, after reading the secret's file again if `every` has passed;
    /// whether the secret changed.
    pub(crate) fn current(&self, every: Duration) -> (HeaderValue, bool) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let CredentialState { secret, header } = &mut *state;
        let fresh = secret
            .as_mut()
            .and_then(|secret| secret.changed(std::time::Instant::now(), every))
            .map(|fresh| authorization(&self.auth, fresh));
        let changed = match fresh {
            Some(Ok(fresh)) => {
                tracing::info!("a credential file of an http sink changed; sending the new value");
                *header = fresh;
                true
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "a credential file of an http sink changed to a value that cannot be sent; keeping the value read before");
                false
            }
            None => false,
        };
        (header.clone(), changed)
    }
}

/// A client that follows no redirect (a redirected POST would become a GET without the body
/// and could answer 200: a redirect is an answer like any other 3xx, refused with its status),
/// allows `timeout` for a request, connecting included, and trusts the system's roots and the
/// certificates of `ca_file`.
pub(crate) fn http_client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .tls_built_in_native_certs(true);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("failed to read ca_file {}", path.display()))?;
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("no PEM certificate in {}", path.display()))?
        {
            client = client.add_root_certificate(certificate);
        }
    }
    client.build().context("failed to build the HTTP client")
}

/// The `Authorization` header of `auth` with `secret` as its token or password.
fn authorization(auth: &HttpAuth, secret: &str) -> anyhow::Result<HeaderValue> {
    let value = match auth {
        HttpAuth::Basic { username, .. } => {
            use base64::Engine as _;
            let pair = format!("{username}:{secret}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        }
        HttpAuth::Bearer { .. } => format!("Bearer {secret}"),
    };
    let mut value = HeaderValue::from_str(&value).context("credentials are not a valid header")?;
    value.set_sensitive(true);
    Ok(value)
}

struct Target {
    url: reqwest::Url,
    method: reqwest::Method,
    headers: HeaderMap,
    layout: Layout,
    gzip: bool,
    max_records: usize,
    max_bytes: usize,
}

impl HttpEndpoint {
    /// The endpoint of a route's `destination` sink.
    pub fn new(
        config: &HttpSinkConfig,
        destination: HttpDestination,
    ) -> anyhow::Result<HttpEndpoint> {
        let written = config.url.trim();
        let mut url = reqwest::Url::parse(written)
            .with_context(|| format!("invalid URL `{}`", crate::config::redact_url(written)))?;
        // The last segments of the path (a query such as `?pipeline=p` stays the query).
        let push_to = |url: &mut reqwest::Url, segments: &[&str]| -> anyhow::Result<()> {
            url.path_segments_mut()
                .map_err(|()| {
                    anyhow::anyhow!(
                        "`{}` cannot have a path",
                        crate::config::redact_url(written)
                    )
                })?
                .pop_if_empty()
                .extend(segments);
            Ok(())
        };
        let layout = match (destination, &config.index) {
            (HttpDestination::Otlp, _) => {
                if !url.path().ends_with(crate::otlp_sink::LOGS_PATH) {
                    push_to(&mut url, &["v1", "logs"])?;
                }
                Layout::Otlp
            }
            (HttpDestination::Elasticsearch, Some(index)) => {
                push_to(&mut url, &["_bulk"])?;
                Layout::Bulk {
                    index: index.clone(),
                    id_prefix: config.id_prefix.clone().unwrap_or_default(),
                }
            }
            (HttpDestination::Loki, _) => {
                push_to(&mut url, &["loki", "api", "v1", "push"])?;
                Layout::Loki(Arc::new(LokiStreams::new(config)?))
            }
            _ => match config.format {
                HttpFormat::Ndjson => Layout::Ndjson,
                HttpFormat::JsonArray => Layout::JsonArray,
            },
        };
        let mut headers = HeaderMap::new();
        let content_type = match layout {
            Layout::JsonArray | Layout::Loki(_) => "application/json",
            Layout::Ndjson | Layout::Bulk { .. } => "application/x-ndjson",
            Layout::Otlp => "application/x-protobuf",
        };
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        let gzip = config.gzip(destination);
        if gzip {
            headers.insert(
                reqwest::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            );
        }
        if let (HttpDestination::Loki, Some(tenant)) = (destination, &config.tenant) {
            headers.insert(
                HeaderName::from_static("x-scope-orgid"),
                HeaderValue::from_str(tenant).context("invalid tenant")?,
            );
        }
        let credentials = config
            .auth
            .as_ref()
            .map(Credentials::new)
            .transpose()?
            .map(Arc::new);
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("invalid header name `{name}`"))?;
            let value = HeaderValue::from_str(value)
                .with_context(|| format!("invalid value for header `{name}`"))?;
            headers.insert(name, value);
        }
        let client = http_client(
            Duration::from_millis(config.timeout_ms),
            config.ca_file.as_deref(),
        )?;
        Ok(HttpEndpoint {
            client,
            credentials,
            target: Arc::new(Target {
                url,
                method: match config.method {
                    HttpMethod::Post => reqwest::Method::POST,
                    HttpMethod::Put => reqwest::Method::PUT,
                },
                headers,
                layout,
                gzip,
                max_records: config.max_records,
                max_bytes: config.max_bytes,
            }),
        })
    }

    /// Whether the destination answers, for `check-config --connect`: an Elasticsearch sink
    /// asks the cluster's root (`GET /`) and wants 200; an HTTP sink sends `HEAD` to its URL,
    /// (a Loki sink its push URL), and any answer but 401, 403 or 407 means it is there (an endpoint that takes only POST
    /// may answer 405). `Err` says why not, with credentials redacted.
    pub async fn probe(&self) -> Result<String, String> {
        let target = &self.target;
        let (method, url) = match &target.layout {
            Layout::Bulk { .. } => (reqwest::Method::GET, cluster_root(&target.url)),
            Layout::Ndjson | Layout::JsonArray | Layout::Loki(_) | Layout::Otlp => {
                (reqwest::Method::HEAD, target.url.clone())
            }
        };
        let mut request = self.client.request(method.clone(), url);
        for (name, value) in &target.headers {
            if name != reqwest::header::CONTENT_ENCODING && name != reqwest::header::CONTENT_TYPE {
                request = request.header(name, value);
            }
        }
        if let Some(credentials) = &self.credentials {
            let (header, _) = credentials.current(CREDENTIALS_CHECK_EVERY);
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let response = request
            .send()
            .await
            .map_err(|err| format!("cannot reach it: {}", request_error(&err).message))?;
        let status = response.status().as_u16();
        match (status, method == reqwest::Method::GET) {
            (401 | 403 | 407, _) => Err(format!("it refused the credentials (HTTP {status})")),
            (200..=299, _) => Ok(format!("answered {method} with {status}")),
            (_, true) => Err(format!("the cluster answered GET / with HTTP {status}")),
            (_, false) => Ok(format!("answered {method} with {status} (reachable)")),
        }
    }

    /// A worker's sink on this endpoint (sharing its connections).
    pub fn sink(&self) -> HttpSink {
        HttpSink {
            endpoint: self.clone(),
            body: Vec::new(),
        }
    }
}

/// The cluster's root for a `_bulk` URL: the URL as written, without the query (`GET /`).
fn cluster_root(bulk: &reqwest::Url) -> reqwest::Url {
    let mut root = bulk.clone();
    root.set_query(None);
    if let Ok(mut segments) = root.path_segments_mut() {
        // `_bulk` off, and the path ends in `/` (`/prefix/`, or `/` alone).
        segments.pop().push("");
    }
    root
}

/// A worker's HTTP sink: one request at a time, in batch order.
pub struct HttpSink {
    endpoint: HttpEndpoint,
    /// The body buffer, kept between requests.
    body: Vec<u8>,
}

impl Sink for HttpSink {
    fn deliver<'a>(&'a mut self, route: &'a str, batch: &'a [Record]) -> DeliveryFuture<'a> {
        Box::pin(async move {
            let target = self.endpoint.target.clone();
            let mut outcomes: Vec<Result<(), SinkError>> = Vec::with_capacity(batch.len());
            let mut pending: VecDeque<Range<usize>> =
                requests(batch, target.max_records, target.max_bytes).into();
            // Requests this batch may add to find the records an endpoint refuses with 400 or
            // 422: one per record of the batch, so a batch never costs more than its requests
            // plus one request per record (what sending each record alone would cost). One
            // refused record among 256 costs 16 (two halves per level, 8 levels); an endpoint
            // that refuses everything costs a batch of n records its requests plus n. Past
            // the budget a refused request fails whole.
            let mut refusal_budget = batch.len();
            while let Some(range) = pending.pop_front() {
                let records = &batch[range.clone()];
                if let Some(Err(earlier)) = outcomes.iter().find(
                    |outcome| matches!(outcome, Err(err) if err.kind == FailureKind::Retryable),
                ) {
                    // Not sent: it follows a request to be retried (per-key order).
                    let earlier = earlier.clone();
                    outcomes.extend(records.iter().map(|_| Err(earlier.clone())));
                    continue;
                }
                let answered = self.send(route, &target, records).await;
                if let Some([first, second]) =
                    halves_to_send_again(&range, &answered, &mut refusal_budget)
                {
                    // The endpoint takes smaller requests than `max_bytes` says, or refused a
                    // record of the request: send the halves, in order, until each fits or
                    // a record alone is refused.
                    pending.push_front(second);
                    pending.push_front(first);
                    continue;
                }
                outcomes.extend(answered);
            }
            outcomes
        })
    }
}

impl HttpSink {
    /// Sends `records` in one request and returns their outcomes.
    async fn send(
        &mut self,
        route: &str,
        target: &Target,
        records: &[Record],
    ) -> Vec<Result<(), SinkError>> {
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        if !matches!(target.layout, Layout::Otlp) {
            write_body(&mut body, &target.layout, records);
            return self.post(route, target, body, records.len()).await;
        }
        // OTLP: a record that cannot be mapped fails alone; the others are sent.
        let refs: Vec<&Record> = records.iter().collect();
        let unmapped =
            crate::otlp_sink::encode(&refs, crate::otlp_sink::now_unix_nano(), &mut body);
        let mapped = unmapped.iter().filter(|failure| failure.is_none()).count();
        let mut answered = if mapped > 0 {
            self.post(route, target, body, mapped).await
        } else {
            self.body = body;
            Vec::new()
        }
        .into_iter();
        unmapped
            .into_iter()
            .map(|failure| match failure {
                Some(err) => Err(err),
                // `post` answers one outcome per record sent: never short.
                None => answered.next().unwrap_or(Ok(())),
            })
            .collect()
    }

    /// Posts `body`, the request of `count` records, and returns their outcomes.
    async fn post(
        &mut self,
        route: &str,
        target: &Target,
        body: Vec<u8>,
        count: usize,
    ) -> Vec<Result<(), SinkError>> {
        // The plain body is handed over as it is (no copy); a gzip body is a new buffer, and
        // the plain one is kept for the next request.
        let payload = if target.gzip {
            let (plain, compressed) = if body.len() <= GZIP_INLINE_MAX {
                let compressed = gzip(&body);
                (body, compressed)
            } else {
                let compressing = tokio::task::spawn_blocking(move || {
                    let compressed = gzip(&body);
                    (body, compressed)
                });
                match compressing.await {
                    Ok(done) => done,
                    Err(join) => {
                        let err = SinkError::retryable("gzip_failed", join.to_string());
                        return vec![Err(err); count];
                    }
                }
            };
            self.body = plain;
            match compressed {
                Ok(compressed) => compressed,
                Err(err) => {
                    let err = SinkError::retryable("gzip_failed", err.to_string());
                    return vec![Err(err); count];
                }
            }
        } else {
            body
        };
        let mut request = self
            .endpoint
            .client
            .request(target.method.clone(), target.url.clone())
            .headers(target.headers.clone());
        if let Some(credentials) = &self.endpoint.credentials {
            let (header, _) = credentials.current(CREDENTIALS_CHECK_EVERY);
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let answer = request.body(payload).send().await;
        let response = match answer {
            Ok(response) => response,
            Err(err) => return vec![Err(request_error(&err)); count],
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| retry_after(value, SystemTime::now()));
        // Read to the end (so that the connection can serve the next request), up to a bound.
        let bulk = matches!(target.layout, Layout::Bulk { .. }) && (200..300).contains(&status);
        let limit = if bulk {
            BULK_ANSWER_PER_RECORD
                .saturating_mul(count)
                .max(BULK_ANSWER_MIN)
        } else {
            ANSWER_READ_MAX
        };
        let (text, whole) = match read_bounded(response, limit).await {
            Ok(read) => read,
            Err(err) => return vec![Err(request_error(&err)); count],
        };
        if bulk {
            if !whole {
                let err = SinkError::retryable(
                    "bulk_answer_too_large",
                    format!("the _bulk answer is over {limit} bytes; not read further"),
                );
                return vec![Err(err); count];
            }
            return bulk_outcomes(&text, count);
        }
        if matches!(target.layout, Layout::Otlp) && (200..300).contains(&status) {
            if let Some((rejected, message)) = crate::otlp_sink::rejected(&text) {
                // OTLP: rejected records must not be sent again, and the answer does not say
                // which they are; the request counts as delivered.
                crate::metrics::otlp_rejected_records()
                    .with_label_values(&[route])
                    .inc_by(u64::try_from(rejected).unwrap_or(0));
                tracing::warn!(
                    route,
                    rejected,
                    records = count,
                    error = %message,
                    "the otlp endpoint rejected records of a request (partial success); not retried"
                );
            }
            return vec![Ok(()); count];
        }
        let text = match &target.layout {
            Layout::Otlp => crate::otlp_sink::error_message(&text).map_or(text, String::into_bytes),
            _ => text,
        };
        let refused = matches!(status, 401 | 403);
        if let Some(credentials) = self.endpoint.credentials.as_ref().filter(|_| refused) {
            if credentials.current(CREDENTIALS_CHECK_REFUSED).1 {
                // Refused with credentials that have been rotated since: sent again with the
                // new ones, not failed.
                let err = SinkError::retryable(
                    "credentials_changed",
                    format!("HTTP {status} with credentials whose file has changed since; sending again with the new ones"),
                );
                return vec![Err(err); count];
            }
        }
        match status_outcome(status, retry_after, &text) {
            Ok(()) => vec![Ok(()); count],
            Err(err) => vec![Err(err); count],
        }
    }
}

/// The body of `response` up to `limit` bytes, and whether that is all of it. Past the limit
/// the rest is left unread: the response is dropped and its connection closed.
async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// The records of `batch` split into requests of at most `max_records` records and
/// `max_bytes` payload bytes (a larger record alone).
fn requests(batch: &[Record], max_records: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, record) in batch.iter().enumerate() {
        let size = record.payload().map_or(0, <[u8]>::len);
        let count = index - start;
        if count > 0 && (count >= max_records || bytes + size > max_bytes) {
            ranges.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes += size;
    }
    if start < batch.len() {
        ranges.push(start..batch.len());
    }
    ranges
}

/// Writes the request body for `records`.
fn write_body(out: &mut Vec<u8>, layout: &Layout, records: &[Record]) {
    if let Layout::Loki(streams) = layout {
        write_loki_body(out, streams, records, SystemTime::now());
        return;
    }
    if let Layout::JsonArray = layout {
        out.push(b'[');
    }
    for (position, record) in records.iter().enumerate() {
        match layout {
            // An OTLP body is written by `otlp_sink::encode`, never here.
            Layout::Ndjson | Layout::Otlp => {}
            Layout::JsonArray if position > 0 => out.push(b','),
            Layout::JsonArray => {}
            Layout::Loki(_) => {}
            Layout::Bulk { index, id_prefix } => {
                out.extend_from_slice(b"{\"create\":{\"_index\":");
                let name = record.destination.as_deref().unwrap_or(index);
                let _ = serde_json::to_writer(&mut *out, name);
                out.extend_from_slice(b",\"_id\":\"");
                write_document_id(out, id_prefix, record);
                out.extend_from_slice(b"\"}}\n");
            }
        }
        write_payload(out, record);
        if !matches!(layout, Layout::JsonArray) {
            out.push(b'\n');
        }
    }
    if let Layout::JsonArray = layout {
        out.push(b']');
    }
}

/// The record's payload as one line of compact JSON (`null` without one): its own JSON, or the
/// event a line of text makes ([`Record::event_json`]). Only decoded records reach a sink: this
/// is valid JSON, so UTF-8.
pub(crate) fn write_payload(out: &mut Vec<u8>, record: &Record) {
    match record.event_json() {
        Some(json) => write_compact_json(out, &json),
        None => out.extend_from_slice(b"null"),
    }
}

/// A Loki entry's line: the payload as compact JSON, or a line of text as it is.
fn write_loki_line(out: &mut Vec<u8>, record: &Record) {
    let line = match (&record.form, record.payload(), &record.decoded) {
        (crate::event::Form::Text(_), Some(payload), Some(Ok(_))) => {
            crate::event::TextFormat::line_of(payload)
        }
        _ => None,
    };
    match line {
        Some(line) => out.extend_from_slice(line.as_bytes()),
        None => write_payload(out, record),
    }
}

/// A Loki push body: the records grouped into streams by their label values (streams in the
/// order of their first record, records of a stream in batch order, so a key's records stay in
/// order); each entry is the record's Kafka timestamp in nanoseconds (its offset within the
/// millisecond; `now` without one), the original payload as the line, and the structured
/// metadata the record has.
fn write_loki_body(out: &mut Vec<u8>, streams: &LokiStreams, records: &[Record], now: SystemTime) {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let mut order: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    let mut index: std::collections::HashMap<Vec<String>, usize> = std::collections::HashMap::new();
    let mut events: Vec<Option<serde_json::Value>> = Vec::with_capacity(records.len());
    for (position, record) in records.iter().enumerate() {
        let event = match streams.reads_event {
            true => record.event().ok(),
            false => None,
        };
        let labels = streams.stream_of(record, event.as_ref());
        events.push(event);
        match index.get(&labels) {
            Some(&at) => order[at].1.push(position),
            None => {
                index.insert(labels.clone(), order.len());
                order.push((labels, vec![position]));
            }
        }
    }
    let mut line = Vec::new();
    out.extend_from_slice(b"{\"streams\":[");
    for (stream_position, (labels, positions)) in order.iter().enumerate() {
        if stream_position > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"stream\":{");
        for (label_position, ((name, _), value)) in streams.labels.iter().zip(labels).enumerate() {
            if label_position > 0 {
                out.push(b',');
            }
            let _ = serde_json::to_writer(&mut *out, name);
            out.push(b':');
            let _ = serde_json::to_writer(&mut *out, value);
        }
        out.extend_from_slice(b"},\"values\":[");
        for (entry_position, &position) in positions.iter().enumerate() {
            let record = &records[position];
            if entry_position > 0 {
                out.push(b',');
            }
            // The record's millisecond, and its offset (mod 10^6) as the nanoseconds within
            // it: a partition's records of one millisecond keep their order in time, and a
            // record sent again has the same timestamp (Loki drops an entry it already has).
            let nanos = record.timestamp.filter(|&ms| ms >= 0).map_or(now_ns, |ms| {
                u128::from(ms.unsigned_abs()) * 1_000_000
                    + u128::from(record.offset.rem_euclid(1_000_000).unsigned_abs())
            });
            let _ = write!(out, "[\"{nanos}\",");
            line.clear();
            write_loki_line(&mut line, record);
            let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(&line));
            let metadata: Vec<(String, String)> = match &events[position] {
                Some(event) => streams
                    .metadata
                    .iter()
                    .filter_map(|path| {
                        let text = match path.get(event)? {
                            serde_json::Value::String(text) => text.clone(),
                            serde_json::Value::Null => return None,
                            other => other.to_string(),
                        };
                        Some((path.to_string(), text))
                    })
                    .collect(),
                None => Vec::new(),
            };
            if !metadata.is_empty() {
                out.extend_from_slice(b",{");
                for (field_position, (name, value)) in metadata.iter().enumerate() {
                    if field_position > 0 {
                        out.push(b',');
                    }
                    let _ = serde_json::to_writer(&mut *out, name);
                    out.push(b':');
                    let _ = serde_json::to_writer(&mut *out, value);
                }
                out.push(b'}');
            }
            out.push(b']');
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
}

/// The document id of `record` (inside a JSON string): `<id_prefix><topic>-<partition>-<offset>`
/// and, when the record has one, `-<timestamp in ms>`. It is made of what the record is in the
/// log, so a record delivered again (a retry, a replay after a crash) has the same id and is
/// refused as a duplicate (409), not indexed twice. The timestamp tells a topic's incarnations
/// apart: a topic deleted and made again starts at offset 0 again, and without it a new record
/// would take an old document's id and be dropped as "already there". `id_prefix` tells
/// source clusters apart (the same topic name on two clusters).
fn write_document_id(out: &mut Vec<u8>, id_prefix: &str, record: &Record) {
    let _ = write!(
        out,
        "{}{}-{}-{}",
        JsonEscaped(id_prefix),
        JsonEscaped(&record.source.topic),
        record.source.partition,
        record.offset
    );
    if let Some(timestamp) = record.timestamp {
        let _ = write!(out, "-{timestamp}");
    }
    // The log records of one OTLP batch share its offset (and timestamp): each its own id.
    if let Some(part) = record.part {
        let _ = write!(out, "/{part}");
    }
}

/// A topic name inside a JSON string (topic names are `[a-zA-Z0-9._-]`, but nothing breaks if
/// one is not).
struct JsonEscaped<'a>(&'a str);

impl std::fmt::Display for JsonEscaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted = serde_json::to_string(self.0).map_err(|_| std::fmt::Error)?;
        f.write_str(&quoted[1..quoted.len() - 1])
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// The two halves of the request `range` to send again, in order, when it held more than one
/// record and the endpoint refused all of it: as too large (413: until each half fits), or as
/// bad (400, 422: until the bad records are alone, so that the others are delivered), the
/// latter while `refusal_budget` (requests) lasts.
fn halves_to_send_again(
    range: &Range<usize>,
    answered: &[Result<(), SinkError>],
    refusal_budget: &mut usize,
) -> Option<[Range<usize>; 2]> {
    if range.len() < 2 {
        return None;
    }
    let status = match answered.first() {
        Some(Err(err)) => err.status?,
        _ => return None,
    };
    let all_refused = answered
        .iter()
        .all(|outcome| matches!(outcome, Err(err) if err.status == Some(status)));
    if !all_refused {
        return None;
    }
    match status {
        413 => {}
        400 | 422 if *refusal_budget >= 2 => *refusal_budget -= 2,
        _ => return None,
    }
    let middle = range.start + range.len() / 2;
    Some([range.start..middle, middle..range.end])
}

/// A request that got no answer: always worth retrying.
/// An error with its causes, `: `-separated.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn request_error(err: &reqwest::Error) -> SinkError {
    let reason = if err.is_timeout() {
        "http_timeout"
    } else if err.is_connect() {
        "http_unreachable"
    } else {
        "http_error"
    };
    // reqwest's Display leaves out the cause (refused, reset...), which is what an operator needs.
    let mut message = with_causes(err);
    // reqwest shows the URL (without its user info, with its query): the message goes to the
    // retry log and the dead letter's headers, so its credentials are redacted.
    if let Some(url) = err.url() {
        message = crate::config::redact_url_in(&message, url.as_str());
    }
    SinkError::retryable(reason, message)
}

/// What a status means for the records of its request.
fn status_outcome(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<(), SinkError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_KEPT)]);
    let message = format!("HTTP {status}: {}", text.trim());
    let mut err = if retryable_status(status) {
        SinkError::retryable(status_reason(status), message)
    } else {
        SinkError::permanent(status_reason(status), message)
    };
    err.status = Some(status);
    err.retry_after = retry_after;
    Err(err)
}

/// 408 (request timeout), 429 (too many requests) and every 5xx.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// `http_<status>`, as a static string (a reason is a metric label and a header value).
fn status_reason(status: u16) -> &'static str {
    static REASONS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let reasons = REASONS.get_or_init(|| {
        // 600 short strings made once for the process's life.
        (0..600u16)
            .map(|code| &*Box::leak(format!("http_{code}").into_boxed_str()))
            .collect()
    });
    reasons
        .get(usize::from(status))
        .copied()
        .unwrap_or("http_other")
}

/// A `Retry-After` value (seconds, or an HTTP date) as a wait from `now`.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The outcome of each of `count` records from a `_bulk` answer: created (or already there: a
/// record delivered again) counts as delivered; 429 and 5xx items are retried; any other item
/// error fails its record with the item's status and error.
fn bulk_outcomes(body: &[u8], count: usize) -> Vec<Result<(), SinkError>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        errors: bool,
        #[serde(default)]
        items: Vec<std::collections::HashMap<String, Item>>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        status: u16,
        #[serde(default)]
        error: Option<serde_json::Value>,
    }
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(err) => {
            let err = SinkError::retryable(
                "bulk_answer_invalid",
                format!("the _bulk answer is not what Elasticsearch sends: {err}"),
            );
            return vec![Err(err); count];
        }
    };
    if !answer.errors && answer.items.len() == count {
        return vec![Ok(()); count];
    }
    if answer.items.len() != count {
        let err = SinkError::retryable(
            "bulk_answer_invalid",
            format!(
                "the _bulk answer has {} items for {count} records",
                answer.items.len()
            ),
        );
        return vec![Err(err); count];
    }
    answer
        .items
        .into_iter()
        .map(|item| {
            let Some(item) = item.into_values().next() else {
                return Err(SinkError::retryable(
                    "bulk_answer_invalid",
                    "a _bulk item has no action",
                ));
            };
            // 409: a document with this record's id exists (delivered before).
            if (200..300).contains(&item.status) || item.status == 409 {
                return Ok(());
            }
            let error = item.error.map_or_else(String::new, |error| {
                match (error.get("type"), error.get("reason")) {
                    (Some(kind), Some(reason)) => format!(
                        "{}: {}",
                        kind.as_str().unwrap_or_default(),
                        reason.as_str().unwrap_or_default()
                    ),
                    _ => error.to_string(),
                }
            });
            status_outcome(item.status, None, error.as_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_record;

    fn endpoint(toml_text: &str, elasticsearch: bool) -> HttpEndpoint {
        let config: HttpSinkConfig = toml::from_str(toml_text).expect("an http sink section");
        let destination = if elasticsearch {
            HttpDestination::Elasticsearch
        } else {
            HttpDestination::Http
        };
        HttpEndpoint::new(&config, destination).expect("an endpoint")
    }

    /// Issue 31: a Loki push groups a request's records into streams by their label values,
    /// keeps batch order inside a stream, sends the original payload as the line with the
    /// record's timestamp in nanoseconds, and the listed fields as structured metadata; a
    /// field label outside its values is `other`.
    #[test]
    fn a_loki_push_groups_records_into_streams_in_batch_order() {
        let config: HttpSinkConfig = toml::from_str(
            "url = \"http://vl:9428/insert/\"\ntenant = \"7\"\nmetadata = [\"trace\"]\n\
             labels = { level = \"{level}\", service = \"{service}\", env = { field = \"env\", values = [\"prod\"] } }",
        )
        .expect("a loki section");
        let loki = HttpEndpoint::new(&config, HttpDestination::Loki).expect("a loki endpoint");
        assert_eq!(
            loki.target.url.as_str(),
            "http://vl:9428/insert/loki/api/v1/push"
        );
        assert_eq!(loki.target.headers["x-scope-orgid"], "7");
        let record = |offset: i64, payload: &str, service: &str| {
            let mut record = test_record(0, offset, None, Some(payload.as_bytes()));
            record.service = Some(Box::from(service));
            record.timestamp = Some(1_000 + offset);
            record
        };
        let batch = [
            record(
                1,
                r#"{"level":"error","message":"a","env":"prod","trace":"t1"}"#,
                "cart",
            ),
            record(2, r#"{"level":"info","message":"b","env":"dev"}"#, "cart"),
            record(
                3,
                "{\"level\": \"error\",\n \"message\": \"c\", \"env\": \"prod\", \"trace\": 7}",
                "cart",
            ),
        ];
        let mut body = Vec::new();
        write_body(&mut body, &loki.target.layout, &batch);
        let pushed: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            pushed,
            serde_json::json!({"streams": [
                {"stream": {"env": "prod", "level": "error", "service": "cart"},
                 "values": [
                    ["1001000001", r#"{"level":"error","message":"a","env":"prod","trace":"t1"}"#, {"trace": "t1"}],
                    // The line as the other sinks write it: compact, one line.
                    ["1003000003", r#"{"level":"error","message":"c","env":"prod","trace":7}"#, {"trace": "7"}]
                 ]},
                {"stream": {"env": "other", "level": "info", "service": "cart"},
                 "values": [["1002000002", r#"{"level":"info","message":"b","env":"dev"}"#]]}
            ]})
        );
    }

    /// `_bulk` is a path segment of the URL as written, whatever its slashes and query; the
    /// connection check asks the root the user wrote.
    #[test]
    fn the_bulk_url_and_the_cluster_root_come_from_the_url_as_written() {
        for (written, bulk, root) in [
            ("http://es:9200", "http://es:9200/_bulk", "http://es:9200/"),
            ("http://es:9200/", "http://es:9200/_bulk", "http://es:9200/"),
            (
                "https://proxy/es",
                "https://proxy/es/_bulk",
                "https://proxy/es/",
            ),
            (
                "https://proxy/es/",
                "https://proxy/es/_bulk",
                "https://proxy/es/",
            ),
            (
                "http://es:9200/?pipeline=geoip&refresh=false",
                "http://es:9200/_bulk?pipeline=geoip&refresh=false",
                "http://es:9200/",
            ),
        ] {
            let config = format!("url = \"{written}\"\nindex = \"logs\"");
            let url = &endpoint(&config, true).target.url;
            assert_eq!(url.as_str(), bulk, "{written}");
            assert_eq!(cluster_root(url).as_str(), root, "{written}");
        }
        // An HTTP sink posts to the URL as written.
        let url = &endpoint("url = \"http://in:8080/logs?x=1\"", false)
            .target
            .url;
        assert_eq!(url.as_str(), "http://in:8080/logs?x=1");
    }

    /// An otlp URL is the logs URL as written when it ends in `/v1/logs`, else a base that
    /// gets it; the body is protobuf, gzipped by default.
    #[test]
    fn otlp_urls_end_in_v1_logs() {
        for (written, posted) in [
            ("http://c:4318", "http://c:4318/v1/logs"),
            ("http://c:4318/", "http://c:4318/v1/logs"),
            ("https://gw/otlp", "https://gw/otlp/v1/logs"),
            ("https://gw/otlp/v1/logs", "https://gw/otlp/v1/logs"),
            (
                "http://c:4318/v1/logs?tenant=a",
                "http://c:4318/v1/logs?tenant=a",
            ),
        ] {
            let config: HttpSinkConfig =
                toml::from_str(&format!("url = \"{written}\"")).expect("a section");
            let endpoint = HttpEndpoint::new(&config, HttpDestination::Otlp).expect("endpoint");
            assert_eq!(endpoint.target.url.as_str(), posted, "{written}");
            assert!(endpoint.target.gzip);
            assert_eq!(
                endpoint.target.headers[reqwest::header::CONTENT_TYPE],
                "application/x-protobuf"
            );
        }
    }

    /// A loopback port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    }

    /// Issue 34, item 7: the message of a failed request is what the retry log and the dead
    /// letter's `logbridge.error.message` header show; it must not carry the URL's secrets.
    #[tokio::test]
    async fn a_failed_request_does_not_show_the_url_secrets() {
        let url = format!(
            "http://ingest:pa55w0rd@127.0.0.1:{}/in?api_key=k3y-value&n=1",
            closed_port()
        );
        let mut sink = endpoint(&format!("url = \"{url}\"\ntimeout_ms = 2000"), false).sink();
        let batch = [record(1, "{\"a\":1}")];
        let outcomes = sink.deliver("r", &batch).await;
        let err = outcomes[0].as_ref().expect_err("nothing listens");
        assert_eq!(err.reason, "http_unreachable", "{err:?}");
        for secret in ["pa55w0rd", "k3y-value"] {
            assert!(!err.message.contains(secret), "{secret} in {}", err.message);
            assert!(!err.to_string().contains(secret), "{secret} in {err}");
        }
        assert!(err.message.contains("127.0.0.1"), "{}", err.message);
    }

    /// Issue 34, item 2: a token read through `${file:...}` that is rotated (the file
    /// rewritten) is sent from then on without a restart; a request refused with the old one
    /// after the change is sent again, not failed.
    #[tokio::test]
    async fn a_token_read_from_a_file_is_read_again_when_the_file_is_rewritten() {
        let (url, _) = serve_headers(|authorization| {
            if authorization == "Bearer second-token" {
                (200, String::new())
            } else {
                (401, "token expired".to_string())
            }
        })
        .await;
        let dir = tempfile::tempdir().expect("dir");
        let token = dir.path().join("token");
        std::fs::write(&token, "first-token\n").expect("token written");
        let config = crate::config::Config::from_toml_str(&format!(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n\
             [[routes]]\nname = \"r\"\nlevels = [\"error\"]\n\
             sink = {{ type = \"http\", url = \"{url}/in\", auth = {{ type = \"bearer\", token = \"${{file:{}}}\" }} }}\n",
            token.display()
        ))
        .expect("config");
        let crate::config::SinkConfig::Http(http) = &config.routes[0].sink else {
            panic!("an http sink");
        };
        let mut sink = HttpEndpoint::new(http, HttpDestination::Http)
            .expect("endpoint")
            .sink();
        let batch = [record(1, "{\"a\":1}")];
        let outcomes = sink.deliver("r", &batch).await;
        let err = outcomes[0]
            .as_ref()
            .expect_err("the first token is refused");
        assert_eq!(err.status, Some(401), "{err:?}");
        std::fs::write(&token, "second-token\n").expect("token rotated");
        let started = std::time::Instant::now();
        let mut refused = Vec::new();
        let delivered = loop {
            let outcomes = sink.deliver("r", &batch).await;
            match &outcomes[0] {
                Ok(()) => break true,
                Err(err) => refused.push((err.reason, err.kind)),
            }
            if started.elapsed() > Duration::from_secs(15) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            delivered,
            "still refused 15 s after the token file was rewritten: {refused:?}"
        );
        assert!(
            refused
                .iter()
                .any(|(reason, kind)| *reason == "credentials_changed"
                    && *kind == FailureKind::Retryable)
                || refused.is_empty(),
            "a refusal after the change must be retried: {refused:?}"
        );
    }

    /// Serves `answer(authorization header)` on a loopback port until the test's runtime ends.
    async fn serve_headers(
        answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        serve_with(move |headers, _| {
            let authorization = headers
                .get(reqwest::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            answer(authorization)
        })
        .await
    }

    /// Serves `answer(body)` (status and text) on a loopback port until the test's runtime
    /// ends; counts the requests.
    async fn serve(
        answer: impl Fn(&[u8]) -> (u16, String) + Send + Sync + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        serve_with(move |_, body| answer(body)).await
    }

    /// Serves `answer(headers, body)` on a loopback port until the test's runtime ends; counts
    /// the requests.
    async fn serve_with(
        answer: impl Fn(&HeaderMap, &[u8]) -> (u16, String) + Send + Sync + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let answer = answer.clone();
                            let counted = counted.clone();
                            async move {
                                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let headers = request.headers().clone();
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|collected| collected.to_bytes())
                                    .unwrap_or_default();
                                let (status, text) = answer(&headers, &body);
                                let mut response = hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(text),
                                ));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status).expect("a status");
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{address}"), requests)
    }

    /// Issue 34, item 9: one record the endpoint refuses (400 or 422) must not fail the others
    /// of its request: the request is split down to that record.
    #[tokio::test]
    async fn one_refused_record_fails_alone_and_the_rest_of_its_request_is_delivered() {
        for status in [400u16, 422] {
            let (url, requests) = serve(move |body| {
                if body.windows(3).any(|window| window == b"bad") {
                    (
                        status,
                        "{\"error\":\"field bad is not allowed\"}".to_string(),
                    )
                } else {
                    (200, String::new())
                }
            })
            .await;
            let mut sink = endpoint(&format!("url = \"{url}/in\""), false).sink();
            let batch: Vec<Record> = (0..64)
                .map(|i| record(i, if i == 37 { "{\"bad\":1}" } else { "{\"ok\":1}" }))
                .collect();
            let outcomes = sink.deliver("r", &batch).await;
            let failed: Vec<usize> = (0..outcomes.len())
                .filter(|i| outcomes[*i].is_err())
                .collect();
            assert_eq!(failed, [37], "{status}: only the bad record fails");
            let err = outcomes[37].as_ref().unwrap_err();
            assert_eq!(err.status, Some(status));
            assert_eq!(err.kind, FailureKind::Permanent);
            // 1 request, then two halves per level down to the record (6 levels for 64).
            let sent = requests.load(std::sync::atomic::Ordering::SeqCst);
            assert!(sent <= 1 + 2 * 6, "{status}: {sent} requests");
        }
        // An endpoint that refuses everything: the batch costs its requests plus the budget.
        let (url, requests) = serve(|_| (400, "no".to_string())).await;
        let mut sink = endpoint(&format!("url = \"{url}/in\"\nmax_records = 100"), false).sink();
        let batch: Vec<Record> = (0..256).map(|i| record(i, "{\"ok\":1}")).collect();
        let outcomes = sink.deliver("r", &batch).await;
        assert!(outcomes
            .iter()
            .all(|outcome| outcome.as_ref().is_err_and(|err| err.status == Some(400))));
        let sent = requests.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            sent,
            3 + 256,
            "3 requests of 100, 100 and 56, and one per record"
        );
    }

    /// Bodies over `GZIP_INLINE_MAX` are compressed on a blocking thread (item 11a); what
    /// arrives is the same gzip stream either way. (That the runtime's threads are not held up
    /// meanwhile is a matter of time, not asserted.)
    #[tokio::test]
    async fn large_gzip_bodies_compressed_off_the_runtime_arrive_whole() {
        use std::io::Read as _;
        let (url, requests) = serve(|body| {
            let mut plain = Vec::new();
            let decoded = flate2::read::GzDecoder::new(body).read_to_end(&mut plain);
            let lines = plain.split(|byte| *byte == b'\n').filter(|l| !l.is_empty());
            match decoded {
                Ok(_) if lines.count() == 2_000 => (200, String::new()),
                _ => (400, "not the body sent".to_string()),
            }
        })
        .await;
        let mut sink = endpoint(
            &format!("url = \"{url}/in\"\ncompression = \"gzip\"\nmax_records = 5000"),
            false,
        )
        .sink();
        let payload = format!("{{\"message\":\"{}\"}}", "m".repeat(100));
        let batch: Vec<Record> = (0..2_000).map(|i| record(i, &payload)).collect();
        let outcomes = sink.deliver("r", &batch).await;
        assert!(outcomes.iter().all(Result::is_ok), "{:?}", outcomes[0]);
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Over 200 KiB of NDJSON: the blocking-thread path.
        assert!(2_000 * payload.len() > GZIP_INLINE_MAX);
    }

    /// A server on loopback that answers every request with `status` and a chunked body that
    /// does not end (up to 256 MiB, or until the client goes away).
    async fn endless_answer(status: &'static str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = vec![0u8; 64 << 10];
                    // The request is small: one read takes its headers (and its body).
                    let _ = stream.read(&mut request).await;
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
                    for _ in 0..(256 << 20) / 0x1000 {
                        if stream.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{address}")
    }

    /// Issue 34, item 11a: an answer's body is read up to a bound, not to its end: an error
    /// answer whose body does not end is an error answer (its status), not a timeout after
    /// reading it for `timeout_ms`; a `_bulk` answer past its bound is retried as such.
    #[tokio::test]
    async fn answers_are_read_up_to_a_bound() {
        let url = endless_answer("500 Internal Server Error").await;
        let mut sink = endpoint(&format!("url = \"{url}/in\"\ntimeout_ms = 5000"), false).sink();
        let batch = [record(1, "{\"a\":1}")];
        let outcomes = sink.deliver("r", &batch).await;
        let err = outcomes[0].as_ref().expect_err("a 500");
        assert_eq!(err.reason, "http_500", "{err}");
        assert!(
            err.message.len() < 2 * ERROR_BODY_KEPT,
            "{}",
            err.message.len()
        );

        let url = endless_answer("200 OK").await;
        let mut sink = endpoint(
            &format!("url = \"{url}\"\nindex = \"logs\"\ntimeout_ms = 5000"),
            true,
        )
        .sink();
        let outcomes = sink.deliver("r", &batch).await;
        let err = outcomes[0].as_ref().expect_err("no usable answer");
        assert_eq!(err.reason, "bulk_answer_too_large", "{err}");
        assert_eq!(err.kind, FailureKind::Retryable);
    }

    #[test]
    fn statuses_sort_into_delivered_retried_and_refused() {
        assert!(status_outcome(200, None, b"").is_ok());
        assert!(status_outcome(204, None, b"").is_ok());
        for status in [408, 429, 500, 502, 503, 504] {
            let err = status_outcome(status, Some(Duration::from_secs(2)), b"busy").unwrap_err();
            assert_eq!(err.kind, FailureKind::Retryable, "{status}");
            assert_eq!(err.retry_after, Some(Duration::from_secs(2)));
            assert_eq!(err.status, Some(status));
        }
        for status in [400, 401, 403, 404, 413, 422] {
            let err = status_outcome(status, None, b"{\"error\":\"bad\"}").unwrap_err();
            assert_eq!(err.kind, FailureKind::Permanent, "{status}");
            assert_eq!(err.reason, format!("http_{status}"));
            assert_eq!(err.status, Some(status));
            assert!(err.message.contains("bad"), "{}", err.message);
        }
    }

    #[test]
    fn a_request_refused_as_too_large_is_halved_down_to_one_record() {
        let refused = || status_outcome(413, None, b"too large");
        let all_refused = |n: usize| (0..n).map(|_| refused()).collect::<Vec<_>>();
        let budget = &mut 0;
        assert_eq!(
            halves_to_send_again(&(10..15), &all_refused(5), budget),
            Some([10..12, 12..15])
        );
        assert_eq!(
            halves_to_send_again(&(4..6), &all_refused(2), budget),
            Some([4..5, 5..6])
        );
        assert_eq!(
            halves_to_send_again(&(7..8), &all_refused(1), budget),
            None,
            "alone: refused"
        );
        let mut mixed = all_refused(4);
        mixed[2] = status_outcome(400, None, b"bad");
        assert_eq!(
            halves_to_send_again(&(0..4), &mixed, &mut 10),
            None,
            "not all refused alike"
        );
        let delivered = vec![Ok(()); 4];
        assert_eq!(halves_to_send_again(&(0..4), &delivered, &mut 10), None);
    }

    #[test]
    fn requests_refused_as_bad_are_halved_while_the_budget_lasts() {
        for status in [400, 422] {
            let refused = vec![status_outcome(status, None, b"bad"); 4];
            let mut budget = 3;
            assert_eq!(
                halves_to_send_again(&(0..4), &refused, &mut budget),
                Some([0..2, 2..4])
            );
            assert_eq!(budget, 1, "two requests spent");
            assert_eq!(
                halves_to_send_again(&(0..4), &refused, &mut budget),
                None,
                "budget spent: the request fails whole"
            );
        }
        let unauthorized = vec![status_outcome(401, None, b"no"); 4];
        assert_eq!(
            halves_to_send_again(&(0..4), &unauthorized, &mut 10),
            None,
            "a 401 is about the request, not a record"
        );
    }

    #[test]
    fn gzip_bodies_decompress_to_what_was_sent() {
        use std::io::Read as _;
        let body = b"{\"a\":1}\n{\"b\":2}\n".repeat(100);
        let compressed = gzip(&body).expect("gzip");
        assert!(
            compressed.len() < body.len() / 4,
            "{} bytes",
            compressed.len()
        );
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut plain)
            .expect("a gzip stream");
        assert_eq!(plain, body);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }

    fn record(offset: i64, payload: &str) -> Record {
        let mut record = test_record(0, offset, None, Some(payload.as_bytes()));
        record.decoded = Some(Ok(crate::event::Level::new("error")));
        record
    }

    #[test]
    fn batches_split_by_records_and_bytes_and_a_large_record_goes_alone() {
        let batch: Vec<Record> = (0..7)
            .map(|i| record(i, "{\"a\":\"0123456789\"}"))
            .collect();
        assert_eq!(requests(&batch, 3, 1 << 20), vec![0..3, 3..6, 6..7]);
        // 18 bytes each: two fit in 40.
        assert_eq!(requests(&batch, 100, 40), vec![0..2, 2..4, 4..6, 6..7]);
        assert_eq!(
            requests(&batch, 100, 5),
            (0..7).map(|i| i..i + 1).collect::<Vec<_>>()
        );
        assert!(requests(&[], 3, 10).is_empty());
    }

    #[test]
    fn bodies_hold_the_compacted_payloads() {
        let batch = vec![
            record(1, "{\"a\": 1,\n \"b\": \"x y\"}"),
            record(2, "{\"c\":2}"),
        ];
        let mut out = Vec::new();
        write_body(&mut out, &Layout::Ndjson, &batch);
        assert_eq!(out, b"{\"a\":1,\"b\":\"x y\"}\n{\"c\":2}\n");
        out.clear();
        write_body(&mut out, &Layout::JsonArray, &batch);
        assert_eq!(out, b"[{\"a\":1,\"b\":\"x y\"},{\"c\":2}]");
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed.as_array().map(Vec::len), Some(2));
        out.clear();
        let template = crate::shape::Template::parse(
            "logs-{level}-{service}-{date}",
            crate::shape::Sanitize::IndexName,
            "index",
        )
        .expect("a template");
        let rendered = |mut record: Record| {
            let name = template
                .render(None, &crate::shape::route::context(&record))
                .expect("rendered");
            record.destination = Some(name.into_boxed_str());
            record
        };
        let mut with_service = record(3, "{\"c\":3}");
        with_service.service = Some(Box::from("Cart Service"));
        // 1970-01-01T00:00:01Z
        with_service.timestamp = Some(1_000);
        let with_service = rendered(with_service);
        let mut stamped = record(4, "{\"d\":4}");
        // 2026-11-28T12:00:00Z
        stamped.timestamp = Some(1_795_867_200_000);
        let stamped = rendered(stamped);
        let layout = Layout::Bulk {
            index: "unused".to_string(),
            id_prefix: "eu-1:".to_string(),
        };
        write_body(&mut out, &layout, &[with_service, stamped]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"create\":{\"_index\":\"logs-error-cart_service-1970.01.01\",\"_id\":\"eu-1:logs-0-3-1000\"}}\n{\"c\":3}\n\
             {\"create\":{\"_index\":\"logs-error-unknown-2026.11.28\",\"_id\":\"eu-1:logs-0-4-1795867200000\"}}\n{\"d\":4}\n"
        );
    }

    /// Lines of text go to NDJSON and `_bulk` bodies as the events made of them (a document
    /// must be an object), to Loki as the lines themselves.
    #[test]
    fn text_lines_go_out_as_their_events_and_to_loki_as_lines() {
        let decoder = crate::record::test_text_decoder();
        let batch = vec![
            crate::record::test_record_read(&decoder, 1, b"api [ERROR] boom code=500\n"),
            crate::record::test_record_read(&decoder, 2, b"api [INFO] ok"),
        ];
        let mut out = Vec::new();
        write_body(&mut out, &Layout::Ndjson, &batch);
        let documents: Vec<serde_json::Value> = out
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("a JSON document"))
            .collect();
        assert_eq!(
            documents,
            [
                serde_json::json!({"level": "error", "message": "api [ERROR] boom code=500", "service": "api", "code": "500"}),
                serde_json::json!({"level": "info", "message": "api [INFO] ok", "service": "api"}),
            ]
        );
        let config: HttpSinkConfig = toml::from_str(
            "url = \"http://127.0.0.1:1\"\nlabels = { level = \"{level}\", code = { field = \"code\", values = [\"500\"] } }",
        )
        .expect("a Loki sink");
        let streams = LokiStreams::new(&config).expect("labels");
        out.clear();
        write_loki_body(&mut out, &streams, &batch, SystemTime::UNIX_EPOCH);
        let body: serde_json::Value = serde_json::from_slice(&out).expect("a Loki body");
        let lines: Vec<(&serde_json::Value, &str)> = body["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .flat_map(|stream| {
                stream["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(move |entry| (&stream["stream"], entry[1].as_str().expect("a line")))
            })
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0].1, "api [ERROR] boom code=500",
            "the line, without its ending"
        );
        assert_eq!(lines[0].0["code"], "500", "a label from a logfmt field");
        assert_eq!(lines[1].1, "api [INFO] ok");
        assert_eq!(lines[1].0["code"], "other");
    }

    /// The `_id` of each document of a `_bulk` body.
    fn bulk_ids(layout: &Layout, records: &[Record]) -> Vec<String> {
        let mut body = Vec::new();
        write_body(&mut body, layout, records);
        body.split(|byte| *byte == b'\n')
            .filter(|line| line.starts_with(b"{\"create\""))
            .map(|line| {
                let action: serde_json::Value = serde_json::from_slice(line).expect("an action");
                action["create"]["_id"].as_str().expect("an id").to_string()
            })
            .collect()
    }

    /// Issue 34, item 8: a topic deleted and made again starts at offset 0 again; its records
    /// must not take the ids of the old incarnation's documents (a 409 counts as delivered:
    /// the new document would be dropped in silence). A record replayed keeps its id.
    #[test]
    fn document_ids_differ_across_topic_incarnations_and_stay_for_a_replay() {
        let layout = Layout::Bulk {
            index: "logs".to_string(),
            id_prefix: String::new(),
        };
        let stamped = |offset, ms| {
            let mut record = record(offset, "{\"a\":1}");
            record.timestamp = Some(ms);
            record
        };
        // Offset 3 of partition 0, written by the first incarnation, then by the second.
        let old = stamped(3, 1_795_867_200_000);
        let new = stamped(3, 1_795_953_600_000);
        let ids = bulk_ids(&layout, &[old, new]);
        assert_ne!(ids[0], ids[1], "two records, one id: {ids:?}");
        let replayed = bulk_ids(&layout, &[stamped(3, 1_795_867_200_000)]);
        assert_eq!(replayed[0], ids[0], "a replay keeps its id");
        // The same topic on two source clusters, told apart by `id_prefix`.
        let other_cluster = Layout::Bulk {
            index: "logs".to_string(),
            id_prefix: "eu-2:".to_string(),
        };
        let elsewhere = bulk_ids(&other_cluster, &[stamped(3, 1_795_867_200_000)]);
        assert_eq!(elsewhere[0], "eu-2:logs-0-3-1795867200000");
    }

    /// The log records of one OTLP batch share its offset and timestamp: each must have an id
    /// of its own, or every one after the first would be refused as "already there" (a 409
    /// counts as delivered) and dropped in silence. A record that is not a part keeps its id.
    #[test]
    fn the_log_records_of_one_batch_have_ids_of_their_own() {
        let layout = Layout::Bulk {
            index: "logs".to_string(),
            id_prefix: String::new(),
        };
        let part = |index| {
            let mut record = record(3, "{\"a\":1}");
            record.timestamp = Some(1_795_867_200_000);
            record.part = index;
            record
        };
        let ids = bulk_ids(&layout, &[part(Some(0)), part(Some(1)), part(None)]);
        assert_eq!(
            ids,
            [
                "logs-0-3-1795867200000/0",
                "logs-0-3-1795867200000/1",
                "logs-0-3-1795867200000"
            ]
        );
    }

    #[test]
    fn bulk_items_decide_per_record() {
        let body = br#"{"errors":true,"items":[
            {"create":{"status":201}},
            {"create":{"status":409,"error":{"type":"version_conflict_engine_exception","reason":"exists"}}},
            {"create":{"status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}},
            {"create":{"status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n]"}}}
        ]}"#;
        let outcomes = bulk_outcomes(body, 4);
        assert!(outcomes[0].is_ok());
        assert!(outcomes[1].is_ok(), "already indexed counts as delivered");
        let retried = outcomes[2].as_ref().unwrap_err();
        assert_eq!(
            (retried.kind, retried.reason),
            (FailureKind::Retryable, "http_429")
        );
        let refused = outcomes[3].as_ref().unwrap_err();
        assert_eq!(
            (refused.kind, refused.reason),
            (FailureKind::Permanent, "http_400")
        );
        assert!(refused
            .message
            .contains("mapper_parsing_exception: failed to parse field [n]"));
        assert!(bulk_outcomes(br#"{"errors":false,"items":[]}"#, 2)
            .iter()
            .all(|outcome| outcome.as_ref().unwrap_err().reason == "bulk_answer_invalid"));
        assert!(bulk_outcomes(b"not json", 1)[0].is_err());
    }
}
