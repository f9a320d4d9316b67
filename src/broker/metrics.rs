//! The broker's counters and gauges, and the snapshot of its state that `$SYS`, Prometheus
//! and the status page report (`sys/` reads them; the counting happens where the events do).
//!
//! Counting must not slow the paths it watches: a publish is counted once on its
//! publisher's side, deliveries once per drained batch (per QoS, summed locally first), bytes
//! and packets once per socket read or write. What would need a shared write per delivery
//! (queue depths, sessions, subscriptions) is instead gathered when someone asks
//! (`Broker::stats`), at most a few times a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::Broker;
use crate::config::Config;
use crate::protocol::QoS;
use crate::session::Dropped;
use crate::store::LatencySnapshot;

/// Why a message did not reach a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// The session's queue was at `limits.max_queued_messages` / `max_queued_bytes` (a client
    /// that is away, or over twice the bound while connected).
    QueueFull,
    /// Queues together held twice `limits.max_queued_memory`.
    Memory,
    /// QoS 0 for a client that is away (not queued, as mosquitto does by default), or for a
    /// session that ended meanwhile.
    Offline,
    /// Its Message Expiry Interval ran out while it waited.
    Expired,
    /// The client's right to read it was revoked before it went out (ACL reload).
    NotAuthorized,
    /// Larger than the client's Maximum Packet Size (v5).
    TooLarge,
}

impl DropCause {
    pub const ALL: [DropCause; 6] = [
        DropCause::QueueFull,
        DropCause::Memory,
        DropCause::Offline,
        DropCause::Expired,
        DropCause::NotAuthorized,
        DropCause::TooLarge,
    ];

    /// Its label in `tern_messages_dropped_total{cause}` and its `$SYS/broker/tern/dropped/`
    /// topic.
    pub fn name(self) -> &'static str {
        match self {
            DropCause::QueueFull => "queue_full",
            DropCause::Memory => "memory",
            DropCause::Offline => "offline",
            DropCause::Expired => "expired",
            DropCause::NotAuthorized => "not_authorized",
            DropCause::TooLarge => "too_large",
        }
    }
}

impl From<Dropped> for DropCause {
    fn from(d: Dropped) -> Self {
        match d {
            Dropped::QueueFull => DropCause::QueueFull,
            Dropped::Memory => DropCause::Memory,
        }
    }
}

/// A counter on a cache line of its own: the hot ones are written by publishers' and
/// subscribers' tasks on different cores, and sharing a line would bounce it between them on
/// every publish and every flush.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Line<T>(pub T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Counters and gauges kept as things happen. Counters only grow; gauges go up and down.
#[derive(Debug)]
pub struct Metrics {
    /// When the broker started (uptime).
    pub started: Instant,
    /// PUBLISH packets received (from clients, bridges, in-process clients and wills), by QoS.
    pub publish_received: Line<[AtomicU64; 3]>,
    /// Their payload bytes, by QoS.
    pub publish_bytes_received: Line<[AtomicU64; 3]>,
    /// PUBLISH packets sent (counted per drained batch), by the QoS they went out with.
    pub publish_sent: Line<[AtomicU64; 3]>,
    pub publish_bytes_sent: Line<[AtomicU64; 3]>,
    /// MQTT packets of every kind received from network clients (mosquitto's
    /// `messages/received`), counted per read.
    pub packets_received: Line<AtomicU64>,
    /// MQTT packets of every kind written to network clients, counted per write.
    pub packets_sent: Line<AtomicU64>,
    /// Bytes read from and written to network clients' sockets.
    pub bytes_received: Line<AtomicU64>,
    pub bytes_sent: Line<AtomicU64>,
    /// Messages that did not reach a subscriber, by `DropCause` (in `DropCause::ALL` order).
    pub dropped: [AtomicU64; 6],
    /// Sessions attached (CONNECTs accepted, in-process and bridge attachments included).
    pub connections_total: AtomicU64,
    /// Sessions of clients that stayed away past their expiry interval, ended.
    pub sessions_expired: AtomicU64,
    /// Subscribers disconnected because their full queue made no progress
    /// (`limits.slow_consumer_secs`).
    pub slow_consumers: AtomicU64,
    /// Acknowledgements connections hold until the store has made their effects durable
    /// (a gauge; each connection holds at most `limits.max_held_acks`).
    pub acks_held: Line<AtomicU64>,
    /// Connections whose publishes wait for a full subscriber's queue (flow control), now.
    pub publishers_waiting: AtomicU64,
    /// Times a connection started waiting so.
    pub flow_waits: AtomicU64,
    /// Connections not read because the store's backlog is over `storage.max_pending_bytes`
    /// or they hold `limits.max_held_acks`, now.
    pub inputs_paused: AtomicU64,
    /// Each `[[bridge]]`'s name (config order) and whether it is connected to its peer.
    pub bridges: Box<[(Box<str>, AtomicBool)]>,
    /// The cluster's routes (`[cluster]`); all zero on a single node.
    pub cluster: ClusterMetrics,
}

/// What the cluster (`[cluster]`) counts. Written on the cluster's own tasks, never per
/// delivery.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// 1 while connected to a NATS server.
    pub connected: AtomicBool,
    /// Messages of this node's clients handed to NATS.
    pub forwarded: AtomicU64,
    /// Messages from other nodes delivered here.
    pub received: AtomicU64,
    /// QoS 1/2 publishes whose acknowledgement was refused because NATS/JetStream did not
    /// take the message in time (`cluster.ack_timeout_ms`) or was unreachable.
    pub ack_failures: AtomicU64,
    /// QoS 0 messages or retained updates NATS could not take (lost for other nodes).
    pub publish_errors: AtomicU64,
    /// Client ids this node took over from another node (its client closed with 0x8E).
    pub takeovers: AtomicU64,
    /// CONNECTs refused because their client id could not be claimed (too many claims at
    /// once, NATS unreachable, or lost to another node's claim).
    pub claims_refused: AtomicU64,
}

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        Metrics {
            started: Instant::now(),
            publish_received: Default::default(),
            publish_bytes_received: Default::default(),
            publish_sent: Default::default(),
            publish_bytes_sent: Default::default(),
            packets_received: Line::default(),
            packets_sent: Line::default(),
            bytes_received: Line::default(),
            bytes_sent: Line::default(),
            dropped: Default::default(),
            connections_total: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            acks_held: Line::default(),
            publishers_waiting: AtomicU64::new(0),
            flow_waits: AtomicU64::new(0),
            inputs_paused: AtomicU64::new(0),
            bridges: config.bridge.iter().map(|b| (b.name.clone().into_boxed_str(), AtomicBool::new(false))).collect(),
            cluster: ClusterMetrics::default(),
        }
    }

    /// `n` messages dropped for `cause`.
    pub fn drop_n(&self, cause: DropCause, n: u64) {
        let i = DropCause::ALL.iter().position(|&c| c == cause).unwrap_or(0);
        if let Some(c) = self.dropped.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One publish received at `qos` with `payload` bytes.
    #[inline]
    pub fn publish_in(&self, qos: QoS, payload: usize) {
        let i = qos as usize;
        if let (Some(n), Some(b)) = (self.publish_received.get(i), self.publish_bytes_received.get(i)) {
            n.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(payload as u64, Ordering::Relaxed);
        }
    }

    /// `n` publishes received at `qos` with `payload` bytes in all.
    pub fn publish_in_n(&self, qos: QoS, n: u64, payload: u64) {
        let i = qos as usize;
        if let (Some(c), Some(b)) = (self.publish_received.get(i), self.publish_bytes_received.get(i)) {
            c.fetch_add(n, Ordering::Relaxed);
            b.fetch_add(payload, Ordering::Relaxed);
        }
    }

    /// A drained batch: messages and payload bytes sent per QoS.
    pub fn publish_out(&self, sent: &[(u64, u64); 3]) {
        for ((n, b), &(count, bytes)) in self.publish_sent.iter().zip(self.publish_bytes_sent.iter()).zip(sent) {
            if count > 0 {
                n.fetch_add(count, Ordering::Relaxed);
                b.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }

    /// A bridge's connection to its peer came up or went down.
    pub fn set_bridge(&self, name: &str, up: bool) {
        if let Some((_, s)) = self.bridges.iter().find(|(n, _)| &**n == name) {
            s.store(up, Ordering::Relaxed);
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn loads<const N: usize>(a: &[AtomicU64; N]) -> [u64; N] {
    let mut out = [0; N];
    for (o, a) in out.iter_mut().zip(a) {
        *o = load(a);
    }
    out
}

/// Everything reported about the broker, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub uptime_secs: u64,
    /// Sessions held, connected or not (mosquitto's `clients/total`).
    pub sessions: u64,
    /// Sessions with a connection attached (network, bridge or in-process).
    pub connected: u64,
    pub connections_total: u64,
    pub sessions_expired: u64,
    pub subscriptions: u64,
    /// Retained messages, without the broker's own `$SYS` tree.
    pub retained: u64,
    /// Messages waiting in sessions' queues (in memory and on disk) and in flight.
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub inflight: u64,
    /// Queue memory counted against `limits.max_queued_memory`.
    pub queued_memory: u64,
    pub publish_received: [u64; 3],
    pub publish_bytes_received: [u64; 3],
    pub publish_sent: [u64; 3],
    pub publish_bytes_sent: [u64; 3],
    pub packets_received: u64,
    pub packets_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub dropped: [u64; 6],
    pub slow_consumers: u64,
    pub acks_held: u64,
    pub publishers_waiting: u64,
    pub flow_waits: u64,
    pub inputs_paused: u64,
    pub store_pending_bytes: u64,
    /// Why the store is fatal, if it is.
    pub store_failure: Option<String>,
    pub commit_latency: LatencySnapshot,
    pub bridges: Vec<(String, bool)>,
    /// Some in a cluster: connected to NATS, forwarded, received, ack failures, publish errors.
    pub cluster: Option<ClusterStats>,
}

/// The cluster's part of `Stats`.
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    pub connected: bool,
    pub forwarded: u64,
    pub received: u64,
    pub ack_failures: u64,
    pub publish_errors: u64,
    pub takeovers: u64,
    pub claims_refused: u64,
}

impl Stats {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

impl Broker {
    /// Gathers `Stats`: reads the counters and walks the sessions (each locked for a moment,
    /// never two at once), O(sessions). For reporters, which ask every few seconds.
    pub fn stats(&self) -> Stats {
        let m = &self.metrics;
        let mut s = Stats {
            uptime_secs: m.started.elapsed().as_secs(),
            connections_total: load(&m.connections_total),
            sessions_expired: load(&m.sessions_expired),
            publish_received: loads(&m.publish_received),
            publish_bytes_received: loads(&m.publish_bytes_received),
            publish_sent: loads(&m.publish_sent),
            publish_bytes_sent: loads(&m.publish_bytes_sent),
            packets_received: load(&m.packets_received),
            packets_sent: load(&m.packets_sent),
            bytes_received: load(&m.bytes_received),
            bytes_sent: load(&m.bytes_sent),
            dropped: loads(&m.dropped),
            slow_consumers: load(&m.slow_consumers),
            acks_held: load(&m.acks_held),
            publishers_waiting: load(&m.publishers_waiting),
            flow_waits: load(&m.flow_waits),
            inputs_paused: load(&m.inputs_paused),
            store_pending_bytes: self.store.pending_bytes() as u64,
            store_failure: self.store.fatal().map(|e| e.to_string()),
            commit_latency: self.store.commit_latency().snapshot(),
            queued_memory: self.queued_memory() as u64,
            retained: self.app_retained_count() as u64,
            bridges: m.bridges.iter().map(|(n, up)| (n.to_string(), up.load(Ordering::Relaxed))).collect(),
            cluster: self.config.cluster.is_some().then(|| ClusterStats {
                connected: m.cluster.connected.load(Ordering::Relaxed),
                forwarded: load(&m.cluster.forwarded),
                received: load(&m.cluster.received),
                ack_failures: load(&m.cluster.ack_failures),
                publish_errors: load(&m.cluster.publish_errors),
                takeovers: load(&m.cluster.takeovers),
                claims_refused: load(&m.cluster.claims_refused),
            }),
            ..Stats::default()
        };
        for entry in self.sessions.iter() {
            let cell = entry.value().lock();
            if cell.ended {
                continue;
            }
            s.sessions += 1;
            if cell.owner != 0 {
                s.connected += 1;
            }
            s.subscriptions += cell.subscriptions.len() as u64;
            let (count, bytes) = cell.state.waiting();
            s.queued_messages += count as u64;
            s.queued_bytes += bytes as u64;
            s.inflight += cell.state.inflight_len() as u64;
        }
        s
    }

    /// How long the store's group commits take.
    pub fn commit_latency(&self) -> &crate::store::CommitLatency {
        self.store.commit_latency()
    }

    /// Retained messages but for the `$SYS` tree (the broker's own, and bridges' state
    /// topics), which would otherwise count as application data.
    pub fn app_retained_count(&self) -> usize {
        let trie = self.retained.read().unwrap_or_else(|e| e.into_inner());
        // "$SYS/#" matches only `$SYS` topics (and "$SYS" itself): `#` never matches `$`.
        let mut sys = Vec::new();
        trie.matches("$SYS/#", &mut sys);
        trie.len().saturating_sub(sys.len())
    }
}
