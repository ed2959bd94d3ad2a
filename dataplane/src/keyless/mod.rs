//! Keyless: the server certificate stays local, its private key on key servers
//! (DESIGN.md "Keyless"). The key enters rustls as a [`RemoteKey`], a
//! [`SigningKey`](rustls::sign::SigningKey) whose signer sends what must be signed to a
//! key server of the [`pool`] and waits for the signature.
//!
//! rustls signs synchronously while it processes the ClientHello, so the wait happens
//! on whatever thread runs that step: the TCP path runs it on tokio's blocking pool
//! (`tls::complete` with `offload`); elsewhere (QUIC, whose handshakes run inside
//! quinn's tasks) the signer hands its worker's other tasks to another thread for the
//! wait (`tokio::task::block_in_place`). Either way no async worker stalls on a
//! signature, and every wait is bounded by [`SIGN_DEADLINE`] (a key server that stops
//! reading can add one socket write timeout, 1 s, before its connection is dropped).

pub mod pool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use ztp_proto::keyless::Op;

pub use pool::{Pool, ServerAddr, SignError};

/// Time one signature may take, hedges and retries included.
pub const SIGN_DEADLINE: Duration = Duration::from_secs(2);

/// The default port of a key server.
pub const DEFAULT_PORT: u16 = 2407;

/// `--key keyless://…` and the node's identity towards the key servers.
#[derive(Debug, Clone)]
pub struct KeylessFiles {
    pub servers: Vec<ServerAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Parses `keyless://HOST:PORT[,HOST:PORT…]` (the port defaults to 2407; IPv6 in
/// brackets); `None` when `value` is not a keyless URL at all (a key file).
pub fn parse_url(value: &str) -> Option<Result<Vec<ServerAddr>, String>> {
    let list = value.strip_prefix("keyless://")?;
    let parse = |entry: &str| -> Result<ServerAddr, String> {
        let entry = entry.trim();
        let bad =
            || format!("--key: {entry:?} is not HOST:PORT (keyless://HOST:PORT[,HOST:PORT…])");
        if entry.is_empty() {
            return Err("--key: an empty entry in the keyless:// list".into());
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (h, rest) = rest.split_once(']').ok_or_else(bad)?;
            match rest.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if rest.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else {
            match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad()),
                None => (entry, None),
            }
        };
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        if host.is_empty() || rustls::pki_types::ServerName::try_from(host.to_owned()).is_err() {
            return Err(bad());
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    };
    let mut out: Vec<ServerAddr> = Vec::new();
    for entry in list.split(',') {
        match parse(entry) {
            Ok(a) if out.contains(&a) => return Some(Err(format!("--key: {a} is listed twice"))),
            Ok(a) => out.push(a),
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(out))
}

/// The TLS client config towards the key servers: TLS 1.3, their certificates checked
/// against `ca`, the node's certificate as the client's.
pub fn client_config(
    files: &KeylessFiles,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, ztp_infra::tls::TlsError> {
    let certified = ztp_infra::tls::certified_key(&files.cert, &files.key, provider)?;
    let roots = ztp_infra::tls::read_roots(&files.ca)?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ztp_infra::tls::TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// The algorithm of a certificate's key, as the key server signs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa,
    Ed25519,
}

/// A server key held by the key servers: the certificate's public key (for the key id)
/// and the pool.
#[derive(Debug, Clone)]
pub struct RemoteKey {
    pool: Arc<Pool>,
    key_id: [u8; 32],
    kind: KeyKind,
    spki: Vec<u8>,
    /// The handshake's SNI, for the key server's log (see [`RemoteKey::for_sni`]).
    sni: Option<String>,
}

impl RemoteKey {
    /// The key of `leaf` (DER), signed for by `pool`. Refuses a key type the protocol
    /// cannot sign with.
    pub fn new(leaf: &CertificateDer<'_>, pool: Arc<Pool>) -> Result<RemoteKey, String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|e| format!("the server certificate does not parse: {e}"))?;
        let spki = &cert.tbs_certificate.subject_pki;
        let alg = spki.algorithm.algorithm.to_id_string();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let kind = match (alg.as_str(), curve.as_deref()) {
            ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => KeyKind::EcdsaP256,
            ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => KeyKind::EcdsaP384,
            ("1.2.840.113549.1.1.1", _) => KeyKind::Rsa,
            ("1.3.101.112", _) => KeyKind::Ed25519,
            _ => {
                return Err(format!(
                    "the server certificate's key ({alg}) is not one keyless signs with \
                     (ECDSA P-256/P-384, RSA, Ed25519)"
                ))
            }
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.raw);
        let mut key_id = [0u8; 32];
        key_id.copy_from_slice(digest.as_ref());
        Ok(RemoteKey {
            pool,
            key_id,
            kind,
            spki: spki.raw.to_vec(),
            sni: None,
        })
    }

    /// The key id the key servers know it by: SHA-256 of the certificate's
    /// SubjectPublicKeyInfo.
    pub fn key_id(&self) -> [u8; 32] {
        self.key_id
    }

    /// The same key, naming `sni` to the key server.
    pub fn for_sni(&self, sni: Option<&str>) -> RemoteKey {
        RemoteKey {
            sni: sni.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The schemes it signs with, in order of preference (TLS 1.3: RSA as PSS only).
    fn schemes(&self) -> &'static [SignatureScheme] {
        match self.kind {
            KeyKind::EcdsaP256 => &[SignatureScheme::ECDSA_NISTP256_SHA256],
            KeyKind::EcdsaP384 => &[SignatureScheme::ECDSA_NISTP384_SHA384],
            KeyKind::Rsa => &[
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PSS_SHA384,
                SignatureScheme::RSA_PSS_SHA512,
            ],
            KeyKind::Ed25519 => &[SignatureScheme::ED25519],
        }
    }
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = *self.schemes().iter().find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            key: self.clone(),
            scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa => SignatureAlgorithm::RSA,
            KeyKind::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

/// One handshake's signature, asked of a key server.
#[derive(Debug)]
pub struct RemoteSigner {
    key: RemoteKey,
    scheme: SignatureScheme,
}

impl RemoteSigner {
    /// What goes on the wire for `message`: the opcode and the digest (or, for Ed25519,
    /// the message).
    fn ask(&self, message: &[u8]) -> (Op, Vec<u8>) {
        let hash = |alg| ring::digest::digest(alg, message).as_ref().to_vec();
        use ring::digest::{SHA256, SHA384, SHA512};
        match self.scheme {
            SignatureScheme::ECDSA_NISTP256_SHA256 => (Op::EcdsaSha256, hash(&SHA256)),
            SignatureScheme::ECDSA_NISTP384_SHA384 => (Op::EcdsaSha384, hash(&SHA384)),
            SignatureScheme::RSA_PSS_SHA256 => (Op::RsaPssSha256, hash(&SHA256)),
            SignatureScheme::RSA_PSS_SHA384 => (Op::RsaPssSha384, hash(&SHA384)),
            SignatureScheme::RSA_PSS_SHA512 => (Op::RsaPssSha512, hash(&SHA512)),
            _ => (Op::Ed25519, message.to_vec()),
        }
    }
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let (op, payload) = self.ask(message);
        let ask = pool::Ask {
            op,
            key_id: self.key.key_id,
            sni: self.key.sni.clone(),
            payload,
        };
        let pool = &self.key.pool;
        let wait = || pool.sign_blocking(ask, SIGN_DEADLINE);
        // On an async worker of a multi-thread runtime: hand its other tasks to another
        // thread for the wait. On tokio's blocking pool, or outside any runtime: wait.
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if on_worker {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        result.map_err(|e| {
            tracing::warn!(error = %e, scheme = ?self.scheme, "no signature from the key servers");
            rustls::Error::General(format!("keyless signing: {e}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Serves the certificate with a [`RemoteKey`] that names each handshake's SNI.
#[derive(Debug)]
pub struct Resolver {
    chain: Vec<CertificateDer<'static>>,
    key: RemoteKey,
}

impl Resolver {
    pub fn new(chain: Vec<CertificateDer<'static>>, key: RemoteKey) -> Resolver {
        Resolver { chain, key }
    }

    /// The certificate and key for a handshake naming `sni`.
    pub fn certified(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        Arc::new(CertifiedKey::new(
            self.chain.clone(),
            Arc::new(self.key.for_sni(sni)),
        ))
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_urls_parse_and_bad_ones_are_named() {
        let ok = |s: &str| parse_url(s).unwrap().unwrap();
        assert_eq!(
            ok("keyless://ks1:2407,ks2.example:99, [::1]:7,10.0.0.1,[::2]"),
            vec![
                ServerAddr {
                    host: "ks1".into(),
                    port: 2407
                },
                ServerAddr {
                    host: "ks2.example".into(),
                    port: 99
                },
                ServerAddr {
                    host: "::1".into(),
                    port: 7
                },
                ServerAddr {
                    host: "10.0.0.1".into(),
                    port: 2407
                },
                ServerAddr {
                    host: "::2".into(),
                    port: 2407
                },
            ]
        );
        assert!(parse_url("/etc/ztp/server.key").is_none());
        for bad in [
            "keyless://",
            "keyless://a:0",
            "keyless://a:x",
            "keyless://a,,b",
            "keyless://::1:7",
            "keyless://[::1]x",
            "keyless://a:1,a:1",
            "keyless://a b:1",
        ] {
            let e = parse_url(bad).unwrap().unwrap_err();
            assert!(e.starts_with("--key"), "{bad}: {e}");
        }
    }
}
