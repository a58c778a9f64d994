//! `hyperbox convert` (an image, from a registry or an OCI layout to another)
//! and `hyperbox convert-layer` (one layer file): flags and output. The
//! conversion itself is the library's `convert` module.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use hyperbox::config::Config;
use hyperbox::convert::{convert_file, human, ConvertOptions, ImageLocation, ImageStore};
use hyperbox::format::{writer::WriteOptions, ChunkParams};
use hyperbox::registry::Client;

// How layers are cut and compressed, for both commands. (No doc comment: it
// would become the about text of the commands that flatten it.)
#[derive(clap::Args, Clone)]
pub struct ChunkArgs {
    /// Average chunk size in KiB (min is a half, max four times this).
    #[arg(long, default_value_t = ChunkParams::default().avg >> 10)]
    chunk_size: u32,
    /// zstd compression level of the frames.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

impl ChunkArgs {
    fn write_options(&self) -> WriteOptions {
        let avg = self.chunk_size << 10;
        WriteOptions { chunk: ChunkParams { min: avg / 2, avg, max: avg * 4 }, level: self.level, ..Default::default() }
    }
}

/// Convert an image to HyperBox layers and push it.
///
/// SRC and DST are registry references (https, or http with --plain-http
/// or for registries listed in [registry] insecure) or OCI image layout
/// directories written oci:PATH[:TAG].
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Use http instead of https for registries.
    #[arg(long)]
    plain_http: bool,
    /// Layers converted at once (default: the number of cores).
    #[arg(long)]
    jobs: Option<usize>,
    #[command(flatten)]
    chunk: ChunkArgs,
    /// Print only the summary.
    #[arg(long, short)]
    quiet: bool,
    src: String,
    dst: String,
}

/// Convert one layer file (tar, tar+gzip or tar+zstd) to a HyperBox layer file.
#[derive(clap::Args)]
pub struct ConvertLayerArgs {
    #[command(flatten)]
    chunk: ChunkArgs,
    input: PathBuf,
    output: PathBuf,
}

pub fn image(args: ConvertArgs, config: &Config, rt: &tokio::runtime::Runtime) -> Result<()> {
    let ConvertArgs { plain_http, jobs, chunk, quiet, src, dst } = args;
    let client = Arc::new(Client::new(&config.registry, plain_http)?);
    let src_loc: ImageLocation = src.parse()?;
    let dst_loc: ImageLocation = dst.parse()?;
    let mut opts = ConvertOptions { write: chunk.write_options(), quiet, ..Default::default() };
    opts.progress_bars = !quiet && std::io::stderr().is_terminal();
    if let Some(j) = jobs {
        opts.jobs = j;
    }
    let summary = rt.block_on(hyperbox::convert::convert(
        ImageStore::new(src_loc, client.clone()),
        ImageStore::new(dst_loc.clone(), client),
        opts,
    ))?;
    println!("converted {src} → {dst_loc}");
    println!("{summary}");
    if let Some(d) = summary.digest {
        println!("digest {d}");
    }
    Ok(())
}

pub fn layer(args: ConvertLayerArgs) -> Result<()> {
    let ConvertLayerArgs { chunk, input, output } = args;
    let started = std::time::Instant::now();
    let out = convert_file(&input, &output, &chunk.write_options())?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} → {}: {} tar → {}, {} entries, {} chunks, {:.2}s, {:.1} MB/s",
        input.display(),
        output.display(),
        human(out.stats.tar_bytes),
        human(out.blob_size),
        out.stats.entries,
        out.stats.frames,
        secs,
        out.stats.tar_bytes as f64 / 1e6 / secs.max(1e-6)
    );
    println!("digest {}\ndiff_id {}", out.blob_digest, out.diff_id);
    for (k, v) in out.location.to_annotations() {
        println!("annotation {k}={v}");
    }
    Ok(())
}
