//! The fetcher: the read path for chunks of remote layers. It answers from
//! the store, and fetches what the store lacks from the registry, verifies
//! it, stores it, and answers with it.
//!
//! - **Coalescing** ([`plan`], pure and unit-tested): the missing frames of
//!   one call are sorted by position and merged into range requests while
//!   the gap between two is at most `coalesce_gap_bytes` and the request at
//!   most `max_request_bytes`. Frames in a gap come along, are verified and
//!   stored too.
//! - **Single flight** (here): one fetch per chunk id at a time. A reader of
//!   a chunk already on its way waits for that fetch; N readers make one
//!   request. Fetches run in their own task ([`remote`]), so a reader that
//!   gives up (an interrupted FUSE read) cancels nothing others wait for.
//!   A flight keeps the decompressed frames only if a demand read waits on
//!   it when they are verified, and answers those readers before storing.
//!   Otherwise (prefetch, hydration, streaming) it holds just the compressed
//!   chunks, stores them, then answers "stored", and a reader that joined
//!   late reads the store ([`Got`]).
//! - **Budget and priority** ([`sched`]): at most `max_concurrent_requests`
//!   requests at once, at most `max_prefetch_requests` of them prefetch; a
//!   free slot goes to demand first, and a demand read joining a queued
//!   prefetch raises it.
//! - **Retries** ([`retry`], one policy for chunks and indexes): sources are
//!   the registry's mirrors, then the registry ([`Client::pull_sources`]).
//!   Transient failures (transport, 5xx, a 200 for a range, a short body,
//!   bytes that fail verification) are retried with exponential backoff and
//!   jitter; a permanent one (a 4xx) moves to the next source. A read gives
//!   up after one try per mirror and `attempts` at the registry, or once
//!   `timeout_ms` has passed since its first try, with an error
//!   ([`FetchError`], which keeps its typed cause) naming the registry,
//!   repository, blob and chunk.
//! - **Frame cache** ([`cache`]): up to `frame_cache_mb` of the frames that
//!   reads were answered with stay in memory, decompressed and verified.
//!   Small files share frames (a 128 KiB frame holds dozens of Python
//!   modules), and the kernel reads each file on its own: without it, every
//!   one of those reads would fetch, decompress and hash the whole frame from
//!   the store again. Hits refresh the chunks' access times in the store, in
//!   batches.
//!
//! - **Ready frames** ([`ready`]): the frames a traced prefetch fetches
//!   for a start ([`Fetcher::expect_reads`]) are kept as they were verified,
//!   up to `ready_mb`, until the start reads them, so that read does not
//!   decompress and hash them from the store a second time.
//!
//! Nothing leaves this module unverified: every frame is decompressed and
//! hashed before anyone sees it
//! ([`VerifiedChunk::verify`](crate::store::VerifiedChunk::verify)), store
//! hits are verified by the store on read, and the frame cache and the
//! ready frames hold only frames that passed one of those checks (memory
//! is trusted, as the page cache is).

mod cache;
mod config;
mod error;
mod plan;
mod ready;
mod remote;
mod retry;
mod sched;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::digest::{ChunkId, Digest};
use crate::format::{self, FormatError, IndexLocation, LayerIndex};
pub use crate::layer::RemoteLayer;
use crate::metrics::HistogramSnapshot;
use crate::registry::{Client, Repo};
use crate::store::Store;
use cache::{touch_all, FrameCache};
use plan::Planner;
pub(crate) use plan::Rules;
use retry::RetryPolicy;
use sched::Scheduler;
use stats::Counters;

pub use config::{AheadConfig, FetchConfig};
pub use error::{FetchError, TryError};
pub use stats::FetchStats;

/// Who is asking. Demand is a reader waiting now; prefetch is a guess.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    Prefetch = 0,
    Demand = 1,
}

/// What a flight answers: the frame's verified data, or that its chunk is
/// now stored. A flight keeps the data only when a demand read waits on it
/// as it is verified: prefetch and hydration need their chunks stored, not
/// in memory, and a reader that joins later reads the store.
#[derive(Clone, Debug)]
enum Got {
    Data(Bytes),
    Stored,
}

type Answer = Option<Result<Got, FetchError>>;

/// Called once when a read finds frames missing, after their requests are
/// queued ([`Fetcher::read_rest`]).
type OnMiss<'a> = Box<dyn FnOnce() + Send + 'a>;

/// A flight's key: the registry host it is fetched from, and the chunk.
type FlightKey = (Arc<str>, ChunkId);

/// A fetch in flight: its answer, once sent, and the priority of the
/// request carrying it (raised when a demand read joins).
struct Flight {
    rx: watch::Receiver<Answer>,
    prio: Arc<AtomicU8>,
    /// The blob it is fetched from: a reader of another layer that holds the
    /// same chunk does not take this layer's failure as its own.
    blob: Digest,
}

/// Frames fetched in one range request (a [`plan::Request`]): the flights
/// it leads, with their senders, in blob order.
struct Group {
    leads: Vec<Lead>,
    prio: Arc<AtomicU8>,
    /// When the read that made the group was requested: a demand read's
    /// `timeout_ms` runs from here, time queued for a slot included.
    requested: tokio::time::Instant,
}

/// A flight a group leads: its frame, its chunk, and the sender of its answer.
type Lead = (usize, ChunkId, watch::Sender<Answer>);

struct Inner {
    client: Arc<Client>,
    store: Arc<Store>,
    cfg: FetchConfig,
    retry: RetryPolicy,
    sched: Arc<Scheduler>,
    /// Flights by registry host and chunk: a reader joins a fetch of its
    /// chunk from its own registry only, so a registry that stalls holds up
    /// its own images alone, even for chunks other images share (a tar's
    /// end-of-archive blocks, common files).
    inflight: Mutex<HashMap<FlightKey, Flight>>,
    /// Verified frames reads were answered with (`frame_cache_mb`).
    frames: Option<FrameCache>,
    /// Verified frames a traced prefetch fetched, until read (`ready_mb`).
    ready: Option<Arc<ready::Ready>>,
    /// Chunks read from the frame cache whose access time the store has not
    /// been told of yet: told in batches, off the runtime, so that the
    /// store's LRU eviction still sees the hottest chunks as hot.
    untouched: Mutex<Vec<ChunkId>>,
    n: Counters,
    /// When a demand read last waited on the registry (began or ended), in
    /// ms since `epoch`, plus one (0: never): background work yields while
    /// it is recent ([`Fetcher::demand_quiet_for`]).
    demand_at: std::sync::atomic::AtomicU64,
    epoch: Instant,
    /// Layers a trace's prefetch covers ([`Fetcher::note_traced`]).
    traced: Mutex<std::collections::HashSet<Digest>>,
    /// KiB of fetching ahead on the way (`ahead.in_flight_bytes`).
    ahead_gate: Option<tokio::sync::Semaphore>,
}

/// `frames` cut in order into pieces of at most `max` compressed bytes (a
/// piece holds at least one frame, however large), each with its bytes.
/// Frames past the index count nothing here; fetching them fails.
fn pieces<'f>(layer: &RemoteLayer, frames: &'f [usize], max: u64) -> Vec<(&'f [usize], u64)> {
    let table = layer.index.frames();
    let c_len = |f: usize| if f < table.len() { table.get(f).c_len as u64 } else { 0 };
    let mut out = Vec::new();
    let mut start = 0;
    while start < frames.len() {
        let (mut end, mut bytes) = (start, 0u64);
        while end < frames.len() && (end == start || bytes + c_len(frames[end]) <= max) {
            bytes += c_len(frames[end]);
            end += 1;
        }
        out.push((&frames[start..end], bytes));
        start = end;
    }
    out
}

/// What a read found in the frame cache and the store: each frame's
/// verified data, or `None` where it must be fetched.
pub struct Found {
    ids: Vec<ChunkId>,
    out: Vec<Option<Bytes>>,
    /// Which of `out` came from the frame cache (the rest go in).
    cached: Vec<bool>,
}

impl Found {
    fn complete(&self) -> bool {
        self.out.iter().all(Option::is_some)
    }
}

/// [`Fetcher::memory`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FetchMemory {
    pub frame_cache: u64,
    /// Frames a traced prefetch fetched, waiting for their reads.
    pub ready: u64,
    pub fetches: u64,
}

/// Cheap to clone; clones share flights, budget and counters.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    pub fn new(client: Arc<Client>, store: Arc<Store>, cfg: FetchConfig) -> Fetcher {
        let sched =
            Scheduler::new(cfg.max_concurrent_requests, cfg.max_prefetch_requests, cfg.max_requests_per_registry);
        let frames = cache::frame_cache(cfg.frame_cache_mb);
        let ready = ready::Ready::new(cfg.ready_mb, cfg.ready_secs);
        let ahead_gate = match cfg.ahead.in_flight_bytes >> 10 {
            0 => None,
            kib => Some(tokio::sync::Semaphore::new(kib.min(u32::MAX as u64) as usize)),
        };
        Fetcher {
            inner: Arc::new(Inner {
                client,
                store,
                retry: RetryPolicy::new(&cfg),
                cfg,
                sched,
                inflight: Mutex::new(HashMap::new()),
                frames,
                ready,
                untouched: Mutex::new(Vec::new()),
                n: Counters::default(),
                demand_at: Default::default(),
                epoch: Instant::now(),
                traced: Mutex::default(),
                ahead_gate,
            }),
        }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.inner.client
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn stats(&self) -> FetchStats {
        self.inner.n.snapshot()
    }

    /// Range request latency (send to whole body, failures included), for
    /// demand and for prefetch requests.
    pub fn request_latency(&self) -> [(&'static str, HistogramSnapshot); 2] {
        let n = &self.inner.n;
        [("demand", n.demand_latency.snapshot()), ("prefetch", n.prefetch_latency.snapshot())]
    }

    /// How long since a demand read last waited on the registry (one in
    /// progress counts as now); `None` if none ever has.
    pub fn demand_quiet_for(&self) -> Option<Duration> {
        let at = self.inner.demand_at.load(Ordering::Relaxed);
        let at = Duration::from_millis(at.checked_sub(1)?);
        let busy = self.inner.n.demand_waiting.load(Ordering::Relaxed) > 0;
        Some(if busy { Duration::ZERO } else { self.inner.epoch.elapsed().saturating_sub(at) })
    }

    /// Layer `blob` is prefetched by a trace: the trace says what its
    /// starts read, and nothing is fetched ahead of its reads (fetching
    /// ahead is for starts no trace covers).
    pub fn note_traced(&self, blob: &Digest) {
        self.inner.traced.lock().insert(blob.clone());
    }

    /// The start will read these chunks (a trace says so): frames of them
    /// fetched from now on are kept, verified, for that read (`ready_mb`).
    pub fn expect_reads(&self, ids: impl IntoIterator<Item = ChunkId>) {
        if let Some(r) = &self.inner.ready {
            r.expect(ids);
        }
    }

    /// Whether a trace's prefetch has covered layer `blob` in this process.
    pub fn is_traced(&self, blob: &Digest) -> bool {
        self.inner.traced.lock().contains(blob)
    }

    /// Bytes held in memory now: the frame cache's frames, and what
    /// fetches in flight hold (responses received, then their chunks'
    /// compressed copies, until stored).
    pub fn memory(&self) -> FetchMemory {
        FetchMemory {
            frame_cache: self.inner.frames.as_ref().map_or(0, |c| c.weight()),
            ready: self.inner.ready.as_ref().map_or(0, |r| r.bytes()),
            fetches: self.inner.n.held_bytes.load(Ordering::Relaxed),
        }
    }

    /// Count background work (fetching ahead, streaming a layer) as
    /// running until the guard drops: [`Fetcher::settled`] waits for it.
    pub fn background(&self) -> Background {
        self.inner.n.background.fetch_add(1, Ordering::Relaxed);
        Background(self.inner.clone())
    }

    fn note_demand(&self) {
        let ms = self.inner.epoch.elapsed().as_millis() as u64 + 1;
        self.inner.demand_at.fetch_max(ms, Ordering::Relaxed);
    }

    /// Seconds reads have spent waiting on the registry (see
    /// [`Fetcher::read_rest`]).
    pub fn wait_seconds(&self) -> f64 {
        self.inner.n.wait_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// A layer's index: from the store if kept there, else fetched under
    /// the retry policy (mirrors once each, then the registry), verified
    /// against `loc`'s digest and kept. One range request when it is not
    /// local.
    pub async fn layer_index(&self, repo: &Repo, blob: &Digest, loc: &IndexLocation) -> Result<LayerIndex, FetchError> {
        match self.inner.store.get_index(blob) {
            Ok(Some((have, index))) if &have == loc => return Ok(index),
            Ok(_) => {}
            Err(e) => {
                // A row that no longer verifies: drop it and fetch again.
                tracing::warn!(layer = %blob, error = %e, "stored index is unusable; fetching it again");
                self.inner.store.delete_index(blob)?;
            }
        }
        let bad =
            |error: FormatError| FetchError::IndexLocation { layer: format!("{repo}@{blob}"), error: Arc::new(error) };
        // The blob's size is not known here; bounding the length is what matters.
        let end = loc.offset.checked_add(loc.length).and_then(|e| e.checked_add(format::FOOTER_LEN as u64));
        let end = end.ok_or_else(|| {
            bad(FormatError::Corrupt(format!("index at {}+{} is past any blob", loc.offset, loc.length)))
        })?;
        loc.check_bounds(end).map_err(bad)?;
        self.inner.fetch_index(repo, blob, loc).await
    }

    /// Wait until no fetch is in flight (every fetched chunk is stored) and
    /// no background work runs ([`Fetcher::background`]). Readers are
    /// answered before their chunks are written to the store.
    pub async fn settled(&self) {
        while !self.inner.inflight.lock().is_empty() || self.inner.n.background.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The verified data of frames `frames` of `layer`, in that order.
    pub async fn read(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: std::ops::Range<usize>,
        prio: Priority,
    ) -> Result<Vec<Bytes>, FetchError> {
        self.read_frames(layer, &frames.collect::<Vec<_>>(), prio).await
    }

    /// The verified data of the listed frames of `layer`, in that order.
    pub async fn read_frames(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        prio: Priority,
    ) -> Result<Vec<Bytes>, FetchError> {
        self.fetch(layer, frames, prio, self.inner.cfg.coalesce_gap_bytes, true, None).await.0
    }

    /// Frames' data (or, without `want_data`, empty placeholders for those
    /// already stored) from the store, fetching what it lacks in range
    /// requests that bridge gaps of up to `gap` bytes; and how long it
    /// waited for the fetches.
    async fn fetch(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        prio: Priority,
        gap: u64,
        want_data: bool,
        on_miss: Option<OnMiss<'_>>,
    ) -> (Result<Vec<Bytes>, FetchError>, Duration) {
        // A demand read's time runs from now, time queued for a slot included.
        let requested = tokio::time::Instant::now();
        let mut found = match self.from_cache(layer, frames, want_data) {
            Ok(found) => found,
            Err(e) => return (Err(e), Duration::ZERO),
        };
        if !found.complete() {
            let this = self.clone();
            let looked = tokio::task::spawn_blocking(move || {
                let mut found = found;
                this.from_store(&mut found, want_data).map(|()| found)
            });
            found = match looked.await.map_err(|e| FetchError::joined("a store lookup", e)) {
                Ok(Ok(found)) => found,
                Ok(Err(e)) | Err(e) => return (Err(e), Duration::ZERO),
            };
        }
        self.finish(layer, frames, found, prio, gap, want_data, requested, on_miss).await
    }

    /// A demand read answered on the calling thread, without the runtime,
    /// when the frame cache and the store hold every frame: `Ok` with the
    /// answer. It blocks on the store, so it is for threads that may block
    /// (the FUSE readers), and it saves a read the hand-offs to the
    /// runtime and back. `Err` with what was found when something must be
    /// fetched: pass it to [`Fetcher::read_rest`].
    pub fn read_local(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
    ) -> Result<Result<Vec<Bytes>, FetchError>, Found> {
        let mut found = match self.from_cache(layer, frames, true) {
            Ok(found) => found,
            Err(e) => return Ok(Err(e)),
        };
        if !found.complete() {
            if let Err(e) = self.from_store(&mut found, true) {
                return Ok(Err(e));
            }
            if !found.complete() {
                return Err(found);
            }
        }
        Ok(check_lengths(layer, frames, found.out.into_iter().flatten().collect()).inspect(|data| {
            self.cache_new(&found.ids, &found.cached, data);
        }))
    }

    /// The rest of a demand read [`Fetcher::read_local`] could not answer:
    /// fetch what is missing, calling `on_miss` once the requests for it
    /// are queued (whatever it queues in turn goes after them); with how
    /// long it waited for them. The wait is counted in
    /// [`Fetcher::wait_seconds`] too.
    pub async fn read_rest(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        found: Found,
        on_miss: impl FnOnce() + Send,
    ) -> (Result<Vec<Bytes>, FetchError>, Duration) {
        let requested = tokio::time::Instant::now();
        let gap = self.inner.cfg.coalesce_gap_bytes;
        self.finish(layer, frames, found, Priority::Demand, gap, true, requested, Some(Box::new(on_miss))).await
    }

    /// The first look of a read: which frames the frame cache holds, or a
    /// traced prefetch kept for it (only reads look there: prefetch and
    /// hydration only need frames stored, and do not fill the cache).
    fn from_cache(&self, layer: &RemoteLayer, frames: &[usize], want_data: bool) -> Result<Found, FetchError> {
        let table = layer.index.frames();
        if let Some(&bad) = frames.iter().find(|&&i| i >= table.len()) {
            return Err(FetchError::NoSuchFrame { layer: layer.name(), frame: bad, frames: table.len() });
        }
        let ids: Vec<ChunkId> = frames.iter().map(|&i| table.get(i).id).collect();
        let mut out: Vec<Option<Bytes>> = match self.inner.frames.as_ref().filter(|_| want_data) {
            Some(c) => ids.iter().map(|id| c.get(id)).collect(),
            None => vec![None; ids.len()],
        };
        let cached: Vec<bool> = out.iter().map(Option::is_some).collect();
        let hits = cached.iter().filter(|&&c| c).count();
        let n = &self.inner.n;
        if hits > 0 {
            n.cache_hits.fetch_add(hits as u64, Ordering::Relaxed);
            n.store_hits.fetch_add(hits as u64, Ordering::Relaxed);
            self.note_cache_hits(ids.iter().zip(&cached).filter(|(_, &c)| c).map(|(id, _)| *id));
        }
        // Then frames a traced prefetch kept for this read. They go in the
        // frame cache after (not `cached`), like frames from the store.
        if let Some(r) = self.inner.ready.as_ref().filter(|_| want_data && hits < ids.len()) {
            let taken = r.take_into(&ids, &mut out);
            n.ready_hits.fetch_add(taken, Ordering::Relaxed);
            n.store_hits.fetch_add(taken, Ordering::Relaxed);
        }
        Ok(Found { ids, out, cached })
    }

    /// The second look: the store, for what the frame cache lacked
    /// (verified there). Blocks: off the runtime's workers.
    fn from_store(&self, found: &mut Found, want_data: bool) -> Result<(), FetchError> {
        let rest: Vec<ChunkId> =
            found.ids.iter().zip(&found.out).filter(|(_, o)| o.is_none()).map(|(id, _)| *id).collect();
        let local = self.local(&rest, want_data)?;
        self.inner.n.store_hits.fetch_add(local.iter().filter(|o| o.is_some()).count() as u64, Ordering::Relaxed);
        for (o, f) in found.out.iter_mut().filter(|o| o.is_none()).zip(local) {
            *o = f;
        }
        Ok(())
    }

    /// Fetch what `found` lacks, and put what the frame cache did not
    /// hold in it; with how long the read waited.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        found: Found,
        prio: Priority,
        gap: u64,
        want_data: bool,
        requested: tokio::time::Instant,
        on_miss: Option<OnMiss<'_>>,
    ) -> (Result<Vec<Bytes>, FetchError>, Duration) {
        let n = &self.inner.n;
        let Found { ids, out, cached } = found;
        let (result, waited) = if out.iter().all(Option::is_some) {
            (Ok(out.into_iter().flatten().collect()), Duration::ZERO)
        } else {
            let waiting = Instant::now();
            let missing = self.fetch_missing(layer, frames, &ids, out, prio, gap, want_data, requested, on_miss);
            let result = match prio {
                Priority::Demand => {
                    self.note_demand();
                    let _waiting = DemandWaiting::new(&n.demand_waiting);
                    // The reader waits at most `timeout_ms` from its request,
                    // whoever leads the flights it waits for. A little grace:
                    // flights this read leads have the same deadline, and
                    // their own error (which try timed out, and where) is
                    // the one to report.
                    let ms = self.inner.cfg.timeout_ms;
                    let deadline = requested + Duration::from_millis(ms + (ms / 10).max(50));
                    match tokio::time::timeout_at(deadline, missing).await {
                        Ok(result) => result,
                        Err(_) => Err(FetchError::Waited {
                            layer: layer.name(),
                            frames: frames.len(),
                            ms: self.inner.cfg.timeout_ms,
                        }),
                    }
                }
                Priority::Prefetch => missing.await,
            };
            let waited = waiting.elapsed();
            if prio == Priority::Demand {
                self.note_demand();
                n.wait_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
            }
            (result, waited)
        };
        // The data of a frame is exactly as long as the index says (what
        // `ReadPlan::assemble` relies on). A chunk is verified by its id, so
        // an index giving one id two lengths gets the other length's data
        // for one of them: refused here, whatever the index decoder let by.
        let result = match (want_data, result) {
            (true, Ok(data)) => check_lengths(layer, frames, data),
            (_, result) => result,
        };
        if let (true, Ok(data)) = (want_data, &result) {
            self.cache_new(&ids, &cached, data);
        }
        (result, waited)
    }

    /// What the frame cache did not hold, from the store or the registry,
    /// goes in.
    fn cache_new(&self, ids: &[ChunkId], cached: &[bool], data: &[Bytes]) {
        if let Some(c) = &self.inner.frames {
            for ((id, data), _) in ids.iter().zip(data).zip(cached).filter(|(_, &c)| !c) {
                c.insert(*id, data.clone());
            }
        }
    }

    /// The rest of [`Fetcher::fetch`]: lead or join the fetches of the
    /// frames `out` lacks.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_missing(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        ids: &[ChunkId],
        mut out: Vec<Option<Bytes>>,
        prio: Priority,
        gap: u64,
        want_data: bool,
        requested: tokio::time::Instant,
        mut on_miss: Option<OnMiss<'_>>,
    ) -> Result<Vec<Bytes>, FetchError> {
        // A flight can end without an answer for us: its task died, or it
        // failed fetching another layer's copy of the chunk. Then we look
        // again and lead ourselves, a bounded number of times.
        let mut last_err = None;
        for _ in 0..3 {
            // Positions still missing, by chunk: a chunk listed at several
            // positions (the same content twice in a layer) is one flight.
            let mut at: HashMap<ChunkId, Vec<usize>> = HashMap::new();
            let mut missing: Vec<(usize, ChunkId)> = Vec::new();
            for ((o, &frame), &id) in out.iter().zip(frames).zip(ids) {
                if o.is_none() {
                    missing.push((frame, id));
                }
            }
            if missing.is_empty() {
                break;
            }
            for (p, (o, &id)) in out.iter().zip(ids).enumerate() {
                if o.is_none() {
                    at.entry(id).or_default().push(p);
                }
            }
            let waits = self.join_or_lead(layer, missing.into_iter(), prio, gap, requested);
            if let Some(f) = on_miss.take() {
                f();
            }
            // Answers are taken as they come and each receiver dropped once
            // answered; without `want_data` nothing of the data is kept. So
            // a long list (a layer streamed) holds no more than the flights
            // still running, whatever order they end in.
            let mut answers: FuturesUnordered<_> = waits
                .into_iter()
                .map(|(id, mut rx, ours)| async move {
                    let answer = match rx.wait_for(|a| a.is_some()).await {
                        Ok(a) => match a.as_ref() {
                            Some(Ok(Got::Data(data))) if want_data => Some(Ok(Some(data.clone()))),
                            // Stored without its data: read from the store below.
                            Some(Ok(Got::Stored)) if want_data => Some(Ok(None)),
                            Some(Ok(_)) => Some(Ok(Some(Bytes::new()))),
                            Some(Err(e)) => Some(Err(e.clone())),
                            // wait_for returned: an answer is there.
                            None => None,
                        },
                        // The flight ended without an answer: look again.
                        Err(_) => None,
                    };
                    (id, ours, answer)
                })
                .collect();
            let mut stored: Vec<ChunkId> = Vec::new();
            while let Some((id, ours, answer)) = answers.next().await {
                let data = match answer {
                    Some(Ok(Some(data))) => data,
                    Some(Ok(None)) => {
                        stored.push(id);
                        continue;
                    }
                    Some(Err(e)) if ours => return Err(e),
                    Some(Err(e)) => {
                        last_err = Some(e);
                        continue;
                    }
                    None => continue,
                };
                fill(&mut out, &at, id, data);
            }
            if !stored.is_empty() {
                // A chunk the store no longer has (evicted at once, or its
                // write failed) stays missing: the next round fetches it.
                let this = self.clone();
                let looked = tokio::task::spawn_blocking(move || {
                    let found = this.local(&stored, true);
                    found.map(|found| (stored, found))
                });
                let (stored, found) = looked.await.map_err(|e| FetchError::joined("a store lookup", e))??;
                for (id, data) in stored.into_iter().zip(found) {
                    if let Some(data) = data {
                        fill(&mut out, &at, id, data);
                    }
                }
            }
        }
        out.into_iter()
            .zip(ids.iter().copied())
            .map(|(o, id)| {
                o.ok_or_else(|| last_err.clone().unwrap_or(FetchError::Lost { layer: layer.name(), chunk: id }))
            })
            .collect()
    }

    /// Make sure the listed frames are in the store, fetching what is
    /// missing, a window at a time (about `max_prefetch_requests` full
    /// requests), so memory stays bounded however long the list. Frames are
    /// queued in the order given, window by window (prefetch passes trace
    /// order). Nothing is decompressed for frames already stored.
    pub async fn fetch_into_store(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        prio: Priority,
    ) -> Result<(), FetchError> {
        self.store_frames(layer, frames, prio, self.inner.cfg.coalesce_gap_bytes).await
    }

    /// [`Fetcher::fetch_into_store`], bridging gaps of up to `gap` bytes.
    async fn store_frames(
        &self,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
        prio: Priority,
        gap: u64,
    ) -> Result<(), FetchError> {
        let window = (self.inner.cfg.max_prefetch_requests as u64) * self.inner.cfg.max_request_bytes.max(1 << 20);
        for (piece, _) in pieces(layer, frames, window) {
            self.fetch(layer, piece, prio, gap, false, None).await.0?;
        }
        Ok(())
    }

    /// Fetch `frames` (sorted) into the store ahead of the reads that may
    /// want them, at prefetch priority, with at most
    /// `ahead.in_flight_bytes` of all fetching ahead on the way at once: in
    /// pieces of a quarter of that, each waiting its turn. What reads
    /// request meanwhile queues behind no more than that on the link.
    pub async fn fetch_ahead(&self, layer: &Arc<RemoteLayer>, frames: &[usize]) -> Result<(), FetchError> {
        let Some(gate) = self.inner.ahead_gate.as_ref() else {
            return self.fetch_into_store(layer, frames, Priority::Prefetch).await;
        };
        let (budget, gap) = (self.inner.cfg.ahead.in_flight_bytes, self.inner.cfg.coalesce_gap_bytes);
        self.fetch_gated(gate, budget, gap, layer, frames).await
    }

    /// Fetch `frames` (sorted) into the store at prefetch priority, with at
    /// most `budget` bytes on the way at once among all callers sharing
    /// `gate` (a semaphore of `budget` KiB): in pieces of a quarter of it,
    /// each holding its bytes' permits until its chunks are stored. Pieces
    /// queue at the gate in the order they are first polled: the order of
    /// the calls, then blob order within one. Range requests bridge gaps of
    /// up to `gap` bytes.
    pub async fn fetch_gated(
        &self,
        gate: &tokio::sync::Semaphore,
        budget: u64,
        gap: u64,
        layer: &Arc<RemoteLayer>,
        frames: &[usize],
    ) -> Result<(), FetchError> {
        let budget = budget.max(1 << 10);
        let pieces = pieces(layer, frames, (budget / 4).max(64 << 10));
        let fetches = pieces.into_iter().map(|(piece, bytes)| async move {
            // A piece larger than the whole budget waits for all of it.
            let kib = (bytes.div_ceil(1024)).clamp(1, budget >> 10) as u32;
            let _on_the_way =
                gate.acquire_many(kib).await.map_err(|_| FetchError::Cancelled { what: "a gated fetch" })?;
            self.store_frames(layer, piece, Priority::Prefetch, gap).await
        });
        futures_util::future::join_all(fetches).await.into_iter().collect()
    }

    /// Look the chunks up in the store (verified there); blocks. Without
    /// `want_data`, only whether each is there.
    fn local(&self, ids: &[ChunkId], want_data: bool) -> Result<Vec<Option<Bytes>>, FetchError> {
        let store = &self.inner.store;
        let pending = std::mem::take(&mut *self.inner.untouched.lock());
        touch_all(store, &pending);
        ids.iter()
            .map(|id| match want_data {
                true => store.get(id).map(|o| o.map(Bytes::from)),
                false => store.contains(id).map(|c| c.then(Bytes::new)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(FetchError::from)
    }

    /// For each missing chunk, join its flight or start one. Returns what to
    /// wait for, one receiver per distinct chunk; new flights are grouped into
    /// range requests and handed to a task of their own.
    fn join_or_lead(
        &self,
        layer: &Arc<RemoteLayer>,
        missing: impl Iterator<Item = (usize, ChunkId)>,
        prio: Priority,
        gap: u64,
        requested: tokio::time::Instant,
    ) -> Vec<(ChunkId, watch::Receiver<Answer>, bool)> {
        let inner = &self.inner;
        let table = layer.index.frames();
        let mut waits: Vec<(ChunkId, watch::Receiver<Answer>, bool)> = Vec::new();
        // Chunk → its place in `waits`. The same chunk may be listed many
        // times (identical files in one layer): the first place stays.
        let mut seen: HashMap<ChunkId, usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let mut raised = false;
        // Flights and request slots are per registry host: the first source's.
        let host = inner.client.pull_sources(&layer.repo).into_iter().next().unwrap_or_else(|| layer.repo.clone());
        let host: Arc<str> = Arc::from(host.registry.as_str());
        let key = |id: ChunkId| (host.clone(), id);
        {
            let mut inflight = inner.inflight.lock();
            let mut leads: Vec<(usize, ChunkId)> = Vec::new();
            for (frame, id) in missing {
                match seen.entry(id) {
                    std::collections::hash_map::Entry::Occupied(_) => continue,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(waits.len());
                    }
                }
                if let Some(f) = inflight.get(&key(id)) {
                    inner.n.joined.fetch_add(1, Ordering::Relaxed);
                    if prio == Priority::Demand && f.prio.swap(Priority::Demand as u8, Ordering::Relaxed) != prio as u8
                    {
                        raised = true;
                    }
                    waits.push((id, f.rx.clone(), f.blob == layer.blob));
                } else {
                    leads.push((frame, id));
                    // A placeholder until grouped below, in this same lock.
                    waits.push((id, watch::channel(None).1, true));
                }
            }
            leads.sort_unstable_by_key(|&(frame, _)| frame);
            let rules = Rules { gap, max: inner.cfg.max_request_bytes };
            let mut planner = Planner::new(rules, |i| layer.index.frame_blob_range(i));
            for (frame, id) in leads {
                // Every lead was given its place in `waits` above.
                let Some(slot) = seen.get(&id).and_then(|&w| waits.get_mut(w)) else { continue };
                if let Some(f) = inflight.get(&key(id)) {
                    // Became a flight below, as a gap frame of this call
                    // (another frame holds the same chunk).
                    slot.1 = f.rx.clone();
                    continue;
                }
                let added = planner.add(frame);
                if added.request >= groups.len() {
                    groups.push(Group { leads: Vec::new(), prio: Arc::new(AtomicU8::new(prio as u8)), requested });
                }
                let Some(g) = groups.last_mut() else { continue };
                // Frames in the gap come along: make them flights too, so no
                // other reader fetches them meanwhile.
                for gap in added.gap {
                    let gap_id = table.get(gap).id;
                    if !inflight.contains_key(&key(gap_id)) {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(key(gap_id), Flight { rx, prio: g.prio.clone(), blob: layer.blob.clone() });
                        g.leads.push((gap, gap_id, tx));
                    }
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(key(id), Flight { rx: rx.clone(), prio: g.prio.clone(), blob: layer.blob.clone() });
                g.leads.push((frame, id, tx));
                slot.1 = rx;
            }
        }
        if raised {
            inner.sched.kick();
        }
        for g in groups {
            // Queue now, in the call's order of requests (its frames sorted).
            let ticket = inner.sched.enqueue(&host, g.prio.clone());
            let (inner, layer, host) = (inner.clone(), layer.clone(), host.clone());
            tokio::spawn(async move { inner.run_group(layer, host, g, ticket).await });
        }
        waits
    }
}

/// Background work in progress ([`Fetcher::background`]).
pub struct Background(Arc<Inner>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.n.background.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a demand read waiting on the registry while it lives.
struct DemandWaiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> DemandWaiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        DemandWaiting(n)
    }
}

impl Drop for DemandWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `data` at every position of `out` that chunk `id` takes (`at`).
fn fill(out: &mut [Option<Bytes>], at: &HashMap<ChunkId, Vec<usize>>, id: ChunkId, data: Bytes) {
    for &p in at.get(&id).into_iter().flatten() {
        if let Some(o) = out.get_mut(p) {
            *o = Some(data.clone());
        }
    }
}

/// The data of `frames` of `layer`, checked against the lengths the index
/// gives them.
fn check_lengths(layer: &RemoteLayer, frames: &[usize], data: Vec<Bytes>) -> Result<Vec<Bytes>, FetchError> {
    let table = layer.index.frames();
    for (&frame, d) in frames.iter().zip(&data) {
        let f = table.get(frame);
        if d.len() != f.u_len as usize {
            return Err(FetchError::FrameLength {
                layer: layer.name(),
                frame,
                chunk: f.id,
                want: f.u_len,
                got: d.len(),
            });
        }
    }
    Ok(data)
}

/// Owns a group's flights while its task runs: removes them from the
/// in-flight map after the chunks are stored, before an error is sent (so a
/// later read tries afresh rather than joining a failed flight), and, when
/// the task ends in any other way (a panic, the runtime shutting down),
/// removes them and answers every waiter still waiting with an error, so
/// nobody hangs and the next read of those chunks leads a new flight.
struct FlightGuard<'a> {
    inner: &'a Inner,
    layer: String,
    host: Arc<str>,
    leads: Vec<Lead>,
    /// Whether lead k's flight is still in the in-flight map (ours to remove).
    in_map: Vec<bool>,
}

impl<'a> FlightGuard<'a> {
    fn new(inner: &'a Inner, layer: &RemoteLayer, host: Arc<str>, leads: Vec<Lead>) -> Self {
        let in_map = vec![true; leads.len()];
        FlightGuard { inner, layer: layer.name(), host, leads, in_map }
    }

    /// Take the flights out of the in-flight map (once).
    fn release(&mut self) {
        self.take_out(0..self.leads.len());
    }

    /// Take the flights of leads `ks` alone out of the in-flight map, to
    /// answer them before the rest: a reader answered, who then finds the
    /// chunk gone from the store, leads a new flight rather than joining
    /// this one again. A flight someone starts meanwhile for the same chunk
    /// is theirs: the guard's later release leaves it alone.
    fn release_leads(&mut self, ks: &[usize]) {
        self.take_out(ks.iter().copied());
    }

    /// Remove the flights of leads `ks` still in the in-flight map (taking
    /// the lock only if one is).
    fn take_out(&mut self, ks: impl Iterator<Item = usize> + Clone) {
        if !ks.clone().any(|k| self.in_map.get(k) == Some(&true)) {
            return;
        }
        let mut inflight = self.inner.inflight.lock();
        for k in ks {
            if let (Some(in_map), Some(&(_, id, _))) = (self.in_map.get_mut(k), self.leads.get(k)) {
                if std::mem::take(in_map) {
                    inflight.remove(&(self.host.clone(), id));
                }
            }
        }
    }

    /// Answer lead `k`.
    fn answer(&self, k: usize, answer: Result<Got, FetchError>) {
        if let Some((_, _, tx)) = self.leads.get(k) {
            let _ = tx.send(Some(answer));
        }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        // Out of the map first: a waiter woken below that looks again must
        // not find the dead flight.
        self.release();
        for (_, chunk, tx) in &self.leads {
            if tx.borrow().is_none() {
                let _ = tx.send(Some(Err(FetchError::Lost { layer: self.layer.clone(), chunk: *chunk })));
            }
        }
    }
}

#[cfg(test)]
mod tests;
