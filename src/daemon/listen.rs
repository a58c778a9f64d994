//! Where hyperboxd listens: the socket systemd passes (socket activation,
//! `LISTEN_FDS`) or its own unix socket at `daemon.address`; and the
//! signals that stop it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::DaemonError;

/// The listening socket: systemd's, or our own at `address`. Returns the
/// path to remove at exit when we made it. Call within the runtime.
pub fn listen(address: &Path) -> Result<(tokio::net::UnixListener, Option<PathBuf>), DaemonError> {
    use std::os::fd::FromRawFd;
    let io = DaemonError::io;
    let fds: Vec<i32> = sd_notify::listen_fds().map_err(io("LISTEN_FDS".into()))?.collect();
    if let Some(&fd) = fds.first() {
        if fds.len() > 1 {
            tracing::warn!(count = fds.len(), "systemd passed several sockets; serving on the first");
        }
        // SAFETY: systemd passed this fd to us and nothing else owns it.
        let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
        l.set_nonblocking(true).map_err(io("the socket systemd passed".into()))?;
        let l = tokio::net::UnixListener::from_std(l).map_err(io("the socket systemd passed".into()))?;
        return Ok((l, None));
    }
    let l = own_socket(address)?;
    Ok((l, Some(address.to_path_buf())))
}

/// A unix socket of our own at `address` (mode 0660, [`bind_private`]),
/// replacing a stale one; an `address` something answers on is in use.
pub fn own_socket(address: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let io = DaemonError::io;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(DaemonError::InUse(address.to_path_buf()));
        }
        std::fs::remove_file(address).map_err(io(format!("remove stale socket {}", address.display())))?;
    }
    bind_private(address).map_err(io(format!("listen on {}", address.display())))
}

/// The socket's mode, as containerd's own: root and its group only.
const SOCKET_MODE: u32 = 0o660;

/// Bind a unix socket at `address` that nobody else can ever have
/// connected to: it is bound inside a fresh 0700 dir next to `address`,
/// given its final mode there, and only then renamed into place (binding
/// in place and chmodding after would leave a window open to any user).
fn bind_private(address: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let dir = address.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new().prefix(".hyperboxd-").tempdir_in(dir)?;
    let staged = staging.path().join("sock");
    let l = tokio::net::UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    std::fs::rename(&staged, address)?;
    Ok(l)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
