//! The one place where errors become gRPC status codes, for both services
//! hyperboxd serves (containerd's Snapshots API and the admin API).
//!
//! What the caller can act on decides the code: NotFound and AlreadyExists
//! are answers in containerd's protocol; a bad request is InvalidArgument;
//! a request the state forbids is FailedPrecondition; a registry that is
//! down is Unavailable; anything else (disk, database, a panic) is Internal.

use tonic::Status;

use crate::snapshotter::SnapshotError;
use crate::trace::TraceError;

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        let msg = e.to_string();
        match e {
            SnapshotError::NotFound(_) => Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => Status::already_exists(msg),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(msg),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(msg),
            SnapshotError::Io { .. }
            | SnapshotError::Store(_)
            | SnapshotError::Corrupt(_)
            | SnapshotError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<TraceError> for Status {
    fn from(e: TraceError) -> Status {
        let msg = e.to_string();
        match e {
            TraceError::Invalid(_) => Status::invalid_argument(msg),
            TraceError::Registry(_) => Status::unavailable(msg),
            TraceError::Store(_) => Status::internal(msg),
        }
    }
}

/// A task that panicked or was cancelled: its request failed, nothing else.
pub(super) fn join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("the request's task failed: {e}"))
}

/// A request's argument that is not a manifest digest.
pub(super) fn not_a_digest(e: crate::digest::DigestParseError) -> Status {
    Status::invalid_argument(format!("image must be a manifest digest (sha256:...): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_what_the_caller_can_do() {
        let code = |e: SnapshotError| Status::from(e).code();
        assert_eq!(code(SnapshotError::NotFound("a".into())), tonic::Code::NotFound);
        assert_eq!(code(SnapshotError::AlreadyExists("a".into())), tonic::Code::AlreadyExists);
        assert_eq!(code(SnapshotError::FailedPrecondition("a".into())), tonic::Code::FailedPrecondition);
        assert_eq!(code(SnapshotError::InvalidArgument("a".into())), tonic::Code::InvalidArgument);
        assert_eq!(code(SnapshotError::Corrupt("a".into())), tonic::Code::Internal);
        assert_eq!(Status::from(TraceError::Invalid("x".into())).code(), tonic::Code::InvalidArgument);
    }
}
