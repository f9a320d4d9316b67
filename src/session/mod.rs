//! Per-client session state as a pure state machine: the queue of messages waiting to be
//! sent, the outbound QoS 1/2 in-flight window with packet ids, and the inbound QoS 2 packet
//! ids awaiting PUBREL.
//!
//! Owns MQTT delivery rules for one client. No I/O, no clock reads of its own beyond what the
//! caller passes, no knowledge of the broker, sockets or store.

mod queue;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::message::Message;
use crate::protocol::QoS;

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
    QueueFull,
}

/// A message that was queued, and whether the queue has reached its bound with it (then the
/// publishers feeding it should wait for room: see `SessionState::enqueue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Fits,
    Full,
}

#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_messages: usize,
    /// 0 = unlimited.
    pub max_bytes: usize,
}

#[derive(Debug)]
pub struct SessionState {
    queue: queue::Queue,
    queued_bytes: usize,
    inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// Packet ids handed out so far (plus one): see `allocate_packet_id`.
    allocs: u64,
    inbound_qos2: HashSet<u16>,
    limits: QueueLimits,
    /// Messages dropped since the session began (queue full, expired, too large).
    pub dropped: u64,
    /// Durable-queue keys of messages dropped without delivery (expired), for the caller to
    /// delete from the store.
    discarded: Vec<u64>,
}

impl SessionState {
    pub fn new(limits: QueueLimits) -> Self {
        SessionState {
            queue: queue::Queue::default(),
            queued_bytes: 0,
            inflight: VecDeque::new(),
            next_packet_id: 1,
            allocs: 1,
            inbound_qos2: HashSet::new(),
            limits,
            dropped: 0,
            discarded: Vec::new(),
        }
    }

    #[cfg(test)]
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
    pub fn enqueue(&mut self, d: Delivery, slack: bool) -> Result<Queued, Dropped> {
        let size = d.msg.held_bytes();
        let factor = if slack { 2 } else { 1 };
        let over_bytes =
            self.limits.max_bytes != 0 && self.queued_bytes + size > self.limits.max_bytes.saturating_mul(factor);
        if self.queue.len() >= self.limits.max_messages.saturating_mul(factor) || over_bytes {
            self.dropped += 1;
            return Err(Dropped::QueueFull);
        }
        self.queued_bytes += size;
        self.queue.push_back(d);
        Ok(if self.has_room() { Queued::Fits } else { Queued::Full })
    }

    /// Whether the queue is below its bound in messages and bytes.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.limits.max_messages
            && (self.limits.max_bytes == 0 || self.queued_bytes < self.limits.max_bytes)
    }

    /// Queues without the limits: retained messages sent on subscribe are bounded by the
    /// retained store, and dropping some would break "all matching retained are sent".
    pub fn enqueue_unbounded(&mut self, d: Delivery) {
        self.queued_bytes += d.msg.held_bytes();
        self.queue.push_back(d);
    }

    /// Takes the next message to send if the in-flight window allows. Expired messages are
    /// skipped and counted. QoS 0 behind a blocked QoS 1/2 message waits, keeping order.
    pub fn next_outgoing(&mut self, window: usize, now: Instant) -> Option<Outgoing> {
        loop {
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
            let pid = self.allocate_packet_id()?;
            let alloc = self.allocs;
            self.allocs += 1;
            self.inflight.push_back(Inflight {
                packet_id: pid,
                delivery: d.clone(),
                state: OutState::AwaitingAck,
                alloc,
            });
            return Some(Outgoing::Tracked(pid, d));
        }
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        let d = self.queue.pop_front()?;
        self.queued_bytes = self.queued_bytes.saturating_sub(d.msg.held_bytes());
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
        out
    }

    /// Inbound QoS 2: records the packet id; false if it was already recorded (a duplicate
    /// that must not be delivered again).
    pub fn inbound_qos2_begin(&mut self, pid: u16) -> bool {
        self.inbound_qos2.insert(pid)
    }

    /// Inbound QoS 2 PUBREL: forgets the id; false if it was unknown.
    pub fn inbound_qos2_release(&mut self, pid: u16) -> bool {
        self.inbound_qos2.remove(&pid)
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
            priority: 0,
        }
    }

    fn limits() -> QueueLimits {
        QueueLimits { max_messages: 3, max_bytes: 0 }
    }

    #[test]
    fn window_limits_inflight_and_keeps_order() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0 });
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
        let mut b = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 200 });
        b.enqueue(d(QoS::AtLeastOnce, "abc"), false).unwrap();
        assert!(b.enqueue(d(QoS::AtLeastOnce, "abc"), false).is_err());
    }

    #[test]
    fn higher_priority_first_fifo_within_a_level() {
        let mut s = SessionState::new(QueueLimits { max_messages: 100, max_bytes: 0 });
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
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0 });
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
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0 });
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
        let mut s = SessionState::new(QueueLimits { max_messages: 10, max_bytes: 0 });
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
}
