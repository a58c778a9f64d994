//! A short, bounded fuzz run for `make test`, needing neither cargo-fuzz nor
//! a nightly toolchain: every file of the committed corpus
//! (`fuzz/corpus/<target>/`) goes through its target's body — the very
//! functions the cargo-fuzz targets run (`fuzz/src/lib.rs`) — and then a few
//! thousand deterministic mutations of them (bit flips, interesting values,
//! truncations, splices, insertions and deletions; a seeded xorshift, so a
//! failure reproduces), within a time budget per target.
//!
//! A failing input is written to `$CARGO_TARGET_TMPDIR/fuzz-<target>-failure`
//! and named in the panic: add it to the corpus once the bug is fixed.
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` rewrites the
//! seeds this file can make itself (docs/fuzzing.md).

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Mutations per target, and the wall-clock cap on them (a debug build on a
/// loaded machine stops early rather than slow `make test` down).
const MUTATIONS: usize = 10_000;
const BUDGET: Duration = Duration::from_secs(3);

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no corpus in {}", dir.display());
    out
}

/// Run one input; on a panic, keep the input and fail naming it.
fn check(target: &str, body: fn(&[u8]), what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_err() {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{target}-failure"));
        std::fs::write(&path, input).unwrap();
        panic!("fuzz target {target} failed on {what} ({} bytes, kept in {})", input.len(), path.display());
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, i64::MAX as u64, u64::MAX];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = m.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                m[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                m[i] = INTERESTING[rng.below(5)] as u8;
            }
            2 if len > 0 => {
                // An integer field of 1, 4 or 8 bytes, little endian.
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 4, 8][rng.below(3)].min(len);
                let i = rng.below(len - w + 1);
                m[i..i + w].copy_from_slice(&v[..w]);
            }
            3 => m.truncate(rng.below(len + 1)),
            4 => {
                // Splice: a prefix of this input, a suffix of another.
                let (a, b) = (rng.below(len + 1), rng.below(other.len() + 1));
                m.truncate(a);
                m.extend_from_slice(&other[b..]);
            }
            5 if len > 0 => {
                // Delete a run.
                let i = rng.below(len);
                let n = rng.below((len - i).min(64)) + 1;
                m.drain(i..i + n);
            }
            _ => {
                // Insert a run of one byte, or a copy of bytes from elsewhere.
                let i = rng.below(len + 1);
                let n = rng.below(64) + 1;
                let ins: Vec<u8> = if len > 0 && rng.below(2) == 0 {
                    let s = rng.below(len);
                    m[s..(s + n).min(len)].to_vec()
                } else {
                    vec![rng.next() as u8; n]
                };
                m.splice(i..i, ins);
            }
        }
    }
    m
}

fn run(target: &str, body: fn(&[u8]), seed: u64) {
    let inputs = corpus(target);
    let start = Instant::now();
    for (name, bytes) in &inputs {
        check(target, body, &format!("corpus file {name}"), bytes);
    }
    let replayed = start.elapsed();
    let mut rng = Rng(seed);
    let mut done = 0;
    while done < MUTATIONS && start.elapsed() < BUDGET {
        let (name, bytes) = &inputs[done % inputs.len()];
        let other = &inputs[rng.below(inputs.len())].1;
        let m = mutate(&mut rng, bytes, other);
        check(target, body, &format!("mutation {done} of {name} (rng seed {seed})"), &m);
        done += 1;
    }
    eprintln!(
        "{target}: {} corpus files in {replayed:.2?}, {done} mutations, {:.2?} in all",
        inputs.len(),
        start.elapsed()
    );
}

#[test]
fn index_corpus_and_mutations() {
    run("index", targets::index, 0x1d3c);
}

#[test]
fn convert_corpus_and_mutations() {
    run("convert", targets::convert, 0xc0de);
}

#[test]
fn trace_corpus_and_mutations() {
    run("trace", targets::trace, 0x7ace);
}

#[test]
fn labels_corpus_and_mutations() {
    run("labels", targets::labels, 0x1abe);
}

/// The seeds made from the library's own layers (the rest of the corpus is
/// from GNU tar, real traces, and what `cargo fuzz` found and minimized).
#[test]
#[ignore = "writes fuzz/corpus/; run by hand (docs/fuzzing.md)"]
fn write_seeds() {
    use hyperbox::testing::{small_chunks, Layer, LayerBuilder};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 ^ (i >> 7) as u8).collect();
    let tars: Vec<(&str, Vec<u8>)> = vec![
        ("seed-ustar", LayerBuilder::busybox_free().finish()),
        (
            "seed-mixed",
            LayerBuilder::new()
                .dir("d")
                .file("d/a", 0o644, &data)
                .file("d/b", 0o4755, b"small")
                .symlink("d/l", "a")
                .hardlink("d/h", "d/a")
                .special("d/fifo", tar::EntryType::Fifo, 0o644)
                .device("d/null", tar::EntryType::Char, 0o666, 1, 3)
                .file("d/.wh.gone", 0o644, b"")
                .file("e/.wh..wh..opq", 0o644, b"")
                .file("e/f", 0o600, &data[..1000])
                .finish(),
        ),
        (
            "seed-gnu-long",
            LayerBuilder::gnu()
                .owner(1000, 1000)
                .dir_mode(&"x".repeat(120), 0o700)
                .file(&format!("{}/{}", "x".repeat(120), "y".repeat(90)), 0o644, b"long")
                .symlink("s", &"t/".repeat(70))
                .finish(),
        ),
        (
            "seed-pax-xattrs",
            LayerBuilder::new()
                .file_with_xattrs("f", 0o644, b"x", &[("user.a", b"1"), ("security.capability", &[1, 0, 0, 2])])
                .file("g", 0o644, &data[..600])
                .finish(),
        ),
    ];
    for (name, tar) in &tars {
        put("convert", name, tar);
    }
    // GNU tar's own (sparse files, PAX, v7), committed: their indexes too.
    let gnutar = corpus("convert").into_iter().filter(|(n, _)| n.starts_with("seed-gnutar"));
    let tars: Vec<(String, Vec<u8>)> = tars.into_iter().map(|(n, t)| (n.to_string(), t)).chain(gnutar).collect();
    for (name, tar) in &tars {
        let layer = Layer::from_tar(tar.clone(), &targets::convert_options());
        let raw = layer.out.index.encode();
        put("index", &format!("{name}-raw"), &[&[targets::INDEX_RAW][..], &raw].concat());
        put("index", &format!("{name}-frame"), &[&[targets::INDEX_FRAME][..], layer.index_frame()].concat());
        put("index", &format!("{name}-blob"), &[&[targets::INDEX_BLOB][..], &layer.blob].concat());
    }
    // The index of a real busybox layer (not its 1 MB blob).
    let bb = LayerBuilder::busybox().convert_with(&small_chunks());
    put("index", "seed-busybox-frame", &[&[targets::INDEX_FRAME][..], bb.index_frame()].concat());

    put("trace", "seed-base", targets::BASE_TRACE.as_bytes());
    // A trace as the recorder writes one: each frame of a layer, read over
    // two runs, with the report of the last start.
    use hyperbox::trace::{ImageKey, StartReport, Trace, TraceEntry};
    let layer = LayerBuilder::busybox_free().file("bin/app", 0o755, &data).convert_with(&targets::convert_options());
    let image = ImageKey {
        digest: hyperbox::digest::Digest::of(b"manifest").to_string(),
        repository: "registry.example:5000/app".into(),
    };
    let mut t = Trace::new(&image);
    for run in 0..2u32 {
        let entries = (0..layer.index.frames().len())
            .map(|i| {
                let f = layer.index.frames().get(i);
                TraceEntry {
                    layer: layer.digest().clone(),
                    frame: i as u32,
                    chunk: f.id,
                    c_len: f.c_len,
                    u_len: f.u_len,
                    path: if i % 2 == 0 { "bin/app".into() } else { String::new() },
                    offset: i as u64 * 256,
                    at_ms: 10 * i as u32 + run,
                    seen: 1,
                }
            })
            .collect();
        t.merge_run(entries, 10_000);
    }
    t.last_start =
        Some(StartReport { at: 1_700_000_000, read: 12, prefetched: 10, hits: 9, precision: 0.9, recall: 0.75 });
    put("trace", "seed-recorded", &t.to_json());
    put(
        "labels",
        "seed-pull",
        format!(
            "default/3/sha256:abc\ntoken\n@0=sha256:1\n@1=token\n@2=docker.io/library/busybox:latest\n@3={}\n@4=true",
            hyperbox::digest::Digest::of(b"x")
        )
        .as_bytes(),
    );
    put(
        "labels",
        "seed-cri",
        b"k8s.io/12/sha256:def\n\ncontainerd.io/snapshot/cri.image-ref=registry.example:5000/app/web:v1@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n@6=sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n@7=sha256:00",
    );
    let loc = hyperbox::format::IndexLocation {
        offset: 12345,
        length: 678,
        digest: hyperbox::digest::Digest::of(b"index"),
        version: 1,
    };
    let mut ann: Vec<String> = loc.to_annotations().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    ann.sort();
    put("labels", "seed-index-location", format!("ns/1/x\nsecret\n{}", ann.join("\n")).as_bytes());
}
