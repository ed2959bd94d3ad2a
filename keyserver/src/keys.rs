//! The signing keys of `--keys DIR`: loading, key ids, per-key authorization, signing.
//!
//! Every `*.key` file of the folder is one key (PEM: PKCS#8 `PRIVATE KEY`, SEC1 `EC
//! PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`): ECDSA P-256 or P-384, RSA of 2048 to 4096
//! bits (for RSA-PSS), or Ed25519. A key file readable by group or others is refused.
//!
//! A key's id is SHA-256 of its public SubjectPublicKeyInfo (DER): the same bytes as the
//! SPKI of any certificate for that key, so a data plane computes it from its certificate.
//!
//! `NAME.nodes` beside `NAME.key`, when present, lists the node IDs allowed to use the key
//! (one per line, `#` starts a comment; a line may also be the whole node URI
//! `spiffe://DOMAIN/node/ID`). Without it, every node the client CA admits may. A node not
//! allowed is answered exactly as for an unknown key id, so that it learns nothing of the
//! key: [`KeySet::lookup`] returns `None` for both.
//!
//! What a request asks of a key: ECDSA keys sign ECDSA over a SHA-256 or SHA-384 digest
//! (either curve; a digest longer than the curve's order is truncated as FIPS 186
//! says), RSA keys sign RSA-PSS over a SHA-256/384/512 digest (salt length = digest
//! length, with RSA blinding), Ed25519 keys sign the message. Any other pairing is
//! answered `unexpected opcode` (0x06): the opcode is one the protocol knows, but not one
//! this key serves.

pub mod p256_table;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest as _, Sha256, Sha384, Sha512};
use ztp_proto::keyless::{ErrorCode, Op};

/// A key's id: SHA-256 of its SubjectPublicKeyInfo (DER).
pub type KeyId = [u8; 32];

/// RSA moduli accepted, in bits.
pub const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// The id of the key whose public SubjectPublicKeyInfo is `spki_der`.
pub fn key_id(spki_der: &[u8]) -> KeyId {
    Sha256::digest(spki_der).into()
}

/// The first 8 bytes of a key id, in hex: what logs and messages show.
pub fn short_id(id: &KeyId) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the key folder could not be loaded. Each names the file; none carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key folder {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:04o}); make it private with \
         `chmod 600 {path}`"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Nodes {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{first} and {second} hold the same key")]
    Duplicate { first: PathBuf, second: PathBuf },
}

/// A key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    EcdsaP256,
    EcdsaP384,
    /// RSA, with the modulus' size in bits.
    Rsa(usize),
    Ed25519,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Algorithm::EcdsaP256 => f.write_str("ecdsa-p256"),
            Algorithm::EcdsaP384 => f.write_str("ecdsa-p384"),
            Algorithm::Rsa(bits) => write!(f, "rsa-{bits}"),
            Algorithm::Ed25519 => f.write_str("ed25519"),
        }
    }
}

enum Signer {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
    Ed25519(ed25519_dalek::SigningKey),
}

/// One private key, with its id and who may use it.
pub struct Key {
    /// The file's stem (`NAME` of `NAME.key`): the key's name in logs and metrics.
    pub name: String,
    pub id: KeyId,
    pub algorithm: Algorithm,
    /// The node IDs of `NAME.nodes`; `None` without the file (every node).
    pub nodes: Option<HashSet<String>>,
    signer: Signer,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .field("id", &short_id(&self.id))
            .field("algorithm", &self.algorithm)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Parses a PEM private key. The error says what is wrong, never with key bytes.
    pub fn from_pem(name: &str, pem: &[u8]) -> Result<Key, String> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key in the file".to_owned()
            }
            e => format!("not a PEM private key: {e}"),
        })?;
        let (signer, spki, algorithm) = match &der {
            PrivateKeyDer::Pkcs8(k) => from_pkcs8(k.secret_pkcs8_der())?,
            PrivateKeyDer::Sec1(k) => from_sec1(k.secret_sec1_der())?,
            PrivateKeyDer::Pkcs1(k) => {
                let key = rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
                    .map_err(|e| format!("not a PKCS#1 RSA key: {e}"))?;
                rsa_key(key)?
            }
            _ => return Err("an unsupported kind of private key".into()),
        };
        if algorithm == Algorithm::EcdsaP256 {
            p256_table::warm_up();
        }
        Ok(Key {
            name: name.to_owned(),
            id: key_id(&spki),
            algorithm,
            nodes: None,
            signer,
        })
    }

    /// Whether node `node` may use this key.
    pub fn allows(&self, node: &str) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.contains(node))
    }

    /// Signs `payload` (a digest, or the message for Ed25519) as `op` asks. Ping is not
    /// a signing operation and is answered `unexpected opcode` here.
    pub fn sign(&self, op: Op, payload: &[u8]) -> Result<Vec<u8>, ErrorCode> {
        use p256::ecdsa::signature::hazmat::PrehashSigner as _;
        let crypto = |_| ErrorCode::CryptoFailure;
        match (&self.signer, op) {
            (Signer::P256(k), Op::EcdsaSha256 | Op::EcdsaSha384) => {
                let sig = p256_table::sign_prehash(k.as_nonzero_scalar(), payload)
                    .ok_or(ErrorCode::CryptoFailure)?;
                Ok(sig.as_bytes().to_vec())
            }
            (Signer::P384(k), Op::EcdsaSha256 | Op::EcdsaSha384) => {
                let sig: p384::ecdsa::DerSignature = k.sign_prehash(payload).map_err(crypto)?;
                Ok(sig.as_bytes().to_vec())
            }
            (Signer::Rsa(k), Op::RsaPssSha256 | Op::RsaPssSha384 | Op::RsaPssSha512) => {
                let scheme = match op {
                    Op::RsaPssSha256 => rsa::Pss::new_blinded::<Sha256>(),
                    Op::RsaPssSha384 => rsa::Pss::new_blinded::<Sha384>(),
                    _ => rsa::Pss::new_blinded::<Sha512>(),
                };
                k.sign_with_rng(&mut rsa::rand_core::OsRng, scheme, payload)
                    .map_err(|_| ErrorCode::CryptoFailure)
            }
            (Signer::Ed25519(k), Op::Ed25519) => {
                use ed25519_dalek::Signer as _;
                Ok(k.sign(payload).to_bytes().to_vec())
            }
            _ => Err(ErrorCode::UnexpectedOpcode),
        }
    }
}

type Parsed = (Signer, Vec<u8>, Algorithm);

fn from_pkcs8(der: &[u8]) -> Result<Parsed, String> {
    use p256::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
    // The algorithm identifier decides; each parser refuses another curve's key.
    if let Ok(k) = p256::SecretKey::from_pkcs8_der(der) {
        return p256_key(k);
    }
    if let Ok(k) = p384::SecretKey::from_pkcs8_der(der) {
        return p384_key(k);
    }
    if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_der(der) {
        let spki = k
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| e.to_string())?;
        return Ok((Signer::Ed25519(k), spki.into_vec(), Algorithm::Ed25519));
    }
    if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_der(der) {
        return rsa_key(k);
    }
    Err("not a supported PKCS#8 key (ECDSA P-256 or P-384, RSA, Ed25519)".into())
}

fn from_sec1(der: &[u8]) -> Result<Parsed, String> {
    if let Ok(k) = p256::SecretKey::from_sec1_der(der) {
        return p256_key(k);
    }
    if let Ok(k) = p384::SecretKey::from_sec1_der(der) {
        return p384_key(k);
    }
    Err("not a supported EC key (P-256 or P-384)".into())
}

fn p256_key(k: p256::SecretKey) -> Result<Parsed, String> {
    use p256::pkcs8::EncodePublicKey as _;
    let spki = k
        .public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    Ok((
        Signer::P256(k.into()),
        spki.into_vec(),
        Algorithm::EcdsaP256,
    ))
}

fn p384_key(k: p384::SecretKey) -> Result<Parsed, String> {
    use p256::pkcs8::EncodePublicKey as _;
    let spki = k
        .public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    Ok((
        Signer::P384(k.into()),
        spki.into_vec(),
        Algorithm::EcdsaP384,
    ))
}

fn rsa_key(mut k: rsa::RsaPrivateKey) -> Result<Parsed, String> {
    use rsa::pkcs8::EncodePublicKey as _;
    let bits = k.n().bits();
    if !RSA_BITS.contains(&bits) {
        return Err(format!(
            "an RSA key of {bits} bits (supported: {} to {})",
            RSA_BITS.start(),
            RSA_BITS.end()
        ));
    }
    k.validate()
        .map_err(|e| format!("an invalid RSA key: {e}"))?;
    k.precompute()
        .map_err(|e| format!("an invalid RSA key: {e}"))?;
    let spki = k
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?;
    Ok((
        Signer::Rsa(Box::new(k)),
        spki.into_vec(),
        Algorithm::Rsa(bits),
    ))
}

/// Parses a `.nodes` file: the set of node IDs it allows.
pub fn parse_nodes(
    text: &str,
    path: &Path,
    trust_domain: &str,
) -> Result<HashSet<String>, KeyError> {
    let mut nodes = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let uri = if line.contains("://") {
            line.to_owned()
        } else {
            format!("spiffe://{trust_domain}/node/{line}")
        };
        let id = ztp_proto::names::node_id(&uri, trust_domain).ok_or_else(|| KeyError::Nodes {
            path: path.to_owned(),
            line: i + 1,
            reason: format!(
                "{line:?} is not a node ID (letters, digits, '-', '_', '.') nor \
                 spiffe://{trust_domain}/node/ID"
            ),
        })?;
        nodes.insert(id.to_owned());
    }
    Ok(nodes)
}

/// The keys in use: by id.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: HashMap<KeyId, Arc<Key>>,
}

impl KeySet {
    /// Loads every `*.key` of `dir` (and its `.nodes` file). Any error refuses the whole
    /// folder: a server starts, or reloads, with all its keys or not at all.
    pub fn load_dir(dir: &Path, trust_domain: &str) -> Result<KeySet, KeyError> {
        let read_dir = |source| KeyError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut node_files: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            let (Some(stem), Some(ext)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            match ext {
                "key" if !stem.starts_with('.') => {
                    names.insert(stem.to_owned(), path.clone());
                }
                "nodes" => node_files.push(path.clone()),
                _ => {}
            }
        }
        let mut set = KeySet::default();
        let mut files: HashMap<KeyId, PathBuf> = HashMap::new();
        for (name, path) in &names {
            let read = |source| KeyError::Read {
                path: path.clone(),
                source,
            };
            let meta = std::fs::metadata(path).map_err(read)?;
            if !meta.is_file() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Mode {
                    path: path.clone(),
                    mode,
                });
            }
            let pem = std::fs::read(path).map_err(read)?;
            let mut key = Key::from_pem(name, &pem).map_err(|reason| KeyError::Key {
                path: path.clone(),
                reason,
            })?;
            let nodes_path = path.with_extension("nodes");
            match std::fs::read_to_string(&nodes_path) {
                Ok(text) => key.nodes = Some(parse_nodes(&text, &nodes_path, trust_domain)?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(KeyError::Read {
                        path: nodes_path,
                        source,
                    })
                }
            }
            if let Some(first) = files.insert(key.id, path.clone()) {
                return Err(KeyError::Duplicate {
                    first,
                    second: path.clone(),
                });
            }
            set.keys.insert(key.id, Arc::new(key));
        }
        for path in node_files {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if !names.contains_key(stem) {
                tracing::warn!(path = %path.display(), "a .nodes file without its .key; ignored");
            }
        }
        Ok(set)
    }

    /// The key `id` if node `node` may use it; `None` for an unknown key and for a key
    /// the node may not use alike.
    pub fn lookup(&self, id: &KeyId, node: &str) -> Option<&Arc<Key>> {
        self.keys.get(id).filter(|k| k.allows(node))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.keys.values()
    }
}
