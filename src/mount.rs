//! Serves a layer's tree through FUSE (the `fuse/` crate names `fuser`; this
//! module only implements its plain trait). Errno values are chosen here,
//! in one place.
//!
//! Metadata answers come straight from the in-memory tree. A read is planned
//! on the FUSE thread (which frames, which bytes), then handed to the tokio
//! runtime: the fetcher answers from the store or the registry, and the reply
//! is sent from there. A read waiting on the network holds no FUSE thread.
//!
//! The frames each read needs are reported on a bounded channel (the trace
//! hook); when it is full the report is dropped and counted, never waited on.

use std::sync::Arc;
use std::time::Instant;

use hyperbox_fuse::{Attr, Kind, ReadOnlyFs, ReadReply};

use crate::fetcher::{Fetcher, Priority, RemoteLayer};
use crate::fs::{FsError, LayerTree, NodeAttr, NodeKind};
pub use crate::trace::{ChunkAccess, TraceHook};

pub use hyperbox_fuse::{detach, stale_mounts, Mount, MountOptions};

/// One layer, ready to mount.
pub struct LayerFs {
    tree: Arc<LayerTree>,
    remote: Arc<RemoteLayer>,
    fetcher: Fetcher,
    rt: tokio::runtime::Handle,
    trace: Option<TraceHook>,
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
        LayerFs { tree, remote, fetcher, rt, trace }
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
        let ino = self.tree.lookup(parent, name).map_err(errno)?;
        self.tree.attr(ino).map(attr).map_err(errno)
    }

    fn getattr(&self, ino: u64) -> Result<Attr, i32> {
        self.tree.attr(ino).map(attr).map_err(errno)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, i32> {
        self.tree.readlink(ino).map(|l| l.to_vec()).map_err(errno)
    }

    fn readdir(&self, ino: u64, offset: u64, add: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool) -> Result<(), i32> {
        self.tree.readdir(ino, offset, &mut |child, next, k, name| add(child, next, kind(k), name)).map_err(errno)
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, i32> {
        self.tree.getxattr(ino, name).map(|v| v.to_vec()).map_err(errno)
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<u8>, i32> {
        let mut out = Vec::new();
        for (name, _) in self.tree.xattrs(ino).map_err(errno)? {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, size: u32, reply: ReadReply) {
        let plan = match self.tree.plan_read(ino, offset, size) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(e)),
        };
        if plan.frames.is_empty() {
            // End of file, or a hole of a sparse file.
            return reply.data(&plan.assemble(self.tree.index(), &[] as &[&[u8]]));
        }
        self.record(&plan.frames);
        let (fetcher, remote, tree) = (self.fetcher.clone(), self.remote.clone(), self.tree.clone());
        self.rt.spawn(async move {
            match fetcher.read_frames(&remote, &plan.frames, Priority::Demand).await {
                Ok(data) => reply.data(&plan.assemble(tree.index(), &data)),
                Err(e) => {
                    tracing::error!(layer = %remote.blob, repo = %remote.repo, inode = ino, offset, error = %e, "read failed: EIO");
                    reply.error(libc::EIO);
                }
            }
        });
    }
}
