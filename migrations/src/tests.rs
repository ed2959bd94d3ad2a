//! Stores of past schemas, written as raw bytes from literal fixtures, are upgraded to
//! exactly the next schema's bytes (`run_to` stops at the schema a test is about); a
//! record that cannot be read is named and changes nothing; a newer store is refused.
//! Today's model types appear only as the consumer of a migrated store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use fixtures::Tree;

mod fixtures;

/// A store folder, removed when dropped (declare it before the `sled::Db` it holds).
struct TempStore(PathBuf);

impl TempStore {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        TempStore(std::env::temp_dir().join(format!(
            "ztp-migrations-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn open(&self) -> sled::Db {
        reopen(&self.0)
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every tree but sled's own: tree → key → value, bytes shown escaped.
type Dump = BTreeMap<String, BTreeMap<String, String>>;

fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b' '..=b'~' => s.push(char::from(b)),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

fn dump(db: &sled::Db) -> Dump {
    db.tree_names()
        .into_iter()
        .filter(|n| n.as_ref() != b"__sled__default")
        .map(|n| {
            let tree = db.open_tree(&n).unwrap();
            let kvs = tree
                .iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (show(&k), show(&v))
                })
                .collect();
            (show(&n), kvs)
        })
        .collect()
}

/// The dump of a store holding exactly `trees`.
fn expect(trees: &[Tree<'_>]) -> Dump {
    let mut d = Dump::new();
    for (name, kvs) in trees {
        let t = d.entry(show(name.as_bytes())).or_default();
        for (k, v) in *kvs {
            t.insert(show(k), show(v));
        }
    }
    d
}

/// Writes `trees` into `db` as raw bytes, as the schema's code left them.
fn write(db: &sled::Db, trees: &[Tree<'_>]) {
    for (name, kvs) in trees {
        let tree = db.open_tree(name).unwrap();
        for (k, v) in *kvs {
            tree.insert(*k, *v).unwrap();
        }
    }
    db.flush().unwrap();
}

/// A store holding `trees`, written, closed and reopened as a new ztp-control would.
fn store_of(store: &TempStore, trees: &[Tree<'_>]) -> sled::Db {
    let db = store.open();
    write(&db, trees);
    drop(db);
    store.open()
}

/// [`fixtures::SCHEMA_1`] after migration 2: the same records, the indexes, schema 2.
fn schema_1_migrated() -> Dump {
    let mut d = expect(fixtures::SCHEMA_1);
    d.extend(expect(fixtures::SCHEMA_1_INDEXES));
    d.get_mut("meta")
        .unwrap()
        .insert("schema_version".into(), show(b"\0\0\0\x02"));
    d
}

/// `dump` of a schema-2 store after migration 3: the same records, the two empty
/// connector trees, schema 3.
fn to_schema_3(mut d: Dump) -> Dump {
    d.extend(expect(&[("connectors", &[]), ("connector_refs", &[])]));
    d.get_mut("meta")
        .unwrap()
        .insert("schema_version".into(), show(b"\0\0\0\x03"));
    d
}

/// `dump` of a schema-3 store after migration 4: the same records (every other tree
/// byte for byte), no reverse index, schema 4.
fn to_schema_4(mut d: Dump) -> Dump {
    for index in ["identities", "group_refs", "connector_refs"] {
        assert!(d.remove(index).is_some(), "a schema-3 store has {index}");
    }
    d.get_mut("meta")
        .unwrap()
        .insert("schema_version".into(), show(b"\0\0\0\x04"));
    d
}

/// The trees of `db` (sled's own left out).
fn tree_names(db: &sled::Db) -> BTreeSet<String> {
    db.tree_names()
        .into_iter()
        .filter(|n| n.as_ref() != b"__sled__default")
        .map(|n| show(&n))
        .collect()
}

#[test]
fn a_schema_1_store_becomes_exactly_the_schema_2_bytes() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    assert_eq!(
        dump(&db),
        expect(fixtures::SCHEMA_1),
        "fixture written as is"
    );
    assert_eq!(run_to(&db, 2).unwrap(), Applied { from: 1, to: 2 });
    assert_eq!(dump(&db), schema_1_migrated());
    assert_eq!(schema_version(&db).unwrap(), 2);

    // Durable, and running again changes nothing.
    drop(db);
    let db = store.open();
    assert_eq!(run_to(&db, 2).unwrap(), Applied { from: 2, to: 2 });
    assert_eq!(dump(&db), schema_1_migrated());
}

#[test]
fn a_schema_1_store_goes_through_every_migration_to_the_latest() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    assert_eq!(
        run(&db).unwrap(),
        Applied {
            from: 1,
            to: LATEST
        }
    );
    assert_eq!(schema_version(&db).unwrap(), 4);
    let migrated = to_schema_4(to_schema_3(schema_1_migrated()));
    assert_eq!(dump(&db), migrated);
    let mut records = expect(fixtures::SCHEMA_1);
    records.extend(expect(&[("connectors", &[])]));
    records
        .get_mut("meta")
        .unwrap()
        .insert("schema_version".into(), show(b"\0\0\0\x04"));
    assert_eq!(
        migrated, records,
        "schema 1's records, byte for byte, and an empty connector registry"
    );

    // Durable (the dropped trees stay dropped), and running again changes nothing.
    drop(db);
    let db = store.open();
    assert_eq!(dump(&db), migrated);
    assert_eq!(run(&db).unwrap(), Applied { from: 4, to: 4 });
    assert_eq!(dump(&db), migrated);
}

#[test]
fn a_schema_1_store_passes_each_schema_on_its_way() {
    // Step by step, each migration leaves exactly the next schema; the last one drops
    // the indexes migrations 2 and 3 made.
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    assert_eq!(run_to(&db, 2).unwrap(), Applied { from: 1, to: 2 });
    assert_eq!(dump(&db), schema_1_migrated());
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 2, to: 3 });
    assert_eq!(dump(&db), to_schema_3(schema_1_migrated()));
    assert_eq!(run_to(&db, 4).unwrap(), Applied { from: 3, to: 4 });
    assert_eq!(dump(&db), to_schema_4(to_schema_3(schema_1_migrated())));
}

#[test]
fn a_rerun_after_a_crash_rebuilds_the_indexes_exactly() {
    // Migration 2 wrote part of its indexes (and a stale entry) before the crash; the
    // version was not bumped.
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    write(
        &db,
        &[
            (
                "identities",
                &[
                    (b"alice@example.com", b"alice"),
                    (b"ghost@example.com", b"ghost"),
                ],
            ),
            ("group_refs", &[(b"old\0u\0ghost", b"")]),
        ],
    );
    assert_eq!(run_to(&db, 2).unwrap(), Applied { from: 1, to: 2 });
    assert_eq!(dump(&db), schema_1_migrated());
}

#[test]
fn a_new_store_gets_the_schema_4_layout() {
    let store = TempStore::new();
    let db = store.open();
    assert_eq!(run(&db).unwrap(), Applied { from: 0, to: 4 });
    let empty: &[(&[u8], &[u8])] = &[];
    let layout = expect(&[
        (
            "meta",
            &[
                (b"schema_version", b"\0\0\0\x04"),
                (b"config_version", b"\0\0\0\0\0\0\0\0"),
            ],
        ),
        ("services", empty),
        ("users", empty),
        ("groups", empty),
        ("revoked", empty),
        ("tokens", empty),
        ("audit", empty),
        ("connectors", empty),
    ]);
    assert_eq!(dump(&db), layout, "no reverse index");

    // Durable, and running again changes nothing.
    drop(db);
    let db = store.open();
    assert_eq!(dump(&db), layout);
    assert_eq!(run(&db).unwrap(), Applied { from: 4, to: 4 });
    assert_eq!(dump(&db), layout);
}

#[test]
fn a_new_store_run_to_schema_3_gets_the_schema_3_layout() {
    let store = TempStore::new();
    let db = store.open();
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 0, to: 3 });
    let empty: &[(&[u8], &[u8])] = &[];
    assert_eq!(
        dump(&db),
        expect(&[
            (
                "meta",
                &[
                    (b"schema_version", b"\0\0\0\x03"),
                    (b"config_version", b"\0\0\0\0\0\0\0\0"),
                ],
            ),
            ("services", empty),
            ("users", empty),
            ("groups", empty),
            ("revoked", empty),
            ("tokens", empty),
            ("audit", empty),
            ("identities", empty),
            ("group_refs", empty),
            ("connectors", empty),
            ("connector_refs", empty),
        ])
    );
}

#[test]
fn a_schema_2_store_gains_an_empty_connector_registry() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_2);
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 2, to: 3 });
    let migrated = to_schema_3(expect(fixtures::SCHEMA_2));
    assert_eq!(dump(&db), migrated);

    // Durable, and running again changes nothing.
    drop(db);
    let db = store.open();
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 3, to: 3 });
    assert_eq!(dump(&db), migrated);

    // Then on to the latest: the indexes go, the registry stays.
    assert_eq!(run(&db).unwrap(), Applied { from: 3, to: 4 });
    assert_eq!(dump(&db), to_schema_4(migrated));
}

#[test]
fn a_rerun_of_migration_3_after_a_crash_leaves_the_index_empty() {
    // A crash after the trees were made, before the version moved (and a stray entry
    // that no schema-2 store can hold).
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_2);
    write(
        &db,
        &[("connector_refs", &[(b"ghost\0x.svc.internal", b"")])],
    );
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 2, to: 3 });
    assert_eq!(dump(&db), to_schema_3(expect(fixtures::SCHEMA_2)));
}

#[test]
fn a_schema_3_store_is_left_as_it_is_by_run_to_3() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_3);
    assert_eq!(run_to(&db, 3).unwrap(), Applied { from: 3, to: 3 });
    assert_eq!(dump(&db), expect(fixtures::SCHEMA_3));
}

#[test]
fn the_schema_3_fixture_holds_the_indexes_schema_3_wrote() {
    // What migration 4 drops is what schema 3 kept: the fixture's indexes are those of
    // its records, in the frozen key formats.
    let d = expect(fixtures::SCHEMA_3);
    let index = |keys: &[(Vec<u8>, &[u8])]| -> BTreeMap<String, String> {
        keys.iter().map(|(k, v)| (show(k), show(v))).collect()
    };
    assert_eq!(
        d["identities"],
        index(&[(v2::identity_key("Alice@Example.com").into_bytes(), b"alice")])
    );
    assert_eq!(
        d["group_refs"],
        index(&[
            (
                v2::group_ref("ops", v2::REF_SERVICE, b"db.svc.internal"),
                b""
            ),
            (v2::group_ref("ops", v2::REF_USER, b"alice"), b""),
        ])
    );
    assert_eq!(
        d["connector_refs"],
        index(&[(v3::connector_ref("lab", b"db.svc.internal"), b"")])
    );
}

#[test]
fn a_schema_3_store_becomes_schema_4_with_the_same_records_and_no_index() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_3);
    assert_eq!(
        tree_names(&db),
        ["identities", "group_refs", "connector_refs"]
            .into_iter()
            .map(String::from)
            .chain(v4::TREES.iter().map(|t| t.to_string()))
            .collect(),
        "the fixture holds every schema-3 tree"
    );
    assert_eq!(run(&db).unwrap(), Applied { from: 3, to: 4 });
    let migrated = to_schema_4(expect(fixtures::SCHEMA_3));
    assert_eq!(dump(&db), migrated);
    let mut records = expect(fixtures::SCHEMA_3);
    let mut now = dump(&db);
    for d in [&mut records, &mut now] {
        d.remove("meta");
    }
    for index in ["identities", "group_refs", "connector_refs"] {
        assert!(records.remove(index).is_some());
    }
    assert_eq!(now, records, "every record byte for byte");
    assert_eq!(
        tree_names(&db),
        v4::TREES.iter().map(|t| t.to_string()).collect()
    );

    // Durable (the dropped trees do not come back), and running again changes nothing.
    drop(db);
    let db = store.open();
    assert_eq!(dump(&db), migrated);
    assert_eq!(run(&db).unwrap(), Applied { from: 4, to: 4 });
    assert_eq!(dump(&db), migrated);
}

#[test]
fn a_rerun_of_migration_4_after_a_crash_drops_what_is_left() {
    // A crash before the version moved to 4: after none, some or all of the drops (a
    // drop not yet flushed is one not made).
    let dropped_before: &[&[&str]] = &[
        &[],
        &["identities"],
        &["group_refs", "connector_refs"],
        &["identities", "group_refs", "connector_refs"],
    ];
    for dropped in dropped_before {
        let store = TempStore::new();
        let db = store_of(&store, fixtures::SCHEMA_3);
        for t in *dropped {
            assert!(db.drop_tree(t).unwrap(), "{t}");
        }
        db.flush().unwrap();
        drop(db);
        let db = store.open();
        assert_eq!(schema_version(&db).unwrap(), 3);
        assert_eq!(run(&db).unwrap(), Applied { from: 3, to: 4 }, "{dropped:?}");
        assert_eq!(
            dump(&db),
            to_schema_4(expect(fixtures::SCHEMA_3)),
            "{dropped:?}"
        );
    }

    // The migration itself, run twice in a row, drops nothing the second time.
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_3);
    reverse_indexes_dropped(&db).unwrap();
    let once = dump(&db);
    reverse_indexes_dropped(&db).unwrap();
    assert_eq!(dump(&db), once);
    assert_eq!(
        schema_version(&db).unwrap(),
        3,
        "the version is run's to move"
    );
}

/// Decodes every record of a store at [`LATEST`] with today's model, as the control
/// plane's store does, and checks that the store holds only today's trees and that its
/// records keep the integrity rules the store checks on them (in memory, since schema 4):
/// an identity maps to one user, a group or connector a record names exists.
fn assert_readable_today(db: &sled::Db) {
    use ztp_proto::names::identity_key;
    use ztp_proto::{Connector, Group, Service, User};

    assert_eq!(schema_version(db).unwrap(), LATEST);
    let today: BTreeSet<String> = [
        layout::META,
        layout::SERVICES,
        layout::USERS,
        layout::GROUPS,
        layout::REVOKED,
        layout::TOKENS,
        layout::AUDIT,
        layout::CONN_AUDIT,
        layout::CONNECTORS,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let stray: Vec<_> = tree_names(db).difference(&today).cloned().collect();
    assert!(stray.is_empty(), "trees no one reads: {stray:?}");

    let groups = db.open_tree(layout::GROUPS).unwrap();
    let connectors = db.open_tree(layout::CONNECTORS).unwrap();
    for kv in groups.iter() {
        let (k, v) = kv.unwrap();
        let g: Group =
            serde_json::from_slice(&v).unwrap_or_else(|e| panic!("group {}: {e}", show(&k)));
        assert_eq!(k.as_ref(), g.name.as_bytes());
    }
    for kv in connectors.iter() {
        let (k, v) = kv.unwrap();
        let c: Connector =
            serde_json::from_slice(&v).unwrap_or_else(|e| panic!("connector {}: {e}", show(&k)));
        assert_eq!(k.as_ref(), c.name.as_bytes());
        c.validate().unwrap();
    }
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for kv in db.open_tree(layout::USERS).unwrap().iter() {
        let (k, v) = kv.unwrap();
        let u: User =
            serde_json::from_slice(&v).unwrap_or_else(|e| panic!("user {}: {e}", show(&k)));
        assert_eq!(k.as_ref(), u.name.as_bytes());
        for id in &u.identities {
            let owner = owners.entry(identity_key(id)).or_insert(u.name.clone());
            assert_eq!(*owner, u.name, "{id} of two users");
        }
        for g in &u.groups {
            assert!(groups.contains_key(g).unwrap(), "{g} of user {}", u.name);
        }
    }
    for kv in db.open_tree(layout::SERVICES).unwrap().iter() {
        let (k, v) = kv.unwrap();
        let s: Service =
            serde_json::from_slice(&v).unwrap_or_else(|e| panic!("service {}: {e}", show(&k)));
        assert_eq!(k.as_ref(), s.name.as_bytes());
        for g in &s.groups {
            assert!(groups.contains_key(g).unwrap(), "{g} of service {}", s.name);
        }
        if let Some(c) = &s.connector {
            assert!(
                connectors.contains_key(c).unwrap(),
                "{c} of service {}",
                s.name
            );
        }
    }
}

#[test]
fn a_migrated_schema_1_store_reads_with_todays_model() {
    use ztp_proto::{Protocol, Service, User};

    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    run(&db).unwrap();
    assert_readable_today(&db);

    // Absent and null optional fields read as their defaults, present ones as written.
    let user = |n: &str| -> User {
        serde_json::from_slice(
            &db.open_tree(layout::USERS)
                .unwrap()
                .get(n)
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    };
    let service = |n: &str| -> Service {
        serde_json::from_slice(
            &db.open_tree(layout::SERVICES)
                .unwrap()
                .get(n)
                .unwrap()
                .unwrap(),
        )
        .unwrap()
    };
    assert!(user("alice").disabled);
    assert!(!user("dave").disabled && user("dave").identities.is_empty());
    let web = service("web.svc.internal");
    assert_eq!(web.protocol, Protocol::Tcp);
    assert_eq!(web.handler.as_deref(), Some("http"));
    assert_eq!(web.allow, ["10.0.0.0/8"]);
    assert!(web.deny.is_empty());
    let min = service("min.svc.internal");
    assert_eq!((min.protocol, min.address), (Protocol::Auto, None));
    assert_eq!(service("dns.svc.internal").handler, None);
}

#[test]
fn a_schema_2_store_reads_with_todays_model() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_2);
    run(&db).unwrap();
    assert_readable_today(&db);
}

#[test]
fn a_schema_3_store_reads_with_todays_model() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_3);
    run(&db).unwrap();
    assert_readable_today(&db);
    let db_svc: ztp_proto::Service = serde_json::from_slice(
        &db.open_tree(layout::SERVICES)
            .unwrap()
            .get("db.svc.internal")
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(db_svc.connector.as_deref(), Some("lab"));
}

#[test]
fn the_current_layout_is_the_frozen_schema_4() {
    // When LATEST moves on, compare with the newest frozen module instead.
    assert_eq!(LATEST, 4);
    assert_eq!(
        [
            layout::META,
            layout::SERVICES,
            layout::USERS,
            layout::GROUPS,
            layout::REVOKED,
            layout::TOKENS,
            layout::AUDIT,
            layout::CONN_AUDIT,
            layout::CONNECTORS,
        ],
        v4::TREES
    );
    assert_eq!(layout::CONFIG_VERSION, v1::CONFIG_VERSION);
    assert_eq!(
        (layout::SCHEMA_VERSION, layout::AUDIT_SEQ),
        (&b"schema_version"[..], &b"audit_seq"[..])
    );

    // Schema 4 is schema 3's record trees under the names the frozen modules gave them,
    // and none of the indexes migration 4 drops.
    for (frozen, in_v4) in [
        (v1::META, true),
        (v1::SERVICES, true),
        (v1::USERS, true),
        (v1::GROUPS, true),
        (v1::REVOKED, true),
        (v1::TOKENS, true),
        (v1::AUDIT, true),
        (v3::CONNECTORS, true),
        (v2::IDENTITIES, false),
        (v2::GROUP_REFS, false),
        (v3::CONNECTOR_REFS, false),
    ] {
        assert_eq!(v4::TREES.contains(&frozen), in_v4, "{frozen}");
    }
}

#[test]
fn an_unreadable_schema_1_record_is_named_and_changes_nothing() {
    let cases: &[(&str, &[u8], &[u8], &str)] = &[
        ("users", b"mallory", b"{not json", "not JSON"),
        (
            "users",
            b"mallory",
            br#"["mallory"]"#,
            "expected a JSON object",
        ),
        (
            "users",
            b"mallory",
            br#"{"identities":[]}"#,
            "missing field `name`",
        ),
        (
            "users",
            b"mallory",
            br#"{"name":"mallory","groups":"ops"}"#,
            "field `groups`: expected an array of strings",
        ),
        (
            "users",
            b"mallory",
            br#"{"name":"mallory","identities":[1]}"#,
            "field `identities`",
        ),
        (
            "users",
            b"mallory",
            br#"{"name":"mallory","disabled":"yes"}"#,
            "field `disabled`",
        ),
        (
            "users",
            b"mallory",
            br#"{"name":"mallory","role":"admin"}"#,
            "unknown field `role`",
        ),
        (
            "services",
            b"x.svc.internal",
            br#"{"name":"x.svc.internal","protocol":"sctp"}"#,
            "field `protocol`",
        ),
        (
            "services",
            b"x.svc.internal",
            br#"{"name":"x.svc.internal","address":8080}"#,
            "field `address`",
        ),
        // `deny` came after schema 1: a schema-1 record with it is not schema 1's.
        (
            "services",
            b"x.svc.internal",
            br#"{"name":"x.svc.internal","deny":["10.0.0.0/8"]}"#,
            "unknown field `deny`",
        ),
    ];
    for (tree, key, value, reason) in cases {
        let store = TempStore::new();
        let db = store_of(&store, fixtures::SCHEMA_1);
        // Sorts after the good records: anything they would write has been computed.
        write(&db, &[(tree, &[(key, value)])]);
        let before = dump(&db);
        let err = run(&db).unwrap_err();
        let msg = err.to_string();
        let key = String::from_utf8_lossy(key);
        match &err {
            MigrationError::BadRecord {
                version: 2,
                tree: t,
                key: k,
                reason: r,
                ..
            } if t == tree && *k == key && r.contains(reason) => {}
            _ => panic!("{tree}/{key}: {msg}"),
        }
        assert!(
            msg.contains(&format!("{key:?} in {tree}")),
            "names the record: {msg}"
        );
        assert_eq!(dump(&db), before, "{tree}/{key}: nothing changed");
        assert_eq!(schema_version(&db).unwrap(), 1);
    }
}

#[test]
fn an_identity_of_two_users_is_named_changes_nothing_and_reruns_once_fixed() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_1);
    write(
        &db,
        &[(
            "users",
            &[(
                b"zed",
                br#"{"name":"zed","identities":["ALICE@example.com"]}"#,
            )],
        )],
    );
    let before = dump(&db);
    let err = run(&db).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(r#""zed" in users"#) && msg.contains("also claimed by alice"),
        "{msg}"
    );
    assert_eq!(dump(&db), before, "nothing changed");

    // The operator fixes the record; the migration then runs from the start.
    write(&db, &[("users", &[(b"zed", br#"{"name":"zed"}"#)])]);
    assert_eq!(run_to(&db, 2).unwrap(), Applied { from: 1, to: 2 });
    let mut expected = schema_1_migrated();
    expected
        .get_mut("users")
        .unwrap()
        .insert("zed".into(), show(br#"{"name":"zed"}"#));
    assert_eq!(dump(&db), expected);
}

#[test]
fn a_newer_store_is_refused() {
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_2);
    db.open_tree(layout::META)
        .unwrap()
        .insert(layout::SCHEMA_VERSION, &(LATEST + 1).to_be_bytes())
        .unwrap();
    let before = dump(&db);
    let err = run(&db).unwrap_err();
    assert!(matches!(err, MigrationError::TooNew { .. }), "{err}");
    assert!(err.to_string().contains("newer"));
    assert_eq!(dump(&db), before);
}

#[test]
fn a_schema_5_store_is_refused_as_too_new() {
    // A migrated store of schema 4 that a later ZTP moved on (with whatever it added).
    let store = TempStore::new();
    let db = store_of(&store, fixtures::SCHEMA_3);
    run(&db).unwrap();
    write(
        &db,
        &[
            ("meta", &[(b"schema_version", b"\0\0\0\x05")]),
            ("identities", &[(b"alice@example.com", b"alice")]),
        ],
    );
    let before = dump(&db);
    for target in [LATEST, 3] {
        let err = run_to(&db, target).unwrap_err();
        assert!(
            matches!(err, MigrationError::TooNew { found: 5, known: 4 }),
            "{err}"
        );
        assert!(err.to_string().contains("written by a newer ZTP"), "{err}");
        assert_eq!(dump(&db), before, "nothing dropped nor written");
    }
}

/// Opens the sled store at `dir`, waiting (up to 10 s) for a previous handle's threads to
/// let go of its lock.
fn reopen(dir: &Path) -> sled::Db {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("cannot reopen {}: {e}", dir.display()),
        }
    }
}
