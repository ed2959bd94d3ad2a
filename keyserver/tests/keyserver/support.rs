//! Keys of every kind, certificates for them, digests, and a protocol client.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use ztp_proto::keyless::{split, Header, Op, Request, Response, HEADER_LEN};
use ztp_tests::{TestCert, TestPki};

pub use ztp_tests::TempDir;

/// The kinds of key the server signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    P256,
    P384,
    Rsa2048,
    Ed25519,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::P256, Kind::P384, Kind::Rsa2048, Kind::Ed25519];

    /// How the server names the algorithm.
    pub fn algorithm(self) -> &'static str {
        match self {
            Kind::P256 => "ecdsa-p256",
            Kind::P384 => "ecdsa-p384",
            Kind::Rsa2048 => "rsa-2048",
            Kind::Ed25519 => "ed25519",
        }
    }
}

/// A key made for a test: PKCS#8 PEM, and the same key as rcgen's.
pub struct Made {
    pub pem: String,
    pub pair: KeyPair,
}

/// A fresh key (RSA: one per test binary, RSA key generation being slow).
pub fn generate(kind: Kind) -> Made {
    let pair = match kind {
        Kind::P256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        Kind::P384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
        Kind::Ed25519 => KeyPair::generate_for(&PKCS_ED25519).unwrap(),
        Kind::Rsa2048 => {
            static RSA: OnceLock<String> = OnceLock::new();
            let pem = RSA.get_or_init(|| {
                use rsa::pkcs8::EncodePrivateKey as _;
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
                key.to_pkcs8_pem(Default::default()).unwrap().to_string()
            });
            KeyPair::from_pem(pem).unwrap()
        }
    };
    Made {
        pem: pair.serialize_pem(),
        pair,
    }
}

/// A self-signed certificate for the key, DER.
pub fn self_signed_cert(made: &Made) -> Vec<u8> {
    rcgen::CertificateParams::new(vec!["k.test".into()])
        .unwrap()
        .self_signed(&made.pair)
        .unwrap()
        .der()
        .to_vec()
}

/// The public key as ring's verifiers take it.
pub fn ring_public_key(made: &Made) -> Vec<u8> {
    made.pair.public_key_raw().to_vec()
}

/// What a client sends for `op` to have `message` signed: its digest, or the message.
pub fn payload(op: Op, message: &[u8]) -> Vec<u8> {
    match op {
        Op::EcdsaSha256 | Op::RsaPssSha256 => Sha256::digest(message).to_vec(),
        Op::EcdsaSha384 | Op::RsaPssSha384 => Sha384::digest(message).to_vec(),
        Op::RsaPssSha512 => Sha512::digest(message).to_vec(),
        Op::Ed25519 | Op::Ping => message.to_vec(),
    }
}

/// `der` as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &b)| a | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `DIR/NAME.key` (mode 0600) and, with `nodes`, `DIR/NAME.nodes`.
pub fn write_key(dir: &Path, name: &str, pem: &str, nodes: Option<&str>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(format!("{name}.key")))
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
    if let Some(nodes) = nodes {
        std::fs::write(dir.join(format!("{name}.nodes")), nodes).unwrap();
    }
}

/// The key id of a key made here.
pub fn id_of(made: &Made) -> [u8; 32] {
    ztp_keyserver::keys::Key::from_pem("k", made.pem.as_bytes())
        .unwrap()
        .id
}

/// A signing request.
pub fn request(id: u32, op: Op, key: [u8; 32], payload: Vec<u8>) -> Request {
    Request {
        id,
        op,
        key_id: Some(key),
        sni: Some("app.svc.internal".into()),
        client_ip: Some("192.0.2.7".parse().unwrap()),
        payload,
    }
}

/// A ping.
pub fn ping(id: u32, data: &[u8]) -> Request {
    Request {
        id,
        op: Op::Ping,
        key_id: None,
        sni: None,
        client_ip: None,
        payload: data.to_vec(),
    }
}

/// A keyless client over TLS 1.3 with a client certificate.
pub struct Client {
    tls: TlsStream<tokio::net::TcpStream>,
}

impl Client {
    /// Connects to `addr` as `cert`, trusting `pki`'s CA for `localhost`.
    pub async fn connect(addr: SocketAddr, pki: &TestPki, cert: &TestCert) -> Client {
        ztp_tests::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
                .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        Client { tls }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    pub async fn send(&mut self, req: &Request) {
        self.send_raw(&req.encode().unwrap()).await;
    }

    /// The next answer; `Err` if the connection ends or fails first.
    pub async fn try_recv(&mut self) -> std::io::Result<Response> {
        let mut head = [0u8; HEADER_LEN];
        self.tls.read_exact(&mut head).await?;
        let h = Header::parse(&head);
        let mut msg = head.to_vec();
        msg.resize(HEADER_LEN + h.len as usize, 0);
        self.tls.read_exact(&mut msg[HEADER_LEN..]).await?;
        let (h, body) = split(&msg).unwrap();
        Response::decode(&h, &msg[body])
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    pub async fn recv(&mut self) -> Response {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.try_recv())
            .await
            .expect("an answer within 20 s")
            .expect("an answer")
    }

    /// Sends `req` and reads one answer.
    pub async fn call(&mut self, req: &Request) -> Response {
        self.send(req).await;
        self.recv().await
    }
}
