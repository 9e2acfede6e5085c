//! Crash audit: 200 000 events (400 000 on Apache Kafka), the real `logbridge` binary killed with SIGKILL at random moments
//! at least five times and restarted with the same group each time, then left to finish.
//! Some instances are also killed while they join the group (before or while their partitions
//! are assigned). Asserts zero loss, every malformed record accounted for, committed offset =
//! end offset on every partition (read by a separate client), and per kill no more duplicates
//! than the design allows.
//!
//! What one crash can replay is what the killed run delivered past the last commit: the
//! records it finished since that commit (at most about one commit interval of throughput),
//! plus the batches its workers had written but not yet acked (one batch per worker). The test
//! reads the committed offsets and the run's finished count just before each kill and checks
//! the next run's duplicates against exactly that.
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
use common::*;
use rand::Rng;

/// Events on the mock cluster, which keeps only the newest 5 MiB of each partition.
const MOCK_EVENTS: u64 = 200_000;
/// Events on Apache Kafka: logbridge reads it at about 200 000 records/s here, and each run's
/// commits land after the moment they are read back, so 200 000 left the last kill with
/// nothing to read in one run of three (a kill after the end is not mid-stream).
const APACHE_EVENTS: u64 = 400_000;
const KILLS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_on_apache_kafka() {
    let _serial = serial().await;
    let kafka = Kafka::shared("audit", 8).await;
    audit(&kafka, "Apache Kafka", APACHE_EVENTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_on_the_mock_cluster() {
    let _serial = serial().await;
    let kafka = Kafka::start("audit", 8);
    audit(&kafka, "mock cluster", MOCK_EVENTS).await;
}

/// The audit of `events` on `kafka`'s topic (8 partitions, empty); `broker` names it in what
/// is printed.
async fn audit(kafka: &Kafka, broker: &str, events: u64) {
    let produced = kafka.produce_samples(events, 0.01, 20261127).await;
    let end = kafka.end_offsets();
    assert_eq!(end.iter().sum::<i64>(), events as i64);

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("audit");
    let mut rng = rand::rng();
    let mut runs: Vec<std::path::PathBuf> = Vec::new();
    let mut logs = Vec::new();
    let mut kills = 0;
    let mut rates = Vec::new();
    let mut killed_mid_stream = 0;
    let started = Instant::now();
    let mut joins_killed = 0;
    // Per kill, what the killed run had finished past the committed offsets when it died.
    let mut finished_past_commit: Vec<f64> = Vec::new();
    for run in 0..=KILLS {
        if run == 1 || run == 3 {
            // An instance killed while it joins the group: before its assignment, or while the
            // group still waits for the member killed before (session.timeout.ms).
            let committed_at_start: i64 = kafka.committed_records(&group);
            let joining = Instance::start(
                &kafka.brokers,
                &kafka.topic,
                &group,
                work.path(),
                &format!("join-{run}"),
                "",
            );
            let mut joining_child = joining.child;
            runs.push(joining.out);
            logs.push(joining_child.log.clone());
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
            let assigned = joining_child
                .metric("logbridge_assigned_partitions")
                .await
                .unwrap_or(0.0);
            let committed: i64 = kafka.committed_records(&group);
            let finished = joining_child
                .metric("logbridge_events_finished_total")
                .await
                .unwrap_or(0.0);
            joining_child.kill();
            joins_killed += 1;
            finished_past_commit.push(finished - (committed - committed_at_start) as f64);
            println!("{broker} run {run}: SIGKILL while joining ({assigned} partitions assigned)");
        }
        let instance = Instance::start(
            &kafka.brokers,
            &kafka.topic,
            &group,
            work.path(),
            &format!("run-{run}"),
            "",
        );
        let mut child = instance.child;
        runs.push(instance.out);
        logs.push(child.log.clone());
        let committed_at_start: i64 = kafka.committed_records(&group);
        if run < KILLS {
            // Wait until this instance is consuming, then kill it at a random moment.
            let consuming = wait_for(Duration::from_secs(60), || {
                let child = &child;
                async move {
                    child
                        .metric("logbridge_events_consumed_total")
                        .await
                        .unwrap_or(0.0)
                        > 0.0
                }
            })
            .await;
            assert!(consuming, "run {run} never started consuming");
            let finished_before = child
                .metric("logbridge_events_finished_total")
                .await
                .unwrap_or(0.0);
            let measured_from = Instant::now();
            // A random moment, chosen as a random amount of progress (so that five kills stay
            // mid-stream however fast this machine consumes): 4 000 to 24 000 more records.
            let target = finished_before + rng.random_range(4_000.0..24_000.0);
            let mut finished_after = finished_before;
            while finished_after < target && measured_from.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                finished_after = child
                    .metric("logbridge_events_finished_total")
                    .await
                    .unwrap_or(finished_after);
            }
            // Records per second this instance finished just before the kill.
            rates.push((finished_after - finished_before) / measured_from.elapsed().as_secs_f64());
            // The committed offsets first, then the finished count, then the kill: a commit
            // or a record finished in between only widens what is allowed, never narrows it.
            let committed: i64 = kafka.committed_records(&group);
            let finished = child
                .metric("logbridge_events_finished_total")
                .await
                .unwrap_or(finished_after);
            child.kill();
            kills += 1;
            finished_past_commit.push(finished - (committed - committed_at_start) as f64);
            if committed < events as i64 {
                killed_mid_stream += 1;
            }
            println!(
                "{broker} run {run}: SIGKILL after {:?}, committed {committed} of {events}",
                started.elapsed()
            );
        } else {
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
            println!("{broker} run {run}: finished and stopped in {took:?}");
        }
    }

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

    let config = logbridge::Config::load(&work.path().join("run-0.toml")).expect("config");
    // Batches written but not yet acked when the process died: one per worker.
    let batch = config
        .pipeline
        .worker_capacity
        .min(logbridge::worker::MAX_BATCH);
    let written_unacked: usize = config
        .routes
        .iter()
        .map(|route| route.workers * batch)
        .sum();
    let bounds: Vec<usize> = finished_past_commit
        .iter()
        .map(|finished| finished.max(0.0).ceil() as usize + written_unacked)
        .collect();
    println!(
        "crash audit on {broker}: {events} events ({} valid, {} malformed), {kills} SIGKILLs ({killed_mid_stream} mid-stream) \
         and {joins_killed} while joining, lost {}, duplicates {duplicates} (per kill {duplicates_per_kill:?}, max \
         {max_per_kill}; bounds {bounds:?} = finished past the commit + {written_unacked} written unacked; \
         throughput before the kills {rates:.0?}/s), malformed unaccounted {}, took {:?}",
        produced.valid_ids.len(),
        produced.malformed.len(),
        missing.len(),
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
        kills >= 5 && killed_mid_stream >= 5,
        "kills {kills}, mid-stream {killed_mid_stream}"
    );
    assert_eq!(joins_killed, 2);
    assert_eq!(duplicates_per_kill.len(), bounds.len());
    for (kill, (duplicates, bound)) in duplicates_per_kill.iter().zip(&bounds).enumerate() {
        assert!(
            duplicates <= bound,
            "kill {kill}: {duplicates} duplicates exceed what the killed run finished past the \
             commit plus its unacked batches ({bound})"
        );
    }
}
