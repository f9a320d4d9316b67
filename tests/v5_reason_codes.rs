//! MQTT 5 reason codes on the wire (2.4): acknowledgements that say why, and the DISCONNECT
//! tern sends before it closes a connection.

mod common;

use common::*;

#[tokio::test]
async fn puback_0x10_without_subscribers_and_0x00_with() {
    let b = start().await;
    let mut p = connect_v5(b.addr, "rc-pub").await;
    p.send(&publish_full(b"rc/t", b"nobody", 1, 1, false, false, Some(&[]))).await;
    p.expect(&[0x40, 0x03, 0x00, 0x01, 0x10]).await;

    let mut s = connect_v5(b.addr, "rc-sub").await;
    s.subscribe(1, "rc/t", 1).await;
    p.send(&publish_full(b"rc/t", b"somebody", 1, 2, false, false, Some(&[]))).await;
    // Success may be sent in the short form (reason and properties omitted) or in full.
    let ack = p.read_packet().await;
    assert!(
        ack == [0x40, 0x02, 0x00, 0x02] || ack == [0x40, 0x03, 0x00, 0x02, 0x00],
        "PUBACK with success expected, got {}",
        hex(&ack)
    );
    assert_eq!(s.recv_publish_ack().await.payload, b"somebody");
}

#[tokio::test]
async fn takeover_sends_disconnect_0x8e_to_the_old_connection() {
    let b = start().await;
    let mut old = connect_v5(b.addr, "dup-id").await;
    let _new = connect_v5(b.addr, "dup-id").await;
    old.expect(&[0xE0, 0x01, 0x8E]).await;
    old.expect_closed().await;
}

#[tokio::test]
async fn keep_alive_timeout_sends_disconnect_0x8d() {
    let b = start().await;
    let (mut c, _) = connect_with(b.addr, &Connect::v5("ka-rc").keep_alive(1)).await;
    c.expect(&[0xE0, 0x01, 0x8D]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn shutdown_sends_disconnect_0x8b() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "sd-rc").await;
    let TestBroker { handle, .. } = b;
    tokio::time::timeout(WAIT, handle.shutdown()).await.expect("shutdown finishes").expect("clean shutdown");
    c.expect(&[0xE0, 0x01, 0x8B]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn unsuback_0x11_for_a_filter_not_subscribed() {
    let b = start().await;
    let mut c = connect_v5(b.addr, "us-rc").await;
    c.subscribe(1, "us/a", 1).await;
    c.send(&unsubscribe_pkt(true, 7, &["us/a", "us/b"])).await;
    c.expect(&[0xB0, 0x05, 0x00, 0x07, 0x00, 0x00, 0x11]).await;
    // Unsubscribed now: a second time is 0x11 too.
    c.send(&unsubscribe_pkt(true, 8, &["us/a"])).await;
    c.expect(&[0xB0, 0x04, 0x00, 0x08, 0x00, 0x11]).await;
}
