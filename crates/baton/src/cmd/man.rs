//! `baton man`: manual pages generated from the command tree (the same text as
//! `--help`), for packagers and `man baton`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use clap_mangen::Man;

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write `baton.1` and a page per subcommand (`baton-up.1`, `baton-audit-verify.1`,
    /// ...) into this directory, made if missing, instead of printing `baton.1`. (Not
    /// `--dir`: that is every command's state directory.)
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

pub fn run(cmd: clap::Command, args: ManArgs) -> Result<()> {
    // `help` would get a page of its own, and a row in `baton.1`, saying only "help".
    let mut cmd = cmd.disable_help_subcommand(true);
    // Names subcommands `baton-up` and so on, for their pages' titles and file names.
    cmd.build();
    match args.write {
        Some(dir) => write_all(&cmd, &dir),
        None => {
            let mut page = Vec::new();
            let source = source(&cmd);
            Man::new(cmd)
                .source(source)
                .render(&mut page)
                .context("cannot render the manual page")?;
            let mut out = std::io::stdout().lock();
            match out.write_all(&page).and_then(|()| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("cannot write the manual page"),
            }
        }
    }
}

/// One page for `cmd` and for each of its visible subcommands, at any depth.
fn write_all(cmd: &clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let source = source(cmd);
    let mut pending = std::collections::VecDeque::from([cmd.clone()]);
    while let Some(cmd) = pending.pop_front() {
        pending.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = Man::new(cmd).source(&source);
        let path = dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page)
            .with_context(|| format!("cannot render {}", path.display()))?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The footer every page shares, `baton 0.1.0 (COMMIT)`; a subcommand's own would read
/// `status 0.1.0 (COMMIT)`.
fn source(root: &clap::Command) -> String {
    format!(
        "{} {}",
        root.get_name(),
        root.get_version().unwrap_or_default()
    )
}
