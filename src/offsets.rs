//! Offset tracker of the committer: which offset of a partition may be committed.
//!
//! logbridge hands the records of one partition to parallel workers. They are
//! *dispatched* in increasing offset order but *finished* in any order, so the
//! committer may only commit up to the first record that is still being
//! worked on. Kafka commits the *next offset to read*, so the commit position
//! is "last offset of the contiguous finished prefix of the dispatched
//! offsets, plus one".
//!
//! Dispatched offsets need not be consecutive: log compaction and transaction
//! markers leave holes. Holes are never waited for, because only dispatched
//! offsets are tracked: dispatched 5, 6, 8 and finished 5, 6, 8 gives position
//! 9; finished 5 and 8 only gives position 6.
//!
//! [`PartitionOffsets`] makes the classic mistakes impossible:
//! - the position never passes a dispatched record that has not finished, so
//!   a crash never loses unfinished work;
//! - the position never goes backwards (dispatch below what is already
//!   committed is refused);
//! - a double ack or an ack for an offset that was never dispatched is an
//!   error rather than a silent jump of the position.
//!
//! Cost: memory is O(records in flight) because the finished prefix is popped
//! as soon as it forms; [`PartitionOffsets::finished`] is a binary search
//! (O(log n)) plus amortised O(1) popping, since every entry is popped once.

use std::collections::VecDeque;

/// Why an offset was refused. A refused call leaves the tracker unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// Dispatch went backwards or repeated an offset (or went below the
    /// position given to [`PartitionOffsets::starting_at`]).
    #[error("offset {offset} dispatched after {last}: dispatch must be strictly increasing")]
    NotIncreasing {
        /// The refused offset.
        offset: i64,
        /// The offset it had to be above.
        last: i64,
    },
    /// The finished offset is not a dispatched, still unfinished record:
    /// never dispatched (a hole, or never fetched) or finished twice.
    #[error("offset {offset} finished but was never dispatched or already finished")]
    UnknownOffset {
        /// The refused offset.
        offset: i64,
    },
    /// Kafka offsets of records are never negative (negative values are
    /// sentinels such as "invalid offset").
    #[error("offset {offset} is negative")]
    Negative {
        /// The refused offset.
        offset: i64,
    },
}

/// Commit bookkeeping of one partition: dispatched records, which of them
/// finished, and the offset that may be committed.
#[derive(Debug, Default, Clone)]
pub struct PartitionOffsets {
    /// Dispatched records not yet folded into the position, oldest first, as
    /// `(offset, finished)`. Must stay true: offsets strictly increasing (so
    /// binary search works) and the front entry, if any, is unfinished (the
    /// finished prefix is popped at once, which keeps memory O(in flight)).
    entries: VecDeque<(i64, bool)>,
    /// Highest offset ever dispatched; every new dispatch must be above it.
    last_dispatched: Option<i64>,
    /// Next offset to read, i.e. what may be committed. Only ever grows.
    position: Option<i64>,
    /// Position last handed out by `take_advanced`.
    last_taken: Option<i64>,
    /// Highest offset that finished, popped or not.
    highest_finished: Option<i64>,
    /// Number of finished entries in `entries`. Since the front is always
    /// unfinished, each of them waits for an older unfinished record.
    finished_waiting: usize,
}

impl PartitionOffsets {
    /// Empty tracker with no known position: [`position`](Self::position)
    /// is `None` until the oldest dispatched record finished.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking at a known committed position (records below it will
    /// not be dispatched): position() returns it until something advances it.
    ///
    /// The starting position counts as already taken, so
    /// [`take_advanced`](Self::take_advanced) does not return it again, and a
    /// dispatch below it is refused so the position can never go backwards.
    /// A negative `position` is one of Kafka's sentinels ("no committed
    /// offset"), not a position, and gives the same tracker as
    /// [`new`](Self::new).
    pub fn starting_at(position: i64) -> Self {
        if position < 0 {
            return Self::new();
        }
        Self {
            position: Some(position),
            last_taken: Some(position),
            ..Self::default()
        }
    }

    /// Records that `offset` was handed to a worker. Offsets must be strictly
    /// increasing per partition, holes allowed.
    ///
    /// # Errors
    /// [`TrackError::Negative`] for a negative offset,
    /// [`TrackError::NotIncreasing`] if `offset` is not above the last
    /// dispatched one (or, before the first dispatch, below the position given
    /// to [`starting_at`](Self::starting_at)).
    pub fn dispatched(&mut self, offset: i64) -> Result<(), TrackError> {
        if offset < 0 {
            return Err(TrackError::Negative { offset });
        }
        if let Some(last) = self.last_dispatched {
            if offset <= last {
                return Err(TrackError::NotIncreasing { offset, last });
            }
        } else if let Some(position) = self.position {
            // Nothing dispatched yet but a starting position is known: a record
            // below it is already committed, and finishing it would move the
            // position backwards.
            if offset < position {
                return Err(TrackError::NotIncreasing {
                    offset,
                    last: position.saturating_sub(1),
                });
            }
        }
        // Increasing dispatch keeps `entries` sorted for the binary search.
        self.entries.push_back((offset, false));
        self.last_dispatched = Some(offset);
        Ok(())
    }

    /// Records that the worker is done with `offset`, and advances the
    /// position over the finished prefix. O(log n) search, amortised O(1)
    /// popping.
    ///
    /// # Errors
    /// [`TrackError::Negative`] for a negative offset,
    /// [`TrackError::UnknownOffset`] if `offset` is not a dispatched record
    /// that is still unfinished (never dispatched, or a double ack).
    pub fn finished(&mut self, offset: i64) -> Result<(), TrackError> {
        if offset < 0 {
            return Err(TrackError::Negative { offset });
        }
        // Already-popped offsets are no longer in `entries`, so a double ack
        // of a committed record lands here as unknown as well.
        let Ok(index) = self.entries.binary_search_by_key(&offset, |&(o, _)| o) else {
            return Err(TrackError::UnknownOffset { offset });
        };
        match self.entries.get_mut(index) {
            Some(entry) if !entry.1 => entry.1 = true,
            _ => return Err(TrackError::UnknownOffset { offset }),
        }
        self.finished_waiting += 1;
        self.highest_finished = Some(self.highest_finished.map_or(offset, |h| h.max(offset)));
        self.pop_finished_prefix();
        Ok(())
    }

    /// Pops the finished entries at the front and moves the position past
    /// them, restoring "the front entry is unfinished".
    fn pop_finished_prefix(&mut self) {
        while let Some(&(offset, true)) = self.entries.front() {
            self.entries.pop_front();
            self.finished_waiting -= 1;
            // The next offset to read is one past the record just done. Only
            // i64::MAX cannot be followed; Kafka never gets near it, and
            // saturating keeps that record uncommitted rather than panicking.
            self.position = Some(offset.saturating_add(1));
        }
    }

    /// Next offset to read = commit position; None until something finished (or starting_at was used).
    ///
    /// More precisely `None` until the oldest dispatched record finished:
    /// finishing younger ones first does not give a position. Never above an
    /// unfinished dispatched record, never decreasing.
    pub fn position(&self) -> Option<i64> {
        self.position
    }

    /// Position if it advanced since the last call to take_advanced (for "commit on the interval only when something advanced").
    ///
    /// Returns `None` when there is no position yet or it is the one returned
    /// last time (or the one given to [`starting_at`](Self::starting_at)).
    pub fn take_advanced(&mut self) -> Option<i64> {
        let position = self.position?;
        // The position only grows, so "different" means "advanced".
        if self.last_taken == Some(position) {
            return None;
        }
        self.last_taken = Some(position);
        Some(position)
    }

    /// Number of dispatched records not yet finished.
    pub fn in_flight(&self) -> usize {
        // Every entry is either unfinished or one of the waiting finished ones.
        self.entries.len() - self.finished_waiting
    }

    /// Offset of the oldest dispatched-but-unfinished record.
    pub fn oldest_unfinished(&self) -> Option<i64> {
        // The front entry is unfinished by invariant.
        self.entries.front().map(|&(offset, _)| offset)
    }

    /// Highest finished offset seen.
    pub fn highest_finished(&self) -> Option<i64> {
        self.highest_finished
    }

    /// Finished records above the commit position that wait for an older unfinished one (the "finished-but-uncommitted gap").
    pub fn finished_waiting(&self) -> usize {
        self.finished_waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::TestCaseError;

    fn dispatch_all(t: &mut PartitionOffsets, offsets: &[i64]) {
        for &o in offsets {
            assert_eq!(t.dispatched(o), Ok(()));
        }
    }

    /// Everything observable, to show that a refused call changed nothing.
    /// `take_advanced` runs on a clone so the snapshot does not consume it.
    fn snapshot(
        t: &PartitionOffsets,
    ) -> (
        Option<i64>,
        usize,
        Option<i64>,
        Option<i64>,
        usize,
        Option<i64>,
    ) {
        (
            t.position(),
            t.in_flight(),
            t.oldest_unfinished(),
            t.highest_finished(),
            t.finished_waiting(),
            t.clone().take_advanced(),
        )
    }

    #[test]
    fn holes_are_not_waited_for() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[5, 6, 8]);
        for o in [5, 6, 8] {
            assert_eq!(t.finished(o), Ok(()));
        }
        assert_eq!(t.position(), Some(9));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.finished_waiting(), 0);
        assert_eq!(t.oldest_unfinished(), None);
        assert_eq!(t.highest_finished(), Some(8));
    }

    #[test]
    fn position_stops_before_unfinished_record() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[5, 6, 8]);
        t.finished(5).unwrap();
        t.finished(8).unwrap();
        assert_eq!(t.position(), Some(6));
        assert_eq!(t.oldest_unfinished(), Some(6));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.finished_waiting(), 1);
        assert_eq!(t.highest_finished(), Some(8));
        // The last gap closes: position jumps over the hole at 7.
        t.finished(6).unwrap();
        assert_eq!(t.position(), Some(9));
        assert_eq!(t.finished_waiting(), 0);
    }

    #[test]
    fn partial_prefix_position_is_after_last_finished_not_after_hole() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[5, 6, 8]);
        t.finished(5).unwrap();
        t.finished(6).unwrap();
        // 7 was never dispatched, but 8 is unfinished: committing 7 is safe
        // and is what "last finished + 1" gives.
        assert_eq!(t.position(), Some(7));
        assert_eq!(t.oldest_unfinished(), Some(8));
    }

    #[test]
    fn no_position_until_oldest_finishes() {
        let mut t = PartitionOffsets::new();
        assert_eq!(t.position(), None);
        dispatch_all(&mut t, &[10, 11, 12]);
        t.finished(12).unwrap();
        t.finished(11).unwrap();
        assert_eq!(t.position(), None);
        assert_eq!(t.take_advanced(), None);
        assert_eq!(t.finished_waiting(), 2);
        assert_eq!(t.in_flight(), 1);
        t.finished(10).unwrap();
        assert_eq!(t.position(), Some(13));
    }

    #[test]
    fn double_finish_is_unknown_and_changes_nothing() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[1, 2, 3]);
        // Finished and popped into the position.
        t.finished(1).unwrap();
        let before = snapshot(&t);
        assert_eq!(t.finished(1), Err(TrackError::UnknownOffset { offset: 1 }));
        assert_eq!(snapshot(&t), before);
        // Finished but still waiting behind 2.
        t.finished(3).unwrap();
        let before = snapshot(&t);
        assert_eq!(t.finished(3), Err(TrackError::UnknownOffset { offset: 3 }));
        assert_eq!(snapshot(&t), before);
        assert_eq!(t.finished_waiting(), 1);
        t.finished(2).unwrap();
        assert_eq!(t.position(), Some(4));
    }

    #[test]
    fn unknown_offsets_are_refused() {
        let mut t = PartitionOffsets::new();
        assert_eq!(t.finished(0), Err(TrackError::UnknownOffset { offset: 0 }));
        dispatch_all(&mut t, &[5, 6, 8]);
        let before = snapshot(&t);
        for o in [4, 7, 9, 100] {
            assert_eq!(t.finished(o), Err(TrackError::UnknownOffset { offset: o }));
            assert_eq!(snapshot(&t), before);
        }
    }

    #[test]
    fn dispatch_must_be_strictly_increasing() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[3, 7]);
        let before = snapshot(&t);
        assert_eq!(
            t.dispatched(7),
            Err(TrackError::NotIncreasing { offset: 7, last: 7 })
        );
        assert_eq!(
            t.dispatched(4),
            Err(TrackError::NotIncreasing { offset: 4, last: 7 })
        );
        assert_eq!(snapshot(&t), before);
        // After the whole prefix is popped the last dispatch is still the bar.
        t.finished(3).unwrap();
        t.finished(7).unwrap();
        assert_eq!(
            t.dispatched(7),
            Err(TrackError::NotIncreasing { offset: 7, last: 7 })
        );
        assert_eq!(t.dispatched(8), Ok(()));
    }

    #[test]
    fn negative_offsets_are_refused() {
        let mut t = PartitionOffsets::new();
        assert_eq!(t.dispatched(-1), Err(TrackError::Negative { offset: -1 }));
        assert_eq!(t.finished(-1), Err(TrackError::Negative { offset: -1 }));
        assert_eq!(
            t.dispatched(i64::MIN),
            Err(TrackError::Negative { offset: i64::MIN })
        );
        assert_eq!(snapshot(&t), snapshot(&PartitionOffsets::new()));
    }

    #[test]
    fn starting_at_reports_position_without_advancing() {
        let mut t = PartitionOffsets::starting_at(100);
        assert_eq!(t.position(), Some(100));
        assert_eq!(t.take_advanced(), None);
        // Already committed records must not come back.
        assert_eq!(
            t.dispatched(99),
            Err(TrackError::NotIncreasing {
                offset: 99,
                last: 99
            })
        );
        assert_eq!(t.position(), Some(100));
        dispatch_all(&mut t, &[102, 103]);
        t.finished(103).unwrap();
        assert_eq!(t.position(), Some(100));
        assert_eq!(t.take_advanced(), None);
        t.finished(102).unwrap();
        assert_eq!(t.position(), Some(104));
        assert_eq!(t.take_advanced(), Some(104));
    }

    #[test]
    fn starting_at_accepts_dispatch_at_position() {
        let mut t = PartitionOffsets::starting_at(0);
        assert_eq!(t.dispatched(0), Ok(()));
        t.finished(0).unwrap();
        assert_eq!(t.position(), Some(1));
    }

    #[test]
    fn starting_at_negative_sentinel_is_like_new() {
        let mut t = PartitionOffsets::starting_at(-1001);
        assert_eq!(t.position(), None);
        assert_eq!(t.take_advanced(), None);
        assert_eq!(t.dispatched(0), Ok(()));
    }

    #[test]
    fn take_advanced_only_returns_on_advance() {
        let mut t = PartitionOffsets::new();
        assert_eq!(t.take_advanced(), None);
        dispatch_all(&mut t, &[1, 2, 3]);
        assert_eq!(t.take_advanced(), None);
        t.finished(1).unwrap();
        assert_eq!(t.take_advanced(), Some(2));
        assert_eq!(t.take_advanced(), None);
        // Finishing behind an unfinished record does not advance.
        t.finished(3).unwrap();
        assert_eq!(t.take_advanced(), None);
        t.finished(2).unwrap();
        assert_eq!(t.take_advanced(), Some(4));
        assert_eq!(t.take_advanced(), None);
        assert_eq!(t.position(), Some(4));
    }

    #[test]
    fn counts_follow_in_flight_and_waiting() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[0, 2, 4, 6, 8]);
        assert_eq!((t.in_flight(), t.finished_waiting()), (5, 0));
        t.finished(4).unwrap();
        t.finished(8).unwrap();
        assert_eq!((t.in_flight(), t.finished_waiting()), (3, 2));
        t.finished(0).unwrap();
        assert_eq!((t.in_flight(), t.finished_waiting()), (2, 2));
        assert_eq!(t.oldest_unfinished(), Some(2));
        t.finished(2).unwrap();
        // 2 and 4 pop; 8 still waits for 6.
        assert_eq!((t.in_flight(), t.finished_waiting()), (1, 1));
        assert_eq!(t.position(), Some(5));
        t.finished(6).unwrap();
        assert_eq!((t.in_flight(), t.finished_waiting()), (0, 0));
        assert_eq!(t.position(), Some(9));
    }

    #[test]
    fn highest_offset_does_not_panic() {
        let mut t = PartitionOffsets::new();
        dispatch_all(&mut t, &[i64::MAX - 1, i64::MAX]);
        assert_eq!(
            t.dispatched(i64::MAX),
            Err(TrackError::NotIncreasing {
                offset: i64::MAX,
                last: i64::MAX
            })
        );
        t.finished(i64::MAX - 1).unwrap();
        assert_eq!(t.position(), Some(i64::MAX));
        t.finished(i64::MAX).unwrap();
        assert_eq!(t.position(), Some(i64::MAX));
        assert_eq!(t.in_flight(), 0);
        let mut s = PartitionOffsets::starting_at(i64::MAX);
        assert_eq!(
            s.dispatched(i64::MAX - 1),
            Err(TrackError::NotIncreasing {
                offset: i64::MAX - 1,
                last: i64::MAX - 1
            })
        );
        assert_eq!(s.dispatched(i64::MAX), Ok(()));
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            TrackError::NotIncreasing { offset: 3, last: 5 }.to_string(),
            "offset 3 dispatched after 5: dispatch must be strictly increasing"
        );
        assert_eq!(
            TrackError::UnknownOffset { offset: 7 }.to_string(),
            "offset 7 finished but was never dispatched or already finished"
        );
        assert_eq!(
            TrackError::Negative { offset: -2 }.to_string(),
            "offset -2 is negative"
        );
    }

    /// Naive reference: the whole dispatch history with a finished flag,
    /// every answer recomputed from scratch (O(n) per question).
    #[derive(Default)]
    struct Model {
        start: Option<i64>,
        dispatched: Vec<(i64, bool)>,
        last_taken: Option<i64>,
    }

    impl Model {
        fn starting_at(start: Option<i64>) -> Self {
            Self {
                start,
                last_taken: start,
                ..Self::default()
            }
        }

        fn position(&self) -> Option<i64> {
            let mut position = self.start;
            for &(offset, done) in &self.dispatched {
                if !done {
                    break;
                }
                position = Some(offset + 1);
            }
            position
        }

        fn oldest_unfinished(&self) -> Option<i64> {
            self.dispatched.iter().find(|e| !e.1).map(|e| e.0)
        }

        fn in_flight(&self) -> usize {
            self.dispatched.iter().filter(|e| !e.1).count()
        }

        fn finished_waiting(&self) -> usize {
            match self.oldest_unfinished() {
                Some(oldest) => self
                    .dispatched
                    .iter()
                    .filter(|e| e.1 && e.0 > oldest)
                    .count(),
                None => 0,
            }
        }

        fn highest_finished(&self) -> Option<i64> {
            self.dispatched.iter().filter(|e| e.1).map(|e| e.0).max()
        }

        fn dispatch(&mut self, offset: i64) -> Result<(), TrackError> {
            if offset < 0 {
                return Err(TrackError::Negative { offset });
            }
            let bar = match self.dispatched.last() {
                Some(&(last, _)) => Some(last),
                None => self.start.map(|s| s - 1),
            };
            if let Some(last) = bar {
                if offset <= last {
                    return Err(TrackError::NotIncreasing { offset, last });
                }
            }
            self.dispatched.push((offset, false));
            Ok(())
        }

        fn finish(&mut self, offset: i64) -> Result<(), TrackError> {
            if offset < 0 {
                return Err(TrackError::Negative { offset });
            }
            match self.dispatched.iter_mut().find(|e| e.0 == offset && !e.1) {
                Some(entry) => {
                    entry.1 = true;
                    Ok(())
                }
                None => Err(TrackError::UnknownOffset { offset }),
            }
        }

        fn take_advanced(&mut self) -> Option<i64> {
            let position = self.position()?;
            if self.last_taken == Some(position) {
                return None;
            }
            self.last_taken = Some(position);
            Some(position)
        }
    }

    fn check(t: &PartitionOffsets, m: &Model) -> Result<(), TestCaseError> {
        let position = t.position();
        if let (Some(p), Some(oldest)) = (position, m.oldest_unfinished()) {
            prop_assert!(p <= oldest, "position {p} passed unfinished {oldest}");
        }
        prop_assert_eq!(position, m.position());
        prop_assert_eq!(t.in_flight(), m.in_flight());
        prop_assert_eq!(t.finished_waiting(), m.finished_waiting());
        prop_assert_eq!(t.oldest_unfinished(), m.oldest_unfinished());
        prop_assert_eq!(t.highest_finished(), m.highest_finished());
        Ok(())
    }

    fn check_all_done(t: &PartitionOffsets, m: &Model) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.in_flight(), 0);
        prop_assert_eq!(t.finished_waiting(), 0);
        prop_assert_eq!(t.oldest_unfinished(), None);
        match m.dispatched.last() {
            Some(&(last, _)) => {
                prop_assert_eq!(t.position(), Some(last + 1));
                prop_assert_eq!(t.highest_finished(), Some(last));
            }
            None => prop_assert_eq!(t.position(), m.start),
        }
        Ok(())
    }

    /// Optional starting position and a strictly increasing offset list with
    /// random holes (gaps 1..=5) from a random start, 0..300 long.
    fn offsets_with_holes() -> impl Strategy<Value = (Option<i64>, Vec<i64>)> {
        (
            0i64..1_000_000,
            prop::collection::vec(1i64..=5, 0..300),
            prop::option::of(0i64..3),
        )
            .prop_map(|(first, gaps, back)| {
                let mut offsets = Vec::with_capacity(gaps.len());
                let mut next = first;
                for gap in gaps {
                    offsets.push(next);
                    next += gap;
                }
                (back.map(|b| (first - b).max(0)), offsets)
            })
    }

    fn tracker(start: Option<i64>) -> PartitionOffsets {
        start.map_or_else(PartitionOffsets::new, PartitionOffsets::starting_at)
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Valid next dispatch, `gap` above the last one.
        DispatchNext(i64),
        /// Any offset, often invalid.
        DispatchRaw(i64),
        /// Finish something ever dispatched (maybe already finished).
        FinishDispatched(Index),
        /// Any offset, often a hole, unknown or negative.
        FinishRaw(i64),
        TakeAdvanced,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1i64..=5).prop_map(Op::DispatchNext),
            1 => (-3i64..400).prop_map(Op::DispatchRaw),
            4 => any::<Index>().prop_map(Op::FinishDispatched),
            1 => (-3i64..400).prop_map(Op::FinishRaw),
            1 => Just(Op::TakeAdvanced),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Dispatch everything, then finish in a random order.
        #[test]
        fn random_completion_order_matches_model(
            (start, offsets, order) in offsets_with_holes().prop_flat_map(|(start, offsets)| {
                let n = offsets.len();
                (Just(start), Just(offsets), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
            })
        ) {
            let mut t = tracker(start);
            let mut m = Model::starting_at(start);
            check(&t, &m)?;
            for &o in &offsets {
                prop_assert_eq!(t.dispatched(o), Ok(()));
                prop_assert_eq!(m.dispatch(o), Ok(()));
                check(&t, &m)?;
            }
            for &i in &order {
                let o = offsets[i];
                prop_assert_eq!(t.finished(o), Ok(()));
                prop_assert_eq!(m.finish(o), Ok(()));
                check(&t, &m)?;
                // Every finished offset is done for good.
                prop_assert_eq!(t.finished(o), Err(TrackError::UnknownOffset { offset: o }));
            }
            check_all_done(&t, &m)?;
        }

        /// Dispatch a random-size chunk, finish a random subset of what is
        /// outstanding, repeat; then dispatch the rest and finish everything
        /// newest first.
        #[test]
        fn interleaved_dispatch_and_finish_matches_model(
            (start, offsets) in offsets_with_holes(),
            steps in prop::collection::vec((0usize..=8, prop::collection::vec(any::<Index>(), 0..8)), 0..100),
        ) {
            let mut t = tracker(start);
            let mut m = Model::starting_at(start);
            let mut to_dispatch = offsets.iter().copied();
            let mut outstanding: Vec<i64> = Vec::new();
            for (chunk, picks) in steps {
                for o in to_dispatch.by_ref().take(chunk) {
                    prop_assert_eq!(t.dispatched(o), Ok(()));
                    prop_assert_eq!(m.dispatch(o), Ok(()));
                    outstanding.push(o);
                    check(&t, &m)?;
                }
                for pick in picks {
                    if outstanding.is_empty() {
                        break;
                    }
                    let o = outstanding.swap_remove(pick.index(outstanding.len()));
                    prop_assert_eq!(t.finished(o), Ok(()));
                    prop_assert_eq!(m.finish(o), Ok(()));
                    check(&t, &m)?;
                }
            }
            for o in to_dispatch {
                prop_assert_eq!(t.dispatched(o), Ok(()));
                prop_assert_eq!(m.dispatch(o), Ok(()));
                outstanding.push(o);
                check(&t, &m)?;
            }
            outstanding.sort_unstable();
            while let Some(o) = outstanding.pop() {
                prop_assert_eq!(t.finished(o), Ok(()));
                prop_assert_eq!(m.finish(o), Ok(()));
                check(&t, &m)?;
            }
            check_all_done(&t, &m)?;
        }

        /// Random operations, invalid ones included: same result as the
        /// model for every call, and a refused call changes nothing.
        #[test]
        fn random_operations_match_model(
            start in prop::option::of(0i64..50),
            first in 0i64..50,
            ops in prop::collection::vec(op(), 0..300),
        ) {
            let mut t = tracker(start);
            let mut m = Model::starting_at(start);
            // Valid dispatches start at or above the starting position.
            let mut next = start.map_or(first, |s| s + first % 3);
            for op in ops {
                let before = snapshot(&t);
                let (got, want) = match op {
                    Op::DispatchNext(gap) => {
                        let o = next;
                        next += gap;
                        (t.dispatched(o), m.dispatch(o))
                    }
                    Op::DispatchRaw(o) => {
                        let r = (t.dispatched(o), m.dispatch(o));
                        if r.1.is_ok() {
                            next = o + 1;
                        }
                        r
                    }
                    Op::FinishDispatched(pick) => {
                        if m.dispatched.is_empty() {
                            continue;
                        }
                        let o = m.dispatched[pick.index(m.dispatched.len())].0;
                        (t.finished(o), m.finish(o))
                    }
                    Op::FinishRaw(o) => (t.finished(o), m.finish(o)),
                    Op::TakeAdvanced => {
                        prop_assert_eq!(t.take_advanced(), m.take_advanced());
                        (Ok(()), Ok(()))
                    }
                };
                prop_assert_eq!(&got, &want);
                if got.is_err() {
                    prop_assert_eq!(snapshot(&t), before);
                }
                check(&t, &m)?;
            }
            // Finish whatever is left, oldest last, and everything is committed.
            let left: Vec<i64> = m.dispatched.iter().filter(|e| !e.1).map(|e| e.0).rev().collect();
            for o in left {
                prop_assert_eq!(t.finished(o), Ok(()));
                prop_assert_eq!(m.finish(o), Ok(()));
                check(&t, &m)?;
            }
            check_all_done(&t, &m)?;
            prop_assert_eq!(t.take_advanced(), m.take_advanced());
            prop_assert_eq!(t.take_advanced(), None);
        }
    }
}
