//! HTTP endpoint (hyper 1, HTTP/1.1): `/metrics` in the Prometheus text format, `/healthz`
//! (liveness), `/readyz` (readiness: fails while the dead-letter breaker is tripped, a route
//! retries a delivery or a partition is stalled, saying which and why)
//! `/status`, `/runbook` (docs/runbook.md, where the alerts' `runbook_url` points) and
//! `POST /resume` (resets the breaker: from a loopback address, or with the admin token).
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
use crate::consumer::{PartitionFlow, PartitionView};
use crate::dead_letter::DeadLetterTrouble;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::worker::Retrying;

/// `docs/runbook.md` as a page whose headings are anchors (`#logbridgepartitionstalled`), for
/// the alerts' `runbook_url`.
static RUNBOOK_HTML: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| runbook_html(include_str!("../docs/runbook.md")));

/// CommonMark (with GitHub's tables) as HTML; each heading gets the id GitHub gives it (the
/// alerts link `#logbridgepartitionstalled`). Raw HTML in the file is shown as text.
fn runbook_html(markdown: &str) -> String {
    use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};
    let mut events: Vec<Event<'_>> = Vec::new();
    // Where the open heading's start event is, and its text so far.
    let mut heading: Option<(usize, String)> = None;
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        let event = match event {
            Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
            other => other,
        };
        match &event {
            Event::Start(Tag::Heading { .. }) => heading = Some((events.len(), String::new())),
            Event::Text(text) | Event::Code(text) => {
                if let Some((_, title)) = heading.as_mut() {
                    title.push_str(text);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some((at, title)) = heading.take() {
                    if let Event::Start(Tag::Heading { id, .. }) = &mut events[at] {
                        *id = Some(CowStr::from(anchor(&title)));
                    }
                }
            }
            _ => {}
        }
        events.push(event);
    }
    let mut html = String::from(
        "<!doctype html><meta charset=\"utf-8\"><title>logbridge runbook</title><body style=\"max-width:50em;font-family:sans-serif\">\n",
    );
    pulldown_cmark::html::push_html(&mut html, events.into_iter());
    html
}

/// The anchor of a heading, as GitHub makes it: lowercase, spaces to `-`, other punctuation
/// dropped.
pub fn anchor(title: &str) -> String {
    title
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Why an admin request (`POST /resume`) is refused, if it is: it is taken with
/// `Authorization: Bearer <http.admin_token>` from anywhere, and without it from a loopback
/// address only with `http.trust_loopback` (behind a sidecar proxy every request comes from
/// loopback).
fn admin_refusal<B>(
    admin_token: Option<&str>,
    trust_loopback: bool,
    request: &Request<B>,
    peer: std::net::SocketAddr,
) -> Option<(StatusCode, &'static str)> {
    let given = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if let (Some(token), Some(given)) = (admin_token, given) {
        // Without stopping at the first difference: the time taken says nothing about how much
        // of the token was right.
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            token.as_bytes(),
        )) {
            return None;
        }
    }
    if trust_loopback && peer.ip().is_loopback() {
        return None;
    }
    Some(match admin_token {
        None => (
            StatusCode::FORBIDDEN,
            "admin requests need http.admin_token (sent as Authorization: Bearer <token>; logbridge resume does), or http.trust_loopback = true for loopback clients where no proxy shares the host",
        ),
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            "admin requests need Authorization: Bearer <http.admin_token> (logbridge resume sends it)",
        ),
    })
}

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
    /// The workers retrying a delivery (which route, since when, why), checked on `/readyz`.
    pub retrying: Retrying,
    /// Why records wait for the schema registry (`input.schema_registry`), while they do;
    /// checked on `/readyz`.
    pub schema_registry: tokio::sync::watch::Receiver<Option<String>>,
    /// What the last cluster check found wrong (unreachable, credentials refused, subscribed
    /// topics missing), checked first on `/readyz`.
    pub cluster: tokio::sync::watch::Receiver<Option<ClusterProblem>>,
    /// What each entry of `kafka.topics` stood for at the last cluster check (the topics a
    /// pattern matches), shown by `/status`.
    pub subscription: tokio::sync::watch::Receiver<Vec<crate::subscription::Resolved>>,
    /// What `/status` shows besides metrics.
    pub status: Arc<StatusSource>,
    /// `http.admin_token`: a `POST /resume` carrying it as a bearer token is taken.
    pub admin_token: Option<Arc<str>>,
    /// `http.trust_loopback`: a `POST /resume` from loopback is taken without the token.
    pub trust_loopback: bool,
}

impl HttpState {
    /// What holds the pipeline back, one line each (shown by `/readyz` and `/status`): the
    /// dead-letter topic refusing writes, the schema registry failing, routes retrying a delivery, records in flight whose
    /// commit does not move (the committer sees them), and partitions behind that are not read
    /// at all (the consumer sees them).
    fn stall_descriptions(&self) -> Vec<String> {
        let dead_letters = self.dead_letters.borrow().as_ref().map(ToString::to_string);
        let registry = self.schema_registry.borrow().clone();
        let retrying = self.retrying.snapshot();
        let unfinished: Vec<String> = self
            .stalls
            .borrow()
            .iter()
            .map(ToString::to_string)
            .collect();
        let unread = self.status.partitions.unread();
        dead_letters
            .into_iter()
            .chain(registry)
            .chain(retrying.iter().map(ToString::to_string))
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
    /// `at-least-once`, or `exactly-once` with the producer's `transactional.id`.
    pub delivery: serde_json::Value,
}

/// One `/status` row per partition: its flow and its gauges. Each gauge is collected once into
/// a map (linear in its series) and each row looks its values up there: O(P) for P partitions
/// (the snapshot's sort makes the page O(P log P)). Looking each row's values up in the
/// gauges themselves collects every series for every row: O(P²), minutes for 10 000.
fn partition_rows(flows: Vec<PartitionFlow>, metrics: &Metrics) -> Vec<serde_json::Value> {
    let committed = metrics.partition_values(&metrics.committed_offset);
    let finished = metrics.partition_values(&metrics.partition_finished_offset);
    let in_flight = metrics.partition_values(&metrics.partition_in_flight);
    let gap = metrics.partition_values(&metrics.partition_uncommitted_gap);
    let oldest = metrics.partition_values(&metrics.partition_oldest_unfinished);
    let lag = metrics.partition_values(&metrics.partition_lag);
    flows
        .into_iter()
        .map(|flow| {
            let key = (flow.topic, flow.partition);
            let value =
                |values: &std::collections::HashMap<(String, i32), f64>| values.get(&key).copied();
            let whole = |values| value(values).map(|v| v as i64);
            let (topic, partition) = &key;
            serde_json::json!({
                "topic": topic,
                "partition": partition,
                "generation": flow.generation,
                "paused": flow.paused,
                "paused_why": flow.paused_why,
                "held": flow.held,
                "committed": whole(&committed),
                "finished": whole(&finished),
                "in_flight": whole(&in_flight),
                "finished_uncommitted": whole(&gap),
                "oldest_unfinished_age_seconds": value(&oldest),
                "lag": whole(&lag),
            })
        })
        .collect()
}

fn status_json(state: &HttpState) -> serde_json::Value {
    let metrics = &state.metrics;
    // The table and the byte figures under one lock: the held bytes are the paused partitions'.
    let (flows, in_flight_bytes, held_bytes) = state.status.partitions.snapshot_with_bytes();
    let partitions = partition_rows(flows, metrics);
    let routes: Vec<serde_json::Value> = state
        .status
        .routes
        .iter()
        .map(|(name, workers)| {
            // The sampler creates this series at start-up, so the lookup creates nothing new.
            let queued = metrics
                .channel_depth
                .get_metric_with_label_values(&["worker", name])
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
    serde_json::json!({
        "partitions": partitions,
        "routes": routes,
        "delivery": state.status.delivery,
        "breaker": breaker,
        "stalls": stalls,
        "cluster": state.cluster.borrow().as_ref().map(ToString::to_string),
        "topics": *state.subscription.borrow(),
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
                async move { Ok::<_, Infallible>(respond(&state, &request, peer)) }
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

fn respond(
    state: &HttpState,
    request: &Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
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
        "/resume" => {
            if let Some((status, reason)) = admin_refusal(
                state.admin_token.as_deref(),
                state.trust_loopback,
                request,
                peer,
            ) {
                warn!(%peer, "POST /resume refused: {reason}");
                return text(status, format!("{reason}\n"));
            }
            match state.breaker.state() {
                BreakerState::Closed => text(StatusCode::OK, "not tripped; nothing to resume\n"),
                BreakerState::Tripped(_) if state.breaker.reset() => {
                    text(StatusCode::ACCEPTED, "breaker reset; consumption resumes\n")
                }
                BreakerState::Tripped(_) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                }
            }
        }
        "/runbook" if readable => {
            let mut response =
                Response::new(Full::new(Bytes::from_static(RUNBOOK_HTML.as_bytes())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        "/metrics" | "/healthz" | "/readyz" | "/status" | "/runbook" if !readable => {
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
                    if stalls.is_empty() && state.status.partitions.owns_none() {
                        // Ready, and idle: an orchestrator's probe passes, a person reading it
                        // learns why nothing is read here.
                        text(
                            StatusCode::OK,
                            "ready: no partitions assigned (the group has at least as many \
                             members as partitions; this instance takes over when one leaves)\n",
                        )
                    } else if stalls.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::post("/resume");
        if let Some(value) = authorization {
            request = request.header(hyper::header::AUTHORIZATION, value);
        }
        request.body(()).expect("request")
    }

    /// Issue 33, item 5: behind a sidecar proxy every request comes from loopback, so loopback
    /// alone lets nobody resume unless `http.trust_loopback` says so; the token works from
    /// anywhere.
    #[test]
    fn resume_takes_the_admin_token_and_loopback_only_when_trusted() {
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: std::net::SocketAddr = "[::1]:5000".parse().unwrap();
        let remote: std::net::SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let token = Some("a-long-admin-token-123");
        let right = Some("Bearer a-long-admin-token-123");
        let status = |token, trust, authorization, peer| {
            admin_refusal(token, trust, &resume(authorization), peer).map(|refusal| refusal.0)
        };
        // Not trusted: loopback is like any other address.
        for peer in [local, local6, remote] {
            assert_eq!(
                status(None, false, None, peer),
                Some(StatusCode::FORBIDDEN),
                "{peer}"
            );
            assert_eq!(
                status(token, false, None, peer),
                Some(StatusCode::UNAUTHORIZED),
                "{peer}"
            );
            assert_eq!(status(token, false, right, peer), None, "{peer}");
        }
        // Trusted: loopback without a token; others still need it.
        assert_eq!(status(None, true, None, local), None);
        assert_eq!(status(None, true, None, local6), None);
        assert_eq!(status(token, true, None, local), None);
        assert_eq!(
            status(None, true, None, remote),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(None, true, Some("Bearer x"), remote),
            Some(StatusCode::FORBIDDEN),
            "no token configured: nothing to match"
        );
        assert_eq!(
            status(token, true, Some("Bearer a-long-admin-token-124"), remote),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(token, true, Some("a-long-admin-token-123"), remote),
            Some(StatusCode::UNAUTHORIZED),
            "the Bearer scheme is required"
        );
        assert_eq!(status(token, true, right, remote), None);
    }

    /// Issue 34, item 11d: `/status` with many partitions. Each row's gauges are looked up
    /// from one collection per gauge (it used to collect every series of a gauge for each
    /// partition: quadratic). Asserts the rows; prints the time (measured, not asserted).
    #[test]
    fn status_rows_carry_each_partitions_own_gauges() {
        const PARTITIONS: i32 = 10_000;
        let metrics = Metrics::new();
        let mut flows = Vec::new();
        for topic in ["logs", "audit"] {
            for partition in 0..PARTITIONS / 2 {
                let key = crate::record::PartitionKey {
                    topic: crate::record::Topic::new(topic),
                    partition,
                };
                let n = usize::try_from(partition).unwrap_or_default();
                metrics.set_committed(&key, i64::from(partition) * 10);
                // Partition 7 of each topic has not finished anything yet.
                let finished = (partition != 7).then_some(i64::from(partition) * 10 + 5);
                metrics.set_partition(&key, n % 13, n % 5, finished, None);
                flows.push(PartitionFlow {
                    topic: topic.to_string(),
                    partition,
                    generation: 3,
                    paused: partition % 2 == 0,
                    paused_why: None,
                    held: 0,
                });
            }
        }
        let started = std::time::Instant::now();
        let rows = partition_rows(flows, &metrics);
        println!("{} /status rows in {:?}", rows.len(), started.elapsed());
        assert_eq!(rows.len(), PARTITIONS as usize);
        for row in &rows {
            let partition = row["partition"].as_i64().expect("a partition");
            assert_eq!(row["committed"], partition * 10, "{row}");
            assert_eq!(row["in_flight"], partition % 13, "{row}");
            assert_eq!(row["finished_uncommitted"], partition % 5, "{row}");
            if partition == 7 {
                assert!(row["finished"].is_null(), "{row}");
            } else {
                assert_eq!(row["finished"], partition * 10 + 5, "{row}");
            }
            assert!(row["lag"].is_null(), "no lag measured yet: {row}");
            assert_eq!(row["paused"], partition % 2 == 0);
        }
    }

    #[test]
    fn the_runbook_page_has_an_anchor_per_heading() {
        let html = runbook_html(
            "# Title\n\n## LogbridgeBreakerTripped\n\n**Means:** a <b> & `c`\nmore\n\n\
             - one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## The `/readyz` answer\n",
        );
        assert!(html.contains("<h1 id=\"title\">Title</h1>"), "{html}");
        assert!(
            html.contains("<h2 id=\"logbridgebreakertripped\">LogbridgeBreakerTripped</h2>"),
            "{html}"
        );
        assert!(
            html.contains("<p><strong>Means:</strong> a &lt;b&gt; &amp; <code>c</code>\nmore</p>"),
            "{html}"
        );
        assert!(html.contains("<li>one</li>"), "{html}");
        assert!(html.contains("<td>1</td>"), "{html}");
        assert!(
            html.contains("<h2 id=\"the-readyz-answer\">The <code>/readyz</code> answer</h2>"),
            "{html}"
        );
        assert_eq!(anchor("Delivery guarantee"), "delivery-guarantee");
        let runbook = include_str!("../docs/runbook.md");
        let sections: Vec<&str> = runbook
            .lines()
            .filter_map(|line| line.strip_prefix("## "))
            .collect();
        assert!(sections.len() >= 13, "{sections:?}");
        for section in sections {
            let id = format!("id=\"{}\"", anchor(section));
            assert!(RUNBOOK_HTML.contains(&id), "{id} in the served runbook");
        }
    }
}
