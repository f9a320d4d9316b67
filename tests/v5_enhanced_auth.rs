//! MQTT 5 enhanced authentication (4.12): tern has no authentication method, so a CONNECT
//! naming one is refused with 0x8C and an AUTH packet is a Protocol Error.

mod common;

use common::*;

const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;

#[tokio::test]
async fn connect_with_an_authentication_method_gets_connack_0x8c_and_close() {
    let b = start().await;
    let mut c = Raw::open(b.addr).await;
    let mut connect = Connect::v5("auth-m");
    connect.properties.extend(prop_bin(AUTHENTICATION_METHOD, b"SCRAM-SHA-1"));
    connect.properties.extend(prop_bin(AUTHENTICATION_DATA, b"client-first"));
    let ack = c.handshake(&connect).await;
    assert_eq!((ack.code, ack.session_present), (0x8C, false), "{ack:?}");
    c.expect_closed().await;
    // No session was created for it.
    let (_c, ack) = connect_with(b.addr, &Connect::v5("auth-m").clean(false)).await;
    assert!(!ack.session_present, "{ack:?}");
}

#[tokio::test]
async fn auth_packet_on_a_normal_connection_gets_disconnect_0x82() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "auth-p").await;
    c.send(&[0xF0, 0x00]).await;
    c.expect(&[0xE0, 0x01, 0x82]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn auth_continue_with_properties_gets_disconnect_0x82() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "auth-c").await;
    let mut body = vec![0x18]; // Continue authentication
    body.extend(props(&prop_bin(AUTHENTICATION_METHOD, b"SCRAM-SHA-1")));
    c.send_lossy(&packet(0xF0, &body)).await;
    c.expect(&[0xE0, 0x01, 0x82]).await;
    c.expect_closed().await;
}
