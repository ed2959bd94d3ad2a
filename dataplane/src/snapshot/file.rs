//! Snapshots from a YAML file: for tests, demos and air-gapped nodes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use ztp_proto::{FieldError, Snapshot, SnapshotError};

use super::{Policy, Publisher};
use crate::handler::Registry;
use crate::tls::{TlsError, TlsFiles, TlsMaterial};

/// Largest snapshot file read (a 100,000-user snapshot is a few MiB).
const MAX_FILE_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("invalid snapshot {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: SnapshotError,
    },
}

impl FileError {
    /// One line per problem, each naming the field, for operators.
    pub fn lines(&self) -> Vec<String> {
        match self {
            FileError::Invalid { path, source } => source
                .field_errors()
                .iter()
                .map(|FieldError { field, message }| {
                    format!("{}: {field}: {message}", path.display())
                })
                .collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Reads, parses and validates a snapshot file.
pub fn load(path: &Path) -> Result<Snapshot, FileError> {
    let read_err = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    Snapshot::from_yaml(&text).map_err(|source| FileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Re-reads the snapshot file (when serving one) and the TLS files, and swaps them in
/// as one new state. On any error the running state is kept, and the error says which
/// file is wrong. Returns the snapshot versions before and after.
pub fn reload(
    path: Option<&Path>,
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    registry: &Registry,
    publisher: &mut Publisher,
) -> Result<(u64, u64), ReloadError> {
    let policy = match path {
        Some(path) => {
            let snap = load(path)?;
            // `load` validated it.
            Some(
                Policy::compile_validated(snap, registry).map_err(|e| FileError::Invalid {
                    path: path.to_owned(),
                    source: e.into(),
                })?,
            )
        }
        None => None,
    };
    let material = TlsMaterial::load(files, provider)?;
    let before = publisher.current().policy.version;
    let after = policy.as_ref().map_or(before, |p| p.version);
    publisher.apply(policy, Some(material))?;
    Ok((before, after))
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Snapshot(#[from] FileError),
    #[error("{0}")]
    Tls(#[from] TlsError),
}
