//! `conduit-sensor reload`: a reload whose outcome `systemctl reload` sees.
//!
//! bookworm's systemd 252 has no `Type=notify-reload`, and a SIGHUP alone reports
//! success whatever the agent then does with the map. So `ExecReload=` runs
//! `conduit-sensor reload --pid $MAINPID`: it reads the agent's reload status file,
//! sends SIGHUP, and waits (with a deadline) until the agent has written the outcome
//! of a newer reload generation; it exits 0 if the agent applied it and 1 if the
//! agent rejected it (the previous map stays in force).
//!
//! The status file is `$RUNTIME_DIRECTORY/reload.status` (the unit's
//! `RuntimeDirectory=`; systemd sets the variable for `ExecStart=` and
//! `ExecReload=` alike), one line: `GENERATION applied|rejected MESSAGE`. Without
//! `RUNTIME_DIRECTORY` the agent writes none and `reload` refuses to run (exit 2).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the status in the runtime directory.
pub const STATUS_FILE: &str = "reload.status";

/// The outcome of one reload, as the agent wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub generation: u64,
    pub applied: bool,
    pub message: String,
}

impl Status {
    fn parse(text: &str) -> Option<Status> {
        let mut parts = text.trim_end().splitn(3, ' ');
        let generation = parts.next()?.parse().ok()?;
        let applied = match parts.next()? {
            "applied" => true,
            "rejected" => false,
            _ => return None,
        };
        Some(Status {
            generation,
            applied,
            message: parts.next().unwrap_or_default().to_owned(),
        })
    }
}

/// Where the status file is, if the agent runs with a runtime directory.
pub fn status_path() -> Option<PathBuf> {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")?;
    // Several directories are separated by ':'; the first is ours.
    let first = dir.to_string_lossy().split(':').next()?.to_owned();
    (!first.is_empty()).then(|| Path::new(&first).join(STATUS_FILE))
}

/// Reads the status file; `None` when there is none (no reload yet).
pub fn read(path: &Path) -> Option<Status> {
    Status::parse(&std::fs::read_to_string(path).ok()?)
}

/// The agent: records the outcome of a reload as the next generation. Written to a
/// temporary name and renamed, so a reader never sees half a line.
pub fn record(applied: bool, message: &str) {
    let Some(path) = status_path() else {
        return;
    };
    let generation = read(&path).map_or(1, |s| s.generation + 1);
    let line = format!(
        "{generation} {} {}\n",
        if applied { "applied" } else { "rejected" },
        message.lines().next().unwrap_or_default()
    );
    let tmp = path.with_extension("status.tmp");
    if let Err(err) = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, &path)) {
        tracing::warn!(path = %path.display(), "reload status file: {err}; `conduit-sensor reload` will time out");
    }
}

/// Why `reload` did not report success.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "RUNTIME_DIRECTORY is not set: `reload` works with the unit's RuntimeDirectory= (or set RUNTIME_DIRECTORY for both the agent and this command)"
    )]
    NoRuntimeDirectory,
    #[error("cannot signal process {pid}: {source}")]
    Signal { pid: i32, source: nix::Error },
    #[error("the agent rejected the reload: {0}; the previous conduit map stays in force")]
    Rejected(String),
    #[error("no reload outcome from process {pid} within {timeout:?} (status file {path})")]
    Timeout {
        pid: i32,
        timeout: Duration,
        path: String,
    },
}

/// `conduit-sensor reload --pid PID`: SIGHUP and wait for the outcome.
pub fn reload(pid: i32, timeout: Duration) -> Result<Status, ReloadError> {
    let path = status_path().ok_or(ReloadError::NoRuntimeDirectory)?;
    let before = read(&path).map_or(0, |s| s.generation);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|source| ReloadError::Signal { pid, source })?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = read(&path).filter(|s| s.generation > before) {
            return if status.applied {
                Ok(status)
            } else {
                Err(ReloadError::Rejected(status.message))
            };
        }
        if Instant::now() >= deadline {
            return Err(ReloadError::Timeout {
                pid,
                timeout,
                path: path.display().to_string(),
            });
        }
        // The agent's reload takes milliseconds to seconds; poll lightly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            Status::parse("3 rejected conduits.yaml:4:7: unknown zone\n"),
            Some(Status {
                generation: 3,
                applied: false,
                message: "conduits.yaml:4:7: unknown zone".into()
            })
        );
        assert_eq!(Status::parse("1 applied \n").map(|s| s.applied), Some(true));
        assert_eq!(Status::parse("x applied"), None);
        assert_eq!(Status::parse("2 maybe"), None);
    }
}
