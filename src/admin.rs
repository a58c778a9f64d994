//! hyperboxd's admin API (proto/hyperbox/admin/v1/admin.proto): its wire
//! types and the client `hyperbox stats|layers|gc|prefetch|trace` and
//! `hyperbox doctor` use. The daemon serves it beside containerd's
//! Snapshots service on its socket (`crate::daemon::admin`).

use std::path::Path;

#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("hyperbox.admin.v1");
}

pub use proto::admin_client::AdminClient;

/// Largest message either side takes: a trace of a million chunks is about
/// 270 MB of JSON; this allows a trace.max_entries of about a million.
pub const MAX_MESSAGE: usize = 512 << 20;

/// A client of the daemon at `socket`.
pub async fn connect(socket: &Path) -> Result<AdminClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(AdminClient::new(containerd_client::connect(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}
