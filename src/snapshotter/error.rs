//! The snapshotter's errors, by what containerd should hear of them; the
//! daemon maps each kind to its gRPC status in one place
//! (`crate::daemon::status`).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("snapshot metadata: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("snapshot metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub(super) type Result<T, E = SnapshotError> = std::result::Result<T, E>;

pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}
