//! The store's shared suite: every case runs against each backend (sled in a temporary
//! folder here; etcd on a real cluster in `tests/etcd_store.rs`), through [`Place`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::backend::{Commit, Update};
use super::commit::put_op;
use super::state::State;
use super::*;
use ztp_proto::Protocol;
use ztp_proto::{Connector, Group, Invalid, Service, Snapshot, User};

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "ztp-store-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a case's store lives; opened again, it is the same records.
pub trait Place: Send + Sync {
    /// A store on the place's records (the previous one must be dropped first where the
    /// backend allows one process only).
    fn open(&self) -> BoxFuture<'_, Store>;
    /// The backend the place's stores share, to plant records as another writer (or an
    /// older ZTP) would.
    fn backend(&self) -> BoxFuture<'_, Arc<dyn Backend>>;
    /// Forgets the backend: the next store reads the records afresh (drop the stores
    /// first).
    fn restart(&self);
    /// The files that hold the records, where there are any.
    fn files(&self) -> Vec<PathBuf>;
}

use super::backend::BoxFuture;

/// sled in a temporary folder.
pub struct SledPlace {
    dir: TempDir,
    backend: std::sync::Mutex<Option<Arc<dyn Backend>>>,
}

impl SledPlace {
    pub fn new() -> Self {
        SledPlace {
            dir: TempDir::new(),
            backend: Default::default(),
        }
    }
}

impl Place for SledPlace {
    fn open(&self) -> BoxFuture<'_, Store> {
        Box::pin(async move { Store::connect(self.backend().await).await.unwrap() })
    }
    fn backend(&self) -> BoxFuture<'_, Arc<dyn Backend>> {
        Box::pin(async move {
            let mut b = self.backend.lock().unwrap();
            b.get_or_insert_with(|| Arc::new(super::sled::SledBackend::open(&self.dir.0).unwrap()))
                .clone()
        })
    }
    fn restart(&self) {
        *self.backend.lock().unwrap() = None;
    }
    fn files(&self) -> Vec<PathBuf> {
        walk(&self.dir.0)
    }
}

/// Waits (bounded by `secs`) until `store` is at `version` or past it: another
/// instance's commits reach it through the backend's updates.
async fn wait_version(store: &Store, version: u64, secs: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while store.version().unwrap() < version {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Commits `ops` straight to the backend, as another instance (or an older ZTP) would:
/// the store that has the place open learns of it only from the backend.
pub async fn plant(backend: &dyn Backend, ops: Vec<Op>, bump: bool) -> (u64, u64) {
    let loaded = backend.load().await.unwrap();
    let version = loaded.version + u64::from(bump);
    let commit = Commit {
        expect_seq: loaded.seq,
        version,
        bump,
        audit: AuditRecord {
            seq: loaded.seq + 1,
            time_ms: now_ms(),
            actor: Actor::system(),
            action: "planted".into(),
            target: String::new(),
            version,
        },
        ops,
    };
    backend.commit(&commit).await.unwrap();
    backend.sync().await.unwrap();
    (loaded.seq + 1, version)
}

fn svc(name: &str, groups: &[&str]) -> Service {
    Service {
        name: name.into(),
        protocol: Protocol::Tcp,
        address: Some(":22".into()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        allow: vec![],
        deny: vec![],
        handler: None,
        connector: None,
    }
}

fn user(name: &str, ids: &[&str], groups: &[&str]) -> User {
    User {
        name: name.into(),
        identities: ids.iter().map(|g| g.to_string()).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        disabled: false,
    }
}

fn group(name: &str) -> Group {
    Group { name: name.into() }
}

fn connector(name: &str, description: &str) -> Connector {
    Connector {
        name: name.into(),
        description: description.into(),
    }
}

/// A service served through `connector`.
fn dark(name: &str, connector: &str) -> Service {
    Service {
        address: Some("10.1.2.3:5432".into()),
        connector: Some(connector.into()),
        ..svc(name, &[])
    }
}

fn fields(e: &StoreError) -> Vec<String> {
    match e {
        StoreError::Invalid(Invalid(v)) => v.iter().map(|f| f.field.clone()).collect(),
        StoreError::Conflict { errors, .. } => errors.iter().map(|f| f.field.clone()).collect(),
        other => panic!("not a field error: {other}"),
    }
}

pub async fn writes_bump_the_version_and_survive_reopen(p: &dyn Place) {
    let a = Actor::system();
    {
        let store = p.open().await;
        assert_eq!(store.version().unwrap(), 0);
        assert_eq!(
            store.create_group(group("admins"), None, &a).await.unwrap(),
            1
        );
        assert_eq!(
            store
                .put_service(svc("SSH.svc.internal", &["admins"]), true, None, &a)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .put_user(
                    user("alice", &["alice@example.com"], &["admins"]),
                    true,
                    None,
                    &a
                )
                .await
                .unwrap(),
            3
        );
    }
    let store = {
        p.restart();
        p.open().await
    };
    assert_eq!(store.version().unwrap(), 3);
    assert_eq!(
        store.service("ssh.svc.internal").await.unwrap().0.groups,
        ["admins"]
    );
    assert_eq!(
        store.user("alice").await.unwrap().0.identities,
        ["alice@example.com"]
    );
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.version, 3);
    snap.validate().unwrap();
    // Every change is audited with who, what and the version.
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0].action, "user.create");
    assert_eq!(audit[0].target, "alice");
    assert_eq!(audit[0].version, 3);
    assert_eq!(audit[2].actor, a);
}

pub async fn integrity_is_enforced(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let e = store
        .put_service(svc("a.svc", &["nope"]), true, None, &a)
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["groups[0]"]);
    let e = store
        .put_user(user("bob", &["bob@x"], &["nope"]), true, None, &a)
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["groups[0]"]);
    assert_eq!(store.version().unwrap(), 0, "refused writes store nothing");

    store
        .put_user(user("alice", &["Alice@X"], &[]), true, None, &a)
        .await
        .unwrap();
    let e = store
        .put_user(user("eve", &["x", "alice@x"], &[]), true, None, &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }));
    assert_eq!(fields(&e), ["identities[1]"]);
    // A user may keep its own identities on replace.
    store
        .put_user(
            user("alice", &["alice@x", "spiffe://x/a"], &[]),
            false,
            None,
            &a,
        )
        .await
        .unwrap();
    // Replacing frees the identities dropped; deleting frees all.
    store
        .put_user(user("alice", &["spiffe://x/a"], &[]), false, None, &a)
        .await
        .unwrap();
    store
        .put_user(user("eve", &["alice@x"], &[]), true, None, &a)
        .await
        .unwrap();
    store.delete_user("alice", None, &a).await.unwrap();
    store
        .put_user(user("frank", &["spiffe://x/a"], &[]), true, None, &a)
        .await
        .unwrap();

    let e = store
        .put_service(svc("a.svc", &[]), false, None, &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }));
    store
        .put_service(svc("a.svc", &[]), true, None, &a)
        .await
        .unwrap();
    let e = store
        .put_service(svc("A.svc", &[]), true, None, &a)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Exists { .. }),
        "names compare case-insensitively"
    );
}

pub async fn group_delete_in_use_and_cascade(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    for g in ["admins", "ops"] {
        store.create_group(group(g), None, &a).await.unwrap();
    }
    store
        .put_service(svc("both.svc", &["admins", "ops"]), true, None, &a)
        .await
        .unwrap();
    store
        .put_service(svc("only.svc", &["admins"]), true, None, &a)
        .await
        .unwrap();
    store
        .put_user(user("alice", &["a@x"], &["admins", "ops"]), true, None, &a)
        .await
        .unwrap();
    let v = store.version().unwrap();

    let e = store
        .delete_group("admins", false, None, &a)
        .await
        .unwrap_err();
    let mut f = fields(&e);
    f.sort();
    assert_eq!(f, ["services/both.svc", "services/only.svc", "users/alice"]);
    // Cascading would open only.svc to everyone: refused.
    let e = store
        .delete_group("admins", true, None, &a)
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["services/only.svc"]);
    assert_eq!(store.version().unwrap(), v);

    store.delete_service("only.svc", None, &a).await.unwrap();
    store.delete_group("admins", true, None, &a).await.unwrap();
    assert_eq!(store.service("both.svc").await.unwrap().0.groups, ["ops"]);
    assert_eq!(store.user("alice").await.unwrap().0.groups, ["ops"]);
    assert!(store.group("admins").await.is_err());
    store.snapshot().await.unwrap().validate().unwrap();
    // Unused now: plain delete works.
    store.delete_service("both.svc", None, &a).await.unwrap();
    store
        .put_user(user("alice", &["a@x"], &[]), false, None, &a)
        .await
        .unwrap();
    store.delete_group("ops", false, None, &a).await.unwrap();
}

pub async fn stale_writes_are_refused(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    store.create_group(group("g"), Some(0), &a).await.unwrap();
    let e = store
        .create_group(group("h"), Some(0), &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Stale { current: 1 }));
    store.create_group(group("h"), Some(1), &a).await.unwrap();
}

pub async fn import_replaces_everything_as_one_version(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    store.create_group(group("old"), None, &a).await.unwrap();
    store
        .put_user(user("old", &["old@x"], &["old"]), true, None, &a)
        .await
        .unwrap();
    let snap = Snapshot::from_yaml(
        "version: 99\nservices:\n  - {name: a.svc, address: ':1', groups: [g]}\nusers:\n  - {name: u, identities: [old@x], groups: [g]}\ngroups: [{name: g}]\nrevoked: ['00:0A']\n",
    )
    .unwrap();
    assert_eq!(store.import(snap, None, &a).await.unwrap(), 3);
    let got = store.snapshot().await.unwrap();
    assert_eq!(got.version, 3);
    assert_eq!(got.groups, [group("g")]);
    assert_eq!(got.users.len(), 1);
    assert_eq!(got.revoked, ["0a"]);
    // The indexes were rebuilt: the identity moved to the new user; old group gone.
    let e = store
        .put_user(user("v", &["OLD@x"], &[]), true, None, &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }));
    store.delete_group("g", false, None, &a).await.unwrap_err();

    let bad = Snapshot {
        version: 1,
        services: vec![svc("b.svc", &["missing"])],
        users: vec![],
        groups: vec![],
        revoked: vec![],
        connectors: vec![],
    };
    let e = store.import(bad, None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services[0].groups[0]"]);
    assert_eq!(
        store.version().unwrap(),
        3,
        "a refused import changes nothing"
    );
}

pub async fn tokens_keep_only_hashes(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let t = store.create_token("ci", &a).await.unwrap();
    let actor = store.verify_token(&t.token).unwrap();
    assert_eq!(actor.token_name, "ci");
    assert!(store.verify_token(&t.token.replace('a', "b")).is_none() || !t.token.contains('a'));
    assert!(store.verify_token("ztp_nope").is_none());
    assert_eq!(store.version().unwrap(), 0, "tokens are not configuration");
    // The secret is nowhere in the store's records, nor in its files.
    drop(store);
    let secret = t.token.rsplit('_').next().unwrap().to_owned();
    let loaded = p.backend().await.load().await.unwrap();
    for (kind, key, v) in &loaded.records {
        assert!(
            !v.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret found in {kind:?} {key}"
        );
    }
    for entry in p.files() {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "secret found in {}",
            entry.display()
        );
    }
    let store = {
        p.restart();
        p.open().await
    };
    let e = store.revoke_token(&t.info.id, &a).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "last token kept");
    let t2 = store.create_token("second", &a).await.unwrap();
    store.revoke_token(&t.info.id, &a).await.unwrap();
    assert!(store.verify_token(&t.token).is_none());
    assert!(store.verify_token(&t2.token).is_some());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn damaged_store_is_refused_without_panic() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 3] = [
        ("data and conf overwritten", |d| {
            let len = std::fs::metadata(d.join("db")).unwrap().len() as usize;
            std::fs::write(d.join("db"), vec![0xA5u8; len.max(4096)]).unwrap();
            std::fs::write(d.join("conf"), b"garbage").unwrap();
        }),
        ("data overwritten", |d| {
            let len = std::fs::metadata(d.join("db")).unwrap().len() as usize;
            std::fs::write(d.join("db"), vec![0x5Au8; len.max(4096)]).unwrap();
        }),
        ("data truncated", |d| {
            std::fs::write(d.join("db"), b"").unwrap()
        }),
    ];
    for (what, damage) in cases {
        let dir = TempDir::new();
        {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let store = Store::open(&dir.0).unwrap();
            rt.block_on(store.create_group(group("g"), None, &Actor::system()))
                .unwrap();
        }
        damage(&dir.0);
        match Store::open(&dir.0) {
            Err(e) => assert!(
                e.to_string().contains("cannot open the store"),
                "{what}: {e}"
            ),
            Ok(s) => panic!(
                "{what}: a damaged store was opened (version {:?})",
                s.version()
            ),
        }
    }
}

#[test]
fn newer_schema_is_refused() {
    let dir = TempDir::new();
    {
        let db = ::sled::open(&dir.0).unwrap();
        ztp_migrations::run(&db).unwrap();
        db.open_tree(ztp_migrations::layout::META)
            .unwrap()
            .insert(
                ztp_migrations::layout::SCHEMA_VERSION,
                &(ztp_migrations::LATEST + 1).to_be_bytes(),
            )
            .unwrap();
        db.flush().unwrap();
    }
    let e = Store::open(&dir.0).err().expect("refused");
    assert!(e.to_string().contains("newer"), "{e}");
}

pub async fn revocations_are_versions_and_normalized(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let v = store
        .revoke(&["00:0A:1B".into(), "0x0a1b".into(), "ff".into()], None, &a)
        .await
        .unwrap();
    assert_eq!(v, 1, "one version for the whole list");
    assert_eq!(
        store.revoked(None, 10).await.unwrap().0.items,
        ["0a1b", "ff"]
    );
    assert_eq!(store.snapshot().await.unwrap().revoked, ["0a1b", "ff"]);
    let e = store.revoke(&["zz".into()], None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["serials[0]"]);
    store.unrevoke("FF", None, &a).await.unwrap();
    assert!(matches!(
        store.unrevoke("ff", None, &a).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    assert_eq!(store.revoked(None, 10).await.unwrap().0.items, ["0a1b"]);
}

/// The in-memory configuration stays what sled holds through every kind of write:
/// creates, replaces, deletes, a cascading group delete, an import, a revocation.
pub async fn the_configuration_in_memory_follows_every_write(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let backend = p.backend().await;
    async fn check(store: &Store, backend: &dyn Backend, step: &str) {
        let cached = store.state().snapshot();
        let loaded = backend.load().await.unwrap();
        let disk = State::from_loaded(loaded).unwrap().snapshot();
        assert_eq!(disk.version, store.version().unwrap(), "after {step}");
        assert_eq!(cached, disk, "after {step}");
    }
    check(&store, &*backend, "open").await;
    store.create_group(group("ops"), None, &a).await.unwrap();
    store.create_group(group("dev"), None, &a).await.unwrap();
    check(&store, &*backend, "groups created").await;
    store
        .put_service(svc("a.svc.internal", &["ops"]), true, None, &a)
        .await
        .unwrap();
    store
        .put_service(svc("b.svc.internal", &["ops", "dev"]), true, None, &a)
        .await
        .unwrap();
    store
        .put_user(user("alice", &["alice@x"], &["ops"]), true, None, &a)
        .await
        .unwrap();
    store
        .put_user(user("bob", &["bob@x"], &["dev"]), true, None, &a)
        .await
        .unwrap();
    check(&store, &*backend, "services and users created").await;
    store
        .put_user(
            user("bob", &["bob@x", "robert@x"], &["ops"]),
            false,
            None,
            &a,
        )
        .await
        .unwrap();
    store
        .put_service(svc("a.svc.internal", &["dev", "ops"]), false, None, &a)
        .await
        .unwrap();
    check(&store, &*backend, "replaced").await;
    store
        .delete_service("b.svc.internal", None, &a)
        .await
        .unwrap();
    store.delete_user("alice", None, &a).await.unwrap();
    check(&store, &*backend, "deleted").await;
    store.delete_group("dev", true, None, &a).await.unwrap();
    check(&store, &*backend, "a cascading group delete").await;
    store.revoke(&["0a".into()], None, &a).await.unwrap();
    check(&store, &*backend, "a revocation").await;
    store
        .put_connector(connector("lab", ""), true, None, &a)
        .await
        .unwrap();
    store
        .put_connector(connector("lab", "the rack"), false, None, &a)
        .await
        .unwrap();
    store
        .put_service(dark("d.svc.internal", "lab"), true, None, &a)
        .await
        .unwrap();
    check(&store, &*backend, "a connector and its service").await;
    store
        .delete_service("d.svc.internal", None, &a)
        .await
        .unwrap();
    store.delete_connector("lab", None, &a).await.unwrap();
    check(&store, &*backend, "a connector deleted").await;
    let imported = Snapshot {
        version: 0,
        services: vec![
            svc("c.svc.internal", &["g"]),
            dark("e.svc.internal", "edge"),
        ],
        users: vec![user("carol", &["carol@x"], &["g"])],
        groups: vec![group("g")],
        revoked: vec![],
        connectors: vec![connector("edge", "")],
    };
    store.import(imported, None, &a).await.unwrap();
    check(&store, &*backend, "an import").await;
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.users.len(), 1);
    assert_eq!(snap.users[0].name, "carol");
    assert!(snap.revoked.is_empty());
    store.create_token("t", &a).await.unwrap();
    check(&store, &*backend, "a token (no new version)").await;

    // Unsure (as after a commit whose outcome is unknown), it is read again, version
    // included.
    store.state().unsure = true;
    let (carol, version) = store.user("carol").await.unwrap();
    assert_eq!((carol.name.as_str(), version), ("carol", snap.version));
    check(&store, &*backend, "read again").await;
}

/// Records and their version are read together (issue 14): each read answers with the
/// version the record is at, through every kind of write.
pub async fn records_are_read_with_the_version_they_are_at(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let v = store.create_group(group("ops"), None, &a).await.unwrap();
    assert_eq!(store.group("ops").await.unwrap(), (group("ops"), v));
    let v = store
        .put_service(svc("A.svc.internal", &["ops"]), true, None, &a)
        .await
        .unwrap();
    let (s, at) = store.service("a.SVC.internal").await.unwrap();
    assert_eq!((s.name.as_str(), at), ("A.svc.internal", v));
    let v = store
        .put_user(user("alice", &["alice@x"], &["ops"]), true, None, &a)
        .await
        .unwrap();
    assert_eq!(
        store.user("alice").await.unwrap(),
        (user("alice", &["alice@x"], &["ops"]), v)
    );
    let v = store.revoke(&["0a".into()], None, &a).await.unwrap();
    let (page, at) = store.revoked(None, 10).await.unwrap();
    assert_eq!((page.items, at), (vec!["0a".to_owned()], v));
    // Every read now names the newest version, whichever write made it.
    let (page, at) = store.services(None, 10).await.unwrap();
    assert_eq!((page.items.len(), at), (1, v));
    let (page, at) = store.users(None, 10).await.unwrap();
    assert_eq!((page.items.len(), at), (1, v));
    let (page, at) = store.groups(None, 10).await.unwrap();
    assert_eq!((page.items.len(), at), (1, v));
    for e in [
        store.service("b.svc.internal").await.unwrap_err(),
        store.service("not a name").await.unwrap_err(),
        store.user("bob").await.unwrap_err(),
        store.group("dev").await.unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    }
}

/// A write decided on a configuration that another writer has since moved is not
/// stored: the backend refuses it (the write sequence moved), the store catches up and
/// decides again, so `If-Match` is checked against the newest version and a create of a
/// name the other writer took is a 409, never an overwrite.
pub async fn a_write_that_lost_a_race_is_decided_again(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let v = store.create_group(group("ops"), None, &a).await.unwrap();
    let backend = p.backend().await;
    // Straight to the backend with a stale sequence, as a writer that lost a race.
    let loaded = backend.load().await.unwrap();
    let stale = Commit {
        expect_seq: loaded.seq - 1,
        version: v + 1,
        bump: true,
        audit: AuditRecord {
            seq: loaded.seq,
            time_ms: 0,
            actor: a.clone(),
            action: "group.create".into(),
            target: "dev".into(),
            version: v + 1,
        },
        ops: vec![put_op(Kind::Group, "dev", &group("dev"))],
    };
    assert!(matches!(
        backend.commit(&stale).await.unwrap_err(),
        BackendError::Moved
    ));
    assert_eq!(backend.load().await.unwrap().version, v, "nothing stored");

    // Another writer creates `dev` behind the store's back.
    let (_, theirs) = plant(
        &*backend,
        vec![put_op(Kind::Group, "dev", &group("dev"))],
        true,
    )
    .await;
    assert_eq!(theirs, v + 1);
    let e = store
        .create_group(group("qa"), Some(v), &a)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Stale { current } if current == theirs),
        "If-Match is checked against the newest version: {e}"
    );
    let e = store
        .create_group(group("dev"), None, &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Exists { .. }), "{e}");
    assert_eq!(store.group("dev").await.unwrap(), (group("dev"), theirs));
    let next = store.create_group(group("qa"), None, &a).await.unwrap();
    assert_eq!(next, theirs + 1);
    let audit = store.audit(3).await.unwrap();
    let seqs: Vec<u64> = audit.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        [seqs[0], seqs[0] - 1, seqs[0] - 2],
        "one audit record per commit"
    );
}

/// A write whose caller goes away while it flushes is still announced to the config
/// stream: it is committed (and readable), so the nodes must not wait for the next write
/// to hear of it.
#[tokio::test]
async fn a_write_dropped_while_flushing_is_still_announced() {
    let p = SledPlace::new();
    let store = p.open().await;
    let a = Actor::system();
    let mut versions = store.watch_version();
    let before = *versions.borrow_and_update();
    let mut announced = 0;
    for i in 0..20 {
        // Polled once: the transaction commits, then the flush is pending and the
        // future is dropped (if the flush happened to finish at once, it was announced
        // the ordinary way).
        let write = store.put_service(svc(&format!("s{i}.svc"), &[]), true, None, &a);
        let _ = tokio::time::timeout(std::time::Duration::ZERO, write).await;
        let now = store.version().unwrap();
        assert_eq!(now, before + i + 1, "the write committed");
        if *versions.borrow_and_update() == now {
            announced += 1;
        }
    }
    assert_eq!(announced, 20, "every committed version is announced");
}

pub async fn a_token_stored_before_roles_is_admin(p: &dyn Place) {
    let store = p.open().await;
    let id = "0123456789abcdef";
    let secret = "ab".repeat(32);
    let hash: String = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The record exactly as stores written before roles existed hold it.
    let old =
        format!(r#"{{"id":"{id}","name":"legacy","created_ms":1763798400000,"hash":"{hash}"}}"#);
    drop(store);
    plant(
        &*p.backend().await,
        vec![Op {
            kind: Kind::Token,
            key: id.into(),
            value: Some(old.into_bytes()),
        }],
        false,
    )
    .await;
    let store = {
        p.restart();
        p.open().await
    };
    let actor = store.verify_token(&format!("ztp_{id}_{secret}")).unwrap();
    assert_eq!(actor.token_name, "legacy");
    assert_eq!(actor.role, Role::Admin);
    let listed = store.list_tokens(None, 10).unwrap();
    assert_eq!(listed.items[0].role, Role::Admin);
    // Its changes are audited as an admin's; a viewer token is listed as one.
    let v = store
        .create_token_with_role("watcher", Role::Viewer, &actor)
        .await
        .unwrap();
    assert_eq!(v.info.role, Role::Viewer);
    assert_eq!(store.verify_token(&v.token).unwrap().role, Role::Viewer);
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit[0].action, "token.create");
    assert_eq!(audit[0].actor, actor);
    assert_eq!(audit[0].actor.role, Role::Admin);
    // An audit record written before roles decodes as an admin's too.
    let old: AuditRecord = serde_json::from_str(
        r#"{"seq":1,"time_ms":1,"actor":{"token_id":"-","token_name":"ztp-control"},"action":"import","target":"","version":7}"#,
    )
    .unwrap();
    assert_eq!(old.actor.role, Role::Admin);
}

/// The last admin token cannot be revoked even while operator or viewer tokens remain:
/// they cannot make tokens, so nobody could ever manage tokens again.
pub async fn the_last_admin_token_stays_whatever_other_tokens_remain(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let admin = store
        .create_token_with_role("admin", Role::Admin, &a)
        .await
        .unwrap();
    let viewer = store
        .create_token_with_role("viewer", Role::Viewer, &a)
        .await
        .unwrap();
    let operator = store
        .create_token_with_role("operator", Role::Operator, &a)
        .await
        .unwrap();
    let e = store.revoke_token(&admin.info.id, &a).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Conflict { .. }),
        "the only admin token was revoked: {e:?}"
    );
    // Other roles go freely; a second admin lets the first go.
    store.revoke_token(&viewer.info.id, &a).await.unwrap();
    let admin2 = store
        .create_token_with_role("admin2", Role::Admin, &a)
        .await
        .unwrap();
    store.revoke_token(&admin.info.id, &a).await.unwrap();
    assert!(store.revoke_token(&admin2.info.id, &a).await.is_err());
    store.revoke_token(&operator.info.id, &a).await.unwrap();
}

// ----- connectors -----

/// The registry: create (a version each, audited), 409 on a name taken, 404 on a replace
/// of a name not there, 400 naming the field; listed in name order with the version; in
/// the snapshot; kept across a reopen.
pub async fn connectors_are_created_listed_replaced_and_deleted(p: &dyn Place) {
    let a = Actor::system();
    {
        let store = p.open().await;
        let v = store
            .put_connector(connector("lab", "the lab's rack"), true, None, &a)
            .await
            .unwrap();
        assert_eq!(v, 1, "a connector is configuration: it moves the version");
        assert_eq!(
            store.connector("lab").await.unwrap(),
            (connector("lab", "the lab's rack"), 1)
        );
        let e = store
            .put_connector(connector("lab", ""), true, None, &a)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Exists { .. }), "{e}");
        let e = store
            .put_connector(connector("edge", ""), false, None, &a)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
        for (bad, field) in [
            (connector("a b", ""), "name"),
            (connector("", ""), "name"),
            (connector("ok", "line\nbreak"), "description"),
            (connector("ok", &"x".repeat(1025)), "description"),
        ] {
            let e = store.put_connector(bad, true, None, &a).await.unwrap_err();
            assert_eq!(fields(&e), [field]);
        }
        assert_eq!(store.version().unwrap(), 1, "refused writes store nothing");

        for name in ["zeta", "edge", "b.c-d_e"] {
            store
                .put_connector(connector(name, ""), true, None, &a)
                .await
                .unwrap();
        }
        let v = store
            .put_connector(connector("lab", "moved"), false, None, &a)
            .await
            .unwrap();
        let (page, at) = store.connectors(None, 2).await.unwrap();
        assert_eq!(at, v);
        let names =
            |p: &Page<Connector>| p.items.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&page), ["b.c-d_e", "edge"]);
        let (rest, _) = store.connectors(page.next.as_deref(), 10).await.unwrap();
        assert_eq!(names(&rest), ["lab", "zeta"]);
        assert!(rest.next.is_none());

        let v = store.delete_connector("zeta", None, &a).await.unwrap();
        assert_eq!(v, 6);
        assert!(matches!(
            store.delete_connector("zeta", None, &a).await.unwrap_err(),
            StoreError::NotFound { .. }
        ));
        let actions: Vec<String> = store
            .audit(3)
            .await
            .unwrap()
            .into_iter()
            .map(|r| format!("{} {} {}", r.action, r.target, r.version))
            .collect();
        assert_eq!(
            actions,
            [
                "connector.delete zeta 6",
                "connector.replace lab 5",
                "connector.create b.c-d_e 4"
            ]
        );
    }
    let store = {
        p.restart();
        p.open().await
    };
    let snap = store.snapshot().await.unwrap();
    assert_eq!(snap.version, 6);
    assert_eq!(
        snap.connectors,
        [
            connector("b.c-d_e", ""),
            connector("edge", ""),
            connector("lab", "moved")
        ]
    );
    snap.validate().unwrap();
}

/// A service names only a registered connector (400 naming `connector`); a connector
/// that serves a service is not deleted (409 naming every such service, no cascade);
/// replacing or deleting the service frees it.
pub async fn a_service_holds_its_connector(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    let e = store
        .put_service(dark("db.svc.internal", "lab"), true, None, &a)
        .await
        .unwrap_err();
    assert_eq!(fields(&e), ["connector"]);
    assert!(e.to_string().contains("unknown connector \"lab\""), "{e}");
    assert_eq!(store.version().unwrap(), 0);

    for c in ["lab", "edge"] {
        store
            .put_connector(connector(c, ""), true, None, &a)
            .await
            .unwrap();
    }
    store
        .put_service(dark("DB.svc.internal", "lab"), true, None, &a)
        .await
        .unwrap();
    store
        .put_service(dark("cache.svc.internal", "lab"), true, None, &a)
        .await
        .unwrap();
    // The model's own rules still hold: a connector's service has no handler.
    let mut echo = dark("echo.svc.internal", "lab");
    echo.handler = Some("identity-echo".into());
    let e = store.put_service(echo, true, None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["handler"]);
    let v = store.version().unwrap();

    let e = store.delete_connector("lab", None, &a).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert_eq!(
        fields(&e),
        ["services/cache.svc.internal", "services/db.svc.internal"]
    );
    assert!(e.to_string().contains("serves 2 service(s)"), "{e}");
    assert_eq!(
        store.version().unwrap(),
        v,
        "a refused delete stores nothing"
    );

    // Moved to another connector: the old one serves one service less.
    store
        .put_service(dark("db.svc.internal", "edge"), false, None, &a)
        .await
        .unwrap();
    let e = store.delete_connector("edge", None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services/db.svc.internal"]);
    let e = store.delete_connector("lab", None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services/cache.svc.internal"]);
    // Off its connector (the data planes dial it now), and deleted: both free it.
    store
        .put_service(svc("db.svc.internal", &[]), false, None, &a)
        .await
        .unwrap();
    store.delete_connector("edge", None, &a).await.unwrap();
    store
        .delete_service("cache.svc.internal", None, &a)
        .await
        .unwrap();
    store.delete_connector("lab", None, &a).await.unwrap();
    let snap = store.snapshot().await.unwrap();
    assert!(snap.connectors.is_empty());
    snap.validate().unwrap();
    // A cascading group delete rewrites services and keeps their connector.
    store.create_group(group("ops"), None, &a).await.unwrap();
    store
        .put_connector(connector("lab", ""), true, None, &a)
        .await
        .unwrap();
    let mut both = dark("both.svc.internal", "lab");
    both.groups = vec!["ops".into(), "keep".into()];
    store.create_group(group("keep"), None, &a).await.unwrap();
    store.put_service(both, true, None, &a).await.unwrap();
    store.delete_group("ops", true, None, &a).await.unwrap();
    assert_eq!(
        store
            .service("both.svc.internal")
            .await
            .unwrap()
            .0
            .connector
            .as_deref(),
        Some("lab")
    );
    let e = store.delete_connector("lab", None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services/both.svc.internal"]);
}

/// An import carries the registry: it replaces the connectors, rebuilds which service
/// each serves, and refuses a service naming a connector the document does not hold.
pub async fn import_replaces_the_connectors_and_their_references(p: &dyn Place) {
    let store = p.open().await;
    let a = Actor::system();
    store
        .put_connector(connector("old", ""), true, None, &a)
        .await
        .unwrap();
    store
        .put_service(dark("old.svc.internal", "old"), true, None, &a)
        .await
        .unwrap();
    let snap = Snapshot::from_yaml(
        "version: 1\nconnectors:\n  - {name: lab, description: the lab}\n  - {name: spare}\nservices:\n  - {name: db.svc.internal, protocol: tcp, address: '10.1.2.3:5432', connector: lab}\n",
    )
    .unwrap();
    let v = store.import(snap, None, &a).await.unwrap();
    let got = store.snapshot().await.unwrap();
    assert_eq!(got.version, v);
    assert_eq!(
        got.connectors,
        [connector("lab", "the lab"), connector("spare", "")]
    );
    assert_eq!(got.services[0].connector.as_deref(), Some("lab"));
    assert_eq!(
        store.audit(1).await.unwrap()[0].target,
        "1 services, 0 users, 0 groups, 2 connectors"
    );
    // The old connector and its reference are gone; the new one is held.
    store.delete_connector("spare", None, &a).await.unwrap();
    assert!(matches!(
        store.delete_connector("old", None, &a).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    let e = store.delete_connector("lab", None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services/db.svc.internal"]);

    let bad = Snapshot {
        connectors: vec![],
        ..got.clone()
    };
    let e = store.import(bad, None, &a).await.unwrap_err();
    assert_eq!(fields(&e), ["services[0].connector"]);
    assert_eq!(
        store.snapshot().await.unwrap().connectors.len(),
        1,
        "nothing changed"
    );
}

// ----- connection audit -----

fn rec(t: u64, id: &str, svc: &str, decision: &str) -> ConnectionRecord {
    ConnectionRecord {
        time_ms: t,
        node: "n1".into(),
        peer: "127.0.0.1:1".into(),
        sni: svc.into(),
        identity: id.into(),
        identity_unverified: false,
        user: String::new(),
        service: svc.into(),
        decision: decision.into(),
        reason: "closed".into(),
        code: 0,
        bytes_up: 1,
        transport: "tcp".into(),
        connector: String::new(),
        bytes_down: 2,
        duration_ms: 3,
    }
}

async fn times(store: &Store) -> Vec<u64> {
    store
        .query_connections(AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|r| r.time_ms)
        .collect()
}

pub async fn connection_records_filter_order_and_retention(p: &dyn Place) {
    let store = p.open().await;
    store.set_conn_audit_cap(5);
    let recs = vec![
        rec(10, "a@x", "s1", "allow"),
        rec(20, "b@x", "s1", "deny"),
        rec(30, "a@x", "s2", "allow"),
    ];
    store.append_connections(recs).await.unwrap();
    let all = |q: AuditQuery| store.query_connections(AuditQuery { limit: 100, ..q });
    assert_eq!(times(&store).await, [30, 20, 10]);
    let by_identity = all(AuditQuery {
        identity: Some("A@X".into()),
        ..Default::default()
    });
    assert_eq!(by_identity.await.unwrap().len(), 2);
    let denied = all(AuditQuery {
        decision: Some("deny".into()),
        ..Default::default()
    });
    assert_eq!(denied.await.unwrap()[0].identity, "b@x");
    let by_service = all(AuditQuery {
        service: Some("s2".into()),
        ..Default::default()
    });
    assert_eq!(by_service.await.unwrap().len(), 1);
    let window = all(AuditQuery {
        since_ms: Some(15),
        until_ms: Some(25),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(window.len(), 1);
    assert_eq!(window[0].time_ms, 20);
    let limited = store
        .query_connections(AuditQuery {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(limited.len(), 2);
    // Retention: 5 kept, the oldest dropped.
    store
        .append_connections((40..45).map(|t| rec(t, "c@x", "s3", "allow")).collect())
        .await
        .unwrap();
    let kept = times(&store).await;
    assert_eq!(kept.len(), 5);
    assert_eq!(kept.last(), Some(&40));
    assert_eq!(store.version().unwrap(), 0, "records are not configuration");
}

pub async fn connection_retention_holds_in_every_view(p: &dyn Place) {
    let store = Arc::new(p.open().await);
    store.set_conn_audit_cap(3);
    let recs = |ts: &[u64]| -> Vec<ConnectionRecord> {
        ts.iter().map(|t| rec(*t, "a@x", "s", "allow")).collect()
    };
    store.append_connections(recs(&[50, 60])).await.unwrap();
    // A node whose clock is behind: its old record is the one dropped.
    store.append_connections(recs(&[10, 70, 80])).await.unwrap();
    assert_eq!(times(&store).await, [80, 70, 60]);
    // More at once than are kept.
    store
        .append_connections(recs(&[91, 92, 93, 94, 95, 96]))
        .await
        .unwrap();
    assert_eq!(times(&store).await, [96, 95, 94]);
    // A reader never sees more than the retention while records arrive.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for t in 100..200 {
                store.append_connections(recs(&[t])).await.unwrap();
            }
        })
    };
    while !writer.is_finished() {
        let n = times(&store).await.len();
        assert!(n <= 3, "a query saw {n} records with a retention of 3");
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert_eq!(times(&store).await, [199, 198, 197]);
}

/// Of several stores starting together on an empty backend, exactly one stores its
/// first token; a store that already holds a token stores no other.
pub async fn the_first_token_is_stored_once(p: &dyn Place) {
    let a = Actor::system();
    let stores: Vec<Arc<Store>> = vec![Arc::new(p.open().await), Arc::new(p.open().await)];
    let mut tasks = Vec::new();
    for store in &stores {
        for _ in 0..3 {
            let store = store.clone();
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let (_, info) = Store::mint_token("admin").unwrap();
                store.save_first_token(info, &a).await.unwrap()
            }));
        }
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1, "exactly one first token");
    for store in &stores {
        store.settle().await.unwrap();
    }
    let loaded = p.backend().await.load().await.unwrap();
    let tokens = loaded.records.iter().filter(|r| r.0 == Kind::Token).count();
    assert_eq!(tokens, 1);
}

/// A write larger than one backend transaction (3,000 users: etcd takes 128 operations
/// in one) is still one version, seen whole by a store that was following and by one
/// opened after it; writes go on after it.
pub async fn a_large_import_is_one_version_everywhere(p: &dyn Place) {
    let a = Actor::system();
    // A second store on one backend follows the first only where instances share it.
    let shared = p.backend().await.is_shared();
    let writer = Arc::new(p.open().await);
    let follower = if shared {
        Arc::new(p.open().await)
    } else {
        writer.clone()
    };
    writer.create_group(group("old"), None, &a).await.unwrap();
    let users: Vec<User> = (0..3000)
        .map(|i| {
            user(
                &format!("user{i:04}"),
                &[&format!("user{i}@example.com")],
                &["staff"],
            )
        })
        .collect();
    let snap = Snapshot {
        version: 0,
        services: vec![svc("big.svc.internal", &["staff"])],
        users,
        groups: vec![group("staff")],
        revoked: vec!["0a".into()],
        connectors: vec![],
    };
    let v = writer.import(snap, None, &a).await.unwrap();
    let audit = writer.audit(2).await.unwrap();
    assert_eq!(audit[0].action, "import");
    assert_eq!(audit[0].version, v);
    assert_eq!(audit[1].version, v - 1, "one version, one audit record");
    wait_version(&follower, v, 10, "the follower never saw the import").await;
    let opened = p.open().await;
    for (who, store) in [("follower", &*follower), ("opened after", &opened)] {
        let got = store.snapshot().await.unwrap();
        assert_eq!(got.version, v, "{who}");
        assert_eq!(got.users.len(), 3000, "{who}");
        assert_eq!(got.groups, [group("staff")], "{who}");
        assert_eq!(got.revoked, ["0a"], "{who}");
    }
    // The identities of the import are claimed; writes go on, on any store.
    let e = opened
        .put_user(user("eve", &["USER7@example.com"], &[]), true, None, &a)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    let next = follower
        .create_group(group("after"), None, &a)
        .await
        .unwrap();
    assert_eq!(next, v + 1);
    let loaded = p.backend().await.load().await.unwrap();
    assert_eq!(loaded.version, v + 1);
    let users = loaded.records.iter().filter(|r| r.0 == Kind::User).count();
    assert_eq!(users, 3000, "every record written out");
}

/// The backend's updates from a write sequence: a shared backend reports the commits of
/// other writers after it, in order, each with its sequence, version and writes; asked
/// from a sequence it is no longer at, it reports the gap with everything (a reset).
/// A backend one process writes reports nothing.
pub async fn updates_follow_from_a_sequence_and_report_a_gap(p: &dyn Place) {
    let a = Actor::system();
    let backend = p.backend().await;
    let writer = p.open().await;
    writer.create_group(group("first"), None, &a).await.unwrap();
    let from = backend.load().await.unwrap().seq;
    let mut rx = backend.updates(from).await.unwrap();
    if !backend.is_shared() {
        writer
            .create_group(group("second"), None, &a)
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(
            matches!(next, Ok(None) | Err(_)),
            "a backend one process writes reports nothing"
        );
        return;
    }
    let v2 = writer
        .create_group(group("second"), None, &a)
        .await
        .unwrap();
    let v3 = writer.revoke(&["0b".into()], None, &a).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s")
            .expect("the stream goes on")
            .unwrap();
        match u {
            Update::Commit { seq, version, ops } => seen.push((seq, version, ops)),
            Update::Reset(_) => panic!("a reset where the stream was current"),
        }
    }
    assert_eq!(seen[0].0, from + 1);
    assert_eq!(seen[1].0, from + 2);
    assert_eq!((seen[0].1, seen[1].1), (v2, v3));
    assert_eq!(seen[0].2, [put_op(Kind::Group, "second", &group("second"))]);
    assert_eq!(
        seen[1].2,
        [Op {
            kind: Kind::Revoked,
            key: "0b".into(),
            value: Some(vec![]),
        }]
    );
    // From a sequence the backend has moved past: everything, once.
    let mut rx = backend.updates(from).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(Ok(Update::Reset(loaded)))) => {
            assert_eq!(loaded.seq, from + 2);
            assert_eq!(loaded.version, v3);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// The change log: what each version changed (every kind of write, a cascade, an
/// import, a revocation), on the writer and on a store following it; tokens are not in
/// it; a version it does not reach back to, or one before a full read, is `None`.
pub async fn the_change_log_says_what_each_version_changed(p: &dyn Place) {
    let a = Actor::system();
    let shared = p.backend().await.is_shared();
    let writer = Arc::new(p.open().await);
    let follower = if shared {
        Arc::new(p.open().await)
    } else {
        writer.clone()
    };
    let v0 = writer.version().unwrap();
    writer.create_group(group("ops"), None, &a).await.unwrap();
    writer
        .put_service(svc("a.svc.internal", &["ops"]), true, None, &a)
        .await
        .unwrap();
    writer
        .put_user(user("alice", &["alice@x"], &["ops"]), true, None, &a)
        .await
        .unwrap();
    writer.create_token("not-config", &a).await.unwrap();
    writer.create_group(group("dev"), None, &a).await.unwrap();
    writer
        .put_service(svc("a.svc.internal", &["ops", "dev"]), false, None, &a)
        .await
        .unwrap();
    let cascade = writer.delete_group("ops", true, None, &a).await.unwrap();
    let revoked = writer.revoke(&["0c".into()], None, &a).await.unwrap();
    wait_version(&follower, revoked, 5, "the follower never caught up").await;
    for store in [&*writer, &*follower] {
        let (changes, at) = store.changes_since(v0);
        let changes = changes.expect("the log reaches back to the first version");
        assert_eq!(at, revoked);
        let versions: Vec<(u64, u64)> = changes
            .iter()
            .map(|c| (c.previous_version, c.version))
            .collect();
        assert_eq!(
            versions,
            (v0..revoked).map(|v| (v, v + 1)).collect::<Vec<_>>(),
            "one change per version, no gap, no token"
        );
        let keys = |c: &Change| -> Vec<(Kind, String, bool)> {
            c.ops
                .iter()
                .map(|o| (o.kind, o.key.clone(), o.value.is_some()))
                .collect()
        };
        let by_version = |v: u64| changes.iter().find(|c| c.version == v).unwrap();
        let mut cascaded = keys(by_version(cascade));
        cascaded.sort();
        assert_eq!(
            cascaded,
            [
                (Kind::Service, "a.svc.internal".to_owned(), true),
                (Kind::User, "alice".to_owned(), true),
                (Kind::Group, "ops".to_owned(), false),
            ]
        );
        assert_eq!(
            keys(by_version(revoked)),
            [(Kind::Revoked, "0c".to_owned(), true)]
        );
        // From the middle, and at the newest version.
        let (tail, _) = store.changes_since(cascade);
        assert_eq!(tail.unwrap().len(), 1);
        assert_eq!(store.changes_since(revoked).0, Some(vec![]));
        // A version that never was (or is older than the log) is not told.
        assert_eq!(store.changes_since(revoked + 5).0, None);
    }
    // After a full read nothing before the current version can be told.
    writer.state().unsure = true;
    writer.services(None, 1).await.unwrap();
    assert_eq!(writer.changes_since(v0).0, None);
    assert_eq!(writer.changes_since(revoked).0, Some(vec![]));
}

/// The configuration's digest, kept write by write, is the digest of the store's whole
/// snapshot after every kind of write (each kind created, replaced and deleted, a
/// cascade, revocations, a token, an import), on the writer and on a store following it;
/// an older version's, from the change log, is that version's snapshot's; a store read
/// whole starts at the digest of what it read.
pub async fn the_digest_follows_every_write(p: &dyn Place) {
    use ztp_proto::digest::Digest;
    let a = Actor::system();
    let shared = p.backend().await.is_shared();
    let writer = Arc::new(p.open().await);
    let follower = if shared {
        Arc::new(p.open().await)
    } else {
        writer.clone()
    };
    let mut seen: Vec<(u64, Digest, String)> = Vec::new();
    let step = |what: &'static str| {
        let (writer, follower) = (writer.clone(), follower.clone());
        async move {
            let snap = writer.snapshot().await.unwrap();
            let v = snap.version;
            let want = Digest::of(&snap);
            assert_eq!(writer.digest_at(v), Some(want), "writer after {what}");
            wait_version(&follower, v, 5, what).await;
            assert_eq!(follower.digest_at(v), Some(want), "follower after {what}");
            (v, want, what.to_owned())
        }
    };
    assert_eq!(
        writer.digest_at(0),
        Some(Digest::default()),
        "empty at version 0"
    );
    writer.create_group(group("ops"), None, &a).await.unwrap();
    writer.create_group(group("dev"), None, &a).await.unwrap();
    seen.push(step("group create").await);
    writer.replace_group(group("dev"), None, &a).await.unwrap();
    seen.push(step("group replaced by itself").await);
    writer
        .put_connector(connector("lab", "the lab"), true, None, &a)
        .await
        .unwrap();
    seen.push(step("connector create").await);
    writer
        .put_connector(connector("lab", "moved"), false, None, &a)
        .await
        .unwrap();
    seen.push(step("connector replace").await);
    writer
        .put_service(svc("a.svc.internal", &["ops"]), true, None, &a)
        .await
        .unwrap();
    writer
        .put_service(dark("db.svc.internal", "lab"), true, None, &a)
        .await
        .unwrap();
    seen.push(step("service create").await);
    writer
        .put_service(svc("A.svc.internal", &["ops", "dev"]), false, None, &a)
        .await
        .unwrap();
    seen.push(step("service replace").await);
    writer
        .put_user(user("alice", &["alice@x"], &["ops", "dev"]), true, None, &a)
        .await
        .unwrap();
    writer
        .put_user(user("bob", &["bob@x"], &[]), true, None, &a)
        .await
        .unwrap();
    seen.push(step("user create").await);
    let mut alice = user("alice", &["alice@y", "alice@x"], &["ops", "dev"]);
    alice.disabled = true;
    writer.put_user(alice, false, None, &a).await.unwrap();
    seen.push(step("user replace").await);
    let before_token = writer.version().unwrap();
    writer.create_token("not-config", &a).await.unwrap();
    assert_eq!(writer.version().unwrap(), before_token);
    seen.push(step("token (no version)").await);
    writer
        .revoke(&["0a".into(), "0x0B".into()], None, &a)
        .await
        .unwrap();
    seen.push(step("revoke").await);
    let d = seen.last().unwrap().1;
    writer.revoke(&["0A".into()], None, &a).await.unwrap();
    seen.push(step("revoke again").await);
    assert_eq!(
        seen.last().unwrap().1,
        d,
        "a serial revoked twice counts once"
    );
    writer.unrevoke("0a", None, &a).await.unwrap();
    seen.push(step("unrevoke").await);
    writer.delete_group("ops", true, None, &a).await.unwrap();
    seen.push(step("group cascade").await);
    writer
        .delete_service("db.svc.internal", None, &a)
        .await
        .unwrap();
    seen.push(step("service delete").await);
    writer.delete_connector("lab", None, &a).await.unwrap();
    seen.push(step("connector delete").await);
    writer.delete_user("bob", None, &a).await.unwrap();
    seen.push(step("user delete").await);
    writer
        .put_user(user("alice", &["alice@x"], &[]), false, None, &a)
        .await
        .unwrap();
    writer
        .put_service(svc("a.svc.internal", &[]), false, None, &a)
        .await
        .unwrap();
    writer.delete_group("dev", false, None, &a).await.unwrap();
    seen.push(step("group delete").await);
    let imported = Snapshot {
        version: 0,
        services: vec![svc("b.svc.internal", &["staff"])],
        users: vec![user("carol", &["carol@x"], &["staff"])],
        groups: vec![group("staff")],
        revoked: vec!["0c".into()],
        connectors: vec![connector("edge", "")],
    };
    writer.import(imported.clone(), None, &a).await.unwrap();
    seen.push(step("import").await);
    assert_eq!(
        seen.last().unwrap().1,
        Digest::of(&imported),
        "the digest is of the records alone"
    );
    // Every version still in the log: its own digest, on either store.
    let now = writer.version().unwrap();
    for (v, d, what) in &seen {
        assert_eq!(writer.digest_at(*v), Some(*d), "writer at {what}");
        assert_eq!(follower.digest_at(*v), Some(*d), "follower at {what}");
    }
    assert_eq!(writer.digest_at(now + 1), None, "a version not yet here");
    // Read whole: the digest of what was read; nothing older can be told.
    let opened = p.open().await;
    assert_eq!(opened.digest_at(now), Some(seen.last().unwrap().1));
    assert_eq!(opened.digest_at(seen[0].0), None);
    writer.state().unsure = true;
    assert_eq!(writer.digest_at(now), None, "not trusted until read again");
    writer.services(None, 1).await.unwrap();
    assert_eq!(writer.digest_at(now), Some(seen.last().unwrap().1));
}

/// Calls `$then!` with every case of the shared suite.
macro_rules! with_cases {
    ($then:ident) => {
        $then!(
            writes_bump_the_version_and_survive_reopen,
            integrity_is_enforced,
            group_delete_in_use_and_cascade,
            stale_writes_are_refused,
            import_replaces_everything_as_one_version,
            tokens_keep_only_hashes,
            revocations_are_versions_and_normalized,
            the_configuration_in_memory_follows_every_write,
            records_are_read_with_the_version_they_are_at,
            a_write_that_lost_a_race_is_decided_again,
            a_token_stored_before_roles_is_admin,
            the_last_admin_token_stays_whatever_other_tokens_remain,
            connectors_are_created_listed_replaced_and_deleted,
            a_service_holds_its_connector,
            import_replaces_the_connectors_and_their_references,
            connection_records_filter_order_and_retention,
            connection_retention_holds_in_every_view,
            the_first_token_is_stored_once,
            a_large_import_is_one_version_everywhere,
            updates_follow_from_a_sequence_and_report_a_gap,
            the_change_log_says_what_each_version_changed,
            the_digest_follows_every_write
        );
    };
}

/// One `#[tokio::test]` per case, on sled.
macro_rules! sled_tests {
    ($($case:ident),* $(,)?) => {
        mod on_sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::SledPlace::new()).await;
                }
            )*
        }
    };
}

with_cases!(sled_tests);

/// etcd: one test runs every case in turn on one real 3-member cluster on loopback,
/// each case under its own prefix (and its own stores: one instance, or several).
macro_rules! etcd_test {
    ($($case:ident),* $(,)?) => {
        mod on_etcd {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_shared_suite_on_a_three_member_etcd_cluster() {
                let Some(cluster) =
                    ztp_tests::etcd::EtcdCluster::start("store suite on etcd", 3).await
                else {
                    return;
                };
                $(
                    eprintln!("case {}", stringify!($case));
                    let place = super::EtcdPlace::new(cluster.endpoints(), stringify!($case));
                    super::$case(&place).await;
                )*
            }
        }
    };
}

with_cases!(etcd_test);

/// A prefix in an etcd cluster; every store opened is another instance on it.
pub struct EtcdPlace {
    endpoints: Vec<String>,
    prefix: String,
    backend: std::sync::Mutex<Option<Arc<dyn Backend>>>,
}

impl EtcdPlace {
    pub fn new(endpoints: Vec<String>, case: &str) -> Self {
        EtcdPlace {
            endpoints,
            prefix: format!("/ztp-test/{case}/"),
            backend: Default::default(),
        }
    }

    async fn connect(&self) -> Arc<dyn Backend> {
        let opts = super::etcd::EtcdOptions {
            client: crate::etcd::EtcdConfig::new(self.endpoints.clone()),
            prefix: self.prefix.clone(),
        };
        Arc::new(super::etcd::EtcdBackend::connect(opts).await.unwrap())
    }
}

impl Place for EtcdPlace {
    fn open(&self) -> BoxFuture<'_, Store> {
        Box::pin(async move { Store::connect(self.connect().await).await.unwrap() })
    }
    fn backend(&self) -> BoxFuture<'_, Arc<dyn Backend>> {
        Box::pin(async move {
            if let Some(b) = self.backend.lock().unwrap().clone() {
                return b;
            }
            let b = self.connect().await;
            self.backend.lock().unwrap().get_or_insert(b).clone()
        })
    }
    fn restart(&self) {}
    fn files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// A member frozen (SIGSTOP) under an instance: its watch goes silent and is dropped; the
/// other instance keeps writing and compacts etcd's history past where the first one's
/// watch was; the first resumes below the compaction, reads everything again and ends
/// up exactly where the writer is. Its own writes meanwhile succeed or say 503 (never
/// anything else), and go on once the client has moved off the frozen member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_and_a_watch_resumed_below_the_compaction() {
    let Some(cluster) = ztp_tests::etcd::EtcdCluster::start("frozen member, compaction", 3).await
    else {
        return;
    };
    let a = Actor::system();
    let eps = cluster.endpoints();
    let backend = |endpoints: Vec<String>| async move {
        let opts = super::etcd::EtcdOptions {
            client: crate::etcd::EtcdConfig::new(endpoints),
            prefix: "/ztp-frozen/".into(),
        };
        let b: Arc<dyn Backend> = Arc::new(super::etcd::EtcdBackend::connect(opts).await.unwrap());
        b
    };
    // The follower starts on member 0 (its watch is there); the writer never uses it.
    let follower = Store::connect(backend(eps.clone()).await).await.unwrap();
    let writer = Store::connect(backend(eps[1..].to_vec()).await)
        .await
        .unwrap();
    writer
        .create_group(group("before"), None, &a)
        .await
        .unwrap();
    wait_version(
        &follower,
        writer.version().unwrap(),
        5,
        "the follower does not follow",
    )
    .await;

    cluster.freeze(0);
    for i in 0..20 {
        // Member 0 may have been the leader: the writer waits out the election; a write
        // refused meanwhile as unavailable is made again (one that had landed is a 409).
        let name = format!("while-frozen-{i}");
        let mut tries = 0;
        loop {
            match writer.create_group(group(&name), None, &a).await {
                Ok(_) | Err(StoreError::Exists { .. }) => break,
                Err(StoreError::Unavailable(e)) if tries < 5 => {
                    tries += 1;
                    eprintln!("while member 0 is frozen: {e}; again");
                }
                Err(e) => panic!("a write while member 0 is frozen: {e}"),
            }
        }
    }
    let raw = crate::etcd::Etcd::connect(crate::etcd::EtcdConfig::new(eps[1..].to_vec()))
        .await
        .unwrap();
    let now = raw
        .range(crate::etcd::Range::key("/ztp-frozen/meta/seq"))
        .await
        .unwrap();
    raw.compact(now.revision).await.unwrap();
    // The follower's own writes: accepted, or refused as unavailable, nothing else.
    let mut accepted = 0;
    for i in 0..5 {
        match follower
            .create_group(group(&format!("by-follower-{i}")), None, &a)
            .await
        {
            Ok(_) => accepted += 1,
            Err(StoreError::Unavailable(_)) => {}
            Err(e) => panic!("a write on the frozen member's instance: {e}"),
        }
    }
    // Caught up (the watch resumed below the compaction: a full read).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (f, w) = (
            follower.snapshot().await.unwrap(),
            writer.snapshot().await.unwrap(),
        );
        if f == w && f.groups.len() >= 21 + accepted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower never caught up: {} vs {} groups, versions {} and {}",
            f.groups.len(),
            w.groups.len(),
            f.version,
            w.version
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.thaw(0);
    cluster.wait_healthy().await;
    // After the thaw both write, and both see everything.
    let v = follower
        .create_group(group("after-thaw"), None, &a)
        .await
        .unwrap();
    wait_version(&writer, v, 5, "the writer missed the follower's write").await;
    assert_eq!(
        follower.snapshot().await.unwrap(),
        writer.snapshot().await.unwrap()
    );
    eprintln!("writes on the frozen member's instance accepted: {accepted} of 5");
}
