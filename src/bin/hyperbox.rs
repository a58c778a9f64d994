//! `hyperbox`: the HyperBox command line (convert, inspect and pull images;
//! manage hyperboxd's access traces).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use hyperbox::config::Config;
use hyperbox::convert::{self, ConvertOptions, ImageLocation, ImageStore};
use hyperbox::format::{self, writer::WriteOptions, ChunkParams, IndexLocation};
use hyperbox::registry::Client;

#[derive(Parser)]
#[command(name = "hyperbox", version, about = "HyperBox: lazy-loading images for containerd")]
struct Cli {
    /// Config file (default /etc/hyperbox/config.toml, if it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ChunkArgs {
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

#[derive(Subcommand)]
enum Cmd {
    /// Convert an image to HyperBox layers and push it.
    ///
    /// SRC and DST are registry references (https, or http with --plain-http
    /// or for registries listed in [registry] insecure) or OCI image layout
    /// directories written oci:PATH[:TAG].
    Convert {
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
    },
    /// Convert one layer file (tar, tar+gzip or tar+zstd) to a HyperBox layer file.
    ConvertLayer {
        #[command(flatten)]
        chunk: ChunkArgs,
        input: PathBuf,
        output: PathBuf,
    },
    /// Pull an image into containerd with its HyperBox layers lazy.
    ///
    /// Plain `ctr image pull` passes no labels to the snapshotter, so its
    /// layers are always downloaded. After this, `ctr run --snapshotter
    /// hyperbox REF ...` starts the image before its layers are fetched.
    /// Layers that are not HyperBox layers are downloaded and unpacked here.
    Pull {
        /// Use http instead of https for registries (loopback registries
        /// always use http).
        #[arg(long)]
        plain_http: bool,
        /// containerd's socket.
        #[arg(long, env = "CONTAINERD_ADDRESS", default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        /// containerd namespace (`k8s.io` for Kubernetes' images).
        #[arg(long, short, env = "CONTAINERD_NAMESPACE", default_value = "default")]
        namespace: String,
        /// The snapshotter's name in containerd's proxy_plugins.
        #[arg(long, default_value = "hyperbox")]
        snapshotter: String,
        /// After the traced chunks, fetch the whole image in the background.
        #[arg(long)]
        hydrate: bool,
        reference: String,
    },
    /// Access traces kept by hyperboxd: list, show, export, import, rm.
    Trace {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock", global = true)]
        address: PathBuf,
        /// Resolve tags over http instead of https.
        #[arg(long, global = true)]
        plain_http: bool,
        #[command(subcommand)]
        cmd: TraceCmd,
    },
    /// hyperboxd's counters since it started: registry fetches, the store,
    /// prefetch and traces.
    Stats {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
        address: PathBuf,
    },
    /// The remote layers mounted now, and how much of each is on this node.
    Layers {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
        address: PathBuf,
    },
    /// Prefetch a pulled image now, in the background: the chunks its trace
    /// names, and with --hydrate every other chunk too.
    Prefetch {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
        address: PathBuf,
        /// Resolve a tag over http instead of https.
        #[arg(long)]
        plain_http: bool,
        /// Then fetch every chunk the trace does not name.
        #[arg(long)]
        hydrate: bool,
        /// The image: a reference (registry/repo:tag or @digest) or a manifest digest.
        image: String,
    },
    /// Free store space no snapshot needs: the indexes of removed layers,
    /// then every chunk no kept index names.
    Gc {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
        address: PathBuf,
    },
    /// Check this node: FUSE, overlayfs, containerd's config and plugin, and
    /// hyperboxd. Each problem comes with its fix; exits 1 if any check fails.
    Doctor {
        /// hyperboxd's socket.
        #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
        address: PathBuf,
        /// containerd's socket.
        #[arg(long, env = "CONTAINERD_ADDRESS", default_value = "/run/containerd/containerd.sock")]
        containerd_address: PathBuf,
        /// containerd's config file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
    },
    /// Print the index of a HyperBox layer file, or of every layer of an image.
    Inspect {
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
    },
}

/// IMAGE below is a manifest digest (sha256:...) or an image reference; a
/// tag is resolved to this platform's manifest through the registry.
#[derive(Subcommand)]
enum TraceCmd {
    /// One line per trace.
    List,
    /// A trace's summary, how its last prefetch did, and its first chunks.
    Show {
        image: String,
        /// Chunks to list (0 for all).
        #[arg(long, default_value_t = 20)]
        chunks: usize,
    },
    /// Write a trace to FILE (JSON, application/vnd.hyperbox.trace.v1+json).
    Export { image: String, file: PathBuf },
    /// Keep the trace in FILE, replacing the image's own.
    Import { file: PathBuf },
    /// Forget a trace.
    Rm { image: String },
    /// Publish the image's trace to its registry, as an OCI artifact whose
    /// subject is the image (found through the referrers API, or its tag
    /// schema); nodes pulling the image then find and use it.
    Push { image: String },
    /// Fetch the trace published for the image into hyperboxd.
    Pull { image: String },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("hyperbox: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Convert { plain_http, jobs, chunk, quiet, src, dst } => {
            let client = Arc::new(Client::new(&config.registry, plain_http)?);
            let src_loc: ImageLocation = src.parse()?;
            let dst_loc: ImageLocation = dst.parse()?;
            let mut opts = ConvertOptions { write: chunk.write_options(), quiet, ..Default::default() };
            opts.progress_bars = !quiet && std::io::stderr().is_terminal();
            if let Some(j) = jobs {
                opts.jobs = j;
            }
            let summary = rt.block_on(convert::convert(
                ImageStore::new(src_loc, client.clone()),
                ImageStore::new(dst_loc.clone(), client),
                opts,
            ))?;
            println!("converted {src} → {dst_loc}");
            println!("{summary}");
            if let Some(d) = summary.digest {
                println!("digest {d}");
            }
        }
        Cmd::ConvertLayer { chunk, input, output } => {
            let started = std::time::Instant::now();
            let out = convert::convert_file(&input, &output, &chunk.write_options())?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{} → {}: {} tar → {}, {} entries, {} chunks, {:.2}s, {:.1} MB/s",
                input.display(),
                output.display(),
                convert::human(out.stats.tar_bytes),
                convert::human(out.blob_size),
                out.stats.entries,
                out.stats.frames,
                secs,
                out.stats.tar_bytes as f64 / 1e6 / secs.max(1e-6)
            );
            println!("digest {}\ndiff_id {}", out.blob_digest, out.diff_id);
            for (k, v) in out.location.to_annotations() {
                println!("annotation {k}={v}");
            }
        }
        Cmd::Pull { plain_http, address, namespace, snapshotter, hydrate, reference } => {
            let client = Client::new(&config.registry, plain_http)?;
            let opts = hyperbox::pull::PullOptions { address, namespace, snapshotter, hydrate };
            let started = std::time::Instant::now();
            let report = rt.block_on(hyperbox::pull::pull(&client, &opts, &reference, |line| eprintln!("{line}")))?;
            println!(
                "pulled {} ({}) in {:.2}s: {} lazy, {} downloaded ({}), {} already present",
                report.name,
                report.manifest,
                started.elapsed().as_secs_f64(),
                report.remote,
                report.downloaded,
                convert::human(report.bytes_downloaded),
                report.present
            );
        }
        Cmd::Doctor { address, containerd_address, containerd_config } => {
            use hyperbox::doctor::{self, Outcome};
            let mut checks = vec![doctor::fuse(), doctor::overlay()];
            checks.extend(doctor::containerd_config(&containerd_config, &address));
            checks.push(rt.block_on(doctor::containerd_plugin(&containerd_address)));
            checks.push(rt.block_on(doctor::daemon(&address)));
            let mut failed = 0;
            for c in &checks {
                let mark = match c.outcome {
                    Outcome::Ok => "ok  ",
                    Outcome::Warn => "warn",
                    Outcome::Fail => "FAIL",
                };
                println!("[{mark}] {:<18} {}", c.name, c.detail);
                if c.outcome != Outcome::Ok {
                    for line in c.fix.lines() {
                        println!("       {:<18} {line}", "");
                    }
                }
                failed += (c.outcome == Outcome::Fail) as usize;
            }
            if failed > 0 {
                println!("\n{failed} check(s) failed");
                std::process::exit(1);
            }
            println!("\nall checks passed");
        }
        Cmd::Trace { address, plain_http, cmd } => rt.block_on(trace_cmd(&config, &address, plain_http, cmd))?,
        Cmd::Stats { address } => rt.block_on(stats_cmd(&address))?,
        Cmd::Prefetch { address, plain_http, hydrate, image } => rt.block_on(async {
            let digest = manifest_digest(&config, plain_http, image.clone()).await?;
            let req = hyperbox::admin::proto::PrefetchRequest { image: digest.clone(), hydrate };
            let r = admin(&address).await?.prefetch(req).await?.into_inner();
            if hydrate {
                println!(
                    "prefetching {image} ({digest}): {} layer(s), then hydrating; `hyperbox layers` shows progress",
                    r.layers
                );
            } else {
                println!(
                    "prefetching {image} ({digest}): {} layer(s); only what its trace names (`hyperbox trace list`): \
                     without one nothing is fetched (--hydrate fetches everything)",
                    r.layers
                );
            }
            anyhow::Ok(())
        })?,
        Cmd::Layers { address } => rt.block_on(layers_cmd(&address))?,
        Cmd::Gc { address } => rt.block_on(async {
            let r = admin(&address).await?.gc(hyperbox::admin::proto::GcRequest {}).await?.into_inner();
            println!(
                "removed {} layer index(es) and {} chunk(s), freed {}",
                r.indexes_removed,
                r.chunks_removed,
                convert::human(r.bytes_freed)
            );
            anyhow::Ok(())
        })?,
        Cmd::Inspect { plain_http, json, entries, verify, target } => {
            let path = PathBuf::from(&target);
            let reports = if path.is_file() {
                let file = std::fs::File::open(&path)?;
                let (loc, idx) =
                    format::open_layer(&file, None).with_context(|| format!("layer {}", path.display()))?;
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
        }
    }
    Ok(())
}

/// A client of hyperboxd's admin API at `address`.
async fn admin(address: &std::path::Path) -> Result<hyperbox::admin::AdminClient<tonic::transport::Channel>> {
    hyperbox::admin::connect(address)
        .await
        .with_context(|| format!("connect to hyperboxd at {} (is it running? --address)", address.display()))
}

async fn stats_cmd(address: &std::path::Path) -> Result<()> {
    let s = admin(address).await?.stats(hyperbox::admin::proto::StatsRequest {}).await?.into_inner();
    let h = convert::human;
    let lookups = s.store_hits + s.store_misses;
    println!(
        "registry   {} demand + {} prefetch range requests, {} received",
        s.demand_requests,
        s.prefetch_requests,
        h(s.fetched_bytes)
    );
    println!(
        "           {} failed tries, {} fetches gave up; reads waited {:.2} s",
        s.fetch_errors, s.fetch_failures, s.fetch_wait_seconds
    );
    println!(
        "store      {} chunks, {} of {} budget; {} hits of {} lookups ({}), {} evicted, {} failed verification",
        s.store_chunks,
        h(s.store_bytes),
        h(s.store_budget_bytes),
        s.store_hits,
        lookups,
        if lookups == 0 { "-".to_string() } else { pct(s.store_hits as f64 / lookups as f64) },
        s.store_evictions,
        s.store_verify_failures
    );
    println!("cache      {} reads of a frame answered from memory", s.frame_cache_hits);
    println!("layers     {} mounted", s.layers_mounted);
    println!("prefetch   {} jobs, {} asked for, {} errors", s.prefetch_jobs, h(s.prefetch_bytes), s.prefetch_errors);
    println!("traces     {} container starts recorded", s.trace_sessions);
    Ok(())
}

async fn layers_cmd(address: &std::path::Path) -> Result<()> {
    let layers =
        admin(address).await?.list_layers(hyperbox::admin::proto::ListLayersRequest {}).await?.into_inner().layers;
    println!("{:<73} {:<40} {:>9} {:>9} {:>6}", "BLOB", "REPOSITORY", "BYTES", "LOCAL", "LOCAL%");
    for l in &layers {
        let share = if l.bytes == 0 { 1.0 } else { l.bytes_local as f64 / l.bytes as f64 };
        println!(
            "{:<73} {:<40} {:>9} {:>9} {:>6}",
            l.blob,
            l.repository,
            convert::human(l.bytes),
            convert::human(l.bytes_local),
            pct(share)
        );
    }
    println!("{} layer(s) mounted", layers.len());
    Ok(())
}

/// The manifest digest an image goes by here: a digest as it is, a
/// reference's pinned digest, else this platform's manifest of the tag (asked
/// of the registry).
async fn manifest_digest(config: &Config, plain_http: bool, image: String) -> Result<String> {
    if image.parse::<hyperbox::digest::Digest>().is_ok() {
        return Ok(image);
    }
    let r: hyperbox::registry::Reference = image.parse()?;
    if let Some(d) = &r.digest {
        return Ok(d.to_string());
    }
    let client = Client::new(&config.registry, plain_http)?;
    let (_, m) = hyperbox::pull::resolve(&client, &r).await.with_context(|| format!("resolve {image}"))?;
    Ok(m.digest.to_string())
}

async fn trace_cmd(config: &Config, address: &std::path::Path, plain_http: bool, cmd: TraceCmd) -> Result<()> {
    use hyperbox::admin::proto;
    use hyperbox::trace::Trace;
    let mut admin = admin(address).await?;
    let digest_of = |image: String| manifest_digest(config, plain_http, image);
    // For push and pull: the registry, the repository and this platform's manifest.
    let in_registry = |image: String| async move {
        let r: hyperbox::registry::Reference = image.parse()?;
        let client = Client::new(&config.registry, plain_http)?;
        let (_, m) = hyperbox::pull::resolve(&client, &r).await.with_context(|| format!("resolve {image}"))?;
        anyhow::Ok((client, r.repo, m))
    };
    let get = |image: String| {
        let mut admin = admin.clone();
        async move {
            let json = admin.get_trace(proto::GetTraceRequest { image }).await?.into_inner().trace_json;
            anyhow::Ok((Trace::from_json(&json)?, json))
        }
    };
    match cmd {
        TraceCmd::List => {
            let traces = admin.list_traces(proto::ListTracesRequest {}).await?.into_inner().traces;
            println!(
                "{:<40} {:<73} {:>4} {:>8} {:>9} {:>9} {:>6}",
                "REPOSITORY", "IMAGE", "RUNS", "CHUNKS", "BYTES", "PRECISION", "RECALL"
            );
            for t in traces {
                let (p, r) =
                    t.last_start.map(|s| (pct(s.precision), pct(s.recall))).unwrap_or(("-".into(), "-".into()));
                println!(
                    "{:<40} {:<73} {:>4} {:>8} {:>9} {:>9} {:>6}",
                    t.repository,
                    t.image,
                    t.runs,
                    t.entries,
                    convert::human(t.bytes),
                    p,
                    r
                );
            }
        }
        TraceCmd::Show { image, chunks } => {
            let (t, _) = get(digest_of(image).await?).await?;
            println!("image       {}\nrepository  {}", t.image, t.repository);
            println!("runs        {}", t.runs);
            println!("chunks      {} ({} compressed)", t.entries.len(), convert::human(t.bytes()));
            match &t.last_start {
                Some(s) => println!(
                    "last start  read {} chunks, prefetched {}, both {}: precision {}, recall {}",
                    s.read,
                    s.prefetched,
                    s.hits,
                    pct(s.precision),
                    pct(s.recall)
                ),
                None => println!("last start  no prefetch judged yet"),
            }
            let n = if chunks == 0 { t.entries.len() } else { chunks.min(t.entries.len()) };
            if n > 0 {
                println!("\n{:>8} {:>5} {:>8}  {:<12} PATH @ OFFSET", "AT(ms)", "SEEN", "BYTES", "CHUNK");
                for e in &t.entries[..n] {
                    println!(
                        "{:>8} {:>5} {:>8}  {:<12} /{} @ {}",
                        e.at_ms,
                        e.seen,
                        e.c_len,
                        &e.chunk.hex()[..12],
                        e.path,
                        e.offset
                    );
                }
                if n < t.entries.len() {
                    println!("... {} more (--chunks 0 lists all)", t.entries.len() - n);
                }
            }
        }
        TraceCmd::Export { image, file } => {
            let (t, json) = get(digest_of(image).await?).await?;
            std::fs::write(&file, &json).with_context(|| format!("write {}", file.display()))?;
            println!(
                "exported the trace of {} ({} chunks, {} runs) to {}",
                t.image,
                t.entries.len(),
                t.runs,
                file.display()
            );
        }
        TraceCmd::Import { file } => {
            let json = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            let t = Trace::from_json(&json).with_context(|| file.display().to_string())?;
            admin.put_trace(proto::PutTraceRequest { trace_json: json }).await?;
            println!("imported the trace of {} ({} chunks, {} runs)", t.image, t.entries.len(), t.runs);
        }
        TraceCmd::Push { image } => {
            let (client, repo, manifest) = in_registry(image.clone()).await?;
            let (t, _) = get(manifest.digest.to_string()).await?;
            let p = hyperbox::trace::oci::publish(&client, &repo, &manifest, &t).await?;
            let how = if p.referrers_api { "the referrers API" } else { "the referrers tag schema" };
            println!(
                "published the trace of {} ({} chunks, {} runs) as {repo}@{}, found through {how}",
                t.image,
                t.entries.len(),
                t.runs,
                p.manifest
            );
        }
        TraceCmd::Pull { image } => {
            let (client, repo, manifest) = in_registry(image.clone()).await?;
            let t = hyperbox::trace::oci::find(&client, &repo, &manifest.digest)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{image}: no trace published for {}", manifest.digest))?;
            admin.put_trace(proto::PutTraceRequest { trace_json: t.to_json() }).await?;
            println!("pulled the trace of {} ({} chunks, {} runs)", t.image, t.entries.len(), t.runs);
        }
        TraceCmd::Rm { image } => {
            let image = digest_of(image).await?;
            let deleted =
                admin.delete_trace(proto::DeleteTraceRequest { image: image.clone() }).await?.into_inner().deleted;
            if !deleted {
                bail!("no trace of {image}");
            }
            println!("removed the trace of {image}");
        }
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn verify_all(src: &(impl format::BlobSource + ?Sized), idx: &format::LayerIndex) -> Result<()> {
    for i in 0..idx.frames().len() {
        format::read_frame(src, idx, i)?;
    }
    Ok(())
}

/// Inspect every HyperBox layer of an image: one range request for each
/// index (the annotations say where it is), or the whole blob with --verify.
async fn inspect_image(store: ImageStore, verify: bool) -> Result<Vec<hyperbox::inspect::LayerReport>> {
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
