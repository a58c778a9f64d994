//! The concurrency budget for registry requests, with demand first.
//!
//! At most `max_total` requests run at once, and at most `max_prefetch` of
//! them on behalf of prefetch, so demand always has slots of its own. When a
//! slot frees, a waiting demand request takes it before any prefetch request.
//! A waiting request's priority can be raised after it queued (a demand read
//! joined a prefetch in flight): [`Scheduler::kick`] then re-dispatches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::Priority;

pub(crate) struct Scheduler {
    max_total: usize,
    max_prefetch: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    running_prefetch: usize,
    /// FIFO queues. A prefetch of many chunks queues thousands of requests,
    /// so every operation is O(1) but [`Scheduler::kick`].
    demand: VecDeque<Waiter>,
    prefetch: VecDeque<Waiter>,
}

struct Waiter {
    prio: Arc<AtomicU8>,
    tx: oneshot::Sender<Permit>,
}

/// A place in the queue. Dropping it gives up the place (or the slot).
pub(crate) struct Ticket(oneshot::Receiver<Permit>);

impl Ticket {
    pub(crate) async fn wait(self) -> Permit {
        self.0.await.expect("the scheduler outlives its waiters")
    }
}

/// A slot to run one request; freed on drop.
pub(crate) struct Permit {
    sched: Arc<Scheduler>,
    prefetch: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut st = self.sched.state.lock().unwrap();
            st.running -= 1;
            if self.prefetch {
                st.running_prefetch -= 1;
            }
        }
        self.sched.dispatch();
    }
}

impl Scheduler {
    pub(crate) fn new(max_total: usize, max_prefetch: usize) -> Arc<Self> {
        let max_total = max_total.max(1);
        Arc::new(Self { max_total, max_prefetch: max_prefetch.clamp(1, max_total), state: Mutex::default() })
    }

    /// Wait for a slot. `prio` is read at dispatch time, so raising it while
    /// waiting (then calling [`Scheduler::kick`]) moves the request ahead.
    pub(crate) async fn acquire(self: &Arc<Self>, prio: Arc<AtomicU8>) -> Permit {
        self.enqueue(prio).wait().await
    }

    /// Take a place in the queue now (so requests queue in the order they
    /// were made, not the order their tasks happen to run), and wait later.
    pub(crate) fn enqueue(self: &Arc<Self>, prio: Arc<AtomicU8>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().unwrap();
            if prio.load(Ordering::Relaxed) >= Priority::Demand as u8 {
                st.demand.push_back(Waiter { prio, tx });
            } else {
                st.prefetch.push_back(Waiter { prio, tx });
            }
        }
        self.dispatch();
        Ticket(rx)
    }

    /// Move waiters whose priority was raised to the demand queue, and
    /// dispatch. O(queued prefetch); called only when a demand read joins a
    /// prefetch in flight.
    pub(crate) fn kick(self: &Arc<Self>) {
        {
            let mut st = self.state.lock().unwrap();
            let queued = std::mem::take(&mut st.prefetch);
            for w in queued {
                if w.tx.is_closed() {
                    continue;
                }
                if w.prio.load(Ordering::Relaxed) >= Priority::Demand as u8 {
                    st.demand.push_back(w);
                } else {
                    st.prefetch.push_back(w);
                }
            }
        }
        self.dispatch();
    }

    /// Hand free slots to waiters: demand first, then prefetch within its cap.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let (tx, permit) = {
                let mut st = self.state.lock().unwrap();
                if st.running >= self.max_total {
                    return;
                }
                // Waiters that went away are skipped here, lazily.
                let w = loop {
                    let next = match st.demand.pop_front() {
                        Some(w) => Some(w),
                        None if st.running_prefetch < self.max_prefetch => st.prefetch.pop_front(),
                        None => None,
                    };
                    match next {
                        Some(w) if w.tx.is_closed() => continue,
                        other => break other,
                    }
                };
                let Some(w) = w else { return };
                let prefetch = w.prio.load(Ordering::Relaxed) < Priority::Demand as u8;
                st.running += 1;
                if prefetch {
                    st.running_prefetch += 1;
                }
                (w.tx, Permit { sched: self.clone(), prefetch })
            };
            // A waiter that went away meanwhile hands the permit back, and
            // its drop dispatches again (outside the lock).
            let _ = tx.send(permit);
        }
    }

    #[cfg(test)]
    fn running(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap();
        (st.running, st.running_prefetch)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use super::*;

    fn prio(p: Priority) -> Arc<AtomicU8> {
        Arc::new(AtomicU8::new(p as u8))
    }

    /// `fut`'s output, or a failure saying what never came: a scheduler that
    /// loses a slot or a waiter shows as a wait without end.
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(Duration::from_secs(5), fut).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: still waiting after 5 s"),
        }
    }

    #[tokio::test]
    async fn demand_goes_first_and_prefetch_is_capped() {
        let s = Scheduler::new(2, 1);
        let a = s.acquire(prio(Priority::Prefetch)).await;
        // The prefetch cap (1) is reached: a second prefetch waits even though a slot is free.
        let s2 = s.clone();
        let p2 = prio(Priority::Prefetch);
        let mut queued_prefetch = tokio::spawn({
            let p2 = p2.clone();
            async move { s2.acquire(p2).await }
        });
        tokio::task::yield_now().await;
        assert!(!queued_prefetch.is_finished());
        // Demand is not held back by the prefetch cap.
        let b = s.acquire(prio(Priority::Demand)).await;
        assert_eq!(s.running(), (2, 1));
        // Both slots busy: a demand waiter queues behind the prefetch waiter,
        // yet is served first when a slot frees.
        let s3 = s.clone();
        let demand = tokio::spawn(async move { s3.acquire(prio(Priority::Demand)).await });
        tokio::task::yield_now().await;
        drop(b);
        let c = within("the demand waiter, after a slot freed", demand).await.unwrap();
        assert!(!queued_prefetch.is_finished());
        // Raising the queued prefetch to demand lets it past the cap.
        drop(c);
        p2.store(Priority::Demand as u8, Ordering::Relaxed);
        s.kick();
        let d = within("the raised prefetch waiter, after kick", &mut queued_prefetch).await.unwrap();
        assert_eq!(s.running(), (2, 1));
        drop((a, d));
        assert_eq!(s.running(), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_leak_its_slot() {
        let s = Scheduler::new(1, 1);
        let a = s.acquire(prio(Priority::Demand)).await;
        let s2 = s.clone();
        let w = tokio::spawn(async move { s2.acquire(prio(Priority::Demand)).await });
        tokio::task::yield_now().await;
        w.abort();
        let _ = w.await;
        drop(a);
        assert_eq!(s.running(), (0, 0), "the cancelled waiter holds a slot");
        let _b = within("a slot, once the only one was freed", s.acquire(prio(Priority::Demand))).await;
        assert_eq!(s.running(), (1, 0));
    }
}
