//! systemd's notification protocol, as config/tern.service (`Type=notify`) relies on it: the
//! test plays the service manager with a Unix datagram socket named in NOTIFY_SOCKET, starts
//! the built binary, and reads what it says: READY=1 only once the port accepts connections,
//! WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1
//! on SIGTERM. A socket that cannot be reached does not disturb tern.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::process::{TernProcess, PROCESS_WAIT};

/// The service manager's end: every datagram tern sends, one assignment per line.
struct Manager {
    socket: UnixDatagram,
    /// Every line received so far, in order.
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        Manager { socket: UnixDatagram::bind(path).expect("bind notify socket"), seen: Vec::new() }
    }

    /// The next datagram's lines, or None once `deadline` has passed.
    fn next(&mut self, deadline: Instant) -> Option<Vec<String>> {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        self.socket.set_read_timeout(Some(left)).expect("set timeout");
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let lines: Vec<String> = String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect();
                self.seen.extend(lines.iter().cloned());
                Some(lines)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Reads datagrams until one holds `line`; returns that datagram.
    fn expect(&mut self, line: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        while let Some(lines) = self.next(deadline) {
            if lines.iter().any(|l| l == line) {
                return lines;
            }
        }
        panic!("no {line} within {within:?}; received so far: {:?}", self.seen);
    }
}

#[test]
fn ready_after_the_port_accepts_then_watchdog_reload_and_stopping() {
    let mut tern = TernProcess::new();
    let path = tern.dir.path().join("notify.sock");
    let mut manager = Manager::bind(&path);
    let socket = path.to_str().expect("utf-8 path").to_owned();
    // 600 ms: tern pings every 300 ms.
    tern.spawn(&[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "600000")]);

    let ready = manager.expect("READY=1", PROCESS_WAIT);
    // READY=1 is sent once every listener is bound: the port accepts now, without a retry.
    assert!(tern.accepts(), "READY=1 arrived but 127.0.0.1:{} refused a connection", tern.port);
    let status = ready.iter().find(|l| l.starts_with("STATUS=")).expect("a STATUS line with READY=1");
    assert!(status.starts_with("STATUS=ready: ") && status.contains(&tern.addr().to_string()), "{status}");
    let before: Vec<&String> = manager.seen.iter().take_while(|l| *l != "READY=1").collect();
    assert!(
        before.iter().any(|l| l.starts_with("STATUS=recovering state from ")),
        "no recovery status before READY=1: {before:?}"
    );

    // Watchdog pings keep coming at about half of WATCHDOG_USEC.
    let t0 = Instant::now();
    manager.expect("WATCHDOG=1", Duration::from_secs(5));
    manager.expect("WATCHDOG=1", Duration::from_secs(5));
    manager.expect("WATCHDOG=1", Duration::from_secs(5));
    assert!(t0.elapsed() < Duration::from_secs(4), "three pings took {:?} at a 300 ms period", t0.elapsed());

    // SIGHUP: RELOADING=1, then READY=1 again once the files are read.
    tern.signal("HUP");
    let reloading = manager.expect("RELOADING=1", Duration::from_secs(5));
    assert!(reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    manager.expect("READY=1", Duration::from_secs(5));
    assert!(tern.accepts(), "not serving after a reload");

    tern.signal("TERM");
    let stopping = manager.expect("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.iter().any(|l| l.starts_with("STATUS=stopping")), "{stopping:?}");
    let status = tern.wait_exit();
    assert!(status.success(), "tern exited with {status} after SIGTERM");
}

#[test]
fn an_unreachable_notify_socket_is_harmless() {
    let mut tern = TernProcess::new();
    let nowhere = tern.dir.path().join("no-such.sock");
    let nowhere = nowhere.to_str().expect("utf-8 path").to_owned();
    tern.start(&[("NOTIFY_SOCKET", &nowhere), ("WATCHDOG_USEC", "200000")]);
    // Serving: a client connects and is answered.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut c = common::connect_v311(tern.addr(), "still-serving").await;
        c.ping().await;
    });
    tern.terminate();
    let log = tern.log();
    let warnings = log.matches("cannot notify systemd").count();
    assert_eq!(warnings, 1, "one warning for a socket that is not there, not one per ping:\n{log}");
}
