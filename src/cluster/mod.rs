//! A tern cluster over NATS JetStream (`[cluster]`): several nodes, one broker to clients.
//!
//! Owns this node's NATS connection and what travels on it. Messages this node's clients
//! publish go out (`routes`): QoS 0 on core NATS (`<name>.q0.<topic>`), QoS 1/2 into the
//! `<NAME>_MSGS` stream (`<name>.m.<topic>`), whose JetStream acknowledgement the
//! publisher's PUBACK/PUBREC waits for, retained updates also into `<NAME>_RETAINED`
//! (`<name>.r.<topic>`, one message per subject). Messages of other nodes come in
//! (`inbound`): QoS 0 through core subscriptions that follow this node's subscriptions, QoS
//! 1/2 through this node's durable consumer of the messages stream, retained updates through
//! an ordered consumer applied in stream order. Topics become subjects by `subject`.
//! Shared subscriptions (`shares`) take their messages through NATS only, each message to
//! one node of the group: a core queue subscription for QoS 0, a durable consumer per
//! (group, filter) pulled by every node with members for QoS 1/2. Wills of this node's
//! clients are kept in a bucket, and a dead node's are published by a survivor (`wills`).
//!
//! Drives the broker through its cluster seam (`broker::ClusterRoutes`); the broker knows
//! nothing of NATS. Knows nothing of sockets or MQTT packets. Client-id ownership across
//! nodes is `owners`: a JetStream key-value bucket written by compare-and-set. Persistent
//! sessions are `sessions`: a record per session in a second bucket and a durable consumer
//! per session of the messages stream, from which alone their QoS 1/2 messages come (the
//! local fan-out and this node's consumer leave them out), so any node can take one on.

mod inbound;
pub mod owners;
mod routes;
mod sessions;
mod shares;
pub(crate) mod subject;
mod wills;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::Cluster as ClusterConfig;
use crate::message::Message;
use crate::store::records;

/// The header naming the node a message comes from: a node skips its own (it delivered them
/// locally when its client published them).
const NODE_HEADER: &str = "Tern-Node";

/// Longest subject sent: NATS refuses a protocol line over its `max_control_line` (4 KiB by
/// default), which the subject is part of. Longer topics are not routed (counted, and a QoS
/// 1/2 publisher hears a failure).
const MAX_SUBJECT: usize = 3_900;

/// Names of everything this cluster uses in NATS, from `cluster.name`.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub node: String,
    pub q0: String,
    pub msgs: String,
    pub retained: String,
    pub msgs_stream: String,
    pub retained_stream: String,
}

impl Names {
    fn new(cfg: &ClusterConfig) -> Names {
        let upper = cfg.name.to_ascii_uppercase();
        Names {
            node: cfg.node.clone(),
            q0: format!("{}.q0", cfg.name),
            msgs: format!("{}.m", cfg.name),
            retained: format!("{}.r", cfg.name),
            msgs_stream: format!("{upper}_MSGS"),
            retained_stream: format!("{upper}_RETAINED"),
        }
    }
}

/// Connects to NATS (retrying while it is unreachable), creates or updates the streams and
/// this node's consumer, loads the retained messages, starts following the other nodes and
/// installs the routes in the broker. Returns once this node is part of the cluster; never
/// gives up (each failed step is logged and retried).
pub async fn start(broker: &Arc<Broker>, cfg: &ClusterConfig) {
    let names = Arc::new(Names::new(cfg));
    let client = connect(broker, cfg).await;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_millis(cfg.ack_timeout_ms));
    let (msgs, retained) = retry("stream set-up", || streams(&js, cfg, &names)).await;
    let node_consumer = retry("node consumer set-up", || node_consumer(&msgs, &names)).await;
    inbound::load_retained(broker, retained, &names).await;
    tokio::spawn(inbound::follow_messages(Arc::downgrade(broker), node_consumer, Arc::clone(&names)));
    // Before any client is accepted: every CONNECT claims its client id from now on.
    retry("client id owners set-up", || {
        owners::Owners::start(
            client.clone(),
            js.clone(),
            &cfg.node,
            &cfg.name,
            cfg.replicas(),
            cfg.max_pending_claims,
            broker,
        )
    })
    .await;
    retry("cluster sessions set-up", || {
        sessions::Sessions::start(&js, msgs.clone(), Arc::clone(&names), &cfg.name, cfg.replicas(), broker)
    })
    .await;
    let routes = routes::Routes::start(broker, client, js.clone(), cfg, names);
    if broker.install_cluster(routes).is_err() {
        warn!("cluster routes were already installed; the second start is ignored");
    }
    // After the routes: leftover wills of this node's previous run go to every node.
    retry("wills set-up", || wills::start(broker, &js, cfg)).await;
    info!(node = %cfg.node, "node joined the cluster");
}

/// Messages a NATS subscription holds for its task, at most (beyond it NATS's client drops
/// them: slow-consumer events, counted and logged). The task behind a QoS 0 subscription
/// reads on while it waits for a full subscriber (within `inbound::MAX_QOS0_WAITING_BYTES`),
/// so this only covers the moments it is not scheduled: 2,048 did not on this 2-core machine
/// under a fan-in burst (a quarter lost across 2 nodes), async-nats's default of 65,536 did
/// (nothing lost in 6 runs). Stated here so that the bound is a choice.
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// The options of the NATS connection: credentials, TLS, the events logged.
async fn options(
    broker: &Arc<Broker>,
    cfg: &ClusterConfig,
    server: Arc<OnceLock<async_nats::Client>>,
) -> async_nats::ConnectOptions {
    // The credentials file first: reading it consumes the options, and a failure must not
    // take the rest (user, token, capacity) with it. Without it the server refuses the node
    // if it needs it, which the connection log then says.
    let mut o = match &cfg.creds_file {
        Some(path) => match async_nats::ConnectOptions::with_credentials_file(path).await {
            Ok(o) => o,
            Err(e) => {
                warn!(node = %cfg.node, path = %path.display(), error = %e, "cluster.creds_file unusable; connecting without it");
                async_nats::ConnectOptions::new()
            }
        },
        None => async_nats::ConnectOptions::new(),
    };
    o = o.name(format!("tern-{}", cfg.node)).subscription_capacity(SUBSCRIPTION_CAPACITY);
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        o = o.token(t.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    let node = cfg.node.clone();
    let weak = Arc::downgrade(broker);
    let slow_log = Arc::new(RateLimited::new());
    o.event_callback(move |event| {
        let node = node.clone();
        let weak = weak.clone();
        let server = Arc::clone(&server);
        let slow_log = Arc::clone(&slow_log);
        async move {
            // Unset until `connect` has logged the first connection itself.
            let Some(client) = server.get() else { return };
            let url = server_name(client);
            let set = |up: bool| {
                if let Some(b) = weak.upgrade() {
                    b.metrics.cluster.connected.store(up, Ordering::Relaxed);
                }
            };
            match event {
                async_nats::Event::Connected => {
                    set(true);
                    info!(node = %node, server = %url, "connected to NATS");
                }
                async_nats::Event::Disconnected => {
                    set(false);
                    warn!(node = %node, server = %url, "disconnected from NATS; QoS 1/2 acknowledgements are refused until it is back");
                }
                other @ async_nats::Event::SlowConsumer(_) => {
                    // One per message NATS's client dropped: counted, logged now and then.
                    if let Some(b) = weak.upgrade() {
                        b.metrics.drop_n(crate::broker::DropCause::Memory, 1);
                    }
                    if let Some(skipped) = slow_log.check() {
                        warn!(node = %node, server = %url, event = %other, similar_not_logged = skipped, "NATS dropped messages for this node (it read too slowly)");
                    }
                }
                other => warn!(node = %node, server = %url, event = %other, "NATS connection event"),
            }
        }
    })
    .retry_on_initial_connect()
    .max_reconnects(None)
    .connection_timeout(Duration::from_secs(2))
}

/// The NATS connection, once established: until then the client keeps trying every url
/// (logged every 10 s) and the broker does not start accepting clients.
async fn connect(broker: &Arc<Broker>, cfg: &ClusterConfig) -> async_nats::Client {
    let server = Arc::new(OnceLock::new());
    loop {
        let o = options(broker, cfg, Arc::clone(&server)).await;
        let client = match o.connect(cfg.nats.as_slice()).await {
            Ok(c) => c,
            Err(e) => {
                warn!(node = %cfg.node, nats = ?cfg.nats, error = %e, "cannot connect to NATS; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let started = tokio::time::Instant::now();
        let mut next_log = started;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= next_log {
                warn!(node = %cfg.node, nats = ?cfg.nats, "NATS unreachable; retrying, clients are not accepted until it answers");
                next_log += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(node = %cfg.node, server = %server_name(&client), "connected to NATS");
        let _ = server.set(client.clone());
        broker.metrics.cluster.connected.store(true, Ordering::Relaxed);
        return client;
    }
}

/// The NATS server a client is connected to, for log lines.
fn server_name(c: &async_nats::Client) -> String {
    let i = c.server_info();
    format!("{} ({}:{})", i.server_name, i.host, i.port)
}

/// Runs `step` until it succeeds, logging each failure (JetStream may be electing its
/// leaders for a few seconds after the NATS cluster starts).
async fn retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut step: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(250);
    loop {
        match step().await {
            Ok(t) => return t,
            Err(e) => {
                warn!(error = %e, "cluster {what} failed; retrying in {:?}", delay);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Creates the two streams, or updates them to the configuration (replicas, limits).
async fn streams(
    js: &jetstream::Context,
    cfg: &ClusterConfig,
    names: &Names,
) -> Result<(stream::Stream, stream::Stream), async_nats::Error> {
    // Without `replicas` in the configuration, an existing stream keeps its own: nodes
    // listing different NATS urls would otherwise each set theirs, back and forth.
    let replicas = match (cfg.replicas, js.get_stream(&names.msgs_stream).await) {
        (None, Ok(mut existing)) => existing.info().await?.config.num_replicas,
        _ => cfg.replicas(),
    };
    js.create_or_update_stream(stream::Config {
        name: names.msgs_stream.clone(),
        subjects: vec![format!("{}.>", names.msgs)],
        num_replicas: replicas,
        max_age: Duration::from_secs(cfg.max_age_secs),
        max_bytes: cfg.max_bytes,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    })
    .await?;
    js.create_or_update_stream(stream::Config {
        name: names.retained_stream.clone(),
        subjects: vec![format!("{}.>", names.retained)],
        num_replicas: replicas,
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok((js.get_stream(&names.msgs_stream).await?, js.get_stream(&names.retained_stream).await?))
}

/// This node's durable pull consumer of the messages stream: every QoS 1/2 message of the
/// cluster (JetStream 2.9 allows one filter per consumer, so a node reads all of them and
/// keeps what its subscriptions match), acknowledged once its local copies are durable.
async fn node_consumer(msgs: &stream::Stream, names: &Names) -> Result<consumer::PullConsumer, async_nats::Error> {
    Ok(msgs
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names.node.clone()),
            filter_subject: format!("{}.>", names.msgs),
            ack_policy: consumer::AckPolicy::Explicit,
            // A node that joins starts with what is published from then on; one that comes
            // back resumes where its consumer was.
            deliver_policy: consumer::DeliverPolicy::New,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?)
}

/// A message as it travels between nodes: the store's record encoding (topic, payload, v5
/// properties, expiry), so nothing is lost on the way.
fn encode(msg: &Message) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.topic.len() + msg.payload.len() + msg.props_v5.len() + 32);
    records::encode_message(msg, &mut b);
    b.freeze()
}

/// The next message a JetStream consumer hands over, past its errors (logged as `what`, at
/// most every 5 s); None once its stream of messages has ended.
pub(crate) async fn next_message<T, E: std::fmt::Display>(
    messages: &mut (impl futures_util::Stream<Item = Result<T, E>> + Unpin),
    log: &RateLimited,
    what: &str,
) -> Option<T> {
    use futures_util::StreamExt;
    while let Some(item) = messages.next().await {
        match item {
            Ok(m) => return Some(m),
            Err(e) => {
                if let Some(skipped) = log.check() {
                    warn!(error = %e, similar_not_logged = skipped, "{what}");
                }
            }
        }
    }
    None
}

/// Logs a repeated problem at most once per `EVERY`, with how many were not logged.
pub(crate) struct RateLimited {
    last: AtomicU64,
    skipped: AtomicU64,
}

impl RateLimited {
    const EVERY_MS: u64 = 5_000;

    pub const fn new() -> RateLimited {
        RateLimited { last: AtomicU64::new(0), skipped: AtomicU64::new(0) }
    }

    /// Some(number not logged since the last time) when this one is to be logged.
    pub fn check(&self) -> Option<u64> {
        let now = records::now_unix_ms();
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= Self::EVERY_MS
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}
