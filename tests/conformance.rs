//! Runs mosquitto's byte-level conformance vectors against an in-process broker.
//!
//! The vectors live outside the repository; `TERN_CONFORMANCE_DIR` names their directory
//! (`.ci/run` sets it to `../shared/conformance/mosquitto-vectors`). Without it the test says
//! it did not run and why, and passes; but when `CI` is set (non-empty, as `.ci/run` makes
//! sure), missing vectors fail the test, so that CI never counts a skipped run as a passed
//! one. Cases listed in `tests/conformance-divergences.md` are expected to differ (tern
//! follows the specification there); any other failure fails the test, and so does a listed
//! case that now passes (the list must stay true).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP_TIMEOUT: Duration = Duration::from_millis(1500);
// Sequential: the vectors share topics and client ids, and mosquitto's own suite runs them
// one at a time.
const PARALLEL: usize = 1;

#[derive(Clone, Debug)]
enum Step {
    Send(Vec<u8>),
    Recv(Vec<u8>),
    Publish { topic: String, qos: u8, payload: Vec<u8> },
}

#[derive(Clone, Debug)]
struct Case {
    file: String,
    group: String,
    name: String,
    ver: u8,
    connect: bool,
    expect_disconnect: bool,
    steps: Vec<Step>,
}

impl Case {
    fn id(&self) -> String {
        format!("{} :: {} :: {}", self.file, self.group.trim(), self.name.trim())
    }
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if clean.len() % 2 != 0 {
        return Err(format!("odd hex length in {s:?}"));
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&clean[i..i + 2], 16).map_err(|e| format!("bad hex {s:?}: {e}")))
        .collect()
}

fn load(dir: &Path) -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read TERN_CONFORMANCE_DIR {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let groups: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let file = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for g in groups.as_array().into_iter().flatten() {
            if g["disable"].as_bool() == Some(true) {
                continue;
            }
            let group = g["group"].as_str().unwrap_or("").to_string();
            for t in g["tests"].as_array().into_iter().flatten() {
                let steps = t["msgs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| match m["type"].as_str() {
                        Some("send") => Step::Send(hex(m["payload"].as_str().unwrap_or("")).unwrap()),
                        Some("recv") => Step::Recv(hex(m["payload"].as_str().unwrap_or("")).unwrap()),
                        Some("publish") => Step::Publish {
                            topic: m["topic"].as_str().unwrap_or("").into(),
                            qos: m["qos"].as_u64().unwrap_or(0) as u8,
                            payload: m["payload"].as_str().unwrap_or("").as_bytes().to_vec(),
                        },
                        other => panic!("{}: unknown step type {other:?}", f.display()),
                    })
                    .collect();
                cases.push(Case {
                    file: file.clone(),
                    group: group.clone(),
                    name: t["name"].as_str().unwrap_or("").into(),
                    ver: t["ver"].as_u64().unwrap_or(4) as u8,
                    connect: t["connect"].as_bool().unwrap_or(true),
                    expect_disconnect: t["expect_disconnect"].as_bool().unwrap_or(true),
                    steps,
                });
            }
        }
    }
    cases
}

fn str_field(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn with_header(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

fn connect_packet(ver: u8, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    if ver == 3 {
        str_field(&mut body, b"MQIsdp");
    } else {
        str_field(&mut body, b"MQTT");
    }
    body.push(ver);
    body.push(0x02); // clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    if ver == 5 {
        body.extend_from_slice(&[0x03, 0x21, 0x00, 0x14]); // Receive Maximum = 20
    }
    str_field(&mut body, client_id.as_bytes());
    with_header(0x10, body)
}

async fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(STEP_TIMEOUT, s.read(&mut buf[got..])).await {
            Err(_) => return Err(format!("timed out after {got} of {n} bytes: got {}", to_hex(&buf[..got]))),
            Ok(Ok(0)) => {
                return Err(format!("connection closed after {got} of {n} bytes: got {}", to_hex(&buf[..got])))
            }
            Ok(Err(e)) => {
                return Err(format!("read error after {got} of {n} bytes ({e}): got {}", to_hex(&buf[..got])))
            }
            Ok(Ok(k)) => got += k,
        }
    }
    Ok(buf)
}

/// Reads one whole packet (for CONNACK/acks whose length the harness does not know).
async fn read_packet(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut out = read_exact_timeout(s, 1).await?;
    let mut len = 0usize;
    let mut mult = 1usize;
    for _ in 0..4 {
        let b = read_exact_timeout(s, 1).await?[0];
        out.push(b);
        len += usize::from(b & 0x7f) * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    out.extend(read_exact_timeout(s, len).await?);
    Ok(out)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect::<Vec<_>>().join(" ")
}

async fn helper_publish(
    addr: std::net::SocketAddr,
    id: &str,
    topic: &str,
    qos: u8,
    payload: &[u8],
) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&connect_packet(4, id)).await.map_err(|e| e.to_string())?;
    let ack = read_packet(&mut s).await?;
    if ack.get(3) != Some(&0) {
        return Err(format!("helper CONNACK {}", to_hex(&ack)));
    }
    let mut body = Vec::new();
    str_field(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&1u16.to_be_bytes());
    }
    body.extend_from_slice(payload);
    s.write_all(&with_header(0x30 | (qos << 1), body)).await.map_err(|e| e.to_string())?;
    match qos {
        1 => {
            read_packet(&mut s).await?;
        }
        2 => {
            read_packet(&mut s).await?;
            s.write_all(&[0x62, 0x02, 0x00, 0x01]).await.map_err(|e| e.to_string())?;
            read_packet(&mut s).await?;
        }
        _ => {}
    }
    s.write_all(&[0xE0, 0x00]).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn run_case(addr: std::net::SocketAddr, case: &Case, n: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if case.connect {
        let id = format!("{} {}", case.group, case.name);
        s.write_all(&connect_packet(case.ver, &id)).await.map_err(|e| e.to_string())?;
        let ack = read_packet(&mut s).await.map_err(|e| format!("default CONNACK: {e}"))?;
        if ack.first() != Some(&0x20) || ack.get(3) != Some(&0) {
            return Err(format!("default CONNECT refused: {}", to_hex(&ack)));
        }
    }
    for (i, step) in case.steps.iter().enumerate() {
        match step {
            Step::Send(b) => {
                // The broker may already have closed; later steps report what matters.
                let _ = s.write_all(b).await;
            }
            Step::Recv(want) => {
                let got = read_exact_timeout(&mut s, want.len())
                    .await
                    .map_err(|e| format!("step {i}: expected {}: {e}", to_hex(want)))?;
                if &got != want {
                    return Err(format!("step {i}: expected {} got {}", to_hex(want), to_hex(&got)));
                }
            }
            Step::Publish { topic, qos, payload } => {
                helper_publish(addr, &format!("helper-{n}"), topic, *qos, payload)
                    .await
                    .map_err(|e| format!("step {i}: helper publish: {e}"))?;
            }
        }
    }
    if case.expect_disconnect {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(STEP_TIMEOUT, s.read(&mut buf)).await {
            Err(_) => Err("expected the connection to be closed, it stayed open".into()),
            Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(k)) => Err(format!("expected close, got more bytes: {}", to_hex(&buf[..k]))),
        }
    } else {
        s.write_all(&[0xC0, 0x00]).await.map_err(|e| format!("PINGREQ write: {e}"))?;
        let got = read_exact_timeout(&mut s, 2).await.map_err(|e| format!("expected PINGRESP: {e}"))?;
        if got != [0xD0, 0x00] {
            return Err(format!("expected PINGRESP D0 00, got {}", to_hex(&got)));
        }
        Ok(())
    }
}

fn divergences() -> HashSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance-divergences.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    // Lines of the form "- `FILE :: GROUP :: NAME` — clause and reason".
    text.lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split_once('`').map(|(id, _)| id.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_conformance_vectors() {
    let Some(dir) = std::env::var_os("TERN_CONFORMANCE_DIR").map(PathBuf::from) else {
        // In CI a skipped conformance run must not look like a passed one. (A directory that
        // is named but missing fails in `load`, CI or not.)
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(
            !ci,
            "conformance vectors not run and CI is set: set TERN_CONFORMANCE_DIR to the vectors \
             directory (.ci/run does when ../shared/conformance/mosquitto-vectors exists)"
        );
        println!("conformance vectors not run: set TERN_CONFORMANCE_DIR to the vectors directory (.ci/run does)");
        return;
    };
    let cases = load(&dir);
    assert!(!cases.is_empty(), "no cases found in {}", dir.display());

    let data = tempfile::tempdir().unwrap();
    let mut config = tern::Config::default();
    config.listener[0].bind = "127.0.0.1:0".into();
    config.storage.dir = data.path().to_path_buf();
    // The vectors assume mosquitto's defaults for these.
    config.mqtt.topic_alias_maximum = 10;
    config.mqtt.receive_maximum = 20;
    config.limits.max_packet_size = 268_435_460;
    let broker = tern::start(config).await.unwrap();
    let addr = broker.local_addr();

    let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for case in cases {
        let sem = Arc::clone(&sem);
        let counter = Arc::clone(&counter);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let r = run_case(addr, &case, n).await;
            (case, r)
        }));
    }
    let expected = divergences();
    let (mut passed, mut failed, mut diverged) = (0, 0, 0);
    let mut stale = Vec::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (case, r) = t.await.unwrap();
        let listed = expected.contains(&case.id());
        match r {
            Ok(()) => {
                passed += 1;
                if listed {
                    stale.push(case.id());
                }
            }
            Err(e) if listed => {
                diverged += 1;
                let _ = e;
            }
            Err(e) => {
                failed += 1;
                failures.push(format!("FAIL {} (v{}): {e}", case.id(), case.ver));
            }
        }
    }
    failures.sort();
    for f in &failures {
        println!("{f}");
    }
    for s in &stale {
        println!("LISTED BUT PASSES {s}");
    }
    println!("conformance: {passed} passed, {failed} failed, {diverged} listed divergences");
    broker.shutdown().await.expect("clean shutdown");
    assert!(failed == 0 && stale.is_empty(), "{failed} unlisted failures, {} stale divergences", stale.len());
}
