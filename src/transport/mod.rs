//! Byte streams under MQTT: what each kind of listener does between `accept` and the first
//! MQTT byte (socket options, the TLS handshake, the WebSocket upgrade), and what it learnt
//! about the peer on the way (`ConnInfo`). A connection is served over any
//! `AsyncRead + AsyncWrite` stream.
//!
//! Owns nothing MQTT: no packets, no sessions. The only module allowed `unsafe`, for
//! the few socket and descriptor calls std does not offer; each block says why it is sound.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::ListenerKind;

pub mod os;
pub mod tcp;
pub mod tls;
pub mod tls_client;
pub mod ws;

/// What the listener knows about a connection before its first MQTT byte.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Position of the listener in the configuration (`listener[i]`).
    pub listener: usize,
    pub kind: ListenerKind,
    /// Subject CN of the client certificate the TLS handshake verified.
    pub cert_identity: Option<Arc<str>>,
}
