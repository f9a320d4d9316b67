//! The broker's seam towards a cluster of nodes (`cluster/`, which drives it): what the
//! broker tells the cluster (messages published by this node's clients, filters subscribed
//! here) and how messages from other nodes come in (`Broker::publish_from_cluster`,
//! `Broker::retain_from_cluster`, `Broker::publish_to_share`). With a cluster, shared
//! subscriptions are served by it alone: every fan-out of a message it carries leaves them
//! out, and it hands each message of a group to one node, which delivers it to one member.
//!
//! Persistent sessions of a cluster (`ClusterSessions`): a session marked `clustered` gets
//! its QoS 1/2 messages only from the cluster (`deliver_from_stream`, with the stream
//! sequence its packet id derives from), and tells the cluster of its acknowledgements
//! (`cluster_acked`); the local fan-out leaves them out.
//!
//! Knows nothing of NATS: the cluster installs one `ClusterRoutes` at start-up. Without one
//! (a single node) every call here is one `OnceLock::get` that finds nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use bytestring::ByteString;

use super::{Attached, Broker, ConnControl, Delivered, Refused, Select, SessionHandle};
use crate::auth::policy::is_sys_topic;
use crate::auth::Principal;
use crate::message::Message;
use crate::protocol::{topic, ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::Delivery;
use crate::store::records;
use crate::store::Op;
use crate::store::{SessionRecord, StoredWill, WillOwner};

/// What the broker asks of the cluster. Called on publishers' and subscribers' tasks: an
/// implementation only hands work to its own tasks, it never waits.
pub trait ClusterRoutes: Send + Sync {
    /// A client of this node published `msg` (wills and bridges' inbound messages included;
    /// never a message that came from the cluster, nor `$SYS`). For QoS 1/2, `done` is to be
    /// completed once the other nodes' copy is safe (replicated), or failed.
    fn forward(&self, msg: &Arc<Message>, done: Option<Arc<Replicated>>);

    /// A (non-shared) subscription to `filter` was added (`added`) or removed on this node.
    /// Called once per subscription, not per filter: the cluster counts them.
    fn interest(&self, filter: &str, added: bool);

    /// A member of the shared subscription `$share/<group>/<filter>` was added or removed on
    /// this node (once per member: the cluster counts them). The broker's own fan-out leaves
    /// shared groups out when it forwards a message: while this node has members of a
    /// group, the cluster gives it some of the group's messages, each to one node, which it
    /// hands to `Broker::publish_to_share`.
    fn shared(&self, group: &str, filter: &str, added: bool);

    /// Messages wait for NATS past the point where publishers must be slowed down: clients'
    /// input pauses (TCP slows them) rather than the cluster dropping QoS 0 or refusing
    /// QoS 1/2. A cheap check, made before every packet.
    fn backlogged(&self) -> bool;

    /// Signals `waiter` (`signal::DURABLE`) once the backlog has drained (at once if it
    /// has already).
    fn wake_when_drained(&self, waiter: &Arc<ConnControl>);
}

/// A persistent session as the cluster keeps it, to be taken on by this node.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    /// Full filter (with any `$share/group/` prefix), options, subscription id.
    pub subscriptions: Vec<(Box<str>, SubscriptionOptions, Option<u32>)>,
    /// Packet ids of QoS 2 deliveries the client had PUBREC'd (released): each gets its
    /// PUBREL again, never its PUBLISH [MQTT-4.4.0-1].
    pub released: Vec<u16>,
}

/// A boxed step of `ClusterSessions`, so that the hook is object safe.
pub type SessionStep<'a, T> = Pin<Box<dyn Future<Output = Result<T, Refused>> + Send + 'a>>;

/// Persistent sessions kept by the cluster, so that a client resumes on any node. Installed
/// once (`install_sessions`); called by the handshake after the client id is claimed.
pub trait ClusterSessions: Send + Sync {
    /// Before the attach of a CONNECT: with `clean_start`, discards any session the cluster
    /// keeps for the id; otherwise returns it (None: there is none, or it expired), ready to
    /// deliver again every message its client has not acknowledged, in order. `expiry` is
    /// the new connection's Session Expiry Interval.
    fn prepare<'a>(
        &'a self,
        client_id: &'a str,
        clean_start: bool,
        expiry: u32,
    ) -> SessionStep<'a, Option<SessionSnapshot>>;

    /// After the attach of a clustered session (`resumed`: from `prepare`): records it
    /// (awaited before CONNACK) and starts feeding it (`Broker::deliver_from_stream`) while
    /// connection `connection_id` serves it.
    fn start<'a>(
        &'a self,
        handle: &'a Arc<SessionHandle>,
        connection_id: u64,
        expiry: u32,
        resumed: bool,
    ) -> SessionStep<'a, ()>;

    /// The session's subscriptions changed: records them, then completes `done`.
    fn save(&self, handle: &Arc<SessionHandle>, done: Arc<Replicated>);

    /// The client acknowledged (or the broker ended) the delivery of stream message `seq`.
    fn acked(&self, client_id: &str, seq: u64);

    /// The client PUBREC'd stream message `seq`, sent with `packet_id`: records it as
    /// released (so that any node resends its PUBREL, not its PUBLISH, once the client has
    /// forgotten the id) and acknowledges it in the stream, then completes `done`, which the
    /// PUBREL waits for.
    fn released(&self, handle: &Arc<SessionHandle>, seq: u64, packet_id: u16, done: Arc<Replicated>);

    /// The client PUBCOMP'd `packet_id`: the record forgets it, in a write of its own that
    /// nothing waits for (a node that took the session on before it sends that PUBREL again,
    /// for an id the client has forgotten: it answers PUBCOMP, and nothing else happens).
    fn completed(&self, handle: &Arc<SessionHandle>, packet_id: u16);

    /// Connection `connection_id` no longer serves the session: feeding it stops; with
    /// `end`, the cluster forgets the session.
    fn stop(&self, client_id: &str, connection_id: u64, end: bool);
}

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// The cluster's answer for one QoS 1/2 message, which the publisher's acknowledgement waits
/// for beside its store ticket. Completed once, from the cluster's task; the waiting
/// connection is woken (`signal::DURABLE`).
#[derive(Debug)]
pub struct Replicated {
    state: AtomicU8,
    waiter: Mutex<Option<Arc<ConnControl>>>,
}

impl Replicated {
    pub(crate) fn new(waiter: Option<&Arc<ConnControl>>) -> Arc<Replicated> {
        Arc::new(Replicated { state: AtomicU8::new(PENDING), waiter: Mutex::new(waiter.cloned()) })
    }

    /// None = not yet, Some(false) = failed (answered as a store failure).
    pub fn outcome(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            PENDING => None,
            s => Some(s == DONE),
        }
    }

    /// Records the answer (the first one counts) and wakes the waiting connection.
    pub fn complete(&self, ok: bool) {
        let new = if ok { DONE } else { FAILED };
        if self.state.compare_exchange(PENDING, new, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let waiter = self.waiter.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(c) = waiter {
                c.signal(super::signal::DURABLE);
            }
        }
    }
}

impl Broker {
    /// Installs the cluster's routes (once; Err if some were installed already), and tells
    /// them of every subscription already held (recovered sessions, bridges). Done under the
    /// index's write lock, as `subscribe` and `unsubscribe` report theirs, so no
    /// subscription is reported twice or missed.
    pub fn install_cluster(&self, routes: Arc<dyn ClusterRoutes>) -> Result<(), Arc<dyn ClusterRoutes>> {
        let trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
        self.cluster.set(Arc::clone(&routes))?;
        for entry in self.sessions.iter() {
            let filters = entry.value().lock().subscriptions.filters();
            for f in filters {
                report(&*routes, &f, true);
            }
        }
        drop(trie);
        Ok(())
    }

    /// Hands a message this node's client published to the cluster; for QoS 1/2, returns
    /// what its acknowledgement must also wait for (`waiter` is woken when it is done).
    /// Nothing without a cluster, for `$SYS` topics, or for a message from the cluster.
    #[inline]
    pub fn forward(&self, msg: &Arc<Message>, waiter: Option<&Arc<ConnControl>>) -> Option<Arc<Replicated>> {
        let routes = self.cluster.get()?;
        if is_sys_topic(&msg.topic) {
            return None;
        }
        let done = (msg.qos != QoS::AtMostOnce).then(|| Replicated::new(waiter));
        routes.forward(msg, done.clone());
        done
    }

    /// Whether this node's publishers must wait for the cluster (see
    /// `ClusterRoutes::backlogged`); false without a cluster.
    #[inline]
    pub fn cluster_backlogged(&self) -> bool {
        self.cluster.get().is_some_and(|r| r.backlogged())
    }

    /// Wakes `waiter` once the cluster's backlog has drained.
    pub fn wait_cluster_drained(&self, waiter: &Arc<ConnControl>) {
        if let Some(r) = self.cluster.get() {
            r.wake_when_drained(waiter);
        }
    }

    /// Reports a subscription (`filter` as subscribed, `$share/...` included) added or
    /// removed to the cluster, if any. Callers hold the index's write lock (see
    /// `install_cluster`).
    pub(super) fn cluster_interest(&self, filter: &str, added: bool) {
        if let Some(routes) = self.cluster.get() {
            report(&**routes, filter, added);
        }
    }

    /// Delivers a message published on another node to this node's matching sessions, with
    /// the same rules as a local publish (policy read checks at delivery; the connected
    /// sessions it filled are added to `full`, for the caller to wait for room before the
    /// next message, as a local publisher's flow control does), shared groups left out (they
    /// come through `publish_to_share`). The retained index is left alone: retained updates
    /// come in stream order through `retain_from_cluster`. Returns how many sessions it
    /// matched and the store ticket that makes the persistent sessions' copies durable.
    pub fn publish_from_cluster(&self, msg: Arc<Message>, full: &mut Vec<Arc<SessionHandle>>) -> (usize, u64) {
        self.metrics.cluster.received.fetch_add(1, Ordering::Relaxed);
        self.fan_out_with(msg, None, full, true, false, Select::Plain)
    }

    /// Delivers a message the cluster gave this node for the shared subscription
    /// `$share/<group>/<filter>` to one of its members here (in turn, as a local publish
    /// picks one), with the rules of `publish_from_cluster`. Returns 0 sessions when this
    /// node has no member left (the cluster then gives the message to another node) and the
    /// store ticket of a persistent member's copy.
    pub fn publish_to_share(&self, group: &str, filter: &str, msg: Arc<Message>) -> (usize, u64) {
        self.metrics.cluster.received.fetch_add(1, Ordering::Relaxed);
        let mut full: Vec<Arc<SessionHandle>> = Vec::new();
        self.fan_out_with(msg, None, &mut full, true, false, Select::Share { group, filter })
    }

    /// Applies a retained update from the cluster's retained stream (this node's own
    /// included, in stream order): sets or (empty payload) clears the topic's retained
    /// message, without delivering it (its subscribers got it through the routes).
    pub fn retain_from_cluster(&self, msg: Arc<Message>) {
        let mut ops: Vec<Op> = Vec::new();
        self.update_retained(&msg, &mut ops, true);
        let (seq, _) = self.submit(ops);
        if !msg.payload.is_empty() {
            self.retained_loaded.lock().unwrap_or_else(|e| e.into_inner()).push_back((Arc::downgrade(&msg), seq));
            self.shed_retained();
        }
    }
}

/// Tells `routes` of a subscription (`$share/...` or not) added or removed.
fn report(routes: &dyn ClusterRoutes, filter: &str, added: bool) {
    match crate::protocol::topic::parse_shared(filter) {
        Some((group, f)) => routes.shared(group, f, added),
        None => routes.interest(filter, added),
    }
}

/// A boxed will write, so that the hook is object safe: Ok carries the write's revision
/// (for `ClusterWills::done`), Err means the cluster could not keep it.
pub type WillWrite<'a> = Pin<Box<dyn Future<Output = Result<u64, ()>> + Send + 'a>>;

/// Where a cluster keeps the wills of this node's connected clients, so that another node
/// publishes them if this one dies. Installed once (`install_wills`).
pub trait ClusterWills: Send + Sync {
    /// Keeps `record` (`Broker::will_record`) for `client_id`'s connection, before its
    /// CONNACK; an Err refuses the CONNECT.
    fn put<'a>(&'a self, client_id: &'a str, record: Vec<u8>) -> WillWrite<'a>;

    /// The connection that wrote `revision` is over and this node has dealt with its will
    /// (published, scheduled or discarded): the kept copy goes, unless a newer connection of
    /// the client here has replaced it. Awaited by the closing connection (so a shutdown,
    /// which waits for its connections, leaves no will for another node to publish).
    fn done<'a>(&'a self, client_id: &'a str, revision: u64) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

impl Broker {
    /// Installs the cluster's will keeper; false when one was installed already.
    pub fn install_wills(&self, wills: Arc<dyn ClusterWills>) -> bool {
        self.cluster_wills.set(wills).is_ok()
    }

    /// The will keeper, when this node is part of a cluster.
    pub fn cluster_wills(&self) -> Option<&Arc<dyn ClusterWills>> {
        self.cluster_wills.get()
    }

    /// A will as the cluster keeps it: the store's session record (will message, delay and
    /// the owner's rights), so that any node can publish it as this one would have.
    pub fn will_record(will: &Message, delay: u32, owner: &Principal, protocol: ProtocolVersion) -> Vec<u8> {
        let mut b = BytesMut::new();
        records::encode_message(will, &mut b);
        let owner = WillOwner {
            username: owner.username.as_deref().map(String::from),
            cert_identity: owner.cert_identity.as_deref().map(String::from),
            listener: u16::try_from(owner.listener).unwrap_or(u16::MAX),
        };
        records::encode_session(&SessionRecord {
            protocol,
            expiry_interval: 0,
            disconnected_at: None,
            will: Some(StoredWill { delay, message: b.freeze(), owner: Some(owner) }),
        })
    }

    /// Publishes the will of a client of a node that died (`record` from `will_record`), as
    /// that node would have: after its delay, with its owner's rights at that moment, unless
    /// the client is connected here again by then. False when the record does not decode.
    pub fn publish_orphan_will(self: &Arc<Self>, client_id: &str, record: &[u8]) -> bool {
        let Ok(rec) = records::decode_session(record) else { return false };
        let Some(w) = rec.will else { return false };
        let Ok(msg) = records::decode_message(&w.message) else { return false };
        let o = w.owner.as_ref();
        let owner = Principal {
            client_id: ByteString::from(client_id),
            username: o.and_then(|o| o.username.as_deref()).map(ByteString::from),
            cert_identity: o.and_then(|o| o.cert_identity.as_deref()).map(Arc::from),
            listener: o.map_or(0, |o| usize::from(o.listener)),
        };
        let (msg, delay) = (Arc::new(msg), w.delay);
        let weak = Arc::downgrade(self);
        let client = ByteString::from(client_id);
        tokio::spawn(async move {
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(delay))).await;
            }
            let Some(b) = weak.upgrade() else { return };
            let back = b.sessions.get(&client).is_some_and(|h| h.value().lock().owner != 0);
            if !back && b.may_publish(&owner, &msg.topic) {
                b.forward(&msg, None);
                b.publish(msg, None);
            }
        });
        true
    }
}

impl Broker {
    /// Installs the cluster's session keeper; false when one was installed already.
    pub fn install_sessions(&self, sessions: Arc<dyn ClusterSessions>) -> bool {
        self.cluster_sessions.set(sessions).is_ok()
    }

    /// The cluster's session keeper, when this node is part of a cluster.
    pub fn cluster_sessions(&self) -> Option<&Arc<dyn ClusterSessions>> {
        self.cluster_sessions.get()
    }

    /// Attaches a connection to a clustered session: whatever this node held for the id is
    /// discarded (the cluster's copy is the one that counts), and `resumed`'s subscriptions
    /// are restored. Nothing of it goes to the local store: it ends here when its connection
    /// does (`Link::detach`), the cluster keeps it.
    pub fn attach_clustered(
        &self,
        client_id: &ByteString,
        protocol: ProtocolVersion,
        resumed: Option<&SessionSnapshot>,
    ) -> Attached {
        let attached = self.attach_with(client_id, true, 0, protocol, None, true);
        for (filter, options, id) in resumed.map(|r| r.subscriptions.as_slice()).unwrap_or_default() {
            self.subscribe(&attached.handle, &ByteString::from(&**filter), *options, *id);
        }
        if let Some(r) = resumed.filter(|r| !r.released.is_empty()) {
            // Only the id matters to a PUBREL: the message itself was delivered and is gone.
            let gone = Arc::new(Message::received(
                ByteString::new(),
                bytes::Bytes::new(),
                QoS::ExactlyOnce,
                false,
                crate::protocol::Properties::default(),
                ByteString::new(),
            ));
            let mut cell = attached.handle.lock();
            for &pid in &r.released {
                let d = Delivery {
                    msg: Arc::clone(&gone),
                    qos: QoS::ExactlyOnce,
                    retain: false,
                    subscription_ids: Vec::new(),
                    store_seq: None,
                    shared: None,
                    maybe_sent: true,
                    priority: 0,
                    stream_seq: 0,
                };
                cell.state.restore_inflight(pid, d, crate::session::OutState::AwaitingComp);
            }
        }
        attached
    }

    /// A message of the messages stream (sequence `seq`) for a clustered session: matched
    /// against its (non-shared) subscriptions with No Local, and queued. None when none
    /// matches (nothing to deliver), else what became of it and the QoS it goes out at (at
    /// QoS 0 nothing acknowledges it). `maybe_sent`: it may have gone out before (DUP).
    pub fn deliver_from_stream(
        &self,
        handle: &SessionHandle,
        msg: Arc<Message>,
        seq: u64,
        maybe_sent: bool,
    ) -> Option<(Delivered, QoS)> {
        let mut qos = None::<QoS>;
        let mut retain = false;
        let mut ids = Vec::new();
        handle.lock().subscriptions.for_each(|filter, o, id| {
            if topic::is_shared(filter) || !topic::matches(filter, &msg.topic) {
                return;
            }
            if o.no_local && handle.client_id == msg.origin {
                return;
            }
            let q = msg.qos.min(o.qos);
            qos = Some(qos.map_or(q, |old| old.max(q)));
            retain |= o.retain_as_published && msg.retain;
            ids.extend(id);
        });
        let qos = qos?;
        let d = Delivery {
            priority: self.priority_of(&msg.topic),
            msg,
            qos,
            retain,
            subscription_ids: ids,
            store_seq: None,
            shared: None,
            maybe_sent,
            stream_seq: if qos == QoS::AtMostOnce { 0 } else { seq },
        };
        self.metrics.cluster.received.fetch_add(1, Ordering::Relaxed);
        Some((handle.deliver(d), qos))
    }

    /// The delivery of stream message `seq` to a clustered session ended (acknowledged by
    /// its client, or dropped): the cluster may forget it.
    pub fn cluster_acked(&self, handle: &SessionHandle, seq: u64) {
        if let (true, Some(s)) = (seq != 0, self.cluster_sessions.get()) {
            s.acked(&handle.client_id, seq);
        }
    }

    /// A clustered session's client PUBREC'd stream message `seq` (`packet_id`): what its
    /// PUBREL must wait for (`waiter` is woken when it is done). None for other deliveries.
    pub fn cluster_released(
        &self,
        handle: &Arc<SessionHandle>,
        seq: u64,
        packet_id: u16,
        waiter: &Arc<ConnControl>,
    ) -> Option<Arc<Replicated>> {
        let s = self.cluster_sessions.get().filter(|_| seq != 0 && handle.clustered)?;
        let done = Replicated::new(Some(waiter));
        s.released(handle, seq, packet_id, Arc::clone(&done));
        Some(done)
    }

    /// A clustered session's client PUBCOMP'd `packet_id`.
    pub fn cluster_completed(&self, handle: &Arc<SessionHandle>, packet_id: u16) {
        if let (true, Some(s)) = (handle.clustered, self.cluster_sessions.get()) {
            s.completed(handle, packet_id);
        }
    }

    /// Records a clustered session's subscriptions; the returned answer is what the SUBACK
    /// or UNSUBACK waits for (None for other sessions). `waiter` is woken when it is done.
    pub fn save_clustered(&self, handle: &Arc<SessionHandle>, waiter: &Arc<ConnControl>) -> Option<Arc<Replicated>> {
        let s = self.cluster_sessions.get().filter(|_| handle.clustered)?;
        let done = Replicated::new(Some(waiter));
        s.save(handle, Arc::clone(&done));
        Some(done)
    }
}
