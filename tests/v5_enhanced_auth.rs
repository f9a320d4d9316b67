//! MQTT 5 enhanced authentication (4.12). By default tern offers no method, so a CONNECT
//! naming one is refused with 0x8C and an AUTH packet is a Protocol Error; a method plugged
//! in through `tern::Extensions` runs the AUTH exchange at CONNECT and on re-authentication.

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

/// A toy challenge/response method: data "hello" gets the challenge "challenge"; the answer
/// "challenge-response" is accepted with "welcome", anything else refused with 0x87.
struct Echo;
struct EchoExchange;

impl tern::auth::AuthExchange for EchoExchange {
    fn next(&mut self, data: Option<&[u8]>) -> tern::auth::AuthStep {
        match data {
            Some(b"challenge-response") => tern::auth::AuthStep::Success(Some(bytes::Bytes::from_static(b"welcome"))),
            _ => tern::auth::AuthStep::Fail(0x87),
        }
    }
}

impl tern::auth::AuthMethod for Echo {
    fn name(&self) -> &str {
        "TERN-TEST-ECHO"
    }
    fn start(
        &self,
        _client_id: &str,
        _username: Option<&str>,
        data: Option<&[u8]>,
    ) -> (Box<dyn tern::auth::AuthExchange>, tern::auth::AuthStep) {
        let step = match data {
            Some(b"hello") => tern::auth::AuthStep::Continue(Some(bytes::Bytes::from_static(b"challenge"))),
            _ => tern::auth::AuthStep::Fail(0x87),
        };
        (Box::new(EchoExchange), step)
    }
}

async fn start_with_echo() -> (tern::BrokerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    c.storage.dir = dir.path().to_path_buf();
    let ext = tern::Extensions { auth_methods: vec![std::sync::Arc::new(Echo)], ..Default::default() };
    (tern::start_with(c, ext).await.unwrap(), dir)
}

fn auth_packet(reason: u8, data: &[u8]) -> Vec<u8> {
    let mut p = prop_bin(AUTHENTICATION_METHOD, b"TERN-TEST-ECHO");
    p.extend(prop_bin(AUTHENTICATION_DATA, data));
    let mut body = vec![reason];
    body.extend(props(&p));
    packet(0xF0, &body)
}

fn echo_connect(id: &str, data: &[u8]) -> Connect {
    let mut connect = Connect::v5(id);
    connect.properties.extend(prop_bin(AUTHENTICATION_METHOD, b"TERN-TEST-ECHO"));
    connect.properties.extend(prop_bin(AUTHENTICATION_DATA, data));
    connect
}

#[tokio::test]
async fn a_plugged_in_method_runs_the_auth_exchange_before_connack() {
    let (b, _dir) = start_with_echo().await;
    let mut c = Raw::open(b.local_addr()).await;
    c.send(&echo_connect("echo-ok", b"hello").bytes()).await;
    c.expect(&auth_packet(0x18, b"challenge")).await;
    c.send(&auth_packet(0x18, b"challenge-response")).await;
    let ack = parse_connack(&c.read_packet().await, true);
    assert_eq!(ack.code, 0x00, "{ack:?}");
    assert_eq!(ack.prop(AUTHENTICATION_METHOD).map(|v| v.to_vec()), Some(b"TERN-TEST-ECHO".to_vec()));
    assert_eq!(ack.prop(AUTHENTICATION_DATA).map(|v| v.to_vec()), Some(b"welcome".to_vec()));
    c.ping().await;

    // Re-authentication: AUTH 0x19, one challenge, success with AUTH 0x00.
    c.send(&auth_packet(0x19, b"hello")).await;
    c.expect(&auth_packet(0x18, b"challenge")).await;
    c.send(&auth_packet(0x18, b"challenge-response")).await;
    c.expect(&auth_packet(0x00, b"welcome")).await;
    c.ping().await;
}

#[tokio::test]
async fn a_wrong_answer_is_refused_with_the_methods_reason_code() {
    let (b, _dir) = start_with_echo().await;
    let mut c = Raw::open(b.local_addr()).await;
    c.send(&echo_connect("echo-bad", b"hello").bytes()).await;
    c.expect(&auth_packet(0x18, b"challenge")).await;
    c.send(&auth_packet(0x18, b"guess")).await;
    let ack = parse_connack(&c.read_packet().await, true);
    assert_eq!(ack.code, 0x87, "{ack:?}");
    c.expect_closed().await;
}

#[tokio::test]
async fn failed_re_authentication_disconnects() {
    let (b, _dir) = start_with_echo().await;
    let mut c = Raw::open(b.local_addr()).await;
    c.send(&echo_connect("echo-re", b"hello").bytes()).await;
    c.expect(&auth_packet(0x18, b"challenge")).await;
    c.send(&auth_packet(0x18, b"challenge-response")).await;
    assert_eq!(parse_connack(&c.read_packet().await, true).code, 0x00);
    c.send(&auth_packet(0x19, b"not hello")).await;
    c.expect_disconnect(0x87).await;
}
