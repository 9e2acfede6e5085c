//! Secured clusters, with real handshakes: the `logbridge` binary against Apache Kafka serving
//! TLS, mutual TLS and SASL itself (no proxy), with ACLs on (StandardAuthorizer). The tests
//! share one broker (see [`secured_broker`]) with three listeners beside PLAINTEXT (which the
//! test helpers use as a super user): TLS, TLS requiring a client certificate, and SASL over
//! TLS offering SCRAM-SHA-256 and SCRAM-SHA-512 (users made at format time) and PLAIN (a user
//! listed in the listener's JAAS configuration). Apache Kafka offers PLAIN, so PLAIN is shown
//! to connect rather than to be refused. Certificates are made here.
//!
//! - TLS with the right CA, mutual TLS with a certificate the CA signed (its common name is the
//!   principal), SCRAM with the right password from `${file:...}` (SHA-512; SHA-256 and PLAIN
//!   from `${env:...}` connect): every record delivered (Kafka sink and dead-letter topic
//!   inheriting the source's security) and committed.
//! - A wrong CA, no client certificate (or one another CA signed), a wrong password:
//!   `check-config --connect` exits 3 naming the cause, `/readyz` fails with it, and the
//!   process keeps running with librdkafka's reconnect backoff (no crash loop). Nothing
//!   listening at the address: exit 3, "cannot reach".
//! - ACLs: a principal allowed to read the source (and its group) and write both output
//!   topics delivers and commits everything. One without any ACL on the dead-letter topic:
//!   `check-config --connect` names that topic (as missing: the cluster hides it), the dead
//!   letters are refused (TopicAuthorizationFailed), commits stop at the first malformed
//!   record of each partition, `/readyz` names the topic and the authorization failure, and
//!   the process keeps running; granted the write, it parks them and commits to the end.
//!
//! Also, on librdkafka's mock cluster: compressed batches (zstd, lz4, gzip, snappy) produced by
//! another client are read and forwarded; `/readyz` and `check-config --connect` (exit 4) name a
//! subscribed topic that does not exist, and `/readyz` a broker that is down.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use common::apache::{self, ApacheKafka, Options, Secured};
use common::process::{closed_port, Logbridge, HTTP_LISTEN};
use common::tls::{Pki, CLIENT_NAME};
use common::*;

const EVENTS: u64 = 2_000;

/// The broker the secured tests share, and the certificates it serves.
struct SecuredBroker {
    kafka: ApacheKafka,
    pki: Pki,
}

/// Indexes of the secured listeners in `Options::secured`.
const TLS: usize = 0;
const MTLS: usize = 1;
const SASL_SSL: usize = 2;

/// One single-node Apache Kafka for this test binary, started on first use: TLS, mutual TLS
/// and SASL_SSL listeners, SASL users `alice` (SCRAM-SHA-512), `bob` (SCRAM-SHA-256 and
/// PLAIN), ACLs on. Each test uses its own topics, groups and grants.
fn secured_broker() -> &'static SecuredBroker {
    static BROKER: OnceLock<SecuredBroker> = OnceLock::new();
    BROKER.get_or_init(|| {
        let pki = Pki::generate(&apache::files_dir());
        let user = |mechanism: &str, name: &str, password: &str| {
            (
                mechanism.to_string(),
                name.to_string(),
                password.to_string(),
            )
        };
        let kafka = ApacheKafka::start_with(Options {
            nodes: 1,
            secured: vec![
                Secured::Tls { client_auth: false },
                Secured::Tls { client_auth: true },
                Secured::SaslSsl,
            ],
            tls: Some((pki.keystore_file.clone(), pki.ca_file.clone())),
            users: vec![
                user("SCRAM-SHA-512", "alice", "alice-secret"),
                user("SCRAM-SHA-256", "bob", "bob-secret"),
                user("PLAIN", "bob", "bob-secret"),
            ],
            acls: true,
            ..Options::default()
        });
        println!("secured broker started in {:?}", kafka.started_in);
        SecuredBroker { kafka, pki }
    })
}

/// Allows `principal` (`User:<name>`) `operations` on `topics` and `groups` (every operation
/// on every one of them), through the PLAINTEXT listener. In Kafka's authorizer Read and Write
/// imply Describe.
fn allow(
    broker: &ApacheKafka,
    principal: &str,
    operations: &[&str],
    topics: &[&str],
    groups: &[&str],
) {
    let bootstrap = broker.brokers();
    let user = format!("User:{principal}");
    let mut args = vec![
        "--bootstrap-server",
        bootstrap.as_str(),
        "--add",
        "--allow-principal",
        user.as_str(),
    ];
    for operation in operations {
        args.extend(["--operation", operation]);
    }
    for topic in topics {
        args.extend(["--topic", topic]);
    }
    for group in groups {
        args.extend(["--group", group]);
    }
    broker.tool("org.apache.kafka.tools.AclCommand", &args);
}

/// Waits until a client with `properties` sees every one of `topics` in the cluster's
/// metadata: an ACL takes effect once the broker has applied the controller's record, which
/// may come just after the tool returned.
async fn wait_visible(brokers: &str, properties: &[(&str, String)], topics: &[&str]) {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (name, value) in properties {
        config.set(*name, value);
    }
    let client: BaseConsumer = config.create().expect("metadata client");
    let visible = || {
        let Ok(metadata) = client.fetch_metadata(None, Duration::from_secs(5)) else {
            return false;
        };
        topics.iter().all(|topic| {
            metadata
                .topics()
                .iter()
                .any(|seen| seen.name() == *topic && seen.error().is_none())
        })
    };
    let seen = wait_for(Duration::from_secs(30), || std::future::ready(visible())).await;
    assert!(seen, "{topics:?} not visible with {properties:?}");
}

/// A child's configuration file and its file sink's folder.
struct ChildConfig {
    out: std::path::PathBuf,
    config: std::path::PathBuf,
}

/// Writes the configuration of a child named `name` in `work` (see [`write_config`]).
fn child_config(
    work: &Path,
    name: &str,
    brokers: &str,
    group: &str,
    topic: &str,
    security: &str,
) -> ChildConfig {
    let child = ChildConfig {
        out: work.join(name),
        config: work.join(format!("{name}.toml")),
    };
    write_config(&child.config, brokers, group, topic, security, &child.out);
    child
}

/// A child configuration: `[[routes]]` for errors to a Kafka topic `{topic}-errors` and the rest
/// to a file, a dead-letter topic `{topic}-dlq`, both without security of their own; HTTP on a
/// port the child picks ([`HTTP_LISTEN`]).
fn write_config(path: &Path, brokers: &str, group: &str, topic: &str, security: &str, out: &Path) {
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
listen = "{HTTP_LISTEN}"
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

/// A source topic `{prefix}-<unique>` of 3 partitions with its outputs `-errors` and `-dlq`
/// (2 partitions each), made through the PLAINTEXT listener; the helper reads and writes
/// there too.
async fn topics_on(broker: &ApacheKafka, prefix: &str) -> Kafka {
    let kafka = Kafka::external(&broker.brokers(), &unique(prefix), 3).await;
    for suffix in ["errors", "dlq"] {
        kafka
            .create_external_topic(&format!("{}-{suffix}", kafka.topic), 2)
            .await;
    }
    kafka
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

/// `/readyz` of `child`: (0, "") while it does not answer.
async fn readyz(child: &Logbridge) -> (u16, String) {
    let Some(address) = child.logged_address() else {
        return (0, String::new());
    };
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

    let mut child = Logbridge::start_with_env(config, out.with_extension("log"), env);
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
    let (status, body) = readyz(&child).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready\n"),
        "readiness once caught up"
    );
    let (exit, _) = child.terminate(Duration::from_secs(15));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exit after SIGTERM");
    where_everything_went(kafka, out, &produced);
}

/// Errors through the Kafka sink (on the source cluster, so with its security), the rest in
/// the file, malformed records in the dead-letter topic (the same): each topic read back by a
/// separate client.
fn where_everything_went(kafka: &Kafka, out: &Path, produced: &Produced) {
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
    let parked: std::collections::HashSet<(i32, i64)> = dead
        .iter()
        .filter_map(|record| {
            let partition = record.header("logbridge.source.partition")?.parse().ok()?;
            let offset = record.header("logbridge.source.offset")?.parse().ok()?;
            Some((partition, offset))
        })
        .collect();
    assert_eq!(
        dead.len(),
        produced.malformed.len(),
        "every malformed record dead-lettered, once"
    );
    assert_eq!(
        parked, produced.malformed,
        "the dead letters are the malformed records"
    );
}

/// Starts logbridge with a configuration the cluster refuses, and checks what an operator
/// sees: `/readyz` failing with `expected` in its reason, the process still running after
/// `watch`, and at most `max_lines` warning/error lines logged meanwhile (librdkafka backs off
/// between reconnects; nothing restarts in a loop).
async fn refused_without_crash_loop(
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
    expected: &str,
) {
    const WATCH: Duration = Duration::from_secs(8);
    let mut child = Logbridge::start_with_env(config, log.to_path_buf(), env);
    let started = Instant::now();
    let mut reason = String::new();
    while started.elapsed() < WATCH {
        let (status, body) = readyz(&child).await;
        if status == 503 && body.contains(expected) {
            reason = body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(child.running(), "logbridge exited on a refused connection");
    let (status, body) = readyz(&child).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(expected), "/readyz says: {body}");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // What this run must have logged, before its warnings are counted (none in a log that
    // holds nothing would prove nothing): its start, and the refusal with the cause /readyz
    // gives.
    assert!(
        common::process::logged_http_address(&text).is_some(),
        "the run's start is not in its log:\n{text}"
    );
    let warnings: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(
        warnings.iter().any(|line| line.contains(expected)),
        "no warning names the refusal (`{expected}`):\n{text}"
    );
    let noisy = warnings.len();
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
    let SecuredBroker { kafka: broker, pki } = secured_broker();
    let work = tempfile::tempdir().expect("workdir");
    let brokers = broker.secured_brokers(TLS);
    let ca = pki.ca_file.display().to_string();
    let tls = [
        ("security.protocol", "ssl"),
        ("ssl.ca.location", ca.as_str()),
    ];
    // Without a client certificate the client is `User:ANONYMOUS`, a super user: the helpers
    // make the topics, produce and read back through TLS as well.
    let kafka = Kafka::external_with(&brokers, &tls, &unique("tls-logs"), 3).await;
    for suffix in ["errors", "dlq"] {
        kafka
            .create_external_topic(&format!("{}-{suffix}", kafka.topic), 2)
            .await;
    }

    let group = unique("tls");
    let security = format!("[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"");
    let ChildConfig { out, config } = child_config(
        work.path(),
        "right",
        &brokers,
        &group,
        &kafka.topic,
        &security,
    );
    delivers_everything(&kafka, &config, &group, &out, &[]).await;

    // The wrong CA: the broker's certificate cannot be verified.
    let wrong = work.path().join("wrong.toml");
    let security = format!(
        "[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{}\"",
        pki.other_ca_file.display()
    );
    write_config(
        &wrong,
        &brokers,
        &unique("tls-wrong"),
        &kafka.topic,
        &security,
        &work.path().join("wrong"),
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
        &work.path().join("wrong.log"),
        &[],
        "certificate verify failed",
    )
    .await;

    // Nothing answering (a broker that is down, without stopping the one the other tests
    // share): the right configuration pointed at a port nobody listens on.
    let down = work.path().join("down.toml");
    // Held, so that nothing else can take the port while the test points at it.
    let (_held, nobody) = closed_port();
    let nobody = nobody.to_string();
    let security = format!("[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"");
    write_config(&down, &nobody, &group, &kafka.topic, &security, &out);
    let (code, report) = check_connect(&down, &[]);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect with the broker down: {report}"
    );
    assert!(
        report.contains(&format!("cannot reach the Kafka cluster at {nobody}")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_certificate_the_ca_signed_delivers_and_commits_and_none_is_refused() {
    let _serial = serial().await;
    let SecuredBroker { kafka: broker, pki } = secured_broker();
    let work = tempfile::tempdir().expect("workdir");
    let brokers = broker.secured_brokers(MTLS);
    let kafka = topics_on(broker, "mtls-logs").await;
    let (errors, dlq) = (
        format!("{}-errors", kafka.topic),
        format!("{}-dlq", kafka.topic),
    );
    let group = unique("mtls");
    // The certificate's common name is the principal (`ssl.principal.mapping.rules`): only
    // `User:carol` is allowed, so delivering shows the broker took the name from it.
    allow(broker, CLIENT_NAME, &["Read"], &[&kafka.topic], &[&group]);
    allow(broker, CLIENT_NAME, &["Write"], &[&errors, &dlq], &[]);
    let ca = pki.ca_file.display().to_string();
    let (cert, key) = (
        pki.client_cert_file.display().to_string(),
        pki.client_key_file.display().to_string(),
    );
    wait_visible(
        &brokers,
        &[
            ("security.protocol", "ssl".into()),
            ("ssl.ca.location", ca.clone()),
            ("ssl.certificate.location", cert.clone()),
            ("ssl.key.location", key.clone()),
        ],
        &[&kafka.topic, &errors, &dlq],
    )
    .await;

    let security = format!(
        "[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\""
    );
    let ChildConfig { out, config } = child_config(
        work.path(),
        "carol",
        &brokers,
        &group,
        &kafka.topic,
        &security,
    );
    delivers_everything(&kafka, &config, &group, &out, &[]).await;

    // No client certificate: the broker ends the handshake.
    let none = work.path().join("none.toml");
    let security = format!("[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"");
    write_config(
        &none,
        &brokers,
        &unique("mtls-none"),
        &kafka.topic,
        &security,
        &work.path().join("none"),
    );
    let (code, report) = check_connect(&none, &[]);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect without a client certificate: {report}"
    );
    assert!(report.contains(REFUSED_CERTIFICATE), "{report}");
    assert!(
        report.contains("Kafka authentication failed"),
        "a refused certificate is a refused credential: {report}"
    );
    refused_without_crash_loop(
        &none,
        &work.path().join("none.log"),
        &[],
        REFUSED_CERTIFICATE,
    )
    .await;

    // A certificate another CA signed: refused too.
    let stranger = work.path().join("stranger.toml");
    let security = format!(
        "[kafka.security]\nprotocol = \"ssl\"\nca_file = \"{ca}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.stranger_cert_file.display(),
        pki.stranger_key_file.display()
    );
    write_config(
        &stranger,
        &brokers,
        &unique("mtls-stranger"),
        &kafka.topic,
        &security,
        &work.path().join("stranger"),
    );
    let (code, report) = check_connect(&stranger, &[]);
    assert_eq!(
        code,
        Some(3),
        "check-config --connect with a certificate of another CA: {report}"
    );
    assert!(report.contains(REFUSED_CERTIFICATE), "{report}");
}

/// What librdkafka reports when the broker requires a client certificate and gets none, or
/// one it cannot verify: the TLS alert Java's TLS stack sends in both cases (42,
/// bad_certificate; not TLS 1.3's certificate_required), received while the client waits for
/// the answer to its first request.
const REFUSED_CERTIFICATE: &str = "ssl/tls alert bad certificate";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_accepts_the_right_password_and_refuses_a_wrong_one_plainly() {
    let _serial = serial().await;
    let SecuredBroker { kafka: broker, pki } = secured_broker();
    let work = tempfile::tempdir().expect("workdir");
    let brokers = broker.secured_brokers(SASL_SSL);
    let kafka = topics_on(broker, "sasl-logs").await;
    let (errors, dlq) = (
        format!("{}-errors", kafka.topic),
        format!("{}-dlq", kafka.topic),
    );
    let extra = unique("sasl-extra");
    let group = unique("sasl");
    allow(broker, "alice", &["Read"], &[&kafka.topic], &[&group]);
    allow(broker, "alice", &["Write"], &[&errors, &dlq], &[]);
    // The load generator below creates its topic as alice.
    allow(broker, "alice", &["Create", "Write"], &[&extra], &[]);
    // bob only connects and looks the topics up.
    allow(
        broker,
        "bob",
        &["Describe"],
        &[&kafka.topic, &errors, &dlq],
        &[],
    );
    let ca = pki.ca_file.display().to_string();
    for (user, mechanism) in [("alice", "SCRAM-SHA-512"), ("bob", "SCRAM-SHA-256")] {
        let client = sasl_client(&ca, mechanism, user);
        wait_visible(&brokers, &client, &[&kafka.topic, &errors, &dlq]).await;
    }

    // SCRAM-SHA-512, the password from a file.
    let password_file = work.path().join("alice.password");
    std::fs::write(&password_file, "alice-secret\n").expect("password file");
    let security = format!(
        "[kafka.security]\nprotocol = \"sasl_ssl\"\nca_file = \"{ca}\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\npassword = \"${{file:{}}}\"",
        password_file.display()
    );
    let ChildConfig { out, config } = child_config(
        work.path(),
        "scram",
        &brokers,
        &group,
        &kafka.topic,
        &security,
    );
    delivers_everything(&kafka, &config, &group, &out, &[]).await;

    // SCRAM-SHA-256 and PLAIN with the password from the environment: connected, and every
    // topic found.
    for mechanism in ["SCRAM-SHA-256", "PLAIN"] {
        let path = work.path().join(format!("{mechanism}.toml"));
        let security = format!(
            "[kafka.security]\nprotocol = \"sasl_ssl\"\nca_file = \"{ca}\"\nmechanism = \"{mechanism}\"\nusername = \"bob\"\npassword = \"${{env:BOB_PASSWORD}}\""
        );
        write_config(
            &path,
            &brokers,
            &unique("sasl"),
            &kafka.topic,
            &security,
            &out,
        );
        let (code, report) = check_connect(&path, &[("BOB_PASSWORD", "bob-secret")]);
        assert_eq!(code, Some(0), "{mechanism}: {report}");
        assert!(
            report.contains(&format!("{brokers}: connected")) && report.contains("3 partitions"),
            "{mechanism}: {report}"
        );
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
        .args(["produce", "--topic", &extra, "--partitions", "1"])
        .args([
            "--count",
            "50",
            "--option",
            "compression.type=zstd",
            "--config",
        ])
        .arg(&config)
        .output()
        .expect("run produce");
    let said = String::from_utf8_lossy(&produced.stdout);
    assert!(
        produced.status.success() && said.contains("produced 50 events"),
        "{said}{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    let extra_end = Kafka::external(&broker.brokers(), &extra, 1)
        .await
        .end_offsets();
    assert_eq!(extra_end, [50], "the generator's records on the broker");

    // A wrong password: refused plainly, never shown.
    let wrong = work.path().join("wrong.toml");
    let security = format!(
        "[kafka.security]\nprotocol = \"sasl_ssl\"\nca_file = \"{ca}\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\npassword = \"${{env:ALICE_PASSWORD}}\""
    );
    write_config(
        &wrong,
        &brokers,
        &unique("sasl-wrong"),
        &kafka.topic,
        &security,
        &work.path().join("wrong"),
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
    refused_without_crash_loop(&wrong, &log, &env, "Kafka authentication failed").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // The lines where it could have been shown are there: the refused authentication.
    assert!(
        text.lines().any(|line| line.contains("\"level\":\"WARN\"")
            && line.contains(
                "Authentication failed during authentication due to invalid credentials"
            )),
        "the refused authentication is not in the log:\n{text}"
    );
    assert!(
        !text.contains("not-her-password"),
        "the password reached the log"
    );
}

/// SASL properties of `user` (password `<user>-secret`) over TLS with `mechanism`.
fn sasl_client(ca: &str, mechanism: &str, user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "sasl_ssl".into()),
        ("ssl.ca.location", ca.into()),
        ("sasl.mechanisms", mechanism.into()),
        ("sasl.username", user.into()),
        ("sasl.password", format!("{user}-secret")),
    ]
}

/// The `[kafka.security]` section of `user` (password `<user>-secret`) over TLS with SCRAM.
fn sasl_section(ca: &str, mechanism: &str, user: &str) -> String {
    format!(
        "[kafka.security]\nprotocol = \"sasl_ssl\"\nca_file = \"{ca}\"\nmechanism = \"{mechanism}\"\nusername = \"{user}\"\npassword = \"{user}-secret\""
    )
}

/// Topics of a principal's run (see [`topics_on`]) and a group of its own: `user` (SASL over
/// TLS with `mechanism`) may read the source and the group and write the Kafka sink's topic,
/// and the dead-letter topic only `with_dead_letters`. Returns once the principal sees them.
async fn granted_topics(
    broker: &ApacheKafka,
    ca: &str,
    (user, mechanism): (&str, &str),
    prefix: &str,
    with_dead_letters: bool,
) -> (Kafka, String) {
    let source = topics_on(broker, prefix).await;
    let (errors, dlq) = (
        format!("{}-errors", source.topic),
        format!("{}-dlq", source.topic),
    );
    let group = unique(prefix);
    allow(broker, user, &["Read"], &[&source.topic], &[&group]);
    let mut writes = vec![errors.as_str()];
    if with_dead_letters {
        writes.push(dlq.as_str());
    }
    allow(broker, user, &["Write"], &writes, &[]);
    let mut visible = vec![source.topic.as_str()];
    visible.extend(&writes);
    wait_visible(
        &broker.secured_brokers(SASL_SSL),
        &sasl_client(ca, mechanism, user),
        &visible,
    )
    .await;
    (source, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_let_alice_deliver_and_hold_bob_without_the_dead_letter_write_until_granted() {
    let _serial = serial().await;
    let SecuredBroker { kafka: broker, pki } = secured_broker();
    let work = tempfile::tempdir().expect("workdir");
    let brokers = broker.secured_brokers(SASL_SSL);
    let ca = pki.ca_file.display().to_string();

    // alice: Read on the source and her group, Write on the Kafka sink and the dead-letter
    // topic (each implying Describe). Everything delivered and committed.
    let (source, group) =
        granted_topics(broker, &ca, ("alice", "SCRAM-SHA-512"), "acl-alice", true).await;
    let security = sasl_section(&ca, "SCRAM-SHA-512", "alice");
    let ChildConfig { out, config } = child_config(
        work.path(),
        "alice",
        &brokers,
        &group,
        &source.topic,
        &security,
    );
    delivers_everything(&source, &config, &group, &out, &[]).await;

    // bob: the same, except no ACL at all on the dead-letter topic.
    let (source, group) =
        granted_topics(broker, &ca, ("bob", "SCRAM-SHA-256"), "acl-bob", false).await;
    let dlq = format!("{}-dlq", source.topic);
    let produced = source.produce_samples(EVENTS, 0.02, 12).await;
    let end = source.end_offsets();
    // Where each partition's commits must stop: its first malformed record (nothing may be
    // committed past a dead letter that is not parked), or its end if it has none.
    let mut hold = end.clone();
    for (partition, offset) in &produced.malformed {
        let at = &mut hold[*partition as usize];
        *at = (*at).min(*offset);
    }
    assert_ne!(hold, end, "some partition has a malformed record");

    let security = sasl_section(&ca, "SCRAM-SHA-256", "bob");
    let ChildConfig { out, config } = child_config(
        work.path(),
        "bob",
        &brokers,
        &group,
        &source.topic,
        &security,
    );
    // The cluster leaves the topics a principal may not describe out of its metadata, so the
    // check names the dead-letter topic as missing (it cannot tell "not allowed" apart).
    let (code, report) = check_connect(&config, &[]);
    println!("check-config --connect as bob: {report}");
    assert_eq!(code, Some(4), "check-config --connect as bob: {report}");
    assert!(
        report.contains(&format!("`dead_letter.topic`: topic `{dlq}`")),
        "{report}"
    );

    let log = out.with_extension("log");
    let mut child = Logbridge::start_with_env(&config, log.clone(), &[]);
    let says_why = wait_for(Duration::from_secs(60), || async {
        let (status, body) = readyz(&child).await;
        status == 503 && body.contains(&format!("dead-letter topic {dlq} refuses writes"))
    })
    .await;
    let (_, said) = readyz(&child).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        says_why,
        "/readyz does not name the dead-letter topic: {said}\n{text}"
    );
    assert!(
        said.contains("uthorization"),
        "/readyz gives the reason: {said}"
    );
    println!("/readyz as bob without the dead-letter write: {said}");
    let held = wait_for(Duration::from_secs(60), || async {
        source.committed(&group) == hold
    })
    .await;
    assert!(
        held,
        "commits not held at the first malformed records: {:?}, expected {hold:?} (end {end:?})",
        source.committed(&group)
    );
    // However long it lasts: still running, still not ready, nothing committed further.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let committed = source.committed(&group);
        assert!(
            committed.iter().zip(&hold).all(|(done, at)| done <= at),
            "committed past a dead letter that is not parked: {committed:?}, hold {hold:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        child.running(),
        "logbridge exited when its dead letters were refused"
    );
    assert_eq!(readyz(&child).await.0, 503, "ready while dead letters wait");
    assert!(
        source.read_all(&dlq).is_empty(),
        "a dead letter reached the topic bob may not write"
    );

    // Granted the write while it runs: the waiting dead letters are parked and the commits
    // reach the end.
    allow(broker, "bob", &["Write"], &[&dlq], &[]);
    let granted = Instant::now();
    let recovered = wait_for(Duration::from_secs(120), || async {
        source.committed(&group) == end
    })
    .await;
    println!(
        "bob granted the write: committed to the end {:?} later",
        granted.elapsed()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        recovered,
        "not everything committed once granted: {:?} of {end:?}; /readyz: {:?}\n{text}",
        source.committed(&group),
        readyz(&child).await
    );
    let ready = wait_for(Duration::from_secs(30), || async {
        readyz(&child).await == (200, "ready\n".to_string())
    })
    .await;
    assert!(ready, "/readyz once recovered: {:?}", readyz(&child).await);
    let (exit, _) = child.terminate(Duration::from_secs(15));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "exit after SIGTERM");
    where_everything_went(&source, &out, &produced);
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
                "not ready: topic `mistyped` does not exist (or these credentials may not describe it)\n"
                    .to_string(),
            )
    })
    .await;
    assert!(said, "/readyz: {:?}", http_get(address, "/readyz").await);
    let (_, status) = http_get(address, "/status").await;
    assert!(
        status.contains(
            "\"cluster\": \"topic `mistyped` does not exist (or these credentials may not describe it)\""
        ),
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
