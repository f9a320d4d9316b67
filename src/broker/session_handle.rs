//! The shared handle of one session: its state behind a short-held lock, the wake-up of the
//! connection that serves it, and the control channel used to close that connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytestring::ByteString;

use crate::protocol::{ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::{Delivery, QueueLimits, Queued, SessionState};

/// The one thing a connection waits on besides its socket: signals from other tasks (new
/// deliveries, store progress, a kick) coalesced into a bit set, and the waker of the
/// connection's task. One small allocation per connection instead of a `Notify` per
/// signal source, whose pending futures an idle connection would carry.
#[derive(Debug, Default)]
pub struct ConnControl {
    pending: AtomicU8,
    reason: AtomicU8,
    /// Keep-alive clock tick of the connection's last read (see `keep_alive`).
    last_seen: AtomicU32,
    /// The keep-alive bucket this connection is filed under (its due tick), 0 when it is in
    /// none. Lets `KeepAlive::forget` go straight to that bucket when the connection closes,
    /// and tells a sweep that an entry it holds was forgotten meanwhile.
    pub(super) keep_alive_due: AtomicU32,
    waker: Mutex<Option<Waker>>,
}

/// Signals, as bits of `ConnControl::poll_signals`' result.
pub mod signal {
    /// The connection must close: see `ConnControl::reason`.
    pub const KICK: u8 = 1;
    /// Deliveries were queued to the session.
    pub const DELIVERY: u8 = 2;
    /// The store finished work this connection waits for.
    pub const DURABLE: u8 = 4;
    /// A subscriber this connection's publishes wait on has room again (or went away).
    pub const FLOW: u8 = 8;
}

impl ConnControl {
    /// Asks the connection to send DISCONNECT with `reason` (v5) and close.
    pub fn kick(&self, reason: u8) {
        self.reason.store(reason, Ordering::Relaxed);
        self.signal(signal::KICK);
    }

    pub fn reason(&self) -> u8 {
        self.reason.load(Ordering::Relaxed)
    }

    /// The connection has been told to close.
    pub fn closing(&self) -> bool {
        self.reason() != 0
    }

    /// Records a read at keep-alive tick `tick`.
    pub fn seen(&self, tick: u32) {
        self.last_seen.store(tick, Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> u32 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Raises `bits` and wakes the connection, unless they were already raised (then the
    /// wake-up that raised them is still to be seen by the connection).
    pub fn signal(&self, bits: u8) {
        let before = self.pending.fetch_or(bits, Ordering::AcqRel);
        if before & bits != bits {
            let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// The signals raised since the last call, or Pending with the task's waker stored.
    /// Checks again after storing it: a signal raised in between finds either the waker or
    /// its bit seen here, so none is lost.
    pub fn poll_signals(&self, cx: &mut Context<'_>) -> Poll<u8> {
        let bits = self.pending.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return Poll::Ready(bits);
        }
        {
            let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        match self.pending.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            bits => Poll::Ready(bits),
        }
    }
}

/// Connections waiting for store work, woken from the store's thread when it is done.
#[derive(Debug, Default)]
pub struct DurableWaiters {
    waiting: Mutex<Vec<(u64, Arc<ConnControl>)>>,
}

impl DurableWaiters {
    /// Signals `control` (DURABLE) once the store has processed `ticket`. The caller checks
    /// the ticket again after this call: it may have been processed just before.
    pub fn wait(&self, ticket: u64, control: &Arc<ConnControl>) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).push((ticket, Arc::clone(control)));
    }

    /// The store has processed everything up to `processed`.
    pub fn progress(&self, processed: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|(ticket, control)| {
            if *ticket <= processed {
                control.signal(signal::DURABLE);
                false
            } else {
                true
            }
        });
    }
}

/// Session data guarded by the handle's lock. Never held across an `.await`.
pub struct SessionCell {
    pub state: SessionState,
    /// Connection currently serving the session; 0 when the client is away.
    pub owner: u64,
    /// The connection that served it last, so timers armed at its close can tell whether the
    /// client came back in between.
    pub last_owner: u64,
    pub control: Option<Arc<ConnControl>>,
    /// Seconds; 0 = ends with the connection, `EXPIRY_NEVER` = never.
    pub expiry_interval: u32,
    pub protocol: ProtocolVersion,
    /// Full filter (with any `$share/group/` prefix) -> options and subscription id.
    pub subscriptions: HashMap<ByteString, (SubscriptionOptions, Option<u32>)>,
    /// The session was discarded; nothing may be queued to it any more.
    pub ended: bool,
    /// Something of this session is in the store (so ending it must delete it there).
    pub persisted: bool,
    /// Next key in the session's durable queue.
    pub next_store_seq: u64,
    /// Connections of publishers waiting for this session's full queue to have room.
    pub waiters: Vec<Arc<ConnControl>>,
    /// Messages taken from the queue so far: a waiting publisher tells a slow subscriber from
    /// a stalled one by whether this moves.
    pub progress: u64,
}

impl SessionCell {
    /// Persistent sessions keep their state in the store; clean ones never touch the disk.
    pub fn persistent(&self) -> bool {
        self.expiry_interval > 0 && !self.ended
    }

    /// Whether publishers may feed this session without waiting: its queue is below its
    /// bound, or nobody is reading it (offline queues drop at their bound instead).
    pub fn has_room(&self) -> bool {
        self.ended || self.owner == 0 || self.state.has_room()
    }

    /// Signals the connection serving the session, if any.
    pub fn signal(&self, bits: u8) {
        if let Some(c) = &self.control {
            c.signal(bits);
        }
    }

    /// Wakes the publishers waiting on this session if it has room now.
    pub fn wake_publishers(&mut self) {
        if !self.waiters.is_empty() && self.has_room() {
            for w in self.waiters.drain(..) {
                w.signal(signal::FLOW);
            }
        }
    }
}

/// What became of a delivery handed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    Queued,
    /// Queued, and the session's queue is now at its bound: the publisher should wait.
    Full,
    /// Not queued (counted): the session ended, its hard limit is reached, or it is QoS 0 for a
    /// client that is away.
    Dropped,
}

pub struct SessionHandle {
    pub client_id: ByteString,
    cell: Mutex<SessionCell>,
}

impl SessionHandle {
    pub fn new(
        client_id: ByteString,
        limits: QueueLimits,
        owner: u64,
        control: Option<Arc<ConnControl>>,
        expiry_interval: u32,
        protocol: ProtocolVersion,
    ) -> Self {
        SessionHandle {
            client_id,
            cell: Mutex::new(SessionCell {
                state: SessionState::new(limits),
                owner,
                last_owner: 0,
                control,
                expiry_interval,
                protocol,
                subscriptions: HashMap::new(),
                ended: false,
                persisted: false,
                next_store_seq: 1,
                waiters: Vec::new(),
                progress: 0,
            }),
        }
    }

    /// Locks the session. A panic while it was held cannot leave it half-updated in a way
    /// worse than losing that one operation, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, SessionCell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a delivery and wakes the connection. QoS 0 for a client that is away is not
    /// queued (as mosquitto does by default).
    pub fn deliver(&self, d: Delivery) -> Delivered {
        let mut cell = self.lock();
        if cell.ended || (cell.owner == 0 && d.qos == QoS::AtMostOnce) {
            return Delivered::Dropped;
        }
        let connected = cell.owner != 0;
        let queued = match cell.state.enqueue(d, connected) {
            Ok(q) => q,
            Err(_) => {
                if cell.state.dropped.is_power_of_two() {
                    tracing::warn!(client_id = %self.client_id, dropped = cell.state.dropped, "session queue full, message dropped");
                }
                return Delivered::Dropped;
            }
        };
        if let Some(c) = &cell.control {
            c.signal(signal::DELIVERY);
        }
        match queued {
            Queued::Full if connected => Delivered::Full,
            _ => Delivered::Queued,
        }
    }

    /// Registers `control` to be signalled (FLOW) when this session has room. Returns the
    /// session's progress count when it must wait, None when it has room already.
    pub fn wait_for_room(&self, control: &Arc<ConnControl>) -> Option<u64> {
        let mut cell = self.lock();
        if cell.has_room() {
            return None;
        }
        if !cell.waiters.iter().any(|w| Arc::ptr_eq(w, control)) {
            cell.waiters.push(Arc::clone(control));
        }
        Some(cell.progress)
    }

    /// Queues the retained messages of a SUBSCRIBE (see `SessionState::push_retained`).
    pub fn push_retained(&self, batch: super::RetainedBatch) {
        let mut cell = self.lock();
        if cell.ended {
            return;
        }
        cell.state.push_retained(batch.loaded, batch.stored, batch.subscription_id);
        cell.signal(signal::DELIVERY);
    }

    /// A copy was counted into the session's backlog in the store (`Queued` says whether
    /// the backlog is now at its bound): wakes the connection, which reads the backlog
    /// when its queue runs low.
    pub fn backlogged(&self, queued: Queued) -> Delivered {
        let cell = self.lock();
        cell.signal(signal::DELIVERY);
        match queued {
            Queued::Full if cell.owner != 0 => Delivered::Full,
            _ => Delivered::Queued,
        }
    }

    /// Retained messages read from the store for the session's cursor.
    pub fn retained_loaded(&self, read: Vec<(ByteString, Option<Arc<crate::message::Message>>)>) {
        let mut cell = self.lock();
        cell.state.retained_loaded(read);
        cell.signal(signal::DELIVERY);
    }

    /// Backlog messages read from the store, queued in memory now.
    pub fn backlog_loaded(&self, read: Vec<Delivery>, through: u64) {
        let mut cell = self.lock();
        if cell.ended {
            cell.state.load_failed();
            return;
        }
        cell.state.backlog_loaded(read, through);
        if cell.owner == 0 {
            // The client left while this was read: back to the store with it.
            cell.state.spill();
        }
        cell.signal(signal::DELIVERY);
    }
}
