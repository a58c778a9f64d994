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
use hyperbox::mount::MountOptions;
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
        fuse: MountOptions { threads: cfg.daemon.fuse_threads, read_ahead_kb: cfg.daemon.fuse_read_ahead_kb },
        trace: cfg.trace.clone(),
        prefetch: cfg.prefetch.clone(),
    };
    let snapshotter = Arc::new(Snapshotter::open(opts, store, fetcher, rt.handle().clone())?);
    if cfg.store.gc_after_remove_secs > 0 {
        let delay = std::time::Duration::from_secs(cfg.store.gc_after_remove_secs);
        rt.spawn(hyperbox::snapshotter::auto_gc(Arc::downgrade(&snapshotter), delay));
    }
    tracing::info!(root = %root.display(), layers = snapshotter.mounted_layers(), "snapshots loaded");

    let metrics = if cfg.daemon.metrics_address.is_empty() {
        None
    } else {
        let addr: std::net::SocketAddr = cfg.daemon.metrics_address.parse().context("daemon.metrics_address")?;
        let _guard = rt.enter();
        match hyper::Server::try_bind(&addr) {
            Ok(server) => {
                tracing::info!(address = %addr, "serving /metrics and /healthz");
                Some(rt.spawn(serve_metrics(server, snapshotter.clone())))
            }
            // The snapshotter matters more than its metrics: keep going.
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot serve metrics");
                None
            }
        }
    };

    let served = rt.block_on(async {
        let (listener, owned) = listen(&cfg.daemon.address)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = containerd_snapshots::server(Arc::new(Service(snapshotter.clone())));
        let admin = hyperbox::admin::server(snapshotter.clone());
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
    if let Some(m) = metrics {
        m.abort();
    }
    tracing::info!(layers = snapshotter.mounted_layers(), "stopping: unmounting layers");
    snapshotter.unmount_all();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

async fn serve_metrics(server: hyper::server::Builder<hyper::server::conn::AddrIncoming>, snap: Arc<Snapshotter>) {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Response, StatusCode};
    let make = make_service_fn(move |_| {
        let snap = snap.clone();
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req: hyper::Request<Body>| {
                let snap = snap.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        // Off the runtime: it takes the snapshotter's locks,
                        // which a Prepare holds across a mount.
                        "/metrics" => match tokio::task::spawn_blocking(move || metrics_text(&snap)).await {
                            Ok(text) => (StatusCode::OK, text),
                            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")),
                        },
                        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                        _ => (StatusCode::NOT_FOUND, "try /metrics or /healthz\n".to_string()),
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Body::from(body))
                        .expect("a valid response");
                    Ok::<_, std::convert::Infallible>(resp)
                }
            }))
        }
    });
    if let Err(e) = server.serve(make).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// Every metric, from each module's counters (names in hyperbox::metrics).
fn metrics_text(snap: &Snapshotter) -> String {
    use hyperbox::metrics::*;
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Exposition::default();
    let f = snap.fetcher().stats();
    e.counter_by(
        FETCH_REQUESTS,
        "Registry range requests sent, tries included.",
        "priority",
        &[("demand", f.demand_requests), ("prefetch", f.prefetch_requests)],
    );
    e.counter(FETCH_BYTES, "Compressed bytes received from registries.", f.bytes);
    e.counter(FETCH_CHUNKS, "Chunks fetched, verified and stored.", f.chunks);
    e.counter(FETCH_RETRIES, "Tries after a failed one.", f.retries);
    e.counter(FETCH_ERRORS, "Failed tries (transport, status, protocol, verification).", f.errors);
    e.counter(FETCH_FAILURES, "Fetches that gave up (a demand read waiting on one gets EIO).", f.failures);
    e.counter(FETCH_VERIFY_FAILURES, "Fetched chunks that failed verification.", f.verify_failures);
    e.counter(FETCH_JOINED, "Reads that joined a fetch already in flight.", f.joined);
    e.counter(FRAME_CACHE_HITS, "Frames reads found in the frame cache, decompressed and verified.", f.cache_hits);
    e.histogram_by(
        FETCH_REQUEST_SECONDS,
        "Range request latency, sending to holding the whole body (failed tries included).",
        "priority",
        &snap.fetcher().request_latency(),
    );
    e.counter(
        FETCH_WAIT_SECONDS,
        "Seconds FUSE reads spent waiting on registry fetches.",
        snap.fetcher().wait_seconds(),
    );
    let live = snap.container_ids();
    let waits = hyperbox::mount::CONTAINER_WAITS.live(|id| live.contains(id));
    e.counter_by(
        CONTAINER_FETCH_WAIT_SECONDS,
        "Seconds the reads of a container's processes spent waiting on registry fetches (containers that waited).",
        "container",
        &waits.iter().map(|(id, s)| (id.as_str(), *s)).collect::<Vec<_>>(),
    );
    e.histogram_by(
        FUSE_OP_SECONDS,
        "FUSE request latency in hyperboxd, arrival to reply, by operation.",
        "op",
        &hyperbox::mount::FUSE_OPS.snapshot(),
    );
    let s = snap.store().stats();
    e.gauge(STORE_CHUNKS, "Chunks in the store.", s.chunks as f64);
    e.gauge(STORE_BYTES, "Bytes of stored chunks.", s.bytes as f64);
    e.counter(STORE_HITS, "Store lookups that found the chunk.", s.hits);
    e.counter(STORE_MISSES, "Store lookups that did not.", s.misses);
    e.counter(STORE_EVICTIONS, "Chunks evicted to stay within the budget.", s.evictions);
    e.counter(STORE_VERIFY_FAILURES, "Stored chunks that failed verification on read.", s.verify_failures);
    e.gauge(LAYERS_MOUNTED, "Remote layers mounted through FUSE.", snap.mounted_layers() as f64);
    let calls = hyperbox::snapshotter::grpc::CALL_COUNTS.snapshot();
    e.counter_by(
        SNAPSHOT_OPS,
        "Snapshots service calls from containerd.",
        "call",
        &calls.iter().map(|(c, n, _)| (*c, *n)).collect::<Vec<_>>(),
    );
    e.counter_by(
        SNAPSHOT_OP_ERRORS,
        "Snapshots service calls that failed (not found and already exists are answers, not failures).",
        "call",
        &calls.iter().map(|(c, _, n)| (*c, *n)).collect::<Vec<_>>(),
    );
    if let Some(r) = snap.recorder() {
        e.counter(TRACE_SESSIONS, "Container starts recorded.", r.stats.sessions.load(Relaxed));
        e.counter(TRACE_RUNS_MERGED, "Recorded starts merged into traces.", r.stats.runs_merged.load(Relaxed));
        e.counter(TRACE_REPORTS_DROPPED, "Read reports dropped on a full queue.", r.hook().dropped());
        e.counter(
            TRACE_EMPTY_RUNS,
            "Recorded starts that read nothing through FUSE.",
            r.stats.empty_runs.load(Relaxed),
        );
        e.counter(
            TRACE_SAVE_ERRORS,
            "Recorded starts whose trace could not be saved.",
            r.stats.save_errors.load(Relaxed),
        );
        e.counter(
            PREFETCH_JUDGED_READ,
            "Chunks read by starts that had a prefetch.",
            r.stats.judged_read.load(Relaxed),
        );
        e.counter(
            PREFETCH_JUDGED_PREFETCHED,
            "Chunks prefetched for starts that were judged.",
            r.stats.judged_prefetched.load(Relaxed),
        );
        e.counter(PREFETCH_JUDGED_HITS, "Chunks both prefetched and read.", r.stats.judged_hits.load(Relaxed));
        if let Some((p, rc)) = r.stats.last() {
            e.gauge(
                PREFETCH_LAST_PRECISION,
                "Of the chunks prefetched for the latest judged start, the share read.",
                p,
            );
            e.gauge(PREFETCH_LAST_RECALL, "Of the chunks the latest judged start read, the share prefetched.", rc);
        }
    }
    let p = &snap.prefetcher().stats;
    e.counter(PREFETCH_JOBS, "Prefetch jobs started (images with a trace, or hydrating).", p.jobs.load(Relaxed));
    e.counter(PREFETCH_BYTES, "Compressed bytes of traced chunks asked for.", p.bytes.load(Relaxed));
    e.counter(PREFETCH_ERRORS, "Prefetch fetches that failed.", p.errors.load(Relaxed));
    e.finish()
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
