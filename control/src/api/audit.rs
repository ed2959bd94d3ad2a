//! `/v1/audit`: every data plane's connection records, newest first, filtered by
//! identity, service, decision and time range.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::resources::{List, MAX_LIMIT};
use super::AppState;
use crate::store::{AuditQuery, ConnectionRecord};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Client identity (emails compare case-insensitively).
    pub identity: Option<String>,
    pub service: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// From this time, ms since the Unix epoch.
    pub since: Option<u64>,
    /// Up to this time, ms since the Unix epoch.
    pub until: Option<u64>,
    /// Records, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// Query connection records.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = List<ConnectionRecord>), (status = 400, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn audit(
    State(s): State<AppState>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<List<ConnectionRecord>>, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::field("query", e.body_text()))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    if let Some(d) = &p.decision {
        if d != "allow" && d != "deny" {
            return Err(ApiError::field("decision", "must be allow or deny"));
        }
    }
    let store = s.store.clone();
    let query = AuditQuery {
        identity: p.identity,
        service: p.service,
        decision: p.decision,
        since_ms: p.since,
        until_ms: p.until,
        limit,
    };
    let items = store.query_connections(query).await?;
    Ok(Json(List { items, next: None }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AdminAuditParams {
    /// Records, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// Admin changes (who, what, the version it made), newest first.
#[utoipa::path(get, path = "/v1/audit/admin", tag = "audit", params(AdminAuditParams),
    responses((status = 200, body = List<crate::store::AuditRecord>), (status = 400, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn admin_audit(
    State(s): State<AppState>,
    q: Result<Query<AdminAuditParams>, QueryRejection>,
) -> Result<Json<List<crate::store::AuditRecord>>, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::field("query", e.body_text()))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    Ok(Json(List {
        items: s.store.audit(limit).await?,
        next: None,
    }))
}
