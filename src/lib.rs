//! tern: an MQTT 3.1, 3.1.1 and 5.0 broker.
//!
//! Layers (a module uses only those below it): `protocol`, `config`, `message` (L0);
//! `session`, `topics`, `store` (L1); `broker`, `link`, `transport` (L2); `connection`, `bridge`, `cluster`, `sys` (L3);
//! `server` (L4). Tests start a broker in-process with [`start`] on port 0; a program that
//! embeds tern publishes and subscribes in-process with [`BrokerHandle::connect_local`].
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

// The public API: starting a broker (`start*`, `BrokerHandle`, `Extensions`), its
// configuration, the authentication and authorisation seams, the store backend seam, and the
// transport set-up the binary needs. Everything else is crate-private, so the compiler
// reports what nothing uses.
pub mod auth;
pub mod config;
pub mod server;
pub mod store;
pub mod transport;

pub(crate) mod bridge;
pub(crate) mod broker;
pub(crate) mod cluster;
pub(crate) mod connection;
pub(crate) mod link;
pub(crate) mod message;
pub(crate) mod protocol;
pub(crate) mod session;
pub(crate) mod sys;
pub(crate) mod topics;

// Entry points for the fuzz targets in fuzz/ only (`cargo fuzz` sets `--cfg fuzzing`); not API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

pub use broker::RecoverySummary;
// The cluster's ownership seam, for the cluster's tests.
#[doc(hidden)]
pub use broker::{ClusterOwners, Refused};
#[doc(hidden)]
pub use cluster::owners::{Owner, Owners, OwnersError};
pub use config::Config;
pub use link::local::{LocalClient, LocalError, LocalOptions, Received};
pub use protocol::QoS;
pub use server::{start, start_with, BrokerHandle, Extensions, StartError};
