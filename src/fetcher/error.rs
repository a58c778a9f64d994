//! The fetcher's errors. They keep the typed errors they come from as their
//! [`source`](std::error::Error::source), and their messages name what a
//! user needs to act: the registry and repository, the layer's blob, the
//! chunk and its bytes, the tries made, the last problem.
//!
//! One failed fetch answers every reader waiting for it, so errors are
//! `Clone`, and the typed errors inside are shared (`Arc`): the chain holds
//! an `Arc<RegistryError>` (or `Arc<StoreError>`, `Arc<FormatError>`), which
//! displays and chains as the error it holds.

use std::sync::Arc;

use crate::digest::ChunkId;
use crate::format::FormatError;
use crate::registry::{RegistryError, Repo};
use crate::store::StoreError;

#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// Chunks could not be fetched: the retry policy gave up.
    #[error("fetching chunk {chunk} of {layer} (blob bytes {offset}+{len}) failed after {attempts} tries in {elapsed_ms} ms: {cause}")]
    Remote {
        layer: String,
        chunk: ChunkId,
        offset: u64,
        len: u64,
        attempts: u32,
        elapsed_ms: u64,
        /// Why the last try failed.
        #[source]
        cause: TryError,
    },
    #[error("{layer}: frame {frame} does not exist (the index has {frames})")]
    NoSuchFrame { layer: String, frame: usize, frames: usize },
    /// The local store failed (not a missing chunk: that is fetched).
    #[error("{0}")]
    Store(#[source] Arc<StoreError>),
    /// A layer's index could not be fetched: the retry policy gave up.
    #[error("{layer}: cannot get the layer index: {cause}")]
    Index {
        layer: String,
        /// Why the last try failed.
        #[source]
        cause: TryError,
    },
    /// Where the annotations say a layer's index is cannot be right.
    #[error("{layer}: cannot get the layer index: {error}")]
    IndexLocation {
        layer: String,
        #[source]
        error: Arc<FormatError>,
    },
    #[error("{layer}: chunk {chunk}: the fetch it waited for ended without an answer")]
    Lost { layer: String, chunk: ChunkId },
    /// A demand read was not answered within `fetch.timeout_ms` of being
    /// requested (time queued for a request slot, or waiting for another
    /// reader's fetch, included).
    #[error("{layer}: a read of {frames} frames got no answer within fetch.timeout_ms ({ms} ms) of its request")]
    Waited { layer: String, frames: usize, ms: u64 },
    /// The index gives a chunk id two lengths: the verified data of the
    /// chunk does not have the length this frame of the index says.
    #[error("{layer}: frame {frame} (chunk {chunk}) is {want} bytes in the index, but its chunk's verified data is {got} bytes: the index lists this chunk with different lengths")]
    FrameLength { layer: String, frame: usize, chunk: ChunkId, want: u32, got: usize },
    /// Work handed to a thread of its own panicked (a bug, not the data).
    #[error("{what} panicked: {problem}")]
    Panicked { what: &'static str, problem: String },
    /// Work handed to a thread of its own was cancelled: the runtime is
    /// shutting down.
    #[error("{what} was cancelled: hyperboxd is stopping")]
    Cancelled { what: &'static str },
}

impl FetchError {
    /// The error of a task that did not finish: cancelled or panicked.
    pub(crate) fn joined(what: &'static str, e: tokio::task::JoinError) -> Self {
        match e.is_cancelled() {
            true => FetchError::Cancelled { what },
            false => FetchError::Panicked { what, problem: e.to_string() },
        }
    }
}

impl From<StoreError> for FetchError {
    fn from(e: StoreError) -> Self {
        FetchError::Store(Arc::new(e))
    }
}

/// Why one try at a registry read failed (the last one, when a fetch gives
/// up).
#[derive(Clone, Debug, thiserror::Error)]
pub enum TryError {
    /// The source answered with an error, or not at all. The message names
    /// the source, the repository and what was asked for.
    #[error("{0}")]
    Registry(#[source] Arc<RegistryError>),
    /// A range came from `from`, but frame `frame` of it failed
    /// verification.
    #[error("{from}: frame {frame}: {error}")]
    Chunk {
        from: Repo,
        frame: usize,
        #[source]
        error: Arc<StoreError>,
    },
    /// An index came from `from`, but failed verification (or could not be
    /// kept in the store).
    #[error("{from}: {error}")]
    Index {
        from: Repo,
        #[source]
        error: Arc<StoreError>,
    },
    /// `fetch.timeout_ms` ran out while a try at `from` was waiting for its
    /// answer; `before` is how the try before it failed, if one did.
    #[error("{}{from}: still no answer when fetch.timeout_ms ({ms} ms) ran out", .before.as_ref().map(|b| format!("{b}; then ")).unwrap_or_default())]
    TimedOut { from: Repo, ms: u64, before: Option<Box<TryError>> },
    /// A demand read's `fetch.timeout_ms` ran out while it waited for a
    /// request slot for `at` (its registry's requests are all busy).
    #[error("{}{at}: still waiting for a request slot when fetch.timeout_ms ({ms} ms) ran out (the registry's requests are all busy)", .before.as_ref().map(|b| format!("{b}; then ")).unwrap_or_default())]
    Queued { at: Repo, ms: u64, before: Option<Box<TryError>> },
    /// The read gave up before any try (no time or no source left).
    #[error("{at}: no try was made")]
    NotTried { at: Repo },
}

impl From<RegistryError> for TryError {
    fn from(e: RegistryError) -> Self {
        TryError::Registry(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::format;

    fn repo(registry: &str) -> Repo {
        Repo { registry: registry.into(), name: "team/app".into() }
    }

    #[test]
    fn a_registry_error_stays_typed_in_the_chain_and_in_the_message() {
        let status = RegistryError::Status {
            repo: "mirror.example/team/app".into(),
            what: "blob sha256:ab bytes 0+10".into(),
            status: 503,
            body: String::new(),
        };
        let e = FetchError::Remote {
            layer: "layer sha256:ab of registry.example/team/app".into(),
            chunk: ChunkId::of(b"chunk"),
            offset: 0,
            len: 10,
            attempts: 4,
            elapsed_ms: 1_234,
            cause: status.into(),
        };
        let msg = e.to_string();
        for needle in
            ["registry.example/team/app", "sha256:ab", "after 4 tries in 1234 ms", "mirror.example", "HTTP 503"]
        {
            assert!(msg.contains(needle), "{msg:?} does not name {needle:?}");
        }
        // FetchError -> TryError -> RegistryError, each reachable by source().
        let cause = e.source().expect("the try's error is the source");
        assert!(cause.downcast_ref::<TryError>().is_some(), "{cause:?}");
        let registry = cause.source().expect("the registry's error is the try's source");
        match registry.downcast_ref::<Arc<RegistryError>>().map(|e| &**e) {
            Some(RegistryError::Status { status: 503, .. }) => {}
            other => panic!("not the registry's 503: {other:?} ({registry:?})"),
        }
    }

    #[test]
    fn a_timeout_names_its_source_and_what_failed_before_it() {
        let before = TryError::Chunk {
            from: repo("mirror.example"),
            frame: 7,
            error: Arc::new(StoreError::Verify {
                id: ChunkId::of(b"x"),
                problem: format::FrameError::Hash { actual: ChunkId::of(b"y") },
            }),
        };
        let e = TryError::TimedOut { from: repo("registry.example"), ms: 60_000, before: Some(Box::new(before)) };
        assert_eq!(
            e.to_string(),
            format!(
                "mirror.example/team/app: frame 7: chunk {} failed verification: content hashes to {}; then \
                 registry.example/team/app: still no answer when fetch.timeout_ms (60000 ms) ran out",
                ChunkId::of(b"x"),
                ChunkId::of(b"y")
            )
        );
        let index = FetchError::Index {
            layer: "registry.example/team/app@sha256:ab".into(),
            cause: TryError::TimedOut { from: repo("registry.example"), ms: 500, before: None },
        };
        assert_eq!(
            index.to_string(),
            "registry.example/team/app@sha256:ab: cannot get the layer index: \
             registry.example/team/app: still no answer when fetch.timeout_ms (500 ms) ran out"
        );
        // The store's error behind a bad chunk is the try's source.
        let chunk = TryError::Chunk {
            from: repo("r"),
            frame: 0,
            error: Arc::new(StoreError::Verify {
                id: ChunkId::of(b"x"),
                problem: format::FrameError::Length { got: 1, want: 2 },
            }),
        };
        let src = chunk.source().and_then(|s| s.downcast_ref::<Arc<StoreError>>()).map(|e| &**e);
        assert!(matches!(src, Some(StoreError::Verify { .. })), "{src:?}");
    }
}
