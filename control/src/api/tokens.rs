//! `/v1/tokens`: admin tokens are created (the secret is shown once), listed (without
//! secrets) and revoked. Each has a role (`viewer`, `operator`, `admin`); one created
//! without a role is `admin`, as every token was before roles existed (scripts that
//! create a token and then write with it keep working).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::body::JsonBody;
use super::error::ApiError;
use super::resources::{list_params, List, ListParams};
use super::AppState;
use crate::store::{Actor, Role, TokenInfo};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for, e.g. `ci` or an operator's name.
    pub name: String,
    /// What it may do; `admin` when left out.
    #[serde(default)]
    pub role: Role,
}

/// A token as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub created_ms: u64,
    pub role: Role,
}

impl From<TokenInfo> for TokenView {
    fn from(t: TokenInfo) -> Self {
        TokenView {
            id: t.id,
            name: t.name,
            created_ms: t.created_ms,
            role: t.role,
        }
    }
}

/// A created token: `token` is shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub created_ms: u64,
    pub role: Role,
    pub token: String,
}

/// List admin tokens.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", params(ListParams),
    responses((status = 200, body = List<TokenView>)), security(("token" = [])))]
pub async fn list_tokens(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    let page = s.store.list_tokens(cursor.as_deref(), limit)?;
    Ok(Json(List {
        items: page.items.into_iter().map(TokenView::from).collect(),
        next: page.next,
    })
    .into_response())
}

/// Create an admin token.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn create_token(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<Response, ApiError> {
    let t = s
        .store
        .create_token_with_role(&req.name, req.role, &actor)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: t.info.id,
            name: t.info.name,
            created_ms: t.info.created_ms,
            role: t.info.role,
            token: t.token,
        }),
    )
        .into_response())
}

/// Revoke an admin token (the last one cannot be revoked).
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn revoke_token(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.store.revoke_token(&id, &actor).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
