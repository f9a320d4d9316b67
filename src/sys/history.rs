//! The status page's history: a sample every `SAMPLE_SECS` seconds while the HTTP listener
//! runs, so a page opened now shows the last minutes at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::status::{Reporter, SAMPLE_SECS};

pub(super) async fn run(reporter: Arc<Reporter>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(SAMPLE_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = super::stopped(&mut shutdown) => return,
        }
        let r = Arc::clone(&reporter);
        // Gathering stats walks the sessions: off the async workers.
        if tokio::task::spawn_blocking(move || r.sample()).await.is_err() {
            return;
        }
    }
}
