//! What this node receives from the others: QoS 0 messages on its filters' core NATS
//! subscriptions, QoS 1/2 messages from its durable consumer (acknowledged once their local
//! copies are durable), retained updates from the retained stream in stream order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytestring::ByteString;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Names, RateLimited, NODE_HEADER};
use crate::broker::{Broker, ConnControl, DropCause};
use crate::message::Message;
use crate::protocol::SubscriptionOptions;
use crate::store::records;
use crate::topics::{Entry, Subscriber, SubscriptionTrie};

/// Messages delivered here whose local copies are not yet durable, at most: the consumer
/// waits past it (JetStream's `max_ack_pending` bounds it too).
pub(super) const MAX_UNACKED: usize = 4_096;

/// A filter of this node, as the interest index holds it.
#[derive(Clone)]
pub(super) struct FilterKey(ByteString);

impl Subscriber for FilterKey {
    fn client(&self) -> &ByteString {
        &self.0
    }
}

/// The filters this node has a core NATS subscription for. A message matching several of
/// them arrives once per subscription: only the one through the first of its filters (in
/// byte order) that matches it as MQTT does is delivered, so each arrives once.
pub(super) struct Interest {
    trie: SubscriptionTrie<FilterKey>,
}

impl Interest {
    pub(super) fn new() -> Interest {
        Interest { trie: SubscriptionTrie::new() }
    }

    pub(super) fn add(&mut self, filter: &ByteString) {
        let entry = Entry {
            client: filter.clone(),
            target: FilterKey(filter.clone()),
            options: SubscriptionOptions::default(),
            subscription_id: None,
            share: None,
        };
        self.trie.subscribe(filter, None, entry);
    }

    pub(super) fn remove(&mut self, filter: &str) {
        self.trie.unsubscribe(filter, None, filter);
    }

    /// Whether a message on `topic` that came through `filter`'s subscription is the copy to
    /// deliver.
    fn first_match(&self, filter: &str, topic: &str) -> bool {
        let mut first: Option<&str> = None;
        self.trie.visit_matches(topic, |m| {
            let f = &*m.target.0;
            if first.is_none_or(|min| f < min) {
                first = Some(f);
            }
        });
        first == Some(filter)
    }
}

/// The message in a NATS message from another node: None for this node's own (already
/// delivered here) or one that does not decode (logged).
pub(super) fn decode(names: &Names, m: &async_nats::Message, own: bool) -> Option<Message> {
    let (headers, body) = (m.headers.as_ref(), &m.payload[..]);
    let origin = headers.and_then(|h| h.get(NODE_HEADER)).map(|v| v.as_str());
    if !own && origin == Some(names.node.as_str()) {
        return None;
    }
    match records::decode_message(body) {
        Ok(m) => Some(m),
        Err(e) => {
            static LOG: RateLimited = RateLimited::new();
            if let Some(skipped) = LOG.check() {
                let prefix =
                    [&names.q0, &names.msgs, &names.retained].into_iter().find(|p| m.subject.starts_with(p.as_str()));
                let topic = prefix.and_then(|p| super::subject::decode(p, &m.subject));
                warn!(error = %e, from = ?origin, topic = ?topic, similar_not_logged = skipped, "undecodable message from the cluster dropped");
            }
            None
        }
    }
}

/// Bytes of other nodes' QoS 0 messages this node holds, at most, while they wait for full
/// local subscribers (all filters together); beyond it they are dropped and counted.
pub(super) const MAX_QOS0_WAITING_BYTES: usize = 64 << 20;

/// Delivers the QoS 0 messages of one core subscription (of `filter`) until it is dropped.
/// A full local subscriber is waited for, as a local publisher's flow control would (up to
/// `limits.slow_consumer_secs`); NATS cannot be slowed down meanwhile, so what arrives is
/// read on and held, within `waiting` (shared by every filter's task: at most
/// `MAX_QOS0_WAITING_BYTES`), the rest dropped.
pub(super) async fn follow_q0(
    mut sub: async_nats::Subscriber,
    filter: ByteString,
    interest: Arc<RwLock<Interest>>,
    names: Arc<Names>,
    broker: Weak<Broker>,
    waiting: Arc<AtomicUsize>,
) {
    let waiter = Arc::new(ConnControl::default());
    let mut full = Vec::new();
    let mut held = Held { queue: VecDeque::new(), bytes: 0, budget: waiting };
    // Decodes a NATS message into `held` (or drops it); false once the subscription ended.
    let take = |m: Option<async_nats::Message>, held: &mut Held| {
        let Some(m) = m else { return false };
        let Some(msg) = decode(&names, &m, false) else { return true };
        if !interest.read().unwrap_or_else(|e| e.into_inner()).first_match(&filter, &msg.topic) {
            return true;
        }
        if !held.push(Arc::new(msg)) {
            if let Some(b) = broker.upgrade() {
                b.metrics.drop_n(DropCause::Memory, 1);
            }
        }
        true
    };
    loop {
        if held.queue.is_empty() && !take(sub.next().await, &mut held) {
            return;
        }
        let Some(b) = broker.upgrade() else { return };
        while let Some(msg) = held.pop() {
            b.publish_from_cluster(msg, &mut full);
            if !full.is_empty() {
                break;
            }
        }
        if full.is_empty() {
            continue;
        }
        let wait = b.wait_for_room(std::mem::take(&mut full), &waiter, None);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                m = sub.next() => if !take(m, &mut held) { return },
            }
        }
    }
}

/// Other nodes' QoS 0 messages read from NATS while a full subscriber is waited for, counted
/// in the node's budget until delivered (or dropped with the task).
struct Held {
    queue: VecDeque<Arc<Message>>,
    bytes: usize,
    budget: Arc<AtomicUsize>,
}

impl Held {
    /// False (not kept) when the budget is spent; the first message is always kept, so that
    /// every filter makes progress.
    fn push(&mut self, msg: Arc<Message>) -> bool {
        let n = msg.held_bytes();
        if self.budget.fetch_add(n, Ordering::Relaxed) + n > MAX_QOS0_WAITING_BYTES && !self.queue.is_empty() {
            self.budget.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        self.queue.push_back(msg);
        true
    }

    fn pop(&mut self) -> Option<Arc<Message>> {
        let msg = self.queue.pop_front()?;
        let n = msg.held_bytes();
        self.bytes -= n;
        self.budget.fetch_sub(n, Ordering::Relaxed);
        Some(msg)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Reads this node's consumer of the messages stream for ever: each message of another node
/// is delivered here, then acknowledged once its local copies are durable (by `acker`).
pub(super) async fn follow_messages(broker: Weak<Broker>, consumer: consumer::PullConsumer, names: Arc<Names>) {
    let (tx, rx) = mpsc::channel(MAX_UNACKED);
    tokio::spawn(acker(rx, broker.clone()));
    let log = RateLimited::new();
    let waiter = Arc::new(ConnControl::default());
    let mut full = Vec::new();
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                if let Some(skipped) = log.check() {
                    warn!(error = %e, similar_not_logged = skipped, "cluster messages consumer unavailable; retrying");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(m) = super::next_message(&mut messages, &log, "cluster messages consumer error").await {
            let ticket = match decode(&names, &m, false) {
                Some(msg) => {
                    let Some(b) = broker.upgrade() else { return };
                    let ticket = b.publish_from_cluster(Arc::new(msg), &mut full).1;
                    if !full.is_empty() {
                        // JetStream holds what follows meanwhile.
                        b.wait_for_room(std::mem::take(&mut full), &waiter, None).await;
                    }
                    ticket
                }
                None => 0,
            };
            if tx.send((ticket, m)).await.is_err() {
                return;
            }
        }
    }
}

/// Acknowledges consumed messages to JetStream in order, each once the store ticket of its
/// local copies is done; one whose copies failed to be stored is left unacknowledged (it is
/// delivered again).
pub(super) async fn acker(mut rx: mpsc::Receiver<(u64, jetstream::Message)>, broker: Weak<Broker>) {
    let control = Arc::new(ConnControl::default());
    let log = RateLimited::new();
    while let Some((ticket, m)) = rx.recv().await {
        if ticket != 0 {
            let Some(b) = broker.upgrade() else { return };
            let stored = loop {
                if let Some(ok) = b.outcome(ticket) {
                    break ok;
                }
                b.wait_durable(ticket, &control);
                if b.outcome(ticket).is_none() {
                    std::future::poll_fn(|cx| control.poll_signals(cx)).await;
                }
            };
            if !stored {
                continue;
            }
        }
        if let Err(e) = m.ack().await {
            if let Some(skipped) = log.check() {
                warn!(error = %e, similar_not_logged = skipped, "cluster message acknowledgement failed (it comes again)");
            }
        }
    }
}

/// Loads the retained messages of the whole cluster (the last update of each topic) into
/// this node's retained index, then keeps following the retained stream in a task, applying
/// every update in stream order, this node's own included: nodes writing one topic at once
/// all end with the stream's last write. Returns once the load is done.
pub(super) async fn load_retained(broker: &Arc<Broker>, mut retained: stream::Stream, names: &Arc<Names>) {
    let started = std::time::Instant::now();
    let last = loop {
        match retained.info().await {
            Ok(i) => break i.state.last_sequence,
            Err(e) => {
                warn!(error = %e, "retained stream info unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let filter = format!("{}.>", names.retained);
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<usize>();
    let broker_weak = Arc::downgrade(broker);
    let node = names.node.clone();
    let names = Arc::clone(names);
    tokio::spawn(async move {
        let mut loaded = Some(loaded_tx);
        let mut count = 0usize;
        let mut next = 0u64;
        if last == 0 {
            if let Some(tx) = loaded.take() {
                let _ = tx.send(0);
            }
        }
        let log = RateLimited::new();
        loop {
            let config = consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                // Resumed after the last update applied if the consumer had to be made again.
                deliver_policy: match next {
                    0 => consumer::DeliverPolicy::LastPerSubject,
                    start_sequence => consumer::DeliverPolicy::ByStartSequence { start_sequence },
                },
                ..Default::default()
            };
            let messages = match retained.create_consumer(config).await {
                Ok(c) => c.messages().await,
                Err(e) => {
                    if let Some(skipped) = log.check() {
                        warn!(error = %e, similar_not_logged = skipped, "retained stream consumer unavailable; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "retained stream consumer unavailable; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(m) = super::next_message(&mut messages, &log, "retained stream consumer error").await {
                let seq = m.info().map(|i| (i.stream_sequence, i.pending)).ok();
                if let Some((s, _)) = seq {
                    next = s + 1;
                }
                if let Some(msg) = decode(&names, &m, true) {
                    let Some(b) = broker_weak.upgrade() else { return };
                    b.retain_from_cluster(Arc::new(msg));
                    count += 1;
                }
                if loaded.is_some() && seq.is_none_or(|(s, pending)| s >= last || pending == 0) {
                    if let Some(tx) = loaded.take() {
                        let _ = tx.send(count);
                    }
                }
            }
        }
    });
    let count = loaded_rx.await.unwrap_or(0);
    info!(node = %node, updates = count, "retained messages loaded from the cluster in {:.3} s", started.elapsed().as_secs_f64());
}
