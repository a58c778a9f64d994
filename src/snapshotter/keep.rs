//! Remote layers that outlive the daemon. Each mounted layer's FUSE
//! connection has one /dev/fuse file; a duplicate of it is kept outside the
//! process (systemd's fd store, or the fd holder: `crate::daemon::fdstore`)
//! under a name, and what its INIT fixed is saved next to the layer
//! (`<id>/conn`, 0600). A daemon that starts again (after a crash, a
//! restart or an upgrade) gets the kept files back and serves each live
//! mount on its own connection ([`hyperbox_fuse::adopt`]): containers keep
//! their files, and reads that were in flight are sent again by the kernel.
//!
//! A layer is adopted only when everything agrees: a saved state, a kept
//! file of the saved name, the mount still there, and the same layer tree
//! numbering ([`crate::fs::TREE_VERSION`], and the same tree fingerprint):
//! serving a live connection with
//! other inode numbers would give containers wrong files. Anything else is
//! mounted afresh, as before (containers that used the old mount see it
//! fail; new ones get the new mount).

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::mount::ConnState;

/// Where duplicates of the layers' /dev/fuse files are kept while the
/// daemon is down. Implemented by the daemon (`crate::daemon::fdstore`).
pub trait FdKeeper: Send + Sync {
    /// Keep a duplicate of `fd` under `name`, replacing one of that name.
    fn put(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// Forget the file kept under `name`.
    fn remove(&self, name: &str) -> io::Result<()>;
}

/// The keeper, and what it handed back at start.
pub struct Keep {
    pub keeper: std::sync::Arc<dyn FdKeeper>,
    /// Files kept by an earlier process, by name.
    pub kept: HashMap<String, OwnedFd>,
}

/// What a layer's connection needs to be served again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Saved {
    /// The name its file is kept under: `hbl.<snapshot id>.<random>`, so a
    /// file is never taken for another layer's (ids are reused after a
    /// root is wiped).
    pub name: String,
    pub tree_version: u32,
    /// `LayerTree::fingerprint` of the tree served, hex: compared with the
    /// tree built again before adopting, so a numbering change that
    /// [`crate::fs::TREE_VERSION`] missed still refuses.
    pub tree: String,
    /// [`ConnState::to_bytes`], hex.
    pub state: String,
}

/// Largest `conn` file read back: a few hundred bytes are written.
const MAX_SAVED: u64 = 4096;

impl Saved {
    pub(super) fn new(id: u64, state: &ConnState, tree: &[u8; 32]) -> Saved {
        use rand::RngCore;
        let nonce = rand::rngs::OsRng.next_u64();
        Saved {
            name: format!("hbl.{id}.{nonce:016x}"),
            tree_version: crate::fs::TREE_VERSION,
            tree: hex::encode(tree),
            state: hex::encode(state.to_bytes()),
        }
    }

    pub(super) fn state(&self) -> io::Result<ConnState> {
        let b = hex::decode(&self.state).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        ConnState::from_bytes(&b)
    }

    /// Write to `path` (0600) and sync, replacing what is there: written
    /// before the file is kept, so a kept file always has its state.
    pub(super) fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The saved state at `path`; `None` if there is none.
    pub(super) fn read(path: &Path) -> io::Result<Option<Saved>> {
        use std::io::Read;
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut b = Vec::new();
        f.take(MAX_SAVED).read_to_end(&mut b)?;
        serde_json::from_slice(&b).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_round_trips_and_names_differ() {
        let dir = tempfile::tempdir().unwrap();
        let state =
            ConnState { minor: 38, offered: 1 << 39, flags: 1, max_readahead: 131072, max_write: 4096, max_pages: 256 };
        let a = Saved::new(7, &state, &[3; 32]);
        let b = Saved::new(7, &state, &[3; 32]);
        assert_ne!(a.name, b.name);
        assert!(a.name.starts_with("hbl.7.") && !a.name.contains(':'));
        let p = dir.path().join("conn");
        assert_eq!(Saved::read(&p).unwrap(), None);
        a.write(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let back = Saved::read(&p).unwrap().unwrap();
        assert_eq!(back, a);
        assert_eq!(back.state().unwrap(), state);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(Saved::read(&p).is_err());
        std::fs::write(&p, vec![b' '; 10_000]).unwrap();
        assert!(Saved::read(&p).is_err());
    }
}
