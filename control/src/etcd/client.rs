//! The client: unary calls with endpoint failover, KV, compaction, leases, status.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::config::{self, EtcdConfig, Member};
use super::error::{self, describe, Fate};
use super::kv::{header_revision, Deleted, Range, RangeResult, Txn, TxnResult};
use super::pb::etcdserverpb as rpc;
use super::EtcdError;

use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::maintenance_client::MaintenanceClient;

/// Large ranges and watch batches: well above tonic's 4 MiB default.
pub(crate) const MAX_DECODE_BYTES: usize = 64 << 20;

/// Pauses between rounds over the endpoints while none serves (no leader yet,
/// connections refused): short, so that a call goes through soon after the cluster
/// accepts requests again.
const FIRST_PAUSE: Duration = Duration::from_millis(25);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// A client of one etcd cluster. Cheap to clone; clones share the channels.
///
/// Each endpoint has its own channel. A call starts on the endpoint that last served
/// one and moves to the next when an attempt fails in a way another member may cure;
/// see the [module docs](super) for which failures those are.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// The endpoint that last served a call.
    preferred: AtomicUsize,
    attempt_timeout: Duration,
    request_timeout: Duration,
}

/// One member's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The answering member.
    pub member_id: u64,
    /// The member it believes leads; 0: none.
    pub leader: u64,
    pub raft_term: u64,
    pub raft_index: u64,
    /// The store's revision as this member has applied it.
    pub revision: i64,
    /// etcd's version, e.g. "3.4.23".
    pub version: String,
    pub db_size: i64,
    pub is_learner: bool,
    /// Alarms and health problems the member reports.
    pub errors: Vec<String>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Checks the settings and loads the TLS material. Connections are made on first
    /// use, so a member that is down now does not fail this; a call that reaches no
    /// member fails with [`EtcdError::Unavailable`] (or [`EtcdError::Tls`]).
    pub async fn connect(cfg: EtcdConfig) -> Result<Etcd, EtcdError> {
        let members = config::members(&cfg)?;
        Ok(Etcd {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(0),
                attempt_timeout: cfg.attempt_timeout,
                request_timeout: cfg.request_timeout.max(cfg.attempt_timeout),
            }),
        })
    }

    /// The endpoints, as configured.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.members.iter().map(|m| m.url.clone()).collect()
    }

    /// The endpoint that served the last call.
    pub fn current_endpoint(&self) -> &str {
        &self.inner.members[self.preferred()].url
    }

    /// A key's value and the revision of its last change.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<(Vec<u8>, i64)>, EtcdError> {
        let result = self.range(Range::key(key.as_ref())).await?;
        Ok(result
            .kvs
            .into_iter()
            .next()
            .map(|kv| (kv.value, kv.mod_revision)))
    }

    /// Reads keys (linearizable).
    pub async fn range(&self, range: Range) -> Result<RangeResult, EtcdError> {
        let req = range.to_request();
        let resp = self
            .unary(true, req, |ch, r| async move { kv(ch).range(r).await })
            .await?;
        Ok(resp.into())
    }

    /// Reads every key that starts with `prefix`.
    pub async fn range_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<RangeResult, EtcdError> {
        self.range(Range::prefix(prefix.as_ref())).await
    }

    /// Writes a key; returns the store's revision after the write.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<i64, EtcdError> {
        self.put_with_lease(key, value, 0).await
    }

    /// Writes a key attached to a lease (0: none): the key goes when the lease does.
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<i64, EtcdError> {
        let req = rpc::PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
        };
        let resp = self
            .unary(true, req, |ch, r| async move { kv(ch).put(r).await })
            .await?;
        Ok(header_revision(resp.header.as_ref()))
    }

    /// Deletes one key.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<Deleted, EtcdError> {
        self.delete_range(key, Vec::new()).await
    }

    /// Deletes the keys in `[start, end)` (an empty `end`: `start` alone; `[0]`: every
    /// key from `start`).
    pub async fn delete_range(
        &self,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> Result<Deleted, EtcdError> {
        let req = rpc::DeleteRangeRequest {
            key: start.into(),
            range_end: end.into(),
        };
        let resp = self
            .unary(
                true,
                req,
                |ch, r| async move { kv(ch).delete_range(r).await },
            )
            .await?;
        Ok(Deleted {
            deleted: resp.deleted,
            revision: header_revision(resp.header.as_ref()),
        })
    }

    /// Runs a transaction. A guarded write whose attempt timed out or lost its
    /// connection fails with [`EtcdError::Indeterminate`] unless the transaction allows
    /// re-sending ([`Txn::resend_if_unknown`]).
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, EtcdError> {
        let req = txn.to_request();
        let resp = self
            .unary(
                txn.may_resend(),
                req,
                |ch, r| async move { kv(ch).txn(r).await },
            )
            .await?;
        Ok(resp.into())
    }

    /// Drops the history before `revision`. Compacting at or below an earlier compaction
    /// is not an error (a re-sent request finds its own effect).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let req = rpc::CompactionRequest { revision };
        match self
            .unary(true, req, |ch, r| async move { kv(ch).compact(r).await })
            .await
        {
            Ok(_) | Err(EtcdError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Grants a lease of `ttl_secs` seconds; returns its id. A grant whose answer was
    /// lost may leave a spare lease behind, which expires unused.
    pub async fn grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let req = rpc::LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let resp = self
            .unary(
                true,
                req,
                |ch, r| async move { lease(ch).lease_grant(r).await },
            )
            .await?;
        if !resp.error.is_empty() {
            return Err(EtcdError::Status(Status::unknown(resp.error)));
        }
        Ok(resp.id)
    }

    /// Revokes a lease: its keys are deleted. A lease already gone is not an error.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let req = rpc::LeaseRevokeRequest { id };
        match self
            .unary(
                true,
                req,
                |ch, r| async move { lease(ch).lease_revoke(r).await },
            )
            .await
        {
            Ok(_) | Err(EtcdError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One endpoint's status, asked of that endpoint alone (no failover).
    pub async fn status(&self, endpoint: &str) -> Result<MemberStatus, EtcdError> {
        let index = self
            .inner
            .members
            .iter()
            .position(|m| m.url == endpoint)
            .ok_or_else(|| {
                EtcdError::Config(format!("{endpoint:?} is not one of the etcd endpoints"))
            })?;
        let member = &self.inner.members[index];
        let timeout = self.inner.attempt_timeout;
        let req = request(rpc::StatusRequest {}, timeout);
        let mut client = MaintenanceClient::new(member.channel.clone());
        let resp = match tokio::time::timeout(timeout, client.status(req)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => {
                return Err(match error::fate(&status) {
                    Fate::Final => error::final_error(status),
                    _ => unreachable_error(&member.url, &status),
                })
            }
            Err(_) => {
                return Err(EtcdError::Unavailable(format!(
                    "{}: no answer within {timeout:?}",
                    member.url
                )))
            }
        };
        let header = resp.header.unwrap_or_default();
        Ok(MemberStatus {
            member_id: header.member_id,
            leader: resp.leader,
            raft_term: resp.raft_term,
            raft_index: resp.raft_index,
            revision: header.revision,
            version: resp.version,
            db_size: resp.db_size,
            is_learner: resp.is_learner,
            errors: resp.errors,
        })
    }

    fn preferred(&self) -> usize {
        self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len()
    }

    /// Runs `attempt` on the endpoints in turn, from the one that last served, until one
    /// answers or the call's time is up. An attempt that failed without being applied
    /// moves on; one whose outcome is unknown moves on only if `resend`; between rounds
    /// over every endpoint the call pauses briefly.
    pub(crate) async fn unary<Req, Resp, F, Fut>(
        &self,
        resend: bool,
        msg: Req,
        attempt: F,
    ) -> Result<Resp, EtcdError>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let (resp, _) = self
            .with_failover(resend, |channel, timeout| {
                attempt(channel, request(msg.clone(), timeout))
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The failover loop behind every call and stream creation: `attempt` gets an
    /// endpoint's channel and its time bound; the answer comes with the endpoint's URL.
    pub(crate) async fn with_failover<T, F, Fut>(
        &self,
        resend: bool,
        mut attempt: F,
    ) -> Result<(T, String), EtcdError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let inner = &*self.inner;
        let n = inner.members.len();
        let deadline = Instant::now() + inner.request_timeout;
        let mut last: Vec<Option<Failure>> = (0..n).map(|_| None).collect();
        let mut pause = FIRST_PAUSE;
        let start = self.preferred();
        let mut round = 0usize;
        loop {
            for k in 0..n {
                let i = (start + k) % n;
                let now = Instant::now();
                if now >= deadline {
                    return Err(exhausted(&inner.members, &last, inner.request_timeout));
                }
                let member = &inner.members[i];
                let timeout = inner.attempt_timeout.min(deadline - now);
                let failure =
                    match tokio::time::timeout(timeout, attempt(member.channel.clone(), timeout))
                        .await
                    {
                        Ok(Ok(value)) => {
                            inner.preferred.store(i, Ordering::Relaxed);
                            return Ok((value, member.url.clone()));
                        }
                        Ok(Err(status)) => match error::fate(&status) {
                            Fate::Final => return Err(error::final_error(status)),
                            Fate::NotApplied => Failure::from_status(&status),
                            Fate::Unknown if resend => Failure::from_status(&status),
                            Fate::Unknown => {
                                return Err(EtcdError::Indeterminate(format!(
                                    "{}: {}",
                                    member.url,
                                    describe(&status)
                                )))
                            }
                        },
                        Err(_) if resend => Failure::Other(format!("no answer within {timeout:?}")),
                        Err(_) => {
                            return Err(EtcdError::Indeterminate(format!(
                                "{}: no answer within {timeout:?}",
                                member.url
                            )))
                        }
                    };
                tracing::debug!(etcd.endpoint = %member.url, error = %failure.text(), "etcd attempt failed");
                last[i] = Some(failure);
            }
            round += 1;
            let now = Instant::now();
            // Every member refusing the handshake is a configuration problem, not an
            // outage: waiting will not cure it.
            if now >= deadline || last.iter().all(|f| matches!(f, Some(Failure::Tls(_)))) {
                return Err(exhausted(&inner.members, &last, inner.request_timeout));
            }
            tracing::debug!(round, "no etcd endpoint served; pausing");
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Why an attempt failed, for the final error.
enum Failure {
    Tls(String),
    Other(String),
}

impl Failure {
    fn from_status(status: &Status) -> Self {
        match error::tls_error(status) {
            Some(tls) => Failure::Tls(tls),
            None => Failure::Other(describe(status)),
        }
    }

    fn text(&self) -> &str {
        match self {
            Failure::Tls(t) | Failure::Other(t) => t,
        }
    }
}

/// The error of a call no endpoint served: TLS if every endpoint failed its handshake
/// (a configuration problem, not an outage), else unavailable.
fn exhausted(members: &[Member], last: &[Option<Failure>], bound: Duration) -> EtcdError {
    let text = members
        .iter()
        .zip(last)
        .filter_map(|(m, f)| f.as_ref().map(|f| format!("{}: {}", m.url, f.text())))
        .collect::<Vec<_>>()
        .join("; ");
    if !last.is_empty() && last.iter().all(|f| matches!(f, Some(Failure::Tls(_)))) {
        EtcdError::Tls(text)
    } else if text.is_empty() {
        EtcdError::Unavailable(format!("no endpoint answered within {bound:?}"))
    } else {
        EtcdError::Unavailable(format!("no endpoint answered within {bound:?} ({text})"))
    }
}

/// The error of one endpoint's failure outside the failover loop.
pub(crate) fn unreachable_error(url: &str, status: &Status) -> EtcdError {
    match error::tls_error(status) {
        Some(tls) => EtcdError::Tls(format!("{url}: {tls}")),
        None => EtcdError::Unavailable(format!("{url}: {}", describe(status))),
    }
}

/// A request with etcd's "require a leader" mark (a member cut off from the leader
/// refuses it at once with "no leader" instead of holding it) and a deadline etcd also
/// sees.
pub(crate) fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    require_leader(&mut req);
    req.set_timeout(timeout);
    req
}

/// etcd's `WithRequireLeader`: metadata `hasleader: true`. On a stream, etcd also
/// closes it with "no leader" when the member loses its leader.
pub(crate) fn require_leader<T>(req: &mut Request<T>) {
    req.metadata_mut()
        .insert("hasleader", MetadataValue::from_static("true"));
}

pub(crate) fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_DECODE_BYTES)
}

pub(crate) fn lease(channel: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(channel).max_decoding_message_size(MAX_DECODE_BYTES)
}
