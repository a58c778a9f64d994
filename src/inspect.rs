//! `hyperbox inspect`: a layer's index, as a table or JSON.

use serde::Serialize;

use crate::digest::Digest;
use crate::format::{EntryKind, IndexLocation, LayerIndex};

#[derive(Serialize)]
pub struct LayerReport {
    pub layer: String,
    pub blob_size: u64,
    pub index_offset: u64,
    pub index_length: u64,
    pub index_digest: String,
    pub format_version: u32,
    pub tar_size: u64,
    pub diff_id: String,
    pub chunk_params: crate::format::ChunkParams,
    pub entry_count: usize,
    pub frame_count: usize,
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub hardlinks: usize,
    pub other: usize,
    pub entries: Vec<EntryReport>,
    pub frames: Vec<FrameReport>,
}

#[derive(Serialize)]
pub struct EntryReport {
    pub path: String,
    pub kind: &'static str,
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub chunks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<(u32, u32)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub sparse_segments: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Serialize)]
pub struct FrameReport {
    pub id: String,
    pub blob_offset: u64,
    pub compressed: u32,
    pub tar_offset: u64,
    pub uncompressed: u32,
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::CharDevice => "char",
        EntryKind::BlockDevice => "block",
        EntryKind::Fifo => "fifo",
    }
}

pub fn report(layer: &str, blob_size: u64, loc: &IndexLocation, idx: &LayerIndex) -> LayerReport {
    let count = |k: EntryKind| idx.entries().iter().filter(|e| e.kind == k).count();
    let entries = idx
        .entries()
        .iter()
        .map(|e| EntryReport {
            path: String::from_utf8_lossy(&e.path).into_owned(),
            kind: kind_name(e.kind),
            mode: format!("{:04o}", e.mode),
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size: e.size,
            chunks: idx.frames_for(e.data_offset, e.data_len()).len(),
            link: (!e.link().is_empty()).then(|| String::from_utf8_lossy(e.link()).into_owned()),
            device: matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice).then_some(e.device()),
            xattrs: e.xattrs().iter().map(|x| String::from_utf8_lossy(&x.name).into_owned()).collect(),
            sparse_segments: e.sparse().len(),
        })
        .collect();
    let frames = (0..idx.frames().len())
        .map(|i| {
            let f = idx.frames().get(i);
            FrameReport {
                id: f.id.hex(),
                blob_offset: idx.frame_blob_range(i).0,
                compressed: f.c_len,
                tar_offset: idx.frame_tar_range(i).0,
                uncompressed: f.u_len,
            }
        })
        .collect();
    LayerReport {
        layer: layer.to_string(),
        blob_size,
        index_offset: loc.offset,
        index_length: loc.length,
        index_digest: loc.digest.to_string(),
        format_version: loc.version,
        tar_size: idx.index.tar_size,
        diff_id: Digest::from_bytes(idx.index.diff_id).to_string(),
        chunk_params: idx.index.chunk_params,
        entry_count: idx.entries().len(),
        frame_count: idx.frames().len(),
        files: count(EntryKind::File),
        dirs: count(EntryKind::Dir),
        symlinks: count(EntryKind::Symlink),
        hardlinks: count(EntryKind::Hardlink),
        other: count(EntryKind::CharDevice) + count(EntryKind::BlockDevice) + count(EntryKind::Fifo),
        entries,
        frames,
    }
}

impl LayerReport {
    pub fn print_text(&self, with_entries: bool) {
        use crate::convert::human;
        println!("layer       {}", self.layer);
        println!(
            "format      HyperBox v{}, index {} bytes at {} ({})",
            self.format_version, self.index_length, self.index_offset, self.index_digest
        );
        println!("sizes       blob {}, tar {} (diff_id {})", human(self.blob_size), human(self.tar_size), self.diff_id);
        println!(
            "entries     {} ({} files, {} dirs, {} symlinks, {} hard links, {} other)",
            self.entry_count, self.files, self.dirs, self.symlinks, self.hardlinks, self.other
        );
        let p = &self.chunk_params;
        println!(
            "chunks      {} frames (chunking min/avg/max {}/{}/{} KiB)",
            self.frame_count,
            p.min >> 10,
            p.avg >> 10,
            p.max >> 10
        );
        if with_entries {
            println!("{:<8} {:<5} {:>11} {:>12} {:>6}  path", "kind", "mode", "uid:gid", "size", "chunks");
            for e in &self.entries {
                let link = e.link.as_ref().map(|l| format!(" -> {l}")).unwrap_or_default();
                println!(
                    "{:<8} {:<5} {:>11} {:>12} {:>6}  /{}{link}",
                    e.kind,
                    e.mode,
                    format!("{}:{}", e.uid, e.gid),
                    e.size,
                    e.chunks,
                    e.path
                );
            }
        }
    }
}
