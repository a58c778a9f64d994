//! Writing a HyperBox layer from a tar stream.
//!
//! The `tar` crate parses headers (GNU long names, PAX records); underneath it
//! a [`Tap`] sees every byte the parser reads, in order, and routes it:
//! bytes inside the current file's data region go to the content-defined
//! chunker, everything else (headers, padding, the end-of-archive blocks and
//! whatever follows them) to header frames. Because every input byte ends up
//! in exactly one frame, in order, the frames decompress to the input tar
//! byte for byte. Frames are compressed in parallel batches.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, SyncSender};

use rayon::prelude::*;

use super::index::{normalize_path, ChunkParams, Entry, EntryKind, Frame, FrameTable, Index, SparseSegment, Xattr};
use super::{compress_frame, encode_footer, encode_index_frame, FormatError, IndexLocation, FORMAT_VERSION};
use crate::digest::{ChunkId, Digest, Sha256Writer};

#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub chunk: ChunkParams,
    /// zstd level for data and packed frames.
    pub level: i32,
    /// Files smaller than this are not chunked on their own: their data is
    /// packed, with the tar headers around them, into shared frames. Reading
    /// such a file fetches its neighbours too (usually siblings in the same
    /// directory), and small files compress far better together.
    pub small_file_max: u64,
    /// Packed frames (headers and small files) are cut once they reach this.
    pub pack_frame_max: usize,
    /// Uncompressed bytes handed to the compressing thread at a time.
    pub batch_bytes: usize,
}

impl Default for WriteOptions {
    /// See docs/benchmarks.md, "Chunk size, packing and level".
    fn default() -> Self {
        Self {
            chunk: ChunkParams::default(),
            level: 3,
            small_file_max: 16 << 10,
            pack_frame_max: 64 << 10,
            batch_bytes: 8 << 20,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: usize,
    pub frames: usize,
    pub data_chunks: usize,
    pub tar_bytes: u64,
    pub blob_bytes: u64,
}

#[derive(Debug)]
pub struct ConvertedLayer {
    pub location: IndexLocation,
    /// sha256 of the whole blob (the layer descriptor's digest).
    pub blob_digest: Digest,
    pub blob_size: u64,
    /// sha256 of the uncompressed tar (unchanged by conversion).
    pub diff_id: Digest,
    pub index: Index,
    pub stats: LayerStats,
}

/// Convert the tar stream `input` into a HyperBox layer written to `out`.
///
/// Two stages run at once: this thread parses the tar and cuts frames; a
/// writer thread compresses each batch of frames across the rayon pool and
/// writes them in order.
pub fn convert_tar<R: Read, W: Write + Send>(
    input: R,
    out: W,
    opts: &WriteOptions,
) -> Result<ConvertedLayer, FormatError> {
    let c = opts.chunk;
    if !(64 <= c.min && c.min <= c.avg && c.avg <= c.max && c.max <= super::index::limits::MAX_FRAME_LEN / 2) {
        return Err(FormatError::Corrupt(format!("invalid chunk parameters {c:?}")));
    }
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(2);
        let level = opts.level;
        let writer = scope.spawn(move || write_frames(rx, out, level));
        let parsed = split_tar(input, tx, opts);
        // split_tar has dropped the sender: the writer drains and returns.
        let written = writer.join().expect("frame writer panicked");
        let (frames, out) = match (parsed, written) {
            (Ok(p), Ok(w)) => (p, w),
            // A failed write makes the parser fail too; report the cause.
            (_, Err(e)) | (Err(e), _) => return Err(e),
        };
        finish(frames, out.0, out.1, opts)
    })
}

/// What the parsing stage found.
struct Parsed {
    entries: Vec<Entry>,
    diff_id: Digest,
    tar_size: u64,
    data_chunks: usize,
}

fn split_tar<R: Read>(input: R, tx: SyncSender<Vec<Vec<u8>>>, opts: &WriteOptions) -> Result<Parsed, FormatError> {
    let splitter = Rc::new(RefCell::new(Splitter::new(tx, opts)));
    let mut archive = tar::Archive::new(Tap { inner: input, splitter: splitter.clone() });
    let mut entries = Vec::new();
    let mut last_path = String::from("(start of archive)");
    let tar_err = |e: io::Error, splitter: &Rc<RefCell<Splitter>>, last: &str| {
        splitter.borrow_mut().err.take().unwrap_or_else(|| FormatError::Tar(format!("{e} (after entry {last:?})")))
    };
    {
        let iter = archive.entries().map_err(|e| tar_err(e, &splitter, &last_path))?;
        for raw in iter {
            let mut e = raw.map_err(|e| tar_err(e, &splitter, &last_path))?;
            let header_pos = e.raw_header_position();
            // The data starts where the parser stopped reading: after the
            // header and, for GNU sparse files, the sparse extension blocks,
            // which `raw_file_position` does not count.
            let data_pos = splitter.borrow().pos;
            if e.raw_file_position() > data_pos {
                return Err(FormatError::Tar(format!("entry after {last_path:?}: data starts before its header ends")));
            }
            // Bytes the tar stores for this entry, whatever its type.
            let stored =
                e.header().entry_size().map_err(|err| FormatError::Tar(format!("entry after {last_path:?}: {err}")))?;
            let parsed = {
                let s = splitter.borrow();
                entry_from_tar(&mut e, s.header_bytes_from(header_pos), data_pos)
            }
            .map_err(|m| FormatError::Tar(format!("entry after {last_path:?}: {m}")))?;
            let mut s = splitter.borrow_mut();
            let chunked = match &parsed {
                Some(entry) => {
                    last_path = String::from_utf8_lossy(&entry.path).into_owned();
                    entry.kind == EntryKind::File && entry.data_len() >= opts.small_file_max.max(1)
                }
                None => false,
            };
            if chunked {
                let data_len = parsed.as_ref().map_or(0, |e| e.data_len());
                // Sizes come from the tar: saturate, a truncated tar ends
                // the parse with an error long before.
                s.start_region(data_pos, data_pos.saturating_add(data_len), RegionKind::Chunked);
            } else if stored >= opts.small_file_max.max(1) {
                // Data that is not a file's contents (a hard link or directory
                // with a size, a global PAX header, an unknown entry type):
                // kept in the stream, cut into plain frames as it arrives.
                s.start_region(data_pos, data_pos.saturating_add(stored), RegionKind::Plain);
            } else {
                // Small file data (if any) flows into the packed frame.
                s.flush_packed_if_large();
            }
            if let Some(entry) = parsed {
                entries.push(entry);
            }
            if let Some(err) = s.err.take() {
                return Err(err);
            }
        }
    }
    // The parser stops at the end-of-archive marker; keep every byte after it.
    splitter.borrow_mut().trailer = true;
    let mut tap = archive.into_inner();
    io::copy(&mut tap, &mut io::sink()).map_err(|e| tar_err(e, &splitter, &last_path))?;
    drop(tap);
    let mut s = Rc::try_unwrap(splitter).ok().expect("the tap is gone").into_inner();
    if let Some((_, end, _)) = s.region {
        return Err(FormatError::Tar(format!("archive ends inside file data ({} of {end} bytes)", s.pos)));
    }
    s.flush_packed();
    s.send_batch();
    if let Some(e) = s.err.take() {
        return Err(e);
    }
    Ok(Parsed { entries, diff_id: s.diff_id.finish(), tar_size: s.pos, data_chunks: s.data_chunks })
}

/// Turn one parsed tar entry into an index entry. `raw_header` holds the raw
/// bytes from the entry's own header block up to its data.
fn entry_from_tar<R: Read>(e: &mut tar::Entry<R>, raw_header: &[u8], data_pos: u64) -> Result<Option<Entry>, String> {
    use tar::EntryType as T;
    let h = e.header().clone();
    let etype = h.entry_type();
    let raw_path = e.path_bytes().into_owned();
    let kind = match etype {
        // Go's archive/tar (containerd's reader) takes typeflag '\0' with a
        // name ending in '/' for a directory; so do we.
        T::Regular if h.as_old().linkflag[0] == 0 && raw_path.ends_with(b"/") => EntryKind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::Hardlink,
        T::Char => EntryKind::CharDevice,
        T::Block => EntryKind::BlockDevice,
        T::Fifo => EntryKind::Fifo,
        // Extension headers reach us only when the tar crate did not apply
        // them (it ignores them before a pre-POSIX header; Go does not), so
        // the index could disagree with what containerd unpacks: refuse.
        T::XHeader | T::GNULongName | T::GNULongLink => {
            return Err(format!(
                "{:?} extension header the parser could not apply (before a pre-POSIX header?)",
                etype
            ));
        }
        // Global PAX headers and other non-file records stay in the byte
        // stream but are not filesystem entries.
        _ => return Ok(None),
    };
    let path = normalize_path(&raw_path)
        .ok_or_else(|| format!("path {:?} is outside the layer root", String::from_utf8_lossy(&raw_path)))?;
    let name = String::from_utf8_lossy(&path).into_owned();
    let ctx = |what: &str, err: io::Error| format!("{name:?}: bad {what}: {err}");
    // Numeric fields are read as Go's archive/tar (containerd's reader) reads
    // them: octal or base-256, and an empty field is 0.
    let block = raw_header.get(..512).ok_or_else(|| format!("{name:?}: header block missing"))?;
    let num = |what: &str, range: std::ops::Range<usize>| {
        tar_number(&block[range]).ok_or_else(|| format!("{name:?}: bad {what} field"))
    };
    let id = |what: &str, v: u64| u32::try_from(v).map_err(|_| format!("{name:?}: {what} {v} does not fit 32 bits"));
    let mut entry = Entry::new(path, kind);
    entry.mode = num("mode", 100..108)? as u32 & 0o7777;
    entry.uid = id("uid", num("uid", 108..116)?)?;
    entry.gid = id("gid", num("gid", 116..124)?)?;
    entry.mtime = num("mtime", 136..148)? as i64;
    if let Some(pax) = e.pax_extensions().map_err(|err| ctx("PAX header", err))? {
        for ext in pax {
            let ext = ext.map_err(|err| ctx("PAX record", err))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(xname) = key.strip_prefix(b"SCHILY.xattr.") {
                entry.extra_mut().xattrs.push(Xattr { name: xname.to_vec(), value: value.to_vec() });
            } else if key == b"mtime" {
                (entry.mtime, entry.mtime_nsec) =
                    parse_pax_time(value).ok_or_else(|| format!("{name:?}: bad PAX mtime"))?;
            } else if key == b"uid" || key == b"gid" {
                let v = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
                let v = id("PAX uid/gid", v.ok_or_else(|| format!("{name:?}: bad PAX uid/gid"))?)?;
                if key == b"uid" {
                    entry.uid = v
                } else {
                    entry.gid = v
                }
            } else if key.starts_with(b"GNU.sparse.") {
                return Err(format!("{name:?}: PAX-format sparse files (GNU.sparse.*) are not supported; re-create the layer with --format=gnu or without --sparse"));
            }
        }
    }
    match kind {
        EntryKind::File => {
            entry.data_offset = data_pos;
            if etype == T::GNUSparse {
                let (segments, real_size) =
                    gnu_sparse_map(raw_header).ok_or_else(|| format!("{name:?}: bad GNU sparse map"))?;
                entry.size = real_size;
                let held = sum_lengths(&segments).ok_or_else(|| format!("{name:?}: sparse map lengths overflow"))?;
                let stored = h.entry_size().map_err(|err| ctx("size", err))?;
                if held != stored {
                    return Err(format!("{name:?}: sparse map holds {held} bytes, the entry stores {stored}"));
                }
                entry.extra_mut().sparse = segments;
            } else {
                entry.size = e.size();
            }
        }
        EntryKind::Symlink | EntryKind::Hardlink => {
            let target = e.link_name_bytes().ok_or_else(|| format!("{name:?}: link without a target"))?.into_owned();
            entry.extra_mut().link = if kind == EntryKind::Hardlink {
                normalize_path(&target)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| format!("{name:?}: hard link target outside the layer"))?
            } else {
                target
            };
        }
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            let x = entry.extra_mut();
            x.dev_major = id("device major", num("device major", 329..337)?)?;
            x.dev_minor = id("device minor", num("device minor", 337..345)?)?;
        }
        EntryKind::Dir | EntryKind::Fifo => {}
    }
    Ok(Some(entry))
}

/// PAX times are decimal seconds with an optional fraction: `-1.5`, `1700000000.123456789`.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    // Digits only: a second sign ("--5") or a '+' is refused, as Go's
    // reader refuses them, and negating below cannot overflow.
    if secs.is_empty() || !secs.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.as_bytes().get(i).map_or(0, |b| (b - b'0') as u32);
    }
    Some(if !neg {
        (secs, nsec)
    } else if nsec == 0 {
        (-secs, 0)
    } else {
        (-secs - 1, 1_000_000_000 - nsec)
    })
}

/// The sum of a sparse map's lengths, or `None` if it overflows.
fn sum_lengths(segments: &[SparseSegment]) -> Option<u64> {
    segments.iter().try_fold(0u64, |sum, s| sum.checked_add(s.len))
}

/// A tar numeric field: octal text, or base-256 when the top bit is set.
fn tar_number(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (f[0] & 0x7f) as u64;
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(f).ok()?.trim_matches(|c| c == '\0' || c == ' ');
    if s.is_empty() {
        Some(0)
    } else {
        u64::from_str_radix(s, 8).ok()
    }
}

/// The sparse map of an old-GNU sparse entry: 4 slots in the header at 386,
/// `isextended` at 482, real size at 483; each extension block holds 21 slots
/// and its own `isextended` at 504.
fn gnu_sparse_map(raw: &[u8]) -> Option<(Vec<SparseSegment>, u64)> {
    let header = raw.get(..512)?;
    let real_size = tar_number(&header[483..495])?;
    let mut segs = Vec::new();
    let mut push = |slot: &[u8]| -> Option<()> {
        let (off, len) = (tar_number(&slot[..12])?, tar_number(&slot[12..24])?);
        if len > 0 {
            segs.push(SparseSegment { offset: off, len });
        }
        Some(())
    };
    for s in 0..4 {
        push(&header[386 + 24 * s..410 + 24 * s])?;
    }
    let mut extended = header[482] != 0;
    let mut at = 512;
    while extended {
        let block = raw.get(at..at + 512)?;
        for s in 0..21 {
            push(&block[24 * s..24 * s + 24])?;
        }
        extended = block[504] != 0;
        at += 512;
    }
    Some((segs, real_size))
}

/// Sees every byte the tar parser reads and hands it to the splitter.
struct Tap<R> {
    inner: R,
    splitter: Rc<RefCell<Splitter>>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.splitter.borrow_mut();
        s.feed(&buf[..n]);
        if s.err.is_some() {
            return Err(io::Error::other("layer output failed"));
        }
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegionKind {
    /// A file's contents, cut by content (FastCDC).
    Chunked,
    /// Other data stored in the tar, cut into packed-size frames.
    Plain,
}

/// Bytes of headers (with extension records and small files) that may pile
/// up between two data regions before the tar is refused.
const MAX_HEADER_BYTES: usize = 64 << 20;

/// Routes tar bytes into frames and hands them, in batches, to the writer.
struct Splitter {
    /// Tar offset of the next byte to arrive.
    pos: u64,
    /// Bytes of the packed frame being filled (headers, padding, small
    /// files), starting at tar offset `hdr_start`.
    hdr: Vec<u8>,
    hdr_start: u64,
    /// The data region `[start, end)` being read, if any.
    region: Option<(u64, u64, RegionKind)>,
    /// Past the end-of-archive marker: nothing needs the packed bytes kept.
    trailer: bool,
    /// Data bytes of the region not yet cut into chunks.
    data: Vec<u8>,
    diff_id: Sha256Writer,
    chunk: ChunkParams,
    pack_frame_max: usize,
    data_chunks: usize,
    batch: Vec<Vec<u8>>,
    batch_len: usize,
    batch_bytes: usize,
    tx: SyncSender<Vec<Vec<u8>>>,
    err: Option<FormatError>,
}

impl Splitter {
    fn new(tx: SyncSender<Vec<Vec<u8>>>, opts: &WriteOptions) -> Self {
        Self {
            pos: 0,
            hdr: Vec::new(),
            hdr_start: 0,
            region: None,
            trailer: false,
            data: Vec::new(),
            diff_id: Sha256Writer::new(),
            chunk: opts.chunk,
            pack_frame_max: opts.pack_frame_max.max(512),
            data_chunks: 0,
            batch: Vec::new(),
            batch_len: 0,
            batch_bytes: opts.batch_bytes,
            tx,
            err: None,
        }
    }

    fn header_bytes_from(&self, tar_offset: u64) -> &[u8] {
        let from = tar_offset.saturating_sub(self.hdr_start) as usize;
        &self.hdr[from.min(self.hdr.len())..]
    }

    fn start_region(&mut self, start: u64, end: u64, kind: RegionKind) {
        debug_assert_eq!(self.pos, start);
        self.flush_packed();
        self.region = Some((start, end, kind));
    }

    fn feed(&mut self, mut b: &[u8]) {
        self.diff_id.update(b);
        while !b.is_empty() {
            match self.region {
                Some((_, end, kind)) => {
                    let n = b.len().min((end - self.pos) as usize);
                    self.data.extend_from_slice(&b[..n]);
                    self.pos += n as u64;
                    b = &b[n..];
                    let done = self.pos == end;
                    match kind {
                        RegionKind::Chunked => self.cut_chunks(done),
                        RegionKind::Plain => self.cut_plain(done),
                    }
                    if done {
                        self.region = None;
                        debug_assert!(self.hdr.is_empty());
                        self.hdr_start = self.pos;
                    }
                }
                None => {
                    self.hdr.extend_from_slice(b);
                    self.pos += b.len() as u64;
                    b = &[];
                    if self.trailer {
                        self.flush_packed_if_large();
                    } else if self.hdr.len() > MAX_HEADER_BYTES {
                        // Headers, extension records and small files between
                        // two larger files: nothing legitimate comes close.
                        self.err.get_or_insert(FormatError::Tar(format!(
                            "more than {} MiB of headers before tar offset {}",
                            MAX_HEADER_BYTES >> 20,
                            self.pos
                        )));
                    }
                }
            }
        }
    }

    /// Cut non-file data into frames of the packed size as it arrives.
    fn cut_plain(&mut self, complete: bool) {
        let max = self.pack_frame_max;
        let mut at = 0;
        while self.data.len() - at >= max || (complete && at < self.data.len()) {
            let n = (self.data.len() - at).min(max);
            let frame = self.data[at..at + n].to_vec();
            self.emit(frame);
            at += n;
        }
        self.data.drain(..at);
    }

    /// Cut the buffered data into content-defined chunks. Until the region is
    /// complete, only cuts that more data could not move are taken: the
    /// first chunk of a window of `max` bytes is final.
    fn cut_chunks(&mut self, complete: bool) {
        let ChunkParams { min, avg, max } = self.chunk;
        let max = max as usize;
        if !complete && self.data.len() < 2 * max {
            return;
        }
        let mut at = 0;
        while self.data.len() - at >= max {
            let window = &self.data[at..at + max];
            let cut = fastcdc::v2020::FastCDC::new(window, min, avg, max as u32).next().map_or(max, |c| c.length);
            self.emit_data(at, at + cut);
            at += cut;
        }
        if complete {
            let cuts: Vec<usize> =
                fastcdc::v2020::FastCDC::new(&self.data[at..], min, avg, max as u32).map(|c| c.length).collect();
            for len in cuts {
                self.emit_data(at, at + len);
                at += len;
            }
        }
        self.data.drain(..at);
    }

    fn emit_data(&mut self, from: usize, to: usize) {
        let chunk = self.data[from..to].to_vec();
        self.data_chunks += 1;
        self.emit(chunk);
    }

    fn emit(&mut self, frame: Vec<u8>) {
        self.batch_len += frame.len();
        self.batch.push(frame);
        if self.batch_len >= self.batch_bytes {
            self.send_batch();
        }
    }

    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.batch_len = 0;
        if self.tx.send(std::mem::take(&mut self.batch)).is_err() {
            // The writer stopped; its own error is what gets reported.
            self.err.get_or_insert(FormatError::Io(io::Error::other("frame writer stopped")));
        }
    }

    /// Emit the packed frame. One that grew far past the target (a huge PAX
    /// header) is split into target-sized frames.
    fn flush_packed(&mut self) {
        let mut hdr = std::mem::take(&mut self.hdr);
        let max = self.pack_frame_max;
        let mut rest = &hdr[..];
        while !rest.is_empty() {
            let n = if rest.len() <= 2 * max { rest.len() } else { max };
            self.emit(rest[..n].to_vec());
            rest = &rest[n..];
        }
        hdr.clear();
        self.hdr = hdr;
        self.hdr_start = self.pos;
    }

    fn flush_packed_if_large(&mut self) {
        if self.hdr.len() >= self.pack_frame_max {
            self.flush_packed();
        }
    }
}

/// The writing stage: compress each batch across the rayon pool (frames
/// are independent), then write the frames in order, hashing the blob.
fn write_frames<W: Write>(
    rx: Receiver<Vec<Vec<u8>>>,
    out: W,
    level: i32,
) -> Result<(FrameTable, HashingWriter<W>), FormatError> {
    let mut out = HashingWriter { inner: out, hash: Sha256Writer::new(), len: 0 };
    let mut frames = FrameTable::default();
    for batch in rx {
        let done: Vec<io::Result<(Vec<u8>, ChunkId, u32)>> =
            batch.par_iter().map(|d| Ok((compress_frame(d, level)?, ChunkId::of(d), d.len() as u32))).collect();
        for r in done {
            let (z, id, u_len) = r?;
            out.write_all(&z)?;
            frames.push(Frame { c_len: z.len() as u32, u_len, id });
        }
    }
    Ok((frames, out))
}

/// Append the index and the footer; check the index reads back.
fn finish<W: Write>(
    p: Parsed,
    frames: FrameTable,
    mut out: HashingWriter<W>,
    opts: &WriteOptions,
) -> Result<ConvertedLayer, FormatError> {
    let index = Index {
        tar_size: p.tar_size,
        diff_id: *p.diff_id.as_bytes(),
        chunk_params: opts.chunk,
        frames,
        entries: p.entries,
    };
    let frames_end = out.len;
    let index_frame = encode_index_frame(&index, INDEX_LEVEL);
    let location = IndexLocation {
        offset: frames_end,
        length: index_frame.len() as u64,
        digest: Digest::of(&index_frame),
        version: FORMAT_VERSION,
    };
    // Never write a layer this code could not read back.
    index.check(frames_end)?;
    out.write_all(&index_frame)?;
    out.write_all(&encode_footer(&location))?;
    out.inner.flush()?;
    let stats = LayerStats {
        entries: index.entries.len(),
        frames: index.frames.len(),
        data_chunks: p.data_chunks,
        tar_bytes: p.tar_size,
        blob_bytes: out.len,
    };
    Ok(ConvertedLayer {
        location,
        blob_digest: out.hash.finish(),
        blob_size: out.len,
        diff_id: p.diff_id,
        index,
        stats,
    })
}

/// zstd level of the index: it is read on every lazy start, written once.
const INDEX_LEVEL: i32 = 9;

/// Output that hashes and counts what it writes.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256Writer,
    len: u64,
}
impl<W: Write> HashingWriter<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.hash.update(b);
        self.len += b.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"1.x"), None);
    }

    #[test]
    fn tar_numbers() {
        assert_eq!(tar_number(b"0000644\0"), Some(0o644));
        assert_eq!(tar_number(b"\0\0\0"), Some(0));
        assert_eq!(tar_number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(tar_number(b"9"), None);
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    /// Signs and sizes a tar from outside may hold: no panic, and what Go's
    /// reader refuses (a second sign) is refused.
    #[test]
    fn pax_times_with_extreme_or_doubled_signs() {
        assert_eq!(parse_pax_time(b"--9223372036854775808"), None);
        assert_eq!(parse_pax_time(b"-+5"), None);
        assert_eq!(parse_pax_time(b"+5"), None);
        assert_eq!(parse_pax_time(b"-9223372036854775808"), None, "out of range once negated with a fraction");
        assert_eq!(parse_pax_time(b"-9223372036854775807.5"), Some((i64::MIN, 500_000_000)));
        assert_eq!(parse_pax_time(b"9223372036854775807.999999999"), Some((i64::MAX, 999_999_999)));
        assert_eq!(parse_pax_time(b""), None);
    }

    /// An old-GNU sparse map whose segment lengths sum past u64: refused.
    #[test]
    fn sparse_map_lengths_that_overflow() {
        let mut h = vec![0u8; 512];
        let big = |slot: &mut [u8]| {
            // base-256: u64::MAX in the low 8 of 12 bytes.
            slot[..4].copy_from_slice(&[0x80, 0, 0, 0]);
            slot[4..].fill(0xff);
        };
        for s in 0..2 {
            h[386 + 24 * s..398 + 24 * s].copy_from_slice(b"00000000000\0");
            big(&mut h[398 + 24 * s..410 + 24 * s]);
        }
        h[483..495].copy_from_slice(b"00000000001\0");
        let (segs, _) = gnu_sparse_map(&h).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(sum_lengths(&segs), None);
    }
}
