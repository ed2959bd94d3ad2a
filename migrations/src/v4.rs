//! Schema 4, frozen: schema 3 without its reverse indexes.
//!
//! Never edit this module: it is what stores of schema 4 hold, whatever the model or
//! [`crate::layout`] become.
//!
//! Schema 4 adds no shape: its records are schema 3's, byte for byte (a service is
//! `{"name", "protocol"?, "address"?, "groups"?, "allow"?, "deny"?, "handler"?,
//! "connector"?}`, users, groups and connectors as in schema 3; META as in schema 1). It
//! removes the three reverse indexes, `identities` and `group_refs` (schema 2) and
//! `connector_refs` (schema 3): since schema 4 the store checks integrity (an identity
//! maps to one user, a group in use or a connector a service names is not deleted) on the
//! configuration it keeps in memory, and maintains no index.

/// Every tree a schema-4 store may hold: schema 1's (`meta`, `services`, `users`,
/// `groups`, `revoked`, `tokens`, `audit`), `conn_audit` (since schema 2, created on
/// first use) and `connectors` (since schema 3). Nothing else. (The layout test compares
/// with it.)
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const TREES: &[&str] = &[
    "meta",
    "services",
    "users",
    "groups",
    "revoked",
    "tokens",
    "audit",
    "conn_audit",
    "connectors",
];
