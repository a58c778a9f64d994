//! Where images are read from and written to: a registry, or an OCI image
//! layout directory (`oci:PATH[:TAG]`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::digest::{Digest, Sha256Writer};
use crate::oci::{Reference, ReferenceError};
use crate::registry::{BlobBody, Client, Manifest, RegistryError};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Debug)]
pub enum ImageLocation {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
}

impl FromStr for ImageLocation {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s.strip_prefix("oci:") {
            Some(rest) => {
                // oci:PATH[:TAG]: a tag has no '/', so a colon inside the path is kept.
                let (dir, tag) = match rest.rsplit_once(':') {
                    Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                    _ => (rest, None),
                };
                if dir.is_empty() {
                    return Err(StoreError::Location(format!("{s:?}: oci: needs a directory")));
                }
                Ok(ImageLocation::Layout { dir: PathBuf::from(dir), tag })
            }
            None => {
                Ok(ImageLocation::Registry(s.parse().map_err(|e: ReferenceError| StoreError::Location(e.to_string()))?))
            }
        }
    }
}

impl std::fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageLocation::Registry(r) => write!(f, "{r}"),
            ImageLocation::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageLocation::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Location(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("OCI layout {dir}: {problem}")]
    Layout { dir: String, problem: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes to two sinks.
struct Tee<'a, A, B>(&'a mut A, &'a mut B);
impl<A: std::io::Write, B: std::io::Write> std::io::Write for Tee<'_, A, B> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(b)?;
        self.1.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

pub struct ImageStore {
    loc: ImageLocation,
    client: Arc<Client>,
}

impl ImageStore {
    pub fn new(loc: ImageLocation, client: Arc<Client>) -> Self {
        Self { loc, client }
    }

    pub fn location(&self) -> &ImageLocation {
        &self.loc
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn layout_err(dir: &Path, problem: impl Into<String>) -> StoreError {
        StoreError::Layout { dir: dir.display().to_string(), problem: problem.into() }
    }

    fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
        dir.join("blobs/sha256").join(d.hex())
    }

    fn read_layout_index(dir: &Path) -> Result<serde_json::Value, StoreError> {
        let p = dir.join("index.json");
        let text = std::fs::read(&p).map_err(|e| Self::layout_err(dir, format!("index.json: {e}")))?;
        serde_json::from_slice(&text).map_err(|e| Self::layout_err(dir, format!("index.json: {e}")))
    }

    /// The manifest or index the location names.
    pub async fn root(&self) -> Result<Manifest, StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.get_manifest(&r.repo, &r.target()).await?),
            ImageLocation::Layout { dir, tag } => {
                let index = Self::read_layout_index(dir)?;
                let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
                let matching: Vec<_> = manifests
                    .iter()
                    .filter(|m| tag.as_deref().is_none_or(|t| m["annotations"][REF_NAME].as_str() == Some(t)))
                    .collect();
                let desc = match (matching.as_slice(), tag) {
                    ([one], _) => *one,
                    ([], Some(t)) => return Err(Self::layout_err(dir, format!("no image tagged {t:?}"))),
                    ([], None) => return Err(Self::layout_err(dir, "holds no image")),
                    (_, _) => return Err(Self::layout_err(dir, "holds several images: name one as oci:PATH:TAG")),
                };
                let digest: Digest = desc["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| Self::layout_err(dir, format!("index.json: {e}")))?;
                let media_type = desc["mediaType"].as_str().unwrap_or_default().to_string();
                self.manifest(&digest, &media_type).await
            }
        }
    }

    /// A manifest (or index) by digest, verified.
    pub async fn manifest(&self, digest: &Digest, media_type: &str) -> Result<Manifest, StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.get_manifest(&r.repo, &digest.to_string()).await?),
            ImageLocation::Layout { .. } => {
                let bytes = self.blob(digest).await?;
                let media_type = if media_type.is_empty() {
                    serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
                        .unwrap_or_default()
                } else {
                    media_type.to_string()
                };
                Ok(Manifest { bytes, media_type, digest: digest.clone() })
            }
        }
    }

    /// A small blob, verified.
    pub async fn blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.get_blob(&r.repo, digest).await?),
            ImageLocation::Layout { dir, .. } => {
                let bytes = tokio::fs::read(Self::blob_path(dir, digest))
                    .await
                    .map_err(|e| Self::layout_err(dir, format!("blob {digest}: {e}")))?;
                if &Digest::of(&bytes) != digest {
                    return Err(Self::layout_err(dir, format!("blob {digest} does not match its digest")));
                }
                Ok(bytes)
            }
        }
    }

    /// Copy a blob of `size` bytes (as its descriptor says) into `dest`,
    /// verified; returns its size.
    pub async fn blob_to_file(
        &self,
        digest: &Digest,
        size: u64,
        dest: &Path,
        progress: impl FnMut(u64) + Send + 'static,
    ) -> Result<u64, StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => {
                Ok(self.client.get_blob_to_file(&r.repo, digest, size, dest, progress).await?)
            }
            ImageLocation::Layout { dir, .. } => {
                let src = Self::blob_path(dir, digest);
                let (dir, digest, dest) = (dir.clone(), digest.clone(), dest.to_path_buf());
                tokio::task::spawn_blocking(move || {
                    let mut progress = progress;
                    let mut input =
                        std::fs::File::open(&src).map_err(|e| Self::layout_err(&dir, format!("blob {digest}: {e}")))?;
                    let mut out = std::fs::File::create(&dest)?;
                    let mut hash = Sha256Writer::new();
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = std::io::Read::read(&mut input, &mut buf)?;
                        if n == 0 {
                            break;
                        }
                        hash.update(&buf[..n]);
                        if hash.len() > size {
                            return Err(Self::layout_err(
                                &dir,
                                format!("blob {digest} is longer than its {size} bytes"),
                            ));
                        }
                        std::io::Write::write_all(&mut out, &buf[..n])?;
                        progress(n as u64);
                    }
                    if hash.len() != size {
                        return Err(Self::layout_err(
                            &dir,
                            format!("blob {digest} is {} bytes, not {size}", hash.len()),
                        ));
                    }
                    if hash.finish() != digest {
                        return Err(Self::layout_err(&dir, format!("blob {digest} does not match its digest")));
                    }
                    Ok(size)
                })
                .await
                .expect("blob copy panicked")
            }
        }
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.blob_exists(&r.repo, digest).await?),
            ImageLocation::Layout { dir, .. } => Ok(Self::blob_path(dir, digest).exists()),
        }
    }

    pub async fn put_blob(&self, digest: &Digest, body: BlobBody<'_>) -> Result<(), StoreError> {
        match &self.loc {
            ImageLocation::Registry(r) => Ok(self.client.push_blob(&r.repo, digest, body).await?),
            ImageLocation::Layout { dir, .. } => {
                Self::init_layout(dir)?;
                let dest = Self::blob_path(dir, digest);
                // A unique temp file, verified, then renamed into place: a
                // blob in the layout is always whole and matches its name.
                let mut tmp = tempfile::NamedTempFile::new_in(dest.parent().unwrap())?;
                let mut hash = Sha256Writer::new();
                match body {
                    BlobBody::Bytes(b) => {
                        hash.update(b);
                        std::io::Write::write_all(&mut tmp, b)?;
                    }
                    BlobBody::File(p) => {
                        let mut input = std::fs::File::open(p)?;
                        let mut both = Tee(&mut hash, tmp.as_file_mut());
                        std::io::copy(&mut input, &mut both)?;
                    }
                }
                if &hash.finish() != digest {
                    return Err(Self::layout_err(dir, format!("blob {digest}: content does not match the digest")));
                }
                tmp.persist(&dest).map_err(|e| e.error)?;
                Ok(())
            }
        }
    }

    fn init_layout(dir: &Path) -> Result<(), StoreError> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            std::fs::write(marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !dir.join("index.json").exists() {
            std::fs::write(
                dir.join("index.json"),
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            )?;
        }
        Ok(())
    }

    /// Store a manifest; with `tagged`, also make it the location's image.
    pub async fn put_manifest(&self, bytes: &[u8], media_type: &str, tagged: bool) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        match &self.loc {
            ImageLocation::Registry(r) => {
                let target = if tagged { r.target() } else { digest.to_string() };
                self.client.put_manifest(&r.repo, &target, bytes, media_type).await?;
            }
            ImageLocation::Layout { dir, tag } => {
                self.put_blob(&digest, BlobBody::Bytes(bytes)).await?;
                if tagged {
                    let mut index = Self::read_layout_index(dir)?;
                    let mut desc =
                        serde_json::json!({"mediaType": media_type, "digest": digest.to_string(), "size": bytes.len()});
                    if let Some(t) = tag {
                        desc["annotations"] = serde_json::json!({ REF_NAME: t });
                    }
                    let list = index["manifests"]
                        .as_array_mut()
                        .ok_or_else(|| Self::layout_err(dir, "index.json has no manifests list"))?;
                    // Replace the image of the same name (or the unnamed one).
                    list.retain(|m| m["annotations"][REF_NAME].as_str() != tag.as_deref());
                    list.push(desc);
                    let tmp = dir.join("index.json.tmp");
                    std::fs::write(&tmp, serde_json::to_vec_pretty(&index).unwrap())?;
                    std::fs::rename(tmp, dir.join("index.json"))?;
                }
            }
        }
        Ok(digest)
    }
}
