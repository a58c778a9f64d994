//! Format benchmarks (figures in docs/benchmarks.md):
//! - chunk + hash + compress throughput: wall-clock on all cores, and per
//!   core (the `cpu-time` bench measures CPU seconds; target ≥ 150 MB/s);
//! - index encode and parse for 100k entries (target: parse well under 100 ms).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyperbox::digest::Digest;
use hyperbox::format::{self, writer, IndexLocation};

mod corpus;

/// CPU time (user + system, all threads) this process has used.
fn cpu_time() -> Duration {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn convert(c: &mut Criterion) {
    let tar = corpus::usr_tar(
        &["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/bin", "/usr/share/doc"],
        96 << 20,
    );
    let opts = writer::WriteOptions::default();
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.sample_size(10);
    // Wall-clock time on all cores: parsing and compression run as a pipeline.
    g.bench_function("wall-clock", |b| b.iter(|| writer::convert_tar(&tar[..], std::io::sink(), &opts).unwrap()));
    // CPU time summed over all threads: its throughput is MB/s per core.
    g.bench_function("cpu-time", |b| {
        b.iter_custom(|iters| {
            let start = cpu_time();
            for _ in 0..iters {
                writer::convert_tar(&tar[..], std::io::sink(), &opts).unwrap();
            }
            cpu_time() - start
        })
    });
    g.finish();
}

fn index(c: &mut Criterion) {
    let index = corpus::synthetic_index(100_000);
    let frame = format::encode_index_frame(&index, 3);
    let loc = IndexLocation {
        offset: index.frames.iter().map(|f| f.c_len as u64).sum(),
        length: frame.len() as u64,
        digest: Digest::of(&frame),
        version: format::FORMAT_VERSION,
    };
    eprintln!(
        "100k-entry index: {} frames, {} bytes encoded ({:.1} bytes/entry)",
        index.frames.len(),
        frame.len(),
        frame.len() as f64 / 100_000.0
    );
    let mut g = c.benchmark_group("index-100k");
    g.sample_size(20);
    g.bench_function("encode", |b| b.iter(|| format::encode_index_frame(&index, 3)));
    g.bench_function("parse+verify", |b| b.iter(|| format::parse_index_frame(&frame, &loc).unwrap()));
    g.finish();
}

criterion_group!(benches, convert, index);
criterion_main!(benches);
