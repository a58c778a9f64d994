//! Helpers shared by the integration tests: prerequisite checks, and real
//! processes (a `docker-registry`, a containerd) that live in a temp dir and
//! are stopped by process id when the test ends, whether it passed or not.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a missing prerequisite fails the test (as `make test` and CI ask,
/// since they install everything) or skips it with a printed reason.
fn prerequisites_required() -> bool {
    std::env::var_os("HYPERBOX_REQUIRE_E2E").is_some_and(|v| v == "1")
}

/// Returns false (after printing why) when a test must be skipped.
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    let root = unsafe { libc_geteuid() } == 0;
    if missing.is_empty() && root {
        return true;
    }
    let why = if !root {
        "not running as root".to_string()
    } else {
        format!("missing {}", missing.join(", "))
    };
    if prerequisites_required() {
        panic!("{test}: {why} (HYPERBOX_REQUIRE_E2E=1; run `make deps`)");
    }
    eprintln!("SKIPPED {test}: {why}; `make test` installs the prerequisites");
    false
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Run a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
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
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            panic!("{what} did not come up within {timeout:?}");
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
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
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
pub struct Registry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    _daemon: Daemon,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
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
        let daemon = Daemon {
            child,
            name: "docker-registry",
        };
        wait_until("docker-registry", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry {
            addr,
            dir,
            _daemon: daemon,
        }
    }

    /// The registry's log: one access-log line per request, with status and bytes.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

/// A containerd with its own root, state and socket in a temp dir.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    daemon: Option<Daemon>,
}

impl Containerd {
    /// `extra` is appended to the version 2 config (e.g. a proxy_plugins entry).
    pub fn start(extra: &str) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
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
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new(which("containerd").expect("containerd"))
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            dir,
            socket,
            daemon: Some(Daemon {
                child,
                name: "containerd",
            }),
        };
        wait_until("containerd", Duration::from_secs(30), || {
            c.socket.exists()
                && c.ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        c
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new(which("ctr").expect("ctr"));
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg("hyperbox-test");
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
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
    }
}
