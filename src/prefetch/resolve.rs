//! Where a trace's chunks are in the image being started: the same layer
//! and frame, else the same chunk anywhere, else the same bytes of the same
//! file. This is what lets one image's trace serve its next version.

use std::collections::HashMap;
use std::sync::Arc;

use crate::digest::{ChunkId, Digest};
use crate::layer::RemoteLayer;
use crate::trace::TraceEntry;

/// Where a trace entry's chunk is among `layers` (layer position, frame):
/// the same layer and frame if present, else any frame with the same chunk
/// digest, else the same bytes of a file at the same path (the topmost
/// layer that has it). None if the image has nothing like it.
pub struct Resolver<'a> {
    layers: &'a [Arc<RemoteLayer>],
    by_blob: HashMap<&'a Digest, usize>,
    by_chunk: Option<HashMap<ChunkId, (usize, usize)>>,
    by_path: Option<HashMap<&'a [u8], (usize, usize)>>,
}

impl<'a> Resolver<'a> {
    pub fn new(layers: &'a [Arc<RemoteLayer>]) -> Resolver<'a> {
        let by_blob = layers.iter().enumerate().map(|(i, l)| (&l.blob, i)).collect();
        Resolver { layers, by_blob, by_chunk: None, by_path: None }
    }

    /// Frames of `layers[i]` for the entry (a path match can span several).
    pub fn resolve(&mut self, e: &TraceEntry) -> Option<(usize, Vec<usize>)> {
        if let Some(&i) = self.by_blob.get(&e.layer) {
            let frames = self.layers[i].index.frames();
            if (e.frame as usize) < frames.len() && frames.get(e.frame as usize).id == e.chunk {
                return Some((i, vec![e.frame as usize]));
            }
        }
        let layers = self.layers;
        let by_chunk = self.by_chunk.get_or_insert_with(|| {
            let mut m = HashMap::new();
            for (i, l) in layers.iter().enumerate() {
                for (f, frame) in l.index.frames().iter().enumerate() {
                    m.entry(frame.id).or_insert((i, f));
                }
            }
            m
        });
        if let Some(&(i, f)) = by_chunk.get(&e.chunk) {
            return Some((i, vec![f]));
        }
        if e.path.is_empty() {
            return None;
        }
        let by_path = self.by_path.get_or_insert_with(|| {
            let mut m = HashMap::new();
            // Layers are bottom first: a later (upper) one wins.
            for (i, l) in layers.iter().enumerate() {
                for (k, entry) in l.index.entries().iter().enumerate() {
                    if entry.data_len() > 0 {
                        m.insert(entry.path.as_slice(), (i, k));
                    }
                }
            }
            m
        });
        let &(i, k) = by_path.get(e.path.as_bytes())?;
        let entry = &layers[i].index.entries()[k];
        if e.offset >= entry.data_len() {
            return None;
        }
        let len = (entry.data_len() - e.offset).min(e.u_len.max(1) as u64);
        let frames: Vec<usize> = layers[i].index.frames_for(entry.data_offset + e.offset, len).collect();
        (!frames.is_empty()).then_some((i, frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Repo;
    use crate::testing::{small_chunks, LayerBuilder};
    use crate::trace::FileMap;

    /// A HyperBox layer (small chunks) of the given files.
    fn layer(files: &[(&str, Vec<u8>)]) -> Arc<RemoteLayer> {
        let tar = files.iter().fold(LayerBuilder::gnu(), |b, (path, data)| b.file(path, 0o644, data));
        tar.convert_with(&small_chunks()).remote(Repo { registry: "r".into(), name: "n".into() })
    }

    fn noise(seed: u8, n: usize) -> Vec<u8> {
        let mut x = seed as u32 | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_trace_serves_another_version_by_chunk_and_by_path() {
        let (a, b, c) = (noise(1, 64 << 10), noise(3, 64 << 10), noise(5, 64 << 10));
        let v1 = layer(&[("app/a", a.clone()), ("app/b", b.clone())]);
        // The next version: a unchanged (same chunks), b rewritten, c new.
        let mut b2 = b.clone();
        b2.iter_mut().for_each(|x| *x = x.wrapping_add(1));
        let v2 = layer(&[("app/c", c), ("app/a", a), ("app/b", b2)]);
        // Record: every data frame of v1, as a run reading both files would
        // (paths from the file map).
        let map = FileMap::new(&v1);
        let data_frames: Vec<usize> = v1
            .index
            .entries()
            .iter()
            .filter(|e| e.data_len() > 0)
            .flat_map(|e| v1.index.frames_for(e.data_offset, e.data_len()))
            .collect();
        let entries: Vec<TraceEntry> = data_frames
            .into_iter()
            .map(|f| {
                let fr = v1.index.frames().get(f);
                let (start, end) = v1.index.frame_tar_range(f);
                let (path, offset) = map.at(&v1, start, end);
                TraceEntry {
                    layer: v1.blob.clone(),
                    frame: f as u32,
                    chunk: fr.id,
                    c_len: fr.c_len,
                    u_len: fr.u_len,
                    path,
                    offset,
                    at_ms: f as u32,
                    seen: 1,
                }
            })
            .collect();
        assert!(entries.iter().any(|e| e.path == "app/a") && entries.iter().any(|e| e.path == "app/b"));

        // Against v1 itself: every entry is its own frame.
        let same = [v1.clone()];
        let mut r = Resolver::new(&same);
        for e in &entries {
            assert_eq!(r.resolve(e), Some((0, vec![e.frame as usize])));
        }
        // Against v2: a's chunks by digest, b's by path (b's frames in v2).
        let other = [v2.clone()];
        let mut r = Resolver::new(&other);
        let b_entry = v2.index.entries().iter().find(|e| e.path == b"app/b").unwrap();
        let b_frames = v2.index.frames_for(b_entry.data_offset, b_entry.data_len());
        for e in entries.iter().filter(|e| e.path == "app/a" || e.path == "app/b") {
            let (li, frames) = r.resolve(e).unwrap_or_else(|| panic!("{} @ {} unresolved", e.path, e.offset));
            assert_eq!(li, 0);
            if e.path == "app/a" && e.offset > 0 && e.offset + (e.u_len as u64) < 64 << 10 {
                // A chunk inside a is found by digest: one frame with its id.
                assert_eq!(frames.len(), 1);
                assert_eq!(v2.index.frames().get(frames[0]).id, e.chunk);
            }
            if e.path == "app/b" {
                assert!(frames.iter().all(|f| b_frames.contains(f)), "{frames:?} not in b's {b_frames:?}");
            }
        }
        // A path the new version lacks, with an unknown chunk, resolves to nothing.
        let gone = TraceEntry { path: "app/zzz".into(), chunk: ChunkId([7; 32]), ..entries[0].clone() };
        let gone = TraceEntry { layer: Digest::of(b"elsewhere"), ..gone };
        assert_eq!(r.resolve(&gone), None);
    }
}
