//! Keeping fds outside hyperboxd (`hyperbox::daemon::fdstore`), with real
//! processes and real fds: the fd holder (`hyperboxd fd-holder`) keeps,
//! replaces, lists and drops fds, refuses other uids and hostile messages,
//! and outlives the process that started it; and at start-up the fds
//! systemd hands back in `LISTEN_FDS` are told apart from the gRPC socket.
//!
//! Each test has its own socket in a temp dir; every holder it starts is
//! stopped by pid when the test ends, passed or not. Some tests run this
//! binary again as a child process (a role chosen by an environment
//! variable), to have a process to SIGKILL, another uid, or fds at 3, 4, 5.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyperbox::daemon::fdstore::proto::{self, Reply};
use hyperbox::daemon::fdstore::{self, HolderClient, KeepMode, Keeper, KeeperOptions};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::MsgFlags;
use nix::unistd::Pid;

const HYPERBOXD: &str = env!("CARGO_BIN_EXE_hyperboxd");

/// The variable that makes this binary, run again, play a child's role.
const ROLE: &str = "HYPERBOX_FD_HOLDER_TEST_ROLE";

/// A holder process, stopped (SIGTERM, then SIGKILL) by pid when dropped.
struct HolderProc {
    pid: i32,
    /// Ours to reap when we spawned it without --detach.
    child: Option<Child>,
    socket: PathBuf,
}

impl HolderProc {
    /// `hyperboxd fd-holder --socket <dir>/h.sock <extra>`, in the
    /// foreground (our child), once it answers.
    fn start(dir: &Path, extra: &[&str]) -> HolderProc {
        let socket = dir.join("h.sock");
        let log = std::fs::File::create(dir.join("holder.log")).unwrap();
        let child = Command::new(HYPERBOXD)
            .arg("fd-holder")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let h = HolderProc { pid, child: Some(child), socket };
        wait_until("the holder answers", Duration::from_secs(10), || HolderClient::connect(&h.socket).is_ok());
        h
    }

    /// A holder we did not start (the Keeper did): found by its socket.
    fn adopt(socket: &Path) -> HolderProc {
        let pid = HolderClient::connect(socket).unwrap().holder_pid() as i32;
        HolderProc { pid, child: None, socket: socket.to_path_buf() }
    }

    fn client(&self) -> HolderClient {
        HolderClient::connect(&self.socket).unwrap()
    }

    fn alive(&self) -> bool {
        // A zombie (not reaped by whoever is init here) still has a pid.
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }
}

impl Drop for HolderProc {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let start = Instant::now();
        while self.alive() && start.elapsed() < Duration::from_secs(5) {
            if let Some(c) = &mut self.child {
                let _ = c.try_wait();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
    }
}

/// Stops, when dropped, whatever holder then answers at a socket: for
/// holders a test did not start itself, in case it fails before it knows
/// their pids.
struct StopAt(PathBuf);

impl Drop for StopAt {
    fn drop(&mut self) {
        if HolderClient::connect(&self.0).is_ok() {
            drop(HolderProc::adopt(&self.0));
        }
    }
}

fn pipe() -> (OwnedFd, std::fs::File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (r, std::fs::File::from(w))
}

/// What `fd` gives to read within 5 s, up to `n` bytes (or EOF).
fn read_some(fd: BorrowedFd<'_>, n: usize) -> Vec<u8> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "nothing to read within 5 s");
    let mut buf = vec![0; n];
    let got = nix::unistd::read(fd, &mut buf).unwrap();
    buf.truncate(got);
    buf
}

/// The (device, inode) of what `fd` is open on.
fn inode(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

/// A pipe's read end given to the holder, the client and the original
/// closed: a new client's LIST brings it back, and what is written into
/// the pipe is read from it. A second PUT of the name replaces (the old fd
/// is closed: its pipe has no reader left); DEL drops it.
#[test]
fn put_list_replace_del() {
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &[]);
    let (r, mut w) = pipe();
    {
        let mut c = h.client();
        assert_eq!(c.hello().0, 0);
        c.put("hbl.snap1.n1", r.as_fd()).unwrap();
        assert_eq!(c.holder_pid() as i32, h.pid);
    }
    drop(r);

    let mut c = h.client();
    assert_eq!(c.hello().0, 1);
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "hbl.snap1.n1");
    w.write_all(b"through the holder").unwrap();
    assert_eq!(read_some(listed[0].1.as_fd(), 64), b"through the holder");
    drop(listed);

    let (r2, mut w2) = pipe();
    c.put("hbl.snap1.n1", r2.as_fd()).unwrap();
    drop(r2);
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 1);
    w2.write_all(b"second").unwrap();
    assert_eq!(read_some(listed[0].1.as_fd(), 64), b"second");
    drop(listed);
    // The first pipe's only reader was the holder's, closed by the PUT.
    assert_eq!(w.write_all(b"x").unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);

    c.del("hbl.snap1.n1").unwrap();
    c.del("hbl.never-there").unwrap();
    assert!(c.list().unwrap().is_empty());
    assert_eq!(w2.write_all(b"x").unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
    assert!(c.put("sha256:abc", w2.as_fd()).unwrap_err().to_string().contains("':'"));
}

/// More fds than one message carries (SCM_MAX_FD = 253), and names long
/// enough that bytes cut the messages: all come back, in order, each the
/// same open file as the one put.
#[test]
fn a_long_list_comes_in_several_messages() {
    fdstore::raise_nofile_limit();
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &[]);
    let (r, _w) = pipe();
    let mut c = h.client();
    let mut names: Vec<String> = (0..600).map(|i| format!("hbl.{i:04}")).collect();
    names.extend((0..150).map(|i| format!("long.{i:04}.{}", "x".repeat(245))));
    for n in &names {
        c.put(n, r.as_fd()).unwrap();
    }
    let listed = c.list().unwrap();
    names.sort();
    assert_eq!(listed.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), names);
    for (_, fd) in &listed {
        assert_eq!(inode(fd), inode(&r));
    }
}

/// `--max-fds`: one more name is refused with a reason; replacing a kept
/// name is not one more.
#[test]
fn the_holder_keeps_at_most_max_fds() {
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &["--max-fds", "3"]);
    let (r, _w) = pipe();
    let mut c = h.client();
    assert_eq!(c.hello().1, 3);
    for n in ["a", "b", "c"] {
        c.put(n, r.as_fd()).unwrap();
    }
    let e = c.put("d", r.as_fd()).unwrap_err();
    assert!(e.to_string().contains("full"), "{e}");
    c.put("b", r.as_fd()).unwrap();
    c.del("a").unwrap();
    c.put("d", r.as_fd()).unwrap();
    assert_eq!(c.list().unwrap().len(), 3);
}

/// A connection of our own, speaking the wire format by hand.
struct Raw(OwnedFd);

impl Raw {
    fn connect(path: &Path) -> Raw {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let s = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
        connect(s.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        let raw = Raw(s);
        assert!(matches!(raw.recv(), Some(Reply::Hello { .. })));
        raw
    }
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        proto::send_msg(self.0.as_fd(), bytes, fds).unwrap();
    }
    /// The next reply, or None when the holder closed the connection.
    fn recv(&self) -> Option<Reply> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.0, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0)).unwrap();
        let mut buf = vec![0; proto::MAX_REPLY];
        let m = proto::recv_msg(self.0.as_fd(), &mut buf, MsgFlags::empty()).unwrap();
        (m.len > 0).then(|| proto::decode_reply(&buf[..m.len], m.fds.len()).unwrap())
    }
    fn expect_error(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], why: &str) {
        self.send(bytes, fds);
        match self.recv() {
            Some(Reply::Error(t)) => assert!(t.contains(why), "{bytes:?}: {t} (expected {why:?})"),
            r => panic!("{bytes:?}: {r:?}"),
        }
    }
}

/// Malformed requests (truncated, wrong magic, unknown kind, too many or
/// too few fds, bad names, over-long) are each refused with a reason, the
/// holder keeps serving, and every fd those messages brought is closed:
/// once we close our own write end, the pipe they were dups of reads EOF.
#[test]
fn hostile_messages_are_refused_and_their_fds_closed() {
    fdstore::raise_nofile_limit();
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &[]);
    let (r, w) = pipe();
    let one = [w.as_fd()];
    let two = [w.as_fd(), w.as_fd()];
    let many: Vec<BorrowedFd> = (0..253).map(|_| w.as_fd()).collect();
    let raw = Raw::connect(&h.socket);
    raw.expect_error(b"HBK", &one, "truncated");
    raw.expect_error(b"XXXXP\x01a", &one, "not a HyperBox");
    raw.expect_error(b"HBK1Q\x01a", &two, "unknown request");
    raw.expect_error(b"HBK1P\x01a", &two, "carries 1 fd");
    raw.expect_error(b"HBK1P\x01a", &many, "carries 1 fd");
    raw.expect_error(b"HBK1P\x01a", &[], "carries 1 fd");
    raw.expect_error(b"HBK1L\x00", &many, "carries 0 fd");
    raw.expect_error(b"HBK1D\x01a", &one, "carries 0 fd");
    raw.expect_error(b"HBK1P\x03a:b", &one, "':'");
    raw.expect_error(b"HBK1P\x03a\nb", &one, "0x0a");
    raw.expect_error(b"HBK1P\x00", &one, "empty");
    raw.expect_error(b"HBK1P\xffabc", &one, "truncated");
    raw.expect_error(&[b"HBK1P\x01a".as_slice(), &[0u8; 4000]].concat(), &many, "at most");
    // The connection still works, and kept nothing.
    raw.send(&proto::encode_request(&proto::Request::List), &[]);
    assert_eq!(raw.recv(), Some(Reply::End(0)));
    // An empty message ends the connection; the holder serves on.
    raw.send(b"", &[]);
    assert_eq!(raw.recv(), None);
    assert!(h.client().list().unwrap().is_empty());
    drop(w);
    assert_eq!(read_some(r.as_fd(), 1), b"", "the holder kept an fd of a refused message");
}

/// Another uid is refused: first by the socket's mode (0600), and, where
/// the mode lets it through, by SO_PEERCRED. As root, a child of this test
/// runs as nobody (65534).
#[test]
fn a_peer_of_another_uid_is_refused() {
    if let Ok(role) = std::env::var(ROLE) {
        if let Some(socket) = role.strip_prefix("peer:") {
            match HolderClient::connect(Path::new(socket)) {
                Ok(_) => println!("ACCEPTED"),
                Err(e) => println!("REFUSED {:?} {e}", e.kind()),
            }
        }
        return;
    }
    if !have("a_peer_of_another_uid_is_refused", &[Need::Root]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &[]);
    let mode = std::fs::metadata(&h.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    // nobody must reach the socket's dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = || {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["a_peer_of_another_uid_is_refused", "--exact", "--nocapture"])
            .env(ROLE, format!("peer:{}", h.socket.display()))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = as_nobody();
    assert!(out.contains("REFUSED PermissionDenied"), "{out}");
    // Let the mode through: the holder's own check refuses.
    std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert!(out.contains("REFUSED PermissionDenied") && out.contains("refused: peer uid 65534"), "{out}");
    let log = std::fs::read_to_string(dir.path().join("holder.log")).unwrap();
    assert!(log.contains("refused: peer uid 65534"), "{log}");
    // Root is still served.
    h.client().list().unwrap();
}

/// The process that opened the Keeper (and had it start the holder) is
/// SIGKILLed with its whole process group: the holder lives on, in a
/// session of its own, with the fds it was given.
#[test]
fn a_holder_started_by_the_keeper_outlives_its_daemon() {
    if let Ok(role) = std::env::var(ROLE) {
        if let Some(socket) = role.strip_prefix("daemon:") {
            let opts = KeeperOptions {
                mode: KeepMode::Holder,
                holder_socket: PathBuf::from(socket),
                holder_exe: PathBuf::from(HYPERBOXD),
            };
            let k = Keeper::open_with(&opts).unwrap();
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            k.put("hbl.r", r.as_fd()).unwrap();
            k.put("hbl.w", w.as_fd()).unwrap();
            println!("READY");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("h.sock");
    let _stop = StopAt(socket.clone());
    let mut daemon = Command::new(std::env::current_exe().unwrap())
        .args(["a_holder_started_by_the_keeper_outlives_its_daemon", "--exact", "--nocapture"])
        .env(ROLE, format!("daemon:{}", socket.display()))
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = daemon.stdout.take().unwrap();
    let start = Instant::now();
    while !out.contains("READY") {
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0 && start.elapsed() < Duration::from_secs(30), "the daemon stopped: {out}");
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let h = HolderProc::adopt(&socket);
    let pgid = daemon.id() as i32;
    kill(Pid::from_raw(-pgid), Signal::SIGKILL).unwrap();
    daemon.wait().unwrap();

    assert!(h.alive());
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", h.pid)).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let (ppid, session): (i32, i32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(ppid, pgid, "the holder is the daemon's child");
    assert_eq!(session, h.pid, "the holder leads a session of its own");
    assert!(fdstore::log_path(&socket).exists());

    let mut listed = h.client().list().unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["hbl.r", "hbl.w"]);
    let mut w = std::fs::File::from(listed.pop().unwrap().1);
    w.write_all(b"after SIGKILL").unwrap();
    assert_eq!(read_some(listed[0].1.as_fd(), 64), b"after SIGKILL");
}

/// The holder dies while the Keeper lives: the next put starts a new
/// holder and puts every fd it had again; take_kept lists them all.
/// A Keeper opened while a holder runs uses it.
#[test]
fn the_keeper_restarts_a_dead_holder() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("h.sock");
    let _stop = StopAt(socket.clone());
    let opts = KeeperOptions { mode: KeepMode::Holder, holder_socket: socket.clone(), holder_exe: HYPERBOXD.into() };
    let mut k = Keeper::open_with(&opts).unwrap();
    assert_eq!(k.mode(), KeepMode::Holder);
    let first = HolderProc::adopt(&socket);
    let (r, mut w) = pipe();
    k.put("hbl.1", r.as_fd()).unwrap();
    drop(r);
    kill(Pid::from_raw(first.pid), Signal::SIGKILL).unwrap();
    wait_until("the holder is gone", Duration::from_secs(5), || HolderClient::connect(&socket).is_err());

    let (r2, _w2) = pipe();
    k.put("hbl.2", r2.as_fd()).unwrap();
    let second = HolderProc::adopt(&socket);
    assert_ne!(second.pid, first.pid);
    let mut kept = k.take_kept().unwrap();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(kept.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["hbl.1", "hbl.2"]);
    w.write_all(b"kept by the second holder").unwrap();
    assert_eq!(read_some(kept[0].1.as_fd(), 64), b"kept by the second holder");

    k.remove("hbl.1").unwrap();
    drop(k);
    // A new Keeper (a restarted daemon) finds the running holder.
    let mut k = Keeper::open_with(&opts).unwrap();
    let kept = k.take_kept().unwrap();
    assert_eq!(kept.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["hbl.2"]);
    assert_eq!(HolderClient::connect(&socket).unwrap().holder_pid() as i32, second.pid);
}

/// The holder refuses to replace a file that is not a socket, and a
/// second holder on the same socket stops at once (exit 3): the first
/// keeps serving.
#[test]
fn one_holder_per_socket() {
    let dir = tempfile::tempdir().unwrap();
    let h = HolderProc::start(dir.path(), &[]);
    let out = Command::new(HYPERBOXD).args(["fd-holder", "--socket"]).arg(&h.socket).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    h.client().list().unwrap();
    drop(h);

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let out = Command::new(HYPERBOXD).args(["fd-holder", "--socket"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}

/// Put `fds` at 3, 4, 5… in the child (what systemd does), cleared of
/// close-on-exec.
fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: between fork and exec only fcntl/dup2, which are
    // async-signal-safe; `fds` outlive the spawn (moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fds;
            // First out of the way (a source may sit at 3..), then into place.
            let high: Vec<RawFd> = raw.iter().map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100)).collect();
            for (i, &fd) in high.iter().enumerate() {
                if fd < 0 || libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// systemd's hand-back at start: the gRPC socket (named `grpc`, or found by
/// kind under an older socket unit) goes to the listener, the other fds to
/// the Keeper, which then replaces a handed-back name with a removal
/// before the store. The child is this binary under `sh -c 'LISTEN_PID=$$
/// exec …'`, so LISTEN_PID is its own pid.
#[test]
fn systemd_hands_back_kept_fds_and_the_grpc_socket() {
    if let Ok(role) = std::env::var(ROLE) {
        if let Some(grpc_path) = role.strip_prefix("listen:") {
            let named = std::env::var("LISTEN_FDNAMES").is_ok();
            let grpc = hyperbox::daemon::listen::take_grpc_socket().unwrap().expect("the gRPC socket");
            let l = std::os::unix::net::UnixListener::from(grpc);
            let addr = l.local_addr().unwrap();
            assert_eq!(addr.as_pathname(), Some(Path::new(grpc_path)));
            let mut k = Keeper::open(KeepMode::Systemd, Path::new("/nonexistent/h.sock")).unwrap();
            assert!(std::env::var_os("LISTEN_FDS").is_none() && std::env::var_os("LISTEN_FDNAMES").is_none());
            let kept = k.take_kept().unwrap();
            let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
            let mut got = Vec::new();
            for (_, fd) in &kept {
                got.push(String::from_utf8(read_some(fd.as_fd(), 64)).unwrap());
            }
            if named {
                assert_eq!(names, ["hbl.a", "hbl.b"]);
            } else {
                assert_eq!(names, ["unknown", "unknown"]);
            }
            assert_eq!(got, ["A", "B"]);
            // Put again under a handed-back name: systemd must first drop
            // the one it holds.
            k.put(names[0], kept[0].1.as_fd()).unwrap();
            println!("CHILD OK");
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for named in [true, false] {
        let grpc_path = dir.path().join(format!("grpc-{named}.sock"));
        let grpc = std::os::unix::net::UnixListener::bind(&grpc_path).unwrap();
        let notify_path = dir.path().join(format!("notify-{named}"));
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        let (a, mut wa) = pipe();
        let (b, mut wb) = pipe();
        wa.write_all(b"A").unwrap();
        wb.write_all(b"B").unwrap();
        let mut cmd = Command::new("sh");
        let names = if named { "LISTEN_FDNAMES=hbl.a:grpc:hbl.b; export LISTEN_FDNAMES; " } else { "" };
        cmd.arg("-c")
            .arg(format!("LISTEN_PID=$$ LISTEN_FDS=3; export LISTEN_PID LISTEN_FDS; {names}exec \"$0\" \"$@\""))
            .arg(std::env::current_exe().unwrap())
            .args(["systemd_hands_back_kept_fds_and_the_grpc_socket", "--exact", "--nocapture"])
            .env(ROLE, format!("listen:{}", grpc_path.display()))
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("LISTEN_FDNAMES");
        pass_fds(&mut cmd, vec![a, OwnedFd::from(grpc), b]);
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("CHILD OK"), "named {named}: {}\n{text}", out.status);
        notify.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let first = if named { "hbl.a" } else { "unknown" };
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("FDSTOREREMOVE=1\nFDNAME={first}\n"));
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), format!("FDSTORE=1\nFDNAME={first}\nFDPOLL=0\n"));
        assert!(notify.recv(&mut buf).is_err(), "more datagrams than expected");
    }
}
