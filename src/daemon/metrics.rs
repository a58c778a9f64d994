//! hyperboxd's Prometheus `/metrics` (and `/healthz`) over HTTP: every
//! metric, read from each part's own counters when scraped (names in
//! `crate::metrics`).

use std::future::Future;
use std::sync::Arc;

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Response, StatusCode};

use super::Node;

/// Serve `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    node: Arc<Node>,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), hyper::Error> {
    let make = make_service_fn(move |_| {
        let node = node.clone();
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req: hyper::Request<Body>| {
                let node = node.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        // Off the runtime: it takes the snapshotter's locks,
                        // which a Prepare holds across a mount.
                        "/metrics" => match tokio::task::spawn_blocking(move || text(&node)).await {
                            Ok(text) => (StatusCode::OK, text),
                            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")),
                        },
                        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                        _ => (StatusCode::NOT_FOUND, "try /metrics or /healthz\n".to_string()),
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Body::from(body))
                        .expect("a valid response");
                    Ok::<_, std::convert::Infallible>(resp)
                }
            }))
        }
    });
    hyper::Server::from_tcp(listener)?.serve(make).with_graceful_shutdown(shutdown).await
}

/// Every metric, from each module's counters (names in hyperbox::metrics).
pub fn text(node: &Node) -> String {
    use crate::metrics::*;
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Exposition::default();
    let f = node.fetcher.stats();
    e.counter_by(
        FETCH_REQUESTS,
        "Registry range requests sent, tries included.",
        "priority",
        &[("demand", f.demand_requests), ("prefetch", f.prefetch_requests)],
    );
    e.counter(FETCH_BYTES, "Compressed bytes received from registries.", f.bytes);
    e.counter(FETCH_CHUNKS, "Chunks fetched, verified and stored.", f.chunks);
    e.counter(FETCH_RETRIES, "Tries after a failed one.", f.retries);
    e.counter(FETCH_ERRORS, "Failed tries (transport, status, protocol, verification).", f.errors);
    e.counter(FETCH_FAILURES, "Fetches that gave up (a demand read waiting on one gets EIO).", f.failures);
    e.counter(FETCH_VERIFY_FAILURES, "Fetched chunks that failed verification.", f.verify_failures);
    e.counter(FETCH_JOINED, "Reads that joined a fetch already in flight.", f.joined);
    e.counter(FRAME_CACHE_HITS, "Frames reads found in the frame cache, decompressed and verified.", f.cache_hits);
    e.counter(
        READY_FRAME_HITS,
        "Frames reads found waiting in memory, verified as a traced prefetch fetched them.",
        f.ready_hits,
    );
    e.histogram_by(
        FETCH_REQUEST_SECONDS,
        "Range request latency, sending to holding the whole body (failed tries included).",
        "priority",
        &node.fetcher.request_latency(),
    );
    e.counter(FETCH_WAIT_SECONDS, "Seconds FUSE reads spent waiting on registry fetches.", node.fetcher.wait_seconds());
    let live = node.snapshotter.container_ids();
    let waits = crate::mount::CONTAINER_WAITS.live(|id| live.contains(id));
    e.counter_by(
        CONTAINER_FETCH_WAIT_SECONDS,
        "Seconds the reads of a container's processes spent waiting on registry fetches (containers that waited).",
        "container",
        &waits.iter().map(|(id, s)| (id.as_str(), *s)).collect::<Vec<_>>(),
    );
    e.histogram_by(
        FUSE_OP_SECONDS,
        "FUSE request latency in hyperboxd, arrival to reply, by operation.",
        "op",
        &crate::mount::FUSE_OPS.snapshot(),
    );
    let s = node.store.stats();
    e.gauge(STORE_CHUNKS, "Chunks in the store.", s.chunks as f64);
    e.gauge(STORE_BYTES, "Bytes of stored chunks.", s.bytes as f64);
    e.counter(STORE_HITS, "Store lookups that found the chunk.", s.hits);
    e.counter(STORE_MISSES, "Store lookups that did not.", s.misses);
    e.counter(STORE_EVICTIONS, "Chunks evicted to stay within the budget.", s.evictions);
    e.counter(STORE_VERIFY_FAILURES, "Stored chunks that failed verification on read.", s.verify_failures);
    e.gauge(LAYERS_MOUNTED, "Remote layers mounted through FUSE.", node.snapshotter.mounted_layers() as f64);
    let (db, fetch) = (node.store.memory(), node.fetcher.memory());
    e.gauge_by(
        MEMORY_BYTES,
        "Bytes hyperboxd holds, by part (resident: the process's resident set, all parts and the rest).",
        "part",
        &[
            ("resident", resident_bytes()),
            ("rocksdb_memtables", db.memtables),
            ("rocksdb_block_cache", db.block_cache),
            ("rocksdb_table_readers", db.table_readers),
            ("frame_cache", fetch.frame_cache),
            ("ready_frames", fetch.ready),
            ("fetches", fetch.fetches),
            ("layer_trees", node.snapshotter.layer_memory() as u64),
        ],
    );
    let calls = super::snapshots::CALL_COUNTS.snapshot();
    e.counter_by(
        SNAPSHOT_OPS,
        "Snapshots service calls from containerd.",
        "call",
        &calls.iter().map(|(c, n, _)| (*c, *n)).collect::<Vec<_>>(),
    );
    e.counter_by(
        SNAPSHOT_OP_ERRORS,
        "Snapshots service calls that failed (not found and already exists are answers, not failures).",
        "call",
        &calls.iter().map(|(c, _, n)| (*c, *n)).collect::<Vec<_>>(),
    );
    let fallbacks = node.snapshotter.fallbacks().counts();
    e.counter_by(
        LAZY_FALLBACKS,
        "Layer Prepares not served lazily (containerd downloaded the layer), by reason; `hyperbox doctor` shows the \
         latest.",
        "reason",
        &fallbacks.iter().map(|(r, n)| (r.label(), *n)).collect::<Vec<_>>(),
    );
    if let Some(r) = node.recorder.as_ref() {
        e.counter(TRACE_SESSIONS, "Container starts recorded.", r.stats.sessions.load(Relaxed));
        e.counter(TRACE_RUNS_MERGED, "Recorded starts merged into traces.", r.stats.runs_merged.load(Relaxed));
        e.counter(TRACE_REPORTS_DROPPED, "Read reports dropped on a full queue.", r.hook().dropped());
        e.counter(
            TRACE_EMPTY_RUNS,
            "Recorded starts that read nothing through FUSE.",
            r.stats.empty_runs.load(Relaxed),
        );
        e.counter(
            TRACE_SAVE_ERRORS,
            "Recorded starts whose trace could not be saved.",
            r.stats.save_errors.load(Relaxed),
        );
        e.counter(
            PREFETCH_JUDGED_READ,
            "Chunks read by starts that had a prefetch.",
            r.stats.judged_read.load(Relaxed),
        );
        e.counter(
            PREFETCH_JUDGED_PREFETCHED,
            "Chunks prefetched for starts that were judged.",
            r.stats.judged_prefetched.load(Relaxed),
        );
        e.counter(PREFETCH_JUDGED_HITS, "Chunks both prefetched and read.", r.stats.judged_hits.load(Relaxed));
        if let Some((p, rc)) = r.stats.last() {
            e.gauge(
                PREFETCH_LAST_PRECISION,
                "Of the chunks prefetched for the latest judged start, the share read.",
                p,
            );
            e.gauge(PREFETCH_LAST_RECALL, "Of the chunks the latest judged start read, the share prefetched.", rc);
        }
    }
    let p = &node.prefetcher.stats;
    e.counter(PREFETCH_JOBS, "Prefetch jobs started (images with a trace, or hydrating).", p.jobs.load(Relaxed));
    e.counter(PREFETCH_BYTES, "Compressed bytes of traced chunks asked for.", p.bytes.load(Relaxed));
    e.counter(PREFETCH_ERRORS, "Prefetch fetches that failed.", p.errors.load(Relaxed));
    e.finish()
}

/// This process's resident set, in bytes (0 if /proc says otherwise).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}
