//! What a local user and an image can and cannot do to a node running
//! hyperboxd, end to end: a real containerd, docker-registry, runc, FUSE
//! and overlayfs. docs/security.md says what is guaranteed; these check it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hyperbox::registry::{BlobBody, Client, Reference, RegistryConfig};

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox", "cc", "setpriv"];

/// Prints who it runs as and its effective capabilities: run setuid, or
/// with a file capability, it shows whether the kernel honoured them.
const PROBE_C: &str = r#"
#include <grp.h>
#include <linux/capability.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    /* probe --chroot DIR PROG ARGS: run PROG in DIR as uid:gid 1000:1000,
       as a container runtime would (without no_new_privs). */
    if (argc > 3 && strcmp(argv[1], "--chroot") == 0) {
        if (chroot(argv[2]) || chdir("/") || setgroups(0, NULL) || setgid(1000) || setuid(1000)) {
            perror("probe");
            return 2;
        }
        execv(argv[3], argv + 3);
        perror(argv[3]);
        return 2;
    }
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2] = {{0}};
    if (syscall(SYS_capget, &h, d)) {
        perror("capget");
        return 2;
    }
    unsigned long long eff = ((unsigned long long)d[1].effective << 32) | d[0].effective;
    printf("euid=%d capeff=%016llx nnp=%d\n", (int)geteuid(), eff, prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    return 0;
}
"#;

/// `security.capability` (VFS_CAP_REVISION_2, effective) granting
/// CAP_NET_BIND_SERVICE (bit 10) alone.
const CAP_NET_BIND_SERVICE: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn compile_probe(dir: &Path) -> Vec<u8> {
    let src = dir.join("probe.c");
    std::fs::write(&src, PROBE_C).unwrap();
    let out = dir.join("probe");
    run(Command::new("cc").args(["-static", "-O1", "-o"]).arg(&out).arg(&src));
    std::fs::read(out).unwrap()
}

/// `cmd` on the host as user `nobody`, no groups: (succeeded, output).
/// Through a shell: setpriv itself execs with root's capabilities still in
/// effect (they go at that exec), so it could reach what nobody cannot.
fn as_nobody(cmd: &[&str]) -> (bool, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/bin/sh", "-c", "\"$@\"", "sh"])
        .args(cmd)
        .output()
        .unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// Mount, at `target`, the rootfs containerd would give a container of
/// the image whose top layer is snapshot `top`: an overlay over the
/// layers' FUSE mounts, from hyperboxd's own mounts for a new snapshot.
fn mount_rootfs(ctd: &Containerd, top: &str, target: &Path) {
    let sn = |args: &[&str]| run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox"]).args(args));
    sn(&["prepare", "rootfs", top]);
    std::fs::create_dir_all(target).unwrap();
    let mount = sn(&["mounts", target.to_str().unwrap(), "rootfs"]);
    assert!(mount.starts_with("mount -t overlay "), "{mount}");
    run(Command::new("sh").arg("-c").arg(mount.trim()));
}

#[test]
fn local_users_reach_nothing_and_containers_see_their_image_exactly() {
    if !have_tools("local_users_reach_nothing_and_containers_see_their_image_exactly", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    // The test's temp dir must not be what stops `nobody`.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = compile_probe(tmp.path());
    let layout = tmp.path().join("layout");
    let special = LayerBuilder::new()
        .dir("opt")
        .file("opt/suid-probe", 0o4755, &probe)
        .file_with_xattrs("opt/cap-probe", 0o755, &probe, &[("security.capability", &CAP_NET_BIND_SERVICE)])
        .device("opt/zero", tar::EntryType::Char, 0o666, 1, 5)
        .file("opt/secret", 0o600, b"root only\n")
        .finish();
    write_oci_image(&layout, "v1", &[LayerBuilder::busybox().finish(), special], &["/bin/sh"], &[oci_arch()]);
    let dst = format!("{}/special:v1", reg.addr);
    convert_to(&layout, &dst);

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let ctd = Containerd::start(&hb.proxy_plugin());
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy, 0 downloaded"), "{out}");

    // In the image's rootfs, as containerd mounts it for a container, and as
    // a user who is not root: the setuid bit, the file capability and the
    // device node all work through the overlay. (`ctr run` cannot show it:
    // its default spec sets no_new_privs, which turns setuid bits and file
    // capabilities off, and it takes no user.)
    let top = run(ctd.ctr().args(["snapshot", "--snapshotter", "hyperbox", "ls"]))
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2] == "Committed" && f[1].starts_with("sha256:")).then(|| f[0].to_string())
        })
        .expect("the image's top layer");
    let rootfs = tmp.path().join("rootfs");
    mount_rootfs(&ctd, &top, &rootfs);
    let _unmount = Unmount(rootfs.clone());
    let probe_on_host = tmp.path().join("probe");
    let in_container = |_name: &str, cmd: &[&str]| {
        let mut c = Command::new(&probe_on_host);
        c.arg("--chroot").arg(&rootfs);
        match cmd[0] {
            "sh" | "stat" => c.arg("/bin/busybox").args(cmd),
            _ => c.args(cmd),
        };
        run(&mut c)
    };
    let out = in_container("c-suid", &["/opt/suid-probe"]);
    assert!(
        out.starts_with("euid=0 ") && out.ends_with(" nnp=0\n"),
        "a setuid-root binary of the image did not run as root: {out}"
    );
    let out = in_container("c-cap", &["/opt/cap-probe"]);
    assert_eq!(out.trim(), "euid=1000 capeff=0000000000000400 nnp=0", "the file capability was not honoured");
    let out = in_container("c-dev", &["sh", "-c", "head -c 4096 /opt/zero | wc -c; stat -c '%a %t:%T %F' /opt/zero"]);
    assert_eq!(out, "4096\n666 1:5 character special file\n");
    let out = in_container("c-ls", &["stat", "-c", "%a %u", "/opt/suid-probe", "/opt/secret"]);
    assert_eq!(out, "4755 0\n600 0\n");

    // On the host: the state is root's alone.
    let root = &hb.root;
    let snapshots = root.join("snapshots");
    let store = root.join("store");
    for dir in [root.clone(), snapshots.clone(), store.clone()] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let ids: Vec<PathBuf> = std::fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!ids.is_empty());
    for id in &ids {
        assert_eq!(mode(id), 0o700, "{}", id.display());
    }
    for f in std::fs::read_dir(&store).unwrap().map(|e| e.unwrap()) {
        if f.file_type().unwrap().is_file() {
            assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
        }
    }
    let sock = std::fs::metadata(&hb.socket).unwrap();
    assert_eq!((sock.permissions().mode() & 0o777, sock.uid()), (0o660, 0), "the socket");
    // Every layer mount honours no setuid bit and no device of its own.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // This daemon's mounts: other tests run beside this one.
    let under_root = |l: &&str| l.split(' ').nth(4).is_some_and(|m| Path::new(m).starts_with(root));
    let layers: Vec<&str> =
        mountinfo.lines().filter(|l| l.contains(" - fuse") && l.contains("hyperbox:")).filter(under_root).collect();
    assert_eq!(layers.len(), 2, "{mountinfo}");
    for l in &layers {
        let opts = l.split(' ').nth(5).unwrap();
        assert!(opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"), "{l}");
    }

    // A local user reaches none of it: not the layers' files, not their
    // setuid binaries, not the store, not the API.
    let layer_fs = hb.fuse_mounts().into_iter().find(|m| m.join("opt/suid-probe").exists()).expect("the layer");
    let suid = layer_fs.join("opt/suid-probe");
    let (ok, out) = as_nobody(&[suid.to_str().unwrap()]);
    assert!(!ok && !out.contains("euid=0"), "nobody ran the image's setuid binary from the host: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    for path in [&snapshots, &store, &layer_fs.join("opt/zero"), &store.join("CURRENT")] {
        let (ok, out) = as_nobody(&["cat", path.to_str().unwrap()]);
        assert!(!ok && out.contains("Permission denied"), "nobody read {}: {out}", path.display());
    }
    let (ok, out) = as_nobody(&[env!("CARGO_BIN_EXE_hyperbox"), "stats", "--address", hb.socket.to_str().unwrap()]);
    assert!(!ok, "nobody used the admin API: {out}");
}

/// Unmounts its path when dropped, the test failing or not.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Images whose layers all but one are the same: busybox, then a layer
/// holding `who` = `text`.
fn image_saying(layout: &Path, text: &str) {
    let data = LayerBuilder::new().dir("data").file("data/who", 0o644, text.as_bytes()).finish();
    write_oci_image(layout, "v1", &[LayerBuilder::busybox().finish(), data], &["/bin/sh"], &[oci_arch()]);
}

/// Push, as `tag` of `src`'s repository, `src`'s image with its config's
/// last diff_id replaced by `diff_id`: an image that claims another
/// image's layer.
fn push_claiming(src: &str, tag: &str, diff_id: &str) -> String {
    let r: Reference = src.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(&RegistryConfig::default(), true).unwrap();
        let m = c.get_manifest(&r.repo, &r.target()).await.unwrap();
        let mut manifest: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap().parse().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&c.get_blob(&r.repo, &config_digest).await.unwrap()).unwrap();
        let ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
        *ids.last_mut().unwrap() = diff_id.into();
        let config = serde_json::to_vec(&config).unwrap();
        let digest = hyperbox::digest::Digest::of(&config);
        c.push_blob(&r.repo, &digest, BlobBody::Bytes(&config)).await.unwrap();
        manifest["config"]["digest"] = digest.to_string().into();
        manifest["config"]["size"] = config.len().into();
        let bytes = serde_json::to_vec(&manifest).unwrap();
        c.put_manifest(&r.repo, tag, &bytes, &m.media_type).await.unwrap();
    });
    format!("{}/{}:{tag}", r.repo.registry, r.repo.name)
}

#[test]
fn an_image_cannot_pass_its_layer_off_as_another_images() {
    if !have_tools("an_image_cannot_pass_its_layer_off_as_another_images", TOOLS) {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (good_layout, evil_layout) = (tmp.path().join("good"), tmp.path().join("evil"));
    image_saying(&good_layout, "genuine\n");
    image_saying(&evil_layout, "evil\n");
    let good = format!("{}/good:v1", reg.addr);
    convert_to(&good_layout, &good);
    convert_to(&evil_layout, &format!("{}/evil:v1", reg.addr));
    // The evil image's config claims the good image's second layer: its
    // layers' chain ids are the good image's.
    let genuine_tar = LayerBuilder::new().dir("data").file("data/who", 0o644, b"genuine\n").finish();
    let evil = push_claiming(&format!("{}/evil:v1", reg.addr), "claims-good", &sha256(&genuine_tar));

    let hb = Hyperboxd::start(tmp.path(), "version = 1\n");
    let ctd = Containerd::start(&hb.proxy_plugin());
    // Its layer is not mounted under the claimed chain id, and once
    // downloaded it is not what the config says: the pull fails.
    let out = hyperbox()
        .args(["pull", "--address"])
        .arg(&ctd.socket)
        .arg("--hyperboxd")
        .arg(&hb.socket)
        .args(["--namespace", "tenant-a", &evil])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a pull of an image whose config lies succeeded: {said}");
    assert!(said.contains("but the image config says its diff_id is"), "{said}");
    assert!(hb.log().contains("makes chain id"), "{}", hb.log());
    // Only the busybox layer was mounted (it may be gone already: the failed
    // pull's lease went, and containerd's gc may have removed it).
    assert_eq!(hb.log().matches("remote layer ready").count(), 1, "{}", hb.log());

    // Another tenant pulls the good image: its own files.
    let out = hyperbox_pull(&hb, &ctd, "tenant-b", &good);
    assert!(out.contains("2 lazy, 0 downloaded"), "{out}");
    let out =
        run(ctd.ctr_in("tenant-b").args(["run", "--rm", "--snapshotter", "hyperbox", &good, "c1", "cat", "/data/who"]));
    assert_eq!(out, "genuine\n");
}
