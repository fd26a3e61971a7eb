//! Man pages (`clap_mangen`) and shell completions (`clap_complete`) of the
//! binaries, generated from their clap definitions by `repctl man`,
//! `repctl completions SHELL` (and the same `repd` subcommands), so they
//! never drift from `--help`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The `man` and `completions` subcommands both binaries have (flattened
/// into their subcommand enums).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DocCommand {
    /// Write man pages: this command's page to stdout, or with --dir its
    /// page and one per subcommand into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

impl DocCommand {
    /// Runs it for the binary whose clap definition is `cmd`.
    pub fn run(&self, mut cmd: clap::Command) -> io::Result<()> {
        match self {
            DocCommand::Man { dir } => man_command(cmd, dir.as_deref()),
            DocCommand::Completions { shell } => {
                completions(&mut cmd, *shell, &mut io::stdout());
                Ok(())
            }
        }
    }
}

/// The man page of `cmd` in `section` (roff).
pub fn man_page(cmd: clap::Command, section: &'static str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).section(section).render(&mut out)?;
    Ok(out)
}

/// Writes the man pages of `cmd` and of each subcommand (`repctl-status.8`
/// …) into `dir`; returns the files written.
pub fn write_man_pages(cmd: clap::Command, section: &'static str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn generate(cmd: clap::Command, section: &'static str, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            generate(sub, section, dir, out)?;
        }
        out.push(clap_mangen::Man::new(cmd).section(section).generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    generate(cmd, section, dir, &mut written)?;
    Ok(written)
}

/// The `man [--dir DIR]` subcommand: the page of `cmd` to stdout, or every
/// page into `dir` (their paths to stdout).
pub fn man_command(cmd: clap::Command, dir: Option<&Path>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    match dir {
        None => stdout.write_all(&man_page(cmd, "8")?),
        Some(dir) => {
            for f in write_man_pages(cmd, "8", dir)? {
                writeln!(stdout, "{}", f.display())?;
            }
            Ok(())
        }
    }
}

/// Writes the completion script of `cmd` for `shell`.
pub fn completions(cmd: &mut clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
}
