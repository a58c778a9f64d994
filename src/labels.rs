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

/// What a layer's Prepare labels say of the image it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLabels<'a> {
    /// The chain id to commit as ([`TARGET`]).
    pub target: Option<&'a str>,
    /// The image reference: `hyperbox pull`'s, else the CRI's.
    pub image_ref: Option<&'a str>,
    /// The layer's blob digest: `hyperbox pull`'s, else the CRI's.
    pub layer_digest: Option<&'a str>,
    /// The CRI's platform manifest digest (its image ref may name an index).
    pub manifest_digest: Option<&'a str>,
    /// Fetch the whole image in the background.
    pub hydrate: bool,
}

impl<'a> LayerLabels<'a> {
    pub fn read(labels: &'a HashMap<String, String>) -> LayerLabels<'a> {
        let get = |k: &str| labels.get(k).map(String::as_str);
        LayerLabels {
            target: get(TARGET),
            image_ref: get(IMAGE_REF).or_else(|| get(CRI_IMAGE_REF)),
            layer_digest: get(LAYER_DIGEST).or_else(|| get(CRI_LAYER_DIGEST)),
            manifest_digest: get(CRI_MANIFEST_DIGEST),
            hydrate: get(HYDRATE) == Some("true"),
        }
    }
}

/// The labels worth keeping on a committed remote layer: all but the CRI's
/// per-pull ones (`cri.image-layers` can be long), whose image ref, layer
/// and manifest digests stay.
pub fn keep_on_commit(key: &str) -> bool {
    !key.starts_with(CRI_PREFIX) || key == CRI_IMAGE_REF || key == CRI_LAYER_DIGEST || key == CRI_MANIFEST_DIGEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyperbox_labels_come_before_the_cri_ones() {
        let mut l = HashMap::new();
        l.insert(CRI_IMAGE_REF.to_string(), "cri/ref".to_string());
        l.insert(CRI_LAYER_DIGEST.to_string(), "sha256:cri".to_string());
        l.insert(TARGET.to_string(), "sha256:chain".to_string());
        let r = LayerLabels::read(&l);
        assert_eq!(
            (r.image_ref, r.layer_digest, r.target),
            (Some("cri/ref"), Some("sha256:cri"), Some("sha256:chain"))
        );
        assert!(!r.hydrate);
        l.insert(IMAGE_REF.to_string(), "hb/ref".to_string());
        l.insert(LAYER_DIGEST.to_string(), "sha256:hb".to_string());
        l.insert(HYDRATE.to_string(), "true".to_string());
        let r = LayerLabels::read(&l);
        assert_eq!((r.image_ref, r.layer_digest, r.hydrate), (Some("hb/ref"), Some("sha256:hb"), true));
    }

    #[test]
    fn only_per_pull_cri_labels_are_dropped() {
        assert!(keep_on_commit(TARGET) && keep_on_commit(CRI_IMAGE_REF) && keep_on_commit(CRI_MANIFEST_DIGEST));
        assert!(keep_on_commit("containerd.io/snapshot/hyperbox.index-offset"));
        assert!(!keep_on_commit("containerd.io/snapshot/cri.image-layers"));
    }
}
