//! Numbered sled schema migrations of the ZTP control plane.
//!
//! Owns: the ordered list of schema upgrades and the schema version recorded in the
//! store; run in order when `ztp-control` starts. Does not own: the store's typed access
//! (that is `ztp-control`'s store module).
//!
//! Nothing is migrated yet: the control plane's store arrives with issue 4, and with it the
//! first schema.
