use std::sync::Arc;

use super::*;
use crate::format;
use crate::testing::LayerBuilder;

/// A layer from (path, kind, data-or-link) triples, owned by 1000:100.
fn layer(items: &[(&str, tar::EntryType, &[u8])]) -> (Vec<u8>, Arc<LayerIndex>) {
    let tar = items.iter().fold(LayerBuilder::gnu().owner(1000, 100), |b, &(path, kind, data)| match kind {
        tar::EntryType::Regular => b.file(path, 0o640, data),
        tar::EntryType::Symlink => b.symlink(path, std::str::from_utf8(data).unwrap()),
        tar::EntryType::Link => b.hardlink(path, std::str::from_utf8(data).unwrap()),
        other => b.special(path, other, 0o755),
    });
    let l = tar.convert();
    (l.blob, l.index)
}

fn names(t: &LayerTree, dir: u64) -> Vec<String> {
    let mut out = Vec::new();
    t.readdir(dir, 0, &mut |_, _, _, n| {
        out.push(String::from_utf8_lossy(n).into_owned());
        false
    })
    .unwrap();
    out
}

fn path(t: &LayerTree, p: &str) -> u64 {
    p.split('/').fold(ROOT, |d, n| t.lookup(d, n.as_bytes()).unwrap_or_else(|e| panic!("{p}: {e}")))
}

#[test]
fn whiteouts_opaque_dirs_and_implied_parents() {
    use tar::EntryType as T;
    let (_, idx) = layer(&[
        ("etc", T::Directory, b""),
        ("etc/.wh.passwd", T::Regular, b""),
        ("var/lib/.wh..wh..opq", T::Regular, b""),
        ("var/lib/new", T::Regular, b"new\n"),
    ]);
    let t = LayerTree::new(idx);
    assert_eq!(names(&t, ROOT), [".", "..", "etc", "var"]);
    assert_eq!(names(&t, path(&t, "etc")), [".", "..", "passwd"]);
    let wh = t.attr(path(&t, "etc/passwd")).unwrap();
    assert_eq!((wh.kind, wh.dev, wh.perm), (NodeKind::Whiteout, (0, 0), 0));
    let lib = path(&t, "var/lib");
    assert_eq!(names(&t, lib), [".", "..", "new"]);
    assert_eq!(t.getxattr(lib, OPAQUE_XATTR).unwrap(), b"y");
    assert_eq!(t.getxattr(path(&t, "etc"), OPAQUE_XATTR), Err(FsError::NoAttr));
    // var is implied: 0755 root; etc is listed: its own metadata.
    let var = t.attr(path(&t, "var")).unwrap();
    assert_eq!((var.perm, var.uid, var.nlink), (0o755, 0, 3));
    assert_eq!(t.attr(path(&t, "etc")).unwrap().uid, 1000);
    assert_eq!(t.lookup(lib, b"..").unwrap(), path(&t, "var"));
}

#[test]
fn hard_links_share_an_inode_and_later_entries_win() {
    use tar::EntryType as T;
    let (_, idx) = layer(&[
        ("a", T::Regular, b"first"),
        ("b", T::Link, b"a"),
        ("c", T::Link, b"a"),
        ("d", T::Regular, b"old"),
        ("d", T::Regular, b"newer"),
        ("l", T::Symlink, b"../target"),
        ("dangling", T::Link, b"missing"),
    ]);
    let t = LayerTree::new(idx);
    let (a, b, c) = (path(&t, "a"), path(&t, "b"), path(&t, "c"));
    assert!(a == b && b == c);
    assert_eq!(t.attr(a).unwrap().nlink, 3);
    assert_eq!(t.attr(path(&t, "d")).unwrap().size, 5);
    assert_eq!(t.readlink(path(&t, "l")).unwrap(), b"../target");
    assert_eq!(t.attr(path(&t, "l")).unwrap().size, 9);
    assert_eq!(t.skipped_links, 1);
    assert_eq!(t.lookup(ROOT, b"dangling"), Err(FsError::NotFound));
}

#[test]
fn reads_span_frames_and_stop_at_the_end() {
    use tar::EntryType as T;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (blob, idx) = layer(&[("small", T::Regular, b"hello"), ("big", T::Regular, &big)]);
    let t = LayerTree::new(idx.clone());
    let ino = path(&t, "big");
    let read = |offset: u64, size: u32| {
        let plan = t.plan_read(ino, offset, size).unwrap();
        let data: Vec<Vec<u8>> = plan.frames.iter().map(|&f| format::read_frame(&blob[..], &idx, f).unwrap()).collect();
        plan.try_assemble(&idx, &data).unwrap()
    };
    for (off, size) in [(0u64, 4096u32), (131_000, 300_000), (2_999_000, 128 << 10), (1_000_000, 1 << 20)] {
        let end = (off as usize + size as usize).min(big.len());
        assert!(read(off, size) == big[off as usize..end], "read {off}+{size}");
    }
    assert!(read(3_000_000, 10).is_empty());
    assert!(t.plan_read(ino, 0, 1 << 20).unwrap().frames.len() >= 2, "1 MiB spans several frames");
    let small = t.plan_read(path(&t, "small"), 0, 100).unwrap();
    let data: Vec<Vec<u8>> = small.frames.iter().map(|&f| format::read_frame(&blob[..], &idx, f).unwrap()).collect();
    assert_eq!(small.try_assemble(&idx, &data).unwrap(), b"hello");
    assert_eq!(t.plan_read(ROOT, 0, 1).unwrap_err(), FsError::NotFile);
}

/// Frame data of another length than the index says (a chunk id shared
/// with a layer that lists it with another length, a store gone wrong) is
/// an error, not a panic nor other bytes at these offsets.
#[test]
fn frame_data_of_the_wrong_length_is_an_error() {
    use tar::EntryType as T;
    let (blob, idx) = layer(&[("f", T::Regular, &[5u8; 100_000])]);
    let t = LayerTree::new(idx.clone());
    let plan = t.plan_read(path(&t, "f"), 10, 50_000).unwrap();
    let mut data: Vec<Vec<u8>> = plan.frames.iter().map(|&f| format::read_frame(&blob[..], &idx, f).unwrap()).collect();
    assert_eq!(plan.try_assemble(&idx, &data).unwrap(), vec![5u8; 50_000]);
    let f = plan.frames[0];
    let want = idx.frames().get(f).u_len as u64;
    data[0].truncate(3);
    assert_eq!(plan.try_assemble(&idx, &data), Err(FrameMismatch { frame: f, got: 3, want }));
    data[0].resize(want as usize + 7, 0);
    assert!(plan.try_assemble(&idx, &data).is_err());
    assert!(plan.try_assemble(&idx, &data[..0]).is_err(), "missing frames");
}

/// A directory replaced by a later entry and implied again by a path below
/// it: the new one is found by name, the old one is gone from the listing.
#[test]
fn directories_implied_again_after_a_replacement() {
    use tar::EntryType as T;
    let (_, idx) = layer(&[
        ("x/a/a/f", T::Regular, b"1"),
        ("x", T::Fifo, b""),
        ("x/a/a/g", T::Regular, b"2"),
        ("y/.wh.z", T::Regular, b""),
        ("y/z/w", T::Regular, b"3"),
    ]);
    let t = LayerTree::new(idx);
    assert_eq!(names(&t, path(&t, "x/a/a")), [".", "..", "g"]);
    assert_eq!(t.attr(path(&t, "x")).unwrap().kind, NodeKind::Dir);
    assert_eq!(names(&t, path(&t, "y")), [".", "..", "z"]);
    assert_eq!(t.attr(path(&t, "y/z")).unwrap().kind, NodeKind::Dir);
    assert_eq!(names(&t, path(&t, "y/z")), [".", "..", "w"]);
}

/// A hard link listed twice under one name is one link, as tar extraction
/// leaves it (the second `link` replaces the first).
#[test]
fn a_hard_link_listed_twice_counts_once() {
    use tar::EntryType as T;
    let (_, idx) = layer(&[("a", T::Regular, b"x"), ("b", T::Link, b"a"), ("b", T::Link, b"a"), ("c", T::Link, b"a")]);
    let t = LayerTree::new(idx);
    assert_eq!(t.attr(path(&t, "a")).unwrap().nlink, 3);
    assert_eq!(path(&t, "b"), path(&t, "a"));
}
