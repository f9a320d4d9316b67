//! Rebuilding the broker's state from the store at start-up, before the first accept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;

use super::{split_shared, Broker, Retained, SessionHandle, EXPIRY_NEVER};
use crate::auth::Principal;
use crate::protocol::QoS;
use crate::session::OutState;
use crate::store::records::{decode_message, now_unix_ms};
use crate::store::{InflightState, Op, Recovered, RecoveredRetained};
use crate::topics::Entry;

/// What a start-up recovery brought back (`BrokerHandle::recovery`); the server logs it as
/// one line, "state recovered from the store".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoverySummary {
    /// Persistent sessions kept (those that expired while the broker was down are deleted).
    pub sessions: usize,
    pub subscriptions: usize,
    /// Messages queued for those sessions: in flight, waiting in memory, or left on disk
    /// until their client returns.
    pub queued: usize,
    pub retained: usize,
    /// QoS 2 messages received and not yet released (packet ids awaiting PUBREL).
    pub inbound_qos2: usize,
    /// Wills of clients that were connected when the broker stopped, now due.
    pub wills: usize,
    /// Records deleted because they expired or belong to no session.
    pub discarded: usize,
    /// Records read from the store (0 from a backend that does not count them, such as one
    /// an embedding program brings: only tern's fjall store counts).
    pub records: u64,
    /// Bytes of keys and values read from the store (counted as `records` is).
    pub bytes: u64,
    /// From opening the store to the broker holding its state.
    pub took: Duration,
}

impl Broker {
    /// Loads sessions, subscriptions, queues and retained messages; deletes what expired
    /// while the broker was down; arms expiry timers for the rest. Returns the counts (the
    /// caller adds what it read and how long that took).
    pub fn restore(self: &Arc<Self>, r: Recovered) -> RecoverySummary {
        let now_ms = now_unix_ms();
        let mut ops = Vec::new();
        let mut handles: HashMap<ByteString, Arc<SessionHandle>> = HashMap::new();
        let mut timers = Vec::new();
        let mut wills = Vec::new();
        for (client, rec) in r.sessions {
            // A client connected when the broker stopped left at that moment, as far as its
            // expiry is concerned; we only know it is gone now.
            let away_ms = rec.disconnected_at.map_or(0, |t| now_ms.saturating_sub(t));
            let expiry_ms = u64::from(rec.expiry_interval) * 1000;
            if rec.expiry_interval != EXPIRY_NEVER && away_ms >= expiry_ms {
                ops.push(Op::DeleteSession { client });
                continue;
            }
            let h = Arc::new(SessionHandle::new(
                client.clone(),
                self.queue_limits(),
                0,
                None,
                rec.expiry_interval,
                rec.protocol,
            ));
            h.lock().persisted = true;
            // Connected when the broker died: that connection ended abnormally, so its will
            // is due (after its delay, bounded by the session's remaining life).
            if let (None, Some(w)) = (rec.disconnected_at, &rec.will) {
                // Published with its owner's rights, as it would have been without the restart.
                let o = w.owner.as_ref();
                let owner = Principal {
                    client_id: client.clone(),
                    username: o.and_then(|o| o.username.as_deref()).map(ByteString::from),
                    cert_identity: o.and_then(|o| o.cert_identity.as_deref()).map(Arc::from),
                    listener: o.map_or(0, |o| usize::from(o.listener)),
                };
                match decode_message(&w.message) {
                    Ok(m) => {
                        wills.push((Arc::clone(&h), Arc::new(m), w.delay.min(rec.expiry_interval), Arc::new(owner)))
                    }
                    Err(e) => tracing::warn!(client_id = %client, error = %e, "stored will unreadable, dropped"),
                }
            }
            if rec.expiry_interval != EXPIRY_NEVER {
                timers.push((Arc::clone(&h), Duration::from_millis(expiry_ms - away_ms)));
            }
            handles.insert(client, h);
        }
        let mut subscriptions = 0usize;
        {
            let mut trie = self.subscriptions.write().unwrap_or_else(|e| e.into_inner());
            for (client, filter, options, id) in r.subscriptions {
                let Some(h) = handles.get(&client) else {
                    ops.push(Op::DeleteSubscription { client, filter });
                    continue;
                };
                let (group, plain) = split_shared(&filter);
                trie.subscribe(
                    plain,
                    group,
                    Entry {
                        client: client.clone(),
                        target: Arc::clone(h),
                        options,
                        subscription_id: id,
                        share: group.map(|_| filter.clone()),
                    },
                );
                h.lock().subscriptions.insert(&filter, options, id);
                subscriptions += 1;
            }
        }
        let mut queued = 0usize;
        let now = Instant::now();
        for (client, seq, rec, state) in r.queued {
            let Some(h) = handles.get(&client) else {
                ops.push(Op::DeleteQueued { client, seq });
                continue;
            };
            let mut cell = h.lock();
            cell.next_store_seq = cell.next_store_seq.max(seq + 1);
            if state.is_none() && rec.message.is_expired(now) {
                ops.push(Op::DeleteQueued { client: client.clone(), seq });
                continue;
            }
            // QoS 1 sends are not recorded (a duplicate is allowed, if flagged), so any QoS 1
            // message may have gone out before the crash.
            let maybe_sent = state.is_none() && rec.qos == QoS::AtLeastOnce;
            let d = self.stored_delivery(seq, rec, maybe_sent);
            match state {
                Some(InflightState::Sent(pid)) => cell.state.restore_inflight(pid, d, OutState::AwaitingAck),
                Some(InflightState::Released(pid)) => cell.state.restore_inflight(pid, d, OutState::AwaitingComp),
                None => cell.state.enqueue_unbounded(d),
            }
            queued += 1;
        }
        for (client, b) in r.backlogs {
            let Some(h) = handles.get(&client) else {
                // No live session owns them (it expired while the broker was down, or its
                // record is gone): remove the client's whole prefix.
                ops.push(Op::DeleteSession { client });
                continue;
            };
            let mut cell = h.lock();
            cell.next_store_seq = cell.next_store_seq.max(b.last + 1);
            cell.state.restore_backlog(b.count, b.bytes, b.first, b.last);
            queued += b.count;
        }
        let mut inbound_qos2 = 0usize;
        for (client, pid) in r.inbound {
            match handles.get(&client) {
                Some(h) => {
                    h.lock().state.inbound_qos2_begin(pid);
                    inbound_qos2 += 1;
                }
                None => ops.push(Op::DeleteInbound { client, packet_id: pid }),
            }
        }
        let mut retained = 0usize;
        {
            let mut trie = self.retained.write().unwrap_or_else(|e| e.into_inner());
            for rec in r.retained {
                let (topic, entry) = match rec {
                    RecoveredRetained::Loaded(m) => {
                        if m.is_expired(now) {
                            ops.push(Op::DeleteRetained { topic: m.topic.clone() });
                            continue;
                        }
                        (m.topic.clone(), Retained::Loaded(m))
                    }
                    RecoveredRetained::Indexed { topic, expires_at_ms } => {
                        if expires_at_ms.is_some_and(|t| t <= now_ms) {
                            ops.push(Op::DeleteRetained { topic });
                            continue;
                        }
                        (topic.clone(), Retained::Stored { topic, expires_at_ms })
                    }
                };
                trie.insert(&topic, entry);
                retained += 1;
            }
        }
        let sessions = handles.len();
        for (client, h) in handles {
            self.sessions.insert(client, h);
        }
        for (h, after) in timers {
            self.schedule_expiry(&h, 0, after);
        }
        let discarded = ops.len();
        self.persist(ops);
        let due_wills = wills.len();
        for (h, m, delay, owner) in wills {
            self.publish_will(&h, m, delay, Some(owner));
        }
        RecoverySummary {
            sessions,
            subscriptions,
            queued,
            retained,
            inbound_qos2,
            wills: due_wills,
            discarded,
            ..RecoverySummary::default()
        }
    }
}
