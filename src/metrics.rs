//! Metric names (one place, as constants) and the Prometheus text format.
//!
//! A leaf: it knows no other module. hyperboxd reads each module's counters
//! and writes them here; `/metrics` serves the text.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// Fetcher: registry range requests, split demand and prefetch.
pub const FETCH_REQUESTS: &str = "hyperbox_fetch_requests_total";
pub const FETCH_BYTES: &str = "hyperbox_fetch_bytes_total";
pub const FETCH_CHUNKS: &str = "hyperbox_fetch_chunks_total";
pub const FETCH_RETRIES: &str = "hyperbox_fetch_retries_total";
pub const FETCH_ERRORS: &str = "hyperbox_fetch_errors_total";
pub const FETCH_FAILURES: &str = "hyperbox_fetch_failures_total";
pub const FETCH_VERIFY_FAILURES: &str = "hyperbox_fetch_verify_failures_total";
pub const FETCH_JOINED: &str = "hyperbox_fetch_joined_total";
pub const FRAME_CACHE_HITS: &str = "hyperbox_frame_cache_hits_total";
pub const READY_FRAME_HITS: &str = "hyperbox_ready_frame_hits_total";
/// Seconds from sending a range request to holding its whole body.
pub const FETCH_REQUEST_SECONDS: &str = "hyperbox_fetch_request_seconds";
/// Seconds FUSE reads spent waiting on the registry, all and per container.
pub const FETCH_WAIT_SECONDS: &str = "hyperbox_fetch_wait_seconds_total";
pub const CONTAINER_FETCH_WAIT_SECONDS: &str = "hyperbox_container_fetch_wait_seconds_total";
// FUSE: seconds from a request reaching hyperboxd to its reply, by operation.
pub const FUSE_OP_SECONDS: &str = "hyperbox_fuse_op_seconds";
// Store.
pub const STORE_CHUNKS: &str = "hyperbox_store_chunks";
pub const STORE_BYTES: &str = "hyperbox_store_bytes";
pub const STORE_HITS: &str = "hyperbox_store_hits_total";
pub const STORE_MISSES: &str = "hyperbox_store_misses_total";
pub const STORE_EVICTIONS: &str = "hyperbox_store_evictions_total";
pub const STORE_VERIFY_FAILURES: &str = "hyperbox_store_verify_failures_total";
// Snapshotter.
pub const LAYERS_MOUNTED: &str = "hyperbox_layers_mounted";
// Memory.
pub const MEMORY_BYTES: &str = "hyperbox_memory_bytes";
pub const SNAPSHOT_OPS: &str = "hyperbox_snapshot_operations_total";
pub const SNAPSHOT_OP_ERRORS: &str = "hyperbox_snapshot_operation_errors_total";
/// Layer Prepares that took the ordinary path (downloaded by containerd),
/// by reason.
pub const LAZY_FALLBACKS: &str = "hyperbox_lazy_fallbacks_total";
// Traces and prefetch.
pub const TRACE_SESSIONS: &str = "hyperbox_trace_sessions_total";
pub const TRACE_RUNS_MERGED: &str = "hyperbox_trace_runs_merged_total";
pub const TRACE_REPORTS_DROPPED: &str = "hyperbox_trace_reports_dropped_total";
pub const TRACE_EMPTY_RUNS: &str = "hyperbox_trace_empty_runs_total";
pub const TRACE_SAVE_ERRORS: &str = "hyperbox_trace_save_errors_total";
pub const PREFETCH_JOBS: &str = "hyperbox_prefetch_jobs_total";
pub const PREFETCH_BYTES: &str = "hyperbox_prefetch_bytes_total";
pub const PREFETCH_ERRORS: &str = "hyperbox_prefetch_errors_total";
/// Of the starts that had a prefetch: chunks read, chunks prefetched, and
/// chunks both. Precision is hits/prefetched, recall hits/read (in PromQL,
/// over any window, with `rate` or `increase`).
pub const PREFETCH_JUDGED_READ: &str = "hyperbox_prefetch_judged_read_chunks_total";
pub const PREFETCH_JUDGED_PREFETCHED: &str = "hyperbox_prefetch_judged_prefetched_chunks_total";
pub const PREFETCH_JUDGED_HITS: &str = "hyperbox_prefetch_judged_hit_chunks_total";
/// The same ratios for the latest judged start.
pub const PREFETCH_LAST_PRECISION: &str = "hyperbox_prefetch_last_precision";
pub const PREFETCH_LAST_RECALL: &str = "hyperbox_prefetch_last_recall";

/// Upper bounds of the latency buckets, in seconds: 50 µs (a page of a
/// cached chunk) to 30 s (a registry near its timeout).
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// A latency histogram: lock-free (one atomic add per bucket hit), so it
/// can sit on the FUSE read path.
pub struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative); the last is +Inf.
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram { counts: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1], sum_ns: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&b| s <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// A Prometheus text exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A counter: a count (u64) or seconds (f64).
    pub fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A counter with one label, one sample per label value.
    pub fn counter_by<V: Display>(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, V)]) {
        self.family(name, "counter", help);
        for (v, n) in samples {
            let _ = writeln!(self.out, "{name}{{{label}=\"{}\"}} {n}", escape_label(v));
        }
    }

    /// A latency histogram with one label: cumulative `_bucket` lines with
    /// `le`, then `_sum` and `_count`, per label value.
    pub fn histogram_by(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, HistogramSnapshot)]) {
        self.family(name, "histogram", help);
        for (v, h) in samples {
            let v = escape_label(v);
            let mut cumulative = 0;
            for (i, n) in h.counts.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(self.out, "{name}_bucket{{{label}=\"{v}\",le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(self.out, "{name}_sum{{{label}=\"{v}\"}} {}", h.sum_seconds);
            let _ = writeln!(self.out, "{name}_count{{{label}=\"{v}\"}} {cumulative}");
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A gauge with one label, one sample per label value.
    pub fn gauge_by<V: Display>(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, V)]) {
        self.family(name, "gauge", help);
        for (v, n) in samples {
            let _ = writeln!(self.out, "{name}{{{label}=\"{}\"}} {n}", escape_label(v));
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the text format wants it: `\\`, `"` and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let mut e = Exposition::default();
        e.counter_by(FETCH_REQUESTS, "Range requests.", "priority", &[("demand", 3), ("prefetch", 4)]);
        e.gauge(PREFETCH_LAST_RECALL, "Recall.", 0.5);
        assert_eq!(
            e.finish(),
            "# HELP hyperbox_fetch_requests_total Range requests.\n# TYPE hyperbox_fetch_requests_total counter\n\
             hyperbox_fetch_requests_total{priority=\"demand\"} 3\nhyperbox_fetch_requests_total{priority=\"prefetch\"} 4\n\
             # HELP hyperbox_prefetch_last_recall Recall.\n# TYPE hyperbox_prefetch_last_recall gauge\n\
             hyperbox_prefetch_last_recall 0.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(30)); // first bucket
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(60)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        assert!((s.sum_seconds - 60.00303).abs() < 1e-9, "{}", s.sum_seconds);
        let mut e = Exposition::default();
        e.histogram_by(FUSE_OP_SECONDS, "FUSE.", "op", &[("read", s)]);
        let text = e.finish();
        assert!(text.contains("# TYPE hyperbox_fuse_op_seconds histogram\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_bucket{op=\"read\",le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_bucket{op=\"read\",le=\"0.0025\"} 1\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_bucket{op=\"read\",le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_bucket{op=\"read\",le=\"30\"} 2\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("hyperbox_fuse_op_seconds_count{op=\"read\"} 3\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.counter_by(CONTAINER_FETCH_WAIT_SECONDS, "Wait.", "container", &[("a\"b\\c", 1.5)]);
        assert!(e.finish().ends_with("hyperbox_container_fetch_wait_seconds_total{container=\"a\\\"b\\\\c\"} 1.5\n"));
    }
}
