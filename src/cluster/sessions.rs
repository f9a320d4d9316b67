//! Persistent sessions that survive their node: each one's record in the key-value bucket
//! `<name>_sessions` (keyed as `owners` keys client ids: protocol, expiry, subscriptions,
//! consumer), and its own durable pull consumer of the messages stream, from which alone its
//! QoS 1/2 messages come while its client is connected here (nobody pulls while it is away:
//! its backlog waits in JetStream).
//!
//! Owns the bucket, the consumers of sessions and the tasks pulling from them. Drives the
//! broker only through its sessions seam (`broker::ClusterSessions`, `deliver_from_stream`);
//! must not know sockets or MQTT packets.
//!
//! Taking a session on (any node, after the id's claim): the consumer is made again from its
//! acknowledgement floor + 1, so that every message its client has not acknowledged comes
//! again, in stream order; each goes out with the packet id its stream sequence gives, so a
//! QoS 2 PUBLISH the client has PUBREC'd comes back with the id it knows. A consumer that
//! expired (`inactive_threshold` = the session expiry, counted while nobody pulls) means the
//! session expired: it does not come back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::ConsumerInfoErrorKind, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::owners::{bucket_store, encode_key};
use super::{inbound, Names, RateLimited};
use crate::broker::{
    Broker, ClusterSessions, Delivered, Refused, Replicated, SessionHandle, SessionSnapshot, SessionStep, EXPIRY_NEVER,
};
use crate::protocol::{ProtocolVersion, QoS, SubscriptionOptions};

/// How long one bucket or consumer operation may take before the CONNECT or SUBSCRIBE is
/// refused.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// A consumer whose session ends with its connection (resumed with expiry 0) still goes away
/// by itself this long after its node died.
const ZERO_EXPIRY_THRESHOLD: Duration = Duration::from_secs(60);
/// JetStream sends a message again when it has not been acknowledged this long; the puller
/// ignores such repeats (the message is in the session already).
const ACK_WAIT: Duration = Duration::from_secs(60);

/// A session's record in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// MQTT protocol level (3, 4, 5).
    v: u8,
    expiry: u32,
    consumer: String,
    subs: Vec<Sub>,
    /// The whole client id, kept only when the key is its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// QoS 2 deliveries the client PUBREC'd: (stream sequence, packet id). Written before
    /// their PUBREL goes out and before their stream message is acknowledged, so that the
    /// node that takes the session on sends the PUBREL again, and never the PUBLISH (the
    /// client may have PUBCOMP'd and forgotten the id: a PUBLISH would be a new message to
    /// it). Forgotten after PUBCOMP, in a write nothing waits for (completions made
    /// meanwhile share it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rel: Vec<(u64, u16)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sub {
    f: String,
    q: u8,
    #[serde(default)]
    nl: bool,
    #[serde(default)]
    rap: bool,
    #[serde(default)]
    rh: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
}

fn level(v: ProtocolVersion) -> u8 {
    match v {
        ProtocolVersion::V31 => 3,
        ProtocolVersion::V311 => 4,
        ProtocolVersion::V5 => 5,
    }
}

/// The consumer of a client id's session: `s-` and 32 hex digits of its SHA-256 (a consumer
/// name may not hold `.`, `*`, `>` or spaces, which client ids may).
fn consumer_name(client_id: &str) -> String {
    let digest = Sha256::digest(client_id.as_bytes());
    let mut name = String::with_capacity(34);
    name.push_str("s-");
    for b in &digest[..16] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// A session served by a connection of this node.
struct Active {
    connection_id: u64,
    expiry: u32,
    /// Stream sequences acknowledged, for the pulling task to acknowledge in JetStream.
    acks: mpsc::UnboundedSender<u64>,
    /// Serialises the record's writes, so that the last write has the last subscriptions;
    /// guards the released deliveries the record keeps (`Record::rel`).
    writes: Arc<tokio::sync::Mutex<Vec<(u64, u16)>>>,
    /// Packet ids PUBCOMP'd since, to leave out of the record's next write.
    completed: Arc<Mutex<Vec<u16>>>,
}

/// A session taken on by `prepare`, until `start`: its consumer, made again, and the last
/// stream sequence that may have gone out before (resent with DUP).
struct Taken {
    consumer: consumer::PullConsumer,
    resend_through: u64,
    rel: Vec<(u64, u16)>,
}

pub(crate) struct Sessions {
    kv: kv::Store,
    msgs: stream::Stream,
    names: Arc<Names>,
    broker: Weak<Broker>,
    /// `max_ack_pending` of a session's consumer: its messages held here unacknowledged
    /// (queued or in flight) at most (`limits.max_queued_messages`).
    max_pending: i64,
    active: Mutex<HashMap<Box<str>, Active>>,
    taken: Mutex<HashMap<Box<str>, Taken>>,
    me: Weak<Sessions>,
}

impl Sessions {
    /// Creates (or binds) the bucket `<name>_sessions` and installs the keeper in `broker`.
    pub(crate) async fn start(
        js: &jetstream::Context,
        msgs: stream::Stream,
        names: Arc<Names>,
        name: &str,
        replicas: usize,
        broker: &Arc<Broker>,
    ) -> Result<Arc<Sessions>, async_nats::Error> {
        let kv = bucket_store(js, &format!("{name}_sessions"), "tern: persistent sessions", replicas).await?;
        let max_pending = i64::try_from(broker.config.limits.max_queued_messages).unwrap_or(i64::MAX).max(1);
        let sessions = Arc::new_cyclic(|me| Sessions {
            kv,
            msgs,
            names,
            broker: Arc::downgrade(broker),
            max_pending,
            active: Mutex::new(HashMap::new()),
            taken: Mutex::new(HashMap::new()),
            me: me.clone(),
        });
        if !broker.install_sessions(Arc::clone(&sessions) as Arc<dyn ClusterSessions>) {
            warn!("a cluster session keeper was installed already; this one is not used");
        }
        Ok(sessions)
    }

    async fn read(&self, client_id: &str) -> Result<Option<(u64, Record)>, Refused> {
        let entry = match tokio::time::timeout(OP_TIMEOUT, self.kv.entry(encode_key(client_id))).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                warn!(client_id, error = %e, "reading a cluster session failed");
                return Err(Refused::Unavailable);
            }
            Err(_) => return Err(Refused::Unavailable),
        };
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else { return Ok(None) };
        match serde_json::from_slice::<Record>(&entry.value) {
            Ok(r) if r.id.as_deref().is_none_or(|id| id == client_id) => Ok(Some((entry.revision, r))),
            Ok(_) => {
                warn!(client_id, "another client id has the same sessions key; refused");
                Err(Refused::Unavailable)
            }
            Err(e) => {
                warn!(client_id, error = %e, "cluster session record unreadable; the session starts anew");
                Ok(None)
            }
        }
    }

    /// Forgets the session of `client_id`: its consumer and its record.
    async fn discard(&self, client_id: &str, consumer: &str) -> Result<(), Refused> {
        self.delete_consumer(consumer).await?;
        match tokio::time::timeout(OP_TIMEOUT, self.kv.delete(encode_key(client_id))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(client_id, error = %e, "deleting a cluster session failed");
                Err(Refused::Unavailable)
            }
            Err(_) => Err(Refused::Unavailable),
        }
    }

    async fn delete_consumer(&self, name: &str) -> Result<(), Refused> {
        match tokio::time::timeout(OP_TIMEOUT, self.msgs.delete_consumer(name)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => match e.kind() {
                stream::ConsumerErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
                {
                    Ok(())
                }
                _ => {
                    warn!(consumer = name, error = %e, "deleting a session's consumer failed");
                    Err(Refused::Unavailable)
                }
            },
            Err(_) => Err(Refused::Unavailable),
        }
    }

    /// Makes the consumer `name` anew, delivering from `start` (None: what is published from
    /// now on).
    async fn make_consumer(
        &self,
        name: &str,
        start: Option<u64>,
        expiry: u32,
    ) -> Result<consumer::PullConsumer, Refused> {
        self.delete_consumer(name).await?;
        let inactive_threshold = match expiry {
            0 => ZERO_EXPIRY_THRESHOLD,
            EXPIRY_NEVER => Duration::ZERO,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let config = consumer::pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: format!("{}.>", self.names.msgs),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: match start {
                None => consumer::DeliverPolicy::New,
                Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            },
            ack_wait: ACK_WAIT,
            max_ack_pending: self.max_pending,
            inactive_threshold,
            ..Default::default()
        };
        match tokio::time::timeout(OP_TIMEOUT, self.msgs.create_consumer(config)).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                warn!(consumer = name, error = %e, "creating a session's consumer failed");
                Err(Refused::Unavailable)
            }
            Err(_) => Err(Refused::Unavailable),
        }
    }

    async fn prepare_inner(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: u32,
    ) -> Result<Option<SessionSnapshot>, Refused> {
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
        let Some((_, record)) = self.read(client_id).await? else { return Ok(None) };
        if clean_start {
            self.discard(client_id, &record.consumer).await?;
            return Ok(None);
        }
        let info = match tokio::time::timeout(OP_TIMEOUT, self.msgs.consumer_info(&record.consumer)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                info!(client_id, "cluster session expired (its consumer is gone)");
                self.discard(client_id, &record.consumer).await?;
                return Ok(None);
            }
            Ok(Err(e)) => {
                if let ConsumerInfoErrorKind::JetStream(j) = e.kind() {
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND {
                        info!(client_id, "cluster session expired (its consumer is gone)");
                        self.discard(client_id, &record.consumer).await?;
                        return Ok(None);
                    }
                }
                warn!(client_id, error = %e, "reading a session's consumer failed");
                return Err(Refused::Unavailable);
            }
            Err(_) => return Err(Refused::Unavailable),
        };
        // Everything past the acknowledgement floor comes again, in stream order.
        let start = info.ack_floor.stream_sequence + 1;
        let resend_through = info.delivered.stream_sequence;
        let consumer = self.make_consumer(&record.consumer, Some(start), expiry).await?;
        debug!(client_id, start, resend_through, "cluster session taken on");
        let released = record.rel.iter().map(|&(_, pid)| pid).collect();
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.into(), Taken { consumer, resend_through, rel: record.rel });
        let subscriptions = record
            .subs
            .iter()
            .filter_map(|s| {
                let options = SubscriptionOptions {
                    qos: QoS::from_u8(s.q)?,
                    no_local: s.nl,
                    retain_as_published: s.rap,
                    retain_handling: s.rh,
                };
                Some((Box::from(s.f.as_str()), options, s.id))
            })
            .collect();
        Ok(Some(SessionSnapshot { subscriptions, released }))
    }

    /// Writes the record of `handle`'s session as it is now, with the released deliveries
    /// `rel`.
    async fn write(&self, handle: &SessionHandle, expiry: u32, rel: &[(u64, u16)]) -> Result<(), Refused> {
        let client_id = &*handle.client_id;
        let (v, subs) = {
            let cell = handle.lock();
            (level(cell.protocol), cell.subscriptions.entries())
        };
        let key = encode_key(client_id);
        let record = Record {
            v,
            expiry,
            consumer: consumer_name(client_id),
            subs: subs
                .into_iter()
                .map(|(f, o, id)| Sub {
                    f: f.into(),
                    q: o.qos as u8,
                    nl: o.no_local,
                    rap: o.retain_as_published,
                    rh: o.retain_handling,
                    id,
                })
                .collect(),
            id: key.starts_with("h.").then(|| client_id.to_string()),
            rel: rel.to_vec(),
        };
        let value = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
        match tokio::time::timeout(OP_TIMEOUT, self.kv.put(key, value)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                warn!(client_id, error = %e, "writing a cluster session failed");
                Err(Refused::Unavailable)
            }
            Err(_) => Err(Refused::Unavailable),
        }
    }

    async fn start_inner(
        &self,
        handle: &Arc<SessionHandle>,
        connection_id: u64,
        expiry: u32,
        resumed: bool,
    ) -> Result<(), Refused> {
        let client_id = &*handle.client_id;
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner()).remove(client_id);
        let (consumer, resend_through, rel) = match (resumed, taken) {
            (true, Some(t)) => (t.consumer, t.resend_through, t.rel),
            _ => (self.make_consumer(&consumer_name(client_id), None, expiry).await?, 0, Vec::new()),
        };
        self.write(handle, expiry, &rel).await?;
        // Released messages may still be in the stream (their acknowledgement lost with
        // their node): they are acknowledged, not delivered again.
        let skip = rel.iter().map(|&(seq, _)| seq).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let writes = Arc::new(tokio::sync::Mutex::new(rel));
        let completed = Arc::new(Mutex::new(Vec::new()));
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client_id.into(), Active { connection_id, expiry, acks: tx, writes, completed });
        tokio::spawn(pull(
            self.broker.clone(),
            Arc::clone(handle),
            consumer,
            rx,
            resend_through,
            skip,
            Arc::clone(&self.names),
        ));
        Ok(())
    }
}

/// Why a session's record is written again.
#[derive(Debug, Clone, Copy)]
enum Change {
    Subscriptions,
    /// The client PUBREC'd (stream sequence, packet id).
    Released(u64, u16),
    Completed,
}

impl Sessions {
    /// Writes the session's record (subscriptions as they are now, released deliveries with
    /// `released` added and the completed ones left out), then completes `done`; a released
    /// delivery's stream message is acknowledged once the record has it.
    fn update(&self, handle: &Arc<SessionHandle>, change: Change, done: Arc<Replicated>) {
        let found = {
            let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            active
                .get(&*handle.client_id)
                .map(|a| (a.expiry, Arc::clone(&a.writes), Arc::clone(&a.completed), a.acks.clone()))
        };
        let (Some((expiry, writes, completed, acks)), Some(me)) = (found, self.me.upgrade()) else {
            done.complete(false);
            return;
        };
        // Lock taken in call order: `tokio::sync::Mutex` is fair, and the write reads the
        // subscriptions once it has it, so the last write has the latest.
        let handle = Arc::clone(handle);
        tokio::spawn(async move {
            let mut rel = writes.lock().await;
            let gone = std::mem::take(&mut *completed.lock().unwrap_or_else(|e| e.into_inner()));
            let before = rel.len();
            if !gone.is_empty() {
                rel.retain(|(_, pid)| !gone.contains(pid));
            }
            if matches!(change, Change::Completed) && rel.len() == before {
                // Completions only, none of them recorded (or taken by a write before this
                // one): nothing to write.
                done.complete(true);
                return;
            }
            if let Change::Released(seq, pid) = change {
                // A PUBREC repeated for an id (a client answering a PUBLISH sent again) is
                // recorded once.
                rel.retain(|&(_, p)| p != pid);
                rel.push((seq, pid));
            }
            let ok = me.write(&handle, expiry, &rel).await.is_ok();
            match (ok, change) {
                (true, Change::Released(seq, _)) => {
                    let _ = acks.send(seq);
                }
                (false, Change::Released(_, pid)) => rel.retain(|&(_, p)| p != pid),
                _ => {}
            }
            done.complete(ok);
        });
    }
}

impl ClusterSessions for Sessions {
    fn prepare<'a>(
        &'a self,
        client_id: &'a str,
        clean_start: bool,
        expiry: u32,
    ) -> SessionStep<'a, Option<SessionSnapshot>> {
        Box::pin(self.prepare_inner(client_id, clean_start, expiry))
    }

    fn start<'a>(
        &'a self,
        handle: &'a Arc<SessionHandle>,
        connection_id: u64,
        expiry: u32,
        resumed: bool,
    ) -> SessionStep<'a, ()> {
        Box::pin(self.start_inner(handle, connection_id, expiry, resumed))
    }

    fn save(&self, handle: &Arc<SessionHandle>, done: Arc<Replicated>) {
        self.update(handle, Change::Subscriptions, done);
    }

    fn released(&self, handle: &Arc<SessionHandle>, seq: u64, packet_id: u16, done: Arc<Replicated>) {
        self.update(handle, Change::Released(seq, packet_id), done);
    }

    fn completed(&self, handle: &Arc<SessionHandle>, packet_id: u16) {
        let first = {
            let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let Some(a) = active.get(&*handle.client_id) else { return };
            let mut completed = a.completed.lock().unwrap_or_else(|e| e.into_inner());
            completed.push(packet_id);
            completed.len() == 1
        };
        if first {
            // One write takes every completion made until it runs.
            self.update(handle, Change::Completed, Replicated::new(None));
        }
    }

    fn acked(&self, client_id: &str, seq: u64) {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = active.get(client_id) {
            let _ = a.acks.send(seq);
        }
    }

    fn stop(&self, client_id: &str, connection_id: u64, end: bool) {
        {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if active.get(client_id).is_some_and(|a| a.connection_id == connection_id) {
                // Dropping the sender ends the pulling task once it has passed on the
                // acknowledgements already sent.
                active.remove(client_id);
            }
        }
        let Some(me) = self.me.upgrade().filter(|_| end) else { return };
        let client_id = client_id.to_string();
        tokio::spawn(async move {
            if let Err(why) = me.discard(&client_id, &consumer_name(&client_id)).await {
                warn!(
                    client_id,
                    ?why,
                    "a cluster session that ended could not be deleted; its consumer expires by itself"
                );
            }
        });
    }
}

/// Feeds one session from its consumer while its connection is here: each message matching
/// its subscriptions is queued with its stream sequence; those that match nothing (or go out
/// at QoS 0) are acknowledged at once, the others when the client acknowledges them.
async fn pull(
    broker: Weak<Broker>,
    handle: Arc<SessionHandle>,
    consumer: consumer::PullConsumer,
    mut acks: mpsc::UnboundedReceiver<u64>,
    resend_through: u64,
    skip: std::collections::HashSet<u64>,
    names: Arc<Names>,
) {
    let log = RateLimited::new();
    let mut held: HashMap<u64, jetstream::Message> = HashMap::new();
    let mut highest = 0u64;
    let mut messages = None;
    loop {
        if messages.is_none() {
            match consumer.messages().await {
                Ok(m) => messages = Some(m),
                Err(e) => {
                    if let Some(skipped) = log.check() {
                        warn!(client_id = %handle.client_id, error = %e, similar_not_logged = skipped, "session consumer unavailable; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        seq = acks.recv() => match seq {
                            Some(seq) => { ack(&mut held, seq, &log).await; continue }
                            None => return,
                        },
                    }
                }
            }
        }
        let Some(stream) = messages.as_mut() else { continue };
        tokio::select! {
            biased;
            seq = acks.recv() => match seq {
                Some(seq) => ack(&mut held, seq, &log).await,
                None => return,
            },
            item = stream.next() => {
                let m = match item {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        if let Some(skipped) = log.check() {
                            warn!(client_id = %handle.client_id, error = %e, similar_not_logged = skipped, "session consumer error");
                        }
                        continue;
                    }
                    None => {
                        messages = None;
                        continue;
                    }
                };
                let Ok(seq) = m.info().map(|i| i.stream_sequence) else { continue };
                if seq <= highest {
                    // Sent again after `ACK_WAIT`: it is in the session already.
                    if held.contains_key(&seq) {
                        held.insert(seq, m);
                    }
                    continue;
                }
                highest = seq;
                if skip.contains(&seq) {
                    // Released before: its PUBREL went out again from the session's state.
                    let _ = m.ack().await;
                    continue;
                }
                let Some(b) = broker.upgrade() else { return };
                let Some(msg) = inbound::decode(&names, &m, true) else {
                    let _ = m.ack().await;
                    continue;
                };
                if handle.lock().ended {
                    return;
                }
                match b.deliver_from_stream(&handle, Arc::new(msg), seq, seq <= resend_through) {
                    Some((Delivered::Queued | Delivered::Full, qos)) if qos != QoS::AtMostOnce => {
                        held.insert(seq, m);
                    }
                    // Dropped at the session's bound: JetStream keeps it for the session's
                    // next taking on.
                    Some((Delivered::Dropped(_), q)) if q != QoS::AtMostOnce => {}
                    _ => {
                        if let Err(e) = m.ack().await {
                            debug!(error = %e, "acknowledging a session's message failed");
                        }
                    }
                }
            }
        }
    }
}

async fn ack(held: &mut HashMap<u64, jetstream::Message>, seq: u64, log: &RateLimited) {
    let Some(m) = held.remove(&seq) else { return };
    if let Err(e) = m.ack().await {
        if let Some(skipped) = log.check() {
            warn!(error = %e, similar_not_logged = skipped, "acknowledging a session's message failed (it comes again)");
        }
    }
}
