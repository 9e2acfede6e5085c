//! What the benchmark prints: the machine, one row per measurement, the medians and ratios,
//! and the memory ceiling.

use std::collections::BTreeMap;

use super::measurement::{median_of, Measurement};
use super::options::{BenchOptions, Mode};

pub(super) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    #[cfg(target_os = "linux")]
    let (memory_gib, model) = {
        use procfs::Current as _;
        let memory = procfs::Meminfo::current().map_or(0, |memory| memory.mem_total);
        let model = procfs::CpuInfo::current()
            .ok()
            .and_then(|cpus| cpus.model_name(0).map(str::to_string));
        (memory as f64 / f64::from(1 << 30), model)
    };
    #[cfg(not(target_os = "linux"))]
    let (memory_gib, model): (f64, Option<String>) = (0.0, None);
    let model = model.unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {memory_gib:.1} GiB, {model}")
}

pub(super) fn row(label: &str, measurement: &Measurement) -> String {
    let finished = match measurement.finished_rate() {
        Some(rate) => format!("{rate:.0}"),
        None => "-".to_string(),
    };
    format!(
        "{label:<10} {:>10} {:>12.0} {:>12} {:>8.2} {:>10.2} {:>10.1} {:>9.2}",
        measurement.events,
        measurement.rate(),
        finished,
        measurement.seconds,
        measurement.cpu_per_million(),
        measurement.peak_rss_mib(),
        measurement.commits_per_second(),
    )
}

pub(super) const HEADER: &str =
    "run        events     events/s   finished/s  seconds cpu s/M ev  RSS MiB  commits/s";

/// Prints the medians of every mode, the ratios b/a and c/a, and the most commit requests any
/// run sent per interval; returns the raw rate (events/s).
pub(super) fn medians(results: &BTreeMap<Mode, Vec<Measurement>>, options: &BenchOptions) -> f64 {
    let figures = |mode: Mode| results.get(&mode).map(Vec::as_slice).unwrap_or_default();
    let rate = |mode: Mode| median_of(figures(mode), Measurement::rate);
    let raw = rate(Mode::Raw);
    println!();
    println!("medians of {} runs:", options.runs);
    for (label, mode) in [
        ("(a) raw librdkafka", Mode::Raw),
        ("(b) pipeline, null sinks", Mode::Null),
        ("(c) pipeline, kafka sinks", Mode::Kafka),
        ("(d) pipeline, http sinks", Mode::Http),
        ("(e) kafka sinks, exactly-once", Mode::KafkaEos),
        ("(f) fan-out to 3 null routes", Mode::FanOut),
        ("(g) null sinks, transforms", Mode::Transforms),
        ("(h) pipeline, otlp sinks", Mode::Otlp),
        ("(i) pipeline, loki sinks", Mode::Loki),
        ("(j) object store, gzip", Mode::ObjectStore),
    ] {
        let runs = figures(mode);
        if runs.is_empty() {
            continue;
        }
        let finished = median_of(runs, |m| m.finished_rate().unwrap_or(f64::NAN));
        let finished = if finished.is_nan() {
            String::new()
        } else {
            format!(" ({finished:.0} until finished)")
        };
        println!(
            "{label:<27} {:>10.0} events/s{finished}  {:>6.2} cpu s/M ev  {:>6.1} MiB peak RSS  {:>5.2} commits/s",
            median_of(runs, Measurement::rate),
            median_of(runs, Measurement::cpu_per_million),
            median_of(runs, Measurement::peak_rss_mib),
            median_of(runs, Measurement::commits_per_second),
        );
    }
    println!(
        "b/a = {:.2} (target >= 0.90)   c/a = {:.2} (target >= 0.50)   d/a = {:.2}   e/a = {:.2}   e/c = {:.2} (exactly-once against at-least-once)",
        rate(Mode::Null) / raw,
        rate(Mode::Kafka) / raw,
        rate(Mode::Http) / raw,
        rate(Mode::KafkaEos) / raw,
        rate(Mode::KafkaEos) / rate(Mode::Kafka)
    );
    if !figures(Mode::Loki).is_empty() {
        let cpu = |mode: Mode| median_of(figures(mode), Measurement::cpu_per_million);
        println!(
            "i/a = {:.2}   i/d = {:.2} (loki against http)   cpu per event: i {:.2}x of d",
            rate(Mode::Loki) / raw,
            rate(Mode::Loki) / rate(Mode::Http),
            cpu(Mode::Loki) / cpu(Mode::Http),
        );
    }
    if !figures(Mode::ObjectStore).is_empty() {
        let cpu = |mode: Mode| median_of(figures(mode), Measurement::cpu_per_million);
        println!(
            "j/a = {:.2}   j/d = {:.2} (object store against http)   cpu per event: j {:.2}x of d, {:.2}x of b",
            rate(Mode::ObjectStore) / raw,
            rate(Mode::ObjectStore) / rate(Mode::Http),
            cpu(Mode::ObjectStore) / cpu(Mode::Http),
            cpu(Mode::ObjectStore) / cpu(Mode::Null),
        );
    }
    if !figures(Mode::FanOut).is_empty() || !figures(Mode::Transforms).is_empty() {
        let cpu = |mode: Mode| median_of(figures(mode), Measurement::cpu_per_million);
        println!(
            "f/b = {:.2}   g/b = {:.2} (against one plain route per event)   cpu per event: f {:.2}x, g {:.2}x of b",
            rate(Mode::FanOut) / rate(Mode::Null),
            rate(Mode::Transforms) / rate(Mode::Null),
            cpu(Mode::FanOut) / cpu(Mode::Null),
            cpu(Mode::Transforms) / cpu(Mode::Null),
        );
    }
    let finished = |mode: Mode| median_of(figures(mode), |m| m.finished_rate().unwrap_or(f64::NAN));
    let finished_raw = finished(Mode::Raw);
    let finished = |mode: Mode| finished(mode) / finished_raw;
    println!(
        "until the last record finished (before the wait for the next commit interval): b/a = {:.2}   c/a = {:.2}   d/a = {:.2}",
        finished(Mode::Null),
        finished(Mode::Kafka),
        finished(Mode::Http)
    );
    let interval = options.commit_interval_ms as f64 / 1000.0;
    if !figures(Mode::Otlp).is_empty() {
        let cpu = |mode: Mode| median_of(figures(mode), Measurement::cpu_per_million);
        println!(
            "h/a = {:.2}   h/d = {:.2} (OTLP protobuf and gzip against NDJSON)   cpu per event: h {:.2}x of d",
            rate(Mode::Otlp) / raw,
            rate(Mode::Otlp) / rate(Mode::Http),
            cpu(Mode::Otlp) / cpu(Mode::Http),
        );
    }
    let per_interval = [
        Mode::Null,
        Mode::Kafka,
        Mode::KafkaEos,
        Mode::Http,
        Mode::Otlp,
    ]
    .iter()
    .flat_map(|mode| figures(*mode))
    .map(|m| m.commits as f64 / (m.seconds / interval).ceil().max(1.0))
    .fold(0.0, f64::max);
    println!(
        "commit requests per {} ms interval: at most {per_interval:.2} in any run (target <= 1)",
        options.commit_interval_ms
    );

    raw
}

/// Prints how peak RSS changed from the smallest backlog to the largest.
pub(super) fn ceiling_change(ceiling: &[(u64, Measurement)]) {
    if let (Some((first, base)), Some((last, top))) = (ceiling.first(), ceiling.last()) {
        if first != last {
            println!(
                "peak RSS at {last} vs {first}: {:+.1} % (target within ±10 %; <= 96 MiB at 1M)",
                (top.peak_rss_mib() / base.peak_rss_mib() - 1.0) * 100.0
            );
        }
    }
}

/// The objects the object-store runs wrote (each run's directory, removed after): how many, how
/// many records they hold and their sizes, compressed and as NDJSON.
pub(super) fn objects(topic: &str, runs: usize, events: u64) {
    let mut sizes: Vec<u64> = Vec::new();
    let mut lines = 0u64;
    let mut raw_bytes = 0u64;
    let mut runs_found = 0;
    for round in 1..=runs {
        let group = format!("{topic}-{}-{round}", Mode::ObjectStore.as_str());
        let dir = super::object_dir(&group);
        if !dir.exists() {
            continue;
        }
        runs_found += 1;
        let mut pending = vec![dir.clone()];
        while let Some(next) = pending.pop() {
            for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|ext| ext == "gz") {
                    sizes.push(entry.metadata().map_or(0, |m| m.len()));
                    // What the object holds, read back as a reader of the archive would.
                    let mut text = Vec::new();
                    if let Ok(file) = std::fs::File::open(&path) {
                        use std::io::Read as _;
                        let _ = flate2::read::GzDecoder::new(file).read_to_end(&mut text);
                    }
                    lines += text.iter().filter(|byte| **byte == b'\n').count() as u64;
                    raw_bytes += text.len() as u64;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if sizes.is_empty() {
        return;
    }
    sizes.sort_unstable();
    let total: u64 = sizes.iter().sum();
    let kib = |bytes: u64| bytes as f64 / 1024.0;
    println!(
        "object-store objects: {} in {runs_found} runs holding {lines} events ({} read by the runs, {:.0} per object), {:.1} KiB median, {:.1} KiB largest, {:.2} bytes per event compressed ({:.1}x smaller than the NDJSON)",
        sizes.len(),
        events * runs_found,
        lines as f64 / sizes.len() as f64,
        kib(sizes[sizes.len() / 2]),
        kib(sizes[sizes.len() - 1]),
        total as f64 / lines.max(1) as f64,
        raw_bytes as f64 / total.max(1) as f64,
    );
}
