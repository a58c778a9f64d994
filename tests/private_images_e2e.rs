//! Private images on Kubernetes: kubelet's pull secret reaches hyperboxd
//! through its CRI image service proxy (`[cri] image_service_address`),
//! so a private image's layers are lazy. Real containerd with its CRI
//! plugin, a real docker-registry with htpasswd auth, runc and FUSE.

mod common;

use common::*;

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox", "htpasswd", "curl"];
const SMALL: &[u8] = b"hello from a private lazy layer\n";

#[test]
fn a_cri_pull_with_a_pull_secret_is_lazy_and_keeps_its_credentials_safe() {
    if !have_tools("a_cri_pull_with_a_pull_secret_is_lazy_and_keeps_its_credentials_safe", TOOLS) {
        return;
    }
    const PASSWORD: &str = "pr1vate-s3cret";
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start_with_auth("kubelet", PASSWORD);
    let layout = tmp.path().join("layout");
    let data = LayerBuilder::new()
        .dir("data")
        .file("data/small", 0o644, SMALL)
        .file("data/later", 0o644, &[9u8; 200 << 10])
        .finish();
    write_oci_image(&layout, "v1", &[LayerBuilder::busybox().finish(), data], &["/bin/sh"], &[oci_arch()]);
    // Converted and pushed by someone who can (docker's config.json).
    let pusher = docker_config(&tmp.path().join("pusher"), &[(&registry.addr, "kubelet", PASSWORD)]);
    let image = format!("{}/team/private:v1", registry.addr);
    run(hyperbox()
        .env("DOCKER_CONFIG", &pusher)
        .args(["convert", "-q", "--plain-http"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&image));

    // hyperboxd has no credentials of its own; it serves the CRI image
    // service proxy, which forwards to containerd (through a link made
    // once containerd runs, as its socket is only known then).
    let empty = docker_config(&tmp.path().join("no-docker"), &[]);
    let proxy = tmp.path().join("cri-image.sock");
    let containerd_link = tmp.path().join("containerd.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    // No fetching ahead: /data/later must still be remote after the restart
    // (reading /data/small would bring its directory along).
    let config = format!(
        "version = 1\n[daemon]\nmetrics_address = \"{metrics}\"\n[registry]\ndocker_config = \"{}\"\n[cri]\n\
         image_service_address = \"{}\"\ncontainerd_address = \"{}\"\n[fetch.ahead]\nenabled = false\n",
        empty.join("config.json").display(),
        proxy.display(),
        containerd_link.display()
    );
    let mut hb = Hyperboxd::start(tmp.path(), &config);
    // The config we ship for this containerd (packaging/containerd).
    let ctd = Containerd::start_with(&hb.cri_config(), true);
    std::os::unix::fs::symlink(&ctd.socket, &containerd_link).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&proxy).unwrap().permissions().mode() & 0o777, 0o660, "the proxy socket is root's");

    // kubelet's PullImage with the pod's pull secret, through the proxy.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secret = cri::AuthConfig { username: "kubelet".into(), password: PASSWORD.into() };
    let log_start = registry.log().len();
    let image_ref = rt
        .block_on(cri::pull_with(&proxy, &image, Some(secret)))
        .unwrap_or_else(|e| panic!("PullImage through the proxy: {e}\n{}\n{}", hb.log(), ctd.log()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(hb.fuse_mounts().len(), 2, "{}: both layers lazy:\n{}", ctd.version(), hb.log());
    // Of the layer blobs, only their indexes were read.
    let ranged = count_requests(&registry.log()[log_start..], &["/blobs/", "\" 206 "]);
    assert_eq!(ranged, 2, "one index request per layer");
    // Every other call goes through too.
    let listed = rt.block_on(cri::list(&proxy)).expect("ListImages through the proxy");
    assert!(listed.iter().any(|i| i.id == image_ref), "{listed:?}");

    // The credentials are kept for the restart, root's only, and never logged.
    let kept = hb.root.join("cri-credentials.json");
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!hb.log().contains(PASSWORD), "the password is in hyperboxd's log");

    let ctr_run = |name: &str, file: &str| {
        run(ctd.ctr_in("k8s.io").args(["run", "--rm", "--snapshotter", "hyperbox", &image, name, "cat", file]))
    };
    assert_eq!(ctr_run("p1", "/data/small").as_bytes(), SMALL);

    // After a restart, a file never read before is fetched with the kept
    // credentials.
    hb.stop();
    hb.restart();
    wait_reconnected(&ctd);
    let later = ctr_run("p2", "/data/later");
    assert_eq!(later.len(), 200 << 10);
    assert!(later.bytes().all(|b| b == 9));
    assert_fetched_since_start(&metrics);
    assert!(!hb.log().contains(PASSWORD), "the password is in hyperboxd's log");
}
