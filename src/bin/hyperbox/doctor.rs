//! `hyperbox doctor`: runs the library's node checks (`hyperbox::doctor`)
//! and prints one line per check, with the fix under each problem.

use std::path::PathBuf;

use anyhow::Result;

use hyperbox::doctor::{self, Outcome};

/// Check this node: FUSE, the kernel (what a hyperboxd restart needs of
/// it), overlayfs, containerd's config and plugin, and hyperboxd. Each
/// problem comes with its fix; exits 1 if any check fails.
#[derive(clap::Args)]
pub struct DoctorArgs {
    /// hyperboxd's socket.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
    address: PathBuf,
    /// containerd's socket.
    #[arg(long, env = "CONTAINERD_ADDRESS", default_value = "/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
}

/// Runs every check and prints them; exits the process with status 1 if
/// any failed.
pub fn run(args: DoctorArgs, rt: &tokio::runtime::Runtime) -> Result<()> {
    let DoctorArgs { address, containerd_address, containerd_config } = args;
    let mut checks = vec![doctor::fuse(), doctor::kernel(), doctor::request_timeouts(), doctor::overlay()];
    // Which containerd reads the config decides what it must say (1.x:
    // version 2; 2.x: version 3 and the transfer service's settings).
    let version = rt.block_on(doctor::containerd_version(&containerd_address));
    checks.extend(doctor::containerd_config(&containerd_config, &address, version.as_deref()));
    checks.push(rt.block_on(doctor::containerd_plugin(&containerd_address)));
    let daemon = rt.block_on(doctor::daemon(&address));
    let answers = daemon.outcome == Outcome::Ok;
    checks.push(daemon);
    if answers {
        checks.push(rt.block_on(doctor::fallbacks(&address)));
    }
    let mut failed = 0;
    for c in &checks {
        let mark = match c.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        println!("[{mark}] {:<18} {}", c.name, c.detail);
        if c.outcome != Outcome::Ok {
            for line in c.fix.lines() {
                println!("       {:<18} {line}", "");
            }
        }
        failed += (c.outcome == Outcome::Fail) as usize;
    }
    if failed > 0 {
        println!("\n{failed} check(s) failed");
        std::process::exit(1);
    }
    println!("\nall checks passed");
    Ok(())
}
