use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::process::Command;

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

use super::*;
use crate::daemon::listen::split_passed;

#[test]
fn names_follow_systemds_rules() {
    for good in ["hbl.0123abcd.7f", "a", "with space", "=~!\"#$%&'()*+,-./;<>?@[\\]^_`{|}", &"x".repeat(255)] {
        validate_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
    for (bad, why) in [
        ("", "empty"),
        (&"x".repeat(256) as &str, "256 bytes"),
        ("sha256:abc", "':'"),
        ("a\nb", "0x0a"),
        ("tab\there", "0x09"),
        ("del\x7f", "0x7f"),
        ("é", "0xc3"),
        ("nul\0", "0x00"),
    ] {
        let e = validate_name(bad).expect_err(bad);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(why), "{bad:?}: {e}");
        assert!(e.to_string().contains("printable ASCII"), "{bad:?}: {e}");
    }
}

#[test]
fn auto_chooses_systemd_only_when_its_store_keeps_fds() {
    let never = || -> Result<u64, String> { panic!("the unit need not be asked") };
    let d = decide(false, Some("4096"), true, never);
    assert_eq!(d.mode, KeepMode::Holder, "{d:?}");
    assert!(d.reason.contains("NOTIFY_SOCKET"));
    let d = decide(true, Some("4096"), false, never);
    assert_eq!((d.mode, d.store_max), (KeepMode::Systemd, Some(4096)));
    for v in ["0", "", "lots"] {
        let d = decide(true, Some(v), true, never);
        assert_eq!(d.mode, KeepMode::Holder, "{v:?}: {d:?}");
    }
    let d = decide(true, None, true, never);
    assert_eq!(d.mode, KeepMode::Systemd, "{d:?}");
    let d = decide(true, None, false, || Ok(64));
    assert_eq!((d.mode, d.store_max), (KeepMode::Systemd, Some(64)));
    let d = decide(true, None, false, || Ok(0));
    assert_eq!(d.mode, KeepMode::Holder);
    assert!(d.reason.contains("FileDescriptorStoreMax=0"), "{d:?}");
    let d = decide(true, None, false, || Err("no systemctl".into()));
    assert_eq!(d.mode, KeepMode::Holder);
    assert!(d.reason.contains("no systemctl"), "{d:?}");
}

#[test]
fn the_unit_comes_from_the_cgroup() {
    let v2 = "0::/system.slice/hyperboxd.service\n";
    assert_eq!(unit_of_cgroup(v2), Some(("hyperboxd.service".into(), false)));
    let hybrid = "12:pids:/system.slice/hyperboxd.service\n1:name=systemd:/system.slice/hyperboxd.service\n\
                  0::/system.slice/hyperboxd.service\n";
    assert_eq!(unit_of_cgroup(hybrid), Some(("hyperboxd.service".into(), false)));
    let v1 = "4:memory:/x\n1:name=systemd:/system.slice/hb.service\n";
    assert_eq!(unit_of_cgroup(v1), Some(("hb.service".into(), false)));
    let user = "0::/user.slice/user-0.slice/user@0.service/app.slice/hb-test.service\n";
    assert_eq!(unit_of_cgroup(user), Some(("hb-test.service".into(), true)));
    let delegated = "0::/system.slice/hyperboxd.service/payload\n";
    assert_eq!(unit_of_cgroup(delegated), Some(("hyperboxd.service".into(), false)));
    assert_eq!(unit_of_cgroup("0::/\n"), None);
    assert_eq!(unit_of_cgroup("0::/user.slice/user-0.slice/user@0.service\n"), None);
    assert_eq!(unit_of_cgroup(""), None);
}

fn inode(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

/// The gRPC socket is the fd named `grpc`, wherever it is; without that
/// name, the first listening unix stream socket; the rest are kept fds.
#[test]
fn the_grpc_socket_is_picked_by_name_then_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let listener = || UnixListener::bind(dir.path().join(format!("{}.sock", rand::random::<u64>()))).unwrap();
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap().0;
    let fd = |x: OwnedFd| x;

    let grpc = listener();
    let want = inode(&grpc);
    let p = split_passed(vec![("hbl.1".into(), pipe()), ("grpc".into(), fd(grpc.into())), ("hbl.2".into(), pipe())]);
    assert_eq!(inode(p.grpc.unwrap()), want);
    assert_eq!(p.kept.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["hbl.1", "hbl.2"]);

    // An older socket unit: named after itself; or no names at all. Not a
    // datagram socket, not a stream socket that does not listen.
    let sock = listener();
    let want = inode(&sock);
    let (a, _b) = UnixStream::pair().unwrap();
    let dgram = UnixDatagram::unbound().unwrap();
    for name in ["hyperboxd.socket", "unknown"] {
        let sock = sock.try_clone().unwrap();
        let p = split_passed(vec![
            ("hbl.1".into(), pipe()),
            ("unknown".into(), fd(dgram.try_clone().unwrap().into())),
            ("unknown".into(), fd(a.try_clone().unwrap().into())),
            (name.into(), fd(sock.into())),
            ("hbl.2".into(), pipe()),
        ]);
        assert_eq!(inode(p.grpc.unwrap()), want, "{name}");
        assert_eq!(p.kept.len(), 4);
    }

    let p = split_passed(vec![("hbl.1".into(), pipe())]);
    assert!(p.grpc.is_none());
    assert_eq!(p.kept.len(), 1);
    let p = split_passed(vec![]);
    assert!(p.grpc.is_none() && p.kept.is_empty());
}

/// Set in the environment of this test binary run again as a child.
const CHILD: &str = "HYPERBOX_FDSTORE_TEST_CHILD";

/// Run the test `name` of this binary in a child process, with `env`.
fn run_child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([&format!("daemon::fdstore::tests::{name}"), "--exact", "--include-ignored", "--nocapture"]);
    cmd.env_remove("NOTIFY_SOCKET").env_remove("FDSTORE").env_remove("LISTEN_PID").env_remove("LISTEN_FDS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed: {}\n{text}", out.status);
    assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
    out
}

/// One datagram as systemd's notify socket receives it: text, fds, and
/// the sender's pid (SCM_CREDENTIALS, which systemd checks against the
/// service's main pid).
fn recv_notify(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>, i32)> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 16], libc::ucred);
    let msg = match recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::Error::EAGAIN) => return None,
        Err(e) => panic!("recvmsg: {e}"),
    };
    let (mut fds, mut pid) = (Vec::new(), 0);
    for c in msg.cmsgs().unwrap() {
        match c {
            // SAFETY: just received; ours alone.
            ControlMessageOwned::ScmRights(raw) => {
                fds.extend(raw.into_iter().map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
            }
            ControlMessageOwned::ScmCredentials(c) => pid = c.pid(),
            _ => {}
        }
    }
    let n = msg.bytes;
    Some((String::from_utf8(buf[..n].to_vec()).unwrap(), fds, pid))
}

/// What the systemd keeper sends, received on a datagram socket standing
/// in for systemd's: the FDSTORE datagram with the fd (the same open
/// file: bytes written into the pipe after the put come out of the fd
/// received), a replacement (remove, then store), a removal; nothing for a
/// bad name; and the sender's own pid on each.
#[test]
fn systemd_datagrams_carry_the_fd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    setsockopt(&sock, sockopt::PassCred, &true).unwrap();
    let out = run_child("systemd_child", &[(CHILD, "systemd"), ("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let child_pid: i32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("child pid "))
        .expect("the child says its pid")
        .parse()
        .unwrap();

    let store = "FDSTORE=1\nFDNAME=hbl.test.1\nFDPOLL=0\n";
    let remove = "FDSTOREREMOVE=1\nFDNAME=hbl.test.1\n";
    let (text, fds, pid) = recv_notify(&sock).expect("a first datagram");
    assert_eq!((text.as_str(), fds.len(), pid), (store, 1, child_pid));
    let mut got = String::new();
    std::fs::File::from(fds.into_iter().next().unwrap()).read_to_string(&mut got).unwrap();
    assert_eq!(got, "written after the put\n");
    let (text, fds, pid) = recv_notify(&sock).expect("the replacement's removal");
    assert_eq!((text.as_str(), fds.len(), pid), (remove, 0, child_pid));
    let (text, fds, _) = recv_notify(&sock).expect("the replacement");
    assert_eq!((text.as_str(), fds.len()), (store, 1));
    let (text, fds, _) = recv_notify(&sock).expect("the removal");
    assert_eq!((text.as_str(), fds.len()), (remove, 0));
    let (text, fds, _) = recv_notify(&sock).expect("a second name");
    assert_eq!((text.as_str(), fds.len()), ("FDSTORE=1\nFDNAME=hbl.test.2\nFDPOLL=0\n", 1));
    assert!(recv_notify(&sock).is_none(), "more datagrams than expected");
}

/// The child of `systemd_datagrams_carry_the_fd` (ignored when run by
/// itself).
#[test]
#[ignore = "run by systemd_datagrams_carry_the_fd in a process of its own"]
fn systemd_child() {
    if std::env::var(CHILD).as_deref() != Ok("systemd") {
        return;
    }
    println!("child pid {}", std::process::id());
    let mut k = Keeper::open(KeepMode::Systemd, Path::new("/nonexistent/fdholder.sock")).unwrap();
    assert_eq!(k.mode(), KeepMode::Systemd);
    assert!(k.take_kept().unwrap().is_empty());
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    k.put("hbl.test.1", r.as_fd()).unwrap();
    let mut w = std::fs::File::from(w);
    w.write_all(b"written after the put\n").unwrap();
    drop(w);
    k.put("hbl.test.1", r.as_fd()).unwrap();
    k.remove("hbl.test.1").unwrap();
    for bad in ["sha256:abc", "", "a\nFDSTOREREMOVE=1"] {
        let e = k.put(bad, r.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        k.remove(bad).unwrap_err();
    }
    k.put("hbl.test.2", r.as_fd()).unwrap();
}

/// `systemd` without NOTIFY_SOCKET is an error that says why; `auto` with
/// `$FDSTORE` set (systemd 254+) takes the store and knows its size.
#[test]
fn systemd_mode_needs_a_notify_socket() {
    run_child("systemd_mode_child", &[(CHILD, "nosocket")]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    run_child("systemd_mode_child", &[(CHILD, "auto"), ("NOTIFY_SOCKET", path.to_str().unwrap()), ("FDSTORE", "2")]);
    let (text, fds, _) = recv_notify(&sock).unwrap();
    assert_eq!((text.as_str(), fds.len()), ("FDSTORE=1\nFDNAME=a\nFDPOLL=0\n", 1));
    let (text, _, _) = recv_notify(&sock).unwrap();
    assert_eq!(text, "FDSTORE=1\nFDNAME=b\nFDPOLL=0\n");
    // The put past the store's size sent nothing.
    let (text, _, _) = recv_notify(&sock).unwrap();
    assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=a\n");
    assert!(recv_notify(&sock).is_none(), "more datagrams than expected");
}

#[test]
#[ignore = "run by systemd_mode_needs_a_notify_socket in a process of its own"]
fn systemd_mode_child() {
    match std::env::var(CHILD).as_deref() {
        Ok("nosocket") => {
            let e = Keeper::open(KeepMode::Systemd, Path::new("/nonexistent/h.sock")).err().expect("an error");
            assert!(e.to_string().contains("NOTIFY_SOCKET is unset"), "{e}");
        }
        Ok("auto") => {
            let k = Keeper::open(KeepMode::Auto, Path::new("/nonexistent/h.sock")).unwrap();
            assert_eq!(k.mode(), KeepMode::Systemd);
            let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            k.put("a", r.as_fd()).unwrap();
            k.put("b", r.as_fd()).unwrap();
            let e = k.put("c", r.as_fd()).unwrap_err();
            assert!(e.to_string().contains("fd store is full: FileDescriptorStoreMax=2"), "{e}");
            // Replacing one is not one more.
            k.remove("a").unwrap();
        }
        _ => {}
    }
}

#[test]
fn off_keeps_nothing() {
    let k = Keeper::Off(OffKeeper { passed: Vec::new() });
    let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    k.put("hbl.1", r.as_fd()).unwrap();
    k.remove("hbl.1").unwrap();
    assert!(k.put("a:b", r.as_fd()).is_err());
    assert_eq!(k.mode(), KeepMode::Off);
}
