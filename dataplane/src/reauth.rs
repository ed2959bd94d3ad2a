//! Continuous authorization: a live connection is decided again on every new snapshot,
//! and ends when its client certificate expires.
//!
//! [`recheck`] is the decision, a pure function of (snapshot, connection); [`watch`]
//! turns it into a future that completes with the reason the connection must end. The
//! handlers race it against their work and close the client the way DESIGN.md says: the
//! 403 line if nothing has been forwarded yet, close_notify otherwise.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::authz::{self, Denial};
use crate::identity::ClientIdentity;
use crate::routing::Route;
use crate::snapshot::Active;

/// Completes with the reason a live connection must end.
pub type Revoked = Pin<Box<dyn Future<Output = &'static str> + Send>>;

/// A future that never completes: for connections nothing can revoke (tests).
pub fn never() -> Revoked {
    Box::pin(std::future::pending())
}

/// Whether a connection admitted to `route` may go on under `active`; `Some(reason)`
/// when it must end.
pub fn recheck(
    active: &Active,
    sni: &str,
    source: IpAddr,
    identity: &ClientIdentity,
    route: &Arc<Route>,
) -> Option<&'static str> {
    if active.policy.revoked.contains(&identity.serial) {
        return Some("certificate revoked");
    }
    let Some(now) = active.policy.routes.lookup(sni) else {
        return Some("service removed");
    };
    if now.backend != route.backend
        || now.protocol != route.protocol
        || now.handler.as_ref().map(|h| h.name()) != route.handler.as_ref().map(|h| h.name())
    {
        return Some("service retargeted");
    }
    if !now.admits_source(source) {
        return Some("source not allowed");
    }
    match authz::authorize(&active.policy.directory, identity, now) {
        Ok(_) => None,
        Err((Denial::UnknownIdentity, _)) => Some("user removed"),
        Err((Denial::UserDisabled, _)) => Some("user disabled"),
        Err((Denial::NotInGroup, _)) => Some("not in group"),
    }
}

/// Watches the published state and the certificate's expiry for one connection.
pub fn watch(
    mut state: watch::Receiver<Arc<Active>>,
    sni: String,
    source: IpAddr,
    identity: ClientIdentity,
    route: Arc<Route>,
) -> Revoked {
    Box::pin(async move {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // A certificate is valid through its notAfter second (RFC 5280): it ends when
        // the next second begins, as the handshake check sees it.
        let end = Duration::from_secs(identity.not_after.max(0) as u64 + 1);
        let left = end.saturating_sub(now);
        let expiry = tokio::time::sleep(left);
        tokio::pin!(expiry);
        // The state may have moved between the decision and now.
        state.mark_changed();
        loop {
            tokio::select! {
                _ = &mut expiry => return "certificate expired",
                changed = state.changed() => {
                    if changed.is_err() {
                        // The publisher is gone (process ending): only expiry remains.
                        (&mut expiry).await;
                        return "certificate expired";
                    }
                    let active = state.borrow_and_update().clone();
                    if let Some(reason) = recheck(&active, &sni, source, &identity, &route) {
                        return reason;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Registry;
    use crate::identity::IdentityKind;
    use crate::snapshot::{Policy, Publisher};
    use ztp_proto::names::Serial;
    use ztp_proto::Snapshot;

    const BASE: &str = r#"
version: 1
services:
  - { name: a.svc, protocol: tcp, address: "127.0.0.1:1", groups: [g] }
users:
  - { name: alice, identities: [alice@x], groups: [g] }
groups: [{ name: g }]
"#;

    fn policy(yaml: &str) -> Policy {
        Policy::compile(&Snapshot::from_yaml(yaml).unwrap(), &Registry::builtin()).unwrap()
    }

    fn active(yaml: &str) -> Arc<Active> {
        // TLS configs are not looked at by recheck; build real ones anyway.
        let pki = crate::tls::test_material();
        let (publisher, rx) = Publisher::new(policy(yaml), pki, crate::tls::provider()).unwrap();
        drop(publisher);
        let a = rx.borrow().clone();
        a
    }

    #[test]
    fn recheck_rules() {
        let base = active(BASE);
        let route = base.policy.routes.lookup("a.svc").unwrap().clone();
        let id = ClientIdentity {
            id: "alice@x".into(),
            kind: IdentityKind::Email,
            serial: Serial::parse_hex("0a").unwrap(),
            not_after: i64::MAX,
        };
        let table: &[(&str, &str, Option<&str>)] = &[
            ("unchanged", BASE, None),
            (
                "another user added",
                &BASE.replace(
                    "groups: [{",
                    "  - { name: bob, identities: [b@x] }\ngroups: [{",
                ),
                None,
            ),
            (
                "revoked",
                &format!("{BASE}revoked: ['00:0A']\n"),
                Some("certificate revoked"),
            ),
            (
                "other serial revoked",
                &format!("{BASE}revoked: ['0b']\n"),
                None,
            ),
            (
                "disabled",
                &BASE.replace(
                    "groups: [g] }\ngroups",
                    "groups: [g], disabled: true }\ngroups",
                ),
                Some("user disabled"),
            ),
            (
                "removed from group",
                &BASE.replace(
                    "identities: [alice@x], groups: [g]",
                    "identities: [alice@x]",
                ),
                Some("not in group"),
            ),
            (
                "user removed",
                &BASE.replace(
                    "  - { name: alice, identities: [alice@x], groups: [g] }\n",
                    "",
                ),
                Some("user removed"),
            ),
            (
                "service removed",
                &BASE.replace(
                    "  - { name: a.svc, protocol: tcp, address: \"127.0.0.1:1\", groups: [g] }\n",
                    "",
                ),
                Some("service removed"),
            ),
            (
                "retargeted",
                &BASE.replace("127.0.0.1:1", "127.0.0.1:2"),
                Some("service retargeted"),
            ),
            (
                "protocol changed",
                &BASE.replace("protocol: tcp", "protocol: udp"),
                Some("service retargeted"),
            ),
            (
                "group widened",
                &BASE.replace("groups: [g] }\nusers", "groups: [] }\nusers"),
                None,
            ),
            (
                "source narrowed",
                &BASE.replace(
                    "groups: [g] }\nusers",
                    "groups: [g], allow: ['10.0.0.0/8'] }\nusers",
                ),
                Some("source not allowed"),
            ),
        ];
        for (what, yaml, want) in table {
            let a = active(yaml);
            let source = "127.0.0.1".parse().unwrap();
            assert_eq!(recheck(&a, "a.svc", source, &id, &route), *want, "{what}");
        }
    }
}
