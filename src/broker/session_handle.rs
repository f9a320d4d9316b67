//! The shared handle of one session: its state behind a short-held lock, the wake-up of the
//! connection that serves it, and the control channel used to close that connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

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
    /// This connection's place in the order input reached an idle broker (`input_order`),
    /// 0 when it has none.
    ticket: AtomicU32,
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
            self.wake_task();
        }
    }

    fn wake_task(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The connection's ticket in the order of input (`input_order`), 0 if none; it holds
    /// none afterwards. A ticket taken must be given back with `input_order::done`.
    pub fn take_ticket(&self) -> u32 {
        self.ticket.swap(0, Ordering::Relaxed)
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

/// The waker a connection hands its socket (used as `Waker::from(Arc<ConnControl>)`): the
/// socket's wake-ups take their place in the order of input, then wake the task like a
/// signal. It wakes the waker `poll_signals` stored, so the socket must be polled after
/// `poll_signals` in the same poll of the task.
impl Wake for ConnControl {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        super::input_order::woken(&self.ticket);
        self.wake_task();
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
    pub subscriptions: Subscriptions,
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

/// A session's subscriptions by full filter (with any `$share/group/` prefix): options and
/// subscription id. One pointer in every session, null without subscriptions; one
/// subscription (a device's) is held in a single small allocation, a few in a list scanned
/// by filter, more (`limits.max_subscriptions` allows 10,000) in a hash map. A hash map for
/// everyone cost an idle device 224 bytes, and keeping the filter as received pinned the
/// client's whole read buffer: filters are copied into their own allocation.
#[derive(Debug, Default)]
pub struct Subscriptions(Option<Box<SubscriptionSet>>);

type SubscriptionValue = (SubscriptionOptions, Option<u32>);

#[derive(Debug)]
enum SubscriptionSet {
    One(Box<str>, SubscriptionValue),
    Few(Vec<(Box<str>, SubscriptionValue)>),
    /// Boxed so that the other forms, the usual ones, take a 48-byte allocation, not 64.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<str>, SubscriptionValue>>),
}

/// Largest number of subscriptions kept in a list: a SUBSCRIBE checks whether each of its
/// filters is already held, and a scan of a few is as fast as hashing.
const FEW_SUBSCRIPTIONS: usize = 8;

impl Subscriptions {
    pub fn len(&self) -> usize {
        match self.0.as_deref() {
            None => 0,
            Some(SubscriptionSet::One(..)) => 1,
            Some(SubscriptionSet::Few(v)) => v.len(),
            Some(SubscriptionSet::Many(m)) => m.len(),
        }
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        match self.0.as_deref() {
            None => false,
            Some(SubscriptionSet::One(f, _)) => **f == *filter,
            Some(SubscriptionSet::Few(v)) => v.iter().any(|(f, _)| **f == *filter),
            Some(SubscriptionSet::Many(m)) => m.contains_key(filter),
        }
    }

    /// Adds or replaces the subscription to `filter`.
    pub fn insert(&mut self, filter: &str, options: SubscriptionOptions, id: Option<u32>) {
        let value = (options, id);
        let Some(set) = self.0.as_deref_mut() else {
            self.0 = Some(Box::new(SubscriptionSet::One(filter.into(), value)));
            return;
        };
        match set {
            SubscriptionSet::One(f, v) if **f == *filter => *v = value,
            SubscriptionSet::Few(list) => match list.iter().position(|(f, _)| **f == *filter) {
                Some(i) => list[i].1 = value,
                None if list.len() < FEW_SUBSCRIPTIONS => list.push((filter.into(), value)),
                None => {
                    let mut map: HashMap<_, _> = std::mem::take(list).into_iter().collect();
                    map.insert(filter.into(), value);
                    *set = SubscriptionSet::Many(Box::new(map));
                }
            },
            SubscriptionSet::Many(map) => {
                if let Some(v) = map.get_mut(filter) {
                    *v = value;
                } else {
                    map.insert(filter.into(), value);
                }
            }
            SubscriptionSet::One(..) => {
                if let SubscriptionSet::One(f, v) = std::mem::replace(set, SubscriptionSet::Few(Vec::new())) {
                    *set = SubscriptionSet::Few(vec![(f, v), (filter.into(), value)]);
                }
            }
        }
    }

    /// Removes the subscription to `filter`; true when there was one.
    pub fn remove(&mut self, filter: &str) -> bool {
        let Some(set) = self.0.as_deref_mut() else { return false };
        let (removed, left) = match set {
            SubscriptionSet::One(f, _) => (**f == *filter, 0),
            SubscriptionSet::Few(list) => {
                let at = list.iter().position(|(f, _)| **f == *filter);
                if let Some(i) = at {
                    list.swap_remove(i);
                }
                (at.is_some(), list.len())
            }
            SubscriptionSet::Many(map) => (map.remove(filter).is_some(), map.len()),
        };
        if removed && left == 0 {
            self.0 = None;
        }
        removed
    }

    /// Every subscription's filter.
    pub fn filters(&self) -> Vec<Box<str>> {
        match self.0.as_deref() {
            None => Vec::new(),
            Some(SubscriptionSet::One(f, _)) => vec![f.clone()],
            Some(SubscriptionSet::Few(list)) => list.iter().map(|(f, _)| f.clone()).collect(),
            Some(SubscriptionSet::Many(map)) => map.keys().cloned().collect(),
        }
    }

    /// Every subscription: filter, options, subscription id.
    pub fn entries(&self) -> Vec<(Box<str>, SubscriptionOptions, Option<u32>)> {
        let one = |(f, (o, id)): (&str, &SubscriptionValue)| (Box::from(f), *o, *id);
        match self.0.as_deref() {
            None => Vec::new(),
            Some(SubscriptionSet::One(f, v)) => vec![one((&**f, v))],
            Some(SubscriptionSet::Few(list)) => list.iter().map(|(f, v)| one((&**f, v))).collect(),
            Some(SubscriptionSet::Many(map)) => map.iter().map(|(f, v)| one((&**f, v))).collect(),
        }
    }

    /// Calls `f` with each subscription: filter, options, subscription id.
    pub fn for_each(&self, mut f: impl FnMut(&str, SubscriptionOptions, Option<u32>)) {
        match self.0.as_deref() {
            None => {}
            Some(SubscriptionSet::One(k, (o, id))) => f(k, *o, *id),
            Some(SubscriptionSet::Few(list)) => list.iter().for_each(|(k, (o, id))| f(k, *o, *id)),
            Some(SubscriptionSet::Many(map)) => map.iter().for_each(|(k, (o, id))| f(k, *o, *id)),
        }
    }

    /// Takes every subscription out, leaving none; returns their filters.
    pub fn take_filters(&mut self) -> Vec<Box<str>> {
        match self.0.take().map(|b| *b) {
            None => Vec::new(),
            Some(SubscriptionSet::One(f, _)) => vec![f],
            Some(SubscriptionSet::Few(list)) => list.into_iter().map(|(f, _)| f).collect(),
            Some(SubscriptionSet::Many(map)) => map.into_keys().collect(),
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
    Dropped(super::DropCause),
}

pub struct SessionHandle {
    pub client_id: ByteString,
    /// In a cluster, a persistent session whose QoS 1/2 messages come only from its own
    /// consumer of the messages stream (`ClusterSessions`), never from the local fan-out.
    pub clustered: bool,
    cell: Mutex<SessionCell>,
}

/// The subscription index finds a session's subscriptions by its client id.
impl crate::topics::Subscriber for Arc<SessionHandle> {
    #[inline]
    fn client(&self) -> &ByteString {
        &self.client_id
    }
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
            clustered: false,
            cell: Mutex::new(SessionCell {
                state: SessionState::new(limits),
                owner,
                last_owner: 0,
                control,
                expiry_interval,
                protocol,
                subscriptions: Subscriptions::default(),
                ended: false,
                persisted: false,
                next_store_seq: 1,
                waiters: Vec::new(),
                progress: 0,
            }),
        }
    }

    /// The same session, marked `clustered`.
    pub fn into_clustered(mut self) -> Self {
        self.clustered = true;
        self
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
            return Delivered::Dropped(super::DropCause::Offline);
        }
        let connected = cell.owner != 0;
        let queued = match self.enqueue(&mut cell, d, connected) {
            Ok(q) => q,
            Err(cause) => return Delivered::Dropped(cause),
        };
        cell.signal(signal::DELIVERY);
        match queued {
            Queued::Full if connected => Delivered::Full,
            _ => Delivered::Queued,
        }
    }

    /// `deliver` for QoS 0 copies of several messages (`Broker::publish_batch`), under one
    /// lock and with one wake-up; `dropped` hears the cause of each one not queued. Returns
    /// whether the queue of this (connected) session is full now: its publisher should wait.
    pub fn deliver_batch(&self, ds: impl Iterator<Item = Delivery>, mut dropped: impl FnMut(super::DropCause)) -> bool {
        let mut cell = self.lock();
        if cell.ended || cell.owner == 0 {
            ds.for_each(|_| dropped(super::DropCause::Offline));
            return false;
        }
        let (mut queued, mut full) = (false, false);
        for d in ds {
            match self.enqueue(&mut cell, d, true) {
                Ok(q) => {
                    queued = true;
                    full |= q == Queued::Full;
                }
                Err(cause) => dropped(cause),
            }
        }
        if queued {
            cell.signal(signal::DELIVERY);
        }
        full
    }

    fn enqueue(&self, cell: &mut SessionCell, d: Delivery, connected: bool) -> Result<Queued, super::DropCause> {
        cell.state.enqueue(d, connected).map_err(|why| {
            if cell.state.dropped.is_power_of_two() {
                tracing::warn!(client_id = %self.client_id, dropped = cell.state.dropped, "session queue full, message dropped");
            }
            why.into()
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, ..Default::default() }
    }

    fn form(s: &Subscriptions) -> &'static str {
        match s.0.as_deref() {
            None => "none",
            Some(SubscriptionSet::One(..)) => "one",
            Some(SubscriptionSet::Few(_)) => "few",
            Some(SubscriptionSet::Many(_)) => "many",
        }
    }

    #[test]
    fn one_subscription_then_a_list_then_a_map() {
        let mut s = Subscriptions::default();
        assert!(!s.remove("a"));
        s.insert("dev/1/cmd", opts(QoS::AtLeastOnce), None);
        s.insert("dev/1/cmd", opts(QoS::AtMostOnce), Some(3));
        assert_eq!((form(&s), s.len()), ("one", 1));
        assert!(s.contains_key("dev/1/cmd") && !s.contains_key("dev/1"));
        let filters: Vec<String> = (0..100).map(|i| format!("f/{i}")).collect();
        for (i, f) in filters.iter().enumerate() {
            s.insert(f, opts(QoS::AtMostOnce), None);
            let want = if i + 2 <= FEW_SUBSCRIPTIONS { "few" } else { "many" };
            assert_eq!((form(&s), s.len()), (want, i + 2), "{f}");
        }
        s.insert("f/7", opts(QoS::ExactlyOnce), None);
        assert_eq!(s.len(), 101);
        assert!(filters.iter().all(|f| s.contains_key(f)));
        assert!(s.remove("f/7") && !s.remove("f/7") && !s.contains_key("f/7"));
        let mut left = s.take_filters();
        left.sort();
        assert_eq!(left.len(), 100);
        assert!(left.iter().any(|f| &**f == "dev/1/cmd"));
        assert_eq!((form(&s), s.len()), ("none", 0));
    }

    #[test]
    fn removing_the_last_one_frees_the_set() {
        let mut s = Subscriptions::default();
        s.insert("a", opts(QoS::AtMostOnce), None);
        s.insert("b", opts(QoS::AtMostOnce), None);
        assert!(s.remove("a"));
        assert_eq!((form(&s), s.len()), ("few", 1));
        assert!(s.remove("b"));
        assert_eq!(form(&s), "none");
        s.insert("c", opts(QoS::AtMostOnce), None);
        assert!(s.remove("c"));
        assert_eq!(form(&s), "none");
        assert!(s.take_filters().is_empty());
    }

    /// Every session carries this: one pointer.
    #[test]
    fn an_empty_set_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Subscriptions>(), std::mem::size_of::<usize>());
        assert!(std::mem::size_of::<SubscriptionSet>() <= 48);
    }
}
