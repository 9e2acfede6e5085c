//! `logbridge bench --soak DURATION`: a long run of a mixed stream through a real `logbridge run`
//! process, printing what grows.
//!
//! The stream is what production meets on an ordinary day, all at once: every level (most of it
//! `info`, which no route takes, so its records finish at once), a share of malformed records
//! (dead-lettered), errors to an HTTP endpoint that fails some requests and is down a few
//! seconds every minute, warnings and debug to null sinks, and a second instance of the same
//! group that joins and leaves (a rebalance each time). Every sample prints the first
//! instance's resident memory, open file descriptors, threads, live tokio tasks, channel depths
//! and progress; the end prints each figure's growth per hour, fitted over the samples after
//! the warm-up (the first quarter of the run).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;

use super::broker::Broker;
use super::endpoint::{Endpoint, Flaky};
use super::options::BenchOptions;
use crate::tools::produce::{produce_blocking, ProduceOptions};

/// One HTTP request in this many is answered 503.
const FAIL_ONE_IN: u64 = 20;
/// The endpoint is down (every request 503) this long in every minute.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// Samples of a run (at least one every 5 s).
const SAMPLES: u32 = 40;
/// Longest wait for the first instance to read the backlog after production stopped.
const CATCH_UP: Duration = Duration::from_secs(120);

/// One sample of the first instance.
#[derive(Debug, Clone, Default)]
struct Sample {
    seconds: f64,
    rss_mib: f64,
    fds: f64,
    threads: f64,
    tasks: f64,
    router_depth: f64,
    worker_depth: f64,
    committer_depth: f64,
    in_flight: f64,
    consumed: f64,
    dead_letters: f64,
    lag: f64,
}

/// Runs the soak for `duration` against `broker`.
pub(super) async fn soak(
    exe: &Path,
    broker: &mut Broker,
    options: &BenchOptions,
    duration: Duration,
) -> anyhow::Result<()> {
    let brokers = broker.brokers().to_string();
    // The second instance joins every this often (half-way through), and stays half of it.
    let rebalance_every = Duration::from_secs(options.soak_rebalance_secs);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let topic = format!("logbridge-soak-{stamp}-{}", std::process::id());
    let dead_letters = format!("{topic}-dlq");
    broker.create_topic(&topic, options.partitions).await?;
    broker.create_topic(&dead_letters, 1).await?;
    let endpoint = Endpoint::start_flaky(Flaky {
        fail_one_in: FAIL_ONE_IN,
        down_for: DOWN_FOR,
        every: Duration::from_secs(60),
    })
    .await?;
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut first = Instance::start(exe, &dir, "a", &brokers, &topic, &dead_letters, &endpoint)?;
    println!("logbridge bench --soak");
    println!("machine: {}", super::report::machine());
    println!(
        "broker: {}",
        if broker.is_embedded() {
            format!("librdkafka mock cluster in a helper process ({brokers})")
        } else {
            brokers.clone()
        }
    );
    println!(
        "stream: {} events/s of every level ({:.0} % malformed) on {} partitions, {} keys; \
         errors to an HTTP endpoint failing 1 request in {FAIL_ONE_IN} and down {} s a minute; \
         a second instance joins every {} s for {} s; {} s in all",
        options.soak_rate,
        options.soak_bad_ratio * 100.0,
        options.partitions,
        options.keys,
        DOWN_FOR.as_secs(),
        rebalance_every.as_secs(),
        rebalance_every.as_secs() / 2,
        duration.as_secs()
    );
    println!("instance logs: {}", dir.display());

    let stop = Arc::new(AtomicBool::new(false));
    let produce = ProduceOptions {
        brokers: brokers.clone(),
        topic: topic.clone(),
        count: None,
        rate: options.soak_rate,
        keys: options.keys,
        bad_ratio: options.soak_bad_ratio,
        seed: Some(stamp),
        loggers: true,
        ..ProduceOptions::default()
    };
    let producing = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || produce_blocking(&produce, &stop, |_, _| {}))
    };

    let every = (duration / SAMPLES).max(Duration::from_secs(5));
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut second: Option<Instance> = None;
    let mut joins = 0u32;
    println!();
    println!(
        "{:>7} {:>8} {:>5} {:>7} {:>6} {:>7} {:>7} {:>9} {:>8} {:>11} {:>8} {:>8}  second",
        "seconds",
        "rss MiB",
        "fds",
        "threads",
        "tasks",
        "router",
        "workers",
        "committer",
        "inflight",
        "consumed",
        "dlq",
        "lag"
    );
    // The first sample after one period: the instance has started and joined by then.
    let mut next_sample = started + every;
    while started.elapsed() < duration {
        let cycle = started.elapsed().as_secs_f64() % rebalance_every.as_secs_f64().max(1.0);
        // Out for the first half of every cycle, in for the second.
        let want_second =
            !rebalance_every.is_zero() && cycle >= rebalance_every.as_secs_f64() / 2.0;
        match (&mut second, want_second) {
            (None, true) => {
                second = Some(Instance::start(
                    exe,
                    &dir,
                    &format!("b{joins}"),
                    &brokers,
                    &topic,
                    &dead_letters,
                    &endpoint,
                )?);
                joins += 1;
            }
            (Some(_), false) => {
                if let Some(instance) = second.take() {
                    instance.stop().await;
                }
            }
            _ => {}
        }
        if producing.is_finished() {
            anyhow::bail!("the soak producer stopped early: {:?}", producing.await);
        }
        if let Some(status) = first.exited()? {
            anyhow::bail!(
                "logbridge stopped during the soak ({status}); see {}",
                dir.display()
            );
        }
        if Instant::now() >= next_sample {
            next_sample += every;
            let sample = first.sample(started).await;
            println!(
                "{:>7.0} {:>8.1} {:>5.0} {:>7.0} {:>6.0} {:>7.0} {:>7.0} {:>9.0} {:>8.0} {:>11.0} {:>8.0} {:>8.0}  {}",
                sample.seconds,
                sample.rss_mib,
                sample.fds,
                sample.threads,
                sample.tasks,
                sample.router_depth,
                sample.worker_depth,
                sample.committer_depth,
                sample.in_flight,
                sample.consumed,
                sample.dead_letters,
                sample.lag,
                if second.is_some() { "running" } else { "-" }
            );
            samples.push(sample);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(instance) = second.take() {
        instance.stop().await;
    }
    stop.store(true, Ordering::Relaxed);
    let produced = producing
        .await
        .context("the soak producer failed")?
        .context("the soak producer failed")?;
    // The first instance reads what is left (lag 0 on every partition) before it stops.
    let catch_up = Instant::now();
    let mut last = first.sample(started).await;
    while last.lag > 0.0 && catch_up.elapsed() < CATCH_UP {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = first.sample(started).await;
    }
    let (requests, failed) = endpoint.answered();
    let status = first.stop().await;
    println!();
    println!(
        "produced {} events ({} malformed, {} not delivered to Kafka); second instance joined {joins} times; \
         endpoint answered {requests} requests ({failed} with 503); after {:.0} s of catching up: lag {:.0}, \
         consumed {:.0}, dead letters {:.0}; logbridge exited with {status}",
        produced.delivered,
        produced.malformed,
        produced.errors,
        catch_up.elapsed().as_secs_f64(),
        last.lag,
        last.consumed,
        last.dead_letters
    );
    growth(&samples);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Prints each figure's change per hour, fitted over the samples after the first quarter of the
/// run (start-up and the first rebalances are not growth).
fn growth(samples: &[Sample]) {
    let settled = &samples[samples.len() / 4..];
    if settled.len() < 3 {
        println!("growth: too few samples");
        return;
    }
    println!(
        "growth per hour, fitted over {} samples from {:.0} s on (min .. max in brackets):",
        settled.len(),
        settled[0].seconds
    );
    let figures: [(&str, Figure); 8] = [
        ("rss MiB", |s| s.rss_mib),
        ("open fds", |s| s.fds),
        ("threads", |s| s.threads),
        ("tokio tasks", |s| s.tasks),
        ("router depth", |s| s.router_depth),
        ("worker depth", |s| s.worker_depth),
        ("committer depth", |s| s.committer_depth),
        ("in flight", |s| s.in_flight),
    ];
    for (name, value) in figures {
        let (slope, low, high) = per_hour(settled, value);
        println!("  {name:<16} {slope:>+10.2} /h   [{low:.1} .. {high:.1}]");
    }
}

/// One figure of a sample.
type Figure = fn(&Sample) -> f64;

/// The least-squares slope of `value` over `samples`, per hour, with its minimum and maximum.
fn per_hour(samples: &[Sample], value: Figure) -> (f64, f64, f64) {
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|s| s.seconds).sum::<f64>() / n;
    let mean_v = samples.iter().map(value).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for sample in samples {
        num += (sample.seconds - mean_t) * (value(sample) - mean_v);
        den += (sample.seconds - mean_t).powi(2);
    }
    let slope = if den > 0.0 { num / den } else { 0.0 };
    let (low, high) = samples.iter().fold((f64::MAX, f64::MIN), |(low, high), s| {
        (low.min(value(s)), high.max(value(s)))
    });
    (slope * 3600.0, low, high)
}

/// A `logbridge run` process of the soak's group.
struct Instance {
    child: Child,
    metrics: std::net::SocketAddr,
}

impl Instance {
    fn start(
        exe: &Path,
        dir: &Path,
        name: &str,
        brokers: &str,
        topic: &str,
        dead_letters: &str,
        endpoint: &Endpoint,
    ) -> anyhow::Result<Instance> {
        let metrics = free_port()?;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            soak_config(brokers, topic, dead_letters, &endpoint.url, metrics),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .context("cannot create an instance log")?;
        // `LOGBRIDGE_SOAK_WRAP` (e.g. `heaptrack -o /tmp/soak-heap`) runs the first instance
        // under a profiler: its words go in front of the command.
        let wrapper = (name == "a")
            .then(|| std::env::var("LOGBRIDGE_SOAK_WRAP").ok())
            .flatten()
            .unwrap_or_default();
        let child = super::wrapped(exe, &wrapper)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("LOGBRIDGE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot share the instance log")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("failed to start logbridge")?;
        Ok(Instance { child, metrics })
    }

    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .context("cannot watch the logbridge process")
    }

    /// Stops it as an orchestrator does (SIGTERM, then SIGKILL after 30 s).
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child process by its pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(err)) => format!("unknown ({err})"),
            Err(_) => {
                let _ = self.child.kill().await;
                "killed after 30 s".to_string()
            }
        }
    }

    async fn sample(&self, started: Instant) -> Sample {
        let proc = self
            .child
            .id()
            .map(|pid| PathBuf::from(format!("/proc/{pid}")));
        let status = proc
            .as_ref()
            .and_then(|dir| std::fs::read_to_string(dir.join("status")).ok())
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let fds = proc
            .as_ref()
            .and_then(|dir| std::fs::read_dir(dir.join("fd")).ok())
            .map_or(f64::NAN, |entries| entries.count() as f64);
        let text = scrape(self.metrics).await.unwrap_or_default();
        let sum = |name: &str, label: &str| sum_of(&text, name, label);
        Sample {
            seconds: started.elapsed().as_secs_f64(),
            rss_mib: field("VmRSS:") / 1024.0,
            fds,
            threads: field("Threads:"),
            tasks: sum("logbridge_runtime_tasks", ""),
            router_depth: sum("logbridge_channel_depth_records", "stage=\"router\""),
            worker_depth: sum("logbridge_channel_depth_records", "stage=\"worker\""),
            committer_depth: sum("logbridge_channel_depth_records", "stage=\"committer\""),
            in_flight: sum("logbridge_in_flight_records", ""),
            consumed: sum("logbridge_events_consumed_total", ""),
            dead_letters: sum("logbridge_dead_letters_total", ""),
            lag: sum("logbridge_partition_lag_records", ""),
        }
    }
}

/// The soak's logbridge configuration.
fn soak_config(
    brokers: &str,
    topic: &str,
    dead_letters: &str,
    url: &str,
    metrics: std::net::SocketAddr,
) -> String {
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{topic}"
topics = ["{topic}"]

[kafka.options]
"statistics.interval.ms" = 1000
# librdkafka's mock cluster waits a session timeout less a second for the members of a group
# whose membership changed: 45 s of nothing read on every join and leave with the default.
"session.timeout.ms" = 6000

[pipeline]
commit_interval_ms = 1000
drain_timeout_ms = 5000

[input]
format = "auto"

[http]
listen = "{metrics}"

[dead_letter]
topic = "{dead_letters}"

[[routes]]
name = "errors"
levels = ["error", "critical", "fatal"]
workers = 2
sink = {{ type = "http", url = "{url}" }}

[[routes]]
name = "warnings"
levels = ["warning"]
workers = 2
sink = {{ type = "null" }}

[[routes]]
name = "debug"
levels = ["debug"]
workers = 1
sink = {{ type = "null" }}
"#
    )
}

/// A loopback port free now (the instance binds it a moment later; a clash fails its start,
/// which the soak reports).
fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    listener.local_addr().context("cannot find a free port")
}

/// `GET /metrics` of an instance (empty while it cannot answer).
async fn scrape(address: std::net::SocketAddr) -> anyhow::Result<String> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .context("metrics did not answer in 5 s")?
}

/// The sum of a metric's samples whose labels contain `label` (every sample for "").
fn sum_of(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .contains(label)
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_samples_of_one_metric_by_label() {
        let text = "# HELP x y\n\
            logbridge_channel_depth_records{route=\"none\",stage=\"router\"} 5\n\
            logbridge_channel_depth_records{route=\"a\",stage=\"worker\"} 2\n\
            logbridge_channel_depth_records{route=\"b\",stage=\"worker\"} 3\n\
            logbridge_channel_depth_records_other 100\n\
            logbridge_in_flight_records 7\n";
        assert_eq!(
            sum_of(text, "logbridge_channel_depth_records", "stage=\"worker\""),
            5.0
        );
        assert_eq!(sum_of(text, "logbridge_channel_depth_records", ""), 10.0);
        assert_eq!(sum_of(text, "logbridge_in_flight_records", ""), 7.0);
        assert_eq!(sum_of(text, "logbridge_missing", ""), 0.0);
    }

    #[test]
    fn growth_is_the_slope_per_hour() {
        // 1 MiB more every 60 s is 60 MiB an hour, whatever the noise around the line.
        let samples: Vec<Sample> = (0..20)
            .map(|i| Sample {
                seconds: i as f64 * 60.0,
                rss_mib: 100.0 + i as f64 + if i % 2 == 0 { 0.5 } else { -0.5 },
                fds: 30.0,
                ..Sample::default()
            })
            .collect();
        let (slope, low, high) = per_hour(&samples, |s| s.rss_mib);
        assert!((slope - 60.0).abs() < 2.0, "slope {slope}");
        assert_eq!((low, high), (100.5, 118.5));
        assert_eq!(per_hour(&samples, |s| s.fds), (0.0, 30.0, 30.0));
    }
}
