//! Layers through FUSE, with a real `docker-registry` on loopback.
//!
//! - `fs/cached-seq-read/{fuse,ext4}`: read a 64 MiB file, already in the
//!   page cache, with 1 MiB reads, through FUSE and on ext4 (`-open-once`:
//!   the same without an open per pass). Printed first: the median over 6
//!   fills of the page cache, each read 8 times, interleaved with ext4, and
//!   the range of the fills' ratios. Target: FUSE at least 0.7 of ext4.
//! - `fs/cached-small-files/{fuse,ext4}`: walk a tree of 2,000 small files
//!   in 40 directories, already cached, as an interpreter importing modules
//!   does: list each directory, `lstat` each entry, open and read each file,
//!   follow each symlink. Interleaved medians and the ratio to ext4 printed;
//!   then the median first walk of 7 fresh mounts (chunks in the store),
//!   with and without the frame cache (`fetch.frame_cache_mb`).
//! - cold sequential read of that file over loopback with each read-ahead
//!   window: median time and range requests printed.
//! - cold 4 KiB random reads (each in a chunk not yet fetched): latency p50
//!   and p99 printed, over 200 reads.
//! - hyperboxd's RSS with 10 mounted layers of 30,000 files each: printed
//!   (this process's VmRSS before and after building and mounting them).
//!
//! `cargo bench --bench fs` (as root, with /dev/fuse); figures go in
//! docs/benchmarks.md. `FS_BENCH_PARTS=memory,cached,small,cold,random`
//! runs only the parts named (all by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyperbox::fetcher::{FetchConfig, Fetcher, RemoteLayer};
use hyperbox::format::{self, writer, LayerIndex};
use hyperbox::mount::{LayerFs, Mount, MountOptions};
use hyperbox::registry::{BlobBody, Client, RegistryConfig, Repo};
use hyperbox::store::{Store, StoreConfig};
use rand::{Rng, RngCore, SeedableRng};

struct Env {
    rt: tokio::runtime::Runtime,
    registry: common::Registry,
    client: Arc<Client>,
}

fn push(env: &Env, tar: &[u8]) -> Arc<RemoteLayer> {
    let mut blob = Vec::new();
    let layer = writer::convert_tar(tar, &mut blob, &writer::WriteOptions::default()).unwrap();
    let (_, index) = format::open_layer(&blob[..], Some(&layer.location)).unwrap();
    let repo = Repo { registry: env.registry.addr.clone(), name: "bench/fs".into() };
    env.rt.block_on(env.client.push_blob(&repo, &layer.blob_digest, BlobBody::Bytes(&blob))).unwrap();
    Arc::new(RemoteLayer { repo, blob: layer.blob_digest, index: Arc::new(index) })
}

fn mount(env: &Env, layer: Arc<RemoteLayer>, store_dir: &Path, at: &Path) -> (Mount, Fetcher) {
    let store = Arc::new(Store::open(store_dir, &StoreConfig::default()).unwrap());
    let fetcher = Fetcher::new(env.client.clone(), store, FetchConfig::default());
    (mount_with(env, layer, &fetcher, at, defaults().1), fetcher)
}

/// hyperboxd's defaults: FUSE threads per layer and read-ahead window
/// (`daemon.fuse_threads`, `daemon.fuse_read_ahead_kb`).
fn defaults() -> (usize, u32) {
    let d = hyperbox::config::DaemonConfig::default();
    (d.fuse_threads, d.fuse_read_ahead_kb)
}

/// Mount with hyperboxd's defaults but for the read-ahead window (KiB).
fn mount_with(env: &Env, layer: Arc<RemoteLayer>, fetcher: &Fetcher, at: &Path, read_ahead_kb: u32) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    let opts = MountOptions { threads: defaults().0, read_ahead_kb };
    let m = LayerFs::new(layer, fetcher.clone(), env.rt.handle().clone(), None).mount(at, &opts).unwrap();
    assert_eq!(m.read_ahead().map_err(|e| e.to_string()), Ok(read_ahead_kb));
    m
}

fn read_all(path: &Path, buf: &mut [u8]) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut n = 0u64;
    loop {
        let k = f.read(buf).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

/// Drop `path`'s pages from the page cache and read it back in, into pages
/// the kernel places anew (a FUSE file's come back from the store).
fn refill(path: &Path, buf: &mut [u8]) {
    common::drop_page_cache(path);
    read_all(path, buf);
}

fn pread_all(f: &std::fs::File, buf: &mut [u8]) -> u64 {
    let mut n = 0u64;
    loop {
        let k = f.read_at(buf, n).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

/// Whether `FS_BENCH_PARTS` (a comma-separated list; unset: all) names `part`.
fn part(part: &str) -> bool {
    match std::env::var("FS_BENCH_PARTS") {
        Ok(parts) => parts.split(',').any(|p| p.trim() == part),
        Err(_) => true,
    }
}

/// Median of `times` (sorted in place).
fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// Walk `root` as an interpreter importing modules does: list each
/// directory, `lstat` each entry, read each file whole and each symlink's
/// target. Returns the bytes read.
fn walk(root: &Path, buf: &mut [u8]) -> u64 {
    let mut n = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs.push(p);
            } else if m.is_symlink() {
                n += std::fs::read_link(&p).unwrap().as_os_str().len() as u64;
            } else {
                n += read_all(&p, buf);
            }
        }
    }
    n
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn benches(c: &mut Criterion) {
    let needs = [common::Need::Root, common::Need::Tool("docker-registry"), common::Need::Path("/dev/fuse")];
    if !common::have("fs benchmarks", &needs) {
        return;
    }
    let registry = common::Registry::start();
    let cfg = RegistryConfig { insecure: vec![registry.addr.clone()], ..RegistryConfig::default() };
    let env = Env {
        rt: tokio::runtime::Runtime::new().unwrap(),
        client: Arc::new(Client::new(&cfg, false).unwrap()),
        registry,
    };
    // As hyperboxd does at start (the memory figures depend on it).
    hyperbox::mount::fix_mmap_threshold();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);

    if part("memory") {
        // Memory first, while the process is fresh (what earlier parts free
        // stays in the allocator and blurs RSS): 10 mounted layers of 30,000
        // small files each. Measured before
        // the layers are built, after (their decoded indexes held, as the daemon
        // holds them), and after mounting (trees, FUSE sessions, kernel lookups).
        let start = rss_kib();
        let mut layers = Vec::new();
        for l in 0..10 {
            let mut b = common::LayerBuilder::new();
            for d in 0..300 {
                b = b.dir(&format!("usr/lib/d{d}"));
                for f in 0..100 {
                    b = b.file(&format!("usr/lib/d{d}/file-{f}.py"), 0o644, format!("# {l} {d} {f}\n").as_bytes());
                }
            }
            layers.push(push(&env, &b.finish()));
        }
        // One store and fetcher for all, as in hyperboxd.
        let store = Arc::new(Store::open(&dir.path().join("db-m"), &StoreConfig::default()).unwrap());
        let fetcher = Fetcher::new(env.client.clone(), store, FetchConfig::default());
        let before = rss_kib();
        // The trees alone (what a mount builds), then dropped.
        let trees: Vec<_> = layers.iter().map(|l| hyperbox::fs::LayerTree::new(l.index.clone())).collect();
        let with_trees = rss_kib();
        drop(trees);
        let mut mounts = Vec::new();
        for (l, layer) in layers.into_iter().enumerate() {
            mounts.push(mount_with(&env, layer, &fetcher, &dir.path().join(format!("mnt-m{l}")), defaults().1));
        }
        // Touch every directory so the kernel has looked everything up once.
        for m in &mounts {
            assert_eq!(std::fs::read_dir(m.path().join("usr/lib")).unwrap().count(), 300);
        }
        let after = rss_kib();
        eprintln!(
            "fs RSS: {} MiB at start, {} MiB with 10 indexes of 30k files decoded, {} MiB with them mounted \
         (mounting: +{} KiB per layer; the tree alone +{} KiB per layer)",
            start / 1024,
            before / 1024,
            after / 1024,
            after.saturating_sub(before) / 10,
            with_trees.saturating_sub(before) / 10
        );
    }

    if part("small") {
        // Cached small files: 40 directories of 50 files (1-8 KiB) and one
        // symlink each, through FUSE and on ext4, side by side.
        let mut b = common::LayerBuilder::new();
        let ext4_tree = dir.path().join("small-on-ext4");
        let mut bytes = 0u64;
        for d in 0..40 {
            let sub = format!("site-packages/pkg{d}");
            b = b.dir(&sub);
            std::fs::create_dir_all(ext4_tree.join(&sub)).unwrap();
            for f in 0..50 {
                let mut data = vec![0u8; rng.gen_range(1024..8192)];
                rng.fill_bytes(&mut data);
                let path = format!("{sub}/mod{f}.py");
                b = b.file(&path, 0o644, &data);
                std::fs::write(ext4_tree.join(&path), &data).unwrap();
                bytes += data.len() as u64;
            }
            b = b.symlink(&format!("{sub}/latest.py"), "mod0.py");
            std::os::unix::fs::symlink("mod0.py", ext4_tree.join(format!("{sub}/latest.py"))).unwrap();
            bytes += "mod0.py".len() as u64;
        }
        let layer = push(&env, &b.finish());
        let (m, f) = mount(&env, layer.clone(), &dir.path().join("db-small"), &dir.path().join("mnt-small"));
        let mut buf = vec![0u8; 128 << 10];
        let variants = [("fuse", m.path().to_path_buf()), ("ext4", ext4_tree)];
        for (_, root) in &variants {
            assert_eq!(walk(root, &mut buf), bytes); // fetch, store, cache
        }
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..40 {
            for (i, (_, root)) in variants.iter().enumerate() {
                let t = Instant::now();
                walk(root, &mut buf);
                times[i].push(t.elapsed());
            }
        }
        let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
        for ((name, _), m) in variants.iter().zip(&medians) {
            eprintln!(
                "fs cached walk of 2,000 small files, interleaved, {name}: median {m:?}, ext4/this {:.2}",
                medians[1].as_secs_f64() / m.as_secs_f64()
            );
        }
        let mut g = c.benchmark_group("fs/cached-small-files");
        g.sample_size(20).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(2040));
        for (name, root) in &variants {
            g.bench_function(*name, |b| b.iter(|| walk(root, &mut buf)));
        }
        g.finish();
        // The first walk of a fresh mount, its chunks already in the store:
        // every entry is new to the kernel (a container's first start on a
        // node that has the image's data). Each walk gets a fresh fetcher,
        // so an empty frame cache, over the same store: the default cache
        // and none, alternating.
        let mut first = [Vec::new(), Vec::new()];
        for i in 0..7 {
            for (k, frame_cache_mb) in [FetchConfig::default().frame_cache_mb, 0].into_iter().enumerate() {
                let cfg = FetchConfig { frame_cache_mb, ..FetchConfig::default() };
                let fetcher = Fetcher::new(env.client.clone(), f.store().clone(), cfg);
                let at = dir.path().join(format!("mnt-small-{i}-{k}"));
                let m = mount_with(&env, layer.clone(), &fetcher, &at, defaults().1);
                let t = Instant::now();
                assert_eq!(walk(m.path(), &mut buf), bytes);
                first[k].push(t.elapsed());
                assert_eq!(fetcher.stats().requests(), 0, "the first walk fetched");
            }
        }
        let [with, without] = first.map(|mut t| median(&mut t));
        eprintln!(
            "fs first walk of 2,000 small files on a fresh mount, chunks in the store: median {with:?} \
             (without the frame cache {without:?}, {:.1}x)",
            without.as_secs_f64() / with.as_secs_f64()
        );
    }
    if !["cached", "cold", "random"].into_iter().any(part) {
        return;
    }

    // A 64 MiB file (and a 32 MiB one) for the sequential and random parts.
    let mut data = vec![0u8; 64 << 20];
    rng.fill_bytes(&mut data);
    let tar = common::LayerBuilder::new().file("big", 0o644, &data).file("other", 0o644, &data[..32 << 20]).finish();
    let layer = push(&env, &tar);
    let mut buf = vec![0u8; 1 << 20];
    if part("cached") {
        // Cached sequential reads: FUSE (hyperboxd's defaults) and ext4, side
        // by side. The read-ahead window does not matter here: no request
        // reaches the daemon.
        let (m, f) = mount(&env, layer.clone(), &dir.path().join("db1"), &dir.path().join("mnt1"));
        let ext4 = dir.path().join("big-on-ext4");
        std::fs::write(&ext4, &data).unwrap();
        let fuse_file = m.path().join("big");
        assert_eq!(read_all(&fuse_file, &mut buf), data.len() as u64); // fetch, store, cache
                                                                       // FUSE's page cache is 4 KiB pages, and how fast they copy out
                                                                       // depends on where in memory the kernel put them, which changes with
                                                                       // every fill (docs/benchmarks.md): so 6 fills, each read 8 times,
                                                                       // one pass of each in turn so that machine noise hits both alike.
        let variants = [("fuse", &fuse_file), ("ext4", &ext4)];
        let (fills, rounds) = (6, 8);
        let mut times = vec![Vec::new(); variants.len()];
        let mut ratios = Vec::new();
        for _ in 0..fills {
            let mut fill = vec![Vec::new(); variants.len()];
            for (_, path) in &variants {
                refill(path, &mut buf);
            }
            for _ in 0..rounds {
                for (i, (_, path)) in variants.iter().enumerate() {
                    let t = Instant::now();
                    read_all(path, &mut buf);
                    fill[i].push(t.elapsed());
                }
            }
            times.iter_mut().zip(&fill).for_each(|(all, this)| all.extend(this));
            let m: Vec<Duration> = fill.iter_mut().map(|t| median(t)).collect();
            ratios.push(m[1].as_secs_f64() / m[0].as_secs_f64());
        }
        let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
        ratios.sort_by(f64::total_cmp);
        eprintln!(
            "fs cached 64 MiB read, {fills} fills x {rounds} reads interleaved: fuse median {:?}, ext4 {:?}, \
             ext4/fuse {:.2} (fills: {:.2} to {:.2})",
            medians[0],
            medians[1],
            medians[1].as_secs_f64() / medians[0].as_secs_f64(),
            ratios[0],
            ratios[ratios.len() - 1]
        );
        let mut g = c.benchmark_group("fs/cached-seq-read");
        g.sample_size(20).measurement_time(Duration::from_secs(10)).throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("fuse", |b| b.iter(|| read_all(&fuse_file, &mut buf)));
        g.bench_function("ext4", |b| b.iter(|| read_all(&ext4, &mut buf)));
        // The same reads on a file opened once: no open/flush/release per pass.
        let (fuse_fd, ext4_fd) = (std::fs::File::open(&fuse_file).unwrap(), std::fs::File::open(&ext4).unwrap());
        g.bench_function("fuse-open-once", |b| b.iter(|| pread_all(&fuse_fd, &mut buf)));
        g.bench_function("ext4-open-once", |b| b.iter(|| pread_all(&ext4_fd, &mut buf)));
        g.finish();
        drop((fuse_fd, ext4_fd, m, f));
    }
    if part("cold") {
        // Cold sequential read of the whole 64 MiB file over loopback, with each
        // read-ahead window, alternating, 3 runs each (each on a fresh store).
        let mut cold: [(u32, Vec<Duration>, u64); 3] =
            [(defaults().1, Vec::new(), 0), (1024, Vec::new(), 0), (128, Vec::new(), 0)];
        for run in 0..3 {
            for (ra, times, requests) in cold.iter_mut() {
                let store = Arc::new(
                    Store::open(&dir.path().join(format!("db-cold-{ra}-{run}")), &StoreConfig::default()).unwrap(),
                );
                let fetcher = Fetcher::new(env.client.clone(), store, FetchConfig::default());
                let m =
                    mount_with(&env, layer.clone(), &fetcher, &dir.path().join(format!("mnt-cold-{ra}-{run}")), *ra);
                let t = Instant::now();
                assert_eq!(read_all(&m.path().join("big"), &mut buf), data.len() as u64);
                times.push(t.elapsed());
                *requests = fetcher.stats().requests();
            }
        }
        for (ra, times, requests) in cold.iter_mut() {
            times.sort_unstable();
            eprintln!(
                "fs cold sequential read of 64 MiB, read-ahead {ra} KiB: median {:?} of {:?} ({requests} range requests)",
                times[1], times
            );
        }
    }
    if part("random") {
        // Cold 4 KiB random reads, each in a frame not fetched yet: a fresh
        // store and mount, and one read in the middle of each of 200 frames of
        // "big", in random order.
        let (m2, f2) = mount(&env, layer.clone(), &dir.path().join("db2"), &dir.path().join("mnt2"));
        let file = std::fs::File::open(m2.path().join("big")).unwrap();
        let index: &LayerIndex = &layer.index;
        let frames = index.frames().len();
        let mut order: Vec<usize> = (0..frames).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let entry = index.entries().iter().find(|e| e.path == b"big").unwrap();
        let mut lat = Vec::new();
        let mut page = [0u8; 4096];
        for &fr in order.iter().take(200) {
            let (ts, te) = index.frame_tar_range(fr);
            if ts < entry.data_offset || te > entry.data_offset + entry.size {
                continue; // a frame of headers or of the other file
            }
            let off = (ts - entry.data_offset + (te - ts) / 2) & !4095;
            let t = Instant::now();
            file.read_exact_at(&mut page, off).unwrap();
            lat.push(t.elapsed());
        }
        lat.sort_unstable();
        if !lat.is_empty() {
            eprintln!(
                "fs cold 4 KiB random reads over loopback ({} reads, one frame each): p50 {:?}, p99 {:?} ({} requests)",
                lat.len(),
                lat[lat.len() / 2],
                lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
                f2.stats().requests()
            );
        }
        drop(file);
        drop(m2);
    }
}

criterion_group!(fs, benches);
criterion_main!(fs);
