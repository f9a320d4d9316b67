//! What this node sends to the others: its clients' messages (one task publishing them to
//! NATS in order, their JetStream acknowledgements completing the publishers' held acks)
//! and its subscriptions' interest (one task keeping a core NATS subscription per filter).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytestring::ByteString;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::inbound::{self, Interest};
use super::shares;
use super::{encode, subject, Names, RateLimited, MAX_SUBJECT, NODE_HEADER};
use crate::broker::{signal, Broker, ClusterRoutes, ConnControl, Replicated};
use crate::config::Cluster as ClusterConfig;
use crate::message::Message;
use crate::protocol::QoS;

/// Messages waiting for the publishing task, at most: past it (NATS gone while its buffer
/// filled, or publishers that are not slowed down, such as bridges), QoS 0 messages are
/// dropped (counted) and QoS 1/2 publishers hear a failure at once.
const MAX_WAITING: usize = 16_384;
/// From this many messages waiting (while NATS is connected), clients' input pauses, so
/// that a burst slows its publishers down instead of overflowing `MAX_WAITING`...
const PAUSE_AT: usize = MAX_WAITING / 2;
/// ...until this few are left.
const RESUME_AT: usize = MAX_WAITING / 4;
/// How often paused clients are looked at while NATS may be gone (the queue does not drain
/// then, and they must resume to hear their failures).
const DRAIN_CHECK: Duration = Duration::from_millis(20);

struct Outgoing {
    msg: Arc<Message>,
    done: Option<Arc<Replicated>>,
}

/// Connections whose input waits for the backlog to NATS to drain, by address (each once).
#[derive(Default)]
struct Waiters {
    list: Mutex<HashMap<usize, Arc<ConnControl>>>,
    any: AtomicBool,
    added: tokio::sync::Notify,
}

impl Waiters {
    fn wake_all(&self) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        let list = std::mem::take(&mut *self.list.lock().unwrap_or_else(|e| e.into_inner()));
        for c in list.into_values() {
            c.signal(signal::DURABLE);
        }
    }
}

/// The routes installed in the broker: hand-offs to this module's tasks, never a wait.
pub(super) struct Routes {
    out: mpsc::Sender<Outgoing>,
    client: async_nats::Client,
    waiters: Arc<Waiters>,
    interest: mpsc::UnboundedSender<(Box<str>, bool)>,
    shares: mpsc::UnboundedSender<shares::Change>,
    broker: Weak<Broker>,
    refused: RateLimited,
}

impl Routes {
    pub(super) fn start(
        broker: &Arc<Broker>,
        client: async_nats::Client,
        js: jetstream::Context,
        cfg: &ClusterConfig,
        names: Arc<Names>,
    ) -> Arc<Routes> {
        let (out, rx) = mpsc::channel(MAX_WAITING);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let (shares, shares_rx) = mpsc::unbounded_channel();
        let ack_timeout = Duration::from_millis(cfg.ack_timeout_ms);
        let share_ack_wait = Duration::from_millis(cfg.share_ack_wait_ms);
        tokio::spawn(shares::run(
            shares_rx,
            client.clone(),
            js.clone(),
            share_ack_wait,
            Arc::clone(&names),
            Arc::downgrade(broker),
        ));
        let waiters = Arc::new(Waiters::default());
        tokio::spawn(publish_loop(
            rx,
            client.clone(),
            js,
            ack_timeout,
            Arc::clone(&names),
            Arc::downgrade(broker),
            Arc::clone(&waiters),
        ));
        tokio::spawn(interest_loop(interest_rx, client.clone(), names, Arc::downgrade(broker)));
        let routes = Arc::new(Routes {
            out,
            client,
            waiters,
            interest,
            shares,
            broker: Arc::downgrade(broker),
            refused: RateLimited::new(),
        });
        tokio::spawn(watch_paused(Arc::downgrade(&routes)));
        routes
    }

    fn waiting(&self) -> usize {
        MAX_WAITING - self.out.capacity()
    }
}

/// Wakes the paused connections once the backlog has drained, or once NATS is gone (they
/// then go on, and the messages past `MAX_WAITING` fail as they would without pausing).
/// The publishing task wakes them as soon as it drains; this covers the rest.
async fn watch_paused(routes: Weak<Routes>) {
    loop {
        let Some(r) = routes.upgrade() else { return };
        let waiters = Arc::clone(&r.waiters);
        drop(r);
        if !waiters.any.load(Ordering::Acquire) {
            waiters.added.notified().await;
        }
        tokio::time::sleep(DRAIN_CHECK).await;
        let Some(r) = routes.upgrade() else { return };
        if !r.backlogged() {
            r.waiters.wake_all();
        }
    }
}

impl ClusterRoutes for Routes {
    fn forward(&self, msg: &Arc<Message>, done: Option<Arc<Replicated>>) {
        if let Err(e) = self.out.try_send(Outgoing { msg: Arc::clone(msg), done }) {
            let Outgoing { done, .. } = e.into_inner();
            failed(&self.broker, done.as_deref(), &self.refused, "too many messages waiting for NATS");
        }
    }

    fn interest(&self, filter: &str, added: bool) {
        let _ = self.interest.send((filter.into(), added));
    }

    fn shared(&self, group: &str, filter: &str, added: bool) {
        let _ = self.shares.send((group.into(), filter.into(), added));
    }

    fn backlogged(&self) -> bool {
        self.waiting() >= PAUSE_AT && self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn wake_when_drained(&self, waiter: &Arc<ConnControl>) {
        let key = Arc::as_ptr(waiter) as usize;
        self.waiters.list.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert_with(|| Arc::clone(waiter));
        if !self.waiters.any.swap(true, Ordering::AcqRel) {
            self.waiters.added.notify_one();
        }
    }
}

/// A message the cluster could not take: its publisher's acknowledgement is refused (QoS
/// 1/2), counted, logged now and then.
fn failed(broker: &Weak<Broker>, done: Option<&Replicated>, log: &RateLimited, why: &str) {
    if let Some(b) = broker.upgrade() {
        let c = &b.metrics.cluster;
        let counter = if done.is_some() { &c.ack_failures } else { &c.publish_errors };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(d) = done {
        d.complete(false);
    }
    if let Some(skipped) = log.check() {
        warn!(reason = why, similar_not_logged = skipped, "message not handed to the cluster");
    }
}

/// Publishes this node's messages to NATS, in the order its clients published them.
async fn publish_loop(
    mut rx: mpsc::Receiver<Outgoing>,
    client: async_nats::Client,
    js: jetstream::Context,
    ack_timeout: Duration,
    names: Arc<Names>,
    broker: Weak<Broker>,
    waiters: Arc<Waiters>,
) {
    let log = Arc::new(RateLimited::new());
    while let Some(Outgoing { msg, done }) = rx.recv().await {
        if rx.len() <= RESUME_AT && waiters.any.load(Ordering::Relaxed) {
            waiters.wake_all();
        }
        let body = encode(&msg);
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, names.node.as_str());
        let prefix = if msg.qos == QoS::AtMostOnce { &names.q0 } else { &names.msgs };
        let subject = subject::encode(prefix, &msg.topic);
        if subject.len() > MAX_SUBJECT {
            failed(&broker, done.as_deref(), &log, "topic too long for a NATS subject");
            continue;
        }
        let mut acks = Vec::with_capacity(2);
        if msg.qos == QoS::AtMostOnce {
            if let Err(e) = client.publish_with_headers(subject, headers.clone(), body.clone()).await {
                failed(&broker, None, &log, &e.to_string());
            }
        } else {
            match js.publish_with_headers(subject, headers.clone(), body.clone()).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    failed(&broker, done.as_deref(), &log, &e.to_string());
                    continue;
                }
            }
        }
        if msg.retain {
            match js.publish_with_headers(subject::encode(&names.retained, &msg.topic), headers, body).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    failed(&broker, done.as_deref(), &log, &e.to_string());
                    continue;
                }
            }
        }
        if acks.is_empty() {
            continue;
        }
        let (broker, log) = (broker.clone(), Arc::clone(&log));
        tokio::spawn(async move {
            for ack in acks {
                let why = match tokio::time::timeout(ack_timeout, ack).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no JetStream acknowledgement within cluster.ack_timeout_ms".to_string(),
                };
                failed(&broker, done.as_deref(), &log, &why);
                return;
            }
            if let Some(d) = done {
                d.complete(true);
            }
            if let Some(b) = broker.upgrade() {
                b.metrics.cluster.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
}

/// Keeps one core NATS subscription (two for a trailing `#`) per filter subscribed on this
/// node, counted by subscription: subscribed with the first, dropped with the last.
async fn interest_loop(
    mut rx: mpsc::UnboundedReceiver<(Box<str>, bool)>,
    client: async_nats::Client,
    names: Arc<Names>,
    broker: Weak<Broker>,
) {
    let filters = Arc::new(RwLock::new(Interest::new()));
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut held: HashMap<Box<str>, (usize, Vec<JoinHandle<()>>)> = HashMap::new();
    while let Some((filter, added)) = rx.recv().await {
        if added {
            let entry = held.entry(filter.clone()).or_insert_with(|| (0, Vec::new()));
            entry.0 += 1;
            if entry.0 > 1 {
                continue;
            }
            let key = ByteString::from(&*filter);
            filters.write().unwrap_or_else(|e| e.into_inner()).add(&key);
            for subject in subject::filter_subjects(&names.q0, &filter) {
                match client.subscribe(subject.clone()).await {
                    Ok(sub) => entry.1.push(tokio::spawn(inbound::follow_q0(
                        sub,
                        key.clone(),
                        Arc::clone(&filters),
                        Arc::clone(&names),
                        broker.clone(),
                        Arc::clone(&waiting),
                    ))),
                    Err(e) => {
                        warn!(subject = %subject, error = %e, "NATS subscription failed; QoS 0 messages of other nodes on it are missed")
                    }
                }
            }
        } else if let Some(entry) = held.get_mut(&filter) {
            entry.0 -= 1;
            if entry.0 == 0 {
                if let Some((_, tasks)) = held.remove(&filter) {
                    // Dropping a task's subscriber unsubscribes it.
                    tasks.iter().for_each(JoinHandle::abort);
                }
                filters.write().unwrap_or_else(|e| e.into_inner()).remove(&filter);
            }
        }
    }
}
