//! containerd's Snapshots service over the `Snapshotter`: a thin adapter.
//! Each call runs on the blocking pool (metadata writes are synced, mounts
//! are syscalls); its error becomes a gRPC status in `super::status`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_snapshots::api::types::Mount as GrpcMount;
use containerd_snapshots::{Info as GrpcInfo, Kind as GrpcKind, Usage as GrpcUsage};

use crate::snapshotter::{Info, Kind, MountSpec, SnapshotError, Snapshotter};

/// The calls of containerd's Snapshots service, as counted.
pub const CALLS: [&str; 10] =
    ["stat", "update", "usage", "mounts", "prepare", "view", "commit", "remove", "cleanup", "list"];

/// Calls served and calls that failed (NotFound and AlreadyExists are
/// answers, not failures), by call, in [`CALLS`] order.
pub struct CallCounts {
    served: [AtomicU64; CALLS.len()],
    failed: [AtomicU64; CALLS.len()],
}

pub static CALL_COUNTS: CallCounts = CallCounts {
    served: [const { AtomicU64::new(0) }; CALLS.len()],
    failed: [const { AtomicU64::new(0) }; CALLS.len()],
};

impl CallCounts {
    /// `(call, served, failed)` for every call.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        CALLS
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, self.served[i].load(Ordering::Relaxed), self.failed[i].load(Ordering::Relaxed)))
            .collect()
    }
}

/// The service containerd talks to.
pub struct Service(pub Arc<Snapshotter>);

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        call: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let s = self.0.clone();
        let k = key.clone();
        let r = tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| SnapshotError::Internal(format!("{call} {k}: {e}")))?;
        let i = CALLS.iter().position(|c| *c == call).expect("a call of CALLS");
        CALL_COUNTS.served[i].fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(_) => tracing::debug!(call, key, "ok"),
            // Expected answers in containerd's protocol, not failures.
            Err(SnapshotError::AlreadyExists(_) | SnapshotError::NotFound(_)) => {
                tracing::debug!(call, key, answer = %r.as_ref().err().unwrap(), "done")
            }
            Err(e) => {
                CALL_COUNTS.failed[i].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(call, key, error = %e, "failed")
            }
        }
        r
    }
}

fn grpc_info(i: Info) -> GrpcInfo {
    GrpcInfo {
        kind: match i.kind {
            Kind::View => GrpcKind::View,
            Kind::Active => GrpcKind::Active,
            Kind::Committed => GrpcKind::Committed,
        },
        name: i.name,
        parent: i.parent,
        labels: i.labels,
        created_at: i.created,
        updated_at: i.updated,
    }
}

fn grpc_mounts(m: Vec<MountSpec>) -> Vec<GrpcMount> {
    m.into_iter()
        .map(|m| GrpcMount { r#type: m.kind, source: m.source, target: String::new(), options: m.options })
        .collect()
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<GrpcInfo, Self::Error> {
        let k = key.clone();
        self.run("stat", key, move |s| s.stat(&k)).await.map(grpc_info)
    }

    async fn update(&self, info: GrpcInfo, fieldpaths: Option<Vec<String>>) -> Result<GrpcInfo, Self::Error> {
        let key = info.name.clone();
        let new = Info {
            // Only labels change; the rest is taken from the stored snapshot.
            kind: Kind::Committed,
            name: info.name,
            parent: info.parent,
            labels: info.labels,
            created: info.created_at,
            updated: info.updated_at,
        };
        let paths = fieldpaths.unwrap_or_default();
        self.run("update", key, move |s| s.update(new, &paths)).await.map(grpc_info)
    }

    async fn usage(&self, key: String) -> Result<GrpcUsage, Self::Error> {
        let k = key.clone();
        let u = self.run("usage", key, move |s| s.usage(&k)).await?;
        Ok(GrpcUsage { size: u.size, inodes: u.inodes })
    }

    async fn mounts(&self, key: String) -> Result<Vec<GrpcMount>, Self::Error> {
        let k = key.clone();
        self.run("mounts", key, move |s| s.mounts(&k)).await.map(grpc_mounts)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, Self::Error> {
        let k = key.clone();
        self.run("prepare", key, move |s| s.create(Kind::Active, &k, &parent, labels)).await.map(grpc_mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, Self::Error> {
        let k = key.clone();
        self.run("view", key, move |s| s.create(Kind::View, &k, &parent, labels)).await.map(grpc_mounts)
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Self::Error> {
        let k = key.clone();
        self.run("commit", key, move |s| s.commit(&name, &k, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let k = key.clone();
        self.run("remove", key, move |s| s.remove(&k)).await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        self.run("cleanup", String::new(), |s| s.cleanup()).await
    }

    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<GrpcInfo, SnapshotError>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream, Self::Error> {
        let infos = self.run("list", filters.join(" | "), move |s| s.list(&filters)).await?;
        Ok(tokio_stream::iter(infos.into_iter().map(|i| Ok(grpc_info(i))).collect::<Vec<_>>()))
    }
}
