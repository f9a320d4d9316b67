//! The built `tern` binary as a child process, for tests of what only the process does:
//! systemd notifications, start-up log lines, signals, crashes and restarts, its memory. Its
//! config puts one plain listener on a free loopback port and the store in a temporary
//! directory; stdout and stderr of every run go to one log file there, the end of which is
//! printed when the test fails.
//!
//! Each wait has a blocking form (for `#[test]`s) and an `_async` one (for tokio tests, whose
//! worker threads must not block while other tasks of the test run).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for the process to start listening or to exit.
pub const PROCESS_WAIT: Duration = Duration::from_secs(20);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for one connection attempt while waiting for the port.
const CONNECT_WAIT: Duration = Duration::from_millis(500);
/// Lines of the log printed when a test fails.
const LOG_TAIL: usize = 300;

pub struct TernProcess {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    runs: u32,
}

impl TernProcess {
    /// A config on a free port and a fresh store directory; not started.
    pub fn new() -> TernProcess {
        TernProcess::with_config("")
    }

    /// As `new`, with `extra` appended to the config. It follows the `[storage]` table's `dir`
    /// line, so bare keys there are storage keys; other tables start with their own header.
    pub fn with_config(extra: &str) -> TernProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
            l.local_addr().expect("local addr").port()
        };
        let config = format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n[storage]\ndir = \"{}\"\n{extra}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("tern.toml"), config).expect("write config");
        TernProcess { dir, port, child: None, runs: 0 }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tern.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tern.log")
    }

    /// Everything the process wrote so far, over all its runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process with `env` added (and no inherited `TERN__`, `NOTIFY_SOCKET` or
    /// `WATCHDOG_` variables; `RUST_LOG=info` unless `env` sets it); returns at once.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "tern already running");
        self.runs += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open log");
        writeln!(log, "===== tern run {} =====", self.runs).expect("write log");
        let err = log.try_clone().expect("clone log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("-c").arg(self.config_path());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("TERN__") || k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1").envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(err));
        self.child = Some(cmd.spawn().expect("spawn tern"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("tern running").id()
    }

    /// Whether the port accepts a connection now.
    /// A connection to our own port from an ephemeral port that happens to be the same one
    /// is the kernel's TCP simultaneous open: it "succeeds" with nobody listening (a few
    /// percent of runs of a long start-up's polling), so it does not count.
    pub fn accepts(&self) -> bool {
        TcpStream::connect_timeout(&self.addr(), CONNECT_WAIT).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
    }

    /// Starts the process and waits until its port accepts connections.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        self.spawn(env);
        let t0 = Instant::now();
        while !self.accepts() {
            self.still_starting(t0);
            std::thread::sleep(POLL);
        }
    }

    /// `start` for async tests.
    pub async fn start_async(&mut self, env: &[(&str, &str)]) {
        self.spawn(env);
        let t0 = Instant::now();
        while !matches!(
            tokio::time::timeout(CONNECT_WAIT, tokio::net::TcpStream::connect(self.addr())).await,
            Ok(Ok(s)) if s.local_addr().ok() != s.peer_addr().ok()
        ) {
            self.still_starting(t0);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Panics if the process has exited or has not listened within `PROCESS_WAIT` of `t0`.
    fn still_starting(&mut self, t0: Instant) {
        if let Some(status) = self.exited() {
            panic!("tern exited during start-up with {status}");
        }
        assert!(t0.elapsed() < PROCESS_WAIT, "tern not accepting on {} after {PROCESS_WAIT:?}", self.addr());
    }

    /// The exit status once the process has exited (and it is no longer running).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"))?;
        self.child = None;
        Some(status)
    }

    /// Sends signal `sig` ("TERM", "HUP").
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
        assert!(st.success(), "kill -{sig} {pid} failed: {st}");
    }

    /// Waits for the process to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(t0.elapsed() < PROCESS_WAIT, "tern still running after {PROCESS_WAIT:?}");
            std::thread::sleep(POLL);
        }
    }

    /// `wait_exit` for async tests.
    pub async fn wait_exit_async(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(t0.elapsed() < PROCESS_WAIT, "tern still running after {PROCESS_WAIT:?}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, and a clean exit.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit();
        assert!(status.success(), "tern exited with {status} after SIGTERM");
    }

    /// `terminate` for async tests.
    pub async fn terminate_async(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit_async().await;
        assert!(status.success(), "tern exited with {status} after SIGTERM");
    }

    /// SIGKILL (a crash: nothing is flushed), and wait until the process is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("tern running");
        child.kill().expect("SIGKILL tern");
        child.wait().expect("wait for tern");
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL);
            eprintln!(
                "----- tern log ({}, last {} of {} lines) -----\n{}\n----- end of tern log -----",
                self.log_path().display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}
