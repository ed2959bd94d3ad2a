//! The audit trail of connections: every data plane's connection records, kept in sled
//! with a bounded retention (oldest dropped first), newest-first queries with filters.
//! Records are not configuration: they bump no version and are flushed by sled's own
//! periodic flush, not one by one.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use ztp_proto::names::identity_key;

use super::{json, Store, StoreError, T};

/// Records kept by default.
pub const DEFAULT_CAP: u64 = 1_000_000;
/// Records a query looks at, at most (queries are bounded whatever the filters).
const MAX_SCAN: usize = 200_000;

/// One connection, as a data plane reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectionRecord {
    /// When it ended, ms since the Unix epoch.
    pub time_ms: u64,
    /// The data plane that served it.
    pub node: String,
    pub peer: String,
    pub sni: String,
    pub identity: String,
    /// `identity` is what a certificate refused in the handshake claims, not a
    /// verified identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity_unverified: bool,
    pub user: String,
    pub service: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Why, or how it ended.
    pub reason: String,
    /// The ZTP-ERROR code sent, 0 if none.
    pub code: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// `tcp` or `quic` (records from before the QUIC transport: `tcp`).
    #[serde(default = "tcp")]
    pub transport: String,
    /// The connector whose tunnel carried the session, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connector: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// Filters of a query; empty means any.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    pub identity: Option<String>,
    pub service: Option<String>,
    pub decision: Option<String>,
    /// Inclusive bounds, ms since the Unix epoch.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: usize,
}

fn key(time_ms: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&time_ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl Store {
    pub(super) fn init_conn_audit(&self) -> Result<(), StoreError> {
        let tree = self.tree(T::ConnAudit);
        let count = tree.len() as u64;
        let next = match tree.last()? {
            Some((k, _)) if k.len() == 16 => {
                u64::from_be_bytes(k[8..].try_into().unwrap_or([0; 8])) + 1
            }
            _ => 0,
        };
        *self.conn_audit.lock().unwrap_or_else(|p| p.into_inner()) = (count, next);
        Ok(())
    }

    /// Sets how many records are kept.
    pub fn set_conn_audit_cap(&self, cap: u64) {
        self.conn_audit_cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// Appends records, dropping the oldest beyond the retention, in one atomic batch: a
    /// query never sees more records than the retention.
    pub fn append_connections(&self, records: &[ConnectionRecord]) -> Result<(), StoreError> {
        let tree = self.tree(T::ConnAudit);
        let mut state = self.conn_audit.lock().unwrap_or_else(|p| p.into_inner());
        let mut new: Vec<([u8; 16], Vec<u8>)> = records
            .iter()
            .map(|r| {
                let k = key(r.time_ms, state.1);
                state.1 += 1;
                (k, json(r))
            })
            .collect();
        new.sort_by_key(|a| a.0);
        let total = state.0 + new.len() as u64;
        let excess = total.saturating_sub(self.conn_audit_cap.load(Ordering::Relaxed)) as usize;
        // The `excess` oldest keys, from the stored ones and the new ones (a data plane's
        // clock may be behind): stored ones are removed, new ones never written.
        let mut stored = tree.iter().keys();
        let mut next_stored = stored.next().transpose()?;
        let (mut old_gone, mut new_gone) = (Vec::new(), 0usize);
        while old_gone.len() + new_gone < excess {
            match (&next_stored, new.get(new_gone)) {
                (Some(o), Some((n, _))) if n.as_slice() < o.as_ref() => new_gone += 1,
                (Some(o), _) => {
                    old_gone.push(o.clone());
                    next_stored = stored.next().transpose()?;
                }
                (None, Some(_)) => new_gone += 1,
                (None, None) => break,
            }
        }
        let mut batch = sled::Batch::default();
        for (k, v) in new.into_iter().skip(new_gone) {
            batch.insert(&k, v);
        }
        for k in &old_gone {
            batch.remove(k);
        }
        tree.apply_batch(batch)?;
        state.0 = total - (old_gone.len() + new_gone) as u64;
        Ok(())
    }

    /// Records matching `q`, newest first.
    pub fn query_connections(&self, q: &AuditQuery) -> Result<Vec<ConnectionRecord>, StoreError> {
        let lo = key(q.since_ms.unwrap_or(0), 0);
        let hi = key(q.until_ms.unwrap_or(u64::MAX), u64::MAX);
        let mut out = Vec::new();
        for kv in self.tree(T::ConnAudit).range(lo..=hi).rev().take(MAX_SCAN) {
            let (k, v) = kv?;
            let r: ConnectionRecord = Self::decode(T::ConnAudit, &k, &v)?;
            // The data plane's rule: emails case-insensitively, URIs and CNs exactly.
            let keep = q
                .identity
                .as_deref()
                .is_none_or(|i| identity_key(&r.identity) == identity_key(i))
                && q.service
                    .as_deref()
                    .is_none_or(|s| r.service.eq_ignore_ascii_case(s))
                && q.decision.as_deref().is_none_or(|d| r.decision == d);
            if keep {
                out.push(r);
                if out.len() >= q.limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn filters_order_and_retention() {
        let dir = std::env::temp_dir().join(format!("ztp-conn-audit-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        store.set_conn_audit_cap(5);
        let recs = vec![
            rec(10, "a@x", "s1", "allow"),
            rec(20, "b@x", "s1", "deny"),
            rec(30, "a@x", "s2", "allow"),
        ];
        store.append_connections(&recs).unwrap();
        let all = |q: AuditQuery| {
            store
                .query_connections(&AuditQuery { limit: 100, ..q })
                .unwrap()
        };
        assert_eq!(
            all(AuditQuery::default())
                .iter()
                .map(|r| r.time_ms)
                .collect::<Vec<_>>(),
            [30, 20, 10]
        );
        assert_eq!(
            all(AuditQuery {
                identity: Some("A@X".into()),
                ..Default::default()
            })
            .len(),
            2
        );
        assert_eq!(
            all(AuditQuery {
                decision: Some("deny".into()),
                ..Default::default()
            })[0]
                .identity,
            "b@x"
        );
        assert_eq!(
            all(AuditQuery {
                service: Some("s2".into()),
                ..Default::default()
            })
            .len(),
            1
        );
        let window = all(AuditQuery {
            since_ms: Some(15),
            until_ms: Some(25),
            ..Default::default()
        });
        assert_eq!(window.len(), 1);
        assert_eq!(window[0].time_ms, 20);
        // Retention: 5 kept, the oldest dropped.
        store
            .append_connections(
                &(40..45)
                    .map(|t| rec(t, "c@x", "s3", "allow"))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let kept = all(AuditQuery::default());
        assert_eq!(kept.len(), 5);
        assert_eq!(kept.last().unwrap().time_ms, 40);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retention_holds_in_every_view() {
        let dir = std::env::temp_dir().join(format!("ztp-conn-audit-r-{}", std::process::id()));
        let store = std::sync::Arc::new(Store::open(&dir).unwrap());
        store.set_conn_audit_cap(3);
        let times = |store: &Store| -> Vec<u64> {
            store
                .query_connections(&AuditQuery {
                    limit: 100,
                    ..Default::default()
                })
                .unwrap()
                .iter()
                .map(|r| r.time_ms)
                .collect()
        };
        let recs = |ts: &[u64]| -> Vec<ConnectionRecord> {
            ts.iter().map(|t| rec(*t, "a@x", "s", "allow")).collect()
        };
        store.append_connections(&recs(&[50, 60])).unwrap();
        // A node whose clock is behind: its old record is the one dropped.
        store.append_connections(&recs(&[10, 70, 80])).unwrap();
        assert_eq!(times(&store), [80, 70, 60]);
        // More at once than are kept.
        store
            .append_connections(&recs(&[91, 92, 93, 94, 95, 96]))
            .unwrap();
        assert_eq!(times(&store), [96, 95, 94]);
        // A reader never sees more than the retention while records arrive.
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for t in 100..400 {
                    store.append_connections(&recs(&[t])).unwrap();
                }
            })
        };
        while !writer.is_finished() {
            let n = times(&store).len();
            assert!(n <= 3, "a query saw {n} records with a retention of 3");
        }
        writer.join().unwrap();
        assert_eq!(times(&store), [399, 398, 397]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
