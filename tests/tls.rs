//! TLS listeners end to end: rumqttc and raw MQTT over TLS, client certificates (required,
//! missing, from another CA), the certificate's CN as the user name feeding the ACL, a burst
//! that only arrives if every write is flushed, certificate reload without dropping
//! connections, and start-up errors that name the file.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::tls::{connect_tls, rumqttc_transport, TestPki};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A broker with one TLS listener on 127.0.0.1:0 using `tls`.
async fn tls_broker(tls: tern::config::Tls, f: impl FnOnce(&mut tern::Config)) -> TestBroker {
    start_with(|c| {
        c.listener[0] = tern::config::Listener::with_tls("127.0.0.1:0", tern::config::ListenerKind::Tls, tls);
        f(c);
    })
    .await
}

async fn raw_tls(b: &TestBroker, cfg: std::sync::Arc<rustls::ClientConfig>) -> Raw {
    let s = tokio::time::timeout(WAIT, connect_tls(b.addr, cfg)).await.expect("TLS connect timeout").expect("TLS");
    Raw::over(s)
}

/// rumqttc over TLS publishes and receives its own message. Also shows the listener does not
/// read the socket before the TLS handshake (an early read would eat the ClientHello).
#[tokio::test]
async fn rumqttc_over_tls() {
    let pki = TestPki::new();
    let b = tls_broker(pki.server_tls(), |_| {}).await;
    let mut opts = rumqttc::MqttOptions::new("tls-client", "localhost", b.port());
    opts.set_transport(rumqttc_transport(pki.client_config(None)));
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    client.subscribe("tls/t", rumqttc::QoS::AtLeastOnce).await.unwrap();
    client.publish("tls/t", rumqttc::QoS::AtLeastOnce, false, b"over tls".to_vec()).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("rumqttc over TLS: {e}"),
            }
        }
    })
    .await
    .expect("message over TLS");
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("tls/t", &b"over tls"[..]));
}

/// A subscriber that is not reading while 32 MB are published to it: the broker's writes fill
/// the socket and TLS keeps the rest in its own buffer. Every message must still arrive once
/// the subscriber reads, which needs the broker to flush the TLS stream, not just write to it.
#[tokio::test]
async fn burst_to_a_slow_tls_reader_arrives_whole() {
    let pki = TestPki::new();
    let b = tls_broker(pki.server_tls(), |_| {}).await;
    let mut sub = raw_tls(&b, pki.client_config(None)).await;
    assert_eq!(sub.handshake(&Connect::v311("slow")).await.code, 0);
    sub.subscribe(1, "burst", 0).await;
    let mut publisher = raw_tls(&b, pki.client_config(None)).await;
    assert_eq!(publisher.handshake(&Connect::v311("fast")).await.code, 0);
    burst_to_a_slow_reader(&mut publisher, &mut sub, "burst", 2000).await;
}

#[tokio::test]
async fn client_certificate_required() {
    let pki = TestPki::new();
    let mut tls = pki.server_tls();
    tls.client_ca = Some(pki.ca_path());
    tls.require_client_cert = true;
    let b = tls_broker(tls, |_| {}).await;

    // A certificate from our CA: in.
    let (cert, key) = pki.client_cert("device-1");
    let mut ok = raw_tls(&b, pki.client_config(Some((&cert, &key)))).await;
    assert_eq!(ok.handshake(&Connect::v311("device-1")).await.code, 0);
    ok.assert_alive("mtls/ok").await;

    // No certificate: the handshake fails (TLS 1.3 reports it on the client's first read).
    assert!(refused(&b, pki.client_config(None)).await, "client without a certificate was served");

    // A certificate from another CA: refused the same way.
    let (cert, key) = pki.foreign_client_cert("device-1");
    assert!(refused(&b, pki.client_config(Some((&cert, &key)))).await, "certificate from another CA was served");
}

/// True when the broker does not answer CONNECT with a CONNACK over this TLS configuration.
async fn refused(b: &TestBroker, cfg: std::sync::Arc<rustls::ClientConfig>) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(WAIT, connect_tls(b.addr, cfg)).await else { return true };
    if s.write_all(&Connect::v311("x").bytes()).await.is_err() || s.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 4];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(n)) => n == 0,
        Ok(Err(_)) => true,
        Err(_) => panic!("neither CONNACK nor close within {WAIT:?}"),
    }
}

/// `use_identity_as_username`: the CN is the user name the ACL sees; CONNECT's user name
/// and password are ignored.
#[tokio::test]
async fn certificate_cn_is_the_user_for_the_acl() {
    let pki = TestPki::new();
    let acl = pki.dir.path().join("acl");
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n\nuser bob\ntopic readwrite bob/#\n").unwrap();
    let mut tls = pki.server_tls();
    tls.client_ca = Some(pki.ca_path());
    tls.require_client_cert = true;
    tls.use_identity_as_username = true;
    let b = tls_broker(tls, |c| c.auth.acl_file = Some(acl.clone())).await;
    let (cert, key) = pki.client_cert("alice");
    let mut alice = raw_tls(&b, pki.client_config(Some((&cert, &key)))).await;
    // Claims to be bob in CONNECT; the certificate says alice.
    let ack = alice.handshake(&Connect::v5("c1").login("bob", "whatever")).await;
    assert_eq!(ack.code, 0);
    alice.assert_alive("alice/x").await;
    assert_eq!(alice.subscribe_many(2, &[("bob/#", 1)]).await, vec![0x87], "bob's tree is not alice's");
}

/// SIGHUP's reload swaps the server certificate: connections made before it keep working,
/// new ones get the new certificate.
#[tokio::test]
async fn certificate_reload_keeps_connections() {
    let pki = TestPki::new();
    let b = tls_broker(pki.server_tls(), |_| {}).await;
    let mut before = raw_tls(&b, pki.client_config(None)).await;
    assert_eq!(before.handshake(&Connect::v311("before")).await.code, 0);

    // A new certificate from a new CA, written over the configured files.
    let next = TestPki::new();
    std::fs::copy(next.server_cert_path(), pki.server_cert_path()).unwrap();
    std::fs::copy(next.server_key_path(), pki.server_key_path()).unwrap();
    b.handle.reload().await.expect("reload");

    before.assert_alive("reload/a").await;
    assert!(refused(&b, pki.client_config(None)).await, "old CA still accepted after reload");
    let mut after = raw_tls(&b, next.client_config(None)).await;
    assert_eq!(after.handshake(&Connect::v311("after")).await.code, 0);
    after.assert_alive("reload/b").await;

    // A broken file: the reload fails, names the file, and the current certificate stays.
    std::fs::File::create(pki.server_cert_path()).unwrap().write_all(b"not a certificate").unwrap();
    let errors = b.handle.reload().await.expect_err("reload of a broken certificate");
    assert!(errors.iter().any(|e| e.contains("server.crt")), "{errors:?}");
    let mut again = raw_tls(&b, next.client_config(None)).await;
    assert_eq!(again.handshake(&Connect::v311("again")).await.code, 0);
}

#[tokio::test]
async fn unreadable_certificate_stops_start_naming_file_and_key() {
    let pki = TestPki::new();
    let mut tls = pki.server_tls();
    tls.key = pki.dir.path().join("missing.key");
    let dir = tempfile::tempdir().unwrap();
    let mut c = tern::Config::default();
    c.listener[0] = tern::config::Listener::with_tls("127.0.0.1:0", tern::config::ListenerKind::Tls, tls);
    c.storage.dir = dir.path().to_path_buf();
    let err = match tern::start(c).await {
        Ok(_) => panic!("started with a missing key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("missing.key") && err.contains("listener[0].tls.key"), "{err}");
}
