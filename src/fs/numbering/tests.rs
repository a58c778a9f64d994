//! Golden fingerprints of fixture trees: the guard on the numbering a live
//! FUSE connection keeps across a daemon restart (see [`TREE_VERSION`]).
//!
//! The fixtures are indexes built entry by entry, not through the tar
//! writer: a restarted daemon rebuilds a tree from the index it stored, so
//! only `LayerTree::new` (and what `fs` answers from the tree) is under
//! test here, and a change in how tars are converted does not trip it.

use std::sync::Arc;

use super::*;
use crate::digest::ChunkId;
use crate::format::{ChunkParams, Entry, EntryKind, Frame, FrameTable, Index, LayerIndex, Xattr};

/// Golden fingerprints by tree version, one per fixture (`overlay`,
/// `links`, `wide`, in that order). A row is never edited: when the
/// numbering changes, TREE_VERSION is bumped and a row added for it.
const GOLDEN: &[(u32, [&str; 3])] = &[(
    1,
    [
        "8f01ba1e7b29c86db8e679c4304abed08e89e783f2ae8a37d2b805f7b052a653",
        "969efeec1008826a61ea7fec49f0533052872014498a57aaa20996f416a759d1",
        "4ddd6895a1ea99e4bb9992dcb35ab94d94380ec11c1afa8c38a5cc05a5ac4543",
    ],
)];

const CHANGED: &str = "the tree's numbering changed: this breaks live connections adopted after a restart; \
                       bump TREE_VERSION and keep adopting only same-version layers \
                       (see docs/design/restart-research.md §5)";

/// An index built entry by entry. Every entry has its own mtime and is
/// owned by 1000:100; file data is laid out back to back in one frame.
struct Fx {
    entries: Vec<Entry>,
    data: u64,
}

impl Fx {
    fn new() -> Fx {
        Fx { entries: Vec::new(), data: 0 }
    }
    fn push(mut self, path: &str, kind: EntryKind, mode: u32, f: impl FnOnce(&mut Entry)) -> Fx {
        let mut e = Entry::new(path.as_bytes().to_vec(), kind);
        e.mode = mode;
        e.uid = 1000;
        e.gid = 100;
        e.mtime = 1_700_000_000 + self.entries.len() as i64;
        e.mtime_nsec = 1000 * self.entries.len() as u32;
        f(&mut e);
        if kind == EntryKind::File {
            e.data_offset = self.data;
            self.data += e.size;
        }
        self.entries.push(e);
        self
    }
    fn dir(self, path: &str, mode: u32) -> Fx {
        self.push(path, EntryKind::Dir, mode, |_| {})
    }
    fn file(self, path: &str, size: u64) -> Fx {
        self.push(path, EntryKind::File, 0o644, |e| e.size = size)
    }
    fn file_xattrs(self, path: &str, size: u64, xattrs: &[(&str, &[u8])]) -> Fx {
        self.push(path, EntryKind::File, 0o4755, |e| {
            e.size = size;
            e.extra_mut().xattrs =
                xattrs.iter().map(|(k, v)| Xattr { name: k.as_bytes().to_vec(), value: v.to_vec() }).collect();
        })
    }
    fn dir_xattrs(self, path: &str, xattrs: &[(&str, &[u8])]) -> Fx {
        self.push(path, EntryKind::Dir, 0o755, |e| {
            e.extra_mut().xattrs =
                xattrs.iter().map(|(k, v)| Xattr { name: k.as_bytes().to_vec(), value: v.to_vec() }).collect();
        })
    }
    fn link(self, path: &str, target: &str) -> Fx {
        self.push(path, EntryKind::Hardlink, 0o644, |e| e.extra_mut().link = target.as_bytes().to_vec())
    }
    fn symlink(self, path: &str, target: &str) -> Fx {
        self.push(path, EntryKind::Symlink, 0o777, |e| e.extra_mut().link = target.as_bytes().to_vec())
    }
    fn device(self, path: &str, kind: EntryKind, major: u32, minor: u32) -> Fx {
        self.push(path, kind, 0o660, |e| {
            let x = e.extra_mut();
            (x.dev_major, x.dev_minor) = (major, minor);
        })
    }
    fn fifo(self, path: &str) -> Fx {
        self.push(path, EntryKind::Fifo, 0o600, |_| {})
    }
    /// `.wh.NAME` in the tar: a whiteout of NAME.
    fn whiteout(self, dir: &str, name: &str) -> Fx {
        let p = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.push(&p, EntryKind::File, 0o644, |_| {})
    }
    /// `.wh..wh..opq` in the tar: `dir` is opaque.
    fn opaque(self, dir: &str) -> Fx {
        self.push(&format!("{dir}/.wh..wh..opq"), EntryKind::File, 0o644, |_| {})
    }
    /// The validated index, as a daemon holds it.
    fn index(&self) -> Arc<LayerIndex> {
        let frames: FrameTable = (self.data > 0)
            .then_some(Frame { c_len: 1, u_len: self.data as u32, id: ChunkId([7; 32]) })
            .into_iter()
            .collect();
        let frames_end = frames.len() as u64;
        let index = Index {
            tar_size: self.data,
            diff_id: [0; 32],
            chunk_params: ChunkParams::default(),
            frames,
            entries: self.entries.clone(),
        };
        Arc::new(index.validate(frames_end).expect("a valid fixture index"))
    }
    fn tree(&self) -> LayerTree {
        LayerTree::new(self.index())
    }
}

/// Whiteouts, opaque directories (marked before and after their
/// children, implied, with an opaque xattr of their own), implied parents,
/// a deep path, a directory listed after it was implied, every node kind.
fn overlay() -> Fx {
    Fx::new()
        .dir("", 0o755)
        .dir("etc", 0o755)
        .file("etc/passwd", 120)
        .whiteout("etc", "shadow")
        .file("etc/.wh.", 1)
        .file("usr/lib/x86_64-linux-gnu/libc.so.6", 2000)
        .opaque("usr/lib/x86_64-linux-gnu")
        .file_xattrs("usr/bin/ping", 64, &[("security.capability", b"\x01\x00\x00\x02")])
        .dir("usr", 0o700)
        .opaque("var/cache")
        .whiteout("var/cache/apt/archives/partial", "lock")
        .file("var/cache/apt/pkgcache.bin", 10)
        .dir_xattrs("opt", &[("trusted.overlay.opaque", b"n"), ("user.note", b"kept")])
        .opaque("opt")
        .file("opt/app", 3)
        .whiteout("", "root-gone")
        .file("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/deep", 5)
        .symlink("lib", "usr/lib")
        .symlink("a/b/up", "../../etc/passwd")
        .device("dev/null", EntryKind::CharDevice, 1, 3)
        .device("dev/sda", EntryKind::BlockDevice, 8, 0)
        .fifo("run/initctl")
        .dir("run", 0o1777)
}

/// Hard links (to files, to names that are links, to a missing path, to a
/// directory, over their own target's name) and paths listed twice (a file
/// over a file, a file over a hard link, a whiteout over a linked file, a
/// fifo over a directory that is implied again, a directory over itself).
fn links() -> Fx {
    Fx::new()
        .file("bin/busybox", 900)
        .link("bin/sh", "bin/busybox")
        .link("bin/ls", "bin/busybox")
        .link("bin/cat", "bin/busybox")
        .link("bin/cat", "bin/busybox")
        .file("bin/sh", 40)
        .file("data/x", 3)
        .file("data/x", 5)
        .link("data/y", "data/x")
        .link("data/z", "data/y")
        .whiteout("data", "x")
        .link("dangling", "missing")
        .file("tmp/t/f", 1)
        .fifo("tmp/t")
        .file("tmp/t/g", 2)
        .dir("srv", 0o755)
        .file("srv/a", 7)
        .dir("srv", 0o700)
        .link("dirlink", "srv")
        .link("srv/b", "srv/a")
        .symlink("bin/vi", "busybox")
        .link("bin/vi2", "bin/vi")
}

/// Many names in one directory, listed in another order than their
/// sorted one, so that every cookie counts: names that sort by bytes
/// (`f10` before `f9`, upper case before lower, UTF-8 last), subdirectories
/// among them, a 255-byte name, and a second directory of its own.
fn wide() -> Fx {
    let mut fx = Fx::new().dir("many", 0o755);
    for i in 0..600u64 {
        let n = (i * 7919) % 600;
        fx = match n % 50 {
            0 => fx.dir(&format!("many/d{n}"), 0o755),
            7 => fx.file(&format!("many/d{}/inner{n}", n - 7), n),
            _ => fx.file(&format!("many/f{n}"), n % 13),
        };
    }
    fx.file("many/F1", 1)
        .file("many/Z", 1)
        .file("many/été", 2)
        .file("many/-", 3)
        .file(&format!("many/{}", "n".repeat(255)), 4)
        .whiteout("many", "f599")
        .file("few/b", 1)
        .file("few/a", 1)
        .file("few/c", 1)
}

fn hex(fp: [u8; 32]) -> String {
    hex::encode(fp)
}

#[test]
fn golden_fingerprints() {
    let (_, want) = GOLDEN.iter().find(|(v, _)| *v == TREE_VERSION).unwrap_or_else(|| {
        panic!("no golden fingerprints for TREE_VERSION {TREE_VERSION}: add a row to GOLDEN (never edit an old one)")
    });
    let got = [overlay(), links(), wide()].map(|fx| hex(fx.tree().fingerprint()));
    for (i, name) in ["overlay", "links", "wide"].into_iter().enumerate() {
        assert_eq!(got[i], want[i], "fixture {name}: {CHANGED}\nall three now: {got:?}");
    }
}

/// A tree is numbered the same each time it is built, whatever the seeds
/// of the maps used while building it, and from the index as stored (what
/// a restarted daemon reads back).
#[test]
fn numbering_is_deterministic() {
    for fx in [overlay(), links(), wide()] {
        let first = fx.tree().fingerprint();
        assert_eq!(first, fx.tree().fingerprint());
        let idx = fx.index();
        let stored = idx.index.encode();
        let back = Index::decode(&stored, idx.index.frames.len() as u64).unwrap();
        assert_eq!(LayerTree::new(Arc::new(back)).fingerprint(), first);
    }
}

/// The fixtures hold what they are meant to: if one lost its hard links or
/// whiteouts, its golden value would guard less.
#[test]
fn fixtures_have_what_they_are_for() {
    let path = |t: &LayerTree, p: &str| {
        p.split('/').try_fold(ROOT, |d, n| t.lookup(d, n.as_bytes())).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let t = overlay().tree();
    assert_eq!(t.attr(path(&t, "etc/shadow")).unwrap().kind, NodeKind::Whiteout);
    assert_eq!(t.getxattr(path(&t, "opt"), super::super::OPAQUE_XATTR).unwrap(), b"y");
    assert_eq!(t.attr(path(&t, "usr")).unwrap().perm, 0o700);
    assert_eq!(t.attr(path(&t, "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t")).unwrap().uid, 0, "implied");
    let t = links().tree();
    assert_eq!(t.attr(path(&t, "bin/busybox")).unwrap().nlink, 3, "sh, ls, cat (listed twice)");
    assert_eq!(path(&t, "data/y"), path(&t, "data/z"));
    assert_eq!(t.attr(path(&t, "data/x")).unwrap().kind, NodeKind::Whiteout);
    assert_eq!(t.attr(path(&t, "tmp/t")).unwrap().kind, NodeKind::Dir);
    assert_eq!(t.skipped_links, 2);
    let t = wide().tree();
    let mut n = 0;
    t.readdir(path(&t, "many"), 0, &mut |_, _, _, _| {
        n += 1;
        false
    })
    .unwrap();
    // ., .., 12 directories, 576 files (f599 now a whiteout), 5 more.
    assert_eq!(n, 595);
}

/// Any change in what a client sees changes the fingerprint: the same
/// entries in another order, a hard link fewer, a mode, an opaque marker
/// (only an xattr), a whiteout.
#[test]
fn fingerprint_changes_with_the_tree() {
    let base = links().tree().fingerprint();
    let mut swapped = links();
    assert_eq!((&swapped.entries[6].path[..], &swapped.entries[15].path[..]), (&b"data/x"[..], &b"srv"[..]));
    swapped.entries.swap(6, 15);
    assert_ne!(swapped.tree().fingerprint(), base, "same entries, other order");
    let mut fewer = links();
    assert_eq!(fewer.entries[2].path, b"bin/ls");
    fewer.entries.remove(2);
    assert_ne!(fewer.tree().fingerprint(), base, "one hard link fewer");
    // What no client can see does not count: bin/cat listed once instead
    // of twice is the same tree.
    let mut once = links();
    assert_eq!((&once.entries[3].path[..], &once.entries[4].path[..]), (&b"bin/cat"[..], &b"bin/cat"[..]));
    once.entries.remove(3);
    assert_eq!(once.tree().fingerprint(), base, "a link listed once instead of twice");
    let mut mode = links();
    mode.entries[0].mode = 0o755;
    assert_ne!(mode.tree().fingerprint(), base, "a mode");

    let base = overlay().tree().fingerprint();
    let mut no_opq = overlay();
    let at = no_opq.entries.iter().position(|e| e.path == b"opt/.wh..wh..opq").unwrap();
    no_opq.entries.remove(at);
    assert_ne!(no_opq.tree().fingerprint(), base, "an opaque marker");
    let mut no_wh = overlay();
    no_wh.entries.retain(|e| e.path != b".wh.root-gone");
    assert_ne!(no_wh.tree().fingerprint(), base, "a whiteout");
}

/// How a view of the tree is altered, one answer at a time.
#[derive(Clone, Copy, Debug)]
enum Alter {
    None,
    /// Cookies doubled (and read back halved): same entries, other
    /// positions kept by the kernel.
    Cookies,
    /// Resuming from a cookie skips one entry; the listing from 0 is the
    /// same.
    Resume,
    /// Children listed in reverse order, with the same cookies.
    Order,
    /// One file's nlink off by one.
    Nlink,
    /// A lookup answers another inode than the listing shows.
    Lookup,
}

struct Altered<'a>(&'a LayerTree, Alter);

impl View for Altered<'_> {
    fn attr(&self, ino: u64) -> Result<NodeAttr, FsError> {
        let mut a = self.0.attr(ino)?;
        if matches!(self.1, Alter::Nlink) && a.kind == NodeKind::File && a.nlink > 1 {
            a.nlink += 1;
        }
        Ok(a)
    }
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<u64, FsError> {
        let ino = self.0.lookup(parent, name)?;
        Ok(if matches!(self.1, Alter::Lookup) && name == b"sh" { ino + 1 } else { ino })
    }
    fn readdir(&self, ino: u64, offset: u64, add: &mut Add) -> Result<(), FsError> {
        match self.1 {
            Alter::Cookies => self.0.readdir(ino, offset / 2, &mut |i, next, k, n| add(i, next * 2, k, n)),
            Alter::Resume if offset > 0 => self.0.readdir(ino, offset + 1, add),
            Alter::Order => {
                let mut all: Listing = Vec::new();
                self.0.readdir(ino, 0, &mut |i, next, k, n| {
                    all.push((i, next, k, n.to_vec()));
                    false
                })?;
                all[2..].reverse();
                for (pos, (i, _, k, n)) in all.iter().enumerate().skip(offset as usize) {
                    if add(*i, pos as u64 + 1, *k, n) {
                        break;
                    }
                }
                Ok(())
            }
            _ => self.0.readdir(ino, offset, add),
        }
    }
    fn xattrs(&self, ino: u64) -> Result<Xattrs<'_>, FsError> {
        self.0.xattrs(ino)
    }
    fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        self.0.readlink(ino)
    }
}

/// The fingerprint covers the numbering itself: altering one kind of
/// answer (cookies, where a cookie resumes, entry order, nlink, a lookup)
/// changes it, where building the tree differently might change several.
#[test]
fn fingerprint_covers_each_answer() {
    let t = links().tree();
    let base = fingerprint(&Altered(&t, Alter::None));
    assert_eq!(base, t.fingerprint());
    for alter in [Alter::Cookies, Alter::Resume, Alter::Order, Alter::Nlink, Alter::Lookup] {
        assert_ne!(fingerprint(&Altered(&t, alter)), base, "{alter:?}");
    }
}
