//! Listeners and the life of the server: binds every configured listener, accepts
//! connections up to `limits.max_connections`, spawns one task per connection, and stops
//! them all on shutdown.
//!
//! Owns sockets until a connection task takes one. Knows nothing of MQTT packets.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::auth::{AuthMethod, Authenticator};
use crate::broker::{Broker, DurableWaiters};
use crate::config::Config;
use crate::store::{Backend, FjallBackend, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {bind} (config key listener[{index}].bind): {source}")]
    Bind { bind: String, index: usize, source: io::Error },
    /// The store in storage.dir could not be opened or read.
    #[error("{0} (config key storage.dir)")]
    Store(#[from] StoreError),
}

/// A running broker. Dropping it does not stop it; call `shutdown`.
pub struct BrokerHandle {
    addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub broker: Arc<Broker>,
}

impl BrokerHandle {
    /// Address of the first listener (tests bind port 0 and ask).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops accepting, tells v5 clients the server is shutting down (0x8B), waits
    /// briefly for connections to close, then flushes and closes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.broker.kick_all(crate::protocol::reason::SERVER_SHUTTING_DOWN);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let broker = self.broker;
        let _ = tokio::task::spawn_blocking(move || broker.close_store()).await;
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
    /// MQTT 5 enhanced authentication methods.
    pub auth_methods: Vec<Arc<dyn AuthMethod>>,
}

/// Like `start`, with extensions.
pub async fn start_with(config: Config, ext: Extensions) -> Result<BrokerHandle, StartError> {
    let config = Arc::new(config);
    let backend = match ext.backend {
        Some(b) => b,
        None => {
            let dir = config.storage.dir.clone();
            let b = tokio::task::spawn_blocking(move || FjallBackend::open(&dir))
                .await
                .map_err(|e| StoreError::Engine(format!("store opening task failed: {e}")))??;
            Box::new(b)
        }
    };
    run(config, backend, Authenticator::new(ext.auth_methods)).await
}

/// Like `start`, over any store backend (tests inject failing ones).
pub async fn start_with_backend(config: Arc<Config>, backend: Box<dyn Backend>) -> Result<BrokerHandle, StartError> {
    run(config, backend, Authenticator::default()).await
}

async fn run(config: Arc<Config>, backend: Box<dyn Backend>, auth: Authenticator) -> Result<BrokerHandle, StartError> {
    let durable = Arc::new(DurableWaiters::default());
    let waiters = Arc::clone(&durable);
    let notify = Box::new(move |seq: u64| waiters.progress(seq));
    let interval = Duration::from_millis(config.storage.sync_interval_ms);
    let (store, recovered) = Store::open(backend, config.storage.durability, interval, notify)?;
    let broker = Arc::new(Broker::new(Arc::clone(&config), store, durable, auth));
    broker.restore(recovered);
    tokio::spawn(Arc::clone(&broker).run_keep_alive());
    let (tx, rx) = watch::channel(false);
    let live = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for (index, l) in config.listener.iter().enumerate() {
        let listener = TcpListener::bind(&l.bind).await.map_err(|source| StartError::Bind {
            bind: l.bind.clone(),
            index,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { bind: l.bind.clone(), index, source })?;
        crate::transport::tcp::defer_accept(&listener, config.limits.connect_timeout_secs);
        info!(%addr, "listening (mqtt over tcp)");
        addrs.push(addr);
        tasks.push(tokio::spawn(accept_loop(listener, Arc::clone(&broker), rx.clone(), Arc::clone(&live))));
    }
    Ok(BrokerHandle { addrs, shutdown: tx, tasks, broker })
}

/// Connections over `limits.max_connections` being answered at once.
const MAX_REFUSALS: usize = 64;

async fn accept_loop(
    listener: TcpListener,
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
                tokio::spawn(async move {
                    crate::connection::refuse(stream, max_packet).await;
                    refusing.fetch_sub(1, Ordering::Relaxed);
                });
            }
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let first = crate::transport::tcp::early_read(&stream);
        // Detached: the live counter is all the accept loop needs, and a JoinSet entry would
        // cost every idle connection memory. The connection's future is spawned as it is,
        // with no wrapper: every byte of it is kept for the connection's life.
        let guard = Live(Arc::clone(&live));
        tokio::spawn(crate::connection::serve(stream, peer, Arc::clone(&broker), first, guard));
    }
    // Connections see the same shutdown signal; give them a moment to say goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while live.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Counts a connection as live until its task ends.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
