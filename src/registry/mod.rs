//! The OCI distribution client: the only module that names the HTTP client.
//!
//! Auth: anonymous or credentialed bearer tokens from the `WWW-Authenticate`
//! challenge (fetched again when a registry answers 401 to a token it has
//! expired), basic auth, credentials from docker's `config.json` or handed
//! over at run time ([`Client::set_credentials`], for CRI). Range reads insist
//! on `206 Partial Content` with a matching `Content-Range`. Mirrors are
//! listed per registry; [`Client::pull_sources`] gives the order to try them
//! in, and the caller (the fetcher) owns the retry policy, helped by
//! [`RegistryError::is_transient`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use reqwest::{header, Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

pub use crate::oci::{Reference, ReferenceError, Repo};

use crate::digest::{Digest, Sha256Writer};

/// Media types a manifest GET accepts, most specific first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The registry section of the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) reached over plain http instead of https.
    pub insecure: Vec<String>,
    /// docker `config.json` to read credentials from; default
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Mirrors to pull from before the registry itself, in order:
    /// `"docker.io" = ["mirror.example:5000", "http://10.0.0.5:5000"]`.
    /// A mirror written with `http://` is reached over plain http.
    pub mirrors: HashMap<String, Vec<String>>,
    /// Time allowed to open a connection.
    pub connect_timeout_ms: u64,
    /// Longest silence while waiting for a response or its next bytes: a
    /// stalled connection fails after this, and the fetcher retries.
    pub read_timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            docker_config: None,
            mirrors: HashMap::new(),
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{repo}: {what}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status { repo: String, what: String, status: u16, body: String },
    /// `error` is shown with its causes ("connection closed before message
    /// completed", "operation timed out"), which reqwest's own text omits.
    #[error("{repo}: {what}: {}", causes(.error))]
    Transport { repo: String, what: String, error: reqwest::Error },
    #[error("{repo}: {what}: {problem}")]
    Protocol { repo: String, what: String, problem: String },
    #[error("{repo}: {what}: authorization failed: {problem}")]
    Auth { repo: String, what: String, problem: String },
    #[error("credentials from {path}: {problem}")]
    Credentials { path: String, problem: String },
    /// A read with a time limit of its own (a token, a trace lookup) did
    /// not finish in time.
    #[error("{repo}: {what}: no complete answer within {ms} ms")]
    TimedOut { repo: String, what: String, ms: u64 },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl RegistryError {
    /// Whether trying again may help: a transport failure (refused, reset,
    /// timed out, cut short), a 5xx, 408 or 429, or a response that broke the
    /// protocol (a 200 for a range, a short body: proxies do this under
    /// load). Other 4xx answers are final.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { error, .. } => !error.is_builder() && !error.is_redirect(),
            RegistryError::Protocol { .. } | RegistryError::Io(_) | RegistryError::TimedOut { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            RegistryError::Reference(_) | RegistryError::Credentials { .. } | RegistryError::Auth { .. } => false,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    plain_http: bool,
    /// Hosts reached over plain http: `registry.insecure`, mirrors written
    /// with `http://`, and those a trusted pull named since
    /// ([`Client::use_plain_http`]).
    insecure: parking_lot::RwLock<Vec<String>>,
    /// registry → mirrors, in the order to try them.
    mirrors: HashMap<String, Vec<String>>,
    /// registry host → (user, password), from docker's config.json or
    /// [`Client::set_credentials`]; `host/repository` → (user, password)
    /// from [`Client::set_repo_credentials`], which go before the host's.
    creds: Mutex<HashMap<String, (String, String)>>,
    /// (registry, scope) → bearer token.
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// `localhost`, `127.x.x.x` or `[::1]`, with any port: reached over plain
/// http, as containerd's CRI plugin and docker do by default.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// A fetched manifest or index.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

impl Client {
    /// `plain_http` makes every registry use http (as `ctr --plain-http`).
    pub fn new(cfg: &RegistryConfig, plain_http: bool) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("hyperbox/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms.max(1)))
            .read_timeout(Duration::from_millis(cfg.read_timeout_ms.max(1)))
            .redirect(redirect_policy())
            .build()
            .map_err(|e| RegistryError::Transport { repo: String::new(), what: "HTTP client".into(), error: e })?;
        let mut insecure = cfg.insecure.clone();
        let mut mirrors = HashMap::new();
        for (registry, list) in &cfg.mirrors {
            let hosts = list
                .iter()
                .map(|m| match m.strip_prefix("http://") {
                    Some(host) => {
                        insecure.push(host.trim_end_matches('/').to_string());
                        host.trim_end_matches('/').to_string()
                    }
                    None => m.trim_start_matches("https://").trim_end_matches('/').to_string(),
                })
                .collect();
            for host in &hosts {
                let bad = reqwest::Url::parse(&format!("http://{host}/v2/"))
                    .ok()
                    .filter(|u| u.host_str().is_some() && u.path() == "/v2/")
                    .is_none();
                if bad {
                    return Err(RegistryError::Protocol {
                        repo: registry.clone(),
                        what: "registry.mirrors".into(),
                        problem: format!("{host:?} is not host[:port] (optionally after http:// or https://)"),
                    });
                }
            }
            mirrors.insert(registry.clone(), hosts);
        }
        Ok(Self {
            http,
            plain_http,
            insecure: parking_lot::RwLock::new(insecure),
            mirrors,
            creds: Mutex::new(load_docker_credentials(cfg.docker_config.as_deref())?),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials for `registry` handed over at run time (the CRI passes
    /// them with each pull); they replace any from docker's config.json.
    pub fn set_credentials(&self, registry: &str, user: &str, secret: &str) {
        self.creds.lock().insert(registry.to_string(), (user.to_string(), secret.to_string()));
        // Tokens got with other credentials may carry other rights.
        self.tokens.lock().retain(|(r, _), _| r != registry);
    }

    /// Credentials for one repository (a Kubernetes pull secret, as the
    /// CRI passes it with a pull): used for that repository of that
    /// registry only, before any the registry has as a whole.
    pub fn set_repo_credentials(&self, repo: &Repo, user: &str, secret: &str) {
        let key = format!("{}/{}", repo.registry, repo.name);
        let old = self.creds.lock().insert(key, (user.to_string(), secret.to_string()));
        if old.as_ref().is_some_and(|(u, p)| u == user && p == secret) {
            return;
        }
        let scope = format!("repository:{}:", repo.name);
        self.tokens.lock().retain(|(r, s), _| r != &repo.registry || !s.starts_with(&scope));
    }

    /// Drop what [`Client::set_repo_credentials`] set for `repo`.
    pub fn forget_repo_credentials(&self, repo: &Repo) {
        self.creds.lock().remove(&format!("{}/{}", repo.registry, repo.name));
        let scope = format!("repository:{}:", repo.name);
        self.tokens.lock().retain(|(r, s), _| r != &repo.registry || !s.starts_with(&scope));
    }

    /// Where to read `repo`'s content from, in order: its mirrors, then
    /// the registry itself. Content is addressed by digest and verified, so
    /// a mirror can only be slow or wrong, never trusted.
    pub fn pull_sources(&self, repo: &Repo) -> Vec<Repo> {
        let mut out: Vec<Repo> = (self.mirrors.get(&repo.registry).into_iter().flatten())
            .map(|m| Repo { registry: m.clone(), name: repo.name.clone() })
            .collect();
        out.push(repo.clone());
        out
    }

    fn base(&self, registry: &str) -> String {
        let scheme =
            if self.plain_http || self.is_plain_http(registry) || is_loopback(registry) { "http" } else { "https" };
        let host = if registry == "docker.io" { "registry-1.docker.io" } else { registry };
        format!("{scheme}://{host}/v2/")
    }

    fn url(&self, repo: &Repo, rest: &str) -> String {
        format!("{}{}/{rest}", self.base(&repo.registry), repo.name)
    }

    /// Send a request built by `build`, authenticating on a 401 and retrying once.
    async fn send(
        &self,
        repo: &Repo,
        push: bool,
        what: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response> {
        let scope = format!("repository:{}:{}", repo.name, if push { "pull,push" } else { "pull" });
        let key = (repo.registry.clone(), scope.clone());
        let transport = |e| RegistryError::Transport { repo: repo.to_string(), what: what.to_string(), error: e };
        let base = self.base_url(repo, what)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = build(&self.http).build().map_err(transport)?;
            // Credentials go only to the registry itself, never to another
            // host an upload Location points at; a redirect to another
            // origin drops them (reqwest does, and `redirect_policy` refuses
            // https to http).
            let token = self.tokens.lock().get(&key).cloned();
            if let Some(t) = token.filter(|_| req.url().origin() == base.origin()) {
                if let Ok(v) = header::HeaderValue::from_str(&t) {
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
            }
            let resp = self.http.execute(req).await.map_err(transport)?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt >= 2 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let auth = self.authorize(repo, &base, &challenge, &scope, what).await?;
            self.tokens.lock().insert(key.clone(), auth);
        }
    }

    /// The registry's `/v2/` URL, parsed.
    fn base_url(&self, repo: &Repo, what: &str) -> Result<reqwest::Url> {
        reqwest::Url::parse(&self.base(&repo.registry)).map_err(|e| RegistryError::Protocol {
            repo: repo.to_string(),
            what: what.to_string(),
            problem: format!("{:?} is not a registry host: {e}", repo.registry),
        })
    }

    /// Reach `registry` over plain http from now on, as if
    /// `registry.insecure` listed it: `hyperbox pull --plain-http` says so
    /// for the registry of its lazy layers (with the pull token, which an
    /// image's annotations cannot carry), and a layer pulled so says so
    /// again when it is mounted after a restart.
    pub fn use_plain_http(&self, registry: &str) {
        let mut hosts = self.insecure.write();
        if !hosts.iter().any(|h| h == registry) {
            hosts.push(registry.to_string());
        }
    }

    /// Whether `registry` is reached over plain http by name
    /// (`registry.insecure`, an `http://` mirror, [`Client::use_plain_http`]).
    pub fn is_plain_http(&self, registry: &str) -> bool {
        self.insecure.read().iter().any(|h| h == registry)
    }

    /// Whether a registry's basic credentials may go to `realm`: its own
    /// origin, an https token service (as Docker Hub's auth.docker.io), or
    /// a host the config names as plain http (`registry.insecure`, a mirror
    /// written with `http://`). Never another host over plain http, where
    /// anyone on the path reads them.
    fn may_send_credentials(&self, base: &reqwest::Url, realm: &reqwest::Url) -> bool {
        if realm.origin() == base.origin() || realm.scheme() == "https" {
            return true;
        }
        let host = match (realm.host_str(), realm.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return false,
        };
        realm.scheme() == "http" && self.is_plain_http(&host)
    }

    /// Answer a `WWW-Authenticate` challenge with an `Authorization` value.
    async fn authorize(
        &self,
        repo: &Repo,
        base: &reqwest::Url,
        challenge: &str,
        scope: &str,
        what: &str,
    ) -> Result<String> {
        use base64::Engine;
        let creds = {
            let creds = self.creds.lock();
            creds.get(&format!("{}/{}", repo.registry, repo.name)).or_else(|| creds.get(&repo.registry)).cloned()
        };
        let basic = creds
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        let fail = |problem: String| RegistryError::Auth { repo: repo.to_string(), what: what.to_string(), problem };
        let (kind, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if kind.eq_ignore_ascii_case("basic") {
            return basic
                .ok_or_else(|| fail("registry asks for credentials and none are configured (docker login)".into()));
        }
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(fail(format!("unauthorized, with an auth challenge HyperBox does not know: {challenge:?}")));
        }
        let params = parse_challenge(params);
        let realm = params.get("realm").ok_or_else(|| fail("bearer challenge without a realm".into()))?;
        let realm_url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| fail(format!("bearer challenge with a realm that is not an http(s) URL: {realm:?}")))?;
        let mut req = self.http.get(realm_url.clone()).query(&[("scope", scope)]).timeout(TOKEN_TIMEOUT);
        if let Some(service) = params.get("service") {
            req = req.query(&[("service", service)]);
        }
        match basic {
            Some(b) if self.may_send_credentials(base, &realm_url) => req = req.header(header::AUTHORIZATION, b),
            Some(_) => {
                // An anonymous token may still do; say why if it does not.
                tracing::warn!(
                    registry = %repo.registry, realm = %realm,
                    "not sending credentials to a plain-http token service on another host"
                );
            }
            None => {}
        }
        let resp = req.send().await.map_err(|e| RegistryError::Transport {
            repo: repo.to_string(),
            what: "token".into(),
            error: e,
        })?;
        let status = resp.status().as_u16();
        if status >= 500 || status == 429 || status == 408 {
            // The token service is struggling: as transient as a registry 5xx.
            return Err(RegistryError::Status {
                repo: repo.to_string(),
                what: format!("{what}: token from {realm}"),
                status,
                body: String::new(),
            });
        }
        if !resp.status().is_success() {
            return Err(fail(format!("token endpoint {realm} answered HTTP {status}")));
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(resp, MAX_TOKEN_RESPONSE, repo, &format!("{what}: token from {realm}")).await?;
        let t: Token = serde_json::from_slice(&body).map_err(|e| fail(format!("token response: {e}")))?;
        let t = t.token.or(t.access_token).ok_or_else(|| fail("token response holds no token".into()))?;
        Ok(format!("Bearer {t}"))
    }

    async fn check(resp: Response, repo: &Repo, what: &str) -> Result<Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = read_prefix(resp, MAX_ERROR_BODY).await;
        Err(RegistryError::Status { repo: repo.to_string(), what: what.to_string(), status, body: error_text(&body) })
    }

    /// GET a manifest or index by tag or digest, verifying it against the
    /// digest when the reference names one.
    pub async fn get_manifest(&self, repo: &Repo, target: &str) -> Result<Manifest> {
        let what = format!("manifest {target}");
        let url = self.url(repo, &format!("manifests/{target}"));
        let resp = self.send(repo, false, &what, |c| c.get(&url).header(header::ACCEPT, MANIFEST_ACCEPT)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let bytes = read_limited(resp, MAX_MANIFEST, repo, &what).await?;
        let digest = Digest::of(&bytes);
        if let Ok(want) = target.parse::<Digest>() {
            if want != digest {
                return Err(RegistryError::Protocol {
                    repo: repo.to_string(),
                    what,
                    problem: format!("content hashes to {digest}"),
                });
            }
        }
        Ok(Manifest { bytes: bytes.to_vec(), media_type, digest })
    }

    pub async fn blob_exists(&self, repo: &Repo, digest: &Digest) -> Result<bool> {
        let what = format!("blob {digest}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, true, &what, |c| c.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Self::check(resp, repo, &what).await.map(|_| false),
        }
    }

    /// Download a blob of `size` bytes (its descriptor says) into `dest`,
    /// verifying length and digest. A body longer than `size` is cut off
    /// at once rather than written out.
    pub async fn get_blob_to_file(
        &self,
        repo: &Repo,
        digest: &Digest,
        size: u64,
        dest: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let what = format!("blob {digest}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, false, &what, |c| c.get(&url)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        let mut file = tokio::fs::File::create(dest).await?;
        let mut hash = Sha256Writer::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece =
                piece.map_err(|e| RegistryError::Transport { repo: repo.to_string(), what: what.clone(), error: e })?;
            if hash.len() + piece.len() as u64 > size {
                return Err(RegistryError::Protocol {
                    repo: repo.to_string(),
                    what,
                    problem: format!("body is longer than the descriptor's {size} bytes"),
                });
            }
            hash.update(&piece);
            file.write_all(&piece).await?;
            progress(piece.len() as u64);
        }
        file.flush().await?;
        if hash.len() != size {
            return Err(RegistryError::Protocol {
                repo: repo.to_string(),
                what,
                problem: format!("got {} bytes, the descriptor says {size}", hash.len()),
            });
        }
        let got = hash.finish();
        if &got != digest {
            return Err(RegistryError::Protocol {
                repo: repo.to_string(),
                what,
                problem: format!("content hashes to {got}"),
            });
        }
        Ok(size)
    }

    /// GET a small blob (a config) into memory, verifying its digest; at
    /// most [`MAX_SMALL_BLOB`] bytes.
    pub async fn get_blob(&self, repo: &Repo, digest: &Digest) -> Result<Vec<u8>> {
        self.get_blob_limited(repo, digest, MAX_SMALL_BLOB).await
    }

    /// GET a blob of at most `limit` bytes into memory, verifying its digest.
    pub async fn get_blob_limited(&self, repo: &Repo, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let what = format!("blob {digest}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, false, &what, |c| c.get(&url)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        let bytes = read_limited(resp, limit, repo, &what).await?;
        if &Digest::of(&bytes) != digest {
            return Err(RegistryError::Protocol {
                repo: repo.to_string(),
                what,
                problem: "content does not match its digest".into(),
            });
        }
        Ok(bytes.to_vec())
    }

    /// GET bytes `[offset, offset+len)` of a blob. Only a `206` whose
    /// `Content-Range` names exactly that range, with exactly `len` bytes, is
    /// accepted: a `200` carrying the whole blob is an error, never a range.
    pub async fn get_blob_range(&self, repo: &Repo, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        let what = format!("blob {digest} bytes {offset}+{len}");
        let fail = |problem: String| RegistryError::Protocol { repo: repo.to_string(), what: what.clone(), problem };
        if len == 0 {
            return Ok(Vec::new());
        }
        let last = offset.checked_add(len - 1).ok_or_else(|| fail("range overflows".into()))?;
        let url = self.url(repo, &format!("blobs/{digest}"));
        let range = format!("bytes={offset}-{last}");
        let resp = self.send(repo, false, &what, |c| c.get(&url).header(header::RANGE, &range)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(fail(format!("expected 206 Partial Content, got {}", resp.status().as_u16())));
        }
        let cr = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let want = format!("bytes {offset}-{last}/");
        if !cr.starts_with(&want) {
            return Err(fail(format!("Content-Range {cr:?} does not match the request")));
        }
        let bytes = read_limited(resp, len, repo, &what).await?;
        if bytes.len() as u64 != len {
            return Err(fail(format!("got {} bytes", bytes.len())));
        }
        Ok(bytes.to_vec())
    }

    /// The size of a blob, from a HEAD request.
    pub async fn blob_size(&self, repo: &Repo, digest: &Digest) -> Result<u64> {
        let what = format!("blob {digest}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, false, &what, |c| c.head(&url)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).ok_or_else(|| {
            RegistryError::Protocol { repo: repo.to_string(), what, problem: "no Content-Length".into() }
        })
    }

    /// Upload a blob (monolithic: POST for a session, then one PUT).
    pub async fn push_blob(&self, repo: &Repo, digest: &Digest, body: BlobBody<'_>) -> Result<()> {
        let what = format!("upload of blob {digest}");
        let url = self.url(repo, "blobs/uploads/");
        let resp =
            self.send(repo, true, &what, |c| c.request(Method::POST, &url).header(header::CONTENT_LENGTH, 0)).await?;
        let resp = Self::check(resp, repo, &what).await?;
        let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            RegistryError::Protocol { repo: repo.to_string(), what: what.clone(), problem: "no upload Location".into() }
        })?;
        let mut put_url =
            reqwest::Url::parse(&url).and_then(|base| base.join(location)).map_err(|e| RegistryError::Protocol {
                repo: repo.to_string(),
                what: what.clone(),
                problem: format!("bad Location: {e}"),
            })?;
        put_url.query_pairs_mut().append_pair("digest", &digest.to_string());
        let len = match &body {
            BlobBody::Bytes(b) => b.len() as u64,
            BlobBody::File(p) => std::fs::metadata(p)?.len(),
        };
        let resp = self
            .send(repo, true, &what, |c| {
                let payload = match &body {
                    BlobBody::Bytes(b) => reqwest::Body::from(b.to_vec()),
                    // A file that vanished mid-upload sends nothing; the
                    // registry then rejects the digest.
                    BlobBody::File(p) => match std::fs::File::open(p) {
                        Ok(f) => reqwest::Body::from(tokio::fs::File::from_std(f)),
                        Err(_) => reqwest::Body::from(Vec::new()),
                    },
                };
                c.put(put_url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len)
                    .body(payload)
            })
            .await?;
        Self::check(resp, repo, &what).await?;
        Ok(())
    }

    /// PUT a manifest under a tag or its digest.
    pub async fn put_manifest(&self, repo: &Repo, target: &str, bytes: &[u8], media_type: &str) -> Result<()> {
        self.put_manifest_with_subject(repo, target, bytes, media_type).await.map(|_| ())
    }

    /// PUT a manifest; true if the registry answered with `OCI-Subject`,
    /// i.e. it indexed the manifest's `subject` for the referrers API.
    pub async fn put_manifest_with_subject(
        &self,
        repo: &Repo,
        target: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<bool> {
        let what = format!("manifest {target}");
        let url = self.url(repo, &format!("manifests/{target}"));
        let resp = self
            .send(repo, true, &what, |c| c.put(&url).header(header::CONTENT_TYPE, media_type).body(bytes.to_vec()))
            .await?;
        let resp = Self::check(resp, repo, &what).await?;
        Ok(resp.headers().contains_key("oci-subject"))
    }

    /// The OCI 1.1 referrers of `subject` with `artifact_type` (an image
    /// index), or None if the registry has no referrers API (404, or 400 or
    /// 405 from registries that reject the path). Only the first page.
    pub async fn referrers(&self, repo: &Repo, subject: &Digest, artifact_type: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("referrers of {subject}");
        let url = self.url(repo, &format!("referrers/{subject}?artifactType={}", artifact_type.replace('+', "%2B")));
        let resp = self
            .send(repo, false, &what, |c| c.get(&url).header(header::ACCEPT, "application/vnd.oci.image.index.v1+json"))
            .await?;
        if matches!(resp.status().as_u16(), 400 | 404 | 405) {
            return Ok(None);
        }
        let resp = Self::check(resp, repo, &what).await?;
        Ok(Some(read_limited(resp, MAX_MANIFEST, repo, &what).await?))
    }
}

/// An error and its causes, outermost first, without repeats.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = c.source();
    }
    out
}

/// Largest manifest or index accepted (containerd's own limit is 4 MiB);
/// referrers lists too.
pub const MAX_MANIFEST: u64 = 8 << 20;
/// Largest blob [`Client::get_blob`] reads into memory (image configs).
pub const MAX_SMALL_BLOB: u64 = 64 << 20;
/// Largest token service response read (a JSON object holding a token; real
/// ones are a few KiB).
pub const MAX_TOKEN_RESPONSE: u64 = 256 << 10;
/// Bytes of an error response's body read (the rest is not read); its
/// first [`ERROR_TEXT_CHARS`] characters go into the error message.
pub const MAX_ERROR_BODY: u64 = 4 << 10;
/// Characters of an error body shown in an error message.
pub const ERROR_TEXT_CHARS: usize = 300;
/// The most a token request may take, connection to the end of the body.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirects followed for one request (reqwest's default is 10).
pub const MAX_REDIRECTS: usize = 5;

/// Follow at most [`MAX_REDIRECTS`] redirects, never from https to plain
/// http. reqwest drops `Authorization` (and cookies) on any redirect to
/// another host or port itself (0.12 `remove_sensitive_headers`; tested in
/// tests/registry_safety.rs), so a registry's redirect of a blob to its
/// storage gets no credentials; a downgrade to http on the same host and
/// port would keep them, so it is refused.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http" && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            attempt.error("refusing a redirect from https to plain http")
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    })
}

/// Up to `limit` bytes of a response's body, for an error message: a read
/// that fails ends it, the rest is never read.
async fn read_prefix(resp: Response, limit: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(piece)) = stream.next().await {
        let room = (limit as usize).saturating_sub(out.len());
        out.extend_from_slice(piece.get(..room.min(piece.len())).unwrap_or_default());
        if out.len() as u64 >= limit {
            break;
        }
    }
    out
}

/// An error body as text for a message: lossy UTF-8, control characters
/// shown escaped, at most [`ERROR_TEXT_CHARS`] characters.
fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for c in text.trim().chars().take(ERROR_TEXT_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Read a response body, failing as soon as it passes `limit` bytes: a
/// server cannot make us buffer without bound.
async fn read_limited(resp: Response, limit: u64, repo: &Repo, what: &str) -> Result<Vec<u8>> {
    let too_big = || RegistryError::Protocol {
        repo: repo.to_string(),
        what: what.to_string(),
        problem: format!("response is larger than {limit} bytes"),
    };
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0).min(limit) as usize);
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| RegistryError::Transport { repo: repo.to_string(), what: what.to_string(), error: e })?;
        if out.len() as u64 + piece.len() as u64 > limit {
            return Err(too_big());
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// What to upload.
pub enum BlobBody<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Parse `realm="...",service="...",scope="..."`.
fn parse_challenge(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, next) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(end) => (&v[..end], &v[end..]),
                None => (v, ""),
            }
        };
        out.insert(k, val.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// Read `auths` from docker's config.json: host → (user, password).
fn load_docker_credentials(path: Option<&Path>) -> Result<HashMap<String, (String, String)>> {
    use base64::Engine;
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker/config.json"),
                None => return Ok(HashMap::new()),
            },
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(RegistryError::Credentials { path: path.display().to_string(), problem: e.to_string() }),
    };
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, AuthEntry>,
    }
    #[derive(Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let bad = |problem: String| RegistryError::Credentials { path: path.display().to_string(), problem };
    let cfg: DockerConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for (host, a) in cfg.auths {
        let pair = match (a.auth, a.username, a.password) {
            (Some(auth), _, _) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| bad(format!("{host}: {e}")))?;
                let raw = String::from_utf8(raw).map_err(|_| bad(format!("{host}: auth is not UTF-8")))?;
                let (u, p) = raw.split_once(':').ok_or_else(|| bad(format!("{host}: auth is not user:password")))?;
                (u.to_string(), p.to_string())
            }
            (None, Some(u), Some(p)) => (u, p),
            _ => continue,
        };
        // docker writes Docker Hub as a URL; everything else as host[:port].
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let host = if host == "index.docker.io" { "docker.io".to_string() } else { host };
        out.insert(host, pair);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_http() {
        for r in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["docker.io", "10.0.0.1:5000", "registry.local:5000", "localhost.example:1", "[::2]:5000"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn challenge_params() {
        let p = parse_challenge(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
    }

    #[test]
    fn a_repositorys_own_credentials_go_first_and_only_to_it() {
        use base64::Engine;
        let c = Client::new(&RegistryConfig::default(), false).unwrap();
        let repo = |name: &str| Repo { registry: "r.example".into(), name: name.into() };
        let base = reqwest::Url::parse("https://r.example/v2/").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let basic = |r: &Repo| rt.block_on(c.authorize(r, &base, "Basic realm=\"x\"", "s", "manifest")).ok();
        let header = |up: &str| Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(up)));
        assert_eq!(basic(&repo("team/app")), None);
        c.set_credentials("r.example", "node", "n");
        c.set_repo_credentials(&repo("team/app"), "pod", "p");
        assert_eq!(basic(&repo("team/app")), header("pod:p"));
        assert_eq!(basic(&repo("team/other")), header("node:n"), "another repository gets the registry's");
        let elsewhere = Repo { registry: "s.example".into(), name: "team/app".into() };
        assert_eq!(basic(&elsewhere), None, "another registry gets nothing");
        c.forget_repo_credentials(&repo("team/app"));
        assert_eq!(basic(&repo("team/app")), header("node:n"));
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"r.example:5000":{"username":"a","password":"b"}}}"#).unwrap();
        let c = load_docker_credentials(Some(&p)).unwrap();
        assert_eq!(c["docker.io"], ("user".to_string(), "pass".to_string()));
        assert_eq!(c["r.example:5000"], ("a".to_string(), "b".to_string()));
    }
}
