//! Which store sequence numbers were not committed: what `Store::outcome` must never report
//! as durable.
//!
//! Owns that record and its proof; knows nothing of backends or threads.
//!
//! ## Why nothing is ever forgotten (the proof)
//! Invariant: `failed(seq)` is true for every `seq` whose batch failed (and possibly for a few
//! that succeeded; a spurious failure only makes a client resend, a spurious success loses a
//! message). It holds because:
//! 1. Every failed batch `lo..=hi` is recorded with `record` before the commit thread
//!    publishes `processed >= hi` (so anyone who sees the batch processed sees the record).
//! 2. Nothing is ever removed: `record` merges a range into the last one when they touch
//!    (consecutive failed batches, the usual shape of an outage, cost one entry however many
//!    there are); past `MAX_RANGES` separate failure episodes, the two *oldest* ranges are
//!    merged into one, which only grows the failed set (the batches between them, which
//!    succeeded, are reported failed from then on). So the memory is bounded and the set only
//!    grows.
//! 3. Once the store is fatal (`set_fatal(since)`), every number from `since` on is failed,
//!    including numbers handed out later: nothing after a fatal error is reported durable.
//!    `since` is the first number not processed when the store became fatal, so everything
//!    before it already has its final answer.
//!
//! The cost of (2): a ticket between the two oldest failure episodes that is asked about only
//! after 1,024 newer episodes gets a spurious failure. Tickets are asked about within moments
//! of their batch (held acknowledgements wait for exactly that), so in practice none is.

/// Separate failure episodes kept exactly; more are merged from the oldest end.
const MAX_RANGES: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Failures {
    /// Disjoint, ascending, non-touching inclusive ranges of failed sequence numbers.
    ranges: Vec<(u64, u64)>,
    /// Every sequence number from this one on is failed (the store is fatal).
    fatal_since: Option<u64>,
}

impl Failures {
    /// Records that the batch `lo..=hi` failed. Batches are recorded in ascending order.
    pub(super) fn record(&mut self, lo: u64, hi: u64) {
        if let Some(last) = self.ranges.last_mut() {
            if lo <= last.1.saturating_add(1) {
                last.1 = last.1.max(hi);
                return;
            }
        }
        if self.ranges.len() >= MAX_RANGES {
            // Merge the two oldest: only grows the failed set (see the proof above).
            let second = self.ranges.remove(1);
            if let Some(first) = self.ranges.first_mut() {
                first.1 = second.1;
            }
        }
        self.ranges.push((lo, hi));
    }

    /// Everything from `since` on is failed, for good. The first call wins.
    pub(super) fn set_fatal(&mut self, since: u64) {
        self.fatal_since.get_or_insert(since);
    }

    pub(super) fn failed(&self, seq: u64) -> bool {
        if self.fatal_since.is_some_and(|f| seq >= f) {
            return true;
        }
        let after = self.ranges.partition_point(|&(lo, _)| lo <= seq);
        after > 0 && self.ranges.get(after - 1).is_some_and(|&(_, hi)| seq <= hi)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_thousand_separate_failures_are_all_still_failed() {
        let mut f = Failures::default();
        // Failed batches at odd numbers, successful ones at even numbers in between.
        for i in 0..5_000u64 {
            f.record(2 * i + 1, 2 * i + 1);
        }
        assert!(f.len() <= MAX_RANGES);
        for i in 0..5_000u64 {
            assert!(f.failed(2 * i + 1), "failed batch {} reported durable", 2 * i + 1);
        }
        // Recent successes keep their exact answer; only the oldest may have been merged.
        for i in 5_000 - MAX_RANGES as u64 + 1..5_000 {
            assert!(!f.failed(2 * i), "recent success {} reported failed", 2 * i);
        }
        assert!(!f.failed(0));
        assert!(!f.failed(20_000));
    }

    #[test]
    fn consecutive_failures_cost_one_entry_and_fatal_covers_the_future() {
        let mut f = Failures::default();
        for s in 10..5_010u64 {
            f.record(s, s);
        }
        assert_eq!(f.len(), 1);
        assert!((10..5_010).all(|s| f.failed(s)));
        assert!(!f.failed(9) && !f.failed(5_010));
        f.set_fatal(6_000);
        f.set_fatal(7_000); // the first call wins
        assert!(!f.failed(5_999));
        assert!(f.failed(6_000) && f.failed(6_500) && f.failed(u64::MAX));
    }
}
