//! Admin credentials: every request but the health checks carries a bearer token.
//!
//! Repeated failures from one source address are slowed: after a few in a minute, each
//! further failure waits longer before its 401 (up to 5 s), and every failure is logged
//! (without the token). A brute force of the 256-bit secrets is hopeless anyway; the
//! delay keeps it from costing the server much.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Failures allowed per source in a window before responses slow down.
const FREE_FAILURES: u32 = 3;
const WINDOW: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Sources remembered at most (oldest windows are dropped first).
const MAX_SOURCES: usize = 10_000;

/// Counts failed authentications per source address.
#[derive(Debug, Default)]
pub struct AuthGuard {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthGuard {
    /// Records a failure; returns how many in the window and how long to wait.
    pub fn failed(&self, ip: IpAddr) -> (u32, Duration) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_SOURCES {
            map.retain(|_, (_, start)| now.duration_since(*start) < WINDOW);
            if map.len() >= MAX_SOURCES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        let n = entry.0;
        let delay = STEP
            .saturating_mul(n.saturating_sub(FREE_FAILURES))
            .min(MAX_DELAY);
        (n, delay)
    }
}

/// The middleware: verifies the bearer token and puts the [`crate::store::Actor`] into
/// the request's extensions.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim);
    if let Some(actor) = presented.and_then(|t| state.store.verify_token(t)) {
        req.extensions_mut().insert(actor);
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| {
            c.0.ip().to_canonical()
        });
    let (failures, delay) = state.guard.failed(peer);
    tracing::warn!(
        client.addr = %peer,
        failures,
        token.present = presented.is_some(),
        path = req.uri().path(),
        "admin request refused: bad or missing token"
    );
    tokio::time::sleep(delay).await;
    ApiError::Unauthorized.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_slow_down_per_source() {
        let g = AuthGuard::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            assert_eq!(g.failed(a).1, Duration::ZERO);
        }
        assert_eq!(g.failed(a).1, STEP);
        assert_eq!(g.failed(a).1, STEP * 2);
        assert_eq!(
            g.failed(b).1,
            Duration::ZERO,
            "another source is not slowed"
        );
        for _ in 0..100 {
            g.failed(a);
        }
        assert_eq!(g.failed(a).1, MAX_DELAY);
    }
}
