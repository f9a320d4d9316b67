//! A throwaway PKI for TLS tests: a CA, a server certificate for `localhost` and 127.0.0.1,
//! client certificates on demand, and client configurations that trust the CA.
//!
//! Everything uses the ring provider explicitly, like the broker, so no test depends on a
//! process-default provider being installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    /// Numbers the files of issued client certificates, so a CN never has to be a file name.
    issued: AtomicUsize,
}

/// A self-signed CA named `name`: its certificate PEM and the issuer that signs with it.
fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

/// A client certificate with subject CN `cn` signed by `issuer`: (certificate PEM, key PEM).
fn new_client(issuer: &Issuer<'static, KeyPair>, cn: &str) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("client key");
    let cert = params.signed_by(&key, issuer).expect("client certificate");
    (cert.pem(), key.serialize_pem())
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

impl TestPki {
    /// A CA and a server certificate for DNS `localhost` and IP 127.0.0.1 signed by it, written
    /// as ca.crt, server.crt and server.key in a fresh tempdir.
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, ca) = new_ca("tern test CA");

        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server certificate");

        std::fs::write(dir.path().join("ca.crt"), &ca_pem).expect("write ca.crt");
        std::fs::write(dir.path().join("server.crt"), cert.pem()).expect("write server.crt");
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).expect("write server.key");
        TestPki { dir, ca_pem, ca, issued: AtomicUsize::new(0) }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// A client certificate signed by this CA with subject CN `cn`; returns (cert path, key
    /// path) written in dir.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = new_client(&self.ca, cn);
        self.write_client(&cert, &key)
    }

    /// Same from a different, unrelated CA (for "refused with a certificate from another CA").
    pub fn foreign_client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (_, foreign) = new_ca("unrelated test CA");
        let (cert, key) = new_client(&foreign, cn);
        self.write_client(&cert, &key)
    }

    fn write_client(&self, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("client-{n}.crt"));
        let key_path = self.dir.path().join(format!("client-{n}.key"));
        std::fs::write(&cert_path, cert).expect("write client certificate");
        std::fs::write(&key_path, key).expect("write client key");
        (cert_path, key_path)
    }

    /// `tern::config::Tls` for a listener with a server certificate for DNS `name` only (no
    /// IP address SAN) signed by this CA.
    pub fn server_tls_for(&self, name: &str) -> tern::config::Tls {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.ca).expect("server certificate");
        let cert_path = self.dir.path().join(format!("server-{name}.crt"));
        let key_path = self.dir.path().join(format!("server-{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write server certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write server key");
        tern::config::Tls { cert: cert_path, key: key_path, ..self.server_tls() }
    }

    /// `tern::config::Tls` for a listener using these files (no client auth).
    pub fn server_tls(&self) -> tern::config::Tls {
        tern::config::Tls {
            cert: self.server_cert_path(),
            key: self.server_key_path(),
            client_ca: None,
            require_client_cert: false,
            use_identity_as_username: false,
            handshake_timeout_secs: 10,
        }
    }

    /// rustls ClientConfig trusting the CA, with an optional client certificate (paths from
    /// above), ring provider.
    pub fn client_config(&self, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("CA PEM")).expect("CA as root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("TLS versions")
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .expect("client certificate file")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate PEM");
                let key = PrivateKeyDer::from_pem_file(key).expect("client key PEM");
                builder.with_client_auth_cert(chain, key).expect("client certificate and key")
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// TCP connect + TLS handshake for server name "localhost".
///
/// With TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so a refused certificate shows up as an error on the first read, not here.
pub async fn connect_tls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg).connect(ServerName::try_from("localhost").expect("server name"), tcp).await
}

/// rumqttc transport for a ClientConfig (TlsConfiguration::Rustls).
pub fn rumqttc_transport(cfg: Arc<rustls::ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg))
}
