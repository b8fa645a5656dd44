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

/// Runs `script` in bash with the completion script loaded and returns the candidates
/// offered for `words` (the last one is being completed).
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let run = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; _baton baton '{}' '{prev}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words[cword],
    );
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &run])
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "bash: {}", stderr(&out));
    stdout(&out).lines().map(str::to_owned).collect()
}

#[test]
fn bash_completions_complete_commands_and_their_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = baton(dir.path(), &["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.starts_with("_baton() {"), "{script}");
    assert!(script.contains("complete -F _baton"), "{script}");
    for name in ["status", "promote", "completions", "man"] {
        assert!(script.contains(name), "{name} missing from the bash script");
    }

    // Loaded into a real bash, it completes what the command tree defines.
    let file = dir.path().join("baton.bash");
    std::fs::write(&file, &script).expect("write script");
    assert_eq!(bash_complete(&file, &["baton", "sta"]), ["status"]);
    assert_eq!(bash_complete(&file, &["baton", "prom"]), ["promote"]);
    let shells = bash_complete(&file, &["baton", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(
            shells.iter().any(|s| s == shell),
            "{shell} not offered: {shells:?}"
        );
    }
    assert!(
        !dir.path().join("state").exists(),
        "completions wrote state"
    );
}

#[test]
fn zsh_and_fish_completions_are_generated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = baton(dir.path(), &["completions", "zsh"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let zsh = stdout(&out);
    assert!(zsh.starts_with("#compdef baton"), "{zsh}");
    assert!(zsh.contains("status") && zsh.contains("promote"), "{zsh}");

    let out = baton(dir.path(), &["completions", "fish"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let fish = stdout(&out);
    assert!(
        fish.contains(r#"complete -c baton -n "__fish_baton_needs_command" -f -a "status""#),
        "{fish}"
    );
}

#[test]
fn an_unknown_shell_is_refused_with_the_valid_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = baton(dir.path(), &["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
    assert!(err.contains("[possible values: bash, zsh, fish]"), "{err}");
}

#[test]
fn man_writes_a_page_per_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pages = dir.path().join("man/man1");
    let out = baton(
        dir.path(),
        &["man", "--write", pages.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let top = std::fs::read_to_string(pages.join("baton.1")).expect("baton.1");
    assert!(top.contains("\n.TH baton 1 "), "{top}");
    assert!(top.contains("Zero\\-downtime rollouts"), "{top}");
    let status = std::fs::read_to_string(pages.join("baton-status.1")).expect("baton-status.1");
    let version = format!("\"baton {}", env!("CARGO_PKG_VERSION"));
    assert!(
        status.contains(&format!("\n.TH baton-status 1  {version}")),
        "{status}"
    );
    assert!(
        status.contains("Show rollouts: phase, step, weight per revision"),
        "{status}"
    );
    // Nested commands get pages too; `help` gets none.
    assert!(pages.join("baton-audit-verify.1").is_file());
    assert!(pages.join("baton-set-image.1").is_file());
    assert!(!pages.join("baton-help.1").exists());

    // Every page written is named on stdout, and only those.
    let mut listed: Vec<String> = stdout(&out)
        .lines()
        .map(|l| l.strip_prefix("wrote ").expect("a wrote line").to_owned())
        .collect();
    let mut written: Vec<String> = std::fs::read_dir(&pages)
        .expect("read pages")
        .map(|e| e.expect("entry").path().display().to_string())
        .collect();
    listed.sort();
    written.sort();
    assert_eq!(listed, written);
    assert!(!dir.path().join("state").exists(), "man wrote state");
}

/// `--write`, not `--dir`: the global `--dir` (`BATON_DIR`) is the state directory,
/// and a plain `baton man` must print, not fill the state directory with pages.
#[test]
fn man_prints_the_top_page_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = baton(dir.path(), &["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains("\n.TH baton 1 "), "{page}");
    assert!(page.contains("baton\\-status(1)"), "{page}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "baton man wrote {left:?}");
}

#[test]
fn man_names_the_path_it_cannot_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").expect("write file");
    let target = blocker.join("man1");
    let out = baton(
        dir.path(),
        &["man", "--write", target.to_str().expect("utf-8")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot create {}", target.display())),
        "{err}"
    );
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
