//! What decoding a hostile index may allocate: lengths declared by the
//! index frame's header and by the index's own sequences are checked
//! against the bytes actually present before any memory is taken for them.
//! Its own test binary: the allocator below watches the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use hyperbox::digest::Digest;
use hyperbox::format::{self, FormatError, IndexLocation};

/// The system allocator, remembering the largest single allocation.
struct Watch;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

/// An index frame around `z` (the compressed index) whose header says the
/// index decompresses to `raw_len` bytes, and its location.
fn frame(z: &[u8], raw_len: u64) -> (Vec<u8>, IndexLocation) {
    let mut f = Vec::new();
    f.extend_from_slice(&format::INDEX_FRAME_MAGIC.to_le_bytes());
    f.extend_from_slice(&((16 + z.len()) as u32).to_le_bytes());
    f.extend_from_slice(format::INDEX_MAGIC);
    f.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
    f.extend_from_slice(&raw_len.to_le_bytes());
    f.extend_from_slice(z);
    let loc = IndexLocation { offset: 0, length: f.len() as u64, digest: Digest::of(&f), version: 1 };
    (f, loc)
}

/// The largest allocation `f` made, and what it returned.
fn largest<T>(f: impl FnOnce() -> T) -> (usize, T) {
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (LARGEST.load(Ordering::SeqCst), out)
}

#[test]
fn declared_lengths_are_checked_before_allocating() {
    const MIB: usize = 1 << 20;
    // A 40-byte index whose first sequence (the frames' compressed lengths)
    // declares ten million items, then ends.
    let mut raw = vec![0u8]; // tar_size
    raw.extend_from_slice(&[0; 32]); // diff_id
    raw.extend_from_slice(&[0, 0, 0]); // chunk_params
    raw.extend_from_slice(&[0x80, 0xad, 0xe2, 0x04]); // 10_000_000 as a varint
    let (f, loc) = frame(&zstd::bulk::compress(&raw, 3).unwrap(), raw.len() as u64);
    let (most, r) = largest(|| format::parse_index_frame(&f, &loc));
    let err = r.unwrap_err();
    assert!(matches!(err, FormatError::Corrupt(_)), "{err}");
    assert!(most < MIB, "decoding a {}-byte index allocated {most} bytes at once ({err})", raw.len());

    // A header that claims 100 MiB for an index that holds 40 bytes.
    let (f, loc) = frame(&zstd::bulk::compress(&raw, 3).unwrap(), 100 << 20);
    let (most, r) = largest(|| format::parse_index_frame(&f, &loc));
    let err = r.unwrap_err();
    assert!(err.to_string().contains("decompresses to 40 bytes"), "{err}");
    assert!(most < MIB, "a header's claim of 100 MiB allocated {most} bytes at once");
}
