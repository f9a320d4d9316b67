//! Session expiry and delayed wills from one task: every disconnected persistent session's
//! expiry and every will waiting out its delay is a timer in one ordered map, and one task
//! sleeps until the earliest of them.
//!
//! Why not a task per session: a sleeping `tokio::spawn` costs its future, its task header
//! and a timer-wheel entry until it fires, an hour later for a session expiry of 3600 s,
//! however soon the session itself was discarded (and its weak reference kept the session's
//! 360-byte allocation too). Measured with tests/memory.rs, 10,000 persistent sessions
//! discarded: +15.9 MiB with a task each, +8.6 MiB with this. Here a timer costs one map
//! entry (a 24-byte key and a 32-byte timer, plus the tree's share), and timers of discarded
//! sessions are taken out by a background sweep within seconds, so memory follows the
//! sessions that are really away.
//!
//! Timers hold sessions weakly: a session discarded before its expiry (clean start, takeover)
//! is freed at once. A session timer fires only if the session is still away from the
//! connection whose departure scheduled it and has not ended, exactly as before; a will
//! fires unless its client is back on the same session (`Broker::publish_will`).
//!
//! Knows nothing of sockets or the store: firing calls back into the broker.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Broker, SessionHandle};
use crate::auth::Principal;
use crate::message::Message;

/// How often timers of sessions that can no longer expire are looked for (while any timer
/// is pending).
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Timers looked at per sweep: 8,192 a second, so 10,000 discarded sessions are forgotten
/// within ~1.5 s, and a sweep holds the map's lock for tens of microseconds.
const SWEEP_BATCH: usize = 2048;
/// Due timers fired between yields to the runtime, so that thousands of sessions expiring
/// at once (after a restart, say) do not hold a worker thread for long.
const FIRE_BATCH: usize = 256;

/// What a timer does when it is due.
pub(super) enum Timer {
    /// Ends the session if it is still away from the connection `connection_id` (0: since
    /// recovery) and has not ended.
    Session { handle: Weak<SessionHandle>, connection_id: u64 },
    /// Publishes `will` unless its client is back on the session, if `owner` may still
    /// publish there (None: recovered, allowed when its client connected).
    Will { handle: Weak<SessionHandle>, will: Arc<Message>, owner: Option<Arc<Principal>> },
}

/// Timers by deadline; a sequence number makes keys unique.
type Key = (Instant, u64);

#[derive(Default)]
pub(super) struct Expiry {
    state: Mutex<State>,
    /// Wakes the task when a timer earlier than all others is added.
    wake: Notify,
}

#[derive(Default)]
struct State {
    timers: BTreeMap<Key, Timer>,
    next_seq: u64,
    /// The last key the previous sweep looked at (None: start from the front).
    swept_to: Option<Key>,
    /// Whether the task has been started (on the first timer: a broker that never has one
    /// never runs it, and `Broker::new` needs no runtime).
    running: bool,
}

impl Expiry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The map is consistent after any panic in the few lines that hold the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a timer due `after` from now (never, if that is past the clock's range). Returns
    /// true when the caller must start the task (`run`), on the first timer.
    fn add(&self, after: Duration, timer: Timer) -> bool {
        let Some(at) = Instant::now().checked_add(after) else { return false };
        let mut s = self.lock();
        let key = (at, s.next_seq);
        s.next_seq += 1;
        let earliest = s.timers.first_key_value().is_none_or(|(first, _)| key < *first);
        s.timers.insert(key, timer);
        let start = !std::mem::replace(&mut s.running, true);
        drop(s);
        if earliest {
            // Stores a permit if the task is not waiting right now, so it cannot be missed.
            self.wake.notify_one();
        }
        start
    }

    /// Timers pending (due or not).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().timers.len()
    }

    /// When the task should look again: the earliest deadline, but no later than the next
    /// sweep. None when there is nothing to wait for.
    fn next_wake(&self, next_sweep: Instant) -> Option<Instant> {
        self.lock().timers.first_key_value().map(|((at, _), _)| (*at).min(next_sweep))
    }

    /// Takes out up to `max` timers due at `now`, earliest first.
    fn take_due(&self, now: Instant, max: usize) -> Vec<Timer> {
        let mut s = self.lock();
        let mut due = Vec::new();
        while due.len() < max {
            match s.timers.first_entry() {
                Some(e) if e.key().0 <= now => due.push(e.remove()),
                _ => break,
            }
        }
        due
    }

    /// Drops session timers that can no longer fire, looking at up to `SWEEP_BATCH` timers
    /// after where the last sweep stopped. A session timer can never fire once its session is
    /// freed, has ended, is connected again, or was left again by a later connection: each
    /// of these is final (connection ids are never reused and `ended` is never cleared), so
    /// dropping the timer changes nothing but memory.
    fn sweep(&self) {
        let mut live = Vec::new();
        {
            let mut s = self.lock();
            let from = s.swept_to.map_or(Bound::Unbounded, Bound::Excluded);
            let mut dead = Vec::new();
            let mut seen = 0;
            let mut last = None;
            for (key, timer) in s.timers.range((from, Bound::Unbounded)).take(SWEEP_BATCH) {
                seen += 1;
                last = Some(*key);
                if let Timer::Session { handle, connection_id } = timer {
                    if handle.strong_count() == 0 {
                        dead.push(*key);
                    } else {
                        live.push((*key, handle.clone(), *connection_id));
                    }
                }
            }
            // At the end of the map: start from the front next time.
            s.swept_to = if seen < SWEEP_BATCH { None } else { last };
            for key in dead {
                s.timers.remove(&key);
            }
        }
        // Sessions are locked without the map's lock held, so the map's lock is never taken
        // inside a session's or the other way round.
        let stale: Vec<Key> = live
            .into_iter()
            .filter(|(_, handle, connection_id)| handle.upgrade().is_none_or(|h| !still_away(&h, *connection_id)))
            .map(|(key, _, _)| key)
            .collect();
        if !stale.is_empty() {
            let mut s = self.lock();
            for key in stale {
                s.timers.remove(&key);
            }
        }
    }
}

/// Whether the session is still away from connection `connection_id` and not ended: only
/// then may that connection's departure expire it.
fn still_away(handle: &SessionHandle, connection_id: u64) -> bool {
    let cell = handle.lock();
    cell.owner == 0 && cell.last_owner == connection_id && !cell.ended
}

impl Broker {
    /// Adds a timer, starting the expiry task with the first one.
    pub(super) fn add_timer(self: &Arc<Self>, after: Duration, timer: Timer) {
        if self.expiry.add(after, timer) {
            tokio::spawn(run(Arc::clone(&self.expiry), Arc::downgrade(self)));
        }
    }

    fn fire(&self, timer: Timer) {
        match timer {
            Timer::Session { handle, connection_id } => {
                if let Some(handle) = handle.upgrade() {
                    if still_away(&handle, connection_id) {
                        self.end_session(&handle);
                        self.metrics.sessions_expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            Timer::Will { handle, will, owner } => {
                // A freed session was discarded (it ended): its client is not back on it.
                let resumed = handle.upgrade().is_some_and(|h| {
                    let cell = h.lock();
                    cell.owner != 0 && !cell.ended
                });
                if !resumed && owner.as_ref().is_none_or(|o| self.may_publish(o, &will.topic)) {
                    self.forward(&will, None);
                    self.publish(will, None);
                }
            }
        }
    }
}

/// The expiry task: fires due timers and sweeps, until the broker is gone. Holds the broker
/// only weakly while it sleeps, so it never keeps a dropped broker (and its store) alive.
async fn run(expiry: Arc<Expiry>, broker: Weak<Broker>) {
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        match expiry.next_wake(next_sweep) {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = expiry.wake.notified() => {}
                }
            }
            None => expiry.wake.notified().await,
        }
        let Some(broker) = broker.upgrade() else { return };
        loop {
            let due = expiry.take_due(Instant::now(), FIRE_BATCH);
            if due.is_empty() {
                break;
            }
            for timer in due {
                broker.fire(timer);
            }
            tokio::task::yield_now().await;
        }
        drop(broker);
        let now = Instant::now();
        if now >= next_sweep {
            expiry.sweep();
            next_sweep = now + SWEEP_EVERY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolVersion;
    use crate::session::QueueLimits;

    fn handle(owner: u64) -> Arc<SessionHandle> {
        let limits = QueueLimits { max_messages: 10, max_bytes: 1 << 20, budget: None };
        Arc::new(SessionHandle::new("c".into(), limits, owner, None, 60, ProtocolVersion::V5))
    }

    fn session_timer(h: &Arc<SessionHandle>, connection_id: u64) -> Timer {
        Timer::Session { handle: Arc::downgrade(h), connection_id }
    }

    #[test]
    fn due_timers_come_out_in_deadline_order_and_only_when_due() {
        let e = Expiry::default();
        let h = handle(0);
        assert!(e.add(Duration::from_secs(20), session_timer(&h, 2)), "first timer starts the task");
        assert!(!e.add(Duration::from_secs(10), session_timer(&h, 1)), "the task starts once");
        let now = Instant::now();
        assert!(e.take_due(now, 10).is_empty());
        let due = e.take_due(now + Duration::from_secs(15), 10);
        assert!(matches!(due.as_slice(), [Timer::Session { connection_id: 1, .. }]));
        let due = e.take_due(now + Duration::from_secs(30), 10);
        assert!(matches!(due.as_slice(), [Timer::Session { connection_id: 2, .. }]));
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn sweep_drops_timers_that_can_no_longer_fire_and_keeps_the_rest() {
        let e = Expiry::default();
        let away = handle(0);
        away.lock().last_owner = 7;
        e.add(Duration::from_secs(60), session_timer(&away, 7)); // still away: kept
        e.add(Duration::from_secs(60), session_timer(&away, 6)); // left again since: dropped
        let back = handle(9);
        back.lock().last_owner = 7;
        e.add(Duration::from_secs(60), session_timer(&back, 7)); // connected again: dropped
        let ended = handle(0);
        ended.lock().ended = true;
        e.add(Duration::from_secs(60), session_timer(&ended, 0)); // ended: dropped
        let freed = handle(0);
        e.add(Duration::from_secs(60), session_timer(&freed, 0));
        drop(freed); // discarded: dropped
        let will = Arc::new(Message::received(
            "t".into(),
            bytes::Bytes::new(),
            crate::protocol::QoS::AtMostOnce,
            false,
            Default::default(),
            "c".into(),
        ));
        e.add(Duration::from_secs(60), Timer::Will { handle: Weak::new(), will, owner: None }); // kept
        e.sweep();
        assert_eq!(e.len(), 2);
        assert!(e.lock().timers.values().any(|t| matches!(t, Timer::Session { connection_id: 7, .. })));
    }

    #[test]
    fn sweep_goes_round_in_batches() {
        let e = Expiry::default();
        let mut keep = Vec::new();
        for i in 0..(2 * SWEEP_BATCH + 10) {
            let h = handle(0);
            e.add(Duration::from_secs(60), session_timer(&h, 0));
            if i % 2 == 0 {
                keep.push(h);
            }
        }
        e.sweep();
        assert_eq!(e.len(), 2 * SWEEP_BATCH + 10 - SWEEP_BATCH / 2);
        e.sweep();
        e.sweep();
        assert_eq!(e.len(), keep.len());
        assert_eq!(e.lock().swept_to, None, "a short batch wraps round");
    }
}
