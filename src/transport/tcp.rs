//! TCP specifics: binding a listener with a deep accept queue, reading a client's first bytes
//! without a trip through the event loop, and sizing the process's descriptor table before
//! connections arrive.
//!
//! Listeners do not defer accepting (no TCP_DEFER_ACCEPT), on purpose: every connection whose
//! handshake completes is accepted at once, and one that never sends CONNECT is closed by
//! tern after `limits.connect_timeout_secs`, so its client always learns that it is closed.
//! With deferred accept, a connection that has sent nothing waits in the kernel's queue of
//! half-accepted requests, where tern cannot see it. When that queue is past half the listen
//! backlog, Linux prunes it: a request whose deferral has run out is dropped without a word
//! (no RST), and its client, for which the handshake completed, holds a connection that leads
//! nowhere until it sends something. Measured (tests/idle_sockets.rs): of 2,000 connections
//! that never sent a byte, 129 were never closed with deferral and a 4 s connect timeout (the
//! same with the default 10 s), none without it. What deferral saved, a task per silent
//! connection until its timeout, is not worth that, and the connection rate did not drop
//! (bench/README.md, "Churn and silent connections").

use std::io::{self, Read};

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::info;

/// Bytes offered to a new connection's first read: a typical CONNECT fits.
const FIRST_READ: usize = 1024;

/// Connections the kernel may hold completed but not yet accepted (Linux caps it at
/// `net.core.somaxconn`, 4096 by default). Why not the standard library's 128: a burst of
/// clients connecting at once (a fleet reconnecting after an outage) overflows a short queue,
/// and a connection whose last handshake packet finds the queue full is left to the kernel's
/// retransmits, or to SYN cookies, which forget it: its client may then wait on a connection
/// tern never saw.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket on `bind` (an address; the first of its resolutions that can be
/// bound) with `LISTEN_BACKLOG`, and `SO_REUSEADDR` as `TcpListener::bind` sets it, so a
/// restarted broker can listen again at once.
pub async fn listen(bind: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(bind).await? {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        let bound =
            socket.set_reuseaddr(true).and_then(|()| socket.bind(addr)).and_then(|()| socket.listen(LISTEN_BACKLOG));
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing")))
}

/// The client's first bytes, read straight from the socket. tokio learns that a new socket
/// is readable only from its next poll of the kernel; a client sends its CONNECT right behind
/// the handshake's last packet, so it is often here by the time the connection is accepted,
/// and reading it now saves that round. When nothing is here yet (or the read fails), the
/// buffer is empty and the connection's first ordinary read waits for the bytes (or reports
/// the error again).
pub fn early_read(stream: &TcpStream) -> BytesMut {
    let mut buf = BytesMut::zeroed(FIRST_READ);
    let sock = socket2::SockRef::from(stream);
    match (&*sock).read(&mut buf) {
        Ok(n) => buf.truncate(n),
        // WouldBlock (nothing yet) or an error the next read will report again.
        Err(_) => buf.clear(),
    }
    buf
}

/// Makes room for `connections` sockets before any thread but the caller's exists: raises
/// the soft open-file limit towards the hard one, and grows the descriptor table once.
///
/// Why: Linux grows a process's descriptor table by doubling, and in a multi-threaded
/// process each growth waits for an RCU grace period (`expand_files` → `synchronize_rcu`),
/// 8-20 ms during which `accept` blocks the whole runtime thread. Growing it here, while
/// the process has one thread, costs nothing; measured, it removed stalls at 128, 256 …
/// 8192 connections that held 64 connecting clients for 8-20 ms each.
#[allow(unsafe_code)]
pub fn prepare_descriptors(connections: usize) {
    // Sockets, plus listeners, the store's files and stdio.
    let wanted = (connections as u64).saturating_add(256);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the struct we pass, which is live and of
    // the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < wanted && lim.rlim_max > lim.rlim_cur {
        let raised = libc::rlimit { rlim_cur: wanted.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur < wanted {
        info!(
            limit = lim.rlim_cur,
            "the open-file limit allows fewer connections than limits.max_connections; `ulimit -n` raises it"
        );
    }
    // The table only needs to cover what the limit allows; past 64k entries, the few
    // doublings left cost less than the memory of a huge table up front.
    let top = wanted.min(lim.rlim_cur).min(65_536);
    let Ok(top) = libc::c_int::try_from(top.saturating_sub(1)) else { return };
    if top < 64 {
        return;
    }
    // SAFETY: F_DUPFD duplicates descriptor 2 (stderr, or nothing: then it fails and we stop)
    // to the lowest free number >= `top`, which makes the kernel size the table to cover
    // `top`. The new descriptor is ours alone and closed at once; no Rust object owns it.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, top) };
    if fd >= 0 {
        // SAFETY: `fd` was just created above and nothing else refers to it.
        unsafe { libc::close(fd) };
    }
}
