//! `/v1/connectors`: the connector registry (DESIGN.md "Connectors"). Create (`POST`, 409
//! if the name exists), get, list with pagination, replace (`PUT`: the description),
//! delete (409 while a service is served through the connector; no cascade). Every
//! response carries the config version as `ETag`; writes honour `If-Match`.
//!
//! A connector as the API shows it is the snapshot's record (`name`, `description`) and
//! its live `tunnels` (replica, transport, since), which the replicas report and the
//! node registry keeps in memory: read-only, never stored, accepted back and ignored on
//! writes so that what `GET` returns can be `PUT` again.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Serialize};
use ztp_proto::Connector;

use super::body::JsonBody;
use super::error::ApiError;
use super::resources::{
    created, deleted, if_match, list_params, listed, one, replaced, same_name, ListParams,
};
use super::AppState;
use crate::nodes::Tunnel;
use crate::store::{Actor, Page};

/// A connector: the registry's record (the snapshot's fields) and its live tunnels.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectorView {
    pub name: String,
    /// Left out when empty, as in the snapshot.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Live tunnels to the replicas, as they report them (read-only; empty while the
    /// connector runs nowhere).
    pub tunnels: Vec<Tunnel>,
}

/// The body of a create or replace: the record. `tunnels` is read-only and ignored, so
/// that a `GET`'s body can be sent back.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectorWrite {
    /// A plain name: letters, digits, `-`, `_`, `.`; the certificate's URI is
    /// `spiffe://TRUST_DOMAIN/connector/NAME`.
    pub name: String,
    /// What it is for, where it runs (at most 1024 bytes, no control characters).
    #[serde(default)]
    pub description: String,
    /// Ignored: live state.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Tunnel>>, read_only)]
    pub tunnels: Option<serde::de::IgnoredAny>,
}

impl ConnectorWrite {
    fn record(self) -> Connector {
        Connector {
            name: self.name,
            description: self.description,
        }
    }
}

fn view(s: &AppState, connector: Connector) -> ConnectorView {
    ConnectorView {
        tunnels: s.nodes.tunnels(&connector.name),
        name: connector.name,
        description: connector.description,
    }
}

/// List connectors with their live tunnels.
#[utoipa::path(get, path = "/v1/connectors", tag = "connectors", params(ListParams),
    responses((status = 200, description = "A page of connectors",
        body = super::resources::List<ConnectorView>)),
    security(("token" = [])))]
pub async fn list_connectors(
    State(s): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (cursor, limit) = list_params(q)?;
    let (page, version) = s.store.connectors(cursor.as_deref(), limit).await?;
    let page = Page {
        items: page.items.into_iter().map(|c| view(&s, c)).collect(),
        next: page.next,
    };
    Ok(listed((page, version)))
}

/// Get a connector with its live tunnels.
#[utoipa::path(get, path = "/v1/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = ConnectorView), (status = 404, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn get_connector(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (c, version) = s.store.connector(&name).await?;
    Ok(one((view(&s, c), version)))
}

/// Register a connector.
#[utoipa::path(post, path = "/v1/connectors", tag = "connectors", request_body = ConnectorWrite,
    responses((status = 201, body = ConnectorView), (status = 400, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn create_connector(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ConnectorWrite>,
) -> Result<Response, ApiError> {
    let c = body.record();
    let v = s
        .store
        .put_connector(c.clone(), true, if_match(&headers)?, &actor)
        .await?;
    let location = format!("/v1/connectors/{}", c.name);
    Ok(created(v, location, view(&s, c)))
}

/// Replace a connector (its description; the name cannot change).
#[utoipa::path(put, path = "/v1/connectors/{name}", tag = "connectors",
    request_body = ConnectorWrite,
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 200, body = ConnectorView), (status = 400, body = super::error::Problem),
        (status = 404, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn replace_connector(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ConnectorWrite>,
) -> Result<Response, ApiError> {
    same_name(&name, &body.name, false)?;
    let c = body.record();
    let v = s
        .store
        .put_connector(c.clone(), false, if_match(&headers)?, &actor)
        .await?;
    Ok(replaced(v, view(&s, c)))
}

/// Delete a connector; 409 while a service is served through it (change or remove those
/// services first: there is no cascade).
#[utoipa::path(delete, path = "/v1/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses((status = 204), (status = 404, body = super::error::Problem),
        (status = 409, body = super::error::Problem), (status = 412, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn delete_connector(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    Ok(deleted(
        s.store
            .delete_connector(&name, if_match(&headers)?, &actor)
            .await?,
    ))
}
