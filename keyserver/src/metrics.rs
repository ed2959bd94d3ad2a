//! Prometheus metrics of the key server, served at `/metrics` on `--admin-listen`.
//!
//! Label values are key names (the files of `--keys`), opcode names and error codes: all
//! bounded by the configuration or the protocol.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ztp_proto::keyless::{ErrorCode, Op};

/// Counters and gauges; cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (key name, op) → signatures made.
    signatures: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Error code → answers carrying it.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    pongs: AtomicU64,
    /// Time spent signing, in microseconds, and how many signatures it covers.
    sign_micros: AtomicU64,
    /// Connections that completed the handshake.
    connections: AtomicU64,
    active: AtomicI64,
    /// Connections closed before the handshake for the connection cap.
    refused: AtomicU64,
    /// Handshakes that failed, by reason.
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    inflight: AtomicI64,
    keys: AtomicU64,
    /// Reloads by result (`ok`, `error`).
    reloads: Mutex<BTreeMap<&'static str, u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(key).or_insert(0) += 1;
}

fn snapshot<K: Ord + Clone>(map: &Mutex<BTreeMap<K, u64>>) -> BTreeMap<K, u64> {
    map.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn signed(&self, key: &str, op: Op, took: Duration) {
        self.sign_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        bump(&self.signatures, (key.to_owned(), op.as_str()));
    }

    pub fn error(&self, code: ErrorCode) {
        bump(&self.errors, code.as_str());
    }

    pub fn pong(&self) {
        self.pongs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// `reason`: `timeout`, `not_node` (a certificate from the CA that is not a node's),
    /// `error` (anything else).
    pub fn handshake_failed(&self, reason: &'static str) {
        bump(&self.handshake_failures, reason);
    }

    pub fn inflight(&self, delta: i64) {
        self.inflight.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn reloaded(&self, ok: bool, keys: usize) {
        bump(&self.reloads, if ok { "ok" } else { "error" });
        if ok {
            self.set_keys(keys);
        }
    }

    pub fn set_keys(&self, keys: usize) {
        self.keys.store(keys as u64, Ordering::Relaxed);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP ztp_keyserver_signatures_total Signatures made, by key and operation.\n# TYPE ztp_keyserver_signatures_total counter\n");
        let signatures = snapshot(&self.signatures);
        let total: u64 = signatures.values().sum();
        for ((key, op), n) in &signatures {
            let _ = writeln!(
                out,
                "ztp_keyserver_signatures_total{{key=\"{}\",op=\"{op}\"}} {n}",
                label(key)
            );
        }
        out.push_str("# HELP ztp_keyserver_sign_seconds Time spent signing.\n# TYPE ztp_keyserver_sign_seconds summary\n");
        let _ = writeln!(
            out,
            "ztp_keyserver_sign_seconds_sum {}\nztp_keyserver_sign_seconds_count {total}",
            self.sign_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        out.push_str("# HELP ztp_keyserver_errors_total Requests answered with an error, by code.\n# TYPE ztp_keyserver_errors_total counter\n");
        for (code, n) in snapshot(&self.errors) {
            let _ = writeln!(out, "ztp_keyserver_errors_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_pings_total Pings answered.\n# TYPE ztp_keyserver_pings_total counter\nztp_keyserver_pings_total {}",
            self.pongs.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_connections_total Client connections that completed the handshake.\n# TYPE ztp_keyserver_connections_total counter\nztp_keyserver_connections_total {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_connections_active Client connections open now.\n# TYPE ztp_keyserver_connections_active gauge\nztp_keyserver_connections_active {}",
            self.active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_connections_refused_total Connections closed at accept for --max-connections.\n# TYPE ztp_keyserver_connections_refused_total counter\nztp_keyserver_connections_refused_total {}",
            self.refused.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ztp_keyserver_handshake_failures_total Failed handshakes, by reason.\n# TYPE ztp_keyserver_handshake_failures_total counter\n");
        for (reason, n) in snapshot(&self.handshake_failures) {
            let _ = writeln!(
                out,
                "ztp_keyserver_handshake_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_requests_inflight Requests read and not yet answered.\n# TYPE ztp_keyserver_requests_inflight gauge\nztp_keyserver_requests_inflight {}",
            self.inflight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ztp_keyserver_keys Keys loaded.\n# TYPE ztp_keyserver_keys gauge\nztp_keyserver_keys {}",
            self.keys.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ztp_keyserver_reloads_total Reloads (SIGHUP), by result.\n# TYPE ztp_keyserver_reloads_total counter\n");
        for (result, n) in snapshot(&self.reloads) {
            let _ = writeln!(
                out,
                "ztp_keyserver_reloads_total{{result=\"{result}\"}} {n}"
            );
        }
        out
    }
}
