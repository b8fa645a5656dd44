//! Records the git commit Baton is built from, for `baton --version`: a bug report
//! then names the exact source, not just the release.
//!
//! `BATON_BUILD_COMMIT` wins where there is no checkout to ask (an image built from a
//! source copy without `.git`); otherwise `git rev-parse` in this checkout, and
//! `unknown commit` when git or the checkout is missing. Cargo reruns this only when
//! the checked-out commit can have changed: HEAD, or the branch HEAD points to.

use std::path::{Path, PathBuf};
use std::process::Command;

const OVERRIDE: &str = "BATON_BUILD_COMMIT";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={OVERRIDE}");
    let commit = match std::env::var(OVERRIDE) {
        Ok(c) if c.trim().chars().any(char::is_control) => {
            panic!("{OVERRIDE} must be one line without control characters, got {c:?}")
        }
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => from_git().unwrap_or_else(|| "unknown commit".to_owned()),
    };
    println!("cargo:rustc-env=BATON_GIT_COMMIT={commit}");
}

/// The commit of the checkout this crate sits in, watching the files that move with it.
fn from_git() -> Option<String> {
    let crate_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    // Only Baton's own checkout: a packaged crate unpacked inside some other
    // repository must not claim that repository's commit.
    let top = git(&crate_dir, &["rev-parse", "--show-toplevel"])?;
    let workspace = crate_dir.join("../..").canonicalize().ok()?;
    if Path::new(&top).canonicalize().ok()? != workspace {
        return None;
    }
    watch(&crate_dir);
    git(&crate_dir, &["rev-parse", "--short=12", "HEAD"])
}

/// HEAD (per worktree) and the branch it points to. A file that does not exist would
/// make cargo rerun this on every build, so only existing ones are named; a branch
/// kept only in `packed-refs` gets that file and its directory, where the next commit
/// writes the loose ref.
fn watch(crate_dir: &Path) {
    let Some(head) = git_path(crate_dir, "HEAD") else {
        return;
    };
    rerun_if_changed(&head);
    let Some(branch) = git(crate_dir, &["symbolic-ref", "-q", "HEAD"]) else {
        return; // detached: HEAD holds the commit itself
    };
    match git_path(crate_dir, &branch) {
        Some(loose) if loose.is_file() => rerun_if_changed(&loose),
        loose => {
            if let Some(packed) = git_path(crate_dir, "packed-refs").filter(|p| p.is_file()) {
                rerun_if_changed(&packed);
            }
            if let Some(dir) = loose
                .as_deref()
                .and_then(Path::parent)
                .filter(|d| d.is_dir())
            {
                rerun_if_changed(dir);
            }
        }
    }
}

fn rerun_if_changed(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

/// Where git keeps `name` (HEAD in a worktree's own directory, branches in the common
/// one), as an absolute path.
fn git_path(crate_dir: &Path, name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(git(
        crate_dir,
        &["rev-parse", "--path-format=absolute", "--git-path", name],
    )?);
    Some(if p.is_absolute() {
        p
    } else {
        crate_dir.join(p)
    })
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}
