//! What can go wrong talking to etcd, and which failures another endpoint may cure.

use std::error::Error as _;

use tonic::{Code, Status};

use super::MAX_TXN_OPS;

/// Why an etcd call failed.
///
/// The variants are the causes a store backend maps to its own errors; anything else
/// etcd refuses arrives as [`EtcdError::Status`].
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A setting is unusable: an endpoint URL, a TLS file without its pair, an unknown
    /// endpoint.
    #[error("{0}")]
    Config(String),
    /// TLS material cannot be loaded, or every endpoint failed its TLS handshake (a
    /// refused client certificate, an untrusted server certificate).
    #[error("etcd TLS: {0}")]
    Tls(String),
    /// No endpoint served the call within its time bound (connections refused, no
    /// leader, timeouts), or a stream (watch, keep-alive) broke. The text names the
    /// endpoints and their last errors.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// A conditional write was sent but its answer was lost (timeout, connection reset):
    /// it may or may not have been applied. It is not re-sent on another endpoint (the
    /// re-sent compare would fail against the write's own effect); read to find out.
    /// See [`Txn::resend_if_unknown`](super::Txn::resend_if_unknown).
    #[error("etcd: outcome unknown: {0}")]
    Indeterminate(String),
    /// The revision asked for is compacted. For a watch, `compact_revision` is the oldest
    /// revision still available: resume at or below it means a full resync (DESIGN stack
    /// notes, etcd#18089). 0 when etcd did not say (a range at an old revision).
    #[error("etcd: required revision has been compacted (oldest available: {compact_revision})")]
    Compacted { compact_revision: i64 },
    /// The revision asked for is newer than the store's.
    #[error("etcd: required revision is a future revision")]
    FutureRevision,
    /// The lease does not exist (expired or revoked).
    #[error("etcd: lease not found")]
    LeaseNotFound,
    /// The request is larger than etcd accepts (1.5 MiB by default).
    #[error("etcd: request is too large")]
    TooLarge,
    /// The transaction has more operations than etcd accepts (128 by default).
    #[error("etcd: too many operations in one transaction (at most {MAX_TXN_OPS} by default)")]
    TooManyOps,
    /// etcd canceled a watch for another reason than compaction.
    #[error("etcd: watch canceled: {0}")]
    WatchCanceled(String),
    /// Any other refusal, with etcd's gRPC status.
    #[error("etcd: {}", .0.message())]
    Status(Status),
}

/// What a failed attempt says about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// It was certainly not applied (no connection, refused before its proposal): any
    /// request may go to another endpoint.
    NotApplied,
    /// It may have been applied (timeout, connection lost after sending, etcd's own
    /// "request timed out"): only requests safe to repeat go elsewhere.
    Unknown,
    /// etcd's answer: final.
    Final,
}

/// etcd's messages (codes.Unavailable and neighbours, etcd 3.4 `rpctypes`) for requests
/// refused before any proposal, so certainly not applied.
const NOT_APPLIED: &[&str] = &[
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: leader changed",
    "etcdserver: unhealthy cluster",
    "etcdserver: too many requests",
    "etcdserver: rpc not supported for learner",
    // raft drops a proposal made while the member knows no leader (codes.Unknown).
    "raft proposal dropped",
];

/// Sorts a failed attempt.
pub(crate) fn fate(status: &Status) -> Fate {
    if tls_error(status).is_some() || chain_has::<tonic::ConnectError>(status) {
        return Fate::NotApplied;
    }
    let message = status.message();
    if NOT_APPLIED.iter().any(|m| message.starts_with(m)) {
        return Fate::NotApplied;
    }
    // A status with a source was made by tonic from a local error (transport, h2):
    // the request may have left.
    if status.source().is_some() {
        return Fate::Unknown;
    }
    // The request's deadline ran out inside etcd (passed through with another code, as
    // grpc-go does for a handler that returns its context's error).
    if message.contains("context deadline exceeded") || message.contains("context canceled") {
        return Fate::Unknown;
    }
    match status.code() {
        // etcd's "request timed out…", "server stopped"; a stream reset.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Fate::Unknown,
        _ => Fate::Final,
    }
}

/// etcd's final answer as the error a caller can act on.
pub(crate) fn final_error(status: Status) -> EtcdError {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("compacted") => EtcdError::Compacted {
            compact_revision: 0,
        },
        Code::OutOfRange if message.contains("future revision") => EtcdError::FutureRevision,
        Code::NotFound if message.contains("lease not found") => EtcdError::LeaseNotFound,
        Code::InvalidArgument if message.contains("request is too large") => EtcdError::TooLarge,
        // gRPC's own cap (etcd's limit plus 512 KiB of overhead).
        Code::ResourceExhausted if message.contains("larger than max") => EtcdError::TooLarge,
        Code::InvalidArgument if message.contains("too many operations") => EtcdError::TooManyOps,
        _ => EtcdError::Status(status),
    }
}

/// The TLS failure somewhere under a status, as text: a rustls error (a handshake that
/// failed here), or the alert with which the member ended the connection after the
/// handshake (TLS 1.3 servers refuse a client certificate that way; h2 passes that on
/// as a plain `io::Error` with rustls's text only).
pub(crate) fn tls_error(status: &Status) -> Option<String> {
    let mut source = status.source();
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // io::Error's `source()` skips the error it wraps.
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Some(tls.to_string());
            }
            let text = io.to_string();
            if io.kind() == std::io::ErrorKind::InvalidData
                && text.starts_with("received fatal alert")
            {
                return Some(format!(
                    "{text} (the member ended the connection after the handshake: does it \
                     require a client certificate (--etcd-cert, --etcd-key) from a CA it \
                     trusts?)"
                ));
            }
        }
        source = err.source();
    }
    None
}

fn chain_has<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<E>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A status in one line with its causes (tonic's own message for a transport failure is
/// only "transport error" or "tcp connect error").
pub(crate) fn describe(status: &Status) -> String {
    let mut text = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    let mut source = status.source();
    while let Some(err) = source {
        let part = err.to_string();
        // tonic's transport error says only "transport error"; its source says what.
        if !err.is::<tonic::transport::Error>() && !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_refusals_before_proposal_are_not_applied() {
        for m in [
            "etcdserver: no leader",
            "etcdserver: leader changed",
            "etcdserver: too many requests",
        ] {
            assert_eq!(fate(&Status::unavailable(m)), Fate::NotApplied, "{m}");
        }
        assert_eq!(
            fate(&Status::unknown("raft proposal dropped")),
            Fate::NotApplied
        );
    }

    #[test]
    fn timeouts_leave_the_outcome_unknown() {
        for m in [
            "etcdserver: request timed out",
            "etcdserver: request timed out, possibly due to previous leader failure",
            "etcdserver: server stopped",
        ] {
            assert_eq!(fate(&Status::unavailable(m)), Fate::Unknown, "{m}");
        }
        assert_eq!(
            fate(&Status::deadline_exceeded("context deadline exceeded")),
            Fate::Unknown
        );
        // As etcd 3.4 answered a write whose deadline ran out during an election.
        assert_eq!(
            fate(&Status::unknown("context deadline exceeded")),
            Fate::Unknown
        );
    }

    #[test]
    fn etcd_refusals_map_to_their_causes() {
        let compacted =
            Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        assert_eq!(fate(&compacted), Fate::Final);
        assert!(matches!(
            final_error(compacted),
            EtcdError::Compacted {
                compact_revision: 0
            }
        ));
        assert!(matches!(
            final_error(Status::not_found("etcdserver: requested lease not found")),
            EtcdError::LeaseNotFound
        ));
        assert!(matches!(
            final_error(Status::invalid_argument(
                "etcdserver: too many operations in txn request"
            )),
            EtcdError::TooManyOps
        ));
        assert!(matches!(
            final_error(Status::invalid_argument("etcdserver: request is too large")),
            EtcdError::TooLarge
        ));
        assert!(matches!(
            final_error(Status::invalid_argument("etcdserver: key is not provided")),
            EtcdError::Status(_)
        ));
    }
}
