//! The broker-wide budget for memory held by session queues (`limits.max_queued_memory`).
//!
//! Each session's queue is bounded on its own; this bounds the sum, so that many sessions
//! at their bound cannot together hold more than the operator allowed. A queue's first
//! `FREE` bytes are not counted: an ordinary fan-out (queues that fill and empty within a
//! few messages) then never touches the shared counter, whose cache line would otherwise be
//! written by every core for every delivery. What is left uncounted is at most `FREE` per
//! session, and sessions are bounded by the connection limit. Above `FREE` a queue reserves
//! budget in `CHUNK`s, so the counter moves once per `CHUNK` bytes, not per message.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of each queue not counted against the budget.
pub const FREE: usize = 64 * 1024;
/// Granularity of reservations.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct MemoryBudget {
    used: AtomicUsize,
    /// 0 = unlimited.
    limit: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget { used: AtomicUsize::new(0), limit }
    }

    /// Bytes reserved by all queues (beyond their free part).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// At or over the budget: queues beyond their free part make their publishers wait (flow
    /// control).
    pub fn full(&self) -> bool {
        self.limit != 0 && self.used() >= self.limit
    }

    /// Twice over: messages for queues beyond their free part are dropped (and counted).
    pub fn exhausted(&self) -> bool {
        self.limit != 0 && self.used() >= self.limit.saturating_mul(2)
    }
}

/// One queue's share of the budget.
#[derive(Debug, Default)]
pub struct Reservation {
    reserved: usize,
}

impl Reservation {
    /// Nothing reserved.
    pub fn is_zero(&self) -> bool {
        self.reserved == 0
    }

    /// Adjusts the reservation to a queue now holding `held` bytes.
    pub fn track(&mut self, budget: &MemoryBudget, held: usize) {
        let excess = held.saturating_sub(FREE);
        if excess > self.reserved {
            let grow = (excess - self.reserved).div_ceil(CHUNK) * CHUNK;
            budget.used.fetch_add(grow, Ordering::Relaxed);
            self.reserved += grow;
        } else if self.reserved >= excess + 2 * CHUNK || (excess == 0 && self.reserved > 0) {
            let keep = excess.div_ceil(CHUNK) * CHUNK;
            budget.used.fetch_sub(self.reserved - keep, Ordering::Relaxed);
            self.reserved = keep;
        }
    }

    /// Gives everything back (the queue is gone).
    pub fn release(&mut self, budget: &MemoryBudget) {
        budget.used.fetch_sub(self.reserved, Ordering::Relaxed);
        self.reserved = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_queues_are_free_and_large_ones_reserve_in_chunks() {
        let b = MemoryBudget::new(4 * CHUNK);
        let mut r = Reservation::default();
        r.track(&b, FREE);
        assert_eq!(b.used(), 0);
        r.track(&b, FREE + 1);
        assert_eq!(b.used(), CHUNK);
        r.track(&b, FREE + 3 * CHUNK);
        assert_eq!(b.used(), 3 * CHUNK);
        assert!(!b.full());
        r.track(&b, FREE + 4 * CHUNK);
        assert!(b.full() && !b.exhausted());
        // Shrinking a little keeps the reservation (no churn); emptying gives it all back.
        r.track(&b, FREE + 3 * CHUNK);
        assert_eq!(b.used(), 4 * CHUNK);
        r.track(&b, 10);
        assert_eq!(b.used(), 0);
        r.track(&b, FREE + 8 * CHUNK);
        assert!(b.exhausted());
        r.release(&b);
        assert_eq!(b.used(), 0);
    }
}
