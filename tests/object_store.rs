//! The object-store sink against a real S3 server on loopback: moto's server (PyPI, installed by
//! scripts/install-moto.sh; MinIO is AGPL-licensed and not used here), read back with boto3, the
//! store's standard client, and `zcat | jq`.
//!
//! On Apache Kafka (this binary's shared broker), events produced at a steady pace to four
//! partitions, archived by two `logbridge` processes of one group: one runs throughout, the
//! other is killed with SIGKILL five times mid-stream and restarted (so partitions move between
//! them at each kill and restart: revokes, and replays of what the killed one stored and did not
//! commit). The in-flight bound is small (256 KiB, about 1 300 events), so objects are also
//! closed by it. During one of the runs the store stops answering for 10 s (the server process
//! is stopped with SIGSTOP, so requests hang and time out, then it goes on with its data).
//! Afterwards: every valid event in exactly one object, the objects of a partition hold disjoint
//! offset ranges, commits held while the store was away and at the end offsets after.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::Logbridge;
use common::stream::{test_rng, Stream};
use common::*;
use rand::Rng;

const BUCKET: &str = "archive";

/// The virtualenv with `moto_server` and boto3: `LOGBRIDGE_MOTO`, or what the install script
/// prints.
fn moto_bin() -> PathBuf {
    installed_tool("LOGBRIDGE_MOTO", "install-moto.sh")
}

/// A moto S3 server on a loopback port, killed when dropped.
struct Moto {
    child: Child,
    bin: PathBuf,
    endpoint: String,
}

impl Moto {
    async fn start(log: &Path) -> Moto {
        let bin = moto_bin();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("moto log"))
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let up = wait_for(Duration::from_secs(30), || {
            let request = client.get(format!("{endpoint}/")).send();
            async move { request.await.is_ok() }
        })
        .await;
        assert!(
            up,
            "moto did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        let moto = Moto {
            child,
            bin,
            endpoint,
        };
        moto.python(&format!("s3.create_bucket(Bucket={BUCKET:?})"));
        moto
    }

    /// Runs `code` with `s3`, a boto3 client of this server, in scope; its standard output.
    fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\n\
             s3 = boto3.client('s3', endpoint_url={:?}, aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let output = Command::new(self.bin.join("python"))
            .args(["-c", &script])
            .output()
            .expect("run python");
        assert!(
            output.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Downloads every object of the bucket into `dir` (keys as paths); the keys.
    fn download(&self, dir: &Path) -> Vec<String> {
        let listing = self.python(&format!(
            "import os\n\
             pages = s3.get_paginator('list_objects_v2').paginate(Bucket={BUCKET:?})\n\
             for page in pages:\n\
             \x20   for item in page.get('Contents', []):\n\
             \x20       path = os.path.join({dir:?}, item['Key'])\n\
             \x20       os.makedirs(os.path.dirname(path), exist_ok=True)\n\
             \x20       s3.download_file({BUCKET:?}, item['Key'], path)\n\
             \x20       print(item['Key'])",
            dir = dir.display().to_string()
        ));
        listing.lines().map(str::to_string).collect()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a gzip NDJSON object as `zcat | jq -c .` prints them: a standard tool must read
/// every object.
fn read_object(path: &Path) -> Vec<serde_json::Value> {
    let output = Command::new("sh")
        .arg("-c")
        .arg("zcat \"$1\" | jq -c .")
        .arg("sh")
        .arg(path)
        .output()
        .expect("zcat | jq");
    assert!(
        output.status.success(),
        "zcat | jq failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("jq prints JSON"))
        .collect()
}

/// Partition, first and last offset of an object key `.../<topic>+<p>+<first>+<last>.ndjson.gz`.
fn offsets_of(key: &str) -> (i32, i64, i64) {
    let name = key.rsplit('/').next().expect("a name");
    let parts: Vec<&str> = name.trim_end_matches(".ndjson.gz").split('+').collect();
    assert_eq!(parts.len(), 4, "object name {name}");
    (
        parts[1].parse().expect("partition"),
        parts[2].parse().expect("first offset"),
        parts[3].parse().expect("last offset"),
    )
}

fn write_config(path: &Path, kafka: &Kafka, group: &str, endpoint: &str) {
    let section = kafka_section(
        &kafka.brokers,
        group,
        &kafka.topic,
        &client_defaults(&[("heartbeat.interval.ms", "1000")], ""),
    );
    let text = format!(
        r#"{section}
[pipeline]
commit_interval_ms = 200
drain_timeout_ms = 3000
max_in_flight_bytes = 262144
[http]
listen = "127.0.0.1:0"
[[routes]]
name = "archive"
default = true
workers = 2
[routes.sink]
type = "object_store"
url = "s3://{BUCKET}/logs"
max_records = 700
idle_flush_ms = 1500
[routes.sink.options]
endpoint = "{endpoint}"
allow_http = true
region = "us-east-1"
access_key_id = "test"
secret_access_key = "${{env:TEST_S3_SECRET}}"
timeout = "2s"
"#
    );
    std::fs::write(path, text).expect("write config");
}

fn start(config: &Path, log: PathBuf) -> Logbridge {
    Logbridge::start_with_env(config, log, &[("TEST_S3_SECRET", "test")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_in_exactly_one_object_after_sigkills_rebalances_backpressure_and_an_outage()
{
    let _serial = serial().await;
    const KILLS: usize = 5;
    let work = tempfile::tempdir().expect("workdir");
    let moto = Moto::start(&work.path().join("moto.log")).await;
    let kafka = Kafka::shared("objects", 4).await;
    let mut rng = test_rng("object store sigkills");
    // 1 600 events a second, at most 110 000 (about 70 s of producing: the five runs, the
    // outage and the joins take about 50 s, so every run is killed mid-stream).
    let stream = Stream::start(&kafka, 1_600, 110_000, 500, 0.01, rng.random());
    let group = unique("objects");
    let config = work.path().join("logbridge.toml");
    write_config(&config, &kafka, &group, &moto.endpoint);
    let log = work.path().join("logbridge.log");
    let mut steady = start(&config, work.path().join("steady.log"));
    assert!(
        steady.wait_consuming(Duration::from_secs(60)).await,
        "the steady instance consumes: {}",
        steady.log_text()
    );

    let mut outage_shown = false;
    for kill in 0..KILLS {
        let mut child = start(&config, log.clone());
        assert!(
            child.wait_consuming(Duration::from_secs(60)).await,
            "run {kill} consumes: {}",
            child.log_text()
        );
        if kill == 2 {
            // The store away for 10 s: commits stay where they are, uploads fail and are retried.
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
            moto.signal("-STOP");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let held_at = kafka.committed_records(&group);
            tokio::time::sleep(Duration::from_secs(8)).await;
            let after = kafka.committed_records(&group);
            let failures = child
                .metric("logbridge_object_store_failures_total")
                .await
                .unwrap_or(0.0);
            moto.signal("-CONT");
            println!(
                "store away 10 s: committed {held_at} after 2 s and {after} after 10 s, \
                 {failures} failed requests"
            );
            assert_eq!(held_at, after, "commits held while the store is away");
            assert!(failures >= 1.0, "the outage shows as failed requests");
            outage_shown = true;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        println!(
            "SIGKILL {}: produced {}, committed {}",
            kill + 1,
            stream.produced(),
            kafka.committed_records(&group)
        );
        child.kill();
    }
    assert!(outage_shown);
    let produced = stream.until_cap().await;
    let mut last = start(&config, log.clone());
    let ends = kafka.end_offsets();
    let done = wait_for(Duration::from_secs(120), || {
        std::future::ready(kafka.committed(&group) == ends)
    })
    .await;
    let mut page = last.metrics_page().await.unwrap_or_default();
    page.push_str(&steady.metrics_page().await.unwrap_or_default());
    let counted: Vec<&str> = page
        .lines()
        .filter(|line| line.starts_with("logbridge_object_store_"))
        .collect();
    let (status, _) = last.terminate(Duration::from_secs(20));
    let (steady_status, _) = steady.terminate(Duration::from_secs(20));
    assert!(
        steady_status.is_some_and(|s| s.success()),
        "the steady instance stops cleanly"
    );
    assert!(
        done,
        "commits reach the end offsets {ends:?}: {:?}\n{}",
        kafka.committed(&group),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the last run stops cleanly"
    );

    let objects = work.path().join("objects");
    let keys = moto.download(&objects);
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut ranges: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
    for key in &keys {
        assert!(
            key.starts_with(&format!("logs/{}/dt=", kafka.topic)) && key.contains("/hour="),
            "Hive-style key {key}"
        );
        let (partition, first, last) = offsets_of(key);
        assert!(first <= last, "{key}");
        ranges.entry(partition).or_default().push((first, last));
        let lines = read_object(&objects.join(key));
        assert!(!lines.is_empty(), "{key} is empty");
        for line in lines {
            let id = line["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("a line without an id in {key}: {line}"));
            *seen.entry(id).or_default() += 1;
        }
    }
    for (partition, ranges) in &mut ranges {
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(
                pair[0].1 < pair[1].0,
                "objects of partition {partition} overlap: {pair:?}"
            );
        }
    }
    let (lost, duplicates) = produced.lost_and_duplicates(&seen);
    println!(
        "{} valid events, {} objects, {KILLS} SIGKILLs mid-stream: lost {lost}, in two objects \
         {duplicates}; the last run and the steady instance counted:\n{}",
        produced.valid_ids.len(),
        keys.len(),
        counted.join("\n")
    );
    assert_eq!(lost, 0, "every event is in an object");
    assert_eq!(duplicates, 0, "no event is in two objects");
    assert!(
        seen.keys().all(|id| produced.valid_ids.contains(id)),
        "only produced events are archived"
    );
}

/// `check-config --connect` lists each object-store destination's prefix with its credentials:
/// the bucket that exists answers, a missing one fails the check naming the route's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_reaches_the_store_and_names_a_missing_bucket() {
    let work = tempfile::tempdir().expect("workdir");
    let moto = Moto::start(&work.path().join("moto.log")).await;
    let check = |bucket: &str| {
        let path = work.path().join(format!("{bucket}.toml"));
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"127.0.0.1:1\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n\
                 [[routes]]\nname = \"archive\"\ndefault = true\n[routes.sink]\n\
                 type = \"s3\"\nurl = \"s3://{bucket}/raw\"\n[routes.sink.options]\n\
                 endpoint = \"{}\"\nallow_http = true\nregion = \"us-east-1\"\n\
                 access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
                moto.endpoint
            ),
        )
        .expect("write");
        let output = Command::new(env!("CARGO_BIN_EXE_logbridge"))
            .args(["check-config", "--connect"])
            .arg(&path)
            .output()
            .expect("run check-config");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Kafka is not there (port 1) in both: the store's line is what is looked at.
    let (_, found) = check(BUCKET);
    assert!(
        found.contains("`routes[0].sink.url`: s3://archive/raw: reachable"),
        "{found}"
    );
    let (code, missing) = check("no-such-bucket");
    assert_eq!(code, Some(3), "cannot connect: {missing}");
    assert!(
        missing.contains("`routes[0].sink.url`: s3://no-such-bucket/raw: cannot list"),
        "{missing}"
    );
}
