//! When the store cannot write (disk full, I/O error), nothing it failed to keep is
//! acknowledged: v5 publishers get PUBACK/PUBREC with 0x80, 3.1.1 publishers are
//! disconnected, a persistent SUBSCRIBE gets 0x80; the broker keeps serving and recovers
//! by itself once writes succeed again. A store that cannot make progress (its commit thread
//! died) is fatal: every acknowledgement from then on is a failure, QoS 0 is still served,
//! and the handle reports it so the binary can exit. A failed final sync is a failed shutdown.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tern::store::{Backend, MemoryBackend, Op, Recovered, StoreError};

#[derive(Clone, Default)]
struct Failing {
    inner: Arc<Mutex<MemoryBackend>>,
    fail: Arc<AtomicBool>,
    /// `apply` panics (a backend bug): the commit thread dies.
    panic: Arc<AtomicBool>,
    fail_sync: Arc<AtomicBool>,
}

impl Backend for Failing {
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if self.panic.load(Ordering::SeqCst) {
            panic!("test backend panics in apply");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other("No space left on device")));
        }
        self.inner.lock().unwrap().apply(ops)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other("final fsync failed")));
        }
        Ok(())
    }
    fn load(&mut self) -> Result<Recovered, StoreError> {
        self.inner.lock().unwrap().load()
    }
}

async fn start_failing() -> (tern::BrokerHandle, Failing) {
    start_failing_with(|_| {}).await
}

async fn start_failing_with(f: impl FnOnce(&mut tern::Config)) -> (tern::BrokerHandle, Failing) {
    let backend = Failing::default();
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    f(&mut c);
    let handle = tern::server::start_with_backend(Arc::new(c), Box::new(backend.clone())).await.unwrap();
    (handle, backend)
}

fn reason_of(ack: &[u8]) -> u8 {
    let (_, body) = split_packet(ack);
    body.get(2).copied().unwrap_or(0)
}

#[tokio::test]
async fn v5_publisher_gets_0x80_while_the_store_fails_then_recovers() {
    let (broker, backend) = start_failing().await;
    let addr = broker.local_addr();
    let mut p = Raw::open(addr).await;
    p.handshake(&Connect::v5("pub5")).await;

    backend.fail.store(true, Ordering::SeqCst);
    // A retained publish must reach the store before it is acknowledged.
    p.send(&publish_full(b"cfg/a", b"1", 1, 1, true, false, Some(&[]))).await;
    let ack = p.read_packet().await;
    assert_eq!(ack[0], 0x40, "PUBACK expected: {}", hex(&ack));
    assert_eq!(reason_of(&ack), 0x80, "store failure must not be acknowledged as success: {}", hex(&ack));

    backend.fail.store(false, Ordering::SeqCst);
    p.send(&publish_full(b"cfg/a", b"2", 1, 2, true, false, Some(&[]))).await;
    let ack = p.read_packet().await;
    assert_eq!(ack[0], 0x40);
    assert!(reason_of(&ack) < 0x80, "recovered store acknowledges again: {}", hex(&ack));
    p.ping().await;
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn v311_publisher_is_disconnected_when_its_message_cannot_be_stored() {
    let (broker, backend) = start_failing().await;
    let addr = broker.local_addr();
    let mut other = Raw::open(addr).await;
    other.handshake(&Connect::v311("bystander")).await;
    let mut p = Raw::open(addr).await;
    p.handshake(&Connect::v311("pub311")).await;

    backend.fail.store(true, Ordering::SeqCst);
    p.send(&publish_full(b"cfg/b", b"x", 1, 7, true, false, None)).await;
    p.expect_closed_within(Duration::from_secs(3)).await;
    backend.fail.store(false, Ordering::SeqCst);

    // The broker keeps serving everyone else.
    other.ping().await;
    other.publish_retain("cfg/b", b"y", 1, 1, true).await;
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn persistent_subscribe_fails_with_0x80_when_not_stored() {
    let (broker, backend) = start_failing().await;
    let addr = broker.local_addr();
    let mut s = Raw::open(addr).await;
    s.handshake(&Connect::v5("sub5").clean(false).expiry(600)).await;
    backend.fail.store(true, Ordering::SeqCst);
    let codes = s.subscribe_many(1, &[("x/#", 1)]).await;
    assert_eq!(codes, vec![0x80], "a subscription that was not stored is refused");
    backend.fail.store(false, Ordering::SeqCst);
    let codes = s.subscribe_many(2, &[("x/#", 1)]).await;
    assert_eq!(codes, vec![0x01]);
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_dead_commit_thread_is_fatal_and_reported() {
    let (broker, backend) = start_failing().await;
    let addr = broker.local_addr();
    let mut sub = Raw::open(addr).await;
    sub.handshake(&Connect::v5("watcher")).await;
    sub.subscribe(1, "live/#", 0).await;
    let mut p = Raw::open(addr).await;
    p.handshake(&Connect::v5("pub-fatal")).await;
    p.publish_retain("cfg/ok", b"1", 1, 1, true).await;
    assert!(broker.store_failure().is_none());

    backend.panic.store(true, Ordering::SeqCst);
    p.send(&publish_full(b"cfg/x", b"2", 1, 2, true, false, Some(&[]))).await;
    let ack = p.read_packet().await;
    assert_eq!((ack[0], reason_of(&ack)), (0x40, 0x80), "not stored, not acknowledged: {}", hex(&ack));
    let err = tokio::time::timeout(WAIT, broker.failed()).await.expect("the handle reports the failure");
    assert!(err.is_fatal() && err.to_string().contains("test backend panics"), "{err}");
    assert!(broker.store_failure().is_some());

    // Everything after is refused at once, even though the backend would work again.
    backend.panic.store(false, Ordering::SeqCst);
    p.send(&publish_full(b"cfg/y", b"3", 1, 3, true, false, Some(&[]))).await;
    let ack = p.read_packet().await;
    assert_eq!((ack[0], reason_of(&ack)), (0x40, 0x80), "{}", hex(&ack));
    // QoS 0 is still served.
    p.send(&publish_full(b"live/t", b"q0", 0, 0, false, false, Some(&[]))).await;
    let got = parse_publish(&sub.read_packet().await, true);
    assert_eq!(got.payload, b"q0");

    let shut = tokio::time::timeout(WAIT, broker.shutdown()).await.expect("shutdown is bounded");
    assert!(shut.is_err(), "a fatal store makes the shutdown an error");
}

#[tokio::test]
async fn a_failed_final_sync_fails_the_shutdown() {
    let (broker, backend) = start_failing_with(|c| c.storage.durability = tern::config::Durability::Periodic).await;
    let mut p = Raw::open(broker.local_addr()).await;
    p.handshake(&Connect::v5("pub-sync")).await;
    p.publish_retain("cfg/s", b"1", 1, 1, true).await;
    p.disconnect().await;
    backend.fail_sync.store(true, Ordering::SeqCst);
    let err = tokio::time::timeout(WAIT, broker.shutdown()).await.expect("bounded").expect_err("sync failed");
    assert!(err.to_string().contains("final fsync failed"), "{err}");
}
