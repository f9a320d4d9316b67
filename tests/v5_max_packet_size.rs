//! MQTT 5 Maximum Packet Size (3.1.2.11.4, 3.2.2.3.6): tern's limit announced and enforced,
//! and the client's limit respected by dropping what does not fit.

mod common;

use common::*;

const MAXIMUM_PACKET_SIZE: u8 = 0x27;

#[tokio::test]
async fn connack_announces_the_configured_maximum_packet_size() {
    let b = start_with(|c| c.limits.max_packet_size = 1024).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("mps-ann")).await;
    assert_eq!(ack.prop(MAXIMUM_PACKET_SIZE), Some(&1024u32.to_be_bytes()[..]), "{ack:?}");
}

#[tokio::test]
async fn connack_announces_the_default_maximum_packet_size() {
    let b = start().await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("mps-def")).await;
    assert_eq!(ack.prop(MAXIMUM_PACKET_SIZE), Some(&1_048_576u32.to_be_bytes()[..]), "{ack:?}");
}

#[tokio::test]
async fn no_maximum_packet_size_announced_at_the_protocol_maximum() {
    let b = start_with(|c| c.limits.max_packet_size = 268_435_460).await;
    let (_c, ack) = connect_with(b.addr, &Connect::v5("mps-max")).await;
    assert_eq!(ack.prop(MAXIMUM_PACKET_SIZE), None, "{ack:?}");
}

#[tokio::test]
async fn packet_over_the_limit_gets_disconnect_0x95() {
    let b = start_with(|c| c.limits.max_packet_size = 1024).await;
    let mut s = connect_v5(b.addr, "big-watch").await;
    s.subscribe(1, "big/t", 0).await;
    let mut c = connect_v5(b.addr, "big-pub").await;
    // Within the limit: accepted.
    c.publish("big/t", &[b'a'; 900], 1, 1).await;
    assert_eq!(s.recv_publish().await.payload.len(), 900);
    // Over it (2000 bytes of payload): DISCONNECT 0x95, nothing delivered.
    c.send_lossy(&publish_full(b"big/t", &[b'b'; 2000], 1, 2, false, false, Some(&[]))).await;
    c.expect(&[0xE0, 0x01, 0x95]).await;
    c.expect_closed().await;
    s.expect_silence(QUIET).await;
}

#[tokio::test]
async fn message_too_large_for_the_client_is_dropped_for_it() {
    let b = start().await;
    let mut s = Raw::open(b.addr).await;
    let mut c = Connect::v5("small-sub");
    c.properties.extend(prop_u32(MAXIMUM_PACKET_SIZE, 100));
    let ack = s.handshake(&c).await;
    assert_eq!(ack.code, 0);
    s.subscribe(1, "mps/t", 1).await;
    let mut other = connect_v5(b.addr, "big-sub").await;
    other.subscribe(1, "mps/t", 1).await;

    let mut p = connect_v5(b.addr, "mps-pub").await;
    p.publish("mps/t", &[b'x'; 500], 1, 1).await;
    p.publish("mps/t", b"small", 1, 2).await;
    p.publish("mps/t", &[b'y'; 500], 0, 0).await;
    p.publish("mps/t", b"small0", 0, 0).await;

    // The small client sees only what fits its 100 bytes.
    let m = s.recv_publish_ack().await;
    assert_eq!(m.payload, b"small");
    let m = s.recv_publish_ack().await;
    assert_eq!(m.payload, b"small0");
    s.expect_silence(QUIET).await;
    // Another subscriber still gets everything.
    let lens: Vec<usize> = [
        other.recv_publish_ack().await,
        other.recv_publish_ack().await,
        other.recv_publish_ack().await,
        other.recv_publish_ack().await,
    ]
    .iter()
    .map(|m| m.payload.len())
    .collect();
    assert_eq!(lens, vec![500, 5, 500, 6]);
}
