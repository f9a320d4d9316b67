//! The seam through which a cluster decides which node may serve a client id: a hook the
//! handshake asks before it attaches a session, and tells when that connection is over.
//!
//! Owns only the hook's shape and its place in the broker. Must not know how ownership is
//! kept (a JetStream bucket today, see `cluster::owners`): without a hook installed, a
//! client id is this node's alone and nothing here runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Broker;

/// Why a claim was refused: the CONNECT is answered with v5 0x88 Server unavailable
/// (3.1.1: 0x03), since a client must never be served by two nodes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many claims in progress on this node (`cluster.max_pending_claims`).
    Busy,
    /// Ownership could not be read or written (the cluster's store is unreachable or slow).
    Unavailable,
    /// Another node claimed the id at the same time, again and again, or took it over while
    /// this claim was in progress.
    Lost,
}

/// A boxed claim, so that the hook is object safe.
pub type Claim<'a> = Pin<Box<dyn Future<Output = Result<u64, Refused>> + Send + 'a>>;

/// Cluster-wide ownership of client ids, installed once in the broker (`install_owners`).
pub trait ClusterOwners: Send + Sync {
    /// Makes this node the owner of `client_id` for a new connection, taking the id over
    /// from another node if needed (that node's connection has stopped delivering when this
    /// returns). Ok carries the claim's nonce, never 0, for `holds` and `released`.
    fn claim<'a>(&'a self, client_id: &'a str) -> Claim<'a>;

    /// Whether the claim `nonce` still stands: false once another node has asked for the id
    /// since (the connection must then close with 0x8E). Asked after the session is attached.
    fn holds(&self, client_id: &str, nonce: u64) -> bool;

    /// The connection that claimed with `nonce` is over (its session detached).
    fn released(&self, client_id: &str, nonce: u64);
}

impl Broker {
    /// Installs the cluster's ownership hook; false when one was installed already (the
    /// first stays).
    pub fn install_owners(&self, owners: Arc<dyn ClusterOwners>) -> bool {
        self.owners.set(owners).is_ok()
    }

    /// The ownership hook, when this node is part of a cluster.
    pub fn owners(&self) -> Option<&Arc<dyn ClusterOwners>> {
        self.owners.get()
    }

    /// Tells the connection serving `client_id`, if any, to close with `reason`. False when
    /// no connection serves it.
    pub fn kick_client(&self, client_id: &str, reason: u8) -> bool {
        let Some(handle) = self.sessions.get(client_id).map(|e| Arc::clone(e.value())) else {
            return false;
        };
        let control = handle.lock().control.clone();
        match control {
            Some(c) => {
                c.kick(reason);
                true
            }
            None => false,
        }
    }
}
