//! Cross-checks against an independent reference: the `mqtt5-protocol` crate's decoder.
//! (mosquitto's vectors run end to end in tests/conformance.rs.)

use super::*;
use mqtt5_protocol as theirs;
use theirs::packet::{FixedHeader, Packet as TPacket};

/// Converts the other crate's property map into ours, so whole property sets can be compared.
fn props(p: &theirs::Properties) -> Properties {
    use theirs::PropertyValue as V;
    let mut out = Properties::default();
    // Its map is unordered across identifiers but keeps the order of repeated ones.
    for (id, value) in p.iter() {
        let id = id as u8;
        match (id, value) {
            (0x01, V::Byte(b)) => out.payload_format_indicator = Some(*b),
            (0x02, V::FourByteInteger(n)) => out.message_expiry_interval = Some(*n),
            (0x03, V::Utf8String(x)) => out.content_type = Some(s(x)),
            (0x08, V::Utf8String(x)) => out.response_topic = Some(s(x)),
            (0x09, V::BinaryData(b)) => out.correlation_data = Some(b.clone()),
            (0x0B, V::VariableByteInteger(n)) => out.subscription_identifiers.push(*n),
            (0x11, V::FourByteInteger(n)) => out.session_expiry_interval = Some(*n),
            (0x12, V::Utf8String(x)) => out.assigned_client_identifier = Some(s(x)),
            (0x13, V::TwoByteInteger(n)) => out.server_keep_alive = Some(*n),
            (0x15, V::Utf8String(x)) => out.authentication_method = Some(s(x)),
            (0x16, V::BinaryData(b)) => out.authentication_data = Some(b.clone()),
            (0x17, V::Byte(b)) => out.request_problem_information = Some(*b),
            (0x18, V::FourByteInteger(n)) => out.will_delay_interval = Some(*n),
            (0x19, V::Byte(b)) => out.request_response_information = Some(*b),
            (0x1A, V::Utf8String(x)) => out.response_information = Some(s(x)),
            (0x1C, V::Utf8String(x)) => out.server_reference = Some(s(x)),
            (0x1F, V::Utf8String(x)) => out.reason_string = Some(s(x)),
            (0x21, V::TwoByteInteger(n)) => out.receive_maximum = Some(*n),
            (0x22, V::TwoByteInteger(n)) => out.topic_alias_maximum = Some(*n),
            (0x23, V::TwoByteInteger(n)) => out.topic_alias = Some(*n),
            (0x24, V::Byte(b)) => out.maximum_qos = Some(*b),
            (0x25, V::Byte(b)) => out.retain_available = Some(*b),
            (0x26, V::Utf8StringPair(k, v)) => out.user_properties.push((s(k), s(v))),
            (0x27, V::FourByteInteger(n)) => out.maximum_packet_size = Some(*n),
            (0x28, V::Byte(b)) => out.wildcard_subscription_available = Some(*b),
            (0x29, V::Byte(b)) => out.subscription_identifiers_available = Some(*b),
            (0x2A, V::Byte(b)) => out.shared_subscription_available = Some(*b),
            other => panic!("unexpected property {other:?}"),
        }
    }
    out
}

/// Decodes with the other crate and rebuilds our `Packet` from the fields it exposes.
fn theirs_decode(bytes: &[u8], v: ProtocolVersion) -> Packet {
    let mut buf = bytes::Bytes::copy_from_slice(bytes);
    let fh = FixedHeader::decode(&mut buf).expect("their fixed header");
    let tp = TPacket::decode_from_body_with_version(fh.packet_type, &fh, &mut buf, v.level())
        .unwrap_or_else(|e| panic!("their decoder rejects {bytes:02X?}: {e:?}"));
    assert!(bytes::Buf::remaining(&buf) == 0, "their decoder left bytes");
    let qos = |q: theirs::QoS| QoS::from_u8(q as u8).unwrap();
    let resp = |packet_id, reason: theirs::ReasonCode, p: &theirs::Properties| PubResp {
        packet_id,
        reason: u8::from(reason),
        properties: props(p),
    };
    match tp {
        TPacket::Connect(c) => Packet::Connect(Box::new(Connect {
            protocol: v,
            bridge: false,
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: s(&c.client_id),
            will: c.will.as_ref().map(|w| LastWill {
                topic: s(&w.topic),
                payload: Bytes::from(w.payload.clone()),
                qos: qos(w.qos),
                retain: w.retain,
                properties: props(&c.will_properties),
            }),
            username: c.username.as_deref().map(s),
            password: c.password.clone().map(Bytes::from),
            properties: props(&c.properties),
        })),
        TPacket::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            // its v3 return codes come back mapped to v5 reason codes
            code: if v.is_v5() { u8::from(c.reason_code) } else { bytes[3] },
            properties: props(&c.properties),
        }),
        TPacket::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos(p.qos),
            retain: p.retain,
            topic: s(&p.topic_name),
            packet_id: p.packet_id,
            payload: p.payload.clone(),
            properties: props(&p.properties),
        }),
        TPacket::PubAck(p) => Packet::PubAck(resp(p.packet_id, p.reason_code, &p.properties)),
        TPacket::PubRec(p) => Packet::PubRec(resp(p.packet_id, p.reason_code, &p.properties)),
        TPacket::PubRel(p) => Packet::PubRel(resp(p.packet_id, p.reason_code, &p.properties)),
        TPacket::PubComp(p) => Packet::PubComp(resp(p.packet_id, p.reason_code, &p.properties)),
        TPacket::Subscribe(sub) => Packet::Subscribe(Subscribe {
            packet_id: sub.packet_id,
            filters: sub
                .filters
                .iter()
                .map(|f| {
                    let o = SubscriptionOptions {
                        qos: qos(f.options.qos),
                        no_local: f.options.no_local,
                        retain_as_published: f.options.retain_as_published,
                        retain_handling: f.options.retain_handling as u8,
                    };
                    (s(&f.filter), o)
                })
                .collect(),
            properties: props(&sub.properties),
        }),
        TPacket::SubAck(a) => Packet::SubAck(SubAck {
            packet_id: a.packet_id,
            return_codes: a.reason_codes.iter().map(|&c| c as u8).collect(),
            properties: props(&a.properties),
        }),
        TPacket::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            packet_id: u.packet_id,
            filters: u.filters.iter().map(|f| s(f)).collect(),
            properties: props(&u.properties),
        }),
        TPacket::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: u.reason_codes.iter().map(|&c| c as u8).collect(),
            properties: props(&u.properties),
        }),
        TPacket::PingReq => Packet::PingReq,
        TPacket::PingResp => Packet::PingResp,
        TPacket::Disconnect(d) => {
            Packet::Disconnect(Disconnect { reason: u8::from(d.reason_code), properties: props(&d.properties) })
        }
        TPacket::Auth(a) => Packet::Auth(Auth { reason: u8::from(a.reason_code), properties: props(&a.properties) }),
    }
}

/// Extra v5 packets on top of the round-trip corpus, so the comparison covers more shapes.
fn extra_v5() -> Vec<Packet> {
    let mut out = Vec::new();
    for (i, topic) in
        ["a", "a/b/c", "$SYS/broker/uptime", "\u{e9}t\u{e9}/\u{4e2d}\u{6587}", "/leading/slash"].into_iter().enumerate()
    {
        let mut props = Properties::default();
        match i {
            0 => props.message_expiry_interval = Some(u32::MAX),
            1 => props.subscription_identifiers = vec![127, 128, 16_383, 16_384, 2_097_151, 2_097_152],
            2 => props.user_properties = vec![(s("k"), s("")), (s(""), s("v")), (s("k"), s("v"))],
            3 => props.content_type = Some(s("text/plain; charset=utf-8")),
            _ => props.correlation_data = Some(Bytes::new()),
        }
        out.push(Packet::Publish(Publish {
            dup: false,
            qos: [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][i % 3],
            retain: i % 2 == 0,
            topic: s(topic),
            packet_id: (i % 3 != 0).then_some(100 + i as u16),
            payload: Bytes::from(vec![i as u8; i * 50]),
            properties: props,
        }));
    }
    out.push(Packet::Subscribe(Subscribe {
        packet_id: 65_535,
        filters: vec![(s("x/#"), SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
        properties: Properties::default(),
    }));
    for (i, code) in [0x10u8, 0x87, 0x91, 0x97, 0x99].into_iter().enumerate() {
        let props = if i % 2 == 0 { Properties::default() } else { super::reason("r") };
        out.push(Packet::PubAck(PubResp { packet_id: 40 + i as u16, reason: code, properties: props }));
    }
    out.push(Packet::SubAck(SubAck {
        packet_id: 9,
        return_codes: vec![0x8F, 0x91, 0x97, 0x9E, 0xA1],
        properties: Properties::default(),
    }));
    out.push(Packet::Disconnect(Disconnect { reason: 0x98, properties: super::user("who", "admin") }));
    out.push(Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec![s("$share/g/x")],
        properties: Properties::default(),
    }));
    out
}

#[test]
fn agrees_with_mqtt5_protocol() {
    let mut checked = 0;
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut corpus = corpus(v);
        if v.is_v5() {
            corpus.extend(extra_v5());
        }
        for p in &corpus {
            let mut buf = BytesMut::new();
            encode(p, v, &mut buf);
            let bytes = buf.to_vec();
            let ours = decode(&mut buf, if matches!(p, Packet::Connect(_)) { None } else { Some(v) }, 1 << 20);
            assert_eq!(ours, Ok(Some(p.clone())), "ours {v:?} {}", p.name());
            assert_eq!(&theirs_decode(&bytes, v), p, "theirs {v:?} {}: {bytes:02X?}", p.name());
            checked += 1;
        }
    }
    assert!(checked >= 65, "only {checked} packets compared");
}
