//! The OTLP sink (`type = "otlp"`), with the pipeline reading Apache Kafka (this binary's shared broker):
//!
//! - against the real OpenTelemetry Collector (scripts/otelcol, built by
//!   scripts/install-otelcol.sh, or the binary named by `LOGBRIDGE_OTELCOL`): an event in every
//!   logger shape the auto decoder reads arrives, as the collector decoded it (its file
//!   exporter's OTLP JSON), with the severity number and text, body, attributes and resource
//!   `service.name` the log data model says;
//! - against a small loopback server: an endpoint answering 503 (with `Retry-After`) and then
//!   recovering gets every event; a partial success is counted and not sent again; records
//!   refused with 400 (a protobuf `Status`) are dead-lettered with the status and its message.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use serde_json::{json, Value};

/// The collector binary: `LOGBRIDGE_OTELCOL`, else what scripts/install-otelcol.sh builds (and
/// prints).
fn otelcol() -> PathBuf {
    installed_tool("LOGBRIDGE_OTELCOL", "install-otelcol.sh")
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// The collector, running with an OTLP/HTTP receiver on loopback and a file exporter; killed
/// when dropped.
struct Collector {
    child: std::process::Child,
    port: u16,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    async fn start() -> Collector {
        let binary = otelcol();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let output = dir.path().join("logs.json");
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
                 exporters:\n  file:\n    path: {}\n    flush_interval: 100ms\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n    logs:\n      level: warn\n\
                 \x20 pipelines:\n    logs:\n      receivers: [otlp]\n      exporters: [file]\n",
                output.display()
            ),
        )
        .expect("write the collector's config");
        let child = std::process::Command::new(&binary)
            .arg(format!("--config=file:{}", config.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", binary.display()));
        let mut collector = Collector {
            child,
            port,
            output,
            _dir: dir,
        };
        let listening = wait_for(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        if let Ok(Some(status)) = collector.child.try_wait() {
            panic!("the collector exited: {status}");
        }
        assert!(listening, "the collector listens on 127.0.0.1:{port}");
        collector
    }

    /// Every log record the file exporter wrote, with its resource's attributes.
    fn records(&self) -> Vec<(Value, Value)> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let mut records = Vec::new();
        // One export per line; a line being written is skipped until it ends.
        for line in text.lines() {
            let Ok(export) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            for resource in export["resourceLogs"].as_array().into_iter().flatten() {
                for scope in resource["scopeLogs"].as_array().into_iter().flatten() {
                    assert_eq!(scope["scope"]["name"], "logbridge");
                    for record in scope["logRecords"].as_array().into_iter().flatten() {
                        records.push((resource["resource"].clone(), record.clone()));
                    }
                }
            }
        }
        records
    }
}

/// An attribute of an OTLP JSON record or resource, as its AnyValue JSON.
fn attribute<'a>(holder: &'a Value, key: &str) -> Option<&'a Value> {
    holder["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == key)
        .map(|kv| &kv["value"])
}

/// An event as a common logger writes it, and what its OTLP record must say.
struct Shape {
    logger: &'static str,
    event: Value,
    severity_number: i64,
    severity_text: &'static str,
    service: Option<&'static str>,
    /// The event's time in nanoseconds, where it has one.
    time: Option<u64>,
    /// An attribute the record keeps (key, AnyValue JSON).
    kept: (&'static str, Value),
    /// Fields that were used (level, message, time, service) and must not be repeated.
    used: &'static [&'static str],
}

/// 2024-05-01T10:00:00Z.
const AT: u64 = 1_714_557_600_000_000_000;

/// Every logger shape the auto decoder reads (those of tests/shaping.rs, and a few more), with
/// `id` and the message `m<id>`.
fn shapes() -> Vec<Shape> {
    let shape =
        |logger, event, number, text, service, time, kept: (&'static str, Value), used| Shape {
            logger,
            event,
            severity_number: number,
            severity_text: text,
            service,
            time,
            kept,
            used,
        };
    let mut shapes = vec![
        shape(
            "logbridge",
            json!({"level": "error", "message": "M", "service": "checkout", "code": 503}),
            17,
            "error",
            Some("checkout"),
            None,
            ("code", json!({"intValue": "503"})),
            &["level", "message", "service"],
        ),
        shape(
            "pino",
            json!({"level": 50, "time": 1714557600000u64, "msg": "M", "pid": 7, "hostname": "h"}),
            17,
            "error",
            None,
            Some(AT),
            ("pid", json!({"intValue": "7"})),
            &["level", "time", "msg"],
        ),
        shape(
            "pino trace",
            json!({"level": 10, "time": 1714557600000u64, "msg": "M"}),
            1,
            "trace",
            None,
            Some(AT),
            ("id", Value::Null),
            &["level"],
        ),
        shape(
            "bunyan",
            json!({"name": "app", "hostname": "h", "pid": 1, "level": 30, "msg": "M", "time": "2024-05-01T10:00:00.000Z", "v": 0}),
            9,
            "info",
            None,
            Some(AT),
            ("name", json!({"stringValue": "app"})),
            &["level", "msg", "time"],
        ),
        shape(
            "zap",
            json!({"level": "warn", "ts": 1714557600.5, "caller": "x.go:1", "msg": "M"}),
            13,
            "warn",
            None,
            Some(AT + 500_000_000),
            ("caller", json!({"stringValue": "x.go:1"})),
            &["level", "ts", "msg"],
        ),
        shape(
            "logrus",
            json!({"level": "debug", "msg": "M", "time": "2024-05-01T10:00:00Z", "user": {"id": 3, "roles": ["a", "b"]}}),
            5,
            "debug",
            None,
            Some(AT),
            (
                "user",
                json!({"kvlistValue": {"values": [{"key": "id", "value": {"intValue": "3"}}, {"key": "roles", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}}]}}),
            ),
            &["level", "msg", "time"],
        ),
        shape(
            "slog",
            json!({"time": "2024-05-01T12:00:00+02:00", "level": "ERROR", "msg": "M", "ratio": 0.25, "ok": true}),
            17,
            "ERROR",
            None,
            Some(AT),
            ("ratio", json!({"doubleValue": 0.25})),
            &["level", "msg", "time"],
        ),
        shape(
            "ECS",
            json!({"@timestamp": "2024-05-01T10:00:00Z", "log.level": "error", "message": "M", "ecs.version": "1.6.0", "service.name": "cart"}),
            17,
            "error",
            Some("cart"),
            Some(AT),
            ("ecs.version", json!({"stringValue": "1.6.0"})),
            &["log.level", "message", "@timestamp", "service.name"],
        ),
        shape(
            "ECS nested",
            json!({"log": {"level": "info", "logger": "l"}, "message": "M", "service": {"name": "cart", "version": "1.2"}}),
            9,
            "info",
            Some("cart"),
            None,
            (
                "service",
                json!({"kvlistValue": {"values": [{"key": "version", "value": {"stringValue": "1.2"}}]}}),
            ),
            &["message"],
        ),
        shape(
            "GCP",
            json!({"severity": "CRITICAL", "message": "M", "logging.googleapis.com/trace": "t", "serviceContext": {"service": "billing"}}),
            21,
            "CRITICAL",
            Some("billing"),
            None,
            ("logging.googleapis.com/trace", json!({"stringValue": "t"})),
            &["severity", "message"],
        ),
        shape(
            "GCP notice",
            json!({"severity": "NOTICE", "message": "M", "timestamp": "2024-05-01T10:00:00Z"}),
            9,
            "NOTICE",
            None,
            Some(AT),
            ("id", Value::Null),
            &["severity", "message", "timestamp"],
        ),
        shape(
            "OpenTelemetry",
            json!({"timeUnixNano": AT.to_string(), "severityNumber": 18, "severityText": "ERROR", "body": "M", "attributes": {"a": 1}, "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}),
            18,
            "ERROR",
            None,
            Some(AT),
            ("a", json!({"intValue": "1"})),
            &[
                "severityNumber",
                "severityText",
                "body",
                "attributes",
                "timeUnixNano",
                "traceId",
                "spanId",
            ],
        ),
        shape(
            "python-json-logger",
            json!({"levelname": "WARNING", "message": "M", "name": "py"}),
            13,
            "WARNING",
            None,
            None,
            ("name", json!({"stringValue": "py"})),
            &["levelname", "message"],
        ),
        shape(
            "structlog",
            json!({"event": "M", "level": "info", "logger": "s", "timestamp": "2024-05-01T10:00:00Z"}),
            9,
            "info",
            None,
            Some(AT),
            ("logger", json!({"stringValue": "s"})),
            &["event", "level", "timestamp"],
        ),
        shape(
            "Serilog",
            json!({"@t": "2024-05-01T10:00:00Z", "@m": "M", "@mt": "m {X}", "X": 1}),
            9,
            "info",
            None,
            Some(AT),
            ("X", json!({"intValue": "1"})),
            &["@t", "@m"],
        ),
        shape(
            "Serilog fatal",
            json!({"@mt": "M", "@l": "Fatal"}),
            21,
            "Fatal",
            None,
            None,
            ("id", Value::Null),
            &["@mt", "@l"],
        ),
        shape(
            "tracing-subscriber",
            json!({"timestamp": "2024-05-01T10:00:00.000000Z", "level": "INFO", "fields": {"message": "M"}, "target": "t"}),
            9,
            "INFO",
            None,
            Some(AT),
            ("target", json!({"stringValue": "t"})),
            &["level", "fields", "timestamp"],
        ),
    ];
    for (id, shape) in shapes.iter_mut().enumerate() {
        let text = shape
            .event
            .to_string()
            .replace("\"M\"", &format!("\"m{id}\""));
        shape.event = serde_json::from_str(&text).expect("json");
        shape.event["id"] = json!(id);
        if shape.kept.0 == "id" {
            shape.kept.1 = json!({"intValue": id.to_string()});
        }
    }
    shapes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_logger_shape_reaches_the_collector_as_the_log_data_model_says() {
    let _serial = serial().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let collector = Collector::start().await;
    let shapes = shapes();
    let source = Kafka::shared("otlp", 1).await;
    let records: Vec<(Option<String>, Vec<u8>)> = shapes
        .iter()
        .map(|shape| (None, shape.event.to_string().into_bytes()))
        .collect();
    let produced = source.produce(&records).await;
    let routes = format!(
        "[[routes]]\nname = \"otel\"\nlevels = [\"trace\", \"debug\", \"info\", \"warning\", \"error\", \"critical\", \"fatal\"]\n\
         sink = {{ type = \"otlp\", url = \"http://127.0.0.1:{}\" }}\n[input]\nformat = \"auto\"\n",
        collector.port
    );
    let group = unique("otlp-shapes");
    let (committed, metrics) = source
        .run_until_committed(
            &group,
            source.config(&group, "", &routes),
            Duration::from_secs(60),
        )
        .await;
    assert!(committed, "commits reached the end");
    let expected = shapes.len();
    let arrived = wait_for(Duration::from_secs(30), || {
        let count = collector.records().len();
        async move { count >= expected }
    })
    .await;
    let received = collector.records();
    let arrived_ids: HashSet<String> = received
        .iter()
        .filter_map(|(_, record)| attribute(record, "id"))
        .map(|value| value["intValue"].as_str().unwrap_or_default().to_string())
        .collect();
    let missing: Vec<&str> = shapes
        .iter()
        .enumerate()
        .filter(|(id, _)| !arrived_ids.contains(&id.to_string()))
        .map(|(_, shape)| shape.logger)
        .collect();
    assert!(
        arrived,
        "{} of {} records in the collector's file; missing: {missing:?}",
        received.len(),
        shapes.len()
    );
    assert_eq!(received.len(), shapes.len(), "each once");
    assert_eq!(
        metrics
            .finished
            .with_label_values(&["otel", "failed"])
            .get(),
        0
    );

    let by_id: HashMap<i64, &(Value, Value)> = received
        .iter()
        .map(|entry| {
            let id = attribute(&entry.1, "id").expect("an id attribute")["intValue"]
                .as_str()
                .expect("an int")
                .parse()
                .expect("a number");
            (id, entry)
        })
        .collect();
    for (id, shape) in shapes.iter().enumerate() {
        let (resource, record) = by_id[&(id as i64)];
        let logger = shape.logger;
        println!("{logger}: {record}");
        assert_eq!(record["severityNumber"], shape.severity_number, "{logger}");
        assert_eq!(record["severityText"], shape.severity_text, "{logger}");
        assert_eq!(record["body"]["stringValue"], format!("m{id}"), "{logger}");
        let service = attribute(resource, "service.name").map(|value| value["stringValue"].clone());
        assert_eq!(service, shape.service.map(|name| json!(name)), "{logger}");
        let time: u64 = record["timeUnixNano"]
            .as_str()
            .expect("a time")
            .parse()
            .expect("a number");
        let (partition, offset) = produced[id];
        match shape.time {
            Some(at) => assert_eq!(time, at, "{logger}"),
            // The Kafka record's timestamp: the time it was produced, about now.
            None => assert!(time > AT, "{logger}: {time}"),
        }
        assert!(
            record["observedTimeUnixNano"].as_str().is_some(),
            "{logger}"
        );
        if logger == "OpenTelemetry" {
            assert_eq!(record["traceId"], "5b8efff798038103d269b633813fc60c");
            assert_eq!(record["spanId"], "eee19b7ec3c1b174");
        }
        assert_eq!(
            attribute(record, shape.kept.0),
            Some(&shape.kept.1),
            "{logger}"
        );
        for used in shape.used {
            assert_eq!(
                attribute(record, used),
                None,
                "{logger}: {used} repeated as an attribute"
            );
        }
        assert_eq!(
            attribute(record, "logbridge.source.topic"),
            Some(&json!({"stringValue": source.topic.as_str()}))
        );
        assert_eq!(
            attribute(record, "logbridge.source.partition"),
            Some(&json!({"intValue": partition.to_string()}))
        );
        assert_eq!(
            attribute(record, "logbridge.source.offset"),
            Some(&json!({"intValue": offset.to_string()}))
        );
    }
    // One ResourceLogs per service in each request: records of one service share it.
    let services: HashSet<String> = received
        .iter()
        .filter_map(|(resource, _)| attribute(resource, "service.name"))
        .map(|value| value["stringValue"].to_string())
        .collect();
    assert_eq!(services.len(), 3, "checkout, cart, billing");
}

/// What a test server answers to a decoded request: status, headers and body.
type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);
type Handler = dyn Fn(&hyper::HeaderMap, ExportLogsServiceRequest) -> Answer + Send + Sync;

/// A loopback OTLP/HTTP endpoint answering each request by `handler` (after checking its
/// headers and decoding its gzip protobuf body); its URL.
async fn serve(handler: Arc<Handler>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let (status, headers, answer) = if parts.uri.path() != "/v1/logs"
                                || parts.headers.get("content-type").map(|v| v.as_bytes())
                                    != Some(b"application/x-protobuf")
                                || parts.headers.get("content-encoding").map(|v| v.as_bytes())
                                    != Some(b"gzip")
                            {
                                (
                                    415,
                                    vec![],
                                    b"not an OTLP/HTTP protobuf gzip request".to_vec(),
                                )
                            } else {
                                let mut plain = Vec::new();
                                flate2::read::GzDecoder::new(&body[..])
                                    .read_to_end(&mut plain)
                                    .expect("a gzip body");
                                let request = ExportLogsServiceRequest::decode(&plain[..])
                                    .expect("a request");
                                handler(&parts.headers, request)
                            };
                            let mut response = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf");
                            for (name, value) in headers {
                                response = response.header(name, value);
                            }
                            Ok::<_, std::convert::Infallible>(
                                response
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
    format!("http://{address}")
}

/// The `id` attribute of every record of a request.
fn ids(request: &ExportLogsServiceRequest) -> Vec<u64> {
    request
        .resource_logs
        .iter()
        .flat_map(|resource| &resource.scope_logs)
        .flat_map(|scope| &scope.log_records)
        .map(|record| {
            let value = record
                .attributes
                .iter()
                .find(|kv| kv.key == "id")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref());
            match value {
                Some(any_value::Value::IntValue(id)) => *id as u64,
                other => panic!("no id: {other:?}"),
            }
        })
        .collect()
}

/// The dead-letter topic of `source`'s tests (the broker is shared by the binary's tests).
fn dead_letters(source: &Kafka) -> String {
    format!("{}.dlq", source.topic)
}

fn run_config(source: &Kafka, group: &str, url: &str, extra: &str) -> logbridge::Config {
    let routes = format!(
        "[[routes]]\nname = \"otel\"\nlevels = [\"error\"]\nworkers = 2\nmax_retries = 1000\nretry_backoff_ms = 50\n\
         sink = {{ type = \"otlp\", url = \"{url}/\", max_records = 25 }}\n[dead_letter]\ntopic = \"{}\"\n{extra}",
        dead_letters(source)
    );
    source.config(group, "", &routes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_503_then_recovering_gets_every_event() {
    let _serial = serial().await;
    const EVENTS: u64 = 200;
    let source = Kafka::shared("otlp", 2).await;
    source
        .create_external_topic(&dead_letters(&source), 1)
        .await;
    let records: Vec<(Option<String>, Vec<u8>)> = (0..EVENTS)
        .map(|id| (Some(format!("k{}", id % 10)), event(id, "error")))
        .collect();
    source.produce(&records).await;
    let received: Arc<Mutex<Vec<u64>>> = Arc::default();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler: Arc<Handler> = {
        let (received, requests) = (received.clone(), requests.clone());
        Arc::new(move |_, request| {
            // The first 6 requests are refused as unavailable, then it recovers.
            if requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6 {
                return (503, vec![("retry-after", "1".to_string())], Vec::new());
            }
            received.lock().unwrap().extend(ids(&request));
            (
                200,
                vec![],
                ExportLogsServiceResponse::default().encode_to_vec(),
            )
        })
    };
    let url = serve(handler).await;
    let group = unique("otlp-503");
    let (committed, metrics) = source
        .run_until_committed(
            &group,
            run_config(&source, &group, &url, ""),
            Duration::from_secs(60),
        )
        .await;
    assert!(committed, "commits reached the end");
    let distinct: HashSet<u64> = received.lock().unwrap().iter().copied().collect();
    assert_eq!(distinct.len() as u64, EVENTS, "every event arrived");
    assert!(
        metrics.retries.with_label_values(&["otel"]).get() > 0,
        "retried"
    );
    assert!(
        source.read_all(&dead_letters(&source)).is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_success_is_counted_and_not_sent_again_and_a_400_is_dead_lettered() {
    let _serial = serial().await;
    const EVENTS: u64 = 100;
    let source = Kafka::shared("otlp", 1).await;
    source
        .create_external_topic(&dead_letters(&source), 1)
        .await;
    // Events 10 and 60 are refused with 400 (a protobuf Status), so their requests are split
    // until they are alone; every other request is a partial success rejecting 1 record.
    let records: Vec<(Option<String>, Vec<u8>)> =
        (0..EVENTS).map(|id| (None, event(id, "error"))).collect();
    source.produce(&records).await;
    let refused = [10u64, 60];
    let accepted: Arc<Mutex<Vec<u64>>> = Arc::default();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let partial = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler: Arc<Handler> = {
        let (accepted, requests, partial) = (accepted.clone(), requests.clone(), partial.clone());
        Arc::new(move |_, request| {
            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ids = ids(&request);
            if ids.iter().any(|id| refused.contains(id)) {
                #[derive(Clone, PartialEq, prost::Message)]
                struct Status {
                    #[prost(int32, tag = "1")]
                    code: i32,
                    #[prost(string, tag = "2")]
                    message: String,
                }
                let status = Status {
                    code: 3,
                    message: "log record has an invalid field".into(),
                };
                return (400, vec![], status.encode_to_vec());
            }
            accepted.lock().unwrap().extend(&ids);
            partial.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: 1,
                    error_message: "1 record too old".into(),
                }),
            };
            (200, vec![], answer.encode_to_vec())
        })
    };
    let url = serve(handler).await;
    let group = unique("otlp-partial");
    let rejected_before = logbridge::metrics::otlp_rejected_records()
        .with_label_values(&["otel"])
        .get();
    let (committed, _) = source
        .run_until_committed(
            &group,
            run_config(&source, &group, &url, ""),
            Duration::from_secs(60),
        )
        .await;
    assert!(committed, "commits reached the end");
    let accepted = accepted.lock().unwrap().clone();
    let distinct: HashSet<u64> = accepted.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        accepted.len(),
        "no request sent again after a partial success"
    );
    assert_eq!(distinct.len() as u64, EVENTS - 2);
    let rejected = logbridge::metrics::otlp_rejected_records()
        .with_label_values(&["otel"])
        .get()
        - rejected_before;
    assert_eq!(
        rejected as usize,
        partial.load(std::sync::atomic::Ordering::SeqCst),
        "one per partial success"
    );

    let letters: Vec<(u64, String, Option<String>, String)> = source
        .read_all(&dead_letters(&source))
        .into_iter()
        .map(|record| {
            let value: Value =
                serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("json");
            (
                value["id"].as_u64().expect("id"),
                record.header("logbridge.error.reason").unwrap_or_default(),
                record.header("logbridge.error.http_status"),
                record.header("logbridge.error.message").unwrap_or_default(),
            )
        })
        .collect();
    let parked: HashSet<u64> = letters.iter().map(|letter| letter.0).collect();
    assert_eq!(parked, refused.into_iter().collect(), "{letters:?}");
    for (_, reason, status, message) in &letters {
        assert_eq!(reason, "http_400");
        assert_eq!(status.as_deref(), Some("400"));
        assert!(
            message.contains("log record has an invalid field"),
            "{message}"
        );
    }
}
