//! Exactly-once delivery (`[pipeline] delivery = "exactly-once"`): the Kafka outputs of the
//! records and their consumer offsets are committed in one Kafka transaction per commit
//! interval, so a `read_committed` reader sees each record's outputs once, whatever crashed or
//! moved. Design and reasons: `docs/exactly-once.md`.
//!
//! - [`DispatchGate`]: the router dispatches nothing while a transaction ends.
//! - [`Transactions`]: the instance's transactional producer and the end of each transaction,
//!   driven by the consumer thread (on the interval, in the revoke callback, at shutdown):
//!   hold dispatch, wait until every dispatched record finished (its outputs are then in the
//!   transaction), send the offsets with the group's metadata, commit, begin the next. If that
//!   cannot be done (a send failed, the drain ran out of time, the group moved on), the
//!   transaction is aborted and the caller rewinds every partition to the last committed
//!   position. A fenced producer ends the instance; any other fatal error, or a call that does
//!   not return within its deadline, replaces the producer and rewinds likewise.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::util::Timeout;
use tracing::{debug, error, info, warn};

use crate::committer::{CommitEntry, CommitterControl};
use crate::metrics::Metrics;
use crate::producer::Producer;
use crate::record::PartitionKey;

/// Held shut while a transaction ends: the router passes it for each batch it dispatches, and
/// the end of a transaction waits until no batch is being dispatched and keeps it shut. After
/// the last transaction (shutdown) it stays shut for good.
#[derive(Clone, Default)]
pub struct DispatchGate {
    lock: Arc<tokio::sync::RwLock<()>>,
    /// Set by the shutdown's transaction: nothing more is dispatched.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl DispatchGate {
    /// Waits while the gate is shut; dispatch may go on while the returned pass is held.
    /// `None` once the last transaction ended: what is left is not dispatched (it is read again
    /// after a restart).
    pub(crate) async fn pass(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        let pass = self.lock.read().await;
        (!self.ended.load(std::sync::atomic::Ordering::Acquire)).then_some(pass)
    }

    /// Shuts the gate once no batch is being dispatched, waiting at most `wait`; `None` if the
    /// router kept dispatching that long (a worker channel stayed full). Open again when the
    /// returned guard is dropped.
    fn shut(
        &self,
        runtime: &tokio::runtime::Handle,
        wait: Duration,
    ) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        let lock = self.lock.clone();
        // The timer is made inside `block_on`, which enters the runtime (this thread is not a
        // runtime thread).
        runtime
            .block_on(async move { tokio::time::timeout(wait, lock.write_owned()).await })
            .ok()
    }
}

/// How often the wait for the drain looks whether a send of the transaction failed already
/// (then the transaction can only be aborted, and waiting longer is pointless).
const DRAIN_SLICE: Duration = Duration::from_millis(100);

/// Longest wait for `send_offsets_to_transaction` (librdkafka may not keep it while the group
/// coordinator is down, librdkafka #5456; the broker's `transaction.timeout.ms` is the
/// backstop then).
const SEND_OFFSETS_WAIT: Duration = Duration::from_secs(10);

/// Longest wait for `init_transactions` at start (it aborts what the previous run with the same
/// `transactional.id` left open, which waits for that transaction's markers).
const INIT_WAIT: Duration = Duration::from_secs(60);

/// Attempts of a transactional call that failed retriably.
const ATTEMPTS: usize = 5;

/// Why a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// The commit interval passed.
    Interval,
    /// Partitions are being revoked: commit everything before they go.
    Revoke,
    /// Partitions were lost (the session expired): the group moved on, nothing may be
    /// committed.
    Lost,
    /// The last transaction at shutdown (no new one is begun).
    Shutdown,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Interval => "interval",
            Why::Revoke => "revoke",
            Why::Lost => "lost",
            Why::Shutdown => "shutdown",
        }
    }
}

/// How a transaction ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Committed with these positions (empty: nothing had moved).
    Committed(Vec<CommitEntry>),
    /// Aborted, for the reason given; the partitions were rewound (see [`Transactions::end`]).
    Aborted(&'static str),
}

/// The transactional producer cannot go on: fenced by a newer producer with the same
/// `transactional.id` (or by the broker, after a transaction outlived its timeout), or failed
/// fatally otherwise. Nothing more is committed; the instance stops.
#[derive(Debug, thiserror::Error)]
#[error("the transactional producer cannot go on ({0}); nothing more is committed, and the instance stops (a restart aborts what it left open)")]
pub struct Fatal(pub String);

/// What a failed transactional call leaves to do.
enum Trouble {
    /// Abort the transaction (for this reason) and rewind.
    Abort(&'static str),
    /// Nothing can be done with this producer any more.
    Fatal(String),
    /// The call did not return within its deadline (librdkafka's
    /// `send_offsets_to_transaction` can block for good when the transaction coordinator
    /// dies under it, whatever timeout it was given): the producer is given up.
    Wedged(String),
}

/// Longest wait for `send_offsets_to_transaction`, whose own timeout librdkafka does not
/// always keep.
const SEND_OFFSETS_DEADLINE: Duration = Duration::from_secs(30);

/// Longest wait for a commit or an abort (each flushes what was sent first, which waits for
/// partitions without a leader; a failover takes seconds).
const END_DEADLINE: Duration = Duration::from_secs(90);

/// Runs a blocking transactional call on a thread of its own and waits for it at most
/// `deadline`; `None` if it did not return by then (the thread is left to it, holding its
/// client: the producer is replaced, and the new one's `init_transactions` fences this one, so
/// nothing it might still do can commit).
fn bounded(
    deadline: Duration,
    call: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Option<Result<(), KafkaError>> {
    let (answer, answered) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("logbridge-txn-call".into())
        .spawn(move || {
            // The waiter may have given up.
            let _ = answer.send(call());
        })
        .ok()?;
    answered.recv_timeout(deadline).ok()
}

/// The instance's transactions (one at a time, always one open between `start` and
/// shutdown).
pub(crate) struct Transactions {
    settings: TransactionSettings,
    /// When the open transaction began.
    began: Instant,
    /// Set once the producer failed fatally: nothing is tried any more.
    fatal: Option<String>,
    /// [`Producer::batches_sent`] when the open transaction began.
    sent_at_begin: u64,
    /// What the last committed transaction sent for each partition (generation, offset).
    committed: HashMap<PartitionKey, (u64, i64)>,
}

/// What [`Transactions::start`] needs.
pub(crate) struct TransactionSettings {
    /// The transactional producer (shared with the Kafka sinks and the dead-letter actor).
    pub producer: Producer,
    /// The router's gate.
    pub gate: DispatchGate,
    /// The committer, asked for the drain and the positions.
    pub committer: CommitterControl,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// For the waits on tokio primitives from the consumer thread.
    pub runtime: tokio::runtime::Handle,
    /// Longest wait for the dispatched records at the end of a transaction.
    pub drain_timeout: Duration,
    /// How long a transaction stays open (the commit interval).
    pub interval: Duration,
}

impl Transactions {
    /// Initialises the producer's transactions (aborting whatever the previous run with the
    /// same `transactional.id` left open) and begins the first. Blocking.
    pub(crate) fn start(settings: TransactionSettings) -> anyhow::Result<Transactions> {
        settings
            .producer
            .transactional_client()
            .init_transactions(INIT_WAIT)
            .map_err(|err| {
                anyhow::anyhow!("cannot initialise the transactional producer: {err}")
            })?;
        let mut transactions = Transactions {
            settings,
            began: Instant::now(),
            fatal: None,
            sent_at_begin: 0,
            committed: HashMap::new(),
        };
        transactions
            .begin()
            .map_err(|err| anyhow::anyhow!("the first transaction: {err}"))?;
        info!("transactional producer ready: delivery is exactly-once");
        Ok(transactions)
    }

    /// Whether the open transaction has been open for a commit interval.
    pub(crate) fn due(&self) -> bool {
        self.fatal.is_none() && self.began.elapsed() >= self.settings.interval
    }

    /// Ends the open transaction and, unless `why` is shutdown, begins the next.
    ///
    /// Committed when every dispatched record finished within the drain timeout (dispatch is
    /// held meanwhile): the offsets sent are the positions the committer answers, for the
    /// partitions `owned` says are still held under the entry's generation. Otherwise (or if a
    /// call fails abortably, or `why` is `Lost`) aborted, and `rewind` is called before
    /// dispatch goes on: it must fence every owned partition's generation and seek it back to
    /// its last committed position.
    pub(crate) fn end<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        owned: &dyn Fn(&CommitEntry) -> bool,
        why: Why,
        rewind: &mut dyn FnMut(),
    ) -> Result<Ended, Fatal> {
        if let Some(fatal) = &self.fatal {
            return Err(Fatal(fatal.clone()));
        }
        // Not needed to abort (what a rewind fences is dropped wherever it is), only to commit.
        let shut = match why {
            Why::Lost => None,
            _ => self
                .settings
                .gate
                .shut(&self.settings.runtime, self.settings.drain_timeout),
        };
        let outcome = match (why, &shut) {
            (Why::Lost, _) => Err(Trouble::Abort("partitions_lost")),
            (_, None) => Err(Trouble::Abort("dispatch_not_held")),
            (_, Some(_)) => self.commit(consumer, owned, why != Why::Interval),
        };
        let ended = match outcome {
            Ok(None) => {
                // Nothing was read or sent: the transaction stays open (empty, it holds nothing
                // at the broker and no timeout runs), and no transaction is counted.
                self.began = Instant::now();
                drop(shut);
                return Ok(Ended::Committed(Vec::new()));
            }
            Ok(Some(entries)) => {
                self.settings
                    .metrics
                    .transactions
                    .with_label_values(&["committed", why.as_str()])
                    .inc();
                if !entries.is_empty() {
                    // The offsets went to the broker in the transaction: a commit request.
                    self.settings
                        .metrics
                        .commits
                        .with_label_values(&["ok"])
                        .inc();
                }
                for entry in &entries {
                    self.settings
                        .metrics
                        .set_committed(&entry.source, entry.offset);
                }
                debug!(
                    why = why.as_str(),
                    partitions = entries.len(),
                    "transaction committed"
                );
                Ended::Committed(entries)
            }
            Err(Trouble::Abort(reason)) => {
                warn!(why = why.as_str(), reason, "transaction aborted: every partition reads again from its last committed position");
                match self.abort() {
                    Ok(()) => self.aborted(reason, rewind),
                    Err(trouble) => self.recover(trouble, rewind)?,
                }
            }
            Err(trouble) => self.recover(trouble, rewind)?,
        };
        self.settings
            .metrics
            .transaction_seconds
            .observe(self.began.elapsed().as_secs_f64());
        if why == Why::Shutdown {
            self.settings
                .gate
                .ended
                .store(true, std::sync::atomic::Ordering::Release);
        } else {
            self.begin().map_err(|err| self.fail(err))?;
        }
        // Dispatch goes on (into the new transaction) once the gate is dropped here.
        drop(shut);
        Ok(ended)
    }

    /// After a fatal error of the producer, or a call that never returned: if it was fenced (a
    /// newer producer has its `transactional.id`) or cannot be allowed (authorization, an
    /// unsupported broker), the instance stops ([`Transactions::fail`]). Otherwise (librdkafka
    /// gave up on its own state, e.g. a sequence desynchronisation after a leader failover, or a
    /// call blocked past its deadline when the transaction coordinator died) a new producer
    /// takes its place: its `init_transactions` fences the old one and aborts its open
    /// transaction, every partition is rewound, and the pipeline goes on. Counted as aborted,
    /// `producer_fatal` or `producer_wedged`.
    fn recover(&mut self, trouble: Trouble, rewind: &mut dyn FnMut()) -> Result<Ended, Fatal> {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let (message, reason, wedged) = match trouble {
            Trouble::Fatal(message) => (message, "producer_fatal", false),
            Trouble::Wedged(message) => (message, "producer_wedged", true),
            // An abort that asks for an abort: librdkafka's state is broken.
            Trouble::Abort(reason) => return Err(self.fail(format!("abort failed: {reason}"))),
        };
        let code = self.settings.producer.fatal_error().map(|(code, _)| code);
        let recoverable = wedged
            || code.is_some_and(|code| {
                !matches!(
                    code,
                    Code::Fenced
                        | Code::ProducerFenced
                        | Code::InvalidProducerEpoch
                        | Code::TransactionalIdAuthorizationFailed
                        | Code::ClusterAuthorizationFailed
                        | Code::InvalidTransactionTimeout
                        | Code::UnsupportedFeature
                )
            });
        if !recoverable {
            return Err(self.fail(message));
        }
        warn!(error = %message, reason, "the transactional producer cannot go on (not fenced): a new one takes its place, and every partition reads again from its last committed position");
        self.settings
            .producer
            .replace_transactional()
            .map_err(|err| self.fail(format!("{message}; then: {err:#}")))?;
        self.settings
            .producer
            .transactional_client()
            .init_transactions(INIT_WAIT)
            .map_err(|err| {
                self.fail(format!(
                    "{message}; then the new producer's init_transactions: {err}"
                ))
            })?;
        Ok(self.aborted(reason, rewind))
    }

    /// The transaction was aborted (for `reason`): counts it, and rewinds every partition.
    /// Before the next transaction begins: the rewind fences what was read under the old
    /// generations, and from then on the producer refuses every such record, so none that a
    /// worker or the dead-letter actor still retries is written in the next transaction beside
    /// the copy read again (`producer::Reporting::send_in_order`).
    fn aborted(&self, reason: &'static str, rewind: &mut dyn FnMut()) -> Ended {
        self.settings
            .metrics
            .transactions
            .with_label_values(&["aborted", reason])
            .inc();
        rewind();
        Ended::Aborted(reason)
    }

    /// Counts and keeps a fatal error; every later call returns it.
    fn fail(&mut self, message: String) -> Fatal {
        error!(error = %message, "the transactional producer cannot go on (fenced, or failed fatally): nothing more is committed");
        self.settings.metrics.transactions_fenced.inc();
        // Nothing more is dispatched: nothing could be committed.
        self.settings
            .gate
            .ended
            .store(true, std::sync::atomic::Ordering::Release);
        self.fatal = Some(message.clone());
        Fatal(message)
    }

    /// Waits for the drain, then sends the offsets and commits. Dispatch is held. `None` when
    /// the transaction is empty (no position moved, nothing sent) and `always` is not set (only
    /// the interval's end may be skipped; a revoke or the shutdown always commits): then
    /// nothing is done and it stays open.
    fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        owned: &dyn Fn(&CommitEntry) -> bool,
        always: bool,
    ) -> Result<Option<Vec<CommitEntry>>, Trouble> {
        let deadline = Instant::now() + self.settings.drain_timeout;
        let positions = loop {
            let slice = (Instant::now() + DRAIN_SLICE).min(deadline);
            let answer = self
                .settings
                .committer
                .drain_blocking(slice.into())
                .map_err(|_| Trouble::Abort("committer_gone"))?;
            if answer.unfinished == 0 {
                break answer.entries;
            }
            if self.settings.producer.failed_since_cleared() {
                return Err(Trouble::Abort("send_failed"));
            }
            if Instant::now() >= deadline {
                return Err(Trouble::Abort("drain_timeout"));
            }
        };
        // A record that failed made the transaction abortable, even if the worker finished it
        // since (dead-lettered): its commit would be refused.
        if self.settings.producer.failed_since_cleared() {
            return Err(Trouble::Abort("send_failed"));
        }
        let entries: Vec<CommitEntry> = positions.into_iter().filter(|e| owned(e)).collect();
        let moved = entries.iter().any(|entry| {
            self.committed.get(&entry.source) != Some(&(entry.generation, entry.offset))
        });
        if !always && !moved && self.settings.producer.batches_sent() == self.sent_at_begin {
            return Ok(None);
        }
        let client = self.settings.producer.transactional_client();
        if !entries.is_empty() {
            // Fetched now: the generation (member epoch) it carries must be the current one,
            // or the coordinator refuses the offsets (and so fences a zombie).
            let metadata = consumer
                .group_metadata()
                .ok_or(Trouble::Abort("no_group_metadata"))?;
            let list = crate::consumer::commit_list(&entries);
            let client = client.clone();
            retrying(
                "send the offsets to the transaction",
                SEND_OFFSETS_DEADLINE,
                move || client.send_offsets_to_transaction(&list, &metadata, SEND_OFFSETS_WAIT),
            )?;
        }
        // `Timeout::Never`, as librdkafka advises: it flushes what was sent, then commits.
        retrying("commit the transaction", END_DEADLINE, move || {
            client.commit_transaction(Timeout::Never)
        })?;
        for entry in &entries {
            self.committed
                .insert(entry.source.clone(), (entry.generation, entry.offset));
        }
        Ok(Some(entries))
    }

    fn abort(&self) -> Result<(), Trouble> {
        let client = self.settings.producer.transactional_client();
        retrying("abort the transaction", END_DEADLINE, move || {
            client.abort_transaction(Timeout::Never)
        })
    }

    fn begin(&mut self) -> Result<(), String> {
        self.settings
            .producer
            .transactional_client()
            .begin_transaction()
            .map_err(|err| format!("cannot begin a transaction: {err}"))?;
        self.settings.producer.clear_failed();
        self.sent_at_begin = self.settings.producer.batches_sent();
        self.began = Instant::now();
        Ok(())
    }
}

/// Calls `call` (each attempt [`bounded`] by `deadline`) until it succeeds, it fails other
/// than retriably, or [`ATTEMPTS`] retriable failures; sorts the failure as librdkafka advises
/// (abortable, retriable, else fatal). A call that does not answer within `deadline` is not
/// tried again: the producer is wedged.
fn retrying(
    what: &str,
    deadline: Duration,
    call: impl Fn() -> Result<(), KafkaError> + Send + Sync + 'static,
) -> Result<(), Trouble> {
    let call = Arc::new(call);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let attempt_call = call.clone();
        let err = match bounded(deadline, move || attempt_call()) {
            Some(Ok(())) => return Ok(()),
            Some(Err(err)) => err,
            None => {
                return Err(Trouble::Wedged(format!(
                    "{what}: no answer from librdkafka within its deadline"
                )))
            }
        };
        match &err {
            KafkaError::Transaction(txn) if txn.is_fatal() => {
                return Err(Trouble::Fatal(format!("{what}: {err}")));
            }
            KafkaError::Transaction(txn) if txn.txn_requires_abort() => {
                warn!(error = %err, "cannot {what}; the transaction is aborted");
                return Err(Trouble::Abort(abort_reason(&err)));
            }
            // rust-rdkafka flushes before it commits; a flush that timed out is tried again.
            KafkaError::Transaction(txn) if txn.is_retriable() && attempt < ATTEMPTS => {
                warn!(error = %err, attempt, "cannot {what} yet; trying again");
            }
            KafkaError::Flush(_) if attempt < ATTEMPTS => {
                warn!(error = %err, attempt, "cannot {what} yet; trying again");
            }
            KafkaError::Transaction(txn) if txn.is_retriable() => {
                return Err(Trouble::Abort("retries_exhausted"));
            }
            KafkaError::Flush(_) => return Err(Trouble::Abort("retries_exhausted")),
            _ => return Err(Trouble::Fatal(format!("{what}: {err}"))),
        }
    }
}

/// A short reason for the `aborted` count.
fn abort_reason(err: &KafkaError) -> &'static str {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match err.rdkafka_error_code() {
        Some(Code::IllegalGeneration | Code::UnknownMemberId | Code::FencedInstanceId) => {
            "group_moved_on"
        }
        Some(Code::RebalanceInProgress) => "rebalance_in_progress",
        _ => "abortable_error",
    }
}
