//! The built `tern` binary as a child process, for tests of what only the process does:
//! systemd notifications, start-up log lines, signals. Its config puts one plain listener on
//! a free loopback port and the store in a temporary directory; stdout and stderr go to a log
//! file there, printed when the test fails.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for the process to start listening or to exit.
pub const PROCESS_WAIT: Duration = Duration::from_secs(20);

pub struct TernProcess {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl TernProcess {
    /// A config on a free port and a fresh store directory; not started.
    pub fn new() -> TernProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
            l.local_addr().expect("local addr").port()
        };
        let config = format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n[storage]\ndir = \"{}\"\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("tern.toml"), config).expect("write config");
        TernProcess { dir, port, child: None }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tern.log")
    }

    /// Everything the process wrote so far, over all its runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process with `env` added (and no inherited `TERN__`, `NOTIFY_SOCKET` or
    /// `WATCHDOG_` variables); returns at once.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "tern already running");
        let log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open log");
        let err = log.try_clone().expect("clone log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("-c").arg(self.dir.path().join("tern.toml"));
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
    pub fn accepts(&self) -> bool {
        TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok()
    }

    /// Starts the process and waits until its port accepts connections.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        self.spawn(env);
        let t0 = Instant::now();
        while !self.accepts() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                self.child = None;
                panic!("tern exited during start-up with {status}");
            }
            assert!(t0.elapsed() < PROCESS_WAIT, "tern not accepting on {} after {PROCESS_WAIT:?}", self.addr());
            std::thread::sleep(Duration::from_millis(20));
        }
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
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                self.child = None;
                return status;
            }
            assert!(t0.elapsed() < PROCESS_WAIT, "tern still running after {PROCESS_WAIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and a clean exit.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        let status = self.wait_exit();
        assert!(status.success(), "tern exited with {status} after SIGTERM");
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- tern log ({}) -----\n{}\n----- end of tern log -----",
                self.log_path().display(),
                self.log()
            );
        }
    }
}
