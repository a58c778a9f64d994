//! The Debian package. cargo-deb builds it from the binaries built for this
//! test run (`--no-build`, nothing is compiled), into a temp dir. dpkg-deb
//! then shows every file at its path with its mode, the control fields, the
//! conffiles and the maintainer scripts. As root, the package is also
//! installed, upgraded and purged in a throwaway root (`dpkg --root`), never
//! on this machine.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HYPERBOXD: &str = env!("CARGO_BIN_EXE_hyperboxd");
const UNIT_DIR: &str = "/usr/lib/systemd/system";

/// The default config the package installs is what `hyperboxd
/// --print-default-config` prints, byte for byte, so the two cannot drift.
/// Regenerate it with:
/// `hyperboxd --print-default-config > packaging/deb/config.toml`
#[test]
fn packaged_config_is_the_printed_default() {
    let committed = std::fs::read_to_string(format!("{ROOT}/packaging/deb/config.toml")).unwrap();
    let printed = run(Command::new(HYPERBOXD).arg("--print-default-config"));
    assert!(
        committed == printed,
        "packaging/deb/config.toml differs from `hyperboxd --print-default-config`; regenerate it:\n  \
         hyperboxd --print-default-config > packaging/deb/config.toml"
    );
}

#[test]
fn deb_package() {
    const TEST: &str = "deb_package";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_cargo_deb = Command::new(&cargo).args(["deb", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        return skip(TEST, "cargo-deb not installed (scripts/deps.sh installs it)");
    }
    let tools = ["dpkg-deb", "systemd-analyze", "ldd", "dpkg"].map(Need::Tool);
    if !have(TEST, &tools) {
        return;
    }

    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(&cargo, tmp.path());
    let x = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));

    // Control fields: name and version from Cargo.toml (plus the Debian
    // revision), and the dependencies.
    let field = |name: &str| run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name)).trim().to_string();
    assert_eq!(field("Package"), env!("CARGO_PKG_NAME"));
    let version = field("Version");
    let upstream = version.rsplit_once('-').map_or(version.as_str(), |(u, _)| u);
    assert_eq!(upstream, env!("CARGO_PKG_VERSION"), "Version: {version}");
    let depends: Vec<String> = field("Depends")
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or("").to_string())
        .filter(|d| !d.is_empty())
        .collect();
    assert!(depends.iter().any(|d| d == "fuse3"), "Depends lacks fuse3: {depends:?}");
    // Every shared library hyperboxd links comes from a package in Depends
    // ($auto, through dpkg-shlibdeps). libgcc-s1 is left out on purpose:
    // cargo-deb drops it, every Debian system has it.
    let linked = linked_packages(&x.join("usr/bin/hyperboxd"));
    println!("Depends: {depends:?}; hyperboxd links libraries of {linked:?}");
    for pkg in linked {
        if pkg != "libgcc-s1" {
            assert!(depends.contains(&pkg), "hyperboxd links a library of {pkg}, which Depends lacks: {depends:?}");
        }
    }
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    println!("{info}");

    // Every file at its path, owned by root, with its mode.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entries = parse_listing(&listing);
    let mut want: Vec<(String, &str)> = vec![
        ("/usr/bin/hyperboxd".into(), "-rwxr-xr-x"),
        ("/usr/bin/hyperbox".into(), "-rwxr-xr-x"),
        (format!("{UNIT_DIR}/hyperboxd.service"), "-rw-r--r--"),
        (format!("{UNIT_DIR}/hyperboxd.socket"), "-rw-r--r--"),
        ("/etc/hyperbox/config.toml".into(), "-rw-r--r--"),
        ("/usr/share/doc/hyperbox/README.md".into(), "-rw-r--r--"),
    ];
    for (dir, ext, dest) in
        [("packaging/containerd", "toml", "/usr/share/hyperbox/containerd"), ("docs", "md", "/usr/share/doc/hyperbox")]
    {
        let files = files_with_ext(&Path::new(ROOT).join(dir), ext);
        assert!(!files.is_empty(), "no *.{ext} in {dir}");
        for f in files {
            want.push((format!("{dest}/{f}"), "-rw-r--r--"));
        }
    }
    for (path, mode) in &want {
        let Some((got, owner)) = entries.get(path) else { panic!("{path} is not in the package:\n{listing}") };
        assert_eq!(got, mode, "{path} has mode {got}, want {mode}");
        assert_eq!(owner, "0/0", "{path} is owned by {owner}, want root (0/0)");
    }

    // The files that are not built are the repository's, unchanged.
    let same = |src: &str, dest: &str| {
        let a = std::fs::read(Path::new(ROOT).join(src)).unwrap();
        let b = std::fs::read(x.join(dest.trim_start_matches('/'))).unwrap();
        assert!(a == b, "{dest} in the package differs from {src}");
    };
    same("hyperboxd.service", &format!("{UNIT_DIR}/hyperboxd.service"));
    same("hyperboxd.socket", &format!("{UNIT_DIR}/hyperboxd.socket"));
    same("packaging/deb/config.toml", "/etc/hyperbox/config.toml");
    same("packaging/containerd/hyperbox-v2.toml", "/usr/share/hyperbox/containerd/hyperbox-v2.toml");
    same("README.md", "/usr/share/doc/hyperbox/README.md");

    // The packaged units pass `systemd-analyze verify`, with ExecStart at the
    // packaged hyperboxd (verify checks that the binary exists).
    let packaged_hyperboxd = x.join("usr/bin/hyperboxd");
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    for unit in ["hyperboxd.service", "hyperboxd.socket"] {
        let text = std::fs::read_to_string(x.join(UNIT_DIR.trim_start_matches('/')).join(unit)).unwrap();
        let text = text.replace("ExecStart=/usr/bin/hyperboxd", &format!("ExecStart={}", packaged_hyperboxd.display()));
        std::fs::write(units.join(unit), text).unwrap();
    }
    let service = std::fs::read_to_string(units.join("hyperboxd.service")).unwrap();
    assert!(service.contains(&packaged_hyperboxd.display().to_string()), "ExecStart not rewritten:\n{service}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("hyperboxd.service"))
        .arg(units.join("hyperboxd.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed on the packaged units:\n{stderr}");
    assert!(!stderr.contains("hyperboxd."), "systemd-analyze complains about the packaged units:\n{stderr}");

    // /etc/hyperbox/config.toml is a conffile: an upgrade keeps local edits.
    let conffiles = run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert!(conffiles.lines().any(|l| l.trim() == "/etc/hyperbox/config.toml"), "conffiles:\n{conffiles}");

    // The packaged hyperboxd runs, and prints the packaged config, which
    // loads back.
    let printed = run(Command::new(&packaged_hyperboxd).arg("--print-default-config"));
    assert_eq!(printed, std::fs::read_to_string(x.join("etc/hyperbox/config.toml")).unwrap());
    let cfg = hyperbox::config::Config::load(Some(&x.join("etc/hyperbox/config.toml"))).unwrap();
    assert_eq!(cfg.daemon.address, Path::new("/run/hyperbox/hyperbox.sock"));
    let version = run(Command::new(x.join("usr/bin/hyperbox")).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "hyperbox --version: {version}");

    // Maintainer scripts: valid sh, cargo-deb's systemd snippets in once, and
    // nothing that starts a unit at install time.
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        assert!(path.exists(), "no {script} in the package");
        run(Command::new("sh").arg("-n").arg(&path));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(!postinst.contains("#DEBHELPER#"), "cargo-deb did not fill in #DEBHELPER#:\n{postinst}");
    for unit in ["hyperboxd.service", "hyperboxd.socket"] {
        let snippet = format!("deb-systemd-helper update-state {unit}");
        assert_eq!(postinst.matches(&snippet).count(), 1, "`{snippet}` is not in postinst once:\n{postinst}");
    }
    // After cargo-deb's snippets (which enable nothing new), the script
    // enables the socket itself.
    let own = postinst.rsplit("# End automatically added section").next().unwrap();
    assert!(own.contains("deb-systemd-helper enable hyperboxd.socket"), "postinst does not enable the socket:\n{own}");
    assert!(
        !own.contains("hyperboxd.service"),
        "postinst names hyperboxd.service outside cargo-deb's snippets:\n{own}"
    );
    for line in postinst.lines().map(str::trim) {
        let starts = line.starts_with("systemctl start")
            || line.starts_with("deb-systemd-invoke start")
            || line.contains("_dh_action=start");
        assert!(!starts, "postinst starts a unit: {line}");
    }
    // The files the postinst message names are in the package.
    let named = regex::Regex::new(r"/usr/share/hyperbox/[A-Za-z0-9_./-]+").unwrap();
    let mut count = 0;
    for m in named.find_iter(&postinst) {
        let p = m.as_str().trim_end_matches('.');
        assert!(entries.contains_key(p), "postinst names {p}, which is not in the package");
        count += 1;
    }
    assert!(count > 0, "postinst does not point at /usr/share/hyperbox/containerd/:\n{postinst}");

    if have_tools("deb_package (install in a throwaway root)", &["dpkg", "deb-systemd-helper"]) {
        install_upgrade_purge(&deb, tmp.path());
    }
}

/// Installs, upgrades (the same .deb again) and purges the package in a
/// throwaway root. `--force-script-chrootless` runs the maintainer scripts
/// here with DPKG_ROOT set, which deb-systemd-helper honours; systemctl and
/// deb-systemd-invoke are stubs that only log, so this machine's systemd is
/// never touched. `--force-depends`: the root has no libc6 or fuse3.
fn install_upgrade_purge(deb: &Path, tmp: &Path) {
    let root = tmp.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let stubs = tmp.join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    let log = tmp.join("stub.log");
    for tool in ["systemctl", "deb-systemd-invoke"] {
        let stub = stubs.join(tool);
        std::fs::write(&stub, format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", log.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap_or_default());
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .arg("--force-script-chrootless")
            .args(args)
            .env("PATH", &path)
            .stdin(std::process::Stdio::null());
        run(&mut cmd)
    };
    let deb = deb.to_str().unwrap();
    let socket_link = root.join("etc/systemd/system/sockets.target.wants/hyperboxd.socket");
    let service_link = root.join("etc/systemd/system/multi-user.target.wants/hyperboxd.service");

    // First install: the socket is enabled, the service is not, nothing is
    // started, and the operator is told what to add to containerd's config.
    let out = dpkg(&["--force-depends", "-i", deb]);
    println!("{out}");
    // The links are absolute (/usr/lib/...), so they dangle outside the root:
    // look at the links themselves.
    let enabled = |link: &Path| std::fs::symlink_metadata(link).is_ok();
    assert!(enabled(&socket_link), "the first install did not enable hyperboxd.socket");
    assert_eq!(std::fs::read_link(&socket_link).unwrap(), Path::new(UNIT_DIR).join("hyperboxd.socket"));
    assert!(!enabled(&service_link), "the first install enabled hyperboxd.service");
    assert!(out.contains("hyperbox: ") && out.contains("containerd"), "postinst printed no containerd hint:\n{out}");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!calls.contains("start"), "the install started a unit:\n{calls}");
    assert!(root.join("usr/bin/hyperboxd").exists() && root.join("etc/hyperbox/config.toml").exists());

    // The operator disables the socket and edits the config; an upgrade
    // keeps both and prints nothing.
    let out = Command::new("deb-systemd-helper")
        .args(["disable", "hyperboxd.socket"])
        .env("DPKG_ROOT", &root)
        .env("DPKG_MAINTSCRIPT_PACKAGE", "hyperbox")
        .output()
        .unwrap();
    assert!(out.status.success(), "deb-systemd-helper disable: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!enabled(&socket_link), "deb-systemd-helper disable left the socket enabled");
    let config = root.join("etc/hyperbox/config.toml");
    let edited = std::fs::read_to_string(&config).unwrap().replace("log_level = \"info\"", "log_level = \"debug\"");
    std::fs::write(&config, &edited).unwrap();
    let out = dpkg(&["--force-depends", "-i", deb]);
    assert!(!enabled(&socket_link), "the upgrade enabled the socket the operator disabled");
    assert!(!enabled(&service_link), "the upgrade enabled hyperboxd.service");
    assert!(!out.contains("hyperbox: "), "the upgrade printed the first-install hint:\n{out}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited, "the upgrade replaced the edited config");

    // Purge leaves nothing of the package in the root.
    dpkg(&["--purge", "hyperbox"]);
    let mut left = Vec::new();
    for dir in ["etc", "usr", "var/lib/systemd"] {
        collect_files(&root.join(dir), &mut left);
    }
    assert!(left.is_empty(), "purge left: {left:?}");
}

/// cargo-deb, from the binaries built for this run: their directory gives the
/// target dir and the profile. Returns the .deb's path.
fn build_deb(cargo: &std::ffi::OsStr, out: &Path) -> PathBuf {
    let profile_dir = Path::new(HYPERBOXD).parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        p => p,
    };
    let started = std::time::Instant::now();
    // --fast: lighter compression; the test only reads the package back.
    let stdout = run(Command::new(cargo)
        .current_dir(ROOT)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["deb", "--no-build", "--fast", "--profile", profile, "--output"])
        .arg(out));
    let deb = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    assert!(deb.starts_with(out) && deb.exists(), "cargo deb printed no .deb in {}: {stdout}", out.display());
    println!("built {} from {} in {:.1?}", deb.display(), profile_dir.display(), started.elapsed());
    deb
}

/// Path → (mode, owner) from `dpkg-deb -c`.
fn parse_listing(listing: &str) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 {
            let path = f[5].trim_start_matches('.').trim_end_matches('/').to_string();
            out.insert(path, (f[0].to_string(), f[1].to_string()));
        }
    }
    out
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The Debian packages of the shared libraries `bin` links (ldd, dpkg -S).
fn linked_packages(bin: &Path) -> Vec<String> {
    let ldd = run(Command::new("ldd").arg(bin));
    let mut pkgs = Vec::new();
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"; the vdso and
        // the dynamic loader have no "=> /path".
        let Some((_, rest)) = line.split_once("=> ") else { continue };
        let Some(lib) = rest.split_whitespace().next().filter(|p| p.starts_with('/')) else { continue };
        let canonical = std::fs::canonicalize(lib).unwrap_or_else(|_| PathBuf::from(lib));
        // dpkg knows a library under the path its package ships, which with
        // merged /usr may be /lib or /usr/lib: try the name as ldd gave it,
        // under /usr, then resolved.
        let owner = [PathBuf::from(lib), PathBuf::from(format!("/usr{lib}")), canonical]
            .iter()
            .find_map(|p| {
                let out = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .unwrap_or_else(|| panic!("dpkg -S finds no package for {lib}"));
        let pkg = owner.split(':').next().unwrap().trim().to_string();
        if !pkgs.contains(&pkg) {
            pkgs.push(pkg);
        }
    }
    assert!(!pkgs.is_empty(), "ldd found no libraries in {}:\n{ldd}", bin.display());
    pkgs
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
