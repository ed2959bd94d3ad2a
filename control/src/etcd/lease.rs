//! Keeping a lease alive, and noticing when it is not.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use super::client::{lease, require_leader, Etcd};
use super::pb::etcdserverpb as rpc;
use super::EtcdError;

/// The shortest pause between renewals, and between retries of a failed one.
const MIN_RENEW_EVERY: Duration = Duration::from_millis(250);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A lease kept alive by a background task, renewed every third of its TTL on whichever
/// endpoint serves. Dropping it stops the renewals (the lease then expires; revoke it
/// with [`Etcd::revoke`] to end it at once).
///
/// The lease counts as lost when etcd says it is gone or when it could not be renewed
/// before its TTL, measured from the last renewal's *sending*: the holder learns of the
/// loss no later than etcd expires the lease.
pub struct KeepAlive {
    id: i64,
    state: watch::Receiver<State>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
enum State {
    Alive {
        until: Instant,
    },
    /// etcd says the lease does not exist.
    Gone,
    /// No renewal succeeded before the lease's time ran out; the last error.
    Unrenewed(String),
}

impl Etcd {
    /// Renews lease `id` once (failing if it is gone or no endpoint serves), then keeps
    /// renewing it in the background.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive, EtcdError> {
        let sent = Instant::now();
        let ttl = self.renew(id).await?;
        if ttl <= 0 {
            return Err(EtcdError::LeaseNotFound);
        }
        let ttl = Duration::from_secs(ttl as u64);
        let (tx, rx) = watch::channel(State::Alive { until: sent + ttl });
        let task = tokio::spawn(renew_loop(self.clone(), id, sent, ttl, tx));
        Ok(KeepAlive {
            id,
            state: rx,
            task,
        })
    }

    /// One renewal on a short-lived keep-alive stream; returns the new TTL (<= 0: the
    /// lease is gone).
    async fn renew(&self, id: i64) -> Result<i64, EtcdError> {
        let (ttl, _) = self
            .with_failover(true, |channel, _| async move {
                let (tx, rx) = mpsc::channel(1);
                // The channel is empty and open.
                let _ = tx.try_send(rpc::LeaseKeepAliveRequest { id });
                let mut req = Request::new(ReceiverStream::new(rx));
                require_leader(&mut req);
                let mut stream = lease(channel).lease_keep_alive(req).await?.into_inner();
                let resp = stream.message().await?.ok_or_else(|| {
                    Status::unavailable("keep-alive stream closed without an answer")
                })?;
                drop(tx);
                Ok(resp.ttl)
            })
            .await?;
        Ok(ttl)
    }
}

async fn renew_loop(
    etcd: Etcd,
    id: i64,
    mut last_sent: Instant,
    mut ttl: Duration,
    state: watch::Sender<State>,
) {
    let mut until = last_sent + ttl;
    loop {
        tokio::time::sleep_until(last_sent + (ttl / 3).max(MIN_RENEW_EVERY)).await;
        let mut last_error = String::from("no renewal attempted");
        loop {
            let now = Instant::now();
            if now >= until {
                tracing::warn!(etcd.lease = id, error = %last_error, "etcd lease expired unrenewed");
                let _ = state.send(State::Unrenewed(last_error));
                return;
            }
            let sent = now;
            match tokio::time::timeout(until - now, etcd.renew(id)).await {
                Ok(Ok(new_ttl)) if new_ttl > 0 => {
                    last_sent = sent;
                    ttl = Duration::from_secs(new_ttl as u64);
                    until = sent + ttl;
                    let _ = state.send(State::Alive { until });
                    break;
                }
                Ok(Ok(_)) | Ok(Err(EtcdError::LeaseNotFound)) => {
                    tracing::warn!(etcd.lease = id, "etcd lease gone");
                    let _ = state.send(State::Gone);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(etcd.lease = id, error = %e, "etcd lease renewal failed");
                    last_error = e.to_string();
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(_) => last_error = "renewal still unanswered when the lease ran out".into(),
            }
        }
    }
}

impl KeepAlive {
    /// The lease's id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Whether the lease is still held.
    pub fn is_alive(&self) -> bool {
        self.valid_until().is_some()
    }

    /// Until when the lease is held for sure (its last renewal's sending plus its TTL);
    /// `None` once lost.
    pub fn valid_until(&self) -> Option<Instant> {
        match &*self.state.borrow() {
            State::Alive { until } if Instant::now() < *until => Some(*until),
            _ => None,
        }
    }

    /// Waits until the lease is lost; says why: [`EtcdError::LeaseNotFound`] (etcd says
    /// it is gone) or [`EtcdError::Unavailable`] (not renewed in time).
    pub async fn lost(&mut self) -> EtcdError {
        loop {
            match &*self.state.borrow_and_update() {
                State::Alive { .. } => {}
                State::Gone => return EtcdError::LeaseNotFound,
                State::Unrenewed(why) => {
                    return EtcdError::Unavailable(format!(
                        "lease {:x} not renewed before it expired: {why}",
                        self.id
                    ))
                }
            }
            if self.state.changed().await.is_err() {
                return EtcdError::Unavailable(format!(
                    "lease {:x}: the keep-alive task ended",
                    self.id
                ));
            }
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
