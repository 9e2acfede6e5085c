//! Exactly-once Kafka → Kafka (`[pipeline] delivery = "exactly-once"`) on Apache Kafka: a
//! `read_committed` reader of the output topic finds every valid event once and the
//! dead-letter topic every malformed record once, whatever was killed or moved mid-transaction.
//! Each test also asserts that its condition happened (transactions were aborted by the
//! crashes, a revoke committed one), so none passes because nothing was mid-transaction. The
//! tests mostly wait (on sessions, group joins, the producer's pace) and run two at a time; the
//! three-node cluster's runs alone.

mod common;

use std::path::Path;
use std::time::Duration;

use common::apache::ApacheKafka;
use common::process::Logbridge;
use common::stream::{test_rng, Stream};
use common::*;
use rand::Rng;

/// Events a second the producer writes while instances come and go.
const PER_SECOND: u64 = 2_000;

/// The output topics of `kafka`'s source topic: (output, dead letters), created.
async fn outputs(kafka: &Kafka) -> (String, String) {
    let out = format!("{}-out", kafka.topic);
    let dlq = format!("{}-dlq", kafka.topic);
    kafka.create_external_topic(&out, 4).await;
    kafka.create_external_topic(&dlq, 1).await;
    (out, dlq)
}

/// Starts `logbridge run` as `name` in `work`: exactly-once, with `transactional_id`, a Kafka
/// route to `out` and dead letters to `dlq`; `options` are more `[kafka.options]` lines.
#[allow(clippy::too_many_arguments)]
fn start(
    kafka: &Kafka,
    group: &str,
    work: &Path,
    name: &str,
    transactional_id: &str,
    (out, dlq): (&str, &str),
    options: &str,
) -> Logbridge {
    let routes = format!(
        "[[routes]]\nname = \"all\"\ndefault = true\nworkers = 4\n\
         sink = {{ type = \"kafka\", topic = \"{out}\" }}\n"
    );
    start_routes(
        kafka,
        group,
        work,
        name,
        transactional_id,
        &routes,
        dlq,
        options,
    )
}

/// [`start`] with these `routes`.
#[allow(clippy::too_many_arguments)]
fn start_routes(
    kafka: &Kafka,
    group: &str,
    work: &Path,
    name: &str,
    transactional_id: &str,
    routes: &str,
    dlq: &str,
    options: &str,
) -> Logbridge {
    let text = format!(
        "{kafka}\n[pipeline]\ndelivery = \"exactly-once\"\ntransactional_id = \"{transactional_id}\"\n\
         commit_interval_ms = 500\ndrain_timeout_ms = 2000\n[http]\nlisten = \"127.0.0.1:0\"\n\
         {routes}[dead_letter]\ntopic = \"{dlq}\"\n",
        kafka = kafka_section(
            &kafka.brokers,
            group,
            &kafka.topic,
            &if options.contains("\"group.protocol\" = \"consumer\"") {
                // The broker keeps the session and heartbeats under KIP-848.
                options.to_string()
            } else {
                format!("\"heartbeat.interval.ms\" = 1000\n{options}")
            },
        ),
    );
    let config = work.join(format!("{name}.toml"));
    std::fs::write(&config, text).expect("write config");
    Logbridge::start(&config, work.join(format!("{name}.log")))
}

/// What each test starts from: a topic on the shared broker and its output topics, a work
/// directory, a group, the test's random numbers (seed printed) and the stream of events.
struct Setup {
    kafka: Kafka,
    topics: (String, String),
    work: tempfile::TempDir,
    group: String,
    rng: rand::rngs::StdRng,
    stream: Stream,
}

impl Setup {
    async fn new(test: &str, prefix: &str, partitions: i32) -> Setup {
        Setup::on(Kafka::shared(prefix, partitions).await, test, prefix).await
    }

    /// [`Setup::new`] on the topic `kafka` (of another cluster than the shared broker).
    async fn on(kafka: Kafka, test: &str, prefix: &str) -> Setup {
        let topics = outputs(&kafka).await;
        let mut rng = test_rng(test);
        let stream = Stream::start(&kafka, PER_SECOND, 400_000, 1_000, 0.05, rng.random());
        Setup {
            topics,
            work: tempfile::tempdir().expect("workdir"),
            group: unique(prefix),
            rng,
            stream,
            kafka,
        }
    }
}

/// What a `read_committed` reader finds against what was produced.
struct Audit {
    valid: usize,
    malformed: usize,
    lost: usize,
    duplicates: usize,
    unlettered: usize,
    letters_twice: usize,
    /// Records of the output topics only a `read_uncommitted` reader sees: written in
    /// transactions that were aborted (or left open and then aborted).
    aborted_records: usize,
}

impl Audit {
    fn of(kafka: &Kafka, (out, dlq): (&str, &str), produced: &Produced) -> Audit {
        let copies = kafka.copies_by_id(out);
        let letters = kafka.letter_places(dlq);
        let (lost, duplicates) = produced.lost_and_duplicates(&copies);
        let (unlettered, letters_twice) = produced.unlettered_and_twice(&letters);
        assert!(
            copies.keys().all(|id| produced.valid_ids.contains(id)),
            "the output topic holds events that were never produced"
        );
        let committed = copies.values().sum::<usize>() + letters.values().sum::<usize>();
        let all = kafka.read_all_uncommitted(out).len() + kafka.read_all_uncommitted(dlq).len();
        Audit {
            valid: produced.valid_ids.len(),
            malformed: produced.malformed.len(),
            lost,
            duplicates,
            unlettered,
            letters_twice,
            aborted_records: all.saturating_sub(committed),
        }
    }

    fn print(&self, test: &str) {
        println!(
            "{test}: {} valid, {} malformed; lost {}, written twice {}, malformed without a \
             letter {}, letters twice {}; {} records of aborted transactions (seen only by \
             read_uncommitted)",
            self.valid,
            self.malformed,
            self.lost,
            self.duplicates,
            self.unlettered,
            self.letters_twice,
            self.aborted_records
        );
    }

    fn assert_exactly_once(&self, test: &str) {
        assert!(
            self.valid > 0 && self.malformed > 0,
            "{test}: nothing produced"
        );
        assert_eq!(self.lost, 0, "{test}: valid events missing from the output");
        assert_eq!(self.duplicates, 0, "{test}: valid events written twice");
        assert_eq!(
            self.unlettered, 0,
            "{test}: malformed records without a letter"
        );
        assert_eq!(
            self.letters_twice, 0,
            "{test}: malformed records lettered twice"
        );
    }
}

/// The last phase of a test: `children` read while the producer writes 2 s more; then it
/// stops, the group must commit to the end, and each child must exit 0 on SIGTERM.
async fn finish(
    kafka: &Kafka,
    group: &str,
    children: &mut [Logbridge],
    stream: Stream,
) -> Produced {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let produced = stream.finish().await;
    let end = kafka.end_offsets();
    let done = kafka
        .wait_committed_to(group, &end, Duration::from_secs(120))
        .await;
    let mut stalled = String::new();
    if !done {
        for child in children.iter() {
            stalled.push_str(&stalled_child(child).await);
        }
    }
    let mut statuses = Vec::new();
    for child in children.iter_mut() {
        statuses.push(
            child
                .terminate(Duration::from_secs(15))
                .0
                .and_then(|s| s.code()),
        );
    }
    assert!(
        done,
        "commits did not reach the end: {:?} vs {end:?}{stalled}",
        kafka.committed(group)
    );
    assert!(
        statuses.iter().all(|status| *status == Some(0)),
        "exit statuses after SIGTERM: {statuses:?}"
    );
    produced
}

/// `child`'s transactions, assignment and breaker (metrics) and its last log lines: what a
/// failure that found commits stalled prints.
async fn stalled_child(child: &Logbridge) -> String {
    let log = child.log_text();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    format!(
        "\n--- a child's transactions, assignment and breaker:\n{}\n--- its last log lines:\n{}",
        transaction_lines(child).await.join("\n"),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// `child`'s metric lines about transactions, its assignment and the breaker.
async fn transaction_lines(child: &Logbridge) -> Vec<String> {
    child
        .metrics_page()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            line.starts_with("logbridge_transactions")
                || line.starts_with("logbridge_assigned")
                || line.starts_with("logbridge_breaker")
        })
        .map(str::to_string)
        .collect()
}

/// The sum of the series of `child` that start with `series` (`name{labels...`), 0 if none.
async fn counted(child: &Logbridge, series: &str) -> f64 {
    child.metrics_page().await.map_or(0.0, |page| {
        metric_samples(&page, series)
            .iter()
            .fold(0.0, |sum, v| sum + v)
    })
}

/// One instance, SIGKILLed at random progress points six times, each time started again with
/// its `transactional.id` (which aborts what the killed one left open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_leaves_each_event_once_for_read_committed_readers() {
    let _pair = two_at_a_time().await;
    const KILLS: usize = 6;
    let test = "exactly-once x SIGKILL, one instance";
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::new(test, "eos-kill", 4).await;
    let id = unique("eos-kill-lb");
    let mut committed_before = Vec::new();
    for run in 0..KILLS {
        let mut child = start(
            &kafka,
            &group,
            work.path(),
            &format!("run-{run}"),
            &id,
            (&out, &dlq),
            "",
        );
        assert!(
            child.wait_consuming(Duration::from_secs(60)).await,
            "run {run} never started consuming:\n{}",
            child.log_text()
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..4_000))).await;
        committed_before
            .push(counted(&child, "logbridge_transactions_total{outcome=\"committed\"").await);
        child.kill();
    }
    let last = start(&kafka, &group, work.path(), "last", &id, (&out, &dlq), "");
    let produced = finish(&kafka, &group, &mut [last], stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    println!(
        "{test}: transactions committed by each killed run before its kill: {committed_before:?}"
    );
    audit.assert_exactly_once(test);
    assert!(
        audit.aborted_records > 0,
        "{test}: no kill left records in an open transaction: the kills were not mid-transaction"
    );
}

/// Fan-out under exactly-once: every event to one topic, and (continuing) the errors also to
/// a second, both in the transaction that commits their offsets. Three SIGKILLs at random
/// points: each topic holds its events once for a `read_committed` reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_two_topics_under_sigkill_leaves_each_event_once_in_each() {
    let _pair = two_at_a_time().await;
    const KILLS: usize = 3;
    let test = "exactly-once x fan-out x SIGKILL";
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::new(test, "eos-fan", 4).await;
    let errors_topic = format!("{}-errors", kafka.topic);
    kafka.create_external_topic(&errors_topic, 2).await;
    let routes = format!(
        "[[routes]]\nname = \"all\"\nlevels = [\"trace\", \"debug\", \"info\", \"warning\", \"error\", \"fatal\"]\n\
         continue = true\nworkers = 2\nsink = {{ type = \"kafka\", topic = \"{out}\" }}\n\
         [[routes]]\nname = \"errors\"\nlevels = [\"error\", \"fatal\"]\nworkers = 2\n\
         transforms = [ {{ set = \"alerted\", value = true }} ]\n\
         sink = {{ type = \"kafka\", topic = \"{errors_topic}\" }}\n"
    );
    let id = unique("eos-fan-lb");
    for run in 0..KILLS {
        let mut child = start_routes(
            &kafka,
            &group,
            work.path(),
            &format!("run-{run}"),
            &id,
            &routes,
            &dlq,
            "",
        );
        assert!(
            child.wait_consuming(Duration::from_secs(60)).await,
            "run {run} never started consuming:\n{}",
            child.log_text()
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..4_000))).await;
        child.kill();
    }
    let last = start_routes(&kafka, &group, work.path(), "last", &id, &routes, &dlq, "");
    let produced = finish(&kafka, &group, &mut [last], stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    audit.assert_exactly_once(test);
    // The errors topic: each error of the first topic once, changed by its transform.
    let errors: std::collections::HashSet<u64> = kafka
        .read_all(&out)
        .iter()
        .filter_map(|record| {
            let event: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref()?).ok()?;
            matches!(event["level"].as_str(), Some("error" | "fatal"))
                .then(|| event["id"].as_u64())
                .flatten()
        })
        .collect();
    let mut alerted: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for record in kafka.read_all(&errors_topic) {
        let event: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().expect("a value")).expect("json");
        assert_eq!(event["alerted"], true, "{event}");
        *alerted
            .entry(event["id"].as_u64().expect("id"))
            .or_default() += 1;
    }
    let missing = errors.iter().filter(|id| !alerted.contains_key(id)).count();
    let twice: usize = alerted.values().map(|n| n - 1).sum();
    println!(
        "{test}: {} errors; in the errors topic: missing {missing}, twice {twice}",
        errors.len()
    );
    assert!(!errors.is_empty(), "{test}: no errors produced");
    assert_eq!(missing, 0, "{test}: errors missing from the errors topic");
    assert_eq!(twice, 0, "{test}: errors written twice to the errors topic");
    assert!(
        alerted.keys().all(|id| errors.contains(id)),
        "{test}: the errors topic holds what is not an error"
    );
    assert!(
        audit.aborted_records > 0,
        "{test}: no kill left records in an open transaction"
    );
}

/// Three instances with their own `transactional.id`s; six SIGKILLs of random ones at random
/// moments, each started again at once (the group rebalances every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_among_three_instances_leaves_each_event_once() {
    let _pair = two_at_a_time().await;
    const KILLS: usize = 6;
    let test = "exactly-once x SIGKILL, three instances";
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::new(test, "eos-three", 6).await;
    let ids: Vec<String> = (0..3)
        .map(|slot| unique(&format!("eos-three-{slot}")))
        .collect();
    let mut children: Vec<Logbridge> = (0..3)
        .map(|slot| {
            start(
                &kafka,
                &group,
                work.path(),
                &format!("slot-{slot}-0"),
                &ids[slot],
                (&out, &dlq),
                "",
            )
        })
        .collect();
    for child in &children {
        assert!(
            child.wait_consuming(Duration::from_secs(60)).await
                || child
                    .metric("logbridge_assigned_partitions")
                    .await
                    .is_some(),
            "an instance never answered"
        );
    }
    let mut killed = Vec::new();
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
        // The victim owns partitions and has read (bounded wait): a kill of an instance that
        // is still joining would leave no transaction open, and stage nothing.
        let first = rng.random_range(0..3);
        let slot = std::cell::Cell::new(None);
        wait_for(Duration::from_secs(30), || {
            let (children, slot) = (&children, &slot);
            async move {
                for offset in 0..3 {
                    let candidate = (first + offset) % 3;
                    let child = &children[candidate];
                    let owns = child
                        .metric("logbridge_assigned_partitions")
                        .await
                        .is_some_and(|n| n > 0.0);
                    if owns && child.wait_consuming(Duration::from_millis(1)).await {
                        slot.set(Some(candidate));
                        return true;
                    }
                }
                false
            }
        })
        .await;
        let slot = slot.get().unwrap_or(first);
        children[slot].kill();
        killed.push(slot);
        children[slot] = start(
            &kafka,
            &group,
            work.path(),
            &format!("slot-{slot}-{}", kill + 1),
            &ids[slot],
            (&out, &dlq),
            "",
        );
    }
    println!("{test}: killed slots in order {killed:?}");
    let produced = finish(&kafka, &group, &mut children, stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    audit.assert_exactly_once(test);
    assert!(
        audit.aborted_records > 0,
        "{test}: no kill left records in an open transaction"
    );
}

/// A second instance joins and leaves while the first has a transaction open, under each group
/// protocol: the revoke commits the whole transaction before the partitions go, and nothing is
/// lost or written twice.
async fn revoke_mid_transaction(protocol: &str, options: &str) {
    let test = format!("exactly-once x revoke ({protocol})");
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        rng: _,
        stream,
    } = Setup::new(&test, "eos-revoke", 4).await;
    let a = start(
        &kafka,
        &group,
        work.path(),
        "a",
        &unique("eos-revoke-a"),
        (&out, &dlq),
        options,
    );
    assert!(
        a.wait_consuming(Duration::from_secs(60)).await,
        "A never read"
    );
    let mut b = start(
        &kafka,
        &group,
        work.path(),
        "b",
        &unique("eos-revoke-b"),
        (&out, &dlq),
        options,
    );
    let split = wait_for(Duration::from_secs(60), || async {
        b.metric("logbridge_assigned_partitions")
            .await
            .is_some_and(|n| n > 0.0)
            && a.metric("logbridge_assigned_partitions")
                .await
                .is_some_and(|n| n > 0.0 && n < 4.0)
    })
    .await;
    assert!(split, "{test}: B never got partitions from A");
    assert!(
        b.wait_consuming(Duration::from_secs(60)).await,
        "B never read"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // B leaves: its partitions go back to A (a revoke on B, an assignment on A).
    let (status, _) = b.terminate(Duration::from_secs(15));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{test}: B's exit status"
    );
    let revoke_commits = counted(
        &a,
        "logbridge_transactions_total{outcome=\"committed\",reason=\"revoke\"",
    )
    .await;
    println!("{test}: A after B left: {:?}", transaction_lines(&a).await);
    let produced = finish(&kafka, &group, &mut [a], stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(&test);
    println!("{test}: transactions A committed in a revoke: {revoke_commits}");
    audit.assert_exactly_once(&test);
    assert!(
        revoke_commits >= 1.0,
        "{test}: A never committed a transaction in a revoke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_under_the_eager_protocol_commits_the_open_transaction() {
    let _pair = two_at_a_time().await;
    revoke_mid_transaction("range", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_under_the_cooperative_protocol_commits_the_open_transaction() {
    let _pair = two_at_a_time().await;
    revoke_mid_transaction(
        "cooperative-sticky",
        "\"partition.assignment.strategy\" = \"cooperative-sticky\"\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_under_the_consumer_protocol_commits_the_open_transaction() {
    let _pair = two_at_a_time().await;
    revoke_mid_transaction("consumer", "\"group.protocol\" = \"consumer\"\n").await;
}

/// `child`'s committed transactions and finished records: the second moving while the first
/// stays put means records finished inside the open transaction.
async fn progress_since_commit(child: &Logbridge) -> (f64, f64) {
    (
        counted(child, "logbridge_transactions_total{outcome=\"committed\"").await,
        counted(child, "logbridge_events_finished_total").await,
    )
}

/// Transactions `child` aborted, plus the times its producer was fenced.
async fn ended_badly(child: &Logbridge) -> f64 {
    counted(child, "logbridge_transactions_total{outcome=\"aborted\"").await
        + counted(child, "logbridge_transactions_fenced_total").await
}

/// Sends `signal` (`STOP`, `CONT`) to `child`.
fn signal(child: &Logbridge, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {}", child.pid());
}

/// A zombie: an instance paused (SIGSTOP) past its session timeout with a transaction open.
/// Its partitions move to the other instance; when it resumes (SIGCONT), its transaction is
/// aborted (the group moved on) or fenced, nothing it wrote in it becomes visible, and nothing
/// is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_whose_partitions_moved_on_makes_nothing_of_its_open_transaction_visible()
{
    let _pair = two_at_a_time().await;
    let test = "exactly-once x SIGSTOP past the session";
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::new(test, "eos-zombie", 4).await;
    let mut a = start(
        &kafka,
        &group,
        work.path(),
        "a",
        &unique("eos-zombie-a"),
        (&out, &dlq),
        "",
    );
    let b = start(
        &kafka,
        &group,
        work.path(),
        "b",
        &unique("eos-zombie-b"),
        (&out, &dlq),
        "",
    );
    let both = wait_for(Duration::from_secs(60), || async {
        let mut counts = Vec::new();
        for child in [&a, &b] {
            counts.push(
                child
                    .metric("logbridge_assigned_partitions")
                    .await
                    .unwrap_or(0.0),
            );
        }
        counts == [2.0, 2.0]
            && a.metric("logbridge_events_consumed_total")
                .await
                .is_some_and(|consumed| consumed > 0.0)
    })
    .await;
    assert!(
        both,
        "{test}: the two instances never shared the partitions"
    );
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1_500))).await;
    // Paused with records in its open transaction: A finished records since its last commit
    // (bounded wait; the producer writes every 250 ms and a transaction spans 500 ms, so a
    // pause right after a commit can find it empty, which run two at a time did once).
    let mut last = progress_since_commit(&a).await;
    let mut holding = false;
    let waited = std::time::Instant::now();
    while waited.elapsed() < Duration::from_secs(10) {
        let now = progress_since_commit(&a).await;
        if now.0 == last.0 && now.1 > last.1 {
            holding = true;
            break;
        }
        if now.0 != last.0 {
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = ended_badly(&a).await;
    signal(&a, "STOP");
    assert!(
        holding,
        "{test}: A finished no record outside a committed transaction for 10 s"
    );
    // B takes every partition once A's session (6 s) expires, and reads on.
    let moved = wait_for(Duration::from_secs(60), || async {
        b.metric("logbridge_assigned_partitions").await == Some(4.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&a, "CONT");
    assert!(moved, "{test}: A's partitions never moved to B");
    // A learns that the group moved on: its transaction is aborted (or A is fenced and stops).
    let noticed = wait_for(Duration::from_secs(60), || async {
        a.metrics_page().await.is_none() || ended_badly(&a).await > before
    })
    .await;
    let after = ended_badly(&a).await;
    println!(
        "{test}: A's transactions aborted or fenced: {before} before SIGSTOP, {after} after \
         SIGCONT (0 once it stopped)"
    );
    assert!(
        noticed,
        "{test}: A never aborted its transaction after it resumed"
    );
    let mut children = vec![b];
    if a.running() {
        children.push(a);
    }
    let produced = finish(&kafka, &group, &mut children, stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    audit.assert_exactly_once(test);
    assert!(
        audit.aborted_records > 0,
        "{test}: A's open transaction held nothing when it was paused"
    );
}

/// Two instances started with one `transactional_id` (a copy-pasted config, a second replica
/// given the first one's id): the second one's start fences the first, which stops with exit
/// status 1 and says why; nothing the first left open becomes visible, the second reads on.
/// Then, idle once the producer stopped, the second commits no (empty) transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_with_the_same_transactional_id_fences_the_first_which_stops() {
    let _pair = two_at_a_time().await;
    let test = "exactly-once x two instances with one transactional_id";
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::new(test, "eos-fence", 4).await;
    let id = unique("eos-fence-lb");
    let mut first = start(&kafka, &group, work.path(), "first", &id, (&out, &dlq), "");
    assert!(
        first.wait_consuming(Duration::from_secs(60)).await,
        "{test}: the first never started consuming:\n{}",
        first.log_text()
    );
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
    let second = start(&kafka, &group, work.path(), "second", &id, (&out, &dlq), "");
    let mut status = None;
    let stopped = wait_for(Duration::from_secs(60), || {
        status = status.or_else(|| first.exit_status());
        let stopped = status.is_some();
        async move { stopped }
    })
    .await;
    let log = first.log_text();
    println!(
        "{test}: the first instance's exit: {status:?}; fenced counted by the second: {}",
        counted(&second, "logbridge_transactions_fenced_total").await
    );
    assert!(stopped, "{test}: the fenced instance never stopped:\n{log}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{test}: the fenced instance's exit status"
    );
    assert!(
        log.contains("the transactional producer cannot go on"),
        "{test}: the fenced instance does not say why it stopped:\n{log}"
    );
    let mut children = [second];
    // The producer stops; the second commits everything, then idles for 6 commit intervals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let produced = stream.finish().await;
    let end = kafka.end_offsets();
    assert!(
        kafka
            .wait_committed_to(&group, &end, Duration::from_secs(120))
            .await,
        "{test}: commits did not reach the end: {:?} vs {end:?}; the second's log:\n{}",
        kafka.committed(&group),
        children[0].log_text()
    );
    let transactions = "logbridge_transactions_total{";
    let busy = counted(&children[0], transactions).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = counted(&children[0], transactions).await - busy;
    println!("{test}: the second's transactions: {busy} while reading, {idle} in 3 s idle");
    let status = children[0].terminate(Duration::from_secs(15)).0;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    audit.assert_exactly_once(test);
    assert!(busy > 0.0, "{test}: the second committed no transaction");
    assert_eq!(
        idle, 0.0,
        "{test}: transactions ended while nothing was read"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{test}: the second's exit status after SIGTERM"
    );
}

/// The leader of an output partition SIGKILLed mid-transaction on the three-node cluster
/// (replication 3, `min.insync.replicas` 2, the transaction log likewise). While the partition
/// has no leader no transaction can finish: one is aborted (the drain runs out of time, or a
/// send fails; its records are read again) or its commit waits for the new leader. Once
/// another node leads it, transactions commit again, and a `read_committed` reader finds each
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_leader_killed_mid_transaction_on_three_nodes_leaves_each_event_once() {
    let _alone = alone_of_a_pair().await;
    let test = "exactly-once x the output's leader killed";
    let mut cluster = ApacheKafka::cluster();
    println!(
        "{test}: three-node cluster answering after {:?}",
        cluster.started_in
    );
    let kafka = Kafka::apache(&cluster, "eos-leader", 4).await;
    let Setup {
        kafka,
        topics: (out, dlq),
        work,
        group,
        mut rng,
        stream,
    } = Setup::on(kafka, test, "eos-leader").await;
    let mut child = start(
        &kafka,
        &group,
        work.path(),
        "run",
        &unique("eos-leader-lb"),
        (&out, &dlq),
        "",
    );
    let committed = "logbridge_transactions_total{outcome=\"committed\"";
    let going = wait_for(Duration::from_secs(60), || async {
        counted(&child, committed).await >= 2.0
    })
    .await;
    assert!(
        going,
        "{test}: no transaction committed before the kill:\n{}",
        child.log_text()
    );
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
    let aborted_before = ended_badly(&child).await;
    let long_before = long_transactions(&child).await;
    // Progress: the group's commits, which only a committed transaction moves (each one
    // carries records for every output partition: 1 000 keys).
    let (node, led_after, resumed_after) = cluster
        .kill_leader(&out, 0, || kafka.committed_records(&group))
        .await;
    let resumed_after = match resumed_after {
        Ok(after) => after,
        Err(stalled) => panic!("{test}: {stalled}{}", stalled_child(&child).await),
    };
    let aborted = ended_badly(&child).await - aborted_before;
    let long = long_transactions(&child).await - long_before;
    let reasons: Vec<String> = transaction_lines(&child)
        .await
        .into_iter()
        .filter(|line| line.contains("outcome=\"aborted\""))
        .collect();
    println!(
        "{test}: node {node} (leader of {out}/0) killed; led again after {led_after:.1?}, \
         transactions committed again after {resumed_after:.1?}; {long} transactions lasted \
         over 2.5 s, {aborted} aborted: {reasons:?}"
    );
    cluster.start_node(node);
    cluster.wait_ready(Duration::from_secs(90));
    let produced = finish(&kafka, &group, std::slice::from_mut(&mut child), stream).await;
    let audit = Audit::of(&kafka, (&out, &dlq), &produced);
    audit.print(test);
    audit.assert_exactly_once(test);
    // Mid-transaction: one was open with records for the partition (aborted at the drain
    // timeout, or its commit waited for the new leader); either way it outlasted the 0.5 s
    // interval plus the 2 s drain timeout.
    assert!(
        long > 0.0,
        "{test}: no transaction spanned the failover: the kill was not mid-transaction"
    );
}

/// Transactions of `child` that lasted over 2.5 s (begin to the end of their commit or abort).
async fn long_transactions(child: &Logbridge) -> f64 {
    let all = counted(child, "logbridge_transaction_duration_seconds_count").await;
    all - counted(
        child,
        "logbridge_transaction_duration_seconds_bucket{le=\"2.5\"}",
    )
    .await
}
