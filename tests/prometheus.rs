//! Prometheus in the loop: a real Prometheus server (Debian's `prometheus` package) on loopback
//! scrapes a running `logbridge` process; its HTTP API shows `up` = 1 and the consumed events
//! equal to what was produced. Also: the shipped alerting rules pass `promtool check rules` and
//! `promtool test rules`, and a real Prometheus sends an alert to a real Alertmanager (Debian's
//! `prometheus-alertmanager`) running the shipped config, runbook base URL in front.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::Instance;
use common::*;

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The single value of an instant query, if there is one.
async fn query(address: std::net::SocketAddr, promql: &str) -> Option<f64> {
    // Not listening yet: no answer.
    tokio::net::TcpStream::connect(address).await.ok()?;
    let (status, body) =
        http_get(address, &format!("/api/v1/query?query={}", encode(promql))).await;
    if status != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a Prometheus-project server (`prometheus`, `prometheus-alertmanager`) on a loopback
/// port it picks itself and logs (a port picked here and released could be taken before it
/// binds it); returns it with its address. It is killed when dropped.
async fn serve(
    program: &str,
    args: &[String],
    work: &std::path::Path,
) -> (KillOnDrop, std::net::SocketAddr) {
    let log = work.join(format!("{program}.log"));
    let server = KillOnDrop(
        Command::new(program)
            .args(args)
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} is installed (scripts/test.sh installs Debian's package): {e}")
            }),
    );
    // Its line `msg="Listening on" address=127.0.0.1:40511`.
    let listening = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("msg=\"Listening on\""))
            .find_map(|line| line.split("address=").nth(1)?.trim().parse().ok())
    };
    let logged = wait_for(Duration::from_secs(30), || {
        std::future::ready(listening().is_some())
    })
    .await;
    assert!(
        logged,
        "{program} never logged its address:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (server, listening().expect("logged"))
}

/// Runs `promtool` with `args` and fails the test with its output unless it succeeds.
fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (scripts/test.sh installs Debian's prometheus package)");
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn shipped_alerting_rules_pass_promtool() {
    promtool(&["check", "rules", "config/alerts.yml"]);
}

/// `promtool test rules`: every alert fires from made-up series with the labels and
/// annotations expected, and none from a healthy instance's. The test file covers every alert.
#[test]
fn every_alert_fires_in_promtool_rule_tests() {
    promtool(&["test", "rules", "config/alerts.test.yml"]);
    let tests = std::fs::read_to_string("config/alerts.test.yml").expect("rule tests");
    for alert in alert_names() {
        let fires = format!("alertname: {alert}\n    exp_alerts:\n    - exp_labels:");
        assert!(tests.contains(&fires), "{alert} is tested firing");
    }
}

/// How every alert's `runbook_url` begins: the base URL Prometheus is given as an external label
/// (config/prometheus.yml), so the link does not depend on the alerting instance being up.
const RUNBOOK_BASE: &str = "{{ $externalLabels.runbook_base_url }}";

/// Every alert has a `runbook_url` whose anchor is a section of docs/runbook.md (the page
/// `/runbook` serves), and every section is an alert's.
#[test]
fn every_alert_links_a_runbook_section() {
    let alerts = std::fs::read_to_string("config/alerts.yml").expect("alerts");
    let runbook = std::fs::read_to_string("docs/runbook.md").expect("runbook");
    let sections: Vec<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(logbridge::http::anchor)
        .collect();
    let names = alert_names();
    for alert in &names {
        let url = format!("runbook_url: \"{RUNBOOK_BASE}#{}\"", alert.to_lowercase());
        assert!(
            alerts.contains(&url),
            "{alert} links its runbook section: {url}"
        );
        assert!(
            sections.contains(&alert.to_lowercase()),
            "docs/runbook.md has a section {alert}"
        );
    }
    assert_eq!(
        sections.len(),
        names.len(),
        "one section per alert: {sections:?}"
    );
}

/// A real Prometheus sends what fires to a real Alertmanager running the compose file's
/// config/alertmanager.yml, with the runbook base URL (an external label) in front of the
/// alert's anchor: the link names no instance, so it works while the alerting one is down.
/// (Debian's promtool cannot set external labels in rule tests, so this shows the expansion.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_alertmanager_with_the_runbook_base_url_in_front() {
    let work = tempfile::tempdir().expect("workdir");
    let (_alertmanager, alertmanager) = serve(
        "prometheus-alertmanager",
        &[
            "--config.file=config/alertmanager.yml".to_string(),
            format!("--storage.path={}", work.path().join("am").display()),
            // No cluster: it would listen on every interface.
            "--cluster.listen-address=".to_string(),
        ],
        work.path(),
    )
    .await;
    let rules = work.path().join("probe.yml");
    std::fs::write(
        &rules,
        format!(
            "groups:\n  - name: probe\n    rules:\n      - alert: LogbridgeProbe\n        expr: vector(1)\n        labels:\n          severity: warning\n        annotations:\n          runbook_url: \"{RUNBOOK_BASE}#logbridgeprobe\"\n"
        ),
    )
    .expect("rules");
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  evaluation_interval: 1s\n  external_labels:\n    runbook_base_url: https://runbooks.example.com/logbridge\nrule_files:\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{alertmanager}\"]\n",
            rules.display()
        ),
    )
    .expect("prometheus config");
    let (_prometheus, _) = serve(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", work.path().join("tsdb").display()),
            // Its first notification can come before it has found the Alertmanager (it is
            // then dropped); firing alerts are sent again after this delay (1 m by default).
            "--rules.alert.resend-delay=1s".to_string(),
        ],
        work.path(),
    )
    .await;
    let received = || async move {
        let (status, body) = http_get(alertmanager, "/api/v2/alerts").await;
        let alerts: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let probe = alerts.as_array().and_then(|alerts| {
            alerts
                .iter()
                .find(|a| a["labels"]["alertname"] == "LogbridgeProbe")
                .cloned()
        });
        (status, probe)
    };
    let arrived = wait_for(Duration::from_secs(60), || async move {
        received().await.1.is_some()
    })
    .await;
    let (status, probe) = received().await;
    assert!(arrived, "no alert reached Alertmanager (status {status})");
    let probe = probe.expect("arrived");
    assert_eq!(
        probe["annotations"]["runbook_url"],
        "https://runbooks.example.com/logbridge#logbridgeprobe",
        "{probe}"
    );
    // Routed by the shipped config (its one receiver, for now).
    assert_eq!(probe["receivers"][0]["name"], "default", "{probe}");
    println!("alertmanager received {probe}");

    // The shipped inhibition: while an instance is down, its other alerts are muted; another
    // instance's are not.
    let alert = |name: &str, instance: &str| serde_json::json!({"labels": {"alertname": name, "instance": instance, "severity": "warning"}});
    let body = serde_json::json!([
        alert("LogbridgeInstanceDown", "lb-1:9898"),
        alert("LogbridgeCommitErrors", "lb-1:9898"),
        alert("LogbridgeCommitErrors", "lb-2:9898"),
    ])
    .to_string();
    let (status, answer) = http_request(
        alertmanager,
        &format!(
            "POST /api/v2/alerts HTTP/1.0\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let inhibited = |instance: &'static str| async move {
        let (_, body) = http_get(alertmanager, "/api/v2/alerts").await;
        let alerts: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        alerts.as_array().and_then(|alerts| {
            alerts
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "LogbridgeCommitErrors"
                        && a["labels"]["instance"] == instance
                })
                .map(|a| {
                    !a["status"]["inhibitedBy"]
                        .as_array()
                        .is_none_or(Vec::is_empty)
                })
        })
    };
    let muted = wait_for(Duration::from_secs(30), || async move {
        inhibited("lb-1:9898").await == Some(true)
    })
    .await;
    assert!(muted, "lb-1's commit alert is inhibited while lb-1 is down");
    assert_eq!(inhibited("lb-2:9898").await, Some(false), "lb-2's is not");
}

fn alert_names() -> Vec<String> {
    let alerts = std::fs::read_to_string("config/alerts.yml").expect("alerts");
    let names: Vec<String> = alerts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 13, "{names:?}");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_logbridge() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let produced = kafka.produce_samples(5_000, 0.02, 9).await;
    let total = (produced.valid_ids.len() + produced.malformed.len()) as f64;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("prometheus");
    let instance = Instance::start(&kafka.brokers, &kafka.topic, &group, work.path(), "lb", "");

    let logbridge = instance.child.address().await;
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: logbridge\n    static_configs:\n      - targets: [\"{logbridge}\"]\n",
        ),
    )
    .expect("prometheus config");
    let (server, address) = serve(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", work.path().join("tsdb").display()),
        ],
        work.path(),
    )
    .await;
    let up = wait_for(Duration::from_secs(60), || async move {
        query(address, "up{job=\"logbridge\"}").await == Some(1.0)
    })
    .await;
    assert!(up, "Prometheus never saw logbridge up");
    let counted = wait_for(Duration::from_secs(60), || async move {
        query(address, "sum(logbridge_events_consumed_total)").await == Some(total)
    })
    .await;
    let seen = query(address, "sum(logbridge_events_consumed_total)").await;
    let finished = query(address, "sum(logbridge_events_finished_total)").await;
    println!("prometheus: up = 1; consumed per Prometheus {seen:?} of {total} produced; finished {finished:?}");
    drop(server);
    drop(instance);
    assert!(
        counted,
        "consumed per Prometheus {seen:?} != produced {total}"
    );
}
