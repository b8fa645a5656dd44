//! What packagers and shells take from the binary itself: completions, manual pages,
//! and a version that names its commit.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{baton_bin, stderr, stdout};

/// `baton ARGS` in `cwd`, with a state directory that must stay untouched.
fn baton(cwd: &Path, args: &[&str]) -> Output {
    Command::new(baton_bin())
        .args(args)
        .current_dir(cwd)
        .env("BATON_DIR", cwd.join("state"))
        .output()
        .expect("baton runs")
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = baton(dir.path(), &["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    let rest = line
        .strip_suffix(")\n")
        .and_then(|l| l.strip_prefix("baton "))
        .unwrap_or_else(|| panic!("not `baton VERSION (COMMIT)`: {line:?}"));
    let (version, commit) = rest.split_once(" (").expect("a commit in parentheses");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    assert!(
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "not semver: {version}"
    );

    // What the build saw: the packager's override, else this checkout's HEAD (cargo
    // rebuilds baton when HEAD moves, so the binary under test is at HEAD), else none.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| stdout(&o).trim().to_owned());
    let expected = match (option_env!("BATON_BUILD_COMMIT"), head) {
        (Some(c), _) if !c.trim().is_empty() => c.trim().to_owned(),
        (_, Some(head)) => {
            assert!(
                head.len() == 12 && head.bytes().all(|b| b.is_ascii_hexdigit()),
                "git said {head:?}"
            );
            head
        }
        _ => "unknown commit".to_owned(),
    };
    assert_eq!(commit, expected, "{line}");

    // Subcommands say the same.
    let out = baton(dir.path(), &["status", "--version"]);
    assert_eq!(stdout(&out), format!("baton-status {rest})\n"));
}
