//! `--pid-file PATH`: the running process's pid, for `stickylb upgrade --pid-file PATH` and for
//! supervisors that want one. Written once the process serves (at start, and by the new
//! process when it takes over an upgrade), atomically (a temporary file renamed over it, so a
//! reader never sees half a pid), and removed at a clean exit if it still names this process
//! (after an upgrade it names the new one).

use std::io;
use std::path::{Path, PathBuf};

/// Writes `pid` to `path` (via `PATH.tmp` and a rename).
pub fn write(path: &Path, pid: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Writes the pid file, logging a failure (it is not fatal: the process serves either way).
pub fn announce(path: Option<&Path>) {
    if let Some(path) = path {
        if let Err(e) = write(path, std::process::id()) {
            tracing::error!("cannot write the pid file {}: {e}", path.display());
        }
    }
}

/// The pid in `path`.
pub fn read(path: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the pid file {}: {e}", path.display()))?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| format!("{} holds no pid: {:?}", path.display(), text.trim()))
}

/// Removes `path` if it names this process.
pub fn remove_if_ours(path: Option<&Path>) {
    if let Some(path) = path {
        if read(path) == Ok(std::process::id()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_reads_back_and_garbage_is_named() {
        let dir = std::env::temp_dir().join(format!("stickylb-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stickylb.pid");
        write(&path, 4242).unwrap();
        assert_eq!(read(&path), Ok(4242));
        std::fs::write(&path, "x").unwrap();
        assert!(read(&path).unwrap_err().contains("holds no pid"));
        assert!(read(&dir.join("missing"))
            .unwrap_err()
            .contains("cannot read the pid file"));
        write(&path, std::process::id()).unwrap();
        remove_if_ours(Some(&path));
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
