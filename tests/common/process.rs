//! Processes the broker-tier tests start: a tansu broker (a Kafka-compatible broker process) and
//! the `logbridge` binary itself. Every process is killed when its handle is dropped, so a
//! failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: `LOGBRIDGE_TANSU`, else where `scripts/test.sh` installs it.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOGBRIDGE_TANSU") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("LOGBRIDGE_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/logbridge"))
        })
        .unwrap_or_else(|| PathBuf::from("/tmp/logbridge-cache"));
    cache.join("tansu-0.6.0/bin/tansu")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

fn wait_for_port(port: u16, deadline: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A tansu broker on a free loopback port, storing in SQLite in its own directory (correct end
/// offsets; data and committed offsets survive a restart).
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    /// The port written into metadata (a TLS proxy's, in front of this broker).
    pub advertised: u16,
    /// Whether clients must authenticate with SASL.
    authentication: bool,
    pub dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> Tansu {
        Tansu::start_advertising(0)
    }

    /// A broker that tells clients to connect to `advertised` (a proxy) instead of its port
    /// (0: its own port).
    pub fn start_advertising(advertised: u16) -> Tansu {
        let dir = tempfile::tempdir().expect("tansu dir");
        let mut tansu = Tansu {
            child: None,
            port: free_port(),
            advertised,
            authentication: false,
            dir,
        };
        if advertised == 0 {
            tansu.advertised = tansu.port;
        }
        tansu.launch();
        tansu
    }

    /// A broker that requires SASL (PLAIN, SCRAM-SHA-256/512), with `users` as
    /// `(name, password, "scram256" | "scram512")` and `topics` as `(name, partitions)`. tansu
    /// keeps SCRAM credentials in its storage, and with authentication on even creating a user
    /// needs one: so users and topics are made on the same storage without authentication,
    /// then the broker restarts with it.
    pub fn start_with_users(users: &[(&str, &str, &str)], topics: &[(&str, i32)]) -> Tansu {
        let mut tansu = Tansu::start_advertising(0);
        let broker = format!("tcp://127.0.0.1:{}", tansu.port);
        for (name, password, mechanism) in users {
            tansu.cli(&[
                "user",
                "create",
                name,
                password,
                "--broker",
                &broker,
                "--mechanism",
                mechanism,
            ]);
        }
        for (topic, partitions) in topics {
            tansu.cli(&[
                "topic",
                "create",
                topic,
                "--broker",
                &broker,
                "--partitions",
                &partitions.to_string(),
            ]);
        }
        tansu.stop();
        tansu.authentication = true;
        tansu.launch();
        tansu
    }

    fn cli(&self, args: &[&str]) {
        let output = Command::new(tansu_binary())
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run the tansu cli");
        assert!(
            output.status.success(),
            "tansu {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let binary = tansu_binary();
        assert!(
            binary.exists(),
            "tansu not found at {}: run scripts/test.sh, which installs it",
            binary.display()
        );
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        let child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "sqlite://broker.db"])
            .args(self.authentication.then_some("--authentication"))
            .current_dir(self.dir.path())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(20)),
            "tansu did not listen on {}",
            self.port
        );
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(5));
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
