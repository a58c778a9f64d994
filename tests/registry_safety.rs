//! The fetcher and the registry client against hostile or broken servers:
//! tiny HTTP servers in the test that record what they were sent, answer
//! without end, or never answer at all; and a real `docker-registry` next
//! to a stalled one.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response};
use hyperbox::digest::Digest;
use hyperbox::fetcher::{FetchConfig, FetchError, Fetcher, Priority};
use hyperbox::registry::{BlobBody, Client, RegistryConfig, RegistryError, Repo};
use hyperbox::store::{Store, StoreConfig};
use rand::{RngCore, SeedableRng};

/// A request as a test server saw it: path and Authorization header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// An HTTP server on `ip` (any port) answering with `answer(path, authorization)`.
async fn serve(
    ip: &str,
    answer: impl Fn(&str, Option<&str>) -> Response<Body> + Send + Sync + 'static,
) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let answer = Arc::new(answer);
    let (s2, a2) = (seen.clone(), answer.clone());
    let make = make_service_fn(move |_| {
        let (seen, answer) = (s2.clone(), a2.clone());
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req: Request<Body>| {
                let path = req.uri().to_string();
                let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
                seen.lock().unwrap().push((path.clone(), auth.clone()));
                let resp = answer(&path, auth.as_deref());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            }))
        }
    });
    let server = hyper::Server::bind(&format!("{ip}:0").parse().unwrap()).serve(make);
    let addr = server.local_addr().to_string();
    tokio::spawn(server);
    (addr, seen)
}

fn status(code: u16, headers: &[(&str, String)], body: Body) -> Response<Body> {
    let mut b = Response::builder().status(code);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(body).unwrap()
}

/// A body that never ends (1 KiB pieces, as fast as they are read).
fn endless() -> Body {
    let piece = bytes::Bytes::from(vec![b'x'; 1024]);
    Body::wrap_stream(futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(piece.clone())))
}

fn client_with(insecure: &[String], read_timeout_ms: u64) -> Client {
    let cfg = RegistryConfig {
        insecure: insecure.to_vec(),
        read_timeout_ms,
        connect_timeout_ms: 1_000,
        ..RegistryConfig::default()
    };
    Client::new(&cfg, false).unwrap()
}

fn digest() -> Digest {
    Digest::of(b"some blob")
}

/// The token service a registry points at gets the registry's basic
/// credentials only if it is the registry's own origin, https, or a host the
/// config names; never a plain-http service on another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_to_a_plain_http_realm_on_another_host() {
    // The token service, on another loopback host (127.0.0.2).
    let (tokens, token_seen) = serve("127.0.0.2", |_, _| status(200, &[], Body::from(r#"{"token":"t0ken"}"#))).await;
    let realm = format!("http://{tokens}/token");
    let (registry, registry_seen) = serve("127.0.0.1", {
        let realm = realm.clone();
        move |path, _| {
            if path.starts_with("/token") {
                return status(200, &[], Body::from(r#"{"token":"own"}"#));
            }
            status(401, &[("www-authenticate", format!("Bearer realm=\"{realm}\",service=\"s\""))], Body::empty())
        }
    })
    .await;
    let repo = Repo { registry: registry.clone(), name: "t/x".into() };
    let c = client_with(&[], 5_000);
    c.set_credentials(&registry, "user", "secret");
    let err = c.get_blob_range(&repo, &digest(), 0, 10).await.unwrap_err();
    assert!(matches!(err, RegistryError::Status { status: 401, .. }), "{err:?}");
    let seen = token_seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the token service was not asked");
    assert!(seen.iter().all(|(_, auth)| auth.is_none()), "credentials went to {realm}: {seen:?}");

    // Named in the config (`registry.insecure`): the operator vouches for it.
    let c = client_with(&[tokens.clone()], 5_000);
    c.set_credentials(&registry, "user", "secret");
    let _ = c.get_blob_range(&repo, &digest(), 0, 10).await;
    let seen = token_seen.lock().unwrap().clone();
    assert!(seen.last().is_some_and(|(_, a)| a.as_deref().is_some_and(|a| a.starts_with("Basic "))), "{seen:?}");

    // A token service on the registry's host but another port is another
    // origin: over plain http, no credentials either.
    let (other_port, other_port_seen) =
        serve("127.0.0.1", |_, _| status(200, &[], Body::from(r#"{"token":"t0ken"}"#))).await;
    let other_realm = format!("http://{other_port}/token");
    let (registry2, _) = serve("127.0.0.1", move |_, _| {
        status(401, &[("www-authenticate", format!("Bearer realm=\"{other_realm}\""))], Body::empty())
    })
    .await;
    let c = client_with(&[], 5_000);
    c.set_credentials(&registry2, "user", "secret");
    let repo2 = Repo { registry: registry2.clone(), name: "t/x".into() };
    let _ = c.get_blob_range(&repo2, &digest(), 0, 10).await;
    let seen = other_port_seen.lock().unwrap().clone();
    assert!(!seen.is_empty() && seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");

    // The registry's own origin as the realm: the credentials go there.
    let _ = c.get_blob_range(&repo, &digest(), 0, 10).await;
    let me: Arc<std::sync::OnceLock<String>> = Arc::default();
    let me2 = me.clone();
    let (own, own_seen) = serve("127.0.0.1", move |path, _| {
        if path.starts_with("/token") {
            return status(200, &[], Body::from(r#"{"token":"own"}"#));
        }
        let realm = format!("http://{}/token", me2.get().map_or("", |s| s.as_str()));
        status(401, &[("www-authenticate", format!("Bearer realm=\"{realm}\""))], Body::empty())
    })
    .await;
    me.set(own.clone()).unwrap();
    let _ = registry_seen;
    c.set_credentials(&own, "user", "secret");
    let repo3 = Repo { registry: own.clone(), name: "t/x".into() };
    let _ = c.get_blob_range(&repo3, &digest(), 0, 10).await;
    let seen = own_seen.lock().unwrap().clone();
    let to_token: Vec<_> = seen.iter().filter(|(p, _)| p.starts_with("/token")).collect();
    assert!(
        !to_token.is_empty() && to_token.iter().all(|(_, a)| a.as_deref().is_some_and(|a| a.starts_with("Basic "))),
        "{seen:?}"
    );
}

/// A registry answering a blob with a redirect to another origin (its
/// storage): the credentials the registry asked for are not sent along.
/// reqwest drops them on a redirect to another host or port; this pins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_not_forwarded_on_a_cross_origin_redirect() {
    for storage_ip in ["127.0.0.1", "127.0.0.2"] {
        let (storage, storage_seen) = serve(storage_ip, |_, _| status(404, &[], Body::empty())).await;
        let location = format!("http://{storage}/blob");
        let (registry, _) = serve("127.0.0.1", move |_, auth| match auth {
            Some(_) => status(307, &[("location", location.clone())], Body::empty()),
            None => status(401, &[("www-authenticate", "Basic realm=\"r\"".to_string())], Body::empty()),
        })
        .await;
        let c = client_with(&[], 5_000);
        c.set_credentials(&registry, "user", "secret");
        let repo = Repo { registry: registry.clone(), name: "t/x".into() };
        let _ = c.get_blob_range(&repo, &digest(), 0, 10).await;
        let seen = storage_seen.lock().unwrap().clone();
        assert!(!seen.is_empty(), "{storage_ip}: the redirect was not followed");
        assert!(seen.iter().all(|(_, a)| a.is_none()), "{storage_ip}: credentials followed the redirect: {seen:?}");
    }
}

/// Error bodies and token responses are read up to a limit, however long
/// the server goes on: the error comes at once and says what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_error_bodies_and_token_responses_are_cut_off() {
    let (registry, _) = serve("127.0.0.1", |_, _| status(500, &[], endless())).await;
    let c = client_with(&[], 5_000);
    let repo = Repo { registry: registry.clone(), name: "t/x".into() };
    let began = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), c.get_manifest(&repo, "latest")).await;
    let err = got.expect("an endless error body is read without end").unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(5), "{:?}", began.elapsed());
    match &err {
        RegistryError::Status { status: 500, body, .. } => {
            assert!(body.len() <= 300 && body.starts_with("xxx"), "{body}")
        }
        other => panic!("{other:?}"),
    }

    let (tokens, _) = serve("127.0.0.1", |_, _| status(200, &[], endless())).await;
    let realm = format!("http://{tokens}/token");
    let (registry, _) = serve("127.0.0.1", move |_, _| {
        status(401, &[("www-authenticate", format!("Bearer realm=\"{realm}\""))], Body::empty())
    })
    .await;
    let repo = Repo { registry: registry.clone(), name: "t/x".into() };
    let got = tokio::time::timeout(Duration::from_secs(10), c.get_manifest(&repo, "latest")).await;
    let err = got.expect("an endless token response is read without end").unwrap_err();
    assert!(err.to_string().contains("larger than 262144 bytes"), "{err}");
}

/// A TCP server that accepts connections and never answers; counts them.
async fn stalled() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = l.accept().await {
            n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(sock);
        }
    });
    (addr, n)
}

/// A layer of its own: no chunk in common with another seed's (a reader
/// of a chunk another layer is fetching waits for that fetch).
fn test_layer(seed: u64) -> hyperbox::testing::Layer {
    let mut data = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let mut small = Vec::new();
    for i in 0..20 {
        small.push(format!("file {i} of layer {seed}\n"));
    }
    let mut b = common::LayerBuilder::new().dir("d").file("d/big", 0o644, &data);
    for (i, s) in small.iter().enumerate() {
        b = b.file(&format!("d/s{i}"), 0o644, s.as_bytes());
    }
    b.convert()
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ok() {
        assert!(began.elapsed() < Duration::from_secs(10), "{what}: not after 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A demand read's `timeout_ms` runs from its request: queued behind a
/// stalled registry's requests, it fails when its own time is up, not
/// `timeout_ms` after it finally gets a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_read_times_out_from_its_request_not_its_slot() {
    let (addr, accepted) = stalled().await;
    let layer = test_layer(11);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
    let cfg = FetchConfig {
        max_concurrent_requests: 2,
        max_prefetch_requests: 1,
        max_requests_per_registry: 2,
        max_request_bytes: 0,
        attempts: 1,
        timeout_ms: 2_000,
        ..FetchConfig::default()
    };
    let f = Fetcher::new(Arc::new(client_with(&[], 60_000)), store, cfg);
    let remote = layer.remote(Repo { registry: addr.clone(), name: "t/x".into() });
    let mut held = Vec::new();
    for frame in [0usize, 1] {
        let (f, r) = (f.clone(), remote.clone());
        held.push(tokio::spawn(async move { f.read_frames(&r, &[frame], Priority::Demand).await }));
    }
    wait_for("two requests on the wire", || accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2).await;
    let began = Instant::now();
    let err = f.read_frames(&remote, &[2], Priority::Demand).await.unwrap_err();
    let took = began.elapsed();
    eprintln!("after {took:?}: {err}");
    assert!(took < Duration::from_millis(3_000), "{took:?}: {err}");
    assert!(err.to_string().contains("fetch.timeout_ms (2000 ms)"), "{err}");
    assert!(matches!(err, FetchError::Remote { .. } | FetchError::Waited { .. }), "{err:?}");
    for h in held {
        h.abort();
    }
}

/// A registry that accepts connections and never answers holds its own
/// request slots only: demand reads and prefetch of an image in another
/// registry complete at once meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_does_not_hold_up_another_registry() {
    if !common::have_tools("a_stalled_registry_does_not_hold_up_another_registry", &["docker-registry"]) {
        return;
    }
    let registry = common::Registry::start();
    let layer = test_layer(12);
    let pusher = client_with(&[], 30_000);
    let repo = Repo { registry: registry.addr.clone(), name: "t/good".into() };
    pusher.push_blob(&repo, layer.digest(), BlobBody::Bytes(&layer.blob)).await.unwrap();
    let (addr, accepted) = stalled().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreConfig::default()).unwrap());
    let cfg = FetchConfig {
        max_concurrent_requests: 4,
        max_prefetch_requests: 2,
        max_requests_per_registry: 2,
        max_request_bytes: 0,
        attempts: 1,
        timeout_ms: 60_000,
        ..FetchConfig::default()
    };
    // Reads that stall wait for the 60 s timeouts, far past this test.
    let f = Fetcher::new(Arc::new(client_with(&[], 60_000)), store, cfg);
    let stalled_layer = test_layer(13);
    let bad = stalled_layer.remote(Repo { registry: addr.clone(), name: "t/stalled".into() });
    let mut held = Vec::new();
    let n = stalled_layer.index.frames().len();
    for frame in 0..n.min(6) {
        let (f, r) = (f.clone(), bad.clone());
        let prio = if frame % 2 == 0 { Priority::Demand } else { Priority::Prefetch };
        held.push(tokio::spawn(async move { f.read_frames(&r, &[frame], prio).await }));
    }
    wait_for("the stalled registry's requests on the wire", || accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2)
        .await;
    let good = layer.remote(repo);
    let m = layer.index.frames().len();
    let began = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), f.read(&good, 0..m / 2, Priority::Demand))
        .await
        .expect("demand reads from a healthy registry waited behind a stalled one")
        .unwrap();
    assert_eq!(got.len(), m / 2);
    let all: Vec<usize> = (0..m).collect();
    tokio::time::timeout(Duration::from_secs(10), f.fetch_into_store(&good, &all, Priority::Prefetch))
        .await
        .expect("prefetch from a healthy registry waited behind a stalled one")
        .unwrap();
    eprintln!("healthy registry served in {:?}", began.elapsed());
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2, "the stalled registry got more than its 2 slots");
    for h in held {
        h.abort();
    }
}

/// A repository's own credentials (as the CRI proxy keeps a pull secret):
/// a bearer token the registry lets expire is fetched again with them, and
/// another repository of the same registry asks anonymously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_fetched_again_with_a_repositorys_kept_credentials() {
    use base64::Engine;
    use std::sync::atomic::{AtomicU64, Ordering};
    let pod = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("pod:p"));
    // Each token is good for one request: every later request finds its
    // token expired.
    let live = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let origin: Arc<Mutex<String>> = Arc::default();
    let (o2, pod2) = (origin.clone(), pod.clone());
    let (registry, seen) = serve("127.0.0.1", move |path, auth| {
        if path.starts_with("/token") {
            if auth != Some(pod2.as_str()) {
                return status(401, &[], Body::empty());
            }
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            live.store(n, Ordering::SeqCst);
            return status(200, &[], Body::from(format!("{{\"token\":\"t{n}\"}}")));
        }
        let current = live.load(Ordering::SeqCst);
        if current > 0 && auth == Some(format!("Bearer t{current}").as_str()) {
            live.store(0, Ordering::SeqCst);
            return status(206, &[("content-range", "bytes 0-9/100".into())], Body::from(vec![7u8; 10]));
        }
        let realm = format!("http://{}/token", o2.lock().unwrap());
        status(401, &[("www-authenticate", format!("Bearer realm=\"{realm}\",service=\"s\""))], Body::empty())
    })
    .await;
    *origin.lock().unwrap() = registry.clone();
    let c = client_with(&[], 5_000);
    let repo = Repo { registry: registry.clone(), name: "team/private".into() };
    c.set_repo_credentials(&repo, "pod", "p");
    for _ in 0..3 {
        assert_eq!(c.get_blob_range(&repo, &digest(), 0, 10).await.unwrap(), vec![7u8; 10]);
    }
    let tokens: Vec<Option<String>> =
        seen.lock().unwrap().iter().filter(|(p, _)| p.starts_with("/token")).map(|(_, a)| a.clone()).collect();
    assert_eq!(tokens.len(), 3, "one token per expiry: {tokens:?}");
    assert!(tokens.iter().all(|a| a.as_deref() == Some(pod.as_str())), "{tokens:?}");

    // Another repository: no credentials of its own, none of the registry's.
    let other = Repo { registry: registry.clone(), name: "team/other".into() };
    let err = c.get_blob_range(&other, &digest(), 0, 10).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let last = seen.lock().unwrap().iter().rev().find(|(p, _)| p.starts_with("/token")).cloned();
    assert_eq!(last.and_then(|(_, a)| a), None, "the other repository's token request carried credentials");
}
