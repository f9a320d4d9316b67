//! Who a client is (`Principal`) and what it may do (`Policy`): the one place the broker asks
//! "may this client log in / publish here / subscribe to this / receive that". Connections ask
//! it at CONNECT, for the will, for every PUBLISH and SUBSCRIBE filter, and for every message
//! they are about to write, so a right revoked by a reload also stops retained, queued and
//! stored-subscription deliveries (mosquitto CVE-2018-12546, CVE-2021-34434).
//!
//! `FilePolicy` is the default: mosquitto's password and ACL files, read again on SIGHUP.
//! Owns the loaded rules and the bound on concurrent password hashing. Knows nothing of
//! sockets, sessions or packets.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytestring::ByteString;

use super::acl::Acl;
use super::password::PasswordFile;
use super::AuthFileError;
use crate::config::Config;

/// A connected client as authorisation sees it, fixed at CONNECT.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client_id: ByteString,
    /// CONNECT's User Name, the certificate's CN (`use_identity_as_username`), or the name
    /// an enhanced-authentication method proved.
    pub username: Option<ByteString>,
    /// Subject CN of the verified client certificate, if any.
    pub cert_identity: Option<Arc<str>>,
    /// Position of the listener in the configuration.
    pub listener: usize,
}

/// What a client presented at CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The user name is the CN of a client certificate the TLS handshake verified
    /// (`use_identity_as_username`): it is proven, no password is checked.
    pub certified: bool,
    pub listener: usize,
}

/// Why a login is refused; the connection turns it into the CONNACK code of the client's
/// protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password (v5 0x86; 3.1.1 0x05, as mosquitto answers).
    BadCredentials,
    /// Not allowed to connect at all, e.g. anonymous (v5 0x87; 3.1.1 0x05).
    NotAuthorized,
}

/// The answer to a login, computed without holding up the connection's worker thread.
pub type Verdict<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// Authentication and authorisation. The `may_*` checks run on hot paths (every PUBLISH,
/// every delivery) and must be quick and never block; `authenticate` may take its time.
pub trait Policy: Send + Sync {
    fn authenticate<'a>(&'a self, login: Login<'a>) -> Verdict<'a>;
    /// May `who` publish to `topic` (a topic name, also a will's)? `$SYS` is refused before
    /// the policy is asked.
    fn may_publish(&self, who: &Principal, topic: &str) -> bool;
    /// May `who` subscribe to `filter` (without any `$share/group/` prefix)?
    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool;
    /// May a message on `topic` be written to `who` now?
    fn may_receive(&self, who: &Principal, topic: &str) -> bool;
    /// Reads the policy's sources again (blocking: called off the async workers, on SIGHUP).
    /// On failure the previous rules stay in force.
    fn reload(&self) -> Result<(), String> {
        Ok(())
    }
}

/// mosquitto's `password_file`, `acl_file` and `allow_anonymous`.
pub struct FilePolicy {
    allow_anonymous: bool,
    password_path: Option<PathBuf>,
    acl_path: Option<PathBuf>,
    /// Shared with the SCRAM method, which must see the same users.
    passwords: Arc<ArcSwapOption<PasswordFile>>,
    acl: ArcSwapOption<Acl>,
    /// Whether `acl` holds rules: without an ACL file (the usual case) the per-delivery
    /// `may_receive` answers from this plain load instead of an `ArcSwap` load (~75
    /// instructions per delivery in a fan-out profile).
    has_acl: AtomicBool,
    /// Password hashing is slow and memory-hungry on purpose; a CONNECT flood queues here.
    checks: tokio::sync::Semaphore,
}

impl FilePolicy {
    /// Reads the files named by `config.auth` (blocking).
    pub fn load(config: &Config) -> Result<FilePolicy, AuthFileError> {
        let policy = FilePolicy {
            allow_anonymous: config.anonymous_allowed(),
            password_path: config.auth.password_file.clone(),
            acl_path: config.auth.acl_file.clone(),
            passwords: Arc::new(ArcSwapOption::empty()),
            acl: ArcSwapOption::empty(),
            has_acl: AtomicBool::new(false),
            checks: tokio::sync::Semaphore::new(config.auth.max_concurrent_password_checks),
        };
        policy.read_files()?;
        Ok(policy)
    }

    /// The password file as currently loaded, for methods that need the same users (SCRAM).
    pub fn passwords(&self) -> Arc<ArcSwapOption<PasswordFile>> {
        Arc::clone(&self.passwords)
    }

    /// Both files are read before either is swapped in: a reload is all or nothing.
    fn read_files(&self) -> Result<(), AuthFileError> {
        let passwords = self.password_path.as_deref().map(PasswordFile::load).transpose()?;
        let acl = self.acl_path.as_deref().map(Acl::load).transpose()?;
        self.passwords.store(passwords.map(Arc::new));
        // A delivery racing a reload sees the old rules or the new ones, as before.
        self.has_acl.store(acl.is_some(), Ordering::Release);
        self.acl.store(acl.map(Arc::new));
        Ok(())
    }

    fn anonymous(&self) -> Result<(), Refusal> {
        if self.allow_anonymous {
            Ok(())
        } else {
            Err(Refusal::NotAuthorized)
        }
    }
}

impl Policy for FilePolicy {
    fn authenticate<'a>(&'a self, login: Login<'a>) -> Verdict<'a> {
        Box::pin(async move {
            if login.certified {
                return Ok(());
            }
            let Some(user) = login.username else { return self.anonymous() };
            // Without a password file a user name proves nothing: such a client is as
            // anonymous as one without a name (mosquitto's rule).
            let Some(file) = self.passwords.load_full() else { return self.anonymous() };
            let _turn = self.checks.acquire().await.map_err(|_| Refusal::NotAuthorized)?;
            let user = user.to_owned();
            let password = login.password.unwrap_or_default().to_vec();
            let ok = tokio::task::spawn_blocking(move || file.verify(&user, &password)).await.unwrap_or(false);
            if ok {
                Ok(())
            } else {
                Err(Refusal::BadCredentials)
            }
        })
    }

    fn may_publish(&self, who: &Principal, topic: &str) -> bool {
        match &*self.acl.load() {
            None => true,
            Some(acl) => acl.may_publish(who.username.as_deref(), &who.client_id, topic),
        }
    }

    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        match &*self.acl.load() {
            None => true,
            Some(acl) => acl.may_subscribe(who.username.as_deref(), &who.client_id, filter),
        }
    }

    fn may_receive(&self, who: &Principal, topic: &str) -> bool {
        if !self.has_acl.load(Ordering::Acquire) {
            return true;
        }
        match &*self.acl.load() {
            None => true,
            Some(acl) => acl.may_receive(who.username.as_deref(), &who.client_id, topic),
        }
    }

    fn reload(&self) -> Result<(), String> {
        self.read_files().map_err(|e| e.to_string())
    }
}

/// Whether `topic` is in the broker's own `$SYS` tree, which no client may publish to.
pub fn is_sys_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}
