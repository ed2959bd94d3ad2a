//! `identity`: identity extraction from arbitrary certificate bytes.
//!
//! Input: the DER of a client certificate (or anything else).
//!
//! Properties: neither `ztp_dataplane::identity::extract` nor
//! `ztp_proto::names::node_id_of_cert` panics; an identity is never empty and holds no
//! control character; a certificate that names a node (`node_id_of_cert` finds one) is
//! never a user's (`extract` refuses it with `NodeCertificate`); and the certificate's
//! serial can be revoked: its hex form parses back to the same serial, and a data-plane
//! `Policy` compiled with it in `revoked` holds it. (The TLS verifier's own check,
//! `ClientVerifier::is_revoked`, is private; it computes the serial the same way,
//! `Serial::from_be_bytes(cert.raw_serial())`, as `extract` does.)
//!
//! Serials longer than 20 bytes (RFC 5280's limit, which webpki does not enforce) are
//! not checked for revocation: `Serial::parse_hex` refuses them by design.

use ztp_dataplane::handler::Registry;
use ztp_dataplane::identity::{extract, IdentityError};
use ztp_dataplane::snapshot::Policy;
use ztp_proto::names::{node_id_of_cert, Serial, DEFAULT_TRUST_DOMAIN};
use ztp_proto::Snapshot;

pub fn run(data: &[u8]) {
    let identity = extract(data);
    let node = node_id_of_cert(data, DEFAULT_TRUST_DOMAIN);
    if let Some(node) = &node {
        assert_eq!(
            identity,
            Err(IdentityError::NodeCertificate),
            "the certificate of node {node:?} yields a user identity"
        );
    }
    let Ok(identity) = identity else {
        return;
    };
    assert!(
        !identity.id.is_empty() && !identity.id.chars().any(char::is_control),
        "identity {:?}",
        identity.id
    );

    let hex = identity.serial.to_string();
    if hex.len() > 2 * Serial::MAX_LEN {
        return;
    }
    assert_eq!(
        Serial::parse_hex(&hex).as_ref(),
        Ok(&identity.serial),
        "serial {hex} does not parse back"
    );
    let snap = Snapshot::from_yaml(&format!("version: 1\nrevoked: ['{hex}']\n"))
        .unwrap_or_else(|e| panic!("revoking serial {hex}: {e}"));
    let policy = Policy::compile(&snap, &Registry::builtin())
        .unwrap_or_else(|e| panic!("revoking serial {hex}: {e}"));
    assert!(
        policy.revoked.contains(&identity.serial),
        "serial {hex} revoked but not found revoked"
    );
}
