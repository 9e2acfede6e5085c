//! docker-compose.yml, validated without a Docker engine (none runs here): the YAML parses, the
//! services users are promised exist, every file it mounts or builds from exists, the logbridge
//! config it mounts passes `logbridge check-config`, the Prometheus config passes
//! `promtool check config` and scrapes the port logbridge listens on, and the Dockerfile copies
//! only what exists.

use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut documents = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(documents.len(), 1, "{path}: one YAML document");
    documents.remove(0)
}

fn strings(yaml: &Yaml) -> Vec<String> {
    match yaml {
        Yaml::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        Yaml::String(text) => vec![text.clone()],
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_is_consistent_with_the_repository() {
    let compose = load("docker-compose.yml");
    let services = &compose["services"];
    for name in [
        "kafka",
        "create-topics",
        "logbridge",
        "prometheus",
        "alertmanager",
        "produce",
    ] {
        assert!(!services[name].is_badvalue(), "service `{name}` missing");
    }
    assert!(
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .is_some_and(|roles| roles.contains("controller")),
        "Kafka runs in KRaft mode"
    );
    assert_eq!(
        strings(&services["produce"]["profiles"]),
        ["demo"],
        "demo traffic is optional"
    );

    // Every bind mount's host side exists.
    let mut mounted_config = None;
    for (name, service) in services.as_hash().expect("services is a map") {
        let name = name.as_str().unwrap_or("?");
        for volume in strings(&service["volumes"]) {
            let host = volume.split(':').next().unwrap_or("");
            if host.starts_with("./") {
                assert!(
                    Path::new(host).exists(),
                    "{name}: mounted {host} does not exist"
                );
                if name == "logbridge" && host.ends_with(".toml") {
                    mounted_config = Some(host.to_string());
                }
            }
        }
        if let Some(context) = service["build"].as_str() {
            assert!(
                Path::new(context).join("Dockerfile").exists(),
                "{name}: no Dockerfile in {context}"
            );
        }
    }

    // The mounted logbridge config is valid, and logbridge is told to use it.
    let config = mounted_config.expect("logbridge mounts a config file");
    let output = Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .args(["check-config", &config])
        .output()
        .expect("run logbridge check-config");
    assert!(
        output.status.success(),
        "{config}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let command = strings(&services["logbridge"]["command"]);
    let target = Path::new(&config)
        .file_name()
        .and_then(|f| f.to_str())
        .expect("file name");
    assert!(
        command.iter().any(|arg| arg.ends_with(target)),
        "logbridge command uses {target}: {command:?}"
    );

    // Prometheus scrapes the port logbridge listens on, and its config is valid.
    let parsed = logbridge::Config::load(Path::new(&config)).expect("config loads");
    let port = parsed
        .http
        .listen
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let prometheus = load("config/prometheus.yml");
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_vec()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_vec().cloned().unwrap_or_default())
        .flat_map(|config| strings(&config["targets"]))
        .collect();
    assert!(
        targets.contains(&format!("logbridge:{port}")),
        "scrape targets {targets:?}"
    );
    assert!(
        strings(&services["logbridge"]["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{port}"))),
        "metrics port published"
    );
    let promtool = Command::new("promtool")
        .args(["check", "config", "config/prometheus.yml"])
        .output()
        .expect("promtool is installed (scripts/test.sh installs Debian's prometheus package)");
    assert!(
        promtool.status.success(),
        "{}",
        String::from_utf8_lossy(&promtool.stderr)
    );
}

/// Prometheus sends what fires to the compose file's Alertmanager, whose mounted config
/// `amtool check-config` accepts, and sets the base of every alert's runbook_url.
#[test]
fn compose_prometheus_alerts_through_its_alertmanager() {
    let compose = load("docker-compose.yml");
    let alertmanager = &compose["services"]["alertmanager"];
    let mounted: Vec<String> = strings(&alertmanager["volumes"]);
    let config = mounted
        .iter()
        .find_map(|volume| {
            let (host, inside) = volume.split_once(':')?;
            inside
                .starts_with("/etc/alertmanager/alertmanager.yml")
                .then(|| host.to_string())
        })
        .unwrap_or_else(|| panic!("alertmanager mounts its config: {mounted:?}"));
    assert_eq!(config, "./config/alertmanager.yml");
    let amtool = Command::new("amtool")
        .args(["check-config", &config])
        .output()
        .expect("amtool is installed (scripts/test.sh installs Debian's prometheus-alertmanager)");
    assert!(
        amtool.status.success(),
        "{}{}",
        String::from_utf8_lossy(&amtool.stdout),
        String::from_utf8_lossy(&amtool.stderr)
    );
    let port = strings(&alertmanager["ports"])
        .first()
        .and_then(|p| p.rsplit(':').next().map(String::from))
        .expect("alertmanager publishes its port");
    let prometheus = load("config/prometheus.yml");
    let targets: Vec<String> = prometheus["alerting"]["alertmanagers"]
        .as_vec()
        .expect("alerting.alertmanagers")
        .iter()
        .flat_map(|am| am["static_configs"].as_vec().cloned().unwrap_or_default())
        .flat_map(|config| strings(&config["targets"]))
        .collect();
    assert_eq!(targets, [format!("alertmanager:{port}")]);
    let base = prometheus["global"]["external_labels"]["runbook_base_url"]
        .as_str()
        .expect("external label runbook_base_url");
    assert!(base.starts_with("http"), "{base}");
}

/// Users run the Kafka the tests run: every `apache/kafka` image in docker-compose.yml is the
/// version `scripts/install-kafka.sh` installs for the broker tier (scripts/kafka/pom.xml).
#[test]
fn compose_runs_the_kafka_version_the_tests_run() {
    let pom = std::fs::read_to_string("scripts/kafka/pom.xml").expect("scripts/kafka/pom.xml");
    let tested = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .expect("kafka.version in the pom");
    let compose = load("docker-compose.yml");
    let services = compose["services"].as_hash().expect("services is a map");
    let images: Vec<&str> = services
        .values()
        .filter_map(|service| service["image"].as_str())
        .filter(|image| image.starts_with("apache/kafka:"))
        .collect();
    assert!(
        images.len() >= 2,
        "the broker and the topic creation: {images:?}"
    );
    for image in images {
        assert_eq!(
            image,
            format!("apache/kafka:{tested}"),
            "docker-compose.yml runs another Kafka than the tests"
        );
    }
}

#[test]
fn dockerfile_copies_only_what_exists() {
    let dockerfile = std::fs::read_to_string("Dockerfile").expect("Dockerfile");
    assert!(
        dockerfile.matches("FROM ").count() >= 2,
        "multi-stage build"
    );
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(source).exists(),
                "Dockerfile copies missing {source}"
            );
        }
    }
}

/// Every logbridge metric the Grafana dashboard and the alerting rules use exists, and the
/// dashboard is provisioned by the compose file.
#[test]
fn dashboard_and_alerts_use_only_metrics_that_exist() {
    let compose = load("docker-compose.yml");
    let grafana_volumes = strings(&compose["services"]["grafana"]["volumes"]);
    assert!(
        grafana_volumes
            .iter()
            .any(|v| v.starts_with("./config/grafana/dashboards")),
        "{grafana_volumes:?}"
    );
    let dashboard =
        std::fs::read_to_string("config/grafana/dashboards/logbridge.json").expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 6));
    let alerts = std::fs::read_to_string("config/alerts.yml").expect("alerts");
    let defined = std::fs::read_to_string("src/metrics.rs").expect("metrics source");
    let mut used = std::collections::BTreeSet::new();
    for text in [&dashboard, &alerts] {
        let mut rest = text.as_str();
        while let Some(start) = rest.find("logbridge_") {
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            used.insert(name);
        }
    }
    let mut missing = Vec::new();
    for name in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        if !defined.contains(&format!("\"{base}\"")) {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "metrics used but not defined: {missing:?}"
    );
    assert!(used.len() >= 15, "{used:?}");
    // The standard process metrics the dashboard shows are what logbridge exports.
    let exported = logbridge::metrics::Metrics::new().render();
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total"] {
        assert!(dashboard.contains(name), "the dashboard shows {name}");
        assert!(
            exported.contains(&format!("# TYPE {name} ")),
            "{name} is exported"
        );
    }
}

/// The dashboard imports into any Grafana: its data source is a variable (no hard-coded uid),
/// it filters by instance and topic, and it has the panels an operator looks for first.
#[test]
fn dashboard_is_importable_and_filters_by_instance_and_topic() {
    let dashboard =
        std::fs::read_to_string("config/grafana/dashboards/logbridge.json").expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let variables = parsed["templating"]["list"].as_array().expect("variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["instance", "topic"] {
        assert_eq!(variable(name)["type"], "query", "{name}");
        assert_eq!(variable(name)["includeAll"], true, "{name}");
        assert_eq!(
            variable(name)["datasource"]["uid"],
            "${datasource}",
            "{name}"
        );
    }
    let panels = parsed["panels"].as_array().expect("panels");
    let mut titles = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("title");
        titles.push(title.to_lowercase());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: `{expr}` follows the instance variable"
            );
            // Issue 33, item 7: a fixed [1m] window is empty when Prometheus scrapes once a
            // minute; Grafana's $__rate_interval is at least four scrape intervals.
            assert!(
                !expr.contains("[1m]"),
                "{title}: `{expr}` uses [$__rate_interval], not [1m]"
            );
            for topical in [
                "events_consumed",
                "partition_lag",
                "committed_offset",
                "oldest_unfinished",
                "consumed_bytes",
            ] {
                if expr.contains(topical) {
                    assert!(
                        expr.contains("topic=~\"$topic\""),
                        "{title}: `{expr}` follows the topic variable"
                    );
                }
            }
        }
    }
    assert!(
        !dashboard.contains("\"uid\": \"prometheus\""),
        "no hard-coded data source uid"
    );
    for wanted in [
        "failed",
        "decode errors",
        "latency",
        "dead letters",
        "pauses by reason",
        "paused partitions by reason",
    ] {
        assert!(
            titles.iter().any(|title| title.contains(wanted)),
            "a panel for {wanted}: {titles:?}"
        );
    }
}

/// The compose file gives an operator what the first week needs: logbridge's health checked by
/// its own binary (the image has no curl), the dead-letter topic the config names created
/// (auto-creation is off), Kafka reachable from the host, the admin token passed through.
#[test]
fn compose_checks_health_creates_the_dead_letter_topic_and_publishes_kafka() {
    let compose = load("docker-compose.yml");
    let services = &compose["services"];
    let health = strings(&services["logbridge"]["healthcheck"]["test"]);
    assert_eq!(&health[..3], ["CMD", "logbridge", "health"], "{health:?}");
    // The same arguments work on the binary (`health` and its options exist).
    let output = Command::new(env!("CARGO_BIN_EXE_logbridge"))
        .args(&health[2..])
        .args(["--timeout", "1"])
        .output()
        .expect("run logbridge health");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("cannot connect"),
        "with nothing listening, health fails saying why: {stderr}"
    );
    // Issue 33, item 7: Prometheus must watch a logbridge that fails its healthcheck (that is
    // when its alerts matter), so it does not wait for it to be healthy.
    assert!(
        services["prometheus"]["depends_on"]["logbridge"]["condition"].as_str()
            != Some("service_healthy"),
        "{:?}",
        services["prometheus"]["depends_on"]
    );
    let config = logbridge::Config::load(Path::new("config/docker.toml")).expect("config");
    let dead_letter = config
        .dead_letter
        .as_ref()
        .expect("docker.toml has a dead-letter topic");
    let create = strings(&services["create-topics"]["command"]).join(" ");
    for topic in config.kafka.topics.iter().chain([&dead_letter.topic]) {
        assert!(
            create.contains(&format!("--topic {topic} ")),
            "create-topics creates `{topic}`: {create}"
        );
    }
    assert_eq!(
        services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].as_str(),
        Some("false")
    );
    let kafka_env = &services["kafka"]["environment"];
    assert!(
        kafka_env["KAFKA_ADVERTISED_LISTENERS"]
            .as_str()
            .is_some_and(|l| l.contains("HOST://localhost:29092")),
        "Kafka advertises a listener for the host"
    );
    assert!(
        strings(&services["kafka"]["ports"]).contains(&"29092:29092".to_string()),
        "and publishes it"
    );
    assert!(
        services["logbridge"]["environment"]["LOGBRIDGE_HTTP__ADMIN_TOKEN"]
            .as_str()
            .is_some(),
        "the admin token can be passed in"
    );
}
