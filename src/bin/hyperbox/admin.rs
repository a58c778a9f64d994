//! The subcommands that ask hyperboxd's admin API one question each and
//! print the answer: `stats`, `layers`, `prefetch` and `gc`; and `connect`,
//! the admin client every subcommand that talks to hyperboxd uses (`trace`
//! too).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use hyperbox::admin::proto;
use hyperbox::config::Config;
use hyperbox::convert::human;

use crate::{manifest_digest, pct};

/// hyperboxd's counters since it started: registry fetches, the store,
/// prefetch and traces.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// hyperboxd's socket.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
    address: PathBuf,
}

/// The remote layers mounted now, and how much of each is on this node.
#[derive(clap::Args)]
pub struct LayersArgs {
    /// hyperboxd's socket.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
    address: PathBuf,
}

/// Prefetch a pulled image now, in the background: the chunks its trace
/// names, and with --hydrate every other chunk too.
#[derive(clap::Args)]
pub struct PrefetchArgs {
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
}

/// Free store space no snapshot needs: the indexes of removed layers,
/// then every chunk no kept index names.
#[derive(clap::Args)]
pub struct GcArgs {
    /// hyperboxd's socket.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
    address: PathBuf,
}

/// A client of hyperboxd's admin API at `address`.
pub async fn connect(address: &Path) -> Result<hyperbox::admin::AdminClient<tonic::transport::Channel>> {
    hyperbox::admin::connect(address)
        .await
        .with_context(|| format!("connect to hyperboxd at {} (is it running? --address)", address.display()))
}

pub async fn stats(args: StatsArgs) -> Result<()> {
    let s = connect(&args.address).await?.stats(proto::StatsRequest {}).await?.into_inner();
    let h = human;
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
    println!("ready      {} frames read as a traced prefetch kept them, verified", s.ready_frame_hits);
    println!("layers     {} mounted", s.layers_mounted);
    println!("prefetch   {} jobs, {} asked for, {} errors", s.prefetch_jobs, h(s.prefetch_bytes), s.prefetch_errors);
    println!("traces     {} container starts recorded", s.trace_sessions);
    Ok(())
}

pub async fn layers(args: LayersArgs) -> Result<()> {
    let layers = connect(&args.address).await?.list_layers(proto::ListLayersRequest {}).await?.into_inner().layers;
    println!("{:<73} {:<40} {:>9} {:>9} {:>6}", "BLOB", "REPOSITORY", "BYTES", "LOCAL", "LOCAL%");
    for l in &layers {
        let share = if l.bytes == 0 { 1.0 } else { l.bytes_local as f64 / l.bytes as f64 };
        println!(
            "{:<73} {:<40} {:>9} {:>9} {:>6}",
            l.blob,
            l.repository,
            human(l.bytes),
            human(l.bytes_local),
            pct(share)
        );
    }
    println!("{} layer(s) mounted", layers.len());
    Ok(())
}

pub async fn prefetch(args: PrefetchArgs, config: &Config) -> Result<()> {
    let PrefetchArgs { address, plain_http, hydrate, image } = args;
    let digest = manifest_digest(config, plain_http, image.clone()).await?;
    let req = proto::PrefetchRequest { image: digest.clone(), hydrate };
    let r = connect(&address).await?.prefetch(req).await?.into_inner();
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
    Ok(())
}

pub async fn gc(args: GcArgs) -> Result<()> {
    let r = connect(&args.address).await?.gc(proto::GcRequest {}).await?.into_inner();
    println!(
        "removed {} layer index(es) and {} chunk(s), freed {}",
        r.indexes_removed,
        r.chunks_removed,
        human(r.bytes_freed)
    );
    Ok(())
}
