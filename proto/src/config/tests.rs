use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::model::Protocol;

/// A small deterministic generator (xorshift64*): the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// The records of a configuration by key, as the control plane's store holds them: the
/// reference a delta is applied to by plain map writes.
#[derive(Clone, Default, PartialEq, Debug)]
struct Model {
    version: u64,
    services: BTreeMap<String, Service>,
    users: BTreeMap<String, User>,
    groups: BTreeMap<String, Group>,
    connectors: BTreeMap<String, Connector>,
    revoked: BTreeSet<String>,
}

impl Model {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            services: self.services.values().cloned().collect(),
            users: self.users.values().cloned().collect(),
            groups: self.groups.values().cloned().collect(),
            connectors: self.connectors.values().cloned().collect(),
            revoked: self.revoked.iter().cloned().collect(),
        }
    }

    fn apply(&mut self, d: &Delta) {
        for k in &d.deleted_services {
            self.services.remove(k);
        }
        for k in &d.deleted_users {
            self.users.remove(k);
        }
        for k in &d.deleted_groups {
            self.groups.remove(k);
        }
        for k in &d.deleted_connectors {
            self.connectors.remove(k);
        }
        for k in &d.unrevoked {
            self.revoked.remove(k);
        }
        for s in &d.services {
            self.services.insert(s.name.clone(), s.clone());
        }
        for u in &d.users {
            self.users.insert(u.name.clone(), u.clone());
        }
        for g in &d.groups {
            self.groups.insert(g.name.clone(), g.clone());
        }
        for c in &d.connectors {
            self.connectors.insert(c.name.clone(), c.clone());
        }
        self.revoked.extend(d.revoked.iter().cloned());
        self.version = d.version;
    }
}

fn user(name: &str, identities: &[String], groups: &[String]) -> User {
    User {
        name: name.into(),
        identities: identities.to_vec(),
        groups: groups.to_vec(),
        disabled: false,
    }
}

fn service(name: &str, groups: &[String], connector: Option<String>) -> Service {
    Service {
        name: name.into(),
        protocol: Protocol::Tcp,
        address: Some(":1".into()),
        groups: groups.to_vec(),
        allow: vec![],
        deny: vec![],
        handler: None,
        connector,
    }
}

/// Names are drawn from small pools so that deltas collide: identities claimed twice,
/// groups removed while in use, records removed and written again.
struct Gen {
    rng: Rng,
    users: usize,
    services: usize,
}

impl Gen {
    fn group(&mut self) -> String {
        format!("g{}", self.rng.below(12))
    }

    fn groups(&mut self) -> Vec<String> {
        (0..self.rng.below(3)).map(|_| self.group()).collect()
    }

    fn identity(&mut self) -> String {
        format!("id{}@example.com", self.rng.below(self.users * 2 + 10))
    }

    fn delta(&mut self, m: &Model) -> Delta {
        let mut d = Delta {
            version: m.version + 1 + self.rng.below(3) as u64,
            previous_version: m.version,
            ..Delta::default()
        };
        let mut keys = BTreeSet::new();
        for _ in 0..1 + self.rng.below(5) {
            let r = &mut self.rng;
            match r.below(11) {
                0..=3 => {
                    let name = format!("u{}", r.below(self.users + 5));
                    if keys.insert(("u", name.clone())) {
                        // Mostly the user's own identity (no conflict), sometimes another.
                        let n = name.trim_start_matches('u').to_owned();
                        let mut ids = vec![format!("id{n}@example.com")];
                        if self.rng.chance(20) {
                            ids.push(self.identity());
                        }
                        let mut u = user(&name, &ids, &self.groups());
                        u.disabled = self.rng.chance(10);
                        d.users.push(u);
                    }
                }
                4 => {
                    let name = format!("u{}", r.below(self.users + 5));
                    if keys.insert(("u", name.clone())) {
                        d.deleted_users.push(name);
                    }
                }
                5 | 6 => {
                    let name = format!("s{}.svc", r.below(self.services + 5));
                    if keys.insert(("s", name.clone())) {
                        let connector = r.chance(20).then(|| format!("c{}", r.below(4)));
                        let groups = self.groups();
                        d.services.push(service(&name, &groups, connector));
                    }
                }
                7 => {
                    let name = format!("s{}.svc", r.below(self.services + 5));
                    if keys.insert(("s", name.clone())) {
                        d.deleted_services.push(name);
                    }
                }
                8 => {
                    let name = self.group();
                    if keys.insert(("g", name.clone())) {
                        if self.rng.chance(50) {
                            d.groups.push(Group { name });
                        } else {
                            d.deleted_groups.push(name);
                        }
                    }
                }
                9 => {
                    let name = format!("c{}", r.below(4));
                    if keys.insert(("c", name.clone())) {
                        if r.chance(50) {
                            d.connectors.push(Connector {
                                name,
                                description: String::new(),
                            });
                        } else {
                            d.deleted_connectors.push(name);
                        }
                    }
                }
                _ => {
                    let serial = format!("{:02x}", 1 + r.below(200));
                    if keys.insert(("r", serial.clone())) {
                        if r.chance(60) {
                            d.revoked.push(serial);
                        } else {
                            d.unrevoked.push(serial);
                        }
                    }
                }
            }
        }
        d
    }
}

/// A valid starting configuration: `users` users with their own identity, `services`
/// services, groups g0..g11 (some in use), connectors c0..c3.
fn base(users: usize, services: usize) -> Model {
    let mut m = Model {
        version: 10,
        ..Model::default()
    };
    for g in 0..12 {
        let name = format!("g{g}");
        m.groups.insert(name.clone(), Group { name });
    }
    for c in 0..4 {
        let name = format!("c{c}");
        m.connectors.insert(
            name.clone(),
            Connector {
                name,
                description: "d".into(),
            },
        );
    }
    for i in 0..users {
        let name = format!("u{i}");
        let groups = vec![format!("g{}", i % 12)];
        m.users.insert(
            name.clone(),
            user(&name, &[format!("id{i}@example.com")], &groups),
        );
    }
    for i in 0..services {
        let name = format!("s{i}.svc");
        let connector = (i % 10 == 0).then(|| format!("c{}", i % 4));
        let groups = vec![format!("g{}", i % 7)];
        m.services
            .insert(name.clone(), service(&name, &groups, connector));
    }
    m.revoked.insert("0a".into());
    m
}

fn assert_same(c: &Config, m: &Model) {
    let mut want = m.snapshot();
    let mut got = c.to_snapshot();
    want.revoked.sort();
    got.revoked.sort();
    assert_eq!(got, want);
    assert_eq!(c.digest(), Digest::of(&want), "digest");
}

#[test]
fn random_deltas_are_accepted_and_refused_exactly_as_the_whole_snapshot_rules_say() {
    let start = base(40, 15);
    let mut config = Config::new(start.snapshot()).unwrap();
    let mut model = start;
    let mut gen = Gen {
        rng: Rng(0x5eed_0001),
        users: 40,
        services: 15,
    };
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..3000 {
        let d = gen.delta(&model);
        // The reference: the delta applied to the whole snapshot, validated whole.
        let reference = d.apply_to(&model.snapshot());
        match (config.apply(d.clone()), reference) {
            (Ok(_), Ok(_)) => {
                model.apply(&d);
                accepted += 1;
            }
            (Err(_), Err(_)) => refused += 1,
            (mine, theirs) => panic!(
                "round {round}: {d:?}\nincremental: {:?}\nwhole: {:?}",
                mine.map(|_| ()),
                theirs.map(|_| ())
            ),
        }
        // Refused or not, the configuration is exactly the reference's.
        assert_same(&config, &model);
    }
    // Both outcomes were exercised, many times.
    assert!(accepted > 500 && refused > 500, "{accepted} / {refused}");
}

#[test]
fn a_delta_that_does_not_follow_the_version_is_refused_and_changes_nothing() {
    let m = base(3, 2);
    let mut c = Config::new(m.snapshot()).unwrap();
    let next = Delta {
        version: 11,
        previous_version: 10,
        deleted_users: vec!["u1".into()],
        ..Delta::default()
    };
    c.apply(next.clone()).unwrap();
    // Replayed: it no longer follows.
    let e = c.apply(next).unwrap_err();
    assert!(
        matches!(
            e,
            DeltaError::Gap {
                previous: 10,
                applied: 11
            }
        ),
        "{e}"
    );
    // From the future.
    let e = c
        .apply(Delta {
            version: 20,
            previous_version: 15,
            ..Delta::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("full snapshot"), "{e}");
    // Not moving forward.
    let e = c
        .apply(Delta {
            version: 11,
            previous_version: 11,
            ..Delta::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("version"), "{e}");
    assert_eq!(c.version(), 11);
    // An empty delta moves the version and nothing else.
    let before = c.digest();
    c.apply(Delta {
        version: 12,
        previous_version: 11,
        ..Delta::default()
    })
    .unwrap();
    assert_eq!((c.version(), c.digest()), (12, before));
}

#[test]
fn a_group_goes_with_everything_that_names_it_or_not_at_all() {
    let m = base(24, 7);
    let mut c = Config::new(m.snapshot()).unwrap();
    // g0 is named by users u0, u12 and service s0.
    let alone = Delta {
        version: 11,
        previous_version: 10,
        deleted_groups: vec!["g0".into()],
        ..Delta::default()
    };
    let e = c.apply(alone).unwrap_err().to_string();
    assert!(
        e.contains("deleted_groups: \"g0\" is removed but 3 services and users"),
        "{e}"
    );
    // The cascade the control plane sends: the group, its members rewritten, the
    // service removed.
    let cascade = Delta {
        version: 11,
        previous_version: 10,
        deleted_groups: vec!["g0".into()],
        users: vec![
            user("u0", &["id0@example.com".into()], &[]),
            user("u12", &["id12@example.com".into()], &["g1".into()]),
        ],
        deleted_services: vec!["S0.svc".into()],
        ..Delta::default()
    };
    let applied = c.apply(cascade).unwrap();
    assert_eq!(applied.users.len(), 2);
    assert_eq!(applied.services.len(), 1);
    assert!(applied.services[0].new.is_none());
    assert!(!c.to_snapshot().groups.iter().any(|g| g.name == "g0"));
    // An identity moves from one user to another in one delta.
    let moved = Delta {
        version: 12,
        previous_version: 11,
        users: vec![
            user("u1", &[], &[]),
            user(
                "u2",
                &["id2@example.com".into(), "id1@example.com".into()],
                &[],
            ),
        ],
        ..Delta::default()
    };
    c.apply(moved).unwrap();
    // And cannot be taken from a user the delta leaves alone.
    let taken = Delta {
        version: 13,
        previous_version: 12,
        users: vec![user("u3", &["ID2@example.com".into()], &[])],
        ..Delta::default()
    };
    let e = c.apply(taken).unwrap_err().to_string();
    assert!(e.contains("already claimed by user \"u2\""), "{e}");
}

/// The issue's figure: 100,000 users, 1,000 random deltas (valid and not), then the
/// configuration equals, field for field, the whole snapshot of the same version.
#[test]
fn a_100k_user_configuration_after_1000_random_deltas_equals_its_whole_snapshot() {
    let start = base(100_000, 1_000);
    let mut config = Config::new(start.snapshot()).unwrap();
    let mut model = start;
    let mut gen = Gen {
        rng: Rng(0x5eed_0002),
        users: 100_000,
        services: 1_000,
    };
    let mut accepted = 0;
    for _ in 0..1000 {
        let d = gen.delta(&model);
        if config.apply(d.clone()).is_ok() {
            model.apply(&d);
            accepted += 1;
        }
    }
    assert!(accepted > 300, "{accepted}");
    // The whole snapshot of the same records, validated whole.
    let whole = Config::new(model.snapshot()).unwrap();
    assert_eq!(config.to_snapshot(), whole.to_snapshot());
    assert_eq!(config.digest(), whole.digest());
    assert_eq!(config.version(), model.version);
}
