//! Keep-alive for every connection from one clock: a connection records the tick of its last
//! read in its `ConnControl`, and a sweep four times a second closes those silent for longer
//! than one and a half keep-alive periods [MQTT-3.1.2-24].
//!
//! Why not a timer per connection: a tokio `Sleep` is 112 bytes plus a timer-wheel entry
//! for every client with a keep-alive, that is nearly all of them; here a client costs 16
//! bytes in a bucket. The price is precision: a connection closes up to two ticks (0.5 s)
//! after its deadline, never before it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
        self.insert(now + allowance, Arc::downgrade(control), allowance);
    }

    fn insert(&self, due: u32, control: Weak<ConnControl>, allowance: u32) {
        let mut map = self.due.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(due).or_default().push((control, allowance));
    }

    /// Advances the clock and closes the connections past their deadline; the others are
    /// put back under their new deadline.
    pub fn sweep(&self) {
        let now = u32::try_from(self.started.elapsed().as_millis() / TICK.as_millis()).unwrap_or(u32::MAX);
        self.sweep_at(now);
    }

    fn sweep_at(&self, now: u32) {
        self.now.store(now, Ordering::Relaxed);
        let ready = {
            let mut map = self.due.lock().unwrap_or_else(|e| e.into_inner());
            let later = map.split_off(&now.saturating_add(1));
            std::mem::replace(&mut *map, later)
        };
        for (control, allowance) in ready.into_values().flatten() {
            let Some(c) = control.upgrade() else { continue }; // connection gone
            if c.closing() {
                continue;
            }
            let deadline = c.last_seen().saturating_add(allowance);
            if deadline <= now {
                c.kick(reason::KEEP_ALIVE_TIMEOUT);
            } else {
                self.insert(deadline, control, allowance);
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
}
