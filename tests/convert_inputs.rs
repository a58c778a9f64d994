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

/// A manifest may list one layer twice (empty layers often repeat), and may
/// hold foreign layers whose blobs live elsewhere: both convert.
#[test]
fn repeated_and_foreign_layers() {
    let layout = tempfile::tempdir().unwrap();
    let a = LayerBuilder::busybox_free().file("a", 0o644, &vec![1u8; 100_000]).finish();
    write_oci_image(layout.path(), "v1", &[a.clone(), a.clone()], &["true"], &[oci_arch()]);
    let src = format!("oci:{}:v1", layout.path().display());
    let out_dir = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:hb", out_dir.path().display());
    let out = run(hyperbox().args(["convert", "-q", &src, &dst]));
    assert!(out.contains("2 layer(s)"), "{out}");
    let out = run(hyperbox().args(["inspect", "--verify", &dst]));
    assert!(out.contains("verified every chunk of 2 layer(s)"), "{out}");

    // Add a foreign layer (its blob is not in the layout) to the manifest and config.
    let foreign = LayerBuilder::busybox_free().file("f", 0o644, b"foreign").finish();
    let fgz = gzip(&foreign);
    let dir = layout.path();
    edit_manifest(dir, |manifest| {
        let cdig = manifest["config"]["digest"].as_str().unwrap().to_string();
        let mut config: serde_json::Value = serde_json::from_slice(&read_blob(dir, &cdig)).unwrap();
        config["rootfs"]["diff_ids"].as_array_mut().unwrap().push(sha256(&foreign).into());
        let config = serde_json::to_vec(&config).unwrap();
        manifest["config"]["digest"] = put_blob(dir, &config).into();
        manifest["config"]["size"] = config.len().into();
        manifest["layers"].as_array_mut().unwrap().push(serde_json::json!({
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": sha256(&fgz), "size": fgz.len(), "urls": ["https://example.invalid/layer"]
        }));
    });
    let out = run(hyperbox().args(["convert", "-q", &src, &dst]));
    assert!(out.contains("3 layer(s)"), "{out}");
    let converted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("index.json")).unwrap()).unwrap();
    let m = converted["manifests"][0]["digest"].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("blobs/sha256").join(&m[7..])).unwrap()).unwrap();
    assert_eq!(m["layers"][2]["mediaType"], "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip");
    assert_eq!(m["layers"][2]["digest"], sha256(&fgz).as_str());
}

/// A layer whose descriptor understates its size: the copy stops at the
/// declared size and the error names the layer.
#[test]
fn blob_longer_than_its_descriptor_is_refused() {
    let layout = tempfile::tempdir().unwrap();
    write_oci_image(layout.path(), "v1", &[LayerBuilder::busybox_free().finish()], &["true"], &[oci_arch()]);
    let mut size = 0;
    edit_manifest(layout.path(), |m| {
        size = m["layers"][0]["size"].as_u64().unwrap();
        m["layers"][0]["size"] = (size - 10).into();
    });
    let out_dir = tempfile::tempdir().unwrap();
    let out = hyperbox()
        .args(["convert", "-q"])
        .arg(format!("oci:{}:v1", layout.path().display()))
        .arg(format!("oci:{}:v1", out_dir.path().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("layer 1/1") && stderr.contains(&format!("longer than its {} bytes", size - 10)),
        "{stderr}"
    );
}
