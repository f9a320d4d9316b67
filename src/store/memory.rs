//! A backend in process memory, with the same keys and values as the fjall one, so the
//! commit machinery and recovery decoding can be tested without a disk.

use std::collections::BTreeMap;

use super::progress::{LoadProgress, Tally, REPORT_EVERY};
use super::records::*;
use super::{Backend, Op, QueueSummary, Recovered, RecoveredRetained, StoreError};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemoryBackend {
    sessions: Map,
    subscriptions: Map,
    queue: Map,
    inflight: Map,
    inbound: Map,
    retained: Map,
}

fn remove_prefix(m: &mut Map, prefix: &[u8]) {
    let keys: Vec<Vec<u8>> =
        m.range(prefix.to_vec()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, _)| k.clone()).collect();
    for k in keys {
        m.remove(&k);
    }
}

impl Backend for MemoryBackend {
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            match op {
                Op::PutSession { client, record } => {
                    self.sessions.insert(client.as_bytes().to_vec(), encode_session(record));
                }
                Op::DeleteSession { client } => {
                    self.sessions.remove(&client.as_bytes()[..]);
                    let p = client_prefix(client);
                    for m in [&mut self.subscriptions, &mut self.queue, &mut self.inflight, &mut self.inbound] {
                        remove_prefix(m, &p);
                    }
                }
                Op::PutSubscription { client, filter, options, id } => {
                    self.subscriptions
                        .insert(client_key(client, filter.as_bytes()), encode_subscription(*options, *id).to_vec());
                }
                Op::DeleteSubscription { client, filter } => {
                    self.subscriptions.remove(&client_key(client, filter.as_bytes()));
                }
                Op::PutQueued { client, seq, value } => {
                    self.queue.insert(client_key(client, &seq.to_be_bytes()), value.to_vec());
                }
                Op::SetInflight { client, seq, state } => {
                    self.inflight.insert(client_key(client, &seq.to_be_bytes()), encode_inflight(*state).to_vec());
                }
                Op::DeleteQueued { client, seq } => {
                    let k = client_key(client, &seq.to_be_bytes());
                    self.queue.remove(&k);
                    self.inflight.remove(&k);
                }
                Op::PutInbound { client, packet_id } => {
                    self.inbound.insert(client_key(client, &packet_id.to_be_bytes()), Vec::new());
                }
                Op::DeleteInbound { client, packet_id } => {
                    self.inbound.remove(&client_key(client, &packet_id.to_be_bytes()));
                }
                Op::PutRetained { topic, value } => {
                    self.retained.insert(topic.as_bytes().to_vec(), value.to_vec());
                }
                Op::DeleteRetained { topic } => {
                    self.retained.remove(&topic.as_bytes()[..]);
                }
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn load(&mut self) -> Result<Recovered, StoreError> {
        decode_all(
            self.sessions.iter().map(|(k, v)| Ok((k.clone(), v.clone()))),
            self.subscriptions.iter().map(|(k, v)| Ok((k.clone(), v.clone()))),
            self.queue.iter().map(|(k, v)| Ok((k.clone(), v.clone()))),
            |k| Ok(self.inflight.get(k).cloned()),
            self.inbound.iter().map(|(k, v)| Ok((k.clone(), v.clone()))),
            self.retained.iter().map(|(k, v)| Ok((k.clone(), v.clone()))),
            false,
            &LoadProgress::default(),
        )
    }
}

type Kv = Result<(Vec<u8>, Vec<u8>), StoreError>;

/// Turns raw key/value pairs of every keyspace into `Recovered`; shared by both backends.
/// Counts what it reads into `progress` (and logs it when that takes a while).
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_all(
    sessions: impl Iterator<Item = Kv>,
    subscriptions: impl Iterator<Item = Kv>,
    queue: impl Iterator<Item = Kv>,
    inflight: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
    inbound: impl Iterator<Item = Kv>,
    retained: impl Iterator<Item = Kv>,
    lazy: bool,
    progress: &LoadProgress,
) -> Result<Recovered, StoreError> {
    let bad_key = |what: &str| StoreError::Corrupt(format!("{what} key"));
    let mut r = Recovered::default();
    let mut tally = Tally::new(progress, REPORT_EVERY);
    let mut counted = |kv: Kv| {
        if let Ok((k, v)) = &kv {
            tally.add(k.len() + v.len());
        }
        kv
    };
    for kv in sessions {
        let (k, v) = counted(kv)?;
        let client = String::from_utf8(k).map_err(|_| bad_key("session"))?;
        r.sessions.push((client.into(), decode_session(&v)?));
    }
    for kv in subscriptions {
        let (k, v) = counted(kv)?;
        let (client, filter) = split_client_key(&k).ok_or_else(|| bad_key("subscription"))?;
        let filter = std::str::from_utf8(filter).map_err(|_| bad_key("subscription"))?;
        let (options, id) = decode_subscription(&v)?;
        r.subscriptions.push((client, filter.into(), options, id));
    }
    for kv in queue {
        let (k, v) = counted(kv)?;
        let (client, seq) = split_client_key(&k).ok_or_else(|| bad_key("queue"))?;
        let seq = u64::from_be_bytes(seq.try_into().map_err(|_| bad_key("queue"))?);
        let state = inflight(&k)?.map(|s| decode_inflight(&s)).transpose()?;
        let rec = decode_queued(&v)?;
        if lazy && state.is_none() {
            // Read back when its client returns (`QueueReader`): only counted here, so a
            // large offline queue does not have to fit in memory at start-up.
            let size = rec.message.held_bytes();
            match r.backlogs.last_mut() {
                Some((c, b)) if *c == client => {
                    b.count += 1;
                    b.bytes += size;
                    b.last = seq;
                }
                _ => r.backlogs.push((client, QueueSummary { count: 1, bytes: size, first: seq, last: seq })),
            }
            continue;
        }
        r.queued.push((client, seq, rec, state));
    }
    for kv in inbound {
        let (k, _) = counted(kv)?;
        let (client, pid) = split_client_key(&k).ok_or_else(|| bad_key("inbound"))?;
        let pid = u16::from_be_bytes(pid.try_into().map_err(|_| bad_key("inbound"))?);
        r.inbound.push((client, pid));
    }
    for kv in retained {
        let (k, v) = counted(kv)?;
        if lazy {
            let topic = String::from_utf8(k).map_err(|_| bad_key("retained"))?;
            r.retained.push(RecoveredRetained::Indexed { topic: topic.into(), expires_at_ms: message_deadline(&v)? });
        } else {
            r.retained.push(RecoveredRetained::Loaded(std::sync::Arc::new(decode_message(&v)?)));
        }
    }
    Ok(r)
}
