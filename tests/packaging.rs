//! The files operators install: systemd units that systemd accepts,
//! containerd and k3s config that `hyperbox doctor` accepts, example configs
//! that hyperboxd loads, the Kubernetes manifest and the Dockerfile.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `systemd-analyze verify` accepts both units, with ExecStart pointing at
/// the hyperboxd built for this run (verify checks the binary exists).
#[test]
fn systemd_units_verify() {
    if !have_tools("systemd_units_verify", &["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in ["hyperboxd.service", "hyperboxd.socket"] {
        let text = std::fs::read_to_string(format!("{ROOT}/{unit}")).unwrap();
        let text =
            text.replace("ExecStart=/usr/bin/hyperboxd", &format!("ExecStart={}", env!("CARGO_BIN_EXE_hyperboxd")));
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let service = std::fs::read_to_string(dir.path().join("hyperboxd.service")).unwrap();
    assert!(service.contains(env!("CARGO_BIN_EXE_hyperboxd")), "ExecStart not rewritten:\n{service}");
    for required in ["Type=notify", "KillMode=process", "Before=containerd.service", "FileDescriptorStoreMax=4096"] {
        assert!(service.contains(required), "hyperboxd.service lacks {required}");
    }
    let socket = std::fs::read_to_string(dir.path().join("hyperboxd.socket")).unwrap();
    assert!(socket.contains("FileDescriptorName=grpc"), "hyperboxd.socket must name its fd grpc (daemon::listen)");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("hyperboxd.service"))
        .arg(dir.path().join("hyperboxd.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    assert!(!stderr.contains("hyperboxd."), "systemd-analyze complains about our units:\n{stderr}");
}

#[test]
fn containerd_snippets_and_default_config_parse() {
    let snippets = toml_files(Path::new(&format!("{ROOT}/packaging/containerd")));
    assert!(snippets.len() >= 2, "the containerd config snippets (versions 2 and 3) are missing: {snippets:?}");
    for path in &snippets {
        let text = std::fs::read_to_string(path).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(v["proxy_plugins"]["hyperbox"]["type"].as_str(), Some("snapshot"), "{}", path.display());
        assert_eq!(
            v["proxy_plugins"]["hyperbox"]["address"].as_str(),
            Some("/run/hyperbox/hyperbox.sock"),
            "{}",
            path.display()
        );
    }
    // What --print-default-config prints loads back as the defaults.
    let out = Command::new(env!("CARGO_BIN_EXE_hyperboxd")).arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let cfg = hyperbox::config::Config::load(Some(&path)).unwrap();
    assert_eq!(cfg.daemon.metrics_address, "127.0.0.1:9464");
    assert!(cfg.trace.enabled && cfg.prefetch.enabled);
}

/// The Grafana dashboard is JSON, and every metric it queries is one
/// hyperboxd exports (a name in src/metrics.rs), so a rename breaks this test,
/// not the dashboard.
#[test]
fn grafana_dashboard_queries_exported_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/packaging/grafana/hyperbox.json")).unwrap())
            .unwrap();
    let defined = std::fs::read_to_string(format!("{ROOT}/src/metrics.rs")).unwrap();
    let name = regex::Regex::new(r"hyperbox_[a-z_]+").unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            for m in name.find_iter(t["expr"].as_str().unwrap()) {
                queried.insert(m.as_str().to_string());
            }
        }
    }
    for m in &queried {
        // A histogram's series are its name with _bucket, _sum or _count.
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| m.strip_suffix(s)).unwrap_or(m);
        assert!(
            defined.contains(&format!("\"{m}\"")) || defined.contains(&format!("\"{family}\"")),
            "the dashboard queries {m}, which hyperboxd does not export"
        );
    }
    for m in [
        "hyperbox_prefetch_judged_hit_chunks_total",
        "hyperbox_fetch_requests_total",
        "hyperbox_layers_mounted",
        "hyperbox_fetch_request_seconds_bucket",
        "hyperbox_container_fetch_wait_seconds_total",
    ] {
        assert!(queried.contains(m), "the dashboard lacks {m}");
    }
}

/// Every `.toml` file below `dir`, at any depth, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(toml_files(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every TOML file under packaging/ parses: containerd refuses a snippet
/// that does not, and hyperboxd a config.
#[test]
fn every_packaging_toml_parses() {
    let files = toml_files(Path::new(&format!("{ROOT}/packaging")));
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        if let Err(e) = toml::from_str::<toml::Value>(&text) {
            panic!("{}: {e}", path.display());
        }
    }
    let names: Vec<String> = files.iter().map(|p| p.strip_prefix(ROOT).unwrap().display().to_string()).collect();
    for want in ["packaging/containerd/hyperbox-v3.toml", "packaging/config/production.toml"] {
        assert!(names.iter().any(|n| n == want), "{want} not found among {names:?}");
    }
}

/// Dotted paths of the fields `--print-default-config` writes (an empty
/// table, like `registry.mirrors`, counts as one field).
fn field_paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_table() {
        Some(t) if !t.is_empty() => {
            for (k, v) in t {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                field_paths(v, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// The example configs load as hyperboxd loads its config (unknown fields,
/// a wrong version and out-of-range values are refused), list every field,
/// so an operator sees each setting, and keep the paths the containerd
/// snippets and systemd units name.
#[test]
fn config_examples_load_and_list_every_field() {
    let defaults = toml::Value::try_from(hyperbox::config::Config::default()).unwrap();
    let mut fields = Vec::new();
    field_paths(&defaults, "", &mut fields);
    let files = toml_files(Path::new(&format!("{ROOT}/packaging/config")));
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["development.toml", "production.toml", "edge-small-disk.toml", "slow-link.toml"] {
        assert!(names.iter().any(|n| n == want), "packaging/config/{want} is missing");
    }
    for path in &files {
        let name = path.display();
        let cfg = hyperbox::config::Config::load(Some(path)).unwrap_or_else(|e| panic!("hyperboxd refuses it: {e}"));
        let value: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for field in &fields {
            let found = field.split('.').try_fold(&value, |v, k| v.get(k));
            assert!(found.is_some(), "{name} does not list {field}");
        }
        assert_eq!(cfg.daemon.address, Path::new("/run/hyperbox/hyperbox.sock"), "{name}");
        assert_eq!(cfg.daemon.root, Path::new("/var/lib/hyperbox"), "{name}");
    }
}

/// The containerd snippets (config versions 2 and 3) and the k3s templates
/// pass `hyperbox doctor`'s config checks against hyperboxd's default
/// socket, read by the containerd each is for: the config version, the
/// proxy plugin, the CRI snapshotter, the annotations without which no CRI
/// pull is lazy, and on containerd 2 the transfer service's unpack entry and
/// labels. Warnings fail too. A config for the other major version fails.
#[test]
fn containerd_configs_pass_doctor() {
    use hyperbox::doctor::{containerd_config, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &str| std::fs::read_to_string(format!("{ROOT}/{p}")).unwrap();
    // k3s renders its own config where the template names "base" (version 2
    // keys in config.toml.tmpl, version 3 in config-v3.toml.tmpl); the rest
    // must be TOML as written.
    const BASE: &str = "{{ template \"base\" . }}";
    let k3s = |file: &str, version: u32| {
        let text = read(file);
        assert_eq!(text.lines().next(), Some(BASE), "{file} does not start from k3s's base template");
        let text = text.replacen(BASE, &format!("version = {version}"), 1);
        assert!(!text.contains("{{"), "{file} has other template actions:\n{text}");
        text
    };
    let v3 = read("packaging/containerd/hyperbox-v3.toml");
    let version = toml::from_str::<toml::Value>(&v3).unwrap().get("version").and_then(|v| v.as_integer());
    assert_eq!(version, Some(3), "hyperbox-v3.toml must say version = 3, or containerd 2 reads it as version 1");
    let address = hyperbox::config::DaemonConfig::default().address;
    let v2 = read("packaging/containerd/hyperbox-v2.toml");
    let k3s_v2 = k3s("packaging/k3s/config.toml.tmpl", 2);
    let k3s_v3 = k3s("packaging/k3s/config-v3.toml.tmpl", 3);
    let check = |name: &str, text: &str, containerd: Option<&str>| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        containerd_config(&path, &address, containerd)
    };
    // (file, text, the containerd that reads it, how many checks)
    for (name, text, containerd, n) in [
        ("hyperbox-v2.toml", &v2, None, 3),
        ("hyperbox-v2.toml", &v2, Some("1.6.20~ds1"), 4),
        ("hyperbox-v2.toml", &v2, Some("1.7.24~ds1"), 4),
        ("hyperbox-v3.toml", &v3, Some("v2.1.9"), 6),
        ("hyperbox-v3.toml", &v3, None, 5),
        ("k3s", &k3s_v2, Some("v1.7.27-k3s1"), 4),
        ("k3s-v3", &k3s_v3, Some("v2.1.5-k3s1"), 6),
    ] {
        let checks = check(name, text, containerd);
        assert_eq!(checks.len(), n, "{name} on {containerd:?}: {checks:?}");
        for c in checks {
            assert_eq!(
                c.outcome,
                Outcome::Ok,
                "{name} on {containerd:?}: {} {}\nfix: {}\n{text}",
                c.name,
                c.detail,
                c.fix
            );
        }
    }
    // The version 2 snippet on containerd 2: migrated in memory without the
    // CRI settings (no runtimes table), so CRI pulls are silently not lazy.
    let checks = check("v2-on-2", &v2, Some("v2.1.9"));
    let c = checks.iter().find(|c| c.name == "config version").expect("a config version check");
    assert_eq!(c.outcome, Outcome::Fail, "{checks:?}");
    assert!(c.detail.contains("silently not lazy") && c.fix.contains("version = 3"), "{c:?}");
    let c = checks.iter().find(|c| c.name == "transfer unpack").expect("a transfer unpack check");
    assert_ne!(c.outcome, Outcome::Ok, "{checks:?}");
    assert!(c.fix.contains("snapshotter = \"hyperbox\"") && c.fix.contains("snapshotter = \"overlayfs\""), "{c:?}");
    // The version 3 snippet on containerd 1.x, which cannot read it.
    let checks = check("v3-on-1", &v3, Some("1.7.24~ds1"));
    assert!(checks.iter().any(|c| c.name == "config version" && c.outcome == Outcome::Fail), "{checks:?}");
}

/// The Kubernetes manifest: a DaemonSet whose hyperboxd can make FUSE
/// mounts the host's containerd sees, at the paths its ConfigMap's config
/// names, whose probes reach the metrics address of that config, and whose
/// command line hyperboxd and the image accept.
#[test]
fn daemonset_manifest() {
    use serde::Deserialize;
    use serde_yaml::Value;
    let text = std::fs::read_to_string(format!("{ROOT}/packaging/kubernetes/hyperbox-daemonset.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    let find = |kind: &str| {
        docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind} in the manifest"))
    };
    let (ns, cm, ds) = (find("Namespace"), find("ConfigMap"), find("DaemonSet"));
    let namespace = ns["metadata"]["name"].as_str().unwrap();
    assert_eq!(cm["metadata"]["namespace"].as_str(), Some(namespace));
    assert_eq!(ds["metadata"]["namespace"].as_str(), Some(namespace));

    // The ConfigMap's config loads as hyperboxd loads it.
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, cm["data"]["config.toml"].as_str().expect("ConfigMap data config.toml")).unwrap();
    let cfg =
        hyperbox::config::Config::load(Some(&config_path)).unwrap_or_else(|e| panic!("hyperboxd refuses it: {e}"));

    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true), "FUSE mounts need a privileged container");
    assert_ne!(spec["hostPID"].as_bool(), Some(true), "hyperboxd needs no host PIDs");
    let volume = |name: &str| {
        spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"].as_str() == Some(name)).unwrap().clone()
    };
    // The container's mount of a host path, with that host volume.
    let host_mount = |host: &str| {
        let mounts = c["volumeMounts"].as_sequence().unwrap();
        mounts
            .iter()
            .map(|m| (m.clone(), volume(m["name"].as_str().unwrap())))
            .find(|(_, v)| v["hostPath"]["path"].as_str() == Some(host))
            .unwrap_or_else(|| panic!("no hostPath volume of {host} is mounted"))
    };
    let (fuse, fuse_vol) = host_mount("/dev/fuse");
    assert_eq!(fuse["mountPath"].as_str(), Some("/dev/fuse"));
    assert_eq!(fuse_vol["hostPath"]["type"].as_str(), Some("CharDevice"));
    // containerd on the host uses the paths hyperboxd hands it: the same
    // path inside and out, and FUSE mounts propagated back to the host.
    let root = cfg.daemon.root.to_str().unwrap();
    let (state, _) = host_mount(root);
    assert_eq!(state["mountPath"].as_str(), Some(root));
    assert_eq!(state["mountPropagation"].as_str(), Some("Bidirectional"), "FUSE mounts would not reach the host");
    let socket_dir = cfg.daemon.address.parent().unwrap().to_str().unwrap();
    let (run, _) = host_mount(socket_dir);
    assert_eq!(run["mountPath"].as_str(), Some(socket_dir), "containerd would not find the socket");

    // Probes ask /healthz where the config serves metrics; a loopback
    // address is the node's only with the host network.
    let metrics: std::net::SocketAddr = cfg.daemon.metrics_address.parse().expect("metrics on in the ConfigMap");
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some("/healthz"), "{probe}");
        assert_eq!(get["port"].as_u64(), Some(metrics.port() as u64), "{probe} port");
        assert_eq!(get["host"].as_str(), Some(metrics.ip().to_string().as_str()), "{probe} host");
    }
    if metrics.ip().is_loopback() {
        assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "probes of a loopback address need hostNetwork");
    }

    // --config names the file the ConfigMap is mounted as.
    let strings = |v: &Value| -> Vec<String> {
        v.as_sequence().map(|s| s.iter().map(|a| a.as_str().unwrap().to_string()).collect()).unwrap_or_default()
    };
    let (command, args) = (strings(&c["command"]), strings(&c["args"]));
    let at = args.iter().position(|a| a == "--config").expect("--config in args");
    let config = Path::new(&args[at + 1]);
    let (cm_mount, _) = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (m.clone(), volume(m["name"].as_str().unwrap())))
        .find(|(_, v)| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("the ConfigMap is not mounted");
    assert_eq!(
        config.parent().unwrap().to_str(),
        cm_mount["mountPath"].as_str(),
        "--config is not in the ConfigMap's mount"
    );
    let key = config.file_name().unwrap().to_str().unwrap();
    assert!(cm["data"][key].is_string(), "the ConfigMap has no {key}");
    // hyperboxd accepts these flags, and the image has the command.
    let out = Command::new(env!("CARGO_BIN_EXE_hyperboxd")).args(&args).arg("--print-default-config").output().unwrap();
    assert!(out.status.success(), "hyperboxd refuses {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    assert_eq!(command.len(), 1, "command: {command:?}");
    assert!(
        dockerfile.lines().any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!(" {}", command[0]))),
        "the Dockerfile does not put {} in the image",
        command[0]
    );
}

/// The Dockerfile builds in one stage and ships a slim one: the runtime
/// stage copies both binaries from the build, runs hyperboxd, and the build
/// stage installs what scripts/deps.sh installs for the build.
#[test]
fn dockerfile_ships_both_binaries() {
    let text = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    // Instructions only: a package named in a comment installs nothing.
    let text: String = text.lines().filter(|l| !l.trim_start().starts_with('#')).map(|l| format!("{l}\n")).collect();
    let froms: Vec<usize> = text
        .match_indices("FROM ")
        .filter(|(i, _)| *i == 0 || text.as_bytes()[i - 1] == b'\n')
        .map(|(i, _)| i)
        .collect();
    assert!(froms.len() >= 2, "expected a build stage and a runtime stage, found {} FROM", froms.len());
    let (build, runtime) = text.split_at(*froms.last().unwrap());
    assert!(build.contains("cargo build --release --locked --bins"), "the build stage does not build the binaries");
    let deps = std::fs::read_to_string(format!("{ROOT}/scripts/deps.sh")).unwrap();
    for pkg in ["protobuf-compiler", "clang", "libclang-dev"] {
        assert!(
            deps.contains(pkg) && build.contains(pkg),
            "{pkg}: needed by the build (scripts/deps.sh), not installed"
        );
    }
    for bin in ["hyperboxd", "hyperbox"] {
        assert!(
            runtime.lines().any(|l| l.starts_with("COPY --from=") && l.ends_with(&format!("/usr/local/bin/{bin}"))),
            "the runtime stage does not copy {bin}"
        );
    }
    assert!(
        runtime.contains("fuse3") && runtime.contains("ca-certificates"),
        "the runtime stage lacks fuse3 or CA certificates"
    );
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/hyperboxd\"]"), "the image does not run hyperboxd");
    let ignore = std::fs::read_to_string(format!("{ROOT}/.dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore must leave out target/");
}
