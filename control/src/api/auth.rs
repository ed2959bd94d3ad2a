//! Admin credentials: every request but the health checks carries a bearer token.
//!
//! Repeated failures from one source address are slowed: after a few in a minute, each
//! further failure waits longer before its 401 (up to 5 s), and every failure is logged
//! (without the token). A brute force of the 256-bit secrets is hopeless anyway; the
//! delay keeps it from costing the server much.
//!
//! A valid token may still be refused: its [`Role`] decides which requests it may make
//! (DESIGN.md "REST conventions"), checked here for every route in one table
//! ([`permits`]), and a request beyond it gets 403.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::store::Role;

/// Where an operator may write: the configuration, and nothing else. An allowlist, so a
/// route added later is admin-only for writes until it is named here.
const OPERATOR_WRITES: &[&str] = &[
    "/v1/services",
    "/v1/users",
    "/v1/groups",
    "/v1/connectors",
    "/v1/revoked",
    "/v1/import",
];

/// Whether a token with `role` may make a request: `viewer` reads (but not tokens),
/// `operator` reads and writes the configuration (but neither tokens nor the node
/// registry), `admin` everything.
pub fn permits(role: Role, method: &Method, path: &str) -> bool {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let tokens = under("/v1/tokens");
    let read = method == Method::GET || method == Method::HEAD;
    match role {
        Role::Admin => true,
        Role::Operator => !tokens && (read || OPERATOR_WRITES.iter().any(|p| under(p))),
        Role::Viewer => !tokens && read,
    }
}

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
        let role = actor.role;
        if !permits(role, req.method(), req.uri().path()) {
            tracing::warn!(
                actor = %actor.token_name,
                role = %role,
                http.method = %req.method(),
                path = req.uri().path(),
                "admin request refused: beyond the token's role"
            );
            let detail = format!(
                "token {:?} has role {role}, which may not {} {}",
                actor.token_name,
                req.method(),
                req.uri().path()
            );
            let mut resp = ApiError::Forbidden(detail).into_response();
            resp.extensions_mut().insert(actor);
            return resp;
        }
        req.extensions_mut().insert(actor);
        req.extensions_mut().insert(role);
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
    fn roles_permit_table() {
        use Role::*;
        let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
        let cases: &[(&Method, &str, [bool; 3])] = &[
            // method, path, [viewer, operator, admin]
            (&get, "/v1/services", [true, true, true]),
            (&get, "/v1/audit/admin", [true, true, true]),
            (&get, "/metrics", [true, true, true]),
            (&get, "/v1/nodes", [true, true, true]),
            (&post, "/v1/services", [false, true, true]),
            (&put, "/v1/users/alice", [false, true, true]),
            (&delete, "/v1/groups/ops", [false, true, true]),
            (&post, "/v1/revoked", [false, true, true]),
            (&post, "/v1/import", [false, true, true]),
            (&delete, "/v1/nodes/n1", [false, false, true]),
            (&get, "/v1/tokens", [false, false, true]),
            (&post, "/v1/tokens", [false, false, true]),
            (&delete, "/v1/tokens/abc", [false, false, true]),
            // A prefix is a path segment, not a string prefix.
            (&get, "/v1/tokensx", [true, true, true]),
        ];
        for (method, path, want) in cases {
            for (role, want) in [Viewer, Operator, Admin].into_iter().zip(want) {
                assert_eq!(permits(role, method, path), *want, "{role} {method} {path}");
            }
        }
    }

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

#[cfg(test)]
mod permits_tests {
    use super::*;

    /// Operator writes are an allowlist: a route not named is admin-only for writes.
    #[test]
    fn an_operator_writes_only_the_configuration() {
        let post = Method::POST;
        for path in [
            "/v1/services",
            "/v1/users/alice",
            "/v1/groups/g",
            "/v1/connectors",
            "/v1/connectors/lab",
            "/v1/revoked/0a",
            "/v1/import",
        ] {
            assert!(permits(Role::Operator, &post, path), "{path}");
            assert!(!permits(Role::Viewer, &post, path), "{path}");
        }
        for path in [
            "/v1/tokens",
            "/v1/nodes/n1",
            "/v1/snapshot",
            "/v1/some-future-route",
            "/v1/servicesX",
            "/v1/connectorsX",
        ] {
            assert!(!permits(Role::Operator, &post, path), "{path}");
            assert!(permits(Role::Admin, &post, path), "{path}");
        }
        assert!(permits(
            Role::Operator,
            &Method::GET,
            "/v1/some-future-route"
        ));
        assert!(!permits(Role::Viewer, &Method::GET, "/v1/tokens"));
    }
}
