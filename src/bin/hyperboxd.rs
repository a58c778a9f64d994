//! `hyperboxd`: the HyperBox snapshotter daemon.
//!
//! Serves containerd's Snapshots API, and its own admin API beside it, on a
//! unix socket (a path, or the fd systemd passes under socket activation), tells systemd READY and
//! STOPPING, and on SIGTERM or SIGINT finishes the calls in progress,
//! unmounts its FUSE layers and exits.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hyperbox::config::Config;
use hyperbox::fetcher::Fetcher;
use hyperbox::registry::Client;
use hyperbox::snapshotter::{grpc::Service, Options, Snapshotter};
use hyperbox::store::Store;

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
    if let Err(e) = run(cfg) {
        tracing::error!("{e:#}");
        eprintln!("hyperboxd: {e:#}");
        std::process::exit(1);
    }
}

fn run(cfg: Config) -> Result<()> {
    let root = cfg.daemon.root.clone();
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod {}", root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("hyperboxd").build()?;
    let store = Arc::new(Store::open(&root.join("store"), &cfg.store)?);
    let client = Arc::new(Client::new(&cfg.registry, false)?);
    let fetcher = Fetcher::new(client, store.clone(), cfg.fetch.clone());
    let opts = Options {
        root: root.clone(),
        fuse_threads: cfg.daemon.fuse_threads,
        trace: cfg.trace.clone(),
        prefetch: cfg.prefetch.clone(),
    };
    let snapshotter = Arc::new(Snapshotter::open(opts, store, fetcher, rt.handle().clone())?);
    tracing::info!(root = %root.display(), layers = snapshotter.mounted_layers(), "snapshots loaded");

    let served = rt.block_on(async {
        let (listener, owned) = listen(&cfg.daemon.address)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = containerd_snapshots::server(Arc::new(Service(snapshotter.clone())));
        let admin = hyperbox::admin::server(snapshotter.store().clone());
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(address = %cfg.daemon.address.display(), activated = owned.is_none(), "serving");
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown_signal())
            .await
            .context("serving the Snapshots API")?;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if let Some(path) = owned {
            let _ = std::fs::remove_file(path);
        }
        anyhow::Ok(())
    });
    tracing::info!(layers = snapshotter.mounted_layers(), "stopping: unmounting layers");
    snapshotter.unmount_all();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

/// The listening socket: systemd's (socket activation) or our own at
/// `address`. Returns the path to remove at exit when we made it.
fn listen(address: &Path) -> Result<(tokio::net::UnixListener, Option<PathBuf>)> {
    use std::os::fd::FromRawFd;
    let fds: Vec<i32> = sd_notify::listen_fds().context("LISTEN_FDS")?.collect();
    if let Some(&fd) = fds.first() {
        if fds.len() > 1 {
            tracing::warn!(count = fds.len(), "systemd passed several sockets; serving on the first");
        }
        // SAFETY: systemd passed this fd to us and nothing else owns it.
        let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        l.set_nonblocking(true)?;
        return Ok((tokio::net::UnixListener::from_std(l)?, None));
    }
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            bail!("{} is in use: is another hyperboxd running?", address.display());
        }
        std::fs::remove_file(address).with_context(|| format!("remove stale socket {}", address.display()))?;
    }
    let l = tokio::net::UnixListener::bind(address).with_context(|| format!("listen on {}", address.display()))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))?;
    Ok((l, Some(address.to_path_buf())))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
