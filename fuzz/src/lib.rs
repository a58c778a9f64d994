//! The bodies of HyperBox's fuzz targets. `fuzz_targets/*.rs` hand them
//! libFuzzer's inputs; `tests/fuzz_corpus.rs` (in `make test`) includes this
//! file with `#[path]` and replays the committed corpus and cheap mutations
//! of it through the very same functions. So this file uses only `hyperbox`
//! and crates hyperbox itself depends on (zstd).
//!
//! Each body takes any bytes, must never panic on them, and asserts what the
//! library promises of what it accepts (docs/format.md, "Validation").
//! See docs/fuzzing.md.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hyperbox::digest::Digest;
use hyperbox::format::index::limits;
use hyperbox::format::{self, writer, ChunkParams, EntryKind, Index, IndexLocation, LayerIndex, FOOTER_LEN};
use hyperbox::fs::{LayerTree, NodeKind, ROOT};
use hyperbox::labels::{self, LayerLabels, Source, Trust};
use hyperbox::oci::Reference;
use hyperbox::trace::Trace;

/// Tree nodes one input visits at most, and files one input reads at most:
/// an execution stays cheap whatever the index holds.
const MAX_VISIT: usize = 2048;
const MAX_FILE_READS: usize = 32;
/// Bytes of frame data one planned read may make up (frames are up to 8 MiB).
const MAX_PLAN_BYTES: u64 = 32 << 20;

// ---------------------------------------------------------------- index ----

/// What the first byte of an `index` input says the rest is.
pub const INDEX_RAW: u8 = 0;
pub const INDEX_FRAME: u8 = 1;
pub const INDEX_BLOB: u8 = 2;

/// The footer and index decoders, then the layer tree of what they accept.
/// `data[0] % 3` picks what `data[1..]` is: a postcard-encoded index
/// ([`INDEX_RAW`]), an index skippable frame ([`INDEX_FRAME`]) or a whole
/// layer blob ([`INDEX_BLOB`]). Whatever it is, the last 72 bytes of `data`
/// also go through the footer parser.
pub fn index(data: &[u8]) {
    footer(data);
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        INDEX_RAW => raw_index(rest),
        INDEX_FRAME => index_frame(rest),
        _ => blob(rest),
    }
}

fn footer(data: &[u8]) {
    let tail = &data[data.len().saturating_sub(FOOTER_LEN)..];
    if let Ok(loc) = format::parse_footer(tail, data.len() as u64) {
        // Version 1, no flags, a location that ends the blob: the footer
        // encodes back to itself.
        assert_eq!(format::encode_footer(&loc)[..], tail[..], "an accepted footer re-encodes differently");
        assert!(loc.check_bounds(data.len() as u64).is_ok());
    }
}

/// The sum of the frames' compressed lengths in a postcard index, which
/// must be where the index starts: a fuzzer cannot guess it, so the harness
/// reads it from the encoding (docs/format.md, "The index frame"): the
/// varint `tar_size`, 32 bytes of diff_id, three varint chunk parameters,
/// then the `c_len` column, a varint count and as many varints.
fn frames_end(raw: &[u8]) -> Option<u64> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut b = raw;
    varint(&mut b)?;
    b = b.get(32..)?;
    for _ in 0..3 {
        varint(&mut b)?;
    }
    let n = varint(&mut b)?;
    let mut sum = 0u64;
    for _ in 0..n.min(raw.len() as u64) {
        sum = sum.checked_add(varint(&mut b)?)?;
    }
    Some(sum)
}

fn raw_index(raw: &[u8]) {
    let end = frames_end(raw).unwrap_or(0);
    if let Ok(ix) = Index::decode(raw, end) {
        assert_eq!(ix.frames_end(), end);
        tree(Arc::new(ix));
    }
}

fn index_frame(bytes: &[u8]) {
    let offset = bytes.get(24..).and_then(|z| zstd::bulk::decompress(z, 4 << 20).ok()).and_then(|raw| frames_end(&raw));
    let loc = IndexLocation {
        offset: offset.unwrap_or(0),
        length: bytes.len() as u64,
        digest: Digest::of(bytes),
        version: format::FORMAT_VERSION,
    };
    if let Ok(ix) = format::parse_index_frame(bytes, &loc) {
        tree(Arc::new(ix));
    }
}

/// A blob as it comes, then with its footer's digest made to match the
/// bytes it points at (a fuzzer cannot forge sha256; the digest check has
/// its own tests), then every file read through both read paths.
fn blob(bytes: &[u8]) {
    let _ = format::open_layer(bytes, None);
    let Some(sealed) = reseal(bytes) else { return };
    if let Ok((loc, ix)) = format::open_layer(&sealed[..], None) {
        assert!(loc.check_bounds(sealed.len() as u64).is_ok());
        let ix = Arc::new(ix);
        read_files(&sealed, &ix, None);
        tree(ix);
    }
}

fn reseal(bytes: &[u8]) -> Option<Vec<u8>> {
    let f = bytes.len().checked_sub(FOOTER_LEN)?;
    let le = |at: usize| u64::from_le_bytes(bytes[f + at..f + at + 8].try_into().unwrap());
    let (offset, length) = (le(24), le(32));
    let end = offset.checked_add(length).filter(|&e| e <= f as u64)?;
    let mut out = bytes.to_vec();
    out[f + 40..].copy_from_slice(Digest::of(&bytes[offset as usize..end as usize]).as_bytes());
    Some(out)
}

/// Read the files of a layer whose frames are in `blob`: through
/// `format::read_file_range`, and through the tree's read plan with the
/// frames `format::read_frame` verifies; both must give the same bytes, and,
/// when the tar is known, the tar's own bytes.
fn read_files(blob: &[u8], ix: &Arc<LayerIndex>, tar: Option<&[u8]>) {
    let tree = LayerTree::new(ix.clone());
    let files = ix.entries().iter().filter(|e| e.kind == EntryKind::File).take(MAX_FILE_READS);
    for e in files {
        let len = e.size.min(256 << 10);
        let got = format::read_file_range(blob, ix, e, 0, len);
        if let (Some(tar), Ok(got)) = (tar, &got) {
            let mut want = vec![0u8; len as usize];
            for x in format::file_extents(e, 0, len) {
                want[x.out as usize..(x.out + x.len) as usize]
                    .copy_from_slice(&tar[x.tar as usize..(x.tar + x.len) as usize]);
            }
            assert!(got == &want, "{:?}: the layer reads other bytes than the tar holds", e.path);
        }
        if tar.is_some() {
            assert!(got.is_ok(), "{:?}: a converted layer's file does not read: {:?}", e.path, got.err());
        }
        // The same file through the tree, if its path names it.
        let Some(ino) = resolve(&tree, &e.path) else { continue };
        if tree.node_entry(ino).map(|n| n as *const _) != Some(e as *const _) {
            continue;
        }
        let plan = tree.plan_read(ino, 0, len as u32).expect("a file plans a read");
        let frames: Result<Vec<Vec<u8>>, _> = plan.frames.iter().map(|&i| format::read_frame(blob, ix, i)).collect();
        match (frames, got) {
            (Ok(frames), Ok(got)) => {
                let via_tree = plan.try_assemble(ix, &frames).expect("verified frames have their lengths");
                assert!(via_tree == got, "{:?}: the tree and read_file_range read different bytes", e.path);
            }
            (Ok(_), Err(err)) => panic!("{:?}: its frames verify but read_file_range fails: {err}", e.path),
            (Err(_), _) => {}
        }
    }
}

fn resolve(tree: &LayerTree, path: &[u8]) -> Option<u64> {
    if path.is_empty() {
        return Some(ROOT);
    }
    path.split(|&b| b == b'/').try_fold(ROOT, |dir, name| tree.lookup(dir, name).ok())
}

/// Build the tree of an index the decoder accepted and walk it: readdir of
/// each directory, lookup of every name it lists, getattr, readlink,
/// xattrs, and read plans assembled from frames of the right lengths.
pub fn tree(ix: Arc<LayerIndex>) {
    let tree = LayerTree::new(ix.clone());
    assert!(tree.node_count() <= limits::MAX_TREE_NODES, "{} tree nodes", tree.node_count());
    let mut dirs = vec![ROOT];
    let mut seen = HashSet::new();
    let mut visited = 0usize;
    while let Some(dir) = dirs.pop() {
        assert!(seen.insert(dir), "directory {dir} is reached twice");
        let mut listed: Vec<(u64, u64, NodeKind, Vec<u8>)> = Vec::new();
        tree.readdir(dir, 0, &mut |ino, next, kind, name| {
            listed.push((ino, next, kind, name.to_vec()));
            false
        })
        .expect("a directory lists");
        assert!(listed.len() >= 2 && listed[0].3 == b"." && listed[1].3 == b"..");
        assert_eq!((listed[0].0, tree.lookup(dir, b"..")), (dir, Ok(listed[1].0)));
        assert!(listed[2..].windows(2).all(|w| w[0].3 < w[1].3), "readdir names out of order or twice");
        for (pos, (ino, next, kind, name)) in listed.iter().enumerate() {
            assert_eq!(*next, pos as u64 + 1);
            if pos < 2 {
                continue;
            }
            assert_eq!(tree.lookup(dir, name), Ok(*ino), "a name readdir lists does not look up");
            assert!(!name.is_empty() && !name.contains(&b'/') && name != b"." && name != b"..");
            let a = tree.attr(*ino).expect("a listed node has attributes");
            assert_eq!((a.ino, a.kind), (*ino, *kind));
            node(&tree, &ix, *ino, &a);
            if *kind == NodeKind::Dir {
                dirs.push(*ino);
            }
            visited += 1;
            if visited >= MAX_VISIT {
                return;
            }
        }
        // Resuming at an offset starts at that entry.
        let mid = listed.len() / 2;
        let mut first = None;
        tree.readdir(dir, mid as u64, &mut |ino, _, _, _| {
            first = Some(ino);
            true
        })
        .unwrap();
        assert_eq!(first, Some(listed[mid].0));
    }
    let past = tree.node_count() as u64 + 1;
    for ino in [0, past, u64::MAX] {
        assert!(tree.attr(ino).is_err() && tree.lookup(ino, b"x").is_err() && tree.plan_read(ino, 0, 1).is_err());
        assert!(tree.readdir(ino, 0, &mut |_, _, _, _| false).is_err());
    }
    for name in [&b""[..], b"a/b", b".wh..wh..opq", &[0xff; 300]] {
        let _ = tree.lookup(ROOT, name);
    }
}

fn node(tree: &LayerTree, ix: &LayerIndex, ino: u64, a: &hyperbox::fs::NodeAttr) {
    let entry = tree.node_entry(ino);
    if let Some(e) = entry {
        assert_eq!((a.uid, a.gid, a.mtime), (e.uid, e.gid, e.mtime));
    }
    match a.kind {
        NodeKind::Symlink => assert_eq!(tree.readlink(ino).map(|l| l.len() as u64), Ok(a.size)),
        _ => assert!(tree.readlink(ino).is_err()),
    }
    let xattrs = tree.xattrs(ino).expect("a node has an xattr list");
    for (k, v) in &xattrs {
        let first = xattrs.iter().find(|(k2, _)| k2 == k).unwrap().1;
        assert_eq!(tree.getxattr(ino, k), Ok(first));
        let _ = v;
    }
    if a.kind != NodeKind::File {
        assert!(tree.plan_read(ino, 0, 4096).is_err());
        return;
    }
    let e = entry.expect("a file has an entry");
    assert_eq!(a.size, e.size);
    for (offset, size) in
        [(0, 4096), (a.size / 2, 131_072), (a.size.saturating_sub(1), 1), (a.size, 4096), (u64::MAX, 1)]
    {
        plan(tree, ix, e, ino, offset, size);
    }
}

/// The byte frame data holds at tar offset `t`: never zero, so that holes
/// (zeros) and data tell apart.
fn pattern(t: u64) -> u8 {
    (t % 251) as u8 + 1
}

fn plan(tree: &LayerTree, ix: &LayerIndex, e: &format::Entry, ino: u64, offset: u64, size: u32) {
    let plan = tree.plan_read(ino, offset, size).expect("a file plans a read");
    let end = offset.saturating_add(u64::from(size)).min(e.size);
    let len = end.saturating_sub(offset) as usize;
    assert!(plan.frames.windows(2).all(|w| w[0] < w[1]) && plan.frames.iter().all(|&f| f < ix.frames().len()));
    let bytes: u64 = plan.frames.iter().map(|&f| ix.frame_tar_range(f)).map(|(s, e)| e - s).sum();
    if bytes > MAX_PLAN_BYTES {
        return;
    }
    let mut data: Vec<Vec<u8>> = plan
        .frames
        .iter()
        .map(|&f| {
            let (s, e) = ix.frame_tar_range(f);
            (s..e).map(pattern).collect()
        })
        .collect();
    let got = plan.try_assemble(ix, &data).expect("frames of the index's lengths assemble");
    let mut want = vec![0u8; len];
    if offset < end {
        for x in format::file_extents(e, offset, end) {
            for i in 0..x.len {
                want[(x.out + i) as usize] = pattern(x.tar + i);
            }
        }
    }
    assert!(got == want, "a planned read of {size} at {offset} assembles other bytes");
    // A frame of another length is an error, never a panic or other bytes.
    if let Some(d) = data.first_mut() {
        d.pop();
        assert!(plan.try_assemble(ix, &data).is_err());
        data.truncate(0);
        assert!(plan.try_assemble(ix, &data).is_err());
    }
}

// -------------------------------------------------------------- convert ----

/// Write options that make small inputs cut into several chunks and packed
/// frames: the smallest FastCDC allows.
pub fn convert_options() -> writer::WriteOptions {
    writer::WriteOptions {
        chunk: ChunkParams { min: 64, avg: 256, max: 1024 },
        level: 1,
        small_file_max: 512,
        pack_frame_max: 1024,
        batch_bytes: 16 << 10,
    }
}

/// The converter on any bytes as a tar. What it accepts must open as a
/// layer at the location it reported, decompress (as any zstd tool would)
/// to exactly the input, and read back every file's bytes from the tar.
pub fn convert(tar: &[u8]) {
    let mut blob = Vec::new();
    let Ok(out) = writer::convert_tar(tar, &mut blob, &convert_options()) else { return };
    let (loc, ix) = format::open_layer(&blob[..], None).expect("the converter's own layer opens");
    assert_eq!(loc, out.location);
    assert_eq!((out.blob_size, &out.blob_digest), (blob.len() as u64, &Digest::of(&blob)));
    assert_eq!(out.diff_id, Digest::of(tar), "diff_id is not the input's sha256");
    let plain = zstd::stream::decode_all(&blob[..]).expect("the layer decompresses with plain zstd");
    assert!(plain == tar, "the layer decompresses to other bytes than its tar");
    assert_eq!(ix.index.tar_size, tar.len() as u64);
    let ix = Arc::new(ix);
    read_files(&blob, &ix, Some(tar));
    tree(ix);
}

// ---------------------------------------------------------------- trace ----

/// A trace as the store keeps one: what an imported one is merged into.
pub const BASE_TRACE: &str = r#"{"version":1,"image":"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae","repository":"registry.example/app","runs":3,"updated":1700000000,"entries":[{"layer":"sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9","frame":0,"chunk":"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262","c_len":100,"u_len":400,"path":"bin/sh","offset":0,"at_ms":5,"seen":3},{"layer":"sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9","frame":7,"chunk":"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262","c_len":4294967295,"u_len":4294967295,"at_ms":4294967295,"seen":4294967295}]}"#;

/// Trace import: `Trace::from_json`, a round trip through `to_json`, then
/// merges with an existing trace both ways and with itself.
pub fn trace(data: &[u8]) {
    let Ok(t) = Trace::from_json(data) else { return };
    let again = Trace::from_json(&t.to_json()).expect("an accepted trace serializes to an acceptable one");
    // The report's two f64 may move by an ulp through serde_json's parser.
    let exact = |t: &Trace| Trace { last_start: None, ..t.clone() };
    assert!(exact(&again) == exact(&t), "a trace changes through to_json and from_json");
    assert_eq!(again.last_start.map(|s| s.at), t.last_start.as_ref().map(|s| s.at));
    let max = 1 + data.len() % 8;
    let mut base = Trace::from_json(BASE_TRACE.as_bytes()).unwrap();
    base.merge_run(t.entries.clone(), max);
    merged(&base, max, 4);
    assert!(base.entries.iter().all(|e| e.seen >= 1), "a merged entry seen by no run");
    let mut imported = t.clone();
    imported.merge_run(Trace::from_json(BASE_TRACE.as_bytes()).unwrap().entries, usize::MAX);
    merged(&imported, usize::MAX, t.runs.saturating_add(1));
    imported.merge_run(t.entries.clone(), t.entries.len());
    merged(&imported, t.entries.len(), t.runs.saturating_add(2));
}

fn merged(t: &Trace, max: usize, runs: u32) {
    assert!(t.entries.len() <= max);
    assert!(t.entries.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "merged entries out of time order");
    assert_eq!(t.runs, runs);
    let _ = t.bytes();
    Trace::from_json(&t.to_json()).expect("a merged trace serializes to an acceptable one");
}

// --------------------------------------------------------------- labels ----

/// Label keys `@0`..`@9` (and `@a`…) in a `labels` input stand for.
pub const KEYS: [&str; 15] = [
    labels::TARGET,
    labels::PULL_TOKEN,
    labels::IMAGE_REF,
    labels::LAYER_DIGEST,
    labels::HYDRATE,
    labels::CRI_IMAGE_REF,
    labels::CRI_LAYER_DIGEST,
    labels::CRI_MANIFEST_DIGEST,
    format::ANN_VERSION,
    format::ANN_INDEX_OFFSET,
    format::ANN_INDEX_LENGTH,
    format::ANN_INDEX_DIGEST,
    "containerd.io/snapshot/cri.image-layers",
    "containerd.io/snapshot/other",
    labels::PLAIN_HTTP,
];

/// containerd's label protocol and the strings images hand it: lines of
/// `data` (lossy UTF-8) are a snapshot key, the daemon's pull token, then
/// `key=value` labels (`@N` names `KEYS[N]`). Checks who is believed, the
/// namespace parser, the index location annotations, and digest and image
/// reference parsing (each line is tried as both).
pub fn labels(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let key = lines.next().unwrap_or("");
    let token = lines.next().unwrap_or("");
    let mut map = HashMap::new();
    for l in lines.clone() {
        let (k, v) = l.split_once('=').unwrap_or((l, ""));
        let k = match k.strip_prefix('@').and_then(|n| n.chars().next()).and_then(|c| c.to_digit(16)) {
            Some(n) => KEYS.get(n as usize).copied().unwrap_or(k),
            None => k,
        };
        map.insert(k.to_string(), v.to_string());
    }

    let ll = LayerLabels::read(&map, key, Trust { pull_token: token });
    let get = |k: &str| map.get(k).map(String::as_str);
    assert_eq!(ll.target, get(labels::TARGET));
    let cri = labels::namespace_of(key) == Some(labels::CRI_NAMESPACE);
    match ll.source {
        Source::Pull => {
            assert!(!token.is_empty() && get(labels::PULL_TOKEN) == Some(token), "a pull believed without the token");
            assert_eq!((ll.image_ref, ll.layer_digest), (get(labels::IMAGE_REF), get(labels::LAYER_DIGEST)));
            assert_eq!(ll.hydrate, get(labels::HYDRATE) == Some("true"));
            assert_eq!(ll.plain_http, get(labels::PLAIN_HTTP) == Some("true"));
        }
        Source::Cri => {
            assert!(cri, "CRI labels believed outside the CRI namespace");
            assert!(token.is_empty() || get(labels::PULL_TOKEN) != Some(token));
            assert_eq!((ll.image_ref, ll.layer_digest), (get(labels::CRI_IMAGE_REF), get(labels::CRI_LAYER_DIGEST)));
            assert!(!ll.hydrate && !ll.plain_http);
        }
        Source::Unknown => {
            assert!(!cri && (token.is_empty() || get(labels::PULL_TOKEN) != Some(token)));
            assert!(ll.image_ref.is_none() && ll.layer_digest.is_none() && ll.manifest_digest.is_none() && !ll.hydrate);
            assert!(!ll.plain_http);
        }
    }
    for k in map.keys() {
        if k == labels::PULL_TOKEN || k == labels::HYDRATE || k == labels::PLAIN_HTTP {
            assert!(!labels::keep_on_commit(k));
        }
    }

    if let Ok(Some(loc)) = IndexLocation::from_annotations(&map) {
        let again = IndexLocation::from_annotations(&loc.to_annotations()).expect("its own annotations parse");
        assert_eq!(again.as_ref(), Some(&loc));
        let _ = loc.check_bounds(loc.offset.wrapping_add(loc.length).wrapping_add(FOOTER_LEN as u64));
        let _ = loc.check_bounds(u64::MAX);
    }

    for s in std::iter::once(key).chain(Some(token)).chain(lines.flat_map(|l| l.split('='))) {
        strings(s);
    }
}

fn strings(s: &str) {
    if let Some(ns) = labels::namespace_of(s) {
        assert!(!ns.is_empty() && !ns.contains('/') && s.starts_with(ns) && s[ns.len()..].starts_with('/'));
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s, "a digest prints otherwise than it parsed");
    }
    if let Ok(r) = s.parse::<Reference>() {
        let shown = r.to_string();
        let again = shown.parse::<Reference>().unwrap_or_else(|e| panic!("{s:?} parses, prints as {shown:?}: {e}"));
        assert_eq!(again, r, "{s:?} prints as {shown:?}, which parses otherwise");
        let _ = r.target();
    }
}

// ------------------------------------------------------------ fuse_request ----

/// A small read-only tree for the FUSE server: the root (1) holds `f` (2,
/// 300 bytes) and `d` (3, a directory holding 200 names that resolve to
/// `f`).
struct FuzzFs;

const FUZZ_FILE: &[u8] = &[0x5a; 300];

fn fuzz_attr(ino: u64) -> Result<hyperbox_fuse::Attr, i32> {
    use hyperbox_fuse::{Attr, Kind};
    let (kind, size) = match ino {
        1 | 3 => (Kind::Dir, 0),
        2 => (Kind::File, FUZZ_FILE.len() as u64),
        _ => return Err(libc_enoent()),
    };
    Ok(Attr { ino, kind, size, perm: 0o4755, nlink: 1, uid: 0, gid: 0, rdev: 0, mtime: i64::MAX, mtime_nsec: u32::MAX })
}

fn libc_enoent() -> i32 {
    2
}

impl hyperbox_fuse::ReadOnlyFs for FuzzFs {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<hyperbox_fuse::Attr, i32> {
        match (parent, name) {
            (1, b"f") | (3, _) => fuzz_attr(2),
            (1, b"d") => fuzz_attr(3),
            _ => Err(libc_enoent()),
        }
    }
    fn getattr(&self, ino: u64) -> Result<hyperbox_fuse::Attr, i32> {
        fuzz_attr(ino)
    }
    fn readlink(&self, _ino: u64) -> Result<Vec<u8>, i32> {
        Err(22)
    }
    fn readdir(
        &self,
        ino: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, u64, hyperbox_fuse::Kind, &[u8]) -> bool,
    ) -> Result<(), i32> {
        self.readdirplus(ino, offset, &mut |a, next, name| add(a.ino, next, a.kind, name))
    }
    fn readdirplus(
        &self,
        ino: u64,
        offset: u64,
        add: &mut dyn FnMut(&hyperbox_fuse::Attr, u64, &[u8]) -> bool,
    ) -> Result<(), i32> {
        let names: Vec<(u64, Vec<u8>)> = match ino {
            1 => vec![(2, b"f".to_vec()), (3, b"d".to_vec())],
            3 => (0..200).map(|i| (2, format!("name-{i:0>200}").into_bytes())).collect(),
            _ => return Err(20),
        };
        for (i, (child, name)) in names.iter().enumerate().skip(offset.min(1 << 20) as usize) {
            if add(&fuzz_attr(*child)?, i as u64 + 1, name) {
                break;
            }
        }
        Ok(())
    }
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, i32> {
        match (ino, name) {
            (3, b"trusted.overlay.opaque") => Ok(b"y".to_vec()),
            _ => Err(61),
        }
    }
    fn listxattr(&self, ino: u64) -> Result<Vec<u8>, i32> {
        Ok(if ino == 3 { b"trusted.overlay.opaque\0".to_vec() } else { Vec::new() })
    }
    fn read(&self, _ino: u64, offset: u64, size: u32, _pid: u32, reply: hyperbox_fuse::ReadReply) {
        let start = (offset.min(FUZZ_FILE.len() as u64)) as usize;
        reply.data(&FUZZ_FILE[start..(start + size as usize).min(FUZZ_FILE.len())]);
    }
}

/// One FUSE request, as `read(2)` on /dev/fuse would return it, through the
/// server's parser and dispatch. Every request with a readable header gets
/// exactly one well-formed reply (none for FORGET and BATCH_FORGET): its
/// length is what was written, its `unique` the request's, its error a
/// negated errno; a READ's data and a listing are never longer than asked,
/// and a listing's records are well formed. Nothing panics.
pub fn fuse_request(data: &[u8]) {
    use hyperbox_fuse::abi::{self, Op};
    // Make the header's length agree with the input more often than not,
    // so the fuzzer spends its time past the header.
    let mut req = data.to_vec();
    if req.len() >= abi::IN_HEADER_LEN && req[0] & 1 == 0 {
        let len = (req.len() as u32).to_ne_bytes();
        req[..4].copy_from_slice(&len);
    }
    let state = hyperbox_fuse::ConnState {
        minor: abi::MINOR,
        offered: u64::from(data.first().copied().unwrap_or(0)) << 16,
        flags: 0,
        max_readahead: 131072,
        max_write: 4096,
        max_pages: 256,
    };
    let replies = hyperbox_fuse::handle_one(FuzzFs, state, &req).expect("replies read back whole");
    let Ok((h, op)) = abi::parse(&req) else {
        assert!(replies.is_empty(), "a request without a header was answered");
        return;
    };
    if matches!(op, Ok(Op::Forget | Op::BatchForget)) {
        assert!(replies.is_empty(), "a FORGET was answered");
        return;
    }
    assert_eq!(replies.len(), 1, "not exactly one reply to {op:?}");
    let r = &replies[0];
    let len = u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize;
    let error = i32::from_ne_bytes(r[4..8].try_into().unwrap());
    let unique = u64::from_ne_bytes(r[8..16].try_into().unwrap());
    assert_eq!(len, r.len());
    assert_eq!(unique, h.unique, "the reply's unique");
    assert!((-4095..=0).contains(&error), "error {error}");
    let body = &r[abi::OUT_HEADER_LEN..];
    if error != 0 {
        assert!(body.is_empty(), "an error with a payload");
        return;
    }
    match op.expect("answered without an error") {
        Op::Read { size, .. } => assert!(body.len() <= size as usize),
        Op::Readdir { size, .. } => check_dirents(body, size, false),
        Op::Readdirplus { size, .. } => check_dirents(body, size, true),
        Op::Lookup { .. } => assert_eq!(body.len(), abi::ENTRY_OUT_LEN),
        Op::Getattr => assert_eq!(body.len(), abi::ATTR_OUT_LEN),
        Op::Statfs => assert_eq!(body.len(), abi::STATFS_OUT_LEN),
        Op::Getxattr { size, .. } | Op::Listxattr { size } => {
            assert!(if size == 0 { body.len() == abi::GETXATTR_OUT_LEN } else { body.len() <= size as usize })
        }
        _ => {}
    }
}

fn check_dirents(mut body: &[u8], size: u32, plus: bool) {
    use hyperbox_fuse::abi;
    assert!(body.len() <= size as usize, "a listing longer than asked");
    let skip = if plus { abi::ENTRY_OUT_LEN } else { 0 };
    while !body.is_empty() {
        assert!(body.len() >= skip + abi::DIRENT_LEN, "a truncated record");
        let namelen = u32::from_ne_bytes(body[skip + 16..skip + 20].try_into().unwrap()) as usize;
        assert!((1..=255).contains(&namelen), "name length {namelen}");
        let rec = (skip + abi::DIRENT_LEN + namelen + 7) & !7;
        assert!(rec <= body.len(), "a record past the listing");
        body = &body[rec..];
    }
}
