//! The broker: the registry of sessions, the subscription and retained indexes, and the
//! fan-out of a published message to every matching session's queue.
//!
//! Owns who is subscribed to what and which session a client id names. Sees session handles
//! (queues with a wake-up), never sockets: connections call in, and learn of new messages
//! through their handle's `Notify`.
//!
//! Lock order, to stay deadlock-free: registry shard -> session cell -> index locks. Matching
//! copies the matches out of the index and releases its lock before any session cell is
//! locked, so a publisher never holds two locks at once.

mod session_handle;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tracing::warn;

pub use session_handle::{ConnControl, SessionCell, SessionHandle};

use crate::config::Config;
use crate::message::Message;
use crate::protocol::{topic, ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::{Delivery, QueueLimits};
use crate::store::{RetainedRecord, SessionRecord, Store};
use crate::topics::{Entry, RetainedTrie, SubscriptionTrie};

/// Session Expiry Interval meaning "never" (v5 3.1.2.11.2); 3.1.1 persistent sessions too.
pub const EXPIRY_NEVER: u32 = u32::MAX;

/// Counters read by tests, logs and (later) $SYS.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub connections_total: AtomicU64,
}

pub struct Broker {
    pub config: Arc<Config>,
    sessions: DashMap<ByteString, Arc<SessionHandle>>,
    subscriptions: RwLock<SubscriptionTrie<Arc<SessionHandle>>>,
    retained: RwLock<RetainedTrie<Arc<Message>>>,
    store: Arc<dyn Store>,
    next_connection: AtomicU64,
    pub metrics: Metrics,
}

/// The result of attaching a connection to a session.
pub struct Attached {
    pub handle: Arc<SessionHandle>,
    pub session_present: bool,
    pub connection_id: u64,
    pub control: Arc<ConnControl>,
}

/// Outcome of one filter of a SUBSCRIBE.
pub struct Subscribed {
    /// True when an identical filter was already subscribed (and has been replaced).
    pub existed: bool,
    pub shared: bool,
}

impl Broker {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>) -> Self {
        Broker {
            config,
            sessions: DashMap::new(),
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedTrie::new()),
            store,
            next_connection: AtomicU64::new(1),
            metrics: Metrics::default(),
        }
    }

    fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_messages: self.config.limits.max_queued_messages,
            max_bytes: self.config.limits.max_queued_bytes,
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().map(|r| r.len()).unwrap_or(0)
    }

    /// Attaches a new connection to the client's session: takes over a connected client
    /// (its connection is told to close with `SESSION_TAKEN_OVER`), resumes a stored session
    /// unless `clean_start`, or makes a new one.
    pub fn attach(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        protocol: ProtocolVersion,
    ) -> Attached {
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(ConnControl::default());
        self.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let fresh = || {
            Arc::new(SessionHandle::new(
                client_id.clone(),
                self.queue_limits(),
                connection_id,
                control.clone(),
                expiry,
                protocol,
            ))
        };
        let mut stale_filters = Vec::new();
        let (handle, session_present) = match self.sessions.entry(client_id.clone()) {
            MapEntry::Occupied(mut e) => {
                let old = e.get().clone();
                let mut cell = old.lock();
                if let Some(c) = cell.control.take() {
                    c.kick(crate::protocol::reason::SESSION_TAKEN_OVER);
                }
                if clean_start || cell.ended {
                    cell.ended = true;
                    cell.owner = 0;
                    stale_filters = cell.subscriptions.drain().map(|(f, _)| f).collect();
                    drop(cell);
                    let h = fresh();
                    e.insert(h.clone());
                    (h, false)
                } else {
                    cell.owner = connection_id;
                    cell.control = Some(control.clone());
                    cell.expiry_interval = expiry;
                    cell.protocol = protocol;
                    drop(cell);
                    (old, true)
                }
            }
            MapEntry::Vacant(e) => {
                let h = fresh();
                e.insert(h.clone());
                (h, false)
            }
        };
        if !stale_filters.is_empty() {
            self.remove_from_index(client_id, &stale_filters);
        }
        if clean_start || !session_present {
            if let Err(e) = self.store.delete_session(client_id) {
                warn!(client_id = %client_id, error = %e, "could not delete old session from store");
            }
        }
        if expiry > 0 {
            let rec = SessionRecord { protocol, expiry_interval: expiry };
            if let Err(e) = self.store.put_session(client_id, &rec) {
                warn!(client_id = %client_id, error = %e, "could not store session");
            }
        }
        Attached { handle, session_present, connection_id, control }
    }

    /// The connection `connection_id` has closed. Ends the session when its expiry is 0,
    /// otherwise keeps it for the client's return and schedules its expiry.
    pub fn detach(self: &Arc<Self>, handle: &Arc<SessionHandle>, connection_id: u64, expiry: u32) {
        {
            let mut cell = handle.lock();
            if cell.owner != connection_id {
                return; // taken over: the new connection owns the session now
            }
            cell.owner = 0;
            cell.control = None;
            cell.last_owner = connection_id;
            cell.expiry_interval = expiry;
        }
        if expiry == 0 {
            self.end_session(handle);
        } else if expiry != EXPIRY_NEVER {
            let broker = Arc::clone(self);
            let handle = Arc::clone(handle);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                let still_away = {
                    let cell = handle.lock();
                    cell.owner == 0 && cell.last_owner == connection_id && !cell.ended
                };
                if still_away {
                    broker.end_session(&handle);
                }
            });
        }
    }

    /// Discards a session: its subscriptions, queued messages and registry entry.
    fn end_session(&self, handle: &Arc<SessionHandle>) {
        let filters: Vec<ByteString> = {
            let mut cell = handle.lock();
            if cell.ended {
                return;
            }
            cell.ended = true;
            let _ = cell.state.drain_all();
            cell.subscriptions.drain().map(|(f, _)| f).collect()
        };
        self.remove_from_index(&handle.client_id, &filters);
        self.sessions.remove_if(&handle.client_id, |_, h| Arc::ptr_eq(h, handle));
        if let Err(e) = self.store.delete_session(&handle.client_id) {
            warn!(client_id = %handle.client_id, error = %e, "could not delete session from store");
        }
    }

    fn remove_from_index(&self, client_id: &str, filters: &[ByteString]) {
        let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
        for f in filters {
            let (group, filter) = split_shared(f);
            trie.unsubscribe(filter, group, client_id);
        }
    }

    /// Adds (or replaces) one subscription of the session.
    pub fn subscribe(
        &self,
        handle: &Arc<SessionHandle>,
        filter: &ByteString,
        options: SubscriptionOptions,
        subscription_id: Option<u32>,
    ) -> Subscribed {
        let (group, trie_filter) = split_shared(filter);
        let persistent = {
            let mut cell = handle.lock();
            cell.subscriptions.insert(filter.clone(), (options, subscription_id));
            cell.expiry_interval > 0
        };
        let entry = Entry { client: handle.client_id.clone(), target: Arc::clone(handle), options, subscription_id };
        let existed = {
            let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
            trie.subscribe(trie_filter, group, entry)
        };
        if persistent {
            if let Err(e) = self.store.put_subscription(&handle.client_id, filter, options, subscription_id) {
                warn!(client_id = %handle.client_id, error = %e, "could not store subscription");
            }
        }
        Subscribed { existed, shared: group.is_some() }
    }

    /// Removes one subscription; returns whether it existed.
    pub fn unsubscribe(&self, handle: &Arc<SessionHandle>, filter: &ByteString) -> bool {
        let (group, trie_filter) = split_shared(filter);
        let persistent = {
            let mut cell = handle.lock();
            cell.subscriptions.remove(filter);
            cell.expiry_interval > 0
        };
        let existed = {
            let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
            trie.unsubscribe(trie_filter, group, &handle.client_id)
        };
        if persistent && existed {
            if let Err(e) = self.store.delete_subscription(&handle.client_id, filter) {
                warn!(client_id = %handle.client_id, error = %e, "could not delete subscription");
            }
        }
        existed
    }

    /// Retained messages matching a (non-shared) filter, expired ones left out.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        {
            let trie = self.retained.read().unwrap_or_else(|e| e.into_inner());
            trie.matches(filter, &mut out);
        }
        let now = Instant::now();
        out.retain(|m| !m.is_expired(now));
        out
    }

    /// Publishes a message: updates the retained index when it is retained, and hands a
    /// delivery to every matching session. Returns how many sessions it matched.
    pub fn publish(&self, msg: Arc<Message>) -> usize {
        self.metrics.messages_received.fetch_add(1, Ordering::Relaxed);
        if msg.retain {
            self.update_retained(&msg);
        }
        let mut matches: Vec<Entry<Arc<SessionHandle>>> = Vec::new();
        {
            let trie = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            trie.matches(&msg.topic, &mut matches);
        }
        if matches.is_empty() {
            return 0;
        }
        // Overlapping subscriptions of one client give one delivery at the highest QoS, with
        // every matching subscription identifier [MQTT-3.3.4-2, 3.3.4-3]. Shared ones are
        // delivered separately, as their own subscriptions.
        matches.sort_by_key(|e| Arc::as_ptr(&e.target) as usize);
        let mut delivered = 0;
        let mut i = 0;
        while i < matches.len() {
            let first = &matches[i];
            let mut j = i + 1;
            while j < matches.len() && Arc::ptr_eq(&matches[j].target, &first.target) {
                j += 1;
            }
            if self.deliver_merged(&msg, &matches[i..j]) {
                delivered += 1;
            }
            i = j;
        }
        delivered
    }

    fn deliver_merged(&self, msg: &Arc<Message>, group: &[Entry<Arc<SessionHandle>>]) -> bool {
        let target = &group[0].target;
        let mut qos = None::<QoS>;
        let mut retain = false;
        let mut ids = Vec::new();
        for e in group {
            // No Local: never back to the publisher's own connection [MQTT-3.8.3-3].
            if e.options.no_local && e.client == msg.origin {
                continue;
            }
            let q = msg.qos.min(e.options.qos);
            qos = Some(qos.map_or(q, |old| old.max(q)));
            retain |= e.options.retain_as_published && msg.retain;
            if let Some(id) = e.subscription_id {
                ids.push(id);
            }
        }
        let Some(qos) = qos else { return false };
        let d = Delivery { msg: Arc::clone(msg), qos, retain, subscription_ids: ids };
        if target.deliver(d) {
            true
        } else {
            self.metrics.messages_dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    fn update_retained(&self, msg: &Arc<Message>) {
        let mut trie = self.retained.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            // An empty retained payload clears the topic [MQTT-3.3.1-10].
            if trie.remove(&msg.topic).is_some() {
                drop(trie);
                if let Err(e) = self.store.delete_retained(&msg.topic) {
                    warn!(topic = %msg.topic, error = %e, "could not delete retained message");
                }
            }
        } else {
            trie.insert(&msg.topic, Arc::clone(msg));
            drop(trie);
            let rec = RetainedRecord { qos: msg.qos as u8, payload: msg.payload.clone() };
            if let Err(e) = self.store.put_retained(&msg.topic, &rec) {
                warn!(topic = %msg.topic, error = %e, "could not store retained message");
            }
        }
    }

    /// Tells every connected client the server is going away.
    pub fn shutdown_all(&self, reason: u8) {
        for entry in self.sessions.iter() {
            let cell = entry.value().lock();
            if let Some(c) = &cell.control {
                c.kick(reason);
            }
        }
    }
}

/// `$share/group/filter` -> (Some(group), filter); anything else -> (None, filter).
fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Some((g, f)) => (Some(g), f),
        None => (None, filter),
    }
}
