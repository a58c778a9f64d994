//! The node: hyperboxd's parts, wired once, and the services it serves.
//!
//! A [`Node`] owns the parts (the store, the fetcher, the trace recorder,
//! the prefetcher and the snapshotter over them); [`serve`] serves
//! containerd's Snapshots API and the admin API on a unix listener until a
//! shutdown future resolves; [`metrics::serve`] serves `/metrics`. [`run`]
//! is hyperboxd: a runtime, a node, its listener (systemd's or its own),
//! sd_notify READY and STOPPING, and on SIGTERM or SIGINT the calls in
//! progress finish and the FUSE layers are unmounted. The binary only parses
//! flags, sets up logging and calls [`run`]; tests build a node and serve it
//! on a socket of their own, in process.

pub mod admin;
pub mod cri;
pub mod fdstore;
pub mod listen;
pub mod metrics;
pub mod snapshots;
pub mod status;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use fdstore::{KeepMode, Keeper};

use crate::config::Config;
use crate::fetcher::Fetcher;
use crate::mount::MountOptions;
use crate::prefetch::Prefetcher;
use crate::registry::{Client, RegistryError};
use crate::snapshotter::{self, Parts, SnapshotError, Snapshotter};
use crate::store::{Store, StoreError};
use crate::trace::Recorder;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("daemon.metrics_address {address:?}: {source}")]
    MetricsAddress { address: String, source: std::net::AddrParseError },
    #[error("{} is in use: is another hyperboxd running?", .0.display())]
    InUse(PathBuf),
    #[error("serving the Snapshots API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl DaemonError {
    /// `map_err(DaemonError::io(what))`: an I/O error, saying what failed.
    pub fn io(what: String) -> impl FnOnce(std::io::Error) -> DaemonError {
        move |source| DaemonError::Io { what, source }
    }
}

/// One node's parts. The snapshotter uses the others; the admin API and
/// the metrics read them all.
pub struct Node {
    pub config: Config,
    pub store: Arc<Store>,
    pub fetcher: Fetcher,
    pub recorder: Option<Recorder>,
    pub prefetcher: Prefetcher,
    pub snapshotter: Arc<Snapshotter>,
    /// What `hyperbox pull` must put in its labels to be believed
    /// (`crate::labels::Trust`): random, made at each start, given only
    /// over the admin socket.
    pub pull_token: String,
    /// Credentials CRI pulls brought through the image service proxy.
    pub keychain: Arc<cri::Keychain>,
}

impl Node {
    /// Make `daemon.root` (0700, as containerd's snapshotters), open the store, build the parts, load the
    /// snapshots and mount their remote layers again, and start the gc that
    /// follows removals. Call from outside the runtime `rt` belongs to.
    pub fn open(config: Config, rt: &tokio::runtime::Handle) -> Result<Node, DaemonError> {
        let root = config.daemon.root.clone();
        let io = DaemonError::io;
        std::fs::create_dir_all(&root).map_err(io(format!("create {}", root.display())))?;
        // Only root walks into it: the layers' mounts, the containers' upper
        // dirs and the store are below. Also tightens an older root (0711).
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", root.display())))?;
        // First: the kept connections come back before anything is mounted.
        let keep = open_keeper(&config);
        let store = Arc::new(Store::open(&root.join("store"), &config.store)?);
        let client = Arc::new(Client::new(&config.registry, false)?);
        // Before the layers are mounted again: they may need these to fetch.
        let keychain = Arc::new(cri::Keychain::open(&root.join("cri-credentials.json"), client.clone()));
        let fetcher = Fetcher::new(client, store.clone(), config.fetch.clone());
        let recorder = config.trace.enabled.then(|| Recorder::start(store.clone(), config.trace.clone(), rt));
        let prefetcher =
            Prefetcher::new(fetcher.clone(), store.clone(), recorder.clone(), config.prefetch.clone(), rt.clone());
        let pull_token = new_token();
        let opts = snapshotter::Options {
            pull_token: pull_token.clone(),
            max_layers: config.daemon.max_layers,
            max_index_memory: config.daemon.max_index_memory_mb.saturating_mul(1 << 20),
            root: root.clone(),
            fuse: MountOptions { threads: config.daemon.fuse_threads, read_ahead_kb: config.daemon.fuse_read_ahead_kb },
        };
        let parts = Parts {
            store: store.clone(),
            fetcher: fetcher.clone(),
            recorder: recorder.clone(),
            prefetcher: prefetcher.clone(),
            rt: rt.clone(),
            keep,
        };
        let snapshotter = Arc::new(Snapshotter::open(opts, parts)?);
        if config.store.gc_after_remove_secs > 0 {
            let delay = Duration::from_secs(config.store.gc_after_remove_secs);
            rt.spawn(snapshotter::auto_gc(Arc::downgrade(&snapshotter), delay));
        }
        tracing::info!(root = %root.display(), layers = snapshotter.mounted_layers(), "snapshots loaded");
        Ok(Node { config, store, fetcher, recorder, prefetcher, snapshotter, pull_token, keychain })
    }

    /// Stop serving layers: save the traces being recorded, and leave the
    /// remote layers whose connections are kept mounted for the next
    /// hyperboxd (the reads in progress answered first, for at most
    /// [`STOP_GRACE`]); unmount the others. Call from outside the runtime.
    pub fn close(&self) {
        tracing::info!(layers = self.snapshotter.mounted_layers(), "stopping");
        self.snapshotter.stop(STOP_GRACE);
    }
}

/// How long a stop waits for the layers' reads in progress.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

impl snapshotter::keep::FdKeeper for Keeper {
    fn put(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        Keeper::put(self, name, fd)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        Keeper::remove(self, name)
    }
}

/// Where the layers' FUSE connections are kept across restarts
/// (`daemon.keep_fds`), with what an earlier hyperboxd kept. A keeper that
/// cannot be had is logged and the daemon runs without (its layers are
/// unmounted when it stops, and break if it dies), rather than not at all.
fn open_keeper(config: &Config) -> Option<snapshotter::keep::Keep> {
    let socket = config.daemon.holder_socket();
    let opened = Keeper::open(config.daemon.keep_fds, &socket).and_then(|mut k| {
        let kept = k.take_kept()?;
        Ok((k, kept))
    });
    match opened {
        Ok((keeper, kept)) => {
            if keeper.mode() == KeepMode::Off {
                return None;
            }
            tracing::info!(keeper = %keeper.mode(), kept = kept.len(), "layer connections are kept across restarts");
            Some(snapshotter::keep::Keep { keeper: Arc::new(keeper), kept: kept.into_iter().collect() })
        }
        Err(e) => {
            tracing::error!(
                mode = %config.daemon.keep_fds,
                socket = %socket.display(),
                error = %e,
                "cannot keep layer connections: a restart of hyperboxd will break running containers' lazy layers"
            );
            None
        }
    }
}

/// 128 bits from the OS's random source, as hex.
fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Serve containerd's Snapshots API and the admin API on `listener` until
/// `shutdown` resolves; calls in progress then finish.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let snapshots = containerd_snapshots::server(Arc::new(snapshots::Service(node.snapshotter.clone())));
    tonic::transport::Server::builder()
        .add_service(snapshots)
        .add_service(admin::server(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// hyperboxd: serve `config` until SIGTERM or SIGINT, then unmount.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hyperboxd")
        .build()
        .map_err(DaemonError::io("start the runtime".into()))?;
    let node = Arc::new(Node::open(config, rt.handle())?);
    let metrics = metrics_listener(&node.config.daemon.metrics_address)?
        .map(|listener| rt.spawn(metrics::serve(node.clone(), listener, std::future::pending())));
    let cri = &node.config.cri;
    let cri_proxy = if cri.image_service_address.as_os_str().is_empty() {
        None
    } else {
        let _entered = rt.enter();
        let listener = listen::own_socket(&cri.image_service_address)?;
        tracing::info!(
            address = %cri.image_service_address.display(),
            containerd = %cri.containerd_address.display(),
            "serving the CRI image service proxy"
        );
        let served =
            cri::serve(listener, cri.containerd_address.clone(), node.keychain.clone(), std::future::pending());
        let proxy = rt.spawn(async move {
            if let Err(e) = served.await {
                tracing::error!(error = %e, "the CRI image service proxy stopped");
            }
        });
        Some((proxy, cri.image_service_address.clone()))
    };
    let served = rt.block_on(async {
        let address = &node.config.daemon.address;
        let (listener, owned) = listen::listen(address)?;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(address = %address.display(), activated = owned.is_none(), "serving");
        let served = serve(node.clone(), listener, listen::shutdown_signal()).await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if let Some(path) = owned {
            let _ = std::fs::remove_file(path);
        }
        served
    });
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some((proxy, socket)) = cri_proxy {
        proxy.abort();
        let _ = std::fs::remove_file(socket);
    }
    node.close();
    rt.shutdown_timeout(Duration::from_secs(5));
    served
}

/// The metrics listener, if `address` names one. A port that cannot be
/// bound is logged and skipped: the snapshotter matters more than its
/// metrics. A malformed address is a config error.
fn metrics_listener(address: &str) -> Result<Option<std::net::TcpListener>, DaemonError> {
    if address.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr =
        address.parse().map_err(|source| DaemonError::MetricsAddress { address: address.to_string(), source })?;
    let bound = std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l));
    match bound {
        Ok(l) => {
            tracing::info!(address = %addr, "serving /metrics and /healthz");
            Ok(Some(l))
        }
        Err(e) => {
            tracing::error!(address = %addr, error = %e, "cannot serve metrics");
            Ok(None)
        }
    }
}
