//! Serves a layer's tree through FUSE (the `fuse/` crate speaks the
//! protocol; this module only implements its plain trait). Errno values are chosen here,
//! in one place.
//!
//! Metadata answers come straight from the in-memory tree. A read is planned
//! on the FUSE thread (which frames, which bytes) and answered there when
//! the frame cache and the store hold its frames. Otherwise it is handed to
//! the tokio runtime with what was found: the fetcher fetches the rest from
//! the registry, and the reply is sent from there. A read waiting on the
//! network holds no FUSE thread.
//!
//! The frames each read needs are reported on a bounded channel (the trace
//! hook); when it is full the report is dropped and counted, never waited on.
//!
//! Every operation's latency (arrival to reply) goes into [`FUSE_OPS`], and
//! the time a read waited on the registry into [`CONTAINER_WAITS`], under
//! the container of the reading process.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use hyperbox_fuse::{Attr, Kind, ReadOnlyFs, ReadReply};

mod ahead;

use crate::fetcher::Fetcher;
use crate::fs::{FsError, LayerTree, NodeAttr, NodeKind};
use crate::layer::RemoteLayer;
use crate::metrics::{Histogram, HistogramSnapshot};
pub use crate::trace::{ChunkAccess, TraceHook};

pub use hyperbox_fuse::{detach, stale_mounts, ConnState, Mount, MountOptions};

/// Latency of the FUSE operations of every layer this process serves.
pub struct FuseOps {
    lookup: Histogram,
    getattr: Histogram,
    readlink: Histogram,
    readdir: Histogram,
    readdirplus: Histogram,
    getxattr: Histogram,
    listxattr: Histogram,
    read: Histogram,
}

pub static FUSE_OPS: FuseOps = FuseOps {
    lookup: Histogram::new(),
    getattr: Histogram::new(),
    readlink: Histogram::new(),
    readdir: Histogram::new(),
    readdirplus: Histogram::new(),
    getxattr: Histogram::new(),
    listxattr: Histogram::new(),
    read: Histogram::new(),
};

impl FuseOps {
    pub fn snapshot(&self) -> Vec<(&'static str, HistogramSnapshot)> {
        vec![
            ("lookup", self.lookup.snapshot()),
            ("getattr", self.getattr.snapshot()),
            ("readlink", self.readlink.snapshot()),
            ("readdir", self.readdir.snapshot()),
            ("readdirplus", self.readdirplus.snapshot()),
            ("getxattr", self.getxattr.snapshot()),
            ("listxattr", self.listxattr.snapshot()),
            ("read", self.read.snapshot()),
        ]
    }
}

/// Time `f` into `h`.
fn timed<T>(h: &Histogram, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    h.observe(t.elapsed());
    r
}

/// Seconds FUSE reads waited on the registry, by container. The kernel
/// names the reading process; its cgroup names the container (containerd's
/// runc shim puts a container in a cgroup whose last part is the container
/// id: `/<namespace>/<id>` with cgroupfs, `cri-containerd-<id>.scope`
/// under systemd). A container's snapshot key is its id, so the daemon
/// keeps the ids of its active snapshots and forgets the rest
/// ([`ContainerWaits::live`]).
pub struct ContainerWaits {
    seconds: Mutex<BTreeMap<String, f64>>,
}

pub static CONTAINER_WAITS: ContainerWaits = ContainerWaits { seconds: Mutex::new(BTreeMap::new()) };

/// More ids than this between two scrapes are not kept (a runaway of short
/// processes in odd cgroups must not grow the map without end).
const MAX_WAITERS: usize = 4096;

impl ContainerWaits {
    /// Kept under the process's candidate container ids (one string, `\n`
    /// between them); [`ContainerWaits::live`] picks the live one.
    fn add(&self, pid: u32, waited: Duration) {
        let candidates = container_candidates(pid);
        if candidates.is_empty() {
            return;
        }
        let key = candidates.join("\n");
        let mut m = self.seconds.lock();
        if m.len() < MAX_WAITERS || m.contains_key(&key) {
            *m.entry(key).or_default() += waited.as_secs_f64();
        }
    }

    /// The waits of containers `is_live` accepts, by id (each entry goes to
    /// its first live candidate); every other entry (a removed container, a
    /// process outside any container) is dropped.
    pub fn live(&self, is_live: impl Fn(&str) -> bool) -> Vec<(String, f64)> {
        let mut m = self.seconds.lock();
        m.retain(|key, _| key.split('\n').any(&is_live));
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for (key, secs) in m.iter() {
            let id = key.split('\n').find(|c| is_live(c)).expect("retained");
            *out.entry(id.to_string()).or_default() += secs;
        }
        out.into_iter().collect()
    }
}

/// The container ids process `pid` may belong to, from its cgroups.
fn container_candidates(pid: u32) -> Vec<String> {
    if pid == 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|t| candidates_from_cgroup(&t)).unwrap_or_default()
}

/// Candidate container ids from a process's cgroups: the last and the
/// second-to-last part (a runtime may put the process in a child cgroup such
/// as `<id>/init`) of the unified (v2) path, then of the v1 `pids`, `memory`
/// and `name=systemd` paths (a hybrid host's unified path may be `/`), each
/// without the runtime's decorations, duplicates dropped.
fn candidates_from_cgroup(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for controller in ["", "pids", "memory", "name=systemd"] {
        for l in text.lines() {
            let mut parts = l.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let ours = if controller.is_empty() {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == controller)
            };
            if !ours {
                continue;
            }
            for part in path.trim_end().rsplit('/').take(2) {
                let part = part.strip_suffix(".scope").unwrap_or(part);
                let part = ["cri-containerd-", "docker-", "crio-", "libpod-"]
                    .iter()
                    .find_map(|pre| part.strip_prefix(pre))
                    .unwrap_or(part);
                if !part.is_empty() && !out.iter().any(|o| o == part) {
                    out.push(part.to_string());
                }
            }
        }
    }
    out
}

/// Allocations of this size or more get their own mapping (glibc's
/// `M_MMAP_THRESHOLD`), for the whole process.
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// glibc malloc arenas for the whole process (`M_ARENA_MAX`).
pub const MALLOC_ARENAS: libc::c_int = 2;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD`]; call once, before any
/// thread starts. By default glibc raises the threshold to the size of each
/// large block freed (up to 32 MiB), after which large buffers (fetched
/// ranges, decoded indexes) come from the heap and pages of them stay
/// resident once freed. It was needed most when every FUSE worker had a
/// 16 MiB request buffer (`benches/fs.rs` measured 10 mounted layers of
/// 30,000 files at 161 MiB RSS with the default, 85 MiB with this;
/// docs/tuning.md); readers now have 64 KiB each. Since then it is
/// 128 KiB: fetched responses and decompressed frames (128 KiB and up)
/// pass through by the hundred MiB while a layer hydrates, and from the
/// heap their pages stayed resident (three images hydrating: peak 348 ->
/// 318 MiB, 310 -> 251 MiB once done; docs/benchmarks.md).
pub fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        // glibc gives each thread that contends an arena of its own, up to
        // 8 per core; freed chunks stay resident in each. Streaming a layer
        // on 8 requests while FUSE workers read took hyperboxd to 377 MiB.
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// One layer, ready to mount.
pub struct LayerFs {
    tree: Arc<LayerTree>,
    remote: Arc<RemoteLayer>,
    fetcher: Fetcher,
    rt: tokio::runtime::Handle,
    trace: Option<TraceHook>,
    /// Fetches ahead of reads that waited (`fetch.ahead`).
    ahead: Option<Arc<ahead::Ahead>>,
}

impl LayerFs {
    pub fn new(
        remote: Arc<RemoteLayer>,
        fetcher: Fetcher,
        rt: tokio::runtime::Handle,
        trace: Option<TraceHook>,
    ) -> Self {
        let tree = Arc::new(LayerTree::new(remote.index.clone()));
        if tree.skipped_links > 0 {
            tracing::warn!(layer = %remote.blob, links = tree.skipped_links, "hard links to missing targets left out");
        }
        let cfg = &fetcher.config().ahead;
        let ahead = cfg
            .enabled
            .then(|| ahead::Ahead::new(cfg.clone(), fetcher.clone(), remote.clone(), tree.clone(), rt.clone()));
        LayerFs { tree, remote, fetcher, rt, trace, ahead }
    }

    /// About how many bytes the layer's tree and index hold in memory.
    pub fn memory(&self) -> usize {
        self.tree.memory()
    }

    pub fn tree(&self) -> &Arc<LayerTree> {
        &self.tree
    }

    /// Mount at `mountpoint`. A read-ahead window that cannot be set is
    /// logged; the mount works with the kernel's default.
    pub fn mount(self, mountpoint: &std::path::Path, opts: &MountOptions) -> std::io::Result<Mount> {
        let name = format!("{}{}", hyperbox_fuse::FSNAME_PREFIX, self.remote.blob);
        let m = hyperbox_fuse::mount(self, mountpoint, &name, opts)?;
        if let Err(e) = m.read_ahead() {
            tracing::warn!(mount = %mountpoint.display(), kb = opts.read_ahead_kb, "read-ahead not set: {e}");
        }
        Ok(m)
    }

    /// Serve the live mount at `mountpoint` on its connection `device`,
    /// which another process set up with `state` (a restart: see
    /// `crate::snapshotter`'s `keep`).
    pub fn adopt(
        self,
        device: std::os::fd::OwnedFd,
        state: ConnState,
        mountpoint: &std::path::Path,
        opts: &MountOptions,
    ) -> std::io::Result<Mount> {
        hyperbox_fuse::adopt(self, device, state, mountpoint, opts)
    }

    /// Report the frames a read needs. Every read that reaches FUSE is
    /// reported (reads the page cache answers never get here); each
    /// recording session keeps only its own first access of a frame, so a
    /// second container of a layer is traced as fully as the first.
    fn record(&self, frames: &[usize]) {
        let Some(hook) = self.trace.as_ref().filter(|h| h.listening()) else { return };
        let now = Instant::now();
        for &f in frames {
            hook.report(ChunkAccess {
                layer: self.remote.blob.clone(),
                frame: f as u32,
                chunk: self.remote.index.frames().get(f).id,
                at: now,
            });
        }
    }
}

/// The errno for each way a filesystem call fails.
fn errno(e: FsError) -> i32 {
    match e {
        FsError::NotFound => libc::ENOENT,
        FsError::NotDir => libc::ENOTDIR,
        FsError::NotFile => libc::EISDIR,
        FsError::NotSymlink => libc::EINVAL,
        FsError::NoAttr => libc::ENODATA,
    }
}

fn kind(k: NodeKind) -> Kind {
    match k {
        NodeKind::File => Kind::File,
        NodeKind::Dir => Kind::Dir,
        NodeKind::Symlink => Kind::Symlink,
        NodeKind::CharDevice | NodeKind::Whiteout => Kind::CharDevice,
        NodeKind::BlockDevice => Kind::BlockDevice,
        NodeKind::Fifo => Kind::Fifo,
    }
}

fn attr(a: NodeAttr) -> Attr {
    Attr {
        ino: a.ino,
        kind: kind(a.kind),
        size: a.size,
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: libc::makedev(a.dev.0, a.dev.1) as u32,
        mtime: a.mtime,
        mtime_nsec: a.mtime_nsec,
    }
}

impl ReadOnlyFs for LayerFs {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, i32> {
        timed(&FUSE_OPS.lookup, || {
            let ino = self.tree.lookup(parent, name).map_err(errno)?;
            self.tree.attr(ino).map(attr).map_err(errno)
        })
    }

    fn getattr(&self, ino: u64) -> Result<Attr, i32> {
        timed(&FUSE_OPS.getattr, || self.tree.attr(ino).map(attr).map_err(errno))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, i32> {
        timed(&FUSE_OPS.readlink, || self.tree.readlink(ino).map(|l| l.to_vec()).map_err(errno))
    }

    fn readdir(&self, ino: u64, offset: u64, add: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool) -> Result<(), i32> {
        timed(&FUSE_OPS.readdir, || {
            self.tree.readdir(ino, offset, &mut |child, next, k, name| add(child, next, kind(k), name)).map_err(errno)
        })
    }

    fn readdirplus(&self, ino: u64, offset: u64, add: &mut dyn FnMut(&Attr, u64, &[u8]) -> bool) -> Result<(), i32> {
        timed(&FUSE_OPS.readdirplus, || {
            let tree = &self.tree;
            let mut missing = None;
            tree.readdir(ino, offset, &mut |child, next, _, name| match tree.attr(child) {
                Ok(a) => add(&attr(a), next, name),
                Err(e) => {
                    missing = Some(e);
                    true
                }
            })
            .map_err(errno)?;
            missing.map_or(Ok(()), |e| Err(errno(e)))
        })
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, i32> {
        timed(&FUSE_OPS.getxattr, || self.tree.getxattr(ino, name).map(|v| v.to_vec()).map_err(errno))
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<u8>, i32> {
        timed(&FUSE_OPS.listxattr, || {
            let mut out = Vec::new();
            for (name, _) in self.tree.xattrs(ino).map_err(errno)? {
                out.extend_from_slice(name);
                out.push(0);
            }
            Ok(out)
        })
    }

    fn read(&self, ino: u64, offset: u64, size: u32, pid: u32, reply: ReadReply) {
        let began = Instant::now();
        let plan = match self.tree.plan_read(ino, offset, size) {
            Ok(p) => p,
            Err(e) => {
                FUSE_OPS.read.observe(began.elapsed());
                return reply.error(errno(e));
            }
        };
        if plan.frames.is_empty() {
            // End of file, or a hole of a sparse file.
            match plan.try_assemble(self.tree.index(), &[] as &[&[u8]]) {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::error!(layer = %self.remote.blob, inode = ino, offset, error = %e, "read failed: EIO");
                    reply.error(libc::EIO);
                }
            }
            return FUSE_OPS.read.observe(began.elapsed());
        }
        self.record(&plan.frames);
        if let Some(a) = &self.ahead {
            a.read(ino);
        }
        // What the frame cache and the store hold is answered here, on this
        // FUSE thread: only a read that must wait on the registry goes to
        // the runtime (thread hand-offs that a local read would pay twice).
        let found = match self.fetcher.read_local(&self.remote, &plan.frames) {
            Ok(result) => {
                answer(&self.remote, ino, offset, &self.tree, &plan, result, reply);
                return FUSE_OPS.read.observe(began.elapsed());
            }
            Err(found) => found,
        };
        let (fetcher, remote, tree) = (self.fetcher.clone(), self.remote.clone(), self.tree.clone());
        let ahead = self.ahead.clone();
        self.rt.spawn(async move {
            let frames = &plan.frames;
            // A read that misses hints at what comes next: fetched ahead,
            // its requests queued behind this read's own.
            let (result, waited) = fetcher
                .read_rest(&remote, frames, found, || {
                    if let Some(a) = &ahead {
                        a.missed(ino, frames)
                    }
                })
                .await;
            answer(&remote, ino, offset, &tree, &plan, result, reply);
            FUSE_OPS.read.observe(began.elapsed());
            if !waited.is_zero() {
                // Reading /proc/<pid>/cgroup may block on the kernel's
                // cgroup lock: off the runtime's workers.
                tokio::task::spawn_blocking(move || CONTAINER_WAITS.add(pid, waited));
            }
        });
    }
}

/// Reply to a read with its frames' data cut to the bytes asked for,
/// written from the frames as they are.
/// Frame data of another length than this index says (a chunk another
/// layer's index lists differently) is an error, as is any fetch error:
/// EIO, and the mount goes on.
fn answer(
    remote: &RemoteLayer,
    ino: u64,
    offset: u64,
    tree: &LayerTree,
    plan: &crate::fs::ReadPlan,
    result: Result<Vec<bytes::Bytes>, crate::fetcher::FetchError>,
    reply: ReadReply,
) {
    let data = match result {
        Ok(data) => data,
        Err(e) => return fail(remote, ino, offset, &e.to_string(), reply),
    };
    match plan.try_slices(tree.index(), &data) {
        Ok(parts) => reply.data_parts(&parts),
        Err(e) => fail(remote, ino, offset, &e.to_string(), reply),
    }
}

fn fail(remote: &RemoteLayer, ino: u64, offset: u64, e: &str, reply: ReadReply) {
    tracing::error!(layer = %remote.blob, repo = %remote.repo, inode = ino, offset, error = %e, "read failed: EIO");
    reply.error(libc::EIO);
}

#[cfg(test)]
mod tests {
    use super::{candidates_from_cgroup, ContainerWaits};
    use parking_lot::Mutex;
    use std::collections::BTreeMap;

    #[test]
    fn container_ids_from_cgroups() {
        let c = |t: &str| candidates_from_cgroup(t);
        // ctr run (cgroupfs, v2): /<namespace>/<id>.
        assert_eq!(c("0::/hyperbox-e2e/app-1\n"), ["app-1", "hyperbox-e2e"]);
        // CRI under systemd.
        let cri = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-0123abc.scope\n";
        assert_eq!(c(cri)[0], "0123abc");
        // A process in a child cgroup of the container's.
        assert_eq!(c("0::/default/web/init\n"), ["init", "web"]);
        // cgroup v1: the pids controller's path.
        let v1 = "12:cpu,cpuacct:/x\n5:pids:/default/web\n1:name=systemd:/default/web\n";
        assert_eq!(c(v1), ["web", "default"]);
        // A hybrid host: the unified path is the root, v1's name the container.
        let hybrid = "9:name=systemd:/\n8:pids:/hb/t1\n4:memory:/hb/t1\n0::/\n";
        assert_eq!(c(hybrid), ["t1", "hb"]);
        // The root cgroup names nothing.
        assert!(c("0::/\n").is_empty());
        assert!(c("8:pids:/\n0::/\n").is_empty());
    }

    #[test]
    fn waits_go_to_the_first_live_candidate() {
        let w = ContainerWaits { seconds: Mutex::new(BTreeMap::new()) };
        w.seconds.lock().insert("init\nweb".into(), 1.5);
        w.seconds.lock().insert("web\ndefault".into(), 0.5);
        w.seconds.lock().insert("gone\nns".into(), 9.0);
        assert_eq!(w.live(|id| id == "web"), [("web".to_string(), 2.0)]);
        // Entries with no live candidate are forgotten.
        assert_eq!(w.seconds.lock().len(), 2);
    }
}
