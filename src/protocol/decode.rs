//! Placeholder until the codec lands.
use super::packet::*;
use bytes::BytesMut;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocol { level: u8, name_is_mqtt: bool },
    #[error("invalid topic: {0}")]
    Topic(&'static str),
}

impl DecodeError {
    pub fn reason_code(&self) -> u8 {
        0x81
    }
}

pub fn decode(
    _buf: &mut BytesMut,
    _version: Option<ProtocolVersion>,
    _max: usize,
) -> Result<Option<Packet>, DecodeError> {
    Err(DecodeError::Malformed("codec not written"))
}
