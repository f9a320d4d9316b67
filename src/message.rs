//! An application message as the broker holds it between one publisher and its subscribers.
//!
//! Owns nothing but data: one `Arc<Message>` is shared by every subscriber and queue it goes
//! to, and its payload is the `Bytes` slice decoded from the publisher's socket buffer.

use std::time::Instant;

use bytes::Bytes;
use bytestring::ByteString;

use crate::protocol::{Properties, QoS};

/// Payloads up to this size are copied out of the read buffer (see `Message::received`).
const OWNED_PAYLOAD: usize = 8 * 1024;
/// The message's own struct and allocations, counted with its bytes.
const HELD_OVERHEAD: usize = 128;

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    /// QoS the publisher sent it with; each subscriber gets min(this, granted).
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// Client id of the publisher, for No Local.
    pub origin: ByteString,
    /// When the message was received, for the Message Expiry Interval.
    pub received_at: Instant,
    /// Message Expiry Interval from the publisher, in seconds.
    pub expiry_interval: Option<u32>,
    /// The v5 properties forwarded to subscribers unchanged (payload format, content type,
    /// response topic, correlation data, user properties; never topic alias or subscription
    /// identifiers, which are per connection; message expiry is `expiry_interval`), encoded
    /// once for all subscribers and the store. Held only encoded: decoded, each property
    /// costs several times its size.
    pub props_v5: Bytes,
}

impl Message {
    /// A message as just received from `origin`: its Message Expiry Interval moves out of the
    /// properties (it is recomputed per delivery), and the rest is encoded once for v5
    /// subscribers.
    ///
    /// A small payload and the topic are copied out of the buffer they were decoded from: a
    /// slice would keep that whole read buffer (up to 64 KiB) alive for as long as the message
    /// waits in any queue. Larger payloads stay shared, where the buffer is mostly theirs.
    pub fn received(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
        origin: ByteString,
    ) -> Message {
        let expiry_interval = properties.message_expiry_interval.take();
        let props_v5 = crate::protocol::encode_property_list(&properties);
        let payload = if payload.len() <= OWNED_PAYLOAD { Bytes::copy_from_slice(&payload) } else { payload };
        Message {
            topic: ByteString::from(&*topic),
            payload,
            qos,
            retain,
            origin,
            received_at: Instant::now(),
            expiry_interval,
            props_v5,
        }
    }

    /// Memory the message holds while it waits in a queue, roughly: what queue limits count.
    pub fn held_bytes(&self) -> usize {
        self.payload.len() + self.topic.len() + self.props_v5.len() + HELD_OVERHEAD
    }

    /// True when the message's expiry interval has run out.
    pub fn is_expired(&self, now: Instant) -> bool {
        match self.expiry_interval {
            Some(secs) => now.duration_since(self.received_at).as_secs() >= u64::from(secs),
            None => false,
        }
    }

    /// Expiry interval left, to forward to a subscriber (v5 3.3.2.3.3).
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expiry_interval.map(|secs| {
            let waited = now.duration_since(self.received_at).as_secs();
            u32::try_from(u64::from(secs).saturating_sub(waited)).unwrap_or(0)
        })
    }
}
