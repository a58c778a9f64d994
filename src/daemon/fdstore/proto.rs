//! The fd holder's wire format, and the SCM_RIGHTS send and receive both
//! ends use.
//!
//! One request or reply is one `SOCK_SEQPACKET` message, so the fds it
//! carries (SCM_RIGHTS) arrive with that message and no other. Every
//! message starts with [`MAGIC`] and one kind byte:
//!
//! | kind | from | body | fds |
//! |---|---|---|---|
//! | `H` hello | holder, on accept | u32 pid, u32 kept, u32 max | 0 |
//! | `P` put | daemon | u8 len, name | 1 |
//! | `D` del | daemon | u8 len, name | 0 |
//! | `L` list | daemon | u8 0 | 0 |
//! | `K` ok | holder, to put/del | — | 0 |
//! | `N` entries | holder, to list | u16 n (1..=253), n × (u8 len, name) | n, in order |
//! | `Z` end | holder, after the entries | u32 total | 0 |
//! | `E` error | holder | u16 len, UTF-8 text (≤ 1024) | 0 |
//!
//! Integers are big-endian. A message must be exactly as long as its
//! lengths say, with exactly the fds its kind says; anything else is
//! refused (and the fds it brought are closed).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use super::{validate_name, MAX_NAME, SCM_MAX_FD};

/// First bytes of every message: "HyperBox Keeper", protocol 1. A holder
/// of another protocol answers with an error, or its messages are refused.
pub const MAGIC: &[u8; 4] = b"HBK1";

/// The longest request: magic, kind, name length, name.
pub const MAX_REQUEST: usize = MAGIC.len() + 2 + MAX_NAME;

/// Names carried by one `N` message, in bytes, at most (besides the at most
/// [`SCM_MAX_FD`] fds): well under the smallest socket send buffer
/// (`net.core.wmem_default`) a seqpacket message must fit in.
pub const LIST_CHUNK_BYTES: usize = 32 * 1024;

/// The longest reply: an `N` message of [`LIST_CHUNK_BYTES`] of names.
pub const MAX_REPLY: usize = MAGIC.len() + 1 + 2 + LIST_CHUNK_BYTES;

/// The longest error text carried.
pub const MAX_ERROR_TEXT: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep the one fd the message carries under this name, replacing one
    /// of that name.
    Put(String),
    /// Close the fd of this name (nothing if there is none).
    Del(String),
    /// Send every name and fd.
    List,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The holder's pid (SO_PEERCRED would name the process that called
    /// listen(2): the holder's parent, gone, when it detached), how many
    /// fds it keeps and the most it keeps.
    Hello {
        pid: u32,
        kept: u32,
        max: u32,
    },
    Ok,
    /// Names of the fds the same message carries, in order.
    Entries(Vec<String>),
    /// The last message of a list, and how many entries it had.
    End(u32),
    Error(String),
}

/// A malformed message: what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtoError(pub String);

fn bad<T>(what: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError(what.into()))
}

/// Reads a message front to back, refusing to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return bad(format!("truncated message: {what} needs {n} bytes, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn name(&mut self) -> Result<String, ProtoError> {
        let len = self.u8("a name's length")? as usize;
        let bytes = self.take(len, "a name")?;
        let name = std::str::from_utf8(bytes).map_err(|_| ProtoError("a name is not ASCII".into()))?;
        validate_name(name).map_err(|e| ProtoError(e.to_string()))?;
        Ok(name.to_string())
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            bad(format!("{} bytes after the end of the message", self.0.len()))
        }
    }
}

/// The kind byte after the magic.
fn header<'a>(buf: &'a [u8]) -> Result<(u8, Reader<'a>), ProtoError> {
    let mut r = Reader(buf);
    let magic = r.take(MAGIC.len(), "the magic")?;
    if magic != MAGIC {
        return bad(format!("not a HyperBox fd holder message (starts {:02x?}, not {:02x?})", magic, MAGIC));
    }
    let kind = r.u8("the kind")?;
    Ok((kind, r))
}

fn want_fds(kind: &str, want: usize, got: usize) -> Result<(), ProtoError> {
    if want == got {
        Ok(())
    } else {
        bad(format!("{kind} carries {want} fd(s), this one carried {got}"))
    }
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    debug_assert!(name.len() <= MAX_NAME);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// Names must already be valid ([`validate_name`]).
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    match req {
        Request::Put(name) => {
            out.push(b'P');
            push_name(&mut out, name);
        }
        Request::Del(name) => {
            out.push(b'D');
            push_name(&mut out, name);
        }
        Request::List => out.extend_from_slice(b"L\0"),
    }
    out
}

/// A request and the number of fds its message carried.
pub fn decode_request(buf: &[u8], fds: usize) -> Result<Request, ProtoError> {
    let (kind, mut r) = header(buf)?;
    let req = match kind {
        b'P' => {
            want_fds("PUT", 1, fds)?;
            Request::Put(r.name()?)
        }
        b'D' => {
            want_fds("DEL", 0, fds)?;
            Request::Del(r.name()?)
        }
        b'L' => {
            want_fds("LIST", 0, fds)?;
            if r.u8("LIST's empty name")? != 0 {
                return bad("LIST takes no name");
            }
            Request::List
        }
        k => return bad(format!("unknown request kind {k:#04x}")),
    };
    r.end()?;
    Ok(req)
}

/// Entries' names must be valid and fit ([`list_chunks`]).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    match reply {
        Reply::Hello { pid, kept, max } => {
            out.push(b'H');
            out.extend_from_slice(&pid.to_be_bytes());
            out.extend_from_slice(&kept.to_be_bytes());
            out.extend_from_slice(&max.to_be_bytes());
        }
        Reply::Ok => out.push(b'K'),
        Reply::Entries(names) => {
            debug_assert!(!names.is_empty() && names.len() <= SCM_MAX_FD);
            out.push(b'N');
            out.extend_from_slice(&(names.len() as u16).to_be_bytes());
            for n in names {
                push_name(&mut out, n);
            }
        }
        Reply::End(total) => {
            out.push(b'Z');
            out.extend_from_slice(&total.to_be_bytes());
        }
        Reply::Error(text) => {
            let mut end = text.len().min(MAX_ERROR_TEXT);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            out.push(b'E');
            out.extend_from_slice(&(end as u16).to_be_bytes());
            out.extend_from_slice(&text.as_bytes()[..end]);
        }
    }
    out
}

/// A reply and the number of fds its message carried.
pub fn decode_reply(buf: &[u8], fds: usize) -> Result<Reply, ProtoError> {
    let (kind, mut r) = header(buf)?;
    let reply = match kind {
        b'H' => {
            want_fds("HELLO", 0, fds)?;
            Reply::Hello { pid: r.u32("the pid")?, kept: r.u32("the kept count")?, max: r.u32("the limit")? }
        }
        b'K' => {
            want_fds("OK", 0, fds)?;
            Reply::Ok
        }
        b'N' => {
            let n = r.u16("the entry count")? as usize;
            if n == 0 || n > SCM_MAX_FD {
                return bad(format!("{n} entries in one message (1 to {SCM_MAX_FD})"));
            }
            want_fds("this ENTRIES message", n, fds)?;
            let names = (0..n).map(|_| r.name()).collect::<Result<Vec<_>, _>>()?;
            Reply::Entries(names)
        }
        b'Z' => {
            want_fds("END", 0, fds)?;
            Reply::End(r.u32("the total")?)
        }
        b'E' => {
            want_fds("ERROR", 0, fds)?;
            let len = r.u16("the text's length")? as usize;
            if len > MAX_ERROR_TEXT {
                return bad(format!("an error text of {len} bytes (at most {MAX_ERROR_TEXT})"));
            }
            Reply::Error(String::from_utf8_lossy(r.take(len, "the error text")?).into_owned())
        }
        k => return bad(format!("unknown reply kind {k:#04x}")),
    };
    r.end()?;
    Ok(reply)
}

/// How to cut a list of names into `N` messages: ranges of at most
/// [`SCM_MAX_FD`] names and [`LIST_CHUNK_BYTES`] bytes of names.
pub fn list_chunks<S: AsRef<str>>(names: &[S]) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, n) in names.iter().enumerate() {
        let size = 1 + n.as_ref().len();
        if i > start && (i - start == SCM_MAX_FD || bytes + size > LIST_CHUNK_BYTES) {
            chunks.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < names.len() {
        chunks.push(start..names.len());
    }
    chunks
}

/// One message received: its bytes are `buf[..len]`; `len == 0` is the
/// end of the connection (no message of ours is empty).
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer (the rest is lost).
    pub truncated: bool,
}

/// Send one message with `fds` (at most [`SCM_MAX_FD`]) in SCM_RIGHTS.
/// MSG_NOSIGNAL: a peer gone is EPIPE, not SIGPIPE.
pub fn send_msg(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    let sent = sendmsg::<UnixAddr>(sock.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "a message was sent in part"));
    }
    Ok(())
}

/// Receive one message into `buf`, and the fds it carries (close-on-exec).
///
/// The control buffer has room for [`SCM_MAX_FD`] fds, the most one
/// message can carry, so the kernel never truncates it for lack of room. It
/// still does when installing an fd fails (RLIMIT_NOFILE): then nix refuses
/// to read the fds that did arrive, and this returns an error.
pub fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8], flags: MsgFlags) -> std::io::Result<Received> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD], libc::ucred);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags | MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| std::io::Error::other("a message's fds were cut off (MSG_CTRUNC): is RLIMIT_NOFILE too low?"))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds for us; nothing
            // else owns them.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok(Received { len: msg.bytes, fds, truncated: msg.flags.contains(MsgFlags::MSG_TRUNC) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, len: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0len$}")).collect()
    }

    #[test]
    fn requests_round_trip() {
        for (req, fds) in [(Request::Put("hbl.1.a".into()), 1), (Request::Del("hbl.1.a".into()), 0), (Request::List, 0)]
        {
            let bytes = encode_request(&req);
            assert!(bytes.len() <= MAX_REQUEST);
            assert_eq!(decode_request(&bytes, fds).unwrap(), req);
        }
        let longest = Request::Put("x".repeat(MAX_NAME));
        assert_eq!(encode_request(&longest).len(), MAX_REQUEST);
        assert_eq!(decode_request(&encode_request(&longest), 1).unwrap(), longest);
    }

    #[test]
    fn replies_round_trip() {
        let max = names(SCM_MAX_FD, 3);
        for (reply, fds) in [
            (Reply::Hello { pid: 4242, kept: 3, max: 65536 }, 0),
            (Reply::Ok, 0),
            (Reply::Entries(vec!["a".into(), "hbl.2.b".into()]), 2),
            (Reply::Entries(max.clone()), SCM_MAX_FD),
            (Reply::End(70000), 0),
            (Reply::Error("full: 65536 fds kept".into()), 0),
        ] {
            assert_eq!(decode_reply(&encode_reply(&reply), fds).unwrap(), reply);
        }
        // An over-long error text is cut, on a character boundary.
        let long = format!("é{}", "x".repeat(2000));
        match decode_reply(&encode_reply(&Reply::Error(long)), 0).unwrap() {
            Reply::Error(t) => assert_eq!(t.len(), MAX_ERROR_TEXT),
            r => panic!("{r:?}"),
        }
    }

    /// Every way a hostile peer can get a request wrong is refused with a
    /// reason, and nothing panics.
    #[test]
    fn hostile_requests_are_refused() {
        let put = encode_request(&Request::Put("hbl.x".into()));
        let cases: Vec<(Vec<u8>, usize, &str)> = vec![
            (vec![], 0, "truncated"),
            (b"HBK".to_vec(), 0, "truncated"),
            (b"HBK1".to_vec(), 0, "truncated"),
            (b"XXXXP\x01a".to_vec(), 1, "not a HyperBox"),
            (b"HBK2P\x01a".to_vec(), 1, "not a HyperBox"),
            (b"HBK1Q\x01a".to_vec(), 0, "unknown request"),
            (put.clone(), 0, "carries 1 fd"),
            (put.clone(), 2, "carries 1 fd"),
            (put[..put.len() - 1].to_vec(), 1, "truncated"),
            ([put.as_slice(), b"junk"].concat(), 1, "after the end"),
            (b"HBK1P\x00".to_vec(), 1, "empty"),
            (b"HBK1P\x03a:b".to_vec(), 1, "':'"),
            (b"HBK1P\x03a\nb".to_vec(), 1, "0x0a"),
            (b"HBK1P\x02\xc3\xa9".to_vec(), 1, "ASCII"),
            (b"HBK1D\x01a".to_vec(), 1, "carries 0 fd"),
            (b"HBK1L\x01a".to_vec(), 0, "no name"),
            (b"HBK1L".to_vec(), 0, "truncated"),
            (b"HBK1L\x00".to_vec(), 253, "carries 0 fd"),
            (b"HBK1P\xffabc".to_vec(), 1, "truncated"),
        ];
        for (bytes, fds, why) in cases {
            let e = decode_request(&bytes, fds).expect_err(&format!("{bytes:?} accepted"));
            assert!(e.0.contains(why), "{bytes:?}: {e} (expected {why:?})");
        }
    }

    #[test]
    fn hostile_replies_are_refused() {
        let entries = encode_reply(&Reply::Entries(vec!["a".into(), "b".into()]));
        let cases: Vec<(Vec<u8>, usize, &str)> = vec![
            (entries.clone(), 1, "carried 1"),
            (entries.clone(), 3, "carried 3"),
            (b"HBK1N\x00\x00".to_vec(), 0, "0 entries"),
            (b"HBK1N\x00\xfe".to_vec(), 254, "254 entries"),
            (b"HBK1N\x00\x02\x01a".to_vec(), 2, "truncated"),
            (b"HBK1E\xff\xff".to_vec(), 0, "65535 bytes"),
            (b"HBK1E\x00\x05abc".to_vec(), 0, "truncated"),
            (b"HBK1K".to_vec(), 1, "carries 0 fd"),
            (b"HBK1Kx".to_vec(), 0, "after the end"),
            (b"HBK1H\x00\x00\x00\x01\x00\x00\x00\x00".to_vec(), 0, "truncated"),
            (b"HBK1Z".to_vec(), 0, "truncated"),
            (b"HBK1?".to_vec(), 0, "unknown reply"),
        ];
        for (bytes, fds, why) in cases {
            let e = decode_reply(&bytes, fds).expect_err(&format!("{bytes:?} accepted"));
            assert!(e.0.contains(why), "{bytes:?}: {e} (expected {why:?})");
        }
    }

    #[test]
    fn lists_are_cut_by_fds_and_bytes() {
        assert!(list_chunks::<String>(&[]).is_empty());
        assert_eq!(list_chunks(&names(1, 5)), vec![0..1]);
        assert_eq!(list_chunks(&names(253, 5)), vec![0..253]);
        assert_eq!(list_chunks(&names(254, 5)), vec![0..253, 253..254]);
        assert_eq!(list_chunks(&names(600, 5)), vec![0..253, 253..506, 506..600]);
        // 255-byte names: 128 of them fill 32 KiB (128 × 256 = 32768).
        let long = names(300, 255);
        assert_eq!(list_chunks(&long), vec![0..128, 128..256, 256..300]);
        for r in list_chunks(&long) {
            let reply = encode_reply(&Reply::Entries(long[r].to_vec()));
            assert!(reply.len() <= MAX_REPLY, "{}", reply.len());
        }
    }
}
