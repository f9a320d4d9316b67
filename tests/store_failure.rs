//! When the store cannot write (disk full, I/O error), nothing it failed to keep is
//! acknowledged: v5 publishers get PUBACK/PUBREC with 0x80, 3.1.1 publishers are
//! disconnected, a persistent SUBSCRIBE gets 0x80; the broker keeps serving and recovers
//! by itself once writes succeed again.

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
}

impl Backend for Failing {
    fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other("No space left on device")));
        }
        self.inner.lock().unwrap().apply(ops)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn load(&mut self) -> Result<Recovered, StoreError> {
        self.inner.lock().unwrap().load()
    }
}

async fn start_failing() -> (tern::BrokerHandle, Failing) {
    let backend = Failing::default();
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
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
