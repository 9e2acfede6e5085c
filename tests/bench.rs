//! `logbridge bench` keeps working: a small run against the default broker (the mock cluster in
//! a helper process) and one against Apache Kafka through `--brokers`, every mode. The figures
//! themselves are measured by the benchmark, never asserted here; these tests check that every
//! mode ran to the end of its topic, that every figure was printed, that the HTTP endpoint
//! received every event, and the memory ceiling on a backlog larger than the ceiling.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::apache::ApacheKafka;
use common::serial_blocking;

const BIN: &str = env!("CARGO_BIN_EXE_logbridge");

/// Runs the benchmark with `args`, killing it if it outlives `limit`; returns its stdout.
fn bench(args: &[&str], limit: Duration) -> String {
    let mut child = Command::new(BIN)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start logbridge bench");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stdout = String::new();
            use std::io::Read as _;
            child
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut stdout)
                .expect("read stdout");
            println!("{stdout}");
            assert!(status.success(), "bench failed ({status}):\n{stdout}");
            return stdout;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number after `label` on the line that starts with `line_start`.
fn figure(output: &str, line_start: &str, label: &str) -> f64 {
    let line = output
        .lines()
        .find(|line| line.starts_with(line_start))
        .unwrap_or_else(|| panic!("no line starting with `{line_start}` in:\n{output}"));
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in {line}"))
        + label.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|word| word.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in {line}"))
}

/// Each measured row read all `events`, with a positive rate and peak RSS.
fn check_rows(output: &str, runs: usize, modes: &[&str], events: u64) {
    for run in 1..=runs {
        for mode in modes {
            let start = format!("{run} {mode} ");
            let line = output
                .lines()
                .find(|line| line.starts_with(&start))
                .unwrap_or_else(|| panic!("no `{start}` row in:\n{output}"));
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[2], events.to_string(), "{line}");
            let rate: f64 = words[3].parse().expect("rate");
            let rss: f64 = words[7].parse().expect("rss");
            assert!(rate > 0.0 && rss > 1.0, "{line}");
        }
    }
}

#[test]
fn bench_runs_every_mode_against_the_embedded_broker() {
    let _serial = serial_blocking();
    // The memory ceiling's backlogs: a small one, and one whose events alone are more than the
    // ceiling (README: at most 96 MiB whatever the backlog): 600 000 events of 200 bytes are
    // 120 000 000 bytes (114.4 MiB) of payload, which a pipeline that did not pause would copy
    // into memory within the window (checked below). 16 partitions: the mock cluster keeps
    // 5 MiB (compressed) of each. Eight seconds per backlog: librdkafka alone must read the
    // whole large backlog within the window (checked below), and on a loaded machine it once
    // read 163 296 events/s, which three seconds did not allow. The sink is paced to a fixed
    // 2 000 events/s, not to a share of the pipeline's measured rate: the window is cut to half
    // the time the paced sink takes for the small backlog, and a measured rate (which depends on
    // where the commit ticks fall) could cut it below eight seconds. 40 000 / 2 000 / 2 = 10 s.
    let output = bench(
        &[
            "--events=20000",
            "--runs=1",
            "--memory-backlogs=40000,600000",
            "--memory-partitions=16",
            "--memory-seconds=8",
            "--memory-sink-rate=2000",
            "--large-events=262144",
            "--large-count=60",
            "--large-rate=20",
        ],
        Duration::from_secs(300),
    );
    check_rows(
        &output,
        1,
        &[
            "raw",
            "null",
            "kafka",
            "kafka-eos",
            "http",
            "otlp",
            "loki",
            "object-store",
        ],
        20_000,
    );
    assert!(
        output.contains("j/d = "),
        "the object store row's ratio: {output}"
    );
    assert_eq!(
        figure(&output, "object-store objects:", "holding"),
        20_000.0,
        "the objects of the object-store run hold every event it read"
    );
    assert!(output.contains("i/d = "), "the loki row's ratio: {output}");
    let loki_entries = figure(&output, "loki endpoint:", "pushes,");
    assert_eq!(
        loki_entries, 20_000.0,
        "every event read by the loki run reached the endpoint as a push entry"
    );
    // The ratios are the printed medians' ratios (to the printed rounding).
    let median = |label: &str| figure(&output, label, label);
    let raw = median("(a) raw librdkafka");
    let null = median("(b) pipeline, null sinks");
    let kafka = median("(c) pipeline, kafka sinks");
    let http = median("(d) pipeline, http sinks");
    let eos = median("(e) kafka sinks, exactly-once");
    let (b_a, c_a, d_a) = (
        figure(&output, "b/a", "b/a ="),
        figure(&output, "b/a", "c/a ="),
        figure(&output, "b/a", "d/a ="),
    );
    assert!(
        raw > 0.0 && null > 0.0 && kafka > 0.0 && http > 0.0 && eos > 0.0,
        "{output}"
    );
    let (e_a, e_c) = (
        figure(&output, "b/a", "e/a ="),
        figure(&output, "b/a", "e/c ="),
    );
    assert!(
        (e_a - eos / raw).abs() <= 0.006 && (e_c - eos / kafka).abs() <= 0.006,
        "e/a {e_a} vs {eos}/{raw}, e/c {e_c} vs {eos}/{kafka}"
    );
    assert!(
        (d_a - http / raw).abs() <= 0.006,
        "d/a {d_a} vs {http}/{raw}"
    );
    // What the endpoint counted (NDJSON lines it received), not what the bench sent: every
    // event of the http run, once (the endpoint answers 200 at once, so nothing is resent).
    let requests = figure(&output, "http endpoint:", "endpoint:");
    let received = figure(&output, "http endpoint:", "requests,");
    let per_request = figure(&output, "http endpoint:", "NDJSON,");
    assert!(
        requests > 0.0 && received == 20_000.0,
        "http endpoint: received {received} events in {requests} requests, not the 20000 read"
    );
    assert!(
        (per_request - received / requests).abs() <= 0.5,
        "http endpoint: {per_request} events per request printed, {received} / {requests} counted"
    );
    // The otlp run's log records, as the endpoint decoded them from gzip protobuf bodies.
    let records = figure(&output, "otlp endpoint:", "requests,");
    assert!(
        records == 20_000.0 && median("(h) pipeline, otlp sinks") > 0.0,
        "otlp endpoint: received {records} log records, not the 20000 read\n{output}"
    );
    assert!(
        (b_a - null / raw).abs() <= 0.006,
        "b/a {b_a} vs {null}/{raw}"
    );
    assert!(
        (c_a - kafka / raw).abs() <= 0.006,
        "c/a {c_a} vs {kafka}/{raw}"
    );
    let per_interval = figure(&output, "commit requests", "at most");
    assert!(
        per_interval > 0.0 && per_interval <= 1.0,
        "commits per interval {per_interval}"
    );
    // The memory ceiling's target (README): at most 96 MiB whatever the backlog.
    for backlog in ["40000", "600000"] {
        let rss = figure(&output, &format!("backlog {backlog:>9}:"), "peak RSS");
        assert!(
            rss > 1.0 && rss <= 96.0,
            "memory ceiling at {backlog}: {rss} MiB"
        );
    }
    assert!(
        output.contains("peak RSS at 600000 vs 40000"),
        "compares the backlogs:\n{output}"
    );
    // The large backlog could break the ceiling: its events alone (as preloaded) are more than
    // 96 MiB, and librdkafka alone reads that many events well within the window, so only the
    // pipeline's pauses keep them out of memory.
    let backlog_line = output
        .lines()
        .find(|line| line.starts_with("preloaded") && line.contains("-backlog-600000 "))
        .unwrap_or_else(|| panic!("no preload line of the 600000 backlog in:\n{output}"));
    let backlog_bytes = figure(backlog_line, "preloaded", "events/s,");
    let ceiling = 96.0 * 1024.0 * 1024.0;
    assert!(
        backlog_bytes > ceiling,
        "the 600000 backlog is {backlog_bytes} bytes, not more than the 96 MiB ceiling: {backlog_line}"
    );
    let window = figure(
        &output,
        &format!("backlog {:>9}:", 600_000),
        "events through in",
    );
    let per_backlog = figure(&output, "memory ceiling:", "rate),");
    assert!(
        output.contains("sink paced to 2000 events/s") && per_backlog == 8.0,
        "the memory ceiling's window is not the 8 s asked for, or the sink not paced to 2000 \
         events/s:\n{output}"
    );
    let raw_read_all = figure(&output, "(a) raw librdkafka", "events/s (");
    assert!(
        raw_read_all * window >= 600_000.0,
        "the window ({window} s) is too short for an unbounded pipeline to read the backlog \
         (librdkafka alone read {raw_read_all} events/s)"
    );
    // The decoder cost of every input format, and the ratios as printed.
    let strict = figure(&output, "logbridge format, logbridge events", "events");
    let auto = figure(&output, "auto format, logbridge events", "events");
    let pino = figure(&output, "auto format, pino events", "events");
    let serde_form = figure(&output, "auto format, serde-form events", "events");
    let lines = figure(&output, "text format, lines (level_pattern)", ")");
    let logfmt = figure(&output, "text format, logfmt (level_field)", ")");
    let otlp_proto = figure(&output, "otlp_proto format, 100 per request", "request");
    let ratio = figure(&output, "auto / logbridge", "events =");
    assert!(
        [strict, auto, pino, serde_form, lines, logfmt, otlp_proto]
            .iter()
            .all(|cost| *cost > 0.0),
        "{output}"
    );
    let text_ratio = figure(&output, "text (pattern, logfmt) / logbridge", "=");
    assert!(
        (text_ratio - lines / strict).abs() <= 0.006,
        "text/logbridge {text_ratio} vs {lines}/{strict}"
    );
    assert!(
        (ratio - auto / strict).abs() <= 0.006,
        "auto/logbridge {ratio} vs {auto}/{strict}"
    );
    let large = figure(&output, "events of   262144 bytes:", "peak RSS");
    assert!(
        large > 1.0 && large <= 256.0,
        "large events: {large} MiB, goal <= 256 MiB"
    );
}

#[test]
fn bench_runs_against_apache_kafka() {
    let _serial = serial_blocking();
    let broker = ApacheKafka::start();
    let brokers = broker.brokers();
    let output = bench(
        &[
            &format!("--brokers={brokers}"),
            "--events=5000",
            "--runs=1",
            "--memory-backlogs=none",
            "--large-events=none",
            "--partitions=4",
        ],
        Duration::from_secs(300),
    );
    check_rows(
        &output,
        1,
        &["raw", "null", "kafka", "kafka-eos", "http"],
        5_000,
    );
    assert!(output.contains(&format!("broker: {brokers}")), "{output}");
}
