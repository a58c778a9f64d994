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
//! `cargo run --example fuzz_seeds` rewrites the seeds made from the
//! library's own layers (docs/fuzzing.md).

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

#[test]
fn fuse_request_corpus_and_mutations() {
    run("fuse_request", targets::fuse_request, 0xf05e);
}
