//! An HTTP destination for the tests that stage crashes against HTTP and Elasticsearch sinks:
//! a hyper server on a loopback port that answers each request by a rule the test can change,
//! and keeps what it accepted, by run (the test says which instance is running) and time.
//! NDJSON bodies (the `http` sink) are accepted or refused whole; `_bulk` bodies (the
//! `elasticsearch` sink) are indexed by `_id`, answering 409 for an `_id` it already holds, as
//! Elasticsearch does for a `create` action.
//!
//! A handler that meets something it cannot read records a violation instead of panicking
//! inside hyper's connection task (where a panic would be swallowed); [`Collector::check`]
//! fails the test on any.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

/// The status for a request carrying these event ids (2xx accepts it whole).
pub type Rule = dyn Fn(&[u64]) -> u16 + Send + Sync;

/// What the collector saw.
#[derive(Default)]
pub struct Collected {
    /// The run the test says is sending now.
    pub run: usize,
    /// Every event id accepted, with the run that sent it and when.
    pub accepted: Vec<(usize, Instant, u64)>,
    /// Requests answered with a status other than 2xx.
    pub refused: usize,
    /// `_bulk`: the event id of each document, by `_id`.
    pub documents: HashMap<String, u64>,
    /// `_bulk`: the index each event id was created in.
    pub indices: HashMap<u64, String>,
    /// `_bulk`: items answered 409 (the `_id` was there already).
    pub conflicts: usize,
    /// What the handler could not read.
    pub violations: Vec<String>,
}

impl Collected {
    /// The ids run `run` delivered.
    pub fn ids_of(&self, run: usize) -> Vec<u64> {
        self.accepted
            .iter()
            .filter(|(sent_by, _, _)| *sent_by == run)
            .map(|(_, _, id)| *id)
            .collect()
    }
}

struct Shared {
    collected: Mutex<Collected>,
    rule: Mutex<Arc<Rule>>,
}

pub struct Collector {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on a port of its own (bound here and kept: no port is released and taken again).
    pub async fn start(rule: Arc<Rule>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let address = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            collected: Mutex::new(Collected::default()),
            rule: Mutex::new(rule),
        });
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let shared = serving.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let shared = shared.clone();
                            async move {
                                let path = request.uri().path().to_string();
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|collected| collected.to_bytes())
                                    .unwrap_or_default();
                                let (status, answer) = shared.answer(&path, &body);
                                Ok::<_, std::convert::Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(answer)))
                                        .expect("response"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            address,
            shared,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Answers by `rule` from now on.
    pub fn set_rule(&self, rule: Arc<Rule>) {
        *self.shared.rule.lock().unwrap() = rule;
    }

    /// Says which run sends from now on.
    pub fn set_run(&self, run: usize) {
        self.shared.collected.lock().unwrap().run = run;
    }

    /// Reads what was collected.
    pub fn with<T>(&self, read: impl FnOnce(&Collected) -> T) -> T {
        read(&self.shared.collected.lock().unwrap())
    }

    /// Fails on anything the handler could not read.
    pub fn check(&self) {
        let collected = self.shared.collected.lock().unwrap();
        assert!(
            collected.violations.is_empty(),
            "the collector met what it could not read: {:?}",
            collected.violations
        );
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn answer(&self, path: &str, body: &[u8]) -> (u16, String) {
        let lines: Vec<&[u8]> = body
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .collect();
        let rule = self.rule.lock().unwrap().clone();
        let mut collected = self.collected.lock().unwrap();
        let parsed: Result<Vec<serde_json::Value>, String> = lines
            .iter()
            .map(|line| {
                serde_json::from_slice(line)
                    .map_err(|err| format!("{err}: {}", String::from_utf8_lossy(line)))
            })
            .collect();
        let values = match parsed {
            Ok(values) => values,
            Err(err) => {
                collected
                    .violations
                    .push(format!("{path}: a line that is not JSON: {err}"));
                return (400, String::new());
            }
        };
        let now = Instant::now();
        let run = collected.run;
        if path == "/_bulk" {
            // Pairs of action and document.
            let mut items = Vec::new();
            let mut errors = false;
            let ids: Vec<u64> = values
                .iter()
                .skip(1)
                .step_by(2)
                .filter_map(|document| document["id"].as_u64())
                .collect();
            let status = rule(&ids);
            if !(200..300).contains(&status) {
                collected.refused += 1;
                return (status, String::new());
            }
            for pair in values.chunks(2) {
                let (Some(id), Some(event)) = (
                    pair[0]["create"]["_id"].as_str(),
                    pair.get(1).and_then(|document| document["id"].as_u64()),
                ) else {
                    collected.violations.push(format!(
                        "a _bulk item without a create _id or an event id: {pair:?}"
                    ));
                    return (400, String::new());
                };
                let item = if collected.documents.contains_key(id) {
                    collected.conflicts += 1;
                    errors = true;
                    serde_json::json!({"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "document already exists"}})
                } else {
                    if let Some(index) = pair[0]["create"]["_index"].as_str() {
                        collected.indices.insert(event, index.to_string());
                    }
                    collected.documents.insert(id.to_string(), event);
                    collected.accepted.push((run, now, event));
                    serde_json::json!({"status": 201, "result": "created"})
                };
                items.push(serde_json::json!({ "create": item }));
            }
            let answer = serde_json::json!({"took": 1, "errors": errors, "items": items});
            return (200, answer.to_string());
        }
        let ids: Option<Vec<u64>> = values.iter().map(|value| value["id"].as_u64()).collect();
        let Some(ids) = ids else {
            collected
                .violations
                .push(format!("{path}: an event without an id"));
            return (400, String::new());
        };
        let status = rule(&ids);
        if (200..300).contains(&status) {
            collected
                .accepted
                .extend(ids.into_iter().map(|id| (run, now, id)));
        } else {
            collected.refused += 1;
        }
        (status, String::new())
    }
}
