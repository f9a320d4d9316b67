//! The broker's seam towards a cluster of nodes (`cluster/`, which drives it): what the
//! broker tells the cluster (messages published by this node's clients, filters subscribed
//! here) and how messages from other nodes come in (`Broker::publish_from_cluster`,
//! `Broker::retain_from_cluster`).
//!
//! Knows nothing of NATS: the cluster installs one `ClusterRoutes` at start-up. Without one
//! (a single node) every call here is one `OnceLock::get` that finds nothing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::{Broker, ConnControl, SessionHandle};
use crate::auth::policy::is_sys_topic;
use crate::message::Message;
use crate::protocol::QoS;
use crate::store::Op;

/// What the broker asks of the cluster. Called on publishers' and subscribers' tasks: an
/// implementation only hands work to its own tasks, it never waits.
pub trait ClusterRoutes: Send + Sync {
    /// A client of this node published `msg` (wills and bridges' inbound messages included;
    /// never a message that came from the cluster, nor `$SYS`). For QoS 1/2, `done` is to be
    /// completed once the other nodes' copy is safe (replicated), or failed.
    fn forward(&self, msg: &Arc<Message>, done: Option<Arc<Replicated>>);

    /// A subscription to `filter` (without any `$share/group/` prefix) was added (`added`)
    /// or removed on this node. Called once per subscription, not per filter: the cluster
    /// counts them.
    fn interest(&self, filter: &str, added: bool);
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
                routes.interest(plain_filter(&f), true);
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

    /// Reports a subscription added or removed to the cluster, if any. Callers hold the
    /// index's write lock (see `install_cluster`).
    pub(super) fn cluster_interest(&self, filter: &str, added: bool) {
        if let Some(routes) = self.cluster.get() {
            routes.interest(plain_filter(filter), added);
        }
    }

    /// Delivers a message published on another node to this node's matching sessions, with
    /// the same rules as a local publish (policy read checks at delivery, flow control is not
    /// applied: the cluster does not wait for a full queue, which drops at its bound). The
    /// retained index is left alone: retained updates come in stream order through
    /// `retain_from_cluster`. Returns how many sessions it matched and the store ticket that
    /// makes the persistent sessions' copies durable.
    pub fn publish_from_cluster(&self, msg: Arc<Message>) -> (usize, u64) {
        self.metrics.cluster.received.fetch_add(1, Ordering::Relaxed);
        let mut full: Vec<Arc<SessionHandle>> = Vec::new();
        self.fan_out_with(msg, None, &mut full, true, false)
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

/// The filter a (possibly shared) subscription matches topics with.
fn plain_filter(filter: &str) -> &str {
    crate::protocol::topic::parse_shared(filter).map_or(filter, |(_, f)| f)
}
