//! HyperBox: a lazy-loading remote snapshotter for containerd.
//!
//! The layering. A module imports only modules on the rows below its own
//! (never one on its own row); the library never imports a client; nothing
//! imports the daemon. Test code (a `tests.rs` file, or what follows
//! `#[cfg(test)]`) may also use `testing`, whatever its row. `tests/layering.rs` reads this map and fails on any
//! `crate::` path in the code that goes against it, so the map stays true.
//!
//! ```text layering
//! daemon                          : the node: owns the parts; Snapshots and admin gRPC, /metrics
//! snapshotter config              : containerd semantics, remote layers | the config file
//! mount prefetch                  : a layer tree served through FUSE, fetched ahead of its reads | predict and warm chunks
//! trace                           : record first reads; traces in the store and the registry
//! fetcher testing                 : the read path: store, else registry, verified | test layers
//! layer registry store fs         : a remote layer | OCI distribution | RocksDB | layer trees
//! oci format                      : OCI vocabulary | the layer format and frame codec
//! digest labels metrics admin     : leaves: digests | containerd labels | metric names | admin API types
//! ---
//! inspect                         : `hyperbox inspect`
//! convert pull doctor             : image conversion | `hyperbox pull` | node checks
//! ```
//!
//! Only `store` names RocksDB, only `registry` names the HTTP client, and
//! only the fuse/ crate names the FUSE library (`mount` serves through it).
//! The fetcher is the read path: it asks the store first and fills it from
//! the registry, so the store stays a plain database (nydus' cache over its
//! backend). `testing` builds layers in memory for the tests and benches.
//! The binaries (`src/bin`) use the daemon and the clients. See
//! docs/architecture.md.

pub mod admin;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod digest;
pub mod doctor;
pub mod fetcher;
pub mod format;
pub mod fs;
pub mod inspect;
pub mod labels;
pub mod layer;
pub mod metrics;
pub mod mount;
pub mod oci;
pub mod prefetch;
pub mod pull;
pub mod registry;
pub mod snapshotter;
pub mod store;
pub mod testing;
pub mod trace;
