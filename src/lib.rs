//! tern: an MQTT 3.1, 3.1.1 and 5.0 broker.
//!
//! Layers (a module uses only those below it): `protocol`, `config`, `message` (L0);
//! `session`, `topics`, `store` (L1); `broker`, `transport` (L2); `connection` (L3); `server` (L4).
//! Tests start a broker in-process with [`start`] on port 0.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod message;
pub mod protocol;
pub mod server;
pub mod session;
pub mod store;
pub mod topics;
pub mod transport;

pub use config::Config;
pub use server::{start, start_with, BrokerHandle, Extensions, StartError};
