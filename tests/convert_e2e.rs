//! `hyperbox convert` against a real `docker-registry`, and the converted
//! image pulled and run by a real containerd with its default overlayfs
//! snapshotter: HyperBox images stay ordinary images.

mod common;

use common::*;

fn image_layers() -> Vec<Vec<u8>> {
    let base = LayerBuilder::busybox().file("etc/removed", 0o644, b"gone in layer 2\n").finish();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let top = LayerBuilder::new()
        .dir("data")
        .file("data/hello.txt", 0o644, b"hello from layer 2\n")
        .file("data/big.bin", 0o644, &big)
        .file("etc/.wh.removed", 0o644, b"")
        .finish();
    vec![base, top]
}

#[test]
fn converted_image_runs_on_vanilla_containerd() {
    if !have_tools("converted_image_runs_on_vanilla_containerd", &["docker-registry", "containerd", "ctr", "runc"]) {
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let layers = image_layers();
    write_oci_image(layout.path(), "v1", &layers, &["sh", "-c", "cat /data/hello.txt"], &[oci_arch()]);
    let dst = format!("{}/demo:hyperbox", reg.addr);

    let out =
        run(hyperbox().args(["convert", "--plain-http"]).arg(format!("oci:{}:v1", layout.path().display())).arg(&dst));
    assert!(out.contains("2 layer(s)"), "{out}");

    // Every layer is a HyperBox layer with the annotations, and the diff_ids are untouched.
    let json = run(hyperbox().args(["inspect", "--plain-http", "--json", &dst]));
    let reports: serde_json::Value = serde_json::from_str(&json).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    for (r, l) in reports.iter().zip(&layers) {
        assert_eq!(r["diff_id"].as_str().unwrap(), sha256(l));
        assert_eq!(r["tar_size"].as_u64().unwrap(), l.len() as u64);
    }
    // inspect read only the indexes, with range requests.
    assert!(count_requests(&reg.log(), &["GET /v2/demo/blobs/sha256:", " 206 "]) >= 2, "{}", reg.log());

    // A second conversion finds every blob in the registry and uploads none.
    let uploads = |log: &str| count_requests(log, &["PUT /v2/demo/blobs/uploads/"]);
    let before = uploads(&reg.log());
    assert!(before >= 3, "layers and config uploaded: {before}");
    run(hyperbox()
        .args(["convert", "-q", "--plain-http"])
        .arg(format!("oci:{}:v1", layout.path().display()))
        .arg(&dst));
    assert_eq!(uploads(&reg.log()), before, "blobs uploaded again");

    // A vanilla containerd pulls and runs it with overlayfs.
    let ctd = Containerd::start("");
    run(ctd.ctr().args(["image", "pull", "--plain-http", &dst]));
    let out = run(ctd.ctr().args([
        "run",
        "--rm",
        &dst,
        "c1",
        "sh",
        "-c",
        // The pause: containerd can lose what a process prints just before
        // it exits (concourse#6775; seen here in a CI run).
        "cat /data/hello.txt; ls /etc; wc -c /data/big.bin; sleep 0.2",
    ]));
    assert!(out.contains("hello from layer 2"), "{out}");
    assert!(out.contains("passwd") && !out.contains("removed"), "whiteout not applied: {out}");
    assert!(out.contains("3000000 /data/big.bin"), "{out}");
    // The image's default command works too.
    let out = run(ctd.ctr().args(["run", "--rm", &dst, "c2"]));
    assert_eq!(out.trim(), "hello from layer 2");
}

#[test]
fn multi_platform_index_converts_every_platform() {
    if !have_tools("multi_platform_index_converts_every_platform", &["docker-registry"]) {
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let layers = image_layers();
    write_oci_image(layout.path(), "multi", &layers, &["true"], &["amd64", "arm64"]);
    let dst = format!("{}/multi:hb", reg.addr);
    let out = run(hyperbox()
        .args(["convert", "--plain-http"])
        .arg(format!("oci:{}:multi", layout.path().display()))
        .arg(&dst));
    assert!(out.contains("2 manifest(s), 4 layer(s)"), "{out}");
    // Same layers in both platforms: the second platform's chunks are all duplicates.
    let json = run(hyperbox().args(["inspect", "--plain-http", "--json", &dst]));
    let reports: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 4);
    // Registry to OCI layout, and the layout reads back.
    let out_dir = tempfile::tempdir().unwrap();
    let out_loc = format!("oci:{}:copy", out_dir.path().join("img").display());
    let out = run(hyperbox().args(["convert", "--plain-http", &dst, &out_loc]));
    assert!(out.contains("(4 already HyperBox)"), "converted layers are kept as they are: {out}");
    let out = run(hyperbox().args(["inspect", "--verify", &out_loc]));
    assert!(out.contains("verified every chunk of 4 layer(s)"), "{out}");
}
