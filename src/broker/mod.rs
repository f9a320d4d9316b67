//! The broker: the registry of sessions, the subscription and retained indexes, the fan-out
//! of a published message to every matching session's queue, and what of that must reach
//! the store before anyone is told it happened.
//!
//! Owns who is subscribed to what and which session a client id names. Sees session handles
//! (queues with a wake-up), never sockets: connections call in, and learn of new messages,
//! store progress and kicks through their `ConnControl`.
//!
//! Lock order, to stay deadlock-free: registry shard -> session cell -> index locks. Matching
//! copies the matches out of the index and releases its lock before any session cell is
//! locked, so a publisher never holds two locks at once.
//!
//! Durability: every change to a persistent session (subscriptions, queued QoS 1/2 copies,
//! in-flight states, inbound QoS 2 ids) and every retained update is submitted to the store
//! *before* it becomes visible to another task, so the store sees changes in the order they
//! happen. Calls that need an acknowledgement held back return a store ticket (0 = nothing
//! to wait for).

mod cluster;
mod expiry;
pub(crate) mod input_order;
mod keep_alive;
mod metrics;
mod owners;
mod recovery;
mod session_handle;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

pub use cluster::{ClusterRoutes, ClusterSessions, ClusterWills, Replicated, SessionSnapshot, SessionStep, WillWrite};
pub use metrics::{DropCause, Metrics, Stats};
pub use owners::{Claim, ClusterOwners, Refused};
pub use recovery::RecoverySummary;
pub use session_handle::{signal, ConnControl, Delivered, DurableWaiters, SessionCell, SessionHandle};

use crate::auth::{policy::is_sys_topic, Authenticator, Policy, Principal};
use crate::config::Config;
use crate::message::Message;
use crate::protocol::{topic, ProtocolVersion, QoS, SubscriptionOptions};
use crate::session::{Delivery, Load, MemoryBudget, QueueLimits, Queued};
use crate::store::records::{self, now_unix_ms};
use crate::store::{Op, SessionRecord, Store, StoreError, StoredWill, WillOwner};
use crate::topics::{Entry, Match, RetainedTrie, SubscriptionTrie};

/// Client ids of bridges' local sessions (`$bridge/<name>`): reserved, so that no client can
/// take a bridge's session over (and its messages), nor pass for a bridge in loop prevention.
pub const BRIDGE_SESSION_PREFIX: &str = "$bridge/";

/// Whether a client (network or in-process) may use this id: bridges' ids are reserved.
pub fn client_id_reserved(id: &str) -> bool {
    id.starts_with(BRIDGE_SESSION_PREFIX)
}

/// Session Expiry Interval meaning "never" (v5 3.1.2.11.2); 3.1.1 persistent sessions too.
pub const EXPIRY_NEVER: u32 = u32::MAX;

pub struct Broker {
    pub config: Arc<Config>,
    /// Enhanced authentication methods offered to MQTT 5 clients.
    pub auth: Authenticator,
    /// Who may log in, publish, subscribe and receive; asked by connections at every entry.
    pub policy: Arc<dyn Policy>,
    sessions: DashMap<ByteString, Arc<SessionHandle>>,
    subscriptions: RwLock<SubscriptionTrie<Arc<SessionHandle>>>,
    retained: RwLock<RetainedTrie<Retained>>,
    /// Retained messages held whole in memory, oldest first, with the store sequence number
    /// that writes them: past `limits.max_retained_in_memory`, the front ones whose write is
    /// done are reduced to their topic (`Retained::Stored`). Weak: a message replaced or
    /// cleared in the index must be freed then, not pinned here (republishing one topic
    /// would otherwise keep up to that many payloads).
    retained_loaded: std::sync::Mutex<std::collections::VecDeque<(std::sync::Weak<Message>, u64)>>,
    store: Store,
    /// Publishers hold it shared from giving persistent sessions' copies their store keys
    /// until the copies are submitted; a backlog read takes it alone for a moment, so that
    /// every key it may read has been submitted (see `load_backlog`).
    store_gate: RwLock<()>,
    /// Offline persistent sessions keep their queues in the store, not in memory (the store
    /// can read them back).
    backlogs_on_disk: bool,
    /// Memory held by all session queues (`limits.max_queued_memory`).
    queue_memory: Arc<MemoryBudget>,
    durable: Arc<DurableWaiters>,
    keep_alive: keep_alive::KeepAlive,
    /// Session expiries and delayed wills, all served by one task.
    expiry: Arc<expiry::Expiry>,
    shutting_down: AtomicBool,
    next_connection: AtomicU64,
    pub metrics: Metrics,
    /// Cluster-wide ownership of client ids (`owners.rs`); unset on a single node.
    owners: OnceLock<Arc<dyn ClusterOwners>>,
    /// Where the cluster keeps this node's clients' wills (`[cluster]`), installed once.
    cluster_wills: OnceLock<Arc<dyn ClusterWills>>,
    /// The cluster this node is part of (`[cluster]`), installed once at start-up.
    cluster: std::sync::OnceLock<Arc<dyn ClusterRoutes>>,
    /// Persistent sessions kept by the cluster (`[cluster]`), installed once at start-up.
    cluster_sessions: OnceLock<Arc<dyn ClusterSessions>>,
}

/// The result of attaching a connection to a session.
pub struct Attached {
    pub handle: Arc<SessionHandle>,
    pub session_present: bool,
    pub connection_id: u64,
    pub control: Arc<ConnControl>,
}

/// A retained message in the index: in memory, or (recovered at start-up) only its topic and
/// expiry, the message itself read from the store when a subscription asks for it.
#[derive(Debug, Clone)]
pub enum Retained {
    Loaded(Arc<Message>),
    Stored { topic: ByteString, expires_at_ms: Option<u64> },
}

/// Retained messages matching a filter (`Broker::retained_matches`).
#[derive(Debug, Default)]
pub struct RetainedMatches {
    /// Held whole in memory, ready to deliver.
    pub loaded: Vec<Arc<Message>>,
    /// Held only in the store: topics, read from the store as their subscriber's queue drains.
    pub stored: Vec<ByteString>,
}

/// The retained messages one SUBSCRIBE sends, one entry per message however many of its
/// filters match it, each with the highest QoS granted among those filters.
#[derive(Debug, Default)]
pub struct RetainedBatch {
    pub loaded: Vec<(Arc<Message>, QoS)>,
    pub stored: Vec<(ByteString, QoS)>,
    /// The SUBSCRIBE's subscription identifier (v5).
    pub subscription_id: Option<u32>,
}

/// Where a persistent session's copy of a message waits (`Broker::assign_store_seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Memory,
    Backlog(Queued),
    Dropped(DropCause),
}

/// Outcome of one filter of a SUBSCRIBE.
pub struct Subscribed {
    /// True when an identical filter was already subscribed (and has been replaced).
    pub existed: bool,
    pub shared: bool,
    /// Store ticket of the subscription (0 when nothing is waited for).
    pub ticket: u64,
}

impl Broker {
    /// `durable` must be told of the store's progress (the `notify` of `Store::open`).
    pub fn new(
        config: Arc<Config>,
        store: Store,
        durable: Arc<DurableWaiters>,
        auth: Authenticator,
        policy: Arc<dyn Policy>,
    ) -> Self {
        let queue_memory = Arc::new(MemoryBudget::new(config.limits.max_queued_memory));
        let metrics = Metrics::new(&config);
        Broker {
            config,
            auth,
            policy,
            sessions: DashMap::new(),
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedTrie::new()),
            retained_loaded: std::sync::Mutex::new(std::collections::VecDeque::new()),
            backlogs_on_disk: store.queue_reader().is_some(),
            queue_memory,
            store,
            store_gate: RwLock::new(()),
            durable,
            keep_alive: keep_alive::KeepAlive::default(),
            expiry: Arc::default(),
            shutting_down: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            metrics,
            owners: OnceLock::new(),
            cluster_wills: OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            cluster_sessions: OnceLock::new(),
        }
    }

    fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_messages: self.config.limits.max_queued_messages,
            max_bytes: self.config.limits.max_queued_bytes,
            budget: Some(Arc::clone(&self.queue_memory)),
        }
    }

    /// Bytes of queued messages held in memory beyond each queue's free part
    /// (`limits.max_queued_memory`).
    pub fn queued_memory(&self) -> usize {
        self.queue_memory.used()
    }

    /// Discards the stored sessions of bridges no longer in the configuration: nothing would
    /// ever drain them, so they would fill with messages for a peer that is gone, up to the
    /// queue limits, for ever. Returns how many were discarded.
    pub fn discard_stale_bridge_sessions(&self, configured: &[&str]) -> usize {
        let stale: Vec<Arc<SessionHandle>> = self
            .sessions
            .iter()
            .filter(|e| {
                e.key()
                    .strip_prefix(BRIDGE_SESSION_PREFIX)
                    .is_some_and(|name| !configured.contains(&name) && e.value().lock().owner == 0)
            })
            .map(|e| Arc::clone(e.value()))
            .collect();
        for h in &stale {
            tracing::info!(client_id = %h.client_id, "session of a bridge no longer configured discarded");
            self.end_session(h);
        }
        stale.len()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Signals `control` (DURABLE) once `ticket` is processed. Check `outcome` after calling:
    /// the ticket may have been processed just before.
    pub fn wait_durable(&self, ticket: u64, control: &Arc<ConnControl>) {
        self.durable.wait(ticket, control);
    }

    /// Waits until the subscribers whose queues a publish filled have room, each for at most
    /// `limits.slow_consumer_secs` (their stalled readers are cut off by the flow control of
    /// network publishers), `own` session excepted. For publishers without a socket to stop
    /// reading (in-process clients, bridges and the cluster's inbound tasks, which stop
    /// reading their peer meanwhile). Signals other than FLOW that arrive at `control`
    /// meanwhile are raised again for the caller's loop.
    pub async fn wait_for_room(
        &self,
        full: Vec<Arc<SessionHandle>>,
        control: &Arc<ConnControl>,
        own: Option<&Arc<SessionHandle>>,
    ) {
        let limit = std::time::Duration::from_secs(self.config.limits.slow_consumer_secs);
        let until = tokio::time::Instant::now() + limit;
        for target in full {
            if own.is_some_and(|h| Arc::ptr_eq(&target, h)) {
                continue;
            }
            while target.wait_for_room(control).is_some() {
                // Re-checked at least every 100 ms, in case a FLOW wake-up went elsewhere.
                let tick = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
                let woke =
                    tokio::time::timeout_at(tick.min(until), std::future::poll_fn(|cx| control.poll_signals(cx))).await;
                if let Ok(bits) = woke {
                    control.signal(bits & !signal::FLOW);
                }
                if tokio::time::Instant::now() >= until {
                    return;
                }
            }
        }
    }

    /// Server shutdown: every connection is told `reason`, and connections attaching from
    /// now on end at once (`shutting_down`).
    pub fn kick_all(&self, reason: u8) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for entry in self.sessions.iter() {
            if let Some(c) = &entry.value().lock().control {
                c.kick(reason);
            }
        }
    }

    /// Closes the connection of `control` (KICK with 0x8D) once it has read nothing for one
    /// and a half times `secs`; the connection reports reads with `control.seen(broker.tick())`.
    pub fn watch_keep_alive(&self, control: &Arc<ConnControl>, secs: u16) {
        self.keep_alive.watch(control, secs);
    }

    /// Stops watching the connection of `control`; called when it closes, so a long
    /// keep-alive does not keep its entry for up to 27 hours. Harmless if it was not watched.
    pub fn forget_keep_alive(&self, control: &Arc<ConnControl>) {
        self.keep_alive.forget(control);
    }

    /// The keep-alive clock.
    pub fn tick(&self) -> u32 {
        self.keep_alive.now()
    }

    /// Runs the keep-alive sweeps until shutdown.
    pub async fn run_keep_alive(self: Arc<Self>) {
        let mut every = tokio::time::interval(keep_alive::TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.shutting_down() {
            every.tick().await;
            self.keep_alive.sweep();
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// While the store's backlog is over `storage.max_pending_bytes`: the ticket (store
    /// sequence number) to wait for before looking again. Connections stop reading meanwhile.
    pub fn store_backlog(&self) -> Option<u64> {
        self.store.backlog_over(self.config.storage.max_pending_bytes)
    }

    /// Approximate bytes of store work waiting for the commit thread.
    pub fn store_pending_bytes(&self) -> usize {
        self.store.pending_bytes()
    }

    /// Whether the store work of `ticket` is done: None = not yet, Some(false) = it failed.
    pub fn outcome(&self, ticket: u64) -> Option<bool> {
        self.store.outcome(ticket)
    }

    /// Submits store operations; returns the ticket to wait for (0 when acknowledgements do
    /// not wait, by configuration, or there was nothing to write).
    pub fn persist(&self, ops: Vec<Op>) -> u64 {
        self.submit(ops).1
    }

    /// Like `persist`, also returning the store's sequence number for the work (0 = none).
    fn submit(&self, ops: Vec<Op>) -> (u64, u64) {
        if ops.is_empty() {
            return (0, 0);
        }
        let seq = self.store.submit(ops);
        (seq, if self.store.acks_wait() { seq } else { 0 })
    }

    /// Retained messages currently held whole in memory.
    pub fn retained_in_memory(&self) -> usize {
        self.retained_loaded.lock().map(|q| q.iter().filter(|(m, _)| m.strong_count() > 0).count()).unwrap_or(0)
    }

    /// Reduces the oldest in-memory retained messages to their topic while there are more
    /// than `limits.max_retained_in_memory` and their store write is done.
    fn shed_retained(&self) {
        let max = self.config.limits.max_retained_in_memory;
        let mut loaded = self.retained_loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.len() <= max {
            return;
        }
        let mut trie = self.retained.write().unwrap_or_else(|e| e.into_inner());
        while loaded.len() > max {
            let Some((msg, seq)) = loaded.front() else { break };
            let Some(msg) = msg.upgrade() else {
                // Replaced or cleared since, and freed.
                loaded.pop_front();
                continue;
            };
            match self.store.outcome(*seq) {
                None => break, // not on disk yet; try again later
                Some(false) => {
                    // Its write failed: memory holds the only copy, so it stays whole.
                    loaded.pop_front();
                    continue;
                }
                Some(true) => {}
            }
            // Only if the index still holds this very message (not a newer one or none).
            if let Some(Retained::Loaded(current)) = trie.get(&msg.topic) {
                if Arc::ptr_eq(current, &msg) {
                    let expires_at_ms = msg
                        .expiry_interval
                        .map(|e| records::instant_to_unix_ms(msg.received_at).saturating_add(u64::from(e) * 1000));
                    let topic = msg.topic.clone();
                    trie.insert(&topic.clone(), Retained::Stored { topic, expires_at_ms });
                }
            }
            loaded.pop_front();
        }
    }

    /// Flushes and stops the store (graceful shutdown). Err when the final sync failed or the
    /// store had failed for good: not everything is on disk. Blocking.
    pub fn close_store(&self) -> Result<(), Arc<StoreError>> {
        self.store.close()
    }

    /// Attaches a new connection to the client's session: takes over a connected client
    /// (its connection is told to close with `SESSION_TAKEN_OVER`), resumes a stored session
    /// unless `clean_start`, or makes a new one.
    /// `will` (message and delay) is stored with a persistent session, so that it is still
    /// published if the broker dies while the client is connected.
    pub fn attach(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        protocol: ProtocolVersion,
        will: Option<(&Message, u32, &Principal)>,
    ) -> Attached {
        self.attach_with(client_id, clean_start, expiry, protocol, will, false)
    }

    fn attach_with(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        protocol: ProtocolVersion,
        will: Option<(&Message, u32, &Principal)>,
        clustered: bool,
    ) -> Attached {
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(ConnControl::default());
        self.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        let fresh = || {
            let h = SessionHandle::new(
                client_id.clone(),
                self.queue_limits(),
                connection_id,
                Some(control.clone()),
                expiry,
                protocol,
            );
            Arc::new(if clustered { h.into_clustered() } else { h })
        };
        let mut stale_filters = Vec::new();
        let mut ops = Vec::new();
        let (handle, session_present) = match self.sessions.entry(client_id.clone()) {
            MapEntry::Occupied(mut e) => {
                let old = e.get().clone();
                let mut cell = old.lock();
                if let Some(c) = cell.control.take() {
                    c.kick(crate::protocol::reason::SESSION_TAKEN_OVER);
                }
                if clean_start || cell.ended {
                    if cell.persisted {
                        ops.push(Op::DeleteSession { client: client_id.clone() });
                    }
                    cell.ended = true;
                    cell.owner = 0;
                    stale_filters = cell.subscriptions.take_filters();
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
        if expiry > 0 {
            handle.lock().persisted = true;
            ops.push(Op::PutSession {
                client: client_id.clone(),
                record: SessionRecord {
                    protocol,
                    expiry_interval: expiry,
                    disconnected_at: None,
                    will: will.map(|(m, delay, owner)| {
                        let mut b = BytesMut::new();
                        records::encode_message(m, &mut b);
                        let owner = WillOwner {
                            username: owner.username.as_deref().map(String::from),
                            cert_identity: owner.cert_identity.as_deref().map(String::from),
                            listener: u16::try_from(owner.listener).unwrap_or(u16::MAX),
                        };
                        StoredWill { delay, message: b.freeze(), owner: Some(owner) }
                    }),
                },
            });
        }
        self.persist(ops);
        Attached { handle, session_present, connection_id, control }
    }

    /// The connection `connection_id` has closed. Ends the session when its expiry is 0,
    /// otherwise keeps it for the client's return and schedules its expiry.
    pub fn detach(self: &Arc<Self>, handle: &Arc<SessionHandle>, connection_id: u64, expiry: u32) {
        let protocol = {
            let mut cell = handle.lock();
            if cell.owner != connection_id {
                return; // taken over: the new connection owns the session now
            }
            cell.owner = 0;
            cell.control = None;
            cell.last_owner = connection_id;
            cell.expiry_interval = expiry;
            // Nobody reads the queue now: publishers waiting on it go on (it drops at its
            // bound while the client is away).
            cell.wake_publishers();
            cell.protocol
        };
        self.move_shared(handle);
        if expiry == 0 {
            self.end_session(handle);
            return;
        }
        if self.backlogs_on_disk {
            // Its QoS 1/2 messages are in the store: they need not take memory while it is
            // away (they are read back when it returns).
            handle.lock().state.spill();
        }
        self.persist(vec![Op::PutSession {
            client: handle.client_id.clone(),
            record: SessionRecord {
                protocol,
                expiry_interval: expiry,
                disconnected_at: Some(now_unix_ms()),
                will: None,
            },
        }]);
        if expiry != EXPIRY_NEVER {
            self.schedule_expiry(handle, connection_id, Duration::from_secs(u64::from(expiry)));
        }
    }

    /// Hands a departing member's unacknowledged shared-subscription messages to another
    /// connected member of the same group [MQTT-4.8.2]; keeps them when there is none.
    fn move_shared(&self, from: &Arc<SessionHandle>) {
        let keys = from.lock().state.shared_keys();
        if keys.is_empty() {
            return;
        }
        // Pick the receiving member of each share first, without holding the session's lock.
        let mut receivers = std::collections::HashMap::new();
        for key in keys {
            let Some((group, filter)) = topic::parse_shared(&key) else { continue };
            let members = {
                let trie = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
                trie.shared_members(filter, group)
            };
            if let Some(m) = members.into_iter().find(|m| !Arc::ptr_eq(&m.target, from) && m.target.lock().owner != 0) {
                receivers.insert(key, m);
            }
        }
        let moved = from.lock().state.take_shared(|k| receivers.contains_key(k));
        let mut ops = Vec::new();
        let mut handover = Vec::new();
        let mut gate = None;
        for mut d in moved {
            let Some(member) = d.shared.as_ref().and_then(|k| receivers.get(k)) else { continue };
            if let Some(seq) = d.store_seq.take() {
                ops.push(Op::DeleteQueued { client: from.client_id.clone(), seq });
            }
            d.qos = d.msg.qos.min(member.options.qos);
            d.subscription_ids = member.subscription_id.into_iter().collect();
            let target = Arc::clone(&member.target);
            let place = if d.qos != QoS::AtMostOnce {
                let mut encoded = None;
                self.assign_store_seq(&target, &mut d, &mut encoded, &mut ops, &mut gate)
            } else {
                Placement::Memory
            };
            handover.push((target, d, place));
        }
        self.persist(ops);
        drop(gate);
        for (target, d, place) in handover {
            // A member taking over a departed member's messages is not slowed down for them.
            match place {
                Placement::Memory => {
                    let _ = target.deliver(d);
                }
                Placement::Backlog(q) => {
                    let _ = target.backlogged(q);
                }
                Placement::Dropped(_) => {}
            }
        }
    }

    /// The `[[priority]]` level of `topic`: the highest of the filters matching it, else 0.
    pub fn priority_of(&self, topic: &str) -> u8 {
        self.config.priority.iter().filter(|p| topic::matches(&p.filter, topic)).map(|p| p.level).max().unwrap_or(0)
    }

    /// Whether `owner` may publish `topic` now: never in `$SYS` (but for a bridge's own state
    /// topic), otherwise as the policy says. Wills are published with their owner's rights,
    /// checked when they are published.
    pub fn may_publish(&self, owner: &Principal, topic: &str) -> bool {
        (!is_sys_topic(topic) || self.is_bridge_notification(owner, topic)) && self.policy.may_publish(owner, topic)
    }

    /// A mosquitto bridge (with `notifications true`, its default) publishes its state at the
    /// broker it connects to, retained, on `$SYS/broker/connection/<its client id>/state`, and
    /// makes that topic its will: refusing it would refuse the bridge's CONNECT. So a client
    /// may write that one topic (the ACL still decides, as in mosquitto, whose example ACL has
    /// `pattern write $SYS/broker/connection/%c/state`), unless its client id is the name of
    /// one of tern's own bridges, whose state topic that is.
    fn is_bridge_notification(&self, owner: &Principal, topic: &str) -> bool {
        let id = topic.strip_prefix("$SYS/broker/connection/").and_then(|t| t.strip_suffix("/state"));
        id == Some(&*owner.client_id) && !self.config.bridge.iter().any(|b| b.name == *owner.client_id)
    }

    /// Publishes a will after `delay` seconds unless the client is back on the same session
    /// by then (v5 Will Delay Interval, [MQTT-3.1.3-9]); at once when `delay` is 0. The will
    /// is published only if its owner may still publish there at that moment. `owner` is None
    /// for wills recovered from the store, whose owner's identity was not kept: those were
    /// allowed when their client connected.
    pub fn publish_will(
        self: &Arc<Self>,
        handle: &Arc<SessionHandle>,
        will: Arc<Message>,
        delay: u32,
        owner: Option<Arc<Principal>>,
    ) {
        if delay == 0 {
            if owner.as_ref().is_none_or(|o| self.may_publish(o, &will.topic)) {
                self.forward(&will, None);
                self.publish(will, None);
            }
            return;
        }
        let handle = Arc::downgrade(handle);
        self.add_timer(Duration::from_secs(u64::from(delay)), expiry::Timer::Will { handle, will, owner });
    }

    fn schedule_expiry(self: &Arc<Self>, handle: &Arc<SessionHandle>, connection_id: u64, after: Duration) {
        // Weak: a session discarded before it expires (clean start, takeover) must not be kept
        // in memory by its timer for the rest of the expiry interval.
        let handle = Arc::downgrade(handle);
        self.add_timer(after, expiry::Timer::Session { handle, connection_id });
    }

    /// Discards a session: its subscriptions, queued messages, registry entry and stored data.
    fn end_session(&self, handle: &Arc<SessionHandle>) {
        let (filters, persisted) = {
            let mut cell = handle.lock();
            if cell.ended {
                return;
            }
            cell.ended = true;
            let _ = cell.state.drain_all();
            cell.wake_publishers();
            (cell.subscriptions.take_filters(), cell.persisted)
        };
        self.remove_from_index(&handle.client_id, &filters);
        self.sessions.remove_if(&handle.client_id, |_, h| Arc::ptr_eq(h, handle));
        if persisted {
            self.persist(vec![Op::DeleteSession { client: handle.client_id.clone() }]);
        }
    }

    fn remove_from_index(&self, client_id: &str, filters: &[Box<str>]) {
        let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
        for f in filters {
            let (group, filter) = split_shared(f);
            if trie.unsubscribe(filter, group, client_id) {
                self.cluster_interest(f, false);
            }
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
            cell.subscriptions.insert(filter, options, subscription_id);
            cell.persistent()
        };
        let ticket = if persistent {
            self.persist(vec![Op::PutSubscription {
                client: handle.client_id.clone(),
                filter: filter.clone(),
                options,
                id: subscription_id,
            }])
        } else {
            0
        };
        let entry = Entry {
            client: handle.client_id.clone(),
            target: Arc::clone(handle),
            options,
            subscription_id,
            share: group.map(|_| filter.clone()),
        };
        let existed = {
            let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
            let existed = trie.subscribe(trie_filter, group, entry);
            if !existed {
                self.cluster_interest(filter, true);
            }
            existed
        };
        Subscribed { existed, shared: group.is_some(), ticket }
    }

    /// Removes one subscription; returns whether it existed.
    pub fn unsubscribe(&self, handle: &Arc<SessionHandle>, filter: &ByteString) -> bool {
        let (group, trie_filter) = split_shared(filter);
        let persistent = {
            let mut cell = handle.lock();
            cell.subscriptions.remove(filter);
            cell.persistent()
        };
        let existed = {
            let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
            let existed = trie.unsubscribe(trie_filter, group, &handle.client_id);
            if existed {
                self.cluster_interest(filter, false);
            }
            existed
        };
        if persistent && existed {
            self.persist(vec![Op::DeleteSubscription { client: handle.client_id.clone(), filter: filter.clone() }]);
        }
        existed
    }

    /// Retained messages matching a (non-shared) filter, expired ones left out, without
    /// touching the disk: those held in memory, and the topics of those held only in the
    /// store (read when the subscriber's queue gets to them).
    pub fn retained_matches(&self, filter: &str) -> RetainedMatches {
        let mut found = Vec::new();
        {
            let trie = self.retained.read().unwrap_or_else(|e| e.into_inner());
            trie.matches(filter, &mut found);
        }
        self.shed_retained();
        let now = Instant::now();
        let now_ms = now_unix_ms();
        let mut out = RetainedMatches::default();
        for r in found {
            match r {
                Retained::Loaded(m) => {
                    if !m.is_expired(now) {
                        out.loaded.push(m);
                    }
                }
                Retained::Stored { topic, expires_at_ms } => {
                    if expires_at_ms.is_none_or(|t| t > now_ms) {
                        out.stored.push(topic);
                    }
                }
            }
        }
        out
    }

    /// Publishes a message: updates the retained index when it is retained, and hands a
    /// delivery to every matching session. `extra` is store work that must be durable with
    /// it (the publisher's inbound QoS 2 id). Returns how many sessions it matched and the
    /// store ticket to wait for before acknowledging.
    pub fn publish(&self, msg: Arc<Message>, extra: Option<Op>) -> (usize, u64) {
        self.publish_flow(msg, extra, &mut Vec::new())
    }

    /// Like `publish`, and adds to `full` the connected sessions whose queues this message
    /// filled: the publisher should stop feeding them until they have room (flow control).
    pub fn publish_flow(
        &self,
        msg: Arc<Message>,
        extra: Option<Op>,
        full: &mut Vec<Arc<SessionHandle>>,
    ) -> (usize, u64) {
        self.metrics.publish_in(msg.qos, msg.payload.len());
        // In a cluster, shared groups get what is forwarded through it (once, cluster-wide).
        let select =
            if self.cluster.get().is_some() && !is_sys_topic(&msg.topic) { Select::Plain } else { Select::All };
        self.fan_out_with(msg, extra, full, true, true, select)
    }

    /// Whether `publish_batch` may take `msg`: QoS 0, not retained (no store, no retained
    /// index), on a node without a cluster (nothing forwarded).
    pub fn batchable(&self, msg: &Message) -> bool {
        msg.qos == QoS::AtMostOnce && !msg.retain && self.cluster.get().is_none()
    }

    /// Delivers `msgs` (all `batchable`, from one publisher, in its order; emptied) as
    /// `publish_flow` would one by one, but with one lock of each subscriber's session and one
    /// wake-up of its connection per batch instead of per message. Per message, those were
    /// most of what a QoS 0 fan-out cost beyond the copying: a session's lock is also taken by
    /// its connection to drain the queue, on the other core, so each message moved that cache
    /// line across (perf: ~9 % of fan-out QoS 0 was the unlock alone). Every subscriber still
    /// gets the messages in publish order. Adds to `full` the connected subscribers whose
    /// queues they filled.
    pub fn publish_batch(&self, msgs: &mut Vec<Arc<Message>>, full: &mut Vec<Arc<SessionHandle>>) {
        let bytes = msgs.iter().map(|m| m.payload.len() as u64).sum();
        self.metrics.publish_in_n(QoS::AtMostOnce, msgs.len() as u64, bytes);
        let mut scratch = FanOutScratch::take();
        let mut next = 0;
        while next < msgs.len() {
            {
                let trie = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
                let FanOutScratch { matches, deliveries, runs, .. } = &mut scratch;
                // A publish to a crowd is delivered before the next is matched, so that the
                // copies waiting here stay few.
                while next < msgs.len() && deliveries.len() < FanOutScratch::KEEP / 2 {
                    runs.push(deliveries.len());
                    self.match_deliveries(&trie, &msgs[next], Select::All, matches, deliveries);
                    next += 1;
                }
            }
            self.deliver_grouped(&mut scratch, full);
        }
        msgs.clear();
        scratch.put_back();
    }

    /// `publish_batch`'s deliveries, each subscriber's in one go, in the order they were added
    /// (`runs`: where each message's copies start).
    fn deliver_grouped(&self, scratch: &mut FanOutScratch, full: &mut Vec<Arc<SessionHandle>>) {
        let FanOutScratch { deliveries, order, slots, runs, .. } = scratch;
        let n = deliveries.len();
        // The usual batch: every message went to the same subscribers (one topic, or topics
        // with the same subscribers), so each subscriber's copies are every `stride`-th.
        // Otherwise they are sorted by subscriber. (A message's copies go to distinct
        // subscribers but for shared subscriptions, where a client may also have a plain one.)
        let stride = runs.get(1).copied().unwrap_or(n);
        let strided =
            stride > 0
                && deliveries.iter().take(stride).all(|(_, d, _)| d.shared.is_none())
                && runs.iter().enumerate().all(|(i, &start)| start == i * stride)
                && runs.len() * stride == n
                && deliveries.iter().enumerate().skip(stride).all(|(i, (t, _, _))| {
                    deliveries.get(i % stride).is_some_and(|(first, _, _)| Arc::ptr_eq(t, first))
                });
        if strided {
            order.extend((0..stride).flat_map(|k| (k..n).step_by(stride)).map(|i| (i % stride, i)));
        } else {
            order.extend(deliveries.iter().enumerate().map(|(i, (t, _, _))| (Arc::as_ptr(t) as usize, i)));
            order.sort_unstable();
        }
        runs.clear();
        slots.extend(deliveries.drain(..).map(|(t, d, _)| Some((t, d))));
        let mut i = 0;
        while i < order.len() {
            let mut j = i + 1;
            while j < order.len() && order[j].0 == order[i].0 {
                j += 1;
            }
            let group = &order[i..j];
            i = j;
            let Some((target, first)) = group.first().and_then(|&(_, k)| slots.get_mut(k)?.take()) else { continue };
            let rest = group[1..].iter().filter_map(|&(_, k)| Some(slots.get_mut(k)?.take()?.1));
            // Drops are rare (a subscriber away or over its hard limit): counted one by one, as
            // `fan_out_with` does.
            let filled =
                target.deliver_batch(std::iter::once(first).chain(rest), |cause| self.metrics.drop_n(cause, 1));
            if filled {
                full.push(target);
            }
        }
        order.clear();
        slots.clear();
    }

    /// Publishes the broker's own `$SYS/...` value: retained (in memory only: nothing is
    /// written to the store, and it is not counted as received), QoS 0, delivered like any
    /// message, so the policy's read check decides who sees it.
    pub fn publish_sys(&self, topic: &str, payload: String) {
        let msg = Message::received(
            ByteString::from(topic),
            Bytes::from(payload),
            QoS::AtMostOnce,
            true,
            crate::protocol::Properties::default(),
            ByteString::new(),
        );
        self.fan_out_with(Arc::new(msg), None, &mut Vec::new(), false, true, Select::All);
    }

    /// `publish_flow` once counted. `durable` false is for the broker's own `$SYS` values: a
    /// retained one stays out of the store (and whole in memory), and one that does not
    /// reach an away session is not counted as dropped (it is no client's message).
    /// `retain_index` false leaves the retained index alone (messages from the cluster).
    /// `select` says which subscriptions it is for.
    fn fan_out_with(
        &self,
        msg: Arc<Message>,
        extra: Option<Op>,
        full: &mut Vec<Arc<SessionHandle>>,
        durable: bool,
        retain_index: bool,
        select: Select<'_>,
    ) -> (usize, u64) {
        let mut ops: Vec<Op> = extra.into_iter().collect();
        if msg.retain && retain_index {
            self.update_retained(&msg, &mut ops, durable);
        }
        let mut scratch = FanOutScratch::take();
        let FanOutScratch { matches, deliveries, .. } = &mut scratch;
        {
            let trie = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            self.match_deliveries(&trie, &msg, select, matches, deliveries);
        }
        let matched = deliveries.len();
        // Copies for persistent sessions reach the store before any subscriber can see (and
        // acknowledge) them, so the store never sees an ack before its message.
        let mut encoded: Option<Bytes> = None;
        let (seq, ticket) = {
            let mut gate = None;
            for (target, d, place) in deliveries.iter_mut() {
                if d.qos != QoS::AtMostOnce {
                    *place = self.assign_store_seq(target, d, &mut encoded, &mut ops, &mut gate);
                }
            }
            self.submit(ops)
        };
        if msg.retain && retain_index && durable && !msg.payload.is_empty() {
            self.retained_loaded.lock().unwrap_or_else(|e| e.into_inner()).push_back((Arc::downgrade(&msg), seq));
            self.shed_retained();
        }
        let mut cleanup = Vec::new();
        for (target, d, place) in deliveries.drain(..) {
            let seq = d.store_seq;
            let delivered = match place {
                Placement::Memory => target.deliver(d),
                Placement::Backlog(q) => target.backlogged(q),
                Placement::Dropped(cause) => Delivered::Dropped(cause),
            };
            match delivered {
                Delivered::Queued => {}
                Delivered::Full => full.push(target),
                Delivered::Dropped(cause) => {
                    if durable {
                        self.metrics.drop_n(cause, 1);
                    }
                    if let (Some(seq), Placement::Memory) = (seq, place) {
                        cleanup.push(Op::DeleteQueued { client: target.client_id.clone(), seq });
                    }
                }
            }
        }
        self.persist(cleanup);
        scratch.put_back();
        (matched, ticket)
    }

    /// Adds to `deliveries` the copies of `msg` for the subscriptions `select` picks: one per
    /// client, however many of its subscriptions match, and one per shared group.
    fn match_deliveries(
        &self,
        trie: &SubscriptionTrie<Arc<SessionHandle>>,
        msg: &Arc<Message>,
        select: Select<'_>,
        matches: &mut Vec<Matched>,
        deliveries: &mut Vec<(Arc<SessionHandle>, Delivery, Placement)>,
    ) {
        let first = deliveries.len();
        // Overlapping subscriptions of one client give one delivery at the highest QoS, with
        // every matching subscription identifier [MQTT-3.3.4-2, 3.3.4-3]. Shared
        // subscriptions are separate subscriptions: each delivers on its own.
        let mut visit = |m: Match<'_, Arc<SessionHandle>>| {
            // A clustered session gets its QoS 1/2 messages from its own consumer of the
            // cluster's stream, where every one of them goes (`Broker::forward`).
            if m.target.clustered && msg.qos != QoS::AtMostOnce && m.share.is_none() {
                return;
            }
            let sub = Matched {
                target: Arc::clone(m.target),
                options: m.options,
                subscription_id: m.subscription_id.map(NonZeroU32::get),
            };
            match m.share {
                None => matches.push(sub),
                Some(share) => {
                    if let Some(mut d) = merge(msg, std::slice::from_ref(&sub)) {
                        d.shared = Some(share.clone());
                        deliveries.push((sub.target, d, Placement::Memory));
                    }
                }
            }
        };
        match select {
            Select::All => trie.visit_matches(&msg.topic, visit),
            Select::Plain => trie.visit_matches(&msg.topic, |m| {
                if m.share.is_none() {
                    visit(m);
                }
            }),
            Select::Share { group, filter } => {
                if let Some(m) = trie.pick_shared(filter, group) {
                    visit(m);
                }
            }
        }
        matches.sort_by_key(|e| Arc::as_ptr(&e.target) as usize);
        let mut i = 0;
        while i < matches.len() {
            let mut j = i + 1;
            while j < matches.len() && Arc::ptr_eq(&matches[j].target, &matches[i].target) {
                j += 1;
            }
            if let Some(d) = merge(msg, &matches[i..j]) {
                deliveries.push((Arc::clone(&matches[i].target), d, Placement::Memory));
            }
            i = j;
        }
        matches.clear();
        if !self.config.priority.is_empty() {
            let level = self.priority_of(&msg.topic);
            for (_, d, _) in &mut deliveries[first..] {
                d.priority = level;
            }
        }
    }

    /// Gives a persistent session's copy its durable-queue key and the store op writing it,
    /// and says where the copy waits: in the session's queue in memory (the caller delivers
    /// it), already counted in its backlog in the store, or nowhere (the backlog is at its
    /// limit: dropped, counted, nothing written). For a persistent session it takes
    /// `store_gate` shared into `gate` (before the session's lock: the gate is always taken
    /// first); callers keep it until the op is submitted.
    fn assign_store_seq<'a>(
        &'a self,
        target: &SessionHandle,
        d: &mut Delivery,
        encoded: &mut Option<Bytes>,
        ops: &mut Vec<Op>,
        gate: &mut Option<std::sync::RwLockReadGuard<'a, ()>>,
    ) -> Placement {
        let (seq, place) = {
            let mut cell = target.lock();
            if !cell.persistent() {
                return Placement::Memory;
            }
            if gate.is_none() {
                drop(cell);
                *gate = Some(self.store_gate.read().unwrap_or_else(|e| e.into_inner()));
                cell = target.lock();
                if !cell.persistent() {
                    return Placement::Memory;
                }
            }
            let seq = cell.next_store_seq;
            // A client that is away, or one still catching up on its backlog, gets its copy
            // on disk only: memory stays free however much waits for it.
            let place = if cell.state.backlogged() || (cell.owner == 0 && self.backlogs_on_disk) {
                let connected = cell.owner != 0;
                match cell.state.backlog_push(seq, d.msg.held_bytes(), connected) {
                    Ok(q) => Placement::Backlog(q),
                    Err(why) => {
                        if cell.state.dropped.is_power_of_two() {
                            tracing::warn!(client_id = %target.client_id, dropped = cell.state.dropped, "session queue full, message dropped");
                        }
                        return Placement::Dropped(why.into());
                    }
                }
            } else {
                Placement::Memory
            };
            cell.next_store_seq += 1;
            (seq, place)
        };
        let body = encoded.get_or_insert_with(|| {
            let mut b = BytesMut::new();
            records::encode_message(&d.msg, &mut b);
            b.freeze()
        });
        d.store_seq = Some(seq);
        ops.push(Op::PutQueued {
            client: target.client_id.clone(),
            seq,
            value: records::encode_queued_parts(d.qos, d.retain, &d.subscription_ids, body),
        });
        place
    }

    /// Queues retained messages sent on subscribe: they wait in the session's retained
    /// cursor (a few bytes each) and are read into its queue as it drains.
    pub fn deliver_retained(&self, handle: &Arc<SessionHandle>, batch: RetainedBatch) {
        if batch.loaded.is_empty() && batch.stored.is_empty() {
            return;
        }
        handle.push_retained(batch);
    }

    /// Makes the read a session's queue asked for (`SessionState::wants_load`: its backlog,
    /// or retained messages that are only in the store), off the caller's task; the
    /// session's connection is woken when the messages are queued.
    pub fn start_load(self: &Arc<Self>, handle: &Arc<SessionHandle>, load: Load) {
        let broker = Arc::clone(self);
        let handle = Arc::clone(handle);
        tokio::spawn(async move {
            match load {
                Load::Retained(topics) => {
                    let read = broker.read_retained_topics(topics).await;
                    handle.retained_loaded(read);
                }
                Load::Backlog { from, to, max, max_bytes, recovered_through } => {
                    broker.load_backlog(&handle, (from, to), (max, max_bytes), recovered_through).await
                }
            }
        });
    }

    /// Reads a chunk of a session's backlog and queues it.
    async fn load_backlog(
        self: &Arc<Self>,
        handle: &Arc<SessionHandle>,
        (from, to): (u64, u64),
        (max, max_bytes): (usize, usize),
        recovered_through: u64,
    ) {
        let Some(reader) = self.store.queue_reader() else {
            handle.lock().state.load_failed();
            return;
        };
        // Every key up to `to` was given out before this load was asked for, by publishers
        // that submit its write before letting go of the gate: once the gate is ours for a
        // moment, waiting for what is submitted now covers them all.
        let submitted = {
            let _gate = self.store_gate.write().unwrap_or_else(|e| e.into_inner());
            self.store.last_submitted()
        };
        if self.store.outcome(submitted).is_none() {
            let waiter = Arc::new(ConnControl::default());
            self.wait_durable(submitted, &waiter);
            while self.store.outcome(submitted).is_none() {
                std::future::poll_fn(|cx| waiter.poll_signals(cx)).await;
            }
        }
        let client = handle.client_id.clone();
        let read = tokio::task::spawn_blocking(move || reader.read(&client, from, to, max, max_bytes)).await;
        let (entries, through) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(client_id = %handle.client_id, error = %e, "queued messages unreadable; retried when the client next drains");
                handle.lock().state.load_failed();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "queue read task failed");
                handle.lock().state.load_failed();
                return;
            }
        };
        let now = Instant::now();
        let mut ds = Vec::with_capacity(entries.len());
        let mut expired = Vec::new();
        for (seq, rec, state) in entries {
            if state.is_none() && rec.message.is_expired(now) {
                expired.push(Op::DeleteQueued { client: handle.client_id.clone(), seq });
                continue;
            }
            // Found at start-up, it may have gone out before a crash (QoS 1 sends are not
            // recorded): a duplicate is allowed if flagged. Messages that went to the backlog
            // since were never sent (those sent stay in flight, in memory).
            let maybe_sent = rec.qos == QoS::AtLeastOnce && seq <= recovered_through;
            ds.push(self.stored_delivery(seq, rec, maybe_sent));
        }
        self.persist(expired);
        handle.backlog_loaded(ds, through);
    }

    /// A delivery read back from the session's durable queue (key `seq`).
    fn stored_delivery(&self, seq: u64, rec: crate::store::QueuedRecord, maybe_sent: bool) -> Delivery {
        Delivery {
            priority: self.priority_of(&rec.message.topic),
            msg: rec.message,
            qos: rec.qos,
            retain: rec.retain,
            subscription_ids: rec.subscription_ids,
            store_seq: Some(seq),
            shared: None,
            maybe_sent,
            stream_seq: 0,
        }
    }

    /// Reads retained messages held only in the store, by topic: None for a topic whose
    /// message is no longer retained there (cleared, expired, or replaced by a newer one,
    /// which its subscribers received when it was published).
    async fn read_retained_topics(
        self: &Arc<Self>,
        topics: Vec<ByteString>,
    ) -> Vec<(ByteString, Option<Arc<Message>>)> {
        let Some(reader) = self.store.retained_reader() else {
            return topics.into_iter().map(|t| (t, None)).collect();
        };
        let broker = Arc::clone(self);
        let read = tokio::task::spawn_blocking(move || {
            let now = Instant::now();
            topics
                .into_iter()
                .map(|topic| {
                    let m = match reader.get(&topic) {
                        Ok(Some(m)) if !m.is_expired(now) => {
                            let trie = broker.retained.read().unwrap_or_else(|e| e.into_inner());
                            matches!(trie.get(&topic), Some(Retained::Stored { .. })).then_some(m)
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(topic = %topic, error = %e, "retained message unreadable");
                            None
                        }
                    };
                    (topic, m)
                })
                .collect::<Vec<_>>()
        });
        read.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "retained read task failed");
            Vec::new()
        })
    }

    fn update_retained(&self, msg: &Arc<Message>, ops: &mut Vec<Op>, durable: bool) {
        let mut trie = self.retained.write().unwrap_or_else(|e| e.into_inner());
        if msg.payload.is_empty() {
            // An empty retained payload clears the topic [MQTT-3.3.1-10].
            if trie.remove(&msg.topic).is_some() && durable {
                ops.push(Op::DeleteRetained { topic: msg.topic.clone() });
            }
        } else {
            trie.insert(&msg.topic, Retained::Loaded(Arc::clone(msg)));
            if !durable {
                return;
            }
            let mut b = BytesMut::new();
            records::encode_message(msg, &mut b);
            ops.push(Op::PutRetained { topic: msg.topic.clone(), value: b.freeze() });
        }
    }
}

/// One delivery for one client out of all its matching subscriptions, or None when No Local
/// excludes them all.
/// One subscription a publish matched, as `fan_out` keeps it: what `merge` needs and no more
/// (the trie's `Entry` also clones the client name: two more atomic counts per delivery).
struct Matched {
    target: Arc<SessionHandle>,
    options: SubscriptionOptions,
    subscription_id: Option<u32>,
}

/// `fan_out`'s lists, kept per thread so a publish allocates none: growing two vectors to
/// 16 subscribers took ~5 % of a fan-out's instructions (callgrind). Taken while in use, so
/// a nested fan-out would simply start with empty ones.
#[derive(Default)]
struct FanOutScratch {
    matches: Vec<Matched>,
    deliveries: Vec<(Arc<SessionHandle>, Delivery, Placement)>,
    /// `deliver_grouped`'s (subscriber, position) sort and the deliveries it takes out.
    order: Vec<(usize, usize)>,
    slots: Vec<Option<(Arc<SessionHandle>, Delivery)>>,
    /// Where each message of a batch starts in `deliveries`.
    runs: Vec<usize>,
}

thread_local! {
    static FAN_OUT_SCRATCH: std::cell::Cell<FanOutScratch> = std::cell::Cell::new(FanOutScratch::default());
}

impl FanOutScratch {
    /// Lists longer than this (a publish to a crowd) are freed after use, not kept per thread.
    const KEEP: usize = 1024;

    fn take() -> Self {
        FAN_OUT_SCRATCH.with(std::cell::Cell::take)
    }

    /// Returns the (emptied) lists for the thread's next publish.
    fn put_back(mut self) {
        self.matches.clear();
        self.deliveries.clear();
        self.order.clear();
        self.slots.clear();
        self.runs.clear();
        if [self.matches.capacity(), self.deliveries.capacity(), self.order.capacity(), self.slots.capacity()]
            .iter()
            .all(|&c| c <= Self::KEEP)
        {
            FAN_OUT_SCRATCH.with(|s| s.set(self));
        }
    }
}

fn merge(msg: &Arc<Message>, group: &[Matched]) -> Option<Delivery> {
    let mut qos = None::<QoS>;
    let mut retain = false;
    let mut ids = Vec::new();
    for e in group {
        // No Local: never back to the publisher's own connection [MQTT-3.8.3-3].
        if e.options.no_local && e.target.client_id == msg.origin {
            continue;
        }
        let q = msg.qos.min(e.options.qos);
        qos = Some(qos.map_or(q, |old| old.max(q)));
        retain |= e.options.retain_as_published && msg.retain;
        if let Some(id) = e.subscription_id {
            ids.push(id);
        }
    }
    Some(Delivery {
        msg: Arc::clone(msg),
        qos: qos?,
        retain,
        subscription_ids: ids,
        store_seq: None,
        shared: None,
        maybe_sent: false,
        priority: 0,
        stream_seq: 0,
    })
}

/// Which subscriptions a fan-out is for.
#[derive(Clone, Copy)]
enum Select<'a> {
    /// Every matching one (one member of each shared group).
    All,
    /// All but shared groups (in a cluster, those get messages through it).
    Plain,
    /// One member of one shared group, for a message the cluster gave this node for it.
    Share { group: &'a str, filter: &'a str },
}

/// `$share/group/filter` -> (Some(group), filter); anything else -> (None, filter).
fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Some((g, f)) => (Some(g), f),
        None => (None, filter),
    }
}
