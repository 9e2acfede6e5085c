//! TLS for the tests: certificates made in the test, written as PEM files. A CA signs a server
//! certificate for `127.0.0.1` and `localhost` (the broker's, in a PEM keystore Apache Kafka
//! reads, see [`crate::common::apache::Options::tls`]) and a client certificate for mutual
//! TLS; an unrelated CA signs nothing the server shows, and a client certificate of its own.
//! Also a TLS-terminating relay in front of a plaintext server on loopback, for the HTTPS
//! endpoint of the HTTP sink tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The common name of the client certificate the CA signed: the broker maps it to the
/// principal `User:carol`.
pub const CLIENT_NAME: &str = "carol";

/// Certificate files written in a directory.
pub struct Pki {
    /// PEM of the CA that signed the server's and the client's certificates.
    pub ca_file: PathBuf,
    /// PEM of a CA that signed nothing the server shows.
    pub other_ca_file: PathBuf,
    /// The server's unencrypted PKCS#8 private key, its certificate and the CA's certificate,
    /// in one PEM file (a broker's `ssl.keystore.type=PEM` keystore).
    pub keystore_file: PathBuf,
    /// PEM client certificate for [`CLIENT_NAME`], signed by the CA, and its key.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    /// PEM client certificate (common name `mallory`) signed by the other CA, and its key.
    pub stranger_cert_file: PathBuf,
    pub stranger_key_file: PathBuf,
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

/// A certificate with `common_name` (and `names` as subject alternative names) signed by
/// `issuer`, with its new key.
fn signed(
    common_name: &str,
    names: &[&str],
    issuer: &(rcgen::Certificate, KeyPair),
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("certificate params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let cert = params
        .signed_by(&key, &issuer.0, &issuer.1)
        .expect("signed certificate");
    (cert, key)
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let ca = authority("logbridge test CA");
        let other = authority("some other CA");
        let (server, server_key) =
            signed("logbridge test server", &["127.0.0.1", "localhost"], &ca);
        let (client, client_key) = signed(CLIENT_NAME, &[], &ca);
        let (stranger, stranger_key) = signed("mallory", &[], &other);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap_or_else(|err| panic!("write {name}: {err}"));
            path
        };
        Pki {
            ca_file: write("ca.pem", ca.0.pem()),
            other_ca_file: write("other-ca.pem", other.0.pem()),
            keystore_file: write(
                "server-keystore.pem",
                format!(
                    "{}{}{}",
                    server_key.serialize_pem(),
                    server.pem(),
                    ca.0.pem()
                ),
            ),
            client_cert_file: write("client.pem", client.pem()),
            client_key_file: write("client.key", client_key.serialize_pem()),
            stranger_cert_file: write("stranger.pem", stranger.pem()),
            stranger_key_file: write("stranger.key", stranger_key.serialize_pem()),
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

/// Accepts TLS on a loopback port of its own and relays each connection in plaintext to
/// `upstream` (on loopback), until dropped. Counts handshakes that failed.
pub struct TlsProxy {
    task: tokio::task::JoinHandle<()>,
    /// The port it accepts TLS on.
    pub port: u16,
    pub failed_handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl TlsProxy {
    pub async fn start(upstream: u16, pki: &Pki) -> TlsProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("proxy address").port();
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
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsProxy {
            task,
            port,
            failed_handshakes,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        // The accept loop never ends by itself: ended, it panicked (and only printed so).
        let ended = self.task.is_finished();
        self.task.abort();
        if ended && !std::thread::panicking() {
            panic!("the TLS proxy's accept loop panicked");
        }
    }
}
