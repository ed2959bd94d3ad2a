//! `/v1/nodes`: each data-plane replica's id, address, applied version, last nack, last
//! seen, and lag (config versions behind). `DELETE /v1/nodes/{id}` forgets a node that
//! is gone for good (409 while it is connected).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;

use super::error::ApiError;
use super::resources::List;
use super::AppState;
use crate::nodes::{NodeInfo, RemoveError};
use crate::store::Actor;

/// A node with its lag.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: NodeInfo,
    /// Config versions between the current one and what the node applied.
    pub lag: u64,
}

/// List data-plane nodes.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, body = List<NodeView>)), security(("token" = [])))]
pub async fn list_nodes(State(s): State<AppState>) -> Result<Json<List<NodeView>>, ApiError> {
    let current = s.store.version()?;
    let items = s
        .nodes
        .list()
        .into_iter()
        .map(|node| NodeView {
            lag: current.saturating_sub(node.applied),
            node,
        })
        .collect();
    Ok(Json(List { items, next: None }))
}

/// Remove a data-plane node that is gone for good (not while it is connected).
#[utoipa::path(delete, path = "/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 204), (status = 404, body = super::error::Problem),
        (status = 409, body = super::error::Problem)),
    security(("token" = [])))]
pub async fn remove_node(
    State(s): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.nodes.remove(&id) {
        Ok(()) => {}
        Err(RemoveError::NotFound) => {
            return Err(ApiError::NotFound(format!("node {id:?} not found")))
        }
        Err(RemoveError::Elsewhere) => {
            return Err(ApiError::Conflict {
                detail: format!(
                    "node {id:?} is known to another control-plane instance on this store \
                     (subscribed there, or last seen there): remove it on that instance"
                ),
                errors: vec![],
            })
        }
        Err(RemoveError::Connected) => {
            return Err(ApiError::Conflict {
                detail: format!(
                    "node {id:?} is connected: stop it first (a connected node is not gone, \
                     and would register again)"
                ),
                errors: vec![],
            })
        }
    }
    s.store.record(&actor, "node.remove", &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
