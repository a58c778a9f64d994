//! Round trips through the HyperBox layer format on tars made by GNU tar and
//! the `tar` crate that hold every entry type a layer can carry: the
//! decompressed layer equals the input byte for byte (so the diff_id is
//! unchanged), and every file read through the index equals the original.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use hyperbox::digest::Digest;
use hyperbox::format::{self, writer, EntryKind};

/// Convert `tar_bytes`, check the byte-exact round trip with stock `zstd -d`,
/// and check every regular file read through the index against `root`.
fn check_round_trip(name: &str, tar_bytes: Vec<u8>, root: &Path, opts: &writer::WriteOptions) -> common::Layer {
    // The footer leads to the index the writer reported (Layer checks it).
    let layer = common::Layer::from_tar(tar_bytes, opts);
    let (tar_bytes, blob, out, idx) = (&layer.tar, &layer.blob, &layer.out, &*layer.index);
    assert_eq!(out.diff_id, Digest::of(tar_bytes), "{name}: diff_id changed");
    assert_eq!(out.blob_digest, Digest::of(blob));
    assert_eq!(out.blob_size, blob.len() as u64);

    // Stock zstd turns the layer back into the original tar.
    let dir = tempfile::tempdir().unwrap();
    let zpath = dir.path().join("layer.tar.zst");
    std::fs::write(&zpath, blob).unwrap();
    let out_tar = dir.path().join("layer.tar");
    common::run(Command::new("zstd").arg("-q").arg("-d").arg(&zpath).arg("-o").arg(&out_tar));
    let decompressed = std::fs::read(&out_tar).unwrap();
    assert!(decompressed == *tar_bytes, "{name}: zstd -d output differs from the input tar");

    // The annotations lead to the same index as the footer.
    let loc = &out.location;
    let (_, via_annotations) = format::open_layer(
        &blob[..],
        Some(&format::IndexLocation::from_annotations(&loc.to_annotations()).unwrap().unwrap()),
    )
    .unwrap();
    assert_eq!(via_annotations.index, idx.index);

    // Every regular file reads back exactly, including sparse holes.
    let mut files = 0;
    for e in idx.entries() {
        if e.kind != EntryKind::File {
            continue;
        }
        let path = root.join(std::str::from_utf8(&e.path).unwrap());
        let want = std::fs::read(&path).unwrap_or_else(|err| panic!("{name}: {}: {err}", path.display()));
        let got = format::read_file_range(&blob[..], idx, e, 0, e.size).unwrap();
        assert!(got == want, "{name}: {} reads back differently", path.display());
        // and a range in the middle
        if e.size > 10 {
            let got = format::read_file_range(&blob[..], idx, e, 3, e.size - 6).unwrap();
            assert!(got[..] == want[3..want.len() - 3], "{name}: partial read of {}", path.display());
        }
        files += 1;
    }
    assert!(files >= 8, "{name}: only {files} files checked");
    layer
}

fn by_path(idx: &format::LayerIndex) -> BTreeMap<String, format::Entry> {
    idx.entries().iter().map(|e| (String::from_utf8_lossy(&e.path).into_owned(), e.clone())).collect()
}

fn small_chunks() -> writer::WriteOptions {
    writer::WriteOptions {
        // Every file chunked on its own (the pax test covers packing).
        small_file_max: 0,
        chunk: format::ChunkParams { min: 16 << 10, avg: 32 << 10, max: 64 << 10 },
        ..Default::default()
    }
}

#[test]
fn gnu_tar_with_sparse_files_round_trips() {
    if !common::have_tools("gnu_tar_with_sparse_files_round_trips", &["tar", "zstd", "setcap", "setfattr", "mknod"]) {
        return;
    }
    let opts = small_chunks();
    let fixture = tempfile::tempdir().unwrap();
    common::make_fixture(fixture.path(), opts.chunk.max);
    let tar = common::run(
        Command::new("bash")
            .arg("-c")
            .arg(format!("tar --format=gnu --sparse -C {} -cf - . | base64 -w0", fixture.path().display())),
    );
    let layer = check_round_trip("gnu", base64_decode(&tar), fixture.path(), &opts);
    let idx = &layer.index;
    let entries = by_path(idx);

    let many = &entries["sparse-many"];
    assert!(many.sparse().len() >= 10, "GNU sparse extension blocks not read: {many:?}");
    let sparse = &entries["sparse"];
    assert_eq!(sparse.size, 8 << 20);
    assert!(!sparse.sparse().is_empty() && sparse.data_len() < 1 << 20, "sparse map not kept: {sparse:?}");
    let hello = &entries["dir/hello.txt"];
    assert_eq!((hello.uid, hello.gid, hello.mtime), (1234, 5678, 981173106));
    assert_eq!(entries["large.bin"].mode, 0o4755);
    assert_eq!(entries["chardev"].kind, EntryKind::CharDevice);
    assert_eq!(entries["chardev"].device(), (1, 3));
    assert_eq!((entries["blockdev"].kind, entries["blockdev"].device()), (EntryKind::BlockDevice, (7, 0)));
    assert_eq!(entries["fifo"].kind, EntryKind::Fifo);
    assert_eq!(entries["dir/link-to-hello"].link(), b"hello.txt");
    assert_eq!(entries["dangling"].link(), b"/nonexistent/target");
    // GNU tar stores the second name of a hard link as the link.
    let hl = entries.values().find(|e| e.kind == EntryKind::Hardlink).expect("a hard link");
    assert!(hl.link() == b"dir/hello.txt" || hl.link() == b"hardlink-to-hello");
    assert!(entries.keys().any(|k| k.len() > 250), "GNU long name lost");
    assert!(entries.contains_key("dir/.wh.deleted") && entries.contains_key("opaque/.wh..wh..opq"));
    assert!(entries.contains_key(""), "the root dir entry");
    // Identical content is cut into identical chunks: large-twice.bin repeats large.bin.
    let ids: Vec<_> = idx.frames().iter().map(|f| f.id).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert!(
        ids.len() - unique.len() >= 2 * (3_000_000 / (64 << 10)) - 2,
        "expected repeated chunks, got {} dups",
        ids.len() - unique.len()
    );
}

#[test]
fn pax_tar_with_xattrs_round_trips() {
    if !common::have_tools("pax_tar_with_xattrs_round_trips", &["tar", "zstd", "setcap", "setfattr", "mknod"]) {
        return;
    }
    let opts = writer::WriteOptions::default();
    let fixture = tempfile::tempdir().unwrap();
    common::make_fixture(fixture.path(), opts.chunk.max);
    std::fs::remove_file(fixture.path().join("sparse")).unwrap();
    std::fs::remove_file(fixture.path().join("sparse-many")).unwrap();
    let tar = common::run(Command::new("bash").arg("-c").arg(format!(
        "tar --format=pax --xattrs --xattrs-include='*' -C {} -cf - . | base64 -w0",
        fixture.path().display()
    )));
    let layer = check_round_trip("pax", base64_decode(&tar), fixture.path(), &opts);
    let entries = by_path(&layer.index);
    let cap = &entries["capfile"];
    assert!(cap.xattrs().iter().any(|x| x.name == b"security.capability" && x.value.len() >= 20), "{cap:?}");
    let hello = &entries["dir/hello.txt"];
    assert!(hello.xattrs().iter().any(|x| x.name == b"user.color" && x.value == b"blue"));
    assert_eq!(hello.mtime_nsec, 789_000_000, "PAX sub-second mtime");
    assert_eq!(entries["exactly-chunk-max"].size, opts.chunk.max as u64);
}

#[test]
fn pax_sparse_is_rejected_with_a_clear_error() {
    if !common::have_tools("pax_sparse_is_rejected_with_a_clear_error", &["tar", "truncate"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = common::run(Command::new("bash").arg("-c").arg(format!(
        "cd {} && truncate -s 1M s && echo x >> s && tar --format=pax --sparse -cf - s | base64 -w0",
        dir.path().display()
    )));
    let err = writer::convert_tar(&base64_decode(&tar)[..], std::io::sink(), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("sparse"), "{err}");
}

/// Tars written by the `tar` crate (GNU headers and long names), plus bytes
/// after the end-of-archive marker, which must survive too.
#[test]
fn tar_crate_archive_with_trailing_bytes_round_trips() {
    let data = vec![7u8; 200_000];
    // A GNU long name (over 100 bytes), each component within NAME_MAX.
    let long = format!("a/{}/{}", "x".repeat(200), "y".repeat(200));
    let mut tar = common::LayerBuilder::gnu().file(&long, 0o644, &data).dir("./a").finish();
    tar.extend_from_slice(&[0u8; 4096]); // extra zero blocks, as some tools pad
                                         // and megabytes of whatever after the end: kept, in bounded frames
    tar.extend((0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8));
    let layer = common::Layer::from_tar(tar, &Default::default());
    let (tar, blob, idx) = (&layer.tar, &layer.blob, &*layer.index);
    assert_eq!(layer.out.diff_id, Digest::of(tar));
    let mut back = Vec::new();
    zstd::stream::read::Decoder::new(&blob[..]).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == *tar);
    let opts = writer::WriteOptions::default();
    assert!(idx.frames().iter().all(|f| f.u_len as usize <= 2 * opts.pack_frame_max.max(opts.chunk.max as usize)));
    let e = layer.entry(&long);
    assert_eq!(format::read_file_range(&blob[..], idx, e, 0, e.size).unwrap(), data);
    assert_eq!(idx.entries()[1].path, b"a");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap()
}
