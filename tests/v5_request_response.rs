//! MQTT 5 request/response and pass-through properties (3.3.2.3, 4.10): Response Topic,
//! Correlation Data, Content Type, Payload Format Indicator and User Properties reach
//! subscribers unchanged; a payload marked UTF-8 that is not is refused with 0x99.

mod common;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

use common::*;

const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const USER_PROPERTY: u8 = 0x26;

/// User properties as (key, value) strings, in the order received.
fn user_props(m: &Pub) -> Vec<(String, String)> {
    m.props
        .iter()
        .filter(|(id, _)| *id == USER_PROPERTY)
        .map(|(_, v)| {
            let kl = usize::from(u16::from_be_bytes([v[0], v[1]]));
            let k = String::from_utf8(v[2..2 + kl].to_vec()).expect("utf-8 key");
            let vv = String::from_utf8(v[4 + kl..].to_vec()).expect("utf-8 value");
            (k, vv)
        })
        .collect()
}

#[tokio::test]
async fn publish_properties_are_forwarded_unchanged() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "pt-sub").await;
    s.subscribe(1, "pt/t", 1).await;
    let mut p = connect_v5(b.addr, "pt-pub").await;

    let mut sent = Vec::new();
    sent.extend(prop_u8(PROP_PAYLOAD_FORMAT, 1));
    sent.extend(prop_bin(CONTENT_TYPE, b"application/json"));
    sent.extend(prop_bin(RESPONSE_TOPIC, b"pt/reply"));
    sent.extend(prop_bin(CORRELATION_DATA, &[0x00, 0x01, 0xFF, 0x80]));
    sent.extend(prop_user("k", "1"));
    sent.extend(prop_user("z", "2"));
    sent.extend(prop_user("k", "3"));
    sent.extend(prop_user("", "empty key"));
    p.send(&publish_full(b"pt/t", br#"{"a":1}"#, 1, 1, false, false, Some(&sent))).await;
    p.expect_ack(0x40, 1).await;

    let m = s.recv_publish_ack().await;
    assert_eq!(m.payload, br#"{"a":1}"#);
    assert_eq!(m.prop(PROP_PAYLOAD_FORMAT), Some(&[1u8][..]), "{m:?}");
    assert_eq!(m.prop(CONTENT_TYPE), Some(&b"application/json"[..]));
    assert_eq!(m.prop(RESPONSE_TOPIC), Some(&b"pt/reply"[..]));
    assert_eq!(m.prop(CORRELATION_DATA), Some(&[0x00, 0x01, 0xFF, 0x80][..]));
    let expected: Vec<(String, String)> = [("k", "1"), ("z", "2"), ("k", "3"), ("", "empty key")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(user_props(&m), expected, "user properties, repeated key and order kept");
    // Nothing else was added (no expiry, alias or subscription identifier was asked for).
    let mut ids: Vec<u8> = m.props.iter().map(|(id, _)| *id).filter(|id| *id != USER_PROPERTY).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![PROP_PAYLOAD_FORMAT, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA]);
}

#[tokio::test]
async fn properties_of_a_retained_message_are_kept() {
    let b = start().await;
    let mut p = connect_v5(b.addr, "ptr-pub").await;
    let mut sent = prop_bin(RESPONSE_TOPIC, b"ptr/reply");
    sent.extend(prop_user("a", "b"));
    p.send(&publish_full(b"ptr/t", b"kept", 1, 1, true, false, Some(&sent))).await;
    p.expect_ack(0x40, 1).await;
    let mut s = connect_v5(b.addr, "ptr-sub").await;
    s.subscribe(1, "ptr/t", 1).await;
    let m = s.recv_publish_ack().await;
    assert!(m.retain);
    assert_eq!(m.prop(RESPONSE_TOPIC), Some(&b"ptr/reply"[..]));
    assert_eq!(user_props(&m), vec![("a".to_string(), "b".to_string())]);
}

#[tokio::test]
async fn request_response_round_trip_between_two_clients() {
    let b = start().await;
    let mut responder = V5::connect(b.addr, "rr-responder").await;
    responder.subscribe("rr/requests", QoS::AtLeastOnce).await;
    let mut requester = V5::connect(b.addr, "rr-requester").await;
    requester.subscribe("rr/replies/requester", QoS::AtLeastOnce).await;

    let request = PublishProperties {
        response_topic: Some("rr/replies/requester".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        content_type: Some("text/plain".into()),
        user_properties: vec![("trace".into(), "t1".into())],
        ..Default::default()
    };
    requester
        .client
        .publish_with_properties("rr/requests", QoS::AtLeastOnce, false, "ping?", request)
        .await
        .expect("publish request");

    let req = responder.recv_publish().await;
    assert_eq!(&req.payload[..], b"ping?");
    let props = req.properties.clone().expect("request properties");
    let reply_to = props.response_topic.clone().expect("Response Topic forwarded");
    assert_eq!(reply_to, "rr/replies/requester");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-42"[..]));
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("trace".to_string(), "t1".to_string())]);

    let reply = PublishProperties { correlation_data: props.correlation_data.clone(), ..Default::default() };
    responder
        .client
        .publish_with_properties(reply_to, QoS::AtLeastOnce, false, "pong!", reply)
        .await
        .expect("publish reply");
    let rep = requester.recv_publish().await;
    assert_eq!((&rep.topic[..], &rep.payload[..]), (&b"rr/replies/requester"[..], &b"pong!"[..]));
    let rp = rep.properties.expect("reply properties");
    assert_eq!(rp.correlation_data.as_deref(), Some(&b"req-42"[..]), "correlation data matches the request");
    assert_eq!(rp.response_topic, None);
}

#[tokio::test]
async fn invalid_utf8_marked_as_utf8_is_refused_with_0x99() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "pf-sub").await;
    s.subscribe(1, "pf/t", 2).await;
    let mut p = connect_v5(b.addr, "pf-pub").await;
    let utf8 = prop_u8(PROP_PAYLOAD_FORMAT, 1);

    p.send(&publish_full(b"pf/t", &[0xC3, 0x28, 0xFF], 1, 1, false, false, Some(&utf8))).await;
    assert_eq!(p.read_ack_reason(0x40, 1).await, 0x99, "PUBACK reason Payload Format Invalid");
    p.send(&publish_full(b"pf/t", &[0xFE], 2, 2, false, false, Some(&utf8))).await;
    assert_eq!(p.read_ack_reason(0x50, 2).await, 0x99, "PUBREC reason Payload Format Invalid");
    s.expect_silence(QUIET).await;

    // Valid UTF-8 with the same indicator is delivered with it; the connection is fine.
    p.send(&publish_full(b"pf/t", "grüße".as_bytes(), 1, 3, false, false, Some(&utf8))).await;
    assert_eq!(p.read_ack_reason(0x40, 3).await, 0x00);
    let m = s.recv_publish_ack().await;
    assert_eq!((m.payload.as_slice(), m.prop(PROP_PAYLOAD_FORMAT)), ("grüße".as_bytes(), Some(&[1u8][..])));
    // The same bytes with indicator 0 (unspecified bytes) are fine.
    p.send(&publish_full(b"pf/t", &[0xFF], 1, 4, false, false, Some(&prop_u8(PROP_PAYLOAD_FORMAT, 0)))).await;
    assert_eq!(p.read_ack_reason(0x40, 4).await, 0x00);
    assert_eq!(s.recv_publish_ack().await.payload, vec![0xFF]);
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn response_topic_with_a_wildcard_is_a_protocol_error() {
    let b = start().await;
    let mut s = connect_v5(b.addr, "rtw-sub").await;
    s.subscribe(1, "rtw/t", 1).await;
    let mut p = connect_v5(b.addr, "rtw-pub").await;
    let bad = prop_bin(RESPONSE_TOPIC, b"rtw/replies/+");
    p.send_lossy(&publish_full(b"rtw/t", b"req", 1, 1, false, false, Some(&bad))).await;
    // [MQTT-3.3.2-14]: the Response Topic must not contain wildcards.
    p.expect(&[0xE0, 0x01, 0x82]).await;
    p.expect_closed().await;
    s.expect_silence(QUIET).await;
}
