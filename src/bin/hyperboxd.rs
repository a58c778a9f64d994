//! `hyperboxd`: the HyperBox snapshotter daemon. This file reads flags and
//! the config and sets up logging; the daemon is `hyperbox::daemon::run`.
//! `hyperboxd fd-holder` (hidden) is the process that keeps the daemon's
//! FUSE fds where systemd's fd store is not available
//! (`hyperbox::daemon::fdstore::holder`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hyperbox::config::Config;
use hyperbox::daemon::fdstore::holder;

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
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keep the daemon's FUSE fds across its restarts (started by
    /// hyperboxd itself when daemon.keep_fds chooses the holder).
    #[command(hide = true)]
    FdHolder {
        /// Its socket (daemon.fd_holder_socket).
        #[arg(long)]
        socket: PathBuf,
        /// Keep at most this many fds.
        #[arg(long, default_value_t = holder::DEFAULT_MAX_FDS)]
        max_fds: usize,
        /// Fork once listening; the first process exits 0, or 3 when
        /// another holder serves the socket.
        #[arg(long)]
        detach: bool,
    },
}

fn main() {
    // Everything the daemon creates is private unless it says otherwise
    // (RocksDB's files 0600, dirs 0700); set while this is the only thread.
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe { libc::umask(0o077) };
    hyperbox::mount::fix_mmap_threshold();
    let args = Args::parse();
    if let Some(Cmd::FdHolder { socket, max_fds, detach }) = args.command {
        std::process::exit(fd_holder(holder::HolderOptions { socket, max_fds, detach }));
    }
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

/// `hyperboxd fd-holder`: its exit status.
fn fd_holder(opts: holder::HolderOptions) -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    match holder::run(&opts) {
        Ok(()) => 0,
        Err(e @ holder::HolderError::AlreadyRunning(_)) => {
            tracing::info!("{e}");
            holder::EXIT_ALREADY_RUNNING
        }
        Err(e) => {
            tracing::error!("fd holder: {e}");
            1
        }
    }
}
