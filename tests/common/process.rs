//! The `logbridge` binary as a child process of the tests (Apache Kafka brokers are in
//! [`super::apache`]). Every process is killed when its handle is dropped, so a failing test
//! leaves nothing running.
//!
//! A child serves HTTP on a port it binds itself ([`HTTP_LISTEN`]) and logs; the tests read
//! the address from its log ([`Logbridge::address`]). A port picked by the test (bound and
//! released) and handed to the child could be taken by another process in between.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `http.listen` of every child: a port the kernel picks when the child binds it.
pub const HTTP_LISTEN: &str = "127.0.0.1:0";

/// A loopback address nothing answers on, for as long as the returned socket lives: the port
/// is bound (so no other process can take it) but not listening, so every connection to it
/// is refused.
pub fn closed_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind a loopback port");
    let address = socket.local_addr().expect("its address");
    (socket, address)
}

/// The address of the HTTP endpoint in a logbridge JSON log: its `serving /metrics ...` line.
pub fn logged_http_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| {
            entry["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("serving /metrics"))
        })
        .map(|entry| {
            entry["address"]
                .as_str()
                .and_then(|address| address.parse().ok())
                .unwrap_or_else(|| panic!("the serving line names no address: {entry}"))
        })
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
pub fn terminate(mut child: Child, grace: Duration) -> Option<ExitStatus> {
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
    pub log: PathBuf,
    /// Where this process's lines begin in `log` (earlier runs may have written to it).
    log_from: u64,
    /// The HTTP endpoint's address, once read from the log.
    address: OnceLock<SocketAddr>,
}

impl Logbridge {
    /// Starts `logbridge run --config <config> --log-format json`; `config` serves HTTP on
    /// [`HTTP_LISTEN`] (or no HTTP at all).
    pub fn start(config: &Path, log: PathBuf) -> Logbridge {
        Logbridge::start_with_stdout(config, log, Stdio::null())
    }

    /// Like `start`, with extra environment variables (secrets the config refers to).
    pub fn start_with_env(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Logbridge {
        Logbridge::spawn(config, log, Stdio::null(), env)
    }

    /// Like `start`, with its standard output going to `stdout`.
    pub fn start_with_stdout(config: &Path, log: PathBuf, stdout: Stdio) -> Logbridge {
        Logbridge::spawn(config, log, stdout, &[])
    }

    fn spawn(config: &Path, log: PathBuf, stdout: Stdio, env: &[(&str, &str)]) -> Logbridge {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("logbridge log");
        let log_from = log_file.metadata().expect("log size").len();
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
            log,
            log_from,
            address: OnceLock::new(),
        }
    }

    /// What this process logged so far.
    pub fn log_text(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let from = (self.log_from as usize).min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }

    /// The HTTP endpoint's address, if the process logged it yet.
    pub fn logged_address(&self) -> Option<SocketAddr> {
        if let Some(address) = self.address.get() {
            return Some(*address);
        }
        let address = logged_http_address(&self.log_text())?;
        Some(*self.address.get_or_init(|| address))
    }

    /// The HTTP endpoint's address: waits (30 s at most) for the process to log it; panics
    /// with the log if it does not.
    pub async fn address(&self) -> SocketAddr {
        let logged = super::wait_for(Duration::from_secs(30), || {
            std::future::ready(self.logged_address().is_some())
        })
        .await;
        assert!(
            logged,
            "logbridge never logged its HTTP address:\n{}",
            self.log_text()
        );
        self.logged_address().expect("logged")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The value of one unlabelled sample (or the sum over labels) of a metric; `None` while
    /// the endpoint does not answer (the process starting or gone). A metric logbridge defines
    /// without series yet is 0; a name it does not define panics ([`super::metric_samples`]).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        Some(super::metric_sum(&self.metrics_page().await?, name))
    }

    /// The `/metrics` page; `None` while the endpoint does not answer.
    pub async fn metrics_page(&self) -> Option<String> {
        let address = self.logged_address()?;
        tokio::net::TcpStream::connect(address).await.ok()?;
        let (status, body) = super::http_get(address, "/metrics").await;
        (status == 200).then_some(body)
    }

    /// Waits (up to `deadline`) until the process has read a record; whether it did.
    pub async fn wait_consuming(&self, deadline: Duration) -> bool {
        super::wait_for(deadline, || async {
            self.metric("logbridge_events_consumed_total")
                .await
                .is_some_and(|consumed| consumed > 0.0)
        })
        .await
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

    /// Of a child started with `Stdio::piped()` standard output: the bytes waiting in the pipe
    /// (written, not read) and the pipe's capacity.
    pub fn stdout_pipe(&self) -> Option<(usize, usize)> {
        use std::os::fd::AsRawFd;
        let fd = self.child.as_ref()?.stdout.as_ref()?.as_raw_fd();
        let mut waiting: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer; `fd` is the open reading end
        // this handle owns.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut waiting) } != 0 {
            return None;
        }
        // SAFETY: F_GETPIPE_SZ takes no argument and only reads the pipe's size.
        let capacity = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
        (capacity > 0).then_some((waiting as usize, capacity as usize))
    }

    /// The exit status once the process has exited (`None` while it runs, or once killed or
    /// terminated through this handle).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
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
listen = "{HTTP_LISTEN}"
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
/// `work/<name>/`, log `work/<name>.log`, HTTP on a port it picks ([`HTTP_LISTEN`]).
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
        write_child_config(&config, brokers, group, topic, &out, extra_options);
        let child = Logbridge::start(&config, work.join(format!("{name}.log")));
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
