//! Authorization: may this identity use this service?
//!
//! A service with no groups admits every enabled directory user; otherwise the user must
//! be in one of its groups. No user for the identity, or a disabled user, is refused.
//! The directory is a hash index by identity key, so the cost does not grow with the
//! number of users.

use std::sync::Arc;

use ztp_proto::config::{Change, Config, ParsedUser};
use ztp_proto::names::identity_key;
use ztp_proto::User;

use crate::cowmap::CowMap;

use crate::identity::ClientIdentity;
use crate::routing::Route;

/// A directory user as the data plane needs it.
#[derive(Debug)]
pub struct DirUser {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
}

impl DirUser {
    fn of(u: &User) -> DirUser {
        DirUser {
            name: u.name.clone(),
            groups: u.groups.clone(),
            disabled: u.disabled,
        }
    }
}

/// The users of one configuration, indexed by identity key. Copies share their storage:
/// a delta updates a copy at a cost that grows with the users it changes.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    by_identity: CowMap<Arc<DirUser>>,
}

impl Directory {
    pub fn from_config(config: &Config) -> Directory {
        let mut d = Directory::default();
        for u in config.users() {
            d.put(u);
        }
        d
    }

    /// Indexes users (cross-record rules are not checked): for tests and tools.
    pub fn compile(users: &[User]) -> Directory {
        let mut d = Directory::default();
        for u in users {
            let user = Arc::new(DirUser::of(u));
            for id in &u.identities {
                d.by_identity.insert(identity_key(id), user.clone());
            }
        }
        d
    }

    /// This directory with a delta's user changes: every identity a replaced or removed
    /// user held goes first (unless another user holds it now), then the new ones.
    pub fn update(&self, changes: &[Change<ParsedUser>]) -> Directory {
        let mut d = self.clone();
        for old in changes.iter().filter_map(|c| c.old.as_ref()) {
            for k in &old.keys {
                if d.by_identity
                    .get(k)
                    .is_some_and(|u| u.name == old.spec.name)
                {
                    d.by_identity.remove(k);
                }
            }
        }
        for new in changes.iter().filter_map(|c| c.new.as_ref()) {
            d.put(new);
        }
        d
    }

    fn put(&mut self, u: &ParsedUser) {
        let user = Arc::new(DirUser::of(&u.spec));
        for k in &u.keys {
            self.by_identity.insert(k.clone(), user.clone());
        }
    }

    pub fn user(&self, identity: &str) -> Option<&Arc<DirUser>> {
        self.by_identity.get(&identity_key(identity))
    }
}

/// Proof that a user may use a route; the only way to reach a handler.
#[derive(Debug, Clone)]
pub struct Permit {
    pub user: Arc<DirUser>,
    pub route: Arc<Route>,
}

/// Why authorization failed (logged; the client sees only the 403 line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("unknown identity")]
    UnknownIdentity,
    #[error("user disabled")]
    UserDisabled,
    #[error("not in the service's groups")]
    NotInGroup,
}

/// Decides whether `identity` may use `route` under `directory`.
pub fn authorize(
    directory: &Directory,
    identity: &ClientIdentity,
    route: &Arc<Route>,
) -> Result<Permit, (Denial, Option<Arc<DirUser>>)> {
    let user = directory
        .user(&identity.id)
        .ok_or((Denial::UnknownIdentity, None))?;
    if user.disabled {
        return Err((Denial::UserDisabled, Some(user.clone())));
    }
    let allowed = route.groups.is_empty() || route.groups.iter().any(|g| user.groups.contains(g));
    if !allowed {
        return Err((Denial::NotInGroup, Some(user.clone())));
    }
    Ok(Permit {
        user: user.clone(),
        route: route.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;
    use crate::routing::Routes;
    use ztp_proto::Snapshot;

    #[test]
    fn authorization_rules() {
        let snap = Snapshot::from_yaml(
            r#"
version: 1
services:
  - { name: open.svc, address: ":1" }
  - { name: admins.svc, address: ":1", groups: [admins] }
  - { name: either.svc, address: ":1", groups: [admins, ops] }
users:
  - { name: alice, identities: ["Alice@Example.com"], groups: [admins] }
  - { name: olga, identities: ["spiffe://x/olga"], groups: [ops] }
  - { name: bob, identities: ["bob"] }
  - { name: dave, identities: ["dave@example.com"], groups: [admins], disabled: true }
groups: [{ name: admins }, { name: ops }]
"#,
        )
        .unwrap();
        let dir = Directory::compile(&snap.users);
        let routes = Routes::compile(&snap.services, &crate::handler::Registry::builtin()).unwrap();
        use Denial::*;
        let table: &[(&str, &str, Result<&str, Denial>)] = &[
            ("alice@example.com", "open.svc", Ok("alice")),
            ("ALICE@example.COM", "admins.svc", Ok("alice")),
            ("bob", "open.svc", Ok("bob")),
            ("bob", "admins.svc", Err(NotInGroup)),
            ("Bob", "open.svc", Err(UnknownIdentity)),
            ("spiffe://x/olga", "either.svc", Ok("olga")),
            ("spiffe://x/olga", "admins.svc", Err(NotInGroup)),
            ("spiffe://X/olga", "either.svc", Err(UnknownIdentity)),
            ("dave@example.com", "open.svc", Err(UserDisabled)),
            ("dave@example.com", "admins.svc", Err(UserDisabled)),
            ("eve@example.com", "open.svc", Err(UnknownIdentity)),
        ];
        for (id, svc, want) in table {
            let ident = ClientIdentity {
                id: id.to_string(),
                kind: IdentityKind::CommonName,
                serial: ztp_proto::names::Serial::from_be_bytes(&[1]),
                not_after: 0,
            };
            let route = routes.lookup(svc).unwrap();
            let got = authorize(&dir, &ident, route)
                .map(|p| p.user.name.clone())
                .map_err(|(d, _)| d);
            assert_eq!(got, want.map(str::to_owned), "{id} -> {svc}");
        }
    }
}
