//! The snapshot schema: exactly the YAML of DESIGN.md, field for field.
//!
//! These are plain data. [`Snapshot::validate`](crate::Snapshot::validate) decides whether
//! a value may be applied; consumers then parse the fields they index with the typed
//! parsers of [`crate::names`].

use serde::{Deserialize, Serialize};

/// One consistent configuration: what a data-plane node needs beyond its own listener,
/// key and CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The control plane's config version; only ever moves forward.
    pub version: u64,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub groups: Vec<Group>,
    /// Revoked certificate serials, hex; compared as integers.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Connectors: agents next to backends no data plane can dial, which hold tunnels to
    /// the data planes (certificate URI `spiffe://DOMAIN/connector/NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connectors: Vec<Connector>,
}

/// A connector, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Connector {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A backend reachable through the proxy, named by TLS SNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The SNI name: `a.svc.internal`, or `*.svc.internal` for one label.
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Backend `host:port`; `:port` means localhost. Required unless the handler needs
    /// no backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Groups allowed in; empty means every enabled directory user.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Source address ranges allowed to reach the service; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Source address ranges refused, whatever `allow` says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// A custom handler; absent means the forwarder for the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Served only through this connector's tunnels: the connector dials `address`, never
    /// a data plane (snapshot schema 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
}

/// How a service's traffic is carried to its backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Quic,
    /// Forwarded as tcp; the client's first bytes name the detected kind in the record.
    #[default]
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Quic => "quic",
            Protocol::Auto => "auto",
        }
    }
}

/// A person or workload in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Certificate identities: SAN email, SAN URI or subject CN.
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// A named set of users, referenced by services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
}
