//! Freeing what no snapshot needs: the kept indexes of layers no snapshot
//! is, then every chunk no kept index names; by hand (`hyperbox gc`) or
//! after removals ([`auto_gc`]).

use super::error::Result;
use super::Snapshotter;

/// Run [`Snapshotter::gc`] once removals of remote layers have stopped for
/// `delay` (`store.gc_after_remove_secs`): containerd removes an image's
/// snapshots one by one, and one gc after the last frees them all. Runs
/// until the snapshotter is dropped.
pub async fn auto_gc(snap: std::sync::Weak<Snapshotter>, delay: std::time::Duration) {
    let Some(mut removals) = snap.upgrade().map(|s| s.removals.subscribe()) else { return };
    while removals.changed().await.is_ok() {
        // Wait out the burst: each further removal starts the delay again.
        while tokio::time::timeout(delay, removals.changed()).await.is_ok_and(|r| r.is_ok()) {}
        let Some(s) = snap.upgrade() else { return };
        match tokio::task::spawn_blocking(move || s.gc()).await {
            Ok(Ok(_)) => {} // logged by gc
            Ok(Err(e)) => tracing::warn!(error = %e, "gc after removals failed"),
            Err(e) if e.is_cancelled() => tracing::info!("gc after removals was cancelled: hyperboxd is stopping"),
            Err(e) => tracing::warn!(error = %e, "gc after removals panicked"),
        }
    }
}

/// A blob in [`Snapshotter`]'s `preparing` set for as long as it lives.
pub(super) struct Preparing<'a> {
    snap: &'a Snapshotter,
    blob: String,
}

impl<'a> Preparing<'a> {
    pub(super) fn new(snap: &'a Snapshotter, blob: &str) -> Self {
        snap.preparing.lock().insert(blob.to_string());
        Preparing { snap, blob: blob.to_string() }
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.snap.preparing.lock().remove(&self.blob);
    }
}

/// What a [`Snapshotter::gc`] freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub indexes_removed: u64,
    pub chunks_removed: u64,
    /// Stored bytes before less after (other writes meanwhile blur it).
    pub bytes_freed: u64,
}

impl Snapshotter {
    /// Free what no snapshot needs: the kept indexes of layers no snapshot
    /// is (removed images' layers), then every chunk no kept index names.
    /// Layers being prepared keep theirs: their preparation waits for the
    /// gc to end, or the gc sees them.
    pub fn gc(&self) -> Result<GcReport> {
        let preparing = self.preparing.lock();
        let before = self.store.stats().bytes;
        let mut wanted: std::collections::HashSet<String> = {
            let meta = self.meta.lock();
            meta.snaps.values().filter_map(|r| r.remote.as_ref().map(|rr| rr.blob.clone())).collect()
        };
        wanted.extend(preparing.iter().cloned());
        wanted.extend(self.layers.lock().values().map(|(_, l, _)| l.blob.to_string()));
        let mut indexes_removed = 0;
        for layer in self.store.indexed_layers()? {
            if !wanted.contains(&layer.to_string()) {
                self.store.delete_index(&layer)?;
                indexes_removed += 1;
            }
        }
        let chunks_removed = self.store.gc()?;
        drop(preparing);
        let bytes_freed = before.saturating_sub(self.store.stats().bytes);
        tracing::info!(indexes_removed, chunks_removed, bytes_freed, "gc done");
        Ok(GcReport { indexes_removed, chunks_removed, bytes_freed })
    }
}
