//! HyperBox: a lazy-loading remote snapshotter for containerd.
//!
//! Modules, and the one direction data and imports flow in (a module uses
//! only those on its left, plus the leaves):
//!
//! ```text
//! registry, store ─▶ fetcher ─▶ mount ◀─ fs ;  mount ─▶ snapshotter ─▶ (containerd)
//! side paths: mount ─▶ trace ─▶ {store, fetcher} ; prefetch ─▶ {trace, fetcher} ; snapshotter ─▶ prefetch
//! leaves:     digest, format, config
//! fs knows nothing of FUSE; `mount` serves an fs tree through the fuse/ crate
//! convert ─▶ {format, digest, registry}   (the `hyperbox convert` side)
//! ```
//!
//! Only `registry` names the HTTP client, only `store` names RocksDB, and
//! only `format` knows zstd's frame layout. The fetcher is the read path:
//! it asks the store first and fills it from the registry, so the store
//! stays a plain database (nydus' cache over its backend). See
//! docs/architecture.md.

pub mod admin;
pub mod config;
pub mod convert;
pub mod digest;
pub mod doctor;
pub mod fetcher;
pub mod format;
pub mod fs;
pub mod inspect;
pub mod metrics;
pub mod mount;
pub mod prefetch;
pub mod pull;
pub mod registry;
pub mod snapshotter;
pub mod store;
pub mod trace;
