//! Write the fuzz seeds made from the library's own layers into
//! `fuzz/corpus/<target>/` (`seed-*` files; the rest of the corpus is GNU
//! tar's, real traces', and what `cargo fuzz` found and minimized):
//! `cargo run --example fuzz_seeds`. See docs/fuzzing.md.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::PathBuf;

/// The files of `fuzz/corpus/<target>/`, by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn main() {
    use hyperbox::testing::{small_chunks, Layer, LayerBuilder};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 ^ (i >> 7) as u8).collect();
    let tars: Vec<(&str, Vec<u8>)> = vec![
        ("seed-ustar", LayerBuilder::busybox_free().finish()),
        (
            "seed-mixed",
            LayerBuilder::new()
                .dir("d")
                .file("d/a", 0o644, &data)
                .file("d/b", 0o4755, b"small")
                .symlink("d/l", "a")
                .hardlink("d/h", "d/a")
                .special("d/fifo", tar::EntryType::Fifo, 0o644)
                .device("d/null", tar::EntryType::Char, 0o666, 1, 3)
                .file("d/.wh.gone", 0o644, b"")
                .file("e/.wh..wh..opq", 0o644, b"")
                .file("e/f", 0o600, &data[..1000])
                .finish(),
        ),
        (
            "seed-gnu-long",
            LayerBuilder::gnu()
                .owner(1000, 1000)
                .dir_mode(&"x".repeat(120), 0o700)
                .file(&format!("{}/{}", "x".repeat(120), "y".repeat(90)), 0o644, b"long")
                .symlink("s", &"t/".repeat(70))
                .finish(),
        ),
        (
            "seed-pax-xattrs",
            LayerBuilder::new()
                .file_with_xattrs("f", 0o644, b"x", &[("user.a", b"1"), ("security.capability", &[1, 0, 0, 2])])
                .file("g", 0o644, &data[..600])
                .finish(),
        ),
    ];
    for (name, tar) in &tars {
        put("convert", name, tar);
    }
    // GNU tar's own (sparse files, PAX, v7), committed: their indexes too.
    let gnutar = corpus("convert").into_iter().filter(|(n, _)| n.starts_with("seed-gnutar"));
    let tars: Vec<(String, Vec<u8>)> = tars.into_iter().map(|(n, t)| (n.to_string(), t)).chain(gnutar).collect();
    for (name, tar) in &tars {
        let layer = Layer::from_tar(tar.clone(), &targets::convert_options());
        let raw = layer.out.index.encode();
        put("index", &format!("{name}-raw"), &[&[targets::INDEX_RAW][..], &raw].concat());
        put("index", &format!("{name}-frame"), &[&[targets::INDEX_FRAME][..], layer.index_frame()].concat());
        put("index", &format!("{name}-blob"), &[&[targets::INDEX_BLOB][..], &layer.blob].concat());
    }
    // The index of a real busybox layer (not its 1 MB blob).
    let bb = LayerBuilder::busybox().convert_with(&small_chunks());
    put("index", "seed-busybox-frame", &[&[targets::INDEX_FRAME][..], bb.index_frame()].concat());

    put("trace", "seed-base", targets::BASE_TRACE.as_bytes());
    // A trace as the recorder writes one: each frame of a layer, read over
    // two runs, with the report of the last start.
    use hyperbox::trace::{ImageKey, StartReport, Trace, TraceEntry};
    let layer = LayerBuilder::busybox_free().file("bin/app", 0o755, &data).convert_with(&targets::convert_options());
    let image = ImageKey {
        digest: hyperbox::digest::Digest::of(b"manifest").to_string(),
        repository: "registry.example:5000/app".into(),
    };
    let mut t = Trace::new(&image);
    for run in 0..2u32 {
        let entries = (0..layer.index.frames().len())
            .map(|i| {
                let f = layer.index.frames().get(i);
                TraceEntry {
                    layer: layer.digest().clone(),
                    frame: i as u32,
                    chunk: f.id,
                    c_len: f.c_len,
                    u_len: f.u_len,
                    path: if i % 2 == 0 { "bin/app".into() } else { String::new() },
                    offset: i as u64 * 256,
                    at_ms: 10 * i as u32 + run,
                    seen: 1,
                }
            })
            .collect();
        t.merge_run(entries, 10_000);
    }
    t.last_start =
        Some(StartReport { at: 1_700_000_000, read: 12, prefetched: 10, hits: 9, precision: 0.9, recall: 0.75 });
    put("trace", "seed-recorded", &t.to_json());
    put(
        "labels",
        "seed-pull",
        format!(
            "default/3/sha256:abc\ntoken\n@0=sha256:1\n@1=token\n@2=docker.io/library/busybox:latest\n@3={}\n@4=true",
            hyperbox::digest::Digest::of(b"x")
        )
        .as_bytes(),
    );
    put(
        "labels",
        "seed-cri",
        b"k8s.io/12/sha256:def\n\ncontainerd.io/snapshot/cri.image-ref=registry.example:5000/app/web:v1@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n@6=sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n@7=sha256:00",
    );
    let loc = hyperbox::format::IndexLocation {
        offset: 12345,
        length: 678,
        digest: hyperbox::digest::Digest::of(b"index"),
        version: 1,
    };
    let mut ann: Vec<String> = loc.to_annotations().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    ann.sort();
    put("labels", "seed-index-location", format!("ns/1/x\nsecret\n{}", ann.join("\n")).as_bytes());
}
