//! `hyperbox trace` and its subcommands (list, show, export, import, push,
//! pull, rm): the access traces hyperboxd keeps, read and written through its
//! admin API, and published to or fetched from the image's registry.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use hyperbox::admin::proto;
use hyperbox::config::Config;
use hyperbox::convert::human;
use hyperbox::registry::Client;
use hyperbox::trace::Trace;

use crate::{admin, manifest_digest, pct};

/// Access traces kept by hyperboxd: list, show, export, import, rm.
#[derive(clap::Args)]
pub struct TraceArgs {
    /// hyperboxd's socket.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock", global = true)]
    address: PathBuf,
    /// Resolve tags over http instead of https.
    #[arg(long, global = true)]
    plain_http: bool,
    #[command(subcommand)]
    cmd: TraceCmd,
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

pub async fn run(args: TraceArgs, config: &Config) -> Result<()> {
    let TraceArgs { address, plain_http, cmd } = args;
    let mut admin = admin::connect(&address).await?;
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
                    human(t.bytes),
                    p,
                    r
                );
            }
        }
        TraceCmd::Show { image, chunks } => {
            let (t, _) = get(digest_of(image).await?).await?;
            println!("image       {}\nrepository  {}", t.image, t.repository);
            println!("runs        {}", t.runs);
            println!("chunks      {} ({} compressed)", t.entries.len(), human(t.bytes()));
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
