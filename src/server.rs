//! Listeners and the life of the server: binds every configured listener, accepts
//! connections up to `limits.max_connections`, spawns one task per connection, and stops
//! them all on shutdown.
//!
//! Owns sockets until a connection task takes one, each TLS listener's certificates
//! (reloaded with the policy's files by `BrokerHandle::reload`) and each WebSocket listener's
//! upgrade rules. Start-up reads every file the configuration names before it opens the store
//! or binds a port, with the same code that `check` (`tern check-config`) runs. Knows nothing
//! of MQTT packets.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::auth::password::PasswordFile;
use crate::auth::{AuthFileError, AuthMethod, Authenticator, FilePolicy, Policy};
use crate::broker::{Broker, DurableWaiters, RecoverySummary};
use crate::config::{Config, ConfigError, ListenerKind};
use crate::store::{Backend, FjallBackend, LoadProgress, Store, StoreError};
use crate::transport::tls::{TlsAcceptor, TlsError};
use crate::transport::tls_client::TlsConnector;
use crate::transport::ws::WsAcceptor;
use crate::transport::ConnInfo;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {bind} (config key listener[{index}].bind): {source}")]
    Bind { bind: String, index: usize, source: io::Error },
    /// The HTTP listener of metrics.bind could not be bound.
    #[error("cannot listen on {bind} (config key metrics.bind): {source}")]
    MetricsBind { bind: String, source: io::Error },
    /// The store in storage.dir could not be opened or read.
    #[error("{0} (config key storage.dir)")]
    Store(#[from] StoreError),
    /// The configuration is not usable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The password file or the ACL file (config key `key`) could not be used.
    #[error("{source} (config key {key}); {}", auth_fix(key, source))]
    Auth { key: &'static str, source: AuthFileError },
    /// A TLS listener's or bridge's certificate, key or CA file could not be used.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// A start-up task run off the async workers failed (panicked or was cancelled).
    #[error("{what} task failed: {source}")]
    Task { what: &'static str, source: tokio::task::JoinError },
}

/// What to do about an unusable password or ACL file.
fn auth_fix(key: &str, e: &AuthFileError) -> &'static str {
    match (key, e) {
        ("auth.password_file", AuthFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            "create it with `tern passwd -c FILE USER`, or correct the path"
        }
        (_, AuthFileError::Io { .. }) => "check the path, and that the user tern runs as may read the file",
        ("auth.password_file", _) => {
            "correct or remove that line: `user:hash` lines as `tern passwd` or `mosquitto_passwd` write them"
        }
        _ => "correct that line: `user NAME`, `topic [read|write|readwrite|deny] FILTER` or `pattern [...] FILTER`",
    }
}

/// Which key names the file an `AuthFileError` is about.
fn auth_key(config: &Config, e: &AuthFileError) -> &'static str {
    let named = match e {
        AuthFileError::Io { path, .. } => config.auth.acl_file.as_ref() == Some(path),
        AuthFileError::Line { origin, .. } => {
            config.auth.acl_file.as_ref().is_some_and(|p| p.display().to_string() == *origin)
        }
    };
    if named {
        "auth.acl_file"
    } else {
        "auth.password_file"
    }
}

fn task_failed(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> StartError {
    move |source| StartError::Task { what, source }
}

/// A running broker. Dropping it does not stop it; call `shutdown`.
pub struct BrokerHandle {
    addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub(crate) broker: Arc<Broker>,
    /// Every TLS listener's certificates, for reload.
    tls: Vec<Arc<TlsAcceptor>>,
    /// Set once when the store becomes fatal.
    failed: watch::Receiver<Option<Arc<StoreError>>>,
    recovery: RecoverySummary,
    /// Where `/metrics` and the status page are served (`metrics.bind`).
    metrics_addr: Option<SocketAddr>,
}

impl BrokerHandle {
    /// Connects an in-process client: it publishes and subscribes without a socket, with the
    /// session, QoS, retained-message and ACL rules of a network client (see
    /// `examples/embedded.rs`).
    pub fn connect_local(&self, opts: crate::LocalOptions) -> Result<crate::LocalClient, crate::LocalError> {
        crate::LocalClient::connect(&self.broker, opts)
    }

    /// Makes this broker one node of a cluster's client id ownership (`cluster::owners`),
    /// over a NATS connection the caller made. For tests of ownership alone.
    #[doc(hidden)]
    pub async fn start_cluster_owners(
        &self,
        client: async_nats::Client,
        node: &str,
        name: &str,
        replicas: usize,
        max_pending_claims: usize,
    ) -> Result<Arc<crate::cluster::owners::Owners>, crate::cluster::owners::OwnersError> {
        let js = async_nats::jetstream::new(client.clone());
        crate::cluster::owners::Owners::start(client, js, node, name, replicas, max_pending_claims, &self.broker).await
    }

    /// Retained messages held (in memory or only indexed), but for the `$SYS` tree.
    pub fn retained_count(&self) -> usize {
        self.broker.app_retained_count()
    }

    /// Retained messages held whole in memory (the rest are read from the store on demand).
    pub fn retained_in_memory(&self) -> usize {
        self.broker.retained_in_memory()
    }

    /// Bytes of queued messages held in memory, as counted against `limits.max_queued_memory`
    /// (each queue's first 64 KiB is not counted).
    pub fn queued_memory(&self) -> usize {
        self.broker.queued_memory()
    }

    /// Sessions the broker holds, connected or not.
    pub fn session_count(&self) -> usize {
        self.broker.session_count()
    }

    /// Approximate bytes of store writes waiting for the disk; while over
    /// `storage.max_pending_bytes`, connections stop reading their clients.
    pub fn store_pending_bytes(&self) -> usize {
        self.broker.store_pending_bytes()
    }

    /// Acknowledgements all connections hold until the store has made their effects durable
    /// (each connection at most `limits.max_held_acks`).
    pub fn acks_held(&self) -> u64 {
        self.broker.metrics.acks_held.load(Ordering::Relaxed)
    }

    /// The error that made the store fatal, if it is: nothing is acknowledged as stored any
    /// more, and the broker should be shut down and restarted.
    pub fn store_failure(&self) -> Option<Arc<StoreError>> {
        self.failed.borrow().clone()
    }

    /// Resolves when the store becomes fatal (at once if it is), with the error. The binary
    /// awaits it beside the signals, shuts down and exits with status 74.
    pub async fn failed(&self) -> Arc<StoreError> {
        let mut rx = self.failed.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives in the store's hook list; gone only with the store.
                std::future::pending::<()>().await;
            }
        }
    }

    /// What recovery brought back from the store at start-up, and how long it took.
    pub fn recovery(&self) -> RecoverySummary {
        self.recovery
    }

    /// Address of the first listener (tests bind port 0 and ask).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Address of the HTTP listener serving `/metrics` and the status page, when
    /// `metrics.bind` is set (tests bind port 0 and ask).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reads the password file, the ACL file and every TLS listener's certificates again
    /// (SIGHUP). Each source that fails keeps what it had and its error is returned; connected
    /// clients keep their connections, and their rights are checked against the new rules
    /// from their next message on.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let policy = Arc::clone(&self.broker.policy);
        let tls = self.tls.clone();
        let errors = tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            if let Err(e) = policy.reload() {
                errors.push(e);
            }
            for t in &tls {
                if let Err(e) = t.reload() {
                    errors.push(e.to_string());
                }
            }
            errors
        })
        .await
        .unwrap_or_else(|e| vec![format!("reload task failed: {e}")]);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Serves one MQTT client over any byte stream the embedding program accepted itself
    /// (a Unix socket, a pipe, a tunnel), as if it had arrived on listener 0 from `peer`.
    /// The stream gets the same handshake, policy and limits as a network client; writes are
    /// flushed, so buffering streams work.
    pub fn serve<S>(&self, stream: S, peer: SocketAddr) -> JoinHandle<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let info = ConnInfo { peer, listener: 0, kind: ListenerKind::Tcp, cert_identity: None };
        tokio::spawn(crate::connection::serve(stream, info, Arc::clone(&self.broker), BytesMut::new(), ()))
    }

    /// Stops accepting, tells v5 clients the server is shutting down (0x8B), waits
    /// briefly for connections to close, then flushes and closes the store. Err when the
    /// final sync failed or the store had failed for good: not everything is on disk, and the
    /// binary exits non-zero.
    pub async fn shutdown(self) -> Result<(), Arc<StoreError>> {
        let _ = self.shutdown.send(true);
        self.broker.kick_all(crate::protocol::reason::SERVER_SHUTTING_DOWN);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let broker = self.broker;
        match tokio::task::spawn_blocking(move || broker.close_store()).await {
            Ok(r) => r,
            Err(e) => Err(Arc::new(StoreError::CommitThread(format!("store closing task failed: {e}")))),
        }
    }
}

/// Opens the store in `storage.dir`, recovers its state, binds the listeners and starts
/// serving. Returns once every listener is bound.
pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
    start_with(config, Extensions::default()).await
}

/// What an embedding program (or a test) may add to a broker beyond its configuration.
#[derive(Default)]
pub struct Extensions {
    /// Store backend; None = fjall in `storage.dir`.
    pub backend: Option<Box<dyn Backend>>,
    /// MQTT 5 enhanced authentication methods (SCRAM-SHA-256 is added when there is a
    /// password file and no method of that name is given).
    pub auth_methods: Vec<Arc<dyn AuthMethod>>,
    /// Authentication and authorisation; None = `FilePolicy` from `config.auth`.
    pub policy: Option<Arc<dyn Policy>>,
    /// Counts what recovery reads from the fjall store in `storage.dir` while `start` runs,
    /// for a caller that reports a long recovery (the binary tells systemd).
    pub recovery_progress: Option<Arc<LoadProgress>>,
}

/// Like `start`, with extensions.
pub async fn start_with(config: Config, ext: Extensions) -> Result<BrokerHandle, StartError> {
    config.validate("configuration passed to tern::start")?;
    let config = Arc::new(config);
    // Files before the store: a bad one stops start-up before the store is opened.
    let files = StartFiles::read(&config, ext.policy).await?;
    let mut methods = ext.auth_methods;
    if let Some(passwords) = files.passwords {
        if config.auth.password_file.is_some() && !methods.iter().any(|m| m.name() == "SCRAM-SHA-256") {
            methods.push(Arc::new(crate::auth::scram::ScramSha256::new(passwords)));
        }
    }
    let progress = ext.recovery_progress.unwrap_or_default();
    // Recovery's time includes opening the engine, which replays its journal.
    let started = Instant::now();
    let location = match ext.backend {
        Some(_) => "(backend given by the embedding program)".to_string(),
        None => config.storage.dir.display().to_string(),
    };
    let backend = match ext.backend {
        Some(b) => b,
        None => {
            let dir = config.storage.dir.clone();
            // Opening replays the engine's journal, which can take a while after a crash; say
            // so before the progress lines of reading start.
            info!(storage_dir = %dir.display(), "opening the store");
            let watched = Arc::clone(&progress);
            let b = tokio::task::spawn_blocking(move || FjallBackend::open(&dir).map(|b| b.with_progress(watched)))
                .await
                .map_err(task_failed("store opening"))??;
            Box::new(b)
        }
    };
    let store = StoreSource { backend, location, progress, started };
    run(config, files.acceptors, files.bridges, store, Authenticator::new(methods), files.policy).await
}

/// Like `start`, over any store backend (tests inject failing ones).
pub async fn start_with_backend(config: Arc<Config>, backend: Box<dyn Backend>) -> Result<BrokerHandle, StartError> {
    config.validate("configuration passed to tern::start")?;
    let files = StartFiles::read(&config, None).await?;
    let store = StoreSource {
        backend,
        location: "(backend given by the caller)".to_string(),
        progress: Arc::default(),
        started: Instant::now(),
    };
    run(config, files.acceptors, files.bridges, store, Authenticator::default(), files.policy).await
}

/// Checks what `start` checks before it opens the store or binds a port: the configuration's
/// values, and every file it names (the password and ACL files, each TLS listener's and
/// bridge's certificates and keys), read and parsed exactly as start-up reads them. Blocking.
/// `tern check-config` is this.
pub fn check(config: &Config, origin: &str) -> Result<(), StartError> {
    config.validate(origin)?;
    StartFiles::load(config, None).map(|_| ())
}

/// The files start-up reads besides the configuration, loaded before the store is opened.
struct StartFiles {
    /// The embedding program's policy, or the password and ACL files'.
    policy: Arc<dyn Policy>,
    /// The password file's users when `policy` is the files' (SCRAM must see the same).
    passwords: Option<Arc<ArcSwapOption<PasswordFile>>>,
    /// Every listener's TLS acceptor (None for plain TCP and WebSocket).
    acceptors: Vec<Option<Arc<TlsAcceptor>>>,
    /// Every bridge's TLS client configuration (None for plain TCP): a bad file stops the
    /// start instead of failing each connection attempt.
    bridges: Vec<Option<Arc<TlsConnector>>>,
}

impl StartFiles {
    /// `load`, off the async workers.
    async fn read(config: &Arc<Config>, given: Option<Arc<dyn Policy>>) -> Result<StartFiles, StartError> {
        let c = Arc::clone(config);
        tokio::task::spawn_blocking(move || StartFiles::load(&c, given)).await.map_err(task_failed("file loading"))?
    }

    /// Reads the password and ACL files (unless a policy is `given`), then every TLS
    /// listener's and bridge's certificates. Blocking.
    fn load(config: &Config, given: Option<Arc<dyn Policy>>) -> Result<StartFiles, StartError> {
        let (policy, passwords): (Arc<dyn Policy>, _) = match given {
            Some(p) => (p, None),
            None => {
                let files = FilePolicy::load(config)
                    .map_err(|source| StartError::Auth { key: auth_key(config, &source), source })?;
                let passwords = files.passwords();
                (Arc::new(files), Some(passwords))
            }
        };
        let mut acceptors = Vec::new();
        for (index, l) in config.listener.iter().enumerate() {
            acceptors.push(match (&l.tls, l.kind) {
                (Some(settings), kind) if kind.uses_tls() => Some(Arc::new(TlsAcceptor::new(settings, index)?)),
                _ => None,
            });
        }
        let mut bridges = Vec::new();
        for (index, b) in config.bridge.iter().enumerate() {
            bridges.push(match &b.tls {
                Some(settings) => Some(Arc::new(TlsConnector::new(settings, index)?)),
                None => None,
            });
        }
        Ok(StartFiles { policy, passwords, acceptors, bridges })
    }
}

/// The store to recover from: its backend, where it is (for log lines), the counter its
/// loading reports to, and when opening it began.
struct StoreSource {
    backend: Box<dyn Backend>,
    location: String,
    progress: Arc<LoadProgress>,
    started: Instant,
}

async fn run(
    config: Arc<Config>,
    acceptors: Vec<Option<Arc<TlsAcceptor>>>,
    bridges: Vec<Option<Arc<TlsConnector>>>,
    store: StoreSource,
    auth: Authenticator,
    policy: Arc<dyn Policy>,
) -> Result<BrokerHandle, StartError> {
    let StoreSource { backend, location, progress, started } = store;
    let durable = Arc::new(DurableWaiters::default());
    let waiters = Arc::clone(&durable);
    let notify = Box::new(move |seq: u64| waiters.progress(seq));
    let interval = Duration::from_millis(config.storage.sync_interval_ms);
    let durability = config.storage.durability;
    // Recovery reads the whole store: off the async workers.
    let (store, recovered) = tokio::task::spawn_blocking(move || Store::open(backend, durability, interval, notify))
        .await
        .map_err(task_failed("store recovery"))??;
    let (failed_tx, failed) = watch::channel(None);
    store.on_fatal(Box::new(move |e: Arc<StoreError>| {
        error!(
            storage_dir = %location,
            error = %e,
            "the store cannot keep anything any more: acknowledgements report failure from now on; \
             the broker must restart (recovery replays what was committed)"
        );
        failed_tx.send_replace(Some(e));
    }));
    let broker = Arc::new(Broker::new(Arc::clone(&config), store, durable, auth, policy));
    let restored = broker.restore(recovered);
    let recovery =
        RecoverySummary { records: progress.records(), bytes: progress.bytes(), took: started.elapsed(), ..restored };
    log_recovery(&recovery, &progress);
    tokio::spawn(Arc::clone(&broker).run_keep_alive());
    // A cluster node joins before its listeners accept: its clients must see the cluster's
    // retained messages and reach the other nodes from their first packet.
    if let Some(cluster) = &config.cluster {
        crate::cluster::start(&broker, cluster).await;
    }
    let (tx, rx) = watch::channel(false);
    let live = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for ((index, l), tls) in config.listener.iter().enumerate().zip(acceptors.iter()) {
        let listener = crate::transport::tcp::listen(&l.bind).await.map_err(|source| StartError::Bind {
            bind: l.bind.clone(),
            index,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { bind: l.bind.clone(), index, source })?;
        info!(%addr, kind = l.kind.name(), "listening");
        addrs.push(addr);
        let ws = l.kind.is_websocket().then(|| {
            let limits = &config.limits;
            Arc::new(WsAcceptor::new(l, limits.max_packet_size, Duration::from_secs(limits.connect_timeout_secs)))
        });
        let spot = Spot { index, kind: l.kind, tls: tls.clone(), ws };
        tasks.push(tokio::spawn(accept_loop(listener, spot, Arc::clone(&broker), rx.clone(), Arc::clone(&live))));
    }
    // Bridges once the listeners are up: a bridge to this very broker must find it.
    crate::bridge::start_all(&broker, bridges);
    let metrics_addr = match crate::sys::start(&broker, rx.clone()).await {
        Ok(Some((addr, task))) => {
            tasks.push(task);
            Some(addr)
        }
        Ok(None) => None,
        Err(source) => {
            let _ = tx.send(true);
            broker.kick_all(crate::protocol::reason::SERVER_SHUTTING_DOWN);
            return Err(StartError::MetricsBind { bind: config.metrics.bind.clone(), source });
        }
    };
    let tls = acceptors.into_iter().flatten().collect();
    Ok(BrokerHandle { addrs, shutdown: tx, tasks, broker, tls, failed, recovery, metrics_addr })
}

/// The one line that says what recovery brought back and how long it took.
fn log_recovery(r: &RecoverySummary, progress: &LoadProgress) {
    info!(
        sessions = r.sessions,
        subscriptions = r.subscriptions,
        queued = r.queued,
        retained = r.retained,
        inbound_qos2 = r.inbound_qos2,
        wills = r.wills,
        discarded = r.discarded,
        "state recovered from the store in {:.3} s ({})",
        r.took.as_secs_f64(),
        progress.describe()
    );
}

/// Which listener an accept loop serves, its TLS acceptor (`tls`, `wss`) and its WebSocket
/// upgrade (`ws`, `wss`).
struct Spot {
    index: usize,
    kind: ListenerKind,
    tls: Option<Arc<TlsAcceptor>>,
    ws: Option<Arc<WsAcceptor>>,
}

/// Connections over `limits.max_connections` being answered at once.
const MAX_REFUSALS: usize = 64;

async fn accept_loop(
    listener: TcpListener,
    spot: Spot,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    live: Arc<AtomicUsize>,
) {
    let max = broker.config.limits.max_connections;
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= max {
            warn!(%peer, max, "connection refused: limits.max_connections reached");
            // Tell the client why (CONNACK "server unavailable" / v5 "quota exceeded") when
            // it sends its CONNECT promptly; a bounded number of such refusals run at once,
            // beyond that the socket is just closed.
            if refusing.load(Ordering::Relaxed) < MAX_REFUSALS {
                refusing.fetch_add(1, Ordering::Relaxed);
                let refusing = Arc::clone(&refusing);
                let max_packet = broker.config.limits.max_packet_size as usize;
                let (tls, ws) = (spot.tls.clone(), spot.ws.clone());
                tokio::spawn(async move {
                    use crate::connection::refuse;
                    match (tls, ws) {
                        (None, None) => refuse(stream, max_packet).await,
                        (Some(tls), None) => {
                            if let Ok((stream, _)) = tls.accept(stream).await {
                                refuse(stream, max_packet).await;
                            }
                        }
                        (None, Some(ws)) => {
                            if let Ok(stream) = ws.accept(stream).await {
                                refuse(stream, max_packet).await;
                            }
                        }
                        (Some(tls), Some(ws)) => {
                            if let Ok((stream, _)) = tls.accept(stream).await {
                                if let Ok(stream) = ws.accept(stream).await {
                                    refuse(stream, max_packet).await;
                                }
                            }
                        }
                    }
                    refusing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        // Detached: the live counter is all the accept loop needs, and a JoinSet entry would
        // cost every idle connection memory.
        let guard = Live(Arc::clone(&live));
        let mut info = ConnInfo { peer, listener: spot.index, kind: spot.kind, cert_identity: None };
        // The TLS handshake and the WebSocket upgrade run in the connection's own task, never
        // in the accept loop: a slow or silent client must not hold up the next one. Each kind
        // spawns its own future, so a plain connection's task is not sized for a WebSocket.
        match (&spot.tls, &spot.ws) {
            (None, None) => {
                // Plain MQTT: the CONNECT is often waiting already (`early_read`). The
                // connection's future is spawned as it is, with no wrapper: every byte of it
                // is kept for the connection's life.
                let first = crate::transport::tcp::early_read(&stream);
                tokio::spawn(crate::connection::serve(stream, info, Arc::clone(&broker), first, guard));
            }
            (Some(tls), None) => {
                let tls = Arc::clone(tls);
                let broker = Arc::clone(&broker);
                tokio::spawn(async move {
                    match tls.accept(stream).await {
                        Ok((stream, cert_identity)) => {
                            info.cert_identity = cert_identity;
                            crate::connection::serve(stream, info, broker, BytesMut::new(), guard).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                    }
                });
            }
            (None, Some(ws)) => {
                let ws = Arc::clone(ws);
                let broker = Arc::clone(&broker);
                tokio::spawn(async move {
                    match ws.accept(stream).await {
                        Ok(stream) => crate::connection::serve(stream, info, broker, BytesMut::new(), guard).await,
                        Err(e) => debug!(%peer, error = %e, "WebSocket upgrade failed"),
                    }
                });
            }
            (Some(tls), Some(ws)) => {
                let (tls, ws) = (Arc::clone(tls), Arc::clone(ws));
                let broker = Arc::clone(&broker);
                tokio::spawn(async move {
                    let (stream, cert_identity) = match tls.accept(stream).await {
                        Ok(accepted) => accepted,
                        Err(e) => return debug!(%peer, error = %e, "TLS handshake failed"),
                    };
                    match ws.accept(stream).await {
                        Ok(stream) => {
                            info.cert_identity = cert_identity;
                            crate::connection::serve(stream, info, broker, BytesMut::new(), guard).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "WebSocket upgrade failed"),
                    }
                });
            }
        }
    }
    // Connections see the same shutdown signal; give them a moment to say goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while live.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The multi-threaded runtime tern runs on (the `tern` binary's; an embedding program may
/// use it too). Its workers note when they park, so that input reaching an idle broker is
/// handled in the order it came, across connections (see the broker's `input_order`).
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::broker::input_order::parking)
        .on_thread_unpark(crate::broker::input_order::unparked)
        .build()
}

/// Counts a connection as live until its task ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
