//! Crash audit: the real `logbridge` binary killed with SIGKILL at random moments at least five
//! times while events are produced at a steady pace, restarted with the same group each time,
//! then left to finish. Two more instances are killed while they join the group (before their
//! partitions are assigned; asserted). Asserts zero loss, every malformed record accounted for,
//! committed offset = end offset on every partition (read by a separate client), per-key order
//! across the crashes, and per kill no more duplicates than the README allows.
//!
//! The README's bound on what one crash replays: the records the crashed process finished since
//! its last commit (about one `commit_interval_ms` of throughput, plus, per partition, at most
//! `max_uncommitted_records` finished records waiting behind a stuck one), plus the batches its
//! workers had written but not yet acked (one per worker; `sink_batches_in_flight` per worker
//! for a Kafka route). The test counts the first term from what the killed run *wrote* (its
//! output files, sampled every 20 ms) in the last commit interval before the kill, plus a
//! second for the commit's round trip and a late tick on a loaded machine; the second is the
//! literal number of batches of this config; no record is stuck here (file sinks, no failures),
//! so the third term is zero (`tests/combinations.rs` stages a stuck one). Nothing of it is read
//! from the program under test, so a build that stops committing on the interval fails here:
//! its replay is everything the run wrote.
//!
//! Events are produced during the whole audit (not a backlog read in a second), so each killed
//! run lives for seconds, several commit intervals.
//!
//! Brokers: Apache Kafka (this binary's shared broker), where a killed member is expired by the
//! group coordinator after `session.timeout.ms` and a commit of the current generation is
//! accepted while the group rebalances; and librdkafka's mock cluster, hosted by this test
//! process and served over loopback TCP, which refuses commits while its group rebalances. The
//! same audit runs on both; each prints its duplicates per kill beside its bounds.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::process::{logged_decode_failures, Instance};
use common::stream::{test_rng, Stream, Written};
use common::*;
use rand::Rng;

const KILLS: usize = 5;
/// `commit_interval_ms` of `process::write_child_config`.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Beyond the interval: the commit's round trip to the broker, and a tick served late on a
/// loaded machine.
const COMMIT_SLACK: Duration = Duration::from_secs(1);
/// Batches written and not yet acked when a process dies, one per worker (README): the routes
/// of `process::write_child_config` have 4 + 2 + 2 workers writing files, each batch at most
/// `min(worker_capacity, 256)` = 256 records.
const WRITTEN_UNACKED: u64 = (4 + 2 + 2) * 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_on_apache_kafka() {
    let _serial = serial().await;
    let kafka = Kafka::shared("audit", 8).await;
    // 6 000 events a second; at most 600 000 (about 100 s of producing).
    audit(&kafka, "Apache Kafka", 6_000, 600_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_on_the_mock_cluster() {
    let _serial = serial().await;
    let kafka = Kafka::start("audit", 8);
    // 2 500 events a second, at most 400 000. The mock keeps only the newest 5 MiB of each
    // partition (about 25 000 events): enough, since every run reads near the end of the log.
    audit(&kafka, "mock cluster", 2_500, 400_000).await;
}

/// One killed run: the bound on what a later run may write again, and what it is made of.
struct Kill {
    run: String,
    bound: u64,
    written_last_interval: u64,
    written: u64,
}

/// Starts the instance `name` of the audit, keeps where its outputs and log are, and watches
/// what it writes.
fn start_run(
    kafka: &Kafka,
    group: &str,
    work: &std::path::Path,
    name: &str,
    runs: &mut Vec<std::path::PathBuf>,
    logs: &mut Vec<std::path::PathBuf>,
) -> (common::process::Logbridge, Written) {
    let instance = Instance::start(&kafka.brokers, &kafka.topic, group, work, name, "");
    let written = Written::new(&instance.out);
    runs.push(instance.out);
    logs.push(instance.child.log.clone());
    (instance.child, written)
}

/// Kills `child` (whose outputs `written` watches) and says what the README allows a later run
/// to write again.
fn kill(run: &str, child: &mut common::process::Logbridge, written: &mut Written) -> Kill {
    child.kill();
    let killed_at = Instant::now();
    written.sample();
    let last_interval = written.since(killed_at - COMMIT_INTERVAL - COMMIT_SLACK);
    Kill {
        run: run.to_string(),
        bound: last_interval + WRITTEN_UNACKED,
        written_last_interval: last_interval,
        written: written.sample(),
    }
}

/// The audit on `kafka`'s topic (8 partitions, empty) with events produced at `per_second`
/// (up to `cap`); `broker` names it in what is printed.
async fn audit(kafka: &Kafka, broker: &str, per_second: u64, cap: u64) {
    let mut rng = test_rng(&format!("crash audit on {broker}"));
    let stream = Stream::start(kafka, per_second, cap, 10_000, 0.01, rng.random());

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("audit");
    let mut runs: Vec<std::path::PathBuf> = Vec::new();
    let mut logs = Vec::new();
    let mut kills: Vec<Kill> = Vec::new();
    let mut killed_mid_stream = 0;
    let started = Instant::now();
    let mut joins_killed_unassigned = 0;
    let (mut child, produced) = 'last: {
        for run in 0..=KILLS {
            if run == 1 || run == 3 {
                // An instance killed while it joins the group: up and serving, no partition yet
                // (the group still waits for the member killed before, up to session.timeout.ms).
                let name = format!("join-{run}");
                let (mut child, mut written) =
                    start_run(kafka, &group, work.path(), &name, &mut runs, &mut logs);
                let up = wait_for(Duration::from_secs(30), || {
                    let child = &child;
                    async move {
                        child
                            .metric("logbridge_assigned_partitions")
                            .await
                            .is_some()
                    }
                })
                .await;
                assert!(up, "{name} never served its metrics");
                written
                    .watch(Duration::from_millis(rng.random_range(0..400)))
                    .await;
                let assigned = child
                    .metric("logbridge_assigned_partitions")
                    .await
                    .expect("logbridge_assigned_partitions of a running instance");
                if assigned == 0.0 {
                    joins_killed_unassigned += 1;
                }
                kills.push(kill(&name, &mut child, &mut written));
                println!("{broker} {name}: SIGKILL while joining ({assigned} partitions assigned)");
            }
            let name = format!("run-{run}");
            let (mut child, mut written) =
                start_run(kafka, &group, work.path(), &name, &mut runs, &mut logs);
            assert!(
                child.wait_consuming(Duration::from_secs(60)).await,
                "{name} never started consuming"
            );
            if run == KILLS {
                // The last run reads while the producer still writes for a while, then the
                // producer stops and the run must commit to the end.
                tokio::time::sleep(Duration::from_secs(2)).await;
                break 'last (child, stream.finish().await);
            }
            // A random moment 1.5 to 4 s into its reading: several commit intervals.
            written
                .watch(Duration::from_millis(rng.random_range(1_500..4_000)))
                .await;
            let produced = stream.produced() as i64;
            let committed = kafka.committed_records(&group);
            let killed = kill(&name, &mut child, &mut written);
            // Mid-stream: events were still being produced (they are until the last run) and the
            // run was writing them when it died.
            if killed.written_last_interval > 0 {
                killed_mid_stream += 1;
            }
            println!(
            "{broker} {name}: SIGKILL after {:?}, committed {committed} of {produced} produced; \
             it wrote {} lines, {} in the last {:?}",
            started.elapsed(),
            killed.written,
            killed.written_last_interval,
            COMMIT_INTERVAL + COMMIT_SLACK
        );
            kills.push(killed);
        }
        unreachable!("the last run breaks out of the loop")
    };
    let end = kafka.end_offsets();
    let events = end.iter().sum::<i64>();
    assert_eq!(
        events as usize,
        produced.valid_ids.len() + produced.malformed.len(),
        "the topic holds what was produced"
    );
    let finished = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(300))
        .await;
    let (status, took) = child.terminate(Duration::from_secs(10));
    assert!(
        finished,
        "the last run did not commit to the end: {:?} vs {end:?}",
        kafka.committed(&group)
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "last run exit status"
    );
    println!("{broker} run-{KILLS}: finished and stopped in {took:?}");

    // Zero loss, read back from the outputs of every run. What a kill cost is what the killed
    // run wrote that a later run wrote again: its records past the commit.
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut outputs: Vec<std::collections::HashSet<u64>> = Vec::new();
    // Every copy of each key's records per route, in the order the runs wrote them (one run
    // after the other; within a run, a key's records of a route share one worker and one
    // output file). Order is promised per key within a route.
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for out in &runs {
        let lines = read_lines(&[
            out.join("errors.jsonl"),
            out.join("warnings.jsonl"),
            out.join("rest.jsonl"),
        ]);
        let mut run_by_key: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
        for line in &lines {
            let key = format!(
                "{} in route {}",
                line["key"].as_str().unwrap_or(""),
                line["route"].as_str().unwrap_or("")
            );
            let partition = line["partition"].as_i64().expect("partition");
            let offset = line["offset"].as_i64().expect("offset");
            run_by_key.entry(key).or_default().push((partition, offset));
        }
        for (key, records) in run_by_key {
            // A key's records come from one partition; keep the order the run wrote them.
            by_key
                .entry(key)
                .or_default()
                .extend(records.into_iter().map(|(_, offset)| offset));
        }
        let counts = id_counts(&lines);
        assert!(
            counts.values().all(|count| *count == 1),
            "a single run never writes an event twice"
        );
        for id in counts.keys() {
            *seen.entry(*id).or_insert(0) += 1;
        }
        outputs.push(counts.into_keys().collect());
    }
    let duplicates_per_kill: Vec<usize> = (0..outputs.len() - 1)
        .map(|killed| {
            let later: std::collections::HashSet<u64> =
                outputs[killed + 1..].iter().flatten().copied().collect();
            outputs[killed].intersection(&later).count()
        })
        .collect();
    // Per key, the last copy of each record comes after the last copy of every earlier one,
    // across the crashes.
    for (key, offsets) in &by_key {
        let in_order = by_last_copy(offsets);
        assert!(
            in_order.windows(2).all(|pair| pair[0] < pair[1]),
            "key {key}: records out of order across the crashes"
        );
    }
    let missing: Vec<&u64> = produced
        .valid_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .collect();
    let unexpected: Vec<&u64> = seen
        .keys()
        .filter(|id| !produced.valid_ids.contains(id))
        .collect();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let max_per_kill = duplicates_per_kill.iter().copied().max().unwrap_or(0);

    // Every malformed record was logged as undecodable by some run (no silent loss).
    let mut logged = std::collections::HashSet::new();
    for log in &logs {
        logged.extend(logged_decode_failures(log));
    }
    let unaccounted: Vec<_> = produced
        .malformed
        .iter()
        .filter(|place| !logged.contains(place))
        .collect();

    let bounds: Vec<u64> = kills.iter().map(|kill| kill.bound).collect();
    let regular_kills = kills
        .iter()
        .filter(|kill| kill.run.starts_with("run-"))
        .count();
    println!(
        "crash audit on {broker}: {events} events ({} valid, {} malformed, produced at {per_second}/s), \
         {regular_kills} SIGKILLs ({killed_mid_stream} mid-stream) and {} while joining \
         ({joins_killed_unassigned} before any assignment), lost {}, duplicates {duplicates} \
         (per kill {duplicates_per_kill:?}, max {max_per_kill}; bounds {bounds:?} = written in the \
         last {:?} + {WRITTEN_UNACKED} written unacked), malformed unaccounted {}, took {:?}",
        produced.valid_ids.len(),
        produced.malformed.len(),
        kills.len() - regular_kills,
        missing.len(),
        COMMIT_INTERVAL + COMMIT_SLACK,
        unaccounted.len(),
        started.elapsed()
    );
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        unexpected.is_empty(),
        "events that were never produced: {unexpected:?}"
    );
    assert!(
        unaccounted.is_empty(),
        "malformed records not accounted for: {unaccounted:?}"
    );
    assert_eq!(
        kafka.committed(&group),
        end,
        "committed = end on every partition"
    );
    assert!(
        regular_kills == KILLS && killed_mid_stream == KILLS,
        "kills {regular_kills}, mid-stream {killed_mid_stream}"
    );
    assert!(
        joins_killed_unassigned >= 1,
        "no instance was killed before its assignment (of 2 killed while joining)"
    );
    assert_eq!(duplicates_per_kill.len(), kills.len());
    for (kill, duplicates) in kills.iter().zip(&duplicates_per_kill) {
        assert!(
            *duplicates as u64 <= kill.bound,
            "{}: {duplicates} duplicates exceed the README's bound {} (written in the last {:?}: {}, \
             + {WRITTEN_UNACKED} written unacked; it wrote {} in all)",
            kill.run,
            kill.bound,
            COMMIT_INTERVAL + COMMIT_SLACK,
            kill.written_last_interval,
            kill.written
        );
    }
}
