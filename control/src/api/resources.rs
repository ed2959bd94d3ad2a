//! `/v1/services`, `/v1/users`, `/v1/groups`: create (`POST`, 409 if the name exists),
//! get, list with pagination, replace (`PUT`), delete. Every response carries the config
//! version as `ETag`; writes honour `If-Match` (412 when stale).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use ztp_proto::{Group, Service, User};

use super::body::JsonBody;
use super::error::ApiError;
use super::AppState;
use crate::store::{Actor, Page};

/// Query of a listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Items per page, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

/// Query of a group deletion.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteParams {
    /// Also remove the group from every user and service naming it.
    #[serde(default)]
    pub cascade: bool,
}

/// A page of a listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    /// Cursor of the next page; null on the last page.
    pub next: Option<String>,
}

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn list_params(
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<(Option<String>, usize), ApiError> {
    let Query(p) = q.map_err(|e| ApiError::field("query", e.body_text()))?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    Ok((p.cursor, limit))
}

/// The `If-Match` precondition: `"7"` expects version 7; absent or `*` expects nothing.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::field(
                "If-Match",
                "expected a config version in quotes, like \"7\"",
            )
        })
}

pub fn etag(version: u64) -> [(header::HeaderName, HeaderValue); 1] {
    // A number in quotes is always a valid header value.
    let v = HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    [(header::ETAG, v)]
}

/// A page and the version it was read at (one store read: the tag never runs ahead of
/// the body).
pub fn listed<T: Serialize>((page, version): (Page<T>, u64)) -> Response {
    let list = List {
        items: page.items,
        next: page.next,
    };
    (etag(version), Json(list)).into_response()
}

/// A record and the version it was read at (one store read).
pub(super) fn one<T: Serialize>((item, version): (T, u64)) -> Response {
    (etag(version), Json(item)).into_response()
}

pub(super) fn created<T: Serialize>(version: u64, location: String, item: T) -> Response {
    let mut resp = (StatusCode::CREATED, etag(version), Json(item)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

pub(super) fn replaced<T: Serialize>(version: u64, item: T) -> Response {
    (etag(version), Json(item)).into_response()
}

pub(super) fn deleted(version: u64) -> Response {
    (StatusCode::NO_CONTENT, etag(version)).into_response()
}

/// A replace names the record twice, in the path and the body; they must agree.
pub(super) fn same_name(path: &str, body: &str, case_insensitive: bool) -> Result<(), ApiError> {
    let same = if case_insensitive {
        path.eq_ignore_ascii_case(body)
    } else {
        path == body
    };
    if same {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            format!(
                "{body:?} differs from {path:?} in the path; names cannot be changed by replace"
            ),
        ))
    }
}

// ----- services -----

/// List services.
#[utoipa::path(get, path = "/v1/services", tag = "services", params(ListParams),
    responses((status = 200, description = "A page of services", body = List<Service>)),
    security(("token" = [])))]
pub async fn list_services(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    Ok(listed(s.store.services(cursor.as_deref(), limit).await?))
}

/// Get a service.
#[utoipa::path(get, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Service), (status = 404, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn get_service(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(one(s.store.service(&name).await?))
}

/// Create a service.
#[utoipa::path(post, path = "/v1/services", tag = "services", request_body = Service,
    responses((status = 201, body = Service), (status = 400, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn create_service(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    JsonBody(svc): JsonBody<Service>,
) -> Result<Response, ApiError> {
    let v = s
        .store
        .put_service(svc.clone(), true, if_match(&headers)?, &actor)
        .await?;
    Ok(created(v, format!("/v1/services/{}", svc.name), svc))
}

/// Replace a service.
#[utoipa::path(put, path = "/v1/services/{name}", tag = "services", request_body = Service,
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Service), (status = 400, body = super::error::Problem),
        (status = 404, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn replace_service(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(svc): JsonBody<Service>,
) -> Result<Response, ApiError> {
    same_name(&name, &svc.name, true)?;
    let v = s
        .store
        .put_service(svc.clone(), false, if_match(&headers)?, &actor)
        .await?;
    Ok(replaced(v, svc))
}

/// Delete a service.
#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn delete_service(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    Ok(deleted(
        s.store
            .delete_service(&name, if_match(&headers)?, &actor)
            .await?,
    ))
}

// ----- users -----

/// List users.
#[utoipa::path(get, path = "/v1/users", tag = "users", params(ListParams),
    responses((status = 200, description = "A page of users", body = List<User>)),
    security(("token" = [])))]
pub async fn list_users(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    Ok(listed(s.store.users(cursor.as_deref(), limit).await?))
}

/// Get a user.
#[utoipa::path(get, path = "/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    responses((status = 200, body = User), (status = 404, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn get_user(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(one(s.store.user(&name).await?))
}

/// Create a user.
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = User,
    responses((status = 201, body = User), (status = 400, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn create_user(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    JsonBody(user): JsonBody<User>,
) -> Result<Response, ApiError> {
    let v = s
        .store
        .put_user(user.clone(), true, if_match(&headers)?, &actor)
        .await?;
    Ok(created(v, format!("/v1/users/{}", user.name), user))
}

/// Replace a user (lists replace, they do not merge).
#[utoipa::path(put, path = "/v1/users/{name}", tag = "users", request_body = User,
    params(("name" = String, Path, description = "User name")),
    responses((status = 200, body = User), (status = 400, body = super::error::Problem),
        (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem),
        (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn replace_user(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(user): JsonBody<User>,
) -> Result<Response, ApiError> {
    same_name(&name, &user.name, false)?;
    let v = s
        .store
        .put_user(user.clone(), false, if_match(&headers)?, &actor)
        .await?;
    Ok(replaced(v, user))
}

/// Delete a user.
#[utoipa::path(delete, path = "/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn delete_user(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    Ok(deleted(
        s.store
            .delete_user(&name, if_match(&headers)?, &actor)
            .await?,
    ))
}

// ----- groups -----

/// List groups.
#[utoipa::path(get, path = "/v1/groups", tag = "groups", params(ListParams),
    responses((status = 200, description = "A page of groups", body = List<Group>)),
    security(("token" = [])))]
pub async fn list_groups(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    Ok(listed(s.store.groups(cursor.as_deref(), limit).await?))
}

/// Get a group.
#[utoipa::path(get, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses((status = 200, body = Group), (status = 404, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn get_group(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(one(s.store.group(&name).await?))
}

/// Create a group.
#[utoipa::path(post, path = "/v1/groups", tag = "groups", request_body = Group,
    responses((status = 201, body = Group), (status = 400, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn create_group(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    JsonBody(group): JsonBody<Group>,
) -> Result<Response, ApiError> {
    let v = s
        .store
        .create_group(group.clone(), if_match(&headers)?, &actor)
        .await?;
    Ok(created(v, format!("/v1/groups/{}", group.name), group))
}

/// Replace a group (a group has only its name: this checks it exists and moves the
/// version).
#[utoipa::path(put, path = "/v1/groups/{name}", tag = "groups", request_body = Group,
    params(("name" = String, Path, description = "Group name")),
    responses((status = 200, body = Group), (status = 400, body = super::error::Problem),
        (status = 404, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn replace_group(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(group): JsonBody<Group>,
) -> Result<Response, ApiError> {
    same_name(&name, &group.name, false)?;
    let v = s
        .store
        .replace_group(group.clone(), if_match(&headers)?, &actor)
        .await?;
    Ok(replaced(v, group))
}

/// Delete a group; 409 while in use unless `cascade=true` (which never leaves a service
/// with no groups).
#[utoipa::path(delete, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "Group name"), DeleteParams),
    responses((status = 204), (status = 404, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn delete_group(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    q: Result<Query<DeleteParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::field("cascade", e.body_text()))?;
    Ok(deleted(
        s.store
            .delete_group(&name, p.cascade, if_match(&headers)?, &actor)
            .await?,
    ))
}
