//! The rules of every write, once for every backend: each record's own validation, then,
//! on the configuration in memory, `If-Match` and what needs the rest of the
//! configuration (an identity maps to one user, a group in use stays, a service names only
//! groups and connectors that exist); and the reads of records with the version they are
//! at.

use std::collections::BTreeSet;
use std::ops::Bound;

use ztp_proto::names::{identity_key, Serial};
use ztp_proto::{Connector, FieldError, Group, Invalid, Service, Snapshot, User};

use super::backend::{Kind, Op};
use super::commit::{del_op, put_op, Plan};
use super::state::{page_in, page_of, State};
use super::{service_key, Actor, Page, Store, StoreError};

impl Store {
    // ----- services -----

    /// A service and the config version it is at, from one state: the version names
    /// exactly this record (what an `ETag` needs).
    pub async fn service(&self, name: &str) -> Result<(Service, u64), StoreError> {
        match service_key(name) {
            Ok(key) => self.read_one("service", name, &key, |c| &c.services).await,
            Err(_) => Err(not_found("service", name)),
        }
    }

    /// The record of `kind` stored under `key` (asked for as `name`) and the config
    /// version it is at, from one state.
    async fn read_one<V: Clone>(
        &self,
        kind: &'static str,
        name: &str,
        key: &str,
        records: impl FnOnce(&State) -> &std::collections::BTreeMap<String, V>,
    ) -> Result<(V, u64), StoreError> {
        self.read_config(|c| {
            records(c)
                .get(key)
                .cloned()
                .ok_or_else(|| not_found(kind, name))
        })
        .await
    }

    /// A page of services after `cursor`, and the config version it is at.
    pub async fn services(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Service>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.services, cursor, limit)))
            .await
    }

    /// Creates (`create`) or replaces a service. Replacing one that does not exist is
    /// 404; creating one that does is 409.
    pub async fn put_service(
        &self,
        svc: Service,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        svc.validate().map_err(StoreError::Invalid)?;
        let key = service_key(&svc.name)?;
        self.write(expect, actor, |st| {
            check_presence("service", &svc.name, st.services.contains_key(&key), create)?;
            check_groups_exist(st, &svc.groups)?;
            check_connector_exists(st, svc.connector.as_deref())?;
            let action = if create {
                "service.create"
            } else {
                "service.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::Service, &key, &svc)],
                action,
                &key,
            ))
        })
        .await
    }

    pub async fn delete_service(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            let key = service_key(name).map_err(|_| not_found("service", name))?;
            if !st.services.contains_key(&key) {
                return Err(not_found("service", name));
            }
            Ok(Plan::config(
                vec![del_op(Kind::Service, &key)],
                "service.delete",
                &key,
            ))
        })
        .await
    }

    // ----- users -----

    /// A user and the config version it is at, from one state.
    pub async fn user(&self, name: &str) -> Result<(User, u64), StoreError> {
        self.read_one("user", name, name, |c| &c.users).await
    }

    /// A page of users after `cursor`, and the config version it is at.
    pub async fn users(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<User>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.users, cursor, limit)))
            .await
    }

    /// Creates or replaces a user; its identities must not be claimed by another user.
    pub async fn put_user(
        &self,
        user: User,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        user.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            check_presence(
                "user",
                &user.name,
                st.users.contains_key(&user.name),
                create,
            )?;
            check_groups_exist(st, &user.groups)?;
            let conflicts: Vec<FieldError> = user
                .identities
                .iter()
                .enumerate()
                .filter_map(|(k, id)| {
                    let owner = st.identities.get(&identity_key(id))?;
                    (owner != &user.name).then(|| FieldError {
                        field: format!("identities[{k}]"),
                        message: format!("identity {id:?} is already claimed by user {owner:?}"),
                    })
                })
                .collect();
            if !conflicts.is_empty() {
                return Err(StoreError::Conflict {
                    detail: "an identity maps to at most one user".into(),
                    errors: conflicts,
                });
            }
            let action = if create {
                "user.create"
            } else {
                "user.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::User, &user.name, &user)],
                action,
                &user.name,
            ))
        })
        .await
    }

    pub async fn delete_user(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.users.contains_key(name) {
                return Err(not_found("user", name));
            }
            Ok(Plan::config(
                vec![del_op(Kind::User, name)],
                "user.delete",
                name,
            ))
        })
        .await
    }

    // ----- groups -----

    /// A group and the config version it is at, from one state.
    pub async fn group(&self, name: &str) -> Result<(Group, u64), StoreError> {
        self.read_one("group", name, name, |c| &c.groups).await
    }

    /// A page of groups after `cursor`, and the config version it is at.
    pub async fn groups(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Group>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.groups, cursor, limit)))
            .await
    }

    pub async fn create_group(
        &self,
        group: Group,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        group.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            if st.groups.contains_key(&group.name) {
                return Err(StoreError::Exists {
                    kind: "group",
                    name: group.name.clone(),
                });
            }
            Ok(Plan::config(
                vec![put_op(Kind::Group, &group.name, &group)],
                "group.create",
                &group.name,
            ))
        })
        .await
    }

    /// Replaces a group: a group is only its name, so this checks that it exists and
    /// records the change.
    pub async fn replace_group(
        &self,
        group: Group,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        group.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            if !st.groups.contains_key(&group.name) {
                return Err(not_found("group", &group.name));
            }
            Ok(Plan::config(
                vec![put_op(Kind::Group, &group.name, &group)],
                "group.replace",
                &group.name,
            ))
        })
        .await
    }

    /// Deletes a group. In use, it is refused unless `cascade`, which removes it from
    /// every user and service naming it, except that a service is never left with no
    /// groups: that would open it to every user, so such a cascade is refused.
    pub async fn delete_group(
        &self,
        name: &str,
        cascade: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.groups.contains_key(name) {
                return Err(not_found("group", name));
            }
            let names = |groups: &[String]| groups.iter().any(|g| g == name);
            let services: Vec<(&String, &Service)> = st
                .services
                .iter()
                .filter(|(_, s)| names(&s.groups))
                .collect();
            let users: Vec<&User> = st.users.values().filter(|u| names(&u.groups)).collect();
            let refers = |field: String| FieldError {
                field,
                message: format!("refers to group {name:?}"),
            };
            let in_use = !(services.is_empty() && users.is_empty());
            if in_use && !cascade {
                return Err(StoreError::Conflict {
                    detail: format!(
                        "group {name:?} is in use; remove the references or delete with \
                         cascade=true"
                    ),
                    errors: services
                        .iter()
                        .map(|(k, _)| refers(format!("services/{k}")))
                        .chain(users.iter().map(|u| refers(format!("users/{}", u.name))))
                        .collect(),
                });
            }
            let mut ops = Vec::new();
            let mut widening = Vec::new();
            for (key, svc) in &services {
                let mut svc = (*svc).clone();
                svc.groups.retain(|g| g != name);
                if svc.groups.is_empty() {
                    widening.push(FieldError {
                        field: format!("services/{key}"),
                        message: "would be left with no groups (open to every user); change \
                                  its groups first"
                            .into(),
                    });
                }
                ops.push(put_op(Kind::Service, key, &svc));
            }
            if !widening.is_empty() {
                return Err(StoreError::Conflict {
                    detail: format!("deleting group {name:?} would widen access"),
                    errors: widening,
                });
            }
            for u in &users {
                let mut user = (*u).clone();
                user.groups.retain(|g| g != name);
                ops.push(put_op(Kind::User, &user.name, &user));
            }
            let action = if ops.is_empty() {
                "group.delete"
            } else {
                "group.delete.cascade"
            };
            ops.push(del_op(Kind::Group, name));
            Ok(Plan::config(ops, action, name))
        })
        .await
    }

    // ----- connectors -----

    /// A connector and the config version it is at, from one state.
    pub async fn connector(&self, name: &str) -> Result<(Connector, u64), StoreError> {
        self.read_one("connector", name, name, |c| &c.connectors)
            .await
    }

    /// A page of connectors after `cursor`, and the config version it is at.
    pub async fn connectors(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<Connector>, u64), StoreError> {
        self.read_config(|c| Ok(page_in(&c.connectors, cursor, limit)))
            .await
    }

    /// Creates (`create`) or replaces a connector (its description: a connector is its
    /// name). Replacing one that does not exist is 404; creating one that does is 409.
    /// Either is a new config version: the snapshot carries the registry.
    pub async fn put_connector(
        &self,
        connector: Connector,
        create: bool,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        connector.validate().map_err(StoreError::Invalid)?;
        self.write(expect, actor, |st| {
            let exists = st.connectors.contains_key(&connector.name);
            check_presence("connector", &connector.name, exists, create)?;
            let action = if create {
                "connector.create"
            } else {
                "connector.replace"
            };
            Ok(Plan::config(
                vec![put_op(Kind::Connector, &connector.name, &connector)],
                action,
                &connector.name,
            ))
        })
        .await
    }

    /// Deletes a connector. One that a service names is refused (409 naming the
    /// services), and there is no cascade: taking the connector off a service would have
    /// the data planes dial its address themselves, which is for the operator to decide,
    /// service by service.
    pub async fn delete_connector(
        &self,
        name: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        self.write(expect, actor, |st| {
            if !st.connectors.contains_key(name) {
                return Err(not_found("connector", name));
            }
            let errors: Vec<FieldError> = st
                .services
                .iter()
                .filter(|(_, s)| s.connector.as_deref() == Some(name))
                .map(|(key, _)| FieldError {
                    field: format!("services/{key}"),
                    message: format!(
                        "is served through connector {name:?}; remove the service, or change \
                         its connector, first"
                    ),
                })
                .collect();
            if !errors.is_empty() {
                return Err(StoreError::Conflict {
                    detail: format!(
                        "connector {name:?} serves {} service(s); remove them, or change their \
                         connector, first",
                        errors.len()
                    ),
                    errors,
                });
            }
            Ok(Plan::config(
                vec![del_op(Kind::Connector, name)],
                "connector.delete",
                name,
            ))
        })
        .await
    }

    // ----- whole configuration -----

    /// The whole configuration as one snapshot, at one version.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(self.read_config(|c| Ok(c.snapshot())).await?.0)
    }

    /// The configuration at one version, for a reader that last read its services,
    /// users, groups and connectors at generation `seen`: `(snapshot, generation,
    /// whole)`. When the generation has not moved, the snapshot carries only the version
    /// and the revoked serials (`whole` is false) and the reader's services, users, groups
    /// and connectors still hold.
    pub async fn snapshot_since(
        &self,
        seen: Option<u64>,
    ) -> Result<(Snapshot, u64, bool), StoreError> {
        let (answer, _) = self
            .read_config(|c| {
                Ok(if seen == Some(c.generation) {
                    let snap = Snapshot {
                        version: c.version,
                        services: vec![],
                        users: vec![],
                        groups: vec![],
                        revoked: c.revoked.iter().cloned().collect(),
                        connectors: vec![],
                    };
                    (snap, c.generation, false)
                } else {
                    (c.snapshot(), c.generation, true)
                })
            })
            .await?;
        Ok(answer)
    }

    /// Runs `read` on the configuration in memory; returns its answer and the version
    /// that configuration is at, both from one state. Waits for no write, unless the
    /// configuration must be read from the backend again.
    async fn read_config<R>(
        &self,
        read: impl FnOnce(&State) -> Result<R, StoreError>,
    ) -> Result<(R, u64), StoreError> {
        if self.state().unsure {
            let _w = self.write.lock().await;
            self.settle().await?;
        }
        let st = self.state();
        Ok((read(&st)?, st.version))
    }

    /// Replaces the whole configuration with `snap` as one new version (its own
    /// `version` field is ignored: the store assigns the next one).
    pub async fn import(
        &self,
        snap: Snapshot,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        snap.validate().map_err(StoreError::Invalid)?;
        let mut serials = BTreeSet::new();
        for r in &snap.revoked {
            let s = Serial::parse_hex(r).map_err(|e| StoreError::invalid("revoked", e))?;
            serials.insert(s.to_string());
        }
        let mut new: Vec<Op> = Vec::new();
        for g in &snap.groups {
            new.push(put_op(Kind::Group, &g.name, g));
        }
        for c in &snap.connectors {
            new.push(put_op(Kind::Connector, &c.name, c));
        }
        for s in &snap.services {
            new.push(put_op(Kind::Service, &service_key(&s.name)?, s));
        }
        for u in &snap.users {
            new.push(put_op(Kind::User, &u.name, u));
        }
        for s in &serials {
            new.push(Op {
                kind: Kind::Revoked,
                key: s.clone(),
                value: Some(vec![]),
            });
        }
        let target = format!(
            "{} services, {} users, {} groups, {} connectors",
            snap.services.len(),
            snap.users.len(),
            snap.groups.len(),
            snap.connectors.len()
        );
        self.write(expect, actor, |st| {
            // Removals of what the import does not keep, then its records.
            let keep: BTreeSet<(Kind, &str)> =
                new.iter().map(|o| (o.kind, o.key.as_str())).collect();
            let mut ops: Vec<Op> = Vec::new();
            let gone = |kind: Kind, keys: &mut dyn Iterator<Item = &String>, ops: &mut Vec<Op>| {
                for k in keys {
                    if !keep.contains(&(kind, k.as_str())) {
                        ops.push(del_op(kind, k));
                    }
                }
            };
            gone(Kind::Service, &mut st.services.keys(), &mut ops);
            gone(Kind::User, &mut st.users.keys(), &mut ops);
            gone(Kind::Group, &mut st.groups.keys(), &mut ops);
            gone(Kind::Connector, &mut st.connectors.keys(), &mut ops);
            gone(Kind::Revoked, &mut st.revoked.iter(), &mut ops);
            ops.extend(new.iter().cloned());
            Ok(Plan::config(ops, "import", &target))
        })
        .await
    }

    // ----- revoked certificates -----

    /// A page of revoked serials (normalized hex, in order) after `cursor`, and the
    /// config version it is at.
    pub async fn revoked(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Page<String>, u64), StoreError> {
        self.read_config(|c| {
            let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
            let entries = c.revoked.range::<str, _>((start, Bound::Unbounded));
            Ok(page_of(entries.map(|s| (s.as_str(), s)), limit))
        })
        .await
    }

    /// Revokes certificates by serial (hex, any form operators copy) as one version;
    /// serials already revoked are fine. Returns the version.
    pub async fn revoke(
        &self,
        serials: &[String],
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let mut parsed = BTreeSet::new();
        let mut errors = Vec::new();
        for (i, s) in serials.iter().enumerate() {
            match Serial::parse_hex(s) {
                Ok(s) => {
                    parsed.insert(s.to_string());
                }
                Err(e) => errors.push(FieldError {
                    field: format!("serials[{i}]"),
                    message: e,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(StoreError::Invalid(Invalid(errors)));
        }
        if parsed.is_empty() {
            return Err(StoreError::invalid(
                "serials",
                "at least one serial is needed",
            ));
        }
        let target = parsed.iter().cloned().collect::<Vec<_>>().join(",");
        self.write(expect, actor, |_| {
            let ops = parsed
                .iter()
                .map(|s| Op {
                    kind: Kind::Revoked,
                    key: s.clone(),
                    value: Some(vec![]),
                })
                .collect();
            Ok(Plan::config(ops, "revoke", &target))
        })
        .await
    }

    /// Lifts a revocation (for mistakes).
    pub async fn unrevoke(
        &self,
        serial: &str,
        expect: Option<u64>,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let s = Serial::parse_hex(serial)
            .map_err(|e| StoreError::invalid("serial", e))?
            .to_string();
        self.write(expect, actor, |st| {
            if !st.revoked.contains(&s) {
                return Err(not_found("revoked serial", &s));
            }
            Ok(Plan::config(
                vec![del_op(Kind::Revoked, &s)],
                "unrevoke",
                &s,
            ))
        })
        .await
    }

    /// Audits an admin action that changes nothing in the store (the node registry is
    /// kept in memory): no version bump.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        self.write(None, actor, |_| {
            Ok(Plan {
                ops: vec![],
                bump: false,
                action: action.to_owned(),
                target: target.to_owned(),
            })
        })
        .await?;
        Ok(())
    }
}

fn not_found(kind: &'static str, name: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        name: name.to_owned(),
    }
}

/// A create needs the name free; a replace needs the record there.
fn check_presence(
    kind: &'static str,
    name: &str,
    exists: bool,
    create: bool,
) -> Result<(), StoreError> {
    match (exists, create) {
        (true, true) => Err(StoreError::Exists {
            kind,
            name: name.to_owned(),
        }),
        (false, false) => Err(not_found(kind, name)),
        _ => Ok(()),
    }
}

fn check_groups_exist(st: &State, groups: &[String]) -> Result<(), StoreError> {
    let errors: Vec<FieldError> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !st.groups.contains_key(g.as_str()))
        .map(|(k, g)| FieldError {
            field: format!("groups[{k}]"),
            message: format!("unknown group {g:?}"),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Invalid(Invalid(errors)))
    }
}

/// A service may name only a registered connector (400 naming `connector`).
fn check_connector_exists(st: &State, connector: Option<&str>) -> Result<(), StoreError> {
    match connector {
        Some(c) if !st.connectors.contains_key(c) => Err(StoreError::invalid(
            "connector",
            format!("unknown connector {c:?}"),
        )),
        _ => Ok(()),
    }
}
