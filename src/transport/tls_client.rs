//! TLS for a bridge's connection to its peer broker: the client configuration, read from PEM
//! files once when the broker starts, and the client handshake over a connected TCP stream.
//!
//! As for listeners (`tls.rs`): the ring provider passed explicitly, TLS 1.2 and 1.3, errors
//! that name the file, the config key (`bridge[i].tls.ca_file`, ...) and the fix. Knows
//! nothing of MQTT.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{certificates, private_key, provider, TlsError};
use crate::config::{bridge_host, BridgeTls};

/// A bridge's TLS client configuration.
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    /// `server_name` when configured; otherwise each address's host is the name checked.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").field("server_name", &self.server_name).finish()
    }
}

impl TlsConnector {
    /// Reads the PEM files (blocking). `index` is the bridge's position, for error messages.
    pub fn new(settings: &BridgeTls, index: usize) -> Result<TlsConnector, TlsError> {
        let setting = |name: &str| format!("bridge[{index}].tls.{name}");
        let ca_setting = setting("ca_file");
        let mut roots = RootCertStore::empty();
        for cert in certificates(&settings.ca_file, &ca_setting)? {
            roots.add(cert).map_err(|e| TlsError::PeerCa {
                setting: ca_setting.clone(),
                path: settings.ca_file.clone(),
                message: e.to_string(),
            })?;
        }
        let provider = provider();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().map_err(|e| {
                TlsError::PeerCa { setting: ca_setting, path: settings.ca_file.clone(), message: e.to_string() }
            })?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::BridgeSetup { index, message: e.to_string() })?;
        let builder = if settings.insecure {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
        } else {
            builder.with_webpki_verifier(verifier)
        };
        let config = match (&settings.cert_file, &settings.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let (cert_setting, key_setting) = (setting("cert_file"), setting("key_file"));
                let chain = certificates(cert_path, &cert_setting)?;
                let key = private_key(key_path, &key_setting)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                        cert_setting: cert_setting.clone(),
                        cert_path: cert_path.clone(),
                        key_setting: key_setting.clone(),
                        key_path: key_path.clone(),
                    },
                    e => TlsError::UnusableKey {
                        cert_setting: cert_setting.clone(),
                        cert_path: cert_path.clone(),
                        key_setting: key_setting.clone(),
                        key_path: key_path.clone(),
                        message: e.to_string(),
                    },
                })?
            }
            // Validation refuses one without the other.
            _ => builder.with_no_client_auth(),
        };
        let server_name = match &settings.server_name {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| TlsError::BridgeSetup {
                index,
                message: format!("server_name `{n}`: {e}; set a DNS name or an IP address"),
            })?),
            None => None,
        };
        Ok(TlsConnector { config: Arc::new(config), server_name })
    }

    /// The client handshake over `tcp`, connected to `address` (`host:port`), whose host is
    /// the name checked unless `server_name` is set.
    pub async fn connect(&self, address: &str, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(bridge_host(address).to_string()).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no server name in `{address}`: {e}"))
            })?,
        };
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config)).connect(name, tcp).await
    }
}

/// `insecure = true`: the peer's chain must still lead to the CA, but the name in its
/// certificate is not checked (mosquitto's `bridge_insecure`).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The WebPKI verifier checks the chain (and revocation) first and the name last, so
        // a name error means everything else passed.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Tls;
    use crate::transport::tls::TlsAcceptor;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A CA and, signed by it, a server certificate for DNS `localhost` only, in a tempdir.
    struct Files {
        dir: tempfile::TempDir,
        server: Tls,
    }

    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca("bridge test ca");
        let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca_pem).unwrap();
        std::fs::write(dir.path().join("other-ca.crt"), ca("other ca").0).unwrap();
        std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        let server = Tls {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            client_ca: None,
            require_client_cert: false,
            use_identity_as_username: false,
            handshake_timeout_secs: 5,
        };
        Files { dir, server }
    }

    impl Files {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn settings(&self, ca: &str) -> BridgeTls {
            BridgeTls { ca_file: self.path(ca), cert_file: None, key_file: None, server_name: None, insecure: false }
        }
    }

    /// One handshake and a round trip of a few bytes to a TLS server using `f.server`,
    /// connecting as if to `address`.
    async fn handshake(f: &Files, settings: &BridgeTls, address: &str) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::new(&f.server, 0).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let (mut tls, _) = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await
        });
        let connector = TlsConnector::new(settings, 0).unwrap();
        let result = async {
            let mut tls = connector.connect(address, TcpStream::connect(addr).await?).await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            Ok(())
        }
        .await;
        server.abort();
        result
    }

    #[tokio::test]
    async fn the_name_is_the_address_host_or_server_name() {
        let f = files();
        let mut s = f.settings("ca.crt");
        handshake(&f, &s, "localhost:8883").await.unwrap();
        // The certificate has no IP address SAN.
        assert!(handshake(&f, &s, "127.0.0.1:8883").await.is_err());
        s.server_name = Some("localhost".into());
        handshake(&f, &s, "127.0.0.1:8883").await.unwrap();
    }

    #[tokio::test]
    async fn insecure_skips_the_name_but_not_the_chain() {
        let f = files();
        let mut s = f.settings("ca.crt");
        s.insecure = true;
        handshake(&f, &s, "127.0.0.1:8883").await.unwrap();
        handshake(&f, &s, "elsewhere.example:8883").await.unwrap();
        let mut other = f.settings("other-ca.crt");
        other.insecure = true;
        assert!(handshake(&f, &other, "localhost:8883").await.is_err(), "a certificate from another CA");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let f = files();
        let msg = TlsConnector::new(&f.settings("nope.crt"), 3).unwrap_err().to_string();
        assert!(msg.contains("nope.crt") && msg.contains("bridge[3].tls.ca_file"), "{msg}");
        let msg = TlsConnector::new(&f.settings("server.key"), 0).unwrap_err().to_string();
        assert!(msg.contains("server.key") && msg.contains("bridge[0].tls.ca_file"), "{msg}");

        let mut s = f.settings("ca.crt");
        s.cert_file = Some(f.path("server.crt"));
        s.key_file = Some(f.path("missing.key"));
        let msg = TlsConnector::new(&s, 1).unwrap_err().to_string();
        assert!(msg.contains("missing.key") && msg.contains("bridge[1].tls.key_file"), "{msg}");
        std::fs::write(f.path("other.key"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
        s.key_file = Some(f.path("other.key"));
        let err = TlsConnector::new(&s, 1).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        for part in ["other.key", "bridge[1].tls.key_file", "server.crt", "bridge[1].tls.cert_file"] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
        s.key_file = Some(f.path("server.key"));
        TlsConnector::new(&s, 1).unwrap();
    }
}
