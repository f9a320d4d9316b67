//! FUZZING ONLY, not API: thin entry points into crate-private code for the targets in
//! `fuzz/` (compiled only with `--cfg fuzzing`, which `cargo fuzz` sets). Each function
//! panics when an invariant it checks does not hold; libFuzzer reports the panic as a crash.
//!
//! The stateful target (`fuzz/fuzz_targets/connection.rs`) needs nothing from here: it drives
//! a broker through the public API (`start_with`, `BrokerHandle::serve`).

use bytes::BytesMut;

use crate::protocol::{self, topic, Packet, ProtocolVersion};

/// The largest packet the decoder targets accept (the default `limits.max_packet_size`).
pub const MAX_PACKET: usize = 1 << 20;

/// Decodes `data` as a stream of packets at protocol level `level` (3 = MQTT 3.1,
/// 4 = 3.1.1, 5 = 5.0; anything else = before CONNECT, where only a CONNECT may come), until
/// the first error or incomplete packet. Returns how many packets were decoded.
///
/// Checks: "need more bytes" consumes nothing; a decoded packet consumes at least its
/// fixed header; every decoded packet, encoded again at its level, decodes to a packet that
/// encodes to the same bytes (encode . decode is stable on the encoder's own output).
pub fn decode(level: u8, data: &[u8]) -> usize {
    let mut version = match level {
        3 => Some(ProtocolVersion::V31),
        4 => Some(ProtocolVersion::V311),
        5 => Some(ProtocolVersion::V5),
        _ => None,
    };
    let mut buf = BytesMut::from(data);
    let mut count = 0;
    loop {
        let before = buf.len();
        match protocol::decode(&mut buf, version, MAX_PACKET) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return count;
            }
            Err(e) => {
                // Every error maps to a reason code; computing it must not panic.
                let _ = e.reason_code();
                return count;
            }
            Ok(Some(packet)) => {
                assert!(before - buf.len() >= 2, "packet decoded from fewer than 2 bytes");
                count += 1;
                if let Packet::Connect(c) = &packet {
                    // The rest of the stream is read at the level the CONNECT asked for.
                    version.get_or_insert(c.protocol);
                }
                if let Some(v) = version {
                    roundtrip(&packet, v);
                }
            }
        }
    }
}

/// Encodes `packet` at `v`, decodes it again and checks that the result encodes to the same
/// bytes. Skips what the encoder does not write at `v` (AUTH before 5.0).
fn roundtrip(packet: &Packet, v: ProtocolVersion) {
    // A CONNECT is written at its own level and read as the first packet of a connection.
    let (enc_v, dec_v) = match packet {
        Packet::Connect(c) => (c.protocol, None),
        _ => (v, Some(v)),
    };
    let mut first = BytesMut::new();
    protocol::encode(packet, enc_v, &mut first);
    if first.is_empty() {
        return;
    }
    let mut buf = first.clone();
    let again = match protocol::decode(&mut buf, dec_v, usize::MAX) {
        Ok(Some(p)) => p,
        other => panic!("re-decoding our own encoding failed: {other:?}\npacket: {packet:?}\nbytes: {first:02x?}"),
    };
    assert!(buf.is_empty(), "re-decoding left {} bytes\npacket: {packet:?}", buf.len());
    let mut second = BytesMut::new();
    protocol::encode(&again, enc_v, &mut second);
    assert_eq!(first, second, "encode(decode(encode(p))) differs\npacket: {packet:?}\nagain: {again:?}");
}

/// Topic name and filter validation and the `$share` split, on any string.
///
/// Checks: a valid name is a valid filter; a shared filter that splits has a valid filter
/// part and a non-empty group without wildcards, and is recognised as shared.
pub fn topic(s: &str) {
    let name = topic::valid_topic_name(s);
    let filter = topic::valid_topic_filter(s);
    if name {
        assert!(filter, "valid topic name {s:?} is not a valid filter");
    }
    if let Some((group, f)) = topic::parse_shared(s) {
        assert!(topic::is_shared(s));
        assert!(!group.is_empty() && !group.contains(['+', '#', '/']), "group {group:?}");
        assert!(topic::valid_topic_filter(f), "filter part {f:?}");
        assert_eq!(format!("$share/{group}/{f}"), s);
    }
}

/// The config loader on any text: `Config::from_toml` must return, never panic; a config it
/// accepts must pass `validate` again.
pub fn config(text: &str) {
    if let Ok(cfg) = crate::Config::from_toml(text, "fuzz input") {
        assert!(cfg.validate("fuzz input again").is_ok(), "accepted config fails validate");
    }
}
