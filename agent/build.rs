//! Records the source revision the binary is built from, for the provenance of frozen models
//! and `moderato --version` (the working directory at run time may be another checkout, or none).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let rev = git(&["describe", "--always", "--dirty"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MODERATO_SOURCE_REVISION={rev}");
    // Rebuild when the checked-out commit or the index changes. Ask git where they are: in a
    // worktree `.git` is a file, and HEAD and the index live in the worktree's own git directory.
    let head = git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]);
    let index = git(&["rev-parse", "--path-format=absolute", "--git-path", "index"]);
    let refs = git(&["rev-parse", "--symbolic-full-name", "HEAD"])
        .filter(|r| r.starts_with("refs/"))
        .and_then(|r| git(&["rev-parse", "--path-format=absolute", "--git-path", &r]));
    for p in [head, index, refs].into_iter().flatten() {
        if std::path::Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
