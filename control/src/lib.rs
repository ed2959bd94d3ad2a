//! The ZTP control plane: the system of record.
//!
//! Owns: the sled store (services, users, groups, nodes, tokens), the REST admin API, the
//! gRPC `ConfigService` that streams snapshots to data-plane nodes, and the node registry.
//! Does not own: the domain model and its validation (`ztp-proto`), schema upgrades
//! (`ztp-migrations`).
//!
//! Not built yet (issue 4 and 5); until then a data plane runs from a snapshot file.
