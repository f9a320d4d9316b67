use super::packet::*;
use bytes::BytesMut;
pub fn encode(_p: &Packet, _v: ProtocolVersion, _buf: &mut BytesMut) {}
pub fn encoded_len(_p: &Packet, _v: ProtocolVersion) -> usize {
    0
}
