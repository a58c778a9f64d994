//! The files operators install: systemd units that systemd accepts, and
//! containerd config snippets and a default config that parse.

mod common;

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
    for required in ["Type=notify", "KillMode=process", "Before=containerd.service"] {
        assert!(service.contains(required), "hyperboxd.service lacks {required}");
    }
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
    for entry in std::fs::read_dir(format!("{ROOT}/packaging/containerd")).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        assert_eq!(v["proxy_plugins"]["hyperbox"]["type"].as_str(), Some("snapshot"), "{}", entry.path().display());
        assert_eq!(v["proxy_plugins"]["hyperbox"]["address"].as_str(), Some("/run/hyperbox/hyperbox.sock"));
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
        assert!(defined.contains(&format!("\"{m}\"")), "the dashboard queries {m}, which hyperboxd does not export");
    }
    for m in ["hyperbox_prefetch_judged_hit_chunks_total", "hyperbox_fetch_requests_total", "hyperbox_layers_mounted"] {
        assert!(queried.contains(m), "the dashboard lacks {m}");
    }
}
