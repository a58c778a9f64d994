//! `hyperbox doctor`: checks what HyperBox needs from the node, and says
//! how to fix each thing that is wrong.

use std::path::Path;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Works, but not as most nodes want it.
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about it (for Warn and Fail).
    pub fix: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Ok, detail: detail.into(), fix: String::new() }
    }
    fn bad(name: &'static str, outcome: Outcome, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome, detail: detail.into(), fix: fix.into() }
    }
}

fn filesystems() -> String {
    std::fs::read_to_string("/proc/filesystems").unwrap_or_default()
}

/// `/dev/fuse` can be opened and the kernel knows FUSE.
pub fn fuse() -> Check {
    const NAME: &str = "FUSE";
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Check::bad(
            NAME,
            Outcome::Fail,
            format!("cannot open /dev/fuse: {e}"),
            "load the module (`modprobe fuse`); in a container, pass the device (`--device /dev/fuse`) \
             and run hyperboxd as root with CAP_SYS_ADMIN",
        );
    }
    if !filesystems().lines().any(|l| l.split_whitespace().last() == Some("fuse")) {
        return Check::bad(NAME, Outcome::Fail, "the kernel lists no fuse filesystem", "`modprobe fuse`");
    }
    Check::ok(NAME, "/dev/fuse opens; the kernel has FUSE")
}

/// The first kernel with `FUSE_NOTIFY_RESEND` (Linux 6.9): a restarted
/// daemon asks it to send again the requests the dead one had read.
const RESEND_SINCE: (u32, u32) = (6, 9);

/// (major, minor) of a kernel release string as `uname -r` prints it
/// (`6.18.44-cloud-amd64`, `5.10.0-28-amd64`, `6.10-rc1`); None if it does
/// not start with two numbers.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().splitn(3, '.');
    let (major, minor) = (parts.next()?, parts.next()?);
    let minor = &minor[..minor.find(|c: char| !c.is_ascii_digit()).unwrap_or(minor.len())];
    if !major.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The kernel check for a release string (None: none could be read).
pub fn kernel_check(release: Option<&str>) -> Check {
    const NAME: &str = "kernel";
    let release = release.map(str::trim).unwrap_or_default();
    match kernel_version(release) {
        Some(v) if v >= RESEND_SINCE => {
            let mut detail =
                format!("Linux {release}: FUSE_NOTIFY_RESEND: requests in flight during a daemon crash are sent again");
            if v == RESEND_SINCE {
                detail.push_str(
                    " (a 6.9.y needs the stable fix \"fuse: clear FR_SENT when re-adding requests into pending list\")",
                );
            }
            Check::ok(NAME, detail)
        }
        Some(_) => Check::bad(
            NAME,
            Outcome::Warn,
            format!(
                "Linux {release} has no FUSE_NOTIFY_RESEND (6.9+): if hyperboxd dies, the \
                 requests it had read but not answered are lost, and the processes that made them hang until \
                 the layer's connection is aborted"
            ),
            "run Linux 6.9 or later (6.10+, or a 6.9.y with the FR_SENT fix) so that a crash of hyperboxd loses \
             no request",
        ),
        None => Check::bad(
            NAME,
            Outcome::Warn,
            format!("cannot tell the kernel's version from {release:?}"),
            "check `uname -r`: Linux 6.9 or later (FUSE_NOTIFY_RESEND) is needed so that a crash of hyperboxd \
             loses no request",
        ),
    }
}

/// This kernel: `/proc/sys/kernel/osrelease`, else `uname -r`.
pub fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().or_else(|| {
        let out = std::process::Command::new("uname").arg("-r").output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    kernel_check(release.as_deref())
}

/// Where the kernel's FUSE request timeouts are (Linux 6.14+).
const FUSE_SYSCTLS: &str = "/proc/sys/fs/fuse";

/// The request-timeout check for the contents of
/// `fs/fuse/default_request_timeout` and `max_request_timeout` (None: no
/// such file, as before Linux 6.14). The kernel fixes a connection's
/// timeout at its INIT: the server's own (HyperBox sets none), else the
/// default, capped by the max; then it aborts the whole connection when a
/// request waits longer than that for its answer.
pub fn request_timeout_check(default: Option<&str>, max: Option<&str>) -> Check {
    const NAME: &str = "FUSE timeout";
    if default.is_none() && max.is_none() {
        return Check::ok(NAME, "this kernel has no FUSE request timeout (before Linux 6.14)");
    }
    let mut values = [0u32; 2];
    for (i, (file, text)) in
        [("default_request_timeout", default), ("max_request_timeout", max)].into_iter().enumerate()
    {
        let Some(text) = text else { continue };
        match text.trim().parse() {
            Ok(v) => values[i] = v,
            Err(_) => {
                return Check::bad(
                    NAME,
                    Outcome::Warn,
                    format!("cannot tell the FUSE request timeout: {FUSE_SYSCTLS}/{file} reads {text:?}"),
                    "check that fs.fuse.default_request_timeout and fs.fuse.max_request_timeout are 0: otherwise \
                     the kernel aborts a layer's connection while hyperboxd restarts",
                )
            }
        }
    }
    let [default, max] = values;
    let timeout = match (default, max) {
        (d, 0) => d,
        (0, m) => m,
        (d, m) => d.min(m),
    };
    if timeout == 0 {
        return Check::ok(
            NAME,
            "fs.fuse.default_request_timeout and max_request_timeout are 0: no FUSE request times out",
        );
    }
    Check::bad(
        NAME,
        Outcome::Warn,
        format!(
            "fs.fuse.default_request_timeout = {default}, max_request_timeout = {max}: the kernel aborts a layer's \
             whole FUSE connection when a request has waited more than {timeout} s for its answer, so a hyperboxd \
             restart that takes longer (or a read waiting that long on the registry) breaks the containers using \
             the layer (ENOTCONN)"
        ),
        "set both to 0: `sysctl -w fs.fuse.default_request_timeout=0 fs.fuse.max_request_timeout=0`, and in a file \
         in /etc/sysctl.d/ to keep it; layers mounted while a timeout was set keep it until they are mounted again",
    )
}

/// This kernel's FUSE request timeouts.
pub fn request_timeouts() -> Check {
    let read = |file: &str| match std::fs::read_to_string(format!("{FUSE_SYSCTLS}/{file}")) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("(unreadable: {e})")),
    };
    request_timeout_check(read("default_request_timeout").as_deref(), read("max_request_timeout").as_deref())
}

/// An overlay mount with a lower, upper and work dir works here (a real one,
/// in a temp dir, unmounted at once).
pub fn overlay() -> Check {
    const NAME: &str = "overlayfs";
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Check::bad(NAME, Outcome::Fail, format!("temp dir: {e}"), "check /tmp"),
    };
    let p = |n: &str| dir.path().join(n);
    for d in ["lower", "upper", "work", "merged"] {
        if let Err(e) = std::fs::create_dir(p(d)) {
            return Check::bad(NAME, Outcome::Fail, format!("temp dir: {e}"), "check /tmp");
        }
    }
    let opts =
        format!("lowerdir={},upperdir={},workdir={}", p("lower").display(), p("upper").display(), p("work").display());
    let out =
        std::process::Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(p("merged")).output();
    match out {
        Ok(o) if o.status.success() => {
            let _ = std::process::Command::new("umount").arg(p("merged")).status();
            Check::ok(NAME, "an overlay mount works")
        }
        Ok(o) => Check::bad(
            NAME,
            Outcome::Fail,
            format!("overlay mount failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            "run as root; load the module (`modprobe overlay`); /tmp must not itself be an overlay \
             without xattr support",
        ),
        Err(e) => Check::bad(NAME, Outcome::Fail, format!("cannot run mount: {e}"), "install util-linux"),
    }
}

/// The version containerd at socket `containerd` reports (its version API),
/// e.g. `1.6.20~ds1` or `v2.1.9`; None if it does not answer.
pub async fn containerd_version(containerd: &Path) -> Option<String> {
    use containerd_client::services::v1::version_client::VersionClient;
    let channel = containerd_client::connect(containerd).await.ok()?;
    let v = VersionClient::new(channel).version(()).await.ok()?.into_inner();
    Some(v.version)
}

/// The major version in a containerd version string (`v2.1.9`, `1.7.24~ds1`).
fn major(version: &str) -> Option<u64> {
    version.trim_start_matches('v').split('.').next()?.parse().ok()
}

/// containerd's config: the proxy plugin entry, and the CRI settings that
/// make Kubernetes pulls lazy; with the version of the containerd that
/// reads it (from [`containerd_version`]), whether that containerd reads
/// this config version as meant, and on containerd 2 (config version 3)
/// the transfer service's settings.
pub fn containerd_config(path: &Path, address: &Path, containerd: Option<&str>) -> Vec<Check> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return vec![Check::bad(
                "containerd config",
                Outcome::Fail,
                format!("cannot read {}: {e}", path.display()),
                "point --containerd-config at containerd's config (k3s: \
                 /var/lib/rancher/k3s/agent/etc/containerd/config.toml)",
            )]
        }
    };
    let cfg: toml::Value = match toml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Check::bad(
                "containerd config",
                Outcome::Fail,
                format!("{} does not parse: {e}", path.display()),
                "fix the TOML; containerd refuses it too",
            )]
        }
    };
    let mut out = Vec::new();
    let version = cfg.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let containerd_major = containerd.and_then(major);
    let v3 = "packaging/containerd/hyperbox-v3.toml";
    match containerd_major {
        Some(m) if m >= 2 && version < 3 => {
            // containerd 2 migrates an older config in memory; its migration
            // (2.1.9, plugins/cri/images migrateConfig) copies the CRI's
            // snapshotter settings only from a table that has `runtimes`.
            let has_runtimes = cfg
                .get("plugins")
                .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
                .and_then(|c| c.get("containerd"))
                .is_some_and(|c| c.get("runtimes").is_some());
            out.push(Check::bad(
                "config version",
                if has_runtimes { Outcome::Warn } else { Outcome::Fail },
                if has_runtimes {
                    format!(
                        "containerd {} reads this version {version} config by migrating it; `ctr image pull \
                         --snapshotter hyperbox` fails (its transfer service has no unpack entry for hyperbox)",
                        containerd.unwrap_or_default()
                    )
                } else {
                    format!(
                        "containerd {} migrates this version {version} config and drops the CRI's snapshotter and \
                         disable_snapshot_annotations (its [plugins.\"io.containerd.grpc.v1.cri\".containerd] table \
                         has no runtimes): CRI pulls are silently not lazy",
                        containerd.unwrap_or_default()
                    )
                },
                format!(
                    "rewrite the config as `version = 3` with HyperBox's entries ({v3}): \
                     [proxy_plugins.hyperbox], snapshotter and disable_snapshot_annotations = false under \
                     [plugins.\"io.containerd.cri.v1.images\"], and a hyperbox entry in \
                     [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]; then restart containerd"
                ),
            ));
        }
        Some(m) if m < 2 && version >= 3 => out.push(Check::bad(
            "config version",
            Outcome::Fail,
            format!("containerd {} reads config versions 1 and 2 only, this is {version}", containerd.unwrap_or_default()),
            "use packaging/containerd/hyperbox-v2.toml's entries in a `version = 2` config, or upgrade containerd to 2.x",
        )),
        Some(_) => out.push(Check::ok(
            "config version",
            format!("version {version}, read as is by containerd {}", containerd.unwrap_or_default()),
        )),
        None => {}
    }
    let plugin = cfg.get("proxy_plugins").and_then(|p| p.get("hyperbox"));
    let want = address.display().to_string();
    let entry = format!("[proxy_plugins.hyperbox]\n  type = \"snapshot\"\n  address = \"{want}\"");
    out.push(match plugin {
        None => Check::bad(
            "proxy plugin",
            Outcome::Fail,
            format!("{} has no [proxy_plugins.hyperbox]", path.display()),
            format!("add, then restart containerd:\n{entry}"),
        ),
        Some(p) => {
            let kind = p.get("type").and_then(|v| v.as_str()).unwrap_or("");
            let addr = p.get("address").and_then(|v| v.as_str()).unwrap_or("");
            if kind != "snapshot" {
                Check::bad("proxy plugin", Outcome::Fail, format!("type = {kind:?}"), "set type = \"snapshot\"")
            } else if addr.starts_with("unix://") {
                Check::bad(
                    "proxy plugin",
                    Outcome::Fail,
                    format!("address = {addr:?}"),
                    format!("write a bare path (containerd 1.6 never connects to unix://...): address = \"{want}\""),
                )
            } else if addr != want {
                Check::bad(
                    "proxy plugin",
                    Outcome::Fail,
                    format!("address = {addr:?}, but hyperboxd listens on {want}"),
                    format!("make them the same: address = \"{want}\" (or start hyperboxd with --address {addr})"),
                )
            } else {
                Check::ok("proxy plugin", format!("[proxy_plugins.hyperbox] → {addr}"))
            }
        }
    });
    // The CRI plugin's section (config version 2; version 3 moved it).
    let cri = if version >= 3 {
        cfg.get("plugins").and_then(|p| p.get("io.containerd.cri.v1.images"))
    } else {
        cfg.get("plugins").and_then(|p| p.get("io.containerd.grpc.v1.cri")).and_then(|c| c.get("containerd"))
    };
    let section = if version >= 3 {
        "[plugins.\"io.containerd.cri.v1.images\"]"
    } else {
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]"
    };
    let snapshotter = cri.and_then(|c| c.get("snapshotter")).and_then(|v| v.as_str());
    out.push(if snapshotter == Some("hyperbox") {
        Check::ok("CRI snapshotter", "Kubernetes images use hyperbox")
    } else {
        Check::bad(
            "CRI snapshotter",
            Outcome::Warn,
            format!("CRI uses {:?}", snapshotter.unwrap_or("overlayfs (the default)")),
            format!("for lazy Kubernetes pulls set, under {section}:\n  snapshotter = \"hyperbox\""),
        )
    });
    let annotations = cri.and_then(|c| c.get("disable_snapshot_annotations")).and_then(|v| v.as_bool());
    out.push(if annotations == Some(false) {
        Check::ok("CRI annotations", "the CRI passes image references to snapshotters")
    } else {
        Check::bad(
            "CRI annotations",
            if snapshotter == Some("hyperbox") { Outcome::Fail } else { Outcome::Warn },
            "disable_snapshot_annotations is not false (containerd 1.6 defaults to true): CRI pulls pass no \
             image reference, so no layer can be lazy",
            format!("set, under {section}:\n  disable_snapshot_annotations = false"),
        )
    });
    // containerd 2's transfer service (`ctr image pull`; CRI pulls on 2.1+
    // when the annotations are not asked for) unpacks only into the
    // snapshotters its unpack_config lists, and passes image references to
    // a proxy snapshotter only if it exports enable_remote_snapshot_annotations.
    if version >= 3 || containerd_major.is_some_and(|m| m >= 2) {
        let transfer = cfg.get("plugins").and_then(|p| p.get("io.containerd.transfer.v1.local"));
        let unpack = transfer.and_then(|t| t.get("unpack_config")).and_then(|u| u.as_array());
        let snapshotters: Vec<&str> = unpack
            .map(|u| u.iter().filter_map(|e| e.get("snapshotter").and_then(|s| s.as_str())).collect())
            .unwrap_or_default();
        let section = "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]";
        let entry = |s: &str| format!("{section}\n  platform = \"linux/amd64\"\n  snapshotter = \"{s}\"");
        out.push(if !snapshotters.contains(&"hyperbox") {
            let mut fix = format!(
                "add (the list replaces containerd's default, so keep overlayfs in it):\n{}",
                entry("hyperbox")
            );
            if !snapshotters.contains(&"overlayfs") {
                fix = format!("{fix}\n{}", entry("overlayfs"));
            }
            Check::bad(
                "transfer unpack",
                // CRI pulls into hyperbox on 2.1+ go through it too unless
                // the annotations are on; `hyperbox pull` never does.
                if snapshotter == Some("hyperbox") && annotations != Some(false) {
                    Outcome::Fail
                } else {
                    Outcome::Warn
                },
                "the transfer service has no unpack entry for hyperbox: `ctr image pull --snapshotter hyperbox` \
                 fails with \"no unpack platforms defined\"",
                fix,
            )
        } else if unpack.is_some() && !snapshotters.contains(&"overlayfs") {
            Check::bad(
                "transfer unpack",
                Outcome::Warn,
                "unpack_config lists no overlayfs entry: pulls into containerd's default snapshotter fail",
                format!("the list replaces containerd's default; add:\n{}", entry("overlayfs")),
            )
        } else {
            Check::ok("transfer unpack", format!("the transfer service unpacks into {}", snapshotters.join(", ")))
        });
        let exported = plugin
            .and_then(|p| p.get("exports"))
            .and_then(|e| e.get("enable_remote_snapshot_annotations"))
            .and_then(|v| v.as_str());
        if exported == Some("true") {
            out.push(Check::ok("transfer labels", "transfer-service pulls pass image references to hyperbox"));
        } else if annotations != Some(false) {
            // With disable_snapshot_annotations = false, CRI pulls take the
            // older path, which passes them anyway.
            out.push(Check::bad(
                "transfer labels",
                Outcome::Warn,
                "CRI pulls go through the transfer service, which passes a proxy snapshotter no image reference \
                 unless it exports enable_remote_snapshot_annotations: no layer can be lazy",
                "add:\n[proxy_plugins.hyperbox.exports]\n  enable_remote_snapshot_annotations = \"true\"",
            ));
        }
    }
    out
}

/// hyperboxd answers on its socket.
pub async fn daemon(address: &Path) -> Check {
    const NAME: &str = "hyperboxd";
    let client = match crate::admin::connect(address).await {
        Ok(c) => c,
        Err(e) => {
            return Check::bad(
                NAME,
                Outcome::Fail,
                format!("nothing answers on {}: {e}", address.display()),
                "start it: `systemctl start hyperboxd.socket hyperboxd` (or run hyperboxd); --address if it \
                 listens elsewhere",
            )
        }
    };
    let mut client = client;
    match client.list_traces(crate::admin::proto::ListTracesRequest {}).await {
        Ok(r) => {
            Check::ok(NAME, format!("answers on {} ({} traces kept)", address.display(), r.into_inner().traces.len()))
        }
        Err(e) => Check::bad(
            NAME,
            Outcome::Fail,
            format!("{} answers, but not as hyperboxd: {e}", address.display()),
            "another program owns the socket, or hyperboxd is older than this hyperbox",
        ),
    }
}

/// containerd runs and has loaded the hyperbox snapshotter.
pub async fn containerd_plugin(containerd: &Path) -> Check {
    use containerd_client::services::v1::introspection_client::IntrospectionClient;
    use containerd_client::services::v1::PluginsRequest;
    const NAME: &str = "containerd";
    let channel = match containerd_client::connect(containerd).await {
        Ok(c) => c,
        Err(e) => {
            return Check::bad(
                NAME,
                Outcome::Fail,
                format!("cannot connect to {}: {e}", containerd.display()),
                "start containerd, or name its socket with --containerd-address",
            )
        }
    };
    let req = PluginsRequest { filters: vec!["type==io.containerd.snapshotter.v1,id==hyperbox".into()] };
    match IntrospectionClient::new(channel).plugins(req).await {
        Err(e) => {
            Check::bad(NAME, Outcome::Fail, format!("introspection failed: {e}"), "is this containerd 1.6 or later?")
        }
        Ok(r) => match r.into_inner().plugins.into_iter().next() {
            None => Check::bad(
                NAME,
                Outcome::Fail,
                "containerd has not loaded a hyperbox snapshotter",
                "add the proxy_plugins entry (above) and restart containerd",
            ),
            Some(p) => match p.init_err {
                Some(e) if e.code != 0 => Check::bad(
                    NAME,
                    Outcome::Fail,
                    format!("the hyperbox plugin failed to load: {}", e.message),
                    "fix the proxy_plugins entry and restart containerd",
                ),
                _ => Check::ok(NAME, "containerd has the hyperbox snapshotter"),
            },
        },
    }
}

/// The latest layers hyperboxd could not serve lazily: registries it could
/// not reach are named with their error, other reasons counted.
pub async fn fallbacks(address: &Path) -> Check {
    const NAME: &str = "lazy layers";
    let mut client = match crate::admin::connect(address).await {
        Ok(c) => c,
        Err(e) => return Check::bad(NAME, Outcome::Warn, format!("hyperboxd does not answer: {e:?}"), ""),
    };
    let req = crate::admin::proto::FallbacksRequest::default();
    let kept = match client.fallbacks(req).await {
        Ok(r) => r.into_inner().fallbacks,
        Err(e) => {
            return Check::bad(
                NAME,
                Outcome::Warn,
                format!("hyperboxd does not say which layers fell back: {}", e.message()),
                "hyperboxd is older than this hyperbox",
            )
        }
    };
    if kept.is_empty() {
        return Check::ok(NAME, "every HyperBox layer prepared since hyperboxd started was mounted lazily");
    }
    // Newest first: the first error seen per registry is its latest.
    let mut unreachable: Vec<(&str, &str)> = Vec::new();
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for f in &kept {
        if f.reason == "registry" && !unreachable.iter().any(|(r, _)| *r == f.registry) {
            unreachable.push((&f.registry, &f.detail));
        }
        match reasons.iter_mut().find(|(r, _)| *r == f.reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((&f.reason, 1)),
        }
    }
    let mut detail = format!(
        "{} HyperBox layers were downloaded instead of mounted lazily ({})",
        kept.len(),
        reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")
    );
    for (registry, error) in &unreachable {
        let registry = if registry.is_empty() { "(unnamed)" } else { registry };
        detail.push_str(&format!("\n  cannot reach registry {registry}: {error}"));
    }
    let fix = if unreachable.is_empty() {
        "see `hyperbox pull`'s output or hyperboxd's log for each layer's reason"
    } else {
        "check hyperboxd's network, credentials (registry.docker_config) and registry.insecure / mirrors for the \
         registries named; `hyperbox pull --plain-http` for a plain-http registry"
    };
    Check::bad(NAME, Outcome::Warn, detail, fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        for (release, want) in [
            ("6.18.44-cloud-amd64", Some((6, 18))),
            ("6.18.44-fc-v1252\n", Some((6, 18))),
            ("5.10.0-28-amd64", Some((5, 10))),
            ("6.9", Some((6, 9))),
            ("6.10-rc1", Some((6, 10))),
            ("4.19.0+", Some((4, 19))),
            ("  6.1.0-18-cloud-amd64 ", Some((6, 1))),
            ("garbage", None),
            ("", None),
            ("6", None),
            ("6.", None),
            ("v6.1", None),
            ("6.x.1", None),
            ("99999999999.1", None),
        ] {
            assert_eq!(kernel_version(release), want, "{release:?}");
        }
    }

    #[test]
    fn kernels_before_6_9_warn() {
        let ok = kernel_check(Some("6.18.44-cloud-amd64\n"));
        assert_eq!(ok.outcome, Outcome::Ok, "{ok:?}");
        assert!(ok.detail.contains("FUSE_NOTIFY_RESEND: requests in flight during a daemon crash are sent again"));
        assert!(ok.detail.starts_with("Linux 6.18.44-cloud-amd64:"), "{ok:?}");
        let first = kernel_check(Some("6.9.0"));
        assert_eq!(first.outcome, Outcome::Ok);
        assert!(first.detail.contains("FR_SENT"), "{first:?}");
        assert_eq!(kernel_check(Some("6.10.0")).outcome, Outcome::Ok);
        for old in ["6.8.12", "5.10.0-28-amd64", "4.19.0"] {
            let c = kernel_check(Some(old));
            assert_eq!(c.outcome, Outcome::Warn, "{c:?}");
            assert!(c.detail.contains("hang until the layer's connection is aborted"), "{c:?}");
            assert!(c.fix.contains("6.9"), "{c:?}");
        }
        for unknown in [Some("garbage"), Some(""), None] {
            let c = kernel_check(unknown);
            assert_eq!(c.outcome, Outcome::Warn, "{c:?}");
            assert!(c.detail.contains("cannot tell"), "{c:?}");
        }
    }

    #[test]
    fn request_timeouts_warn_when_set() {
        let ok = |d, m| {
            let c = request_timeout_check(d, m);
            assert_eq!(c.outcome, Outcome::Ok, "{d:?} {m:?}: {c:?}");
        };
        ok(None, None);
        ok(Some("0\n"), Some("0\n"));
        ok(Some("0"), None);
        ok(None, Some("0"));
        for (d, m, after) in [
            (Some("30\n"), Some("0\n"), "30 s"),
            (Some("0"), Some("45"), "45 s"),
            (Some("120"), Some("60"), "60 s"),
            (Some("20"), Some("600"), "20 s"),
            (Some("90"), None, "90 s"),
        ] {
            let c = request_timeout_check(d, m);
            assert_eq!(c.outcome, Outcome::Warn, "{d:?} {m:?}: {c:?}");
            assert!(c.detail.contains(&format!("waited more than {after} for its answer")), "{c:?}");
            assert!(c.detail.contains("restart"), "{c:?}");
            assert!(c.fix.contains("fs.fuse.default_request_timeout=0"), "{c:?}");
        }
        for (d, m) in [(Some("soon"), Some("0")), (Some("0"), Some("-1")), (Some("(unreadable: denied)"), None)] {
            let c = request_timeout_check(d, m);
            assert_eq!(c.outcome, Outcome::Warn, "{c:?}");
            assert!(c.detail.starts_with("cannot tell"), "{c:?}");
        }
    }

    /// On this machine: the checks read it and agree with the decisions
    /// above on what they read.
    #[test]
    fn this_machine() {
        let k = kernel();
        assert_eq!(k.name, "kernel");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok();
        if release.is_some() {
            assert_eq!(k.outcome, kernel_check(release.as_deref()).outcome);
        }
        let t = request_timeouts();
        assert_eq!(t.name, "FUSE timeout");
        let read = |f: &str| std::fs::read_to_string(format!("{FUSE_SYSCTLS}/{f}")).ok();
        assert_eq!(
            t.outcome,
            request_timeout_check(read("default_request_timeout").as_deref(), read("max_request_timeout").as_deref())
                .outcome
        );
    }
}
