//! HTTP endpoint (hyper 1, HTTP/1.1): `/metrics` in the Prometheus text format, `/healthz`
//! (liveness), `/readyz` (readiness: fails while the dead-letter breaker is tripped or a
//! partition is stalled, saying which and why)
//! and `POST /resume` (resets the breaker).
//! Unknown paths answer 404, known paths with another method 405. Header reading is bounded in
//! time and concurrent connections are capped, so a slow or abusive client cannot take the
//! endpoint (or the pipeline) down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::breaker::{BreakerHandle, BreakerState};
use crate::cluster::ClusterProblem;
use crate::committer::Stall;
use crate::consumer::PartitionView;
use crate::dead_letter::DeadLetterTrouble;
use crate::health::Liveness;
use crate::metrics::Metrics;

/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reports on.
#[derive(Clone)]
pub struct HttpState {
    /// Rendered on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Checked on `/healthz`.
    pub liveness: Liveness,
    /// Checked on `/readyz`, reset by `POST /resume`.
    pub breaker: BreakerHandle,
    /// Stalled partitions, checked on `/readyz`.
    pub stalls: tokio::sync::watch::Receiver<Vec<Stall>>,
    /// Whether the dead-letter topic refuses writes, checked on `/readyz`.
    pub dead_letters: tokio::sync::watch::Receiver<Option<DeadLetterTrouble>>,
    /// What the last cluster check found wrong (unreachable, credentials refused, subscribed
    /// topics missing), checked first on `/readyz`.
    pub cluster: tokio::sync::watch::Receiver<Option<ClusterProblem>>,
    /// What `/status` shows besides metrics.
    pub status: Arc<StatusSource>,
}

impl HttpState {
    /// What holds the pipeline back, one line each (shown by `/readyz` and `/status`): the
    /// dead-letter topic refusing writes, records in flight whose commit does not move (the
    /// committer sees them), and partitions behind that are not read at all (the consumer sees
    /// them).
    fn stall_descriptions(&self) -> Vec<String> {
        let dead_letters = self.dead_letters.borrow().as_ref().map(ToString::to_string);
        let unfinished: Vec<String> = self
            .stalls
            .borrow()
            .iter()
            .map(ToString::to_string)
            .collect();
        let unread = self.status.partitions.unread();
        dead_letters
            .into_iter()
            .chain(unfinished)
            .chain(unread.iter().map(ToString::to_string))
            .collect()
    }
}

/// Sources of the `/status` page.
pub struct StatusSource {
    /// The consumer's partitions.
    pub partitions: PartitionView,
    /// The effective configuration, secrets redacted.
    pub config: serde_json::Value,
    /// Route names and worker counts.
    pub routes: Vec<(String, usize)>,
}

fn status_json(state: &HttpState) -> serde_json::Value {
    let metrics = &state.metrics;
    let partitions: Vec<serde_json::Value> = state
        .status
        .partitions
        .snapshot()
        .into_iter()
        .map(|flow| {
            let key = crate::record::PartitionKey {
                topic: crate::record::Topic::new(&flow.topic),
                partition: flow.partition,
            };
            let value =
                |gauge: &dyn prometheus::core::Collector| metrics.partition_value(gauge, &key);
            let whole = |gauge: &dyn prometheus::core::Collector| value(gauge).map(|v| v as i64);
            serde_json::json!({
                "topic": flow.topic,
                "partition": flow.partition,
                "generation": flow.generation,
                "paused": flow.paused,
                "paused_why": flow.paused_why,
                "held": flow.held,
                "committed": whole(&metrics.committed_offset),
                "finished": whole(&metrics.partition_finished_offset),
                "in_flight": whole(&metrics.partition_in_flight),
                "finished_uncommitted": whole(&metrics.partition_uncommitted_gap),
                "oldest_unfinished_age_seconds": value(&metrics.partition_oldest_unfinished),
                "lag": whole(&metrics.partition_lag),
            })
        })
        .collect();
    let routes: Vec<serde_json::Value> = state
        .status
        .routes
        .iter()
        .map(|(name, workers)| {
            // The sampler creates this series at start-up, so the lookup creates nothing new.
            let queued = metrics
                .channel_depth
                .get_metric_with_label_values(&[&format!("worker:{name}")])
                .map(|g| g.get())
                .unwrap_or(0);
            serde_json::json!({"name": name, "workers": workers, "queued": queued})
        })
        .collect();
    let breaker = match state.breaker.state() {
        BreakerState::Closed => serde_json::json!("closed"),
        BreakerState::Tripped(trip) => serde_json::json!({"tripped": trip.to_string()}),
    };
    let stalls = state.stall_descriptions();
    let (in_flight_bytes, held_bytes) = state.status.partitions.bytes();
    serde_json::json!({
        "partitions": partitions,
        "routes": routes,
        "breaker": breaker,
        "stalls": stalls,
        "cluster": state.cluster.borrow().as_ref().map(ToString::to_string),
        "in_flight": metrics.in_flight.get(),
        "in_flight_bytes": in_flight_bytes,
        "held_bytes": held_bytes,
        "config": state.status.config,
    })
}

/// Serves until `shutdown` is cancelled, at most `max_connections` at once (more wait in the
/// kernel's accept backlog); idle or slow ones hold a slot for at most `HEADER_TIMEOUT`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!(%peer, error = %err, "http connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}

fn respond(state: &HttpState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let readable = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/resume" if *request.method() != Method::POST => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            response
        }
        "/resume" => match state.breaker.state() {
            BreakerState::Closed => text(StatusCode::OK, "not tripped; nothing to resume\n"),
            BreakerState::Tripped(_) if state.breaker.reset() => {
                text(StatusCode::ACCEPTED, "breaker reset; consumption resumes\n")
            }
            BreakerState::Tripped(_) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        },
        "/metrics" | "/healthz" | "/readyz" | "/status" if !readable => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => match state.liveness.check() {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(down) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("actors not running: {}\n", down.join(", ")),
            ),
        },
        "/readyz" if state.cluster.borrow().is_some() => {
            let problem = state.cluster.borrow().as_ref().map(ToString::to_string);
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", problem.unwrap_or_default()),
            )
        }
        "/readyz" if !state.status.partitions.in_group() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not in a consumer group yet (no assignment received)\n",
        ),
        "/readyz" => match state.breaker.state() {
            BreakerState::Tripped(trip) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {trip}; POST /resume to continue\n"),
            ),
            BreakerState::Closed => match state.liveness.check() {
                Ok(()) => {
                    let stalls = state.stall_descriptions();
                    if stalls.is_empty() {
                        text(StatusCode::OK, "ready\n")
                    } else {
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}\n", stalls.join("; ")),
                        )
                    }
                }
                Err(down) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: actors not running: {}\n", down.join(", ")),
                ),
            },
        },
        "/status" => {
            let body = serde_json::to_vec_pretty(&status_json(state)).unwrap_or_default();
            let mut response = text(StatusCode::OK, body);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
