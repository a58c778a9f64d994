//! `hyperbox`: the HyperBox command line (convert, inspect and pull images;
//! manage hyperboxd's access traces). This file holds the top-level flags,
//! the list of subcommands and the dispatch to their files, and the small
//! helpers several subcommands share; each subcommand's flags and code live
//! in its own file.

mod admin;
mod convert;
mod doctor;
mod inspect;
mod pull;
mod trace;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use hyperbox::config::Config;
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

// Each subcommand's help text is the doc comment of its flags' struct (a
// doc comment here would become `hyperbox`'s own about text).
#[derive(Subcommand)]
enum Cmd {
    Convert(convert::ConvertArgs),
    ConvertLayer(convert::ConvertLayerArgs),
    Pull(pull::PullArgs),
    Trace(trace::TraceArgs),
    Stats(admin::StatsArgs),
    Layers(admin::LayersArgs),
    Prefetch(admin::PrefetchArgs),
    Gc(admin::GcArgs),
    Doctor(doctor::DoctorArgs),
    Inspect(inspect::InspectArgs),
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
        Cmd::Convert(args) => convert::image(args, &config, &rt),
        Cmd::ConvertLayer(args) => convert::layer(args),
        Cmd::Pull(args) => pull::run(args, &config, &rt),
        Cmd::Trace(args) => rt.block_on(trace::run(args, &config)),
        Cmd::Stats(args) => rt.block_on(admin::stats(args)),
        Cmd::Layers(args) => rt.block_on(admin::layers(args)),
        Cmd::Prefetch(args) => rt.block_on(admin::prefetch(args, &config)),
        Cmd::Gc(args) => rt.block_on(admin::gc(args)),
        Cmd::Doctor(args) => doctor::run(args, &rt),
        Cmd::Inspect(args) => inspect::run(args, &config, &rt),
    }
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

/// A share as a percentage with one decimal.
fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}
