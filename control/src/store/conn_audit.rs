//! The audit trail of connections: every data plane's connection records, kept by the
//! backend with a bounded retention (oldest dropped first), newest-first queries with
//! filters. Records are not configuration: they bump no version.

use serde::{Deserialize, Serialize};

use ztp_proto::names::identity_key;

/// Records kept by default.
pub const DEFAULT_CAP: u64 = 1_000_000;
/// Records a query looks at, at most (queries are bounded whatever the filters).
pub(super) const MAX_SCAN: usize = 200_000;

/// One connection, as a data plane reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectionRecord {
    /// When it ended, ms since the Unix epoch.
    pub time_ms: u64,
    /// The data plane that served it.
    pub node: String,
    pub peer: String,
    pub sni: String,
    pub identity: String,
    /// `identity` is what a certificate refused in the handshake claims, not a
    /// verified identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity_unverified: bool,
    pub user: String,
    pub service: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Why, or how it ended.
    pub reason: String,
    /// The ZTP-ERROR code sent, 0 if none.
    pub code: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// `tcp` or `quic` (records from before the QUIC transport: `tcp`).
    #[serde(default = "tcp")]
    pub transport: String,
    /// The connector whose tunnel carried the session, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connector: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// Filters of a query; empty means any.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    pub identity: Option<String>,
    pub service: Option<String>,
    pub decision: Option<String>,
    /// Inclusive bounds, ms since the Unix epoch.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: usize,
}

impl AuditQuery {
    /// Whether `r` passes the filters other than the time window. Identities compare
    /// as the data plane's rule does: emails case-insensitively, URIs and CNs exactly.
    pub fn matches(&self, r: &ConnectionRecord) -> bool {
        self.identity
            .as_deref()
            .is_none_or(|i| identity_key(&r.identity) == identity_key(i))
            && self
                .service
                .as_deref()
                .is_none_or(|s| r.service.eq_ignore_ascii_case(s))
            && self.decision.as_deref().is_none_or(|d| r.decision == d)
    }
}
