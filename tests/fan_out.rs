//! One event, several destinations, on Apache Kafka (this binary's shared broker):
//!
//! - an event matching three routes (`continue = true`) reaches all three, and its offset is
//!   committed only once the last has finished: one destination slow (held), one refusing
//!   (503) and then recovering; per-key order holds in each destination;
//! - a SIGKILL while one destination has every event and the other none: the next run gives
//!   the second every event (it never had them) and the first its copies again (duplicates
//!   there, as the README says; nothing lost anywhere);
//! - all of it at once: a steady stream with malformed records, small channels (backpressure),
//!   a second instance joining (rebalance), the HTTP destination down for seconds, and the
//!   first instance SIGKILLed and restarted: both routes end with every event, commits at the
//!   end.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::collector::Collector;
use common::process::Logbridge;
use common::stream::{test_rng, Stream};
use common::*;
use logbridge::metrics::Metrics;
use logbridge::pipeline::{HttpBind, RunOptions};
use logbridge::sink::{DeliveryFuture, Sink, SinkFactory};

/// The configuration's sinks, with every batch of route `slow` held (not failed: its delivery
/// just does not end) while `hold` is set.
fn slow_route_held(hold: Arc<AtomicBool>) -> SinkFactory {
    let sinks = logbridge::sink::config_sink_factory();
    Arc::new(move |route, index, links| {
        let inner = sinks(route, index, links)?;
        Ok(Box::new(Held {
            inner,
            hold: (route.name == "slow").then(|| hold.clone()),
        }) as Box<dyn Sink>)
    })
}

struct Held {
    inner: Box<dyn Sink>,
    hold: Option<Arc<AtomicBool>>,
}

impl Sink for Held {
    fn deliver<'a>(
        &'a mut self,
        route: &'a str,
        batch: &'a [logbridge::record::Record],
    ) -> DeliveryFuture<'a> {
        Box::pin(async move {
            while self
                .hold
                .as_ref()
                .is_some_and(|hold| hold.load(Ordering::Relaxed))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.inner.deliver(route, batch).await
        })
    }
}

fn keyed(ids: std::ops::Range<u64>) -> Vec<(Option<String>, Vec<u8>)> {
    ids.map(|id| (Some(format!("key-{}", id % 20)), event(id, "error")))
        .collect()
}

/// The route of every level to a file in `dir`, handing its events on (`continue`).
fn archive_route(dir: &Path, name: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nlevels = [\"error\", \"warning\", \"info\"]\ncontinue = true\n\
         workers = 2\nsink = {{ type = \"file\", path = \"{}\" }}\n",
        dir.join(format!("{name}.jsonl")).display()
    )
}

fn http_route(url: &str) -> String {
    format!(
        "[[routes]]\nname = \"alerts\"\nlevels = [\"error\"]\nworkers = 2\nretry_backoff_ms = 50\n\
         retry_backoff_max_ms = 200\nsink = {{ type = \"http\", url = \"{url}/ingest\", max_records = 25 }}\n"
    )
}

/// Each key's offsets (or ids) in the order a destination received them are increasing.
fn assert_in_order_per_key(what: &str, seen: impl IntoIterator<Item = (String, i64)>) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for (key, position) in seen {
        if let Some(before) = last.insert(key.clone(), position) {
            assert!(
                before < position,
                "{what}: key {key} out of order: {before} then {position}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_three_routes_is_committed_only_once_the_last_has_finished() {
    let _serial = serial().await;
    const EVENTS: u64 = 600;
    let kafka = Kafka::shared("fan-out", 3).await;
    kafka.produce(&keyed(0..EVENTS)).await;
    let end = kafka.end_offsets();
    let collector = Collector::start(Arc::new(|_: &[u64]| 503)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let group = unique("fan-out");
    let routes = format!(
        "{}{}{}",
        archive_route(dir.path(), "archive"),
        archive_route(dir.path(), "slow"),
        http_route(&collector.url())
    );
    let config = kafka.config(&group, "commit_interval_ms = 200", &routes);
    let metrics = Arc::new(Metrics::new());
    let hold = Arc::new(AtomicBool::new(true));
    let pipeline = Running::start(
        config,
        RunOptions {
            sink_factory: slow_route_held(hold.clone()),
            metrics: metrics.clone(),
            http: HttpBind::Disabled,
        },
    );
    let lines = |name: &str| read_lines(&[dir.path().join(format!("{name}.jsonl"))]);

    // The archive has every event, the slow route none, the HTTP route refuses them all.
    let archived = wait_for(Duration::from_secs(60), || async {
        lines("archive").len() as u64 == EVENTS && collector.with(|seen| seen.refused) > 0
    })
    .await;
    assert!(archived, "the archive did not get all {EVENTS} events");
    // Several commit intervals pass: nothing may be committed while two routes are unfinished.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        kafka.committed_records(&group),
        0,
        "committed while the slow and the failing route had not finished"
    );
    assert!(lines("slow").is_empty());

    // The slow route catches up; the HTTP route still refuses: still nothing committed.
    hold.store(false, Ordering::Relaxed);
    let slow_done = wait_for(Duration::from_secs(60), || async {
        lines("slow").len() as u64 == EVENTS
    })
    .await;
    assert!(slow_done, "the slow route did not get all {EVENTS} events");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        kafka.committed_records(&group),
        0,
        "committed while the HTTP route had delivered nothing"
    );

    // The destination recovers: every record finishes everywhere and is committed.
    collector.set_rule(Arc::new(|_: &[u64]| 200));
    let committed = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    pipeline.stop().await;
    assert!(committed, "commits did not reach {end:?}");
    collector.check();

    for name in ["archive", "slow"] {
        let lines = lines(name);
        let counts = id_counts(&lines);
        assert_eq!(counts.len() as u64, EVENTS, "{name}: distinct events");
        assert!(counts.values().all(|&n| n == 1), "{name}: each event once");
        assert_in_order_per_key(
            name,
            lines.iter().map(|line| {
                (
                    line["key"].as_str().expect("key").to_string(),
                    line["offset"].as_i64().expect("offset"),
                )
            }),
        );
    }
    let accepted: Vec<u64> = collector.with(|seen| seen.ids_of(0));
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for id in &accepted {
        *counts.entry(*id).or_default() += 1;
    }
    assert_eq!(counts.len() as u64, EVENTS, "alerts: distinct events");
    assert!(counts.values().all(|&n| n == 1), "alerts: each event once");
    // Ids grow with offsets within a key (one producer, one partition per key).
    assert_in_order_per_key(
        "alerts",
        accepted
            .iter()
            .map(|id| (format!("key-{}", id % 20), *id as i64)),
    );
    for route in ["archive", "slow", "alerts"] {
        assert_eq!(
            metrics
                .finished
                .with_label_values(&[route, "processed"])
                .get(),
            EVENTS,
            "{route}: finished as processed"
        );
        assert_eq!(
            metrics
                .route_events
                .with_label_values(&[route, "matched"])
                .get(),
            EVENTS,
            "{route}: matched"
        );
    }
    assert!(metrics.retries.with_label_values(&["alerts"]).get() > 0);
    println!(
        "fan-out: {EVENTS} events to 3 routes, alerts refused {} requests before it recovered",
        collector.with(|seen| seen.refused)
    );
}

fn start_child(kafka: &Kafka, group: &str, work: &Path, name: &str, routes: &str) -> Logbridge {
    start_child_with(kafka, group, work, name, "", routes)
}

fn start_child_with(
    kafka: &Kafka,
    group: &str,
    work: &Path,
    name: &str,
    pipeline: &str,
    routes: &str,
) -> Logbridge {
    let text = format!(
        "{kafka}\n[pipeline]\ncommit_interval_ms = 200\ndrain_timeout_ms = 1000\n{pipeline}\n[http]\nlisten = \"127.0.0.1:0\"\n{routes}",
        kafka = kafka_section(
            &kafka.brokers,
            group,
            &kafka.topic,
            "\"heartbeat.interval.ms\" = 1000\n"
        ),
    );
    let config = work.join(format!("{name}.toml"));
    std::fs::write(&config, text).expect("write config");
    Logbridge::start(&config, work.join(format!("{name}.log")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_deliveries_replays_to_the_route_that_had_not_finished() {
    let _serial = serial().await;
    const EVENTS: u64 = 400;
    let kafka = Kafka::shared("fan-out-kill", 2).await;
    let collector = Collector::start(Arc::new(|_: &[u64]| 503)).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("fan-out-kill");
    let routes = format!(
        "{}{}",
        archive_route(work.path(), "archive"),
        http_route(&collector.url())
    );
    kafka.produce(&keyed(0..EVENTS)).await;
    collector.set_run(1);
    let mut child = start_child(&kafka, &group, work.path(), "run-1", &routes);
    let archive = work.path().join("archive.jsonl");
    let staged = wait_for(Duration::from_secs(60), || async {
        read_lines(std::slice::from_ref(&archive)).len() as u64 == EVENTS
            && collector.with(|seen| seen.refused) > 0
    })
    .await;
    assert!(staged, "run 1 did not archive every event");
    child.kill();
    assert_eq!(
        kafka.committed_records(&group),
        0,
        "nothing finished at the HTTP route, so nothing may have been committed"
    );

    collector.set_rule(Arc::new(|_: &[u64]| 200));
    collector.set_run(2);
    let child = start_child(&kafka, &group, work.path(), "run-2", &routes);
    let end = kafka.end_offsets();
    let committed = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(90))
        .await;
    drop(child);
    assert!(committed, "run 2 did not commit to {end:?}");
    collector.check();

    let delivered = collector.with(|seen| seen.ids_of(2));
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for id in &delivered {
        *counts.entry(*id).or_default() += 1;
    }
    assert_eq!(
        counts.len() as u64,
        EVENTS,
        "the HTTP route got every event after the crash"
    );
    let archived = id_counts(&read_lines(&[archive]));
    assert_eq!(archived.len() as u64, EVENTS, "the archive lost nothing");
    let twice = archived.values().filter(|&&n| n > 1).count();
    println!(
        "crash between deliveries: alerts got {} ids once each after the restart; the archive holds {} of {EVENTS} twice (replayed, as at-least-once allows)",
        counts.len(),
        twice
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_through_backpressure_a_rebalance_a_failing_destination_and_a_sigkill() {
    let _serial = serial().await;
    use rand::Rng;
    let kafka = Kafka::shared("fan-out-combo", 4).await;
    let collector = Collector::start(Arc::new(|_: &[u64]| 200)).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("fan-out-combo");
    let mut rng = test_rng("fan-out combination");
    // Small channels, so the router waits on full workers and the consumer pauses.
    let pipeline = "router_capacity = 128\nworker_capacity = 32";
    let routes = |out: &Path| {
        format!(
            "[[routes]]\nname = \"archive\"\nlevels = [\"trace\", \"debug\", \"info\", \"warning\", \"error\", \"fatal\"]\n\
             continue = true\nworkers = 2\nsink = {{ type = \"file\", path = \"{}\" }}\n\
             [[routes]]\nname = \"alerts\"\nlevels = [\"error\", \"fatal\"]\nworkers = 2\n\
             when = {{ field = \"code\", gte = 500 }}\ntransforms = [ {{ set = \"alerted\", value = true }} ]\n\
             retry_backoff_ms = 50\nretry_backoff_max_ms = 300\n\
             sink = {{ type = \"http\", url = \"{}/ingest\", max_records = 20 }}\n",
            out.join("archive.jsonl").display(),
            collector.url()
        )
    };
    let instance = |name: &str| {
        let out = work.path().join(name);
        let child = start_child_with(&kafka, &group, work.path(), name, pipeline, &routes(&out));
        (child, out)
    };
    let stream = Stream::start(&kafka, 1_500, 9_000, 200, 0.02, rng.random());
    let (mut first, first_out) = instance("a-1");
    tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..2_500))).await;
    let (second, second_out) = instance("b");
    // The destination goes down while the group rebalances.
    collector.set_rule(Arc::new(|_: &[u64]| 503));
    tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_000))).await;
    first.kill();
    let (restarted, restarted_out) = instance("a-2");
    tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..2_000))).await;
    let refused = collector.with(|seen| seen.refused);
    collector.set_rule(Arc::new(|_: &[u64]| 200));
    let produced = stream.until_cap().await;
    let end = kafka.end_offsets();
    let committed = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    drop((second, restarted));
    assert!(committed, "commits did not reach {end:?}");
    assert!(
        refused > 0,
        "the destination refused nothing while it was down"
    );
    collector.check();

    let archived = read_lines(&[
        first_out.join("archive.jsonl"),
        second_out.join("archive.jsonl"),
        restarted_out.join("archive.jsonl"),
    ]);
    let archive_counts = id_counts(&archived);
    let (lost, archive_twice) = produced.lost_and_duplicates(&archive_counts);
    assert_eq!(lost, 0, "events missing from the archive");
    let errors: HashSet<u64> = archived
        .iter()
        .filter(|line| matches!(line["event"]["level"].as_str(), Some("error" | "fatal")))
        .map(|line| line["event"]["id"].as_u64().expect("id"))
        .collect();
    let mut alerted: HashMap<u64, usize> = HashMap::new();
    for id in collector.with(|seen| seen.ids_of(0)) {
        *alerted.entry(id).or_default() += 1;
    }
    let missing: Vec<&u64> = errors
        .iter()
        .filter(|id| !alerted.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "errors never alerted: {missing:?}");
    assert!(
        alerted.keys().all(|id| errors.contains(id)),
        "only errors are alerted"
    );
    let alerts_twice: usize = alerted.values().map(|n| n - 1).sum();
    println!(
        "fan-out combination: {} events, {} errors; archive {archive_twice} written twice, alerts {alerts_twice} twice; {refused} requests refused",
        produced.valid_ids.len(),
        errors.len()
    );
}
