//! Writes the man page and shell completions of `clusterwatch` into a directory, from the same
//! CLI definition the binary parses, so packaged documentation cannot drift from the flags.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use clusterwatch::cli::Cli;

fn main() -> Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: gen-assets OUT_DIR")?
        .into();
    std::fs::create_dir_all(out.join("completions"))
        .with_context(|| format!("could not create {}", out.display()))?;

    let mut command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(out.join("clusterwatch.1"), page)?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "clusterwatch", out.join("completions"))
            .with_context(|| format!("could not write the {shell} completions"))?;
    }
    Ok(())
}
