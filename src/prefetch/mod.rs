//! Trace-driven prefetch: when an image's layers are prepared, fetch the
//! chunks its trace says a start will read, in the order it will read them,
//! before it asks.
//!
//! One job per image, started by the first of its layers to be prepared;
//! later layers join it as containerd prepares them. The job resolves each
//! entry of the trace to frames of the layers ready so far ([`Resolver`]:
//! same layer, else same chunk, else same file) and has the fetcher store
//! them at prefetch priority, in trace order: in windows that grow from
//! `first_window_bytes` to `window_bytes`, each with the later traced
//! frames next to its own in the blob (`neighbours`) and sorted so adjacent
//! frames coalesce into range requests, with at most `in_flight_bytes` on
//! the way ([`Prefetcher::stream`]). The
//! fetcher keeps demand first (its own request slots, served before any
//! prefetch) and joins a demand read of a chunk being prefetched to that
//! fetch. A byte budget caps each job; an optional hydrate pass then fetches
//! every remaining chunk of the image's layers.
//!
//! With no trace for the image's own manifest here, one published to the
//! registry for it is looked for (and kept); failing that, the trace last
//! recorded for another image of the same repository is used: a new tag of
//! an image mostly reads the same files.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fetcher::{Fetcher, Priority};
use crate::layer::RemoteLayer;
use crate::oci::Repo;
use crate::store::Store;
use crate::trace::{self, ImageKey, Prefetched, Recorder, Trace};

mod resolve;
pub use resolve::Resolver;

/// The `[prefetch]` section of the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Prefetch traced chunks when an image's layers are prepared.
    pub enabled: bool,
    /// Compressed bytes one image's traced prefetch may fetch.
    pub max_bytes_per_image: u64,
    /// After the traced chunks, fetch every other chunk of the image too
    /// (for one image: `hyperbox pull --hydrate`).
    pub hydrate: bool,
    /// How long a job waits for the image's next layer before it stops.
    pub layer_wait_secs: u64,
    /// With no trace of its own here, look for one published to the
    /// registry for the image (`hyperbox trace push`) and keep it.
    pub registry_traces: bool,
    /// Failing that, use the trace of another image of the same repository.
    pub use_repository_trace: bool,
    /// Compressed bytes of traced chunks on the way at once.
    pub in_flight_bytes: u64,
    /// The trace is fetched in order, in windows: the first this large,
    /// each next twice the last, up to `window_bytes`.
    pub first_window_bytes: u64,
    pub window_bytes: u64,
    /// A window also takes the traced frames of later windows next to its
    /// own in the blob, up to this many times its own bytes: they share
    /// its range requests. 0: none.
    pub neighbours: u64,
    /// Next to: at most this many bytes apart (the bytes between come
    /// along too). The prefetch's range requests bridge no wider gap.
    pub neighbour_gap_bytes: u64,
    /// Of the bytes a traced prefetch fetches, at most this percentage may
    /// be bytes its trace does not name: the gaps its range requests
    /// bridge. The widest gap bridged is the widest that keeps within it
    /// (the narrowest gaps first: each saves a request, whatever its
    /// size), and at most `neighbour_gap_bytes`. 100: no limit.
    pub gap_pct: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes_per_image: 2 << 30,
            hydrate: false,
            layer_wait_secs: 10,
            registry_traces: true,
            use_repository_trace: true,
            in_flight_bytes: 8 << 20,
            first_window_bytes: 256 << 10,
            window_bytes: 4 << 20,
            neighbours: 3,
            neighbour_gap_bytes: 128 << 10,
            gap_pct: 3,
        }
    }
}

impl PrefetchConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.layer_wait_secs == 0 {
            return Err("prefetch.layer_wait_secs must be more than 0".into());
        }
        if self.gap_pct > 100 {
            return Err("prefetch.gap_pct is a percentage: at most 100".into());
        }
        for (name, v) in [
            ("in_flight_bytes", self.in_flight_bytes),
            ("first_window_bytes", self.first_window_bytes),
            ("window_bytes", self.window_bytes),
        ] {
            if v < 64 << 10 {
                return Err(format!("prefetch.{name} must be at least 65536 (64 KiB)"));
            }
        }
        Ok(())
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct PrefetchStats {
    pub jobs: AtomicU64,
    /// Frames asked of the fetcher (stored ones cost nothing), and their
    /// compressed bytes.
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

struct Job {
    layers: Mutex<Vec<Arc<RemoteLayer>>>,
    arrived: tokio::sync::Notify,
    hydrate: std::sync::atomic::AtomicBool,
}

/// Starts and tracks prefetch jobs. Cheap to clone.
#[derive(Clone)]
pub struct Prefetcher {
    fetcher: Fetcher,
    store: Arc<Store>,
    recorder: Option<Recorder>,
    cfg: PrefetchConfig,
    rt: tokio::runtime::Handle,
    jobs: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    /// Images the registry had no trace of, and when: their other layers
    /// (prepared one by one) do not ask it again for a while.
    no_trace: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    pub stats: Arc<PrefetchStats>,
}

/// How long "no trace anywhere" is believed.
const NO_TRACE_TTL: Duration = Duration::from_secs(60);

impl Prefetcher {
    pub fn new(
        fetcher: Fetcher,
        store: Arc<Store>,
        recorder: Option<Recorder>,
        cfg: PrefetchConfig,
        rt: tokio::runtime::Handle,
    ) -> Prefetcher {
        Prefetcher {
            fetcher,
            store,
            recorder,
            cfg,
            rt,
            jobs: Arc::default(),
            no_trace: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Whether prefetch is on (`prefetch.enabled`).
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// A layer of `image` was prepared: start the image's job, or hand the
    /// layer to the job already running. The job looks for a trace and ends
    /// at once if there is none (and no hydrate was asked for).
    pub fn layer_ready(&self, image: &ImageKey, layer: Arc<RemoteLayer>, hydrate: bool) {
        if !self.cfg.enabled {
            return;
        }
        let hydrate = hydrate || self.cfg.hydrate;
        let job = {
            let mut jobs = self.jobs.lock();
            if let Some(job) = jobs.get(&image.digest) {
                let mut layers = job.layers.lock();
                if !layers.iter().any(|l| l.blob == layer.blob) {
                    layers.push(layer);
                }
                drop(layers);
                if hydrate {
                    job.hydrate.store(true, Ordering::Relaxed);
                }
                job.arrived.notify_one();
                return;
            }
            let job = Arc::new(Job {
                layers: Mutex::new(vec![layer]),
                arrived: tokio::sync::Notify::new(),
                hydrate: hydrate.into(),
            });
            jobs.insert(image.digest.clone(), job.clone());
            job
        };
        let this = self.clone();
        let image = image.clone();
        self.rt.spawn(async move {
            let started = std::time::Instant::now();
            let trace = this.find_trace(&image).await;
            if trace.is_none() && !job.hydrate.load(Ordering::Relaxed) {
                this.jobs.lock().remove(&image.digest);
                return;
            }
            this.stats.jobs.fetch_add(1, Ordering::Relaxed);
            let prefetched = this.recorder.as_ref().map(|r| r.prefetching(&image.digest)).unwrap_or_default();
            let (frames, bytes) = this.run(&image, &job, trace, &prefetched).await;
            this.jobs.lock().remove(&image.digest);
            tracing::info!(
                image = %image.digest, frames, bytes, secs = started.elapsed().as_secs_f64(), "prefetch done"
            );
        });
    }

    /// The image's own trace here, else one published for it to the
    /// registry (kept here), else its repository's latest here.
    async fn find_trace(&self, image: &ImageKey) -> Option<Trace> {
        let warn = |e: trace::TraceError| tracing::warn!(image = %image.digest, error = %e, "trace lookup failed");
        match trace::load(&self.store, &image.digest) {
            Ok(Some(t)) => return Some(t),
            Ok(None) => {}
            Err(e) => warn(e),
        }
        let repo = image
            .repository
            .split_once('/')
            .map(|(registry, name)| Repo { registry: registry.into(), name: name.into() });
        let asked_lately = {
            let mut none = self.no_trace.lock();
            none.retain(|_, at| at.elapsed() < NO_TRACE_TTL);
            none.contains_key(&image.digest)
        };
        if let (true, false, Some(repo), Ok(digest)) =
            (self.cfg.registry_traces, asked_lately, repo, image.digest.parse())
        {
            match trace::oci::find(self.fetcher.client(), &repo, &digest).await {
                Ok(Some(mut t)) => {
                    // It serves this repository's other versions too, under
                    // the name this node knows it by.
                    t.repository = image.repository.clone();
                    tracing::info!(image = %image.digest, runs = t.runs, chunks = t.entries.len(), "trace found in the registry");
                    if let Err(e) = trace::save(&self.store, &t) {
                        warn(e);
                    }
                    return Some(t);
                }
                Ok(None) => {
                    self.no_trace.lock().insert(image.digest.clone(), std::time::Instant::now());
                }
                Err(e) => warn(e),
            }
        }
        if !self.cfg.use_repository_trace {
            return None;
        }
        match trace::latest_for_repository(&self.store, &image.repository) {
            Ok(Some(t)) => {
                tracing::info!(image = %image.digest, from = %t.image, "no trace of this image; using its repository's latest");
                Some(t)
            }
            Ok(None) => None,
            Err(e) => {
                warn(e);
                None
            }
        }
    }

    /// Returns the frames asked for and their compressed bytes.
    async fn run(&self, image: &ImageKey, job: &Job, trace: Option<Trace>, prefetched: &Prefetched) -> (u64, u64) {
        let entries = trace.map(|t| t.entries).unwrap_or_default();
        let mut pending: Vec<usize> = (0..entries.len()).collect();
        let (mut frames_asked, mut spent) = (0u64, 0u64);
        let mut asked: HashSet<(usize, usize)> = HashSet::new();
        let wait = Duration::from_secs(self.cfg.layer_wait_secs);
        'traced: while !pending.is_empty() {
            let layers = job.layers.lock().clone();
            for l in &layers {
                self.fetcher.note_traced(&l.blob);
            }
            let mut resolver = Resolver::new(&layers);
            // Entries resolved now, their frames in trace order.
            let mut unresolved = Vec::new();
            let mut order: Vec<(usize, usize, u64)> = Vec::new();
            let mut progressed = false;
            let mut full = false;
            for &e in &pending {
                match resolver.resolve(&entries[e]) {
                    None => unresolved.push(e),
                    Some((li, frames)) => {
                        progressed = true;
                        for f in frames {
                            if !asked.insert((li, f)) {
                                continue;
                            }
                            let frame = layers[li].index.frames().get(f);
                            prefetched.lock().insert(frame.id);
                            order.push((li, f, frame.c_len as u64));
                            spent += frame.c_len as u64;
                            frames_asked += 1;
                        }
                        if spent >= self.cfg.max_bytes_per_image {
                            full = true;
                            break;
                        }
                    }
                }
            }
            // The start reads these: what is fetched of them waits for it,
            // verified, in memory (`fetch.ready_mb`).
            self.fetcher.expect_reads(order.iter().map(|&(li, f, _)| layers[li].index.frames().get(f).id));
            self.stream(image, &layers, &order).await;
            if full {
                tracing::info!(image = %image.digest, bytes = spent, "prefetch budget reached");
                break 'traced;
            }
            pending = unresolved;
            if pending.is_empty() {
                break;
            }
            // The rest belong to layers not prepared yet: wait for the next.
            if !progressed && tokio::time::timeout(wait, job.arrived.notified()).await.is_err() {
                tracing::debug!(image = %image.digest, left = pending.len(), "no more layers; traced entries left");
                break;
            }
            if progressed {
                // Give a layer that arrived meanwhile a chance before looping.
                let _ = tokio::time::timeout(Duration::from_millis(50), job.arrived.notified()).await;
            }
        }
        self.stats.frames.fetch_add(frames_asked, Ordering::Relaxed);
        self.stats.bytes.fetch_add(spent, Ordering::Relaxed);
        if job.hydrate.load(Ordering::Relaxed) {
            // Every chunk of every layer; the fetcher skips stored ones.
            let mut done = 0;
            loop {
                let layers = job.layers.lock().clone();
                for layer in &layers[done..] {
                    let all: Vec<usize> = (0..layer.index.frames().len()).collect();
                    if let Err(e) = self.fetcher.fetch_into_store(layer, &all, Priority::Prefetch).await {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(image = %image.digest, layer = %layer.blob, error = %e, "hydrate failed");
                    }
                }
                done = layers.len();
                if tokio::time::timeout(Duration::from_secs(2), job.arrived.notified()).await.is_err() {
                    break;
                }
            }
            tracing::info!(image = %image.digest, layers = done, "hydrated");
        }
        (frames_asked, spent)
    }

    /// Fetch `order`'s frames (layer, frame, compressed bytes) into the
    /// store in the order given, so that what a start reads first arrives
    /// first: cut into windows in that order, small at first and doubling
    /// to `window_bytes`, each with its traced neighbours ([`windows`]) and
    /// sorted by layer and place to coalesce into range requests. Windows
    /// go out in order, in pieces, with at most `in_flight_bytes` on the way
    /// at once: a read the trace did not foresee, or one that got ahead of
    /// the prefetch, then waits behind no more than that on the link. A
    /// piece frees its share as soon as it is stored, so the next window
    /// does not wait for the slowest request of the last.
    async fn stream(&self, image: &ImageKey, layers: &[Arc<RemoteLayer>], order: &[(usize, usize, u64)]) {
        let budget = self.cfg.in_flight_bytes.max(64 << 10);
        let gate = tokio::sync::Semaphore::new((budget >> 10) as usize);
        let range = |li: usize, f: usize| layers[li].index.frame_blob_range(f);
        let traced: u64 = order.iter().map(|&(_, _, len)| len).sum();
        let gap = match self.cfg.gap_pct {
            100.. => self.cfg.neighbour_gap_bytes,
            pct => widest_gap(order, range, traced.saturating_mul(pct) / 100, self.cfg.neighbour_gap_bytes),
        };
        tracing::info!(image = %image.digest, frames = order.len(), traced, gap, "prefetch planned");
        let rules = crate::fetcher::Rules { gap, max: self.fetcher.config().max_request_bytes };
        let windows =
            windows(order, self.cfg.first_window_bytes, self.cfg.window_bytes, self.cfg.neighbours, rules, range);
        let mut parts: Vec<(Arc<RemoteLayer>, Vec<usize>)> = Vec::new();
        for (window, _) in windows {
            let mut by_layer: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
            for (li, f) in window {
                by_layer.entry(li).or_default().push(f);
            }
            for (li, mut frames) in by_layer {
                frames.sort_unstable();
                if let Some(layer) = layers.get(li) {
                    parts.push((layer.clone(), frames));
                }
            }
        }
        // join_all polls in order: the windows queue at the gate in trace
        // order, each in pieces that free their share as they are stored.
        let gate = &gate;
        let fetches = parts.iter().map(|(layer, frames)| async move {
            (layer, self.fetcher.fetch_gated(gate, budget, gap, layer, frames).await)
        });
        for (layer, result) in futures_util::future::join_all(fetches).await {
            if let Err(e) = result {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(image = %image.digest, layer = %layer.blob, error = %e, "prefetch failed");
            }
        }
    }
}

/// The widest gap a traced prefetch's range requests may bridge, at most
/// `cap`: bridging every gap up to it between `order`'s frames (layer,
/// frame, compressed bytes) next to each other in their blob brings at
/// most `budget` bytes the trace does not name. Each gap bridged saves a
/// request whatever its width, so the narrowest go first.
///
/// What the prefetch fetches stays within that: a window's request bridges
/// only gaps of up to this width, and the untraced bytes of such a gap are
/// untraced stretches between traced frames, each as narrow.
fn widest_gap(order: &[(usize, usize, u64)], range: impl Fn(usize, usize) -> (u64, u64), budget: u64, cap: u64) -> u64 {
    let mut places: Vec<(usize, u64, u64)> = order
        .iter()
        .map(|&(li, f, _)| {
            let (s, e) = range(li, f);
            (li, s, e)
        })
        .collect();
    places.sort_unstable();
    let mut gaps: Vec<u64> = places
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1.saturating_sub(w[0].2))
        .filter(|&g| g > 0 && g <= cap)
        .collect();
    gaps.sort_unstable();
    // Gaps of one width are bridged all or none.
    let (mut widest, mut spent) = (0, 0u64);
    for (i, &g) in gaps.iter().enumerate() {
        spent = spent.saturating_add(g);
        if gaps.get(i + 1) != Some(&g) {
            if spent > budget {
                break;
            }
            widest = g;
        }
    }
    widest
}

/// `order` (layer, frame, compressed bytes; each frame once) cut in order
/// into windows: the first of about `first` bytes of its own, each next
/// one twice the last, up to `max` (a window holds at least one frame).
///
/// Each window also takes the traced frames of later windows that lie next
/// to its own in the blob: within `rules.gap` bytes of one of them, or of a
/// frame taken so, and within `rules.max` bytes of it; up to `neighbours`
/// times the window's own bytes. The start reads them later anyway, and the
/// range request that reaches their place brings them for a few bytes more,
/// rather than another request later. A trace cut in order alone sent 3
/// times the requests of one sorted by place (python: 154 and 49), and a
/// request costs the registry about as much as megabytes of data.
///
/// Returns each window's frames (layer, frame) and compressed bytes.
fn windows(
    order: &[(usize, usize, u64)],
    first: u64,
    max: u64,
    neighbours: u64,
    rules: crate::fetcher::Rules,
    range: impl Fn(usize, usize) -> (u64, u64),
) -> Vec<(Vec<(usize, usize)>, u64)> {
    // Each layer's traced frames in blob order, with their place in `order`.
    let mut by_layer: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (at, &(li, f, _)) in order.iter().enumerate() {
        by_layer.entry(li).or_default().push((f, at));
    }
    for frames in by_layer.values_mut() {
        frames.sort_unstable();
    }
    let mut taken = vec![false; order.len()];
    let (max, mut size) = (max.max(1), first.clamp(1, max.max(1)));
    let mut out = Vec::new();
    let mut next = 0;
    while next < order.len() {
        let (mut own, mut bytes) = (Vec::new(), 0u64);
        while let Some(&(li, f, len)) = order.get(next) {
            if !taken[next] {
                if !own.is_empty() && bytes + len > size {
                    break;
                }
                taken[next] = true;
                own.push((li, f));
                bytes += len;
            }
            next += 1;
        }
        if own.is_empty() {
            break;
        }
        size = size.saturating_mul(2).min(max);
        let mut budget = bytes.saturating_mul(neighbours);
        let mut frames = own.clone();
        own.sort_unstable();
        for &(li, f) in &own {
            let Some(list) = by_layer.get(&li) else { continue };
            let Ok(k) = list.binary_search_by_key(&f, |&(g, _)| g) else { continue };
            let (start, end) = range(li, f);
            // Onwards in the blob, then back.
            for forward in [true, false] {
                let (mut lo, mut hi) = (start, end);
                let mut j = k;
                while budget > 0 {
                    let step = if forward { j.checked_add(1).filter(|&j| j < list.len()) } else { j.checked_sub(1) };
                    let Some(step) = step else { break };
                    j = step;
                    let (g, at) = list[j];
                    let (s, e) = range(li, g);
                    let near = if forward { s.saturating_sub(hi) } else { lo.saturating_sub(e) };
                    if near > rules.gap || e.max(end).saturating_sub(s.min(start)) > rules.max {
                        break;
                    }
                    (lo, hi) = (lo.min(s), hi.max(e));
                    if !std::mem::replace(&mut taken[at], true) {
                        frames.push((li, g));
                        let len = e.saturating_sub(s);
                        bytes += len;
                        budget = budget.saturating_sub(len);
                    }
                }
            }
        }
        out.push((frames, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{widest_gap, windows};
    use crate::fetcher::Rules;

    /// Frames of `len` bytes laid end to end, every layer alike.
    fn laid(len: u64) -> impl Fn(usize, usize) -> (u64, u64) {
        move |_, f| (f as u64 * len, (f as u64 + 1) * len)
    }

    fn frames(w: &[(Vec<(usize, usize)>, u64)]) -> Vec<Vec<usize>> {
        w.iter().map(|(w, _)| w.iter().map(|e| e.1).collect()).collect()
    }

    #[test]
    fn windows_keep_the_order_and_double_up_to_the_most() {
        let rules = Rules { gap: 1 << 20, max: 4 << 20 };
        let order: Vec<(usize, usize, u64)> = (0..40).map(|i| (i % 2, i, 100)).collect();
        let w = windows(&order, 200, 800, 0, rules, laid(100));
        let sizes: Vec<u64> = w.iter().map(|(_, b)| *b).collect();
        assert_eq!(sizes, [200, 400, 800, 800, 800, 800, 200]);
        let flat: Vec<usize> = frames(&w).concat();
        assert_eq!(flat, (0..40).collect::<Vec<_>>(), "every frame once, in order");
        // A frame larger than a window is a window of its own.
        let big = [(0, 0, 5000), (0, 1, 10), (0, 2, 10)];
        let w = windows(&big, 100, 1000, 0, rules, |_, f| [(0, 5000), (5000, 5010), (5010, 5020)][f]);
        assert_eq!(w.iter().map(|(w, b)| (w.len(), *b)).collect::<Vec<_>>(), [(1, 5000), (2, 20)]);
        assert!(windows(&[], 1, 1, 3, rules, laid(1)).is_empty());
    }

    #[test]
    fn a_window_takes_later_traced_frames_next_to_its_own() {
        // The trace reads frames 0, 10, 20, 30, then 1, 11, 21, 31, ...
        // (four files read a piece at a time); frames are 100 bytes, end to
        // end.
        let order: Vec<(usize, usize, u64)> = (0..10).flat_map(|k| (0..4).map(move |j| (0, j * 10 + k, 100))).collect();
        let rules = Rules { gap: 50, max: 1000 };
        // Own bytes 200 at first: frames 0 and 10. Each brings up to 2 x 200
        // bytes of its neighbours, onwards from frame 0 first.
        let w = windows(&order, 200, 400, 2, rules, laid(100));
        assert_eq!(frames(&w)[0], [0, 10, 1, 2, 3, 4], "own frames first, in order, then neighbours");
        assert_eq!(w[0].1, 600);
        let mut all: Vec<usize> = frames(&w).concat();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>(), "every frame once");
        // No neighbours past the gap (frames 0, 2, 4, ...: 100 bytes apart),
        // nor past a request's most bytes.
        let spaced: Vec<(usize, usize, u64)> = (0..10).map(|f| (0, f * 2, 100)).collect();
        let w = windows(&spaced, 100, 100, 5, rules, laid(100));
        assert_eq!(w.len(), 10);
        let w = windows(&order, 100, 100, 100, Rules { gap: 50, max: 300 }, laid(100));
        assert_eq!(frames(&w)[0], [0, 1, 2], "frame 3 would make a request of 400 bytes");
        // Neighbours in another layer are not neighbours.
        let two = [(0, 0, 100), (1, 5, 100), (1, 1, 100)];
        let w = windows(&two, 100, 100, 5, rules, laid(100));
        assert_eq!(frames(&w), [vec![0], vec![5], vec![1]]);
    }

    #[test]
    fn the_widest_gap_keeps_untraced_bytes_within_the_budget() {
        // Traced frames of 100 bytes at these places in layer 0, so the
        // gaps between them are 10, 20, 20, 40 and 300 bytes wide; a frame
        // of layer 1 sits between them in offsets but is no neighbour.
        let starts = [0u64, 110, 230, 350, 490, 890];
        let order: Vec<(usize, usize, u64)> =
            (0..starts.len()).rev().map(|f| (0, f, 100)).chain([(1, 0, 100)]).collect();
        let range = |li: usize, f: usize| if li == 0 { (starts[f], starts[f] + 100) } else { (105, 205) };
        let gap = |budget, cap| widest_gap(&order, range, budget, cap);
        assert_eq!(gap(0, 1000), 0, "no budget: only frames end to end");
        assert_eq!(gap(10, 1000), 10);
        // The two gaps of 20 go together or not at all.
        assert_eq!(gap(49, 1000), 10);
        assert_eq!(gap(50, 1000), 20);
        assert_eq!(gap(90, 1000), 40);
        assert_eq!(gap(1 << 20, 1000), 300);
        assert_eq!(gap(1 << 20, 299), 40, "never wider than the cap");
        // Frames end to end cost nothing.
        let laid: Vec<(usize, usize, u64)> = (0..5).map(|f| (0, f, 100)).collect();
        assert_eq!(widest_gap(&laid, |_, f| (f as u64 * 100, f as u64 * 100 + 100), 0, 1000), 0);
    }
}
