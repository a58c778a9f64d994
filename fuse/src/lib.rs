//! The FUSE adapter of HyperBox: the only crate that will name `fuser`.
//!
//! It translates FUSE operations into calls on `hyperbox::fs` (one call and
//! one reply per operation), so the filesystem logic stays testable without
//! `/dev/fuse`. It is built with the lazy filesystem (issue 4); until then the
//! crate is empty on purpose and nothing depends on it.
