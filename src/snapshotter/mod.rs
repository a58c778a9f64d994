//! containerd's snapshotter semantics, and remote (lazy) layers.
//!
//! Everything here is plain synchronous code over the store and the file
//! system; the daemon adapts it to containerd's Snapshots service
//! (`crate::daemon::snapshots`) and chooses gRPC status codes. The calls
//! (Prepare, View, Commit, Remove, Stat, Update, Usage, List, Cleanup) are
//! in this file; each of the other files has one job:
//!
//! - `meta`: the metadata, one row per snapshot; each call that changes
//!   anything writes one atomic, synced batch.
//! - `dirs`: every path of a snapshot, staged dirs renamed into place.
//! - `mounts`: mounts as containerd's overlay snapshotter makes them.
//! - `remote`: remote layers: a Prepare whose labels name a HyperBox layer
//!   becomes a committed snapshot whose `fs` is that layer's FUSE mount, and
//!   the call answers AlreadyExists, so containerd downloads nothing. Any
//!   failure falls back to the ordinary path, where containerd unpacks the
//!   layer. It also hands the image's layers to the prefetcher.
//! - `fallback`: why a layer's Prepare was not lazy, counted by reason and
//!   the latest kept, for `hyperbox pull`, `hyperbox doctor` and metrics.
//! - `gc`: freeing indexes and chunks no snapshot needs.
//! - `keep`: remote layers that outlive the daemon: their FUSE connections
//!   kept outside the process and served again after a restart.
//! - `status`: what `hyperbox layers` and the metrics ask.
//! - `filter`: containerd's List filter language.
//!
//! An active snapshot prepared on remote layers (not a layer being
//! unpacked) is a container starting: its first reads are recorded into
//! the image's trace (`crate::trace`).

mod dirs;
mod error;
pub mod fallback;
pub mod filter;
mod gc;
pub mod keep;
mod meta;
mod mounts;
mod remote;
mod status;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::SystemTime;

use crate::fetcher::Fetcher;
use crate::labels;
use crate::layer::RemoteLayer;
use crate::mount::{Mount, MountOptions};
use crate::prefetch::Prefetcher;
use crate::store::Store;
use crate::trace::Recorder;
use dirs::{disk_usage, remove_dir};
use error::{io_err, Result};
use filter::Filters;
use meta::{info, Meta, Record, RemoteRef};

pub use error::SnapshotError;
pub use gc::{auto_gc, GcReport};
pub use meta::{Info, Kind, Usage};
pub use mounts::MountSpec;
pub use status::LayerStatus;

/// Settings the daemon hands over.
#[derive(Clone, Debug)]
pub struct Options {
    pub root: PathBuf,
    /// How each remote layer is served (FUSE threads, read-ahead).
    pub fuse: MountOptions,
    /// The secret `hyperbox pull` puts in its labels to be believed
    /// (`crate::labels::Trust`); empty: no pull is believed.
    pub pull_token: String,
    /// At most this many remote layers mounted at once, holding at most
    /// this many bytes of trees and indexes (`daemon.max_layers`,
    /// `daemon.max_index_memory_mb`): a Prepare past either takes the
    /// ordinary path.
    pub max_layers: usize,
    pub max_index_memory: usize,
}

/// The node's parts a snapshotter works with; the daemon makes them
/// (`crate::daemon::Node`) and shares them with the admin API and metrics.
pub struct Parts {
    pub store: Arc<Store>,
    /// Reads remote layers' indexes and serves their FUSE mounts.
    pub fetcher: Fetcher,
    /// Records container starts' first reads (none when tracing is off).
    pub recorder: Option<Recorder>,
    /// Warms the layers of an image being pulled.
    pub prefetcher: Prefetcher,
    /// The runtime network work runs on; calls come from outside it.
    pub rt: tokio::runtime::Handle,
    /// Where layers' FUSE connections are kept across restarts, and what an
    /// earlier process kept (none: layers are unmounted when the daemon
    /// stops, and mounted afresh at start).
    pub keep: Option<keep::Keep>,
}

pub struct Snapshotter {
    root: PathBuf,
    store: Arc<Store>,
    fetcher: Fetcher,
    rt: tokio::runtime::Handle,
    fuse: MountOptions,
    pull_token: String,
    max_layers: usize,
    max_index_memory: usize,
    meta: Mutex<Meta>,
    /// FUSE mounts of remote layers, by snapshot id, with the memory their
    /// tree and index hold (`LayerFs::memory`).
    layers: Mutex<HashMap<u64, (Mount, Arc<RemoteLayer>, usize)>>,
    recorder: Option<Recorder>,
    prefetcher: Prefetcher,
    /// Remote layers that could not be mounted again at start: tried again
    /// when used, and never handed out unmounted (their `fs` is empty).
    broken: Mutex<HashSet<u64>>,
    /// Set by `unmount_all`: a layer mounted after it is unmounted at once.
    closing: AtomicBool,
    /// Remote layers removed since start ([`auto_gc`] watches it).
    removals: tokio::sync::watch::Sender<u64>,
    /// Blobs of remote layers being prepared: their index is stored before
    /// their record, and [`Snapshotter::gc`] (which holds this lock
    /// throughout) must keep it.
    preparing: Mutex<HashSet<String>>,
    /// Prepares that fell back to the ordinary path, and why.
    fallbacks: fallback::Fallbacks,
    /// Keeps mounted layers' connections across restarts.
    keeper: Option<Arc<dyn keep::FdKeeper>>,
    /// The names mounted layers' connections are kept under, by id.
    kept_names: Mutex<HashMap<u64, String>>,
}

impl Snapshotter {
    /// Load metadata, serve again the remote layers a previous process left
    /// mounted (when their connections were kept: `keep`), mount the other
    /// committed remote layers afresh (from the index kept in the store; the
    /// registry is asked only if it is missing), and clear FUSE mounts of
    /// ours that no layer owns. Call from outside the tokio runtime (or
    /// within `spawn_blocking`).
    pub fn open(opts: Options, parts: Parts) -> Result<Snapshotter> {
        let Parts { store, fetcher, recorder, prefetcher, rt, keep } = parts;
        let (keeper, mut kept) = match keep {
            Some(k) => (Some(k.keeper), k.kept),
            None => (None, HashMap::new()),
        };
        let root = opts.root;
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_err(format!("create {}", snapshots.display())))?;
        // Also tightens a dir an older version made 0755.
        dirs::set_mode(&snapshots, dirs::PRIVATE)?;
        // mountinfo shows paths with symlinks resolved.
        let real_root = std::fs::canonicalize(&root).map_err(io_err(format!("resolve {}", root.display())))?;
        let mut stale: HashSet<PathBuf> =
            crate::mount::stale_mounts(&real_root).map_err(io_err("read /proc/self/mountinfo"))?.into_iter().collect();
        let meta = Meta::load(&store)?;
        let s = Snapshotter {
            root,
            store,
            fetcher,
            rt,
            recorder,
            prefetcher,
            fuse: MountOptions { threads: opts.fuse.threads.max(1), ..opts.fuse },
            pull_token: opts.pull_token,
            max_layers: opts.max_layers,
            max_index_memory: opts.max_index_memory,
            meta: Mutex::new(meta),
            layers: Mutex::new(HashMap::new()),
            broken: Mutex::new(HashSet::new()),
            closing: AtomicBool::new(false),
            removals: tokio::sync::watch::channel(0).0,
            preparing: Mutex::new(HashSet::new()),
            fallbacks: fallback::Fallbacks::default(),
            keeper,
            kept_names: Mutex::new(HashMap::new()),
        };
        let remote: Vec<(String, Record)> = {
            let meta = s.meta.lock();
            meta.snaps.iter().filter(|(_, r)| r.remote.is_some()).map(|(n, r)| (n.clone(), r.clone())).collect()
        };
        let mut adopted = 0;
        for (name, rec) in remote {
            let live = real_root.join("snapshots").join(rec.id.to_string()).join("fs");
            if stale.remove(&live) {
                match s.adopt(&rec, &mut kept) {
                    Ok(()) => {
                        adopted += 1;
                        continue;
                    }
                    Err(why) => {
                        tracing::warn!(snapshot = %name, path = %live.display(), "{why}: mounting it afresh");
                        if let Err(e) = crate::mount::detach(&live) {
                            tracing::warn!(path = %live.display(), error = %e, "cannot detach stale mount");
                        }
                    }
                }
            }
            if let Err(e) = s.remount(&rec) {
                // Its fs is an empty dir: it is not handed out until a retry
                // mounts it (see `ensure_mounted`).
                tracing::error!(snapshot = %name, error = %e, "cannot mount remote layer again; will retry when it is used");
                s.broken.lock().insert(rec.id);
            }
        }
        if adopted > 0 {
            tracing::info!(layers = adopted, "serving again the layers a previous hyperboxd left mounted");
        }
        for path in stale {
            tracing::info!(path = %path.display(), "detaching a FUSE mount left by a previous hyperboxd");
            if let Err(e) = crate::mount::detach(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot detach stale mount");
            }
        }
        if let Some(keeper) = &s.keeper {
            for (name, fd) in kept {
                drop(fd);
                if let Err(e) = keeper.remove(&name) {
                    tracing::warn!(name, error = %e, "cannot drop a kept FUSE connection no layer uses");
                }
            }
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Prepare (`Kind::Active`) or View (`Kind::View`).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<MountSpec>> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot key must not be empty".into()));
        }
        if kind == Kind::Active {
            if let Some(target) = labels.get(labels::TARGET) {
                if self.try_remote(key, parent, target, &labels) {
                    return Err(SnapshotError::AlreadyExists(target.clone()));
                }
            }
        }
        self.ensure_mounted(parent)?;
        let mut meta = self.meta.lock();
        if meta.snaps.contains_key(key) {
            return Err(SnapshotError::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            match meta.snaps.get(parent) {
                None => return Err(SnapshotError::NotFound(format!("{parent} (the parent of {key})"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapshotError::InvalidArgument(format!("parent {parent} is not a committed snapshot")))
                }
                Some(_) => {}
            }
        }
        let id = meta.next_id;
        self.make_dirs(id, kind == Kind::Active)?;
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
        };
        if let Err(e) = meta.transact(&self.store, vec![(key.to_string(), rec.clone())], vec![], id + 1) {
            remove_dir(&self.dir(id));
            return Err(e);
        }
        let mounts = self.mounts_of(&meta, &rec);
        if kind == Kind::Active && !rec.labels.contains_key(labels::TARGET) {
            self.container_starts(&meta, key, parent);
        }
        Ok(mounts)
    }

    /// An active snapshot on remote layers, not a layer being unpacked: a
    /// container is starting. Record its first reads into the trace of the
    /// image its topmost remote layer was prepared for.
    fn container_starts(&self, meta: &Meta, key: &str, parent: &str) {
        let Some(recorder) = &self.recorder else { return };
        let chain: Vec<&Record> = meta.chain((!parent.is_empty()).then_some(parent)).map(|(_, r)| r).collect();
        let Some(image) = chain.iter().find_map(|r| r.remote.as_ref().and_then(RemoteRef::image)) else { return };
        let layers: Vec<Arc<RemoteLayer>> = {
            let mounted = self.layers.lock();
            chain.iter().filter_map(|r| mounted.get(&r.id).map(|(_, l, _)| l.clone())).collect()
        };
        tracing::debug!(snapshot = key, image = %image.digest, "container start: recording its trace");
        recorder.begin(image, layers);
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let parent = {
            let meta = self.meta.lock();
            let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            if rec.kind == Kind::Committed {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is committed: only active snapshots and views have mounts"
                )));
            }
            rec.parent.clone().unwrap_or_default()
        };
        self.ensure_mounted(&parent)?;
        let meta = self.meta.lock();
        let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(self.mounts_of(&meta, rec))
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot name must not be empty".into()));
        }
        let mut meta = self.meta.lock();
        let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is {}, only an active snapshot can be committed",
                rec.kind.as_str()
            )));
        }
        if meta.snaps.contains_key(name) {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        let usage = disk_usage(&self.fs_dir(rec.id))?;
        let now = SystemTime::now();
        let committed =
            Record { kind: Kind::Committed, labels, created: now, updated: now, usage: Some(usage), ..rec.clone() };
        let next = meta.next_id;
        meta.transact(&self.store, vec![(name.to_string(), committed)], vec![key.to_string()], next)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = {
            let mut meta = self.meta.lock();
            let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?.clone();
            if let Some(child) = meta.snaps.iter().find(|(_, r)| r.parent.as_deref() == Some(key)).map(|(n, _)| n) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: snapshot {child} is its child"
                )));
            }
            let next = meta.next_id;
            meta.transact(&self.store, vec![], vec![key.to_string()], next)?;
            rec
        };
        // After the commit: a failure here leaves only an orphan dir, which
        // Cleanup removes.
        self.unmount_layer(rec.id);
        self.broken.lock().remove(&rec.id);
        remove_dir(&self.dir(rec.id));
        if rec.remote.is_some() {
            self.removals.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let meta = self.meta.lock();
        let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(info(key, rec))
    }

    /// Only labels can change. No paths: replace all labels. `labels`:
    /// the same. `labels.<key>`: set that label, or remove it if the new
    /// info lacks it.
    pub fn update(&self, new: Info, paths: &[String]) -> Result<Info> {
        let mut meta = self.meta.lock();
        let mut rec = meta.snaps.get(&new.name).ok_or_else(|| SnapshotError::NotFound(new.name.clone()))?.clone();
        if paths.is_empty() {
            rec.labels = new.labels;
        } else {
            for p in paths {
                if p == "labels" {
                    rec.labels = new.labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {}: only labels can change",
                        new.name
                    )));
                }
            }
        }
        rec.updated = SystemTime::now();
        let next = meta.next_id;
        meta.transact(&self.store, vec![(new.name.clone(), rec.clone())], vec![], next)?;
        Ok(info(&new.name, &rec))
    }

    /// Disk used by this snapshot alone. A remote layer uses what its files
    /// would take unpacked; its chunks live in the shared store.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (usage, id) = {
            let meta = self.meta.lock();
            let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            (rec.usage, rec.id)
        };
        // Measured at commit for a committed snapshot; an active one still changes.
        match usage {
            Some(u) => Ok(u),
            None => disk_usage(&self.fs_dir(id)),
        }
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse(filters).map_err(SnapshotError::InvalidArgument)?;
        let meta = self.meta.lock();
        let mut out: Vec<Info> = meta.snaps.iter().map(|(n, r)| info(n, r)).filter(|i| filters.matches(i)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove dirs (and FUSE mounts) that no snapshot owns. Dirs are made
    /// only under the metadata lock, which this holds throughout, so a dir
    /// it sees unowned belongs to no call in progress.
    pub fn cleanup(&self) -> Result<()> {
        let meta = self.meta.lock();
        let owned: HashSet<u64> = meta.snaps.values().map(|r| r.id).collect();
        let orphans: Vec<u64> = self.layers.lock().keys().copied().filter(|id| !owned.contains(id)).collect();
        for id in orphans {
            self.unmount_layer(id);
        }
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(io_err(format!("read {}", snapshots.display())))?;
        // Under the lock, only move orphans aside (`rm-...`, a name no call
        // makes); deleting them, possibly gigabytes, happens after.
        let mut doomed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("read {}", snapshots.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<u64>().is_ok_and(|id| owned.contains(&id)) {
                continue;
            }
            let path = entry.path();
            for m in crate::mount::stale_mounts(&path).unwrap_or_default() {
                let _ = crate::mount::detach(&m);
            }
            if name.starts_with("rm-") {
                doomed.push(path);
                continue;
            }
            let aside = snapshots.join(format!("rm-{name}"));
            match std::fs::rename(&path, &aside) {
                Ok(()) => doomed.push(aside),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot move an orphan snapshot dir aside")
                }
            }
        }
        drop(meta);
        for path in doomed {
            tracing::info!(path = %path.display(), "removing a snapshot dir no snapshot owns");
            remove_dir(&path);
        }
        Ok(())
    }

    /// Unmount every remote layer.
    pub fn unmount_all(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = &self.recorder {
            r.flush();
        }
        let ids: Vec<u64> = self.layers.lock().keys().copied().collect();
        for id in ids {
            self.unmount_layer(id);
        }
    }

    /// The daemon is stopping: save the traces being recorded, and leave
    /// every layer whose connection is kept mounted for the next process
    /// to serve (after at most `grace` for the reads in progress); unmount
    /// the others. Without a keeper, unmount all.
    pub fn stop(&self, grace: std::time::Duration) {
        if self.keeper.is_none() {
            return self.unmount_all();
        }
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = &self.recorder {
            r.flush();
        }
        let ids: Vec<u64> = self.layers.lock().keys().copied().collect();
        for id in ids {
            if !self.kept_names.lock().contains_key(&id) {
                self.unmount_layer(id);
                continue;
            }
            let Some((m, _, _)) = self.layers.lock().remove(&id) else { continue };
            let unanswered = m.leave(grace);
            if unanswered > 0 {
                tracing::warn!(
                    snapshot = id,
                    unanswered,
                    "left a layer with reads unanswered; the next hyperboxd gets them again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
