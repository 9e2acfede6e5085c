//! The Helm chart (`deploy/helm/logbridge`) checked by real tools, offline: `helm lint --strict`,
//! `helm template` piped to `kubeconform -strict` against JSON schemas of the Kubernetes API
//! (1.34) and of the CRDs it uses (prometheus-operator's ServiceMonitor, PodMonitor and
//! PrometheusRule, KEDA's ScaledObject), and what the rendered objects must say: the config
//! passes `logbridge check-config`, the probes ask `/healthz` and `/readyz`, scaling never
//! passes the partition count, the PrometheusRule carries config/alerts.yml's groups.
//!
//! `scripts/install-k8s-tools.sh` builds the tools and schemas once into a cache folder
//! (2.5 to 4 minutes on a fresh machine, then nothing); `LOGBRIDGE_K8S_TOOLS` names a folder
//! it made, and skips it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_logbridge");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/logbridge");
const DEFAULT_VALUES: &str = "ci/default-values.yaml";
const FULL_VALUES: &str = "ci/full-values.yaml";
/// The API version the schemas were made from (scripts/install-k8s-tools.sh): Helm renders for
/// it (`.Capabilities`, the chart's kubeVersion constraint).
const KUBE_VERSION: &str = "1.34.4";
const RELEASE: &str = "lb";
const NAMESPACE: &str = "logs";
/// What `config/alerts.yml` leaves to Prometheus's external labels and the chart writes in.
const RUNBOOK_PLACEHOLDER: &str = "{{ $externalLabels.runbook_base_url }}";

struct Tools {
    helm: PathBuf,
    kubeconform: PathBuf,
    schemas: PathBuf,
    /// Helm's cache, config and data folders: none of the user's.
    helm_home: tempfile::TempDir,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let dir = match std::env::var_os("LOGBRIDGE_K8S_TOOLS") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-k8s-tools.sh");
                let output = Command::new("bash")
                    .arg(&script)
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("run scripts/install-k8s-tools.sh");
                assert!(
                    output.status.success(),
                    "scripts/install-k8s-tools.sh failed (Go 1.26+ and Python 3 with PyYAML are needed)"
                );
                PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
            }
        };
        let tools = Tools {
            helm: dir.join("bin/helm"),
            kubeconform: dir.join("bin/kubeconform"),
            schemas: dir.join("schemas"),
            helm_home: tempfile::tempdir().expect("a folder for helm"),
        };
        for path in [&tools.helm, &tools.kubeconform, &tools.schemas] {
            assert!(path.exists(), "{} is missing", path.display());
        }
        tools
    })
}

fn helm(args: &[&str]) -> Output {
    let tools = tools();
    let home = tools.helm_home.path();
    Command::new(&tools.helm)
        .args(args)
        .current_dir(CHART)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .output()
        .expect("run helm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm template` of the chart with these values files and `--set` flags: the manifests, or
/// helm's error.
fn render(values: &[&str], sets: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "template",
        RELEASE,
        ".",
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ];
    for file in values {
        args.extend(["--values", file]);
    }
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = helm(&args);
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(text(&output.stderr))
    }
}

fn rendered(values: &[&str], sets: &[&str]) -> String {
    render(values, sets)
        .unwrap_or_else(|error| panic!("helm template {values:?} {sets:?}: {error}"))
}

/// `kubeconform -strict` on the manifests, with the local schemas only: whether they passed,
/// and what it printed.
fn kubeconform(manifests: &str) -> (bool, String) {
    let tools = tools();
    let location = format!(
        "{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        tools.schemas.display()
    );
    let mut child = Command::new(&tools.kubeconform)
        .args(["-strict", "-summary", "-schema-location", &location, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubeconform");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(manifests.as_bytes())
        .expect("write to kubeconform");
    let output = child.wait_with_output().expect("wait for kubeconform");
    let printed = text(&output.stdout) + &text(&output.stderr);
    (output.status.success(), printed)
}

fn assert_valid(manifests: &str) {
    let (ok, printed) = kubeconform(manifests);
    assert!(ok, "kubeconform refused the chart's output:\n{printed}");
    assert!(
        printed.contains("Invalid: 0, Errors: 0, Skipped: 0"),
        "every object checked against a schema:\n{printed}"
    );
}

fn documents(manifests: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(manifests)
        .expect("helm's output is YAML")
        .into_iter()
        .filter(|doc| doc.as_hash().is_some())
        .collect()
}

fn kinds(manifests: &str) -> BTreeSet<String> {
    documents(manifests)
        .iter()
        .filter_map(|doc| doc["kind"].as_str().map(str::to_owned))
        .collect()
}

fn object(manifests: &str, kind: &str) -> Yaml {
    documents(manifests)
        .into_iter()
        .find(|doc| doc["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn has(manifests: &str, kind: &str) -> bool {
    kinds(manifests).contains(kind)
}

/// The logbridge container of the Deployment.
fn container(manifests: &str) -> Yaml {
    let deployment = object(manifests, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .expect("containers");
    containers
        .iter()
        .find(|c| c["name"].as_str() == Some("logbridge"))
        .expect("a container named logbridge")
        .clone()
}

/// A YAML value as JSON, whose maps compare without regard to key order (Helm's toYaml sorts
/// keys; config/alerts.yml does not).
fn json(yaml: &Yaml) -> serde_json::Value {
    use serde_json::Value;
    match yaml {
        Yaml::Real(real) => real
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Yaml::Integer(int) => Value::from(*int),
        Yaml::String(string) => Value::from(string.as_str()),
        Yaml::Boolean(boolean) => Value::from(*boolean),
        Yaml::Array(items) => Value::Array(items.iter().map(json).collect()),
        Yaml::Hash(hash) => Value::Object(
            hash.iter()
                .map(|(key, value)| {
                    let key = match key {
                        Yaml::String(string) => string.clone(),
                        other => format!("{other:?}"),
                    };
                    (key, json(value))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

#[test]
fn chart_lints_strictly() {
    for values in [DEFAULT_VALUES, FULL_VALUES] {
        let output = helm(&["lint", "--strict", ".", "--values", values]);
        assert!(
            output.status.success(),
            "helm lint --strict --values {values}:\n{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }
}

#[test]
fn defaults_render_valid_kubernetes_objects() {
    let manifests = rendered(&[DEFAULT_VALUES], &[]);
    assert_valid(&manifests);
    let kinds = kinds(&manifests);
    for kind in [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    for kind in [
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
        "ServiceMonitor",
    ] {
        assert!(!kinds.contains(kind), "{kind} is off by default");
    }
    let deployment = object(&manifests, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    let pdb = object(&manifests, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
}

#[test]
fn everything_enabled_renders_valid_objects_and_custom_resources() {
    let manifests = rendered(&[FULL_VALUES], &[]);
    assert_valid(&manifests);
    let kinds = kinds(&manifests);
    for kind in [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }

    // The same with a PodMonitor in place of the ServiceMonitor.
    let manifests = rendered(&[FULL_VALUES], &["monitoring.kind=PodMonitor"]);
    assert_valid(&manifests);
    assert!(has(&manifests, "PodMonitor"));
    assert!(!has(&manifests, "ServiceMonitor"));
    let monitor = object(&manifests, "PodMonitor");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("http"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

    // Secrets are referenced, never rendered.
    assert!(!has(&manifests, "Secret"));
    let env = container(&manifests)["env"].clone();
    let password = env
        .as_vec()
        .expect("env")
        .iter()
        .find(|var| var["name"].as_str() == Some("KAFKA_PASSWORD"))
        .expect("KAFKA_PASSWORD from a Secret")
        .clone();
    let reference = &password["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["name"].as_str(), Some("kafka-credentials"));
    assert_eq!(reference["key"].as_str(), Some("password"));
}

/// The check can fail: an unknown field, a wrong type or a misspelt value is refused, by the
/// Kubernetes schemas or by the chart's values.schema.json.
#[test]
fn validation_rejects_what_kubernetes_or_the_chart_would() {
    // An unknown pod field, passed through a free-form value.
    let manifests = rendered(&[DEFAULT_VALUES], &["podSecurityContext.runAsUsr=1000"]);
    let (ok, printed) = kubeconform(&manifests);
    assert!(!ok, "an unknown pod field passed:\n{printed}");
    assert!(
        printed.contains("runAsUsr") && printed.contains("Invalid: 1"),
        "{printed}"
    );

    // A wrong type: a memory request that is a mapping.
    let manifests = rendered(&[DEFAULT_VALUES], &["resources.requests.memory.size=1"]);
    let (ok, printed) = kubeconform(&manifests);
    assert!(!ok, "a mapping as a quantity passed:\n{printed}");
    assert!(printed.contains("/resources/requests/memory"), "{printed}");

    // An unknown field in a custom resource's spec (the ServiceMonitor's endpoint, via an
    // extra interval that is a number).
    let manifests = rendered(&[FULL_VALUES], &[]).replace(
        "      path: /metrics\n",
        "      path: /metrics\n      scrapeEvery: 30s\n",
    );
    let (ok, printed) = kubeconform(&manifests);
    assert!(!ok, "an unknown ServiceMonitor field passed:\n{printed}");
    assert!(printed.contains("scrapeEvery"), "{printed}");

    // The chart's own values schema: a wrong type, a misspelt key.
    let error = render(&[DEFAULT_VALUES], &["replicas=two"]).expect_err("replicas=two");
    assert!(
        error.contains("/replicas") && error.contains("want integer"),
        "{error}"
    );
    let error = render(&[DEFAULT_VALUES], &["replica=3"]).expect_err("a misspelt key");
    assert!(error.contains("replica"), "{error}");
    let error = render(&[], &[]).expect_err("no brokers");
    assert!(
        error.contains("config.kafka.brokers is required"),
        "{error}"
    );
}

#[test]
fn scaling_never_passes_the_partition_count() {
    let error = render(&[FULL_VALUES], &["partitions=6", "keda.maxReplicas=8"])
        .expect_err("maxReplicas above partitions");
    assert!(
        error.contains("keda.maxReplicas (8) is more than partitions (6)"),
        "{error}"
    );
    let error = render(&[FULL_VALUES], &["partitions=null"]).expect_err("KEDA without partitions");
    assert!(error.contains("keda.enabled needs partitions"), "{error}");
    let error = render(&[DEFAULT_VALUES], &["partitions=3", "replicas=4"])
        .expect_err("replicas above partitions");
    assert!(
        error.contains("replicas (4) is more than partitions (3)"),
        "{error}"
    );

    let manifests = rendered(&[FULL_VALUES], &["partitions=6", "keda.maxReplicas=6"]);
    assert_valid(&manifests);
    let scaled = object(&manifests, "ScaledObject");
    let spec = &scaled["spec"];
    assert_eq!(spec["maxReplicaCount"].as_i64(), Some(6));
    assert_eq!(spec["minReplicaCount"].as_i64(), Some(2));
    assert_eq!(
        spec["scaleTargetRef"]["name"].as_str(),
        Some("lb-logbridge")
    );
    let triggers = spec["triggers"].as_vec().expect("triggers");
    let topics: Vec<_> = triggers
        .iter()
        .map(|trigger| trigger["metadata"]["topic"].as_str().expect("topic"))
        .collect();
    assert_eq!(topics, ["logs", "audit"], "one trigger per topic");
    for trigger in triggers {
        assert_eq!(trigger["type"].as_str(), Some("kafka"));
        let metadata = &trigger["metadata"];
        assert_eq!(
            metadata["bootstrapServers"].as_str(),
            Some("kafka-0.kafka:9093,kafka-1.kafka:9093")
        );
        assert_eq!(metadata["consumerGroup"].as_str(), Some("logbridge-prod"));
        assert_eq!(metadata["lagThreshold"].as_str(), Some("5000"));
        assert_eq!(metadata["allowIdleConsumers"].as_str(), Some("false"));
        assert_eq!(
            trigger["authenticationRef"]["name"].as_str(),
            Some("logbridge-kafka")
        );
    }
    // The HorizontalPodAutoscaler owns the replica count.
    let deployment = object(&manifests, "Deployment");
    assert!(deployment["spec"]["replicas"].is_badvalue());

    // KEDA's scaler takes names only: with a pattern among the topics, one trigger without a
    // topic (the lag of every topic the group commits to).
    let manifests = rendered(
        &[FULL_VALUES],
        &[
            "partitions=6",
            "keda.maxReplicas=6",
            "config.kafka.topics={audit,^logs-.*}",
        ],
    );
    assert_valid(&manifests);
    let triggers = object(&manifests, "ScaledObject")["spec"]["triggers"]
        .as_vec()
        .expect("triggers")
        .clone();
    assert_eq!(triggers.len(), 1, "one trigger for a pattern");
    assert!(triggers[0]["metadata"]["topic"].is_badvalue(), "no topic");
    assert_eq!(
        triggers[0]["metadata"]["consumerGroup"].as_str(),
        Some("logbridge-prod")
    );
}

/// The ConfigMap's TOML is a configuration logbridge accepts, rendered from a mapping (the
/// defaults, everything enabled) or passed whole as a string.
#[test]
fn config_map_passes_check_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let docker_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/docker.toml");
    let docker_toml = docker_toml.to_str().expect("a UTF-8 path");
    let cases: [(&str, &[&str], &[&str]); 3] = [
        ("defaults", &[DEFAULT_VALUES], &[]),
        ("everything", &[FULL_VALUES], &[]),
        ("string", &[], &[]),
    ];
    for (name, values, sets) in cases {
        let manifests = if name == "string" {
            let output = helm(&[
                "template",
                RELEASE,
                ".",
                "--kube-version",
                KUBE_VERSION,
                "--set-file",
                &format!("config={docker_toml}"),
            ]);
            assert!(output.status.success(), "{}", text(&output.stderr));
            text(&output.stdout)
        } else {
            rendered(values, sets)
        };
        let config_map = object(&manifests, "ConfigMap");
        let toml = config_map["data"]["logbridge.toml"]
            .as_str()
            .expect("data.logbridge.toml");
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml).expect("write the config");
        let output = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&file)
            // What the Secrets would give (ci/full-values.yaml's secretEnv).
            .env("KAFKA_USERNAME", "logbridge")
            .env("KAFKA_PASSWORD", "a-password")
            .env("LOGBRIDGE_ADMIN_TOKEN", "an-admin-token-of-16-or-more")
            .output()
            .expect("run logbridge check-config");
        assert!(
            output.status.success(),
            "{name}: check-config refused\n{toml}\n{}",
            text(&output.stderr)
        );
        // The pods roll when the configuration changes.
        let deployment = object(&manifests, "Deployment");
        assert!(
            deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                .as_str()
                .is_some_and(|sum| sum.len() == 64)
        );
    }
    let manifests = rendered(&[FULL_VALUES], &[]);
    let toml = object(&manifests, "ConfigMap")["data"]["logbridge.toml"]
        .as_str()
        .expect("toml")
        .to_owned();
    // Integers stay integers (Helm's own toToml would write 2048.0) and dotted librdkafka keys
    // are quoted.
    assert!(toml.contains("router_capacity = 2048\n"), "{toml}");
    assert!(toml.contains("\"session.timeout.ms\" = 45000\n"), "{toml}");
}

#[test]
fn pod_probes_ports_and_security() {
    let manifests = rendered(&[DEFAULT_VALUES], &[]);
    let container = container(&manifests);
    let port = &container["ports"][0];
    assert_eq!(port["name"].as_str(), Some("http"));
    assert_eq!(port["containerPort"].as_i64(), Some(9898));
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("http"), "{probe}");
    }
    let args: Vec<_> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "--log-format",
            "json",
            "run",
            "--config",
            "/etc/logbridge/logbridge.toml"
        ]
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let deployment = object(&manifests, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // Longer than the default drain_timeout_ms (5 s).
    assert!(pod["terminationGracePeriodSeconds"].as_i64() > Some(5));
    // The memory request from the measured bound (values.yaml says how).
    assert_eq!(
        container["resources"]["requests"]["memory"].as_str(),
        Some("192Mi")
    );
    let service = object(&manifests, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"].as_i64(), Some(9898));

    // A grace period that does not outlast the drain fails.
    let error = render(&[FULL_VALUES], &["terminationGracePeriodSeconds=10"])
        .expect_err("grace period = drain_timeout_ms");
    assert!(
        error.contains("terminationGracePeriodSeconds (10 s) must be longer"),
        "{error}"
    );
    // A listen address off the chart's port fails.
    let error = render(&[DEFAULT_VALUES], &["config.http.listen=0.0.0.0:9000"])
        .expect_err("listen off port");
    assert!(error.contains("config.http.listen"), "{error}");
}

/// The PrometheusRule's groups are config/alerts.yml's, with the runbook's base URL written
/// in: a change to one without the other fails here.
#[test]
fn prometheus_rule_carries_the_groups_of_alerts_yml() {
    let alerts =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml"))
            .expect("config/alerts.yml");
    let default_base = format!("http://{RELEASE}-logbridge.{NAMESPACE}.svc:9898/runbook");
    let custom_base = "https://runbooks.example.com/logbridge";
    for (sets, base) in [
        (vec![], default_base.as_str()),
        (
            vec![format!("monitoring.runbookBaseUrl={custom_base}")],
            custom_base,
        ),
    ] {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let manifests = rendered(&[FULL_VALUES], &sets);
        let rule = object(&manifests, "PrometheusRule");
        let expected = YamlLoader::load_from_str(&alerts.replace(RUNBOOK_PLACEHOLDER, base))
            .expect("config/alerts.yml is YAML");
        let expected = json(&expected[0]["groups"]);
        let actual = json(&rule["spec"]["groups"]);
        assert!(expected.as_array().is_some_and(|groups| !groups.is_empty()));
        assert_eq!(
            actual, expected,
            "the PrometheusRule's groups differ from config/alerts.yml's"
        );
        let printed = actual.to_string();
        assert!(!printed.contains("$externalLabels"), "{printed}");
        if alerts.contains(RUNBOOK_PLACEHOLDER) {
            assert!(
                printed.contains(&format!("{base}#")),
                "runbook_url under {base}"
            );
        }
    }
}
