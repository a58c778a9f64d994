//! The content-addressed chunk store: the only module that names `rocksdb`.
//!
//! One RocksDB database holds, in column families with versioned names:
//!
//! | family | key | value |
//! |---|---|---|
//! | `chunks.v1` | blake3 chunk id (32 B) | `u_len` (u32 LE) + the zstd frame exactly as fetched |
//! | `atime.v1` | chunk id | last access tick (u64 LE) + stored value length (u32 LE) |
//! | `indexes.v1` | layer digest (32 B) | index location + the index frame |
//! | `traces.v1`, `snapshots.v1` | owner-defined | owner-defined |
//! | `meta` | `schema` | schema version (u32 LE) |
//!
//! Chunk values live in BlobDB blob files, so compaction moves only keys and
//! pointers, never chunk data. Sizes and access order are kept in the small
//! `atime` family, which is all that is scanned at open and for eviction.
//!
//! Only a [`VerifiedChunk`] can be put, and every read decompresses and
//! re-hashes: a chunk that fails is logged, counted, deleted and reported as
//! missing, so the caller fetches it again. Nothing unverified is returned.

use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::digest::{ChunkId, Digest};
use crate::format::{self, IndexLocation, LayerIndex};

/// Version of the database layout (family names, key and value encodings).
pub const SCHEMA_VERSION: u32 = 1;

const CF_CHUNKS: &str = "chunks.v1";
const CF_ATIME: &str = "atime.v1";
const CF_INDEXES: &str = "indexes.v1";
const CF_TRACES: &str = "traces.v1";
const CF_SNAPSHOTS: &str = "snapshots.v1";
const CF_META: &str = "meta";
const SCHEMA_KEY: &[u8] = b"schema";

/// The store section of the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Bytes of chunk data (compressed, as stored) to keep; least recently
    /// used chunks are evicted beyond it.
    pub budget_bytes: u64,
    /// Eviction frees space down to this fraction of the budget, so it runs
    /// rarely rather than on every put.
    pub evict_to: f64,
    /// Seconds after the last removal of a remote layer before hyperboxd
    /// frees what no snapshot needs any more (`hyperbox gc`); 0 leaves that
    /// to `hyperbox gc`. containerd removes an image's snapshots in a burst,
    /// so one gc follows the burst.
    pub gc_after_remove_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { budget_bytes: 10 << 30, evict_to: 0.9, gc_after_remove_secs: 60 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Db { path: String, source: rocksdb::Error },
    #[error("store {path}: database schema {found} is newer than this hyperbox understands ({SCHEMA_VERSION})")]
    NewerSchema { path: String, found: u32 },
    #[error("store {path}: {problem}")]
    Corrupt { path: String, problem: String },
    #[error("store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("chunk {id} failed verification: {problem}")]
    Verify {
        id: ChunkId,
        #[source]
        problem: format::FrameError,
    },
    #[error(transparent)]
    Format(#[from] format::FormatError),
}

/// A chunk whose compressed bytes are known to decompress to data with its
/// id. The only way to make one is to verify it or to hash data you hold.
#[derive(Clone, Debug)]
pub struct VerifiedChunk {
    id: ChunkId,
    u_len: u32,
    compressed: Vec<u8>,
}

impl VerifiedChunk {
    /// Verify a fetched frame; returns the chunk and its decompressed data.
    pub fn verify(id: ChunkId, u_len: u32, compressed: Vec<u8>) -> Result<(Self, Vec<u8>), StoreError> {
        let data =
            format::verify_frame(id, u_len, &compressed).map_err(|problem| StoreError::Verify { id, problem })?;
        Ok((Self { id, u_len, compressed }, data))
    }

    /// Compress data you hold; its id is computed, so it is right by construction.
    pub fn from_data(data: &[u8], level: i32) -> Self {
        let compressed = format::compress_frame(data, level).expect("in-memory zstd compression cannot fail");
        Self { id: ChunkId::of(data), u_len: data.len() as u32, compressed }
    }

    pub fn id(&self) -> ChunkId {
        self.id
    }
    pub fn compressed_len(&self) -> usize {
        self.compressed.len()
    }
}

/// Counters since open, and sizes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StoreStats {
    pub chunks: u64,
    /// Bytes of stored values (compressed chunk data plus a 4-byte header).
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub verify_failures: u64,
    /// Puts of a chunk that was already stored.
    pub dedup_puts: u64,
}

/// [`Store::memory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StoreMemory {
    pub memtables: u64,
    pub block_cache: u64,
    pub table_readers: u64,
}

impl StoreStats {
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

pub struct Store {
    db: DB,
    path: String,
    cfg: StoreConfig,
    /// Serializes changes to chunk membership (put, delete, evict, touch),
    /// so sizes and the atime family stay exact. Reads do not take it.
    write: Mutex<()>,
    tick: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    verify_failures: AtomicU64,
    dedup_puts: AtomicU64,
}

/// Families whose rows other modules own (traces, snapshot metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Traces,
    Snapshots,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Traces => CF_TRACES,
            Family::Snapshots => CF_SNAPSHOTS,
        }
    }
}

fn atime_value(tick: u64, len: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&tick.to_le_bytes());
    v[8..].copy_from_slice(&len.to_le_bytes());
    v
}

fn parse_atime(v: &[u8]) -> Option<(u64, u32)> {
    (v.len() == 12)
        .then(|| (u64::from_le_bytes(v[..8].try_into().unwrap()), u32::from_le_bytes(v[8..].try_into().unwrap())))
}

/// Create the store's dir 0700, and take group and other access off what an
/// older version left there (new files are 0600 by hyperboxd's umask).
/// Chunks, indexes and traces of private images are in it.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(path)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() && m.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// The block cache every column family shares.
const BLOCK_CACHE_BYTES: usize = 8 << 20;
/// Memtable sizes: chunks (values until a flush), layer indexes (a few MB
/// each), and the small families.
const CHUNK_MEMTABLE_BYTES: usize = 16 << 20;
const INDEX_MEMTABLE_BYTES: usize = 8 << 20;
const SMALL_MEMTABLE_BYTES: usize = 2 << 20;
/// All memtables together: past this, the largest is flushed.
const MEMTABLES_BYTES: usize = 48 << 20;

impl Store {
    /// Open (or create) the store at `path`. Refuses a database written by a
    /// newer schema; rebuilds sizes and the access clock from `atime`.
    pub fn open(path: &Path, cfg: &StoreConfig) -> Result<Store, StoreError> {
        let p = path.display().to_string();
        let db_err = |source| StoreError::Db { path: p.clone(), source };
        // Memory (docs/benchmarks.md, "hyperboxd's memory"): RocksDB's
        // defaults give each family a 64 MiB memtable (two while one
        // flushes) and a block cache of its own. Chunk values sit in the
        // memtable until a flush moves them to blob files, so a start that
        // fetched 50 MB held them all there. Here: every family shares one
        // small block cache, memtables are small, and all of them together
        // are capped; a full memtable flushes sooner, which costs little
        // since chunk values go to blob files and the keys are small.
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let family = |write_buffer: usize| {
            let mut o = Options::default();
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(write_buffer);
            o.set_max_write_buffer_number(2);
            o
        };
        let mut opts = family(SMALL_MEMTABLE_BYTES);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_db_write_buffer_size(MEMTABLES_BYTES);
        let mut chunk_opts = family(CHUNK_MEMTABLE_BYTES);
        // Chunk values are zstd frames already: store them in blob files,
        // uncompressed, and let compaction move only the keys.
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(1024);
        chunk_opts.set_blob_file_size(256 << 20);
        chunk_opts.set_enable_blob_gc(true);
        chunk_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_ATIME, family(SMALL_MEMTABLE_BYTES)),
            ColumnFamilyDescriptor::new(CF_INDEXES, family(INDEX_MEMTABLE_BYTES)),
            ColumnFamilyDescriptor::new(CF_TRACES, family(SMALL_MEMTABLE_BYTES)),
            ColumnFamilyDescriptor::new(CF_SNAPSHOTS, family(SMALL_MEMTABLE_BYTES)),
            ColumnFamilyDescriptor::new(CF_META, family(SMALL_MEMTABLE_BYTES)),
        ];
        make_private(path).map_err(|source| StoreError::Io { path: p.clone(), source })?;
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(db_err)?;
        let meta = db.cf_handle(CF_META).expect("meta family exists");
        match db.get_cf(meta, SCHEMA_KEY).map_err(db_err)? {
            Some(v) => {
                let found = v.as_slice().try_into().map(u32::from_le_bytes).map_err(|_| StoreError::Corrupt {
                    path: p.clone(),
                    problem: "schema version is not 4 bytes".into(),
                })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema { path: p, found });
                }
            }
            None => db.put_cf(meta, SCHEMA_KEY, SCHEMA_VERSION.to_le_bytes()).map_err(db_err)?,
        }
        let store = Store {
            db,
            path: p,
            cfg: cfg.clone(),
            write: Mutex::new(()),
            tick: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            dedup_puts: AtomicU64::new(0),
        };
        let (mut count, mut bytes, mut tick) = (0u64, 0u64, 0u64);
        for item in store.db.iterator_cf(store.cf(CF_ATIME), IteratorMode::Start) {
            let (_, v) = item.map_err(|e| store.db_err(e))?;
            let (t, len) = parse_atime(&v).ok_or_else(|| store.corrupt("an atime row is malformed"))?;
            count += 1;
            bytes += len as u64;
            tick = tick.max(t);
        }
        store.chunks.store(count, Ordering::Relaxed);
        store.bytes.store(bytes, Ordering::Relaxed);
        store.tick.store(tick + 1, Ordering::Relaxed);
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every family is created at open")
    }
    fn db_err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }
    fn corrupt(&self, problem: &str) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), problem: problem.to_string() }
    }
    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    /// Store a chunk. Returns false if it was already there (stored once,
    /// however many layers and images hold it).
    pub fn put(&self, chunk: &VerifiedChunk) -> Result<bool, StoreError> {
        let mut value = Vec::with_capacity(4 + chunk.compressed.len());
        value.extend_from_slice(&chunk.u_len.to_le_bytes());
        value.extend_from_slice(&chunk.compressed);
        {
            let _w = self.write.lock();
            if self.db.get_pinned_cf(self.cf(CF_ATIME), chunk.id.0).map_err(|e| self.db_err(e))?.is_some() {
                self.dedup_puts.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(CF_CHUNKS), chunk.id.0, &value);
            batch.put_cf(self.cf(CF_ATIME), chunk.id.0, atime_value(self.next_tick(), value.len() as u32));
            self.db.write(batch).map_err(|e| self.db_err(e))?;
            self.chunks.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(value.len() as u64, Ordering::Relaxed);
        }
        if self.bytes.load(Ordering::Relaxed) > self.cfg.budget_bytes {
            self.evict_to_budget()?;
        }
        Ok(true)
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned_cf(self.cf(CF_ATIME), id.0).map_err(|e| self.db_err(e))?.is_some())
    }

    /// The chunk's data, verified on this read. `None` if the store does not
    /// have it, or had it corrupted (then it is deleted: fetch it again).
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        // RocksDB's own CRC32C of the value is skipped: the blake3 check
        // below is stronger, and the CRC was 44% of a hit's CPU time (the
        // portable build of RocksDB has no hardware CRC).
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        let Some(value) = self.db.get_pinned_cf_opt(self.cf(CF_CHUNKS), id.0, &ro).map_err(|e| self.db_err(e))? else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        // A value is the frame's u_len (4 bytes, little endian), then the frame.
        let verified = match value.get(..4) {
            Some(h) => format::verify_frame(*id, u32::from_le_bytes(h.try_into().unwrap()), &value[4..])
                .map_err(|e| e.to_string()),
            None => Err(format!("the value is {} bytes, shorter than its header", value.len())),
        };
        drop(value);
        match verified {
            Ok(data) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.touch(id)?;
                Ok(Some(data))
            }
            Err(problem) => {
                tracing::warn!(store = %self.path, chunk = %id, %problem, "stored chunk failed verification; deleting it");
                self.verify_failures.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.delete(id)?;
                Ok(None)
            }
        }
    }

    /// Record accesses of chunks read elsewhere (the fetcher's frame cache),
    /// so eviction sees them as recently used. Chunks no longer stored are
    /// skipped.
    pub fn touch_all(&self, ids: &[ChunkId]) -> Result<(), StoreError> {
        ids.iter().try_for_each(|id| self.touch(id))
    }

    /// Record an access. Without the WAL: losing a recent access time in a
    /// crash only makes eviction slightly less exact.
    fn touch(&self, id: &ChunkId) -> Result<(), StoreError> {
        let _w = self.write.lock();
        let atime = self.cf(CF_ATIME);
        let Some(old) = self.db.get_pinned_cf(atime, id.0).map_err(|e| self.db_err(e))? else {
            return Ok(()); // evicted meanwhile
        };
        let (_, len) = parse_atime(&old).ok_or_else(|| self.corrupt("an atime row is malformed"))?;
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.put_cf_opt(atime, id.0, atime_value(self.next_tick(), len), &wo).map_err(|e| self.db_err(e))
    }

    /// Delete a chunk (both rows, atomically).
    fn delete(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let _w = self.write.lock();
        self.delete_locked(id)
    }

    fn delete_locked(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let Some(old) = self.db.get_pinned_cf(self.cf(CF_ATIME), id.0).map_err(|e| self.db_err(e))? else {
            return Ok(false);
        };
        let (_, len) = parse_atime(&old).ok_or_else(|| self.corrupt("an atime row is malformed"))?;
        drop(old);
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_CHUNKS), id.0);
        batch.delete_cf(self.cf(CF_ATIME), id.0);
        self.db.write(batch).map_err(|e| self.db_err(e))?;
        self.chunks.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Evict least recently used chunks until the store holds at most
    /// `evict_to` of its budget. Returns the number evicted.
    pub fn evict_to_budget(&self) -> Result<u64, StoreError> {
        let _w = self.write.lock();
        if self.bytes.load(Ordering::Relaxed) <= self.cfg.budget_bytes {
            return Ok(0);
        }
        let target = (self.cfg.budget_bytes as f64 * self.cfg.evict_to.clamp(0.0, 1.0)) as u64;
        let mut rows = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_ATIME), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let (tick, _) = parse_atime(&v).ok_or_else(|| self.corrupt("an atime row is malformed"))?;
            let id = ChunkId(k.as_ref().try_into().map_err(|_| self.corrupt("a chunk key is not 32 bytes"))?);
            rows.push((tick, id));
        }
        rows.sort_unstable();
        let mut evicted = 0;
        for (_, id) in rows {
            if self.bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            if self.delete_locked(&id)? {
                evicted += 1;
            }
        }
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        Ok(evicted)
    }

    /// Keep a layer's index (its frame as fetched, verified against `loc`).
    pub fn put_index(&self, layer: &Digest, loc: &IndexLocation, frame: &[u8]) -> Result<LayerIndex, StoreError> {
        let idx = format::parse_index_frame(frame, loc)?;
        let mut value = Vec::with_capacity(52 + frame.len());
        value.extend_from_slice(&loc.offset.to_le_bytes());
        value.extend_from_slice(&loc.version.to_le_bytes());
        value.extend_from_slice(loc.digest.as_bytes());
        value.extend_from_slice(frame);
        self.db.put_cf(self.cf(CF_INDEXES), layer.as_bytes(), value).map_err(|e| self.db_err(e))?;
        Ok(idx)
    }

    /// A layer's index, verified and decoded again on every call.
    pub fn get_index(&self, layer: &Digest) -> Result<Option<(IndexLocation, LayerIndex)>, StoreError> {
        let Some(v) = self.db.get_pinned_cf(self.cf(CF_INDEXES), layer.as_bytes()).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let (loc, frame) = self.parse_index_row(&v)?;
        let idx = format::parse_index_frame(frame, &loc)?;
        Ok(Some((loc, idx)))
    }

    fn parse_index_row<'a>(&self, v: &'a [u8]) -> Result<(IndexLocation, &'a [u8]), StoreError> {
        if v.len() < 44 {
            return Err(self.corrupt("an index row is too short"));
        }
        let loc = IndexLocation {
            offset: u64::from_le_bytes(v[..8].try_into().unwrap()),
            version: u32::from_le_bytes(v[8..12].try_into().unwrap()),
            digest: Digest::from_bytes(v[12..44].try_into().unwrap()),
            length: (v.len() - 44) as u64,
        };
        Ok((loc, &v[44..]))
    }

    /// The size the store keeps itself within (`store.budget_bytes`).
    pub fn budget_bytes(&self) -> u64 {
        self.cfg.budget_bytes
    }

    /// The layers whose index is kept here.
    pub fn indexed_layers(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_INDEXES), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.db_err(e))?;
            let key: [u8; 32] = k.as_ref().try_into().map_err(|_| self.corrupt("an index key is not 32 bytes"))?;
            out.push(Digest::from_bytes(key));
        }
        Ok(out)
    }

    pub fn delete_index(&self, layer: &Digest) -> Result<(), StoreError> {
        self.db.delete_cf(self.cf(CF_INDEXES), layer.as_bytes()).map_err(|e| self.db_err(e))
    }

    /// Visit every stored index.
    fn for_each_index(&self, mut f: impl FnMut(LayerIndex)) -> Result<(), StoreError> {
        for item in self.db.iterator_cf(self.cf(CF_INDEXES), IteratorMode::Start) {
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            let (loc, frame) = self.parse_index_row(&v)?;
            f(format::parse_index_frame(frame, &loc)?);
        }
        Ok(())
    }

    /// Delete every chunk no stored index references. Returns the count.
    pub fn gc(&self) -> Result<u64, StoreError> {
        let mut referenced = std::collections::HashSet::new();
        self.for_each_index(|idx| referenced.extend(idx.frames().iter().map(|f| f.id)))?;
        let _w = self.write.lock();
        let mut doomed = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_ATIME), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.db_err(e))?;
            let id = ChunkId(k.as_ref().try_into().map_err(|_| self.corrupt("a chunk key is not 32 bytes"))?);
            if !referenced.contains(&id) {
                doomed.push(id);
            }
        }
        let mut n = 0;
        for id in doomed {
            n += self.delete_locked(&id)? as u64;
        }
        Ok(n)
    }

    /// Logical bytes referenced (by every stored index, counting a chunk once
    /// per reference) over bytes stored: how much deduplication saves.
    pub fn dedup_ratio(&self) -> Result<f64, StoreError> {
        let mut logical = 0u64;
        let mut present = std::collections::HashMap::new();
        self.for_each_index(|idx| {
            for f in idx.frames().iter() {
                let here = *present.entry(f.id).or_insert_with(|| self.contains(&f.id).unwrap_or(false));
                if here {
                    logical += f.c_len as u64 + 4;
                }
            }
        })?;
        let stored = self.bytes.load(Ordering::Relaxed);
        Ok(if stored == 0 { 0.0 } else { logical as f64 / stored as f64 })
    }

    pub fn stats(&self) -> StoreStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            chunks: l(&self.chunks),
            bytes: l(&self.bytes),
            hits: l(&self.hits),
            misses: l(&self.misses),
            evictions: l(&self.evictions),
            verify_failures: l(&self.verify_failures),
            dedup_puts: l(&self.dedup_puts),
        }
    }

    /// What RocksDB holds in memory now, by part, in bytes: every
    /// family's memtables, the shared block cache, and the readers of
    /// open tables (their indexes and filters).
    pub fn memory(&self) -> StoreMemory {
        let families = [CF_CHUNKS, CF_ATIME, CF_INDEXES, CF_TRACES, CF_SNAPSHOTS, CF_META];
        let prop = |cf: &str, name: &str| {
            self.db.cf_handle(cf).and_then(|h| self.db.property_int_value_cf(h, name).ok().flatten()).unwrap_or(0)
        };
        StoreMemory {
            memtables: families.iter().map(|cf| prop(cf, "rocksdb.cur-size-all-mem-tables")).sum(),
            // One cache shared by every family.
            block_cache: prop(CF_CHUNKS, "rocksdb.block-cache-usage"),
            table_readers: families.iter().map(|cf| prop(cf, "rocksdb.estimate-table-readers-mem")).sum(),
        }
    }

    /// Rows owned by other modules (traces, snapshot metadata).
    pub fn put_row(&self, family: Family, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(family.name()), key, value).map_err(|e| self.db_err(e))
    }
    pub fn get_row(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(family.name()), key).map_err(|e| self.db_err(e))
    }
    pub fn delete_row(&self, family: Family, key: &[u8]) -> Result<(), StoreError> {
        self.db.delete_cf(self.cf(family.name()), key).map_err(|e| self.db_err(e))
    }

    /// Apply puts (`Some`) and deletes (`None`) to one family atomically and
    /// durably (synced to disk before returning): one snapshotter call is one
    /// such batch, so a crash leaves either all of a call's changes or none.
    pub fn write_rows(&self, family: Family, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let cf = self.cf(family.name());
        let mut batch = WriteBatch::default();
        for (k, v) in changes {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.db_err(e))
    }

    /// Every row of a family, in key order.
    pub fn rows(&self, family: Family) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.db
            .iterator_cf(self.cf(family.name()), IteratorMode::Start)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.db_err(e)))
            .collect()
    }

    /// Write raw bytes over a chunk's stored value: for tests of
    /// verify-on-read, which must see corruption the store did not cause.
    #[doc(hidden)]
    pub fn overwrite_raw_for_test(&self, id: &ChunkId, value: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf(self.cf(CF_CHUNKS), id.0, value).map_err(|e| self.db_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(budget: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &StoreConfig { budget_bytes: budget, evict_to: 0.9, ..StoreConfig::default() })
            .unwrap();
        (dir, s)
    }

    /// Incompressible bytes, different for every seed (xorshift64).
    fn data(seed: u32, len: usize) -> Vec<u8> {
        let mut x = (seed as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn put_get_and_dedup() {
        let (_d, s) = store(1 << 30);
        let c = VerifiedChunk::from_data(&data(1, 100_000), 3);
        assert!(s.put(&c).unwrap());
        assert!(!s.put(&c).unwrap(), "the same chunk is stored once");
        assert_eq!(s.get(&c.id()).unwrap().unwrap(), data(1, 100_000));
        assert_eq!(s.get(&ChunkId::of(b"absent")).unwrap(), None);
        let st = s.stats();
        assert_eq!((st.chunks, st.hits, st.misses, st.dedup_puts), (1, 1, 1, 1));
        assert_eq!(st.bytes, c.compressed_len() as u64 + 4);
    }

    #[test]
    fn verify_rejects_wrong_content() {
        let good = VerifiedChunk::from_data(b"hello", 3);
        let err = VerifiedChunk::verify(ChunkId::of(b"other"), 5, good.compressed.clone()).unwrap_err();
        assert!(err.to_string().contains("hashes to"), "{err}");
        assert!(VerifiedChunk::verify(good.id, 4, good.compressed.clone()).is_err(), "wrong length");
        let (v, d) = VerifiedChunk::verify(good.id, 5, good.compressed).unwrap();
        assert_eq!((v.id, d.as_slice()), (good.id, &b"hello"[..]));
    }

    #[test]
    fn corrupted_chunk_is_never_served_and_is_deleted() {
        let (_d, s) = store(1 << 30);
        let c = VerifiedChunk::from_data(&data(2, 50_000), 3);
        s.put(&c).unwrap();
        // Same length, one flipped byte; then garbage; then a short value.
        let mut bad = (c.u_len).to_le_bytes().to_vec();
        bad.extend_from_slice(&c.compressed);
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        for value in [bad, vec![0u8; 3]] {
            s.overwrite_raw_for_test(&c.id(), &value).unwrap();
            assert_eq!(s.get(&c.id()).unwrap(), None, "corrupt chunk served");
            assert!(!s.contains(&c.id()).unwrap(), "corrupt chunk kept");
            s.put(&c).unwrap();
        }
        assert_eq!(s.stats().verify_failures, 2);
        assert_eq!(s.get(&c.id()).unwrap().unwrap(), data(2, 50_000), "refetched chunk serves");
    }

    #[test]
    fn eviction_keeps_the_store_within_budget_and_prefers_recent_chunks() {
        let budget = 2 << 20;
        let (_d, s) = store(budget);
        let chunks: Vec<_> = (0..60).map(|i| VerifiedChunk::from_data(&data(i, 128 << 10), 1)).collect();
        let hot = chunks[0].clone();
        for c in &chunks {
            s.put(c).unwrap();
            s.get(&hot.id()).unwrap().unwrap(); // keep one chunk hot
            assert!(s.stats().bytes <= budget, "over budget: {:?}", s.stats());
        }
        assert!(s.stats().evictions > 0);
        assert!(s.contains(&hot.id()).unwrap(), "the most recently used chunk was evicted");
        // Every chunk still readable: from the store, or after a refetch.
        for c in &chunks {
            if s.get(&c.id()).unwrap().is_none() {
                s.put(c).unwrap();
                assert!(s.get(&c.id()).unwrap().is_some());
            }
        }
        assert!(s.stats().bytes <= budget);
    }

    #[test]
    fn sizes_survive_reopen_and_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig::default();
        let before = {
            let s = Store::open(dir.path(), &cfg).unwrap();
            for i in 0..5 {
                s.put(&VerifiedChunk::from_data(&data(i, 10_000), 3)).unwrap();
            }
            s.stats()
        };
        let s = Store::open(dir.path(), &cfg).unwrap();
        assert_eq!((s.stats().chunks, s.stats().bytes), (before.chunks, before.bytes));
        s.db.put_cf(s.cf(CF_META), SCHEMA_KEY, 9u32.to_le_bytes()).unwrap();
        drop(s);
        let err = Store::open(dir.path(), &cfg).err().unwrap();
        assert!(err.to_string().contains("schema 9 is newer"), "{err}");
    }
}
