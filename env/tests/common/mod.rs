//! Helpers shared by the live tests: copies of the fixture trees in `tests/fixtures/live` and, in
//! [`netns`], a network namespace to run against the real kernel. moderato-agent's deploy tests
//! compile this same file by `#[path]` (from `agent/tests/common/mod.rs`).

// Every test binary compiles its own copy of these helpers and uses only some of them.
#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};

use moderato_env::live::CoalesceParams;

/// What the virtio guest fixture's `eth0` reports: a virtio-net device without NOTF_COAL
/// (per-packet, adaptive-rx off, no adaptive-tx).
pub const VIRTIO_DEFAULT: CoalesceParams = CoalesceParams {
    rx_usecs: Some(0),
    rx_frames: Some(1),
    tx_usecs: Some(0),
    tx_frames: Some(1),
    adaptive_rx: Some(false),
    adaptive_tx: None,
};

/// A file or tree of `env/tests/fixtures/live` (found from the workspace root, so that the path is
/// right in moderato-agent's tests too).
pub fn fixture(rel: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    workspace.join("env/tests/fixtures/live").join(rel)
}

/// Copies a tree, keeping relative symlinks as links.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Copies a fixture tree and creates the symlinks its `links.txt` lists (the fixtures store
/// sysfs's links as a list: real sysfs loops through `device/net/<if>/device`).
pub fn copy_fixture(from: &Path, to: &Path) {
    copy_tree(from, to);
    if let Ok(text) = std::fs::read_to_string(from.join("links.txt")) {
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (path, target) = line.split_once(" -> ").unwrap();
            let at = to.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, at).unwrap();
        }
    }
}

/// A copy of the fixture sysfs tree `name` with its symlinks created, in a fresh temporary
/// directory (kept while the returned `TempDir` lives).
pub fn sysfs(name: &str) -> (tempfile::TempDir, PathBuf) {
    let from = fixture(name);
    assert!(from.join("links.txt").is_file(), "{} lists no links", from.display());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(name);
    copy_fixture(&from, &root);
    (dir, root)
}
