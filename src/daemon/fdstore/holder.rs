//! The fd holder: `hyperboxd fd-holder --socket PATH`, a tiny root process
//! that keeps the daemon's `/dev/fuse` fds open across the daemon's
//! restarts where systemd's fd store is not available.
//!
//! A `SOCK_SEQPACKET` unix server ([`proto`](super::proto)): PUT name + fd,
//! DEL name, LIST. It serves one message at a time on one thread, with
//! poll(2) over its listening socket, its clients and a signalfd, and
//! never over the kept fds: polling a FUSE fd would wake it on every FUSE
//! request. It exits on SIGTERM or SIGINT only (closing every kept fd), not
//! when a client goes away.
//!
//! Its input is treated as hostile even though only its own uid (root) may
//! connect: every message is bounded ([`proto::MAX_REQUEST`]), checked
//! before use, and refused with an error reply; the fds a refused message
//! brought are closed; the number of fds kept, of clients and of log lines
//! about refused peers are capped; a client that does not read its replies
//! is dropped after [`SEND_TIMEOUT`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{accept4, getsockopt, sockopt, MsgFlags, SockFlag};

use super::proto::{self, Reply, Request};
use super::{bind_seqpacket, lock_path, timeval, SCM_MAX_FD};

/// The most fds a holder keeps, unless told fewer (`--max-fds`); it lowers
/// it further if RLIMIT_NOFILE cannot make room for them.
pub const DEFAULT_MAX_FDS: usize = 65536;

/// Clients connected at once, at most; one more is told so and closed.
pub const MAX_CLIENTS: usize = 64;

/// A client that has not taken a reply within this long is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Refused peers logged, at most (the log is a file in /run, a tmpfs).
const MAX_REFUSALS_LOGGED: u64 = 100;

/// fds the holder needs besides the kept ones: a message's worth of
/// incoming fds, its clients, its own few, and a margin.
const HEADROOM: u64 = SCM_MAX_FD as u64 + MAX_CLIENTS as u64 + 64;

/// Exit status of `hyperboxd fd-holder` when another holder already serves
/// the socket (it holds the lock): not an error for whoever started it.
pub const EXIT_ALREADY_RUNNING: i32 = 3;

#[derive(Clone, Debug)]
pub struct HolderOptions {
    pub socket: PathBuf,
    pub max_fds: usize,
    /// Fork once the socket listens; the parent exits 0 (or
    /// [`EXIT_ALREADY_RUNNING`]) and the child, in a session of its own,
    /// serves. Whoever ran the command waits for its exit, so the holder
    /// is nobody's child but init's (or a subreaper's).
    pub detach: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("another fd holder serves {} (it holds {})", .0.display(), lock_path(.0).display())]
    AlreadyRunning(PathBuf),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HolderError {
    let what = what.into();
    move |source| HolderError::Io { what, source }
}

fn nix_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> HolderError {
    let what = what.into();
    move |e| HolderError::Io { what, source: e.into() }
}

/// Run the holder until SIGTERM or SIGINT. Call first thing in a process
/// of its own, before any thread starts (it forks when `detach`, and it
/// closes every inherited fd above 2).
pub fn run(opts: &HolderOptions) -> Result<(), HolderError> {
    // An fd leaked into us (say a /dev/fuse fd without O_CLOEXEC) would
    // otherwise be kept open, unseen, for as long as we run.
    close_inherited_fds();
    // SAFETY: plain signal dispositions, set before any thread exists.
    unsafe {
        signal(Signal::SIGPIPE, SigHandler::SigIgn).map_err(nix_err("ignore SIGPIPE"))?;
        signal(Signal::SIGHUP, SigHandler::SigIgn).map_err(nix_err("ignore SIGHUP"))?;
    }
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().map_err(nix_err("block SIGTERM and SIGINT"))?;
    let signals =
        SignalFd::with_flags(&stop, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(nix_err("signalfd"))?;
    let max_fds = fd_budget(opts.max_fds);

    let socket = &opts.socket;
    let dir = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("create {}", dir.display())))?;
    // The lock says who serves the socket: it is released when its holder
    // dies, however it dies, so a socket file left behind is stale and a
    // second holder started by a racing daemon stops here.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(lock_path(socket))
        .map_err(io_err(format!("open {}", lock_path(socket).display())))?;
    let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::Error::EWOULDBLOCK)) => return Err(HolderError::AlreadyRunning(socket.clone())),
        Err((_, e)) => return Err(nix_err(format!("lock {}", lock_path(socket).display()))(e)),
    };
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(socket).map_err(io_err(format!("remove stale {}", socket.display())))?
        }
        Ok(_) => {
            return Err(HolderError::Io {
                what: format!("{} exists and is not a socket; not replacing it", socket.display()),
                source: io::ErrorKind::AlreadyExists.into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("stat {}", socket.display()))(e)),
    }
    let listener = bind_seqpacket(socket, 0o600).map_err(io_err(format!("listen on {}", socket.display())))?;

    if opts.detach {
        detach().map_err(nix_err("detach"))?;
    }
    tracing::info!(socket = %socket.display(), pid = std::process::id(), max_fds, "fd holder serving");
    let mut holder = Holder { kept: BTreeMap::new(), max_fds, refusals: 0 };
    let served = holder.serve(listener.as_fd(), &signals);
    // Under the lock still: the path is ours to remove.
    let _ = std::fs::remove_file(socket);
    drop(lock);
    tracing::info!(kept = holder.kept.len(), "fd holder stopping; closing the fds it kept");
    served
}

/// Fork: the parent exits 0 at once (the socket already listens), the
/// child leaves the parent's session and process group and serves.
fn detach() -> nix::Result<()> {
    use nix::unistd::{fork, setsid, ForkResult};
    // SAFETY: single-threaded (run's contract), so the child may do anything.
    match unsafe { fork() }? {
        // exit, not a return: no destructor may run here, the lock's least
        // (unlocking the open file we share with the child would free it).
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {
            setsid()?;
            // Not to pin whatever filesystem the daemon ran from.
            let _ = std::env::set_current_dir("/");
            Ok(())
        }
    }
}

/// Close every fd above stderr.
fn close_inherited_fds() {
    // SAFETY: close_range(2) only closes fds; nothing in this process owns
    // any above 2 yet (run's contract).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return;
    }
    // Kernels before 5.9: walk /proc/self/fd (collect first: the walk's
    // own fd is among them).
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect(),
        Err(_) => return,
    };
    for fd in fds {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
}

/// Raise RLIMIT_NOFILE's soft limit to the hard one, and return how many
/// fds can be kept under it (at most `wanted`).
fn fd_budget(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return wanted };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    let room = usize::try_from(limit.saturating_sub(HEADROOM)).unwrap_or(usize::MAX);
    if room < wanted {
        tracing::warn!(wanted, room, nofile = limit, "RLIMIT_NOFILE leaves room for fewer fds than asked");
    }
    wanted.min(room)
}

struct Client {
    sock: OwnedFd,
}

struct Holder {
    kept: BTreeMap<String, OwnedFd>,
    max_fds: usize,
    refusals: u64,
}

impl Holder {
    fn serve(&mut self, listener: BorrowedFd<'_>, signals: &SignalFd) -> Result<(), HolderError> {
        let mut clients: Vec<Client> = Vec::new();
        let mut buf = vec![0u8; proto::MAX_REQUEST + 1];
        loop {
            let ready: Vec<PollFlags> = {
                let mut fds =
                    vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN), PollFd::new(listener, PollFlags::POLLIN)];
                fds.extend(clients.iter().map(|c| PollFd::new(c.sock.as_fd(), PollFlags::POLLIN)));
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::Error::EINTR) => continue,
                    Err(e) => return Err(nix_err("poll")(e)),
                }
                fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect()
            };
            if !ready[0].is_empty() {
                if let Ok(Some(info)) = signals.read_signal() {
                    tracing::info!(signal = info.ssi_signo, "fd holder: signal");
                    return Ok(());
                }
            }
            // Clients first, from the last so that removing one keeps the
            // indexes of those before it.
            for i in (0..clients.len()).rev() {
                let ev = ready[2 + i];
                if ev.is_empty() {
                    continue;
                }
                if !self.serve_one(&clients[i], &mut buf) {
                    clients.swap_remove(i);
                }
            }
            if ready[1].contains(PollFlags::POLLIN) {
                self.accept(listener, &mut clients);
            }
        }
    }

    /// Accept one connection: only from our own uid, and at most
    /// [`MAX_CLIENTS`]; greet it with a HELLO, or tell it why not.
    fn accept(&mut self, listener: BorrowedFd<'_>, clients: &mut Vec<Client>) {
        let sock = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new fd that nothing else owns.
            Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(e) => {
                tracing::warn!(error = %e, "fd holder: accept");
                // EMFILE and the like: do not spin at full speed.
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
        };
        let me = nix::unistd::geteuid().as_raw();
        let refusal = match getsockopt(&sock, sockopt::PeerCredentials) {
            Err(e) => Some(format!("cannot read the peer's credentials: {e}")),
            Ok(c) if c.uid() != me => Some(format!("refused: peer uid {} (pid {}) is not {me}", c.uid(), c.pid())),
            Ok(_) if clients.len() >= MAX_CLIENTS => Some(format!("refused: {MAX_CLIENTS} clients already")),
            Ok(_) => None,
        };
        let _ = nix::sys::socket::setsockopt(&sock, sockopt::SendTimeout, &timeval(SEND_TIMEOUT));
        if let Some(why) = refusal {
            self.refusals += 1;
            if self.refusals <= MAX_REFUSALS_LOGGED {
                tracing::warn!("fd holder: {why}");
                if self.refusals == MAX_REFUSALS_LOGGED {
                    tracing::warn!("fd holder: further refusals are not logged");
                }
            }
            let _ = send(sock.as_fd(), &Reply::Error(why), &[]);
            return;
        }
        let hello = Reply::Hello { pid: std::process::id(), kept: self.kept.len() as u32, max: self.max_fds as u32 };
        if send(sock.as_fd(), &hello, &[]).is_ok() {
            clients.push(Client { sock });
        }
    }

    /// Serve one message of `client`; false when it is to be dropped.
    fn serve_one(&mut self, client: &Client, buf: &mut [u8]) -> bool {
        let sock = client.sock.as_fd();
        let msg = match proto::recv_msg(sock, buf, MsgFlags::MSG_DONTWAIT) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) => {
                tracing::warn!(error = %e, "fd holder: dropping a client");
                return false;
            }
        };
        if msg.len == 0 && !msg.truncated {
            return false; // gone (or an empty message, which no client of ours sends)
        }
        let request = if msg.truncated || msg.len > proto::MAX_REQUEST {
            Err(proto::ProtoError(format!("a request is {} bytes at most", proto::MAX_REQUEST)))
        } else {
            proto::decode_request(&buf[..msg.len], msg.fds.len())
        };
        let mut fds = msg.fds;
        let reply = match request {
            Err(e) => Reply::Error(e.0),
            Ok(Request::Put(name)) => {
                if self.kept.len() >= self.max_fds && !self.kept.contains_key(&name) {
                    Reply::Error(format!("full: the holder keeps {} fds, its limit", self.max_fds))
                } else {
                    // Replacing closes the fd kept under that name before.
                    self.kept.insert(name, fds.pop().expect("decode checked: one fd"));
                    Reply::Ok
                }
            }
            Ok(Request::Del(name)) => {
                self.kept.remove(&name);
                Reply::Ok
            }
            Ok(Request::List) => return self.list(sock),
        };
        // Whatever a refused message brought is closed here.
        drop(fds);
        send(sock, &reply, &[]).is_ok()
    }

    /// Every (name, fd), in messages of at most [`SCM_MAX_FD`] fds, then END.
    fn list(&self, sock: BorrowedFd<'_>) -> bool {
        let entries: Vec<(&String, &OwnedFd)> = self.kept.iter().collect();
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        for chunk in proto::list_chunks(&names) {
            let part = &entries[chunk];
            let reply = Reply::Entries(part.iter().map(|(n, _)| (*n).clone()).collect());
            let fds: Vec<BorrowedFd> = part.iter().map(|(_, fd)| fd.as_fd()).collect();
            if let Err(e) = send(sock, &reply, &fds) {
                tracing::warn!(error = %e, "fd holder: sending a list");
                return false;
            }
        }
        send(sock, &Reply::End(entries.len() as u32), &[]).is_ok()
    }
}

fn send(sock: BorrowedFd<'_>, reply: &Reply, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    proto::send_msg(sock, &proto::encode_reply(reply), fds)
}
