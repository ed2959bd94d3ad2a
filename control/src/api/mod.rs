//! The REST admin API (DESIGN.md "REST conventions").
//!
//! JSON with the snapshot's field names; errors are problem documents naming the field;
//! `ETag` is the config version in quotes and `If-Match` makes writes conditional. Every
//! route but `/healthz` and `/readyz` needs an admin token, and the token's role must
//! allow the request (`auth::permits`). Bodies are limited: 1 MiB for
//! a record, 64 MiB for `/v1/import`. The OpenAPI document at `/v1/openapi.json` is
//! generated from the handlers' annotations.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::nodes::Nodes;
use crate::store::{Actor, Store};

pub mod audit;
pub mod auth;
pub mod body;
pub mod config;
pub mod connectors;
pub mod error;
pub mod https;
pub mod metrics;
pub mod nodes;
pub mod resources;
pub mod revoked;
pub mod tokens;

use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub guard: Arc<auth::AuthGuard>,
    pub nodes: Arc<Nodes>,
}

impl AppState {
    pub fn new(store: Arc<Store>) -> Self {
        Self::with_nodes(store, Arc::default())
    }

    /// With the node registry the gRPC service fills.
    pub fn with_nodes(store: Arc<Store>, nodes: Arc<Nodes>) -> Self {
        AppState {
            store,
            guard: Arc::new(auth::AuthGuard::default()),
            nodes,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ZTP control plane", description = "Admin API of the ZTP zero-trust proxy."),
    paths(
        resources::list_services, resources::get_service, resources::create_service,
        resources::replace_service, resources::delete_service,
        resources::list_users, resources::get_user, resources::create_user,
        resources::replace_user, resources::delete_user,
        resources::list_groups, resources::get_group, resources::create_group,
        resources::replace_group, resources::delete_group,
        connectors::list_connectors, connectors::get_connector, connectors::create_connector,
        connectors::replace_connector, connectors::delete_connector,
        config::snapshot, config::import,
        tokens::list_tokens, tokens::create_token, tokens::revoke_token,
        nodes::list_nodes, nodes::remove_node,
        revoked::list_revoked, revoked::revoke, revoked::unrevoke,
        metrics::metrics,
        audit::audit, audit::admin_audit,
        healthz, readyz,
    ),
    components(schemas(error::Problem, error::ProblemField)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every operation but the health checks needs the token: each may answer 401.
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let unauthorized = ResponseBuilder::new()
            .description("No admin token, or not a valid one")
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        let forbidden = ResponseBuilder::new()
            .description("The token's role does not allow this request")
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if path == "/healthz" || path == "/readyz" {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .entry("401".into())
                    .or_insert_with(|| unauthorized.clone().into());
                op.responses
                    .responses
                    .entry("403".into())
                    .or_insert_with(|| forbidden.clone().into());
            }
        }
    }
}

/// The process runs.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = String)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The store is open and answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = String), (status = 503, body = String)))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    match s.store.version() {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource".into())
}

/// Logs each admin request once: method, path, status, who. Never a token or a body.
async fn access_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let actor = resp
        .extensions()
        .get::<Actor>()
        .map(|a| a.token_name.clone());
    tracing::info!(
        http.method = %method,
        http.path = %path,
        http.status = resp.status().as_u16(),
        actor = actor.as_deref(),
        "admin request"
    );
    resp
}

/// Copies the actor into the response so the access log can name it.
async fn actor_to_response(
    Extension(actor): Extension<Actor>,
    req: Request,
    next: Next,
) -> Response {
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(actor);
    resp
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    use resources as r;
    let v1 = Router::new()
        .route(
            "/v1/services",
            get(r::list_services).post(r::create_service),
        )
        .route(
            "/v1/services/{name}",
            get(r::get_service)
                .put(r::replace_service)
                .delete(r::delete_service),
        )
        .route("/v1/users", get(r::list_users).post(r::create_user))
        .route(
            "/v1/users/{name}",
            get(r::get_user).put(r::replace_user).delete(r::delete_user),
        )
        .route("/v1/groups", get(r::list_groups).post(r::create_group))
        .route(
            "/v1/groups/{name}",
            get(r::get_group)
                .put(r::replace_group)
                .delete(r::delete_group),
        )
        .route(
            "/v1/connectors",
            get(connectors::list_connectors).post(connectors::create_connector),
        )
        .route(
            "/v1/connectors/{name}",
            get(connectors::get_connector)
                .put(connectors::replace_connector)
                .delete(connectors::delete_connector),
        )
        .route("/v1/snapshot", get(config::snapshot))
        .route(
            "/v1/import",
            post(config::import).layer(DefaultBodyLimit::max(body::IMPORT_LIMIT)),
        )
        .route(
            "/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(tokens::revoke_token),
        )
        .route("/v1/nodes", get(nodes::list_nodes))
        .route("/v1/nodes/{id}", axum::routing::delete(nodes::remove_node))
        .route(
            "/v1/revoked",
            get(revoked::list_revoked).post(revoked::revoke),
        )
        .route(
            "/v1/revoked/{serial}",
            axum::routing::delete(revoked::unrevoke),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/audit", get(audit::audit))
        .route("/v1/audit/admin", get(audit::admin_audit))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(actor_to_response))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .layer(DefaultBodyLimit::max(body::RECORD_LIMIT))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

#[cfg(test)]
mod tests;
