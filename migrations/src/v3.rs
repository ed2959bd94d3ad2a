//! Schema 3, frozen: what migration 3 adds to schema 2.
//!
//! Never edit this module: it is what stores of schema 3 hold, whatever the model or
//! [`crate::layout`] become.
//!
//! Schema 3 is the connector registry (issue 17). A service may carry `"connector": str`
//! (written only when it names one), so a schema-3 service is `{"name", "protocol"?,
//! "address"?, "groups"?, "allow"?, "deny"?, "handler"?, "connector"?}`; users and groups
//! are as in schema 2. Two trees are added, both empty after the migration: a schema-2
//! service names no connector (the field did not exist), so there is nothing to index.

/// Connector name → JSON `{"name": str, "description"?: str}` (the description written
/// only when not empty).
pub(crate) const CONNECTORS: &str = "connectors";
/// [`connector_ref`] key → empty.
pub(crate) const CONNECTOR_REFS: &str = "connector_refs";

/// `connector \0 service key`: the service (named by its key in the services tree) is
/// served through `connector`. (Written by the store; the layout test compares with it.)
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn connector_ref(connector: &str, service: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(connector.len() + service.len() + 1);
    k.extend_from_slice(connector.as_bytes());
    k.push(0);
    k.extend_from_slice(service);
    k
}
