//! A validated configuration, held parsed and keyed, that a delta updates in place.
//!
//! "Parse, don't validate": a [`Config`] exists only for a configuration that passed
//! every rule, and its records are already parsed (service names, backend addresses,
//! source ranges, identity keys, serials), so what indexes it (the data plane's routes
//! and directory) parses nothing and cannot meet an invalid value. A [`Delta`] is
//! checked against it (each record's own rules, and those across records: group and
//! connector references, identities claimed once) at a cost that grows with the delta,
//! not with the configuration; a refused delta changes nothing. What a delta changed
//! comes back as [`Applied`], for indexes to follow record by record.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::digest::{Digest, Record};
use crate::model::{Connector, Group, Service, Snapshot, User};
use crate::names::{identity_key, parse_source_range, BackendAddr, Serial, ServiceName};
use crate::validate::{record_errors, FieldError, Invalid, One};
use crate::wire::{Delta, DeltaError};

/// A service with its fields parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedService {
    pub spec: Service,
    /// The lookup key: the lowercase name (`*.suffix` for a wildcard).
    pub key: String,
    pub name: ServiceName,
    pub backend: Option<BackendAddr>,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl ParsedService {
    /// Parses a service's fields (the first that does not parse is the error; a
    /// service that passed its own rules parses).
    pub fn parse(spec: Service) -> Result<ParsedService, String> {
        let name = ServiceName::parse(&spec.name)?;
        let ranges = |l: &[String]| -> Result<Vec<IpNet>, String> {
            l.iter().map(|r| parse_source_range(r)).collect()
        };
        Ok(ParsedService {
            key: name.key(),
            name,
            backend: spec
                .address
                .as_deref()
                .map(BackendAddr::parse)
                .transpose()?,
            allow: ranges(&spec.allow)?,
            deny: ranges(&spec.deny)?,
            spec,
        })
    }
}

/// A user with the keys of its identities.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedUser {
    pub spec: User,
    /// `identity_key` of each identity, in order.
    pub keys: Vec<String>,
}

impl ParsedUser {
    fn parse(spec: User) -> ParsedUser {
        ParsedUser {
            keys: spec.identities.iter().map(|i| identity_key(i)).collect(),
            spec,
        }
    }
}

/// One record replaced, created (`old` none) or removed (`new` none).
#[derive(Debug, Clone)]
pub struct Change<T> {
    pub old: Option<Arc<T>>,
    pub new: Option<Arc<T>>,
}

/// What a delta changed, for the indexes built on a [`Config`]. A record removed and
/// created again by the same delta appears twice, the removal first.
#[derive(Debug, Default)]
pub struct Applied {
    pub services: Vec<Change<ParsedService>>,
    pub users: Vec<Change<ParsedUser>>,
    /// The set of connectors changed.
    pub connectors: bool,
    /// The revoked serials changed.
    pub revoked: bool,
}

/// A configuration that passed every rule, parsed and keyed.
#[derive(Debug, Clone, Default)]
pub struct Config {
    version: u64,
    /// By key (lowercase name).
    services: HashMap<String, Arc<ParsedService>>,
    users: HashMap<String, Arc<ParsedUser>>,
    groups: HashMap<String, Group>,
    connectors: HashMap<String, Connector>,
    revoked: HashSet<Serial>,
    /// Identity key → the user that claims it.
    claimed: HashMap<String, String>,
    /// Group name → how many times services' and users' `groups` name it.
    group_refs: HashMap<String, usize>,
    /// Connector name → how many services name it.
    connector_refs: HashMap<String, usize>,
    digest: Digest,
}

fn invalid(field: String, message: String) -> Invalid {
    Invalid(vec![FieldError { field, message }])
}

/// A service key as the control plane's store keys a service: its parsed key, or the
/// lowercase string.
fn service_key(name: &str) -> String {
    ServiceName::parse(name)
        .map(|n| n.key())
        .unwrap_or_else(|_| name.to_ascii_lowercase())
}

fn count(refs: &mut HashMap<String, usize>, name: &str, up: bool) {
    if up {
        *refs.entry(name.to_owned()).or_default() += 1;
    } else if let Some(n) = refs.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            refs.remove(name);
        }
    }
}

impl Config {
    /// Validates a whole snapshot and takes it.
    pub fn new(snap: Snapshot) -> Result<Config, Invalid> {
        snap.validate()?;
        Config::from_validated(snap)
    }

    /// Takes a snapshot that has just passed [`Snapshot::validate`] (what the wire
    /// conversion and `Snapshot::from_yaml` return). The parsing it does cannot fail for
    /// such a snapshot; if it does, the error is returned, never a partial result.
    pub fn from_validated(snap: Snapshot) -> Result<Config, Invalid> {
        let mut c = Config {
            version: snap.version,
            services: HashMap::with_capacity(snap.services.len()),
            users: HashMap::with_capacity(snap.users.len()),
            claimed: HashMap::with_capacity(snap.users.len()),
            ..Config::default()
        };
        for g in snap.groups {
            c.put_group(g);
        }
        for k in snap.connectors {
            c.put_connector(k);
        }
        for (i, s) in snap.services.into_iter().enumerate() {
            let s = ParsedService::parse(s).map_err(|e| invalid(format!("services[{i}]"), e))?;
            c.put_service(Arc::new(s));
        }
        for u in snap.users {
            c.put_user(Arc::new(ParsedUser::parse(u)));
        }
        for (i, r) in snap.revoked.iter().enumerate() {
            let s = Serial::parse_hex(r).map_err(|e| invalid(format!("revoked[{i}]"), e))?;
            c.put_revoked(s);
        }
        Ok(c)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The digest of its records (see [`crate::digest`]).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ParsedService>> {
        self.services.values()
    }

    pub fn users(&self) -> impl Iterator<Item = &Arc<ParsedUser>> {
        self.users.values()
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn connector_names(&self) -> impl Iterator<Item = &str> {
        self.connectors.keys().map(String::as_str)
    }

    pub fn revoked(&self) -> &HashSet<Serial> {
        &self.revoked
    }

    /// The configuration as a snapshot, each list in key order.
    pub fn to_snapshot(&self) -> Snapshot {
        fn sorted<V: Clone>(m: &HashMap<String, V>) -> Vec<V> {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| a.0.cmp(b.0));
            v.into_iter().map(|(_, x)| x.clone()).collect()
        }
        let mut revoked: Vec<&Serial> = self.revoked.iter().collect();
        revoked.sort();
        Snapshot {
            version: self.version,
            services: sorted(&self.services)
                .into_iter()
                .map(|s| s.spec.clone())
                .collect(),
            users: sorted(&self.users)
                .into_iter()
                .map(|u| u.spec.clone())
                .collect(),
            groups: sorted(&self.groups),
            connectors: sorted(&self.connectors),
            revoked: revoked.into_iter().map(Serial::to_string).collect(),
        }
    }

    /// Moves to `version` with `revoked` as the revoked serials, the rest unchanged (a
    /// whole snapshot that differs only in those). On error nothing changes.
    pub fn set_revoked(&mut self, version: u64, revoked: &[String]) -> Result<(), Invalid> {
        let parsed = revoked
            .iter()
            .enumerate()
            .map(|(i, r)| Serial::parse_hex(r).map_err(|e| invalid(format!("revoked[{i}]"), e)))
            .collect::<Result<HashSet<_>, _>>()?;
        for s in std::mem::take(&mut self.revoked) {
            self.digest.remove(Record::Revoked(&s));
        }
        for s in parsed {
            self.put_revoked(s);
        }
        self.version = version;
        Ok(())
    }

    /// Applies a delta: refused, with nothing changed, unless it follows this version and
    /// the configuration after it passes every rule. The cost grows with the delta.
    ///
    /// Removals apply before creations; of two records of one key in the delta, the last
    /// wins; every record of the delta must pass its own rules.
    pub fn apply(&mut self, d: Delta) -> Result<Applied, DeltaError> {
        if d.previous_version != self.version {
            return Err(DeltaError::Gap {
                previous: d.previous_version,
                applied: self.version,
            });
        }
        let plan = self.check(d)?;
        Ok(self.commit(plan))
    }

    /// Checks a delta that follows this version; what to apply.
    fn check(&self, d: Delta) -> Result<Plan, Invalid> {
        let mut errs: Vec<FieldError> = Vec::new();
        if d.version <= d.previous_version {
            errs.push(FieldError {
                field: "version".into(),
                message: format!(
                    "{} does not come after previous_version {}",
                    d.version, d.previous_version
                ),
            });
        }
        for (i, s) in d.services.iter().enumerate() {
            errs.extend(record_errors("services", i, One::Service(s)));
        }
        for (i, u) in d.users.iter().enumerate() {
            errs.extend(record_errors("users", i, One::User(u)));
        }
        for (i, g) in d.groups.iter().enumerate() {
            errs.extend(record_errors("groups", i, One::Group(g)));
        }
        for (i, c) in d.connectors.iter().enumerate() {
            errs.extend(record_errors("connectors", i, One::Connector(c)));
        }
        let mut serials = |list: &'static str, l: &[String]| -> Vec<Serial> {
            l.iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    Serial::parse_hex(r)
                        .map_err(|message| {
                            errs.push(FieldError {
                                field: format!("{list}[{i}]"),
                                message,
                            })
                        })
                        .ok()
                })
                .collect()
        };
        let revoked = serials("revoked", &d.revoked);
        let unrevoked = serials("unrevoked", &d.unrevoked);
        if !errs.is_empty() {
            return Err(Invalid(errs));
        }

        // The records after the delta, by key: the last of a key wins.
        let mut services: HashMap<String, (usize, ParsedService)> = HashMap::new();
        for (i, s) in d.services.into_iter().enumerate() {
            let p = ParsedService::parse(s).map_err(|e| invalid(format!("services[{i}]"), e))?;
            services.insert(p.key.clone(), (i, p));
        }
        let mut users: HashMap<String, (usize, ParsedUser)> = HashMap::new();
        for (i, u) in d.users.into_iter().enumerate() {
            users.insert(u.name.clone(), (i, ParsedUser::parse(u)));
        }
        let groups: HashMap<String, Group> =
            d.groups.into_iter().map(|g| (g.name.clone(), g)).collect();
        let connectors: HashMap<String, Connector> = d
            .connectors
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let deleted_services: HashSet<String> =
            d.deleted_services.iter().map(|k| service_key(k)).collect();
        let deleted_users: HashSet<String> = d.deleted_users.into_iter().collect();
        let deleted_groups: HashSet<String> = d.deleted_groups.into_iter().collect();
        let deleted_connectors: HashSet<String> = d.deleted_connectors.into_iter().collect();

        let group_after = |g: &str| {
            groups.contains_key(g) || (self.groups.contains_key(g) && !deleted_groups.contains(g))
        };
        let connector_after = |c: &str| {
            connectors.contains_key(c)
                || (self.connectors.contains_key(c) && !deleted_connectors.contains(c))
        };

        // References from the records the delta writes.
        let mut sorted_services: Vec<_> = services.values().collect();
        sorted_services.sort_by_key(|(i, _)| *i);
        for (i, s) in sorted_services {
            for (k, g) in s.spec.groups.iter().enumerate() {
                if !group_after(g) {
                    errs.push(FieldError {
                        field: format!("services[{i}].groups[{k}]"),
                        message: format!("unknown group {g:?}"),
                    });
                }
            }
            if let Some(c) = &s.spec.connector {
                if !connector_after(c) {
                    errs.push(FieldError {
                        field: format!("services[{i}].connector"),
                        message: format!("unknown connector {c:?}"),
                    });
                }
            }
        }
        let mut sorted_users: Vec<_> = users.values().collect();
        sorted_users.sort_by_key(|(i, _)| *i);
        // Identity key → the user of the delta that claims it.
        let mut claims: HashMap<&str, &str> = HashMap::new();
        for (i, u) in sorted_users {
            for (k, g) in u.spec.groups.iter().enumerate() {
                if !group_after(g) {
                    errs.push(FieldError {
                        field: format!("users[{i}].groups[{k}]"),
                        message: format!("unknown group {g:?}"),
                    });
                }
            }
            for (k, key) in u.keys.iter().enumerate() {
                let name = u.spec.name.as_str();
                let id = &u.spec.identities[k];
                if let Some(other) = claims.insert(key, name).filter(|o| *o != name) {
                    errs.push(FieldError {
                        field: format!("users[{i}].identities[{k}]"),
                        message: format!("identity {id:?} is already claimed by user {other:?}"),
                    });
                    continue;
                }
                // A user the delta leaves alone keeps its claims.
                if let Some(holder) = self.claimed.get(key.as_str()) {
                    if holder != name
                        && !deleted_users.contains(holder)
                        && !users.contains_key(holder)
                    {
                        errs.push(FieldError {
                            field: format!("users[{i}].identities[{k}]"),
                            message: format!(
                                "identity {id:?} is already claimed by user {holder:?}"
                            ),
                        });
                    }
                }
            }
        }

        // Groups and connectors the delta removes must be named by nothing after it:
        // their references now, less those of the records the delta replaces or removes.
        let gone_groups: Vec<&String> = deleted_groups
            .iter()
            .filter(|g| self.groups.contains_key(*g) && !groups.contains_key(*g))
            .collect();
        let gone_connectors: Vec<&String> = deleted_connectors
            .iter()
            .filter(|c| self.connectors.contains_key(*c) && !connectors.contains_key(*c))
            .collect();
        if !gone_groups.is_empty() || !gone_connectors.is_empty() {
            let touched_services = services
                .keys()
                .chain(deleted_services.iter())
                .collect::<HashSet<_>>()
                .into_iter()
                .filter_map(|k| self.services.get(k));
            let touched_users = users
                .keys()
                .chain(deleted_users.iter())
                .collect::<HashSet<_>>()
                .into_iter()
                .filter_map(|k| self.users.get(k));
            let mut group_left: HashMap<&str, usize> = gone_groups
                .iter()
                .map(|g| (g.as_str(), self.group_refs.get(*g).copied().unwrap_or(0)))
                .collect();
            let mut connector_left: HashMap<&str, usize> = gone_connectors
                .iter()
                .map(|c| {
                    (
                        c.as_str(),
                        self.connector_refs.get(*c).copied().unwrap_or(0),
                    )
                })
                .collect();
            fn less(left: &mut HashMap<&str, usize>, name: &str) {
                if let Some(n) = left.get_mut(name) {
                    *n -= 1;
                }
            }
            for s in touched_services {
                if let Some(c) = s.spec.connector.as_deref() {
                    less(&mut connector_left, c);
                }
                for g in &s.spec.groups {
                    less(&mut group_left, g);
                }
            }
            for u in touched_users {
                for g in &u.spec.groups {
                    less(&mut group_left, g);
                }
            }
            for (list, left, what) in [
                ("deleted_groups", &group_left, "services and users"),
                ("deleted_connectors", &connector_left, "services"),
            ] {
                let mut left: Vec<_> = left.iter().filter(|(_, n)| **n > 0).collect();
                left.sort();
                for (name, n) in left {
                    errs.push(FieldError {
                        field: list.into(),
                        message: format!("{name:?} is removed but {n} {what} still name it"),
                    });
                }
            }
        }
        if !errs.is_empty() {
            return Err(Invalid(errs));
        }
        Ok(Plan {
            version: d.version,
            services: services.into_values().map(|(_, s)| s).collect(),
            users: users.into_values().map(|(_, u)| u).collect(),
            groups: groups.into_values().collect(),
            connectors: connectors.into_values().collect(),
            revoked,
            deleted_services,
            deleted_users,
            deleted_groups,
            deleted_connectors,
            unrevoked,
        })
    }

    /// Applies a checked delta: cannot fail.
    fn commit(&mut self, p: Plan) -> Applied {
        let mut a = Applied::default();
        for k in &p.deleted_services {
            if let Some(old) = self.drop_service(k) {
                a.services.push(Change {
                    old: Some(old),
                    new: None,
                });
            }
        }
        for k in &p.deleted_users {
            if let Some(old) = self.drop_user(k) {
                a.users.push(Change {
                    old: Some(old),
                    new: None,
                });
            }
        }
        for k in &p.deleted_groups {
            if let Some(g) = self.groups.remove(k) {
                self.digest.remove(Record::Group(&g));
            }
        }
        for k in &p.deleted_connectors {
            if let Some(c) = self.connectors.remove(k) {
                self.digest.remove(Record::Connector(&c));
                a.connectors = true;
            }
        }
        for s in &p.unrevoked {
            if self.revoked.remove(s) {
                self.digest.remove(Record::Revoked(s));
                a.revoked = true;
            }
        }
        for g in p.groups {
            self.put_group(g);
        }
        for c in p.connectors {
            a.connectors = true;
            self.put_connector(c);
        }
        for s in p.services {
            let new = Arc::new(s);
            let old = self.put_service(new.clone());
            a.services.push(Change {
                old,
                new: Some(new),
            });
        }
        for u in p.users {
            let new = Arc::new(u);
            let old = self.put_user(new.clone());
            a.users.push(Change {
                old,
                new: Some(new),
            });
        }
        for s in p.revoked {
            a.revoked |= self.put_revoked(s);
        }
        self.version = p.version;
        a
    }

    fn put_group(&mut self, g: Group) {
        self.digest.add(Record::Group(&g));
        if let Some(old) = self.groups.insert(g.name.clone(), g) {
            self.digest.remove(Record::Group(&old));
        }
    }

    fn put_connector(&mut self, c: Connector) {
        self.digest.add(Record::Connector(&c));
        if let Some(old) = self.connectors.insert(c.name.clone(), c) {
            self.digest.remove(Record::Connector(&old));
        }
    }

    /// Whether it was not revoked before.
    fn put_revoked(&mut self, s: Serial) -> bool {
        if self.revoked.contains(&s) {
            return false;
        }
        self.digest.add(Record::Revoked(&s));
        self.revoked.insert(s)
    }

    fn service_refs(&mut self, s: &ParsedService, up: bool) {
        for g in &s.spec.groups {
            count(&mut self.group_refs, g, up);
        }
        if let Some(c) = &s.spec.connector {
            count(&mut self.connector_refs, c, up);
        }
        if up {
            self.digest.add(Record::Service(&s.spec));
        } else {
            self.digest.remove(Record::Service(&s.spec));
        }
    }

    fn put_service(&mut self, s: Arc<ParsedService>) -> Option<Arc<ParsedService>> {
        let old = self.drop_service(&s.key);
        self.service_refs(&s, true);
        self.services.insert(s.key.clone(), s);
        old
    }

    fn drop_service(&mut self, key: &str) -> Option<Arc<ParsedService>> {
        let old = self.services.remove(key)?;
        self.service_refs(&old, false);
        Some(old)
    }

    fn put_user(&mut self, u: Arc<ParsedUser>) -> Option<Arc<ParsedUser>> {
        let old = self.drop_user(&u.spec.name);
        for g in &u.spec.groups {
            count(&mut self.group_refs, g, true);
        }
        for k in &u.keys {
            self.claimed.insert(k.clone(), u.spec.name.clone());
        }
        self.digest.add(Record::User(&u.spec));
        self.users.insert(u.spec.name.clone(), u);
        old
    }

    fn drop_user(&mut self, name: &str) -> Option<Arc<ParsedUser>> {
        let old = self.users.remove(name)?;
        for g in &old.spec.groups {
            count(&mut self.group_refs, g, false);
        }
        for k in &old.keys {
            // Another user of the same delta may have claimed it already.
            if self.claimed.get(k).is_some_and(|n| *n == old.spec.name) {
                self.claimed.remove(k);
            }
        }
        self.digest.remove(Record::User(&old.spec));
        Some(old)
    }
}

/// A checked delta.
struct Plan {
    version: u64,
    services: Vec<ParsedService>,
    users: Vec<ParsedUser>,
    groups: Vec<Group>,
    connectors: Vec<Connector>,
    revoked: Vec<Serial>,
    deleted_services: HashSet<String>,
    deleted_users: HashSet<String>,
    deleted_groups: HashSet<String>,
    deleted_connectors: HashSet<String>,
    unrevoked: Vec<Serial>,
}

#[cfg(test)]
mod tests;
