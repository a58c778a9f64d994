//! The containerd label protocol a remote snapshotter speaks: which labels
//! a layer's Prepare carries, who sets them, and how HyperBox reads them.
//!
//! Only labels named `containerd.io/snapshot.ref` or prefixed
//! `containerd.io/snapshot/` reach a snapshotter. containerd's unpacker sets
//! the ref (the chain id the layer will be committed as) and copies the
//! layer descriptor's annotations of that prefix (HyperBox's index location,
//! `crate::format::IndexLocation`); the CRI plugin adds its `cri.*` labels;
//! `hyperbox pull` adds the `hyperbox.*` ones.
//!
//! A leaf: the snapshotter reads these, `hyperbox pull` writes them, and
//! neither imports the other.

use std::collections::HashMap;

/// The chain id the snapshot will be committed as, on a layer's Prepare.
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// Image reference and layer digest, as the CRI plugin passes them
/// (`disable_snapshot_annotations = false`).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The CRI's manifest digest of the image being pulled.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The prefix of every label the CRI plugin sets.
pub const CRI_PREFIX: &str = "containerd.io/snapshot/cri.";
/// Set by `hyperbox pull --hydrate`: fetch the whole image in the background.
pub const HYDRATE: &str = "containerd.io/snapshot/hyperbox.hydrate";
/// Image reference and layer digest, as `hyperbox pull` passes them.
pub const IMAGE_REF: &str = "containerd.io/snapshot/hyperbox.image-ref";
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/hyperbox.layer-digest";
/// Set by `hyperbox pull --plain-http`: reach the layer's registry over
/// plain http (believed only with the pull token: an image's annotations
/// must not downgrade a registry to http).
pub const PLAIN_HTTP: &str = "containerd.io/snapshot/hyperbox.plain-http";
/// The node's pull token (see [`Trust`]): proves the `hyperbox.*` labels
/// above came from `hyperbox pull`, not from the image's annotations.
pub const PULL_TOKEN: &str = "containerd.io/snapshot/hyperbox.pull-token";
/// The labels `hyperbox pull` sets and an image must not: it drops any
/// annotation of these names before setting its own.
pub const PULL_SET: [&str; 5] = [IMAGE_REF, LAYER_DIGEST, HYDRATE, PLAIN_HTTP, PULL_TOKEN];

/// The containerd namespace the CRI plugin pulls into, the only one whose
/// `cri.*` labels are believed. The CRI plugin overwrites those labels on
/// every layer it pulls, so an image cannot forge them there; in another
/// namespace (nerdctl, `ctr` with unpack) nothing overwrites them, and an
/// image's annotations of the same names would reach us unchanged.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Who set a Prepare's labels, as far as can be proved. containerd copies
/// every annotation of a layer descriptor prefixed `containerd.io/snapshot/`
/// into the labels, so any label may come from the image itself; those
/// that say which registry to fetch from (with the node's credentials),
/// which trace to write and whether to download everything are believed
/// only from a source the image cannot forge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `hyperbox pull`: the labels carry this node's pull token.
    Pull,
    /// The CRI plugin (namespace [`CRI_NAMESPACE`]).
    Cri,
    /// Neither: only the target and the index location are used.
    Unknown,
}

/// What the labels are checked against: the daemon's pull token, a random
/// secret made at each start and handed only to root, over the admin
/// socket, to `hyperbox pull`.
#[derive(Clone, Copy, Debug)]
pub struct Trust<'a> {
    pub pull_token: &'a str,
}

/// What a layer's Prepare labels say of the image it belongs to, from the
/// sources the labels can be trusted to have come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLabels<'a> {
    /// The chain id to commit as ([`TARGET`]).
    pub target: Option<&'a str>,
    /// Who set the labels below.
    pub source: Source,
    /// The image reference: `hyperbox pull`'s, else the CRI's.
    pub image_ref: Option<&'a str>,
    /// The layer's blob digest: `hyperbox pull`'s, else the CRI's.
    pub layer_digest: Option<&'a str>,
    /// The CRI's platform manifest digest (its image ref may name an index).
    pub manifest_digest: Option<&'a str>,
    /// Fetch the whole image in the background (`hyperbox pull` only).
    pub hydrate: bool,
    /// The registry serves plain http (`hyperbox pull --plain-http` only).
    pub plain_http: bool,
}

impl<'a> LayerLabels<'a> {
    /// Read the labels of a Prepare of snapshot `key` (containerd's
    /// namespaced key, `<namespace>/<n>/<name>`).
    pub fn read(labels: &'a HashMap<String, String>, key: &str, trust: Trust) -> LayerLabels<'a> {
        let get = |k: &str| labels.get(k).map(String::as_str);
        let target = get(TARGET);
        let pulled = get(PULL_TOKEN).is_some_and(|t| same_secret(t, trust.pull_token));
        if pulled {
            return LayerLabels {
                target,
                source: Source::Pull,
                image_ref: get(IMAGE_REF),
                layer_digest: get(LAYER_DIGEST),
                manifest_digest: None,
                hydrate: get(HYDRATE) == Some("true"),
                plain_http: get(PLAIN_HTTP) == Some("true"),
            };
        }
        if namespace_of(key) == Some(CRI_NAMESPACE) {
            return LayerLabels {
                target,
                source: Source::Cri,
                image_ref: get(CRI_IMAGE_REF),
                layer_digest: get(CRI_LAYER_DIGEST),
                manifest_digest: get(CRI_MANIFEST_DIGEST),
                hydrate: false,
                plain_http: false,
            };
        }
        LayerLabels {
            target,
            source: Source::Unknown,
            image_ref: None,
            layer_digest: None,
            manifest_digest: None,
            hydrate: false,
            plain_http: false,
        }
    }
}

/// The namespace of a key as containerd's metadata layer passes it.
pub fn namespace_of(key: &str) -> Option<&str> {
    let (ns, rest) = key.split_once('/')?;
    let (n, _) = rest.split_once('/')?;
    (!ns.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(ns)
}

/// Compare a presented token with the secret in time independent of where
/// they differ. An empty secret matches nothing.
fn same_secret(presented: &str, secret: &str) -> bool {
    let (a, b) = (presented.as_bytes(), secret.as_bytes());
    !b.is_empty() && a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The labels worth keeping on a committed remote layer: all but the CRI's
/// per-pull ones (`cri.image-layers` can be long), whose image ref, layer
/// and manifest digests stay, and but the pull token, the hydrate request
/// and the plain-http flag, which were for that one pull (the layer's
/// record keeps the last).
pub fn keep_on_commit(key: &str) -> bool {
    if key == PULL_TOKEN || key == HYDRATE || key == PLAIN_HTTP {
        return false;
    }
    !key.starts_with(CRI_PREFIX) || key == CRI_IMAGE_REF || key == CRI_LAYER_DIGEST || key == CRI_MANIFEST_DIGEST
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    const TRUST: Trust = Trust { pull_token: TOKEN };

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn cri_labels_are_believed_only_in_the_cri_namespace() {
        let l = labels(&[
            (TARGET, "sha256:chain"),
            (CRI_IMAGE_REF, "cri/ref"),
            (CRI_LAYER_DIGEST, "sha256:cri"),
            (CRI_MANIFEST_DIGEST, "sha256:m"),
        ]);
        let r = LayerLabels::read(&l, "k8s.io/12/extract-1 sha256:chain", TRUST);
        assert_eq!(r.source, Source::Cri);
        assert_eq!(
            (r.image_ref, r.layer_digest, r.manifest_digest, r.target),
            (Some("cri/ref"), Some("sha256:cri"), Some("sha256:m"), Some("sha256:chain"))
        );
        // nerdctl or `ctr` with unpack in another namespace: the same labels
        // may be the image's own annotations.
        let r = LayerLabels::read(&l, "default/12/extract-1 sha256:chain", TRUST);
        assert_eq!((r.source, r.image_ref, r.layer_digest), (Source::Unknown, None, None));
        assert_eq!(r.target, Some("sha256:chain"));
    }

    #[test]
    fn pull_labels_need_the_token() {
        let mut l = labels(&[
            (TARGET, "sha256:chain"),
            (IMAGE_REF, "evil.example/x@sha256:1"),
            (LAYER_DIGEST, "sha256:hb"),
            (HYDRATE, "true"),
            (PLAIN_HTTP, "true"),
            (CRI_IMAGE_REF, "cri/ref"),
            (CRI_LAYER_DIGEST, "sha256:cri"),
        ]);
        // Forged by annotations, in a CRI pull: the CRI's labels win,
        // nothing is hydrated and the registry stays https.
        let r = LayerLabels::read(&l, "k8s.io/3/x", TRUST);
        assert_eq!(
            (r.source, r.image_ref, r.layer_digest, r.hydrate, r.plain_http),
            (Source::Cri, Some("cri/ref"), Some("sha256:cri"), false, false)
        );
        let r = LayerLabels::read(&l, "default/3/x", TRUST);
        assert_eq!((r.source, r.hydrate, r.plain_http), (Source::Unknown, false, false));
        // A wrong token, of the right length or not, is no token.
        for bad in ["", "0123456789abcdef0123456789abcdeX", "0123"] {
            l.insert(PULL_TOKEN.into(), bad.into());
            assert_eq!(LayerLabels::read(&l, "default/3/x", TRUST).source, Source::Unknown, "{bad:?}");
        }
        l.insert(PULL_TOKEN.into(), TOKEN.into());
        let r = LayerLabels::read(&l, "default/3/x", TRUST);
        assert_eq!(
            (r.source, r.image_ref, r.layer_digest, r.hydrate, r.plain_http),
            (Source::Pull, Some("evil.example/x@sha256:1"), Some("sha256:hb"), true, true)
        );
        // A daemon without a token (none made) believes no token.
        l.insert(PULL_TOKEN.into(), String::new());
        assert_eq!(LayerLabels::read(&l, "default/3/x", Trust { pull_token: "" }).source, Source::Unknown);
    }

    #[test]
    fn namespaces_of_metadata_keys() {
        assert_eq!(namespace_of("k8s.io/12/extract-1 sha256:x"), Some("k8s.io"));
        assert_eq!(namespace_of("default/3/sha256:abc"), Some("default"));
        for k in ["sha256:abc", "k8s.io/x/abc", "/3/abc", "k8s.io/3"] {
            assert_eq!(namespace_of(k), None, "{k}");
        }
    }

    #[test]
    fn only_per_pull_labels_are_dropped() {
        assert!(keep_on_commit(TARGET) && keep_on_commit(CRI_IMAGE_REF) && keep_on_commit(CRI_MANIFEST_DIGEST));
        assert!(keep_on_commit("containerd.io/snapshot/hyperbox.index-offset"));
        assert!(!keep_on_commit("containerd.io/snapshot/cri.image-layers"));
        assert!(!keep_on_commit(PULL_TOKEN) && !keep_on_commit(HYDRATE) && !keep_on_commit(PLAIN_HTTP));
    }
}
