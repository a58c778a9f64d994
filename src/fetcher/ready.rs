//! Frames ready for the reads a trace predicts.
//!
//! A traced prefetch fetches the frames a start will read, and verifies
//! each as it arrives (decompress, hash). Without this the data would be
//! dropped once its chunk is stored, and the read would decompress and hash
//! it from the store again: in a traced python start at 1 Gbit/s that
//! second pass was about a sixth of hyperboxd's CPU, on the cores the
//! start itself runs on (docs/benchmarks.md, session 16). Here the verified
//! data waits for its read instead: at most `ready_mb` of it, each frame
//! for at most `ready_secs`. The read takes it, and from then on it is in
//! the frame cache like any frame a read got.
//!
//! Not the frame cache itself: that keeps what reads used last, and a
//! prefetch running ahead of the start would push out the frames the start
//! wants first. Here what does not fit is simply not kept (the store has
//! it), so the frames waiting are those the start reads first, which the
//! prefetch fetches first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::digest::ChunkId;

pub(super) struct Ready {
    cap: u64,
    ttl: Duration,
    state: Mutex<State>,
    /// A task drops expired frames while any wait ([`Ready::expect`]).
    pruning: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Chunks a trace says a read is coming for, and since when.
    expected: HashMap<ChunkId, Instant>,
    /// The verified data of those fetched so far, waiting for that read.
    data: HashMap<ChunkId, Bytes>,
    bytes: u64,
}

impl State {
    /// `id` is expected, holds nothing yet, and `len` more bytes fit in `cap`.
    fn fits(&self, id: &ChunkId, len: u64, cap: u64) -> bool {
        self.expected.contains_key(id) && !self.data.contains_key(id) && self.bytes + len <= cap
    }

    /// Forget expectations older than `ttl`, and their data.
    fn prune(&mut self, now: Instant, ttl: Duration) {
        let (data, mut freed) = (&mut self.data, 0u64);
        self.expected.retain(|id, at| {
            let live = now.saturating_duration_since(*at) < ttl;
            if !live {
                freed += data.remove(id).map_or(0, |d| d.len() as u64);
            }
            live
        });
        self.bytes -= freed;
    }
}

impl Ready {
    /// At most `mb` MiB, each frame kept `secs` seconds; none for 0 MiB.
    pub(super) fn new(mb: u64, secs: u64) -> Option<Arc<Ready>> {
        (mb > 0).then(|| {
            Arc::new(Ready {
                cap: mb << 20,
                ttl: Duration::from_secs(secs.max(1)),
                state: Mutex::default(),
                pruning: AtomicBool::new(false),
            })
        })
    }

    /// Reads of these chunks are coming: keep their data when fetched.
    pub(super) fn expect(self: &Arc<Self>, ids: impl IntoIterator<Item = ChunkId>) {
        let now = Instant::now();
        {
            let mut s = self.state.lock();
            s.prune(now, self.ttl);
            s.expected.extend(ids.into_iter().map(|id| (id, now)));
            if s.expected.is_empty() {
                return;
            }
        }
        // Expired frames go even if nothing comes to call us again.
        if !self.pruning.swap(true, Ordering::AcqRel) {
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                self.pruning.store(false, Ordering::Release);
                return;
            };
            let this = self.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(this.ttl / 2).await;
                    let mut s = this.state.lock();
                    s.prune(Instant::now(), this.ttl);
                    if s.expected.is_empty() {
                        this.pruning.store(false, Ordering::Release);
                        break;
                    }
                }
            });
        }
    }

    /// Whether a frame being verified now is to be kept: a read of it is
    /// expected, and its `len` bytes fit.
    pub(super) fn wants(&self, id: &ChunkId, len: u64) -> bool {
        self.state.lock().fits(id, len, self.cap)
    }

    /// Keep a verified frame for its read, if still wanted and it fits.
    pub(super) fn put(&self, id: ChunkId, data: Bytes) {
        let mut s = self.state.lock();
        let len = data.len() as u64;
        if s.fits(&id, len, self.cap) {
            s.bytes += len;
            s.data.insert(id, data);
        }
    }

    /// A read of `ids`: where `out` has nothing yet, the data waiting for
    /// it. Either way the read has come, so nothing is kept for those ids
    /// any more. Returns how many were filled. One lock, and none of the
    /// work while nothing is expected (a read's usual case).
    pub(super) fn take_into(&self, ids: &[ChunkId], out: &mut [Option<Bytes>]) -> u64 {
        let mut s = self.state.lock();
        if s.expected.is_empty() {
            return 0;
        }
        let mut taken = 0;
        for (o, id) in out.iter_mut().zip(ids).filter(|(o, _)| o.is_none()) {
            if s.expected.remove(id).is_some() {
                if let Some(data) = s.data.remove(id) {
                    s.bytes -= data.len() as u64;
                    *o = Some(data);
                    taken += 1;
                }
            }
        }
        taken
    }

    /// Bytes of data waiting.
    pub(super) fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    /// One read of one frame.
    fn take(r: &Ready, id: ChunkId) -> Option<Bytes> {
        let mut out = [None];
        r.take_into(&[id], &mut out);
        out[0].take()
    }

    fn is_idle(r: &Ready) -> bool {
        r.state.lock().expected.is_empty()
    }

    #[test]
    fn only_expected_frames_that_fit_wait_and_a_read_takes_them_once() {
        let r = Ready::new(1, 60).unwrap();
        let big = Bytes::from(vec![7u8; 600 << 10]);
        r.put(id(1), big.clone());
        assert_eq!(r.bytes(), 0, "nothing was expected");
        r.expect([id(1), id(2), id(3)]);
        assert!(r.wants(&id(1), big.len() as u64));
        r.put(id(1), big.clone());
        assert_eq!(r.bytes(), 600 << 10);
        assert!(!r.wants(&id(2), big.len() as u64), "two would pass 1 MiB");
        r.put(id(2), big.clone());
        assert_eq!(r.bytes(), 600 << 10, "it did not fit");
        r.put(id(3), Bytes::from_static(b"small"));
        assert_eq!(take(&r, id(1)).as_deref(), Some(&big[..]));
        assert_eq!(take(&r, id(1)), None, "taken once");
        assert_eq!(take(&r, id(2)), None);
        // The read of 2 came: fetched later, it is not kept.
        assert!(!r.wants(&id(2), 1));
        assert_eq!(take(&r, id(3)).as_deref(), Some(&b"small"[..]));
        assert_eq!(r.bytes(), 0);
        assert!(is_idle(&r));
    }

    #[test]
    fn frames_nobody_reads_go_after_their_time() {
        let r = Ready::new(1, 1).unwrap();
        r.expect([id(1)]);
        r.put(id(1), Bytes::from_static(b"data"));
        let mut s = r.state.lock();
        s.prune(Instant::now() + Duration::from_secs(2), r.ttl);
        assert_eq!((s.bytes, s.data.len(), s.expected.len()), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_task_drops_them_when_nothing_else_comes() {
        let r = Ready::new(1, 1).unwrap();
        r.expect([id(1)]);
        r.put(id(1), Bytes::from_static(b"data"));
        assert_eq!(r.bytes(), 4);
        // The task looks every half second; the frame's second is up at 1 s
        // (polled: a loaded machine may wake it late).
        let start = Instant::now();
        while r.pruning.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(900), "not before its time");
        assert!(!r.pruning.load(Ordering::Acquire), "the task ended");
        assert_eq!(r.bytes(), 0);
        assert!(is_idle(&r));
    }
}
