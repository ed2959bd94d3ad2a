//! The ZTP control plane: the system of record.
//!
//! Owns: the sled store ([`store`], the only module that touches sled), the REST admin
//! API ([`api`]), the gRPC `ConfigService` that streams snapshots to data-plane nodes
//! ([`grpc`]) and the node registry. Does not own: the domain model and its validation
//! (`ztp-proto`), schema upgrades (`ztp-migrations`).
//!
//! What it acknowledges is on disk; what it refuses says why, naming the field.

#![forbid(unsafe_code)]

pub mod api;
pub mod etcd;
pub mod grpc;
pub mod nodes;
pub mod server;
pub mod store;
