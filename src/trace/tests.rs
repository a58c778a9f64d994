use super::*;

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

/// Counts from a foreign trace at their largest: merging stays in range
/// (no division by zero, no wrapped mean, no overflow) and takes no panic.
#[test]
fn merging_into_a_trace_with_extreme_counts() {
    let l = Digest::of(b"layer");
    let mut t = Trace::new(&key());
    t.runs = u32::MAX;
    t.entries = vec![
        TraceEntry { seen: u32::MAX, at_ms: u32::MAX, ..entry(&l, 1, 0) },
        TraceEntry { seen: u32::MAX, at_ms: 10, ..entry(&l, 2, 0) },
        TraceEntry { seen: 0, at_ms: 7, ..entry(&l, 3, 0) },
    ];
    t.merge_run(vec![entry(&l, 1, u32::MAX), entry(&l, 2, 0), entry(&l, 3, 1)], 10);
    let got: Vec<(u32, u32, u32)> = t.entries.iter().map(|e| (e.frame, e.at_ms, e.seen)).collect();
    assert_eq!(got, vec![(3, 1, 1), (2, 9, u32::MAX), (1, u32::MAX, u32::MAX)]);
    assert_eq!(t.runs, u32::MAX);
    // The same, read from JSON as an imported trace would be.
    let mut back = Trace::from_json(&t.to_json()).unwrap();
    back.merge_run(vec![entry(&l, 2, u32::MAX)], 10);
    assert!(back.entries.iter().all(|e| e.seen >= 1));
}

/// An imported trace's strings are bounded like an index's paths.
#[test]
fn foreign_traces_with_oversized_fields_are_refused() {
    let mut t = Trace::new(&key());
    t.merge_run(vec![entry(&Digest::of(b"l"), 0, 5)], 10);
    t.entries[0].path = "p/".repeat(5000);
    let e = Trace::from_json(&t.to_json()).map(drop).unwrap_err().to_string();
    assert!(e.contains("path"), "{e}");
    t.entries[0].path = "ok".into();
    t.repository = "r".repeat(10_000);
    let e = Trace::from_json(&t.to_json()).map(drop).unwrap_err().to_string();
    assert!(e.contains("repository"), "{e}");
}
