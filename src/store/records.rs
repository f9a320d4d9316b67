//! Byte layouts of stored keys and values. Versioned by `STORE_VERSION` in the meta keyspace.
//!
//! Keys put the client id first, then a 0x00 separator (client ids can never contain U+0000,
//! the codec rejects it), so one client's data is one prefix range in every keyspace.
//! Messages are stored as an MQTT 5 PUBLISH (topic, payload, properties) behind a small
//! header: the codec already knows how to write and strictly re-read every property.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::StoreError;
use crate::message::Message;
use crate::protocol::{self, Packet, ProtocolVersion, PublishOut, QoS};

pub const STORE_VERSION: u32 = 1;

pub fn client_prefix(client: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(client.len() + 1);
    k.extend_from_slice(client.as_bytes());
    k.push(0);
    k
}

pub fn client_key(client: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = client_prefix(client);
    k.extend_from_slice(suffix);
    k
}

/// Splits `client 0x00 suffix`.
pub fn split_client_key(key: &[u8]) -> Option<(ByteString, &[u8])> {
    let i = key.iter().position(|&b| b == 0)?;
    let client = std::str::from_utf8(&key[..i]).ok()?;
    Some((ByteString::from(client), &key[i + 1..]))
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Wall-clock time of a monotonic instant, for storing.
pub fn instant_to_unix_ms(t: Instant) -> u64 {
    now_unix_ms().saturating_sub(Instant::now().saturating_duration_since(t).as_millis() as u64)
}

/// Monotonic instant of a stored wall-clock time (clamped to now for times in the future).
pub fn unix_ms_to_instant(ms: u64) -> Instant {
    let age = now_unix_ms().saturating_sub(ms);
    let now = Instant::now();
    now.checked_sub(std::time::Duration::from_millis(age)).unwrap_or(now)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

fn get_bytes(buf: &mut &[u8], n: usize, what: &str) -> Result<Bytes, StoreError> {
    if buf.remaining() < n {
        return Err(corrupt(what));
    }
    let b = Bytes::copy_from_slice(&buf[..n]);
    buf.advance(n);
    Ok(b)
}

fn need(buf: &&[u8], n: usize, what: &str) -> Result<(), StoreError> {
    if buf.remaining() < n {
        Err(corrupt(what))
    } else {
        Ok(())
    }
}

/// Appends a message: header, then the MQTT 5 PUBLISH carrying topic, payload, properties.
pub fn encode_message(m: &Message, buf: &mut BytesMut) {
    buf.put_u8(m.qos as u8);
    buf.put_u8(u8::from(m.retain));
    buf.put_u64(instant_to_unix_ms(m.received_at));
    match m.expiry_interval {
        Some(e) => {
            buf.put_u8(1);
            buf.put_u32(e);
        }
        None => buf.put_u8(0),
    }
    put_str(buf, m.origin.as_bytes());
    // The same bytes as a v5 PUBLISH of the message's properties; expiry is in the header.
    let p = PublishOut {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: m.topic.as_bytes(),
        packet_id: None,
        payload: &m.payload,
        properties: &m.props_v5,
        message_expiry: None,
        subscription_ids: &[],
        topic_alias: None,
    };
    p.encode(ProtocolVersion::V5, buf);
}

pub fn decode_message(mut buf: &[u8]) -> Result<Message, StoreError> {
    need(&buf, 1 + 1 + 8 + 1, "message header")?;
    let qos = QoS::from_u8(buf.get_u8()).ok_or_else(|| corrupt("message qos"))?;
    let retain = buf.get_u8() != 0;
    let received = buf.get_u64();
    let expiry_interval = if buf.get_u8() == 1 {
        need(&buf, 4, "message expiry")?;
        Some(buf.get_u32())
    } else {
        None
    };
    need(&buf, 2, "message origin")?;
    let n = usize::from(buf.get_u16());
    let origin = get_bytes(&mut buf, n, "message origin")?;
    let origin = ByteString::try_from(origin).map_err(|_| corrupt("message origin utf-8"))?;
    let mut packet = BytesMut::from(buf);
    let p = match protocol::decode(&mut packet, Some(ProtocolVersion::V5), usize::MAX) {
        Ok(Some(Packet::Publish(p))) => p,
        _ => return Err(corrupt("message body")),
    };
    Ok(Message {
        topic: p.topic,
        payload: p.payload,
        qos,
        retain,
        origin,
        received_at: unix_ms_to_instant(received),
        expiry_interval,
        props_v5: protocol::encode_property_list(&p.properties),
    })
}

/// When a stored message expires (unix ms), read from its header alone: the retained index
/// is rebuilt at start-up without loading payloads.
pub fn message_deadline(mut buf: &[u8]) -> Result<Option<u64>, StoreError> {
    need(&buf, 1 + 1 + 8 + 1, "message header")?;
    buf.advance(2);
    let received = buf.get_u64();
    if buf.get_u8() != 1 {
        return Ok(None);
    }
    need(&buf, 4, "message expiry")?;
    Ok(Some(received.saturating_add(u64::from(buf.get_u32()) * 1000)))
}

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub protocol: ProtocolVersion,
    /// Seconds; u32::MAX = never.
    pub expiry_interval: u32,
    /// When the client went away (unix ms); None while connected.
    pub disconnected_at: Option<u64>,
    /// The will of the connected client, kept so that a crash of the broker (which ends the
    /// client's connection abnormally) still publishes it after restart.
    pub will: Option<StoredWill>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// Will Delay Interval, seconds.
    pub delay: u32,
    /// `encode_message` of the will.
    pub message: Bytes,
    /// Who connected with this will: after a restart the will is published with its owner's
    /// rights, as it would have been without the restart. None in records written before
    /// tern stored it (the will is then checked as an anonymous client's).
    pub owner: Option<WillOwner>,
}

/// The rights-relevant part of the principal that left a will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillOwner {
    pub username: Option<String>,
    pub cert_identity: Option<String>,
    pub listener: u16,
}

/// Absent optional string in a record (a length no string of ours reaches).
const NO_STRING: u16 = u16::MAX;

fn put_opt_str(v: &mut Vec<u8>, s: Option<&str>) {
    match s {
        // Names longer than a u16 cannot come from a CONNECT; cut rather than corrupt.
        Some(s) => {
            let b = &s.as_bytes()[..s.len().min(usize::from(NO_STRING) - 1)];
            v.extend_from_slice(&(b.len() as u16).to_be_bytes());
            v.extend_from_slice(b);
        }
        None => v.extend_from_slice(&NO_STRING.to_be_bytes()),
    }
}

fn get_opt_str(b: &mut &[u8], what: &str) -> Result<Option<String>, StoreError> {
    need(b, 2, what)?;
    let n = b.get_u16();
    if n == NO_STRING {
        return Ok(None);
    }
    let raw = get_bytes(b, usize::from(n), what)?;
    String::from_utf8(raw.to_vec()).map(Some).map_err(|_| corrupt(what))
}

pub fn encode_session(r: &SessionRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.push(r.protocol.level());
    v.extend_from_slice(&r.expiry_interval.to_be_bytes());
    match r.disconnected_at {
        Some(t) => {
            v.push(1);
            v.extend_from_slice(&t.to_be_bytes());
        }
        None => v.push(0),
    }
    if let Some(w) = &r.will {
        v.extend_from_slice(&w.delay.to_be_bytes());
        v.extend_from_slice(&(w.message.len() as u32).to_be_bytes());
        v.extend_from_slice(&w.message);
        if let Some(o) = &w.owner {
            v.push(1);
            put_opt_str(&mut v, o.username.as_deref());
            put_opt_str(&mut v, o.cert_identity.as_deref());
            v.extend_from_slice(&o.listener.to_be_bytes());
        }
    }
    v
}

pub fn decode_session(mut b: &[u8]) -> Result<SessionRecord, StoreError> {
    need(&b, 6, "session")?;
    let protocol = match b.get_u8() {
        3 => ProtocolVersion::V31,
        4 => ProtocolVersion::V311,
        5 => ProtocolVersion::V5,
        _ => return Err(corrupt("session protocol")),
    };
    let expiry_interval = b.get_u32();
    let disconnected_at = if b.get_u8() == 1 {
        need(&b, 8, "session disconnect time")?;
        Some(b.get_u64())
    } else {
        None
    };
    let will = if b.is_empty() {
        None
    } else {
        need(&b, 8, "session will")?;
        let delay = b.get_u32();
        let n = b.get_u32() as usize;
        let message = get_bytes(&mut b, n, "session will")?;
        let owner = if b.is_empty() {
            None
        } else {
            if b.get_u8() != 1 {
                return Err(corrupt("session will owner"));
            }
            let username = get_opt_str(&mut b, "session will owner")?;
            let cert_identity = get_opt_str(&mut b, "session will owner")?;
            need(&b, 2, "session will owner")?;
            Some(WillOwner { username, cert_identity, listener: b.get_u16() })
        };
        Some(StoredWill { delay, message, owner })
    };
    Ok(SessionRecord { protocol, expiry_interval, disconnected_at, will })
}

/// A queued outbound message of one session: the subscriber's view (granted QoS, retain
/// flag as sent, subscription ids) and the message.
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub message: std::sync::Arc<Message>,
}

pub fn encode_queued(r: &QueuedRecord) -> Bytes {
    let mut body = BytesMut::new();
    encode_message(&r.message, &mut body);
    encode_queued_parts(r.qos, r.retain, &r.subscription_ids, &body)
}

/// A queued record from the subscriber's view and an already encoded message, so one
/// message going to many persistent sessions is encoded once.
pub fn encode_queued_parts(qos: QoS, retain: bool, subscription_ids: &[u32], message: &[u8]) -> Bytes {
    let ids = &subscription_ids[..subscription_ids.len().min(255)];
    let mut buf = BytesMut::with_capacity(3 + 4 * ids.len() + message.len());
    buf.put_u8(qos as u8);
    buf.put_u8(u8::from(retain));
    buf.put_u8(ids.len() as u8);
    for id in ids {
        buf.put_u32(*id);
    }
    buf.put_slice(message);
    buf.freeze()
}

pub fn decode_queued(mut b: &[u8]) -> Result<QueuedRecord, StoreError> {
    need(&b, 3, "queued header")?;
    let qos = QoS::from_u8(b.get_u8()).ok_or_else(|| corrupt("queued qos"))?;
    let retain = b.get_u8() != 0;
    let n = usize::from(b.get_u8());
    need(&b, 4 * n, "queued subscription ids")?;
    let subscription_ids = (0..n).map(|_| b.get_u32()).collect();
    let message = std::sync::Arc::new(decode_message(b)?);
    Ok(QueuedRecord { qos, retain, subscription_ids, message })
}

/// Where a stored outbound message stands once sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// Sent with this packet id, waiting for PUBACK/PUBREC.
    Sent(u16),
    /// PUBREC received for this packet id, PUBREL sent, waiting for PUBCOMP.
    Released(u16),
}

pub fn encode_inflight(s: InflightState) -> [u8; 3] {
    let (tag, pid) = match s {
        InflightState::Sent(p) => (1, p),
        InflightState::Released(p) => (2, p),
    };
    let p = pid.to_be_bytes();
    [tag, p[0], p[1]]
}

pub fn decode_inflight(b: &[u8]) -> Result<InflightState, StoreError> {
    match b {
        [1, a, c] => Ok(InflightState::Sent(u16::from_be_bytes([*a, *c]))),
        [2, a, c] => Ok(InflightState::Released(u16::from_be_bytes([*a, *c]))),
        _ => Err(corrupt("inflight state")),
    }
}

pub fn encode_subscription(options: crate::protocol::SubscriptionOptions, id: Option<u32>) -> [u8; 6] {
    let mut o = options.qos as u8;
    o |= u8::from(options.no_local) << 2;
    o |= u8::from(options.retain_as_published) << 3;
    o |= (options.retain_handling & 3) << 4;
    let id_bytes = id.unwrap_or(0).to_be_bytes();
    [o, u8::from(id.is_some()), id_bytes[0], id_bytes[1], id_bytes[2], id_bytes[3]]
}

pub fn decode_subscription(b: &[u8]) -> Result<(crate::protocol::SubscriptionOptions, Option<u32>), StoreError> {
    let [o, has, a, c, d, e] = b else { return Err(corrupt("subscription")) };
    let options = crate::protocol::SubscriptionOptions {
        qos: QoS::from_u8(o & 3).ok_or_else(|| corrupt("subscription qos"))?,
        no_local: o & 4 != 0,
        retain_as_published: o & 8 != 0,
        retain_handling: (o >> 4) & 3,
    };
    let id = (*has == 1).then(|| u32::from_be_bytes([*a, *c, *d, *e]));
    Ok((options, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Properties, SubscriptionOptions};
    use std::sync::Arc;

    fn msg() -> Message {
        let properties = Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            message_expiry_interval: Some(30),
            ..Default::default()
        };
        Message::received(
            "a/b".into(),
            Bytes::from_static(b"hello"),
            QoS::ExactlyOnce,
            true,
            properties,
            "pub 1".into(),
        )
    }

    #[test]
    fn queued_round_trip() {
        let r = QueuedRecord {
            qos: QoS::AtLeastOnce,
            retain: true,
            subscription_ids: vec![1, 7],
            message: Arc::new(msg()),
        };
        let back = decode_queued(&encode_queued(&r)).unwrap();
        assert_eq!(back.qos, QoS::AtLeastOnce);
        assert_eq!(back.subscription_ids, vec![1, 7]);
        let (a, b) = (&*back.message, &*r.message);
        assert_eq!(
            (&a.topic, &a.payload, a.qos, a.retain, &a.props_v5, &a.origin, a.expiry_interval),
            (&b.topic, &b.payload, b.qos, b.retain, &b.props_v5, &b.origin, b.expiry_interval)
        );
        assert!(a.received_at.elapsed().as_millis() < 1000);
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let r =
            QueuedRecord { qos: QoS::AtLeastOnce, retain: false, subscription_ids: vec![3], message: Arc::new(msg()) };
        let bytes = encode_queued(&r);
        for n in 0..bytes.len() {
            assert!(decode_queued(&bytes[..n]).is_err(), "prefix {n}");
        }
        let s = encode_session(&SessionRecord {
            protocol: ProtocolVersion::V5,
            expiry_interval: 9,
            disconnected_at: Some(5),
            will: Some(StoredWill {
                delay: 3,
                message: Bytes::from_static(b"w"),
                owner: Some(WillOwner { username: Some("u".into()), cert_identity: None, listener: 2 }),
            }),
        });
        for n in 0..s.len() {
            // Exactly the part before the will is a complete record without a will, and the
            // part before the owner one whose will has no owner (as tern wrote them before).
            if n == 14 {
                assert_eq!(decode_session(&s[..n]).unwrap().will, None);
                continue;
            }
            if n == 23 {
                assert_eq!(decode_session(&s[..n]).unwrap().will.map(|w| w.owner), Some(None));
                continue;
            }
            assert!(decode_session(&s[..n]).is_err(), "session prefix {n}");
        }
    }

    #[test]
    fn will_owner_round_trips() {
        for owner in [
            None,
            Some(WillOwner { username: None, cert_identity: None, listener: 0 }),
            Some(WillOwner { username: Some("ü".into()), cert_identity: Some("CN".into()), listener: 65535 }),
            Some(WillOwner { username: Some(String::new()), cert_identity: None, listener: 1 }),
        ] {
            let s = SessionRecord {
                protocol: ProtocolVersion::V5,
                expiry_interval: 1,
                disconnected_at: None,
                will: Some(StoredWill { delay: 0, message: Bytes::from_static(b"msg"), owner }),
            };
            assert_eq!(decode_session(&encode_session(&s)).unwrap(), s);
        }
    }

    #[test]
    fn small_records_round_trip() {
        let s = SessionRecord {
            protocol: ProtocolVersion::V311,
            expiry_interval: u32::MAX,
            disconnected_at: None,
            will: None,
        };
        assert_eq!(decode_session(&encode_session(&s)).unwrap(), s);
        let o = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
        };
        assert_eq!(decode_subscription(&encode_subscription(o, Some(99))).unwrap(), (o, Some(99)));
        for st in [InflightState::Sent(1), InflightState::Released(65535)] {
            assert_eq!(decode_inflight(&encode_inflight(st)).unwrap(), st);
        }
        assert_eq!(split_client_key(&client_key("c d", b"x")), Some(("c d".into(), &b"x"[..])));
    }
}
