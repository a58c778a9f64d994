//! Restarts without disruption, end to end: containers keep reading their
//! lazy layers while hyperboxd is SIGKILLed and started again, or stopped
//! and replaced by another build of the binary. A real containerd, runc,
//! docker-registry (behind a proxy that slows every blob GET, so reads are
//! in flight when the daemon dies), FUSE and overlayfs; the layers'
//! connections kept by the fd holder (no systemd runs here).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy};
use common::*;
use rand::{Rng, RngCore};

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox"];
const FILES: usize = 48;
const CONTAINERS: usize = 4;

/// Fields drop in order: containerd, then hyperboxd (its mounts detached),
/// and the temp dir last. Removed while the layers were still mounted in
/// it, the dir was left behind with a 400 MB copy of the binary each run.
struct Setup {
    ctd: Containerd,
    hb: Hyperboxd,
    _reg: Registry,
    proxy: FaultProxy,
    dst: String,
    /// `sha256sum`'s line for each file.
    sums: Vec<String>,
    files: Vec<Vec<u8>>,
    tmp: tempfile::TempDir,
}

/// busybox and a layer of FILES random files of 160 KiB, converted into a
/// registry behind a proxy, pulled lazily.
fn setup() -> Setup {
    let mut rng = rand::thread_rng();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|_| {
            let mut v = vec![0u8; 160 << 10];
            rng.fill_bytes(&mut v);
            v
        })
        .collect();
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr);
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let mut data = LayerBuilder::new().dir("data");
    for (i, f) in files.iter().enumerate() {
        data = data.file(&format!("data/f{i:02}"), 0o644, f);
    }
    let bb = LayerBuilder::busybox().symlink("bin/sleep", "busybox").symlink("bin/touch", "busybox");
    write_oci_image(&layout, "v1", &[bb.finish(), data.finish()], &["/bin/sh"], &[oci_arch()]);
    run(hyperbox()
        .args(["convert", "-q", "--plain-http"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("{}/restart:v1", reg.addr)));
    let dst = format!("{}/restart:v1", proxy.addr);
    let config = "version = 1\n[daemon]\nmetrics_address = \"\"\n[trace]\nenabled = false\n\
                  [fetch]\nmax_request_bytes = 65536\n";
    let hb = Hyperboxd::start(tmp.path(), config);
    let ctd = Containerd::start(&hb.proxy_plugin());
    let out = hyperbox_pull(&hb, &ctd, "hyperbox-test", &dst);
    assert!(out.contains("2 lazy"), "{out}");
    let sums = files.iter().enumerate().map(|(i, f)| format!("{}  /data/f{i:02}", &sha256(f)[7..])).collect();
    Setup { _reg: reg, proxy, tmp, hb, ctd, dst, sums, files }
}

/// What the containers printed, each line with when it came.
type Lines = Arc<Mutex<Vec<(Instant, usize, String)>>>;

/// Start CONTAINERS containers, each running a loop that checksums every
/// file of the layer (each from its own starting file) until `/stop`
/// exists in it. Returns the `ctr task exec` processes.
/// The containers' names. runc's state is per namespace, not per
/// containerd: names of this test's own (the tests of this file run at once).
fn container_names(tag: &str) -> Vec<String> {
    (0..CONTAINERS).map(|c| format!("restart-{tag}-{}-{c}", std::process::id())).collect()
}

fn start_readers(s: &Setup, names: &[String], lines: &Lines) -> Vec<Child> {
    let mut execs = Vec::new();
    for (c, name) in names.iter().enumerate() {
        run(s.ctd.ctr().args(["run", "-d", "--snapshotter", "hyperbox", &s.dst, name, "sleep", "3600"]));
        let order: Vec<String> =
            (0..FILES).map(|i| format!("/data/f{:02}", (i + c * FILES / CONTAINERS) % FILES)).collect();
        let script = format!(
            "while [ ! -e /stop ]; do for f in {}; do sha256sum $f 2>&1 || echo FAIL $f; done; done",
            order.join(" ")
        );
        let mut child = s
            .ctd
            .ctr()
            .args(["task", "exec", "--exec-id", "reader", name, "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((Instant::now(), c, l));
            }
        });
        execs.push(child);
    }
    execs
}

/// The data layer's FUSE mount on the host.
fn data_mount(hb: &Hyperboxd) -> PathBuf {
    hb.fuse_mounts().into_iter().find(|m| m.join("data/f00").exists()).expect("the data layer's mount")
}

fn drop_all(mount: &Path) {
    for i in 0..FILES {
        drop_page_cache(&mount.join(format!("data/f{i:02}")));
    }
}

/// Reads from the host through the mount, each cold: how long each took,
/// and whether it was right.
fn host_reader(
    mount: PathBuf,
    files: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, Duration, bool)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let p = mount.join(format!("data/f{:02}", i % FILES));
            drop_page_cache(&p);
            let t = Instant::now();
            let ok = std::fs::read(&p).map(|b| b == files[i % FILES]).unwrap_or(false);
            out.push((t, t.elapsed(), ok));
            i += 1;
        }
        out
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Stop the readers and check every line they printed: no failed read, and
/// every checksum right.
fn finish(s: &Setup, names: &[String], execs: Vec<Child>, lines: &Lines, last_restart: Instant) {
    for (i, name) in names.iter().enumerate() {
        run(s.ctd.ctr().args(["task", "exec", "--exec-id", &format!("stop{i}"), name, "touch", "/stop"]));
    }
    for mut e in execs {
        let t = Instant::now();
        loop {
            if let Some(status) = e.try_wait().unwrap() {
                assert!(status.success(), "a reader exited with {status}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "a reader did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let lines = lines.lock().unwrap();
    let mut per = [0usize; CONTAINERS];
    let mut after = [0usize; CONTAINERS];
    for (at, c, l) in lines.iter() {
        assert!(s.sums.contains(l), "container {c} read wrong or failed: {l:?}\n{}", s.hb.log());
        per[*c] += 1;
        if *at > last_restart {
            after[*c] += 1;
        }
    }
    println!("reads per container: {per:?}; after the last restart: {after:?}");
    for c in 0..CONTAINERS {
        assert!(per[c] >= FILES, "container {c} read only {} files", per[c]);
        assert!(after[c] > 0, "container {c} read nothing after the last restart");
    }
}

/// Kills and deletes the test's containers when dropped (also when the
/// test fails), so no shim or `sleep` outlives it.
struct Cleanup<'a>(&'a Containerd, Vec<String>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for name in &self.1 {
            let _ = self.0.ctr().args(["task", "kill", "-s", "KILL", name]).output();
        }
        for name in &self.1 {
            let _ = self.0.ctr().args(["task", "delete", "-f", name]).output();
            let _ = self.0.ctr().args(["container", "rm", name]).output();
        }
    }
}

/// Report the host's reads: all right, and how long those that spanned a
/// restart stalled.
fn report(reads: &[(Instant, Duration, bool)], downs: &[(Instant, Instant)]) {
    assert!(reads.iter().all(|r| r.2), "a host read through the mount failed or was wrong");
    let mut all: Vec<Duration> = reads.iter().map(|r| r.1).collect();
    let mut across: Vec<Duration> = reads
        .iter()
        .filter(|(t, d, _)| downs.iter().any(|(down, up)| *t < *up && *t + *d > *down))
        .map(|r| r.1)
        .collect();
    all.sort();
    across.sort();
    let mut down: Vec<Duration> = downs.iter().map(|(d, u)| *u - *d).collect();
    down.sort();
    println!(
        "hyperboxd down (kill or stop until its socket answers) {} times: p50 {:?} max {:?}",
        down.len(),
        percentile(&down, 0.5),
        down.last().copied().unwrap_or_default()
    );
    println!(
        "host reads: {} in all, p50 {:?} p99 {:?}; {} spanned a restart: p50 {:?} p99 {:?} max {:?}",
        all.len(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        across.len(),
        percentile(&across, 0.5),
        percentile(&across, 0.99),
        across.last().copied().unwrap_or_default()
    );
}

/// Containers and the host read while `restart` takes hyperboxd down and
/// up again `times` times (it gets the daemon, the round and the test's
/// random source); then every read is checked, the stalls reported, and
/// every restart must have served the live mounts again.
fn read_through_restarts(s: &mut Setup, tag: &str, times: usize, mut restart: impl FnMut(&mut Hyperboxd, usize)) {
    s.proxy.set(Fault::Delay(80), None);
    let lines: Lines = Arc::default();
    let names = container_names(tag);
    let _cleanup = Cleanup(&s.ctd, names.clone());
    let execs = start_readers(s, &names, &lines);
    let mount = data_mount(&s.hb);
    let stop = Arc::new(AtomicBool::new(false));
    let host = host_reader(mount.clone(), s.files.clone(), stop.clone());
    let mut rng = rand::thread_rng();
    let mut downs = Vec::new();
    let log_before = s.hb.log().len();
    for i in 0..times {
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..900)));
        drop_all(&mount);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
        let down = Instant::now();
        restart(&mut s.hb, i);
        downs.push((down, Instant::now()));
    }
    let last = downs.last().unwrap().1;
    std::thread::sleep(Duration::from_secs(2));
    drop_all(&mount);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let reads = host.join().unwrap();
    finish(s, &names, execs, &lines, last);
    report(&reads, &downs);
    let log = s.hb.log()[log_before..].to_string();
    assert_eq!(log.matches("serving again the layers a previous hyperboxd left mounted").count(), times, "{log}");
    assert!(!log.contains("mounting it afresh"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// SIGKILL hyperboxd 20 times at random moments while 4 containers and the
/// host read files, many for the first time, some while their chunks are
/// on the way: no read fails, every byte is right, and every restart
/// serves the live mounts again instead of mounting afresh.
#[test]
fn containers_read_through_sigkills() {
    if !have_tools("containers_read_through_sigkills", TOOLS) {
        return;
    }
    let mut s = setup();
    read_through_restarts(&mut s, "kill", 20, |hb, _| {
        hb.kill();
        std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(0..300)));
        hb.restart();
    });
}

/// The same with a graceful stop (SIGTERM) and another build of the binary
/// started each time (an upgrade): the mounts stay, the new process serves
/// them.
#[test]
fn containers_read_through_upgrades() {
    if !have_tools("containers_read_through_upgrades", TOOLS) {
        return;
    }
    let mut s = setup();
    // "Builds": copies of the binary at other paths, started in turn.
    let builds: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = s.tmp.path().join(format!("hyperboxd-build{i}"));
            std::fs::copy(env!("CARGO_BIN_EXE_hyperboxd"), &p).unwrap();
            p
        })
        .collect();
    read_through_restarts(&mut s, "upgrade", 8, |hb, i| {
        assert!(hb.stop().success(), "{}", hb.log());
        assert_eq!(hb.fuse_mounts().len(), 2, "a graceful stop unmounted layers");
        hb.use_binary(&builds[i % 2]);
        hb.restart();
    });
}
