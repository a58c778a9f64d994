//! Metric names (one place, as constants) and the Prometheus text format.
//!
//! A leaf: it knows no other module. hyperboxd reads each module's counters
//! and writes them here; `/metrics` serves the text.

use std::fmt::Write;

// Fetcher: registry range requests, split demand and prefetch.
pub const FETCH_REQUESTS: &str = "hyperbox_fetch_requests_total";
pub const FETCH_BYTES: &str = "hyperbox_fetch_bytes_total";
pub const FETCH_CHUNKS: &str = "hyperbox_fetch_chunks_total";
pub const FETCH_RETRIES: &str = "hyperbox_fetch_retries_total";
pub const FETCH_ERRORS: &str = "hyperbox_fetch_errors_total";
pub const FETCH_FAILURES: &str = "hyperbox_fetch_failures_total";
pub const FETCH_VERIFY_FAILURES: &str = "hyperbox_fetch_verify_failures_total";
pub const FETCH_JOINED: &str = "hyperbox_fetch_joined_total";
// Store.
pub const STORE_CHUNKS: &str = "hyperbox_store_chunks";
pub const STORE_BYTES: &str = "hyperbox_store_bytes";
pub const STORE_HITS: &str = "hyperbox_store_hits_total";
pub const STORE_MISSES: &str = "hyperbox_store_misses_total";
pub const STORE_EVICTIONS: &str = "hyperbox_store_evictions_total";
pub const STORE_VERIFY_FAILURES: &str = "hyperbox_store_verify_failures_total";
// Snapshotter.
pub const LAYERS_MOUNTED: &str = "hyperbox_layers_mounted";
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

/// A Prometheus text exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A counter with one label, one sample per value.
    pub fn counter_by(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        self.family(name, "counter", help);
        for (v, n) in samples {
            let _ = writeln!(self.out, "{name}{{{label}=\"{v}\"}} {n}");
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub fn finish(self) -> String {
        self.out
    }
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
}
