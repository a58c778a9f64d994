//! Test support: the one way unit tests, integration tests (`tests/common`
//! re-exports it) and benches build a layer: entries (files, dirs, symlinks,
//! hard links, devices) into tar bytes, and those into a HyperBox layer by
//! the library's own writer, opened again as a reader opens it. Not part of
//! the daemon's or the CLI's behaviour.

use std::sync::Arc;

use crate::digest::Digest;
use crate::format::{self, writer, ChunkParams, Entry, LayerIndex};
use crate::layer::RemoteLayer;
use crate::oci::Repo;

/// A tar layer built in memory. Every entry is owned by 0:0 with mtime
/// 1,700,000,000, so the same calls give the same bytes.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    gnu: bool,
    uid: u64,
    gid: u64,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// Headers in ustar format (names too long for ustar get GNU long-name
    /// entries from the tar crate).
    pub fn new() -> Self {
        Self { tar: tar::Builder::new(Vec::new()), gnu: false, uid: 0, gid: 0 }
    }
    /// Headers in GNU format.
    pub fn gnu() -> Self {
        Self { gnu: true, ..Self::new() }
    }
    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = if self.gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h
    }
    /// Owner of the entries added from now on (0:0 until then).
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    /// A directory with its own mode.
    pub fn dir_mode(mut self, path: &str, mode: u32) -> Self {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    /// An entry of another kind with no data (a device, a fifo).
    pub fn special(mut self, path: &str, kind: tar::EntryType, mode: u32) -> Self {
        let mut h = self.header(kind, mode, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    /// A character or block device node.
    pub fn device(mut self, path: &str, kind: tar::EntryType, mode: u32, major: u32, minor: u32) -> Self {
        let mut h = self.header(kind, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    /// A regular file with extended attributes (PAX `SCHILY.xattr.` records,
    /// as GNU tar and containerd write them).
    pub fn file_with_xattrs(mut self, path: &str, mode: u32, data: &[u8], xattrs: &[(&str, &[u8])]) -> Self {
        let records: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        self.file(path, mode, data)
    }
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }
    /// A second name for `target`, an entry earlier in the layer.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }
    /// A layer with busybox and its applet links: enough to run `sh -c`.
    pub fn busybox() -> Self {
        let bb = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static)");
        let mut l = Self::new().dir("bin").dir("etc").dir("tmp").file("bin/busybox", 0o755, &bb);
        for applet in ["sh", "cat", "echo", "ls", "wc", "sha256sum", "head", "find", "stat"] {
            l = l.symlink(&format!("bin/{applet}"), "busybox");
        }
        l.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    }
    /// A small layer without busybox, for tests that never run it.
    pub fn busybox_free() -> Self {
        Self::new().dir("etc").file("etc/os-release", 0o644, b"ID=hyperbox-test\n")
    }
    /// The tar bytes, end-of-archive marker included.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
    /// The HyperBox layer of these entries, with the default write options.
    pub fn convert(self) -> Layer {
        self.convert_with(&writer::WriteOptions::default())
    }
    pub fn convert_with(self, opts: &writer::WriteOptions) -> Layer {
        Layer::from_tar(self.finish(), opts)
    }
}

/// Write options with small chunks (4/8/16 KiB), so small files span
/// several frames.
pub fn small_chunks() -> writer::WriteOptions {
    writer::WriteOptions { chunk: ChunkParams { min: 4 << 10, avg: 8 << 10, max: 16 << 10 }, ..Default::default() }
}

/// A tar and the HyperBox layer the library's writer made of it.
pub struct Layer {
    /// The input: its sha256 is the layer's diff_id.
    pub tar: Vec<u8>,
    /// The HyperBox layer, as a registry serves it.
    pub blob: Vec<u8>,
    /// What the writer reported: index location, blob digest and size,
    /// diff_id, stats.
    pub out: writer::ConvertedLayer,
    /// The index as a reader finds it: through the blob's footer.
    pub index: Arc<LayerIndex>,
}

impl Layer {
    /// Convert any tar (made by [`LayerBuilder`], GNU tar or by hand). Panics
    /// if the writer fails, or if the footer leads elsewhere than the
    /// location the writer reported.
    pub fn from_tar(tar: Vec<u8>, opts: &writer::WriteOptions) -> Layer {
        let mut blob = Vec::new();
        let out = writer::convert_tar(&tar[..], &mut blob, opts)
            .unwrap_or_else(|e| panic!("converting a test layer of {} tar bytes: {e}", tar.len()));
        let (location, index) =
            format::open_layer(&blob[..], None).unwrap_or_else(|e| panic!("opening a converted test layer: {e}"));
        assert_eq!(location, out.location, "the footer and the writer disagree on where the index is");
        Layer { tar, blob, out, index: Arc::new(index) }
    }
    /// The blob's digest: the layer descriptor's.
    pub fn digest(&self) -> &Digest {
        &self.out.blob_digest
    }
    /// The index's skippable frame, as a ranged GET of the blob returns it.
    pub fn index_frame(&self) -> &[u8] {
        let loc = &self.out.location;
        &self.blob[loc.offset as usize..(loc.offset + loc.length) as usize]
    }
    /// The entry at `path` (as the index spells it: no leading "./" or "/").
    pub fn entry(&self, path: &str) -> &Entry {
        self.index
            .entries()
            .iter()
            .find(|e| e.path == path.as_bytes())
            .unwrap_or_else(|| panic!("no entry {path:?} in the test layer"))
    }
    /// The layer as a fetcher sees it once its blob is in `repo`.
    pub fn remote(&self, repo: Repo) -> Arc<RemoteLayer> {
        Arc::new(RemoteLayer { repo, blob: self.digest().clone(), index: self.index.clone() })
    }
}
