//! The HyperBox layer format (specified in docs/format.md).
//!
//! A HyperBox layer is an ordinary `tar+zstd` layer: a sequence of zstd frames
//! that decompresses, with any zstd tool, to exactly the original tar. Each
//! frame covers a range of the tar and can be fetched and decompressed alone;
//! after the frames come two zstd *skippable* frames, which decompressors
//! ignore: the index, then a fixed-size footer that locates the index.
//!
//! ```text
//! [frame 0][frame 1]...[frame n-1][index skippable frame][footer skippable frame (72 bytes)]
//! ```

pub mod frame;
pub mod index;
pub mod writer;

use std::collections::HashMap;
use std::io;

use crate::digest::{ChunkId, Digest};
pub use frame::{compress_frame, decode_frame, verify_frame, FrameError};
pub use index::{
    ChunkParams, Entry, EntryExtra, EntryKind, Frame, FrameTable, Index, LayerIndex, SparseSegment, Xattr,
};

/// Media type of a HyperBox layer: a standard zstd-compressed tar.
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The one format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Layer descriptor annotations. containerd passes annotations prefixed
/// `containerd.io/snapshot/` to the snapshotter as labels of `Prepare`.
pub const ANNOTATION_PREFIX: &str = "containerd.io/snapshot/hyperbox.";
pub const ANN_VERSION: &str = "containerd.io/snapshot/hyperbox.version";
pub const ANN_INDEX_OFFSET: &str = "containerd.io/snapshot/hyperbox.index-offset";
pub const ANN_INDEX_LENGTH: &str = "containerd.io/snapshot/hyperbox.index-length";
pub const ANN_INDEX_DIGEST: &str = "containerd.io/snapshot/hyperbox.index-digest";

/// zstd skippable-frame magic numbers (0x184D2A50..=0x184D2A5F are skippable).
pub const INDEX_FRAME_MAGIC: u32 = 0x184D_2A5E;
pub const FOOTER_FRAME_MAGIC: u32 = 0x184D_2A5F;
/// Magic at the start of the index payload.
pub const INDEX_MAGIC: &[u8; 4] = b"HBIX";
/// Magic at the start of the footer payload.
pub const FOOTER_MAGIC: &[u8; 8] = b"HyperBox";
const FOOTER_PAYLOAD_LEN: usize = 64;
/// Total size of the footer frame: 8 bytes of skippable-frame header + payload.
pub const FOOTER_LEN: usize = 8 + FOOTER_PAYLOAD_LEN;
const INDEX_HEADER_LEN: usize = 8 + 4 + 4 + 8;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("tar: {0}")]
    Tar(String),
    #[error("not a HyperBox layer: {0}")]
    NotHyperBox(String),
    #[error("unsupported HyperBox format version {found} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("index is {len} bytes, over the limit of {limit}")]
    IndexTooLarge { len: u64, limit: u64 },
    #[error("corrupt layer: {0}")]
    Corrupt(String),
    #[error("chunk {frame} ({id}) failed verification: {problem}")]
    ChunkVerify {
        frame: usize,
        id: ChunkId,
        #[source]
        problem: FrameError,
    },
}

/// Where a layer's index is: what the annotations (or the footer) say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexLocation {
    pub offset: u64,
    pub length: u64,
    /// sha256 of the index frame's bytes `[offset, offset+length)`.
    pub digest: Digest,
    pub version: u32,
}

impl IndexLocation {
    pub fn to_annotations(&self) -> HashMap<String, String> {
        HashMap::from([
            (ANN_VERSION.to_string(), self.version.to_string()),
            (ANN_INDEX_OFFSET.to_string(), self.offset.to_string()),
            (ANN_INDEX_LENGTH.to_string(), self.length.to_string()),
            (ANN_INDEX_DIGEST.to_string(), self.digest.to_string()),
        ])
    }

    /// Read the location from layer annotations (or snapshot labels, which
    /// carry the same keys). `Ok(None)` if the layer is not a HyperBox layer.
    pub fn from_annotations(a: &HashMap<String, String>) -> Result<Option<Self>, FormatError> {
        let Some(version) = a.get(ANN_VERSION) else {
            return Ok(None);
        };
        let get = |k: &str| a.get(k).ok_or_else(|| FormatError::Corrupt(format!("annotation {k} is missing")));
        let num = |k: &str| -> Result<u64, FormatError> {
            get(k)?.parse().map_err(|_| FormatError::Corrupt(format!("annotation {k} is not a number")))
        };
        let version: u32 =
            version.parse().map_err(|_| FormatError::Corrupt(format!("annotation {ANN_VERSION} is not a number")))?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let digest = get(ANN_INDEX_DIGEST)?
            .parse()
            .map_err(|e| FormatError::Corrupt(format!("annotation {ANN_INDEX_DIGEST}: {e}")))?;
        Ok(Some(Self { offset: num(ANN_INDEX_OFFSET)?, length: num(ANN_INDEX_LENGTH)?, digest, version }))
    }

    /// Check the location against the blob's size before fetching anything.
    pub fn check_bounds(&self, blob_size: u64) -> Result<(), FormatError> {
        if self.length > index::limits::MAX_INDEX_COMPRESSED + INDEX_HEADER_LEN as u64 {
            return Err(FormatError::IndexTooLarge { len: self.length, limit: index::limits::MAX_INDEX_COMPRESSED });
        }
        let end = self.offset.checked_add(self.length).and_then(|e| e.checked_add(FOOTER_LEN as u64));
        if end != Some(blob_size) {
            return Err(FormatError::Corrupt(format!(
                "index at {}+{} plus the {FOOTER_LEN}-byte footer does not end the {blob_size}-byte blob",
                self.offset, self.length
            )));
        }
        Ok(())
    }
}

fn skippable_header(magic: u32, len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&magic.to_le_bytes());
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

// The callers pass slices they cut to the length first (fixed offsets in
// a footer of FOOTER_LEN bytes, or in an index frame checked to be at least
// INDEX_HEADER_LEN), so the conversions cannot fail.
fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}
fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Encode the footer frame for an index at `loc`.
pub fn encode_footer(loc: &IndexLocation) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[..8].copy_from_slice(&skippable_header(FOOTER_FRAME_MAGIC, FOOTER_PAYLOAD_LEN));
    let p = &mut f[8..];
    p[..8].copy_from_slice(FOOTER_MAGIC);
    p[8..12].copy_from_slice(&loc.version.to_le_bytes());
    // p[12..16]: flags, zero in version 1.
    p[16..24].copy_from_slice(&loc.offset.to_le_bytes());
    p[24..32].copy_from_slice(&loc.length.to_le_bytes());
    p[32..64].copy_from_slice(loc.digest.as_bytes());
    f
}

/// Parse the last [`FOOTER_LEN`] bytes of a blob of `blob_size` bytes.
pub fn parse_footer(f: &[u8], blob_size: u64) -> Result<IndexLocation, FormatError> {
    if f.len() != FOOTER_LEN {
        return Err(FormatError::NotHyperBox(format!("blob too short for a footer ({} bytes)", f.len())));
    }
    if le_u32(&f[..4]) != FOOTER_FRAME_MAGIC || le_u32(&f[4..8]) as usize != FOOTER_PAYLOAD_LEN {
        return Err(FormatError::NotHyperBox("no footer frame at the end of the blob".into()));
    }
    let p = &f[8..];
    if &p[..8] != FOOTER_MAGIC {
        return Err(FormatError::NotHyperBox(format!("footer magic is {:?}, expected {:?}", &p[..8], FOOTER_MAGIC)));
    }
    let version = le_u32(&p[8..12]);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    if le_u32(&p[12..16]) != 0 {
        return Err(FormatError::Corrupt("footer flags set that version 1 does not define".into()));
    }
    let loc = IndexLocation {
        offset: le_u64(&p[16..24]),
        length: le_u64(&p[24..32]),
        // p is FOOTER_PAYLOAD_LEN (64) bytes: checked above.
        digest: Digest::from_bytes(p[32..64].try_into().unwrap()),
        version,
    };
    loc.check_bounds(blob_size)?;
    Ok(loc)
}

/// Encode the index frame: skippable header, `HBIX`, version, raw length,
/// then the zstd-compressed postcard encoding of the index.
pub fn encode_index_frame(index: &Index, level: i32) -> Vec<u8> {
    let raw = index.encode();
    let z = zstd::bulk::compress(&raw, level).expect("in-memory zstd compression cannot fail");
    let payload_len = INDEX_HEADER_LEN - 8 + z.len();
    let mut out = Vec::with_capacity(8 + payload_len);
    out.extend_from_slice(&skippable_header(INDEX_FRAME_MAGIC, payload_len));
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    out.extend_from_slice(&z);
    out
}

/// Verify the index frame's bytes against `loc` and decode it.
pub fn parse_index_frame(bytes: &[u8], loc: &IndexLocation) -> Result<LayerIndex, FormatError> {
    use index::limits::*;
    if bytes.len() as u64 != loc.length {
        return Err(FormatError::Corrupt(format!("index is {} bytes, expected {}", bytes.len(), loc.length)));
    }
    let actual = Digest::of(bytes);
    if actual != loc.digest {
        return Err(FormatError::Corrupt(format!("index digest is {actual}, expected {}", loc.digest)));
    }
    if bytes.len() < INDEX_HEADER_LEN || le_u32(&bytes[..4]) != INDEX_FRAME_MAGIC {
        return Err(FormatError::Corrupt("no index frame at the index offset".into()));
    }
    if le_u32(&bytes[4..8]) as usize != bytes.len() - 8 || &bytes[8..12] != INDEX_MAGIC {
        return Err(FormatError::Corrupt("index frame header is inconsistent".into()));
    }
    let version = le_u32(&bytes[12..16]);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let raw_len = le_u64(&bytes[16..24]);
    if raw_len > MAX_INDEX_RAW {
        return Err(FormatError::IndexTooLarge { len: raw_len, limit: MAX_INDEX_RAW });
    }
    let z = &bytes[INDEX_HEADER_LEN..];
    if z.len() as u64 > MAX_INDEX_COMPRESSED {
        return Err(FormatError::IndexTooLarge { len: z.len() as u64, limit: MAX_INDEX_COMPRESSED });
    }
    // The declared size bounds the output (one byte more is read to tell a
    // longer index), but is not trusted for the allocation: the buffer
    // grows with what actually decompresses, so a small frame claiming a
    // large index costs what it holds, not what it claims.
    let mut raw = Vec::with_capacity((raw_len as usize).min(z.len().saturating_mul(4)));
    zstd::stream::read::Decoder::with_buffer(z)
        .and_then(|d| io::Read::read_to_end(&mut io::Read::take(d, raw_len + 1), &mut raw))
        .map_err(|e| FormatError::Corrupt(format!("index does not decompress: {e}")))?;
    if raw.len() as u64 != raw_len {
        return Err(FormatError::Corrupt(format!("index decompresses to {} bytes, header says {raw_len}", raw.len())));
    }
    Index::decode(&raw, loc.offset)
}

/// Random access to a blob: a file, a buffer, or (later) a registry.
pub trait BlobSource {
    fn size(&self) -> io::Result<u64>;
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl BlobSource for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(len)?)) {
            Some(b) => Ok(b.to_vec()),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the blob")),
        }
    }
}

impl BlobSource for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Open a layer blob: find the index, then read, verify and decode it.
/// With `expected` (the location from the layer's annotations, which come
/// from a digest-verified manifest) the footer is not read; without it, the
/// footer says where the index is.
pub fn open_layer<S: BlobSource + ?Sized>(
    src: &S,
    expected: Option<&IndexLocation>,
) -> Result<(IndexLocation, LayerIndex), FormatError> {
    let size = src.size()?;
    if size < FOOTER_LEN as u64 {
        return Err(FormatError::NotHyperBox(format!("blob is only {size} bytes")));
    }
    let loc = match expected {
        Some(loc) => {
            loc.check_bounds(size)?;
            loc.clone()
        }
        None => parse_footer(&src.read_at(size - FOOTER_LEN as u64, FOOTER_LEN)?, size)?,
    };
    let bytes = src.read_at(loc.offset, loc.length as usize)?;
    let idx = parse_index_frame(&bytes, &loc)?;
    Ok((loc, idx))
}

/// Read, decompress and verify frame `i` from a blob.
pub fn read_frame<S: BlobSource + ?Sized>(src: &S, index: &LayerIndex, i: usize) -> Result<Vec<u8>, FormatError> {
    let (start, end) = index.frame_blob_range(i);
    decode_frame(index, i, &src.read_at(start, (end - start) as usize)?)
}

/// Most bytes one [`read_file_range`] call returns (it allocates them).
pub const MAX_READ: u64 = 256 << 20;

/// Read a regular file's logical bytes `[offset, offset+len)` (zeros in the
/// holes of a sparse file), verifying every frame it touches.
pub fn read_file_range<S: BlobSource + ?Sized>(
    src: &S,
    index: &LayerIndex,
    entry: &Entry,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, FormatError> {
    let end = offset.saturating_add(len).min(entry.size);
    if offset >= end {
        return Ok(Vec::new());
    }
    if end - offset > MAX_READ {
        return Err(FormatError::Corrupt(format!(
            "a read of {} bytes is over the {MAX_READ}-byte limit of one call",
            end - offset
        )));
    }
    let mut out = vec![0u8; (end - offset) as usize];
    for x in file_extents(entry, offset, end) {
        read_tar_range(src, index, x.tar, &mut out[x.out as usize..(x.out + x.len) as usize])?;
    }
    Ok(out)
}

/// Where part of a file's data is stored: `len` bytes at tar offset `tar`,
/// which go `out` bytes into the range asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub tar: u64,
    pub out: u64,
    pub len: u64,
}

/// The stored extents of a regular file's logical bytes `[offset, end)`, in
/// order: one for a plain file, one per data segment touched for a sparse
/// one (its holes have no extent: they read as zeros).
pub fn file_extents(entry: &Entry, offset: u64, end: u64) -> impl Iterator<Item = Extent> + '_ {
    let plain = (entry.sparse().is_empty()).then_some(SparseSegment { offset: 0, len: entry.size });
    let segments = plain.into_iter().chain(entry.sparse().iter().copied());
    segments
        .scan(entry.data_offset, |stored, seg| {
            let at = *stored;
            *stored += seg.len;
            Some((at, seg))
        })
        .filter_map(move |(stored, seg)| {
            let (s, e) = (seg.offset.max(offset), (seg.offset + seg.len).min(end));
            (s < e).then(|| Extent { tar: stored + (s - seg.offset), out: s - offset, len: e - s })
        })
}

/// Fill `buf` with tar bytes starting at `tar_offset`.
fn read_tar_range<S: BlobSource + ?Sized>(
    src: &S,
    index: &LayerIndex,
    tar_offset: u64,
    buf: &mut [u8],
) -> Result<(), FormatError> {
    let mut filled = 0usize;
    for i in index.frames_for(tar_offset, buf.len() as u64) {
        // read_frame returns exactly the frame's u_len bytes (decode_frame
        // checks it), and frames_for gave frames that hold these offsets:
        // `from` is inside `data`.
        let data = read_frame(src, index, i)?;
        let (fstart, _) = index.frame_tar_range(i);
        let from = (tar_offset + filled as u64 - fstart) as usize;
        let n = (data.len() - from).min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&data[from..from + n]);
        filled += n;
    }
    if filled != buf.len() {
        return Err(FormatError::Corrupt("file data extends past the frames".into()));
    }
    Ok(())
}
