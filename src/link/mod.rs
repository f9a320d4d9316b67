//! The session link: what exchanging messages with one attached session takes, without a
//! socket. A network connection, an in-process client ([`local`]) and (later) a bridge each
//! drive one; only the network connection knows MQTT bytes.
//!
//! Owns, for one attachment of a session: draining its queue in order within the in-flight
//! window (packet ids, the policy's read check, QoS 2 ids made durable before their PUBLISH
//! may go out), the acknowledgements of its deliveries (and the deletion of their stored
//! copies), its inbound QoS 2 ids, and handing its publishes and subscriptions to the broker
//! under the policy. Knows nothing of packets, sockets, keep-alive or wills: an endpoint
//! gives it an [`Outbox`] to write deliveries to and turns its answers into whatever it
//! speaks.

pub mod local;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

use crate::auth::Principal;
use crate::broker::{Attached, Broker, ConnControl, DropCause, Replicated, RetainedBatch, SessionHandle};
use crate::message::Message;
use crate::protocol::{reason, topic, QoS, SubscriptionOptions};
use crate::session::{Ack, Delivery, OutState, Outgoing};
use crate::store::{InflightState, Op};

/// Where a link writes what its session sends.
pub trait Outbox {
    /// Whether another delivery may be written now (a network connection stops at its write
    /// batch; more is taken after it is written).
    fn has_room(&self) -> bool;
    /// Writes one delivery (`packet_id` for QoS 1/2; `dup` when it may have been sent
    /// before).
    fn publish(&mut self, d: &Delivery, packet_id: Option<u16>, dup: bool, now: Instant) -> Written;
    /// Writes a PUBREL for a QoS 2 delivery the peer has received (resent on resumption).
    fn pubrel(&mut self, packet_id: u16);
}

/// What an `Outbox` did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Yes,
    /// Larger than the peer accepts: dropped as if delivered, and counted [MQTT-3.1.2-25].
    TooLarge,
    /// Not for this peer (a bridge does not pass on what came over a bridge): ends as if
    /// delivered, not counted as dropped.
    Skipped,
}

/// One attachment of a session.
pub struct Link {
    pub(crate) broker: Arc<Broker>,
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) control: Arc<ConnControl>,
    pub(crate) connection_id: u64,
    /// Who the client is, for every authorisation check (publish, subscribe, delivery).
    pub(crate) principal: Arc<Principal>,
    /// QoS 1/2 deliveries in flight at most: min(limits.max_inflight, peer's Receive Maximum).
    pub(crate) window: usize,
    /// Store ticket that what was written must wait for: QoS 2 PUBLISHes of persistent
    /// sessions go out only once their packet id is durable. 0 = nothing to wait for.
    write_ticket: u64,
}

/// What became of a message a link published (`Link::publish`).
pub struct Routed {
    /// Sessions of this node it reached.
    pub matched: usize,
    /// Store ticket its acknowledgement waits for (0 = none).
    pub ticket: u64,
    /// In a cluster, at QoS 1/2: the other nodes' copy, which the acknowledgement also waits for.
    pub replicated: Option<Arc<Replicated>>,
}

impl Routed {
    /// Whether everything the acknowledgement waits for is done: None = not yet, Some(false)
    /// = something failed (answered as a store failure).
    pub fn outcome(broker: &Broker, ticket: u64, replicated: Option<&Replicated>) -> Option<bool> {
        let stored = if ticket == 0 { true } else { broker.outcome(ticket)? };
        let copied = match replicated {
            Some(r) => r.outcome()?,
            None => true,
        };
        Some(stored && copied)
    }
}

/// How an inbound QoS 2 PUBLISH relates to the ids awaiting PUBREL.
pub struct Qos2Received {
    /// Not seen before (a duplicate must not be delivered again [MQTT-4.3.3-9]).
    pub first: bool,
    /// Ids now awaiting PUBREL.
    pub pending: usize,
    /// The store op recording the id with the message's effects (persistent sessions), so a
    /// resent PUBLISH is still recognised after a crash.
    pub record: Option<Op>,
}

/// The retained messages a SUBSCRIBE sends, gathered over its filters: one entry per
/// message however many filters match it.
#[derive(Default)]
pub struct RetainedCollector {
    batch: RetainedBatch,
    /// Where each topic sits in the batch, built only once a second filter adds messages:
    /// one filter matches each retained topic once, so a one-filter SUBSCRIBE (the usual
    /// kind, and `#` over 100,000 retained messages hashes every topic) needs no index.
    indexed: bool,
    loaded: HashMap<ByteString, usize>,
    stored: HashMap<ByteString, usize>,
    /// Filters matched so far, with the QoS they were matched at.
    matched: HashMap<ByteString, QoS>,
}

impl RetainedCollector {
    pub fn new(subscription_id: Option<u32>) -> Self {
        RetainedCollector { batch: RetainedBatch { subscription_id, ..RetainedBatch::default() }, ..Default::default() }
    }

    /// The batch to queue once the subscription is acknowledged, if anything matched.
    pub fn finish(self) -> Option<Box<RetainedBatch>> {
        let b = self.batch;
        (!b.loaded.is_empty() || !b.stored.is_empty()).then(|| Box::new(b))
    }

    fn add(&mut self, broker: &Broker, filter: &str, qos: QoS) {
        // A filter matched already adds at most a higher QoS, so it is not matched again:
        // repeating one filter many times costs one match (and at most two passes more, as
        // its QoS can rise only twice).
        if let Some(&q) = self.matched.get(filter) {
            if qos > q {
                self.matched.insert(ByteString::from(filter), qos);
                let raise = |e: &mut QoS| *e = (*e).max(qos);
                let b = &mut self.batch;
                b.loaded.iter_mut().filter(|(m, _)| topic::matches(filter, &m.topic)).for_each(|e| raise(&mut e.1));
                b.stored.iter_mut().filter(|(t, _)| topic::matches(filter, t)).for_each(|e| raise(&mut e.1));
            }
            return;
        }
        let first = self.matched.is_empty();
        self.matched.insert(ByteString::from(filter), qos);
        let matches = broker.retained_matches(filter);
        if first {
            self.batch.loaded.extend(matches.loaded.into_iter().map(|m| (m, qos)));
            self.batch.stored.extend(matches.stored.into_iter().map(|t| (t, qos)));
            return;
        }
        if !self.indexed {
            self.indexed = true;
            let b = &self.batch;
            self.loaded.extend(b.loaded.iter().enumerate().map(|(i, (m, _))| (m.topic.clone(), i)));
            self.stored.extend(b.stored.iter().enumerate().map(|(i, (t, _))| (t.clone(), i)));
        }
        for m in matches.loaded {
            match self.loaded.get(&m.topic) {
                Some(&i) => self.batch.loaded[i].1 = self.batch.loaded[i].1.max(qos),
                None => {
                    self.loaded.insert(m.topic.clone(), self.batch.loaded.len());
                    self.batch.loaded.push((m, qos));
                }
            }
        }
        for topic in matches.stored {
            match self.stored.get(&topic) {
                Some(&i) => self.batch.stored[i].1 = self.batch.stored[i].1.max(qos),
                None => {
                    self.stored.insert(topic.clone(), self.batch.stored.len());
                    self.batch.stored.push((topic, qos));
                }
            }
        }
    }
}

/// A subscription made (`Link::subscribe`).
pub struct Subscribed {
    pub qos: QoS,
    /// Store ticket its acknowledgement waits for (0 = none).
    pub ticket: u64,
}

impl Link {
    pub(crate) fn new(broker: Arc<Broker>, attached: Attached, principal: Arc<Principal>, window: usize) -> Link {
        Link {
            broker,
            handle: attached.handle,
            control: attached.control,
            connection_id: attached.connection_id,
            principal,
            window,
            write_ticket: 0,
        }
    }

    /// The client id of the session (kept once, in its handle).
    pub fn client_id(&self) -> &ByteString {
        &self.handle.client_id
    }

    /// Moves queued deliveries into `out` while the in-flight window allows. Returns true if
    /// it stopped because `out` had no room (more may be waiting).
    pub fn drain(&mut self, out: &mut impl Outbox) -> bool {
        let handle = Arc::clone(&self.handle);
        let mut cell = handle.lock();
        if cell.owner != self.connection_id {
            return false; // taken over; the kick will end this link
        }
        let now = Instant::now();
        // Counted here and added to the broker's counters once per batch: messages and payload
        // bytes per QoS, and drops by cause (what the session drops by itself, expired
        // messages, shows in its own count).
        let mut sent = [(0u64, 0u64); 3];
        let (mut revoked, mut too_large) = (0u64, 0u64);
        let dropped_before = cell.state.dropped;
        let mut ops = Vec::new();
        let full = loop {
            if !out.has_room() {
                break true;
            }
            let Some(next) = cell.state.next_outgoing(self.window, now) else { break false };
            cell.progress += 1;
            let (Outgoing::Unacked(d) | Outgoing::Tracked(_, d)) = &next;
            if !self.broker.policy.may_receive(&self.principal, &d.msg.topic) {
                // The right to read was revoked after the message was queued (or retained,
                // or subscribed): it is dropped as if delivered, and counted.
                if let Outgoing::Tracked(pid, d) = &next {
                    self.broker.cluster_acked(&self.handle, d.stream_seq);
                    if let Some(seq) = cell.state.discard(*pid) {
                        ops.push(Op::DeleteQueued { client: self.handle.client_id.clone(), seq });
                    }
                }
                revoked += 1;
                continue;
            }
            let (d, pid) = match next {
                Outgoing::Unacked(d) => (d, None),
                Outgoing::Tracked(pid, d) => {
                    if let (Some(seq), QoS::ExactlyOnce) = (d.store_seq, d.qos) {
                        // A QoS 2 message must go out again with the same id after a crash,
                        // or the receiver would take it for a new one [MQTT-4.3.3]: its id is
                        // durable before the PUBLISH is written (see `write_ready`).
                        ops.push(Op::SetInflight {
                            client: self.handle.client_id.clone(),
                            seq,
                            state: InflightState::Sent(pid),
                        });
                    }
                    (d, Some(pid))
                }
            };
            let written = out.publish(&d, pid, d.maybe_sent, now);
            if written != Written::Yes {
                if pid.is_some() {
                    self.broker.cluster_acked(&self.handle, d.stream_seq);
                }
                if let Some(seq) = pid.and_then(|pid| cell.state.discard(pid)) {
                    ops.push(Op::DeleteQueued { client: self.handle.client_id.clone(), seq });
                }
                if written == Written::TooLarge {
                    too_large += 1;
                }
                continue;
            }
            if let Some(s) = sent.get_mut(d.qos as usize) {
                s.0 += 1;
                s.1 += d.msg.payload.len() as u64;
            }
        };
        let expired = cell.state.dropped.saturating_sub(dropped_before);
        cell.state.dropped += revoked + too_large;
        for seq in cell.state.take_discarded() {
            ops.push(Op::DeleteQueued { client: self.handle.client_id.clone(), seq });
        }
        cell.wake_publishers();
        let load = cell.state.wants_load();
        drop(cell);
        if let Some(load) = load {
            self.broker.start_load(&handle, load);
        }
        let ticket = self.broker.persist(ops);
        self.write_ticket = self.write_ticket.max(ticket);
        let m = &self.broker.metrics;
        m.publish_out(&sent);
        for (cause, n) in
            [(DropCause::Expired, expired), (DropCause::NotAuthorized, revoked), (DropCause::TooLarge, too_large)]
        {
            if n > 0 {
                m.drop_n(cause, n);
            }
        }
        full
    }

    /// On resuming a session, unacknowledged deliveries go out again first, in their original
    /// order: PUBLISH with DUP, or PUBREL [MQTT-4.4.0-1]. Those the client may no longer read
    /// end here.
    pub fn resend_inflight(&mut self, out: &mut impl Outbox) {
        let handle = Arc::clone(&self.handle);
        let mut cell = handle.lock();
        let now = Instant::now();
        let revoked: Vec<u16> = cell
            .state
            .inflight()
            .filter(|f| {
                f.state == OutState::AwaitingAck
                    && !self.broker.policy.may_receive(&self.principal, &f.delivery.msg.topic)
            })
            .map(|f| f.packet_id)
            .collect();
        let mut ops = Vec::new();
        for pid in revoked {
            self.broker.cluster_acked(&self.handle, cell.state.stream_seq_of(pid));
            if let Some(seq) = cell.state.discard(pid) {
                ops.push(Op::DeleteQueued { client: self.handle.client_id.clone(), seq });
            }
        }
        for f in cell.state.inflight() {
            match f.state {
                OutState::AwaitingAck => {
                    // A message too large for the client stays in flight until it goes away.
                    let _ = out.publish(&f.delivery, Some(f.packet_id), true, now);
                }
                OutState::AwaitingComp => out.pubrel(f.packet_id),
            }
        }
        drop(cell);
        self.broker.persist(ops);
    }

    /// False while what was written holds QoS 2 PUBLISHes whose packet ids are not durable.
    pub fn write_ready(&mut self) -> bool {
        if self.write_ticket == 0 {
            return true;
        }
        if self.broker.outcome(self.write_ticket).is_some() {
            self.write_ticket = 0;
            return true;
        }
        false
    }

    /// The store ticket `write_ready` waits for (0 = none).
    pub fn write_ticket(&self) -> u64 {
        self.write_ticket
    }

    /// PUBACK for a QoS 1 delivery.
    pub fn puback(&self, packet_id: u16) -> Ack {
        let (ack, stream_seq) = {
            let mut cell = self.handle.lock();
            let s = self.stream_seq_of(&cell, packet_id);
            (cell.state.puback(packet_id), s)
        };
        self.forget_stored(ack, stream_seq);
        ack
    }

    /// The stream sequence of a clustered session's delivery in flight with `packet_id`.
    #[inline]
    fn stream_seq_of(&self, cell: &crate::broker::SessionCell, packet_id: u16) -> u64 {
        if self.handle.clustered {
            cell.state.stream_seq_of(packet_id)
        } else {
            0
        }
    }

    /// PUBREC for a QoS 2 delivery (`success` false for a v5 error reason, which ends it).
    /// Returns the store ticket and the cluster's answer the PUBREL must wait for: after a
    /// crash (of this node, or of this node of a cluster) the PUBREL, never the PUBLISH, must
    /// be sent again, so "released" is made durable first.
    pub fn pubrec(&self, packet_id: u16, success: bool) -> (Ack, u64, Option<Arc<Replicated>>) {
        let (ack, stream_seq) = {
            let mut cell = self.handle.lock();
            let s = self.stream_seq_of(&cell, packet_id);
            (cell.state.pubrec(packet_id, success), s)
        };
        let mut replicated = None;
        if matches!(ack, Ack::Done(_)) {
            if success {
                replicated = self.broker.cluster_released(&self.handle, stream_seq, packet_id, &self.control);
            } else {
                self.broker.cluster_acked(&self.handle, stream_seq);
            }
        }
        let mut ticket = 0;
        if let Ack::Done(Some(seq)) = ack {
            let op = if success {
                Op::SetInflight {
                    client: self.handle.client_id.clone(),
                    seq,
                    state: InflightState::Released(packet_id),
                }
            } else {
                Op::DeleteQueued { client: self.handle.client_id.clone(), seq }
            };
            ticket = self.broker.persist(vec![op]);
        }
        (ack, ticket, replicated)
    }

    /// PUBCOMP ends a QoS 2 delivery.
    pub fn pubcomp(&self, packet_id: u16) -> Ack {
        let ack = self.handle.lock().state.pubcomp(packet_id);
        // No stream sequence: its stream message was acknowledged at PUBREC.
        self.forget_stored(ack, 0);
        if matches!(ack, Ack::Done(_)) {
            self.broker.cluster_completed(&self.handle, packet_id);
        }
        ack
    }

    /// A delivery that ended deletes its stored copy (or, from the cluster's stream, is
    /// acknowledged there).
    fn forget_stored(&self, ack: Ack, stream_seq: u64) {
        if stream_seq != 0 && matches!(ack, Ack::Done(_)) {
            self.broker.cluster_acked(&self.handle, stream_seq);
        }
        if let Ack::Done(Some(seq)) = ack {
            self.broker.persist(vec![Op::DeleteQueued { client: self.handle.client_id.clone(), seq }]);
        }
    }

    /// An inbound QoS 2 PUBLISH with `packet_id` arrived.
    pub fn qos2_received(&self, packet_id: u16) -> Qos2Received {
        let mut cell = self.handle.lock();
        let first = cell.state.inbound_qos2_begin(packet_id);
        let record =
            (first && cell.persistent()).then(|| Op::PutInbound { client: self.handle.client_id.clone(), packet_id });
        Qos2Received { first, pending: cell.state.inbound_qos2_len(), record }
    }

    /// PUBREL for an inbound QoS 2 id: forgets it. Returns the ticket the PUBCOMP must wait
    /// for: PUBCOMP lets the publisher reuse the id, and were the id still stored after a
    /// crash, its next message with that id would be taken for a duplicate and lost.
    pub fn qos2_released(&self, packet_id: u16) -> u64 {
        let (known, persistent) = {
            let mut cell = self.handle.lock();
            (cell.state.inbound_qos2_release(packet_id), cell.persistent())
        };
        if known && persistent {
            return self.broker.persist(vec![Op::DeleteInbound { client: self.handle.client_id.clone(), packet_id }]);
        }
        0
    }

    /// Whether this client may publish to `topic` now (never to `$SYS`).
    pub fn may_publish(&self, topic: &str) -> bool {
        self.broker.may_publish(&self.principal, topic)
    }

    /// Hands a message from this client to the broker (and, in a cluster, to the other
    /// nodes). Returns how many sessions of this node it reached and what its acknowledgement
    /// waits for; adds to `full` the connected subscribers whose queues it filled (the
    /// endpoint should wait for them: flow control).
    pub fn publish(&self, msg: Message, extra: Option<Op>, full: &mut Vec<Arc<SessionHandle>>) -> Routed {
        let msg = Arc::new(msg);
        let replicated = self.broker.forward(&msg, Some(&self.control));
        let (matched, ticket) = self.broker.publish_flow(msg, extra, full);
        Routed { matched, ticket, replicated }
    }

    /// QoS 0 publishes of this client that arrived together (`Broker::publish_batch`).
    pub fn publish_batch(&self, msgs: &mut Vec<Arc<Message>>, full: &mut Vec<Arc<SessionHandle>>) {
        self.broker.publish_batch(msgs, full);
    }

    /// Waits until the subscribers whose queues a publish filled have room, each for at most
    /// `limits.slow_consumer_secs` (their stalled readers are cut off by the flow control of
    /// network publishers). For endpoints without a socket to stop reading (in-process
    /// clients, bridges, which stop reading their peer meanwhile). Signals other than FLOW
    /// that arrive meanwhile are raised again for the caller's loop.
    pub async fn wait_for_room(&self, full: Vec<Arc<SessionHandle>>) {
        self.broker.wait_for_room(full, &self.control, Some(&self.handle)).await;
    }

    /// Subscribes to `filter` (with any `$share/group/` prefix; already checked against the
    /// protocol's rules by the endpoint) within the session's limit and the policy, and adds
    /// the retained messages it sends (per `opts.retain_handling`) to `retained`. Err is the
    /// v5 reason code of a refusal.
    pub fn subscribe(
        &self,
        filter: &ByteString,
        mut opts: SubscriptionOptions,
        subscription_id: Option<u32>,
        retained: &mut RetainedCollector,
    ) -> Result<Subscribed, u8> {
        let cfg = &self.broker.config;
        let plain = topic::parse_shared(filter).map_or(&**filter, |(_, f)| f);
        if self.over_subscription_limit(filter, cfg.limits.max_subscriptions) {
            return Err(reason::QUOTA_EXCEEDED);
        }
        if !self.broker.policy.may_subscribe(&self.principal, plain) {
            // Unlike mosquitto 2.0, which grants every SUBSCRIBE and filters deliveries, the
            // client learns at once that it will receive nothing here.
            tracing::debug!(client_id = %self.handle.client_id, filter = %filter, "subscription not authorised");
            return Err(reason::NOT_AUTHORIZED);
        }
        opts.qos = opts.qos.min(QoS::from_u8(cfg.mqtt.maximum_qos).unwrap_or(QoS::ExactlyOnce));
        let result = self.broker.subscribe(&self.handle, filter, opts, subscription_id);
        // Retain Handling [MQTT-3.3.1-9..11]; never for shared subscriptions.
        let send = !result.shared
            && match opts.retain_handling {
                0 => true,
                1 => !result.existed,
                _ => false,
            };
        if send {
            retained.add(&self.broker, plain, opts.qos);
        }
        Ok(Subscribed { qos: opts.qos, ticket: result.ticket })
    }

    /// Whether subscribing to `filter` would take the session over its subscription limit
    /// (replacing one it holds never does).
    fn over_subscription_limit(&self, filter: &ByteString, max: usize) -> bool {
        let cell = self.handle.lock();
        cell.subscriptions.len() >= max && !cell.subscriptions.contains_key(filter)
    }

    /// Removes a subscription; false if there was none.
    pub fn unsubscribe(&self, filter: &ByteString) -> bool {
        self.broker.unsubscribe(&self.handle, filter)
    }

    /// After a SUBSCRIBE or UNSUBSCRIBE: a clustered session's subscriptions are recorded in
    /// the cluster, which its acknowledgement waits for (None: nothing to wait for).
    pub fn save_subscriptions(&self) -> Option<Arc<Replicated>> {
        if !self.handle.clustered {
            return None;
        }
        self.broker.save_clustered(&self.handle, &self.control)
    }

    /// Queues the retained messages of an acknowledged SUBSCRIBE.
    pub fn queue_retained(&self, batch: RetainedBatch) {
        self.broker.deliver_retained(&self.handle, batch);
    }

    /// Ends this attachment: the session stays for the client's return (`expiry` seconds, or
    /// ends now when 0).
    pub fn detach(&self, expiry: u32) {
        self.broker.forget_keep_alive(&self.control);
        if let (true, Some(s)) = (self.handle.clustered, self.broker.cluster_sessions()) {
            // The cluster keeps the session (unless it ends now): this node lets go of it
            // at once, so nothing of it lingers here once its client is elsewhere. A
            // session taken over lives on with its new connection.
            let taken_over = self.control.reason() == reason::SESSION_TAKEN_OVER;
            s.stop(&self.handle.client_id, self.connection_id, expiry == 0 && !taken_over);
            self.broker.detach(&self.handle, self.connection_id, 0);
            return;
        }
        self.broker.detach(&self.handle, self.connection_id, expiry);
    }
}
