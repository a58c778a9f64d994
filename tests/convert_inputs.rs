//! The converter takes every layer compression an image can have, and
//! registries that demand credentials (from docker's config.json).

mod common;

use std::process::Command;

use common::*;

/// The same tar, uncompressed, gzip and zstd, converts to the same blob.
#[test]
fn tar_gzip_and_zstd_inputs_give_the_same_layer() {
    let data: Vec<u8> = (0..500_000u32).map(|i| (i.wrapping_mul(40503) >> 7) as u8).collect();
    let tar = LayerBuilder::busybox_free().file("a/big", 0o644, &data).file("a/small", 0o600, b"tiny").finish();
    let dir = tempfile::tempdir().unwrap();
    let inputs = [
        ("layer.tar", tar.clone()),
        ("layer.tar.gz", gzip(&tar)),
        ("layer.tar.zst", zstd::encode_all(&tar[..], 19).unwrap()),
    ];
    let mut digests = Vec::new();
    for (name, bytes) in inputs {
        let input = dir.path().join(name);
        std::fs::write(&input, bytes).unwrap();
        let output = dir.path().join(format!("{name}.hyperbox"));
        let out = run(hyperbox().arg("convert-layer").arg(&input).arg(&output));
        assert!(out.contains(&format!("diff_id {}", sha256(&tar))), "{out}");
        digests.push(sha256(&std::fs::read(&output).unwrap()));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    // A converted layer converts to itself: input in HyperBox format is zstd too.
    let again = dir.path().join("again");
    run(hyperbox().arg("convert-layer").arg(dir.path().join("layer.tar.hyperbox")).arg(&again));
    assert_eq!(sha256(&std::fs::read(&again).unwrap()), digests[0]);
}

#[test]
fn credentials_come_from_docker_config() {
    if !have_tools("credentials_come_from_docker_config", &["docker-registry", "htpasswd"]) {
        return;
    }
    let reg = Registry::start_with_auth("alice", "s3cret");
    let layout = tempfile::tempdir().unwrap();
    write_oci_image(
        layout.path(),
        "v1",
        &[LayerBuilder::busybox_free().file("x", 0o644, b"x").finish()],
        &["true"],
        &[oci_arch()],
    );
    let src = format!("oci:{}:v1", layout.path().display());
    let dst = format!("{}/private/app:hb", reg.addr);

    // No credentials: a clear error that says what is missing.
    let empty = tempfile::tempdir().unwrap();
    let out = hyperbox()
        .env("DOCKER_CONFIG", empty.path())
        .args(["convert", "-q", "--plain-http", &src, &dst])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("credentials") && stderr.contains(&reg.addr), "{stderr}");

    // Credentials as `docker login` writes them.
    use base64::Engine;
    let docker = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(docker.path().join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr))
        .unwrap();
    run(hyperbox().env("DOCKER_CONFIG", docker.path()).args(["convert", "-q", "--plain-http", &src, &dst]));
    let out = run(hyperbox().env("DOCKER_CONFIG", docker.path()).args(["inspect", "--plain-http", &dst]));
    assert!(out.contains("HyperBox v1"), "{out}");

    // Registries listed as insecure in the config file need no --plain-http.
    let cfg = docker.path().join("hyperbox.toml");
    std::fs::write(&cfg, format!("version = 1\n[registry]\ninsecure = [\"{}\"]\n", reg.addr)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hyperbox"))
        .env("DOCKER_CONFIG", docker.path())
        .arg("--config")
        .arg(&cfg)
        .args(["inspect", &dst])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
