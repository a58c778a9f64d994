//! What the snapshotter can say of itself: mounted remote layers and how
//! much of each is local (`hyperbox layers`), and the containers it serves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::meta::Kind;
use super::Snapshotter;
use crate::layer::RemoteLayer;

/// A mounted remote layer, for `hyperbox layers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerStatus {
    /// The committed snapshot's key.
    pub key: String,
    pub blob: String,
    /// registry/repository of its blob.
    pub repository: String,
    pub mountpoint: PathBuf,
    /// Frames (chunks) and their compressed bytes: all, and those stored here.
    pub frames: u64,
    pub frames_local: u64,
    pub bytes: u64,
    pub bytes_local: u64,
}

impl Snapshotter {
    /// Every mounted remote layer, with how much of it is local.
    pub fn layers(&self) -> Vec<LayerStatus> {
        let mounted: Vec<(u64, Arc<RemoteLayer>)> =
            self.layers.lock().iter().map(|(id, (_, l, _))| (*id, l.clone())).collect();
        let keys: HashMap<u64, String> = {
            let meta = self.meta.lock();
            meta.snaps.iter().map(|(k, r)| (r.id, k.clone())).collect()
        };
        let mut out: Vec<LayerStatus> = mounted
            .into_iter()
            .map(|(id, l)| {
                let (mut frames, mut frames_local, mut bytes, mut bytes_local) = (0, 0, 0, 0);
                for f in l.index.frames().iter() {
                    frames += 1;
                    bytes += f.c_len as u64;
                    if self.store.contains(&f.id).unwrap_or(false) {
                        frames_local += 1;
                        bytes_local += f.c_len as u64;
                    }
                }
                LayerStatus {
                    key: keys.get(&id).cloned().unwrap_or_default(),
                    blob: l.blob.to_string(),
                    repository: l.repo.to_string(),
                    mountpoint: self.fs_dir(id),
                    frames,
                    frames_local,
                    bytes,
                    bytes_local,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The names containers go by here: the last part of each active
    /// snapshot's key (containerd passes `<namespace>/<n>/<key>`, and `ctr`
    /// and CRI make a container's snapshot key its id).
    pub fn container_ids(&self) -> std::collections::HashSet<String> {
        let meta = self.meta.lock();
        meta.snaps
            .iter()
            .filter(|(_, r)| r.kind == Kind::Active)
            .map(|(k, _)| k.rsplit('/').next().unwrap_or(k).to_string())
            .collect()
    }

    /// Remote layers mounted now.
    pub fn mounted_layers(&self) -> usize {
        self.layers.lock().len()
    }

    /// Bytes the mounted layers' trees and indexes take (what
    /// `daemon.max_index_memory_mb` caps).
    pub fn layer_memory(&self) -> usize {
        self.layers.lock().values().map(|(_, _, m)| m).sum()
    }

    /// Prepares that fell back to the ordinary path since start, and why.
    pub fn fallbacks(&self) -> &super::fallback::Fallbacks {
        &self.fallbacks
    }
}
