//! Test support: HyperBox layers built in memory, for the unit tests, the
//! integration tests in `tests/` and the benchmarks (one builder for all).
//! Not part of the daemon's or the CLI's behaviour.

use std::sync::Arc;

use crate::digest::Digest;
use crate::format::writer::{convert_tar, WriteOptions};
use crate::format::{self, ChunkParams, IndexLocation, LayerIndex};

/// A tar built in memory, entry by entry: regular files, dirs, symlinks and
/// hard links, each with a fixed mtime and the owner set by [`TarBuilder::owner`].
pub struct TarBuilder {
    tar: tar::Builder<Vec<u8>>,
    uid: u64,
    gid: u64,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        TarBuilder { tar: tar::Builder::new(Vec::new()), uid: 0, gid: 0 }
    }

    /// Owner of the entries added from now on.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h
    }

    pub fn dir(self, path: &str) -> Self {
        self.dir_mode(path, 0o755)
    }

    pub fn dir_mode(mut self, path: &str, mode: u32) -> Self {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, &[][..]).expect("tar in memory");
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        self.tar.append_data(&mut h, path, data).expect("tar in memory");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target).expect("tar in memory");
        self
    }

    /// A hard link to `target`, an entry added before.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut h, path, target).expect("tar in memory");
        self
    }

    /// An entry of any other kind (a device, a fifo) with no data.
    pub fn special(mut self, path: &str, kind: tar::EntryType, mode: u32) -> Self {
        let mut h = self.header(kind, mode, 0);
        self.tar.append_data(&mut h, path, &[][..]).expect("tar in memory");
        self
    }

    /// The tar's bytes.
    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().expect("tar in memory")
    }

    /// The tar converted to a HyperBox layer with `opts`.
    pub fn layer(self, opts: &WriteOptions) -> TestLayer {
        TestLayer::convert(self.finish(), opts)
    }
}

/// Write options with small chunks (4/8/16 KiB), so small test files span
/// several frames.
pub fn small_chunks() -> WriteOptions {
    WriteOptions { chunk: ChunkParams { min: 4 << 10, avg: 8 << 10, max: 16 << 10 }, ..Default::default() }
}

/// A converted layer: the tar, the blob, and the blob's index.
pub struct TestLayer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    /// sha256 of the blob (the layer digest).
    pub digest: Digest,
    /// sha256 of the tar (the diff_id).
    pub diff_id: Digest,
    pub location: IndexLocation,
    pub index: Arc<LayerIndex>,
}

impl TestLayer {
    pub fn convert(tar: Vec<u8>, opts: &WriteOptions) -> TestLayer {
        let mut blob = Vec::new();
        let c = convert_tar(&tar[..], &mut blob, opts).expect("convert a test tar");
        let (location, index) = format::open_layer(&blob[..], Some(&c.location)).expect("open a converted layer");
        TestLayer { digest: Digest::of(&blob), diff_id: Digest::of(&tar), tar, blob, location, index: Arc::new(index) }
    }

    /// The bytes of the index frame, as the store keeps them.
    pub fn index_frame(&self) -> &[u8] {
        &self.blob[self.location.offset as usize..(self.location.offset + self.location.length) as usize]
    }
}
