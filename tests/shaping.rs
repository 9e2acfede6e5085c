//! Routes that shape what they send, on Apache Kafka (this binary's shared broker):
//!
//! - every transform (set, a templated set, rename, remove, redact, parse_json, add_metadata)
//!   on every log shape the auto decoder reads; a record its transforms left as it was keeps
//!   its original bytes, one they changed is the new JSON;
//! - conditions on fields (`when`), sampling by key (a key kept or dropped whole), a throttle
//!   that dead-letters its excess, and a transform failure dead-lettered with its route;
//! - templated destinations: Kafka topics, file paths and Elasticsearch indices named by a
//!   field and the record's date, a missing field dead-lettered (or its fallback used), names
//!   made safe, and the cap on distinct destinations.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::collector::Collector;
use common::*;
use logbridge::metrics::Metrics;

const ALL_LEVELS: &str =
    "[\"trace\", \"debug\", \"info\", \"warning\", \"error\", \"critical\", \"fatal\"]";

/// Runs `config` until `group` has committed everything produced so far (within 90 s).
async fn run_until_committed(
    kafka: &Kafka,
    group: &str,
    config: logbridge::Config,
) -> Arc<Metrics> {
    let (done, metrics) = kafka
        .run_until_committed(group, config, Duration::from_secs(90))
        .await;
    assert!(done, "commits did not reach the end");
    metrics
}

fn route_events(metrics: &Metrics, route: &str, outcome: &str) -> u64 {
    metrics
        .route_events
        .with_label_values(&[route, outcome])
        .get()
}

/// Each dead letter of `topic` as (event id, reason, route).
fn letters(kafka: &Kafka, topic: &str) -> Vec<(u64, String, String)> {
    kafka
        .read_all(topic)
        .into_iter()
        .map(|record| {
            let value: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("json");
            (
                value["id"].as_u64().expect("id"),
                record.header("logbridge.error.reason").unwrap_or_default(),
                record.header("logbridge.route").unwrap_or_default(),
            )
        })
        .collect()
}

/// What common loggers write, with the field that holds their message text.
fn logger_shapes() -> Vec<(serde_json::Value, &'static str)> {
    use serde_json::json;
    vec![
        (json!({"level": "error", "message": "m"}), "message"),
        (
            json!({"level": 50, "time": 1714557600000u64, "msg": "m", "pid": 7, "hostname": "h"}),
            "msg",
        ),
        (
            json!({"name": "app", "hostname": "h", "pid": 1, "level": 30, "msg": "m", "v": 0}),
            "msg",
        ),
        (
            json!({"level": "warn", "ts": 1714557600.5, "caller": "x.go:1", "msg": "m"}),
            "msg",
        ),
        (
            json!({"level": "ERROR", "msg": "m", "time": "2024-05-01T10:00:00Z"}),
            "msg",
        ),
        (
            json!({"level": "info", "msg": "m", "time": "2024-05-01T10:00:00Z"}),
            "msg",
        ),
        (
            json!({"@timestamp": "2024-05-01T10:00:00Z", "log.level": "error", "message": "m", "ecs.version": "1.6.0"}),
            "message",
        ),
        (json!({"log": {"level": "info"}, "message": "m"}), "message"),
        (
            json!({"severity": "CRITICAL", "message": "m", "logging.googleapis.com/trace": "t"}),
            "message",
        ),
        (
            json!({"severityNumber": 17, "severityText": "ERROR", "body": "m", "attributes": {"a": 1}}),
            "body",
        ),
        (
            json!({"levelname": "WARNING", "message": "m", "name": "py"}),
            "message",
        ),
        (
            json!({"event": "m", "level": "info", "logger": "s"}),
            "event",
        ),
        (
            json!({"@t": "2024-05-01T10:00:00Z", "@mt": "m {X}", "X": 1}),
            "@mt",
        ),
        (json!({"@mt": "m", "@l": "Fatal"}), "@mt"),
        (
            json!({"timestamp": "2024-05-01T10:00:00Z", "level": "INFO", "fields": {"message": "m"}, "target": "t"}),
            "fields.message",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transform_on_every_log_shape_and_untouched_records_keep_their_bytes() {
    let _serial = serial().await;
    let kafka = Kafka::shared("shape-all", 2).await;
    let out_topic = unique("shape-all-out");
    kafka.create_external_topic(&out_topic, 2).await;
    let shapes = logger_shapes();
    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut originals: HashMap<u64, (Vec<u8>, &str)> = HashMap::new();
    for round in 0..10u64 {
        for (n, (shape, text_field)) in shapes.iter().enumerate() {
            let id = round * 100 + n as u64;
            let mut event = shape.clone();
            event["id"] = id.into();
            event["password"] = "hunter2".into();
            event["payload"] = format!("{{\"order\":{id},\"items\":[1,2]}}").into();
            let text =
                format!("payment of user{id}@example.com failed, cc ops.team@corp.example.org");
            match text_field.split_once('.') {
                Some((outer, inner)) => event[outer][inner] = text.into(),
                None => event[*text_field] = text.into(),
            }
            // Pretty-printed: a record written again as new JSON cannot pass for the original.
            let bytes = serde_json::to_vec_pretty(&event).expect("json");
            originals.insert(id, (bytes.clone(), text_field));
            records.push((Some(format!("key-{}", id % 7)), bytes));
        }
    }
    kafka.produce(&records).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("shape-all");
    let routes = format!(
        r#"[[routes]]
name = "shaped"
levels = {ALL_LEVELS}
continue = true
workers = 2
transforms = [
  {{ set = "cluster", value = "eu-1" }},
  {{ set = "origin", value = "{{@topic}}/{{@partition}}" }},
  {{ rename = "msg", to = "message" }},
  {{ remove = ["password", "nothing.here"] }},
  {{ redact = "*", pattern = '[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{{2,}}', replacement = "[email]" }},
  {{ parse_json = "payload" }},
  {{ add_metadata = "kafka", cluster = "eu-1" }},
]
sink = {{ type = "file", path = "{dir}/shaped.jsonl" }}
[[routes]]
name = "renamed"
levels = {ALL_LEVELS}
transforms = [ {{ rename = "msg", to = "message" }} ]
sink = {{ type = "kafka", topic = "{out_topic}" }}
[input]
format = "auto"
"#,
        dir = dir.path().display()
    );
    let config = kafka.config(&group, "", &routes);
    let metrics = run_until_committed(&kafka, &group, config).await;

    let lines = read_lines(&[dir.path().join("shaped.jsonl")]);
    assert_eq!(
        id_counts(&lines).len(),
        originals.len(),
        "every shape shaped"
    );
    for line in &lines {
        let event = &line["event"];
        let id = event["id"].as_u64().expect("id");
        let (original, text_field) = &originals[&id];
        let original: serde_json::Value = serde_json::from_slice(original).expect("json");
        let what = format!("shape {}: {event}", id % 100);
        assert_eq!(event["cluster"], "eu-1", "{what}");
        assert_eq!(
            event["origin"],
            format!("{}/{}", line["topic"].as_str().unwrap(), line["partition"]),
            "{what}"
        );
        assert!(event.get("password").is_none(), "{what}");
        assert!(event.get("msg").is_none(), "{what}");
        let text_at = match *text_field {
            "msg" => "/message".to_string(),
            "fields.message" => "/fields/message".to_string(),
            field => format!("/{field}"),
        };
        assert_eq!(
            event.pointer(&text_at).and_then(|text| text.as_str()),
            Some("payment of [email] failed, cc [email]"),
            "{what}"
        );
        assert!(!event.to_string().contains("example.com"), "{what}");
        assert_eq!(event["payload"]["order"], id, "{what}");
        assert_eq!(event["kafka"]["offset"], line["offset"], "{what}");
        assert_eq!(event["kafka"]["partition"], line["partition"], "{what}");
        assert_eq!(event["kafka"]["topic"], line["topic"], "{what}");
        assert_eq!(event["kafka"]["cluster"], "eu-1", "{what}");
        assert_eq!(event["kafka"]["key"], format!("key-{}", id % 7), "{what}");
        assert!(event["kafka"]["timestamp"].as_i64().is_some(), "{what}");
        // What the transforms did not touch is as it was, in its place.
        for (field, value) in original.as_object().expect("an object") {
            if ![
                "msg", "password", "payload", "message", "body", "event", "@mt", "fields",
            ]
            .contains(&field.as_str())
            {
                assert_eq!(&event[field], value, "{what}: {field}");
            }
        }
        let fields: Vec<&String> = event.as_object().expect("an object").keys().collect();
        let first_original = original.as_object().unwrap().keys().next().unwrap();
        assert_eq!(fields[0], first_original, "{what}: fields keep their order");
    }
    assert_eq!(
        route_events(&metrics, "shaped", "transformed"),
        originals.len() as u64
    );

    // The Kafka route renamed `msg` where there was one and changed nothing else: those
    // records are the new JSON, the others the original bytes, byte for byte.
    let mut changed = 0;
    for record in kafka.read_all(&out_topic) {
        let value = record.payload.expect("a value");
        let event: serde_json::Value = serde_json::from_slice(&value).expect("json");
        let id = event["id"].as_u64().expect("id");
        let (original, text_field) = &originals[&id];
        if *text_field == "msg" {
            changed += 1;
            assert!(event.get("msg").is_none() && event.get("message").is_some());
            assert_ne!(&value, original);
        } else {
            assert_eq!(
                &value,
                original,
                "untouched: the original bytes of {}",
                String::from_utf8_lossy(original)
            );
        }
    }
    assert_eq!(route_events(&metrics, "renamed", "transformed"), changed);
    assert_eq!(
        route_events(&metrics, "renamed", "matched"),
        originals.len() as u64
    );
    println!(
        "shaped {} events of {} logger shapes; the Kafka route rewrote {changed} and forwarded the rest byte for byte",
        originals.len(),
        shapes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_sampling_throttling_and_failed_transforms() {
    let _serial = serial().await;
    const EVENTS: u64 = 800;
    const KEYS: u64 = 40;
    let kafka = Kafka::shared("shape-when", 3).await;
    let dlq = unique("shape-when-dlq");
    kafka.create_external_topic(&dlq, 1).await;
    let status = |id: u64| [200, 404, 500, 503][(id % 4) as usize];
    let path = |id: u64| {
        if id % 10 == 1 {
            "/health/live"
        } else {
            "/api/pay"
        }
    };
    let records: Vec<(Option<String>, Vec<u8>)> = (0..EVENTS)
        .map(|id| {
            let payload = if id % 25 == 0 {
                "not json".to_string()
            } else {
                format!("{{\"n\":{id}}}")
            };
            let event = serde_json::json!({
                "id": id, "level": "error", "message": "m",
                "http": {"status": status(id), "path": path(id)},
                "payload": payload,
            });
            (
                Some(format!("key-{}", id % KEYS)),
                event.to_string().into_bytes(),
            )
        })
        .collect();
    kafka.produce(&records).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("shape-when");
    let file = |name: &str| {
        format!(
            "{{ type = \"file\", path = \"{}/{name}.jsonl\" }}",
            dir.path().display()
        )
    };
    let routes = format!(
        r#"[[routes]]
name = "server-errors"
levels = ["error"]
continue = true
when = {{ all = [ {{ field = "http.status", gte = 500 }}, {{ not = {{ field = "http.path", prefix = "/health" }} }} ] }}
sink = {server_errors}
[[routes]]
name = "sampled"
levels = ["error"]
continue = true
workers = 2
transforms = [ {{ sample = 4 }} ]
sink = {sampled}
[[routes]]
name = "throttled"
levels = ["error"]
continue = true
workers = 2
transforms = [ {{ throttle = 1, burst = 5, excess = "dead-letter" }} ]
sink = {throttled}
[[routes]]
name = "parsed"
levels = ["error"]
transforms = [ {{ parse_json = "payload" }} ]
sink = {parsed}
[dead_letter]
topic = "{dlq}"
"#,
        server_errors = file("server-errors"),
        sampled = file("sampled"),
        throttled = file("throttled"),
        parsed = file("parsed"),
    );
    let config = kafka.config(&group, "", &routes);
    let started = Instant::now();
    let metrics = run_until_committed(&kafka, &group, config).await;
    let took = started.elapsed();
    let ids_in = |name: &str| -> Vec<u64> {
        read_lines(&[dir.path().join(format!("{name}.jsonl"))])
            .iter()
            .map(|line| line["event"]["id"].as_u64().expect("id"))
            .collect()
    };

    // `when`: server errors that are not health checks, each once.
    let mut server_errors = ids_in("server-errors");
    server_errors.sort_unstable();
    let expected: Vec<u64> = (0..EVENTS)
        .filter(|&id| status(id) >= 500 && !path(id).starts_with("/health"))
        .collect();
    assert_eq!(server_errors, expected);
    assert_eq!(
        route_events(&metrics, "server-errors", "matched"),
        expected.len() as u64
    );

    // Sampling by key: a key is kept whole or dropped whole.
    let mut per_key: BTreeMap<u64, u64> = BTreeMap::new();
    for id in ids_in("sampled") {
        *per_key.entry(id % KEYS).or_default() += 1;
    }
    assert!(
        per_key.values().all(|&n| n == EVENTS / KEYS),
        "a sampled key lost some events: {per_key:?}"
    );
    let kept = per_key.len() as u64;
    assert!(
        (1..KEYS).contains(&kept),
        "1 in 4 of {KEYS} keys kept: {kept}"
    );
    assert_eq!(
        route_events(&metrics, "sampled", "sampled_out"),
        EVENTS - kept * (EVENTS / KEYS)
    );

    // The throttle: 5 at once per key, then 1 a second; the excess dead-lettered, nothing lost.
    let passed = ids_in("throttled");
    let letters = letters(&kafka, &dlq);
    let throttled: HashSet<u64> = letters
        .iter()
        .filter(|(_, reason, route)| reason == "throttled" && route == "throttled")
        .map(|(id, _, _)| *id)
        .collect();
    assert!(!throttled.is_empty(), "nothing was over the rate");
    assert_eq!(passed.len() + throttled.len(), EVENTS as usize);
    assert!(passed.iter().all(|id| !throttled.contains(id)));
    let mut passed_per_key: HashMap<u64, u64> = HashMap::new();
    for id in &passed {
        *passed_per_key.entry(id % KEYS).or_default() += 1;
    }
    let most = 5 + took.as_secs() + 1;
    assert!(
        passed_per_key.values().all(|&n| n <= most),
        "a key passed more than its burst and rate allow in {took:?}: {passed_per_key:?}"
    );
    assert_eq!(
        route_events(&metrics, "throttled", "throttled"),
        throttled.len() as u64
    );

    // A payload that is not JSON fails the transform: dead-lettered, naming the route.
    let failed: Vec<u64> = letters
        .iter()
        .filter(|(_, reason, route)| reason == "transform_failed" && route == "parsed")
        .map(|(id, _, _)| *id)
        .collect();
    let mut failed_sorted = failed.clone();
    failed_sorted.sort_unstable();
    let not_json: Vec<u64> = (0..EVENTS).filter(|id| id % 25 == 0).collect();
    assert_eq!(failed_sorted, not_json);
    assert_eq!(
        ids_in("parsed").len() as u64,
        EVENTS - not_json.len() as u64
    );
    assert_eq!(
        route_events(&metrics, "parsed", "transform_failed"),
        not_json.len() as u64
    );
    println!(
        "when: {} server errors; sample: {kept} of {KEYS} keys kept whole; throttle: {} passed, {} dead-lettered in {took:?}; parse_json: {} dead-lettered",
        expected.len(),
        passed.len(),
        throttled.len(),
        failed.len()
    );
}

/// Today's UTC date by `format` (strftime), as `date` gives it.
fn today(format: &str) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", &format!("+{format}")])
        .output()
        .expect("date runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templated_topics_paths_and_indices() {
    let _serial = serial().await;
    const EVENTS: u64 = 300;
    // One partition and one worker on the Kafka route: the order in which destinations first
    // appear is the order of the records, so which one is over the cap is known.
    let kafka = Kafka::shared("shape-tpl", 1).await;
    let prefix = unique("tpl");
    for service in ["cart", "billing", "search"] {
        kafka
            .create_external_topic(&format!("{prefix}-{service}"), 1)
            .await;
    }
    let dlq = unique("shape-tpl-dlq");
    kafka.create_external_topic(&dlq, 1).await;
    let service = |id: u64| match id % 6 {
        0 => Some("cart"),
        1 => Some("billing"),
        2 => Some("search"),
        3 => None,
        4 => Some("Bad/Name"),
        _ => Some("ads"),
    };
    let records: Vec<(Option<String>, Vec<u8>)> = (0..EVENTS)
        .map(|id| {
            let mut event = serde_json::json!({"id": id, "level": "info", "message": "m"});
            if let Some(service) = service(id) {
                event["service"] = service.into();
                event["team"] = service.into();
            }
            (
                Some(format!("key-{}", id % 9)),
                event.to_string().into_bytes(),
            )
        })
        .collect();
    kafka.produce(&records).await;
    let collector = Collector::start(Arc::new(|_: &[u64]| 200)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("shape-tpl");
    let routes = format!(
        r#"[[routes]]
name = "topics"
levels = ["info"]
continue = true
max_destinations = 4
sink = {{ type = "kafka", topic = "{prefix}-{{team}}", options = {{ "topic.metadata.propagation.max.ms" = 2000 }} }}
[[routes]]
name = "files"
levels = ["info"]
continue = true
workers = 2
sink = {{ type = "file", path = "{dir}/{{service}}/%Y/logs.jsonl" }}
[[routes]]
name = "indices"
levels = ["info"]
workers = 2
sink = {{ type = "elasticsearch", url = "{url}", index = "Logs-{{team|none}}-%Y.%m.%d" }}
[dead_letter]
topic = "{dlq}"
"#,
        dir = dir.path().display(),
        url = collector.url(),
    );
    let config = kafka.config(&group, "", &routes);
    let year = today("%Y");
    let date = today("%Y.%m.%d");
    let metrics = run_until_committed(&kafka, &group, config).await;
    collector.check();

    // Kafka: a topic per team; no team (a field without a fallback): dead-lettered; the
    // fourth name, made safe (`Bad_Name`), has no topic: dead-lettered, not retried for ever;
    // a fifth name: over the cap.
    for name in ["cart", "billing", "search"] {
        let ids: Vec<u64> = kafka
            .copies_by_id(&format!("{prefix}-{name}"))
            .into_keys()
            .collect();
        let expected = (0..EVENTS).filter(|&id| service(id) == Some(name)).count();
        assert_eq!(ids.len(), expected, "topic of {name}");
        assert!(ids.iter().all(|&id| service(id) == Some(name)));
    }
    let letters = letters(&kafka, &dlq);
    let mut reasons: HashMap<String, HashSet<u64>> = HashMap::new();
    for (id, reason, route) in &letters {
        assert_eq!(route, "topics", "only the route without fallbacks letters");
        reasons.entry(reason.clone()).or_default().insert(*id);
    }
    let missing: HashSet<u64> = (0..EVENTS).filter(|&id| service(id).is_none()).collect();
    let of = |name: &str| -> HashSet<u64> {
        (0..EVENTS)
            .filter(|&id| service(id) == Some(name))
            .collect()
    };
    let (bad, over) = (of("Bad/Name"), of("ads"));
    assert_eq!(reasons.get("template_field_missing"), Some(&missing));
    assert_eq!(reasons.get("unknown_topic"), Some(&bad));
    assert_eq!(reasons.get("too_many_destinations"), Some(&over));

    // Files: a directory per service (`{service}`, like `{level}`, is `unknown` where the
    // event has none; `/` made safe), under the record's year.
    for (name, dir_name) in [
        (Some("cart"), "cart"),
        (Some("billing"), "billing"),
        (Some("search"), "search"),
        (None, "unknown"),
        (Some("Bad/Name"), "Bad_Name"),
        (Some("ads"), "ads"),
    ] {
        let path = dir.path().join(dir_name).join(&year).join("logs.jsonl");
        let mut ids: Vec<u64> = read_lines(std::slice::from_ref(&path))
            .iter()
            .map(|line| line["event"]["id"].as_u64().expect("id"))
            .collect();
        ids.sort_unstable();
        let expected: Vec<u64> = (0..EVENTS).filter(|&id| service(id) == name).collect();
        assert_eq!(ids, expected, "{}", path.display());
    }

    // Indices: the fallback where there is no team; lowercase, `/` made safe, dated by the
    // record.
    let indices = collector.with(|seen| seen.indices.clone());
    assert_eq!(indices.len() as u64, EVENTS);
    for (id, index) in &indices {
        let name = match service(*id) {
            None => "none".to_string(),
            Some(name) => name.to_lowercase().replace('/', "_"),
        };
        assert_eq!(index, &format!("logs-{name}-{date}"), "event {id}");
    }
    assert_eq!(route_events(&metrics, "indices", "matched"), EVENTS);
    println!(
        "templates: 3 topics, 6 directories, {} indices; dead-lettered: {} for a missing field, {} for a topic that does not exist, {} over max_destinations",
        indices.values().collect::<HashSet<_>>().len(),
        missing.len(),
        bad.len(),
        over.len()
    );
}
