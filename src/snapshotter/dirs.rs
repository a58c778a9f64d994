//! Every path of a snapshot comes from here: `<root>/snapshots/<id>/{fs,work}`
//! (`snapshots` and each `<id>` 0700: see [`PRIVATE`]),
//! made as `new-<id>-<rand>` and renamed into place before the metadata
//! commits; a failed call removes its dir, and `Cleanup` removes dirs no
//! snapshot owns (a crash between rename and commit, or a dir that could
//! not be removed).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::{io_err, Result};
use super::meta::Usage;
use super::Snapshotter;

impl Snapshotter {
    pub(super) fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }
    pub(super) fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }
    pub(super) fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Make `<root>/snapshots/<id>` with `fs` (and `work`), staged under a
    /// temporary name and renamed into place.
    pub(super) fn make_dirs(&self, id: u64, work: bool) -> Result<()> {
        let snapshots = self.root.join("snapshots");
        let staged = tempfile::Builder::new()
            .prefix(&format!("new-{id}-"))
            .tempdir_in(&snapshots)
            .map_err(io_err(format!("create a dir in {}", snapshots.display())))?;
        // As containerd's overlay snapshotter: `<id>` stays 0700 (tempdir's
        // mode), so no local user reaches a layer or a container's upper dir
        // through it; `fs` is 0755 since it becomes the container's `/`
        // (whatever the process umask), and overlayfs wants `work` 0711.
        let fs = staged.path().join("fs");
        std::fs::create_dir(&fs).map_err(io_err("create fs dir"))?;
        set_mode(&fs, 0o755)?;
        if work {
            let work = staged.path().join("work");
            std::fs::create_dir(&work).map_err(io_err("create work dir"))?;
            set_mode(&work, 0o711)?;
        }
        let dest = self.dir(id);
        if dest.exists() {
            // Left by a crash before its metadata committed: nobody owns it.
            remove_dir(&dest);
        }
        let staged = staged.keep();
        std::fs::rename(&staged, &dest).map_err(io_err(format!("rename {} into place", staged.display())))?;
        Ok(())
    }
}

/// The mode of `<root>`, `<root>/snapshots` and each `<id>`: only root may
/// walk to a layer's mount or a container's upper dir, which hold the
/// image's setuid binaries and device nodes (containerd's CVE-2021-41103).
pub(super) const PRIVATE: u32 = 0o700;

pub(super) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Remove a dir tree; failures are logged (Cleanup tries again).
pub(super) fn remove_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove snapshot dir; Cleanup will retry");
        }
    }
}

/// Blocks in use and distinct inodes under `path`, not crossing mounts (as
/// containerd's `fs.DiskUsage`).
pub(super) fn disk_usage(path: &Path) -> Result<Usage> {
    let dev = std::fs::symlink_metadata(path).map_err(io_err(format!("stat {}", path.display())))?.dev();
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(io_err(format!("stat {}", p.display())))?;
        if m.dev() != dev {
            continue;
        }
        if seen.insert(m.ino()) {
            usage.inodes += 1;
            usage.size += m.blocks() as i64 * 512;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(io_err(format!("read {}", p.display())))? {
                stack.push(e.map_err(io_err(format!("read {}", p.display())))?.path());
            }
        }
    }
    Ok(usage)
}
