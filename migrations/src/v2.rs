//! Schema 2, frozen: what migration 2 adds to schema 1.
//!
//! Never edit this module: it is what stores of schema 2 hold, whatever the model or
//! [`crate::layout`] become.
//!
//! Records are schema 1's, with one addition made without a schema bump (commit
//! 89238b5): a service may carry `"deny": [str]`, written only when not empty. So a
//! schema-2 service is `{"name", "protocol"?, "address"?, "groups"?, "allow"?, "deny"?,
//! "handler"?}`; users and groups are as in schema 1. Since schema 2 a `conn_audit` tree
//! (big-endian end time in ms + sequence → JSON connection record) is created on first
//! use.

/// Identity key (see [`identity_key`]) → user name.
pub(crate) const IDENTITIES: &str = "identities";
/// [`group_ref`] key → empty.
pub(crate) const GROUP_REFS: &str = "group_refs";

/// [`group_ref`] kind of a service (named by its key in the services tree).
pub(crate) const REF_SERVICE: u8 = b's';
/// [`group_ref`] kind of a user (named by its name).
pub(crate) const REF_USER: u8 = b'u';

/// `group \0 kind \0 name`: `name` (of `kind`) refers to `group`.
pub(crate) fn group_ref(group: &str, kind: u8, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + name.len() + 3);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.push(kind);
    k.push(0);
    k.extend_from_slice(name);
    k
}

/// The key of an identity in [`IDENTITIES`]: an email (an `@` and no URI scheme) in
/// lowercase, anything else as it is.
pub(crate) fn identity_key(identity: &str) -> String {
    if identity.contains('@') && uri_scheme(identity).is_none() {
        identity.to_lowercase()
    } else {
        identity.to_owned()
    }
}

/// The scheme of a URI (`spiffe` of `spiffe://…`), if the string starts with one.
fn uri_scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic()
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
    .then_some(scheme)
}
