//! A whole daemon in process: `daemon::Node` over a temp root, served by
//! `daemon::serve` on a socket of the test's own, driven by real gRPC
//! clients (containerd's Snapshots API, as containerd sends it, and the
//! admin API, as `hyperbox` sends it), then shut down by its future.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, StatSnapshotRequest,
};
use hyperbox::admin::proto;
use hyperbox::config::Config;
use hyperbox::daemon::{self, Node};

#[test]
fn a_node_serves_both_apis_on_its_own_socket_and_stops_on_its_future() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let node = Arc::new(Node::open(config_for(&dir), rt.handle()).unwrap());
    let socket = dir.path().join("hb.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _guard = rt.enter();
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        rt.spawn(daemon::serve(node.clone(), listener, async {
            let _ = stopped.await;
        }))
    };

    rt.block_on(async {
        let channel = containerd_client::connect(&socket).await.unwrap();
        let mut snaps = SnapshotsClient::new(channel);
        let sn = "hyperbox".to_string();
        let mounts = snaps
            .prepare(PrepareSnapshotRequest { snapshotter: sn.clone(), key: "ns/1/a".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].r#type, "bind", "a snapshot without a parent is a bind of its fs");
        snaps
            .commit(CommitSnapshotRequest {
                snapshotter: sn.clone(),
                name: "ns/2/base".into(),
                key: "ns/1/a".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let info = snaps
            .stat(StatSnapshotRequest { snapshotter: sn.clone(), key: "ns/2/base".into() })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.name, "ns/2/base");
        // Errors reach the client with the status containerd acts on.
        let gone = snaps.stat(StatSnapshotRequest { snapshotter: sn.clone(), key: "ns/1/a".into() }).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
        let err = snaps.mounts(MountsRequest { snapshotter: sn.clone(), key: "ns/2/base".into() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "a committed snapshot has no mounts: {err:?}");
        let mut listed = Vec::new();
        let mut stream =
            snaps.list(ListSnapshotsRequest { snapshotter: sn.clone(), filters: vec![] }).await.unwrap().into_inner();
        while let Some(page) = stream.message().await.unwrap() {
            listed.extend(page.info.into_iter().map(|i| i.name));
        }
        assert_eq!(listed, ["ns/2/base"]);

        let mut admin = hyperbox::admin::connect(&socket).await.unwrap();
        let stats = admin.stats(proto::StatsRequest {}).await.unwrap().into_inner();
        assert_eq!((stats.layers_mounted, stats.store_chunks), (0, 0));
        let bad = admin.get_trace(proto::GetTraceRequest { image: "latest".into() }).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
        let none = admin
            .get_trace(proto::GetTraceRequest { image: hyperbox::digest::Digest::of(b"x").to_string() })
            .await
            .unwrap_err();
        assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");
    });

    stop.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
    let after = rt.block_on(containerd_client::connect(&socket));
    assert!(after.is_err(), "the daemon still accepts connections after its shutdown future resolved");
    node.close();
    drop(node);

    // The metadata outlives the node: a new one over the same root has it.
    let node = Node::open(config_for(&dir), rt.handle()).unwrap();
    assert_eq!(node.snapshotter.stat("ns/2/base").unwrap().name, "ns/2/base");
    node.snapshotter.remove("ns/2/base").unwrap();
    assert!(node.snapshotter.list(&[]).unwrap().is_empty());
}

fn config_for(dir: &tempfile::TempDir) -> Config {
    let mut config = Config::default();
    config.daemon.root = dir.path().join("root");
    config.daemon.metrics_address = String::new();
    // Nothing here is fetched: no prefetch or traces going to a registry.
    config.prefetch.enabled = false;
    config.trace.enabled = false;
    // The fd holder is `hyperboxd fd-holder`, started from the running
    // binary: a test binary is not one (tests/restart_e2e.rs covers it).
    config.daemon.keep_fds = hyperbox::config::KeepMode::Off;
    config
}

/// A Prepare of a HyperBox layer for `node`: its index is already in the
/// node's store, so nothing is asked of the (absent) registry.
fn prepare_remote(
    node: &Node,
    key: &str,
    layer: &common::Layer,
) -> Result<Vec<hyperbox::snapshotter::MountSpec>, String> {
    use hyperbox::labels;
    let loc = &layer.out.location;
    node.store.put_index(layer.digest(), loc, layer.index_frame()).unwrap();
    let mut l: HashMap<String, String> = loc.to_annotations();
    let diff_id = hyperbox::digest::Digest::of(&layer.tar);
    l.insert(labels::TARGET.into(), diff_id.to_string());
    l.insert(labels::IMAGE_REF.into(), format!("127.0.0.1:9/caps@{}", hyperbox::digest::Digest::of(b"manifest")));
    l.insert(labels::LAYER_DIGEST.into(), layer.digest().to_string());
    l.insert(labels::PULL_TOKEN.into(), node.pull_token.clone());
    node.snapshotter.create(hyperbox::snapshotter::Kind::Active, key, "", l).map_err(|e| e.to_string())
}

#[test]
fn mounted_layers_and_their_memory_are_capped_per_node() {
    use common::skip::Need;
    if !common::skip::have(
        "mounted_layers_and_their_memory_are_capped_per_node",
        &[Need::Root, Need::Path("/dev/fuse")],
    ) {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let small =
        |name: &str| common::LayerBuilder::new().dir("d").file(&format!("d/{name}"), 0o644, name.as_bytes()).convert();
    let (a, b) = (small("a"), small("b"));

    // One layer at most: the second is not lazy (the ordinary path gives a
    // bind mount of an empty dir for containerd to unpack into).
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&dir);
    config.daemon.max_layers = 1;
    let node = Node::open(config, rt.handle()).unwrap();
    let err = prepare_remote(&node, "ns/1/extract-a", &a).unwrap_err();
    assert!(err.contains("already exists"), "the first layer is mounted: {err}");
    assert_eq!(node.snapshotter.mounted_layers(), 1);
    let mounts = prepare_remote(&node, "ns/2/extract-b", &b).unwrap();
    assert_eq!(mounts[0].kind, "bind", "{mounts:?}");
    assert_eq!(node.snapshotter.mounted_layers(), 1);
    node.close();

    // 1 MiB of trees and indexes: a layer of 20,000 files is refused, a
    // small one is not.
    let big = (0..20_000)
        .fold(common::LayerBuilder::new().dir("many"), |l, i| l.file(&format!("many/file-{i:05}"), 0o644, b"x"))
        .convert();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&dir);
    config.daemon.max_index_memory_mb = 1;
    let node = Node::open(config, rt.handle()).unwrap();
    let mounts = prepare_remote(&node, "ns/1/extract-big", &big).unwrap();
    assert_eq!(mounts[0].kind, "bind", "{mounts:?}");
    assert_eq!(node.snapshotter.mounted_layers(), 0);
    let err = prepare_remote(&node, "ns/2/extract-a", &a).unwrap_err();
    assert!(err.contains("already exists"), "a small layer fits: {err}");
    assert_eq!(node.snapshotter.mounted_layers(), 1);
    node.close();
}
