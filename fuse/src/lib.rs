//! The FUSE server of HyperBox: a read-only filesystem behind /dev/fuse.
//!
//! A read-only filesystem implements [`ReadOnlyFs`] with plain types (inode
//! numbers, byte-string names, errno values); [`mount`] serves it, one call
//! and one reply per operation, and [`adopt`] serves it on a connection
//! another process set up (a restart: see [`conn`]). Reads get a
//! [`ReadReply`] they may answer later from another thread, so a read
//! waiting on the network never holds a FUSE reader: lookups, getattr and
//! local reads keep flowing. The kernel caches hard, because a layer never
//! changes: entries and attributes for a day, file pages across opens,
//! directory listings and symlink targets. Opening a file or a directory
//! costs the daemon nothing: where the kernel supports it, `open` and
//! `opendir` answer ENOSYS once and the kernel stops asking (zero-message
//! opens, which imply `FOPEN_KEEP_CACHE` and `FOPEN_CACHE_DIR`); on older
//! kernels `open` answers `FOPEN_KEEP_CACHE` itself.
//!
//! The protocol is spoken here rather than through a FUSE library because a
//! restart needs what none offers together: serving a live connection
//! without a new INIT, asking the kernel to resend lost requests, readers
//! that stop between two requests, one device file per connection, and no
//! unmount when a process stops (docs/architecture.md, "Our own FUSE loop").

pub mod abi;
pub mod conn;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use abi::Op;
pub use conn::{resend, ConnState};
use conn::{Chan, ChanRef, Got, Stop, Wait};

/// How long the kernel may cache entries and attributes (seconds): layers
/// are immutable.
const TTL: u64 = 24 * 3600;

/// Most FUSE reader threads one mount gets, whatever it asks for.
pub const MAX_THREADS: usize = 64;

/// Run one handler's body. A panic in it (a bug, or input no check
/// foresaw) answers EIO instead of killing the reader thread: with the
/// thread gone the mount would stop answering, and every `stat` or `df` on
/// the host that touches it would hang. The panic itself is reported by
/// the process's panic hook.
fn guarded<T>(body: impl FnOnce() -> Result<T, Errno32>) -> Result<T, Errno32> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(Err(libc::EIO))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl Kind {
    /// The file type bits of `st_mode`.
    fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
        }
    }

    /// The `d_type` of a directory entry.
    fn dtype(self) -> u32 {
        self.mode_bits() >> 12
    }
}

/// What `stat` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number as the kernel encodes it (`makedev`).
    pub rdev: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

impl Attr {
    /// As the kernel reads it. Every time an index can hold goes through
    /// unchanged (the kernel reads the seconds as signed); nanoseconds past
    /// a second are cut to 999,999,999.
    fn wire(&self) -> abi::WireAttr {
        abi::WireAttr {
            ino: self.ino,
            size: self.size,
            blocks: self.size.div_ceil(512),
            time: self.mtime,
            time_nsec: self.mtime_nsec.min(999_999_999),
            mode: self.kind.mode_bits() | u32::from(self.perm & 0o7777),
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            blksize: 4096,
        }
    }
}

/// An errno value (positive), as `libc` names them.
pub type Errno32 = i32;

/// A read-only filesystem. Every method but `read` answers at once; `read`
/// must answer through its [`ReadReply`], possibly later and elsewhere.
pub trait ReadOnlyFs: Send + Sync + 'static {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno32>;
    fn getattr(&self, ino: u64) -> Result<Attr, Errno32>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno32>;
    /// Entries of directory `ino` from position `offset` (0 is the start),
    /// including `.` and `..`. `add(ino, next_offset, kind, name)` returns
    /// true when the reply buffer is full (that entry was not added): stop
    /// then.
    fn readdir(&self, ino: u64, offset: u64, add: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool)
        -> Result<(), Errno32>;
    /// The same with each entry's attributes, which the kernel caches as if
    /// each entry had been looked up: `add(attr, next_offset, name)`.
    fn readdirplus(&self, ino: u64, offset: u64, add: &mut dyn FnMut(&Attr, u64, &[u8]) -> bool)
        -> Result<(), Errno32>;
    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno32>;
    /// Attribute names, each followed by a NUL byte.
    fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno32>;
    /// `pid` is the reading process as the kernel names it (in the mounting
    /// process's pid namespace; 0 when the kernel does not say).
    fn read(&self, ino: u64, offset: u64, size: u32, pid: u32, reply: ReadReply);
}

/// The answer to one read; send exactly once (dropping it unanswered
/// answers EIO, so no reader hangs).
pub struct ReadReply {
    to: Option<(ChanRef, u64)>,
    /// The most bytes the kernel asked for; a longer answer is cut.
    size: u32,
}

impl ReadReply {
    fn new(chan: ChanRef, unique: u64, size: u32) -> ReadReply {
        chan.inflight.fetch_add(1, Ordering::SeqCst);
        ReadReply { to: Some((chan, unique)), size }
    }

    pub fn data(self, data: &[u8]) {
        self.data_parts(&[data]);
    }

    /// Answer with `parts` one after the other, written as they are (one
    /// `writev`, no copy); cut at the size asked for.
    pub fn data_parts(mut self, parts: &[&[u8]]) {
        // More slices than an iovec takes (UIO_MAXIOV, 1024, with the
        // header): one buffer instead, or the write would fail.
        if parts.len() >= MAX_PARTS {
            return self.data(&parts.concat());
        }
        let Some((c, unique)) = self.to.take() else { return };
        let mut left = self.size as usize;
        let mut cut: Vec<&[u8]> = Vec::with_capacity(parts.len());
        for p in parts {
            if left == 0 {
                break;
            }
            let p = &p[..p.len().min(left)];
            left -= p.len();
            cut.push(p);
        }
        c.reply(unique, 0, &cut);
        c.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn error(mut self, errno: Errno32) {
        if let Some((c, unique)) = self.to.take() {
            c.reply(unique, errno, &[]);
            c.inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for ReadReply {
    fn drop(&mut self) {
        if let Some((c, unique)) = self.to.take() {
            c.reply(unique, libc::EIO, &[]);
            c.inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Most slices one reply is written from ([`ReadReply::data_parts`]).
const MAX_PARTS: usize = 512;

/// Answers the kernel's requests with a [`ReadOnlyFs`].
struct Server<F> {
    fs: F,
    chan: ChanRef,
    state: ConnState,
}

impl<F: ReadOnlyFs> Server<F> {
    /// Handle one request, exactly as `read(2)` returned it.
    fn handle(&self, buf: &[u8]) {
        // A request whose header does not parse cannot be answered (its
        // `unique` is not known); the kernel never sends one.
        let Ok((h, op)) = abi::parse(buf) else { return };
        let reply = |errno: i32, parts: &[&[u8]]| self.chan.reply(h.unique, errno, parts);
        let op = match op {
            Ok(op) => op,
            Err(_) => return reply(libc::EIO, &[]),
        };
        #[cfg(test)]
        self.chan.seen(&op);
        let ino = h.nodeid;
        match op {
            Op::Forget | Op::BatchForget => {} // the tree is static: nothing to forget
            Op::Init { .. } => reply(libc::EIO, &[]),
            Op::Lookup { name } => match guarded(|| self.fs.lookup(ino, name)) {
                Ok(a) => {
                    let mut out = Vec::with_capacity(abi::ENTRY_OUT_LEN);
                    abi::put_entry(&mut out, &a.wire(), TTL);
                    reply(0, &[&out]);
                }
                Err(e) => reply(e, &[]),
            },
            Op::Getattr => match guarded(|| self.fs.getattr(ino)) {
                Ok(a) => {
                    let mut out = Vec::with_capacity(abi::ATTR_OUT_LEN);
                    abi::put_attr_out(&mut out, &a.wire(), TTL);
                    reply(0, &[&out]);
                }
                Err(e) => reply(e, &[]),
            },
            Op::Readlink => match guarded(|| self.fs.readlink(ino)) {
                Ok(t) => reply(0, &[&t]),
                Err(e) => reply(e, &[]),
            },
            Op::Open if self.state.no_open() => reply(libc::ENOSYS, &[]),
            Op::Open => reply(0, &[&abi::open_out(0, abi::FOPEN_KEEP_CACHE)]),
            Op::Opendir if self.state.no_opendir() => reply(libc::ENOSYS, &[]),
            Op::Opendir => reply(0, &[&abi::open_out(0, abi::FOPEN_CACHE_DIR | abi::FOPEN_KEEP_CACHE)]),
            Op::Release | Op::Releasedir | Op::Destroy => reply(0, &[]),
            Op::Read { offset, size } => {
                let r = ReadReply::new(self.chan.clone(), h.unique, size);
                // A panic drops the ReadReply unsent, which answers EIO.
                let _ = catch_unwind(AssertUnwindSafe(|| self.fs.read(ino, offset, size, h.pid, r)));
            }
            Op::Readdir { offset, size } => {
                let max = (size as usize).min(1 << 20);
                let mut out = Vec::with_capacity(max.min(64 << 10));
                let r = guarded(|| {
                    self.fs.readdir(ino, offset, &mut |child, next, kind, name| {
                        !abi::put_dirent(&mut out, max, child, next, kind.dtype(), name)
                    })
                });
                match r {
                    Ok(()) => reply(0, &[&out]),
                    Err(e) => reply(e, &[]),
                }
            }
            Op::Readdirplus { offset, size } => {
                let max = (size as usize).min(1 << 20);
                let mut out = Vec::with_capacity(max.min(64 << 10));
                let r = guarded(|| {
                    self.fs.readdirplus(ino, offset, &mut |a, next, name| {
                        !abi::put_direntplus(&mut out, max, &a.wire(), TTL, next, name)
                    })
                });
                match r {
                    Ok(()) => reply(0, &[&out]),
                    Err(e) => reply(e, &[]),
                }
            }
            Op::Getxattr { size, name } => self.xattr(&reply, size, guarded(|| self.fs.getxattr(ino, name))),
            Op::Listxattr { size } => self.xattr(&reply, size, guarded(|| self.fs.listxattr(ino))),
            Op::Statfs => reply(0, &[&abi::statfs_out()]),
            // Nothing to flush on a read-only filesystem; ENOSYS tells the
            // kernel not to ask again. The same for interrupts: no request
            // of ours can be cut short.
            Op::Flush | Op::Interrupt | Op::Other(_) => reply(libc::ENOSYS, &[]),
        }
    }

    fn xattr(&self, reply: &dyn Fn(i32, &[&[u8]]), size: u32, r: Result<Vec<u8>, Errno32>) {
        match r {
            Err(e) => reply(e, &[]),
            // A value longer than u32::MAX bytes cannot be answered; the
            // index bounds xattrs far below that.
            Ok(v) if size == 0 => reply(0, &[&abi::getxattr_out(u32::try_from(v.len()).unwrap_or(u32::MAX))]),
            Ok(v) if v.len() > size as usize => reply(libc::ERANGE, &[]),
            Ok(v) => reply(0, &[&v]),
        }
    }
}

/// A served filesystem. Dropping it, or [`Mount::unmount`], unmounts;
/// [`Mount::leave`] stops serving and leaves the mount for another process
/// to serve.
pub struct Mount {
    path: PathBuf,
    chan: ChanRef,
    state: ConnState,
    stop: Arc<Stop>,
    readers: Vec<JoinHandle<()>>,
    read_ahead: io::Result<u32>,
    /// Whether dropping unmounts (false once left or unmounted).
    owned: bool,
}

impl Mount {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The read-ahead window set at mount (KiB; 0: the kernel's default),
    /// or why it could not be set.
    pub fn read_ahead(&self) -> Result<u32, &io::Error> {
        self.read_ahead.as_ref().copied()
    }

    /// What INIT fixed: persist it (with [`ConnState::to_bytes`]) to serve
    /// the connection again after a restart.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The connection's /dev/fuse file: a duplicate of it kept elsewhere
    /// keeps the connection, and the requests read from it, alive.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.chan.fd()
    }

    /// Requests read and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.chan.inflight.load(Ordering::SeqCst)
    }

    fn stop_readers(&mut self) {
        self.stop.signal();
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
    }

    /// Unmount and stop serving.
    pub fn unmount(mut self) -> io::Result<()> {
        self.owned = false;
        let r = umount(&self.path);
        self.stop_readers();
        r
    }

    /// Stop reading requests, wait up to `grace` for the answers to those
    /// already read, and leave the mount up: the connection lives on while
    /// any duplicate of [`Mount::device`] is open, and [`adopt`] serves it
    /// again. Returns how many requests were still unanswered; on kernels
    /// that can resend (see [`ConnState::can_resend`]) the next server gets
    /// them again.
    pub fn leave(mut self, grace: Duration) -> usize {
        self.owned = false;
        self.stop_readers();
        conn::drain(&self.chan, grace)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.owned && umount(&self.path).is_err() {
            let _ = detach(&self.path);
        }
        self.stop_readers();
    }
}

/// How a filesystem is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Reader threads, 1 to [`MAX_THREADS`] (other values are taken to the
    /// nearest). All read the connection's one device file.
    pub threads: usize,
    /// The mount's read-ahead window in KiB (its backing device's
    /// `read_ahead_kb`); 0 keeps the kernel's default (128 KiB). Each FUSE
    /// read is at most 1 MiB (`max_pages`); a larger window keeps several in
    /// flight, and the page cache fills with larger folios.
    pub read_ahead_kb: u32,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { threads: 4, read_ahead_kb: 0 }
    }
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a mount argument"))
}

/// Mount `fs` read-only at `mountpoint`. Open to every user (`allow_other`)
/// with the kernel checking permissions from the modes
/// (`default_permissions`): overlayfs checks a container process's access
/// to a lower dir with that process's credentials.
///
/// `nosuid,nodev`: the mount itself honours no setuid bit, file capability
/// or device node, so a path to it (were one reachable) gives a local user
/// nothing. A container still sees them work: exec and open go through the
/// overlay mount, whose flags the kernel checks, not the lower layer's.
///
/// The read-ahead window is set after the mount; failing to set it (no
/// write access to `/sys`) leaves the mount up with the kernel's default,
/// and the error in [`Mount::read_ahead`] for the caller to report.
pub fn mount(fs: impl ReadOnlyFs, mountpoint: &Path, fsname: &str, opts: &MountOptions) -> io::Result<Mount> {
    // SAFETY: open(2) of a constant path; the result is checked.
    let raw = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("open /dev/fuse: {e}")));
    }
    // SAFETY: a fresh fd nothing else owns.
    let dev = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions,allow_other",
        dev.as_raw_fd(),
        libc::S_IFDIR
    );
    let (src, target, data) =
        (cstr(fsname.as_bytes())?, cstr(mountpoint.as_os_str().as_bytes())?, cstr(data.as_bytes())?);
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: NUL-terminated strings that outlive the call.
    let r =
        unsafe { libc::mount(src.as_ptr(), target.as_ptr(), c"fuse.hyperbox".as_ptr(), flags, data.as_ptr().cast()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount {}: {e}", mountpoint.display())));
    }
    let state = match handshake(dev.as_fd()) {
        Ok(s) => s,
        Err(e) => {
            let _ = detach(mountpoint);
            return Err(e);
        }
    };
    let mut m = serve(fs, dev, state, mountpoint, opts)?;
    if opts.read_ahead_kb > 0 {
        m.read_ahead = set_read_ahead(mountpoint, opts.read_ahead_kb).map(|()| opts.read_ahead_kb);
    }
    Ok(m)
}

/// How long a new mount's INIT may take to arrive.
const INIT_TIMEOUT_MS: i32 = 10_000;

/// Answer the INIT that every new connection starts with.
fn handshake(dev: BorrowedFd<'_>) -> io::Result<ConnState> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match conn::wait(dev, None, INIT_TIMEOUT_MS)? {
            Wait::Readable => {}
            _ => return Err(io::Error::other("the FUSE connection ended before INIT")),
        }
        let n = match conn::read_request(dev, &mut buf)? {
            Got::Request(n) => n,
            Got::Nothing => continue,
            Got::Gone => return Err(io::Error::other("the FUSE connection ended before INIT")),
        };
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("FUSE handshake: {why}"));
        let (h, op) = abi::parse(&buf[..n]).map_err(|e| bad(e.0))?;
        let chan_reply = |error: i32, body: &[u8]| {
            let len = abi::OUT_HEADER_LEN + body.len();
            let header = abi::out_header(len, -error, h.unique);
            // SAFETY: writing from live buffers to an open fd.
            let iov = [
                libc::iovec { iov_base: header.as_ptr() as *mut _, iov_len: header.len() },
                libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() },
            ];
            let r = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), 2) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let Ok(Op::Init { major, minor, max_readahead, flags }) = op else {
            chan_reply(libc::EIO, &[])?;
            return Err(bad("the first request was not INIT"));
        };
        return match conn::negotiate(major, minor, max_readahead, flags) {
            Ok((state, out)) => {
                chan_reply(0, &abi::init_out(&out))?;
                Ok(state)
            }
            Err(e) => {
                let _ = chan_reply(libc::EPROTO, &[]);
                Err(e)
            }
        };
    }
}

/// Serve a connection that another process set up and handed over
/// (`device` is a duplicate of its /dev/fuse file, `state` what its INIT
/// fixed), mounted at `mountpoint`. Requests the previous server read and
/// did not answer are asked for again when the kernel can resend them
/// ([`ConnState::can_resend`]); their callers never see the restart.
pub fn adopt(
    fs: impl ReadOnlyFs,
    device: OwnedFd,
    state: ConnState,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<Mount> {
    let mut m = serve(fs, device, state, mountpoint, opts)?;
    // The mount's read-ahead is the kernel's, set when it was made.
    m.read_ahead = Ok(opts.read_ahead_kb);
    if state.can_resend() {
        resend(m.device())?;
    }
    Ok(m)
}

/// Start the reader threads on `dev`.
fn serve(
    fs: impl ReadOnlyFs,
    dev: OwnedFd,
    state: ConnState,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<Mount> {
    conn::set_nonblocking(dev.as_fd())?;
    let chan = Arc::new(Chan::new(dev));
    let server = Arc::new(Server { fs, chan: chan.clone(), state });
    let stop = Arc::new(Stop::new()?);
    let threads = opts.threads.clamp(1, MAX_THREADS);
    let mut m = Mount {
        path: mountpoint.to_path_buf(),
        chan,
        state,
        stop,
        readers: Vec::with_capacity(threads),
        read_ahead: Ok(0),
        owned: true,
    };
    for i in 0..threads {
        let (server, stop) = (server.clone(), m.stop.clone());
        let t = std::thread::Builder::new()
            .name(format!("fuse-{i}"))
            .spawn(move || reader(&server, &stop))
            .inspect_err(|_| m.stop.signal())?;
        m.readers.push(t);
    }
    Ok(m)
}

/// One reader: wait, read a request, handle it; until stopped or the
/// connection ends.
fn reader<F: ReadOnlyFs>(server: &Server<F>, stop: &Stop) {
    let mut buf = vec![0u8; server.state.read_buffer()];
    let fd = server.chan.fd();
    loop {
        match conn::wait(fd, Some(stop), -1) {
            Ok(Wait::Readable) => {}
            Ok(Wait::Stopped | Wait::Gone) => return,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        match conn::read_request(fd, &mut buf) {
            Ok(Got::Request(n)) => server.handle(&buf[..n]),
            Ok(Got::Nothing) => {}
            Ok(Got::Gone) => return,
            // Unexpected (EINVAL would mean a buffer too small for this
            // connection): do not spin on it.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Handle one request as a mount's reader would, on a connection of its
/// own, and return every reply written, each as the kernel would read it
/// (a header and its payload). For the fuzz target and tests only.
#[doc(hidden)]
pub fn handle_one(fs: impl ReadOnlyFs, state: ConnState, request: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds nothing else owns.
    let (rd, wr) = unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Drained while replies are written: a reply can be larger than a pipe.
    let drain = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut rd = rd;
        rd.read_to_end(&mut all).map(|_| all)
    });
    {
        let server = Server { fs, chan: Arc::new(Chan::new(wr)), state };
        server.handle(request);
    }
    let all = drain.join().map_err(|_| io::Error::other("the drain thread panicked"))??;
    let mut out = Vec::new();
    let mut at = 0;
    while at < all.len() {
        let len = all.get(at..at + 4).map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize);
        if len < abi::OUT_HEADER_LEN || at + len > all.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a reply whose length is not what was written"));
        }
        out.push(all[at..at + len].to_vec());
        at += len;
    }
    Ok(out)
}

/// `umount2(path, 0)`.
fn umount(path: &Path) -> io::Result<()> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the read-ahead window of the FUSE mount at `mountpoint` through its
/// backing device in sysfs (`/sys/class/bdi/<major>:<minor>/read_ahead_kb`).
/// The device number comes from mountinfo, so nothing is asked of the
/// filesystem itself (mountinfo shows the path with symlinks resolved: the
/// parent is resolved here, the mountpoint itself is not touched).
fn set_read_ahead(mountpoint: &Path, kb: u32) -> io::Result<()> {
    let mountpoint = match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)?.join(name),
        _ => mountpoint.to_path_buf(),
    };
    // The last match is the top mount.
    let dev =
        mountinfo()?.into_iter().filter(|m| m.mountpoint == mountpoint).map(|m| m.dev).last().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{} is not in mountinfo", mountpoint.display()))
        })?;
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    std::fs::write(&path, kb.to_string()).map_err(|e| io::Error::new(e.kind(), format!("write {path}: {e}")))
}

/// The start of every mount's source (fsname): how our mounts are told
/// from other FUSE mounts.
pub const FSNAME_PREFIX: &str = "hyperbox:";

/// FUSE mounts of ours at or below `root`, from `/proc/self/mountinfo`:
/// what a crashed daemon left behind. The kernel shows our mounts as type
/// `fuse` (the subtype is not passed to mount(2) without fusermount) with
/// the source `hyperbox:...` that `mount` gives them.
pub fn stale_mounts(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for m in mountinfo()? {
        let ours = m.fstype == "fuse.hyperbox" || (m.fstype == "fuse" && m.source.starts_with(FSNAME_PREFIX));
        if ours && m.mountpoint.starts_with(root) {
            out.push(m.mountpoint);
        }
    }
    Ok(out)
}

/// One line of `/proc/self/mountinfo`, the fields we use.
struct MountInfo {
    /// `major:minor` of the mount's device.
    dev: String,
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

/// This process's mounts, in mountinfo's order (a later mount on the same
/// path is on top).
fn mountinfo() -> io::Result<Vec<MountInfo>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options [optional...] - fstype source super
            let f: Vec<&str> = line.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some(MountInfo {
                dev: f.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(f.get(4)?)),
                fstype: f.get(dash + 1).copied().unwrap_or("").to_string(),
                source: f.get(dash + 2).copied().unwrap_or("").to_string(),
            })
        })
        .collect())
}

/// Detach a mount (`umount2(MNT_DETACH)`): it goes away once unused.
pub fn detach(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The workspace's one check of a test's prerequisites (tests/common/skip.rs:
/// `HYPERBOX_REQUIRE_E2E=1` fails a test that lacks one, anything else skips
/// it), shared with the integration tests rather than copied.
#[cfg(test)]
#[allow(dead_code)] // this crate's tests use a part of it
#[path = "../../tests/common/skip.rs"]
mod skip;

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
    }
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A root holding a file `f` and a symlink `l` to it, counting what the
    /// kernel asks for.
    #[derive(Default)]
    struct Counted {
        lookups: AtomicUsize,
        readdirs: AtomicUsize,
        readlinks: AtomicUsize,
        reads: AtomicUsize,
    }

    const DATA: &[u8] = b"hello, layer\n";

    fn attr(ino: u64) -> Attr {
        let (kind, size, perm) = match ino {
            1 => (Kind::Dir, 0, 0o755),
            2 => (Kind::File, DATA.len() as u64, 0o644),
            _ => (Kind::Symlink, 1, 0o777),
        };
        Attr { ino, kind, size, perm, nlink: 1, uid: 0, gid: 0, rdev: 0, mtime: 0, mtime_nsec: 0 }
    }

    impl ReadOnlyFs for Arc<Counted> {
        fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno32> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            match (parent, name) {
                (1, b"f") => Ok(attr(2)),
                (1, b"l") => Ok(attr(3)),
                _ => Err(libc::ENOENT),
            }
        }
        fn getattr(&self, ino: u64) -> Result<Attr, Errno32> {
            Ok(attr(ino))
        }
        fn readlink(&self, _ino: u64) -> Result<Vec<u8>, Errno32> {
            self.readlinks.fetch_add(1, Ordering::SeqCst);
            Ok(b"f".to_vec())
        }
        fn readdir(
            &self,
            _ino: u64,
            offset: u64,
            add: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool,
        ) -> Result<(), Errno32> {
            self.readdirs.fetch_add(1, Ordering::SeqCst);
            let all: [(u64, Kind, &[u8]); 4] =
                [(1, Kind::Dir, b"."), (1, Kind::Dir, b".."), (2, Kind::File, b"f"), (3, Kind::Symlink, b"l")];
            for (i, (ino, kind, name)) in all.iter().enumerate().skip(offset as usize) {
                if add(*ino, i as u64 + 1, *kind, name) {
                    break;
                }
            }
            Ok(())
        }
        fn readdirplus(
            &self,
            ino: u64,
            offset: u64,
            add: &mut dyn FnMut(&Attr, u64, &[u8]) -> bool,
        ) -> Result<(), Errno32> {
            self.readdir(ino, offset, &mut |child, next, _, name| add(&attr(child), next, name))
        }
        fn getxattr(&self, _ino: u64, _name: &[u8]) -> Result<Vec<u8>, Errno32> {
            Err(libc::ENODATA)
        }
        fn listxattr(&self, _ino: u64) -> Result<Vec<u8>, Errno32> {
            Ok(Vec::new())
        }
        fn read(&self, _ino: u64, offset: u64, size: u32, _pid: u32, reply: ReadReply) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let start = (offset as usize).min(DATA.len());
            let end = (start + size as usize).min(DATA.len());
            // In three slices (one writev), as layer reads are answered.
            let (a, b) = (start + (end - start) / 3, start + 2 * (end - start) / 3);
            reply.data_parts(&[&DATA[start..a], &DATA[a..b], &DATA[b..end]]);
        }
    }

    /// Any time an index can hold goes to the kernel as it is, without
    /// panicking (an mtime near i64::MAX with nanoseconds past a second used
    /// to overflow in the FUSE worker), nanoseconds cut to a second's.
    #[test]
    fn extreme_times_do_not_panic() {
        for secs in [i64::MAX, i64::MAX - 1, i64::MIN, i64::MIN + 1, -1, 0, 1] {
            for nsec in [0, 1, 999_999_999, 1_000_000_000, u32::MAX] {
                let w = Attr { mtime: secs, mtime_nsec: nsec, ..attr(2) }.wire();
                assert_eq!(w.time, secs);
                assert_eq!(w.time_nsec, nsec.min(999_999_999));
            }
        }
        assert_eq!(attr(2).wire().mode, libc::S_IFREG | 0o644);
        assert_eq!(Kind::Dir.dtype(), u32::from(libc::DT_DIR));
    }

    /// A filesystem that panics where told: a lookup of a name starting
    /// with `boom`, a read, a listing.
    struct Fragile;

    impl ReadOnlyFs for Fragile {
        fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno32> {
            match (parent, name) {
                (1, b"f") => Ok(attr(2)),
                (1, n) if n.starts_with(b"boom") => panic!("a handler that fails internally"),
                _ => Err(libc::ENOENT),
            }
        }
        fn getattr(&self, ino: u64) -> Result<Attr, Errno32> {
            Ok(attr(ino))
        }
        fn readlink(&self, _ino: u64) -> Result<Vec<u8>, Errno32> {
            Err(libc::EINVAL)
        }
        fn readdir(&self, _: u64, _: u64, _: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool) -> Result<(), Errno32> {
            panic!("a listing that fails internally")
        }
        fn readdirplus(&self, _: u64, _: u64, _: &mut dyn FnMut(&Attr, u64, &[u8]) -> bool) -> Result<(), Errno32> {
            panic!("a listing that fails internally")
        }
        fn getxattr(&self, _ino: u64, _name: &[u8]) -> Result<Vec<u8>, Errno32> {
            Err(libc::ENODATA)
        }
        fn listxattr(&self, _ino: u64) -> Result<Vec<u8>, Errno32> {
            Ok(Vec::new())
        }
        fn read(&self, _ino: u64, _offset: u64, _size: u32, _pid: u32, _reply: ReadReply) {
            panic!("a read that fails internally")
        }
    }

    /// Requests that fail inside the filesystem (here: panic) answer EIO,
    /// and the mount keeps answering, even with a single FUSE thread.
    #[test]
    fn a_mount_keeps_answering_after_a_handler_fails() {
        use crate::skip::{have, Need};
        if !have("a_mount_keeps_answering_after_a_handler_fails", &[Need::Root, Need::Path("/dev/fuse")]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let m = mount(Fragile, dir.path(), "hyperbox-test", &MountOptions { threads: 1, read_ahead_kb: 0 }).unwrap();
        let root = m.path().to_path_buf();
        // Each step in a thread of its own, so a mount that stopped answering
        // fails the test instead of hanging it.
        let step = |what: &'static str, f: Box<dyn FnOnce() -> Option<i32> + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(f()));
            rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what}: the mount stopped answering"))
        };
        let errno = |r: io::Result<()>| r.err().map(|e| e.raw_os_error().unwrap_or(0));
        for round in 0..3 {
            let r = root.clone();
            let boom = format!("boom{round}");
            assert_eq!(
                step("lookup", Box::new(move || errno(std::fs::metadata(r.join(boom)).map(drop)))),
                Some(libc::EIO)
            );
            let r = root.clone();
            assert_eq!(step("read", Box::new(move || errno(std::fs::read(r.join("f")).map(drop)))), Some(libc::EIO));
            let r = root.clone();
            assert_eq!(
                step(
                    "readdir",
                    Box::new(move || errno(std::fs::read_dir(r).and_then(|d| d.map(|e| e.map(drop)).collect())))
                ),
                Some(libc::EIO)
            );
            let r = root.clone();
            assert_eq!(
                step("lookup after failures", Box::new(move || errno(std::fs::metadata(r.join("f")).map(drop)))),
                None
            );
        }
        m.unmount().unwrap();
    }

    /// The kernel keeps what a layer cannot change: a second listing, a
    /// second readlink and a second read of a file, each through a new open,
    /// reach the daemon no more than the first did; and the first listing
    /// carries the entries' attributes, so no entry is looked up after it.
    #[test]
    fn the_kernel_caches_listings_links_and_pages_across_opens() {
        use crate::skip::{have, Need};
        if !have("the_kernel_caches_listings_links_and_pages_across_opens", &[Need::Root, Need::Path("/dev/fuse")]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(Counted::default());
        let m = mount(fs.clone(), dir.path(), "hyperbox-test", &MountOptions::default()).unwrap();
        let list = || {
            let mut names: Vec<_> = std::fs::read_dir(m.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            names
        };
        for pass in 0..3 {
            assert_eq!(list(), ["f", "l"], "pass {pass}");
            assert_eq!(std::fs::read_link(m.path().join("l")).unwrap(), Path::new("f"), "pass {pass}");
            assert_eq!(std::fs::read(m.path().join("f")).unwrap(), DATA, "pass {pass}");
            assert_eq!(std::fs::read(m.path().join("l")).unwrap(), DATA, "pass {pass}");
        }
        let offered = m.state().offered;
        let count = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        // Each cache is checked where the kernel offers it (all of them on
        // Linux 5.1 and later); the fallbacks must at least read right.
        let check = |flag: u64, what: &str| {
            let yes = offered & flag != 0;
            if !yes {
                eprintln!("NOT CHECKED: {what}: the kernel does not offer flag {flag:#x}");
            }
            yes
        };
        // Six opens of files and three of the directory: zero-message opens
        // leave one of each, the one answered ENOSYS.
        if check(abi::flag::NO_OPEN_SUPPORT, "zero-message opens") {
            assert_eq!(count(&m.chan.opens), 1, "opens reached the daemon after ENOSYS");
        }
        if check(abi::flag::NO_OPENDIR_SUPPORT, "zero-message opendirs") {
            assert_eq!(count(&m.chan.opendirs), 1, "opendirs reached the daemon after ENOSYS");
        }
        // One listing: one call for the entries, one more that finds the end.
        assert_eq!(count(&fs.readdirs), 2, "listings reached the daemon again");
        assert_eq!(count(&fs.reads), 1, "file pages were dropped on open");
        if check(abi::flag::CACHE_SYMLINKS, "cached symlinks") {
            assert_eq!(count(&fs.readlinks), 1, "readlink reached the daemon again");
        }
        if check(abi::flag::DO_READDIRPLUS, "readdirplus") {
            assert_eq!(count(&fs.lookups), 0, "entries were looked up after the listing");
        }
        // What statfs(2) reports: overlayfs takes the name length as the
        // longest name it may look up in a lower layer.
        let st = statfs(m.path());
        assert_eq!((st.f_namelen, st.f_bsize, st.f_frsize), (255, 512, 512));
        m.unmount().unwrap();
    }

    fn statfs(p: &Path) -> libc::statfs {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a zeroed statfs is valid; statfs fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
        st
    }
}

/// Serving a live connection after its server died: the kernel keeps the
/// connection while a duplicate of its device file is open, and a new
/// server picks it up with the saved INIT state.
#[cfg(test)]
mod restart_tests {
    use super::*;
    use crate::skip::{have, Need};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::mpsc;

    const DATA: &[u8] = b"served across a restart\n";

    /// A root with `slow` (ino 2) and `other` (ino 3). With `hold`, the
    /// first read is never answered: its reply is forgotten, as a server
    /// that dies with a request in hand forgets it.
    struct Gate {
        hold: bool,
        held: AtomicBool,
        reads: AtomicUsize,
    }

    fn gate(hold: bool) -> Gate {
        Gate { hold, held: AtomicBool::new(false), reads: AtomicUsize::new(0) }
    }

    fn attr(ino: u64) -> Attr {
        let (kind, size, perm) = if ino == 1 { (Kind::Dir, 0, 0o755) } else { (Kind::File, DATA.len() as u64, 0o644) };
        Attr { ino, kind, size, perm, nlink: 1, uid: 0, gid: 0, rdev: 0, mtime: 0, mtime_nsec: 0 }
    }

    impl ReadOnlyFs for Arc<Gate> {
        fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, Errno32> {
            match (parent, name) {
                (1, b"slow") => Ok(attr(2)),
                (1, b"other") => Ok(attr(3)),
                _ => Err(libc::ENOENT),
            }
        }
        fn getattr(&self, ino: u64) -> Result<Attr, Errno32> {
            Ok(attr(ino))
        }
        fn readlink(&self, _: u64) -> Result<Vec<u8>, Errno32> {
            Err(libc::EINVAL)
        }
        fn readdir(&self, _: u64, _: u64, _: &mut dyn FnMut(u64, u64, Kind, &[u8]) -> bool) -> Result<(), Errno32> {
            Err(libc::ENOSYS)
        }
        fn readdirplus(&self, _: u64, _: u64, _: &mut dyn FnMut(&Attr, u64, &[u8]) -> bool) -> Result<(), Errno32> {
            Err(libc::ENOSYS)
        }
        fn getxattr(&self, _: u64, _: &[u8]) -> Result<Vec<u8>, Errno32> {
            Err(libc::ENODATA)
        }
        fn listxattr(&self, _: u64) -> Result<Vec<u8>, Errno32> {
            Ok(Vec::new())
        }
        fn read(&self, _ino: u64, offset: u64, size: u32, _pid: u32, reply: ReadReply) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.hold && !self.held.swap(true, Ordering::SeqCst) {
                println!("HBCHILD pending");
                std::mem::forget(reply);
                return;
            }
            let start = (offset as usize).min(DATA.len());
            reply.data(&DATA[start..(start + size as usize).min(DATA.len())]);
        }
    }

    /// The server process of [`a_killed_servers_connection_is_served_again`]:
    /// runs only when that test starts this binary with `HB_FUSE_CHILD`.
    #[test]
    fn restart_child() {
        let Some(dir) = std::env::var_os("HB_FUSE_CHILD") else { return };
        let m = mount(Arc::new(gate(true)), Path::new(&dir), "hyperbox-test", &MountOptions::default()).unwrap();
        let state: String = m.state().to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        println!("HBCHILD fd={} state={state}", m.device().as_raw_fd());
        std::mem::forget(m);
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    /// Spawn a thread that reads `path` and reports the result.
    fn read_in_thread(path: PathBuf) -> mpsc::Receiver<io::Result<Vec<u8>>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(std::fs::read(path)));
        rx
    }

    /// A server process is SIGKILLed while a read it took is unanswered;
    /// the reader neither fails nor sees the restart: a new server adopts
    /// the connection from a kept duplicate of its device file, the kernel
    /// sends the lost read again, and it gets the right bytes.
    #[test]
    fn a_killed_servers_connection_is_served_again() {
        let name = "a_killed_servers_connection_is_served_again";
        if !have(name, &[Need::Root, Need::Path("/dev/fuse")]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "restart_tests::restart_child", "--nocapture", "--test-threads=1"])
            .env("HB_FUSE_CHILD", dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next = |prefix: &str| loop {
            let l = lines.next().expect("the child server ended").unwrap();
            // The harness prints the test's name on the same line first.
            if let Some(at) = l.find(prefix) {
                return l[at + prefix.len()..].to_string();
            }
        };
        let first = next("HBCHILD fd=");
        let (fd, state) = first.split_once(" state=").unwrap();
        let fd: i32 = fd.parse().unwrap();
        let bytes: Vec<u8> =
            (0..state.len()).step_by(2).map(|i| u8::from_str_radix(&state[i..i + 2], 16).unwrap()).collect();
        let state = ConnState::from_bytes(&bytes).unwrap();
        if !state.can_resend() {
            let _ = child.kill();
            let _ = detach(dir.path());
            println!("SKIPPED {name}: the kernel does not offer FUSE_NOTIFY_RESEND (Linux 6.9 and later)");
            return;
        }
        // Keep a duplicate of the child's device file, as the fd holder
        // or systemd's fd store does.
        // SAFETY: plain syscalls; results checked.
        let dev = unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, child.id() as libc::c_int, 0) as i32;
            assert!(pidfd >= 0, "pidfd_open: {}", io::Error::last_os_error());
            let dev = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
            assert!(dev >= 0, "pidfd_getfd: {}", io::Error::last_os_error());
            libc::close(pidfd);
            OwnedFd::from_raw_fd(dev)
        };
        let slow = read_in_thread(dir.path().join("slow"));
        next("HBCHILD pending");
        child.kill().unwrap();
        child.wait().unwrap();
        // The read waits for a server; it does not fail.
        assert!(
            matches!(slow.recv_timeout(Duration::from_millis(500)), Err(mpsc::RecvTimeoutError::Timeout)),
            "the read ended when its server died"
        );
        let fs = Arc::new(gate(false));
        let m = adopt(fs.clone(), dev, state, dir.path(), &MountOptions::default()).unwrap();
        let got = slow.recv_timeout(Duration::from_secs(20)).expect("the lost read was not served again");
        assert_eq!(got.unwrap(), DATA);
        assert_eq!(fs.reads.load(Ordering::SeqCst), 1, "the resent read reached the new server once");
        // Inodes the kernel knows from the dead server still work, and so
        // do new lookups.
        assert_eq!(std::fs::read(dir.path().join("other")).unwrap(), DATA);
        assert!(std::fs::metadata(dir.path().join("missing")).is_err());
        m.unmount().unwrap();
    }

    /// A graceful stop: `leave` answers what it read, leaves the mount up,
    /// and a new server on a duplicate of the device serves it; nothing is
    /// resent twice.
    #[test]
    fn a_left_mount_stays_up_and_is_served_again() {
        let name = "a_left_mount_stays_up_and_is_served_again";
        if !have(name, &[Need::Root, Need::Path("/dev/fuse")]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let first = Arc::new(gate(false));
        let m =
            mount(first.clone(), dir.path(), "hyperbox-test", &MountOptions { threads: 2, read_ahead_kb: 0 }).unwrap();
        assert_eq!(std::fs::read(dir.path().join("slow")).unwrap(), DATA);
        let state = m.state();
        let dev = m.device().try_clone_to_owned().unwrap();
        assert_eq!(m.leave(Duration::from_secs(5)), 0);
        let still = mountinfo().unwrap().into_iter().any(|i| i.mountpoint == dir.path().canonicalize().unwrap());
        assert!(still, "leave unmounted");
        // A request made while nobody serves waits for the next server.
        let other = read_in_thread(dir.path().join("other"));
        assert!(matches!(other.recv_timeout(Duration::from_millis(300)), Err(mpsc::RecvTimeoutError::Timeout)));
        let second = Arc::new(gate(false));
        let m = adopt(second.clone(), dev, state, dir.path(), &MountOptions::default()).unwrap();
        assert_eq!(other.recv_timeout(Duration::from_secs(20)).unwrap().unwrap(), DATA);
        assert_eq!(first.reads.load(Ordering::SeqCst), 1);
        assert_eq!(second.reads.load(Ordering::SeqCst), 1);
        m.unmount().unwrap();
    }
}
