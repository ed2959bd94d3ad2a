//! Prometheus metrics of a data-plane node, served at `/metrics` on `--admin-listen`.
//!
//! Counted once per connection, at its end (the same place as the `connection` log
//! event), plus gauges read when scraped. Label values are service names from the
//! snapshot and constant reasons, so cardinality is bounded by the configuration.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most distinct label sets kept per counter; beyond it, counts go to `other`.
const MAX_SERIES: usize = 10_000;

/// A connection series' labels: service, decision, reason, transport.
type ConnKey = (String, &'static str, &'static str, &'static str);

#[derive(Debug, Default)]
pub struct Metrics {
    /// (service, decision, reason, transport) → connections.
    connections: Mutex<BTreeMap<ConnKey, u64>>,
    /// reason → handshake failures.
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    active: AtomicI64,
    audit_dropped: AtomicU64,
    /// Connections shed before the handshake, by reason (a fixed set).
    shed: Mutex<BTreeMap<&'static str, u64>>,
    /// When a shed connection was last logged (at most one line a second).
    shed_logged: Mutex<Option<(std::time::Instant, u64)>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn connection_opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A QUIC connection was admitted: from here its streams and flows count as
    /// connections, each opened and closed on its own.
    pub fn connection_handed_on(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a finished connection (or QUIC stream or flow); `transport` is `tcp` or
    /// `quic`.
    #[allow(clippy::too_many_arguments)]
    pub fn connection_closed(
        &self,
        service: Option<&str>,
        transport: &'static str,
        allowed: bool,
        reason: &'static str,
        handshake_failed: bool,
        bytes_up: u64,
        bytes_down: u64,
    ) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        self.bytes_down.fetch_add(bytes_down, Ordering::Relaxed);
        let decision = if allowed { "allow" } else { "deny" };
        {
            let mut m = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            let mut key = (
                service.unwrap_or("").to_owned(),
                decision,
                reason,
                transport,
            );
            if m.len() >= MAX_SERIES && !m.contains_key(&key) {
                key.0 = "other".into();
            }
            *m.entry(key).or_default() += 1;
        }
        if handshake_failed {
            let mut m = self
                .handshake_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *m.entry(reason).or_default() += 1;
        }
    }

    /// A connection refused before any crypto. Logged at most once a second, with the
    /// count since the last line: a flood must not become a flood of log lines.
    pub fn connection_shed(&self, reason: &'static str, peer: std::net::SocketAddr) {
        *self
            .shed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
        let mut last = self.shed_logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match &mut *last {
            Some((at, n)) if now.duration_since(*at) < std::time::Duration::from_secs(1) => {
                *n += 1;
            }
            _ => {
                let since = last.map_or(0, |(_, n)| n);
                tracing::warn!(
                    client.addr = %peer,
                    reason,
                    shed.unlogged = since,
                    "connection shed before the handshake"
                );
                *last = Some((now, 0));
            }
        }
    }

    /// A connection record the control plane will not get (queue full).
    pub fn audit_dropped(&self) {
        self.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition format; `snapshot` is the version in use and when it was
    /// applied (Unix seconds; 0 when none is held).
    pub fn render(&self, snapshot: (u64, u64)) -> String {
        let mut out = String::new();
        out.push_str("# HELP ztp_connections_total Connections (a QUIC stream or datagram flow is one) by service, decision, reason and transport.\n");
        out.push_str("# TYPE ztp_connections_total counter\n");
        for ((svc, decision, reason, transport), n) in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "ztp_connections_total{{service=\"{}\",decision=\"{decision}\",reason=\"{}\",transport=\"{transport}\"}} {n}",
                label(svc),
                label(reason)
            );
        }
        out.push_str("# HELP ztp_handshake_failures_total Connections refused before or in the TLS handshake, by reason.\n");
        out.push_str("# TYPE ztp_handshake_failures_total counter\n");
        for (reason, n) in self
            .handshake_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "ztp_handshake_failures_total{{reason=\"{}\"}} {n}",
                label(reason)
            );
        }
        out.push_str("# HELP ztp_connections_shed_total Connections closed before the handshake, by reason.\n");
        out.push_str("# TYPE ztp_connections_shed_total counter\n");
        for (reason, n) in self.shed.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "ztp_connections_shed_total{{reason=\"{}\"}} {n}",
                label(reason)
            );
        }
        out.push_str("# HELP ztp_bytes_total Bytes forwarded, up (client to backend) and down.\n");
        out.push_str("# TYPE ztp_bytes_total counter\n");
        let _ = writeln!(
            out,
            "ztp_bytes_total{{direction=\"up\"}} {}",
            self.bytes_up.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "ztp_bytes_total{{direction=\"down\"}} {}",
            self.bytes_down.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ztp_active_connections Connections open now.\n");
        out.push_str("# TYPE ztp_active_connections gauge\n");
        let _ = writeln!(
            out,
            "ztp_active_connections {}",
            self.active.load(Ordering::Relaxed).max(0)
        );
        out.push_str("# HELP ztp_audit_dropped_total Connection records not sent to the control plane (queue full).\n");
        out.push_str("# TYPE ztp_audit_dropped_total counter\n");
        let _ = writeln!(
            out,
            "ztp_audit_dropped_total {}",
            self.audit_dropped.load(Ordering::Relaxed)
        );
        out.push_str("# HELP ztp_snapshot_version Config version of the snapshot in use.\n");
        out.push_str("# TYPE ztp_snapshot_version gauge\n");
        let _ = writeln!(out, "ztp_snapshot_version {}", snapshot.0);
        out.push_str(
            "# HELP ztp_snapshot_age_seconds Seconds since the snapshot in use was applied.\n",
        );
        out.push_str("# TYPE ztp_snapshot_age_seconds gauge\n");
        let applied = snapshot.1;
        let age = if applied == 0 {
            0
        } else {
            now_secs().saturating_sub(applied)
        };
        let _ = writeln!(out, "ztp_snapshot_age_seconds {age}");
        {
            use crate::keyless::pool::{
                Latency, CONNECTED, LATENCY, SIGNATURES, SIGNATURE_FAILURES,
            };
            out.push_str("# HELP ztp_keyless_signatures_total Handshake signatures asked of key servers (--key keyless://), and those not obtained.\n");
            out.push_str("# TYPE ztp_keyless_signatures_total counter\n");
            let (asked, failed) = (
                SIGNATURES.load(Ordering::Relaxed),
                SIGNATURE_FAILURES.load(Ordering::Relaxed),
            );
            let _ = writeln!(
                out,
                "ztp_keyless_signatures_total{{outcome=\"ok\"}} {}",
                asked.saturating_sub(failed)
            );
            let _ = writeln!(
                out,
                "ztp_keyless_signatures_total{{outcome=\"failed\"}} {failed}"
            );
            out.push_str(
                "# HELP ztp_keyless_servers_connected Key servers this node is connected to now.\n",
            );
            out.push_str("# TYPE ztp_keyless_servers_connected gauge\n");
            let _ = writeln!(
                out,
                "ztp_keyless_servers_connected {}",
                CONNECTED.load(Ordering::Relaxed)
            );
            out.push_str("# HELP ztp_keyless_signature_seconds Time from asking the key servers for a handshake signature to its answer (or to giving up).\n");
            out.push_str("# TYPE ztp_keyless_signature_seconds histogram\n");
            let (cumulative, count, sum) = LATENCY.read();
            for (bound, n) in Latency::BOUNDS.iter().zip(&cumulative) {
                let _ = writeln!(
                    out,
                    "ztp_keyless_signature_seconds_bucket{{le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "ztp_keyless_signature_seconds_bucket{{le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(out, "ztp_keyless_signature_seconds_sum {sum}");
            let _ = writeln!(out, "ztp_keyless_signature_seconds_count {count}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::default();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed(Some("a.svc"), "tcp", true, "closed", false, 10, 20);
        m.connection_closed(None, "quic", false, "unknown sni", true, 0, 0);
        let text = m.render((7, now_secs()));
        assert!(
            text.contains(
                "ztp_connections_total{service=\"a.svc\",decision=\"allow\",reason=\"closed\",transport=\"tcp\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("ztp_handshake_failures_total{reason=\"unknown sni\"} 1"));
        assert!(text.contains("ztp_bytes_total{direction=\"up\"} 10"));
        assert!(text.contains("ztp_bytes_total{direction=\"down\"} 20"));
        assert!(text.contains("ztp_active_connections 0"));
        assert!(text.contains("ztp_snapshot_version 7"));
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
