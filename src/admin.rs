//! hyperboxd's admin gRPC service (proto/hyperbox/admin/v1/admin.proto),
//! served beside containerd's Snapshots service on the daemon's socket;
//! `hyperbox trace ...` is its client. gRPC status codes are chosen here.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::digest::Digest;
use crate::snapshotter::Snapshotter;
use crate::trace::{self, Trace, TraceError};

#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("hyperbox.admin.v1");
}

pub use proto::admin_client::AdminClient;
use proto::admin_server::{Admin, AdminServer};

pub struct AdminService {
    snap: Arc<Snapshotter>,
}

/// Largest message either side takes: a trace of a million chunks is about
/// 270 MB of JSON; this allows a trace.max_entries of about a million.
pub const MAX_MESSAGE: usize = 512 << 20;

/// The service, ready for `tonic::transport::Server::add_service`.
pub fn server(snap: Arc<Snapshotter>) -> AdminServer<AdminService> {
    AdminServer::new(AdminService { snap })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A client of the daemon at `socket`.
pub async fn connect(socket: &Path) -> Result<AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(AdminClient::new(containerd_client::connect(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
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

fn status(e: TraceError) -> Status {
    match e {
        TraceError::Invalid(m) => Status::invalid_argument(m),
        TraceError::Store(e) => Status::internal(e.to_string()),
        TraceError::Registry(e) => Status::unavailable(e),
    }
}

fn image_digest(image: &str) -> Result<String, Status> {
    image
        .parse::<Digest>()
        .map(|d| d.to_string())
        .map_err(|e| Status::invalid_argument(format!("image must be a manifest digest (sha256:...): {e}")))
}

/// Run store work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_traces(
        &self,
        _: Request<proto::ListTracesRequest>,
    ) -> Result<Response<proto::ListTracesResponse>, Status> {
        let store = self.snap.store().clone();
        let mut traces = blocking(move || trace::list(&store).map_err(status)).await?;
        traces.sort_by(|a, b| (&a.repository, b.updated).cmp(&(&b.repository, a.updated)));
        Ok(Response::new(proto::ListTracesResponse { traces: traces.iter().map(Into::into).collect() }))
    }

    async fn get_trace(
        &self,
        req: Request<proto::GetTraceRequest>,
    ) -> Result<Response<proto::GetTraceResponse>, Status> {
        let image = image_digest(&req.into_inner().image)?;
        let store = self.snap.store().clone();
        let t = blocking(move || {
            trace::load(&store, &image)
                .map_err(status)?
                .ok_or_else(|| Status::not_found(format!("no trace of image {image}")))
        })
        .await?;
        Ok(Response::new(proto::GetTraceResponse { trace_json: t.to_json() }))
    }

    async fn put_trace(
        &self,
        req: Request<proto::PutTraceRequest>,
    ) -> Result<Response<proto::PutTraceResponse>, Status> {
        let t = Trace::from_json(&req.into_inner().trace_json).map_err(status)?;
        let store = self.snap.store().clone();
        let summary = (&t).into();
        blocking(move || trace::save(&store, &t).map_err(status)).await?;
        Ok(Response::new(proto::PutTraceResponse { summary: Some(summary) }))
    }

    async fn delete_trace(
        &self,
        req: Request<proto::DeleteTraceRequest>,
    ) -> Result<Response<proto::DeleteTraceResponse>, Status> {
        let image = image_digest(&req.into_inner().image)?;
        let store = self.snap.store().clone();
        let deleted = blocking(move || trace::delete(&store, &image).map_err(status)).await?;
        Ok(Response::new(proto::DeleteTraceResponse { deleted }))
    }

    async fn stats(&self, _: Request<proto::StatsRequest>) -> Result<Response<proto::StatsResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let (f, s, p) = (self.snap.fetcher().stats(), self.snap.store().stats(), &self.snap.prefetcher().stats);
        Ok(Response::new(proto::StatsResponse {
            demand_requests: f.demand_requests,
            prefetch_requests: f.prefetch_requests,
            fetched_bytes: f.bytes,
            fetch_errors: f.errors,
            fetch_failures: f.failures,
            fetch_wait_seconds: self.snap.fetcher().wait_seconds(),
            store_chunks: s.chunks,
            store_bytes: s.bytes,
            store_budget_bytes: self.snap.store().budget_bytes(),
            store_hits: s.hits,
            store_misses: s.misses,
            store_evictions: s.evictions,
            store_verify_failures: s.verify_failures,
            layers_mounted: self.snap.mounted_layers() as u64,
            prefetch_jobs: p.jobs.load(Relaxed),
            prefetch_bytes: p.bytes.load(Relaxed),
            prefetch_errors: p.errors.load(Relaxed),
            trace_sessions: self.snap.recorder().map_or(0, |r| r.stats.sessions.load(Relaxed)),
            frame_cache_hits: f.cache_hits,
        }))
    }

    async fn list_layers(
        &self,
        _: Request<proto::ListLayersRequest>,
    ) -> Result<Response<proto::ListLayersResponse>, Status> {
        let snap = self.snap.clone();
        let layers = blocking(move || Ok(snap.layers())).await?;
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
        let snap = self.snap.clone();
        let layers = blocking(move || snap.prefetch(&image, req.hydrate).map_err(Status::from)).await?;
        Ok(Response::new(proto::PrefetchResponse { layers: layers as u32 }))
    }

    async fn gc(&self, _: Request<proto::GcRequest>) -> Result<Response<proto::GcResponse>, Status> {
        let snap = self.snap.clone();
        let r = blocking(move || snap.gc().map_err(|e| Status::internal(e.to_string()))).await?;
        Ok(Response::new(proto::GcResponse {
            indexes_removed: r.indexes_removed,
            chunks_removed: r.chunks_removed,
            bytes_freed: r.bytes_freed,
        }))
    }
}
