//! containerd's snapshotter semantics, and remote (lazy) layers.
//!
//! Everything here is plain synchronous code over the store and the file
//! system; `grpc` adapts it to containerd's Snapshots service, and chooses
//! gRPC status codes in one place.
//!
//! - Metadata: one row per snapshot in the store's snapshot family, keyed by
//!   name, plus the next id. Each call that changes anything writes one
//!   atomic, synced batch; the in-memory map changes only after it lands.
//! - Directories: `<root>/snapshots/<id>/{fs,work}`, made as `new-<id>-<rand>`
//!   and renamed into place before the metadata commits; a failed call
//!   removes its dir. `Cleanup` removes dirs no snapshot owns (a crash
//!   between rename and commit, or a dir that could not be removed).
//! - Mounts as containerd's overlay snapshotter: no parent is a bind of
//!   `fs`; a view of one parent is a read-only bind of it; otherwise overlay
//!   with the topmost layer first in `lowerdir`.
//! - Remote layers: a Prepare whose labels name a HyperBox layer of a known
//!   image becomes a committed snapshot (named by the target chain id)
//!   whose `fs` is that layer's FUSE mount; the call answers AlreadyExists,
//!   so containerd downloads nothing. Any failure falls back to the
//!   ordinary path, where containerd unpacks the layer.
//! - Traces and prefetch: a remote layer's Prepare starts (or joins) its
//!   image's prefetch; an active snapshot prepared on remote layers is a
//!   container starting, and its first reads are recorded into the image's
//!   trace (`crate::trace`, `crate::prefetch`).

pub mod filter;
pub mod grpc;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::fetcher::{Fetcher, RemoteLayer};
use crate::format::IndexLocation;
use crate::mount::{LayerFs, Mount, MountOptions};
use crate::prefetch::{PrefetchConfig, Prefetcher};
use crate::registry::{Reference, Repo};
use crate::store::{Family, Store};
use crate::trace::{ImageKey, Recorder, TraceConfig};
use filter::{Fields, Filters};

/// The label containerd sets on a layer's Prepare: the chain id the
/// snapshot will be committed as.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// Image reference and layer digest, as the CRI plugin passes them
/// (`disable_snapshot_annotations = false`).
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The CRI's manifest digest of the image being pulled.
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Set by `hyperbox pull --hydrate`: fetch the whole image in the background.
pub const LABEL_HYDRATE: &str = "containerd.io/snapshot/hyperbox.hydrate";
/// The same, as `hyperbox pull` passes them.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/hyperbox.image-ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/hyperbox.layer-digest";

const KEY_NEXT_ID: &[u8] = b"next-id";
const SNAP_PREFIX: &str = "snap/";

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

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What `Stat`, `List` and `Update` speak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    pub name: String,
    /// Empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.name.clone()),
            [f] if f == "parent" => Some(self.parent.clone()),
            [f] if f == "kind" => Some(self.kind.as_str().to_string()),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => self.labels.get(&rest.join(".")).cloned(),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// A mount for containerd to perform (`type source options`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Where a remote layer's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RemoteRef {
    registry: String,
    repository: String,
    blob: String,
    /// The index location's annotations, kept here because Update may
    /// change the snapshot's labels.
    #[serde(default)]
    location: HashMap<String, String>,
    /// The manifest digest of the image it was prepared for (the trace's
    /// key), when the labels said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manifest: Option<String>,
    /// The manifest digests of other images pulled through this layer
    /// since (images sharing it), for `hyperbox prefetch` of those images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    also: Vec<String>,
}

impl RemoteRef {
    fn image(&self) -> Option<ImageKey> {
        Some(ImageKey { digest: self.manifest.clone()?, repository: format!("{}/{}", self.registry, self.repository) })
    }
}

/// One snapshot's row (JSON; the family name carries the layout version).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    created: SystemTime,
    updated: SystemTime,
    /// Measured at commit (the dir no longer changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote: Option<RemoteRef>,
}

struct Meta {
    snaps: HashMap<String, Record>,
    next_id: u64,
}

impl Meta {
    /// `top` and its ancestors, topmost first (empty for no parent).
    fn chain<'a>(&'a self, top: Option<&'a str>) -> impl Iterator<Item = (&'a str, &'a Record)> + 'a {
        std::iter::successors(top.and_then(|n| self.snaps.get_key_value(n)), |(_, r)| {
            r.parent.as_deref().and_then(|p| self.snaps.get_key_value(p))
        })
        .map(|(n, r)| (n.as_str(), r))
    }

    /// Whether `parent` can take a child: none, or a committed snapshot.
    fn parent_ok(&self, parent: &str) -> bool {
        parent.is_empty() || self.snaps.get(parent).is_some_and(|p| p.kind == Kind::Committed)
    }
}

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
            Err(e) => tracing::warn!(error = %e, "gc after removals panicked"),
        }
    }
}

/// A blob in [`Snapshotter`]'s `preparing` set for as long as it lives.
struct Preparing<'a> {
    snap: &'a Snapshotter,
    blob: String,
}

impl<'a> Preparing<'a> {
    fn new(snap: &'a Snapshotter, blob: &str) -> Self {
        snap.preparing.lock().unwrap().insert(blob.to_string());
        Preparing { snap, blob: blob.to_string() }
    }
}

impl Drop for Preparing<'_> {
    fn drop(&mut self) {
        self.snap.preparing.lock().unwrap().remove(&self.blob);
    }
}

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

/// What a [`Snapshotter::gc`] freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub indexes_removed: u64,
    pub chunks_removed: u64,
    /// Stored bytes before less after (other writes meanwhile blur it).
    pub bytes_freed: u64,
}

/// Settings the daemon hands over.
#[derive(Clone, Debug)]
pub struct Options {
    pub root: PathBuf,
    /// How each remote layer is served (FUSE threads, read-ahead).
    pub fuse: MountOptions,
    pub trace: TraceConfig,
    pub prefetch: PrefetchConfig,
}

pub struct Snapshotter {
    root: PathBuf,
    store: Arc<Store>,
    fetcher: Fetcher,
    rt: tokio::runtime::Handle,
    fuse: MountOptions,
    meta: Mutex<Meta>,
    /// FUSE mounts of remote layers, by snapshot id.
    layers: Mutex<HashMap<u64, (Mount, Arc<RemoteLayer>)>>,
    recorder: Option<Recorder>,
    prefetcher: Prefetcher,
    /// Remote layers that could not be mounted again at start: tried again
    /// when used, and never handed out unmounted (their `fs` is empty).
    broken: Mutex<std::collections::HashSet<u64>>,
    /// Set by `unmount_all`: a layer mounted after it is unmounted at once.
    closing: std::sync::atomic::AtomicBool,
    /// Remote layers removed since start ([`auto_gc`] watches it).
    removals: tokio::sync::watch::Sender<u64>,
    /// Blobs of remote layers being prepared: their index is stored before
    /// their record, and [`Snapshotter::gc`] (which holds this lock
    /// throughout) must keep it.
    preparing: Mutex<std::collections::HashSet<String>>,
}

impl Snapshotter {
    /// Load metadata, clear FUSE mounts a previous process left under
    /// `root`, and mount every committed remote layer again (from the index
    /// kept in the store; the registry is asked only if it is missing).
    /// Call from outside the tokio runtime (or within `spawn_blocking`).
    pub fn open(opts: Options, store: Arc<Store>, fetcher: Fetcher, rt: tokio::runtime::Handle) -> Result<Snapshotter> {
        let root = opts.root;
        std::fs::create_dir_all(root.join("snapshots")).map_err(io_err(format!("create {}", root.display())))?;
        for stale in crate::mount::stale_mounts(&root).map_err(io_err("read /proc/self/mountinfo"))? {
            tracing::info!(path = %stale.display(), "detaching a FUSE mount left by a previous hyperboxd");
            if let Err(e) = crate::mount::detach(&stale) {
                tracing::warn!(path = %stale.display(), error = %e, "cannot detach stale mount");
            }
        }
        let mut snaps = HashMap::new();
        let mut next_id = 1;
        for (k, v) in store.rows(Family::Snapshots)? {
            if k == KEY_NEXT_ID {
                next_id = u64::from_le_bytes(
                    v.as_slice().try_into().map_err(|_| SnapshotError::Corrupt("next-id is not 8 bytes".into()))?,
                );
            } else if let Some(name) = k.strip_prefix(SNAP_PREFIX.as_bytes()) {
                let name = String::from_utf8(name.to_vec())
                    .map_err(|_| SnapshotError::Corrupt("a snapshot name is not UTF-8".into()))?;
                let rec: Record = serde_json::from_slice(&v)
                    .map_err(|e| SnapshotError::Corrupt(format!("snapshot {name:?}: {e}")))?;
                snaps.insert(name, rec);
            }
        }
        let recorder = opts.trace.enabled.then(|| Recorder::start(store.clone(), opts.trace.clone(), &rt));
        let prefetcher = Prefetcher::new(fetcher.clone(), store.clone(), recorder.clone(), opts.prefetch, rt.clone());
        let s = Snapshotter {
            root,
            store,
            fetcher,
            rt,
            recorder,
            prefetcher,
            fuse: MountOptions { threads: opts.fuse.threads.max(1), ..opts.fuse },
            meta: Mutex::new(Meta { snaps, next_id }),
            layers: Mutex::new(HashMap::new()),
            broken: Mutex::new(std::collections::HashSet::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
            removals: tokio::sync::watch::channel(0).0,
            preparing: Mutex::new(std::collections::HashSet::new()),
        };
        let remote: Vec<(String, Record)> = {
            let meta = s.meta.lock().unwrap();
            meta.snaps.iter().filter(|(_, r)| r.remote.is_some()).map(|(n, r)| (n.clone(), r.clone())).collect()
        };
        for (name, rec) in remote {
            if let Err(e) = s.remount(&rec) {
                // Its fs is an empty dir: it is not handed out until a retry
                // mounts it (see `ensure_mounted`).
                tracing::error!(snapshot = %name, error = %e, "cannot mount remote layer again; will retry when it is used");
                s.broken.lock().unwrap().insert(rec.id);
            }
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    pub fn prefetcher(&self) -> &Prefetcher {
        &self.prefetcher
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }
    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }
    fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Write one call's changes durably, then apply them in memory.
    fn transact(&self, meta: &mut Meta, puts: Vec<(String, Record)>, deletes: Vec<String>, next_id: u64) -> Result<()> {
        let mut rows = Vec::with_capacity(puts.len() + deletes.len() + 1);
        for name in &deletes {
            rows.push((format!("{SNAP_PREFIX}{name}").into_bytes(), None));
        }
        for (name, rec) in &puts {
            let v = serde_json::to_vec(rec).expect("a record serializes");
            rows.push((format!("{SNAP_PREFIX}{name}").into_bytes(), Some(v)));
        }
        if next_id != meta.next_id {
            rows.push((KEY_NEXT_ID.to_vec(), Some(next_id.to_le_bytes().to_vec())));
        }
        self.store.write_rows(Family::Snapshots, &rows)?;
        for name in deletes {
            meta.snaps.remove(&name);
        }
        meta.snaps.extend(puts);
        meta.next_id = next_id;
        Ok(())
    }

    /// Make `<root>/snapshots/<id>` with `fs` (and `work`), staged under a
    /// temporary name and renamed into place.
    fn make_dirs(&self, id: u64, work: bool) -> Result<()> {
        let snapshots = self.root.join("snapshots");
        let staged = tempfile::Builder::new()
            .prefix(&format!("new-{id}-"))
            .tempdir_in(&snapshots)
            .map_err(io_err(format!("create a dir in {}", snapshots.display())))?;
        std::fs::create_dir(staged.path().join("fs")).map_err(io_err("create fs dir"))?;
        if work {
            std::fs::create_dir(staged.path().join("work")).map_err(io_err("create work dir"))?;
        }
        // 0755 like containerd's overlay dirs (tempdir makes 0700).
        set_mode(staged.path(), 0o755)?;
        let dest = self.dir(id);
        if dest.exists() {
            // Left by a crash before its metadata committed: nobody owns it.
            remove_dir(&dest);
        }
        let staged = staged.keep();
        std::fs::rename(&staged, &dest).map_err(io_err(format!("rename {} into place", staged.display())))?;
        Ok(())
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
            if let Some(target) = labels.get(LABEL_TARGET) {
                if self.try_remote(parent, target, &labels) {
                    return Err(SnapshotError::AlreadyExists(target.clone()));
                }
            }
        }
        self.ensure_mounted(parent)?;
        let mut meta = self.meta.lock().unwrap();
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
        if let Err(e) = self.transact(&mut meta, vec![(key.to_string(), rec.clone())], vec![], id + 1) {
            remove_dir(&self.dir(id));
            return Err(e);
        }
        let mounts = self.mounts_of(&meta, &rec);
        if kind == Kind::Active && !rec.labels.contains_key(LABEL_TARGET) {
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
            let mounted = self.layers.lock().unwrap();
            chain.iter().filter_map(|r| mounted.get(&r.id).map(|(_, l)| l.clone())).collect()
        };
        tracing::debug!(snapshot = key, image = %image.digest, "container start: recording its trace");
        recorder.begin(image, layers);
    }

    /// Mounts for a snapshot, as containerd's overlay snapshotter builds them.
    fn mounts_of(&self, meta: &Meta, rec: &Record) -> Vec<MountSpec> {
        let mut lower: Vec<String> =
            meta.chain(rec.parent.as_deref()).map(|(_, r)| self.fs_dir(r.id).display().to_string()).collect();
        let bind = |source: String, ro: bool| MountSpec {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let ro = rec.kind != Kind::Active;
        if lower.is_empty() {
            return vec![bind(self.fs_dir(rec.id).display().to_string(), ro)];
        }
        if ro && lower.len() == 1 {
            return vec![bind(lower.remove(0), true)];
        }
        let mut options = vec!["index=off".to_string()];
        if !ro {
            options.push(format!("workdir={}", self.work_dir(rec.id).display()));
            options.push(format!("upperdir={}", self.fs_dir(rec.id).display()));
        }
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![MountSpec { kind: "overlay".into(), source: "overlay".into(), options }]
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let parent = {
            let meta = self.meta.lock().unwrap();
            let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            if rec.kind == Kind::Committed {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is committed: only active snapshots and views have mounts"
                )));
            }
            rec.parent.clone().unwrap_or_default()
        };
        self.ensure_mounted(&parent)?;
        let meta = self.meta.lock().unwrap();
        let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(self.mounts_of(&meta, rec))
    }

    /// Make sure every remote layer in the chain from `top` down is mounted:
    /// one that failed to mount at start is tried again here, and if it
    /// still fails the call fails rather than hand out an empty layer.
    fn ensure_mounted(&self, top: &str) -> Result<()> {
        if self.broken.lock().unwrap().is_empty() {
            return Ok(());
        }
        let chain: Vec<(String, Record)> = {
            let meta = self.meta.lock().unwrap();
            meta.chain((!top.is_empty()).then_some(top)).map(|(n, r)| (n.to_string(), r.clone())).collect()
        };
        for (name, rec) in chain {
            if !self.broken.lock().unwrap().contains(&rec.id) {
                continue;
            }
            self.remount(&rec)
                .map_err(|e| SnapshotError::FailedPrecondition(format!("remote layer {name} is not available: {e}")))?;
            self.broken.lock().unwrap().remove(&rec.id);
            tracing::info!(snapshot = %name, "remote layer mounted again");
        }
        Ok(())
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot name must not be empty".into()));
        }
        let mut meta = self.meta.lock().unwrap();
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
        self.transact(&mut meta, vec![(name.to_string(), committed)], vec![key.to_string()], next)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let rec = {
            let mut meta = self.meta.lock().unwrap();
            let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?.clone();
            if let Some(child) = meta.snaps.iter().find(|(_, r)| r.parent.as_deref() == Some(key)).map(|(n, _)| n) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: snapshot {child} is its child"
                )));
            }
            let next = meta.next_id;
            self.transact(&mut meta, vec![], vec![key.to_string()], next)?;
            rec
        };
        // After the commit: a failure here leaves only an orphan dir, which
        // Cleanup removes.
        self.unmount_layer(rec.id);
        self.broken.lock().unwrap().remove(&rec.id);
        remove_dir(&self.dir(rec.id));
        if rec.remote.is_some() {
            self.removals.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let meta = self.meta.lock().unwrap();
        let rec = meta.snaps.get(key).ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(info(key, rec))
    }

    /// Only labels can change. No paths: replace all labels. `labels`:
    /// the same. `labels.<key>`: set that label, or remove it if the new
    /// info lacks it.
    pub fn update(&self, new: Info, paths: &[String]) -> Result<Info> {
        let mut meta = self.meta.lock().unwrap();
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
        self.transact(&mut meta, vec![(new.name.clone(), rec.clone())], vec![], next)?;
        Ok(info(&new.name, &rec))
    }

    /// Disk used by this snapshot alone. A remote layer uses what its files
    /// would take unpacked; its chunks live in the shared store.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (usage, id) = {
            let meta = self.meta.lock().unwrap();
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
        let meta = self.meta.lock().unwrap();
        let mut out: Vec<Info> = meta.snaps.iter().map(|(n, r)| info(n, r)).filter(|i| filters.matches(i)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove dirs (and FUSE mounts) that no snapshot owns. Dirs are made
    /// only under the metadata lock, which this holds throughout, so a dir
    /// it sees unowned belongs to no call in progress.
    pub fn cleanup(&self) -> Result<()> {
        let meta = self.meta.lock().unwrap();
        let owned: std::collections::HashSet<u64> = meta.snaps.values().map(|r| r.id).collect();
        let orphans: Vec<u64> = self.layers.lock().unwrap().keys().copied().filter(|id| !owned.contains(id)).collect();
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

    /// Unmount every remote layer (daemon shutdown).
    pub fn unmount_all(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = &self.recorder {
            r.flush();
        }
        let ids: Vec<u64> = self.layers.lock().unwrap().keys().copied().collect();
        for id in ids {
            self.unmount_layer(id);
        }
    }

    /// Every mounted remote layer, with how much of it is local.
    pub fn layers(&self) -> Vec<LayerStatus> {
        let mounted: Vec<(u64, Arc<RemoteLayer>)> =
            self.layers.lock().unwrap().iter().map(|(id, (_, l))| (*id, l.clone())).collect();
        let keys: HashMap<u64, String> = {
            let meta = self.meta.lock().unwrap();
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

    /// Prefetch an image whose layers are mounted, as when they were
    /// prepared: its trace's chunks and, with `hydrate`, then every other
    /// chunk. Returns the number of its layers handed to the prefetcher.
    pub fn prefetch(&self, manifest: &str, hydrate: bool) -> Result<usize> {
        if !self.prefetcher.enabled() {
            return Err(SnapshotError::FailedPrecondition("prefetch is off (prefetch.enabled = false)".into()));
        }
        let mounted: HashMap<u64, Arc<RemoteLayer>> =
            self.layers.lock().unwrap().iter().map(|(id, (_, l))| (*id, l.clone())).collect();
        // Its own layers first, then those it shares with images pulled before.
        let mut found: Vec<(bool, Option<ImageKey>, Option<Arc<RemoteLayer>>)> = {
            let meta = self.meta.lock().unwrap();
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

    /// Free what no snapshot needs: the kept indexes of layers no snapshot
    /// is (removed images' layers), then every chunk no kept index names.
    /// Layers being prepared keep theirs: their preparation waits for the
    /// gc to end, or the gc sees them.
    pub fn gc(&self) -> Result<GcReport> {
        let preparing = self.preparing.lock().unwrap();
        let before = self.store.stats().bytes;
        let mut wanted: std::collections::HashSet<String> = {
            let meta = self.meta.lock().unwrap();
            meta.snaps.values().filter_map(|r| r.remote.as_ref().map(|rr| rr.blob.clone())).collect()
        };
        wanted.extend(preparing.iter().cloned());
        wanted.extend(self.layers.lock().unwrap().values().map(|(_, l)| l.blob.to_string()));
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

    /// The names containers go by here: the last part of each active
    /// snapshot's key (containerd passes `<namespace>/<n>/<key>`, and `ctr`
    /// and CRI make a container's snapshot key its id).
    pub fn container_ids(&self) -> std::collections::HashSet<String> {
        let meta = self.meta.lock().unwrap();
        meta.snaps
            .iter()
            .filter(|(_, r)| r.kind == Kind::Active)
            .map(|(k, _)| k.rsplit('/').next().unwrap_or(k).to_string())
            .collect()
    }

    /// Remote layers mounted now.
    pub fn mounted_layers(&self) -> usize {
        self.layers.lock().unwrap().len()
    }

    fn unmount_layer(&self, id: u64) {
        let Some((m, _)) = self.layers.lock().unwrap().remove(&id) else { return };
        let fs = self.fs_dir(id);
        if let Err(e) = m.unmount() {
            tracing::warn!(path = %fs.display(), error = %e, "unmount failed; detaching");
            let _ = crate::mount::detach(&fs);
        }
    }

    // ---- remote layers ----

    /// Try to make `target` a committed remote layer on `parent`. True if
    /// it exists now (made here or before); false to take the ordinary path.
    fn try_remote(&self, parent: &str, target: &str, labels: &HashMap<String, String>) -> bool {
        let existing = {
            let meta = self.meta.lock().unwrap();
            if !meta.snaps.contains_key(target) && !meta.parent_ok(parent) {
                return false;
            }
            // Already here (another pull, maybe of another image sharing the
            // layer). A snapshot of that name on another parent cannot be reused.
            meta.snaps
                .get(target)
                .map(|r| (r.kind == Kind::Committed && r.parent.as_deref().unwrap_or("") == parent, r.id))
        };
        if let Some((reusable, id)) = existing {
            if reusable {
                self.reused(parent, target, id, labels);
            }
            return reusable;
        }
        let loc = match IndexLocation::from_annotations(labels) {
            Ok(Some(loc)) => loc,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(target, error = %e, "bad HyperBox annotations; the layer will be downloaded");
                return false;
            }
        };
        let image = labels.get(LABEL_IMAGE_REF).or_else(|| labels.get(LABEL_CRI_IMAGE_REF));
        let blob = labels.get(LABEL_LAYER_DIGEST).or_else(|| labels.get(LABEL_CRI_LAYER_DIGEST));
        let (Some(image), Some(blob)) = (image, blob) else {
            tracing::info!(
                target,
                "a HyperBox layer without its image reference and digest (use `hyperbox pull`, or CRI with \
                 disable_snapshot_annotations = false); the layer will be downloaded"
            );
            return false;
        };
        match self.mount_remote(parent, target, labels, image, blob, &loc) {
            Ok(()) => {
                tracing::info!(target, image = %image, layer = %blob, "remote layer ready");
                true
            }
            Err(e) => {
                tracing::warn!(target, image = %image, layer = %blob, error = %e, "remote layer failed; the layer will be downloaded");
                false
            }
        }
    }

    /// Remote layer `target` (snapshot `id`), made before, now serves the
    /// image being pulled too: remember the image on it, and prefetch
    /// through it and its lower layers.
    fn reused(&self, parent: &str, target: &str, id: u64, labels: &HashMap<String, String>) {
        let Some(image) = image_of(labels) else { return };
        self.note_image(target, &image.digest);
        let hydrate = labels_say_hydrate(labels);
        let layer = self.layers.lock().unwrap().get(&id).map(|(_, l)| l.clone());
        if let Some(layer) = layer {
            self.prefetcher.layer_ready(&image, layer, hydrate);
        }
        self.share_ancestors(parent, &image, hydrate);
    }

    /// Remember that image `manifest` was pulled through remote layer
    /// `target` too (a failure to save it is logged: it only narrows
    /// `hyperbox prefetch`).
    fn note_image(&self, target: &str, manifest: &str) {
        let mut meta = self.meta.lock().unwrap();
        let Some(mut rec) = meta.snaps.get(target).cloned() else { return };
        let Some(remote) = rec.remote.as_mut() else { return };
        if remote.manifest.as_deref() == Some(manifest) || remote.also.iter().any(|m| m == manifest) {
            return;
        }
        remote.also.push(manifest.to_string());
        let next = meta.next_id;
        if let Err(e) = self.transact(&mut meta, vec![(target.to_string(), rec)], vec![], next) {
            tracing::warn!(target, error = %e, "could not record another image of a shared layer");
        }
    }

    fn remote_layer(&self, remote: &RemoteRef, loc: &IndexLocation) -> Result<Arc<RemoteLayer>, String> {
        let blob: Digest = remote.blob.parse().map_err(|e| format!("layer digest {:?}: {e}", remote.blob))?;
        let repo = Repo { registry: remote.registry.clone(), name: remote.repository.clone() };
        let index = self.rt.block_on(self.fetcher.layer_index(&repo, &blob, loc)).map_err(|e| e.to_string())?;
        Ok(Arc::new(RemoteLayer { repo, blob, index: Arc::new(index) }))
    }

    fn mount_layer(&self, id: u64, layer: Arc<RemoteLayer>) -> Result<(), String> {
        let hook = self.recorder.as_ref().map(Recorder::hook);
        let fs = LayerFs::new(layer.clone(), self.fetcher.clone(), self.rt.clone(), hook);
        let mount = fs.mount(&self.fs_dir(id), &self.fuse).map_err(|e| format!("FUSE mount: {e}"))?;
        let mut layers = self.layers.lock().unwrap();
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            drop(layers);
            let _ = mount.unmount();
            return Err("hyperboxd is stopping".into());
        }
        layers.insert(id, (mount, layer));
        Ok(())
    }

    fn mount_remote(
        &self,
        parent: &str,
        target: &str,
        labels: &HashMap<String, String>,
        image: &str,
        blob: &str,
        loc: &IndexLocation,
    ) -> Result<(), String> {
        let reference: Reference = image.parse().map_err(|e| format!("{e}"))?;
        let hydrate = labels_say_hydrate(labels);
        let manifest = image_of(labels).map(|i| i.digest);
        let remote = RemoteRef {
            registry: reference.repo.registry,
            repository: reference.repo.name,
            blob: blob.into(),
            location: loc.to_annotations(),
            manifest,
            also: Vec::new(),
        };
        // Registered before its index is read or stored: a gc from now on
        // keeps the index, and one running now finishes first.
        let _preparing = Preparing::new(self, blob);
        // The network part runs without the lock.
        let layer = self.remote_layer(&remote, loc)?;
        // What the layer's files would take unpacked; its chunks live in the
        // shared store and are not this snapshot's alone.
        let entries = layer.index.entries();
        let usage = Usage { size: entries.iter().map(|e| e.size as i64).sum(), inodes: entries.len() as i64 };
        let mut meta = self.meta.lock().unwrap();
        // The lock was let go for the fetch: look again.
        if let Some(r) = meta.snaps.get(target) {
            if r.kind == Kind::Committed && r.parent.as_deref().unwrap_or("") == parent {
                // Another pull of the same layer made it meanwhile.
                let id = r.id;
                drop(meta);
                self.reused(parent, target, id, labels);
                return Ok(());
            }
            return Err(format!("snapshot {target} appeared meanwhile on another parent"));
        }
        if !meta.parent_ok(parent) {
            return Err(format!("parent {parent} was removed meanwhile"));
        }
        let id = meta.next_id;
        self.make_dirs(id, false).map_err(|e| e.to_string())?;
        if let Err(e) = self.mount_layer(id, layer.clone()) {
            remove_dir(&self.dir(id));
            return Err(e);
        }
        let mut labels = labels.clone();
        // Keep what containerd checks, and the layer's annotations for a
        // remount; drop the CRI's per-pull labels (image-layers can be long).
        labels.retain(|k, _| {
            !k.starts_with("containerd.io/snapshot/cri.")
                || k == LABEL_CRI_IMAGE_REF
                || k == LABEL_CRI_LAYER_DIGEST
                || k == LABEL_CRI_MANIFEST_DIGEST
        });
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
        if let Err(e) = self.transact(&mut meta, vec![(target.to_string(), rec)], vec![], id + 1) {
            drop(meta);
            self.unmount_layer(id);
            remove_dir(&self.dir(id));
            return Err(e.to_string());
        }
        drop(meta);
        if let Some(image) = image {
            self.prefetcher.layer_ready(&image, layer, hydrate);
            self.share_ancestors(parent, &image, hydrate);
        }
        Ok(())
    }

    /// An image's lower layers are its new layer's parent chain. Those it
    /// shares with images pulled before were never prepared for it (
    /// containerd finds them in its own metadata), so hand them to its
    /// prefetch job here and remember the image on them. Each is handed once
    /// per image: the note keeps later layers of the image from repeating it.
    fn share_ancestors(&self, parent: &str, image: &ImageKey, hydrate: bool) {
        let shared: Vec<(String, u64)> = {
            let meta = self.meta.lock().unwrap();
            meta.chain((!parent.is_empty()).then_some(parent))
                .filter(|(_, r)| {
                    r.remote.as_ref().is_some_and(|rr| {
                        rr.manifest.as_deref() != Some(image.digest.as_str()) && !rr.also.contains(&image.digest)
                    })
                })
                .map(|(k, r)| (k.to_string(), r.id))
                .collect()
        };
        for (key, id) in shared {
            self.note_image(&key, &image.digest);
            let layer = self.layers.lock().unwrap().get(&id).map(|(_, l)| l.clone());
            if let Some(layer) = layer {
                self.prefetcher.layer_ready(image, layer, hydrate);
            }
        }
    }

    fn remount(&self, rec: &Record) -> Result<(), String> {
        let remote = rec.remote.as_ref().expect("only remote records");
        let from = if remote.location.is_empty() { &rec.labels } else { &remote.location };
        let loc = IndexLocation::from_annotations(from)
            .map_err(|e| e.to_string())?
            .ok_or("the snapshot lost its index location")?;
        let layer = self.remote_layer(remote, &loc)?;
        std::fs::create_dir_all(self.fs_dir(rec.id)).map_err(|e| format!("create fs dir: {e}"))?;
        self.mount_layer(rec.id, layer)
    }
}

/// The image a layer's Prepare is for: its platform manifest's digest, from
/// the CRI's label (a reference pinned by digest may name an index), else
/// from the pinned reference `hyperbox pull` passes.
fn image_of(labels: &HashMap<String, String>) -> Option<ImageKey> {
    let image = labels.get(LABEL_IMAGE_REF).or_else(|| labels.get(LABEL_CRI_IMAGE_REF))?;
    let r: Reference = image.parse().ok()?;
    let digest = match labels.get(LABEL_CRI_MANIFEST_DIGEST).and_then(|d| d.parse::<Digest>().ok()) {
        Some(d) => d.to_string(),
        None => r.digest.as_ref()?.to_string(),
    };
    Some(ImageKey { digest, repository: format!("{}/{}", r.repo.registry, r.repo.name) })
}

fn labels_say_hydrate(labels: &HashMap<String, String>) -> bool {
    labels.get(LABEL_HYDRATE).is_some_and(|v| v == "true")
}

fn info(name: &str, rec: &Record) -> Info {
    Info {
        kind: rec.kind,
        name: name.to_string(),
        parent: rec.parent.clone().unwrap_or_default(),
        labels: rec.labels.clone(),
        created: rec.created,
        updated: rec.updated,
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Remove a dir tree; failures are logged (Cleanup tries again).
fn remove_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove snapshot dir; Cleanup will retry");
        }
    }
}

/// Blocks in use and distinct inodes under `path`, not crossing mounts (as
/// containerd's `fs.DiskUsage`).
fn disk_usage(path: &Path) -> Result<Usage> {
    let dev = std::fs::symlink_metadata(path).map_err(io_err(format!("stat {}", path.display())))?.dev();
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(io_err(format!("stat {}", p.display())))?;
        if m.dev() != dev {
            continue;
        }
        if seen.insert(m.ino()) {
            usage.inodes += 1;
            usage.size += m.blocks() as i64 * 512;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(io_err(format!("read {}", p.display())))? {
                stack.push(e.map_err(io_err(format!("read {}", p.display())))?.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests;
