//! Schema 1, frozen: the store as migration 1 laid it out and schema-1 code wrote it.
//!
//! Never edit this module: it is what stores of schema 1 hold, whatever the model
//! (`ztp_proto`) or [`crate::layout`] become. Records are compact JSON of the model as it
//! was then (commit bae5709), keyed as below; META values are big-endian integers.

use crate::record::Record;

/// Schema version, config version and audit sequence.
pub(crate) const META: &str = "meta";
/// Service key (the name, lowercase; `*.suffix` for a wildcard) → JSON service.
pub(crate) const SERVICES: &str = "services";
/// User name → JSON user.
pub(crate) const USERS: &str = "users";
/// Group name → JSON `{"name"}`.
pub(crate) const GROUPS: &str = "groups";
/// Revoked serial (normalized hex) → empty.
pub(crate) const REVOKED: &str = "revoked";
/// Admin token id → JSON token record.
pub(crate) const TOKENS: &str = "tokens";
/// Big-endian u64 sequence → JSON admin audit record.
pub(crate) const AUDIT: &str = "audit";

/// META key: the config version, a big-endian u64.
pub(crate) const CONFIG_VERSION: &[u8] = b"config_version";

/// What migration 2 needs of a schema-1 user.
pub(crate) struct User {
    pub(crate) name: String,
    pub(crate) identities: Vec<String>,
    pub(crate) groups: Vec<String>,
}

/// A schema-1 user record: `{"name": str, "identities"?: [str], "groups"?: [str],
/// "disabled"?: bool}`, no other field.
pub(crate) fn user(bytes: &[u8]) -> Result<User, String> {
    let mut r = Record::parse(bytes)?;
    let user = User {
        name: r.string("name")?,
        identities: r.strings("identities")?,
        groups: r.strings("groups")?,
    };
    r.flag("disabled")?;
    r.finish()?;
    Ok(user)
}

/// What migration 2 needs of a schema-1 service.
pub(crate) struct Service {
    pub(crate) groups: Vec<String>,
}

/// A schema-1 service record: `{"name": str, "protocol"?: "tcp"|"udp"|"quic"|"auto",
/// "address"?: str|null, "groups"?: [str], "allow"?: [str], "handler"?: str|null}`, no
/// other field.
pub(crate) fn service(bytes: &[u8]) -> Result<Service, String> {
    let mut r = Record::parse(bytes)?;
    r.string("name")?;
    r.variant("protocol", &["tcp", "udp", "quic", "auto"])?;
    r.opt_string("address")?;
    let groups = r.strings("groups")?;
    r.strings("allow")?;
    r.opt_string("handler")?;
    r.finish()?;
    Ok(Service { groups })
}
