//! Numbered sled schema migrations of the ZTP control plane.
//!
//! Owns: the store's layout (tree names and key formats, [`layout`]), the ordered list of
//! schema upgrades, and the schema version recorded in the store. [`run`] applies, in
//! order, every migration newer than the store's version when `ztp-control` starts; a
//! store written by a newer schema is refused, never half-read. Does not own: typed
//! access to the records (the control plane's store module).
//!
//! Every migration is idempotent and the version is bumped (and flushed) only after its
//! writes are flushed: a crash mid-migration reruns it from the start. A migration reads
//! every record it needs before it writes anything, so a record it cannot read stops it
//! with the tree and key named, and the store as it was.
//!
//! Migrations never decode with today's model (`ztp_proto`) nor use [`layout`]: a
//! migration from schema N reads the frozen shapes of schema N (`vN` modules, written
//! once and never edited) and writes those of N + 1, so changing the model cannot change
//! what an old store is read as. Only the schema marker (`meta`/`schema_version`, a
//! big-endian u32) is shared by every version.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

mod record;
mod v1;
mod v2;
mod v3;
mod v4;

/// Tree names and key formats of the current schema ([`LATEST`]), for the store. Each
/// must equal its frozen copy in the latest `vN` module (tested).
pub mod layout {
    /// Schema and config versions, counters.
    pub const META: &str = "meta";
    /// Service name key (lowercase, `*.suffix` for wildcards) → JSON `Service`.
    pub const SERVICES: &str = "services";
    /// User name → JSON `User`.
    pub const USERS: &str = "users";
    /// Group name → JSON `Group`.
    pub const GROUPS: &str = "groups";
    /// Revoked serial (normalized hex) → empty.
    pub const REVOKED: &str = "revoked";
    /// Admin token id → JSON token record (hash only).
    pub const TOKENS: &str = "tokens";
    /// Big-endian sequence number → JSON admin audit record.
    pub const AUDIT: &str = "audit";
    /// Big-endian end time (ms) + sequence → JSON connection record from a data plane
    /// (bounded retention; since schema 2, created on first use).
    pub const CONN_AUDIT: &str = "conn_audit";
    /// Connector name → JSON `Connector` (since schema 3).
    pub const CONNECTORS: &str = "connectors";

    /// META keys.
    pub const SCHEMA_VERSION: &[u8] = b"schema_version";
    pub const CONFIG_VERSION: &[u8] = b"config_version";
    pub const AUDIT_SEQ: &[u8] = b"audit_seq";
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the store was written by a newer ZTP (schema {found}, this build knows up to {known}); upgrade ztp-control")]
    TooNew { found: u32, known: u32 },
    #[error("the store's schema version is unreadable ({0} bytes)")]
    BadVersion(usize),
    #[error("migration {version} ({name}) failed: record {key:?} in {tree}: {reason}")]
    BadRecord {
        version: u32,
        name: &'static str,
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
}

/// One schema upgrade.
pub struct Migration {
    /// The schema version the store has after this migration.
    pub version: u32,
    pub name: &'static str,
    pub up: fn(&sled::Db) -> Result<(), MigrationError>,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial layout",
        up: initial_layout,
    },
    Migration {
        version: 2,
        name: "identity and group reference indexes",
        up: reference_indexes,
    },
    Migration {
        version: 3,
        name: "connector registry",
        up: connector_registry,
    },
    Migration {
        version: 4,
        name: "reverse indexes dropped",
        up: reverse_indexes_dropped,
    },
];

/// The schema version this build writes.
pub const LATEST: u32 = 4;

/// The store's schema version; 0 for a new, empty store.
pub fn schema_version(db: &sled::Db) -> Result<u32, MigrationError> {
    match db.open_tree(layout::META)?.get(layout::SCHEMA_VERSION)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 4] = v
                .as_ref()
                .try_into()
                .map_err(|_| MigrationError::BadVersion(v.len()))?;
            Ok(u32::from_be_bytes(bytes))
        }
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub from: u32,
    pub to: u32,
}

/// Brings the store to [`LATEST`], or refuses a store of a newer schema.
pub fn run(db: &sled::Db) -> Result<Applied, MigrationError> {
    run_to(db, LATEST)
}

/// Applies the migrations up to and including `target`.
pub fn run_to(db: &sled::Db, target: u32) -> Result<Applied, MigrationError> {
    let from = schema_version(db)?;
    if from > LATEST {
        return Err(MigrationError::TooNew {
            found: from,
            known: LATEST,
        });
    }
    let meta = db.open_tree(layout::META)?;
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > from && m.version <= target)
    {
        (m.up)(db)?;
        db.flush()?;
        meta.insert(layout::SCHEMA_VERSION, &m.version.to_be_bytes())?;
        db.flush()?;
    }
    Ok(Applied {
        from,
        to: schema_version(db)?,
    })
}

/// Schema 1: the record trees and a config version of 0.
fn initial_layout(db: &sled::Db) -> Result<(), MigrationError> {
    for t in [
        v1::SERVICES,
        v1::USERS,
        v1::GROUPS,
        v1::REVOKED,
        v1::TOKENS,
        v1::AUDIT,
    ] {
        db.open_tree(t)?;
    }
    let meta = db.open_tree(v1::META)?;
    if meta.get(v1::CONFIG_VERSION)?.is_none() {
        meta.insert(v1::CONFIG_VERSION, &0u64.to_be_bytes())?;
    }
    Ok(())
}

/// Schema 2: reverse indexes that make integrity checks lookups instead of scans:
/// identity → user (an identity maps to at most one user) and group → referrers. The
/// records are read as schema 1 wrote them and left as they are.
fn reference_indexes(db: &sled::Db) -> Result<(), MigrationError> {
    const NAME: &str = "identity and group reference indexes";
    let bad = |tree: &'static str, key: &[u8], reason: String| MigrationError::BadRecord {
        version: 2,
        name: NAME,
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    // Every record is read and checked before anything is written: a bad one leaves the
    // store untouched. The indexes are held in memory meanwhile (tens of bytes a user).
    let mut identities: BTreeMap<String, String> = BTreeMap::new();
    let mut refs: BTreeSet<Vec<u8>> = BTreeSet::new();
    for kv in db.open_tree(v1::USERS)?.iter() {
        let (k, v) = kv?;
        let user = v1::user(&v).map_err(|reason| bad(v1::USERS, &k, reason))?;
        let mut seen = BTreeSet::new();
        for id in &user.identities {
            let key = v2::identity_key(id);
            if !seen.insert(key.clone()) {
                continue;
            }
            if let Some(other) = identities.insert(key, user.name.clone()) {
                return Err(bad(
                    v1::USERS,
                    &k,
                    format!("identity {id:?} is also claimed by {other}"),
                ));
            }
        }
        for g in &user.groups {
            refs.insert(v2::group_ref(g, v2::REF_USER, user.name.as_bytes()));
        }
    }
    for kv in db.open_tree(v1::SERVICES)?.iter() {
        let (k, v) = kv?;
        let svc = v1::service(&v).map_err(|reason| bad(v1::SERVICES, &k, reason))?;
        for g in &svc.groups {
            refs.insert(v2::group_ref(g, v2::REF_SERVICE, &k));
        }
    }

    // Idempotent: rebuilt from the records each time, so a rerun after a crash replaces
    // a partial build.
    let identities_tree = db.open_tree(v2::IDENTITIES)?;
    let refs_tree = db.open_tree(v2::GROUP_REFS)?;
    identities_tree.clear()?;
    refs_tree.clear()?;
    let mut batch = sled::Batch::default();
    for (id, user) in identities {
        batch.insert(id.as_bytes(), user.as_bytes());
    }
    identities_tree.apply_batch(batch)?;
    let mut batch = sled::Batch::default();
    for r in refs {
        batch.insert(r, &[]);
    }
    refs_tree.apply_batch(batch)?;
    Ok(())
}

/// Schema 3: the connector registry and its reverse index (connector → the services it
/// serves), both empty: no schema-2 service names a connector. The bump itself matters
/// as much as the trees: from now on a service record may carry `connector`, and a
/// ztp-control of schema 2 must refuse such a store ("written by a newer ZTP") rather
/// than read it without its connectors.
fn connector_registry(db: &sled::Db) -> Result<(), MigrationError> {
    db.open_tree(v3::CONNECTORS)?;
    // Idempotent: nothing else writes the index before the version moves to 3.
    db.open_tree(v3::CONNECTOR_REFS)?.clear()?;
    Ok(())
}

/// Schema 4: the reverse indexes of schemas 2 and 3 (`identities`, `group_refs`,
/// `connector_refs`) are removed; the records are left exactly as they are. The store now
/// checks its integrity rules (an identity maps to one user, a group in use cannot be
/// deleted, nor a connector a service names) on the configuration it keeps in memory, so
/// nothing maintains these trees any more. The bump itself matters as much as the drops:
/// a ztp-control of schema 3 must refuse a store written since ("written by a newer
/// ZTP") rather than trust indexes that no longer follow the records.
fn reverse_indexes_dropped(db: &sled::Db) -> Result<(), MigrationError> {
    // Idempotent: sled's `drop_tree` of a tree that is not there (never made, or dropped
    // before a crash that came before the version moved) does nothing and returns false.
    for t in [v2::IDENTITIES, v2::GROUP_REFS, v3::CONNECTOR_REFS] {
        db.drop_tree(t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
