//! The contract between ZTP's planes.
//!
//! Owns: the domain model ([`Snapshot`], [`Service`], [`User`], [`Group`]) in exactly the
//! schema of DESIGN.md, its validation ([`Snapshot::validate`], errors naming the field),
//! the typed parsers both planes index with ([`names`]), and the duration syntax of the
//! command lines, and the gRPC contract of the snapshot stream ([`wire`]: the `.proto`,
//! its generated code and conversions).
//! Does not own: storage (the control plane), the routing index (the data plane), or the
//! infrastructure the binaries share (TLS material, signals, the admin ports' HTTP
//! server: `ztp-infra`).

#![forbid(unsafe_code)]

pub mod config;
pub mod digest;
mod duration;
pub mod framing;
pub mod keyless;
mod model;
pub mod names;
pub mod quic;
pub mod tunnel;
mod validate;
pub mod wire;

pub use duration::parse_duration;
pub use model::{Connector, Group, Protocol, Service, Snapshot, User};
pub use validate::{check_connector_name, check_identity, FieldError, Invalid, KNOWN_HANDLERS};

/// Why a snapshot document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a document of the schema: bad YAML, an unknown field, a wrong type.
    #[error("{0}")]
    Parse(FieldError),
    /// Well formed, but breaks a rule.
    #[error("{0}")]
    Invalid(#[from] Invalid),
}

impl SnapshotError {
    /// Every problem as a field error, for listing one per line.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            SnapshotError::Parse(e) => vec![e.clone()],
            SnapshotError::Invalid(inv) => inv.0.clone(),
        }
    }
}

impl Snapshot {
    /// Parses and validates a YAML snapshot.
    pub fn from_yaml(text: &str) -> Result<Snapshot, SnapshotError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let snap: Snapshot = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "snapshot".to_owned()
            } else {
                path
            };
            // The YAML error repeats its own idea of the path; the field already says it.
            let message = e.into_inner().to_string();
            let message = match message.split_once(": ") {
                Some((head, tail)) if !head.contains(' ') => tail.to_owned(),
                _ => message,
            };
            SnapshotError::Parse(FieldError { field, message })
        })?;
        snap.validate()?;
        Ok(snap)
    }

    /// The YAML form, as a snapshot file holds it.
    pub fn to_yaml(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
