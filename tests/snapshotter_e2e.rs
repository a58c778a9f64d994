//! hyperboxd end to end: a real containerd (Debian's) with a proxy_plugins
//! entry, a real docker-registry, real runc, FUSE and overlayfs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox"];
const SMALL: &[u8] = b"hello from a lazy layer\n";

/// busybox, plus a layer with a large file nobody reads at start and a
/// small one the command prints.
fn make_image(layout: &Path, big: &[u8]) {
    let data = LayerBuilder::new().dir("data").file("data/big", 0o644, big).file("data/small", 0o644, SMALL).finish();
    write_oci_image(layout, "v1", &[LayerBuilder::busybox().finish(), data], &["/bin/sh"], &[oci_arch()]);
}

fn random(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[test]
fn lazy_start_survives_restarts_and_goes_with_gc() {
    if !have_tools("lazy_start_survives_restarts_and_goes_with_gc", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let big = random(24 << 20);
    make_image(&layout, &big);
    let dst = format!("{}/lazy:v1", reg.addr);
    convert_to(&layout, &dst);
    let inspect: serde_json::Value =
        serde_json::from_str(&run(hyperbox().args(["inspect", "--plain-http", "--json", &dst]))).unwrap();
    let layer_bytes: u64 = inspect.as_array().unwrap().iter().map(|r| r["blob_size"].as_u64().unwrap()).sum();

    let mut hb = Hyperboxd::start(tmp.path(), "version = 1\n[store]\ngc_after_remove_secs = 1\n");
    let mut ctd = Containerd::start(&hb.proxy_plugin());
    let log_start = reg.log().len();

    // Pull: both layers are HyperBox layers, so both are mounted, not downloaded.
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy, 0 downloaded"), "{out}");
    assert_eq!(hb.fuse_mounts().len(), 2, "{}", hb.log());
    let snaps = snapshot_names(&ctd, "hyperbox-test");
    assert_eq!(snaps.len(), 2, "{snaps:?}");

    // Run: the container reads busybox and one small file.
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "c1", "cat", "/data/small"]));
    assert_eq!(out.as_bytes(), SMALL);
    let (fetched, requests) = blob_bytes_served(&reg.log()[log_start..]);
    println!("start of a {layer_bytes}-byte image fetched {fetched} bytes in {requests} blob requests");
    assert!(requests > 0);
    assert!(fetched * 5 < layer_bytes, "fetched {fetched} of {layer_bytes} bytes: not lazy");

    // SIGKILL hyperboxd: its FUSE mounts outlive it (the fd holder keeps
    // their connections). Started again, it serves them again, building
    // the layers from the indexes it kept.
    hb.kill();
    let log_killed = reg.log().len();
    hb.restart();
    assert_eq!(hb.fuse_mounts().len(), 2, "{}", hb.log());
    wait_reconnected(&ctd);
    assert_eq!(snapshot_names(&ctd, "hyperbox-test"), snaps);
    // The layers came back from the indexes kept in the store: no request
    // (an index is a ranged blob GET) reached the registry.
    let since_kill = &reg.log()[log_killed..];
    assert_eq!(count_requests(since_kill, &["\"GET /v2/"]), 0, "{since_kill}");
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "c2", "sha256sum", "/data/big"]));
    assert_eq!(out.split_whitespace().next().unwrap(), &sha256(&big)[7..]);

    // containerd restarts too; the image still runs.
    ctd.restart();
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "c3", "cat", "/data/small"]));
    assert_eq!(out.as_bytes(), SMALL);

    // A clean stop leaves the layers mounted for the next hyperboxd.
    assert!(hb.stop().success(), "{}", hb.log());
    assert_eq!(hb.fuse_mounts().len(), 2);
    hb.restart();
    assert_eq!(hb.fuse_mounts().len(), 2);
    wait_reconnected(&ctd);

    // Removing the image lets containerd's GC remove the snapshots: the
    // layers are unmounted and their dirs gone.
    run(ctd.ctr().args(["image", "rm", "--sync", &dst]));
    wait_until("snapshots removed", Duration::from_secs(20), || snapshot_names(&ctd, "hyperbox-test").is_empty());
    wait_until("layers unmounted", Duration::from_secs(10), || hb.fuse_mounts().is_empty());
    let left: Vec<_> = std::fs::read_dir(hb.root.join("snapshots")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "snapshot dirs left: {left:?}");
    // A second after the last removal, hyperboxd frees the image's chunks
    // and indexes (store.gc_after_remove_secs) without being asked.
    let stats = || run(hyperbox().args(["stats", "--address"]).arg(&hb.socket));
    wait_until("the store emptied", Duration::from_secs(20), || stats().contains("store      0 chunks"));
    assert!(hb.log().contains("gc done"), "{}", hb.log());
}

#[test]
fn images_that_are_not_lazy_still_work() {
    if !have_tools("images_that_are_not_lazy_still_work", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    make_image(&layout, &random(1 << 20));
    let plain = format!("{}/plain:v1", reg.addr);
    push_layout(&layout, &plain);
    let converted = format!("{}/converted:v1", reg.addr);
    convert_to(&layout, &converted);

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let ctd = Containerd::start(&hb.proxy_plugin());

    // An ordinary gzip image through `hyperbox pull`: downloaded and unpacked.
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &plain);
    assert!(out.contains("0 lazy, 2 downloaded"), "{out}");
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &plain, "p1", "cat", "/data/small"]));
    assert_eq!(out.as_bytes(), SMALL);
    assert!(hb.fuse_mounts().is_empty());

    // Plain `ctr image pull` passes no labels: both images are unpacked the
    // ordinary way into hyperbox's overlay dirs, and run.
    for (i, image) in [&plain, &converted].into_iter().enumerate() {
        let ctr = |args: &[&str]| run(ctd.ctr_in("plain").args(args));
        ctr(&["image", "pull", "--plain-http", "--snapshotter", "hyperbox", image]);
        let out = ctr(&["run", "--rm", "--snapshotter", "hyperbox", image, &format!("q{i}"), "cat", "/data/small"]);
        assert_eq!(out.as_bytes(), SMALL);
    }
    assert!(hb.fuse_mounts().is_empty(), "nothing was lazy");
    // The converted image keeps its diff_ids, so both share one chain of snapshots.
    assert_eq!(snapshot_names(&ctd, "plain").len(), 2);
}

/// A Debian image: debootstrap's minbase plus an app layer with a script
/// that reads a little of it (dpkg's database, the binaries and their
/// libraries). It runs lazily and prints what the same script prints when
/// run in the unpacked root filesystem, having fetched a small part of it.
#[test]
fn debian_image_starts_lazily() {
    if !have_tools("debian_image_starts_lazily", &[TOOLS, &["debootstrap", "chroot"]].concat()) {
        return;
    }
    // The pause at the end: containerd can lose what a process prints just
    // before it exits (see `traced_app`).
    const SCRIPT: &[u8] =
        b"cat /etc/debian_version\ndpkg-query -W -f='${Package} ${Version}\\n' | sort | sha256sum\nsleep 0.2\n";
    let rootfs = debian_rootfs(&[]);
    let expected =
        run(Command::new("chroot").arg(&rootfs).args(["/bin/sh", "-c"]).arg(std::str::from_utf8(SCRIPT).unwrap()));
    assert!(expected.starts_with("12."), "{expected}");

    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let app = LayerBuilder::new().dir("app").file("app/report.sh", 0o755, SCRIPT).finish();
    write_oci_image(&layout, "v1", &[tar_dir(&rootfs), app], &["/bin/sh", "/app/report.sh"], &[oci_arch()]);
    let dst = format!("{}/debian:v1", reg.addr);
    convert_to(&layout, &dst);
    let inspect: serde_json::Value =
        serde_json::from_str(&run(hyperbox().args(["inspect", "--plain-http", "--json", &dst]))).unwrap();
    let layer_bytes: u64 = inspect.as_array().unwrap().iter().map(|r| r["blob_size"].as_u64().unwrap()).sum();

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let ctd = Containerd::start(&hb.proxy_plugin());
    let log_start = reg.log().len();
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy, 0 downloaded"), "{out}");
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "d1"]));
    assert_eq!(out, expected);
    let (fetched, requests) = blob_bytes_served(&reg.log()[log_start..]);
    println!(
        "Debian image: {layer_bytes} bytes of layers; the start fetched {fetched} bytes ({:.1}%) in {requests} blob requests",
        fetched as f64 * 100.0 / layer_bytes as f64
    );
    assert!(requests > 0, "the start fetched nothing: were the blob requests counted?\n{}", reg.log());
    // Fetching ahead (`[fetch.ahead]`) brings a read's directory and the rest
    // of its file along: 19% of this image with the defaults of issue 18.
    assert!(fetched * 4 < layer_bytes, "fetched {fetched} of {layer_bytes} bytes: not lazy");
}

#[test]
fn cri_pull_is_lazy() {
    if !have_tools("cri_pull_is_lazy", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    make_image(&layout, &random(8 << 20));
    let dst = format!("{}/cri:v1", reg.addr);
    convert_to(&layout, &dst);

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n[trace]\nidle_secs = 1\n");
    // The config we ship for this containerd (packaging/containerd).
    let ctd = Containerd::start_with(&hb.cri_config(), true);
    let log_start = reg.log().len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image_ref =
        rt.block_on(cri::pull(&ctd.socket, &dst)).unwrap_or_else(|e| panic!("PullImage: {e}\n{}", ctd.log()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(hb.fuse_mounts().len(), 2, "{}: both layers lazy:\n{}", ctd.version(), hb.log());
    // Only indexes were read from the layer blobs.
    let ranged = count_requests(&reg.log()[log_start..], &["/blobs/", "\" 206 "]);
    assert_eq!(ranged, 2, "one index request per layer");

    let out =
        run(ctd.ctr_in("k8s.io").args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "k1", "cat", "/data/small"]));
    assert_eq!(out.as_bytes(), SMALL);
    // `hyperbox doctor` finds this node well set up...
    let doctor = |config: &Path| {
        hyperbox()
            .arg("doctor")
            .arg("--address")
            .arg(&hb.socket)
            .arg("--containerd-address")
            .arg(&ctd.socket)
            .arg("--containerd-config")
            .arg(config)
            .output()
            .unwrap()
    };
    let out = doctor(&ctd.dir.path().join("config.toml"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("all checks passed"), "{text}");
    // ...and says what to add to a containerd config that lacks the entry.
    let bare = tmp.path().join("bare.toml");
    std::fs::write(&bare, "version = 2\n").unwrap();
    let out = doctor(&bare);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("has no [proxy_plugins.hyperbox]"), "{text}");
    assert!(text.contains(&format!("address = \"{}\"", hb.socket.display())), "{text}");
    assert!(text.contains("disable_snapshot_annotations = false"), "{text}");
    // It reads containerd's version, and knows which config version that
    // containerd reads as meant: on containerd 2 a version 2 config (a node
    // upgraded from 1.x keeps one) loses the CRI settings in containerd's
    // migration, and CRI pulls are silently not lazy; containerd 1.x cannot
    // read a version 3 config.
    let ver = containerd_version();
    let out = doctor(&ctd.dir.path().join("config.toml"));
    let text = String::from_utf8_lossy(&out.stdout);
    let seen = text.lines().find(|l| l.contains("config version")).unwrap_or_default();
    assert!(
        seen.contains("read as is by containerd") && seen.contains(ver.version().trim_start_matches('v')),
        "{}: {text}",
        ctd.version()
    );
    let other = tmp.path().join("other.toml");
    if ver.major >= 2 {
        let v2 = format!(
            "version = 2\n[proxy_plugins.hyperbox]\n  type = \"snapshot\"\n  address = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"hyperbox\"\n  \
             disable_snapshot_annotations = false\n",
            hb.socket.display()
        );
        std::fs::write(&other, v2).unwrap();
        let out = doctor(&other);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: {text}", ctd.version());
        assert!(text.contains("silently not lazy") && text.contains("`version = 3`"), "{}: {text}", ctd.version());
        assert!(text.contains("no unpack platforms defined"), "{}: {text}", ctd.version());
    } else {
        let v3 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/containerd/hyperbox-v3.toml"))
            .unwrap()
            .replace("/run/hyperbox/hyperbox.sock", &hb.socket.display().to_string());
        std::fs::write(&other, v3).unwrap();
        let out = doctor(&other);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: {text}", ctd.version());
        assert!(text.contains("reads config versions 1 and 2 only"), "{}: {text}", ctd.version());
    }

    // The CRI passes the manifest digest too: the start is traced under it.
    let list = || run(hyperbox().args(["trace", "--address"]).arg(&hb.socket).arg("list"));
    wait_until("the CRI start traced", Duration::from_secs(30), || list().contains(&image_digest(&reg, "cri:v1")));
}

/// containerd 2 only: which CRI configs give lazy pulls, each on a real
/// containerd with its own hyperboxd. The version 2 config a node upgraded
/// from 1.x keeps (no `runtimes` table) pulls into overlayfs, silently, as
/// `hyperbox doctor` says; a CRI pull through the transfer service (k3s's
/// base sets disable_snapshot_annotations = true) is lazy with the shipped
/// `exports`, and not without them.
#[test]
fn containerd_2_cri_configs() {
    if !have_tools("containerd_2_cri_configs", TOOLS) {
        return;
    }
    let ver = containerd_version();
    if ver.major < 2 {
        eprintln!(
            "containerd_2_cri_configs: nothing to test on containerd {} (1.x reads config version 2 only)",
            ver.version()
        );
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    make_image(&layout, &random(4 << 20));
    let dst = format!("{}/cri2:v1", reg.addr);
    convert_to(&layout, &dst);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Pull `dst` through CRI on a containerd with `config` (of `version`);
    // how many layers were mounted lazily.
    let lazy_layers = |name: &str, version: u32, config: &dyn Fn(&Hyperboxd) -> String| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let hb = Hyperboxd::start(&dir, "version = 1\n[trace]\nenabled = false\n");
        let ctd = Containerd::start_config(version, &config(&hb), true);
        rt.block_on(cri::pull(&ctd.socket, &dst))
            .unwrap_or_else(|e| panic!("{}, {name}: PullImage: {e}\n{}", ctd.version(), ctd.log()));
        (hb.fuse_mounts().len(), ctd.log())
    };
    let v2 = |hb: &Hyperboxd| {
        format!(
            "[proxy_plugins.hyperbox]\n  type = \"snapshot\"\n  address = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"hyperbox\"\n  \
             disable_snapshot_annotations = false\n",
            hb.socket.display()
        )
    };
    let (n, log) = lazy_layers("v2", 2, &v2);
    assert_eq!(
        n, 0,
        "{}: a version 2 config without runtimes was lazy; containerd's migration changed:\n{log}",
        ver.line
    );
    // With a runtimes table (k3s's version 2 base has one) the migration keeps them.
    let (n, log) = lazy_layers("v2-runtimes", 2, &|hb: &Hyperboxd| {
        format!(
            "{}[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
            v2(hb)
        )
    });
    assert_eq!(n, 2, "{}: a version 2 config with runtimes:\n{log}", ver.line);
    // The shipped entries take the pre-transfer-service path (the
    // annotations are asked for)...
    let (n, log) = lazy_layers("shipped", 3, &|hb: &Hyperboxd| hb.cri_config());
    assert_eq!(n, 2, "{}: the shipped version 3 entries:\n{log}", ver.line);
    assert!(log.contains("Falling back to local image pull"), "{}:\n{log}", ver.line);
    // ...and through the transfer service the exports pass the labels.
    let transfer = |hb: &Hyperboxd| {
        hb.cri_config().replace("disable_snapshot_annotations = false", "disable_snapshot_annotations = true")
    };
    let (n, log) = lazy_layers("transfer", 3, &transfer);
    assert!(!log.contains("Falling back to local image pull"), "{}: not the transfer service:\n{log}", ver.line);
    assert_eq!(n, 2, "{}: CRI through the transfer service with exports:\n{log}", ver.line);
    let (n, log) = lazy_layers("transfer-no-exports", 3, &|hb: &Hyperboxd| {
        transfer(hb).replace("enable_remote_snapshot_annotations = \"true\"", "")
    });
    assert_eq!(n, 0, "{}: CRI through the transfer service without exports:\n{log}", ver.line);
}

/// The manifest digest a registry holds for `repo:tag`.
fn image_digest(reg: &Registry, name: &str) -> String {
    let (repo, tag) = name.split_once(':').unwrap();
    let out = run(Command::new("curl")
        .args(["-fsSI", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .arg(format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr)));
    out.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("docker-content-digest:").map(|d| d.trim().to_string()))
        .unwrap_or_else(|| panic!("no digest in {out}"))
}

/// As systemd runs it: the listening socket comes from socket activation
/// (LISTEN_FDS), READY and STOPPING go to NOTIFY_SOCKET.
#[test]
fn socket_activation_and_sd_notify() {
    if !have_tools("socket_activation_and_sd_notify", &["systemd-socket-activate", "containerd", "ctr"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("activated.sock");
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(tmp.path().join("hyperboxd.log")).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(env!("CARGO_BIN_EXE_hyperboxd"))
        .arg("--root")
        .arg(tmp.path().join("root"))
        // Never bound: the activated fd is used instead.
        .arg("--address")
        .arg(tmp.path().join("unused.sock"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // systemd-socket-activate listens first and starts hyperboxd on the first connection.
    wait_until("activation socket", Duration::from_secs(10), || socket.exists());
    let ctd = Containerd::start(&format!(
        "[proxy_plugins.hyperbox]\n  type = \"snapshot\"\n  address = \"{}\"\n",
        socket.display()
    ));
    let out = run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox", "prepare", "k1"]));
    assert!(out.is_empty(), "{out}");
    let out = run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox", "ls"]));
    assert!(out.contains("k1") && out.contains("Active"), "{out}");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    assert!(!tmp.path().join("unused.sock").exists());
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(tmp.path().join("hyperboxd.log")).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("activated=true"), "{log}");
}

/// The trace of the image `reference` names, as `hyperbox trace export` writes it.
fn exported_trace(hb: &Hyperboxd, reference: &str, file: &Path) -> serde_json::Value {
    run(hyperbox().args(["trace", "--address"]).arg(&hb.socket).args(["export", reference]).arg(file));
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

fn trace_runs(hb: &Hyperboxd, reference: &str) -> u64 {
    let out = hyperbox().args(["trace", "--address"]).arg(&hb.socket).args(["show", reference]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("runs")).map(|n| n.trim().parse().unwrap()).unwrap_or(0)
}

/// An app reading 24 of 64 files in a fixed order, each file's first
/// 192 KiB of 256 (the last chunks of each file are never read).
fn traced_app(layout: &Path, tag: &str, files: &[Vec<u8>]) -> String {
    let order = [41, 3, 17, 60, 8, 33, 25, 50, 12, 1, 44, 29, 57, 6, 38, 21, 63, 14, 47, 9, 31, 54, 19, 36];
    let mut script = String::from("for i in");
    for i in order {
        script.push_str(&format!(" {i}"));
    }
    script.push_str("; do head -c 196608 /data/f$i; done | sha256sum\n");
    // containerd can lose what a process prints just before it exits (the
    // shim's copy of its output races the exit; seen here once in a CI run on
    // containerd 2.1, with the container's exit status 0; concourse#6775
    // describes the race): a moment's pause lets the copy finish.
    script.push_str("/bin/busybox sleep 0.2\n");
    let mut data = LayerBuilder::new().dir("data");
    let mut expected = Vec::new();
    for (i, f) in files.iter().enumerate() {
        data = data.file(&format!("data/f{i}"), 0o644, f);
    }
    for i in order {
        expected.extend_from_slice(&files[i][..196608]);
    }
    let app = LayerBuilder::new().dir("app").file("app/run.sh", 0o755, script.as_bytes()).finish();
    let layers = [LayerBuilder::busybox().finish(), data.finish(), app];
    write_oci_image(layout, tag, &layers, &["/bin/sh", "/app/run.sh"], &[oci_arch()]);
    format!("{}  -\n", &sha256(&expected)[7..])
}

/// A start records a trace. It is published to the registry as an OCI
/// artifact referring to the image, and the node's store is wiped: the next
/// pull finds the trace in the registry and prefetches its chunks, so the
/// container reads nothing on demand, and the start is judged (recall and
/// precision). Then, on a wiped node with only the exported trace imported,
/// a new version of the image (another digest, most files the same) uses
/// its repository's trace, by chunk digest and by path.
#[test]
fn traced_start_prefetches_everything_it_reads() {
    if !have_tools("traced_start_prefetches_everything_it_reads", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let files: Vec<Vec<u8>> = (0..64).map(|_| random(256 << 10)).collect();
    let expected = traced_app(&layout, "v1", &files);
    let dst = format!("{}/traced:v1", reg.addr);
    convert_to(&layout, &dst);
    let metrics = format!("127.0.0.1:{}", free_port());
    // No fetching ahead: the first start's requests are its reads' own, and
    // what it left remote shows (tests/fs_mount.rs tests fetching ahead).
    let config = format!(
        "version = 1\n[daemon]\nmetrics_address = \"{metrics}\"\n[trace]\nidle_secs = 2\nwindow_secs = 30\n\
         [fetch.ahead]\nenabled = false\n"
    );
    let mut hb = Hyperboxd::start(tmp.path(), &config);
    let ctd = Containerd::start(&hb.proxy_plugin());
    let socket = hb.socket.clone();
    let trace_cmd = || {
        let mut c = hyperbox();
        c.args(["trace", "--plain-http", "--address"]).arg(&socket);
        c
    };

    // First start: no trace, so nothing is prefetched; the start is recorded.
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("3 lazy"), "{out}");
    let log_start = reg.log().len();
    // Kept after it exits (no --rm): its snapshot, and so its metrics, stay.
    let out = run(ctd.ctr().args(["run", "--snapshotter", "hyperbox", &dst, "t1"]));
    assert_eq!(out, expected);
    let (untraced_bytes, untraced_requests) = blob_bytes_served(&reg.log()[log_start..]);
    assert!(untraced_requests > 0);
    // What that start cost, as /metrics tells it: the container's processes
    // waited on the registry; every demand request was timed; reads and
    // lookups went through FUSE; containerd prepared snapshots.
    let get = |path: &str| run(Command::new("curl").arg("-fsS").arg(format!("http://{metrics}{path}")));
    let text = get("/metrics");
    let t1_wait = metric(&text, "hyperbox_container_fetch_wait_seconds_total{container=\"t1\"}").unwrap_or(0.0);
    let all_wait = metric(&text, "hyperbox_fetch_wait_seconds_total").unwrap();
    println!("untraced start waited {t1_wait:.3} s on the registry (all reads: {all_wait:.3} s)");
    assert!(t1_wait > 0.0 && t1_wait <= all_wait + 1e-6, "{text}");
    let demand = metric(&text, "hyperbox_fetch_requests_total{priority=\"demand\"}").unwrap();
    assert_eq!(metric(&text, "hyperbox_fetch_request_seconds_count{priority=\"demand\"}"), Some(demand), "{text}");
    assert!(metric(&text, "hyperbox_fuse_op_seconds_count{op=\"read\"}").unwrap() > 0.0, "{text}");
    assert!(metric(&text, "hyperbox_fuse_op_seconds_count{op=\"lookup\"}").unwrap() > 0.0, "{text}");
    let cache_hits = metric(&text, "hyperbox_frame_cache_hits_total").unwrap();
    assert!(metric(&text, "hyperbox_snapshot_operations_total{call=\"prepare\"}").unwrap() > 0.0, "{text}");
    // The same through the admin API: hyperbox stats and layers.
    let admin = |cmd: &str| run(hyperbox().args([cmd, "--address"]).arg(&socket));
    let out = admin("stats");
    assert!(out.contains(&format!("{untraced_requests} demand + 0 prefetch range requests")), "{out}");
    assert!(out.contains(&format!("cache      {cache_hits} reads of a frame")), "{out}");
    let out = admin("layers");
    assert!(out.contains("3 layer(s) mounted") && out.contains("/traced "), "{out}");
    assert!(out.lines().any(|l| l.contains("/traced") && !l.ends_with("100.0%")), "only part was read:\n{out}");
    run(ctd.ctr().args(["container", "rm", "t1"]));
    wait_until("the first trace", Duration::from_secs(30), || trace_runs(&hb, &dst) == 1);
    let file = tmp.path().join("trace.json");
    let trace = exported_trace(&hb, &dst, &file);
    assert_eq!(trace["version"], 1);
    assert!(trace["last_start"].is_null(), "nothing was prefetched, nothing judged: {trace}");
    let entries = trace["entries"].as_array().unwrap();
    // 24 files of 192 KiB read, in order: their chunks come in that order.
    let paths: Vec<&str> = entries.iter().map(|e| e["path"].as_str().unwrap()).collect();
    let first_data = paths.iter().position(|p| p.starts_with("data/")).unwrap();
    assert_eq!(paths[first_data], "data/f41", "{paths:?}");
    let unread = paths.iter().filter(|p| **p == "data/f0" || **p == "data/f2").count();
    assert_eq!(unread, 0, "files never read are not in the trace: {paths:?}");

    // Published next to the image (docker-registry 2.8 has no referrers
    // API: the tag schema), then the node's store is wiped.
    let out = run(trace_cmd().args(["push", &dst]));
    assert!(out.contains("referrers tag schema"), "{out}");
    run(ctd.ctr().args(["image", "rm", "--sync", &dst]));
    wait_until("snapshots removed", Duration::from_secs(20), || snapshot_names(&ctd, "hyperbox-test").is_empty());
    // The container's snapshot is gone (containerd's GC), and so is its series.
    let text = get("/metrics");
    assert_eq!(metric(&text, "hyperbox_container_fetch_wait_seconds_total{container=\"t1\"}"), None, "{text}");
    // The image is gone: gc frees its layers' indexes and every chunk.
    let chunks = admin("stats").split("store      ").nth(1).unwrap().split(' ').next().unwrap().to_string();
    assert_ne!(chunks, "0");
    let out = admin("gc");
    assert!(out.starts_with(&format!("removed 3 layer index(es) and {chunks} chunk(s)")), "{out}");
    let out = admin("stats");
    assert!(out.contains("store      0 chunks"), "{out}");
    assert!(hb.stop().success());
    std::fs::remove_dir_all(&hb.root).unwrap();
    hb.restart();
    wait_reconnected(&ctd);

    // Second start: pulling finds the trace in the registry and prefetches
    // its chunks; the container finds everything it reads already fetched.
    let log_before = hb.log().len();
    hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    wait_until("prefetch done", Duration::from_secs(60), || hb.log()[log_before..].contains("prefetch done"));
    assert!(hb.log()[log_before..].contains("trace found in the registry"), "{}", &hb.log()[log_before..]);
    let log_start = reg.log().len();
    let out = run(ctd.ctr().args(["run", "--snapshotter", "hyperbox", &dst, "t2"]));
    assert_eq!(out, expected);
    let text = get("/metrics");
    let t2_wait = metric(&text, "hyperbox_container_fetch_wait_seconds_total{container=\"t2\"}").unwrap_or(0.0);
    println!("traced start waited {t2_wait:.3} s on the registry (untraced: {t1_wait:.3} s)");
    assert!(t2_wait < t1_wait, "{text}");
    // Its reads took frames the prefetch kept for them (verified as they
    // arrived), rather than decompressing them from the store again.
    let ready = metric(&text, "hyperbox_ready_frame_hits_total").unwrap();
    println!("traced start: {ready} frames read as the prefetch kept them");
    assert!(ready > 0.0, "{text}");
    run(ctd.ctr().args(["container", "rm", "t2"]));
    let (bytes, requests) = blob_bytes_served(&reg.log()[log_start..]);
    println!(
        "untraced start: {untraced_bytes} bytes in {untraced_requests} requests; traced: {bytes} bytes in {requests} requests"
    );
    assert_eq!(requests, 0, "the traced start fetched on demand:\n{}", &reg.log()[log_start..]);
    wait_until("the second run merged", Duration::from_secs(30), || trace_runs(&hb, &dst) == 2);
    let trace = exported_trace(&hb, &dst, &file);
    let judged = &trace["last_start"];
    let (precision, recall) = (judged["precision"].as_f64().unwrap(), judged["recall"].as_f64().unwrap());
    println!("repeated start: precision {precision:.3}, recall {recall:.3}: {judged}");
    assert!(recall >= 0.95, "{judged}");
    assert!(precision >= 0.8, "{judged}");
    // The same judgement as Prometheus metrics, and the health check.
    assert_eq!(get("/healthz"), "ok\n");
    let text = get("/metrics");
    let value = |name: &str| -> f64 {
        let line =
            text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}:\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(value("hyperbox_prefetch_judged_hit_chunks_total"), judged["hits"].as_f64().unwrap(), "{text}");
    assert_eq!(value("hyperbox_prefetch_judged_read_chunks_total"), judged["read"].as_f64().unwrap(), "{text}");
    assert_eq!(value("hyperbox_prefetch_last_recall"), recall);
    assert_eq!(value("hyperbox_layers_mounted"), 3.0);
    // Where the memory is: the mounted trees count, and once every fetch
    // has ended nothing is held by fetches (the count returns to zero).
    let part = |p: &str| value(&format!("hyperbox_memory_bytes{{part=\"{p}\"}}"));
    assert!(part("resident") > 1e6, "{text}");
    assert!(part("layer_trees") > 0.0, "{text}");
    assert!(part("rocksdb_memtables") > 0.0, "{text}");
    assert_eq!(part("fetches"), 0.0, "{text}");
    assert!(part("ready_frames") >= 0.0, "{text}");
    assert!(text.contains("hyperbox_fetch_requests_total{priority=\"prefetch\"}"), "{text}");

    // Another node, wiped, with the exported trace of v1 imported.
    run(ctd.ctr().args(["image", "rm", "--sync", &dst]));
    wait_until("snapshots removed", Duration::from_secs(20), || snapshot_names(&ctd, "hyperbox-test").is_empty());
    assert!(hb.stop().success());
    std::fs::remove_dir_all(&hb.root).unwrap();
    hb.restart();
    wait_reconnected(&ctd);
    let out = run(trace_cmd().arg("import").arg(&file));
    assert!(out.contains("2 runs"), "{out}");
    let out = run(trace_cmd().arg("list"));
    assert!(out.contains("/traced") && out.contains("100.0%"), "{out}");

    // A new version: one file changed, so its data layer is a new blob. It
    // has no trace of its own; its repository's is used, by chunk and path.
    let mut files2 = files.clone();
    files2[63] = random(256 << 10);
    let layout2 = tmp.path().join("layout2");
    let expected2 = traced_app(&layout2, "v1", &files2);
    let dst2 = format!("{}/traced:v2", reg.addr);
    convert_to(&layout2, &dst2);
    let log_before = hb.log().len();
    hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst2);
    wait_until("prefetch done", Duration::from_secs(60), || hb.log()[log_before..].contains("prefetch done"));
    assert!(hb.log()[log_before..].contains("using its repository's latest"), "{}", &hb.log()[log_before..]);
    let log_start = reg.log().len();
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst2, "t3"]));
    assert_eq!(out, expected2);
    let (bytes2, requests2) = blob_bytes_served(&reg.log()[log_start..]);
    println!("new version with the old trace: {bytes2} bytes in {requests2} requests on demand");
    assert_eq!(requests2, 0, "{}", &reg.log()[log_start..]);
}

/// `hyperbox pull --hydrate`: with no trace at all, the whole image is
/// fetched in the background, so later reads never wait on the registry.
#[test]
fn hydrate_fetches_the_whole_image() {
    if !have_tools("hydrate_fetches_the_whole_image", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let big = random(8 << 20);
    make_image(&layout, &big);
    let dst = format!("{}/hydrate:v1", reg.addr);
    convert_to(&layout, &dst);
    // No traces: else the first run's trace (recorded some seconds after it)
    // may prefetch the second image, by its repository, before it is checked.
    let hb = Hyperboxd::start(tmp.path(), "version = 1\n[trace]\nenabled = false\n");
    let ctd = Containerd::start(&hb.proxy_plugin());
    let log_pull = reg.log().len();
    let out = hyperbox_pull_with(&hb, &ctd, "hyperbox-test", &dst, &["--hydrate"]);
    assert!(out.contains("2 lazy"), "{out}");
    wait_until("hydrated", Duration::from_secs(60), || hb.log().contains("hydrated"));
    let log_start = reg.log().len();
    // Hydrating fetched the layers (what the reads below then need not).
    let (hydrated, _) = blob_bytes_served(&reg.log()[log_pull..log_start]);
    assert!(hydrated as usize > big.len(), "hydrating fetched only {hydrated} bytes:\n{}", reg.log());
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "h1", "sha256sum", "/data/big"]));
    assert_eq!(out.split_whitespace().next().unwrap(), &sha256(&big)[7..]);
    let (bytes, requests) = blob_bytes_served(&reg.log()[log_start..]);
    assert_eq!((bytes, requests), (0, 0), "read on demand after hydrating:\n{}", &reg.log()[log_start..]);

    // An image pulled lazily, hydrated later through the admin API.
    let layout2 = tmp.path().join("layout2");
    let big2 = random(8 << 20);
    make_image(&layout2, &big2);
    let dst2 = format!("{}/hydrate:later", reg.addr);
    convert_to(&layout2, &dst2);
    hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst2);
    let admin = |args: &[&str]| run(hyperbox().args(args).arg("--address").arg(&hb.socket));
    let local =
        |out: &str| out.lines().filter(|l| l.contains("/hydrate ")).map(|l| l.ends_with("100.0%")).collect::<Vec<_>>();
    let out = admin(&["layers"]);
    assert!(local(&out).contains(&false), "nothing read yet, so not all local:\n{out}");
    let out = admin(&["prefetch", "--plain-http", "--hydrate", &dst2]);
    // Both its layers: its own, and the busybox one it shares with the first.
    assert!(out.contains(": 2 layer(s), then hydrating"), "{out}");
    wait_until("hydrated again", Duration::from_secs(60), || hb.log().matches("hydrated").count() >= 2);
    let out = admin(&["layers"]);
    assert!(local(&out).iter().all(|l| *l) && local(&out).len() >= 2, "every layer local:\n{out}");
    let log_start = reg.log().len();
    let out = run(ctd.ctr().args(["run", "--rm", "--snapshotter", "hyperbox", &dst2, "h2", "sha256sum", "/data/big"]));
    assert_eq!(out.split_whitespace().next().unwrap(), &sha256(&big2)[7..]);
    assert_eq!(blob_bytes_served(&reg.log()[log_start..]), (0, 0), "{}", &reg.log()[log_start..]);
    // A digest nothing here was pulled for is refused, with the reason.
    let out = hyperbox()
        .args(["prefetch", "--address"])
        .arg(&hb.socket)
        .arg("sha256:0000000000000000000000000000000000000000000000000000000000000000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pull it with `hyperbox pull`"), "{out:?}");
}
