//! The tree's numbering as a format: [`TREE_VERSION`] and
//! [`LayerTree::fingerprint`].
//!
//! A FUSE connection outlives the process that serves it when its fd is
//! kept elsewhere (issue 17): the kernel keeps every inode number
//! (nodeid) it was given in its dentry and inode caches, every directory
//! position (readdir cookie) of an open directory, and cached attributes.
//! A new hyperboxd that serves that connection rebuilds the layer's tree
//! from the same index, and must give every one of those numbers the same
//! meaning. How [`LayerTree::new`] numbers nodes and cookies is therefore
//! as much an on-disk format as the index is
//! (docs/design/restart-research.md §5).

use std::collections::{HashSet, VecDeque};

use super::{FsError, LayerTree, NodeAttr, NodeKind, ROOT};

/// Version of what a FUSE client keeps of a layer's tree, as
/// [`LayerTree::new`] builds it from an index. It covers:
/// - inode numbering: the root is 1, then one number per node in index
///   order, implied directories numbered when first implied; a hard link
///   is its target's number; a path listed again takes a new number (a
///   directory listed again keeps its own), and what it replaced keeps its
///   number, unreachable;
/// - readdir: `.` at offset 0, `..` at 1, then the children sorted by name
///   (bytes), the cookie of each entry being its position + 1, and what an
///   offset resumes at;
/// - what is synthesized: `.wh.NAME` as a whiteout `NAME` (a char device
///   0/0, mode 0), `.wh..wh..opq` hidden and its directory opaque
///   (`trusted.overlay.opaque=y`), implied directories 0755 root:root;
/// - `nlink` (hard links counted, replaced names uncounted, directories
///   2 + subdirectories) and the other attributes the kernel caches (kind,
///   mode, size, owner, device numbers, mtime), xattrs and link targets.
///
/// The rule: any change to one of those bumps this version, and a daemon
/// must not adopt a live connection whose layer was served with another
/// version (abort it instead: its containers see ENOTCONN, as after a
/// restart without adoption). Serving a kept connection with another
/// numbering gives its processes other files than the ones they opened,
/// silently. The golden fingerprints in `numbering/tests.rs` fail when the
/// numbering changes; they are recorded per version.
pub const TREE_VERSION: u32 = 1;

/// What `readdir` calls per entry: (inode, next offset, kind, name).
type Add<'a> = dyn FnMut(u64, u64, NodeKind, &[u8]) -> bool + 'a;
/// A node's xattrs, (name, value) in order.
type Xattrs<'a> = Vec<(&'a [u8], &'a [u8])>;
/// Entries of a listing: (cookie, inode, kind, name).
type Listing = Vec<(u64, u64, NodeKind, Vec<u8>)>;

/// What a FUSE client can ask of a tree, the fingerprint's only access to
/// it. A trait so that tests can alter one answer and see the fingerprint
/// change.
pub(super) trait View {
    fn attr(&self, ino: u64) -> Result<NodeAttr, FsError>;
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64, FsError>;
    fn readdir(&self, ino: u64, offset: u64, add: &mut Add) -> Result<(), FsError>;
    fn xattrs(&self, ino: u64) -> Result<Xattrs<'_>, FsError>;
    fn readlink(&self, ino: u64) -> Result<&[u8], FsError>;
}

impl View for LayerTree {
    fn attr(&self, ino: u64) -> Result<NodeAttr, FsError> {
        LayerTree::attr(self, ino)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64, FsError> {
        LayerTree::lookup(self, parent, name)
    }
    fn readdir(&self, ino: u64, offset: u64, add: &mut Add) -> Result<(), FsError> {
        LayerTree::readdir(self, ino, offset, add)
    }
    fn xattrs(&self, ino: u64) -> Result<Xattrs<'_>, FsError> {
        LayerTree::xattrs(self, ino)
    }
    fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        LayerTree::readlink(self, ino)
    }
}

impl LayerTree {
    /// A blake3 hash of everything a FUSE client can learn of this tree and
    /// keep across a daemon restart: for each directory reached from the
    /// root (breadth first, in listing order), its listing from offset 0
    /// (`.` and `..` included) as (cookie, inode, kind, name), where each
    /// cookie resumes, and for each name its path, the inode a lookup
    /// gives, the node's attributes, xattrs and link target.
    ///
    /// Two trees with the same fingerprint answer every request alike: a
    /// daemon that rebuilt a layer's tree can compare it with the one
    /// recorded when the layer was first served. Nodes no name reaches are
    /// left out (no client can hold their numbers). Costs one walk of the
    /// tree; the result does not depend on the process (no seeded hashing).
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(self)
    }
}

fn kind_byte(k: NodeKind) -> u8 {
    match k {
        NodeKind::File => b'f',
        NodeKind::Dir => b'd',
        NodeKind::Symlink => b'l',
        NodeKind::CharDevice => b'c',
        NodeKind::BlockDevice => b'b',
        NodeKind::Fifo => b'p',
        NodeKind::Whiteout => b'w',
    }
}

/// Writes values to the hash unambiguously: fixed-width little-endian
/// numbers, byte strings prefixed with their length, a tag before each
/// record.
struct Out(blake3::Hasher);

impl Out {
    fn tag(&mut self, t: u8) {
        self.0.update(&[t]);
    }
    fn u64(&mut self, v: u64) {
        self.0.update(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.update(b);
    }
    fn error(&mut self, e: &FsError) {
        self.tag(b'!');
        self.bytes(e.to_string().as_bytes());
    }
}

/// One directory's listing: (cookie, inode, kind, name) from offset `from`,
/// at most `max` entries.
fn listing(t: &impl View, dir: u64, from: u64, max: usize) -> Result<Listing, FsError> {
    let mut out = Vec::new();
    if max == 0 {
        return Ok(out);
    }
    t.readdir(dir, from, &mut |ino, next, kind, name| {
        out.push((next, ino, kind, name.to_vec()));
        out.len() >= max
    })?;
    Ok(out)
}

/// A node's attributes, xattrs and link target.
fn node(h: &mut Out, t: &impl View, ino: u64) {
    match t.attr(ino) {
        Ok(a) => {
            h.tag(b'A');
            for v in [a.ino, a.size, a.perm as u64, a.nlink as u64, a.uid as u64, a.gid as u64] {
                h.u64(v);
            }
            h.tag(kind_byte(a.kind));
            h.u64(a.dev.0 as u64);
            h.u64(a.dev.1 as u64);
            h.u64(a.mtime as u64);
            h.u64(a.mtime_nsec as u64);
            if a.kind == NodeKind::Symlink {
                match t.readlink(ino) {
                    Ok(target) => {
                        h.tag(b'L');
                        h.bytes(target);
                    }
                    Err(e) => h.error(&e),
                }
            }
        }
        Err(e) => h.error(&e),
    }
    match t.xattrs(ino) {
        Ok(xs) => {
            h.tag(b'X');
            h.u64(xs.len() as u64);
            for (k, v) in xs {
                h.bytes(k);
                h.bytes(v);
            }
        }
        Err(e) => h.error(&e),
    }
}

pub(super) fn fingerprint(t: &impl View) -> [u8; 32] {
    let mut h = Out(blake3::Hasher::new_derive_key("hyperbox fs::LayerTree fingerprint, see fs::TREE_VERSION"));
    h.tag(b'R');
    node(&mut h, t, ROOT);
    let mut queue: VecDeque<(u64, Vec<u8>)> = VecDeque::from([(ROOT, Vec::new())]);
    // Directories have one name each; the set only makes sure a tree that
    // broke that rule still ends.
    let mut seen: HashSet<u64> = HashSet::from([ROOT]);
    while let Some((dir, path)) = queue.pop_front() {
        h.tag(b'D');
        h.bytes(&path);
        let entries = match listing(t, dir, 0, usize::MAX) {
            Ok(v) => v,
            Err(e) => {
                h.error(&e);
                continue;
            }
        };
        h.u64(entries.len() as u64);
        for (next, ino, kind, name) in &entries {
            h.u64(*next);
            h.u64(*ino);
            h.tag(kind_byte(*kind));
            h.bytes(name);
        }
        // What the kernel does with a kept position: ask again from it.
        h.tag(b'C');
        for (next, ..) in &entries {
            match listing(t, dir, *next, 1) {
                Ok(v) => match v.first() {
                    Some((n, ino, _, name)) => {
                        h.tag(b'+');
                        h.u64(*n);
                        h.u64(*ino);
                        h.bytes(name);
                    }
                    None => h.tag(b'.'),
                },
                Err(e) => h.error(&e),
            }
        }
        for (_, ino, kind, name) in &entries {
            if name.as_slice() == b"." || name.as_slice() == b".." {
                continue;
            }
            let mut child = path.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name);
            h.tag(b'N');
            h.bytes(&child);
            match t.lookup(dir, name) {
                Ok(found) => {
                    h.tag(b'=');
                    h.u64(found);
                }
                Err(e) => h.error(&e),
            }
            node(&mut h, t, *ino);
            if *kind == NodeKind::Dir && seen.insert(*ino) {
                queue.push_back((*ino, child));
            }
        }
    }
    *h.0.finalize().as_bytes()
}

#[cfg(test)]
mod tests;
