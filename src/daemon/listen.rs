//! Where hyperboxd listens: the socket systemd passes (socket activation,
//! `LISTEN_FDS`) or its own unix socket at `daemon.address`; and the
//! signals that stop it. systemd also passes, after the socket, the fds
//! its store kept for us (`fdstore`): [`split_passed`] tells them apart.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::fdstore::GRPC_FD_NAME;
use super::DaemonError;

/// The listening socket: systemd's ([`take_grpc_socket`]), or our own at
/// `address`. Returns the path to remove at exit when we made it. Call
/// within the runtime.
pub fn listen(address: &Path) -> Result<(tokio::net::UnixListener, Option<PathBuf>), DaemonError> {
    let io = DaemonError::io;
    if let Some(fd) = take_grpc_socket().map_err(io("LISTEN_FDS".into()))? {
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true).map_err(io("the socket systemd passed".into()))?;
        let l = tokio::net::UnixListener::from_std(l).map_err(io("the socket systemd passed".into()))?;
        return Ok((l, None));
    }
    let l = own_socket(address)?;
    Ok((l, Some(address.to_path_buf())))
}

/// What systemd passed this process (`LISTEN_FDS`), read once, split
/// into the gRPC socket and the rest (fds its store kept for us,
/// `fdstore`).
#[derive(Default)]
pub struct Passed {
    pub grpc: Option<OwnedFd>,
    pub kept: Vec<(String, OwnedFd)>,
}

/// `None` until read.
static PASSED: Mutex<Option<Passed>> = Mutex::new(None);

fn with_passed<T>(f: impl FnOnce(&mut Passed) -> T) -> std::io::Result<T> {
    let mut guard = PASSED.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(split_passed(read_listen_fds()?));
    }
    Ok(f(guard.as_mut().expect("read above")))
}

/// The gRPC socket systemd passed, if it did (once; then `None`).
pub fn take_grpc_socket() -> std::io::Result<Option<OwnedFd>> {
    with_passed(|p| p.grpc.take())
}

/// The other fds systemd passed, with their names (once; then none).
pub fn take_passed_fds() -> std::io::Result<Vec<(String, OwnedFd)>> {
    with_passed(|p| std::mem::take(&mut p.kept))
}

/// `LISTEN_FDS` with the names in `LISTEN_FDNAMES` ("unknown" where
/// systemd gave none), close-on-exec; the variables are removed so that
/// no child takes them for its own.
fn read_listen_fds() -> std::io::Result<Vec<(String, OwnedFd)>> {
    let named: Vec<(String, i32)> = match sd_notify::listen_fds_with_names(false) {
        Ok(fds) => fds.map(|(fd, name)| (name, fd)).collect(),
        Err(e) => {
            // LISTEN_FDNAMES does not match LISTEN_FDS: keep the fds.
            tracing::warn!(error = %e, "LISTEN_FDNAMES is unusable; taking LISTEN_FDS without names");
            sd_notify::listen_fds()?.map(|fd| ("unknown".to_string(), fd)).collect()
        }
    };
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    use std::os::fd::FromRawFd;
    // SAFETY: systemd passed these fds to this process (LISTEN_PID is
    // ours; sd-notify checked each is open), and this runs once: nothing
    // else owns them.
    Ok(named.into_iter().map(|(name, fd)| (name, unsafe { OwnedFd::from_raw_fd(fd) })).collect())
}

/// The gRPC socket among `fds`: the one named `grpc` (hyperboxd.socket's
/// `FileDescriptorName=`); without one (an older socket unit, or no
/// names), the first listening unix stream socket.
pub fn split_passed(mut fds: Vec<(String, OwnedFd)>) -> Passed {
    let i =
        fds.iter().position(|(n, _)| n == GRPC_FD_NAME).or_else(|| fds.iter().position(|(_, fd)| is_unix_listener(fd)));
    let grpc = i.map(|i| fds.remove(i).1);
    if !fds.is_empty() {
        tracing::info!(fds = fds.len(), "systemd passed stored fds");
    }
    Passed { grpc, kept: fds }
}

/// A listening `AF_UNIX` `SOCK_STREAM` socket.
fn is_unix_listener(fd: &OwnedFd) -> bool {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};
    let fd = fd.as_fd();
    getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
        && getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .is_ok_and(|a| a.family() == Some(AddressFamily::Unix))
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
