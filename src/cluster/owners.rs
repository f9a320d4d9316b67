//! Which node serves a client id, cluster-wide: one key per client id in the JetStream
//! key-value bucket `<name>_owners`, written only by compare-and-set, and the release
//! requests (`<name>.own.<node>`) by which a node claiming an id asks its owner to let go.
//!
//! Owns the bucket, the key encoding and this node's claims in progress or held. Drives the
//! broker only through its ownership seam (`broker::ClusterOwners`) and `kick_client`; must
//! not know sockets, MQTT packets or sessions' state.
//!
//! A claim on node B: read the key; free → create it; owned by B → update the nonce (a local
//! reconnect: the broker's own takeover applies); owned by A → ask A to release and wait for
//! its answer (A answers once its connection has stopped delivering; no responders or no
//! answer in time means A is dead or cut off), then update the key from the revision read.
//! Every write is conditional on that revision, so of two nodes claiming at once one write
//! fails, and that node reads again and starts over, a bounded number of times.
//!
//! This node remembers its claims (`local`) from before its key is written until the
//! connection is dropped, so that a release request arriving in between finds the claim:
//! it is marked revoked, and the handshake, seeing it after the attach, closes its client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::broker::{Broker, Claim, ClusterOwners, Refused};
use crate::protocol::reason;

/// How long one read or write of the bucket may take before the claim is refused.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node asked to release an id waits for its connection to stop (the connection
/// only has its DISCONNECT and the socket's shutdown left, each bounded to 1 s).
const RELEASE_WAIT: Duration = Duration::from_millis(2_500);
/// How long a claiming node waits for the owner's answer: longer than the owner waits, so a
/// live owner always answers first.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);
/// Compare-and-set rounds before a claim that keeps losing gives up.
const MAX_ROUNDS: usize = 5;
/// A whole claim, past which the CONNECT is refused.
const CLAIM_DEADLINE: Duration = Duration::from_secs(10);
/// Client ids whose encoded key would be longer than this are keyed by their SHA-256
/// (NATS caps a subject, which the key is part of, with the protocol's control line).
const MAX_PLAIN_KEY: usize = 256;

/// Errors of starting the ownership service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnersError {
    /// The bucket could neither be created nor bound.
    #[error("JetStream key-value bucket `{bucket}`: {source}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    /// The release request subject could not be subscribed to.
    #[error("subscribing to `{subject}`: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    /// Reading the bucket failed.
    #[error("reading the owners bucket: {0}")]
    Read(#[source] async_nats::Error),
}

/// The owner of a client id as the bucket says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    /// The owning connection's claim (`ClusterOwners::claim`).
    pub nonce: u64,
    /// The whole client id, kept only when the key is its hash (compared on every read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Counts of refused claims, for logs and metrics.
#[derive(Debug, Default)]
pub struct OwnersStats {
    /// Refused because `cluster.max_pending_claims` claims were in progress.
    pub refused_busy: AtomicU64,
    /// Refused because the bucket could not be read or written in time.
    pub refused_unavailable: AtomicU64,
    /// Refused after losing to other nodes' claims.
    pub refused_lost: AtomicU64,
    /// Release requests from other nodes answered.
    pub released_to_peers: AtomicU64,
}

/// One claim of this node: from before its key is written until its connection is dropped.
struct Held {
    nonce: u64,
    /// Another node asked for the id since.
    revoked: bool,
}

/// This node's claims of one client id (more than one while a local reconnect replaces a
/// connection), and the release requests waiting for all of them to end.
#[derive(Default)]
struct Local {
    held: Vec<Held>,
    gone: Vec<oneshot::Sender<()>>,
}

/// Cluster-wide ownership of client ids, installed in the broker by `start`.
pub struct Owners {
    kv: kv::Store,
    client: async_nats::Client,
    node: String,
    /// `<name>.own.`, to which a node's name is appended.
    subject_prefix: String,
    broker: Weak<Broker>,
    local: Mutex<HashMap<Box<str>, Local>>,
    pending: Semaphore,
    rng: ring::rand::SystemRandom,
    pub stats: OwnersStats,
    /// Itself, for the work `released` (called from a drop) leaves to a task.
    me: Weak<Owners>,
}

impl Owners {
    /// Creates (or binds) the bucket `<name>_owners`, serves release requests on
    /// `<name>.own.<node>`, and installs itself as `broker`'s ownership hook.
    pub(crate) async fn start(
        client: async_nats::Client,
        js: async_nats::jetstream::Context,
        node: &str,
        name: &str,
        replicas: usize,
        max_pending_claims: usize,
        broker: &Arc<Broker>,
    ) -> Result<Arc<Owners>, OwnersError> {
        let bucket = format!("{name}_owners");
        let kv = bucket_store(&js, &bucket, "tern: which node serves each client id", replicas)
            .await
            .map_err(|e| OwnersError::Bucket { bucket: bucket.clone(), source: e })?;
        let subject_prefix = format!("{name}.own.");
        let subject = format!("{subject_prefix}{node}");
        let requests = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| OwnersError::Subscribe { subject: subject.clone(), source })?;
        let owners = Arc::new_cyclic(|me| Owners {
            kv,
            client,
            node: node.to_string(),
            subject_prefix,
            broker: Arc::downgrade(broker),
            local: Mutex::new(HashMap::new()),
            pending: Semaphore::new(max_pending_claims.max(1)),
            rng: ring::rand::SystemRandom::new(),
            stats: OwnersStats::default(),
            me: me.clone(),
        });
        tokio::spawn(Arc::clone(&owners).serve(requests));
        if !broker.install_owners(Arc::clone(&owners) as Arc<dyn ClusterOwners>) {
            warn!("a client id ownership hook was installed already; this one is not used");
        }
        Ok(owners)
    }

    /// The owner of `client_id` as the bucket says now (None: nobody).
    pub async fn owner_of(&self, client_id: &str) -> Result<Option<Owner>, OwnersError> {
        let entry = self.kv.entry(encode_key(client_id)).await.map_err(|e| OwnersError::Read(e.into()))?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put).and_then(|e| decode_value(&e.value)))
    }

    /// Answers release requests until the NATS client is closed. Each is served on its own
    /// task: waiting for one connection to stop must not hold up the others. They are as many
    /// as the other nodes' claims in progress, each bounded by its `max_pending_claims`.
    async fn serve(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let Ok(client_id) = std::str::from_utf8(&msg.payload).map(str::to_string) else {
                debug!("release request with a client id that is not UTF-8 ignored");
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.release(&client_id).await;
                me.stats.released_to_peers.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = me.client.publish(reply, Bytes::new()).await {
                    debug!(error = %e, "answering a release request failed");
                }
            });
        }
    }

    /// Another node wants `client_id`: every claim of it here is revoked, the connection
    /// serving it is told to close with 0x8E, and this returns once every such connection has
    /// been dropped (its session detached), or after `RELEASE_WAIT`.
    async fn release(&self, client_id: &str) {
        let gone = {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            match local.get_mut(client_id) {
                None => None,
                Some(l) => {
                    for h in &mut l.held {
                        h.revoked = true;
                    }
                    let (tx, rx) = oneshot::channel();
                    l.gone.push(tx);
                    Some(rx)
                }
            }
        };
        let Some(gone) = gone else { return };
        if let Some(broker) = self.broker.upgrade() {
            broker.kick_client(client_id, reason::SESSION_TAKEN_OVER);
        }
        if tokio::time::timeout(RELEASE_WAIT, gone).await.is_err() {
            warn!(client_id, "connection taken over by another node did not stop in time; answering anyway");
        } else {
            info!(client_id, "client id released to another node");
        }
    }

    /// Forgets the claim `nonce` of `client_id`; wakes the release requests waiting for the
    /// id's last claim here. Returns whether the claim had been revoked (None: unknown).
    fn forget(&self, client_id: &str, nonce: u64) -> Option<bool> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let l = local.get_mut(client_id)?;
        let at = l.held.iter().position(|h| h.nonce == nonce)?;
        let revoked = l.held.swap_remove(at).revoked;
        if l.held.is_empty() {
            for tx in l.gone.drain(..) {
                let _ = tx.send(());
            }
            local.remove(client_id);
        }
        Some(revoked)
    }

    fn nonce(&self) -> u64 {
        let mut b = [0u8; 8];
        // SystemRandom fails only where the OS has no randomness at all; the counter-free
        // fallback still differs per call through the time.
        if ring::rand::SecureRandom::fill(&self.rng, &mut b).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            b = (t.as_nanos() as u64).to_le_bytes();
        }
        u64::from_le_bytes(b).max(1)
    }

    async fn claim_id(&self, client_id: &str) -> Result<u64, Refused> {
        let Ok(_permit) = self.pending.try_acquire() else {
            self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            if let Some(b) = self.broker.upgrade() {
                b.metrics.cluster.claims_refused.fetch_add(1, Ordering::Relaxed);
            }
            return Err(Refused::Busy);
        };
        let nonce = self.nonce();
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            local.entry(client_id.into()).or_default().held.push(Held { nonce, revoked: false });
        }
        let result = match tokio::time::timeout(CLAIM_DEADLINE, self.write_claim(client_id, nonce)).await {
            Ok(r) => r,
            Err(_) => Err(Refused::Unavailable),
        };
        let result = match result {
            // Asked for by another node while claiming: that node is waiting for this claim
            // to end, and will take the id.
            Ok(()) if !self.holds(client_id, nonce) => Err(Refused::Lost),
            r => r,
        };
        match result {
            Ok(()) => Ok(nonce),
            Err(why) => {
                let counter = match why {
                    Refused::Busy => &self.stats.refused_busy,
                    Refused::Unavailable => &self.stats.refused_unavailable,
                    Refused::Lost => &self.stats.refused_lost,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(b) = self.broker.upgrade() {
                    b.metrics.cluster.claims_refused.fetch_add(1, Ordering::Relaxed);
                }
                // A key written before the failure names a claim nobody holds: a later
                // claim asks this node, finds nothing, and takes it at once.
                self.forget(client_id, nonce);
                Err(why)
            }
        }
    }

    /// Makes the key of `client_id` name this node and `nonce`.
    async fn write_claim(&self, client_id: &str, nonce: u64) -> Result<(), Refused> {
        let key = encode_key(client_id);
        let hashed = key.starts_with(HASHED);
        let value = encode_value(&Owner { node: self.node.clone(), nonce, id: hashed.then(|| client_id.to_string()) });
        for _ in 0..MAX_ROUNDS {
            let mut took_over = false;
            let entry = match tokio::time::timeout(OP_TIMEOUT, self.kv.entry(key.clone())).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    warn!(client_id, error = %e, "reading the owner of a client id failed");
                    return Err(Refused::Unavailable);
                }
                Err(_) => return Err(Refused::Unavailable),
            };
            // Revision 0 = the key must not exist; a deleted key is written over its marker.
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let owner = entry.filter(|e| e.operation == kv::Operation::Put).map(|e| decode_value(&e.value));
            if let Some(Some(owner)) = &owner {
                if hashed && owner.id.as_deref() != Some(client_id) {
                    // Two ids with one SHA-256: not expected to happen, but never merge them.
                    warn!(client_id, "another client id has the same owners key; refused");
                    return Err(Refused::Unavailable);
                }
                if owner.node != self.node {
                    self.ask_release(&owner.node, client_id).await?;
                    took_over = true;
                }
            } else if let Some(None) = owner {
                warn!(client_id, "owners bucket holds a value tern cannot read; overwritten");
            }
            match tokio::time::timeout(OP_TIMEOUT, self.kv.update(&key, value.clone(), revision)).await {
                Ok(Ok(_)) => {
                    if let (true, Some(b)) = (took_over, self.broker.upgrade()) {
                        b.metrics.cluster.takeovers.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    debug!(client_id, "owner changed while claiming; reading again");
                }
                Ok(Err(e)) => {
                    warn!(client_id, error = %e, "writing the owner of a client id failed");
                    return Err(Refused::Unavailable);
                }
                Err(_) => return Err(Refused::Unavailable),
            }
        }
        Err(Refused::Lost)
    }

    /// Asks `node` to release `client_id` and waits for its answer. A node that does not
    /// answer (none listening, or no answer in time) is taken to be dead or cut off.
    async fn ask_release(&self, node: &str, client_id: &str) -> Result<(), Refused> {
        let subject = format!("{}{node}", self.subject_prefix);
        let request = async_nats::Request::new()
            .payload(Bytes::copy_from_slice(client_id.as_bytes()))
            .timeout(Some(RELEASE_TIMEOUT));
        match self.client.send_request(subject, request).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders | async_nats::client::RequestErrorKind::TimedOut => {
                    info!(client_id, node, error = %e, "owner of a client id did not answer; taking the id over");
                    Ok(())
                }
                async_nats::client::RequestErrorKind::Other => {
                    warn!(client_id, node, error = %e, "asking a node to release a client id failed");
                    Err(Refused::Unavailable)
                }
            },
        }
    }

    /// Deletes the key of `client_id` if it still names this node and `nonce`, conditional
    /// on the revision read, so that a late release never deletes a newer owner's key.
    async fn delete_if_ours(&self, client_id: &str, nonce: u64) {
        let key = encode_key(client_id);
        let entry = match tokio::time::timeout(OP_TIMEOUT, self.kv.entry(key.clone())).await {
            Ok(Ok(Some(e))) if e.operation == kv::Operation::Put => e,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => return debug!(client_id, error = %e, "reading an owner to release it failed"),
            Err(_) => return debug!(client_id, "reading an owner to release it timed out"),
        };
        let ours = decode_value(&entry.value).is_some_and(|o| o.node == self.node && o.nonce == nonce);
        if !ours {
            return;
        }
        match tokio::time::timeout(OP_TIMEOUT, self.kv.delete_expect_revision(&key, Some(entry.revision))).await {
            Ok(Ok(())) => {}
            // A stale key is harmless: the next claim asks this node, which answers at once.
            Ok(Err(e)) => debug!(client_id, error = %e, "releasing a client id's key failed"),
            Err(_) => debug!(client_id, "releasing a client id's key timed out"),
        }
    }
}

impl ClusterOwners for Owners {
    fn claim<'a>(&'a self, client_id: &'a str) -> Claim<'a> {
        Box::pin(self.claim_id(client_id))
    }

    fn holds(&self, client_id: &str, nonce: u64) -> bool {
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        local.get(client_id).and_then(|l| l.held.iter().find(|h| h.nonce == nonce)).is_some_and(|h| !h.revoked)
    }

    fn released(&self, client_id: &str, nonce: u64) {
        // A revoked claim's key belongs to the node that asked for it (it overwrites it).
        if self.forget(client_id, nonce) != Some(false) {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        // At shutdown every connection ends at once: its keys are left (a later claim asks
        // this node, finds no one answering, and takes the id at once) rather than sent as
        // one delete per client while the node is going away.
        if self.broker.upgrade().is_none_or(|b| b.shutting_down()) {
            return;
        }
        let client_id = client_id.to_string();
        // Called from a connection's drop, which cannot wait: the delete goes on its own.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { me.delete_if_ours(&client_id, nonce).await });
        }
    }
}

/// Creates (or binds) the key-value bucket `bucket`. Its stream is made here as async-nats'
/// `create_key_value` would make it: that call first asks for the account's info, whose reply
/// from nats-server 2.9 async-nats 0.46 cannot parse. Creating is idempotent for an identical
/// configuration; a bucket made with another (say, other replicas) is bound as it is.
pub(crate) async fn bucket_store(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> Result<kv::Store, async_nats::Error> {
    let stream = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(stream).await {
        debug!(bucket, error = %e, "creating a bucket's stream failed; binding it as it is");
    }
    Ok(js.get_key_value(bucket).await?)
}

/// Prefix of a key that is the client id itself (base64url, no padding).
const PLAIN: &str = "i.";
/// Prefix of a key that is the SHA-256 of a long client id (base64url, no padding).
const HASHED: &str = "h.";

/// The bucket key of `client_id`: in KV's key alphabet (`[-/_=.a-zA-Z0-9]`), reversible
/// for ids up to `MAX_PLAIN_KEY` encoded characters (about 190 bytes), hashed past that.
pub fn encode_key(client_id: &str) -> String {
    let plain = BASE64_URL_SAFE_NO_PAD.encode(client_id.as_bytes());
    if plain.len() <= MAX_PLAIN_KEY {
        format!("{PLAIN}{plain}")
    } else {
        format!("{HASHED}{}", BASE64_URL_SAFE_NO_PAD.encode(Sha256::digest(client_id.as_bytes())))
    }
}

/// The client id a plain key encodes (None for hashed or foreign keys). Nothing lists the
/// bucket yet; the tests hold the encoding to being reversible.
#[cfg(test)]
fn decode_key(key: &str) -> Option<String> {
    let bytes = BASE64_URL_SAFE_NO_PAD.decode(key.strip_prefix(PLAIN)?).ok()?;
    String::from_utf8(bytes).ok()
}

fn encode_value(owner: &Owner) -> Bytes {
    // Serialising a struct of strings and an integer cannot fail.
    Bytes::from(serde_json::to_vec(owner).unwrap_or_default())
}

/// The owner a value names; None for a value tern did not write, including one whose node
/// name could not be a subject token (it becomes part of the release request's subject).
fn decode_value(value: &[u8]) -> Option<Owner> {
    let owner: Owner = serde_json::from_slice(value).ok()?;
    let token_ok = (1..=64).contains(&owner.node.len())
        && owner.node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    token_ok.then_some(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KV's key alphabet, as nats-server and async-nats check it.
    fn valid_key(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn keys_round_trip_any_utf8_id() {
        let ids = [
            "a",
            "sensor-1",
            "with.dots..and..empty",
            "spaces and $dollar/#/+",
            "*>",
            "ünïcødé ✓ 日本",
            "\u{0}nul",
            &"x".repeat(192),
        ];
        for id in ids {
            let key = encode_key(id);
            assert!(valid_key(&key), "{id:?} gave the invalid key {key:?}");
            assert_eq!(decode_key(&key).as_deref(), Some(id), "{id:?} did not round-trip");
        }
    }

    #[test]
    fn long_ids_are_hashed_and_distinct() {
        let a = "a".repeat(65_535);
        let mut b = a.clone();
        b.replace_range(0..1, "b");
        let (ka, kb) = (encode_key(&a), encode_key(&b));
        assert!(ka.starts_with(HASHED) && valid_key(&ka) && ka.len() < 64, "{ka}");
        assert_ne!(ka, kb);
        assert_eq!(decode_key(&ka), None, "a hashed key names no id by itself");
        // The longest plain id and the shortest hashed one do not collide on prefix.
        assert!(encode_key(&"x".repeat(192)).starts_with(PLAIN));
        assert!(encode_key(&"x".repeat(193)).starts_with(HASHED));
    }

    #[test]
    fn values_round_trip_and_garbage_is_none() {
        let o = Owner { node: "n1".into(), nonce: u64::MAX, id: Some("long".into()) };
        assert_eq!(decode_value(&encode_value(&o)), Some(o));
        let o = Owner { node: "n2".into(), nonce: 7, id: None };
        assert_eq!(decode_value(&encode_value(&o)), Some(o));
        assert_eq!(decode_value(b"\xff not json"), None);
        for node in ["", "a.b", "n>", "*", "has space"] {
            let o = Owner { node: node.into(), nonce: 1, id: None };
            assert_eq!(decode_value(&encode_value(&o)), None, "node {node:?} is no subject token");
        }
    }
}
