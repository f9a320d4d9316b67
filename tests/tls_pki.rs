//! Checks the TLS test helpers themselves against a bare `TlsAcceptor` (no broker), so a TLS
//! test of the broker that fails points at the broker, not at its test PKI.

mod common;

use std::sync::Arc;

use common::tls::{connect_tls, rumqttc_transport, TestPki};
use common::WAIT;
use tern::transport::tls::TlsAcceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A server on 127.0.0.1:0 that accepts one connection, runs the handshake, echoes one read,
/// and hands back the client CN `accept` reported.
async fn echo_once(acceptor: TlsAcceptor) -> (std::net::SocketAddr, JoinHandle<std::io::Result<Option<Arc<str>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let (mut tls, cn) = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        tls.write_all(&buf[..n]).await?;
        tls.flush().await?;
        Ok(cn)
    });
    (addr, task)
}

/// Writes `msg` and reads the echo back, within WAIT.
async fn round_trip(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    tls.write_all(msg).await?;
    tls.flush().await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, tls.read_exact(&mut buf)).await.map_err(std::io::Error::other)??;
    Ok(buf)
}

#[tokio::test]
async fn connect_tls_reaches_a_server_using_the_pki() {
    let pki = TestPki::new();
    let (addr, server) = echo_once(TlsAcceptor::new(&pki.server_tls(), 0).expect("acceptor")).await;
    let mut tls = connect_tls(addr, pki.client_config(None)).await.expect("handshake");
    assert_eq!(round_trip(&mut tls, b"hello").await.expect("echo"), b"hello");
    assert_eq!(server.await.expect("server task").expect("server side"), None);
}

#[tokio::test]
async fn client_certificate_cn_comes_back_from_accept() {
    let pki = TestPki::new();
    let mut settings = pki.server_tls();
    settings.client_ca = Some(pki.ca_path());
    settings.require_client_cert = true;
    let (addr, server) = echo_once(TlsAcceptor::new(&settings, 0).expect("acceptor")).await;
    let (cert, key) = pki.client_cert("device-42");
    let mut tls = connect_tls(addr, pki.client_config(Some((&cert, &key)))).await.expect("handshake");
    assert_eq!(round_trip(&mut tls, b"ping").await.expect("echo"), b"ping");
    let cn = server.await.expect("server task").expect("server side");
    assert_eq!(cn.as_deref(), Some("device-42"));
}

#[tokio::test]
async fn foreign_client_certificate_is_refused() {
    let pki = TestPki::new();
    let mut settings = pki.server_tls();
    settings.client_ca = Some(pki.ca_path());
    settings.require_client_cert = true;
    let (addr, server) = echo_once(TlsAcceptor::new(&settings, 0).expect("acceptor")).await;
    let (cert, key) = pki.foreign_client_cert("intruder");
    // TLS 1.3: the refusal may come after the client's side of the handshake is done.
    let client = async {
        let mut tls = connect_tls(addr, pki.client_config(Some((&cert, &key)))).await?;
        round_trip(&mut tls, b"ping").await
    };
    assert!(client.await.is_err(), "a certificate from another CA got through");
    assert!(server.await.expect("server task").is_err());
}

#[tokio::test]
async fn rumqttc_transport_speaks_tls_to_the_server() {
    let pki = TestPki::new();
    let acceptor = TlsAcceptor::new(&pki.server_tls(), 0).expect("acceptor");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");

    let mut opts = rumqttc::MqttOptions::new("tls-helper", "localhost", addr.port());
    opts.set_transport(rumqttc_transport(pki.client_config(None)));
    let (_client, mut event_loop) = rumqttc::AsyncClient::new(opts, 10);
    let client = tokio::spawn(async move {
        // Drives the connection; it fails once the server side hangs up, which is expected.
        let _ = event_loop.poll().await;
    });

    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("client connects").expect("accept");
    let (mut tls, _) = acceptor.accept(tcp).await.expect("handshake");
    let mut first = [0u8; 1];
    tokio::time::timeout(WAIT, tls.read_exact(&mut first)).await.expect("CONNECT in time").expect("read");
    assert_eq!(first[0], 0x10, "first packet over TLS is CONNECT");
    drop(tls);
    client.abort();
}
