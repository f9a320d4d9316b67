//! MQTT 5 properties (section 2.2.2): reading them with the per-packet rules, writing them,
//! and measuring them.
//!
//! Owns: which property may appear in which packet (the table of 2.2.2.2), which may appear
//! more than once, and the value ranges the specification fixes for single properties.

use super::decode::DecodeError;
use super::packet::Properties;
use super::reader::Reader;
use super::topic::valid_topic_name;
use bytes::{BufMut, BytesMut};
use bytestring::ByteString;

/// The packet (or CONNECT's will) a property section belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Ctx {
    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

const CONNECT: u16 = Ctx::Connect.bit();
const WILL: u16 = Ctx::Will.bit();
const CONNACK: u16 = Ctx::ConnAck.bit();
const PUBLISH: u16 = Ctx::Publish.bit();
const PUBRESP: u16 = Ctx::PubResp.bit();
const SUBSCRIBE: u16 = Ctx::Subscribe.bit();
const SUBACK: u16 = Ctx::SubAck.bit();
const UNSUBACK: u16 = Ctx::UnsubAck.bit();
const DISCONNECT: u16 = Ctx::Disconnect.bit();
const AUTH: u16 = Ctx::Auth.bit();
const ALL: u16 = u16::MAX;

/// Section 2.2.2.2: the packets each property identifier may appear in. `None` = unknown id.
fn allowed_in(id: u8) -> Option<u16> {
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | PUBRESP | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

/// Reads a property section: the property length, then the properties it covers.
///
/// Error precedence follows mosquitto, which parses the whole section before checking it: any
/// malformation anywhere in the section (truncation, unknown id, bad string) wins over a
/// property that is merely not allowed, duplicated or out of range, which are all reported as
/// the first such problem once parsing has succeeded.
pub(crate) fn read(r: &mut Reader, ctx: Ctx) -> Result<Properties, DecodeError> {
    let len = r.varint()? as usize;
    let mut section = Reader::new(r.take(len)?);
    let mut props = Properties::default();
    let mut seen: u64 = 0;
    let mut deferred: Option<DecodeError> = None;
    while !section.is_empty() {
        let id = section.u8()?;
        let Some(allowed) = allowed_in(id) else {
            // Identifiers are variable byte integers but all defined ones are < 0x80, so any
            // byte with the high bit set starts an unknown identifier as well.
            return Err(DecodeError::Malformed("unknown property identifier"));
        };
        let problem = read_one(&mut section, id, &mut props)?;
        if deferred.is_some() {
            continue;
        }
        if allowed & ctx.bit() == 0 {
            // 2.2.2.2 makes this a Malformed Packet. mosquitto answers 0x82 except in
            // SUBSCRIBE and UNSUBSCRIBE, where it answers 0x81; we match it.
            deferred = Some(match ctx {
                Ctx::Subscribe | Ctx::Unsubscribe => DecodeError::Malformed("property not allowed in this packet"),
                _ => DecodeError::Protocol("property not allowed in this packet"),
            });
            continue;
        }
        let repeatable = id == 0x26 || (id == 0x0B && ctx == Ctx::Publish);
        let bit = 1u64 << id;
        if !repeatable && seen & bit != 0 {
            deferred = Some(DecodeError::Protocol("property appears more than once"));
            continue;
        }
        seen |= bit;
        deferred = problem;
    }
    match deferred {
        Some(e) => Err(e),
        None => Ok(props),
    }
}

/// Reads one property value into `props`. Malformations are returned as `Err`; a value the
/// specification calls a Protocol Error is returned as `Ok(Some(..))` so the caller can rank it.
fn read_one(r: &mut Reader, id: u8, p: &mut Properties) -> Result<Option<DecodeError>, DecodeError> {
    let proto = |ok: bool, what| {
        if ok {
            None
        } else {
            Some(DecodeError::Protocol(what))
        }
    };
    let problem = match id {
        0x01 => flag(r, &mut p.payload_format_indicator, "payload format indicator not 0 or 1")?,
        0x02 => {
            p.message_expiry_interval = Some(r.u32()?);
            None
        }
        0x03 => {
            p.content_type = Some(r.string()?);
            None
        }
        0x08 => {
            let topic = r.string()?;
            // 3.3.2.3.5 / 3.1.3.2.5: the response topic is a topic name, wildcards forbidden.
            let ok = valid_topic_name(&topic);
            p.response_topic = Some(topic);
            proto(ok, "response topic is not a valid topic name")
        }
        0x09 => {
            p.correlation_data = Some(r.binary()?);
            None
        }
        0x0B => {
            let v = r.varint()?;
            if v == 0 {
                // 3.8.2.1.2 / 3.3.2.3.8 call this a Protocol Error; mosquitto answers 0x81
                // (vector "subscription-identifier=0") and we match it.
                return Err(DecodeError::Malformed("subscription identifier 0"));
            }
            p.subscription_identifiers.push(v);
            None
        }
        0x11 => {
            p.session_expiry_interval = Some(r.u32()?);
            None
        }
        0x12 => {
            p.assigned_client_identifier = Some(r.string()?);
            None
        }
        0x13 => {
            p.server_keep_alive = Some(r.u16()?);
            None
        }
        0x15 => {
            p.authentication_method = Some(r.string()?);
            None
        }
        0x16 => {
            p.authentication_data = Some(r.binary()?);
            None
        }
        0x17 => flag(r, &mut p.request_problem_information, "request problem information not 0 or 1")?,
        0x18 => {
            p.will_delay_interval = Some(r.u32()?);
            None
        }
        0x19 => flag(r, &mut p.request_response_information, "request response information not 0 or 1")?,
        0x1A => {
            p.response_information = Some(r.string()?);
            None
        }
        0x1C => {
            p.server_reference = Some(r.string()?);
            None
        }
        0x1F => {
            p.reason_string = Some(r.string()?);
            None
        }
        0x21 => {
            let v = r.u16()?;
            p.receive_maximum = Some(v);
            proto(v != 0, "receive maximum 0")
        }
        0x22 => {
            p.topic_alias_maximum = Some(r.u16()?);
            None
        }
        0x23 => {
            let v = r.u16()?;
            p.topic_alias = Some(v);
            // 0 is checked by the receiver with the maximum it announced: both are "Topic
            // Alias invalid" (0x94), not a protocol error of the packet's form.
            None
        }
        0x24 => flag(r, &mut p.maximum_qos, "maximum QoS not 0 or 1")?,
        0x25 => flag(r, &mut p.retain_available, "retain available not 0 or 1")?,
        0x26 => {
            let k = r.string()?;
            let v = r.string()?;
            p.user_properties.push((k, v));
            None
        }
        0x27 => {
            let v = r.u32()?;
            p.maximum_packet_size = Some(v);
            proto(v != 0, "maximum packet size 0")
        }
        0x28 => flag(r, &mut p.wildcard_subscription_available, "wildcard subscription available not 0 or 1")?,
        0x29 => flag(r, &mut p.subscription_identifiers_available, "subscription identifiers available not 0 or 1")?,
        0x2A => flag(r, &mut p.shared_subscription_available, "shared subscription available not 0 or 1")?,
        _ => return Err(DecodeError::Malformed("unknown property identifier")),
    };
    Ok(problem)
}

/// A byte property whose only legal values are 0 and 1.
fn flag(r: &mut Reader, slot: &mut Option<u8>, what: &'static str) -> Result<Option<DecodeError>, DecodeError> {
    let v = r.u8()?;
    *slot = Some(v);
    Ok((v > 1).then_some(DecodeError::Protocol(what)))
}

/// Bytes of a Variable Byte Integer holding `v`.
pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=0x7F => 1,
        0x80..=0x3FFF => 2,
        0x4000..=0x1F_FFFF => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(buf: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

/// Writes a length-prefixed field. Callers must keep strings and binary fields under 64 KiB,
/// as the protocol requires; longer ones would be cut off in the length prefix.
pub(crate) fn put_bin(buf: &mut BytesMut, b: &[u8]) {
    debug_assert!(b.len() <= usize::from(u16::MAX), "field longer than 65535 bytes");
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

fn str_(v: &Option<ByteString>) -> Option<&[u8]> {
    v.as_ref().map(|s| s.as_bytes().as_ref())
}

/// Length of the property list alone, without its own length prefix.
pub(crate) fn body_len(p: &Properties) -> usize {
    let s = |v: &Option<ByteString>| v.as_ref().map_or(0, |s| 3 + s.len());
    let b = |v: &Option<bytes::Bytes>| v.as_ref().map_or(0, |s| 3 + s.len());
    let n = |v: bool, size: usize| if v { 1 + size } else { 0 };
    n(p.payload_format_indicator.is_some(), 1)
        + n(p.message_expiry_interval.is_some(), 4)
        + s(&p.content_type)
        + s(&p.response_topic)
        + b(&p.correlation_data)
        + p.subscription_identifiers.iter().map(|&v| 1 + varint_len(v as usize)).sum::<usize>()
        + n(p.session_expiry_interval.is_some(), 4)
        + s(&p.assigned_client_identifier)
        + n(p.server_keep_alive.is_some(), 2)
        + s(&p.authentication_method)
        + b(&p.authentication_data)
        + n(p.request_problem_information.is_some(), 1)
        + n(p.will_delay_interval.is_some(), 4)
        + n(p.request_response_information.is_some(), 1)
        + s(&p.response_information)
        + s(&p.server_reference)
        + s(&p.reason_string)
        + n(p.receive_maximum.is_some(), 2)
        + n(p.topic_alias_maximum.is_some(), 2)
        + n(p.topic_alias.is_some(), 2)
        + n(p.maximum_qos.is_some(), 1)
        + n(p.retain_available.is_some(), 1)
        + p.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
        + n(p.maximum_packet_size.is_some(), 4)
        + n(p.wildcard_subscription_available.is_some(), 1)
        + n(p.subscription_identifiers_available.is_some(), 1)
        + n(p.shared_subscription_available.is_some(), 1)
}

/// Writes the property section (length prefix and properties, in identifier order).
pub(crate) fn write(buf: &mut BytesMut, p: &Properties, body: usize) {
    put_varint(buf, body);
    if body == 0 {
        return;
    }
    let u8p = |buf: &mut BytesMut, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u8(v);
        }
    };
    let u16p = |buf: &mut BytesMut, id: u8, v: Option<u16>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u16(v);
        }
    };
    let u32p = |buf: &mut BytesMut, id: u8, v: Option<u32>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u32(v);
        }
    };
    let binp = |buf: &mut BytesMut, id: u8, v: Option<&[u8]>| {
        if let Some(v) = v {
            buf.put_u8(id);
            put_bin(buf, v);
        }
    };
    u8p(buf, 0x01, p.payload_format_indicator);
    u32p(buf, 0x02, p.message_expiry_interval);
    binp(buf, 0x03, str_(&p.content_type));
    binp(buf, 0x08, str_(&p.response_topic));
    binp(buf, 0x09, p.correlation_data.as_deref());
    for &id in &p.subscription_identifiers {
        buf.put_u8(0x0B);
        put_varint(buf, id as usize);
    }
    u32p(buf, 0x11, p.session_expiry_interval);
    binp(buf, 0x12, str_(&p.assigned_client_identifier));
    u16p(buf, 0x13, p.server_keep_alive);
    binp(buf, 0x15, str_(&p.authentication_method));
    binp(buf, 0x16, p.authentication_data.as_deref());
    u8p(buf, 0x17, p.request_problem_information);
    u32p(buf, 0x18, p.will_delay_interval);
    u8p(buf, 0x19, p.request_response_information);
    binp(buf, 0x1A, str_(&p.response_information));
    binp(buf, 0x1C, str_(&p.server_reference));
    binp(buf, 0x1F, str_(&p.reason_string));
    // Topic Alias Maximum before Receive Maximum: the order mosquitto writes its CONNACK in,
    // so clients (and byte-level tests) written against it see identical bytes.
    u16p(buf, 0x22, p.topic_alias_maximum);
    u16p(buf, 0x21, p.receive_maximum);
    u16p(buf, 0x23, p.topic_alias);
    u8p(buf, 0x24, p.maximum_qos);
    u8p(buf, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        buf.put_u8(0x26);
        put_bin(buf, k.as_bytes());
        put_bin(buf, v.as_bytes());
    }
    u32p(buf, 0x27, p.maximum_packet_size);
    u8p(buf, 0x28, p.wildcard_subscription_available);
    u8p(buf, 0x29, p.subscription_identifiers_available);
    u8p(buf, 0x2A, p.shared_subscription_available);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parse(bytes: &[u8], ctx: Ctx) -> Result<Properties, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let p = read(&mut r, ctx)?;
        r.expect_end()?;
        Ok(p)
    }

    fn malformed(bytes: &[u8], ctx: Ctx) {
        assert!(matches!(parse(bytes, ctx), Err(DecodeError::Malformed(_))), "{bytes:02X?}");
    }

    fn protocol(bytes: &[u8], ctx: Ctx) {
        assert!(matches!(parse(bytes, ctx), Err(DecodeError::Protocol(_))), "{bytes:02X?}");
    }

    #[test]
    fn every_property_round_trips() {
        let p = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(7),
            content_type: Some("text/plain".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            subscription_identifiers: vec![1, 268_435_455],
            session_expiry_interval: Some(0xFFFF_FFFF),
            assigned_client_identifier: Some("auto-1".into()),
            server_keep_alive: Some(30),
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"d")),
            request_problem_information: Some(0),
            will_delay_interval: Some(5),
            request_response_information: Some(1),
            response_information: Some("ri".into()),
            server_reference: Some("other".into()),
            reason_string: Some("why".into()),
            receive_maximum: Some(10),
            topic_alias_maximum: Some(0),
            topic_alias: Some(3),
            maximum_qos: Some(1),
            retain_available: Some(0),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "v2".into())],
            maximum_packet_size: Some(1024),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(0),
            shared_subscription_available: Some(1),
        };
        let mut buf = BytesMut::new();
        let body = body_len(&p);
        write(&mut buf, &p, body);
        assert_eq!(buf.len(), varint_len(body) + body);
        // No single packet allows all of them, so read without the per-packet table.
        let mut r = Reader::new(buf.freeze());
        let len = r.varint().unwrap() as usize;
        let mut section = Reader::new(r.take(len).unwrap());
        let mut back = Properties::default();
        while !section.is_empty() {
            let id = section.u8().unwrap();
            assert_eq!(read_one(&mut section, id, &mut back), Ok(None));
        }
        assert_eq!(back, p);
    }

    #[test]
    fn rejections() {
        // not allowed: 0x82 generally, 0x81 in SUBSCRIBE / UNSUBSCRIBE (vectors)
        protocol(&[0x02, 0x01, 0x00], Ctx::Disconnect);
        malformed(&[0x02, 0x01, 0x00], Ctx::Subscribe);
        malformed(&[0x02, 0x01, 0x00], Ctx::Unsubscribe);
        // truncated value of a not-allowed property is malformed first
        malformed(&[0x01, 0x01], Ctx::Disconnect);
        // unknown ids
        malformed(&[0x02, 0x00, 0x01], Ctx::Publish);
        malformed(&[0x03, 0x80, 0x01, 0x01], Ctx::Publish);
        // duplicates
        protocol(&[0x04, 0x01, 0x01, 0x01, 0x01], Ctx::Publish);
        protocol(&[0x04, 0x0B, 0x01, 0x0B, 0x01], Ctx::Subscribe);
        assert!(parse(&[0x04, 0x0B, 0x01, 0x0B, 0x02], Ctx::Publish).is_ok());
        // values
        protocol(&[0x02, 0x01, 0x02], Ctx::Publish);
        protocol(&[0x03, 0x21, 0x00, 0x00], Ctx::Connect);
        protocol(&[0x05, 0x27, 0, 0, 0, 0], Ctx::Connect);
        // Topic alias 0 is the receiver's to refuse (0x94, with its own maximum).
        assert!(parse(&[0x03, 0x23, 0x00, 0x00], Ctx::Publish).is_ok());
        protocol(&[0x02, 0x17, 0x02], Ctx::Connect);
        protocol(&[0x02, 0x24, 0x02], Ctx::ConnAck);
        protocol(&[0x04, 0x08, 0x00, 0x01, b'#'], Ctx::Publish);
        malformed(&[0x02, 0x0B, 0x00], Ctx::Subscribe);
        malformed(&[0x03, 0x0B, 0x80, 0x00], Ctx::Publish);
        malformed(&[0x06, 0x0B, 0x80, 0x80, 0x80, 0x80, 0x01], Ctx::Publish);
        // a malformed property later in the section beats an earlier protocol error
        malformed(&[0x05, 0x01, 0x02, 0x26, 0x00, 0x01], Ctx::Publish);
        // property length past the end
        malformed(&[0x05, 0x01, 0x00], Ctx::Publish);
        // user properties may repeat anywhere
        let p = parse(&[0x0B, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 0, 0, 0], Ctx::PubResp).unwrap();
        assert_eq!(p.user_properties.len(), 2);
    }
}
