//! TLS for a listener: the server configuration read from PEM files, swapped atomically on
//! reload, and the handshake of one accepted connection under a deadline.
//!
//! Always the ring provider, passed explicitly: a process-wide default provider depends on
//! which crates happen to be linked (and on install order), and a broker must not change its
//! cipher suites because a dependency changed its features.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::Tls;

/// Why a TLS listener's files could not be turned into a server configuration. Each message
/// names the file, the config key that points at it, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read `{}` (config key {setting}): {source}; check the path and the file's permissions", path.display())]
    Read { setting: String, path: PathBuf, source: std::io::Error },
    #[error(
        "`{}` (config key {setting}) is not valid PEM: {message}; the file must hold \
         `-----BEGIN ...-----` / `-----END ...-----` blocks",
        path.display()
    )]
    Pem { setting: String, path: PathBuf, message: String },
    #[error(
        "`{}` (config key {setting}) holds no CERTIFICATE block; point it at the PEM certificate \
         chain (`-----BEGIN CERTIFICATE-----`, leaf first)",
        path.display()
    )]
    NoCertificate { setting: String, path: PathBuf },
    #[error(
        "`{}` (config key {setting}) holds no private key; point it at a PEM file with a `PRIVATE KEY`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block",
        path.display()
    )]
    NoKey { setting: String, path: PathBuf },
    #[error(
        "the private key in `{}` (config key {key_setting}) does not belong to the certificate in `{}` \
         (config key {cert_setting}); use the key the certificate was issued for, or the matching certificate",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch { cert_setting: String, cert_path: PathBuf, key_setting: String, key_path: PathBuf },
    #[error(
        "the private key in `{}` (config key {key_setting}) cannot be used with the certificate in `{}` \
         (config key {cert_setting}): {message}; use an RSA, ECDSA (P-256, P-384) or Ed25519 key and \
         its certificate",
        key_path.display(),
        cert_path.display()
    )]
    UnusableKey { cert_setting: String, cert_path: PathBuf, key_setting: String, key_path: PathBuf, message: String },
    #[error(
        "`{}` (config key {setting}) holds no usable CA certificate: {message}; point it at the PEM \
         certificate of the CA that signs client certificates",
        path.display()
    )]
    ClientCa { setting: String, path: PathBuf, message: String },
    #[error(
        "`{}` (config key {setting}) holds no usable CA certificate: {message}; point it at the PEM \
         certificate of the CA that signs the peer broker's certificate",
        path.display()
    )]
    PeerCa { setting: String, path: PathBuf, message: String },
    /// The provider refused the protocol versions; only possible if the build lost TLS 1.2/1.3.
    #[error("listener[{index}].tls: {message}")]
    Setup { index: usize, message: String },
    /// The same for a bridge's client configuration.
    #[error("bridge[{index}].tls: {message}")]
    BridgeSetup { index: usize, message: String },
}

/// A TLS listener's server configuration, replaceable at run time (SIGHUP) without touching
/// connections already established.
pub struct TlsAcceptor {
    settings: Tls,
    index: usize,
    handshake_timeout: Duration,
    /// Each handshake takes the configuration current when it starts; a reload only affects
    /// handshakes that start after it.
    current: ArcSwap<ServerConfig>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").field("index", &self.index).field("settings", &self.settings).finish()
    }
}

impl TlsAcceptor {
    /// Reads the PEM files (blocking). `index` is the listener's position, for error messages.
    pub fn new(settings: &Tls, index: usize) -> Result<TlsAcceptor, TlsError> {
        let config = build(settings, index)?;
        Ok(TlsAcceptor {
            settings: settings.clone(),
            index,
            // Validation refuses 0; should one slip through, a zero deadline would refuse every client.
            handshake_timeout: Duration::from_secs(settings.handshake_timeout_secs.max(1)),
            current: ArcSwap::from(config),
        })
    }

    /// Reads the files again (blocking); on error the current configuration stays and the
    /// error is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.settings, self.index)?;
        self.current.store(config);
        Ok(())
    }

    /// Runs the server handshake on an accepted TCP stream within `handshake_timeout_secs`.
    /// Returns the stream and, when the client presented a verified certificate, its subject CN.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<(TlsStream<TcpStream>, Option<Arc<str>>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let stream = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS handshake not finished within {} s", self.handshake_timeout.as_secs()),
                ))
            }
        };
        // rustls only keeps a client chain it verified, so a certificate here is trusted.
        let cn =
            stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).and_then(|leaf| common_name(leaf));
        Ok((stream, cn))
    }
}

/// The first CN of a certificate's subject, when it is a text string type.
fn common_name(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(cn))
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn setting(index: usize, name: &str) -> String {
    format!("listener[{index}].tls.{name}")
}

/// Reads a whole file up front, so a missing file and a file with bad contents give different
/// errors.
fn read(path: &Path, setting: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { setting: setting.into(), path: path.into(), source })
}

pub(super) fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, setting)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
        setting: setting.into(),
        path: path.into(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { setting: setting.into(), path: path.into() });
    }
    Ok(certs)
}

pub(super) fn private_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, setting)?;
    // Takes the first key of any of the three encodings; other blocks (a certificate kept in
    // the same file, EC PARAMETERS) are skipped.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { setting: setting.into(), path: path.into() },
        e => TlsError::Pem { setting: setting.into(), path: path.into(), message: e.to_string() },
    })
}

fn build(settings: &Tls, index: usize) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_setting = setting(index, "cert");
    let key_setting = setting(index, "key");
    let chain = certificates(&settings.cert, &cert_setting)?;
    let key = private_key(&settings.key, &key_setting)?;
    let provider = provider();

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup { index, message: e.to_string() })?;
    let builder = match &settings.client_ca {
        Some(ca_path) => {
            let ca_setting = setting(index, "client_ca");
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_path, &ca_setting)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    setting: ca_setting.clone(),
                    path: ca_path.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            // Without require_client_cert a client may come without a certificate (and log in
            // by password); one it does send must still verify.
            let verifier = if settings.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                setting: ca_setting,
                path: ca_path.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert_setting: cert_setting.clone(),
            cert_path: settings.cert.clone(),
            key_setting: key_setting.clone(),
            key_path: settings.key.clone(),
        },
        e => TlsError::UnusableKey {
            cert_setting: cert_setting.clone(),
            cert_path: settings.cert.clone(),
            key_setting: key_setting.clone(),
            key_path: settings.key.clone(),
            message: e.to_string(),
        },
    })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf signed by `ca`: (certificate PEM, key PEM).
    fn leaf(ca: &Ca, cn: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct Files {
        dir: tempfile::TempDir,
        ca: Ca,
        settings: Tls,
    }

    impl Files {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.path(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    /// A CA, a server certificate and key in a tempdir, and settings using them.
    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("test ca");
        let (cert, key) = leaf(&ca, "server", ExtendedKeyUsagePurpose::ServerAuth);
        let mut f = Files {
            dir,
            ca,
            settings: Tls {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                client_ca: None,
                require_client_cert: false,
                use_identity_as_username: false,
                handshake_timeout_secs: 5,
            },
        };
        f.write("ca.crt", &f.ca.pem.clone());
        f.settings.cert = f.write("server.crt", &cert);
        f.settings.key = f.write("server.key", &key);
        f
    }

    fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    /// One handshake against `acceptor`: the server's leaf certificate as the client saw it,
    /// and the CN the server reported; after a round trip of a few bytes.
    async fn handshake(
        acceptor: Arc<TlsAcceptor>,
        client: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<(CertificateDer<'static>, Option<Arc<str>>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let (mut tls, cn) = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            std::io::Result::Ok(cn)
        });
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        let read = tls.read_exact(&mut buf).await;
        let cn = server.await.unwrap()?;
        read?;
        assert_eq!(&buf, b"ping");
        Ok((leaf, cn))
    }

    fn message(err: TlsError) -> String {
        err.to_string()
    }

    #[test]
    fn missing_cert_file_names_path_and_key() {
        let mut f = files();
        f.settings.cert = f.path("nope.crt");
        let msg = message(TlsAcceptor::new(&f.settings, 2).unwrap_err());
        assert!(msg.contains("nope.crt"), "{msg}");
        assert!(msg.contains("listener[2].tls.cert"), "{msg}");
    }

    #[test]
    fn cert_file_without_certificate_names_path_and_key() {
        let mut f = files();
        let key = std::fs::read_to_string(&f.settings.key).unwrap();
        f.settings.cert = f.write("key-only.crt", &key);
        let err = TlsAcceptor::new(&f.settings, 0).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        let msg = message(err);
        assert!(msg.contains("key-only.crt") && msg.contains("listener[0].tls.cert"), "{msg}");
    }

    #[test]
    fn key_file_without_key_names_path_and_key() {
        let mut f = files();
        f.settings.key = f.write("empty.key", "");
        let err = TlsAcceptor::new(&f.settings, 0).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
        let msg = message(err);
        assert!(msg.contains("empty.key") && msg.contains("listener[0].tls.key"), "{msg}");
    }

    #[test]
    fn mismatched_key_names_both_files() {
        let mut f = files();
        f.settings.key = f.write("other.key", &KeyPair::generate().unwrap().serialize_pem());
        let err = TlsAcceptor::new(&f.settings, 1).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = message(err);
        for part in ["other.key", "listener[1].tls.key", "server.crt", "listener[1].tls.cert"] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
    }

    #[test]
    fn missing_client_ca_names_path_and_key() {
        let mut f = files();
        f.settings.client_ca = Some(f.path("no-ca.crt"));
        f.settings.require_client_cert = true;
        let msg = message(TlsAcceptor::new(&f.settings, 0).unwrap_err());
        assert!(msg.contains("no-ca.crt") && msg.contains("listener[0].tls.client_ca"), "{msg}");
    }

    #[tokio::test]
    async fn plain_handshake_reports_no_identity() {
        let f = files();
        let acceptor = Arc::new(TlsAcceptor::new(&f.settings, 0).unwrap());
        let (_, cn) = handshake(acceptor, client_config(&f.ca.pem, None)).await.unwrap();
        assert_eq!(cn, None);
    }

    #[tokio::test]
    async fn client_certificate_cn_is_reported() {
        let mut f = files();
        f.settings.client_ca = Some(f.path("ca.crt"));
        f.settings.require_client_cert = true;
        let acceptor = Arc::new(TlsAcceptor::new(&f.settings, 0).unwrap());
        let (cert, key) = leaf(&f.ca, "sensor-17", ExtendedKeyUsagePurpose::ClientAuth);
        let (_, cn) = handshake(acceptor.clone(), client_config(&f.ca.pem, Some((&cert, &key)))).await.unwrap();
        assert_eq!(cn.as_deref(), Some("sensor-17"));

        // Required: a client without a certificate does not get in.
        assert!(handshake(acceptor.clone(), client_config(&f.ca.pem, None)).await.is_err());
        // Nor does one whose certificate comes from another CA.
        let other = ca("other ca");
        let (cert, key) = leaf(&other, "intruder", ExtendedKeyUsagePurpose::ClientAuth);
        assert!(handshake(acceptor, client_config(&f.ca.pem, Some((&cert, &key)))).await.is_err());
    }

    #[tokio::test]
    async fn optional_client_certificate_is_still_verified() {
        let mut f = files();
        f.settings.client_ca = Some(f.path("ca.crt"));
        let acceptor = Arc::new(TlsAcceptor::new(&f.settings, 0).unwrap());
        let (_, cn) = handshake(acceptor.clone(), client_config(&f.ca.pem, None)).await.unwrap();
        assert_eq!(cn, None);
        let (cert, key) = leaf(&f.ca, "optional", ExtendedKeyUsagePurpose::ClientAuth);
        let (_, cn) = handshake(acceptor.clone(), client_config(&f.ca.pem, Some((&cert, &key)))).await.unwrap();
        assert_eq!(cn.as_deref(), Some("optional"));
        let other = ca("other ca");
        let (cert, key) = leaf(&other, "intruder", ExtendedKeyUsagePurpose::ClientAuth);
        assert!(handshake(acceptor, client_config(&f.ca.pem, Some((&cert, &key)))).await.is_err());
    }

    #[tokio::test]
    async fn failed_reload_keeps_the_old_configuration() {
        let f = files();
        let acceptor = Arc::new(TlsAcceptor::new(&f.settings, 0).unwrap());
        let (before, _) = handshake(acceptor.clone(), client_config(&f.ca.pem, None)).await.unwrap();

        f.write("server.crt", "not a certificate\n");
        let err = acceptor.reload().unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(message(err).contains("server.crt"));

        let (after, _) = handshake(acceptor, client_config(&f.ca.pem, None)).await.unwrap();
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn reload_presents_the_new_certificate() {
        let f = files();
        let acceptor = Arc::new(TlsAcceptor::new(&f.settings, 0).unwrap());
        let (before, _) = handshake(acceptor.clone(), client_config(&f.ca.pem, None)).await.unwrap();

        let (cert, key) = leaf(&f.ca, "server, renewed", ExtendedKeyUsagePurpose::ServerAuth);
        f.write("server.crt", &cert);
        f.write("server.key", &key);
        acceptor.reload().unwrap();

        let (after, _) = handshake(acceptor, client_config(&f.ca.pem, None)).await.unwrap();
        assert_ne!(before, after);
        assert_eq!(after, CertificateDer::from_pem_slice(cert.as_bytes()).unwrap());
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let mut f = files();
        f.settings.handshake_timeout_secs = 1;
        let acceptor = TlsAcceptor::new(&f.settings, 0).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = acceptor.accept(tcp).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
