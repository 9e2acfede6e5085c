//! The bad-input corpus (tests/data/corpus, made by tests/data/make_corpus.py) through the whole
//! pipeline against a broker, with Kafka sinks and a dead-letter topic. Each case's expected
//! outcome is checked by reading the output and dead-letter topics with a separate consumer,
//! headers included; every offset is committed; nothing panics.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use logbridge::event::{decode, DecodeError, DEFAULT_MAX_PAYLOAD_BYTES};
use logbridge::metrics::Metrics;

struct Case {
    file: String,
    payload: Option<Vec<u8>>,
    expected: String,
}

fn corpus() -> Vec<Case> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus");
    let index = std::fs::read_to_string(dir.join("cases.tsv")).expect("cases.tsv");
    index
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (file, expected) = line.split_once('\t').expect("file<TAB>expected");
            let payload = if file.ends_with(".null") {
                None
            } else {
                Some(std::fs::read(dir.join(file)).expect("case file"))
            };
            Case {
                file: file.to_string(),
                payload,
                expected: expected.to_string(),
            }
        })
        .collect()
}

const ROUTES: &[(&str, &[&str])] = &[
    ("errors", &["error", "fatal"]),
    ("warnings", &["warning"]),
    ("other", &["info", "debug", "notice"]),
];

/// Sink-stage reasons: the record decodes, and its delivery fails.
const SINK_REASONS: &[&str] = &["record_too_large"];

#[test]
fn corpus_has_over_100_cases_and_the_decoder_agrees_with_every_expectation() {
    let cases = corpus();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    for case in &cases {
        let decoded = decode(case.payload.as_deref(), DEFAULT_MAX_PAYLOAD_BYTES);
        match (case.expected.split_once(':'), &decoded) {
            (Some(("dlq", reason)), Err(err)) => {
                assert_eq!(err.reason(), reason, "{}: {err}", case.file)
            }
            (Some(("dlq", reason)), Ok(_)) => assert!(
                SINK_REASONS.contains(&reason),
                "{}: decoded but expected to fail with {reason}",
                case.file
            ),
            (Some(("route", route)), Ok(event)) => {
                let (name, _) = ROUTES
                    .iter()
                    .find(|(_, levels)| levels.contains(&event.level.as_str()))
                    .unwrap_or_else(|| panic!("{}: level {} has no route", case.file, event.level));
                assert_eq!(name, &route, "{}", case.file);
            }
            // A null value is no event; the pipeline skips it (`input.tombstones = "skip"`).
            (Some(("skipped", "tombstone")), Err(DecodeError::Empty)) => {
                assert!(case.payload.is_none(), "{}: only a null value", case.file)
            }
            (None, Ok(event)) if case.expected == "ignored" => assert!(
                ROUTES
                    .iter()
                    .all(|(_, levels)| !levels.contains(&event.level.as_str())),
                "{}",
                case.file
            ),
            _ => panic!(
                "{}: expected {}, decoded {decoded:?}",
                case.file, case.expected
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_through_the_pipeline_reaches_the_expected_topic_with_headers() {
    let _serial = serial().await;
    let cases = corpus();
    let kafka = Kafka::start("corpus", 4);
    for (route, _) in ROUTES {
        kafka.create_topic(&format!("out-{route}"), 2);
    }
    kafka.create_topic("corpus.dlq", 2);

    let records: Vec<(Option<String>, Vec<u8>)> = cases
        .iter()
        .filter_map(|case| Some((Some(case.file.clone()), case.payload.clone()?)))
        .collect();
    // Tombstones need a null value, which `produce` cannot express: send them separately.
    let mut placed: HashMap<String, (i32, i64)> = HashMap::new();
    for ((key, _), place) in records.iter().zip(kafka.produce_large(&records).await) {
        placed.insert(key.clone().expect("key"), place);
    }
    for case in cases.iter().filter(|case| case.payload.is_none()) {
        placed.insert(case.file.clone(), kafka.produce_tombstone(&case.file).await);
    }
    let end = kafka.end_offsets();

    let routes: String = ROUTES
        .iter()
        .map(|(name, levels)| {
            format!(
                "[[routes]]\nname = \"{name}\"\nlevels = {levels:?}\nworkers = 2\nmax_retries = 2\nretry_backoff_ms = 50\nsink = {{ type = \"kafka\", topic = \"out-{name}\" }}\n"
            )
        })
        .collect();
    let group = unique("corpus");
    let config = kafka.config(
        &group,
        "",
        &format!("{routes}\n[dead_letter]\ntopic = \"corpus.dlq\"\n[breaker]\nenabled = false\n"),
    );
    let metrics = Arc::new(Metrics::new());
    let pipeline = Running::without_http(config, &metrics);
    let total: i64 = end.iter().sum();
    let done = wait_committed(&metrics, total, Duration::from_secs(120)).await;
    pipeline.stop().await;
    assert!(done, "commits did not reach the end");
    assert_eq!(
        kafka.committed(&group),
        end,
        "committed = end on every partition"
    );

    // Read everything back with a separate consumer, keyed by case file name.
    let mut found: HashMap<String, Vec<(String, ReadRecord)>> = HashMap::new();
    for topic in ["out-errors", "out-warnings", "out-other", "corpus.dlq"] {
        for record in kafka.read_all(topic) {
            let key = String::from_utf8(record.key.clone().expect("key kept")).expect("utf-8 key");
            found
                .entry(key)
                .or_default()
                .push((topic.to_string(), record));
        }
    }
    let mut checked = HashMap::<&str, usize>::new();
    for case in &cases {
        let (partition, offset) = placed[&case.file];
        let copies = found.get(&case.file).cloned().unwrap_or_default();
        *checked
            .entry(case.expected.split(':').next().unwrap_or("?"))
            .or_default() += 1;
        if case.expected == "ignored" || case.expected.starts_with("skipped:") {
            assert!(
                copies.is_empty(),
                "{}: ignored or skipped, but found in {:?}",
                case.file,
                copies.iter().map(|c| &c.0).collect::<Vec<_>>()
            );
            continue;
        }
        assert!(
            !copies.is_empty(),
            "{}: expected {}, found nowhere",
            case.file,
            case.expected
        );
        for (topic, record) in &copies {
            assert_eq!(
                record.header("logbridge.source.topic").as_deref(),
                Some("corpus"),
                "{}",
                case.file
            );
            assert_eq!(
                record.header("logbridge.source.partition"),
                Some(partition.to_string()),
                "{}",
                case.file
            );
            assert_eq!(
                record.header("logbridge.source.offset"),
                Some(offset.to_string()),
                "{}",
                case.file
            );
            match case.expected.split_once(':') {
                Some(("route", route)) => {
                    assert_eq!(topic, &format!("out-{route}"), "{}", case.file);
                    assert_eq!(
                        record.header("logbridge.route").as_deref(),
                        Some(route),
                        "{}",
                        case.file
                    );
                    assert_eq!(
                        record.payload, case.payload,
                        "{}: payload forwarded unchanged",
                        case.file
                    );
                }
                Some(("dlq", reason)) => {
                    assert_eq!(topic, "corpus.dlq", "{}", case.file);
                    assert_eq!(
                        record.header("logbridge.error.reason").as_deref(),
                        Some(reason),
                        "{}",
                        case.file
                    );
                    let stage = if SINK_REASONS.contains(&reason) {
                        "sink"
                    } else {
                        "decode"
                    };
                    assert_eq!(
                        record.header("logbridge.error.stage").as_deref(),
                        Some(stage),
                        "{}",
                        case.file
                    );
                    assert!(
                        record
                            .header("logbridge.error.message")
                            .is_some_and(|m| !m.is_empty()),
                        "{}",
                        case.file
                    );
                    assert!(record.header("logbridge.route").is_some(), "{}", case.file);
                    // Decode failures are never delivered (0 attempts); a permanent sink
                    // failure (record_too_large) is not retried: one attempt, though the
                    // route allows 2 retries.
                    let attempts = if stage == "sink" { "1" } else { "0" };
                    assert_eq!(
                        record.header("logbridge.attempts").as_deref(),
                        Some(attempts),
                        "{}: attempts",
                        case.file
                    );
                    if record.header("logbridge.error.value_dropped").is_none() {
                        assert_eq!(
                            record.payload, case.payload,
                            "{}: original value kept",
                            case.file
                        );
                    }
                }
                _ => panic!("{}: bad expectation {}", case.file, case.expected),
            }
        }
    }
    let big = found
        .iter()
        .find(|(file, _)| file.contains("big-under-decode-limit"))
        .map(|(_, copies)| copies[0].1.clone())
        .expect("the 1 MiB record is dead-lettered");
    assert!(
        big.header("logbridge.error.value_dropped").is_some() && big.payload.is_none(),
        "a value the dead-letter topic refuses is parked without it, its size in a header"
    );
    let reasons: std::collections::BTreeSet<&str> = cases
        .iter()
        .filter_map(|case| case.expected.strip_prefix("dlq:"))
        .collect();
    let dead: u64 = reasons
        .iter()
        .map(|reason| {
            ["decode", "sink"]
                .iter()
                .map(|stage| {
                    metrics
                        .dead_letters
                        .with_label_values(&[stage, reason])
                        .get()
                })
                .sum::<u64>()
        })
        .sum();
    assert_eq!(
        dead, checked["dlq"] as u64,
        "logbridge_dead_letters_total counts each one"
    );
    println!(
        "corpus: {} cases through the pipeline, outcomes {checked:?}, dead letters counted {dead}",
        cases.len()
    );
}
