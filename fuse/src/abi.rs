//! The FUSE wire protocol, the part a read-only filesystem speaks: request
//! parsing and reply encoding, with every length checked. Layouts are those
//! of `include/uapi/linux/fuse.h` (ABI 7.x, native byte order); the tests
//! pin each size the kernel checks.
//!
//! Nothing here trusts a length it read: a request shorter than its opcode's
//! fixed part, a name without its NUL, or a header whose length disagrees
//! with what `read(2)` returned is [`Malformed`], which the session answers
//! EIO (or drops, for requests that take no answer).

/// The protocol's major version; INIT with any other is refused.
pub const MAJOR: u32 = 7;
/// The minor version this code speaks (the layouts below); a kernel that
/// offers more is answered with this one, and the kernel then speaks it.
pub const MINOR: u32 = 38;
/// The oldest minor we serve: 7.31 (Linux 5.4) has everything the adapter
/// relies on (`max_pages`, zero-message opens, cached symlinks).
pub const MIN_MINOR: u32 = 31;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const STATFS_OUT_LEN: usize = 80;
pub const GETXATTR_OUT_LEN: usize = 8;
pub const INIT_OUT_LEN: usize = 64;
pub const DIRENT_LEN: usize = 24;
/// `fuse_write_in`: the kernel's minimum read buffer counts it.
pub const WRITE_IN_LEN: usize = 40;
/// The smallest buffer `read(2)` on /dev/fuse accepts.
pub const MIN_READ_BUFFER: usize = 8192;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// `FUSE_NOTIFY_RESEND` (Linux 6.9, ABI 7.40): the kernel puts every
/// request that a server read but did not answer back on the queue.
pub const NOTIFY_RESEND: i32 = 7;

/// INIT flags (`fuse_init_in.flags`, and `flags2 << 32`).
pub mod flag {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const NO_OPEN_SUPPORT: u64 = 1 << 17;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const INIT_EXT: u64 = 1 << 30;
    /// Offered by kernels that know `FUSE_NOTIFY_RESEND` (6.9 and later).
    pub const HAS_RESEND: u64 = 1 << 39;
}

pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;

/// A request that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The fixed header of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    /// Echoed in the reply. Bit 63 is set on requests the kernel sent
    /// again (`FUSE_NOTIFY_RESEND`): never read it as signed.
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// One request, its arguments borrowed from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Lookup {
        name: &'a [u8],
    },
    Forget,
    BatchForget,
    Getattr,
    Readlink,
    Open,
    Opendir,
    Read {
        offset: u64,
        size: u32,
    },
    Readdir {
        offset: u64,
        size: u32,
    },
    Readdirplus {
        offset: u64,
        size: u32,
    },
    Release,
    Releasedir,
    Statfs,
    Getxattr {
        size: u32,
        name: &'a [u8],
    },
    Listxattr {
        size: u32,
    },
    Flush,
    Interrupt,
    Destroy,
    /// Any other opcode: answered ENOSYS.
    Other(u32),
}

impl Op<'_> {
    /// FORGET and BATCH_FORGET take no answer.
    pub fn answered(&self) -> bool {
        !matches!(self, Op::Forget | Op::BatchForget)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A NUL-terminated name at the start of `b`; empty names and names over
/// 255 bytes are refused (no entry of a layer has one).
fn name(b: &[u8]) -> Result<&[u8], Malformed> {
    let end = b.iter().position(|&c| c == 0).ok_or(Malformed("a name without its NUL"))?;
    if end == 0 || end > 255 {
        return Err(Malformed("a name of 0 or more than 255 bytes"));
    }
    Ok(&b[..end])
}

/// Parse the request in `buf` (exactly the bytes one `read(2)` returned).
/// The header comes back even when the arguments are malformed, so the
/// request can still be answered.
pub fn parse(buf: &[u8]) -> Result<(InHeader, Result<Op<'_>, Malformed>), Malformed> {
    if buf.len() < IN_HEADER_LEN {
        return Err(Malformed("shorter than the request header"));
    }
    let h = InHeader {
        len: u32_at(buf, 0),
        opcode: u32_at(buf, 4),
        unique: u64_at(buf, 8),
        nodeid: u64_at(buf, 16),
        uid: u32_at(buf, 24),
        gid: u32_at(buf, 28),
        pid: u32_at(buf, 32),
    };
    if h.len as usize != buf.len() {
        return Err(Malformed("header length differs from the bytes read"));
    }
    // Extensions (security context, supplementary groups) follow the
    // arguments; we ask for none, so their length only shortens the body.
    let ext = usize::from(u16_at(buf, 36)) * 8;
    let body = buf.len().checked_sub(IN_HEADER_LEN + ext).map(|n| &buf[IN_HEADER_LEN..IN_HEADER_LEN + n]);
    let Some(body) = body else { return Ok((h, Err(Malformed("extensions longer than the request")))) };
    Ok((h, parse_op(h.opcode, body)))
}

fn need(body: &[u8], n: usize) -> Result<(), Malformed> {
    if body.len() < n {
        Err(Malformed("arguments shorter than the opcode's"))
    } else {
        Ok(())
    }
}

fn parse_op(opcode: u32, body: &[u8]) -> Result<Op<'_>, Malformed> {
    // fuse_read_in: fh, offset, size, ...
    let read_in = |body: &[u8]| -> Result<(u64, u32), Malformed> {
        need(body, 24)?;
        Ok((u64_at(body, 8), u32_at(body, 16)))
    };
    Ok(match opcode {
        op::INIT => {
            need(body, 16)?;
            let lo = u64::from(u32_at(body, 12));
            // flags2 exists from 7.36, and means something only with INIT_EXT.
            let hi = if lo & flag::INIT_EXT != 0 && body.len() >= 20 { u64::from(u32_at(body, 16)) << 32 } else { 0 };
            Op::Init { major: u32_at(body, 0), minor: u32_at(body, 4), max_readahead: u32_at(body, 8), flags: lo | hi }
        }
        op::LOOKUP => Op::Lookup { name: name(body)? },
        op::FORGET => Op::Forget,
        op::BATCH_FORGET => Op::BatchForget,
        op::GETATTR => Op::Getattr,
        op::READLINK => Op::Readlink,
        op::OPEN => Op::Open,
        op::OPENDIR => Op::Opendir,
        op::READ => {
            let (offset, size) = read_in(body)?;
            Op::Read { offset, size }
        }
        op::READDIR => {
            let (offset, size) = read_in(body)?;
            Op::Readdir { offset, size }
        }
        op::READDIRPLUS => {
            let (offset, size) = read_in(body)?;
            Op::Readdirplus { offset, size }
        }
        op::RELEASE => Op::Release,
        op::RELEASEDIR => Op::Releasedir,
        op::STATFS => Op::Statfs,
        op::GETXATTR => {
            need(body, 8)?;
            Op::Getxattr { size: u32_at(body, 0), name: name(&body[8..])? }
        }
        op::LISTXATTR => {
            need(body, 8)?;
            Op::Listxattr { size: u32_at(body, 0) }
        }
        op::FLUSH => Op::Flush,
        op::INTERRUPT => Op::Interrupt,
        op::DESTROY => Op::Destroy,
        other => Op::Other(other),
    })
}

/// The reply header: `len` counts itself and the payload.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// The notification that asks the kernel to send again every request this
/// connection's servers read but did not answer.
pub fn notify_resend() -> [u8; OUT_HEADER_LEN] {
    out_header(OUT_HEADER_LEN, NOTIFY_RESEND, 0)
}

/// `struct fuse_attr`, as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireAttr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    /// Seconds since the epoch; the kernel reads the bits as signed.
    pub time: i64,
    pub time_nsec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

pub fn put_attr(out: &mut Vec<u8>, a: &WireAttr) {
    for v in [a.ino, a.size, a.blocks, a.time as u64, a.time as u64, a.time as u64] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [a.time_nsec, a.time_nsec, a.time_nsec, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, 0] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

/// `fuse_entry_out`: the entry and its attributes, each valid `ttl` seconds.
pub fn put_entry(out: &mut Vec<u8>, a: &WireAttr, ttl: u64) {
    for v in [a.ino, 0, ttl, ttl] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&[0u8; 8]);
    put_attr(out, a);
}

/// `fuse_attr_out`.
pub fn put_attr_out(out: &mut Vec<u8>, a: &WireAttr, ttl: u64) {
    out.extend_from_slice(&ttl.to_ne_bytes());
    out.extend_from_slice(&[0u8; 8]);
    put_attr(out, a);
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Append a `fuse_dirent` if it fits in `max` bytes in all; false if not.
pub fn put_dirent(out: &mut Vec<u8>, max: usize, ino: u64, next: u64, dtype: u32, name: &[u8]) -> bool {
    let len = align8(DIRENT_LEN + name.len());
    if out.len() + len > max {
        return false;
    }
    let start = out.len();
    out.extend_from_slice(&ino.to_ne_bytes());
    out.extend_from_slice(&next.to_ne_bytes());
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&dtype.to_ne_bytes());
    out.extend_from_slice(name);
    out.resize(start + len, 0);
    true
}

/// Append a `fuse_direntplus` if it fits in `max` bytes in all.
pub fn put_direntplus(out: &mut Vec<u8>, max: usize, a: &WireAttr, ttl: u64, next: u64, name: &[u8]) -> bool {
    let len = align8(ENTRY_OUT_LEN + DIRENT_LEN + name.len());
    if out.len() + len > max {
        return false;
    }
    let start = out.len();
    put_entry(out, a, ttl);
    out.extend_from_slice(&a.ino.to_ne_bytes());
    out.extend_from_slice(&next.to_ne_bytes());
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&(a.mode >> 12).to_ne_bytes());
    out.extend_from_slice(name);
    out.resize(start + len, 0);
    true
}

/// `fuse_open_out`.
pub fn open_out(fh: u64, open_flags: u32) -> [u8; OPEN_OUT_LEN] {
    let mut b = [0u8; OPEN_OUT_LEN];
    b[0..8].copy_from_slice(&fh.to_ne_bytes());
    b[8..12].copy_from_slice(&open_flags.to_ne_bytes());
    b
}

/// `fuse_statfs_out` of a filesystem that reports no space and no inodes
/// (what `df` shows for most FUSE mounts), blocks of 512 bytes, names up
/// to 255.
pub fn statfs_out() -> [u8; STATFS_OUT_LEN] {
    // fuse_kstatfs: blocks, bfree, bavail, files, ffree (u64 each), then
    // bsize, namelen, frsize (u32 each). overlayfs takes namelen as the
    // longest name it may look up in a lower layer.
    let mut b = [0u8; STATFS_OUT_LEN];
    b[40..44].copy_from_slice(&512u32.to_ne_bytes()); // bsize
    b[44..48].copy_from_slice(&255u32.to_ne_bytes()); // namelen
    b[48..52].copy_from_slice(&512u32.to_ne_bytes()); // frsize
    b
}

/// `fuse_getxattr_out`: the size a value or list needs.
pub fn getxattr_out(size: u32) -> [u8; GETXATTR_OUT_LEN] {
    let mut b = [0u8; GETXATTR_OUT_LEN];
    b[0..4].copy_from_slice(&size.to_ne_bytes());
    b
}

/// What we answer INIT with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
}

pub fn init_out(o: &InitOut) -> [u8; INIT_OUT_LEN] {
    let mut b = [0u8; INIT_OUT_LEN];
    b[0..4].copy_from_slice(&MAJOR.to_ne_bytes());
    b[4..8].copy_from_slice(&o.minor.to_ne_bytes());
    b[8..12].copy_from_slice(&o.max_readahead.to_ne_bytes());
    b[12..16].copy_from_slice(&(o.flags as u32).to_ne_bytes());
    b[16..18].copy_from_slice(&o.max_background.to_ne_bytes());
    b[18..20].copy_from_slice(&o.congestion_threshold.to_ne_bytes());
    b[20..24].copy_from_slice(&o.max_write.to_ne_bytes());
    b[24..28].copy_from_slice(&o.time_gran.to_ne_bytes());
    b[28..30].copy_from_slice(&o.max_pages.to_ne_bytes());
    b[32..36].copy_from_slice(&((o.flags >> 32) as u32).to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&opcode.to_ne_bytes());
        b.extend_from_slice(&unique.to_ne_bytes());
        b.extend_from_slice(&nodeid.to_ne_bytes());
        b.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(body);
        b
    }

    /// Sizes as `include/uapi/linux/fuse.h` has them (and the kernel
    /// checks: a reply of another size is refused).
    #[test]
    fn sizes_are_the_kernels() {
        assert_eq!(ATTR_LEN, 88);
        assert_eq!(ENTRY_OUT_LEN, 128);
        assert_eq!(ATTR_OUT_LEN, 104);
        let a = WireAttr::default();
        let mut v = Vec::new();
        put_entry(&mut v, &a, 1);
        assert_eq!(v.len(), ENTRY_OUT_LEN);
        v.clear();
        put_attr_out(&mut v, &a, 1);
        assert_eq!(v.len(), ATTR_OUT_LEN);
        let o = InitOut {
            minor: 38,
            max_readahead: 0,
            flags: 0,
            max_background: 0,
            congestion_threshold: 0,
            max_write: 0,
            time_gran: 0,
            max_pages: 0,
        };
        assert_eq!(init_out(&o).len(), 64);
        assert_eq!(statfs_out().len(), 80);
    }

    #[test]
    fn requests_parse_and_lies_do_not() {
        let r = request(op::LOOKUP, 7 | 1 << 63, 1, b"etc\0");
        let (h, o) = parse(&r).unwrap();
        assert_eq!((h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid), (op::LOOKUP, 7 | 1 << 63, 1, 1, 2, 3));
        assert_eq!(o.unwrap(), Op::Lookup { name: b"etc" });

        let mut body = [0u8; 40];
        body[8..16].copy_from_slice(&4096u64.to_ne_bytes());
        body[16..20].copy_from_slice(&131072u32.to_ne_bytes());
        assert_eq!(parse(&request(op::READ, 9, 2, &body)).unwrap().1.unwrap(), Op::Read { offset: 4096, size: 131072 });

        let mut init = [0u8; 64];
        init[0..4].copy_from_slice(&7u32.to_ne_bytes());
        init[4..8].copy_from_slice(&41u32.to_ne_bytes());
        init[12..16].copy_from_slice(&((flag::INIT_EXT | flag::ASYNC_READ) as u32).to_ne_bytes());
        init[16..20].copy_from_slice(&((flag::HAS_RESEND >> 32) as u32).to_ne_bytes());
        let Op::Init { flags, minor, .. } = parse(&request(op::INIT, 1, 0, &init)).unwrap().1.unwrap() else {
            panic!("not init")
        };
        assert_eq!(minor, 41);
        assert_eq!(flags, flag::INIT_EXT | flag::ASYNC_READ | flag::HAS_RESEND);

        // Header lies and short bodies.
        let mut r = request(op::LOOKUP, 1, 1, b"x\0");
        r[0] = 200;
        assert!(parse(&r).is_err());
        assert!(parse(&r[..20]).is_err());
        assert!(parse(&request(op::READ, 1, 1, &[0; 8])).unwrap().1.is_err());
        assert!(parse(&request(op::LOOKUP, 1, 1, b"no-nul")).unwrap().1.is_err());
        assert!(parse(&request(op::LOOKUP, 1, 1, b"\0")).unwrap().1.is_err());
        assert!(parse(&request(op::LOOKUP, 1, 1, &[b'a'; 300])).unwrap().1.is_err());
        assert!(parse(&request(op::GETXATTR, 1, 1, &[0; 4])).unwrap().1.is_err());
        let mut ext = request(op::GETATTR, 1, 1, &[0; 16]);
        ext[36] = 200; // extensions longer than the request
        assert!(parse(&ext).unwrap().1.is_err());
        assert_eq!(parse(&request(4242, 1, 1, &[])).unwrap().1.unwrap(), Op::Other(4242));
    }

    #[test]
    fn listings_stop_where_the_buffer_ends() {
        let mut v = Vec::new();
        assert!(put_dirent(&mut v, 64, 5, 1, 8, b"abc"));
        assert_eq!(v.len(), 32); // 24 + 3, aligned to 8
        assert!(put_dirent(&mut v, 64, 6, 2, 8, b"defgh"));
        assert!(!put_dirent(&mut v, 64, 7, 3, 8, b"x"));
        assert_eq!(v.len(), 64);
        let mut p = Vec::new();
        let a = WireAttr { ino: 9, mode: 0o100644, ..Default::default() };
        assert!(put_direntplus(&mut p, 4096, &a, 1, 1, b"f"));
        assert_eq!(p.len(), 160); // 128 + 24 + 1, aligned
        assert_eq!(u32::from_ne_bytes(p[148..152].try_into().unwrap()), 8); // DT_REG
    }
}
