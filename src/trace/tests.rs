use std::sync::Arc;

use super::*;
use crate::format::{self, writer};
use crate::registry::Repo;

fn entry(layer: &Digest, frame: u32, at_ms: u32) -> TraceEntry {
    TraceEntry {
        layer: layer.clone(),
        frame,
        chunk: ChunkId([frame as u8; 32]),
        c_len: 100,
        u_len: 200,
        path: format!("f{frame}"),
        offset: 0,
        at_ms,
        seen: 1,
    }
}

fn key() -> ImageKey {
    ImageKey { digest: Digest::of(b"manifest").to_string(), repository: "127.0.0.1:5000/app".into() }
}

#[test]
fn runs_merge_as_a_union_ordered_by_mean_first_access() {
    let l = Digest::of(b"layer");
    let mut t = Trace::new(&key());
    t.merge_run(vec![entry(&l, 1, 0), entry(&l, 2, 100), entry(&l, 3, 200)], 100);
    // The second run reads 3 early, 2 late, and 4 (new).
    t.merge_run(vec![entry(&l, 3, 0), entry(&l, 4, 50), entry(&l, 2, 300)], 100);
    assert_eq!(t.runs, 2);
    let got: Vec<(u32, u32, u32)> = t.entries.iter().map(|e| (e.frame, e.at_ms, e.seen)).collect();
    assert_eq!(got, vec![(1, 0, 1), (4, 50, 1), (3, 100, 2), (2, 200, 2)]);
    // The cap keeps the earliest.
    t.merge_run(vec![entry(&l, 9, 1)], 3);
    assert_eq!(t.entries.iter().map(|e| e.frame).collect::<Vec<_>>(), vec![1, 9, 4]);
}

#[test]
fn foreign_traces_are_checked() {
    let mut t = Trace::new(&key());
    t.merge_run(vec![entry(&Digest::of(b"l"), 0, 5)], 10);
    let back = Trace::from_json(&t.to_json()).unwrap();
    assert_eq!(back, t);
    let mut v: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
    v["version"] = 2.into();
    let e = Trace::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err().to_string();
    assert!(e.contains("trace version 2 is not supported"), "{e}");
    v["version"] = 1.into();
    v["image"] = "latest".into();
    let e = Trace::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err().to_string();
    assert!(e.contains("image digest"), "{e}");
    assert!(Trace::from_json(b"{\"version\":1,\"image\":").is_err());
    assert!(Trace::from_json(b"[]").is_err());
}

#[test]
fn traces_are_kept_by_image_and_found_by_repository() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &Default::default()).unwrap();
    let (a, b) = (key(), ImageKey { digest: Digest::of(b"v2").to_string(), ..key() });
    assert!(load(&store, &a.digest).unwrap().is_none());
    assert!(latest_for_repository(&store, &a.repository).unwrap().is_none());
    let mut ta = Trace::new(&a);
    ta.merge_run(vec![entry(&Digest::of(b"l"), 0, 5)], 10);
    save(&store, &ta).unwrap();
    let mut tb = Trace::new(&b);
    tb.merge_run(vec![entry(&Digest::of(b"l"), 1, 5)], 10);
    save(&store, &tb).unwrap();
    assert_eq!(load(&store, &a.digest).unwrap().unwrap(), ta);
    // The latest saved is the repository's.
    assert_eq!(latest_for_repository(&store, &a.repository).unwrap().unwrap().image, b.digest);
    assert_eq!(list(&store).unwrap().len(), 2);
    // Removing the latest removes the repository's pointer too.
    assert!(delete(&store, &b.digest).unwrap());
    assert!(!delete(&store, &b.digest).unwrap());
    assert!(latest_for_repository(&store, &a.repository).unwrap().is_none());
    assert_eq!(list(&store).unwrap().len(), 1);
}

/// A HyperBox layer (small chunks) of the given files.
fn layer(files: &[(&str, Vec<u8>)]) -> Arc<RemoteLayer> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let opts = writer::WriteOptions {
        chunk: format::ChunkParams { min: 4 << 10, avg: 8 << 10, max: 16 << 10 },
        ..Default::default()
    };
    let c = writer::convert_tar(&tar[..], &mut blob, &opts).unwrap();
    let (_, idx) = format::open_layer(&blob[..], Some(&c.location)).unwrap();
    Arc::new(RemoteLayer {
        repo: Repo { registry: "r".into(), name: "n".into() },
        blob: Digest::of(&blob),
        index: Arc::new(idx),
    })
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
