//! The layer index: every tar entry's metadata and the table of frames.
//!
//! Encoding: the [`Index`] struct in postcard's wire format (stable since
//! postcard 1.0, varint integers), zstd-compressed. Frame offsets are not
//! stored: frames tile the compressed blob from offset 0 and the tar stream
//! from offset 0, so offsets are prefix sums. That makes the encoding compact
//! and the bounds check trivial: the sums must equal the blob's sizes.

use serde::{Deserialize, Serialize};

use super::FormatError;
use crate::digest::ChunkId;

/// Hard limits a reader enforces before and while decoding an index, so a
/// malicious layer cannot make the daemon allocate or loop without bound.
/// docs/format.md ("Limits") lists them with their reasons; keep both in step.
pub mod limits {
    /// Compressed index bytes (the skippable frame's payload).
    pub const MAX_INDEX_COMPRESSED: u64 = 64 << 20;
    /// Decoded index bytes.
    pub const MAX_INDEX_RAW: u64 = 128 << 20;
    /// Memory the decoded index may take (its vectors, strings and boxes),
    /// whatever its encoded size: at most 8 times the decoded bytes plus
    /// 16 MiB, and never more than this.
    pub const MAX_INDEX_MEMORY: usize = 1 << 30;
    /// Tar entries. The largest layers we know hold about 100k files (a
    /// Debian python3+numpy+scipy layer holds 40k); a 2M-entry index would
    /// need paths under 60 bytes to fit `MAX_INDEX_RAW` anyway.
    pub const MAX_ENTRIES: usize = 2_000_000;
    /// Nodes of the layer's tree: entries plus the directories their paths
    /// imply (and imply again after a later entry replaced them). Room for
    /// `MAX_ENTRIES` plus as many implied directories; each node costs the
    /// tree about 50 bytes.
    pub const MAX_TREE_NODES: usize = 4 << 20;
    pub const MAX_FRAMES: usize = 4_000_000;
    /// Largest uncompressed frame. The converter's chunks are far smaller;
    /// this bounds the memory one read can need.
    pub const MAX_FRAME_LEN: u32 = 8 << 20;
    /// Largest compressed frame: zstd's worst case for `MAX_FRAME_LEN`
    /// (ZSTD_COMPRESSBOUND: n + n/256, plus a margin for small inputs).
    pub const MAX_FRAME_COMPRESSED: u32 = MAX_FRAME_LEN + (MAX_FRAME_LEN >> 8) + (128 << 10);
    /// Bytes of a path or link target: Linux's PATH_MAX. containerd
    /// unpacks a layer by full paths, and the kernel refuses longer ones
    /// (and symlink targets longer than this).
    pub const MAX_PATH: usize = 4096;
    /// Bytes of one path component: Linux's NAME_MAX.
    pub const MAX_NAME: usize = 255;
    /// Components of a path. Deep JRE and node_modules trees stay under
    /// 100; a 4096-byte path has at most 2048 components.
    pub const MAX_PATH_DEPTH: usize = 1024;
    pub const MAX_XATTRS_PER_ENTRY: usize = 1024;
    pub const MAX_XATTR_VALUE: usize = 64 << 10;
    /// Bytes of an xattr's name: Linux's XATTR_NAME_MAX.
    pub const MAX_XATTR_NAME: usize = 255;
    pub const MAX_SPARSE_SEGMENTS: usize = 1 << 20;
}

/// Bounded decoding. postcard would happily decode 20 MB of zstd-squeezed
/// empty xattrs into half a gigabyte; every sequence and byte string of the
/// index is therefore decoded through these helpers, which charge the memory
/// it will occupy against a budget set for the decode and fail once it is
/// spent. Outside [`with_budget`] nothing is charged.
pub(crate) mod budget {
    use std::cell::Cell;
    use std::marker::PhantomData;

    use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

    thread_local! {
        static LEFT: Cell<Option<usize>> = const { Cell::new(None) };
        static EXHAUSTED: Cell<bool> = const { Cell::new(false) };
    }

    /// Run `f` with `bytes` of decoding budget on this thread; the flag says
    /// whether the budget ran out (decoders may hide the error's message).
    pub fn with_budget<T>(bytes: usize, f: impl FnOnce() -> T) -> (T, bool) {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                LEFT.with(|l| l.set(None));
                EXHAUSTED.with(|e| e.set(false));
            }
        }
        LEFT.with(|l| l.set(Some(bytes)));
        EXHAUSTED.with(|e| e.set(false));
        let _reset = Reset;
        let out = f();
        (out, EXHAUSTED.with(|e| e.get()))
    }

    pub const EXHAUSTED_MSG: &str = "index needs more memory than its size allows (malformed or malicious)";

    fn charge<E: de::Error>(n: usize) -> Result<(), E> {
        LEFT.with(|l| match l.get() {
            None => Ok(()),
            Some(left) if n <= left => {
                l.set(Some(left - n));
                Ok(())
            }
            Some(_) => {
                EXHAUSTED.with(|e| e.set(true));
                Err(E::custom(EXHAUSTED_MSG))
            }
        })
    }

    /// Room left, to size an allocation up front without trusting a length.
    fn room(elem: usize) -> usize {
        LEFT.with(|l| l.get()).map_or(4096, |left| left / elem.max(1))
    }

    pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<T>, A::Error> {
                let elem = std::mem::size_of::<T>();
                let hint = a.size_hint().unwrap_or(0);
                // postcard gives no hint when the declared length is more
                // than the bytes left (tests/index_alloc.rs holds it to
                // that), so the capacity taken up front is bounded by both
                // the input and the budget; past it, items are charged as
                // they arrive.
                charge::<A::Error>(hint.min(room(elem)) * elem)?;
                let mut out = Vec::with_capacity(hint.min(room(elem) + 1));
                while let Some(x) = a.next_element()? {
                    if out.len() >= hint {
                        charge::<A::Error>(elem)?;
                    }
                    out.push(x);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(PhantomData))
    }

    pub fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
        charge::<D::Error>(v.len())?;
        Ok(v.into_vec())
    }

    pub fn boxed<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Box<T>>, D::Error> {
        let v: Option<T> = Option::deserialize(d)?;
        if v.is_some() {
            charge::<D::Error>(std::mem::size_of::<T>())?;
        }
        Ok(v.map(Box::new))
    }
}

/// One zstd frame of the blob. It decompresses to `u_len` bytes of the tar
/// whose blake3 is `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub c_len: u32,
    pub u_len: u32,
    pub id: ChunkId,
}

/// The frame table, stored by column: the lengths as varint arrays and the
/// 32-byte ids back to back in one byte string. Columns decode with a few
/// copies (a 100k-entry index has a quarter of a million frames) and
/// compress better than interleaved records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameTable {
    #[serde(deserialize_with = "budget::seq")]
    c_len: Vec<u32>,
    #[serde(deserialize_with = "budget::seq")]
    u_len: Vec<u32>,
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "budget::bytes")]
    ids: Vec<u8>,
}

impl FrameTable {
    pub fn len(&self) -> usize {
        self.c_len.len()
    }
    pub fn is_empty(&self) -> bool {
        self.c_len.is_empty()
    }
    pub fn get(&self, i: usize) -> Frame {
        Frame {
            c_len: self.c_len[i],
            u_len: self.u_len[i],
            id: ChunkId(self.ids[32 * i..32 * i + 32].try_into().unwrap()),
        }
    }
    pub fn set(&mut self, i: usize, f: Frame) {
        self.c_len[i] = f.c_len;
        self.u_len[i] = f.u_len;
        self.ids[32 * i..32 * i + 32].copy_from_slice(&f.id.0);
    }
    pub fn push(&mut self, f: Frame) {
        self.c_len.push(f.c_len);
        self.u_len.push(f.u_len);
        self.ids.extend_from_slice(&f.id.0);
    }
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Frame> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
    /// Whether the columns agree in length.
    fn consistent(&self) -> bool {
        self.u_len.len() == self.c_len.len() && self.ids.len() == 32 * self.c_len.len()
    }
}

impl FromIterator<Frame> for FrameTable {
    fn from_iter<I: IntoIterator<Item = Frame>>(iter: I) -> Self {
        let mut t = FrameTable::default();
        for f in iter {
            t.push(f);
        }
        t
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "budget::bytes")]
    pub name: Vec<u8>,
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "budget::bytes")]
    pub value: Vec<u8>,
}

/// A data segment of a sparse file: `len` bytes at file offset `offset`.
/// Segments are stored back to back in the tar entry's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseSegment {
    pub offset: u64,
    pub len: u64,
}

/// One tar entry, with its metadata resolved (GNU long names, PAX records).
///
/// Kept small (80 bytes): what few entries have (a link target, device
/// numbers, xattrs, a sparse map) lives in `extra`, boxed. A 100k-entry index
/// decodes about three times faster than with every field inline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalized relative path: no leading `/` or `./`, no trailing `/`, no
    /// `.` or `..` components. The root directory is the empty path.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "budget::bytes")]
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits plus setuid, setgid and sticky (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Logical size of a regular file (the real size for a sparse file).
    pub size: u64,
    /// Offset in the tar stream of the entry's data (regular files).
    pub data_offset: u64,
    #[serde(deserialize_with = "budget::boxed")]
    pub extra: Option<Box<EntryExtra>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryExtra {
    /// Symlink target, or for a hard link the normalized path it links to.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "budget::bytes")]
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    #[serde(deserialize_with = "budget::seq")]
    pub xattrs: Vec<Xattr>,
    /// Data segments of a sparse file, in order; empty otherwise.
    #[serde(deserialize_with = "budget::seq")]
    pub sparse: Vec<SparseSegment>,
}

impl Entry {
    pub fn new(path: Vec<u8>, kind: EntryKind) -> Self {
        Entry { path, kind, mode: 0, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, size: 0, data_offset: 0, extra: None }
    }
    pub fn extra_mut(&mut self) -> &mut EntryExtra {
        self.extra.get_or_insert_with(Default::default)
    }
    pub fn link(&self) -> &[u8] {
        self.extra.as_ref().map_or(&[], |x| &x.link)
    }
    pub fn device(&self) -> (u32, u32) {
        self.extra.as_ref().map_or((0, 0), |x| (x.dev_major, x.dev_minor))
    }
    pub fn xattrs(&self) -> &[Xattr] {
        self.extra.as_ref().map_or(&[], |x| &x.xattrs)
    }
    pub fn sparse(&self) -> &[SparseSegment] {
        self.extra.as_ref().map_or(&[], |x| &x.sparse)
    }
    /// Bytes of data stored in the tar: `size`, or for a sparse file the sum
    /// of its segments (validated not to overflow).
    pub fn data_len(&self) -> u64 {
        match self.sparse() {
            [] => self.size,
            segs => segs.iter().map(|s| s.len).sum(),
        }
    }
}

/// Chunking parameters the converter used (informative; readers ignore them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    /// See docs/format.md, "Chunk size", for the measurement behind this.
    fn default() -> Self {
        Self { min: 64 << 10, avg: 128 << 10, max: 512 << 10 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Length of the uncompressed tar stream.
    pub tar_size: u64,
    /// sha256 of the uncompressed tar: the layer's diff_id.
    pub diff_id: [u8; 32],
    pub chunk_params: ChunkParams,
    pub frames: FrameTable,
    #[serde(deserialize_with = "budget::seq")]
    pub entries: Vec<Entry>,
}

/// A validated index with derived offset tables, ready for lookups.
#[derive(Clone, Debug)]
pub struct LayerIndex {
    pub index: Index,
    /// `c_offsets[i]` is where frame i starts in the blob; one extra element
    /// holds the total (= the index's offset).
    c_offsets: Vec<u64>,
    /// `u_offsets[i]` is where frame i starts in the tar; one extra element
    /// holds the total (= tar_size).
    u_offsets: Vec<u64>,
}

impl Index {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// Decode and validate. `frames_end` is the blob offset where frames must
    /// end (the index's own offset).
    pub fn decode(raw: &[u8], frames_end: u64) -> Result<LayerIndex, FormatError> {
        // A real index takes at most about 8 times its encoded size in memory
        // (an 80-byte Entry is at least 10 bytes encoded, plus its path, which
        // costs the same in both); allow that, no more.
        let budget = raw.len().saturating_mul(8).saturating_add(16 << 20).min(limits::MAX_INDEX_MEMORY);
        let (decoded, exhausted) = budget::with_budget(budget, || postcard::from_bytes::<Index>(raw));
        let index = decoded.map_err(|e| {
            FormatError::Corrupt(if exhausted {
                budget::EXHAUSTED_MSG.to_string()
            } else {
                format!("index does not decode: {e}")
            })
        })?;
        index.validate(frames_end)
    }

    /// Check every invariant a reader relies on, and build the offset tables.
    pub fn validate(self, frames_end: u64) -> Result<LayerIndex, FormatError> {
        let (c_offsets, u_offsets) = self.check(frames_end)?;
        Ok(LayerIndex { index: self, c_offsets, u_offsets })
    }

    /// Check every invariant; returns the frames' blob and tar offsets.
    pub fn check(&self, frames_end: u64) -> Result<(Vec<u64>, Vec<u64>), FormatError> {
        use limits::*;
        let bad = |m: String| Err(FormatError::Corrupt(m));
        if !self.frames.consistent() {
            return bad("frame table columns differ in length".into());
        }
        if self.frames.len() > MAX_FRAMES {
            return bad(format!("{} frames exceeds the limit of {MAX_FRAMES}", self.frames.len()));
        }
        if self.entries.len() > MAX_ENTRIES {
            return bad(format!("{} entries exceeds the limit of {MAX_ENTRIES}", self.entries.len()));
        }
        let mut c_offsets = Vec::with_capacity(self.frames.len() + 1);
        let mut u_offsets = Vec::with_capacity(self.frames.len() + 1);
        let (mut c, mut u) = (0u64, 0u64);
        for (i, (&c_len, &u_len)) in self.frames.c_len.iter().zip(&self.frames.u_len).enumerate() {
            let f = Frame { c_len, u_len, id: ChunkId([0; 32]) };
            if f.u_len == 0 || f.c_len == 0 || f.u_len > MAX_FRAME_LEN || f.c_len > MAX_FRAME_COMPRESSED {
                return bad(format!(
                    "frame {i} has invalid lengths (compressed {}, uncompressed {})",
                    f.c_len, f.u_len
                ));
            }
            c_offsets.push(c);
            u_offsets.push(u);
            c += f.c_len as u64;
            u += f.u_len as u64;
        }
        c_offsets.push(c);
        u_offsets.push(u);
        if c != frames_end {
            return bad(format!("frames end at blob offset {c}, but the index starts at {frames_end}"));
        }
        if u != self.tar_size {
            return bad(format!("frames hold {u} tar bytes, but the tar is {} bytes", self.tar_size));
        }
        for (i, e) in self.entries.iter().enumerate() {
            let name = || String::from_utf8_lossy(&e.path).into_owned();
            if e.path.len() > MAX_PATH || !is_normalized(&e.path) {
                return bad(format!("entry {i} has an invalid path {:?}", name()));
            }
            if e.link().len() > MAX_PATH || (e.kind == EntryKind::Hardlink && !is_normalized(e.link())) {
                return bad(format!("entry {:?} has an invalid link target", name()));
            }
            if e.kind != EntryKind::File && (e.size != 0 || !e.sparse().is_empty()) {
                return bad(format!("entry {:?}: a {:?} cannot have data", name(), e.kind));
            }
            if e.xattrs().len() > MAX_XATTRS_PER_ENTRY
                || e.xattrs().iter().any(|x| x.value.len() > MAX_XATTR_VALUE || x.name.len() > MAX_XATTR_NAME)
            {
                return bad(format!("entry {:?}: too many or too large xattrs", name()));
            }
            if e.sparse().len() > MAX_SPARSE_SEGMENTS {
                return bad(format!("entry {:?}: too many sparse segments", name()));
            }
            // Sparse segments in order, inside the file; this also bounds
            // their sum by the size, so data_len() cannot overflow.
            let mut pos = 0u64;
            for seg in e.sparse() {
                let end = seg.offset.checked_add(seg.len);
                if seg.offset < pos || end.is_none_or(|end| end > e.size) {
                    return bad(format!("entry {:?}: sparse map out of order or past the file size", name()));
                }
                pos = seg.offset + seg.len;
            }
            let end = e.data_offset.checked_add(e.data_len());
            if end.is_none_or(|end| end > self.tar_size) {
                return bad(format!("entry {:?}: data outside the tar ({}+{})", name(), e.data_offset, e.data_len()));
            }
            if e.mtime_nsec >= 1_000_000_000 {
                return bad(format!("entry {:?}: mtime has {} nanoseconds past the second", name(), e.mtime_nsec));
            }
        }
        self.check_chunk_lengths()?;
        self.check_tree_shape()?;
        Ok((c_offsets, u_offsets))
    }

    /// A chunk id is the blake3 of the chunk's bytes, so every frame with
    /// one id has one length (the store keeps one chunk per id, and a read
    /// assembles `u_len` bytes from it). Compressed lengths may differ:
    /// each frame is checked against its id when read.
    fn check_chunk_lengths(&self) -> Result<(), FormatError> {
        use std::collections::hash_map::Entry;
        let mut seen: std::collections::HashMap<&[u8], u32, ahash::RandomState> =
            std::collections::HashMap::with_capacity_and_hasher(self.frames.len(), ahash::RandomState::new());
        for (id, u_len) in self.frames.ids.chunks_exact(32).zip(self.frames.u_len.iter().copied()) {
            match seen.entry(id) {
                Entry::Occupied(o) if *o.get() != u_len => {
                    return Err(FormatError::Corrupt(format!(
                        "chunk {} is listed with two lengths ({} and {} bytes)",
                        hex::encode(id),
                        o.get(),
                        u_len
                    )))
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(v) => {
                    v.insert(u_len);
                }
            }
        }
        Ok(())
    }

    /// Check every name and count the nodes of the tree a reader builds
    /// (`fs::LayerTree`): each entry's node, plus each directory its path
    /// implies where no directory of that name is (which, after a later
    /// entry replaced a directory by a file, can be once more per entry).
    /// The walk looks each component up under its parent, so it costs the
    /// paths' length, never their length times their depth.
    fn check_tree_shape(&self) -> Result<(), FormatError> {
        use limits::*;
        const ROOT: u32 = 0;
        // (parent, name) -> (node, is a directory). Sized for the entries up
        // front (implied directories are few next to them), and hashed
        // with ahash: a randomly seeded hash, so crafted names cannot
        // collide on purpose, and several times faster than SipHash on
        // these short keys (index-100k/parse+verify: docs/benchmarks.md).
        let mut names: std::collections::HashMap<(u32, &[u8]), (u32, bool), ahash::RandomState> =
            std::collections::HashMap::with_capacity_and_hasher(self.entries.len() + 16, ahash::RandomState::new());
        let mut nodes: usize = 1;
        let too_many = || {
            Err(FormatError::Corrupt(format!(
                "the entries' paths make more than {MAX_TREE_NODES} tree nodes (entries and the directories they imply)"
            )))
        };
        for e in &self.entries {
            if e.path.is_empty() {
                continue;
            }
            let shown = || String::from_utf8_lossy(&e.path).into_owned();
            let mut parts = e.path.split(|&b| b == b'/').peekable();
            let mut dir = ROOT;
            let mut depth = 0usize;
            while let Some(part) = parts.next() {
                depth += 1;
                if depth > MAX_PATH_DEPTH {
                    return Err(FormatError::Corrupt(format!(
                        "entry {:?}: path deeper than {MAX_PATH_DEPTH} components",
                        shown()
                    )));
                }
                let last = parts.peek().is_none();
                let name = if last { shown_name(part) } else { part };
                if part.len() > MAX_NAME || name == b"." || name == b".." {
                    return Err(FormatError::Corrupt(format!(
                        "entry {:?}: invalid name {:?}",
                        shown(),
                        shown_str(part)
                    )));
                }
                if last {
                    if part == OPAQUE_MARKER {
                        break;
                    }
                    let is_dir = e.kind == EntryKind::Dir && name.len() == part.len();
                    match names.get(&(dir, name)) {
                        Some(&(_, true)) if is_dir => {}
                        _ => {
                            // A hard link adds no node; counted as one, the
                            // bound only gets safer.
                            nodes += 1;
                            names.insert((dir, name), (nodes as u32, is_dir));
                        }
                    }
                } else {
                    dir = match names.get(&(dir, part)) {
                        Some(&(node, true)) => node,
                        _ => {
                            nodes += 1;
                            names.insert((dir, part), (nodes as u32, true));
                            nodes as u32
                        }
                    };
                }
                if nodes > MAX_TREE_NODES {
                    return too_many();
                }
            }
        }
        Ok(())
    }
}

/// The name of a path's last component as a tree shows it: the name a
/// whiteout `.wh.NAME` hides, else the component itself.
pub fn shown_name(last: &[u8]) -> &[u8] {
    match last.strip_prefix(WHITEOUT_PREFIX) {
        Some(hidden) if !hidden.is_empty() && last != OPAQUE_MARKER => hidden,
        _ => last,
    }
}

fn shown_str(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The prefix of an overlayfs whiteout's name (`.wh.NAME` hides `NAME`).
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The name of overlayfs' opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// A path is normalized if it is empty (the root) or a `/`-joined list of
/// components none of which is empty, `.` or `..`, and it holds no NUL.
pub fn is_normalized(p: &[u8]) -> bool {
    p.is_empty() || (!p.contains(&0) && p.split(|&b| b == b'/').all(|c| !c.is_empty() && c != b"." && c != b".."))
}

/// Normalize a tar path (`./a//b/`, `/a/b`) to the index's form, or `None`
/// if it climbs out of the root (`..`) or holds a NUL.
pub fn normalize_path(p: &[u8]) -> Option<Vec<u8>> {
    if p.contains(&0) {
        return None;
    }
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(c),
        }
    }
    Some(out.join(&b'/'))
}

impl LayerIndex {
    /// About how many bytes of memory this index holds: its entries, their
    /// paths and extras, the frame table and the derived offsets. What the
    /// node-wide cap on index memory (`daemon.max_index_memory_mb`) counts.
    pub fn memory(&self) -> usize {
        use std::mem::size_of;
        let entries: usize = self
            .index
            .entries
            .iter()
            .map(|e| {
                let extra = e.extra.as_ref().map_or(0, |x| {
                    size_of::<EntryExtra>()
                        + x.link.capacity()
                        + x.xattrs
                            .iter()
                            .map(|a| size_of::<Xattr>() + a.name.capacity() + a.value.capacity())
                            .sum::<usize>()
                        + x.sparse.capacity() * size_of::<SparseSegment>()
                });
                size_of::<Entry>() + e.path.capacity() + extra
            })
            .sum();
        let frames = self.index.frames.len() * (4 + 4 + 32);
        let offsets = (self.c_offsets.capacity() + self.u_offsets.capacity()) * size_of::<u64>();
        size_of::<Self>() + entries + frames + offsets
    }

    pub fn frames(&self) -> &FrameTable {
        &self.index.frames
    }
    pub fn entries(&self) -> &[Entry] {
        &self.index.entries
    }
    /// Blob byte range `[start, end)` of frame `i`.
    pub fn frame_blob_range(&self, i: usize) -> (u64, u64) {
        (self.c_offsets[i], self.c_offsets[i + 1])
    }
    /// Tar byte range `[start, end)` that frame `i` decompresses to.
    pub fn frame_tar_range(&self, i: usize) -> (u64, u64) {
        (self.u_offsets[i], self.u_offsets[i + 1])
    }
    /// Where the index itself starts in the blob.
    pub fn frames_end(&self) -> u64 {
        *self.c_offsets.last().unwrap()
    }
    /// Frames covering tar bytes `[offset, offset + len)`, as a range of
    /// frame numbers (empty for `len == 0`).
    pub fn frames_for(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.index.tar_size {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.index.tar_size);
        // u_offsets is sorted; the frame holding `offset` is the last one
        // starting at or before it.
        let first = self.u_offsets.partition_point(|&o| o <= offset) - 1;
        let last = self.u_offsets.partition_point(|&o| o < end) - 1;
        first..last + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize() {
        assert_eq!(normalize_path(b"./a//b/").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"/etc/passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert!(normalize_path(b"a/../../etc").is_none());
        assert!(is_normalized(b"a/b") && is_normalized(b"") && !is_normalized(b"a//b") && !is_normalized(b"../x"));
    }

    fn frame(c: u32, u: u32) -> Frame {
        Frame { c_len: c, u_len: u, id: ChunkId([0; 32]) }
    }

    #[test]
    fn frames_for_maps_tar_ranges() {
        let idx = Index {
            tar_size: 30,
            diff_id: [0; 32],
            chunk_params: ChunkParams::default(),
            frames: [frame(5, 10), frame(5, 10), frame(5, 10)].into_iter().collect(),
            entries: vec![],
        }
        .validate(15)
        .unwrap();
        assert_eq!(idx.frames_for(0, 1), 0..1);
        assert_eq!(idx.frames_for(9, 2), 0..2);
        assert_eq!(idx.frames_for(10, 10), 1..2);
        assert_eq!(idx.frames_for(5, 100), 0..3);
        assert_eq!(idx.frames_for(30, 1), 0..0);
        assert_eq!(idx.frame_blob_range(2), (10, 15));
        assert_eq!(idx.frame_tar_range(1), (10, 20));
    }

    #[test]
    fn validation_rejects_inconsistent_tables() {
        let base = Index {
            tar_size: 10,
            diff_id: [0; 32],
            chunk_params: ChunkParams::default(),
            frames: [frame(5, 10)].into_iter().collect(),
            entries: vec![],
        };
        assert!(base.clone().validate(6).is_err(), "frames must end where the index starts");
        let mut t = base.clone();
        t.tar_size = 11;
        assert!(t.validate(5).is_err());
        let mut t = base.clone();
        t.frames.set(0, frame(5, limits::MAX_FRAME_LEN + 1));
        assert!(t.validate(5).is_err());
    }
}
