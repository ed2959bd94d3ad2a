//! Continuous authorization: a live session is decided again on every new snapshot,
//! and ends when its client certificate expires.
//!
//! The decision is [`admission::still_admitted`], the admission decision made again;
//! [`watch`] turns it into a future that completes with the reason the session must end.
//! The pipeline (the `session` stage) races every handler against it and ends the session
//! itself: the 403 line if nothing has been forwarded yet, close_notify otherwise.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::admission::{self, Admission};
use crate::session::Stop;
use crate::snapshot::Active;

/// Completes when a live session must end, saying why.
pub type Stops = Pin<Box<dyn Future<Output = Stop> + Send>>;

/// Whether a session admitted as `admitted` may go on under `active`; `Some(reason)`
/// when it must end.
pub fn recheck(
    active: &Active,
    admitted: &Admission,
    sni: &str,
    source: IpAddr,
) -> Option<&'static str> {
    admission::still_admitted(&active.policy, admitted, sni, source).err()
}

/// Watches the published state (new snapshots, and the drain deadline) and the
/// certificate's expiry for one session.
pub fn watch(
    state: watch::Receiver<Arc<Active>>,
    sni: String,
    source: IpAddr,
    admitted: Arc<Admission>,
) -> Stops {
    // A sender kept by no one: the source never moves.
    let (_, fixed) = watch::channel(source);
    watch_moving(state, sni, fixed, admitted)
}

/// [`watch`] for a session whose source address may move (a migrating QUIC connection):
/// it is decided again, on the newest state, when either the state or the address moves.
pub fn watch_moving(
    mut state: watch::Receiver<Arc<Active>>,
    sni: String,
    mut source: watch::Receiver<IpAddr>,
    admitted: Arc<Admission>,
) -> Stops {
    Box::pin(async move {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // A certificate is valid through its notAfter second (RFC 5280): it ends when
        // the next second begins, as the handshake check sees it.
        let end = Duration::from_secs(admitted.identity.not_after.max(0) as u64 + 1);
        let left = end.saturating_sub(now);
        let expiry = tokio::time::sleep(left);
        tokio::pin!(expiry);
        // The state may have moved between the decision and now.
        state.mark_changed();
        let mut moves = true;
        loop {
            tokio::select! {
                _ = &mut expiry => return Stop::Revoked("certificate expired"),
                changed = state.changed() => {
                    if changed.is_err() {
                        // The publisher is gone (process ending): only expiry remains.
                        (&mut expiry).await;
                        return Stop::Revoked("certificate expired");
                    }
                }
                moved = source.changed(), if moves => {
                    if moved.is_err() {
                        // No one moves it any more.
                        moves = false;
                        continue;
                    }
                }
            }
            let active = state.borrow_and_update().clone();
            let at = *source.borrow_and_update();
            if let Some(reason) = recheck(&active, &admitted, &sni, at) {
                return Stop::Revoked(reason);
            }
            if active.draining {
                return Stop::Drain;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Registry;
    use crate::identity::{ClientIdentity, IdentityKind};
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
            let admitted =
                crate::admission::decide_for(&base.policy, id.clone(), "a.svc", source, None)
                    .unwrap();
            assert_eq!(recheck(&a, &admitted, "a.svc", source), *want, "{what}");
        }
    }
}
