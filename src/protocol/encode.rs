//! Encoding of every packet type for a given protocol level.
//!
//! Owns: the exact byte shapes we send. 3.x packets carry no properties or reason codes; 5.0
//! packets use the shortest form the specification allows (e.g. `40 02 id id` for a plain
//! PUBACK, `E0 00` for a normal DISCONNECT). Sizes are computed first so every packet is
//! written with one reservation.
//!
//! Callers must respect the protocol's limits (strings and binary fields < 64 KiB, total size
//! < 256 MiB); the encoder does not re-validate packets.

use super::packet::*;
use super::properties::{self as props, put_bin, put_varint, varint_len};
use bytes::{BufMut, BytesMut};
use ProtocolVersion::*;

/// Appends `packet`, encoded for protocol level `version`, to `buf`.
///
/// A CONNECT is written with the name and level of `version` (its `protocol` field is not
/// consulted). AUTH does not exist before 5.0 and writes nothing there.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    let v5 = version.is_v5();
    match packet {
        Packet::Publish(p) => encode_publish(p, v5, buf),
        Packet::PubAck(p) => pub_resp(0x40, p, v5, buf),
        Packet::PubRec(p) => pub_resp(0x50, p, v5, buf),
        Packet::PubRel(p) => pub_resp(0x62, p, v5, buf),
        Packet::PubComp(p) => pub_resp(0x70, p, v5, buf),
        Packet::PingReq => buf.put_slice(&[0xC0, 0x00]),
        Packet::PingResp => buf.put_slice(&[0xD0, 0x00]),
        Packet::Connect(c) => encode_connect(c, version, buf),
        Packet::ConnAck(c) => {
            let (rl, pl) = connack_len(c, v5);
            header(buf, 0x20, rl);
            buf.put_u8(u8::from(c.session_present));
            buf.put_u8(c.code);
            if v5 {
                props::write(buf, &c.properties, pl);
            }
        }
        Packet::Subscribe(s) => {
            let (rl, pl) = subscribe_len(s, v5);
            header(buf, 0x82, rl);
            buf.put_u16(s.packet_id);
            if v5 {
                props::write(buf, &s.properties, pl);
            }
            for (filter, o) in &s.filters {
                put_bin(buf, filter.as_bytes());
                let mut b = o.qos as u8;
                if v5 {
                    b |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0x03) << 4;
                }
                buf.put_u8(b);
            }
        }
        Packet::SubAck(s) => {
            let (rl, pl) = ack_list_len(&s.properties, s.return_codes.len(), v5);
            header(buf, 0x90, rl);
            buf.put_u16(s.packet_id);
            if v5 {
                props::write(buf, &s.properties, pl);
            }
            buf.put_slice(&s.return_codes);
        }
        Packet::Unsubscribe(u) => {
            let (rl, pl) = unsubscribe_len(u, v5);
            header(buf, 0xA2, rl);
            buf.put_u16(u.packet_id);
            if v5 {
                props::write(buf, &u.properties, pl);
            }
            for filter in &u.filters {
                put_bin(buf, filter.as_bytes());
            }
        }
        Packet::UnsubAck(u) => {
            let (rl, pl) = unsuback_len(u, v5);
            header(buf, 0xB0, rl);
            buf.put_u16(u.packet_id);
            if v5 {
                props::write(buf, &u.properties, pl);
                buf.put_slice(&u.reason_codes);
            }
        }
        Packet::Disconnect(d) => reason_packet(0xE0, d.reason, &d.properties, v5, buf),
        Packet::Auth(a) => {
            if v5 {
                reason_packet(0xF0, a.reason, &a.properties, true, buf);
            }
        }
    }
}

/// Total number of bytes [`encode`] appends for `packet` at `version`.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let v5 = version.is_v5();
    let rl = match packet {
        Packet::Publish(p) => publish_len(p, v5).0,
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => pub_resp_len(p, v5).0,
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Connect(c) => connect_len(c, version).0,
        Packet::ConnAck(c) => connack_len(c, v5).0,
        Packet::Subscribe(s) => subscribe_len(s, v5).0,
        Packet::SubAck(s) => ack_list_len(&s.properties, s.return_codes.len(), v5).0,
        Packet::Unsubscribe(u) => unsubscribe_len(u, v5).0,
        Packet::UnsubAck(u) => unsuback_len(u, v5).0,
        Packet::Disconnect(d) => reason_len(d.reason, &d.properties, v5).0,
        Packet::Auth(_) if !v5 => return 0,
        Packet::Auth(a) => reason_len(a.reason, &a.properties, true).0,
    };
    1 + varint_len(rl) + rl
}

fn header(buf: &mut BytesMut, first: u8, remaining: usize) {
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(first);
    put_varint(buf, remaining);
}

/// Property section length (prefix included) and property list length, or zeros before 5.0.
fn props_len(p: &Properties, v5: bool) -> (usize, usize) {
    if !v5 {
        return (0, 0);
    }
    let body = props::body_len(p);
    (varint_len(body) + body, body)
}

/// Remaining length and property list length of a PUBLISH.
fn publish_len(p: &Publish, v5: bool) -> (usize, usize) {
    let (section, body) = props_len(&p.properties, v5);
    let id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
    (2 + p.topic.len() + id + section + p.payload.len(), body)
}

/// The hot path: one reservation, then header, topic, id, properties and payload.
fn encode_publish(p: &Publish, v5: bool, buf: &mut BytesMut) {
    let (rl, pl) = publish_len(p, v5);
    let first = 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain);
    header(buf, first, rl);
    put_bin(buf, p.topic.as_bytes());
    if p.qos != QoS::AtMostOnce {
        buf.put_u16(p.packet_id.unwrap_or(0));
    }
    if v5 {
        props::write(buf, &p.properties, pl);
    }
    buf.put_slice(&p.payload);
}

/// 5.0 short forms (3.4.2.1): no reason code when it is 0 and there are no properties, no
/// property length when there are no properties.
fn pub_resp_len(p: &PubResp, v5: bool) -> (usize, usize) {
    if !v5 {
        return (2, 0);
    }
    if p.properties.is_empty() {
        return (if p.reason == 0 { 2 } else { 3 }, 0);
    }
    let (section, body) = props_len(&p.properties, true);
    (3 + section, body)
}

fn pub_resp(first: u8, p: &PubResp, v5: bool, buf: &mut BytesMut) {
    let (rl, pl) = pub_resp_len(p, v5);
    header(buf, first, rl);
    buf.put_u16(p.packet_id);
    if rl > 2 {
        buf.put_u8(p.reason);
    }
    if rl > 3 {
        props::write(buf, &p.properties, pl);
    }
}

/// DISCONNECT and AUTH: `x0 00` for reason 0 without properties, then the same short forms.
fn reason_len(reason: u8, p: &Properties, v5: bool) -> (usize, usize) {
    if !v5 {
        return (0, 0);
    }
    if p.is_empty() {
        return (usize::from(reason != 0), 0);
    }
    let (section, body) = props_len(p, true);
    (1 + section, body)
}

fn reason_packet(first: u8, reason: u8, p: &Properties, v5: bool, buf: &mut BytesMut) {
    let (rl, pl) = reason_len(reason, p, v5);
    header(buf, first, rl);
    if rl > 0 {
        buf.put_u8(reason);
    }
    if rl > 1 {
        props::write(buf, p, pl);
    }
}

fn connack_len(c: &ConnAck, v5: bool) -> (usize, usize) {
    let (section, body) = props_len(&c.properties, v5);
    (2 + section, body)
}

fn subscribe_len(s: &Subscribe, v5: bool) -> (usize, usize) {
    let (section, body) = props_len(&s.properties, v5);
    let filters: usize = s.filters.iter().map(|(f, _)| 3 + f.len()).sum();
    (2 + section + filters, body)
}

fn ack_list_len(p: &Properties, codes: usize, v5: bool) -> (usize, usize) {
    let (section, body) = props_len(p, v5);
    (2 + section + codes, body)
}

fn unsubscribe_len(u: &Unsubscribe, v5: bool) -> (usize, usize) {
    let (section, body) = props_len(&u.properties, v5);
    let filters: usize = u.filters.iter().map(|f| 2 + f.len()).sum();
    (2 + section + filters, body)
}

/// 3.1.1 UNSUBACK has no payload (3.11.3), so the reason codes are left out there.
fn unsuback_len(u: &UnsubAck, v5: bool) -> (usize, usize) {
    if !v5 {
        return (2, 0);
    }
    ack_list_len(&u.properties, u.reason_codes.len(), true)
}

fn protocol_name(version: ProtocolVersion) -> &'static [u8] {
    match version {
        V31 => b"MQIsdp",
        V311 | V5 => b"MQTT",
    }
}

/// Remaining length, CONNECT property length and will property length.
fn connect_len(c: &Connect, version: ProtocolVersion) -> (usize, usize, usize) {
    let v5 = version.is_v5();
    let (section, body) = props_len(&c.properties, v5);
    let mut rl = 2 + protocol_name(version).len() + 1 + 1 + 2 + section + 2 + c.client_id.len();
    let mut will_body = 0;
    if let Some(w) = &c.will {
        let (will_section, wb) = props_len(&w.properties, v5);
        will_body = wb;
        rl += will_section + 2 + w.topic.len() + 2 + w.payload.len();
    }
    rl += c.username.as_ref().map_or(0, |u| 2 + u.len());
    rl += c.password.as_ref().map_or(0, |p| 2 + p.len());
    (rl, body, will_body)
}

fn encode_connect(c: &Connect, version: ProtocolVersion, buf: &mut BytesMut) {
    let v5 = version.is_v5();
    let (rl, pl, will_pl) = connect_len(c, version);
    header(buf, 0x10, rl);
    put_bin(buf, protocol_name(version));
    buf.put_u8(version.level() | if c.bridge && !v5 { 0x80 } else { 0 });
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        props::write(buf, &c.properties, pl);
    }
    put_bin(buf, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            props::write(buf, &w.properties, will_pl);
        }
        put_bin(buf, w.topic.as_bytes());
        put_bin(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        put_bin(buf, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_bin(buf, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bytes(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(p, v, &mut buf);
        assert_eq!(buf.len(), encoded_len(p, v), "encoded_len of {}", p.name());
        buf.to_vec()
    }

    #[test]
    fn v3_shapes() {
        let v = V311;
        assert_eq!(bytes(&Packet::Disconnect(Disconnect { reason: 0x81, ..Default::default() }), v), [0xE0, 0]);
        let ack = ConnAck { session_present: true, code: 0, properties: Properties::default() };
        assert_eq!(bytes(&Packet::ConnAck(ack), v), [0x20, 2, 1, 0]);
        let un = UnsubAck { packet_id: 7, reason_codes: vec![0x11], properties: Properties::default() };
        assert_eq!(bytes(&Packet::UnsubAck(un), v), [0xB0, 2, 0, 7]);
        let rel = PubResp { packet_id: 1, reason: 0x92, properties: Properties::default() };
        assert_eq!(bytes(&Packet::PubRel(rel), v), [0x62, 2, 0, 1]);
        let sub = SubAck { packet_id: 0x1234, return_codes: vec![1, 0x80], properties: Properties::default() };
        assert_eq!(bytes(&Packet::SubAck(sub), V31), [0x90, 4, 0x12, 0x34, 1, 0x80]);
        assert_eq!(bytes(&Packet::Auth(Auth::default()), v), [0u8; 0]);
        assert_eq!(bytes(&Packet::PingResp, v), [0xD0, 0]);
    }

    #[test]
    fn v5_short_forms() {
        let v = V5;
        assert_eq!(bytes(&Packet::PubAck(PubResp::new(1)), v), [0x40, 2, 0, 1]);
        let rc = PubResp { packet_id: 0x1234, reason: 0x10, properties: Properties::default() };
        assert_eq!(bytes(&Packet::PubAck(rc), v), [0x40, 3, 0x12, 0x34, 0x10]);
        let mut with = PubResp::new(1);
        with.properties.reason_string = Some("p".into());
        assert_eq!(bytes(&Packet::PubComp(with), v), [0x70, 8, 0, 1, 0, 4, 0x1F, 0, 1, b'p']);
        assert_eq!(bytes(&Packet::Disconnect(Disconnect::default()), v), [0xE0, 0]);
        let d = Disconnect { reason: 0x8E, properties: Properties::default() };
        assert_eq!(bytes(&Packet::Disconnect(d), v), [0xE0, 1, 0x8E]);
        let a = Auth { reason: 0x18, properties: Properties::default() };
        assert_eq!(bytes(&Packet::Auth(a), v), [0xF0, 1, 0x18]);
        let ack = ConnAck { session_present: false, code: 0x84, properties: Properties::default() };
        assert_eq!(bytes(&Packet::ConnAck(ack), v), [0x20, 3, 0, 0x84, 0]);
        let un = UnsubAck { packet_id: 0x1234, reason_codes: vec![0x11], properties: Properties::default() };
        assert_eq!(bytes(&Packet::UnsubAck(un), v), [0xB0, 4, 0x12, 0x34, 0, 0x11]);
    }

    #[test]
    fn publish_matches_vector_bytes() {
        // vectors FLOW "QoS 1 receive ok": 32 0D 0001 70 0001 00 "message"
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "p".into(),
            packet_id: Some(1),
            payload: Bytes::from_static(b"message"),
            properties: Properties::default(),
        };
        let mut expect = vec![0x32, 0x0D, 0, 1, b'p', 0, 1, 0];
        expect.extend_from_slice(b"message");
        assert_eq!(bytes(&Packet::Publish(p.clone()), V5), expect);
        expect.remove(7);
        expect[1] = 0x0C;
        assert_eq!(bytes(&Packet::Publish(p), V311), expect);
    }

    #[test]
    fn long_remaining_length() {
        let p = Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "t".into(),
            packet_id: Some(9),
            payload: Bytes::from(vec![7u8; 200_000]),
            properties: Properties::default(),
        };
        let out = bytes(&Packet::Publish(p), V311);
        assert_eq!(out[0], 0x3D);
        assert_eq!(out.len(), 1 + 3 + 2 + 1 + 2 + 200_000);
    }

    #[test]
    fn appends() {
        let mut buf = BytesMut::from(&b"xy"[..]);
        encode(&Packet::PingReq, V5, &mut buf);
        assert_eq!(&buf[..], b"xy\xC0\x00");
    }
}

/// An outbound PUBLISH made of borrowed parts. The broker writes one message to many
/// subscribers; building a `Publish` (and cloning its properties) for each would cost a copy
/// of every property per subscriber. The message's own v5 properties arrive pre-encoded
/// (`encode_property_list`); only what differs per subscriber is added here.
#[derive(Debug, Clone, Copy)]
pub struct PublishOut<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when `topic_alias` stands for it.
    pub topic: &'a [u8],
    pub packet_id: Option<u16>,
    pub payload: &'a [u8],
    /// v5: the message's properties, encoded, without the length prefix.
    pub properties: &'a [u8],
    /// v5: Message Expiry Interval left.
    pub message_expiry: Option<u32>,
    pub subscription_ids: &'a [u32],
    pub topic_alias: Option<u16>,
}

impl PublishOut<'_> {
    fn props_body(&self) -> usize {
        self.properties.len()
            + self.message_expiry.map_or(0, |_| 5)
            + self.subscription_ids.iter().map(|&id| 1 + varint_len(id as usize)).sum::<usize>()
            + self.topic_alias.map_or(0, |_| 3)
    }

    fn remaining(&self, v5: bool) -> (usize, usize) {
        let id = if self.qos == QoS::AtMostOnce { 0 } else { 2 };
        let body = if v5 { self.props_body() } else { 0 };
        let section = if v5 { varint_len(body) + body } else { 0 };
        (2 + self.topic.len() + id + section + self.payload.len(), body)
    }

    /// Total bytes `encode` writes.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let (rl, _) = self.remaining(version == V5);
        1 + varint_len(rl) + rl
    }

    pub fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        let v5 = version == V5;
        let (rl, body) = self.remaining(v5);
        let first = 0x30 | u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain);
        header(buf, first, rl);
        put_bin(buf, self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id.unwrap_or(0));
        }
        if v5 {
            put_varint(buf, body);
            if let Some(e) = self.message_expiry {
                buf.put_u8(0x02);
                buf.put_u32(e);
            }
            for &id in self.subscription_ids {
                buf.put_u8(0x0B);
                put_varint(buf, id as usize);
            }
            if let Some(a) = self.topic_alias {
                buf.put_u8(0x23);
                buf.put_u16(a);
            }
            buf.put_slice(self.properties);
        }
        buf.put_slice(self.payload);
    }
}

/// A property list (no length prefix) for `PublishOut::properties`.
pub fn encode_property_list(p: &Properties) -> bytes::Bytes {
    if p.is_empty() {
        return bytes::Bytes::new();
    }
    let body = props::body_len(p);
    let mut buf = BytesMut::with_capacity(varint_len(body) + body);
    props::write(&mut buf, p, body);
    buf.split_off(varint_len(body)).freeze()
}

#[cfg(test)]
mod publish_out_tests {
    use super::*;
    use bytestring::ByteString;

    /// The fast path writes exactly what the general encoder writes for the same packet.
    #[test]
    fn publish_out_matches_the_general_encoder() {
        let props = Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("a".into(), "1".into())],
            ..Default::default()
        };
        for version in [V311, V5] {
            for (qos, pid) in [(QoS::AtMostOnce, None), (QoS::ExactlyOnce, Some(7))] {
                let list = encode_property_list(&props);
                let dup = qos != QoS::AtMostOnce;
                let out = PublishOut {
                    dup,
                    qos,
                    retain: true,
                    topic: b"t/1",
                    packet_id: pid,
                    payload: b"payload",
                    properties: &list,
                    message_expiry: Some(9),
                    subscription_ids: &[3, 300],
                    topic_alias: Some(2),
                };
                let mut fast = BytesMut::new();
                out.encode(version, &mut fast);
                assert_eq!(fast.len(), out.encoded_len(version));
                // Decode it back and compare with what was meant.
                let p = match super::super::decode(&mut fast.clone(), Some(version), usize::MAX) {
                    Ok(Some(Packet::Publish(p))) => p,
                    other => panic!("{other:?}"),
                };
                assert_eq!((p.dup, p.qos, p.retain, p.packet_id), (dup, qos, true, pid));
                assert_eq!((&p.topic, &p.payload[..]), (&ByteString::from("t/1"), &b"payload"[..]));
                if version == V5 {
                    assert_eq!(p.properties.message_expiry_interval, Some(9));
                    assert_eq!(p.properties.subscription_identifiers, vec![3, 300]);
                    assert_eq!(p.properties.topic_alias, Some(2));
                    assert_eq!(p.properties.content_type, props.content_type);
                    assert_eq!(p.properties.user_properties, props.user_properties);
                } else {
                    assert!(p.properties.is_empty());
                }
            }
        }
    }
}
