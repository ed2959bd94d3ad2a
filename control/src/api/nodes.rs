//! `/v1/nodes`: each data-plane replica's id, address, applied version, last nack, last
//! seen, and lag (config versions behind).

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::resources::List;
use super::AppState;
use crate::nodes::NodeInfo;

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
