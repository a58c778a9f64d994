//! Access traces: which chunks a container start read first, and when.
//!
//! Every mounted layer reports each frame's first access on a bounded
//! channel ([`TraceHook`]; a full channel drops the report and counts it, a
//! read never waits on it). When a container starts (an active snapshot is
//! prepared on remote layers), a [`Recorder`] session collects the first
//! accesses on that container's layers until the window ends or the
//! container goes idle, then merges them into the image's [`Trace`] in the
//! store: the union of all runs, ordered by each chunk's mean first-access
//! time. The prefetcher reads it back on the image's next start.
//!
//! A trace is keyed by the image's manifest digest and keeps, for each
//! chunk, the layer, frame, chunk digest, file path and offset in the file,
//! so it can also serve another version of the image: by chunk digest where
//! the chunk is unchanged, by path where the file moved to a new layer.
//!
//! Traces are JSON (versioned, [`TRACE_VERSION`]): the same bytes are kept
//! in the store, exported by `hyperbox trace export` and imported elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use crate::digest::{ChunkId, Digest};
use crate::layer::RemoteLayer;
use crate::store::{Family, Store, StoreError};

/// The layout version of a trace; others are refused with a clear error.
pub const TRACE_VERSION: u32 = 1;
/// The media type of an exported trace (and of its OCI artifact).
pub const MEDIA_TYPE: &str = "application/vnd.hyperbox.trace.v1+json";
/// An imported trace may hold at most this many entries (a trace of every
/// chunk of a very large image; guards memory against a hostile file).
pub const MAX_ENTRIES: usize = 4 << 20;
/// An imported trace is at most this many bytes of JSON (about 250 bytes
/// an entry: room for `MAX_ENTRIES` of short paths).
pub const MAX_TRACE_BYTES: usize = 1 << 30;
/// Bytes of a trace's repository name or of an entry's path: a path in an
/// index is at most this long too.
pub const MAX_NAME_BYTES: usize = crate::format::index::limits::MAX_PATH;

const KEY_IMAGE: &str = "image/";
const KEY_REPO: &str = "repo/";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace store: {0}")]
    Store(#[from] StoreError),
    #[error("not a HyperBox trace: {0}")]
    Invalid(String),
    #[error("trace in the registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
}

/// The `[trace]` section of the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Record a trace of each container start.
    pub enabled: bool,
    /// Stop recording this long after the container's snapshot was prepared.
    pub window_secs: u64,
    /// Or once no new chunk was read for this long.
    pub idle_secs: u64,
    /// A trace keeps at most this many chunks (the earliest first).
    pub max_entries: usize,
    /// First-access reports that may wait unprocessed; more are dropped.
    pub queue: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self { enabled: true, window_secs: 60, idle_secs: 10, max_entries: 1 << 20, queue: 1 << 16 }
    }
}

impl TraceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_secs == 0 || self.idle_secs == 0 {
            return Err("trace.window_secs and trace.idle_secs must be more than 0".into());
        }
        if self.max_entries == 0 || self.max_entries > MAX_ENTRIES {
            return Err(format!("trace.max_entries must be between 1 and {MAX_ENTRIES}"));
        }
        if self.queue == 0 {
            return Err("trace.queue must be at least 1".into());
        }
        Ok(())
    }
}

/// An image, as traces know it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageKey {
    /// The manifest digest (`sha256:…`).
    pub digest: String,
    /// `registry/repository`: another version's trace is found through it.
    pub repository: String,
}

/// One chunk of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The layer blob that held the chunk.
    pub layer: Digest,
    /// Its frame number in that layer's index.
    pub frame: u32,
    pub chunk: ChunkId,
    /// Compressed size (what prefetching it costs) and uncompressed size.
    pub c_len: u32,
    pub u_len: u32,
    /// The file the frame holds data of ("" for none), and where in the
    /// file's stored data the frame starts.
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// Mean time from the container's start to the first read, over the
    /// runs that read it.
    pub at_ms: u32,
    /// How many runs read it.
    pub seen: u32,
}

/// How the prefetch of one start did, measured against what it read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartReport {
    /// Unix seconds.
    pub at: u64,
    /// Chunks the container read, chunks prefetched, and both.
    pub read: u32,
    pub prefetched: u32,
    pub hits: u32,
    /// hits / prefetched, and hits / read.
    pub precision: f64,
    pub recall: f64,
}

/// An image's merged trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub version: u32,
    /// The manifest digest of the image the runs were of.
    pub image: String,
    pub repository: String,
    /// Runs merged in.
    pub runs: u32,
    /// Unix seconds of the last merge.
    pub updated: u64,
    /// In order of mean first access.
    #[serde(deserialize_with = "bounded_entries")]
    pub entries: Vec<TraceEntry>,
    /// The latest start that had a prefetch to judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start: Option<StartReport>,
}

/// Entries of a trace from outside, refused as soon as there are more than
/// [`MAX_ENTRIES`] (not after all of them took memory).
fn bounded_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TraceEntry>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<TraceEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of trace entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(e) = a.next_element()? {
                if out.len() == MAX_ENTRIES {
                    return Err(serde::de::Error::custom(format!("more than {MAX_ENTRIES} entries")));
                }
                out.push(e);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Trace {
    pub fn new(image: &ImageKey) -> Trace {
        Trace {
            version: TRACE_VERSION,
            image: image.digest.clone(),
            repository: image.repository.clone(),
            runs: 0,
            updated: 0,
            entries: Vec::new(),
            last_start: None,
        }
    }

    /// Merge one run (its first accesses, in order): a chunk seen before
    /// keeps a running mean of its time; new ones are added; then entries
    /// are ordered by mean time and cut to `max_entries`.
    pub fn merge_run(&mut self, run: Vec<TraceEntry>, max_entries: usize) {
        let mut at: HashMap<(Digest, u32), usize> =
            self.entries.iter().enumerate().map(|(i, e)| ((e.layer.clone(), e.frame), i)).collect();
        for new in run {
            match at.get(&(new.layer.clone(), new.frame)) {
                Some(&i) => {
                    // `seen` and `at_ms` may come from a foreign trace: any
                    // u32 is taken. The mean is over seen + 1 runs (at least
                    // 1), and is at most the larger of the two times.
                    let e = &mut self.entries[i];
                    let runs = u64::from(e.seen) + 1;
                    let total = u64::from(e.at_ms) * u64::from(e.seen) + u64::from(new.at_ms);
                    e.at_ms = u32::try_from(total / runs).unwrap_or(u32::MAX);
                    e.seen = e.seen.saturating_add(1);
                }
                None => {
                    at.insert((new.layer.clone(), new.frame), self.entries.len());
                    self.entries.push(TraceEntry { seen: 1, ..new });
                }
            }
        }
        // Stable: ties keep their order of first sight.
        self.entries.sort_by_key(|e| e.at_ms);
        self.entries.truncate(max_entries);
        self.runs = self.runs.saturating_add(1);
        self.updated = unix_now();
    }

    /// Compressed bytes a prefetch of every entry would fetch.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.c_len as u64).sum()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a trace serializes")
    }

    /// Parse and check a trace from outside (a file, a registry): the
    /// version, the image digest, and a bound on its size.
    pub fn from_json(raw: &[u8]) -> Result<Trace, TraceError> {
        if raw.len() > MAX_TRACE_BYTES {
            return Err(TraceError::Invalid(format!("{} bytes is over the limit of {MAX_TRACE_BYTES}", raw.len())));
        }
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(raw).map_err(|e| TraceError::Invalid(e.to_string()))?;
        if v.version != TRACE_VERSION {
            return Err(TraceError::Invalid(format!(
                "trace version {} is not supported (this hyperbox reads version {TRACE_VERSION})",
                v.version
            )));
        }
        let t: Trace = serde_json::from_slice(raw).map_err(|e| TraceError::Invalid(e.to_string()))?;
        t.image.parse::<Digest>().map_err(|e| TraceError::Invalid(format!("image digest: {e}")))?;
        if t.entries.len() > MAX_ENTRIES {
            return Err(TraceError::Invalid(format!("{} entries exceeds the limit of {MAX_ENTRIES}", t.entries.len())));
        }
        if t.repository.is_empty() || t.repository.len() > MAX_NAME_BYTES {
            return Err(TraceError::Invalid(format!("a repository name of {} bytes", t.repository.len())));
        }
        if let Some(e) = t.entries.iter().find(|e| e.path.len() > MAX_NAME_BYTES) {
            return Err(TraceError::Invalid(format!("an entry's path of {} bytes", e.path.len())));
        }
        Ok(t)
    }
}

// ---- keeping traces in the store ----

/// The trace of the image with manifest digest `image`.
pub fn load(store: &Store, image: &str) -> Result<Option<Trace>, TraceError> {
    match store.get_row(Family::Traces, format!("{KEY_IMAGE}{image}").as_bytes())? {
        None => Ok(None),
        Some(raw) => Trace::from_json(&raw).map(Some),
    }
}

/// The trace saved last for any image of `repository` (another version).
pub fn latest_for_repository(store: &Store, repository: &str) -> Result<Option<Trace>, TraceError> {
    match store.get_row(Family::Traces, format!("{KEY_REPO}{repository}").as_bytes())? {
        None => Ok(None),
        Some(image) => load(store, &String::from_utf8_lossy(&image)),
    }
}

/// Serializes every change to the traces family, so a merge (load, merge,
/// save) never loses a run saved meanwhile.
static WRITES: Mutex<()> = parking_lot::const_mutex(());

/// Keep `trace` (replacing the image's earlier one) and make it its
/// repository's latest, in one write.
pub fn save(store: &Store, trace: &Trace) -> Result<(), TraceError> {
    let _w = WRITES.lock();
    save_locked(store, trace)
}

fn save_locked(store: &Store, trace: &Trace) -> Result<(), TraceError> {
    store.write_rows(
        Family::Traces,
        &[
            (format!("{KEY_IMAGE}{}", trace.image).into_bytes(), Some(trace.to_json())),
            (format!("{KEY_REPO}{}", trace.repository).into_bytes(), Some(trace.image.clone().into_bytes())),
        ],
    )?;
    Ok(())
}

/// Forget the trace of `image`. True if there was one.
pub fn delete(store: &Store, image: &str) -> Result<bool, TraceError> {
    let _w = WRITES.lock();
    let Some(t) = load(store, image)? else { return Ok(false) };
    let mut rows = vec![(format!("{KEY_IMAGE}{image}").into_bytes(), None)];
    let repo_key = format!("{KEY_REPO}{}", t.repository).into_bytes();
    if store.get_row(Family::Traces, &repo_key)?.is_some_and(|d| d == image.as_bytes()) {
        rows.push((repo_key, None));
    }
    store.write_rows(Family::Traces, &rows)?;
    Ok(true)
}

/// Every kept trace. One that no longer parses is skipped with a warning.
pub fn list(store: &Store) -> Result<Vec<Trace>, TraceError> {
    let mut out = Vec::new();
    for (k, v) in store.rows(Family::Traces)? {
        if !k.starts_with(KEY_IMAGE.as_bytes()) {
            continue;
        }
        match Trace::from_json(&v) {
            Ok(t) => out.push(t),
            Err(e) => tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "unreadable trace skipped"),
        }
    }
    Ok(out)
}

// ---- recording ----

/// A first access of a frame of a mounted layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkAccess {
    pub layer: Digest,
    pub frame: u32,
    pub chunk: ChunkId,
    pub at: Instant,
}

/// Where reads are reported. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct TraceHook {
    tx: tokio::sync::mpsc::Sender<ChunkAccess>,
    dropped: Arc<AtomicU64>,
    /// Recording sessions open now; with none, reads report nothing.
    listening: Arc<AtomicUsize>,
}

impl TraceHook {
    /// A hook that always listens (a recorder gates it by its sessions).
    pub fn new(capacity: usize) -> (TraceHook, tokio::sync::mpsc::Receiver<ChunkAccess>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (TraceHook { tx, dropped: Arc::new(AtomicU64::new(0)), listening: Arc::new(AtomicUsize::new(1)) }, rx)
    }

    /// Whether anyone records now: a read checks this before building reports.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed) > 0
    }

    /// Report without waiting: when the channel is full the report is
    /// dropped and counted.
    pub fn report(&self, access: ChunkAccess) {
        if self.tx.try_send(access).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What the prefetcher fetched for an image, to judge it by. A std mutex
/// (the prefetcher locks it too); this module locks it with [`lock`],
/// which takes no poisoning as an error.
pub type Prefetched = Arc<Mutex<HashSet<ChunkId>>>;

/// Counters for metrics and `hyperbox trace`.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub sessions: AtomicU64,
    pub runs_merged: AtomicU64,
    pub empty_runs: AtomicU64,
    pub save_errors: AtomicU64,
    /// Sums over the starts that had a prefetch to judge.
    pub judged_read: AtomicU64,
    pub judged_prefetched: AtomicU64,
    pub judged_hits: AtomicU64,
    /// The latest judged start's ratios (f64 bits; NaN before the first).
    pub last_precision: AtomicU64,
    pub last_recall: AtomicU64,
}

impl RecorderStats {
    fn judged(&self, r: &StartReport) {
        self.judged_read.fetch_add(r.read as u64, Ordering::Relaxed);
        self.judged_prefetched.fetch_add(r.prefetched as u64, Ordering::Relaxed);
        self.judged_hits.fetch_add(r.hits as u64, Ordering::Relaxed);
        self.last_precision.store(r.precision.to_bits(), Ordering::Relaxed);
        self.last_recall.store(r.recall.to_bits(), Ordering::Relaxed);
    }

    /// The latest judged start's (precision, recall), if any.
    pub fn last(&self) -> Option<(f64, f64)> {
        let p = f64::from_bits(self.last_precision.load(Ordering::Relaxed));
        let r = f64::from_bits(self.last_recall.load(Ordering::Relaxed));
        (!p.is_nan()).then_some((p, r))
    }
}

struct Session {
    image: ImageKey,
    layers: HashMap<Digest, Arc<RemoteLayer>>,
    started: Instant,
    last: Instant,
    accesses: Vec<ChunkAccess>,
    seen: HashSet<(Digest, u32)>,
}

#[derive(Default)]
struct Shared {
    sessions: Vec<Session>,
    /// By manifest digest, with when the prefetch began; kept until a start
    /// of the image is judged, or for an hour.
    prefetched: HashMap<String, (Instant, Prefetched)>,
}

/// Records container starts into traces. Cheap to clone.
///
/// The collector holds the store weakly: it never keeps the database open
/// after the snapshotter that owns it is gone.
#[derive(Clone)]
pub struct Recorder {
    hook: TraceHook,
    shared: Arc<Mutex<Shared>>,
    store: std::sync::Weak<Store>,
    max_entries: usize,
    pub stats: Arc<RecorderStats>,
}

impl Recorder {
    /// Start the collector on `rt`. Sessions are merged into `store`.
    pub fn start(store: Arc<Store>, cfg: TraceConfig, rt: &tokio::runtime::Handle) -> Recorder {
        let (hook, mut rx) = TraceHook::new(cfg.queue);
        hook.listening.store(0, Ordering::Relaxed);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stats = Arc::new(RecorderStats::default());
        stats.last_precision.store(f64::NAN.to_bits(), Ordering::Relaxed);
        stats.last_recall.store(f64::NAN.to_bits(), Ordering::Relaxed);
        let weak = Arc::downgrade(&store);
        drop(store);
        let listening = hook.listening.clone();
        let rec = Recorder {
            hook,
            shared: shared.clone(),
            store: weak.clone(),
            max_entries: cfg.max_entries,
            stats: stats.clone(),
        };
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    access = rx.recv() => {
                        let Some(a) = access else { break };
                        let mut sh = shared.lock();
                        for s in sh.sessions.iter_mut().filter(|s| s.layers.contains_key(&a.layer)) {
                            if a.at >= s.started && s.seen.insert((a.layer.clone(), a.frame)) {
                                s.last = a.at;
                                s.accesses.push(a.clone());
                            }
                        }
                    }
                    _ = tick.tick() => {
                        let done = take_finished(&shared, &cfg, false);
                        listening.fetch_sub(done.len(), Ordering::Relaxed);
                        let Some(store) = weak.upgrade() else { break };
                        for (s, prefetched) in done {
                            let (store, stats, max) = (store.clone(), stats.clone(), cfg.max_entries);
                            tokio::task::spawn_blocking(move || finish(&store, s, prefetched, max, &stats));
                        }
                    }
                }
            }
        });
        rec
    }

    /// The hook each mounted layer reports to.
    pub fn hook(&self) -> TraceHook {
        self.hook.clone()
    }

    /// A container of `image` starts on `layers`: record its first reads.
    pub fn begin(&self, image: ImageKey, layers: Vec<Arc<RemoteLayer>>) {
        if layers.is_empty() {
            return;
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(image = %image.digest, layers = layers.len(), "recording a trace");
        let now = Instant::now();
        let layers = layers.into_iter().map(|l| (l.blob.clone(), l)).collect();
        let mut shared = self.shared.lock();
        self.hook.listening.fetch_add(1, Ordering::Relaxed);
        shared.sessions.push(Session {
            image,
            layers,
            started: now,
            last: now,
            accesses: Vec::new(),
            seen: HashSet::new(),
        });
    }

    /// The prefetcher of `image` records here what it fetched.
    pub fn prefetching(&self, image: &str) -> Prefetched {
        let mut sh = self.shared.lock();
        sh.prefetched.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(3600));
        sh.prefetched.entry(image.to_string()).or_insert_with(|| (Instant::now(), Prefetched::default())).1.clone()
    }

    /// End every session now and merge what it saw (at shutdown: a start
    /// cut short still tells which chunks came first). Blocking.
    pub fn flush(&self) {
        let Some(store) = self.store.upgrade() else { return };
        let done = take_finished(&self.shared, &TraceConfig::default(), true);
        self.hook.listening.fetch_sub(done.len(), Ordering::Relaxed);
        for (s, prefetched) in done {
            finish(&store, s, prefetched, self.max_entries, &self.stats);
        }
    }
}

/// Remove the sessions whose window or idle time is over.
fn take_finished(shared: &Mutex<Shared>, cfg: &TraceConfig, all: bool) -> Vec<(Session, Option<Prefetched>)> {
    let now = Instant::now();
    let (window, idle) = (Duration::from_secs(cfg.window_secs), Duration::from_secs(cfg.idle_secs));
    let mut sh = shared.lock();
    let mut done = Vec::new();
    let mut i = 0;
    while i < sh.sessions.len() {
        let s = &sh.sessions[i];
        let over = all
            || now.duration_since(s.started) >= window
            || (!s.accesses.is_empty() && now.duration_since(s.last) >= idle);
        if over {
            let s = sh.sessions.swap_remove(i);
            let p = sh.prefetched.remove(&s.image.digest).map(|(_, p)| p);
            done.push((s, p));
        } else {
            i += 1;
        }
    }
    done
}

/// Turn a session into a run and merge it into the image's trace.
fn finish(store: &Store, s: Session, prefetched: Option<Prefetched>, max_entries: usize, stats: &RecorderStats) {
    if s.accesses.is_empty() {
        // Nothing reached FUSE: the layers were warm in the page cache.
        stats.empty_runs.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(image = %s.image.digest, "no first reads; trace unchanged");
        return;
    }
    let mut files: HashMap<Digest, FileMap> = HashMap::new();
    let run: Vec<TraceEntry> = s
        .accesses
        .iter()
        .map(|a| {
            // Accesses were kept only for the session's layers (the
            // collector filters on `layers`), and their frame numbers come
            // from this daemon's reads of that layer's index: both in range.
            let layer = &s.layers[&a.layer];
            let map = files.entry(a.layer.clone()).or_insert_with(|| FileMap::new(layer));
            let frame = layer.index.frames().get(a.frame as usize);
            let (tar_start, tar_end) = layer.index.frame_tar_range(a.frame as usize);
            let (path, offset) = map.at(layer, tar_start, tar_end);
            TraceEntry {
                layer: a.layer.clone(),
                frame: a.frame,
                chunk: a.chunk,
                c_len: frame.c_len,
                u_len: frame.u_len,
                path,
                offset,
                at_ms: a.at.saturating_duration_since(s.started).as_millis().min(u32::MAX as u128) as u32,
                seen: 1,
            }
        })
        .collect();
    let result = (|| -> Result<Trace, TraceError> {
        let _w = WRITES.lock();
        let mut trace = match load(store, &s.image.digest) {
            Ok(Some(t)) => t,
            Ok(None) => Trace::new(&s.image),
            Err(TraceError::Invalid(e)) => {
                tracing::warn!(image = %s.image.digest, error = %e, "the kept trace is unreadable; starting a new one");
                Trace::new(&s.image)
            }
            Err(e) => return Err(e),
        };
        if let Some(p) = &prefetched {
            let p = p.lock();
            if !p.is_empty() {
                let read: HashSet<ChunkId> = run.iter().map(|e| e.chunk).collect();
                let hits = read.iter().filter(|c| p.contains(c)).count();
                let report = StartReport {
                    at: unix_now(),
                    read: read.len() as u32,
                    prefetched: p.len() as u32,
                    hits: hits as u32,
                    precision: hits as f64 / p.len() as f64,
                    recall: hits as f64 / read.len().max(1) as f64,
                };
                stats.judged(&report);
                trace.last_start = Some(report);
            }
        }
        trace.merge_run(run, max_entries);
        save_locked(store, &trace)?;
        Ok(trace)
    })();
    match result {
        Ok(t) => {
            stats.runs_merged.fetch_add(1, Ordering::Relaxed);
            let (precision, recall) =
                t.last_start.as_ref().map(|r| (r.precision, r.recall)).unwrap_or((f64::NAN, f64::NAN));
            tracing::info!(
                image = %t.image, read = s.accesses.len(), entries = t.entries.len(), runs = t.runs,
                precision, recall, "trace recorded"
            );
        }
        Err(e) => {
            stats.save_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(image = %s.image.digest, error = %e, "trace not saved");
        }
    }
}

/// Which file's data a tar offset falls in, for one layer.
pub(crate) struct FileMap {
    /// (data start, data end, entry number), by start.
    spans: Vec<(u64, u64, usize)>,
}

impl FileMap {
    pub(crate) fn new(layer: &RemoteLayer) -> FileMap {
        let mut spans: Vec<(u64, u64, usize)> = layer
            .index
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.data_len() > 0)
            .map(|(i, e)| (e.data_offset, e.data_offset + e.data_len(), i))
            .collect();
        spans.sort_unstable();
        FileMap { spans }
    }

    /// The first file whose data lies in the frame `[tar, frame_end)`, and
    /// the offset of `tar` in its stored data (0 if the frame starts before
    /// it); "" if no file's data is in the frame.
    pub(crate) fn at(&self, layer: &RemoteLayer, tar: u64, frame_end: u64) -> (String, u64) {
        let k = self.spans.partition_point(|&(_, end, _)| end <= tar);
        match self.spans.get(k) {
            Some(&(start, _, i)) if start < frame_end => {
                let e = &layer.index.entries()[i];
                (String::from_utf8_lossy(&e.path).into_owned(), tar.saturating_sub(start))
            }
            _ => (String::new(), 0),
        }
    }
}

pub mod oci;

#[cfg(test)]
mod tests;
