//! `/v1/snapshot` (the whole configuration at one version, JSON or YAML) and
//! `/v1/import` (a whole configuration applied atomically as one new version).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use ztp_proto::Snapshot;

use super::body::DocBody;
use super::error::ApiError;
use super::resources::{etag, if_match};
use super::AppState;
use crate::store::Actor;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// `json` (default) or `yaml`; `Accept: application/yaml` works too.
    pub format: Option<String>,
}

/// The current configuration.
#[utoipa::path(get, path = "/v1/snapshot", tag = "config", params(SnapshotParams),
    responses((status = 200, body = Snapshot, description = "JSON, or YAML when asked")),
    security(("token" = [])))]
pub async fn snapshot(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<SnapshotParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::field("format", e.body_text()))?;
    let yaml = match p.format.as_deref() {
        Some("yaml") => true,
        Some("json") => false,
        Some(other) => {
            return Err(ApiError::field(
                "format",
                format!("{other:?} is not json or yaml"),
            ))
        }
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("yaml")),
    };
    let snap = s.store.snapshot().await?;
    let tag = etag(snap.version);
    if yaml {
        let mut resp = (tag, snap.to_yaml()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        );
        Ok(resp)
    } else {
        Ok((tag, Json(snap)).into_response())
    }
}

/// What an import did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Imported {
    /// The config version the import created.
    pub version: u64,
    pub services: usize,
    pub users: usize,
    pub groups: usize,
    pub revoked: usize,
    pub connectors: usize,
}

/// Replace the whole configuration (JSON, or YAML with `Content-Type:
/// application/yaml`; up to 64 MiB). The document's `version` is ignored.
#[utoipa::path(post, path = "/v1/import", tag = "config", request_body = Snapshot,
    responses((status = 200, body = Imported), (status = 400, body = super::error::Problem),
        (status = 412, body = super::error::Problem), (status = 413, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn import(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    DocBody(snap): DocBody<Snapshot>,
) -> Result<Response, ApiError> {
    let counts = (
        snap.services.len(),
        snap.users.len(),
        snap.groups.len(),
        snap.revoked.len(),
        snap.connectors.len(),
    );
    let version = s.store.import(snap, if_match(&headers)?, &actor).await?;
    Ok((
        etag(version),
        Json(Imported {
            version,
            services: counts.0,
            users: counts.1,
            groups: counts.2,
            revoked: counts.3,
            connectors: counts.4,
        }),
    )
        .into_response())
}
