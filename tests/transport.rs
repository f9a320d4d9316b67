//! The transport seam: a connection is served over any byte stream, and every byte the broker
//! writes is flushed. The stream here passes bytes on only when flushed (like a TLS or
//! WebSocket stream, which buffer records), so a write path that forgets to flush leaves the
//! client waiting.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

/// A client over an in-memory pipe whose broker side holds writes (up to 64 KiB) until a flush.
async fn buffered_client(b: &TestBroker) -> Raw {
    let (client, server) = tokio::io::duplex(1 << 20);
    let server = BufWriter::with_capacity(64 * 1024, server);
    b.handle.serve(server, "127.0.0.1:9".parse().unwrap());
    Raw::over(client)
}

#[tokio::test]
async fn every_answer_is_flushed() {
    let b = start().await;
    let mut c = buffered_client(&b).await;
    let ack = c.handshake(&Connect::v5("flush-me")).await;
    assert_eq!(ack.code, 0, "CONNACK");
    c.ping().await;
    // SUBACK, PUBACK and the delivery itself.
    c.assert_alive("flush/t").await;
    c.disconnect().await;
}

#[tokio::test]
async fn a_refused_connect_is_flushed_before_close() {
    let b = start_with(|c| c.auth.allow_anonymous = Some(false)).await;
    let mut c = buffered_client(&b).await;
    let ack = c.handshake(&Connect::v5("nobody")).await;
    assert_eq!(ack.code, 0x87, "CONNACK Not authorized");
    c.expect_closed().await;
}

#[tokio::test]
async fn a_refused_protocol_version_is_flushed() {
    let b = start().await;
    let (mut client, server) = tokio::io::duplex(1 << 16);
    b.handle.serve(BufWriter::new(server), "127.0.0.1:9".parse().unwrap());
    let connect = Connect { level: 6, ..Connect::v311("lvl6") };
    client.write_all(&connect.bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut got)).await.expect("answer and close").unwrap();
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x01], "CONNACK 0x01 unacceptable protocol version");
}
