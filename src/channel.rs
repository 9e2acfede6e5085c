//! The channel between two stages of the pipeline: it carries records in batches (one message
//! and at most one wakeup per batch, not per record) and is bounded in records, not in batches,
//! so a stage's capacity means what it says whatever the batch sizes.
//!
//! A sender takes one permit of the channel's semaphore per record before it sends a batch; the
//! receiver gives the batch's permits back when it takes the batch out. Dropping the receiver
//! closes the semaphore, so a sender waiting for room learns at once that the stage is gone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

/// What became of a batch offered to the next stage.
#[derive(Debug)]
pub enum Offer<T> {
    /// In the stage's channel.
    Taken,
    /// Not enough room: the batch is given back whole.
    Full(Vec<T>),
    /// The stage has stopped: the batch is given back.
    Stopped(Vec<T>),
}

/// A channel of at most `capacity` items, sent and received in batches.
pub fn channel<T>(capacity: usize) -> (BatchSender<T>, BatchReceiver<T>) {
    let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
    let (sender, receiver) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(capacity));
    (
        BatchSender {
            sender,
            room: room.clone(),
            capacity,
        },
        BatchReceiver {
            receiver,
            room,
            next: None,
        },
    )
}

/// The sending side (cloneable).
pub struct BatchSender<T> {
    sender: mpsc::UnboundedSender<Vec<T>>,
    room: Arc<Semaphore>,
    capacity: usize,
}

impl<T> Clone for BatchSender<T> {
    fn clone(&self) -> Self {
        BatchSender {
            sender: self.sender.clone(),
            room: self.room.clone(),
            capacity: self.capacity,
        }
    }
}

impl<T> BatchSender<T> {
    /// Sends `batch` if there is room for all of it; never waits. A batch larger than the
    /// whole channel never fits: callers send at most [`BatchSender::max_capacity`] at once.
    pub fn offer(&self, batch: Vec<T>) -> Offer<T> {
        if batch.is_empty() {
            return Offer::Taken;
        }
        match self.room.try_acquire_many(permits(batch.len())) {
            Ok(permit) => {
                permit.forget();
                self.push(batch)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Offer::Full(batch),
            Err(tokio::sync::TryAcquireError::Closed) => Offer::Stopped(batch),
        }
    }

    /// Sends `batch`, waiting for room; gives it back if the receiver is gone. A batch larger
    /// than the channel goes in parts of at most its capacity.
    pub async fn send(&self, mut batch: Vec<T>) -> Result<(), Vec<T>> {
        while batch.len() > self.capacity {
            let rest = batch.split_off(self.capacity);
            if let Err(mut unsent) = self.send_whole(batch).await {
                unsent.extend(rest);
                return Err(unsent);
            }
            batch = rest;
        }
        self.send_whole(batch).await
    }

    async fn send_whole(&self, batch: Vec<T>) -> Result<(), Vec<T>> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.room.acquire_many(permits(batch.len())).await {
            Ok(permit) => {
                permit.forget();
                match self.push(batch) {
                    Offer::Taken => Ok(()),
                    Offer::Full(batch) | Offer::Stopped(batch) => Err(batch),
                }
            }
            Err(_) => Err(batch),
        }
    }

    /// Waits up to `wait` until at least `room` items are free (capped at the capacity), then
    /// sends `batch` if it fits. The batch is given back when the time ran out, the room freed
    /// is smaller than the batch, or the receiver is gone.
    pub async fn send_when_room(&self, batch: Vec<T>, room: usize, wait: Duration) -> Offer<T> {
        let room = room.max(batch.len()).min(self.capacity);
        match tokio::time::timeout(wait, self.room.acquire_many(permits(room))).await {
            Ok(Ok(mut permit)) => {
                if permit.num_permits() < batch.len() {
                    return Offer::Full(batch);
                }
                // The rest of the permits go back to the channel when `permit` is dropped: the
                // batches sent next take them.
                if let Some(taken) = permit.split(batch.len()) {
                    taken.forget();
                }
                self.push(batch)
            }
            Ok(Err(_)) => Offer::Stopped(batch),
            Err(_) => Offer::Full(batch),
        }
    }

    fn push(&self, batch: Vec<T>) -> Offer<T> {
        let len = batch.len();
        match self.sender.send(batch) {
            Ok(()) => Offer::Taken,
            Err(mpsc::error::SendError(batch)) => {
                self.room.add_permits(len);
                Offer::Stopped(batch)
            }
        }
    }

    /// Items the channel holds at most.
    pub fn max_capacity(&self) -> usize {
        self.capacity
    }

    /// Items that fit now.
    pub fn capacity(&self) -> usize {
        self.room.available_permits().min(self.capacity)
    }

    /// Whether at least half the channel is free.
    pub fn half_empty(&self) -> bool {
        self.capacity() * 2 >= self.capacity
    }

    /// Reads the number of items waiting in the channel (0 once it is closed), without keeping
    /// the channel open.
    pub fn depth_reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static
    where
        T: Send + 'static,
    {
        let room = Arc::downgrade(&self.room);
        let capacity = self.capacity;
        move || {
            room.upgrade()
                .filter(|room| !room.is_closed())
                .map_or(0, |room| {
                    capacity.saturating_sub(room.available_permits()) as i64
                })
        }
    }
}

/// The receiving side.
pub struct BatchReceiver<T> {
    receiver: mpsc::UnboundedReceiver<Vec<T>>,
    room: Arc<Semaphore>,
    /// A batch taken out that did not fit under the last call's limit: the next call's first.
    /// Its items still count against the capacity until then.
    next: Option<Vec<T>>,
}

impl<T> BatchReceiver<T> {
    /// Waits for a batch and appends it to `into`, then appends the batches already waiting
    /// while they fit: `into` ends with at most `limit` items, or with the first batch alone
    /// if that is larger (a batch is never split). The room is given back once, at the end, so
    /// a sender cannot refill the channel while this call is still taking: one call takes at
    /// most what the channel held. Returns the number appended: 0 once every sender is gone and
    /// the channel is empty.
    pub async fn recv_many(&mut self, into: &mut Vec<T>, limit: usize) -> usize {
        let before = into.len();
        let first = match self.next.take() {
            Some(batch) => batch,
            None => match self.receiver.recv().await {
                Some(batch) => batch,
                None => return 0,
            },
        };
        append(into, first);
        while into.len() < limit {
            match self.receiver.try_recv() {
                Ok(batch) if into.len() + batch.len() <= limit => append(into, batch),
                Ok(batch) => {
                    self.next = Some(batch);
                    break;
                }
                Err(_) => break,
            }
        }
        let taken = into.len() - before;
        self.room.add_permits(taken);
        taken
    }
}

impl<T> Drop for BatchReceiver<T> {
    fn drop(&mut self) {
        // Senders waiting for room stop waiting: the stage is gone.
        self.room.close();
    }
}

fn append<T>(into: &mut Vec<T>, batch: Vec<T>) {
    if into.is_empty() {
        *into = batch;
    } else {
        into.extend(batch);
    }
}

fn permits(items: usize) -> u32 {
    u32::try_from(items).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_items_whatever_the_batches() {
        let (sender, mut receiver) = channel::<u32>(8);
        assert!(matches!(sender.offer(vec![1, 2, 3, 4, 5]), Offer::Taken));
        assert_eq!(sender.capacity(), 3);
        assert!(!sender.half_empty());
        let Offer::Full(back) = sender.offer(vec![6, 7, 8, 9]) else {
            panic!("4 items do not fit in 3");
        };
        assert_eq!(back, vec![6, 7, 8, 9]);
        assert!(matches!(sender.offer(vec![6, 7, 8]), Offer::Taken));
        assert_eq!(sender.capacity(), 0);
        assert_eq!((sender.depth_reader())(), 8);
        let mut got = Vec::new();
        assert_eq!(receiver.recv_many(&mut got, 100).await, 8);
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(sender.capacity(), 8);
        assert!(sender.half_empty());
    }

    #[tokio::test]
    async fn receive_limit_stops_merging_batches() {
        let (sender, mut receiver) = channel::<u32>(16);
        for batch in [vec![1, 2, 3], vec![4, 5, 6], vec![7]] {
            assert!(matches!(sender.offer(batch), Offer::Taken));
        }
        let mut got = Vec::new();
        assert_eq!(
            receiver.recv_many(&mut got, 4).await,
            3,
            "the second would pass 4"
        );
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(
            sender.capacity(),
            12,
            "a batch kept for the next call still counts"
        );
        got.clear();
        assert_eq!(
            receiver.recv_many(&mut got, 4).await,
            4,
            "the kept batch and the last"
        );
        assert_eq!(got, vec![4, 5, 6, 7]);
        got.clear();
        assert!(matches!(sender.offer(vec![8, 9, 10, 11, 12]), Offer::Taken));
        assert_eq!(
            receiver.recv_many(&mut got, 4).await,
            5,
            "a first batch over the limit"
        );
    }

    // A sender on another thread refills the channel as fast as it can; no single receive may
    // take more than the channel holds (the workers' batch bound rests on it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_receive_takes_at_most_what_the_channel_holds() {
        let (sender, mut receiver) = channel::<u32>(4);
        let sending = tokio::spawn(async move {
            for item in 0..20_000 {
                if sender.send(vec![item]).await.is_err() {
                    break;
                }
            }
        });
        let (mut received, mut largest) = (0, 0);
        let mut got = Vec::new();
        while received < 20_000 {
            got.clear();
            let taken = receiver.recv_many(&mut got, 1_000).await;
            assert!(taken > 0, "the sender is still there");
            largest = largest.max(taken);
            received += taken;
        }
        sending.await.expect("sender task");
        assert!(largest <= 4, "one receive took {largest} of a channel of 4");
    }

    #[tokio::test]
    async fn large_batches_go_in_parts_and_wait_for_room() {
        let (sender, mut receiver) = channel::<u32>(4);
        let sending = tokio::spawn(async move { sender.send((0..10).collect()).await });
        let mut got = Vec::new();
        while got.len() < 10 {
            let mut part = Vec::new();
            receiver.recv_many(&mut part, 1).await;
            assert!(part.len() <= 4, "a part never exceeds the capacity");
            got.extend(part);
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert!(sending.await.expect("sender task").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_room_then_gives_up() {
        let (sender, mut receiver) = channel::<u32>(4);
        assert!(matches!(sender.offer(vec![1, 2, 3]), Offer::Taken));
        // Half the channel (2) is not free within the wait: given back.
        let Offer::Full(back) = sender
            .send_when_room(vec![4], 2, Duration::from_millis(50))
            .await
        else {
            panic!("no room came");
        };
        // Room comes while it waits: taken, and the spare permits go back.
        let waiting = {
            let sender = sender.clone();
            tokio::spawn(
                async move { sender.send_when_room(back, 2, Duration::from_secs(5)).await },
            )
        };
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        receiver.recv_many(&mut got, 100).await;
        assert!(matches!(waiting.await.expect("task"), Offer::Taken));
        assert_eq!(
            sender.capacity(),
            3,
            "one item in the channel, the rest free"
        );
    }

    #[tokio::test]
    async fn a_dropped_receiver_stops_senders_even_while_they_wait() {
        let (sender, receiver) = channel::<u32>(2);
        assert!(matches!(sender.offer(vec![1, 2]), Offer::Taken));
        let waiting = {
            let sender = sender.clone();
            tokio::spawn(async move { sender.send(vec![3]).await })
        };
        tokio::task::yield_now().await;
        drop(receiver);
        assert_eq!(waiting.await.expect("task"), Err(vec![3]));
        assert!(matches!(sender.offer(vec![4]), Offer::Stopped(_)));
        assert_eq!((sender.depth_reader())(), 0);
    }
}
