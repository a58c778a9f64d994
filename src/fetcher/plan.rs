//! The coalescing planner: which range requests fetch a set of frames.
//!
//! Pure arithmetic on blob offsets: no network, no runtime, no store. Frames
//! are added in blob order (each after every frame added before it), and
//! each one either joins the request being built or starts the next one. It
//! joins while both rules hold:
//!
//! - **the gap**: the bytes between the end of the request so far and the
//!   start of the frame are at most `coalesce_gap_bytes` (a traced prefetch
//!   chooses its own, `prefetch.gap_pct`). The frames in the
//!   gap come along in the same response (they are verified and stored too);
//! - **the size**: the request, from its first byte to the end of the frame,
//!   stays within `max_request_bytes`. A single frame larger than that is
//!   still one request of its own.
//!
//! `max_request_bytes = 0` turns coalescing off: every frame is a request.
//!
//! The fetcher adds frames one at a time ([`Planner::add`]) because, between
//! two of its frames, it may learn that a frame it was about to add already
//! came along in a gap (another frame holds the same chunk) and skip it.
//! `plan` (in tests) adds a whole list at once.

use std::ops::Range;

/// The two coalescing rules' limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rules {
    /// `coalesce_gap_bytes`, or a traced prefetch's own (`prefetch.gap_pct`).
    pub gap: u64,
    /// `max_request_bytes`; 0 turns coalescing off.
    pub max: u64,
}

/// One range request: blob frames `first..=last`, and the bytes from the
/// start of `first` to the end of `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub first: usize,
    pub last: usize,
}

/// Where an added frame went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Added {
    /// The index of its request in [`Planner::requests`].
    pub request: usize,
    /// Frames between the request's previous last frame and this one, which
    /// come along in the response; empty when the frame started a request.
    pub gap: Range<usize>,
}

/// Builds requests from frames added in blob order. `range(i)` is frame
/// `i`'s byte range `[start, end)` in the blob; frames do not overlap, and a
/// higher index is further into the blob.
pub(crate) struct Planner<F> {
    rules: Rules,
    range: F,
    requests: Vec<Request>,
}

impl<F: Fn(usize) -> (u64, u64)> Planner<F> {
    pub(crate) fn new(rules: Rules, range: F) -> Self {
        Planner { rules, range, requests: Vec::new() }
    }

    /// Add `frame`, which must come after every frame added so far.
    pub(crate) fn add(&mut self, frame: usize) -> Added {
        let (start, end) = (self.range)(frame);
        if let Some(r) = self.requests.last_mut() {
            debug_assert!(frame > r.last, "frames are added in blob order: {frame} after {}", r.last);
            let (r_start, _) = (self.range)(r.first);
            let (_, r_end) = (self.range)(r.last);
            let (gap, size) = (start.saturating_sub(r_end), end.saturating_sub(r_start));
            if self.rules.max > 0 && gap <= self.rules.gap && size <= self.rules.max {
                let gap = r.last + 1..frame;
                r.last = frame;
                return Added { request: self.requests.len() - 1, gap };
            }
        }
        self.requests.push(Request { first: frame, last: frame });
        Added { request: self.requests.len() - 1, gap: frame..frame }
    }

    /// The requests so far, in blob order.
    #[cfg(test)]
    pub(crate) fn requests(&self) -> &[Request] {
        &self.requests
    }
}

/// The requests that fetch `frames` (ascending, distinct frame indices).
#[cfg(test)]
pub(crate) fn plan(frames: &[usize], range: impl Fn(usize) -> (u64, u64), rules: Rules) -> Vec<Request> {
    let mut p = Planner::new(rules, range);
    for &f in frames {
        p.add(f);
    }
    p.requests
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames laid end to end with these compressed sizes, from offset 0.
    fn layout(sizes: &[u64]) -> impl Fn(usize) -> (u64, u64) {
        let mut starts = vec![0u64];
        for s in sizes {
            starts.push(starts.last().unwrap() + s);
        }
        move |i| (starts[i], starts[i + 1])
    }

    fn req(first: usize, last: usize) -> Request {
        Request { first, last }
    }

    // Ten frames of 100 bytes: frame i is bytes [100 i, 100 i + 100).
    const TEN: [u64; 10] = [100; 10];

    #[test]
    fn adjacent_frames_fill_requests_up_to_the_size_limit() {
        // 300 bytes a request: frames 0-2 (0..300), 3-5 (300..600), 6-8, then 9.
        let got = plan(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], layout(&TEN), Rules { gap: 0, max: 300 });
        assert_eq!(got, [req(0, 2), req(3, 5), req(6, 8), req(9, 9)]);
        // 250 bytes: only two frames fit (0..200; a third would end at 300).
        let got = plan(&[0, 1, 2, 3, 4], layout(&TEN), Rules { gap: 0, max: 250 });
        assert_eq!(got, [req(0, 1), req(2, 3), req(4, 4)]);
    }

    #[test]
    fn a_gap_within_the_limit_is_bridged() {
        // Frames 0, 2 and 5: 100 bytes (frame 1) between 0 and 2, 200 bytes
        // (frames 3 and 4) between 2 and 5.
        let frames = [0, 2, 5];
        // A gap of 100 is allowed: 0 and 2 go together; 200 is too far.
        assert_eq!(plan(&frames, layout(&TEN), Rules { gap: 100, max: 10_000 }), [req(0, 2), req(5, 5)]);
        // 99 bridges nothing.
        assert_eq!(plan(&frames, layout(&TEN), Rules { gap: 99, max: 10_000 }), [req(0, 0), req(2, 2), req(5, 5)]);
        // 200 bridges both.
        assert_eq!(plan(&frames, layout(&TEN), Rules { gap: 200, max: 10_000 }), [req(0, 5)]);
        // The gap's bytes count against the size: 0..600 is over 500.
        assert_eq!(plan(&frames, layout(&TEN), Rules { gap: 200, max: 500 }), [req(0, 2), req(5, 5)]);
    }

    #[test]
    fn a_frame_larger_than_the_limit_is_a_request_of_its_own() {
        // Sizes 100, 1000, 100, 100: frame 1 alone is over the 300 limit.
        let range = layout(&[100, 1000, 100, 100]);
        let got = plan(&[0, 1, 2, 3], range, Rules { gap: 0, max: 300 });
        assert_eq!(got, [req(0, 0), req(1, 1), req(2, 3)]);
    }

    #[test]
    fn zero_max_request_bytes_is_one_frame_a_request() {
        let got = plan(&[0, 1, 2, 4], layout(&TEN), Rules { gap: 1 << 20, max: 0 });
        assert_eq!(got, [req(0, 0), req(1, 1), req(2, 2), req(4, 4)]);
    }

    #[test]
    fn empty_frames_join_without_growing_the_request() {
        // Frames 1 and 2 hold no bytes (an empty file's frame): 0..=3 is 200 bytes.
        let got = plan(&[0, 1, 2, 3, 4], layout(&[100, 0, 0, 100, 100]), Rules { gap: 0, max: 200 });
        assert_eq!(got, [req(0, 3), req(4, 4)]);
    }

    #[test]
    fn add_reports_the_request_and_the_frames_that_come_along() {
        let range = layout(&TEN);
        let mut p = Planner::new(Rules { gap: 200, max: 400 }, &range);
        assert_eq!(p.add(1), Added { request: 0, gap: 1..1 });
        // Frames 2 and 3 are the gap between 1 and 4 (1..=4 is 400 bytes).
        assert_eq!(p.add(4), Added { request: 0, gap: 2..4 });
        // 1..=5 would be 500 bytes: a new request, nothing comes along.
        assert_eq!(p.add(5), Added { request: 1, gap: 5..5 });
        assert_eq!(p.add(6), Added { request: 1, gap: 6..6 });
        assert_eq!(p.requests(), [req(1, 4), req(5, 6)]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "blob order")]
    fn frames_out_of_order_are_refused() {
        let range = layout(&TEN);
        let mut p = Planner::new(Rules { gap: 0, max: 1000 }, &range);
        p.add(3);
        p.add(2);
    }
}
