//! A remote layer: the blob of a HyperBox layer in a registry repository,
//! and its verified index. The unit the fetcher fetches chunks of, a FUSE
//! mount serves, a trace records and the prefetcher warms; a leaf, so each
//! of them can name it without importing another.

use std::sync::Arc;

use crate::digest::Digest;
use crate::format::LayerIndex;
use crate::oci::Repo;

/// A layer whose chunks can be fetched: where its blob lives, and its index.
#[derive(Debug)]
pub struct RemoteLayer {
    pub repo: Repo,
    pub blob: Digest,
    pub index: Arc<LayerIndex>,
}

impl RemoteLayer {
    /// How errors and logs name it: `layer <blob> of <registry>/<repository>`.
    pub fn name(&self) -> String {
        format!("layer {} of {}", self.blob, self.repo)
    }
}
