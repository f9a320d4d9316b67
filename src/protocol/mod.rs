//! The MQTT wire format: packets of 3.1, 3.1.1 and 5.0, their strict decoding and encoding,
//! topic name and filter validation, and reason codes.
//!
//! Owns: bytes <-> `Packet`. Knows nothing of sessions, sockets or the broker; holds no state
//! beyond the protocol level the caller passes in.

mod decode;
mod decode_body;
mod encode;
mod packet;
mod properties;
mod reader;
pub mod reason;
pub mod topic;

#[cfg(test)]
mod tests;

pub use decode::{bare_puback, decode, DecodeError};
pub use encode::{encode, encode_property_list, encoded_len, PublishOut};
pub use packet::*;
