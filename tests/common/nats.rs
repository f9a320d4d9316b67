//! Real `nats-server` processes for the cluster tests: N servers forming one JetStream cluster
//! on free loopback ports, each with its own store directory, monitoring port and log file.
//! A server can be killed (`kill -9`) and started again on the same ports and store, as a
//! crashed NATS node would come back.
//!
//! `nats-server` comes from Debian's package (`/usr/sbin/nats-server`, installed by `.ci/run`).
//! Without it the tests that need it skip with a message, except in CI (`CI` set), where a
//! missing server is a failure: CI must never pass by skipping.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a JetStream cluster to elect its leaders and answer healthy.
pub const NATS_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
const LOG_TAIL: usize = 80;

/// The `nats-server` binary, or None (with the reason printed) when the test should skip.
/// Panics in CI: there the binary must be installed.
pub fn nats_server_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = candidates
        .into_iter()
        .chain(["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"].map(PathBuf::from))
        .find(|p| p.is_file());
    if found.is_none() {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(!ci, "nats-server is not installed (apt-get install nats-server); CI must not skip cluster tests");
        eprintln!("SKIP: nats-server not installed (apt-get install nats-server)");
    }
    found
}

/// A port free now, below Linux's ephemeral range (32768-60999): a server killed and started
/// again must find its port still free, and ports the kernel hands out for `bind(":0")` and
/// outgoing connections (other tests running meanwhile) never come from here.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    pub route_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self, bin: &Path) {
        assert!(self.child.is_none(), "nats-server {} already running", self.name);
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log).expect("open nats log");
        writeln!(log, "===== nats-server {} start =====", self.name).expect("write nats log");
        let err = log.try_clone().expect("clone nats log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// `GET path` on the monitoring port: the reply, when there is one.
    fn monitor(&self, path: &str) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        Some(reply)
    }

    /// Ready for JetStream requests: `/healthz` answers 200 (JetStream current with its meta
    /// leader and every stream and consumer), or, for a cluster that was restarted with its
    /// streams still catching up (healthz then fails for tens of seconds on a loaded machine,
    /// while requests are already served), `/jsz` names a meta leader.
    fn healthy(&self) -> bool {
        let ok = |r: &str| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200");
        if self.monitor("/healthz").is_some_and(|r| ok(&r)) {
            return true;
        }
        self.monitor("/jsz").is_some_and(|r| {
            ok(&r)
                && r.split_once("\"meta_cluster\"")
                    .and_then(|(_, meta)| meta.split_once("\"leader\": \""))
                    .is_some_and(|(_, leader)| !leader.starts_with('"'))
        })
    }
}

/// A JetStream cluster of `nats-server` processes, stopped (SIGKILL) when dropped; their logs
/// are printed when a test fails.
pub struct NatsCluster {
    pub dir: tempfile::TempDir,
    pub servers: Vec<NatsServer>,
    bin: PathBuf,
}

impl NatsCluster {
    /// `n` servers in one JetStream cluster (n = 1: a standalone JetStream server), started and
    /// healthy. None when nats-server is missing outside CI (the caller returns: a skip).
    pub fn start(n: usize) -> Option<NatsCluster> {
        let bin = nats_server_binary()?;
        // A port found free can be taken by another test before its server binds it: such
        // a server exits at once, and the cluster starts again on other ports.
        for _ in 0..3 {
            if let Some(cluster) = Self::start_on_free_ports(n, &bin) {
                return Some(cluster);
            }
        }
        panic!("nats-servers kept exiting at start (ports taken?)");
    }

    /// One try of `start`: None when a server exited while starting.
    fn start_on_free_ports(n: usize, bin: &Path) -> Option<NatsCluster> {
        let bin = bin.to_path_buf();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut picked = std::collections::BTreeSet::new();
        let mut unique = || loop {
            let p = free_port();
            if picked.insert(p) {
                return p;
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (unique(), unique(), unique())).collect();
        let mut servers = Vec::new();
        for (i, &(port, http_port, route_port)) in ports.iter().enumerate() {
            let name = format!("nats{}", i + 1);
            let store = dir.path().join(&name);
            let mut conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n",
                store.display()
            );
            if n > 1 {
                let routes: Vec<String> =
                    ports.iter().map(|&(_, _, r)| format!("nats-route://127.0.0.1:{r}")).collect();
                conf.push_str(&format!(
                    "cluster {{\n  name: tern-test\n  listen: 127.0.0.1:{route_port}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, conf).expect("write nats config");
            let log = dir.path().join(format!("{name}.log"));
            servers.push(NatsServer { name, port, http_port, route_port, config, log, child: None });
        }
        let mut cluster = NatsCluster { dir, servers, bin };
        for i in 0..n {
            let bin = cluster.bin.clone();
            cluster.servers[i].spawn(&bin);
        }
        let t0 = Instant::now();
        loop {
            for s in &mut cluster.servers {
                if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                    eprintln!(
                        "nats-server {} exited at start with {status}; trying other ports:\n{}",
                        s.name,
                        tail(&s.log())
                    );
                    return None;
                }
            }
            if cluster.healthy_now(t0) {
                return Some(cluster);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Every server's client url, in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The urls as a TOML array, for `[cluster] nats = ...`.
    pub fn urls_toml(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// SIGKILL server `i` (a crash) and wait until it is gone.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.servers[i].child.take().expect("nats-server running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts server `i` again (same ports, same store) and waits until every running server
    /// answers healthy.
    pub fn restart(&mut self, i: usize) {
        let bin = self.bin.clone();
        self.servers[i].spawn(&bin);
        self.wait_healthy();
    }

    /// Waits until every running server answers healthy (JetStream current), up to `NATS_WAIT`.
    pub fn wait_healthy(&mut self) {
        let t0 = Instant::now();
        while !self.healthy_now(t0) {
            std::thread::sleep(POLL);
        }
    }

    /// `wait_healthy` for async tests.
    pub async fn wait_healthy_async(&mut self) {
        let t0 = Instant::now();
        while !self.healthy_now(t0) {
            tokio::time::sleep(POLL).await;
        }
    }

    /// `restart` for async tests.
    pub async fn restart_async(&mut self, i: usize) {
        let bin = self.bin.clone();
        self.servers[i].spawn(&bin);
        self.wait_healthy_async().await;
    }

    /// Starts every stopped server (same ports, same stores), then waits until all answer
    /// healthy: a JetStream cluster whose servers all stopped is healthy only once a quorum
    /// is back, so they cannot be restarted one by one with a wait after each.
    pub async fn restart_all_async(&mut self) {
        let bin = self.bin.clone();
        for s in &mut self.servers {
            if !s.running() {
                s.spawn(&bin);
            }
        }
        self.wait_healthy_async().await;
    }

    /// Whether every running server is healthy; panics if one exited or `NATS_WAIT` passed.
    fn healthy_now(&mut self, t0: Instant) -> bool {
        for s in &mut self.servers {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("nats-server {} exited with {status}:\n{}", s.name, tail(&s.log()));
                }
            }
        }
        if self.servers.iter().filter(|s| s.running()).all(NatsServer::healthy) {
            return true;
        }
        assert!(t0.elapsed() < NATS_WAIT, "nats-servers not healthy after {NATS_WAIT:?}:\n{}", self.logs());
        false
    }

    pub fn logs(&self) -> String {
        self.servers.iter().map(|s| format!("--- {} ---\n{}", s.name, tail(&s.log()))).collect::<Vec<_>>().join("\n")
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("===== nats-server logs =====\n{}", self.logs());
        }
    }
}

/// `n` tern processes as nodes `n1`… of cluster `name`, node `i` (from 0) connected to the
/// NATS urls `urls(i)`, JetStream replicas 3 and 64 MiB streams, plus the `[cluster]` keys in
/// `extra`; returned once every node accepts clients (each waits for NATS and its streams
/// first).
pub async fn tern_nodes(
    name: &str,
    n: usize,
    urls: impl Fn(usize) -> Vec<String>,
    extra: &str,
) -> Vec<crate::common::process::TernProcess> {
    let mut out = Vec::new();
    for i in 0..n {
        let list: Vec<String> = urls(i).iter().map(|u| format!("\"{u}\"")).collect();
        let mut t = crate::common::process::TernProcess::with_config(&format!(
            "\n[cluster]\nnats = [{}]\nnode = \"n{}\"\nname = \"{name}\"\nreplicas = 3\nmax_bytes = 67108864\n{extra}",
            list.join(", "),
            i + 1
        ));
        t.spawn(&[]);
        out.push(t);
    }
    let t0 = Instant::now();
    for t in &out {
        while !t.accepts() {
            assert!(t0.elapsed() < Duration::from_secs(40), "tern node not accepting:\n{}", t.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}
