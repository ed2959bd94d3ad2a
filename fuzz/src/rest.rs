//! `rest_bodies`: the control plane's REST API with arbitrary request bodies.
//!
//! One process keeps one store (sled, in a fresh folder under the temporary directory,
//! which `run.sh` points at a tmpfs), one router (`ztp_control::api::router`, as the
//! API tests build it) and one current-thread tokio runtime. Every input starts from
//! [`BASELINE`]: after an input that changed the configuration, the next one begins
//! with a re-import, so each input replays alone exactly as it ran (admin tokens it
//! created stay; they are not configuration).
//!
//! Input: up to 8 requests, each `[route][flags][length: u16 BE][body]` (the last body
//! takes what is left if the input is shorter than its length). `route` picks one of
//! [`ROUTES`]; `flags` picks the name in a `PUT` path (bits 0-1), the `If-Match` header
//! (bits 2-3: none, the current version, a stale one, `*`) and, bit 4, a `text/plain`
//! content type instead of the route's own. Every request carries a valid admin token.
//!
//! Properties, for every request: no panic; never a 5xx; every 4xx is a problem
//! document (`application/problem+json` whose `status` is the response's); a refused
//! write stores nothing (the config version does not move); and after an accepted write
//! the store's snapshot still validates and compiles for a data plane (what the control
//! plane serves, every node can apply).
//!
//! `ZTP_FUZZ_VERBOSE=1` prints each request and response, to read a replay.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Method, Request};
use http_body_util::BodyExt;
use tower::ServiceExt;
use ztp_control::api::{router, AppState};
use ztp_control::store::{Actor, Store};
use ztp_dataplane::handler::Registry;
use ztp_dataplane::snapshot::Policy;
use ztp_proto::Snapshot;

/// What the store holds before each input.
pub const BASELINE: &str = r#"
version: 1
services:
  - name: ssh.svc.internal
    protocol: tcp
    address: "127.0.0.1:22"
    groups: [admins]
    allow: ["10.0.0.0/8"]
  - name: "*.svc.internal"
    address: "backend.internal:8080"
    groups: [ops]
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [admins]
  - name: bob
    identities: ["bob@example.com", "spiffe://example.org/bob"]
    groups: [ops, admins]
  - name: carol
    identities: ["CN-Carol"]
    disabled: true
groups:
  - name: admins
  - name: ops
  - name: empty
revoked: ["0a1b2c3d"]
"#;

/// A resource route a body is sent to.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    /// With `{}` for the name a `PUT` replaces.
    pub path: &'static str,
    /// Names for `{}`, chosen by the flags.
    pub names: [&'static str; 4],
    pub content_type: &'static str,
}

const NO_NAMES: [&str; 4] = [""; 4];
const SERVICES: [&str; 4] = [
    "ssh.svc.internal",
    "SSH.Svc.Internal",
    "*.svc.internal",
    "new.svc.internal",
];
const USERS: [&str; 4] = ["alice", "bob", "Alice", "dave"];
const GROUPS: [&str; 4] = ["admins", "ops", "empty", "new"];
const JSON: &str = "application/json";

pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/v1/services",
        names: NO_NAMES,
        content_type: JSON,
    },
    Route {
        method: "PUT",
        path: "/v1/services/{}",
        names: SERVICES,
        content_type: JSON,
    },
    Route {
        method: "POST",
        path: "/v1/users",
        names: NO_NAMES,
        content_type: JSON,
    },
    Route {
        method: "PUT",
        path: "/v1/users/{}",
        names: USERS,
        content_type: JSON,
    },
    Route {
        method: "POST",
        path: "/v1/groups",
        names: NO_NAMES,
        content_type: JSON,
    },
    Route {
        method: "PUT",
        path: "/v1/groups/{}",
        names: GROUPS,
        content_type: JSON,
    },
    Route {
        method: "POST",
        path: "/v1/import",
        names: NO_NAMES,
        content_type: JSON,
    },
    Route {
        method: "POST",
        path: "/v1/import",
        names: NO_NAMES,
        content_type: "application/yaml",
    },
    Route {
        method: "POST",
        path: "/v1/revoked",
        names: NO_NAMES,
        content_type: JSON,
    },
    Route {
        method: "POST",
        path: "/v1/tokens",
        names: NO_NAMES,
        content_type: JSON,
    },
];

const MAX_REQUESTS: usize = 8;

/// One request of an input, as the seeds are written: `[route][flags][len][body]`.
pub fn encode_request(route: u8, flags: u8, body: &[u8], out: &mut Vec<u8>) {
    let len = u16::try_from(body.len()).expect("a seed body fits in 64 KiB");
    out.push(route);
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

/// Splits an input into `(route, flags, body)` requests.
fn requests(mut data: &[u8]) -> Vec<(u8, u8, &[u8])> {
    let mut out = Vec::new();
    while out.len() < MAX_REQUESTS {
        let [route, flags, rest @ ..] = data else {
            break;
        };
        let (len, rest) = match rest {
            [hi, lo, rest @ ..] => (u16::from_be_bytes([*hi, *lo]) as usize, rest),
            _ => (0, rest),
        };
        let (body, rest) = rest.split_at(len.min(rest.len()));
        out.push((*route, *flags, body));
        data = rest;
    }
    out
}

struct Env {
    rt: tokio::runtime::Runtime,
    store: Arc<Store>,
    app: axum::Router,
    bearer: String,
    baseline: Snapshot,
    /// The config version while the store holds the baseline.
    baseline_version: AtomicU64,
}

const DIR_PREFIX: &str = "ztp-fuzz-rest-";

/// Removes store folders left by earlier runs whose process is gone (a fuzzer process
/// ends by `exit`, so nothing of its own can clean up after it).
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Env {
    fn new() -> Env {
        let tmp = std::env::temp_dir();
        remove_stale_dirs(&tmp);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir: PathBuf = tmp.join(format!("{DIR_PREFIX}{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the store's folder");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let store = Arc::new(Store::open(&dir).expect("open the store"));
        let baseline = Snapshot::from_yaml(BASELINE).expect("the baseline is valid");
        let (token, version) = rt.block_on(async {
            let token = store
                .create_token("fuzz", &Actor::system())
                .await
                .expect("create a token");
            let version = store
                .import(baseline.clone(), None, &Actor::system())
                .await
                .expect("import the baseline");
            (token.token, version)
        });
        Env {
            rt,
            app: router(AppState::new(store.clone())),
            store,
            bearer: format!("Bearer {token}"),
            baseline,
            baseline_version: AtomicU64::new(version),
        }
    }
}

/// `ZTP_FUZZ_VERBOSE=1` prints every request and its response (to read a replay).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("ZTP_FUZZ_VERBOSE").is_some())
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(Env::new)
}

pub fn run(data: &[u8]) {
    let env = env();
    env.rt.block_on(async {
        // Back to the baseline if the last input (even one that panicked) changed it.
        let version = env.store.version().expect("store version");
        if version != env.baseline_version.load(Ordering::Relaxed) {
            let v = env
                .store
                .import(env.baseline.clone(), None, &Actor::system())
                .await
                .expect("re-import the baseline");
            env.baseline_version.store(v, Ordering::Relaxed);
        }
        for (route, flags, body) in requests(data) {
            send(env, route, flags, body).await;
        }
    });
}

async fn send(env: &Env, route: u8, flags: u8, body: &[u8]) {
    let route = ROUTES[route as usize % ROUTES.len()];
    let path = route.path.replace("{}", route.names[(flags & 3) as usize]);
    let before = env.store.version().expect("store version");
    let if_match = match (flags >> 2) & 3 {
        0 => None,
        1 => Some(format!("\"{before}\"")),
        2 => Some(format!("\"{}\"", before.saturating_sub(1))),
        _ => Some("*".to_owned()),
    };
    let content_type = if flags & 0x10 != 0 {
        "text/plain"
    } else {
        route.content_type
    };
    let mut req = Request::builder()
        .method(Method::from_bytes(route.method.as_bytes()).expect("a method"))
        .uri(&path)
        .header(header::AUTHORIZATION, &env.bearer)
        .header(header::CONTENT_TYPE, content_type);
    if let Some(v) = &if_match {
        req = req.header(header::IF_MATCH, v);
    }
    let req = req.body(Body::from(body.to_vec())).expect("a request");

    let resp = env.app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let resp_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp_body = resp
        .into_body()
        .collect()
        .await
        .expect("the response body")
        .to_bytes();
    let what = || {
        format!(
            "{} {path} (content-type {content_type}, if-match {if_match:?}) with body {:?}\n\
             -> {status} {}",
            route.method,
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&resp_body)
        )
    };

    if verbose() {
        eprintln!("{}", what());
    }
    assert!(!status.is_server_error(), "server error: {}", what());
    let after = env.store.version().expect("store version");
    if status.is_client_error() {
        assert_eq!(
            resp_type.as_deref(),
            Some("application/problem+json"),
            "a refusal that is not a problem document: {}",
            what()
        );
        let problem: serde_json::Value = serde_json::from_slice(&resp_body)
            .unwrap_or_else(|e| panic!("a problem document that is not JSON ({e}): {}", what()));
        assert_eq!(
            problem["status"].as_u64(),
            Some(u64::from(status.as_u16())),
            "problem status: {}",
            what()
        );
        assert_eq!(
            before,
            after,
            "a refused write changed the version: {}",
            what()
        );
    } else if status.is_success() && after != before {
        let snap = env.store.snapshot().await.expect("the store's snapshot");
        if let Err(e) = Policy::compile(&snap, &Registry::builtin()) {
            panic!(
                "the store serves a snapshot data planes refuse ({e}) after {}\n{}",
                what(),
                snap.to_yaml()
            );
        }
    }
}
