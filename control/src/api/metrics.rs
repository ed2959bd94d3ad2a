//! `/metrics` of the control plane (Prometheus text): the config version and, per data
//! plane node, whether it is connected, the version it applied, its lag and whether its
//! configuration diverged from the control plane's; divergences found by this instance.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::error::ApiError;
use super::AppState;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus metrics (needs a token, like every route but the health checks).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, body = String, description = "Prometheus text format")),
    security(("token" = [])))]
pub async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let version = s.store.version()?;
    let nodes = s.nodes.list();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut out = String::new();
    out.push_str(
        "# HELP ztp_config_version The current config version.\n# TYPE ztp_config_version gauge\n",
    );
    let _ = writeln!(out, "ztp_config_version {version}");
    out.push_str("# HELP ztp_nodes_connected Data-plane nodes subscribed now.\n# TYPE ztp_nodes_connected gauge\n");
    let _ = writeln!(
        out,
        "ztp_nodes_connected {}",
        nodes.iter().filter(|n| n.connected).count()
    );
    out.push_str("# HELP ztp_node_applied_version The config version a node last acked.\n# TYPE ztp_node_applied_version gauge\n");
    for n in &nodes {
        let _ = writeln!(
            out,
            "ztp_node_applied_version{{node=\"{}\"}} {}",
            label(&n.id),
            n.applied
        );
    }
    out.push_str("# HELP ztp_node_lag_versions Config versions a node is behind.\n# TYPE ztp_node_lag_versions gauge\n");
    for n in &nodes {
        let _ = writeln!(
            out,
            "ztp_node_lag_versions{{node=\"{}\"}} {}",
            label(&n.id),
            version.saturating_sub(n.applied)
        );
    }
    out.push_str("# HELP ztp_node_connected Whether a node is subscribed.\n# TYPE ztp_node_connected gauge\n");
    for n in &nodes {
        let _ = writeln!(
            out,
            "ztp_node_connected{{node=\"{}\"}} {}",
            label(&n.id),
            u8::from(n.connected)
        );
    }
    out.push_str("# HELP ztp_nodes_diverged Data-plane nodes whose configuration digest differed from the control plane's at their last verdict.\n# TYPE ztp_nodes_diverged gauge\n");
    let _ = writeln!(
        out,
        "ztp_nodes_diverged {}",
        nodes.iter().filter(|n| n.diverged).count()
    );
    out.push_str("# HELP ztp_node_diverged Whether a node's configuration digest differed from the control plane's at its last verdict.\n# TYPE ztp_node_diverged gauge\n");
    for n in &nodes {
        let _ = writeln!(
            out,
            "ztp_node_diverged{{node=\"{}\"}} {}",
            label(&n.id),
            u8::from(n.diverged)
        );
    }
    out.push_str("# HELP ztp_node_divergences_total Acks whose configuration digest differed from the control plane's, found by this instance.\n# TYPE ztp_node_divergences_total counter\n");
    let _ = writeln!(out, "ztp_node_divergences_total {}", s.nodes.divergences());
    out.push_str("# HELP ztp_node_last_seen_seconds Seconds since a node's last message.\n# TYPE ztp_node_last_seen_seconds gauge\n");
    for n in &nodes {
        let _ = writeln!(
            out,
            "ztp_node_last_seen_seconds{{node=\"{}\"}} {}",
            label(&n.id),
            now_ms.saturating_sub(n.last_seen_ms) / 1000
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}
