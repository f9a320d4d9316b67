//! Framing: splitting one packet off the front of the connection's read buffer, checking its
//! fixed header and size, and handing the body to the per-packet decoders in `decode_body`.
//!
//! Owns: `DecodeError` and its mapping to reason codes, the fixed-header rules (packet type,
//! flag bits, remaining length) and the maximum-packet-size check.

use super::decode_body as body;
use super::packet::*;
use super::reader::Reader;
use bytes::{Buf, BytesMut};

/// Why a packet could not be decoded. Every variant maps to the reason code a v5 server sends
/// (in DISCONNECT, or in CONNACK for a CONNECT); for 3.1/3.1.1 any error closes the connection.
///
/// The 0x81/0x82 split follows the mosquitto conformance vectors wherever the specification
/// leaves the choice open or the vectors deliberately differ; each such place is commented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a valid packet: reason code 0x81 (Malformed Packet).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but breaks a protocol rule: reason code 0x82 (Protocol Error).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The packet is larger than the maximum packet size: reason code 0x95 (Packet Too Large).
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: usize },
    /// CONNECT with a protocol level (or name/level pair) this server does not speak: the
    /// server answers CONNACK 0x84 (Unsupported Protocol Version) to a client asking for level
    /// 5, and the 3.1.1 return code 0x01 (unacceptable protocol version) to anything else, as
    /// mosquitto does (vectors "proto ver 2" / "proto ver 6").
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocol { level: u8, name_is_mqtt: bool },
    /// A topic name (PUBLISH, will topic) or topic filter (SUBSCRIBE, UNSUBSCRIBE) that is not
    /// valid: reason code 0x81. The specification has 0x90/0x8F for some of these cases, but the
    /// vectors ("topic with +", "topic 0", "single topic len 0") all want 0x81.
    #[error("invalid topic: {0}")]
    Topic(&'static str),
}

impl DecodeError {
    /// The reason code a server reports for this error (see the variants).
    pub fn reason_code(&self) -> u8 {
        use super::reason;
        match self {
            DecodeError::Malformed(_) | DecodeError::Topic(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol { level: 5, .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::UnsupportedProtocol { .. } => reason::v3::UNACCEPTABLE_PROTOCOL_VERSION,
        }
    }
}

/// Decodes one packet from the front of `buf`. `Ok(None)` = need more bytes (consumes
/// nothing). On `Ok(Some)` the packet's bytes are removed from `buf`; its strings and payload
/// are zero-copy slices of them.
///
/// `version`: `None` before CONNECT, when only a CONNECT may be decoded; `Some(v)` afterwards,
/// when every packet type of `v` is decoded in both directions (a CONNECT too: rejecting a
/// second one is the caller's business).
///
/// `max_packet_size` bounds the total packet size (fixed header included) and is checked as
/// soon as the remaining length is known, before any of the body has to arrive.
///
/// The fixed header's first byte is checked as soon as it arrives, so garbage is rejected
/// without waiting for a length.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 4;
    let flags = first & 0x0F;
    check_first_byte(kind, flags, version)?;

    let mut remaining: usize = 0;
    let mut header_len = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            if b == 0 && header_len > 2 {
                return Err(DecodeError::Malformed("remaining length not minimally encoded"));
            }
            break;
        }
        if header_len == 5 {
            return Err(DecodeError::Malformed("remaining length longer than 4 bytes"));
        }
    }
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::TooLarge { size, max: max_packet_size });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut bytes = buf.split_to(size).freeze();
    bytes.advance(header_len);
    let r = Reader::new(bytes);
    let packet = match (kind, version) {
        (1, _) => body::connect(r, flags)?,
        (_, Some(v)) => decode_after_connect(kind, flags, r, v)?,
        // check_first_byte lets nothing but CONNECT through before the version is known.
        (_, None) => return Err(DecodeError::Protocol("first packet must be CONNECT")),
    };
    Ok(Some(packet))
}

/// The packet id of a bare PUBACK at the front of `buf` (fixed header `40 02`, a non-zero
/// id, no reason code or properties): how nearly every QoS 1 delivery is acknowledged, in
/// 3.1.1 and 5.0 alike. Read without building a `Packet` (v5 properties inline make it
/// several hundred bytes): `decode` spent ~750 instructions on each such PUBACK, moving and
/// dropping it. Anything else, a malformed one included, is left to `decode`.
pub fn bare_puback(buf: &[u8]) -> Option<u16> {
    match *buf {
        [0x40, 0x02, hi, lo, ..] if (hi, lo) != (0, 0) => Some(u16::from_be_bytes([hi, lo])),
        _ => None,
    }
}

fn decode_after_connect(kind: u8, flags: u8, r: Reader, v: ProtocolVersion) -> Result<Packet, DecodeError> {
    Ok(match kind {
        2 => Packet::ConnAck(body::connack(r, v)?),
        3 => Packet::Publish(body::publish(r, flags, v)?),
        4 => Packet::PubAck(body::pub_resp(r, v, body::PUBACK_CODES)?),
        5 => Packet::PubRec(body::pub_resp(r, v, body::PUBACK_CODES)?),
        6 => Packet::PubRel(body::pub_resp(r, v, body::PUBREL_CODES)?),
        7 => Packet::PubComp(body::pub_resp(r, v, body::PUBREL_CODES)?),
        8 => Packet::Subscribe(body::subscribe(r, v)?),
        9 => Packet::SubAck(body::suback(r, v)?),
        10 => Packet::Unsubscribe(body::unsubscribe(r, v)?),
        11 => Packet::UnsubAck(body::unsuback(r, v)?),
        12 => {
            r.expect_end()?;
            Packet::PingReq
        }
        13 => {
            r.expect_end()?;
            Packet::PingResp
        }
        14 => Packet::Disconnect(body::disconnect(r, v)?),
        15 => Packet::Auth(body::auth(r)?),
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    })
}

/// Packet type and flag checks that need only the first byte.
fn check_first_byte(kind: u8, flags: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let Some(v) = version else {
        // [MQTT-3.1.0-1]. CONNECT's own flags are checked once its level is known, because
        // MQTT 3.1 did not require them to be 0 (mosquitto accepts `14 ..` from MQIsdp).
        return match kind {
            1 => Ok(()),
            _ => Err(DecodeError::Protocol("first packet must be CONNECT")),
        };
    };
    match kind {
        // 2.1.2 only says "Forbidden"; mosquitto answers 0x82 (vectors FORBIDDEN "00").
        0 => return Err(DecodeError::Protocol("reserved packet type 0")),
        15 if !v.is_v5() => return Err(DecodeError::Malformed("reserved packet type 15")),
        1 | 3 => return Ok(()),
        _ => {}
    }
    // MQTT 3.1 let clients set DUP/QoS bits on these packets (e.g. DUP on a resent PUBREL);
    // mosquitto accepts them, and so do we. 3.1.1 and 5.0 fix them (2.1.3 / 2.2.2).
    if v == ProtocolVersion::V31 {
        return Ok(());
    }
    let expected = match kind {
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProtocolVersion::*;

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn run(v: Option<ProtocolVersion>, h: &str) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(&hex(h)[..]), v, 1 << 20)
    }

    #[test]
    fn huge_first_packet_is_too_large_at_once() {
        let mut buf = BytesMut::from(&hex("10 FF FF FF 7F")[..]);
        let err = decode(&mut buf, None, 1 << 20).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { size: 5 + 268_435_455, max: 1 << 20 });
        assert_eq!(err.reason_code(), 0x95);
        assert_eq!(buf.len(), 5, "nothing consumed");
    }

    #[test]
    fn remaining_length_encoding() {
        for h in ["C0 80 00", "C0 FF 00", "C0 80 80 00", "C0 80 80 80 00"] {
            assert_eq!(
                run(Some(V311), h),
                Err(DecodeError::Malformed("remaining length not minimally encoded")),
                "{h}"
            );
        }
        assert_eq!(run(Some(V5), "10 FF FF FF FF 7F").unwrap_err().reason_code(), 0x81);
        assert_eq!(run(None, "10 FF FF FF FF 7F").unwrap_err().reason_code(), 0x81);
        // the largest remaining length still waits for its body when the limit allows it
        assert_eq!(decode(&mut BytesMut::from(&hex("30 FF FF FF 7F")[..]), Some(V5), usize::MAX), Ok(None));
        assert_eq!(run(Some(V311), "C0 80"), Ok(None));
    }

    #[test]
    fn max_packet_size_counts_the_fixed_header() {
        let pkt = hex("C0 00");
        assert_eq!(decode(&mut BytesMut::from(&pkt[..]), Some(V5), 2), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut BytesMut::from(&pkt[..]), Some(V5), 1), Err(DecodeError::TooLarge { size: 2, max: 1 }));
    }

    #[test]
    fn first_packet_must_be_connect() {
        for h in ["00 00", "20 02 00 00", "30 00", "82 00", "C0 00", "E0 00", "F0 00"] {
            assert_eq!(run(None, h), Err(DecodeError::Protocol("first packet must be CONNECT")), "{h}");
            // even with only the first byte buffered
            assert!(run(None, &h[..2]).is_err());
        }
    }

    #[test]
    fn reserved_types() {
        assert_eq!(run(Some(V5), "00 00").unwrap_err().reason_code(), 0x82);
        assert_eq!(run(Some(V311), "F0 00").unwrap_err().reason_code(), 0x81);
        assert_eq!(run(Some(V31), "F0 00").unwrap_err().reason_code(), 0x81);
        assert_eq!(run(Some(V5), "F0 00"), Ok(Some(Packet::Auth(Auth::default()))));
    }

    #[test]
    fn fixed_header_flags() {
        for v in [V311, V5] {
            for h in [
                "C1 00",
                "C2 00",
                "C4 00",
                "C8 00",
                "D1 00",
                "E1 00",
                "E8 00",
                "41 02 00 01",
                "60 02 00 01",
                "63 02 00 01",
                "6A 02 00 01",
                "80 06 12 34 00 01 70 00",
                "83 06 12 34 00 01 70 00",
                "A0 05 12 34 00 01 70",
                "A3 05 12 34 00 01 70",
                "21 02 00 00",
                "91 03 00 01 00",
                "B1 02 00 01",
            ] {
                assert_eq!(run(Some(v), h), Err(DecodeError::Malformed("invalid fixed header flags")), "{v:?} {h}");
            }
        }
        assert!(run(Some(V5), "F1 00").is_err());
        // MQTT 3.1 tolerates them
        assert_eq!(run(Some(V31), "6A 02 00 01"), Ok(Some(Packet::PubRel(PubResp::new(1)))));
        assert_eq!(run(Some(V31), "C1 00"), Ok(Some(Packet::PingReq)));
    }

    #[test]
    fn ping_and_lengths() {
        assert_eq!(run(Some(V5), "C0 00"), Ok(Some(Packet::PingReq)));
        assert_eq!(run(Some(V311), "D0 00"), Ok(Some(Packet::PingResp)));
        assert_eq!(run(Some(V5), "C0 01 00").unwrap_err().reason_code(), 0x81);
        assert_eq!(run(Some(V311), "D0 01 00").unwrap_err().reason_code(), 0x81);
    }

    #[test]
    fn consumes_exactly_one_packet() {
        let mut buf = BytesMut::from(&hex("C0 00 D0 00 E0")[..]);
        assert_eq!(decode(&mut buf, Some(V311), 100), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut buf, Some(V311), 100), Ok(Some(Packet::PingResp)));
        assert_eq!(decode(&mut buf, Some(V311), 100), Ok(None));
        assert_eq!(&buf[..], &[0xE0]);
    }

    #[test]
    fn reason_codes() {
        assert_eq!(DecodeError::Malformed("x").reason_code(), 0x81);
        assert_eq!(DecodeError::Topic("x").reason_code(), 0x81);
        assert_eq!(DecodeError::Protocol("x").reason_code(), 0x82);
        assert_eq!(DecodeError::UnsupportedProtocol { level: 6, name_is_mqtt: true }.reason_code(), 0x01);
        assert_eq!(DecodeError::UnsupportedProtocol { level: 5, name_is_mqtt: false }.reason_code(), 0x84);
    }
}
