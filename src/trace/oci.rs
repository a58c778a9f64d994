//! Traces as OCI artifacts that refer to their image (OCI 1.1 `subject`),
//! so another node pulling the image finds its trace in the registry. The
//! image itself is not changed, rebuilt or re-tagged.
//!
//! The artifact is a manifest with `artifactType` [`MEDIA_TYPE`], the empty
//! config, one layer (the trace's JSON) and the image's manifest as
//! `subject`. A registry with the referrers API indexes it (it answers the
//! PUT with `OCI-Subject`); for one without, the referrers tag schema is
//! kept up to date by hand: an index tagged `sha256-<hex of the subject>`
//! lists the referrers. Readers ask the API first and fall back to the tag.

use oci_spec::image::{ImageIndex, ImageManifest};

use super::{Trace, TraceError, MEDIA_TYPE};
use crate::digest::Digest;
use crate::oci::{
    self, Repo, ANNOTATION_CREATED as CREATED, MEDIA_TYPE_EMPTY as EMPTY_TYPE, MEDIA_TYPE_INDEX as INDEX_TYPE,
    MEDIA_TYPE_MANIFEST as MANIFEST_TYPE,
};
use crate::registry::{BlobBody, Client, Manifest, RegistryError};

const EMPTY: &[u8] = b"{}";

/// The most a lookup of an image's published trace may take, all requests
/// (referrers, manifests, the trace) together: prefetch waits for it, and
/// a registry that trickles must not hold it for long.
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Largest trace JSON read from a registry.
pub const MAX_TRACE_BYTES: u64 = 16 << 20;

/// Where a published trace went.
#[derive(Debug)]
pub struct Published {
    pub manifest: Digest,
    /// Indexed by the registry's referrers API (else by the tag schema).
    pub referrers_api: bool,
}

/// The tag the referrers tag schema uses for `subject`.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// Push `trace` as an artifact referring to `subject` (the image's manifest).
pub async fn publish(client: &Client, repo: &Repo, subject: &Manifest, trace: &Trace) -> Result<Published, TraceError> {
    if trace.image != subject.digest.to_string() {
        return Err(TraceError::Invalid(format!("the trace is of {}, not of {}", trace.image, subject.digest)));
    }
    let json = trace.to_json();
    let (json_digest, empty_digest) = (Digest::of(&json), Digest::of(EMPTY));
    client.push_blob(repo, &empty_digest, BlobBody::Bytes(EMPTY)).await?;
    client.push_blob(repo, &json_digest, BlobBody::Bytes(&json)).await?;
    let created = oci::rfc3339(std::time::SystemTime::now());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": MEDIA_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty_digest.to_string(), "size": EMPTY.len()},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": json_digest.to_string(), "size": json.len()}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest.to_string(), "size": subject.bytes.len()},
        "annotations": {CREATED: created, "io.hyperbox.trace.runs": trace.runs.to_string()},
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = Digest::of(&bytes);
    let referrers_api = client.put_manifest_with_subject(repo, &digest.to_string(), &bytes, MANIFEST_TYPE).await?;
    if !referrers_api {
        // The tag schema: this subject's index, our older traces replaced.
        let tag = fallback_tag(&subject.digest);
        let mut index = match client.get_manifest(repo, &tag).await {
            Ok(m) => serde_json::from_slice::<serde_json::Value>(&m.bytes)
                .ok()
                .filter(|v| v["manifests"].is_array())
                .ok_or_else(|| TraceError::Invalid(format!("{repo}:{tag} is not an image index")))?,
            Err(RegistryError::Status { status: 404, .. }) => {
                serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []})
            }
            Err(e) => return Err(e.into()),
        };
        let list = index["manifests"].as_array_mut().expect("checked above");
        list.retain(|d| d["artifactType"] != MEDIA_TYPE);
        list.push(serde_json::json!({
            "mediaType": MANIFEST_TYPE, "digest": digest.to_string(), "size": bytes.len(),
            "artifactType": MEDIA_TYPE, "annotations": {CREATED: manifest["annotations"][CREATED]},
        }));
        let index = serde_json::to_vec(&index).expect("json");
        client.put_manifest(repo, &tag, &index, INDEX_TYPE).await?;
    }
    Ok(Published { manifest: digest, referrers_api })
}

/// The newest trace published for the image whose manifest is `subject`,
/// if any. Checked like an imported trace, and it must be of `subject`.
/// Gives up after [`LOOKUP_TIMEOUT`].
pub async fn find(client: &Client, repo: &Repo, subject: &Digest) -> Result<Option<Trace>, TraceError> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, find_unbounded(client, repo, subject)).await {
        Ok(found) => found,
        Err(_) => Err(TraceError::Registry(RegistryError::TimedOut {
            repo: repo.to_string(),
            what: format!("trace lookup for {subject}"),
            ms: LOOKUP_TIMEOUT.as_millis() as u64,
        })),
    }
}

async fn find_unbounded(client: &Client, repo: &Repo, subject: &Digest) -> Result<Option<Trace>, TraceError> {
    let index = match client.referrers(repo, subject, MEDIA_TYPE).await? {
        Some(index) => index,
        None => match client.get_manifest(repo, &fallback_tag(subject)).await {
            Ok(m) => m.bytes,
            Err(RegistryError::Status { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    let index =
        ImageIndex::from_reader(&index[..]).map_err(|e| TraceError::Invalid(format!("referrers index: {e}")))?;
    // Newest first by creation time (RFC 3339 strings order as times).
    let newest = index
        .manifests()
        .iter()
        .filter(|d| d.artifact_type().as_ref().is_some_and(|t| t.to_string() == MEDIA_TYPE))
        .max_by_key(|d| d.annotations().as_ref().and_then(|a| a.get(CREATED).cloned()).unwrap_or_default());
    let Some(desc) = newest else { return Ok(None) };
    let m = client.get_manifest(repo, desc.digest().as_ref()).await?;
    let m =
        ImageManifest::from_reader(&m.bytes[..]).map_err(|e| TraceError::Invalid(format!("trace manifest: {e}")))?;
    let layer = m
        .layers()
        .iter()
        .find(|l| l.media_type().to_string() == MEDIA_TYPE)
        .ok_or_else(|| TraceError::Invalid("the trace artifact holds no trace".into()))?;
    let digest: Digest = layer.digest().as_ref().parse().map_err(|e| TraceError::Invalid(format!("{e}")))?;
    // The descriptor's size is only a claim (the blob is checked by digest
    // and cut off at the limit as it is read), but a claim over the limit is
    // refused unfetched.
    if layer.size() > MAX_TRACE_BYTES {
        return Err(TraceError::Invalid(format!(
            "the trace is {} bytes, over the limit of {MAX_TRACE_BYTES}",
            layer.size()
        )));
    }
    let json = client.get_blob_limited(repo, &digest, MAX_TRACE_BYTES).await?;
    let t = Trace::from_json(&json)?;
    if t.image != subject.to_string() {
        return Err(TraceError::Invalid(format!("the published trace is of {}, not of {subject}", t.image)));
    }
    Ok(Some(t))
}
