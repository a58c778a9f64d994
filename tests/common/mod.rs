//! Helpers shared by the integration tests: prerequisite checks (skip.rs),
//! test layers (`hyperbox::testing`), and real processes (a `docker-registry`, a
//! containerd) that live in a temp dir and are stopped by process id when the
//! test ends, whether it passed or not.
#![allow(dead_code)]

pub mod cri;
pub mod faultproxy;
pub mod skip;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use hyperbox::testing::{Layer, LayerBuilder};
#[allow(unused_imports)]
pub use skip::{have, have_tools, skip, which, Need};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Run a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `hyperbox` CLI built for this test run.
pub fn hyperbox() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hyperbox"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed by pid when dropped.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `docker-registry` (CNCF distribution) on 127.0.0.1, storing in a temp dir.
/// Fields drop in order: the daemon stops before its dirs are removed.
pub struct Registry {
    pub addr: String,
    _daemon: Daemon,
    pub dir: tempfile::TempDir,
    /// The htpasswd file's dir ([`Registry::start_with_auth`]), removed
    /// once the registry has stopped.
    _auth: Option<tempfile::TempDir>,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("")
    }

    /// A registry that demands basic auth for `user`/`password` (htpasswd).
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let out = run(Command::new("htpasswd").args(["-Bbn", user, password]));
        std::fs::write(&file, out).unwrap();
        let mut reg =
            Self::start_with(&format!("auth:\n  htpasswd:\n    realm: hyperbox-test\n    path: {}\n", file.display()));
        reg._auth = Some(dir);
        reg
    }

    fn start_with(extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{extra}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(which("docker-registry").expect("docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let daemon = Daemon { child, name: "docker-registry" };
        wait_until("docker-registry", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).is_ok());
        Registry { addr, _daemon: daemon, dir, _auth: None }
    }

    /// The registry's log: one access-log line per request, with status and
    /// bytes. Tests count requests in it (some expect none), so a log that
    /// cannot be read fails the test rather than reading as no requests.
    pub fn log(&self) -> String {
        let path = self.dir.path().join("registry.log");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// The containerd the tests run: its `containerd --version` line, and the
/// major and minor version read from it. With `HYPERBOX_CONTAINERD_DIR` set
/// (the matrix in `make test`), containerd, ctr and the runc shim come from
/// that dir; else from PATH (see `skip::which`).
pub struct ContainerdVersion {
    pub line: String,
    pub major: u32,
    pub minor: u32,
}

impl ContainerdVersion {
    /// `1.7.24~ds1`, `2.1.9+unknown`: the version word of the line.
    pub fn version(&self) -> &str {
        self.line.split_whitespace().nth(2).unwrap_or(&self.line)
    }
}

pub fn containerd_version() -> &'static ContainerdVersion {
    static VERSION: std::sync::OnceLock<ContainerdVersion> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let bin = which("containerd").expect("containerd");
        let line = run(Command::new(&bin).arg("--version")).trim().to_string();
        // containerd github.com/containerd/containerd/v2 2.1.9+unknown <commit>
        let word = line.split_whitespace().nth(2).unwrap_or("");
        let mut parts = word.trim_start_matches('v').split(['.', '~', '+', '-']).map(|n| n.parse::<u32>());
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            panic!("cannot read a version in `{} --version`: {line}", bin.display())
        };
        ContainerdVersion { line, major, minor }
    })
}

/// The config file's snippet for the proxy snapshotter at `socket`, for the
/// containerd under test: `packaging/containerd/hyperbox-v2.toml` (1.x) or
/// `hyperbox-v3.toml` (2.x) as shipped, its `version` line dropped and the
/// address made `socket`. With `cri`, the CRI image settings too (they make
/// CRI use hyperbox); without, only the proxy plugin and (2.x) the transfer
/// service's settings.
pub fn shipped_containerd_snippet(socket: &Path, cri: bool) -> String {
    let file = if containerd_version().major >= 2 { "hyperbox-v3.toml" } else { "hyperbox-v2.toml" };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/containerd").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    value.remove("version");
    let hb = value
        .get_mut("proxy_plugins")
        .and_then(|p| p.get_mut("hyperbox"))
        .and_then(|h| h.as_table_mut())
        .unwrap_or_else(|| panic!("{} has no [proxy_plugins.hyperbox]", path.display()));
    hb.insert("address".into(), socket.display().to_string().into());
    if !cri {
        if let Some(plugins) = value.get_mut("plugins").and_then(|p| p.as_table_mut()) {
            plugins.remove("io.containerd.grpc.v1.cri");
            plugins.remove("io.containerd.cri.v1.images");
        }
    }
    toml::to_string(&value).unwrap()
}

/// A containerd with its own root, state and socket in a temp dir.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    daemon: Option<Daemon>,
}

impl Containerd {
    /// `extra` is appended to the config (e.g. a proxy_plugins entry), whose
    /// version (2 for containerd 1.x, 3 for 2.x) is [`Containerd::config_version`].
    /// The CRI plugin is disabled.
    pub fn start(extra: &str) -> Containerd {
        Self::start_with(extra, false)
    }

    /// The config version the tests write for the containerd under test.
    pub fn config_version() -> u32 {
        if containerd_version().major >= 2 {
            3
        } else {
            2
        }
    }

    /// With `cri`, the CRI plugin runs (its images in namespace `k8s.io`).
    pub fn start_with(extra: &str, cri: bool) -> Containerd {
        Self::start_config(Self::config_version(), extra, cri)
    }

    /// With a config of `version` (2 or 3) whatever the containerd: a
    /// containerd 2 reads a version 2 config too, as a node upgraded from 1.x
    /// keeps it.
    pub fn start_config(version: u32, extra: &str, cri: bool) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        let ver = containerd_version();
        // containerd 2 runs the CRI as three plugins, and starts NRI, whose
        // socket (/var/run/nri/nri.sock) is one for the machine.
        let mut disabled = Vec::new();
        if !cri {
            disabled.push("io.containerd.grpc.v1.cri");
            if ver.major >= 2 {
                disabled.extend(["io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"]);
            }
        }
        if ver.major >= 2 {
            disabled.push("io.containerd.nri.v1.nri");
        }
        let disabled = disabled.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            &config,
            format!(
                r#"version = {version}
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
{extra}
"#,
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = socket.display(),
                opt = d.join("opt").display(),
            ),
        )
        .unwrap();
        // Shown with the output of a test that fails: which containerd it ran.
        eprintln!("containerd under test: {} (config version {version})", ver.line);
        let mut c = Containerd { dir, socket, daemon: None };
        c.launch();
        c
    }

    /// The containerd under test, for messages: `containerd 2.1.9+unknown`.
    pub fn version(&self) -> String {
        format!("containerd {}", containerd_version().version())
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("containerd.log")).unwrap();
        let bin = which("containerd").expect("containerd");
        // containerd finds its shim (containerd-shim-runc-v2) through PATH:
        // the one next to this containerd first.
        let path = format!(
            "{}:{}",
            bin.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let child = Command::new(&bin)
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.daemon = Some(Daemon { child, name: "containerd" });
        let started = Instant::now();
        while !(self.socket.exists()
            && self
                .ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
        {
            if let Some(Ok(Some(status))) = self.daemon.as_mut().map(|d| d.child.try_wait()) {
                panic!("{} exited with {status}:\n{}", self.version(), self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{} did not start:\n{}", self.version(), self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop containerd (SIGTERM) and start it again on the same state.
    pub fn restart(&mut self) {
        self.daemon.take();
        let _ = std::fs::remove_file(&self.socket);
        self.launch();
    }

    /// `ctr` in the tests' namespace, `hyperbox-test`.
    pub fn ctr(&self) -> Command {
        self.ctr_in("hyperbox-test")
    }

    /// `ctr` in namespace `ns`.
    pub fn ctr_in(&self, ns: &str) -> Command {
        let mut c = Command::new(which("ctr").expect("ctr"));
        c.arg("--address").arg(&self.socket).arg("--namespace").arg(ns);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.daemon.take();
        // Leave no mounts behind under the temp dir before it is removed.
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut points: Vec<&str> =
                mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&root)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
    }
}

/// A `hyperboxd` built for this test run, on its own root and socket.
pub struct Hyperboxd {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    daemon: Option<Daemon>,
    /// The binary started (another build of it, for an upgrade).
    binary: PathBuf,
}

impl Hyperboxd {
    /// `config` is the TOML config file's text.
    pub fn start(dir: &Path, config: &str) -> Hyperboxd {
        let root = dir.join("hyperbox-root");
        let socket = dir.join("hyperbox.sock");
        let cfg = dir.join("hyperbox.toml");
        std::fs::write(&cfg, config).unwrap();
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_hyperboxd"));
        let mut h = Hyperboxd { root, socket, config: cfg, daemon: None, binary };
        h.launch();
        h
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "hyperbox=debug,hyperboxd=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hyperboxd");
        let mut daemon = Daemon { child, name: "hyperboxd" };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("hyperboxd exited with {status}:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "hyperboxd did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(daemon);
    }

    fn log_path(&self) -> PathBuf {
        self.socket.with_extension("log")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: no cleanup at all, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.child.kill().unwrap();
            d.child.wait().unwrap();
            std::mem::forget(d);
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut d = self.daemon.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(d.child.id().to_string()).status();
        let status = d.child.wait().unwrap();
        std::mem::forget(d);
        status
    }

    pub fn restart(&mut self) {
        assert!(self.daemon.is_none(), "stop or kill first");
        self.launch();
    }

    /// Start `binary` from the next (re)start on: an upgrade.
    pub fn use_binary(&mut self, binary: &Path) {
        self.binary = binary.to_path_buf();
    }

    /// FUSE layer mounts under the root, from /proc/self/mountinfo.
    pub fn fuse_mounts(&self) -> Vec<PathBuf> {
        hyperbox::mount::stale_mounts(&self.root).unwrap()
    }

    /// The `[proxy_plugins]` entry for containerd's config, as we ship it
    /// for the containerd under test (2.x: with the transfer service's
    /// settings), without the CRI settings.
    pub fn proxy_plugin(&self) -> String {
        shipped_containerd_snippet(&self.socket, false)
    }

    /// The proxy plugin and the CRI settings that make CRI pulls lazy, as we
    /// ship them for the containerd under test.
    pub fn cri_config(&self) -> String {
        shipped_containerd_snippet(&self.socket, true)
    }
}

impl Drop for Hyperboxd {
    fn drop(&mut self) {
        self.daemon.take();
        for m in hyperbox::mount::stale_mounts(&self.root).unwrap_or_default() {
            let _ = hyperbox::mount::detach(&m);
        }
        kill_fd_holders(&self.root);
    }
}

/// Kill the fd holders (`hyperboxd fd-holder`) serving daemons on `root`:
/// they outlive their daemon on purpose.
pub fn kill_fd_holders(root: &Path) {
    let root = root.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("fd-holder") && cmd.contains(&root) {
            // SAFETY: a plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Bytes the registry sent for blob GETs (its access log), and how many.
/// A blob GET line it cannot read fails the test: tests expect zero of these
/// as often as more, and a log format it misread would give zero.
pub fn blob_bytes_served(log: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut n = 0;
    for l in log.lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")) {
        // ... "GET /v2/x/blobs/sha256:.. HTTP/1.1" 206 12345 "referer" "agent"
        let fields = l.split("HTTP/1.1\" ").nth(1).map(|after| {
            let mut f = after.split(' ');
            (f.next().unwrap_or(""), f.next().unwrap_or(""))
        });
        let Some((status, size)) = fields.filter(|(s, _)| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit())) else {
            panic!("a blob GET without a status in the registry's log: {l}")
        };
        if status.starts_with('2') {
            bytes += size.parse::<u64>().unwrap_or_else(|_| panic!("a blob GET without a size: {l}"));
            n += 1;
        }
    }
    (bytes, n)
}

/// Convert the OCI layout's `v1` image and push it as `dst`.
pub fn convert_to(layout: &Path, dst: &str) {
    run(hyperbox().args(["convert", "-q", "--plain-http"]).arg(format!("oci:{}:v1", layout.display())).arg(dst));
}

/// The names of the hyperbox snapshots containerd lists in namespace `ns`.
pub fn snapshot_names(ctd: &Containerd, ns: &str) -> Vec<String> {
    let out = run(ctd.ctr_in(ns).args(["snapshot", "--snapshotter", "hyperbox", "ls"]));
    out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// Wait until containerd has redialled a restarted hyperboxd (it backs off).
/// A probe snapshot is prepared and removed: a call that must reach it (a
/// List in a namespace without snapshots never does).
pub fn wait_reconnected(ctd: &Containerd) {
    let mut n = 0;
    wait_until("containerd reconnected", Duration::from_secs(30), || {
        n += 1;
        let key = format!("probe-{n}");
        let ok = ctd
            .ctr_in("hyperbox-probe")
            .args(["snapshot", "--snapshotter", "hyperbox", "prepare", &key])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            run(ctd.ctr_in("hyperbox-probe").args(["snapshot", "--snapshotter", "hyperbox", "rm", &key]));
        }
        ok
    });
}

/// `hyperbox pull` into containerd `ctd`'s namespace `ns`, asking `hb` for
/// its pull token; returns what it printed.
pub fn hyperbox_pull(hb: &Hyperboxd, ctd: &Containerd, ns: &str, reference: &str) -> String {
    hyperbox_pull_with(hb, ctd, ns, reference, &[])
}

pub fn hyperbox_pull_with(hb: &Hyperboxd, ctd: &Containerd, ns: &str, reference: &str, flags: &[&str]) -> String {
    run(hyperbox().arg("pull").arg("--address").arg(&ctd.socket).arg("--hyperboxd").arg(&hb.socket).args(flags).args([
        "--namespace",
        ns,
        reference,
    ]))
}

/// Push the (single-manifest) image of an OCI layout to `dst` as it is.
pub fn push_layout(dir: &Path, dst: &str) {
    use hyperbox::registry::{BlobBody, Client, Reference, RegistryConfig};
    let r: Reference = dst.parse().unwrap();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest = read_blob(dir, &md);
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    blobs.extend(m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(&RegistryConfig::default(), true).unwrap();
        for b in blobs {
            let data = read_blob(dir, &b);
            c.push_blob(&r.repo, &b.parse().unwrap(), BlobBody::Bytes(&data)).await.unwrap();
        }
        c.put_manifest(&r.repo, &r.target(), &manifest, "application/vnd.oci.image.manifest.v1+json").await.unwrap();
    });
}

/// The host platform in OCI terms.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    hyperbox::digest::Digest::of(data).to_string()
}

/// Store a blob in the OCI layout `dir`; returns its digest.
pub fn put_blob(dir: &Path, data: &[u8]) -> String {
    let d = sha256(data);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
    d
}

/// Write an image (gzip layers) into the OCI layout `dir` under `tag`; with
/// `platforms` > 1, as a multi-platform index (the same layers for each).
/// Returns the manifest (or index) digest.
pub fn write_oci_image(dir: &Path, tag: &str, layers: &[Vec<u8>], cmd: &[&str], platforms: &[&str]) -> String {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let mut layer_descs = Vec::new();
    for l in layers {
        let gz = gzip(l);
        let d = put_blob(dir, &gz);
        layer_descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": gz.len()}));
    }
    let mut manifests = Vec::new();
    for arch in platforms {
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let cd = put_blob(dir, &config);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": layer_descs,
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let md = put_blob(dir, &manifest);
        manifests.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(), "platform": {"architecture": arch, "os": "linux"}}));
    }
    let (root_type, root_digest, root_size) = if manifests.len() == 1 {
        let m = manifests.pop().unwrap();
        (
            m["mediaType"].as_str().unwrap().to_string(),
            m["digest"].as_str().unwrap().to_string(),
            m["size"].as_u64().unwrap(),
        )
    } else {
        let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})).unwrap();
        ("application/vnd.oci.image.index.v1+json".to_string(), put_blob(dir, &index), index.len() as u64)
    };
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": root_type, "digest": root_digest, "size": root_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    root_digest
}

pub fn read_blob(dir: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(&digest[7..])).unwrap()
}

/// Edit the manifest of the (single) image in the OCI layout `dir`: the
/// edited manifest is stored and index.json points at it.
pub fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let old = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mut manifest: serde_json::Value = serde_json::from_slice(&read_blob(dir, &old)).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = put_blob(dir, &bytes).into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Count access-log lines of the registry matching all `needles`.
pub fn count_requests(log: &str, needles: &[&str]) -> usize {
    log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
}

/// Build a directory with every kind of entry a layer can carry, using real
/// tools (GNU coreutils, setcap, setfattr, mknod); whiteouts included.
pub fn make_fixture(root: &Path, chunk_max: u32) {
    let script = format!(
        r#"set -eu
cd "{root}"
mkdir -p dir/sub empty-dir opaque
printf 'hello world\n' > dir/hello.txt
: > dir/empty
head -c {chunk_max} /dev/urandom > exactly-chunk-max
head -c 3000000 /dev/urandom > large.bin
# a large file with repeated content: the same chunks twice
cat large.bin large.bin > large-twice.bin
ln -s hello.txt dir/link-to-hello
ln -s /nonexistent/target dangling
ln dir/hello.txt hardlink-to-hello
mknod chardev c 1 3
mknod blockdev b 7 0
mkfifo fifo
long=$(printf 'd%.0s' $(seq 1 120))
mkdir -p "$long/$long"
printf 'deep\n' > "$long/$long/$(printf 'f%.0s' $(seq 1 150))"
printf 'caps\n' > capfile
setcap cap_net_raw+ep capfile
setfattr -n user.color -v blue dir/hello.txt
setfattr -n trusted.overlay.opaque -v y opaque || true
: > dir/.wh.deleted
: > opaque/.wh..wh..opq
# sparse: holes at the start, middle and end
truncate -s 8M sparse
printf 'middle' | dd of=sparse bs=1 seek=4194304 conv=notrunc status=none
printf 'start' | dd of=sparse bs=1 seek=65536 conv=notrunc status=none
# more data segments than the 4 a GNU header holds: extension blocks follow it
truncate -s 2M sparse-many
for i in $(seq 0 9); do printf 'segment %d' $i | dd of=sparse-many bs=1 seek=$((i * 200000 + 4096)) conv=notrunc status=none; done
touch -d '2001-02-03 04:05:06.789' dir/hello.txt
chown 1234:5678 dir/hello.txt
chmod 4755 large.bin
"#,
        root = root.display()
    );
    run(Command::new("bash").arg("-c").arg(script));
}

/// A minimal Debian bookworm root filesystem (debootstrap's minbase), built
/// once and kept in `$HYPERBOX_TEST_CACHE` (default /var/tmp/hyperbox-test-cache)
/// so later runs reuse it. `include` lists extra packages; each set has its
/// own directory. Built in a scratch dir and renamed into place, so a run
/// that dies half way leaves nothing a later run would trust.
pub fn debian_rootfs(include: &[&str]) -> PathBuf {
    let cache = std::env::var_os("HYPERBOX_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/hyperbox-test-cache"));
    let name =
        if include.is_empty() { "bookworm-minbase".to_string() } else { format!("bookworm-{}", include.join("-")) };
    let dir = cache.join(&name);
    if dir.join("etc/debian_version").is_file() {
        return dir;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let scratch = cache.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    // Options before the suite: debootstrap reads the first word that is
    // not an option as the suite, and the rest as target, mirror and script.
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg("bookworm").arg(&scratch).arg("http://deb.debian.org/debian");
    run(&mut cmd);
    // The downloaded .debs are not part of the image.
    for e in std::fs::read_dir(scratch.join("var/cache/apt/archives")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "deb") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    std::fs::rename(&scratch, &dir).unwrap();
    dir
}

/// `dir` as a tar layer, written by GNU tar with numeric owners and xattrs.
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let out = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Drop `path`'s pages from the page cache, so the next read reaches its
/// filesystem (through FUSE: hyperboxd).
pub fn drop_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a plain syscall on an fd this function owns.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise on {}", path.display());
}

/// The value of one series (`name` or `name{labels}`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?;
    line.split_whitespace().last()?.parse().ok()
}

/// A docker config dir (for `DOCKER_CONFIG`) in `dir`, with a login for
/// each `(registry, user, password)`: none makes a config without
/// credentials.
pub fn docker_config(dir: &Path, logins: &[(&str, &str, &str)]) -> PathBuf {
    use base64::Engine;
    let auths: serde_json::Map<String, serde_json::Value> = logins
        .iter()
        .map(|(registry, user, password)| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            (registry.to_string(), serde_json::json!({ "auth": auth }))
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::json!({ "auths": auths }).to_string()).unwrap();
    dir.to_path_buf()
}

/// `/metrics` of a daemon serving them at `address`.
pub fn scrape(address: &str) -> String {
    run(Command::new("curl").arg("-fsS").arg(format!("http://{address}/metrics")))
}

/// A daemon that restarted has fetched from its registry since, and no
/// fetch failed (counters start at zero with each process).
pub fn assert_fetched_since_start(metrics_address: &str) {
    let text = scrape(metrics_address);
    assert!(metric(&text, "hyperbox_fetch_bytes_total").unwrap_or(0.0) > 0.0, "nothing fetched since start: {text}");
    assert_eq!(metric(&text, "hyperbox_fetch_failures_total"), Some(0.0), "{text}");
}
