//! The `logbridge` binary as a user runs it: `check-config`, and `demo` (in-process Kafka,
//! sample traffic, metrics served) checked with Prometheus's own `promtool`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, http_request, serial, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_logbridge");

#[test]
fn check_config_accepts_the_shipped_files() {
    for file in ["config/logbridge.toml", "config/demo.toml"] {
        let output = Command::new(BIN)
            .args(["check-config", file])
            .output()
            .expect("run logbridge");
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(
            printed.contains("router_capacity"),
            "prints the effective config"
        );
    }
}

/// The TOML blocks of the README section that begins with `heading`.
fn readme_blocks(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string("README.md").expect("README.md");
    let section = readme
        .split_once(heading)
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("a section {heading}"));
    section
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(toml, _)| toml.to_string()))
        .collect()
}

/// Every configuration in the README's cookbook and its outputs section is one `check-config`
/// accepts, and it prints each route as it understood it.
#[test]
fn check_config_accepts_the_readme_cookbook() {
    let mut blocks = readme_blocks("### Cookbook");
    assert_eq!(blocks.len(), 4, "the four recipes");
    let outputs = readme_blocks("## Outputs");
    assert_eq!(outputs.len(), 3, "object store, Loki and OTLP");
    blocks.extend(outputs);
    let dir = tempfile::tempdir().expect("tempdir");
    for (n, block) in blocks.iter().enumerate() {
        let path = dir.path().join(format!("recipe-{n}.toml"));
        let text = format!(
            "[kafka]\nbrokers = \"localhost:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n{block}"
        );
        std::fs::write(&path, &text).expect("write");
        let output = Command::new(BIN)
            .args(["check-config", path.to_str().expect("utf-8 path")])
            .output()
            .expect("run logbridge");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "recipe {n}: {stderr}\n{text}");
        assert!(stderr.contains("route `"), "recipe {n} described: {stderr}");
    }
}

/// Every route example of docs/outputs.md (file, HTTP, Elasticsearch, OTLP, Loki, object store) is one
/// `check-config` accepts, with the secret files and variables it names made here, and shows
/// with its secrets redacted; keys a sink cannot have are named. (The HTTP and Elasticsearch
/// examples were multi-line inline tables, which TOML 1.0 refuses: none of them loaded.)
#[test]
fn check_config_accepts_every_documented_sink_and_names_bad_keys() {
    let docs = std::fs::read_to_string("docs/outputs.md").expect("docs/outputs.md");
    let blocks: Vec<&str> = docs
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(toml, _)| toml))
        .filter(|toml| toml.contains("[[routes]]"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |name: &str, routes: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("[kafka]\nbrokers = \"localhost:9092\"\ngroup_id = \"g\"\ntopics = [\"logs\"]\n{routes}"),
        )
        .expect("write");
        Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .env("ALERTS_TOKEN", "s3cret-from-env")
            .output()
            .expect("run logbridge")
    };
    let mut types = Vec::new();
    for (n, block) in blocks.iter().enumerate() {
        // Each secret file and CA file the example names, made here.
        let mut text = block.to_string();
        for (number, path) in [
            "/run/secrets/es",
            "/run/secrets/otlp-token",
            "/run/secrets/loki",
            "/etc/logbridge/es-ca.pem",
            "/run/secrets/archive",
        ]
        .into_iter()
        .enumerate()
        {
            let made = dir.path().join(format!("file-{number}"));
            std::fs::write(&made, format!("s3cret-file-{number}\n")).expect("write");
            text = text.replace(path, made.to_str().expect("utf-8"));
        }
        text = text.replace("/var/log/logbridge/", &format!("{}/", dir.path().display()));
        let output = check(&format!("example-{n}.toml"), &text);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "example {n}: {stderr}\n{text}");
        assert!(
            !stdout.contains("s3cret"),
            "example {n} shows a secret:\n{stdout}"
        );
        let kind = stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("type = "))
            .unwrap_or_default()
            .to_string();
        types.push(kind);
    }
    for kind in [
        "file",
        "http",
        "elasticsearch",
        "otlp",
        "loki",
        "object_store",
    ] {
        assert!(
            types.contains(&format!("\"{kind}\"")),
            "an example of each sink: {types:?}"
        );
    }
    for (sink, key) in [
        (
            r#"{ type = "otlp", url = "http://c:4318", method = "PUT" }"#,
            "routes[0].sink.method",
        ),
        (
            r#"{ type = "loki", url = "http://l:3100", labels = { id = "{request_id}" } }"#,
            "routes[0].sink.labels.id",
        ),
        (
            r#"{ type = "http", url = "http://h/in", metadata = ["a"] }"#,
            "routes[0].sink.metadata",
        ),
        (
            r#"{ type = "s3", url = "s3://archive/raw", path = "{service}/%Y" }"#,
            "routes[0].sink.path",
        ),
        (
            r#"{ type = "object_store", url = "s3://archive", options = { regoin = "x" } }"#,
            "routes[0].sink.options.regoin",
        ),
    ] {
        let output = check(
            "bad.toml",
            &format!("[[routes]]\nname = \"r\"\nlevels = [\"error\"]\nsink = {sink}\n"),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{sink}: {stderr}");
        assert!(stderr.contains(key), "{sink}: expected {key} in {stderr}");
    }
}

/// Issue 34, item 7: `check-config` prints a sink URL without its user info and keys.
#[test]
fn check_config_shows_urls_without_their_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("urls.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n[[routes]]\nname = \"r\"\nlevels = [\"error\"]\nsink = { type = \"http\", url = \"https://ingest:pa55w0rd@logs.example/in?token=t0ken-value&tag=kept\" }\n",
    )
    .expect("write");
    let output = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run logbridge");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    // The URL is shown (so that the secrets' absence below means something), redacted.
    assert!(
        stdout.contains("https://<redacted>@logs.example/in?token=<redacted>&tag=kept"),
        "{stdout}"
    );
    for secret in ["ingest:", "pa55w0rd", "t0ken-value"] {
        assert!(!stdout.contains(secret), "{secret} shown:\n{stdout}");
    }
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n[pipeline]\nworker_capacity = -3\n[[routes]]\nname = \"r\"\nlevels = [\"error\"]\nsink = { type = \"null\" }\n",
            "worker_capacity",
        ),
        (
            "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n[[routes]]\nname = \"r\"\nlevels = [\"error\"]\nworkers = 0\nsink = { type = \"null\" }\n",
            "routes[0].workers",
        ),
        (
            "[kafka\nbrokers = ",
            "TOML parse error at line 1, column 7",
        ),
        ("[kafka\nbrokers = ", "invalid table header"),
    ];
    for (index, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{index}.toml"));
        std::fs::write(&path, text).expect("write");
        let output = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("run logbridge");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        // The message after the file name (which names nothing but the file).
        let message = stderr
            .split_once(": ")
            .map_or(stderr.as_ref(), |(_, message)| message);
        assert!(message.contains(key), "expected `{key}` in: {stderr}");
    }
    let missing = Command::new(BIN)
        .args(["check-config", "no/such/file.toml"])
        .output()
        .expect("run logbridge");
    assert_eq!(missing.status.code(), Some(2));
}

/// Issue 33, item 4: `check-config --config FILE` as `run` takes it; overrides typed by their
/// field (a numeric password, a SASL_SSL protocol, a route by index) load in the binary.
#[test]
fn check_config_takes_config_like_run_and_overrides_take_their_fields_type() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("secured.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n\
         [kafka.security]\nprotocol = \"SASL_SSL\"\nmechanism = \"scram-sha-512\"\nusername = \"u\"\npassword = \"${env:LB_CLI_TEST_PASSWORD:-unset}\"\n\
         [[routes]]\nname = \"r\"\nlevels = [\"error\"]\nsink = { type = \"file\", path = \"/tmp/r.log\" }\n",
    )
    .expect("write");
    for args in [
        vec!["check-config", "--config"],
        vec!["check-config", "-c"],
        vec!["check-config"],
    ] {
        let output = Command::new(BIN)
            .args(&args)
            .arg(&path)
            .env("LOGBRIDGE_KAFKA__SECURITY__USERNAME", "12345678")
            .env("LOGBRIDGE_KAFKA__GROUP_ID", "4711")
            .env("LOGBRIDGE_ROUTES__0__SINK__PATH", "/var/log/r-0.log")
            .env("LOGBRIDGE_ROUTES__0__WORKERS", "3")
            .output()
            .expect("run logbridge");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        for shown in [
            "group_id = \"4711\"",
            "username = \"12345678\"",
            "protocol = \"sasl_ssl\"",
            "mechanism = \"SCRAM-SHA-512\"",
            "path = \"/var/log/r-0.log\"",
            "workers = 3",
        ] {
            assert!(
                stdout.contains(shown),
                "{args:?}: `{shown}` not in\n{stdout}"
            );
        }
    }
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("LOGBRIDGE_ROUTES__1__WORKERS", "3")
        .output()
        .expect("run logbridge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("LOGBRIDGE_ROUTES__1__WORKERS"), "{stderr}");
    let output = Command::new(BIN)
        .arg("check-config")
        .env_remove("LOGBRIDGE_CONFIG")
        .output()
        .expect("run logbridge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--config FILE"), "{stderr}");
}

#[test]
fn logbridge_config_names_the_file_and_version_names_librdkafka_and_its_features() {
    let output = Command::new(BIN)
        .arg("check-config")
        .env("LOGBRIDGE_CONFIG", "config/demo.toml")
        .output()
        .expect("run logbridge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("config/demo.toml: ok"), "{stderr}");
    let version = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run logbridge");
    let printed = String::from_utf8_lossy(&version.stdout);
    assert!(
        printed.starts_with("logbridge 0.1.0\nlibrdkafka 2."),
        "{printed}"
    );
    for feature in [
        "ssl",
        "sasl_scram",
        "sasl_plain",
        "zstd",
        "lz4",
        "snappy",
        "gzip",
    ] {
        assert!(
            printed
                .split(['(', ',', ')'])
                .any(|word| word.trim() == feature),
            "--version lacks `{feature}`: {printed}"
        );
    }
}

/// Sends SIGKILL to a process when dropped (harmless if it already exited and was reaped
/// moments ago: pids are not reused that fast).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn promtool_check(metrics: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (the test script installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool ran");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && report.trim().is_empty(), report)
}

/// `logbridge demo` runs the pipeline on an in-process Kafka with metrics served; its
/// /metrics passes `promtool check metrics`; the endpoint answers 404/405/400 properly; SIGTERM
/// stops it cleanly with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_metrics_that_promtool_accepts_and_stops_on_sigterm() {
    let _serial = serial().await;
    let workdir = tempfile::tempdir().expect("tempdir");
    // Logs go to a file: a pipe nobody reads until the end would fill and block the demo.
    let log_path = workdir.path().join("demo.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "demo",
            // A port the demo binds and logs (one picked here and released could be taken
            // before the demo binds it).
            "--listen",
            common::process::HTTP_LISTEN,
            "--rate",
            "2000",
            "--duration",
            "120s",
        ])
        .current_dir(workdir.path())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("start demo");
    let pid = child.id();
    // Whatever happens below, the demo does not outlive the test.
    let _reaper = KillOnDrop(pid);
    let logged = wait_for(Duration::from_secs(30), || {
        let log_path = &log_path;
        async move {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            common::process::logged_http_address(&log).is_some()
        }
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(logged, "the demo never logged its HTTP address:\n{log}");
    let address = common::process::logged_http_address(&log).expect("logged");

    // Wait until events flow and a commit happened.
    let mut metrics = String::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            let (status, body) = http_get(address, "/metrics").await;
            assert_eq!(status, 200);
            let committed = body.lines().any(|l| {
                l.starts_with("logbridge_commits_total{result=\"ok\"}") && !l.ends_with(" 0")
            });
            let consumed = body
                .lines()
                .any(|l| l.starts_with("logbridge_events_consumed_total") && !l.ends_with(" 0"));
            if committed && consumed {
                metrics = body;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !metrics.is_empty(),
        "demo never consumed and committed within 60 s"
    );
    for family in [
        "logbridge_events_finished_total",
        "logbridge_decode_errors_total",
        "logbridge_paused_partitions",
        "logbridge_channel_depth_records",
        "logbridge_in_flight_records",
        "logbridge_partition_committed_offset",
        "logbridge_build_info",
        "logbridge_consumed_bytes_total",
        "logbridge_delivered_bytes_total",
        "logbridge_kafka_client_errors_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
    for line in [
        "logbridge_paused_partitions{reason=\"backpressure\"}",
        "logbridge_channel_depth_records{route=\"none\",stage=\"router\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    assert!(
        metrics.lines().any(
            |l| l.starts_with("logbridge_channel_depth_records{route=\"")
                && l.contains("stage=\"worker\"")
        ),
        "worker channel depths carry the route as its own label"
    );
    // The health command container healthchecks use, against the running demo.
    for (args, path) in [(vec![], "/healthz"), (vec!["--ready"], "/readyz")] {
        let health = Command::new(BIN)
            .args(["health", "--address", &address.to_string()])
            .args(&args)
            .output()
            .expect("run logbridge health");
        assert!(
            health.status.success(),
            "logbridge health {args:?}: {}",
            String::from_utf8_lossy(&health.stderr)
        );
        assert!(String::from_utf8_lossy(&health.stdout).starts_with(path));
    }
    // The runbook the alerts link to, with an anchor per alert.
    let (status, runbook) = http_get(address, "/runbook").await;
    assert_eq!(status, 200);
    assert!(
        runbook.contains("<h2 id=\"logbridgebreakertripped\">"),
        "{runbook}"
    );
    // POST /resume from loopback is allowed (nothing to resume: the breaker is closed).
    let (status, body) = http_request(
        address,
        "POST /resume HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(
        (status, body.trim()),
        (200, "not tripped; nothing to resume")
    );
    let (clean, report) = promtool_check(&metrics);
    assert!(clean, "promtool check metrics reported:\n{report}");

    assert_eq!(http_get(address, "/healthz").await.0, 200);
    assert_eq!(http_get(address, "/nope").await.0, 404);
    assert_eq!(
        http_request(
            address,
            "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        )
        .await
        .0,
        405
    );
    assert_eq!(http_request(address, "GARBAGE\r\n\r\n").await.0, 400);

    let stop_asked = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("demo output");
    let stop_took = stop_asked.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        output.status.code(),
        Some(0),
        "exit status; stderr:\n{stderr}"
    );
    assert!(
        stop_took < Duration::from_secs(7),
        "SIGTERM to exit took {stop_took:?}"
    );
    assert!(
        stdout.contains("(final)"),
        "final summary line missing:\n{stdout}"
    );
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    println!(
        "demo stopped {stop_took:?} after SIGTERM; last summary: {}",
        stdout.lines().last().unwrap_or("")
    );
}

/// `logbridge produce`: piped, one summary line; on a terminal (a pty from `script`), a
/// progress bar. Against an in-process Kafka hosted by this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_prints_a_summary_when_piped_and_progress_on_a_terminal() {
    let _serial = serial().await;
    let kafka = common::Kafka::start("produced", 2);
    let output = Command::new(BIN)
        .args([
            "produce",
            "--brokers",
            &kafka.brokers,
            "--topic",
            "produced",
        ])
        .args(["--count", "20000", "--bad-ratio", "0.05", "--seed", "1"])
        .output()
        .expect("run produce");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Vec<&str> = stdout.lines().collect();
    assert_eq!(summary.len(), 1, "one plain line when piped: {stdout}");
    assert!(
        summary[0].starts_with("produced 20000 events ("),
        "{stdout}"
    );
    assert!(
        summary[0].contains("events/s") && summary[0].ends_with("0 errors"),
        "{stdout}"
    );
    assert_eq!(kafka.end_offsets().iter().sum::<i64>(), 20_000);

    // On a terminal: a progress bar on stderr (util-linux `script` provides the pty).
    let command = format!(
        "{BIN} produce --brokers {} --topic produced --count 20000 --rate 10000",
        kafka.brokers
    );
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    assert!(
        screen.contains("20000/20000 events"),
        "progress bar reached the end:\n{screen}"
    );
    assert!(screen.contains("produced 20000 events"), "{screen}");
    assert_eq!(kafka.end_offsets().iter().sum::<i64>(), 40_000);
}
