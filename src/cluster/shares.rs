//! Shared subscriptions across nodes: each message of a `$share/<group>/<filter>` reaches one
//! member in the whole cluster, whichever node it is on.
//!
//! The broker leaves shared groups out of every fan-out of a message the cluster carries (its
//! own clients' included); a node holding members of a group takes its part of the group's
//! messages here and hands each to one local member (`Broker::publish_to_share`):
//! - QoS 0: a core NATS queue subscription per subject of the filter, in a queue group named
//!   after (group, filter): NATS gives each message to one subscribed node.
//! - QoS 1/2: a durable pull consumer of the messages stream per subject of the filter (a
//!   trailing `#` gives two disjoint subjects; one consumer each keeps every consumer's filter
//!   exact, JetStream 2.9 allowing one filter per consumer), pulled by every node with
//!   members: JetStream gives each message to one puller; it is acknowledged once the
//!   member's copy is durable. A node whose last member leaves stops pulling; what it had
//!   pulled and not acknowledged goes to another node after `cluster.share_ack_wait_ms`.
//!
//! Pull requests ask for one message at a time: JetStream serves waiting requests in turn,
//! so the nodes of a group take turns (a batch would give a run of messages to one node).

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::inbound::{acker, decode};
use super::{subject, Names, RateLimited};
use crate::broker::Broker;
use crate::protocol::topic;

/// Messages a node asks for at once per group consumer: one, so that the nodes pulling one
/// group take turns rather than one of them taking a run of messages.
const PULL_BATCH: usize = 1;

/// How long one pull request waits at most. A request can reach the consumer's leader
/// before the interest in its reply subject has (a node just subscribed on another NATS
/// server): the leader then drops it, and the node would wait for nothing; short requests
/// (and their missed heartbeats) are replaced quickly.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// Messages of one group consumer given out and not yet acknowledged, cluster-wide.
const MAX_ACK_PENDING: i64 = 2_048;

/// A group consumer nobody has pulled for this long is removed by JetStream: no node has
/// members any more (a node with members, even away ones, keeps pulling).
const IDLE: Duration = Duration::from_secs(60);

/// How many members of a group this node has, and its tasks taking the group's messages.
type Taking = (usize, Vec<JoinHandle<()>>);

/// A member of a shared group added (`true`) or removed on this node.
pub(super) type Change = (Box<str>, Box<str>, bool);

/// Keeps this node taking its part of every shared group it has members of: started with the
/// first member, stopped with the last.
pub(super) async fn run(
    mut rx: mpsc::UnboundedReceiver<Change>,
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
    names: std::sync::Arc<Names>,
    broker: Weak<Broker>,
) {
    // (group, filter) -> members here, and the tasks taking the group's messages.
    let mut held: HashMap<(Box<str>, Box<str>), Taking> = HashMap::new();
    while let Some((group, filter, added)) = rx.recv().await {
        let key = (group, filter);
        if !added {
            if let Some(entry) = held.get_mut(&key) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    if let Some((_, tasks)) = held.remove(&key) {
                        // Dropping a subscription or a pull stream ends it.
                        tasks.iter().for_each(JoinHandle::abort);
                    }
                }
            }
            continue;
        }
        let entry = held.entry(key.clone()).or_insert_with(|| (0, Vec::new()));
        entry.0 += 1;
        if entry.0 > 1 {
            continue;
        }
        let (group, filter) = key;
        let queue = name(&names.q0, &group, &filter);
        for s in subject::filter_subjects(&names.q0, &filter) {
            match client.queue_subscribe(s.clone(), queue.clone()).await {
                Ok(sub) => entry.1.push(tokio::spawn(follow_q0(
                    sub,
                    group.clone(),
                    filter.clone(),
                    std::sync::Arc::clone(&names),
                    broker.clone(),
                ))),
                Err(e) => {
                    warn!(subject = %s, error = %e, group = %group, filter = %filter, "NATS queue subscription failed; QoS 0 messages of this shared group are missed here")
                }
            }
        }
        for s in subject::filter_subjects(&names.msgs, &filter) {
            let config = consumer::pull::Config {
                durable_name: Some(name(&s, &group, &filter)),
                filter_subject: s,
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::New,
                ack_wait,
                max_ack_pending: MAX_ACK_PENDING,
                inactive_threshold: IDLE,
                ..Default::default()
            };
            let follow =
                follow_consumer(js.clone(), config, group.clone(), filter.clone(), names.clone(), broker.clone());
            entry.1.push(tokio::spawn(follow));
        }
    }
}

/// A NATS queue group or consumer name for (group, filter) under `scope`: NATS names allow
/// neither every byte of an MQTT group and filter nor their length.
fn name(scope: &str, group: &str, filter: &str) -> String {
    let mut h = Sha256::new();
    for part in [scope, group, filter] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(6 + 24);
    out.push_str("share-");
    for b in &digest[..12] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Delivers the QoS 0 messages NATS gives this node on one queue subscription of the group.
async fn follow_q0(
    mut sub: async_nats::Subscriber,
    group: Box<str>,
    filter: Box<str>,
    names: std::sync::Arc<Names>,
    broker: Weak<Broker>,
) {
    while let Some(m) = sub.next().await {
        // This node's own messages too: its fan-out left the group out.
        let Some(msg) = decode(&names, &m, true) else { continue };
        // A subject stands for a little more than the filter (`$` topics under wildcards).
        if !topic::matches(&filter, &msg.topic) {
            continue;
        }
        let Some(b) = broker.upgrade() else { return };
        b.publish_to_share(&group, &filter, std::sync::Arc::new(msg));
    }
}

/// Pulls the group's QoS 1/2 messages of one subject for as long as this node has members
/// (the task is aborted with the last), creating the durable consumer if it is not there.
async fn follow_consumer(
    js: jetstream::Context,
    config: consumer::pull::Config,
    group: Box<str>,
    filter: Box<str>,
    names: std::sync::Arc<Names>,
    broker: Weak<Broker>,
) {
    let (tx, rx) = mpsc::channel(super::inbound::MAX_UNACKED);
    tokio::spawn(acker(rx, broker.clone()));
    let log = RateLimited::new();
    let consumer_error = format!("shared subscription consumer error (group {group}, filter {filter})");
    let durable = config.durable_name.clone().unwrap_or_default();
    loop {
        let consumer =
            match js.get_consumer_from_stream::<consumer::pull::Config, _, _>(&durable, &names.msgs_stream).await {
                Ok(c) => Ok(c),
                Err(_) => js.create_consumer_on_stream(config.clone(), &names.msgs_stream).await,
            };
        let messages = match consumer {
            Ok(c) => c
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_EXPIRES / 4)
                .messages()
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                if let Some(skipped) = log.check() {
                    warn!(error = %e, group = %group, filter = %filter, similar_not_logged = skipped, "shared subscription consumer unavailable; retrying");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(m) = super::next_message(&mut messages, &log, &consumer_error).await {
            let ticket = match decode(&names, &m, true) {
                Some(msg) if topic::matches(&filter, &msg.topic) => {
                    let Some(b) = broker.upgrade() else { return };
                    match b.publish_to_share(&group, &filter, std::sync::Arc::new(msg)) {
                        (0, _) => {
                            // No member here any more: another node's is to have it now.
                            let _ = m.ack_with(AckKind::Nak(None)).await;
                            continue;
                        }
                        (_, ticket) => ticket,
                    }
                }
                // Not the group's (or undecodable, logged): nobody of it is to have it.
                _ => 0,
            };
            if tx.send((ticket, m)).await.is_err() {
                return;
            }
        }
    }
}
