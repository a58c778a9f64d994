#![allow(dead_code)] // each bench uses a part of the corpus helpers
//! Benchmark corpora shared by the benches: a tar of real files from this
//! machine (binaries, libraries, text), and a synthetic 100k-entry index.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hyperbox::digest::ChunkId;
use hyperbox::format::{ChunkParams, Entry, EntryKind, Frame, FrameTable, Index};

use hyperbox::testing as layer;

/// A tar of up to `limit` bytes of regular files (and symlinks) under
/// `roots`, in sorted order, built as the tests build theirs (so runs on one
/// machine see the same bytes).
pub fn usr_tar(roots: &[&str], limit: u64) -> Vec<u8> {
    let mut b = layer::LayerBuilder::new();
    let mut total = 0u64;
    for root in roots {
        b = add_dir(b, Path::new(root), &mut total, limit);
    }
    b.finish()
}

fn add_dir(mut b: layer::LayerBuilder, dir: &Path, total: &mut u64, limit: u64) -> layer::LayerBuilder {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return b;
    };
    let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    names.sort();
    for p in names {
        if *total >= limit {
            break;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let Some(name) = p.strip_prefix("/").unwrap().to_str() else {
            continue; // the builder takes UTF-8 names
        };
        if md.is_dir() {
            b = add_dir(b, &p, total, limit);
        } else if md.file_type().is_symlink() {
            let Some(target) = std::fs::read_link(&p).ok().and_then(|t| t.to_str().map(str::to_string)) else {
                continue;
            };
            b = b.symlink(name, &target);
            *total += 512;
        } else if md.is_file() {
            // Files this process may not read are left out.
            let Ok(data) = std::fs::read(&p) else { continue };
            b = b.file(name, md.permissions().mode() & 0o7777, &data);
            *total += data.len() as u64 + 512;
        }
    }
    b
}

/// A synthetic index shaped like a large Python image: 100k entries (10%
/// directories, 5% symlinks, the rest files of 1 to 3 chunks).
pub fn synthetic_index(entries: usize) -> Index {
    let mut frames = FrameTable::default();
    let mut es = Vec::with_capacity(entries);
    let mut tar_off = 0u64;
    for i in 0..entries {
        let path =
            format!("usr/lib/python3/dist-packages/package{:04}/sub{:02}/module_{i}.py", i / 100, i % 37).into_bytes();
        let (kind, size) = match i % 20 {
            0 | 1 => (EntryKind::Dir, 0),
            2 => (EntryKind::Symlink, 0),
            _ => (EntryKind::File, 1000 + (i as u64 * 7919) % 300_000),
        };
        frames.push(Frame { c_len: 300, u_len: 512, id: ChunkId::of(&(i as u64).to_le_bytes()) });
        tar_off += 512;
        let data_offset = tar_off;
        let mut left = size;
        let mut n = 0u64;
        while left > 0 {
            let u = left.min(128 << 10);
            frames.push(Frame {
                c_len: (u / 3) as u32 + 1,
                u_len: u as u32,
                id: ChunkId::of(&[(i as u64).to_le_bytes(), n.to_le_bytes()].concat()),
            });
            left -= u;
            tar_off += u;
            n += 1;
        }
        let mut e = Entry::new(path, kind);
        e.mode = 0o644;
        e.mtime = 1_700_000_000;
        e.size = size;
        e.data_offset = data_offset;
        if kind == EntryKind::Symlink {
            e.extra_mut().link = b"../target".to_vec();
        }
        es.push(e);
    }
    Index { tar_size: tar_off, diff_id: [0; 32], chunk_params: ChunkParams::default(), frames, entries: es }
}
