//! Malformed and forbidden input: the offending connection is closed (3.1.1) or told why
//! with DISCONNECT (v5), and a well-behaved client connected beforehand is unaffected.

mod common;

use std::time::Duration;

use common::*;

/// A broker with a healthy client already connected and subscribed.
struct Scene {
    b: TestBroker,
    good: Raw,
}

impl Scene {
    async fn new() -> Scene {
        Scene::with(|_| {}).await
    }

    async fn with(f: impl FnOnce(&mut tern::Config)) -> Scene {
        let b = start_with(f).await;
        let mut good = connect_v311(b.addr, "good").await;
        good.subscribe(1, "ok/t", 1).await;
        Scene { b, good }
    }

    async fn bad_v311(&self) -> Raw {
        connect_v311(self.b.addr, "bad").await
    }

    async fn bad_v5(&self) -> Raw {
        connect_v5(self.b.addr, "bad5").await
    }

    /// The healthy client still publishes and receives.
    async fn still_fine(mut self) {
        self.good.assert_alive("ok/t").await;
        // And new clients are still accepted.
        let mut fresh = connect_v311(self.b.addr, "fresh").await;
        fresh.ping().await;
    }
}

/// 3.1.1: after CONNECT, `bytes` makes the broker close the connection without a word.
async fn closes_v311(bytes: &[u8]) {
    let s = Scene::new().await;
    let mut bad = s.bad_v311().await;
    bad.send_lossy(bytes).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

/// v5: after CONNECT, `bytes` gets DISCONNECT with `reason`, then close.
async fn disconnects_v5(bytes: &[u8], reason: u8) {
    let s = Scene::new().await;
    let mut bad = s.bad_v5().await;
    bad.send_lossy(bytes).await;
    bad.expect_disconnect(reason).await;
    s.still_fine().await;
}

// --- First packet --------------------------------------------------------------------------

#[tokio::test]
async fn first_packet_not_connect() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    bad.send(&PINGREQ).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

#[tokio::test]
async fn first_packet_publish_not_connect() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    bad.send(&publish("ok/t", b"sneaky", 0, 0)).await;
    bad.expect_closed().await;
    // The sneaky message was not routed: `still_fine` fails on any delivery but its own.
    s.still_fine().await;
}

#[tokio::test]
async fn first_packet_with_huge_remaining_length_closes_at_once() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    bad.send(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    bad.expect_closed_within(Duration::from_secs(1)).await;
    s.still_fine().await;
}

#[tokio::test]
async fn first_packet_with_five_byte_remaining_length() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    bad.send(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    bad.expect_closed_within(Duration::from_secs(1)).await;
    s.still_fine().await;
}

#[tokio::test]
async fn connect_with_wrong_protocol_name() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    let c = Connect { protocol_name: "MQTX", ..Connect::v311("x") };
    bad.send(&c.bytes()).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

#[tokio::test]
async fn connect_with_reserved_flag_bit() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    let mut bytes = Connect::v311("x").bytes();
    // 10 len | 00 04 MQTT | 04 | flags: set the reserved bit 0.
    bytes[9] |= 0x01;
    bad.send(&bytes).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

// --- Variable byte integer -----------------------------------------------------------------

#[tokio::test]
async fn non_minimal_remaining_length_v311() {
    closes_v311(&[0xC0, 0x80, 0x00]).await;
}

#[tokio::test]
async fn non_minimal_remaining_length_v5() {
    // PUBLISH "a" / "x" with remaining length 5 encoded in two bytes (85 00).
    disconnects_v5(&[0x30, 0x85, 0x00, 0x00, 0x01, b'a', 0x00, b'x'], 0x81).await;
}

#[tokio::test]
async fn non_minimal_remaining_length_on_pingreq_v5() {
    // A malformed PINGREQ ends the connection; tern (like mosquitto) may skip the DISCONNECT.
    let s = Scene::new().await;
    let mut bad = s.bad_v5().await;
    bad.send(&[0xC0, 0x80, 0x00]).await;
    match bad.next_event(WAIT).await {
        Event::Closed => {}
        Event::Packet(p) => {
            assert_eq!(hex(&p), hex(&[0xE0, 0x01, 0x81]));
            bad.expect_closed().await;
        }
        Event::Timeout => panic!("connection still open"),
    }
    s.still_fine().await;
}

// --- Packets a client may not send ---------------------------------------------------------

#[tokio::test]
async fn second_connect_v311() {
    closes_v311(&Connect::v311("bad").bytes()).await;
}

#[tokio::test]
async fn second_connect_v5() {
    disconnects_v5(&Connect::v5("bad5").bytes(), 0x82).await;
}

#[tokio::test]
async fn client_sent_connack_v311() {
    closes_v311(&[0x20, 0x02, 0x00, 0x00]).await;
}

#[tokio::test]
async fn client_sent_connack_v5() {
    disconnects_v5(&[0x20, 0x03, 0x00, 0x00, 0x00], 0x82).await;
}

#[tokio::test]
async fn client_sent_suback_v311() {
    closes_v311(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
}

#[tokio::test]
async fn client_sent_suback_v5() {
    disconnects_v5(&[0x90, 0x04, 0x00, 0x01, 0x00, 0x00], 0x82).await;
}

// --- Reserved flag bits --------------------------------------------------------------------

#[tokio::test]
async fn pingreq_with_reserved_flags_v311() {
    closes_v311(&[0xC1, 0x00]).await;
}

#[tokio::test]
async fn pingreq_with_reserved_flags_v5() {
    disconnects_v5(&[0xC1, 0x00], 0x81).await;
}

#[tokio::test]
async fn subscribe_with_flags_zero_v311() {
    let mut p = subscribe_pkt(false, 1, &[("a", 0)]);
    p[0] = 0x80;
    closes_v311(&p).await;
}

#[tokio::test]
async fn subscribe_with_flags_zero_v5() {
    let mut p = subscribe_pkt(true, 1, &[("a", 0)]);
    p[0] = 0x80;
    disconnects_v5(&p, 0x81).await;
}

// --- PUBLISH -------------------------------------------------------------------------------

#[tokio::test]
async fn publish_qos3_v311() {
    // 36 = PUBLISH with both QoS bits set.
    closes_v311(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]).await;
}

#[tokio::test]
async fn publish_qos3_v5() {
    disconnects_v5(&[0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00], 0x81).await;
}

#[tokio::test]
async fn publish_empty_topic_v311() {
    closes_v311(&[0x30, 0x02, 0x00, 0x00]).await;
}

#[tokio::test]
async fn publish_empty_topic_without_alias_v5() {
    disconnects_v5(&[0x30, 0x03, 0x00, 0x00, 0x00], 0x82).await;
}

#[tokio::test]
async fn publish_wildcard_in_topic_v311() {
    closes_v311(&publish("a/+", b"x", 0, 0)).await;
    closes_v311(&publish("a/#", b"x", 0, 0)).await;
}

#[tokio::test]
async fn publish_wildcard_in_topic_v5() {
    let p = publish_full(b"a/+", b"x", 0, 0, false, false, Some(&[]));
    // A wildcard in a topic name is a malformed topic: 0x81 (not 0x82 Protocol Error nor 0x90
    // Topic Name Invalid).
    disconnects_v5(&p, 0x81).await;
}

#[tokio::test]
async fn publish_invalid_utf8_topic_v311() {
    closes_v311(&publish_full(&[0xC3, 0x28], b"x", 0, 0, false, false, None)).await;
}

#[tokio::test]
async fn publish_invalid_utf8_topic_v5() {
    disconnects_v5(&publish_full(&[0xC3, 0x28], b"x", 0, 0, false, false, Some(&[])), 0x81).await;
}

#[tokio::test]
async fn publish_topic_with_nul_v311() {
    closes_v311(&publish_full(b"a\0b", b"x", 0, 0, false, false, None)).await;
}

#[tokio::test]
async fn publish_qos1_packet_id_zero_v311() {
    closes_v311(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00]).await;
}

#[tokio::test]
async fn publish_qos1_packet_id_zero_v5() {
    // Packet identifier 0: a Protocol Error, 0x82.
    disconnects_v5(&[0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x00, 0x00], 0x82).await;
}

#[tokio::test]
async fn publish_remaining_length_shorter_than_topic_v311() {
    // Topic length says 5 bytes, the packet holds 1.
    closes_v311(&[0x30, 0x03, 0x00, 0x05, b'a']).await;
}

/// 65,535 `/` characters: 65,536 levels, over limits.max_topic_levels (128).
fn slash_topic() -> Vec<u8> {
    vec![b'/'; 65_535]
}

#[tokio::test]
async fn publish_topic_of_65535_slashes_v311() {
    closes_v311(&publish_full(&slash_topic(), b"x", 0, 0, false, false, None)).await;
}

#[tokio::test]
async fn publish_topic_of_65535_slashes_v5() {
    disconnects_v5(&publish_full(&slash_topic(), b"x", 0, 0, false, false, Some(&[])), 0x90).await;
}

#[tokio::test]
async fn subscribe_filter_of_65535_slashes_does_not_crash() {
    let s = Scene::new().await;
    let mut bad = s.bad_v311().await;
    let filter = String::from_utf8(slash_topic()).expect("ascii");
    bad.send(&subscribe_pkt(false, 1, &[(&filter, 0)])).await;
    // Refused either with SUBACK 0x80 or by closing; never a crash.
    match bad.next_event(WAIT).await {
        Event::Packet(p) => assert_eq!(hex(&p), hex(&[0x90, 0x03, 0x00, 0x01, 0x80])),
        Event::Closed => {}
        Event::Timeout => panic!("no answer to an over-deep filter"),
    }
    s.still_fine().await;
}

// --- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------

#[tokio::test]
async fn subscribe_without_filters_v311() {
    closes_v311(&[0x82, 0x02, 0x00, 0x01]).await;
}

#[tokio::test]
async fn subscribe_without_filters_v5() {
    // A SUBSCRIBE without a topic filter is a Malformed Packet, 0x81.
    disconnects_v5(&[0x82, 0x03, 0x00, 0x01, 0x00], 0x81).await;
}

#[tokio::test]
async fn unsubscribe_without_filters_v311() {
    closes_v311(&[0xA2, 0x02, 0x00, 0x01]).await;
}

#[tokio::test]
async fn subscribe_hash_not_last_v311() {
    closes_v311(&subscribe_pkt(false, 1, &[("a/#/b", 0)])).await;
}

#[tokio::test]
async fn subscribe_packet_id_zero_v311() {
    closes_v311(&subscribe_pkt(false, 0, &[("a", 0)])).await;
}

#[tokio::test]
async fn subscribe_packet_id_zero_v5() {
    // Packet identifier 0: a Protocol Error, 0x82.
    disconnects_v5(&subscribe_pkt(true, 0, &[("a", 0)]), 0x82).await;
}

#[tokio::test]
async fn subscribe_requested_qos3_v311() {
    closes_v311(&subscribe_pkt(false, 1, &[("a", 3)])).await;
}

// --- v5 properties and sizes ---------------------------------------------------------------

#[tokio::test]
async fn v5_duplicated_property() {
    // PUBLISH QoS 0 "a" with two Payload Format Indicators.
    let mut p = Vec::new();
    p.extend(prop_u8(PROP_PAYLOAD_FORMAT, 1));
    p.extend(prop_u8(PROP_PAYLOAD_FORMAT, 1));
    let bytes = publish_full(b"a", b"", 0, 0, false, false, Some(&p));
    assert_eq!(hex(&bytes), hex(&[0x30, 0x08, 0x00, 0x01, b'a', 0x04, 0x01, 0x01, 0x01, 0x01]));
    let s = Scene::new().await;
    let mut bad = s.bad_v5().await;
    bad.send(&bytes).await;
    bad.expect(&[0xE0, 0x01, 0x82]).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

#[tokio::test]
async fn v5_unknown_property() {
    // Property 0x7F does not exist.
    let bytes = publish_full(b"a", b"", 0, 0, false, false, Some(&[0x7F, 0x00]));
    disconnects_v5(&bytes, 0x81).await;
}

#[tokio::test]
async fn v5_packet_over_max_packet_size() {
    let s = Scene::with(|c| c.limits.max_packet_size = 128).await;
    let mut bad = s.bad_v5().await;
    let bytes = publish_full(b"big", &[b'x'; 200], 0, 0, false, false, Some(&[]));
    bad.send_lossy(&bytes).await;
    bad.expect(&[0xE0, 0x01, 0x95]).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

#[tokio::test]
async fn v311_packet_over_max_packet_size() {
    let s = Scene::with(|c| c.limits.max_packet_size = 128).await;
    let mut bad = s.bad_v311().await;
    bad.send_lossy(&publish("big", &[b'x'; 200], 0, 0)).await;
    bad.expect_closed().await;
    s.still_fine().await;
}

#[tokio::test]
async fn garbage_bytes_do_not_hurt_others() {
    let s = Scene::new().await;
    let mut bad = Raw::open(s.b.addr).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    bad.send_lossy(&garbage).await;
    bad.expect_closed().await;
    s.still_fine().await;
}
