//! Whole-codec tests: round trips of every packet type per version, partial input, and the
//! per-packet rejection rules, written as literal byte strings.

use super::*;
use bytes::{Bytes, BytesMut};
use ProtocolVersion::*;

#[path = "crosscheck.rs"]
mod crosscheck;

pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn dec(v: Option<ProtocolVersion>, bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let out = decode(&mut buf, v, 1 << 24);
    if let Ok(Some(_)) = out {
        assert!(buf.is_empty(), "packet not fully consumed: {bytes:02X?}");
    }
    out
}

/// Decoding `h` (hex) at level `v` fails with reason code `code`.
#[track_caller]
fn rejects(v: ProtocolVersion, h: &str, code: u8) {
    match dec(Some(v), &hex(h)) {
        Err(e) => assert_eq!(e.reason_code(), code, "{v:?} {h}: {e:?}"),
        other => panic!("{v:?} {h}: expected an error, got {other:?}"),
    }
}

#[track_caller]
fn accepts(v: ProtocolVersion, h: &str) -> Packet {
    match dec(Some(v), &hex(h)) {
        Ok(Some(p)) => p,
        other => panic!("{v:?} {h}: {other:?}"),
    }
}

fn s(x: &str) -> bytestring::ByteString {
    x.into()
}

/// Properties a v5 PUBLISH may carry, all set.
pub(crate) fn publish_props() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some(s("application/json")),
        response_topic: Some(s("reply/to")),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        subscription_identifiers: vec![1, 300, 268_435_455],
        topic_alias: Some(5),
        user_properties: vec![(s("a"), s("1")), (s("a"), s("2"))],
        ..Properties::default()
    }
}

fn user(k: &str, v: &str) -> Properties {
    Properties { user_properties: vec![(s(k), s(v))], ..Properties::default() }
}

fn reason(r: &str) -> Properties {
    Properties { reason_string: Some(s(r)), user_properties: vec![(s("k"), s("v"))], ..Properties::default() }
}

/// Valid packets of every type for `v`, with properties where `v` has them.
pub(crate) fn corpus(v: ProtocolVersion) -> Vec<Packet> {
    let v5 = v.is_v5();
    let p = |props: Properties| if v5 { props } else { Properties::default() };
    let mut out = Vec::new();
    let will = LastWill {
        topic: s("will/topic"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: p(Properties {
            will_delay_interval: Some(10),
            payload_format_indicator: Some(0),
            message_expiry_interval: Some(100),
            content_type: Some(s("text")),
            response_topic: Some(s("r")),
            correlation_data: Some(Bytes::from_static(b"c")),
            user_properties: vec![(s("w"), s("x"))],
            ..Properties::default()
        }),
    };
    out.push(Packet::Connect(Box::new(Connect {
        protocol: v,
        bridge: false,
        clean_start: true,
        keep_alive: 60,
        client_id: s("client-1"),
        will: Some(will),
        username: Some(s("user")),
        password: Some(Bytes::from_static(b"\x00pass")),
        properties: p(Properties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(20),
            maximum_packet_size: Some(1 << 20),
            topic_alias_maximum: Some(10),
            request_response_information: Some(1),
            request_problem_information: Some(0),
            authentication_method: Some(s("PLAIN")),
            authentication_data: Some(Bytes::from_static(b"secret")),
            user_properties: vec![(s("c"), s("d"))],
            ..Properties::default()
        }),
    })));
    out.push(Packet::Connect(Box::new(Connect {
        protocol: v,
        bridge: false,
        clean_start: false,
        keep_alive: 0,
        client_id: s(""),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })));
    out.push(Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: Properties::default() }));
    out.push(Packet::ConnAck(ConnAck {
        session_present: false,
        code: if v5 { 0x86 } else { 4 },
        properties: p(Properties {
            session_expiry_interval: Some(0),
            receive_maximum: Some(100),
            maximum_qos: Some(1),
            retain_available: Some(0),
            maximum_packet_size: Some(65_536),
            assigned_client_identifier: Some(s("auto-xyz")),
            topic_alias_maximum: Some(10),
            reason_string: Some(s("nope")),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(0),
            server_keep_alive: Some(30),
            response_information: Some(s("resp/")),
            server_reference: Some(s("other:1883")),
            authentication_method: Some(s("m")),
            authentication_data: Some(Bytes::from_static(b"d")),
            user_properties: vec![(s("srv"), s("tern"))],
            ..Properties::default()
        }),
    }));
    for (qos, id) in [(QoS::AtMostOnce, None), (QoS::AtLeastOnce, Some(1)), (QoS::ExactlyOnce, Some(65_535))] {
        out.push(Packet::Publish(Publish {
            dup: qos != QoS::AtMostOnce,
            qos,
            retain: qos == QoS::AtLeastOnce,
            topic: s("sensors/kitchen/temp"),
            packet_id: id,
            payload: Bytes::from_static(b"21.5"),
            properties: p(publish_props()),
        }));
    }
    out.push(Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: s("caf\u{e9}/\u{2A6D4}"),
        packet_id: None,
        payload: Bytes::new(),
        properties: Properties::default(),
    }));
    if v5 {
        // empty topic with an alias
        out.push(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: s(""),
            packet_id: Some(2),
            payload: Bytes::from(vec![0u8; 1000]),
            properties: Properties { topic_alias: Some(1), ..Properties::default() },
        }));
    }
    type MakeResp = fn(PubResp) -> Packet;
    let reasons: [(MakeResp, u8); 4] =
        [(Packet::PubAck, 0x10), (Packet::PubRec, 0x80), (Packet::PubRel, 0x92), (Packet::PubComp, 0x92)];
    for (make, code) in reasons {
        out.push(make(PubResp::new(7)));
        if v5 {
            out.push(make(PubResp { packet_id: 8, reason: code, properties: Properties::default() }));
            out.push(make(PubResp { packet_id: 9, reason: 0, properties: reason("because") }));
        }
    }
    let opts = |qos, nl, rap, rh| SubscriptionOptions {
        qos,
        no_local: v5 && nl,
        retain_as_published: v5 && rap,
        retain_handling: if v5 { rh } else { 0 },
    };
    out.push(Packet::Subscribe(Subscribe {
        packet_id: 10,
        filters: vec![
            (s("a/+/c"), opts(QoS::AtMostOnce, false, false, 0)),
            (s("#"), opts(QoS::AtLeastOnce, true, true, 1)),
            (s("$share/g/x/#"), opts(QoS::ExactlyOnce, false, true, 2)),
        ],
        properties: p(Properties {
            subscription_identifiers: vec![42],
            user_properties: vec![(s("u"), s("v"))],
            ..Properties::default()
        }),
    }));
    out.push(Packet::SubAck(SubAck {
        packet_id: 10,
        return_codes: if v5 { vec![0, 1, 2, 0x80, 0x87, 0xA2] } else { vec![0, 1, 2, 0x80] },
        properties: p(reason("ok")),
    }));
    out.push(Packet::Unsubscribe(Unsubscribe {
        packet_id: 11,
        filters: vec![s("a/+/c"), s("#")],
        properties: p(user("x", "y")),
    }));
    out.push(Packet::UnsubAck(UnsubAck {
        packet_id: 11,
        reason_codes: if v5 { vec![0, 0x11] } else { Vec::new() },
        properties: p(reason("done")),
    }));
    out.push(Packet::PingReq);
    out.push(Packet::PingResp);
    out.push(Packet::Disconnect(Disconnect::default()));
    if v5 {
        out.push(Packet::Disconnect(Disconnect { reason: 0x04, properties: Properties::default() }));
        out.push(Packet::Disconnect(Disconnect {
            reason: 0x8B,
            properties: Properties {
                session_expiry_interval: Some(5),
                server_reference: Some(s("elsewhere")),
                ..reason("shutting down")
            },
        }));
        out.push(Packet::Auth(Auth::default()));
        out.push(Packet::Auth(Auth {
            reason: 0x18,
            properties: Properties {
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(Bytes::from_static(b"\x00\x01\x02")),
                ..reason("continue")
            },
        }));
    }
    out
}

fn encoded(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf);
    assert_eq!(buf.len(), encoded_len(p, v), "encoded_len {} {v:?}", p.name());
    buf.to_vec()
}

#[test]
fn round_trip_every_packet_type() {
    for v in [V31, V311, V5] {
        let corpus = corpus(v);
        for p in &corpus {
            let bytes = encoded(p, v);
            // A CONNECT must also decode as the first packet.
            let first = if matches!(p, Packet::Connect(_)) { None } else { Some(v) };
            assert_eq!(dec(first, &bytes), Ok(Some(p.clone())), "{v:?} {}", p.name());
        }
        let kinds: std::collections::HashSet<_> = corpus.iter().map(Packet::name).collect();
        assert_eq!(kinds.len(), if v.is_v5() { 15 } else { 14 }, "{v:?}");
    }
}

#[test]
fn every_prefix_needs_more_bytes() {
    for v in [V31, V311, V5] {
        for p in corpus(v) {
            let bytes = encoded(&p, v);
            for cut in 0..bytes.len() {
                let mut buf = BytesMut::from(&bytes[..cut]);
                assert_eq!(decode(&mut buf, Some(v), 1 << 20), Ok(None), "{v:?} {} cut {cut}", p.name());
                assert_eq!(buf.len(), cut, "nothing consumed");
            }
        }
    }
}

#[test]
fn decodes_back_to_back_packets_zero_copy() {
    let mut buf = BytesMut::new();
    let corpus = corpus(V5);
    for p in &corpus {
        encode(p, V5, &mut buf);
    }
    for p in &corpus {
        let got = decode(&mut buf, Some(V5), 1 << 20).unwrap().unwrap();
        assert_eq!(&got, p);
    }
    assert!(buf.is_empty());
}

#[test]
fn slash_topic_of_maximum_length() {
    let topic = "/".repeat(65_535);
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: s(&topic),
        packet_id: Some(1),
        payload: Bytes::from_static(b"x"),
        properties: Properties::default(),
    });
    for v in [V311, V5] {
        let bytes = encoded(&publish, v);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, Some(v), bytes.len()), Ok(Some(publish.clone())));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, Some(v), bytes.len() - 1),
            Err(DecodeError::TooLarge { size: bytes.len(), max: bytes.len() - 1 })
        );
        // the limit is enforced from the header alone
        let mut buf = BytesMut::from(&bytes[..4]);
        assert!(matches!(decode(&mut buf, Some(v), 1000), Err(DecodeError::TooLarge { .. })));
    }
}

#[test]
fn connect_versions_and_names() {
    let ok = "10 0F 00 06 4D 51 49 73 64 70 03 02 00 0A 00 01 70";
    let Ok(Some(Packet::Connect(c))) = dec(None, &hex(ok)) else { panic!() };
    assert_eq!((c.protocol, c.client_id.as_ref()), (V31, "p"));
    // MQTT 3.1 tolerates fixed header flags on CONNECT, 3.1.1 does not
    assert!(dec(None, &hex("14 0F 00 06 4D 51 49 73 64 70 03 02 00 0A 00 01 70")).is_ok());
    assert_eq!(dec(None, &hex("14 0D 00 04 4D 51 54 54 04 02 00 0A 00 01 70")).unwrap_err().reason_code(), 0x81);
    let unsupported = [
        ("10 0F 00 06 4D 51 49 73 64 70 02 00 00 0A 00 01 70", 2, false, 0x01),
        ("10 0F 00 06 4D 51 49 73 64 70 06 00 00 0A 00 01 70", 6, false, 0x01),
        ("10 0D 00 04 4D 51 54 54 02 00 00 0A 00 01 70", 2, true, 0x01),
        ("10 0D 00 04 4D 51 54 54 06 00 00 0A 00 01 70", 6, true, 0x01),
        ("10 0D 00 04 4D 51 54 54 03 00 00 0A 00 01 70", 3, true, 0x01),
        ("10 0F 00 06 4D 51 49 73 64 70 05 02 00 0A 00 00 00", 5, false, 0x84),
    ];
    for (h, level, name_is_mqtt, code) in unsupported {
        let e = dec(None, &hex(h)).unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedProtocol { level, name_is_mqtt }, "{h}");
        assert_eq!(e.reason_code(), code);
    }
    for bad_name in [
        "10 0D 00 04 4D 51 54 55 04 02 00 0A 00 01 70",
        "10 0C 00 03 4D 51 54 04 02 00 0A 00 01 70",
        "10 09 00 00 04 02 00 0A 00 01 70",
        "10 0E 00 05 4D 51 54 54 54 04 02 00 0A 00 01 70",
    ] {
        assert!(matches!(dec(None, &hex(bad_name)), Err(DecodeError::Protocol(_))), "{bad_name}");
    }
}

#[test]
fn connect_rejections() {
    let cases = [
        // reserved flag [MQTT-3.1.2-3]
        ("10 0D 00 04 4D 51 54 54 04 01 00 0A 00 01 70", 0x81),
        // will QoS / retain without will flag
        ("10 0D 00 04 4D 51 54 54 04 0A 00 0A 00 01 70", 0x81),
        ("10 0D 00 04 4D 51 54 54 04 12 00 0A 00 01 70", 0x81),
        // will QoS 3
        ("10 13 00 04 4D 51 54 54 04 1E 00 0A 00 01 70 00 01 70 00 01 70", 0x81),
        // will flag without will topic / message
        ("10 0D 00 04 4D 51 54 54 04 06 00 0A 00 01 70", 0x81),
        ("10 10 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 01 70", 0x81),
        // will topic with wildcard, with U+0000, U+0001, U+009F, U+FFFF, U+D800
        ("10 13 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 01 23 00 01 70", 0x81),
        ("10 17 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 05 74 6F 70 00 00 00 01 70", 0x81),
        ("10 17 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 05 74 6F 70 01 70 00 01 70", 0x81),
        ("10 17 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 05 74 6F C2 9F 70 00 01 70", 0x81),
        ("10 17 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 05 74 6F ED BF BF 00 01 70", 0x81),
        ("10 17 00 04 4D 51 54 54 04 06 00 0A 00 01 70 00 05 74 6F ED A0 80 00 01 70", 0x81),
        // client id / user name with control characters
        ("10 11 00 04 4D 51 54 54 04 02 00 0A 00 05 74 6F 70 7F 70", 0x81),
        ("10 14 00 04 4D 51 54 54 04 82 00 0A 00 01 70 00 05 74 6F 70 1F 70", 0x81),
        // missing client id, trailing bytes, missing user name, missing password
        ("10 0A 00 04 4D 51 54 54 04 02 00 0A", 0x81),
        ("10 10 00 04 4D 51 54 54 04 02 00 0A 00 01 70 00 01 70", 0x81),
        ("10 0D 00 04 4D 51 54 54 04 82 00 0A 00 01 70", 0x81),
        ("10 10 00 04 4D 51 54 54 04 C2 00 0A 00 01 70 00 01 70", 0x81),
        // 3.1.1: password without user name [MQTT-3.1.2-22]
        ("10 10 00 04 4D 51 54 54 04 42 00 0A 00 01 70 00 01 70", 0x81),
        // 5.0: trailing bytes, missing user name, duplicate / invalid / not allowed property
        ("10 11 00 04 4D 51 54 54 05 02 00 0A 00 00 01 70 00 01 70", 0x81),
        ("10 0E 00 04 4D 51 54 54 05 82 00 0A 00 00 01 70", 0x81),
        ("10 14 00 04 4D 51 54 54 05 02 00 0A 06 21 00 01 21 00 02 00 01 70", 0x82),
        ("10 11 00 04 4D 51 54 54 05 02 00 0A 03 21 00 00 00 01 70", 0x82),
        ("10 11 00 04 4D 51 54 54 05 02 00 0A 03 23 00 01 00 01 70", 0x82),
        ("10 0F 00 04 4D 51 54 54 05 02 00 0A 01 21 00 01 70", 0x81),
    ];
    for (h, code) in cases {
        match dec(None, &hex(h)) {
            Err(e) => assert_eq!(e.reason_code(), code, "{h}: {e:?}"),
            other => panic!("{h}: {other:?}"),
        }
    }
    // 5.0 allows a password without a user name; 3.1.1 allows empty user names and NUL in
    // passwords (binary data)
    assert!(dec(None, &hex("10 11 00 04 4D 51 54 54 05 42 00 0A 00 00 01 70 00 01 70")).is_ok());
    assert!(dec(None, &hex("10 0F 00 04 4D 51 54 54 04 82 00 0A 00 01 70 00 00")).is_ok());
    assert!(dec(None, &hex("10 17 00 04 4D 51 54 54 04 C2 00 0A 00 01 70 00 01 70 00 05 74 6F 70 00 00")).is_ok());
    // a second CONNECT decodes normally (the caller rejects it)
    assert!(matches!(accepts(V311, "10 0D 00 04 4D 51 54 54 04 02 00 0A 00 01 70"), Packet::Connect(_)));
}

#[test]
fn publish_rejections() {
    for v in [V311, V5] {
        let props = if v.is_v5() { "00" } else { "" };
        let len = |n: usize| format!("{:02X}", n + usize::from(v.is_v5()));
        // QoS 3 with and without id, QoS 0 with DUP
        rejects(v, &format!("36 {} 00 05 74 6F 70 69 63 {props} 70", len(8)), 0x81);
        rejects(v, &format!("36 {} 00 05 74 6F 70 69 63 12 34 {props} 70", len(10)), 0x81);
        rejects(v, &format!("38 {} 00 05 74 6F 70 69 63 {props} 70", len(8)), 0x81);
        // + and # in the topic, empty topic, invalid UTF-8, control character
        rejects(v, &format!("30 {} 00 05 2B 6F 70 69 63 {props} 70", len(8)), 0x81);
        rejects(v, &format!("30 {} 00 05 74 6F 70 2F 23 {props} 70", len(8)), 0x81);
        // empty topic: closes 3.1.1; Protocol Error in 5.0 (3.3.2.3.4)
        rejects(v, &format!("30 {} 00 00 {props} 70", len(3)), if v.is_v5() { 0x82 } else { 0x81 });
        rejects(v, &format!("30 {} 00 05 74 6F FF 69 63 {props} 70", len(8)), 0x81);
        rejects(v, &format!("30 {} 00 05 74 6F ED A0 80 {props} 70", len(8)), 0x81);
        rejects(v, &format!("30 {} 00 05 74 6F 70 00 63 {props} 70", len(8)), 0x81);
        rejects(v, &format!("30 {} 00 05 74 6F 70 01 63 {props} 70", len(8)), 0x81);
        // packet id 0 (mosquitto: 0x82)
        rejects(v, &format!("32 {} 00 05 74 6F 70 69 63 00 00 {props} 70", len(10)), 0x82);
        rejects(v, &format!("34 {} 00 05 74 6F 70 69 63 00 00 {props} 70", len(10)), 0x82);
        // topic length past the end
        rejects(v, "30 04 00 05 74 6F", 0x81);
        // supplementary characters are fine; DUP on QoS 1 is fine; zero-length payload is fine
        accepts(v, &format!("30 {} 00 05 41 F0 AA 9B 94 {props} 70", len(8)));
        accepts(v, &format!("3A {} 00 05 74 6F 70 69 63 12 34 {props}", len(9)));
    }
    let v = V5;
    // duplicated property, invalid values, properties not allowed in PUBLISH
    rejects(v, "32 15 00 05 74 6F 70 69 63 12 34 04 01 01 01 01 70 61 79 6C 6F 61 64", 0x82);
    rejects(v, "32 13 00 05 74 6F 70 69 63 12 34 02 01 02 70 61 79 6C 6F 61 64", 0x82);
    rejects(v, "32 15 00 05 74 6F 70 69 63 12 34 04 08 00 01 23 70 61 79 6C 6F 61 64", 0x82);
    rejects(v, "32 15 00 05 74 6F 70 69 63 12 34 04 1F 00 01 70 70 61 79 6C 6F 61 64", 0x82);
    rejects(v, "32 12 00 05 74 6F 70 69 63 12 34 01 01 70 61 79 6C 6F 61 64", 0x81);
    rejects(v, "32 13 00 05 74 6F 70 69 63 12 34 02 00 01 70 61 79 6C 6F 61 64", 0x81);
    // property length larger than the packet
    rejects(v, "30 08 00 05 74 6F 70 69 63 05", 0x81);
    // empty topic is fine with a topic alias, subscription identifiers are decoded
    let Packet::Publish(p) = accepts(v, "30 0D 00 00 03 23 00 01 70 61 79 6C 6F 61 64") else { panic!() };
    assert_eq!((p.topic.as_ref(), p.properties.topic_alias), ("", Some(1)));
    let Packet::Publish(p) = accepts(v, "32 13 00 05 74 6F 70 69 63 12 34 02 0B 01 70 61 79 6C 6F 61 64") else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, vec![1]);
    assert_eq!(&p.payload[..], b"payload");
}

#[test]
fn pub_resp_rules() {
    for first in ["40", "50", "62", "70"] {
        // 3.1.1: exactly two bytes
        accepts(V311, &format!("{first} 02 00 01"));
        rejects(V311, &format!("{first} 03 00 01 00"), 0x81);
        rejects(V311, &format!("{first} 01 01"), 0x81);
        rejects(V311, &format!("{first} 00"), 0x81);
        rejects(V311, &format!("{first} 02 00 00"), 0x82);
        // 5.0 short forms and errors
        let (Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p)) =
            accepts(V5, &format!("{first} 02 00 01"))
        else {
            panic!()
        };
        assert_eq!(p, PubResp::new(1));
        accepts(V5, &format!("{first} 03 00 01 00"));
        accepts(V5, &format!("{first} 04 00 01 00 00"));
        accepts(V5, &format!("{first} 08 00 01 00 04 1F 00 01 70"));
        rejects(V5, &format!("{first} 03 00 00 00"), 0x82);
        rejects(V5, &format!("{first} 05 00 01 00 00 00"), 0x81);
        rejects(V5, &format!("{first} 04 00 01 00 01"), 0x81);
        rejects(V5, &format!("{first} 04 00 01 FF 00"), 0x82);
        rejects(V5, &format!("{first} 01 01"), 0x81);
        rejects(V5, &format!("{first} 0C 00 01 00 08 1F 00 01 70 1F 00 01 71"), 0x82);
        rejects(V5, &format!("{first} 06 00 01 00 02 01 00"), 0x82);
        rejects(V5, &format!("{first} 06 00 01 00 02 04 01"), 0x81);
    }
    accepts(V5, "40 03 00 01 10");
    rejects(V5, "40 03 00 01 92", 0x82);
    accepts(V5, "70 03 00 01 92");
    rejects(V5, "70 03 00 01 80", 0x82);
    rejects(V5, "70 03 00 01 20", 0x82);
}

#[test]
fn subscribe_rules() {
    for v in [V311, V5] {
        let p = if v.is_v5() { "00" } else { "" };
        let len = |n: usize| format!("{:02X}", n + usize::from(v.is_v5()));
        accepts(v, &format!("82 {} 12 34 {p} 00 01 70 00", len(6)));
        // no filters, empty filter, invalid filters
        rejects(v, &format!("82 {} 12 34 {p}", len(2)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 00 00", len(5)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 05 61 2F 23 2F 62 00", len(10)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 02 61 2B 00", len(7)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 01 70 00 00 00 00", len(9)), 0x81);
        // missing options byte, QoS 3, reserved bits, packet id 0
        rejects(v, &format!("82 {} 12 34 {p} 00 01 70", len(5)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 01 70 03", len(6)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 01 70 40", len(6)), 0x81);
        rejects(v, &format!("82 {} 12 34 {p} 00 01 70 80", len(6)), 0x81);
        rejects(v, &format!("82 {} 00 00 {p} 00 01 70 00", len(6)), 0x82);
        // control characters in the filter
        rejects(v, &format!("82 {} 12 34 {p} 00 02 70 01 00", len(7)), 0x81);
        // malformed shared subscriptions
        rejects(v, &format!("82 {} 12 34 {p} 00 09 24 73 68 61 72 65 2F 70 2F 00", len(14)), 0x82);
        rejects(v, &format!("82 {} 12 34 {p} 00 08 24 73 68 61 72 65 2F 70 00", len(13)), 0x82);
    }
    // 3.1.1 reserves bits 2-7 of the options; 5.0 uses 2-5 and forbids retain handling 3
    for o in ["04", "08", "10", "20"] {
        rejects(V311, &format!("82 06 12 34 00 01 70 {o}"), 0x81);
        accepts(V5, &format!("82 07 12 34 00 00 01 70 {o}"));
    }
    rejects(V5, "82 07 12 34 00 00 01 70 30", 0x81);
    // no local on a shared subscription
    rejects(V5, "82 10 12 34 00 00 0A 24 73 68 61 72 65 2F 70 2F 70 04", 0x82);
    // properties: subscription id 0 / non-minimal / duplicate, property not allowed
    rejects(V5, "82 09 00 01 02 0B 00 00 01 70 00", 0x81);
    rejects(V5, "82 0A 00 01 03 0B 80 00 00 01 70 00", 0x81);
    rejects(V5, "82 0B 00 01 04 0B 01 0B 01 00 01 70 00", 0x82);
    rejects(V5, "82 09 00 01 02 01 00 00 01 70 00", 0x81);
    let Packet::Subscribe(s) = accepts(V5, "82 0C 00 01 05 0B FF FF FF 7F 00 01 70 2E") else { panic!() };
    assert_eq!(s.properties.subscription_identifiers, vec![268_435_455]);
    let o = s.filters[0].1;
    assert_eq!((o.qos, o.no_local, o.retain_as_published, o.retain_handling), (QoS::ExactlyOnce, true, true, 2));
}

#[test]
fn unsubscribe_and_acks() {
    for v in [V311, V5] {
        let p = if v.is_v5() { "00" } else { "" };
        let len = |n: usize| format!("{:02X}", n + usize::from(v.is_v5()));
        accepts(v, &format!("A2 {} 12 34 {p} 00 01 70 00 01 71", len(8)));
        rejects(v, &format!("A2 {} 12 34 {p}", len(2)), 0x81);
        rejects(v, &format!("A2 {} 12 34 {p} 00 00 00 01 71", len(7)), 0x81);
        rejects(v, &format!("A2 {} 12 34 {p} 00 01 71 00 00", len(7)), 0x81);
        rejects(v, &format!("A2 {} 12 34 {p} 00 01", len(4)), 0x81);
        rejects(v, &format!("A2 {} 00 00 {p} 00 01 70", len(5)), 0x82);
        rejects(v, &format!("A2 {} 12 34 {p} 00 04 61 2F 23 2F", len(8)), 0x81);
        // SUBACK / UNSUBACK
        accepts(v, &format!("90 {} 00 01 {p} 00 01 02 80", len(6)));
        rejects(v, &format!("90 {} 00 01 {p}", len(2)), 0x81);
        rejects(v, &format!("90 {} 00 00 {p} 00", len(3)), 0x82);
        rejects(v, &format!("90 {} 00 01 {p} 03", len(3)), 0x82);
    }
    rejects(V5, "A2 08 00 01 02 01 00 00 01 70", 0x81);
    accepts(V311, "B0 02 00 01");
    rejects(V311, "B0 03 00 01 00", 0x81);
    rejects(V311, "B0 02 00 00", 0x82);
    accepts(V5, "B0 04 00 01 00 11");
    rejects(V5, "B0 03 00 01 00", 0x81);
    rejects(V5, "B0 04 00 01 00 FF", 0x82);
    rejects(V5, "90 04 00 01 00 FF", 0x82);
    accepts(V5, "90 05 00 01 00 9E A1");
    rejects(V5, "90 06 00 01 02 01 00 00", 0x82);
}

#[test]
fn connack_rules() {
    let Packet::ConnAck(c) = accepts(V311, "20 02 01 00") else { panic!() };
    assert!(c.session_present);
    rejects(V311, "20 02 02 00", 0x81);
    rejects(V311, "20 02 80 00", 0x81);
    rejects(V311, "20 02 00 06", 0x82);
    rejects(V311, "20 02 01 05", 0x82);
    rejects(V311, "20 03 00 00 00", 0x81);
    rejects(V311, "20 01 00", 0x81);
    accepts(V5, "20 03 00 00 00");
    accepts(V5, "20 06 00 00 03 21 00 0A");
    rejects(V5, "20 02 00 00", 0x81);
    rejects(V5, "20 03 00 01 00", 0x82);
    rejects(V5, "20 05 00 00 02 01 00", 0x82);
    rejects(V5, "20 05 00 00 02 24 02", 0x82);
    rejects(V5, "20 05 00 00 02 04 01", 0x81);
}

#[test]
fn disconnect_and_auth() {
    accepts(V311, "E0 00");
    rejects(V311, "E0 01 00", 0x81);
    let Packet::Disconnect(d) = accepts(V5, "E0 01 04") else { panic!() };
    assert_eq!(d.reason, 4);
    accepts(V5, "E0 02 82 00");
    accepts(V5, "E0 07 00 05 11 00 00 00 00");
    accepts(V5, "E0 06 00 04 1C 00 01 70");
    for bad in ["01", "05", "10"] {
        rejects(V5, &format!("E0 01 {bad}"), 0x82);
    }
    // property section cut short, not allowed, duplicated, unknown
    for (h, code) in [
        ("E0 03 00 01 00", 0x81),
        ("E0 03 00 01 11", 0x81),
        ("E0 06 00 04 11 00 00 00", 0x81),
        ("E0 04 00 02 01 00", 0x82),
        ("E0 0C 00 0A 11 00 00 00 00 11 00 00 00 00", 0x82),
        ("E0 04 00 02 04 01", 0x81),
        ("E0 07 00 05 FF FF FF 7F 01", 0x81),
        ("E0 08 00 05 11 00 00 00 00 00", 0x81),
    ] {
        rejects(V5, h, code);
    }
    let Packet::Auth(a) = accepts(V5, "F0 0B 18 09 15 00 01 6D 16 00 02 00 01") else { panic!() };
    assert_eq!((a.reason, a.properties.authentication_method.as_deref()), (0x18, Some("m")));
    accepts(V5, "F0 01 19");
    rejects(V5, "F0 01 01", 0x82);
    rejects(V5, "F0 04 00 02 01 00", 0x82);
}

#[test]
fn never_panics_on_mutations() {
    // Every single-byte mutation and truncation of every corpus packet: the decoder must
    // return (anything) without panicking, and never consume bytes when it returns None.
    for v in [V31, V311, V5] {
        for p in corpus(v) {
            let bytes = encoded(&p, v);
            for i in 0..bytes.len() {
                for x in [0x00, 0x01, 0x7F, 0x80, 0xFF, bytes[i] ^ 0x01, bytes[i].wrapping_add(1)] {
                    let mut m = bytes.clone();
                    m[i] = x;
                    for ver in [None, Some(v)] {
                        let mut buf = BytesMut::from(&m[..]);
                        if let Ok(None) = decode(&mut buf, ver, 1 << 20) {
                            assert_eq!(buf.len(), m.len());
                        }
                    }
                }
            }
        }
    }
    // and some pseudo-random garbage
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..20_000 {
        let mut m = Vec::new();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 40) as usize;
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            m.push((seed >> 24) as u8);
        }
        for ver in [None, Some(V31), Some(V311), Some(V5)] {
            let _ = decode(&mut BytesMut::from(&m[..]), ver, 1 << 20);
        }
    }
}

#[test]
fn a_bridge_connect_sets_the_top_bit_of_the_level_and_decodes_back() {
    let c = Connect {
        protocol: ProtocolVersion::V311,
        bridge: true,
        clean_start: true,
        keep_alive: 60,
        client_id: "b".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let mut buf = BytesMut::new();
    encode(&Packet::Connect(Box::new(c.clone())), ProtocolVersion::V311, &mut buf);
    assert_eq!(buf[8], 0x84, "protocol level with the bridge bit");
    match decode(&mut buf, None, 1 << 20) {
        Ok(Some(Packet::Connect(d))) => assert_eq!(*d, c),
        other => panic!("{other:?}"),
    }
}

/// The connection's shortcut for bare PUBACKs takes exactly what `decode` reads as a PUBACK
/// with only a packet id, and leaves everything else (errors included) to `decode`.
#[test]
fn bare_puback_is_what_decode_reads_as_a_plain_puback() {
    for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(&[0x40, 0x02, 0x01, 0x02][..]);
        assert_eq!(bare_puback(&buf), Some(0x0102));
        let Ok(Some(Packet::PubAck(r))) = decode(&mut buf, Some(v), 1024) else { panic!("a PUBACK") };
        assert_eq!((r.packet_id, r.reason), (0x0102, 0));
    }
    for bytes in [
        &[0x40, 0x02, 0x00, 0x00][..],       // packet id 0: decode's protocol error
        &[0x40, 0x03, 0x00, 0x05, 0x10][..], // v5 reason code
        &[0x42, 0x02, 0x00, 0x05][..],       // flags set
        &[0x50, 0x02, 0x00, 0x05][..],       // PUBREC
        &[0x40, 0x02, 0x00][..],             // incomplete
    ] {
        assert_eq!(bare_puback(bytes), None, "{bytes:02x?}");
    }
}
