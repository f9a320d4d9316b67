//! Authentication and authorisation: the policy every entry point asks (`policy`), the
//! password and ACL files behind the default one (`password`, `acl`), and the MQTT 5
//! enhanced-authentication interface (section 4.12), through which an authentication method
//! (SCRAM, `scram`; Kerberos, a token check...) takes part in CONNECT and in later
//! re-authentication, exchanging AUTH packets with the client.
//!
//! Owns the contract between connections and methods: which method a client named, and what
//! to send next. Knows nothing of sockets or sessions; a method sees only the client id, the
//! user name and the opaque Authentication Data; files are pure checks over loaded data.

pub mod acl;
pub mod password;
pub mod policy;
pub mod scram;

pub use policy::{FilePolicy, Login, Policy, Principal, Refusal};

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

/// A password or ACL file that cannot be used. Loading never yields a partial result: a file
/// with one bad line is refused whole, so a typo can never turn into an extra user or right.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A line is malformed; `line` counts from 1, `origin` is the file's path (or a test's name).
    #[error("{origin}:{line}: {message}")]
    Line { origin: String, line: usize, message: String },
}

/// What a method wants done after looking at the client's latest data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH with reason 0x18 (Continue authentication) and this data; the client answers
    /// with another AUTH.
    Continue(Option<Bytes>),
    /// Authenticated: CONNACK (or AUTH 0x00 on re-authentication) carries this data.
    Success(Option<Bytes>),
    /// Refused with this reason code, e.g. 0x87 Not authorized or 0x86 Bad user name or
    /// password.
    Fail(u8),
}

/// One exchange in progress, for one connection.
pub trait AuthExchange: Send {
    /// The client's next Authentication Data.
    fn next(&mut self, data: Option<&[u8]>) -> AuthStep;
    /// After `Success`: the user name the method authenticated (SCRAM's `n=`), which becomes
    /// the connection's user name for authorisation. None keeps CONNECT's user name.
    fn identity(&self) -> Option<String> {
        None
    }
}

/// An authentication method clients can name in CONNECT's Authentication Method property.
pub trait AuthMethod: Send + Sync {
    /// The name clients use, e.g. "SCRAM-SHA-256".
    fn name(&self) -> &str;
    /// Begins an exchange with the data of CONNECT (or of an AUTH 0x19 re-authentication).
    fn start(&self, client_id: &str, username: Option<&str>, data: Option<&[u8]>) -> (Box<dyn AuthExchange>, AuthStep);
}

/// The methods a broker offers. Empty by default: a CONNECT naming a method then gets
/// CONNACK 0x8C (Bad authentication method).
#[derive(Default, Clone)]
pub struct Authenticator {
    methods: Vec<Arc<dyn AuthMethod>>,
}

impl Authenticator {
    pub fn new(methods: Vec<Arc<dyn AuthMethod>>) -> Self {
        Authenticator { methods }
    }

    pub fn find(&self, name: &str) -> Option<Arc<dyn AuthMethod>> {
        self.methods.iter().find(|m| m.name() == name).cloned()
    }
}
