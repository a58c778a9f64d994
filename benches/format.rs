//! Format benchmarks (figures in docs/benchmarks.md):
//! - chunk + hash + compress throughput, MB/s of tar per core (target ≥ 150);
//! - index encode and parse for 100k entries (target: parse well under 100 ms).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hyperbox::digest::Digest;
use hyperbox::format::{self, writer, IndexLocation};

mod corpus;

fn convert(c: &mut Criterion) {
    let tar = corpus::usr_tar(
        &["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/bin", "/usr/share/doc"],
        96 << 20,
    );
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.sample_size(10);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        g.bench_with_input(BenchmarkId::new("chunk+hash+compress", format!("{threads}-thread")), &tar, |b, tar| {
            b.iter(|| {
                pool.install(|| {
                    writer::convert_tar(&tar[..], std::io::sink(), &writer::WriteOptions::default()).unwrap()
                })
            })
        });
    }
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
