//! The local HTTP endpoint the `http`, `otlp` and `loki` modes deliver to: it answers every
//! request `200` at once and counts what it took (requests, body bytes, and events: the NDJSON
//! lines, or the log records of an OTLP protobuf body, or the entries of a Loki push, each
//! apart), so the figure is the cost of logbridge's side of HTTP delivery
//! (building bodies, one request per batch and worker, waiting for the answer), not a server's.
//! The soak's endpoint is [`Flaky`]: it fails some requests and is down for a while now and then.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};

/// How the soak's endpoint fails: one request in `fail_one_in` is answered 503, and every
/// request for `down_for` in every `every`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flaky {
    pub fail_one_in: u64,
    pub down_for: Duration,
    pub every: Duration,
}

impl Flaky {
    /// Whether the `request`-th request, `since` the endpoint started, fails.
    fn fails(&self, request: u64, since: Duration) -> bool {
        let down = !self.every.is_zero()
            && since.as_nanos() % self.every.as_nanos() < self.down_for.as_nanos();
        down || (self.fail_one_in > 0 && request % self.fail_one_in == self.fail_one_in - 1)
    }
}

/// The kinds of body the endpoint tells apart, each counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// NDJSON from `http` sinks: an event per line.
    Ndjson,
    /// A gzipped OTLP `ExportLogsServiceRequest`: an event per log record.
    Otlp,
    /// A Loki push (`/loki/api/v1/push`): an event per stream entry.
    Loki,
}

impl Body {
    fn of<B>(request: &Request<B>) -> Body {
        let protobuf = request
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|value| value == "application/x-protobuf");
        if request.uri().path().ends_with("/loki/api/v1/push") {
            Body::Loki
        } else if protobuf {
            Body::Otlp
        } else {
            Body::Ndjson
        }
    }

    /// The events in `body`.
    fn events(self, body: &[u8]) -> u64 {
        match self {
            Body::Ndjson => ndjson_lines(body),
            Body::Otlp => otlp_records(body),
            Body::Loki => loki_entries(body),
        }
    }
}

/// Requests, body bytes and events of one kind of body.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    bytes: AtomicU64,
    events: AtomicU64,
}

impl Tally {
    /// Counts a request of `bytes` holding `events`; returns its number (from 0).
    fn add(&self, bytes: usize, events: u64) -> u64 {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed)
    }

    fn load(&self) -> Received {
        Received {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
        }
    }
}

/// What the endpoint counted, one [`Tally`] per [`Body`] (in its order), and the requests it
/// failed.
#[derive(Default)]
struct Counts {
    tallies: [Tally; 3],
    failed: AtomicU64,
}

impl Counts {
    fn tally(&self, body: Body) -> &Tally {
        &self.tallies[body as usize]
    }
}

/// A running endpoint: its URL, and what it received.
pub(super) struct Endpoint {
    pub url: String,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Listens on a free loopback port and answers every request 200.
    pub async fn start() -> anyhow::Result<Endpoint> {
        Endpoint::serve(None).await
    }

    /// Listens on a free loopback port and fails as `flaky` says.
    pub async fn start_flaky(flaky: Flaky) -> anyhow::Result<Endpoint> {
        Endpoint::serve(Some(flaky)).await
    }

    async fn serve(flaky: Option<Flaky>) -> anyhow::Result<Endpoint> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the bench's HTTP endpoint")?;
        let url = format!("http://{}/ingest", listener.local_addr()?);
        let counts = Arc::new(Counts::default());
        let counted = counts.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let counts = counted.clone();
                            async move {
                                let kind = Body::of(&request);
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|collected| collected.to_bytes())
                                    .unwrap_or_default();
                                let request =
                                    counts.tally(kind).add(body.len(), kind.events(&body));
                                let mut response = Response::new(Full::new(Bytes::new()));
                                if flaky
                                    .is_some_and(|flaky| flaky.fails(request, started.elapsed()))
                                {
                                    counts.failed.fetch_add(1, Ordering::Relaxed);
                                    *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                }
                                Ok::<_, Infallible>(response)
                            }
                        },
                    );
                    // A connection that breaks only ends itself.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Endpoint { url, counts, task })
    }

    /// Requests, body bytes and events of `body` received so far.
    pub fn received(&self, body: Body) -> Received {
        self.counts.tally(body).load()
    }
}

/// Entries of a Loki push body (`streams[].values[]`); 0 for a body that is not one.
fn loki_entries(body: &[u8]) -> u64 {
    let push: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    push["streams"].as_array().map_or(0, |streams| {
        streams
            .iter()
            .filter_map(|stream| stream["values"].as_array())
            .map(|values| values.len() as u64)
            .sum()
    })
}

/// What the endpoint received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Received {
    pub requests: u64,
    pub bytes: u64,
    pub events: u64,
}

/// Log records in a gzipped OTLP `ExportLogsServiceRequest` (0 if it is not one).
fn otlp_records(body: &[u8]) -> u64 {
    use prost::Message as _;
    use std::io::Read as _;
    let mut plain = Vec::new();
    if flate2::read::GzDecoder::new(body)
        .read_to_end(&mut plain)
        .is_err()
    {
        return 0;
    }
    opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest::decode(&plain[..])
        .map_or(0, |request| {
            request
                .resource_logs
                .iter()
                .flat_map(|resource| &resource.scope_logs)
                .map(|scope| scope.log_records.len() as u64)
                .sum()
        })
}

/// Events in an NDJSON body: its non-empty lines.
fn ndjson_lines(body: &[u8]) -> u64 {
    body.split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .count() as u64
}

impl Endpoint {
    /// NDJSON requests answered so far, and how many requests failed.
    pub fn answered(&self) -> (u64, u64) {
        (
            self.received(Body::Ndjson).requests,
            self.counts.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_the_non_empty_lines_of_a_body() {
        assert_eq!(ndjson_lines(b"{\"a\":1}\n{\"b\":2}\n"), 2);
        assert_eq!(ndjson_lines(b"{\"a\":1}\n{\"b\":2}"), 2);
        assert_eq!(ndjson_lines(b""), 0);
        assert_eq!(ndjson_lines(b"\n\n"), 0);
    }

    #[test]
    fn a_flaky_endpoint_fails_one_in_n_and_while_down() {
        let flaky = Flaky {
            fail_one_in: 4,
            down_for: Duration::from_secs(3),
            every: Duration::from_secs(60),
        };
        let up = Duration::from_secs(10);
        let failures: Vec<u64> = (0..12).filter(|&n| flaky.fails(n, up)).collect();
        assert_eq!(failures, vec![3, 7, 11]);
        assert!(flaky.fails(0, Duration::from_secs(61)));
        assert!(flaky.fails(0, Duration::from_millis(2_999)));
        assert!(!flaky.fails(0, Duration::from_secs(63)));
    }
}
