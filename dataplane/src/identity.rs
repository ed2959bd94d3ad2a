//! Identity extraction: who the client certificate says the client is.
//!
//! Deterministic, in this order: the first SAN email, else the first SAN URI, else the
//! subject CN. The subject's `emailAddress` attribute is ignored. A SAN extension that
//! cannot be parsed (or appears twice) denies: there is no fallback to the CN, which
//! would let a malformed certificate choose a weaker identity. A certificate with a node's
//! (`…/node/ID`) or a connector's (`…/connector/NAME`) URI SAN is never a user's.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use ztp_proto::names::Serial;

/// The kind of name an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Email,
    Uri,
    CommonName,
}

/// A verified client's identity (the chain was verified by the TLS stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub id: String,
    pub kind: IdentityKind,
    pub serial: Serial,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("certificate cannot be parsed")]
    Unparsable,
    #[error("subject alternative names cannot be parsed")]
    BadSan,
    #[error("certificate names no identity")]
    NoIdentity,
    #[error("a data-plane node's certificate is not a user's")]
    NodeCertificate,
    #[error("a connector's certificate is not a user's")]
    ConnectorCertificate,
}

/// Extracts the identity from an end-entity certificate's DER.
pub fn extract(der: &[u8]) -> Result<ClientIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let serial = Serial::from_be_bytes(cert.raw_serial());
    let not_after = cert.validity().not_after.timestamp();
    let (id, kind) = pick(&cert)?;
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(IdentityError::NoIdentity);
    }
    Ok(ClientIdentity {
        id: id.to_owned(),
        kind,
        serial,
        not_after,
    })
}

fn pick<'a>(cert: &'a X509Certificate<'_>) -> Result<(&'a str, IdentityKind), IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::BadSan)?;
    if let Some(san) = san {
        let names = &san.value.general_names;
        // A certificate that names a node is never a user's (DESIGN.md "Identities of
        // machines"), whatever else it carries.
        if names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(u) if ztp_proto::names::is_node_uri(u)))
        {
            return Err(IdentityError::NodeCertificate);
        }
        // Nor is a connector's (DESIGN.md: "never a user's or a node's").
        if names
            .iter()
            .any(|n| matches!(n, GeneralName::URI(u) if ztp_proto::names::is_connector_uri(u)))
        {
            return Err(IdentityError::ConnectorCertificate);
        }
        let email = names.iter().find_map(|n| match n {
            GeneralName::RFC822Name(e) => Some(*e),
            _ => None,
        });
        if let Some(e) = email {
            return Ok((e, IdentityKind::Email));
        }
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        if let Some(u) = uri {
            return Ok((u, IdentityKind::Uri));
        }
    }
    // Only the first CN counts; a second one would make the choice ambiguous to readers.
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or(IdentityError::NoIdentity)?;
    let cn = cn.as_str().map_err(|_| IdentityError::NoIdentity)?;
    Ok((cn, IdentityKind::CommonName))
}

#[cfg(test)]
mod tests;
