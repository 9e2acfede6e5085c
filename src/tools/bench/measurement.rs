//! What a measurement reports and how it is taken: the window from the first record, CPU time
//! (getrusage), peak RSS (`VmHWM`), and medians over runs.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What a child reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Records read (and, for the pipeline, committed).
    pub events: u64,
    /// Wall time from the first record to the end.
    pub seconds: f64,
    /// User + system CPU time over the same window.
    pub cpu_seconds: f64,
    /// Peak resident set size of the child.
    pub peak_rss_bytes: u64,
    /// Commit requests sent within the window.
    pub commits: u64,
    /// Pipeline only: wall time from the first record until every record was finished (the
    /// rest of `seconds` is the wait for the next commit interval).
    #[serde(default)]
    pub finished_seconds: Option<f64>,
}

impl Measurement {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    /// CPU seconds per million events.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_seconds * 1e6 / (self.events.max(1) as f64)
    }

    /// Commit requests per second.
    pub fn commits_per_second(&self) -> f64 {
        self.commits as f64 / self.seconds.max(1e-9)
    }

    /// Events per second until the last record finished (pipeline only), before the wait for
    /// the commit interval.
    pub fn finished_rate(&self) -> Option<f64> {
        self.finished_seconds
            .map(|seconds| self.events as f64 / seconds.max(1e-9))
    }

    /// Peak RSS in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// Start of a measurement window.
pub(super) struct Window {
    pub(super) started: Instant,
    cpu: f64,
}

impl Window {
    pub(super) fn start() -> Window {
        Window {
            started: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    pub(super) fn finish(&self, events: u64, commits: u64) -> Measurement {
        Measurement {
            events,
            seconds: self.started.elapsed().as_secs_f64(),
            cpu_seconds: cpu_seconds() - self.cpu,
            peak_rss_bytes: peak_rss_bytes(),
            commits,
            finished_seconds: None,
        }
    }
}

/// User + system CPU time of this process so far.
pub(super) fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU time of the calling thread so far, in nanoseconds' resolution (getrusage counts in
/// scheduler ticks, too coarse for a run of a tenth of a second).
pub(super) fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` only writes the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return 0.0;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// Peak resident set size of this process (`VmHWM`), 0 where /proc does not tell.
pub(super) fn peak_rss_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    {
        procfs::process::Process::myself()
            .and_then(|process| process.status())
            .ok()
            .and_then(|status| status.vmhwm)
            .map_or(0, |kib| kib * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median of one figure over a mode's measurements.
pub(super) fn median_of(runs: &[Measurement], figure: impl Fn(&Measurement) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn cpu_time_and_peak_rss_are_read() {
        let busy = Instant::now();
        let mut spin = 0u64;
        while busy.elapsed() < Duration::from_millis(30) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        assert!(spin > 0);
        assert!(cpu_seconds() > 0.0);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes() > 1024 * 1024);
        }
    }
}
