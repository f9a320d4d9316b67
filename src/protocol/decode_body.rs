//! Decoding of each packet's variable header and payload, once framing has isolated its body.
//!
//! Owns: the per-packet field layouts of 3.1, 3.1.1 and 5.0 and the rules about field values
//! (CONNECT flags, PUBLISH topics, subscription options, allowed reason codes, short forms).

use super::decode::DecodeError;
use super::packet::*;
use super::properties::{self as props, Ctx};
use super::reader::Reader;
use super::topic;
use ProtocolVersion::*;

/// CONNECT (3.1). The protocol level inside decides the layout, whatever the connection's.
pub(crate) fn connect(mut r: Reader, flags: u8) -> Result<Packet, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    // A bridge sets the level's top bit (mosquitto's `try_private`); 3.x only.
    let bridge = level & 0x80 != 0 && matches!(level & 0x7F, 3 | 4);
    let protocol = match (&name[..], level & if bridge { 0x7F } else { 0xFF }) {
        (b"MQTT", 4) => V311,
        (b"MQTT", 5) => V5,
        (b"MQIsdp", 3) => V31,
        (b"MQTT", _) => return Err(DecodeError::UnsupportedProtocol { level, name_is_mqtt: true }),
        (b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol { level, name_is_mqtt: false }),
        // [MQTT-3.1.2-1]: the server MAY close without CONNACK; mosquitto does (vector
        // "[MQTT-3.1.2-1]", "short proto").
        _ => return Err(DecodeError::Protocol("unknown protocol name")),
    };
    if flags != 0 && protocol != V31 {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    let cflags = r.u8()?;
    if cflags & 0x01 != 0 && protocol != V31 {
        // [MQTT-3.1.2-3]. MQTT 3.1 only called the bit unused; mosquitto accepts it there
        // (vector "v3.1 CONNECT 10 ok").
        return Err(DecodeError::Malformed("reserved connect flag set"));
    }
    let will_flag = cflags & 0x04 != 0;
    let will_qos = (cflags >> 3) & 0x03;
    let will_retain = cflags & 0x20 != 0;
    let password_flag = cflags & 0x40 != 0;
    let username_flag = cflags & 0x80 != 0;
    if will_qos == 3 {
        // [MQTT-3.1.2-14]
        return Err(DecodeError::Malformed("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        // [MQTT-3.1.2-11] / [MQTT-3.1.2-13] / [MQTT-3.1.2-15]
        return Err(DecodeError::Malformed("will QoS or retain without will flag"));
    }
    if password_flag && !username_flag && protocol != V5 {
        // [MQTT-3.1.2-22]; 5.0 allows a password alone.
        return Err(DecodeError::Malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16()?;
    let properties = if protocol == V5 { props::read(&mut r, Ctx::Connect)? } else { Properties::default() };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if protocol == V5 { props::read(&mut r, Ctx::Will)? } else { Properties::default() };
        let topic = r.string()?;
        if !topic::valid_topic_name(&topic) {
            return Err(DecodeError::Topic("invalid will topic"));
        }
        let payload = r.binary()?;
        let qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
        Some(LastWill { topic, payload, qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };
    r.expect_end()?;
    Ok(Packet::Connect(Box::new(Connect {
        protocol,
        bridge,
        clean_start: cflags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })))
}

/// CONNACK (3.2).
pub(crate) fn connack(mut r: Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        // [MQTT-3.2.2-1]
        return Err(DecodeError::Malformed("reserved CONNACK flags set"));
    }
    let code = r.u8()?;
    let properties = if v.is_v5() {
        if !CONNACK_CODES.contains(&code) {
            return Err(DecodeError::Protocol("invalid CONNACK reason code"));
        }
        props::read(&mut r, Ctx::ConnAck)?
    } else {
        if code > 5 {
            return Err(DecodeError::Protocol("invalid CONNACK return code"));
        }
        Properties::default()
    };
    r.expect_end()?;
    let session_present = ack_flags & 0x01 != 0;
    if session_present && code != 0 {
        // [MQTT-3.2.2-4] (3.1.1) / [MQTT-3.2.2-6] (5.0)
        return Err(DecodeError::Protocol("session present with an error code"));
    }
    Ok(ConnAck { session_present, code, properties })
}

/// PUBLISH (3.3).
pub(crate) fn publish(mut r: Reader, flags: u8, v: ProtocolVersion) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let retain = flags & 0x01 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    if dup && qos == QoS::AtMostOnce && v != V31 {
        // [MQTT-3.3.1-2]; mosquitto answers 0x81. 3.1 did not have the rule.
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(r.packet_id()?) };
    let properties = if v.is_v5() { props::read(&mut r, Ctx::Publish)? } else { Properties::default() };
    if topic.is_empty() {
        // 3.3.2.3.4: "It is a Protocol Error if the Topic Name is zero length and there is no
        // Topic Alias" (mosquitto answers 0x81; listed in tests/conformance-divergences.md).
        // 3.1.1 has no aliases: an empty name breaks [MQTT-4.7.3-1] and the connection closes.
        if properties.topic_alias.is_none() {
            if v.is_v5() {
                return Err(DecodeError::Protocol("empty topic name without a topic alias"));
            }
            return Err(DecodeError::Topic("empty topic name"));
        }
    } else if !topic::valid_topic_name(&topic) {
        // [MQTT-3.3.2-2]
        return Err(DecodeError::Topic("wildcard in topic name"));
    }
    Ok(Publish { dup, qos, retain, topic, packet_id, payload: r.rest(), properties })
}

/// Reason codes PUBACK and PUBREC may carry (3.4.2.1, 3.5.2.1).
pub(crate) const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
/// Reason codes PUBREL and PUBCOMP may carry (3.6.2.1, 3.7.2.1).
pub(crate) const PUBREL_CODES: &[u8] = &[0x00, 0x92];
/// CONNACK reason codes of 5.0 (3.2.2.2).
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B,
    0x9C, 0x9D, 0x9F,
];
/// SUBACK reason codes of 5.0 (3.9.3).
const SUBACK_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
/// UNSUBACK reason codes of 5.0 (3.11.3).
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
/// DISCONNECT reason codes of 5.0 (3.14.2.1), either direction.
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
/// AUTH reason codes (3.15.2.1).
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

/// PUBACK, PUBREC, PUBREL, PUBCOMP (3.4-3.7). In 5.0 the reason code and properties may be
/// left out (remaining length 2) and the properties alone may be left out (length 3).
pub(crate) fn pub_resp(mut r: Reader, v: ProtocolVersion, codes: &[u8]) -> Result<PubResp, DecodeError> {
    if r.remaining() < 2 || (!v.is_v5() && r.remaining() != 2) {
        return Err(DecodeError::Malformed("invalid length for a publish acknowledgement"));
    }
    let packet_id = r.packet_id()?;
    let reason = if r.is_empty() { 0 } else { r.u8()? };
    if !codes.contains(&reason) {
        // Unlisted codes: mosquitto answers 0x82 (vectors "rc=unknown", "rc=20").
        return Err(DecodeError::Protocol("invalid reason code"));
    }
    let properties = if r.is_empty() { Properties::default() } else { props::read(&mut r, Ctx::PubResp)? };
    r.expect_end()?;
    Ok(PubResp { packet_id, reason, properties })
}

/// SUBSCRIBE (3.8).
pub(crate) fn subscribe(mut r: Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v.is_v5() { props::read(&mut r, Ctx::Subscribe)? } else { Properties::default() };
    if r.is_empty() {
        // [MQTT-3.8.3-3]
        return Err(DecodeError::Malformed("SUBSCRIBE without topic filters"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let o = r.u8()?;
        let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            // [MQTT-3.8.3-4] (3.1.1) / [MQTT-3.8.3-5] (5.0)
            return Err(DecodeError::Malformed("reserved subscription option bits set"));
        }
        let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let options = SubscriptionOptions {
            qos,
            no_local: o & 0x04 != 0,
            retain_as_published: o & 0x08 != 0,
            retain_handling: (o >> 4) & 0x03,
        };
        if options.retain_handling == 3 {
            return Err(DecodeError::Malformed("retain handling 3"));
        }
        check_filter(&filter)?;
        if topic::is_shared(&filter) {
            // 4.8.2: "$share/{ShareName}/{filter}". mosquitto treats $share in every version
            // and answers 0x82 to a broken one (vectors "shared sub with no topic").
            if topic::parse_shared(&filter).is_none() {
                return Err(DecodeError::Protocol("invalid shared subscription"));
            }
            if options.no_local {
                // [MQTT-3.8.3-4]
                return Err(DecodeError::Protocol("no local on a shared subscription"));
            }
        }
        filters.push((filter, options));
    }
    Ok(Subscribe { packet_id, filters, properties })
}

fn check_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        // [MQTT-4.7.3-1]
        return Err(DecodeError::Topic("empty topic filter"));
    }
    if !topic::valid_topic_filter(filter) {
        // [MQTT-4.7.1-1] / [MQTT-4.7.1-2]
        return Err(DecodeError::Topic("misplaced wildcard in topic filter"));
    }
    Ok(())
}

/// SUBACK (3.9).
pub(crate) fn suback(mut r: Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v.is_v5() { props::read(&mut r, Ctx::SubAck)? } else { Properties::default() };
    if r.is_empty() {
        return Err(DecodeError::Malformed("SUBACK without return codes"));
    }
    let return_codes = r.rest().to_vec();
    let valid: &dyn Fn(u8) -> bool = if v.is_v5() { &|c| SUBACK_CODES.contains(&c) } else { &|c| c <= 2 || c == 0x80 };
    if !return_codes.iter().all(|&c| valid(c)) {
        return Err(DecodeError::Protocol("invalid SUBACK return code"));
    }
    Ok(SubAck { packet_id, return_codes, properties })
}

/// UNSUBSCRIBE (3.10).
pub(crate) fn unsubscribe(mut r: Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v.is_v5() { props::read(&mut r, Ctx::Unsubscribe)? } else { Properties::default() };
    if r.is_empty() {
        // [MQTT-3.10.3-2]
        return Err(DecodeError::Malformed("UNSUBSCRIBE without topic filters"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        check_filter(&filter)?;
        filters.push(filter);
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

/// UNSUBACK (3.11). 3.1.1 has no payload; 5.0 has one reason code per filter.
pub(crate) fn unsuback(mut r: Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v.is_v5() {
        r.expect_end()?;
        return Ok(UnsubAck { packet_id, reason_codes: Vec::new(), properties: Properties::default() });
    }
    let properties = props::read(&mut r, Ctx::UnsubAck)?;
    if r.is_empty() {
        return Err(DecodeError::Malformed("UNSUBACK without reason codes"));
    }
    let reason_codes = r.rest().to_vec();
    if !reason_codes.iter().all(|c| UNSUBACK_CODES.contains(c)) {
        return Err(DecodeError::Protocol("invalid UNSUBACK reason code"));
    }
    Ok(UnsubAck { packet_id, reason_codes, properties })
}

/// DISCONNECT (3.14). In 5.0 a remaining length of 0 means reason 0 and no properties, 1
/// means no properties.
pub(crate) fn disconnect(mut r: Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
    if !v.is_v5() {
        r.expect_end()?;
        return Ok(Disconnect::default());
    }
    let (reason, properties) = reason_and_props(&mut r, DISCONNECT_CODES, Ctx::Disconnect)?;
    Ok(Disconnect { reason, properties })
}

/// AUTH (3.15), 5.0 only (framing rejects type 15 for older levels). Same short forms as
/// DISCONNECT.
pub(crate) fn auth(mut r: Reader) -> Result<Auth, DecodeError> {
    let (reason, properties) = reason_and_props(&mut r, AUTH_CODES, Ctx::Auth)?;
    Ok(Auth { reason, properties })
}

fn reason_and_props(r: &mut Reader, codes: &[u8], ctx: Ctx) -> Result<(u8, Properties), DecodeError> {
    if r.is_empty() {
        return Ok((0, Properties::default()));
    }
    let reason = r.u8()?;
    if !codes.contains(&reason) {
        return Err(DecodeError::Protocol("invalid reason code"));
    }
    let properties = if r.is_empty() { Properties::default() } else { props::read(r, ctx)? };
    r.expect_end()?;
    Ok((reason, properties))
}
