//! The order in which input from different clients reached an idle broker, kept where the
//! runtime would lose it. Owns the tickets of that order; knows nothing of packets.
//!
//! A worker sleeping in the I/O driver wakes, when it wakes up, every connection whose socket
//! became readable meanwhile, in the order the kernel reports them: the order the bytes came
//! in. tokio then runs those tasks out of that order: the last one woken runs first on that
//! worker (its LIFO slot), and the other worker, woken to help, takes some of the rest. On a
//! VM a sleeping worker takes 100-300 µs to wake, so two packets from different clients that
//! reach an idle broker within that time were handled in reverse order most of the time: a
//! SUBSCRIBE, then another client's PUBLISH to that topic 100 µs later, and the subscriber got
//! nothing (the Paho interoperability suite's `test_subscribe_options` failed 5 runs of 5,
//! `test_request_response` 2 of 5); an UNSUBSCRIBE overtaken the same way lets one message too
//! many through [MQTT-3.10.4-2]. MQTT orders nothing across connections, but clients written
//! against mosquitto (one thread, events in arrival order) count on it.
//!
//! So a connection woken by a worker that was parked takes a ticket, in wake order, and
//! waits before handling what it read until every connection with an earlier ticket has
//! handled its own input, or `MAX_WAIT` has passed. Wake-ups on a busy worker take no ticket:
//! under load nothing is ordered beyond what TCP orders per connection, and nothing waits.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a connection waits for input that came before its own: past it, the tickets
/// before its own are given up (their connection was paused, closed, or is slow to run).
/// Measured: the earlier connection's turn came 100-150 µs after the later one's.
const MAX_WAIT: Duration = Duration::from_millis(1);

/// Tickets held at once; past it, wake-ups go unordered until some are done.
const MAX_PENDING: usize = 4096;

thread_local! {
    /// This thread is a runtime worker parked in the I/O driver (between the runtime's park
    /// and unpark hooks): the wake-ups it makes come from the kernel's event list.
    static PARKED: Cell<bool> = const { Cell::new(false) };
}

struct Tickets {
    next: u32,
    /// Tickets not yet done, oldest first.
    pending: VecDeque<u32>,
}

static TICKETS: Mutex<Tickets> = Mutex::new(Tickets { next: 1, pending: VecDeque::new() });

fn tickets() -> std::sync::MutexGuard<'static, Tickets> {
    TICKETS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runtime hook: the worker is about to park.
pub fn parking() {
    PARKED.with(|p| p.set(true));
}

/// Runtime hook: the worker is back from parking.
pub fn unparked() {
    PARKED.with(|p| p.set(false));
}

/// Called when a connection's socket wakes it: gives it the next ticket in `slot` when the
/// wake-up comes from a parked worker and the connection holds none yet.
pub fn woken(slot: &AtomicU32) {
    if !PARKED.with(Cell::get) || slot.load(Ordering::Relaxed) != 0 {
        return;
    }
    let mut t = tickets();
    if t.pending.len() >= MAX_PENDING {
        return;
    }
    let ticket = t.next;
    t.next = t.next.wrapping_add(1).max(1);
    t.pending.push_back(ticket);
    slot.store(ticket, Ordering::Relaxed);
}

/// Whether every ticket before `ticket` is done.
fn is_turn(ticket: u32) -> bool {
    tickets().pending.front().is_none_or(|&first| first == ticket)
}

/// `ticket`'s input is handled (or there was none). 0, no ticket, is nothing to give back.
pub fn done(ticket: u32) {
    if ticket == 0 {
        return;
    }
    let mut t = tickets();
    if let Some(i) = t.pending.iter().position(|&p| p == ticket) {
        t.pending.remove(i);
    }
}

/// Gives up the tickets before `ticket` (waited for `MAX_WAIT` already).
fn give_up_before(ticket: u32) {
    let mut t = tickets();
    if let Some(i) = t.pending.iter().position(|&p| p == ticket) {
        t.pending.drain(..i);
    }
}

/// Waits until every ticket before `ticket` is done, or `MAX_WAIT`. Yields meanwhile: the
/// connections it waits for are ready to run, most often on this very worker.
pub async fn wait_turn(ticket: u32) {
    if is_turn(ticket) {
        return;
    }
    let deadline = Instant::now() + MAX_WAIT;
    loop {
        tokio::task::yield_now().await;
        if is_turn(ticket) {
            return;
        }
        if Instant::now() >= deadline {
            return give_up_before(ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the tickets are process-wide.
    #[test]
    fn tickets_follow_wake_order_and_only_from_parked_workers() {
        let (a, b, c) = (AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0));
        woken(&a);
        assert_eq!(a.load(Ordering::Relaxed), 0, "a busy worker's wake-up takes no ticket");
        parking();
        woken(&a);
        woken(&b);
        woken(&a); // woken again before its turn: keeps its place
        woken(&c);
        unparked();
        let (ta, tb, tc) = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed), c.load(Ordering::Relaxed));
        assert!(ta != 0 && tb != 0 && tc != 0);
        assert!(is_turn(ta) && !is_turn(tb) && !is_turn(tc));
        done(ta);
        assert!(is_turn(tb) && !is_turn(tc));
        give_up_before(tc);
        assert!(is_turn(tc));
        done(tc);
        assert!(is_turn(tb), "a ticket given up is nobody's turn to wait for");
    }
}
