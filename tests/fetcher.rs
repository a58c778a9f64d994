//! The fetcher against a real `docker-registry`, directly and behind a
//! fault-injecting proxy: coalescing and single flight shown by request
//! counts, every fault met without an unverified byte coming back, retries
//! that succeed once a fault stops, mirrors, token refresh, a store under a
//! small budget that refetches what it evicted, and a frame cache that
//! answers reads coming back to a frame without the store, as do the frames
//! a trace's prefetch keeps for the reads it predicts; and a traced
//! prefetch whose range requests bring no more untraced bytes than
//! `prefetch.gap_pct` allows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::faultproxy::{Fault, FaultProxy};
use hyperbox::fetcher::{FetchConfig, FetchError, Fetcher, Priority, RemoteLayer, TryError};
use hyperbox::format::{self, writer, IndexLocation, LayerIndex};
use hyperbox::registry::{BlobBody, Client, RegistryConfig, RegistryError, Repo};
use hyperbox::store::{Store, StoreConfig};
use rand::{RngCore, SeedableRng};

const TOOLS: &[&str] = &["docker-registry"];

/// A converted layer: its blob, index, and every frame's data.
struct TestLayer {
    blob: Vec<u8>,
    digest: hyperbox::digest::Digest,
    index: Arc<LayerIndex>,
    location: IndexLocation,
    frames: Vec<Vec<u8>>,
}

/// A layer of `files` incompressible files of `size` bytes each, plus some
/// small ones, so frames are both chunked and packed.
fn make_layer(seed: u64, files: usize, size: usize) -> TestLayer {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = common::LayerBuilder::new().dir("data");
    for i in 0..files {
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        b = b.file(&format!("data/big{i}"), 0o644, &data);
    }
    for i in 0..50 {
        b = b.file(&format!("data/small{i}"), 0o644, format!("small file {i} of layer {seed}\n").as_bytes());
    }
    converted(&b.finish())
}

/// A layer tar converted with the default options.
fn converted(tar: &[u8]) -> TestLayer {
    let mut blob = Vec::new();
    let layer = writer::convert_tar(tar, &mut blob, &writer::WriteOptions::default()).unwrap();
    let (_, index) = format::open_layer(&blob[..], Some(&layer.location)).unwrap();
    let frames = (0..index.frames().len()).map(|i| format::read_frame(&blob[..], &index, i).unwrap()).collect();
    TestLayer { blob, digest: layer.blob_digest, index: Arc::new(index), location: layer.location, frames }
}

struct Setup {
    _dir: tempfile::TempDir,
    registry: common::Registry,
    proxy: FaultProxy,
    layer: TestLayer,
    fetcher: Fetcher,
    remote: Arc<RemoteLayer>,
}

fn test_config() -> FetchConfig {
    FetchConfig {
        max_request_bytes: 1 << 20,
        attempts: 3,
        backoff_initial_ms: 10,
        backoff_max_ms: 50,
        timeout_ms: 10_000,
        ..FetchConfig::default()
    }
}

fn client(insecure: &[&str], mirrors: &[(&str, &str)]) -> Arc<Client> {
    let cfg = RegistryConfig {
        insecure: insecure.iter().map(|s| s.to_string()).collect(),
        mirrors: mirrors.iter().map(|(r, m)| (r.to_string(), vec![m.to_string()])).collect(),
        read_timeout_ms: 500,
        connect_timeout_ms: 1_000,
        ..RegistryConfig::default()
    };
    Arc::new(Client::new(&cfg, false).unwrap())
}

async fn push(registry: &str, layer: &TestLayer) {
    // Default timeouts: an upload is not what these tests break.
    let cfg = RegistryConfig { insecure: vec![registry.to_string()], ..RegistryConfig::default() };
    let c = Client::new(&cfg, false).unwrap();
    let repo = Repo { registry: registry.to_string(), name: "test/layer".into() };
    c.push_blob(&repo, &layer.digest, BlobBody::Bytes(&layer.blob)).await.unwrap();
}

async fn setup(cfg: FetchConfig, store_cfg: StoreConfig) -> Setup {
    let registry = common::Registry::start();
    let proxy = FaultProxy::start(&registry.addr);
    let layer = make_layer(1, 3, 1 << 20);
    push(&registry.addr, &layer).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db"), &store_cfg).unwrap());
    let fetcher = Fetcher::new(client(&[&registry.addr, &proxy.addr], &[]), store, cfg);
    let remote = Arc::new(RemoteLayer {
        repo: Repo { registry: proxy.addr.clone(), name: "test/layer".into() },
        blob: layer.digest.clone(),
        index: layer.index.clone(),
    });
    Setup { _dir: dir, registry, proxy, layer, fetcher, remote }
}

/// The layer `setup()` pushes (`make_layer(1, 3, 1 << 20)`), read whole
/// under `test_config()` (1 MiB requests, no frame missing in between), is
/// REQUESTS_1 range requests. Derived by hand from its frame table (which
/// `assert_fixture` pins):
/// 23 frames in 3,147,936 bytes; the requests are cut where the next frame
/// would end past 1 MiB (1,048,576 bytes) from the request's first byte:
///
/// | request | frames | blob bytes                        | the next frame would end at |
/// |---------|--------|-----------------------------------|-----------------------------|
/// | 1       | 0-5    | 0..1,017,107                      | 1,048,770 (frame 6)         |
/// | 2       | 6-12   | 1,017,107..1,827,080 (809,973)    | 2,088,142 (frame 13)        |
/// | 3       | 13-19  | 1,827,080..2,837,432 (1,010,352)  | 3,078,224 (frame 20)        |
/// | 4       | 20-22  | 2,837,432..3,146,677 (309,245)    | (the last frame)            |
const REQUESTS_1: u64 = 4;

/// The same for `make_layer(3, 2, 512 << 10)`, the mirrors test's layer:
/// 11 frames in 1,050,075 bytes: frames 0-8 are bytes 0..979,419; frame 9
/// would end at 1,048,874, 298 bytes past 1 MiB, so frames 9-10
/// (979,419..1,049,283) are the second request.
const REQUESTS_3: u64 = 2;

/// The request counts above hold for the frame tables they were derived
/// from; if the writer (chunking, packing, zstd) changes, derive them again.
fn assert_fixture(layer: &TestLayer, frames: usize, blob_len: usize) {
    let got = (layer.index.frames().len(), layer.blob.len());
    assert_eq!(got, (frames, blob_len), "the fixture changed (frames, blob bytes): derive its request count again");
}

fn check_frames(got: &[bytes::Bytes], want: &[Vec<u8>], first: usize) {
    for (k, g) in got.iter().enumerate() {
        assert!(g[..] == want[first + k][..], "frame {} differs from the original", first + k);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_make_one_coalesced_fetch() {
    if !common::have_tools("concurrent_readers_make_one_coalesced_fetch", TOOLS) {
        return;
    }
    let s = setup(test_config(), StoreConfig::default()).await;
    let n = s.layer.frames.len();
    assert_fixture(&s.layer, 23, 3_147_936);
    // 16 readers of the whole layer at once.
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (f, l) = (s.fetcher.clone(), s.remote.clone());
            tokio::spawn(async move { f.read(&l, 0..n, Priority::Demand).await })
        })
        .collect();
    for r in readers {
        check_frames(&r.await.unwrap().unwrap(), &s.layer.frames, 0);
    }
    let want = REQUESTS_1;
    let st = s.fetcher.stats();
    eprintln!(
        "{n} frames, {} blob bytes: {} requests (expected {want}), stats {st:?}",
        s.layer.blob.len(),
        s.proxy.blob_gets()
    );
    assert_eq!(s.proxy.blob_gets(), want, "16 readers of {n} frames must make exactly the coalesced requests");
    assert_eq!(st.requests(), want);
    assert_eq!(st.chunks as usize, n);
    // Everything is local now: no more requests.
    let again = s.fetcher.read(&s.remote, 0..n, Priority::Demand).await.unwrap();
    check_frames(&again, &s.layer.frames, 0);
    assert_eq!(s.proxy.blob_gets(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_coalescing_each_frame_is_a_request() {
    if !common::have_tools("without_coalescing_each_frame_is_a_request", TOOLS) {
        return;
    }
    let cfg = FetchConfig { max_request_bytes: 0, ..test_config() };
    let s = setup(cfg, StoreConfig::default()).await;
    let n = s.layer.frames.len();
    check_frames(&s.fetcher.read(&s.remote, 0..n, Priority::Demand).await.unwrap(), &s.layer.frames, 0);
    assert_eq!(s.proxy.blob_gets(), n as u64);
    // Frames with a stored frame between them are still one request each, and
    // a gap within coalesce_gap_bytes is bridged when coalescing is on.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_gap_is_bridged_and_a_large_one_is_not() {
    if !common::have_tools("a_small_gap_is_bridged_and_a_large_one_is_not", TOOLS) {
        return;
    }
    // The layer setup() pushes; its frames decide the gap to configure.
    let layer = make_layer(1, 3, 1 << 20);
    let idx = &layer.index;
    let big: Vec<usize> = (0..idx.frames().len()).filter(|&i| idx.frames().get(i).u_len >= 64 << 10).collect();
    let (a, b) = (big[0], big[0] + 2);
    let gap = idx.frame_blob_range(b).0 - idx.frame_blob_range(a).1;
    let cfg = FetchConfig { coalesce_gap_bytes: gap, max_request_bytes: 64 << 20, ..test_config() };
    let s = setup(cfg, StoreConfig::default()).await;
    // Two frames with `gap` bytes of another frame between: one request.
    let got = s.fetcher.read_frames(&s.remote, &[a, b], Priority::Demand).await.unwrap();
    assert!(got[0][..] == layer.frames[a][..] && got[1][..] == layer.frames[b][..]);
    assert_eq!(s.proxy.blob_gets(), 1);
    // The bridged frame came along, verified, and is now local.
    s.fetcher.settled().await;
    assert!(s.fetcher.store().contains(&idx.frames().get(a + 1).id).unwrap());
    // Two frames further apart than `gap`: two requests.
    let x = b + 1;
    let y = (x + 1..idx.frames().len()).find(|&y| idx.frame_blob_range(y).0 - idx.frame_blob_range(x).1 > gap).unwrap();
    let got = s.fetcher.read_frames(&s.remote, &[x, y], Priority::Demand).await.unwrap();
    assert!(got[0][..] == layer.frames[x][..] && got[1][..] == layer.frames[y][..]);
    assert_eq!(s.proxy.blob_gets(), 3, "frames more than coalesce_gap_bytes apart are two requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_fails_cleanly_and_reads_succeed_once_it_stops() {
    if !common::have_tools("every_fault_fails_cleanly_and_reads_succeed_once_it_stops", TOOLS) {
        return;
    }
    let s = setup(test_config(), StoreConfig::default()).await;
    let idx = &s.layer.index;
    // Each fault, and what the error must say of its cause.
    let faults = [
        (Fault::Drop, "connection closed"),
        (Fault::Stall, "timed out"),
        (Fault::Status500, "HTTP 500"),
        (Fault::Full200, "expected 206 Partial Content, got 200"),
        (Fault::FlipByte, "failed verification"),
        (Fault::Truncate, "error decoding response body"),
    ];
    // Each fault gets two frames of its own, so earlier successes do not hide it.
    for (k, (fault, cause)) in faults.iter().enumerate() {
        let persistent = 2 * k..2 * k + 1;
        let transient = 2 * k + 1..2 * k + 2;
        // A fault that does not stop: an error naming registry, repository,
        // blob and chunk; nothing stored, nothing returned.
        s.proxy.set(*fault, None);
        let before = s.proxy.blob_gets();
        let err = s.fetcher.read(&s.remote, persistent.clone(), Priority::Demand).await.unwrap_err();
        let msg = err.to_string();
        eprintln!("{fault:?}: {msg}");
        assert!(matches!(err, FetchError::Remote { .. }), "{fault:?}: {err:?}");
        for needle in [s.proxy.addr.as_str(), "test/layer", &s.layer.digest.to_string(), cause] {
            assert!(msg.contains(needle), "{fault:?}: error {msg:?} does not name {needle}");
        }
        assert_eq!(s.proxy.blob_gets() - before, 3, "{fault:?}: 3 attempts, then give up");
        for i in persistent.clone() {
            assert!(!s.fetcher.store().contains(&idx.frames().get(i).id).unwrap(), "{fault:?}: frame {i} stored");
        }
        // The fault stops: the same read now succeeds with the right bytes.
        s.proxy.set(Fault::None, None);
        let got = s.fetcher.read(&s.remote, persistent.clone(), Priority::Demand).await.unwrap();
        check_frames(&got, &s.layer.frames, persistent.start);
        // A fault that happens once is absorbed by a retry.
        s.proxy.set(*fault, Some(1));
        let retries = s.fetcher.stats().retries;
        let got = s.fetcher.read(&s.remote, transient.clone(), Priority::Demand).await.unwrap();
        check_frames(&got, &s.layer.frames, transient.start);
        assert_eq!(s.proxy.faulted() as usize, 3 * (k + 1) + k + 1, "{fault:?}: fault counts");
        assert!(s.fetcher.stats().retries > retries, "{fault:?}: retried");
    }
    let st = s.fetcher.stats();
    assert!(st.verify_failures >= 4, "flipped bytes are caught by verification: {st:?}");
}

/// `timeout_ms` bounds a whole read, tries and backoff included, for chunks
/// and indexes alike: a registry that answers too slowly every time gets one
/// try, not `attempts` tries of `timeout_ms` each. Then an index read meets
/// a failure that stops, and the retry policy gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ms_bounds_the_whole_read_of_chunks_and_of_an_index() {
    if !common::have_tools("timeout_ms_bounds_the_whole_read_of_chunks_and_of_an_index", TOOLS) {
        return;
    }
    // Answers come after 400 ms: under the client's 500 ms read timeout, so
    // only timeout_ms (300) can cut them off.
    let s = setup(FetchConfig { timeout_ms: 300, ..test_config() }, StoreConfig::default()).await;
    s.proxy.set(Fault::Delay(400), None);
    let began = std::time::Instant::now();
    let err = s.fetcher.read(&s.remote, 0..1, Priority::Demand).await.unwrap_err();
    let took = began.elapsed();
    eprintln!("chunks, after {took:?}: {err}");
    assert!(
        matches!(err, FetchError::Remote { attempts: 1, cause: TryError::TimedOut { ms: 300, .. }, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("fetch.timeout_ms (300 ms)"), "{err}");
    assert_eq!(s.proxy.blob_gets(), 1);
    assert!(took < Duration::from_millis(1_000), "{took:?}");

    let repo = s.remote.repo.clone();
    let began = std::time::Instant::now();
    let err = s.fetcher.layer_index(&repo, &s.layer.digest, &s.layer.location).await.unwrap_err();
    let took = began.elapsed();
    eprintln!("index, after {took:?}: {err}");
    assert!(matches!(err, FetchError::Index { cause: TryError::TimedOut { ms: 300, .. }, .. }), "{err:?}");
    for needle in [s.proxy.addr.as_str(), "test/layer", &s.layer.digest.to_string(), "fetch.timeout_ms"] {
        assert!(err.to_string().contains(needle), "{err} does not name {needle}");
    }
    assert_eq!(s.proxy.blob_gets(), 2, "one try for the index: the deadline is for the whole read");
    assert!(took < Duration::from_millis(1_000), "{took:?}");

    // A 500 once: the index read retries and gets it, verified.
    s.proxy.set(Fault::Status500, Some(1));
    let index = s.fetcher.layer_index(&repo, &s.layer.digest, &s.layer.location).await.unwrap();
    assert_eq!(index.frames().len(), s.layer.index.frames().len());
    assert_eq!(s.proxy.blob_gets(), 4, "a failed try and a good one");
    // Now it is kept: no request.
    s.fetcher.layer_index(&repo, &s.layer.digest, &s.layer.location).await.unwrap();
    assert_eq!(s.proxy.blob_gets(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_blob_is_a_clear_error_without_retries() {
    if !common::have_tools("a_missing_blob_is_a_clear_error_without_retries", TOOLS) {
        return;
    }
    let s = setup(test_config(), StoreConfig::default()).await;
    let other = make_layer(2, 1, 200 << 10); // never pushed
    let remote =
        Arc::new(RemoteLayer { repo: s.remote.repo.clone(), blob: other.digest.clone(), index: other.index.clone() });
    let err = s.fetcher.read(&remote, 0..1, Priority::Demand).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("404") && msg.contains(&other.digest.to_string()) && msg.contains("test/layer"), "{msg}");
    assert_eq!(s.proxy.blob_gets(), 1, "a 404 is final: {msg}");
    // The registry's answer stays typed, as the error's source.
    match &err {
        FetchError::Remote { cause: TryError::Registry(e), attempts: 1, .. } => {
            assert!(matches!(**e, RegistryError::Status { status: 404, .. }), "{e:?}");
        }
        other => panic!("not a registry error: {other:?}"),
    }
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_come_first_and_the_registry_backs_them_up() {
    if !common::have_tools("mirrors_come_first_and_the_registry_backs_them_up", TOOLS) {
        return;
    }
    let origin = common::Registry::start();
    let mirror = common::Registry::start();
    let (origin_proxy, mirror_proxy) = (FaultProxy::start(&origin.addr), FaultProxy::start(&mirror.addr));
    let layer = make_layer(3, 2, 512 << 10);
    assert_fixture(&layer, 11, 1_050_075);
    push(&origin.addr, &layer).await;
    let n = layer.frames.len();
    let fetcher_for = |dir: &tempfile::TempDir| {
        let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
        let mirror_url = format!("http://{}", mirror_proxy.addr);
        let c = client(&[&origin_proxy.addr], &[(&origin_proxy.addr, &mirror_url)]);
        Fetcher::new(c, store, test_config())
    };
    let remote = Arc::new(RemoteLayer {
        repo: Repo { registry: origin_proxy.addr.clone(), name: "test/layer".into() },
        blob: layer.digest.clone(),
        index: layer.index.clone(),
    });
    // The mirror lacks the blob (404): each request falls through to the registry.
    let d1 = tempfile::tempdir().unwrap();
    check_frames(&fetcher_for(&d1).read(&remote, 0..n, Priority::Demand).await.unwrap(), &layer.frames, 0);
    let groups = REQUESTS_3;
    assert_eq!((mirror_proxy.blob_gets(), origin_proxy.blob_gets()), (groups, groups));
    // Once the mirror has it, the registry is not asked.
    push(&mirror.addr, &layer).await;
    let d2 = tempfile::tempdir().unwrap();
    check_frames(&fetcher_for(&d2).read(&remote, 0..n, Priority::Demand).await.unwrap(), &layer.frames, 0);
    assert_eq!((mirror_proxy.blob_gets(), origin_proxy.blob_gets()), (2 * groups, groups));
    // A mirror serving corrupt bytes is skipped for the registry, and nothing bad is kept.
    mirror_proxy.set(Fault::FlipByte, None);
    let d3 = tempfile::tempdir().unwrap();
    let f3 = fetcher_for(&d3);
    check_frames(&f3.read(&remote, 0..n, Priority::Demand).await.unwrap(), &layer.frames, 0);
    assert_eq!(origin_proxy.blob_gets(), 2 * groups);
    assert_eq!(f3.stats().verify_failures, groups);
    // A mirror that is down costs one try per request, then the registry serves.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let d4 = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&d4.path().join("db"), &StoreConfig::default()).unwrap());
    let f4 = Fetcher::new(client(&[&origin_proxy.addr], &[(&origin_proxy.addr, &dead)]), store, test_config());
    check_frames(&f4.read(&remote, 0..n, Priority::Demand).await.unwrap(), &layer.frames, 0);
    assert_eq!(f4.stats().errors, groups, "{:?}", f4.stats());
    assert_eq!(origin_proxy.blob_gets(), 3 * groups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_a_bridged_gap_are_fetched_once() {
    if !common::have_tools("frames_in_a_bridged_gap_are_fetched_once", TOOLS) {
        return;
    }
    let s = setup(
        FetchConfig { coalesce_gap_bytes: 1 << 20, max_request_bytes: 64 << 20, ..test_config() },
        StoreConfig::default(),
    )
    .await;
    s.proxy.set(Fault::Delay(300), None);
    // Reader A asks for frames 0 and 4; 1..=3 come along in the same request.
    let (f, l) = (s.fetcher.clone(), s.remote.clone());
    let a = tokio::spawn(async move { f.read_frames(&l, &[0, 4], Priority::Demand).await });
    while s.proxy.blob_gets() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Reader B asks for frame 2 while A's request is on its way: it waits for A's.
    let got = s.fetcher.read_frames(&s.remote, &[2], Priority::Demand).await.unwrap();
    assert!(got[0][..] == s.layer.frames[2][..]);
    let got = a.await.unwrap().unwrap();
    assert!(got[0][..] == s.layer.frames[0][..] && got[1][..] == s.layer.frames[4][..]);
    assert_eq!(s.proxy.blob_gets(), 1);
    assert_eq!(s.fetcher.stats().joined, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_into_store_fills_the_store_in_coalesced_requests() {
    if !common::have_tools("fetch_into_store_fills_the_store_in_coalesced_requests", TOOLS) {
        return;
    }
    let s = setup(test_config(), StoreConfig::default()).await;
    let n = s.layer.frames.len();
    assert_fixture(&s.layer, 23, 3_147_936);
    let all: Vec<usize> = (0..n).collect();
    s.fetcher.fetch_into_store(&s.remote, &all, Priority::Prefetch).await.unwrap();
    s.fetcher.settled().await;
    for i in 0..n {
        assert!(s.fetcher.store().contains(&s.layer.index.frames().get(i).id).unwrap(), "frame {i}");
    }
    let want = REQUESTS_1;
    assert_eq!(s.proxy.blob_gets(), want);
    assert_eq!(s.fetcher.stats().prefetch_requests, want);
    // A second time finds everything stored, without reading it back.
    s.fetcher.fetch_into_store(&s.remote, &all, Priority::Prefetch).await.unwrap();
    assert_eq!(s.proxy.blob_gets(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refreshed() {
    if !common::have_tools("expired_tokens_are_refreshed", TOOLS) {
        return;
    }
    let cfg =
        FetchConfig { max_request_bytes: 0, max_concurrent_requests: 1, max_prefetch_requests: 1, ..test_config() };
    let s = setup(cfg, StoreConfig::default()).await;
    s.proxy.require_tokens(3);
    let n = s.layer.frames.len().min(30);
    check_frames(&s.fetcher.read(&s.remote, 0..n, Priority::Demand).await.unwrap(), &s.layer.frames, 0);
    // Each token serves 3 requests; the 4th answers 401 and a new one is fetched.
    assert_eq!(s.proxy.tokens_issued(), n.div_ceil(3) as u64);
    assert_eq!(s.fetcher.stats().errors, 0, "a refresh is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_reads_overtake_queued_prefetch() {
    if !common::have_tools("demand_reads_overtake_queued_prefetch", TOOLS) {
        return;
    }
    let cfg =
        FetchConfig { max_request_bytes: 0, max_concurrent_requests: 2, max_prefetch_requests: 1, ..test_config() };
    let s = setup(cfg, StoreConfig::default()).await;
    s.proxy.set(Fault::Delay(100), None);
    let n = s.layer.frames.len();
    assert!(n > 20, "{n} frames");
    // Prefetch all frames but the last, one request at a time (100 ms each).
    let (f, l) = (s.fetcher.clone(), s.remote.clone());
    let prefetch = tokio::spawn(async move { f.read(&l, 0..n - 1, Priority::Prefetch).await });
    while s.fetcher.stats().prefetch_requests < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A demand read of a frame queued at the end of the prefetch, and one of
    // a frame outside it, both finish while the prefetch is still going.
    let got = s.fetcher.read_frames(&s.remote, &[n - 2], Priority::Demand).await.unwrap();
    assert!(got[0][..] == s.layer.frames[n - 2][..]);
    let got = s.fetcher.read_frames(&s.remote, &[n - 1], Priority::Demand).await.unwrap();
    assert!(got[0][..] == s.layer.frames[n - 1][..]);
    assert!(!prefetch.is_finished(), "demand reads must not wait for the prefetch of {} frames", n - 1);
    assert_eq!(s.fetcher.stats().joined, 1, "the demand read joined the prefetch's flight");
    check_frames(&prefetch.await.unwrap().unwrap(), &s.layer.frames, 0);
    let st = s.fetcher.stats();
    assert_eq!(st.requests(), n as u64, "no chunk was fetched twice: {st:?}");
    assert_eq!(st.demand_requests, 2, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_store_stays_in_budget_and_refetches() {
    if !common::have_tools("a_small_store_stays_in_budget_and_refetches", TOOLS) {
        return;
    }
    let budget = 1 << 20;
    // The store alone: no frame cache to answer the second pass.
    let cfg = FetchConfig { frame_cache_mb: 0, ..test_config() };
    let s = setup(cfg, StoreConfig { budget_bytes: budget, evict_to: 0.9, ..StoreConfig::default() }).await;
    let n = s.layer.frames.len();
    assert!(s.layer.blob.len() as u64 > 2 * budget);
    for pass in 0..2 {
        for first in (0..n).step_by(4) {
            let range = first..(first + 4).min(n);
            let got = s.fetcher.read(&s.remote, range, Priority::Demand).await.unwrap();
            check_frames(&got, &s.layer.frames, first);
            s.fetcher.settled().await; // readers are answered before chunks are stored
            let bytes = s.fetcher.store().stats().bytes;
            assert!(bytes <= budget, "pass {pass}: store holds {bytes} bytes, budget {budget}");
        }
    }
    let st = s.fetcher.store().stats();
    assert!(st.evictions > 0, "{st:?}");
    // The second pass found the early frames evicted and fetched them again.
    assert!(s.fetcher.stats().chunks as usize > n, "{:?}", s.fetcher.stats());
    drop(s.registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_handed_over_at_run_time_are_used() {
    if !common::have_tools("credentials_handed_over_at_run_time_are_used", &["docker-registry", "htpasswd"]) {
        return;
    }
    let registry = common::Registry::start_with_auth("kubelet", "s3cret");
    let layer = make_layer(4, 1, 256 << 10);
    let cfg = RegistryConfig { insecure: vec![registry.addr.clone()], ..RegistryConfig::default() };
    let repo = Repo { registry: registry.addr.clone(), name: "test/layer".into() };
    let pusher = Client::new(&cfg, false).unwrap();
    pusher.set_credentials(&registry.addr, "kubelet", "s3cret");
    pusher.push_blob(&repo, &layer.digest, BlobBody::Bytes(&layer.blob)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
    let client = Arc::new(Client::new(&cfg, false).unwrap());
    let fetcher = Fetcher::new(client.clone(), store, test_config());
    let remote = Arc::new(RemoteLayer { repo, blob: layer.digest.clone(), index: layer.index.clone() });
    // Without credentials: a clear, final error.
    let msg = fetcher.read(&remote, 0..1, Priority::Demand).await.unwrap_err().to_string();
    assert!(msg.contains("credentials") && msg.contains(&registry.addr), "{msg}");
    assert_eq!(fetcher.stats().requests(), 1, "an auth failure is not retried: {msg}");
    // With the credentials the CRI hands over, the same read works.
    client.set_credentials(&registry.addr, "kubelet", "s3cret");
    let n = layer.frames.len();
    check_frames(&fetcher.read(&remote, 0..n, Priority::Demand).await.unwrap(), &layer.frames, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_cache_answers_reads_that_come_back() {
    if !common::have_tools("the_frame_cache_answers_reads_that_come_back", TOOLS) {
        return;
    }
    // 1 MiB of cache, about 3 MiB of frames: reading everything twice
    // evicts, and every byte must still be right.
    for mb in [32, 1, 0] {
        let s = setup(FetchConfig { frame_cache_mb: mb, ..test_config() }, StoreConfig::default()).await;
        let n = s.layer.frames.len();
        let got = s.fetcher.read(&s.remote, 0..n, Priority::Demand).await.unwrap();
        check_frames(&got, &s.layer.frames, 0);
        s.fetcher.settled().await;
        let (requests, store_hits) = (s.fetcher.stats().requests(), s.fetcher.store().stats().hits);
        for first in 0..n {
            let got = s.fetcher.read(&s.remote, first..first + 1, Priority::Demand).await.unwrap();
            check_frames(&got, &s.layer.frames, first);
        }
        let (f, st) = (s.fetcher.stats(), s.fetcher.store().stats());
        assert_eq!(f.requests(), requests, "{mb} MiB: a stored frame was fetched again");
        assert_eq!(f.store_hits, n as u64, "{mb} MiB: {f:?}");
        match mb {
            32 => {
                assert_eq!(f.cache_hits, n as u64, "{f:?}");
                assert_eq!(st.hits, store_hits, "the store was asked for cached frames: {st:?}");
            }
            0 => {
                assert_eq!(f.cache_hits, 0, "{f:?}");
                assert_eq!(st.hits, store_hits + n as u64, "{st:?}");
            }
            _ => {
                assert!(f.cache_hits < n as u64, "a 1 MiB cache held all {n} frames: {f:?}");
                assert_eq!(st.hits - store_hits + f.cache_hits, n as u64, "{f:?} {st:?}");
            }
        }
        drop(s.registry);
    }
}

/// Frames a trace says the start reads wait in memory, verified as the
/// prefetch fetched them, and their reads take them without the store;
/// what the trace did not name, or what does not fit in `ready_mb`, is read
/// from the store; nothing stays once read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_a_trace_expects_wait_for_their_reads() {
    if !common::have_tools("frames_a_trace_expects_wait_for_their_reads", TOOLS) {
        return;
    }
    for mb in [64, 1, 0] {
        let s = setup(FetchConfig { ready_mb: mb, ..test_config() }, StoreConfig::default()).await;
        let n = s.layer.frames.len();
        let expected = n / 2;
        let table = s.layer.index.frames();
        s.fetcher.expect_reads((0..expected).map(|f| table.get(f).id));
        let all: Vec<usize> = (0..n).collect();
        s.fetcher.fetch_into_store(&s.remote, &all, Priority::Prefetch).await.unwrap();
        s.fetcher.settled().await;
        let kept = s.fetcher.memory().ready;
        assert!(kept <= mb << 20, "{mb} MiB: {kept} bytes kept");
        let (requests, store_hits) = (s.fetcher.stats().requests(), s.fetcher.store().stats().hits);
        for f in 0..n {
            let got = s.fetcher.read(&s.remote, f..f + 1, Priority::Demand).await.unwrap();
            check_frames(&got, &s.layer.frames, f);
        }
        let (fs, st) = (s.fetcher.stats(), s.fetcher.store().stats());
        assert_eq!(fs.requests(), requests, "{mb} MiB: a stored frame was fetched again");
        assert_eq!(s.fetcher.memory().ready, 0, "{mb} MiB: frames stayed after their reads");
        let want_bytes: u64 = (0..expected).map(|f| s.layer.frames[f].len() as u64).sum();
        match mb {
            64 => {
                assert_eq!(kept, want_bytes, "every expected frame was kept, and only those");
                assert_eq!(fs.ready_hits, expected as u64, "{fs:?}");
                assert_eq!(st.hits - store_hits, (n - expected) as u64, "the store was asked for kept frames: {st:?}");
            }
            0 => {
                assert_eq!((kept, fs.ready_hits), (0, 0), "{fs:?}");
                assert_eq!(st.hits - store_hits, n as u64, "{st:?}");
            }
            _ => {
                assert!(fs.ready_hits > 0 && fs.ready_hits < expected as u64, "1 MiB held some, not all: {fs:?}");
                assert_eq!(st.hits - store_hits + fs.ready_hits, n as u64, "{fs:?} {st:?}");
            }
        }
        drop(s.registry);
    }
}

/// A frame that reads keep coming back to stays in the store under budget
/// pressure, although the frame cache answers those reads: its hits reach
/// the store's access times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_the_cache_answers_stay_hot_in_the_store() {
    if !common::have_tools("frames_the_cache_answers_stay_hot_in_the_store", TOOLS) {
        return;
    }
    let budget = 1 << 20;
    let s = setup(test_config(), StoreConfig { budget_bytes: budget, evict_to: 0.9, ..StoreConfig::default() }).await;
    let n = s.layer.frames.len();
    let id = |f: usize| s.layer.index.frames().get(f).id;
    let hot = s.fetcher.read(&s.remote, 0..1, Priority::Demand).await.unwrap();
    check_frames(&hot, &s.layer.frames, 0);
    s.fetcher.settled().await;
    for f in 1..n {
        let got = s.fetcher.read(&s.remote, 0..1, Priority::Demand).await.unwrap();
        check_frames(&got, &s.layer.frames, 0);
        let got = s.fetcher.read(&s.remote, f..f + 1, Priority::Demand).await.unwrap();
        check_frames(&got, &s.layer.frames, f);
        s.fetcher.settled().await;
    }
    let (f, st) = (s.fetcher.stats(), s.fetcher.store().stats());
    assert_eq!(f.cache_hits, n as u64 - 1, "{f:?}");
    assert!(st.evictions > 0, "{st:?}");
    assert!(!s.fetcher.store().contains(&id(1)).unwrap(), "frame 1 should have been evicted: {st:?}");
    assert!(s.fetcher.store().contains(&id(0)).unwrap(), "the hot frame was evicted: {st:?}");
    drop(s.registry);
}

/// A layer holding the same large file twice (real images do: 139 duplicate
/// chunks in a Debian python image): hydrating it and reading it whole
/// fetch each distinct chunk once and answer every frame; the node's fetcher
/// keeps working after (a repeated chunk used to panic it while it held its
/// in-flight lock, poisoning every later read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_with_two_identical_large_files_is_hydrated_and_read() {
    if !common::have_tools("a_layer_with_two_identical_large_files_is_hydrated_and_read", TOOLS) {
        return;
    }
    let registry = common::Registry::start();
    let mut data = vec![0u8; 8 << 20];
    rand::rngs::StdRng::seed_from_u64(21).fill_bytes(&mut data);
    let layer = common::LayerBuilder::new()
        .dir("opt")
        .file("opt/one.bin", 0o644, &data)
        .file("opt/note", 0o644, b"between the copies\n")
        .file("opt/two.bin", 0o644, &data)
        .convert();
    let t = layer.index.frames();
    let n = t.len();
    let distinct: std::collections::HashSet<_> = (0..n).map(|i| t.get(i).id).collect();
    assert!(distinct.len() + 10 < n, "the copies should share chunks: {} distinct of {n}", distinct.len());
    let repo = Repo { registry: registry.addr.clone(), name: "test/dup".into() };
    let pusher =
        Client::new(&RegistryConfig { insecure: vec![registry.addr.clone()], ..Default::default() }, false).unwrap();
    pusher.push_blob(&repo, layer.digest(), BlobBody::Bytes(&layer.blob)).await.unwrap();
    let want = |i: usize| format::read_frame(&layer.blob[..], &layer.index, i).unwrap();
    for hydrate_first in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
        let fetcher = Fetcher::new(client(&[&registry.addr], &[]), store, test_config());
        let remote = layer.remote(repo.clone());
        let all: Vec<usize> = (0..n).collect();
        if hydrate_first {
            // `hyperbox pull --hydrate`: every frame, in one list.
            fetcher.fetch_into_store(&remote, &all, Priority::Prefetch).await.unwrap();
            fetcher.settled().await;
            for id in &distinct {
                assert!(fetcher.store().contains(id).unwrap());
            }
        }
        // Whole-file reads of both copies at once, and one list naming each
        // frame twice.
        let (f, r) = (fetcher.clone(), remote.clone());
        let both = tokio::spawn(async move { f.read(&r, 0..n, Priority::Demand).await });
        let mut twice = all.clone();
        twice.extend(all.iter().rev());
        let got = fetcher.read_frames(&remote, &twice, Priority::Demand).await.unwrap();
        for (g, &i) in got.iter().zip(&twice) {
            assert!(g[..] == want(i)[..], "frame {i}");
        }
        check_frames(&both.await.unwrap().unwrap(), &(0..n).map(want).collect::<Vec<_>>(), 0);
        let st = fetcher.stats();
        assert!(st.chunks as usize <= n, "{st:?}");
        // The fetcher still serves reads after.
        fetcher.read(&remote, 0..1, Priority::Demand).await.unwrap();
    }
}

/// A traced prefetch's range requests bridge gaps between traced frames
/// only as far as `prefetch.gap_pct` allows: what the registry sends beyond
/// the traced frames stays within that share of them, and more of it buys
/// fewer requests. The layer interleaves incompressible files of 20 to
/// 150 KiB with small files packed between them, and the trace names two
/// frames of every three, so its gaps run from a few hundred bytes to
/// about 150 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_prefetch_keeps_its_untraced_bytes_within_gap_pct() {
    use hyperbox::prefetch::{PrefetchConfig, Prefetcher};
    use hyperbox::trace::{self, ImageKey, Trace, TraceEntry};
    if !common::have_tools("a_traced_prefetch_keeps_its_untraced_bytes_within_gap_pct", TOOLS) {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut b = common::LayerBuilder::new().dir("data");
    for i in 0..60 {
        let mut data = vec![0u8; (20 << 10) + (rng.next_u32() as usize % (130 << 10))];
        rng.fill_bytes(&mut data);
        b = b.file(&format!("data/big{i}"), 0o644, &data);
        let text = format!("small file {i}\n").repeat(1 + rng.next_u32() as usize % 400);
        b = b.file(&format!("data/small{i}"), 0o644, text.as_bytes());
    }
    let layer = converted(&b.finish());
    let registry = common::Registry::start();
    push(&registry.addr, &layer).await;
    let table = layer.index.frames();
    // Two frames of every three, in an order that is not the blob's.
    let mut traced: Vec<usize> = (0..table.len()).filter(|f| f % 3 != 0).collect();
    traced.sort_by_key(|&f| (f % 7, f));
    let traced_bytes: u64 = traced.iter().map(|&f| table.get(f).c_len as u64).sum();
    let image =
        ImageKey { digest: format!("sha256:{}", "ab".repeat(32)), repository: format!("{}/test/layer", registry.addr) };
    let mut trace = Trace::new(&image);
    trace.entries = traced
        .iter()
        .enumerate()
        .map(|(at, &f)| {
            let fr = table.get(f);
            TraceEntry {
                layer: layer.digest.clone(),
                frame: f as u32,
                chunk: fr.id,
                c_len: fr.c_len,
                u_len: fr.u_len,
                path: String::new(),
                offset: 0,
                at_ms: at as u32,
                seen: 1,
            }
        })
        .collect();
    // (requests, bytes the registry sent) for each gap_pct.
    let mut got = Vec::new();
    for pct in [0, 3, 100] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
        trace::save(&store, &trace).unwrap();
        let fetcher = Fetcher::new(client(&[&registry.addr], &[]), store.clone(), test_config());
        let cfg =
            PrefetchConfig { registry_traces: false, use_repository_trace: false, gap_pct: pct, ..Default::default() };
        let prefetcher = Prefetcher::new(fetcher.clone(), store.clone(), None, cfg, tokio::runtime::Handle::current());
        let remote = Arc::new(RemoteLayer {
            repo: Repo { registry: registry.addr.clone(), name: "test/layer".into() },
            blob: layer.digest.clone(),
            index: layer.index.clone(),
        });
        prefetcher.layer_ready(&image, remote, false);
        let frames = &prefetcher.stats.frames;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while frames.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "gap_pct {pct}: the prefetch did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fetcher.settled().await;
        for &f in &traced {
            assert!(store.contains(&table.get(f).id).unwrap(), "gap_pct {pct}: traced frame {f} was not stored");
        }
        let st = fetcher.stats();
        assert_eq!(st.demand_requests, 0);
        let untraced = st.bytes - traced_bytes;
        assert!(
            pct == 100 || untraced * 100 <= traced_bytes * pct,
            "gap_pct {pct}: {untraced} untraced bytes for {traced_bytes} traced"
        );
        got.push((st.prefetch_requests, st.bytes));
    }
    eprintln!("(requests, bytes) at gap_pct 0, 3 and 100: {got:?}, for {traced_bytes} traced bytes");
    let [(r0, b0), (r3, b3), (r100, b100)] = got[..] else { unreachable!() };
    assert_eq!(b0, traced_bytes, "0: only frames end to end share a request");
    assert!(r3 < r0 && b3 > b0, "3% bridged the narrowest gaps: {got:?}");
    assert!(r100 < r3 && b100 * 100 > traced_bytes * 103, "the layer has wider gaps, bridged at 100: {got:?}");
}
