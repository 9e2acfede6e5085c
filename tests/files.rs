//! File sinks on a host: size-based rotation under load (in-process pipeline, mock cluster), and
//! logrotate's default mode against the real binary (rename the file, send SIGHUP, the process
//! goes on in a new file). Every event is looked for in every file it may be in.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{Logbridge, HTTP_LISTEN};
use common::*;

/// `path`, then `path.1` to `path.<max_files>`: newest first.
fn rotated_files(path: &Path, max_files: u32) -> Vec<PathBuf> {
    std::iter::once(path.to_path_buf())
        .chain((1..=max_files).map(|index| PathBuf::from(format!("{}.{index}", path.display()))))
        .collect()
}

/// 20 000 events through 3 workers sharing one rotating file: every event is in exactly one
/// file, each whole on its line; no file but the newest passed `max_bytes` (unless it holds one
/// batch, which is never split); per key, the files read oldest to newest keep offset order;
/// the commits reach the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_and_tears_no_line() {
    const EVENTS: u64 = 20_000;
    const MAX_BYTES: u64 = 64 * 1024;
    const MAX_FILES: u32 = 1000;
    const WORKER_CAPACITY: usize = 64;
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let records: Vec<(Option<String>, Vec<u8>)> = (0..EVENTS)
        .map(|id| (Some(format!("key-{}", id % 300)), event(id, "error")))
        .collect();
    kafka.produce(&records).await;
    let end = kafka.end_offsets();

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("errors.jsonl");
    let group = unique("rotation");
    let routes = format!(
        "[[routes]]\nname = \"errors\"\nlevels = [\"error\"]\nworkers = 3\n\
         sink = {{ type = \"file\", path = \"{}\", max_bytes = {MAX_BYTES}, max_files = {MAX_FILES} }}\n",
        path.display()
    );
    let config = kafka.config(
        &group,
        &format!("router_capacity = 256\nworker_capacity = {WORKER_CAPACITY}"),
        &routes,
    );
    let (done, _) = kafka
        .run_until_committed(&group, config, Duration::from_secs(120))
        .await;
    assert!(
        done,
        "commits did not reach the end: {:?} of {end:?}",
        kafka.committed(&group)
    );

    let files: Vec<PathBuf> = rotated_files(&path, MAX_FILES)
        .into_iter()
        .filter(|file| file.exists())
        .collect();
    let mut oldest_first = files.clone();
    oldest_first.reverse();
    // Rotated files are numbered without gaps.
    assert_eq!(
        files,
        rotated_files(&path, files.len() as u32 - 1),
        "rotated files numbered 1.. without gaps"
    );
    let lines = read_lines(&oldest_first);
    let counts = id_counts(&lines);
    assert_eq!(counts.len() as u64, EVENTS, "distinct events");
    assert!(
        counts.values().all(|count| *count == 1),
        "every event exactly once across {} files",
        files.len()
    );
    // With 64 KiB files and lines of about 170 bytes, 20 000 events need dozens of files.
    assert!(files.len() > 20, "rotated only {} times", files.len() - 1);
    for file in &files[1..] {
        let size = std::fs::metadata(file).expect("size").len();
        let text = std::fs::read_to_string(file).expect("read");
        assert!(
            text.ends_with('\n'),
            "{} ends in a whole line",
            file.display()
        );
        let lines = text.lines().count();
        assert!(
            size <= MAX_BYTES || lines <= WORKER_CAPACITY,
            "{} has {size} bytes in {lines} lines: past max_bytes with more than one batch",
            file.display()
        );
    }
    // Same key, same worker: in offset order from the oldest file to the newest.
    let mut last: HashMap<(String, i64), i64> = HashMap::new();
    for line in &lines {
        let key = line["key"].as_str().expect("key").to_string();
        let partition = line["partition"].as_i64().expect("partition");
        let offset = line["offset"].as_i64().expect("offset");
        if let Some(previous) = last.insert((key.clone(), partition), offset) {
            assert!(
                offset > previous,
                "key {key}: offset {offset} after {previous} (rotated files out of order?)"
            );
        }
    }
    println!(
        "rotation: {EVENTS} events in {} files of at most {MAX_BYTES} bytes",
        files.len()
    );
}

/// The binary with one file route, as logrotate's default mode drives it: events, then the
/// file is renamed and SIGHUP sent, then more events. The renamed file holds exactly the
/// events before, the new file exactly those after; the process keeps running and stops
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_file_after_logrotate_renamed_it() {
    const BATCH: u64 = 2_000;
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 2);
    let work = tempfile::tempdir().expect("workdir");
    let path = work.path().join("out/all.jsonl");
    let renamed = work.path().join("out/all.jsonl.1");
    let group = unique("sighup");
    let config = work.path().join("logbridge.toml");
    std::fs::write(
        &config,
        format!(
            "{kafka}\n[pipeline]\ncommit_interval_ms = 200\ndrain_timeout_ms = 3000\n[http]\nlisten = \"{HTTP_LISTEN}\"\n\
             [[routes]]\nname = \"all\"\ndefault = true\nworkers = 2\nsink = {{ type = \"file\", path = \"{path}\" }}\n",
            kafka = kafka_section(&kafka.brokers, &group, &kafka.topic, ""),
            path = path.display()
        ),
    )
    .expect("config");
    let mut child = Logbridge::start(&config, work.path().join("logbridge.log"));

    let produce = |ids: std::ops::Range<u64>| {
        ids.map(|id| (Some(format!("key-{}", id % 50)), event(id, "info")))
            .collect::<Vec<_>>()
    };
    kafka.produce(&produce(0..BATCH)).await;
    let written = wait_for(Duration::from_secs(60), || {
        let path = path.clone();
        async move { read_lines(&[path]).len() as u64 == BATCH }
    })
    .await;
    assert!(written, "the first events reached the file");

    std::fs::rename(&path, &renamed).expect("rename, as logrotate does");
    // SAFETY: kill(2) with a valid signal number has no memory effects; the pid is our child's.
    let sent = unsafe { libc::kill(child.pid() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(sent, 0, "SIGHUP sent");
    let reopened = wait_for(Duration::from_secs(20), || {
        let child = &child;
        async move { child.metric("logbridge_file_reopens_total").await == Some(1.0) }
    })
    .await;
    assert!(reopened, "logbridge_file_reopens_total = 1 after SIGHUP");
    assert!(path.exists(), "the file was created again at its path");

    kafka.produce(&produce(BATCH..2 * BATCH)).await;
    let end = kafka.end_offsets();
    let committed = kafka
        .wait_committed_to(&group, &end, Duration::from_secs(60))
        .await;
    assert!(
        committed,
        "commits reached the end: {:?}",
        kafka.committed(&group)
    );
    assert!(child.running(), "SIGHUP did not stop the process");
    let (status, _) = child.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|status| status.success()),
        "clean stop: {status:?}"
    );

    let before = id_counts(&read_lines(std::slice::from_ref(&renamed)));
    let after = id_counts(&read_lines(std::slice::from_ref(&path)));
    assert_eq!(before.len() as u64, BATCH, "renamed file: the first events");
    assert_eq!(after.len() as u64, BATCH, "new file: the later events");
    assert!(before.iter().all(|(id, count)| *id < BATCH && *count == 1));
    assert!(after.iter().all(|(id, count)| *id >= BATCH && *count == 1));
    let log = std::fs::read_to_string(work.path().join("logbridge.log")).expect("log");
    let reopen_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("file sink reopened"))
        .collect();
    assert_eq!(reopen_lines.len(), 1, "one info line per reopen:\n{log}");
    assert!(
        reopen_lines[0].contains("\"level\":\"INFO\""),
        "{}",
        reopen_lines[0]
    );
}

/// The reader of output files: a last line without its newline (what a process killed while
/// writing it leaves) is returned apart, not counted; a broken line anywhere else fails,
/// naming the file and the line.
#[test]
fn a_torn_last_line_is_returned_apart_and_a_broken_line_mid_file_fails() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("out.jsonl");
    std::fs::write(
        &path,
        "{\"event\":{\"id\":1}}\n{\"event\":{\"id\":2}}\n{\"event\":{\"i",
    )
    .expect("write");
    let output = read_output(std::slice::from_ref(&path));
    assert_eq!(id_counts(&output.lines).len(), 2, "the whole lines");
    assert_eq!(
        output.torn,
        [(path.clone(), "{\"event\":{\"i".to_string())],
        "the torn last line, apart"
    );

    std::fs::write(
        &path,
        "{\"event\":{\"id\":1}}\n{\"event\":{\"i\n{\"event\":{\"id\":3}}\n",
    )
    .expect("write");
    let failed = std::panic::catch_unwind(|| read_output(std::slice::from_ref(&path)))
        .expect_err("a broken line mid-file fails");
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("out.jsonl line 2: not a JSON line"),
        "{message}"
    );
}
