//! The bench's client socket: plain TCP, or TLS (tokio-rustls) over TCP with `--tls-ca`.
//!
//! Scenarios only see [`Stream`], which is `AsyncRead + AsyncWrite`. On the TCP path each call
//! is one `match` in front of the `TcpStream` call: no extra copy, buffer or allocation. A TLS
//! stream buffers what it is given, so writers must `flush` after each batch
//! (`mqtt::Conn::flush` does).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::mqtt::timed_out;

/// Where and how to connect: the broker's address and, with `--tls-ca`, the TLS client
/// settings. Cheap to clone (the rustls config is shared).
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<TlsClient>,
}

#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("tls_server_name", &self.tls.as_ref().map(|t| t.name.to_str().into_owned()))
            .finish()
    }
}

impl TlsClient {
    /// A client trusting only the CA certificate(s) in the PEM file `ca`, expecting the
    /// broker's certificate to be valid for `server_name`. Uses the ring provider explicitly
    /// (no process-wide default). Session resumption is off unless `resume`, so every
    /// connection makes a full handshake.
    pub fn new(ca: &Path, server_name: &str, resume: bool) -> Result<TlsClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--tls-ca {}: no certificate in the file", ca.display()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("--tls-server-name {server_name}: {e}"))?;
        Ok(TlsClient { connector: TlsConnector::from(Arc::new(cfg)), name })
    }
}

pub enum Stream {
    Tcp(TcpStream),
    /// Boxed: a client TLS session is over a kilobyte, a `TcpStream` a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// TCP connect (TCP_NODELAY set) and, for a TLS endpoint, the TLS handshake.
    pub async fn connect(ep: &Endpoint, deadline: Instant) -> io::Result<Stream> {
        let tcp = timeout_at(deadline, TcpStream::connect(ep.addr)).await.map_err(|_| timed_out())??;
        tcp.set_nodelay(true)?;
        match &ep.tls {
            None => Ok(Stream::Tcp(tcp)),
            Some(t) => {
                let tls =
                    timeout_at(deadline, t.connector.connect(t.name.clone(), tcp)).await.map_err(|_| timed_out())??;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// "TLSv1_3/TLS13_AES_256_GCM_SHA384/X25519" for a TLS stream: what was negotiated.
    pub fn tls_info(&self) -> Option<String> {
        let Stream::Tls(s) = self else { return None };
        let c = s.get_ref().1;
        let v = c.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
        let suite = c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let group = c.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_default();
        Some(format!("{v}/{suite}/{group}"))
    }

    /// Whether this TLS connection resumed an earlier session (`--tls-resume`).
    pub fn tls_resumed(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            Stream::Tls(s) => s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            // A TcpStream has nothing to flush.
            Stream::Tcp(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The blocking counterpart of [`Stream`], for the latency scenario's plain threads: a
/// `std::net::TcpStream`, or rustls over one.
pub enum SyncStream {
    Tcp(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl SyncStream {
    /// TCP connect (TCP_NODELAY set) and, for a TLS endpoint, the whole TLS handshake, within
    /// `within`.
    pub fn connect(ep: &Endpoint, within: std::time::Duration) -> io::Result<SyncStream> {
        let mut s = std::net::TcpStream::connect_timeout(&ep.addr, within)?;
        s.set_nodelay(true)?;
        let Some(t) = &ep.tls else { return Ok(SyncStream::Tcp(s)) };
        let mut conn =
            rustls::ClientConnection::new(t.connector.config().clone(), t.name.clone()).map_err(io::Error::other)?;
        s.set_read_timeout(Some(within))?;
        s.set_write_timeout(Some(within))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut s)?;
        }
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        Ok(SyncStream::Tls(Box::new(rustls::StreamOwned::new(conn, s))))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &std::net::TcpStream {
        match self {
            SyncStream::Tcp(s) => s,
            SyncStream::Tls(s) => &s.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, SyncStream::Tls(_))
    }
}

impl std::io::Read for SyncStream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SyncStream::Tcp(s) => s.read(buf),
            SyncStream::Tls(s) => s.read(buf),
        }
    }
}

impl std::io::Write for SyncStream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SyncStream::Tcp(s) => s.write(buf),
            SyncStream::Tls(s) => s.write(buf),
        }
    }

    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SyncStream::Tcp(_) => Ok(()),
            SyncStream::Tls(s) => s.flush(),
        }
    }
}
