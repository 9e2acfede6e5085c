//! Prometheus in the loop: a real Prometheus server (Debian's `prometheus` package) on loopback
//! scrapes a running `logbridge` process; its HTTP API shows `up` = 1 and the consumed events
//! equal to what was produced. Also: the shipped alerting rules pass `promtool check rules`.

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
        let url = format!(
            "runbook_url: \"http://{{{{ $labels.instance }}}}/runbook#{}\"",
            alert.to_lowercase()
        );
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
    let server_log = work.path().join("prometheus.log");
    let server = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("tsdb").display()
            ))
            // A port Prometheus binds and logs (one picked here and released could be taken
            // before it binds it).
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&server_log).expect("prometheus log"))
            .spawn()
            .expect("prometheus is installed (Debian's prometheus package)"),
    );
    // Its line `msg="Listening on" address=127.0.0.1:40511`.
    let listening = || {
        std::fs::read_to_string(&server_log)
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
        "Prometheus never logged its address:\n{}",
        std::fs::read_to_string(&server_log).unwrap_or_default()
    );
    let address: std::net::SocketAddr = listening().expect("logged");
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
