//! Bounds-checked reading of MQTT data types from one packet's body.
//!
//! Owns: the primitive wire types (integers, variable byte integers, UTF-8 strings, binary data)
//! and the rule set for which UTF-8 strings are acceptable. Every read checks the remaining
//! length first, so no input can make decoding panic; strings and binary data are returned as
//! zero-copy slices of the packet buffer.

use super::decode::DecodeError;
use bytes::{Buf, Bytes};
use bytestring::ByteString;

/// Cursor over the body of exactly one packet (everything after the fixed header).
pub(crate) struct Reader {
    buf: Bytes,
}

/// Shorthand used by every read: the field runs past the end of the packet.
const SHORT: DecodeError = DecodeError::Malformed("packet shorter than its fields");

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Trailing bytes where the specification defines none make the packet malformed.
    pub(crate) fn expect_end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("unexpected bytes after the last field"))
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.buf.try_get_u8().map_err(|_| SHORT)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.buf.try_get_u16().map_err(|_| SHORT)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.buf.try_get_u32().map_err(|_| SHORT)
    }

    /// Packet identifiers are never 0 where one is required. mosquitto answers 0x82 for this
    /// (vectors "mid 0"); the specification (2.2.1) names no code.
    pub(crate) fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::Protocol("packet identifier 0")),
            id => Ok(id),
        }
    }

    /// Variable Byte Integer (1.5.5): at most 4 bytes, and, as for the remaining length, only
    /// the minimal encoding is accepted (the vectors reject `80 00` as a subscription id).
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(DecodeError::Malformed("variable byte integer not minimal"));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("variable byte integer longer than 4 bytes"))
    }

    /// Exactly `len` bytes, as a slice of the packet buffer.
    pub(crate) fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.buf.remaining() < len {
            return Err(SHORT);
        }
        Ok(self.buf.split_to(len))
    }

    /// Everything left (a PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data (1.5.6): two-byte length then bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// UTF-8 Encoded String (1.5.4), validated by [`valid_mqtt_utf8`].
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let raw = self.binary()?;
        if !valid_mqtt_utf8(&raw) {
            return Err(DecodeError::Malformed("invalid UTF-8 string"));
        }
        ByteString::try_from(raw).map_err(|_| DecodeError::Malformed("invalid UTF-8 string"))
    }
}

/// The strings MQTT accepts: well-formed UTF-8 (no surrogates or overlong forms, which std
/// rejects), no U+0000 (a MUST, 1.5.4), and, like mosquitto, none of the code points the
/// specification says SHOULD NOT appear and a receiver MAY treat as malformed: the control
/// characters U+0001..U+001F and U+007F..U+009F and the Unicode non-characters.
pub(crate) fn valid_mqtt_utf8(raw: &[u8]) -> bool {
    // Fast path: printable ASCII is by far the common case (topics, client ids).
    if raw.iter().all(|&b| (0x20..0x7F).contains(&b)) {
        return true;
    }
    match std::str::from_utf8(raw) {
        Ok(s) => s.chars().all(allowed_char),
        Err(_) => false,
    }
}

fn allowed_char(c: char) -> bool {
    let cp = u32::from(c);
    let control = cp <= 0x1F || (0x7F..=0x9F).contains(&cp);
    let non_character = (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE;
    !control && !non_character
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(b: &[u8]) -> Reader {
        Reader::new(Bytes::copy_from_slice(b))
    }

    #[test]
    fn varint_limits() {
        assert_eq!(reader(&[0x00]).varint(), Ok(0));
        assert_eq!(reader(&[0x7F]).varint(), Ok(127));
        assert_eq!(reader(&[0x80, 0x01]).varint(), Ok(128));
        assert_eq!(reader(&[0xFF, 0xFF, 0xFF, 0x7F]).varint(), Ok(268_435_455));
        assert!(reader(&[0x80, 0x00]).varint().is_err());
        assert!(reader(&[0x80, 0x80, 0x80, 0x80, 0x01]).varint().is_err());
        assert!(reader(&[0x80]).varint().is_err());
    }

    #[test]
    fn utf8_rules() {
        assert!(valid_mqtt_utf8(b"a/b c"));
        assert!(valid_mqtt_utf8("A\u{2A6D4}".as_bytes()));
        assert!(valid_mqtt_utf8("caf\u{e9}".as_bytes()));
        assert!(!valid_mqtt_utf8(b"a\0b"));
        assert!(!valid_mqtt_utf8(b"a\x01b"));
        assert!(!valid_mqtt_utf8(b"a\x1Fb"));
        assert!(!valid_mqtt_utf8(b"a\x7Fb"));
        assert!(!valid_mqtt_utf8(&[b'a', 0xC2, 0x9F]));
        assert!(!valid_mqtt_utf8(&[0xED, 0xA0, 0x80])); // U+D800
        assert!(!valid_mqtt_utf8(&[0xEF, 0xBF, 0xBF])); // U+FFFF
        assert!(!valid_mqtt_utf8(&[0xED, 0xBF, 0xBF])); // surrogate U+DFFF
        assert!(!valid_mqtt_utf8("\u{FDD0}".as_bytes()));
        assert!(!valid_mqtt_utf8(&[0xC0, 0xAF])); // overlong '/'
    }

    #[test]
    fn short_reads_fail() {
        let mut r = reader(&[0x00, 0x05, b'a']);
        assert!(r.string().is_err());
        assert!(reader(&[0x01]).u16().is_err());
        assert!(reader(&[0x01, 2, 3]).u32().is_err());
        assert_eq!(reader(&[0, 0]).packet_id(), Err(DecodeError::Protocol("packet identifier 0")));
    }
}
