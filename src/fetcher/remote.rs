//! The fetcher's side of the wire: one planned range request, or one layer
//! index, read from the registry's sources under the [retry policy](super::retry),
//! and verified before anyone sees it.
//!
//! A range request runs in a task of its own ([`Inner::run_group`]): it looks
//! in the store once more, fetches what is still missing in one range,
//! verifies every frame, and stores the chunks; the flights it leads are
//! answered with the data before storing if a demand read waits, else with
//! "stored" after. Every try holds a slot from the [scheduler](super::sched) while
//! it is on the wire, and the policy's deadline starts when the first slot
//! is granted.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::ready::Ready;
use super::retry::Failure;
use super::sched::Ticket;
use super::{FetchError, FlightGuard, Got, Group, Inner, Priority, RemoteLayer, TryError};
use crate::digest::{ChunkId, Digest};
use crate::format::{self, IndexLocation, LayerIndex};
use crate::registry::{RegistryError, Repo};
use crate::store::{StoreError, VerifiedChunk};

/// How the policy takes a registry error.
fn failure(e: &RegistryError) -> Failure {
    if e.is_transient() {
        Failure::Transient
    } else {
        Failure::Permanent
    }
}

impl Inner {
    /// Fetch a group's frames (those the store still lacks) and answer its
    /// flights: with the data, or all with the same error. However the task
    /// ends, its [`FlightGuard`] leaves no flight behind and no waiter
    /// waiting.
    pub(super) async fn run_group(self: Arc<Self>, layer: Arc<RemoteLayer>, host: Arc<str>, g: Group, ticket: Ticket) {
        let (prio, requested) = (g.prio.clone(), g.requested);
        let mut guard = FlightGuard::new(&self, &layer, host, g.leads);
        // A flight that ended between the reader's store lookup and taking
        // the in-flight lock has stored its chunks: look once more.
        // Frames in a gap were never looked up at all. A reader that wants
        // the data of a chunk found here reads it from the store itself.
        let store = self.store.clone();
        let ids: Vec<ChunkId> = guard.leads.iter().map(|l| l.1).collect();
        let n = ids.len();
        let found: Vec<bool> =
            tokio::task::spawn_blocking(move || ids.iter().map(|id| store.contains(id).unwrap_or(false)).collect())
                .await
                .unwrap_or_else(|_| vec![false; n]);
        // Leads still to fetch, by their place in the guard, in blob order.
        let (mut pending, mut stored): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        for (k, found) in found.into_iter().enumerate() {
            if found { &mut stored } else { &mut pending }.push(k);
        }
        // Out of the in-flight map before the answer: the store may evict a
        // chunk before its reader gets to it, and that reader must then
        // fetch it, not join this flight again for the same answer.
        guard.release_leads(&stored);
        for &k in &stored {
            self.n.store_hits.fetch_add(1, Ordering::Relaxed);
            guard.answer(k, Ok(Got::Stored));
        }
        let frame = |k: &usize| guard.leads.get(*k).map(|l| l.0);
        let (Some(first), Some(last)) = (pending.first().and_then(frame), pending.last().and_then(frame)) else {
            return;
        };
        // Until the chunks are stored: the response, then the chunks (and
        // the frames' data while answering).
        let mut held = super::stats::Held::new(&self.n);
        // A prefetch's request slot, kept until its chunks are stored.
        let mut slot = None;
        match self.fetch_verified(&layer, first, last, &prio, requested, ticket, &mut held, &mut slot).await {
            Ok((mut chunks, kept)) => {
                // The data is kept for readers only if a demand read waited
                // as the frames were verified (all or none): those are
                // answered at once, the others once the chunks are stored.
                // Else what a trace's prefetch kept waits for its read.
                if kept {
                    for &k in &pending {
                        let data = frame(&k).and_then(|f| chunks.get(f.checked_sub(first)?)).and_then(|c| c.1.clone());
                        // The guard answers a lead left unanswered with an error.
                        if let Some(data) = data {
                            guard.answer(k, Ok(Got::Data(data)));
                        }
                    }
                } else if let Some(ready) = &self.ready {
                    for (chunk, data) in &mut chunks {
                        if let Some(data) = data.take() {
                            ready.put(chunk.id(), data);
                        }
                    }
                }
                self.n.chunks.fetch_add(chunks.len() as u64, Ordering::Relaxed);
                let chunks: Vec<VerifiedChunk> = chunks.into_iter().map(|c| c.0).collect();
                held.set(chunks.iter().map(|c| c.compressed_len() as u64).sum());
                let store = self.store.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    // A range may hold one chunk several times: stored once.
                    let mut seen = std::collections::HashSet::new();
                    chunks.iter().filter(|c| seen.insert(c.id())).try_for_each(|chunk| store.put(chunk).map(|_| ()))
                })
                .await;
                match stored {
                    Ok(Ok(())) => {}
                    // Readers answered with the data have it; a reader told
                    // "stored" finds the chunk missing and fetches it again.
                    Ok(Err(e)) => {
                        tracing::error!(layer = %layer.name(), error = %e, "could not store fetched chunks")
                    }
                    // The runtime shutting down cancels the task: the
                    // chunks are fetched again by whoever reads them next.
                    Err(e) if e.is_cancelled() => {
                        tracing::info!(layer = %layer.name(), "storing fetched chunks was cancelled: hyperboxd is stopping")
                    }
                    Err(e) => tracing::error!(layer = %layer.name(), error = %e, "storing fetched chunks panicked"),
                }
                if !kept {
                    // Out of the in-flight map first, so that a reader that
                    // finds a chunk missing after all leads a new flight
                    // rather than joining this one again.
                    guard.release();
                    for &k in &pending {
                        guard.answer(k, Ok(Got::Stored));
                    }
                }
            }
            Err(e) => {
                self.n.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "fetch failed");
                guard.release();
                for &k in &pending {
                    guard.answer(k, Err(e.clone()));
                }
            }
        }
    }

    /// Fetch blob frames `first..=last` in one range request and verify each,
    /// from the sources in turn under the retry policy. Returns each frame's
    /// chunk, in order, with its data if a demand read waits on the group
    /// when its frames are verified (then with `true`), or if a trace's
    /// prefetch keeps it for a read to come ([`super::ready`]).
    async fn fetch_verified(
        &self,
        layer: &Arc<RemoteLayer>,
        first: usize,
        last: usize,
        prio: &Arc<AtomicU8>,
        requested: tokio::time::Instant,
        ticket: Ticket,
        held: &mut super::stats::Held<'_>,
        slot: &mut Option<super::sched::Permit>,
    ) -> Result<(Vec<(VerifiedChunk, Option<Bytes>)>, bool), FetchError> {
        let mut ticket = Some(ticket);
        let (start, _) = layer.index.frame_blob_range(first);
        let (_, end) = layer.index.frame_blob_range(last);
        let sources = self.client.pull_sources(&layer.repo);
        let mut tries = self.retry.start(sources.len());
        let mut cause: Option<TryError> = None;
        while let Some(t) = tries.next().await {
            if t.retry {
                self.n.retries.fetch_add(1, Ordering::Relaxed);
            }
            let Some(source) = sources.get(t.source) else { break };
            // A demand read's clock runs from its request: time queued for a
            // slot counts. Prefetch's starts when its first slot is granted
            // (it queues behind demand by design, each request bounded).
            let demand = prio.load(Ordering::Relaxed) >= Priority::Demand as u8;
            if demand {
                tries.deadline_from(requested);
            }
            // Slots are per registry host: the queued ticket is for the
            // first source; a try elsewhere queues at that host.
            let queued = match ticket.take() {
                Some(t) if t.host() == source.registry => t,
                _ => self.sched.enqueue(&source.registry, prio.clone()),
            };
            let permit = if demand {
                let deadline = tries.deadline();
                match tokio::time::timeout_at(deadline, queued.wait()).await {
                    Ok(p) => p,
                    Err(_) => {
                        let before = cause.take().map(Box::new);
                        cause = Some(TryError::Queued { at: source.clone(), ms: self.cfg.timeout_ms, before });
                        tries.failed(Failure::TimedOut);
                        continue;
                    }
                }
            } else {
                queued.wait().await
            };
            let Some(permit) = permit else {
                // The scheduler dropped the place without a slot: cannot
                // happen while the fetcher lives; give up this read.
                break;
            };
            let deadline = tries.deadline();
            let (counter, latency) = if prio.load(Ordering::Relaxed) >= Priority::Demand as u8 {
                (&self.n.demand_requests, &self.n.demand_latency)
            } else {
                (&self.n.prefetch_requests, &self.n.prefetch_latency)
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let sent = tokio::time::Instant::now();
            let answer =
                tokio::time::timeout_at(deadline, self.client.get_blob_range(source, &layer.blob, start, end - start))
                    .await;
            latency.observe(sent.elapsed());
            // A demand read's slot is free for the next read as soon as the
            // body is here. Prefetch keeps its slot until its chunks are
            // stored (`slot`): a registry faster than the store would
            // otherwise pile up verified data waiting for RocksDB (three
            // images hydrating at once took hyperboxd to 479 MiB).
            let permit = match prio.load(Ordering::Relaxed) >= Priority::Demand as u8 {
                true => {
                    drop(permit);
                    None
                }
                false => Some(permit),
            };
            let bytes = match answer {
                Err(_) => {
                    self.n.errors.fetch_add(1, Ordering::Relaxed);
                    let before = cause.take().map(Box::new);
                    cause = Some(TryError::TimedOut { from: source.clone(), ms: self.cfg.timeout_ms, before });
                    tries.failed(Failure::TimedOut);
                    continue;
                }
                Ok(Err(e)) => {
                    self.n.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(layer = %layer.name(), source = %source, error = %e, "range request failed");
                    tries.failed(failure(&e));
                    cause = Some(e.into());
                    continue;
                }
                Ok(Ok(b)) => {
                    held.set(b.len() as u64);
                    b
                }
            };
            self.n.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let keep = prio.load(Ordering::Relaxed) >= Priority::Demand as u8;
            let ready = self.ready.clone().filter(|_| !keep);
            match verify_frames(layer.clone(), first, last, start, bytes, keep, ready).await {
                Ok(chunks) => {
                    *slot = permit;
                    return Ok((chunks, keep));
                }
                Err((frame, e)) => {
                    self.n.errors.fetch_add(1, Ordering::Relaxed);
                    self.n.verify_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(layer = %layer.name(), source = %source, frame, error = %e, "fetched bytes failed verification");
                    cause = Some(TryError::Chunk { from: source.clone(), frame, error: Arc::new(e) });
                    // Tried again like a transient failure: a mirror has one
                    // try, so the next source serves; the registry is retried.
                    tries.failed(Failure::Transient);
                }
            }
        }
        Err(FetchError::Remote {
            layer: layer.name(),
            chunk: layer.index.frames().get(first).id,
            offset: start,
            len: end - start,
            attempts: tries.made(),
            elapsed_ms: tries.elapsed().as_millis() as u64,
            cause: cause.unwrap_or(TryError::NotTried { at: layer.repo.clone() }),
        })
    }

    /// Fetch a layer's index from the sources in turn under the retry
    /// policy, verify it against `loc`'s digest and keep it in the store.
    /// One range request when nothing fails. Not scheduled: an index is
    /// fetched once per layer, while `Prepare` waits.
    pub(super) async fn fetch_index(
        &self,
        repo: &Repo,
        blob: &Digest,
        loc: &IndexLocation,
    ) -> Result<LayerIndex, FetchError> {
        let sources = self.client.pull_sources(repo);
        let mut tries = self.retry.start(sources.len());
        let mut cause: Option<TryError> = None;
        while let Some(t) = tries.next().await {
            let Some(source) = sources.get(t.source) else { break };
            let deadline = tries.deadline();
            let got =
                tokio::time::timeout_at(deadline, self.client.get_blob_range(source, blob, loc.offset, loc.length))
                    .await;
            let frame = match got {
                Err(_) => {
                    let before = cause.take().map(Box::new);
                    cause = Some(TryError::TimedOut { from: source.clone(), ms: self.cfg.timeout_ms, before });
                    tries.failed(Failure::TimedOut);
                    continue;
                }
                Ok(Err(e)) => {
                    tries.failed(failure(&e));
                    cause = Some(e.into());
                    continue;
                }
                Ok(Ok(frame)) => frame,
            };
            match self.store.put_index(blob, loc, &frame) {
                Ok(index) => return Ok(index),
                Err(e) => {
                    // Wrong bytes: a mirror is left for the next source, the
                    // registry is retried.
                    cause = Some(TryError::Index { from: source.clone(), error: Arc::new(e) });
                    tries.failed(Failure::Transient);
                }
            }
        }
        Err(FetchError::Index {
            layer: format!("{repo}@{blob}"),
            cause: cause.unwrap_or(TryError::NotTried { at: repo.clone() }),
        })
    }
}

/// Split a response into frames and verify each (decompress and hash), off
/// the runtime; the decompressed data is kept if `keep`, or for the frames
/// `ready` wants, else dropped frame by frame. Any frame failing fails the
/// whole response: the frame, and why.
async fn verify_frames(
    layer: Arc<RemoteLayer>,
    first: usize,
    last: usize,
    start: u64,
    bytes: Vec<u8>,
    keep: bool,
    ready: Option<Arc<Ready>>,
) -> Result<Vec<(VerifiedChunk, Option<Bytes>)>, (usize, StoreError)> {
    let verified = tokio::task::spawn_blocking(move || {
        (first..=last)
            .map(|i| {
                let f = layer.index.frames().get(i);
                let (s, e) = layer.index.frame_blob_range(i);
                // The response is exactly the range's bytes (checked by the
                // registry client), and the frames lie inside it.
                let piece = usize::try_from(s - start)
                    .ok()
                    .zip(usize::try_from(e - start).ok())
                    .and_then(|(a, b)| bytes.get(a..b))
                    .ok_or_else(|| {
                        let got = format::FrameError::CompressedLength { got: bytes.len(), want: f.c_len };
                        (i, StoreError::Verify { id: f.id, problem: got })
                    })?;
                let keep = keep || ready.as_ref().is_some_and(|r| r.wants(&f.id, f.u_len as u64));
                VerifiedChunk::verify(f.id, f.u_len, piece.to_vec())
                    .map(|(chunk, data)| (chunk, keep.then(|| Bytes::from(data))))
                    .map_err(|e| (i, e))
            })
            .collect()
    })
    .await;
    // A panic in verification (a bug in a decoder) fails this response
    // like bad bytes do, rather than the task.
    // A task cancelled (the runtime shutting down) did not verify anything.
    verified.unwrap_or_else(|e| {
        let problem = FetchError::joined("verification", e).to_string();
        Err((first, StoreError::Corrupt { path: "(fetched bytes)".into(), problem }))
    })
}
