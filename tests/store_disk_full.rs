//! The real fjall store on a full disk: a small tmpfs is filled with QoS 1 retained and
//! persistent-queue publishes until acknowledgements turn to failures (0x80). Nothing that
//! is not on disk may be acknowledged with 0x00: after freeing space (resumed or fatal,
//! whichever fjall allows) and restarting on a larger tmpfs, every message acknowledged with
//! 0x00 must be there.
//!
//! Needs root (it mounts a tmpfs). Skips with a printed reason otherwise, unless
//! `TERN_REQUIRE_TMPFS=1` (set by `.ci/run`), which makes a skip a failure.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let dir = parent.path().join("mnt");
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { dir, _parent: parent })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: after a failed assertion the broker may still hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn mount_or_skip() -> Option<Tmpfs> {
    let required = std::env::var("TERN_REQUIRE_TMPFS").is_ok_and(|v| v == "1");
    match Tmpfs::mount("8m") {
        Ok(t) => Some(t),
        Err(why) if required => panic!("TERN_REQUIRE_TMPFS=1 but no tmpfs could be mounted: {why}"),
        Err(why) => {
            eprintln!("SKIPPED store_disk_full: {why} (needs root; TERN_REQUIRE_TMPFS=1 makes this a failure)");
            None
        }
    }
}

/// Payloads that do not compress, so the disk fills at a known pace.
fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(dir: &Path) -> tern::Config {
    let mut c = tern::Config::default();
    c.listener[0].bind = "127.0.0.1:0".into();
    c.storage.dir = dir.to_path_buf();
    c
}

fn reason_of(ack: &[u8]) -> u8 {
    let (_, body) = split_packet(ack);
    body.get(2).copied().unwrap_or(0)
}

/// Publishes one QoS 1 message and returns the PUBACK reason (None: connection closed).
/// Below 0x80 is success ("acknowledged 0x00" in this file means that).
async fn publish1(p: &mut Raw, topic: &str, body: &[u8], pid: u16, retain: bool) -> Option<u8> {
    p.send_lossy(&publish_full(topic.as_bytes(), body, 1, pid, retain, false, Some(&[]))).await;
    match p.next_event(WAIT).await {
        Event::Packet(ack) => {
            assert_eq!(ack[0], 0x40, "PUBACK expected: {}", hex(&ack));
            Some(reason_of(&ack))
        }
        Event::Closed => None,
        Event::Timeout => panic!("no PUBACK for {topic} within {WAIT:?}"),
    }
}

const PAYLOAD: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_acknowledges_what_it_did_not_keep() {
    let Some(fs) = mount_or_skip() else { return };
    let data = fs.dir.join("data");
    // Room to give back later.
    let filler = fs.dir.join("filler");
    std::fs::write(&filler, payload(u32::MAX, 2 << 20)).expect("filler");

    let broker = tern::start(config(&data)).await.expect("broker starts on the tmpfs");
    let addr = broker.local_addr();
    let mut q = Raw::open(addr).await;
    q.handshake(&Connect::v5("queued").clean(false).expiry(3600)).await;
    q.subscribe(1, "q/#", 1).await;
    q.disconnect().await;

    let mut p = Raw::open(addr).await;
    p.handshake(&Connect::v5("filler")).await;
    // topic -> payload of everything acknowledged with 0x00.
    let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut refused = 0u32;
    let mut first_refusal = None;
    let started = Instant::now();
    let mut i = 0u32;
    while i < 20_000 && refused < 20 {
        let retained = i % 2 == 0;
        let topic = if retained { format!("r/{i}") } else { format!("q/{i}") };
        let body = payload(i, PAYLOAD);
        match publish1(&mut p, &topic, &body, (i % 60_000 + 1) as u16, retained).await {
            // 0x00, or 0x10 "no matching subscribers" for a retained message nobody reads yet.
            Some(r) if r < 0x80 => {
                assert!(
                    first_refusal.is_none() || broker.store_failure().is_none(),
                    "success after the store went fatal"
                );
                acked.insert(topic, body);
            }
            Some(r) => {
                assert_eq!(r, 0x80, "unexpected PUBACK reason");
                first_refusal.get_or_insert(i);
                refused += 1;
            }
            None => panic!("a v5 publisher is told 0x80, not disconnected"),
        }
        i += 1;
    }
    let first_refusal = first_refusal.expect("the 8 MiB tmpfs never filled");
    let fatal_at_full = broker.store_failure();
    eprintln!(
        "disk full: {} messages acknowledged 0x00 ({} KiB), first 0x80 at message {first_refusal}, {refused} refused, {:?}; store fatal: {}",
        acked.len(),
        acked.len() * PAYLOAD / 1024,
        started.elapsed(),
        fatal_at_full.as_ref().map_or("no".to_string(), |e| format!("yes: {e}")),
    );

    // Give the space back: does tern resume by itself (fjall still accepts writes) or is the
    // store fatal (fjall poisoned itself), and then does the handle say so?
    std::fs::remove_file(&filler).expect("free space");
    let mut resumed = 0;
    for k in 0..5u32 {
        let topic = format!("r/after{k}");
        let body = payload(100_000 + k, 512);
        match publish1(&mut p, &topic, &body, 60_001 + k as u16, true).await {
            Some(r) if r < 0x80 => {
                resumed += 1;
                acked.insert(topic, body);
            }
            Some(_) => {}
            None => panic!("disconnected"),
        }
    }
    let fatal = tokio::time::timeout(Duration::from_secs(1), broker.failed()).await.ok();
    eprintln!(
        "space freed: {resumed}/5 new publishes acknowledged 0x00; store fatal: {}",
        fatal.as_ref().map_or("no".to_string(), |e| format!("yes: {e}"))
    );
    match &fatal {
        Some(e) => {
            assert!(e.is_fatal());
            assert_eq!(resumed, 0, "nothing is acknowledged after the store went fatal");
        }
        None => assert_eq!(resumed, 5, "a store that is not fatal resumes once there is room"),
    }
    p.disconnect().await;
    let shut = tokio::time::timeout(Duration::from_secs(20), broker.shutdown()).await.expect("bounded shutdown");
    eprintln!("shutdown: {shut:?}");
    if fatal.is_some() {
        assert!(shut.is_err(), "a fatal store fails the shutdown");
    }

    // Restart on a larger disk: everything acknowledged with 0x00 is there.
    fs.resize("64m");
    let started = Instant::now();
    let broker = tern::start(config(&data)).await.expect("broker restarts on the same directory");
    eprintln!("restart (recovery) took {:?}", started.elapsed());
    let addr = broker.local_addr();
    let want_retained: BTreeMap<&String, &Vec<u8>> = acked.iter().filter(|(t, _)| t.starts_with("r/")).collect();
    let want_queued: BTreeMap<&String, &Vec<u8>> = acked.iter().filter(|(t, _)| t.starts_with("q/")).collect();

    let mut s = Raw::open(addr).await;
    s.handshake(&Connect::v5("checker")).await;
    s.subscribe(1, "r/#", 0).await;
    let mut got_retained = BTreeMap::new();
    while let Event::Packet(pk) = s.next_event(Duration::from_secs(1)).await {
        let m = parse_publish(&pk, true);
        got_retained.insert(m.topic, m.payload);
    }
    for (t, body) in &want_retained {
        assert_eq!(got_retained.get(*t), Some(*body), "retained {t} was acknowledged 0x00 but is not there");
    }

    let mut q = Raw::open(addr).await;
    let ack = q.handshake(&Connect::v5("queued").clean(false).expiry(3600)).await;
    assert!(ack.session_present, "the persistent session survived");
    let mut got_queued = BTreeMap::new();
    while let Event::Packet(pk) = q.next_event(Duration::from_secs(1)).await {
        let m = parse_publish(&pk, true);
        if let Some(pid) = m.pid {
            q.send(&puback(pid)).await;
        }
        got_queued.insert(m.topic, m.payload);
    }
    for (t, body) in &want_queued {
        assert_eq!(got_queued.get(*t), Some(*body), "queued {t} was acknowledged 0x00 but is not there");
    }
    eprintln!(
        "after restart: {}/{} acknowledged retained and {}/{} acknowledged queued messages present \
         ({} retained, {} queued found in all)",
        want_retained.len(),
        want_retained.len(),
        want_queued.len(),
        want_queued.len(),
        got_retained.len(),
        got_queued.len()
    );
    broker.shutdown().await.expect("clean shutdown on the larger disk");
}
