//! The frame cache: decompressed, verified frames that reads were answered
//! with, kept in memory (`frame_cache_mb`), and the batched refresh of
//! their chunks' access times in the store, so its LRU eviction still sees
//! frames the cache answers for as hot.

use bytes::Bytes;

use super::Fetcher;
use crate::digest::ChunkId;
use crate::store::Store;

/// How many frame cache hits wait before their access times go to the store.
const TOUCH_BATCH: usize = 256;

/// Refresh access times of chunks the frame cache answered for; a failure
/// only makes eviction less exact, so it is logged, not returned.
pub(super) fn touch_all(store: &Store, ids: &[ChunkId]) {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if let Err(e) = store.touch_all(&ids) {
        tracing::warn!(error = %e, chunks = ids.len(), "recording frame cache hits in the store failed");
    }
}

/// Decompressed, verified frames by chunk id, weighed in bytes.
pub(super) type FrameCache = quick_cache::sync::Cache<ChunkId, Bytes, FrameWeight>;

#[derive(Clone)]
pub(super) struct FrameWeight;

impl quick_cache::Weighter<ChunkId, Bytes> for FrameWeight {
    fn weight(&self, _id: &ChunkId, data: &Bytes) -> u64 {
        // An empty frame still costs its entry.
        data.len().max(64) as u64
    }
}

/// A cache of `mb` MiB, or none for 0.
pub(super) fn frame_cache(mb: u64) -> Option<FrameCache> {
    (mb > 0).then(|| {
        let bytes = mb << 20;
        // Sized for frames of the default average (128 KiB).
        FrameCache::with_weighter((bytes / (128 << 10)).max(16) as usize, bytes, FrameWeight)
    })
}

impl Fetcher {
    /// Remember chunks read from the frame cache; once there are
    /// [`TOUCH_BATCH`] of them, refresh their access times in the store off
    /// the runtime's workers. (A store lookup refreshes any pending ones
    /// sooner.)
    pub(super) fn note_cache_hits(&self, ids: impl Iterator<Item = ChunkId>) {
        let batch = {
            let mut pending = self.inner.untouched.lock();
            pending.extend(ids);
            if pending.len() < TOUCH_BATCH {
                return;
            }
            std::mem::take(&mut *pending)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let store = self.inner.store.clone();
                rt.spawn_blocking(move || touch_all(&store, &batch));
            }
            // A thread that may block (a FUSE reader answering from memory).
            Err(_) => touch_all(&self.inner.store, &batch),
        }
    }
}
