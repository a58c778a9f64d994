//! The frame codec: one chunk of a layer, compressed as one zstd frame.
//!
//! [`verify_frame`] is the only function in HyperBox that turns compressed
//! bytes into data: the layer reader ([`decode_frame`]), the store (on every
//! read) and the fetcher (on every response) all come through it, and it
//! returns nothing unless the length and the blake3 id match.
//! [`compress_frame`] is its inverse, for the converter and for chunks the
//! store makes from data it holds.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use super::index::limits::MAX_FRAME_LEN;
use super::{FormatError, LayerIndex};
use crate::digest::ChunkId;

/// Why a frame's bytes are not the chunk they should be.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FrameError {
    #[error("declared length {u_len} is over the frame limit of {MAX_FRAME_LEN}")]
    TooLong { u_len: u32 },
    #[error("{got} compressed bytes, expected {want}")]
    CompressedLength { got: usize, want: u32 },
    #[error("does not decompress: {0}")]
    Decompress(#[source] Arc<io::Error>),
    #[error("decompresses to {got} bytes, expected {want}")]
    Length { got: usize, want: u32 },
    #[error("content hashes to {actual}")]
    Hash { actual: ChunkId },
}

/// Decompress one frame into exactly `u_len` bytes and check that they hash
/// to `id`.
pub fn verify_frame(id: ChunkId, u_len: u32, compressed: &[u8]) -> Result<Vec<u8>, FrameError> {
    if u_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong { u_len });
    }
    let data = decompress(compressed, u_len as usize).map_err(|e| FrameError::Decompress(Arc::new(e)))?;
    if data.len() != u_len as usize {
        return Err(FrameError::Length { got: data.len(), want: u_len });
    }
    let actual = ChunkId::of(&data);
    if actual != id {
        return Err(FrameError::Hash { actual });
    }
    Ok(data)
}

/// Decompression contexts kept for the next frame: making one maps and
/// unmaps about 160 KiB each time (hyperboxd sets glibc's mmap threshold
/// at 128 KiB), page faults that were a tenth of a read's CPU. A pool, not
/// one per thread: FUSE threads are many and mostly idle.
static DECOMPRESSORS: parking_lot::Mutex<Vec<zstd::bulk::Decompressor<'static>>> = parking_lot::Mutex::new(Vec::new());

/// Contexts the pool keeps at most (about the frames decompressed at once).
const KEPT_DECOMPRESSORS: usize = 8;

/// `zstd::bulk::decompress` with a pooled context.
fn decompress(compressed: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    let popped = DECOMPRESSORS.lock().pop();
    let mut d = match popped {
        Some(d) => d,
        None => zstd::bulk::Decompressor::new()?,
    };
    let data = d.decompress(compressed, capacity);
    let mut pool = DECOMPRESSORS.lock();
    if pool.len() < KEPT_DECOMPRESSORS {
        pool.push(d);
    }
    data
}

/// Decompress frame `i` of a layer from its compressed bytes and verify it
/// against the index.
pub fn decode_frame(index: &LayerIndex, i: usize, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    let f = index.frames().get(i);
    let checked = if compressed.len() != f.c_len as usize {
        Err(FrameError::CompressedLength { got: compressed.len(), want: f.c_len })
    } else {
        verify_frame(f.id, f.u_len, compressed)
    };
    checked.map_err(|problem| FormatError::ChunkVerify { frame: i, id: f.id, problem })
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compress one frame with this thread's reusable zstd context (no
/// checksum: the blake3 id is the check; the content size is written).
pub fn compress_frame(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            let mut z = zstd::bulk::Compressor::new(level)?;
            z.include_checksum(false)?;
            z.include_contentsize(true)?;
            *c = Some((level, z));
        }
        c.as_mut().unwrap().1.compress(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_every_lie_is_caught() {
        let data = b"hello, frames".repeat(100);
        let id = ChunkId::of(&data);
        let z = compress_frame(&data, 3).unwrap();
        assert_eq!(verify_frame(id, data.len() as u32, &z).unwrap(), data);
        let short = data.len() as u32 - 1;
        assert!(matches!(verify_frame(id, short, &z), Err(FrameError::Decompress(_) | FrameError::Length { .. })));
        assert!(matches!(verify_frame(ChunkId([0; 32]), data.len() as u32, &z), Err(FrameError::Hash { .. })));
        assert!(matches!(verify_frame(id, MAX_FRAME_LEN + 1, &z), Err(FrameError::TooLong { .. })));
        assert!(matches!(verify_frame(id, data.len() as u32, &z[..z.len() / 2]), Err(FrameError::Decompress(_))));
    }
}
