//! The `logbridge` binary as a child process of the tests (Apache Kafka brokers are in
//! [`super::apache`]). Every process is killed when its handle is dropped, so a failing test
//! leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
fn terminate(mut child: Child, grace: Duration) -> Option<ExitStatus> {
    signal(child.id(), "TERM");
    let started = Instant::now();
    while started.elapsed() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// The `logbridge run` binary as a child process with its own config, logging JSON to a file.
pub struct Logbridge {
    child: Option<Child>,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Logbridge {
    /// Starts `logbridge run --config <config> --log-format json`; `config` must serve HTTP on
    /// `http_port`.
    pub fn start(config: &Path, http_port: u16, log: PathBuf) -> Logbridge {
        Logbridge::start_with_stdout(config, http_port, log, Stdio::null())
    }

    /// Like `start`, with extra environment variables (secrets the config refers to).
    pub fn start_with_env(
        config: &Path,
        http_port: u16,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Logbridge {
        Logbridge::spawn(config, http_port, log, Stdio::null(), env)
    }

    /// Like `start`, with its standard output going to `stdout`.
    pub fn start_with_stdout(
        config: &Path,
        http_port: u16,
        log: PathBuf,
        stdout: Stdio,
    ) -> Logbridge {
        Logbridge::spawn(config, http_port, log, stdout, &[])
    }

    fn spawn(
        config: &Path,
        http_port: u16,
        log: PathBuf,
        stdout: Stdio,
        env: &[(&str, &str)],
    ) -> Logbridge {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("logbridge log");
        let child = Command::new(env!("CARGO_BIN_EXE_logbridge"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("LOGBRIDGE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .expect("start logbridge");
        Logbridge {
            child: Some(child),
            http_port,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The value of one unlabelled sample (or the sum over labels) of a metric, if it answers.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let address: std::net::SocketAddr = ([127, 0, 0, 1], self.http_port).into();
        tokio::net::TcpStream::connect(address).await.ok()?;
        let (status, body) = super::http_get(address, "/metrics").await;
        if status != 200 {
            return None;
        }
        let values: Vec<f64> = body
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to `deadline`); returns the exit status and how long it took.
    pub fn terminate(&mut self, deadline: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        let status = self
            .child
            .take()
            .and_then(|child| terminate(child, deadline));
        (status, started.elapsed())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for Logbridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config file for a logbridge child: all sample levels routed to files in `out`.
pub fn write_child_config(
    path: &Path,
    brokers: &str,
    group: &str,
    topic: &str,
    out: &Path,
    http_port: u16,
    extra_options: &str,
) {
    let kafka = super::kafka_section(
        brokers,
        group,
        topic,
        &format!(
            "{}{extra_options}",
            super::client_defaults(&[("heartbeat.interval.ms", "1000")], extra_options)
        ),
    );
    let text = format!(
        r#"{kafka}
[pipeline]
router_capacity = 1024
worker_capacity = 256
commit_interval_ms = 200
drain_timeout_ms = 3000
[http]
listen = "127.0.0.1:{http_port}"
[[routes]]
name = "errors"
levels = ["error", "fatal"]
workers = 4
sink = {{ type = "file", path = "{out}/errors.jsonl" }}
[[routes]]
name = "warnings"
levels = ["warning"]
workers = 2
sink = {{ type = "file", path = "{out}/warnings.jsonl" }}
[[routes]]
name = "rest"
levels = ["info", "debug"]
workers = 2
sink = {{ type = "file", path = "{out}/rest.jsonl" }}
"#,
        out = out.display()
    );
    std::fs::write(path, text).expect("write child config");
}

/// `(partition, offset)` of every record the child logged as undecodable.
pub fn logged_decode_failures(log: &Path) -> std::collections::HashSet<(i32, i64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["message"] == "record failed" && entry["stage"] == "decode")
        .filter_map(|entry| {
            Some((
                entry["partition"].as_i64()? as i32,
                entry["offset"].as_i64()?,
            ))
        })
        .collect()
}

/// A `logbridge run` child named `name`: config `work/<name>.toml`, file outputs in
/// `work/<name>/`, log `work/<name>.log`, HTTP on a free port.
pub struct Instance {
    pub child: Logbridge,
    pub out: PathBuf,
}

impl Instance {
    pub fn start(
        brokers: &str,
        topic: &str,
        group: &str,
        work: &Path,
        name: &str,
        extra_options: &str,
    ) -> Instance {
        let out = work.join(name);
        let config = work.join(format!("{name}.toml"));
        let port = free_port();
        write_child_config(&config, brokers, group, topic, &out, port, extra_options);
        let child = Logbridge::start(&config, port, work.join(format!("{name}.log")));
        Instance { child, out }
    }

    /// Every output line this instance wrote.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        super::read_lines(&[
            self.out.join("errors.jsonl"),
            self.out.join("warnings.jsonl"),
            self.out.join("rest.jsonl"),
        ])
    }
}
