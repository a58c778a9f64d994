//! `hyperbox convert`: rewrite every layer of an image as a HyperBox layer.
//!
//! Layers are converted concurrently (and each layer's frames are compressed
//! in parallel), blobs the destination already has are not pushed again, and
//! for a multi-platform index every platform is converted. Configs are copied
//! unchanged: conversion keeps every layer's diff_id, which is checked.

pub mod store;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use crate::digest::{ChunkId, Digest};
use crate::format::writer::{convert_tar, WriteOptions};
use crate::format::{FormatError, IndexLocation, MEDIA_TYPE};
use crate::oci::{self, is_foreign, is_index, is_tar_layer};
use crate::registry::BlobBody;
pub use store::{ImageLocation, ImageStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {problem}")]
    Image { what: String, problem: String },
    #[error("{layer}: {problem}")]
    Layer {
        layer: String,
        #[source]
        problem: LayerProblem,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What went wrong with one layer (its name is in [`ConvertError::Layer`]).
#[derive(Debug, thiserror::Error)]
pub enum LayerProblem {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("uncompressed content is {got}, but the config says {want}")]
    DiffId { got: Digest, want: String },
    #[error("the conversion stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Other(Box<ConvertError>),
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub write: WriteOptions,
    /// Layers converted at the same time.
    pub jobs: usize,
    /// Draw progress bars (on a terminal) instead of plain lines.
    pub progress_bars: bool,
    /// Print a line per finished layer when not drawing bars.
    pub quiet: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            write: WriteOptions::default(),
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress_bars: false,
            quiet: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub manifests: usize,
    pub layers: usize,
    /// Layers that already were HyperBox layers and were copied as they were.
    pub layers_kept: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tar_bytes: u64,
    pub chunks: usize,
    /// Frames whose content was already seen in this image.
    pub duplicate_chunks: usize,
    pub elapsed: Duration,
    pub digest: Option<Digest>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        write!(
            f,
            "{} manifest(s), {} layer(s) ({} already HyperBox), {} in → {} out, {} tar; {} chunks, {} duplicate; {:.1}s, {:.1} MB/s",
            self.manifests,
            self.layers,
            self.layers_kept,
            human(self.bytes_in),
            human(self.bytes_out),
            human(self.tar_bytes),
            self.chunks,
            self.duplicate_chunks,
            secs,
            self.tar_bytes as f64 / 1e6 / secs
        )
    }
}

pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Layers that have a diff_id in the image config.
fn has_diff_id(l: &Descriptor) -> bool {
    let mt = l.media_type().as_ref();
    is_tar_layer(mt) || is_foreign(mt) || has_hyperbox(l)
}

struct Converter {
    src: ImageStore,
    dst: ImageStore,
    opts: ConvertOptions,
    bars: MultiProgress,
    work: tempfile::TempDir,
    seen: Mutex<HashSet<ChunkId>>,
    summary: Mutex<Summary>,
}

/// Convert the image at `src` and write it to `dst`.
pub async fn convert(src: ImageStore, dst: ImageStore, opts: ConvertOptions) -> Result<Summary, ConvertError> {
    let start = Instant::now();
    let bars = if opts.progress_bars {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let c = Arc::new(Converter {
        src,
        dst,
        opts,
        bars,
        work: tempfile::Builder::new().prefix("hyperbox-convert-").tempdir()?,
        seen: Mutex::new(HashSet::new()),
        summary: Mutex::new(Summary::default()),
    });
    let root = c.src.root().await?;
    let what = c.src.location().to_string();
    let (bytes, media_type) = if is_index(&root.media_type) {
        let mut index = ImageIndex::from_reader(&root.bytes[..])
            .map_err(|e| ConvertError::Image { what: what.clone(), problem: e.to_string() })?;
        let mut out = Vec::new();
        for desc in index.manifests() {
            let digest = parse_digest(desc, &what)?;
            let child = c.src.manifest(&digest, desc.media_type().as_ref()).await?;
            if is_index(&child.media_type) {
                return Err(ConvertError::Image { what, problem: "nested image indexes are not supported".into() });
            }
            let (bytes, mt) = c.clone().convert_manifest(&child.bytes, &format!("{what} ({digest})")).await?;
            let new_digest = c.dst.put_manifest(&bytes, &mt, false).await?;
            let mut d = desc.clone();
            d.set_digest(oci_digest(&new_digest));
            d.set_size(bytes.len() as u64);
            d.set_media_type(MediaType::ImageManifest);
            out.push(d);
        }
        index.set_manifests(out);
        index.set_media_type(Some(MediaType::ImageIndex));
        (
            index.to_string().map_err(|e| ConvertError::Image { what, problem: e.to_string() })?.into_bytes(),
            MediaType::ImageIndex.to_string(),
        )
    } else {
        c.clone().convert_manifest(&root.bytes, &what).await?
    };
    let digest = c.dst.put_manifest(&bytes, &media_type, true).await?;
    let mut s = c.summary.lock().clone();
    s.elapsed = start.elapsed();
    s.digest = Some(digest);
    Ok(s)
}

fn parse_digest(d: &Descriptor, what: &str) -> Result<Digest, ConvertError> {
    d.digest().to_string().parse().map_err(|e: crate::digest::DigestParseError| ConvertError::Image {
        what: what.to_string(),
        problem: e.to_string(),
    })
}

fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    d.to_string().parse().expect("a sha256 digest is a valid OCI digest")
}

impl Converter {
    /// A fresh file name in the work dir, removed when dropped.
    fn temp(&self, prefix: &str) -> std::io::Result<tempfile::TempPath> {
        Ok(tempfile::Builder::new().prefix(prefix).tempfile_in(self.work.path())?.into_temp_path())
    }

    /// Convert one image manifest; returns the new manifest and its media type.
    async fn convert_manifest(self: Arc<Self>, bytes: &[u8], what: &str) -> Result<(Vec<u8>, String), ConvertError> {
        let image_err = |problem: String| ConvertError::Image { what: what.to_string(), problem };
        let mut manifest = ImageManifest::from_reader(bytes).map_err(|e| image_err(format!("manifest: {e}")))?;
        let config_digest = parse_digest(manifest.config(), what)?;
        let config_bytes = self.src.blob(&config_digest).await?;
        let diff_ids = config_diff_ids(&config_bytes).map_err(|e| image_err(format!("config {config_digest}: {e}")))?;
        let layers = manifest.layers().clone();
        let tar_layers = layers.iter().filter(|l| has_diff_id(l)).count();
        if tar_layers != diff_ids.len() {
            return Err(image_err(format!("{tar_layers} layers but the config lists {} diff_ids", diff_ids.len())));
        }
        if !self.dst.has_blob(&config_digest).await? {
            self.dst.put_blob(&config_digest, BlobBody::Bytes(&config_bytes)).await?;
        }
        let n = layers.len();
        let mut diff_iter = diff_ids.into_iter();
        let jobs: Vec<_> = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let diff_id = if has_diff_id(&l) { diff_iter.next() } else { None };
                (i, l, diff_id)
            })
            .collect();
        let new_layers: Vec<Descriptor> = stream::iter(jobs)
            .map(|(i, l, diff_id)| {
                let me = self.clone();
                let name = format!("layer {}/{n} {}", i + 1, l.digest());
                async move {
                    me.convert_layer(&l, diff_id.as_deref(), &name).await.map_err(|e| match e {
                        ConvertError::Layer { .. } => e,
                        other => {
                            ConvertError::Layer { layer: name.clone(), problem: LayerProblem::Other(Box::new(other)) }
                        }
                    })
                }
            })
            .buffered(self.opts.jobs.max(1))
            .try_collect()
            .await?;
        let mut config_desc = manifest.config().clone();
        if config_desc.media_type() == &MediaType::Other(oci::MEDIA_TYPE_DOCKER_CONFIG.into()) {
            config_desc.set_media_type(MediaType::ImageConfig);
        }
        manifest.set_config(config_desc);
        manifest.set_layers(new_layers);
        manifest.set_media_type(Some(MediaType::ImageManifest));
        let out = manifest.to_string().map_err(|e| image_err(e.to_string()))?.into_bytes();
        self.summary.lock().manifests += 1;
        Ok((out, MediaType::ImageManifest.to_string()))
    }

    async fn convert_layer(
        self: Arc<Self>,
        layer: &Descriptor,
        diff_id: Option<&str>,
        name: &str,
    ) -> Result<Descriptor, ConvertError> {
        let digest = parse_digest(layer, name)?;
        let layer_err = |problem: LayerProblem| ConvertError::Layer { layer: name.to_string(), problem };
        if is_foreign(layer.media_type().as_ref()) {
            // Its blob lives elsewhere (its `urls`); the descriptor is enough.
            self.summary.lock().layers += 1;
            return Ok(layer.clone());
        }
        if !is_tar_layer(layer.media_type().as_ref()) || has_hyperbox(layer) {
            // Not a tar, or already converted: copy as is.
            if !self.dst.has_blob(&digest).await? {
                let tmp = self.temp("copy-")?;
                self.src.blob_to_file(&digest, layer.size(), &tmp, |_| {}).await?;
                self.dst.put_blob(&digest, BlobBody::File(&tmp)).await?;
            }
            let mut s = self.summary.lock();
            s.layers += 1;
            s.layers_kept += has_hyperbox(layer) as usize;
            return Ok(layer.clone());
        }
        let bar = self.bars.add(ProgressBar::new(layer.size()));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} {msg:9} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar.set_prefix(digest.hex()[..12].to_string());
        bar.set_message("download");
        // Unique names: a manifest may list the same layer twice.
        let input = self.temp("in-")?;
        let output = self.temp("out-")?;
        let started = Instant::now();
        let pb = bar.clone();
        let bytes_in = self.src.blob_to_file(&digest, layer.size(), &input, move |n| pb.inc(n)).await?;
        bar.set_position(0);
        bar.set_message("convert");
        let (opts, pb, inp, outp) = (self.opts.write.clone(), bar.clone(), input.to_path_buf(), output.to_path_buf());
        let converted = tokio::task::spawn_blocking(move || -> Result<_, LayerProblem> {
            let io = |what| move |source| LayerProblem::Io { what, source };
            let file = std::fs::File::open(&inp).map_err(io("open the downloaded layer"))?;
            let reader = decompressed(pb.wrap_read(file)).map_err(io("reading the layer"))?;
            let out = std::fs::File::create(&outp).map_err(io("create the converted layer"))?;
            Ok(convert_tar(reader, std::io::BufWriter::with_capacity(1 << 20, out), &opts)?)
        })
        .await
        .map_err(|e| layer_err(e.into()))?
        .map_err(layer_err)?;
        drop(input);
        if let Some(want) = diff_id {
            if converted.diff_id.to_string() != want {
                return Err(layer_err(LayerProblem::DiffId { got: converted.diff_id, want: want.to_string() }));
            }
        }
        bar.set_message("push");
        if !self.dst.has_blob(&converted.blob_digest).await? {
            self.dst.put_blob(&converted.blob_digest, BlobBody::File(&output)).await?;
        }
        drop(output);
        bar.finish_with_message("done");
        let dups = {
            let mut seen = self.seen.lock();
            converted.index.frames.iter().filter(|f| !seen.insert(f.id)).count()
        };
        {
            let mut s = self.summary.lock();
            s.layers += 1;
            s.bytes_in += bytes_in;
            s.bytes_out += converted.blob_size;
            s.tar_bytes += converted.stats.tar_bytes;
            s.chunks += converted.stats.frames;
            s.duplicate_chunks += dups;
        }
        if !self.opts.progress_bars && !self.opts.quiet {
            eprintln!(
                "{name}: {} → {} ({} tar), {} entries, {} chunks, {:.1}s",
                human(bytes_in),
                human(converted.blob_size),
                human(converted.stats.tar_bytes),
                converted.stats.entries,
                converted.stats.frames,
                started.elapsed().as_secs_f64()
            );
        }
        let mut annotations = layer.annotations().clone().unwrap_or_default();
        annotations.retain(|k, _| !k.starts_with(crate::format::ANNOTATION_PREFIX));
        annotations.extend(converted.location.to_annotations());
        let mut d = Descriptor::new(
            MediaType::Other(MEDIA_TYPE.into()),
            converted.blob_size,
            oci_digest(&converted.blob_digest),
        );
        d.set_annotations(Some(annotations));
        Ok(d)
    }
}

/// The config's `rootfs.diff_ids`: all conversion needs from it. The config
/// itself is copied byte for byte, so nothing else of it is interpreted.
fn config_diff_ids(bytes: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    Ok(serde_json::from_slice::<Config>(bytes)?.rootfs.diff_ids)
}

fn has_hyperbox(d: &Descriptor) -> bool {
    d.annotations().as_ref().is_some_and(|a| IndexLocation::from_annotations(a).ok().flatten().is_some())
}

/// Wrap a layer blob in the decompressor its first bytes call for: gzip,
/// zstd (including a leading skippable frame), or none (a plain tar).
pub fn decompressed<'a, R: Read + Send + 'a>(r: R) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let head = r.fill_buf()?;
    Ok(match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] | [0x50..=0x5f, 0x2a, 0x4d, 0x18, ..] => {
            Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
        }
        _ => Box::new(r),
    })
}

/// Convert a layer file (any compression) to a HyperBox layer file.
pub fn convert_file(
    input: &Path,
    output: &Path,
    opts: &WriteOptions,
) -> Result<crate::format::writer::ConvertedLayer, ConvertError> {
    let name = input.display().to_string();
    let reader = decompressed(std::fs::File::open(input)?)?;
    let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(output)?);
    convert_tar(reader, out, opts).map_err(|e| ConvertError::Layer { layer: name, problem: e.into() })
}
