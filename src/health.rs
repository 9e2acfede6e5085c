//! Liveness of the actors: each actor holds a guard while it runs, and `/healthz` reports any
//! kind of actor with fewer running than were started.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Shared liveness table: for each actor kind, how many were started and how many still run.
#[derive(Clone, Default)]
pub struct Liveness {
    table: Arc<Mutex<BTreeMap<&'static str, (usize, usize)>>>,
}

/// Marks one actor as running until dropped (also when its task panics and unwinds).
pub struct AliveGuard {
    liveness: Liveness,
    kind: &'static str,
}

impl Liveness {
    /// Records that `count` actors of `kind` are expected to run.
    pub fn expect(&self, kind: &'static str, count: usize) {
        self.with(|table| table.entry(kind).or_default().0 += count);
    }

    /// Called by an actor as it starts.
    pub fn enter(&self, kind: &'static str) -> AliveGuard {
        self.with(|table| table.entry(kind).or_default().1 += 1);
        AliveGuard {
            liveness: self.clone(),
            kind,
        }
    }

    /// `Ok` when every expected actor runs, else the kinds that do not, e.g. `router 0/1`.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let down: Vec<String> = self.with(|table| {
            table
                .iter()
                .filter(|(_, (expected, running))| running < expected)
                .map(|(kind, (expected, running))| format!("{kind} {running}/{expected}"))
                .collect()
        });
        if down.is_empty() {
            Ok(())
        } else {
            Err(down)
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<&'static str, (usize, usize)>) -> T) -> T {
        // The table holds plain counters; a panic elsewhere cannot leave it inconsistent.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut table)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.liveness.with(|table| {
            if let Some(entry) = table.get_mut(self.kind) {
                entry.1 = entry.1.saturating_sub(1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_actors_that_stopped() {
        let liveness = Liveness::default();
        liveness.expect("worker", 2);
        let first = liveness.enter("worker");
        assert_eq!(liveness.check(), Err(vec!["worker 1/2".to_string()]));
        let second = liveness.enter("worker");
        assert_eq!(liveness.check(), Ok(()));
        drop(first);
        drop(second);
        assert_eq!(liveness.check(), Err(vec!["worker 0/2".to_string()]));
    }
}
