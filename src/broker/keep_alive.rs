//! Keep-alive for every connection from one clock: a connection records the tick of its last
//! read in its `ConnControl`, and a sweep four times a second closes those silent for longer
//! than one and a half keep-alive periods [MQTT-3.1.2-24].
//!
//! Why not a timer per connection: a tokio `Sleep` is 112 bytes plus a timer-wheel entry
//! for every client with a keep-alive, that is nearly all of them; here a client costs 16
//! bytes in a bucket. The price is precision: a connection closes up to two ticks (0.5 s)
//! after its deadline, never before it.
//!
//! A connection that closes is taken out at once (`forget`): its `ConnControl` remembers
//! the bucket it is filed under, so that costs one bucket, not a search of the table.
//! Due ticks are never 0 (the allowance is at least one tick), which leaves 0 to mean "in
//! no bucket".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::session_handle::ConnControl;
use crate::protocol::reason;

/// Length of one tick of the keep-alive clock.
pub const TICK: Duration = Duration::from_millis(250);
const TICKS_PER_SEC: u32 = 4;

pub struct KeepAlive {
    started: Instant,
    /// Ticks since `started`, as of the last sweep (reads are timed with this, not the clock).
    now: AtomicU32,
    /// Due tick -> connections to look at then, with their allowance in ticks.
    due: Mutex<BTreeMap<u32, Vec<Watched>>>,
}

/// A watched connection and its allowance in ticks.
type Watched = (Weak<ConnControl>, u32);

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive { started: Instant::now(), now: AtomicU32::new(0), due: Mutex::new(BTreeMap::new()) }
    }
}

impl KeepAlive {
    /// The current tick, for `ConnControl::seen`.
    pub fn now(&self) -> u32 {
        self.now.load(Ordering::Relaxed)
    }

    /// Starts watching a connection with a keep-alive of `secs` (> 0).
    pub fn watch(&self, control: &Arc<ConnControl>, secs: u16) {
        // One and a half periods, plus one tick so that rounding a read down to its tick can
        // never close a connection early.
        let allowance = u32::from(secs) * TICKS_PER_SEC * 3 / 2 + 1;
        let now = self.now();
        control.seen(now);
        let due = now.saturating_add(allowance);
        let mut map = self.lock();
        control.keep_alive_due.store(due, Ordering::Relaxed);
        map.entry(due).or_default().push((Arc::downgrade(control), allowance));
    }

    /// Stops watching a connection that is closing. Without this its entry would stay until
    /// its deadline, 27 hours for a keep-alive of 65,535 s, however many connections came
    /// and went meanwhile. Costs a look through the one bucket the connection is in.
    pub fn forget(&self, control: &Arc<ConnControl>) {
        // Cleared before the bucket is searched: a sweep holding the entry right now (taken
        // out of the map, not yet put back) then sees it forgotten and drops it. The field
        // is only written under the map's lock or by this swap, and the lock orders the two.
        let due = control.keep_alive_due.swap(0, Ordering::Relaxed);
        if due == 0 {
            return;
        }
        let mut map = self.lock();
        let Some(bucket) = map.get_mut(&due) else { return };
        let target = Arc::as_ptr(control);
        if let Some(i) = bucket.iter().position(|(w, _)| std::ptr::eq(w.as_ptr(), target)) {
            bucket.swap_remove(i);
        }
        if bucket.is_empty() {
            map.remove(&due);
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Vec<Watched>>> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advances the clock and closes the connections past their deadline; the others are
    /// put back under their new deadline.
    pub fn sweep(&self) {
        let now = u32::try_from(self.started.elapsed().as_millis() / TICK.as_millis()).unwrap_or(u32::MAX);
        self.sweep_at(now);
    }

    fn sweep_at(&self, now: u32) {
        for (due, bucket) in self.take_ready(now) {
            self.review(due, bucket, now);
        }
    }

    /// Sets the clock to `now` and takes out the buckets due by then, so connections can
    /// be kicked without holding the lock that `watch` and `forget` need.
    fn take_ready(&self, now: u32) -> BTreeMap<u32, Vec<Watched>> {
        self.now.store(now, Ordering::Relaxed);
        let mut map = self.lock();
        let later = map.split_off(&now.saturating_add(1));
        std::mem::replace(&mut *map, later)
    }

    /// Kicks or re-files the connections of the bucket that was due at `due`. One whose
    /// `keep_alive_due` no longer says `due` was forgotten (or watched again) since the
    /// bucket was taken out, and is dropped.
    fn review(&self, due: u32, bucket: Vec<Watched>, now: u32) {
        for (control, allowance) in bucket {
            let Some(c) = control.upgrade() else { continue }; // connection gone
            if c.closing() {
                continue;
            }
            let deadline = c.last_seen().saturating_add(allowance);
            if deadline <= now {
                if c.keep_alive_due.compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                    c.kick(reason::KEEP_ALIVE_TIMEOUT);
                }
            } else {
                let mut map = self.lock();
                if c.keep_alive_due.compare_exchange(due, deadline, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                    map.entry(deadline).or_default().push((control, allowance));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::signal;

    fn pending(c: &ConnControl) -> u8 {
        let waker = std::task::Waker::noop();
        match c.poll_signals(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(bits) => bits,
            std::task::Poll::Pending => 0,
        }
    }

    #[test]
    fn silent_connections_are_kicked_after_one_and_a_half_periods_and_not_before() {
        let ka = KeepAlive::default();
        let quiet = Arc::new(ConnControl::default());
        let chatty = Arc::new(ConnControl::default());
        ka.watch(&quiet, 1);
        ka.watch(&chatty, 1);
        // 1 s keep-alive: 1.5 s = 6 ticks, plus one.
        for tick in 1..=7 {
            chatty.seen(tick);
            ka.sweep_at(tick);
            let expect = if tick == 7 { signal::KICK } else { 0 };
            assert_eq!(pending(&quiet), expect, "tick {tick}");
            assert_eq!(pending(&chatty), 0, "tick {tick}");
        }
        assert_eq!(quiet.reason(), reason::KEEP_ALIVE_TIMEOUT);
    }

    #[test]
    fn connections_that_are_gone_are_forgotten() {
        let ka = KeepAlive::default();
        let c = Arc::new(ConnControl::default());
        ka.watch(&c, 1);
        drop(c);
        ka.sweep_at(100);
        assert!(ka.due.lock().unwrap().is_empty());
    }

    fn entries(ka: &KeepAlive) -> usize {
        ka.due.lock().unwrap().values().map(Vec::len).sum()
    }

    #[test]
    fn closed_connections_with_long_keep_alives_leave_nothing_behind() {
        let ka = KeepAlive::default();
        let controls: Vec<_> = (0..10_000).map(|_| Arc::new(ConnControl::default())).collect();
        for (i, c) in controls.iter().enumerate() {
            // Spread over several buckets, as connections arriving over time would be.
            ka.sweep_at(i as u32 / 100);
            ka.watch(c, u16::MAX);
        }
        assert_eq!(entries(&ka), 10_000);
        for c in &controls {
            ka.forget(c);
        }
        assert!(ka.due.lock().unwrap().is_empty());
        // Forgetting twice, or a connection never watched, is harmless.
        ka.forget(&controls[0]);
        ka.forget(&Arc::new(ConnControl::default()));
    }

    #[test]
    fn a_forgotten_connection_is_never_kicked_and_a_silent_one_still_is() {
        let ka = KeepAlive::default();
        let gone = Arc::new(ConnControl::default());
        let silent = Arc::new(ConnControl::default());
        ka.watch(&gone, 1);
        ka.watch(&silent, 1);
        ka.forget(&gone);
        assert_eq!(entries(&ka), 1);
        ka.sweep_at(100);
        assert_eq!(pending(&gone), 0);
        assert_eq!(pending(&silent), signal::KICK);
        assert!(ka.due.lock().unwrap().is_empty());
    }

    #[test]
    fn forget_finds_a_connection_filed_again_by_a_sweep() {
        let ka = KeepAlive::default();
        let c = Arc::new(ConnControl::default());
        ka.watch(&c, 1);
        c.seen(5);
        ka.sweep_at(7); // due at 7, seen at 5: filed again under 12
        assert_eq!(pending(&c), 0);
        assert_eq!(ka.due.lock().unwrap().keys().copied().collect::<Vec<_>>(), [12]);
        ka.forget(&c);
        assert!(ka.due.lock().unwrap().is_empty());
    }

    #[test]
    fn forgotten_while_a_sweep_holds_it_is_neither_kicked_nor_filed_again() {
        let ka = KeepAlive::default();
        let silent = Arc::new(ConnControl::default());
        let chatty = Arc::new(ConnControl::default());
        ka.watch(&silent, 1);
        ka.watch(&chatty, 1);
        chatty.seen(5);
        let ready = ka.take_ready(7);
        ka.forget(&silent);
        ka.forget(&chatty);
        for (due, bucket) in ready {
            ka.review(due, bucket, 7);
        }
        assert_eq!(pending(&silent), 0);
        assert!(ka.due.lock().unwrap().is_empty());
    }
}
