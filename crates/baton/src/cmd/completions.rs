//! `baton completions SHELL`: completion scripts generated from the command tree, so
//! they never fall behind a new command or flag.

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use clap_complete::Shell as Generator;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    shell: Shell,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shell {
    /// `baton completions bash > ~/.local/share/bash-completion/completions/baton`
    Bash,
    /// `baton completions zsh > "${fpath[1]}/_baton"`
    Zsh,
    /// `baton completions fish > ~/.config/fish/completions/baton.fish`
    Fish,
}

/// Prints the script for `args.shell` completing `cmd` (the whole `baton` CLI).
pub fn run(mut cmd: clap::Command, args: CompletionsArgs) -> Result<()> {
    let generator = match args.shell {
        Shell::Bash => Generator::Bash,
        Shell::Zsh => Generator::Zsh,
        Shell::Fish => Generator::Fish,
    };
    // Rendered first: the generator panics on a failed write, and a closed pipe
    // (`| head`) is no reason to.
    let mut script = Vec::new();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(generator, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write the completion script"),
    }
}
