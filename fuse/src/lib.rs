//! The FUSE adapter of HyperBox: the only crate that names `fuser`.
//!
//! A read-only filesystem implements [`ReadOnlyFs`] with plain types (inode
//! numbers, byte-string names, errno values); [`mount`] serves it through
//! `fuser`, one call and one reply per operation. Reads get a [`ReadReply`]
//! they may answer later from another thread, so a read waiting on the
//! network never holds a FUSE worker: lookups, getattr and local reads keep
//! flowing. The kernel caches hard, because a layer never changes: entries
//! and attributes for a day, file pages across opens, directory listings and
//! symlink targets. Opening a file or a directory costs the daemon nothing:
//! where the kernel supports it, `open` and `opendir` answer ENOSYS once and
//! the kernel stops asking (zero-message opens, which imply
//! `FOPEN_KEEP_CACHE` and `FOPEN_CACHE_DIR`); on older kernels `open`
//! answers `FOPEN_KEEP_CACHE` itself.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request, SessionACL,
};

/// How long the kernel may cache entries and attributes: layers are immutable.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Most FUSE worker threads one mount gets, whatever it asks for: each
/// holds a clone of the FUSE fd and a 1 MiB request buffer.
pub const MAX_THREADS: usize = 64;

/// Run one handler's body. A panic in it (a bug, or input no check
/// foresaw) answers EIO instead of killing the FUSE worker thread: with
/// the thread gone the mount would stop answering, and every `stat` or
/// `df` on the host that touches it would hang. The panic itself is
/// reported by the process's panic hook.
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
    /// true when the reply buffer is full: stop then.
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
pub struct ReadReply(Option<ReplyData>);

impl ReadReply {
    pub fn data(mut self, data: &[u8]) {
        if let Some(r) = self.0.take() {
            r.data(data);
        }
    }
    pub fn error(mut self, errno: Errno32) {
        if let Some(r) = self.0.take() {
            r.error(Errno::from_i32(errno));
        }
    }
}

impl Drop for ReadReply {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.error(Errno::EIO);
        }
    }
}

struct Adapter<F> {
    fs: F,
    /// The kernel takes ENOSYS from `open` as "never send OPEN or RELEASE
    /// again" (`FUSE_NO_OPEN_SUPPORT`, Linux 3.14 and later).
    no_open: bool,
    /// The same for OPENDIR and RELEASEDIR (`FUSE_NO_OPENDIR_SUPPORT`, 5.1).
    no_opendir: bool,
}

/// What the adapter asks of the kernel beyond fuser's defaults (async reads,
/// `max_pages`), each only if the kernel offers it: none is needed to be
/// correct. Parallel lookups and readdirs in one directory (without it the
/// kernel serialises them on the directory's lock); symlink targets kept in
/// the page cache; and listings that carry each entry's attributes when the
/// kernel sees a listing followed by lookups of its entries (adaptive
/// readdirplus), so a program that lists a directory and then stats or opens
/// what it found costs one request instead of one per entry.
const WANTED: InitFlags = InitFlags::FUSE_PARALLEL_DIROPS
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_READDIRPLUS_AUTO);

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

/// `secs` seconds and `nsec` nanoseconds from the epoch, for any values:
/// nanoseconds past a second are cut to 999,999,999, and a time the clock
/// cannot hold becomes the nearest one it can (on Linux every i64 second
/// fits, so nothing is lost there).
pub fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    let whole = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole).and_then(|t| t.checked_add(nsec))
    } else {
        UNIX_EPOCH.checked_sub(whole).and_then(|t| t.checked_add(nsec))
    };
    t.unwrap_or_else(|| {
        // Out of the clock's range: halve toward the epoch until it fits.
        let mut s = secs / 2;
        loop {
            let d = Duration::from_secs(s.unsigned_abs());
            let t = if s >= 0 { UNIX_EPOCH.checked_add(d) } else { UNIX_EPOCH.checked_sub(d) };
            match t {
                Some(t) => return t,
                None => s /= 2,
            }
        }
    })
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = system_time(a.mtime, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Errno32>) {
    match r {
        Err(e) => reply.error(Errno::from_i32(e)),
        // A value longer than u32::MAX bytes cannot be answered; the
        // index bounds xattrs far below that.
        Ok(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
    }
}

impl<F: ReadOnlyFs> Filesystem for Adapter<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let offered = config.capabilities();
        #[cfg(test)]
        tests::SEEN.offered.store(offered.bits(), std::sync::atomic::Ordering::SeqCst);
        // Cannot fail: only offered flags are asked for.
        let _ = config.add_capabilities(WANTED & offered);
        self.no_open = offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.no_opendir = offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match guarded(|| self.fs.lookup(parent.0, name.as_bytes())) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match guarded(|| self.fs.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match guarded(|| self.fs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        #[cfg(test)]
        tests::SEEN.opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.no_open {
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        #[cfg(test)]
        tests::SEEN.opendirs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.no_opendir {
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    /// Nothing to flush on a read-only filesystem; ENOSYS tells the kernel
    /// not to ask again.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // A panic drops the ReadReply unsent, which answers EIO.
        let pid = req.pid();
        let _ = catch_unwind(AssertUnwindSafe(|| self.fs.read(ino.0, offset, size, pid, ReadReply(Some(reply)))));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = guarded(|| {
            self.fs.readdir(ino.0, offset, &mut |child, next, kind, name| {
                reply.add(INodeNo(child), next, file_type(kind), OsStr::from_bytes(name))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let r = guarded(|| {
            self.fs.readdirplus(ino.0, offset, &mut |a, next, name| {
                reply.add(INodeNo(a.ino), next, OsStr::from_bytes(name), &TTL, &file_attr(a), Generation(0))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, guarded(|| self.fs.getxattr(ino.0, name.as_bytes())));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, guarded(|| self.fs.listxattr(ino.0)));
    }
}

/// A mounted filesystem; unmounted when dropped or by [`Mount::unmount`].
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
    read_ahead: io::Result<u32>,
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

    /// Unmount and wait for the session's threads to finish.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// How a filesystem is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// FUSE worker threads, 1 to [`MAX_THREADS`] (other values are taken
    /// to the nearest).
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
    let threads = opts.threads.clamp(1, MAX_THREADS);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("hyperbox".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(threads);
    cfg.clone_fd = threads > 1;
    let session = fuser::spawn_mount(Adapter { fs, no_open: false, no_opendir: false }, mountpoint, &cfg)?;
    let mut mount = Mount { session: Some(session), path: mountpoint.to_path_buf(), read_ahead: Ok(0) };
    if opts.read_ahead_kb > 0 {
        mount.read_ahead = set_read_ahead(mountpoint, opts.read_ahead_kb).map(|()| opts.read_ahead_kb);
    }
    Ok(mount)
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
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// What reached the adapter itself (the crate's one mount test reads it).
    pub(super) struct Seen {
        pub(super) offered: AtomicU64,
        pub(super) opens: AtomicUsize,
        pub(super) opendirs: AtomicUsize,
    }
    pub(super) static SEEN: Seen =
        Seen { offered: AtomicU64::new(0), opens: AtomicUsize::new(0), opendirs: AtomicUsize::new(0) };

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
            reply.data(&DATA[start..(start + size as usize).min(DATA.len())]);
        }
    }

    /// Any time an index can hold becomes a SystemTime without panicking
    /// (an mtime near i64::MAX with nanoseconds past a second used to
    /// overflow in the FUSE worker), and ordinary ones are exact.
    #[test]
    fn extreme_times_do_not_panic() {
        for secs in [i64::MAX, i64::MAX - 1, i64::MIN, i64::MIN + 1, -1, 0, 1] {
            for nsec in [0, 1, 999_999_999, 1_000_000_000, u32::MAX] {
                let a = Attr { mtime: secs, mtime_nsec: nsec, ..attr(2) };
                let _ = file_attr(&a);
            }
        }
        assert_eq!(system_time(1_700_000_000, 5), UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        assert_eq!(system_time(-2, 500), UNIX_EPOCH - Duration::new(1, 999_999_500));
        assert_eq!(system_time(3, u32::MAX), UNIX_EPOCH + Duration::new(3, 999_999_999));
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
        let offered = InitFlags::from_bits_truncate(SEEN.offered.load(Ordering::SeqCst));
        let count = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        // Each cache is checked where the kernel offers it (all of them on
        // Linux 5.1 and later); the fallbacks must at least read right.
        let check = |flag: InitFlags, what: &str| {
            let yes = offered.contains(flag);
            if !yes {
                eprintln!("NOT CHECKED: {what}: the kernel does not offer {flag:?}");
            }
            yes
        };
        // Six opens of files and three of the directory: zero-message opens
        // leave one of each, the one answered ENOSYS.
        if check(InitFlags::FUSE_NO_OPEN_SUPPORT, "zero-message opens") {
            assert_eq!(count(&SEEN.opens), 1, "opens reached the daemon after ENOSYS");
        }
        if check(InitFlags::FUSE_NO_OPENDIR_SUPPORT, "zero-message opendirs") {
            assert_eq!(count(&SEEN.opendirs), 1, "opendirs reached the daemon after ENOSYS");
        }
        // One listing: one call for the entries, one more that finds the end.
        assert_eq!(count(&fs.readdirs), 2, "listings reached the daemon again");
        assert_eq!(count(&fs.reads), 1, "file pages were dropped on open");
        if check(InitFlags::FUSE_CACHE_SYMLINKS, "cached symlinks") {
            assert_eq!(count(&fs.readlinks), 1, "readlink reached the daemon again");
        }
        if check(InitFlags::FUSE_DO_READDIRPLUS, "readdirplus") {
            assert_eq!(count(&fs.lookups), 0, "entries were looked up after the listing");
        }
        m.unmount().unwrap();
    }
}
