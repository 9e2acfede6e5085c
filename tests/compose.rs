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
        if name.starts_with("logbridge_process_") {
            continue; // from the process collector (prefix `logbridge`)
        }
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
}
