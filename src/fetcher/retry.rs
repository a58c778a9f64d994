//! The one retry policy for every registry read the fetcher makes: ranges of
//! chunks and layer indexes alike.
//!
//! - **Sources** are the registry's mirrors in order, then the registry
//!   ([`Client::pull_sources`](crate::registry::Client::pull_sources)). A
//!   mirror gets one try, so a mirror that is down or slow cannot use up the
//!   time the registry (the last source) may need; the registry gets
//!   `attempts`.
//! - **Failures.** A transient one (transport, a stall past
//!   `registry.read_timeout_ms`, 5xx/408/429, a 200 for a range, a short
//!   body, bytes that fail verification) is tried again on the same source
//!   while it has tries left, else on the next source; a permanent one
//!   (another 4xx) moves to the next source at once.
//! - **Backoff** before trying a source again: `backoff_initial_ms`, doubling
//!   up to `backoff_max_ms`, with equal jitter (half fixed, half random), so
//!   readers that failed together do not come back together.
//! - **One deadline**, `timeout_ms`, for the whole read: every try on every
//!   source and the pauses between them. The clock starts with the first
//!   try (the caller says when: a chunk request starts it once it first has
//!   a slot from the scheduler). A try still running at the deadline is cut
//!   off and the read fails; a pause that would end past the deadline is not
//!   taken.
//!
//! The policy decides and the caller makes the tries, so each caller keeps
//! its own counters and messages:
//!
//! ```ignore
//! let mut tries = policy.start(sources.len());
//! while let Some(t) = tries.next().await {          // pauses before a retry
//!     let deadline = tries.deadline();              // starts the clock
//!     match timeout_at(deadline, read(&sources[t.source])).await {
//!         Ok(Ok(v)) => return Ok(v),
//!         Ok(Err(e)) => tries.failed(if e.is_transient() { Failure::Transient } else { Failure::Permanent }),
//!         Err(_) => tries.failed(Failure::TimedOut),
//!     }
//! }
//! ```

use std::time::Duration;

use tokio::time::Instant;

use super::FetchConfig;

/// `attempts`, backoff and `timeout_ms`, from [`FetchConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Tries at the last source (the registry); a mirror gets one.
    pub attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// The whole read's deadline, from its first try.
    pub timeout: Duration,
}

/// How a try failed, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Trying again may help: the same source, after a backoff.
    Transient,
    /// This source will not do: the next one, at once.
    Permanent,
    /// The deadline passed during the try: the read is over.
    TimedOut,
}

/// A try to make: on which source, and whether it follows a failed try on
/// that same source (after a backoff).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Try {
    pub source: usize,
    pub retry: bool,
}

impl RetryPolicy {
    pub(crate) fn new(cfg: &FetchConfig) -> RetryPolicy {
        RetryPolicy {
            attempts: cfg.attempts.max(1),
            backoff_initial: Duration::from_millis(cfg.backoff_initial_ms),
            backoff_max: Duration::from_millis(cfg.backoff_max_ms),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// Tries source `source` of `sources` gets.
    fn tries_on(&self, source: usize, sources: usize) -> u32 {
        if source + 1 == sources {
            self.attempts
        } else {
            1
        }
    }

    /// The pause before retry `retry` (1 for the first) of a source:
    /// exponential, capped, with equal jitter.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        use rand::Rng;
        let initial = self.backoff_initial.as_millis() as u64;
        let exp = initial.saturating_mul(1u64 << retry.saturating_sub(1).min(20));
        let d = exp.min(self.backoff_max.as_millis() as u64).max(1);
        Duration::from_millis(d / 2 + rand::thread_rng().gen_range(0..=d / 2))
    }

    /// Begin a read from `sources` sources.
    pub(crate) fn start(&self, sources: usize) -> Tries<'_> {
        Tries {
            policy: self,
            sources,
            source: 0,
            on_source: 0,
            made: 0,
            failed: None,
            deadline: None,
            began: Instant::now(),
        }
    }
}

/// One read's course through its sources and tries.
pub(crate) struct Tries<'a> {
    policy: &'a RetryPolicy,
    sources: usize,
    /// The source of the latest try, and how many tries it has had.
    source: usize,
    on_source: u32,
    /// Tries made in all.
    made: u32,
    /// How the latest try failed; `None` before the first, or if it was not
    /// reported (it succeeded: there is no next try).
    failed: Option<Failure>,
    deadline: Option<Instant>,
    began: Instant,
}

impl Tries<'_> {
    /// The next try, after a backoff if it retries a source; `None` once the
    /// sources, their tries or the time are used up.
    pub(crate) async fn next(&mut self) -> Option<Try> {
        let retry = match self.failed.take() {
            None if self.made > 0 => return None,
            None => false,
            Some(Failure::TimedOut) => return None,
            Some(Failure::Transient) if self.on_source < self.policy.tries_on(self.source, self.sources) => true,
            Some(Failure::Transient | Failure::Permanent) => {
                self.source += 1;
                self.on_source = 0;
                false
            }
        };
        if self.source >= self.sources {
            return None;
        }
        let pause = if retry { self.policy.backoff(self.on_source) } else { Duration::ZERO };
        if self.deadline.is_some_and(|d| Instant::now() + pause >= d) {
            return None;
        }
        if retry {
            tokio::time::sleep(pause).await;
        }
        self.on_source += 1;
        self.made += 1;
        Some(Try { source: self.source, retry })
    }

    /// The read's deadline, starting the clock if this is the first call.
    pub(crate) fn deadline(&mut self) -> Instant {
        *self.deadline.get_or_insert_with(|| Instant::now() + self.policy.timeout)
    }

    /// Start the clock at `start` (when the read was requested), unless it
    /// runs already.
    pub(crate) fn deadline_from(&mut self, start: Instant) -> Instant {
        *self.deadline.get_or_insert(start + self.policy.timeout)
    }

    /// Report how the latest try failed.
    pub(crate) fn failed(&mut self, how: Failure) {
        self.failed = Some(how);
    }

    /// Tries made so far.
    pub(crate) fn made(&self) -> u32 {
        self.made
    }

    /// Time since [`RetryPolicy::start`], queueing included.
    pub(crate) fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff from `initial_ms` doubling to `max_ms`.
    fn policy(attempts: u32, initial_ms: u64, max_ms: u64, timeout_ms: u64) -> RetryPolicy {
        RetryPolicy {
            attempts,
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// The tries a read makes when every try fails with `how(n)` (n from 0),
    /// as (source, retry, time since start when it began).
    async fn course(p: &RetryPolicy, sources: usize, how: impl Fn(u32) -> Failure) -> Vec<(usize, bool, Duration)> {
        let t0 = Instant::now();
        let mut tries = p.start(sources);
        let mut out = Vec::new();
        while let Some(t) = tries.next().await {
            tries.deadline();
            out.push((t.source, t.retry, t0.elapsed()));
            tries.failed(how(tries.made() - 1));
        }
        assert_eq!(tries.made() as usize, out.len());
        out
    }

    fn shape(course: &[(usize, bool, Duration)]) -> Vec<(usize, bool)> {
        course.iter().map(|&(s, r, _)| (s, r)).collect()
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_half_of_it_random() {
        let p = policy(4, 100, 1_000, 60_000);
        for _ in 0..200 {
            for (retry, base) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1_000), (30, 1_000)] {
                let ms = p.backoff(retry).as_millis() as u64;
                assert!((base / 2..=base).contains(&ms), "retry {retry}: {ms} ms, expected {}..={base}", base / 2);
            }
        }
        assert_eq!(policy(4, 0, 1_000, 60_000).backoff(1), Duration::ZERO);
    }

    #[tokio::test]
    async fn transient_failures_give_each_mirror_one_try_and_the_registry_all() {
        // Two mirrors, then the registry with 3 tries; pauses of 5-10 ms,
        // then 10-20 ms.
        let got = course(&policy(3, 10, 1_000, 60_000), 3, |_| Failure::Transient).await;
        assert_eq!(shape(&got), [(0, false), (1, false), (2, false), (2, true), (2, true)]);
        // Moving on to the next source is at once; a retry waits at least
        // the fixed half of its backoff.
        assert!(got[2].2 < Duration::from_millis(5), "{got:?}");
        assert!(got[3].2 - got[2].2 >= Duration::from_millis(5), "{got:?}");
        assert!(got[4].2 - got[3].2 >= Duration::from_millis(10), "{got:?}");
    }

    #[tokio::test]
    async fn a_permanent_failure_moves_to_the_next_source_at_once() {
        let got = course(&policy(3, 1, 1, 60_000), 2, |_| Failure::Permanent).await;
        assert_eq!(shape(&got), [(0, false), (1, false)]);
        // A transient failure, then a permanent one at the registry: no third try.
        let got = course(&policy(3, 1, 1, 60_000), 1, |n| [Failure::Transient, Failure::Permanent][n as usize]).await;
        assert_eq!(shape(&got), [(0, false), (0, true)]);
    }

    #[tokio::test]
    async fn a_try_cut_off_by_the_deadline_ends_the_read() {
        let got = course(&policy(4, 1, 1, 60_000), 3, |_| Failure::TimedOut).await;
        assert_eq!(shape(&got), [(0, false)]);
    }

    #[tokio::test]
    async fn no_pause_is_taken_past_the_deadline() {
        // Every pause is 100-200 ms and the deadline 90 ms after the first
        // try: the read ends after one try, without sleeping.
        let began = Instant::now();
        let got = course(&policy(10, 200, 200, 90), 1, |_| Failure::Transient).await;
        assert_eq!(shape(&got), [(0, false)]);
        assert!(began.elapsed() < Duration::from_millis(90), "{:?}", began.elapsed());
        // With time to spare, all ten tries are made.
        let got = course(&policy(10, 1, 1, 60_000), 1, |_| Failure::Transient).await;
        assert_eq!(got.len(), 10);
    }

    #[tokio::test]
    async fn the_clock_starts_with_the_first_try_not_before() {
        let p = policy(1, 1, 1, 1_000);
        let mut tries = p.start(2);
        // Queued for a while before the first try: the deadline is 1 s after it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tries.next().await.is_some());
        let began = Instant::now();
        let deadline = tries.deadline();
        assert!(deadline >= began + Duration::from_secs(1), "{deadline:?} {began:?}");
        assert!(deadline <= Instant::now() + Duration::from_secs(1), "{deadline:?}");
        tries.failed(Failure::Permanent);
        // The next source's try keeps the same deadline.
        assert_eq!(tries.next().await, Some(Try { source: 1, retry: false }));
        assert_eq!(tries.deadline(), deadline);
        assert!(tries.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_read_that_succeeds_stops() {
        let p = policy(3, 1, 1, 1_000);
        let mut tries = p.start(1);
        assert_eq!(tries.next().await, Some(Try { source: 0, retry: false }));
        // Not reported as failed: it succeeded.
        assert_eq!(tries.next().await, None);
        assert_eq!(p.start(0).next().await, None, "no sources, no tries");
    }
}
