//! `hyperbox inspect`: print (or verify) the index of a HyperBox layer file,
//! or of every HyperBox layer of an image in a registry or an OCI layout.
//! The report itself is the library's `inspect`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use hyperbox::config::Config;
use hyperbox::convert::{ImageLocation, ImageStore};
use hyperbox::format::{self, IndexLocation};
use hyperbox::inspect::LayerReport;
use hyperbox::registry::Client;

/// Print the index of a HyperBox layer file, or of every layer of an image.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Use http instead of https for registries.
    #[arg(long)]
    plain_http: bool,
    /// Print JSON (entries and frames included).
    #[arg(long)]
    json: bool,
    /// List every entry.
    #[arg(long)]
    entries: bool,
    /// Read and verify every chunk against the index.
    #[arg(long)]
    verify: bool,
    /// A layer file, a registry reference, or oci:PATH[:TAG].
    target: String,
}

pub fn run(args: InspectArgs, config: &Config, rt: &tokio::runtime::Runtime) -> Result<()> {
    let InspectArgs { plain_http, json, entries, verify, target } = args;
    let path = PathBuf::from(&target);
    let reports = if path.is_file() {
        let file = std::fs::File::open(&path)?;
        let (loc, idx) = format::open_layer(&file, None).with_context(|| format!("layer {}", path.display()))?;
        if verify {
            verify_all(&file, &idx).with_context(|| format!("layer {}", path.display()))?;
        }
        vec![hyperbox::inspect::report(&target, file.metadata()?.len(), &loc, &idx)]
    } else {
        let client = Arc::new(Client::new(&config.registry, plain_http)?);
        rt.block_on(inspect_image(ImageStore::new(target.parse()?, client), verify))?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                println!();
            }
            r.print_text(entries);
        }
    }
    if verify && !json {
        println!("verified every chunk of {} layer(s)", reports.len());
    }
    Ok(())
}

/// Reads every frame of the layer, which checks each against the index.
fn verify_all(src: &(impl format::BlobSource + ?Sized), idx: &format::LayerIndex) -> Result<()> {
    for i in 0..idx.frames().len() {
        format::read_frame(src, idx, i)?;
    }
    Ok(())
}

/// Inspect every HyperBox layer of an image: one range request for each
/// index (the annotations say where it is), or the whole blob with --verify.
async fn inspect_image(store: ImageStore, verify: bool) -> Result<Vec<LayerReport>> {
    use oci_spec::image::{ImageIndex, ImageManifest};
    let root = store.root().await?;
    let mut manifests = Vec::new();
    if hyperbox::oci::is_index(&root.media_type) {
        let index = ImageIndex::from_reader(&root.bytes[..])?;
        for d in index.manifests() {
            manifests.push(store.manifest(&d.digest().to_string().parse()?, d.media_type().as_ref()).await?);
        }
    } else {
        manifests.push(root);
    }
    let work = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for m in manifests {
        let manifest = ImageManifest::from_reader(&m.bytes[..])?;
        for layer in manifest.layers() {
            let name = layer.digest().to_string();
            let annotations = layer.annotations().clone().unwrap_or_default();
            let Some(loc) = IndexLocation::from_annotations(&annotations).with_context(|| format!("layer {name}"))?
            else {
                eprintln!("layer {name}: not a HyperBox layer ({})", layer.media_type());
                continue;
            };
            let digest = name.parse()?;
            let ctx = || format!("layer {name}");
            let idx = if verify {
                let path = work.path().join(&name[7..]);
                store.blob_to_file(&digest, layer.size(), &path, |_| {}).await?;
                let file = std::fs::File::open(&path)?;
                let (_, idx) = format::open_layer(&file, Some(&loc)).with_context(ctx)?;
                verify_all(&file, &idx).with_context(ctx)?;
                idx
            } else {
                loc.check_bounds(layer.size()).with_context(ctx)?;
                let bytes = match store.location() {
                    ImageLocation::Registry(r) => {
                        store.client().get_blob_range(&r.repo, &digest, loc.offset, loc.length).await?
                    }
                    ImageLocation::Layout { dir, .. } => {
                        let file = std::fs::File::open(dir.join("blobs/sha256").join(&name[7..]))?;
                        format::BlobSource::read_at(&file, loc.offset, loc.length as usize)?
                    }
                };
                format::parse_index_frame(&bytes, &loc).with_context(ctx)?
            };
            reports.push(hyperbox::inspect::report(&name, layer.size(), &loc, &idx));
        }
    }
    if reports.is_empty() {
        bail!("{}: no HyperBox layers", store.location());
    }
    Ok(reports)
}
