//! Files written whole or not at all, with their mode from the first byte.
//!
//! The bytes go to a new temporary file beside the target (created exclusively, so never
//! through a symlink, with the final mode), are synced, and the file is then renamed over
//! the target (or linked to it, when an existing file must not be replaced). A symlink
//! at the target is replaced, never followed; a reader sees the old file or the new one,
//! never a part; a secret is never readable by others, not even for an instant.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// What to do when the target exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it.
    Replace,
    /// Leave it and fail with [`io::ErrorKind::AlreadyExists`].
    Refuse,
}

/// Writes a secret: `bytes` to `path`, mode 0600, replacing what is there.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, 0o600, Existing::Replace)
}

/// Writes `bytes` to `path` whole, with `mode` (less the umask) from the start.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, existing: Existing) -> io::Result<()> {
    let (tmp, mut file) = create_temp(path, mode)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        match existing {
            Existing::Replace => std::fs::rename(&tmp, path),
            // link(2) fails on any existing entry, a symlink included, without following
            // it.
            Existing::Refuse => std::fs::hard_link(&tmp, path),
        }
    })();
    if result.is_err() || existing == Existing::Refuse {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The new name reaches the disk too (best effort: not every file system syncs
    // folders).
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A new file `.NAME.PID.N.tmp` beside `path`, opened exclusively with `mode`.
fn create_temp(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file name", path.display()),
        )
    })?;
    loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = path.with_file_name(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // Left by a crashed run with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::test_dir::Dir;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn a_private_file_is_0600_even_over_a_readable_one() {
        let dir = Dir::new("fs-private");
        let p = dir.0.join("secret");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(entries(&dir.0), 1, "a temporary file was left");
    }

    #[test]
    fn a_symlink_is_replaced_not_followed() {
        let dir = Dir::new("fs-symlink");
        let elsewhere = dir.0.join("elsewhere");
        std::fs::write(&elsewhere, "keep").unwrap();
        let p = dir.0.join("key");
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        assert_eq!(
            write_atomic(&p, b"k", 0o600, Existing::Refuse)
                .unwrap_err()
                .kind(),
            io::ErrorKind::AlreadyExists
        );
        write_private(&p, b"k").unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
        assert_eq!(std::fs::read(&p).unwrap(), b"k");
        assert_eq!(entries(&dir.0), 2);
    }

    #[test]
    fn refuse_leaves_an_existing_file_and_creates_a_new_one() {
        let dir = Dir::new("fs-refuse");
        let p = dir.0.join("cert.pem");
        write_atomic(&p, b"one", 0o644, Existing::Refuse).unwrap();
        assert_eq!(mode(&p) & 0o600, 0o600);
        let e = write_atomic(&p, b"two", 0o644, Existing::Refuse).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(entries(&dir.0), 1, "a temporary file was left");
    }
}
