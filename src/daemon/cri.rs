//! Private images on Kubernetes: a CRI image service in front of
//! containerd's, so the credentials of a pull (a Kubernetes pull secret)
//! reach hyperboxd.
//!
//! kubelet sends a pull secret only with its `PullImage` call to the CRI
//! image service; containerd uses it for the manifest and the downloads it
//! makes, and a snapshotter never sees it, so the layers of a private image
//! could never be lazy. With `[cri] image_service_address` set, hyperboxd
//! serves that socket (kubelet's `--image-service-endpoint` names it) and
//! forwards every call to containerd's CRI unchanged, byte for byte, both
//! ways. Of a `PullImage` it first reads the image and the credentials and
//! keeps them for that repository of that registry only
//! ([`Keychain`]); then containerd pulls, the snapshotter's Prepare finds
//! the credentials, and the layers are lazy. stargz-snapshotter's "CRI
//! keychain" is the same idea.
//!
//! The credentials are kept in `<root>/cri-credentials.json` (0600, in the
//! 0700 root), so that after a restart hyperboxd can still fetch for the
//! containers it serves; they are never logged. A later pull of the same
//! repository with other credentials (a rotated secret) replaces them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body::Body as _;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::oci::Reference;
use crate::registry::{Client, Repo};

/// The CRI image service's pull, in both API versions kubelet speaks.
const PULL_PATHS: [&str; 2] = ["/runtime.v1.ImageService/PullImage", "/runtime.v1alpha2.ImageService/PullImage"];

/// A PullImage request is an image name, a pull secret and a pod sandbox
/// config: far below this. A larger one is refused, not buffered.
const MAX_PULL_REQUEST: usize = 1 << 20;

/// At most this many repositories' credentials are kept; one more replaces
/// the one used least recently.
pub const MAX_KEPT: usize = 4096;

// Of CRI's runtime.v1 messages, only the fields read here. The request
// is forwarded as it came, so fields left out are not lost.
#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AuthConfig {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    password: String,
    /// base64 of `username:password`, as docker's config.json keeps it.
    #[prost(string, tag = "3")]
    auth: String,
    #[prost(string, tag = "4")]
    server_address: String,
    #[prost(string, tag = "5")]
    identity_token: String,
    #[prost(string, tag = "6")]
    registry_token: String,
}

/// One repository's credentials. No `Debug`: nothing can print them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Secret {
    username: String,
    password: String,
    /// When a pull last brought them (unix seconds): the least recent goes
    /// first when [`MAX_KEPT`] are kept.
    #[serde(default)]
    used: u64,
}

/// The credentials CRI pulls brought, by `registry/repository`: handed to
/// the registry client (for that repository only) and kept in a 0600 file.
pub struct Keychain {
    path: PathBuf,
    client: Arc<Client>,
    kept: Mutex<BTreeMap<String, Secret>>,
}

impl Keychain {
    /// Open the keychain file at `path` (none yet is an empty keychain) and
    /// hand what it keeps to `client`. A file that cannot be read or parsed
    /// is logged and set aside: the next pull of each image brings its
    /// credentials again.
    pub fn open(path: &Path, client: Arc<Client>) -> Keychain {
        let kept: BTreeMap<String, Secret> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "unreadable CRI credentials; starting without them");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the CRI credentials; starting without them");
                BTreeMap::new()
            }
        };
        for (key, s) in &kept {
            if let Some(repo) = repo_of_key(key) {
                client.set_repo_credentials(&repo, &s.username, &s.password);
            }
        }
        if !kept.is_empty() {
            tracing::info!(repositories = kept.len(), "CRI pull credentials loaded");
        }
        Keychain { path: path.to_path_buf(), client, kept: Mutex::new(kept) }
    }

    /// Repositories with credentials kept.
    pub fn len(&self) -> usize {
        self.kept.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep `username`/`password` for `repo`, for the registry client and
    /// on disk.
    fn remember(&self, repo: &Repo, username: &str, password: &str) -> io::Result<()> {
        let key = format!("{}/{}", repo.registry, repo.name);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let secret = Secret { username: username.to_string(), password: password.to_string(), used: now };
        self.client.set_repo_credentials(repo, username, password);
        let mut kept = self.kept.lock();
        // The same secret again within the hour: nothing to write.
        if let Some(s) = kept.get(&key) {
            if s.username == username && s.password == password && now.saturating_sub(s.used) < 3600 {
                return Ok(());
            }
        }
        if !kept.contains_key(&key) && kept.len() >= MAX_KEPT {
            if let Some(oldest) = kept.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| k.clone()) {
                kept.remove(&oldest);
                if let Some(repo) = repo_of_key(&oldest) {
                    self.client.forget_repo_credentials(&repo);
                }
            }
        }
        kept.insert(key, secret);
        write_private(&self.path, &serde_json::to_vec(&*kept).map_err(io::Error::other)?)
    }

    /// Read a PullImage request's gRPC message: keep its credentials, if it
    /// has any, for its image's repository. Returns the image named.
    fn learn(&self, message: &[u8]) -> Option<String> {
        let req = match <PullImageRequest as prost::Message>::decode(message) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a CRI PullImage that does not decode; forwarded as it is");
                return None;
            }
        };
        let image = req.image.map(|i| i.image).unwrap_or_default();
        let Some(auth) = req.auth else { return Some(image) };
        let Ok(reference) = image.parse::<Reference>() else {
            tracing::warn!(image = %image, "a CRI PullImage of an image reference HyperBox cannot parse");
            return Some(image);
        };
        let Some((user, password)) = credentials(&auth) else {
            if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
                tracing::warn!(
                    image = %image,
                    "the pull secret carries a token, not a username and password: hyperboxd cannot use it, and \
                     this image's layers will be downloaded"
                );
            }
            return Some(image);
        };
        match self.remember(&reference.repo, &user, &password) {
            Ok(()) => tracing::info!(image = %image, registry = %reference.repo.registry, "CRI pull credentials kept"),
            Err(e) => tracing::error!(
                image = %image,
                path = %self.path.display(),
                error = %e,
                "CRI pull credentials are used, but could not be saved for a restart"
            ),
        }
        Some(image)
    }
}

/// Username and password from a CRI AuthConfig: given as such, or as
/// docker's base64 `auth`.
fn credentials(auth: &AuthConfig) -> Option<(String, String)> {
    if !auth.username.is_empty() {
        return Some((auth.username.clone(), auth.password.clone()));
    }
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth.auth.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    (!u.is_empty()).then(|| (u.to_string(), p.to_string()))
}

/// `registry/repository` back to a [`Repo`] (the registry part has no `/`).
fn repo_of_key(key: &str) -> Option<Repo> {
    let (registry, name) = key.split_once('/')?;
    (!registry.is_empty() && !name.is_empty()).then(|| Repo { registry: registry.into(), name: name.into() })
}

/// Replace `path` with `bytes`, mode 0600 from the start, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("credentials")));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A gRPC error answer (trailers only), as containerd would give one.
fn grpc_error(code: tonic::Code, message: &str) -> Response<Body> {
    let message: String = message.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).collect();
    Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", (code as i32).to_string())
        .header("grpc-message", message.replace('%', "%25"))
        .body(Body::empty())
        .expect("a valid response")
}

/// The one gRPC message of a unary request body (5-byte frame header,
/// uncompressed): `None` if it is not one.
fn unary_message(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    (flag == 0 && rest.len() == 4 + len).then(|| &rest[4..])
}

/// Forward one call to containerd; a PullImage's credentials are kept
/// first.
async fn forward(req: Request<Body>, mut containerd: Channel, keychain: Arc<Keychain>) -> Response<Body> {
    use tower::{Service, ServiceExt};
    let (parts, body) = req.into_parts();
    let body: tonic::body::BoxBody = if PULL_PATHS.contains(&parts.uri.path()) {
        let limited = http_body::Limited::new(body, MAX_PULL_REQUEST);
        let bytes = match hyper::body::to_bytes(limited).await {
            Ok(b) => b,
            Err(e) => {
                return grpc_error(tonic::Code::InvalidArgument, &format!("PullImage request: {e}"));
            }
        };
        match unary_message(&bytes) {
            Some(message) => {
                keychain.learn(message);
            }
            None => tracing::warn!("a CRI PullImage that is not one uncompressed message; forwarded as it is"),
        }
        http_body::Full::new(bytes).map_err(|never: Infallible| -> tonic::Status { match never {} }).boxed_unsync()
    } else {
        body.map_err(|e| tonic::Status::from_error(Box::new(e))).boxed_unsync()
    };
    let req = Request::from_parts(parts, body);
    match containerd.ready().await {
        Ok(channel) => match channel.call(req).await {
            Ok(resp) => resp,
            Err(e) => grpc_error(tonic::Code::Unavailable, &format!("containerd's CRI: {e}")),
        },
        Err(e) => grpc_error(tonic::Code::Unavailable, &format!("containerd's CRI: {e}")),
    }
}

/// A channel to containerd's socket, connected when first used (and again
/// after containerd restarts).
fn containerd_channel(socket: PathBuf) -> Channel {
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector_lazy(tower::service_fn(move |_| tokio::net::UnixStream::connect(socket.clone())))
}

/// Serve the CRI image service proxy on `listener` until `shutdown`: every
/// call goes on to containerd's CRI at `containerd`.
pub async fn serve(
    listener: tokio::net::UnixListener,
    containerd: PathBuf,
    keychain: Arc<Keychain>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), hyper::Error> {
    let channel = containerd_channel(containerd);
    let make = make_service_fn(move |_| {
        let (channel, keychain) = (channel.clone(), keychain.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |req| {
                let (channel, keychain) = (channel.clone(), keychain.clone());
                async move { Ok::<_, Infallible>(forward(req, channel, keychain).await) }
            }))
        }
    });
    let incoming = hyper::server::accept::from_stream(tokio_stream::wrappers::UnixListenerStream::new(listener));
    hyper::Server::builder(incoming).http2_only(true).serve(make).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn client() -> Arc<Client> {
        Arc::new(Client::new(&crate::registry::RegistryConfig::default(), false).unwrap())
    }

    fn pull(image: &str, auth: Option<AuthConfig>) -> Vec<u8> {
        PullImageRequest { image: Some(ImageSpec { image: image.into() }), auth }.encode_to_vec()
    }

    #[test]
    fn credentials_of_a_pull_are_kept_0600_per_repository_and_survive_a_reopen() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri-credentials.json");
        let k = Keychain::open(&path, client());
        assert!(k.is_empty());
        // As kubelet sends a dockerconfigjson secret: base64 user:password.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode("bob:pa:ss");
        let auth = AuthConfig { auth: b64, ..Default::default() };
        assert_eq!(
            k.learn(&pull("registry.example:5000/team/app:1", Some(auth))).as_deref(),
            Some("registry.example:5000/team/app:1")
        );
        // As username and password.
        let auth = AuthConfig { username: "alice".into(), password: "s3cret".into(), ..Default::default() };
        k.learn(&pull("registry.example:5000/other:2", Some(auth)));
        // No auth, a token only, garbage: nothing kept.
        k.learn(&pull("registry.example:5000/public:1", None));
        k.learn(&pull(
            "registry.example:5000/tok:1",
            Some(AuthConfig { registry_token: "t".into(), ..Default::default() }),
        ));
        k.learn(b"\xff\xff not protobuf");
        assert_eq!(k.len(), 2);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("registry.example:5000/team/app") && text.contains("pa:ss"), "{text}");
        let again = Keychain::open(&path, client());
        assert_eq!(again.len(), 2);
        let kept = again.kept.lock();
        let s = &kept["registry.example:5000/team/app"];
        assert_eq!((s.username.as_str(), s.password.as_str()), ("bob", "pa:ss"));
    }

    #[test]
    fn a_broken_keychain_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri-credentials.json");
        std::fs::write(&path, b"{not json").unwrap();
        let k = Keychain::open(&path, client());
        assert!(k.is_empty());
        let auth = AuthConfig { username: "a".into(), password: "b".into(), ..Default::default() };
        k.learn(&pull("r.example/x:1", Some(auth)));
        assert_eq!(Keychain::open(&path, client()).len(), 1);
    }

    #[test]
    fn the_least_recent_goes_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keychain::open(&dir.path().join("c.json"), client());
        {
            let mut kept = k.kept.lock();
            for i in 0..MAX_KEPT {
                kept.insert(
                    format!("r.example/r{i}"),
                    Secret { username: "u".into(), password: "p".into(), used: 10 + i as u64 },
                );
            }
        }
        let auth = AuthConfig { username: "n".into(), password: "p".into(), ..Default::default() };
        k.learn(&pull("r.example/new:1", Some(auth)));
        let kept = k.kept.lock();
        assert_eq!(kept.len(), MAX_KEPT);
        assert!(kept.contains_key("r.example/new") && !kept.contains_key("r.example/r0"));
    }

    #[test]
    fn unary_frames() {
        assert_eq!(unary_message(&[0, 0, 0, 0, 2, 7, 8]), Some(&[7u8, 8][..]));
        assert_eq!(unary_message(&[1, 0, 0, 0, 2, 7, 8]), None, "compressed");
        assert_eq!(unary_message(&[0, 0, 0, 0, 3, 7, 8]), None, "short");
        assert_eq!(unary_message(&[0, 0, 0]), None);
        assert_eq!(unary_message(&[]), None);
    }
}
