//! The admin listener: `/healthz` (the process runs), `/readyz` (it holds a snapshot and
//! accepts connections; with `--control`, a second line names the control-plane
//! instance in use: `control: URL (subscribed|connecting)`) and `/metrics` (Prometheus).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::snapshot::Active;
pub use crate::snapshot::Readiness;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Receiver<Arc<Active>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl axum::response::IntoResponse {
    let (version, applied_at) = {
        let a = s.state.borrow();
        (
            a.policy.version,
            if s.ready.get() { a.applied_at } else { 0 },
        )
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render((version, applied_at)),
    )
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let (status, mut body) = if s.ready.get() {
        (StatusCode::OK, String::from("ready\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
    };
    if let Some((url, subscribed)) = s.ready.control() {
        let state = if subscribed {
            "subscribed"
        } else {
            "connecting"
        };
        body.push_str(&format!("control: {url} ({state})\n"));
    }
    (status, body)
}

/// Serves the admin port until `shutdown`, within `ztp_infra::http`'s limits on
/// connections, handshake, header and body time.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = ztp_infra::http::Limits::default();
    ztp_infra::http::serve(
        listener,
        ztp_infra::http::Plain,
        router(state),
        limits,
        shutdown,
    )
    .await
}
