//! Guards of a long run, against an in-process Kafka cluster and an HTTP endpoint on loopback:
//!
//! - a minority route whose endpoint answers 401 to everything (an expired token), interleaved
//!   with a healthy route, without a dead-letter topic: the breaker trips after exactly
//!   `max_consecutive` records of that route were failed and committed past, and holds the rest.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use logbridge::metrics::Metrics;

/// An HTTP server on a loopback port that answers every request with `status`, until dropped.
struct Answering {
    address: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// What each panic of a request's answer said (answered 500 then). A panic in a
    /// connection's task is only printed; checked when the server is dropped.
    panics: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.task.abort();
        let panics = self
            .panics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A test already failing has said why.
        if !panics.is_empty() && !std::thread::panicking() {
            panic!("the test server panicked answering: {panics:?}");
        }
    }
}

async fn answering(status: u16) -> Answering {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let panics: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let recorded = panics.clone();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let recorded = recorded.clone();
                        async move {
                            // Answered in a task of its own: a panic is its JoinError, recorded.
                            let answer = tokio::spawn(async move {
                                // Read the body whole, as an endpoint does before it answers.
                                let _ = request.into_body().collect().await;
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(
                                        b"{\"error\":\"token expired\"}",
                                    )))
                                    .expect("a response")
                            })
                            .await;
                            Ok::<_, std::convert::Infallible>(answer.unwrap_or_else(|err| {
                                recorded
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .push(err.to_string());
                                let mut response = hyper::Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                                response
                            }))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Answering {
        address,
        task,
        panics,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_minority_route_trips_the_breaker_after_max_consecutive_of_its_records() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 2);
    // One record in ten goes to the route whose token expired.
    let records: Vec<(Option<String>, Vec<u8>)> = (0..3_000u64)
        .map(|id| {
            let level = if id % 10 == 0 { "error" } else { "info" };
            (Some(format!("key-{}", id % 97)), event(id, level))
        })
        .collect();
    kafka.produce(&records).await;
    let server = answering(401).await;
    let address = server.address;
    let config = kafka.config(
        &unique("minority"),
        "router_capacity = 256\nworker_capacity = 256",
        &format!(
            "[[routes]]\nname = \"tokens\"\nlevels = [\"error\"]\n\
             sink = {{ type = \"http\", url = \"http://{address}/events\" }}\n\
             [[routes]]\nname = \"info\"\nlevels = [\"info\"]\nsink = {{ type = \"null\" }}\n\
             [breaker]\nmax_consecutive = 20\nwindow = 1000\nmax_invalid_ratio = 0.5\n"
        ),
    );
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::without_http(config, &metrics);
    let failed = || {
        metrics
            .finished
            .with_label_values(&["tokens", "failed"])
            .get()
    };
    let tripped = wait_for(Duration::from_secs(60), || {
        let metrics = metrics.clone();
        async move { metrics.breaker_tripped.get() == 1 }
    })
    .await;
    assert!(tripped, "the breaker did not trip; {} failed", failed());
    let paused = wait_for(Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            metrics.assigned_partitions.get() > 0
                && metrics.paused_total() == metrics.assigned_partitions.get()
        }
    })
    .await;
    assert!(paused, "every partition paused");
    // Nothing more of the route is failed past while it is tripped (held by its worker).
    let more = wait_for(Duration::from_secs(3), || {
        let metrics = metrics.clone();
        async move {
            metrics
                .finished
                .with_label_values(&["tokens", "failed"])
                .get()
                > 20
        }
    })
    .await;
    let processed = metrics
        .finished
        .with_label_values(&["info", "processed"])
        .get();
    println!(
        "breaker tripped: {} records of the failing route failed and committed past, {processed} of the healthy route processed",
        failed()
    );
    assert!(!more, "{} failed: more than max_consecutive", failed());
    assert_eq!(
        failed(),
        20,
        "the bound: max_consecutive records of the failing route"
    );
    pipeline.stop_abandoning().await;
}
