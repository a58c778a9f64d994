//! OCI vocabulary shared by every part that speaks of images: media types,
//! image references, chain ids, the platform this machine runs, and the
//! RFC 3339 dates OCI annotations and containerd leases carry.
//!
//! A leaf: it uses only `digest`, so the registry client, the converter,
//! `hyperbox pull`, traces and the snapshotter can all name these without
//! importing one another.

use std::time::SystemTime;

use crate::digest::Digest;

mod reference;

pub use reference::{Reference, ReferenceError, Repo};

/// An OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// An OCI image index (a multi-platform image).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker's multi-platform manifest list.
pub const MEDIA_TYPE_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker's image config, which converted manifests name by its OCI type.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The empty descriptor's media type (artifacts without a config).
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The annotation that says when an image or artifact was made.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// Whether a manifest media type is a multi-platform index.
pub fn is_index(mt: &str) -> bool {
    mt == MEDIA_TYPE_INDEX || mt == MEDIA_TYPE_DOCKER_LIST
}

/// Layer media types that hold a tar (compressed or not).
pub fn is_tar_layer(mt: &str) -> bool {
    matches!(
        mt,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
    )
}

/// Layers whose blobs may not be copied between registries (Windows base
/// layers and the like).
pub fn is_foreign(mt: &str) -> bool {
    mt.starts_with("application/vnd.docker.image.rootfs.foreign.diff.tar")
        || mt.starts_with("application/vnd.oci.image.layer.nondistributable.v1.tar")
}

/// The OCI chain ids of a layer stack: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()).to_string(),
        };
        out.push(next);
    }
    out
}

/// The chain id of a layer with diff id `diff_id` on a parent whose chain
/// id is `parent` (none for a bottom layer).
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

/// This machine's architecture as OCI platforms name it (`amd64`, `arm64`).
pub fn platform_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// RFC 3339 (UTC, whole seconds), as in `org.opencontainers.image.created`
/// and containerd's `containerd.io/gc.expire`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn chain_id_is_chain_ids_one_step() {
        let diffs: Vec<String> = [b"a", b"b", b"c"].iter().map(|d| Digest::of(*d).to_string()).collect();
        let chain = chain_ids(&diffs);
        let mut parent: Option<Digest> = None;
        for (d, want) in diffs.iter().zip(&chain) {
            let next = chain_id(parent.as_ref(), &d.parse().unwrap());
            assert_eq!(&next.to_string(), want);
            parent = Some(next);
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d = ["sha256:aa".to_string(), "sha256:bb".to_string(), "sha256:cc".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:aa");
        assert_eq!(c[1], Digest::of(b"sha256:aa sha256:bb").to_string());
        assert_eq!(c[2], Digest::of(format!("{} sha256:cc", c[1]).as_bytes()).to_string());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_365_296)), "2026-11-22T16:34:56Z");
    }

    #[test]
    fn indexes_and_layers() {
        assert!(is_index(MEDIA_TYPE_INDEX) && is_index(MEDIA_TYPE_DOCKER_LIST) && !is_index(MEDIA_TYPE_MANIFEST));
        assert!(is_tar_layer("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(!is_tar_layer("application/vnd.oci.image.layer.nondistributable.v1.tar"));
        assert!(is_foreign("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"));
    }
}
