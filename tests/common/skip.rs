//! A missing prerequisite, with one meaning in every test target of the
//! workspace:
//!
//! - `HYPERBOX_REQUIRE_E2E=1` (what `make test` and CI set, since they install
//!   everything first): the test fails, saying what is missing.
//! - unset, or any other value: the test prints `SKIPPED <test>: <reason>`
//!   and returns.
//!
//! One file, compiled into `tests/common` (the integration tests, and the
//! benches that include it) and, through `#[path]`, into the fuse/ crate's
//! unit tests. So it uses std alone.

use std::path::{Path, PathBuf};

/// The variable that turns a missing prerequisite into a failure.
pub const REQUIRE_E2E: &str = "HYPERBOX_REQUIRE_E2E";

/// Whether a missing prerequisite fails the test (`HYPERBOX_REQUIRE_E2E=1`).
pub fn required() -> bool {
    std::env::var_os(REQUIRE_E2E).is_some_and(|v| v == "1")
}

/// `test` cannot run, for `why`: panic if prerequisites are required, else
/// print `SKIPPED <test>: <why>`. The line goes straight to the process's
/// stderr, past the test harness's capture, so a skip shows in the output of
/// `cargo test` instead of passing unseen.
#[track_caller]
pub fn skip(test: &str, why: &str) {
    if required() {
        panic!("{test}: {why} ({REQUIRE_E2E}=1, so a missing prerequisite fails the test; `make deps` installs them)");
    }
    use std::io::Write;
    // One write, so the line stays whole among the harness's own output;
    // a failed write to stderr has nowhere to be reported.
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {why}\n").as_bytes());
}

/// A prerequisite of a test.
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Running as root (mounts, mknod, setcap, containerd).
    Root,
    /// A program on PATH, or in /usr/sbin or /sbin.
    Tool(&'a str),
    /// A file or device, e.g. /dev/fuse.
    Path(&'a str),
}

/// Whether everything `test` needs is here; if not, [`skip`] (which fails
/// the test when prerequisites are required) and false.
#[track_caller]
pub fn have(test: &str, needs: &[Need]) -> bool {
    let mut missing = Vec::new();
    for need in needs {
        match *need {
            Need::Root if !is_root() => missing.push("root (not running as root)".to_string()),
            Need::Tool(t) if which(t).is_none() => missing.push(match std::env::var(CONTAINERD_DIR) {
                Ok(dir) if CONTAINERD_TOOLS.contains(&t) => format!("{t} (in {CONTAINERD_DIR}={dir})"),
                _ => t.to_string(),
            }),
            Need::Path(p) if !Path::new(p).exists() => missing.push(p.to_string()),
            _ => {}
        }
    }
    if missing.is_empty() {
        return true;
    }
    skip(test, &format!("missing {}", missing.join(", ")));
    false
}

/// Root and every one of `tools`: see [`have`].
#[track_caller]
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let needs: Vec<Need> = std::iter::once(Need::Root).chain(tools.iter().map(|t| Need::Tool(t))).collect();
    have(test, &needs)
}

/// The variable naming the bin dir of the containerd under test (`make
/// test` runs the containerd tests once per version, unpacked by
/// scripts/deps.sh); unset: the containerd in PATH.
pub const CONTAINERD_DIR: &str = "HYPERBOX_CONTAINERD_DIR";

/// The programs that come from [`CONTAINERD_DIR`] when it is set.
const CONTAINERD_TOOLS: [&str; 3] = ["containerd", "ctr", "containerd-shim-runc-v2"];

/// Where `tool` is: PATH, then /usr/sbin and /sbin. containerd, ctr and the
/// runc shim come from [`CONTAINERD_DIR`] alone when it is set, so a test
/// never mixes two containerd versions.
pub fn which(tool: &str) -> Option<PathBuf> {
    if CONTAINERD_TOOLS.contains(&tool) {
        if let Some(dir) = std::env::var_os(CONTAINERD_DIR).filter(|d| !d.is_empty()) {
            return Some(Path::new(&dir).join(tool)).filter(|p| p.is_file());
        }
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { geteuid() == 0 }
}
