//! The mounts containerd performs for a snapshot, as its overlay
//! snapshotter builds them: no parent is a bind of `fs`; a view of one
//! parent is a read-only bind of it; otherwise overlay with the topmost
//! layer first in `lowerdir`.

use super::meta::{Kind, Meta, Record};
use super::Snapshotter;

/// A mount for containerd to perform (`type source options`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

impl Snapshotter {
    /// Mounts for a snapshot, as containerd's overlay snapshotter builds them.
    pub(super) fn mounts_of(&self, meta: &Meta, rec: &Record) -> Vec<MountSpec> {
        let mut lower: Vec<String> =
            meta.chain(rec.parent.as_deref()).map(|(_, r)| self.fs_dir(r.id).display().to_string()).collect();
        let bind = |source: String, ro: bool| MountSpec {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let ro = rec.kind != Kind::Active;
        if lower.is_empty() {
            return vec![bind(self.fs_dir(rec.id).display().to_string(), ro)];
        }
        if ro && lower.len() == 1 {
            return vec![bind(lower.remove(0), true)];
        }
        let mut options = vec!["index=off".to_string()];
        if !ro {
            options.push(format!("workdir={}", self.work_dir(rec.id).display()));
            options.push(format!("upperdir={}", self.fs_dir(rec.id).display()));
        }
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![MountSpec { kind: "overlay".into(), source: "overlay".into(), options }]
    }
}
