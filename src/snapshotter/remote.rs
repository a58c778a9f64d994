//! Remote (lazy) layers. A Prepare whose labels name a HyperBox layer of a
//! known image becomes a committed snapshot (named by the target chain id)
//! whose `fs` is that layer's FUSE mount; the call answers AlreadyExists,
//! so containerd downloads nothing. Any failure falls back to the ordinary
//! path, where containerd unpacks the layer. A remote layer's Prepare also
//! starts (or joins) its image's prefetch.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::SystemTime;

use super::dirs::remove_dir;
use super::error::{Result, SnapshotError};
use super::fallback::{NotLazy, Reason};
use super::gc::Preparing;
use super::keep::Saved;
use super::meta::{Kind, Meta, Record, RemoteRef, Usage};
use super::Snapshotter;
use crate::digest::{Digest, DigestParseError};
use crate::fetcher::FetchError;
use crate::format::{FormatError, IndexLocation};
use crate::labels::{self, LayerLabels, Trust};
use crate::layer::RemoteLayer;
use crate::mount::LayerFs;
use crate::oci::{Reference, ReferenceError, Repo};
use crate::trace::{ImageKey, Recorder};

impl Snapshotter {
    /// Make sure every remote layer in the chain from `top` down is mounted:
    /// one that failed to mount at start is tried again here, and if it
    /// still fails the call fails rather than hand out an empty layer.
    pub(super) fn ensure_mounted(&self, top: &str) -> Result<()> {
        if self.broken.lock().is_empty() {
            return Ok(());
        }
        let chain: Vec<(String, Record)> = {
            let meta = self.meta.lock();
            meta.chain((!top.is_empty()).then_some(top)).map(|(n, r)| (n.to_string(), r.clone())).collect()
        };
        for (name, rec) in chain {
            if !self.broken.lock().contains(&rec.id) {
                continue;
            }
            self.remount(&rec)
                .map_err(|e| SnapshotError::FailedPrecondition(format!("remote layer {name} is not available: {e}")))?;
            self.broken.lock().remove(&rec.id);
            tracing::info!(snapshot = %name, "remote layer mounted again");
        }
        Ok(())
    }

    /// Prefetch an image whose layers are mounted, as when they were
    /// prepared: its trace's chunks and, with `hydrate`, then every other
    /// chunk. Returns the number of its layers handed to the prefetcher.
    pub fn prefetch(&self, manifest: &str, hydrate: bool) -> Result<usize> {
        if !self.prefetcher.enabled() {
            return Err(SnapshotError::FailedPrecondition("prefetch is off (prefetch.enabled = false)".into()));
        }
        let mounted: HashMap<u64, Arc<RemoteLayer>> =
            self.layers.lock().iter().map(|(id, (_, l, _))| (*id, l.clone())).collect();
        // Its own layers first, then those it shares with images pulled before.
        let mut found: Vec<(bool, Option<ImageKey>, Option<Arc<RemoteLayer>>)> = {
            let meta = self.meta.lock();
            meta.snaps
                .values()
                .filter_map(|r| {
                    let remote = r.remote.as_ref()?;
                    let own = remote.manifest.as_deref() == Some(manifest);
                    (own || remote.also.iter().any(|m| m == manifest))
                        .then(|| (own, remote.image(), mounted.get(&r.id).cloned()))
                })
                .collect()
        };
        found.sort_by_key(|(own, _, _)| !own);
        // The image goes by the repository of its own layers (another
        // version's trace is found through it).
        let Some(image) = found.iter().find_map(|(_, i, _)| i.clone()) else {
            return Err(SnapshotError::NotFound(format!(
                "no lazy layer here is known to belong to image {manifest}: pull it with `hyperbox pull` (an \
                 image whose layers all came with other images is not recorded; prefetch one of those)"
            )));
        };
        let image = ImageKey { digest: manifest.to_string(), ..image };
        let layers: Vec<Arc<RemoteLayer>> = found.into_iter().filter_map(|(_, _, l)| l).collect();
        for layer in &layers {
            self.prefetcher.layer_ready(&image, layer.clone(), hydrate);
        }
        Ok(layers.len())
    }

    pub(super) fn unmount_layer(&self, id: u64) {
        let Some((m, _, _)) = self.layers.lock().remove(&id) else { return };
        let fs = self.fs_dir(id);
        if let Err(e) = m.unmount() {
            tracing::warn!(path = %fs.display(), error = %e, "unmount failed; detaching");
            let _ = crate::mount::detach(&fs);
        }
        self.forget_kept(id);
    }

    /// The layer's connection is no longer kept.
    fn forget_kept(&self, id: u64) {
        let Some(name) = self.kept_names.lock().remove(&id) else { return };
        if let Some(keeper) = &self.keeper {
            if let Err(e) = keeper.remove(&name) {
                tracing::warn!(snapshot = id, name, error = %e, "cannot drop a kept FUSE connection");
            }
        }
        let _ = std::fs::remove_file(self.conn_file(id));
    }

    fn conn_file(&self, id: u64) -> std::path::PathBuf {
        self.dir(id).join("conn")
    }

    /// Keep a new mount's connection, so a restarted daemon serves it
    /// again. A layer whose connection cannot be kept works, but is
    /// mounted afresh after a restart.
    fn keep_connection(&self, id: u64, mount: &crate::mount::Mount, tree: &[u8; 32]) {
        let Some(keeper) = &self.keeper else { return };
        let saved = Saved::new(id, &mount.state(), tree);
        let kept = saved.write(&self.conn_file(id)).and_then(|()| keeper.put(&saved.name, mount.device()));
        match kept {
            Ok(()) => {
                self.kept_names.lock().insert(id, saved.name);
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.conn_file(id));
                tracing::warn!(snapshot = id, error = %e, "cannot keep the layer's FUSE connection: a restart of hyperboxd will break containers using it");
            }
        }
    }

    /// Serve snapshot `rec`'s live mount on the connection an earlier
    /// process kept, if everything agrees (see `keep`); else say why not.
    pub(super) fn adopt(&self, rec: &Record, kept: &mut HashMap<String, OwnedFd>) -> Result<(), String> {
        let saved = Saved::read(&self.conn_file(rec.id))
            .map_err(|e| format!("its saved connection state is unreadable: {e}"))?
            .ok_or("its connection state was not saved")?;
        if saved.tree_version != crate::fs::TREE_VERSION {
            return Err(format!(
                "it was served with layer tree version {}, this build numbers inodes as version {}",
                saved.tree_version,
                crate::fs::TREE_VERSION
            ));
        }
        let state = saved.state().map_err(|e| e.to_string())?;
        if !kept.contains_key(&saved.name) {
            return Err("its connection was not kept".into());
        }
        let remote = rec.remote.as_ref().ok_or("no remote reference")?;
        let loc = stored_location(rec).map_err(|e| e.to_string())?.ok_or("no index location")?;
        if remote.plain_http {
            self.fetcher.client().use_plain_http(&remote.registry);
        }
        let layer = self.remote_layer(remote, &loc).map_err(|e| e.to_string())?;
        let hook = self.recorder.as_ref().map(Recorder::hook);
        let fs = LayerFs::new(layer.clone(), self.fetcher.clone(), self.rt.clone(), hook);
        let memory = fs.memory();
        if hex::encode(fs.tree().fingerprint()) != saved.tree {
            return Err("its layer tree is numbered differently now (fingerprint)".into());
        }
        // Taken only now: a file left in `kept` is dropped from the keeper.
        let fd = kept.remove(&saved.name).ok_or("its connection was not kept")?;
        let mount = match fs.adopt(fd, state, &self.fs_dir(rec.id), &self.fuse) {
            Ok(m) => m,
            Err(e) => {
                if let Some(keeper) = &self.keeper {
                    let _ = keeper.remove(&saved.name);
                }
                return Err(format!("adopting its connection: {e}"));
            }
        };
        self.layers.lock().insert(rec.id, (mount, layer, memory));
        self.kept_names.lock().insert(rec.id, saved.name);
        Ok(())
    }

    /// Try to make `target` a committed remote layer on `parent`, for the
    /// Prepare of `key`. True if it exists now (made here or before); false
    /// to take the ordinary path, with the reason logged and kept
    /// (`super::fallback`).
    pub(super) fn try_remote(&self, key: &str, parent: &str, target: &str, labels: &HashMap<String, String>) -> bool {
        let said = LayerLabels::read(labels, key, Trust { pull_token: &self.pull_token });
        let Err(why) = self.lazy(parent, target, labels, &said) else { return true };
        let registry = said.image_ref.and_then(|r| r.parse::<Reference>().ok()).map(|r| r.repo.registry);
        match why.reason {
            Reason::NotHyperbox => {}
            Reason::NoImageRef => {
                tracing::info!(target, source = ?said.source, reason = why.reason.label(), "{}; the layer will be downloaded", why.detail)
            }
            _ => tracing::warn!(
                target,
                image = said.image_ref.unwrap_or(""),
                layer = said.layer_digest.unwrap_or(""),
                reason = why.reason.label(),
                error = %why.detail,
                "remote layer failed; the layer will be downloaded"
            ),
        }
        self.fallbacks.record(key, target, registry.as_deref(), why);
        false
    }

    /// [`Snapshotter::try_remote`], saying why not.
    ///
    /// A remote layer named `target` serves every later pull that names it,
    /// in any namespace, so it is made only when the layer's index says it
    /// is that chain id, and reused only by a Prepare that names the same
    /// index (whose digest fixes every file it serves). Anything else takes
    /// the ordinary path, where containerd checks what it unpacks.
    fn lazy(
        &self,
        parent: &str,
        target: &str,
        labels: &HashMap<String, String>,
        said: &LayerLabels,
    ) -> Result<(), NotLazy> {
        let loc = IndexLocation::from_annotations(labels)
            .map_err(|e| NotLazy::new(Reason::BadAnnotations, format!("bad HyperBox annotations: {e}")))?;
        let existing = {
            let meta = self.meta.lock();
            if !meta.snaps.contains_key(target) && !meta.parent_ok(parent) {
                let why = match loc {
                    None => NotLazy::new(Reason::NotHyperbox, ""),
                    Some(_) => NotLazy::new(Reason::Conflict, format!("parent {parent:?} is not a committed snapshot")),
                };
                return Err(why);
            }
            meta.snaps.get(target).map(|r| {
                let same_parent = r.kind == Kind::Committed && r.parent.as_deref().unwrap_or("") == parent;
                let same_index = loc.is_some() && stored_location(r).ok().flatten() == loc;
                (same_parent && same_index, r.id)
            })
        };
        if let Some((reusable, id)) = existing {
            if !reusable {
                return Err(match loc {
                    None => NotLazy::new(Reason::NotHyperbox, ""),
                    Some(_) => NotLazy::new(
                        Reason::Conflict,
                        "a snapshot of this chain id exists with another parent or another layer index",
                    ),
                });
            }
            self.reused(target, id, said);
            return Ok(());
        }
        let Some(loc) = loc else { return Err(NotLazy::new(Reason::NotHyperbox, "")) };
        let (Some(image), Some(blob)) = (said.image_ref, said.layer_digest) else {
            return Err(NotLazy::new(
                Reason::NoImageRef,
                "a HyperBox layer without an image reference and digest from a source the image cannot forge (use \
                 `hyperbox pull`, or CRI with disable_snapshot_annotations = false)",
            ));
        };
        self.mount_remote(parent, target, labels, said, (image, blob), &loc)?;
        tracing::info!(target, image = %image, layer = %blob, "remote layer ready");
        Ok(())
    }

    /// Remote layer `target` (snapshot `id`), made before, now serves the
    /// image being pulled too: remember the image on it and on its lower
    /// layers (one batch), and prefetch through them.
    fn reused(&self, target: &str, id: u64, said: &LayerLabels) {
        let Some(image) = image_of(said) else { return };
        let ancestors: Vec<u64> = {
            let mut meta = self.meta.lock();
            let notes = noted(&meta, Some(target), &image.digest);
            let ancestors = notes.iter().filter(|(k, _)| k != target).map(|(_, r)| r.id).collect();
            let next = meta.next_id;
            if !notes.is_empty() {
                if let Err(e) = meta.transact(&self.store, notes, vec![], next) {
                    // It only narrows `hyperbox prefetch` of that image.
                    tracing::warn!(target, error = %e, "could not record another image of a shared layer");
                }
            }
            ancestors
        };
        self.prefetch_through(&image, std::iter::once(id).chain(ancestors), said.hydrate);
    }

    /// Hand the mounted layers among snapshot `ids` to the image's prefetch.
    fn prefetch_through(&self, image: &ImageKey, ids: impl IntoIterator<Item = u64>, hydrate: bool) {
        let layers: Vec<Arc<RemoteLayer>> = {
            let mounted = self.layers.lock();
            ids.into_iter().filter_map(|id| mounted.get(&id).map(|(_, l, _)| l.clone())).collect()
        };
        for layer in layers {
            self.prefetcher.layer_ready(image, layer, hydrate);
        }
    }

    fn remote_layer(&self, remote: &RemoteRef, loc: &IndexLocation) -> Result<Arc<RemoteLayer>, RemoteError> {
        let blob: Digest = remote.blob.parse()?;
        let repo = Repo { registry: remote.registry.clone(), name: remote.repository.clone() };
        let index = self.rt.block_on(self.fetcher.layer_index(&repo, &blob, loc))?;
        Ok(Arc::new(RemoteLayer { repo, blob, index: Arc::new(index) }))
    }

    /// Mount `layer` as snapshot `id`'s `fs`. A new layer (`capped`) must
    /// fit the node's caps on mounted layers and their memory; a layer
    /// mounted again at start was within them when it was made.
    fn mount_layer(&self, id: u64, layer: Arc<RemoteLayer>, capped: bool) -> Result<(), RemoteError> {
        let hook = self.recorder.as_ref().map(Recorder::hook);
        let fs = LayerFs::new(layer.clone(), self.fetcher.clone(), self.rt.clone(), hook);
        let memory = fs.memory();
        if capped {
            let layers = self.layers.lock();
            let held: usize = layers.values().map(|(_, _, m)| m).sum();
            if layers.len() >= self.max_layers {
                return Err(RemoteError::Cap(format!("{} layers are mounted (daemon.max_layers)", layers.len())));
            }
            if held.saturating_add(memory) > self.max_index_memory {
                return Err(RemoteError::Cap(format!(
                    "its tree and index take {} KiB, and mounted layers hold {} of the {} MiB \
                     daemon.max_index_memory_mb allows",
                    memory >> 10,
                    held >> 20,
                    self.max_index_memory >> 20
                )));
            }
        }
        let tree = self.keeper.as_ref().map(|_| fs.tree().fingerprint());
        let mount = fs.mount(&self.fs_dir(id), &self.fuse).map_err(RemoteError::Mount)?;
        if let Some(tree) = tree {
            self.keep_connection(id, &mount, &tree);
        }
        let mut layers = self.layers.lock();
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            drop(layers);
            let _ = mount.unmount();
            self.forget_kept(id);
            return Err(RemoteError::Stopping);
        }
        layers.insert(id, (mount, layer, memory));
        Ok(())
    }

    fn mount_remote(
        &self,
        parent: &str,
        target: &str,
        labels: &HashMap<String, String>,
        said: &LayerLabels,
        (image, blob): (&str, &str),
        loc: &IndexLocation,
    ) -> Result<(), RemoteError> {
        let reference: Reference = image.parse()?;
        let manifest = image_of(said).map(|i| i.digest);
        if said.plain_http {
            self.fetcher.client().use_plain_http(&reference.repo.registry);
        }
        let remote = RemoteRef {
            registry: reference.repo.registry,
            repository: reference.repo.name,
            blob: blob.into(),
            location: loc.to_annotations(),
            manifest,
            also: Vec::new(),
            plain_http: said.plain_http,
        };
        // Registered before its index is read or stored: a gc from now on
        // keeps the index, and one running now finishes first.
        let _preparing = Preparing::new(self, blob);
        // The network part runs without the lock.
        let layer = self.remote_layer(&remote, loc)?;
        check_chain(parent, target, &layer)?;
        // What the layer's files would take unpacked; its chunks live in the
        // shared store and are not this snapshot's alone.
        let entries = layer.index.entries();
        let usage = Usage { size: entries.iter().map(|e| e.size as i64).sum(), inodes: entries.len() as i64 };
        let mut meta = self.meta.lock();
        // The lock was let go for the fetch: look again.
        if let Some(r) = meta.snaps.get(target) {
            let same_index = stored_location(r).ok().flatten().as_ref() == Some(loc);
            if r.kind == Kind::Committed && r.parent.as_deref().unwrap_or("") == parent && same_index {
                // Another pull of the same layer made it meanwhile.
                let id = r.id;
                drop(meta);
                self.reused(target, id, said);
                return Ok(());
            }
            return Err(RemoteError::OtherParent(target.to_string()));
        }
        if !meta.parent_ok(parent) {
            return Err(RemoteError::ParentGone(parent.to_string()));
        }
        let id = meta.next_id;
        self.make_dirs(id, false)?;
        if let Err(e) = self.mount_layer(id, layer.clone(), true) {
            remove_dir(&self.dir(id));
            return Err(e);
        }
        let mut labels = labels.clone();
        // Keep what containerd checks, and the layer's annotations for a
        // remount; drop the CRI's per-pull labels.
        labels.retain(|k, _| labels::keep_on_commit(k));
        let image = remote.image();
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            remote: Some(remote),
        };
        // The image's lower layers that came with images pulled before
        // learn of this image in the same batch.
        let mut puts = match &image {
            Some(image) => noted(&meta, (!parent.is_empty()).then_some(parent), &image.digest),
            None => Vec::new(),
        };
        let ancestors: Vec<u64> = puts.iter().map(|(_, r)| r.id).collect();
        puts.push((target.to_string(), rec));
        if let Err(e) = meta.transact(&self.store, puts, vec![], id + 1) {
            drop(meta);
            self.unmount_layer(id);
            remove_dir(&self.dir(id));
            return Err(e.into());
        }
        drop(meta);
        if let Some(image) = image {
            self.prefetch_through(&image, std::iter::once(id).chain(ancestors), said.hydrate);
        }
        Ok(())
    }

    pub(super) fn remount(&self, rec: &Record) -> Result<(), RemoteError> {
        let remote = rec.remote.as_ref().ok_or(RemoteError::NoLocation)?;
        let loc = stored_location(rec)?.ok_or(RemoteError::NoLocation)?;
        if remote.plain_http {
            self.fetcher.client().use_plain_http(&remote.registry);
        }
        let layer = self.remote_layer(remote, &loc)?;
        std::fs::create_dir_all(self.fs_dir(rec.id)).map_err(RemoteError::Dir)?;
        super::dirs::set_mode(&self.dir(rec.id), super::dirs::PRIVATE)?;
        self.mount_layer(rec.id, layer, false)
    }
}

/// Why a remote layer could not be mounted (the Prepare then falls back to
/// the ordinary path, or a remount at start marks the layer broken).
#[derive(Debug, thiserror::Error)]
pub(super) enum RemoteError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("layer digest: {0}")]
    Digest(#[from] DigestParseError),
    #[error("index location: {0}")]
    Location(#[from] FormatError),
    #[error("the snapshot lost its index location")]
    NoLocation,
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("FUSE mount: {0}")]
    Mount(#[source] io::Error),
    #[error("create the layer's fs dir: {0}")]
    Dir(#[source] io::Error),
    #[error("hyperboxd is stopping")]
    Stopping,
    #[error("over the node's cap: {0}")]
    Cap(String),
    #[error("snapshot {0} appeared meanwhile on another parent or with another index")]
    OtherParent(String),
    #[error("parent {0} was removed meanwhile")]
    ParentGone(String),
    #[error("{0:?} is not a chain id (sha256:...) as containerd names layers")]
    NotAChain(String),
    #[error(
        "the layer's index says its diff_id is {diff_id}, which on parent {parent:?} makes chain id {got}, not {target}"
    )]
    ChainMismatch { target: String, parent: String, diff_id: Digest, got: Digest },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Where a remote layer's index is, as its record keeps it (older records
/// kept it only in the labels). `Ok(None)`: not a remote layer.
fn stored_location(rec: &Record) -> Result<Option<IndexLocation>, FormatError> {
    let Some(remote) = &rec.remote else { return Ok(None) };
    let from = if remote.location.is_empty() { &rec.labels } else { &remote.location };
    IndexLocation::from_annotations(from)
}

/// The chain id a snapshot's name stands for. containerd's metadata layer
/// names a layer it unpacked `<namespace>/<n>/<chain id>`; a remote layer is
/// named by its plain chain id.
pub(super) fn chain_of(name: &str) -> Option<Digest> {
    name.rsplit('/').next()?.parse().ok()
}

/// A remote layer is committed as `target` only if its index's diff_id on
/// `parent`'s chain id gives `target`: the name every later pull trusts is
/// the one the layer's own index claims (the index is fixed by the digest
/// in the image's manifest, and every chunk by its id).
fn check_chain(parent: &str, target: &str, layer: &RemoteLayer) -> Result<(), RemoteError> {
    let want = chain_of(target).ok_or_else(|| RemoteError::NotAChain(target.to_string()))?;
    let parent_chain = match parent {
        "" => None,
        p => Some(chain_of(p).ok_or_else(|| RemoteError::NotAChain(p.to_string()))?),
    };
    let diff_id = Digest::from_bytes(layer.index.index.diff_id);
    let got = crate::oci::chain_id(parent_chain.as_ref(), &diff_id);
    if got != want {
        return Err(RemoteError::ChainMismatch { target: target.into(), parent: parent.into(), diff_id, got });
    }
    Ok(())
}

/// The records of remote layers from `top` down that do not know image
/// `manifest` yet, with it added to the images they serve.
fn noted(meta: &Meta, top: Option<&str>, manifest: &str) -> Vec<(String, Record)> {
    meta.chain(top)
        .filter(|(_, r)| {
            r.remote
                .as_ref()
                .is_some_and(|rr| rr.manifest.as_deref() != Some(manifest) && !rr.also.iter().any(|m| m == manifest))
        })
        .map(|(k, r)| {
            let mut r = r.clone();
            r.remote.as_mut().expect("filtered on remote").also.push(manifest.to_string());
            (k.to_string(), r)
        })
        .collect()
}

/// The image a layer's Prepare is for: its platform manifest's digest, from
/// the CRI's label (a reference pinned by digest may name an index), else
/// from the pinned reference `hyperbox pull` passes.
fn image_of(l: &LayerLabels) -> Option<ImageKey> {
    let r: Reference = l.image_ref?.parse().ok()?;
    let digest = match l.manifest_digest.and_then(|d| d.parse::<Digest>().ok()) {
        Some(d) => d.to_string(),
        None => r.digest.as_ref()?.to_string(),
    };
    Some(ImageKey { digest, repository: format!("{}/{}", r.repo.registry, r.repo.name) })
}
