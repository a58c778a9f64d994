//! The fetch section of the config file, owned here and composed by
//! `config`.

use serde::{Deserialize, Serialize};

/// The fetch section of the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Registry requests in flight at once, all kinds.
    pub max_concurrent_requests: usize,
    /// Of those, how many may be prefetch; the rest stay free for demand.
    pub max_prefetch_requests: usize,
    /// Registry requests in flight at once against one registry host (a
    /// mirror is a host of its own), all kinds: a registry that stalls holds
    /// at most this many, and reads from other registries go on. Of these,
    /// at most `min(max_prefetch_requests, this - 1)` (at least 1) may be
    /// prefetch. Capped at `max_concurrent_requests`.
    pub max_requests_per_registry: usize,
    /// Missing frames separated by at most this many bytes of other frames
    /// are fetched in one request (the bytes between come along).
    pub coalesce_gap_bytes: u64,
    /// Largest range one request asks for (a single frame larger than this
    /// is still fetched whole). 0 turns coalescing off: one frame a request.
    pub max_request_bytes: u64,
    /// Tries per source: each mirror gets one, the registry this many.
    pub attempts: u32,
    /// First backoff between tries; doubles each time, with jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// The most one registry read may take, all tries on all sources and the
    /// backoff between them included: a range of chunks (a FUSE read waiting
    /// on it then returns EIO) or a layer's index (the layer's `Prepare`
    /// then fails). For a demand read the clock starts when the read is
    /// requested: time queued for a request slot, or waiting for another
    /// reader's fetch of the same chunks, counts. For prefetch it starts
    /// when the request first gets a slot (prefetch queues behind demand by
    /// design, each request bounded itself). A stalled connection
    /// is cut sooner, by `registry.read_timeout_ms`, and retried.
    pub timeout_ms: u64,
    /// MiB of decompressed, verified frames kept in memory for reads that
    /// come back to a frame (small files that share one); 0 turns it off.
    pub frame_cache_mb: u64,
    /// MiB of decompressed, verified frames a traced prefetch fetched, kept
    /// in memory until the start reads them (each is verified as it
    /// arrives; the read then needs no second decompress and hash from the
    /// store); 0 turns it off.
    pub ready_mb: u64,
    /// Seconds such a frame waits for its read before it is dropped (the
    /// store still has it).
    pub ready_secs: u64,
    /// `[fetch.ahead]`: what a read that misses fetches
    /// next, in the background, when no trace said so.
    pub ahead: AheadConfig,
}

/// `[fetch.ahead]`: fetching ahead of reads on a start no trace covers
/// (`crate::mount`'s `ahead`). Each fetch is at prefetch priority: demand
/// reads keep their own request slots and go first.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AheadConfig {
    /// Fetch ahead at all.
    pub enabled: bool,
    /// A read of a file that misses brings the rest of the file along when
    /// the file is stored in at most this many compressed bytes (shared
    /// objects are read by page faults all over them).
    pub file_bytes: u64,
    /// The same for a program (a file with an execute bit), which may be
    /// larger: a program being run faults all over its code (gcc's `cc1`
    /// read 12.75 MB of its 13 MB stored, one window at a time), where a
    /// shared library (not executable on Debian) serves a few calls of
    /// many programs. Below `file_bytes`, `file_bytes` is used.
    pub program_bytes: u64,
    /// A read of a file that misses brings the small files of its
    /// directory along (a module's siblings are the next imports), at most
    /// this many compressed bytes per directory, once per directory.
    pub dir_bytes: u64,
    /// Files above this size are not brought along as siblings.
    pub dir_file_max_bytes: u64,
    /// After this many reads that missed, one after another and each a
    /// little further into the layer than the last, the reader is taken to
    /// sweep the layer (`find | xargs cat`, a virus scan, `pip list`): the
    /// rest of the layer is streamed in order, on parallel requests.
    /// 0 turns this off.
    pub sweep_after: u32,
    /// Once reads have reached this share of the layer's files (percent),
    /// the reader is taken to sweep the layer too, whatever the order of
    /// its reads: the rest of the layer is streamed. An application start
    /// reads a few percent of a large image's files, more of a small one's.
    /// 0 turns this off.
    pub sweep_files_percent: u32,
    /// Once no read has waited on the registry for this long, fetch every
    /// remaining chunk of each layer a read waited on, a request at a time,
    /// pausing whenever a read waits. 0 (the default) leaves the rest of a
    /// layer remote until something reads it.
    pub idle_hydrate_ms: u64,
    /// At most this many compressed bytes fetched ahead are on the way at
    /// once, all layers together, in requests of a quarter of it. A read
    /// that misses waits behind whatever is already queued on the link:
    /// more in flight fills a slow link no better, and delays every read.
    /// 0: no bound (requests of `max_request_bytes` on every prefetch slot).
    pub in_flight_bytes: u64,
}

impl Default for AheadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            file_bytes: 8 << 20,
            program_bytes: 16 << 20,
            dir_bytes: 4 << 20,
            dir_file_max_bytes: 1 << 20,
            sweep_after: 16,
            sweep_files_percent: 50,
            idle_hydrate_ms: 0,
            in_flight_bytes: 1 << 20,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 16,
            max_prefetch_requests: 8,
            max_requests_per_registry: 8,
            coalesce_gap_bytes: 128 << 10,
            max_request_bytes: 4 << 20,
            attempts: 4,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            timeout_ms: 60_000,
            frame_cache_mb: 32,
            ready_mb: 64,
            ready_secs: 30,
            ahead: AheadConfig::default(),
        }
    }
}

impl FetchConfig {
    /// Problems with the values, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_requests == 0 {
            return Err("fetch.max_concurrent_requests must be at least 1".into());
        }
        if self.max_prefetch_requests == 0 || self.max_prefetch_requests > self.max_concurrent_requests {
            return Err("fetch.max_prefetch_requests must be between 1 and max_concurrent_requests".into());
        }
        if self.max_requests_per_registry == 0 {
            return Err("fetch.max_requests_per_registry must be at least 1".into());
        }
        if self.attempts == 0 {
            return Err("fetch.attempts must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            return Err("fetch.timeout_ms must be more than 0".into());
        }
        if self.frame_cache_mb > 16 << 10 {
            return Err("fetch.frame_cache_mb must be at most 16384".into());
        }
        if self.ready_mb > 16 << 10 {
            return Err("fetch.ready_mb must be at most 16384".into());
        }
        Ok(())
    }
}
