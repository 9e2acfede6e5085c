//! TLS for the secured-cluster tests: certificates made in the test (a CA, a broker certificate
//! it signs for `127.0.0.1` and `localhost`, and an unrelated CA), and a TLS-terminating proxy
//! in front of a plaintext broker (tansu 0.6.0 cannot serve TLS itself: its `--cert` and
//! `--key` flags exclude each other). The broker advertises the proxy's port, so every
//! connection a client makes goes through a real TLS handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Certificate files written in a directory.
pub struct Pki {
    /// PEM of the CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM of a CA that signed nothing the broker shows.
    pub other_ca_file: PathBuf,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn authority(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert, key)
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let (ca, ca_key) = authority("logbridge test CA");
        let (other, _) = authority("some other CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "tansu behind a TLS proxy");
        let server = params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let ca_file = dir.join("ca.pem");
        let other_ca_file = dir.join("other-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        std::fs::write(&other_ca_file, other.pem()).expect("write other CA");
        Pki {
            ca_file,
            other_ca_file,
            server_cert: server.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server TLS config");
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Accepts TLS on `port` and relays each connection in plaintext to `upstream` (both on
/// loopback), until dropped. Counts handshakes that failed.
pub struct TlsProxy {
    task: tokio::task::JoinHandle<()>,
    pub failed_handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsProxy {
    pub async fn start(port: u16, upstream: u16, pki: &Pki) -> TlsProxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy port free");
        let acceptor = pki.acceptor();
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed_handshakes = failed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let failed = failed.clone();
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(client).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                    };
                    let Ok(mut broker) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        });
        TlsProxy {
            task,
            failed_handshakes,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
