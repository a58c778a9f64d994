//! One read-only tree per layer, built from its index. Knows nothing of
//! FUSE: `mount` serves it through the `fuse/` crate.
//!
//! The tree is exactly what the tar holds, in the form overlayfs expects of
//! a lower layer (what containerd's overlayfs snapshotter unpacks):
//! - `.wh.NAME` becomes `NAME`, a character device 0/0 (a whiteout);
//! - `.wh..wh..opq` is not listed; its directory carries the xattr
//!   `trusted.overlay.opaque=y`;
//! - a hard link is another name for its target's inode (`nlink` counts it);
//! - a directory the tar implies but does not list is 0755 root:root;
//! - a path listed twice takes the later entry, as tar extraction does.
//!
//! Reads are planned here ([`LayerTree::plan_read`]: which frames, which
//! bytes of each) and assembled from frame data fetched elsewhere.
//!
//! Inode numbers, readdir cookies and what is synthesized above are a
//! format: a FUSE connection kept across a daemon restart holds them. A
//! change to any of them bumps [`TREE_VERSION`] (`numbering.rs`, with the
//! golden fingerprints that catch it).

use std::collections::HashMap;

use crate::format::index::{OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::format::{file_extents, Entry, EntryKind, Extent, LayerIndex};

mod numbering;
pub use numbering::TREE_VERSION;

pub const ROOT: u64 = 1;
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// An overlayfs whiteout: a character device 0/0.
    Whiteout,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("not a regular file")]
    NotFile,
    #[error("not a symlink")]
    NotSymlink,
    #[error("no such attribute")]
    NoAttr,
}

/// Frame data that does not fit the read it was fetched for: a frame of
/// `got` bytes where the index says `want`. A read that gets it must fail
/// (EIO): the data is not what the index describes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("frame {frame} has {got} bytes of data, the index says {want}")]
pub struct FrameMismatch {
    pub frame: usize,
    pub got: usize,
    pub want: u64,
}

/// What `stat` shows of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAttr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// 07777 bits.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub dev: (u32, u32),
    pub mtime: i64,
    pub mtime_nsec: u32,
}

struct Node {
    /// The index entry with the metadata; `None` for an implied directory.
    entry: Option<u32>,
    kind: NodeKind,
    parent: u64,
    nlink: u32,
    opaque: bool,
    /// Directories: their children, `children[first..first + count]` of the
    /// tree, sorted by name.
    first: u32,
    count: u32,
}

/// A name in a directory. The name is not copied: it is the path component
/// of index entry `entry` that starts at byte `start` (past `.wh.` for a
/// whiteout). A hard link's name is its own entry's; an implied directory's
/// is a component of the first entry below it.
#[derive(Clone, Copy)]
struct Child {
    entry: u32,
    start: u32,
    ino: u32,
}

pub struct LayerTree {
    index: std::sync::Arc<LayerIndex>,
    nodes: Vec<Node>,
    /// Every directory's children, one run per directory.
    children: Vec<Child>,
    /// Hard links skipped because their target is missing or a directory.
    pub skipped_links: usize,
}

/// What a directory holds while the tree is built: names (borrowed from the
/// index) to children.
type Dirs<'a> = HashMap<u64, HashMap<&'a [u8], Child>>;

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

impl LayerTree {
    /// About how many bytes this tree and its index hold in memory.
    pub fn memory(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.children.capacity() * std::mem::size_of::<Child>()
            + self.index.memory()
    }

    /// Build the tree of a validated index. Its size is bounded by the
    /// validation (`format::Index::check` counts these very nodes against
    /// `MAX_TREE_NODES`, so inode numbers fit in u32), and building it costs
    /// the length of the paths: each directory is found by its name under
    /// its parent, never by hashing whole prefixes.
    pub fn new(index: std::sync::Arc<LayerIndex>) -> LayerTree {
        let mut t = LayerTree { index: index.clone(), nodes: Vec::new(), children: Vec::new(), skipped_links: 0 };
        t.nodes.push(Node {
            entry: None,
            kind: NodeKind::Dir,
            parent: ROOT,
            nlink: 2,
            opaque: false,
            first: 0,
            count: 0,
        });
        // Children are gathered in maps while building, then sorted once.
        let mut dirs: Dirs = HashMap::new();
        let mut by_path: HashMap<&[u8], u64> = HashMap::new();
        by_path.insert(b"", ROOT);
        for (i, e) in index.entries().iter().enumerate() {
            if e.path.is_empty() {
                if e.kind == EntryKind::Dir {
                    t.nodes[0].entry = Some(i as u32);
                }
                continue;
            }
            let (parent_path, name) = split(&e.path);
            let parent = t.ensure_dir(i as u32, parent_path, &mut dirs);
            if name == OPAQUE_MARKER {
                t.nodes[(parent - 1) as usize].opaque = true;
                continue;
            }
            let name_at = (e.path.len() - name.len()) as u32;
            let (name, kind, name_at) = match name.strip_prefix(WHITEOUT_PREFIX) {
                Some(hidden) if !hidden.is_empty() => {
                    (hidden, NodeKind::Whiteout, name_at + WHITEOUT_PREFIX.len() as u32)
                }
                _ => (
                    name,
                    match e.kind {
                        EntryKind::File => NodeKind::File,
                        EntryKind::Dir => NodeKind::Dir,
                        EntryKind::Symlink => NodeKind::Symlink,
                        EntryKind::CharDevice => NodeKind::CharDevice,
                        EntryKind::BlockDevice => NodeKind::BlockDevice,
                        EntryKind::Fifo => NodeKind::Fifo,
                        EntryKind::Hardlink => {
                            match by_path.get(e.link()).copied().filter(|&x| t.node(x).kind != NodeKind::Dir) {
                                Some(target) => {
                                    t.nodes[(target - 1) as usize].nlink += 1;
                                    let child = Child { entry: i as u32, start: name_at, ino: target as u32 };
                                    // The name it replaces loses a link, even when
                                    // that name already was one of the target's.
                                    let old = dirs.entry(parent).or_default().insert(name, child).map(|c| c.ino as u64);
                                    if let Some(old) = old {
                                        t.unlink(old);
                                    }
                                    by_path.insert(&e.path, target);
                                }
                                None => t.skipped_links += 1,
                            }
                            continue;
                        }
                    },
                    name_at,
                ),
            };
            let existing = dirs.get(&parent).and_then(|d| d.get(name)).map(|c| c.ino as u64);
            match existing {
                // A directory listed again keeps its children, takes the new metadata.
                Some(ino) if kind == NodeKind::Dir && t.node(ino).kind == NodeKind::Dir => {
                    t.nodes[(ino - 1) as usize].entry = Some(i as u32);
                }
                _ => {
                    if let Some(old) = existing {
                        t.unlink(old);
                    }
                    let ino = t.nodes.len() as u64 + 1;
                    t.nodes.push(Node {
                        entry: Some(i as u32),
                        kind,
                        parent,
                        nlink: if kind == NodeKind::Dir { 2 } else { 1 },
                        opaque: false,
                        first: 0,
                        count: 0,
                    });
                    let child = Child { entry: i as u32, start: name_at, ino: ino as u32 };
                    dirs.entry(parent).or_default().insert(name, child);
                    if kind != NodeKind::Whiteout {
                        let full: &[u8] = &e.path;
                        by_path.insert(full, ino);
                    }
                }
            }
        }
        t.children.reserve_exact(dirs.values().map(HashMap::len).sum());
        for (dir, children) in dirs {
            let mut v: Vec<(&[u8], Child)> = children.into_iter().collect();
            v.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let subdirs = v.iter().filter(|(_, c)| t.node(c.ino as u64).kind == NodeKind::Dir).count() as u32;
            let first = t.children.len() as u32;
            t.children.extend(v.into_iter().map(|(_, c)| c));
            let d = &mut t.nodes[(dir - 1) as usize];
            d.nlink = 2 + subdirs;
            (d.first, d.count) = (first, t.children.len() as u32 - first);
        }
        t
    }

    /// A child's name: its path component in the index.
    fn name(&self, c: &Child) -> &[u8] {
        let rest = &self.index.entries()[c.entry as usize].path[c.start as usize..];
        &rest[..rest.iter().position(|&b| b == b'/').unwrap_or(rest.len())]
    }

    fn children(&self, d: &Node) -> &[Child] {
        &self.children[d.first as usize..(d.first + d.count) as usize]
    }

    /// The directory at `path` (a prefix of entry `entry`'s path), walked
    /// down from the root one name at a time; each component that is not a
    /// directory there is created (implied), replacing what had its name.
    fn ensure_dir<'a>(&mut self, entry: u32, path: &'a [u8], dirs: &mut Dirs<'a>) -> u64 {
        let mut dir = ROOT;
        if path.is_empty() {
            return dir;
        }
        let mut start = 0usize;
        for name in path.split(|&b| b == b'/') {
            let existing = dirs.get(&dir).and_then(|d| d.get(name)).map(|c| c.ino as u64);
            dir = match existing {
                Some(ino) if self.node(ino).kind == NodeKind::Dir => ino,
                _ => {
                    let ino = self.nodes.len() as u64 + 1;
                    self.nodes.push(Node {
                        entry: None,
                        kind: NodeKind::Dir,
                        parent: dir,
                        nlink: 2,
                        opaque: false,
                        first: 0,
                        count: 0,
                    });
                    // Paths are at most MAX_PATH bytes: `start` fits in u32.
                    let child = Child { entry, start: start as u32, ino: ino as u32 };
                    if let Some(old) = dirs.entry(dir).or_default().insert(name, child) {
                        self.unlink(old.ino as u64);
                    }
                    ino
                }
            };
            start += name.len() + 1;
        }
        dir
    }

    /// A name for `ino` went away (replaced by a later entry).
    fn unlink(&mut self, ino: u64) {
        let n = &mut self.nodes[(ino - 1) as usize];
        n.nlink = n.nlink.saturating_sub(1);
    }

    fn node(&self, ino: u64) -> &Node {
        &self.nodes[(ino - 1) as usize]
    }

    fn get(&self, ino: u64) -> Result<&Node, FsError> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize)).ok_or(FsError::NotFound)
    }

    fn entry(&self, n: &Node) -> Option<&Entry> {
        n.entry.map(|i| &self.index.entries()[i as usize])
    }

    pub fn index(&self) -> &std::sync::Arc<LayerIndex> {
        &self.index
    }

    /// Nodes in the tree, the root and nodes no name reaches any more
    /// included: what `format::Index::check` bounds by `MAX_TREE_NODES`.
    /// For the fuzz targets' invariants (fuzz/src/lib.rs).
    #[doc(hidden)]
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The index entry with a node's metadata (`None` for the root or a
    /// directory the tar implies). For the fuzz targets' invariants.
    #[doc(hidden)]
    pub fn node_entry(&self, ino: u64) -> Option<&Entry> {
        self.get(ino).ok().and_then(|n| self.entry(n))
    }

    pub fn attr(&self, ino: u64) -> Result<NodeAttr, FsError> {
        let n = self.get(ino)?;
        let mut a = NodeAttr {
            ino,
            kind: n.kind,
            size: 0,
            perm: 0o755,
            nlink: n.nlink,
            uid: 0,
            gid: 0,
            dev: (0, 0),
            mtime: 0,
            mtime_nsec: 0,
        };
        if let Some(e) = self.entry(n) {
            a.uid = e.uid;
            a.gid = e.gid;
            a.mtime = e.mtime;
            // Validated below a second; kept so for whoever builds a time.
            a.mtime_nsec = e.mtime_nsec.min(999_999_999);
            a.perm = (e.mode & 0o7777) as u16;
            match n.kind {
                NodeKind::File => a.size = e.size,
                NodeKind::Symlink => a.size = e.link().len() as u64,
                NodeKind::CharDevice | NodeKind::BlockDevice => a.dev = e.device(),
                NodeKind::Whiteout => a.perm = 0,
                NodeKind::Dir | NodeKind::Fifo => {}
            }
        }
        Ok(a)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64, FsError> {
        let d = self.get(parent)?;
        if d.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        match name {
            b"." => return Ok(parent),
            b".." => return Ok(d.parent),
            _ => {}
        }
        let kids = self.children(d);
        kids.binary_search_by(|c| self.name(c).cmp(name)).map(|i| kids[i].ino as u64).map_err(|_| FsError::NotFound)
    }

    /// Entries from position `offset`: `.` is 0, `..` is 1, then the children
    /// in name order. `add(ino, next_offset, kind, name)` returns true to stop.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, u64, NodeKind, &[u8]) -> bool,
    ) -> Result<(), FsError> {
        let d = self.get(ino)?;
        if d.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        let mut pos = offset;
        loop {
            let (child, kind, name): (u64, NodeKind, &[u8]) = match pos {
                0 => (ino, NodeKind::Dir, b"."),
                1 => (d.parent, NodeKind::Dir, b".."),
                p => match self.children(d).get((p - 2) as usize) {
                    Some(c) => (c.ino as u64, self.node(c.ino as u64).kind, self.name(c)),
                    None => return Ok(()),
                },
            };
            if add(child, pos + 1, kind, name) {
                return Ok(());
            }
            pos += 1;
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        let n = self.get(ino)?;
        match (n.kind, self.entry(n)) {
            (NodeKind::Symlink, Some(e)) => Ok(e.link()),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// Extended attributes, in the tar's order, then overlayfs' opaque mark.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<(&[u8], &[u8])>, FsError> {
        let n = self.get(ino)?;
        let mut out: Vec<(&[u8], &[u8])> =
            self.entry(n).map(|e| e.xattrs().iter().map(|x| (&x.name[..], &x.value[..])).collect()).unwrap_or_default();
        if n.opaque {
            out.retain(|(k, _)| *k != OPAQUE_XATTR);
            out.push((OPAQUE_XATTR, b"y"));
        }
        Ok(out)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<&[u8], FsError> {
        self.xattrs(ino)?.into_iter().find(|(k, _)| *k == name).map(|(_, v)| v).ok_or(FsError::NoAttr)
    }

    /// Every frame file `ino` is stored in, sorted (empty for anything but
    /// a regular file).
    pub fn file_frames(&self, ino: u64) -> Vec<usize> {
        let Some(e) = self.get(ino).ok().filter(|n| n.kind == NodeKind::File).and_then(|n| self.entry(n)) else {
            return Vec::new();
        };
        let mut frames: Vec<usize> =
            file_extents(e, 0, e.size).flat_map(|x| self.index.frames_for(x.tar, x.len)).collect();
        frames.sort_unstable();
        frames.dedup();
        frames
    }

    /// The regular files in the directory that holds `ino` (`ino` among
    /// them), with their sizes, in name order.
    pub fn sibling_files(&self, ino: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let dir = self.get(ino).ok().and_then(|n| self.get(n.parent).ok());
        dir.map(|d| self.children(d)).unwrap_or(&[]).iter().filter_map(move |c| {
            let n = self.get(c.ino as u64).ok().filter(|n| n.kind == NodeKind::File)?;
            Some((c.ino as u64, self.entry(n)?.size))
        })
    }

    /// Regular files in the tree (hard links to one file count once per
    /// name's node: once).
    pub fn file_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.kind == NodeKind::File).count()
    }

    /// The directory that holds `ino` (the root holds itself).
    pub fn parent(&self, ino: u64) -> Option<u64> {
        self.get(ino).ok().map(|n| n.parent)
    }

    /// What a read of `size` bytes at `offset` of file `ino` needs.
    pub fn plan_read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadPlan, FsError> {
        let n = self.get(ino)?;
        let e = match (n.kind, self.entry(n)) {
            (NodeKind::File, Some(e)) => e,
            _ => return Err(FsError::NotFile),
        };
        let end = offset.saturating_add(size as u64).min(e.size);
        let pieces: Vec<Extent> = file_extents(e, offset, end).collect();
        let mut frames: Vec<usize> = pieces.iter().flat_map(|x| self.index.frames_for(x.tar, x.len)).collect();
        frames.sort_unstable();
        frames.dedup();
        Ok(ReadPlan { len: end.saturating_sub(offset) as usize, pieces, frames })
    }
}

/// A planned read: the frames it needs (sorted), then assembly.
#[derive(Clone, Debug)]
pub struct ReadPlan {
    len: usize,
    /// Stored bytes and where they go in the reply; holes stay zeros.
    pieces: Vec<Extent>,
    pub frames: Vec<usize>,
}

impl ReadPlan {
    /// The reply: `data[k]` is frame `self.frames[k]`'s data. Holes of a
    /// sparse file are zeros. An error when a frame's data is missing or its
    /// length is not the frame's length in the index (which would put other
    /// bytes at these offsets): frames come from a store shared by layers.
    pub fn try_assemble(&self, index: &LayerIndex, data: &[impl AsRef<[u8]>]) -> Result<Vec<u8>, FrameMismatch> {
        Ok(self.try_slices(index, data)?.concat())
    }

    /// The reply as slices of the frames' data, in order, to be written as
    /// they are (no copy); holes of a sparse file are slices of zeros. The
    /// same checks as [`ReadPlan::try_assemble`].
    pub fn try_slices<'d>(
        &self,
        index: &LayerIndex,
        data: &'d [impl AsRef<[u8]>],
    ) -> Result<Vec<&'d [u8]>, FrameMismatch> {
        for (k, &f) in self.frames.iter().enumerate() {
            let (start, end) = index.frame_tar_range(f);
            let got = data.get(k).map_or(0, |d| d.as_ref().len());
            if got as u64 != end - start {
                return Err(FrameMismatch { frame: f, got, want: end - start });
            }
        }
        let mut out: Vec<&'d [u8]> = Vec::with_capacity(self.frames.len() + 1);
        let zeros = |out: &mut Vec<&'d [u8]>, mut n: usize| {
            while n > 0 {
                let z = n.min(ZEROS.len());
                out.push(&ZEROS[..z]);
                n -= z;
            }
        };
        let mut written = 0usize;
        for p in &self.pieces {
            let (out_at, len) = (p.out as usize, p.len as usize);
            zeros(&mut out, out_at.saturating_sub(written));
            let mut done = 0usize;
            while done < len {
                let at = p.tar + done as u64;
                // The plan's frames cover its pieces (plan_read took them
                // from frames_for), and each frame's data is its full tar
                // range (checked above): k is in range, `from` inside `d`.
                let k = self.frames.partition_point(|&f| index.frame_tar_range(f).1 <= at);
                let f = self.frames[k];
                let (fstart, _) = index.frame_tar_range(f);
                let d = data[k].as_ref();
                let from = (at - fstart) as usize;
                let n = (d.len() - from).min(len - done);
                out.push(&d[from..from + n]);
                done += n;
            }
            written = out_at + len;
        }
        zeros(&mut out, self.len.saturating_sub(written));
        Ok(out)
    }
}

/// What holes of sparse files are answered with.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

#[cfg(test)]
mod tests;
