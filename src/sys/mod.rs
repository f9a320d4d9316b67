//! What tern tells about itself: the `$SYS/broker/...` topics (mosquitto's names and
//! meanings), and an HTTP listener (`[metrics] bind`) serving `/metrics` in the Prometheus
//! text format, a status page at `/` and its data at `/api/status`.
//!
//! Owns the reporting: when to look, what changed since the last look, the load averages,
//! the status page's history of samples, the HTTP listener and its bounds. Owns no counter:
//! those live where the events happen (`broker::Metrics`, the store's commit latency, the
//! bridges' states through the broker) and are only read here, through `Broker::stats`.
//! Knows nothing of MQTT bytes or sockets of clients: `$SYS` values are published through the
//! broker's own retained-publish path, so delivery goes through the policy's read check.

mod history;
mod http;
mod prometheus;
mod status;
mod tree;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::Broker;

/// Starts the `$SYS` publisher (unless `metrics.sys_interval` is 0) and the HTTP listener
/// (when `metrics.bind` is set). Returns the listener's address and task. Err when the
/// address cannot be bound.
pub(crate) async fn start(
    broker: &Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    let cfg = &broker.config.metrics;
    if cfg.sys_interval > 0 {
        tokio::spawn(tree::run(Arc::clone(broker), shutdown.clone()));
    }
    if cfg.bind.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.bind).await?;
    let addr = listener.local_addr()?;
    let reporter = Arc::new(status::Reporter::new(Arc::clone(broker)));
    tokio::spawn(history::run(Arc::clone(&reporter), shutdown.clone()));
    let task = tokio::spawn(http::serve(listener, reporter, shutdown));
    tracing::info!(%addr, "metrics and status page listening");
    Ok(Some((addr, task)))
}

/// Resolves when the server shuts down (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
