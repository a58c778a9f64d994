//! Bad input gets a clear error that names the layer and the problem, and no
//! panic: truncated tars, corrupt gzip, broken footers, oversized or
//! out-of-bounds indexes, chunks that do not match their hash, unknown versions.

mod common;

use std::collections::HashMap;

use common::*;
use hyperbox::digest::{ChunkId, Digest};
use hyperbox::format::{self, writer, FormatError, IndexLocation, FOOTER_LEN};

fn sample() -> LayerBuilder {
    let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8 ^ (i >> 9) as u8).collect();
    LayerBuilder::new().dir("d").file("d/a", 0o644, &data).file("d/b", 0o600, b"small")
}

fn sample_tar() -> Vec<u8> {
    sample().finish()
}

/// The sample as a HyperBox layer: its blob, and where its index is.
fn converted() -> (Vec<u8>, IndexLocation) {
    let layer = sample().convert();
    (layer.blob, layer.out.location)
}

/// Re-seal a blob after editing its index: new index frame, new footer.
fn reseal(blob: &[u8], loc: &IndexLocation, edit: impl FnOnce(&mut format::Index)) -> (Vec<u8>, IndexLocation) {
    let (_, idx) = format::open_layer(blob, Some(loc)).unwrap();
    let mut index = idx.index.clone();
    edit(&mut index);
    let mut out = blob[..loc.offset as usize].to_vec();
    let frame = format::encode_index_frame(&index, 3);
    let new_loc =
        IndexLocation { offset: loc.offset, length: frame.len() as u64, digest: Digest::of(&frame), version: 1 };
    out.extend_from_slice(&frame);
    out.extend_from_slice(&format::encode_footer(&new_loc));
    (out, new_loc)
}

#[test]
fn truncated_tar_is_an_error() {
    let tar = sample_tar();
    for cut in [100, 700, 200_000, tar.len() - 1100] {
        let err = writer::convert_tar(&tar[..cut], std::io::sink(), &Default::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FormatError::Tar(_)), "cut at {cut}: {msg}");
        assert!(msg.contains("tar"), "{msg}");
    }
}

#[test]
fn path_escaping_the_root_is_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    // set_path refuses "..", so write the name field directly, as an attacker would.
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let err = writer::convert_tar(&b.into_inner().unwrap()[..], std::io::sink(), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("outside the layer root"), "{err}");
}

/// An extension header before a pre-POSIX (V7) header: the tar crate leaves
/// it unapplied while Go's reader (containerd) applies it, so the index could
/// name other files than containerd unpacks. Refused.
#[test]
fn unapplied_extension_header_is_rejected() {
    let mut b = tar::Builder::new(Vec::new());
    let record = b"30 path=elsewhere/redirected\n";
    let mut h = tar::Header::new_old();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("PaxHeader").unwrap();
    h.set_size(record.len() as u64);
    h.set_cksum();
    b.append(&h, &record[..]).unwrap();
    let mut h = tar::Header::new_old();
    h.set_path("plain").unwrap();
    h.set_size(1);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let err = writer::convert_tar(&b.into_inner().unwrap()[..], std::io::sink(), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("extension header"), "{err}");
}

/// A few hundred compressed bytes that would decode to hundreds of megabytes
/// of empty xattrs: refused while decoding, before the memory is taken.
#[test]
fn index_that_expands_beyond_its_budget() {
    let (blob, loc) = converted();
    let (_, idx) = format::open_layer(&blob[..], Some(&loc)).unwrap();
    let mut index = idx.index.clone();
    index.entries[0].extra_mut().xattrs = vec![format::Xattr { name: vec![], value: vec![] }; 3_000_000];
    let frame = format::encode_index_frame(&index, 19);
    assert!(frame.len() < 4096, "the bomb should be small: {}", frame.len());
    let bomb = IndexLocation { offset: loc.offset, length: frame.len() as u64, digest: Digest::of(&frame), version: 1 };
    let err = format::parse_index_frame(&frame, &bomb).unwrap_err();
    assert!(err.to_string().contains("more memory than its size allows"), "{err}");
}

#[test]
fn footer_with_wrong_magic() {
    let (mut blob, _) = converted();
    let n = blob.len();
    blob[n - FOOTER_LEN + 8] ^= 0xff; // first byte of the footer magic
    let err = format::open_layer(&blob[..], None).unwrap_err();
    assert!(matches!(err, FormatError::NotHyperBox(_)), "{err}");
    assert!(err.to_string().contains("footer magic"), "{err}");
    // An ordinary zstd layer is "not a HyperBox layer", clearly.
    let plain = zstd::encode_all(&sample_tar()[..], 3).unwrap();
    let err = format::open_layer(&plain[..], None).unwrap_err();
    assert!(err.to_string().starts_with("not a HyperBox layer"), "{err}");
}

#[test]
fn unknown_format_version() {
    let (mut blob, loc) = converted();
    let n = blob.len();
    blob[n - FOOTER_LEN + 16] = 2; // version field of the footer
    let err = format::open_layer(&blob[..], None).unwrap_err();
    assert!(err.to_string().contains("unsupported HyperBox format version 2"), "{err}");
    let mut ann = loc.to_annotations();
    ann.insert(format::ANN_VERSION.into(), "7".into());
    let err = IndexLocation::from_annotations(&ann).unwrap_err();
    assert!(err.to_string().contains("version 7"), "{err}");
}

#[test]
fn index_larger_than_its_limit() {
    let (blob, loc) = converted();
    let huge = IndexLocation { length: 1 << 40, ..loc.clone() };
    let err = format::open_layer(&blob[..], Some(&huge)).unwrap_err();
    assert!(matches!(err, FormatError::IndexTooLarge { .. }), "{err}");
    // An index frame that claims to decompress to more than the limit.
    let mut frame = blob[loc.offset as usize..(loc.offset + loc.length) as usize].to_vec();
    frame[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let forged = IndexLocation { digest: Digest::of(&frame), ..loc.clone() };
    let err = format::parse_index_frame(&frame, &forged).unwrap_err();
    assert!(matches!(err, FormatError::IndexTooLarge { .. }), "{err}");
}

#[test]
fn offsets_outside_the_blob() {
    let (blob, loc) = converted();
    for bad in [
        IndexLocation { offset: loc.offset + 10, ..loc.clone() },
        IndexLocation { offset: u64::MAX - 2, ..loc.clone() },
        IndexLocation { offset: 0, ..loc.clone() },
    ] {
        let err = format::open_layer(&blob[..], Some(&bad)).unwrap_err();
        assert!(err.to_string().contains("does not end the"), "{err}");
    }
    // An index whose entries point past the tar, or whose frames do not tile the blob.
    let (forged, floc) = reseal(&blob, &loc, |i| i.entries[1].data_offset = i.tar_size);
    let err = format::open_layer(&forged[..], Some(&floc)).unwrap_err();
    assert!(err.to_string().contains("data outside the tar"), "{err}");
    let (forged, floc) = reseal(&blob, &loc, |i| {
        let mut f = i.frames.get(0);
        f.c_len += 1;
        i.frames.set(0, f)
    });
    let err = format::open_layer(&forged[..], Some(&floc)).unwrap_err();
    assert!(err.to_string().contains("frames end at blob offset"), "{err}");
    // Annotations that are not numbers.
    let mut ann: HashMap<String, String> = loc.to_annotations();
    ann.insert(format::ANN_INDEX_OFFSET.into(), "-1".into());
    assert!(IndexLocation::from_annotations(&ann).unwrap_err().to_string().contains("index-offset"));
}

#[test]
fn index_that_does_not_match_its_digest() {
    let (mut blob, loc) = converted();
    blob[loc.offset as usize + 30] ^= 1;
    let err = format::open_layer(&blob[..], Some(&loc)).unwrap_err();
    assert!(err.to_string().contains("index digest is"), "{err}");
}

#[test]
fn chunk_whose_blake3_differs_from_the_index() {
    let (blob, loc) = converted();
    let (forged, floc) = reseal(&blob, &loc, |i| {
        let mut f = i.frames.get(2);
        f.id = ChunkId::of(b"something else");
        i.frames.set(2, f)
    });
    let (_, idx) = format::open_layer(&forged[..], Some(&floc)).unwrap();
    let err = format::read_frame(&forged[..], &idx, 2).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::ChunkVerify { frame: 2, .. }), "{msg}");
    assert!(msg.contains("chunk 2") && msg.contains("hashes to"), "{msg}");
    // Flipped bytes inside a compressed frame never come back as data.
    let (_, idx) = format::open_layer(&blob[..], Some(&loc)).unwrap();
    for i in 0..idx.frames().len() {
        let (s, e) = idx.frame_blob_range(i);
        for pos in [s, (s + e) / 2, e - 1] {
            let mut bad = blob.clone();
            bad[pos as usize] ^= 0x40;
            assert!(format::read_frame(&bad[..], &idx, i).is_err(), "frame {i} byte {pos} flip went unnoticed");
        }
    }
}

/// The CLI names the layer: a corrupt gzip layer in an image, and a layer
/// file with a corrupted chunk under `inspect --verify`.
#[test]
fn cli_errors_name_the_layer() {
    let layout = tempfile::tempdir().unwrap();
    let layers = vec![LayerBuilder::new().file("ok", 0o644, b"fine").finish(), sample_tar()];
    write_oci_image(layout.path(), "t", &layers, &["true"], &[oci_arch()]);
    // Corrupt the second layer's gzip body but keep its digest valid by
    // rewriting the manifest: the converter must fail on the content itself.
    let gz = gzip(&layers[1]);
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let bad_digest = put_blob(layout.path(), &bad);
    edit_manifest(layout.path(), |m| m["layers"][1]["digest"] = bad_digest.clone().into());

    let out_dir = tempfile::tempdir().unwrap();
    let out = hyperbox()
        .args(["convert", "-q"])
        .arg(format!("oci:{}:t", layout.path().display()))
        .arg(format!("oci:{}:t", out_dir.path().display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("layer 2/2 {bad_digest}")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // inspect --verify names the file and the chunk.
    let dir = tempfile::tempdir().unwrap();
    let (blob, loc) = converted();
    let (forged, _) = reseal(&blob, &loc, |i| {
        let mut f = i.frames.get(1);
        f.id = ChunkId::of(b"x");
        i.frames.set(1, f)
    });
    let path = dir.path().join("layer.tar.zst");
    std::fs::write(&path, forged).unwrap();
    let out = hyperbox().args(["inspect", "--verify"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("layer {}", path.display())) && stderr.contains("chunk 1"), "{stderr}");
    // Without --verify the index alone is fine.
    assert!(hyperbox().arg("inspect").arg(&path).output().unwrap().status.success());
}

/// The error an edited index gets when opened, as text ("" if it opens).
fn open_error(edit: impl FnOnce(&mut format::Index)) -> String {
    let (blob, loc) = converted();
    let (forged, floc) = reseal(&blob, &loc, edit);
    format::open_layer(&forged[..], Some(&floc)).err().map(|e| e.to_string()).unwrap_or_default()
}

/// A copy of entry 0 (a directory) at `path`.
fn dir_at(i: &format::Index, path: Vec<u8>) -> format::Entry {
    format::Entry { path, ..i.entries[0].clone() }
}

/// A few kilobytes of index that would imply tens of millions of
/// directories (every prefix of deep, distinct paths) are refused at open,
/// before any tree is built; so are paths deeper than the limit.
#[test]
fn deep_paths_cannot_expand_the_tree() {
    use format::index::limits::{MAX_PATH_DEPTH, MAX_TREE_NODES};
    // Distinct deep paths: each implies MAX_PATH_DEPTH - 1 new directories.
    let err = open_error(|i| {
        let deep = "a/".repeat(MAX_PATH_DEPTH - 2);
        for n in 0..MAX_TREE_NODES / (MAX_PATH_DEPTH - 1) + 2 {
            let e = dir_at(i, format!("{n:x}/{deep}f").into_bytes());
            i.entries.push(e);
        }
    });
    assert!(err.contains("tree nodes"), "{err:?}");
    // The same few directories replaced by a file and implied again.
    let err = open_error(|i| {
        let deep = format!("x/{}f", "a/".repeat(MAX_PATH_DEPTH - 2)).into_bytes();
        let file = format::Entry::new(b"x".to_vec(), format::EntryKind::Fifo);
        for _ in 0..MAX_TREE_NODES / (MAX_PATH_DEPTH - 1) + 2 {
            let e = dir_at(i, deep.clone());
            i.entries.push(e);
            i.entries.push(file.clone());
        }
    });
    assert!(err.contains("tree nodes"), "{err:?}");
    // One path deeper than the limit.
    let err = open_error(|i| {
        let e = dir_at(i, "a/".repeat(MAX_PATH_DEPTH + 1).trim_end_matches('/').as_bytes().to_vec());
        i.entries.push(e)
    });
    assert!(err.contains("deeper than"), "{err:?}");
    // At the limits, an index opens.
    let err = open_error(|i| {
        let e = dir_at(i, "a/".repeat(MAX_PATH_DEPTH).trim_end_matches('/').as_bytes().to_vec());
        i.entries.push(e)
    });
    assert_eq!(err, "");
}

/// Names the kernel could never be given: longer than NAME_MAX, `.` and
/// `..` (also as what a whiteout `.wh..` or `.wh...` would hide), paths
/// longer than PATH_MAX.
#[test]
fn names_that_are_not_names() {
    use format::index::limits::{MAX_NAME, MAX_PATH};
    let long = "n".repeat(MAX_NAME + 1);
    let at_limit = "n".repeat(MAX_NAME);
    let too_long_path = format!("{}/x", vec![at_limit.as_str(); MAX_PATH / (MAX_NAME + 1)].join("/"));
    for bad in [&long as &str, "d/.wh..", "d/.wh...", "d/x/.wh..", &format!("d/.wh.{}", long), &too_long_path] {
        let err = open_error(|i| {
            let e = dir_at(i, bad.as_bytes().to_vec());
            i.entries.push(e)
        });
        assert!(err.contains("invalid path") || err.contains("name"), "{bad:?}: {err:?}");
    }
    for good in [&at_limit as &str, "d/.wh..wh..opq", "d/.wh.", "d/.wh.x", "d/..x", "d/.x"] {
        let err = open_error(|i| {
            let e = dir_at(i, good.as_bytes().to_vec());
            i.entries.push(e)
        });
        assert_eq!(err, "", "{good:?}");
    }
}

/// A chunk id is the blake3 of the chunk's bytes: two frames with one id
/// and different lengths cannot both be right, and the store keeps one
/// chunk per id. Refused at open.
#[test]
fn one_length_per_chunk_id() {
    let err = open_error(|i| {
        let a = i.frames.get(0);
        let k = (1..i.frames.len()).find(|&k| i.frames.get(k).u_len != a.u_len).expect("two frame lengths");
        let mut b = i.frames.get(k);
        b.id = a.id;
        i.frames.set(k, b);
    });
    assert!(err.contains("chunk") && err.contains("length"), "{err:?}");
    // The same id with the same length (duplicate content) is fine.
    let err = open_error(|i| {
        let a = i.frames.get(0);
        let f = format::Frame { c_len: 1, u_len: a.u_len, id: a.id };
        let mut last = i.frames.get(i.frames.len() - 1);
        last.c_len -= 1;
        i.frames.set(i.frames.len() - 1, last);
        i.frames.push(f);
        i.tar_size += a.u_len as u64;
    });
    assert_eq!(err, "");
}

/// Times no clock can show: nanoseconds of a second past 999,999,999.
/// Seconds are kept as they are (tar allows any), and clamped where shown.
#[test]
fn times_out_of_range() {
    let err = open_error(|i| i.entries[1].mtime_nsec = 1_000_000_000);
    assert!(err.contains("mtime"), "{err:?}");
    let err = open_error(|i| {
        i.entries[1].mtime = i64::MAX;
        i.entries[2].mtime = i64::MIN;
        i.entries[2].mtime_nsec = 999_999_999;
    });
    assert_eq!(err, "");
}

/// An xattr name longer than the kernel's XATTR_NAME_MAX.
#[test]
fn xattr_name_over_the_limit() {
    let err =
        open_error(|i| i.entries[1].extra_mut().xattrs = vec![format::Xattr { name: vec![b'u'; 256], value: vec![] }]);
    assert!(err.contains("xattrs"), "{err:?}");
}
