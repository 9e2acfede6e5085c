//! The Loki sink against a real server on loopback: VictoriaLogs (built from its Go module by
//! scripts/install-victorialogs.sh), which takes Loki's push API. Loki itself is AGPL-licensed
//! and not used here; VictoriaLogs stores what the push names as the stream (the labels), the
//! line and the structured metadata, and answers queries by stream.
//!
//! On Apache Kafka (this binary's shared broker): events of three services at three levels, a
//! route pushing them with labels `level`, `service` and `topic`, `trace_id` as structured
//! metadata, a tenant. The first half goes with the server up; the second half meets it down
//! for 3 s (it comes back on the same port and data). Every event is then found by its labels,
//! in each key's order when sorted by time, with its metadata, under its tenant only; commits
//! reach the end, and the outage shows as retries.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TENANT: &str = "7";
const SERVICES: [&str; 3] = ["cart", "auth", "pay"];
const LEVELS: [&str; 3] = ["error", "warning", "info"];

/// The VictoriaLogs binary: `LOGBRIDGE_VICTORIALOGS`, or what the install script prints.
fn victorialogs_binary() -> PathBuf {
    installed_tool("LOGBRIDGE_VICTORIALOGS", "install-victorialogs.sh")
}

/// A VictoriaLogs process on loopback, stopped (SIGTERM, which flushes what it took) when
/// dropped.
struct VictoriaLogs {
    child: Option<Child>,
    address: SocketAddr,
}

impl VictoriaLogs {
    /// Starts it on `listen` (`127.0.0.1:0` for a port it picks) with its data in `data`.
    async fn start(binary: &Path, data: &Path, listen: &str, log: &Path) -> VictoriaLogs {
        let child = Command::new(binary)
            .arg(format!("-storageDataPath={}", data.display()))
            .arg(format!("-httpListenAddr={listen}"))
            // The line stays as logbridge sent it (`_msg`), not split into fields.
            .arg("-loki.disableMessageParsing")
            .arg("-retentionPeriod=100y")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("start victoria-logs");
        // Its line `started server at http://127.0.0.1:37931/`.
        let address = || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .find_map(|line| {
                    let at = line.split("started server at http://").nth(1)?;
                    at.trim().trim_end_matches('/').parse().ok()
                })
        };
        let started = wait_for(Duration::from_secs(30), || {
            std::future::ready(address().is_some())
        })
        .await;
        assert!(
            started,
            "VictoriaLogs did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        VictoriaLogs {
            child: Some(child),
            address: address().expect("started"),
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: it flushes what it took before it exits.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// The entries of `tenant` a LogsQL query finds (one JSON object each).
    async fn query(&self, tenant: &str, logsql: &str) -> Vec<serde_json::Value> {
        let answer = reqwest::Client::new()
            .get(format!("http://{}/select/logsql/query", self.address))
            .query(&[("query", logsql)])
            .header("AccountID", tenant)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let Ok(answer) = answer else {
            return Vec::new();
        };
        let text = answer.text().await.unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for VictoriaLogs {
    fn drop(&mut self) {
        self.stop();
    }
}

fn event(id: u64, seq: u64) -> serde_json::Value {
    serde_json::json!({
        "level": LEVELS[(id % 3) as usize],
        "message": format!("event {id}"),
        "service": SERVICES[(id / 3 % 3) as usize],
        "id": id,
        "seq": seq,
        "trace_id": format!("trace-{id}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_found_by_its_labels_in_order_after_the_server_was_down() {
    let _serial = serial().await;
    const EVENTS: u64 = 3_000;
    const KEYS: u64 = 12;
    let binary = victorialogs_binary();
    let work = tempfile::tempdir().expect("workdir");
    let data = work.path().join("data");
    let mut server =
        VictoriaLogs::start(&binary, &data, "127.0.0.1:0", &work.path().join("vl-1.log")).await;
    let address = server.address;

    let source = Kafka::shared("loki", 4).await;
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let records: Vec<(Option<String>, Vec<u8>)> = (0..EVENTS)
        .map(|id| {
            let key = id % KEYS;
            let seq = seqs.entry(key).or_default();
            *seq += 1;
            (
                Some(format!("key-{key}")),
                event(id, *seq).to_string().into_bytes(),
            )
        })
        .collect();
    let (first, second) = records.split_at(records.len() / 2);
    source.produce(first).await;

    let routes = format!(
        "[[routes]]\nname = \"logs\"\ndefault = true\nworkers = 3\nretry_backoff_ms = 100\n\
         sink = {{ type = \"loki\", url = \"http://{address}/insert\", tenant = \"{TENANT}\", \
         max_records = 50, compression = \"gzip\", metadata = [\"trace_id\"], \
         labels = {{ level = \"{{level}}\", service = \"{{service}}\", topic = \"{{@topic}}\" }} }}\n"
    );
    let group = unique("loki");
    // The first half with the server up.
    let (committed, _) = source
        .run_until_committed(
            &group,
            source.config(&group, "", &routes),
            Duration::from_secs(60),
        )
        .await;
    assert!(committed, "the first half committed");
    // The second half meets the server down; it comes back 3 s later on the same port and
    // data. The group goes on from its commits.
    server.stop();
    source.produce(second).await;
    let outage = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        server = VictoriaLogs::start(
            &binary,
            &data,
            &address.to_string(),
            &work.path().join("vl-2.log"),
        )
        .await;
    };
    let ((committed, metrics), ()) = tokio::join!(
        source.run_until_committed(
            &group,
            source.config(&group, "", &routes),
            Duration::from_secs(120)
        ),
        outage
    );
    assert!(committed, "commits reached the end");
    let retries = metrics.retries.with_label_values(&["logs"]).get();

    // Every event, by its labels: each (service, level) stream holds exactly its events.
    let topic = source.topic.clone();
    let mut found: BTreeMap<u64, usize> = BTreeMap::new();
    let mut duplicates = 0;
    for service in SERVICES {
        for level in LEVELS {
            let query = format!(
                "{{service=\"{service}\",level=\"{level}\",topic=\"{topic}\"}} | sort by (_time)"
            );
            let expected: Vec<u64> = (0..EVENTS)
                .filter(|id| event(*id, 0)["service"] == service && event(*id, 0)["level"] == level)
                .collect();
            // Searchable within a second or so of the push.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let entries = loop {
                let entries = server.query(TENANT, &query).await;
                if entries.len() >= expected.len() || std::time::Instant::now() > deadline {
                    break entries;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let mut last_seq: HashMap<u64, u64> = HashMap::new();
            for entry in &entries {
                let line: serde_json::Value =
                    serde_json::from_str(entry["_msg"].as_str().expect("_msg")).expect("JSON line");
                let id = line["id"].as_u64().expect("id");
                assert_eq!(line, event(id, line["seq"].as_u64().expect("seq")));
                assert_eq!(entry["trace_id"], format!("trace-{id}"), "metadata of {id}");
                let count = found.entry(id).or_default();
                *count += 1;
                if *count > 1 {
                    duplicates += 1;
                    continue;
                }
                // In time order, a key's events come in the order they were produced.
                let key = id % KEYS;
                let seq = line["seq"].as_u64().expect("seq");
                let previous = last_seq.insert(key, seq).unwrap_or(0);
                assert!(
                    seq > previous,
                    "{service}/{level}: key {key} seq {seq} after {previous}"
                );
            }
            let ids: Vec<u64> = entries
                .iter()
                .filter_map(|entry| {
                    let line: serde_json::Value =
                        serde_json::from_str(entry["_msg"].as_str()?).ok()?;
                    line["id"].as_u64()
                })
                .collect();
            if entries.is_empty() {
                let sample = server.query(TENANT, "* | limit 3").await;
                panic!("{query}: nothing; the tenant holds for example {sample:?}");
            }
            for id in &expected {
                assert!(ids.contains(id), "{service}/{level}: event {id} missing");
            }
        }
    }
    assert_eq!(found.len() as u64, EVENTS, "every event found");
    // Under another tenant there is nothing.
    let other = server.query("8", "*").await;
    assert!(other.is_empty(), "tenant 8 sees {} entries", other.len());
    println!(
        "loki: {EVENTS} events in 9 streams, {duplicates} pushed twice across the outage, {retries} retries"
    );
    assert!(retries > 0, "the outage was retried");
}
