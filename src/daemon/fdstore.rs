//! Keeping fds outside the process, so that a restarted hyperboxd gets them
//! back: each mounted layer's `/dev/fuse` fd, whose connection the kernel
//! keeps while any fd of it is open (docs/design/restart-research.md, §3,
//! §4 and §6(c)).
//!
//! A [`Keeper`] keeps them in one of two places (`daemon.keep_fds`):
//!
//! - **systemd's fd store** ([`SystemdKeeper`]): `put` sends an sd_notify
//!   datagram `FDSTORE=1`, `FDNAME=<name>`, `FDPOLL=0` with the fd in
//!   SCM_RIGHTS; `remove` sends `FDSTOREREMOVE=1`. systemd hands them back
//!   at the next start in `LISTEN_FDS`/`LISTEN_FDNAMES`, after the gRPC
//!   socket (`listen` tells them apart). No extra process. Needs
//!   `FileDescriptorStoreMax=` in the unit.
//! - **the fd holder** ([`HolderKeeper`], [`holder`]): `hyperboxd
//!   fd-holder`, a small process of the same binary that the daemon starts
//!   when none answers on `daemon.fd_holder_socket`, detached so that it
//!   outlives the daemon (SIGKILL, its process group killed). It keeps the
//!   fds under their names until told to drop them or until SIGTERM.
//!
//! `auto` (the default) takes systemd's store when the daemon runs under
//! systemd with the store enabled, else the holder. `off` keeps nothing.
//!
//! Names are systemd's fd names: printable ASCII without `:`, 1 to 255
//! bytes ([`validate_name`]). The daemon uses `hbl.<snapshot>.<nonce>`.
//!
//! Every call blocks (a datagram, a round trip to the holder, at start
//! maybe `systemctl` and starting the holder): call from a thread that may
//! block (`spawn_blocking` in async code).

pub mod holder;
pub mod proto;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;

pub use crate::config::KeepMode;
use proto::{Reply, Request};

/// The longest fd name systemd accepts (`fdname_is_valid`).
pub const MAX_NAME: usize = 255;

/// The most fds one message can carry (the kernel's SCM_MAX_FD).
pub const SCM_MAX_FD: usize = 253;

/// The gRPC socket's name in `LISTEN_FDNAMES` (hyperboxd.socket's
/// `FileDescriptorName=`).
pub const GRPC_FD_NAME: &str = "grpc";

/// How long a start of the holder may take before `Keeper::open` gives up.
pub const HOLDER_START_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the daemon waits for one reply of the holder.
pub const HOLDER_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The holder's log is started again when it has grown past this.
const HOLDER_LOG_MAX: u64 = 1 << 20;

/// Entries of one LIST the daemon accepts, at most (a holder keeps 65536
/// by default).
const MAX_LISTED: usize = 1 << 20;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Whether `name` may name a kept fd: what systemd accepts as an fd name
/// (printable ASCII, `0x20..=0x7e`, but `:`, which separates names in
/// `LISTEN_FDNAMES`; at most 255 bytes), and not empty.
pub fn validate_name(name: &str) -> io::Result<()> {
    const RULE: &str = "fd names are printable ASCII without ':', 1 to 255 bytes";
    if name.is_empty() {
        return Err(invalid(format!("fd name is empty ({RULE})")));
    }
    if name.len() > MAX_NAME {
        return Err(invalid(format!("fd name of {} bytes is too long ({RULE})", name.len())));
    }
    if let Some(b) = name.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(invalid(format!("fd name {name:?} has the byte {b:#04x}, not printable ASCII ({RULE})")));
    }
    if name.contains(':') {
        return Err(invalid(format!("fd name {name:?} has ':' ({RULE})")));
    }
    Ok(())
}

/// `<socket>.lock`: held by the holder serving `socket`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// `<socket>.log`: the holder's stderr when the daemon starts it.
pub fn log_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// A listening `SOCK_SEQPACKET` unix socket at `path` with `mode`, that
/// nobody can have connected to before it had that mode: bound inside a
/// fresh 0700 dir next to `path`, chmodded there, then renamed into place
/// (as `listen::bind_private` does for the gRPC socket).
pub fn bind_seqpacket(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new().prefix(".hbfd-").tempdir_in(dir)?;
    let staged = staging.path().join("s");
    let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &UnixAddr::new(&staged)?)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    listen(&sock, Backlog::new(64).expect("64 is a valid backlog"))?;
    std::fs::rename(&staged, path)?;
    Ok(sock)
}

/// `d` as a socket timeout (SO_RCVTIMEO, SO_SNDTIMEO).
pub(crate) fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(d.as_secs() as libc::time_t, d.subsec_micros() as libc::suseconds_t)
}

/// An error that means the connection to the holder is gone (or was never
/// there), as opposed to the holder refusing a request.
fn connection_lost(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected | UnexpectedEof | NotFound | ConnectionRefused
    )
}

/// A connection to a holder: the daemon's side of [`proto`].
pub struct HolderClient {
    sock: OwnedFd,
    pid: u32,
    kept_at_hello: u32,
    max: u32,
    buf: Vec<u8>,
}

impl HolderClient {
    /// Connect to the holder at `path` and read its HELLO. A holder that
    /// refuses us (not its uid) is `PermissionDenied`; none there is
    /// `NotFound` or `ConnectionRefused`.
    pub fn connect(path: &Path) -> io::Result<HolderClient> {
        let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &UnixAddr::new(path)?)?;
        setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(HOLDER_REPLY_TIMEOUT))?;
        setsockopt(&sock, sockopt::SendTimeout, &timeval(HOLDER_REPLY_TIMEOUT))?;
        let mut c = HolderClient { sock, pid: 0, kept_at_hello: 0, max: 0, buf: vec![0; proto::MAX_REPLY + 1] };
        match c.recv()? {
            (Reply::Hello { pid, kept, max }, _) => {
                c.pid = pid;
                c.kept_at_hello = kept;
                c.max = max;
                Ok(c)
            }
            (Reply::Error(why), _) => {
                Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("fd holder at {}: {why}", path.display())))
            }
            (r, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("fd holder: HELLO expected, got {r:?}"))),
        }
    }

    /// fds the holder kept when we connected, and the most it keeps.
    pub fn hello(&self) -> (u32, u32) {
        (self.kept_at_hello, self.max)
    }

    /// The holder's process id, as its HELLO said.
    pub fn holder_pid(&self) -> u32 {
        self.pid
    }

    /// Keep `fd` (a dup of it, made by the kernel in transit) under `name`,
    /// replacing the fd of that name.
    pub fn put(&mut self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        validate_name(name)?;
        self.request(&Request::Put(name.to_string()), &[fd])?;
        self.expect_ok()
    }

    /// Close the fd kept under `name`; none is fine.
    pub fn del(&mut self, name: &str) -> io::Result<()> {
        validate_name(name)?;
        self.request(&Request::Del(name.to_string()), &[])?;
        self.expect_ok()
    }

    /// Every fd kept, with its name (dups: the holder keeps them too).
    pub fn list(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        self.request(&Request::List, &[])?;
        let mut out = Vec::new();
        loop {
            match self.recv()? {
                (Reply::Entries(names), fds) => {
                    if out.len() + names.len() > MAX_LISTED {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "fd holder: endless LIST"));
                    }
                    out.extend(names.into_iter().zip(fds));
                }
                (Reply::End(total), _) if total as usize == out.len() => return Ok(out),
                (Reply::End(total), _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("fd holder: LIST ended at {total} entries, {} received", out.len()),
                    ))
                }
                (r, _) => return Err(unexpected(r)),
            }
        }
    }

    fn request(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        proto::send_msg(self.sock.as_fd(), &proto::encode_request(req), fds)
    }

    fn expect_ok(&mut self) -> io::Result<()> {
        match self.recv()? {
            (Reply::Ok, _) => Ok(()),
            (r, _) => Err(unexpected(r)),
        }
    }

    fn recv(&mut self) -> io::Result<(Reply, Vec<OwnedFd>)> {
        let m = proto::recv_msg(self.sock.as_fd(), &mut self.buf, MsgFlags::empty()).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "the fd holder did not answer")
            } else {
                e
            }
        })?;
        if m.len == 0 && !m.truncated {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the fd holder closed the connection"));
        }
        if m.truncated || m.len > proto::MAX_REPLY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "fd holder: an over-long reply"));
        }
        let reply = proto::decode_reply(&self.buf[..m.len], m.fds.len())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("fd holder: {e}")))?;
        Ok((reply, m.fds))
    }
}

fn unexpected(r: Reply) -> io::Error {
    match r {
        Reply::Error(why) => io::Error::other(format!("fd holder: {why}")),
        r => io::Error::new(io::ErrorKind::InvalidData, format!("fd holder: unexpected reply {r:?}")),
    }
}

/// Start a holder serving `socket`: `exe fd-holder --socket SOCKET
/// --detach`, its stderr to [`log_path`], in a process group of its own;
/// it forks and its first process exits once the socket listens, so the
/// holder is not our child. Returns once that first process exited
/// (at most [`HOLDER_START_TIMEOUT`]); a holder already there is fine.
pub fn spawn_holder(exe: &Path, socket: &Path) -> io::Result<()> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let log_file = log_path(socket);
    let too_big = std::fs::metadata(&log_file).is_ok_and(|m| m.len() > HOLDER_LOG_MAX);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(!too_big)
        .write(true)
        .truncate(too_big)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&log_file)?;
    let mut child = Command::new(exe)
        .arg("fd-holder")
        .arg("--socket")
        .arg(socket)
        .arg("--detach")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .process_group(0)
        .current_dir("/")
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("start the fd holder {}: {e}", exe.display())))?;
    let deadline = Instant::now() + HOLDER_START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the fd holder did not start within {HOLDER_START_TIMEOUT:?} (see {})", log_file.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    match status.code() {
        Some(0) | Some(holder::EXIT_ALREADY_RUNNING) => Ok(()),
        _ => Err(io::Error::other(format!("the fd holder failed to start: {status} (see {})", log_file.display()))),
    }
}

/// Connect to the holder at `socket`, starting one if none answers.
pub fn connect_or_spawn(socket: &Path, exe: &Path) -> io::Result<HolderClient> {
    match HolderClient::connect(socket) {
        Ok(c) => return Ok(c),
        Err(e) if connection_lost(&e) => {}
        Err(e) => return Err(e),
    }
    spawn_holder(exe, socket)?;
    // It listens before its first process exits; a racing start (two
    // daemons) may still be between taking the lock and binding.
    let deadline = Instant::now() + HOLDER_START_TIMEOUT;
    loop {
        match HolderClient::connect(socket) {
            Ok(c) => return Ok(c),
            Err(e) if connection_lost(&e) && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(io::Error::new(e.kind(), format!("the fd holder at {}: {e}", socket.display()))),
        }
    }
}

/// What [`Keeper::open_with`] needs.
#[derive(Clone, Debug)]
pub struct KeeperOptions {
    pub mode: KeepMode,
    /// The holder's socket (`daemon.fd_holder_socket`).
    pub holder_socket: PathBuf,
    /// The program run as `<exe> fd-holder`: `/proc/self/exe` (this very
    /// binary, even if it was replaced or deleted by an upgrade since).
    pub holder_exe: PathBuf,
}

impl KeeperOptions {
    pub fn new(mode: KeepMode, holder_socket: &Path) -> KeeperOptions {
        KeeperOptions { mode, holder_socket: holder_socket.to_path_buf(), holder_exe: PathBuf::from("/proc/self/exe") }
    }
}

/// Where the daemon keeps its fds; see the module doc.
pub enum Keeper {
    Systemd(SystemdKeeper),
    Holder(HolderKeeper),
    Off(OffKeeper),
}

impl Keeper {
    /// The keeper `mode` asks for. `Auto`: systemd's store when
    /// `NOTIFY_SOCKET` is set and the unit allows the store
    /// ([`detect`]), else the holder.
    ///
    /// fds systemd handed this process besides the gRPC socket
    /// (`listen::take_passed_fds`) are [`take_kept`](Keeper::take_kept)'s
    /// in every mode. When the mode changed since they were kept, they
    /// move: with the holder, they are put in the holder and removed from
    /// systemd's store; with systemd, a holder found at `holder_socket` is
    /// emptied into systemd's store; with `Off`, they are removed from
    /// systemd's store (and still handed to the caller, who may serve them).
    pub fn open(mode: KeepMode, holder_socket: &Path) -> io::Result<Keeper> {
        Keeper::open_with(&KeeperOptions::new(mode, holder_socket))
    }

    pub fn open_with(opts: &KeeperOptions) -> io::Result<Keeper> {
        let passed = super::listen::take_passed_fds()?;
        let (mode, store_max) = match opts.mode {
            KeepMode::Auto => {
                let d = detect(!passed.is_empty());
                tracing::info!(keep_fds = %d.mode, reason = %d.reason, "keeping layer fds");
                (d.mode, d.store_max)
            }
            KeepMode::Systemd => (KeepMode::Systemd, fdstore_env().and_then(|v| v.parse().ok())),
            m => (m, None),
        };
        match mode {
            KeepMode::Systemd => {
                let mut k = SystemdKeeper::new(passed, store_max)?;
                k.adopt_holder(&opts.holder_socket);
                Ok(Keeper::Systemd(k))
            }
            KeepMode::Holder => {
                raise_nofile_limit();
                let k = HolderKeeper::open(&opts.holder_socket, &opts.holder_exe)?;
                k.adopt(passed)?;
                Ok(Keeper::Holder(k))
            }
            KeepMode::Off | KeepMode::Auto => {
                for (name, _) in &passed {
                    let _ = sd_remove(name);
                }
                Ok(Keeper::Off(OffKeeper { passed }))
            }
        }
    }

    /// Where fds are kept: `Systemd`, `Holder` or `Off`, never `Auto`.
    pub fn mode(&self) -> KeepMode {
        match self {
            Keeper::Systemd(_) => KeepMode::Systemd,
            Keeper::Holder(_) => KeepMode::Holder,
            Keeper::Off(_) => KeepMode::Off,
        }
    }

    /// Keep a dup of `fd` under `name`, replacing the one of that name.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        validate_name(name)?;
        match self {
            Keeper::Systemd(k) => k.put(name, fd),
            Keeper::Holder(k) => k.put(name, fd),
            Keeper::Off(_) => Ok(()),
        }
    }

    /// Close the fd kept under `name`, if any.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        validate_name(name)?;
        match self {
            Keeper::Systemd(k) => k.remove(name),
            Keeper::Holder(k) => k.remove(name),
            Keeper::Off(_) => Ok(()),
        }
    }

    /// The fds kept by an earlier process, handed back at start-up:
    /// systemd's from `LISTEN_FDS`/`LISTEN_FDNAMES` (all but the gRPC
    /// socket), the holder's from LIST. They stay kept: `remove` the ones
    /// that are no longer wanted. systemd's come once (a second call
    /// returns none); the holder's each time.
    pub fn take_kept(&mut self) -> io::Result<Vec<(String, OwnedFd)>> {
        match self {
            Keeper::Systemd(k) => Ok(std::mem::take(&mut k.passed)),
            Keeper::Holder(k) => k.list(),
            Keeper::Off(k) => Ok(std::mem::take(&mut k.passed)),
        }
    }
}

/// `Off`: nothing is kept; put and remove do nothing.
pub struct OffKeeper {
    passed: Vec<(String, OwnedFd)>,
}

// ---- systemd

fn fdstore_env() -> Option<String> {
    std::env::var("FDSTORE").ok()
}

fn notify_socket() -> Option<OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// `FDSTOREREMOVE=1` for `name`; nothing without `NOTIFY_SOCKET`.
fn sd_remove(name: &str) -> io::Result<()> {
    use sd_notify::NotifyState;
    sd_notify::notify(false, &[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
}

/// `FDSTORE=1` of `fd` under `name`, unpolled.
fn sd_store(name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
    use sd_notify::NotifyState;
    sd_notify::notify_with_fds(
        false,
        &[NotifyState::FdStore, NotifyState::FdName(name), NotifyState::Custom("FDPOLL=0")],
        &[fd],
    )
}

/// systemd's fd store.
///
/// systemd keeps any number of fds under one name, and drops an fd that is
/// the same open file as one it keeps (kcmp). So `put` of a name already
/// stored (by this process, or handed back at start) first removes that
/// name: between the two datagrams a crash would lose the name's fd (one
/// datagram cannot do both: systemd reads FDSTOREREMOVE and then ignores
/// FDSTORE). Fresh names (`hbl.<id>.<nonce>`) never take that path.
///
/// `FDPOLL=0`: systemd must not poll a FUSE fd, which would wake PID 1 on
/// every FUSE request; it therefore never drops a dead one by itself, and
/// the daemon removes fds when it unmounts and prunes them at start.
///
/// Datagrams get no answer: a full store (`FileDescriptorStoreMax=`) or a
/// unit without the store drop fds with only a line in systemd's log.
/// `put` refuses past the store's size when it is known (`$FDSTORE`,
/// systemd 254+, or the unit's property read at start).
pub struct SystemdKeeper {
    stored: Mutex<BTreeSet<String>>,
    passed: Vec<(String, OwnedFd)>,
    max: Option<usize>,
}

impl SystemdKeeper {
    fn new(passed: Vec<(String, OwnedFd)>, max: Option<u64>) -> io::Result<SystemdKeeper> {
        if notify_socket().is_none() {
            return Err(invalid(
                "daemon.keep_fds = \"systemd\", but NOTIFY_SOCKET is unset: hyperboxd was not started by systemd \
                 as a Type=notify service"
                    .into(),
            ));
        }
        let stored = passed.iter().map(|(n, _)| n.clone()).collect();
        let max = max.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        Ok(SystemdKeeper { stored: Mutex::new(stored), passed, max })
    }

    /// sd-notify sends nothing, and says Ok, without NOTIFY_SOCKET.
    fn check_socket() -> io::Result<()> {
        match notify_socket() {
            Some(_) => Ok(()),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "NOTIFY_SOCKET is no longer set")),
        }
    }

    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        Self::check_socket()?;
        let mut stored = self.stored.lock();
        if stored.contains(name) {
            sd_remove(name)?;
            stored.remove(name);
        } else if self.max.is_some_and(|m| stored.len() >= m) {
            // (ErrorKind::StorageFull is newer than our MSRV.)
            return Err(io::Error::other(format!(
                "systemd's fd store is full: FileDescriptorStoreMax={}",
                self.max.unwrap_or(0)
            )));
        }
        sd_store(name, fd)?;
        stored.insert(name.to_string());
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        Self::check_socket()?;
        sd_remove(name)?;
        self.stored.lock().remove(name);
        Ok(())
    }

    /// A holder left by an earlier run in holder mode: move its fds into
    /// systemd's store (and hand them back as kept). Never starts one.
    fn adopt_holder(&mut self, socket: &Path) {
        if !socket.exists() {
            return;
        }
        let moved = (|| -> io::Result<usize> {
            let mut c = HolderClient::connect(socket)?;
            let fds = c.list()?;
            for (name, fd) in &fds {
                self.put(name, fd.as_fd())?;
                c.del(name)?;
            }
            let n = fds.len();
            self.passed.extend(fds);
            Ok(n)
        })();
        match moved {
            Ok(0) => {}
            Ok(n) => tracing::info!(fds = n, holder = %socket.display(), "moved the holder's fds to systemd's store"),
            Err(e) if connection_lost(&e) => {}
            Err(e) => tracing::warn!(holder = %socket.display(), error = %e, "cannot empty the fd holder"),
        }
    }
}

/// How `auto` chose, and why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    pub mode: KeepMode,
    pub store_max: Option<u64>,
    pub reason: String,
}

/// `auto`: systemd's store when it will keep fds for us, else the holder.
/// `handed_back`: systemd passed fds besides the gRPC socket (so its store
/// works).
pub fn detect(handed_back: bool) -> Detected {
    decide(notify_socket().is_some(), fdstore_env().as_deref(), handed_back, unit_store_max)
}

/// [`detect`] on its inputs: `NOTIFY_SOCKET` set; `$FDSTORE` (systemd 254+
/// sets it to the store's size when there is one); fds handed back; and,
/// last, `FileDescriptorStoreMax` read from the unit.
pub fn decide(
    notify: bool,
    fdstore: Option<&str>,
    handed_back: bool,
    unit_max: impl FnOnce() -> Result<u64, String>,
) -> Detected {
    let d = |mode, store_max, reason: String| Detected { mode, store_max, reason };
    if !notify {
        return d(KeepMode::Holder, None, "NOTIFY_SOCKET is unset: not a systemd service".into());
    }
    if let Some(v) = fdstore {
        return match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => d(KeepMode::Systemd, Some(n), format!("systemd's fd store holds {n} ($FDSTORE)")),
            _ => d(KeepMode::Holder, None, format!("$FDSTORE={v:?}: the unit has no fd store")),
        };
    }
    if handed_back {
        return d(KeepMode::Systemd, None, "systemd handed back stored fds".into());
    }
    match unit_max() {
        Ok(n) if n > 0 => d(KeepMode::Systemd, Some(n), format!("the unit's FileDescriptorStoreMax={n}")),
        Ok(_) => d(
            KeepMode::Holder,
            None,
            "the unit's FileDescriptorStoreMax=0; set it (hyperboxd.service has 4096) to keep fds in systemd".into(),
        ),
        Err(e) => d(KeepMode::Holder, None, format!("cannot tell whether systemd's fd store is enabled: {e}")),
    }
}

/// The unit this process runs in, from `/proc/self/cgroup`, and whether
/// it is under a user manager (`user@UID.service`).
pub fn unit_of_cgroup(cgroup: &str) -> Option<(String, bool)> {
    // cgroup v2 ("0::/path"), else v1's name=systemd hierarchy.
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| cgroup.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p)))?;
    let parts: Vec<&str> = path.split('/').collect();
    let i = parts.iter().rposition(|p| p.ends_with(".service") && !p.starts_with("user@"))?;
    let user = parts[..i].iter().any(|p| p.starts_with("user@") && p.ends_with(".service"));
    Some((parts[i].to_string(), user))
}

/// `systemctl show -p FileDescriptorStoreMax --value <our unit>`, within
/// 5 s.
fn unit_store_max() -> Result<u64, String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let (unit, user) = unit_of_cgroup(&cgroup).ok_or("no .service in /proc/self/cgroup")?;
    let mut cmd = Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    let mut child = cmd
        .args(["show", "--property=FileDescriptorStoreMax", "--value", &unit])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("systemctl: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("systemctl show did not answer within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("systemctl show {unit}: {}", out.status));
    }
    text.trim().parse().map_err(|_| format!("systemctl show {unit}: FileDescriptorStoreMax={:?}", text.trim()))
}

// ---- holder

/// The fd holder ([`holder`]), through one connection.
///
/// It remembers a dup of every fd it put (and of every fd LIST handed
/// back), so that when the holder is gone (killed, say) the next call
/// starts a new one and puts them all again before doing its own work:
/// the caller only sees an error if that fails too. A holder that dies
/// while the daemon is down loses the fds: those layers' connections abort.
pub struct HolderKeeper {
    socket: PathBuf,
    exe: PathBuf,
    state: Mutex<HolderState>,
}

struct HolderState {
    conn: Option<HolderClient>,
    kept: BTreeMap<String, OwnedFd>,
}

impl HolderKeeper {
    fn open(socket: &Path, exe: &Path) -> io::Result<HolderKeeper> {
        let conn = connect_or_spawn(socket, exe)?;
        tracing::info!(
            holder = %socket.display(),
            pid = conn.holder_pid(),
            kept = conn.hello().0,
            "fd holder connected"
        );
        Ok(HolderKeeper {
            socket: socket.to_path_buf(),
            exe: exe.to_path_buf(),
            state: Mutex::new(HolderState { conn: Some(conn), kept: BTreeMap::new() }),
        })
    }

    /// The holder's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The holder's process id (connecting first if need be).
    pub fn holder_pid(&self) -> io::Result<u32> {
        self.call(&mut self.state.lock(), |c| Ok(c.holder_pid()))
    }

    /// Run `f` on the connection; if the connection turns out gone,
    /// reconnect (starting a holder if none answers), put back every
    /// remembered fd, and run `f` once more.
    fn call<T>(&self, st: &mut HolderState, mut f: impl FnMut(&mut HolderClient) -> io::Result<T>) -> io::Result<T> {
        let mut retried = false;
        loop {
            let conn = match &mut st.conn {
                Some(c) => c,
                None => {
                    let mut c = connect_or_spawn(&self.socket, &self.exe)?;
                    for (name, fd) in &st.kept {
                        c.put(name, fd.as_fd())?;
                    }
                    if !st.kept.is_empty() {
                        tracing::warn!(
                            fds = st.kept.len(),
                            holder = %self.socket.display(),
                            "fd holder reconnected; put its fds again"
                        );
                    }
                    st.conn.insert(c)
                }
            };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) if connection_lost(&e) => {
                    st.conn = None;
                    if retried {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, holder = %self.socket.display(), "lost the fd holder; reconnecting");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let dup = fd.try_clone_to_owned()?;
        let mut st = self.state.lock();
        self.call(&mut st, |c| c.put(name, fd))?;
        st.kept.insert(name.to_string(), dup);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = self.state.lock();
        st.kept.remove(name);
        self.call(&mut st, |c| c.del(name))
    }

    fn list(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        let mut st = self.state.lock();
        let fds = self.call(&mut st, |c| c.list())?;
        for (name, fd) in &fds {
            st.kept.insert(name.clone(), fd.try_clone()?);
        }
        Ok(fds)
    }

    /// fds systemd handed back (an earlier run kept them in its store):
    /// into the holder, out of systemd's store.
    fn adopt(&self, passed: Vec<(String, OwnedFd)>) -> io::Result<()> {
        for (name, fd) in passed {
            if let Err(e) = validate_name(&name) {
                tracing::warn!(error = %e, "closing an fd systemd handed back");
                continue;
            }
            self.put(&name, fd.as_fd())?;
            let _ = sd_remove(&name);
            tracing::info!(name, "moved an fd from systemd's store to the holder");
        }
        Ok(())
    }
}

/// Raise RLIMIT_NOFILE's soft limit to its hard limit: a LIST brings back
/// one fd per layer at once, and the kernel drops (MSG_CTRUNC) the fds it
/// cannot install.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[cfg(test)]
mod tests;
