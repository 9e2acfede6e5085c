//! The local HTTP endpoint the `http` mode delivers to: it answers every request `200` at once
//! and counts what it took, so the figure is the cost of logbridge's side of HTTP delivery
//! (building bodies, one request per batch and worker, waiting for the answer), not a server's.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};

/// A running endpoint: its URL, and what it received.
pub(super) struct Endpoint {
    pub url: String,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Endpoint> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the bench's HTTP endpoint")?;
        let url = format!("http://{}/ingest", listener.local_addr()?);
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (counted_requests, counted_bytes) = (requests.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (requests, bytes) = (counted_requests.clone(), counted_bytes.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let (requests, bytes) = (requests.clone(), bytes.clone());
                            async move {
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|collected| collected.to_bytes().len())
                                    .unwrap_or(0);
                                requests.fetch_add(1, Ordering::Relaxed);
                                bytes.fetch_add(body as u64, Ordering::Relaxed);
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
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
        Ok(Endpoint {
            url,
            requests,
            bytes,
            task,
        })
    }

    /// Requests and body bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}
