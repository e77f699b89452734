//! Small line-oriented files beside a chain (`witness.cosig`, `gaps.declared`):
//! appended durably one line at a time, read back without the torn last line a
//! crash mid-append can leave.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Appends `line` (ending in `\n`) durably: a torn last line is cut first, the line
/// is written with one `write(2)`, then `fdatasync`; a new file is made durable in
/// its directory too. The file is created 0644 and never followed through a symlink.
pub fn append(dir: &Path, name: &str, line: &str) -> std::io::Result<()> {
    let path = dir.join(name);
    let created = !path.exists();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let len = f.seek(SeekFrom::End(0))?;
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            let mut all = Vec::new();
            f.seek(SeekFrom::Start(0))?;
            f.read_to_end(&mut all)?;
            let keep = all.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            f.set_len(keep as u64)?;
        }
    }
    f.seek(SeekFrom::End(0))?;
    f.write_all(line.as_bytes())?;
    f.sync_data()?;
    if created {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The complete lines of `dir/name` (no file: none), and whether a torn last line
/// (no newline) was left out.
pub fn read(dir: &Path, name: &str) -> Result<(Vec<String>, bool), String> {
    let path = dir.join(name);
    let text = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = complete < text.len();
    let text = std::str::from_utf8(&text[..complete])
        .map_err(|e| format!("{}: not text: {e}", path.display()))?;
    Ok((text.lines().map(str::to_owned).collect(), torn))
}
