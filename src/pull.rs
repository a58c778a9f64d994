//! `hyperbox pull`: pull an image into containerd so that its HyperBox
//! layers are lazy, as stargz's `ctr-remote image rpull` does.
//!
//! Plain `ctr image pull` passes no labels to a snapshotter, so it can never
//! be lazy. This resolves the image itself, puts manifest and config into
//! containerd's content store under a lease, prepares each layer through
//! containerd's Snapshots service with the labels that name the layer, and
//! creates the image record. A HyperBox layer is answered AlreadyExists by
//! hyperboxd (it is mounted, not downloaded); any other layer is downloaded
//! here and unpacked by containerd's diff service, as a pull would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient, leases_client::LeasesClient,
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, Image,
    Info as ContentInfo, UpdateImageRequest, UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use futures_util::StreamExt;
use oci_spec::image::{ImageIndex, ImageManifest};
use tonic::transport::Channel;

use crate::digest::Digest;
use crate::format::{ANNOTATION_PREFIX, ANN_VERSION};
use crate::labels;
use crate::oci::{self, Reference};
use crate::registry::Client;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("{what}: {problem}")]
    Image { what: String, problem: String },
    // The transport error's Display is only "transport error": show its cause.
    #[error("cannot connect to containerd at {path}: {source:?}")]
    Connect { path: String, source: tonic::transport::Error },
    #[error("containerd {what}: {}: {}", code_name(.status.code()), .status.message())]
    Containerd {
        what: String,
        #[source]
        status: tonic::Status,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot {problem} (hyperboxd at {path}; --hyperboxd or HYPERBOX_ADDRESS names its socket)")]
    Daemon { path: String, problem: String },
}

type Result<T, E = PullError> = std::result::Result<T, E>;

fn image_err(what: impl Into<String>, problem: impl ToString) -> PullError {
    PullError::Image { what: what.into(), problem: problem.to_string() }
}

fn ctr_err(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd { what, status }
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// Fetch the whole image in the background once its layers are ready.
    pub hydrate: bool,
    /// hyperboxd's socket, where the pull token comes from.
    pub hyperboxd: PathBuf,
    /// The registry serves plain http: tell hyperboxd too (with the pull
    /// token), so that lazy layers are fetched over http as well.
    pub plain_http: bool,
}

/// What a pull did, layer by layer.
#[derive(Debug, Default)]
pub struct PullReport {
    pub name: String,
    pub manifest: String,
    /// Layers mounted lazily by the snapshotter.
    pub remote: usize,
    /// Layers downloaded and unpacked here.
    pub downloaded: usize,
    /// Layers already present.
    pub present: usize,
    pub bytes_downloaded: u64,
    /// HyperBox layers containerd held already (with `hydrate`): it
    /// answers their Prepare itself, so hyperboxd never sees the label.
    pub held_remote: usize,
    /// Why each downloaded layer was not lazy, in layer order.
    pub not_lazy: Vec<NotLazy>,
}

/// Why a layer was downloaded rather than mounted lazily.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotLazy {
    /// The layer's blob digest.
    pub layer: String,
    /// As `/metrics` labels it (`not_hyperbox`, `registry`, ...; see
    /// `crate::snapshotter::fallback::Reason`), or `unknown` when
    /// hyperboxd could not say.
    pub reason: String,
    /// What the reason means, then the error itself.
    pub meaning: String,
    pub detail: String,
}

impl std::fmt::Display for NotLazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.meaning)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// A connection to containerd that tags every request with the namespace
/// and the pull's lease.
struct Ctr {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Ctr {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", self.namespace.parse().expect("namespace is ASCII"));
        if let Some(l) = &self.lease {
            r.metadata_mut().insert("containerd-lease", l.parse().expect("lease id is ASCII"));
        }
        r
    }

    /// Write a blob into the content store (chunks of at most 1 MiB), with
    /// labels. Content already there only gets the labels.
    async fn write_content(
        &self,
        digest: &str,
        size: u64,
        mut chunks: impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Unpin + Send + 'static,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let mut content = ContentClient::new(self.channel.clone());
        let reference = format!("hyperbox-pull-{digest}");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let expected = digest.to_string();
        let labels2 = labels.clone();
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(chunk) = chunks.next().await {
                let data = chunk?;
                let len = data.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: reference.clone(),
                    total: size as i64,
                    expected: expected.clone(),
                    offset,
                    data,
                    labels: HashMap::new(),
                };
                offset += len;
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference,
                total: size as i64,
                expected,
                offset,
                data: Vec::new(),
                labels: labels2,
            };
            let _ = tx.send(commit).await;
            Ok::<(), std::io::Error>(())
        });
        let what = format!("content write of {digest}");
        let result = content.write(self.req(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
        let outcome = match result {
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            }
            Err(e) => Err(e),
        };
        feeder.await.map_err(std::io::Error::other)??;
        match outcome {
            Ok(()) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists && labels.is_empty() => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                // Already present: add our labels (only those: an empty mask
                // would replace every label it has).
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                let info = ContentInfo { digest: digest.to_string(), labels, ..Default::default() };
                content
                    .update(self.req(ContentUpdateRequest {
                        info: Some(info),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    }))
                    .await
                    .map_err(ctr_err(format!("content label update of {digest}")))?;
                Ok(())
            }
            Err(s) => Err(ctr_err(what)(s)),
        }
    }
}

fn one_chunk(bytes: Vec<u8>) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Unpin + Send + 'static {
    futures_util::stream::iter(vec![Ok(bytes)])
}

fn file_chunks(
    file: std::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Unpin + Send + 'static {
    Box::pin(futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let r = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            while n < buf.len() {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), None),
                }
            }
            buf.truncate(n);
            (Ok(buf), Some(file))
        })
        .await
        .unwrap_or_else(|e| (Err(std::io::Error::other(e)), None));
        match r {
            (Ok(buf), _) if buf.is_empty() => None,
            (Ok(buf), f) => Some((Ok(buf), f)),
            (Err(e), _) => Some((Err(e), None)),
        }
    }))
}

fn is_hyperbox(layer: &oci_spec::image::Descriptor) -> bool {
    layer.annotations().as_ref().is_some_and(|a| a.contains_key(ANN_VERSION))
}

/// The node's pull token, from hyperboxd's admin API at `socket`.
async fn pull_token(socket: &std::path::Path) -> Result<String> {
    let failed = |e: String| PullError::Daemon { path: socket.display().to_string(), problem: e };
    let mut c =
        crate::admin::connect(socket).await.map_err(|e| failed(format!("get the pull token: connect: {e:?}")))?;
    let t = c
        .pull_token(crate::admin::proto::PullTokenRequest {})
        .await
        .map_err(|s| failed(format!("get the pull token: {}", s.message())))?;
    Ok(t.into_inner().token)
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// The image's root manifest and, for an index, this platform's manifest:
/// (index, manifest).
pub async fn resolve(
    registry: &Client,
    r: &Reference,
) -> Result<(Option<crate::registry::Manifest>, crate::registry::Manifest)> {
    let root = registry.get_manifest(&r.repo, &r.target()).await?;
    // An index: pick this machine's platform, keep the index as the image's target.
    Ok(if oci::is_index(&root.media_type) {
        let idx = ImageIndex::from_reader(&root.bytes[..]).map_err(|e| image_err("image index", e))?;
        let want = idx
            .manifests()
            .iter()
            .find(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == oci::platform_arch()
                })
            })
            .ok_or_else(|| image_err("image index", format!("no manifest for linux/{}", oci::platform_arch())))?;
        let m = registry.get_manifest(&r.repo, want.digest().as_ref()).await?;
        (Some(root), m)
    } else {
        (None, root)
    })
}

/// Pull `reference` into containerd. `log` gets one line per step.
pub async fn pull(registry: &Client, opts: &PullOptions, reference: &str, log: impl Fn(&str)) -> Result<PullReport> {
    let r: Reference = reference.parse().map_err(|e| image_err(reference, e))?;
    let (index, manifest) = resolve(registry, &r).await?;
    let m = ImageManifest::from_reader(&manifest.bytes[..]).map_err(|e| image_err("image manifest", e))?;
    let config_digest: Digest = m.config().digest().as_ref().parse().map_err(|e| image_err("config digest", e))?;
    let config = registry.get_blob(&r.repo, &config_digest).await?;
    let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|v| v.get("rootfs")?.get("diff_ids")?.as_array().cloned())
        .ok_or_else(|| image_err("image config", "no rootfs.diff_ids"))?
        .into_iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| image_err("image config", "rootfs.diff_ids holds a non-string"))?;
    for d in &diff_ids {
        d.parse::<Digest>().map_err(|e| image_err("image config", e))?;
    }
    if diff_ids.len() != m.layers().len() {
        return Err(image_err(
            "image",
            format!("{} layers but {} diff_ids in the config", m.layers().len(), diff_ids.len()),
        ));
    }
    let chain = oci::chain_ids(&diff_ids);
    // Only HyperBox layers carry the token, and only if there is one.
    let token = if m.layers().iter().any(is_hyperbox) { Some(pull_token(&opts.hyperboxd).await?) } else { None };
    let pinned = format!("{}/{}@{}", r.repo.registry, r.repo.name, manifest.digest);

    let channel = containerd_client::connect(&opts.address)
        .await
        .map_err(|source| PullError::Connect { path: opts.address.display().to_string(), source })?;
    let mut ctr = Ctr { channel: channel.clone(), namespace: opts.namespace.clone(), lease: None };
    // Everything written holds to this lease until the image record does;
    // should this process die, the lease expires and GC takes it all.
    let lease_id = format!("hyperbox-pull-{}", unix_nanos());
    // 24 hours, as containerd's own client: long enough for a slow pull of
    // layers that are not lazy.
    let expire = oci::rfc3339(SystemTime::now() + Duration::from_secs(24 * 3600));
    LeasesClient::new(channel.clone())
        .create(ctr.req(CreateLeaseRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
        }))
        .await
        .map_err(ctr_err("lease create"))?;
    ctr.lease = Some(lease_id.clone());
    let result = pull_with_lease(
        &ctr,
        registry,
        opts,
        reference,
        &r,
        &pinned,
        index,
        manifest,
        &m,
        config,
        &config_digest,
        (&diff_ids, &chain),
        token.as_deref(),
        &log,
    )
    .await;
    ctr.lease = None;
    let deleted = LeasesClient::new(channel).delete(ctr.req(DeleteLeaseRequest { id: lease_id, sync: false })).await;
    let report = result?;
    deleted.map_err(ctr_err("lease delete"))?;
    if report.held_remote > 0 {
        // containerd answers the Prepare of a layer it already holds in
        // this namespace itself, so hyperboxd never saw this pull's
        // hydrate label on it: ask hyperboxd directly (a hydrate under way
        // only takes note).
        hydrate(&opts.hyperboxd, &report.manifest).await?;
        log(&format!("hydrating {} in hyperboxd", report.manifest));
    }
    Ok(report)
}

/// Why hyperboxd did not mount the HyperBox layer `layer` it was asked to
/// prepare as `key` in `namespace`: it keeps the reason of each fallback.
async fn why_not_lazy(socket: &std::path::Path, namespace: &str, key: &str, layer: &str) -> NotLazy {
    let unknown = |detail: String| NotLazy {
        layer: layer.to_string(),
        reason: "unknown".into(),
        meaning: "hyperboxd did not say why".into(),
        detail,
    };
    let mut c = match crate::admin::connect(socket).await {
        Ok(c) => c,
        Err(e) => return unknown(format!("cannot ask it at {}: {e:?}", socket.display())),
    };
    let req = crate::admin::proto::FallbacksRequest { namespace: namespace.into(), key: key.into(), max: 1 };
    match c.fallbacks(req).await.map(|r| r.into_inner().fallbacks.into_iter().next()) {
        Ok(Some(f)) => NotLazy { layer: layer.to_string(), reason: f.reason, meaning: f.meaning, detail: f.detail },
        Ok(None) => unknown("it kept no reason for this layer".into()),
        Err(s) => unknown(format!("asking it failed: {}", s.message())),
    }
}

/// Ask hyperboxd at `socket` to fetch every chunk of the image `manifest`.
async fn hydrate(socket: &std::path::Path, manifest: &str) -> Result<()> {
    let failed = |e: String| PullError::Daemon { path: socket.display().to_string(), problem: e };
    let mut c = crate::admin::connect(socket).await.map_err(|e| failed(format!("hydrate: connect: {e:?}")))?;
    let req = crate::admin::proto::PrefetchRequest { image: manifest.to_string(), hydrate: true };
    c.prefetch(req).await.map_err(|s| failed(format!("hydrate: {}", s.message())))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn pull_with_lease(
    ctr: &Ctr,
    registry: &Client,
    opts: &PullOptions,
    name: &str,
    r: &Reference,
    pinned: &str,
    index: Option<crate::registry::Manifest>,
    manifest: crate::registry::Manifest,
    m: &ImageManifest,
    config: Vec<u8>,
    config_digest: &Digest,
    (diff_ids, chain): (&[String], &[String]),
    token: Option<&str>,
    log: &impl Fn(&str),
) -> Result<PullReport> {
    let mut report = PullReport { name: name.to_string(), manifest: manifest.digest.to_string(), ..Default::default() };
    let mut snapshots = SnapshotsClient::new(ctr.channel.clone());
    let n = m.layers().len();
    for (i, layer) in m.layers().iter().enumerate() {
        let parent = if i == 0 { String::new() } else { chain[i - 1].clone() };
        let key = format!("extract-{}-{}", unix_nanos(), chain[i]);
        // The layer's own HyperBox annotations (where its index is), but
        // none of the labels only this pull may set.
        let mut labels: HashMap<String, String> = layer
            .annotations()
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX) && !labels::PULL_SET.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let hyperbox = is_hyperbox(layer);
        labels.insert(labels::TARGET.into(), chain[i].clone());
        if let (true, Some(token)) = (hyperbox, token) {
            labels.insert(labels::IMAGE_REF.into(), pinned.to_string());
            labels.insert(labels::LAYER_DIGEST.into(), layer.digest().to_string());
            labels.insert(labels::PULL_TOKEN.into(), token.to_string());
            if opts.hydrate {
                labels.insert(labels::HYDRATE.into(), "true".into());
            }
            if opts.plain_http {
                labels.insert(labels::PLAIN_HTTP.into(), "true".into());
            }
        }
        if opts.hydrate && hyperbox {
            let stat = StatSnapshotRequest { snapshotter: opts.snapshotter.clone(), key: chain[i].clone() };
            if snapshots.stat(ctr.req(stat)).await.is_ok() {
                report.held_remote += 1;
            }
        }
        let prepared = snapshots
            .prepare(ctr.req(PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent,
                labels,
                ..Default::default()
            }))
            .await;
        let mounts = match prepared {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                if hyperbox {
                    report.remote += 1;
                    log(&format!("layer {}/{n} {}: remote (lazy)", i + 1, layer.digest()));
                } else {
                    report.present += 1;
                    log(&format!("layer {}/{n} {}: already present", i + 1, layer.digest()));
                }
                continue;
            }
            Err(s) => return Err(ctr_err(format!("prepare of layer {}", layer.digest()))(s)),
            Ok(resp) => resp.into_inner().mounts,
        };
        // Not lazy: say why, then download and unpack it, as a pull would.
        let why = if hyperbox {
            why_not_lazy(&opts.hyperboxd, &opts.namespace, &key, layer.digest().as_ref()).await
        } else {
            NotLazy {
                layer: layer.digest().to_string(),
                reason: "not_hyperbox".into(),
                meaning: "not a HyperBox layer (convert the image with `hyperbox convert`)".into(),
                detail: String::new(),
            }
        };
        let unpacked = async {
            let digest: Digest = layer.digest().as_ref().parse().map_err(|e| image_err("layer digest", e))?;
            let tmp = tempfile::NamedTempFile::new()?;
            let got = registry.get_blob_to_file(&r.repo, &digest, layer.size(), tmp.path(), |_| {}).await?;
            let labels = HashMap::new();
            ctr.write_content(&digest.to_string(), got, file_chunks(tmp.reopen()?), labels).await?;
            let applied = DiffClient::new(ctr.channel.clone())
                .apply(ctr.req(ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type().to_string(),
                        digest: digest.to_string(),
                        size: got as i64,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    ..Default::default()
                }))
                .await
                .map_err(ctr_err(format!("unpack of layer {digest}")))?
                .into_inner()
                .applied;
            // What was unpacked must be the layer the config names, as
            // containerd's own unpacker checks: else this image's layer
            // would be committed under another layer's chain id.
            let unpacked = applied.map(|d| d.digest).unwrap_or_default();
            if unpacked != diff_ids[i] {
                return Err(image_err(
                    format!("layer {digest}"),
                    format!("unpacks to {unpacked}, but the image config says its diff_id is {}", diff_ids[i]),
                ));
            }
            snapshots
                .clone()
                .commit(ctr.req(CommitSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    name: chain[i].clone(),
                    key: key.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(ctr_err(format!("commit of layer {digest}")))?;
            Ok::<u64, PullError>(got)
        }
        .await;
        match unpacked {
            Ok(bytes) => {
                report.downloaded += 1;
                report.bytes_downloaded += bytes;
                log(&format!(
                    "layer {}/{n} {}: downloaded and unpacked ({bytes} bytes); not lazy: {why}",
                    i + 1,
                    layer.digest()
                ));
                report.not_lazy.push(why);
            }
            Err(e) => {
                let _ = snapshots
                    .remove(ctr.req(RemoveSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key,
                        ..Default::default()
                    }))
                    .await;
                return Err(e);
            }
        }
    }

    // Config and manifest (and index), labelled so containerd's GC keeps
    // what the image needs: config → top snapshot, manifest → config.
    let top = chain.last().cloned().unwrap_or_default();
    let config_labels = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter), top)]);
    ctr.write_content(&config_digest.to_string(), config.len() as u64, one_chunk(config), config_labels).await?;
    let mut manifest_labels =
        HashMap::from([("containerd.io/gc.ref.content.config".to_string(), config_digest.to_string())]);
    for (i, l) in m.layers().iter().enumerate() {
        manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest().to_string());
    }
    let manifest_desc = Descriptor {
        media_type: media_type_or(&manifest.media_type, oci::MEDIA_TYPE_MANIFEST),
        digest: manifest.digest.to_string(),
        size: manifest.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    ctr.write_content(
        &manifest.digest.to_string(),
        manifest.bytes.len() as u64,
        one_chunk(manifest.bytes),
        manifest_labels,
    )
    .await?;
    let target = match index {
        None => manifest_desc,
        Some(idx) => {
            let labels = HashMap::from([("containerd.io/gc.ref.content.m.0".to_string(), manifest.digest.to_string())]);
            let desc = Descriptor {
                media_type: media_type_or(&idx.media_type, oci::MEDIA_TYPE_INDEX),
                digest: idx.digest.to_string(),
                size: idx.bytes.len() as i64,
                annotations: HashMap::new(),
            };
            ctr.write_content(&idx.digest.to_string(), idx.bytes.len() as u64, one_chunk(idx.bytes), labels).await?;
            desc
        }
    };
    let image = Image { name: name.to_string(), target: Some(target), ..Default::default() };
    let mut images = ImagesClient::new(ctr.channel.clone());
    match images.create(ctr.req(CreateImageRequest { image: Some(image.clone()), ..Default::default() })).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            images
                .update(ctr.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["target".into()] }),
                    ..Default::default()
                }))
                .await
                .map_err(ctr_err(format!("image update of {name}")))?;
        }
        Err(s) => return Err(ctr_err(format!("image create of {name}"))(s)),
    }
    Ok(report)
}

fn media_type_or(mt: &str, default: &str) -> String {
    if mt.is_empty() {
        default.to_string()
    } else {
        mt.to_string()
    }
}
