//! Per-client session state as a pure state machine: the queue of messages waiting to be
//! sent, the outbound QoS 1/2 in-flight window with packet ids, and the inbound QoS 2 packet
//! ids awaiting PUBREL.
//!
//! Owns MQTT delivery rules for one client. No I/O, no clock reads of its own beyond what the
//! caller passes, no knowledge of the broker, sockets or store.

mod backlog;
mod budget;
mod queue;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

use crate::message::Message;
use crate::protocol::QoS;

use backlog::{Backlog, Lazy, PendingRetained, RetainedCursor, RetainedItem, LOW_WATER};
pub use backlog::{Load, LOAD_BYTES, LOAD_CHUNK};
pub use budget::MemoryBudget;

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag as sent to this subscriber.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions (v5).
    pub subscription_ids: Vec<u32>,
    /// Key of this message in the session's durable queue (persistent sessions, QoS 1/2).
    pub store_seq: Option<u64>,
    /// The `$share/group/filter` it was delivered through, if any: an unacknowledged shared
    /// delivery may move to another member of the group.
    pub shared: Option<bytestring::ByteString>,
    /// Recovered after a crash without a record of having been sent: it may have been, so
    /// it goes out with DUP set.
    pub maybe_sent: bool,
    /// Priority level of its topic (`[[priority]]`): higher levels are sent first.
    pub priority: u8,
    /// In a cluster, the message's sequence in the messages stream when it came from the
    /// session's own consumer (0 otherwise): its packet id is derived from it, so that it goes
    /// out with the same id from whichever node serves the session (`track`).
    pub stream_seq: u64,
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// PUBLISH sent (or to be sent), waiting for PUBACK / PUBREC.
    AwaitingAck,
    /// PUBREC received, PUBREL sent, waiting for PUBCOMP.
    AwaitingComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub packet_id: u16,
    pub delivery: Delivery,
    pub state: OutState,
    /// Allocation number (`SessionState::allocs`) that gave the id; 0 for a restored entry.
    alloc: u64,
}

/// What the connection should send next.
#[derive(Debug)]
pub enum Outgoing {
    /// QoS 0: fire and forget.
    Unacked(Delivery),
    /// QoS 1/2 with its assigned packet id, now in flight.
    Tracked(u16, Delivery),
}

/// How an acknowledgement from the client matched the in-flight window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// It completed (or advanced) the flow of that packet id, whose message has this key in
    /// the durable queue.
    Done(Option<u64>),
    /// No message is in flight with that id (a late duplicate, or one from a lost session).
    Unknown,
    /// A message is in flight with that id, but this ack belongs to another QoS flow.
    WrongType,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The session's own bound (`limits.max_queued_messages`, `max_queued_bytes`).
    QueueFull,
    /// The broker's memory for queues is spent (twice `limits.max_queued_memory`).
    Memory,
}

/// A message that was queued, and whether the queue has reached its bound with it (then the
/// publishers feeding it should wait for room: see `SessionState::enqueue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Fits,
    Full,
}

#[derive(Debug, Clone)]
pub struct QueueLimits {
    pub max_messages: usize,
    /// 0 = unlimited.
    pub max_bytes: usize,
    /// The broker-wide budget the queue's memory counts against.
    pub budget: Option<Arc<MemoryBudget>>,
}

#[derive(Debug)]
pub struct SessionState {
    queue: queue::Queue,
    queued_bytes: usize,
    inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// Packet ids handed out so far (plus one): see `allocate_packet_id`.
    allocs: u64,
    /// Inbound QoS 2 ids awaiting PUBREL, sorted (a few at most: bounded by the Receive
    /// Maximum, or `limits.max_awaiting_pubrel` for 3.1.1).
    inbound_qos2: Vec<u16>,
    limits: QueueLimits,
    /// Backlog, retained cursor and budget reservation, when there are any.
    lazy: Option<Box<Lazy>>,
    /// Messages dropped since the session began (queue full, expired, too large).
    pub dropped: u64,
    /// Durable-queue keys of messages dropped without delivery (expired), for the caller to
    /// delete from the store.
    discarded: Vec<u64>,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        if let (Some(b), Some(l)) = (&self.limits.budget, self.lazy.as_mut()) {
            l.reservation.release(b);
        }
    }
}

impl SessionState {
    pub fn new(limits: QueueLimits) -> Self {
        SessionState {
            queue: queue::Queue::default(),
            queued_bytes: 0,
            inflight: VecDeque::new(),
            next_packet_id: 1,
            allocs: 1,
            inbound_qos2: Vec::new(),
            limits,
            lazy: None,
            dropped: 0,
            discarded: Vec::new(),
        }
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Queues a message within the session's limits.
    ///
    /// With `slack` (a connected client, whose publishers are slowed down when its queue is
    /// full) the bound is soft: the message is queued and `Full` tells the caller to stop
    /// feeding it; what publishers send before they notice is bounded by their read buffers,
    /// and a hard limit of twice the bound catches the rest. Without `slack` (a client that is
    /// away: nobody reads the queue, so waiting would not help) the bound is hard.
    /// The broker-wide memory budget works the same way (soft at the budget, hard at twice).
    pub fn enqueue(&mut self, d: Delivery, slack: bool) -> Result<Queued, Dropped> {
        let size = d.msg.held_bytes();
        self.admit(size, slack)?;
        self.queued_bytes += size;
        self.queue.push_back(d);
        self.held_changed();
        Ok(if self.has_room() { Queued::Fits } else { Queued::Full })
    }

    /// Whether one more message of `size` bytes fits under the hard bounds; counts it dropped
    /// when not.
    fn admit(&mut self, size: usize, slack: bool) -> Result<(), Dropped> {
        let factor = if slack { 2 } else { 1 };
        let (count, bytes) = self.waiting();
        let over_bytes = self.limits.max_bytes != 0 && bytes + size > self.limits.max_bytes.saturating_mul(factor);
        // The budget bounds the big queues: one that stays small (its client reads) never
        // loses a message to memory that others hold.
        let over_memory =
            self.queued_bytes + size > budget::FREE && self.limits.budget.as_ref().is_some_and(|b| b.exhausted());
        if count >= self.limits.max_messages.saturating_mul(factor) || over_bytes {
            self.dropped += 1;
            return Err(Dropped::QueueFull);
        }
        if over_memory {
            self.dropped += 1;
            return Err(Dropped::Memory);
        }
        Ok(())
    }

    /// Messages and bytes waiting, in memory and in the backlog.
    pub fn waiting(&self) -> (usize, usize) {
        let (c, b) = self.lazy.as_ref().and_then(|l| l.backlog.as_ref()).map_or((0, 0), |b| (b.count, b.bytes));
        (self.queue.len() + c, self.queued_bytes + b)
    }

    /// Whether the queue is below its bound in messages and bytes, and, if it holds more
    /// than its free part, the broker below its memory budget.
    pub fn has_room(&self) -> bool {
        let (count, bytes) = self.waiting();
        count < self.limits.max_messages
            && (self.limits.max_bytes == 0 || bytes < self.limits.max_bytes)
            && !(self.queued_bytes > budget::FREE && self.limits.budget.as_ref().is_some_and(|b| b.full()))
    }

    /// After every push and pop. Inline for the usual case: a queue under its free part with
    /// nothing boxed has nothing to count against the budget and nothing to tidy.
    #[inline]
    fn held_changed(&mut self) {
        if self.lazy.is_some() || self.queued_bytes > budget::FREE {
            self.held_changed_slow();
        }
    }

    fn held_changed_slow(&mut self) {
        if let Some(b) = &self.limits.budget {
            if self.queued_bytes > budget::FREE || self.lazy.as_ref().is_some_and(|l| !l.reservation.is_zero()) {
                let l = self.lazy.get_or_insert_with(Default::default);
                l.reservation.track(b, self.queued_bytes);
            }
        }
        self.tidy();
    }

    /// Drops the boxed parts once they hold nothing.
    fn tidy(&mut self) {
        if self.lazy.as_ref().is_some_and(|l| l.idle()) {
            self.lazy = None;
        }
    }

    /// Queues without the limits: messages already counted (recovered from the store).
    pub fn enqueue_unbounded(&mut self, d: Delivery) {
        self.queued_bytes += d.msg.held_bytes();
        self.queue.push_back(d);
        self.held_changed();
    }

    /// Whether new QoS 1/2 messages of this (persistent) session go to its backlog in the
    /// store rather than to the queue in memory.
    pub fn backlogged(&self) -> bool {
        self.lazy.as_ref().is_some_and(|l| l.backlog.is_some())
    }

    /// Counts a message the caller has written to the store (key `seq`) into the backlog,
    /// within the session's limits (see `enqueue` for `slack`).
    pub fn backlog_push(&mut self, seq: u64, size: usize, slack: bool) -> Result<Queued, Dropped> {
        self.admit(size, slack)?;
        let lazy = self.lazy.get_or_insert_with(Default::default);
        let b = lazy.backlog.get_or_insert(Backlog { count: 0, bytes: 0, next: seq, last: seq, recovered_through: 0 });
        b.count += 1;
        b.bytes += size;
        b.next = b.next.min(seq);
        b.last = b.last.max(seq);
        Ok(if self.has_room() { Queued::Fits } else { Queued::Full })
    }

    /// The client is away: the queued messages that are in the store leave memory for the
    /// backlog (they are read back when the client returns). Returns how many.
    pub fn spill(&mut self) -> usize {
        let stored = self.queue.take_if(|d| d.store_seq.is_some());
        let mut moved = 0;
        for d in stored {
            let size = d.msg.held_bytes();
            self.queued_bytes = self.queued_bytes.saturating_sub(size);
            let Some(seq) = d.store_seq else { continue };
            let b = self.lazy.get_or_insert_with(Default::default).backlog.get_or_insert(Backlog {
                count: 0,
                bytes: 0,
                next: seq,
                last: seq,
                recovered_through: 0,
            });
            b.count += 1;
            b.bytes += size;
            b.next = b.next.min(seq);
            b.last = b.last.max(seq);
            moved += 1;
        }
        if let Some(l) = self.lazy.as_mut() {
            l.retained.ahead = l.retained.ahead.min(self.queue.len());
        }
        self.held_changed();
        moved
    }

    /// Starts with a backlog found in the store (recovery): `count` messages of `bytes`
    /// with keys from `first` to `last`.
    pub fn restore_backlog(&mut self, count: usize, bytes: usize, first: u64, last: u64) {
        if count > 0 {
            self.lazy.get_or_insert_with(Default::default).backlog =
                Some(Backlog { count, bytes, next: first, last, recovered_through: last });
        }
    }

    /// Queues retained messages for a SUBSCRIBE, behind what is queued now. They are not
    /// held as deliveries (a few bytes each until sent), and are not bounded by the queue's
    /// limits: they are bounded by the retained store, and are read into the queue only as
    /// it drains.
    pub fn push_retained(&mut self, loaded: Vec<(Arc<Message>, QoS)>, stored: Vec<(ByteString, QoS)>, id: Option<u32>) {
        let queued = self.queue.len();
        let r = &mut self.lazy.get_or_insert_with(Default::default).retained;
        if r.pending.is_empty() {
            r.ahead = queued;
        }
        let p = &mut r.pending;
        p.extend(loaded.into_iter().map(|(m, qos)| PendingRetained {
            item: RetainedItem::Loaded(m),
            qos,
            subscription_id: id,
        }));
        p.extend(stored.into_iter().map(|(t, qos)| PendingRetained {
            item: RetainedItem::Stored(t),
            qos,
            subscription_id: id,
        }));
    }

    /// A read the caller should make now, if any: the retained messages next in line that
    /// are only in the store, or the next chunk of the backlog once the queue runs low. One
    /// at a time; its result goes to `retained_loaded` / `backlog_loaded` (or `load_failed`).
    pub fn wants_load(&mut self) -> Option<Load> {
        let (queued, bytes) = (self.queue.len(), self.queued_bytes);
        let l = self.lazy.as_mut()?;
        if l.loading {
            return None;
        }
        let r = &l.retained;
        let load = if r.ahead == 0
            && matches!(r.pending.front(), Some(PendingRetained { item: RetainedItem::Stored(_), .. }))
        {
            let topics = r
                .pending
                .iter()
                .take(LOAD_CHUNK)
                .map_while(|p| match &p.item {
                    RetainedItem::Stored(t) => Some(t.clone()),
                    RetainedItem::Loaded(_) => None,
                })
                .collect();
            Load::Retained(topics)
        } else {
            let b = l.backlog.as_ref()?;
            if queued > LOW_WATER || bytes > LOAD_BYTES {
                return None;
            }
            Load::Backlog {
                from: b.next,
                to: b.last,
                max: LOAD_CHUNK,
                max_bytes: LOAD_BYTES,
                recovered_through: b.recovered_through,
            }
        };
        l.loading = true;
        Some(load)
    }

    /// A `Load` could not be made: it may be asked for again.
    pub fn load_failed(&mut self) {
        if let Some(l) = self.lazy.as_mut() {
            l.loading = false;
        }
        self.tidy();
    }

    /// The result of `Load::Retained`: each topic's message, None when it is retained no
    /// more. Ignored if the cursor changed meanwhile (the session was discarded).
    pub fn retained_loaded(&mut self, read: Vec<(ByteString, Option<Arc<Message>>)>) {
        if let Some(l) = self.lazy.as_mut() {
            l.loading = false;
            let p = &mut l.retained.pending;
            let same = read.len() <= p.len()
                && read.iter().zip(p.iter()).all(|((t, _), q)| matches!(&q.item, RetainedItem::Stored(s) if s == t));
            if same {
                let mut gone = Vec::new();
                for (i, (_, m)) in read.into_iter().enumerate() {
                    match m {
                        Some(m) => {
                            if let Some(q) = p.get_mut(i) {
                                q.item = RetainedItem::Loaded(m);
                            }
                        }
                        None => gone.push(i),
                    }
                }
                for i in gone.into_iter().rev() {
                    p.remove(i);
                }
            }
        }
        self.tidy();
    }

    /// The result of `Load::Backlog`: the messages read (with their store keys, in key
    /// order), and the key up to which the store was read (`to` of the load when nothing
    /// stopped the read early). Messages in flight (restored after a restart) are skipped.
    pub fn backlog_loaded(&mut self, read: Vec<Delivery>, through: u64) {
        let mut taken = Vec::new();
        if let Some(l) = self.lazy.as_mut() {
            l.loading = false;
            if let Some(b) = l.backlog.as_mut() {
                for d in read {
                    let Some(seq) = d.store_seq else { continue };
                    if seq < b.next || self.inflight.iter().any(|f| f.delivery.store_seq == Some(seq)) {
                        continue;
                    }
                    b.count = b.count.saturating_sub(1);
                    b.bytes = b.bytes.saturating_sub(d.msg.held_bytes());
                    taken.push(d);
                }
                b.next = b.next.max(through.saturating_add(1));
                if b.next > b.last {
                    // Read to the end: whatever the counts say, nothing is left in the store.
                    l.backlog = None;
                }
            }
        }
        for d in taken {
            self.enqueue_unbounded(d);
        }
        self.tidy();
    }

    /// Takes the next message to send if the in-flight window allows. Expired messages are
    /// skipped and counted. QoS 0 behind a blocked QoS 1/2 message waits, keeping order.
    pub fn next_outgoing(&mut self, window: usize, now: Instant) -> Option<Outgoing> {
        loop {
            if self.lazy.as_ref().is_some_and(|l| l.retained.ahead == 0 && !l.retained.pending.is_empty()) {
                let d = self.next_retained(window, now);
                self.tidy();
                let d = d?;
                if d.qos == QoS::AtMostOnce {
                    return Some(Outgoing::Unacked(d));
                }
                return self.track(d);
            }
            let front = self.queue.front()?;
            if front.msg.is_expired(now) {
                if let Some(seq) = self.pop_front().and_then(|d| d.store_seq) {
                    self.discarded.push(seq);
                }
                self.dropped += 1;
                continue;
            }
            if front.qos == QoS::AtMostOnce {
                return self.pop_front().map(Outgoing::Unacked);
            }
            if self.inflight.len() >= window {
                return None;
            }
            let d = self.pop_front()?;
            return self.track(d);
        }
    }

    /// The next retained message of the cursor as a delivery, if it can go now: it is in
    /// memory (else the caller reads it: `wants_load`) and, at QoS 1/2, the window has room.
    fn next_retained(&mut self, window: usize, now: Instant) -> Option<Delivery> {
        let inflight = self.inflight.len();
        let cursor = &mut self.lazy.as_mut()?.retained;
        loop {
            let front = cursor.pending.front()?;
            let RetainedItem::Loaded(m) = &front.item else { return None };
            if m.is_expired(now) {
                cursor.pending.pop_front();
                continue;
            }
            let qos = m.qos.min(front.qos);
            if qos != QoS::AtMostOnce && inflight >= window {
                return None;
            }
            let p = cursor.pending.pop_front()?;
            let RetainedItem::Loaded(msg) = p.item else { return None };
            return Some(Delivery {
                msg,
                qos,
                // Sent because of a new subscription: flagged retained [MQTT-3.3.1-8].
                retain: true,
                subscription_ids: p.subscription_id.into_iter().collect(),
                store_seq: None,
                shared: None,
                maybe_sent: false,
                priority: 0,
                stream_seq: 0,
            });
        }
    }

    /// Puts a QoS 1/2 delivery in flight with a new packet id.
    fn track(&mut self, d: Delivery) -> Option<Outgoing> {
        if d.stream_seq != 0 {
            let pid = self.preset_packet_id(d.stream_seq)?;
            // Outside the ring order: `alloc` 0 makes the next ring allocation search.
            self.inflight.push_back(Inflight {
                packet_id: pid,
                delivery: d.clone(),
                state: OutState::AwaitingAck,
                alloc: 0,
            });
            return Some(Outgoing::Tracked(pid, d));
        }
        let pid = self.allocate_packet_id()?;
        let alloc = self.allocs;
        self.allocs += 1;
        self.inflight.push_back(Inflight { packet_id: pid, delivery: d.clone(), state: OutState::AwaitingAck, alloc });
        Some(Outgoing::Tracked(pid, d))
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(d.msg.held_bytes());
        if let Some(l) = self.lazy.as_mut() {
            l.retained.ahead = l.retained.ahead.saturating_sub(1);
        }
        self.held_changed();
        Some(d)
    }

    /// Next free packet id, skipping ids still in flight. None only if all 65,535 are in use,
    /// which the window (at most 65,535) prevents.
    fn allocate_packet_id(&mut self) -> Option<u16> {
        // Ids are handed out in ring order and the in-flight list is in allocation order. While
        // the oldest entry in flight got its id fewer than a lap of allocations ago, every id
        // in flight was handed out after it, and the next id in the ring cannot be one of them
        // (the first clash would need a full lap since its holder). Otherwise (a message
        // stuck for a lap, or entries restored from the store) search.
        let clear = match self.inflight.front() {
            None => true,
            Some(f) => f.alloc != 0 && self.allocs - f.alloc < u64::from(u16::MAX) - 1,
        };
        if clear {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            return Some(id);
        }
        for _ in 0..=u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return Some(id);
            }
        }
        None
    }

    /// The packet id of the stream message `seq`: `seq % 65535 + 1`, or the next id after
    /// it that is not in flight. The same message gets the same id on every node (unless
    /// that id was taken, which a window far below 65,535 makes rare).
    fn preset_packet_id(&self, seq: u64) -> Option<u16> {
        let first = (seq % u64::from(u16::MAX)) as u16 + 1;
        let mut id = first;
        loop {
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return Some(id);
            }
            id = if id == u16::MAX { 1 } else { id + 1 };
            if id == first {
                return None;
            }
        }
    }

    /// The stream sequence of the message in flight with `pid` (0: none, or not from a
    /// cluster consumer).
    pub fn stream_seq_of(&self, pid: u16) -> u64 {
        self.find(pid).map_or(0, |i| self.inflight[i].delivery.stream_seq)
    }

    fn find(&self, pid: u16) -> Option<usize> {
        // Acks nearly always arrive in order, so the search ends at the front.
        self.inflight.iter().position(|f| f.packet_id == pid)
    }

    /// PUBACK ends a QoS 1 delivery.
    pub fn puback(&mut self, pid: u16) -> Ack {
        let Some(i) = self.find(pid) else { return Ack::Unknown };
        let f = &self.inflight[i];
        if f.delivery.qos == QoS::AtLeastOnce && f.state == OutState::AwaitingAck {
            Ack::Done(self.inflight.remove(i).and_then(|f| f.delivery.store_seq))
        } else {
            Ack::WrongType
        }
    }

    /// PUBREC for a QoS 2 message; the caller answers with PUBREL. A repeated PUBREC is
    /// answered again. `success` is false for a v5 PUBREC with an error reason: the message
    /// is then done.
    pub fn pubrec(&mut self, pid: u16, success: bool) -> Ack {
        let Some(i) = self.find(pid) else { return Ack::Unknown };
        if self.inflight[i].delivery.qos != QoS::ExactlyOnce {
            return Ack::WrongType;
        }
        if success {
            self.inflight[i].state = OutState::AwaitingComp;
            Ack::Done(self.inflight[i].delivery.store_seq)
        } else {
            Ack::Done(self.inflight.remove(i).and_then(|f| f.delivery.store_seq))
        }
    }

    /// PUBCOMP ends a QoS 2 delivery.
    pub fn pubcomp(&mut self, pid: u16) -> Ack {
        let Some(i) = self.find(pid) else { return Ack::Unknown };
        if self.inflight[i].state == OutState::AwaitingComp {
            Ack::Done(self.inflight.remove(i).and_then(|f| f.delivery.store_seq))
        } else {
            Ack::WrongType
        }
    }

    /// Forgets an in-flight message without an acknowledgement (it could not be sent);
    /// returns its durable-queue key.
    pub fn discard(&mut self, pid: u16) -> Option<u64> {
        let i = self.find(pid)?;
        self.inflight.remove(i).and_then(|f| f.delivery.store_seq)
    }

    /// Durable-queue keys of messages dropped since the last call.
    pub fn take_discarded(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.discarded)
    }

    /// Puts back a message that was in flight when the broker stopped, with its packet id.
    pub fn restore_inflight(&mut self, packet_id: u16, delivery: Delivery, state: OutState) {
        self.inflight.push_back(Inflight { packet_id, delivery, state, alloc: 0 });
        self.next_packet_id = if packet_id == u16::MAX { 1 } else { packet_id + 1 };
    }

    /// In-flight messages in the order they were first sent, to resend on reconnect
    /// (PUBLISH with DUP, or PUBREL).
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }

    /// Takes out the shared-subscription deliveries not yet acknowledged at all (queued, or
    /// sent without PUBACK/PUBREC), to hand them to another member of their group.
    /// Only those whose share passes `movable` are taken.
    pub fn take_shared(&mut self, movable: impl Fn(&str) -> bool) -> Vec<Delivery> {
        let can = |d: &Delivery| d.shared.as_deref().is_some_and(&movable);
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.inflight.len());
        for f in self.inflight.drain(..) {
            if can(&f.delivery) && f.state == OutState::AwaitingAck {
                out.push(f.delivery);
            } else {
                keep.push_back(f);
            }
        }
        self.inflight = keep;
        let taken = self.queue.take_if(can);
        for d in &taken {
            self.queued_bytes = self.queued_bytes.saturating_sub(d.msg.held_bytes());
        }
        if let Some(l) = self.lazy.as_mut() {
            l.retained.ahead = l.retained.ahead.min(self.queue.len());
        }
        self.held_changed();
        out.extend(taken);
        out
    }

    /// The shares of the shared-subscription deliveries this session holds.
    pub fn shared_keys(&self) -> std::collections::HashSet<bytestring::ByteString> {
        self.inflight.iter().map(|f| &f.delivery).chain(self.queue.iter()).filter_map(|d| d.shared.clone()).collect()
    }

    /// Takes every in-flight and queued message out, e.g. to give a departing shared
    /// subscriber's messages to another member.
    pub fn drain_all(&mut self) -> Vec<Delivery> {
        let mut out: Vec<Delivery> = self.inflight.drain(..).map(|f| f.delivery).collect();
        out.extend(self.queue.drain());
        self.queued_bytes = 0;
        if let Some(l) = self.lazy.as_mut() {
            l.backlog = None;
            l.retained = RetainedCursor::default();
            l.loading = false;
        }
        self.held_changed();
        out
    }

    /// Inbound QoS 2: records the packet id; false if it was already recorded (a duplicate
    /// that must not be delivered again).
    pub fn inbound_qos2_begin(&mut self, pid: u16) -> bool {
        match self.inbound_qos2.binary_search(&pid) {
            Ok(_) => false,
            Err(i) => {
                self.inbound_qos2.insert(i, pid);
                true
            }
        }
    }

    /// Inbound QoS 2 PUBREL: forgets the id; false if it was unknown.
    pub fn inbound_qos2_release(&mut self, pid: u16) -> bool {
        match self.inbound_qos2.binary_search(&pid) {
            Ok(i) => {
                self.inbound_qos2.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub fn inbound_qos2_len(&self) -> usize {
        self.inbound_qos2.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn d(qos: QoS, payload: &'static str) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from_static(payload.as_bytes()),
                qos,
                retain: false,
                origin: "p".into(),
                received_at: Instant::now(),
                expiry_interval: None,
                props_v5: Bytes::new(),
            }),
            qos,
            retain: false,
            subscription_ids: vec![],
            store_seq: None,
            shared: None,
            maybe_sent: false,
            stream_seq: 0,
            priority: 0,
        }
    }

    fn limits() -> QueueLimits {
        QueueLimits { max_messages: 3, max_bytes: 0, budget: None }
    }

    #[test]
    fn window_limits_inflight_and_keeps_order() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0, budget: None });
        s.enqueue(d(QoS::AtLeastOnce, "1"), false).unwrap();
        s.enqueue(d(QoS::AtLeastOnce, "2"), false).unwrap();
        s.enqueue(d(QoS::AtMostOnce, "3"), false).unwrap();
        let now = Instant::now();
        let Some(Outgoing::Tracked(p1, _)) = s.next_outgoing(1, now) else { panic!() };
        assert!(s.next_outgoing(1, now).is_none(), "window of 1 is full; QoS 0 waits behind message 2");
        assert_eq!(s.puback(p1), Ack::Done(None));
        assert_eq!(s.puback(p1), Ack::Unknown, "second PUBACK for the same id is unknown");
        let Some(Outgoing::Tracked(p2, m)) = s.next_outgoing(1, now) else { panic!() };
        assert_ne!(p1, p2);
        assert_eq!(&m.msg.payload[..], b"2");
        let Some(Outgoing::Unacked(m)) = s.next_outgoing(1, now) else { panic!() };
        assert_eq!(&m.msg.payload[..], b"3");
    }

    #[test]
    fn qos2_outbound_states() {
        let mut s = SessionState::new(limits());
        s.enqueue(d(QoS::ExactlyOnce, "x"), false).unwrap();
        let Some(Outgoing::Tracked(p, _)) = s.next_outgoing(10, Instant::now()) else { panic!() };
        assert_eq!(s.puback(p), Ack::WrongType, "PUBACK does not complete QoS 2");
        assert_eq!(s.pubcomp(p), Ack::WrongType, "PUBCOMP before PUBREC");
        assert_eq!(s.pubrec(p, true), Ack::Done(None));
        assert_eq!(s.inflight().next().map(|f| f.state), Some(OutState::AwaitingComp));
        assert_eq!(s.puback(p), Ack::WrongType, "PUBACK after PUBREC");
        assert_eq!(s.pubcomp(p), Ack::Done(None));
        assert_eq!(s.inflight_len(), 0);
    }

    #[test]
    fn queue_limit_drops_and_counts() {
        let mut s = SessionState::new(limits());
        for _ in 0..3 {
            s.enqueue(d(QoS::AtLeastOnce, "x"), false).unwrap();
        }
        assert_eq!(s.enqueue(d(QoS::AtLeastOnce, "x"), false), Err(Dropped::QueueFull));
        assert_eq!(s.dropped, 1);
        // Bytes held: payload, topic and ~128 bytes of bookkeeping (132 for "abc" on "t").
        let mut b = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 200, budget: None });
        b.enqueue(d(QoS::AtLeastOnce, "abc"), false).unwrap();
        assert!(b.enqueue(d(QoS::AtLeastOnce, "abc"), false).is_err());
    }

    #[test]
    fn higher_priority_first_fifo_within_a_level() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0, budget: None });
        for (level, p) in [(0, "n1"), (7, "h1"), (3, "m1"), (7, "h2"), (0, "n2"), (3, "m2")] {
            let mut x = d(QoS::AtMostOnce, p);
            x.priority = level;
            s.enqueue(x, true).unwrap();
        }
        let now = Instant::now();
        let mut order = Vec::new();
        while let Some(Outgoing::Unacked(x)) = s.next_outgoing(10, now) {
            order.push(String::from_utf8(x.msg.payload.to_vec()).unwrap());
        }
        assert_eq!(order, ["h1", "h2", "m1", "m2", "n1", "n2"]);
        assert!(s.has_room() && s.drain_all().is_empty());
    }

    #[test]
    fn connected_queue_says_full_at_its_bound_and_drops_only_at_twice_it() {
        let mut s = SessionState::new(limits()); // 3 messages
        assert_eq!(s.enqueue(d(QoS::AtLeastOnce, "1"), true), Ok(Queued::Fits));
        assert_eq!(s.enqueue(d(QoS::AtLeastOnce, "2"), true), Ok(Queued::Fits));
        assert_eq!(s.enqueue(d(QoS::AtLeastOnce, "3"), true), Ok(Queued::Full));
        assert!(!s.has_room());
        for i in ["4", "5", "6"] {
            assert_eq!(s.enqueue(d(QoS::AtMostOnce, i), true), Ok(Queued::Full), "{i}");
        }
        assert_eq!(s.enqueue(d(QoS::AtMostOnce, "7"), true), Err(Dropped::QueueFull));
        let now = Instant::now();
        for _ in 0..4 {
            s.next_outgoing(10, now).unwrap();
        }
        assert!(s.has_room());
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0, budget: None });
        s.next_packet_id = u16::MAX;
        s.enqueue(d(QoS::AtLeastOnce, "a"), false).unwrap();
        s.enqueue(d(QoS::AtLeastOnce, "b"), false).unwrap();
        let now = Instant::now();
        let Some(Outgoing::Tracked(a, _)) = s.next_outgoing(10, now) else { panic!() };
        let Some(Outgoing::Tracked(b, _)) = s.next_outgoing(10, now) else { panic!() };
        assert_eq!((a, b), (u16::MAX, 1));
    }

    #[test]
    fn an_id_held_for_a_whole_lap_is_skipped() {
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0, budget: None });
        let now = Instant::now();
        s.enqueue(d(QoS::AtLeastOnce, "stuck"), false).unwrap();
        let Some(Outgoing::Tracked(stuck, _)) = s.next_outgoing(2, now) else { panic!() };
        assert_eq!(stuck, 1);
        // A lap of messages acknowledged while id 1 stays in flight.
        for _ in 0..u16::MAX - 1 {
            s.enqueue(d(QoS::AtLeastOnce, "x"), false).unwrap();
            let Some(Outgoing::Tracked(pid, _)) = s.next_outgoing(2, now) else { panic!() };
            assert_ne!(pid, stuck);
            assert!(matches!(s.puback(pid), Ack::Done(_)));
        }
        s.enqueue(d(QoS::AtLeastOnce, "y"), false).unwrap();
        let Some(Outgoing::Tracked(pid, _)) = s.next_outgoing(2, now) else { panic!() };
        assert_eq!(pid, 2, "id 1 is still in flight");
    }

    #[test]
    fn restored_ids_are_not_reused() {
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0, budget: None });
        let now = Instant::now();
        s.restore_inflight(9, d(QoS::AtLeastOnce, "a"), OutState::AwaitingAck);
        s.restore_inflight(3, d(QoS::AtLeastOnce, "b"), OutState::AwaitingAck);
        s.restore_inflight(4, d(QoS::AtLeastOnce, "c"), OutState::AwaitingAck);
        // Next in the ring after the last restored id is 5; then 6, 7, 8, and 9 is taken.
        let mut got = Vec::new();
        for _ in 0..5 {
            s.enqueue(d(QoS::AtLeastOnce, "x"), false).unwrap();
            let Some(Outgoing::Tracked(pid, _)) = s.next_outgoing(100, now) else { panic!() };
            got.push(pid);
        }
        assert_eq!(got, vec![5, 6, 7, 8, 10]);
    }

    #[test]
    fn inbound_qos2_dedup() {
        let mut s = SessionState::new(limits());
        assert!(s.inbound_qos2_begin(7));
        assert!(!s.inbound_qos2_begin(7));
        assert!(s.inbound_qos2_release(7));
        assert!(!s.inbound_qos2_release(7));
    }

    fn stored(seq: u64, payload: &'static str) -> Delivery {
        let mut x = d(QoS::AtLeastOnce, payload);
        x.store_seq = Some(seq);
        x
    }

    fn drain_payloads(s: &mut SessionState) -> Vec<String> {
        let now = Instant::now();
        let mut out = Vec::new();
        while let Some(o) = s.next_outgoing(1000, now) {
            let (Outgoing::Unacked(x) | Outgoing::Tracked(_, x)) = o;
            out.push(String::from_utf8(x.msg.payload.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn spilled_queue_is_read_back_in_order_and_new_messages_wait_behind_it() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0, budget: None });
        s.enqueue(stored(1, "a"), true).unwrap();
        s.enqueue(d(QoS::AtMostOnce, "q0"), true).unwrap();
        s.enqueue(stored(2, "b"), true).unwrap();
        assert_eq!(s.spill(), 2);
        assert!(s.backlogged());
        // Away: new copies are counted into the backlog only.
        assert_eq!(s.backlog_push(3, 100, false), Ok(Queued::Fits));
        assert_eq!(s.waiting().0, 4, "three in the backlog, the QoS 0 one in memory");
        let Some(Load::Backlog { from, to, .. }) = s.wants_load() else { panic!("no backlog load") };
        assert_eq!((from, to), (1, 3));
        assert_eq!(s.wants_load(), None, "one load at a time");
        // Read in two chunks; the first stopped early at key 2.
        s.backlog_loaded(vec![stored(1, "a"), stored(2, "b")], 2);
        assert!(s.backlogged());
        assert_eq!(drain_payloads(&mut s), ["q0", "a", "b"]);
        let Some(Load::Backlog { from, to, .. }) = s.wants_load() else { panic!("no second load") };
        assert_eq!((from, to), (3, 3));
        s.backlog_loaded(vec![stored(3, "c")], 3);
        assert!(!s.backlogged(), "read to its end");
        assert_eq!(drain_payloads(&mut s), ["c"]);
        assert_eq!(s.waiting(), (0, 0));
    }

    #[test]
    fn backlog_counts_against_the_limits_and_skips_messages_in_flight() {
        let mut s = SessionState::new(QueueLimits { max_messages: 2, max_bytes: 0, budget: None });
        s.restore_inflight(5, stored(7, "inflight"), OutState::AwaitingAck);
        s.restore_backlog(1, 100, 7, 8);
        assert_eq!(s.backlog_push(9, 100, false), Ok(Queued::Full));
        assert_eq!(s.backlog_push(10, 100, false), Err(Dropped::QueueFull));
        let Some(Load::Backlog { from: 7, to: 9, .. }) = s.wants_load() else { panic!() };
        s.backlog_loaded(vec![stored(7, "inflight"), stored(8, "x"), stored(9, "y")], 9);
        assert!(!s.backlogged());
        assert_eq!(s.queue.len(), 2, "key 7 is in flight already");
    }

    #[test]
    fn retained_cursor_goes_after_what_was_queued_before_it_and_waits_for_reads() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0, budget: None });
        s.enqueue(d(QoS::AtMostOnce, "before"), true).unwrap();
        let m = |p: &'static str| d(QoS::AtLeastOnce, p).msg;
        s.push_retained(vec![(m("r1"), QoS::AtLeastOnce)], vec![("t/2".into(), QoS::AtMostOnce)], Some(9));
        s.enqueue(d(QoS::AtMostOnce, "after"), true).unwrap();
        let now = Instant::now();
        let Some(Outgoing::Unacked(x)) = s.next_outgoing(10, now) else { panic!() };
        assert_eq!(&x.msg.payload[..], b"before");
        let Some(Outgoing::Tracked(_, x)) = s.next_outgoing(10, now) else { panic!() };
        assert_eq!((&x.msg.payload[..], x.retain, &x.subscription_ids[..]), (&b"r1"[..], true, &[9][..]));
        assert!(s.next_outgoing(10, now).is_none(), "t/2 must be read from the store first");
        assert_eq!(s.wants_load(), Some(Load::Retained(vec!["t/2".into()])));
        s.retained_loaded(vec![("t/2".into(), Some(m("r2")))]);
        let Some(Outgoing::Unacked(x)) = s.next_outgoing(10, now) else { panic!("granted QoS 0") };
        assert_eq!(&x.msg.payload[..], b"r2");
        let Some(Outgoing::Unacked(x)) = s.next_outgoing(10, now) else { panic!() };
        assert_eq!(&x.msg.payload[..], b"after");
    }

    #[test]
    fn memory_budget_makes_queues_full_then_drops() {
        let budget = Arc::new(MemoryBudget::new(64 * 1024));
        let limits = QueueLimits { max_messages: 1_000_000, max_bytes: 0, budget: Some(Arc::clone(&budget)) };
        let mut s = SessionState::new(limits);
        let big = || {
            let mut x = d(QoS::AtMostOnce, "");
            Arc::get_mut(&mut x.msg).unwrap().payload = Bytes::from(vec![0u8; 32 * 1024]);
            x
        };
        let mut outcomes = Vec::new();
        while let Ok(q) = s.enqueue(big(), true) {
            outcomes.push(q);
            assert!(outcomes.len() < 100, "the budget never stopped the queue");
        }
        assert_eq!(outcomes.first(), Some(&Queued::Fits));
        assert!(outcomes.contains(&Queued::Full), "soft bound at the budget");
        assert!(budget.exhausted());
        assert!(!s.has_room());
        // A small queue beside it (a client that reads) still takes messages.
        let mut small =
            SessionState::new(QueueLimits { max_messages: 1_000_000, max_bytes: 0, budget: Some(Arc::clone(&budget)) });
        assert_eq!(small.enqueue(d(QoS::AtMostOnce, "x"), true), Ok(Queued::Fits));
        drop(s);
        assert_eq!(budget.used(), 0, "a dropped session gives its share back");
    }
}
