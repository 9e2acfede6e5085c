//! OTLP logs from Kafka end to end, on Apache Kafka (this binary's shared broker): records
//! holding `ExportLogsServiceRequest`s as the OpenTelemetry Collector's Kafka exporter writes
//! them (`input.format = "otlp_proto"`, and `"otlp_json"`), each a batch of log records:
//!
//! - every log record is routed by its severity to its route (two file routes and a Kafka
//!   route), with the resource's `service.name` as the service and the attributes as fields;
//! - a batch with one bad log record: that one is dead-lettered alone (reason
//!   `missing_field`, the letter a request holding it alone), the rest are delivered;
//! - a payload that is no request (truncated protobuf) is dead-lettered whole, as it was;
//! - the group's commits, read by a separate client, reach the end offsets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;

/// Kafka records of good batches, and log records in each.
const BATCHES: u64 = 60;
const PER_BATCH: u64 = 5;
/// Kafka keys of the good batches (batch `b` has key `key-{b % KEYS}`): enough that every
/// partition gets records, so that every partition has an end offset to commit to.
const KEYS: u64 = 12;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The severity (number, text) of log record `id`, and the route that takes it.
fn severity(id: u64) -> (i32, &'static str, &'static str) {
    match id % 5 {
        0 => (17, "ERROR", "errors"),
        1 => (13, "WARN", "warnings"),
        2 => (9, "INFO", "info"),
        // No number: the text says the level.
        3 => (0, "Warning", "warnings"),
        _ => (6, "DEBUG2", "info"),
    }
}

fn log_record(id: u64, number: i32, text: &str) -> LogRecord {
    LogRecord {
        time_unix_nano: 1_796_000_000_000_000_000 + id,
        severity_number: number,
        severity_text: text.into(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(format!("request {id} done"))),
        }),
        attributes: vec![
            kv("id", any_value::Value::IntValue(id as i64)),
            kv("http.status_code", any_value::Value::IntValue(200)),
        ],
        ..Default::default()
    }
}

/// A request as the collector's exporter writes it: one resource, one scope, `records`.
fn request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    kv(
                        "service.name",
                        any_value::Value::StringValue("checkout".into()),
                    ),
                    kv("host.name", any_value::Value::StringValue("web-1".into())),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "checkout.http".into(),
                    ..Default::default()
                }),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn routes(dir: &std::path::Path, forwarded: &str, dead: &str, format: &str) -> String {
    let file = |route: &str| dir.join(format!("{route}.jsonl"));
    format!(
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nsink = {{ type = \"file\", path = \"{errors}\" }}\n\
         [[routes]]\nname = \"warnings\"\nlevels = [\"warning\"]\nworkers = 2\nsink = {{ type = \"kafka\", topic = \"{forwarded}\" }}\n\
         [[routes]]\nname = \"info\"\nlevels = [\"info\", \"debug\"]\nworkers = 2\nsink = {{ type = \"file\", path = \"{info}\" }}\n\
         [dead_letter]\ntopic = \"{dead}\"\n\
         [input]\nformat = \"{format}\"\n",
        errors = file("errors").display(),
        info = file("info").display(),
    )
}

/// The ids in the events of a file route, each checked to be an event of log record `id`, in
/// the order of each Kafka key.
fn file_ids(path: &std::path::Path, route: &str) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    let mut last_by_key: BTreeMap<String, u64> = BTreeMap::new();
    for line in read_lines(&[path.to_path_buf()]) {
        let event = &line["event"];
        let id = event["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("an id in {line}"));
        assert!(ids.insert(id), "{route}: id {id} twice");
        assert_eq!(event["message"], format!("request {id} done"), "{line}");
        assert_eq!(event["service"], "checkout", "{line}");
        assert_eq!(event["host.name"], "web-1", "a resource attribute: {line}");
        assert_eq!(event["otel.scope.name"], "checkout.http", "{line}");
        assert_eq!(event["http.status_code"], 200, "{line}");
        assert!(
            event["ts"]
                .as_str()
                .is_some_and(|ts| ts.starts_with("2026-11-30T")),
            "{line}"
        );
        assert_eq!(line["route"], route);
        // The log records of a key arrive in the order they were produced.
        let key = match id {
            9_000.. => "mixed".to_string(),
            _ => format!("key-{}", id / PER_BATCH % KEYS),
        };
        if let Some(last) = last_by_key.insert(key.clone(), id) {
            assert!(last < id, "{route}: {key} had {last} before {id}");
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_batches_are_routed_record_by_record_and_committed_whole() {
    let _serial = serial().await;
    let source = Kafka::shared("otlp-in", 3).await;
    let dead = unique("otlp-dlq");
    let forwarded = unique("otlp-warnings");
    source.create_external_topic(&dead, 1).await;
    source.create_external_topic(&forwarded, 1).await;

    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut expected: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for batch in 0..BATCHES {
        let logs = (batch * PER_BATCH..(batch + 1) * PER_BATCH)
            .map(|id| {
                let (number, text, route) = severity(id + batch);
                expected.entry(route).or_default().insert(id);
                log_record(id, number, text)
            })
            .collect();
        records.push((
            Some(format!("key-{}", batch % KEYS)),
            request(logs).encode_to_vec(),
        ));
    }
    // A batch with one bad log record (no severity at all) among good ones.
    let mixed_ids = 9_000..9_004u64;
    let mut mixed: Vec<LogRecord> = mixed_ids
        .clone()
        .map(|id| log_record(id, 17, "ERROR"))
        .collect();
    mixed[2] = log_record(9_999, 0, "");
    expected
        .entry("errors")
        .or_default()
        .extend([9_000, 9_001, 9_003]);
    let mixed = request(mixed);
    records.push((Some("mixed".into()), mixed.encode_to_vec()));
    // A payload that is no request: a batch cut short.
    let whole = request(vec![log_record(9_100, 9, "")]).encode_to_vec();
    let truncated = whole[..whole.len() - 4].to_vec();
    records.push((Some("truncated".into()), truncated.clone()));
    let placed = source.produce(&records).await;

    let dir = tempfile::tempdir().expect("out dir");
    let group = unique("otlp-group");
    let config = source.config(
        &group,
        "",
        &routes(dir.path(), &forwarded, &dead, "otlp_proto"),
    );
    let (committed, metrics) = source
        .run_until_committed(&group, config, Duration::from_secs(90))
        .await;
    assert!(
        committed,
        "commits reached the end offsets {:?}: {:?}",
        source.end_offsets(),
        source.committed(&group)
    );

    for route in ["errors", "info"] {
        let path = dir.path().join(format!("{route}.jsonl"));
        assert_eq!(file_ids(&path, route), expected[route], "{route}");
    }
    // The Kafka sink forwards each log record as its own JSON event, with the batch's key.
    let out = source.read_all(&forwarded);
    let mut warnings = BTreeSet::new();
    for record in &out {
        let event: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("JSON");
        let id = event["id"].as_u64().expect("an id");
        assert!(warnings.insert(id), "warning {id} twice");
        assert_eq!(event["level"], "warning");
        assert_eq!(
            record.key.as_deref(),
            Some(format!("key-{}", id / PER_BATCH % KEYS).as_bytes())
        );
    }
    assert_eq!(warnings, expected["warnings"]);

    // The bad log record alone, and the payload that is no request, whole.
    let letters = source.read_all(&dead);
    assert_eq!(letters.len(), 2, "{letters:?}");
    let place = ReadRecord::source;
    let mixed_place = placed[BATCHES as usize];
    let truncated_place = placed[BATCHES as usize + 1];
    let record_letter = letters
        .iter()
        .find(|letter| place(letter) == mixed_place)
        .expect("a letter for the bad log record");
    assert_eq!(
        record_letter.header("logbridge.error.reason").as_deref(),
        Some("missing_field")
    );
    let alone = ExportLogsServiceRequest::decode(record_letter.payload.as_deref().expect("value"))
        .expect("the letter is a protobuf request");
    let alone_records: Vec<&LogRecord> = alone
        .resource_logs
        .iter()
        .flat_map(|resource| &resource.scope_logs)
        .flat_map(|scope| &scope.log_records)
        .collect();
    assert_eq!(alone_records, vec![&log_record(9_999, 0, "")]);
    assert_eq!(
        alone.resource_logs[0].resource,
        mixed.resource_logs[0].resource
    );
    let whole_letter = letters
        .iter()
        .find(|letter| place(letter) == truncated_place)
        .expect("a letter for the truncated payload");
    assert_eq!(
        whole_letter.header("logbridge.error.reason").as_deref(),
        Some("not_protobuf")
    );
    assert_eq!(whole_letter.payload.as_deref(), Some(&truncated[..]));

    // Every log record finished once: the good ones processed, the two letters dead-lettered;
    // nothing is left in flight.
    let finished = |status: &str| -> u64 {
        ["errors", "warnings", "info", "none"]
            .iter()
            .map(|route| metrics.finished.with_label_values(&[route, status]).get())
            .sum()
    };
    assert_eq!(finished("processed"), BATCHES * PER_BATCH + 3);
    assert_eq!(finished("dead_lettered"), 2);
    assert_eq!(metrics.in_flight.get(), 0);
    assert_eq!(
        metrics
            .decode_errors
            .with_label_values(&["missing_field"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .decode_errors
            .with_label_values(&["not_protobuf"])
            .get(),
        1
    );
}

/// The same batches in the OTLP JSON encoding (camelCase, ids in hex, 64-bit integers as
/// strings), routed the same way; a log record with a bad trace id dead-lettered alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_json_batches_are_routed_record_by_record() {
    let _serial = serial().await;
    let source = Kafka::shared("otlp-json", 2).await;
    let dead = unique("otlp-json-dlq");
    let forwarded = unique("otlp-json-warnings");
    source.create_external_topic(&dead, 1).await;
    source.create_external_topic(&forwarded, 1).await;

    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut expected: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for batch in 0..20u64 {
        let logs: Vec<serde_json::Value> = (batch * PER_BATCH..(batch + 1) * PER_BATCH)
            .map(|id| {
                let (number, text, route) = severity(id + batch);
                expected.entry(route).or_default().insert(id);
                let mut log = serde_json::json!({
                    "timeUnixNano": (1_796_000_000_000_000_000u64 + id).to_string(),
                    "severityText": text,
                    "body": {"stringValue": format!("request {id} done")},
                    "attributes": [
                        {"key": "id", "value": {"intValue": id.to_string()}},
                        {"key": "http.status_code", "value": {"intValue": "200"}},
                    ],
                    "traceId": "5b8efff798038103d269b633813fc60c",
                    "spanId": "eee19b7ec3c1b174",
                });
                if number != 0 {
                    log["severityNumber"] = number.into();
                }
                if batch == 7 && id % PER_BATCH == 1 {
                    // This one alone is bad: the trace id is not 16 bytes of hex.
                    log["traceId"] = "abc".into();
                    expected.values_mut().for_each(|ids| {
                        ids.remove(&id);
                    });
                }
                log
            })
            .collect();
        let request = serde_json::json!({"resourceLogs": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "checkout"}},
                {"key": "host.name", "value": {"stringValue": "web-1"}},
            ]},
            "scopeLogs": [{"scope": {"name": "checkout.http"}, "logRecords": logs}],
        }]});
        records.push((
            Some(format!("key-{}", batch % KEYS)),
            serde_json::to_vec(&request).expect("JSON"),
        ));
    }
    records.push((Some("bad".into()), b"{\"resourceLogs\": [".to_vec()));
    source.produce(&records).await;

    let dir = tempfile::tempdir().expect("out dir");
    let group = unique("otlp-json-group");
    let config = source.config(
        &group,
        "",
        &routes(dir.path(), &forwarded, &dead, "otlp_json"),
    );
    let (committed, metrics) = source
        .run_until_committed(&group, config, Duration::from_secs(90))
        .await;
    assert!(committed, "commits reached the end offsets");
    for route in ["errors", "info"] {
        let path = dir.path().join(format!("{route}.jsonl"));
        assert_eq!(file_ids(&path, route), expected[route], "{route}");
    }
    let warnings: BTreeSet<u64> = source
        .read_all(&forwarded)
        .iter()
        .map(|record| {
            let event: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("JSON");
            assert_eq!(event["traceId"], "5b8efff798038103d269b633813fc60c");
            event["id"].as_u64().expect("an id")
        })
        .collect();
    assert_eq!(warnings, expected["warnings"]);
    let mut reasons: Vec<String> = source
        .read_all(&dead)
        .iter()
        .map(|letter| letter.header("logbridge.error.reason").expect("a reason"))
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["not_json", "wrong_type"]);
    assert_eq!(metrics.in_flight.get(), 0);
}
