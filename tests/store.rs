//! The chunk store with real RocksDB: crash safety under SIGKILL, and
//! deduplication and garbage collection across real converted layers.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hyperbox::store::{Family, Store, StoreConfig, VerifiedChunk};

fn chunk_data(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 << 10);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < 16 << 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x % 64).to_le_bytes()); // compressible, unique per i
    }
    v
}

/// Set, to the store's directory, in the writer process of
/// `store_survives_sigkill`.
const CRASH_CHILD: &str = "HYPERBOX_CRASH_CHILD";
/// The writer's first line on stdout, followed by the `next` it starts at.
const STARTED: &str = "crash-child writing from";

fn read_next(store: &Store) -> u64 {
    store.get_row(Family::Snapshots, b"next").unwrap().map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()))
}

/// The writer of `store_survives_sigkill`. It runs in a process of its own:
/// this test binary again, with only `store_survives_sigkill` selected and
/// CRASH_CHILD set, which that test turns into a call of this function. So
/// it is no test of its own that could pass by itself. It writes until it is
/// killed and never returns.
fn crash_child(dir: &Path) -> ! {
    use std::io::Write;
    let store = Store::open(dir, &StoreConfig::default()).unwrap();
    let mut next = read_next(&store);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{STARTED} {next}").unwrap();
    out.flush().unwrap();
    loop {
        store.put(&VerifiedChunk::from_data(&chunk_data(next), 1)).unwrap();
        store.put_row(Family::Snapshots, format!("snap-{next}").as_bytes(), &next.to_le_bytes()).unwrap();
        next += 1;
        // Only after the chunk and its row are written does "next" move on.
        store.put_row(Family::Snapshots, b"next", &next.to_le_bytes()).unwrap();
    }
}

/// Start the writer on `dir`; returns it once it has opened the store, with
/// the `next` it found there.
fn start_writer(dir: &Path, round: usize) -> (std::process::Child, u64) {
    let stderr = dir.with_extension(format!("child-{round}.log"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store_survives_sigkill", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Read its stdout on a thread (to the end, so the pipe never fills) and
    // hand over the number on the STARTED line.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest's "test store_survives_sigkill ... " may lead the line.
            if let Some((_, n)) = line.split_once(STARTED) {
                let _ = tx.send(n.trim().parse::<u64>().unwrap()); // the round may have failed and gone
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(start) => (child, start),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let log = std::fs::read_to_string(&stderr).unwrap_or_default();
            panic!("round {round}: the writer never started writing ({e}; it exited with {status}):\n{log}");
        }
    }
}

/// A writer process is SIGKILLed mid-write 50 times; each time the store
/// opens, holds everything the writer saw acknowledged, and verifies.
#[test]
fn store_survives_sigkill() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        crash_child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    std::fs::create_dir(&dir).unwrap();
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut last_next = 0;
    let mut rounds_with_progress = 0;
    const ROUNDS: usize = 50;
    for round in 0..ROUNDS {
        let (mut child, start) = start_writer(&dir, round);
        assert_eq!(start, last_next, "round {round}: the writer found another `next` than the last round left");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(30 + seed % 250));
        // Still writing: a writer that stopped on its own was not killed mid-write.
        if let Some(status) = child.try_wait().unwrap() {
            panic!("round {round}: the writer exited by itself with {status}");
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}: {status}");

        let store = Store::open(&dir, &StoreConfig::default()).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let next = read_next(&store);
        assert!(next >= last_next, "round {round}: progress went backwards");
        if next > last_next {
            rounds_with_progress += 1;
        }
        last_next = next;
        // Everything acknowledged before the kill is there and verifies;
        // whatever else the store returns verifies too (it re-hashes).
        // The count proves nothing was lost; a sample (all recent writes,
        // every 17th older one) proves content and rows.
        for i in (0..next).filter(|&i| i + 64 >= next || i % 17 == 0) {
            let id = hyperbox::digest::ChunkId::of(&chunk_data(i));
            let got = store.get(&id).unwrap().unwrap_or_else(|| panic!("round {round}: chunk {i} of {next} lost"));
            assert!(got == chunk_data(i), "round {round}: chunk {i} reads back wrong");
            assert_eq!(
                store.get_row(Family::Snapshots, format!("snap-{i}").as_bytes()).unwrap(),
                Some(i.to_le_bytes().to_vec()),
                "round {round}: row snap-{i}"
            );
        }
        // The chunk in flight at the kill: there whole, or not at all.
        let in_flight = store.get(&hyperbox::digest::ChunkId::of(&chunk_data(next))).unwrap();
        if let Some(got) = &in_flight {
            assert!(*got == chunk_data(next), "round {round}: the chunk in flight reads back wrong");
        }
        let st = store.stats();
        assert_eq!(st.verify_failures, 0, "round {round}");
        assert_eq!(st.chunks, next + in_flight.is_some() as u64, "round {round}: {st:?}");
    }
    // The writer wrote, and was killed mid-write in most rounds, not once.
    assert!(last_next > 50, "the writer made too little progress to test anything: {last_next}");
    assert!(
        rounds_with_progress >= ROUNDS / 2,
        "only {rounds_with_progress} of {ROUNDS} rounds wrote anything before the kill"
    );
    eprintln!("{ROUNDS} SIGKILLs survived; {last_next} chunks written in all, in {rounds_with_progress} rounds");
}

/// Two layers that share a large file: their common chunks are stored once,
/// and GC after one layer's index is gone frees only that layer's chunks.
#[test]
fn chunks_shared_by_layers_are_stored_once() {
    let shared: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 9) as u8).collect();
    let layers: Vec<common::Layer> = (0..2)
        .map(|n| {
            let own: Vec<u8> = (0..400_000u32).map(|i| (i.wrapping_mul(40503 + n) >> 5) as u8).collect();
            common::LayerBuilder::new()
                .file(&format!("layer{n}/own"), 0o644, &own)
                .file("usr/lib/shared.so", 0o755, &shared)
                .convert()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let mut refs = 0;
    let mut digests = Vec::new();
    for layer in &layers {
        let idx = store.put_index(layer.digest(), &layer.out.location, layer.index_frame()).unwrap();
        for i in 0..idx.frames().len() {
            let f = idx.frames().get(i);
            let (s, e) = idx.frame_blob_range(i);
            let (chunk, _) = VerifiedChunk::verify(f.id, f.u_len, layer.blob[s as usize..e as usize].to_vec()).unwrap();
            store.put(&chunk).unwrap();
            refs += 1;
        }
        digests.push(layer.digest().clone());
    }
    // Every frame of the shared file (in the second layer) was already stored.
    let (_, second) = store.get_index(&digests[1]).unwrap().unwrap();
    let so = second.entries().iter().find(|e| e.path == b"usr/lib/shared.so").unwrap();
    let shared_frames = second.frames_for(so.data_offset, so.data_len()).len() as u64;
    assert!(shared_frames >= 6, "3 MB in chunks of at most 512 KiB: {shared_frames}");
    let st = store.stats();
    assert!(st.dedup_puts >= shared_frames, "the shared file's chunks were not deduplicated: {st:?}");
    assert_eq!(st.chunks + st.dedup_puts, refs);
    let ratio = store.dedup_ratio().unwrap();
    assert!(ratio > 1.5, "dedup ratio {ratio}");

    // The index round-trips through the store, verified.
    let (_, idx0) = store.get_index(&digests[0]).unwrap().unwrap();
    assert_eq!(idx0.entries().len(), 2, "two files, no directory entries");
    assert_eq!(store.gc().unwrap(), 0, "everything is referenced");
    store.delete_index(&digests[0]).unwrap();
    let freed = store.gc().unwrap();
    assert!(freed > 0 && freed < idx0.frames().len() as u64, "freed {freed}");
    // Layer 1 still reads whole from the store.
    let (_, idx1) = store.get_index(&digests[1]).unwrap().unwrap();
    for f in idx1.frames().iter() {
        assert!(store.get(&f.id).unwrap().is_some());
    }
}
