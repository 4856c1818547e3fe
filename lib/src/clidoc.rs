//! Shell completions and man pages, generated from the same clap definitions the binaries
//! parse with, so they never drift from the real arguments.

use std::io::{self, Write};

use clap_complete::Shell;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Doc {
    Bash,
    Zsh,
    Fish,
    /// A man page (roff), e.g. `terok-admin docs man > terok-admin.1`
    Man,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DocArgs {
    /// bash, zsh or fish completions, or a man page
    #[arg(value_enum)]
    pub what: Doc,
}

/// Write the completions or man page of `cmd` to `out`. Rendered into memory first:
/// clap_complete panics on a failed write, and a closed pipe (`| head`) is no error here.
pub fn emit(mut cmd: clap::Command, what: Doc, out: &mut impl Write) -> io::Result<()> {
    let name = cmd.get_name().to_owned();
    let mut text = Vec::new();
    match what {
        Doc::Bash => clap_complete::generate(Shell::Bash, &mut cmd, name, &mut text),
        Doc::Zsh => clap_complete::generate(Shell::Zsh, &mut cmd, name, &mut text),
        Doc::Fish => clap_complete::generate(Shell::Fish, &mut cmd, name, &mut text),
        Doc::Man => clap_mangen::Man::new(cmd).render(&mut text)?,
    }
    match out.write_all(&text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
