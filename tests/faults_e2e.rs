//! Faults a node meets, against the real hyperboxd binary: SIGKILL in the
//! middle of Commit and Remove, a full disk under its root, and a registry
//! that goes away in the middle of a hydrate.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::types::Mount;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use common::faultproxy::{Fault, FaultProxy};
use common::*;

const SN: &str = "hyperbox";

type Client = SnapshotsClient<Channel>;

fn connect(rt: &tokio::runtime::Runtime, socket: &Path) -> Client {
    rt.block_on(async { SnapshotsClient::new(containerd_client::connect(socket).await.unwrap()) })
}

async fn list(c: &mut Client) -> Result<BTreeMap<String, (i32, String)>, tonic::Status> {
    let mut out = BTreeMap::new();
    let mut stream = c.list(ListSnapshotsRequest { snapshotter: SN.into(), filters: vec![] }).await?.into_inner();
    while let Some(page) = stream.message().await? {
        for i in page.info {
            out.insert(i.name, (i.kind, i.parent));
        }
    }
    Ok(out)
}

async fn prepare(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
    let req =
        PrepareSnapshotRequest { snapshotter: SN.into(), key: key.into(), parent: parent.into(), ..Default::default() };
    Ok(c.prepare(req).await?.into_inner().mounts)
}

async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    let req =
        CommitSnapshotRequest { snapshotter: SN.into(), name: name.into(), key: key.into(), ..Default::default() };
    c.commit(req).await.map(drop)
}

async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(RemoveSnapshotRequest { snapshotter: SN.into(), key: key.into() }).await.map(drop)
}

/// The dir a snapshot's mounts write to (an active snapshot) or show on
/// top (a view): a bind's source, else the overlay's upperdir or its first
/// lowerdir.
fn top_dir(mounts: &[Mount]) -> PathBuf {
    let m = &mounts[0];
    if m.r#type == "bind" {
        return PathBuf::from(&m.source);
    }
    let opt = |k: &str| m.options.iter().find_map(|o| o.strip_prefix(k)).map(str::to_string);
    let dir = opt("upperdir=").or_else(|| opt("lowerdir=").map(|l| l.split(':').next().unwrap().to_string()));
    PathBuf::from(dir.unwrap_or_else(|| panic!("{mounts:?}")))
}

/// `<root>/snapshots/<id>` of a snapshot's `fs` dir.
fn snapshot_dir(fs: &Path) -> PathBuf {
    assert_eq!(fs.file_name().unwrap(), "fs", "{}", fs.display());
    fs.parent().unwrap().to_path_buf()
}

fn kind_of(k: i32) -> &'static str {
    // containerd.snapshots.v1.Kind: UNKNOWN 0, VIEW 1, ACTIVE 2, COMMITTED 3
    match k {
        1 => "view",
        2 => "active",
        3 => "committed",
        _ => "unknown",
    }
}

/// What the test believes is in the metastore: name → (kind, parent).
type Model = BTreeMap<String, (&'static str, String)>;

fn check_against(model: &Model, listed: &BTreeMap<String, (i32, String)>, when: &str) {
    let got: Model = listed.iter().map(|(n, (k, p))| (n.clone(), (kind_of(*k), p.clone()))).collect();
    assert_eq!(&got, model, "{when}");
    for (name, (_, parent)) in listed {
        assert!(parent.is_empty() || listed.contains_key(parent), "{when}: {name}'s parent {parent} is not listed");
    }
}

/// SIGKILL of hyperboxd at a random moment after a Commit or a Remove was
/// sent, 100 times (seeded; `HYPERBOX_FAULT_SEED` repeats a run). After
/// each restart the metastore holds exactly the before or the after of the
/// interrupted call (the after, if the call was answered), every parent is
/// there; at the end every snapshot's dir holds what was written to it,
/// Cleanup removes every orphan dir, new calls succeed, and containerd
/// works over it.
#[test]
fn kill_9_during_commit_and_remove_keeps_the_metastore_consistent() {
    const TEST: &str = "kill_9_during_commit_and_remove_keeps_the_metastore_consistent";
    if !have_tools(TEST, &["containerd", "ctr"]) {
        return;
    }
    let t0 = Instant::now();
    let seed: u64 = std::env::var("HYPERBOX_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("{TEST}: seed {seed} (HYPERBOX_FAULT_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let mut hb = Hyperboxd::start(tmp.path(), "version = 1\n[daemon]\nmetrics_address = \"\"\n");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut model = Model::new();
    // The marker each snapshot's own dir holds: the key it was prepared as.
    let mut marker_of: BTreeMap<String, String> = BTreeMap::new();
    let (mut answered, mut interrupted, mut landed) = (0, 0, 0);
    for i in 0..100 {
        let mut c = connect(&rt, &hb.socket);
        let committed: Vec<String> =
            model.iter().filter(|(_, (k, _))| *k == "committed").map(|(n, _)| n.clone()).collect();
        let parent = if !committed.is_empty() && rng.gen_bool(0.6) {
            committed[rng.gen_range(0..committed.len())].clone()
        } else {
            String::new()
        };
        let key = format!("ns/{i}/active-{i}");
        let mounts = rt.block_on(prepare(&mut c, &key, &parent)).unwrap();
        let fs = top_dir(&mounts);
        std::fs::write(fs.join("marker"), &key).unwrap();
        for f in 0..rng.gen_range(50..400) {
            std::fs::write(fs.join(format!("f{f}")), format!("{key} {f}")).unwrap();
        }
        model.insert(key.clone(), ("active", parent.clone()));
        marker_of.insert(key.clone(), key.clone());

        // Commit the new snapshot, or remove a leaf (it, or an older one).
        let leaves: Vec<String> = model.keys().filter(|n| !model.values().any(|(_, p)| p == *n)).cloned().collect();
        let (is_commit, target, name) = if rng.gen_bool(0.55) {
            (true, key.clone(), format!("ns/{i}/committed-{i}"))
        } else {
            (false, leaves[rng.gen_range(0..leaves.len())].clone(), String::new())
        };
        let delay = Duration::from_micros(rng.gen_range(0..25_000));
        let call = {
            let (mut c, target, name) = (c.clone(), target.clone(), name.clone());
            rt.spawn(async move {
                if is_commit {
                    commit(&mut c, &name, &target).await
                } else {
                    remove(&mut c, &target).await
                }
            })
        };
        std::thread::sleep(delay);
        hb.kill();
        let result = rt.block_on(call).unwrap();
        hb.restart();
        let mut c = connect(&rt, &hb.socket);
        let listed = rt.block_on(list(&mut c)).unwrap();
        let what = format!(
            "iteration {i} (seed {seed}): {} {target} after {delay:?}: {result:?}",
            if is_commit { "commit" } else { "remove" }
        );
        // The call happened entirely, or not at all; if it was answered, it happened.
        let happened = if is_commit { listed.contains_key(&name) } else { !listed.contains_key(&target) };
        assert!(result.is_err() || happened, "{what}: answered but lost");
        if result.is_ok() {
            answered += 1;
        } else {
            interrupted += 1;
        }
        if happened {
            landed += 1;
            let (_, parent) = model.remove(&target).unwrap();
            if is_commit {
                model.insert(name.clone(), ("committed", parent));
                marker_of.insert(name.clone(), target.clone());
            }
        }
        check_against(&model, &listed, &what);
    }
    println!("100 kills: {answered} calls answered before the kill, {interrupted} cut off ({landed} took effect)");

    // Every snapshot's own dir is there, with what was written to it.
    let mut c = connect(&rt, &hb.socket);
    let snapshots = hb.root.join("snapshots");
    let mut owned = Vec::new();
    for (name, (kind, _)) in model.clone() {
        let dir = if kind == "committed" {
            let view = format!("check/{name}");
            let mounts = rt
                .block_on(c.view(ViewSnapshotRequest {
                    snapshotter: SN.into(),
                    key: view.clone(),
                    parent: name.clone(),
                    ..Default::default()
                }))
                .unwrap()
                .into_inner()
                .mounts;
            let top = top_dir(&mounts);
            // The view's own dir, to remove with it.
            rt.block_on(remove(&mut c, &view)).unwrap();
            top
        } else {
            let mounts = rt
                .block_on(c.mounts(MountsRequest { snapshotter: SN.into(), key: name.clone() }))
                .unwrap()
                .into_inner()
                .mounts;
            top_dir(&mounts)
        };
        let marker =
            std::fs::read_to_string(dir.join("marker")).unwrap_or_else(|e| panic!("{name}: {}: {e}", dir.display()));
        assert_eq!(marker, marker_of[&name], "{name}");
        owned.push(snapshot_dir(&dir).file_name().unwrap().to_string_lossy().into_owned());
    }
    owned.sort();
    // Cleanup removes every dir no snapshot owns: those the kills left, and
    // a staged dir and an unknown id planted here.
    std::fs::create_dir_all(snapshots.join("999999/fs")).unwrap();
    std::fs::create_dir_all(snapshots.join("new-12345-abcdef/fs")).unwrap();
    let entries = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&snapshots)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = entries().len();
    rt.block_on(c.cleanup(CleanupRequest { snapshotter: SN.into() })).unwrap();
    println!("Cleanup removed {} orphan dir(s) ({} planted)", before - entries().len(), 2);
    assert_eq!(entries(), owned, "after Cleanup only the snapshots' own dirs are left");

    // New calls work.
    rt.block_on(async {
        let top = model.keys().find(|n| model[*n].0 == "committed").cloned().unwrap_or_default();
        prepare(&mut c, "after/1", &top).await.unwrap();
        commit(&mut c, "after/2", "after/1").await.unwrap();
        prepare(&mut c, "after/3", "after/2").await.unwrap();
        remove(&mut c, "after/3").await.unwrap();
        remove(&mut c, "after/2").await.unwrap();
    });

    // containerd over it: its own calls go through.
    let ctd = Containerd::start(&hb.proxy_plugin());
    let ctr = |args: &[&str]| run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox"]).args(args));
    ctr(&["ls"]);
    ctr(&["prepare", "c1"]);
    ctr(&["commit", "c1-done", "c1"]);
    ctr(&["prepare", "c2", "c1-done"]);
    let out = ctr(&["ls"]);
    assert!(out.contains("c1-done") && out.contains("c2"), "{out}");
    ctr(&["rm", "c2"]);
    ctr(&["rm", "c1-done"]);
    println!("{TEST}: {:.1?}", t0.elapsed());
}

/// A loop-mounted ext4 file system, unmounted when dropped.
struct LoopFs {
    mnt: PathBuf,
}
impl LoopFs {
    fn new(image: &Path, mnt: &Path, mib: u64) -> LoopFs {
        let f = std::fs::File::create(image).unwrap();
        f.set_len(mib << 20).unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(image));
        std::fs::create_dir_all(mnt).unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(image).arg(mnt));
        LoopFs { mnt: mnt.to_path_buf() }
    }
}
impl Drop for LoopFs {
    fn drop(&mut self) {
        for m in hyperbox::mount::stale_mounts(&self.mnt).unwrap_or_default() {
            let _ = hyperbox::mount::detach(&m);
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Fill the file system `path` is on: one large file, then 4 KiB files and
/// empty dirs beside it (what ext4 keeps back for metadata) until even
/// those fail with ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let full = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOSPC);
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    let mut n = 0;
    loop {
        match f.write(&block) {
            Ok(w) => n += w as u64,
            Err(e) if full(&e) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let _ = f.sync_all();
    let pad = path.with_extension("pad");
    std::fs::create_dir_all(&pad).unwrap();
    for i in 0.. {
        let r = std::fs::File::create(pad.join(format!("f{i}")))
            .and_then(|mut f| f.write_all(&block[..4096]).and_then(|_| f.sync_all()));
        match r {
            Ok(()) => n += 4096,
            Err(e) if full(&e) => break,
            Err(e) => panic!("{e}"),
        }
    }
    for i in 0.. {
        match std::fs::create_dir(pad.join(format!("d{i}"))) {
            Ok(()) => {}
            Err(e) if full(&e) => break,
            Err(e) => panic!("{e}"),
        }
    }
    n
}

fn no_space(e: &tonic::Status) -> bool {
    e.message().contains("No space left on device") || e.message().contains("os error 28")
}

/// hyperboxd's root on a 256 MiB ext4 that fills up: calls fail saying so,
/// the daemon stays up, nothing is corrupted (a restart lists the same
/// snapshots), and once space is freed everything works again, a lazy
/// image included.
#[test]
fn a_full_disk_fails_calls_cleanly_and_recovers() {
    const TEST: &str = "a_full_disk_fails_calls_cleanly_and_recovers";
    if !have_tools(TEST, &["mkfs.ext4", "mount", "umount", "containerd", "ctr", "runc", "docker-registry", "busybox"]) {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // Mounted exactly where Hyperboxd::start puts the root; its log and
    // socket stay outside, on a disk with room.
    let disk = LoopFs::new(&tmp.path().join("disk.img"), &tmp.path().join("hyperbox-root"), 256);
    let mut hb =
        Hyperboxd::start(tmp.path(), "version = 1\n[daemon]\nmetrics_address = \"\"\n[trace]\nenabled = false\n");
    assert_eq!(hb.root, disk.mnt);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut c = connect(&rt, &hb.socket);

    let filler = rt.block_on(async {
        let fs = top_dir(&prepare(&mut c, "ns/1/base", "").await.unwrap());
        std::fs::write(fs.join("hello"), "hello\n").unwrap();
        commit(&mut c, "ns/2/base", "ns/1/base").await.unwrap();
        top_dir(&prepare(&mut c, "ns/3/filler", "ns/2/base").await.unwrap()).join("big")
    });
    let before = rt.block_on(list(&mut c)).unwrap();
    let written = fill(&filler);
    println!("filled the disk with {} MiB", written >> 20);

    // Calls that need space fail, saying why; the daemon stays up.
    let mut errors = Vec::new();
    rt.block_on(async {
        for i in 0..5 {
            match prepare(&mut c, &format!("ns/4/full-{i}"), "ns/2/base").await {
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        if let Err(e) = commit(&mut c, "ns/5/filler", "ns/3/filler").await {
            errors.push(e);
        }
    });
    for e in &errors {
        println!("on a full disk: {:?}: {}", e.code(), e.message());
    }
    assert!(!errors.is_empty(), "nothing failed on a full disk");
    assert!(errors.iter().all(no_space), "an error that does not say the disk is full: {errors:?}");
    let now = rt.block_on(list(&mut c)).expect("hyperboxd still serves");
    assert!(before.keys().all(|k| now.contains_key(k)), "{before:?} {now:?}");

    // Space freed, the same process: calls work again.
    let free = || {
        std::fs::remove_file(&filler).unwrap();
        std::fs::remove_dir_all(filler.with_extension("pad")).unwrap();
    };
    free();
    // RocksDB stops writing after a failed write and resumes by itself once
    // its write buffer's worth of space (64 MiB) is free again, checking
    // every 5 seconds: calls fail, saying why, until then.
    let again = |c: &mut Client, n: u32| {
        let t = Instant::now();
        let mut last = None;
        let mut tries = 0;
        while t.elapsed() < Duration::from_secs(30) {
            tries += 1;
            let r: Result<(), tonic::Status> = rt.block_on(async {
                let (key, name) = (format!("ns/{n}-{tries}/again"), format!("ns/{n}-{tries}/again-c"));
                let fs = top_dir(&prepare(c, &key, "ns/2/base").await?);
                std::fs::write(fs.join("x"), "x").unwrap();
                let committed = commit(c, &name, &key).await;
                if committed.is_err() {
                    remove(c, &key).await?;
                }
                committed?;
                remove(c, &name).await?;
                c.cleanup(CleanupRequest { snapshotter: SN.into() }).await.map(drop)
            });
            match r {
                Ok(()) => {
                    println!("space freed: calls work again after {:.1?} ({tries} tries)", t.elapsed());
                    return;
                }
                Err(e) => {
                    assert!(no_space(&e), "{e:?}");
                    last = Some(e);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("calls still fail 30 s after space was freed: {last:?}");
    };
    again(&mut c, 10);

    // Full again, and killed: on a full disk it cannot start (RocksDB
    // must write to open), and says why; nothing is lost: with space again
    // it starts and lists what it held.
    let held = rt.block_on(list(&mut c)).unwrap();
    fill(&filler);
    hb.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_hyperboxd"))
        .arg("--root")
        .arg(&hb.root)
        .arg("--address")
        .arg(tmp.path().join("other.sock"))
        .arg("--config")
        .arg(&hb.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    println!("starting on a full disk: {}; {}", out.status, text.lines().last().unwrap_or(""));
    if !out.status.success() {
        assert!(text.contains("No space left on device"), "{text}");
    }
    free();
    hb.restart();
    let mut c = connect(&rt, &hb.socket);
    assert_eq!(rt.block_on(list(&mut c)).unwrap(), held, "the metastore changed across a restart");
    again(&mut c, 20);

    // And a lazy image runs from this root.
    let reg = Registry::start();
    let layout = tmp.path().join("layout");
    let data = LayerBuilder::new().dir("data").file("data/small", 0o644, b"small\n").finish();
    write_oci_image(&layout, "v1", &[LayerBuilder::busybox().finish(), data], &["/bin/sh"], &[oci_arch()]);
    let dst = format!("{}/full:v1", reg.addr);
    run(hyperbox().args(["convert", "-q", "--plain-http"]).arg(format!("oci:{}:v1", layout.display())).arg(&dst));
    let ctd = Containerd::start(&hb.proxy_plugin());
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy"), "{out}");
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "f1", "cat", "/data/small"]));
    assert_eq!(out, "small\n");
    drop(ctd);
    drop(hb);
    println!("{TEST}: {:.1?}", t0.elapsed());
}

/// The registry goes away in the middle of `hyperbox pull --hydrate`: no
/// panic, the daemon keeps serving, a running container reads what was
/// fetched, and once the registry is back it reads the rest.
#[test]
fn registry_lost_during_hydrate() {
    const TEST: &str = "registry_lost_during_hydrate";
    if !have_tools(TEST, &["containerd", "ctr", "runc", "docker-registry", "busybox"]) {
        return;
    }
    let t0 = Instant::now();
    use rand::RngCore;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let files: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let mut v = vec![0u8; 1 << 20];
            rng.fill_bytes(&mut v);
            v
        })
        .collect();
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr);
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let mut data = LayerBuilder::new().dir("data");
    for (i, f) in files.iter().enumerate() {
        data = data.file(&format!("data/f{i}"), 0o644, f);
    }
    let bb = LayerBuilder::busybox().symlink("bin/sleep", "busybox").symlink("bin/seq", "busybox");
    write_oci_image(&layout, "v1", &[bb.finish(), data.finish()], &["/bin/sh"], &[oci_arch()]);
    run(hyperbox()
        .args(["convert", "-q", "--plain-http"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("{}/flaky:v1", reg.addr)));
    let dst = format!("{}/flaky:v1", proxy.addr);
    let config = "version = 1\n[daemon]\nmetrics_address = \"\"\n[trace]\nenabled = false\n\
                  [fetch]\nmax_request_bytes = 262144\ntimeout_ms = 4000\nbackoff_max_ms = 500\n";
    let hb = Hyperboxd::start(tmp.path(), config);
    let ctd = Containerd::start(&hb.proxy_plugin());
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy"), "{out}");
    // runc's state is per namespace, not per containerd: a name of its own.
    let name = format!("lost-{}", std::process::id());
    run(ctd.ctr().args(["run", "-d", "--snapshotter", "hyperbox", &dst, &name, "sleep", "600"]));
    let exec = |id: &str, cmd: &str| {
        ctd.ctr().args(["task", "exec", "--exec-id", id, &name, "sh", "-c", cmd]).output().unwrap()
    };
    let sum = |i: usize| format!("{}  /data/f{i}\n", &sha256(&files[i])[7..]);
    // Read on demand before anything else: f0 is in the store.
    let out = exec("e0", "sha256sum /data/f0");
    assert_eq!(String::from_utf8_lossy(&out.stdout), sum(0));

    // Hydrate, slowed down so the fault lands in its middle.
    proxy.set(Fault::Delay(150), None);
    let gets = proxy.blob_gets();
    let log_before = hb.log().len();
    hyperbox_pull_with(&hb, &ctd, "hyperbox-test", &dst, &["--hydrate"]);
    let t = Instant::now();
    while proxy.blob_gets() < gets + 6 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no hydrate: {} blob GETs\n{}",
            proxy.blob_gets() - gets,
            &hb.log()[log_before..]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.set(Fault::Drop, None);
    let cut_at = proxy.blob_gets();
    println!("registry cut after {} hydrate requests", cut_at - gets);

    // The daemon keeps serving; the container reads what was fetched.
    let stats = run(hyperbox().args(["stats", "--address"]).arg(&hb.socket));
    assert!(stats.contains("store"), "{stats}");
    run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox", "ls"]));
    let layer = hb.fuse_mounts().into_iter().find(|m| m.join("data/f0").exists()).expect("the data layer's mount");
    drop_page_cache(&layer.join("data/f0"));
    let out = exec("e1", "sha256sum /data/f0");
    assert_eq!(String::from_utf8_lossy(&out.stdout), sum(0), "{out:?}");
    wait_until("the hydrate gives up", Duration::from_secs(120), || {
        let log = hb.log();
        log[log_before..].contains("hydrate failed") || log[log_before..].contains("hydrated")
    });
    let log = hb.log()[log_before..].to_string();
    assert!(log.contains("hydrate failed"), "the fault did not reach the hydrate:\n{log}");
    assert!(!hb.log().contains("panicked"), "{}", hb.log());

    // The registry is back: every file reads right, fetching what the
    // hydrate could not.
    proxy.set(Fault::None, None);
    let back = proxy.blob_gets();
    let out = exec("e2", "for i in $(seq 0 15); do sha256sum /data/f$i; done");
    let want: String = (0..16).map(sum).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{out:?}");
    let refetched = proxy.blob_gets() - back;
    println!("after the registry came back, reads fetched in {refetched} requests");
    assert!(refetched > 0, "everything was fetched before the fault: it hit nothing");
    run(ctd.ctr().args(["task", "kill", "-s", "KILL", &name]));
    wait_until("task killed", Duration::from_secs(10), || {
        ctd.ctr().args(["task", "delete", &name]).output().is_ok_and(|o| o.status.success())
    });
    println!("{TEST}: {:.1?}", t0.elapsed());
}
