//! `hyperbox pull`: flags and output. The pull itself (labels that make
//! HyperBox layers lazy, the download of the others) is the library's `pull`.

use std::path::PathBuf;

use anyhow::Result;

use hyperbox::config::Config;
use hyperbox::convert::human;
use hyperbox::registry::Client;

/// Pull an image into containerd with its HyperBox layers lazy.
///
/// Plain `ctr image pull` passes no labels to the snapshotter, so its
/// layers are always downloaded. After this, `ctr run --snapshotter
/// hyperbox REF ...` starts the image before its layers are fetched.
/// Layers that are not HyperBox layers are downloaded and unpacked here.
#[derive(clap::Args)]
pub struct PullArgs {
    /// Use http instead of https for the image's registry, here and in
    /// hyperboxd for its lazy layers (loopback registries always use
    /// http).
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
    /// hyperboxd's socket: the pull asks it for the token that makes its
    /// labels believed.
    #[arg(long, env = "HYPERBOX_ADDRESS", default_value = "/run/hyperbox/hyperbox.sock")]
    hyperboxd: PathBuf,
    reference: String,
}

pub fn run(args: PullArgs, config: &Config, rt: &tokio::runtime::Runtime) -> Result<()> {
    let PullArgs { plain_http, address, namespace, snapshotter, hydrate, hyperboxd, reference } = args;
    let client = Client::new(&config.registry, plain_http)?;
    let opts = hyperbox::pull::PullOptions { address, namespace, snapshotter, hydrate, hyperboxd, plain_http };
    let started = std::time::Instant::now();
    let report = rt.block_on(hyperbox::pull::pull(&client, &opts, &reference, |line| eprintln!("{line}")))?;
    println!(
        "pulled {} ({}) in {:.2}s: {} lazy, {} downloaded ({}), {} already present",
        report.name,
        report.manifest,
        started.elapsed().as_secs_f64(),
        report.remote,
        report.downloaded,
        human(report.bytes_downloaded),
        report.present
    );
    for (i, why) in report.not_lazy.iter().enumerate() {
        if i == 0 {
            println!("not lazy:");
        }
        println!("  {} ({}): {why}", why.layer, why.reason);
    }
    Ok(())
}
