//! The chunk store and the fetcher, on real RocksDB and a real
//! `docker-registry` over loopback.
//!
//! - `store/put`, `store/get_hit`: throughput of 128 KiB chunks (random, so
//!   zstd cannot shrink them: the worst case for I/O); and the latency of a
//!   hit, with p50/p99 printed from 20,000 timed gets.
//! - `fetch/100MB/{coalesced,one-per-frame}`: read every frame of a 100 MB
//!   layer into an empty store, with the default coalescing and with none;
//!   requests made are printed.
//!
//! `cargo bench --bench fetch`; figures go in docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hyperbox::digest::ChunkId;
use hyperbox::fetcher::{FetchConfig, Fetcher, Priority, RemoteLayer};
use hyperbox::format::{self, writer};
use hyperbox::registry::{BlobBody, Client, RegistryConfig, Repo};
use hyperbox::store::{Store, StoreConfig, VerifiedChunk};
use rand::{Rng, RngCore, SeedableRng};

const CHUNK: usize = 128 << 10;

fn random_chunks(n: usize) -> Vec<VerifiedChunk> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let mut d = vec![0u8; CHUNK];
            rng.fill_bytes(&mut d);
            VerifiedChunk::from_data(&d, 1)
        })
        .collect()
}

fn store_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let chunks = random_chunks(512); // 64 MiB
    g.throughput(Throughput::Bytes((chunks.len() * CHUNK) as u64));
    g.bench_function("put", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
                for ch in &chunks {
                    store.put(ch).unwrap();
                }
                (store, dir)
            },
            BatchSize::PerIteration,
        )
    });

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    for ch in &chunks {
        store.put(ch).unwrap();
    }
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id()).collect();
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    g.bench_function("get_hit", |b| b.iter(|| store.get(&ids[rng.gen_range(0..ids.len())]).unwrap().unwrap()));
    g.finish();

    let mut lat: Vec<Duration> = (0..20_000)
        .map(|i| {
            let t = Instant::now();
            store.get(&ids[(i * 7919) % ids.len()]).unwrap().unwrap();
            t.elapsed()
        })
        .collect();
    lat.sort_unstable();
    eprintln!(
        "store get_hit latency over {} gets of 128 KiB: p50 {:?}, p99 {:?}",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
}

fn fetch_benches(c: &mut Criterion) {
    if !common::have("fetch benchmarks", &[common::Need::Tool("docker-registry")]) {
        return;
    }
    let registry = common::Registry::start();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut b = common::LayerBuilder::new().dir("data");
    for i in 0..10 {
        let mut data = vec![0u8; 10 << 20];
        rng.fill_bytes(&mut data);
        b = b.file(&format!("data/f{i}"), 0o644, &data);
    }
    let tar = b.finish();
    let mut blob = Vec::new();
    let layer = writer::convert_tar(&tar[..], &mut blob, &writer::WriteOptions::default()).unwrap();
    let (_, index) = format::open_layer(&blob[..], Some(&layer.location)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg_cfg = RegistryConfig { insecure: vec![registry.addr.clone()], ..RegistryConfig::default() };
    let client = Arc::new(Client::new(&reg_cfg, false).unwrap());
    let repo = Repo { registry: registry.addr.clone(), name: "bench/layer".into() };
    rt.block_on(client.push_blob(&repo, &layer.blob_digest, BlobBody::Bytes(&blob))).unwrap();
    let remote = Arc::new(RemoteLayer { repo, blob: layer.blob_digest.clone(), index: Arc::new(index) });
    let n = remote.index.frames().len();

    let mut g = c.benchmark_group("fetch/100MB");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(blob.len() as u64));
    for (name, cfg) in [
        ("coalesced", FetchConfig::default()),
        ("one-per-frame", FetchConfig { max_request_bytes: 0, ..FetchConfig::default() }),
    ] {
        let mut requests = 0;
        let mut runs = 0;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let store = Arc::new(Store::open(dir.path(), &StoreConfig::default()).unwrap());
                    (dir, Fetcher::new(client.clone(), store, cfg.clone()))
                },
                |(dir, fetcher)| {
                    rt.block_on(async {
                        fetcher.read(&remote, 0..n, Priority::Demand).await.unwrap();
                        fetcher.settled().await;
                    });
                    requests += fetcher.stats().requests();
                    runs += 1;
                    (dir, fetcher)
                },
                BatchSize::PerIteration,
            )
        });
        eprintln!("fetch/100MB/{name}: {n} frames, {} requests per read of the layer", requests / runs.max(1));
    }
    g.finish();
}

criterion_group!(benches, store_benches, fetch_benches);
criterion_main!(benches);
