//! containerd's snapshotter semantics, without containerd: real store, real
//! dirs, no mounts performed (the specs are checked instead).

use super::gc::Preparing;
use super::*;
use crate::digest::Digest;
use crate::fetcher::FetchConfig;
use crate::format::IndexLocation;
use crate::registry::{Client, RegistryConfig};
use crate::store::StoreConfig;

/// The pull token the fixture's snapshotter believes.
const PULL_TOKEN: &str = "fixture-token";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        Fixture { _dir: dir, root, rt }
    }

    /// Open (or reopen) the snapshotter over the same root.
    fn open(&self) -> Snapshotter {
        let store = Arc::new(Store::open(&self.root.join("store"), &StoreConfig::default()).unwrap());
        let client = Arc::new(Client::new(&RegistryConfig::default(), true).unwrap());
        let fetcher = Fetcher::new(client, store.clone(), FetchConfig::default());
        let rt = self.rt.handle().clone();
        let recorder = Some(Recorder::start(store.clone(), Default::default(), &rt));
        let prefetcher =
            Prefetcher::new(fetcher.clone(), store.clone(), recorder.clone(), Default::default(), rt.clone());
        let opts = Options {
            root: self.root.clone(),
            fuse: MountOptions { threads: 1, read_ahead_kb: 0 },
            pull_token: PULL_TOKEN.into(),
            max_layers: 16,
            max_index_memory: 64 << 20,
        };
        Snapshotter::open(opts, Parts { store, fetcher, recorder, prefetcher, rt, keep: None }).unwrap()
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn fs_of(s: &Snapshotter, key: &str) -> PathBuf {
    let id = s.meta.lock().snaps[key].id;
    s.fs_dir(id)
}

#[test]
fn lifecycle_and_mounts_match_containerds_overlay_snapshotter() {
    let f = Fixture::new();
    let s = f.open();
    // No parent: a read-write bind of the snapshot's own fs.
    let m = s.create(Kind::Active, "a", "", HashMap::new()).unwrap();
    let a_fs = fs_of(&s, "a");
    assert_eq!(
        m,
        vec![MountSpec {
            kind: "bind".into(),
            source: a_fs.display().to_string(),
            options: vec!["rw".into(), "rbind".into()]
        }]
    );
    assert!(a_fs.is_dir() && a_fs.parent().unwrap().join("work").is_dir());
    std::fs::write(a_fs.join("file"), vec![7u8; 10_000]).unwrap();
    s.commit("A", "a", labels(&[("l", "1")])).unwrap();
    assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound(_))));
    let info = s.stat("A").unwrap();
    assert_eq!(
        (info.kind, info.parent.as_str(), info.labels.get("l").map(String::as_str)),
        (Kind::Committed, "", Some("1"))
    );
    let u = s.usage("A").unwrap();
    assert!(u.size >= 10_000 && u.inodes == 2, "{u:?}");

    s.create(Kind::Active, "b", "A", HashMap::new()).unwrap();
    s.commit("B", "b", HashMap::new()).unwrap();
    // Active on two layers: overlay, topmost first.
    let m = s.create(Kind::Active, "c", "B", HashMap::new()).unwrap();
    let (b_fs, c_fs) = (fs_of(&s, "B"), fs_of(&s, "c"));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].kind, "overlay");
    assert_eq!(
        m[0].options,
        vec![
            "index=off".to_string(),
            format!("workdir={}", c_fs.parent().unwrap().join("work").display()),
            format!("upperdir={}", c_fs.display()),
            format!("lowerdir={}:{}", b_fs.display(), fs_of(&s, "A").display()),
        ]
    );
    assert_eq!(s.mounts("c").unwrap(), m);
    // A committed snapshot has no mounts (containerd: "not active or view").
    assert!(matches!(s.mounts("B"), Err(SnapshotError::FailedPrecondition(_))));
    // A view of one parent: a read-only bind of it. Of two: overlay, lowerdir only.
    let v = s.create(Kind::View, "v1", "A", HashMap::new()).unwrap();
    assert_eq!(
        v,
        vec![MountSpec {
            kind: "bind".into(),
            source: fs_of(&s, "A").display().to_string(),
            options: vec!["ro".into(), "rbind".into()]
        }]
    );
    let v = s.create(Kind::View, "v2", "B", HashMap::new()).unwrap();
    assert_eq!(
        v[0].options,
        vec!["index=off".to_string(), format!("lowerdir={}:{}", b_fs.display(), fs_of(&s, "A").display())]
    );
    // A view cannot be committed.
    assert!(matches!(s.commit("X", "v1", HashMap::new()), Err(SnapshotError::FailedPrecondition(_))));

    // Errors containerd expects.
    assert!(matches!(s.create(Kind::Active, "c", "B", HashMap::new()), Err(SnapshotError::AlreadyExists(_))));
    assert!(matches!(s.create(Kind::Active, "d", "nope", HashMap::new()), Err(SnapshotError::NotFound(_))));
    assert!(matches!(s.create(Kind::Active, "d", "c", HashMap::new()), Err(SnapshotError::InvalidArgument(_))));
    assert!(matches!(s.create(Kind::Active, "", "", HashMap::new()), Err(SnapshotError::InvalidArgument(_))));
    assert!(matches!(s.commit("A", "c", HashMap::new()), Err(SnapshotError::AlreadyExists(_))));
    assert!(matches!(s.remove("B"), Err(SnapshotError::FailedPrecondition(_))));
    assert!(matches!(s.remove("zzz"), Err(SnapshotError::NotFound(_))));
    assert!(matches!(s.stat("zzz"), Err(SnapshotError::NotFound(_))));

    // Remove leaves to roots; dirs go with them.
    for k in ["c", "v1", "v2", "B", "A"] {
        let dir = fs_of(&s, k).parent().unwrap().to_path_buf();
        s.remove(k).unwrap();
        assert!(!dir.exists(), "{k}: {dir:?} left behind");
    }
    assert!(s.list(&[]).unwrap().is_empty());
}

#[test]
fn list_filters_update_and_reopen() {
    let f = Fixture::new();
    {
        let s = f.open();
        s.create(Kind::Active, "ns/1/a", "", labels(&[("containerd.io/snapshot.ref", "sha256:aa")])).unwrap();
        s.commit("sha256:aa", "ns/1/a", labels(&[("containerd.io/snapshot.ref", "sha256:aa"), ("x", "1")])).unwrap();
        s.create(Kind::Active, "ns/2/b", "sha256:aa", HashMap::new()).unwrap();
        let names = |f: &[&str]| -> Vec<String> {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            s.list(&f).unwrap().into_iter().map(|i| i.name).collect()
        };
        assert_eq!(names(&[]), ["ns/2/b", "sha256:aa"]);
        assert_eq!(names(&[r#"labels."containerd.io/snapshot.ref"==sha256:aa,parent=="""#]), ["sha256:aa"]);
        assert_eq!(names(&["kind==active"]), ["ns/2/b"]);
        assert_eq!(names(&["parent==sha256:aa", "labels.x==1"]), ["ns/2/b", "sha256:aa"]);
        assert!(matches!(s.list(&["kind=".into()]), Err(SnapshotError::InvalidArgument(_))));

        // Update: one label path, then all labels; other fields refused.
        let mut info = s.stat("sha256:aa").unwrap();
        info.labels.insert("y".into(), "2".into());
        info.labels.remove("x");
        let got = s.update(info.clone(), &["labels.y".into()]).unwrap();
        assert_eq!(got.labels.get("x").map(String::as_str), Some("1"));
        assert_eq!(got.labels.get("y").map(String::as_str), Some("2"));
        let got = s.update(info.clone(), &["labels.x".into()]).unwrap();
        assert!(!got.labels.contains_key("x"));
        assert!(got.updated > got.created);
        assert!(matches!(s.update(info.clone(), &["parent".into()]), Err(SnapshotError::InvalidArgument(_))));
        let got = s.update(Info { labels: labels(&[("z", "3")]), ..info }, &[]).unwrap();
        assert_eq!(got.labels, labels(&[("z", "3")]));
    }
    // Everything survives a reopen; new ids do not reuse old ones.
    let s = f.open();
    let all = s.list(&[]).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(s.stat("sha256:aa").unwrap().labels, labels(&[("z", "3")]));
    assert_eq!(s.stat("ns/2/b").unwrap().parent, "sha256:aa");
    let before: Vec<u64> = s.meta.lock().snaps.values().map(|r| r.id).collect();
    s.create(Kind::Active, "new", "", HashMap::new()).unwrap();
    let id = s.meta.lock().snaps["new"].id;
    assert!(before.iter().all(|&b| b < id));
}

#[test]
fn cleanup_removes_only_unowned_dirs() {
    let f = Fixture::new();
    let s = f.open();
    s.create(Kind::Active, "keep", "", HashMap::new()).unwrap();
    let keep = fs_of(&s, "keep");
    std::fs::write(keep.join("data"), b"x").unwrap();
    // What a crash leaves: a staged dir and a renamed dir whose metadata never committed.
    let snapshots = f.root.join("snapshots");
    std::fs::create_dir_all(snapshots.join("new-9-abc/fs")).unwrap();
    std::fs::create_dir_all(snapshots.join("999/fs")).unwrap();
    std::fs::write(snapshots.join("999/fs/f"), b"y").unwrap();
    s.cleanup().unwrap();
    assert!(keep.join("data").exists());
    assert!(!snapshots.join("new-9-abc").exists());
    assert!(!snapshots.join("999").exists());
}

#[test]
fn remote_layer_without_what_it_needs_takes_the_ordinary_path() {
    let f = Fixture::new();
    let s = f.open();
    // A HyperBox layer without image ref and digest (as nerdctl passes it):
    // prepared normally, so containerd unpacks it.
    let loc =
        IndexLocation { offset: 10, length: 20, digest: Digest::of(b"i"), version: crate::format::FORMAT_VERSION };
    let mut l = loc.to_annotations();
    l.insert(crate::labels::TARGET.into(), "sha256:cc".into());
    let m = s.create(Kind::Active, "extract-1", "", l.clone()).unwrap();
    assert_eq!(m[0].kind, "bind");
    // With a reference to a registry that is not there: also the ordinary path.
    l.insert(
        crate::labels::IMAGE_REF.into(),
        "127.0.0.1:9/none@sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
    );
    l.insert(crate::labels::LAYER_DIGEST.into(), format!("{}", Digest::of(b"blob")));
    l.insert(crate::labels::PULL_TOKEN.into(), PULL_TOKEN.into());
    let started = std::time::Instant::now();
    let m = s.create(Kind::Active, "extract-2", "", l).unwrap();
    assert_eq!(m[0].kind, "bind");
    assert!(s.stat("sha256:cc").is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn a_remote_layer_that_cannot_be_mounted_again_is_never_handed_out_empty() {
    let f = Fixture::new();
    let loc =
        IndexLocation { offset: 10, length: 20, digest: Digest::of(b"i"), version: crate::format::FORMAT_VERSION };
    {
        let s = f.open();
        // A committed remote layer whose index is not in the store and whose
        // registry is gone: what a restart after losing the store row meets.
        let rec = remote_record(1, "gone", &loc);
        let mut meta = s.meta.lock();
        meta.transact(&s.store, vec![("sha256:remote".into(), rec)], vec![], 2).unwrap();
    }
    let s = f.open();
    assert!(s.broken.lock().contains(&1));
    // Still listed (containerd's GC must see it), but no child is built on
    // it and the error says why.
    assert_eq!(s.list(&[]).unwrap().len(), 1);
    match s.create(Kind::Active, "c", "sha256:remote", HashMap::new()) {
        Err(SnapshotError::FailedPrecondition(m)) => {
            assert!(m.contains("sha256:remote") && m.contains("not available"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(s.stat("c").is_err());
    // It can still be removed, and nothing of it stays behind.
    s.remove("sha256:remote").unwrap();
    assert!(s.list(&[]).unwrap().is_empty());
    assert!(s.broken.lock().is_empty());
}

#[test]
fn gc_frees_orphan_indexes_but_not_a_layer_being_prepared() {
    let f = Fixture::new();
    let s = f.open();
    // A real layer's index, stored as mount_remote stores it before the
    // layer's record exists.
    let layer = crate::testing::LayerBuilder::new().file("f", 0o644, b"hello").convert();
    let digest = layer.digest().clone();
    s.store.put_index(&digest, &layer.out.location, layer.index_frame()).unwrap();
    let preparing = Preparing::new(&s, &digest.to_string());
    assert_eq!(s.gc().unwrap().indexes_removed, 0);
    assert!(s.store.get_index(&digest).unwrap().is_some(), "a layer being prepared keeps its index");
    drop(preparing);
    assert_eq!(s.gc().unwrap().indexes_removed, 1);
    assert!(s.store.get_index(&digest).unwrap().is_none(), "no snapshot and not being prepared: freed");
}

#[test]
fn a_remote_layer_is_reused_only_by_a_prepare_that_names_its_index() {
    let f = Fixture::new();
    let loc =
        IndexLocation { offset: 10, length: 20, digest: Digest::of(b"i"), version: crate::format::FORMAT_VERSION };
    let target = Digest::of(b"chain").to_string();
    let s = f.open();
    let rec = remote_record(1, "first", &loc);
    s.meta.lock().transact(&s.store, vec![(target.clone(), rec)], vec![], 2).unwrap();
    let prepare = |key: &str, mut labels: HashMap<String, String>| {
        labels.insert(crate::labels::TARGET.into(), target.clone());
        s.create(Kind::Active, key, "", labels)
    };
    // Another image's layer of the same chain id: an ordinary layer (as any
    // image pulled through CRI), or a HyperBox layer with another index.
    // Neither may be served the first image's files: both are unpacked.
    assert_eq!(prepare("default/1/extract-a", HashMap::new()).unwrap()[0].kind, "bind");
    let other = IndexLocation { digest: Digest::of(b"other"), ..loc.clone() };
    assert_eq!(prepare("default/1/extract-b", other.to_annotations()).unwrap()[0].kind, "bind");
    // The same index: the layer is here already.
    match prepare("k8s.io/2/extract-c", loc.to_annotations()) {
        Err(SnapshotError::AlreadyExists(name)) => assert_eq!(name, target),
        other => panic!("{other:?}"),
    }
}

#[test]
fn chain_ids_come_from_containerd_names() {
    let c = Digest::of(b"c");
    assert_eq!(remote::chain_of(&c.to_string()), Some(c.clone()));
    assert_eq!(remote::chain_of(&format!("k8s.io/7/{c}")), Some(c));
    assert_eq!(remote::chain_of("default/7/my-snapshot"), None);
}

/// A committed remote layer at snapshot id `id`, of repository `repo` on a
/// registry that is not there, whose index is at `loc`.
fn remote_record(id: u64, repo: &str, loc: &IndexLocation) -> Record {
    let now = SystemTime::now();
    Record {
        id,
        kind: Kind::Committed,
        parent: None,
        labels: HashMap::new(),
        created: now,
        updated: now,
        usage: None,
        remote: Some(RemoteRef {
            registry: "127.0.0.1:9".into(),
            repository: repo.into(),
            blob: Digest::of(b"blob").to_string(),
            location: loc.to_annotations(),
            manifest: None,
            also: Vec::new(),
            plain_http: false,
        }),
    }
}
