//! Broker tier: the real `logbridge` binary against Apache Kafka (KRaft, started by the test on
//! free loopback ports and stopped afterwards; see `common::apache`).
//!
//! - SIGTERM: exit code 0 within `drain_timeout_ms` + 2 s, and a restart replays nothing.
//! - Broker killed (SIGKILL) mid-run and started again on the same log directory: logbridge
//!   recovers on its own, zero loss, commits to the end. With a session that outlives the
//!   outage (librdkafka's default 45 s) nothing is read again; with a shorter one the
//!   assignment is lost and only what was past the commit at the kill is read again.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::apache::ApacheKafka;
use common::process::{Instance, Logbridge};
use common::*;

fn outputs(out: &std::path::Path) -> Vec<serde_json::Value> {
    read_lines(&[
        out.join("errors.jsonl"),
        out.join("warnings.jsonl"),
        out.join("rest.jsonl"),
    ])
}

/// Events the child finished; it must be serving (see `Logbridge::address`).
async fn finished(child: &Logbridge) -> f64 {
    child
        .metric("logbridge_events_finished_total")
        .await
        .expect("the endpoint answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_in_time_and_restart_replays_nothing() {
    let _serial = serial().await;
    let kafka = Kafka::shared("graceful", 4).await;
    const EVENTS: u64 = 30_000;
    let produced = kafka.produce_samples(EVENTS, 0.01, 7).await;
    let end = kafka.end_offsets();
    assert_eq!(end.iter().sum::<i64>(), EVENTS as i64, "end offsets");

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("graceful");
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut stops = Vec::new();
    for run in 0..4 {
        let instance = Instance::start(
            &kafka.brokers,
            &kafka.topic,
            &group,
            work.path(),
            &format!("run-{run}"),
            "",
        );
        let out = instance.out;
        let mut child = instance.child;
        child.address().await;
        let last = run == 3;
        let progressed = wait_for(Duration::from_secs(120), || {
            let child = &child;
            let (kafka, group, end) = (&kafka, &group, &end);
            async move {
                if last {
                    kafka.committed(group) == *end
                } else {
                    finished(child).await > 2_000.0
                }
            }
        })
        .await;
        assert!(progressed, "run {run} made no progress");
        let (status, took) = child.terminate(Duration::from_secs(15));
        stops.push(took);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "run {run}: exit code after SIGTERM"
        );
        assert!(
            took <= Duration::from_millis(3_000 + 2_000),
            "run {run}: SIGTERM to exit took {took:?}, over drain_timeout_ms + 2 s"
        );
        for (id, count) in id_counts(&outputs(&out)) {
            *seen.entry(id).or_insert(0) += count;
        }
    }
    let (missing, duplicates) = produced.lost_and_duplicates(&seen);
    println!(
        "graceful: {EVENTS} events over 4 runs stopped by SIGTERM in {stops:?}; lost {missing}, duplicates {duplicates}"
    );
    assert_eq!(missing, 0, "events lost");
    assert_eq!(duplicates, 0, "a graceful stop must not replay anything");
    assert_eq!(kafka.committed(&group), end);
}

/// What one broker kill cost: records finished before it, duplicates after it.
struct Restart {
    finished_before: f64,
    committed_before: i64,
    duplicates: usize,
    answering_after: Duration,
}

/// The broker SIGKILLed mid-run and started again on its log directory, with the consumer's
/// `session` (librdkafka's default when `None`, 45 s).
async fn broker_restart(session: Option<u32>) -> Restart {
    let mut broker = ApacheKafka::start();
    let kafka = Kafka::apache(&broker, "restart", 4).await;
    const EVENTS: u64 = 100_000;
    let produced = kafka.produce_samples(EVENTS, 0.0, 11).await;
    let end = kafka.end_offsets();

    let work = tempfile::tempdir().expect("workdir");
    let group = unique("broker-restart");
    let mut options = "\"reconnect.backoff.max.ms\" = 1000\n".to_string();
    options.push_str(&match session {
        Some(ms) => format!("\"session.timeout.ms\" = {ms}\n"),
        // The default: the test helpers' 6 s left out.
        None => "\"session.timeout.ms\" = 45000\n".to_string(),
    });
    let instance = Instance::start(
        &kafka.brokers,
        &kafka.topic,
        &group,
        work.path(),
        "logbridge",
        &options,
    );
    let out = instance.out;
    let mut child = instance.child;
    child.address().await;
    // The kill comes after the first 1 000 records, well before the end.
    let started = wait_for(Duration::from_secs(60), || {
        let child = &child;
        async move { finished(child).await > 1_000.0 }
    })
    .await;
    if !started {
        let log = std::fs::read_to_string(work.path().join("logbridge.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "logbridge never started consuming; log tail:\n{}",
            tail.join("\n")
        );
    }

    // Committed first, then finished: a commit in between only widens the window.
    let committed_before = kafka.committed_records(&group);
    let finished_before = finished(&child).await;
    let restart_started = Instant::now();
    // SIGKILL: no controlled shutdown, the log is recovered from what the process left.
    broker.kill(1);
    // The outage: down for 2 s on purpose.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.start_node(1);
    broker.wait_ready(Duration::from_secs(60));
    let answering_after = restart_started.elapsed();

    let done = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(180))
        .await;
    assert!(
        child.running(),
        "logbridge must survive the broker restart on its own"
    );
    let (status, _) = child.terminate(Duration::from_secs(15));
    assert!(
        done,
        "commits did not reach the end after the broker restart: {:?} vs {end:?}",
        kafka.committed(&group)
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));

    let seen = id_counts(&outputs(&out));
    let (missing, duplicates) = produced.lost_and_duplicates(&seen);
    assert_eq!(missing, 0, "events lost across the broker restart");
    assert!(
        finished_before < EVENTS as f64,
        "the restart should land mid-run"
    );
    Restart {
        finished_before,
        committed_before,
        duplicates,
        answering_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_run_recovers_without_restarting_logbridge() {
    let _serial = serial().await;
    // The session outlives the restart (librdkafka's default, 45 s): the member keeps its
    // partitions, and what finished while the broker was away is committed once it is back.
    let kept = broker_restart(None).await;
    println!(
        "broker killed, answering again after {:?}, session 45 s: {} finished before the kill \
         ({} committed); duplicates {}",
        kept.answering_after, kept.finished_before, kept.committed_before, kept.duplicates
    );
    assert_eq!(
        kept.duplicates, 0,
        "with the session kept across the restart nothing is read again"
    );
    // A session shorter than the outage (6 s): librdkafka times the session out itself and
    // the assignment is lost, so nothing finished since the last commit before the kill may
    // be committed; the records are read again after the group is joined anew.
    let lost = broker_restart(Some(6_000)).await;
    println!(
        "broker killed, answering again after {:?}, session 6 s: {} finished before the kill \
         ({} committed); duplicates {}",
        lost.answering_after, lost.finished_before, lost.committed_before, lost.duplicates
    );
    assert!(
        lost.duplicates as i64 <= 100_000 - lost.committed_before,
        "only records past the commit before the kill are read again"
    );
}

/// The test broker itself: a single node and a three-node cluster start, answer metadata with
/// every node, and leave no process behind when dropped. Prints what each costs (start time to
/// answering metadata, resident memory and CPU of each node once started) for docs/testing.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_kafka_starts_answers_and_leaves_nothing_running() {
    let _serial = serial().await;
    for nodes in [1, 3] {
        let cluster = ApacheKafka::start_with(common::apache::Options {
            nodes,
            ..Default::default()
        });
        let client: rdkafka::consumer::BaseConsumer = cluster.client().create().expect("client");
        let metadata =
            rdkafka::consumer::Consumer::fetch_metadata(&client, None, Duration::from_secs(10))
                .expect("metadata");
        assert_eq!(metadata.brokers().len(), nodes, "every node answers");
        let pids: Vec<u32> = cluster
            .node_ids()
            .iter()
            .filter_map(|id| cluster.pid(*id))
            .collect();
        let usage: Vec<String> = cluster
            .node_ids()
            .iter()
            .filter_map(|id| cluster.usage(*id))
            .map(|(rss, cpu)| format!("{} MiB, {:.1} s CPU", rss >> 20, cpu.as_secs_f64()))
            .collect();
        println!(
            "Apache Kafka, {nodes} node(s): log directories formatted in {:.1?}, answering metadata \
             {:.1?} after the start; per node once started: {usage:?}",
            cluster.formatted_in,
            cluster.started_in
        );
        drop(client);
        drop(cluster);
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "broker process {pid} left running"
            );
        }
    }
}

/// Ports taken between the moment they are picked and the moment the broker binds them (the
/// test holds node 1's PLAINTEXT port): at the start the cluster is started again on other
/// ports; a node started again (on its own ports, which the other nodes know) while another
/// process holds one is launched again once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_port_taken_before_the_broker_binds_it_is_retried() {
    let _serial = serial().await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("held address").port();
    let mut cluster = ApacheKafka::start_with(common::apache::Options {
        nodes: 1,
        first_port: Some(port),
        ..Default::default()
    });
    assert_eq!(cluster.port_clashes, 1, "the held port clashed once");
    assert_ne!(
        cluster.brokers(),
        format!("127.0.0.1:{port}"),
        "started on another port"
    );
    drop(held);

    // The node killed, its port taken while it is down, and the node started again.
    let clashes_in_logs = |dir: &std::path::Path| {
        ["node-1.out", "node-1.log"]
            .iter()
            .map(|name| {
                std::fs::read_to_string(dir.join(name))
                    .unwrap_or_default()
                    .matches("Address already in use")
                    .count()
            })
            .sum::<usize>()
    };
    let address = cluster.brokers();
    cluster.kill(1);
    let held = std::net::TcpListener::bind(&address).expect("take the node's port");
    let dir = cluster.dir().to_path_buf();
    let before = clashes_in_logs(&dir);
    // The port is given back once the node failed to bind it.
    let release = std::thread::spawn(move || {
        let started = Instant::now();
        while clashes_in_logs(&dir) == before && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(held);
        clashes_in_logs(&dir) > before
    });
    cluster.start_node(1);
    cluster.wait_ready(Duration::from_secs(90));
    assert!(
        release.join().expect("the releasing thread"),
        "the node never failed on its taken port"
    );
    assert_eq!(cluster.port_clashes, 2, "the restart clashed once");
    assert_eq!(cluster.brokers(), address, "started again on its own port");
    let client: rdkafka::consumer::BaseConsumer = cluster.client().create().expect("client");
    let metadata =
        rdkafka::consumer::Consumer::fetch_metadata(&client, None, Duration::from_secs(10))
            .expect("metadata once started again");
    assert_eq!(metadata.brokers().len(), 1);
}
