//! The fetcher without a registry: what must hold whatever the index, the
//! registry or a leader's task does. Against a real registry: tests/fetcher.rs.

use std::sync::Arc;

use rand::{RngCore, SeedableRng};

use super::*;
use crate::registry::RegistryConfig;
use crate::store::{StoreConfig, VerifiedChunk};
use crate::testing::{Layer, LayerBuilder};

/// A loopback address nothing listens on: every request is refused.
fn dead_registry() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

fn fetcher(dir: &std::path::Path, registry: &str) -> Fetcher {
    let client = Client::new(&RegistryConfig { connect_timeout_ms: 500, ..RegistryConfig::default() }, false).unwrap();
    let store = Store::open(&dir.join("db"), &StoreConfig::default()).unwrap();
    let _ = registry;
    let cfg = FetchConfig { attempts: 1, backoff_initial_ms: 1, timeout_ms: 5_000, ..FetchConfig::default() };
    Fetcher::new(Arc::new(client), Arc::new(store), cfg)
}

/// A layer holding the same incompressible 300 KiB file twice (and a small
/// one): its frame table lists the big file's chunks twice.
fn twice_the_same_file() -> Layer {
    let mut data = vec![0u8; 300 << 10];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    LayerBuilder::new()
        .dir("d")
        .file("d/a", 0o644, &data)
        .file("d/small", 0o644, b"small\n")
        .file("d/b", 0o644, &data)
        .convert()
}

/// Frame pairs (i, j), i < j, with the same chunk id.
fn same_chunk_pairs(index: &LayerIndex) -> Vec<(usize, usize)> {
    let t = index.frames();
    let mut first: HashMap<ChunkId, usize> = HashMap::new();
    let mut out = Vec::new();
    for i in 0..t.len() {
        match first.get(&t.get(i).id) {
            Some(&f) => out.push((f, i)),
            None => {
                first.insert(t.get(i).id, i);
            }
        }
    }
    out
}

fn frame_data(layer: &Layer, i: usize) -> Vec<u8> {
    format::read_frame(&layer.blob[..], &layer.index, i).unwrap()
}

/// A read listing one chunk several times (identical files in one layer)
/// is answered, or fails cleanly, and leaves the fetcher working: it used
/// to index past its list of waits while holding the in-flight lock, and
/// every later read of the node panicked on the poisoned lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_list_with_the_same_chunk_several_times_is_read() {
    let layer = twice_the_same_file();
    let pairs = same_chunk_pairs(&layer.index);
    assert!(pairs.len() >= 2, "the layer should list its big file's chunks twice: {pairs:?}");
    let dir = tempfile::tempdir().unwrap();
    let registry = dead_registry();
    let f = fetcher(dir.path(), &registry);
    let remote = layer.remote(Repo { registry: registry.clone(), name: "t/dup".into() });
    // One chunk at two frames; then three times, ending on a repeat; then
    // each duplicated chunk three times, interleaved with every frame.
    let (i, j) = pairs[0];
    let mut frames: Vec<usize> = Vec::new();
    for &(i, j) in &pairs {
        frames.extend([i, j, i]);
    }
    frames.extend(0..layer.index.frames().len());
    let lists = [vec![i, j], vec![j, pairs[1].0, i, pairs[1].1], frames.clone()];
    for round in 0..2 {
        for list in &lists {
            for prio in [Priority::Demand, Priority::Prefetch] {
                let err = f.read_frames(&remote, list, prio).await.unwrap_err();
                assert!(matches!(err, FetchError::Remote { .. }), "round {round}, {list:?}: {err:?}");
                f.fetch_into_store(&remote, list, prio).await.unwrap_err();
            }
        }
    }
    f.settled().await;
    // Once the chunks are local, the same list is read, every place filled.
    for i in 0..layer.index.frames().len() {
        f.store().put(&VerifiedChunk::from_data(&frame_data(&layer, i), 3)).unwrap();
    }
    let got = f.read_frames(&remote, &frames, Priority::Demand).await.unwrap();
    assert_eq!(got.len(), frames.len());
    for (g, &i) in got.iter().zip(&frames) {
        assert!(g[..] == frame_data(&layer, i)[..], "frame {i}");
    }
    f.fetch_into_store(&remote, &frames, Priority::Prefetch).await.unwrap();
}

/// An index that gives one chunk id two lengths: the data of the chunk
/// cannot have both, and a reader (`ReadPlan::assemble`) that trusts the
/// index's length for the frame would spin or slice past the data. The
/// fetcher refuses it with an error naming the frame.
#[tokio::test]
async fn a_chunk_listed_with_two_lengths_is_refused() {
    let layer = twice_the_same_file();
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &dead_registry());
    let t = layer.index.frames();
    // The shortest frame's chunk, given as a longer frame's id too.
    let short = (0..t.len()).min_by_key(|&i| t.get(i).u_len).unwrap();
    let long = (0..t.len()).max_by_key(|&i| t.get(i).u_len).unwrap();
    assert!(t.get(short).u_len < t.get(long).u_len);
    let mut index = (*layer.index).clone();
    let mut bad = t.get(long);
    bad.id = t.get(short).id;
    index.index.frames.set(long, bad);
    f.store().put(&VerifiedChunk::from_data(&frame_data(&layer, short), 3)).unwrap();
    let remote = Arc::new(RemoteLayer {
        repo: Repo { registry: dead_registry(), name: "t/len".into() },
        blob: layer.digest().clone(),
        index: Arc::new(index),
    });
    for frames in [vec![long], vec![short, long], vec![long, short]] {
        let err = f.read_frames(&remote, &frames, Priority::Demand).await.unwrap_err();
        match &err {
            FetchError::FrameLength { frame, want, .. } => {
                assert_eq!((*frame, *want), (long, t.get(long).u_len), "{err}")
            }
            other => panic!("{frames:?}: {other:?}"),
        }
        assert!(err.to_string().contains("different lengths"), "{err}");
    }
    // The frame whose length is right still reads.
    assert_eq!(f.read_frames(&remote, &[short], Priority::Demand).await.unwrap()[0].len(), t.get(short).u_len as usize);
}

/// A leader's task that dies (a panic, a runtime shutting down) takes its
/// flights out of the map and answers its waiters with an error: none waits
/// forever, and the next read of those chunks leads a fetch of its own.
#[tokio::test]
async fn a_flight_whose_task_dies_answers_its_waiters_and_leaves_the_map() {
    let layer = twice_the_same_file();
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &dead_registry());
    let remote = layer.remote(Repo { registry: "r.example".into(), name: "t/x".into() });
    let id = layer.index.frames().get(0).id;
    let (tx, rx) = watch::channel(None);
    let host: Arc<str> = Arc::from("r.example");
    f.inner.inflight.lock().insert(
        (host.clone(), id),
        Flight { rx: rx.clone(), prio: Arc::new(AtomicU8::new(0)), blob: remote.blob.clone() },
    );
    let inner = f.inner.clone();
    let r = remote.clone();
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _guard = FlightGuard::new(&inner, &r, host, vec![(0, id, tx)]);
        panic!("the leader's task dies");
    }));
    assert!(died.is_err());
    assert!(f.inner.inflight.lock().is_empty(), "the dead flight is still in the map");
    let answer = rx.borrow().clone();
    match answer {
        Some(Err(FetchError::Lost { chunk, .. })) => assert_eq!(chunk, id),
        other => panic!("the waiter was not answered with an error: {other:?}"),
    }
}

/// A flight fetched for the store alone (prefetch, hydration) answers
/// "stored" without the data. A reader that joined it reads the chunk from
/// the store; if the store lacks it after all (evicted at once, a failed
/// write), the reader fetches it itself rather than failing or waiting.
#[tokio::test]
async fn a_reader_told_stored_reads_the_store_or_fetches_again() {
    let layer = twice_the_same_file();
    let dir = tempfile::tempdir().unwrap();
    let registry = dead_registry();
    let f = fetcher(dir.path(), &registry);
    let remote = layer.remote(Repo { registry: registry.clone(), name: "t/stored".into() });
    let host: Arc<str> = Arc::from(registry.as_str());
    let small = (0..layer.index.frames().len()).min_by_key(|&i| layer.index.frames().get(i).u_len).unwrap();
    let id = layer.index.frames().get(small).id;
    // Not stored first: a read answered from the store fills the frame cache.
    for in_store in [false, true] {
        let (tx, rx) = watch::channel(None);
        let prio = Arc::new(AtomicU8::new(Priority::Prefetch as u8));
        f.inner
            .inflight
            .lock()
            .insert((host.clone(), id), Flight { rx, prio: prio.clone(), blob: remote.blob.clone() });
        let reader = {
            let (f, remote) = (f.clone(), remote.clone());
            tokio::spawn(async move { f.read_frames(&remote, &[small], Priority::Demand).await })
        };
        // The reader joins the flight, raising it to demand.
        while prio.load(Ordering::Relaxed) != Priority::Demand as u8 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if in_store {
            f.store().put(&VerifiedChunk::from_data(&frame_data(&layer, small), 3)).unwrap();
        }
        f.inner.inflight.lock().remove(&(host.clone(), id));
        tx.send(Some(Ok(Got::Stored))).unwrap();
        let got = reader.await.unwrap();
        if in_store {
            assert_eq!(got.unwrap()[0][..], frame_data(&layer, small)[..], "read from the store");
        } else {
            // It led a fetch of its own, from a registry that refuses.
            let err = got.unwrap_err();
            assert!(matches!(err, FetchError::Remote { .. }), "{err:?}");
        }
    }
}

/// Leads answered before the rest of their group (found in the store) leave
/// the in-flight map first: a reader who then misses the chunk (evicted at
/// once) leads a new flight instead of joining this one for the same answer
/// until it fails. The group's own release later leaves that new flight be.
#[test]
fn leads_answered_early_leave_the_map_first() {
    let layer = twice_the_same_file();
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &dead_registry());
    let remote = layer.remote(Repo { registry: "r.example".into(), name: "t/early".into() });
    let host: Arc<str> = Arc::from("r.example");
    let table = layer.index.frames();
    let (a, b) =
        (table.get(0).id, (1..table.len()).map(|i| table.get(i).id).find(|&id| id != table.get(0).id).unwrap());
    let flight = |rx| Flight { rx, prio: Arc::new(AtomicU8::new(0)), blob: remote.blob.clone() };
    let (tx_a, rx_a) = watch::channel(None);
    let (tx_b, rx_b) = watch::channel(None);
    f.inner.inflight.lock().insert((host.clone(), a), flight(rx_a.clone()));
    f.inner.inflight.lock().insert((host.clone(), b), flight(rx_b));
    let mut guard = FlightGuard::new(&f.inner, &remote, host.clone(), vec![(0, a, tx_a), (1, b, tx_b)]);
    guard.release_leads(&[0]);
    guard.answer(0, Ok(Got::Stored));
    assert!(!f.inner.inflight.lock().contains_key(&(host.clone(), a)), "answered, and still joinable");
    assert!(f.inner.inflight.lock().contains_key(&(host.clone(), b)), "the rest stay until fetched");
    // Another reader misses chunk a and leads a flight of its own.
    let (_tx_new, rx_new) = watch::channel(None);
    f.inner.inflight.lock().insert((host.clone(), a), flight(rx_new));
    drop(guard);
    let map = f.inner.inflight.lock();
    assert!(map.contains_key(&(host.clone(), a)), "the group removed another reader's flight");
    assert!(!map.contains_key(&(host, b)), "the group's own flight outlived it");
    assert!(matches!(*rx_a.borrow(), Some(Ok(Got::Stored))));
}

/// A FUSE reader answers what the store and the frame cache hold on its
/// own thread, with no runtime: `read_local`. A read missing a frame gets
/// back what was found, and `read_rest` finishes it on the runtime.
#[test]
fn a_read_the_store_holds_is_answered_without_the_runtime() {
    let layer = twice_the_same_file();
    let n = layer.index.frames().len();
    assert!(n >= 3, "the layer should have a few frames: {n}");
    let dir = tempfile::tempdir().unwrap();
    let registry = dead_registry();
    let f = fetcher(dir.path(), &registry);
    let remote = layer.remote(Repo { registry: registry.clone(), name: "t/local".into() });
    let all: Vec<usize> = (0..n).collect();
    let last = n - 1;
    for i in 0..last {
        f.store().put(&VerifiedChunk::from_data(&frame_data(&layer, i), 3)).unwrap();
    }
    let want: Vec<Vec<u8>> = all.iter().map(|&i| frame_data(&layer, i)).collect();

    // From the store, then (the same frames again) from the frame cache.
    for round in 0..2 {
        let got = f.read_local(&remote, &all[..last]).ok().expect("every frame is stored").unwrap();
        assert_eq!(got.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), want[..last], "round {round}");
    }
    let s = f.stats();
    assert!(s.cache_hits >= last as u64, "the second round came from the frame cache: {s:?}");

    // One frame missing: nothing is fetched here; the finder keeps the rest.
    let found = f.read_local(&remote, &all).err().expect("the last frame is not stored");
    assert_eq!(f.stats().demand_requests, 0);
    // Stored meanwhile (another reader's fetch): the rest finds it.
    f.store().put(&VerifiedChunk::from_data(&frame_data(&layer, last), 3)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (got, _) = rt.block_on(f.read_rest(&remote, &all, found, || ()));
    assert_eq!(got.unwrap().iter().map(|b| b.to_vec()).collect::<Vec<_>>(), want);

    // A frame past the index is an error, not a miss.
    match f.read_local(&remote, &[n]) {
        Ok(Err(FetchError::NoSuchFrame { .. })) => {}
        Ok(other) => panic!("expected NoSuchFrame, got {:?}", other.map(|d| d.len())),
        Err(_) => panic!("expected NoSuchFrame, got a miss"),
    }
}
