//! Why a layer's Prepare was not served lazily: each such Prepare takes the
//! ordinary path (containerd downloads and unpacks the layer), which works
//! but is slow, and an operator must be able to tell that it happened and
//! why. Every fallback is counted by reason (`/metrics`), and those of
//! HyperBox layers are kept, a bounded number of the latest, for
//! `hyperbox pull` (which prints each layer's reason) and `hyperbox doctor`
//! (which names registries the daemon could not reach).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use super::remote::RemoteError;
use crate::fetcher::{FetchError, TryError};

/// The latest fallbacks kept for [`Fallbacks::find`] and
/// [`Fallbacks::recent`]: enough for every layer of the pulls of the last
/// minutes on a busy node, and a bounded memory (a few hundred KiB).
pub const KEPT: usize = 1024;

/// A fallback's reason, as `/metrics` labels it (`reason="..."`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The layer has no HyperBox index annotations: an ordinary layer.
    NotHyperbox,
    /// HyperBox annotations that cannot be right (not counted as an
    /// ordinary layer: the image claims to be converted).
    BadAnnotations,
    /// No image reference and layer digest from a source the image cannot
    /// forge (`hyperbox pull`'s token, the CRI in `k8s.io`).
    NoImageRef,
    /// A snapshot of that chain id exists with another parent or index, or
    /// appeared or lost its parent meanwhile.
    Conflict,
    /// The layer's index could not be fetched from the registry.
    Registry,
    /// The layer's index, or the labels naming it, failed a check: its
    /// digest, its bounds, the chain id it claims.
    Integrity,
    /// Over the node's caps (`daemon.max_layers`,
    /// `daemon.max_index_memory_mb`).
    Cap,
    /// The FUSE mount or the layer's dirs failed.
    Mount,
    /// The local store or metadata failed, or hyperboxd is stopping.
    Local,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::NotHyperbox,
        Reason::BadAnnotations,
        Reason::NoImageRef,
        Reason::Conflict,
        Reason::Registry,
        Reason::Integrity,
        Reason::Cap,
        Reason::Mount,
        Reason::Local,
    ];

    /// The metric label and the admin API's name.
    pub fn label(self) -> &'static str {
        match self {
            Reason::NotHyperbox => "not_hyperbox",
            Reason::BadAnnotations => "bad_annotations",
            Reason::NoImageRef => "no_image_ref",
            Reason::Conflict => "conflict",
            Reason::Registry => "registry",
            Reason::Integrity => "integrity",
            Reason::Cap => "cap",
            Reason::Mount => "mount",
            Reason::Local => "local",
        }
    }

    /// What it means, for a person.
    pub fn meaning(self) -> &'static str {
        match self {
            Reason::NotHyperbox => "not a HyperBox layer (convert the image with `hyperbox convert`)",
            Reason::BadAnnotations => "the layer's HyperBox annotations are invalid",
            Reason::NoImageRef => {
                "no image reference from a source hyperboxd trusts (pull with `hyperbox pull`, or through CRI with \
                 disable_snapshot_annotations = false)"
            }
            Reason::Conflict => "a snapshot of the same chain id exists with another parent or layer index",
            Reason::Registry => "hyperboxd could not get the layer's index from the registry",
            Reason::Integrity => "the layer's index failed a check",
            Reason::Cap => "the node's cap on mounted layers or their memory is reached",
            Reason::Mount => "the FUSE mount failed",
            Reason::Local => "hyperboxd's store or metadata failed",
        }
    }

    fn index(self) -> usize {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why one Prepare fell back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotLazy {
    pub reason: Reason,
    /// The error, as the daemon's log has it.
    pub detail: String,
}

impl NotLazy {
    pub fn new(reason: Reason, detail: impl Into<String>) -> NotLazy {
        NotLazy { reason, detail: detail.into() }
    }
}

impl From<RemoteError> for NotLazy {
    fn from(e: RemoteError) -> NotLazy {
        let reason = match &e {
            RemoteError::Reference(_) | RemoteError::Digest(_) => Reason::NoImageRef,
            RemoteError::Location(_) => Reason::BadAnnotations,
            RemoteError::NotAChain(_) | RemoteError::ChainMismatch { .. } => Reason::Integrity,
            RemoteError::Fetch(f) => fetch_reason(f),
            RemoteError::Cap(_) => Reason::Cap,
            RemoteError::Mount(_) | RemoteError::Dir(_) => Reason::Mount,
            RemoteError::OtherParent(_) | RemoteError::ParentGone(_) => Reason::Conflict,
            RemoteError::NoLocation | RemoteError::Stopping | RemoteError::Snapshot(_) => Reason::Local,
        };
        NotLazy { reason, detail: e.to_string() }
    }
}

/// A failed index fetch: the registry's fault (unreachable, refused, slow),
/// an index that failed verification, or the node's own store.
fn fetch_reason(e: &FetchError) -> Reason {
    match e {
        FetchError::IndexLocation { .. } => Reason::BadAnnotations,
        FetchError::Index { cause: TryError::Index { .. }, .. } => Reason::Integrity,
        FetchError::Store(_) => Reason::Local,
        _ => Reason::Registry,
    }
}

/// A kept fallback.
#[derive(Clone, Debug)]
pub struct Fallback {
    /// containerd's key of the Prepare (`<namespace>/<n>/<name>`).
    pub key: String,
    /// The chain id it would have been committed as.
    pub target: String,
    /// The registry host the layer is in, if the labels said.
    pub registry: Option<String>,
    pub why: NotLazy,
    pub at: SystemTime,
}

/// The counts by reason, and the latest [`KEPT`] fallbacks of HyperBox
/// layers.
#[derive(Default)]
pub struct Fallbacks {
    counts: [AtomicU64; Reason::ALL.len()],
    recent: Mutex<VecDeque<Fallback>>,
}

impl Fallbacks {
    /// Count a fallback; keep it unless the layer is an ordinary one
    /// (those are the normal case for unconverted images, not news).
    pub fn record(&self, key: &str, target: &str, registry: Option<&str>, why: NotLazy) {
        self.counts[why.reason.index()].fetch_add(1, Ordering::Relaxed);
        if why.reason == Reason::NotHyperbox {
            return;
        }
        let f = Fallback {
            key: key.to_string(),
            target: target.to_string(),
            registry: registry.map(str::to_string),
            why,
            at: SystemTime::now(),
        };
        let mut recent = self.recent.lock();
        if recent.len() >= KEPT {
            recent.pop_front();
        }
        recent.push_back(f);
    }

    /// Fallbacks counted since start, by reason.
    pub fn counts(&self) -> Vec<(Reason, u64)> {
        Reason::ALL.iter().map(|r| (*r, self.counts[r.index()].load(Ordering::Relaxed))).collect()
    }

    /// The latest fallback of the Prepare a client made as `name` in
    /// `namespace` (containerd passes it on as `<namespace>/<n>/<name>`).
    pub fn find(&self, namespace: &str, name: &str) -> Option<Fallback> {
        let recent = self.recent.lock();
        recent.iter().rev().find(|f| client_key(&f.key) == Some((namespace, name))).cloned()
    }

    /// The latest fallbacks, newest first, at most `max`.
    pub fn recent(&self, max: usize) -> Vec<Fallback> {
        self.recent.lock().iter().rev().take(max).cloned().collect()
    }
}

/// The namespace and the client's own key of containerd's metadata key
/// `<namespace>/<n>/<name>`.
fn client_key(key: &str) -> Option<(&str, &str)> {
    let ns = crate::labels::namespace_of(key)?;
    let rest = &key[ns.len() + 1..];
    let (_, name) = rest.split_once('/')?;
    Some((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_are_counted_by_reason_and_found_by_the_clients_key() {
        let f = Fallbacks::default();
        f.record("default/7/extract-1-sha256:a", "sha256:a", None, NotLazy::new(Reason::NotHyperbox, "plain"));
        f.record("default/8/extract-2-sha256:b", "sha256:b", Some("r.example"), NotLazy::new(Reason::Registry, "down"));
        f.record("k8s.io/9/extract-2-sha256:b", "sha256:b", None, NotLazy::new(Reason::Cap, "full"));
        let counts: Vec<(&str, u64)> = f.counts().iter().map(|(r, n)| (r.label(), *n)).collect();
        assert!(counts.contains(&("not_hyperbox", 1)) && counts.contains(&("registry", 1)), "{counts:?}");
        assert!(counts.contains(&("cap", 1)) && counts.contains(&("conflict", 0)), "{counts:?}");
        // Ordinary layers are counted, not kept.
        assert!(f.find("default", "extract-1-sha256:a").is_none());
        let got = f.find("default", "extract-2-sha256:b").expect("kept");
        assert_eq!((got.why.reason, got.registry.as_deref()), (Reason::Registry, Some("r.example")));
        assert_eq!(f.find("k8s.io", "extract-2-sha256:b").unwrap().why.reason, Reason::Cap);
        assert!(f.find("other", "extract-2-sha256:b").is_none());
        assert_eq!(f.recent(10).len(), 2);
        assert_eq!(f.recent(10)[0].key, "k8s.io/9/extract-2-sha256:b", "newest first");
    }

    #[test]
    fn only_the_latest_are_kept() {
        let f = Fallbacks::default();
        for i in 0..KEPT + 10 {
            f.record(&format!("default/{i}/k{i}"), "sha256:x", None, NotLazy::new(Reason::Conflict, ""));
        }
        assert_eq!(f.recent(usize::MAX).len(), KEPT);
        assert!(f.find("default", "k0").is_none());
        assert!(f.find("default", &format!("k{}", KEPT + 9)).is_some());
        assert_eq!(f.counts().iter().find(|(r, _)| *r == Reason::Conflict).unwrap().1, (KEPT + 10) as u64);
    }

    #[test]
    fn keys_with_slashes_in_the_name() {
        assert_eq!(client_key("default/3/a/b"), Some(("default", "a/b")));
        assert_eq!(client_key("sha256:x"), None);
    }
}
