//! The admin API's server side (the wire types and the client are in
//! `crate::admin`): traces, stats, mounted layers, prefetch and gc, over
//! the node's parts. Errors become gRPC status codes in `super::status`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{status, Node};
use crate::admin::proto::admin_server::{Admin, AdminServer};
use crate::admin::{proto, MAX_MESSAGE};
use crate::digest::Digest;
use crate::trace::{self, Trace};

pub struct AdminService {
    node: Arc<Node>,
}

/// The service, ready for `tonic::transport::Server::add_service`.
pub fn server(node: Arc<Node>) -> AdminServer<AdminService> {
    AdminServer::new(AdminService { node })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl From<&Trace> for proto::TraceSummary {
    fn from(t: &Trace) -> Self {
        proto::TraceSummary {
            image: t.image.clone(),
            repository: t.repository.clone(),
            runs: t.runs,
            entries: t.entries.len() as u64,
            bytes: t.bytes(),
            updated: t.updated,
            last_start: t.last_start.as_ref().map(|r| proto::StartReport {
                at: r.at,
                read: r.read,
                prefetched: r.prefetched,
                hits: r.hits,
                precision: r.precision,
                recall: r.recall,
            }),
        }
    }
}

fn image_digest(image: &str) -> Result<String, Status> {
    image.parse::<Digest>().map(|d| d.to_string()).map_err(status::not_a_digest)
}

/// Run store and snapshotter work off the async runtime; its error becomes
/// a status the one way `status` says.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(status::join)?.map_err(Into::into)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_traces(
        &self,
        _: Request<proto::ListTracesRequest>,
    ) -> Result<Response<proto::ListTracesResponse>, Status> {
        let store = self.node.store.clone();
        let mut traces = blocking(move || trace::list(&store)).await?;
        traces.sort_by(|a, b| (&a.repository, b.updated).cmp(&(&b.repository, a.updated)));
        Ok(Response::new(proto::ListTracesResponse { traces: traces.iter().map(Into::into).collect() }))
    }

    async fn get_trace(
        &self,
        req: Request<proto::GetTraceRequest>,
    ) -> Result<Response<proto::GetTraceResponse>, Status> {
        let image = image_digest(&req.into_inner().image)?;
        let store = self.node.store.clone();
        let found = {
            let image = image.clone();
            blocking(move || trace::load(&store, &image)).await?
        };
        let t = found.ok_or_else(|| Status::not_found(format!("no trace of image {image}")))?;
        Ok(Response::new(proto::GetTraceResponse { trace_json: t.to_json() }))
    }

    async fn put_trace(
        &self,
        req: Request<proto::PutTraceRequest>,
    ) -> Result<Response<proto::PutTraceResponse>, Status> {
        let t = Trace::from_json(&req.into_inner().trace_json)?;
        let store = self.node.store.clone();
        let summary = (&t).into();
        blocking(move || trace::save(&store, &t)).await?;
        Ok(Response::new(proto::PutTraceResponse { summary: Some(summary) }))
    }

    async fn delete_trace(
        &self,
        req: Request<proto::DeleteTraceRequest>,
    ) -> Result<Response<proto::DeleteTraceResponse>, Status> {
        let image = image_digest(&req.into_inner().image)?;
        let store = self.node.store.clone();
        let deleted = blocking(move || trace::delete(&store, &image)).await?;
        Ok(Response::new(proto::DeleteTraceResponse { deleted }))
    }

    async fn stats(&self, _: Request<proto::StatsRequest>) -> Result<Response<proto::StatsResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let node = &self.node;
        let (f, s, p) = (node.fetcher.stats(), node.store.stats(), &node.prefetcher.stats);
        Ok(Response::new(proto::StatsResponse {
            demand_requests: f.demand_requests,
            prefetch_requests: f.prefetch_requests,
            fetched_bytes: f.bytes,
            fetch_errors: f.errors,
            fetch_failures: f.failures,
            fetch_wait_seconds: node.fetcher.wait_seconds(),
            store_chunks: s.chunks,
            store_bytes: s.bytes,
            store_budget_bytes: node.store.budget_bytes(),
            store_hits: s.hits,
            store_misses: s.misses,
            store_evictions: s.evictions,
            store_verify_failures: s.verify_failures,
            layers_mounted: node.snapshotter.mounted_layers() as u64,
            prefetch_jobs: p.jobs.load(Relaxed),
            prefetch_bytes: p.bytes.load(Relaxed),
            prefetch_errors: p.errors.load(Relaxed),
            trace_sessions: node.recorder.as_ref().map_or(0, |r| r.stats.sessions.load(Relaxed)),
            frame_cache_hits: f.cache_hits,
            ready_frame_hits: f.ready_hits,
        }))
    }

    async fn list_layers(
        &self,
        _: Request<proto::ListLayersRequest>,
    ) -> Result<Response<proto::ListLayersResponse>, Status> {
        let snap = self.node.snapshotter.clone();
        let layers = blocking(move || Ok::<_, Status>(snap.layers())).await?;
        Ok(Response::new(proto::ListLayersResponse {
            layers: layers
                .into_iter()
                .map(|l| proto::Layer {
                    key: l.key,
                    blob: l.blob,
                    repository: l.repository,
                    mountpoint: l.mountpoint.display().to_string(),
                    frames: l.frames,
                    frames_local: l.frames_local,
                    bytes: l.bytes,
                    bytes_local: l.bytes_local,
                })
                .collect(),
        }))
    }

    async fn prefetch(
        &self,
        req: Request<proto::PrefetchRequest>,
    ) -> Result<Response<proto::PrefetchResponse>, Status> {
        let req = req.into_inner();
        let image = image_digest(&req.image)?;
        let snap = self.node.snapshotter.clone();
        let layers = blocking(move || snap.prefetch(&image, req.hydrate)).await?;
        Ok(Response::new(proto::PrefetchResponse { layers: layers as u32 }))
    }

    async fn pull_token(
        &self,
        _: Request<proto::PullTokenRequest>,
    ) -> Result<Response<proto::PullTokenResponse>, Status> {
        Ok(Response::new(proto::PullTokenResponse { token: self.node.pull_token.clone() }))
    }

    async fn fallbacks(
        &self,
        req: Request<proto::FallbacksRequest>,
    ) -> Result<Response<proto::FallbacksResponse>, Status> {
        let req = req.into_inner();
        let kept = self.node.snapshotter.fallbacks();
        let found = if req.key.is_empty() {
            kept.recent(if req.max == 0 { usize::MAX } else { req.max as usize })
        } else {
            kept.find(&req.namespace, &req.key).into_iter().collect()
        };
        let fallbacks = found
            .into_iter()
            .map(|f| proto::Fallback {
                key: f.key,
                target: f.target,
                registry: f.registry.unwrap_or_default(),
                reason: f.why.reason.label().to_string(),
                meaning: f.why.reason.meaning().to_string(),
                detail: f.why.detail,
                unix_seconds: f.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
            })
            .collect();
        Ok(Response::new(proto::FallbacksResponse { fallbacks }))
    }

    async fn gc(&self, _: Request<proto::GcRequest>) -> Result<Response<proto::GcResponse>, Status> {
        let snap = self.node.snapshotter.clone();
        let r = blocking(move || snap.gc()).await?;
        Ok(Response::new(proto::GcResponse {
            indexes_removed: r.indexes_removed,
            chunks_removed: r.chunks_removed,
            bytes_freed: r.bytes_freed,
        }))
    }
}
