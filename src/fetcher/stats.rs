//! The fetcher's counters: atomics bumped on the read path, read as a
//! [`FetchStats`] for the admin API and `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::metrics::Histogram;

/// Counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FetchStats {
    /// Range requests sent (tries included), by priority.
    pub demand_requests: u64,
    pub prefetch_requests: u64,
    /// Compressed bytes received in good responses.
    pub bytes: u64,
    /// Chunks fetched, verified and handed to the store.
    pub chunks: u64,
    /// Tries of a source again, after a failed try on it and a backoff
    /// (moving on to the next source is not counted).
    pub retries: u64,
    /// Failed tries (transport, status, protocol, verification).
    pub errors: u64,
    /// Responses holding a frame that failed verification.
    pub verify_failures: u64,
    /// Reads of a chunk that waited for a fetch already in flight.
    pub joined: u64,
    /// Frames answered locally: from the store, the frame cache, or kept
    /// by a traced prefetch for the read.
    pub store_hits: u64,
    /// Of those, frames answered from the frame cache.
    pub cache_hits: u64,
    /// And frames answered with what a traced prefetch kept for the read.
    pub ready_hits: u64,
    /// Fetches that gave up.
    pub failures: u64,
}

impl FetchStats {
    pub fn requests(&self) -> u64 {
        self.demand_requests + self.prefetch_requests
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) demand_requests: AtomicU64,
    pub(super) prefetch_requests: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) chunks: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) verify_failures: AtomicU64,
    pub(super) joined: AtomicU64,
    pub(super) store_hits: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) ready_hits: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) demand_latency: Histogram,
    pub(super) prefetch_latency: Histogram,
    /// Time reads spent waiting on fetches, in nanoseconds.
    pub(super) wait_ns: AtomicU64,
    /// Demand reads waiting on the registry now.
    pub(super) demand_waiting: std::sync::atomic::AtomicUsize,
    /// Background tasks running ([`super::Fetcher::background`]).
    pub(super) background: std::sync::atomic::AtomicUsize,
    /// Bytes fetches hold now: each response received, from its arrival
    /// until its chunks are stored (then the chunks' compressed copies)
    /// ([`Held`]). Decompressed frames are the readers' (and the frame
    /// cache's), and only demand reads get them.
    pub(super) held_bytes: AtomicU64,
}

/// Bytes counted in [`Counters::held_bytes`] for as long as this lives.
pub(super) struct Held<'a> {
    n: &'a Counters,
    bytes: u64,
}

impl<'a> Held<'a> {
    pub(super) fn new(n: &'a Counters) -> Self {
        Held { n, bytes: 0 }
    }

    /// Count `bytes` instead of what was counted (a retry's response
    /// replaces the failed one's).
    pub(super) fn set(&mut self, bytes: u64) {
        self.n.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.n.held_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = bytes;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.n.held_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Counters {
    pub(super) fn snapshot(&self) -> FetchStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FetchStats {
            demand_requests: g(&self.demand_requests),
            prefetch_requests: g(&self.prefetch_requests),
            bytes: g(&self.bytes),
            chunks: g(&self.chunks),
            retries: g(&self.retries),
            errors: g(&self.errors),
            verify_failures: g(&self.verify_failures),
            joined: g(&self.joined),
            store_hits: g(&self.store_hits),
            cache_hits: g(&self.cache_hits),
            ready_hits: g(&self.ready_hits),
            failures: g(&self.failures),
        }
    }
}
