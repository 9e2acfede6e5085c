//! The decoder cost: CPU seconds per million events of each input format, on one thread, over
//! the benchmark's own events (which both formats read) and, for `auto`, over the same events
//! as pino writes them (a numeric `level`, `msg`, `time`).

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::measurement::{median, thread_cpu_seconds};
use super::options::BenchOptions;
use crate::event::InputFormat;
use crate::tools::produce::{pad_event, sample_event};

/// Events decoded per run of each format.
const EVENTS: u64 = 200_000;

/// Measures and prints the decoder cost of both formats (medians of `options.runs`).
pub(super) fn decoder_cost(options: &BenchOptions) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut strict = Vec::with_capacity(EVENTS as usize);
    let mut pino = Vec::with_capacity(EVENTS as usize);
    for id in 0..EVENTS {
        let (_, mut payload, _) = sample_event(&mut rng, id, options.keys, 0.0);
        let event: serde_json::Value = serde_json::from_slice(&payload)?;
        let level = match event["level"].as_str() {
            Some("trace") => 10,
            Some("debug") => 20,
            Some("info") => 30,
            Some("warning") => 40,
            Some("error") => 50,
            _ => 60,
        };
        let mut logged = serde_json::json!({
            "level": level, "time": 1_796_000_000_000u64 + id, "pid": 4242,
            "hostname": "web-1", "id": id, "msg": event["message"],
        })
        .to_string()
        .into_bytes();
        pad_event(&mut payload, options.payload_bytes);
        pad_event(&mut logged, options.payload_bytes);
        strict.push(payload);
        pino.push(logged);
    }
    let cases: [(&str, InputFormat, &[Vec<u8>]); 3] = [
        (
            "logbridge format, logbridge events",
            InputFormat::Logbridge,
            &strict,
        ),
        ("auto format, logbridge events", InputFormat::Auto, &strict),
        ("auto format, pino events", InputFormat::Auto, &pino),
    ];
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..options.runs {
        for ((_, format, payloads), costs) in cases.iter().zip(&mut costs) {
            costs.push(cost(*format, payloads)?);
        }
    }
    println!();
    println!(
        "decoder cost: {EVENTS} events of {} bytes per run, one thread, medians of {} runs",
        options.payload_bytes, options.runs
    );
    let medians: Vec<f64> = costs.into_iter().map(median).collect();
    for ((name, _, _), median) in cases.iter().zip(&medians) {
        println!("{name:<36} {median:.3} cpu s/M ev");
    }
    println!(
        "auto / logbridge on the same events = {:.2} (target <= 1.20)",
        medians[1] / medians[0]
    );
    Ok(())
}

/// CPU seconds per million events to decode every payload's level in `format`; fails if one
/// does not decode (the benchmark's events are all valid).
fn cost(format: InputFormat, payloads: &[Vec<u8>]) -> anyhow::Result<f64> {
    let started = thread_cpu_seconds();
    let mut refused = 0usize;
    for payload in payloads {
        let level = format.decode_level(Some(std::hint::black_box(payload)), usize::MAX);
        refused += usize::from(std::hint::black_box(level).is_err());
    }
    let seconds = thread_cpu_seconds() - started;
    anyhow::ensure!(
        refused == 0,
        "{format:?} refused {refused} benchmark events"
    );
    Ok(seconds * 1e6 / payloads.len().max(1) as f64)
}
