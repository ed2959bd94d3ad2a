//! The admin listener: `/healthz` (the process runs), `/readyz` (it holds a snapshot and
//! accepts connections) and `/metrics` (Prometheus).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::snapshot::Active;

/// Whether the node is ready for traffic: it holds a snapshot, and (with
/// `--max-snapshot-age`) has not been out of reach of the control plane for too long.
#[derive(Debug)]
pub struct Readiness {
    ready: AtomicBool,
    /// The bound of `--max-snapshot-age`.
    max_age: Option<Duration>,
    /// Milliseconds since `base` when contact with the control plane was lost, plus
    /// one; 0 while in contact (or when no control plane is used).
    lost_at: AtomicU64,
    base: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new(None)
    }
}

impl Readiness {
    pub fn new(max_age: Option<Duration>) -> Self {
        Readiness {
            ready: AtomicBool::new(false),
            max_age,
            lost_at: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Ready, and the snapshot not stale.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.stale()
    }

    /// The config stream is up: the snapshot held is the control plane's latest.
    pub fn in_contact(&self) {
        self.lost_at.store(0, Ordering::Release);
    }

    /// The config stream ended; the clock of `--max-snapshot-age` starts (if not already).
    pub fn lost_contact(&self) {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let _ = self
            .lost_at
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Out of reach of the control plane for longer than `--max-snapshot-age`: new
    /// connections are refused (fail closed).
    pub fn stale(&self) -> bool {
        let Some(max) = self.max_age else {
            return false;
        };
        let lost = self.lost_at.load(Ordering::Acquire);
        lost != 0 && self.base.elapsed().as_millis() as u64 + 1 - lost > max.as_millis() as u64
    }
}

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

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
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
