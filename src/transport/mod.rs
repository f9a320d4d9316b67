//! Byte streams under MQTT: the socket options and OS set-up that listening and accepting
//! need. TLS and WebSocket streams will live here too.
//!
//! Owns nothing MQTT: no packets, no sessions. The only module allowed `unsafe`, for
//! the few socket and descriptor calls std does not offer; each block says why it is sound.

pub mod tcp;
