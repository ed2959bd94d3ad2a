//! `/v1/revoked`: revoked certificate serials. Every data plane refuses them at the
//! handshake and closes live connections that use them.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::body::JsonBody;
use super::error::ApiError;
use super::resources::{etag, if_match, list_params, listed, List, ListParams};
use super::AppState;
use crate::store::Actor;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Serials in hex (`0a1b2c`, `0A:1B:2C`, `0x0a1b2c`); compared as integers.
    pub serials: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revoked {
    /// The config version that carries the revocation.
    pub version: u64,
}

/// List revoked serials.
#[utoipa::path(get, path = "/v1/revoked", tag = "revoked", params(ListParams),
    responses((status = 200, body = List<String>)), security(("token" = [])))]
pub async fn list_revoked(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    Ok(listed(s.store.revoked(cursor.as_deref(), limit).await?))
}

/// Revoke certificates by serial (one new version).
#[utoipa::path(post, path = "/v1/revoked", tag = "revoked", request_body = Revoke,
    responses((status = 200, body = Revoked), (status = 400, body = super::error::Problem),
        (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn revoke(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<Revoke>,
) -> Result<Response, ApiError> {
    let version = s
        .store
        .revoke(&req.serials, if_match(&headers)?, &actor)
        .await?;
    Ok((etag(version), Json(Revoked { version })).into_response())
}

/// Lift a revocation.
#[utoipa::path(delete, path = "/v1/revoked/{serial}", tag = "revoked",
    params(("serial" = String, Path, description = "Serial, hex")),
    responses((status = 204), (status = 400, body = super::error::Problem), (status = 404, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn unrevoke(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(serial): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let version = s
        .store
        .unrevoke(&serial, if_match(&headers)?, &actor)
        .await?;
    Ok((StatusCode::NO_CONTENT, etag(version)).into_response())
}
