//! Committer actor: learns every dispatched offset (from the router) and every finished one
//! (from workers and the router), and decides what may be committed: per partition, only the
//! contiguous finished prefix, as the next offset to read (see [`crate::offsets`]).
//!
//! It never talks to librdkafka itself. On the commit interval it publishes a [`CommitPlan`] on
//! a `watch` channel, which the consumer's commit thread commits (synchronously, see
//! `consumer::commits`); `watch` keeps only the newest plan, so commit requests never outnumber
//! intervals however fast records flow. On revoke and at shutdown the consumer asks for the
//! positions directly ([`CommitterControl`]) and commits them before it lets the partitions go.
//!
//! Two faces: [`CommitterHandle`] for the stages that dispatch and finish records (router,
//! workers, dead-letter actor), and [`CommitterControl`] for the consumer. The committer also
//! owns the dead-letter breaker's switch, since it sees every finished record.

use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::breaker::BreakerSwitch;
use crate::metrics::Metrics;
use crate::offsets::{PartitionOffsets, TrackError};
use crate::record::{PartitionKey, ProcessAck, StageGone};

/// What flows into the committer's data channel. Dispatches and acks share one channel so that a
/// record's dispatch is always seen before its ack: the router sends the dispatch before the
/// worker can even receive the record.
#[derive(Debug)]
pub(crate) enum CommitterMsg {
    /// The router handed these records on; each must finish before the commit may pass it.
    /// (One message per batch the router took, not per record: fewer wakeups.)
    Dispatched(Vec<Dispatch>),
    /// A record finished.
    Ack(ProcessAck),
    /// Records finished together (a worker's delivered batch).
    Acks(Vec<ProcessAck>),
}

/// A record the router handed on.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Source partition.
    pub source: PartitionKey,
    /// Source offset.
    pub offset: i64,
    /// Assignment generation it was read under.
    pub generation: u64,
    /// When the consumer read it (the age of the oldest unfinished record counts from here).
    pub read_at: std::time::Instant,
}

impl Dispatch {
    /// The dispatch of `record`.
    pub fn of(record: &crate::record::Record) -> Dispatch {
        Dispatch {
            source: record.source.clone(),
            offset: record.offset,
            generation: record.generation,
            read_at: record.read_at,
        }
    }
}

/// A position that may be committed for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEntry {
    /// Source partition.
    pub source: PartitionKey,
    /// Generation whose records produced this position; the consumer commits it only while it
    /// still holds the partition under that generation.
    pub generation: u64,
    /// Next offset to read.
    pub offset: i64,
}

/// The positions of every tracked partition, published on each interval where one advanced.
pub type CommitPlan = Arc<Vec<CommitEntry>>;

/// Partitions (with their assignment generation) whose finished records waiting behind an
/// unfinished one reached `max_uncommitted_records`: the consumer keeps them paused until they
/// leave this list (at half the bound).
pub type Holds = Arc<Vec<(PartitionKey, u64)>>;

/// Requests from the consumer thread, which waits for the answer.
#[derive(Debug)]
enum Control {
    /// These partitions are being taken away: wait (up to the drain timeout) for their
    /// dispatched records, answer with their positions, then forget them.
    Revoke {
        partitions: Vec<(PartitionKey, u64)>,
        /// Whether to wait (up to the drain timeout) for the dispatched records to finish; not for
        /// lost partitions (their work is void) nor during shutdown (which has its own deadline).
        wait: bool,
        respond_to: oneshot::Sender<Vec<CommitEntry>>,
    },
    /// Shutdown: answer with every position once all input has ended or at `deadline`.
    Finish {
        deadline: Instant,
        respond_to: oneshot::Sender<FinalPositions>,
    },
    /// The end of a transaction (`delivery = "exactly-once"`; dispatch is held): answer with
    /// every position once no dispatched record is unfinished, or at `deadline`. Nothing is
    /// forgotten.
    Drain {
        deadline: Instant,
        respond_to: oneshot::Sender<FinalPositions>,
    },
}

/// Sends dispatches and acks to the committer. Held by the router, every worker and the
/// dead-letter actor; the committer's input ends when the last one is dropped.
///
/// When the channel is full the sender waits: the committer does nothing but bookkeeping, so it
/// catches up quickly, and a waiting worker or router is ordinary backpressure. A send fails
/// only if the committer is gone.
#[derive(Clone)]
pub struct CommitterHandle {
    sender: mpsc::Sender<CommitterMsg>,
}

impl CommitterHandle {
    /// Starts the committer task. Returns the handle for the stages that dispatch and finish
    /// records, the control for the consumer, and the task.
    pub fn spawn(
        settings: CommitterSettings,
        breaker: BreakerSwitch,
        metrics: Arc<Metrics>,
    ) -> (
        CommitterHandle,
        CommitterControl,
        tokio::task::JoinHandle<()>,
    ) {
        // Full: the router and workers wait (see above).
        let (data_tx, data_rx) = mpsc::channel(settings.capacity);
        // At most one revoke or finish is outstanding (the consumer thread waits for each), so a
        // small channel is never full in practice; `finish` uses try_send regardless.
        let (control_tx, control_rx) = mpsc::channel(4);
        let (plan_tx, plan_rx) = watch::channel(CommitPlan::default());
        let (stalls_tx, stalls_rx) = watch::channel(Vec::new());
        let (holds_tx, holds_rx) = watch::channel(Holds::default());
        let actor = CommitterActor {
            breaker,
            stalls: stalls_tx,
            stall_timeout: settings.stall_timeout,
            holds: holds_tx,
            holds_changed: false,
            max_uncommitted: settings.max_uncommitted,
            data: data_rx,
            control: control_rx,
            plans: plan_tx,
            partitions: FxHashMap::default(),
            fences: FxHashMap::default(),
            revokes: Vec::new(),
            finish: None,
            drain: None,
            finished_shutdown: false,
            interval: settings.interval,
            drain_timeout: settings.drain_timeout,
            metrics,
        };
        let task = tokio::spawn(actor.run());
        (
            CommitterHandle { sender: data_tx },
            CommitterControl {
                sender: control_tx,
                plans: plan_rx,
                stalls: stalls_rx,
                holds: holds_rx,
            },
            task,
        )
    }

    /// The router handed these records on (one message per batch it took).
    pub async fn dispatched(&self, dispatches: Vec<Dispatch>) -> Result<(), StageGone> {
        self.send(CommitterMsg::Dispatched(dispatches)).await
    }

    /// A record finished.
    pub async fn ack(&self, ack: ProcessAck) -> Result<(), StageGone> {
        self.send(CommitterMsg::Ack(ack)).await
    }

    /// Records finished together (a worker's delivered batch).
    pub async fn acks(&self, acks: Vec<ProcessAck>) -> Result<(), StageGone> {
        self.send(CommitterMsg::Acks(acks)).await
    }

    async fn send(&self, msg: CommitterMsg) -> Result<(), StageGone> {
        self.sender
            .send(msg)
            .await
            .map_err(|_| StageGone("committer"))
    }

    /// A handle whose messages land in the returned receiver, for unit tests of the stages
    /// that send to the committer.
    #[cfg(test)]
    pub(crate) fn for_test() -> (CommitterHandle, mpsc::Receiver<CommitterMsg>) {
        let (sender, receiver) = mpsc::channel(1024);
        (CommitterHandle { sender }, receiver)
    }

    /// Messages waiting in the channel (for the depth gauge), through a weak reference that
    /// does not keep the channel open.
    pub(crate) fn depth_probe(&self) -> crate::metrics::DepthProbe {
        crate::metrics::DepthProbe::of(&self.sender)
    }
}

/// The consumer's face of the committer: revoke and shutdown requests (blocking, from the
/// consumer thread), the commit plans, and the stalled partitions.
#[derive(Clone)]
pub struct CommitterControl {
    sender: mpsc::Sender<Control>,
    plans: watch::Receiver<CommitPlan>,
    stalls: watch::Receiver<Vec<Stall>>,
    holds: watch::Receiver<Holds>,
}

impl CommitterControl {
    /// Hands over revoked partitions and waits for their final positions. Called from the
    /// consumer thread (never from an async task: it blocks).
    pub fn revoke_blocking(
        &self,
        partitions: Vec<(PartitionKey, u64)>,
        wait: bool,
    ) -> Result<Vec<CommitEntry>, StageGone> {
        self.ask_blocking(|respond_to| Control::Revoke {
            partitions,
            wait,
            respond_to,
        })
    }

    /// Asks for a revoke without waiting (tests: the request is queued before what follows).
    #[cfg(test)]
    fn revoke_later(
        &self,
        partitions: Vec<(PartitionKey, u64)>,
    ) -> oneshot::Receiver<Vec<CommitEntry>> {
        let (respond_to, response) = oneshot::channel();
        let queued = self.sender.try_send(Control::Revoke {
            partitions,
            wait: true,
            respond_to,
        });
        assert!(queued.is_ok(), "the control channel has room");
        response
    }

    /// Waits until no dispatched record is unfinished, or until `deadline`, and answers with
    /// every partition's position and how many records are still unfinished. For the end of a
    /// transaction, while dispatch is held. Called from the consumer thread (it blocks).
    pub fn drain_blocking(&self, deadline: Instant) -> Result<FinalPositions, StageGone> {
        self.ask_blocking(|respond_to| Control::Drain {
            deadline,
            respond_to,
        })
    }

    /// Sends the request `make` builds around its answer's sender, and waits for the answer.
    fn ask_blocking<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, StageGone> {
        let (respond_to, response) = oneshot::channel();
        self.sender
            .blocking_send(make(respond_to))
            .map_err(|_| StageGone("committer"))?;
        response.blocking_recv().map_err(|_| StageGone("committer"))
    }

    /// Asks for the final positions at shutdown; the answer arrives on the returned receiver
    /// once every record has finished or `deadline` has passed. Non-blocking, so the consumer
    /// thread can keep polling (and so stay in its group) while the pipeline drains.
    pub fn finish(
        &self,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<FinalPositions>, StageGone> {
        let (respond_to, response) = oneshot::channel();
        self.sender
            .try_send(Control::Finish {
                deadline,
                respond_to,
            })
            .map_err(|_| StageGone("committer"))?;
        Ok(response)
    }

    /// The commit plans, newest only.
    pub fn plans(&self) -> watch::Receiver<CommitPlan> {
        self.plans.clone()
    }

    /// Stalled partitions (for `/readyz` and `/status`).
    pub fn stalls(&self) -> watch::Receiver<Vec<Stall>> {
        self.stalls.clone()
    }

    /// Partitions to keep paused for their uncommitted records.
    pub fn holds(&self) -> watch::Receiver<Holds> {
        self.holds.clone()
    }
}

/// Settings of the committer.
pub struct CommitterSettings {
    /// Capacity of the data channel.
    pub capacity: usize,
    /// How often to publish a plan (if something advanced).
    pub interval: Duration,
    /// Longest wait for revoked partitions' in-flight records.
    pub drain_timeout: Duration,
    /// How long records may wait on a partition whose commit does not move before it counts as
    /// stalled.
    pub stall_timeout: Duration,
    /// Finished records a partition may have waiting behind an unfinished one before the
    /// consumer holds it paused.
    pub max_uncommitted: usize,
}

struct Tracked {
    generation: u64,
    offsets: PartitionOffsets,
    last_dispatched: Option<i64>,
    /// When each record from the oldest unfinished one on was dispatched, oldest first: gives
    /// the age of the oldest unfinished record.
    dispatched_at: std::collections::VecDeque<(i64, Instant)>,
    /// Commit position at the last check, and since when it has not moved.
    last_position: Option<i64>,
    unmoved_since: Instant,
    /// Held paused for its uncommitted records (see `Holds`).
    holding: bool,
    /// Outcomes of records that finished ahead of an unfinished one, by offset: the breaker
    /// counts them only when the position passes them, in the partition's order (see
    /// [`Committer::finished`]).
    outcomes: std::collections::BTreeMap<i64, (bool, Option<crate::record::Cause>)>,
}

/// Counts one finished record in the breaker's window over all records.
fn count_outcome(breaker: &mut BreakerSwitch, failed: bool, cause: Option<&crate::record::Cause>) {
    let (route, reason) = cause.map_or(("none", ""), |cause| (&*cause.route, cause.reason));
    breaker.record(failed, route, reason);
}

impl Tracked {
    fn new(generation: u64) -> Tracked {
        Tracked {
            generation,
            offsets: PartitionOffsets::new(),
            last_dispatched: None,
            dispatched_at: std::collections::VecDeque::new(),
            last_position: None,
            unmoved_since: Instant::now(),
            holding: false,
            outcomes: std::collections::BTreeMap::new(),
        }
    }

    /// Tracks a dispatched record and when it was read.
    fn dispatch(&mut self, offset: i64, read_at: Instant) -> Result<(), TrackError> {
        self.offsets.dispatched(offset)?;
        self.last_dispatched = Some(offset);
        self.dispatched_at.push_back((offset, read_at));
        Ok(())
    }

    /// Marks a dispatched record finished, and forgets the dispatch times of the records the
    /// position passed: what is kept never outgrows the tracker's own entries (records from the
    /// oldest unfinished one on), which the uncommitted bound limits.
    fn finish(&mut self, offset: i64) -> Result<(), TrackError> {
        self.offsets.finished(offset)?;
        match self.offsets.oldest_unfinished() {
            Some(oldest) => {
                while self
                    .dispatched_at
                    .front()
                    .is_some_and(|(offset, _)| *offset < oldest)
                {
                    self.dispatched_at.pop_front();
                }
            }
            None => self.dispatched_at.clear(),
        }
        Ok(())
    }

    /// Age of the oldest dispatched record that has not finished.
    fn oldest_unfinished_age(&self, now: Instant) -> Option<Duration> {
        self.offsets.oldest_unfinished()?;
        // `finish` keeps the front at the oldest unfinished record.
        self.dispatched_at
            .front()
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

/// A partition whose records wait while its commit does not move (shown by `/readyz`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stall {
    /// The partition.
    pub source: PartitionKey,
    /// Records dispatched and not finished.
    pub waiting: usize,
    /// Seconds since its commit position last moved.
    pub unmoved_for: Duration,
    /// Oldest unfinished offset.
    pub oldest_offset: Option<i64>,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {} stalled: {} records waiting, commit not moved for {:.0} s",
            self.source,
            self.waiting,
            self.unmoved_for.as_secs_f64()
        )?;
        if let Some(offset) = self.oldest_offset {
            write!(f, " (oldest unfinished offset {offset})")?;
        }
        Ok(())
    }
}

struct PendingRevoke {
    partitions: Vec<(PartitionKey, u64)>,
    deadline: Instant,
    respond_to: oneshot::Sender<Vec<CommitEntry>>,
}

struct PendingFinish {
    deadline: Instant,
    respond_to: oneshot::Sender<FinalPositions>,
}

/// The committer's answer at shutdown.
#[derive(Debug)]
pub struct FinalPositions {
    /// What may be committed.
    pub entries: Vec<CommitEntry>,
    /// Records dispatched and not finished when the drain ended (read again after restart).
    pub unfinished: usize,
}

struct CommitterActor {
    breaker: BreakerSwitch,
    stalls: watch::Sender<Vec<Stall>>,
    stall_timeout: Duration,
    holds: watch::Sender<Holds>,
    /// Whether a partition started or stopped being held since the last publication.
    holds_changed: bool,
    max_uncommitted: usize,
    data: mpsc::Receiver<CommitterMsg>,
    control: mpsc::Receiver<Control>,
    plans: watch::Sender<CommitPlan>,
    partitions: FxHashMap<PartitionKey, Tracked>,
    /// Highest revoked generation per partition: anything read under it or earlier is stale.
    fences: FxHashMap<PartitionKey, u64>,
    revokes: Vec<PendingRevoke>,
    finish: Option<PendingFinish>,
    /// A transaction's end waiting for every dispatched record (see `Control::Drain`).
    drain: Option<PendingFinish>,
    /// The shutdown's final positions were handed over.
    finished_shutdown: bool,
    interval: Duration,
    drain_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl CommitterActor {
    #[tracing::instrument(name = "committer", skip_all)]
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut input_open = true;
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                // Control first: a rebalance callback is blocked waiting for us.
                biased;
                control = self.control.recv() => match control {
                    Some(control) => {
                        // What is queued already came first: a revoke must see the dispatches
                        // and acks sent before it, or it would answer without waiting for
                        // records it does not know are in flight.
                        while let Ok(msg) = self.data.try_recv() {
                            self.handle(msg);
                        }
                        self.handle_control(control);
                    }
                    // The consumer is gone; with it every way to commit.
                    None => break,
                },
                msg = self.data.recv(), if input_open => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        // Drain whatever else is queued before looking at timers, so a burst
                        // of acks costs one wake-up.
                        while let Ok(msg) = self.data.try_recv() {
                            self.handle(msg);
                        }
                    }
                    None => {
                        debug!("all acks received");
                        input_open = false;
                    }
                },
                _ = self.breaker.serve_reset() => {}
                _ = tick.tick() => self.publish_if_advanced(),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            }
            self.settle(input_open);
            self.publish_holds();
            if !input_open && self.finished_shutdown {
                // Shutdown is answered and nothing more can arrive: done. (A revoke now, while
                // the consumer closes, has nothing left to commit.)
                break;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let revoke = self.revokes.iter().map(|r| r.deadline).min();
        let finish = self.finish.as_ref().map(|f| f.deadline);
        let drain = self.drain.as_ref().map(|d| d.deadline);
        [revoke, finish, drain].into_iter().flatten().min()
    }

    fn handle(&mut self, msg: CommitterMsg) {
        match msg {
            CommitterMsg::Dispatched(dispatches) => {
                for dispatch in dispatches {
                    self.dispatched(dispatch);
                }
            }
            CommitterMsg::Ack(ack) => self.finished(ack),
            CommitterMsg::Acks(acks) => {
                for ack in acks {
                    self.finished(ack);
                }
            }
        }
    }

    fn is_fenced(&self, source: &PartitionKey, generation: u64) -> bool {
        self.fences
            .get(source)
            .is_some_and(|fence| generation <= *fence)
    }

    fn dispatched(&mut self, dispatch: Dispatch) {
        let Dispatch {
            source,
            offset,
            generation,
            read_at,
        } = dispatch;
        if self.is_fenced(&source, generation) {
            return;
        }
        let tracked = match self.partitions.get_mut(&source) {
            Some(tracked) => tracked,
            None => self
                .partitions
                .entry(source.clone())
                .or_insert_with(|| Tracked::new(generation)),
        };
        if tracked.generation < generation {
            // A newer assignment of the same partition: its reading restarted from the
            // committed position, so the old bookkeeping no longer applies.
            self.holds_changed |= tracked.holding;
            *tracked = Tracked::new(generation);
        } else if tracked.generation > generation {
            return;
        }
        if let Err(err) = tracked.dispatch(offset, read_at.into()) {
            warn!(topic = %source.topic, partition = source.partition, offset, error = %err, "dispatch not tracked")
        }
    }

    /// Counts a finished record: its partition's position, and the breaker's window over all
    /// records. The window is fed in each partition's offset order, as the position passes the
    /// records, not in the order they finish: a record that fails in decoding finishes at once
    /// while the valid records around it wait for their destination, so in a backlog the
    /// order of finishing makes runs of failures the input does not have (5% malformed records
    /// read again after a rewind tripped `max_consecutive` that way).
    fn finished(&mut self, mut ack: ProcessAck) {
        self.metrics.in_flight.dec();
        if let Some(fan_out) = ack.fan_out.take() {
            // One copy of a record sent to several routes: the record finishes with the last.
            match fan_out.finish(ack.status, ack.cause.take()) {
                Some((status, cause)) => {
                    ack.status = status;
                    ack.cause = cause;
                }
                None => return,
            }
        }
        let reason = ack.cause.as_ref().map_or("", |cause| cause.reason);
        // A tombstone or an unrouted event parked on purpose is not a sign of bad input.
        let failed = ack.status.is_failure() && !crate::record::parked_on_purpose(reason);
        let current = self
            .partitions
            .get_mut(&ack.source)
            .filter(|tracked| tracked.generation == ack.generation);
        let Some(tracked) = current else {
            // Revoked (or reassigned) since the record was read: the next owner may already be
            // ahead, so this ack must never move a commit.
            count_outcome(&mut self.breaker, failed, ack.cause.as_ref());
            self.metrics.stale_acks.inc();
            debug!(topic = %ack.source.topic, partition = ack.source.partition, offset = ack.offset, "stale ack dropped");
            return;
        };
        if let Err(err) = tracked.finish(ack.offset) {
            count_outcome(&mut self.breaker, failed, ack.cause.as_ref());
            warn!(topic = %ack.source.topic, partition = ack.source.partition, offset = ack.offset, error = %err, "ack not tracked");
        } else {
            let passed = |offset: i64| {
                tracked
                    .offsets
                    .oldest_unfinished()
                    .is_none_or(|oldest| offset < oldest)
            };
            if tracked.outcomes.is_empty() && passed(ack.offset) {
                count_outcome(&mut self.breaker, failed, ack.cause.as_ref());
            } else {
                tracked
                    .outcomes
                    .insert(ack.offset, (failed, ack.cause.clone()));
                while let Some(entry) = tracked.outcomes.first_entry() {
                    if !passed(*entry.key()) {
                        break;
                    }
                    let (failed, cause) = entry.remove();
                    count_outcome(&mut self.breaker, failed, cause.as_ref());
                }
            }
        }
        // Hysteresis: held at the bound, released at half of it.
        let waiting = tracked.offsets.finished_waiting();
        let hold = if tracked.holding {
            waiting > self.max_uncommitted / 2
        } else {
            waiting >= self.max_uncommitted
        };
        if hold != tracked.holding {
            tracked.holding = hold;
            self.holds_changed = true;
            if hold {
                warn!(
                    topic = %ack.source.topic,
                    partition = ack.source.partition,
                    waiting,
                    oldest_unfinished = tracked.offsets.oldest_unfinished(),
                    "finished records wait behind an unfinished one at max_uncommitted_records; partition held paused"
                );
            }
        }
    }

    fn handle_control(&mut self, control: Control) {
        match control {
            Control::Revoke {
                partitions,
                wait,
                respond_to,
            } => {
                // Let the dispatched records finish (fencing happens when the revoke is
                // answered), or answer at once.
                let drain = if wait {
                    self.drain_timeout
                } else {
                    Duration::ZERO
                };
                self.revokes.push(PendingRevoke {
                    partitions,
                    deadline: Instant::now() + drain,
                    respond_to,
                });
            }
            Control::Finish {
                deadline,
                respond_to,
            } => {
                self.finish = Some(PendingFinish {
                    deadline,
                    respond_to,
                });
            }
            Control::Drain {
                deadline,
                respond_to,
            } => {
                self.drain = Some(PendingFinish {
                    deadline,
                    respond_to,
                });
            }
        }
    }

    /// Records dispatched and not finished, all partitions together.
    fn unfinished(&self) -> usize {
        self.partitions
            .values()
            .map(|tracked| tracked.offsets.in_flight())
            .sum()
    }

    /// Answers the revokes and the finish whose records are all done or whose deadline passed.
    fn settle(&mut self, input_open: bool) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.revokes.len() {
            let pending = &self.revokes[index];
            let drained = pending
                .partitions
                .iter()
                .all(|(source, generation)| self.in_flight_of(source, *generation) == 0);
            if drained || !input_open || now >= pending.deadline {
                let pending = self.revokes.swap_remove(index);
                self.answer_revoke(pending);
            } else {
                index += 1;
            }
        }
        if self.drain.is_some() {
            let unfinished = self.unfinished();
            let due = self
                .drain
                .as_ref()
                .is_some_and(|drain| unfinished == 0 || !input_open || now >= drain.deadline);
            if let Some(drain) = self.drain.take_if(|_| due) {
                // The asker may have given up; nothing to tell then.
                let _ = drain.respond_to.send(FinalPositions {
                    entries: self.positions(),
                    unfinished,
                });
            }
        }
        let finish_due = self
            .finish
            .as_ref()
            .is_some_and(|finish| !input_open || now >= finish.deadline);
        if finish_due {
            if let Some(finish) = self.finish.take() {
                let entries = self.positions();
                let unfinished = self.unfinished();
                if unfinished > 0 {
                    warn!(unfinished, "drain timeout reached; unfinished records will be read again after restart");
                }
                // The consumer may have given up waiting; then there is nobody to tell.
                let _ = finish.respond_to.send(FinalPositions {
                    entries,
                    unfinished,
                });
                self.finished_shutdown = true;
            }
        }
    }

    fn in_flight_of(&self, source: &PartitionKey, generation: u64) -> usize {
        self.partitions
            .get(source)
            .filter(|tracked| tracked.generation == generation)
            .map_or(0, |tracked| tracked.offsets.in_flight())
    }

    fn answer_revoke(&mut self, pending: PendingRevoke) {
        let mut entries = Vec::new();
        for (source, generation) in pending.partitions {
            let fence = self.fences.entry(source.clone()).or_insert(generation);
            *fence = (*fence).max(generation);
            let Some(tracked) = self.partitions.remove(&source) else {
                continue;
            };
            self.holds_changed |= tracked.holding;
            self.metrics.forget_partition(&source);
            if tracked.generation != generation {
                continue;
            }
            if let Some(offset) = tracked.offsets.position() {
                entries.push(CommitEntry {
                    source: source.clone(),
                    generation,
                    offset,
                });
            }
            let unfinished = tracked.offsets.in_flight();
            self.metrics.abandoned.inc_by(unfinished as u64);
            if unfinished > 0 {
                // The next owner starts at the committed position, so it reads these again.
                warn!(
                    topic = %source.topic,
                    partition = source.partition,
                    replay_from = tracked.offsets.position().or(tracked.offsets.oldest_unfinished()),
                    replay_to = tracked.last_dispatched,
                    unfinished,
                    "revoked with unfinished records; the next owner replays them"
                );
            } else {
                info!(topic = %source.topic, partition = source.partition, "partition drained for revoke");
            }
        }
        // The consumer thread may have timed out and moved on; nothing to do then.
        let _ = pending.respond_to.send(entries);
    }

    /// Per-partition gauges and the stall check, once per commit interval.
    fn observe_partitions(&mut self) {
        let now = Instant::now();
        let mut stalls = Vec::new();
        for (source, tracked) in self.partitions.iter_mut() {
            let position = tracked.offsets.position();
            if position != tracked.last_position {
                tracked.last_position = position;
                tracked.unmoved_since = now;
            }
            let waiting = tracked.offsets.in_flight();
            if waiting == 0 {
                // Nothing waits: an idle partition is not stalled.
                tracked.unmoved_since = now;
            }
            let age = tracked.oldest_unfinished_age(now);
            self.metrics.set_partition(
                source,
                waiting,
                tracked.offsets.finished_waiting(),
                tracked.offsets.highest_finished(),
                age,
            );
            let unmoved_for = now.saturating_duration_since(tracked.unmoved_since);
            if waiting > 0 && unmoved_for >= self.stall_timeout {
                stalls.push(Stall {
                    source: source.clone(),
                    waiting,
                    unmoved_for,
                    oldest_offset: tracked.offsets.oldest_unfinished(),
                });
            }
        }
        stalls.sort_by_key(|stall| std::cmp::Reverse(stall.unmoved_for));
        self.metrics
            .stalled_partitions
            .with_label_values(&["unfinished"])
            .set(stalls.len() as i64);
        if *self.stalls.borrow() != stalls {
            for stall in &stalls {
                warn!(topic = %stall.source.topic, partition = stall.source.partition, waiting = stall.waiting, "{stall}");
            }
            let _ = self.stalls.send(stalls);
        }
    }

    fn positions(&self) -> Vec<CommitEntry> {
        self.partitions
            .iter()
            .filter_map(|(source, tracked)| {
                tracked.offsets.position().map(|offset| CommitEntry {
                    source: source.clone(),
                    generation: tracked.generation,
                    offset,
                })
            })
            .collect()
    }

    /// Publishes the held partitions if one started or stopped being held.
    fn publish_holds(&mut self) {
        if !self.holds_changed {
            return;
        }
        self.holds_changed = false;
        let holds: Vec<(PartitionKey, u64)> = self
            .partitions
            .iter()
            .filter(|(_, tracked)| tracked.holding)
            .map(|(source, tracked)| (source.clone(), tracked.generation))
            .collect();
        // The consumer gone means shutdown: nothing to hold.
        let _ = self.holds.send(Arc::new(holds));
    }

    fn publish_if_advanced(&mut self) {
        let mut advanced = false;
        for tracked in self.partitions.values_mut() {
            advanced |= tracked.offsets.take_advanced().is_some();
        }
        self.observe_partitions();
        debug!(
            advanced,
            partitions = self.partitions.len(),
            "commit interval"
        );
        if advanced {
            // Every receiver gone means the consumer has stopped; nothing left to commit.
            let _ = self.plans.send(Arc::new(self.positions()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;

    fn key(partition: i32) -> PartitionKey {
        PartitionKey {
            topic: crate::record::Topic::new("logs"),
            partition,
        }
    }

    fn ack(partition: i32, offset: i64, generation: u64) -> ProcessAck {
        ProcessAck {
            source: key(partition),
            offset,
            generation,
            status: crate::record::AckStatus::Processed,
            cause: None,
            fan_out: None,
        }
    }

    fn dispatched(partition: i32, offset: i64, generation: u64) -> Vec<Dispatch> {
        vec![Dispatch {
            source: key(partition),
            offset,
            generation,
            read_at: Instant::now().into_std(),
        }]
    }

    /// Runs a blocking call on a plain thread, as the consumer does. (spawn_blocking would stop
    /// the paused test clock from advancing while it runs.)
    fn on_thread<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx
    }

    type Started = (
        CommitterHandle,
        CommitterControl,
        tokio::task::JoinHandle<()>,
    );

    fn settings() -> CommitterSettings {
        CommitterSettings {
            capacity: 64,
            interval: Duration::from_millis(100),
            drain_timeout: Duration::from_millis(500),
            stall_timeout: Duration::from_secs(60),
            max_uncommitted: 1_000,
        }
    }

    fn start(metrics: Arc<Metrics>) -> Started {
        start_with(metrics, settings())
    }

    fn start_with(metrics: Arc<Metrics>, settings: CommitterSettings) -> Started {
        start_with_breaker(metrics, settings, BreakerConfig::default())
    }

    fn start_with_breaker(
        metrics: Arc<Metrics>,
        settings: CommitterSettings,
        breaker: BreakerConfig,
    ) -> Started {
        let (breaker, _) = BreakerSwitch::new(breaker, metrics.clone());
        CommitterHandle::spawn(settings, breaker, metrics)
    }

    /// A committer that holds a partition at 4 finished records waiting.
    fn holding_at_four() -> Started {
        start_with(
            Arc::new(Metrics::new()),
            CommitterSettings {
                max_uncommitted: 4,
                ..settings()
            },
        )
    }

    /// Whether any partition is held; marks the holds seen.
    fn held(holds: &mut watch::Receiver<Holds>) -> bool {
        !holds.borrow_and_update().is_empty()
    }

    /// Lets the committer take what was sent (paused clock: no real wait).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    fn failed(partition: i32, offset: i64, reason: &'static str) -> ProcessAck {
        ProcessAck {
            status: crate::record::AckStatus::DeadLettered,
            cause: Some(crate::record::Cause {
                route: Arc::from("r"),
                reason,
            }),
            ..ack(partition, offset, 1)
        }
    }

    fn dispatched_range(
        partition: i32,
        offsets: std::ops::Range<i64>,
        generation: u64,
    ) -> Vec<Dispatch> {
        offsets
            .flat_map(|offset| dispatched(partition, offset, generation))
            .collect()
    }

    /// A partition whose records all finish between ticks (unrouted, ignored, a null sink) must
    /// not keep a dispatch time per record it ever read: found growing about 12 MiB per million
    /// records.
    #[test]
    fn dispatch_times_are_kept_only_for_records_not_yet_committable() {
        let mut tracked = Tracked::new(1);
        let now = Instant::now();
        for offset in 0..100_000 {
            tracked.dispatch(offset, now).unwrap();
            tracked.finish(offset).unwrap();
            if offset % 1_000 == 999 {
                // A commit-interval tick: nothing unfinished.
                assert_eq!(tracked.oldest_unfinished_age(now), None);
            }
        }
        assert!(
            tracked.dispatched_at.len() <= 1,
            "{} dispatch times kept for 100 000 finished records",
            tracked.dispatched_at.len()
        );
        // With one unfinished record, the times kept reach from it to the newest record, no
        // further back, and its age is still known.
        tracked.dispatch(100_000, now).unwrap();
        for offset in 100_001..100_010 {
            tracked.dispatch(offset, now).unwrap();
            tracked.finish(offset).unwrap();
        }
        assert_eq!(tracked.oldest_unfinished_age(now), Some(Duration::ZERO));
        assert_eq!(tracked.dispatched_at.len(), 10);
        tracked.finish(100_000).unwrap();
        assert_eq!(tracked.oldest_unfinished_age(now), None);
        assert!(tracked.dispatched_at.len() <= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn holds_a_partition_at_the_uncommitted_bound_and_releases_it_at_half() {
        let (acks, control, _task) = holding_at_four();
        let mut holds = control.holds();
        acks.dispatched(dispatched_range(0, 0..12, 1))
            .await
            .expect("alive");
        // 0 stays unfinished; 1, 2, 3 finished behind it: under the bound.
        for offset in 1..4 {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert!(!held(&mut holds), "3 waiting < 4: not held");
        acks.ack(ack(0, 4, 1)).await.expect("alive");
        settle().await;
        assert_eq!(
            *holds.borrow_and_update().clone(),
            vec![(key(0), 1)],
            "held at 4 waiting"
        );
        // 0 finishes: 0..=4 fold into the position, nothing waits: released.
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        settle().await;
        assert!(!held(&mut holds), "released");
        // 5 and 8 unfinished, 6, 7, 9, 10, 11 finished: 5 waiting, held.
        for offset in [6, 7, 9, 10, 11] {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert!(held(&mut holds), "held at 5 waiting");
        // 5 finishes: 5, 6, 7 fold; 9, 10, 11 still wait behind 8: 3 > half of 4, still held.
        acks.ack(ack(0, 5, 1)).await.expect("alive");
        settle().await;
        assert_eq!(control.holds().borrow().len(), 1, "3 waiting: still held");
        acks.ack(ack(0, 8, 1)).await.expect("alive");
        settle().await;
        assert!(!held(&mut holds), "released once half is committed");
        // A held partition that is revoked is no longer held.
        acks.dispatched(dispatched_range(0, 12..20, 1))
            .await
            .expect("alive");
        for offset in 13..20 {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert!(held(&mut holds), "held again");
        let revoked = control.revoke_later(vec![(key(0), 1)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(revoked.await.expect("answered")[0].offset, 12);
        assert!(!held(&mut holds), "a revoked partition is not held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_assignment_of_a_partition_starts_its_bookkeeping_afresh() {
        let metrics = Arc::new(Metrics::new());
        let (acks, control, _task) = start(metrics.clone());
        let mut plans = control.plans();
        acks.dispatched(dispatched_range(0, 0..2, 1))
            .await
            .expect("alive");
        // Assigned again (generation 2), reading from 5: generation 1's work no longer counts.
        acks.dispatched(dispatched(0, 5, 2)).await.expect("alive");
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        acks.ack(ack(0, 5, 2)).await.expect("alive");
        plans.changed().await.expect("a plan");
        assert_eq!(
            *plans.borrow_and_update().clone(),
            vec![CommitEntry {
                source: key(0),
                generation: 2,
                offset: 6
            }]
        );
        assert_eq!(metrics.stale_acks.get(), 1, "generation 1's ack is stale");
        // A dispatch of the older generation after the newer one is ignored.
        acks.dispatched(dispatched(0, 1_000, 1))
            .await
            .expect("alive");
        acks.ack(ack(0, 1_000, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.stale_acks.get(), 2);
        assert!(!plans.has_changed().expect("open"), "nothing moved");
        assert_eq!(
            metrics
                .partition_in_flight
                .with_label_values(&["logs", "0"])
                .get(),
            0,
            "the older generation's dispatch is not tracked as in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_is_released_at_exactly_half_the_bound() {
        let (acks, control, _task) = holding_at_four();
        let mut holds = control.holds();
        acks.dispatched(dispatched_range(0, 0..8, 1))
            .await
            .expect("alive");
        // 0 and 3 unfinished; 1, 2, 4, 5 finished behind 0: 4 waiting, held.
        for offset in [1, 2, 4, 5] {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert!(held(&mut holds), "held at 4");
        // 0 finishes: 0, 1, 2 fold into the position; 4 and 5 wait behind 3: exactly half.
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        settle().await;
        assert!(!held(&mut holds), "released at 2 of 4");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_partition_assigned_again_is_no_longer_held() {
        let (acks, control, _task) = holding_at_four();
        let mut holds = control.holds();
        acks.dispatched(dispatched_range(0, 0..6, 1))
            .await
            .expect("alive");
        for offset in 1..6 {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert!(held(&mut holds), "held");
        // Assigned again (generation 2): reading restarts from the committed position, so the
        // hold of generation 1 no longer applies.
        acks.dispatched(dispatched(0, 0, 2)).await.expect("alive");
        settle().await;
        assert!(!held(&mut holds), "released");
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_unfinished_age_counts_from_the_oldest_unfinished_dispatch() {
        let metrics = Arc::new(Metrics::new());
        let (acks, _control, _task) = start(metrics.clone());
        let age = || {
            metrics
                .partition_oldest_unfinished
                .with_label_values(&["logs", "0"])
                .get()
        };
        acks.dispatched(dispatched(0, 0, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_secs(5)).await;
        acks.dispatched(dispatched(0, 1, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let first = age();
        assert!((9.9..=10.2).contains(&first), "from offset 0: {first}");
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let second = age();
        assert!((5.0..=5.3).contains(&second), "from offset 1: {second}");
    }

    /// In a backlog, malformed records finish (dead-lettered) long before the valid records
    /// around them are delivered. Counted as they finish, 5% malformed records made a run of
    /// failures that tripped `max_consecutive`; counted in offset order, as the position passes
    /// them, they are what they are: no run longer than one.
    #[tokio::test]
    async fn the_breaker_counts_in_offset_order_not_in_the_order_records_finish() {
        let metrics = Arc::new(Metrics::new());
        let breaker = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 1000,
            max_consecutive: 100,
        };
        let (acks, _control, _task) = start_with_breaker(metrics.clone(), settings(), breaker);
        acks.dispatched(dispatched_range(0, 0..4_000, 1))
            .await
            .expect("alive");
        // Every 20th record malformed: 200 of them, all finished before any valid one.
        for offset in (0..4_000).step_by(20) {
            acks.ack(failed(0, offset, "not_json"))
                .await
                .expect("alive");
        }
        settle().await;
        assert_eq!(
            metrics.breaker_tripped.get(),
            0,
            "failures ahead of the position are not counted yet"
        );
        for offset in (0..4_000).filter(|offset| offset % 20 != 0) {
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        settle().await;
        assert_eq!(
            metrics.breaker_tripped.get(),
            0,
            "200 failures finished first, one in 20 in the partition's order"
        );
        // A real run in the partition's order still trips: 101 malformed in a row.
        acks.dispatched(dispatched_range(0, 4_000..4_200, 1))
            .await
            .expect("alive");
        for offset in 4_000..4_101 {
            acks.ack(failed(0, offset, "not_json"))
                .await
                .expect("alive");
        }
        settle().await;
        assert_eq!(
            metrics.breaker_tripped.get(),
            1,
            "101 failures in a row > 100"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tombstones_parked_on_purpose_do_not_count_against_the_breaker() {
        let metrics = Arc::new(Metrics::new());
        let breaker = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 100,
            max_consecutive: 2,
        };
        let (acks, _control, _task) = start_with_breaker(metrics.clone(), settings(), breaker);
        acks.dispatched(dispatched_range(0, 0..10, 1))
            .await
            .expect("alive");
        for offset in 0..5 {
            acks.ack(failed(0, offset, crate::record::TOMBSTONE))
                .await
                .expect("alive");
        }
        settle().await;
        assert_eq!(metrics.breaker_tripped.get(), 0, "5 tombstones in a row");
        for offset in 5..8 {
            acks.ack(failed(0, offset, "not_json"))
                .await
                .expect("alive");
        }
        settle().await;
        assert_eq!(metrics.breaker_tripped.get(), 1, "3 failures in a row > 2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_commit_keeps_moving_is_not_a_stall() {
        let (acks, control, _task) = start_with(
            Arc::new(Metrics::new()),
            CommitterSettings {
                stall_timeout: Duration::from_secs(1),
                ..settings()
            },
        );
        let stalls = control.stalls();
        acks.dispatched(dispatched_range(0, 0..40, 1))
            .await
            .expect("alive");
        // Records always in flight for 3 s, but the commit moves every 200 ms.
        for offset in 0..15 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            acks.ack(ack(0, offset, 1)).await.expect("alive");
        }
        assert!(
            stalls.borrow().is_empty(),
            "a moving partition is not stalled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_commit_does_not_move_is_a_stall_with_its_oldest_record() {
        let metrics = Arc::new(Metrics::new());
        let (acks, control, _task) = start_with(
            metrics.clone(),
            CommitterSettings {
                stall_timeout: Duration::from_secs(1),
                ..settings()
            },
        );
        let mut stalls = control.stalls();
        acks.dispatched(dispatched_range(0, 3..6, 1))
            .await
            .expect("alive");
        acks.ack(ack(0, 3, 1)).await.expect("alive");
        acks.ack(ack(0, 5, 1)).await.expect("alive");
        let started = Instant::now();
        stalls.changed().await.expect("a stall");
        let stall = stalls.borrow_and_update()[0].clone();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "not before the timeout"
        );
        assert_eq!(stall.source, key(0));
        assert_eq!(stall.waiting, 1);
        assert_eq!(stall.oldest_offset, Some(4));
        assert!(
            stall
                .to_string()
                .starts_with("partition logs/0 stalled: 1 records waiting, commit not moved for 1 s (oldest unfinished offset 4)"),
            "{stall}"
        );
        let age = metrics.partition_value(&metrics.partition_oldest_unfinished, &key(0));
        assert!(
            age.is_some_and(|age| age >= 1.0),
            "age of offset 4: {age:?}"
        );
        assert_eq!(
            metrics
                .stalled_partitions
                .with_label_values(&["unfinished"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_is_answered_as_soon_as_it_drained_and_at_its_deadline_otherwise() {
        let (acks, control, _task) = start_with(
            Arc::new(Metrics::new()),
            CommitterSettings {
                // Not a multiple of the 100 ms tick: an answer at the deadline is seen as such.
                drain_timeout: Duration::from_millis(550),
                ..settings()
            },
        );
        acks.dispatched(dispatched(0, 0, 1)).await.expect("alive");
        acks.dispatched(dispatched(1, 0, 1)).await.expect("alive");
        let mut drained = control.revoke_later(vec![(key(0), 1)]);
        let undrained = control.revoke_later(vec![(key(1), 1)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(drained.try_recv().is_err(), "0 is in flight");
        let acked = Instant::now();
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        let answer = drained.await.expect("answered");
        assert!(
            acked.elapsed() < Duration::from_millis(50),
            "answered at once"
        );
        assert_eq!(answer[0].offset, 1);
        let revoked = Instant::now();
        let answer = undrained.await.expect("answered");
        let waited = revoked.elapsed() + Duration::from_millis(50);
        assert!(answer.is_empty(), "nothing finished on partition 1");
        assert!(
            waited >= Duration::from_millis(550) && waited < Duration::from_millis(600),
            "answered at the drain deadline, not at the next tick: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_committer_runs_until_its_input_ends_after_the_shutdown_answer() {
        let (acks, control, task) = start(Arc::new(Metrics::new()));
        acks.dispatched(dispatched(2, 40, 1)).await.expect("alive");
        // The deadline passes with 40 unfinished: answered, and said so.
        let answer = control
            .finish(Instant::now() + Duration::from_millis(300))
            .expect("alive")
            .await
            .expect("answered");
        assert_eq!(answer.unfinished, 1);
        assert!(answer.entries.is_empty());
        // Input still open: it keeps running (a late ack is still taken).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished(), "runs while its input is open");
        acks.ack(ack(2, 40, 1)).await.expect("alive");
        drop(acks);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("ends once its input closed")
            .expect("no panic");
        drop(control);
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_only_the_finished_prefix_and_only_when_it_advanced() {
        // The control handle stays alive: the committer ends when the consumer's are all gone.
        let (acks, control, _task) = start(Arc::new(Metrics::new()));
        let mut plans = control.plans();
        for offset in [10, 11, 13] {
            acks.dispatched(dispatched(0, offset, 1))
                .await
                .expect("committer alive");
        }
        acks.ack(ack(0, 11, 1)).await.expect("alive");
        acks.ack(ack(0, 13, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Nothing finished at the head (10 is still running): no plan at all.
        assert!(!plans.has_changed().expect("open"));

        acks.ack(ack(0, 10, 1)).await.expect("alive");
        plans.changed().await.expect("a plan");
        let plan = plans.borrow_and_update().clone();
        assert_eq!(
            *plan,
            vec![CommitEntry {
                source: key(0),
                generation: 1,
                offset: 14
            }]
        );
        // No further progress: no further plan, however many intervals pass.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!plans.has_changed().expect("open"));
    }

    /// A record sent to three routes is finished by the last of its three copies' acks; until
    /// then nothing is committed past it, and it counts once, not three times, in the breaker.
    #[tokio::test(start_paused = true)]
    async fn a_fanned_out_record_is_finished_by_its_last_copy() {
        let metrics = Arc::new(Metrics::new());
        let breaker = BreakerConfig {
            enabled: true,
            max_invalid_ratio: 1.0,
            window: 1000,
            max_consecutive: 1,
        };
        let (acks, control, _task) = start_with_breaker(metrics.clone(), settings(), breaker);
        let mut plans = control.plans();
        acks.dispatched(dispatched(0, 5, 1)).await.expect("alive");
        let fan_out = crate::record::FanOut::new(3);
        let copy = |ack: ProcessAck| ProcessAck {
            fan_out: Some(fan_out.clone()),
            ..ack
        };
        acks.ack(copy(failed(0, 5, "http_status")))
            .await
            .expect("alive");
        acks.ack(copy(failed(0, 5, "http_status")))
            .await
            .expect("alive");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            !plans.has_changed().expect("open"),
            "two of three destinations finished: nothing may be committed"
        );
        acks.ack(copy(ack(0, 5, 1))).await.expect("alive");
        plans.changed().await.expect("a plan");
        assert_eq!(plans.borrow_and_update()[0].offset, 6);
        assert_eq!(
            metrics.breaker_tripped.get(),
            0,
            "one failed record, not two failures in a row"
        );
    }

    /// The end of a transaction (exactly-once) waits until every dispatched record of every
    /// partition finished, answers with all positions and forgets nothing; at its deadline it
    /// answers with what is still unfinished.
    #[tokio::test(start_paused = true)]
    async fn a_drain_answers_once_every_dispatched_record_finished_or_at_its_deadline() {
        let metrics = Arc::new(Metrics::new());
        let (acks, control, _task) = start(metrics.clone());
        acks.dispatched(dispatched_range(0, 0..3, 1))
            .await
            .expect("alive");
        acks.dispatched(dispatched(1, 7, 1)).await.expect("alive");
        acks.ack(ack(0, 0, 1)).await.expect("alive");
        acks.ack(ack(0, 2, 1)).await.expect("alive");
        settle().await;

        // Offsets 0/1 and 1/7 are unfinished: the drain answers at its deadline with both.
        let draining = control.clone();
        let deadline = Instant::now() + Duration::from_millis(200);
        let timed_out = on_thread(move || draining.drain_blocking(deadline))
            .await
            .expect("thread")
            .expect("committer alive");
        assert_eq!(timed_out.unfinished, 2);
        assert!(Instant::now() >= deadline, "answered before its deadline");

        // Finished while a drain waits: it answers then, with every position. The clock is
        // paused and jumps whenever the runtime idles, also before the drain (asked from another
        // thread) arrives: a deadline of a year cannot pass in that moment (a minute did, once,
        // on a loaded machine).
        let draining = control.clone();
        let deadline = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let answer = on_thread(move || draining.drain_blocking(deadline));
        settle().await;
        acks.ack(ack(0, 1, 1)).await.expect("alive");
        acks.ack(ack(1, 7, 1)).await.expect("alive");
        let mut drained = answer.await.expect("thread").expect("committer alive");
        assert!(
            Instant::now() < deadline,
            "answered at its deadline, not when drained"
        );
        assert_eq!(drained.unfinished, 0);
        drained.entries.sort_by_key(|entry| entry.source.partition);
        assert_eq!(
            drained.entries,
            vec![
                CommitEntry {
                    source: key(0),
                    generation: 1,
                    offset: 3
                },
                CommitEntry {
                    source: key(1),
                    generation: 1,
                    offset: 8
                }
            ]
        );
        // Nothing forgotten: a later ack of the same generation still counts.
        acks.dispatched(dispatched(0, 3, 1)).await.expect("alive");
        acks.ack(ack(0, 3, 1)).await.expect("alive");
        settle().await;
        assert_eq!(metrics.stale_acks.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn acks_of_a_revoked_generation_are_never_committed() {
        let metrics = Arc::new(Metrics::new());
        let (acks, control, _task) = start(metrics.clone());
        let plans = control.plans();
        acks.dispatched(dispatched(0, 5, 1)).await.expect("alive");
        acks.dispatched(dispatched(0, 6, 1)).await.expect("alive");
        acks.ack(ack(0, 5, 1)).await.expect("alive");
        settle().await;

        // Revoke from a blocking thread, as the consumer does; offset 6 never finishes, so the
        // answer comes at the drain timeout with position 6.
        // Keep a handle: the committer ends when the consumer's control handles are all gone.
        let revoking = control.clone();
        let answer = on_thread(move || revoking.revoke_blocking(vec![(key(0), 1)], true))
            .await
            .expect("thread")
            .expect("committer alive");
        assert_eq!(
            answer,
            vec![CommitEntry {
                source: key(0),
                generation: 1,
                offset: 6
            }]
        );
        // The late ack of the old generation is discarded, and a late dispatch too.
        acks.ack(ack(0, 6, 1)).await.expect("alive");
        acks.dispatched(dispatched(0, 7, 1)).await.expect("alive");
        acks.ack(ack(0, 7, 1)).await.expect("alive");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.stale_acks.get(), 2);
        // Whatever plan was published before the revoke, nothing after it moved partition 0.
        assert!(plans
            .borrow()
            .iter()
            .filter(|entry| entry.source == key(0))
            .all(|entry| entry.offset <= 6));
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_waits_for_in_flight_records_then_answers() {
        let (acks, control, _task) = start(Arc::new(Metrics::new()));
        acks.dispatched(dispatched(1, 0, 3)).await.expect("alive");
        // The revoke is queued before the ack is sent: the order under test is explicit.
        let mut answer = control.revoke_later(vec![(key(1), 3)]);
        // Well within the drain timeout (500 ms) and with offset 0 unfinished: no answer yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the revoke waits for the in-flight record"
        );
        acks.ack(ack(1, 0, 3)).await.expect("alive");
        let answer = answer.await.expect("answered");
        assert_eq!(
            answer,
            vec![CommitEntry {
                source: key(1),
                generation: 3,
                offset: 1
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn finish_answers_when_input_ends() {
        let (acks, control, task) = start(Arc::new(Metrics::new()));
        acks.dispatched(dispatched(2, 40, 1)).await.expect("alive");
        let mut response = control
            .finish(Instant::now() + Duration::from_secs(60))
            .expect("alive");
        // Not answered while its input is open and the deadline is ahead, even with nothing
        // arriving for a while.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            matches!(
                response.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ),
            "answered before the input ended"
        );
        acks.ack(ack(2, 40, 1)).await.expect("alive");
        drop(acks);
        let answer = response.await.expect("answered");
        assert_eq!(answer.entries[0].offset, 41);
        assert_eq!(answer.unfinished, 0);
        drop(control);
        task.await
            .expect("committer ends when the consumer is gone");
    }
}
