//! Avro and Protobuf behind a real Schema Registry, on Apache Kafka (this binary's shared
//! broker): Apicurio Registry (its Confluent-compatible API; it keeps its schemas in Kafka
//! topics of the same broker, so they survive its restarts), with records serialized by
//! confluent-kafka's Python serializers (`tests/data/sr_serialize.py`), both installed by
//! `scripts/install-schema-registry.sh`.
//!
//! - Avro records (schema registered through the REST API), Protobuf records (registered by
//!   the Python serializer, as a base64 descriptor) and Protobuf records of a schema registered
//!   as source with a reference to another subject's file, in one topic, are routed by the level their
//!   decoded fields hold; file routes write the decoded event as JSON, the Kafka route forwards
//!   the original bytes; an unknown schema id and a payload that does not match its schema are
//!   dead-lettered with their reasons;
//! - the registry stopped mid-run, records of a schema id not fetched yet produced then: they
//!   wait, nothing is committed past them, `/readyz` says why, nothing is dead-lettered; the
//!   pipeline restarted while the registry is still down (no schema kept) waits the same way
//!   and, its small channels full, pauses its partitions (backpressure),
//!   and a second instance joining the group (a rebalance while both wait) too; the registry
//!   started again: every record is delivered once, by one of the two, and committed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Events of each kind: Avro before the outage, Protobuf before it, Avro of a second schema
/// produced while the registry is down.
const AVRO: u64 = 150;
const PROTOBUF: u64 = 150;
const DURING: u64 = 120;

const AVRO_SCHEMA: &str = r#"{"type":"record","name":"LogEvent","namespace":"dev.logbridge.test",
  "fields":[{"name":"id","type":"long"},{"name":"level","type":"string"},
  {"name":"service","type":["null","string"],"default":null},{"name":"message","type":"string"}]}"#;

const AVRO_REGION_SCHEMA: &str = r#"{"type":"record","name":"LogEvent","namespace":"dev.logbridge.test",
  "fields":[{"name":"id","type":"long"},{"name":"level","type":"string"},
  {"name":"service","type":["null","string"],"default":null},{"name":"message","type":"string"},
  {"name":"region","type":"string","default":"none"}]}"#;

/// Records of the Protobuf schema registered as source with a reference.
const AUDIT: u64 = 30;

const COMMON_PROTO: &str = "syntax = \"proto3\";\npackage logbridge.common;\n\
    message Origin { string service = 1; string region = 2; }\n";

const AUDIT_PROTO: &str = "syntax = \"proto3\";\npackage logbridge.test;\n\
    import \"logbridge/common.proto\";\n\
    message Other { string x = 1; }\n\
    message Audit { string level = 1; int64 id = 2; string message = 3; \
    logbridge.common.Origin origin = 4; }\n";

/// Records of `Audit` (the file's second message: indexes [1]) under schema `id`, ids 30 000
/// on, encoded with the schemas compiled here (protox, prost-reflect).
fn audit_records(id: u32) -> Vec<(Option<String>, Vec<u8>)> {
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value};
    let dir = tempfile::tempdir().expect("proto dir");
    std::fs::create_dir_all(dir.path().join("logbridge")).expect("dir");
    std::fs::write(dir.path().join("logbridge/common.proto"), COMMON_PROTO).expect("write");
    std::fs::write(dir.path().join("audit.proto"), AUDIT_PROTO).expect("write");
    let files = protox::compile(["audit.proto"], [dir.path()]).expect("compiles");
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(files).expect("a pool");
    let audit = pool
        .get_message_by_name("logbridge.test.Audit")
        .expect("Audit");
    let origin = pool
        .get_message_by_name("logbridge.common.Origin")
        .expect("Origin");
    (30_000..30_000 + AUDIT)
        .map(|n| {
            let mut from = DynamicMessage::new(origin.clone());
            from.set_field_by_name("service", Value::String("ledger".into()));
            from.set_field_by_name("region", Value::String("eu-2".into()));
            let mut message = DynamicMessage::new(audit.clone());
            message.set_field_by_name("level", Value::String(level_of(n).into()));
            message.set_field_by_name("id", Value::I64(n as i64));
            message.set_field_by_name("message", Value::String(format!("audit {n}")));
            message.set_field_by_name("origin", Value::Message(from));
            let mut value = vec![0];
            value.extend_from_slice(&id.to_be_bytes());
            value.extend_from_slice(&[0x02, 0x02]);
            value.extend(message.encode_to_vec());
            (Some(format!("key-{}", n % 7)), value)
        })
        .collect()
}

/// The registry's jar and the Python client's bin folder (scripts/test.sh exports them; else
/// the install script is run).
fn tools() -> (PathBuf, PathBuf) {
    if let (Some(jar), Some(bin)) = (
        std::env::var_os("LOGBRIDGE_SCHEMA_REGISTRY"),
        std::env::var_os("LOGBRIDGE_SR_CLIENT"),
    ) {
        return (jar.into(), bin.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-schema-registry.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/install-schema-registry.sh");
    assert!(output.status.success(), "install-schema-registry.sh failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let jar = lines.next().expect("the registry's jar").into();
    let bin = lines.next().expect("the client's bin folder").into();
    (jar, bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Apicurio Registry on loopback, its schemas in the test broker's Kafka topics.
struct Registry {
    child: Option<Child>,
    jar: PathBuf,
    brokers: String,
    port: u16,
    management: u16,
    log: PathBuf,
}

impl Registry {
    async fn start(jar: &Path, brokers: &str, log: PathBuf) -> Registry {
        let mut registry = Registry {
            child: None,
            jar: jar.to_path_buf(),
            brokers: brokers.to_string(),
            port: free_port(),
            management: free_port(),
            log,
        };
        registry.launch().await;
        registry
    }

    /// The Confluent-compatible API's base URL.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/apis/ccompat/v7", self.port)
    }

    async fn launch(&mut self) {
        let java = self
            .jar
            .parent()
            .and_then(Path::parent)
            .expect("the registry's folder")
            .join("bin/java");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("registry log");
        let child = Command::new(java)
            .args([
                "-Xms64m",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-XX:-UsePerfData",
                "-Djava.awt.headless=true",
                "-Dquarkus.http.host=127.0.0.1",
                &format!("-Dquarkus.http.port={}", self.port),
                "-Dquarkus.management.host=127.0.0.1",
                &format!("-Dquarkus.management.port={}", self.management),
                "-Dapicurio.storage.kind=kafkasql",
                &format!("-Dapicurio.kafkasql.bootstrap.servers={}", self.brokers),
                "-Dapicurio.kafkasql.consumer.poll.timeout=100",
                "-jar",
            ])
            .arg(&self.jar)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the registry");
        self.child = Some(child);
        let client = reqwest::Client::new();
        let subjects = format!("{}/subjects", self.url());
        let up = wait_for(Duration::from_secs(120), || {
            let request = client.get(&subjects).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        assert!(
            up,
            "the registry did not start: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGTERM, and wait for it to end (SIGKILL after 30 s).
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            common::process::terminate(child, Duration::from_secs(30));
        }
    }

    /// Registers `schema` (Avro) under `subject` through the REST API; its id.
    async fn register(&self, subject: &str, schema: &str) -> u64 {
        self.register_with(subject, serde_json::json!({ "schema": schema }))
            .await
    }

    /// Registers the schema `body` describes (`schema`, `schemaType`, `references`) under
    /// `subject`; its id.
    async fn register_with(&self, subject: &str, body: serde_json::Value) -> u64 {
        let answer = reqwest::Client::new()
            .post(format!("{}/subjects/{subject}/versions", self.url()))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string())
            .send()
            .await
            .expect("register")
            .bytes()
            .await
            .expect("the registry's answer");
        let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
        answer["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no id in {answer}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Events serialized by confluent-kafka's serializers through `registry`: (key, value) each.
fn serialize(
    bin: &Path,
    registry: &Registry,
    subject_topic: &str,
    form: &str,
    first: u64,
    count: u64,
) -> Vec<(Option<String>, Vec<u8>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sr_serialize.py");
    let mut child = Command::new(bin.join("python"))
        .arg(script)
        .args([
            &registry.url(),
            subject_topic,
            form,
            &first.to_string(),
            &count.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sr_serialize.py");
    // The client has been seen to hang on a request the server answered: bounded here.
    let started = Instant::now();
    while child.try_wait().expect("poll python").is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("sr_serialize.py {form} did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "sr_serialize.py {form} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let (key, hex) = line.split_once('\t').expect("key, tab, value");
            let value = (0..hex.len())
                .step_by(2)
                .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
                .collect();
            (Some(key.to_string()), value)
        })
        .collect()
}

/// Waits until `/readyz` at `address` answers 503 naming the schema registry; panics with
/// its last answer (`what`) if it does not within `deadline`.
async fn says_it_waits_for_the_registry(
    address: std::net::SocketAddr,
    deadline: Duration,
    what: &str,
) {
    let told = wait_for(deadline, || async move {
        let (status, body) = http_get(address, "/readyz").await;
        status == 503 && body.contains("schema registry")
    })
    .await;
    let said = http_get(address, "/readyz").await.1;
    assert!(told, "{what}: {said}");
}

fn level_of(id: u64) -> &'static str {
    ["error", "warning", "info"][(id % 3) as usize]
}

/// The events of a file route by id, each checked to be once there.
fn file_events(path: &Path) -> BTreeMap<u64, serde_json::Value> {
    let mut events = BTreeMap::new();
    if !path.exists() {
        return events;
    }
    for line in read_lines(&[path.to_path_buf()]) {
        let event = line["event"].clone();
        let id = event["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("an id in {line}"));
        assert!(
            events.insert(id, event).is_none(),
            "id {id} twice in {path:?}"
        );
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_protobuf_are_routed_by_their_fields_and_wait_out_a_registry_outage() {
    let _serial = serial().await;
    let (jar, bin) = tools();
    let source = Kafka::shared("sr-in", 3).await;
    let dead = unique("sr-dlq");
    let forwarded = unique("sr-warnings");
    source.create_external_topic(&dead, 1).await;
    source.create_external_topic(&forwarded, 1).await;
    let logs = tempfile::tempdir().expect("log dir");
    let mut registry =
        Registry::start(&jar, &source.brokers, logs.path().join("registry.log")).await;

    // Schemas through the REST API; the Protobuf one is registered by the serializer.
    let avro_subject = unique("sr-avro");
    let region_subject = unique("sr-region");
    let avro_id = registry
        .register(&format!("{avro_subject}-value"), AVRO_SCHEMA)
        .await;
    let region_id = registry
        .register(&format!("{region_subject}-value"), AVRO_REGION_SCHEMA)
        .await;
    assert_ne!(avro_id, region_id);
    // A Protobuf schema as .proto source with a reference (an import of another subject's
    // file), both through the REST API; its records are encoded here.
    let common_subject = unique("sr-common");
    registry
        .register_with(
            &common_subject,
            serde_json::json!({"schemaType": "PROTOBUF", "schema": COMMON_PROTO}),
        )
        .await;
    let audit_id = registry
        .register_with(
            &format!("{}-value", unique("sr-audit")),
            serde_json::json!({"schemaType": "PROTOBUF", "schema": AUDIT_PROTO,
                "references": [{"name": "logbridge/common.proto",
                    "subject": common_subject, "version": 1}]}),
        )
        .await;
    let audit = audit_records(audit_id as u32);
    let avro = serialize(&bin, &registry, &avro_subject, "avro", 0, AVRO);
    let protobuf = serialize(
        &bin,
        &registry,
        &unique("sr-proto"),
        "protobuf",
        10_000,
        PROTOBUF,
    );
    // Serialized now, produced while the registry is down: a schema id logbridge has not seen.
    let during = serialize(
        &bin,
        &registry,
        &region_subject,
        "avro-region",
        20_000,
        DURING,
    );
    assert_eq!(&during[0].1[1..5], &(region_id as u32).to_be_bytes());
    assert_eq!(protobuf[0].1[0], 0, "the wire format's magic byte");

    // The records' fault: an id the registry does not have, a body its schema does not read.
    let mut bad: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    bad.push((Some("bad".into()), vec![0, 0x7f, 0xff, 0xff, 0xf0, 2, 4, 6]));
    let mut cut = avro[1].1.clone();
    cut.truncate(cut.len() - 3);
    bad.push((Some("bad".into()), cut));

    let dir = tempfile::tempdir().expect("out dir");
    let other_dir = tempfile::tempdir().expect("out dir");
    let url = registry.url();
    let routes = |dir: &Path| {
        let file = |route: &str| dir.join(format!("{route}.jsonl"));
        format!(
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nsink = {{ type = \"file\", path = \"{errors}\" }}\n\
         [[routes]]\nname = \"warnings\"\nlevels = [\"warning\"]\nsink = {{ type = \"kafka\", topic = \"{forwarded}\" }}\n\
         [[routes]]\nname = \"info\"\nlevels = [\"info\"]\nworkers = 2\nsink = {{ type = \"file\", path = \"{info}\" }}\n\
         [dead_letter]\ntopic = \"{dead}\"\n\
         [input]\nformat = \"auto\"\n\
         [input.schema_registry]\nurl = \"{url}\"\ntimeout_ms = 2000\n",
        errors = file("errors").display(),
        info = file("info").display(),
    )
    };
    let group = unique("sr-group");
    let metrics = std::sync::Arc::new(logbridge::metrics::Metrics::new());
    let options = || logbridge::RunOptions {
        metrics: metrics.clone(),
        ..logbridge::RunOptions::default()
    };
    // Small channels: the records waiting for the registry fill them, and the consumer pauses
    // its partitions (backpressure) while the group rebalances around it.
    let small = "router_capacity = 32\nworker_capacity = 8";
    let config = || source.config(&group, small, &routes(dir.path()));
    let (pipeline, address) = Running::start_serving(config(), options()).await;

    let mut first: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    for (a, p) in avro.iter().zip(&protobuf) {
        first.push(a.clone());
        first.push(p.clone());
    }
    first.extend(audit.iter().cloned());
    first.extend(bad.iter().cloned());
    let placed = source.produce(&first).await;
    let bad_places: Vec<(i32, i64)> = placed[placed.len() - 2..].to_vec();
    let end = source.end_offsets();
    assert!(
        source
            .wait_committed_to(&group, &end, Duration::from_secs(90))
            .await,
        "commits reached {end:?} before the outage: {:?}",
        source.committed(&group)
    );
    let (status, body) = http_get(address, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // The outage: the registry stops, records of a schema id not fetched yet arrive.
    tokio::task::block_in_place(|| registry.stop());
    let before = source.committed(&group);
    source.produce(&during[..DURING as usize / 2]).await;
    says_it_waits_for_the_registry(
        address,
        Duration::from_secs(20),
        "/readyz during the outage",
    )
    .await;
    // Held: nothing committed past what was there, nothing dead-lettered, for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        source.committed(&group),
        before,
        "commits moved during the outage"
    );
    let failed = logbridge::metrics::schema_registry_requests()
        .with_label_values(&["failed"])
        .get();
    assert!(failed > 0, "no failed request counted");

    // Restarted while the registry is still down: no schema kept, the same wait.
    let backpressure = || metrics.pauses.with_label_values(&["backpressure"]).get();
    let pauses_before = backpressure();
    let abandoned = pipeline.stop_abandoning().await;
    source.produce(&during[DURING as usize / 2..]).await;
    let (pipeline, address) = Running::start_serving(config(), options()).await;
    says_it_waits_for_the_registry(
        address,
        Duration::from_secs(30),
        "/readyz after a restart during the outage",
    )
    .await;
    let paused = wait_for(Duration::from_secs(30), || async move {
        backpressure() > pauses_before
    })
    .await;
    assert!(
        paused,
        "the consumer never paused behind the waiting router"
    );
    assert_eq!(
        source.committed(&group),
        before,
        "commits moved during the outage"
    );

    // A second instance joins the group meanwhile: the partitions are shared out again while
    // both wait (a batch waiting for the registry drops its revoked records).
    let other_metrics = std::sync::Arc::new(logbridge::metrics::Metrics::new());
    let (other, other_address) = Running::start_serving(
        source.config(&group, small, &routes(other_dir.path())),
        logbridge::RunOptions {
            metrics: other_metrics.clone(),
            ..logbridge::RunOptions::default()
        },
    )
    .await;
    says_it_waits_for_the_registry(
        other_address,
        Duration::from_secs(60),
        "/readyz of the second instance during the outage",
    )
    .await;
    assert_eq!(
        source.committed(&group),
        before,
        "commits moved during the outage"
    );

    // The registry back: everything flows.
    registry.launch().await;
    let end = source.end_offsets();
    assert!(
        source
            .wait_committed_to(&group, &end, Duration::from_secs(90))
            .await,
        "commits reached {end:?} after the outage: {:?}",
        source.committed(&group)
    );
    for address in [address, other_address] {
        let (status, body) = http_get(address, "/readyz").await;
        assert!(!body.contains("schema registry"), "{body}");
        assert!(status == 200, "{body}");
    }
    pipeline.stop().await;
    other.stop().await;
    let processed = |metrics: &logbridge::metrics::Metrics| -> u64 {
        ["errors", "warnings", "info"]
            .iter()
            .map(|route| {
                metrics
                    .finished
                    .with_label_values(&[route, "processed"])
                    .get()
            })
            .sum()
    };
    let by_other = processed(&other_metrics);
    assert!(by_other > 0, "the second instance delivered nothing");

    // Every event once, on its level's route, as the JSON its fields make.
    let mut expected: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for id in (0..AVRO)
        .chain(10_000..10_000 + PROTOBUF)
        .chain(20_000..20_000 + DURING)
        .chain(30_000..30_000 + AUDIT)
    {
        expected.entry(level_of(id)).or_default().insert(id);
    }
    let both = |route: &str| {
        let mut events = file_events(&dir.path().join(format!("{route}.jsonl")));
        for (id, event) in file_events(&other_dir.path().join(format!("{route}.jsonl"))) {
            assert!(
                events.insert(id, event).is_none(),
                "{route}: id {id} from both instances"
            );
        }
        events
    };
    let errors = both("errors");
    let info = both("info");
    assert_eq!(
        errors.keys().copied().collect::<BTreeSet<_>>(),
        expected["error"],
        "errors"
    );
    assert_eq!(
        info.keys().copied().collect::<BTreeSet<_>>(),
        expected["info"],
        "info"
    );
    assert_eq!(
        errors[&0],
        serde_json::json!({"id": 0, "level": "error", "service": null,
            "message": "request 0 done"})
    );
    assert_eq!(
        errors[&3],
        serde_json::json!({"id": 3, "level": "error", "service": "checkout",
            "message": "request 3 done"})
    );
    assert_eq!(info[&20_000]["region"], "eu-1", "the second schema's field");
    // Protobuf: fields by their .proto names, enums by name, the default enum value (INFO = 0)
    // present, the Timestamp in its JSON form.
    let at = chrono::DateTime::from_timestamp(1_796_000_000 + 10_001, 0)
        .expect("a time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert_eq!(
        info[&10_001],
        serde_json::json!({"id": 10_001, "level": "INFO", "message": "request 10001 done",
            "origin": {"service": "payments", "pid": 4242}, "at": at})
    );
    assert_eq!(errors[&10_002]["level"], "ERROR");
    // The referenced file's message, inside the second message of the file ([1]).
    assert_eq!(
        errors[&30_000],
        serde_json::json!({"level": "error", "id": 30_000, "message": "audit 30000",
            "origin": {"service": "ledger", "region": "eu-2"}})
    );
    // The Kafka route forwards the original bytes, prefix and all.
    let originals: BTreeMap<Vec<u8>, u64> = avro
        .iter()
        .zip(0..)
        .chain(protobuf.iter().zip(10_000..))
        .chain(during.iter().zip(20_000..))
        .chain(audit.iter().zip(30_000..))
        .map(|((_, value), id)| (value.clone(), id))
        .collect();
    let mut warnings = BTreeSet::new();
    for record in source.read_all(&forwarded) {
        let value = record.payload.expect("a value");
        let id = *originals
            .get(&value)
            .unwrap_or_else(|| panic!("a forwarded value that was not produced: {value:?}"));
        assert!(warnings.insert(id), "warning {id} twice");
    }
    assert_eq!(warnings, expected["warning"]);

    // The two bad records, and nothing else, dead-lettered.
    let letters = source.read_all(&dead);
    let mut reasons: Vec<((i32, i64), String)> = letters
        .iter()
        .map(|letter| {
            let place = letter.source();
            (
                place,
                letter.header("logbridge.error.reason").unwrap_or_default(),
            )
        })
        .collect();
    reasons.sort();
    let mut want = vec![
        (bad_places[0], "unknown_schema".to_string()),
        (bad_places[1], "schema_mismatch".to_string()),
    ];
    want.sort();
    assert_eq!(reasons, want, "{letters:?}");
    eprintln!(
        "schema registry: {} events delivered ({by_other} by the instance that joined during \
         the outage), 2 dead-lettered, {failed}+ failed requests during the outage, {abandoned} \
         records given up at the restart, {} backpressure pauses ({pauses_before} before it)",
        expected.values().map(BTreeSet::len).sum::<usize>(),
        backpressure()
    );
}
