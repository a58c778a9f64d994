//! systemd's fd store, under a real systemd: hyperboxd runs as a service of
//! a systemd 252 manager (the shipped hyperboxd.service and
//! hyperboxd.socket, with paths of the test's own), keeps its lazy layer's
//! /dev/fuse fd there (`FDSTORE=1`, `FDNAME=`, `FDPOLL=0`), and gets it back
//! in `LISTEN_FDS`/`LISTEN_FDNAMES` after `systemctl kill -s KILL` and after
//! `systemctl restart`; reads through the mount, with its page cache
//! dropped, keep working.
//!
//! PID 1 here may well not be systemd (a container, a CI sandbox), so the
//! manager is a user manager (`systemd --user`, as root: a real manager
//! with a real fd store; `FileDescriptorStoreMax=` works for user units),
//! confined so it touches nothing of the host:
//!
//! - its own cgroup2 subtree: `<cgroup2>/hb-systemd-<pid>/user@0.service`,
//!   in a cgroup namespace rooted at `hb-systemd-<pid>` with cgroup2 mounted
//!   afresh on /sys/fs/cgroup. A manager started in the host's root cgroup
//!   moves every process of it into `init.scope` and, when it exits, removes
//!   every empty cgroup of the host: never start one there. (Under cgroup
//!   v1 hybrid, only the cgroup2 hierarchy is given: the manager runs in
//!   unified mode and never touches the v1 controllers.)
//! - a private mount namespace, where /run/systemd/system exists (a user
//!   manager refuses to run unless the system was "booted with systemd").
//!   PID 1 makes /run/systemd/inaccessible/ (what `ProtectHome=` and the
//!   like mount over paths): made here as PID 1 would. / is shared in
//!   there, as PID 1 makes it. The layer mounts are made there: the test
//!   reads them through `nsenter -m`. containerd, outside, only calls the
//!   gRPC socket.
//!
//! Everything is killed (`cgroup.kill` of the subtree) and removed when the
//! test ends.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TEST: &str = "systemd_fd_store_keeps_a_lazy_layer_through_kill_and_restart";
const SYSTEMD: &str = "/lib/systemd/systemd";
const SERVICE: &str = "hyperboxd.service";

/// The cgroup2 hierarchy: /sys/fs/cgroup (unified) or its `unified` mount
/// (hybrid); `None` under v1 alone.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").is_file() && p.join("cgroup.subtree_control").is_file())
}

/// A systemd user manager (as root) in a mount and cgroup namespace of its
/// own, with its config, runtime dir and units in `dir`.
struct Manager {
    pid: u32,
    child: Option<std::process::Child>,
    /// `hb-systemd-<pid>`: the cgroup namespace's root.
    cgroup: PathBuf,
    runtime: PathBuf,
    log: PathBuf,
}

impl Manager {
    fn start(dir: &Path, units: &[(&str, String)]) -> Manager {
        let cg2 = cgroup2_root().expect("checked by the caller");
        let cgroup = cg2.join(format!("hb-systemd-{}", std::process::id()));
        std::fs::create_dir_all(cgroup.join("user@0.service")).unwrap();
        let runtime = dir.join("runtime");
        let config = dir.join("config");
        let unit_dir = config.join("systemd/user");
        std::fs::create_dir_all(&unit_dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        for (name, text) in units {
            std::fs::write(unit_dir.join(name), text).unwrap();
        }
        let log = dir.join("systemd.log");
        // Into the subtree, then new namespaces rooted there; every step
        // execs, so the child's pid is the manager's.
        let inner = "set -e\n\
            mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
            echo $$ > /sys/fs/cgroup/user@0.service/cgroup.procs\n\
            mount -t tmpfs -o mode=755 tmpfs /run/systemd\n\
            mkdir /run/systemd/system\n\
            i=/run/systemd/inaccessible\n\
            mkdir -m 0755 $i\n\
            mkdir -m 0 $i/dir\n\
            install -m 0 /dev/null $i/reg\n\
            mknod -m 0 $i/chr c 0 0\n\
            mknod -m 0 $i/blk b 0 0\n\
            mkfifo -m 0 $i/fifo\n\
            mount --make-rshared /\n\
            exec \"$0\" --user --log-target=console --log-level=info";
        let outer = format!(
            "set -e\necho $$ > {}/cgroup.procs\nexec unshare --mount --cgroup --propagation private -- sh -c '{}' {}",
            cgroup.display(),
            inner,
            SYSTEMD
        );
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(outer)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_CONFIG_HOME", &config)
            .env("HOME", dir)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start systemd --user");
        let mut m = Manager { pid: child.id(), child: Some(child), cgroup, runtime, log };
        let start = Instant::now();
        loop {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("systemd --user exited with {status}:\n{}", m.log());
            }
            let ready = m.systemctl(&["is-system-running"]).output().is_ok_and(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.contains("running") || s.contains("degraded")
            });
            if ready {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "systemd --user did not start:\n{}", m.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A command run in the manager's mount namespace.
    fn nsenter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid.to_string()).arg("-m").arg("--").arg(program);
        c
    }

    fn systemctl(&self, args: &[&str]) -> Command {
        let mut c = self.nsenter("systemctl");
        c.arg("--user").args(args).env("XDG_RUNTIME_DIR", &self.runtime);
        c
    }

    /// `systemctl --user ARGS`, failing with the unit's status, the
    /// manager's log and `log` (hyperboxd's) if it fails.
    fn must(&self, args: &[&str], log: &Path) {
        let out = self.systemctl(args).output().unwrap();
        if !out.status.success() {
            let status = self.systemctl(&["status", "--no-pager", "-l", SERVICE]).output().unwrap();
            panic!(
                "systemctl --user {args:?}: {}\n{}\nstatus:\n{}\nsystemd:\n{}\nhyperboxd:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&status.stdout),
                self.log(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    fn show(&self, property: &str) -> String {
        run(&mut self.systemctl(&["show", "--value", "-p", property, SERVICE])).trim().to_string()
    }

    /// The FUSE mounts under `root` in the manager's mount namespace (what
    /// containerd would see if the manager were the host's).
    fn fuse_mounts(&self, root: &Path) -> Vec<PathBuf> {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid)).unwrap();
        info.lines()
            .filter(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("fuse")))
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(root))
            .collect()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // Every process of the subtree (the manager, hyperboxd, anything it
        // started), then the subtree; the mount namespace (and the layer
        // mounts in it) goes with its last process.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Without cgroup.kill (before Linux 5.14): each process, by pid.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids: Vec<i32> = std::iter::once(self.cgroup.clone())
                .chain(walk(&self.cgroup))
                .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
                .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
                .collect();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: a plain syscall; these are the test's processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut dirs = walk(&self.cgroup);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The cgroups below `dir`, not `dir` itself.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
            out.push(e.path());
        }
    }
    out
}

/// The shipped unit with `key=` lines replaced (or added to `[Service]`):
/// `("ExecStart", Some(..))`, or removed: `("StateDirectory", None)`.
fn edit_unit(text: &str, section: &str, edits: &[(&str, Option<String>)]) -> String {
    let mut out = Vec::new();
    let mut done = vec![false; edits.len()];
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if let Some(i) = edits.iter().position(|(k, _)| *k == key && !line.starts_with('#')) {
            if let (Some(v), false) = (&edits[i].1, done[i]) {
                out.push(format!("{key}={v}"));
            }
            done[i] = true;
            continue;
        }
        out.push(line.to_string());
        if line.trim() == format!("[{section}]") {
            for (i, (k, v)) in edits.iter().enumerate() {
                if let (Some(v), false) = (v, text.lines().any(|l| l.split('=').next().unwrap_or("").trim() == *k)) {
                    out.push(format!("{k}={v}"));
                    done[i] = true;
                }
            }
        }
    }
    out.join("\n") + "\n"
}

fn wait_log(path: &Path, what: &str, count: usize) {
    wait_until(&format!("{count} × {what:?} in {}", path.display()), Duration::from_secs(30), || {
        std::fs::read_to_string(path).unwrap_or_default().matches(what).count() >= count
    });
}

#[test]
fn systemd_fd_store_keeps_a_lazy_layer_through_kill_and_restart() {
    if !have(
        TEST,
        &[
            Need::Root,
            Need::Path("/dev/fuse"),
            Need::Path(SYSTEMD),
            Need::Tool("systemctl"),
            Need::Tool("unshare"),
            Need::Tool("nsenter"),
            Need::Tool("containerd"),
            Need::Tool("ctr"),
            Need::Tool("docker-registry"),
        ],
    ) {
        return;
    }
    if cgroup2_root().is_none() {
        skip(TEST, "no cgroup2 hierarchy (/sys/fs/cgroup nor /sys/fs/cgroup/unified): a systemd manager needs one");
        return;
    }

    // A layer of a few files of random data, converted into a registry.
    use rand::RngCore;
    let mut rng = rand::thread_rng();
    let files: Vec<Vec<u8>> = (0..6)
        .map(|_| {
            let mut v = vec![0u8; 300 << 10];
            rng.fill_bytes(&mut v);
            v
        })
        .collect();
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let layout = dir.join("layout");
    let mut data = LayerBuilder::new().dir("data");
    for (i, f) in files.iter().enumerate() {
        data = data.file(&format!("data/f{i}"), 0o644, f);
    }
    write_oci_image(&layout, "v1", &[data.finish()], &["/bin/sh"], &[oci_arch()]);
    let dst = format!("{}/fdstore:v1", reg.addr);
    convert_to(&layout, &dst);

    // hyperboxd.service and hyperboxd.socket as shipped, but for paths: its
    // root, socket, config and log in the temp dir; no StateDirectory (the
    // root is not /var/lib/hyperbox).
    let root = dir.join("hyperbox-root");
    let socket = dir.join("hyperbox.sock");
    let config = dir.join("hyperbox.toml");
    let log = dir.join("hyperboxd.log");
    std::fs::write(
        &config,
        "version = 1\n[daemon]\nkeep_fds = \"systemd\"\nmetrics_address = \"\"\n[trace]\nenabled = false\n\
         [fetch]\nmax_request_bytes = 65536\n",
    )
    .unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let service = edit_unit(
        &std::fs::read_to_string(manifest.join("hyperboxd.service")).unwrap(),
        "Service",
        &[
            (
                "ExecStart",
                Some(format!(
                    "{} --root {} --address {} --config {}",
                    env!("CARGO_BIN_EXE_hyperboxd"),
                    root.display(),
                    socket.display(),
                    config.display()
                )),
            ),
            ("StateDirectory", None),
            ("StateDirectoryMode", None),
            ("Environment", Some("RUST_LOG=hyperbox=debug,hyperboxd=debug,info".into())),
            ("StandardOutput", Some(format!("append:{}", log.display()))),
            ("StandardError", Some(format!("append:{}", log.display()))),
            // The unit's network-online.target and containerd.service do
            // not exist in a user manager; harmless.
        ],
    );
    let socket_unit = edit_unit(
        &std::fs::read_to_string(manifest.join("hyperboxd.socket")).unwrap(),
        "Socket",
        &[("ListenStream", Some(socket.display().to_string()))],
    );
    let mgr = Manager::start(dir, &[("hyperboxd.service", service), ("hyperboxd.socket", socket_unit)]);
    mgr.must(&["start", "hyperboxd.socket", SERVICE], &log);
    assert_eq!(mgr.show("FileDescriptorStoreMax"), "4096", "{}", mgr.log());
    wait_log(&log, "layer connections are kept across restarts", 1);
    let first = std::fs::read_to_string(&log).unwrap();
    assert!(first.contains("keeper=systemd"), "{first}");

    // One lazy layer, mounted by a Prepare of containerd's (outside).
    let ctd = Containerd::start(&shipped_containerd_snippet(&socket, false));
    let out = run(hyperbox().arg("pull").arg("--address").arg(&ctd.socket).arg("--hyperboxd").arg(&socket).args([
        "--namespace",
        "hyperbox-test",
        &dst,
    ]));
    assert!(out.contains("1 lazy"), "{out}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let mounts = mgr.fuse_mounts(&root);
    assert_eq!(mounts.len(), 1, "one layer mounted in the manager's mount namespace: {mounts:?}\n{}", mgr.log());
    let mount = mounts[0].clone();

    // Every file, its page cache dropped first: the reads reach hyperboxd.
    let check = |when: &str| {
        let mut script = String::from("set -e\n");
        for i in 0..files.len() {
            let f = mount.join(format!("data/f{i}"));
            script.push_str(&format!("dd if={0} iflag=nocache count=0 status=none\nsha256sum {0}\n", f.display()));
        }
        let out = mgr.nsenter("sh").arg("-c").arg(&script).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{when}: reading the layer failed: {}\n{text}\nhyperboxd:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        for (i, f) in files.iter().enumerate() {
            let want = format!("{}  {}", &sha256(f)[7..], mount.join(format!("data/f{i}")).display());
            assert!(text.lines().any(|l| l == want), "{when}: data/f{i} differs:\n{text}");
        }
        eprintln!("{TEST}: {when}: {} files read through the layer mount, all correct", files.len());
    };
    check("before");

    // SIGKILL: Restart=always starts it again, and systemd hands the fd back.
    let pid1 = mgr.show("MainPID");
    mgr.must(&["kill", "-s", "KILL", SERVICE], &log);
    wait_until("hyperboxd restarted", Duration::from_secs(30), || {
        let p = mgr.show("MainPID");
        p != pid1
            && p != "0"
            && std::fs::read_to_string(&log).unwrap_or_default().matches("layer connections are kept").count() >= 2
    });
    wait_log(&log, "serving again the layers a previous hyperboxd left mounted", 1);
    let after_kill = std::fs::read_to_string(&log).unwrap();
    assert!(after_kill.contains("systemd passed stored fds"), "{after_kill}");
    assert_eq!(mgr.fuse_mounts(&root), vec![mount.clone()], "the same mount, not another");
    check("after systemctl kill -s KILL");

    // A graceful restart: SIGTERM, then a new start, the store kept.
    mgr.must(&["restart", SERVICE], &log);
    wait_log(&log, "serving again the layers a previous hyperboxd left mounted", 2);
    assert_eq!(mgr.fuse_mounts(&root), vec![mount.clone()], "the same mount, not another");
    check("after systemctl restart");

    let text = std::fs::read_to_string(&log).unwrap();
    for l in text.lines().filter(|l| {
        l.contains("layer connections are kept") || l.contains("serving again") || l.contains("systemd passed")
    }) {
        eprintln!("{TEST}: hyperboxd: {l}");
    }
    assert!(!text.contains("ERROR"), "hyperboxd logged errors:\n{text}");
    mgr.must(&["stop", SERVICE, "hyperboxd.socket"], &log);
    drop(ctd);
    drop(mgr);
    drop(reg);
}
