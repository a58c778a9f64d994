//! The concurrency budget for registry requests: per registry host, with
//! demand first.
//!
//! - **Per host**: at most `per_host` requests run at once against one
//!   registry host (`host[:port]`, a mirror counts as its own host), and at
//!   most `per_host_prefetch` (`min(max_prefetch, per_host - 1)`, at least 1)
//!   of them prefetch. A registry that stalls holds only its own slots: the
//!   other registries' reads go on.
//! - **Global**: at most `max_total` requests at once, all hosts together,
//!   and at most `max_prefetch` of them prefetch, so demand always has slots
//!   of its own, whatever the prefetch and hydration of other images.
//! - **Order**: when a slot frees, the oldest waiting demand request among
//!   the hosts with room takes it; then, within the prefetch caps, the
//!   oldest prefetch request. A waiting request's priority can be raised
//!   after it queued (a demand read joined a prefetch in flight):
//!   [`Scheduler::kick`] then re-dispatches.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::Priority;

pub(crate) struct Scheduler {
    max_total: usize,
    max_prefetch: usize,
    per_host: usize,
    per_host_prefetch: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    running_prefetch: usize,
    /// Order of arrival, to serve the oldest waiter across hosts.
    next_seq: u64,
    /// Hosts with requests running or waiting (dropped when idle).
    hosts: HashMap<String, Host>,
}

#[derive(Default)]
struct Host {
    running: usize,
    running_prefetch: usize,
    /// FIFO queues. A prefetch of many chunks queues thousands of requests,
    /// so every operation is O(hosts) but [`Scheduler::kick`].
    demand: VecDeque<Waiter>,
    prefetch: VecDeque<Waiter>,
}

impl Host {
    fn idle(&self) -> bool {
        self.running == 0 && self.demand.is_empty() && self.prefetch.is_empty()
    }
}

struct Waiter {
    seq: u64,
    prio: Arc<AtomicU8>,
    tx: oneshot::Sender<Permit>,
}

/// A place in a host's queue. Dropping it gives up the place (or the slot).
pub(crate) struct Ticket {
    host: String,
    rx: oneshot::Receiver<Permit>,
}

impl Ticket {
    /// The slot, once granted; `None` only if the scheduler dropped the
    /// place without granting one (it does not while it lives).
    pub(crate) async fn wait(self) -> Option<Permit> {
        self.rx.await.ok()
    }

    /// The host the place is for.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }
}

/// A slot to run one request against one host; freed on drop.
pub(crate) struct Permit {
    sched: Arc<Scheduler>,
    host: String,
    prefetch: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut st = self.sched.state.lock();
            st.running = st.running.saturating_sub(1);
            if self.prefetch {
                st.running_prefetch = st.running_prefetch.saturating_sub(1);
            }
            if let Some(h) = st.hosts.get_mut(&self.host) {
                h.running = h.running.saturating_sub(1);
                if self.prefetch {
                    h.running_prefetch = h.running_prefetch.saturating_sub(1);
                }
                if h.idle() {
                    st.hosts.remove(&self.host);
                }
            }
        }
        self.sched.dispatch();
    }
}

fn is_demand(prio: &AtomicU8) -> bool {
    prio.load(Ordering::Relaxed) >= Priority::Demand as u8
}

impl Scheduler {
    pub(crate) fn new(max_total: usize, max_prefetch: usize, per_host: usize) -> Arc<Self> {
        let max_total = max_total.max(1);
        let max_prefetch = max_prefetch.clamp(1, max_total);
        let per_host = per_host.clamp(1, max_total);
        let per_host_prefetch = max_prefetch.min(per_host.saturating_sub(1)).max(1);
        Arc::new(Self { max_total, max_prefetch, per_host, per_host_prefetch, state: Mutex::default() })
    }

    /// Wait for a slot at `host`. `prio` is read at dispatch time, so
    /// raising it while waiting (then calling [`Scheduler::kick`]) moves the
    /// request ahead.
    #[cfg(test)]
    pub(crate) async fn acquire(self: &Arc<Self>, host: &str, prio: Arc<AtomicU8>) -> Option<Permit> {
        self.enqueue(host, prio).wait().await
    }

    /// Take a place in `host`'s queue now (so requests queue in the order
    /// they were made, not the order their tasks happen to run), and wait
    /// later.
    pub(crate) fn enqueue(self: &Arc<Self>, host: &str, prio: Arc<AtomicU8>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            let h = st.hosts.entry(host.to_string()).or_default();
            if is_demand(&prio) {
                h.demand.push_back(Waiter { seq, prio, tx });
            } else {
                h.prefetch.push_back(Waiter { seq, prio, tx });
            }
        }
        self.dispatch();
        Ticket { host: host.to_string(), rx }
    }

    /// Move waiters whose priority was raised to their host's demand queue,
    /// and dispatch. O(queued prefetch); called only when a demand read
    /// joins a prefetch in flight.
    pub(crate) fn kick(self: &Arc<Self>) {
        {
            let mut st = self.state.lock();
            for h in st.hosts.values_mut() {
                let queued = std::mem::take(&mut h.prefetch);
                for w in queued {
                    if w.tx.is_closed() {
                        continue;
                    }
                    if is_demand(&w.prio) {
                        h.demand.push_back(w);
                    } else {
                        h.prefetch.push_back(w);
                    }
                }
            }
            st.hosts.retain(|_, h| !h.idle());
        }
        self.dispatch();
    }

    /// The host whose oldest live waiter of a kind is the oldest of all
    /// hosts with room for it. Waiters that went away are dropped here.
    fn pick(&self, st: &mut State, demand: bool) -> Option<String> {
        let mut best: Option<(u64, &String)> = None;
        for (name, h) in st.hosts.iter_mut() {
            let room = if demand {
                h.running < self.per_host
            } else {
                h.running < self.per_host && h.running_prefetch < self.per_host_prefetch
            };
            if !room {
                continue;
            }
            let q = if demand { &mut h.demand } else { &mut h.prefetch };
            while q.front().is_some_and(|w| w.tx.is_closed()) {
                q.pop_front();
            }
            if let Some(w) = q.front() {
                if best.is_none_or(|(seq, _)| w.seq < seq) {
                    best = Some((w.seq, name));
                }
            }
        }
        best.map(|(_, name)| name.clone())
    }

    /// Hand free slots to waiters: demand first, then prefetch within its caps.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let (tx, permit) = {
                let mut st = self.state.lock();
                if st.running >= self.max_total {
                    return;
                }
                let (host, demand) = match self.pick(&mut st, true) {
                    Some(h) => (h, true),
                    None if st.running_prefetch < self.max_prefetch => match self.pick(&mut st, false) {
                        Some(h) => (h, false),
                        None => return,
                    },
                    None => return,
                };
                let Some(h) = st.hosts.get_mut(&host) else { return };
                let q = if demand { &mut h.demand } else { &mut h.prefetch };
                let Some(w) = q.pop_front() else { return };
                let prefetch = !is_demand(&w.prio);
                h.running += 1;
                if prefetch {
                    h.running_prefetch += 1;
                }
                st.running += 1;
                if prefetch {
                    st.running_prefetch += 1;
                }
                (w.tx, Permit { sched: self.clone(), host, prefetch })
            };
            // A waiter that went away meanwhile hands the permit back, and
            // its drop dispatches again (outside the lock).
            let _ = tx.send(permit);
        }
    }

    #[cfg(test)]
    fn running(&self) -> (usize, usize) {
        let st = self.state.lock();
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
        let s = Scheduler::new(2, 1, 2);
        let a = s.acquire("r", prio(Priority::Prefetch)).await;
        // The prefetch cap (1) is reached: a second prefetch waits even though a slot is free.
        let s2 = s.clone();
        let p2 = prio(Priority::Prefetch);
        let mut queued_prefetch = tokio::spawn({
            let p2 = p2.clone();
            async move { s2.acquire("r", p2).await }
        });
        tokio::task::yield_now().await;
        assert!(!queued_prefetch.is_finished());
        // Demand is not held back by the prefetch cap.
        let b = s.acquire("r", prio(Priority::Demand)).await;
        assert_eq!(s.running(), (2, 1));
        // Both slots busy: a demand waiter queues behind the prefetch waiter,
        // yet is served first when a slot frees.
        let s3 = s.clone();
        let demand = tokio::spawn(async move { s3.acquire("r", prio(Priority::Demand)).await });
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
        let s = Scheduler::new(1, 1, 1);
        let a = s.acquire("r", prio(Priority::Demand)).await;
        let s2 = s.clone();
        let w = tokio::spawn(async move { s2.acquire("r", prio(Priority::Demand)).await });
        tokio::task::yield_now().await;
        w.abort();
        let _ = w.await;
        drop(a);
        assert_eq!(s.running(), (0, 0), "the cancelled waiter holds a slot");
        let _b = within("a slot, once the only one was freed", s.acquire("r", prio(Priority::Demand))).await;
        assert_eq!(s.running(), (1, 0));
    }

    /// A host whose requests never finish holds its own slots only: another
    /// host's demand and prefetch requests still get slots at once, and
    /// within one host demand keeps a slot prefetch cannot take.
    #[tokio::test]
    async fn a_stalled_host_holds_only_its_own_slots() {
        // 8 in all, 4 prefetch; 3 a host, of which 2 prefetch.
        let s = Scheduler::new(8, 4, 3);
        let mut stalled = Vec::new();
        for _ in 0..3 {
            stalled.push(within("a slot at the stalled host", s.acquire("stalled", prio(Priority::Demand))).await);
        }
        // More requests for the stalled host wait...
        let queued = s.enqueue("stalled", prio(Priority::Demand));
        let queued_prefetch = s.enqueue("stalled", prio(Priority::Prefetch));
        // ...while another host is served at once, demand and prefetch.
        let d = within("demand at a healthy host", s.acquire("healthy", prio(Priority::Demand))).await;
        let p = within("prefetch at a healthy host", s.acquire("healthy", prio(Priority::Prefetch))).await;
        assert_eq!(s.running(), (5, 1));
        // A host's prefetch stops at its cap (2), leaving demand a slot.
        let p2 = within("a second prefetch", s.acquire("healthy", prio(Priority::Prefetch))).await;
        let mut third = Box::pin(s.acquire("healthy", prio(Priority::Prefetch)));
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut third).await.is_err(), "a third prefetch ran");
        drop(p);
        let p3 = within("the third prefetch, once one ended", third).await;
        drop((d, p2, p3));
        // The stalled host's queue moves when its own slots free.
        drop(stalled.pop());
        let q = within("the stalled host's queued demand", queued.wait()).await;
        assert!(q.is_some());
        drop((q, stalled, queued_prefetch));
        assert_eq!(s.running(), (0, 0));
    }
}
