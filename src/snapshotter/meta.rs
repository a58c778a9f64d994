//! Snapshot metadata: one row per snapshot in the store's snapshot family
//! (JSON, keyed by name; the family name carries the layout version), and
//! the next id. Each call that changes anything writes one atomic, synced
//! batch ([`Meta::transact`]); the in-memory map changes only after it lands.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::error::{Result, SnapshotError};
use super::filter::Fields;
use crate::store::{Family, Store};
use crate::trace::ImageKey;

const KEY_NEXT_ID: &[u8] = b"next-id";
const SNAP_PREFIX: &str = "snap/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What `Stat`, `List` and `Update` speak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    pub name: String,
    /// Empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.name.clone()),
            [f] if f == "parent" => Some(self.parent.clone()),
            [f] if f == "kind" => Some(self.kind.as_str().to_string()),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => self.labels.get(&rest.join(".")).cloned(),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Where a remote layer's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RemoteRef {
    pub(super) registry: String,
    pub(super) repository: String,
    pub(super) blob: String,
    /// The index location's annotations, kept here because Update may
    /// change the snapshot's labels.
    #[serde(default)]
    pub(super) location: HashMap<String, String>,
    /// The manifest digest of the image it was prepared for (the trace's
    /// key), when the labels said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) manifest: Option<String>,
    /// The manifest digests of other images pulled through this layer
    /// since (images sharing it), for `hyperbox prefetch` of those images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) also: Vec<String>,
    /// Its registry serves plain http (`hyperbox pull --plain-http`): said
    /// again to the registry client when the layer is mounted after a
    /// restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) plain_http: bool,
}

impl RemoteRef {
    pub(super) fn image(&self) -> Option<ImageKey> {
        Some(ImageKey { digest: self.manifest.clone()?, repository: format!("{}/{}", self.registry, self.repository) })
    }
}

/// One snapshot's row (JSON; the family name carries the layout version).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) id: u64,
    pub(super) kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) parent: Option<String>,
    #[serde(default)]
    pub(super) labels: HashMap<String, String>,
    pub(super) created: SystemTime,
    pub(super) updated: SystemTime,
    /// Measured at commit (the dir no longer changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) remote: Option<RemoteRef>,
}

pub(super) struct Meta {
    pub(super) snaps: HashMap<String, Record>,
    pub(super) next_id: u64,
}

impl Meta {
    /// Read every row of the snapshot family.
    pub(super) fn load(store: &Store) -> Result<Meta> {
        let mut snaps = HashMap::new();
        let mut next_id = 1;
        for (k, v) in store.rows(Family::Snapshots)? {
            if k == KEY_NEXT_ID {
                next_id = u64::from_le_bytes(
                    v.as_slice().try_into().map_err(|_| SnapshotError::Corrupt("next-id is not 8 bytes".into()))?,
                );
            } else if let Some(name) = k.strip_prefix(SNAP_PREFIX.as_bytes()) {
                let name = String::from_utf8(name.to_vec())
                    .map_err(|_| SnapshotError::Corrupt("a snapshot name is not UTF-8".into()))?;
                let rec: Record = serde_json::from_slice(&v)
                    .map_err(|e| SnapshotError::Corrupt(format!("snapshot {name:?}: {e}")))?;
                snaps.insert(name, rec);
            }
        }
        Ok(Meta { snaps, next_id })
    }

    /// Write one call's changes durably in one batch, then apply them in
    /// memory.
    pub(super) fn transact(
        &mut self,
        store: &Store,
        puts: Vec<(String, Record)>,
        deletes: Vec<String>,
        next_id: u64,
    ) -> Result<()> {
        let mut rows = Vec::with_capacity(puts.len() + deletes.len() + 1);
        for name in &deletes {
            rows.push((format!("{SNAP_PREFIX}{name}").into_bytes(), None));
        }
        for (name, rec) in &puts {
            let v = serde_json::to_vec(rec).expect("a record serializes");
            rows.push((format!("{SNAP_PREFIX}{name}").into_bytes(), Some(v)));
        }
        if next_id != self.next_id {
            rows.push((KEY_NEXT_ID.to_vec(), Some(next_id.to_le_bytes().to_vec())));
        }
        store.write_rows(Family::Snapshots, &rows)?;
        for name in deletes {
            self.snaps.remove(&name);
        }
        self.snaps.extend(puts);
        self.next_id = next_id;
        Ok(())
    }

    /// `top` and its ancestors, topmost first (empty for no parent).
    pub(super) fn chain<'a>(&'a self, top: Option<&'a str>) -> impl Iterator<Item = (&'a str, &'a Record)> + 'a {
        std::iter::successors(top.and_then(|n| self.snaps.get_key_value(n)), |(_, r)| {
            r.parent.as_deref().and_then(|p| self.snaps.get_key_value(p))
        })
        .map(|(n, r)| (n.as_str(), r))
    }

    /// Whether `parent` can take a child: none, or a committed snapshot.
    pub(super) fn parent_ok(&self, parent: &str) -> bool {
        parent.is_empty() || self.snaps.get(parent).is_some_and(|p| p.kind == Kind::Committed)
    }
}

pub(super) fn info(name: &str, rec: &Record) -> Info {
    Info {
        kind: rec.kind,
        name: name.to_string(),
        parent: rec.parent.clone().unwrap_or_default(),
        labels: rec.labels.clone(),
        created: rec.created,
        updated: rec.updated,
    }
}
