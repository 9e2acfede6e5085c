//! Secured clusters, with real handshakes: the `logbridge` binary against a tansu broker behind
//! a TLS-terminating proxy (certificates made here), and against tansu with SASL required
//! (SCRAM-SHA-256/512 users created through tansu; tansu offers no PLAIN, and that refusal is
//! checked to be reported plainly). Right credentials: every record
//! delivered (Kafka sink and dead-letter topic inheriting the source's security) and committed.
//! Wrong CA or password: `check-config --connect` exits 3 naming the cause, `/readyz` fails with
//! it, and the process keeps running with librdkafka's reconnect backoff (no crash loop).
//! Also: compressed batches (zstd, lz4, gzip, snappy) produced by another client are read and
//! forwarded; `/readyz` and `check-config --connect` (exit 4) name a subscribed topic that does
//! not exist, and `/readyz` a broker that is down.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{free_port, Logbridge, Tansu};
use common::tls::{Pki, TlsProxy};
use common::*;

const EVENTS: u64 = 2_000;

/// A child configuration: `[[routes]]` for errors to a Kafka topic `{topic}-errors` and the rest
/// to a file, a dead-letter topic `{topic}-dlq`, both without security of their own.
fn write_config(
    path: &Path,
    brokers: &str,
    group: &str,
    topic: &str,
    security: &str,
    out: &Path,
    http_port: u16,
) {
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
check_interval_ms = 500
{security}
[kafka.options]
"auto.offset.reset" = "earliest"
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 1000
[pipeline]
commit_interval_ms = 200
drain_timeout_ms = 3000
[http]
listen = "127.0.0.1:{http_port}"
[[routes]]
name = "errors"
levels = ["error", "fatal"]
sink = {{ type = "kafka", topic = "{topic}-errors" }}
[[routes]]
name = "rest"
levels = ["warning", "info", "debug"]
sink = {{ type = "file", path = "{out}/rest.jsonl" }}
[dead_letter]
topic = "{topic}-dlq"
"#,
        out = out.display()
    );
    std::fs::write(path, text).expect("write config");
}

/// `logbridge check-config --connect FILE` with `env`: exit code and stderr.
fn check_connect(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .args(["check-config", "--connect", "--timeout", "5"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run check-config");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `id` of every event in `topic`, as read back from the cluster.
fn forwarded_ids(kafka: &Kafka, topic: &str) -> Vec<u64> {
    kafka
        .read_all(topic)
        .iter()
        .filter_map(|record| {
            let value: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref()?).ok()?;
            value["id"].as_u64()
        })
        .collect()
}

async fn readyz(port: u16) -> (u16, String) {
    let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    if tokio::net::TcpStream::connect(address).await.is_err() {
        return (0, String::new());
    }
    http_get(address, "/readyz").await
}

/// Produces the samples, runs logbridge with `config` until the group committed everything,
/// and checks where every record went: errors in the Kafka topic, the rest in the file,
/// malformed ones in the dead-letter topic. Returns after a clean SIGTERM.
async fn delivers_everything(
    kafka: &Kafka,
    config: &Path,
    group: &str,
    out: &Path,
    http_port: u16,
    env: &[(&str, &str)],
) {
    let produced = kafka.produce_samples(EVENTS, 0.02, 11).await;
    let end = kafka.end_offsets();
    assert_eq!(end.iter().sum::<i64>(), EVENTS as i64, "end offsets");
    let (code, report) = check_connect(config, env);
    assert_eq!(code, Some(0), "check-config --connect: {report}");
    assert!(
        report.contains("connected") && report.contains("3 partitions"),
        "{report}"
    );

    let mut child = Logbridge::start_with_env(config, http_port, out.with_extension("log"), env);
    let done = wait_for(Duration::from_secs(120), || async {
        kafka.committed(group) == end
    })
    .await;
    let log = std::fs::read_to_string(out.with_extension("log")).unwrap_or_default();
    assert!(
        done,
        "not everything committed: {:?} of {end:?}\n{log}",
        kafka.committed(group)
    );
    let (status, body) = readyz(http_port).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "readiness once caught up"
    );
    let (exit, _) = child.terminate(Duration::from_secs(15));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exit after SIGTERM");

    // Errors through the Kafka sink (on the source cluster, so with its security), the rest in
    // the file, malformed records in the dead-letter topic (the same).
    let forwarded = forwarded_ids(kafka, &format!("{}-errors", kafka.topic));
    let filed = id_counts(&read_lines(&[out.join("rest.jsonl")]));
    let dead = kafka.read_all(&format!("{}-dlq", kafka.topic));
    let mut seen: std::collections::HashSet<u64> = filed.keys().copied().collect();
    seen.extend(forwarded.iter().copied());
    println!(
        "secured delivery: {} forwarded to Kafka, {} to the file, {} dead letters, {} malformed produced",
        forwarded.len(),
        filed.len(),
        dead.len(),
        produced.malformed.len()
    );
    assert!(!forwarded.is_empty(), "the Kafka sink forwarded nothing");
    assert_eq!(seen, produced.valid_ids, "every valid event delivered");
    assert_eq!(
        dead.len(),
        produced.malformed.len(),
        "every malformed record dead-lettered"
    );
}

/// Starts logbridge with a configuration the cluster refuses, and checks what an operator
/// sees: `/readyz` failing with `expected` in its reason, the process still running after
/// `watch`, and at most `max_lines` warning/error lines logged meanwhile (librdkafka backs off
/// between reconnects; nothing restarts in a loop).
async fn refused_without_crash_loop(
    config: &Path,
    http_port: u16,
    log: &Path,
    env: &[(&str, &str)],
    expected: &str,
) {
    const WATCH: Duration = Duration::from_secs(8);
    let mut child = Logbridge::start_with_env(config, http_port, log.to_path_buf(), env);
    let started = Instant::now();
    let mut reason = String::new();
    while started.elapsed() < WATCH {
        let (status, body) = readyz(http_port).await;
        if status == 503 && body.contains(expected) {
            reason = body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(child.running(), "logbridge exited on a refused connection");
    let (status, body) = readyz(http_port).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(expected), "/readyz says: {body}");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let noisy = text
        .lines()
        .filter(|line| line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\""))
        .count();
    println!(
        "refused ({expected}): /readyz said {reason:?}; {noisy} warning/error lines in {WATCH:?}"
    );
    assert!(
        noisy <= 40,
        "{noisy} warning/error lines in {WATCH:?}: reconnecting without backoff?\n{text}"
    );
    let (exit, _) = child.terminate(Duration::from_secs(15));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exit after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_delivers_and_commits_and_a_wrong_ca_is_refused_plainly() {
    let _serial = serial().await;
    let work = tempfile::tempdir().expect("workdir");
    let pki = Pki::generate(work.path());
    let proxy_port = free_port();
    let mut broker = Tansu::start_advertising(proxy_port);
    let proxy = TlsProxy::start(proxy_port, broker.port, &pki).await;
    let brokers = format!("127.0.0.1:{proxy_port}");
    let ca = pki.ca_file.display().to_string();
    let tls = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca.as_str()),
    ];
    let kafka = Kafka::external_with(&brokers, &tls, "tls-logs", 3).await;
    for output in ["tls-logs-errors", "tls-logs-dlq"] {
        logbridge::tools::produce::ensure_topic_with(&brokers, &kafka.properties, output, 2)
            .await
            .expect("output topic");
    }

    let group = unique("tls");
    let out = work.path().join("right");
    let config = work.path().join("right.toml");
    let port = free_port();
    let security = format!("[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"");
    write_config(&config, &brokers, &group, "tls-logs", &security, &out, port);
    delivers_everything(&kafka, &config, &group, &out, port, &[]).await;
    let refused_before = proxy
        .failed_handshakes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused_before, 0, "handshakes failed with the right CA");

    // The wrong CA: the broker's certificate cannot be verified.
    let wrong = work.path().join("wrong.toml");
    let security = format!(
        "[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{}\"",
        pki.other_ca_file.display()
    );
    let port = free_port();
    write_config(
        &wrong,
        &brokers,
        &unique("tls-wrong"),
        "tls-logs",
        &security,
        &work.path().join("wrong"),
        port,
    );
    let (code, report) = check_connect(&wrong, &[]);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect with the wrong CA: {report}"
    );
    assert!(report.contains("certificate verify failed"), "{report}");
    refused_without_crash_loop(
        &wrong,
        port,
        &work.path().join("wrong.log"),
        &[],
        "certificate verify failed",
    )
    .await;
    assert!(
        proxy
            .failed_handshakes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the proxy saw no refused handshake"
    );

    // All brokers down: the right configuration, and nothing answering.
    broker.stop();
    drop(proxy);
    let (code, report) = check_connect(&config, &[]);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect with the broker down: {report}"
    );
    assert!(
        report.contains("cannot reach the Kafka cluster"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_accepts_the_right_password_and_refuses_a_wrong_one_plainly() {
    let _serial = serial().await;
    let work = tempfile::tempdir().expect("workdir");
    let broker = Tansu::start_with_users(
        &[
            ("alice", "alice-secret", "scram512"),
            ("bob", "bob-secret", "scram256"),
        ],
        &[
            ("sasl-logs", 3),
            ("sasl-logs-errors", 2),
            ("sasl-logs-dlq", 2),
        ],
    );
    let brokers = broker.brokers();
    let sasl = [
        ("security.protocol", "sasl_plaintext"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", "alice"),
        ("sasl.password", "alice-secret"),
    ];
    let kafka = Kafka::external_with(&brokers, &sasl, "sasl-logs", 3).await;

    // SCRAM-SHA-512, the password from a file.
    let password_file = work.path().join("alice.password");
    std::fs::write(&password_file, "alice-secret\n").expect("password file");
    let group = unique("sasl");
    let out = work.path().join("scram");
    let config = work.path().join("scram.toml");
    let port = free_port();
    let security = format!(
        "[kafka.security]\nprotocol = \"sasl_plaintext\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\npassword = \"${{file:{}}}\"",
        password_file.display()
    );
    write_config(
        &config,
        &brokers,
        &group,
        "sasl-logs",
        &security,
        &out,
        port,
    );
    delivers_everything(&kafka, &config, &group, &out, port, &[]).await;

    // SCRAM-SHA-256 with the password from the environment: connected. PLAIN: tansu 0.6.0
    // offers no PLAIN (its handshake answers NoSharedMechanism), which is reported plainly.
    for (mechanism, exit, said) in [
        ("SCRAM-SHA-256", 0, "connected"),
        ("PLAIN", 3, "SASL PLAIN mechanism handshake failed"),
    ] {
        let path = work.path().join(format!("{mechanism}.toml"));
        let security = format!(
            "[kafka.security]\nprotocol = \"sasl_plaintext\"\nmechanism = \"{mechanism}\"\nusername = \"bob\"\npassword = \"${{env:BOB_PASSWORD}}\""
        );
        write_config(
            &path,
            &brokers,
            &unique("sasl"),
            "sasl-logs",
            &security,
            &out,
            free_port(),
        );
        let (code, report) = check_connect(&path, &[("BOB_PASSWORD", "bob-secret")]);
        assert_eq!(code, Some(exit), "{mechanism}: {report}");
        assert!(report.contains(said), "{mechanism}: {report}");
        let (code, report) = check_connect(&path, &[]);
        assert_eq!(code, Some(2), "{mechanism} without the variable: {report}");
        assert!(
            report.contains(
                "`kafka.security.password`: environment variable `BOB_PASSWORD` is not set"
            ),
            "{report}"
        );
    }

    // The load generator reaches the secured cluster with the same file (and creates a topic
    // through it).
    let produced = Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .args([
            "produce",
            "--topic",
            "sasl-extra",
            "--partitions",
            "1",
            "--count",
            "50",
        ])
        .args(["--option", "compression.type=zstd", "--config"])
        .arg(&config)
        .output()
        .expect("run produce");
    let said = String::from_utf8_lossy(&produced.stdout);
    assert!(
        produced.status.success() && said.contains("produced 50 events"),
        "{said}{}",
        String::from_utf8_lossy(&produced.stderr)
    );

    // A wrong password: refused plainly, never shown.
    let wrong = work.path().join("wrong.toml");
    let port = free_port();
    let security = "[kafka.security]\nprotocol = \"sasl_plaintext\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\npassword = \"${env:ALICE_PASSWORD}\"";
    write_config(
        &wrong,
        &brokers,
        &unique("sasl-wrong"),
        "sasl-logs",
        security,
        &work.path().join("wrong"),
        port,
    );
    let env = [("ALICE_PASSWORD", "not-her-password")];
    let (code, report) = check_connect(&wrong, &env);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect with a wrong password: {report}"
    );
    assert!(report.contains("Kafka authentication failed"), "{report}");
    let shown = Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .arg("check-config")
        .arg(&wrong)
        .envs(env)
        .output()
        .expect("check-config");
    let printed = String::from_utf8_lossy(&shown.stdout);
    assert!(
        printed.contains("<redacted>") && !printed.contains("not-her-password"),
        "{printed}"
    );
    let log = work.path().join("wrong.log");
    refused_without_crash_loop(&wrong, port, &log, &env, "Kafka authentication failed").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("not-her-password"),
        "the password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_from_another_client_are_read_and_forwarded() {
    let _serial = serial().await;
    let kafka = Kafka::start("codecs", 2);
    kafka.create_topic("codecs-out", 2);
    let codecs = ["zstd", "lz4", "gzip", "snappy"];
    let mut expected = std::collections::HashSet::new();
    for (round, codec) in codecs.iter().enumerate() {
        let records: Vec<(Option<String>, Vec<u8>)> = (0..250u64)
            .map(|n| {
                let id = round as u64 * 1_000 + n;
                expected.insert(id);
                (Some(format!("k{}", n % 7)), event(id, "error"))
            })
            .collect();
        let mut client = kafka.client();
        client
            .set("compression.type", *codec)
            .set("batch.num.messages", "100");
        produce_records(&client, "codecs", &records, "1000000").await;
    }
    let group = unique("codecs");
    let routes = r#"
[[routes]]
name = "errors"
levels = ["error"]
sink = { type = "kafka", topic = "codecs-out" }
"#;
    let metrics = std::sync::Arc::new(logbridge::metrics::Metrics::new());
    let running = Running::without_http(kafka.config(&group, "", routes), &metrics);
    let end = kafka.end_offsets();
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    running.stop().await;
    assert!(done, "compressed records not all committed");
    let forwarded: std::collections::HashSet<u64> =
        forwarded_ids(&kafka, "codecs-out").into_iter().collect();
    println!(
        "codecs {codecs:?}: {} of {} events forwarded",
        forwarded.len(),
        expected.len()
    );
    assert_eq!(forwarded, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_check_config_name_a_missing_topic_and_a_broker_down() {
    let _serial = serial().await;
    let kafka = Kafka::start("present", 1);
    let text = format!(
        r#"{kafka}
[[routes]]
name = "all"
levels = ["error", "warning", "info", "debug"]
sink = {{ type = "null" }}
"#,
        kafka = kafka_section(&kafka.brokers, &unique("missing"), "present", "").replace(
            "topics = [\"present\"]",
            "topics = [\"present\", \"mistyped\"]\ncheck_interval_ms = 300"
        )
    );
    let work = tempfile::tempdir().expect("workdir");
    let path = work.path().join("missing.toml");
    std::fs::write(&path, &text).expect("write config");
    let (code, report) = check_connect(&path, &[]);
    assert_eq!(code, Some(4), "check-config --connect: {report}");
    assert!(
        report.contains("`kafka.topics[0]`: topic `present`: 1 partition\n")
            && report.contains("`kafka.topics[1]`: topic `mistyped` does not exist at"),
        "{report}"
    );
    let config = logbridge::Config::from_toml_str(&text).expect("valid");
    let (running, address) = Running::start_serving(config, Default::default()).await;
    let said = wait_for(Duration::from_secs(30), || async {
        http_get(address, "/readyz").await
            == (
                503,
                "not ready: topic `mistyped` does not exist\n".to_string(),
            )
    })
    .await;
    assert!(said, "/readyz: {:?}", http_get(address, "/readyz").await);
    let (_, status) = http_get(address, "/status").await;
    assert!(
        status.contains("\"cluster\": \"topic `mistyped` does not exist\""),
        "{status}"
    );
    kafka.create_topic("mistyped", 1);
    let ready = wait_for(Duration::from_secs(30), || async {
        http_get(address, "/readyz").await == (200, "ready\n".to_string())
    })
    .await;
    let (code, report) = check_connect(&path, &[]);
    assert_eq!(
        code,
        Some(0),
        "check-config --connect once created: {report}"
    );
    assert!(
        ready,
        "/readyz once created: {:?}",
        http_get(address, "/readyz").await
    );

    // The only broker down: not ready, saying so; back up: ready again.
    let cluster = kafka.cluster.as_ref().expect("mock cluster");
    cluster.broker_down(1).expect("broker down");
    let down = wait_for(Duration::from_secs(30), || async {
        let (status, body) = http_get(address, "/readyz").await;
        status == 503 && body.starts_with("not ready: cannot reach the Kafka cluster at")
    })
    .await;
    assert!(
        down,
        "/readyz with the broker down: {:?}",
        http_get(address, "/readyz").await
    );
    cluster.broker_up(1).expect("broker up");
    let back = wait_for(Duration::from_secs(30), || async {
        http_get(address, "/readyz").await == (200, "ready\n".to_string())
    })
    .await;
    assert!(
        back,
        "/readyz with the broker back: {:?}",
        http_get(address, "/readyz").await
    );
    running.stop().await;
}
