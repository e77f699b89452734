//! Man pages (clap_mangen) and shell completions (clap_complete) from a binary's
//! own clap definition, so that they cannot drift from what the binary parses.
//! Each binary has a hidden `generate-docs --out DIR` that calls [`write`];
//! `cargo xtask package` runs it.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writes `DIR/man/*.1` (the command and one page per visible subcommand) and
/// `DIR/completions/{NAME.bash,_NAME,NAME.fish}`. Returns the files written.
pub fn write(mut cmd: clap::Command, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    cmd.build();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let name = cmd.get_name().to_string();
    // clap's `help` subcommand gets pages of its own (NAME-help-run.1, ...): they
    // only repeat the real ones.
    let help = format!("{name}-help");
    let mut written = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
        if file.is_some_and(|f| f.starts_with(&help)) {
            std::fs::remove_file(&path)?;
        } else {
            written.push(path);
        }
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            &name,
            &completions,
        )?);
    }
    written.sort();
    Ok(written)
}
