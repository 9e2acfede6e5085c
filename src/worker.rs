//! Worker actors: each owns its sink and its own counters, takes records from its channel in
//! batches, delivers them, and acks every record to the committer with how it fared.
//!
//! A record the sink cannot deliver is logged and acked `failed`; the worker carries on with
//! the next one. Dead letters and retries come later; nothing here can stop a worker but the
//! end of its input.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::warn;

use crate::committer::{AckSender, CommitterMsg};
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::record::{AckStatus, Record};
use crate::sink::Sink;

/// Most records a worker takes from its channel for one sink call.
pub const MAX_BATCH: usize = 64;

/// Sends records to one worker.
#[derive(Clone)]
pub struct WorkerHandle {
    sender: mpsc::Sender<Record>,
}

impl WorkerHandle {
    /// Starts a worker of `route` that delivers to `sink`.
    pub fn spawn(
        route: Arc<str>,
        capacity: usize,
        sink: Box<dyn Sink>,
        acks: AckSender,
        metrics: Arc<Metrics>,
        liveness: Liveness,
    ) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
        // Full: the router waits (and counts the wait as backpressure of this route), its own
        // channel fills, and the consumer pauses partitions.
        let (sender, receiver) = mpsc::channel(capacity);
        let actor = WorkerActor {
            route,
            receiver,
            sink,
            acks,
            metrics,
            liveness,
            delivered: 0,
            failed: 0,
        };
        (WorkerHandle { sender }, tokio::spawn(actor.run()))
    }

    /// Hands a record to the worker, waiting while its channel is full. Gives the record back if
    /// the worker has stopped.
    pub async fn send(&self, record: Record) -> Result<(), Record> {
        self.sender.send(record).await.map_err(|err| err.0)
    }

    /// Weak reference for the depth sampler, which must not keep the channel open.
    pub(crate) fn downgrade(&self) -> mpsc::WeakSender<Record> {
        self.sender.downgrade()
    }
}

struct WorkerActor {
    route: Arc<str>,
    receiver: mpsc::Receiver<Record>,
    sink: Box<dyn Sink>,
    acks: AckSender,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    /// Records this worker delivered (its own state; shown in logs at exit).
    delivered: u64,
    /// Records this worker failed to deliver.
    failed: u64,
}

impl WorkerActor {
    #[tracing::instrument(name = "worker", skip_all, fields(route = %self.route))]
    async fn run(mut self) {
        let _alive = self.liveness.enter("worker");
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
            if self.process(&batch).await.is_err() {
                warn!("committer gone, worker stops");
                return;
            }
            batch.clear();
        }
        tracing::debug!(
            delivered = self.delivered,
            failed = self.failed,
            "worker finished"
        );
    }

    async fn process(&mut self, batch: &[Record]) -> Result<(), crate::committer::CommitterGone> {
        let started = Instant::now();
        let outcomes = self.sink.deliver(&self.route, batch).await;
        self.metrics
            .sink_latency
            .with_label_values(&[&self.route])
            .observe(started.elapsed().as_secs_f64());
        for (index, record) in batch.iter().enumerate() {
            let status = match outcomes.get(index) {
                Some(Ok(())) => {
                    self.delivered += 1;
                    AckStatus::Processed
                }
                Some(Err(err)) => {
                    self.failed += 1;
                    self.metrics
                        .sink_errors
                        .with_label_values(&[&self.route])
                        .inc();
                    warn!(
                        route = %self.route,
                        topic = %record.source.topic,
                        partition = record.source.partition,
                        offset = record.offset,
                        error = %err,
                        "record not delivered"
                    );
                    AckStatus::Failed
                }
                None => {
                    self.failed += 1;
                    warn!(route = %self.route, offset = record.offset, "sink returned no outcome for record");
                    AckStatus::Failed
                }
            };
            self.metrics
                .finished
                .with_label_values(&[&self.route, status.as_str()])
                .inc();
            self.acks
                .send(CommitterMsg::Ack(record.ack(status)))
                .await?;
        }
        Ok(())
    }
}
