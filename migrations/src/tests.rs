//! A store written at schema 1 is upgraded and every record is found; a newer store is
//! refused.

use super::*;
use ztp_proto::{Group, Protocol};

fn temp_db() -> (sled::Db, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "ztp-migrations-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    (sled::open(&dir).unwrap(), dir)
}

#[test]
fn upgrades_a_schema_1_store_and_finds_every_record() {
    let (db, dir) = temp_db();
    assert_eq!(run_to(&db, 1).unwrap(), Applied { from: 0, to: 1 });

    // Records as schema 1 wrote them: JSON values, no indexes.
    let groups = db.open_tree(layout::GROUPS).unwrap();
    let users = db.open_tree(layout::USERS).unwrap();
    let services = db.open_tree(layout::SERVICES).unwrap();
    for g in ["admins", "ops"] {
        let v = serde_json::to_vec(&Group { name: g.into() }).unwrap();
        groups.insert(g, v).unwrap();
    }
    for i in 0..500 {
        let u = User {
            name: format!("user{i}"),
            identities: vec![format!("User{i}@Example.com"), format!("spiffe://x/u{i}")],
            groups: if i % 2 == 0 {
                vec!["admins".into()]
            } else {
                vec![]
            },
            disabled: i % 7 == 0,
        };
        users
            .insert(&u.name, serde_json::to_vec(&u).unwrap())
            .unwrap();
    }
    for i in 0..300 {
        let s = Service {
            name: format!("s{i}.svc.internal"),
            protocol: Protocol::Tcp,
            address: Some(format!(":{}", 1000 + i)),
            groups: vec!["ops".into()],
            allow: vec![],
            deny: vec![],
            handler: None,
        };
        services
            .insert(&s.name, serde_json::to_vec(&s).unwrap())
            .unwrap();
    }
    db.flush().unwrap();
    drop((groups, users, services));
    drop(db);

    // Reopen, as a new ztp-control would, and upgrade. sled's flusher thread may hold
    // the file lock for a moment after the drop: retry, bounded.
    let db = reopen(&dir);
    assert_eq!(
        run(&db).unwrap(),
        Applied {
            from: 1,
            to: LATEST
        }
    );
    assert_eq!(db.open_tree(layout::USERS).unwrap().len(), 500);
    assert_eq!(db.open_tree(layout::SERVICES).unwrap().len(), 300);
    assert_eq!(db.open_tree(layout::GROUPS).unwrap().len(), 2);
    let ids = db.open_tree(layout::IDENTITIES).unwrap();
    assert_eq!(ids.len(), 1000);
    assert_eq!(
        ids.get("user42@example.com").unwrap().as_deref(),
        Some(&b"user42"[..])
    );
    let refs = db.open_tree(layout::GROUP_REFS).unwrap();
    assert_eq!(
        refs.scan_prefix(layout::group_ref_prefix("admins")).count(),
        250
    );
    assert_eq!(
        refs.scan_prefix(layout::group_ref_prefix("ops")).count(),
        300
    );
    // Running again changes nothing.
    assert_eq!(
        run(&db).unwrap(),
        Applied {
            from: LATEST,
            to: LATEST
        }
    );
    drop(db);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_newer_store_is_refused() {
    let (db, dir) = temp_db();
    run(&db).unwrap();
    db.open_tree(layout::META)
        .unwrap()
        .insert(layout::SCHEMA_VERSION, &(LATEST + 1).to_be_bytes())
        .unwrap();
    let err = run(&db).unwrap_err();
    assert!(matches!(err, MigrationError::TooNew { .. }), "{err}");
    assert!(err.to_string().contains("newer"));
    drop(db);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_corrupt_record_is_reported_not_skipped() {
    let (db, dir) = temp_db();
    run_to(&db, 1).unwrap();
    db.open_tree(layout::USERS)
        .unwrap()
        .insert("mallory", &b"{not json"[..])
        .unwrap();
    let err = run(&db).unwrap_err();
    assert!(err.to_string().contains("mallory"), "{err}");
    assert_eq!(schema_version(&db).unwrap(), 1, "version not bumped");
    drop(db);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Opens the sled store at `dir`, waiting (up to 10 s) for a previous handle's threads to
/// let go of its lock.
fn reopen(dir: &std::path::Path) -> sled::Db {
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
