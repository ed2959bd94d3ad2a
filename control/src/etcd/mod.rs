//! A small etcd v3 client for the etcd store backend: KV and transactions, watches,
//! leases, compaction and member status, over tonic and rustls.
//!
//! The wire types are generated at build time (protox, no system protoc) from the
//! subset of etcd's `etcdserverpb`/`mvccpb` API in `control/proto/etcd/`, with etcd's own
//! package, service and field numbers. Not the `etcd-client` crate: it needs protoc and
//! brings another tonic.
//!
//! # Endpoints and failover
//!
//! One lazily connected HTTP/2 channel per endpoint. A call starts on the endpoint that
//! last served one and, when an attempt fails in a way another member may cure, moves on
//! to the next, pausing briefly (25–200 ms) after each round over all of them, until
//! [`EtcdConfig::request_timeout`]. Each attempt is bounded by
//! [`EtcdConfig::attempt_timeout`], which etcd also sees as the request's deadline.
//! Every request carries etcd's "require a leader" mark, so a member without a leader
//! refuses at once ("etcdserver: no leader") instead of holding the request.
//!
//! - Moves on for any request: no connection (refused, TLS failure, connect timeout) and
//!   etcd's refusals before a proposal: "no leader", "leader changed", "not capable",
//!   "unhealthy cluster", "too many requests", "raft proposal dropped".
//! - Moves on only for requests safe to repeat (reads, put, delete, lease grant and
//!   revoke, compaction, unguarded or read-only transactions): a lost answer, a timeout,
//!   etcd's "request timed out…" and "server stopped". A guarded write transaction fails
//!   with [`EtcdError::Indeterminate`] instead (see [`Txn::resend_if_unknown`]).
//! - Anything else is etcd's answer and returned as it is.
//!
//! Watches and keep-alives are streams; a broken watch fails its next read (the caller
//! watches again from where it was), a keep-alive renews on whichever endpoint serves.
//!
//! # Limits
//!
//! etcd (3.4, defaults) refuses requests over [`MAX_REQUEST_BYTES`] and transactions
//! with more than [`MAX_TXN_OPS`] operations; the client does not split anything, the
//! caller decides. Answers up to 64 MiB are accepted (large ranges).

mod client;
mod config;
mod error;
mod kv;
mod lease;
mod watch;

/// The generated stubs of etcd's API, for what the typed client does not cover.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

pub use client::{Etcd, MemberStatus};
pub use config::EtcdConfig;
pub use error::EtcdError;
pub use kv::{
    prefix_end, Compare, CompareOp, Deleted, Kv, Op, OpResponse, Range, RangeResult, Txn, TxnResult,
};
pub use lease::KeepAlive;
pub use watch::{Event, EventKind, WatchBatch, WatchOptions, Watcher};

/// etcd's default cap on operations in one transaction branch (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// etcd's default cap on a request's size (`--max-request-bytes`, 1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;
