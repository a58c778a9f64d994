//! Layers served through real FUSE mounts, with their chunks fetched lazily
//! from a real `docker-registry`: the mounted tree equals the same tar
//! unpacked by GNU tar (in the form overlayfs expects of a lower layer),
//! concurrent readers get the right bytes, a stalled registry does not stall
//! local answers, and a dead one turns into EIO after a bounded time.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy};
use hyperbox::fetcher::{FetchConfig, Fetcher, RemoteLayer};
use hyperbox::format::{self, writer};
use hyperbox::mount::{LayerFs, Mount, MountOptions, TraceHook};
use hyperbox::registry::{BlobBody, Client, RegistryConfig, Repo};
use hyperbox::store::{Store, StoreConfig};

/// Log lines of every test in this binary, for the ones that check them.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct W(&'static Mutex<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(move || W(buf)).try_init();
        buf
    })
}

/// The temp dir drops last, after the mount in it: removed while mounted,
/// it was left behind.
struct Served {
    rt: tokio::runtime::Runtime,
    _registry: common::Registry,
    proxy: FaultProxy,
    mount: Option<Mount>,
    mountpoint: PathBuf,
    fetcher: Fetcher,
    blob: hyperbox::digest::Digest,
    trace: tokio::sync::mpsc::Receiver<hyperbox::mount::ChunkAccess>,
    _dir: tempfile::TempDir,
}

/// Convert `tar`, push it to a registry behind a fault proxy, and mount it
/// through FUSE with an empty store.
fn serve(tar: Vec<u8>, fetch: FetchConfig, read_timeout_ms: u64) -> Served {
    logs();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let registry = common::Registry::start();
    let proxy = FaultProxy::start(&registry.addr);
    let layer = common::Layer::from_tar(tar, &writer::WriteOptions::default());
    let push_cfg = RegistryConfig { insecure: vec![registry.addr.clone()], ..RegistryConfig::default() };
    let repo = Repo { registry: registry.addr.clone(), name: "test/fs".into() };
    let pusher = Client::new(&push_cfg, false).unwrap();
    rt.block_on(pusher.push_blob(&repo, layer.digest(), BlobBody::Bytes(&layer.blob))).unwrap();
    let cfg = RegistryConfig { insecure: vec![proxy.addr.clone()], read_timeout_ms, ..RegistryConfig::default() };
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
    let fetcher = Fetcher::new(Arc::new(Client::new(&cfg, false).unwrap()), store, fetch);
    let remote = layer.remote(Repo { registry: proxy.addr.clone(), name: "test/fs".into() });
    let (hook, trace) = TraceHook::new(1 << 16);
    let fs = LayerFs::new(remote, fetcher.clone(), rt.handle().clone(), Some(hook));
    // Mounted through a symlinked dir, as a daemon root may be: mountinfo
    // shows the resolved path.
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
    let mountpoint = dir.path().join("link/fs");
    std::fs::create_dir(&mountpoint).unwrap();
    let mount = fs.mount(&mountpoint, &MountOptions { threads: 4, read_ahead_kb: 4096 }).unwrap();
    // The window is set on the mount's own backing device, as sysfs shows it.
    assert_eq!(mount.read_ahead().map_err(|e| e.to_string()), Ok(4096));
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&mountpoint).unwrap());
    let bdi = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    assert_eq!(std::fs::read_to_string(&bdi).unwrap().trim(), "4096", "{bdi}");
    Served {
        rt,
        _dir: dir,
        _registry: registry,
        proxy,
        mount: Some(mount),
        mountpoint,
        fetcher,
        blob: layer.digest().clone(),
        trace,
    }
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid path and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), std::io::Error::last_os_error());
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0, "lgetxattr {} {:?}", p.display(), String::from_utf8_lossy(name));
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// Compare the mounted tree with GNU tar's unpack of the same tar, turning
/// the unpack's whiteout files into what overlayfs expects (as containerd
/// does when it unpacks into an overlay snapshot).
fn compare(mounted: &Path, unpacked: &Path, rel: &str, checked: &mut usize) {
    let (m, u) = (mounted.join(rel), unpacked.join(rel));
    let (mm, um) = (std::fs::symlink_metadata(&m).unwrap(), std::fs::symlink_metadata(&u).unwrap());
    let what = format!("{rel:?}");
    assert_eq!(mm.file_type(), um.file_type(), "{what}: type");
    assert_eq!(mm.mode() & 0o7777, um.mode() & 0o7777, "{what}: mode");
    assert_eq!((mm.uid(), mm.gid()), (um.uid(), um.gid()), "{what}: owner");
    assert_eq!(mm.nlink(), um.nlink(), "{what}: nlink");
    if !um.is_dir() {
        // A directory's mtime changes as GNU tar fills it; the rest must match.
        assert_eq!(mm.mtime(), um.mtime(), "{what}: mtime");
    }
    let mut want_x = xattrs(&u);
    if um.is_dir() && u.join(".wh..wh..opq").exists() {
        want_x.insert("trusted.overlay.opaque".into(), b"y".to_vec());
    }
    assert_eq!(xattrs(&m), want_x, "{what}: xattrs");
    *checked += 1;
    let ft = um.file_type();
    if ft.is_symlink() {
        assert_eq!(std::fs::read_link(&m).unwrap(), std::fs::read_link(&u).unwrap(), "{what}: target");
    } else if ft.is_char_device() || ft.is_block_device() {
        assert_eq!(mm.rdev(), um.rdev(), "{what}: device");
    } else if ft.is_file() {
        assert_eq!(mm.size(), um.size(), "{what}: size");
        assert!(std::fs::read(&m).unwrap() == std::fs::read(&u).unwrap(), "{what}: content");
    } else if ft.is_dir() {
        let mut want: Vec<(String, bool)> = Vec::new(); // (name, is whiteout)
        for e in std::fs::read_dir(&u).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name == ".wh..wh..opq" {
                continue;
            }
            match name.strip_prefix(".wh.") {
                Some(hidden) => want.push((hidden.to_string(), true)),
                None => want.push((name, false)),
            }
        }
        want.sort();
        assert_eq!(sorted_names(&m), want.iter().map(|w| w.0.clone()).collect::<Vec<_>>(), "{what}: names");
        for (name, whiteout) in want {
            let child = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            if whiteout {
                let w = std::fs::symlink_metadata(mounted.join(&child)).unwrap();
                assert!(w.file_type().is_char_device() && w.rdev() == 0, "{child:?}: a whiteout is char 0/0");
                *checked += 1;
            } else {
                compare(mounted, unpacked, &child, checked);
            }
        }
    }
}

fn regular_files(root: &Path) -> Vec<PathBuf> {
    let out = common::run(Command::new("find").arg(root).args(["-type", "f", "-not", "-name", ".wh.*"]));
    out.lines().map(|l| Path::new(l).strip_prefix(root).unwrap().to_path_buf()).collect()
}

#[test]
fn a_mounted_layer_equals_gnu_tars_unpack() {
    if !common::have_tools(
        "a_mounted_layer_equals_gnu_tars_unpack",
        &["docker-registry", "tar", "setcap", "setfattr", "mknod", "fusermount3"],
    ) {
        return;
    }
    // GNU format carries sparse files, PAX carries xattrs (HyperBox takes
    // GNU sparse maps, not PAX ones): one layer of each.
    for (format, extra) in [("gnu", &["--sparse"][..]), ("posix", &["--xattrs", "--xattrs-include=*"][..])] {
        let fixture = tempfile::tempdir().unwrap();
        common::make_fixture(fixture.path(), 512 << 10);
        if format == "posix" {
            std::fs::remove_file(fixture.path().join("sparse")).unwrap();
            std::fs::remove_file(fixture.path().join("sparse-many")).unwrap();
        }
        let tar_file = fixture.path().with_extension("tar");
        common::run(
            Command::new("tar")
                .arg(format!("--format={format}"))
                .args(extra)
                .arg("-C")
                .arg(fixture.path())
                .arg("-cf")
                .arg(&tar_file)
                .arg("."),
        );
        let tar = std::fs::read(&tar_file).unwrap();
        let unpacked = tempfile::tempdir().unwrap();
        common::run(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=*", "--same-owner", "-xpf"])
                .arg(&tar_file)
                .arg("-C")
                .arg(unpacked.path()),
        );
        let _ = std::fs::remove_file(&tar_file);
        mount_and_compare(format, tar, unpacked.path());
    }
}

fn mount_and_compare(format: &str, tar: Vec<u8>, unpacked: &Path) {
    // No frame cache: the warm reads below must go through the store's
    // verified read (the cache has its own test in tests/fetcher.rs).
    let mut s = serve(tar, FetchConfig { frame_cache_mb: 0, ..FetchConfig::default() }, 30_000);
    let files = regular_files(unpacked);
    assert!(files.len() >= 8, "{files:?}");
    // 16 readers of every file at once: on a cold store, then warm (chunks
    // in the store, page cache dropped first): right bytes for all.
    let sixteen_readers = |pass: &str| {
        std::thread::scope(|scope| {
            for k in 0..16 {
                let (files, m, u) = (&files, &s.mountpoint, unpacked);
                scope.spawn(move || {
                    for f in files.iter().cycle().skip(k).take(files.len()) {
                        let got = std::fs::read(m.join(f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                        assert!(got == std::fs::read(u.join(f)).unwrap(), "{pass} reader {k}: {} differs", f.display());
                    }
                });
            }
        })
    };
    sixteen_readers("cold");
    let st = s.fetcher.stats();
    eprintln!("{format}: after 16 cold readers: {st:?}");
    assert!(st.joined > 0 || st.requests() < 16, "readers of the same chunks share fetches: {st:?}");
    s.rt.block_on(s.fetcher.settled());
    for f in &files {
        common::drop_page_cache(&s.mountpoint.join(f));
    }
    sixteen_readers("warm");
    let warm = s.fetcher.stats();
    assert_eq!(warm.requests(), st.requests(), "warm reads come from the store: {warm:?}");
    assert!(warm.store_hits > st.store_hits, "{warm:?}");
    assert_eq!(warm.cache_hits, 0, "{warm:?}");
    // Then the whole tree, metadata and all.
    let mut checked = 0;
    compare(&s.mountpoint, unpacked, "", &mut checked);
    assert!(checked > 20, "{format}: compared {checked} entries");
    if format == "posix" {
        let caps = xattrs(&s.mountpoint.join("capfile"));
        assert!(caps.contains_key("security.capability"), "file capabilities come through: {caps:?}");
    }
    // Reads were reported to the trace hook, as frames of this layer.
    let mut reported = std::collections::HashSet::new();
    while let Ok(a) = s.trace.try_recv() {
        assert_eq!(a.layer, s.blob);
        reported.insert(a.frame);
    }
    assert!(!reported.is_empty());
    // Unmount cleanly: the mountpoint is an empty dir again.
    s.mount.take().unwrap().unmount().unwrap();
    assert_eq!(std::fs::read_dir(&s.mountpoint).unwrap().count(), 0);
}

#[test]
fn a_stalled_registry_stalls_only_reads_that_need_it_and_a_dead_one_gives_eio() {
    if !common::have_tools("a_stalled_registry_stalls_only_reads_that_need_it", &["docker-registry", "fusermount3"]) {
        return;
    }
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut b = common::LayerBuilder::new().dir("d");
    for name in ["warm", "cold"] {
        let mut data = vec![0u8; 2 << 20];
        rng.fill_bytes(&mut data);
        b = b.file(&format!("d/{name}"), 0o644, &data);
    }
    let fetch = FetchConfig { attempts: 2, backoff_initial_ms: 10, timeout_ms: 3_000, ..FetchConfig::default() };
    let s = serve(b.finish(), fetch, 500);
    let warm = s.mountpoint.join("d/warm");
    let want = std::fs::read(&warm).unwrap();
    s.rt.block_on(s.fetcher.settled()); // readers are answered before chunks are stored

    s.proxy.set(Fault::Stall, None);
    let cold = s.mountpoint.join("d/cold");
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        let r = std::fs::File::open(&cold).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    // While that read waits on the registry: metadata and local data answer.
    common::drop_page_cache(&warm);
    assert_eq!(std::fs::read_dir(s.mountpoint.join("d")).unwrap().count(), 2);
    assert!(std::fs::read(&warm).unwrap() == want);
    assert!(!reader.is_finished(), "the cold read should still be waiting on the stalled registry");
    // The stalled registry never answers: EIO, after a bounded time.
    let (r, took) = reader.join().unwrap();
    let err = r.expect_err("a read with the registry stalled must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(20), "EIO took {took:?}");
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("read failed") && l.contains(&s.blob.to_string()))
        .unwrap_or_else(|| panic!("no log line for the failed read in:\n{log}"));
    assert!(line.contains("chunk blake3:"), "the log line names the chunk: {line}");
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Compare two merged (overlay) views: what a container sees.
fn compare_merged(a: &Path, b: &Path, rel: &str, checked: &mut usize) {
    let (pa, pb) = (a.join(rel), b.join(rel));
    let (ma, mb) = (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap());
    let what = format!("{rel:?}");
    assert_eq!(ma.file_type(), mb.file_type(), "{what}: type");
    assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "{what}: mode");
    assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
    if !ma.is_dir() {
        assert_eq!(ma.mtime(), mb.mtime(), "{what}: mtime");
    }
    assert_eq!(xattrs(&pa), xattrs(&pb), "{what}: xattrs");
    *checked += 1;
    if ma.file_type().is_symlink() {
        assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap(), "{what}: target");
    } else if ma.is_file() {
        assert!(std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(), "{what}: content");
    } else if ma.is_dir() {
        let names = sorted_names(&pa);
        assert_eq!(names, sorted_names(&pb), "{what}: names");
        for n in names {
            compare_merged(a, b, &if rel.is_empty() { n.clone() } else { format!("{rel}/{n}") }, checked);
        }
    }
}

#[test]
fn three_layers_overlaid_equal_containerds_overlayfs_unpack() {
    if !common::have_tools(
        "three_layers_overlaid_equal_containerds_overlayfs_unpack",
        &["docker-registry", "containerd", "ctr", "mount", "umount"],
    ) {
        return;
    }
    use common::LayerBuilder;
    let l1 = LayerBuilder::new()
        .dir("etc")
        .file("etc/a", 0o644, b"a from 1\n")
        .file("etc/b", 0o600, b"b from 1\n")
        .dir("data")
        .dir("data/old")
        .file("data/old/x", 0o644, b"x\n")
        .file("data/old/y", 0o644, b"y\n")
        .dir("opq")
        .file("opq/keep", 0o644, b"kept until layer 3\n")
        .symlink("lnk", "etc/a")
        .dir("gone")
        .dir("gone/sub")
        .file("gone/sub/f", 0o644, b"f\n")
        .finish();
    let l2 = LayerBuilder::new()
        .dir("etc")
        .file("etc/.wh.b", 0o644, b"")
        .file("etc/c", 0o755, b"c from 2\n")
        .dir("data")
        .dir("data/old")
        .file("data/old/.wh..wh..opq", 0o644, b"")
        .file("data/old/new", 0o644, b"new in 2\n")
        .finish();
    let l3 = LayerBuilder::new()
        .file(".wh.gone", 0o644, b"")
        .dir("etc")
        .file("etc/b", 0o640, b"b again in 3\n")
        .file("etc/.wh.c", 0o644, b"")
        .dir("opq")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/fresh", 0o644, b"fresh in 3\n")
        .finish();
    let reg = common::Registry::start();
    let layout = tempfile::tempdir().unwrap();
    common::write_oci_image(layout.path(), "v1", &[l1, l2, l3], &["true"], &[common::oci_arch()]);
    let dst = format!("{}/ovl:hb", reg.addr);
    common::run(
        common::hyperbox()
            .args(["convert", "-q", "--plain-http"])
            .arg(format!("oci:{}:v1", layout.path().display()))
            .arg(&dst),
    );

    // containerd's own overlayfs unpack of the converted image.
    let ctd = common::Containerd::start("");
    common::run(ctd.ctr().args(["image", "pull", "--plain-http", &dst]));
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("containerd");
    std::fs::create_dir(&theirs).unwrap();
    common::run(ctd.ctr().args(["image", "mount", &dst]).arg(&theirs));

    // Ours: each layer through FUSE, lazily, then overlaid.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = RegistryConfig { insecure: vec![reg.addr.clone()], ..RegistryConfig::default() };
    let client = Arc::new(Client::new(&cfg, false).unwrap());
    let repo = Repo { registry: reg.addr.clone(), name: "ovl".into() };
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&rt.block_on(client.get_manifest(&repo, "hb")).unwrap().bytes).unwrap();
    if let Some(m) = manifest["manifests"].as_array().and_then(|m| m.first()) {
        let digest = m["digest"].as_str().unwrap().to_string();
        manifest = serde_json::from_slice(&rt.block_on(client.get_manifest(&repo, &digest)).unwrap().bytes).unwrap();
    }
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
    let fetcher = Fetcher::new(client.clone(), store, FetchConfig::default());
    let mut mounts = Vec::new();
    let mut lowers = Vec::new();
    for (k, l) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let blob: hyperbox::digest::Digest = l["digest"].as_str().unwrap().parse().unwrap();
        let ann: std::collections::HashMap<String, String> = serde_json::from_value(l["annotations"].clone()).unwrap();
        let loc = format::IndexLocation::from_annotations(&ann).unwrap().expect("a HyperBox layer");
        let frame = rt.block_on(client.get_blob_range(&repo, &blob, loc.offset, loc.length)).unwrap();
        let index = format::parse_index_frame(&frame, &loc).unwrap();
        let remote = Arc::new(RemoteLayer { repo: repo.clone(), blob, index: Arc::new(index) });
        let at = dir.path().join(format!("layer{k}"));
        std::fs::create_dir(&at).unwrap();
        mounts.push(
            LayerFs::new(remote, fetcher.clone(), rt.handle().clone(), None)
                .mount(&at, &MountOptions { threads: 2, read_ahead_kb: 0 })
                .unwrap(),
        );
        lowers.push(at);
    }
    assert_eq!(lowers.len(), 3);
    let ours = dir.path().join("hyperbox");
    std::fs::create_dir(&ours).unwrap();
    let lowerdir: Vec<String> = lowers.iter().rev().map(|p| p.display().to_string()).collect();
    common::run(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("lowerdir={}", lowerdir.join(":")))
            .arg(&ours),
    );

    let result = std::panic::catch_unwind(|| {
        let mut checked = 0;
        compare_merged(&theirs, &ours, "", &mut checked);
        // What the layers meant: deletions and opaque dirs took effect.
        assert!(!ours.join("gone").exists() && !ours.join("etc/c").exists());
        assert_eq!(std::fs::read(ours.join("etc/b")).unwrap(), b"b again in 3\n");
        assert_eq!(sorted_names(&ours.join("data/old")), ["new"]);
        assert_eq!(sorted_names(&ours.join("opq")), ["fresh"]);
        checked
    });
    let _ = Command::new("umount").arg(&ours).status();
    let _ = ctd.ctr().args(["image", "unmount"]).arg(&theirs).status();
    let checked = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(checked >= 10, "compared {checked} entries");
    drop(mounts);
}

/// Reads of `files` (relative to the mount) through FUSE, each checked
/// against `want`.
fn read_all(s: &Served, files: &[String], want: &BTreeMap<String, Vec<u8>>) {
    for f in files {
        let got = std::fs::read(s.mountpoint.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(got == want[f], "{f} differs");
    }
}

/// A layer of `files` incompressible files of `size` bytes in each of the
/// directories `dirs` (named `DIR/fN`), built on `b`; and each file's data.
fn random_files(
    seed: u64,
    mut b: common::LayerBuilder,
    dirs: &[String],
    files: usize,
    size: usize,
) -> (common::LayerBuilder, BTreeMap<String, Vec<u8>>) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut want = BTreeMap::new();
    for dir in dirs {
        b = b.dir(dir);
        for i in 0..files {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            let name = format!("{dir}/f{i}");
            b = b.file(&name, 0o644, &data);
            want.insert(name, data);
        }
    }
    (b, want)
}

#[test]
fn a_read_that_misses_brings_its_directory_along() {
    if !common::have_tools("a_read_that_misses_brings_its_directory_along", &["docker-registry", "fusermount3"]) {
        return;
    }
    use rand::{RngCore, SeedableRng};
    // Two packages of ten 60 KiB modules each (incompressible: a frame or
    // two each), and a file over dir_file_max_bytes (1 MiB) beside them.
    let dirs = ["pkg".to_string(), "other".to_string()];
    let (b, mut want) = random_files(11, common::LayerBuilder::new(), &dirs, 10, 60 << 10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut big = vec![0u8; 2 << 20];
    rng.fill_bytes(&mut big);
    let b = b.file("pkg/big.so", 0o644, &big);
    want.insert("pkg/big.so".to_string(), big);
    let s = serve(b.finish(), FetchConfig::default(), 30_000);
    let names = |dir: &str| -> Vec<String> { (0..10).map(|i| format!("{dir}/f{i}")).collect() };

    // The first module of `pkg` misses: the others, and not the big file
    // (over dir_file_max_bytes), come along in the background.
    read_all(&s, &names("pkg")[..1], &want);
    s.rt.block_on(s.fetcher.settled());
    let after_first = s.fetcher.stats();
    assert_eq!(after_first.demand_requests, 1, "{after_first:?}");
    assert!(after_first.prefetch_requests >= 1, "the directory was fetched ahead: {after_first:?}");
    read_all(&s, &names("pkg")[1..], &want);
    let st = s.fetcher.stats();
    assert_eq!(st.requests(), after_first.requests(), "pkg's other modules were local: {st:?}");
    // The big file, and the other package, were left remote: each is
    // fetched when read.
    for f in ["pkg/big.so".to_string(), names("other")[0].clone()] {
        let before = s.fetcher.stats().demand_requests;
        read_all(&s, std::slice::from_ref(&f), &want);
        assert!(s.fetcher.stats().demand_requests > before, "{f} was fetched ahead");
    }
}

#[test]
fn reads_of_most_of_a_layer_stream_the_rest() {
    if !common::have_tools("reads_of_most_of_a_layer_stream_the_rest", &["docker-registry", "fusermount3"]) {
        return;
    }
    use hyperbox::fetcher::AheadConfig;
    // 200 files of 20 KiB in 20 directories; nothing brought along by
    // directory, so only the sweep fetches ahead.
    let dirs: Vec<String> = (0..20).map(|d| format!("d{d:02}")).collect();
    let (b, want) = random_files(12, common::LayerBuilder::new(), &dirs, 10, 20 << 10);
    let ahead =
        AheadConfig { dir_bytes: 0, file_bytes: 0, sweep_after: 0, sweep_files_percent: 40, ..AheadConfig::default() };
    let s = serve(b.finish(), FetchConfig { ahead, ..FetchConfig::default() }, 30_000);
    // Reads in reverse name order: never a step forward through the blob.
    let mut order: Vec<String> = want.keys().cloned().collect();
    order.reverse();
    let (first, rest) = order.split_at(80);
    read_all(&s, &first[..79], &want);
    s.rt.block_on(s.fetcher.settled());
    assert_eq!(s.fetcher.stats().prefetch_requests, 0, "79 of 200 files is under 40%");
    // The 80th file is 40% of the layer: the rest is streamed.
    read_all(&s, &first[79..], &want);
    s.rt.block_on(s.fetcher.settled());
    // The stream ran to its end. (What it had left to fetch varies: the
    // demand reads of this small layer sometimes brought it all already.)
    let streamed = s.fetcher.stats();
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(log.contains("reads reached 40% of the layer's files"), "{log}");
    assert!(log.contains("layer streamed: every chunk is local"), "{log}");
    // With the registry gone, every other file still reads: it is local.
    s.proxy.set(Fault::Status500, None);
    read_all(&s, rest, &want);
    assert_eq!(s.fetcher.stats().requests(), streamed.requests(), "the rest was local");
}

#[test]
fn an_idle_link_hydrates_the_layers_in_use() {
    if !common::have_tools("an_idle_link_hydrates_the_layers_in_use", &["docker-registry", "fusermount3"]) {
        return;
    }
    use hyperbox::fetcher::AheadConfig;
    let dirs: Vec<String> = (0..4).map(|d| format!("d{d}")).collect();
    let (b, want) = random_files(13, common::LayerBuilder::new(), &dirs, 4, 300 << 10);
    // Only idle hydration: nothing else is fetched ahead.
    let ahead = AheadConfig {
        dir_bytes: 0,
        file_bytes: 0,
        sweep_after: 0,
        sweep_files_percent: 0,
        idle_hydrate_ms: 300,
        ..AheadConfig::default()
    };
    let s = serve(b.finish(), FetchConfig { ahead, ..FetchConfig::default() }, 30_000);
    let names: Vec<String> = want.keys().cloned().collect();
    read_all(&s, &names[..1], &want);
    // Once the link has been idle for 300 ms, the rest of the layer comes,
    // a request at a time.
    let t = Instant::now();
    let log = || String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    while !log().contains("hydrated while idle") {
        assert!(t.elapsed() < Duration::from_secs(30), "not hydrated: {:?}", s.fetcher.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.fetcher.stats().prefetch_requests >= 1, "{:?}", s.fetcher.stats());
    // With the registry gone, every other file reads from the store.
    s.rt.block_on(s.fetcher.settled());
    s.proxy.set(Fault::Status500, None);
    read_all(&s, &names[1..], &want);
}
