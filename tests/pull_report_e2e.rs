//! A pull that says what it did: every layer `hyperbox pull` downloads
//! instead of mounting lazily comes with its reason, hyperboxd counts those
//! fallbacks by reason in `/metrics`, `hyperbox doctor` names the
//! registries it could not reach, and `--plain-http` makes lazy layers work
//! from a plain-http registry that is not on loopback. Real containerd,
//! docker-registry, runc and FUSE.

mod common;

use std::path::Path;

use common::*;

const TOOLS: &[&str] = &["containerd", "ctr", "runc", "docker-registry", "busybox", "curl"];
const SMALL: &[u8] = b"hello from a lazy layer\n";

/// busybox, plus a layer with a file the tests print and one nobody reads
/// until after a restart.
fn make_image(layout: &Path) {
    let data = LayerBuilder::new()
        .dir("data")
        .file("data/small", 0o644, SMALL)
        .file("data/later", 0o644, &[7u8; 300 << 10])
        .finish();
    write_oci_image(layout, "v1", &[LayerBuilder::busybox().finish(), data], &["/bin/sh"], &[oci_arch()]);
}

/// No fetching ahead: a file read after a restart must still be remote
/// (reading its neighbour would bring it along).
fn hyperboxd_config(metrics: &str, docker_config: &Path) -> String {
    format!(
        "version = 1\n[daemon]\nmetrics_address = \"{metrics}\"\n[registry]\ndocker_config = \"{}\"\n\
         [fetch.ahead]\nenabled = false\n",
        docker_config.display()
    )
}

/// An unconverted image, and a converted one in a private registry whose
/// credentials only the pulling user has: each layer's reason is printed,
/// counted and shown by `hyperbox doctor`, and both images run.
#[test]
fn a_pull_names_the_reason_of_every_layer_that_is_not_lazy() {
    if !have_tools("a_pull_names_the_reason_of_every_layer_that_is_not_lazy", &[TOOLS, &["htpasswd"]].concat()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    make_image(&layout);
    let reg = Registry::start();
    let plain = format!("{}/plain:v1", reg.addr);
    push_layout(&layout, &plain);
    let private = Registry::start_with_auth("alice", "s3cret");
    let user_creds = docker_config(&tmp.path().join("alice-docker"), &[(&private.addr, "alice", "s3cret")]);
    let converted = format!("{}/team/app:hb", private.addr);
    run(hyperbox()
        .env("DOCKER_CONFIG", &user_creds)
        .args(["convert", "-q", "--plain-http"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&converted));

    // hyperboxd has no credentials for the private registry.
    let metrics = format!("127.0.0.1:{}", free_port());
    let no_creds = docker_config(&tmp.path().join("daemon-docker"), &[]);
    let hb = Hyperboxd::start(tmp.path(), &hyperboxd_config(&metrics, &no_creds.join("config.json")));
    let ctd = Containerd::start(&hb.proxy_plugin());
    // Each image in its own namespace: they share the busybox layer's
    // diff_id, and containerd answers a layer a namespace holds itself.
    let pull = |ns: &str, reference: &str| {
        let out = hyperbox()
            .env("DOCKER_CONFIG", &user_creds)
            .arg("pull")
            .arg("--address")
            .arg(&ctd.socket)
            .arg("--hyperboxd")
            .arg(&hb.socket)
            .args(["--namespace", ns, reference])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    // Not converted: both layers, each named with its reason.
    let (out, log) = pull("plain", &plain);
    assert!(out.contains("0 lazy, 2 downloaded"), "{out}");
    assert_eq!(out.matches("(not_hyperbox): not a HyperBox layer").count(), 2, "{out}");
    assert_eq!(log.matches("; not lazy: not a HyperBox layer").count(), 2, "{log}");

    // Converted, but hyperboxd cannot read the private registry: the pull
    // (which can) downloads both layers and says why they were not lazy,
    // with the registry's own answer.
    let (out, _) = pull("private", &converted);
    assert!(out.contains("0 lazy, 2 downloaded"), "{out}");
    let why: Vec<&str> = out.lines().filter(|l| l.contains("(registry): hyperboxd could not get")).collect();
    assert_eq!(why.len(), 2, "{out}");
    assert!(why.iter().all(|l| l.contains(&private.addr) && l.contains("credentials")), "{out}");
    assert!(hb.fuse_mounts().is_empty());
    for (ns, image) in [("plain", &plain), ("private", &converted)] {
        let args = ["run", "--rm", "--snapshotter", "hyperbox", image.as_str(), "r", "cat", "/data/small"];
        assert_eq!(run(ctd.ctr_in(ns).args(args)).as_bytes(), SMALL);
    }

    // Counted by reason: the plain image's two layers, the private image's
    // two; containerd's own unpacks (no chain id label) are not layers
    // hyperboxd was asked to make lazy.
    let text = scrape(&metrics);
    assert_eq!(metric(&text, "hyperbox_lazy_fallbacks_total{reason=\"not_hyperbox\"}"), Some(2.0), "{text}");
    assert_eq!(metric(&text, "hyperbox_lazy_fallbacks_total{reason=\"registry\"}"), Some(2.0), "{text}");
    assert_eq!(metric(&text, "hyperbox_lazy_fallbacks_total{reason=\"integrity\"}"), Some(0.0), "{text}");

    // The doctor names the registry hyperboxd could not reach, and why.
    let out = hyperbox()
        .args(["doctor", "--address"])
        .arg(&hb.socket)
        .arg("--containerd-address")
        .arg(&ctd.socket)
        .arg("--containerd-config")
        .arg(tmp.path().join("no-such-config.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains("cannot reach registry")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(&private.addr) && line.contains("credentials"), "{stdout}");
    assert!(stdout.contains("2 HyperBox layers were downloaded instead of mounted lazily (registry: 2)"), "{stdout}");
}

/// A plain-http registry that is not on loopback (so hyperboxd would use
/// https): `hyperbox pull --plain-http` makes its layers lazy, and a layer
/// pulled so still fetches over http after hyperboxd restarts.
#[test]
fn plain_http_reaches_lazy_layers_too_and_survives_a_restart() {
    if !have_tools("plain_http_reaches_lazy_layers_too_and_survives_a_restart", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    make_image(&layout);
    let reg = Registry::start();
    // 0.0.0.0 reaches the loopback registry (Linux connects to the local
    // host), but is not a loopback name: without being told, hyperboxd and
    // the pull use https for it, as for any registry on the network.
    let far = reg.addr.replace("127.0.0.1", "0.0.0.0");
    let image = format!("{far}/far/app:hb");
    convert_to(&layout, &image);

    let metrics = format!("127.0.0.1:{}", free_port());
    let no_creds = docker_config(&tmp.path().join("docker"), &[]);
    let mut hb = Hyperboxd::start(tmp.path(), &hyperboxd_config(&metrics, &no_creds.join("config.json")));
    let ctd = Containerd::start(&hb.proxy_plugin());

    let out = hyperbox_pull_with(&hb, &ctd, "far", &image, &["--plain-http"]);
    assert!(out.contains("2 lazy, 0 downloaded"), "{out}");
    assert!(!out.contains("not lazy"), "{out}");
    let ctr_run = |name: &str, file: &str| {
        run(ctd.ctr_in("far").args(["run", "--rm", "--snapshotter", "hyperbox", &image, name, "cat", file]))
    };
    assert_eq!(ctr_run("f1", "/data/small").as_bytes(), SMALL);

    // After a restart, a file never read before is fetched over http again:
    // the layer's record kept that its registry is plain http.
    hb.stop();
    hb.restart();
    wait_reconnected(&ctd);
    assert_eq!(hb.fuse_mounts().len(), 2);
    let later = ctr_run("f2", "/data/later");
    assert_eq!(later.len(), 300 << 10);
    assert!(later.bytes().all(|b| b == 7));
    assert_fetched_since_start(&metrics);
}
