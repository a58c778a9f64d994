//! Fetching ahead of a layer's reads when no trace said what to fetch: the
//! first start of an image on a node.
//!
//! A start reads one file after another, and each read that misses waits a
//! round trip while the link sits idle. Each read that misses is a hint of
//! what comes next, so this module fetches, in the background and at
//! prefetch priority (demand reads keep their own request slots, and go
//! first):
//!
//! - **the rest of the file**, when it is small enough (`file_bytes`, or
//!   `program_bytes` for a file with an execute bit): shared objects are
//!   read by page faults scattered over them, each a round trip of its own,
//!   and a program being run faults all over its code;
//! - **the directory's small files** (`dir_bytes`, once per directory): an
//!   interpreter importing a module imports its siblings next, and a
//!   package's files sit together in the layer;
//! - **the rest of the layer, in order, when the reads sweep it**
//!   (`find | xargs cat`, a virus scan, a class-path scan): after
//!   `sweep_after` misses in a row, each a little further into the layer
//!   than the one before, or once reads have reached `sweep_files_percent`
//!   of the layer's files (an application start reads far fewer), the
//!   layer is streamed from the reader's place on, on parallel requests,
//!   and then from its start;
//! - optionally, **everything, once the link is idle** (`idle_hydrate_ms`):
//!   a request at a time, pausing whenever a read waits.
//!
//! Layers a trace's prefetch covers are not fetched ahead of (the trace says
//! what their starts read), though a sweep of them is still streamed. Every
//! frame fetched here is verified and stored like any other; a frame already
//! stored costs a lookup.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::fetcher::{AheadConfig, Fetcher, Priority};
use crate::fs::LayerTree;
use crate::layer::RemoteLayer;

/// How far past the previous read that waited the next one may start and
/// still count as a sweep's next step, in bytes of the blob: a directory's
/// other files, fetched ahead, lie between two steps.
const SWEEP_STEP: u64 = 16 << 20;

/// Reads of fewer files than this never make a sweep (unless they are all
/// the layer's files): a layer of a few large files is not streamed whole
/// because one of them was read.
const SWEEP_MIN_FILES: usize = 64;

pub(crate) struct Ahead {
    cfg: AheadConfig,
    fetcher: Fetcher,
    remote: Arc<RemoteLayer>,
    tree: Arc<LayerTree>,
    rt: tokio::runtime::Handle,
    /// Files read that make a sweep (`sweep_files_percent`); 0: never.
    sweep_files: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Files whose rest was considered, and directories whose files were.
    files: HashSet<u64>,
    dirs: HashSet<u64>,
    /// The end, in the blob, of the last read that waited; and how many
    /// such reads in a row each began a little past the one before.
    last_end: Option<u64>,
    run: u32,
    /// Which inodes have been read (a bit each), and how many.
    read: Vec<u64>,
    files_read: usize,
    /// The layer is being streamed whole (a sweep, or idle hydration).
    streaming: bool,
    idle_started: bool,
}

/// What one read that missed leads to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Frames to fetch now, sorted.
    pub frames: Vec<usize>,
    /// Stream the whole layer, from this frame on, then from its start.
    pub sweep_from: Option<usize>,
}

impl Ahead {
    pub(crate) fn new(
        cfg: AheadConfig,
        fetcher: Fetcher,
        remote: Arc<RemoteLayer>,
        tree: Arc<LayerTree>,
        rt: tokio::runtime::Handle,
    ) -> Arc<Ahead> {
        // A layer of a few files is not swept by reading some of them.
        let files = tree.file_count();
        let sweep_files = match cfg.sweep_files_percent {
            0 => 0,
            pct => (files * pct.min(100) as usize).div_ceil(100).max(files.min(SWEEP_MIN_FILES)).max(1),
        };
        Arc::new(Ahead { cfg, fetcher, remote, tree, rt, sweep_files, state: Mutex::new(State::default()) })
    }

    /// Any read of file `ino` (the page cache answers the others): once
    /// reads have reached `sweep_files_percent` of the layer's files, the
    /// rest of the layer is streamed. Whether this read started that.
    pub(crate) fn read(self: &Arc<Self>, ino: u64) -> bool {
        if self.sweep_files == 0 {
            return false;
        }
        let from = {
            let mut st = self.state.lock();
            let (word, bit) = ((ino / 64) as usize, 1u64 << (ino % 64));
            if st.streaming || st.read.get(word).is_some_and(|w| w & bit != 0) {
                return false;
            }
            if st.read.len() <= word {
                st.read.resize(word + 1, 0);
            }
            st.read[word] |= bit;
            st.files_read += 1;
            if st.files_read < self.sweep_files {
                return false;
            }
            st.streaming = true;
            self.tree.file_frames(ino).first().copied().unwrap_or(0)
        };
        tracing::info!(layer = %self.remote.blob, files = self.sweep_files, "reads reached {}% of the layer's files", self.cfg.sweep_files_percent);
        self.stream(from);
        true
    }

    /// A demand read of `frames` (sorted) of file `ino` missed: fetch what
    /// it hints at.
    pub(crate) fn missed(self: &Arc<Self>, ino: u64, frames: &[usize]) {
        let plan = self.plan(ino, frames);
        let idle = self.cfg.idle_hydrate_ms > 0 && !std::mem::replace(&mut self.state.lock().idle_started, true);
        if !plan.frames.is_empty() {
            let this = self.clone();
            let busy = self.fetcher.background();
            self.rt.spawn(async move {
                let _busy = busy;
                if let Err(e) = this.fetcher.fetch_ahead(&this.remote, &plan.frames).await {
                    tracing::debug!(layer = %this.remote.blob, error = %e, "fetch ahead failed");
                }
            });
        }
        if let Some(from) = plan.sweep_from {
            tracing::info!(layer = %self.remote.blob, from, "reads walk the layer forward");
            self.stream(from);
        }
        if idle {
            self.rt.spawn(hydrate_when_idle(Arc::downgrade(self)));
        }
    }

    /// Stream the layer, from frame `from` on, then from its start (the
    /// state says `streaming` already).
    fn stream(self: &Arc<Self>, from: usize) {
        let n = self.remote.index.frames().len();
        let from = from.min(n);
        let order: Vec<usize> = (from..n).chain(0..from).collect();
        tracing::info!(layer = %self.remote.blob, from, frames = n, "reads sweep the layer: streaming it");
        let this = self.clone();
        let busy = self.fetcher.background();
        self.rt.spawn(async move {
            let _busy = busy;
            match this.fetcher.fetch_into_store(&this.remote, &order, Priority::Prefetch).await {
                Ok(()) => tracing::info!(layer = %this.remote.blob, "layer streamed: every chunk is local"),
                Err(e) => {
                    // Reads fetch what they need themselves; a later sweep
                    // may stream again.
                    tracing::warn!(layer = %this.remote.blob, error = %e, "streaming the layer failed");
                    this.state.lock().streaming = false;
                }
            }
        });
    }

    /// What a read of `frames` of `ino` that missed leads to (no I/O).
    pub(crate) fn plan(&self, ino: u64, frames: &[usize]) -> Plan {
        let mut plan = Plan::default();
        // A trace says what this layer's starts read: it is being prefetched.
        if self.fetcher.is_traced(&self.remote.blob) {
            return plan;
        }
        let (Some(&first), Some(&last)) = (frames.first(), frames.last()) else { return plan };
        let index = &self.remote.index;
        let table = index.frames();
        let mut st = self.state.lock();
        if st.streaming {
            return plan;
        }
        let (start, _) = index.frame_blob_range(first);
        let (_, end) = index.frame_blob_range(last);
        st.run = match st.last_end {
            Some(e) if start >= e && start - e <= SWEEP_STEP => st.run + 1,
            _ => 0,
        };
        st.last_end = Some(end);
        if self.cfg.sweep_after > 0 && st.run >= self.cfg.sweep_after {
            st.streaming = true;
            plan.sweep_from = Some(first);
            return plan;
        }
        let mut want: Vec<usize> = Vec::new();
        let c_len = |f: usize| table.get(f).c_len as u64;
        if st.files.insert(ino) && self.cfg.file_bytes > 0 {
            let program = self.tree.attr(ino).is_ok_and(|a| a.perm & 0o111 != 0);
            let cap = match program {
                true => self.cfg.program_bytes.max(self.cfg.file_bytes),
                false => self.cfg.file_bytes,
            };
            let rest: Vec<usize> =
                self.tree.file_frames(ino).into_iter().filter(|f| frames.binary_search(f).is_err()).collect();
            if !rest.is_empty() && rest.iter().map(|&f| c_len(f)).sum::<u64>() <= cap {
                want.extend(rest);
            }
        }
        if let Some(dir) = self.tree.parent(ino).filter(|_| self.cfg.dir_bytes > 0) {
            if st.dirs.insert(dir) {
                let mut budget = self.cfg.dir_bytes;
                let mut seen: HashSet<usize> = frames.iter().copied().collect();
                for (sib, size) in self.tree.sibling_files(ino) {
                    if sib == ino || size > self.cfg.dir_file_max_bytes {
                        continue;
                    }
                    let fs: Vec<usize> = self.tree.file_frames(sib).into_iter().filter(|&f| seen.insert(f)).collect();
                    let cost: u64 = fs.iter().map(|&f| c_len(f)).sum();
                    if cost > budget {
                        break;
                    }
                    budget -= cost;
                    want.extend(fs);
                }
            }
        }
        want.sort_unstable();
        want.dedup();
        plan.frames = want;
        plan
    }
}

/// Once no demand read has waited for `idle_hydrate_ms`, fetch the layer's
/// chunks a request's worth at a time, in order, checking before each that
/// the link is still idle; ends when the layer is unmounted.
async fn hydrate_when_idle(ahead: Weak<Ahead>) {
    let Some(a) = ahead.upgrade() else { return };
    let quiet = Duration::from_millis(a.cfg.idle_hydrate_ms);
    let step = a.fetcher.config().max_request_bytes.max(1 << 20);
    let n = a.remote.index.frames().len();
    drop(a);
    let mut next = 0;
    while next < n {
        let Some(a) = ahead.upgrade() else { return };
        if a.state.lock().streaming {
            return;
        }
        let quiet_for = a.fetcher.demand_quiet_for().unwrap_or(quiet);
        if quiet_for < quiet {
            drop(a);
            tokio::time::sleep(quiet - quiet_for).await;
            continue;
        }
        let table = a.remote.index.frames();
        let (mut end, mut bytes) = (next, 0u64);
        while end < n && (end == next || bytes < step) {
            bytes += table.get(end).c_len as u64;
            end += 1;
        }
        let frames: Vec<usize> = (next..end).collect();
        if let Err(e) = a.fetcher.fetch_into_store(&a.remote, &frames, Priority::Prefetch).await {
            tracing::warn!(layer = %a.remote.blob, error = %e, "idle hydration stopped");
            return;
        }
        next = end;
    }
    if let Some(a) = ahead.upgrade() {
        tracing::info!(layer = %a.remote.blob, "hydrated while idle: every chunk is local");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{RngCore, SeedableRng};

    use super::{Ahead, Plan};
    use crate::fetcher::{AheadConfig, FetchConfig, Fetcher};
    use crate::fs::{LayerTree, ROOT};
    use crate::registry::{Client, RegistryConfig, Repo};
    use crate::store::{Store, StoreConfig};
    use crate::testing::{small_chunks, Layer, LayerBuilder};

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut d);
        d
    }

    /// Directories `a` and `b` of five 20 KiB files each, and `a/big`
    /// (300 KiB); small chunks, so every file spans frames of its own.
    fn two_dirs() -> Layer {
        let mut b = LayerBuilder::new().dir("a").dir("b");
        for d in ["a", "b"] {
            for i in 0..5 {
                b = b.file(&format!("{d}/{i}"), 0o644, &noise(i + if d == "a" { 0 } else { 10 }, 20 << 10));
            }
        }
        b.file("a/big", 0o644, &noise(99, 300 << 10)).convert_with(&small_chunks())
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        _rt: tokio::runtime::Runtime,
        ahead: Arc<Ahead>,
        tree: Arc<LayerTree>,
    }

    fn fixture(layer: &Layer, cfg: AheadConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = Client::new(&RegistryConfig::default(), false).unwrap();
        let store = Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap();
        let fetcher = Fetcher::new(Arc::new(client), Arc::new(store), FetchConfig::default());
        let remote = layer.remote(Repo { registry: "127.0.0.1:9".into(), name: "t".into() });
        let tree = Arc::new(LayerTree::new(layer.index.clone()));
        let ahead = Ahead::new(cfg, fetcher, remote, tree.clone(), rt.handle().clone());
        Fixture { _dir: dir, _rt: rt, ahead, tree }
    }

    fn ino(t: &LayerTree, path: &str) -> u64 {
        path.split('/').fold(ROOT, |d, n| t.lookup(d, n.as_bytes()).unwrap())
    }

    fn frames_of(t: &LayerTree, paths: &[&str]) -> Vec<usize> {
        let mut v: Vec<usize> = paths.iter().flat_map(|p| t.file_frames(ino(t, p))).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn a_read_that_waited_brings_its_directory_and_the_rest_of_its_file() {
        let layer = two_dirs();
        let f = fixture(&layer, AheadConfig { sweep_after: 0, ..AheadConfig::default() });
        let t = &f.tree;
        let big = t.file_frames(ino(t, "a/big"));
        assert!(big.len() > 3, "the big file spans frames");
        // The first frame of a/big waited: the rest of it, and a's small files.
        let plan = f.ahead.plan(ino(t, "a/big"), &big[..1]);
        let mut want = frames_of(t, &["a/0", "a/1", "a/2", "a/3", "a/4"]);
        want.extend(&big[1..]);
        want.sort_unstable();
        assert_eq!(plan, Plan { frames: want, sweep_from: None });
        // Another file of `a`: its directory was done, and it is one frame's
        // worth of the rest.
        let a3 = t.file_frames(ino(t, "a/3"));
        let plan = f.ahead.plan(ino(t, "a/3"), &a3[..1]);
        assert_eq!(plan.frames, a3[1..].to_vec());
        // Nothing of `b` came along.
        let b = frames_of(t, &["b/0", "b/1", "b/2", "b/3", "b/4"]);
        assert!(f.ahead.plan(ino(t, "a/3"), &a3[..1]).frames.iter().all(|x| !b.contains(x)));
    }

    #[test]
    fn nothing_is_fetched_ahead_of_a_layer_a_trace_covers() {
        let layer = two_dirs();
        let f = fixture(&layer, AheadConfig { sweep_after: 0, ..AheadConfig::default() });
        let t = &f.tree;
        let a0 = t.file_frames(ino(t, "a/0"));
        f.ahead.fetcher.note_traced(&layer.digest().clone());
        assert_eq!(f.ahead.plan(ino(t, "a/0"), &a0[..1]), Plan::default());
    }

    #[test]
    fn budgets_bound_what_comes_along() {
        let layer = two_dirs();
        let cfg = AheadConfig { sweep_after: 0, file_bytes: 64 << 10, dir_bytes: 50 << 10, ..AheadConfig::default() };
        let f = fixture(&layer, cfg);
        let t = &f.tree;
        let big = t.file_frames(ino(t, "a/big"));
        let plan = f.ahead.plan(ino(t, "a/big"), &big[..1]);
        // The rest of a/big (about 290 KiB) is over file_bytes; two of a's
        // 20 KiB files fit dir_bytes, the third does not.
        assert!(plan.frames.iter().all(|x| !big.contains(x)), "{plan:?}");
        assert_eq!(plan.frames, frames_of(t, &["a/0", "a/1"]));
        // Files over dir_file_max_bytes never come along as siblings.
        let cfg = AheadConfig { sweep_after: 0, dir_file_max_bytes: 10 << 10, ..AheadConfig::default() };
        let f = fixture(&layer, cfg);
        let t = &f.tree;
        let a0 = t.file_frames(ino(t, "a/0"));
        assert_eq!(f.ahead.plan(ino(t, "a/0"), &a0).frames, big[..0].to_vec());
    }

    #[test]
    fn a_program_comes_along_whole_up_to_its_own_budget() {
        // Two files of 300 KiB, one a program (an execute bit), one not.
        let layer = LayerBuilder::new()
            .dir("bin")
            .file("bin/cc1", 0o755, &noise(7, 300 << 10))
            .file("bin/libbig.so", 0o644, &noise(8, 300 << 10))
            .convert_with(&small_chunks());
        let cfg = AheadConfig {
            sweep_after: 0,
            dir_bytes: 0,
            file_bytes: 64 << 10,
            program_bytes: 1 << 20,
            ..AheadConfig::default()
        };
        let f = fixture(&layer, cfg.clone());
        let t = &f.tree;
        let prog = t.file_frames(ino(t, "bin/cc1"));
        let lib = t.file_frames(ino(t, "bin/libbig.so"));
        assert_eq!(f.ahead.plan(ino(t, "bin/cc1"), &prog[..1]).frames, prog[1..].to_vec());
        assert_eq!(f.ahead.plan(ino(t, "bin/libbig.so"), &lib[..1]).frames, Vec::<usize>::new());
        // A program budget below file_bytes does not shrink it.
        let f = fixture(&layer, AheadConfig { file_bytes: 1 << 20, program_bytes: 0, ..cfg });
        assert_eq!(f.ahead.plan(ino(t, "bin/cc1"), &prog[..1]).frames, prog[1..].to_vec());
        assert_eq!(f.ahead.plan(ino(t, "bin/libbig.so"), &lib[..1]).frames, lib[1..].to_vec());
    }

    #[test]
    fn reads_of_a_share_of_the_files_stream_the_layer() {
        let layer = two_dirs();
        let cfg = AheadConfig { sweep_files_percent: 50, ..AheadConfig::default() };
        let f = fixture(&layer, cfg);
        let t = &f.tree;
        assert_eq!(t.file_count(), 11);
        // Fewer files than SWEEP_MIN_FILES: every one of them must be read
        // (50% would be six); a file read twice counts once.
        for p in ["a/0", "a/0", "a/1", "a/2", "a/3", "a/4", "b/0", "b/1", "b/2", "b/3", "b/4"] {
            assert!(!f.ahead.read(ino(t, p)), "{p}");
        }
        assert!(f.ahead.read(ino(t, "a/big")), "the last file starts the stream");
        assert!(!f.ahead.read(ino(t, "a/big")), "once");
        let a3 = t.file_frames(ino(t, "a/3"));
        assert_eq!(f.ahead.plan(ino(t, "a/3"), &a3[..1]), Plan::default(), "nothing more is planned");
        // A layer of many files streams at the share.
        let many =
            (0..200).fold(LayerBuilder::new().dir("m"), |b, i| b.file(&format!("m/{i:03}"), 0o644, &noise(i, 100)));
        let f = fixture(&many.convert(), AheadConfig { sweep_files_percent: 40, ..AheadConfig::default() });
        let t = &f.tree;
        let started: Vec<bool> = (0..200).map(|i| f.ahead.read(ino(t, &format!("m/{i:03}")))).collect();
        assert_eq!(started.iter().position(|&s| s), Some(79), "the 80th file of 200 is 40%");
        // Off: never.
        let f = fixture(&layer, AheadConfig { sweep_files_percent: 0, ..AheadConfig::default() });
        assert!(["a/0", "a/1", "a/2", "a/3", "a/4", "a/big", "b/0", "b/1", "b/2", "b/3", "b/4"]
            .iter()
            .all(|p| !f.ahead.read(ino(&f.tree, p))));
    }

    #[test]
    fn reads_that_walk_the_layer_forward_stream_it_and_scattered_ones_do_not() {
        let layer = two_dirs();
        let n = layer.index.frames().len();
        let cfg = AheadConfig { sweep_after: 4, file_bytes: 0, dir_bytes: 0, ..AheadConfig::default() };
        // Reads of frames 0, 2, 4, ...: a step forward each time.
        let f = fixture(&layer, cfg.clone());
        let plans: Vec<Plan> = (0..6).map(|k| f.ahead.plan(ROOT, &[2 * k])).collect();
        assert!(plans[..4].iter().all(|p| p.sweep_from.is_none()), "{plans:?}");
        assert_eq!(plans[4].sweep_from, Some(8), "the fifth forward read starts the stream from its place");
        assert_eq!(plans[5], Plan::default(), "once streaming, nothing more is planned");
        // Back and forth: never a sweep.
        let f = fixture(&layer, cfg);
        for k in 0..n {
            let frame = if k % 2 == 0 { n - 1 - k / 2 } else { k / 2 };
            assert_eq!(f.ahead.plan(ROOT, &[frame]).sweep_from, None, "read {k} (frame {frame})");
        }
    }
}
