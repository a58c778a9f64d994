//! `hyperboxd`: the HyperBox snapshotter daemon. This file reads flags and
//! the config and sets up logging; the daemon is `hyperbox::daemon::run`.

use std::path::PathBuf;

use clap::Parser;
use hyperbox::config::Config;

#[derive(Parser)]
#[command(name = "hyperboxd", version, about = "HyperBox remote snapshotter daemon for containerd")]
struct Args {
    /// Config file (default /etc/hyperbox/config.toml, if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (overrides daemon.root; default /var/lib/hyperbox).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on (overrides daemon.address; default
    /// /run/hyperbox/hyperbox.sock). Ignored under socket activation.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Print the default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() {
    // Everything the daemon creates is private unless it says otherwise
    // (RocksDB's files 0600, dirs 0700); set while this is the only thread.
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe { libc::umask(0o077) };
    hyperbox::mount::fix_mmap_threshold();
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&Config::default()).expect("config serializes"));
        return;
    }
    let mut cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hyperboxd: {e}");
            std::process::exit(2);
        }
    };
    if let Some(r) = args.root {
        cfg.daemon.root = r;
    }
    if let Some(a) = args.address {
        cfg.daemon.address = a;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.daemon.log_level));
    // Under systemd, journald stamps each line itself.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    if journal {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    if let Err(e) = hyperbox::daemon::run(cfg) {
        tracing::error!("{e}");
        eprintln!("hyperboxd: {e}");
        std::process::exit(1);
    }
}
