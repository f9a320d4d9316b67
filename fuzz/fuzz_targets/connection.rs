//! Stateful: byte streams fed to one connection of an in-process broker (public API only:
//! `tern::start_with` over a memory store, `BrokerHandle::serve` over a `tokio::io::duplex`).
//!
//! Input: byte 0 chooses the start, bits 0-1: 0/1/2 = a fixed CONNECT at MQTT 3.1/3.1.1/5.0
//! is sent first, 3 = the input brings its own CONNECT; bits 2-7 = chunk size (0 = write the
//! rest at once, else in chunks of that many bytes, yielding between them). The rest is
//! written to the client end while everything the broker sends back is read and dropped;
//! then the client end is closed.
//!
//! A crash: any panic in the broker (libFuzzer's panic hook aborts the process, and the
//! connection task's JoinHandle is checked as well), or a connection task still running
//! 5 s after its client closed. Every wait is bounded. One broker serves every input, so
//! state (retained messages, persistent sessions) carries over between inputs, as it does
//! between the clients of a real broker.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::time::timeout;

const CONNECT_V31: &[u8] = b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04fuzz";
const CONNECT_V311: &[u8] = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04fuzz";
/// With one property, Receive Maximum = 20, as the conformance vectors' default CONNECT.
const CONNECT_V5: &[u8] = b"\x10\x14\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x14\x00\x04fuzz";

struct Env {
    rt: Runtime,
    broker: tern::BrokerHandle,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut config = tern::Config::default();
        // `start_with` binds every listener; port 0 on loopback, nothing connects to it.
        config.listener[0].bind = "127.0.0.1:0".into();
        // Small limits keep the state that carries over between inputs small.
        config.limits.max_queued_messages = 100;
        config.limits.max_packet_size = 64 * 1024;
        let ext =
            tern::Extensions { backend: Some(Box::new(tern::store::MemoryBackend::default())), ..Default::default() };
        let broker = rt.block_on(tern::start_with(config, ext)).expect("broker starts");
        Env { rt, broker }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let connect: &[u8] = match head & 3 {
        0 => CONNECT_V31,
        1 => CONNECT_V311,
        2 => CONNECT_V5,
        _ => &[],
    };
    let chunk = match usize::from(head >> 2) {
        0 => rest.len().max(1),
        n => n,
    };
    let env = env();
    env.rt.block_on(async {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("address");
        let task = env.broker.serve(server, peer);
        let (mut rd, mut wr) = tokio::io::split(client);
        // Drain the broker's answers concurrently, so it never blocks writing to us.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let writes = std::iter::once(connect).filter(|c| !c.is_empty()).chain(rest.chunks(chunk));
        for part in writes {
            // An error = the broker closed the connection; a timeout = it stopped reading
            // (flow control). Neither is a bug in itself; stop writing either way.
            match timeout(Duration::from_secs(1), wr.write_all(part)).await {
                Ok(Ok(())) => tokio::task::yield_now().await,
                _ => break,
            }
        }
        let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
        match timeout(Duration::from_secs(5), task).await {
            Err(_) => panic!("connection task still running 5 s after its client closed"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
        }
        let _ = timeout(Duration::from_secs(1), reader).await;
    });
});
