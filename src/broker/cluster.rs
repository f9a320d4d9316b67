//! The broker's seam towards a cluster of nodes (`cluster/`, which drives it): what the
//! broker tells the cluster (messages published by this node's clients, filters subscribed
//! here) and how messages from other nodes come in (`Broker::publish_from_cluster`,
//! `Broker::retain_from_cluster`, `Broker::publish_to_share`). With a cluster, shared
//! subscriptions are served by it alone: every fan-out of a message it carries leaves them
//! out, and it hands each message of a group to one node, which delivers it to one member.
//!
//! Knows nothing of NATS: the cluster installs one `ClusterRoutes` at start-up. Without one
//! (a single node) every call here is one `OnceLock::get` that finds nothing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use std::future::Future;
use std::pin::Pin;

use bytes::BytesMut;
use bytestring::ByteString;

use super::{Broker, ConnControl, Select, SessionHandle};
use crate::auth::policy::is_sys_topic;
use crate::auth::Principal;
use crate::message::Message;
use crate::protocol::ProtocolVersion;
use crate::protocol::QoS;
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
    fn new(waiter: Option<&Arc<ConnControl>>) -> Arc<Replicated> {
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

    /// Reports a subscription (`filter` as subscribed, `$share/...` included) added or
    /// removed to the cluster, if any. Callers hold the index's write lock (see
    /// `install_cluster`).
    pub(super) fn cluster_interest(&self, filter: &str, added: bool) {
        if let Some(routes) = self.cluster.get() {
            report(&**routes, filter, added);
        }
    }

    /// Delivers a message published on another node to this node's matching sessions, with
    /// the same rules as a local publish (policy read checks at delivery, flow control is not
    /// applied: the cluster does not wait for a full queue, which drops at its bound), shared
    /// groups left out (they come through `publish_to_share`). The retained index is left
    /// alone: retained updates come in stream order through `retain_from_cluster`. Returns how
    /// many sessions it matched and the store ticket that makes the persistent sessions'
    /// copies durable.
    pub fn publish_from_cluster(&self, msg: Arc<Message>) -> (usize, u64) {
        self.metrics.cluster.received.fetch_add(1, Ordering::Relaxed);
        let mut full: Vec<Arc<SessionHandle>> = Vec::new();
        self.fan_out_with(msg, None, &mut full, true, false, Select::Plain)
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
