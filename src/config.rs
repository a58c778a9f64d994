//! The daemon's and CLI's configuration file (`/etc/hyperbox/config.toml`).
//!
//! Each module owns its section's struct; this module only composes them,
//! checks the version, and reports errors naming the file and field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fetcher::FetchConfig;
use crate::prefetch::PrefetchConfig;
use crate::registry::RegistryConfig;
use crate::store::StoreConfig;
use crate::trace::TraceConfig;

pub const DEFAULT_PATH: &str = "/etc/hyperbox/config.toml";
pub const CONFIG_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Version of this file's layout; only 1 exists.
    pub version: u32,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub fetch: FetchConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub trace: TraceConfig,
    #[serde(default)]
    pub prefetch: PrefetchConfig,
    #[serde(default)]
    pub cri: CriConfig,
}

/// The `[cri]` section: the CRI image service proxy that brings Kubernetes
/// pull secrets to hyperboxd (`crate::daemon::cri`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Serve a CRI image service here (mode 0660), for kubelet's
    /// `--image-service-endpoint`: every call goes on to containerd's CRI,
    /// and the credentials of each PullImage are kept for its repository so
    /// that private images are lazy too. "" for off.
    pub image_service_address: PathBuf,
    /// containerd's socket, where the calls go on.
    pub containerd_address: PathBuf,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            image_service_address: PathBuf::new(),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

/// The `[daemon]` section: where hyperboxd keeps its state and listens.
/// `--root` and `--address` override the first two.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Snapshot dirs (`snapshots/<id>/{fs,work}`) and the store (`store/`).
    pub root: PathBuf,
    /// The unix socket containerd's `proxy_plugins` entry names (mode 0660).
    /// Under systemd socket activation the socket unit's fd is used instead.
    pub address: PathBuf,
    /// FUSE threads per mounted layer. A read the store can answer is
    /// answered on its thread; reads waiting on the network hold none, so a
    /// few suffice.
    pub fuse_threads: usize,
    /// Read-ahead window of each layer mount, KiB (0: the kernel's 128).
    /// A large window lets a sequential reader keep several 1 MiB FUSE reads
    /// (so range requests) in flight, and leaves large page-cache folios
    /// that make cached reads faster (docs/tuning.md).
    pub fuse_read_ahead_kb: u32,
    /// At most this many remote layers mounted at once; a Prepare of one
    /// more takes the ordinary path (the layer is downloaded).
    pub max_layers: usize,
    /// At most this much memory, MiB, held by mounted layers' trees and
    /// indexes (an estimate each layer's index gives); a Prepare of a layer
    /// that would go over takes the ordinary path.
    pub max_index_memory_mb: usize,
    /// Log filter when RUST_LOG is unset (`info`, `debug`, `hyperbox=debug`).
    pub log_level: String,
    /// Where to serve Prometheus `/metrics` and `/healthz` (HTTP); "" for
    /// nowhere. Loopback by default; expose it only to your scraper.
    pub metrics_address: String,
    /// Where each layer's FUSE fd is kept so that a restarted hyperboxd
    /// gets it back (`daemon::fdstore`).
    pub keep_fds: KeepMode,
    /// The fd holder's socket (mode 0600), when `keep_fds` is `holder`
    /// (or `auto` without systemd's fd store); "" for `<root>/fd-holder.sock`
    /// (one holder per root: a holder hands every fd it keeps to whoever
    /// asks, so two daemons must never share one).
    pub fd_holder_socket: PathBuf,
}

impl DaemonConfig {
    /// [`DaemonConfig::fd_holder_socket`], with its default resolved.
    pub fn holder_socket(&self) -> PathBuf {
        if self.fd_holder_socket.as_os_str().is_empty() {
            self.root.join("fd-holder.sock")
        } else {
            self.fd_holder_socket.clone()
        }
    }
}

/// `daemon.keep_fds`: where the daemon keeps its `/dev/fuse` fds across its
/// restarts (`daemon::fdstore`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepMode {
    /// systemd's fd store when hyperboxd runs under systemd with the store
    /// enabled, else the fd holder.
    #[default]
    Auto,
    /// systemd's fd store (`FileDescriptorStoreMax=` in the unit).
    Systemd,
    /// `hyperboxd fd-holder`, started by hyperboxd when none runs.
    Holder,
    /// Nowhere: a restart loses the layers of running containers.
    Off,
}

impl std::fmt::Display for KeepMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeepMode::Auto => "auto",
            KeepMode::Systemd => "systemd",
            KeepMode::Holder => "holder",
            KeepMode::Off => "off",
        })
    }
}

/// The longest unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why `path` cannot be the fd holder's socket: it must be absolute, and
/// both it and the path it is first bound at (`<dir>/.hbfd-XXXXXX/s`,
/// see `daemon::fdstore::bind_seqpacket`) must fit in a socket address.
pub fn check_holder_socket(path: &Path) -> Result<(), String> {
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(format!("{} is not an absolute path to a file", path.display()));
    }
    let dir = path.parent().map_or(0, |d| d.as_os_str().len());
    let staged = dir + "/.hbfd-XXXXXX/s".len();
    let longest = path.as_os_str().len().max(staged);
    if longest > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is too long for a unix socket ({longest} bytes with its staging dir; at most {MAX_SOCKET_PATH})",
            path.display()
        ));
    }
    Ok(())
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/hyperbox"),
            address: PathBuf::from("/run/hyperbox/hyperbox.sock"),
            fuse_threads: 2,
            fuse_read_ahead_kb: 4096,
            max_layers: 4096,
            max_index_memory_mb: 2048,
            log_level: "info".into(),
            metrics_address: "127.0.0.1:9464".into(),
            keep_fds: KeepMode::Auto,
            fd_holder_socket: PathBuf::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            registry: RegistryConfig::default(),
            store: StoreConfig::default(),
            fetch: FetchConfig::default(),
            daemon: DaemonConfig::default(),
            trace: TraceConfig::default(),
            prefetch: PrefetchConfig::default(),
            cri: CriConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {problem}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub problem: String,
}

impl Config {
    /// Load `path`, or the default path if it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, must_exist) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let err = |problem: String| ConfigError { path: path.clone(), problem };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if cfg.version != CONFIG_VERSION {
            return Err(err(format!("version = {} is not supported (expected {CONFIG_VERSION})", cfg.version)));
        }
        if !(0.0..=1.0).contains(&cfg.store.evict_to) {
            return Err(err(format!("store.evict_to = {} must be between 0 and 1", cfg.store.evict_to)));
        }
        cfg.fetch.validate().map_err(err)?;
        cfg.trace.validate().map_err(err)?;
        cfg.prefetch.validate().map_err(err)?;
        if !cfg.daemon.metrics_address.is_empty() && cfg.daemon.metrics_address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(err(format!(
                "daemon.metrics_address = {:?} is not an address:port (or \"\" to turn metrics off)",
                cfg.daemon.metrics_address
            )));
        }
        if !(1..=64).contains(&cfg.daemon.fuse_threads) {
            return Err(err(format!("daemon.fuse_threads = {} must be between 1 and 64", cfg.daemon.fuse_threads)));
        }
        if cfg.daemon.max_layers == 0 || cfg.daemon.max_index_memory_mb == 0 {
            return Err(err("daemon.max_layers and daemon.max_index_memory_mb must be at least 1".into()));
        }
        if cfg.daemon.fuse_read_ahead_kb > 16384 {
            return Err(err(format!(
                "daemon.fuse_read_ahead_kb = {} is over 16384 (16 MiB); the kernel reads at most 1 MiB per request",
                cfg.daemon.fuse_read_ahead_kb
            )));
        }
        if matches!(cfg.daemon.keep_fds, KeepMode::Auto | KeepMode::Holder)
            && !cfg.daemon.fd_holder_socket.as_os_str().is_empty()
        {
            check_holder_socket(&cfg.daemon.fd_holder_socket)
                .map_err(|e| err(format!("daemon.fd_holder_socket = {:?}: {e}", cfg.daemon.fd_holder_socket)))?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "version = 1\n[registry]\ninsecur = []\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("insecur"), "{e}");
        std::fs::write(&p, "version = 2\n").unwrap();
        assert!(Config::load(Some(&p)).unwrap_err().to_string().contains("version = 2"));
        std::fs::write(&p, "version = 1\n[registry]\ninsecure = [\"127.0.0.1:5000\"]\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().registry.insecure, vec!["127.0.0.1:5000"]);
        std::fs::write(&p, "version = 1\n[fetch]\nmax_prefetch_requests = 0\n").unwrap();
        assert!(Config::load(Some(&p)).unwrap_err().to_string().contains("fetch.max_prefetch_requests"));
        std::fs::write(&p, "version = 1\n[prefetch]\ngap_pct = 101\n").unwrap();
        assert!(Config::load(Some(&p)).unwrap_err().to_string().contains("prefetch.gap_pct"));
        std::fs::write(&p, "version = 1\n[prefetch]\ngap_pct = 100\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().prefetch.gap_pct, 100);
        std::fs::write(&p, "version = 1\n[registry.mirrors]\n\"docker.io\" = [\"http://10.0.0.5:5000\"]\n").unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().registry.mirrors["docker.io"], vec!["http://10.0.0.5:5000"]);
    }

    #[test]
    fn keep_fds_and_the_holder_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&p, format!("version = 1\n[daemon]\n{text}")).unwrap();
            Config::load(Some(&p))
        };
        let d = load("").unwrap().daemon;
        assert_eq!((d.keep_fds, d.fd_holder_socket.to_str().unwrap()), (KeepMode::Auto, ""));
        for (text, mode) in [("auto", KeepMode::Auto), ("systemd", KeepMode::Systemd), ("holder", KeepMode::Holder)] {
            assert_eq!(load(&format!("keep_fds = \"{text}\"")).unwrap().daemon.keep_fds, mode);
            assert_eq!(mode.to_string(), text);
        }
        assert_eq!(load("keep_fds = \"off\"").unwrap().daemon.keep_fds, KeepMode::Off);
        let e = load("keep_fds = \"sometimes\"").unwrap_err().to_string();
        assert!(e.contains("keep_fds") && e.contains("holder"), "{e}");
        let e = load("fd_holder_socket = \"fdholder.sock\"").unwrap_err().to_string();
        assert!(e.contains("daemon.fd_holder_socket") && e.contains("absolute"), "{e}");
        let long = format!("/run/{}/fdholder.sock", "d".repeat(95));
        let e = load(&format!("fd_holder_socket = \"{long}\"")).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        // Not used, so not checked.
        load(&format!("keep_fds = \"off\"\nfd_holder_socket = \"{long}\"")).unwrap();
        load("keep_fds = \"systemd\"\nfd_holder_socket = \"\"").unwrap();
        // The longest that fits, staging dir included.
        let dir = format!("/{}", "d".repeat(MAX_SOCKET_PATH - "/.hbfd-XXXXXX/s".len() - 1));
        check_holder_socket(&Path::new(&dir).join("h.sock")).unwrap();
        check_holder_socket(&Path::new(&format!("{dir}x")).join("h.sock")).unwrap_err();
    }
}
