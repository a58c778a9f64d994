//! One FUSE connection: the /dev/fuse file, the INIT it was set up with,
//! and the threads that read it.
//!
//! The design serves restarts. A connection has exactly one open file of
//! /dev/fuse (threads read duplicates of it, never `FUSE_DEV_IOC_CLONE`
//! clones), so every request read but not yet answered sits on that one
//! file's queue in the kernel; whoever keeps a duplicate of the file (the
//! systemd fd store, or the fd holder) keeps the connection and those
//! requests alive when this process dies. A new process serves the same
//! connection from the kept file with [`ConnState`], the parameters INIT
//! fixed (a live connection never sends INIT again), and asks the kernel to
//! send the lost requests again (`FUSE_NOTIFY_RESEND`, Linux 6.9).
//!
//! The file is non-blocking and each reader waits in `poll(2)` on it and on
//! an eventfd, so serving can stop between two requests: a graceful stop
//! abandons no request it has read.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::{self, flag};

/// What INIT fixed for the life of a connection, which a process that
/// adopts the connection must honour: the protocol minor both sides speak,
/// the flags the kernel offered and those we took, and the sizes agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState {
    pub minor: u32,
    /// What the kernel offered (`flags | flags2 << 32`).
    pub offered: u64,
    /// What we answered.
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
}

/// The version of [`ConnState::to_bytes`]'s layout.
const STATE_VERSION: u8 = 1;
const STATE_LEN: usize = 1 + 4 + 8 + 8 + 4 + 4 + 2;

impl ConnState {
    /// The kernel takes ENOSYS from OPEN as "never send OPEN or RELEASE
    /// again" (`FUSE_NO_OPEN_SUPPORT`, Linux 3.14).
    pub fn no_open(&self) -> bool {
        self.offered & flag::NO_OPEN_SUPPORT != 0
    }

    /// The same for OPENDIR and RELEASEDIR (`FUSE_NO_OPENDIR_SUPPORT`, 5.1).
    pub fn no_opendir(&self) -> bool {
        self.offered & flag::NO_OPENDIR_SUPPORT != 0
    }

    /// Whether the kernel can send lost requests again (6.9 and later).
    pub fn can_resend(&self) -> bool {
        self.offered & flag::HAS_RESEND != 0
    }

    /// A stable encoding, versioned, for the caller to persist.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STATE_LEN);
        b.push(STATE_VERSION);
        b.extend_from_slice(&self.minor.to_le_bytes());
        b.extend_from_slice(&self.offered.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.max_readahead.to_le_bytes());
        b.extend_from_slice(&self.max_write.to_le_bytes());
        b.extend_from_slice(&self.max_pages.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> io::Result<ConnState> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("saved FUSE connection state: {why}"));
        if b.first() != Some(&STATE_VERSION) {
            return Err(bad("unknown version"));
        }
        if b.len() != STATE_LEN {
            return Err(bad("wrong length"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let s = ConnState {
            minor: u32_at(1),
            offered: u64_at(5),
            flags: u64_at(13),
            max_readahead: u32_at(21),
            max_write: u32_at(25),
            max_pages: u16::from_le_bytes([b[29], b[30]]),
        };
        if !(abi::MIN_MINOR..=abi::MINOR).contains(&s.minor) {
            return Err(bad("a protocol minor this build does not speak"));
        }
        // A connection set up to send larger requests than we can read
        // would fail every read with EINVAL.
        if s.max_write > MAX_WRITE_ADOPTED {
            return Err(bad("max_write larger than this build reads"));
        }
        Ok(s)
    }

    /// The buffer one `read(2)` needs on this connection.
    pub(crate) fn read_buffer(&self) -> usize {
        (abi::IN_HEADER_LEN + abi::WRITE_IN_LEN + self.max_write as usize).max(READ_BUFFER)
    }
}

/// What we ask INIT for: a read-only filesystem takes no WRITE, so the
/// smallest write size there is, and each thread's read buffer stays small.
const MAX_WRITE: u32 = 4096;
/// The largest `max_write` of a connection we adopt.
const MAX_WRITE_ADOPTED: u32 = 16 << 20;
/// Each reader's buffer: room for any request a read-only mount gets (the
/// longest is a lookup or getxattr of a 255-byte name).
const READ_BUFFER: usize = 64 << 10;

/// Flags we take when offered. None is needed to be correct: async reads
/// (several reads of one file at once), reads of up to `max_pages`;
/// parallel lookups and readdirs in one directory (without it the kernel
/// serialises them on the directory's lock); symlink targets kept in the
/// page cache; and listings that carry each entry's attributes when the
/// kernel sees a listing followed by lookups of its entries (adaptive
/// readdirplus).
const WANTED: u64 = flag::ASYNC_READ
    | flag::BIG_WRITES
    | flag::MAX_PAGES
    | flag::PARALLEL_DIROPS
    | flag::CACHE_SYMLINKS
    | flag::DO_READDIRPLUS
    | flag::READDIRPLUS_AUTO;

/// The kernel's ceiling on `max_pages` (`fs.fuse.max_pages_limit`'s
/// default): reads of up to 1 MiB.
const MAX_PAGES: u16 = 256;

/// Decide the answer to an INIT the kernel sent.
pub(crate) fn negotiate(
    major: u32,
    minor: u32,
    max_readahead: u32,
    offered: u64,
) -> io::Result<(ConnState, abi::InitOut)> {
    if major != abi::MAJOR || minor < abi::MIN_MINOR {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the kernel speaks FUSE {major}.{minor}; at least {}.{} is needed", abi::MAJOR, abi::MIN_MINOR),
        ));
    }
    let state = ConnState {
        minor: minor.min(abi::MINOR),
        offered,
        flags: WANTED & offered,
        max_readahead,
        max_write: MAX_WRITE,
        max_pages: MAX_PAGES,
    };
    let out = abi::InitOut {
        minor: state.minor,
        max_readahead,
        flags: state.flags,
        max_background: 16,
        congestion_threshold: 12,
        max_write: MAX_WRITE,
        time_gran: 1,
        max_pages: MAX_PAGES,
    };
    Ok((state, out))
}

/// The connection's /dev/fuse file, shared by the readers and by every
/// reply still to be sent.
pub(crate) struct Chan {
    fd: OwnedFd,
    /// Requests read and handed to the filesystem, not yet answered.
    pub(crate) inflight: AtomicUsize,
    /// OPEN and OPENDIR requests that reached this connection's server.
    #[cfg(test)]
    pub(crate) opens: AtomicUsize,
    #[cfg(test)]
    pub(crate) opendirs: AtomicUsize,
}

impl Chan {
    pub(crate) fn new(fd: OwnedFd) -> Chan {
        Chan {
            fd,
            inflight: AtomicUsize::new(0),
            #[cfg(test)]
            opens: AtomicUsize::new(0),
            #[cfg(test)]
            opendirs: AtomicUsize::new(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn seen(&self, op: &abi::Op<'_>) {
        match op {
            abi::Op::Open => self.opens.fetch_add(1, Ordering::SeqCst),
            abi::Op::Opendir => self.opendirs.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Send one reply. A request that is gone (its caller interrupted, or
    /// answered already after a resend) is not an error; nor is a
    /// connection that ended: there is nobody left to tell.
    pub(crate) fn reply(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        let len: usize = abi::OUT_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = abi::out_header(len, -error, unique);
        let mut iov = Vec::with_capacity(parts.len() + 1);
        iov.push(IoSlice::new(&header));
        iov.extend(parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)));
        let _ = self.write(&iov);
    }

    pub(crate) fn write(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            // SAFETY: IoSlice is ABI-compatible with iovec; the fd is open.
            let n = unsafe {
                libc::writev(self.fd.as_raw_fd(), iov.as_ptr() as *const libc::iovec, iov.len() as libc::c_int)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Ask the kernel to send again every request of this connection that was
/// read and not answered. `Ok(false)`: the kernel does not know the
/// notification (before 6.9).
pub fn resend(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let n = abi::notify_resend();
    // SAFETY: writing 16 bytes from a live buffer to an open fd.
    let r = unsafe { libc::write(fd.as_raw_fd(), n.as_ptr().cast(), n.len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EINVAL) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

/// An eventfd that, once written, stays readable: every reader sees it.
pub(crate) struct Stop(OwnedFd);

impl Stop {
    pub(crate) fn new() -> io::Result<Stop> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        Ok(Stop(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes to an eventfd we own.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

pub(crate) enum Wait {
    Readable,
    Stopped,
    /// The connection ended (unmounted or aborted).
    Gone,
}

/// Wait until `fd` has a request or `stop` is signalled. `timeout` in ms
/// (-1: none); a timeout counts as readable (the caller reads and gets
/// EAGAIN).
pub(crate) fn wait(fd: BorrowedFd<'_>, stop: Option<&Stop>, timeout: i32) -> io::Result<Wait> {
    let mut fds = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.map_or(-1, |s| s.0.as_raw_fd()), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: two valid pollfds (a negative fd is ignored by poll).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if fds[1].revents != 0 {
        return Ok(Wait::Stopped);
    }
    if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && fds[0].revents & libc::POLLIN == 0 {
        return Ok(Wait::Gone);
    }
    Ok(Wait::Readable)
}

pub(crate) enum Got {
    Request(usize),
    /// Nothing to read now (another reader took it, or it was interrupted).
    Nothing,
    Gone,
}

/// One `read(2)` of a request.
pub(crate) fn read_request(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Got> {
    // SAFETY: reading into a live, writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Got::Request(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // EAGAIN: empty queue; EINTR: a signal; ENOENT: the request was
        // interrupted before we could read it.
        Some(libc::EAGAIN | libc::EINTR | libc::ENOENT) => Ok(Got::Nothing),
        // ENODEV: unmounted; ECONNABORTED: aborted through fusectl.
        Some(libc::ENODEV | libc::ECONNABORTED) => Ok(Got::Gone),
        _ => Err(e),
    }
}

pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Wait until no request is in flight, at most `grace`.
pub(crate) fn drain(chan: &Chan, grace: Duration) -> usize {
    let until = Instant::now() + grace;
    loop {
        let n = chan.inflight.load(Ordering::SeqCst);
        if n == 0 || Instant::now() >= until {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A shared handle for replies sent later.
pub(crate) type ChanRef = Arc<Chan>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_refuses_what_it_cannot_serve() {
        let (s, out) = negotiate(7, 41, 131072, WANTED | flag::NO_OPEN_SUPPORT | flag::HAS_RESEND).unwrap();
        assert_eq!(s.minor, abi::MINOR);
        assert_eq!(out.minor, abi::MINOR);
        assert!(s.no_open() && !s.no_opendir() && s.can_resend());
        assert_eq!(s.flags, WANTED);
        assert_eq!(ConnState::from_bytes(&s.to_bytes()).unwrap(), s);
        let mut b = s.to_bytes();
        b[0] = 9;
        assert!(ConnState::from_bytes(&b).is_err());
        assert!(ConnState::from_bytes(&s.to_bytes()[..10]).is_err());
        let big = ConnState { max_write: 64 << 20, ..s };
        assert!(ConnState::from_bytes(&big.to_bytes()).is_err());
        let old = ConnState { minor: 20, ..s };
        assert!(ConnState::from_bytes(&old.to_bytes()).is_err());
        assert!(negotiate(7, 30, 0, 0).is_err());
        assert!(negotiate(8, 40, 0, 0).is_err());
        // An older kernel is answered in its own minor.
        assert_eq!(negotiate(7, 34, 0, 0).unwrap().0.minor, 34);
        assert_eq!(s.read_buffer(), READ_BUFFER);
    }
}
