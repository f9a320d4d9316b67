//! The CONNECT handshake, keep-alive, PING and session takeover, as a client sees them.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn connack_v311_is_exact() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("c311").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.ping().await;
}

#[tokio::test]
async fn connack_v31_mqisdp_is_exact() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v31("c31").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.ping().await;
}

#[tokio::test]
async fn v31_client_id_longer_than_23_is_accepted() {
    // MQTT 3.1 capped ids at 23 bytes; tern (like mosquitto) accepts longer ones, limited only
    // by limits.max_client_id_length.
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v31("abcdefghijklmnopqrstuvwxyz").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.ping().await;
}

#[tokio::test]
async fn client_id_over_limit_is_rejected() {
    let b = start_with(|c| c.limits.max_client_id_length = 8).await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("123456789").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x02]).await;
    c.expect_closed().await;
    let mut c = Raw::open(b.addr).await;
    let ack = c.handshake(&Connect::v5("123456789")).await;
    assert_eq!(ack.code, 0x85, "v5 Client Identifier not valid: {ack:?}");
    c.expect_closed().await;
}

#[tokio::test]
async fn connack_v5_has_reason_and_properties() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v5("c5").bytes()).await;
    let p = c.read_packet().await;
    let (h, body) = split_packet(&p);
    assert_eq!(h, 0x20, "CONNACK header: {}", hex(&p));
    assert_eq!(body[0], 0x00, "acknowledge flags: {}", hex(&p));
    assert_eq!(body[1], 0x00, "reason code: {}", hex(&p));
    // A property length must follow, and it must cover the rest of the packet exactly.
    let (len, used) = read_varint(&body[2..]).expect("property length present");
    assert_eq!(2 + used + len, body.len(), "property length vs remaining length: {}", hex(&p));
    let ack = parse_connack(&p, true);
    // The broker announces its Maximum Packet Size (0x27) = limits.max_packet_size.
    assert_eq!(ack.prop(0x27), Some(&1_048_576u32.to_be_bytes()[..]), "Maximum Packet Size: {ack:?}");
    assert!(ack.prop(PROP_ASSIGNED_CLIENT_ID).is_none(), "no Assigned Client Identifier for a named client");
    c.ping().await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_0x01_and_close() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    let connect = Connect { level: 6, ..Connect::v311("lvl6") };
    c.send(&connect.bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x01]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn empty_client_id_with_clean_session_is_accepted_v311() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.assert_alive("anon/t").await;
}

#[tokio::test]
async fn empty_client_id_without_clean_session_is_rejected_v311() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("").clean(false).bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x02]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn v5_empty_client_id_gets_assigned_identifier() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    let ack = c.handshake(&Connect::v5("")).await;
    assert_eq!(ack.code, 0);
    let id = ack.prop(PROP_ASSIGNED_CLIENT_ID).expect("Assigned Client Identifier property");
    assert!(!id.is_empty(), "assigned id is empty");
    assert!(std::str::from_utf8(id).is_ok(), "assigned id is not UTF-8");
    // Two anonymous clients get different identifiers.
    let mut d = Raw::open(b.addr).await;
    let ack2 = d.handshake(&Connect::v5("")).await;
    assert_ne!(ack2.prop(PROP_ASSIGNED_CLIENT_ID), Some(id), "assigned ids must differ");
    c.ping().await;
    d.ping().await;
}

#[tokio::test]
async fn no_connect_within_timeout_closes() {
    let b = start_with(|c| c.limits.connect_timeout_secs = 1).await;
    let mut c = Raw::open(b.addr).await;
    let took = c.expect_closed_within(Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(800), "closed after {took:?}, before the 1 s timeout");
}

#[tokio::test]
async fn keep_alive_expiry_closes_v311() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v311("ka311").keep_alive(1)).await;
    let took = c.expect_closed_within(Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(1200), "closed after {took:?}, expected ~1.5 s");
}

#[tokio::test]
async fn keep_alive_expiry_sends_disconnect_0x8d_v5() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("ka5").keep_alive(1)).await;
    let t0 = std::time::Instant::now();
    let p = c.read_packet().await;
    let took = t0.elapsed();
    assert_eq!(hex(&p), hex(&[0xE0, 0x01, 0x8D]), "expected DISCONNECT with Keep Alive timeout");
    assert!(took >= Duration::from_millis(1200), "DISCONNECT after {took:?}, expected ~1.5 s");
    c.expect_closed().await;
}

#[tokio::test]
async fn pings_keep_the_connection_alive() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v311("pinger").keep_alive(1)).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.ping().await;
    }
}

#[tokio::test]
async fn pingreq_gets_pingresp() {
    let b = start().await;
    let mut c = connect_v311(b.addr, "ping").await;
    c.send(&PINGREQ).await;
    c.expect(&[0xD0, 0x00]).await;
    // Two at once: two answers.
    c.send(&[0xC0, 0x00, 0xC0, 0x00]).await;
    c.expect(&PINGRESP).await;
    c.expect(&PINGRESP).await;
}

#[tokio::test]
async fn takeover_closes_first_connection_v311() {
    let b = start().await;
    let mut first = connect_v311(b.addr, "same").await;
    let mut second = connect_v311(b.addr, "same").await;
    first.expect_closed().await;
    second.assert_alive("takeover/t").await;
}

#[tokio::test]
async fn takeover_sends_disconnect_0x8e_v5() {
    let b = start().await;
    let mut first = connect_v5(b.addr, "same5").await;
    let mut second = connect_v5(b.addr, "same5").await;
    first.expect_disconnect(0x8E).await;
    second.assert_alive("takeover5/t").await;
}

#[tokio::test]
async fn session_present_flag_v311() {
    let b = start().await;
    let persistent = Connect::v311("sp").clean(false);

    let mut c = Raw::open(b.addr).await;
    c.send(&persistent.bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await; // new session
    c.disconnect().await;

    let mut c = Raw::open(b.addr).await;
    c.send(&persistent.bytes()).await;
    c.expect(&[0x20, 0x02, 0x01, 0x00]).await; // resumed
    c.disconnect().await;

    let mut c = Raw::open(b.addr).await;
    c.send(&Connect::v311("sp").bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await; // clean session: never present
    c.disconnect().await;

    let mut c = Raw::open(b.addr).await;
    c.send(&persistent.bytes()).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await; // the clean session discarded it
}

#[tokio::test]
async fn session_present_flag_v5() {
    let b = start().await;
    let (c, ack) = connect_with(b.addr, &Connect::v5("sp5").expiry(60)).await;
    assert!(!ack.session_present);
    c.disconnect().await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("sp5").clean(false).expiry(60)).await;
    assert!(ack.session_present, "v5 session with expiry 60 should be resumed: {ack:?}");
}

#[tokio::test]
async fn shutdown_tells_v5_clients_and_closes_all() {
    let b = start().await;
    let mut c5 = connect_v5(b.addr, "down5").await;
    let mut c3 = connect_v311(b.addr, "down3").await;
    let addr = b.addr;
    tokio::time::timeout(WAIT, b.handle.shutdown()).await.expect("shutdown finishes").expect("clean shutdown");
    c5.expect_disconnect(0x8B).await;
    c3.expect_closed().await;
    // Nothing listens any more.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "listener still accepting after shutdown");
}

/// Packets sent right behind CONNECT, in the same segment, are answered without waiting for
/// the client to send anything more.
#[tokio::test]
async fn packets_pipelined_behind_connect_are_handled() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    let mut bytes = Connect::v311("pipelined").bytes();
    bytes.extend(subscribe_pkt(false, 7, &[("pipe/t", 1)]));
    bytes.extend(publish("pipe/t", b"self", 1, 8));
    bytes.extend(PINGREQ);
    c.send(&bytes).await;
    c.expect(&[0x20, 0x02, 0x00, 0x00]).await;
    c.expect(&[0x90, 0x03, 0x00, 0x07, 0x01]).await;
    // PUBACK, PINGRESP and the delivery of its own message (which may come at any point).
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(c.read_packet().await[0] >> 4);
    }
    kinds.sort();
    assert_eq!(kinds, vec![3, 4, 13], "PUBLISH, PUBACK and PINGRESP");
}
