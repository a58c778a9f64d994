//! `hyperboxd`: the HyperBox snapshotter daemon.
//!
//! The snapshotter service (containerd's Snapshots API over a unix socket) is
//! not built yet; see the issues. Today this binary only validates and prints
//! the configuration, and refuses to start rather than pretend to serve.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "hyperboxd", version, about = "HyperBox remote snapshotter daemon for containerd")]
struct Args {
    /// Config file (default /etc/hyperbox/config.toml, if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", toml::to_string_pretty(&hyperbox::config::Config::default()).expect("config serializes"));
        return;
    }
    if let Err(e) = hyperbox::config::Config::load(args.config.as_deref()) {
        eprintln!("hyperboxd: {e}");
        std::process::exit(2);
    }
    eprintln!(
        "hyperboxd: the snapshotter service is not implemented in this version; only --print-default-config works"
    );
    std::process::exit(1);
}
