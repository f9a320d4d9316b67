//! Wills of the clients of a node that dies, published once by a surviving node.
//!
//! Owns two key-value buckets: `<name>_wills`, one key per connected client with a will
//! (`<node>.<client key>`, written before its CONNACK, deleted once its node has dealt with
//! the will), and `<name>_nodes`, one heartbeat key per node, put every
//! `cluster.heartbeat_ms`. Every node watches the others' heartbeats: one whose key has not
//! changed for `cluster.node_timeout_ms` (judged by this node's clock, so clocks need not
//! agree) is dead, and its wills are taken, each by a delete conditional on the revision
//! read: of the nodes racing for one will, one delete succeeds, and that node publishes it
//! (`Broker::publish_orphan_will`: its delay, its owner's rights). A node starting takes its
//! own leftovers (a previous life killed before anybody noticed) the same way.
//!
//! Drives the broker through its will seam (`broker::ClusterWills`); knows nothing of
//! connections or sessions.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::owners::encode_key;
use crate::broker::{Broker, ClusterWills, WillWrite};
use crate::config::Cluster as ClusterConfig;
use crate::store::records::now_unix_ms;

/// How long one write of a will may take before the CONNECT is refused.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's side of the wills bucket.
pub(super) struct Wills {
    kv: kv::Store,
    node: String,
}

/// A key-value bucket, made as `owners` makes its own (async-nats' `create_key_value` asks
/// for account info that nats-server 2.9's reply does not parse into).
async fn bucket(js: &jetstream::Context, bucket: &str, replicas: usize, what: &str) -> Result<kv::Store, String> {
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(format!("tern: {what}")),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        debug!(error = %e, bucket, "creating a bucket's stream failed; binding it as it is");
    }
    js.get_key_value(bucket).await.map_err(|e| format!("bucket {bucket}: {e}"))
}

/// Makes the buckets, takes this node's leftover wills, starts the heartbeat and the watch
/// of the other nodes, and installs the will keeper in the broker.
pub(super) async fn start(broker: &Arc<Broker>, js: &jetstream::Context, cfg: &ClusterConfig) -> Result<(), String> {
    let wills = bucket(js, &format!("{}_wills", cfg.name), cfg.replicas(), "wills of connected clients").await?;
    let nodes = bucket(js, &format!("{}_nodes", cfg.name), cfg.replicas(), "node heartbeats").await?;
    nodes.put(&cfg.node, Bytes::from(now_unix_ms().to_string())).await.map_err(|e| e.to_string())?;
    let taken = take_wills(&wills, &cfg.node, broker).await;
    if taken > 0 {
        info!(node = %cfg.node, wills = taken, "wills left by this node's previous run published");
    }
    let keeper = Arc::new(Wills { kv: wills.clone(), node: cfg.node.clone() });
    if !broker.install_wills(keeper) {
        warn!("a will keeper was installed already; this one is not used");
    }
    let beat = Duration::from_millis(cfg.heartbeat_ms);
    let timeout = Duration::from_millis(cfg.node_timeout_ms);
    tokio::spawn(watch(nodes, wills, cfg.node.clone(), beat, timeout, Arc::downgrade(broker)));
    Ok(())
}

impl ClusterWills for Wills {
    fn put<'a>(&'a self, client_id: &'a str, record: Vec<u8>) -> WillWrite<'a> {
        Box::pin(async move {
            let mut value = Vec::with_capacity(2 + client_id.len() + record.len());
            // The client id travels with the will: long ids are hashed in the key.
            let id = client_id.as_bytes();
            let len = u16::try_from(id.len()).map_err(|_| ())?;
            value.extend_from_slice(&len.to_be_bytes());
            value.extend_from_slice(id);
            value.extend_from_slice(&record);
            let key = format!("{}.{}", self.node, encode_key(client_id));
            match tokio::time::timeout(OP_TIMEOUT, self.kv.put(key, Bytes::from(value))).await {
                Ok(Ok(rev)) => Ok(rev),
                Ok(Err(e)) => {
                    warn!(client_id, error = %e, "will not kept in the cluster; CONNECT refused");
                    Err(())
                }
                Err(_) => {
                    warn!(client_id, "will not kept in the cluster in time; CONNECT refused");
                    Err(())
                }
            }
        })
    }

    fn done<'a>(&'a self, client_id: &'a str, revision: u64) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let key = format!("{}.{}", self.node, encode_key(client_id));
            // Conditional: a newer connection of the client here has written its own will since.
            let deleted = tokio::time::timeout(OP_TIMEOUT, self.kv.delete_expect_revision(key, Some(revision))).await;
            if let Ok(Err(e)) = deleted {
                debug!(client_id, error = %e, "kept will not removed (replaced since, or NATS unreachable)");
            }
        })
    }
}

/// The client id and record of a kept will.
fn split_value(v: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*v.first()?, *v.get(1)?]));
    let id = std::str::from_utf8(v.get(2..2 + len)?).ok()?;
    Some((id, v.get(2 + len..)?))
}

/// Takes every will `node` left and publishes those this node wins; returns how many.
async fn take_wills(wills: &kv::Store, node: &str, broker: &Arc<Broker>) -> usize {
    let prefix = format!("{node}.");
    let mut keys = Vec::new();
    match wills.keys().await {
        Ok(mut k) => {
            while let Some(Ok(key)) = k.next().await {
                if key.starts_with(&prefix) {
                    keys.push(key);
                }
            }
        }
        Err(e) => {
            warn!(node, error = %e, "wills of a node not listed");
            return 0;
        }
    }
    let mut taken = 0;
    for key in keys {
        let Ok(Some(entry)) = wills.entry(key.clone()).await else { continue };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        // Only one of the nodes racing for it deletes this revision.
        if wills.delete_expect_revision(&key, Some(entry.revision)).await.is_err() {
            continue;
        }
        match split_value(&entry.value) {
            Some((client_id, record)) if broker.publish_orphan_will(client_id, record) => taken += 1,
            _ => warn!(key, "unreadable will of a dead node dropped"),
        }
    }
    taken
}

/// Puts this node's heartbeat and watches the others' for ever; a node silent for `timeout`
/// is dead: its wills are taken and its heartbeat key removed.
async fn watch(
    nodes: kv::Store,
    wills: kv::Store,
    me: String,
    beat: Duration,
    timeout: Duration,
    broker: Weak<Broker>,
) {
    // Node -> (revision of its heartbeat, when this node first saw that revision).
    let mut seen: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(broker) = broker.upgrade() else { return };
        if let Err(e) = nodes.put(&me, Bytes::from(now_unix_ms().to_string())).await {
            warn!(error = %e, "node heartbeat not written");
            continue;
        }
        let Ok(mut keys) = nodes.keys().await else { continue };
        let mut names = Vec::new();
        while let Some(Ok(k)) = keys.next().await {
            if k != me {
                names.push(k);
            }
        }
        let now = Instant::now();
        seen.retain(|n, _| names.contains(n));
        for name in names {
            let Ok(Some(entry)) = nodes.entry(name.clone()).await else { continue };
            let since = match seen.get(&name) {
                Some(&(rev, at)) if rev == entry.revision => at,
                _ => {
                    seen.insert(name, (entry.revision, now));
                    continue;
                }
            };
            if now.duration_since(since) < timeout {
                continue;
            }
            info!(node = %name, "node silent for cluster.node_timeout_ms: taking its clients' wills");
            let taken = take_wills(&wills, &name, &broker).await;
            if taken > 0 {
                info!(node = %name, wills = taken, "wills of a dead node published");
            }
            let _ = nodes.delete_expect_revision(&name, Some(entry.revision)).await;
            seen.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_carry_their_client_id() {
        let id = "ü/ client";
        let mut v = (id.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(id.as_bytes());
        v.extend_from_slice(b"record");
        assert_eq!(split_value(&v), Some((id, &b"record"[..])));
        assert_eq!(split_value(&v[..3]), None);
        assert_eq!(split_value(&[0]), None);
        assert_eq!(split_value(&[0xFF, 0xFE, b'x']), None);
    }
}
