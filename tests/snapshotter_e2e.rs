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

fn snapshot_names(ctd: &Containerd, ns: &str) -> Vec<String> {
    let out = run(ctd.ctr_in(ns).args(["snapshot", "--snapshotter", "hyperbox", "ls"]));
    out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// Wait until containerd has redialled a restarted hyperboxd (it backs off).
/// Asked in a namespace with snapshots: only then does containerd call it.
fn wait_reconnected(ctd: &Containerd) {
    wait_until("containerd reconnected", Duration::from_secs(30), || {
        ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox", "ls"]).output().is_ok_and(|o| o.status.success())
    });
}

/// Convert the OCI layout's `v1` image and push it as `dst`.
fn convert_to(layout: &Path, dst: &str) {
    run(hyperbox().args(["convert", "-q", "--plain-http"]).arg(format!("oci:{}:v1", layout.display())).arg(dst));
}

fn hyperbox_pull(ctd: &Containerd, ns: &str, reference: &str) -> String {
    run(hyperbox().arg("pull").arg("--address").arg(&ctd.socket).args(["--namespace", ns, reference]))
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

    let mut hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let mut ctd = Containerd::start(&hb.proxy_plugin());
    let log_start = reg.log().len();

    // Pull: both layers are HyperBox layers, so both are mounted, not downloaded.
    let out = hyperbox_pull(&ctd, "hyperbox-test", &dst);
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

    // SIGKILL hyperboxd: its FUSE mounts die with it. Started again, it
    // clears them and mounts the layers again from the indexes it kept.
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

    // A clean stop unmounts every layer.
    assert!(hb.stop().success(), "{}", hb.log());
    assert!(hb.fuse_mounts().is_empty());
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
    let out = hyperbox_pull(&ctd, "hyperbox-test", &plain);
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

/// The CRI's PullImage, as kubelet sends it (runtime.v1; only the fields used).
mod cri {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageResponse {
        #[prost(string, tag = "1")]
        pub image_ref: String,
    }

    pub async fn pull(socket: &std::path::Path, image: &str) -> Result<String, tonic::Status> {
        let channel = containerd_client::connect(socket).await.expect("connect to containerd");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("channel ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/runtime.v1.ImageService/PullImage");
        let req = PullImageRequest { image: Some(ImageSpec { image: image.to_string() }) };
        let resp: tonic::Response<PullImageResponse> =
            grpc.unary(tonic::Request::new(req), path, tonic::codec::ProstCodec::default()).await?;
        Ok(resp.into_inner().image_ref)
    }
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

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"hyperbox\"\n  disable_snapshot_annotations = false\n";
    let ctd = Containerd::start_with(&format!("{}{cri}", hb.proxy_plugin()), true);
    let log_start = reg.log().len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image_ref =
        rt.block_on(cri::pull(&ctd.socket, &dst)).unwrap_or_else(|e| panic!("PullImage: {e}\n{}", ctd.log()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(hb.fuse_mounts().len(), 2, "both layers lazy:\n{}", hb.log());
    // Only indexes were read from the layer blobs.
    let ranged = count_requests(&reg.log()[log_start..], &["/blobs/", "\" 206 "]);
    assert_eq!(ranged, 2, "one index request per layer");

    let out =
        run(ctd.ctr_in("k8s.io").args(["run", "--rm", "--snapshotter", "hyperbox", &dst, "k1", "cat", "/data/small"]));
    assert_eq!(out.as_bytes(), SMALL);
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
