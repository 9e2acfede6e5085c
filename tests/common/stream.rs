//! What the crash and churn tests need beside the broker: records produced at a steady pace
//! while instances come and go, the seed of every random choice (printed, so a failure can be
//! replayed), and a count of what an instance wrote over time, read from its output files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use super::{Kafka, Produced};

/// The seed of `test`'s random choices: `LOGBRIDGE_TEST_SEED` when set (to replay a failure),
/// otherwise a new one. Printed either way.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("LOGBRIDGE_TEST_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("LOGBRIDGE_TEST_SEED={text} is not a number")),
        Err(_) => rand::random(),
    };
    println!("{test}: seed {seed} (replay with LOGBRIDGE_TEST_SEED={seed})");
    seed
}

/// A random number generator for `test`, seeded by [`test_seed`].
pub fn test_rng(test: &str) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(test_seed(test))
}

/// Sample events produced to a topic at a steady pace by a task of their own, until told to stop
/// or `cap` events are out.
pub struct Stream {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Produced>,
}

impl Stream {
    /// Produces about `per_second` sample events a second (in four chunks a second) to `kafka`'s
    /// topic, ids from 0, spread over `keys` keys, about `bad_ratio` of them malformed; the
    /// payloads are drawn from `seed`.
    pub fn start(
        kafka: &Kafka,
        per_second: u64,
        cap: u64,
        keys: u64,
        bad_ratio: f64,
        seed: u64,
    ) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let client = kafka.client();
        let topic = kafka.topic.clone();
        let (stop_flag, count) = (stop.clone(), produced.clone());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut result = Produced::default();
            let chunk = (per_second / 4).max(1);
            let started = tokio::time::Instant::now();
            let mut next_id = 0u64;
            let mut round = 0u32;
            while !stop_flag.load(Ordering::SeqCst) && next_id < cap {
                let ids = next_id..(next_id + chunk).min(cap);
                let mut bad = Vec::with_capacity(ids.clone().count());
                let records: Vec<(Option<String>, Vec<u8>)> = ids
                    .clone()
                    .map(|id| {
                        let (key, payload, malformed) =
                            logbridge::tools::produce::sample_event(&mut rng, id, keys, bad_ratio);
                        bad.push(malformed);
                        (Some(key), payload)
                    })
                    .collect();
                let placed = super::produce_records(&client, &topic, &records, "1000000").await;
                for ((id, malformed), place) in ids.zip(bad).zip(placed) {
                    if malformed {
                        result.malformed.insert(place);
                    } else {
                        result.valid_ids.insert(id);
                    }
                }
                next_id = (next_id + chunk).min(cap);
                count.store(next_id, Ordering::SeqCst);
                round += 1;
                // Paced by the clock, not by sleeps after each chunk: a slow chunk is not
                // followed by a full pause.
                tokio::time::sleep_until(started + Duration::from_millis(250) * round).await;
            }
            result
        });
        Stream {
            stop,
            produced,
            task,
        }
    }

    /// Events produced (acknowledged by the broker) so far.
    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }

    /// Waits until all `cap` events are produced, and says what was produced.
    pub async fn until_cap(self) -> Produced {
        self.task.await.expect("the producing task")
    }

    /// Stops producing and says what was produced; a panic of the producing task fails here.
    pub async fn finish(self) -> Produced {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the producing task")
    }
}

/// Lines an instance wrote to its output files, counted as they grow and sampled over time, so
/// that what it wrote in a window before a moment (its crash) can be read off afterwards. Only
/// complete lines count (a torn last line after a SIGKILL is not a record written).
pub struct Written {
    files: Vec<(PathBuf, u64)>,
    lines: u64,
    samples: Vec<(Instant, u64)>,
}

impl Written {
    /// Watches `out`'s `errors.jsonl`, `warnings.jsonl` and `rest.jsonl` (the outputs of
    /// `process::write_child_config`); nothing is counted before the first sample.
    pub fn new(out: &Path) -> Written {
        Written {
            files: ["errors.jsonl", "warnings.jsonl", "rest.jsonl"]
                .iter()
                .map(|name| (out.join(name), 0))
                .collect(),
            lines: 0,
            samples: Vec::new(),
        }
    }

    /// Counts the lines completed since the last sample; returns the total so far.
    pub fn sample(&mut self) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        for (path, read) in &mut self.files {
            let Ok(mut file) = std::fs::File::open(&*path) else {
                continue;
            };
            if file.seek(SeekFrom::Start(*read)).is_err() {
                continue;
            }
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_err() {
                continue;
            }
            // Up to the last newline: a line still being written is counted once it is whole.
            if let Some(end) = bytes.iter().rposition(|byte| *byte == b'\n') {
                self.lines += bytes[..=end].iter().filter(|byte| **byte == b'\n').count() as u64;
                *read += end as u64 + 1;
            }
        }
        self.samples.push((Instant::now(), self.lines));
        self.lines
    }

    /// Lines written after `moment`, as far as the samples tell: the total at the last sample
    /// minus the total at the last sample taken at or before `moment` (an earlier sample only
    /// widens the window, never narrows it).
    pub fn since(&self, moment: Instant) -> u64 {
        let before = self
            .samples
            .iter()
            .rev()
            .find(|(at, _)| *at <= moment)
            .map(|(_, lines)| *lines)
            .unwrap_or(0);
        self.lines - before
    }

    /// Samples every 20 ms for `duration`.
    pub async fn watch(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.sample();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.sample();
    }
}
