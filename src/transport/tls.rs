//! TEMPORARY STUB, replaced by the real module.
use std::sync::Arc;
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("tls not built")]
    Stub,
}
pub struct TlsAcceptor;
impl TlsAcceptor {
    pub fn new(_settings: &crate::config::Tls, _index: usize) -> Result<TlsAcceptor, TlsError> {
        Err(TlsError::Stub)
    }
    pub fn reload(&self) -> Result<(), TlsError> {
        Err(TlsError::Stub)
    }
    pub async fn accept(
        &self,
        _tcp: tokio::net::TcpStream,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Option<Arc<str>>)> {
        Err(std::io::Error::other("stub"))
    }
}
