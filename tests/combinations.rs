//! Conditions that production meets together, staged together on Apache Kafka: a crash or a
//! shutdown while a destination fails or holds a record, with the README's bound on what is
//! delivered again checked against what the destination received. Each test also asserts that
//! the combination really happened (the partition was paused behind the stuck record, the
//! destination refused while the process stopped), so none passes because a condition was
//! never met.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::collector::Collector;
use common::process::Logbridge;
use common::stream::{test_rng, Stream};
use common::*;
use rand::Rng;

/// `commit_interval_ms` of these tests' configs.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Beyond the interval: the commit's round trip, and a tick served late on a loaded machine
/// (as in `tests/crash.rs`).
const COMMIT_SLACK: Duration = Duration::from_secs(1);

/// Starts `logbridge run` as `name` in `work` with `pipeline` lines and `routes`.
fn start_child(
    kafka: &Kafka,
    group: &str,
    work: &Path,
    name: &str,
    pipeline: &str,
    routes: &str,
) -> Logbridge {
    // Port 0: the process binds its own and logs it (no port released and taken again).
    let text = format!(
        "{kafka}\n[pipeline]\n{pipeline}\n[http]\nlisten = \"127.0.0.1:0\"\n{routes}",
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

/// The value of the series `name{labels}` (e.g. `reason="uncommitted"`, its labels from the
/// first), if the process answers and has it.
async fn labelled(child: &Logbridge, name: &str, labels: &str) -> Option<f64> {
    let page = child.metrics_page().await?;
    metric_samples(&page, &format!("{name}{{{labels}"))
        .first()
        .copied()
}

/// `/status`'s partition rows: (partition, paused_why, finished_uncommitted, in_flight), -1
/// where a figure is `null`.
async fn status_of(child: &Logbridge) -> Vec<(i64, String, i64, i64)> {
    let (code, body) = http_get(child.address().await, "/status").await;
    assert_eq!(code, 200, "/status: {body}");
    let status = parse_json("/status", &body);
    json_array(&status, "/partitions")
        .iter()
        .map(|row| {
            (
                json_i64(row, "/partition"),
                json_at(row, "/paused_why").to_string(),
                json_opt_i64(row, "/finished_uncommitted").unwrap_or(-1),
                json_opt_i64(row, "/in_flight").unwrap_or(-1),
            )
        })
        .collect()
}

/// `/readyz` of `child`: its status and body, or `(0, "")` while it does not listen yet.
async fn readyz_of(child: &Logbridge) -> (u16, String) {
    let Some(address) = child.logged_address() else {
        return (0, String::new());
    };
    if tokio::net::TcpStream::connect(address).await.is_err() {
        return (0, String::new());
    }
    http_get(address, "/readyz").await
}

/// An HTTP route taking every event, retrying quickly.
fn http_route(url: &str, workers: usize) -> String {
    format!(
        "[[routes]]\nname = \"all\"\ndefault = true\nworkers = {workers}\nretry_backoff_ms = 50\n\
         retry_backoff_max_ms = 200\nsink = {{ type = \"http\", url = \"{url}/ingest\" }}\n"
    )
}

/// SIGTERM while the destination refuses everything: logbridge exits 1 and logs how many
/// records it abandoned, and those (no more, no fewer) are what the next run delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_destination_fails_abandons_exactly_what_the_next_run_delivers() {
    let _serial = serial().await;
    let kafka = Kafka::shared("combo-term", 4).await;
    let collector = Collector::start(Arc::new(|_: &[u64]| 200)).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-term");
    let routes = http_route(&collector.url(), 2);
    let pipeline = "commit_interval_ms = 200\ndrain_timeout_ms = 1000";
    let batch = |ids: std::ops::Range<u64>| -> Vec<(Option<String>, Vec<u8>)> {
        ids.map(|id| (Some(format!("key-{}", id % 20)), event(id, "error")))
            .collect()
    };

    // Run 1 delivers and commits the first 200, then the destination refuses everything and
    // 200 more arrive.
    kafka.produce(&batch(0..200)).await;
    collector.set_run(1);
    let mut child = start_child(&kafka, &group, work.path(), "run-1", pipeline, &routes);
    let committed = wait_for(Duration::from_secs(60), || async {
        kafka.committed_records(&group) == 200
    })
    .await;
    assert!(committed, "run 1 did not commit the first 200");
    collector.set_rule(Arc::new(|_: &[u64]| 503));
    kafka.produce(&batch(200..400)).await;
    // Until run 1 has read all 400 and the destination has refused some: every record it
    // holds is then one it cannot finish.
    let failing = wait_for(Duration::from_secs(60), || {
        let (child, collector) = (&child, &collector);
        async move {
            child.metric("logbridge_events_consumed_total").await == Some(400.0)
                && collector.with(|seen| seen.refused) > 0
        }
    })
    .await;
    assert!(
        failing,
        "run 1 never read all 400 while the destination refused"
    );
    let (status, took) = child.terminate(Duration::from_secs(10));
    let log = std::fs::read_to_string(work.path().join("run-1.log")).expect("run 1's log");
    let abandoned: Vec<u64> = log
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("shutdown abandoned ")? + "shutdown abandoned ".len()..];
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "run 1's exit status after its drain timeout cut work short (stopped in {took:?})"
    );
    assert_eq!(
        abandoned.len(),
        1,
        "one `shutdown abandoned N` line in run 1's log:\n{log}"
    );
    assert_eq!(
        kafka.committed_records(&group),
        200,
        "run 1 committed nothing it did not finish"
    );

    // Run 2, the destination healthy again, delivers what run 1 abandoned.
    collector.set_rule(Arc::new(|_: &[u64]| 200));
    collector.set_run(2);
    let mut child = start_child(&kafka, &group, work.path(), "run-2", pipeline, &routes);
    let end = kafka.end_offsets();
    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    let (status, _) = child.terminate(Duration::from_secs(10));
    assert!(done, "run 2 did not commit to the end");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "run 2's exit status"
    );
    collector.check();
    let (first, second) = collector.with(|seen| (seen.ids_of(1), seen.ids_of(2)));
    let delivered_again: HashSet<u64> = second.iter().copied().collect();
    println!(
        "SIGTERM x failing destination: exit 1 after {took:?}, abandoned {abandoned:?}; run 1 \
         delivered {}, run 2 delivered {}",
        first.len(),
        second.len()
    );
    assert_eq!(
        first.iter().copied().collect::<HashSet<u64>>(),
        (0..200).collect(),
        "run 1 delivered the first 200"
    );
    assert_eq!(
        delivered_again,
        (200..400).collect(),
        "run 2 delivered the rest"
    );
    assert_eq!(second.len(), delivered_again.len(), "each once");
    assert_eq!(
        abandoned[0],
        second.len() as u64,
        "what run 1 says it abandoned is what run 2 delivered"
    );
}

/// SIGKILL while one record is stuck (its destination refuses it) and the partitions are paused
/// at `max_uncommitted_records`: what the next run delivers again is within the README's bound:
/// what the killed run delivered in its last commit interval, plus per partition
/// `max_uncommitted_records` finished records behind an unfinished one, plus the records already
/// in flight when a partition paused (at most the in-flight bound), plus one batch per worker.
///
/// Seen before the README said so: every partition paused with about three times
/// `max_uncommitted_records` finished behind the stuck record's batch (the stuck worker's queue
/// holds records of every partition, and what was in flight when they paused still finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_record_is_stuck_replays_within_the_uncommitted_bound() {
    let _serial = serial().await;
    const STUCK: u64 = 3_000;
    const PARTITIONS: u64 = 4;
    const MAX_UNCOMMITTED: u64 = 100;
    // Eight workers: while the stuck record's worker retries (taking nothing new), the other
    // seven go on until its queue is full and holds the router up; by then more than a hundred
    // records of each partition have finished behind the records waiting in that queue.
    const WORKERS: u64 = 8;
    // The README's record bound for `router_capacity = 256`, `worker_capacity = 256`, eight
    // workers of a non-Kafka sink (s = 1), b = min(256, 256) = 256:
    // 256 + min(256, 256) + 8 × (256 + 1 × 256) + max(2, ⌈256 / 64⌉) × 256.
    const IN_FLIGHT_BOUND: u64 = 256 + 256 + 8 * (256 + 256) + 4 * 256;
    let kafka = Kafka::shared("combo-stuck", PARTITIONS as i32).await;
    let collector = Collector::start(Arc::new(
        |ids: &[u64]| {
            if ids.contains(&STUCK) {
                503
            } else {
                200
            }
        },
    ))
    .await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-stuck");
    let routes = http_route(&collector.url(), WORKERS as usize);
    let pipeline =
        format!("commit_interval_ms = 200\ndrain_timeout_ms = 1000\nrouter_capacity = 256\nworker_capacity = 256\nmax_uncommitted_records = {MAX_UNCOMMITTED}");
    let mut rng = test_rng("SIGKILL x stuck record");
    let stream = Stream::start(&kafka, 4_000, 400_000, 1_000, 0.0, rng.random());

    collector.set_run(1);
    let mut child = start_child(&kafka, &group, work.path(), "run-1", &pipeline, &routes);
    let paused = wait_for(Duration::from_secs(60), || {
        let child = &child;
        async move {
            labelled(
                child,
                "logbridge_paused_partitions",
                "reason=\"uncommitted\"",
            )
            .await
            .is_some_and(|paused| paused >= 1.0)
        }
    })
    .await;
    assert!(
        paused,
        "the partition of the stuck record was never paused at max_uncommitted_records"
    );
    // Long enough after the pause that run 1 has caught up with the producer: its last
    // interval holds the steady rate, not the start's backlog.
    tokio::time::sleep(Duration::from_millis(rng.random_range(3_000..5_000))).await;
    let rows = status_of(&child).await;
    child.kill();
    let killed_at = Instant::now();
    let last_interval = collector.with(|seen| {
        seen.accepted
            .iter()
            .filter(|(run, at, _)| *run == 1 && *at + COMMIT_INTERVAL + COMMIT_SLACK >= killed_at)
            .count() as u64
    });
    let bound = last_interval + PARTITIONS * MAX_UNCOMMITTED + IN_FLIGHT_BOUND + WORKERS * 256;

    collector.set_rule(Arc::new(|_: &[u64]| 200));
    collector.set_run(2);
    let child = start_child(&kafka, &group, work.path(), "run-2", &pipeline, &routes);
    let produced = last_run(&kafka, &group, child, stream).await;
    collector.check();

    let (first, second) = collector.with(|seen| (seen.ids_of(1), seen.ids_of(2)));
    let second: HashSet<u64> = second.into_iter().collect();
    let duplicates = first.iter().filter(|id| second.contains(id)).count() as u64;
    // Delivered again though run 1 delivered them before its last interval: only records
    // finished behind the stuck one (and a batch per worker) can be.
    let window_start = killed_at - COMMIT_INTERVAL - COMMIT_SLACK;
    let old_duplicates = collector.with(|seen| {
        seen.accepted
            .iter()
            .filter(|(run, at, id)| *run == 1 && *at < window_start && second.contains(id))
            .count() as u64
    });
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for id in first.iter().chain(second.iter()) {
        *seen.entry(*id).or_default() += 1;
    }
    let lost = produced
        .valid_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    println!("run 1's partitions before the kill (partition, paused why, finished uncommitted, in flight): {rows:?}");
    println!(
        "SIGKILL x stuck record: run 1 delivered {} ({last_interval} in its last {:?}), run 2 {}; \
         delivered again {duplicates} ({old_duplicates} delivered before that interval), bound \
         {bound} = {last_interval} + {PARTITIONS} x {MAX_UNCOMMITTED} uncommitted + \
         {IN_FLIGHT_BOUND} in flight + {WORKERS} x 256; lost {lost}",
        first.len(),
        COMMIT_INTERVAL + COMMIT_SLACK,
        second.len()
    );
    assert_eq!(lost, 0, "events lost");
    assert!(
        second.contains(&STUCK),
        "the stuck record delivered by run 2"
    );
    assert!(
        !first.contains(&STUCK),
        "the stuck record was refused in run 1"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} delivered again exceed the README's bound {bound}"
    );
}

/// The last run of a crash test: it reads while the producer still writes for 2 s, then the
/// producer stops, and the run must commit to the end and exit 0. Returns what was produced.
async fn last_run(kafka: &Kafka, group: &str, mut child: Logbridge, stream: Stream) -> Produced {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let produced = stream.finish().await;
    let end = kafka.end_offsets();
    let done = kafka
        .wait_committed_to(group, &end, Duration::from_secs(120))
        .await;
    let (status, _) = child.terminate(Duration::from_secs(10));
    assert!(done, "the last run did not commit to the end");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the last run's exit status"
    );
    produced
}

/// Waits until `run`'s child has read something, then a random 1.5 to 3 s more: a moment
/// mid-stream to kill it at.
async fn mid_stream(child: &Logbridge, run: usize, rng: &mut impl Rng) {
    assert!(
        child.wait_consuming(Duration::from_secs(60)).await,
        "run {run} never started consuming"
    );
    tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_000))).await;
}

/// How many documents `run` created in the index are at or past the group's committed offset
/// of their partition: killed now, the process leaves them to the next run, which sends them
/// again (409s). Only this run's own: what an earlier run left is there at once, and is no
/// sign that this run got going. The sink's `_id`s are `{topic}-{partition}-{offset}`, then the
/// record's timestamp where it has one.
fn indexed_past_commit(collector: &Collector, kafka: &Kafka, group: &str, run: usize) -> usize {
    let committed = kafka.committed(group);
    let prefix = format!("{}-", kafka.topic);
    collector.with(|seen| {
        let created: HashSet<u64> = seen.ids_of(run).into_iter().collect();
        seen.documents
            .iter()
            .filter(|(_, event)| created.contains(event))
            .filter(|(id, _)| {
                let place = id.strip_prefix(&prefix).unwrap_or_else(|| {
                    panic!("a document `_id` not of topic {}: {id}", kafka.topic)
                });
                let mut parts = place.split('-').map(|part| {
                    part.parse::<i64>()
                        .unwrap_or_else(|_| panic!("an `_id` not of numbers after the topic: {id}"))
                });
                let (Some(partition), Some(offset)) = (parts.next(), parts.next()) else {
                    panic!("an `_id` without a partition and an offset: {id}");
                };
                offset >= committed[partition as usize]
            })
            .count()
    })
}

/// Elasticsearch sink x three SIGKILLs mid-stream: the replay after each crash reaches the
/// index again, which refuses every `_id` it holds (409, counted as delivered), so the index
/// holds each valid event exactly once, as the README says; and the replay really happened
/// (conflicts were answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_an_elasticsearch_sink_indexes_each_event_once() {
    let _serial = serial().await;
    const KILLS: usize = 3;
    let kafka = Kafka::shared("combo-es", 4).await;
    let collector = Collector::start(Arc::new(|_: &[u64]| 200)).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-es");
    let routes = format!(
        "[[routes]]\nname = \"all\"\ndefault = true\nworkers = 4\n\
         sink = {{ type = \"elasticsearch\", url = \"{}\", index = \"logs-{{level}}\" }}\n",
        collector.url()
    );
    // Commits a second apart (the producer writes every 250 ms): a replay is staged, not hoped
    // for. Each kill waits, after its random moment, until the index holds a document the group
    // has not committed past and this run created (with commits 200 ms apart, CI once saw three
    // kills replay nothing).
    let pipeline = "commit_interval_ms = 1000\ndrain_timeout_ms = 1000";
    let mut rng = test_rng("SIGKILL x Elasticsearch sink");
    let stream = Stream::start(&kafka, 3_000, 400_000, 1_000, 0.0, rng.random());
    let mut left_to_replay = Vec::new();
    for run in 0..KILLS {
        collector.set_run(run);
        let name = format!("run-{run}");
        let mut child = start_child(&kafka, &group, work.path(), &name, pipeline, &routes);
        mid_stream(&child, run, &mut rng).await;
        let mut left = 0;
        wait_for(Duration::from_secs(10), || {
            left = indexed_past_commit(&collector, &kafka, &group, run);
            async move { left > 0 }
        })
        .await;
        child.kill();
        assert!(
            left > 0,
            "run {run}: for 10 s the index held nothing this run created that the group had \
             not committed past"
        );
        left_to_replay.push(left);
    }
    collector.set_run(KILLS);
    let child = start_child(&kafka, &group, work.path(), "last", pipeline, &routes);
    let produced = last_run(&kafka, &group, child, stream).await;
    collector.check();

    let (documents, conflicts, per_run) = collector.with(|seen| {
        let mut per_event: HashMap<u64, usize> = HashMap::new();
        for event in seen.documents.values() {
            *per_event.entry(*event).or_default() += 1;
        }
        let per_run: Vec<usize> = (0..=KILLS).map(|run| seen.ids_of(run).len()).collect();
        (per_event, seen.conflicts, per_run)
    });
    let indexed: HashSet<u64> = documents.keys().copied().collect();
    println!(
        "SIGKILL x Elasticsearch sink: {} events, {KILLS} kills, documents created per run \
         {per_run:?}, indexed past the group's commit at each kill {left_to_replay:?}, \
         {conflicts} answered 409 (replayed, already indexed)",
        produced.valid_ids.len()
    );
    assert_eq!(indexed, produced.valid_ids, "every valid event indexed");
    assert!(
        documents.values().all(|copies| *copies == 1),
        "an event indexed under two `_id`s"
    );
    assert!(
        conflicts > 0,
        "no replay reached the index, though each kill left documents past the group's commit: \
         {left_to_replay:?}"
    );
    assert!(
        per_run[..KILLS].iter().all(|created| *created > 0),
        "every killed run indexed something: {per_run:?}"
    );
}

/// A Kafka sink and a dead-letter topic x three SIGKILLs mid-stream (the sink's producer has
/// batches in flight): every valid event reaches the output topic and every malformed record
/// the dead-letter topic, and what a crash writes twice is within the README's bound per kill:
/// a commit interval of the producer's pace (the instance keeps up with it) plus
/// `sink_batches_in_flight` batches per worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_kafka_sink_and_dead_letters_loses_nothing() {
    let _serial = serial().await;
    const KILLS: u64 = 3;
    const PER_SECOND: u64 = 3_000;
    const WORKERS: u64 = 4;
    // README: `sink_batches_in_flight` (default 4) batches of `min(worker_capacity, 256)`
    // records per worker of a Kafka route.
    const BATCHES_IN_FLIGHT: u64 = 4;
    let kafka = Kafka::shared("combo-kafka", 4).await;
    let out = format!("{}-out", kafka.topic);
    let dlq = format!("{}-dlq", kafka.topic);
    kafka.create_external_topic(&out, 4).await;
    kafka.create_external_topic(&dlq, 1).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-kafka");
    let routes = format!(
        "[[routes]]\nname = \"all\"\ndefault = true\nworkers = {WORKERS}\n\
         sink = {{ type = \"kafka\", topic = \"{out}\" }}\n[dead_letter]\ntopic = \"{dlq}\"\n"
    );
    let pipeline = "commit_interval_ms = 200\ndrain_timeout_ms = 1000";
    let mut rng = test_rng("SIGKILL x Kafka sink and dead letters");
    let stream = Stream::start(&kafka, PER_SECOND, 400_000, 1_000, 0.05, rng.random());
    for run in 0..KILLS as usize {
        let name = format!("run-{run}");
        let mut child = start_child(&kafka, &group, work.path(), &name, pipeline, &routes);
        mid_stream(&child, run, &mut rng).await;
        child.kill();
    }
    let child = start_child(&kafka, &group, work.path(), "last", pipeline, &routes);
    let produced = last_run(&kafka, &group, child, stream).await;

    let copies = kafka.copies_by_id(&out);
    let letters = kafka.letter_places(&dlq);
    let (lost, copies_twice) = produced.lost_and_duplicates(&copies);
    let (unlettered, letters_twice) = produced.unlettered_and_twice(&letters);
    let duplicates = copies_twice + letters_twice;
    // Per kill: a commit interval and its slack at the producer's pace, plus a chunk of the
    // producer (four a second, which can land at once), plus the batches in flight.
    let per_kill = PER_SECOND * (COMMIT_INTERVAL + COMMIT_SLACK).as_millis() as u64 / 1_000
        + PER_SECOND / 4
        + WORKERS * BATCHES_IN_FLIGHT * 256;
    println!(
        "SIGKILL x Kafka sink and dead letters: {} valid, {} malformed; lost {lost}, \
         malformed without a letter {unlettered}, written twice {duplicates} (bound {} = {KILLS} \
         x {per_kill})",
        produced.valid_ids.len(),
        produced.malformed.len(),
        KILLS * per_kill
    );
    assert_eq!(lost, 0, "valid events missing from the output topic");
    assert_eq!(
        unlettered, 0,
        "malformed records missing from the dead-letter topic"
    );
    assert!(
        copies.keys().all(|id| produced.valid_ids.contains(id)),
        "the output topic holds events that were never produced"
    );
    assert!(
        duplicates as u64 <= KILLS * per_kill,
        "{duplicates} written twice exceed the README's bound {}",
        KILLS * per_kill
    );
}

/// Each instance's `logbridge_assigned_partitions` (`None` where it does not answer).
async fn assigned(instances: &[common::process::Instance]) -> Vec<Option<f64>> {
    let mut counts = Vec::new();
    for instance in instances {
        counts.push(instance.child.metric("logbridge_assigned_partitions").await);
    }
    counts
}

/// More instances than partitions: the idle one is ready (an orchestrator must not restart it)
/// and says why in `/readyz`; when an owner dies it takes over and reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_is_ready_says_why_and_takes_over() {
    let _serial = serial().await;
    let kafka = Kafka::shared("combo-idle", 2).await;
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-idle");
    let produced = kafka.produce_samples(2_000, 0.0, 29).await;
    let mut instances: Vec<common::process::Instance> = (0..3)
        .map(|n| {
            common::process::Instance::start(
                &kafka.brokers,
                &kafka.topic,
                &group,
                work.path(),
                &format!("lb-{n}"),
                "",
            )
        })
        .collect();
    // Settled: one partition each for two of them, none for the third, and all three in the
    // group. A metric of 0 is also what a member not yet in the group shows (run 16 of the
    // suite took such a joiner for the idle one; it joined and got a partition), so the
    // idle one counts only once its /readyz answers (200 or 503) from inside the group.
    let settled = wait_for(Duration::from_secs(60), || async {
        let counts = assigned(&instances).await;
        let mut sorted = counts.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("counts"));
        if sorted != [Some(0.0), Some(1.0), Some(1.0)] {
            return false;
        }
        for instance in &instances {
            let (code, body) = readyz_of(&instance.child).await;
            if code == 0 || body.contains("not in a consumer group") {
                return false;
            }
        }
        true
    })
    .await;
    let counts = assigned(&instances).await;
    assert!(
        settled,
        "two owners and an idle instance, all in the group: {counts:?}"
    );
    let idle = counts
        .iter()
        .position(|count| *count == Some(0.0))
        .expect("an idle instance");
    // In the group with nothing assigned; ready once its actors report (bounded wait).
    let ready = wait_for(Duration::from_secs(30), || async {
        readyz_of(&instances[idle].child).await.0 == 200
    })
    .await;
    let (code, body) = readyz_of(&instances[idle].child).await;
    println!("the idle instance's /readyz: {code} {body:?}");
    assert!(ready, "the idle instance never became ready: {code} {body}");
    assert_eq!(code, 200, "the idle instance is ready: {body}");
    assert!(
        body.contains("no partitions assigned"),
        "the idle instance says why it reads nothing: {body}"
    );
    let owner = (idle + 1) % 3;
    let (code, body) = readyz_of(&instances[owner].child).await;
    assert_eq!(
        (code, body.as_str()),
        (200, "ready\n"),
        "an owner's /readyz"
    );
    let end = kafka.end_offsets();
    assert!(
        kafka
            .wait_committed_to(&group, &end, Duration::from_secs(60))
            .await,
        "the owners did not commit to the end"
    );

    // An owner dies: the idle instance takes a partition over and reads what comes.
    instances[owner].child.kill();
    let took_over = wait_for(Duration::from_secs(60), || async {
        instances[idle]
            .child
            .metric("logbridge_assigned_partitions")
            .await
            .is_some_and(|count| count > 0.0)
    })
    .await;
    assert!(took_over, "the idle instance never took a partition over");
    let more: Vec<(Option<String>, Vec<u8>)> = (10_000..10_200)
        .map(|id| (Some(format!("key-{id}")), event(id, "error")))
        .collect();
    kafka.produce(&more).await;
    let end = kafka.end_offsets();
    assert!(
        kafka
            .wait_committed_to(&group, &end, Duration::from_secs(60))
            .await,
        "not committed to the end after the takeover"
    );
    let mut written = HashSet::new();
    for instance in &mut instances {
        instance.child.terminate(Duration::from_secs(10));
        written.extend(id_counts(&instance.lines()).into_keys());
    }
    let idle_wrote = id_counts(&instances[idle].lines()).len();
    println!("after the takeover the once idle instance wrote {idle_wrote} events");
    assert!(idle_wrote > 0, "the once idle instance wrote nothing");
    let lost = produced
        .valid_ids
        .iter()
        .chain(&(10_000..10_200).collect::<Vec<u64>>())
        .filter(|id| !written.contains(id))
        .count();
    assert_eq!(lost, 0, "events lost");
}

/// File rotation (by size, and logrotate's rename + SIGHUP) x SIGKILL mid-stream, with the
/// crash's torn last line staged (a process killed inside a write leaves one; the kernel makes
/// that rare, so the test writes the fragment itself after the kill): no line is lost, none is
/// torn or glued to another in any file, and the fragment is cut when the next run opens the
/// file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_sighup_across_crashes_lose_and_tear_no_line() {
    let _serial = serial().await;
    const KILLS: usize = 3;
    let kafka = Kafka::shared("combo-rotate", 4).await;
    let work = tempfile::tempdir().expect("workdir");
    let out = work.path().join("out");
    let path = out.join("all.jsonl");
    let group = unique("combo-rotate");
    let routes = format!(
        "[[routes]]\nname = \"all\"\ndefault = true\nworkers = 2\n\
         sink = {{ type = \"file\", path = \"{}\", max_bytes = 262144, max_files = 1000 }}\n",
        path.display()
    );
    let pipeline = "commit_interval_ms = 200\ndrain_timeout_ms = 1000";
    let mut rng = test_rng("rotation and SIGHUP x SIGKILL");
    let stream = Stream::start(&kafka, 3_000, 400_000, 1_000, 0.0, rng.random());
    for run in 0..KILLS {
        let name = format!("run-{run}");
        let mut child = start_child(&kafka, &group, work.path(), &name, pipeline, &routes);
        assert!(
            child.wait_consuming(Duration::from_secs(60)).await,
            "{name} never started consuming"
        );
        // logrotate's way: rename, then SIGHUP; the process goes on in a new file.
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1_500))).await;
        std::fs::rename(&path, out.join(format!("all.jsonl.hup-{run}"))).expect("rename");
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &child.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(hup.success(), "SIGHUP sent");
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1_500))).await;
        child.kill();
        // What a kill inside a write leaves: the start of a line, no newline.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("the file the killed run wrote last");
        std::io::Write::write_all(&mut file, b"{\"id\": 99999999, \"level\": \"err").expect("torn");
    }
    let child = start_child(&kafka, &group, work.path(), "last", pipeline, &routes);
    let produced = last_run(&kafka, &group, child, stream).await;

    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&out)
        .expect("out")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    let mut torn = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    for file in &files {
        let text = std::fs::read(file).expect("read");
        for (number, line) in text.split(|byte| *byte == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(value) => {
                    seen.insert(value["event"]["id"].as_u64().expect("an event id"));
                }
                Err(_) => torn.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    String::from_utf8_lossy(&line[..line.len().min(120)])
                )),
            }
        }
    }
    let rotated = files
        .iter()
        .filter(|file| {
            file.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.parse::<u32>().is_ok())
        })
        .count();
    let hups = files
        .iter()
        .filter(|file| file.to_string_lossy().contains(".hup-"))
        .count();
    let lost = produced
        .valid_ids
        .iter()
        .filter(|id| !seen.contains(id))
        .count();
    println!(
        "rotation x crash: {} files ({rotated} rotated by size, {hups} renamed before a SIGHUP), \
         {} events, lost {lost}, torn lines {torn:?}",
        files.len(),
        produced.valid_ids.len()
    );
    assert!(
        rotated >= 3 && hups == KILLS,
        "the rotations did not happen: {files:?}"
    );
    assert!(torn.is_empty(), "torn or glued lines: {torn:?}");
    assert_eq!(lost, 0, "events lost");
}

/// A rebalance while the dead-letter topic refuses writes (it does not exist yet, and the
/// broker creates no topic on its own): the first instance's revoke and the second's work commit
/// nothing past a letter that waits, both say why in `/readyz` (naming the topic), and once the
/// topic exists every malformed record is parked and the commits reach the end. (Apache Kafka
/// 4.4 took writes with `acks=all` on a one-replica topic with `min.insync.replicas = 2`, so
/// that refusal could not be staged here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_the_dead_letter_topic_refuses_writes_commits_nothing_past_a_waiting_letter(
) {
    let _serial = serial().await;
    let kafka = Kafka::shared("combo-dlq", 4).await;
    let dlq = format!("{}-dlq", kafka.topic);
    let mut rng = test_rng("rebalance x refusing dead-letter topic");
    let produced = kafka.produce_samples(4_000, 0.02, rng.random()).await;
    let end = kafka.end_offsets();
    // Where each partition's commits must stop: its first malformed record.
    let mut hold = end.clone();
    for (partition, offset) in &produced.malformed {
        let at = &mut hold[*partition as usize];
        *at = (*at).min(*offset);
    }
    assert!(
        hold.iter().zip(&end).all(|(at, end)| at < end),
        "every partition has a malformed record: {hold:?} of {end:?}"
    );
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("combo-dlq");
    let routes = |name: &str| {
        format!(
            "[[routes]]\nname = \"all\"\ndefault = true\nworkers = 2\n\
             sink = {{ type = \"file\", path = \"{}/{name}.jsonl\" }}\n[dead_letter]\ntopic = \"{dlq}\"\n",
            work.path().display()
        )
    };
    let pipeline = "commit_interval_ms = 200\ndrain_timeout_ms = 2000";
    // The cluster check names the missing topic; the dead-letter actor names the refusal.
    let refusal = |body: &str| {
        body.contains(&format!("dead-letter topic {dlq} refuses writes"))
            || body.contains(&format!("topic `{dlq}` does not exist"))
    };

    let mut a = start_child(&kafka, &group, work.path(), "a", pipeline, &routes("a"));
    let says_why = wait_for(Duration::from_secs(60), || async {
        let (code, body) = readyz_of(&a).await;
        code == 503 && refusal(&body)
    })
    .await;
    assert!(says_why, "A's /readyz: {:?}", readyz_of(&a).await);
    let held = wait_for(Duration::from_secs(60), || async {
        kafka.committed(&group) == hold
    })
    .await;
    assert!(
        held,
        "A's commits not held at the first malformed records: {:?}, expected {hold:?}",
        kafka.committed(&group)
    );

    // B joins: partitions move while letters wait.
    let mut b = start_child(&kafka, &group, work.path(), "b", pipeline, &routes("b"));
    let moved = wait_for(Duration::from_secs(60), || async {
        let (a_owns, b_owns) = (
            a.metric("logbridge_assigned_partitions").await,
            b.metric("logbridge_assigned_partitions").await,
        );
        matches!((a_owns, b_owns), (Some(x), Some(y)) if x > 0.0 && y > 0.0 && x + y == 4.0)
    })
    .await;
    assert!(moved, "the partitions were not shared between A and B");
    let b_says_why = wait_for(Duration::from_secs(60), || async {
        let (code, body) = readyz_of(&b).await;
        code == 503 && refusal(&body)
    })
    .await;
    assert!(b_says_why, "B's /readyz: {:?}", readyz_of(&b).await);
    // However long it lasts: nothing committed past a waiting letter.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let committed = kafka.committed(&group);
        assert!(
            committed.iter().zip(&hold).all(|(done, at)| done <= at),
            "committed past a dead letter that is not parked: {committed:?}, hold {hold:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The topic is made: it takes writes.
    kafka.create_external_topic(&dlq, 1).await;
    let recovered = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(120))
        .await;
    assert!(
        recovered,
        "not committed to the end once the topic took writes: {:?} of {end:?}; A {:?}, B {:?}",
        kafka.committed(&group),
        readyz_of(&a).await,
        readyz_of(&b).await
    );
    for (name, child) in [("A", &mut a), ("B", &mut b)] {
        let (status, _) = child.terminate(Duration::from_secs(10));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{name}'s exit status"
        );
    }
    let letters = kafka.letter_places(&dlq);
    let lines = read_lines(&[work.path().join("a.jsonl"), work.path().join("b.jsonl")]);
    let (lost, _) = produced.lost_and_duplicates(&id_counts(&lines));
    let (unlettered, _) = produced.unlettered_and_twice(&letters);
    println!(
        "rebalance x refusing dead-letter topic: held at {hold:?} of {end:?} across the rebalance; \
         then {} letters parked, {unlettered} malformed without one, {lost} valid lost",
        letters.len()
    );
    assert_eq!(unlettered, 0, "malformed records without a letter");
    assert_eq!(lost, 0, "valid events lost");
}
