//! Input formats and subscriptions end to end, on Apache Kafka (this binary's shared broker):
//!
//! - a pattern subscription (`topics = ["^<prefix>-.*"]`) in the `logbridge` binary: the topic
//!   that matches at start is read, a topic created while it runs is read too (found at the
//!   metadata refresh), a topic that does not match is not, `/status` lists what the pattern
//!   matches, and the group's commits, read by a separate client, reach both topics' ends;
//!   under the classic protocol (librdkafka matches) and KIP-848's (the broker matches);
//! - text lines (`format = "text"`, a level pattern and logfmt): records routed by their
//!   level (and one route by a logfmt field), the Kafka sink forwarding the original bytes, the
//!   file sink writing the event made of each line, lines that are not UTF-8, have no level or
//!   are empty dead-lettered with their reason, an unknown level left unrouted;
//! - `check-config --connect` listing the topics each pattern matches (exit 4 when one matches
//!   none); the README's input examples doing what it says.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::process::{Logbridge, HTTP_LISTEN};
use common::*;

/// `count` sample events with ids from `first`, keyed.
fn events(first: u64, count: u64) -> Vec<(Option<String>, Vec<u8>)> {
    (first..first + count)
        .map(|id| (Some(format!("key-{}", id % 7)), event(id, "info")))
        .collect()
}

/// The ids of the events in output lines, with the topic each line says it came from.
fn ids_by_topic(lines: &[serde_json::Value]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut found: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for line in lines {
        let topic = line["topic"].as_str().expect("a topic").to_string();
        let id = line["event"]["id"].as_u64().expect("an id");
        found.entry(topic).or_default().insert(id);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_while_running_is_read_through_the_pattern() {
    let _serial = serial().await;
    read_through_a_pattern("\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000\n")
        .await;
}

/// The same under KIP-848's consumer protocol, where the broker resolves the pattern (RE2/J,
/// whole names) and librdkafka's metadata refresh plays no part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_while_running_is_read_through_the_pattern_under_the_consumer_protocol() {
    let _serial = serial().await;
    read_through_a_pattern("\"group.protocol\" = \"consumer\"\n").await;
}

/// One topic matching at start, one created while the binary runs, one outside the pattern;
/// `protocol` is the group's `[kafka.options]` lines.
async fn read_through_a_pattern(protocol: &str) {
    const FIRST: u64 = 300;
    const LATER: u64 = 400;
    let broker = apache::shared();
    let brokers = broker.brokers();
    let prefix = unique("pattern");
    // At start: one topic that matches, one that only shares the prefix.
    let first = Kafka::external(&brokers, &format!("{prefix}-a"), 2).await;
    let outside = Kafka::external(&brokers, &format!("{prefix}_other"), 1).await;
    first.produce(&events(0, FIRST)).await;
    outside.produce(&events(10_000, 50)).await;

    let work = tempfile::tempdir().expect("workdir");
    let out = work.path().join("all.jsonl");
    let group = unique("pattern-group");
    let pattern = format!("^{prefix}-.*");
    let config = work.path().join("logbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ntopics = [\"{pattern}\"]\n\
             check_interval_ms = 500\n\
             [kafka.options]\n\"auto.offset.reset\" = \"earliest\"\n{protocol}\
             \"topic.metadata.refresh.interval.ms\" = 1000\n\
             [pipeline]\ncommit_interval_ms = 200\ndrain_timeout_ms = 3000\n\
             [http]\nlisten = \"{HTTP_LISTEN}\"\n\
             [[routes]]\nname = \"all\"\ndefault = true\nworkers = 2\n\
             sink = {{ type = \"file\", path = \"{}\" }}\n",
            out.display()
        ),
    )
    .expect("config");
    let mut child = Logbridge::start(&config, work.path().join("logbridge.log"));
    let address = child.address().await;

    let first_read = wait_for(Duration::from_secs(90), || {
        let out = out.clone();
        async move { read_lines(&[out]).len() as u64 >= FIRST }
    })
    .await;
    assert!(
        first_read,
        "the topic matching at start was read:\n{}",
        child.log_text()
    );
    // `/status` lists what the pattern matches (the cluster check runs every 500 ms).
    let status = |address| async move {
        let (code, body) = http_get(address, "/status").await;
        assert_eq!(code, 200, "{body}");
        parse_json("/status", &body)
    };
    let listed = |status: &serde_json::Value| -> Vec<String> {
        json_array(status, "/topics")
            .iter()
            .filter(|entry| entry["entry"] == pattern.as_str())
            .flat_map(|entry| {
                entry["topics"]
                    .as_object()
                    .map(|topics| topics.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    };
    let seen_first = wait_for(Duration::from_secs(20), || async {
        listed(&status(address).await) == [format!("{prefix}-a")]
    })
    .await;
    assert!(
        seen_first,
        "/status lists the matching topic: {}",
        status(address).await["topics"]
    );

    // A topic created now, while logbridge runs, that the pattern matches.
    let later = Kafka::external(&brokers, &format!("{prefix}-b"), 3).await;
    later.produce(&events(FIRST, LATER)).await;
    let all_read = wait_for(Duration::from_secs(90), || {
        let out = out.clone();
        async move { read_lines(&[out]).len() as u64 >= FIRST + LATER }
    })
    .await;
    assert!(
        all_read,
        "the topic created while running was read ({} lines):\n{}",
        read_lines(std::slice::from_ref(&out)).len(),
        child.log_text()
    );
    let committed = later
        .wait_committed_to(&group, &later.end_offsets(), Duration::from_secs(60))
        .await
        && first
            .wait_committed_to(&group, &first.end_offsets(), Duration::from_secs(60))
            .await;
    assert!(
        committed,
        "commits reached both topics' ends: {:?} {:?}",
        first.committed(&group),
        later.committed(&group)
    );
    let mut both = vec![format!("{prefix}-a"), format!("{prefix}-b")];
    both.sort();
    let seen_both = wait_for(Duration::from_secs(20), || async {
        listed(&status(address).await) == both
    })
    .await;
    assert!(seen_both, "/status lists both topics");
    let (ready, body) = http_get(address, "/readyz").await;
    assert_eq!(ready, 200, "{body}");

    let (status, _) = child.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|status| status.success()),
        "clean stop: {status:?}"
    );
    let lines = read_lines(&[out]);
    assert_eq!(lines.len() as u64, FIRST + LATER, "each event once");
    let found = ids_by_topic(&lines);
    assert_eq!(
        found.keys().cloned().collect::<Vec<_>>(),
        both,
        "nothing from `{prefix}_other`"
    );
    assert_eq!(found[&format!("{prefix}-a")], (0..FIRST).collect());
    assert_eq!(
        found[&format!("{prefix}-b")],
        (FIRST..FIRST + LATER).collect()
    );
    assert_eq!(
        outside.committed(&group),
        vec![-1],
        "the group never read the topic outside the pattern"
    );
}

/// `check-config --connect` lists what each pattern matches, and a pattern that matches nothing
/// fails the check as a missing topic does (exit 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_lists_what_each_pattern_matches() {
    let _serial = serial().await;
    let brokers = apache::shared().brokers();
    let prefix = unique("listed");
    Kafka::external(&brokers, &format!("{prefix}-a"), 2).await;
    Kafka::external(&brokers, &format!("{prefix}-b"), 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |topics: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"g\"\ntopics = {topics}\n\
                 [[routes]]\nname = \"all\"\ndefault = true\nsink = {{ type = \"null\" }}\n"
            ),
        )
        .expect("write");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_logbridge"))
            .args(["check-config", "--connect", "--timeout", "10", "--config"])
            .arg(&path)
            .output()
            .expect("run logbridge");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(&format!("[\"^{prefix}-.*\"]"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "`kafka.topics[0]`: pattern `^{prefix}-.*` matches 2 topics (partitions): `{prefix}-a` (2), `{prefix}-b` (1)"
        )),
        "{stderr}"
    );
    let (code, stderr) = check(&format!("[\"{prefix}-a\", \"^{prefix}-none-.*\"]"));
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "`kafka.topics[1]`: pattern `^{prefix}-none-.*` matches no topic at {brokers} yet"
        )),
        "{stderr}"
    );
    // A pattern librdkafka and the broker would read differently is refused at load (exit 2),
    // naming the entry.
    let (code, stderr) = check(r#"["logs", "^logs-\\d+"]"#);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`kafka.topics[1]`"), "{stderr}");
}

/// The level of line `id`, as written, and where it must go.
fn level_of(id: u64) -> (&'static str, &'static str) {
    match id % 5 {
        0 => ("ERROR", "errors"),
        1 => ("WARN", "warnings"),
        2 => ("INFO", "info"),
        3 => ("DEBUG", "info"),
        // A logger's own name for info.
        _ => ("NOTICE", "info"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_are_routed_by_their_level() {
    const LINES: u64 = 500;
    let _serial = serial().await;
    let source = Kafka::shared("text", 3).await;
    let dead = unique("text-dlq");
    let forwarded = unique("text-warnings");
    source.create_external_topic(&dead, 1).await;
    source.create_external_topic(&forwarded, 1).await;

    let mut records: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut expected: HashMap<&str, BTreeSet<u64>> = HashMap::new();
    let mut warnings: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for id in 0..LINES {
        let (level, mut route) = level_of(id);
        // Every 7th line is slow: the `slow` route takes those at level info by their logfmt
        // field (debug ones stay with `info`).
        let ms = if id % 7 == 0 { 900 } else { 12 };
        if matches!(level, "INFO" | "NOTICE") && ms >= 500 {
            route = "slow";
        }
        let ending = if id % 2 == 0 { "\n" } else { "" };
        let line = format!(
            "2026-11-27T10:00:{:02}Z {level} [api] request done id={id} ms={ms} user=\"u {id}\"{ending}",
            id % 60
        );
        if route == "warnings" {
            warnings.insert(id, line.clone().into_bytes());
        }
        expected.entry(route).or_default().insert(id);
        records.push((Some(format!("key-{}", id % 11)), line.into_bytes()));
    }
    // Lines that are no events, and one at a level no route takes.
    let bad: [(&[u8], &str); 3] = [
        (
            b"2026-11-27T10:00:00Z ERROR [api] caf\xe9 id=9001",
            "not_utf8",
        ),
        (b"a line without a level id=9002", "missing_field"),
        (b"\n", "empty"),
    ];
    for (payload, _) in bad {
        records.push((Some("bad".to_string()), payload.to_vec()));
    }
    records.push((
        Some("audit".to_string()),
        b"2026-11-27T10:00:00Z AUDIT [api] login id=9100".to_vec(),
    ));
    let placed = source.produce(&records).await;

    let dir = tempfile::tempdir().expect("out dir");
    let file = |route: &str| dir.path().join(format!("{route}.jsonl"));
    let routes = format!(
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nsink = {{ type = \"file\", path = \"{errors}\" }}\n\
         [[routes]]\nname = \"warnings\"\nlevels = [\"warning\"]\nworkers = 2\nsink = {{ type = \"kafka\", topic = \"{forwarded}\" }}\n\
         [[routes]]\nname = \"slow\"\nlevels = [\"info\"]\nwhen = {{ field = \"ms\", gte = 500 }}\nsink = {{ type = \"file\", path = \"{slow}\" }}\n\
         [[routes]]\nname = \"info\"\nlevels = [\"info\", \"debug\"]\nworkers = 2\nsink = {{ type = \"file\", path = \"{info}\" }}\n\
         [dead_letter]\ntopic = \"{dead}\"\n\
         [input]\nformat = \"text\"\nlevel_pattern = '^\\S+ (?P<level>[A-Z]+) \\[(?P<service>[a-z]+)\\] '\nlogfmt = true\n",
        errors = file("errors").display(),
        slow = file("slow").display(),
        info = file("info").display(),
    );
    let group = unique("text-group");
    let config = source.config(&group, "", &routes);
    let (committed, metrics) = source
        .run_until_committed(&group, config, Duration::from_secs(90))
        .await;
    assert!(
        committed,
        "commits reached the end: {:?}",
        source.committed(&group)
    );

    // Each file route got exactly its lines, each written as the event made of it.
    for route in ["errors", "slow", "info"] {
        let lines = read_lines(&[file(route)]);
        let mut ids = BTreeSet::new();
        for line in &lines {
            let event = &line["event"];
            let id: u64 = event["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("a logfmt id in {line}"));
            assert!(ids.insert(id), "{route}: id {id} twice");
            let (written, _) = level_of(id);
            let message = event["message"].as_str().expect("the line as the message");
            assert!(
                message.starts_with("2026-11-27T")
                    && message.contains(&format!(" {written} [api] ")),
                "{route}: {message}"
            );
            assert!(
                !message.ends_with('\n'),
                "the line ending is not the message's"
            );
            assert_eq!(event["service"], "api", "the pattern's group");
            assert_eq!(event["user"], format!("u {id}"), "a quoted logfmt value");
            assert_eq!(line["route"], route);
        }
        assert_eq!(ids, expected[route], "{route}");
    }
    // The Kafka sink forwarded the original bytes, line ending and all.
    let out = source.read_all(&forwarded);
    let sent: BTreeMap<u64, Vec<u8>> = out
        .iter()
        .map(|record| {
            let payload = record.payload.clone().expect("a value");
            let text = String::from_utf8_lossy(&payload).into_owned();
            let id = text
                .split_whitespace()
                .find_map(|pair| pair.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("an id in {text:?}"));
            (id, payload)
        })
        .collect();
    assert_eq!(out.len(), warnings.len(), "each warning once");
    assert_eq!(sent, warnings);
    // What is no event is dead-lettered with its reason, the original bytes kept.
    let letters = source.read_all(&dead);
    assert_eq!(letters.len(), bad.len(), "one letter per bad line");
    let bad_places: HashMap<(i32, i64), (&[u8], &str)> = placed[LINES as usize..]
        .iter()
        .zip(bad)
        .map(|(place, bad)| (*place, bad))
        .collect();
    for letter in &letters {
        let place = letter.source();
        let (payload, reason) = bad_places
            .get(&place)
            .unwrap_or_else(|| panic!("a letter for {place:?}, which was no bad line"));
        assert_eq!(
            letter.header("logbridge.error.reason").as_deref(),
            Some(*reason)
        );
        assert_eq!(letter.payload.as_deref(), Some(*payload));
    }
    // The unknown level is a level of its own, which no route takes: ignored, not failed.
    let finished = |status: &str| -> u64 {
        ["errors", "warnings", "slow", "info", "none"]
            .iter()
            .map(|route| metrics.finished.with_label_values(&[route, status]).get())
            .sum()
    };
    assert_eq!(finished("ignored"), 1, "the AUDIT line");
    assert_eq!(finished("dead_lettered"), bad.len() as u64);
    assert_eq!(finished("processed"), LINES);
}

/// The README's input examples work as it says: each `[input]` block loads, and the text
/// format's example line is an error of `checkout` whose `status` a `when` reads.
#[test]
fn the_readme_input_examples_do_what_it_says() {
    let readme = std::fs::read_to_string("README.md").expect("README.md");
    let section = readme
        .split_once("## Event format")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or_default())
        .expect("an event format section");
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(toml, _)| toml))
        .collect();
    assert_eq!(blocks.len(), 4, "auto, text, otlp_proto, schema registry");
    let load = |input: &str| {
        let text = format!(
            "[kafka]\nbrokers = \"localhost:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n\
             [[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nwhen = {{ field = \"status\", gte = 500 }}\n\
             sink = {{ type = \"null\" }}\n{input}"
        );
        logbridge::Config::from_toml_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"))
    };
    let auto = load(blocks[0]);
    let decoder = auto.input.decoder().expect("a decoder");
    assert_eq!(
        decoder
            .decode_level(Some(br#"{"severity":"W","msg":"x"}"#), usize::MAX)
            .map(|level| level.to_string()),
        Ok("warning".to_string())
    );
    let text = load(blocks[1]);
    let line = section
        .split('`')
        .find(|quoted| quoted.starts_with("2026-11-27T10:00:00Z ERROR"))
        .expect("the example line");
    let decoded = text
        .input
        .decoder()
        .expect("a decoder")
        .decode(Some(line.as_bytes()), usize::MAX, true)
        .expect("the line decodes");
    assert_eq!(decoded.level.as_str(), "error");
    assert_eq!(decoded.service.as_deref(), Some("checkout"));
    let event = decoded
        .form
        .event(line.as_bytes(), &decoded.level)
        .expect("an event");
    assert_eq!(event["status"], "503");
    assert_eq!(event["message"], line);
    let when = text.routes[0].when.as_ref().expect("a condition");
    let condition = logbridge::shape::Condition::compile(when, "when").expect("compiles");
    assert!(condition.holds(&event), "{event}");

    // otlp_proto: a request of two log records is two events, the resource's service theirs.
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use prost::Message as _;
    let otlp = load(blocks[2]);
    let log = |number: i32, status: i64| LogRecord {
        severity_number: number,
        attributes: vec![KeyValue {
            key: "status".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(status)),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("checkout".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                log_records: vec![log(17, 503), log(9, 200)],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    let parts = otlp
        .input
        .decoder()
        .expect("a decoder")
        .split(Some(&request), usize::MAX)
        .expect("otlp_proto splits")
        .expect("a request");
    let events: Vec<(String, serde_json::Value)> = parts
        .iter()
        .map(|part| {
            let (level, service) = part.decoded.clone().expect("an event");
            assert_eq!(service.as_deref(), Some("checkout"));
            let event = serde_json::from_slice(&part.payload).expect("JSON");
            (level.to_string(), event)
        })
        .collect();
    assert_eq!(events[0].0, "error");
    assert_eq!(events[1].0, "info");
    assert!(condition.holds(&events[0].1), "{}", events[0].1);
    assert!(!condition.holds(&events[1].1), "{}", events[1].1);

    // The schema registry: an Avro record reads as the JSON it stands for, its level and a
    // field a `when` reads included.
    let registry = load(&blocks[3].replace("${env:SR_PASSWORD}", "pw"));
    let section = registry.input.schema_registry.as_ref().expect("a registry");
    assert_eq!(section.url, "http://schema-registry:8081");
    logbridge::schema_registry::SchemaRegistry::new(section).expect("a client");
    let text = r#"{"type":"record","name":"Log","fields":[{"name":"level","type":"string"},
        {"name":"status","type":"int"}]}"#;
    let schema = apache_avro::Schema::parse_str(text).expect("schema");
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .expect("writer")
        .write_value_to_vec(apache_avro::types::Value::Record(vec![
            (
                "level".into(),
                apache_avro::types::Value::String("ERROR".into()),
            ),
            ("status".into(), apache_avro::types::Value::Int(503)),
        ]))
        .expect("datum");
    let json = logbridge::schema_registry::Schema::parse("AVRO", text, Vec::new())
        .expect("parses")
        .json(1, &body)
        .expect("not JSON Schema")
        .expect("reads");
    let decoded = registry
        .input
        .decoder()
        .expect("a decoder")
        .decode(Some(&json), usize::MAX, true)
        .expect("an event");
    assert_eq!(decoded.level.as_str(), "error");
    let event: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    assert!(condition.holds(&event), "{event}");
}
